//! `cifar-df export-model`: a trained CNN as an ONNX model that onnxruntime, PyTorch's
//! `onnx2torch`, or cifar-df's own `--extractor onnx:` runs.
//!
//! The graph takes `image`, `[N, 3, 32, 32]` float32 RGB in [0, 1] (channels first, as
//! torchvision's `ToTensor` gives), normalises it as `sql/cnn.sql` does, and runs the
//! network with its BatchNorm running statistics. It has three outputs:
//!
//! - `logits` `[N, classes]`: the network's logits of the image as it is;
//! - `probabilities` `[N, classes]`: the class probabilities as cifar-df scores them,
//!   with the run's test-time augmentation (`tta_translate`: the logits averaged with
//!   those of the image moved one pixel up-left and down-right, weighted 1/2, 1/4, 1/4;
//!   `flip_test`: the softmax of that averaged with the mirror image's);
//! - `features` `[N, width]`: the pooled last layer, the input of the linear head (what
//!   `--extractor run:NAME` computes).
//!
//! The augmented copies run in a second pass of the network, so a runtime that only
//! computes what an output needs (onnxruntime, tract) runs one pass for `logits` or
//! `features`. Opset 13; GELU as `0.5·z·(1 + erf(z/√2))`. The model's `metadata_props`
//! say how to feed it: `image_mean` and `image_std` are `0,0,0` and `1,1,1` (the
//! normalisation is inside), which `--extractor onnx:` reads.

use prost::Message;
use tract_onnx::pb;

use super::net::{Net, CHANNELS, WHITEN_K, WHITEN_WIDTH};
use super::{MEAN, STD};

/// The opset the graph is written for.
pub const OPSET: i64 = 13;
/// The graph's input.
pub const INPUT: &str = "image";
/// The metadata key of the per-channel mean `--extractor onnx:` subtracts after scaling
/// pixels to [0, 1].
pub const META_MEAN: &str = "image_mean";
/// The metadata key of the per-channel deviation `--extractor onnx:` divides by.
pub const META_STD: &str = "image_std";

/// The test-time augmentation folded into the `probabilities` output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tta {
    /// Average with the mirror image (`flip_test`).
    pub flip: bool,
    /// Average with one-pixel translations (`tta_translate`).
    pub translate: bool,
}

/// A graph under construction.
#[derive(Default)]
struct Graph {
    nodes: Vec<pb::NodeProto>,
    inits: Vec<pb::TensorProto>,
    next: usize,
}

fn attr_int(name: &str, i: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}

fn attr_ints(name: &str, ints: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: ints.to_vec(),
        ..Default::default()
    }
}

fn attr_float(name: &str, f: f32) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Float as i32,
        f,
        ..Default::default()
    }
}

impl Graph {
    /// Adds a node of `op` on `inputs`; returns its output's name (`out` when given).
    fn op(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<pb::AttributeProto>,
        out: Option<&str>,
    ) -> String {
        self.next += 1;
        let name = out.map_or_else(|| format!("t{}", self.next), str::to_string);
        self.nodes.push(pb::NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![name.clone()],
            name: format!("{op}_{}", self.next),
            op_type: op.into(),
            attribute: attrs,
            ..Default::default()
        });
        name
    }

    /// Adds an initialiser of `data_type` whose little-endian bytes are `raw`.
    fn init(
        &mut self,
        name: &str,
        dims: &[usize],
        data_type: pb::tensor_proto::DataType,
        raw: Vec<u8>,
    ) -> String {
        self.inits.push(pb::TensorProto {
            name: name.into(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: data_type as i32,
            raw_data: raw,
            ..Default::default()
        });
        name.into()
    }

    /// Adds a float32 initialiser.
    fn f32s(&mut self, name: &str, dims: &[usize], data: &[f32]) -> String {
        debug_assert_eq!(dims.iter().product::<usize>(), data.len());
        let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.init(name, dims, pb::tensor_proto::DataType::Float, raw)
    }

    /// Adds an int64 initialiser.
    fn i64s(&mut self, name: &str, dims: &[usize], data: &[i64]) -> String {
        let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.init(name, dims, pb::tensor_proto::DataType::Int64, raw)
    }

    /// Whether an initialiser of that name was added.
    fn has(&self, name: &str) -> bool {
        self.inits.iter().any(|t| t.name == name)
    }

    /// `0.5·z·(1 + erf(z/√2))`.
    fn gelu(&mut self, z: &str) -> String {
        let s = self.scalar("gelu.rsqrt2", std::f32::consts::FRAC_1_SQRT_2);
        let one = self.scalar("gelu.one", 1.0);
        let half = self.scalar("gelu.half", 0.5);
        let t = self.op("Mul", &[z, &s], vec![], None);
        let e = self.op("Erf", &[&t], vec![], None);
        let p = self.op("Add", &[&e, &one], vec![], None);
        let h = self.op("Mul", &[z, &half], vec![], None);
        self.op("Mul", &[&h, &p], vec![], None)
    }

    /// A scalar float initialiser, added once.
    fn scalar(&mut self, name: &str, v: f32) -> String {
        if !self.has(name) {
            self.f32s(name, &[], &[v]);
        }
        name.into()
    }
}

/// A convolution's weights from cifar-df's layout (`[(ky, kx, ci), co]`, the im2col
/// matrix's) to ONNX's `[co, ci, ky, kx]`.
fn oihw(w: &[f32], k: usize, ci: usize, co: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; w.len()];
    for ky in 0..k {
        for kx in 0..k {
            for c in 0..ci {
                for o in 0..co {
                    out[((o * ci + c) * k + ky) * k + kx] = w[((ky * k + kx) * ci + c) * co + o];
                }
            }
        }
    }
    out
}

/// Adds the network's weights and BatchNorm statistics as initialisers, under the names
/// [`network`] uses.
fn weights(g: &mut Graph, net: &Net) {
    let arch = &net.arch;
    let w = oihw(&net.whiten, WHITEN_K, CHANNELS, WHITEN_WIDTH);
    g.f32s(
        "whiten.weight",
        &[WHITEN_WIDTH, CHANNELS, WHITEN_K, WHITEN_K],
        &w,
    );
    g.f32s("whiten.bias", &[WHITEN_WIDTH], &net.params[0]);
    for (i, s) in arch.conv_shapes(1).iter().enumerate() {
        let w = oihw(&net.params[net.conv_index(i)], s.k, s.ci, s.co);
        g.f32s(&format!("conv{i}.weight"), &[s.co, s.ci, s.k, s.k], &w);
        g.f32s(&format!("norm{i}.scale"), &[s.co], &vec![1.0; s.co]);
        g.f32s(
            &format!("norm{i}.bias"),
            &[s.co],
            &net.params[net.norm_index(i)],
        );
        g.f32s(&format!("norm{i}.mean"), &[s.co], &net.running_mean[i]);
        g.f32s(&format!("norm{i}.var"), &[s.co], &net.running_var[i]);
    }
    let (fw, k) = (arch.feature_width(), arch.classes);
    g.f32s("head.weight", &[fw, k], &net.params[net.head_index()]);
    g.scalar("head.scale", arch.scale);
}

/// Adds a pass of the network (its [`weights`] already added) over `x`, `[M, 3, 32, 32]`
/// normalised; returns the names of the logits `[M, classes]` and features `[M, width]`.
fn network(g: &mut Graph, net: &Net, x: &str) -> (String, String) {
    let arch = &net.arch;
    let sides = arch.sides();
    let z = g.op(
        "Conv",
        &[x, "whiten.weight", "whiten.bias"],
        vec![attr_ints("kernel_shape", &[WHITEN_K as i64; 2])],
        None,
    );
    let mut a = g.gelu(&z);
    let pool = |p: usize| {
        vec![
            attr_ints("kernel_shape", &[p as i64; 2]),
            attr_ints("strides", &[p as i64; 2]),
        ]
    };
    let norm = |g: &mut Graph, x: &str, i: usize| {
        let inputs = ["scale", "bias", "mean", "var"].map(|t| format!("norm{i}.{t}"));
        let z = g.op(
            "BatchNormalization",
            &[x, &inputs[0], &inputs[1], &inputs[2], &inputs[3]],
            vec![attr_float("epsilon", arch.bn_eps)],
            None,
        );
        g.gelu(&z)
    };
    let conv = |g: &mut Graph, x: &str, i: usize| {
        g.op(
            "Conv",
            &[x, &format!("conv{i}.weight")],
            vec![
                attr_ints("kernel_shape", &[3, 3]),
                attr_ints("pads", &[1; 4]),
            ],
            None,
        )
    };
    for b in 0..arch.widths.len() {
        let c = conv(g, &a, 2 * b);
        let p = g.op("MaxPool", &[&c], pool(2), None);
        let y = norm(g, &p, 2 * b);
        let c2 = conv(g, &y, 2 * b + 1);
        a = norm(g, &c2, 2 * b + 1);
    }
    debug_assert_eq!(*sides.last().unwrap_or(&0), arch.final_pool());
    let p = g.op("MaxPool", &[&a], pool(arch.final_pool()), None);
    let feats = g.op("Flatten", &[&p], vec![attr_int("axis", 1)], None);
    let m = g.op("MatMul", &[&feats, "head.weight"], vec![], None);
    let logits = g.op("Mul", &[&m, "head.scale"], vec![], None);
    (logits, feats)
}

/// Index lists that move an image of `side` pixels by `d` pixels along an axis, the
/// border reflected: output `i` is input `i + d`.
fn shifted(side: usize, d: isize) -> Vec<i64> {
    (0..side as i64)
        .map(|i| crate::transforms::pixels::reflect(i + d as i64, side as i64) as i64)
        .collect()
}

fn output(name: &str, width: usize) -> pb::ValueInfoProto {
    tensor_info(name, &[None, Some(width)])
}

fn tensor_info(name: &str, dims: &[Option<usize>]) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{dimension::Value, Dimension};
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Some(v) => Value::DimValue(*v as i64),
                None => Value::DimParam("N".into()),
            }),
            ..Default::default()
        })
        .collect();
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: pb::tensor_proto::DataType::Float as i32,
                shape: Some(pb::TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The ONNX model (serialised) of `net`, with `tta` folded into `probabilities`;
/// `doc` goes into its `doc_string` (where it came from).
pub fn export(net: &Net, tta: Tta, doc: &str) -> Vec<u8> {
    let mut g = Graph::default();
    let k = net.arch.classes;
    let fw = net.arch.feature_width();
    let side = net.arch.side;
    let mean = g.f32s("input.mean", &[1, CHANNELS, 1, 1], &MEAN);
    let std = g.f32s("input.std", &[1, CHANNELS, 1, 1], &STD);
    let centred = g.op("Sub", &[INPUT, &mean], vec![], None);
    let x = g.op("Div", &[&centred, &std], vec![], None);
    weights(&mut g, net);
    let (logits, feats) = network(&mut g, net, &x);
    g.op("Identity", &[&logits], vec![], Some("logits"));
    g.op("Identity", &[&feats], vec![], Some("features"));

    // The other views, in cifar-df's order: per mirror (none, then flipped), the image,
    // moved up-left, moved down-right.
    let mut mirrors = vec![x.clone()];
    if tta.flip {
        let idx: Vec<i64> = (0..side as i64).rev().collect();
        let flip = g.i64s("tta.flip", &[side], &idx);
        mirrors.push(g.op("Gather", &[&x, &flip], vec![attr_int("axis", 3)], None));
    }
    let mut views = Vec::new();
    let mut weights = Vec::new();
    let shifts: &[isize] = if tta.translate { &[-1, 1] } else { &[] };
    for m in &mirrors {
        views.push(m.clone());
        weights.push(if tta.translate { 0.5f32 } else { 1.0 });
        for &d in shifts {
            let name = if d < 0 { "tta.back" } else { "tta.forward" };
            if !g.has(name) {
                g.i64s(name, &[side], &shifted(side, d));
            }
            let rows = g.op("Gather", &[m, name], vec![attr_int("axis", 2)], None);
            views.push(g.op("Gather", &[&rows, name], vec![attr_int("axis", 3)], None));
            weights.push(0.25);
        }
    }
    if views.len() == 1 {
        g.op(
            "Softmax",
            &[&logits],
            vec![attr_int("axis", 1)],
            Some("probabilities"),
        );
    } else {
        // The views but the first in one more pass, then all logits as [views, N, K].
        let rest: Vec<&str> = views[1..].iter().map(String::as_str).collect();
        let batch = g.op("Concat", &rest, vec![attr_int("axis", 0)], None);
        let (more, _) = network(&mut g, net, &batch);
        let all = g.op("Concat", &[&logits, &more], vec![attr_int("axis", 0)], None);
        let (nm, per) = (mirrors.len(), views.len() / mirrors.len());
        let shape = g.i64s("tta.shape", &[4], &[nm as i64, per as i64, -1, k as i64]);
        let l = g.op("Reshape", &[&all, &shape], vec![], None);
        let w = g.f32s("tta.weights", &[nm, per, 1, 1], &weights);
        let lw = g.op("Mul", &[&l, &w], vec![], None);
        let axis1 = g.i64s("tta.axis1", &[1], &[1]);
        let avg = g.op(
            "ReduceSum",
            &[&lw, &axis1],
            vec![attr_int("keepdims", 0)],
            None,
        );
        let p = g.op("Softmax", &[&avg], vec![attr_int("axis", 2)], None);
        g.op(
            "ReduceMean",
            &[&p],
            vec![attr_ints("axes", &[0]), attr_int("keepdims", 0)],
            Some("probabilities"),
        );
    }

    let graph = pb::GraphProto {
        name: "cifar-df-cnn".into(),
        node: g.nodes,
        initializer: g.inits,
        input: vec![tensor_info(
            INPUT,
            &[None, Some(CHANNELS), Some(side), Some(side)],
        )],
        output: vec![
            output("logits", k),
            output("probabilities", k),
            output("features", fw),
        ],
        ..Default::default()
    };
    let meta = |key: &str, value: String| pb::StringStringEntryProto {
        key: key.into(),
        value,
    };
    let model = pb::ModelProto {
        ir_version: 7,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        producer_name: "cifar-df".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        doc_string: doc.into(),
        graph: Some(graph),
        metadata_props: vec![
            meta(META_MEAN, "0,0,0".into()),
            meta(META_STD, "1,1,1".into()),
            meta(
                "widths",
                net.arch
                    .widths
                    .iter()
                    .map(|w| w.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        ],
        ..Default::default()
    };
    model.encode_to_vec()
}
