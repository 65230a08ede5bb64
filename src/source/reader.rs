//! The byte-stream sources: a TCP connection to a stream server (`tcp://`) or a captured
//! stream (`file:`), read line by line with a hard cap on a line's length, in the wire
//! format the first line shows (spark-json, ndjson, or an Arrow IPC stream), each
//! malformed line rejected, counted and reported while the stream goes on.

use std::fmt;
use std::io::{self, Cursor, Read};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use arrow::array::{Array, FixedSizeListArray, UInt8Array};
use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;

use super::{catch_panic, BatchSource, Rejection, Report, SourceOptions};
use crate::dataset::{image_bytes, SIDE};
use crate::error::{Error, Result};
use crate::wire::batch::{first_bad_label, make_batch_sized};
use crate::wire::{self, ndjson, spark_json, Detected, Format};

/// Connect to `host:port`, retrying every 100 ms until `timeout` has passed.
pub fn connect(host: &str, port: u16, timeout: Duration) -> Result<TcpStream> {
    let deadline = Instant::now() + timeout;
    let mut logged = false;
    loop {
        match TcpStream::connect((host, port)) {
            Ok(s) => {
                tracing::debug!("connected to {host}:{port}");
                return Ok(s);
            }
            Err(e) if Instant::now() < deadline => {
                if !logged {
                    tracing::info!("waiting for a server on {host}:{port} ({e})");
                    logged = true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                return Err(Error::Net {
                    what: format!(
                        "connect to tcp://{host}:{port} (gave up after {:.1} s)",
                        timeout.as_secs_f64()
                    ),
                    source: e,
                })
            }
        }
    }
}

/// Read a stream in any wire format from `reader` (`name` is used in messages).
pub fn from_reader(
    mut reader: Box<dyn Read + Send>,
    name: &str,
    opts: &SourceOptions,
    report: Report,
) -> Result<Box<dyn BatchSource>> {
    // Read just enough to tell the format, then hand those bytes back in front of the rest.
    let mut prefix = Vec::new();
    let format = match opts.format {
        Some(f) => f,
        None => loop {
            let at_eof = {
                let mut chunk = [0u8; 64];
                let n = read_retrying(&mut reader, &mut chunk).map_err(|e| Error::Net {
                    what: format!("read from {name}"),
                    source: e,
                })?;
                prefix.extend_from_slice(&chunk[..n]);
                n == 0
            };
            match wire::detect(&prefix, at_eof) {
                Detected::Format(f) => break f,
                Detected::NeedMore => {}
                Detected::Unknown if prefix.iter().all(u8::is_ascii_whitespace) => {
                    // An empty stream: nothing to read.
                    break Format::SparkJson;
                }
                Detected::Unknown => {
                    let shown = String::from_utf8_lossy(&prefix[..prefix.len().min(32)]);
                    return Err(Error::Decode {
                        batch: 0,
                        row: None,
                        reason: format!(
                            "{name}: cannot tell the wire format from the first bytes {shown:?} \
                             (give --format spark-json, ndjson or arrow)"
                        ),
                    });
                }
            }
        },
    };
    report.set_format(format);
    if let Some(why) = format.refuses_side(opts.image_side, "stream them as ndjson or arrow") {
        return Err(Error::usage(format!("{name}: {why}")));
    }
    let reader: Box<dyn Read + Send> = Box::new(Cursor::new(prefix).chain(reader));
    Ok(match format {
        Format::Arrow => Box::new(ArrowSource::new(
            reader,
            name,
            report,
            opts.max_line_bytes,
            opts.classes,
            opts.image_side,
        )),
        Format::SparkJson | Format::Ndjson => Box::new(JsonLines {
            lines: LineReader::new(reader, opts.max_line_bytes),
            format,
            next_batch: 0,
            skip: opts.skip,
            batch_size: opts.batch_size,
            report,
            spark: spark_json::DecodedBatch::default(),
            ndjson: None,
            classes: opts.classes,
            side: opts.image_side,
        }),
    })
}

fn read_retrying(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // A peer that vanished ends the stream like a close does.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::BrokenPipe
                ) =>
            {
                return Ok(0)
            }
            other => return other,
        }
    }
}

/// One line from a [`LineReader`].
#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// A complete line, without its `\n`.
    Text(&'a [u8]),
    /// A line longer than the cap, skipped; its length in bytes.
    TooLong(u64),
    /// The last bytes of the stream, not ended by `\n`: a complete final line without its
    /// newline, or what a dropped connection left of a line.
    Unterminated(&'a [u8]),
}

/// Splits a byte stream into lines, never holding more than the cap (plus one read) of a
/// single line in memory.
pub struct LineReader<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    scanned: usize,
    max: usize,
    offset: u64,
    eof: bool,
}

const READ_CHUNK: usize = 1 << 20;

impl<R: Read> LineReader<R> {
    /// Lines of at most `max` bytes from `inner`.
    pub fn new(inner: R, max: usize) -> Self {
        LineReader {
            inner,
            buf: Vec::new(),
            start: 0,
            end: 0,
            scanned: 0,
            max,
            offset: 0,
            eof: false,
        }
    }

    /// The next line and the stream offset of its first byte; `None` at the end.
    pub fn next_line(&mut self) -> io::Result<Option<(u64, Line<'_>)>> {
        loop {
            if let Some(pos) = memchr::memchr(b'\n', &self.buf[self.scanned..self.end]) {
                let stop = self.scanned + pos;
                let (start, offset) = (self.start, self.offset);
                self.offset += (stop + 1 - start) as u64;
                self.start = stop + 1;
                self.scanned = self.start;
                return Ok(Some((offset, Line::Text(&self.buf[start..stop]))));
            }
            self.scanned = self.end;
            if self.end - self.start > self.max {
                return self.skip_long_line().map(Some);
            }
            if self.eof {
                if self.start == self.end {
                    return Ok(None);
                }
                let (start, offset) = (self.start, self.offset);
                self.offset += (self.end - start) as u64;
                self.start = self.end;
                self.scanned = self.end;
                return Ok(Some((
                    offset,
                    Line::Unterminated(&self.buf[start..self.end]),
                )));
            }
            self.fill()?;
        }
    }

    /// Read more bytes after the current ones, making room first.
    fn fill(&mut self) -> io::Result<()> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.scanned -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < READ_CHUNK / 2 {
            let want = (self.buf.len() * 2).max(self.end + READ_CHUNK);
            self.buf.resize(want.min(self.max + READ_CHUNK + 1), 0);
        }
        let n = read_retrying(&mut self.inner, &mut self.buf[self.end..])?;
        if n == 0 {
            self.eof = true;
        }
        self.end += n;
        Ok(())
    }

    /// Drop the current line, reading until its end, and say how long it was. Memory
    /// stays at the buffer's size however long the line is; a line still going at
    /// [`LONG_LINE_WARNING`] times the cap is reported then, not only when (if) it ends.
    fn skip_long_line(&mut self) -> io::Result<(u64, Line<'_>)> {
        let offset = self.offset;
        let mut len = (self.end - self.start) as u64;
        let mut warned = false;
        self.start = 0;
        self.end = 0;
        self.scanned = 0;
        loop {
            let n = read_retrying(&mut self.inner, &mut self.buf[..])?;
            if n == 0 {
                self.eof = true;
                self.offset += len;
                return Ok((offset, Line::TooLong(len)));
            }
            if let Some(pos) = memchr::memchr(b'\n', &self.buf[..n]) {
                len += pos as u64;
                self.offset += len + 1;
                self.start = pos + 1;
                self.scanned = self.start;
                self.end = n;
                return Ok((offset, Line::TooLong(len)));
            }
            len += n as u64;
            if !warned && len > (self.max as u64).saturating_mul(LONG_LINE_WARNING) {
                warned = true;
                tracing::warn!(
                    "the line at stream byte {offset} is over {len} bytes and has not ended \
                     (the cap is {} bytes); reading on to its end, without keeping it",
                    self.max
                );
            }
        }
    }
}

/// How many times the line cap a line may run on before it is reported while still
/// being read (see [`LineReader::skip_long_line`]).
pub const LONG_LINE_WARNING: u64 = 16;

/// `spark-json` or `ndjson` lines.
struct JsonLines {
    lines: LineReader<Box<dyn Read + Send>>,
    format: Format,
    next_batch: u64,
    skip: u64,
    batch_size: usize,
    report: Report,
    spark: spark_json::DecodedBatch,
    ndjson: Option<ndjson::LineDecoder>,
    classes: usize,
    side: usize,
}

/// The next line of `lines`, counting its bytes in `report`.
fn read_line<'a, R: Read>(
    lines: &'a mut LineReader<R>,
    report: &Report,
) -> Result<Option<(u64, Line<'a>)>> {
    let line = lines.next_line().map_err(|e| Error::Net {
        what: "read from the stream".into(),
        source: e,
    })?;
    if let Some((_, l)) = &line {
        report.add_bytes(match l {
            Line::Text(t) => t.len() as u64 + 1,
            Line::TooLong(n) => n + 1,
            Line::Unterminated(t) => t.len() as u64,
        });
    }
    Ok(line)
}

impl JsonLines {
    fn next_spark(&mut self) -> Result<Option<RecordBatch>> {
        let max = self.lines.max;
        loop {
            let report = self.report.clone();
            let batch = self.next_batch;
            let (offset, line) = match read_line(&mut self.lines, &report)? {
                None => return Ok(None),
                Some(x) => x,
            };
            let (text, unterminated) = match line {
                Line::Text(t) if t.iter().all(u8::is_ascii_whitespace) => continue,
                Line::Text(t) => (t, false),
                // A complete last line without its newline is accepted; anything else is
                // what a dropped connection left of a line.
                Line::Unterminated(t) => (t, true),
                Line::TooLong(n) => {
                    self.next_batch += 1;
                    report.reject(Rejection {
                        partition: None,
                        batch,
                        row: None,
                        offset,
                        reason: format!("line of {n} bytes is longer than the cap of {max} bytes"),
                    });
                    continue;
                }
            };
            self.next_batch += 1;
            if batch < self.skip {
                // Already learnt (a resumed run): not decoded.
                continue;
            }
            match spark_json::decode_classes(text, &mut self.spark, self.classes) {
                Ok(()) if self.spark.is_empty() => report.empty(),
                Ok(()) => {
                    let spark = std::mem::take(&mut self.spark);
                    let n = spark.len();
                    let out = make_batch_sized(
                        batch,
                        Some(spark.rows),
                        spark.labels,
                        spark.pixels,
                        SIDE,
                    )?;
                    report.accept(n);
                    return Ok(Some(out));
                }
                Err(e) if unterminated => report.reject(Rejection {
                    partition: None,
                    batch,
                    row: e.row,
                    offset,
                    reason: format!(
                        "stream ended inside a line ({} bytes of it dropped: {})",
                        text.len(),
                        e.reason
                    ),
                }),
                Err(e) => report.reject(Rejection {
                    partition: None,
                    batch,
                    row: e.row,
                    offset: offset + e.offset as u64,
                    reason: e.reason,
                }),
            }
        }
    }

    fn next_ndjson(&mut self) -> Result<Option<RecordBatch>> {
        let max = self.lines.max;
        let mut decoder = match self.ndjson.take() {
            Some(d) => d,
            None => ndjson::LineDecoder::sized(self.classes, self.side)?,
        };
        let report = self.report.clone();
        let batch = self.next_batch;
        let (mut labels, mut rows, mut pixels) = (Vec::new(), Vec::new(), Vec::new());
        let mut row: u32 = 0;
        let mut ended = false;
        while (row as usize) < self.batch_size {
            let (offset, line) = match read_line(&mut self.lines, &report)? {
                None => {
                    ended = true;
                    break;
                }
                Some(x) => x,
            };
            let reason = match line {
                Line::Text(t) if t.iter().all(u8::is_ascii_whitespace) => {
                    if row > 0 {
                        break;
                    }
                    continue;
                }
                Line::Text(t) => match decoder.decode_line(t, &mut pixels) {
                    Ok(label) => {
                        labels.push(label);
                        rows.push(row);
                        row += 1;
                        continue;
                    }
                    Err(reason) => reason,
                },
                Line::TooLong(n) => {
                    format!("line of {n} bytes is longer than the cap of {max} bytes")
                }
                Line::Unterminated(t) => match decoder.decode_line(t, &mut pixels) {
                    Ok(label) => {
                        labels.push(label);
                        rows.push(row);
                        row += 1;
                        continue;
                    }
                    Err(reason) => format!(
                        "stream ended inside a line ({} bytes of it dropped: {reason})",
                        t.len()
                    ),
                },
            };
            report.reject(Rejection {
                partition: None,
                batch,
                row: Some(row),
                offset,
                reason,
            });
            row += 1;
        }
        self.ndjson = Some(decoder);
        if row == 0 && ended {
            return Ok(None);
        }
        self.next_batch += 1;
        if labels.is_empty() {
            return if ended { Ok(None) } else { self.next_ndjson() };
        }
        let n = labels.len();
        let out = make_batch_sized(batch, Some(rows), labels, pixels, self.side)?;
        report.accept(n);
        Ok(Some(out))
    }
}

impl BatchSource for JsonLines {
    fn image_side(&self) -> usize {
        self.side
    }

    fn next_batch(&mut self) -> Result<Option<RecordBatch>> {
        match self.format {
            Format::Ndjson => self.next_ndjson(),
            _ => self.next_spark(),
        }
    }

    fn report(&self) -> Report {
        self.report.clone()
    }
}

/// Counts the bytes that pass through a reader.
struct Counted<R> {
    inner: R,
    report: Report,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = read_retrying(&mut self.inner, buf)?;
        self.report.add_bytes(n as u64);
        Ok(n)
    }
}

/// An Arrow IPC stream. A corrupt message cannot be skipped (IPC has no resynchronisation
/// point), so it ends the stream with an error; the batches before it are kept.
///
/// The framing (continuation marker, metadata length, the flatbuffer `Message` with its
/// body length) is read and checked here, with every length bounded by `max_message`
/// before anything is allocated: Arrow's own `StreamReader` allocates whatever a corrupt
/// length says (an abort, not an error). Each checked message then goes to Arrow's
/// `StreamDecoder`.
pub(super) struct ArrowSource {
    reader: Counted<Box<dyn Read + Send>>,
    decoder: Option<arrow::ipc::reader::StreamDecoder>,
    name: String,
    next_batch: u64,
    max_message: usize,
    pub(super) report: Report,
    classes: usize,
    side: usize,
}

impl ArrowSource {
    pub(super) fn new(
        reader: Box<dyn Read + Send>,
        name: &str,
        report: Report,
        max_message: usize,
        classes: usize,
        side: usize,
    ) -> Self {
        ArrowSource {
            reader: Counted {
                inner: reader,
                report: report.clone(),
            },
            decoder: Some(arrow::ipc::reader::StreamDecoder::new()),
            name: name.to_string(),
            next_batch: 0,
            max_message,
            report,
            classes,
            side,
        }
    }

    fn ipc_error(&self, e: impl fmt::Display) -> Error {
        Error::Decode {
            batch: self.next_batch,
            row: None,
            reason: format!("{}: Arrow IPC stream: {e}", self.name),
        }
    }

    /// The Arrow decoder panicked (on a corrupt message it does not check).
    fn decoder_panic(&self, panic: &str) -> Error {
        self.ipc_error(format!(
            "corrupt message at or before byte offset {} (the decoder failed: {panic})",
            self.report.snapshot().bytes
        ))
    }

    /// Fills `buf` from the stream; `Ok(false)` at a clean end before its first byte.
    fn read_exact_or_end(&mut self, buf: &mut [u8], what: &str) -> Result<bool> {
        let mut got = 0;
        while got < buf.len() {
            match self.reader.read(&mut buf[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => {
                    return Err(self.ipc_error(format!(
                        "the stream ends inside {what} (byte offset {})",
                        self.report.snapshot().bytes
                    )))
                }
                Ok(n) => got += n,
                Err(e) => return Err(self.ipc_error(format!("reading {what}: {e}"))),
            }
        }
        Ok(true)
    }

    /// The next framed message, checked and bounded; `None` at the end of the stream.
    fn next_message(&mut self) -> Result<Option<Vec<u8>>> {
        let mut word = [0u8; 4];
        if !self.read_exact_or_end(&mut word, "a message header")? {
            return Ok(None);
        }
        let mut framed = Vec::with_capacity(8);
        framed.extend_from_slice(&word);
        if word == [0xff; 4] {
            if !self.read_exact_or_end(&mut word, "a message header")? {
                return Err(self.ipc_error("the stream ends inside a message header"));
            }
            framed.extend_from_slice(&word);
        }
        let len = i32::from_le_bytes(word);
        if len == 0 {
            return Ok(None); // the end-of-stream marker
        }
        let offset = self.report.snapshot().bytes;
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= self.max_message)
            .ok_or_else(|| {
                self.ipc_error(format!(
                    "message metadata length {len} at byte offset {offset} is negative or over \
                     the limit ({} bytes)",
                    self.max_message
                ))
            })?;
        let start = framed.len();
        framed.resize(start + len, 0);
        self.read_exact_or_end(&mut framed[start..], "message metadata")?;
        let body = match arrow::ipc::root_as_message(&framed[start..]) {
            Ok(m) => m.bodyLength(),
            Err(e) => {
                return Err(self.ipc_error(format!(
                    "invalid message metadata at byte offset {offset}: {e}"
                )))
            }
        };
        let body = usize::try_from(body)
            .ok()
            .filter(|&b| b <= self.max_message)
            .ok_or_else(|| {
                self.ipc_error(format!(
                    "message body length {body} at byte offset {offset} is negative or over the \
                     limit ({} bytes; --max-line-bytes raises it)",
                    self.max_message
                ))
            })?;
        let start = framed.len();
        framed.resize(start + body, 0);
        self.read_exact_or_end(&mut framed[start..], "a message body")?;
        Ok(Some(framed))
    }
}

impl BatchSource for ArrowSource {
    fn image_side(&self) -> usize {
        self.side
    }

    fn next_batch(&mut self) -> Result<Option<RecordBatch>> {
        loop {
            if self.decoder.is_none() {
                return Ok(None);
            }
            let framed = match self.next_message() {
                Ok(Some(m)) => m,
                Ok(None) => {
                    self.decoder = None;
                    return Ok(None);
                }
                Err(e) => {
                    self.decoder = None;
                    return Err(e);
                }
            };
            let mut buf = arrow::buffer::Buffer::from(framed);
            let Some(decoder) = self.decoder.as_mut() else {
                return Ok(None);
            };
            let batch = match catch_panic(|| {
                let mut out = None;
                while !buf.is_empty() {
                    let before = buf.len();
                    if let Some(b) = decoder.decode(&mut buf)? {
                        out = Some(b);
                    } else if buf.len() == before {
                        break; // nothing consumed: never spin
                    }
                }
                Ok::<_, arrow::error::ArrowError>(out)
            }) {
                Ok(Ok(Some(b))) => b,
                Ok(Ok(None)) => continue, // the schema, or a dictionary
                Ok(Err(e)) => {
                    self.decoder = None;
                    return Err(self.ipc_error(e));
                }
                Err(panic) => {
                    // The decoder's state is unknown after a panic: the stream ends here.
                    self.decoder = None;
                    return Err(self.decoder_panic(&panic));
                }
            };
            let seq = self.next_batch;
            self.next_batch += 1;
            match restamp(&batch, seq, self.classes, self.side) {
                Ok(out) => {
                    self.report.accept(out.num_rows());
                    return Ok(Some(out));
                }
                Err((row, reason)) => self.report.reject(Rejection {
                    partition: None,
                    batch: seq,
                    row,
                    offset: self.report.snapshot().bytes,
                    reason,
                }),
            }
        }
    }

    fn report(&self) -> Report {
        self.report.clone()
    }
}

/// Check an incoming Arrow batch (any schema with `label: UInt8` or `UInt16` and
/// `image: FixedSizeList<UInt8, 3·side²>`) and give it the stream schema and sequence
/// number.
pub(super) fn restamp(
    batch: &RecordBatch,
    seq: u64,
    classes: usize,
    side: usize,
) -> std::result::Result<RecordBatch, (Option<u32>, String)> {
    let per = image_bytes(side);
    let label = batch
        .column_by_name("label")
        .ok_or((None, "no `label` column".to_string()))?;
    let labels = crate::wire::batch::label_values(label.as_ref()).map_err(|e| (None, e))?;
    let image = batch
        .column_by_name("image")
        .ok_or((None, "no `image` column".to_string()))?;
    let image = image
        .as_any()
        .downcast_ref::<FixedSizeListArray>()
        .filter(|a| a.value_length() as usize == per)
        .ok_or_else(|| {
            let theirs = match image.data_type() {
                DataType::FixedSizeList(_, n) => crate::transforms::pixels::side(*n as usize),
                _ => None,
            };
            let hint = match theirs {
                Some(s) => {
                    format!(": its images are {s}x{s} and this run's {side}x{side} (--image-size)")
                }
                None => format!(" ({side}x{side} RGB images)"),
            };
            (
                None,
                format!(
                    "`image` is {}, not FixedSizeList<UInt8, {per}>{hint}",
                    image.data_type()
                ),
            )
        })?;
    if let Some(i) = (0..image.len()).find(|&i| image.is_null(i)) {
        return Err((Some(i as u32), "null image".into()));
    }
    let values = image
        .values()
        .as_any()
        .downcast_ref::<UInt8Array>()
        .ok_or((None, "`image` values are not UInt8".to_string()))?;
    if values.null_count() > 0 {
        return Err((None, "`image` has null pixels".into()));
    }
    if let Some((row, l)) = first_bad_label(&labels, classes) {
        return Err((
            Some(row as u32),
            format!("label {l} outside 0..{}", classes.saturating_sub(1)),
        ));
    }
    let pixels = values
        .values()
        .get(..labels.len() * per)
        .ok_or((None, "`image` is shorter than `label`".to_string()))?
        .to_vec();
    make_batch_sized(seq, None, labels.into_owned(), pixels, side)
        .map_err(|e| (None, e.to_string()))
}
