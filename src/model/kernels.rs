//! Small dense kernels: for per-sample SGD, several dot products against one vector,
//! `y += a·x` and a running-mean step, dispatched at run time to an AVX2+FMA build where
//! the CPU has it. (Matrix products are in [`crate::linalg`].)
//!
//! The crate is compiled for baseline x86-64 (SSE2) so that one binary runs anywhere;
//! these loops are the hot path of the per-sample linear models, so they are compiled
//! twice and the better one is chosen once per call. Both builds are deterministic: the
//! same inputs on the same machine give the same bits.

pub(crate) use crate::linalg::par_gemm;
pub use crate::linalg::set_threads;

/// Lanes of the accumulators: enough independent sums to fill two FMA pipes.
const LANES: usize = 16;

/// `a·x + b`: a fused multiply-add where the build has FMA (where `mul_add` is one
/// instruction), a multiply and an add otherwise (where it would be a slow libm call).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, x: f32, b: f32) -> f32 {
    if FMA {
        a.mul_add(x, b)
    } else {
        a * x + b
    }
}

#[inline(always)]
fn dot_generic<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc[l] = madd::<FMA>(x[l], y[l], acc[l]);
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail = madd::<FMA>(*x, *y, tail);
    }
    // Pairwise reduction of the lanes: a fixed order, so a fixed result.
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            acc[l] += acc[l + width];
        }
    }
    acc[0] + tail
}

#[inline(always)]
fn axpy_generic<const FMA: bool>(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y = madd::<FMA>(*x, a, *y);
    }
}

#[inline(always)]
fn mean_step_generic<const FMA: bool>(avg: &mut [f32], s: f32, w: &[f32], mu: f32) {
    for (a, &w) in avg.iter_mut().zip(w) {
        *a = madd::<FMA>(madd::<FMA>(s, w, -*a), mu, *a);
    }
}

#[inline(always)]
fn dots_generic<const FMA: bool>(rows: &[f32], x: &[f32], out: &mut [f32]) {
    let d = x.len();
    if d == 0 {
        out.fill(0.0);
        return;
    }
    for (o, row) in out.iter_mut().zip(rows.chunks_exact(d)) {
        *o = dot_generic::<FMA>(row, x);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dots(rows: &[f32], x: &[f32], out: &mut [f32]) {
        super::dots_generic::<true>(rows, x, out)
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn mean_step(avg: &mut [f32], s: f32, w: &[f32], mu: f32) {
        super::mean_step_generic::<true>(avg, s, w, mu)
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        super::axpy_generic::<true>(y, a, x)
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

/// `out[k] = rows[k]·x` for each row `k` of the row-major matrix `rows` (`out.len()`
/// rows of `x.len()` values).
pub(crate) fn dots(rows: &[f32], x: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        unsafe { x86::dots(rows, x, out) };
        return;
    }
    dots_generic::<false>(rows, x, out)
}

/// `y += a·x` (over the shorter of the two).
pub(crate) fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        unsafe { x86::axpy(y, a, x) };
        return;
    }
    axpy_generic::<false>(y, a, x)
}

/// One step of a running mean: `avg += (s·w − avg)·mu` (over the shorter of the two).
pub(crate) fn mean_step(avg: &mut [f32], s: f32, w: &[f32], mu: f32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        unsafe { x86::mean_step(avg, s, w, mu) };
        return;
    }
    mean_step_generic::<false>(avg, s, w, mu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dots_and_axpy_match_f64_reference() {
        for d in [0usize, 1, 5, 16, 17, 100, 3072] {
            let x: Vec<f32> = (0..d)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            let rows: Vec<f32> = (0..3 * d)
                .map(|i| ((i * 13 % 97) as f32 - 48.0) / 40.0)
                .collect();
            let mut out = [0.0f32; 3];
            dots(&rows, &x, &mut out);
            for k in 0..3 {
                let want: f64 = (0..d)
                    .map(|j| f64::from(rows[k * d + j]) * f64::from(x[j]))
                    .sum();
                assert!(
                    (f64::from(out[k]) - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "d={d} k={k}: {} vs {want}",
                    out[k]
                );
            }
            let mut y: Vec<f32> = rows[..d].to_vec();
            axpy(&mut y, -0.5, &x);
            for j in 0..d {
                let want = f64::from(rows[j]) - 0.5 * f64::from(x[j]);
                assert!((f64::from(y[j]) - want).abs() < 1e-6, "d={d} j={j}");
            }
        }
    }

    #[test]
    fn mean_step_is_a_running_mean() {
        let w1 = [1.0f32, -2.0, 4.0];
        let w2 = [3.0f32, 0.0, -4.0];
        let mut avg = [0.0f32; 3];
        mean_step(&mut avg, 2.0, &w1, 1.0);
        assert_eq!(avg, [2.0, -4.0, 8.0]);
        mean_step(&mut avg, 1.0, &w2, 0.5);
        assert_eq!(avg, [2.5, -2.0, 2.0]);
    }

    #[test]
    fn dispatch_and_fallback_agree_closely() {
        let d = 3072;
        let x: Vec<f32> = (0..d).map(|i| (i as f32 * 0.37).sin()).collect();
        let rows: Vec<f32> = (0..10 * d).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut a = [0.0f32; 10];
        let mut b = [0.0f32; 10];
        dots(&rows, &x, &mut a);
        dots_generic::<false>(&rows, &x, &mut b);
        for k in 0..10 {
            assert!((a[k] - b[k]).abs() < 1e-3, "{} vs {}", a[k], b[k]);
        }
    }
}
