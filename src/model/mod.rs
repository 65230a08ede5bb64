//! Incremental learners: models that learn from a stream one batch at a time.
//!
//! The stream never ends and never comes back, so a model here cannot see the whole
//! training set: it must update itself from each incoming batch (an n × d matrix of
//! preprocessed images and their labels) and be ready to predict or be saved between
//! any two batches. [`Learner`] is that contract, in the spirit of linfa's `FitWith` and
//! River's `learn_many`; [`load`] brings back a model saved by [`Learner::save`]
//! whatever its kind. The checkpoint layout (tensors in [`TENSORS_FILE`], everything
//! else in [`META_FILE`], each written atomically) is shared by all models, and so are
//! the input checks, so every model rejects bad batches the same way.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ndarray::{Array1, Array2, ArrayView1, ArrayView2};

use crate::error::{Error, Result};

pub mod logreg;

pub use logreg::{LogReg, LogRegParams};

/// Number of classes (CIFAR-10).
pub const CLASSES: usize = 10;

/// Name of the file holding a saved model's tensors (safetensors format).
pub const TENSORS_FILE: &str = "model.safetensors";

/// Name of the file holding a saved model's kind, hyper-parameters and counters (JSON).
pub const META_FILE: &str = "model.json";

/// A classifier that learns incrementally, one batch of the stream at a time.
pub trait Learner: Send {
    /// Short model name ("logreg"); also the `"model"` field of its [`META_FILE`].
    fn name(&self) -> &'static str;

    /// Number of input features the model expects: fixed by the first non-empty batch
    /// it learns from, `None` before.
    fn n_features(&self) -> Option<usize>;

    /// Learns from one batch: `x` is n × d (one row per image), `y` the n labels in
    /// `0..CLASSES`.
    ///
    /// Returns the mean training loss (cross-entropy, without any regularisation term)
    /// of the batch's images, each image's loss taken with the parameters as they were
    /// just *before* the update step of the mini-batch that contains it. That is the
    /// mean of the per-mini-batch pre-step losses, weighted by mini-batch size: an
    /// honest "progressive" loss, since no image is scored by a step that used it.
    ///
    /// The whole batch is checked before any update: a width different from
    /// [`n_features`](Learner::n_features), a label ≥ [`CLASSES`], a non-finite feature
    /// or `x` and `y` of different lengths is an `Err` and leaves the model unchanged.
    /// An empty batch (n = 0) is `Ok(0.0)` and changes nothing.
    fn partial_fit(&mut self, x: ArrayView2<f32>, y: ArrayView1<u8>) -> Result<f64>;

    /// Class probabilities: an n × [`CLASSES`] matrix whose rows sum to 1.
    ///
    /// Errors on a width different from [`n_features`](Learner::n_features) or a
    /// non-finite feature.
    fn predict_proba(&self, x: ArrayView2<f32>) -> Result<Array2<f32>>;

    /// Predicted labels: the argmax of each row of
    /// [`predict_proba`](Learner::predict_proba), the lowest class on ties.
    fn predict(&self, x: ArrayView2<f32>) -> Result<Array1<u8>> {
        let proba = self.predict_proba(x)?;
        Ok(proba.rows().into_iter().map(argmax).collect())
    }

    /// Writes the model into `dir` (created if needed): its tensors in [`TENSORS_FILE`],
    /// its kind (field `"model"`), hyper-parameters and counters in [`META_FILE`].
    /// Each file is written atomically (a temporary file renamed over the old one),
    /// tensors first, so a reader never sees a half-written file.
    fn save(&self, dir: &Path) -> Result<()>;
}

/// Loads whatever model `dir` holds, dispatching on the `"model"` field of its
/// [`META_FILE`]. Errors name the file at fault.
pub fn load(dir: &Path) -> Result<Box<dyn Learner>> {
    let (path, bytes) = read_file(&dir.join(META_FILE))?;
    #[derive(serde::Deserialize)]
    struct Kind {
        model: String,
    }
    let kind: Kind = parse_json(&path, &bytes)?;
    match kind.model.as_str() {
        logreg::NAME => Ok(Box::new(LogReg::load(dir)?)),
        other => Err(Error::format(
            &path,
            0,
            format!("unknown model kind {other:?} (known: {:?})", logreg::NAME),
        )),
    }
}

/// Index of the largest value, the lowest index on ties (and 0 for an empty row).
fn argmax(row: ArrayView1<f32>) -> u8 {
    let mut best = 0;
    for (j, &p) in row.iter().enumerate() {
        if p > row[best] {
            best = j;
        }
    }
    // A row has CLASSES (10) entries, so the index fits in a u8.
    u8::try_from(best).unwrap_or(u8::MAX)
}

/// Checks a batch of features against the width the model expects (`None`: any width
/// of at least one feature): every value finite.
pub(crate) fn check_features(x: ArrayView2<f32>, expected: Option<usize>) -> Result<()> {
    let d = x.ncols();
    match expected {
        Some(e) if e != d => {
            return Err(Error::usage(format!(
                "batch has {d} features per row but the model expects {e}"
            )))
        }
        None if d == 0 && x.nrows() > 0 => {
            return Err(Error::usage("batch has rows but no feature columns"))
        }
        _ => {}
    }
    let all_finite = match x.as_slice_memory_order() {
        Some(s) => s.iter().all(|v| v.is_finite()),
        None => x.iter().all(|v| v.is_finite()),
    };
    if !all_finite {
        if let Some(((r, c), v)) = x.indexed_iter().find(|(_, v)| !v.is_finite()) {
            return Err(Error::usage(format!(
                "batch row {r}, feature {c} is {v}: features must be finite"
            )));
        }
    }
    Ok(())
}

/// Checks a labelled batch: as [`check_features`], plus one label per row, each below
/// [`CLASSES`].
pub(crate) fn check_batch(
    x: ArrayView2<f32>,
    y: ArrayView1<u8>,
    expected: Option<usize>,
) -> Result<()> {
    if x.nrows() != y.len() {
        return Err(Error::usage(format!(
            "batch has {} rows but {} labels",
            x.nrows(),
            y.len()
        )));
    }
    if let Some((i, &l)) = y
        .iter()
        .enumerate()
        .find(|(_, &l)| usize::from(l) >= CLASSES)
    {
        return Err(Error::usage(format!(
            "batch row {i} has label {l}; labels must be below {CLASSES}"
        )));
    }
    check_features(x, expected)
}

/// Reads a whole file, naming it on error.
pub(crate) fn read_file(path: &Path) -> Result<(PathBuf, Vec<u8>)> {
    match fs::read(path) {
        Ok(bytes) => Ok((path.to_path_buf(), bytes)),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Parses JSON read from `path`, turning a parse error into a format error at the byte
/// offset serde_json points at.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| {
        // serde_json reports a 1-based line and byte column; turn them into an offset.
        let line_start: usize = bytes
            .split_inclusive(|&b| b == b'\n')
            .take(e.line().saturating_sub(1))
            .map(<[u8]>::len)
            .sum();
        let offset = (line_start + e.column().saturating_sub(1)).min(bytes.len());
        Error::format(path, offset as u64, format!("invalid model metadata: {e}"))
    })
}

/// Distinguishes the temporary files of concurrent saves within one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` atomically: into a new temporary file in the same folder,
/// flushed to disk, then renamed over `path`.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
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
    let written = (|| {
        // The name is unique among live processes; one left by a dead process is reused.
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    // Make the rename itself durable (folders cannot be opened for syncing elsewhere).
    #[cfg(unix)]
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))?;
    Ok(())
}

/// Creates the checkpoint folder `dir` if needed.
pub(crate) fn create_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn argmax_takes_lowest_index_on_ties() {
        assert_eq!(argmax(array![0.1f32, 0.4, 0.4, 0.1].view()), 1);
        assert_eq!(argmax(array![0.25f32, 0.25, 0.25, 0.25].view()), 0);
        assert_eq!(argmax(array![0.0f32, 0.0, 1.0].view()), 2);
    }

    #[test]
    fn batch_checks() {
        let x = Array2::<f32>::zeros((2, 3));
        assert!(check_batch(x.view(), array![1u8, 9].view(), Some(3)).is_ok());
        assert!(check_batch(x.view(), array![1u8, 9].view(), None).is_ok());
        let e = check_batch(x.view(), array![1u8, 10].view(), Some(3)).unwrap_err();
        assert!(e.to_string().contains("row 1") && e.to_string().contains("label 10"));
        assert!(check_batch(x.view(), array![1u8].view(), Some(3)).is_err());
        assert!(check_batch(x.view(), array![1u8, 2].view(), Some(4)).is_err());
        let mut bad = x.clone();
        bad[[1, 2]] = f32::NAN;
        let e = check_batch(bad.view(), array![1u8, 2].view(), Some(3)).unwrap_err();
        assert!(e.to_string().contains("row 1, feature 2"), "{e}");
        bad[[1, 2]] = f32::NEG_INFINITY;
        // Non-contiguous view: same answer.
        assert!(check_features(bad.t().t(), None).is_err());
        assert!(check_features(bad.slice(ndarray::s![.., ..;2]), None).is_err());
        assert!(check_features(Array2::<f32>::zeros((2, 0)).view(), None).is_err());
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let meta = dir.path().join(META_FILE);
        let e = load(dir.path()).err().unwrap();
        assert!(matches!(&e, Error::Io { path, .. } if *path == meta), "{e}");
        fs::write(&meta, b"{\n  \"model\": \"forest\"\n}").unwrap();
        let e = load(dir.path()).err().unwrap();
        assert!(
            matches!(&e, Error::Format { path, .. } if *path == meta),
            "{e}"
        );
        assert!(e.to_string().contains("forest"));
        fs::write(&meta, b"{\n  \"model\": \"log").unwrap();
        let e = load(dir.path()).err().unwrap();
        assert!(
            matches!(&e, Error::Format { path, .. } if *path == meta),
            "{e}"
        );
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.bin");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        let missing = dir.path().join("no/such/dir/f.bin");
        assert!(write_atomic(&missing, b"x").is_err());
    }
}
