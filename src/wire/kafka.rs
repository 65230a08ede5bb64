//! Kafka plumbing shared by the Kafka source ([`crate::source::kafka`]) and the Kafka sink
//! ([`crate::sink::kafka`]): the `kafka://` address, the librdkafka client settings, the
//! topic's metadata with retries until `--connect-timeout`, and a record's bytes.
//!
//! One record per batch: the key is the batch number (decimal), the value the batch in a
//! wire format ([`Format`]: spark-json, the default, the original's line without its
//! newline; ndjson, one image per line; arrow, a self-contained Arrow IPC stream: schema,
//! one record batch, end marker). Records go to the topic's partitions in turn
//! (batch `n` to the `n mod P`-th), so a topic of one partition holds the stream in order.
//!
//! The clients are librdkafka's (through `rdkafka`, built from its bundled source). Partitions
//! are **assigned**, never subscribed (no broker-managed consumer group): the reader keeps
//! its own offsets, in the trainer's checkpoint, as Spark and Flink do.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{Client, ClientContext};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::producer::ProducerContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::error::{Error, Result};
use crate::wire::batch::{make_batch_sized, stream_schema_sized};
use crate::wire::{ndjson, spark_json, Format};

/// Where a Kafka source reads from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// The oldest record the broker keeps (the default).
    Earliest,
    /// The end of each partition at the start: only records published later.
    Latest,
    /// This offset in every selected partition.
    Offset(i64),
}

/// `kafka://HOST:PORT[,HOST:PORT...]/TOPIC[?partitions=0,1&start=earliest|latest|OFFSET]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaUrl {
    /// Bootstrap brokers, `HOST:PORT` separated by commas.
    pub brokers: String,
    /// The topic.
    pub topic: String,
    /// The partitions to read or write (`None`: all of the topic's).
    pub partitions: Option<Vec<i32>>,
    /// Where a reader starts.
    pub start: Start,
}

impl KafkaUrl {
    /// Parses a `kafka://` address.
    pub fn parse(s: &str) -> Result<KafkaUrl> {
        let bad = |why: &str| {
            Error::usage(format!(
                "{s:?}: {why} (expected kafka://HOST:PORT/TOPIC[?partitions=0,1&start=\
                 earliest|latest|OFFSET])"
            ))
        };
        let rest = s
            .strip_prefix("kafka://")
            .ok_or_else(|| bad("not a kafka:// address"))?;
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        let (brokers, topic) = path.split_once('/').ok_or_else(|| bad("no topic"))?;
        if brokers.is_empty() {
            return Err(bad("no broker"));
        }
        for b in brokers.split(',') {
            let port = b.rsplit_once(':').map(|(_, p)| p);
            if port.is_none_or(|p| p.parse::<u16>().is_err()) {
                return Err(bad(&format!("broker {b:?} is not HOST:PORT")));
            }
        }
        let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if topic.is_empty() || topic.len() > 249 || !topic.chars().all(valid) {
            return Err(bad(&format!(
                "topic {topic:?} must be 1..249 characters of a-z, A-Z, 0-9, '.', '_', '-'"
            )));
        }
        let mut url = KafkaUrl {
            brokers: brokers.to_string(),
            topic: topic.to_string(),
            partitions: None,
            start: Start::Earliest,
        };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| bad(&format!("{pair:?} is not KEY=VALUE")))?;
            match k {
                "partitions" => {
                    let mut ps = Vec::new();
                    for p in v.split(',') {
                        let p =
                            p.parse::<i32>().ok().filter(|&p| p >= 0).ok_or_else(|| {
                                bad(&format!("partition {p:?} is not a number ≥ 0"))
                            })?;
                        if ps.contains(&p) {
                            return Err(bad(&format!("partition {p} is named twice")));
                        }
                        ps.push(p);
                    }
                    url.partitions = Some(ps);
                }
                "start" => {
                    url.start = match v {
                        "earliest" => Start::Earliest,
                        "latest" => Start::Latest,
                        o => Start::Offset(o.parse::<i64>().ok().filter(|&o| o >= 0).ok_or_else(
                            || bad(&format!("start {o:?} is not earliest, latest or an offset")),
                        )?),
                    }
                }
                other => return Err(bad(&format!("unknown parameter {other:?}"))),
            }
        }
        Ok(url)
    }

    /// The partitions of `have` (the topic's) that this address names: all of them, or
    /// those of `?partitions=`, each of which must exist.
    pub fn choose(&self, have: &[i32]) -> Result<Vec<i32>> {
        let Some(want) = &self.partitions else {
            return Ok(have.to_vec());
        };
        match want.iter().find(|p| !have.contains(p)) {
            Some(p) => Err(Error::Kafka {
                what: self.base(),
                reason: format!(
                    "partition {p} does not exist (the topic has {})",
                    describe(have)
                ),
            }),
            None => Ok(want.clone()),
        }
    }

    /// `kafka://BROKERS/TOPIC`, without the parameters: for messages.
    pub fn base(&self) -> String {
        format!("kafka://{}/{}", self.brokers, self.topic)
    }
}

impl fmt::Display for KafkaUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.base())?;
        let mut sep = '?';
        if let Some(ps) = &self.partitions {
            let ps: Vec<String> = ps.iter().map(i32::to_string).collect();
            write!(f, "{sep}partitions={}", ps.join(","))?;
            sep = '&';
        }
        match self.start {
            Start::Earliest => Ok(()),
            Start::Latest => write!(f, "{sep}start=latest"),
            Start::Offset(o) => write!(f, "{sep}start={o}"),
        }
    }
}

/// The client context: librdkafka's log lines go to `debug` (it retries by itself and says
/// so at every attempt; cifar-df says what matters once), and its last error is kept for
/// the message when a deadline passes. A producer also counts failed deliveries.
#[derive(Default)]
pub struct Context {
    last_error: Mutex<Option<String>>,
    failed: Mutex<Option<(String, String)>>,
}

impl Context {
    /// The last error librdkafka reported, if any.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn failure(&self) -> Option<(String, String)> {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl ClientContext for Context {
    fn log(&self, _level: RDKafkaLogLevel, fac: &str, message: &str) {
        tracing::debug!(target: "librdkafka", "{fac}: {message}");
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(target: "librdkafka", "error: {error}: {reason}");
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.to_string());
    }
}

impl ConsumerContext for Context {}

impl ProducerContext for Context {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, m)) = result {
            let key = m
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .unwrap_or_default();
            let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
            if failed.is_none() {
                *failed = Some((key, e.to_string()));
            }
        }
    }
}

/// Settings every client gets: the brokers, quick reconnects, and messages up to
/// `max_message` bytes.
pub fn client_config(url: &KafkaUrl, max_message: usize) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &url.brokers)
        .set("client.id", "cifar-df")
        // A topic is created only on purpose (the sink, with its partitions), never as a
        // side effect of asking for its metadata.
        .set("allow.auto.create.topics", "false")
        .set("reconnect.backoff.ms", "100")
        .set("reconnect.backoff.max.ms", "1000")
        .set("topic.metadata.refresh.interval.ms", "10000")
        .set("log_level", "7")
        .set(
            "message.max.bytes",
            max_message.clamp(1 << 20, 1_000_000_000).to_string(),
        );
    c
}

/// An rdkafka error as a cifar-df error about `what`.
pub fn error(what: impl Into<String>, e: impl fmt::Display) -> Error {
    Error::Kafka {
        what: what.into(),
        reason: e.to_string(),
    }
}

/// The topic's partitions, or `None` when the broker says there is no such topic. Retries
/// while the broker cannot be reached, until `timeout` has passed.
pub fn topic_partitions<C: ClientContext>(
    client: &Client<C>,
    context: &Context,
    url: &KafkaUrl,
    timeout: Duration,
) -> Result<Option<Vec<i32>>> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.fetch_metadata(
            Some(&url.topic),
            left.clamp(Duration::from_millis(200), Duration::from_secs(2)),
        ) {
            Ok(md) => {
                let Some(t) = md.topics().iter().find(|t| t.name() == url.topic) else {
                    return Ok(None);
                };
                match t.error() {
                    None => {
                        let mut ps: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
                        ps.sort_unstable();
                        return Ok(Some(ps));
                    }
                    Some(e)
                        if RDKafkaErrorCode::from(e)
                            == RDKafkaErrorCode::UnknownTopicOrPartition =>
                    {
                        return Ok(None)
                    }
                    Some(e) => {
                        let e = RDKafkaErrorCode::from(e);
                        if Instant::now() >= deadline {
                            return Err(error(
                                format!("topic {:?} on {}", url.topic, url.brokers),
                                e,
                            ));
                        }
                    }
                }
            }
            Err(e) => {
                if Instant::now() >= deadline {
                    return Err(unreachable(url, timeout, context, e));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The error for a broker that did not answer within `timeout`.
pub fn unreachable(
    url: &KafkaUrl,
    timeout: Duration,
    context: &Context,
    e: impl fmt::Display,
) -> Error {
    Error::Kafka {
        what: format!(
            "cannot reach the Kafka broker {} within {} s (--connect-timeout)",
            url.brokers,
            timeout.as_secs_f64()
        ),
        reason: context.last_error().unwrap_or_else(|| e.to_string()),
    }
}

/// The wire-format bytes of one batch, as a Kafka record's value.
pub fn encode_record(
    format: Format,
    seq: u64,
    labels: &[u16],
    pixels: &[u8],
    out: &mut Vec<u8>,
) -> Result<()> {
    out.clear();
    // The images' side, from their share of the pixels (CIFAR's 32 for an empty batch).
    let per = pixels
        .len()
        .checked_div(labels.len())
        .unwrap_or(crate::dataset::IMAGE_BYTES);
    let side = crate::transforms::pixels::side(per).ok_or_else(|| {
        Error::usage(format!(
            "batch {seq}: {} pixel bytes for {} labels are not whole RGB square images",
            pixels.len(),
            labels.len()
        ))
    })?;
    if format == Format::SparkJson {
        format.check_side(side)?;
    }
    match format {
        Format::SparkJson => {
            out.reserve(spark_json::encoded_len(labels, pixels));
            spark_json::encode(labels, pixels, out);
            while out.last() == Some(&b'\n') {
                out.pop();
            }
        }
        Format::Ndjson => ndjson::encode(labels, pixels, out),
        Format::Arrow => {
            let batch = make_batch_sized(seq, None, labels.to_vec(), pixels.to_vec(), side)?;
            let mut w = arrow::ipc::writer::StreamWriter::try_new(
                std::mem::take(out),
                &stream_schema_sized(side),
            )?;
            w.write(&batch)?;
            w.finish()?;
            *out = w.into_inner()?;
        }
    }
    Ok(())
}

/// Creates `url`'s topic with `partitions` partitions (replication 1). A topic that
/// another client created meanwhile is fine.
pub fn create_topic(url: &KafkaUrl, partitions: i32, timeout: Duration) -> Result<()> {
    let admin: AdminClient<Context> = client_config(url, 1 << 20)
        .create_with_context(Context::default())
        .map_err(|e| {
            error(
                format!("create a Kafka admin client for {}", url.brokers),
                e,
            )
        })?;
    let topic = NewTopic::new(&url.topic, partitions, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(timeout.max(Duration::from_secs(1))));
    let results = futures::executor::block_on(admin.create_topics([&topic], &opts))
        .map_err(|e| error(format!("create topic {}", url.base()), e))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, e)) => {
                return Err(error(
                    format!("create topic {name:?} on {}", url.brokers),
                    e,
                ))
            }
        }
    }
    Ok(())
}

/// `0..3` or `0, 2, 5`: a partition list for messages.
pub fn describe(ps: &[i32]) -> String {
    let contiguous = ps.iter().enumerate().all(|(i, &p)| p == i as i32);
    match ps {
        [] => "no partitions".into(),
        _ if contiguous => format!("partitions 0..{}", ps.len() - 1),
        _ => format!(
            "partitions {}",
            ps.iter().map(i32::to_string).collect::<Vec<_>>().join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_print() {
        let u = KafkaUrl::parse("kafka://127.0.0.1:9092/images").unwrap();
        assert_eq!(u.brokers, "127.0.0.1:9092");
        assert_eq!(u.topic, "images");
        assert_eq!(u.partitions, None);
        assert_eq!(u.start, Start::Earliest);
        assert_eq!(u.to_string(), "kafka://127.0.0.1:9092/images");
        let u = KafkaUrl::parse("kafka://a:1,b:2/t.x?partitions=2,0&start=17").unwrap();
        assert_eq!(u.brokers, "a:1,b:2");
        assert_eq!(u.partitions, Some(vec![2, 0]));
        assert_eq!(u.start, Start::Offset(17));
        assert_eq!(KafkaUrl::parse(&u.to_string()).unwrap(), u);
        let u = KafkaUrl::parse("kafka://h:1/t?start=latest").unwrap();
        assert_eq!(u.start, Start::Latest);
        for bad in [
            "kafka://h:1",
            "kafka://h/t",
            "kafka:///t",
            "kafka://h:1/",
            "kafka://h:1/a b",
            "kafka://h:1/t?partitions=x",
            "kafka://h:1/t?partitions=1,1",
            "kafka://h:1/t?start=-3",
            "kafka://h:1/t?colour=red",
        ] {
            let e = KafkaUrl::parse(bad).unwrap_err().to_string();
            assert!(e.contains("expected kafka://"), "{bad}: {e}");
        }
    }

    #[test]
    fn partition_lists_read_well() {
        assert_eq!(describe(&[0, 1, 2]), "partitions 0..2");
        assert_eq!(describe(&[0, 2]), "partitions 0, 2");
        assert_eq!(describe(&[]), "no partitions");
    }

    #[test]
    fn records_are_self_contained_in_each_format() {
        let labels = vec![3u16, 7];
        let pixels: Vec<u8> = (0..2 * 3072).map(|i| (i % 251) as u8).collect();
        let mut out = Vec::new();
        encode_record(Format::SparkJson, 5, &labels, &pixels, &mut out).unwrap();
        assert!(out.starts_with(b"{\"0\": {\"feature0\": 0,") && !out.ends_with(b"\n"));
        let mut decoded = spark_json::DecodedBatch::default();
        spark_json::decode(&out, &mut decoded).unwrap();
        assert_eq!(
            (decoded.labels.clone(), decoded.pixels.clone()),
            (labels.clone(), pixels.clone())
        );
        encode_record(Format::Arrow, 5, &labels, &pixels, &mut out).unwrap();
        let reader =
            arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(out.clone()), None)
                .unwrap();
        let batches: Vec<_> = reader.collect::<std::result::Result<_, _>>().unwrap();
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].num_rows(), 2);
    }
}
