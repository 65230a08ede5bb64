//! The Kafka sink: a stream's batches, or a dataset served as the stream server serves it,
//! published to a topic, one record per batch ([`crate::wire::kafka`] has the record's
//! layout).

use std::time::{Duration, Instant};

use datafusion::arrow::record_batch::RecordBatch;
use datafusion::prelude::SessionContext;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;

use super::{drive, ExportSummary};
use crate::error::{Error, Result};
use crate::wire::kafka::{
    client_config, create_topic, describe, encode_record, error, topic_partitions, Context,
    KafkaUrl,
};
use crate::wire::Format;

/// What a [`Publisher`] sent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublishSummary {
    /// Records (batches) delivered.
    pub batches: u64,
    /// Images in them.
    pub images: u64,
    /// Bytes of record values.
    pub bytes: u64,
}

/// The Kafka sink: one record per batch, acknowledged by the broker (`acks=all`) before
/// [`Publisher::finish`] returns. Delivery is at-least-once: librdkafka retries a send
/// whose acknowledgement was lost, so a record can be stored twice (the reader sees the
/// same key twice); the idempotent producer that prevents this is not used, because not
/// every Kafka-protocol broker supports it.
pub struct Publisher {
    producer: BaseProducer<Context>,
    url: KafkaUrl,
    partitions: Vec<i32>,
    format: Format,
    timeout: Duration,
    buf: Vec<u8>,
    summary: PublishSummary,
}

impl Publisher {
    /// Connects (retrying until `timeout`) and finds the topic's partitions; a topic that
    /// does not exist is created with one partition per entry of `?partitions=` (or one).
    pub fn connect(url: &KafkaUrl, format: Format, timeout: Duration) -> Result<Publisher> {
        let mut config = client_config(url, 1_000_000_000);
        // One record per produce request, one request in flight: Tansu 0.6 gives a request
        // of several records a single offset (the rest are lost to readers), and without the
        // idempotent producer (Tansu's loses records too) only one request in flight keeps
        // the topic in publishing order when librdkafka retries. Records are whole batches
        // (60 KB to megabytes), so this costs little.
        config
            .set("acks", "all")
            .set("linger.ms", "2")
            .set("batch.num.messages", "1")
            .set("max.in.flight.requests.per.connection", "1")
            .set("queue.buffering.max.kbytes", "262144")
            .set(
                "message.timeout.ms",
                (timeout.as_millis().max(1000))
                    .min(i32::MAX as u128)
                    .to_string(),
            );
        let producer: BaseProducer<Context> = config
            .create_with_context(Context::default())
            .map_err(|e| error(format!("create a Kafka producer for {}", url.base()), e))?;
        let have = topic_partitions(producer.client(), producer.context(), url, timeout)?;
        let have = match have {
            Some(ps) => ps,
            None => {
                let n = url
                    .partitions
                    .as_ref()
                    .map_or(1, |ps| ps.iter().max().map_or(1, |m| m + 1));
                create_topic(url, n, timeout)?;
                tracing::info!("created topic {} with {n} partition(s)", url.base());
                (0..n).collect()
            }
        };
        let partitions = url.choose(&have)?;
        Ok(Publisher {
            producer,
            url: url.clone(),
            partitions,
            format,
            timeout,
            buf: Vec::new(),
            summary: PublishSummary::default(),
        })
    }

    /// The partitions records go to, in turn.
    pub fn partitions(&self) -> &[i32] {
        &self.partitions
    }

    /// Queues batch `seq` (waiting while librdkafka's queue is full).
    pub fn send(&mut self, seq: u64, labels: &[u16], pixels: &[u8]) -> Result<()> {
        self.check()?;
        encode_record(self.format, seq, labels, pixels, &mut self.buf)?;
        let key = seq.to_string();
        let partition = self.partitions[(seq % self.partitions.len() as u64) as usize];
        let deadline = Instant::now() + self.timeout.max(Duration::from_secs(1));
        let mut record = BaseRecord::to(&self.url.topic)
            .key(&key)
            .payload(&self.buf)
            .partition(partition);
        loop {
            match self.producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    self.producer.poll(Duration::from_millis(50));
                    self.check()?;
                    if Instant::now() >= deadline {
                        return Err(self.stalled(seq));
                    }
                }
                Err((e, _)) => {
                    return Err(error(
                        format!("{}: publish batch {seq}", self.url.base()),
                        e,
                    ))
                }
            }
        }
        self.producer.poll(Duration::ZERO);
        self.summary.batches += 1;
        self.summary.images += labels.len() as u64;
        self.summary.bytes += self.buf.len() as u64;
        Ok(())
    }

    fn stalled(&self, seq: u64) -> Error {
        Error::Kafka {
            what: format!(
                "{}: batch {seq} could not be queued for {} s (--connect-timeout): the broker \
                 takes nothing",
                self.url.base(),
                self.timeout.as_secs_f64()
            ),
            reason: self
                .producer
                .context()
                .last_error()
                .unwrap_or_else(|| "no answer".into()),
        }
    }

    fn check(&self) -> Result<()> {
        match self.producer.context().failure() {
            None => Ok(()),
            Some((key, reason)) => Err(Error::Kafka {
                what: format!("{}: batch {key} was not delivered", self.url.base()),
                reason,
            }),
        }
    }

    /// Waits until every queued record is acknowledged (at most the timeout, plus a minute
    /// for what is in flight), then says what was sent.
    pub fn finish(self) -> Result<PublishSummary> {
        let wait = self.timeout.max(Duration::from_secs(1)) + Duration::from_secs(60);
        self.producer.flush(wait).map_err(|e| Error::Kafka {
            what: format!(
                "{}: {} records not acknowledged within {} s",
                self.url.base(),
                self.producer.in_flight_count(),
                wait.as_secs()
            ),
            reason: self
                .producer
                .context()
                .last_error()
                .unwrap_or_else(|| e.to_string()),
        })?;
        self.check()?;
        Ok(self.summary)
    }
}

/// `cifar-df stream --to kafka://...`: the split's images, batched as the stream server
/// batches them (`--batch-size`, `--endless`, `--sleep`, `--limit`), published one record
/// per batch.
pub fn publish_dataset(
    url: &KafkaUrl,
    opts: &crate::serve::ServeOptions,
    timeout: Duration,
) -> Result<PublishSummary> {
    if opts.batch_size == 0 {
        return Err(Error::usage("--batch-size must be at least 1"));
    }
    opts.format.check_side(opts.image_side)?;
    let side = crate::dataset::check_side(opts.image_side)?;
    let files = crate::dataset::load_split_sized(&opts.data, opts.split, side)?.0;
    let mut publisher = Publisher::connect(url, opts.format, timeout)?;
    tracing::info!(
        "publishing to {} ({}), {}",
        url.base(),
        describe(publisher.partitions()),
        opts.format
    );
    let progress = crate::progress::spinner(opts.progress, crate::progress::BATCHES);
    let started = Instant::now();
    let nonempty = files.iter().any(|f| !f.is_empty());
    let mut seq = 0u64;
    'epochs: for epoch in 0u64.. {
        let mut batcher = crate::dataset::Batcher::new(opts.batch_size);
        while let Some(images) = batcher.next(&files) {
            if opts.limit.is_some_and(|l| seq >= l) {
                break 'epochs;
            }
            publisher.send(seq, &images.labels, &images.pixels)?;
            seq += 1;
            let s = &publisher.summary;
            progress.set_position(s.batches);
            progress.set_message(format!(
                "epoch {} · {} images · {:.0} images/s",
                epoch + 1,
                s.images,
                s.images as f64 / started.elapsed().as_secs_f64().max(1e-9)
            ));
            if !opts.sleep.is_zero() {
                std::thread::sleep(opts.sleep);
            }
        }
        if !opts.endless || !nonempty {
            break;
        }
    }
    progress.finish_and_clear();
    publisher.finish()
}

/// Publish every batch of the `stream` table in `ctx` to Kafka, one record per batch with
/// the batch's own number as its key; returns when the broker has acknowledged them all.
pub async fn publish(
    ctx: &SessionContext,
    publisher: &mut Publisher,
    on_batch: impl FnMut(&RecordBatch),
) -> Result<ExportSummary> {
    let df = ctx
        .sql("SELECT batch, \"row\", label, image FROM stream")
        .await?;
    drive(
        df,
        &mut |b| {
            let (seq, labels, pixels) = images_of(b)?;
            publisher.send(seq, &labels, pixels)
        },
        on_batch,
    )
    .await
}

/// The batch number, labels and pixels of a stream batch.
/// A stream batch's number, labels and pixels.
type BatchImages<'a> = (u64, std::borrow::Cow<'a, [u16]>, &'a [u8]);

fn images_of(batch: &RecordBatch) -> Result<BatchImages<'_>> {
    use datafusion::arrow::array::{Array, FixedSizeListArray, UInt8Array};
    let seq = crate::wire::batch::batch_number(batch).unwrap_or(0);
    let labels = batch
        .column_by_name("label")
        .ok_or_else(|| Error::usage("the stream has no `label` column"))?;
    let labels = crate::wire::batch::label_values(labels.as_ref())
        .map_err(|e| Error::usage(format!("the stream's {e}")))?;
    let images = batch
        .column_by_name("image")
        .and_then(|c| c.as_any().downcast_ref::<FixedSizeListArray>())
        .ok_or_else(|| Error::usage("the stream has no `image` column"))?;
    let pixels = images
        .values()
        .as_any()
        .downcast_ref::<UInt8Array>()
        .ok_or_else(|| Error::usage("the stream's images are not UInt8"))?;
    let per = images.value_length() as usize;
    let start = images.offset() * per;
    let n = labels.len() * per;
    let pixels = pixels
        .values()
        .get(start..start + n)
        .ok_or_else(|| Error::usage("the stream's image column is shorter than its labels"))?;
    Ok((seq, labels, pixels))
}
