//! `svm-kernel`: a batch kernel SVM (RBF or linear), one-vs-rest over the K
//! classes, refitted from scratch on a sliding window of the stream.
//!
//! This model is **not incremental; it is here for comparison on small inputs.** A
//! kernel SVM's training cost grows with the square of its training set (the n × n kernel
//! matrix) and its prediction cost with the number of support vectors, so it cannot learn
//! from the whole stream. Instead it keeps the latest [`buffer`](KernelSvmParams::buffer)
//! training images (a sliding window: when it is full, each new image drops the oldest)
//! and fits a whole new model on that window:
//!
//! * in [`partial_fit`](Learner::partial_fit), once at least `buffer` images have arrived
//!   since the last fit (so at most one fit per call: with a batch larger than `buffer`
//!   the intermediate windows would be replaced before anything could use them);
//! * in [`end_epoch`](Learner::end_epoch), if any image has arrived since the last fit.
//!
//! Between fits, images are only buffered and predictions come from the last fit.
//!
//! # The fit
//!
//! One binary C-SVM per class k, the window's images of class k against all the others
//! (the same ten problems as scikit-learn's `OneVsRestClassifier(SVC(...))`). The dual
//! `min ½αᵀQα − Σα, 0 ≤ α ≤ C, Σ yᵢαᵢ = 0` (with `Qᵢⱼ = yᵢyⱼK(xᵢ, xⱼ)`) is solved by
//! sequential minimal optimisation with second-order working-set selection and no
//! shrinking, stopping when the maximal KKT violation is below
//! [`tol`](KernelSvmParams::tol) (the `eps` of linfa-svm, the `tol` of scikit-learn). The
//! solver is a port of linfa-svm 0.8's `SolverState` (itself libsvm's; same selection,
//! updates, ties, stopping rule and iteration limit, max(10⁷, 100 n), but in f64), run on
//! a kernel matrix computed once per fit with one matrix product and shared by the ten
//! problems, which are solved in parallel threads. linfa-svm itself recomputes the kernel
//! matrix for every binary problem, one scalar distance at a time: at n = 2000,
//! d = 3072 that is about 13 s per class, two minutes per fit, against well under a
//! second here. The tests check that this solver's decisions agree with linfa-svm's.
//!
//! Kernels: `"rbf"`, `K(x, x') = exp(−γ‖x − x'‖²)` (linfa-svm's `gaussian_kernel(1/γ)`),
//! with γ fixed by [`gamma`](KernelSvmParams::gamma) or, by default, scikit-learn's
//! `"scale"` rule `γ = 1 / (d · var(X))` over all the values of the window at fit time
//! (1 when they are all equal); and `"linear"`, `K(x, x') = x · x'`.
//!
//! After a fit, class k's decision is `d_k(x) = Σᵢ cᵢₖ K(sᵢ, x) − ρ_k` over the support
//! vectors `sᵢ`: the window rows whose signed coefficient `cᵢₖ = yᵢαᵢ` exceeds
//! 100 · `f32::EPSILON` in size for some class (linfa-svm's threshold). Special cases:
//! a class absent from the window gets no binary model and the decision `−f32::MAX`
//! (so probability 0); a class that is the only one in the window gets the constant
//! decision +1.
//!
//! # Probabilities and loss
//!
//! [`predict_proba`](Learner::predict_proba) maps the ten decisions as scikit-learn's
//! `_predict_proba_lr` does for one-vs-rest models: `p_k = σ(d_k) / Σⱼ σ(d_j)` with σ the
//! logistic function (computed in log space, so that very negative decisions do not
//! underflow to 0/0). Before the first fit every row is uniform (1/K).
//! [`partial_fit`](Learner::partial_fit) returns the mean cross-entropy of the batch under
//! the model as it was before the batch (probabilities clipped to [1e-15, 1]).
//!
//! # Cost
//!
//! A fit holds the n × n kernel matrix in f32 (16 MB at n = 2000) and costs one n × n × d
//! matrix product plus the SMO iterations (O(n) each); prediction costs one
//! m × d × (number of support vectors) product per m images (d × 10 for the linear
//! kernel, whose support vectors are folded into one weight vector per class).
//!
//! # Checkpoint
//!
//! [`Learner::save`] writes, through the shared checkpoint helpers, the window
//! (`buffer_x`, n × d F32, oldest first, and `buffer_y`, n U64) once the width is known,
//! and after the first fit the model: `sv` (U × d F32, the union over the classes of the
//! support vectors), `coef` (U × K F32, column k holding class k's signed
//! coefficients, 0 where a row is not one of its support vectors), `rho`
//! (K F32) and `gamma` (1 F32: the γ used, 0 for the linear kernel). The counters
//! (`seen`, `since_fit`, `fits`), the width and the hyper-parameters are in `model.json`.
//! A loaded model predicts bit-identically and continues training exactly as the saved one
//! would have.

use std::path::Path;

use ndarray::linalg::general_mat_mul;
use ndarray::{s, Array1, Array2, ArrayView1, ArrayView2, Axis};
use serde::{Deserialize, Serialize};

use super::{check_features, save_checkpoint, Checkpoint, Learner, TensorsOut, TENSORS_FILE};
use crate::error::{Error, Result};

/// The model's name: [`Learner::name`] and the `"model"` field of its checkpoint.
pub(crate) const NAME: &str = "svm-kernel";

/// The decision given to a class absent from the window (its `rho`; coefficients 0).
const ABSENT_RHO: f32 = f32::MAX;

/// Coefficients at most this large (in absolute value) do not make a support vector
/// (linfa-svm's `100 · epsilon`).
const SV_THRESHOLD: f32 = 100.0 * f32::EPSILON;

/// Images per block when computing decisions, to bound the kernel block's memory.
const PREDICT_BLOCK: usize = 1024;

/// Hyper-parameters of [`KernelSvm`]. Missing fields take their defaults when read from
/// JSON; unknown fields are an error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KernelSvmParams {
    /// `"rbf"` (Gaussian, the default) or `"linear"`.
    pub kernel: String,
    /// Penalty C on margin violations (the box bound on the dual variables); finite and
    /// > 0. Default 1.
    pub c: f32,
    /// RBF width γ in `exp(−γ‖x − x'‖²)`, finite and > 0; `None` (the default) for
    /// scikit-learn's `"scale"`: `1 / (d · var(X))` over the window at each fit. Ignored
    /// by the linear kernel.
    pub gamma: Option<f32>,
    /// Size of the sliding window of training images, and the number of new images
    /// that triggers a refit; ≥ 1. Default 2000.
    pub buffer: usize,
    /// Stopping tolerance of the solver (maximal KKT violation); finite and > 0.
    /// Default 1e-3.
    pub tol: f32,
    /// Unused (the model learns in bulk); kept so every model has one. ≥ 1. Default 128.
    pub batch_size: usize,
    /// Unused (the fit is deterministic); kept for uniformity. Default 0.
    pub seed: u64,
    /// `"smo"` (default): the port of linfa-svm's solver on one shared kernel matrix
    /// (seconds per fit); `"linfa"`: linfa-svm's own `fit`, class by class (it rebuilds
    /// the kernel matrix for each class: about 13 s per class at 2,000 × 3,072).
    pub solver: String,
    /// Number of classes K: labels are 0..K and the probabilities have K columns. The
    /// trainer sets it from the data's classes; 2 to 1,000. Default 10 (CIFAR-10).
    pub classes: usize,
}

impl Default for KernelSvmParams {
    fn default() -> Self {
        KernelSvmParams {
            classes: super::CLASSES,
            kernel: "rbf".to_string(),
            c: 1.0,
            gamma: None,
            buffer: 2000,
            tol: 1e-3,
            batch_size: 128,
            seed: 0,
            solver: "smo".to_string(),
        }
    }
}

impl KernelSvmParams {
    /// Checks the values: a known kernel, `c` and `tol` finite and > 0, `gamma` (if set)
    /// finite and > 0, `buffer` and `batch_size` ≥ 1.
    pub fn check(&self) -> Result<()> {
        super::check_classes(NAME, self.classes)?;
        self.kernel_kind()?;
        if !matches!(self.solver.as_str(), "smo" | "linfa") {
            return Err(Error::usage(format!(
                "{NAME}: unknown solver {:?} (known: \"smo\", \"linfa\")",
                self.solver
            )));
        }
        if !(self.c.is_finite() && self.c > 0.0) {
            return Err(Error::usage(format!(
                "{NAME}: c must be finite and > 0, not {}",
                self.c
            )));
        }
        if let Some(g) = self.gamma {
            if !(g.is_finite() && g > 0.0) {
                return Err(Error::usage(format!(
                    "{NAME}: gamma must be finite and > 0 (or absent for \"scale\"), not {g}"
                )));
            }
        }
        if self.buffer == 0 {
            return Err(Error::usage(format!("{NAME}: buffer must be at least 1")));
        }
        if !(self.tol.is_finite() && self.tol > 0.0) {
            return Err(Error::usage(format!(
                "{NAME}: tol must be finite and > 0, not {}",
                self.tol
            )));
        }
        if self.batch_size == 0 {
            return Err(Error::usage(format!(
                "{NAME}: batch_size must be at least 1"
            )));
        }
        Ok(())
    }

    /// The kernel named by `kernel`.
    fn kernel_kind(&self) -> Result<Kernel> {
        match self.kernel.as_str() {
            "rbf" => Ok(Kernel::Rbf),
            "linear" => Ok(Kernel::Linear),
            other => Err(Error::usage(format!(
                "{NAME}: unknown kernel {other:?} (known: \"rbf\", \"linear\")"
            ))),
        }
    }
}

/// The kernel function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    /// `exp(−γ‖x − x'‖²)`.
    Rbf,
    /// `x · x'`.
    Linear,
}

/// A one-vs-rest kernel SVM refitted in bulk on a sliding window of the stream; see the
/// [module documentation](self).
#[derive(Clone, Debug)]
pub struct KernelSvm {
    /// Hyper-parameters (checked).
    params: KernelSvmParams,
    /// The kernel `params.kernel` names.
    kernel: Kernel,
    /// Width of the images; `None` until the first non-empty batch.
    n_features: Option<usize>,
    /// The latest training images.
    window: Window,
    /// Images learnt from (buffered) so far.
    seen: u64,
    /// Images buffered since the last fit.
    since_fit: u64,
    /// Fits done so far.
    fits: u64,
    /// The last fit; `None` before the first.
    fitted: Option<Fitted>,
}

/// The sliding window of training images: a ring of at most `cap` rows of `d` features.
#[derive(Clone, Debug)]
struct Window {
    /// Maximum number of rows.
    cap: usize,
    /// Row width (0 until known).
    d: usize,
    /// Rows, row-major; `y.len()` of them.
    x: Vec<f32>,
    /// Labels.
    y: Vec<u16>,
    /// Index of the oldest row once the ring is full (0 before).
    head: usize,
}

impl Window {
    fn new(cap: usize) -> Self {
        Window {
            cap,
            d: 0,
            x: Vec::new(),
            y: Vec::new(),
            head: 0,
        }
    }

    /// Number of rows held.
    fn len(&self) -> usize {
        self.y.len()
    }

    /// Adds a row (of width `d`), dropping the oldest if the window is full.
    fn push(&mut self, row: ArrayView1<f32>, label: u16) {
        if self.y.len() < self.cap {
            self.x.extend(row.iter());
            self.y.push(label);
        } else {
            let h = self.head;
            for (dst, &v) in self.x[h * self.d..(h + 1) * self.d].iter_mut().zip(row) {
                *dst = v;
            }
            self.y[h] = label;
            self.head = (h + 1) % self.cap;
        }
    }

    /// The rows and labels, oldest first.
    fn ordered(&self) -> (Array2<f32>, Vec<u16>) {
        let (n, d, h) = (self.len(), self.d, self.head);
        let mut x = Vec::with_capacity(n * d);
        x.extend_from_slice(&self.x[h * d..]);
        x.extend_from_slice(&self.x[..h * d]);
        let mut y = Vec::with_capacity(n);
        y.extend_from_slice(&self.y[h..]);
        y.extend_from_slice(&self.y[..h]);
        // n·d values by construction.
        let x = Array2::from_shape_vec((n, d), x).unwrap_or_else(|_| Array2::zeros((0, d)));
        (x, y)
    }
}

/// The model a fit produced, with what prediction derives from it.
#[derive(Clone, Debug)]
struct Fitted {
    /// The γ used (0 for the linear kernel).
    gamma: f32,
    /// U × d support vectors (union over the classes).
    sv: Array2<f32>,
    /// U × K signed coefficients.
    coef: Array2<f32>,
    /// The K offsets ρ.
    rho: Array1<f32>,
    /// Derived: squared norms of the support vectors (RBF).
    sv_sq: Array1<f32>,
    /// Derived: d × K weights `svᵀ · coef` (linear kernel).
    w: Option<Array2<f32>>,
}

impl Fitted {
    /// Completes a fitted model with its derived parts. Fit and load both come through
    /// here, so a loaded model computes exactly what the saved one did.
    fn new(
        kernel: Kernel,
        gamma: f32,
        sv: Array2<f32>,
        coef: Array2<f32>,
        rho: Array1<f32>,
    ) -> Self {
        let sv_sq = row_sq_norms(sv.view());
        let w = match kernel {
            Kernel::Linear => {
                let mut w = Array2::zeros((sv.ncols(), coef.ncols()));
                general_mat_mul(1.0, &sv.t(), &coef, 0.0, &mut w);
                Some(w)
            }
            Kernel::Rbf => None,
        };
        Fitted {
            gamma,
            sv,
            coef,
            rho,
            sv_sq,
            w,
        }
    }

    /// The m × K decisions for the rows of `x` (checked); `Err` if one
    /// overflows f32.
    fn decisions(&self, x: ArrayView2<f32>) -> Result<Array2<f32>> {
        let m = x.nrows();
        let mut out = Array2::zeros((m, self.coef.ncols()));
        if let Some(w) = &self.w {
            general_mat_mul(1.0, &x, w, 0.0, &mut out);
        } else {
            let u = self.sv.nrows();
            let mut k = Array2::zeros((PREDICT_BLOCK.min(m), u));
            for (b, xb) in x.axis_chunks_iter(Axis(0), PREDICT_BLOCK).enumerate() {
                let rows = xb.nrows();
                let mut kb = k.slice_mut(s![..rows, ..]);
                general_mat_mul(1.0, &xb, &self.sv.t(), 0.0, &mut kb);
                let x_sq = row_sq_norms(xb);
                rbf_in_place(kb.view_mut(), x_sq.view(), self.sv_sq.view(), self.gamma);
                let start = b * PREDICT_BLOCK;
                let mut ob = out.slice_mut(s![start..start + rows, ..]);
                general_mat_mul(1.0, &kb, &self.coef, 0.0, &mut ob);
            }
        }
        out -= &self.rho;
        if let Some(r) = super::first_non_finite_row(out.view()) {
            return Err(Error::usage(format!(
                "{NAME}: batch row {r}: the decision values overflow f32 (features too large)"
            )));
        }
        Ok(out)
    }
}

/// Squared Euclidean norm of each row.
fn row_sq_norms(x: ArrayView2<f32>) -> Array1<f32> {
    x.rows().into_iter().map(|r| r.dot(&r)).collect()
}

/// Turns the inner products `k[i, j] = xᵢ · sⱼ` into `exp(−γ‖xᵢ − sⱼ‖²)`, using
/// `‖xᵢ − sⱼ‖² = ‖xᵢ‖² + ‖sⱼ‖² − 2 xᵢ · sⱼ` (clamped at 0 against rounding). A distance
/// that overflows (∞ − ∞ = NaN, only for features near f32's limits) is a huge one:
/// kernel 0.
fn rbf_in_place(
    mut k: ndarray::ArrayViewMut2<f32>,
    x_sq: ArrayView1<f32>,
    s_sq: ArrayView1<f32>,
    gamma: f32,
) {
    for (mut row, &xs) in k.rows_mut().into_iter().zip(&x_sq) {
        for (v, &ss) in row.iter_mut().zip(&s_sq) {
            let dist = xs + ss - 2.0 * *v;
            *v = if dist.is_nan() {
                0.0
            } else {
                (-gamma * dist.max(0.0)).exp()
            };
        }
    }
}

/// scikit-learn's `gamma="scale"`: `1 / (d · var(X))` over all values of `x`, or 1 when
/// that is not a finite positive number (all values equal).
fn scale_gamma(x: ArrayView2<f32>) -> f32 {
    let count = x.len() as f64;
    if count == 0.0 {
        return 1.0;
    }
    let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / count;
    let var = x
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / count;
    let gamma = (1.0 / (x.ncols() as f64 * var)) as f32;
    if var > 0.0 && gamma.is_finite() && gamma > 0.0 {
        gamma
    } else {
        1.0
    }
}

/// What the solver found for one binary problem.
struct Binary {
    /// Signed coefficients `yᵢαᵢ`, one per window row.
    coef: Vec<f64>,
    /// The offset ρ: the decision is `Σᵢ coefᵢ K(xᵢ, x) − ρ`.
    rho: f64,
    /// Whether the iteration limit stopped the solver before the tolerance was met.
    hit_limit: bool,
}

/// Solves the C-SVM dual for targets `pos` (true: +1) on the n × n kernel matrix `k`
/// (row-major, `k.len() == n²`), with bound `c` and tolerance `eps`. A port of
/// linfa-svm 0.8's `SolverState::solve` without shrinking (its default), in f64:
/// second-order working-set selection, the same updates, ties and stopping rule.
/// Both targets must be present.
fn smo(k: &[f32], pos: &[bool], c: f64, eps: f64) -> Binary {
    let n = pos.len();
    let row = |i: usize| &k[i * n..(i + 1) * n];
    let y: Vec<f64> = pos.iter().map(|&p| if p { 1.0 } else { -1.0 }).collect();
    let diag: Vec<f64> = (0..n).map(|i| f64::from(k[i * n + i])).collect();
    let mut a = vec![0.0f64; n];
    // Gradient of ½αᵀQα − Σα.
    let mut g = vec![-1.0f64; n];
    let max_iter = n.saturating_mul(100).max(10_000_000);
    let mut iter = 0;
    while iter < max_iter {
        // Maximal violating pair: i maximises −yᵢ∇ᵢ over I_up; gmax2 is the max of yⱼ∇ⱼ
        // over I_low.
        let mut gmax = f64::NEG_INFINITY;
        let mut gmax_idx = None;
        let mut gmax2 = f64::NEG_INFINITY;
        for t in 0..n {
            let (upper, lower) = (a[t] >= c, a[t] == 0.0);
            if pos[t] {
                if !upper && -g[t] >= gmax {
                    gmax = -g[t];
                    gmax_idx = Some(t);
                }
                if !lower && g[t] >= gmax2 {
                    gmax2 = g[t];
                }
            } else {
                if !upper && -g[t] >= gmax2 {
                    gmax2 = -g[t];
                }
                if !lower && g[t] >= gmax {
                    gmax = g[t];
                    gmax_idx = Some(t);
                }
            }
        }
        let Some(i) = gmax_idx else { break };
        // j: the largest decrease of the objective (second-order information).
        let ki = row(i);
        let mut obj_min = f64::INFINITY;
        let mut j_idx = None;
        for t in 0..n {
            let grad_diff = if pos[t] {
                if a[t] == 0.0 {
                    continue;
                }
                gmax + g[t]
            } else {
                if a[t] >= c {
                    continue;
                }
                gmax - g[t]
            };
            if grad_diff > 0.0 {
                let quad = diag[i] + diag[t] - 2.0 * f64::from(ki[t]);
                let obj = -(grad_diff * grad_diff) / if quad > 0.0 { quad } else { 1e-10 };
                if obj <= obj_min {
                    obj_min = obj;
                    j_idx = Some(t);
                }
            }
        }
        let j = match j_idx {
            Some(j) if gmax + gmax2 >= eps => j,
            _ => break,
        };
        iter += 1;

        // Update αᵢ, αⱼ within the box, keeping Σ yα fixed.
        let kj = row(j);
        let qij = y[i] * y[j] * f64::from(ki[j]);
        let (old_i, old_j) = (a[i], a[j]);
        if pos[i] != pos[j] {
            let mut quad = diag[i] + diag[j] + 2.0 * qij;
            if quad <= 0.0 {
                quad = 1e-10;
            }
            let delta = -(g[i] + g[j]) / quad;
            let diff = a[i] - a[j];
            a[i] += delta;
            a[j] += delta;
            if diff > 0.0 {
                if a[j] < 0.0 {
                    a[j] = 0.0;
                    a[i] = diff;
                }
            } else if a[i] < 0.0 {
                a[i] = 0.0;
                a[j] = -diff;
            }
            // Both bounds are c, so linfa's `diff > bound_i − bound_j` is `diff > 0`.
            if diff > 0.0 {
                if a[i] > c {
                    a[i] = c;
                    a[j] = c - diff;
                }
            } else if a[j] > c {
                a[j] = c;
                a[i] = c + diff;
            }
        } else {
            let mut quad = diag[i] + diag[j] - 2.0 * qij;
            if quad <= 0.0 {
                quad = 1e-10;
            }
            let delta = (g[i] - g[j]) / quad;
            let sum = a[i] + a[j];
            a[i] -= delta;
            a[j] += delta;
            if sum > c {
                if a[i] > c {
                    a[i] = c;
                    a[j] = sum - c;
                }
            } else if a[j] < 0.0 {
                a[j] = 0.0;
                a[i] = sum;
            }
            if sum > c {
                if a[j] > c {
                    a[j] = c;
                    a[i] = sum - c;
                }
            } else if a[i] < 0.0 {
                a[i] = 0.0;
                a[j] = sum;
            }
        }
        let di = y[i] * (a[i] - old_i);
        let dj = y[j] * (a[j] - old_j);
        for (t, gt) in g.iter_mut().enumerate() {
            *gt += y[t] * (di * f64::from(ki[t]) + dj * f64::from(kj[t]));
        }
    }

    // ρ: the mean of yᵢ∇ᵢ over the free variables, else the middle of the feasible range.
    let (mut nfree, mut sum_free) = (0usize, 0.0f64);
    let (mut ub, mut lb) = (f64::INFINITY, f64::NEG_INFINITY);
    for t in 0..n {
        let yg = y[t] * g[t];
        if a[t] >= c {
            if pos[t] {
                lb = lb.max(yg);
            } else {
                ub = ub.min(yg);
            }
        } else if a[t] == 0.0 {
            if pos[t] {
                ub = ub.min(yg);
            } else {
                lb = lb.max(yg);
            }
        } else {
            nfree += 1;
            sum_free += yg;
        }
    }
    let rho = if nfree > 0 {
        sum_free / nfree as f64
    } else {
        (ub + lb) / 2.0
    };
    Binary {
        coef: a.iter().zip(&y).map(|(a, y)| a * y).collect(),
        rho,
        hit_limit: iter >= max_iter,
    }
}

/// The n × n kernel matrix of the rows of `x` (row-major), one matrix product.
fn kernel_matrix(x: ArrayView2<f32>, kernel: Kernel, gamma: f32) -> Array2<f32> {
    let n = x.nrows();
    let mut k = Array2::zeros((n, n));
    super::kernels::par_gemm(1.0, &x, &x.t(), 0.0, &mut k.view_mut());
    if kernel == Kernel::Rbf {
        let sq = row_sq_norms(x);
        rbf_in_place(k.view_mut(), sq.view(), sq.view(), gamma);
        // ‖x − x‖² = 0 exactly, whatever the rounding of the product.
        k.diag_mut().fill(1.0);
    }
    k
}

/// One binary problem solved by linfa-svm's own `fit` (solver `"linfa"`). A fit that
/// fails gives no support vectors (decision −ρ = 0 for this class), with a warning.
fn linfa_fit(
    x: ArrayView2<f32>,
    pos: &[bool],
    kernel: Kernel,
    gamma: f32,
    params: &KernelSvmParams,
) -> Binary {
    use linfa::traits::Fit;
    let ds = linfa::Dataset::new(x.to_owned(), Array1::from(pos.to_vec()));
    let p = linfa_svm::Svm::<f32, bool>::params()
        .pos_neg_weights(params.c, params.c)
        .eps(params.tol);
    let p = match kernel {
        Kernel::Rbf => p.gaussian_kernel(1.0 / gamma),
        Kernel::Linear => p.linear_kernel(),
    };
    match p.fit(&ds) {
        Ok(svm) => Binary {
            coef: svm.alpha.iter().map(|&a| f64::from(a)).collect(),
            rho: f64::from(svm.rho),
            hit_limit: false,
        },
        Err(e) => {
            tracing::warn!("{NAME}: linfa-svm could not fit a class: {e}");
            Binary {
                coef: vec![0.0; pos.len()],
                rho: 0.0,
                hit_limit: false,
            }
        }
    }
}

/// Fits the one-vs-rest model on the window `(x, y)` (n ≥ 1 rows).
fn fit_window(
    x: ArrayView2<f32>,
    y: &[u16],
    kernel: Kernel,
    params: &KernelSvmParams,
) -> Result<Fitted> {
    let n = x.nrows();
    let gamma = match kernel {
        Kernel::Rbf => params.gamma.unwrap_or_else(|| scale_gamma(x)),
        Kernel::Linear => 0.0,
    };
    let k = kernel_matrix(x, kernel, gamma);
    let Some(k) = k.as_slice().filter(|k| k.iter().all(|v| v.is_finite())) else {
        return Err(Error::model(format!(
            "{NAME}: the kernel matrix overflows f32 (features too large); not fitted"
        )));
    };
    let (c, eps) = (f64::from(params.c), f64::from(params.tol));
    let mut present = vec![false; params.classes];
    for &l in y {
        present[usize::from(l)] = true;
    }
    let to_solve: Vec<usize> = (0..params.classes)
        .filter(|&cl| present[cl] && y.iter().any(|&l| usize::from(l) != cl))
        .collect();

    // The binary problems, spread over the available cores.
    let threads = std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(1)
        .clamp(1, to_solve.len().max(1));
    let use_linfa = params.solver == "linfa";
    let solve = |cl: usize| {
        let pos: Vec<bool> = y.iter().map(|&l| usize::from(l) == cl).collect();
        if use_linfa {
            (cl, linfa_fit(x, &pos, kernel, gamma, params))
        } else {
            (cl, smo(k, &pos, c, eps))
        }
    };
    let mut solved: Vec<(usize, Binary)> = Vec::with_capacity(to_solve.len());
    if threads <= 1 {
        solved.extend(to_solve.iter().map(|&cl| solve(cl)));
    } else {
        let failed = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let mine: Vec<usize> =
                        to_solve.iter().copied().skip(t).step_by(threads).collect();
                    let solve = &solve;
                    scope.spawn(move || mine.into_iter().map(solve).collect::<Vec<_>>())
                })
                .collect();
            let mut failed = false;
            for h in handles {
                match h.join() {
                    Ok(part) => solved.extend(part),
                    Err(_) => failed = true,
                }
            }
            failed
        });
        if failed {
            return Err(Error::internal(format!(
                "{NAME}: a solver thread failed; not fitted"
            )));
        }
    }

    let mut coef_full = Array2::<f32>::zeros((n, params.classes));
    let mut rho = Array1::from_elem(params.classes, ABSENT_RHO);
    for cl in 0..params.classes {
        if present[cl] {
            // The only class in the window, unless solved below.
            rho[cl] = -1.0;
        }
    }
    for (cl, b) in &solved {
        if b.hit_limit {
            tracing::warn!(
                "{NAME}: class {cl}: the solver stopped at its iteration limit before reaching tol"
            );
        }
        rho[*cl] = b.rho as f32;
        for (dst, &v) in coef_full.column_mut(*cl).iter_mut().zip(&b.coef) {
            let v = v as f32;
            *dst = if v.abs() > SV_THRESHOLD { v } else { 0.0 };
        }
    }
    if coef_full.iter().chain(&rho).any(|v| !v.is_finite()) {
        return Err(Error::model(format!(
            "{NAME}: the solver produced non-finite coefficients (features too large); not fitted"
        )));
    }
    let keep: Vec<usize> = (0..n)
        .filter(|&i| coef_full.row(i).iter().any(|&v| v != 0.0))
        .collect();
    let sv = x.select(Axis(0), &keep);
    let coef = coef_full.select(Axis(0), &keep);
    Ok(Fitted::new(kernel, gamma, sv, coef, rho))
}

/// What `model.json` holds for a [`KernelSvm`] (besides `model` and `stamp`).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    /// Hyper-parameters.
    params: KernelSvmParams,
    /// Image width; `null` before the first batch.
    n_features: Option<usize>,
    /// Images learnt from.
    seen: u64,
    /// Images buffered since the last fit.
    since_fit: u64,
    /// Fits done.
    fits: u64,
    /// Rows in the window.
    buffered: usize,
    /// Support vectors of the last fit; `null` before the first.
    n_support: Option<usize>,
}

impl KernelSvm {
    /// A new, untrained model (after checking `params`).
    pub fn new(params: KernelSvmParams) -> Result<Self> {
        params.check()?;
        let kernel = params.kernel_kind()?;
        let window = Window::new(params.buffer);
        Ok(KernelSvm {
            params,
            kernel,
            n_features: None,
            window,
            seen: 0,
            since_fit: 0,
            fits: 0,
            fitted: None,
        })
    }

    /// The hyper-parameters.
    pub fn params(&self) -> &KernelSvmParams {
        &self.params
    }

    /// Number of images learnt from (buffered) so far.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Number of fits done so far.
    pub fn fits(&self) -> u64 {
        self.fits
    }

    /// Number of images buffered since the last fit.
    pub fn since_fit(&self) -> u64 {
        self.since_fit
    }

    /// Number of images in the window (at most [`buffer`](KernelSvmParams::buffer)).
    pub fn buffered(&self) -> usize {
        self.window.len()
    }

    /// The RBF γ of the last fit; `None` before the first fit and for the linear kernel.
    pub fn gamma(&self) -> Option<f32> {
        match (&self.fitted, self.kernel) {
            (Some(f), Kernel::Rbf) => Some(f.gamma),
            _ => None,
        }
    }

    /// Number of support vectors of the last fit (union over the classes); `None`
    /// before the first fit.
    pub fn n_support(&self) -> Option<usize> {
        self.fitted.as_ref().map(|f| f.sv.nrows())
    }

    /// The one-vs-rest decisions `d_k(x)`, an n × K matrix (see the module
    /// documentation). Errors before the first fit, on a width different from
    /// [`n_features`](Learner::n_features), a non-finite feature, or a decision that
    /// overflows f32.
    pub fn decision_function(&self, x: ArrayView2<f32>) -> Result<Array2<f32>> {
        check_features(x, self.n_features)?;
        match &self.fitted {
            Some(f) => f.decisions(x),
            None => Err(Error::usage(format!("{NAME}: not fitted yet"))),
        }
    }

    /// Fits on the window now and resets the count of images since the last fit. On
    /// error the previous fit and the counters stay.
    fn fit(&mut self) -> Result<()> {
        let (x, y) = self.window.ordered();
        let fitted = fit_window(x.view(), &y, self.kernel, &self.params)?;
        self.fitted = Some(fitted);
        self.fits += 1;
        self.since_fit = 0;
        Ok(())
    }

    /// Loads a model saved by [`Learner::save`] from `dir`, checking both files: the
    /// kind, hyper-parameters and counters, the tensors' names, dtypes, shapes and values
    /// (finite; labels below K), and that the two files come from the same
    /// save. Errors name the file.
    pub fn load(dir: &Path) -> Result<Self> {
        let ck = Checkpoint::open(dir, NAME)?;
        let meta: Meta = ck.meta()?;
        meta.params
            .check()
            .map_err(|e| ck.bad_meta(format!("bad params: {e}")))?;
        let kernel = meta.params.kernel_kind()?;
        let n = meta.buffered;
        match meta.n_features {
            Some(0) => return Err(ck.bad_meta("n_features is 0")),
            None if meta.seen != 0 || n != 0 || meta.fits != 0 || meta.since_fit != 0 => {
                return Err(ck.bad_meta("n_features is null but the model has been trained"))
            }
            Some(_) if n == 0 => {
                return Err(ck.bad_meta("n_features is set but the window is empty"))
            }
            _ => {}
        }
        if n > meta.params.buffer || n as u64 > meta.seen || meta.since_fit > meta.seen {
            return Err(ck.bad_meta(format!(
                "inconsistent counters: {n} buffered (buffer {}), {} seen, {} since the last fit",
                meta.params.buffer, meta.seen, meta.since_fit
            )));
        }
        if (meta.fits > 0) != meta.n_support.is_some() {
            return Err(ck.bad_meta("n_support must be set exactly when fits > 0"));
        }
        let mut names: Vec<String> = Vec::new();
        if meta.n_features.is_some() {
            names.extend(["buffer_x".to_string(), "buffer_y".to_string()]);
        }
        if meta.n_support.is_some() {
            names.extend(["sv", "coef", "rho", "gamma"].map(String::from));
        }
        ck.expect_names(&names)?;

        let tensors = dir.join(TENSORS_FILE);
        let mut window = Window::new(meta.params.buffer);
        if let Some(d) = meta.n_features {
            let x = ck.f32("buffer_x", &[n, d])?;
            window.d = d;
            window.x = x;
            window.y = ck.labels("buffer_y", n, meta.params.classes)?;
        }
        let fitted = match (meta.n_support, meta.n_features) {
            (Some(u), Some(d)) => {
                let sv = ck.f32_2d("sv", u, d)?;
                let coef = ck.f32_2d("coef", u, meta.params.classes)?;
                let rho = Array1::from(ck.f32("rho", &[meta.params.classes])?);
                let gamma = ck.f32("gamma", &[1])?[0];
                let ok = match kernel {
                    Kernel::Rbf => gamma > 0.0,
                    Kernel::Linear => gamma == 0.0,
                };
                if !ok {
                    return Err(Error::format(
                        &tensors,
                        8,
                        format!(
                            "tensor \"gamma\" is {gamma}, invalid for kernel {:?}",
                            meta.params.kernel
                        ),
                    ));
                }
                Some(Fitted::new(kernel, gamma, sv, coef, rho))
            }
            _ => None,
        };
        Ok(KernelSvm {
            params: meta.params,
            kernel,
            n_features: meta.n_features,
            window,
            seen: meta.seen,
            since_fit: meta.since_fit,
            fits: meta.fits,
            fitted,
        })
    }
}

/// `ln σ(d)`, without overflow or underflow to −∞ for finite `d`.
fn ln_sigmoid(d: f64) -> f64 {
    if d >= 0.0 {
        -(-d).exp().ln_1p()
    } else {
        d - d.exp().ln_1p()
    }
}

impl crate::model::Model for KernelSvm {
    const NAME: &'static str = NAME;
    const ABOUT: &'static str =
        "kernel SVM (RBF or linear), one-vs-rest, refitted on a window of the stream";
    type Params = KernelSvmParams;

    fn build(params: KernelSvmParams) -> Result<Self> {
        KernelSvm::new(params)
    }

    fn open(dir: &Path) -> Result<Self> {
        KernelSvm::load(dir)
    }
}

impl Learner for KernelSvm {
    fn name(&self) -> &'static str {
        NAME
    }

    fn n_features(&self) -> Option<usize> {
        self.n_features
    }

    fn classes(&self) -> usize {
        self.params.classes
    }

    /// See [`Learner::partial_fit`] and the module documentation: scores the batch with
    /// the current model, buffers it, and fits on the window if at least
    /// [`buffer`](KernelSvmParams::buffer) images have arrived since the last fit. Rows
    /// whose squared norm is not below `f32::MAX / 4` are refused with the rest of the
    /// batch (their kernel values could overflow). If the fit itself fails, the batch
    /// stays buffered, the previous fit stays in place, and the call returns `Err`.
    fn fit_batch(&mut self, x: ArrayView2<f32>, y: ArrayView1<u16>) -> Result<f64> {
        let n = x.nrows();
        if self.n_features.is_none() {
            let m = self.params.buffer.saturating_add(n);
            crate::limits::check(
                &format!(
                    "{NAME} (buffer = {}, {} features): the support buffer and its kernel \
                     matrices",
                    self.params.buffer,
                    x.ncols()
                ),
                4 * (2 * crate::limits::product(&[m, m]) + crate::limits::product(&[m, x.ncols()])),
            )?;
        }
        let limit = f64::from(f32::MAX) / 4.0;
        if let Some(r) = x
            .rows()
            .into_iter()
            .position(|r| r.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() >= limit)
        {
            return Err(Error::data(format!(
                "{NAME}: batch row {r}: features too large (squared norm not below f32::MAX / 4)"
            )));
        }
        let proba = self.predict_proba(x)?;
        let ce: f64 = proba
            .rows()
            .into_iter()
            .zip(y)
            .map(|(p, &l)| -f64::from(p[usize::from(l)]).clamp(1e-15, 1.0).ln())
            .sum();

        if self.n_features.is_none() {
            self.n_features = Some(x.ncols());
            self.window.d = x.ncols();
        }
        for (row, &label) in x.rows().into_iter().zip(y) {
            self.window.push(row, label);
        }
        self.seen += n as u64;
        self.since_fit += n as u64;
        if self.since_fit >= self.params.buffer as u64 {
            self.fit()?;
        }
        Ok(ce / n as f64)
    }

    /// See [`Learner::predict_proba`]: `p_k = σ(d_k) / Σⱼ σ(d_j)` over the one-vs-rest
    /// decisions; uniform (1/K) before the first fit. Decisions that overflow
    /// f32 are an `Err`.
    fn predict_proba(&self, x: ArrayView2<f32>) -> Result<Array2<f32>> {
        check_features(x, self.n_features)?;
        let Some(f) = &self.fitted else {
            return Ok(Array2::from_elem(
                (x.nrows(), self.params.classes),
                1.0 / self.params.classes as f32,
            ));
        };
        let mut d = f.decisions(x)?;
        for mut row in d.rows_mut() {
            let ls: Vec<f64> = row.iter().map(|&v| ln_sigmoid(f64::from(v))).collect();
            let max = ls.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = ls.iter().map(|l| (l - max).exp()).sum();
            for (p, l) in row.iter_mut().zip(&ls) {
                *p = ((l - max).exp() / sum) as f32;
            }
        }
        Ok(d)
    }

    /// Fits on the window if any image has arrived since the last fit.
    fn end_epoch(&mut self) -> Result<()> {
        if self.since_fit > 0 && self.window.len() > 0 {
            self.fit()?;
        }
        Ok(())
    }

    /// See [`Learner::save`] and the module documentation for the layout.
    fn save(&self, dir: &Path) -> Result<()> {
        let mut t = TensorsOut::default();
        if let Some(d) = self.n_features {
            let (x, y) = self.window.ordered();
            t.f32("buffer_x", &[x.nrows(), d], x.iter());
            let y: Vec<u64> = y.iter().map(|&l| u64::from(l)).collect();
            t.u64("buffer_y", &[y.len()], &y);
        }
        if let Some(f) = &self.fitted {
            t.f32("sv", &[f.sv.nrows(), f.sv.ncols()], f.sv.iter());
            t.f32(
                "coef",
                &[f.coef.nrows(), self.params.classes],
                f.coef.iter(),
            );
            t.f32("rho", &[self.params.classes], f.rho.iter());
            t.f32("gamma", &[1], &[f.gamma]);
        }
        let meta = Meta {
            params: self.params.clone(),
            n_features: self.n_features,
            seen: self.seen,
            since_fit: self.since_fit,
            fits: self.fits,
            buffered: self.window.len(),
            n_support: self.n_support(),
        };
        let stamp = format!(
            "seen={} since_fit={} fits={}",
            self.seen, self.since_fit, self.fits
        );
        save_checkpoint(dir, NAME, &stamp, &meta, t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::CLASSES;
    use crate::model::{self, META_FILE};
    use crate::rng::SplitMix;
    use linfa::traits::{Fit, Predict};
    use linfa::Dataset;
    use linfa_svm::Svm as LinfaSvm;
    use ndarray::array;
    use std::fs;
    use std::time::Instant;

    fn params(kernel: &str, buffer: usize) -> KernelSvmParams {
        KernelSvmParams {
            kernel: kernel.to_string(),
            buffer,
            ..KernelSvmParams::default()
        }
    }

    fn label(rng: &mut SplitMix) -> u16 {
        rng.below(CLASSES) as u16
    }

    /// `n` images from Gaussian blobs around the rows of `centres` (one per class).
    fn blobs(
        rng: &mut SplitMix,
        centres: &Array2<f32>,
        n: usize,
        spread: f64,
    ) -> (Array2<f32>, Array1<u16>) {
        let y: Array1<u16> = (0..n).map(|_| label(rng)).collect();
        let x = Array2::from_shape_fn((n, centres.ncols()), |(i, j)| {
            centres[[usize::from(y[i]), j]] + (spread * rng.normal()) as f32
        });
        (x, y)
    }

    /// Two concentric rings in the plane (radius 1: class `a`, radius 3: class `b`) plus
    /// two noise features: separable by an RBF kernel, not by a line.
    fn rings(rng: &mut SplitMix, n: usize, a: u16, b: u16) -> (Array2<f32>, Array1<u16>) {
        let mut x = Array2::zeros((n, 4));
        let mut y = Array1::zeros(n);
        for i in 0..n {
            let outer = rng.uniform() < 0.5;
            let r = if outer { 3.0 } else { 1.0 } + 0.15 * rng.normal();
            let t = std::f64::consts::TAU * rng.uniform();
            x[[i, 0]] = (r * t.cos()) as f32;
            x[[i, 1]] = (r * t.sin()) as f32;
            x[[i, 2]] = (0.3 * rng.normal()) as f32;
            x[[i, 3]] = (0.3 * rng.normal()) as f32;
            y[i] = if outer { b } else { a };
        }
        (x, y)
    }

    fn accuracy(m: &dyn Learner, x: ArrayView2<f32>, y: ArrayView1<u16>) -> f64 {
        let pred = m.predict(x).unwrap();
        pred.iter().zip(y).filter(|(p, t)| p == t).count() as f64 / y.len() as f64
    }

    fn same_bits(a: &Array2<f32>, b: &Array2<f32>) -> bool {
        a.dim() == b.dim() && a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits())
    }

    #[test]
    fn params_are_checked() {
        assert!(KernelSvmParams::default().check().is_ok());
        assert!(params("linear", 1).check().is_ok());
        let bad = [
            params("poly", 10),
            params("RBF", 10),
            params("rbf", 0),
            KernelSvmParams {
                c: 0.0,
                ..KernelSvmParams::default()
            },
            KernelSvmParams {
                c: -1.0,
                ..KernelSvmParams::default()
            },
            KernelSvmParams {
                c: f32::NAN,
                ..KernelSvmParams::default()
            },
            KernelSvmParams {
                gamma: Some(0.0),
                ..KernelSvmParams::default()
            },
            KernelSvmParams {
                gamma: Some(f32::INFINITY),
                ..KernelSvmParams::default()
            },
            KernelSvmParams {
                tol: 0.0,
                ..KernelSvmParams::default()
            },
            KernelSvmParams {
                batch_size: 0,
                ..KernelSvmParams::default()
            },
        ];
        for p in bad {
            assert!(p.check().is_err(), "{p:?}");
            assert!(KernelSvm::new(p).is_err());
        }
        let e = params("poly", 10).check().unwrap_err();
        assert!(e.to_string().contains("\"poly\""), "{e}");
        let p: KernelSvmParams =
            serde_json::from_str("{\"kernel\": \"linear\", \"gamma\": 0.5}").unwrap();
        assert_eq!(
            p,
            KernelSvmParams {
                kernel: "linear".into(),
                gamma: Some(0.5),
                ..KernelSvmParams::default()
            }
        );
        let d = KernelSvmParams::default();
        assert_eq!(
            (
                d.kernel.as_str(),
                d.c,
                d.gamma,
                d.buffer,
                d.tol,
                d.batch_size,
                d.seed
            ),
            ("rbf", 1.0, None, 2000, 1e-3, 128, 0)
        );
        assert!(serde_json::from_str::<KernelSvmParams>("{\"kernal\": \"rbf\"}").is_err());
    }

    #[test]
    fn window_drops_the_oldest() {
        let mut w = Window::new(3);
        w.d = 2;
        for i in 0..5u16 {
            let row = array![f32::from(i), -f32::from(i)];
            w.push(row.view(), i);
            let (x, y) = w.ordered();
            let first = i.saturating_sub(2);
            assert_eq!(y, (first..=i).collect::<Vec<_>>());
            assert_eq!(
                x.column(0).to_vec(),
                y.iter().map(|&l| f32::from(l)).collect::<Vec<_>>()
            );
            assert_eq!(
                x.column(1).to_vec(),
                y.iter().map(|&l| -f32::from(l)).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn linear_kernel_separates_blobs() {
        let mut rng = SplitMix(5);
        let centres = Array2::from_shape_fn((CLASSES, 20), |_| 3.0 * rng.normal() as f32);
        let (x, y) = blobs(&mut rng, &centres, 600, 1.0);
        let (xt, yt) = blobs(&mut rng, &centres, 1000, 1.0);
        let mut m = KernelSvm::new(params("linear", 1000)).unwrap();
        for (xb, yb) in x
            .axis_chunks_iter(Axis(0), 100)
            .zip(y.axis_chunks_iter(Axis(0), 100))
        {
            m.partial_fit(xb, yb).unwrap();
        }
        assert_eq!((m.fits(), m.since_fit(), m.buffered()), (0, 600, 600));
        let p = m.predict_proba(xt.view()).unwrap();
        assert!(p.iter().all(|&v| v == 0.1), "uniform before the fit");
        m.end_epoch().unwrap();
        assert_eq!((m.fits(), m.since_fit()), (1, 0));
        assert_eq!(m.gamma(), None);
        let acc = accuracy(&m, xt.view(), yt.view());
        println!(
            "linear blobs: held-out accuracy {acc}, {:?} support vectors",
            m.n_support()
        );
        assert!(acc >= 0.95, "accuracy {acc}");
        let p = m.predict_proba(xt.view()).unwrap();
        assert!(p.rows().into_iter().all(|r| (r.sum() - 1.0).abs() < 1e-5));
    }

    #[test]
    fn rbf_beats_linear_on_rings() {
        let mut rng = SplitMix(11);
        let (x, y) = rings(&mut rng, 400, 3, 7);
        let (xt, yt) = rings(&mut rng, 1000, 3, 7);
        let mut acc = vec![];
        for kernel in ["rbf", "linear"] {
            let mut m = KernelSvm::new(params(kernel, 500)).unwrap();
            m.partial_fit(x.view(), y.view()).unwrap();
            m.end_epoch().unwrap();
            assert_eq!(m.fits(), 1);
            acc.push(accuracy(&m, xt.view(), yt.view()));
            // Classes absent from the window get probability 0.
            let p = m.predict_proba(xt.view()).unwrap();
            for k in (0..CLASSES).filter(|&k| k != 3 && k != 7) {
                assert!(p.column(k).iter().all(|&v| v == 0.0), "class {k}");
            }
            let d = m.decision_function(xt.view()).unwrap();
            assert!(d.column(0).iter().all(|&v| v == -f32::MAX));
        }
        println!("rings: rbf accuracy {}, linear accuracy {}", acc[0], acc[1]);
        assert!(acc[0] >= 0.97, "rbf {}", acc[0]);
        assert!(acc[1] <= 0.8, "linear {}", acc[1]);
    }

    #[test]
    fn fits_at_buffer_fill_and_end_epoch_only() {
        let mut rng = SplitMix(2);
        let mut batch = |n: usize| {
            let x = Array2::from_shape_fn((n, 4), |_| rng.normal() as f32);
            let y: Array1<u16> = (0..n).map(|i| (i % CLASSES) as u16).collect();
            (x, y)
        };
        let mut m = KernelSvm::new(params("rbf", 100)).unwrap();
        m.end_epoch().unwrap();
        assert_eq!(m.fits(), 0, "nothing to fit on");
        let probe = batch(7).0;
        let mut expect = vec![];
        for b in 1..=4 {
            let (x, y) = batch(30);
            m.partial_fit(x.view(), y.view()).unwrap();
            expect.push((m.fits(), m.since_fit(), m.buffered()));
            if b < 4 {
                // Buffering alone does not change the predictions.
                assert!(m
                    .predict_proba(probe.view())
                    .unwrap()
                    .iter()
                    .all(|&p| p == 0.1));
            }
        }
        assert_eq!(
            expect,
            [(0, 30, 30), (0, 60, 60), (0, 90, 90), (1, 0, 100)],
            "fit when 100 images have arrived"
        );
        let before = m.predict_proba(probe.view()).unwrap();
        let (x, y) = batch(30);
        m.partial_fit(x.view(), y.view()).unwrap();
        assert_eq!((m.fits(), m.since_fit()), (1, 30));
        assert!(same_bits(&before, &m.predict_proba(probe.view()).unwrap()));
        let empty = Array2::<f32>::zeros((0, 4));
        assert_eq!(m.partial_fit(empty.view(), array![].view()).unwrap(), 0.0);
        assert_eq!((m.fits(), m.since_fit(), m.seen()), (1, 30, 150));
        m.end_epoch().unwrap();
        assert_eq!((m.fits(), m.since_fit()), (2, 0));
        assert!(!same_bits(&before, &m.predict_proba(probe.view()).unwrap()));
        m.end_epoch().unwrap();
        assert_eq!(m.fits(), 2, "no new image, no fit");
        // A batch larger than the window: one fit, on its latest 100 images.
        let (x, y) = batch(250);
        m.partial_fit(x.view(), y.view()).unwrap();
        assert_eq!(
            (m.fits(), m.since_fit(), m.buffered(), m.seen()),
            (3, 0, 100, 400)
        );
        let mut fresh = KernelSvm::new(params("rbf", 100)).unwrap();
        fresh
            .partial_fit(x.slice(s![150.., ..]), y.slice(s![150..]))
            .unwrap();
        assert_eq!(fresh.fits(), 1);
        assert!(same_bits(
            &m.decision_function(probe.view()).unwrap(),
            &fresh.decision_function(probe.view()).unwrap()
        ));
    }

    /// Our solver and decision function against linfa-svm's own fit and `predict`, class
    /// by class, on the same window.
    fn check_against_linfa(kernel: &str, gamma: Option<f32>, c: f32) {
        let mut rng = SplitMix(17);
        let centres = Array2::from_shape_fn((CLASSES, 5), |_| 1.5 * rng.normal() as f32);
        let (x, y) = blobs(&mut rng, &centres, 150, 1.0);
        let (q, _) = blobs(&mut rng, &centres, 300, 1.5);
        let p = KernelSvmParams {
            kernel: kernel.into(),
            gamma,
            c,
            buffer: 150,
            ..KernelSvmParams::default()
        };
        let mut m = KernelSvm::new(p.clone()).unwrap();
        m.partial_fit(x.view(), y.view()).unwrap();
        assert_eq!(m.fits(), 1);
        let ours = m.decision_function(q.view()).unwrap();
        let rho = &m.fitted.as_ref().unwrap().rho;
        let (mut compared, mut near) = (0, 0);
        for k in 0..CLASSES {
            let targets: Array1<bool> = y.iter().map(|&l| usize::from(l) == k).collect();
            let ds = Dataset::new(x.clone(), targets);
            let lp = LinfaSvm::<f32, bool>::params()
                .pos_neg_weights(c, c)
                .eps(p.tol);
            let lp = match m.gamma() {
                Some(g) => lp.gaussian_kernel(1.0 / g),
                None => lp.linear_kernel(),
            };
            let svm = lp.fit(&ds).unwrap();
            assert!(
                (svm.rho - rho[k]).abs() <= 1e-3 * svm.rho.abs().max(1.0),
                "{kernel} class {k}: rho {} vs linfa {}",
                rho[k],
                svm.rho
            );
            let pred: Array1<bool> = svm.predict(&q);
            for (i, qi) in q.rows().into_iter().enumerate() {
                let theirs = svm.weighted_sum(&qi) - svm.rho;
                assert_eq!(pred[i], theirs >= 0.0);
                if theirs.abs() < 1e-3 {
                    near += 1;
                    continue;
                }
                compared += 1;
                assert_eq!(
                    ours[[i, k]] >= 0.0,
                    pred[i],
                    "{kernel} class {k} point {i}: ours {} vs linfa {theirs}",
                    ours[[i, k]]
                );
                // Both stop within tol of the optimum, by slightly different paths
                // (f64 here, f32 there).
                assert!(
                    (ours[[i, k]] - theirs).abs() <= 1e-2 * theirs.abs().max(1.0),
                    "{kernel} class {k} point {i}: ours {} vs linfa {theirs}",
                    ours[[i, k]]
                );
            }
        }
        assert!(
            near * 50 < compared,
            "{near} near the boundary, {compared} compared"
        );
    }

    #[test]
    fn decision_matches_linfa_rbf() {
        check_against_linfa("rbf", None, 1.0);
        check_against_linfa("rbf", Some(0.5), 3.0);
    }

    #[test]
    fn linfa_solver_agrees_with_the_ported_solver() {
        let mut rng = SplitMix(23);
        let centres = Array2::from_shape_fn((CLASSES, 6), |_| 1.5 * rng.normal() as f32);
        let (x, y) = blobs(&mut rng, &centres, 200, 1.0);
        let (q, _) = blobs(&mut rng, &centres, 200, 1.5);
        for kernel in ["rbf", "linear"] {
            let fit = |solver: &str| {
                let mut m = KernelSvm::new(KernelSvmParams {
                    solver: solver.into(),
                    ..params(kernel, 200)
                })
                .unwrap();
                m.partial_fit(x.view(), y.view()).unwrap();
                m.decision_function(q.view()).unwrap()
            };
            let (a, b) = (fit("smo"), fit("linfa"));
            let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (u, v) in a.iter().zip(&b) {
                assert!((u - v).abs() <= 0.02 * scale, "{kernel}: {u} vs {v}");
            }
        }
        let bad = KernelSvmParams {
            solver: "libsvm".into(),
            ..KernelSvmParams::default()
        };
        assert!(KernelSvm::new(bad).is_err());
    }

    #[test]
    fn decision_matches_linfa_linear() {
        check_against_linfa("linear", None, 1.0);
        check_against_linfa("linear", None, 0.1);
    }

    #[test]
    fn proba_is_normalised_sigmoid_of_decisions() {
        let mut rng = SplitMix(8);
        let centres = Array2::from_shape_fn((CLASSES, 6), |_| rng.normal() as f32);
        let (x, y) = blobs(&mut rng, &centres, 200, 1.0);
        let (q, _) = blobs(&mut rng, &centres, 50, 1.0);
        let mut m = KernelSvm::new(params("rbf", 200)).unwrap();
        m.partial_fit(x.view(), y.view()).unwrap();
        let d = m.decision_function(q.view()).unwrap();
        let p = m.predict_proba(q.view()).unwrap();
        for (dr, pr) in d.rows().into_iter().zip(p.rows()) {
            let s: Vec<f64> = dr
                .iter()
                .map(|&v| 1.0 / (1.0 + (-f64::from(v)).exp()))
                .collect();
            let total: f64 = s.iter().sum();
            for (sk, &pk) in s.iter().zip(pr) {
                assert!((sk / total - f64::from(pk)).abs() < 1e-6, "{dr} {pr}");
            }
        }
        // Very negative decisions everywhere do not turn into 0/0.
        let mut far = m.clone();
        let f = far.fitted.as_mut().unwrap();
        f.rho.fill(1e6);
        f.rho[2] = 2e6;
        let p = far.predict_proba(q.view()).unwrap();
        assert!(p.iter().all(|v| v.is_finite()));
        assert!(p.column(2).iter().all(|&v| v == 0.0));
        assert!(p.rows().into_iter().all(|r| (r.sum() - 1.0).abs() < 1e-5));
    }

    #[test]
    fn loss_is_cross_entropy_before_the_batch() {
        let mut rng = SplitMix(9);
        let centres = Array2::from_shape_fn((CLASSES, 6), |_| rng.normal() as f32);
        let (x, y) = blobs(&mut rng, &centres, 300, 1.0);
        let mut m = KernelSvm::new(params("rbf", 100)).unwrap();
        let l0 = m
            .partial_fit(x.slice(s![..100, ..]), y.slice(s![..100]))
            .unwrap();
        assert!((l0 - 10f64.ln()).abs() < 1e-6, "{l0}");
        assert_eq!(m.fits(), 1);
        let (xb, yb) = (x.slice(s![100.., ..]), y.slice(s![100..]));
        let p = m.predict_proba(xb).unwrap();
        let expected: f64 = p
            .rows()
            .into_iter()
            .zip(yb)
            .map(|(r, &l)| -f64::from(r[usize::from(l)]).max(1e-15).ln())
            .sum::<f64>()
            / 200.0;
        let l1 = m.partial_fit(xb, yb).unwrap();
        assert_eq!(l1.to_bits(), expected.to_bits());
        assert!(l1 < l0, "{l1} vs {l0}");
    }

    #[test]
    fn gamma_scale_and_single_class() {
        let mut rng = SplitMix(4);
        let x = Array2::from_shape_fn((50, 3), |_| (2.0 * rng.normal() + 1.0) as f32);
        let y: Array1<u16> = (0..50).map(|i| (i % 2) as u16).collect();
        let mut m = KernelSvm::new(params("rbf", 50)).unwrap();
        assert_eq!(m.gamma(), None);
        m.partial_fit(x.view(), y.view()).unwrap();
        let v: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        let mean = v.iter().sum::<f64>() / 150.0;
        let var = v.iter().map(|a| (a - mean) * (a - mean)).sum::<f64>() / 150.0;
        let want = (1.0 / (3.0 * var)) as f32;
        let got = m.gamma().unwrap();
        assert!((got - want).abs() <= 1e-6 * want, "{got} vs {want}");
        let p = KernelSvmParams {
            gamma: Some(0.25),
            ..params("rbf", 50)
        };
        let mut m = KernelSvm::new(p).unwrap();
        m.partial_fit(x.view(), y.view()).unwrap();
        assert_eq!(m.gamma(), Some(0.25));
        assert_eq!(scale_gamma(Array2::from_elem((4, 3), 2.0f32).view()), 1.0);

        // A window holding one class: that class, with probability 1.
        let mut m = KernelSvm::new(params("rbf", 50)).unwrap();
        m.partial_fit(x.view(), Array1::from_elem(50, 4u16).view())
            .unwrap();
        assert_eq!(m.fits(), 1);
        assert_eq!(m.n_support(), Some(0));
        let p = m.predict_proba(x.view()).unwrap();
        assert!(p.column(4).iter().all(|&v| v == 1.0));
        assert!(m.predict(x.view()).unwrap().iter().all(|&l| l == 4));
    }

    #[test]
    fn bad_batches_are_errors_and_change_nothing() {
        let mut m = KernelSvm::new(params("rbf", 6)).unwrap();
        let x = Array2::from_shape_fn((3, 4), |(i, j)| (i * j) as f32 / 10.0);
        let y = array![1u16, 2, 3];
        let empty = Array2::<f32>::zeros((0, 4));
        assert_eq!(m.partial_fit(empty.view(), array![].view()).unwrap(), 0.0);
        assert_eq!((m.n_features(), m.seen()), (None, 0));
        assert!(m.partial_fit(x.view(), array![1u16, 10, 3].view()).is_err());
        assert_eq!(m.n_features(), None, "a rejected first batch fixes nothing");
        assert!(m.decision_function(x.view()).is_err(), "not fitted");

        m.partial_fit(x.view(), y.view()).unwrap();
        m.partial_fit(x.view(), y.view()).unwrap();
        assert_eq!(m.fits(), 1);
        m.partial_fit(x.view(), y.view()).unwrap();
        let before = m.clone();
        let probe = m.predict_proba(x.view()).unwrap();
        let same = |m: &KernelSvm| {
            (m.seen(), m.fits(), m.since_fit(), m.buffered())
                == (
                    before.seen(),
                    before.fits(),
                    before.since_fit(),
                    before.buffered(),
                )
                && m.window.ordered() == before.window.ordered()
                && same_bits(&m.predict_proba(x.view()).unwrap(), &probe)
        };
        let wide = Array2::<f32>::zeros((3, 5));
        let e = m.partial_fit(wide.view(), y.view()).unwrap_err();
        assert!(e.to_string().contains("expects 4"), "{e}");
        assert!(m.predict_proba(wide.view()).is_err());
        assert!(m.decision_function(wide.view()).is_err());
        let e = m
            .partial_fit(x.view(), array![1u16, 2, 10].view())
            .unwrap_err();
        assert!(e.to_string().contains("label 10"), "{e}");
        assert!(m.partial_fit(x.view(), array![1u16, 2].view()).is_err());
        let mut bad = x.clone();
        bad[[2, 1]] = f32::NAN;
        assert!(m.partial_fit(bad.view(), y.view()).is_err());
        assert!(m.predict_proba(bad.view()).is_err());
        bad[[2, 1]] = f32::NEG_INFINITY;
        assert!(m.partial_fit(bad.view(), y.view()).is_err());
        bad[[2, 1]] = 1e30;
        let e = m.partial_fit(bad.view(), y.view()).unwrap_err();
        assert!(e.to_string().contains("row 2"), "{e}");
        // Far away for the RBF kernel: every kernel value 0, decisions −ρ.
        let d = m.decision_function(bad.view()).unwrap();
        let rho = &m.fitted.as_ref().unwrap().rho;
        assert!(d.row(2).iter().zip(rho).all(|(&d, &r)| d == -r));
        bad[[2, 1]] = 1e38;
        let d = m.decision_function(bad.view()).unwrap();
        assert!(d.row(2).iter().zip(rho).all(|(&d, &r)| d == -r), "{d}");
        assert!(same(&m));

        // The linear kernel's decisions overflow.
        let mut lin = KernelSvm::new(params("linear", 3)).unwrap();
        lin.partial_fit(x.view(), y.view()).unwrap();
        // (Its weights here are below 1; make them large enough to overflow.)
        let w = lin.fitted.as_mut().unwrap().w.as_mut().unwrap();
        w.fill(2.0);
        bad.row_mut(2).fill(f32::MAX);
        let e = lin.predict_proba(bad.view()).unwrap_err();
        assert!(e.to_string().contains("overflow"), "{e}");
        assert_eq!(m.predict_proba(empty.view()).unwrap().dim(), (0, CLASSES));
    }

    #[test]
    fn accepts_non_contiguous_views() {
        let mut rng = SplitMix(3);
        let x = Array2::from_shape_fn((40, 5), |_| rng.normal() as f32);
        let y: Array1<u16> = (0..40).map(|_| label(&mut rng)).collect();
        let xt = x.t().to_owned();
        let mut a = KernelSvm::new(params("rbf", 40)).unwrap();
        let mut b = a.clone();
        a.partial_fit(x.view(), y.view()).unwrap();
        b.partial_fit(xt.t(), y.view()).unwrap();
        let pa = a.predict_proba(x.view()).unwrap();
        assert!(same_bits(&pa, &b.predict_proba(x.view()).unwrap()));
        assert!(same_bits(&pa, &a.predict_proba(xt.t()).unwrap()));
    }

    /// A labelled batch.
    type Batch = (Array2<f32>, Array1<u16>);

    /// A model (window 150) trained on the first 4 of 6 batches of 70 from a blob stream;
    /// the 6 batches; probe images.
    fn stream(kernel: &str) -> (KernelSvm, Vec<Batch>, Array2<f32>) {
        let mut rng = SplitMix(21);
        let centres = Array2::from_shape_fn((CLASSES, 8), |_| rng.normal() as f32);
        let batches: Vec<_> = (0..6).map(|_| blobs(&mut rng, &centres, 70, 1.0)).collect();
        let (probe, _) = blobs(&mut rng, &centres, 100, 1.0);
        let mut m = KernelSvm::new(params(kernel, 150)).unwrap();
        for (x, y) in &batches[..3] {
            m.partial_fit(x.view(), y.view()).unwrap();
        }
        // 210 images: one fit at 210, window full and rotated.
        assert_eq!((m.fits(), m.since_fit(), m.buffered()), (1, 0, 150));
        m.partial_fit(batches[3].0.view(), batches[3].1.view())
            .unwrap();
        assert_eq!((m.fits(), m.since_fit()), (1, 70));
        (m, batches, probe)
    }

    #[test]
    fn save_load_is_exact() {
        for kernel in ["rbf", "linear"] {
            let (m, batches, probe) = stream(kernel);
            let dir = tempfile::tempdir().unwrap();
            let ckpt = dir.path().join("a/b");
            m.save(&ckpt).unwrap();
            m.save(&ckpt).unwrap(); // overwriting is fine
            let meta: serde_json::Value =
                serde_json::from_slice(&fs::read(ckpt.join(META_FILE)).unwrap()).unwrap();
            assert_eq!(meta["model"], "svm-kernel");
            assert_eq!(meta["n_features"], 8);
            assert_eq!(meta["seen"], 280);
            assert_eq!(meta["fits"], 1);

            let loaded = model::load(&ckpt).unwrap();
            assert_eq!(loaded.name(), "svm-kernel");
            assert_eq!(loaded.n_features(), Some(8));
            let pa = m.predict_proba(probe.view()).unwrap();
            assert!(same_bits(&pa, &loaded.predict_proba(probe.view()).unwrap()));

            let mut m2 = KernelSvm::load(&ckpt).unwrap();
            assert_eq!(m2.params(), m.params());
            assert_eq!(m2.window.ordered(), m.window.ordered());
            assert_eq!(m2.gamma(), m.gamma());
            assert_eq!(m2.n_support(), m.n_support());
            let mut m1 = m.clone();
            // 70 more (140 since the fit: none), end of epoch (fit), 70 more, end of epoch.
            for (x, y) in &batches[4..] {
                let l1 = m1.partial_fit(x.view(), y.view()).unwrap();
                let l2 = m2.partial_fit(x.view(), y.view()).unwrap();
                assert_eq!(l1.to_bits(), l2.to_bits());
                m1.end_epoch().unwrap();
                m2.end_epoch().unwrap();
            }
            assert_eq!((m1.fits(), m1.seen()), (3, 420));
            assert_eq!(
                (m2.fits(), m2.seen(), m2.since_fit()),
                (m1.fits(), m1.seen(), m1.since_fit())
            );
            let p1 = m1.predict_proba(probe.view()).unwrap();
            assert!(same_bits(&p1, &m2.predict_proba(probe.view()).unwrap()));
            assert!(!same_bits(&p1, &pa));
        }
    }

    #[test]
    fn untrained_and_unfitted_models_save_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let p = KernelSvmParams {
            kernel: "linear".into(),
            c: 0.5,
            gamma: Some(2.0),
            buffer: 10,
            tol: 1e-2,
            batch_size: 7,
            seed: 3,
            solver: "linfa".into(),
            classes: CLASSES,
        };
        let mut m = KernelSvm::new(p.clone()).unwrap();
        m.save(dir.path()).unwrap();
        let l = KernelSvm::load(dir.path()).unwrap();
        assert_eq!((l.params(), l.n_features(), l.seen()), (&p, None, 0));
        let x = Array2::from_shape_fn((6, 3), |(i, j)| (i + 2 * j) as f32);
        let y = array![0u16, 1, 2, 0, 1, 2];
        m.partial_fit(x.view(), y.view()).unwrap();
        m.save(dir.path()).unwrap();
        let mut l = KernelSvm::load(dir.path()).unwrap();
        assert_eq!(
            (l.n_features(), l.seen(), l.since_fit(), l.fits()),
            (Some(3), 6, 6, 0)
        );
        assert!(l.predict_proba(x.view()).unwrap().iter().all(|&v| v == 0.1));
        l.end_epoch().unwrap();
        m.end_epoch().unwrap();
        assert!(same_bits(
            &l.decision_function(x.view()).unwrap(),
            &m.decision_function(x.view()).unwrap()
        ));
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
        let (m, _, _) = stream("rbf");
        let dir = tempfile::tempdir().unwrap();
        m.save(dir.path()).unwrap();
        let st = dir.path().join(TENSORS_FILE);
        let js = dir.path().join(META_FILE);
        let good_st = fs::read(&st).unwrap();
        let good_js = fs::read_to_string(&js).unwrap();
        let check = |what: &str, file: &str| {
            let e = model::load(dir.path())
                .err()
                .unwrap_or_else(|| panic!("{what}: loaded"));
            assert!(names(&e, file), "{what}: {e}");
            let e = KernelSvm::load(dir.path()).err().unwrap();
            assert!(names(&e, file), "{what}: {e}");
            e
        };
        for cut in [0, 8, 100, good_st.len() - 1] {
            fs::write(&st, &good_st[..cut]).unwrap();
            check(&format!("tensors cut at {cut}"), TENSORS_FILE);
        }
        fs::write(&st, &good_st).unwrap();
        for (what, bad) in [
            ("unknown kernel", good_js.replace("\"rbf\"", "\"poly\"")),
            (
                "zero buffer",
                good_js.replace("\"buffer\": 150", "\"buffer\": 0"),
            ),
            (
                "small buffer",
                good_js.replace("\"buffer\": 150", "\"buffer\": 100"),
            ),
            (
                "seen too small",
                good_js.replace("\"seen\": 280", "\"seen\": 100"),
            ),
            ("fits 0", good_js.replace("\"fits\": 1", "\"fits\": 0")),
            (
                "n_features 0",
                good_js.replace("\"n_features\": 8", "\"n_features\": 0"),
            ),
            (
                "unknown field",
                good_js.replace("\"fits\": 1", "\"fits\": 1, \"x\": 2"),
            ),
            ("torn save", good_js.replace("seen=280", "seen=281")),
        ] {
            assert_ne!(bad, good_js, "{what}: the edit did not apply");
            fs::write(&js, bad).unwrap();
            let file = if what == "torn save" {
                TENSORS_FILE
            } else {
                META_FILE
            };
            check(what, file);
        }
        for (what, bad) in [
            (
                "n_features mismatch",
                good_js.replace("\"n_features\": 8", "\"n_features\": 9"),
            ),
            (
                "n_support mismatch",
                good_js.replace(
                    &format!("\"n_support\": {}", m.n_support().unwrap()),
                    "\"n_support\": 1",
                ),
            ),
        ] {
            assert_ne!(bad, good_js, "{what}: the edit did not apply");
            fs::write(&js, bad).unwrap();
            let e = check(what, TENSORS_FILE);
            assert!(e.to_string().contains("shape"), "{what}: {e}");
        }
        fs::write(&js, &good_js).unwrap();

        // A label out of range in the window.
        let mut bad = m.clone();
        bad.window.y[3] = 12;
        bad.save(dir.path()).unwrap();
        let e = check("label 12", TENSORS_FILE);
        assert!(e.to_string().contains("buffer_y"), "{e}");
        m.save(dir.path()).unwrap();
        assert!(model::load(dir.path()).is_ok());
    }

    /// A fit at the default window (2000 images) and d = 3072 (run with
    /// `cargo test --release --lib -- --ignored --nocapture kernel_svm::tests::fit_time`).
    #[test]
    #[ignore]
    fn fit_time_cifar_sized() {
        let (n, d) = (2000, 3072);
        let mut rng = SplitMix(1);
        // Gaussian blobs (noise dominating the centres, but separable in 3072 dimensions),
        // then the same images with random labels (the solver's worst case).
        let centres = Array2::from_shape_fn((CLASSES, d), |_| 0.3 * rng.normal() as f32);
        let (x, y) = blobs(&mut rng, &centres, n, 1.0);
        let (q, _) = blobs(&mut rng, &centres, 1000, 1.0);
        let noise: Array1<u16> = (0..n).map(|_| label(&mut rng)).collect();
        for (kernel, y) in [
            ("rbf", &y),
            ("linear", &y),
            ("rbf", &noise),
            ("linear", &noise),
        ] {
            if std::ptr::eq(y, &noise) {
                println!("random labels:");
            }
            let mut m = KernelSvm::new(params(kernel, n)).unwrap();
            let t = Instant::now();
            m.partial_fit(x.view(), y.view()).unwrap();
            let fit = t.elapsed().as_secs_f64();
            assert_eq!(m.fits(), 1);
            let t = Instant::now();
            let p = m.predict_proba(q.view()).unwrap();
            let pred = t.elapsed().as_secs_f64();
            let per_class: Vec<usize> = m
                .fitted
                .as_ref()
                .unwrap()
                .coef
                .columns()
                .into_iter()
                .map(|c| c.iter().filter(|&&v| v != 0.0).count())
                .collect();
            println!(
                "{kernel}: fit of {n} × {d} (10 classes) {fit:.2} s, {} support vectors \
                 (per class {per_class:?}); predict_proba of 1000 images {pred:.3} s ({})",
                m.n_support().unwrap(),
                p[[0, 0]]
            );
            assert!(fit < 60.0, "{kernel}: fit took {fit:.1} s");
        }
    }

    /// For comparison: linfa-svm's own fit of ONE of the ten binary problems at the same
    /// size (`cargo test --release --lib -- --ignored --nocapture linfa_fit_time`).
    #[test]
    #[ignore]
    fn linfa_fit_time_one_class() {
        let (n, d) = (2000, 3072);
        let mut rng = SplitMix(1);
        let centres = Array2::from_shape_fn((CLASSES, d), |_| 0.3 * rng.normal() as f32);
        let (x, y) = blobs(&mut rng, &centres, n, 1.0);
        let gamma = scale_gamma(x.view());
        let targets: Array1<bool> = y.iter().map(|&l| l == 0).collect();
        let t = Instant::now();
        let svm = LinfaSvm::<f32, bool>::params()
            .pos_neg_weights(1.0, 1.0)
            .eps(1e-3)
            .gaussian_kernel(1.0 / gamma)
            .fit(&Dataset::new(x, targets))
            .unwrap();
        println!(
            "linfa-svm rbf, one class of {n} × {d}: {:.1} s ({} support vectors)",
            t.elapsed().as_secs_f64(),
            svm.nsupport()
        );
    }
}
