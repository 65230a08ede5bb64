//! `logreg`: multinomial softmax regression learnt by mini-batch SGD with an L2 penalty.
//!
//! It is the baseline learner for the stream: linear in the pixels, cheap enough to keep
//! up with the stream on one core (two thin matrix products per mini-batch), convex so
//! its training is predictable, and with a gradient simple enough to check by finite
//! differences. Everything is deterministic: weights start at zero, mini-batches are
//! taken in order, and the same stream gives bit-identical weights.

use std::path::Path;

use ndarray::linalg::general_mat_mul;

use super::kernels::par_gemm;
use ndarray::{s, Array1, Array2, ArrayView1, ArrayView2, ArrayViewMut1, ArrayViewMut2, Axis, Zip};
use safetensors::tensor::SafeTensors;
use serde::{Deserialize, Serialize};

use super::{
    check_batch, check_features, first_non_finite_row, parse_json, read_f32, read_file,
    restore_exact_floats, save_checkpoint, Learner, TensorsOut, META_FILE, TENSORS_FILE,
};
use crate::error::{Error, Result};

/// The model's name: [`Learner::name`] and the `"model"` field of its checkpoint.
pub(crate) const NAME: &str = "logreg";

/// Hyper-parameters of [`LogReg`]. Missing fields take their defaults when read from
/// JSON; unknown fields are an error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogRegParams {
    /// SGD learning rate (step size); finite and > 0. Default 0.01.
    pub lr: f32,
    /// L2 penalty strength on the weights (not the bias); finite and ≥ 0. Default 1e-4.
    pub alpha: f32,
    /// Mini-batch size: an incoming batch is cut, in order, into mini-batches of this
    /// many images (the last may be smaller), one SGD step each; ≥ 1. Default 128.
    pub batch_size: usize,
    /// Random seed. Kept for the checkpoint format's sake: training is currently fully
    /// deterministic (zero initialisation, no shuffling) and does not use it. Default 0.
    pub seed: u64,
    /// Iterate averaging (ASGD, as `svm`'s `average`): 0 predicts with the last SGD
    /// iterate; N ≥ 1 keeps the mean of the iterates after every step from the one that
    /// reaches the N-th image on, and predicts with it. Fixed-rate steps throw the last
    /// iterate around the optimum; their mean settles. Default 1 (chosen on a validation
    /// split, see docs/training.md).
    pub average: u64,
    /// Number of classes K: labels are 0..K and the probabilities have K columns. The
    /// trainer sets it from the data's classes; 2 to 1,000. Default 10 (CIFAR-10).
    pub classes: usize,
}

impl Default for LogRegParams {
    fn default() -> Self {
        LogRegParams {
            classes: super::CLASSES,
            lr: 0.01,
            alpha: 1e-4,
            batch_size: 128,
            seed: 0,
            average: 1,
        }
    }
}

impl LogRegParams {
    /// Checks the values: `lr` finite and > 0, `alpha` finite and ≥ 0, `batch_size` ≥ 1.
    pub fn check(&self) -> Result<()> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::usage(format!(
                "logreg: lr must be finite and > 0, not {}",
                self.lr
            )));
        }
        if !(self.alpha.is_finite() && self.alpha >= 0.0) {
            return Err(Error::usage(format!(
                "logreg: alpha must be finite and >= 0, not {}",
                self.alpha
            )));
        }
        if self.batch_size == 0 {
            return Err(Error::usage("logreg: batch_size must be at least 1"));
        }
        super::check_classes(NAME, self.classes)
    }
}

/// Multinomial logistic (softmax) regression over K classes, learnt by
/// mini-batch SGD.
///
/// The objective of a mini-batch `(X, y)` of `m` images is
/// `mean_i CE(softmax(x_i W + b), y_i) + (alpha/2)·‖W‖²` (squared Frobenius norm; the
/// bias is not penalised), with gradient `G = Xᵀ(P − Y)/m + alpha·W` for `W` and
/// `mean_i(P − Y)_i` for `b`, where `P` are the probabilities and `Y` the one-hot
/// labels. Each step is `W -= lr·G`, `b -= lr·mean(P − Y)`. With `average = N ≥ 1`
/// the model also keeps `W̄, b̄`, the running mean of `(W, b)` after each step since the
/// one that reached the N-th image, and predicts with them once there are any.
#[derive(Clone, Debug)]
pub struct LogReg {
    /// Hyper-parameters (checked).
    params: LogRegParams,
    /// d × K weights; `None` until the first non-empty batch fixes d.
    weights: Option<Array2<f32>>,
    /// The K biases.
    bias: Array1<f32>,
    /// The averaged weights and biases, once averaging has begun.
    avg: Option<(Array2<f32>, Array1<f32>)>,
    /// Number of iterates in `avg`.
    averaged: u64,
    /// Number of images learnt from.
    seen: u64,
    /// Number of SGD steps taken.
    steps: u64,
    /// Buffers reused from step to step; not part of the model's state.
    scratch: Scratch,
}

/// Work buffers of [`LogReg::partial_fit`], kept so a step allocates nothing.
#[derive(Clone, Debug)]
struct Scratch {
    /// Logits, then probabilities, then `P − Y`: (at least) mini-batch × K.
    z: Array2<f32>,
    /// Weight gradient, then the updated weights: d × K.
    g: Array2<f32>,
    /// Bias gradient, then the updated bias: K.
    gb: Array1<f32>,
}

impl Scratch {
    fn new(classes: usize) -> Self {
        Scratch {
            z: Array2::zeros((0, classes)),
            g: Array2::zeros((0, classes)),
            gb: Array1::zeros(classes),
        }
    }

    /// Makes room for mini-batches of `rows` images of `d` features.
    fn reserve(&mut self, d: usize, rows: usize) {
        if self.z.nrows() < rows {
            self.z = Array2::zeros((rows, self.gb.len()));
        }
        if self.g.nrows() != d {
            self.g = Array2::zeros((d, self.gb.len()));
        }
    }
}

/// What `model.json` holds for a [`LogReg`].
#[derive(Serialize, Deserialize)]
struct Meta {
    /// Always [`NAME`].
    model: String,
    /// Hyper-parameters.
    params: LogRegParams,
    /// Images learnt from.
    seen: u64,
    /// SGD steps taken.
    steps: u64,
    /// Iterates in the averaged weights (0: none; older checkpoints have none).
    #[serde(default)]
    averaged: u64,
    /// Width of the weights; `null` before the first batch.
    n_features: Option<usize>,
}

/// The stamp of a save with these counters ([`save_checkpoint`]'s): both files carry
/// it, so that [`LogReg::load`] can tell a save torn between the two renames.
fn stamp(seen: u64, steps: u64, averaged: u64) -> String {
    format!("seen {seen}, steps {steps}, averaged {averaged}")
}

impl LogReg {
    /// A new, untrained model (after checking `params`).
    pub fn new(params: LogRegParams) -> Result<Self> {
        params.check()?;
        Ok(LogReg {
            weights: None,
            bias: Array1::zeros(params.classes),
            avg: None,
            averaged: 0,
            seen: 0,
            steps: 0,
            scratch: Scratch::new(params.classes),
            params,
        })
    }

    /// The hyper-parameters.
    pub fn params(&self) -> &LogRegParams {
        &self.params
    }

    /// The d × K weights; `None` before the first non-empty batch.
    pub fn weights(&self) -> Option<ArrayView2<'_, f32>> {
        self.weights.as_ref().map(Array2::view)
    }

    /// The K biases.
    pub fn bias(&self) -> ArrayView1<'_, f32> {
        self.bias.view()
    }

    /// The averaged weights and biases and how many iterates they average; `None`
    /// before averaging begins (or without it).
    pub fn averaged(&self) -> Option<(ArrayView2<'_, f32>, ArrayView1<'_, f32>, u64)> {
        self.avg
            .as_ref()
            .map(|(w, b)| (w.view(), b.view(), self.averaged))
    }

    /// The weights and biases used to predict: the averaged ones once there are any.
    fn predictor(&self) -> Option<(ArrayView2<'_, f32>, ArrayView1<'_, f32>)> {
        match (&self.avg, &self.weights) {
            (Some((w, b)), _) => Some((w.view(), b.view())),
            (None, Some(w)) => Some((w.view(), self.bias.view())),
            (None, None) => None,
        }
    }

    /// Number of images learnt from so far.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Number of SGD steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The objective on `(x, y)` at the current parameters and its gradients, without
    /// changing anything: `(loss, dW, db)` with `loss = mean cross-entropy +
    /// (alpha/2)·‖W‖²` (in f64; no penalty on the bias), `dW` (d × K) and `db`
    /// (K) as in the type's documentation. Before the first batch the
    /// weights are taken as the zeros they will start from.
    ///
    /// Errors on the same bad input as [`Learner::partial_fit`], and on an empty batch
    /// (whose mean loss is undefined).
    pub fn loss_and_grad(
        &self,
        x: ArrayView2<f32>,
        y: ArrayView1<u16>,
    ) -> Result<(f64, Array2<f32>, Array1<f32>)> {
        check_batch(x, y, self.n_features(), self.params.classes)?;
        let n = x.nrows();
        if n == 0 {
            return Err(Error::usage(
                "logreg: the loss of an empty batch is undefined",
            ));
        }
        let zeros;
        let w = match &self.weights {
            Some(w) => w.view(),
            None => {
                zeros = Array2::zeros((x.ncols(), self.params.classes));
                zeros.view()
            }
        };
        let mut z = Array2::zeros((n, self.params.classes));
        let mut g = Array2::zeros(w.raw_dim());
        let mut gb = Array1::zeros(self.params.classes);
        let ce = grad_into(
            w,
            self.bias.view(),
            self.params.alpha,
            x,
            y,
            z.view_mut(),
            g.view_mut(),
            gb.view_mut(),
        );
        let sq: f64 = w.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let loss = ce / n as f64 + f64::from(self.params.alpha) / 2.0 * sq;
        Ok((loss, g, gb))
    }

    /// Loads a model saved by [`Learner::save`] from `dir`, checking both files: the
    /// kind, the hyper-parameters, the tensors' names, dtypes (F32), shapes and values
    /// (finite), and that the two files come from the same save. Errors name the file.
    pub fn load(dir: &Path) -> Result<Self> {
        let (meta_path, bytes) = read_file(&dir.join(META_FILE))?;
        let bad_meta = |reason: String| Error::format(&meta_path, 0, reason);
        // Parsed as `Meta` first, so that an error points at its byte; then read with
        // the floats JSON would not give back exactly put back in.
        parse_json::<Meta>(&meta_path, &bytes)?;
        let mut value: serde_json::Value = parse_json(&meta_path, &bytes)?;
        restore_exact_floats(&mut value).map_err(&bad_meta)?;
        let meta: Meta = serde_json::from_value(value)
            .map_err(|e| bad_meta(format!("invalid model metadata: {e}")))?;
        if meta.model != NAME {
            return Err(bad_meta(format!(
                "holds a {:?} model, not {NAME:?}",
                meta.model
            )));
        }
        meta.params
            .check()
            .map_err(|e| bad_meta(format!("bad params: {e}")))?;
        match meta.n_features {
            Some(0) => return Err(bad_meta("n_features is 0".into())),
            None if meta.seen != 0 || meta.steps != 0 => {
                return Err(bad_meta(
                    "n_features is null but the model has been trained".into(),
                ))
            }
            _ => {}
        }
        if meta.averaged > meta.steps {
            return Err(bad_meta(format!(
                "averages {} iterates but only {} steps were taken",
                meta.averaged, meta.steps
            )));
        }

        let (path, buf) = read_file(&dir.join(TENSORS_FILE))?;
        let bad = |offset: usize, reason: String| Error::format(&path, offset as u64, reason);
        let (header_len, md) = SafeTensors::read_metadata(&buf)
            .map_err(|e| bad(0, format!("not a valid safetensors file: {e}")))?;
        // Both files carry the counters (the stamp; older checkpoints, each counter); a
        // save torn between its two renames shows here.
        let extra = md.metadata().as_ref();
        if let Some(got) = extra.and_then(|m| m.get("stamp")) {
            let want = stamp(meta.seen, meta.steps, meta.averaged);
            if *got != want {
                return Err(bad(
                    8,
                    format!(
                        "metadata stamp {got:?} does not match {META_FILE} ({want}): \
                         the files come from different saves"
                    ),
                ));
            }
        }
        let legacy = extra.is_none_or(|m| !m.contains_key("stamp"));
        let counters = [
            ("seen", meta.seen),
            ("steps", meta.steps),
            ("averaged", meta.averaged),
        ];
        for (key, want) in counters.into_iter().filter(|_| legacy) {
            // Checkpoints from before averaging have no "averaged" entry: 0.
            if key == "averaged" && want == 0 && extra.is_some_and(|m| !m.contains_key(key)) {
                continue;
            }
            let got = extra.and_then(|m| m.get(key));
            if got.map(String::as_str) != Some(want.to_string().as_str()) {
                return Err(bad(
                    8,
                    format!(
                        "metadata {key} = {got:?} does not match {META_FILE} ({want}): \
                         the files come from different saves"
                    ),
                ));
            }
        }
        let expected: &[&str] = match (meta.n_features, meta.averaged) {
            (Some(_), 0) => &["bias", "weights"],
            (Some(_), _) => &["avg_bias", "avg_weights", "bias", "weights"],
            (None, _) => &["bias"],
        };
        let mut names: Vec<String> = md.tensors().into_keys().collect();
        names.sort();
        if names != expected {
            return Err(bad(
                8,
                format!("holds tensors {names:?}, expected {expected:?}"),
            ));
        }
        let data_start = 8 + header_len;
        let tensor = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            read_f32(&buf, &md, data_start, name, shape).map_err(|(o, r)| bad(o, r))
        };
        let k = meta.params.classes;
        let bias = Array1::from(tensor("bias", &[k])?);
        let matrix = |name: &str, d: usize| -> Result<Array2<f32>> {
            Array2::from_shape_vec((d, k), tensor(name, &[d, k])?)
                .map_err(|e| bad(8, format!("tensor {name:?}: {e}")))
        };
        let weights = meta.n_features.map(|d| matrix("weights", d)).transpose()?;
        let avg = match meta.n_features {
            Some(d) if meta.averaged > 0 => Some((
                matrix("avg_weights", d)?,
                Array1::from(tensor("avg_bias", &[k])?),
            )),
            _ => None,
        };
        Ok(LogReg {
            params: meta.params,
            weights,
            bias,
            avg,
            averaged: meta.averaged,
            seen: meta.seen,
            steps: meta.steps,
            scratch: Scratch::new(k),
        })
    }
}

/// Softmax of one row of logits plus `b`, in place. Returns (max, ln Σ exp(· − max)) of
/// the biased logits, whose sum is their log-sum-exp.
fn softmax_row(mut row: ArrayViewMut1<f32>, b: ArrayView1<f32>) -> (f32, f32) {
    row += &b;
    let max = row.fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    let mut sum = 0.0f32;
    row.mapv_inplace(|v| {
        let e = (v - max).exp();
        sum += e;
        e
    });
    // sum >= 1: the largest logit contributes exp(0).
    row *= 1.0 / sum;
    (max, sum.ln())
}

/// The gradient of the objective on a mini-batch of m ≥ 1 images: `g` ← `Xᵀ(P−Y)/m +
/// alpha·W`, `gb` ← `mean(P−Y)`, using `z` (m × K) as work space. Returns the
/// *sum* of the m cross-entropies (f64). Inputs must have been checked.
#[allow(clippy::too_many_arguments)]
fn grad_into(
    w: ArrayView2<f32>,
    b: ArrayView1<f32>,
    alpha: f32,
    x: ArrayView2<f32>,
    y: ArrayView1<u16>,
    mut z: ArrayViewMut2<f32>,
    mut g: ArrayViewMut2<f32>,
    mut gb: ArrayViewMut1<f32>,
) -> f64 {
    let m = x.nrows();
    par_gemm(1.0, &x, &w, 0.0, &mut z.view_mut());
    let mut ce = 0.0f64;
    gb.fill(0.0);
    for (mut row, &label) in z.rows_mut().into_iter().zip(y) {
        let k = usize::from(label);
        let logit = row[k] + b[k];
        let (max, ln_sum) = softmax_row(row.view_mut(), b);
        // −ln p_k = ln Σ exp(z_j − max) − (z_k − max), both terms ≥ 0.
        ce += f64::from(ln_sum) + f64::from(max - logit);
        row[k] -= 1.0;
        gb += &row;
    }
    let inv_m = 1.0 / m as f32;
    gb *= inv_m;
    g.assign(&w);
    par_gemm(inv_m, &x.t(), &z.view(), alpha, &mut g.view_mut());
    ce
}

impl crate::model::Model for LogReg {
    const NAME: &'static str = NAME;
    const ABOUT: &'static str = "softmax regression, mini-batch SGD with an L2 penalty";
    type Params = LogRegParams;

    fn build(params: LogRegParams) -> Result<Self> {
        LogReg::new(params)
    }

    fn open(dir: &Path) -> Result<Self> {
        LogReg::load(dir)
    }
}

impl Learner for LogReg {
    fn name(&self) -> &'static str {
        NAME
    }

    fn n_features(&self) -> Option<usize> {
        self.weights.as_ref().map(Array2::nrows)
    }

    fn classes(&self) -> usize {
        self.params.classes
    }

    /// See [`Learner::partial_fit`]. The first non-empty batch fixes the width and
    /// starts the weights at zero. If a step would make a parameter non-finite (too
    /// large a learning rate or too large features), it is not taken and the call
    /// returns `Err`; the steps of the batch's earlier mini-batches stay taken.
    fn fit_batch(&mut self, x: ArrayView2<f32>, y: ArrayView1<u16>) -> Result<f64> {
        let n = x.nrows();
        let d = x.ncols();
        let LogReg {
            params,
            weights,
            bias,
            avg,
            averaged,
            seen,
            steps,
            scratch,
        } = self;
        let w = weights.get_or_insert_with(|| Array2::zeros((d, bias.len())));
        let bs = params.batch_size;
        scratch.reserve(d, bs.min(n));
        let (lr, alpha) = (params.lr, params.alpha);
        let mut ce_sum = 0.0f64;
        for (i, (xb, yb)) in x
            .axis_chunks_iter(Axis(0), bs)
            .zip(y.axis_chunks_iter(Axis(0), bs))
            .enumerate()
        {
            let (start, m) = (i * bs, xb.nrows());
            ce_sum += grad_into(
                w.view(),
                bias.view(),
                alpha,
                xb,
                yb,
                scratch.z.slice_mut(s![..m, ..]),
                scratch.g.view_mut(),
                scratch.gb.view_mut(),
            );
            // The new parameters go into the gradient buffers, then swap in if finite.
            Zip::from(&mut scratch.g)
                .and(&*w)
                .for_each(|g, &w| *g = w - lr * *g);
            Zip::from(&mut scratch.gb)
                .and(&*bias)
                .for_each(|g, &b| *g = b - lr * *g);
            let ok =
                scratch.g.iter().all(|v| v.is_finite()) && scratch.gb.iter().all(|v| v.is_finite());
            if !ok {
                return Err(Error::usage(format!(
                    "logreg: step {} (rows {start}..{} of the batch) would make the weights \
                     non-finite; not taken. Lower lr (now {lr}) or scale the features",
                    *steps + 1,
                    start + m
                )));
            }
            std::mem::swap(w, &mut scratch.g);
            std::mem::swap(bias, &mut scratch.gb);
            *steps += 1;
            *seen += m as u64;
            if params.average > 0 && *seen >= params.average {
                *averaged += 1;
                match avg {
                    None => *avg = Some((w.clone(), bias.clone())),
                    Some((aw, ab)) => {
                        // W̄ += (W − W̄)/k: the mean of the k iterates so far.
                        let mu = 1.0 / *averaged as f32;
                        Zip::from(aw).and(&*w).for_each(|a, &v| *a += (v - *a) * mu);
                        Zip::from(ab)
                            .and(&*bias)
                            .for_each(|a, &v| *a += (v - *a) * mu);
                    }
                }
            }
        }
        Ok(ce_sum / n as f64)
    }

    /// See [`Learner::predict_proba`], with the averaged weights once there are any.
    /// Before the first batch every row is uniform (1/K), which is what the
    /// zero-initialised model would answer, so test-then-train evaluation can start on
    /// the stream's first batch. Features so large that a logit overflows f32 are an
    /// `Err`.
    fn predict_proba(&self, x: ArrayView2<f32>) -> Result<Array2<f32>> {
        check_features(x, self.n_features())?;
        let mut z = Array2::zeros((x.nrows(), self.params.classes));
        let Some((w, b)) = self.predictor() else {
            z.fill(1.0 / self.params.classes as f32);
            return Ok(z);
        };
        general_mat_mul(1.0, &x, &w, 0.0, &mut z);
        if let Some(r) = first_non_finite_row(z.view()) {
            return Err(Error::usage(format!(
                "logreg: batch row {r}: the logits overflow f32 (features too large)"
            )));
        }
        for row in z.rows_mut() {
            softmax_row(row, b);
        }
        Ok(z)
    }

    /// See [`Learner::save`], through the shared [`save_checkpoint`]. The tensors file
    /// holds `"bias"` (K, F32) and, once the width is fixed, `"weights"` (d × K, F32),
    /// and the averages (`"avg_weights"`, `"avg_bias"`) once averaging has begun;
    /// `model.json` has `params`, `seen`, `steps`, `averaged` and `n_features` (`null`
    /// before the first batch). Both carry the counters' [`stamp`].
    fn save(&self, dir: &Path) -> Result<()> {
        let k = self.params.classes;
        let mut tensors = TensorsOut::default();
        tensors.f32("bias", &[k], self.bias.iter());
        if let Some(w) = &self.weights {
            tensors.f32("weights", &[w.nrows(), k], w.iter());
        }
        if let Some((w, b)) = &self.avg {
            tensors.f32("avg_weights", &[w.nrows(), k], w.iter());
            tensors.f32("avg_bias", &[k], b.iter());
        }
        let meta = Meta {
            model: NAME.to_string(),
            params: self.params.clone(),
            seen: self.seen,
            steps: self.steps,
            averaged: self.averaged,
            n_features: self.n_features(),
        };
        let stamp = stamp(self.seen, self.steps, self.averaged);
        save_checkpoint(dir, NAME, &stamp, &meta, tensors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::{Dtype, TensorView};
    use std::collections::HashMap;

    /// Little-endian bytes of an f32 array in logical (row-major) order.
    fn le_bytes<'a>(values: impl IntoIterator<Item = &'a f32>) -> Vec<u8> {
        values.into_iter().flat_map(|v| v.to_le_bytes()).collect()
    }
    use crate::model;
    use crate::model::CLASSES;
    use ndarray::array;
    use std::fs;
    use std::time::Instant;

    /// SplitMix64: a tiny deterministic generator for test data.
    struct Rng(u64);

    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        /// Uniform in [0, 1).
        fn uniform(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
        }
        /// Standard normal (Box–Muller).
        fn normal(&mut self) -> f64 {
            let u = 1.0 - self.uniform();
            let v = self.uniform();
            (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
        }
        fn label(&mut self) -> u16 {
            (self.next_u64() % CLASSES as u64) as u16
        }
    }

    fn params(lr: f32, alpha: f32, batch_size: usize) -> LogRegParams {
        LogRegParams {
            lr,
            alpha,
            batch_size,
            seed: 0,
            average: 0,
            classes: CLASSES,
        }
    }

    /// `n` images from 10 Gaussian blobs in `d` dimensions (centres drawn from `centres`).
    fn blobs(
        rng: &mut Rng,
        centres: &Array2<f32>,
        n: usize,
        spread: f64,
    ) -> (Array2<f32>, Array1<u16>) {
        let d = centres.ncols();
        let y: Array1<u16> = (0..n).map(|_| rng.label()).collect();
        let x = Array2::from_shape_fn((n, d), |(i, j)| {
            centres[[usize::from(y[i]), j]] + (spread * rng.normal()) as f32
        });
        (x, y)
    }

    fn accuracy(m: &dyn Learner, x: ArrayView2<f32>, y: ArrayView1<u16>) -> f64 {
        let pred = m.predict(x).unwrap();
        pred.iter().zip(y).filter(|(p, t)| p == t).count() as f64 / y.len() as f64
    }

    /// The documented objective, naively and in f64.
    fn objective_f64(
        w: &Array2<f64>,
        b: &Array1<f64>,
        alpha: f64,
        x: &Array2<f64>,
        y: &[u16],
    ) -> f64 {
        let n = x.nrows();
        let mut ce = 0.0;
        for i in 0..n {
            let logits: Vec<f64> = (0..CLASSES)
                .map(|k| b[k] + (0..x.ncols()).map(|j| x[[i, j]] * w[[j, k]]).sum::<f64>())
                .collect();
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
            ce += lse - logits[usize::from(y[i])];
        }
        ce / n as f64 + alpha / 2.0 * w.iter().map(|v| v * v).sum::<f64>()
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let mut rng = Rng(7);
        let (n, d, alpha) = (5, 7, 0.3f32);
        let x = Array2::from_shape_fn((n, d), |_| rng.normal() as f32);
        let y: Array1<u16> = (0..n).map(|_| rng.label()).collect();
        let mut m = LogReg::new(params(0.1, alpha, 4)).unwrap();
        m.weights = Some(Array2::from_shape_fn((d, CLASSES), |_| rng.normal() as f32));
        m.bias = Array1::from_shape_fn(CLASSES, |_| rng.normal() as f32);
        let (loss, g, gb) = m.loss_and_grad(x.view(), y.view()).unwrap();

        let x64 = x.mapv(f64::from);
        let mut w64 = m.weights.as_ref().unwrap().mapv(f64::from);
        let mut b64 = m.bias.mapv(f64::from);
        let y = y.to_vec();
        let a = f64::from(alpha);
        let reference = objective_f64(&w64, &b64, a, &x64, &y);
        assert!(
            (loss - reference).abs() <= 1e-5 * reference.abs(),
            "{loss} vs {reference}"
        );

        let h = 1e-5;
        let close = |analytic: f32, numeric: f64, what: String| {
            let analytic = f64::from(analytic);
            let rel = (analytic - numeric).abs() / analytic.abs().max(numeric.abs()).max(1e-3);
            assert!(
                rel <= 1e-3,
                "{what}: analytic {analytic} vs numeric {numeric}"
            );
        };
        for j in 0..d {
            for k in 0..CLASSES {
                let v = w64[[j, k]];
                w64[[j, k]] = v + h;
                let up = objective_f64(&w64, &b64, a, &x64, &y);
                w64[[j, k]] = v - h;
                let down = objective_f64(&w64, &b64, a, &x64, &y);
                w64[[j, k]] = v;
                close(g[[j, k]], (up - down) / (2.0 * h), format!("dW[{j},{k}]"));
            }
        }
        for k in 0..CLASSES {
            let v = b64[k];
            b64[k] = v + h;
            let up = objective_f64(&w64, &b64, a, &x64, &y);
            b64[k] = v - h;
            let down = objective_f64(&w64, &b64, a, &x64, &y);
            b64[k] = v;
            close(gb[k], (up - down) / (2.0 * h), format!("db[{k}]"));
        }
    }

    #[test]
    fn one_step_by_hand() {
        // Two images, two features, lr = 0.5, alpha = 0.1, one mini-batch of both:
        //   x1 = [1, 0], y1 = 0;  x2 = [0, 2], y2 = 1;  W = 0, b = 0.
        // All logits are 0, so P = 0.1 everywhere and the loss is ln 10 = 2.302585.
        //   P − Y: row 1 = [-0.9, 0.1, 0.1 ×8], row 2 = [0.1, -0.9, 0.1 ×8].
        //   G = Xᵀ(P − Y)/2 + 0.1·0:
        //     G[0] = (1·row1 + 0·row2)/2 = [-0.45, 0.05, 0.05 ×8]
        //     G[1] = (0·row1 + 2·row2)/2 = [0.1, -0.9, 0.1 ×8]
        //   W = −0.5·G: W[0] = [0.225, −0.025 ×9], W[1] = [−0.05, 0.45, −0.05 ×8]
        //   mean(P − Y) = [−0.4, −0.4, 0.1 ×8], so b = [0.2, 0.2, −0.05 ×8].
        let x = array![[1.0f32, 0.0], [0.0, 2.0]];
        let y = array![0u16, 1];
        let mut m = LogReg::new(params(0.5, 0.1, 2)).unwrap();
        let loss = m.partial_fit(x.view(), y.view()).unwrap();
        assert!((loss - 10f64.ln()).abs() < 1e-6, "{loss}");
        let mut w = Array2::from_elem((2, CLASSES), -0.025f32);
        w[[0, 0]] = 0.225;
        w.row_mut(1).fill(-0.05);
        w[[1, 1]] = 0.45;
        let mut b = Array1::from_elem(CLASSES, -0.05f32);
        b[0] = 0.2;
        b[1] = 0.2;
        let got = m.weights().unwrap();
        assert!(
            got.iter().zip(&w).all(|(g, e)| (g - e).abs() < 1e-6),
            "{got}"
        );
        assert!(
            m.bias().iter().zip(&b).all(|(g, e)| (g - e).abs() < 1e-6),
            "{}",
            m.bias()
        );
        assert_eq!((m.seen(), m.steps()), (2, 1));
    }

    #[test]
    fn two_steps_by_hand_with_weight_decay() {
        // Same data, but mini-batches of one image, so the second step sees W ≠ 0.
        // Step 1 (x1 = [1, 0], y = 0): P = 0.1, P − Y = D1 = [−0.9, 0.1 ×9], loss ln 10.
        //   G = x1ᵀ·D1 + 0.1·0: G[0] = D1, G[1] = 0.
        //   W[0] = −0.5·D1 = [0.45, −0.05 ×9], W[1] = 0; b = −0.5·D1 = [0.45, −0.05 ×9].
        // Step 2 (x2 = [0, 2], y = 1): logits = 2·W[1] + b = b = [0.45, −0.05 ×9].
        //   e^0.45 = 1.5683122, e^−0.05 = 0.9512294, Σ = 1.5683122 + 9·0.9512294 = 10.129377
        //   p0 = 0.15482810, p_other = 0.09390799; loss = ln Σ + 0.05 = 2.3654398
        //   D2 = P − Y = [p0, p_other − 1, p_other ×8]
        //   G[0] = 0·D2 + 0.1·W[0] → W[0] −= 0.5·0.1·W[0], i.e. W[0] = 0.95·W[0]
        //        = [0.4275, −0.0475 ×9]
        //   G[1] = 2·D2 + 0.1·0 → W[1] = −D2 = [−0.15482810, 0.90609201, −0.09390799 ×8]
        //   b −= 0.5·D2: b = [0.45 − 0.07741405, −0.05 + 0.45304600, −0.05 − 0.04695399 ×8]
        //              = [0.37258595, 0.40304601, −0.09695399 ×8]
        // Returned loss: (2.3025851 + 2.3654398)/2 = 2.3340125.
        let x = array![[1.0f32, 0.0], [0.0, 2.0]];
        let y = array![0u16, 1];
        let mut m = LogReg::new(params(0.5, 0.1, 1)).unwrap();
        let loss = m.partial_fit(x.view(), y.view()).unwrap();
        assert!((loss - 2.3340125).abs() < 1e-6, "{loss}");
        let mut w = Array2::from_elem((2, CLASSES), -0.0475f32);
        w[[0, 0]] = 0.4275;
        w.row_mut(1).fill(-0.09390799);
        w[[1, 0]] = -0.1548281;
        w[[1, 1]] = 0.906_092;
        let mut b = Array1::from_elem(CLASSES, -0.09695399f32);
        b[0] = 0.37258595;
        b[1] = 0.403_046;
        let got = m.weights().unwrap();
        assert!(
            got.iter().zip(&w).all(|(g, e)| (g - e).abs() < 1e-6),
            "{got}"
        );
        assert!(
            m.bias().iter().zip(&b).all(|(g, e)| (g - e).abs() < 1e-6),
            "{}",
            m.bias()
        );
        assert_eq!((m.seen(), m.steps()), (2, 2));
    }

    fn trained_on_blobs() -> (LogReg, Array2<f32>, Array1<u16>) {
        let mut rng = Rng(42);
        let centres = Array2::from_shape_fn((CLASSES, 20), |_| rng.normal() as f32);
        let (x, y) = blobs(&mut rng, &centres, 3000, 1.0);
        let (xt, yt) = blobs(&mut rng, &centres, 1000, 1.0);
        let p = LogRegParams {
            average: 1000,
            ..params(0.1, 1e-4, 32)
        };
        let mut m = LogReg::new(p).unwrap();
        let mut losses = vec![];
        for _ in 0..3 {
            let mut total = 0.0;
            for (xb, yb) in x
                .axis_chunks_iter(Axis(0), 500)
                .zip(y.axis_chunks_iter(Axis(0), 500))
            {
                total += m.partial_fit(xb, yb).unwrap();
            }
            losses.push(total / 6.0);
        }
        assert!(losses[0] > losses[1] && losses[1] > losses[2], "{losses:?}");
        assert_eq!(m.seen(), 9000);
        assert_eq!(m.steps(), 3 * 6 * 16);
        (m, xt, yt)
    }

    #[test]
    fn learns_gaussian_blobs() {
        let (m, xt, yt) = trained_on_blobs();
        let acc = accuracy(&m, xt.view(), yt.view());
        println!("blobs: held-out accuracy {acc}");
        assert!(acc > 0.9, "accuracy {acc}");
        let p = m.predict_proba(xt.view()).unwrap();
        assert_eq!(p.dim(), (1000, CLASSES));
        assert!(p.rows().into_iter().all(|r| (r.sum() - 1.0).abs() < 1e-5));
    }

    #[test]
    fn save_load_is_exact() {
        let (m, xt, yt) = trained_on_blobs();
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("a/b");
        m.save(&ckpt).unwrap();
        m.save(&ckpt).unwrap(); // overwriting is fine
        let mut names: Vec<_> = fs::read_dir(&ckpt)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [META_FILE, TENSORS_FILE]);
        let meta: serde_json::Value =
            serde_json::from_slice(&fs::read(ckpt.join(META_FILE)).unwrap()).unwrap();
        assert_eq!(meta["model"], "logreg");
        assert_eq!(meta["n_features"], 20);
        assert_eq!(meta["seen"], 9000);

        let loaded = model::load(&ckpt).unwrap();
        assert_eq!(loaded.name(), "logreg");
        assert_eq!(loaded.n_features(), Some(20));
        let a = m.predict_proba(xt.view()).unwrap();
        let b = loaded.predict_proba(xt.view()).unwrap();
        assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));

        // Training on from both gives the same model.
        let mut m2 = LogReg::load(&ckpt).unwrap();
        assert_eq!(m2.params(), m.params());
        assert_eq!((m2.seen(), m2.steps()), (m.seen(), m.steps()));
        let mut m1 = m.clone();
        let l1 = m1.partial_fit(xt.view(), yt.view()).unwrap();
        let l2 = m2.partial_fit(xt.view(), yt.view()).unwrap();
        assert_eq!(l1.to_bits(), l2.to_bits());
        assert_eq!(m1.weights(), m2.weights());
        assert_eq!(m1.bias(), m2.bias());
        assert!(m1.averaged().is_some());
        assert_eq!(m1.averaged(), m2.averaged());
    }

    /// A checkpoint written before logreg saved through the shared checkpoint code: no
    /// stamp, the counters as metadata keys of the tensors file. It still loads, to the
    /// same model.
    #[test]
    fn a_checkpoint_from_before_the_shared_save_loads() {
        let (m, xt, _) = trained_on_blobs();
        let dir = tempfile::tempdir().unwrap();
        m.save(dir.path()).unwrap();
        let js = dir.path().join(META_FILE);
        let mut meta: serde_json::Value = serde_json::from_slice(&fs::read(&js).unwrap()).unwrap();
        assert!(meta.as_object_mut().unwrap().remove("stamp").is_some());
        fs::write(&js, serde_json::to_vec_pretty(&meta).unwrap()).unwrap();
        let (w, b) = (le_bytes(m.weights().unwrap()), le_bytes(m.bias()));
        let (k, d) = (m.params().classes, m.n_features().unwrap());
        let (aw, ab, averaged) = m.averaged().unwrap();
        let (aw, ab) = (le_bytes(aw), le_bytes(ab));
        let views = vec![
            ("bias", TensorView::new(Dtype::F32, vec![k], &b).unwrap()),
            (
                "weights",
                TensorView::new(Dtype::F32, vec![d, k], &w).unwrap(),
            ),
            (
                "avg_bias",
                TensorView::new(Dtype::F32, vec![k], &ab).unwrap(),
            ),
            (
                "avg_weights",
                TensorView::new(Dtype::F32, vec![d, k], &aw).unwrap(),
            ),
        ];
        let md = HashMap::from([
            ("model".to_string(), NAME.to_string()),
            ("seen".to_string(), m.seen().to_string()),
            ("steps".to_string(), m.steps().to_string()),
            ("averaged".to_string(), averaged.to_string()),
        ]);
        let st = dir.path().join(TENSORS_FILE);
        fs::write(&st, safetensors::serialize(views, &Some(md)).unwrap()).unwrap();
        let loaded = LogReg::load(dir.path()).unwrap();
        let (a, b) = (
            m.predict_proba(xt.view()).unwrap(),
            loaded.predict_proba(xt.view()).unwrap(),
        );
        assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
        assert_eq!((loaded.seen(), loaded.steps()), (m.seen(), m.steps()));
    }

    #[test]
    fn untrained_model_saves_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let p = LogRegParams {
            lr: 0.037,
            alpha: 3e-5,
            batch_size: 7,
            seed: 99,
            average: 5,
            classes: 7,
        };
        LogReg::new(p.clone()).unwrap().save(dir.path()).unwrap();
        let m = LogReg::load(dir.path()).unwrap();
        assert_eq!(m.params(), &p);
        assert_eq!(m.n_features(), None);
        let x = Array2::<f32>::zeros((3, 5));
        let proba = model::load(dir.path())
            .unwrap()
            .predict_proba(x.view())
            .unwrap();
        // Seven classes (the params'): uniform over them.
        assert_eq!(proba.ncols(), 7);
        assert!(proba.iter().all(|&v| v == 1.0 / 7.0));
    }

    /// The error names `file` (as a path ending in it).
    fn names(e: &Error, file: &str) -> bool {
        match e {
            Error::Io { path, .. } | Error::Format { path, .. } => path.ends_with(file),
            _ => false,
        }
    }

    #[test]
    fn bad_checkpoints_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = LogReg::new(params(0.01, 1e-4, 128)).unwrap();
        let x = Array2::from_shape_fn((4, 3), |(i, j)| (i + j) as f32);
        m.partial_fit(x.view(), array![0u16, 1, 2, 3].view())
            .unwrap();
        m.save(dir.path()).unwrap();
        let st = dir.path().join(TENSORS_FILE);
        let js = dir.path().join(META_FILE);
        let good_st = fs::read(&st).unwrap();
        let good_js = fs::read(&js).unwrap();
        let check = |what: &str, file: &str| {
            let e = model::load(dir.path())
                .err()
                .unwrap_or_else(|| panic!("{what}: loaded"));
            assert!(names(&e, file), "{what}: {e}");
            let e = LogReg::load(dir.path()).err().unwrap();
            assert!(names(&e, file), "{what}: {e}");
            e
        };

        for cut in [0, 5, 8, 20, good_st.len() - 1] {
            fs::write(&st, &good_st[..cut]).unwrap();
            check(&format!("tensors cut at {cut}"), TENSORS_FILE);
        }
        fs::write(&st, b"\xff\xff\xff\xff\xff\xff\xff\xffgarbage").unwrap();
        check("garbage tensors", TENSORS_FILE);
        let mut extra = good_st.clone();
        extra.push(0);
        fs::write(&st, &extra).unwrap();
        check("trailing byte", TENSORS_FILE);

        // Well-formed safetensors files with the wrong content.
        let write_st = |tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)>, seen: &str| {
            let views: Vec<_> = tensors
                .iter()
                .map(|(n, t, s, b)| (*n, TensorView::new(*t, s.clone(), b).unwrap()))
                .collect();
            let md = HashMap::from([
                ("seen".to_string(), seen.to_string()),
                ("steps".to_string(), "1".to_string()),
            ]);
            fs::write(&st, safetensors::serialize(views, &Some(md)).unwrap()).unwrap();
        };
        let f32s = |n: usize, v: f32| le_bytes(&vec![v; n]);
        let bias = ("bias", Dtype::F32, vec![10], f32s(10, 0.0));
        write_st(
            vec![
                bias.clone(),
                ("weights", Dtype::F32, vec![3, 10], f32s(30, 0.5)),
            ],
            "4",
        );
        assert!(
            model::load(dir.path()).is_ok(),
            "the hand-written file is fine"
        );
        write_st(
            vec![
                bias.clone(),
                ("weights", Dtype::F32, vec![4, 10], f32s(40, 0.5)),
            ],
            "4",
        );
        let e = check("wrong weights shape", TENSORS_FILE);
        assert!(e.to_string().contains("shape"), "{e}");
        write_st(
            vec![
                bias.clone(),
                ("weights", Dtype::F32, vec![30], f32s(30, 0.5)),
            ],
            "4",
        );
        check("flat weights", TENSORS_FILE);
        write_st(
            vec![
                bias.clone(),
                ("weights", Dtype::F64, vec![3, 10], vec![0; 240]),
            ],
            "4",
        );
        let e = check("f64 weights", TENSORS_FILE);
        assert!(e.to_string().contains("dtype"), "{e}");
        write_st(vec![bias.clone()], "4");
        check("no weights", TENSORS_FILE);
        write_st(
            vec![
                bias.clone(),
                ("weights", Dtype::F32, vec![3, 10], f32s(30, 0.5)),
                ("extra", Dtype::F32, vec![1], f32s(1, 0.5)),
            ],
            "4",
        );
        check("extra tensor", TENSORS_FILE);
        let mut nan = f32s(30, 0.5);
        nan[4 * 7..4 * 8].copy_from_slice(&f32::NAN.to_le_bytes());
        write_st(
            vec![bias.clone(), ("weights", Dtype::F32, vec![3, 10], nan)],
            "4",
        );
        let e = check("NaN weight", TENSORS_FILE);
        assert!(e.to_string().contains("element 7"), "{e}");
        write_st(
            vec![
                bias.clone(),
                ("weights", Dtype::F32, vec![3, 10], f32s(30, 0.5)),
            ],
            "5",
        );
        let e = check("torn save", TENSORS_FILE);
        assert!(e.to_string().contains("different saves"), "{e}");
        fs::remove_file(&st).unwrap();
        check("missing tensors", TENSORS_FILE);
        fs::write(&st, &good_st).unwrap();

        // model.json problems.
        let text = String::from_utf8(good_js.clone()).unwrap();
        // The rate as the file writes it (an f32's f64 widening).
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        let lr = format!("\"lr\": {}", parsed["params"]["lr"]);
        for (what, bad) in [
            ("truncated json", text[..text.len() / 2].to_string()),
            ("not json", "hello".to_string()),
            ("negative lr", text.replace(&lr, "\"lr\": -1.0")),
            (
                "zero batch",
                text.replace("\"batch_size\": 128", "\"batch_size\": 0"),
            ),
            (
                "n_features mismatch",
                text.replace("\"n_features\": 3", "\"n_features\": 4"),
            ),
            (
                "n_features 0",
                text.replace("\"n_features\": 3", "\"n_features\": 0"),
            ),
            ("seen mismatch", text.replace("\"seen\": 4", "\"seen\": 5")),
            (
                "unknown param",
                text.replace("\"seed\": 0", "\"seed\": 0, \"momentum\": 1"),
            ),
            (
                "wrong type",
                text.replace("\"steps\": 1", "\"steps\": \"one\""),
            ),
        ] {
            assert_ne!(bad, text, "{what}: the edit did not apply");
            fs::write(&js, bad).unwrap();
            let file = if what.contains("mismatch") {
                TENSORS_FILE
            } else {
                META_FILE
            };
            check(what, file);
        }
        let e = {
            fs::write(&js, text.replace("\"logreg\"", "\"svm\"")).unwrap();
            model::load(dir.path()).err().unwrap()
        };
        assert!(names(&e, META_FILE) && e.to_string().contains("svm"), "{e}");
        fs::write(&js, &good_js).unwrap();
        assert!(model::load(dir.path()).is_ok());
    }

    #[test]
    fn json_errors_point_at_the_byte() {
        let dir = tempfile::tempdir().unwrap();
        let js = dir.path().join(META_FILE);
        fs::write(&js, "{\n  \"model\": \"logreg\",\n  \"seen\": x\n}").unwrap();
        match LogReg::load(dir.path()).err().unwrap() {
            Error::Format { offset, .. } => assert_eq!(offset, 33),
            e => panic!("{e}"),
        }
    }

    #[test]
    fn bad_batches_are_errors_and_change_nothing() {
        let mut m = LogReg::new(params(0.1, 0.0, 2)).unwrap();
        let x = Array2::from_shape_fn((3, 4), |(i, j)| (i * j) as f32 / 10.0);
        let y = array![1u16, 2, 3];

        // Empty batch: Ok(0), nothing changes, the width is not fixed.
        let empty = Array2::<f32>::zeros((0, 4));
        assert_eq!(m.partial_fit(empty.view(), array![].view()).unwrap(), 0.0);
        assert_eq!((m.n_features(), m.seen(), m.steps()), (None, 0, 0));
        assert!(m.loss_and_grad(empty.view(), array![].view()).is_err());
        assert!(m.partial_fit(x.view(), array![1u16, 10, 3].view()).is_err());
        assert_eq!(m.n_features(), None, "a rejected first batch fixes nothing");

        m.partial_fit(x.view(), y.view()).unwrap();
        let before = m.clone();
        let same = |m: &LogReg| {
            m.weights() == before.weights()
                && m.bias() == before.bias()
                && (m.seen(), m.steps()) == (before.seen(), before.steps())
        };
        let wide = Array2::<f32>::zeros((3, 5));
        let e = m.partial_fit(wide.view(), y.view()).unwrap_err();
        assert!(
            e.to_string().contains("5 features") && e.to_string().contains("expects 4"),
            "{e}"
        );
        assert!(m.predict_proba(wide.view()).is_err());
        assert!(m.predict(wide.view()).is_err());
        assert!(m.loss_and_grad(wide.view(), y.view()).is_err());
        let e = m
            .partial_fit(x.view(), array![1u16, 2, 10].view())
            .unwrap_err();
        assert!(e.to_string().contains("label 10"), "{e}");
        assert!(m.partial_fit(x.view(), array![1u16, 2].view()).is_err());
        let mut nan = x.clone();
        nan[[2, 1]] = f32::NAN;
        assert!(m.partial_fit(nan.view(), y.view()).is_err());
        assert!(m.predict_proba(nan.view()).is_err());
        let mut big = m.clone();
        big.weights.as_mut().unwrap().fill(1.0);
        let e = big
            .predict_proba(Array2::from_elem((2, 4), f32::MAX).view())
            .unwrap_err();
        assert!(e.to_string().contains("overflow"), "{e}");
        nan[[2, 1]] = f32::INFINITY;
        assert!(m.partial_fit(nan.view(), y.view()).is_err());
        assert_eq!(m.partial_fit(empty.view(), array![].view()).unwrap(), 0.0);
        assert!(same(&m));
        assert_eq!(m.predict_proba(empty.view()).unwrap().dim(), (0, CLASSES));

        // Steps that would overflow the weights are refused.
        let mut m = LogReg::new(params(1e10, 0.0, 2)).unwrap();
        let huge = Array2::from_elem((2, 4), 1e30f32);
        let e = m
            .partial_fit(huge.view(), array![0u16, 1].view())
            .unwrap_err();
        assert!(e.to_string().contains("non-finite"), "{e}");
        assert!(m.weights().unwrap().iter().all(|&v| v == 0.0));
        assert!(m.bias().iter().all(|&v| v == 0.0));
        assert_eq!((m.seen(), m.steps()), (0, 0));
    }

    #[test]
    fn accepts_non_contiguous_views() {
        let mut rng = Rng(3);
        let x = Array2::from_shape_fn((6, 8), |_| rng.normal() as f32);
        let y: Array1<u16> = (0..6).map(|_| rng.label()).collect();
        let xt = x.t().to_owned(); // 8 × 6, so xt.t() is a column-major 6 × 8 view
        let mut a = LogReg::new(params(0.1, 0.01, 4)).unwrap();
        let mut b = a.clone();
        let la = a.partial_fit(x.view(), y.view()).unwrap();
        let lb = b.partial_fit(xt.t(), y.view()).unwrap();
        assert!((la - lb).abs() < 1e-6);
        let pa = a.predict_proba(x.view()).unwrap();
        let pb = b.predict_proba(xt.t()).unwrap();
        assert!(pa.iter().zip(&pb).all(|(p, q)| (p - q).abs() < 1e-6));
    }

    /// Mean cross-entropy of a model's probabilities on `(x, y)`, in f64.
    fn mean_ce(m: &LogReg, x: ArrayView2<f32>, y: ArrayView1<u16>) -> f64 {
        let p = m.predict_proba(x).unwrap();
        let total: f64 = p
            .rows()
            .into_iter()
            .zip(y)
            .map(|(r, &k)| -f64::from(r[usize::from(k)]).ln())
            .sum();
        total / y.len() as f64
    }

    #[test]
    fn averaging_is_the_mean_of_the_iterates() {
        // A model without averaging, stepped one mini-batch at a time, gives the
        // iterates; their mean from the step that reaches image 40 on, in f64, is what
        // the averaging model must hold. Its own iterates are the same, bit for bit.
        let mut rng = Rng(5);
        let centres = Array2::from_shape_fn((CLASSES, 6), |_| rng.normal() as f32);
        let (x, y) = blobs(&mut rng, &centres, 200, 2.0);
        let mut last = LogReg::new(params(0.3, 1e-3, 16)).unwrap();
        let p = LogRegParams {
            average: 40,
            ..params(0.3, 1e-3, 16)
        };
        let mut avg = LogReg::new(p).unwrap();
        assert!(avg.averaged().is_none());
        let (mut sum_w, mut sum_b) = (
            Array2::<f64>::zeros((6, CLASSES)),
            Array1::<f64>::zeros(CLASSES),
        );
        let mut k = 0u64;
        // Batches of 50 cut into mini-batches of 16, 16, 16, 2: steps end at uneven images.
        for (xb, yb) in x
            .axis_chunks_iter(Axis(0), 50)
            .zip(y.axis_chunks_iter(Axis(0), 50))
        {
            avg.partial_fit(xb, yb).unwrap();
            for (xm, ym) in xb
                .axis_chunks_iter(Axis(0), 16)
                .zip(yb.axis_chunks_iter(Axis(0), 16))
            {
                last.partial_fit(xm, ym).unwrap();
                if last.seen() >= 40 {
                    k += 1;
                    sum_w += &last.weights().unwrap().mapv(f64::from);
                    sum_b += &last.bias().mapv(f64::from);
                }
            }
        }
        assert_eq!(avg.weights(), last.weights());
        assert_eq!(avg.bias(), last.bias());
        let (aw, ab, n) = avg.averaged().unwrap();
        // Steps end at images 16, 32, 48, 50, 66, …: the first averaged is the 3rd.
        assert_eq!((n, k, avg.steps()), (14, 14, 16));
        let close = |a: f32, b: f64| (f64::from(a) - b).abs() <= 1e-5 * (1.0 + b.abs());
        assert!(aw
            .iter()
            .zip(&(sum_w / k as f64))
            .all(|(&a, &b)| close(a, b)));
        assert!(ab
            .iter()
            .zip(&(sum_b / k as f64))
            .all(|(&a, &b)| close(a, b)));
        // And it predicts with the average, not with the last iterate.
        assert_ne!(
            avg.predict_proba(x.view()).unwrap(),
            last.predict_proba(x.view()).unwrap()
        );
    }

    #[test]
    fn averaging_steadies_a_fixed_step() {
        // Overlapping blobs and too large a fixed step: the last iterate jumps around
        // the optimum, the average of the iterates sits closer to it.
        let mut rng = Rng(11);
        let centres = Array2::from_shape_fn((CLASSES, 30), |_| rng.normal() as f32);
        let (x, y) = blobs(&mut rng, &centres, 4000, 2.5);
        let (xt, yt) = blobs(&mut rng, &centres, 2000, 2.5);
        let fit = |average: u64| {
            let p = LogRegParams {
                average,
                ..params(2.0, 1e-4, 32)
            };
            let mut m = LogReg::new(p).unwrap();
            for _ in 0..2 {
                m.partial_fit(x.view(), y.view()).unwrap();
            }
            m
        };
        let (last, avg) = (fit(0), fit(1));
        let (ce_last, ce_avg) = (
            mean_ce(&last, xt.view(), yt.view()),
            mean_ce(&avg, xt.view(), yt.view()),
        );
        let (acc_last, acc_avg) = (
            accuracy(&last, xt.view(), yt.view()),
            accuracy(&avg, xt.view(), yt.view()),
        );
        println!("held-out: last iterate ce {ce_last:.3} acc {acc_last:.3}; averaged ce {ce_avg:.3} acc {acc_avg:.3}");
        assert!(ce_avg < 0.8 * ce_last, "{ce_avg} vs {ce_last}");
        assert!(acc_avg > acc_last, "{acc_avg} vs {acc_last}");
    }

    #[test]
    fn bad_averages_in_a_checkpoint_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = LogReg::new(LogRegParams::default()).unwrap();
        let x = Array2::from_shape_fn((4, 3), |(i, j)| (i + j) as f32);
        m.partial_fit(x.view(), array![0u16, 1, 2, 3].view())
            .unwrap();
        m.save(dir.path()).unwrap();
        assert_eq!(LogReg::load(dir.path()).unwrap().averaged(), m.averaged());
        let js = dir.path().join(META_FILE);
        let good = fs::read_to_string(&js).unwrap();
        assert!(good.contains("\"averaged\": 1"), "{good}");
        fs::write(&js, good.replace("\"averaged\": 1", "\"averaged\": 2")).unwrap();
        let e = LogReg::load(dir.path()).err().unwrap();
        assert!(
            names(&e, META_FILE) && e.to_string().contains("only 1 steps"),
            "{e}"
        );
        fs::write(&js, good.replace("\"averaged\": 1", "\"averaged\": 0")).unwrap();
        let e = LogReg::load(dir.path()).err().unwrap();
        assert!(
            names(&e, TENSORS_FILE) && e.to_string().contains("different saves"),
            "{e}"
        );
    }

    #[test]
    fn params_are_checked() {
        assert!(LogRegParams::default().check().is_ok());
        for p in [
            params(0.0, 0.0, 1),
            params(-0.1, 0.0, 1),
            params(f32::NAN, 0.0, 1),
            params(f32::INFINITY, 0.0, 1),
            params(0.1, -1.0, 1),
            params(0.1, f32::NAN, 1),
            params(0.1, 0.0, 0),
        ] {
            assert!(p.check().is_err(), "{p:?}");
            assert!(LogReg::new(p).is_err());
        }
        let p: LogRegParams = serde_json::from_str("{\"lr\": 0.5}").unwrap();
        assert_eq!(
            p,
            LogRegParams {
                lr: 0.5,
                ..LogRegParams::default()
            }
        );
        assert!(serde_json::from_str::<LogRegParams>("{\"lrr\": 0.5}").is_err());
    }

    /// Throughput of partial_fit at d = 3072, mini-batches of 128 (run with
    /// `cargo test --release -- --ignored --nocapture throughput`).
    #[test]
    #[ignore]
    fn throughput() {
        let (n, d) = (16_384, 3072);
        let mut rng = Rng(1);
        let x = Array2::from_shape_fn((n, d), |_| (rng.uniform() * 2.0 - 1.0) as f32);
        let y: Array1<u16> = (0..n).map(|_| rng.label()).collect();
        let mut m = LogReg::new(LogRegParams::default()).unwrap();
        m.partial_fit(x.slice(s![..1024, ..]), y.slice(s![..1024]))
            .unwrap(); // warm up
        let passes = 4;
        let t = Instant::now();
        for _ in 0..passes {
            // Batches of 1024 images as they might come off the stream.
            for (xb, yb) in x
                .axis_chunks_iter(Axis(0), 1024)
                .zip(y.axis_chunks_iter(Axis(0), 1024))
            {
                m.partial_fit(xb, yb).unwrap();
            }
        }
        let fit = (passes * n) as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut s = 0.0;
        for _ in 0..passes {
            s += m.predict_proba(x.view()).unwrap()[[0, 0]];
        }
        let pred = (passes * n) as f64 / t.elapsed().as_secs_f64();
        println!("logreg d={d} batch 128: partial_fit {fit:.0} images/s, predict_proba {pred:.0} images/s ({s})");
        assert!(fit >= 50_000.0, "partial_fit {fit:.0} images/s");
    }
}
