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
use std::path::{Path, PathBuf};

use std::borrow::Cow;
use std::collections::HashMap;

use ndarray::{Array1, Array2, ArrayView1, ArrayView2};
use safetensors::tensor::{Dtype, Metadata, SafeTensors, TensorView};

use crate::dataset::MAX_CLASSES;
use crate::error::{Error, Result};
use crate::rng::SplitMix;
use crate::store::{write_atomic, write_atomic_with};

pub mod cnn;
pub mod kernel_svm;
mod kernels;
pub use kernels::set_threads;
pub mod kmeans;
pub mod logreg;
pub mod mlp;
pub mod registry;
pub mod ridge;
pub mod svm;

pub use registry::{Model, ModelKind};

pub use cnn::{Cnn, CnnParams};
pub use kernel_svm::{KernelSvm, KernelSvmParams};
pub use kmeans::{KMeans, KMeansParams};
pub use logreg::{LogReg, LogRegParams};
pub use mlp::{Mlp, MlpParams};
pub use ridge::{Ridge, RidgeParams};
pub use svm::{Svm, SvmParams};

/// Number of classes of a model whose hyper-parameters do not say (CIFAR-10's); every
/// model's `classes` hyper-parameter defaults to it, and the trainer sets it from the data.
pub const CLASSES: usize = 10;

/// Checks a model's `classes` hyper-parameter: 2 to [`MAX_CLASSES`].
pub(crate) fn check_classes(model: &str, classes: usize) -> Result<()> {
    if (2..=MAX_CLASSES).contains(&classes) {
        Ok(())
    } else {
        Err(Error::usage(format!(
            "{model}: classes must be between 2 and {MAX_CLASSES}, got {classes}"
        )))
    }
}

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

    /// Number of classes K: labels are `0..K`, probabilities have K columns.
    fn classes(&self) -> usize;

    /// Learns from one batch: `x` is n × d (one row per image), `y` the n labels in
    /// `0..K` ([`classes`](Learner::classes)).
    ///
    /// Returns the mean training loss (cross-entropy, without any regularisation term)
    /// of the batch's images, each image's loss taken with the parameters as they were
    /// just *before* the update step of the mini-batch that contains it. That is the
    /// mean of the per-mini-batch pre-step losses, weighted by mini-batch size: an
    /// honest "progressive" loss, since no image is scored by a step that used it.
    ///
    /// The whole batch is checked before any update: a width different from
    /// [`n_features`](Learner::n_features), a label ≥ K, a non-finite feature
    /// or `x` and `y` of different lengths is an `Err` and leaves the model unchanged.
    /// An empty batch (n = 0) is `Ok(0.0)` and changes nothing. Models do not override
    /// this: they learn in [`fit_batch`](Learner::fit_batch), which sees checked,
    /// non-empty batches only.
    fn partial_fit(&mut self, x: ArrayView2<f32>, y: ArrayView1<u16>) -> Result<f64> {
        check_batch(x, y, self.n_features(), self.classes())?;
        if x.nrows() == 0 {
            return Ok(0.0);
        }
        self.fit_batch(x, y)
    }

    /// The model's own step of [`partial_fit`](Learner::partial_fit), on a batch
    /// already checked and not empty; returns the same loss.
    fn fit_batch(&mut self, x: ArrayView2<f32>, y: ArrayView1<u16>) -> Result<f64>;

    /// Class probabilities: an n × K matrix whose rows sum to 1.
    ///
    /// Errors on a width different from [`n_features`](Learner::n_features) or a
    /// non-finite feature.
    fn predict_proba(&self, x: ArrayView2<f32>) -> Result<Array2<f32>>;

    /// Predicted labels: the argmax of each row of
    /// [`predict_proba`](Learner::predict_proba), the lowest class on ties.
    fn predict(&self, x: ArrayView2<f32>) -> Result<Array1<u16>> {
        let proba = self.predict_proba(x)?;
        Ok(proba.rows().into_iter().map(argmax).collect())
    }

    /// Called by the trainer at the end of every epoch (and at the end of the stream).
    /// Models that learn in bulk (`svm-kernel`) fit here; incremental ones do nothing.
    fn end_epoch(&mut self) -> Result<()> {
        Ok(())
    }

    /// Tells the model how many images the stream will bring in all (`--epochs` times a
    /// dataset's images), or `None` for a stream of unknown length. Models with a
    /// learning-rate schedule (the CNN) plan it over them; the others ignore it.
    fn plan(&mut self, _images: Option<u64>) {}

    /// Whether [`partial_fit_scored`](Learner::partial_fit_scored) gives each image's
    /// probabilities as the model saw it just before learning it, computed on the way
    /// (the CNN's forward pass). Then the trainer's test-then-train scores come from
    /// there, not from a separate [`predict_proba`](Learner::predict_proba).
    fn scores_while_learning(&self) -> bool {
        false
    }

    /// [`partial_fit`](Learner::partial_fit), and, where
    /// [`scores_while_learning`](Learner::scores_while_learning), the n × K
    /// probabilities of each image before the step that learnt it (an empty batch: none
    /// to give, a 0 × K matrix).
    fn partial_fit_scored(
        &mut self,
        x: ArrayView2<f32>,
        y: ArrayView1<u16>,
    ) -> Result<(f64, Option<Array2<f32>>)> {
        check_batch(x, y, self.n_features(), self.classes())?;
        if x.nrows() == 0 {
            let none = Array2::zeros((0, self.classes()));
            return Ok((0.0, self.scores_while_learning().then_some(none)));
        }
        self.fit_batch_scored(x, y)
    }

    /// [`fit_batch`](Learner::fit_batch) with the scores of
    /// [`partial_fit_scored`](Learner::partial_fit_scored), on a checked, non-empty
    /// batch. Models that score while learning override it.
    fn fit_batch_scored(
        &mut self,
        x: ArrayView2<f32>,
        y: ArrayView1<u16>,
    ) -> Result<(f64, Option<Array2<f32>>)> {
        Ok((self.fit_batch(x, y)?, None))
    }

    /// Learns on in another precision of its products from here on (`--precision` on a
    /// resumed run). Models that compute in f32 only refuse anything else.
    fn switch_precision(&mut self, precision: cnn::Precision) -> Result<()> {
        match precision {
            cnn::Precision::F32 | cnn::Precision::Auto => Ok(()),
            cnn::Precision::Bf16 => Err(Error::usage(format!(
                "--precision bf16: model {} computes in f32 only (the cnn has bf16)",
                self.name()
            ))),
        }
    }

    /// How the products compute, where the model has a choice (the cnn: `bf16
    /// (amx-bf16)`, `bf16 (avx512-bf16)` or `f32`): what the run records.
    fn compute(&self) -> Option<String> {
        None
    }

    /// For clustering models: the cluster each row of `x` falls in; `None` (the
    /// default) for classifiers.
    fn clusters(&self, _x: ArrayView2<f32>) -> Option<Result<Vec<u32>>> {
        None
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
    match MODELS.iter().find(|k| k.name == kind.model) {
        Some(k) => k.load(dir),
        None => Err(Error::format(
            &path,
            0,
            format!(
                "unknown model kind {:?} (known: {})",
                kind.model,
                registry::names().join(", ")
            ),
        )),
    }
}

/// Every model cifar-df has, one line each (see [`registry`]); the first is the default.
pub static MODELS: &[ModelKind] = &[
    ModelKind::of::<LogReg>(),
    ModelKind::of::<Svm>(),
    ModelKind::of::<Mlp>(),
    ModelKind::of::<KMeans>(),
    ModelKind::of::<KernelSvm>(),
    ModelKind::of::<Ridge>(),
    ModelKind::of::<Cnn>(),
];

/// Each row of scores `z` into probabilities in place: `softmax(z / temperature)`, from
/// the row's maximum (so no overflow).
pub(crate) fn softmax_rows(z: &mut ndarray::ArrayViewMut2<f32>, temperature: f32) {
    for mut row in z.rows_mut() {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for v in row.iter_mut() {
            *v = ((*v - max) / temperature).exp();
            sum += *v;
        }
        row.mapv_inplace(|v| v / sum);
    }
}

/// Index of the largest value, the lowest index on ties (and 0 for an empty row).
fn argmax(row: ArrayView1<f32>) -> u16 {
    let mut best = 0;
    for (j, &p) in row.iter().enumerate() {
        if p > row[best] {
            best = j;
        }
    }
    // A row has at most MAX_CLASSES entries, so the index fits in a u16.
    u16::try_from(best).unwrap_or(u16::MAX)
}

/// Checks a batch of features against the width the model expects (`None`: any width
/// of at least one feature): every value finite.
pub(crate) fn check_features(x: ArrayView2<f32>, expected: Option<usize>) -> Result<()> {
    let d = x.ncols();
    match expected {
        Some(e) if e != d => {
            return Err(Error::data(format!(
                "batch has {d} features per row but the model expects {e}"
            )))
        }
        None if d == 0 && x.nrows() > 0 => {
            return Err(Error::data("batch has rows but no feature columns"))
        }
        _ => {}
    }
    let all_finite = match x.as_slice_memory_order() {
        Some(s) => s.iter().all(|v| v.is_finite()),
        None => x.iter().all(|v| v.is_finite()),
    };
    if !all_finite {
        if let Some(((r, c), v)) = x.indexed_iter().find(|(_, v)| !v.is_finite()) {
            return Err(Error::data(format!(
                "batch row {r}, feature {c} is {v}: features must be finite"
            )));
        }
    }
    Ok(())
}

/// Checks a labelled batch: as [`check_features`], plus one label per row, each below
/// `classes`.
pub(crate) fn check_batch(
    x: ArrayView2<f32>,
    y: ArrayView1<u16>,
    expected: Option<usize>,
    classes: usize,
) -> Result<()> {
    if x.nrows() != y.len() {
        return Err(Error::data(format!(
            "batch has {} rows but {} labels",
            x.nrows(),
            y.len()
        )));
    }
    if let Some((i, &l)) = y
        .iter()
        .enumerate()
        .find(|(_, &l)| usize::from(l) >= classes)
    {
        return Err(Error::data(format!(
            "batch row {i} has label {l}; labels must be below {classes} (the model's classes)"
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

/// Creates the checkpoint folder `dir` if needed (the store's).
pub(crate) use crate::store::create_dir;

/// The tensors of a checkpoint being written: name, shape and little-endian data, copied
/// or (the large ones, [`TensorsOut::f32_slice`], [`TensorsOut::f64_slice`]) borrowed.
#[derive(Default)]
pub(crate) struct TensorsOut<'a> {
    entries: Vec<TensorOut<'a>>,
}

/// `data`'s little-endian bytes: the values themselves on a little-endian machine,
/// converted (`le`) into a copy elsewhere.
fn borrowed_le<T: bytemuck::Pod, const N: usize>(
    data: &[T],
    le: impl Fn(&T) -> [u8; N],
) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        Cow::Borrowed(bytemuck::cast_slice(data))
    } else {
        Cow::Owned(data.iter().flat_map(le).collect())
    }
}

/// One tensor of [`TensorsOut`]: name, shape, type and little-endian bytes.
type TensorOut<'a> = (String, Vec<usize>, Dtype, Cow<'a, [u8]>);

impl<'a> TensorsOut<'a> {
    /// Adds an F32 tensor without copying it (on a little-endian machine).
    pub(crate) fn f32_slice(&mut self, name: &str, shape: &[usize], data: &'a [f32]) {
        let bytes = borrowed_le(data, |v| v.to_le_bytes());
        self.entries
            .push((name.to_string(), shape.to_vec(), Dtype::F32, bytes));
    }

    /// Adds an F64 tensor without copying it (on a little-endian machine).
    pub(crate) fn f64_slice(&mut self, name: &str, shape: &[usize], data: &'a [f64]) {
        let bytes = borrowed_le(data, |v| v.to_le_bytes());
        self.entries
            .push((name.to_string(), shape.to_vec(), Dtype::F64, bytes));
    }

    /// Adds an F32 tensor; `data` in row-major order, `shape.product()` values.
    pub(crate) fn f32<'b>(
        &mut self,
        name: &str,
        shape: &[usize],
        data: impl IntoIterator<Item = &'b f32>,
    ) {
        let bytes = data.into_iter().flat_map(|v| v.to_le_bytes()).collect();
        self.entries.push((
            name.to_string(),
            shape.to_vec(),
            Dtype::F32,
            Cow::Owned(bytes),
        ));
    }

    /// Adds an F64 tensor (sums kept exactly); `data` in row-major order.
    pub(crate) fn f64<'b>(
        &mut self,
        name: &str,
        shape: &[usize],
        data: impl IntoIterator<Item = &'b f64>,
    ) {
        let bytes = data.into_iter().flat_map(|v| v.to_le_bytes()).collect();
        self.entries.push((
            name.to_string(),
            shape.to_vec(),
            Dtype::F64,
            Cow::Owned(bytes),
        ));
    }

    /// Adds a U64 tensor (counters).
    pub(crate) fn u64<'b>(
        &mut self,
        name: &str,
        shape: &[usize],
        data: impl IntoIterator<Item = &'b u64>,
    ) {
        let bytes = data.into_iter().flat_map(|v| v.to_le_bytes()).collect();
        self.entries.push((
            name.to_string(),
            shape.to_vec(),
            Dtype::U64,
            Cow::Owned(bytes),
        ));
    }
}

/// Writes a checkpoint into `dir`: `tensors` to [`TENSORS_FILE`], then `meta` (a struct
/// serialising to a JSON object) with `"model": model` and `"stamp": stamp` added to
/// [`META_FILE`], each atomically. The stamp (the model's counters, say) is also stored
/// in the tensors file's metadata, so [`Checkpoint::open`] can tell a save torn between
/// the two renames.
pub(crate) fn save_checkpoint<M: serde::Serialize>(
    dir: &Path,
    model: &str,
    stamp: &str,
    meta: &M,
    tensors: TensorsOut<'_>,
) -> Result<()> {
    save_tensors_and_meta(dir, [TENSORS_FILE, META_FILE], model, stamp, meta, tensors)
}

/// [`save_checkpoint`] under other file names (`[tensors, meta]`): the feature
/// extractors' folders use the same layout.
pub(crate) fn save_tensors_and_meta<M: serde::Serialize>(
    dir: &Path,
    files: [&str; 2],
    model: &str,
    stamp: &str,
    meta: &M,
    tensors: TensorsOut<'_>,
) -> Result<()> {
    create_dir(dir)?;
    let path = dir.join(files[0]);
    let cannot = |e: String| {
        Error::io(
            &path,
            std::io::Error::other(format!("cannot serialise: {e}")),
        )
    };
    let mut views = Vec::with_capacity(tensors.entries.len());
    for (name, shape, dtype, bytes) in &tensors.entries {
        let view =
            TensorView::new(*dtype, shape.clone(), bytes).map_err(|e| cannot(e.to_string()))?;
        views.push((name.as_str(), view));
    }
    let extra = HashMap::from([
        ("model".to_string(), model.to_string()),
        ("stamp".to_string(), stamp.to_string()),
    ]);
    // Streamed to the file from the tensors themselves (no copy of a large model in
    // memory), then the header's keys sorted in place.
    write_atomic_with(&path, |tmp| {
        safetensors::serialize_to_file(views, &Some(extra), tmp)
            .map_err(|e| std::io::Error::other(format!("cannot serialise: {e}")))?;
        sort_header_in_place(tmp)
    })?;

    let meta_path = dir.join(files[1]);
    // (`to_value` keeps each f64's exact bits, which a trip through the JSON text would
    // not: serde_json's reader rounds some 17-digit numbers. An f32 shows as its f64
    // widening, 0.009999999776482582 for 0.01, and reads back as the same f32.)
    let mut value = serde_json::to_value(meta).map_err(|e| cannot(e.to_string()))?;
    let Some(obj) = value.as_object_mut() else {
        return Err(cannot("model metadata is not a JSON object".into()));
    };
    obj.insert("model".into(), model.into());
    obj.insert("stamp".into(), stamp.into());
    let mut exact = serde_json::Map::new();
    inexact_floats(&value, &mut String::new(), &mut exact);
    if !exact.is_empty() {
        if let Some(obj) = value.as_object_mut() {
            obj.insert(EXACT_FLOATS.into(), exact.into());
        }
    }
    let mut json = serde_json::to_vec_pretty(&value).map_err(|e| cannot(e.to_string()))?;
    json.push(b'\n');
    write_atomic(&meta_path, &json)
}

/// The field of [`META_FILE`] holding the exact bits of floats whose decimal form the
/// JSON reader would not read back exactly (JSON pointer → hex bits).
const EXACT_FLOATS: &str = "exact_floats";

/// Records, under their JSON pointers, the floats of `v` that `serde_json` would not
/// parse back to the same bits from their decimal text (it rounds some 17-digit
/// numbers), so that a checkpoint restores them exactly.
fn inexact_floats(
    v: &serde_json::Value,
    path: &mut String,
    out: &mut serde_json::Map<String, serde_json::Value>,
) {
    match v {
        serde_json::Value::Number(n) => {
            if let Some(x) = n.as_f64().filter(|_| n.is_f64()) {
                let back = serde_json::to_string(&x)
                    .ok()
                    .and_then(|t| serde_json::from_str::<f64>(&t).ok());
                if back.map(f64::to_bits) != Some(x.to_bits()) {
                    out.insert(path.clone(), format!("{:016x}", x.to_bits()).into());
                }
            }
        }
        serde_json::Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("/{i}"));
                inexact_floats(item, path, out);
                path.truncate(len);
            }
        }
        serde_json::Value::Object(map) => {
            for (k, item) in map {
                let len = path.len();
                path.push('/');
                path.push_str(&k.replace('~', "~0").replace('/', "~1"));
                inexact_floats(item, path, out);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

/// Puts back the exact floats [`inexact_floats`] recorded.
pub(crate) fn restore_exact_floats(v: &mut serde_json::Value) -> std::result::Result<(), String> {
    let Some(exact) = v.as_object_mut().and_then(|o| o.remove(EXACT_FLOATS)) else {
        return Ok(());
    };
    let exact = exact
        .as_object()
        .ok_or_else(|| format!("{EXACT_FLOATS} is not an object"))?
        .clone();
    for (pointer, bits) in exact {
        let x = bits
            .as_str()
            .and_then(|b| u64::from_str_radix(b, 16).ok())
            .map(f64::from_bits)
            .ok_or_else(|| format!("{EXACT_FLOATS}: {pointer}: not hex float bits"))?;
        let slot = v
            .pointer_mut(&pointer)
            .ok_or_else(|| format!("{EXACT_FLOATS}: no field {pointer}"))?;
        *slot = serde_json::Number::from_f64(x)
            .ok_or_else(|| format!("{EXACT_FLOATS}: {pointer}: not finite"))?
            .into();
    }
    Ok(())
}

/// A safetensors file's JSON header with its keys sorted, rewritten in place.
/// safetensors writes its metadata map in hash order, which differs from process to
/// process; sorted, the same model saves to the same bytes in every process (so
/// checkpoints compare with `cmp`).
fn sort_header_in_place(path: &Path) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = fs::OpenOptions::new().read(true).write(true).open(path)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)?;
    let n = usize::try_from(u64::from_le_bytes(len)).map_err(std::io::Error::other)?;
    let mut header = vec![0u8; n];
    f.read_exact(&mut header)?;
    if let Some(text) = sorted_header(&header) {
        f.seek(SeekFrom::Start(8))?;
        f.write_all(&text)?;
    }
    Ok(())
}

/// A safetensors JSON header with its keys sorted, padded with spaces to its length;
/// `None` if it does not parse or would not fit.
fn sorted_header(header: &[u8]) -> Option<Vec<u8>> {
    fn sorted(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(m) => {
                let mut entries: Vec<(String, serde_json::Value)> = m.into_iter().collect();
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                serde_json::Value::Object(
                    entries.into_iter().map(|(k, v)| (k, sorted(v))).collect(),
                )
            }
            other => other,
        }
    }
    let value = serde_json::from_slice::<serde_json::Value>(header).ok()?;
    let mut text = serde_json::to_vec(&sorted(value)).ok()?;
    if text.len() > header.len() {
        return None;
    }
    text.resize(header.len(), b' ');
    Some(text)
}

/// A checkpoint read back by [`Checkpoint::open`]: its metadata and a validated
/// safetensors buffer to take tensors from. Every error names the file at fault.
pub(crate) struct Checkpoint {
    meta_path: PathBuf,
    meta: serde_json::Value,
    path: PathBuf,
    buf: Vec<u8>,
    md: Metadata,
    data_start: usize,
}

impl Checkpoint {
    /// Reads both files of the checkpoint in `dir`, checking that they hold a `model`
    /// and come from the same save (same stamp).
    pub(crate) fn open(dir: &Path, model: &str) -> Result<Self> {
        Self::open_files(dir, [TENSORS_FILE, META_FILE], model)
    }

    /// [`Checkpoint::open`] under other file names (`[tensors, meta]`).
    pub(crate) fn open_files(dir: &Path, files: [&str; 2], model: &str) -> Result<Self> {
        let (meta_path, bytes) = read_file(&dir.join(files[1]))?;
        let meta: serde_json::Value = parse_json(&meta_path, &bytes)?;
        let field = |k: &str| meta.get(k).and_then(|v| v.as_str()).map(str::to_string);
        let kind = field("model");
        if kind.as_deref() != Some(model) {
            return Err(Error::format(
                &meta_path,
                0,
                format!("holds a {kind:?} model, not {model:?}"),
            ));
        }
        let Some(stamp) = field("stamp") else {
            return Err(Error::format(
                &meta_path,
                0,
                format!("no \"stamp\" field: not a checkpoint of a {model:?} model"),
            ));
        };
        let (path, buf) = read_file(&dir.join(files[0]))?;
        let (header_len, md) = SafeTensors::read_metadata(&buf)
            .map_err(|e| Error::format(&path, 0, format!("not a valid safetensors file: {e}")))?;
        let theirs = md.metadata().as_ref().and_then(|m| m.get("model"));
        if let Some(theirs) = theirs.filter(|t| t.as_str() != model) {
            return Err(Error::format(
                &meta_path,
                0,
                format!(
                    "says {model:?}, but {} holds a {theirs:?} model's tensors",
                    files[0]
                ),
            ));
        }
        let got = md.metadata().as_ref().and_then(|m| m.get("stamp")).cloned();
        if got.as_deref() != Some(stamp.as_str()) {
            return Err(Error::format(
                &path,
                8,
                format!(
                    "metadata stamp {got:?} does not match {} ({stamp:?}): \
                     the files come from different saves",
                    files[1]
                ),
            ));
        }
        Ok(Checkpoint {
            meta_path,
            meta,
            path,
            buf,
            md,
            data_start: 8 + header_len,
        })
    }

    /// The metadata as `M` (without the `model` and `stamp` fields).
    pub(crate) fn meta<M: serde::de::DeserializeOwned>(&self) -> Result<M> {
        let mut v = self.meta.clone();
        restore_exact_floats(&mut v).map_err(|e| self.bad_meta(e))?;
        if let Some(o) = v.as_object_mut() {
            o.remove("model");
            o.remove("stamp");
        }
        serde_json::from_value(v)
            .map_err(|e| Error::format(&self.meta_path, 0, format!("invalid model metadata: {e}")))
    }

    /// An error about the metadata file.
    pub(crate) fn bad_meta(&self, reason: impl Into<String>) -> Error {
        Error::format(&self.meta_path, 0, reason.into())
    }

    /// Checks that the tensors file holds exactly the tensors `names` (any order).
    pub(crate) fn expect_names(&self, names: &[String]) -> Result<()> {
        let mut have: Vec<String> = self.md.tensors().into_keys().collect();
        have.sort();
        let mut want = names.to_vec();
        want.sort();
        if have != want {
            return Err(Error::format(
                &self.path,
                8,
                format!("holds tensors {have:?}, expected {want:?}"),
            ));
        }
        Ok(())
    }

    fn raw(&self, name: &str, dtype: Dtype, shape: &[usize]) -> Result<(usize, &[u8])> {
        tensor_bytes(&self.buf, &self.md, self.data_start, name, dtype, shape)
            .map_err(|(o, r)| Error::format(&self.path, o as u64, r))
    }

    /// The F32 tensor `name`, which must have shape `shape` and finite values.
    pub(crate) fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        read_f32(&self.buf, &self.md, self.data_start, name, shape)
            .map_err(|(o, r)| Error::format(&self.path, o as u64, r))
    }

    /// The F32 tensor `name` as a 2-d array of shape `(rows, cols)`.
    pub(crate) fn f32_2d(&self, name: &str, rows: usize, cols: usize) -> Result<Array2<f32>> {
        let v = self.f32(name, &[rows, cols])?;
        Array2::from_shape_vec((rows, cols), v)
            .map_err(|e| Error::format(&self.path, 8, format!("tensor {name:?}: {e}")))
    }

    /// The U64 tensor `name` of `n` class labels, each checked to be below `classes`.
    pub(crate) fn labels(&self, name: &str, n: usize, classes: usize) -> Result<Vec<u16>> {
        let (start, _) = self.raw(name, Dtype::U64, &[n])?;
        self.u64(name, &[n])?
            .iter()
            .enumerate()
            .map(|(i, &l)| match u16::try_from(l) {
                Ok(l) if usize::from(l) < classes => Ok(l),
                _ => Err(Error::format(
                    &self.path,
                    (start + 8 * i) as u64,
                    format!("tensor {name:?} element {i} is {l}, not a label below {classes}"),
                )),
            })
            .collect()
    }

    /// The U64 tensor `name`, which must have shape `shape`.
    /// The F64 tensor `name`, which must have shape `shape` and finite values.
    pub(crate) fn f64(&self, name: &str, shape: &[usize]) -> Result<Vec<f64>> {
        let (start, data) = self.raw(name, Dtype::F64, shape)?;
        let v: Vec<f64> = data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(Error::format(
                &self.path,
                (start + 8 * i) as u64,
                format!("tensor {name:?} element {i} is {}, not finite", v[i]),
            ));
        }
        Ok(v)
    }

    pub(crate) fn u64(&self, name: &str, shape: &[usize]) -> Result<Vec<u64>> {
        let (_, data) = self.raw(name, Dtype::U64, shape)?;
        Ok(data
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect())
    }
}

/// Where the tensor `name` lies in a validated safetensors buffer (`data_start` = 8 +
/// header length), after checking that it has `dtype` and `shape` and all its bytes.
/// Errors are (byte offset, reason), for the caller to name the file.
pub(crate) fn tensor_bytes<'a>(
    buf: &'a [u8],
    md: &Metadata,
    data_start: usize,
    name: &str,
    dtype: Dtype,
    shape: &[usize],
) -> std::result::Result<(usize, &'a [u8]), (usize, String)> {
    let info = md
        .info(name)
        .ok_or_else(|| (8, format!("no tensor {name:?}")))?;
    if info.dtype != dtype {
        return Err((
            8,
            format!(
                "tensor {name:?} has dtype {:?}, expected {dtype:?}",
                info.dtype
            ),
        ));
    }
    if info.shape != shape {
        return Err((
            8,
            format!(
                "tensor {name:?} has shape {:?}, expected {shape:?}",
                info.shape
            ),
        ));
    }
    let (from, to) = info.data_offsets;
    let start = data_start + from;
    let n: usize = shape.iter().product();
    let data = buf
        .get(start..data_start + to)
        .filter(|d| d.len() == dtype.size() * n)
        .ok_or_else(|| (start, format!("tensor {name:?} has the wrong data length")))?;
    Ok((start, data))
}

/// The F32 tensor `name` of shape `shape` from a validated safetensors buffer, requiring
/// finite values. Errors are (byte offset, reason).
pub(crate) fn read_f32(
    buf: &[u8],
    md: &Metadata,
    data_start: usize,
    name: &str,
    shape: &[usize],
) -> std::result::Result<Vec<f32>, (usize, String)> {
    let (start, data) = tensor_bytes(buf, md, data_start, name, Dtype::F32, shape)?;
    let values: Vec<f32> = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err((
            start + 4 * i,
            format!("tensor {name:?} element {i} is {}", values[i]),
        ));
    }
    Ok(values)
}

/// The first row of `a` holding a non-finite value (an overflowed product), if any.
pub(crate) fn first_non_finite_row(a: ArrayView2<f32>) -> Option<usize> {
    a.rows()
        .into_iter()
        .position(|r| r.iter().any(|v| !v.is_finite()))
}

/// Helpers shared by the models' unit tests.
#[cfg(test)]
pub(crate) mod test_util {
    use super::*;

    /// `n` rows of `d` standard-normal features with uniform labels.
    pub(crate) fn random_batch(
        rng: &mut SplitMix,
        n: usize,
        d: usize,
    ) -> (Array2<f32>, Array1<u16>) {
        let x = Array2::from_shape_fn((n, d), |_| rng.normal() as f32);
        let y = (0..n).map(|_| rng.below(CLASSES) as u16).collect();
        (x, y)
    }

    /// Trains `a` on the first `split` rows, saves it, loads it back with [`load`] and
    /// checks that the copy is a `name` model predicting identically, then that both
    /// learn the remaining rows identically. Returns the checkpoint's folder.
    pub(crate) fn assert_save_load_continues(
        a: &mut dyn Learner,
        name: &str,
        x: ArrayView2<f32>,
        y: ArrayView1<u16>,
        split: usize,
    ) -> tempfile::TempDir {
        use ndarray::s;
        a.partial_fit(x.slice(s![..split, ..]), y.slice(s![..split]))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        a.save(dir.path()).unwrap();
        let mut b = load(dir.path()).unwrap();
        assert_eq!(b.name(), name);
        assert_eq!(a.predict_proba(x).unwrap(), b.predict_proba(x).unwrap());
        a.partial_fit(x.slice(s![split.., ..]), y.slice(s![split..]))
            .unwrap();
        b.partial_fit(x.slice(s![split.., ..]), y.slice(s![split..]))
            .unwrap();
        assert_eq!(a.predict_proba(x).unwrap(), b.predict_proba(x).unwrap());
        dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn checkpoint_floats_come_back_bit_for_bit() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct M {
            wscale: f64,
            t: Vec<f64>,
            plain: f64,
        }
        // serde_json reads this value's shortest decimal form back one ulp off.
        let tricky = 0.672662639814418_f64;
        let text = serde_json::to_string(&tricky).unwrap();
        let parsed: f64 = serde_json::from_str(&text).unwrap();
        let m = M {
            wscale: tricky,
            t: vec![1.0 / 3.0, tricky * 7.0, 0.5],
            plain: 0.25,
        };
        let dir = tempfile::tempdir().unwrap();
        let mut t = TensorsOut::default();
        t.f32("w", &[2], &[1.0, 2.0]);
        save_checkpoint(dir.path(), "x", "1", &m, t).unwrap();
        let back: M = Checkpoint::open(dir.path(), "x").unwrap().meta().unwrap();
        assert_eq!(back.wscale.to_bits(), tricky.to_bits());
        assert_eq!(back, m);
        // The bits are only recorded where they are needed.
        let json = std::fs::read_to_string(dir.path().join(META_FILE)).unwrap();
        assert_eq!(
            json.contains("/wscale"),
            parsed.to_bits() != tricky.to_bits(),
            "{json}"
        );
        assert!(!json.contains("/plain"), "{json}");
    }

    #[test]
    fn every_model_saves_the_same_bytes_every_time() {
        let mut rng = SplitMix(5);
        let (x, y) = test_util::random_batch(&mut rng, 40, 3072);
        for kind in MODELS {
            let name = kind.name;
            let mut table = toml::Table::new();
            if name == "svm-kernel" {
                table.insert("buffer".into(), toml::Value::Integer(20));
            }
            let mut m = kind.build(&table).unwrap();
            m.partial_fit(x.view(), y.view()).unwrap();
            let first = tempfile::tempdir().unwrap();
            m.save(first.path()).unwrap();
            for _ in 0..4 {
                let again = tempfile::tempdir().unwrap();
                m.save(again.path()).unwrap();
                for file in [TENSORS_FILE, META_FILE] {
                    assert_eq!(
                        fs::read(first.path().join(file)).unwrap(),
                        fs::read(again.path().join(file)).unwrap(),
                        "{name}: {file}"
                    );
                }
            }
            // And the canonical file still loads.
            let back = load(first.path()).unwrap();
            assert_eq!(
                back.predict_proba(x.view()).unwrap(),
                m.predict_proba(x.view()).unwrap()
            );
        }
    }

    #[test]
    fn argmax_takes_lowest_index_on_ties() {
        assert_eq!(argmax(array![0.1f32, 0.4, 0.4, 0.1].view()), 1);
        assert_eq!(argmax(array![0.25f32, 0.25, 0.25, 0.25].view()), 0);
        assert_eq!(argmax(array![0.0f32, 0.0, 1.0].view()), 2);
    }

    #[test]
    fn batch_checks() {
        let x = Array2::<f32>::zeros((2, 3));
        assert!(check_batch(x.view(), array![1u16, 9].view(), Some(3), CLASSES).is_ok());
        assert!(check_batch(x.view(), array![1u16, 9].view(), None, CLASSES).is_ok());
        let e = check_batch(x.view(), array![1u16, 10].view(), Some(3), CLASSES).unwrap_err();
        assert!(e.to_string().contains("row 1") && e.to_string().contains("label 10"));
        assert!(check_batch(x.view(), array![1u16].view(), Some(3), CLASSES).is_err());
        assert!(check_batch(x.view(), array![1u16, 2].view(), Some(4), CLASSES).is_err());
        let mut bad = x.clone();
        bad[[1, 2]] = f32::NAN;
        let e = check_batch(bad.view(), array![1u16, 2].view(), Some(3), CLASSES).unwrap_err();
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
}
