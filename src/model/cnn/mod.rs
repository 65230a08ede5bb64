//! `--model cnn`: a convolutional network learnt from the stream, one SGD step per
//! mini-batch of each arriving batch.
//!
//! The network is airbench94's ([`net`]): a 2×2 whitening convolution fitted without
//! labels from the first batch of the stream, three blocks of two 3×3 convolutions with
//! max pooling, BatchNorm and GELU, a linear head. It learns with Nesterov SGD, label
//! smoothing and weight decay in airbench94's decoupled form (the learning rate and the
//! weight decay are per 1,024 images and do not change with the momentum), a warm-up then
//! a linear decay over the planned number of images when it is known, a constant rate
//! after the warm-up when it is not, and Lookahead averaging of the weights when the plan
//! is known. Scoring uses the BatchNorm running statistics and, by default, averages the
//! logits of each image and its mirror image.
//!
//! Inputs are rows of 3,072 floats in the CIFAR order (the 1,024 red values, then green,
//! then blue), normalised by the SQL (`normalize(image)`); the network works on NHWC
//! tensors ([`ops`]).

pub mod amx;
pub mod bf16;
pub mod fma;
pub mod net;
pub mod onnx;
pub mod ops;

pub use self::ops::Kernel;

use std::path::Path;

use ndarray::{Array2, ArrayView1, ArrayView2};

use self::net::{Arch, Grads, Net, Tape, CHANNELS, SIDE};
use super::{check_features, save_checkpoint, Checkpoint, Learner, SplitMix, TensorsOut, CLASSES};
use crate::error::{Error, Result};

/// The model's name.
pub const NAME: &str = "cnn";

/// CIFAR-10's channel means and deviations, as `sql/cnn.sql` normalises.
pub const MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
/// See [`MEAN`].
pub const STD: [f32; 3] = [0.2470, 0.2435, 0.2616];

/// Floats of an input row of 32×32 images (`3·side²` at another side).
pub const INPUT: usize = SIDE * SIDE * CHANNELS;

/// The precision of the network's products (`precision` in `[cnn]`, `--precision`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bf16 where the CPU has a bf16 kernel faster than f32 ([`Kernel::auto`]: AMD's
    /// AVX512-BF16), f32 elsewhere.
    #[default]
    Auto,
    /// bf16 inputs, f32 sums, f32 master weights (PyTorch's CPU autocast): an error on a
    /// CPU without AVX512-BF16.
    Bf16,
    /// f32 throughout.
    F32,
}

impl Precision {
    /// The precision named `s` (`auto`, `bf16`, `f32`).
    pub fn parse(s: &str) -> std::result::Result<Precision, String> {
        match s {
            "auto" => Ok(Precision::Auto),
            "bf16" => Ok(Precision::Bf16),
            "f32" => Ok(Precision::F32),
            other => Err(format!(
                "precision {other:?}: expected \"bf16\", \"f32\" or \"auto\""
            )),
        }
    }

    /// The kernel this precision uses on this CPU; `Bf16` on a CPU without a bf16 kernel
    /// is an error naming the CPU feature it lacks.
    pub fn kernel(self) -> std::result::Result<Kernel, String> {
        match self {
            Precision::F32 => Ok(Kernel::F32),
            Precision::Auto => Ok(Kernel::auto()),
            Precision::Bf16 => Kernel::best_bf16().ok_or_else(|| {
                format!(
                    "precision bf16 needs a CPU with AVX512-BF16 (avx512_bf16 in lscpu's \
                     flags), which this one ({}) lacks: use precision = \"f32\" (or \
                     --precision f32)",
                    cpu_name()
                )
            }),
        }
    }
}

/// The CPU's model name (`/proc/cpuinfo`), or "this CPU".
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "this CPU".into())
}

/// Hyper-parameters of `--model cnn`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CnnParams {
    /// Channels of the three blocks.
    pub widths: Vec<usize>,
    /// Images per SGD step.
    pub batch_size: usize,
    /// Learning rate per 1,024 images, decoupled from the momentum (airbench94: 11.5).
    pub lr: f64,
    /// Nesterov momentum.
    pub momentum: f64,
    /// Weight decay per 1,024 images, decoupled from the learning rate.
    pub weight_decay: f64,
    /// The BatchNorm shifts' learning rate is this many times the others'.
    pub bias_scaler: f64,
    /// Label smoothing of the cross-entropy.
    pub label_smoothing: f32,
    /// The whitening layer's bias learns for this many images, then is frozen
    /// (airbench94: 3 epochs).
    pub whiten_bias_images: u64,
    /// Added to the patch covariance's eigenvalues before the whitening's inverse square
    /// root.
    pub whiten_eps: f64,
    /// BatchNorm's running-statistics momentum (PyTorch's convention).
    pub bn_momentum: f32,
    /// Multiplies the logits.
    pub scale: f32,
    /// Warm-up: the first fraction of the planned images; the rate rises from
    /// `lr_start` to 1 (times `lr`), then falls linearly to `lr_end` at the end of the
    /// plan. Without a plan, the warm-up lasts `warmup_images`, then the rate stays 1.
    pub warmup: f64,
    /// The rate's factor at the start of the warm-up.
    pub lr_start: f64,
    /// The rate's factor at the end of the plan.
    pub lr_end: f64,
    /// The warm-up's length when the stream's length is not known.
    pub warmup_images: u64,
    /// Lookahead: every this many steps the weights are averaged with a slow copy
    /// (airbench94: 5; 0 turns it off). Only with a known plan.
    pub lookahead_every: u64,
    /// Test-time augmentation in scoring (`predict_proba`): the logits of each image are
    /// averaged with those of the image moved one pixel up-left and one pixel
    /// down-right (borders reflected), weighted 1/2, 1/4, 1/4 (airbench94's
    /// translations; the mirror images are `--flip-test`'s).
    pub tta_translate: bool,
    /// The seed of the initial weights.
    pub seed: u64,
    /// Number of classes K: labels are 0..K and the probabilities have K columns. The
    /// trainer sets it from the data's classes; 2 to 1,000. Default 10 (CIFAR-10).
    pub classes: usize,
    /// Side of the input images: the trainer sets it from the run's image size
    /// (`--image-size`); 32 by default. The weights do not depend on it.
    pub side: usize,
    /// The products' precision: `bf16` (bf16 inputs, f32 sums) where the CPU has a bf16
    /// kernel, `f32` elsewhere; a run records the one it used.
    pub precision: Precision,
}

impl Default for CnnParams {
    fn default() -> Self {
        CnnParams {
            classes: CLASSES,
            side: SIDE,
            widths: vec![32, 64, 128],
            batch_size: 256,
            lr: 11.5,
            momentum: 0.85,
            weight_decay: 0.0153,
            bias_scaler: 64.0,
            label_smoothing: 0.2,
            whiten_bias_images: 150_000,
            whiten_eps: 5e-4,
            bn_momentum: 0.4,
            scale: 1.0 / 9.0,
            warmup: 0.23,
            lr_start: 0.2,
            lr_end: 0.07,
            warmup_images: 50_000,
            lookahead_every: 5,
            tta_translate: true,
            seed: 0,
            precision: Precision::Auto,
        }
    }
}

impl CnnParams {
    /// Checks the hyper-parameters and the network's shape.
    pub fn check(&self) -> std::result::Result<(), String> {
        if !(2..=super::MAX_CLASSES).contains(&self.classes) {
            return Err(format!(
                "classes must be between 2 and {}, got {}",
                super::MAX_CLASSES,
                self.classes
            ));
        }
        self.arch().check()?;
        if self.batch_size == 0 {
            return Err("batch_size must be at least 1".into());
        }
        let finite_pos = |name: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(format!("{name} = {v} must be finite and ≥ 0"))
            }
        };
        finite_pos("lr", self.lr)?;
        finite_pos("weight_decay", self.weight_decay)?;
        finite_pos("bias_scaler", self.bias_scaler)?;
        finite_pos("whiten_eps", self.whiten_eps)?;
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(format!("momentum = {} must be in [0, 1)", self.momentum));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return Err(format!(
                "label_smoothing = {} must be in [0, 1)",
                self.label_smoothing
            ));
        }
        if !(0.0..=1.0).contains(&self.bn_momentum) {
            return Err(format!(
                "bn_momentum = {} must be in [0, 1]",
                self.bn_momentum
            ));
        }
        if !(0.0..1.0).contains(&self.warmup) {
            return Err(format!("warmup = {} must be in [0, 1)", self.warmup));
        }
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return Err(format!("scale = {} must be > 0", self.scale));
        }
        Ok(())
    }

    /// The network's shape.
    pub fn arch(&self) -> Arch {
        Arch {
            widths: self.widths.clone(),
            classes: self.classes,
            scale: self.scale,
            bn_eps: 1e-12,
            bn_momentum: self.bn_momentum,
            side: self.side,
        }
    }

    /// Floats of an input row: `3·side²`.
    pub fn input(&self) -> usize {
        self.side * self.side * CHANNELS
    }
}

/// The model: the network, the optimiser's state and the schedule's position.
pub struct Cnn {
    params: CnnParams,
    net: Option<Net>,
    /// Momentum buffers, in the layout of the network's parameters.
    momentum: Grads,
    /// Lookahead's slow weights (the parameters and the running statistics).
    slow: Option<Net>,
    /// Images the plan will show (`--epochs` × the dataset), if known.
    planned: Option<u64>,
    steps: u64,
    seen: u64,
    tape: Tape,
    grads: Grads,
    /// How the products multiply (from [`CnnParams::precision`], or the checkpoint's).
    kernel: Kernel,
}

impl Cnn {
    /// A new, untrained model.
    pub fn new(mut params: CnnParams) -> Result<Self> {
        params
            .check()
            .map_err(|e| Error::usage(format!("cnn: {e}")))?;
        let kernel = params
            .precision
            .kernel()
            .map_err(|e| Error::usage(format!("cnn: {e}")))?;
        params.precision = if kernel.is_bf16() {
            Precision::Bf16
        } else {
            Precision::F32
        };
        Ok(Cnn {
            kernel,
            params,
            net: None,
            momentum: Vec::new(),
            slow: None,
            planned: None,
            steps: 0,
            seen: 0,
            tape: Tape::default(),
            grads: Vec::new(),
        })
    }

    /// The network, once the first batch has been seen.
    pub fn net(&self) -> Option<&Net> {
        self.net.as_ref()
    }

    /// The hyper-parameters.
    pub fn params(&self) -> &CnnParams {
        &self.params
    }

    /// The kernel the products multiply on (what the run records).
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// The kernel scoring uses: the model's, or where this CPU lacks it (a bf16 run
    /// scored on another CPU) its best bf16 kernel for a bf16 run, else f32.
    pub fn scoring_kernel(&self) -> Kernel {
        if self.kernel.runs_here() {
            self.kernel
        } else if self.kernel.is_bf16() {
            Kernel::best_bf16().unwrap_or(Kernel::F32)
        } else {
            Kernel::F32
        }
    }

    /// Learns on in another precision from here on (`--precision` on a resumed run):
    /// the run is then no longer bit-identical to one never interrupted.
    pub fn switch_precision(&mut self, precision: Precision) -> Result<()> {
        let kernel = precision
            .kernel()
            .map_err(|e| Error::usage(format!("cnn: {e}")))?;
        if kernel != self.kernel {
            tracing::warn!(
                "cnn: the run learnt with the {} kernel and goes on with the {} one: it is no \
                 longer bit-identical to a run never interrupted",
                self.kernel.name(),
                kernel.name()
            );
        }
        self.kernel = kernel;
        self.params.precision = if kernel.is_bf16() {
            Precision::Bf16
        } else {
            Precision::F32
        };
        Ok(())
    }

    /// The learning rate's factor for the step that starts at image `seen`.
    pub fn lr_factor(&self, seen: u64) -> f64 {
        let p = &self.params;
        match self.planned.filter(|&t| t > 0) {
            Some(total) => {
                let warm = (p.warmup * total as f64).max(1.0);
                let s = seen as f64;
                if s < warm {
                    let f = s / warm;
                    p.lr_start * (1.0 - f) + f
                } else {
                    let f = ((s - warm) / (total as f64 - warm).max(1.0)).min(1.0);
                    (1.0 - f) + p.lr_end * f
                }
            }
            None => {
                let warm = p.warmup_images.max(1) as f64;
                let f = (seen as f64 / warm).min(1.0);
                p.lr_start * (1.0 - f) + f
            }
        }
    }

    /// Converts rows of CIFAR-ordered floats (`[n, 3·side²]`, planes R, G, B) into NHWC.
    fn to_nhwc(x: ArrayView2<f32>, side: usize, flip: bool) -> Vec<f32> {
        let n = x.nrows();
        let plane = side * side;
        let input = plane * CHANNELS;
        let mut out = vec![0.0f32; n * input];
        for (i, row) in x.rows().into_iter().enumerate() {
            let dst = &mut out[i * input..(i + 1) * input];
            for y in 0..side {
                for xx in 0..side {
                    let sx = if flip { side - 1 - xx } else { xx };
                    for c in 0..CHANNELS {
                        dst[(y * side + xx) * CHANNELS + c] = row[c * plane + y * side + sx];
                    }
                }
            }
        }
        out
    }

    /// Fits the whitening layer to `x` (rows as [`Learner::partial_fit`] takes them) and
    /// starts the network, without learning from them: what the first batch does before
    /// its first step.
    pub fn init_from(&mut self, x: ArrayView2<f32>) -> Result<()> {
        check_features(x, Some(self.params.input()))?;
        let xs = Self::to_nhwc(x, self.params.side, false);
        self.init(&xs, x.nrows());
        Ok(())
    }

    /// Images learnt so far.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    fn init(&mut self, x: &[f32], n: usize) {
        let whiten = net::whitening_weights(x, n, self.params.side, self.params.whiten_eps);
        let mut rng = SplitMix(self.params.seed);
        let net = Net::new(self.params.arch(), whiten, &mut rng);
        self.momentum = net.params.iter().map(|p| vec![0.0; p.len()]).collect();
        self.grads = self.momentum.clone();
        self.slow = None;
        self.net = Some(net);
    }

    /// One SGD step on `n` NHWC images; returns the mean plain cross-entropy before it
    /// and the logits it computed.
    fn step(&mut self, x: &[f32], y: &[u16]) -> Result<(f64, Vec<f32>)> {
        let n = y.len();
        let p = self.params.clone();
        let factor = self.lr_factor(self.seen);
        let Some(net) = self.net.as_mut() else {
            return Err(Error::internal("cnn: step before init"));
        };
        if !self.kernel.runs_here() {
            // On another bf16 kernel the sums run in another order, as in f32.
            let other = match Kernel::best_bf16() {
                Some(k) if self.kernel.is_bf16() => format!(
                    "in bf16 on the {} kernel with --precision bf16, or in f32 with \
                     --precision f32",
                    k.name()
                ),
                _ => "in f32 with --precision f32".to_string(),
            };
            return Err(Error::usage(format!(
                "cnn: this run learnt with the {} kernel (precision {}), which this CPU ({}) \
                 lacks{}; continue it {other} (it is then no longer bit-identical to a run \
                 never interrupted)",
                self.kernel.name(),
                if self.kernel.is_bf16() { "bf16" } else { "f32" },
                cpu_name(),
                match (self.kernel, amx::support()) {
                    (Kernel::AmxBf16, Err(why)) => format!(" ({why})"),
                    _ => String::new(),
                }
            )));
        }
        self.tape.set_kernel(self.kernel);
        let logits = net.forward_train(x, n, &mut self.tape);
        let (dlogits, _, plain) =
            net::smoothed_ce(&logits, y, self.params.classes, p.label_smoothing);
        if !plain.is_finite() {
            return Err(Error::model(format!(
                "cnn: the loss is {plain} at step {}: the learning rate ({}) is too high for \
                 this network",
                self.steps + 1,
                p.lr
            )));
        }
        let whiten_bias = self.seen < p.whiten_bias_images;
        net.backward(&dlogits, &mut self.tape, whiten_bias, &mut self.grads);
        // airbench94's decoupled form: the step is lr/(1024·(1 + 1/(1 − m))) per image
        // of the summed loss, and the decay wd·batch/(1024·(1 + 1/(1 − m))) per step.
        let m = p.momentum;
        let kilo = 1024.0 * (1.0 + 1.0 / (1.0 - m));
        let lr = p.lr / kilo * factor;
        let wd = p.weight_decay * n as f64 / kilo * factor;
        let norms: std::ops::Range<usize> =
            net.norm_index(0)..net.norm_index(0) + 2 * p.widths.len();
        for (t, ((w, g), buf)) in net
            .params
            .iter_mut()
            .zip(&self.grads)
            .zip(&mut self.momentum)
            .enumerate()
        {
            let lr_t = if norms.contains(&t) {
                lr * p.bias_scaler
            } else {
                lr
            };
            if t == 0 && !whiten_bias {
                continue;
            }
            // PyTorch's SGD: d = g + (wd/lr_t)·w; buf = m·buf + d; w −= lr_t·(d + m·buf).
            let decay = if lr_t > 0.0 { (wd / lr_t) as f32 } else { 0.0 };
            let (lr_t, m) = (lr_t as f32, m as f32);
            for ((wv, &gv), bv) in w.iter_mut().zip(g).zip(buf.iter_mut()) {
                let d = gv + decay * *wv;
                *bv = m * *bv + d;
                *wv -= lr_t * (d + m * *bv);
            }
        }
        // BatchNorm keeps the loss finite long after the activations before it have
        // blown up: the weights and statistics are checked too.
        if let Some(what) = net.first_non_finite() {
            return Err(Error::usage(format!(
                "cnn: {what} became infinite or NaN at step {}: the learning rate ({}) is \
                 too high for this network",
                self.steps + 1,
                p.lr
            )));
        }
        self.steps += 1;
        self.seen += n as u64;
        if let (Some(total), true) = (self.planned, p.lookahead_every > 0) {
            if self.steps.is_multiple_of(p.lookahead_every) {
                let frac = (self.seen as f64 / total.max(1) as f64).min(1.0);
                let decay = 0.95f64.powi(5) * frac.powi(3);
                let net = self.net.as_mut().expect("net");
                let slow = self.slow.get_or_insert_with(|| net.clone());
                lerp_into(slow, net, (1.0 - decay) as f32);
            }
        }
        Ok((plain, logits))
    }

    /// Learns a checked, non-empty batch, one step per mini-batch; the mean loss, and
    /// the probabilities before each step when `scored`.
    fn learn(
        &mut self,
        x: ArrayView2<f32>,
        y: ArrayView1<u16>,
        scored: bool,
    ) -> Result<(f64, Option<Array2<f32>>)> {
        let input = self.params.input();
        let n = x.nrows();
        let xs = Self::to_nhwc(x, self.params.side, false);
        if self.net.is_none() {
            let arch = self.params.arch();
            let bs = self.params.batch_size.min(n);
            crate::limits::check(
                &format!(
                    "cnn (widths {:?}, mini-batch {bs}): the activations kept for the backward pass",
                    self.params.widths
                ),
                (arch.tape_floats_per_image() * bs * 4) as u128,
            )?;
            self.init(&xs, n);
        }
        let ys: Vec<u16> = y.iter().copied().collect();
        let bs = self.params.batch_size;
        let mut total = 0.0f64;
        let mut proba = scored.then(|| Array2::<f32>::zeros((n, self.params.classes)));
        for start in (0..n).step_by(bs) {
            let end = (start + bs).min(n);
            let (loss, logits) = self.step(&xs[start * input..end * input], &ys[start..end])?;
            total += loss * (end - start) as f64;
            if let Some(p) = proba.as_mut() {
                let l = ArrayView2::from_shape((end - start, self.params.classes), &logits)
                    .map_err(|e| Error::internal(format!("cnn: {e}")))?;
                let mut rows = p.slice_mut(ndarray::s![start..end, ..]);
                rows.assign(&l);
                crate::model::softmax_rows(&mut rows, 1.0);
            }
        }
        Ok((total / n as f64, proba))
    }

    fn logits(&self, x: ArrayView2<f32>) -> Result<Array2<f32>> {
        let Some(net) = self.net.as_ref() else {
            return Ok(Array2::zeros((x.nrows(), self.params.classes)));
        };
        let n = x.nrows();
        let mut out = Array2::<f32>::zeros((n, self.params.classes));
        const CHUNK: usize = 256;
        for start in (0..n).step_by(CHUNK) {
            let end = (start + CHUNK).min(n);
            let rows = x.slice(ndarray::s![start..end, ..]);
            let xs = Self::to_nhwc(rows, self.params.side, false);
            let m = end - start;
            let kernel = self.scoring_kernel();
            let mut l = net.forward_score(&xs, m, None, kernel);
            if self.params.tta_translate {
                for (dy, dx) in [(-1, -1), (1, 1)] {
                    let moved = translate_nhwc(&xs, m, self.params.side, dy, dx);
                    let lt = net.forward_score(&moved, m, None, kernel);
                    for (a, b) in l.iter_mut().zip(lt) {
                        *a += 0.5 * b;
                    }
                }
                for a in l.iter_mut() {
                    *a *= 0.5;
                }
            }
            out.slice_mut(ndarray::s![start..end, ..]).assign(
                &ArrayView2::from_shape((end - start, self.params.classes), &l)
                    .map_err(|e| Error::usage(e.to_string()))?,
            );
        }
        Ok(out)
    }
}

/// NHWC images of `side`×`side` moved so that pixel (y, x) is the input's
/// (y + dy, x + dx), the border reflected (`-1 → 1`, `32 → 30`), as `translate()` and
/// PyTorch's reflect padding.
fn translate_nhwc(x: &[f32], n: usize, side: usize, dy: isize, dx: isize) -> Vec<f32> {
    let reflect = |i: isize| crate::transforms::pixels::reflect(i as i64, side as i64);
    let mut out = vec![0.0f32; x.len()];
    let input = side * side * CHANNELS;
    for img in 0..n {
        let base = img * input;
        for y in 0..side {
            let sy = reflect(y as isize + dy);
            for xx in 0..side {
                let sx = reflect(xx as isize + dx);
                let d = base + (y * side + xx) * CHANNELS;
                let src = base + (sy * side + sx) * CHANNELS;
                out[d..d + CHANNELS].copy_from_slice(&x[src..src + CHANNELS]);
            }
        }
    }
    out
}

/// `slow += t·(fast − slow)` and then `fast = slow`, for the parameters and the running
/// statistics (airbench94's Lookahead).
fn lerp_into(slow: &mut Net, fast: &mut Net, t: f32) {
    let pairs = slow
        .params
        .iter_mut()
        .zip(fast.params.iter_mut())
        .chain(
            slow.running_mean
                .iter_mut()
                .zip(fast.running_mean.iter_mut()),
        )
        .chain(slow.running_var.iter_mut().zip(fast.running_var.iter_mut()));
    for (s, f) in pairs {
        for (sv, fv) in s.iter_mut().zip(f.iter_mut()) {
            *sv += t * (*fv - *sv);
            *fv = *sv;
        }
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Meta {
    params: CnnParams,
    planned: Option<u64>,
    steps: u64,
    seen: u64,
    trained: bool,
    slow: bool,
    /// The kernel the run learnt with (none in checkpoints older than the bf16 kernels:
    /// f32).
    #[serde(default)]
    kernel: Option<Kernel>,
}

impl crate::model::Model for Cnn {
    const NAME: &'static str = NAME;
    const ABOUT: &'static str = "convolutional network (airbench94's), one SGD step per mini-batch";
    const NOT_COMPARED_ON_RESUME: &'static [&'static str] = &["classes", "side", "precision"];
    type Params = CnnParams;

    fn build(params: CnnParams) -> Result<Self> {
        Cnn::new(params)
    }

    fn open(dir: &Path) -> Result<Self> {
        Cnn::load(dir)
    }
}

impl Learner for Cnn {
    fn name(&self) -> &'static str {
        NAME
    }

    fn n_features(&self) -> Option<usize> {
        Some(self.params.input())
    }

    fn classes(&self) -> usize {
        self.params.classes
    }

    fn fit_batch(&mut self, x: ArrayView2<f32>, y: ArrayView1<u16>) -> Result<f64> {
        Ok(self.learn(x, y, false)?.0)
    }

    fn plan(&mut self, images: Option<u64>) {
        self.planned = images;
    }

    fn scores_while_learning(&self) -> bool {
        true
    }

    fn fit_batch_scored(
        &mut self,
        x: ArrayView2<f32>,
        y: ArrayView1<u16>,
    ) -> Result<(f64, Option<Array2<f32>>)> {
        let (loss, p) = self.learn(x, y, true)?;
        Ok((loss, p))
    }

    fn switch_precision(&mut self, precision: Precision) -> Result<()> {
        Cnn::switch_precision(self, precision)
    }

    fn compute(&self) -> Option<String> {
        Some(if self.kernel.is_bf16() {
            format!("bf16 ({})", self.kernel.name())
        } else {
            "f32".into()
        })
    }

    fn predict_proba(&self, x: ArrayView2<f32>) -> Result<Array2<f32>> {
        check_features(x, Some(self.params.input()))?;
        let mut l = self.logits(x)?;
        crate::model::softmax_rows(&mut l.view_mut(), 1.0);
        Ok(l)
    }

    fn save(&self, dir: &Path) -> Result<()> {
        let mut t = TensorsOut::default();
        if let Some(net) = &self.net {
            t.f32(net::WHITEN_TENSOR, &[net.whiten.len()], net.whiten.iter());
            net.put_tensors(&mut t, "");
            for ((name, len), m) in net.arch.param_shapes().iter().zip(&self.momentum) {
                t.f32(&format!("momentum.{name}"), &[*len], m.iter());
            }
            if let Some(slow) = &self.slow {
                slow.put_tensors(&mut t, "slow.");
            }
        }
        let meta = Meta {
            params: self.params.clone(),
            planned: self.planned,
            steps: self.steps,
            seen: self.seen,
            trained: self.net.is_some(),
            slow: self.slow.is_some(),
            kernel: Some(self.kernel),
        };
        save_checkpoint(
            dir,
            NAME,
            &format!("{}-{}", self.seen, self.steps),
            &meta,
            t,
        )
    }
}

impl Cnn {
    /// Loads a model saved by [`Learner::save`].
    pub fn load(dir: &Path) -> Result<Self> {
        let ck = Checkpoint::open(dir, NAME)?;
        let meta: Meta = ck.meta()?;
        meta.params
            .check()
            .map_err(|e| ck.bad_meta(format!("bad params: {e}")))?;
        // The checkpoint's kernel, whatever this CPU has: a run goes on as it learnt (a
        // step on a CPU without it is an error that says how to go on in f32), and
        // scoring falls back to f32.
        let kernel = meta.kernel.unwrap_or(Kernel::F32);
        let mut params = meta.params;
        params.precision = Precision::F32;
        let mut model = Cnn::new(params)?;
        model.kernel = kernel;
        model.params.precision = if kernel.is_bf16() {
            Precision::Bf16
        } else {
            Precision::F32
        };
        model.planned = meta.planned;
        model.steps = meta.steps;
        model.seen = meta.seen;
        if !meta.trained {
            ck.expect_names(&[])?;
            return Ok(model);
        }
        let arch = model.params.arch();
        let shapes = arch.param_shapes();
        let mut names = vec![net::WHITEN_TENSOR.to_string()];
        names.extend(Net::tensor_names(&arch, ""));
        names.extend(shapes.iter().map(|(name, _)| format!("momentum.{name}")));
        if meta.slow {
            names.extend(Net::tensor_names(&arch, "slow."));
        }
        ck.expect_names(&names)?;
        let whiten = Net::read_whiten(&ck, &arch)?;
        let net = Net::read_tensors(&ck, &arch, &whiten, "")?;
        model.momentum = shapes
            .iter()
            .map(|(name, len)| ck.f32(&format!("momentum.{name}"), &[*len]))
            .collect::<Result<_>>()?;
        model.slow = if meta.slow {
            Some(Net::read_tensors(&ck, &arch, &whiten, "slow.")?)
        } else {
            None
        };
        model.grads = model.momentum.iter().map(|m| vec![0.0; m.len()]).collect();
        model.net = Some(net);
        Ok(model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::{assert_save_load_continues, random_batch};

    fn small() -> CnnParams {
        CnnParams {
            widths: vec![4, 6, 8],
            batch_size: 16,
            ..CnnParams::default()
        }
    }

    #[test]
    fn save_load_is_exact_and_training_continues_identically() {
        let mut rng = SplitMix(3);
        let (x, y) = random_batch(&mut rng, 80, INPUT);
        for planned in [None, Some(80)] {
            let mut a = Cnn::new(small()).unwrap();
            a.plan(planned);
            assert_save_load_continues(&mut a, NAME, x.view(), y.view(), 48);
        }
        // An untrained model saves and loads too, and predicts uniformly.
        let dir = tempfile::tempdir().unwrap();
        Cnn::new(small()).unwrap().save(dir.path()).unwrap();
        let m = Cnn::load(dir.path()).unwrap();
        let p = m.predict_proba(x.view()).unwrap();
        assert!(p.iter().all(|&v| (v - 0.1).abs() < 1e-6));
    }

    /// The network on AMX's tiles (on the CPU, or on the tests' stand-in for the tile
    /// unit) against the same network on AVX512-BF16, which tests/it/cnn.rs checks
    /// against the numpy reference: the same bf16 roundings of the inputs, their sums in
    /// another order, so after four SGD steps every weight and logit within 2% of its
    /// tensor's largest value (measured: the weights within 3e-6, the logits 3e-4; a wrong layout or tile is off by
    /// the whole value). The AMX run gives the same bits again, on one thread or two.
    #[test]
    fn the_network_on_amx_tiles_matches_it_on_avx512_bf16() {
        if !Kernel::Avx512Bf16.available()
            || !amx::tests::ready("the_network_on_amx_tiles_matches_it_on_avx512_bf16")
        {
            return;
        }
        let mut rng = SplitMix(5);
        let (x, y) = random_batch(&mut rng, 32, INPUT);
        let run = |kernel: Kernel, threads: usize| {
            crate::linalg::set_threads(threads);
            let mut m = Cnn::new(CnnParams {
                batch_size: 16,
                precision: Precision::Bf16,
                ..small()
            })
            .unwrap();
            m.kernel = kernel;
            m.partial_fit(x.view(), y.view()).unwrap();
            m.partial_fit(x.view(), y.view()).unwrap();
            let logits = m.logits(x.view()).unwrap();
            crate::linalg::set_threads(0);
            assert_eq!(m.kernel(), kernel);
            (m.net().unwrap().params.clone(), logits)
        };
        let (vector, tiles) = (run(Kernel::Avx512Bf16, 2), run(Kernel::AmxBf16, 2));
        let worst = |a: &[f32], b: &[f32]| {
            let top = a.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
            a.iter()
                .zip(b)
                .map(|(u, v)| (u - v).abs() / top)
                .fold(0.0f32, f32::max)
        };
        let mut most = 0.0f32;
        for (i, (a, b)) in vector.0.iter().zip(&tiles.0).enumerate() {
            let d = worst(a, b);
            assert!(d <= 0.02, "parameter tensor {i}: {d} of its largest value");
            most = most.max(d);
        }
        let d = worst(vector.1.as_slice().unwrap(), tiles.1.as_slice().unwrap());
        assert!(d <= 0.02, "logits: {d} of the largest");
        eprintln!("AMX against AVX512-BF16: weights within {most}, logits within {d}");
        assert_eq!(
            run(Kernel::AmxBf16, 1),
            tiles,
            "AMX on one thread and on two"
        );
    }

    #[test]
    fn the_same_seed_and_stream_give_the_same_bits_whatever_the_threads() {
        let mut rng = SplitMix(4);
        let (x, y) = random_batch(&mut rng, 40, INPUT);
        let run = |threads: usize| {
            crate::linalg::set_threads(threads);
            let mut m = Cnn::new(CnnParams {
                batch_size: 20,
                ..small()
            })
            .unwrap();
            m.partial_fit(x.view(), y.view()).unwrap();
            m.partial_fit(x.view(), y.view()).unwrap();
            let p = m.predict_proba(x.view()).unwrap();
            crate::linalg::set_threads(0);
            (m.net().unwrap().params.clone(), p)
        };
        let one = run(1);
        assert_eq!(run(2), one);
        assert_eq!(run(1), one);
    }

    #[test]
    fn bad_params_and_a_diverging_rate_are_clear_errors() {
        for (p, want) in [
            (
                CnnParams {
                    widths: vec![8; 6],
                    ..CnnParams::default()
                },
                "do not fit 32×32",
            ),
            (
                CnnParams {
                    widths: vec![],
                    ..CnnParams::default()
                },
                "at least one block",
            ),
            (
                CnnParams {
                    batch_size: 0,
                    ..CnnParams::default()
                },
                "batch_size",
            ),
            (
                CnnParams {
                    momentum: 1.0,
                    ..CnnParams::default()
                },
                "momentum",
            ),
        ] {
            let e = Cnn::new(p).err().expect("refused").to_string();
            assert!(e.contains(want), "{e}");
        }
        // Five blocks still fit (31 → 15 → 7 → 3 → 1 → 0 does not; 4 blocks end at 1×1).
        assert!(Cnn::new(CnnParams {
            widths: vec![4; 4],
            ..CnnParams::default()
        })
        .is_ok());
        // A learning rate that blows the loss up stops with the step named, and the model
        // keeps the weights of before that step.
        let mut rng = SplitMix(5);
        let (x, y) = random_batch(&mut rng, 64, INPUT);
        let mut m = Cnn::new(CnnParams {
            lr: 1e38,
            lr_start: 1.0,
            ..small()
        })
        .unwrap();
        let mut err = None;
        for _ in 0..20 {
            if let Err(e) = m.partial_fit(x.view(), y.view()) {
                err = Some(e.to_string());
                break;
            }
        }
        let e = err.expect("the loss diverges");
        assert!(e.contains("loss") && e.contains("step"), "{e}");
        let p = m.predict_proba(x.view());
        assert!(p.is_ok());
    }

    #[test]
    fn a_batch_of_the_wrong_width_changes_nothing() {
        let mut rng = SplitMix(6);
        let (x, y) = random_batch(&mut rng, 10, 100);
        let mut m = Cnn::new(small()).unwrap();
        let e = m.partial_fit(x.view(), y.view()).unwrap_err().to_string();
        assert!(e.contains("3072"), "{e}");
        assert!(m.net().is_none());
    }

    #[test]
    fn test_time_translations_move_as_the_translate_function() {
        let mut rng = SplitMix(7);
        let (x, _) = random_batch(&mut rng, 2, INPUT);
        let nhwc = Cnn::to_nhwc(x.view(), SIDE, false);
        for (dy, dx) in [(-1isize, -1isize), (1, 1), (2, -1)] {
            let got = translate_nhwc(&nhwc, 2, SIDE, dy, dx);
            let mut want = Vec::new();
            for row in x.rows() {
                let mut moved = vec![0.0f32; INPUT];
                crate::transforms::pixels::translate_reflect(
                    row.as_slice().unwrap(),
                    SIDE,
                    dy as i64,
                    dx as i64,
                    &mut moved,
                )
                .unwrap();
                let m = ndarray::Array2::from_shape_vec((1, INPUT), moved).unwrap();
                want.extend(Cnn::to_nhwc(m.view(), SIDE, false));
            }
            assert_eq!(got, want, "({dy}, {dx})");
        }
    }

    #[test]
    fn the_schedule_warms_up_then_decays_over_the_plan() {
        let mut m = Cnn::new(small()).unwrap();
        m.plan(Some(1000));
        assert!((m.lr_factor(0) - 0.2).abs() < 1e-12);
        assert!((m.lr_factor(230) - 1.0).abs() < 1e-12);
        assert!((m.lr_factor(1000) - 0.07).abs() < 1e-12);
        assert!(m.lr_factor(600) < 1.0 && m.lr_factor(600) > 0.07);
        m.plan(None);
        assert!((m.lr_factor(0) - 0.2).abs() < 1e-12);
        assert!((m.lr_factor(10_000_000) - 1.0).abs() < 1e-12);
    }
}
