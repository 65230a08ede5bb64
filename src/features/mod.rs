//! The features stage: image → feature vector, between the stream and the models.
//!
//! The original's best results came from features, not pixels (ResNet50 features cached
//! to disk, then an MLP or an SVM on them). Here an [`Extractor`] turns raw images (the
//! `image` column, CIFAR layout) into a fixed-width `f32` vector. The default, the
//! [`patches`] extractor, is learnt from the stream itself without labels, so the tool
//! needs no downloaded weights. A fitted extractor is a folder ([`Extractor::save`]):
//! `extractor.safetensors` (its tensors) and `extractor.json` (its kind, parameters and a
//! stamp tying the two files to one save), each written atomically.
//!
//! The other kind, [`onnx`], is a user's pretrained ONNX model (`--extractor onnx:FILE`),
//! saved as the model file and `extractor.json`.
//!
//! [`udf`] binds an extractor to a DataFusion function so the streaming SQL computes
//! features; [`cache`] writes features of a whole dataset to Parquet (the original's
//! cached ResNet50 features) for `--source features:DIR`.

use std::path::Path;

use ndarray::{Array1, Array2};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{self, Checkpoint, TensorsOut};

pub mod cache;
pub mod cnn;
pub mod onnx;
pub mod patches;
pub mod udf;

pub use cnn::CnnExtractor;
pub use onnx::{OnnxExtractor, OnnxParams};
pub use patches::{PatchExtractor, PatchParams};

/// The tensors file of an extractor folder.
pub const TENSORS_FILE: &str = "extractor.safetensors";
/// The metadata file of an extractor folder.
pub const META_FILE: &str = "extractor.json";
/// The model file of an ONNX extractor's folder.
pub const ONNX_FILE: &str = "model.onnx";
/// The prefix of an ONNX model in `--extractor onnx:FILE`.
pub const ONNX_PREFIX: &str = "onnx:";

/// A fitted feature extractor.
// One per run or command, behind an `Arc`: the size of the larger variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Extractor {
    /// Patches learnt from the images ([`patches`]).
    Patches(PatchExtractor),
    /// A pretrained ONNX model ([`onnx`]).
    Onnx(OnnxExtractor),
    /// The CNN a run learnt ([`cnn`]).
    Cnn(CnnExtractor),
}

/// What `extractor.json` of an ONNX extractor holds.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnnxMeta {
    model: String,
    stamp: String,
    params: OnnxParams,
    input: onnx::InputLayout,
    width: usize,
    /// The file the model was first read from (for the record).
    source: String,
}

/// What `extractor.json` holds besides the kind and stamp.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchMeta {
    params: PatchParams,
    width: usize,
}

impl Extractor {
    /// The kind's name (`"patches"`).
    pub fn kind(&self) -> &'static str {
        match self {
            Extractor::Patches(_) => "patches",
            Extractor::Onnx(_) => "onnx",
            Extractor::Cnn(_) => "cnn",
        }
    }

    /// Width of the features.
    pub fn width(&self) -> usize {
        match self {
            Extractor::Patches(p) => p.width(),
            Extractor::Onnx(o) => o.width(),
            Extractor::Cnn(c) => c.width(),
        }
    }

    /// The side of the images it encodes, where it has one: a patch extractor's is the
    /// side it was fitted on, a CNN's 32; an ONNX model resizes images of any side to its
    /// input (`None`).
    pub fn image_side(&self) -> Option<usize> {
        match self {
            Extractor::Patches(p) => Some(p.params.side),
            Extractor::Onnx(_) => None,
            Extractor::Cnn(c) => Some(c.side()),
        }
    }

    /// An error when images of `side` are not what the extractor encodes.
    pub fn check_side(&self, side: usize) -> Result<()> {
        match self.image_side() {
            Some(s) if s != side => Err(Error::usage(format!(
                "the {} extractor encodes images of {s}x{s}, not {side}x{side}: give it images \
                 of that side (--image-size {s}, or `resize(image, {s}, {s})` in SQL)",
                self.kind()
            ))),
            _ => Ok(()),
        }
    }

    /// Features of whole images of the extractor's side (32×32 for an ONNX model;
    /// CIFAR layout): n × [`width`](Self::width).
    pub fn encode(&self, pixels: &[u8]) -> Result<Array2<f32>> {
        self.encode_sized(pixels, self.image_side().unwrap_or(crate::dataset::SIDE))
    }

    /// Features of whole `side`×`side` images (`3·side²` bytes each, CIFAR layout):
    /// n × [`width`](Self::width).
    pub fn encode_sized(&self, pixels: &[u8], side: usize) -> Result<Array2<f32>> {
        self.check_side(side)?;
        let n = pixels.len() / crate::dataset::image_bytes(side).max(1);
        crate::limits::check(
            &format!("features of a batch of {n} images, {} each", self.width()),
            4 * crate::limits::product(&[n, self.width()]),
        )?;
        match self {
            Extractor::Patches(p) => p.encode(pixels),
            Extractor::Onnx(o) => o.encode_sized(pixels, side),
            Extractor::Cnn(c) => c.encode(pixels),
        }
    }

    /// The permutation taking an image's features to its mirror image's, where the
    /// extractor has one (feature `i` of the flipped image is feature `perm[i]`).
    pub fn flip_permutation(&self) -> Option<Vec<usize>> {
        match self {
            Extractor::Patches(p) => Some(p.flip_permutation()),
            Extractor::Onnx(_) | Extractor::Cnn(_) => None,
        }
    }

    /// Features of the mirror images of `pixels` (whole images, CIFAR layout): the
    /// permuted features where the extractor has a permutation, else the features of
    /// the flipped pixels.
    pub fn encode_flipped(&self, pixels: &[u8], features: &Array2<f32>) -> Result<Array2<f32>> {
        self.encode_flipped_sized(
            pixels,
            features,
            self.image_side().unwrap_or(crate::dataset::SIDE),
        )
    }

    /// [`encode_flipped`](Self::encode_flipped) of `side`×`side` images.
    pub fn encode_flipped_sized(
        &self,
        pixels: &[u8],
        features: &Array2<f32>,
        side: usize,
    ) -> Result<Array2<f32>> {
        if let Some(perm) = self.flip_permutation() {
            return Ok(features.select(ndarray::Axis(1), &perm));
        }
        let per = crate::dataset::image_bytes(side);
        let mut flipped = vec![0u8; pixels.len()];
        for (d, s) in flipped.chunks_exact_mut(per).zip(pixels.chunks_exact(per)) {
            crate::transforms::pixels::hflip(s, side, d)?;
        }
        self.encode_sized(&flipped, side)
    }

    /// Whether the features do not change when the image is mirrored.
    pub fn flip_invariant(&self) -> bool {
        match self {
            Extractor::Patches(p) => p.params.invariant,
            Extractor::Onnx(_) | Extractor::Cnn(_) => false,
        }
    }

    /// Multiply-adds per image of the main product, for GFLOP/s figures, where known.
    pub fn macs_per_image(&self) -> Option<u64> {
        match self {
            Extractor::Patches(p) => Some(p.macs_per_image()),
            Extractor::Onnx(_) => None,
            Extractor::Cnn(c) => Some(c.macs_per_image()),
        }
    }

    /// What identifies the extractor's features: same stamp, same features.
    pub fn stamp(&self) -> String {
        match self {
            Extractor::Patches(p) => format!("{:016x}", fingerprint(p)),
            Extractor::Onnx(o) => onnx_stamp(o),
            Extractor::Cnn(c) => format!("cnn-{:016x}", c.fingerprint()),
        }
    }

    /// The extractor `--extractor SPEC` names, where SPEC is not a run's CNN: `onnx:FILE`
    /// (an ONNX model, with `params`) or a fitted extractor folder (`params` must then be
    /// the defaults). `run:NAME` needs the run store: [`crate::run::extractor::open`]
    /// opens every kind.
    pub fn open(spec: &str, params: OnnxParams) -> Result<Extractor> {
        if spec.starts_with(cnn::RUN_PREFIX) {
            return Err(Error::usage(format!(
                "--extractor {spec}: a run's CNN is opened through the run store \
                 (cifar_df::run::extractor::open)"
            )));
        }
        if let Some(file) = spec.strip_prefix(ONNX_PREFIX) {
            return Ok(Extractor::Onnx(OnnxExtractor::open(
                Path::new(file),
                params,
            )?));
        }
        if params != OnnxParams::default() {
            return Err(Error::usage(format!(
                "--node and ONNX parameters apply to --extractor {ONNX_PREFIX}FILE, not to the \
                 extractor folder {spec}"
            )));
        }
        Extractor::load(Path::new(spec))
    }

    /// A short description for logs: kind and width.
    pub fn describe(&self) -> String {
        match self {
            Extractor::Patches(p) => format!(
                "patches ({} atoms, {}x{} patches, {}x{} grid, {:?}{}): {} features",
                p.params.atoms,
                p.params.patch,
                p.params.patch,
                p.params.grid,
                p.params.grid,
                p.params.encoding,
                if p.params.invariant {
                    ", flip-invariant"
                } else {
                    ""
                },
                p.width()
            ),
            Extractor::Onnx(o) => format!(
                "onnx {} (input {:?} {}, {}x{}{}; output {}): {} features",
                o.path().display(),
                o.input.name,
                if o.input.channels_last {
                    "NHWC"
                } else {
                    "NCHW"
                },
                o.input.height,
                o.input.width,
                format_args!(", batch {}", o.input.batch),
                o.params.node.as_deref().unwrap_or("the model's"),
                o.width()
            ),
            Extractor::Cnn(c) => format!(
                "the CNN of {} (widths {:?}): its pooled last layer, {} features",
                c.source,
                c.params.widths,
                c.width()
            ),
        }
    }

    /// Writes the extractor into `dir` (created if needed), each file atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        match self {
            Extractor::Patches(p) => {
                let mut t = TensorsOut::default();
                let d = p.mean.len();
                t.f32("mean", &[d], p.mean.iter());
                t.f32("cov", &[d, d], p.cov.iter());
                t.f32("whiten", &[d, d], p.whiten.iter());
                t.f32("atoms", &[p.atoms.nrows(), d], p.atoms.iter());
                t.f32("feature_mean", &[p.width()], p.feature_mean.iter());
                t.f32("feature_std", &[p.width()], p.feature_std.iter());
                let stamp = format!("{:016x}", fingerprint(p));
                let meta = PatchMeta {
                    params: p.params.clone(),
                    width: p.width(),
                };
                model::save_tensors_and_meta(
                    dir,
                    [TENSORS_FILE, META_FILE],
                    "patches",
                    &stamp,
                    &meta,
                    t,
                )
            }
            Extractor::Onnx(o) => {
                // The model first, then the metadata that names its hash: a save torn
                // between the two shows as a hash mismatch.
                model::create_dir(dir)?;
                crate::store::write_atomic(&dir.join(ONNX_FILE), o.model_bytes())?;
                let meta = OnnxMeta {
                    model: "onnx".into(),
                    stamp: onnx_stamp(o),
                    params: o.params.clone(),
                    input: o.input.clone(),
                    width: o.width(),
                    source: o.path().display().to_string(),
                };
                let path = dir.join(META_FILE);
                let mut json = serde_json::to_vec_pretty(&meta)
                    .map_err(|e| Error::io(&path, std::io::Error::other(e)))?;
                json.push(b'\n');
                crate::store::write_atomic(&path, &json)
            }
            Extractor::Cnn(c) => {
                let meta = cnn::CnnMeta {
                    params: c.params.clone(),
                    width: c.width(),
                    source: c.source.clone(),
                };
                model::save_tensors_and_meta(
                    dir,
                    [TENSORS_FILE, META_FILE],
                    "cnn",
                    &format!("{:016x}", c.fingerprint()),
                    &meta,
                    c.tensors(),
                )
            }
        }
    }

    /// Reads an extractor folder written by [`save`](Self::save). A missing folder or
    /// file, a torn save (the two files from different saves) or tensors that do not fit
    /// the parameters is an error naming the file.
    pub fn load(dir: &Path) -> Result<Extractor> {
        if !dir.is_dir() {
            return Err(Error::usage(format!(
                "{}: no extractor folder here (expected {TENSORS_FILE} and {META_FILE}, as \
                 written by `cifar-df features`)",
                dir.display()
            )));
        }
        if dir.join(ONNX_FILE).is_file() {
            return load_onnx(dir);
        }
        if extractor_kind(dir)? == "cnn" {
            let ck = Checkpoint::open_files(dir, [TENSORS_FILE, META_FILE], "cnn")?;
            let meta: cnn::CnnMeta = ck.meta()?;
            return Ok(Extractor::Cnn(CnnExtractor::from_checkpoint(&ck, meta)?));
        }
        let ck = Checkpoint::open_files(dir, [TENSORS_FILE, META_FILE], "patches")?;
        let meta: PatchMeta = ck.meta()?;
        let p = &meta.params;
        p.validate()
            .map_err(|e| ck.bad_meta(format!("invalid extractor parameters: {e}")))?;
        let d = 3 * p.patch * p.patch;
        let w = p.width();
        if meta.width != w {
            return Err(ck.bad_meta(format!(
                "width {} does not match its parameters ({w})",
                meta.width
            )));
        }
        let names: Vec<String> = [
            "mean",
            "cov",
            "whiten",
            "atoms",
            "feature_mean",
            "feature_std",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        ck.expect_names(&names)?;
        let ex = PatchExtractor::assemble(
            p.clone(),
            Array1::from(ck.f32("mean", &[d])?),
            ck.f32_2d("cov", d, d)?,
            ck.f32_2d("whiten", d, d)?,
            ck.f32_2d("atoms", p.atoms, d)?,
            Array1::from(ck.f32("feature_mean", &[w])?),
            Array1::from(ck.f32("feature_std", &[w])?),
        )
        .map_err(|e| ck.bad_meta(e.to_string()))?;
        Ok(Extractor::Patches(ex))
    }
}

/// The `"model"` field of an extractor folder's metadata (the kind).
fn extractor_kind(dir: &Path) -> Result<String> {
    let (path, bytes) = model::read_file(&dir.join(META_FILE))?;
    #[derive(Deserialize)]
    struct Kind {
        model: String,
    }
    let k: Kind = model::parse_json(&path, &bytes)?;
    Ok(k.model)
}

/// Reads an ONNX extractor's folder: `extractor.json` and `model.onnx`, whose hash must
/// be the stamp, and which must still give the recorded width and input.
fn load_onnx(dir: &Path) -> Result<Extractor> {
    let (meta_path, bytes) = model::read_file(&dir.join(META_FILE))?;
    let meta: OnnxMeta = model::parse_json(&meta_path, &bytes)?;
    let bad = |reason: String| Error::format(&meta_path, 0, reason);
    if meta.model != "onnx" {
        return Err(bad(format!(
            "holds a {:?} extractor next to {ONNX_FILE}, expected \"onnx\"",
            meta.model
        )));
    }
    let model_path = dir.join(ONNX_FILE);
    let onnx_bytes = std::fs::read(&model_path).map_err(|e| Error::io(&model_path, e))?;
    let got = format!("{:016x}", fnv1a(onnx_bytes.iter().copied()));
    if !meta.stamp.starts_with(&got) {
        return Err(Error::format(
            &model_path,
            0,
            format!(
                "hash {got} does not match {META_FILE} ({}): the files come from different saves",
                meta.stamp
            ),
        ));
    }
    let o = OnnxExtractor::from_bytes(&model_path, onnx_bytes, meta.params)?;
    if o.width() != meta.width || o.input != meta.input {
        return Err(bad(format!(
            "records width {} and input {:?}, but the model gives {} and {:?}",
            meta.width,
            meta.input,
            o.width(),
            o.input
        )));
    }
    Ok(Extractor::Onnx(o))
}

/// An ONNX extractor's stamp: the hash of its model file, then its parameters.
fn onnx_stamp(o: &OnnxExtractor) -> String {
    let params = serde_json::to_string(&o.params).unwrap_or_default();
    format!(
        "{:016x}-{:016x}",
        fnv1a(o.model_bytes().iter().copied()),
        fnv1a(params.bytes())
    )
}

/// 64-bit FNV-1a.
pub(crate) fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A 64-bit FNV-1a hash of the extractor's tensors: the stamp shared by its two files.
fn fingerprint(p: &PatchExtractor) -> u64 {
    fnv1a(
        p.atoms
            .iter()
            .chain(p.whiten.iter())
            .chain(p.feature_mean.iter())
            .chain(p.feature_std.iter())
            .flat_map(|v| v.to_le_bytes()),
    )
}

/// Fits a patch extractor on the first `fit_images` training images of `data`, at
/// `side`×`side`; with a line saying what it fitted on, and how long it took.
pub fn fit_patches(
    params: &PatchParams,
    data: &crate::dataset::DataSpec,
    side: usize,
) -> Result<(Extractor, String)> {
    let t = std::time::Instant::now();
    let per = crate::dataset::image_bytes(side);
    // Only the fitting images are resized: a file past them is not touched.
    let (files, _) = crate::dataset::load_split_first(
        data,
        crate::dataset::Split::Train,
        side,
        params.fit_images,
    )?;
    let mut pixels = Vec::new();
    for f in &files {
        let want = params.fit_images * per;
        let room = want.saturating_sub(pixels.len());
        pixels.extend_from_slice(&f.pixels[..room.min(f.pixels.len())]);
    }
    let e = Extractor::Patches(PatchExtractor::fit(params, &pixels, side)?);
    let note = format!(
        "extractor fitted on {} images of {side}x{side} in {:.1} s: {}",
        pixels.len() / per,
        t.elapsed().as_secs_f64(),
        e.describe()
    );
    Ok((e, note))
}
