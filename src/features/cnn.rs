//! `--extractor run:NAME`: the CNN a run learnt from the stream, as a feature extractor
//! (the original's transfer learning, with a network of our own).
//!
//! The features of an image are the network's pooled last layer (the input of its
//! linear head: the last block's width), computed with the BatchNorm running statistics
//! from the image normalised as the CNN's SQL normalises it (CIFAR-10's channel means
//! and deviations). The extractor is the run's checkpoint (the latest, or a named one)
//! frozen: saved into a feature cache's `extractor/` folder like the other kinds, its
//! stamp a hash of its tensors.

use std::path::Path;

use ndarray::Array2;

use crate::error::{Error, Result};
use crate::model::cnn::net::{Arch, Net, CHANNELS, WHITEN_TENSOR};
use crate::model::cnn::{Cnn, CnnParams, MEAN, STD};

/// The prefix of a run's CNN in `--extractor run:NAME`.
pub const RUN_PREFIX: &str = "run:";

/// A trained network used for its features.
#[derive(Clone, Debug)]
pub struct CnnExtractor {
    /// The hyper-parameters the network was trained with.
    pub params: CnnParams,
    /// The network.
    pub net: Net,
    /// Where it came from (a run's checkpoint), for the record.
    pub source: String,
    /// The kernel its products use: the run's, or f32 on a CPU without it.
    pub kernel: crate::model::cnn::Kernel,
}

impl CnnExtractor {
    /// The network saved in checkpoint folder `dir`, named `name`, of the run folder
    /// `run` (the run's side finds the folder: [`crate::run::extractor`]). A model that
    /// is not a CNN, or one that has not learnt yet, is an error naming the run.
    pub fn from_run_checkpoint(run: &Path, dir: &Path, name: &str) -> Result<Self> {
        let model = crate::model::load(dir)?;
        if model.name() != crate::model::cnn::NAME {
            return Err(Error::usage(format!(
                "--extractor {RUN_PREFIX}{}: the run's model is {:?}, not a CNN (train one \
                 with --model cnn)",
                run.display(),
                model.name()
            )));
        }
        let cnn = Cnn::load(dir)?;
        let Some(net) = cnn.net().cloned() else {
            return Err(Error::usage(format!(
                "--extractor {RUN_PREFIX}{}: checkpoint {name} holds a CNN that has not learnt \
                 anything yet",
                run.display(),
            )));
        };
        Ok(CnnExtractor {
            params: cnn.params().clone(),
            kernel: cnn.scoring_kernel(),
            net,
            source: format!("{}@{name}", run.display()),
        })
    }

    /// Width of the features (the last block's channels).
    pub fn width(&self) -> usize {
        self.net.arch.feature_width()
    }

    /// The network's shape.
    pub fn arch(&self) -> &Arch {
        &self.net.arch
    }

    /// The side of the images its network learnt from.
    pub fn side(&self) -> usize {
        self.net.arch.side
    }

    /// Features of whole images (`3·side²` bytes each, CIFAR layout).
    pub fn encode(&self, pixels: &[u8]) -> Result<Array2<f32>> {
        let side = self.side();
        let per = side * side * CHANNELS;
        let n = pixels.len() / per;
        let w = self.width();
        let mut out = Array2::<f32>::zeros((n, w));
        const CHUNK: usize = 256;
        for start in (0..n).step_by(CHUNK) {
            let end = (start + CHUNK).min(n);
            let x = nhwc(&pixels[start * per..end * per], side);
            let mut feats = Vec::new();
            self.net
                .forward_score(&x, end - start, Some(&mut feats), self.kernel);
            let v = ndarray::ArrayView2::from_shape((end - start, w), &feats)
                .map_err(|e| Error::internal(format!("cnn extractor: {e}")))?;
            out.slice_mut(ndarray::s![start..end, ..]).assign(&v);
        }
        Ok(out)
    }

    /// Multiply-adds per image.
    pub fn macs_per_image(&self) -> u64 {
        self.net.arch.macs_per_image() as u64
    }
}

/// Normalised NHWC floats of `side`×`side` images in the CIFAR layout.
fn nhwc(pixels: &[u8], side: usize) -> Vec<f32> {
    let plane = side * side;
    let per = plane * CHANNELS;
    let mut out = vec![0.0f32; pixels.len()];
    for (dst, img) in out.chunks_exact_mut(per).zip(pixels.chunks_exact(per)) {
        for p in 0..plane {
            for c in 0..CHANNELS {
                dst[p * CHANNELS + c] = (f32::from(img[c * plane + p]) / 255.0 - MEAN[c]) / STD[c];
            }
        }
    }
    out
}

/// What `extractor.json` of a CNN extractor holds besides the kind and stamp.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CnnMeta {
    pub params: CnnParams,
    pub width: usize,
    pub source: String,
}

impl CnnExtractor {
    /// The tensors an extractor folder holds: the whitening weights, the parameters and
    /// the running statistics.
    pub(crate) fn tensors(&self) -> crate::model::TensorsOut<'static> {
        let mut t = crate::model::TensorsOut::default();
        t.f32(
            WHITEN_TENSOR,
            &[self.net.whiten.len()],
            self.net.whiten.iter(),
        );
        self.net.put_tensors(&mut t, "");
        t
    }

    /// The extractor of a folder's checked tensors and metadata.
    pub(crate) fn from_checkpoint(ck: &crate::model::Checkpoint, meta: CnnMeta) -> Result<Self> {
        meta.params
            .check()
            .map_err(|e| ck.bad_meta(format!("invalid network parameters: {e}")))?;
        let arch = meta.params.arch();
        if meta.width != arch.feature_width() {
            return Err(ck.bad_meta(format!(
                "width {} does not match the network ({})",
                meta.width,
                arch.feature_width()
            )));
        }
        let mut names = vec![WHITEN_TENSOR.to_string()];
        names.extend(Net::tensor_names(&arch, ""));
        ck.expect_names(&names)?;
        let whiten = Net::read_whiten(ck, &arch)?;
        // bf16 where the network learnt in bf16 and this CPU has it; f32 otherwise (and
        // for folders written before the precision was recorded).
        let kernel = match meta.params.precision {
            crate::model::cnn::Precision::Bf16 => {
                crate::model::cnn::Kernel::best_bf16().unwrap_or(crate::model::cnn::Kernel::F32)
            }
            _ => crate::model::cnn::Kernel::F32,
        };
        Ok(CnnExtractor {
            kernel,
            params: meta.params,
            net: Net::read_tensors(ck, &arch, &whiten, "")?,
            source: meta.source,
        })
    }

    /// A hash of the tensors: the stamp shared by the folder's two files.
    pub fn fingerprint(&self) -> u64 {
        super::fnv1a(
            self.net
                .whiten
                .iter()
                .chain(self.net.params.iter().flatten())
                .chain(self.net.running_mean.iter().flatten())
                .chain(self.net.running_var.iter().flatten())
                .flat_map(|v| v.to_le_bytes()),
        )
    }
}
