//! Dense linear algebra shared by the models and the feature extractors.
//!
//! [`gemm`] is the `gemm` crate (its kernels chosen at run time: AVX-512 with `x86-v4`
//! where the CPU has it, FMA otherwise): on the patch extractor's product (81 × 108 ×
//! 2,048) it is 1.2x matrixmultiply on this AVX2 machine, so the extractor and the ridge
//! model use it. [`par_gemm`] is matrixmultiply (ndarray's `general_mat_mul`), as fast or
//! faster at the MLP's and the linear models' shapes (`cargo bench --bench features`),
//! split into row bands whose boundaries depend only on the shape, so the bits do not
//! depend on the number of threads. The rest is small and exact: a blocked Cholesky solve (the ridge model's
//! normal equations) and a Jacobi eigensolver (the patch extractor's whitening).

use std::sync::atomic::{AtomicUsize, Ordering};

use ndarray::linalg::general_mat_mul;

use ndarray::{Array1, Array2, ArrayBase, ArrayView2, ArrayViewMut2, Axis, Data, DataMut, Ix2};

/// Products at least this large (multiply-adds) are split into row bands.
const PAR_MACS: usize = 1 << 21;

/// Row bands of a large product: fixed, so that the result does not depend on how many
/// threads compute them.
const BANDS: usize = 2;

static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Threads the matrix products and the extractors may use: [`set_threads`], or the
/// machine's cores.
pub fn threads() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    match THREADS.load(Ordering::Relaxed) {
        // Asked once: on Linux the answer reads cgroup files.
        0 => *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        n => n,
    }
}

/// Caps the threads of the large matrix products and the feature extractors
/// (`--threads`); 0: all cores.
pub fn set_threads(n: usize) {
    THREADS.store(n, Ordering::Relaxed);
}

/// `c = alpha·a·b + beta·c` on one thread, through the `gemm` crate (any strides). With
/// `beta == 0` the old contents of `c` are not read (NaNs there do not propagate).
///
/// # Panics
/// If the shapes do not agree (a programming error, never input).
pub fn gemm<A, B, C>(
    alpha: f32,
    a: &ArrayBase<A, Ix2>,
    b: &ArrayBase<B, Ix2>,
    beta: f32,
    c: &mut ArrayBase<C, Ix2>,
) where
    A: Data<Elem = f32>,
    B: Data<Elem = f32>,
    C: DataMut<Elem = f32>,
{
    gemm_any(alpha, a, b, beta, c)
}

/// [`gemm`] in f64.
///
/// # Panics
/// If the shapes do not agree (a programming error, never input).
pub fn gemm64<A, B, C>(
    alpha: f64,
    a: &ArrayBase<A, Ix2>,
    b: &ArrayBase<B, Ix2>,
    beta: f64,
    c: &mut ArrayBase<C, Ix2>,
) where
    A: Data<Elem = f64>,
    B: Data<Elem = f64>,
    C: DataMut<Elem = f64>,
{
    gemm_any(alpha, a, b, beta, c)
}

/// [`gemm`] for either float type.
fn gemm_any<T, A, B, C>(
    alpha: T,
    a: &ArrayBase<A, Ix2>,
    b: &ArrayBase<B, Ix2>,
    beta: T,
    c: &mut ArrayBase<C, Ix2>,
) where
    T: ndarray::LinalgScalar,
    A: Data<Elem = T>,
    B: Data<Elem = T>,
    C: DataMut<Elem = T>,
{
    let (m, k) = a.dim();
    let (k2, n) = b.dim();
    assert!(
        k == k2 && c.dim() == (m, n),
        "gemm: shapes {:?} · {:?} → {:?}",
        a.dim(),
        b.dim(),
        c.dim()
    );
    if m == 0 || n == 0 {
        return;
    }
    let keep = !beta.is_zero();
    if k == 0 {
        c.map_inplace(|v| *v = if keep { *v * beta } else { T::zero() });
        return;
    }
    let [ars, acs] = [a.strides()[0], a.strides()[1]];
    let [brs, bcs] = [b.strides()[0], b.strides()[1]];
    let [crs, ccs] = [c.strides()[0], c.strides()[1]];
    // SAFETY: the pointers and strides describe the three views exactly (ndarray keeps
    // them in bounds for the shapes checked above), `c` is borrowed mutably and so does
    // not alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            ccs,
            crs,
            keep,
            a.as_ptr(),
            acs,
            ars,
            b.as_ptr(),
            bcs,
            brs,
            beta,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `c = alpha·a·b + beta·c` through matrixmultiply, a large product split into [`BANDS`]
/// row bands computed on up to [`threads`] threads. The bands depend only on the shape, so the result is the
/// same whatever the thread count.
pub fn par_gemm(
    alpha: f32,
    a: &ArrayView2<f32>,
    b: &ArrayView2<f32>,
    beta: f32,
    c: &mut ArrayViewMut2<f32>,
) {
    let (m, k) = a.dim();
    let band = band_len(m, m * k * b.ncols());
    let mut bands = Vec::with_capacity(BANDS);
    let mut rest_a = a.view();
    let mut rest_c = c.view_mut();
    while rest_a.nrows() > band {
        let (a1, a2) = rest_a.split_at(Axis(0), band);
        let (c1, c2) = rest_c.split_at(Axis(0), band);
        bands.push((a1, c1));
        rest_a = a2;
        rest_c = c2;
    }
    bands.push((rest_a, rest_c));
    in_parallel(bands, |(a1, mut c1)| {
        general_mat_mul(alpha, &a1, b, beta, &mut c1)
    });
}

/// The length of the bands that split `n` rows (or columns) of a product of `macs`
/// multiply-adds: [`BANDS`] bands for a large product, one otherwise; fixed by the shape.
fn band_len(n: usize, macs: usize) -> usize {
    let parts = if macs < PAR_MACS {
        1
    } else {
        BANDS.min(n / 8).max(1)
    };
    n.div_ceil(parts).max(1)
}

/// `a·bᵀ` by [`gemm`] (Gram matrices; the ridge model's kernel rows): a large product is
/// split into [`BANDS`] bands of `b`'s rows (the result's columns) on up to [`threads`]
/// threads, the bands fixed by the shape.
pub fn gram(a: &ArrayView2<f32>, b: &ArrayView2<f32>) -> Array2<f32> {
    let n = b.nrows();
    let mut c = Array2::<f32>::zeros((a.nrows(), n));
    let band = band_len(n, a.nrows() * a.ncols() * n);
    let mut jobs = Vec::with_capacity(BANDS);
    let mut rest_b = b.view();
    let mut rest_c = c.view_mut();
    while rest_b.nrows() > band {
        let (b1, b2) = rest_b.split_at(Axis(0), band);
        let (c1, c2) = rest_c.split_at(Axis(1), band);
        jobs.push((b1, c1));
        rest_b = b2;
        rest_c = c2;
    }
    jobs.push((rest_b, rest_c));
    in_parallel(jobs, |(b1, mut c1)| gemm(1.0, a, &b1.t(), 0.0, &mut c1));
    c
}

/// Runs `f` on every job, the jobs dealt in turn to up to [`threads`] threads (job `i` to
/// thread `i mod t`). Each job is the same call whatever the thread count, so the result
/// does not depend on it.
pub fn in_parallel<J: Send>(jobs: Vec<J>, f: impl Fn(J) + Sync) {
    let t = threads().min(jobs.len());
    if t < 2 {
        jobs.into_iter().for_each(&f);
        return;
    }
    let mut lists: Vec<Vec<J>> = (0..t).map(|_| Vec::new()).collect();
    for (i, job) in jobs.into_iter().enumerate() {
        lists[i % t].push(job);
    }
    let f = &f;
    std::thread::scope(|s| {
        let mut lists = lists.into_iter();
        let first = lists.next();
        for list in lists {
            s.spawn(move || list.into_iter().for_each(f));
        }
        if let Some(list) = first {
            list.into_iter().for_each(f);
        }
    });
}

/// Solves `a·x = b` for a symmetric positive definite `a` (n × n) by a blocked Cholesky
/// factorisation in f64, overwriting nothing the caller keeps. `Err` names the pivot that
/// is not positive (the matrix is not positive definite).
pub fn cholesky_solve(
    mut a: Array2<f64>,
    b: &Array2<f64>,
) -> std::result::Result<Array2<f64>, String> {
    let n = a.nrows();
    assert!(a.ncols() == n && b.nrows() == n, "cholesky_solve: shapes");
    cholesky_in_place(&mut a)?;
    // Forward (L·y = b) then backward (Lᵀ·x = y) substitution, all right-hand sides at
    // once, on the rows of L (contiguous).
    let mut x = b.as_standard_layout().into_owned();
    let r = x.ncols();
    let l = a.as_standard_layout();
    let l = l.as_slice().expect("standard layout");
    let xs = x.as_slice_mut().expect("standard layout");
    for i in 0..n {
        let (done, rest) = xs.split_at_mut(i * r);
        let xi = &mut rest[..r];
        for (j, &lij) in l[i * n..i * n + i].iter().enumerate() {
            if lij != 0.0 {
                for (v, &w) in xi.iter_mut().zip(&done[j * r..(j + 1) * r]) {
                    *v -= lij * w;
                }
            }
        }
        let d = l[i * n + i];
        xi.iter_mut().for_each(|v| *v /= d);
    }
    for i in (0..n).rev() {
        let (before, rest) = xs.split_at_mut(i * r);
        let xi = &mut rest[..r];
        let d = l[i * n + i];
        xi.iter_mut().for_each(|v| *v /= d);
        for (j, &lij) in l[i * n..i * n + i].iter().enumerate() {
            if lij != 0.0 {
                for (v, &w) in before[j * r..(j + 1) * r].iter_mut().zip(xi.iter()) {
                    *v -= lij * w;
                }
            }
        }
    }
    Ok(x)
}

/// Right-looking blocked Cholesky: the lower triangle of `a` becomes `L` (`a = L·Lᵀ`);
/// the trailing updates, nearly all the work, are f64 matrix products.
fn cholesky_in_place(a: &mut Array2<f64>) -> std::result::Result<(), String> {
    const NB: usize = 128;
    let n = a.nrows();
    let mut k0 = 0;
    while k0 < n {
        let k1 = (k0 + NB).min(n);
        // Factor the diagonal block (unblocked).
        for j in k0..k1 {
            let mut d = a[[j, j]];
            for p in k0..j {
                d -= a[[j, p]] * a[[j, p]];
            }
            if d.is_nan() || d <= 0.0 || !d.is_finite() {
                return Err(format!(
                    "pivot {j} is {d}: the matrix is not positive definite"
                ));
            }
            let d = d.sqrt();
            a[[j, j]] = d;
            for i in j + 1..k1 {
                let mut s = a[[i, j]];
                for p in k0..j {
                    s -= a[[i, p]] * a[[j, p]];
                }
                a[[i, j]] = s / d;
            }
        }
        if k1 < n {
            // Panel below the block: A21 ← A21 · L11⁻ᵀ, one product with the inverse of
            // the block's small triangular factor.
            let nb = k1 - k0;
            let mut inv = Array2::<f64>::zeros((nb, nb));
            for c in 0..nb {
                // Column c of L11⁻¹ by forward substitution.
                for r in c..nb {
                    let mut s = if r == c { 1.0 } else { 0.0 };
                    for p in c..r {
                        s -= a[[k0 + r, k0 + p]] * inv[[p, c]];
                    }
                    inv[[r, c]] = s / a[[k0 + r, k0 + r]];
                }
            }
            let old = a.slice(ndarray::s![k1.., k0..k1]).to_owned();
            let mut out = a.slice_mut(ndarray::s![k1.., k0..k1]);
            let band = band_len(n - k1, (n - k1) * nb * nb);
            let mut jobs = Vec::with_capacity(BANDS);
            let mut rest = out.view_mut();
            let mut row = 0;
            while rest.nrows() > band {
                let (b1, b2) = rest.split_at(Axis(0), band);
                jobs.push((row, b1));
                rest = b2;
                row += band;
            }
            jobs.push((row, rest));
            in_parallel(jobs, |(row, mut o)| {
                let rows = old.slice(ndarray::s![row..row + o.nrows(), ..]);
                gemm64(1.0, &rows, &inv.t(), 0.0, &mut o);
            });
            // Trailing update: A22 ← A22 − A21·A21ᵀ, its lower triangle only (what is
            // read): blocks of [`TRI_BLOCK`] rows, each up to the diagonal, on up to
            // [`threads`] threads. The blocks depend only on the shape.
            let panel = a.slice(ndarray::s![k1.., k0..k1]).to_owned();
            let panel = panel.view();
            lower_update(&mut a.slice_mut(ndarray::s![k1.., k1..]), &panel);
        }
        k0 = k1;
    }
    Ok(())
}

/// Rows per block of a lower-triangle update.
const TRI_BLOCK: usize = 256;

/// `c ← c − p·pᵀ` on the lower triangle of the square `c` (and the upper part of its
/// diagonal blocks, which nothing reads), by blocks of [`TRI_BLOCK`] rows, each product
/// from the first column to the block's diagonal: half the work of the full product.
fn lower_update(c: &mut ArrayViewMut2<f64>, p: &ArrayView2<f64>) {
    let n = c.nrows();
    let mut jobs = Vec::with_capacity(n.div_ceil(TRI_BLOCK));
    let mut rest = c.view_mut();
    let mut row = 0;
    while row < n {
        let len = TRI_BLOCK.min(n - row);
        let (block, tail) = rest.split_at(Axis(0), len);
        rest = tail;
        jobs.push((row, block.slice_move(ndarray::s![.., ..row + len])));
        row += len;
    }
    // The blocks grow with the row: dealt largest first, they balance across threads.
    jobs.reverse();
    in_parallel(jobs, |(row, mut out)| {
        let lhs = p.slice(ndarray::s![row..row + out.nrows(), ..]);
        let rhs = p.slice(ndarray::s![..out.ncols(), ..]);
        gemm64(-1.0, &lhs, &rhs.t(), 1.0, &mut out);
    });
}

/// Eigen-decomposition of a small symmetric matrix by cyclic Jacobi rotations (f64):
/// the eigenvalues, ascending, and the eigenvectors as the columns of the second matrix.
pub fn eigh(a: &Array2<f64>) -> (Array1<f64>, Array2<f64>) {
    let n = a.nrows();
    let mut a = a.clone();
    let mut v = Array2::<f64>::eye(n);
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[[i, j]] * a[[i, j]])
            .sum();
        let scale: f64 = a.iter().map(|x| x * x).sum();
        if off <= 1e-30 * scale.max(f64::MIN_POSITIVE) {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[[p, q]];
                if apq == 0.0 {
                    continue;
                }
                let theta = (a[[q, q]] - a[[p, p]]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let akp = a[[k, p]];
                    let akq = a[[k, q]];
                    a[[k, p]] = c * akp - s * akq;
                    a[[k, q]] = s * akp + c * akq;
                }
                for k in 0..n {
                    let apk = a[[p, k]];
                    let aqk = a[[q, k]];
                    a[[p, k]] = c * apk - s * aqk;
                    a[[q, k]] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let vkp = v[[k, p]];
                    let vkq = v[[k, q]];
                    v[[k, p]] = c * vkp - s * vkq;
                    v[[k, q]] = s * vkp + c * vkq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| a[[i, i]].total_cmp(&a[[j, j]]));
    let vals = Array1::from_iter(order.iter().map(|&i| a[[i, i]]));
    let vecs = Array2::from_shape_fn((n, n), |(r, c)| v[[r, order[c]]]);
    (vals, vecs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mat(m: usize, n: usize, salt: usize) -> Array2<f32> {
        Array2::from_shape_fn((m, n), |(i, j)| {
            ((i * 31 + j * 7 + salt) % 101) as f32 / 37.0 - 1.3
        })
    }

    #[test]
    fn gemm_matches_a_plain_triple_loop_with_any_strides() {
        let a = mat(37, 53, 1);
        let b = mat(53, 29, 2);
        let mut want = Array2::<f64>::zeros((37, 29));
        for i in 0..37 {
            for j in 0..29 {
                want[[i, j]] = (0..53)
                    .map(|p| f64::from(a[[i, p]]) * f64::from(b[[p, j]]))
                    .sum::<f64>()
                    * 2.0
                    + 0.5;
            }
        }
        let mut c = Array2::<f32>::from_elem((37, 29), 1.0);
        gemm(2.0, &a.view(), &b.view(), 0.5, &mut c.view_mut());
        // Transposed operands (column-major views).
        let at = a.t().to_owned();
        let bt = b.t().to_owned();
        let mut c2 = Array2::<f32>::from_elem((29, 37), 1.0);
        gemm(2.0, &bt.view(), &at.view(), 0.5, &mut c2.view_mut());
        for i in 0..37 {
            for j in 0..29 {
                assert!(
                    (f64::from(c[[i, j]]) - want[[i, j]]).abs() < 1e-3,
                    "({i},{j})"
                );
                assert!(
                    (f64::from(c2[[j, i]]) - want[[i, j]]).abs() < 1e-3,
                    "t({i},{j})"
                );
            }
        }
        // beta = 0 ignores what was in c, NaN included.
        let mut c3 = Array2::<f32>::from_elem((37, 29), f32::NAN);
        gemm(1.0, &a.view(), &b.view(), 0.0, &mut c3.view_mut());
        assert!(c3.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn par_gemm_bits_do_not_depend_on_the_thread_count() {
        let (a, b) = (mat(130, 3072, 3), mat(3072, 12, 4));
        let mut one = Array2::<f32>::zeros((130, 12));
        set_threads(1);
        par_gemm(1.0, &a.view(), &b.view(), 0.0, &mut one.view_mut());
        for t in [2, 3, 5] {
            set_threads(t);
            let mut c = Array2::<f32>::from_elem((130, 12), 0.5);
            par_gemm(1.0, &a.view(), &b.view(), 0.0, &mut c.view_mut());
            assert_eq!(c, one, "{t} threads");
        }
        set_threads(0);
    }

    #[test]
    fn gram_and_cholesky_bits_do_not_depend_on_the_thread_count() {
        // Large enough to be split: 37 × 300 × 520, and trailing updates of several row
        // blocks (472 rows after the first block).
        let (a, b) = (mat(37, 300, 8), mat(520, 300, 9));
        let want = a.mapv(f64::from).dot(&b.mapv(f64::from).t());
        let n = 600;
        let x = mat(n, n + 20, 10).mapv(f64::from);
        let spd = x.dot(&x.t()) + Array2::<f64>::eye(n) * 0.1;
        let rhs = mat(n, 4, 11).mapv(f64::from);
        set_threads(1);
        let g1 = gram(&a.view(), &b.view());
        let s1 = cholesky_solve(spd.clone(), &rhs).unwrap();
        for t in [2, 3] {
            set_threads(t);
            assert_eq!(gram(&a.view(), &b.view()), g1, "gram, {t} threads");
            assert_eq!(
                cholesky_solve(spd.clone(), &rhs).unwrap(),
                s1,
                "cholesky, {t} threads"
            );
        }
        set_threads(0);
        let err = g1
            .iter()
            .zip(want.iter())
            .fold(0.0f64, |m, (&g, &w)| m.max((f64::from(g) - w).abs()));
        assert!(err < 1e-3, "gram: max error {err}");
        let residual = spd.dot(&s1) - &rhs;
        let res = residual.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(res < 1e-6, "cholesky: max residual {res}");
    }

    #[test]
    fn in_parallel_runs_every_job_once() {
        let hits: Vec<std::sync::atomic::AtomicUsize> = (0..7)
            .map(|_| std::sync::atomic::AtomicUsize::new(0))
            .collect();
        for t in [1, 2, 3, 9] {
            set_threads(t);
            in_parallel((0..7).collect(), |j: usize| {
                hits[j].fetch_add(1, Ordering::Relaxed);
            });
        }
        set_threads(0);
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 4));
    }

    #[test]
    fn cholesky_solves_a_spd_system() {
        let n = 700; // several factorisation blocks and lower-triangle row blocks
        let x = mat(n, n + 20, 5).mapv(f64::from);
        let a = x.dot(&x.t()) + Array2::<f64>::eye(n) * 0.1;
        let want = mat(n, 3, 6).mapv(f64::from);
        let b = a.dot(&want);
        let got = cholesky_solve(a, &b).unwrap();
        let err = (&got - &want).iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(err < 1e-6, "max error {err}");
        let not_pd = Array2::from_shape_vec((2, 2), vec![1.0, 2.0, 2.0, 1.0]).unwrap();
        assert!(cholesky_solve(not_pd, &Array2::zeros((2, 1))).is_err());
    }

    #[test]
    fn eigh_reconstructs_the_matrix() {
        let x = mat(20, 30, 7).mapv(f64::from);
        let a = x.dot(&x.t());
        let (vals, vecs) = eigh(&a);
        let back = vecs.dot(&Array2::from_diag(&vals)).dot(&vecs.t());
        let err = (&back - &a).iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(
            err < 1e-9 * a.iter().fold(0.0f64, |m, v| m.max(v.abs())),
            "{err}"
        );
        assert!(vals.windows(2).into_iter().all(|w| w[0] <= w[1]));
        let orth = vecs.t().dot(&vecs) - Array2::<f64>::eye(20);
        assert!(orth.iter().all(|v| v.abs() < 1e-10));
    }
}
