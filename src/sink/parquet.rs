//! `cifar-df export` to Parquet: everything a source delivers, written as zstd-compressed
//! Parquet with the source's schema (the stream schema; from Kafka also `partition` and
//! `offset`). A path ending in `.parquet` is one file; anything else is a directory of part
//! files. Every file is written under a temporary name and renamed when complete, so a
//! reader never sees a half-written file; on an error or Ctrl-C the batches already
//! received are still finished and kept.

use std::fs;
use std::path::{Path, PathBuf};

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::{EnabledStatistics, WriterProperties};
use datafusion::prelude::SessionContext;

use super::{drive, ExportSummary};
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
