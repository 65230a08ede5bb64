//! `ridge`: one-vs-rest kernel ridge regression on ±1 targets, solved in the dual, the
//! classifier of the random-patch papers (Thiry et al.).
//!
//! The model keeps the latest `buffer` images (features and labels) and their Gram
//! matrix `G = X·Xᵀ`, grown by one block of rows per batch (each image's products with
//! the others are computed once, and the block computed to score a batch before learning
//! it is reused to learn it). Every `refit` new images, and at every epoch's end, it
//! drops the oldest images beyond `buffer` and solves `(K + λ·mean(diag K)·I)·A = Y` (a
//! blocked Cholesky in f64; `Y` holds +1 for the image's class and −1 for the others),
//! where `K` is `G` itself (`kernel = "linear"`) or `exp(−γ‖xᵢ − xⱼ‖²)` computed from `G`
//! (`"rbf"`, with `γ = gamma / mean‖xᵢ − xⱼ‖²` over the buffer). A linear model keeps the
//! primal weights `W = Xᵀ·A` (features × 10), so predicting is one small product; an RBF
//! model scores against the images of its last solve. Before the first solve it predicts
//! the uniform distribution.
//!
//! **`nystrom = true`** keeps every image, not only the latest: once the buffer holds
//! `buffer` images they stay as *landmarks* `L` (m = `buffer`), γ is fixed from them, and
//! every later image `x` is learnt through its kernel row `k = k(x, L)` (1 × m) into two
//! sums over all images, `S = Σ kᵀk` (m × m, kept in f64) and `T = Σ kᵀy` (m × 10). A
//! solve is then `(S + λ·mean(diag K_LL)·K_LL)·A = T`: ridge regression on the Nyström
//! features (Williams & Seeger 2001; Rudi et al. 2017), exact for the images so far,
//! independent of their order, in memory that does not grow with the stream (m·d + 2m²
//! floats + m² doubles). With m images it is the exact solve above. Before the buffer is
//! full the model is the exact one on what it has. Each image then costs `m·d + m²`
//! multiply-adds, a solve `m³/3`.
//!
//! With `n` buffered images of `d` features a solve costs `n³/3` and the Gram matrix
//! `n²·d` multiply-adds over the run; memory is `n·d + n²` floats (5,000 images of
//! 18,432 features: 470 MB). Probabilities (for the log loss) are the softmax of the
//! scores divided by `temperature`.

use std::path::Path;
use std::sync::Mutex;

use ndarray::{Array2, ArrayView1, ArrayView2, ShapeBuilder};
use serde::{Deserialize, Serialize};

use super::{check_features, save_checkpoint, Checkpoint, Learner, TensorsOut};
use crate::error::{Error, Result};
use crate::linalg;

/// The model's name: [`Learner::name`] and the `"model"` field of its checkpoint.
pub(crate) const NAME: &str = "ridge";

/// Hyper-parameters of [`Ridge`]. Missing fields take their defaults; unknown fields are
/// an error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RidgeParams {
    /// `"rbf"` (the default) or `"linear"`.
    pub kernel: String,
    /// RBF width, relative to the mean squared distance between buffered images; > 0.
    pub gamma: f64,
    /// Regularisation λ, relative to the mean of the kernel matrix's diagonal; > 0.
    pub lambda: f64,
    /// Most images kept (the latest); ≥ 1.
    pub buffer: usize,
    /// New images between solves; ≥ 1. With `nystrom`, while the landmarks fill, the
    /// interval doubles with each solve (solves at `refit`, 2·`refit`, 4·`refit`, …, none
    /// past half the landmarks).
    pub refit: usize,
    /// Softmax temperature of the probabilities; > 0.
    pub temperature: f32,
    /// Unused (the solve is exact); kept so every model has one.
    pub batch_size: usize,
    /// Unused (the model draws nothing at random); kept for uniformity.
    pub seed: u64,
    /// Number of classes K: labels are 0..K and the probabilities have K columns. The
    /// trainer sets it from the data's classes; 2 to 1,000. Default 10 (CIFAR-10).
    pub classes: usize,
    /// Keep the first `buffer` images as landmarks and learn every later image through
    /// the Nyström approximation (see the module documentation), instead of a window of
    /// the latest `buffer`. Default false.
    pub nystrom: bool,
    /// New images between solves once the landmarks are fixed (each solve is a
    /// `buffer`-sized Cholesky factorisation); ≥ 1. Default 10,000.
    pub nystrom_refit: usize,
}

impl Default for RidgeParams {
    fn default() -> Self {
        RidgeParams {
            classes: super::CLASSES,
            nystrom: false,
            nystrom_refit: 10_000,
            kernel: "rbf".into(),
            gamma: 0.25,
            lambda: 0.01,
            buffer: 10_000,
            refit: 1024,
            temperature: 0.1,
            batch_size: 128,
            seed: 0,
        }
    }
}

impl RidgeParams {
    /// Checks the values, naming the bad one.
    pub fn check(&self) -> Result<()> {
        super::check_classes(NAME, self.classes)?;
        if !matches!(self.kernel.as_str(), "rbf" | "linear") {
            return Err(Error::usage(format!(
                "{NAME}: unknown kernel {:?} (known: \"rbf\", \"linear\")",
                self.kernel
            )));
        }
        if !(self.gamma.is_finite() && self.gamma > 0.0) {
            return Err(Error::usage(format!(
                "{NAME}: gamma must be finite and > 0, not {}",
                self.gamma
            )));
        }
        if !(self.lambda.is_finite() && self.lambda > 0.0) {
            return Err(Error::usage(format!(
                "{NAME}: lambda must be finite and > 0, not {}",
                self.lambda
            )));
        }
        if self.buffer == 0 || self.refit == 0 || self.batch_size == 0 {
            return Err(Error::usage(format!(
                "{NAME}: buffer, refit and batch_size must be at least 1"
            )));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(Error::usage(format!(
                "{NAME}: temperature must be finite and > 0, not {}",
                self.temperature
            )));
        }
        Ok(())
    }
}

/// The last scored batch's features, the buffer length then, and its products with it.
type CrossCache = (Vec<f32>, usize, Array2<f32>);

/// Ridge regression in the dual on a buffer of the latest images.
#[derive(Debug)]
pub struct Ridge {
    params: RidgeParams,
    n_features: Option<usize>,
    /// Buffered features, row-major (`len` × d).
    x: Vec<f32>,
    /// Buffered labels.
    y: Vec<u16>,
    /// Gram matrix of the buffer, row-major (`len` × `len`) with rows `stride` apart:
    /// room for the buffer to grow without moving it every batch.
    gram: Vec<f32>,
    /// Row stride of `gram` (≥ `len`).
    stride: usize,
    /// Primal weights (d × 10) of the latest solve (linear kernel).
    w: Option<Array2<f32>>,
    /// Dual coefficients (`n_fit` × 10) of the latest solve (RBF kernel): the images of
    /// that solve are the first `n_fit` of the buffer.
    alpha: Option<Array2<f32>>,
    /// Constant scores added after a Nyström solve (its centring and intercept; K).
    bias: Option<Vec<f32>>,
    /// Images in the latest solve.
    n_fit: usize,
    /// The absolute RBF width of the latest solve.
    gamma_abs: f64,
    /// The products of the last scored batch with the buffer, reused when that batch is
    /// learnt next: (its features, the buffer length then, the products).
    cross: Mutex<Option<CrossCache>>,
    seen: u64,
    since_fit: u64,
    fits: u64,
    /// The Nyström sums once the buffer's images are the landmarks.
    ny: Option<NyStats>,
}

/// Adds `λ'·K_LL` (`λ' = lambda·mean(diag K_LL)`) to the upper triangle of the
/// (m + 1)² system `ktk`, from the landmarks' kernel matrix `k` (m × m).
fn add_regulariser(ktk: &mut [f64], k: &Array2<f32>, lambda: f64) {
    let m = k.nrows();
    let p = m + 1;
    let mean_diag = (0..m).map(|i| f64::from(k[[i, i]])).sum::<f64>() / m.max(1) as f64;
    let ridge = lambda * mean_diag.max(f64::MIN_POSITIVE);
    for i in 0..m {
        for j in i..m {
            ktk[i * p + j] += ridge * f64::from(k[[i, j]]);
        }
    }
}

/// The squared norm of each row of `x`, in f64.
fn row_sq_norms(x: ArrayView2<f32>) -> Vec<f64> {
    x.rows()
        .into_iter()
        .map(|r| r.iter().map(|&v| f64::from(v) * f64::from(v)).sum())
        .collect()
}

/// Rows of `Σ φᵀφ` updated per product (its upper triangle, block by block).
const SYRK_BLOCK: usize = 512;

/// Kernel rows gathered before they are added to `Σ φᵀφ`: products this deep are bound
/// by arithmetic, not by reading and writing the m × m sums once per batch. (The unit
/// tests' small streams cross it many times.)
const SYRK_ROWS: usize = if cfg!(test) { 16 } else { 1024 };

/// Sums over every image learnt through the landmarks (`nystrom = true`).
#[derive(Clone, Debug)]
struct NyStats {
    /// `c`, the landmarks' mean kernel row (m): kernel rows are centred by it, which
    /// takes the large, nearly constant part out of them (kept well conditioned).
    centre: Vec<f64>,
    /// The system's matrix `Σ φᵀφ + λ'·[K_LL 0; 0 0]` with `φ = [k − c, 1]` and
    /// `λ' = λ·mean(diag K_LL)` (the regulariser added once, when the landmarks are
    /// fixed), (m + 1) × (m + 1), row-major, in f64: the upper triangle (blocks of
    /// [`SYRK_BLOCK`] rows from the diagonal on); below it, zeros or partial sums that
    /// nothing reads.
    ktk: Vec<f64>,
    /// The landmarks' squared norms (their Gram matrix's diagonal, which is not kept).
    norms: Vec<f64>,
    /// `Σ φᵀy` (±1 targets), (m + 1) × K, row-major.
    kty: Vec<f64>,
    /// Kernel rows (m each, row-major) already in `kty` and `images` but not yet in
    /// `ktk`: added [`SYRK_ROWS`] at a time, and all before a solve.
    pending: Vec<f32>,
    /// Images in the sums.
    images: u64,
}

impl NyStats {
    /// Adds kernel rows `k` (rows × m, row-major) to `Σ φᵀφ` as `φ = [k − c, 1]` in f64
    /// (f32 products lose too much: on the full set they cost 1.4 points of accuracy):
    /// the upper triangle, by blocks of [`SYRK_BLOCK`] rows dealt to the threads (each
    /// block the same product whatever their number).
    fn add_rows(ktk: &mut [f64], centre: &[f64], k: &[f32]) {
        let m = centre.len();
        let rows = k.len() / m.max(1);
        if rows == 0 {
            return;
        }
        let p = m + 1;
        let phi = Array2::from_shape_fn((rows, p), |(i, j)| {
            if j < m {
                f64::from(k[i * m + j]) - centre[j]
            } else {
                1.0
            }
        });
        let mut ktk = ndarray::ArrayViewMut2::from_shape((p, p), ktk).expect("ktk shape");
        let mut jobs = Vec::with_capacity(p.div_ceil(SYRK_BLOCK));
        let mut rest = ktk.view_mut();
        for start in (0..p).step_by(SYRK_BLOCK) {
            let end = (start + SYRK_BLOCK).min(p);
            let (block, tail) = rest.split_at(ndarray::Axis(0), end - start);
            rest = tail;
            let out = block.slice_move(ndarray::s![.., start..]);
            jobs.push((
                phi.slice(ndarray::s![.., start..end]),
                phi.slice(ndarray::s![.., start..]),
                out,
            ));
        }
        linalg::in_parallel(jobs, |(lhs, rhs, mut out)| {
            linalg::gemm64(1.0, &lhs.t(), &rhs, 1.0, &mut out);
        });
    }

    /// Adds kernel rows (rows × m) to `Σ φᵀφ` by whole blocks of [`SYRK_ROWS`] rows, the
    /// pending ones first; what is left over waits in `pending`.
    fn add_or_hold(&mut self, mut k: &[f32]) {
        let block = SYRK_ROWS * self.centre.len();
        if !self.pending.is_empty() {
            let take = (block - self.pending.len().min(block)).min(k.len());
            self.pending.extend_from_slice(&k[..take]);
            k = &k[take..];
            if self.pending.len() >= block {
                Self::add_rows(&mut self.ktk, &self.centre, &self.pending);
                self.pending.clear();
            }
        }
        while k.len() >= block && block > 0 {
            Self::add_rows(&mut self.ktk, &self.centre, &k[..block]);
            k = &k[block..];
        }
        self.pending.extend_from_slice(k);
    }

    /// Adds every pending kernel row to `Σ φᵀφ` (before a solve).
    fn add_pending(&mut self) {
        if !self.pending.is_empty() {
            Self::add_rows(&mut self.ktk, &self.centre, &self.pending);
            self.pending = Vec::new();
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    params: RidgeParams,
    n_features: Option<usize>,
    buffered: usize,
    fitted: bool,
    n_fit: usize,
    gamma_abs: f64,
    seen: u64,
    since_fit: u64,
    fits: u64,
    /// Images in the Nyström sums (`null` before the landmarks are fixed).
    #[serde(default)]
    ny_images: Option<u64>,
    /// Of those, the kernel rows not yet added to `Σ φᵀφ` (tensor `ny_pending`).
    #[serde(default)]
    ny_pending: usize,
    /// The sums are saved as the system's matrix (`ny_system`, `ny_norms`, no `gram`);
    /// false in checkpoints of earlier versions (`ny_ktk` without the regulariser, and the
    /// Gram matrix), which are converted when loaded.
    #[serde(default)]
    ny_system: bool,
}

impl Ridge {
    /// An untrained model.
    pub fn new(params: RidgeParams) -> Result<Self> {
        params.check()?;
        Ok(Ridge {
            params,
            n_features: None,
            x: Vec::new(),
            y: Vec::new(),
            gram: Vec::new(),
            stride: 0,
            w: None,
            alpha: None,
            bias: None,
            n_fit: 0,
            gamma_abs: 0.0,
            cross: Mutex::new(None),
            seen: 0,
            since_fit: 0,
            fits: 0,
            ny: None,
        })
    }

    /// Images in the buffer.
    pub fn buffered(&self) -> usize {
        self.y.len()
    }

    fn rbf(&self) -> bool {
        self.params.kernel == "rbf"
    }

    /// The products of `x` with every buffered image (n × len), from the cache when `x`
    /// is the batch scored last against this very buffer.
    fn cross_products(&self, x: ArrayView2<f32>) -> Array2<f32> {
        let n = self.y.len();
        if let Ok(mut cache) = self.cross.lock() {
            if let Some((cx, cn, c)) = cache.take() {
                if cn == n && x.iter().eq(cx.iter()) {
                    return c;
                }
            }
        }
        let d = x.ncols();
        let all = ArrayView2::from_shape((n, d), &self.x).expect("buffer shape");
        linalg::gram(&x, &all)
    }

    /// Adds a batch to the buffer and extends the Gram matrix by the batch's rows (moved
    /// to a larger block only when the room runs out: at most the buffer's size, twice as
    /// large each time).
    fn append(&mut self, x: ArrayView2<f32>, y: ArrayView1<u16>) {
        let d = x.ncols();
        let b = x.nrows();
        let n = self.y.len();
        let cross = self.cross_products(x); // b × n
        let m = n + b;
        if m > self.stride {
            let most = if self.params.nystrom {
                self.params.buffer
            } else {
                self.params
                    .buffer
                    .saturating_add(self.params.refit)
                    .saturating_add(b)
            };
            let stride = self.stride.saturating_mul(2).min(most).max(m);
            let mut gram = vec![0f32; stride * stride];
            for i in 0..n {
                gram[i * stride..i * stride + n]
                    .copy_from_slice(&self.gram[i * self.stride..i * self.stride + n]);
            }
            self.gram = gram;
            self.stride = stride;
        }
        self.x.extend(x.iter());
        self.y.extend(y.iter());
        let new = ArrayView2::from_shape((b, d), &self.x[n * d..]).expect("batch shape");
        let own = linalg::gram(&new, &new);
        let s = self.stride;
        for r in 0..b {
            for c in 0..n {
                let v = cross[[r, c]];
                self.gram[(n + r) * s + c] = v;
                self.gram[c * s + n + r] = v;
            }
            self.gram[(n + r) * s + n..(n + r) * s + m]
                .copy_from_slice(own.row(r).as_slice().expect("own rows"));
        }
    }

    /// Drops the oldest images beyond `buffer` (only before a solve, so that the images
    /// an RBF model scores against stay in the buffer); the Gram matrix moves up in place.
    fn trim(&mut self) {
        let n = self.y.len();
        let drop = n.saturating_sub(self.params.buffer);
        if drop == 0 {
            return;
        }
        let Some(d) = self.n_features else { return };
        let m = n - drop;
        let s = self.stride;
        for i in 0..m {
            let src = (drop + i) * s + drop;
            self.gram.copy_within(src..src + m, i * s);
        }
        self.x.drain(..drop * d);
        self.y.drain(..drop);
    }

    /// Squared norms of the buffered images (the Gram matrix's diagonal).
    fn diag(&self) -> Vec<f64> {
        if let Some(ny) = &self.ny {
            return ny.norms.clone();
        }
        let n = self.y.len();
        (0..n)
            .map(|i| f64::from(self.gram[i * self.stride + i]))
            .collect()
    }

    /// The absolute RBF width of the buffer: `gamma` over the mean squared distance
    /// between its images, `2·mean(‖x‖²) − 2·mean(G)`, from the squared norms `diag` and
    /// the sum of the Gram matrix.
    fn gamma_abs_of(&self, diag: &[f64], gram_sum: f64) -> f64 {
        let n = diag.len();
        let mean_sq = diag.iter().sum::<f64>() / n as f64;
        let mean_g = gram_sum / (n * n) as f64;
        let mean_dist = (2.0 * mean_sq - 2.0 * mean_g).max(f64::MIN_POSITIVE);
        self.params.gamma / mean_dist
    }

    /// The buffered Gram matrix as a view.
    fn gram_view(&self) -> ArrayView2<'_, f32> {
        let n = self.y.len();
        let len = if n == 0 { 0 } else { (n - 1) * self.stride + n };
        ArrayView2::from_shape((n, n).strides((self.stride, 1)), &self.gram[..len])
            .expect("gram shape")
    }

    /// The kernel rows of images whose products with the buffer's first columns are
    /// `cross` (b × m) and whose squared norms are `sq`: the products themselves (linear)
    /// or `exp(−γ‖x − l‖²)` with the model's γ (RBF).
    fn kernel_rows(&self, cross: ArrayView2<f32>, sq: &[f64]) -> Array2<f32> {
        if !self.rbf() {
            return cross.to_owned();
        }
        let diag = self.diag();
        Array2::from_shape_fn(cross.dim(), |(i, j)| {
            let d2 = (sq[i] + diag[j] - 2.0 * f64::from(cross[[i, j]])).max(0.0);
            (-self.gamma_abs * d2).exp() as f32
        })
    }

    /// Fixes the buffer's images as the landmarks: γ from them, the centre `c` (their
    /// mean kernel row), and the sums started with their own kernel rows.
    fn freeze(&mut self) {
        let m = self.y.len();
        let diag = self.diag();
        if self.rbf() {
            let gram_sum = self.gram_view().iter().map(|&v| f64::from(v)).sum();
            self.gamma_abs = self.gamma_abs_of(&diag, gram_sum);
        }
        let k = self.kernel_rows(self.gram_view(), &diag);
        let centre = (0..m)
            .map(|j| k.column(j).iter().map(|&v| f64::from(v)).sum::<f64>() / m as f64)
            .collect();
        // The Gram matrix is not needed any more: the regulariser goes into the system
        // now, and the kernel rows need only the landmarks' norms.
        self.gram = Vec::new();
        self.stride = 0;
        let p = m + 1;
        let mut ktk = vec![0.0; p * p];
        add_regulariser(&mut ktk, &k, self.params.lambda);
        self.ny = Some(NyStats {
            centre,
            ktk,
            norms: diag,
            kty: vec![0.0; p * self.params.classes],
            pending: Vec::new(),
            images: 0,
        });
        let y = self.y.clone();
        self.accumulate(&k, &y);
    }

    /// Adds the kernel rows `k` (b × m) of images labelled `y` to the Nyström sums, as
    /// `φ = [k − c, 1]` in f64: to `Σ φᵀy` at once, to `Σ φᵀφ` by [`SYRK_ROWS`] rows.
    fn accumulate(&mut self, k: &Array2<f32>, y: &[u16]) {
        let classes = self.params.classes;
        let Some(ny) = self.ny.as_mut() else { return };
        let m = k.ncols();
        for (row, &label) in k.rows().into_iter().zip(y) {
            for (j, &v) in row.iter().chain(std::iter::once(&1.0)).enumerate() {
                let v = if j < m {
                    f64::from(v) - ny.centre[j]
                } else {
                    1.0
                };
                let t = &mut ny.kty[j * classes..(j + 1) * classes];
                for (c, t) in t.iter_mut().enumerate() {
                    *t += if c == usize::from(label) { v } else { -v };
                }
            }
        }
        ny.images += k.nrows() as u64;
        match k.as_slice() {
            Some(rows) => ny.add_or_hold(rows),
            None => ny.add_or_hold(&k.iter().copied().collect::<Vec<_>>()),
        }
    }

    /// Learns images of a frozen model: their kernel rows into the sums.
    fn learn_through_landmarks(&mut self, x: ArrayView2<f32>, y: ArrayView1<u16>) {
        let cross = self.cross_products(x);
        let k = self.kernel_rows(cross.view(), &row_sq_norms(x));
        let y: Vec<u16> = y.to_vec();
        self.accumulate(&k, &y);
    }

    /// The Nyström solve: `(S + λ·mean(diag K)·[K_LL 0; 0 0])·a = T` over `φ = [k − c, 1]`;
    /// the scores are then `k·a[..m] + (a[m] − c·a[..m])`.
    fn fit_nystrom(&mut self) -> Result<()> {
        if let Some(ny) = self.ny.as_mut() {
            ny.add_pending();
        }
        let m = self.y.len();
        let classes = self.params.classes;
        let Some(ny) = self.ny.as_ref() else {
            return Ok(());
        };
        let p = m + 1;
        // The sums hold the upper triangle.
        let mean_diag_a = (0..p).map(|i| ny.ktk[i * p + i]).sum::<f64>() / p as f64;
        let system = |jitter: f64| {
            let extra = jitter * mean_diag_a.max(f64::MIN_POSITIVE);
            Array2::from_shape_fn((p, p), |(i, j)| {
                let on_diag = if i == j { extra } else { 0.0 };
                ny.ktk[i.min(j) * p + i.max(j)] + on_diag
            })
        };
        let t = ArrayView2::from_shape((p, classes), &ny.kty)
            .expect("kty shape")
            .to_owned();
        // The system is singular when the landmarks are (duplicates; a linear kernel with
        // more landmarks than features, where any solution gives the same weights): then
        // a whisker on the diagonal, the smallest that lets the factorisation through.
        let mut last = String::new();
        for jitter in [0.0, 1e-9, 1e-7, 1e-5, 1e-3] {
            match linalg::cholesky_solve(system(jitter), &t) {
                Ok(sol) => {
                    if jitter > 0.0 {
                        tracing::debug!(
                            "{NAME}: Nyström solve with a relative jitter of {jitter:e}"
                        );
                    }
                    let alpha = sol.slice(ndarray::s![..m, ..]).mapv(|v| v as f32);
                    let bias = (0..classes)
                        .map(|c| {
                            let shift: f64 = (0..m).map(|j| ny.centre[j] * sol[[j, c]]).sum();
                            (sol[[m, c]] - shift) as f32
                        })
                        .collect();
                    self.bias = Some(bias);
                    return self.set_solution(alpha, m);
                }
                Err(e) => last = e,
            }
        }
        Err(Error::model(format!(
            "{NAME}: the Nyström solve failed: {last}"
        )))
    }

    /// Keeps the solution `alpha` (n × K, over the first `n` buffered images): as dual
    /// coefficients (RBF) or primal weights `Xᵀ·A` (linear).
    fn set_solution(&mut self, alpha: Array2<f32>, n: usize) -> Result<()> {
        if alpha.iter().any(|v| !v.is_finite()) {
            return Err(Error::model(format!(
                "{NAME}: the solve produced non-finite weights (features too large); not fitted"
            )));
        }
        let Some(d) = self.n_features else {
            return Ok(());
        };
        if self.rbf() {
            self.alpha = Some(alpha);
        } else {
            let x = ArrayView2::from_shape((n, d), &self.x[..n * d]).expect("buffer shape");
            let mut w = Array2::<f32>::zeros((d, self.params.classes));
            linalg::par_gemm(1.0, &x.t(), &alpha.view(), 0.0, &mut w.view_mut());
            self.w = Some(w);
        }
        self.n_fit = n;
        self.fits += 1;
        self.since_fit = 0;
        Ok(())
    }

    /// Solves for the weights on the buffer.
    fn fit(&mut self) -> Result<()> {
        if self.ny.is_some() {
            return self.fit_nystrom();
        }
        self.trim();
        let n = self.y.len();
        if self.n_features.is_none() || n == 0 {
            return Ok(());
        }
        let diag = self.diag();
        let s = self.stride;
        let mut a = Array2::from_shape_fn((n, n), |(i, j)| f64::from(self.gram[i * s + j]));
        let mut gamma_abs = 0.0;
        if self.rbf() {
            gamma_abs = self.gamma_abs_of(&diag, a.sum());
            for i in 0..n {
                for j in 0..n {
                    let d2 = (diag[i] + diag[j] - 2.0 * a[[i, j]]).max(0.0);
                    a[[i, j]] = (-gamma_abs * d2).exp();
                }
            }
        }
        let mean_diag = (0..n).map(|i| a[[i, i]]).sum::<f64>() / n as f64;
        let ridge = self.params.lambda * mean_diag.max(f64::MIN_POSITIVE);
        for i in 0..n {
            a[[i, i]] += ridge;
        }
        let targets = Array2::from_shape_fn((n, self.params.classes), |(i, k)| {
            if usize::from(self.y[i]) == k {
                1.0
            } else {
                -1.0
            }
        });
        let alpha = linalg::cholesky_solve(a, &targets)
            .map_err(|e| Error::model(format!("{NAME}: the solve failed: {e}")))?
            .mapv(|v| v as f32);
        self.set_solution(alpha, n)?;
        self.bias = None;
        if self.rbf() {
            self.gamma_abs = gamma_abs;
        }
        Ok(())
    }

    /// The probabilities of images whose kernel rows against the images of the last
    /// solve are `k` (an RBF model with dual coefficients).
    fn proba_of_kernel_rows(&self, k: &Array2<f32>, alpha: &Array2<f32>) -> Array2<f32> {
        let mut z = self.scores(k.view(), alpha);
        super::softmax_rows(&mut z.view_mut(), self.params.temperature);
        z
    }

    /// The raw scores `inputs · weights` plus the bias: the primal weights over features,
    /// or the dual coefficients over kernel rows.
    fn scores(&self, inputs: ArrayView2<f32>, weights: &Array2<f32>) -> Array2<f32> {
        let mut z = Array2::<f32>::zeros((inputs.nrows(), self.params.classes));
        linalg::gemm(1.0, &inputs, &weights.view(), 0.0, &mut z.view_mut());
        if let Some(b) = &self.bias {
            for mut row in z.rows_mut() {
                row.iter_mut().zip(b).for_each(|(v, &b)| *v += b);
            }
        }
        z
    }

    /// The raw scores (n × 10), `None` before the first solve.
    pub fn decision_function(&self, x: ArrayView2<f32>) -> Result<Option<Array2<f32>>> {
        check_features(x, self.n_features)?;
        if let Some(w) = &self.w {
            return Ok(Some(self.scores(x, w)));
        }
        let Some(alpha) = &self.alpha else {
            return Ok(None);
        };
        let cross = self.cross_products(x);
        // The images of the last solve are the buffer's first `n_fit`.
        let k = self.kernel_rows(cross.slice(ndarray::s![.., ..self.n_fit]), &row_sq_norms(x));
        let z = self.scores(k.view(), alpha);
        if let Ok(mut cache) = self.cross.lock() {
            *cache = Some((x.iter().copied().collect(), self.y.len(), cross));
        }
        Ok(Some(z))
    }

    /// Scores the batch with the latest solve (the probabilities and the loss), then
    /// learns it: [`Learner::partial_fit_scored`].
    /// [`Learner::fit_batch_scored`]'s step, on a checked, non-empty batch.
    fn learn(&mut self, x: ArrayView2<f32>, y: ArrayView1<u16>) -> Result<(f64, Array2<f32>)> {
        let n = x.nrows();
        // A frozen Nyström model scores and learns the batch from the same kernel rows
        // (its landmarks are the images of its solves), computed once.
        let frozen_k = (self.ny.is_some() && self.n_fit == self.y.len() && self.alpha.is_some())
            .then(|| self.kernel_rows(self.cross_products(x).view(), &row_sq_norms(x)));
        let proba = match (&frozen_k, &self.alpha) {
            (Some(k), Some(alpha)) => self.proba_of_kernel_rows(k, alpha),
            _ => self.predict_proba(x)?,
        };
        let loss = proba
            .rows()
            .into_iter()
            .zip(y.iter())
            .map(|(p, &l)| -f64::from(p[usize::from(l)].max(1e-15)).ln())
            .sum::<f64>()
            / n as f64;
        if self.n_features.is_none() {
            let (b, d) = (self.params.buffer, x.ncols());
            let bytes = if self.params.nystrom {
                // The landmarks (m × d) and their Gram matrix in f32; then the f64 sums
                // and, at a solve, the f64 system (the kernel rows of the landmarks, f32,
                // only while they are fixed, before the system exists).
                4 * crate::limits::product(&[b, d])
                    + 20 * crate::limits::product(&[b.saturating_add(1), b.saturating_add(1)])
            } else {
                // The buffer grows to `buffer` + `refit` images before a solve trims it;
                // the Gram matrix, the f64 system and its kernel.
                let m = b.saturating_add(self.params.refit).saturating_add(n);
                4 * (3 * crate::limits::product(&[m, m]) + crate::limits::product(&[m, d]))
            };
            crate::limits::check(
                &format!(
                    "ridge (buffer = {}, refit = {}, nystrom = {}, {d} features): the image \
                     buffer, its Gram matrix and the solve",
                    self.params.buffer, self.params.refit, self.params.nystrom
                ),
                bytes,
            )?;
        }
        self.n_features = Some(x.ncols());
        // A model whose landmarks were just fixed solves at once: its γ is theirs now.
        let mut froze = false;
        if self.params.nystrom {
            // Fill the landmarks, then learn the rest through them.
            let take = if self.ny.is_some() {
                0
            } else {
                self.params.buffer.saturating_sub(self.y.len()).min(n)
            };
            if take > 0 {
                self.append(
                    x.slice(ndarray::s![..take, ..]),
                    y.slice(ndarray::s![..take]),
                );
            }
            if self.ny.is_none() && self.y.len() >= self.params.buffer {
                self.freeze();
                froze = true;
            }
            match frozen_k {
                // Learnt from the kernel rows it was scored with.
                Some(k) => {
                    let y: Vec<u16> = y.to_vec();
                    self.accumulate(&k, &y);
                }
                None if take < n => self.learn_through_landmarks(
                    x.slice(ndarray::s![take.., ..]),
                    y.slice(ndarray::s![take..]),
                ),
                None => {}
            }
        } else {
            self.append(x, y);
        }
        self.seen += n as u64;
        self.since_fit += n as u64;
        let refit = if self.ny.is_some() {
            self.params.nystrom_refit
        } else if self.params.nystrom {
            // While the landmarks fill, each solve waits for as many new images as the
            // last one had: solves at refit, 2·refit, 4·refit, … images, whose cubic
            // costs add up to less than twice the last one's; none past half the
            // landmarks (the solve when they are fixed comes soon after).
            if self.y.len().saturating_mul(2) > self.params.buffer {
                usize::MAX
            } else {
                self.params.refit.max(self.n_fit)
            }
        } else {
            self.params.refit
        };
        if froze || self.since_fit >= refit as u64 {
            self.fit()?;
        }
        Ok((loss, proba))
    }

    /// Loads a model saved by [`Learner::save`].
    pub fn load(dir: &Path) -> Result<Self> {
        let ck = Checkpoint::open(dir, NAME)?;
        let meta: Meta = ck.meta()?;
        meta.params
            .check()
            .map_err(|e| ck.bad_meta(format!("bad params: {e}")))?;
        let n = meta.buffered;
        // Between solves the buffer may hold the images since the last one beyond `buffer`.
        if n as u64 > meta.params.buffer as u64 + meta.since_fit
            || n as u64 > meta.seen
            || meta.since_fit > meta.seen
        {
            return Err(ck.bad_meta(format!(
                "inconsistent counters: {n} buffered (buffer {}), {} seen, {} since the last solve",
                meta.params.buffer, meta.seen, meta.since_fit
            )));
        }
        let mut names = Vec::new();
        let mut m = Ridge::new(meta.params.clone())?;
        match meta.n_features {
            None if n > 0 || meta.fitted => {
                return Err(ck.bad_meta("n_features is null but the model has been trained"))
            }
            None => {}
            Some(0) => return Err(ck.bad_meta("n_features is 0")),
            Some(d) => {
                let legacy = meta.ny_images.is_some() && !meta.ny_system;
                names.extend(["x", "y"].map(String::from));
                if meta.ny_images.is_none() || legacy {
                    names.push("gram".into());
                }
                if meta.fitted {
                    names.push(
                        if meta.params.kernel == "rbf" {
                            "alpha"
                        } else {
                            "w"
                        }
                        .into(),
                    );
                }
                if meta.ny_pending as u64 > meta.ny_images.unwrap_or(0) {
                    return Err(ck.bad_meta(format!(
                        "{} pending kernel rows but {} images in the Nyström sums",
                        meta.ny_pending,
                        meta.ny_images.unwrap_or(0)
                    )));
                }
                if meta.ny_images.is_some() {
                    if !meta.params.nystrom || n != meta.params.buffer {
                        return Err(ck.bad_meta(format!(
                            "Nyström sums with nystrom = {} and {n} landmarks (buffer {})",
                            meta.params.nystrom, meta.params.buffer
                        )));
                    }
                    names.extend(["ny_kty", "ny_centre"].map(String::from));
                    if legacy {
                        names.push("ny_ktk".into());
                    } else {
                        names.extend(["ny_system", "ny_norms"].map(String::from));
                    }
                    if meta.ny_pending > 0 {
                        names.push("ny_pending".into());
                    }
                    if meta.fitted {
                        names.push("bias".into());
                    }
                }
                if meta.fitted && (meta.n_fit == 0 || meta.n_fit > n) {
                    return Err(ck.bad_meta(format!("n_fit {} is not in 1..={n}", meta.n_fit)));
                }
                ck.expect_names(&names)?;
                m.x = ck.f32("x", &[n, d])?;
                if names.iter().any(|t| t == "gram") {
                    m.gram = ck.f32("gram", &[n, n])?;
                    m.stride = n;
                }
                m.y = ck.labels("y", n, meta.params.classes)?;
                m.gamma_abs = meta.gamma_abs;
                if let Some(images) = meta.ny_images {
                    let (ktk, norms) = if legacy {
                        // Σ φᵀφ and the Gram matrix: the regulariser added now, as
                        // `freeze` adds it, and the Gram matrix dropped.
                        let norms = m.diag();
                        let k = m.kernel_rows(m.gram_view(), &norms);
                        let mut ktk = ck.f64("ny_ktk", &[n + 1, n + 1])?;
                        add_regulariser(&mut ktk, &k, meta.params.lambda);
                        m.gram = Vec::new();
                        m.stride = 0;
                        (ktk, norms)
                    } else {
                        (
                            ck.f64("ny_system", &[n + 1, n + 1])?,
                            ck.f64("ny_norms", &[n])?,
                        )
                    };
                    m.ny = Some(NyStats {
                        centre: ck.f64("ny_centre", &[n])?,
                        ktk,
                        norms,
                        kty: ck.f64("ny_kty", &[n + 1, meta.params.classes])?,
                        pending: if meta.ny_pending > 0 {
                            ck.f32("ny_pending", &[meta.ny_pending, n])?
                        } else {
                            Vec::new()
                        },
                        images,
                    });
                }
                if meta.fitted && meta.params.kernel == "rbf" {
                    m.alpha = Some(ck.f32_2d("alpha", meta.n_fit, meta.params.classes)?);
                } else if meta.fitted {
                    m.w = Some(ck.f32_2d("w", d, meta.params.classes)?);
                }
                if meta.fitted && meta.ny_images.is_some() {
                    m.bias = Some(ck.f32("bias", &[meta.params.classes])?);
                }
            }
        }
        ck.expect_names(&names)?;
        m.n_features = meta.n_features;
        m.n_fit = meta.n_fit;
        m.gamma_abs = meta.gamma_abs;
        m.seen = meta.seen;
        m.since_fit = meta.since_fit;
        m.fits = meta.fits;
        Ok(m)
    }
}

impl crate::model::Model for Ridge {
    const NAME: &'static str = NAME;
    const ABOUT: &'static str = "one-vs-rest kernel ridge regression, for learnt patch features";
    type Params = RidgeParams;

    fn build(params: RidgeParams) -> Result<Self> {
        Ridge::new(params)
    }

    fn open(dir: &Path) -> Result<Self> {
        Ridge::load(dir)
    }
}

impl Learner for Ridge {
    fn name(&self) -> &'static str {
        NAME
    }

    fn n_features(&self) -> Option<usize> {
        self.n_features
    }

    fn classes(&self) -> usize {
        self.params.classes
    }

    /// Buffers the batch (its loss is scored with the weights of the latest solve) and
    /// solves again once `refit` images have arrived since the last solve.
    fn fit_batch(&mut self, x: ArrayView2<f32>, y: ArrayView1<u16>) -> Result<f64> {
        Ok(self.learn(x, y)?.0)
    }

    /// The batch is scored on its way to being learnt (its loss needs the scores), so the
    /// trainer's test-then-train scores come from there.
    fn scores_while_learning(&self) -> bool {
        true
    }

    fn fit_batch_scored(
        &mut self,
        x: ArrayView2<f32>,
        y: ArrayView1<u16>,
    ) -> Result<(f64, Option<Array2<f32>>)> {
        let (loss, proba) = self.learn(x, y)?;
        Ok((loss, Some(proba)))
    }
    fn predict_proba(&self, x: ArrayView2<f32>) -> Result<Array2<f32>> {
        let Some(mut z) = self.decision_function(x)? else {
            return Ok(Array2::from_elem(
                (x.nrows(), self.params.classes),
                1.0 / self.params.classes as f32,
            ));
        };
        super::softmax_rows(&mut z.view_mut(), self.params.temperature);
        Ok(z)
    }

    fn end_epoch(&mut self) -> Result<()> {
        if self.since_fit > 0 {
            self.fit()?;
        }
        Ok(())
    }

    fn save(&self, dir: &Path) -> Result<()> {
        let mut t = TensorsOut::default();
        let n = self.y.len();
        if let Some(d) = self.n_features {
            t.f32_slice("x", &[n, d], &self.x);
            let y: Vec<u64> = self.y.iter().map(|&l| u64::from(l)).collect();
            t.u64("y", &[n], &y);
            if self.ny.is_none() {
                if self.stride == n {
                    t.f32_slice("gram", &[n, n], &self.gram[..n * n]);
                } else {
                    t.f32("gram", &[n, n], self.gram_view().iter());
                }
            }
            if let Some(w) = &self.w {
                t.f32("w", &[d, self.params.classes], w.iter());
            }
            if let Some(a) = &self.alpha {
                t.f32("alpha", &[self.n_fit, self.params.classes], a.iter());
            }
            if let Some(ny) = &self.ny {
                t.f64("ny_centre", &[n], ny.centre.iter());
                t.f64_slice("ny_system", &[n + 1, n + 1], &ny.ktk);
                t.f64("ny_norms", &[n], ny.norms.iter());
                t.f64("ny_kty", &[n + 1, self.params.classes], ny.kty.iter());
                if !ny.pending.is_empty() {
                    t.f32_slice("ny_pending", &[ny.pending.len() / n, n], &ny.pending);
                }
                if let Some(b) = &self.bias {
                    t.f32("bias", &[self.params.classes], b.iter());
                }
            }
        }
        let meta = Meta {
            params: self.params.clone(),
            n_features: self.n_features,
            buffered: n,
            fitted: self.w.is_some() || self.alpha.is_some(),
            n_fit: self.n_fit,
            gamma_abs: self.gamma_abs,
            seen: self.seen,
            since_fit: self.since_fit,
            fits: self.fits,
            ny_images: self.ny.as_ref().map(|n| n.images),
            ny_pending: self.ny.as_ref().map_or(0, |ny| ny.pending.len() / n.max(1)),
            ny_system: self.ny.is_some(),
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
    use crate::model;
    use crate::model::CLASSES;
    use crate::rng::SplitMix;
    use ndarray::s;

    fn data(rng: &mut SplitMix, n: usize, d: usize) -> (Array2<f32>, ndarray::Array1<u16>) {
        // Class means far apart, so a ridge classifier separates them.
        let y: ndarray::Array1<u16> = (0..n).map(|_| rng.below(CLASSES) as u16).collect();
        let x = Array2::from_shape_fn((n, d), |(i, j)| {
            (if j % CLASSES == usize::from(y[i]) {
                2.0
            } else {
                0.0
            }) + rng.normal() as f32
        });
        (x, y)
    }

    /// Solves `a·x = b` (small, dense) by Gauss–Jordan elimination with partial pivoting:
    /// a reference independent of the model's Cholesky.
    fn gauss_solve(mut a: Array2<f64>, mut b: Array2<f64>) -> Array2<f64> {
        let n = a.nrows();
        for c in 0..n {
            let p = (c..n)
                .max_by(|&i, &j| a[[i, c]].abs().total_cmp(&a[[j, c]].abs()))
                .unwrap();
            for k in 0..n {
                a.swap([c, k], [p, k]);
            }
            for k in 0..b.ncols() {
                b.swap([c, k], [p, k]);
            }
            for r in 0..n {
                if r != c {
                    let f = a[[r, c]] / a[[c, c]];
                    for k in 0..n {
                        a[[r, k]] -= f * a[[c, k]];
                    }
                    for k in 0..b.ncols() {
                        b[[r, k]] -= f * b[[c, k]];
                    }
                }
            }
        }
        for r in 0..n {
            for k in 0..b.ncols() {
                b[[r, k]] /= a[[r, r]];
            }
        }
        b
    }

    fn targets(y: &[u16]) -> Array2<f64> {
        Array2::from_shape_fn((y.len(), CLASSES), |(i, k)| {
            if usize::from(y[i]) == k {
                1.0
            } else {
                -1.0
            }
        })
    }

    #[test]
    fn nystrom_with_a_linear_kernel_is_the_primal_ridge_on_every_image() {
        // With more landmarks than features, w = Lᵀα spans every w, and the Nyström
        // objective ‖X·Lᵀα − Y‖² + λ'·αᵀLLᵀα is the primal ‖Xw − Y‖² + λ'‖w‖² over all the
        // images, not only the landmarks: w = (XᵀX + λ'I)⁻¹XᵀY, λ' = λ·mean‖l‖².
        let mut rng = SplitMix(5);
        let (x, y) = data(&mut rng, 150, 8);
        let mut m = Ridge::new(RidgeParams {
            kernel: "linear".into(),
            lambda: 0.05,
            buffer: 20,
            refit: 1_000,
            nystrom: true,
            ..RidgeParams::default()
        })
        .unwrap();
        for start in (0..150).step_by(32) {
            let end = (start + 32).min(150);
            m.partial_fit(x.slice(s![start..end, ..]), y.slice(s![start..end]))
                .unwrap();
        }
        assert_eq!(m.buffered(), 20, "the landmarks stay");
        assert_eq!(m.ny.as_ref().unwrap().images, 150);
        m.end_epoch().unwrap();
        let xd = x.mapv(f64::from);
        let l = xd.slice(s![..20, ..]);
        let lam = 0.05 * l.rows().into_iter().map(|r| r.dot(&r)).sum::<f64>() / 20.0;
        // With the unpenalised intercept of the centred rows: [X 1] against Y.
        let x1 = ndarray::concatenate![ndarray::Axis(1), xd, Array2::<f64>::ones((150, 1))];
        let mut a = x1.t().dot(&x1);
        for i in 0..8 {
            a[[i, i]] += lam;
        }
        let want = gauss_solve(a, x1.t().dot(&targets(y.as_slice().unwrap())));
        let got = m.w.as_ref().unwrap();
        for (g, w) in got.iter().zip(want.slice(s![..8, ..]).iter()) {
            assert!(
                (f64::from(*g) - w).abs() < 1e-4 * (1.0 + w.abs()),
                "{g} vs {w}"
            );
        }
        for (g, w) in m.bias.as_ref().unwrap().iter().zip(want.row(8).iter()) {
            assert!(
                (f64::from(*g) - w).abs() < 1e-4 * (1.0 + w.abs()),
                "bias {g} vs {w}"
            );
        }
    }

    #[test]
    fn the_scores_given_while_learning_are_the_scores_before_learning() {
        // Before and after the landmarks are fixed (and solved), the probabilities that
        // partial_fit_scored gives are predict_proba's just before the batch is learnt,
        // and learning from them leaves the model partial_fit would.
        let mut rng = SplitMix(5);
        let (x, y) = data(&mut rng, 160, 10);
        let params = RidgeParams {
            lambda: 0.1,
            buffer: 40,
            refit: 20,
            nystrom: true,
            nystrom_refit: 30,
            ..RidgeParams::default()
        };
        let (mut a, mut b) = (
            Ridge::new(params.clone()).unwrap(),
            Ridge::new(params).unwrap(),
        );
        let mut frozen_batches = 0;
        for start in (0..160).step_by(20) {
            let (xs, ys) = (
                x.slice(s![start..start + 20, ..]),
                y.slice(s![start..start + 20]),
            );
            let before = a.predict_proba(xs).unwrap();
            let (loss, during) = a.partial_fit_scored(xs, ys).unwrap();
            assert_eq!(during.unwrap(), before, "batch at {start}");
            assert_eq!(loss, b.partial_fit(xs, ys).unwrap(), "batch at {start}");
            frozen_batches += usize::from(a.ny.is_some() && a.alpha.is_some());
        }
        assert!(frozen_batches >= 5, "{frozen_batches}");
        assert_eq!(
            a.predict_proba(x.view()).unwrap(),
            b.predict_proba(x.view()).unwrap()
        );
    }

    #[test]
    fn nystrom_rbf_solves_its_normal_equations_in_any_batch_order() {
        // The solution satisfies Kₙₘᵀ(Kₙₘα − Y) + λ'·Kₘₘα = 0 over every image learnt, with
        // the kernel computed here from the definition; and a stream in another order after
        // the landmarks gives the same model.
        let mut rng = SplitMix(8);
        let (x, y) = data(&mut rng, 200, 12);
        let params = RidgeParams {
            lambda: 0.1,
            buffer: 40,
            refit: 10_000,
            nystrom: true,
            ..RidgeParams::default()
        };
        let fit = |order: &[usize]| {
            let mut m = Ridge::new(params.clone()).unwrap();
            m.partial_fit(x.slice(s![..40, ..]), y.slice(s![..40]))
                .unwrap();
            for chunk in order.chunks(25) {
                let xs = ndarray::stack(
                    ndarray::Axis(0),
                    &chunk.iter().map(|&i| x.row(i)).collect::<Vec<_>>(),
                )
                .unwrap();
                let ys: ndarray::Array1<u16> = chunk.iter().map(|&i| y[i]).collect();
                m.partial_fit(xs.view(), ys.view()).unwrap();
            }
            m.end_epoch().unwrap();
            m
        };
        let forward: Vec<usize> = (40..200).collect();
        let mut shuffled = forward.clone();
        SplitMix(1).shuffle(&mut shuffled);
        let a = fit(&forward);
        let b = fit(&shuffled);
        let (pa, pb) = (
            a.predict_proba(x.view()).unwrap(),
            b.predict_proba(x.view()).unwrap(),
        );
        // The same sums in another order: equal up to f64 rounding.
        for (u, v) in pa.iter().zip(pb.iter()) {
            assert!((u - v).abs() < 1e-5, "{u} vs {v}");
        }
        // Normal equations, from scratch in f64.
        let xd = x.mapv(f64::from);
        let l = xd.slice(s![..40, ..]).to_owned();
        let k = |p: ndarray::ArrayView1<f64>, q: ndarray::ArrayView1<f64>| {
            (-a.gamma_abs * (&p - &q).mapv(|v| v * v).sum()).exp()
        };
        let knm = Array2::from_shape_fn((200, 40), |(i, j)| k(xd.row(i), l.row(j)));
        let kmm = Array2::from_shape_fn((40, 40), |(i, j)| k(l.row(i), l.row(j)));
        // Scores k·α + b with b the unpenalised intercept (after centring, the same model):
        // the normal equations of ‖Kα + 1b − Y‖² + λ'·αᵀKₘₘα in α and in b.
        let alpha = a.alpha.as_ref().unwrap().mapv(f64::from);
        let bias = ndarray::Array1::from(a.bias.clone().unwrap()).mapv(f64::from);
        let resid = knm.dot(&alpha) + &bias - targets(y.as_slice().unwrap());
        let grad = knm.t().dot(&resid) + kmm.dot(&alpha) * 0.1;
        let grad_b = resid.sum_axis(ndarray::Axis(0));
        assert!(grad_b.mapv(f64::abs).sum() < 1e-2, "{grad_b}");
        let scale = knm
            .t()
            .dot(&targets(y.as_slice().unwrap()))
            .mapv(f64::abs)
            .sum();
        assert!(
            grad.mapv(f64::abs).sum() < 1e-3 * scale,
            "{}",
            grad.mapv(f64::abs).sum()
        );
        // Still learning: the model separates the classes.
        let acc = a
            .predict(x.view())
            .unwrap()
            .iter()
            .zip(y.iter())
            .filter(|(p, t)| p == t)
            .count();
        assert!(acc > 150, "{acc}");
        // A checkpoint of the Nyström sums continues exactly.
        let mut c = Ridge::new(params.clone()).unwrap();
        model::test_util::assert_save_load_continues(&mut c, NAME, x.view(), y.view(), 120);
    }

    #[test]
    fn matches_the_closed_form_primal_solution() {
        // Dual solution W = Xᵀ(XXᵀ + λI)⁻¹Y equals the primal (XᵀX + λI)⁻¹XᵀY.
        let mut rng = SplitMix(3);
        let (x, y) = data(&mut rng, 60, 25);
        let mut m = Ridge::new(RidgeParams {
            refit: 1_000,
            lambda: 0.1,
            kernel: "linear".into(),
            ..RidgeParams::default()
        })
        .unwrap();
        m.partial_fit(x.slice(s![..30, ..]), y.slice(s![..30]))
            .unwrap();
        m.partial_fit(x.slice(s![30.., ..]), y.slice(s![30..]))
            .unwrap();
        assert!(m.w.is_none(), "not yet refitted");
        m.end_epoch().unwrap();
        let xd = x.mapv(f64::from);
        let gram = xd.dot(&xd.t());
        let lam = 0.1 * (0..60).map(|i| gram[[i, i]]).sum::<f64>() / 60.0;
        let yt = Array2::from_shape_fn((60, CLASSES), |(i, k)| {
            if usize::from(y[i]) == k {
                1.0
            } else {
                -1.0
            }
        });
        let primal = linalg::cholesky_solve(
            xd.t().dot(&xd) + Array2::<f64>::eye(25) * lam,
            &xd.t().dot(&yt),
        )
        .unwrap();
        let w = m.w.as_ref().unwrap();
        let err = primal
            .iter()
            .zip(w.iter())
            .fold(0f64, |e, (a, b)| e.max((a - f64::from(*b)).abs()));
        assert!(err < 1e-4, "max |primal - dual| = {err}");
        // And it learns: accuracy on fresh data well above chance.
        let (xt, yt) = data(&mut rng, 200, 25);
        let pred = m.predict(xt.view()).unwrap();
        let acc = pred.iter().zip(yt.iter()).filter(|(a, b)| a == b).count() as f64 / 200.0;
        assert!(acc > 0.5, "accuracy {acc} (chance: 0.1)");
    }

    #[test]
    fn the_buffer_keeps_the_latest_images_and_their_gram_matrix() {
        let mut rng = SplitMix(4);
        let (x, y) = data(&mut rng, 50, 7);
        let mut m = Ridge::new(RidgeParams {
            buffer: 20,
            refit: 15,
            ..RidgeParams::default()
        })
        .unwrap();
        for c in 0..5 {
            m.partial_fit(
                x.slice(s![c * 10..(c + 1) * 10, ..]),
                y.slice(s![c * 10..(c + 1) * 10]),
            )
            .unwrap();
        }
        // Solves after batches 2 and 4 (20 and 40 images); the last batch waits for the next.
        assert_eq!(m.buffered(), 30);
        m.end_epoch().unwrap();
        assert_eq!(m.buffered(), 20);
        let kept = x.slice(s![30.., ..]);
        assert_eq!(m.x, kept.iter().copied().collect::<Vec<_>>());
        let g = kept.dot(&kept.t());
        assert_eq!(m.gram_view().dim(), (20, 20));
        for (a, b) in m.gram_view().iter().zip(g.iter()) {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0));
        }
        assert_eq!(m.fits, 3);
    }

    #[test]
    fn rbf_scores_match_a_direct_kernel_computation() {
        let mut rng = SplitMix(6);
        let (x, y) = data(&mut rng, 40, 9);
        let mut m = Ridge::new(RidgeParams {
            refit: 1_000,
            ..RidgeParams::default()
        })
        .unwrap();
        m.partial_fit(x.view(), y.view()).unwrap();
        m.end_epoch().unwrap();
        let xd = x.mapv(f64::from);
        let sq = |a: ndarray::ArrayView1<f64>, b: ndarray::ArrayView1<f64>| {
            (&a - &b).mapv(|v| v * v).sum()
        };
        let mut mean = 0.0;
        for i in 0..40 {
            for j in 0..40 {
                mean += sq(xd.row(i), xd.row(j)) / 1600.0;
            }
        }
        let g = 0.25 / mean;
        let k = Array2::from_shape_fn((40, 40), |(i, j)| (-g * sq(xd.row(i), xd.row(j))).exp());
        let lam = 0.01;
        let yt = Array2::from_shape_fn((40, CLASSES), |(i, c)| {
            if usize::from(y[i]) == c {
                1.0
            } else {
                -1.0
            }
        });
        let a = linalg::cholesky_solve(&k + &(Array2::<f64>::eye(40) * lam), &yt).unwrap();
        let (xt, _) = data(&mut rng, 5, 9);
        let xtd = xt.mapv(f64::from);
        let kt = Array2::from_shape_fn((5, 40), |(i, j)| (-g * sq(xtd.row(i), xd.row(j))).exp());
        let want = kt.dot(&a);
        let got = m.decision_function(xt.view()).unwrap().unwrap();
        let err = want
            .iter()
            .zip(got.iter())
            .fold(0f64, |e, (a, b)| e.max((a - f64::from(*b)).abs()));
        assert!(err < 1e-3, "max error {err}");
    }

    #[test]
    fn solves_double_their_interval_while_the_landmarks_fill() {
        let mut rng = SplitMix(9);
        let (x, y) = data(&mut rng, 130, 6);
        let mut m = Ridge::new(RidgeParams {
            buffer: 100,
            refit: 10,
            nystrom: true,
            nystrom_refit: 20,
            ..RidgeParams::default()
        })
        .unwrap();
        let mut solved_at = Vec::new();
        for c in 0..13 {
            let before = m.fits;
            m.partial_fit(
                x.slice(s![c * 10..(c + 1) * 10, ..]),
                y.slice(s![c * 10..(c + 1) * 10]),
            )
            .unwrap();
            if m.fits > before {
                solved_at.push((c + 1) * 10);
            }
        }
        // 10, 20, 40 while filling (80 is past half the landmarks); 100 when they are
        // fixed; then every 20.
        assert_eq!(solved_at, [10, 20, 40, 100, 120]);
    }

    #[test]
    fn a_checkpoint_in_the_earlier_nystrom_layout_is_converted() {
        // Earlier versions saved Σ φᵀφ without the regulariser (`ny_ktk`) and the
        // landmarks' Gram matrix; loading one adds the regulariser as `freeze` does.
        let mut rng = SplitMix(12);
        let (x, y) = data(&mut rng, 160, 10);
        let params = RidgeParams {
            buffer: 40,
            nystrom: true,
            refit: 10_000,
            ..RidgeParams::default()
        };
        let mut a = Ridge::new(params.clone()).unwrap();
        a.partial_fit(x.slice(s![..100, ..]), y.slice(s![..100]))
            .unwrap();
        a.end_epoch().unwrap();
        let (m, p, d) = (40, 41, 10);
        let ny = a.ny.as_ref().unwrap();
        assert!(ny.pending.is_empty());
        let landmarks = ArrayView2::from_shape((m, d), &a.x).unwrap();
        let gram = linalg::gram(&landmarks, &landmarks);
        let k = a.kernel_rows(gram.view(), &ny.norms);
        let mut reg = vec![0.0; p * p];
        add_regulariser(&mut reg, &k, params.lambda);
        let ktk: Vec<f64> = ny.ktk.iter().zip(&reg).map(|(v, r)| v - r).collect();
        let mut t = TensorsOut::default();
        t.f32("x", &[m, d], a.x.iter());
        let labels: Vec<u64> = a.y.iter().map(|&l| u64::from(l)).collect();
        t.u64("y", &[m], &labels);
        t.f32("gram", &[m, m], gram.iter());
        t.f32(
            "alpha",
            &[a.n_fit, CLASSES],
            a.alpha.as_ref().unwrap().iter(),
        );
        t.f64("ny_ktk", &[p, p], ktk.iter());
        t.f64("ny_kty", &[p, CLASSES], ny.kty.iter());
        t.f64("ny_centre", &[m], ny.centre.iter());
        t.f32("bias", &[CLASSES], a.bias.as_ref().unwrap().iter());
        let meta = Meta {
            params: params.clone(),
            n_features: Some(d),
            buffered: m,
            fitted: true,
            n_fit: a.n_fit,
            gamma_abs: a.gamma_abs,
            seen: a.seen,
            since_fit: a.since_fit,
            fits: a.fits,
            ny_images: Some(ny.images),
            ny_pending: 0,
            ny_system: false,
        };
        let dir = tempfile::tempdir().unwrap();
        save_checkpoint(dir.path(), NAME, "legacy", &meta, t).unwrap();
        let mut b = Ridge::load(dir.path()).unwrap();
        assert!(b.gram.is_empty());
        let close = |a: &Ridge, b: &Ridge, tol: f32| {
            let (pa, pb) = (
                a.predict_proba(x.view()).unwrap(),
                b.predict_proba(x.view()).unwrap(),
            );
            for (u, v) in pa.iter().zip(pb.iter()) {
                assert!((u - v).abs() < tol, "{u} vs {v}");
            }
        };
        close(&a, &b, 1e-6);
        // And it learns on, solving its converted system like the original.
        for m in [&mut a, &mut b] {
            m.partial_fit(x.slice(s![100.., ..]), y.slice(s![100..]))
                .unwrap();
            m.end_epoch().unwrap();
        }
        close(&a, &b, 1e-4);
    }

    #[test]
    fn save_load_continues_identically() {
        let mut rng = SplitMix(5);
        let (x, y) = data(&mut rng, 80, 12);
        let mut m = Ridge::new(RidgeParams {
            refit: 16,
            ..RidgeParams::default()
        })
        .unwrap();
        model::test_util::assert_save_load_continues(&mut m, NAME, x.view(), y.view(), 40);
    }

    #[test]
    fn bad_params_are_errors() {
        for p in [
            RidgeParams {
                lambda: 0.0,
                ..RidgeParams::default()
            },
            RidgeParams {
                buffer: 0,
                ..RidgeParams::default()
            },
            RidgeParams {
                temperature: f32::NAN,
                ..RidgeParams::default()
            },
        ] {
            assert!(Ridge::new(p).is_err());
        }
    }
}
