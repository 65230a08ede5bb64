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
//! With `n` buffered images of `d` features a solve costs `n³/3` and the Gram matrix
//! `n²·d` multiply-adds over the run; memory is `n·d + n²` floats (5,000 images of
//! 18,432 features: 470 MB). Probabilities (for the log loss) are the softmax of the
//! scores divided by `temperature`.

use std::path::Path;
use std::sync::Mutex;

use ndarray::{Array2, ArrayView1, ArrayView2};
use serde::{Deserialize, Serialize};

use super::{check_batch, check_features, save_checkpoint, Checkpoint, Learner, TensorsOut};
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
    /// New images between solves; ≥ 1.
    pub refit: usize,
    /// Softmax temperature of the probabilities; > 0.
    pub temperature: f32,
    /// Unused (the solve is exact); kept so every model has one.
    pub batch_size: usize,
    /// Unused (the model draws nothing at random); kept for uniformity.
    pub seed: u64,
    /// Number of classes K: labels are 0..K and the probabilities have K columns. The
    /// trainer sets it from the data's classes; 2 to 256. Default 10 (CIFAR-10).
    pub classes: usize,
}

impl Default for RidgeParams {
    fn default() -> Self {
        RidgeParams {
            classes: super::CLASSES,
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
    y: Vec<u8>,
    /// Gram matrix of the buffer, row-major (`len` × `len`).
    gram: Vec<f32>,
    /// Primal weights (d × 10) of the latest solve (linear kernel).
    w: Option<Array2<f32>>,
    /// Dual coefficients (`n_fit` × 10) of the latest solve (RBF kernel): the images of
    /// that solve are the first `n_fit` of the buffer.
    alpha: Option<Array2<f32>>,
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
            w: None,
            alpha: None,
            n_fit: 0,
            gamma_abs: 0.0,
            cross: Mutex::new(None),
            seen: 0,
            since_fit: 0,
            fits: 0,
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

    /// Adds a batch to the buffer and extends the Gram matrix by the batch's rows.
    fn append(&mut self, x: ArrayView2<f32>, y: ArrayView1<u8>) {
        let d = x.ncols();
        let b = x.nrows();
        let n = self.y.len();
        let cross = self.cross_products(x); // b × n
        let m = n + b;
        let mut gram = vec![0f32; m * m];
        for i in 0..n {
            gram[i * m..i * m + n].copy_from_slice(&self.gram[i * n..(i + 1) * n]);
        }
        self.x.extend(x.iter());
        self.y.extend(y.iter());
        let new = ArrayView2::from_shape((b, d), &self.x[n * d..]).expect("batch shape");
        let own = linalg::gram(&new, &new);
        for r in 0..b {
            for c in 0..n {
                let v = cross[[r, c]];
                gram[(n + r) * m + c] = v;
                gram[c * m + n + r] = v;
            }
            for c in 0..b {
                gram[(n + r) * m + n + c] = own[[r, c]];
            }
        }
        self.gram = gram;
    }

    /// Drops the oldest images beyond `buffer` (only before a solve, so that the images
    /// an RBF model scores against stay in the buffer).
    fn trim(&mut self) {
        let n = self.y.len();
        let drop = n.saturating_sub(self.params.buffer);
        if drop == 0 {
            return;
        }
        let Some(d) = self.n_features else { return };
        let m = n - drop;
        let mut gram = vec![0f32; m * m];
        for i in 0..m {
            let src = (drop + i) * n + drop;
            gram[i * m..(i + 1) * m].copy_from_slice(&self.gram[src..src + m]);
        }
        self.gram = gram;
        self.x.drain(..drop * d);
        self.y.drain(..drop);
    }

    /// Squared norms of the buffered images (the Gram matrix's diagonal).
    fn diag(&self) -> Vec<f64> {
        let n = self.y.len();
        (0..n).map(|i| f64::from(self.gram[i * n + i])).collect()
    }

    /// Solves for the weights on the buffer.
    fn fit(&mut self) -> Result<()> {
        self.trim();
        let n = self.y.len();
        let Some(d) = self.n_features else {
            return Ok(());
        };
        if n == 0 {
            return Ok(());
        }
        let diag = self.diag();
        let mut a = Array2::from_shape_fn((n, n), |(i, j)| f64::from(self.gram[i * n + j]));
        let mut gamma_abs = 0.0;
        if self.rbf() {
            // Mean squared distance over all pairs: 2·mean(‖x‖²) − 2·mean(G).
            let mean_sq = diag.iter().sum::<f64>() / n as f64;
            let mean_g = a.sum() / (n * n) as f64;
            let mean_dist = (2.0 * mean_sq - 2.0 * mean_g).max(f64::MIN_POSITIVE);
            gamma_abs = self.params.gamma / mean_dist;
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
            .map_err(|e| Error::usage(format!("{NAME}: the solve failed: {e}")))?
            .mapv(|v| v as f32);
        if alpha.iter().any(|v| !v.is_finite()) {
            return Err(Error::usage(format!(
                "{NAME}: the solve produced non-finite weights (features too large); not fitted"
            )));
        }
        if self.rbf() {
            self.alpha = Some(alpha);
            self.gamma_abs = gamma_abs;
        } else {
            let x = ArrayView2::from_shape((n, d), &self.x).expect("buffer shape");
            let mut w = Array2::<f32>::zeros((d, self.params.classes));
            linalg::par_gemm(1.0, &x.t(), &alpha.view(), 0.0, &mut w.view_mut());
            self.w = Some(w);
        }
        self.n_fit = n;
        self.fits += 1;
        self.since_fit = 0;
        Ok(())
    }

    /// The raw scores (n × 10), `None` before the first solve.
    pub fn decision_function(&self, x: ArrayView2<f32>) -> Result<Option<Array2<f32>>> {
        check_features(x, self.n_features)?;
        let mut z = Array2::<f32>::zeros((x.nrows(), self.params.classes));
        if let Some(w) = &self.w {
            linalg::gemm(1.0, &x, &w.view(), 0.0, &mut z.view_mut());
            return Ok(Some(z));
        }
        let Some(alpha) = &self.alpha else {
            return Ok(None);
        };
        let cross = self.cross_products(x);
        let diag = self.diag();
        let nf = self.n_fit;
        let mut k = Array2::<f32>::zeros((x.nrows(), nf));
        for (i, row) in x.rows().into_iter().enumerate() {
            let sq: f64 = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
            for j in 0..nf {
                let d2 = (sq + diag[j] - 2.0 * f64::from(cross[[i, j]])).max(0.0);
                k[[i, j]] = (-self.gamma_abs * d2).exp() as f32;
            }
        }
        linalg::gemm(1.0, &k.view(), &alpha.view(), 0.0, &mut z.view_mut());
        if let Ok(mut cache) = self.cross.lock() {
            *cache = Some((x.iter().copied().collect(), self.y.len(), cross));
        }
        Ok(Some(z))
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
                names.extend(["x", "y", "gram"].map(String::from));
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
                if meta.fitted && (meta.n_fit == 0 || meta.n_fit > n) {
                    return Err(ck.bad_meta(format!("n_fit {} is not in 1..={n}", meta.n_fit)));
                }
                ck.expect_names(&names)?;
                m.x = ck.f32("x", &[n, d])?;
                m.gram = ck.f32("gram", &[n, n])?;
                m.y = ck.labels("y", n, meta.params.classes)?;
                if meta.fitted && meta.params.kernel == "rbf" {
                    m.alpha = Some(ck.f32_2d("alpha", meta.n_fit, meta.params.classes)?);
                } else if meta.fitted {
                    m.w = Some(ck.f32_2d("w", d, meta.params.classes)?);
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
    fn partial_fit(&mut self, x: ArrayView2<f32>, y: ArrayView1<u8>) -> Result<f64> {
        check_batch(x, y, self.n_features, self.params.classes)?;
        let n = x.nrows();
        if n == 0 {
            return Ok(0.0);
        }
        let proba = self.predict_proba(x)?;
        let loss = proba
            .rows()
            .into_iter()
            .zip(y.iter())
            .map(|(p, &l)| -f64::from(p[usize::from(l)].max(1e-15)).ln())
            .sum::<f64>()
            / n as f64;
        if self.n_features.is_none() {
            // The buffer grows to `buffer` + `refit` images before a solve trims it; the
            // Gram matrix is copied as it grows and factorised in place of a copy.
            let m = self
                .params
                .buffer
                .saturating_add(self.params.refit)
                .saturating_add(n);
            crate::limits::check(
                &format!(
                    "ridge (buffer = {}, refit = {}, {} features): the image buffer and its \
                     Gram matrices",
                    self.params.buffer,
                    self.params.refit,
                    x.ncols()
                ),
                4 * (3 * crate::limits::product(&[m, m]) + crate::limits::product(&[m, x.ncols()])),
            )?;
        }
        self.n_features = Some(x.ncols());
        self.append(x, y);
        self.seen += n as u64;
        self.since_fit += n as u64;
        if self.since_fit >= self.params.refit as u64 {
            self.fit()?;
        }
        Ok(loss)
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
            t.f32("x", &[n, d], self.x.iter());
            let y: Vec<u64> = self.y.iter().map(|&l| u64::from(l)).collect();
            t.u64("y", &[n], &y);
            t.f32("gram", &[n, n], self.gram.iter());
            if let Some(w) = &self.w {
                t.f32("w", &[d, self.params.classes], w.iter());
            }
            if let Some(a) = &self.alpha {
                t.f32("alpha", &[self.n_fit, self.params.classes], a.iter());
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
    use crate::model::{self, SplitMix};
    use ndarray::s;

    fn data(rng: &mut SplitMix, n: usize, d: usize) -> (Array2<f32>, ndarray::Array1<u8>) {
        // Class means far apart, so a ridge classifier separates them.
        let y: ndarray::Array1<u8> = (0..n).map(|_| rng.below(CLASSES) as u8).collect();
        let x = Array2::from_shape_fn((n, d), |(i, j)| {
            (if j % CLASSES == usize::from(y[i]) {
                2.0
            } else {
                0.0
            }) + rng.normal() as f32
        });
        (x, y)
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
        for (a, b) in m.gram.iter().zip(g.iter()) {
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
