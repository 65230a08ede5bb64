//! Durable files: every file cifar-df commits (Parquet parts, checkpoints, `run.json`,
//! extractors, images) is written under a temporary name, flushed to disk (`fsync`),
//! renamed to its name, and the folder flushed too, so that after a crash or a power loss
//! a file is either absent or complete, never renamed but empty. Parquet files are written
//! the same way ([`write_parquet_file`], and `PendingFile` for a file written batch by batch);
//! PNG images (plots, image grids) through [`png`].

pub mod png;

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::WriterProperties;

use crate::error::{Error, Result};

/// Distinguishes the temporary files of concurrent saves within one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` atomically: into a new temporary file in the same folder,
/// flushed to disk, then renamed over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        // The name is unique among live processes; one left by a dead process is reused.
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(tmp)?
            .write_all(bytes)
    })
}

/// [`write_atomic`] for a file that `write` creates (or truncates) at the temporary
/// path it is given and fills: then flushed to disk and renamed over `path`.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&Path) -> std::io::Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = write(&tmp).and_then(|()| File::open(&tmp)?.sync_all());
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    if let Err(e) = rename_durable(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(())
}

/// Renames `from` (a file or folder whose contents are already on disk) to `to`, then
/// flushes the folder holding `to`, so the rename itself survives a power loss.
pub fn rename_durable(from: &Path, to: &Path) -> Result<()> {
    fs::rename(from, to).map_err(|e| Error::io(to, e))?;
    sync_dir(to.parent().unwrap_or(Path::new(".")))
}

/// Flushes a folder's entries to disk (a no-op where folders cannot be opened to sync).
pub fn sync_dir(dir: &Path) -> Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    #[cfg(unix)]
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))?;
    Ok(())
}

/// A Parquet file under a temporary name until it is finished.
pub(crate) struct PendingFile {
    tmp: PathBuf,
    path: PathBuf,
    writer: ArrowWriter<File>,
    /// Rows written so far.
    pub(crate) rows: usize,
}

impl PendingFile {
    pub(crate) fn create(
        path: PathBuf,
        tmp: PathBuf,
        schema: &SchemaRef,
        props: WriterProperties,
    ) -> Result<Self> {
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let writer = ArrowWriter::try_new(file, schema.clone(), Some(props))?;
        Ok(PendingFile {
            tmp,
            path,
            writer,
            rows: 0,
        })
    }

    pub(crate) fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        self.writer.write(batch)?;
        self.rows += batch.num_rows();
        Ok(())
    }

    pub(crate) fn finish(self) -> Result<PathBuf> {
        let file = self.writer.into_inner()?;
        file.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        rename_durable(&self.tmp, &self.path)?;
        Ok(self.path)
    }
}

/// All of `r` if it holds at most `cap` bytes, `None` if more: never reads past `cap + 1`
/// (a file named by a user, which may be huge or still growing).
pub fn read_at_most(r: impl std::io::Read, cap: u64) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    r.take(cap.saturating_add(1)).read_to_end(&mut bytes)?;
    Ok((bytes.len() as u64 <= cap).then_some(bytes))
}

/// Write `batches` (at least one; all with the first one's schema) to the Parquet file
/// `path`, under a temporary name first and renamed when complete.
pub fn write_parquet_file(path: &Path, batches: &[RecordBatch]) -> Result<()> {
    let first = batches
        .first()
        .ok_or_else(|| Error::usage(format!("{}: nothing to write", path.display())))?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1)?))
        .build();
    let mut file =
        PendingFile::create(path.to_path_buf(), temp_name(path), &first.schema(), props)?;
    for b in batches {
        file.write(b)?;
    }
    file.finish()?;
    Ok(())
}

pub(crate) fn temp_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".inprogress");
    path.with_file_name(name)
}

/// Creates the folder `dir` (and its parents) if needed, naming it on error.
pub(crate) fn create_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.bin");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        let missing = dir.path().join("no/such/dir/f.bin");
        let e = write_atomic(&missing, b"x").unwrap_err().to_string();
        assert!(e.contains("no/such/dir"), "{e}");
    }

    #[test]
    fn rename_durable_moves_files_and_folders() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        fs::create_dir(&a).unwrap();
        fs::write(a.join("x"), b"1").unwrap();
        let b = dir.path().join("b");
        rename_durable(&a, &b).unwrap();
        assert_eq!(fs::read(b.join("x")).unwrap(), b"1");
        assert!(!a.exists());
        let e = rename_durable(&a, &dir.path().join("c")).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
        sync_dir(&b).unwrap();
        assert!(sync_dir(&dir.path().join("missing")).is_err());
    }
}
