//! `mlp`: a fully connected network (hidden layers with ReLU, softmax output) learnt by
//! mini-batch gradient descent with Adam or SGD with momentum, as scikit-learn's
//! `MLPClassifier.partial_fit`.
//!
//! Each incoming batch is visited `passes` times (default 1, as `partial_fit`), each time
//! in a seeded random order (`shuffle`, default on) and cut into mini-batches of
//! `batch_size` images, one step each. For a mini-batch of `m` images the objective is
//! scikit-learn's: `mean CE(softmax(f(X)), y) + alpha/(2m)·Σ‖W_l‖²` (biases not
//! penalised), the cross-entropy computed from the logits by log-sum-exp. Weights start
//! from Glorot-uniform (`init = "glorot"`, scikit-learn's: `U(±sqrt(6/(fan_in+fan_out)))`)
//! or He-normal (`"he"`, `N(0, 2/fan_in)`) draws from the run seed; biases likewise
//! (Glorot) or zero (He). Adam is scikit-learn's (bias-corrected step
//! `lr·sqrt(1−β2ᵗ)/(1−β1ᵗ)`); SGD is `u ← momentum·u − lr·g`, `θ ← θ + u` (Nesterov:
//! `θ ← θ + momentum·u − lr·g`).
//!
//! Every matrix product goes through ndarray's `general_mat_mul` (matrixmultiply's SIMD
//! GEMM; measured here at least as fast as the `gemm` crate at the MLP's shapes, see
//! `benches/features.rs`), the first layer's two large ones split into two row bands on
//! two threads; a step allocates nothing.

use std::path::Path;

use ndarray::linalg::general_mat_mul;
use ndarray::{s, Array1, Array2, ArrayView1, ArrayView2, Axis, Zip};
use serde::{Deserialize, Serialize};

use super::kernels::par_gemm;
use super::{
    check_batch, check_features, save_checkpoint, Checkpoint, Learner, SplitMix, TensorsOut,
};
use crate::error::{Error, Result};

/// The model's name: [`Learner::name`] and the `"model"` field of its checkpoint.
pub(crate) const NAME: &str = "mlp";

/// The optimiser.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Optimizer {
    /// Adam (the default, as the original).
    Adam,
    /// SGD with momentum.
    Sgd,
}

/// Weight initialisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Init {
    /// Glorot (Xavier) uniform, scikit-learn's.
    Glorot,
    /// He normal.
    He,
}

/// Hyper-parameters of [`Mlp`]. Missing fields take their defaults when read from a
/// config; unknown fields are an error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MlpParams {
    /// Sizes of the hidden layers, each ≥ 1. Default `[128, 64]`.
    pub hidden: Vec<usize>,
    /// `adam` (default) or `sgd`.
    pub optimizer: Optimizer,
    /// Learning rate, > 0. Default 3e-4 (the original's).
    pub lr: f32,
    /// L2 penalty (scikit-learn's convention, divided by the mini-batch size), ≥ 0.
    /// Default 5e-4 (the original's).
    pub alpha: f32,
    /// Adam's β1, in [0, 1). Default 0.9.
    pub beta1: f32,
    /// Adam's β2, in [0, 1). Default 0.999.
    pub beta2: f32,
    /// Adam's ε, > 0. Default 1e-8.
    pub eps: f32,
    /// SGD momentum, in [0, 1). Default 0.9.
    pub momentum: f32,
    /// Nesterov momentum for SGD. Default true (scikit-learn's).
    pub nesterov: bool,
    /// `glorot` (default) or `he`.
    pub init: Init,
    /// Mini-batch size inside each incoming batch, ≥ 1. Default 128.
    pub batch_size: usize,
    /// Passes over each incoming batch, ≥ 1. Default 1.
    pub passes: usize,
    /// Visit each pass in a seeded random order. Default true.
    pub shuffle: bool,
    /// Seed of the initialisation and the shuffles.
    pub seed: u64,
    /// Number of classes K: labels are 0..K and the probabilities have K columns. The
    /// trainer sets it from the data's classes; 2 to 1,000. Default 10 (CIFAR-10).
    pub classes: usize,
}

impl Default for MlpParams {
    fn default() -> Self {
        MlpParams {
            classes: super::CLASSES,
            hidden: vec![128, 64],
            optimizer: Optimizer::Adam,
            lr: 3e-4,
            alpha: 5e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            momentum: 0.9,
            nesterov: true,
            init: Init::Glorot,
            batch_size: 128,
            passes: 1,
            shuffle: true,
            seed: 0,
        }
    }
}

impl MlpParams {
    /// Checks the values.
    pub fn check(&self) -> Result<()> {
        super::check_classes("mlp", self.classes)?;
        let bad = |m: String| Err(Error::usage(format!("mlp: {m}")));
        if self.hidden.contains(&0) {
            return bad(format!(
                "hidden layer sizes must be >= 1, not {:?}",
                self.hidden
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("lr must be finite and > 0, not {}", self.lr));
        }
        if !(self.alpha.is_finite() && self.alpha >= 0.0) {
            return bad(format!("alpha must be finite and >= 0, not {}", self.alpha));
        }
        for (name, v) in [
            ("beta1", self.beta1),
            ("beta2", self.beta2),
            ("momentum", self.momentum),
        ] {
            if !(0.0..1.0).contains(&v) {
                return bad(format!("{name} must be in [0, 1), not {v}"));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad(format!("eps must be finite and > 0, not {}", self.eps));
        }
        if self.batch_size == 0 || self.passes == 0 {
            return bad("batch_size and passes must be >= 1".into());
        }
        Ok(())
    }
}

/// One dense layer's parameters (and, with the same shapes, gradients or optimiser
/// moments).
#[derive(Clone, Debug, PartialEq)]
struct Layer {
    /// fan_in × fan_out.
    w: Array2<f32>,
    /// fan_out.
    b: Array1<f32>,
}

impl Layer {
    fn zeros(fan_in: usize, fan_out: usize) -> Self {
        Layer {
            w: Array2::zeros((fan_in, fan_out)),
            b: Array1::zeros(fan_out),
        }
    }
}

/// Work buffers of a forward/backward pass over up to `rows` images.
#[derive(Clone, Debug, Default)]
struct Scratch {
    rows: usize,
    /// Pre-activations then activations of each layer (the last: logits, then
    /// probabilities, then δ).
    acts: Vec<Array2<f32>>,
    /// δ of each hidden layer.
    deltas: Vec<Array2<f32>>,
    /// Gradients.
    grads: Vec<Layer>,
}

/// A multilayer perceptron; see the module documentation.
#[derive(Clone, Debug)]
pub struct Mlp {
    params: MlpParams,
    /// The layers; empty until the first non-empty batch fixes the input width.
    layers: Vec<Layer>,
    /// Adam's first moments, or SGD's velocities.
    m: Vec<Layer>,
    /// Adam's second moments (empty for SGD).
    v: Vec<Layer>,
    /// Optimiser steps taken.
    steps: u64,
    /// Images learnt from (counting every pass).
    seen: u64,
    rng: SplitMix,
    scratch: Scratch,
    /// A gathered (shuffled) mini-batch: features and labels.
    xb: Array2<f32>,
    yb: Vec<u16>,
}

/// What `model.json` holds for an [`Mlp`] besides `model` and `stamp`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    params: MlpParams,
    n_features: Option<usize>,
    steps: u64,
    seen: u64,
    rng: u64,
}

/// The gradient of one layer: `(dW, db)`.
pub type LayerGrad = (Array2<f32>, Array1<f32>);

/// Softmax of a row of logits in place; returns ln Σ exp(z − max) and max.
fn softmax_row(row: &mut [f32]) -> (f32, f32) {
    let max = row.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    let mut sum = 0.0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
    (sum.ln(), max)
}

impl Mlp {
    /// A new, untrained model (after checking `params`).
    pub fn new(params: MlpParams) -> Result<Self> {
        params.check()?;
        let rng = SplitMix(params.seed);
        Ok(Mlp {
            params,
            layers: Vec::new(),
            m: Vec::new(),
            v: Vec::new(),
            steps: 0,
            seen: 0,
            rng,
            scratch: Scratch::default(),
            xb: Array2::zeros((0, 0)),
            yb: Vec::new(),
        })
    }

    /// The hyper-parameters.
    pub fn params(&self) -> &MlpParams {
        &self.params
    }

    /// Optimiser steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Images learnt from, counting every pass.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Layer widths from input to output: `[d, hidden…, 10]`.
    fn widths(&self, d: usize) -> Vec<usize> {
        let mut w = vec![d];
        w.extend(&self.params.hidden);
        w.push(self.params.classes);
        w
    }

    /// Draws the initial weights for input width `d`.
    fn init(&mut self, d: usize) {
        let widths = self.widths(d);
        self.layers.clear();
        for pair in widths.windows(2) {
            let (fan_in, fan_out) = (pair[0], pair[1]);
            let mut layer = Layer::zeros(fan_in, fan_out);
            match self.params.init {
                Init::Glorot => {
                    let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
                    let rng = &mut self.rng;
                    layer
                        .w
                        .mapv_inplace(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32);
                    layer
                        .b
                        .mapv_inplace(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32);
                }
                Init::He => {
                    let std = (2.0 / fan_in as f64).sqrt();
                    let rng = &mut self.rng;
                    layer.w.mapv_inplace(|_| (rng.normal() * std) as f32);
                }
            }
            self.layers.push(layer);
        }
        self.m = widths
            .windows(2)
            .map(|p| Layer::zeros(p[0], p[1]))
            .collect();
        self.v = match self.params.optimizer {
            Optimizer::Adam => widths
                .windows(2)
                .map(|p| Layer::zeros(p[0], p[1]))
                .collect(),
            Optimizer::Sgd => Vec::new(),
        };
    }

    /// Bytes the model needs for input width `d` and mini-batches of `rows`: weights,
    /// gradients and the optimiser's moments, plus activations and deltas per row.
    fn memory_need(&self, d: usize, rows: usize) -> u128 {
        let widths = self.widths(d);
        let params: u128 = widths
            .windows(2)
            .map(|p| crate::limits::product(&[p[0], p[1]]) + p[1] as u128)
            .sum();
        let copies = match self.params.optimizer {
            Optimizer::Adam => 4, // weights, gradients, m, v
            Optimizer::Sgd => 3,
        };
        let per_row: u128 = widths.iter().map(|&w| w as u128).sum::<u128>() * 2;
        4 * (params.saturating_mul(copies) + per_row.saturating_mul(rows as u128))
    }

    /// Makes the scratch buffers fit `rows` images.
    fn reserve(&mut self, rows: usize) {
        let sc = &mut self.scratch;
        if sc.rows >= rows && sc.acts.len() == self.layers.len() {
            return;
        }
        sc.rows = rows;
        sc.acts = self
            .layers
            .iter()
            .map(|l| Array2::zeros((rows, l.w.ncols())))
            .collect();
        sc.deltas = sc.acts.clone();
        sc.grads = self
            .layers
            .iter()
            .map(|l| Layer::zeros(l.w.nrows(), l.w.ncols()))
            .collect();
        let d = self.layers.first().map_or(0, |l| l.w.nrows());
        self.xb = Array2::zeros((rows, d));
        self.yb = Vec::with_capacity(rows);
    }

    /// Forward pass of `x` (m rows, m ≤ scratch rows) leaving probabilities in the last
    /// activation buffer; returns the summed cross-entropy against `y` when given.
    fn forward(
        layers: &[Layer],
        acts: &mut [Array2<f32>],
        x: ArrayView2<f32>,
        y: Option<&[u16]>,
    ) -> f64 {
        let m = x.nrows();
        let last = layers.len() - 1;
        let mut ce = 0.0f64;
        for (l, layer) in layers.iter().enumerate() {
            let (before, rest) = acts.split_at_mut(l);
            let out = &mut rest[0];
            let mut z = out.slice_mut(s![..m, ..]);
            // z = input·W + b
            for mut row in z.rows_mut() {
                row.assign(&layer.b);
            }
            if l == 0 {
                par_gemm(1.0, &x, &layer.w.view(), 1.0, &mut z);
            } else {
                let input = before[l - 1].slice(s![..m, ..]);
                general_mat_mul(1.0, &input, &layer.w, 1.0, &mut z);
            }
            if l < last {
                z.mapv_inplace(|v| v.max(0.0));
            } else {
                for (i, mut row) in z.rows_mut().into_iter().enumerate() {
                    let k = y.map(|y| usize::from(y[i]));
                    let logit = k.map(|k| row[k]);
                    let slice = row.as_slice_mut();
                    let (ln_sum, max) = match slice {
                        Some(s) => softmax_row(s),
                        None => (0.0, 0.0),
                    };
                    if let Some(logit) = logit {
                        ce += f64::from(ln_sum) + f64::from(max - logit);
                    }
                }
            }
        }
        ce
    }

    /// Gradients of the objective on the mini-batch `(x, y)` into `scratch.grads`,
    /// given the forward pass already in `scratch.acts`.
    fn backward(layers: &[Layer], alpha: f32, sc: &mut Scratch, x: ArrayView2<f32>, y: &[u16]) {
        let m = x.nrows();
        let inv_m = 1.0 / m as f32;
        let reg = alpha * inv_m;
        let n = layers.len();
        // δ of the output: (P − Y)/m, in place in the last activations.
        {
            let mut p = sc.acts[n - 1].slice_mut(s![..m, ..]);
            for (i, mut row) in p.rows_mut().into_iter().enumerate() {
                row[usize::from(y[i])] -= 1.0;
                row *= inv_m;
            }
        }
        for l in (0..n).rev() {
            let delta = if l == n - 1 {
                sc.acts[l].slice(s![..m, ..])
            } else {
                sc.deltas[l].slice(s![..m, ..])
            };
            let g = &mut sc.grads[l];
            g.w.assign(&layers[l].w);
            if l == 0 {
                par_gemm(1.0, &x.t(), &delta, reg, &mut g.w.view_mut());
            } else {
                let input = sc.acts[l - 1].slice(s![..m, ..]);
                general_mat_mul(1.0, &input.t(), &delta, reg, &mut g.w);
            }
            g.b.assign(&delta.sum_axis(Axis(0)));
            if l > 0 {
                // δ_{l-1} = (δ_l·W_lᵀ) ⊙ relu'(z_{l-1}).
                let (lower, upper) = sc.deltas.split_at_mut(l);
                let d_prev = &mut lower[l - 1];
                let delta = if l == n - 1 {
                    sc.acts[l].slice(s![..m, ..])
                } else {
                    upper[0].slice(s![..m, ..])
                };
                let mut dp = d_prev.slice_mut(s![..m, ..]);
                general_mat_mul(1.0, &delta, &layers[l].w.t(), 0.0, &mut dp);
                Zip::from(&mut dp)
                    .and(sc.acts[l - 1].slice(s![..m, ..]))
                    .for_each(|d, &a| {
                        if a <= 0.0 {
                            *d = 0.0;
                        }
                    });
            }
        }
    }

    /// One optimiser step with the gradients in `scratch.grads`.
    fn step(&mut self) {
        self.steps += 1;
        let p = &self.params;
        let lr = p.lr;
        match p.optimizer {
            Optimizer::Adam => {
                let t = self.steps as f64;
                let (b1, b2) = (p.beta1, p.beta2);
                let lr_t = (f64::from(lr) * (1.0 - f64::from(b2).powf(t)).sqrt()
                    / (1.0 - f64::from(b1).powf(t))) as f32;
                let eps = p.eps;
                for (((layer, g), m), v) in self
                    .layers
                    .iter_mut()
                    .zip(&self.scratch.grads)
                    .zip(&mut self.m)
                    .zip(&mut self.v)
                {
                    let upd = |w: &mut f32, &g: &f32, m: &mut f32, v: &mut f32| {
                        *m = b1 * *m + (1.0 - b1) * g;
                        *v = b2 * *v + (1.0 - b2) * g * g;
                        *w -= lr_t * *m / (v.sqrt() + eps);
                    };
                    Zip::from(&mut layer.w)
                        .and(&g.w)
                        .and(&mut m.w)
                        .and(&mut v.w)
                        .for_each(upd);
                    Zip::from(&mut layer.b)
                        .and(&g.b)
                        .and(&mut m.b)
                        .and(&mut v.b)
                        .for_each(upd);
                }
            }
            Optimizer::Sgd => {
                let (mu, nesterov) = (p.momentum, p.nesterov);
                for ((layer, g), u) in self
                    .layers
                    .iter_mut()
                    .zip(&self.scratch.grads)
                    .zip(&mut self.m)
                {
                    let upd = |w: &mut f32, &g: &f32, u: &mut f32| {
                        *u = mu * *u - lr * g;
                        *w += if nesterov { mu * *u - lr * g } else { *u };
                    };
                    Zip::from(&mut layer.w)
                        .and(&g.w)
                        .and(&mut u.w)
                        .for_each(upd);
                    Zip::from(&mut layer.b)
                        .and(&g.b)
                        .and(&mut u.b)
                        .for_each(upd);
                }
            }
        }
    }

    /// The objective of the module documentation on `(x, y)` at the current
    /// parameters (mean cross-entropy + alpha/(2n)·Σ‖W‖², in f64) and its gradients, one
    /// `(dW, db)` per layer, computed by the same backward pass training uses.
    /// Errors on bad input, an empty batch, or an untrained model (no layers yet).
    pub fn loss_and_grad(
        &self,
        x: ArrayView2<f32>,
        y: ArrayView1<u16>,
    ) -> Result<(f64, Vec<LayerGrad>)> {
        check_batch(x, y, self.n_features(), self.params.classes)?;
        if x.nrows() == 0 || self.layers.is_empty() {
            return Err(Error::usage(
                "mlp: the loss needs a non-empty batch and an initialised model",
            ));
        }
        let mut me = self.clone();
        me.scratch = Scratch::default();
        me.reserve(x.nrows());
        let yv = y.to_vec();
        let ce = Self::forward(&me.layers, &mut me.scratch.acts, x, Some(&yv));
        Self::backward(&me.layers, me.params.alpha, &mut me.scratch, x, &yv);
        let n = x.nrows() as f64;
        let sq: f64 = me
            .layers
            .iter()
            .flat_map(|l| l.w.iter())
            .map(|&v| f64::from(v) * f64::from(v))
            .sum();
        let loss = ce / n + f64::from(me.params.alpha) / (2.0 * n) * sq;
        let grads = me.scratch.grads.into_iter().map(|g| (g.w, g.b)).collect();
        Ok((loss, grads))
    }

    /// Initialises the weights for input width `d` if not done yet (for tests and
    /// tools that want the initial parameters).
    pub fn initialise(&mut self, d: usize) {
        if self.layers.is_empty() && d > 0 {
            self.init(d);
        }
    }

    /// The layers' `(W, b)`, input first.
    pub fn weights(&self) -> Vec<(ArrayView2<'_, f32>, ArrayView1<'_, f32>)> {
        self.layers
            .iter()
            .map(|l| (l.w.view(), l.b.view()))
            .collect()
    }

    /// Loads a model saved by [`Learner::save`] from `dir`. Errors name the file.
    pub fn load(dir: &Path) -> Result<Self> {
        let ck = Checkpoint::open(dir, NAME)?;
        let meta: Meta = ck.meta()?;
        meta.params
            .check()
            .map_err(|e| ck.bad_meta(format!("bad params: {e}")))?;
        let mut model = Mlp::new(meta.params)?;
        model.steps = meta.steps;
        model.seen = meta.seen;
        model.rng = SplitMix(meta.rng);
        let Some(d) = meta.n_features else {
            ck.expect_names(&[])?;
            return Ok(model);
        };
        if d == 0 {
            return Err(ck.bad_meta("n_features is 0"));
        }
        let widths = model.widths(d);
        let adam = model.params.optimizer == Optimizer::Adam;
        let mut names = Vec::new();
        for l in 0..widths.len() - 1 {
            for prefix in ["", "m_"]
                .iter()
                .chain(if adam { &["v_"][..] } else { &[][..] })
            {
                names.push(format!("{prefix}W{l}"));
                names.push(format!("{prefix}b{l}"));
            }
        }
        ck.expect_names(&names)?;
        let read = |prefix: &str, l: usize| -> Result<Layer> {
            Ok(Layer {
                w: ck.f32_2d(&format!("{prefix}W{l}"), widths[l], widths[l + 1])?,
                b: Array1::from(ck.f32(&format!("{prefix}b{l}"), &[widths[l + 1]])?),
            })
        };
        for l in 0..widths.len() - 1 {
            model.layers.push(read("", l)?);
            model.m.push(read("m_", l)?);
            if adam {
                model.v.push(read("v_", l)?);
            }
        }
        Ok(model)
    }
}

impl crate::model::Model for Mlp {
    const NAME: &'static str = NAME;
    const ABOUT: &'static str = "fully connected network, ReLU, Adam or SGD with momentum";
    type Params = MlpParams;

    fn build(params: MlpParams) -> Result<Self> {
        Mlp::new(params)
    }

    fn open(dir: &Path) -> Result<Self> {
        Mlp::load(dir)
    }
}

impl Learner for Mlp {
    fn name(&self) -> &'static str {
        NAME
    }

    fn n_features(&self) -> Option<usize> {
        self.layers.first().map(|l| l.w.nrows())
    }

    fn classes(&self) -> usize {
        self.params.classes
    }

    /// See [`Learner::partial_fit`]; the loss is that of the first pass. If a step
    /// makes a parameter non-finite the call returns `Err` (lower `lr`).
    fn fit_batch(&mut self, x: ArrayView2<f32>, y: ArrayView1<u16>) -> Result<f64> {
        let (n, d) = x.dim();
        let bs = self.params.batch_size.min(n);
        if self.layers.is_empty() {
            crate::limits::check(
                &format!(
                    "mlp (hidden = {:?}, {d} inputs, mini-batch {bs}): the weights, their \
                     gradients, the optimiser's state and the activations",
                    self.params.hidden
                ),
                self.memory_need(d, bs),
            )?;
            self.init(d);
        }
        self.reserve(bs);
        let mut first_pass_ce = 0.0f64;
        let mut order: Vec<usize> = (0..n).collect();
        for pass in 0..self.params.passes {
            if self.params.shuffle {
                self.rng.shuffle(&mut order);
            }
            for chunk in order.chunks(bs) {
                let m = chunk.len();
                self.yb.clear();
                for (r, &i) in chunk.iter().enumerate() {
                    self.xb.row_mut(r).assign(&x.row(i));
                    self.yb.push(y[i]);
                }
                let xb = self.xb.slice(s![..m, ..]);
                let ce = Self::forward(&self.layers, &mut self.scratch.acts, xb, Some(&self.yb));
                if pass == 0 {
                    first_pass_ce += ce;
                }
                Self::backward(
                    &self.layers,
                    self.params.alpha,
                    &mut self.scratch,
                    xb,
                    &self.yb,
                );
                self.step();
                self.seen += m as u64;
            }
        }
        let finite = self
            .layers
            .iter()
            .all(|l| l.w.iter().chain(l.b.iter()).all(|v| v.is_finite()));
        if !finite {
            return Err(Error::model(format!(
                "mlp: the weights became non-finite at step {} (lower lr, now {})",
                self.steps, self.params.lr
            )));
        }
        Ok(first_pass_ce / n as f64)
    }

    /// See [`Learner::predict_proba`]; uniform before the first batch.
    fn predict_proba(&self, x: ArrayView2<f32>) -> Result<Array2<f32>> {
        check_features(x, self.n_features())?;
        let n = x.nrows();
        if self.layers.is_empty() {
            return Ok(Array2::from_elem(
                (n, self.params.classes),
                1.0 / self.params.classes as f32,
            ));
        }
        let mut out = Array2::zeros((n, self.params.classes));
        let chunk = 512.min(n.max(1));
        let mut acts: Vec<Array2<f32>> = self
            .layers
            .iter()
            .map(|l| Array2::zeros((chunk, l.w.ncols())))
            .collect();
        for (xc, mut oc) in x
            .axis_chunks_iter(Axis(0), chunk)
            .zip(out.axis_chunks_iter_mut(Axis(0), chunk))
        {
            let m = xc.nrows();
            Self::forward(&self.layers, &mut acts, xc, None);
            oc.assign(&acts[acts.len() - 1].slice(s![..m, ..]));
        }
        if let Some(r) = super::first_non_finite_row(out.view()) {
            return Err(Error::data(format!(
                "mlp: batch row {r}: the outputs overflow (features too large)"
            )));
        }
        Ok(out)
    }

    /// See [`Learner::save`]: tensors `W{l}`, `b{l}` (layer `l`, input first), the
    /// optimiser's `m_W{l}`, `m_b{l}` (Adam's first moment or SGD's velocity) and, for
    /// Adam, `v_W{l}`, `v_b{l}`; params, counters and the RNG state in `model.json`.
    fn save(&self, dir: &Path) -> Result<()> {
        let mut t = TensorsOut::default();
        let mut put = |prefix: &str, layers: &[Layer]| {
            for (l, layer) in layers.iter().enumerate() {
                t.f32(
                    &format!("{prefix}W{l}"),
                    &[layer.w.nrows(), layer.w.ncols()],
                    layer.w.iter(),
                );
                t.f32(&format!("{prefix}b{l}"), &[layer.b.len()], layer.b.iter());
            }
        };
        put("", &self.layers);
        put("m_", &self.m);
        put("v_", &self.v);
        let meta = Meta {
            params: self.params.clone(),
            n_features: self.n_features(),
            steps: self.steps,
            seen: self.seen,
            rng: self.rng.0,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::{assert_save_load_continues, random_batch};
    use crate::model::CLASSES;
    use ndarray::array;

    fn blobs(rng: &mut SplitMix, n: usize, d: usize, spread: f64) -> (Array2<f32>, Array1<u16>) {
        let mut c = SplitMix(77);
        let centres = Array2::from_shape_fn((CLASSES, d), |_| 2.0 * c.normal() as f32);
        let y: Array1<u16> = (0..n).map(|_| rng.below(CLASSES) as u16).collect();
        let x = Array2::from_shape_fn((n, d), |(i, j)| {
            centres[[usize::from(y[i]), j]] + (spread * rng.normal()) as f32
        });
        (x, y)
    }

    /// The documented objective, naively, in f64, for parameters `layers`.
    fn objective_f64(
        layers: &[(Array2<f64>, Array1<f64>)],
        alpha: f64,
        x: &Array2<f64>,
        y: &[u16],
    ) -> f64 {
        let n = x.nrows();
        let mut a = x.clone();
        for (l, (w, b)) in layers.iter().enumerate() {
            let mut z = a.dot(w) + b;
            if l + 1 < layers.len() {
                z.mapv_inplace(|v| v.max(0.0));
            }
            a = z;
        }
        let mut ce = 0.0;
        for i in 0..n {
            let row = a.row(i);
            let max = row.fold(f64::NEG_INFINITY, |m, &v| m.max(v));
            let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
            ce += lse - row[usize::from(y[i])];
        }
        let sq: f64 = layers
            .iter()
            .flat_map(|(w, _)| w.iter())
            .map(|v| v * v)
            .sum();
        ce / n as f64 + alpha / (2.0 * n as f64) * sq
    }

    #[test]
    fn gradient_matches_finite_differences() {
        for init in [Init::Glorot, Init::He] {
            let mut rng = SplitMix(21);
            let (x, y) = random_batch(&mut rng, 7, 6);
            let mut m = Mlp::new(MlpParams {
                hidden: vec![5, 4],
                alpha: 0.3,
                init,
                lr: 0.01,
                ..MlpParams::default()
            })
            .unwrap();
            m.partial_fit(x.view(), y.view()).unwrap();
            let (loss, grads) = m.loss_and_grad(x.view(), y.view()).unwrap();
            let base: Vec<(Array2<f64>, Array1<f64>)> = m
                .weights()
                .iter()
                .map(|(w, b)| (w.mapv(f64::from), b.mapv(f64::from)))
                .collect();
            let xf = x.mapv(f64::from);
            let y = y.to_vec();
            let ref_loss = objective_f64(&base, 0.3, &xf, &y);
            assert!(
                (loss - ref_loss).abs() < 1e-5 * (1.0 + ref_loss),
                "{loss} vs {ref_loss}"
            );
            let h = 1e-5;
            let mut worst = 0.0f64;
            for l in 0..base.len() {
                let (rows, cols) = base[l].0.dim();
                for i in 0..rows {
                    for j in 0..cols {
                        let mut p = base.clone();
                        p[l].0[[i, j]] += h;
                        let mut q = base.clone();
                        q[l].0[[i, j]] -= h;
                        let num = (objective_f64(&p, 0.3, &xf, &y)
                            - objective_f64(&q, 0.3, &xf, &y))
                            / (2.0 * h);
                        let ana = f64::from(grads[l].0[[i, j]]);
                        worst = worst.max((num - ana).abs() / (1e-3 + num.abs()));
                        assert!(
                            (num - ana).abs() < 1e-4 + 1e-3 * num.abs(),
                            "{init:?} W{l}[{i},{j}]: {num} vs {ana}"
                        );
                    }
                    let _ = i;
                }
                for j in 0..cols {
                    let mut p = base.clone();
                    p[l].1[j] += h;
                    let mut q = base.clone();
                    q[l].1[j] -= h;
                    let num = (objective_f64(&p, 0.3, &xf, &y) - objective_f64(&q, 0.3, &xf, &y))
                        / (2.0 * h);
                    let ana = f64::from(grads[l].1[j]);
                    assert!(
                        (num - ana).abs() < 1e-4 + 1e-3 * num.abs(),
                        "{init:?} b{l}[{j}]: {num} vs {ana}"
                    );
                }
            }
            assert!(worst < 0.05, "{worst}");
        }
    }

    #[test]
    fn adam_and_sgd_steps_by_hand() {
        // One mini-batch of one image: compare the first step of each optimiser with
        // the formulas applied to the gradient loss_and_grad reports.
        for (optimizer, nesterov) in [
            (Optimizer::Adam, false),
            (Optimizer::Sgd, false),
            (Optimizer::Sgd, true),
        ] {
            let mut rng = SplitMix(9);
            let (x, y) = random_batch(&mut rng, 1, 4);
            let p = MlpParams {
                hidden: vec![3],
                optimizer,
                nesterov,
                lr: 0.1,
                alpha: 0.01,
                ..MlpParams::default()
            };
            let mut m = Mlp::new(p.clone()).unwrap();
            m.initialise(4);
            let before: Vec<_> = m
                .weights()
                .iter()
                .map(|(w, b)| (w.to_owned(), b.to_owned()))
                .collect();
            let (_, g) = m.loss_and_grad(x.view(), y.view()).unwrap();
            m.partial_fit(x.view(), y.view()).unwrap();
            let after = m.weights();
            for l in 0..2 {
                for (((&w0, &gw), &w1), _) in before[l]
                    .0
                    .iter()
                    .zip(&g[l].0)
                    .zip(after[l].0.iter())
                    .zip(0..)
                {
                    let want = match optimizer {
                        // Adam, t = 1: m = 0.1g, v = 0.001g², lr_t = lr·sqrt(0.001)/0.1.
                        Optimizer::Adam => {
                            let mm = 0.1 * gw;
                            let vv = 0.001 * gw * gw;
                            let lr_t = 0.1 * 0.001f32.sqrt() / 0.1;
                            w0 - lr_t * mm / (vv.sqrt() + 1e-8)
                        }
                        // u = −lr·g; plain: w + u; Nesterov: w + 0.9u − lr·g.
                        Optimizer::Sgd if nesterov => w0 + 0.9 * (-0.1 * gw) - 0.1 * gw,
                        Optimizer::Sgd => w0 - 0.1 * gw,
                    };
                    assert!(
                        (w1 - want).abs() < 1e-6,
                        "{optimizer:?} {nesterov}: {w1} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn initialisation_follows_the_scheme() {
        let mut m = Mlp::new(MlpParams {
            hidden: vec![200],
            ..MlpParams::default()
        })
        .unwrap();
        m.initialise(300);
        let w = m.weights();
        let bound = (6.0f32 / 500.0).sqrt();
        assert!(w[0].0.iter().all(|v| v.abs() <= bound));
        let mean_abs = w[0].0.iter().map(|v| v.abs()).sum::<f32>() / 60_000.0;
        assert!((mean_abs - bound / 2.0).abs() < 0.02 * bound, "{mean_abs}");
        let mut h = Mlp::new(MlpParams {
            hidden: vec![200],
            init: Init::He,
            ..MlpParams::default()
        })
        .unwrap();
        h.initialise(300);
        let w = h.weights();
        let var = w[0].0.iter().map(|v| v * v).sum::<f32>() / 60_000.0;
        assert!((var - 2.0 / 300.0).abs() < 0.05 * 2.0 / 300.0, "{var}");
        assert!(w[0].1.iter().all(|&b| b == 0.0));
        // The same seed draws the same weights; another seed, others.
        let mut again = Mlp::new(MlpParams {
            hidden: vec![200],
            init: Init::He,
            ..MlpParams::default()
        })
        .unwrap();
        again.initialise(300);
        assert_eq!(again.weights()[0].0, h.weights()[0].0);
        let mut other = Mlp::new(MlpParams {
            hidden: vec![200],
            init: Init::He,
            seed: 1,
            ..MlpParams::default()
        })
        .unwrap();
        other.initialise(300);
        assert_ne!(other.weights()[0].0, h.weights()[0].0);
    }

    #[test]
    fn learns_blobs_with_both_optimisers() {
        let mut rng = SplitMix(12);
        let (x, y) = blobs(&mut rng, 2000, 30, 2.0);
        let (xt, yt) = blobs(&mut rng, 500, 30, 2.0);
        for optimizer in [Optimizer::Adam, Optimizer::Sgd] {
            let mut m = Mlp::new(MlpParams {
                optimizer,
                lr: if optimizer == Optimizer::Adam {
                    3e-3
                } else {
                    0.01
                },
                hidden: vec![32, 16],
                batch_size: 32,
                passes: 2,
                ..MlpParams::default()
            })
            .unwrap();
            let mut first = None;
            let mut last = 0.0;
            for _ in 0..3 {
                for c in 0..(2000 / 128 + 1) {
                    let r = c * 128..((c + 1) * 128).min(2000);
                    last = m
                        .partial_fit(x.slice(s![r.clone(), ..]), y.slice(s![r]))
                        .unwrap();
                    first.get_or_insert(last);
                }
            }
            assert!(
                last < first.unwrap() / 4.0,
                "{optimizer:?}: loss {first:?} → {last}"
            );
            let pred = m.predict(xt.view()).unwrap();
            let acc = pred.iter().zip(&yt).filter(|(a, b)| a == b).count() as f64 / 500.0;
            assert!(acc > 0.95, "{optimizer:?}: accuracy {acc}");
            // Per pass: 15 batches of 128 (4 steps of 32) and one of 80 (32, 32, 16).
            assert_eq!(m.steps(), 3 * 2 * (15 * 4 + 3));
        }
    }

    #[test]
    fn save_load_is_exact_and_training_continues_identically() {
        let mut rng = SplitMix(13);
        let (x, y) = blobs(&mut rng, 400, 16, 2.0);
        for optimizer in [Optimizer::Adam, Optimizer::Sgd] {
            let mut a = Mlp::new(MlpParams {
                optimizer,
                hidden: vec![8],
                batch_size: 50,
                ..MlpParams::default()
            })
            .unwrap();
            assert_save_load_continues(&mut a, "mlp", x.view(), y.view(), 200);
        }
        let dir = tempfile::tempdir().unwrap();
        Mlp::new(MlpParams::default())
            .unwrap()
            .save(dir.path())
            .unwrap();
        let m = Mlp::load(dir.path()).unwrap();
        assert_eq!(m.n_features(), None);
        let p = m.predict_proba(x.view()).unwrap();
        assert!(p.iter().all(|&v| (v - 0.1).abs() < 1e-7));
    }

    #[test]
    fn bad_batches_and_params() {
        let mut rng = SplitMix(4);
        let (x, y) = random_batch(&mut rng, 10, 3);
        let mut m = Mlp::new(MlpParams {
            hidden: vec![4],
            ..MlpParams::default()
        })
        .unwrap();
        m.partial_fit(x.view(), y.view()).unwrap();
        let before = m.predict_proba(x.view()).unwrap();
        let mut bad_y = y.clone();
        bad_y[4] = 10;
        assert!(m.partial_fit(x.view(), bad_y.view()).is_err());
        let mut bad_x = x.clone();
        bad_x[[2, 1]] = f32::INFINITY;
        assert!(m.partial_fit(bad_x.view(), y.view()).is_err());
        assert!(m
            .partial_fit(Array2::zeros((2, 5)).view(), array![1u16, 2].view())
            .is_err());
        assert_eq!(m.predict_proba(x.view()).unwrap(), before);
        for bad in [
            "hidden = [0]",
            "lr = 0.0",
            "alpha = -1.0",
            "beta1 = 1.0",
            "momentum = -0.5",
            "passes = 0",
            "batch_size = 0",
        ] {
            let p: MlpParams = toml::from_str(bad).unwrap();
            assert!(Mlp::new(p).is_err(), "{bad}");
        }
        assert!(toml::from_str::<MlpParams>("optimizer = \"rmsprop\"").is_err());
        assert!(toml::from_str::<MlpParams>("hiden = [3]").is_err());
    }
}
