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
//! [`udf`] binds an extractor to a DataFusion function so the streaming SQL computes
//! features; [`cache`] writes features of a whole dataset to Parquet (the original's
//! cached ResNet50 features) for `--source features:DIR`.

use std::path::Path;

use ndarray::{Array1, Array2};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{self, Checkpoint, TensorsOut};

pub mod cache;
pub mod patches;
pub mod udf;

pub use patches::{PatchExtractor, PatchParams};

/// The tensors file of an extractor folder.
pub const TENSORS_FILE: &str = "extractor.safetensors";
/// The metadata file of an extractor folder.
pub const META_FILE: &str = "extractor.json";

/// A fitted feature extractor.
#[derive(Clone, Debug)]
pub enum Extractor {
    /// Patches learnt from the images ([`patches`]).
    Patches(PatchExtractor),
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
        }
    }

    /// Width of the features.
    pub fn width(&self) -> usize {
        match self {
            Extractor::Patches(p) => p.width(),
        }
    }

    /// Features of whole images (`IMAGE_BYTES` each, CIFAR layout): n × [`width`](Self::width).
    pub fn encode(&self, pixels: &[u8]) -> Result<Array2<f32>> {
        match self {
            Extractor::Patches(p) => p.encode(pixels),
        }
    }

    /// The permutation taking an image's features to its mirror image's, where the
    /// extractor has one (feature `i` of the flipped image is feature `perm[i]`).
    pub fn flip_permutation(&self) -> Option<Vec<usize>> {
        match self {
            Extractor::Patches(p) => Some(p.flip_permutation()),
        }
    }

    /// Whether the features do not change when the image is mirrored.
    pub fn flip_invariant(&self) -> bool {
        match self {
            Extractor::Patches(p) => p.params.invariant,
        }
    }

    /// Multiply-adds per image of the main product, for GFLOP/s figures.
    pub fn macs_per_image(&self) -> u64 {
        match self {
            Extractor::Patches(p) => p.macs_per_image(),
        }
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

/// A 64-bit FNV-1a hash of the extractor's tensors: the stamp shared by its two files.
fn fingerprint(p: &PatchExtractor) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in p
        .atoms
        .iter()
        .chain(p.whiten.iter())
        .chain(p.feature_mean.iter())
        .chain(p.feature_std.iter())
    {
        for b in v.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}
