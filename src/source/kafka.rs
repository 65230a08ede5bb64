//! The Kafka source: `kafka://HOST:PORT/TOPIC[?partitions=0,1&start=earliest|latest|OFFSET]`.
//!
//! Each record is one batch in a wire format (detected from its first bytes, as for the
//! other sources, unless `--format` says). Batches are numbered in the order they are read,
//! from 0, and keep their `partition` and `offset` as columns (and in rejections).
//!
//! **Order.** Without `--follow` the source reads up to the end offsets it saw when it
//! started and then ends; it takes one record from each partition in turn (partition order
//! as listed), so the order of the batches, and with it a training run, depends only on the
//! topic's contents. With `--follow` it keeps reading as records arrive, taking whichever
//! partition has one; on one partition that is again the topic's order.
//!
//! **Offsets.** The reader keeps its own offsets: [`Report::position_after`] gives, for a
//! delivered batch, the next offset of every partition after it, which the trainer stores in
//! its checkpoint; a resumed run passes them back ([`SourceOptions::kafka_offsets`]) and
//! the source seeks there, numbering on from [`SourceOptions::skip`]. The broker's committed
//! offsets are not used.
//!
//! **Faults.** A broker that cannot be reached is retried until `--connect-timeout`; a
//! broker that goes away mid-stream is waited for as long (librdkafka reconnects and fetches
//! on from the last offset read, so no batch is read twice); a broker that comes back
//! without the records this reader needs next (or a checkpoint offset it no longer keeps)
//! is an error naming both offsets. A record that does not decode is rejected (with its
//! partition and offset), counted, and the stream goes on.

use std::io::Cursor;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, Int32Array, Int64Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaErrorCode;

use super::reader::{restamp, ArrowSource};
use super::{BatchSource, Rejection, Report, SourceOptions};
use crate::dataset::SIDE;
use crate::error::{Error, Result};
use crate::wire::batch::{make_batch_sized, stream_schema_sized};
use crate::wire::kafka::{self, Context, KafkaUrl, Start};
use crate::wire::{self, ndjson, spark_json, Detected, Format};

/// How often a waiting reader asks the broker whether it is still there.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// The schema of a Kafka source's batches of 32×32 images: the stream schema, then
/// `partition` (Int32) and `offset` (Int64) of the record the batch came from.
pub fn schema() -> SchemaRef {
    static SCHEMA: std::sync::OnceLock<SchemaRef> = std::sync::OnceLock::new();
    SCHEMA.get_or_init(|| build_schema(SIDE)).clone()
}

/// [`schema`] for `side`×`side` images.
pub fn schema_sized(side: usize) -> SchemaRef {
    if side == SIDE {
        schema()
    } else {
        build_schema(side)
    }
}

fn build_schema(side: usize) -> SchemaRef {
    let mut fields: Vec<Arc<Field>> = stream_schema_sized(side).fields().iter().cloned().collect();
    fields.push(Arc::new(Field::new("partition", DataType::Int32, false)));
    fields.push(Arc::new(Field::new("offset", DataType::Int64, false)));
    Arc::new(Schema::new(fields))
}

/// A record read: its partition, its offset and its value (`None`: a record without one).
type Record = (i32, i64, Option<Vec<u8>>);

/// One partition being read.
struct Part {
    id: i32,
    queue: rdkafka::consumer::base_consumer::PartitionQueue<Context>,
    /// The next offset to read.
    next: i64,
    /// Stop here (the end offset at the start), unless following.
    end: Option<i64>,
}

/// An open reader.
struct Open {
    consumer: Arc<BaseConsumer<Context>>,
    parts: Vec<Part>,
    /// Whose turn it is.
    turn: usize,
    /// Since when the broker has not answered, while it does not.
    down_since: Option<Instant>,
}

/// A Kafka topic as a source of batches; connects on the first [`BatchSource::next_batch`].
pub struct KafkaSource {
    url: KafkaUrl,
    opts: SourceOptions,
    report: Report,
    open: Option<Open>,
    next_batch: u64,
    spark: spark_json::DecodedBatch,
    ndjson: Option<ndjson::LineDecoder>,
}

impl KafkaSource {
    /// A source for `url`; nothing is contacted yet.
    pub fn new(url: KafkaUrl, opts: &SourceOptions) -> Self {
        KafkaSource {
            next_batch: if opts.kafka_offsets.is_some() {
                opts.skip
            } else {
                0
            },
            url,
            opts: opts.clone(),
            report: Report::default(),
            open: None,
            spark: spark_json::DecodedBatch::default(),
            ndjson: None,
        }
    }

    fn connect(&self) -> Result<Open> {
        let url = &self.url;
        let timeout = self.opts.connect_timeout;
        let max = self.opts.max_line_bytes;
        let fetch = max.clamp(1 << 20, 1 << 30);
        let mut config = kafka::client_config(url, fetch);
        config
            .set("group.id", "cifar-df")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "error")
            .set("enable.partition.eof", "false")
            .set("max.partition.fetch.bytes", fetch.to_string())
            .set("fetch.max.bytes", fetch.to_string())
            // A response may run past the fetch size by whole records (Tansu's do), so the
            // transport limit is librdkafka's default or twice the fetch size, whichever
            // is larger; the cap on one record is checked on each record.
            .set(
                "receive.message.max.bytes",
                (2 * fetch + (1 << 20)).max(100_000_000).to_string(),
            )
            // Prefetch at most about one fetch: the memory a reader holds ahead.
            .set(
                "queued.max.messages.kbytes",
                (fetch / 1024).clamp(1024, 1 << 20).to_string(),
            );
        let consumer: BaseConsumer<Context> = config
            .create_with_context(Context::default())
            .map_err(|e| kafka::error(format!("create a Kafka consumer for {}", url.base()), e))?;
        let consumer = Arc::new(consumer);
        let have = kafka::topic_partitions(consumer.client(), consumer.context(), url, timeout)?
            .ok_or_else(|| Error::Kafka {
                what: url.base(),
                reason: format!("the broker has no topic {:?}", url.topic),
            })?;
        let chosen = url.choose(&have)?;
        let mut starts = Vec::new();
        for &p in &chosen {
            let (low, high) = self.watermarks(&consumer, p)?;
            let start = match (&self.opts.kafka_offsets, url.start) {
                (Some(saved), _) => {
                    let o = saved
                        .iter()
                        .find(|(q, _)| *q == p)
                        .map(|&(_, o)| o)
                        .ok_or_else(|| Error::Kafka {
                            what: url.base(),
                            reason: format!(
                                "the checkpoint has no offset for partition {p} (it has {}); \
                                 resume with the partitions the run started with",
                                kafka::describe(&saved.iter().map(|&(q, _)| q).collect::<Vec<_>>())
                            ),
                        })?;
                    if o < low || o > high {
                        return Err(Error::Kafka {
                            what: format!("{} partition {p}", url.base()),
                            reason: format!(
                                "the checkpoint's next offset {o} is no longer on the broker, \
                                 which keeps offsets {low}..{high} (records deleted, or the \
                                 topic re-created); start a new run"
                            ),
                        });
                    }
                    o
                }
                (None, Start::Earliest) => low,
                (None, Start::Latest) => high,
                (None, Start::Offset(o)) => {
                    if o < low || o > high {
                        return Err(Error::Kafka {
                            what: format!("{} partition {p}", url.base()),
                            reason: format!(
                                "start offset {o} is not on the broker, which keeps offsets \
                                 {low}..{high}"
                            ),
                        });
                    }
                    o
                }
            };
            starts.push((p, start, high));
        }
        if let Some(saved) = &self.opts.kafka_offsets {
            if let Some((q, _)) = saved.iter().find(|(q, _)| !chosen.contains(q)) {
                return Err(Error::Kafka {
                    what: url.base(),
                    reason: format!(
                        "the checkpoint has offsets for partition {q}, which this source does \
                         not read; resume with the partitions the run started with"
                    ),
                });
            }
        }
        let mut tpl = TopicPartitionList::new();
        for &(p, start, _) in &starts {
            tpl.add_partition_offset(&url.topic, p, Offset::Offset(start))
                .map_err(|e| kafka::error(format!("{} partition {p}", url.base()), e))?;
        }
        consumer
            .assign(&tpl)
            .map_err(|e| kafka::error(format!("assign {}", url.base()), e))?;
        let mut parts = Vec::new();
        for (p, start, high) in starts {
            let queue = consumer
                .split_partition_queue(&url.topic, p)
                .ok_or_else(|| Error::Kafka {
                    what: format!("{} partition {p}", url.base()),
                    reason: "librdkafka gave no queue for it".into(),
                })?;
            parts.push(Part {
                id: p,
                queue,
                next: start,
                end: (!self.opts.follow).then_some(high),
            });
        }
        tracing::info!(
            "reading {} from offsets {}{}",
            url.base(),
            parts
                .iter()
                .map(|p| format!("{}:{}", p.id, p.next))
                .collect::<Vec<_>>()
                .join(", "),
            if self.opts.follow {
                " (following: it waits for new records)".to_string()
            } else {
                format!(
                    " to {}",
                    parts
                        .iter()
                        .map(|p| format!("{}:{}", p.id, p.end.unwrap_or(0)))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        );
        Ok(Open {
            consumer,
            parts,
            turn: 0,
            down_since: None,
        })
    }

    /// The low and high watermarks of partition `p`, retrying until the connect timeout.
    fn watermarks(&self, consumer: &BaseConsumer<Context>, p: i32) -> Result<(i64, i64)> {
        let deadline = Instant::now() + self.opts.connect_timeout;
        loop {
            match consumer.fetch_watermarks(&self.url.topic, p, Duration::from_secs(2)) {
                Ok(w) => return Ok(w),
                Err(e) if Instant::now() >= deadline => {
                    return Err(kafka::unreachable(
                        &self.url,
                        self.opts.connect_timeout,
                        consumer.context(),
                        e,
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// The next record's value, with its partition and offset; `None` at the end.
    fn next_record(&mut self) -> Result<Option<Record>> {
        let timeout = self.opts.connect_timeout;
        let follow = self.opts.follow;
        let url = &self.url;
        let Some(open) = self.open.as_mut() else {
            return Ok(None);
        };
        let mut waiting_since = Instant::now();
        let mut probed = Instant::now();
        loop {
            // Serve the main queue (errors, statistics); records come on the partition queues.
            if let Some(Err(e)) = open.consumer.poll(Duration::ZERO) {
                tracing::debug!("kafka: {e}");
            }
            let n = open.parts.len();
            let live: Vec<usize> = (0..n)
                .map(|k| (open.turn + k) % n)
                .filter(|&i| open.parts[i].end.is_none_or(|e| open.parts[i].next < e))
                .collect();
            let Some(&first) = live.first() else {
                return Ok(None);
            };
            // In order: the partition whose turn it is. Following: any that has a record.
            let candidates: &[usize] = if follow { &live } else { &live[..1] };
            let wait = if follow {
                Duration::ZERO
            } else {
                Duration::from_millis(100)
            };
            for &i in candidates {
                let part = &mut open.parts[i];
                match part.queue.poll(wait) {
                    None => {}
                    Some(Ok(m)) => {
                        let (p, o) = (part.id, m.offset());
                        if o < part.next {
                            continue; // a record seen before (a re-fetch after a reconnect)
                        }
                        if open.down_since.take().is_some() {
                            tracing::warn!(
                                "the Kafka broker {} answers again; reading on from partition \
                                 {p} offset {o}",
                                url.brokers
                            );
                        }
                        part.next = o + 1;
                        open.turn = (i + 1) % n;
                        return Ok(Some((p, o, m.payload().map(<[u8]>::to_vec))));
                    }
                    Some(Err(e)) => return Err(consume_error(url, part, e)),
                }
            }
            if follow {
                std::thread::sleep(Duration::from_millis(20));
            }
            // Nothing came: is the broker still there, and does it still have what is next?
            if probed.elapsed() >= PROBE_EVERY {
                probed = Instant::now();
                let part = &open.parts[first];
                match open.consumer.fetch_watermarks(
                    &url.topic,
                    part.id,
                    Duration::from_millis(800),
                ) {
                    Ok((low, high)) => {
                        if open.down_since.take().is_some() {
                            tracing::warn!(
                                "the Kafka broker {} answers again; reading on from partition \
                                 {} offset {}",
                                url.brokers,
                                part.id,
                                part.next
                            );
                            waiting_since = Instant::now();
                        }
                        if high < part.next || low > part.next {
                            return Err(Error::Kafka {
                                what: format!("{} partition {}", url.base(), part.id),
                                reason: format!(
                                    "the next offset to read, {}, is no longer on the broker, \
                                     which now keeps offsets {low}..{high} (was it restarted \
                                     without its data?)",
                                    part.next
                                ),
                            });
                        }
                        if !follow
                            && high > part.next
                            && waiting_since.elapsed() > timeout.max(PROBE_EVERY) * 2
                        {
                            return Err(Error::Kafka {
                                what: format!("{} partition {}", url.base(), part.id),
                                reason: format!(
                                    "no record came for {:.0} s although the broker has offsets up \
                                     to {high} (the next is {})",
                                    waiting_since.elapsed().as_secs_f64(),
                                    part.next
                                ),
                            });
                        }
                    }
                    Err(e) => {
                        tracing::debug!("kafka: probe of partition {}: {e}", part.id);
                        // Up, but without the topic (a broker restarted without its data)?
                        let md = open
                            .consumer
                            .fetch_metadata(Some(&url.topic), Duration::from_millis(800));
                        if let Ok(md) = md {
                            let has = md.topics().iter().any(|t| {
                                t.name() == url.topic
                                    && t.error().is_none()
                                    && t.partitions().iter().any(|p| p.id() == part.id)
                            });
                            if !has {
                                return Err(Error::Kafka {
                                    what: format!("{} partition {}", url.base(), part.id),
                                    reason: format!(
                                        "the broker no longer has this partition (was it \
                                         restarted without its data?); the next offset to read \
                                         was {}",
                                        part.next
                                    ),
                                });
                            }
                        }
                        let since = *open.down_since.get_or_insert_with(|| {
                            tracing::warn!(
                                "the Kafka broker {} does not answer; retrying for {} s \
                                 (--connect-timeout)",
                                url.brokers,
                                timeout.as_secs_f64()
                            );
                            Instant::now()
                        });
                        if since.elapsed() >= timeout {
                            return Err(Error::Kafka {
                                what: format!(
                                    "lost the Kafka broker {}: no answer for {} s \
                                     (--connect-timeout); the next record to read was partition \
                                     {} offset {}",
                                    url.brokers,
                                    timeout.as_secs_f64(),
                                    part.id,
                                    part.next
                                ),
                                reason: open
                                    .consumer
                                    .context()
                                    .last_error()
                                    .unwrap_or_else(|| e.to_string()),
                            });
                        }
                    }
                }
            }
        }
    }

    /// The next offset of every partition (after the last record read).
    fn positions(&self) -> Vec<(i32, i64)> {
        self.open
            .as_ref()
            .map(|o| o.parts.iter().map(|p| (p.id, p.next)).collect())
            .unwrap_or_default()
    }

    /// Decodes one record's value: `Ok(None)` for an empty batch.
    fn decode(
        &mut self,
        seq: u64,
        value: &[u8],
    ) -> std::result::Result<Option<RecordBatch>, (Option<u32>, u64, String)> {
        let format = match self.opts.format {
            Some(f) => f,
            None => match wire::detect(value, true) {
                Detected::Format(f) => f,
                _ => {
                    return Err((
                        None,
                        0,
                        "the record is in no known format (not spark-json, ndjson or arrow)".into(),
                    ))
                }
            },
        };
        self.report.set_format(format);
        if let Some(why) =
            format.refuses_side(self.opts.image_side, "publish them as ndjson or arrow")
        {
            return Err((None, 0, why));
        }
        match format {
            Format::SparkJson => {
                let text = value.trim_ascii_end();
                spark_json::decode_classes(text, &mut self.spark, self.opts.classes)
                    .map_err(|e| (e.row, e.offset as u64, e.reason))?;
                if self.spark.is_empty() {
                    return Ok(None);
                }
                let d = std::mem::take(&mut self.spark);
                make_batch_sized(seq, Some(d.rows), d.labels, d.pixels, SIDE)
                    .map(Some)
                    .map_err(|e| (None, 0, e.to_string()))
            }
            Format::Ndjson => {
                let mut decoder = match self.ndjson.take() {
                    Some(d) => d,
                    None => ndjson::LineDecoder::sized(self.opts.classes, self.opts.image_side)
                        .map_err(|e| (None, 0, e.to_string()))?,
                };
                let (mut labels, mut pixels) = (Vec::new(), Vec::new());
                let mut at = 0u64;
                let mut result = Ok(());
                for (row, line) in value
                    .split(|&b| b == b'\n')
                    .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
                    .enumerate()
                {
                    match decoder.decode_line(line, &mut pixels) {
                        Ok(l) => labels.push(l),
                        Err(reason) => {
                            result = Err((Some(row as u32), at, reason));
                            break;
                        }
                    }
                    at += line.len() as u64 + 1;
                }
                self.ndjson = Some(decoder);
                result?;
                if labels.is_empty() {
                    return Ok(None);
                }
                make_batch_sized(seq, None, labels, pixels, self.opts.image_side)
                    .map(Some)
                    .map_err(|e| (None, 0, e.to_string()))
            }
            Format::Arrow => {
                let mut ipc = ArrowSource::new(
                    Box::new(Cursor::new(value.to_vec())),
                    "record",
                    Report::default(),
                    self.opts.max_line_bytes,
                    self.opts.classes,
                    self.opts.image_side,
                );
                let mut batches = Vec::new();
                loop {
                    match ipc.next_batch() {
                        Ok(Some(b)) => batches.push(b),
                        Ok(None) => break,
                        Err(e) => return Err((None, 0, e.to_string())),
                    }
                }
                if let Some(r) = ipc.report.snapshot().rejections.first() {
                    return Err((r.row, 0, r.reason.clone()));
                }
                if batches.is_empty() {
                    return Ok(None);
                }
                let all = arrow::compute::concat_batches(
                    &stream_schema_sized(self.opts.image_side),
                    &batches,
                )
                .map_err(|e| (None, 0, e.to_string()))?;
                restamp(&all, seq, self.opts.classes, self.opts.image_side)
                    .map(Some)
                    .map_err(|(row, reason)| (row, 0, reason))
            }
        }
    }
}

/// A consume error on a partition queue, as the error that ends the stream.
fn consume_error(url: &KafkaUrl, part: &Part, e: KafkaError) -> Error {
    let what = format!("{} partition {}", url.base(), part.id);
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::OffsetOutOfRange) => Error::Kafka {
            what,
            reason: format!(
                "the next offset to read, {}, is no longer on the broker (records deleted, or \
                 the broker restarted without its data)",
                part.next
            ),
        },
        _ => kafka::error(format!("{what}, reading offset {}", part.next), e),
    }
}

/// Appends the `partition` and `offset` columns.
fn with_position(batch: RecordBatch, partition: i32, offset: i64) -> Result<RecordBatch> {
    let n = batch.num_rows();
    let side = batch
        .schema()
        .field_with_name("image")
        .ok()
        .and_then(|f| match f.data_type() {
            DataType::FixedSizeList(_, len) => crate::transforms::pixels::side(*len as usize),
            _ => None,
        })
        .unwrap_or(SIDE);
    let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
    columns.push(Arc::new(Int32Array::from(vec![partition; n])));
    columns.push(Arc::new(Int64Array::from(vec![offset; n])));
    Ok(RecordBatch::try_new(schema_sized(side), columns)?)
}

impl BatchSource for KafkaSource {
    fn next_batch(&mut self) -> Result<Option<RecordBatch>> {
        if self.open.is_none() {
            self.open = Some(self.connect()?);
        }
        loop {
            let Some((partition, offset, value)) = self.next_record()? else {
                return Ok(None);
            };
            let seq = self.next_batch;
            self.next_batch += 1;
            let reject = |report: &Report, row, at: u64, reason: String| {
                report.reject(Rejection {
                    batch: seq,
                    row,
                    offset: offset as u64,
                    partition: Some(partition),
                    reason: if at > 0 {
                        format!("at byte {at} of the record: {reason}")
                    } else {
                        reason
                    },
                })
            };
            let Some(value) = value else {
                reject(&self.report, None, 0, "the record has no value".into());
                continue;
            };
            self.report.add_bytes(value.len() as u64);
            if value.len() > self.opts.max_line_bytes {
                reject(
                    &self.report,
                    None,
                    0,
                    format!(
                        "record of {} bytes is longer than the cap of {} bytes (--max-line-bytes)",
                        value.len(),
                        self.opts.max_line_bytes
                    ),
                );
                continue;
            }
            match self.decode(seq, &value) {
                Ok(None) => self.report.empty(),
                Ok(Some(batch)) => {
                    let out = with_position(batch, partition, offset)?;
                    self.report.accept(out.num_rows());
                    self.report.record_position(seq, self.positions());
                    return Ok(Some(out));
                }
                Err((row, at, reason)) => reject(&self.report, row, at, reason),
            }
        }
    }

    fn report(&self) -> Report {
        self.report.clone()
    }

    fn schema(&self) -> SchemaRef {
        schema_sized(self.opts.image_side)
    }

    fn image_side(&self) -> usize {
        self.opts.image_side
    }
}
