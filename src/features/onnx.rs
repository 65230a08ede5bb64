//! `--extractor onnx:FILE`: a user's pretrained backbone (e.g. ResNet50) as the extractor.
//!
//! The model runs in tract, a pure-Rust ONNX runtime (no native library to install or
//! download). Each 32×32 image is
//!
//! 1. resized to the model's input size by bilinear interpolation with half-pixel centres
//!    (ONNX `Resize`, `mode = linear`, `coordinate_transformation_mode = half_pixel`, no
//!    antialiasing; PyTorch's `interpolate(mode="bilinear", align_corners=False)`),
//! 2. scaled to [0, 1] and normalised per channel, `(x − mean) / std` (ImageNet's by
//!    default, as torchvision's models expect),
//! 3. laid out as the model's input says: `[N, 3, H, W]` (channels first, ONNX's
//!    convention) or `[N, H, W, 3]` (channels last, as TensorFlow exports),
//!
//! then the model runs up to the chosen node (`node`: a node's name or a tensor's name;
//! default the model's first output), and that output is the feature vector: as it is
//! when it is `[N, D]`, averaged over its axes from 2 on (global average pooling of a
//! channels-first feature map) when it has more.
//!
//! A model with a fixed batch dimension is run on batches of that many images, one with a
//! symbolic batch on `batch` images (the last batch padded); a model whose height and
//! width are symbolic is fed `size`×`size` images. The extractor is saved as the model
//! file itself (`model.onnx`) and `extractor.json` (parameters, input layout, width and a
//! hash of the model file, so a torn or swapped save is caught).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ndarray::{Array2, Array4, Axis};
use serde::{Deserialize, Serialize};
use tract_onnx::pb;
use tract_onnx::prelude::{
    tvec, Datum, Framework, InferenceFact, InferenceModelExt, IntoTValue, Tensor, TypedModel,
    TypedSimplePlan,
};

use crate::error::{Error, Result};
use crate::transforms::pixels::Resize;

/// Side of the stream's images.
const SIDE: usize = crate::dataset::SIDE;
/// ImageNet's channel means, what torchvision's pretrained models expect.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet's channel deviations.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Three numbers, `a,b,c`.
fn parse_triple(s: &str) -> std::result::Result<[f32; 3], String> {
    let v: Vec<f32> = s
        .split(',')
        .map(|p| p.trim().parse::<f32>().map_err(|e| e.to_string()))
        .collect::<std::result::Result<_, _>>()?;
    <[f32; 3]>::try_from(v.as_slice()).map_err(|_| format!("{} numbers, not 3", v.len()))
}

/// Parameters of an [`OnnxExtractor`]. Missing fields take their defaults; unknown ones
/// are an error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OnnxParams {
    /// The node (or tensor) whose output are the features; `None`: the model's first
    /// output.
    pub node: Option<String>,
    /// Per-channel mean (RGB) subtracted after scaling to [0, 1]. Default: the model's
    /// own (`image_mean` in its metadata, as `cifar-df export-model` writes), else
    /// ImageNet's `[0.485, 0.456, 0.406]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean: Option<[f32; 3]>,
    /// Per-channel standard deviation (RGB) divided by. Default: the model's own
    /// (`image_std`), else ImageNet's `[0.229, 0.224, 0.225]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub std: Option<[f32; 3]>,
    /// Side images are resized to when the model's input height and width are not
    /// fixed. Default 224.
    pub size: usize,
    /// Images per run when the model's batch dimension is not fixed. Default 1: the
    /// fastest on a ResNet-18-shaped model here (23 images/s at 1, 19 at 8, 14 at 16,
    /// 11 at 32; `benches/onnx_resnet.py`), the activations of one image staying in cache.
    pub batch: usize,
}

impl Default for OnnxParams {
    fn default() -> Self {
        OnnxParams {
            node: None,
            mean: None,
            std: None,
            size: 224,
            batch: 1,
        }
    }
}

impl OnnxParams {
    /// Checks the values: finite means, finite positive standard deviations, `size` and
    /// `batch` at least 1 (and `size` at most 4096).
    pub fn validate(&self) -> Result<()> {
        if self.mean.iter().flatten().any(|m| !m.is_finite()) {
            return Err(Error::usage(format!(
                "onnx: mean must be finite, not {:?}",
                self.mean.unwrap_or_default()
            )));
        }
        if self
            .std
            .iter()
            .flatten()
            .any(|s| !(s.is_finite() && *s > 0.0))
        {
            return Err(Error::usage(format!(
                "onnx: std must be finite and > 0, not {:?}",
                self.std.unwrap_or_default()
            )));
        }
        if !(1..=4096).contains(&self.size) {
            return Err(Error::usage(format!(
                "onnx: size must be in 1..=4096, not {}",
                self.size
            )));
        }
        if self.batch == 0 {
            return Err(Error::usage("onnx: batch must be at least 1"));
        }
        Ok(())
    }
}

/// How images are fed to the model: the input tensor's name, layout and shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputLayout {
    /// The graph input's name.
    pub name: String,
    /// `[N, H, W, 3]` rather than `[N, 3, H, W]`.
    pub channels_last: bool,
    /// Images per run.
    pub batch: usize,
    /// Height and width images are resized to.
    pub height: usize,
    /// See `height`.
    pub width: usize,
}

/// A pretrained ONNX model applied to images; see the module documentation.
#[derive(Clone)]
pub struct OnnxExtractor {
    /// Parameters (checked).
    pub params: OnnxParams,
    /// The per-channel mean in effect (the parameters', else the model's, else
    /// ImageNet's).
    pub mean: [f32; 3],
    /// The per-channel deviation in effect.
    pub std: [f32; 3],
    /// The input the images are fed to.
    pub input: InputLayout,
    /// The model file's bytes, saved with the extractor.
    bytes: Arc<Vec<u8>>,
    /// Where the model was read from (for messages).
    path: PathBuf,
    /// Width of the features.
    width: usize,
    /// The optimised plan, from the input to the chosen output.
    plan: Arc<TypedSimplePlan<TypedModel>>,
}

impl fmt::Debug for OnnxExtractor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OnnxExtractor")
            .field("path", &self.path)
            .field("params", &self.params)
            .field("mean", &self.mean)
            .field("std", &self.std)
            .field("input", &self.input)
            .field("width", &self.width)
            .finish_non_exhaustive()
    }
}

/// One batch for a worker: the index of its first image, its pixels, where its features go.
type Job<'a> = (usize, &'a [u8], ndarray::ArrayViewMut2<'a, f32>);

/// ONNX's element type code of float32.
const FLOAT: i32 = 1;

impl OnnxExtractor {
    /// Reads the ONNX model at `path` and prepares it for `params`. A file that does not
    /// load, a node that does not exist, a model whose input is not a float image batch
    /// (`[N, 3, H, W]` or `[N, H, W, 3]`) or whose chosen output is not `[N, …]` is an
    /// error naming the file.
    pub fn open(path: &Path, params: OnnxParams) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(path, bytes, params)
    }

    /// [`open`](Self::open) on a model file's bytes; `path` names it in errors.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>, params: OnnxParams) -> Result<Self> {
        params.validate()?;
        let bad = |reason: String| Error::format(path, 0, reason);
        let onnx = tract_onnx::onnx();
        let proto = onnx
            .proto_model_for_read(&mut bytes.as_slice())
            .map_err(|e| bad(format!("not an ONNX model: {e:#}")))?;
        let graph = proto
            .graph
            .as_ref()
            .ok_or_else(|| bad("not an ONNX model: it has no graph".into()))?;
        if graph
            .initializer
            .iter()
            .any(|t| t.data_location == Some(1) || !t.external_data.is_empty())
        {
            return Err(bad(
                "keeps its weights in external data files; save it as one file \
                 (onnx.save(model, path, save_as_external_data=False))"
                    .into(),
            ));
        }
        let input = input_layout(graph, &params).map_err(bad)?;
        let meta = |key: &str| {
            let entry = proto.metadata_props.iter().find(|e| e.key == key)?;
            Some(
                parse_triple(&entry.value)
                    .map_err(|e| bad(format!("its metadata {key} = {:?}: {e}", entry.value))),
            )
        };
        let mean = match params.mean {
            Some(m) => m,
            None => meta(crate::model::cnn::onnx::META_MEAN)
                .transpose()?
                .unwrap_or(IMAGENET_MEAN),
        };
        let std = match params.std {
            Some(s) => s,
            None => meta(crate::model::cnn::onnx::META_STD)
                .transpose()?
                .unwrap_or(IMAGENET_STD),
        };
        if std.iter().any(|s| !(s.is_finite() && *s > 0.0)) || mean.iter().any(|m| !m.is_finite()) {
            return Err(bad(format!(
                "its metadata asks for mean {mean:?} and std {std:?}; std must be > 0"
            )));
        }
        let output = match &params.node {
            None => graph
                .output
                .first()
                .map(|o| o.name.clone())
                .ok_or_else(|| bad("the model has no output".into()))?,
            Some(node) => resolve_node(graph, node).map_err(bad)?,
        };

        let mut model = onnx
            .model_for_proto_model(&proto)
            .map_err(|e| bad(format!("tract cannot load the model: {e:#}")))?;
        let shape = if input.channels_last {
            [input.batch, input.height, input.width, 3]
        } else {
            [input.batch, 3, input.height, input.width]
        };
        model
            .set_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), shape))
            .map_err(|e| bad(format!("cannot set the input shape {shape:?}: {e:#}")))?;
        model
            .set_output_names([output.as_str()])
            .map_err(|e| bad(format!("cannot take the output of {output:?}: {e:#}")))?;
        let typed = model
            .into_optimized()
            .map_err(|e| bad(format!("tract cannot run the model on {shape:?}: {e:#}")))?;
        let fact = typed
            .output_fact(0)
            .map_err(|e| bad(format!("output {output:?}: {e:#}")))?
            .clone();
        let dims: Option<Vec<usize>> = fact.shape.as_concrete().map(<[usize]>::to_vec);
        let width = match dims.as_deref() {
            Some([b, rest @ ..]) if *b == input.batch && !rest.is_empty() => rest[0],
            _ => {
                return Err(bad(format!(
                    "the output of {output:?} has shape {:?} for an input of {shape:?}; \
                     features need [{}, D, …]",
                    fact.shape, input.batch
                )))
            }
        };
        if width == 0 || fact.datum_type != f32::datum_type() {
            return Err(bad(format!(
                "the output of {output:?} is {:?} {:?}; features need float32 [N, D ≥ 1, …]",
                fact.datum_type, fact.shape
            )));
        }
        let plan = typed
            .into_runnable()
            .map_err(|e| bad(format!("tract cannot plan the model: {e:#}")))?;
        Ok(OnnxExtractor {
            params,
            mean,
            std,
            input,
            bytes: Arc::new(bytes),
            path: path.to_path_buf(),
            width,
            plan: Arc::new(plan),
        })
    }

    /// Width of the features.
    pub fn width(&self) -> usize {
        self.width
    }

    /// The model file's bytes.
    pub fn model_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Where the model was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Features of whole 32×32 images (`IMAGE_BYTES` each, CIFAR layout): n × width.
    pub fn encode(&self, pixels: &[u8]) -> Result<Array2<f32>> {
        self.encode_sized(pixels, SIDE)
    }

    /// Features of whole `side`×`side` images (CIFAR layout, resized to the model's
    /// input): n × width.
    pub fn encode_sized(&self, pixels: &[u8], side: usize) -> Result<Array2<f32>> {
        let per = crate::dataset::image_bytes(side);
        if per == 0 || !pixels.len().is_multiple_of(per) {
            return Err(Error::usage(format!(
                "onnx: {} bytes are not whole images of {per} ({side}x{side})",
                pixels.len()
            )));
        }
        let n = pixels.len() / per;
        let mut out = Array2::zeros((n, self.width));
        let b = self.input.batch;
        let resize = Resize::new(side, self.input.height, self.input.width)?;
        // tract runs a plan on one thread; batches go to `threads()` workers, each taking
        // every k-th batch (the plan is shared: each run has its own state).
        let workers = crate::linalg::threads().clamp(1, n.div_ceil(b).max(1));
        let mut shares: Vec<Vec<Job>> = (0..workers).map(|_| Vec::new()).collect();
        for (i, (chunk, dst)) in pixels
            .chunks(b * per)
            .zip(out.axis_chunks_iter_mut(Axis(0), b))
            .enumerate()
        {
            shares[i % workers].push((i * b, chunk, dst));
        }
        let results: Vec<Result<()>> = std::thread::scope(|scope| {
            let handles: Vec<_> = shares
                .into_iter()
                .map(|share| {
                    let resize = &resize;
                    scope.spawn(move || {
                        for (first, chunk, dst) in share {
                            self.encode_batch(chunk, dst, resize)
                                .map_err(|e| self.at_image(e, first))?;
                        }
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::usage("onnx: a worker thread panicked".to_string()))
                    })
                })
                .collect()
        });
        results.into_iter().collect::<Result<Vec<()>>>()?;
        Ok(out)
    }

    /// Runs one batch (at most `input.batch` images) into `dst`.
    fn encode_batch(
        &self,
        chunk: &[u8],
        mut dst: ndarray::ArrayViewMut2<f32>,
        resize: &Resize,
    ) -> Result<()> {
        let b = self.input.batch;
        let x = self.preprocess(chunk, resize)?;
        let result = self
            .plan
            .run(tvec!(Tensor::from(x).into_tvalue()))
            .map_err(|e| Error::format(&self.path, 0, format!("the model failed to run: {e:#}")))?;
        let y = result[0]
            .to_array_view::<f32>()
            .map_err(|e| Error::format(&self.path, 0, format!("unexpected output: {e:#}")))?;
        let m = chunk.len() / resize.src_len();
        let positions = y.len() / (b * self.width);
        let y = y
            .into_shape_with_order((b, self.width, positions))
            .map_err(|e| Error::format(&self.path, 0, format!("unexpected output: {e}")))?;
        // Global average pooling over the spatial positions (one when [N, D]).
        for (mut row, feats) in dst.rows_mut().into_iter().zip(y.outer_iter()).take(m) {
            let inv = 1.0 / feats.ncols() as f64;
            for (o, f) in row.iter_mut().zip(feats.outer_iter()) {
                *o = (f.iter().map(|&v| f64::from(v)).sum::<f64>() * inv) as f32;
            }
        }
        if let Some(r) = dst
            .rows()
            .into_iter()
            .position(|r| r.iter().any(|v| !v.is_finite()))
        {
            return Err(Error::usage(format!(
                "onnx: the model gave non-finite features for image {r} of the batch"
            )));
        }
        Ok(())
    }

    /// `e` about the batch of images from `first` on.
    fn at_image(&self, e: Error, first: usize) -> Error {
        Error::usage(format!("onnx: images {first}..: {e}"))
    }

    /// One batch of images as the model's input tensor (zero-padded to the batch size).
    fn preprocess(&self, chunk: &[u8], resize: &Resize) -> Result<Array4<f32>> {
        let (h, w) = (self.input.height, self.input.width);
        let b = self.input.batch;
        let mut x = if self.input.channels_last {
            Array4::zeros((b, h, w, 3))
        } else {
            Array4::zeros((b, 3, h, w))
        };
        let mut img = vec![0f32; resize.src_len()];
        let mut planes = vec![0f32; resize.out_len()];
        let mut scratch = Vec::new();
        for (i, px) in chunk.chunks_exact(resize.src_len()).enumerate() {
            for (d, &p) in img.iter_mut().zip(px) {
                *d = f32::from(p);
            }
            resize.apply_with(&img, &mut planes, &mut scratch)?;
            for (c, plane) in planes.chunks_exact(h * w).enumerate() {
                let (scale, shift) = (1.0 / (255.0 * self.std[c]), self.mean[c] / self.std[c]);
                if self.input.channels_last {
                    for (j, &v) in plane.iter().enumerate() {
                        x[[i, j / w, j % w, c]] = v * scale - shift;
                    }
                } else {
                    let dst = x.slice_mut(ndarray::s![i, c, .., ..]);
                    for (d, &v) in dst.into_iter().zip(plane) {
                        *d = v * scale - shift;
                    }
                }
            }
        }
        Ok(x)
    }
}

/// The graph inputs that are not initialisers (older exports list the weights too).
fn real_inputs(graph: &pb::GraphProto) -> Vec<&pb::ValueInfoProto> {
    let weights: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    graph
        .input
        .iter()
        .filter(|i| !weights.contains(i.name.as_str()))
        .collect()
}

/// The model's one input, which must be a float image batch.
fn input_layout(
    graph: &pb::GraphProto,
    params: &OnnxParams,
) -> std::result::Result<InputLayout, String> {
    let inputs = real_inputs(graph);
    let [input] = inputs.as_slice() else {
        let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
        return Err(format!(
            "has {} inputs {names:?}; an image model has one, [N, 3, H, W]",
            names.len()
        ));
    };
    let Some(pb::type_proto::Value::TensorType(t)) =
        input.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return Err(format!("input {:?} is not a tensor", input.name));
    };
    use pb::tensor_shape_proto::dimension::Value as Dim;
    let dims: Vec<Option<usize>> = t
        .shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match d.value {
                    Some(Dim::DimValue(v)) if v > 0 => usize::try_from(v).ok(),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let show: Vec<String> = dims
        .iter()
        .map(|d| d.map_or_else(|| "?".to_string(), |v| v.to_string()))
        .collect();
    let not_image = || {
        format!(
            "input {:?} has shape [{}]; expected an image batch, [N, 3, H, W] or [N, H, W, 3]",
            input.name,
            show.join(", ")
        )
    };
    if dims.len() != 4 {
        return Err(not_image());
    }
    let channels_last = match (dims[1], dims[3]) {
        (Some(3), _) => false,
        (_, Some(3)) => true,
        _ => return Err(not_image()),
    };
    if t.elem_type != FLOAT {
        return Err(format!(
            "input {:?} has element type {} (ONNX code); cifar-df feeds float32 images",
            input.name, t.elem_type
        ));
    }
    let (h, w) = if channels_last {
        (dims[1], dims[2])
    } else {
        (dims[2], dims[3])
    };
    let (height, width) = match (h, w) {
        (Some(h), Some(w)) if h <= 4096 && w <= 4096 => (h, w),
        (None, None) => (params.size, params.size),
        _ => return Err(not_image()),
    };
    Ok(InputLayout {
        name: input.name.clone(),
        channels_last,
        batch: dims[0].unwrap_or(params.batch),
        height,
        width,
    })
}

/// The tensor a `--node` names: a node's first output, or a tensor of the graph by name.
fn resolve_node(graph: &pb::GraphProto, node: &str) -> std::result::Result<String, String> {
    if let Some(n) = graph.node.iter().find(|n| n.name == node) {
        return n
            .output
            .first()
            .cloned()
            .ok_or_else(|| format!("node {node:?} has no output"));
    }
    if graph
        .node
        .iter()
        .any(|n| n.output.iter().any(|o| o == node))
    {
        return Ok(node.to_string());
    }
    let names: Vec<&str> = graph.node.iter().map(|n| n.name.as_str()).collect();
    let shown = names.len().min(12);
    Err(format!(
        "has no node or tensor {node:?}; its {} nodes include {:?}{}",
        names.len(),
        &names[..shown],
        if names.len() > shown { ", …" } else { "" }
    ))
}
