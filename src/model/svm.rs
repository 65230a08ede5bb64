//! `svm`: a multiclass linear SVM learnt by per-sample SGD, one-vs-rest, with the
//! update rule, learning-rate schedules and averaging of scikit-learn's
//! `SGDClassifier.partial_fit`.
//!
//! Ten binary classifiers (class k against the rest, target +1 / −1) are learnt side by
//! side. For each image, in order (or in a seeded shuffle of the batch, `shuffle`), with
//! `t` the number of images learnt from so far plus one:
//!
//! 1. `eta` from the schedule: `optimal` `1/(alpha·(t0 + t − 1))` with scikit-learn's
//!    `t0` (Bottou's heuristic: the first step is `sqrt(1/sqrt(alpha))` divided by
//!    `max(1, loss'(−that, 1))`, i.e. by 1), `constant` `eta0`, `invscaling` `eta0 / t^power_t`;
//! 2. for every class the decision score `p = w·x + b` and the loss derivative
//!    `g = loss'(p, y)`: hinge `−y` if `p·y ≤ 1` else 0; squared hinge `−2y(1 − p·y)` if
//!    `p·y < 1` else 0 (clipped to ±1e12);
//! 3. `w ← (1 − eta·alpha)·w − eta·g·x` (weight decay first, floored at 0, as scikit-learn
//!    does), `b ← b − eta·g` (the intercept is not penalised);
//! 4. with `average = N > 0`, from the N-th image on the averaged weights and intercepts
//!    (the mean of the iterates since then) are kept too, and used to predict once there
//!    are any (ASGD).
//!
//! The weights are kept as `w = wscale·v` so the decay of step 3 costs one multiply
//! (scikit-learn's `WeightVector`); `v` is rescaled when `wscale` falls below 1e-9.
//! The hot loop computes the ten dot products and the updates with SIMD kernels.
//!
//! Probabilities (for the log loss and the metrics) come from the decision scores as
//! scikit-learn maps one-vs-rest scores in `_predict_proba_lr`: `p_k = σ(d_k) / Σ_j σ(d_j)`
//! with σ the logistic function.

use std::path::Path;

use ndarray::linalg::general_mat_mul;
use ndarray::{Array1, Array2, ArrayView1, ArrayView2};
use serde::{Deserialize, Serialize};

use super::kernels::{axpy, dots, mean_step};
use super::{
    check_batch, check_features, save_checkpoint, Checkpoint, Learner, SplitMix, TensorsOut,
};
use crate::error::{Error, Result};

/// The model's name: [`Learner::name`] and the `"model"` field of its checkpoint.
pub(crate) const NAME: &str = "svm";

/// Largest |loss derivative| used in a step (scikit-learn's `MAX_DLOSS`).
const MAX_DLOSS: f64 = 1e12;

/// The per-class loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SvmLoss {
    /// `max(0, 1 − p·y)`: the linear SVM.
    Hinge,
    /// `max(0, 1 − p·y)²`.
    SquaredHinge,
}

impl SvmLoss {
    /// The loss at score `p` for target `y` (±1).
    pub fn loss(self, p: f64, y: f64) -> f64 {
        let z = 1.0 - p * y;
        match self {
            SvmLoss::Hinge => z.max(0.0),
            SvmLoss::SquaredHinge => {
                if z > 0.0 {
                    z * z
                } else {
                    0.0
                }
            }
        }
    }

    /// Its derivative in `p` (scikit-learn's `dloss`; hinge takes `−y` at the kink).
    pub fn dloss(self, p: f64, y: f64) -> f64 {
        match self {
            SvmLoss::Hinge => {
                if p * y <= 1.0 {
                    -y
                } else {
                    0.0
                }
            }
            SvmLoss::SquaredHinge => {
                let z = 1.0 - p * y;
                if z > 0.0 {
                    -2.0 * y * z
                } else {
                    0.0
                }
            }
        }
    }
}

/// Learning-rate schedule (scikit-learn's `learning_rate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// `1/(alpha·(t0 + t − 1))`, scikit-learn's default for `SGDClassifier`.
    Optimal,
    /// `eta0`.
    Constant,
    /// `eta0 / t^power_t`.
    Invscaling,
}

/// Hyper-parameters of [`Svm`]. Missing fields take their defaults when read from a
/// config; unknown fields are an error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SvmParams {
    /// `hinge` (default) or `squared_hinge`.
    pub loss: SvmLoss,
    /// L2 penalty; finite and > 0 for `optimal`, ≥ 0 otherwise. Default 3e-5 (the
    /// original's setting).
    pub alpha: f64,
    /// `optimal` (default), `constant` or `invscaling`.
    pub learning_rate: Schedule,
    /// Initial step of `constant` / `invscaling`; > 0. Default 0.01.
    pub eta0: f64,
    /// Exponent of `invscaling`. Default 0.5.
    pub power_t: f64,
    /// 0: no averaging; N ≥ 1: average the iterates from the N-th image on and predict
    /// with the average (ASGD; scikit-learn's `average=True` is 1). Default 1: on
    /// CIFAR-10 the averaged model is about 9 points more accurate than the last iterate
    /// (scikit-learn's default is off).
    pub average: u64,
    /// Visit each batch's images in a seeded random order (default true, as
    /// scikit-learn); false: in stream order.
    pub shuffle: bool,
    /// Unused (each image is a step); kept so every model takes the same keys.
    pub batch_size: usize,
    /// Seed of the shuffles. Default 0.
    pub seed: u64,
    /// Number of classes K: labels are 0..K and the probabilities have K columns. The
    /// trainer sets it from the data's classes; 2 to 1,000. Default 10 (CIFAR-10).
    pub classes: usize,
}

impl Default for SvmParams {
    fn default() -> Self {
        SvmParams {
            classes: super::CLASSES,
            loss: SvmLoss::Hinge,
            alpha: 3e-5,
            learning_rate: Schedule::Optimal,
            eta0: 0.01,
            power_t: 0.5,
            average: 1,
            shuffle: true,
            batch_size: 128,
            seed: 0,
        }
    }
}

impl SvmParams {
    /// Checks the values.
    pub fn check(&self) -> Result<()> {
        super::check_classes("svm", self.classes)?;
        let bad = |m: String| Err(Error::usage(format!("svm: {m}")));
        if !(self.alpha.is_finite() && self.alpha >= 0.0) {
            return bad(format!("alpha must be finite and >= 0, not {}", self.alpha));
        }
        if self.learning_rate == Schedule::Optimal && self.alpha <= 0.0 {
            return bad("the optimal learning rate needs alpha > 0".into());
        }
        if !(self.eta0.is_finite() && self.eta0 > 0.0) {
            return bad(format!("eta0 must be finite and > 0, not {}", self.eta0));
        }
        if !self.power_t.is_finite() {
            return bad(format!("power_t must be finite, not {}", self.power_t));
        }
        Ok(())
    }
}

/// A one-vs-rest linear SVM learnt by per-sample SGD; see the module documentation.
#[derive(Clone, Debug)]
pub struct Svm {
    params: SvmParams,
    /// K × d unscaled weights `v` (`w = wscale·v`); `None` before the first
    /// non-empty batch.
    v: Option<Array2<f32>>,
    /// The scale of `v`.
    wscale: f64,
    /// Intercepts.
    b: Vec<f64>,
    /// Averaged weights and intercepts (ASGD), once averaging has started.
    avg: Option<(Array2<f32>, Vec<f64>)>,
    /// scikit-learn's `t_`: 1 + images learnt from.
    t: f64,
    /// Shuffle generator.
    rng: SplitMix,
    /// Images learnt from.
    seen: u64,
}

/// What `model.json` holds for an [`Svm`] besides `model` and `stamp`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    params: SvmParams,
    n_features: Option<usize>,
    wscale: f64,
    intercept: Vec<f64>,
    avg_intercept: Option<Vec<f64>>,
    t: f64,
    rng: u64,
    seen: u64,
}

/// ln σ(z) = −softplus(−z), without overflow or underflow to −∞ for large |z|.
fn ln_sigmoid(z: f64) -> f64 {
    let t = -z;
    -(t.max(0.0) + (-t.abs()).exp().ln_1p())
}

/// scikit-learn's one-vs-rest mapping of scores to probabilities, in place on a row:
/// `p_k = σ(d_k) / Σ_j σ(d_j)`, computed from ln σ so that rows whose scores are all very
/// negative (where every σ underflows to 0) still get the right, non-uniform answer.
fn ovr_proba(scores: &mut [f64]) {
    let mut max = f64::NEG_INFINITY;
    for s in scores.iter_mut() {
        *s = ln_sigmoid(*s);
        max = max.max(*s);
    }
    let mut sum = 0.0;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    // sum >= 1: the largest term is exp(0).
    for s in scores.iter_mut() {
        *s /= sum;
    }
}

impl Svm {
    /// A new, untrained model (after checking `params`).
    pub fn new(params: SvmParams) -> Result<Self> {
        params.check()?;
        let rng = SplitMix(params.seed);
        Ok(Svm {
            v: None,
            wscale: 1.0,
            b: vec![0.0; params.classes],
            avg: None,
            t: 1.0,
            rng,
            seen: 0,
            params,
        })
    }

    /// The hyper-parameters.
    pub fn params(&self) -> &SvmParams {
        &self.params
    }

    /// Images learnt from.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// The current (not averaged) weights, K × d, and intercepts.
    pub fn coef(&self) -> Option<(Array2<f32>, Vec<f64>)> {
        let v = self.v.as_ref()?;
        let s = self.wscale as f32;
        Some((v.mapv(|x| x * s), self.b.clone()))
    }

    /// The weights and intercepts used to predict: the averaged ones once averaging
    /// has started, the current ones otherwise.
    pub fn decision_coef(&self) -> Option<(Array2<f32>, Vec<f64>)> {
        match &self.avg {
            Some((w, b)) => Some((w.clone(), b.clone())),
            None => self.coef(),
        }
    }

    /// scikit-learn's `t0` of the `optimal` schedule.
    fn optimal_init(&self) -> f64 {
        let alpha = self.params.alpha;
        let typw = (1.0 / alpha.sqrt()).sqrt();
        // As scikit-learn: max(1, loss'(−typw, 1)), which is 1 for both losses (their
        // derivative there is negative).
        let initial_eta0 = typw / self.params.loss.dloss(-typw, 1.0).max(1.0);
        1.0 / (initial_eta0 * alpha)
    }

    /// The mean one-vs-rest objective on `(x, y)` at the current (not averaged)
    /// parameters — `mean_i Σ_k loss(w_k·x_i + b_k, ±1) + (alpha/2)·‖W‖²` — and its
    /// gradient in `W` (K × d) and `b`, in f64. The SGD step on one image is
    /// exactly `W -= eta·dW`, `b -= eta·db` of this objective on that image.
    pub fn loss_and_grad(
        &self,
        x: ArrayView2<f32>,
        y: ArrayView1<u16>,
    ) -> Result<(f64, Array2<f64>, Array1<f64>)> {
        check_batch(x, y, self.n_features(), self.params.classes)?;
        let (n, d) = x.dim();
        if n == 0 {
            return Err(Error::usage("svm: the loss of an empty batch is undefined"));
        }
        let w = match self.coef() {
            Some((w, _)) => w.mapv(f64::from),
            None => Array2::zeros((self.params.classes, d)),
        };
        let xf = x.mapv(f64::from);
        let scores = xf.dot(&w.t());
        let mut loss = 0.0;
        let mut gs = Array2::<f64>::zeros((n, self.params.classes));
        for i in 0..n {
            for k in 0..self.params.classes {
                let t = if usize::from(y[i]) == k { 1.0 } else { -1.0 };
                let p = scores[[i, k]] + self.b[k];
                loss += self.params.loss.loss(p, t);
                gs[[i, k]] = self.params.loss.dloss(p, t);
            }
        }
        let nf = n as f64;
        let alpha = self.params.alpha;
        let dw = gs.t().dot(&xf) / nf + &w * alpha;
        let db = gs.sum_axis(ndarray::Axis(0)) / nf;
        let loss = loss / nf + alpha / 2.0 * w.iter().map(|v| v * v).sum::<f64>();
        Ok((loss, dw, db))
    }

    /// Loads a model saved by [`Learner::save`] from `dir`. Errors name the file.
    pub fn load(dir: &Path) -> Result<Self> {
        let ck = Checkpoint::open(dir, NAME)?;
        let meta: Meta = ck.meta()?;
        meta.params
            .check()
            .map_err(|e| ck.bad_meta(format!("bad params: {e}")))?;
        let k = meta.params.classes;
        let arr = |v: &[f64], what: &str| -> Result<Vec<f64>> {
            if v.len() == k {
                Ok(v.to_vec())
            } else {
                Err(ck.bad_meta(format!("{what} must have {k} values")))
            }
        };
        let b = arr(&meta.intercept, "intercept")?;
        if !(meta.wscale.is_finite() && meta.wscale > 0.0 && meta.t >= 1.0) {
            return Err(ck.bad_meta("wscale must be > 0 and t >= 1"));
        }
        let mut names = Vec::new();
        if meta.n_features.is_some() {
            names.push("v".to_string());
        }
        if meta.avg_intercept.is_some() {
            names.push("avg_coef".to_string());
        }
        ck.expect_names(&names)?;
        let v = match meta.n_features {
            Some(0) => return Err(ck.bad_meta("n_features is 0")),
            Some(d) => Some(ck.f32_2d("v", k, d)?),
            None => None,
        };
        let avg = match (&meta.avg_intercept, meta.n_features) {
            (Some(ai), Some(d)) => Some((ck.f32_2d("avg_coef", k, d)?, arr(ai, "avg_intercept")?)),
            (Some(_), None) => return Err(ck.bad_meta("averages without weights")),
            _ => None,
        };
        Ok(Svm {
            params: meta.params,
            v,
            wscale: meta.wscale,
            b,
            avg,
            t: meta.t,
            rng: SplitMix(meta.rng),
            seen: meta.seen,
        })
    }
}

impl crate::model::Model for Svm {
    const NAME: &'static str = NAME;
    const ABOUT: &'static str =
        "linear SVM, one-vs-rest, per-sample SGD (scikit-learn's SGDClassifier)";
    const LR_KEY: &'static str = "eta0";
    type Params = SvmParams;

    fn build(params: SvmParams) -> Result<Self> {
        Svm::new(params)
    }

    fn open(dir: &Path) -> Result<Self> {
        Svm::load(dir)
    }
}

impl Learner for Svm {
    fn name(&self) -> &'static str {
        NAME
    }

    fn n_features(&self) -> Option<usize> {
        self.v.as_ref().map(Array2::ncols)
    }

    fn classes(&self) -> usize {
        self.params.classes
    }

    /// See [`Learner::partial_fit`]. The loss returned is the mean cross-entropy of the
    /// one-vs-rest probabilities of each image taken just before its own step.
    fn fit_batch(&mut self, x: ArrayView2<f32>, y: ArrayView1<u16>) -> Result<f64> {
        let (n, d) = x.dim();
        let mut order: Vec<usize> = (0..n).collect();
        if self.params.shuffle {
            self.rng.shuffle(&mut order);
        }
        let optimal_init = self.optimal_init();
        let k_classes = self.params.classes;
        let (loss_fn, alpha, average) = (self.params.loss, self.params.alpha, self.params.average);
        let v = self.v.get_or_insert_with(|| Array2::zeros((k_classes, d)));
        let mut row = vec![0.0f32; d];
        let mut dot = vec![0.0f32; k_classes];
        let mut scores = vec![0.0f64; k_classes];
        let mut update = vec![0.0f64; k_classes];
        let mut proba = vec![0.0f64; k_classes];
        let mut ce = 0.0f64;
        for &i in &order {
            let t = self.t;
            let eta = match self.params.learning_rate {
                Schedule::Optimal => 1.0 / (alpha * (optimal_init + t - 1.0)),
                Schedule::Constant => self.params.eta0,
                Schedule::Invscaling => self.params.eta0 / t.powf(self.params.power_t),
            };
            let xi: &[f32] = match x.row(i).to_slice() {
                Some(s) => s,
                None => {
                    row.iter_mut().zip(x.row(i)).for_each(|(r, &v)| *r = v);
                    &row
                }
            };
            let vs = v
                .as_slice_mut()
                .ok_or_else(|| Error::internal("svm: weights not contiguous"))?;
            dots(vs, xi, &mut dot);
            let label = usize::from(y[i]);
            for k in 0..k_classes {
                let p = self.wscale * f64::from(dot[k]) + self.b[k];
                scores[k] = p;
                let yk = if k == label { 1.0 } else { -1.0 };
                let g = loss_fn.dloss(p, yk).clamp(-MAX_DLOSS, MAX_DLOSS);
                update[k] = -eta * g;
            }
            proba.copy_from_slice(&scores);
            ovr_proba(&mut proba);
            ce -= proba[label].clamp(1e-15, 1.0).ln();
            // Weight decay first (floored at zero), then the loss step.
            self.wscale *= (1.0 - eta * alpha).max(0.0);
            if self.wscale < 1e-9 {
                let s = self.wscale as f32;
                vs.iter_mut().for_each(|w| *w *= s);
                self.wscale = 1.0;
            }
            for k in 0..k_classes {
                if update[k] != 0.0 {
                    let a = (update[k] / self.wscale) as f32;
                    axpy(&mut vs[k * d..(k + 1) * d], a, xi);
                    self.b[k] += update[k];
                }
            }
            if average > 0 && t >= average as f64 {
                let count = t - average as f64 + 1.0;
                let mu = (1.0 / count) as f32;
                let s = self.wscale as f32;
                let (aw, ab) = self
                    .avg
                    .get_or_insert_with(|| (Array2::zeros((k_classes, d)), vec![0.0; k_classes]));
                if let Some(a) = aw.as_slice_mut() {
                    mean_step(a, s, vs, mu);
                }
                for (a, &b) in ab.iter_mut().zip(&self.b) {
                    *a += (b - *a) / count;
                }
            }
            self.t += 1.0;
            self.seen += 1;
        }
        if !(self.wscale.is_finite()
            && self.b.iter().all(|b| b.is_finite())
            && v.iter().all(|w| w.is_finite()))
        {
            return Err(Error::model(
                "svm: the weights became non-finite (features too large for the step size)",
            ));
        }
        Ok(ce / n as f64)
    }

    /// See [`Learner::predict_proba`]: one-vs-rest scores mapped as the module
    /// documentation says; uniform before the first batch.
    fn predict_proba(&self, x: ArrayView2<f32>) -> Result<Array2<f32>> {
        check_features(x, self.n_features())?;
        let n = x.nrows();
        let mut z = Array2::<f32>::zeros((n, self.params.classes));
        let (b, scale) = match (&self.avg, &self.v) {
            (Some((w, b)), _) => {
                general_mat_mul(1.0, &x, &w.t(), 0.0, &mut z);
                (b.clone(), 1.0)
            }
            (None, Some(v)) => {
                general_mat_mul(1.0, &x, &v.t(), 0.0, &mut z);
                (self.b.clone(), self.wscale)
            }
            (None, None) => {
                z.fill(1.0 / self.params.classes as f32);
                return Ok(z);
            }
        };
        let mut s = vec![0.0f64; self.params.classes];
        for (r, mut row) in z.rows_mut().into_iter().enumerate() {
            for k in 0..self.params.classes {
                s[k] = scale * f64::from(row[k]) + b[k];
            }
            if s.iter().any(|v| !v.is_finite()) {
                return Err(Error::data(format!(
                    "svm: batch row {r}: the scores overflow (features too large)"
                )));
            }
            ovr_proba(&mut s);
            for k in 0..self.params.classes {
                row[k] = s[k] as f32;
            }
        }
        Ok(z)
    }

    /// See [`Learner::save`]: tensors `v` (K × d; the weights are
    /// `wscale·v`) and, with averaging, `avg_coef`; everything else in `model.json`.
    fn save(&self, dir: &Path) -> Result<()> {
        let mut tensors = TensorsOut::default();
        if let Some(v) = &self.v {
            tensors.f32("v", &[self.params.classes, v.ncols()], v.iter());
        }
        if let Some((w, _)) = &self.avg {
            tensors.f32("avg_coef", &[self.params.classes, w.ncols()], w.iter());
        }
        let meta = Meta {
            params: self.params.clone(),
            n_features: self.n_features(),
            wscale: self.wscale,
            intercept: self.b.to_vec(),
            avg_intercept: self.avg.as_ref().map(|(_, b)| b.to_vec()),
            t: self.t,
            rng: self.rng.0,
            seen: self.seen,
        };
        save_checkpoint(dir, NAME, &self.seen.to_string(), &meta, tensors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model;
    use crate::model::test_util::{assert_save_load_continues, random_batch};
    use crate::model::CLASSES;
    use crate::rng::SplitMix;
    use ndarray::{array, s};

    fn params(loss: SvmLoss, schedule: Schedule, alpha: f64) -> SvmParams {
        SvmParams {
            loss,
            alpha,
            learning_rate: schedule,
            eta0: 0.05,
            shuffle: false,
            ..SvmParams::default()
        }
    }

    /// Gaussian blobs around 10 random centres.
    fn blobs(rng: &mut SplitMix, n: usize, d: usize, spread: f64) -> (Array2<f32>, Array1<u16>) {
        let mut c = SplitMix(99);
        let centres = Array2::from_shape_fn((CLASSES, d), |_| 3.0 * c.normal() as f32);
        let y: Array1<u16> = (0..n).map(|_| rng.below(CLASSES) as u16).collect();
        let x = Array2::from_shape_fn((n, d), |(i, j)| {
            centres[[usize::from(y[i]), j]] + (spread * rng.normal()) as f32
        });
        (x, y)
    }

    #[test]
    fn gradient_matches_finite_differences() {
        for loss in [SvmLoss::Hinge, SvmLoss::SquaredHinge] {
            let mut rng = SplitMix(3);
            let (x, y) = random_batch(&mut rng, 6, 5);
            let mut m = Svm::new(params(loss, Schedule::Constant, 0.1)).unwrap();
            m.partial_fit(x.view(), y.view()).unwrap();
            m.partial_fit(x.view(), y.view()).unwrap();
            let (_, dw, db) = m.loss_and_grad(x.view(), y.view()).unwrap();
            let h = 1e-3f32;
            let mut checked = 0;
            for k in [0usize, 3, 7] {
                for j in 0..5 {
                    let mut plus = m.clone();
                    let mut minus = m.clone();
                    plus.v.as_mut().unwrap()[[k, j]] += h / plus.wscale as f32;
                    minus.v.as_mut().unwrap()[[k, j]] -= h / minus.wscale as f32;
                    let lp = plus.loss_and_grad(x.view(), y.view()).unwrap().0;
                    let lm = minus.loss_and_grad(x.view(), y.view()).unwrap().0;
                    let numeric = (lp - lm) / (2.0 * f64::from(h));
                    // The hinge has kinks: skip a coordinate whose difference straddles one.
                    if (numeric - dw[[k, j]]).abs() > 1e-2 && loss == SvmLoss::Hinge {
                        continue;
                    }
                    assert!(
                        (numeric - dw[[k, j]]).abs() < 1e-2 * (1.0 + numeric.abs()),
                        "{loss:?} W[{k},{j}]: numeric {numeric} analytic {}",
                        dw[[k, j]]
                    );
                    checked += 1;
                }
                let mut plus = m.clone();
                let mut minus = m.clone();
                plus.b[k] += f64::from(h);
                minus.b[k] -= f64::from(h);
                let lp = plus.loss_and_grad(x.view(), y.view()).unwrap().0;
                let lm = minus.loss_and_grad(x.view(), y.view()).unwrap().0;
                let numeric = (lp - lm) / (2.0 * f64::from(h));
                assert!((numeric - db[k]).abs() < 1e-2, "{loss:?} b[{k}]");
            }
            assert!(
                checked >= 10,
                "{loss:?}: only {checked} coordinates checked"
            );
        }
    }

    #[test]
    fn one_sample_step_is_a_gradient_step() {
        // With a constant rate, learning one image is W -= eta·dW, b -= eta·db of the
        // objective on that image.
        for loss in [SvmLoss::Hinge, SvmLoss::SquaredHinge] {
            let mut rng = SplitMix(5);
            let (x, y) = random_batch(&mut rng, 8, 4);
            let mut m = Svm::new(params(loss, Schedule::Constant, 0.3)).unwrap();
            m.partial_fit(x.slice(s![..7, ..]), y.slice(s![..7]))
                .unwrap();
            let (w0, b0) = m.coef().unwrap();
            let (_, dw, db) = m
                .loss_and_grad(x.slice(s![7.., ..]), y.slice(s![7..]))
                .unwrap();
            m.partial_fit(x.slice(s![7.., ..]), y.slice(s![7..]))
                .unwrap();
            let (w1, b1) = m.coef().unwrap();
            for k in 0..CLASSES {
                for j in 0..4 {
                    let want = f64::from(w0[[k, j]]) - 0.05 * dw[[k, j]];
                    assert!((f64::from(w1[[k, j]]) - want).abs() < 1e-5, "{loss:?}");
                }
                assert!((b1[k] - (b0[k] - 0.05 * db[k])).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn hinge_step_with_alpha_by_hand() {
        // Two features, optimal schedule, alpha 0.01. sklearn's t0: typw =
        // sqrt(1/sqrt(0.01)) = sqrt(10); hinge dloss(−typw, 1) = −1, so eta0 = typw and
        // t0 = 1/(typw·alpha). The first image has t = 1: eta = 1/(alpha·t0) = typw.
        let alpha = 0.01;
        let mut m = Svm::new(params(SvmLoss::Hinge, Schedule::Optimal, alpha)).unwrap();
        let x = array![[1.0f32, 2.0], [0.5, -1.0]];
        let y = array![3u16, 3];
        m.partial_fit(x.slice(s![..1, ..]), y.slice(s![..1]))
            .unwrap();
        let typw = 10f64.sqrt();
        let (w, b) = m.coef().unwrap();
        // All scores are 0 ≤ 1: every class steps; class 3 towards x, the others away.
        for k in 0..CLASSES {
            let sign = if k == 3 { 1.0 } else { -1.0 };
            assert!((f64::from(w[[k, 0]]) - sign * typw * 1.0).abs() < 1e-5);
            assert!((f64::from(w[[k, 1]]) - sign * typw * 2.0).abs() < 1e-5);
            assert!((b[k] - sign * typw).abs() < 1e-9);
        }
        // Second image: t = 2, eta = 1/(alpha·(t0 + 1)). Class 3: score = w·x + b =
        // typw·(0.5 − 2) + typw = −0.5·typw ≤ 1 → step. Class 0: score = +0.5·typw,
        // times y = −1 → −0.5·typw ≤ 1 → step too.
        m.partial_fit(x.slice(s![1.., ..]), y.slice(s![1..]))
            .unwrap();
        let t0 = 1.0 / (typw * alpha);
        let eta = 1.0 / (alpha * (t0 + 1.0));
        let decay = 1.0 - eta * alpha;
        let (w2, b2) = m.coef().unwrap();
        for k in 0..CLASSES {
            let sign = if k == 3 { 1.0 } else { -1.0 };
            let want0 = decay * sign * typw + eta * sign * 0.5;
            let want1 = decay * sign * typw * 2.0 - eta * sign;
            assert!(
                (f64::from(w2[[k, 0]]) - want0).abs() < 1e-4,
                "{k}: {} {want0}",
                w2[[k, 0]]
            );
            assert!((f64::from(w2[[k, 1]]) - want1).abs() < 1e-4);
            assert!((b2[k] - (sign * typw + eta * sign)).abs() < 1e-9);
        }
    }

    #[test]
    fn no_step_when_the_margin_is_met() {
        let mut m = Svm::new(params(SvmLoss::Hinge, Schedule::Constant, 0.0)).unwrap();
        let x = array![[1.0f32, 0.0]];
        let y = array![0u16];
        for _ in 0..200 {
            m.partial_fit(x.view(), y.view()).unwrap();
        }
        // Class 0's score has passed 1 and its weights have stopped moving.
        let (w, b) = m.coef().unwrap();
        let score = f64::from(w[[0, 0]]) + b[0];
        assert!(score > 1.0);
        m.partial_fit(x.view(), y.view()).unwrap();
        let (w2, b2) = m.coef().unwrap();
        assert_eq!(w2.row(0), w.row(0));
        assert_eq!(b2[0], b[0]);
    }

    #[test]
    fn learns_blobs_with_every_schedule_and_averaging() {
        let mut rng = SplitMix(11);
        let (x, y) = blobs(&mut rng, 3000, 20, 1.5);
        let (xt, yt) = blobs(&mut rng, 1000, 20, 1.5);
        for (loss, sched, average) in [
            (SvmLoss::Hinge, Schedule::Optimal, 0),
            (SvmLoss::SquaredHinge, Schedule::Optimal, 0),
            (SvmLoss::Hinge, Schedule::Constant, 0),
            (SvmLoss::Hinge, Schedule::Invscaling, 0),
            (SvmLoss::Hinge, Schedule::Optimal, 1),
        ] {
            let mut m = Svm::new(SvmParams {
                average,
                shuffle: true,
                ..params(loss, sched, 1e-3)
            })
            .unwrap();
            for c in 0..(3000 / 128 + 1) {
                let r = c * 128..((c + 1) * 128).min(3000);
                m.partial_fit(x.slice(s![r.clone(), ..]), y.slice(s![r]))
                    .unwrap();
            }
            let pred = m.predict(xt.view()).unwrap();
            let acc = pred.iter().zip(&yt).filter(|(a, b)| a == b).count() as f64 / 1000.0;
            assert!(
                acc > 0.9,
                "{loss:?} {sched:?} average {average}: accuracy {acc}"
            );
            let p = m.predict_proba(xt.view()).unwrap();
            for row in p.rows() {
                assert!((row.sum() - 1.0).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn probabilities_survive_very_negative_scores() {
        // Every σ(d) underflows to 0 in f64 here; the mapping must still rank the classes.
        let mut s = [
            -6000.0, -5990.0, -6010.0, -7000.0, -6000.0, -6000.0, -6000.0, -6000.0, -6000.0,
            -6000.0,
        ];
        ovr_proba(&mut s);
        assert!((s.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(s[1] > 0.99, "{s:?}");
        // Moderate scores: exactly σ(d_k)/Σσ(d_j).
        let d = [0.5, -1.0, 2.0, 0.0, -3.0, 1.0, -0.5, 0.25, -2.0, 3.0];
        let mut p = d;
        ovr_proba(&mut p);
        let sig: Vec<f64> = d.iter().map(|&z| 1.0 / (1.0 + (-z).exp())).collect();
        let total: f64 = sig.iter().sum();
        for k in 0..CLASSES {
            assert!((p[k] - sig[k] / total).abs() < 1e-12);
        }
    }

    #[test]
    fn averaging_is_the_mean_of_the_iterates() {
        let mut rng = SplitMix(2);
        let (x, y) = random_batch(&mut rng, 5, 3);
        let mut m = Svm::new(SvmParams {
            average: 2,
            ..params(SvmLoss::Hinge, Schedule::Constant, 0.1)
        })
        .unwrap();
        let mut iterates = Vec::new();
        for i in 0..5 {
            m.partial_fit(x.slice(s![i..i + 1, ..]), y.slice(s![i..i + 1]))
                .unwrap();
            iterates.push(m.coef().unwrap());
        }
        // Averaging starts at the 2nd image: the mean of iterates 2..=5.
        let (aw, ab) = m.decision_coef().unwrap();
        for k in 0..CLASSES {
            for j in 0..3 {
                let mean: f32 = iterates[1..].iter().map(|(w, _)| w[[k, j]]).sum::<f32>() / 4.0;
                assert!((aw[[k, j]] - mean).abs() < 1e-5);
            }
            let mean_b: f64 = iterates[1..].iter().map(|(_, b)| b[k]).sum::<f64>() / 4.0;
            assert!((ab[k] - mean_b).abs() < 1e-9);
        }
    }

    #[test]
    fn save_load_is_exact_and_training_continues_identically() {
        let mut rng = SplitMix(8);
        let (x, y) = blobs(&mut rng, 600, 12, 2.0);
        for average in [0, 50] {
            let mut a = Svm::new(SvmParams {
                average,
                shuffle: true,
                ..SvmParams::default()
            })
            .unwrap();
            let dir = assert_save_load_continues(&mut a, "svm", x.view(), y.view(), 300);
            let c = Svm::load(dir.path()).unwrap();
            assert_eq!(c.seen(), 300);
        }
        // Untrained.
        let dir = tempfile::tempdir().unwrap();
        Svm::new(SvmParams::default())
            .unwrap()
            .save(dir.path())
            .unwrap();
        let m = Svm::load(dir.path()).unwrap();
        assert_eq!(m.n_features(), None);
        let p = m.predict_proba(x.view()).unwrap();
        assert!(p.iter().all(|&v| (v - 0.1).abs() < 1e-7));
    }

    #[test]
    fn torn_or_corrupt_checkpoints_are_errors() {
        let mut rng = SplitMix(1);
        let (x, y) = random_batch(&mut rng, 20, 4);
        let mut m = Svm::new(SvmParams::default()).unwrap();
        m.partial_fit(x.view(), y.view()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        m.save(dir.path()).unwrap();
        let tensors = std::fs::read(dir.path().join(model::TENSORS_FILE)).unwrap();
        m.partial_fit(x.view(), y.view()).unwrap();
        m.save(dir.path()).unwrap();
        // Tensors from the first save, metadata from the second: torn.
        std::fs::write(dir.path().join(model::TENSORS_FILE), &tensors).unwrap();
        let e = Svm::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("different saves"), "{e}");
        std::fs::write(dir.path().join(model::TENSORS_FILE), &tensors[..50]).unwrap();
        assert!(Svm::load(dir.path()).is_err());
        std::fs::write(dir.path().join(model::META_FILE), b"{\"model\": \"mlp\"}").unwrap();
        let e = Svm::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("model.json"), "{e}");
    }

    #[test]
    fn bad_batches_change_nothing() {
        let mut rng = SplitMix(4);
        let (x, y) = random_batch(&mut rng, 10, 3);
        let mut m = Svm::new(SvmParams::default()).unwrap();
        m.partial_fit(x.view(), y.view()).unwrap();
        let before = m.predict_proba(x.view()).unwrap();
        let mut bad_y = y.clone();
        bad_y[4] = 10;
        assert!(m.partial_fit(x.view(), bad_y.view()).is_err());
        let mut bad_x = x.clone();
        bad_x[[2, 1]] = f32::NAN;
        assert!(m.partial_fit(bad_x.view(), y.view()).is_err());
        assert!(m
            .partial_fit(Array2::zeros((2, 4)).view(), array![1u16, 2].view())
            .is_err());
        assert_eq!(
            m.partial_fit(Array2::zeros((0, 3)).view(), Array1::zeros(0).view())
                .unwrap(),
            0.0
        );
        assert_eq!(m.predict_proba(x.view()).unwrap(), before);
        assert_eq!(m.seen(), 10);
    }

    #[test]
    fn params_are_checked() {
        assert!(Svm::new(SvmParams {
            alpha: -1.0,
            ..SvmParams::default()
        })
        .is_err());
        assert!(Svm::new(SvmParams {
            alpha: 0.0,
            ..SvmParams::default()
        })
        .is_err());
        assert!(Svm::new(SvmParams {
            alpha: 0.0,
            learning_rate: Schedule::Constant,
            ..SvmParams::default()
        })
        .is_ok());
        assert!(Svm::new(SvmParams {
            eta0: 0.0,
            ..SvmParams::default()
        })
        .is_err());
        let e = toml::from_str::<SvmParams>("loss = \"log\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("hinge"), "{e}");
        let p: SvmParams =
            toml::from_str("loss = \"squared_hinge\"\nlearning_rate = \"invscaling\"").unwrap();
        assert_eq!(p.loss, SvmLoss::SquaredHinge);
        assert_eq!(p.learning_rate, Schedule::Invscaling);
        assert!(toml::from_str::<SvmParams>("alpah = 1.0").is_err());
    }
}
