//! `cifar-df export`: everything a source delivers, written to Parquet.
//!
//! The batches come through the streaming table (`SELECT * FROM stream`), the same path
//! every later consumer uses. Output is zstd-compressed Parquet with the source's schema
//! (the stream schema; from Kafka also `partition` and `offset`). [`publish`] sends the
//! batches to a Kafka topic instead. A path ending in `.parquet` is one file; anything else is a directory
//! of part files. Every file is written under a temporary name and renamed when complete,
//! so a reader never sees a half-written file; on an error or Ctrl-C the batches already
//! received are still finished and kept.

use std::fs;
use std::path::{Path, PathBuf};

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::{EnabledStatistics, WriterProperties};
use datafusion::prelude::SessionContext;
use futures::StreamExt;

use crate::error::{Error, Result};
use crate::store::{temp_name, PendingFile};

/// How to write.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// Rows per part file in directory mode.
    pub rows_per_file: usize,
    /// Rows per Parquet row group.
    pub rows_per_group: usize,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            rows_per_file: 10_000,
            rows_per_group: 2_048,
        }
    }
}

/// What an export wrote.
#[derive(Debug, Default)]
pub struct ExportSummary {
    /// Batches written.
    pub batches: u64,
    /// Rows (images) written.
    pub rows: u64,
    /// Files completed, in order.
    pub files: Vec<PathBuf>,
    /// Whether Ctrl-C stopped it.
    pub interrupted: bool,
    /// The error that ended the stream early, if any (what came before it was written).
    pub error: Option<Error>,
}

/// Writer properties for stream data: zstd, no dictionaries (pixels do not repeat in
/// ways a dictionary helps), chunk-level statistics.
pub fn writer_properties(rows_per_group: usize) -> Result<WriterProperties> {
    let level = ZstdLevel::try_new(1)?;
    Ok(WriterProperties::builder()
        .set_compression(Compression::ZSTD(level))
        .set_dictionary_enabled(false)
        .set_statistics_enabled(EnabledStatistics::Chunk)
        .set_max_row_group_row_count(Some(rows_per_group.max(1)))
        .build())
}

/// Where the batches go: one file, or numbered parts in a directory.
struct Sink {
    dir: Option<PathBuf>,
    file: Option<PathBuf>,
    next_part: usize,
    current: Option<PendingFile>,
    schema: SchemaRef,
    opts: ExportOptions,
    done: Vec<PathBuf>,
}

impl Sink {
    fn new(out: &Path, opts: &ExportOptions, schema: SchemaRef) -> Result<Self> {
        let single = out.extension().is_some_and(|e| e == "parquet");
        let mut sink = Sink {
            dir: None,
            file: None,
            next_part: 0,
            current: None,
            schema,
            opts: opts.clone(),
            done: Vec::new(),
        };
        if single {
            if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            }
            sink.file = Some(out.to_path_buf());
        } else {
            fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
            sink.next_part = next_part_number(out)?;
            sink.dir = Some(out.to_path_buf());
        }
        Ok(sink)
    }

    fn open(&mut self) -> Result<&mut PendingFile> {
        if self.current.is_none() {
            let (path, tmp) = match (&self.file, &self.dir) {
                (Some(f), _) => (f.clone(), temp_name(f)),
                (None, Some(d)) => {
                    let name = format!("part-{:05}.parquet", self.next_part);
                    self.next_part += 1;
                    (d.join(&name), d.join(format!(".{name}.inprogress")))
                }
                (None, None) => return Err(Error::usage("export sink has no destination")),
            };
            let props = writer_properties(self.opts.rows_per_group)?;
            self.current = Some(PendingFile::create(path, tmp, &self.schema, props)?);
        }
        self.current
            .as_mut()
            .ok_or_else(|| Error::usage("export sink has no open file"))
    }

    fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let rows_per_file = self.opts.rows_per_file.max(1);
        let is_dir = self.dir.is_some();
        let file = self.open()?;
        file.write(batch)?;
        if is_dir && file.rows >= rows_per_file {
            self.roll()?;
        }
        Ok(())
    }

    fn roll(&mut self) -> Result<()> {
        if let Some(f) = self.current.take() {
            self.done.push(f.finish()?);
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Vec<PathBuf>> {
        // A single-file export always leaves a file, empty or not.
        if self.file.is_some() {
            self.open()?;
        }
        self.roll()?;
        Ok(self.done)
    }
}

/// The first part number not used yet in `dir` (exports into a directory append).
fn next_part_number(dir: &Path) -> Result<usize> {
    let mut next = 0;
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(n) = name
            .strip_prefix("part-")
            .and_then(|r| r.strip_suffix(".parquet"))
            .and_then(|n| n.parse::<usize>().ok())
        {
            next = next.max(n + 1);
        }
    }
    Ok(next)
}

/// Run `SELECT * FROM stream` in `ctx` (where a source is registered) and write every batch
/// to `out`, with the source's columns (the stream schema; a Kafka source adds `partition`
/// and `offset`). `on_batch` is called after each batch is written (for progress).
pub async fn export(
    ctx: &SessionContext,
    out: &Path,
    opts: &ExportOptions,
    on_batch: impl FnMut(&RecordBatch),
) -> Result<ExportSummary> {
    let df = ctx.sql("SELECT * FROM stream").await?;
    let schema: SchemaRef = std::sync::Arc::new(df.schema().as_arrow().clone());
    let mut sink = Sink::new(out, opts, schema)?;
    let mut summary = drive(df, &mut |b| sink.write(b), on_batch).await?;
    summary.files = sink.finish()?;
    Ok(summary)
}

/// Publish every batch of the `stream` table in `ctx` to Kafka, one record per batch with
/// the batch's own number as its key; returns when the broker has acknowledged them all.
pub async fn publish(
    ctx: &SessionContext,
    publisher: &mut crate::kafka::Publisher,
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
    let seq = crate::batch::batch_number(batch).unwrap_or(0);
    let labels = batch
        .column_by_name("label")
        .ok_or_else(|| Error::usage("the stream has no `label` column"))?;
    let labels = crate::batch::label_values(labels.as_ref())
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
    let start = images.offset() * crate::dataset::IMAGE_BYTES;
    let n = labels.len() * crate::dataset::IMAGE_BYTES;
    let pixels = pixels
        .values()
        .get(start..start + n)
        .ok_or_else(|| Error::usage("the stream's image column is shorter than its labels"))?;
    Ok((seq, labels, pixels))
}

/// Runs `df` to its end (or Ctrl-C, or a stream error, kept in the summary), handing each
/// non-empty batch to `write`.
async fn drive(
    df: datafusion::dataframe::DataFrame,
    write: &mut dyn FnMut(&RecordBatch) -> Result<()>,
    mut on_batch: impl FnMut(&RecordBatch),
) -> Result<ExportSummary> {
    let mut summary = ExportSummary::default();
    let mut stream = df.execute_stream().await?;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let next = tokio::select! {
            next = stream.next() => next,
            _ = &mut ctrl_c => {
                summary.interrupted = true;
                break;
            }
        };
        match next {
            None => break,
            Some(Ok(batch)) => {
                if batch.num_rows() == 0 {
                    continue;
                }
                write(&batch)?;
                summary.batches += 1;
                summary.rows += batch.num_rows() as u64;
                on_batch(&batch);
            }
            Some(Err(e)) => {
                summary.error = Some(e.into());
                break;
            }
        }
    }
    Ok(summary)
}
