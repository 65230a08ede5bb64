//! Sources: where batches of images come from, as Arrow `RecordBatch`es.
//!
//! One notion of a source, named by a string (`--source`):
//! - `tcp://HOST:PORT`: connect to a stream server as a client (retrying until a timeout,
//!   since the server may start later); the stream ends when the server closes.
//! - `file:PATH`: a captured stream, one batch a line (`file:-` reads standard input).
//! - a data folder or `synthetic[:TRAIN[:TEST[:SEED]]]`: read directly, in process, batched
//!   exactly as the stream server would batch it.
//! - `kafka://HOST:PORT/TOPIC[?partitions=..&start=..]`: a Kafka topic, one batch a record
//!   ([`kafka`]).
//!
//! A network or file source reads lines with a hard cap on their length, so an oversized
//! line is rejected without being buffered whole. A malformed line is **rejected, counted and
//! reported** (batch, row, byte offset, reason) in the source's [`Report`] and the source goes
//! on with the next line; a connection dropped mid-line loses only that line. Every batch
//! that is accepted has the schema of [`crate::wire::batch::stream_schema`], with `batch` the
//! sequence number of the line on the wire, so gaps show where batches were rejected.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::record_batch::RecordBatch;

use crate::dataset::{self, Batcher, DataSpec, Images, Split};
use crate::error::{Error, Result};
use crate::wire::batch::make_batch_sized;
use crate::wire::Format;

pub mod features;
pub mod kafka;
pub mod reader;
pub mod table;

use reader::{connect, from_reader};

/// Default cap on the length of one line: 64 MiB.
pub const DEFAULT_MAX_LINE_BYTES: usize = 64 << 20;

/// Where batches come from.
#[derive(Clone, Debug, PartialEq)]
pub enum SourceSpec {
    /// Connect to a stream server.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// A captured stream in a file (`-`: standard input).
    File(PathBuf),
    /// A dataset read in process.
    Data(DataSpec),
    /// A feature cache written by `cifar-df features` (`features:DIR`).
    Features(PathBuf),
    /// A Kafka topic.
    Kafka(crate::wire::kafka::KafkaUrl),
}

impl SourceSpec {
    /// Parse `tcp://HOST:PORT`, `file:PATH`, or a data folder / `synthetic`.
    pub fn parse(s: &str) -> Result<SourceSpec> {
        if let Some(rest) = s.strip_prefix("tcp://") {
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| Error::usage(format!("source {s:?}: expected tcp://HOST:PORT")))?;
            let port = port.trim_end_matches('/').parse::<u16>().map_err(|_| {
                Error::usage(format!(
                    "source {s:?}: port {port:?} is not a number 0..65535"
                ))
            })?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() {
                return Err(Error::usage(format!("source {s:?}: empty host")));
            }
            return Ok(SourceSpec::Tcp {
                host: host.to_string(),
                port,
            });
        }
        if let Some(path) = s.strip_prefix("file:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(Error::usage(format!("source {s:?}: empty path")));
            }
            return Ok(SourceSpec::File(PathBuf::from(path)));
        }
        if s.starts_with("kafka://") {
            return Ok(SourceSpec::Kafka(crate::wire::kafka::KafkaUrl::parse(s)?));
        }
        if let Some(path) = s.strip_prefix("features:") {
            if path.is_empty() {
                return Err(Error::usage(format!("source {s:?}: empty path")));
            }
            return Ok(SourceSpec::Features(PathBuf::from(path)));
        }
        if s.is_empty() {
            return Err(Error::usage("empty source"));
        }
        Ok(SourceSpec::Data(DataSpec::parse(s)?))
    }

    /// Whether the source has an end known in advance (a file or dataset), as opposed to a
    /// live connection.
    pub fn is_bounded(&self) -> bool {
        !matches!(self, SourceSpec::Tcp { .. } | SourceSpec::Kafka(_))
    }
}

impl fmt::Display for SourceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceSpec::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp://[{host}]:{port}")
            }
            SourceSpec::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
            SourceSpec::File(p) => write!(f, "file:{}", p.display()),
            SourceSpec::Data(d) => write!(f, "{d}"),
            SourceSpec::Features(p) => write!(f, "features:{}", p.display()),
            SourceSpec::Kafka(u) => write!(f, "{u}"),
        }
    }
}

/// How a source reads.
#[derive(Clone, Debug)]
pub struct SourceOptions {
    /// The wire format; `None` detects it from the first bytes.
    pub format: Option<Format>,
    /// Which split a dataset source reads.
    pub split: Split,
    /// Images per batch for a dataset source; the most lines in one `ndjson` batch.
    pub batch_size: usize,
    /// Passes over a dataset source (`None`: endless).
    pub epochs: Option<u64>,
    /// Longest accepted line in bytes.
    pub max_line_bytes: usize,
    /// How long a `tcp://` source keeps trying to connect.
    pub connect_timeout: Duration,
    /// Stream batches numbered below this are passed over, not delivered (a resumed run
    /// skips what it has already learnt). Batches keep their numbers. A dataset source
    /// and spark-json lines skip without decoding.
    pub skip: u64,
    /// A Kafka source keeps reading as records arrive, instead of stopping at the end
    /// offsets it saw when it started.
    pub follow: bool,
    /// A resumed run's Kafka offsets (partition, next offset) from its checkpoint: the
    /// source seeks there and numbers its batches on from `skip`.
    pub kafka_offsets: Option<Vec<(i32, i64)>>,
    /// Pause this long after each delivered batch (a slow stream, for demonstrations and
    /// tests; a dataset served over loopback is paced by its server instead).
    pub pace: Duration,
    /// A dataset served by the trainer itself (`--data`): each epoch in a new order,
    /// shuffled from the run's seed and the epoch.
    pub shuffle: bool,
    /// The run's number of classes K: a row whose label is not below K is rejected
    /// (CIFAR-10's 10 by default).
    pub classes: usize,
    /// The side of the stream's images in pixels (`--image-size`; CIFAR's 32 by default).
    /// A dataset source resizes its images to it; a wire source rejects an image of
    /// another size.
    pub image_side: usize,
}

impl SourceOptions {
    /// Sets the side of the stream's images. A side other than CIFAR's also raises the line
    /// cap to what a batch of `batch_size` such images needs (as ndjson text or one Arrow
    /// message), so that a legitimate batch is not refused as too long.
    pub fn set_image_side(&mut self, side: usize) {
        self.image_side = side;
        if side != dataset::SIDE {
            let line = dataset::image_bytes(side)
                .saturating_mul(5)
                .saturating_add(64);
            let need = self
                .batch_size
                .max(1)
                .saturating_mul(line)
                .saturating_add(1 << 20);
            self.max_line_bytes = self.max_line_bytes.max(need);
        }
    }
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            format: None,
            split: Split::Train,
            classes: crate::model::CLASSES,
            image_side: crate::dataset::SIDE,
            batch_size: 100,
            epochs: Some(1),
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            connect_timeout: Duration::from_secs(30),
            skip: 0,
            follow: false,
            kafka_offsets: None,
            pace: Duration::ZERO,
            shuffle: false,
        }
    }
}

/// One rejected line (or row of an `ndjson` batch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// Sequence number of the batch the line belonged to.
    pub batch: u64,
    /// Row within the batch, where the problem is in one row.
    pub row: Option<u32>,
    /// Byte offset in the stream where the problem is; for a Kafka record, its offset.
    pub offset: u64,
    /// The Kafka partition the record came from.
    pub partition: Option<i32>,
    /// Why.
    pub reason: String,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rejected batch {}", self.batch)?;
        if let Some(row) = self.row {
            write!(f, ", row {row}")?;
        }
        match self.partition {
            Some(p) => write!(
                f,
                " (partition {p}, offset {}): {}",
                self.offset, self.reason
            ),
            None => write!(f, " (stream byte {}): {}", self.offset, self.reason),
        }
    }
}

/// Counts of what a source accepted and rejected, shared with whoever reads the source.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReportSnapshot {
    /// Batches accepted.
    pub batches: u64,
    /// Images accepted.
    pub images: u64,
    /// Bytes read from the wire.
    pub bytes: u64,
    /// Lines (or rows) rejected.
    pub rejected: u64,
    /// Empty batches (`{}` lines) passed over, as the original skipped empty RDDs.
    pub empty: u64,
    /// The first rejections (at most [`Report::KEEP`]).
    pub rejections: Vec<Rejection>,
    /// The wire format read, once known.
    pub format: Option<Format>,
}

/// Where a source stands: for a Kafka source, (partition, next offset) of each partition.
pub type Position = Vec<(i32, i64)>;

/// A source's running report; cheap to clone and read from another thread.
#[derive(Clone, Debug, Default)]
pub struct Report {
    counts: Arc<Mutex<ReportSnapshot>>,
    /// For the latest delivered batches: the source's position after each (a Kafka
    /// source: the next offset of every partition).
    positions: Arc<Mutex<std::collections::VecDeque<(u64, Position)>>>,
}

impl Report {
    /// How many rejections are kept in full.
    pub const KEEP: usize = 1000;
    /// How many rejections are printed one by one (then a tally at each power of ten).
    pub const WARN: u64 = 20;
    /// How many delivered batches' positions are kept (far more than can be read ahead).
    const POSITIONS: usize = 256;

    fn with<T>(&self, f: impl FnOnce(&mut ReportSnapshot) -> T) -> T {
        let mut guard = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    fn record_position(&self, batch: u64, position: Position) {
        let mut p = self.positions.lock().unwrap_or_else(|e| e.into_inner());
        if p.len() == Self::POSITIONS {
            p.pop_front();
        }
        p.push_back((batch, position));
    }

    /// Where the source stood right after it delivered `batch` (a Kafka source: the next
    /// offset of each partition), if it keeps positions and still knows that batch.
    pub fn position_after(&self, batch: u64) -> Option<Position> {
        let p = self.positions.lock().unwrap_or_else(|e| e.into_inner());
        p.iter()
            .rev()
            .find(|(b, _)| *b == batch)
            .map(|(_, pos)| pos.clone())
    }

    /// A copy of the counts so far.
    pub fn snapshot(&self) -> ReportSnapshot {
        self.with(|r| r.clone())
    }

    fn accept(&self, images: usize) {
        self.with(|r| {
            r.batches += 1;
            r.images += images as u64;
        });
    }

    fn empty(&self) {
        self.with(|r| r.empty += 1);
    }

    fn add_bytes(&self, n: u64) {
        self.with(|r| r.bytes += n);
    }

    fn set_format(&self, f: Format) {
        self.with(|r| r.format = Some(f));
    }

    /// Counts `n` rejections already reported elsewhere (an image folder's bad files).
    pub fn count_rejected(&self, n: u64) {
        if let Ok(mut r) = self.counts.lock() {
            r.rejected += n;
        }
    }

    fn reject(&self, rejection: Rejection) {
        let n = self.with(|r| {
            r.rejected += 1;
            if r.rejections.len() < Self::KEEP {
                r.rejections.push(rejection.clone());
            }
            r.rejected
        });
        if n <= Self::WARN {
            tracing::warn!("{rejection}");
            if n == Self::WARN {
                tracing::warn!(
                    "further rejections are counted, not each printed (a tally at every \
                     power of ten; the first {} are kept in the report)",
                    Self::KEEP
                );
            }
        } else if is_power_of_ten(n) {
            tracing::warn!("{n} lines rejected so far; the latest: {rejection}");
        }
    }
}

fn is_power_of_ten(mut n: u64) -> bool {
    while n >= 10 && n.is_multiple_of(10) {
        n /= 10;
    }
    n == 1
}

/// Anything that yields stream batches.
pub trait BatchSource: Send {
    /// The next accepted batch; `Ok(None)` at the end of the stream. An `Err` ends the
    /// stream; batches returned before it stay valid.
    fn next_batch(&mut self) -> Result<Option<RecordBatch>>;
    /// What has been accepted and rejected so far.
    fn report(&self) -> Report;
    /// Batches in one pass over the data, where the source knows it (a dataset source).
    fn batches_per_epoch(&self) -> Option<u64> {
        None
    }
    /// The schema of its batches: [`crate::wire::batch::stream_schema_sized`] for image
    /// sources.
    fn schema(&self) -> arrow::datatypes::SchemaRef {
        crate::wire::batch::stream_schema_sized(self.image_side())
    }
    /// The side of its images (CIFAR's 32 unless the options said otherwise).
    fn image_side(&self) -> usize {
        crate::dataset::SIDE
    }
}

/// Open a source. Network sources connect lazily, on the first [`BatchSource::next_batch`].
pub fn open(spec: &SourceSpec, opts: &SourceOptions) -> Result<Box<dyn BatchSource>> {
    if opts.batch_size == 0 {
        return Err(Error::usage("batch size must be at least 1"));
    }
    if opts.max_line_bytes == 0 {
        return Err(Error::usage("the line cap must be at least 1 byte"));
    }
    let source: Box<dyn BatchSource> = match spec {
        SourceSpec::Data(data) => Box::new(DataSource::new(data, opts)?),
        SourceSpec::Features(dir) => Box::new(features::FeatureSource::open(dir, opts)?),
        SourceSpec::Kafka(url) => Box::new(kafka::KafkaSource::new(url.clone(), opts)),
        _ => Box::new(Lazy {
            spec: spec.clone(),
            opts: opts.clone(),
            inner: None,
            report: Report::default(),
        }),
    };
    Ok(if opts.skip > 0 || !opts.pace.is_zero() {
        Box::new(Paced {
            inner: source,
            skip: opts.skip,
            pace: opts.pace,
            started: false,
        })
    } else {
        source
    })
}

/// Drops the batches numbered below `skip` (for the formats that cannot skip unread) and
/// pauses `pace` between the batches it delivers.
struct Paced {
    inner: Box<dyn BatchSource>,
    skip: u64,
    pace: Duration,
    started: bool,
}

impl BatchSource for Paced {
    fn next_batch(&mut self) -> Result<Option<RecordBatch>> {
        if !self.pace.is_zero() && std::mem::replace(&mut self.started, true) {
            std::thread::sleep(self.pace);
        }
        loop {
            match self.inner.next_batch()? {
                Some(b) if crate::wire::batch::batch_number(&b).is_some_and(|n| n < self.skip) => {}
                other => return Ok(other),
            }
        }
    }

    fn report(&self) -> Report {
        self.inner.report()
    }

    fn batches_per_epoch(&self) -> Option<u64> {
        self.inner.batches_per_epoch()
    }

    fn schema(&self) -> arrow::datatypes::SchemaRef {
        self.inner.schema()
    }

    fn image_side(&self) -> usize {
        self.inner.image_side()
    }
}

/// A source that connects (or opens its file) on first use.
struct Lazy {
    spec: SourceSpec,
    opts: SourceOptions,
    inner: Option<Box<dyn BatchSource>>,
    report: Report,
}

impl BatchSource for Lazy {
    fn next_batch(&mut self) -> Result<Option<RecordBatch>> {
        if self.inner.is_none() {
            let reader: Box<dyn Read + Send> = match &self.spec {
                SourceSpec::Tcp { host, port } => {
                    Box::new(connect(host, *port, self.opts.connect_timeout)?)
                }
                SourceSpec::File(p) if p.as_os_str() == "-" => Box::new(io::stdin()),
                SourceSpec::File(p) => Box::new(File::open(p).map_err(|e| Error::io(p, e))?),
                SourceSpec::Data(_) | SourceSpec::Features(_) | SourceSpec::Kafka(_) => {
                    unreachable!("dataset, feature and Kafka sources open themselves")
                }
            };
            let name = self.spec.to_string();
            self.inner = Some(from_reader(reader, &name, &self.opts, self.report.clone())?);
        }
        match &mut self.inner {
            Some(inner) => inner.next_batch(),
            None => Ok(None),
        }
    }

    fn report(&self) -> Report {
        self.report.clone()
    }

    fn image_side(&self) -> usize {
        self.opts.image_side
    }
}

/// Runs `f`, turning a panic into `Err(its message)`. A reader of hostile bytes must not
/// take the process (or, in a worker thread, silently the rest of the stream) with it:
/// some third-party decoders panic on corrupt input instead of returning an error.
pub fn catch_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        p.downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_string())
    })
}

/// A dataset read in process.
struct DataSource {
    files: Vec<Images>,
    batcher: Batcher,
    batch_size: usize,
    epochs: Option<u64>,
    epoch: u64,
    next_batch: u64,
    skip: u64,
    report: Report,
    side: usize,
}

impl DataSource {
    fn new(data: &DataSpec, opts: &SourceOptions) -> Result<Self> {
        let side = dataset::check_side(opts.image_side)?;
        let (files, rejected) = dataset::load_split_sized(data, opts.split, side)?;
        let report = Report::default();
        // An image folder's unreadable files, each named in the log when it was read.
        report.count_rejected(rejected as u64);
        Ok(DataSource {
            files,
            batcher: Batcher::new(opts.batch_size),
            batch_size: opts.batch_size,
            epochs: opts.epochs,
            epoch: 0,
            next_batch: 0,
            skip: opts.skip,
            report,
            side,
        })
    }
}

impl BatchSource for DataSource {
    fn image_side(&self) -> usize {
        self.side
    }

    fn batches_per_epoch(&self) -> Option<u64> {
        let images: usize = self.files.iter().map(Images::len).sum();
        Some(images.div_ceil(self.batch_size) as u64)
    }

    fn next_batch(&mut self) -> Result<Option<RecordBatch>> {
        loop {
            if self.epochs.is_some_and(|e| self.epoch >= e) {
                return Ok(None);
            }
            match self.batcher.next(&self.files) {
                Some(images) => {
                    let seq = self.next_batch;
                    self.next_batch += 1;
                    if seq < self.skip {
                        continue;
                    }
                    let n = images.len();
                    let out = make_batch_sized(seq, None, images.labels, images.pixels, self.side)?;
                    self.report.accept(n);
                    return Ok(Some(out));
                }
                None => {
                    self.epoch += 1;
                    self.batcher = Batcher::new(self.batch_size);
                    if self.files.iter().all(Images::is_empty) {
                        return Ok(None);
                    }
                }
            }
        }
    }

    fn report(&self) -> Report {
        self.report.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::reader::*;
    use super::*;
    use crate::dataset::IMAGE_BYTES;

    /// A valid Arrow IPC stream of `batches` batches of 3 images each.
    fn ipc_stream(batches: u64) -> Vec<u8> {
        let mut w = arrow::ipc::writer::StreamWriter::try_new(
            Vec::new(),
            &crate::wire::batch::stream_schema(),
        )
        .unwrap();
        for b in 0..batches {
            let labels: Vec<u16> = (0..3).map(|i| ((b + i) % 10) as u16).collect();
            let pixels: Vec<u8> = (0..3 * IMAGE_BYTES).map(|i| (i % 251) as u8).collect();
            w.write(&crate::wire::batch::make_batch(b, None, labels, pixels).unwrap())
                .unwrap();
        }
        w.finish().unwrap();
        w.into_inner().unwrap()
    }

    /// Reads an IPC stream to its end: (images accepted, the error it ended with).
    fn read_ipc(bytes: Vec<u8>) -> (usize, Option<Error>) {
        let mut src = ArrowSource::new(
            Box::new(io::Cursor::new(bytes)),
            "mutated",
            Report::default(),
            DEFAULT_MAX_LINE_BYTES,
            crate::model::CLASSES,
            crate::dataset::SIDE,
        );
        let mut rows = 0;
        for _ in 0..1000 {
            match src.next_batch() {
                Ok(Some(b)) => rows += b.num_rows(),
                Ok(None) => return (rows, None),
                Err(e) => return (rows, Some(e)),
            }
        }
        panic!("the reader did not end");
    }

    #[test]
    fn huge_arrow_ipc_lengths_are_errors_before_any_allocation() {
        // A message claiming 2 GiB of metadata, after a valid one.
        let mut b = ipc_stream(1);
        b.truncate(b.len() - 8); // drop the end-of-stream marker
        b.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
        let (rows, err) = read_ipc(b);
        let e = err.unwrap().to_string();
        assert_eq!(rows, 3);
        assert!(
            e.contains("metadata length 2147483647") && e.contains("limit"),
            "{e}"
        );
        // A negative one.
        let mut b = ipc_stream(0);
        b.truncate(b.len() - 8);
        b.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x80]);
        let e = read_ipc(b).1.unwrap().to_string();
        assert!(e.contains("negative"), "{e}");
    }

    #[test]
    fn mutated_arrow_ipc_streams_are_errors_never_panics() {
        // A seeded mutator (bit flips, overwritten bytes, huge lengths, truncation,
        // deleted and duplicated spans); the decoder panics on some of these, which must
        // come back as an error naming the batch, with the batches before it accepted.
        let good = ipc_stream(4);
        let (rows, err) = read_ipc(good.clone());
        assert!(rows == 12 && err.is_none(), "{rows} {err:?}");
        let mut rng = crate::rng::SplitMix(42);
        let (mut errors, mut panics) = (0, 0);
        for case in 0..400 {
            let mut b = good.clone();
            match case % 6 {
                0 => {
                    let i = rng.below(b.len());
                    b[i] ^= 1 << rng.below(8);
                }
                1 => {
                    for _ in 0..4 {
                        let i = rng.below(b.len());
                        b[i] = rng.below(256) as u8;
                    }
                }
                2 => {
                    // A huge little-endian number over 8 bytes (lengths, offsets).
                    let i = rng.below(b.len() - 8);
                    b[i..i + 8].copy_from_slice(&(u64::MAX - rng.below(1000) as u64).to_le_bytes());
                }
                3 => b.truncate(rng.below(b.len())),
                4 => {
                    let i = rng.below(b.len());
                    let j = (i + 1 + rng.below(64)).min(b.len());
                    b.drain(i..j);
                }
                _ => {
                    let i = rng.below(b.len());
                    let j = (i + 1 + rng.below(64)).min(b.len());
                    let span = b[i..j].to_vec();
                    b.splice(i..i, span);
                }
            }
            let (rows, err) = read_ipc(b);
            assert!(rows <= 12 && rows % 3 == 0, "case {case}: {rows} rows");
            if let Some(e) = err {
                errors += 1;
                let msg = e.to_string();
                assert!(
                    msg.starts_with("batch ") && msg.contains("mutated"),
                    "{msg}"
                );
                panics += usize::from(msg.contains("the decoder failed"));
            }
        }
        println!("400 mutated IPC streams: {errors} errors, {panics} of them decoder panics");
        assert!(errors > 100, "{errors}");
    }

    #[test]
    fn parses_source_specs() {
        assert_eq!(
            SourceSpec::parse("tcp://127.0.0.1:6100").unwrap(),
            SourceSpec::Tcp {
                host: "127.0.0.1".into(),
                port: 6100
            }
        );
        assert_eq!(
            SourceSpec::parse("tcp://[::1]:7").unwrap(),
            SourceSpec::Tcp {
                host: "::1".into(),
                port: 7
            }
        );
        assert_eq!(
            SourceSpec::parse("file:/tmp/x.jsonl").unwrap(),
            SourceSpec::File("/tmp/x.jsonl".into())
        );
        assert!(matches!(
            SourceSpec::parse("synthetic").unwrap(),
            SourceSpec::Data(DataSpec::Synthetic(_))
        ));
        assert!(matches!(
            SourceSpec::parse("data/cifar").unwrap(),
            SourceSpec::Data(DataSpec::Folder(_))
        ));
        for bad in ["tcp://host", "tcp://host:99999", "tcp://:80", "file:", ""] {
            assert!(SourceSpec::parse(bad).is_err(), "{bad} should be rejected");
        }
        assert_eq!(
            SourceSpec::parse("tcp://[::1]:7").unwrap().to_string(),
            "tcp://[::1]:7"
        );
    }

    fn lines_of(data: &[u8], max: usize, chunk: usize) -> Vec<(u64, String)> {
        struct Chunked<'a>(&'a [u8], usize);
        impl Read for Chunked<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = self.0.len().min(buf.len()).min(self.1);
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut r = LineReader::new(Chunked(data, chunk), max);
        let mut out = Vec::new();
        while let Some((off, line)) = r.next_line().unwrap() {
            out.push((
                off,
                match line {
                    Line::Text(t) => String::from_utf8_lossy(t).into_owned(),
                    Line::TooLong(n) => format!("<too long {n}>"),
                    Line::Unterminated(t) => {
                        format!("<unterminated {}>", String::from_utf8_lossy(t))
                    }
                },
            ));
        }
        out
    }

    #[test]
    fn line_reader_splits_caps_and_truncates() {
        for chunk in [1, 3, 1000] {
            assert_eq!(
                lines_of(b"ab\n\ncde\nxyz", 100, chunk),
                vec![
                    (0, "ab".into()),
                    (3, "".into()),
                    (4, "cde".into()),
                    (8, "<unterminated xyz>".into())
                ]
            );
        }
        let mut data = b"ok\n".to_vec();
        data.extend(std::iter::repeat_n(b'x', 5000));
        data.extend(b"\nafter\n");
        assert_eq!(
            lines_of(&data, 100, 7),
            vec![
                (0, "ok".into()),
                (3, "<too long 5000>".into()),
                (5004, "after".into())
            ]
        );
        // A line exactly at the cap is accepted.
        let exact = format!("{}\n", "y".repeat(100));
        assert_eq!(lines_of(exact.as_bytes(), 100, 1000)[0].1.len(), 100);
    }

    #[test]
    fn batcher_carries_remainders_across_files() {
        let file = |n: usize, base: u8| {
            let mut im = Images::default();
            for i in 0..n {
                im.push(i as u16 % 10, &[base + i as u8; IMAGE_BYTES]);
            }
            im
        };
        let files = vec![file(5, 0), file(4, 100), file(3, 200)];
        let mut b = Batcher::new(4);
        let mut sizes = Vec::new();
        let mut firsts = Vec::new();
        while let Some(batch) = b.next(&files) {
            sizes.push(batch.len());
            firsts.push(batch.image(0)[0]);
        }
        // 12 images in batches of 4: [0..4 of f0], [f0#4, f1#0..3], [f1#3, f2#0..3]
        assert_eq!(sizes, vec![4, 4, 4]);
        assert_eq!(firsts, vec![0, 4, 103]);
        let mut b = Batcher::new(5);
        let sizes: Vec<usize> = std::iter::from_fn(|| b.next(&files))
            .map(|x| x.len())
            .collect();
        assert_eq!(sizes, vec![5, 5, 2]);
    }

    fn all_batches(spec: &SourceSpec, opts: &SourceOptions) -> Vec<RecordBatch> {
        let mut src = open(spec, opts).unwrap();
        std::iter::from_fn(|| src.next_batch().unwrap()).collect()
    }

    #[test]
    fn skip_passes_over_the_first_batches_keeping_their_numbers() {
        let opts = SourceOptions {
            batch_size: 30,
            epochs: Some(2),
            ..SourceOptions::default()
        };
        for format in [Format::SparkJson, Format::Ndjson, Format::Arrow] {
            // The same stream from a dataset and from a file, each skipping 5 of 8 batches.
            let spec = SourceSpec::parse("synthetic:120:0:9").unwrap();
            let all = all_batches(&spec, &opts);
            assert_eq!(all.len(), 8);
            let skipped = all_batches(
                &spec,
                &SourceOptions {
                    skip: 5,
                    ..opts.clone()
                },
            );
            assert_eq!(skipped, all[5..].to_vec());
            let files = crate::dataset::load_split(
                &crate::dataset::DataSpec::parse("synthetic:120:0:9").unwrap(),
                Split::Train,
            )
            .unwrap();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("s");
            let serve = crate::serve::ServeOptions {
                data: crate::dataset::DataSpec::parse("synthetic:120:0:9").unwrap(),
                split: Split::Train,
                batch_size: 30,
                endless: true,
                sleep: Duration::ZERO,
                format,
                limit: Some(8),
                progress: false,
                write_timeout: None,
                shuffle: None,
                image_side: crate::dataset::SIDE,
            };
            let mut bytes = Vec::new();
            crate::serve::stream_to(&mut bytes, &files, &serve).unwrap();
            std::fs::write(&path, bytes).unwrap();
            let file = SourceSpec::File(path);
            let from_file = all_batches(
                &file,
                &SourceOptions {
                    skip: 5,
                    ..opts.clone()
                },
            );
            let numbers: Vec<u64> = from_file
                .iter()
                .map(|b| crate::wire::batch::batch_number(b).unwrap())
                .collect();
            assert_eq!(numbers, [5, 6, 7], "{format:?}");
            for (a, b) in from_file.iter().zip(&all[5..]) {
                assert_eq!(
                    a.column_by_name("label"),
                    b.column_by_name("label"),
                    "{format:?}"
                );
                assert_eq!(
                    a.column_by_name("image"),
                    b.column_by_name("image"),
                    "{format:?}"
                );
            }
        }
    }
}
