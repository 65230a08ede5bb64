//! bfloat16 matrix products for the CNN: inputs rounded to bf16, products and sums in
//! f32, as PyTorch's CPU autocast does.
//!
//! A bf16 keeps the top 16 bits of an f32 (sign, the 8-bit exponent, 7 bits of
//! mantissa), rounded to nearest even. The product of two is exact in f32, so a
//! bf16 × bf16 → f32 product differs from the f64 product of the same rounded inputs by
//! the f32 accumulation only.
//!
//! The left operand `A` (`m × k`) is row-major bf16, each row `k` values padded to an
//! even count, so that a row is a run of *pairs* (one `u32`, the even `k` in the low
//! half): the convolutions write their patches straight into it ([`convert`]). The
//! right operand `B` (`k × n`) is *packed* in blocks of [`NR`] columns, each `[k/2][NR]`
//! pairs, the order the kernel reads it. The kernel keeps an `MR × NR` tile of `C` in 24
//! AVX-512 registers and adds, per pair of `k`, `MR × NR` two-term dot products with
//! `vdpbf16ps` (AVX512-BF16: AMD Zen 4 and later, Intel Cooper Lake and later), each
//! `A` pair broadcast from its row. The blocks of `k` ([`KC`] pairs) keep a slice of
//! `B` in the L1 cache while the rows of `A` stream past it. The conversions use the
//! CPU's own rounding (`vcvtneps2bf16`: to nearest even, as [`to_bf16`]).
//!
//! Two variants serve the convolutions without a patch matrix: [`gemm_taps`] reads each
//! row's `A` pairs from a pointer per kernel tap (the input pixels in place, "implicit
//! GEMM", its sums in registers across the taps), and [`gemm_pair_rows`] takes `B` as
//! rows of pairs (two rows interleaved by [`interleave`]) instead of packed blocks.
//!
//! Every sum runs in a fixed order that depends only on the shapes: the same inputs
//! give the same bits, whatever the thread count.

/// Rows of the kernel's tile.
pub const MR: usize = 12;
/// Columns of a `B` block: two AVX-512 registers of f32.
pub const NR: usize = 32;
/// Pairs of `k` per block of the product.
const KC: usize = 192;

/// `x` rounded to the nearest bfloat16 (ties to even); NaNs stay NaN.
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 value of bfloat16 bits `h`.
#[inline(always)]
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// `x` rounded to bfloat16 and back: what the kernels multiply.
#[inline(always)]
pub fn round_bf16(x: f32) -> f32 {
    from_bf16(to_bf16(x))
}

/// Pairs of `k` (`k` rounded up: an odd `k` gets a zero partner).
pub fn pairs(k: usize) -> usize {
    k.div_ceil(2)
}

/// `u32`s of `k × n` packed as `B`.
pub fn b_len(k: usize, n: usize) -> usize {
    n.div_ceil(NR) * NR * pairs(k)
}

/// The environment variable that hides the bf16 kernels (`CIFAR_DF_NO_BF16=1`): the
/// program then behaves as on a CPU without them (to compare the paths, and in tests).
pub const HIDE_ENV: &str = "CIFAR_DF_NO_BF16";

/// Whether this CPU runs the bf16 kernel (AVX512-BF16), and [`HIDE_ENV`] does not hide
/// it. Asked once.
pub fn available() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        let hidden = std::env::var_os(HIDE_ENV).is_some_and(|v| !v.is_empty() && v != "0");
        !hidden && cpu_has_avx512_bf16()
    })
}

/// Whether the bf16 kernel trains faster than f32 on this CPU, for `precision = "auto"`.
///
/// On AMD (Zen 4, Zen 5) `vdpbf16ps` runs at the rate of an FMA, each doing twice the
/// products: the bf16 step was 1.5x the f32 one (Zen 5, batch 256, 32/64/128). On Intel
/// CPUs without AMX (an Emerald Rapids VM here) the bf16 step was 0.75x the f32 one, as
/// PyTorch's bf16 autocast was slower there than its own fp32 channels_last (docs/training.md):
/// `auto` is f32 there, and `--precision bf16` still asks for bf16.
pub fn faster_than_f32() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // CPUID leaf 0: the vendor string in EBX, EDX, ECX.
        #[allow(unused_unsafe)]
        // SAFETY: CPUID leaf 0 exists on every x86-64 CPU.
        let r = unsafe { std::arch::x86_64::__cpuid(0) };
        let mut vendor = [0u8; 12];
        vendor[..4].copy_from_slice(&r.ebx.to_le_bytes());
        vendor[4..8].copy_from_slice(&r.edx.to_le_bytes());
        vendor[8..].copy_from_slice(&r.ecx.to_le_bytes());
        &vendor == b"AuthenticAMD"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn cpu_has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn check() {
    assert!(available(), "a bf16 kernel on a CPU without AVX512-BF16");
}

/// `dst[i] = bf16(src[i])`, the lengths equal.
///
/// # Panics
/// On a CPU without AVX512-BF16 ([`available`]): callers choose the kernel once.
pub fn convert(src: &[f32], dst: &mut [u16]) {
    check();
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU has AVX512-BF16 (checked); both slices hold `len` elements.
    unsafe {
        avx512::convert(src.as_ptr(), dst.as_mut_ptr(), src.len())
    }
}

/// Packs a row-major f32 `B` (`k × n`, row stride `ld`) into `out` (`b_len`). Columns
/// past `n` and the odd `k`'s partner are zero.
pub fn pack_b(b: &[f32], k: usize, n: usize, ld: usize, out: &mut [u32]) {
    check();
    let k2 = pairs(k);
    assert!(out.len() >= b_len(k, n) && (k == 0 || b.len() >= (k - 1) * ld + n));
    for (blk, dst) in out[..b_len(k, n)].chunks_exact_mut(k2 * NR).enumerate() {
        let j0 = blk * NR;
        let cols = NR.min(n - j0);
        for (kp, d) in dst.chunks_exact_mut(NR).enumerate() {
            pair_block(b, ld, k, kp, j0, cols, d);
        }
    }
}

/// `d` (`NR` pairs) = rows `2p` and `2p + 1` of the f32 matrix `b` (`k` rows of stride
/// `ld`), columns `j0..j0 + cols`, in bf16 and interleaved (the odd `k`'s partner and
/// the columns past `cols` zero). Callers have called [`check`].
fn pair_block(b: &[f32], ld: usize, k: usize, p: usize, j0: usize, cols: usize, d: &mut [u32]) {
    assert!(cols <= NR && d.len() >= NR);
    let lo = &b[2 * p * ld + j0..][..cols];
    let hi = (2 * p + 1 < k).then(|| &b[(2 * p + 1) * ld + j0..][..cols]);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX512-BF16 (checked by the callers); `lo`, `hi` hold `cols` ≤ NR values,
    // `d` NR.
    unsafe {
        avx512::pair_rows(lo.as_ptr(), hi.map(<[f32]>::as_ptr), cols, d.as_mut_ptr())
    };
}

/// `A = gᵀ` in the row layout: `g` is `rows × n` f32 (row stride `n`); row `j` of `out`
/// (stride `lda ≥ pairs(rows)`) holds the pairs `(g[2p][j], g[2p+1][j])`, the odd
/// row's partner zero. `tmp` is scratch.
pub fn transpose_pairs(
    g: &[f32],
    rows: usize,
    n: usize,
    out: &mut [u32],
    lda: usize,
    tmp: &mut Vec<u32>,
) {
    assert!(g.len() >= rows * n);
    turn_pairs(rows, n, out, lda, tmp, |p, row| {
        for (blk, d) in row.chunks_exact_mut(NR).enumerate() {
            let j0 = blk * NR;
            pair_block(g, n, rows, p, j0, NR.min(n - j0), d);
        }
    })
}

/// [`transpose_pairs`] of a `g` already in bf16.
pub fn transpose_pairs_bf16(
    g: &[u16],
    rows: usize,
    n: usize,
    out: &mut [u32],
    lda: usize,
    tmp: &mut Vec<u32>,
) {
    assert!(g.len() >= rows * n);
    turn_pairs(rows, n, out, lda, tmp, |p, row| {
        let lo = &g[2 * p * n..(2 * p + 1) * n];
        let hi = (2 * p + 1 < rows).then(|| &g[(2 * p + 1) * n..(2 * p + 2) * n]);
        interleave(lo, hi, &mut row[..n]);
    })
}

/// The pairs row by row (`pair(p, row)` writes pair row `p`, `n` values and more), then
/// turned in 8 × 8 tiles into `out`.
fn turn_pairs(
    rows: usize,
    n: usize,
    out: &mut [u32],
    lda: usize,
    tmp: &mut Vec<u32>,
    pair: impl Fn(usize, &mut [u32]),
) {
    check();
    let k2 = pairs(rows);
    assert!(lda >= k2 && out.len() >= n * lda);
    // The pairs row by row first (vectorised, as `B`), then turned in 8 × 8 tiles.
    let w = n.div_ceil(NR) * NR;
    if tmp.len() < k2 * w {
        tmp.resize(k2 * w, 0);
    }
    for p in 0..k2 {
        pair(p, &mut tmp[p * w..(p + 1) * w]);
    }
    // Whole 16 × 16 tiles in registers, the edges one by one.
    const T: usize = 16;
    let (whole_p, whole_j) = (k2 / T * T, n / T * T);
    for p0 in (0..whole_p).step_by(T) {
        for j0 in (0..whole_j).step_by(T) {
            let src = &tmp[p0 * w + j0..(p0 + T - 1) * w + j0 + T];
            let dst = &mut out[j0 * lda + p0..(j0 + T - 1) * lda + p0 + T];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512 (checked); `src` holds 16 rows of 16 at stride `w`, `dst` 16
            // rows of 16 at stride `lda` (the slices above).
            unsafe {
                avx512::transpose16(src.as_ptr(), w, dst.as_mut_ptr(), lda)
            };
        }
    }
    let one = |p: usize, j: usize, out: &mut [u32]| out[j * lda + p] = tmp[p * w + j];
    for p in 0..k2 {
        let js = if p < whole_p { whole_j } else { 0 };
        for j in js..n {
            one(p, j, out);
        }
    }
}

/// Which unit multiplies a bf16 product: the vector registers (`vdpbf16ps`,
/// AVX512-BF16) or Intel AMX's tiles (`tdpbf16ps`, [`amx`](super::amx)). Both read the
/// same operands and sum in f32; their orders of summation differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// AVX512-BF16.
    Avx512,
    /// AMX-BF16 (with AVX512-BF16 for the conversions).
    Amx,
}

/// `c (m × n, row stride ldc) = A·B`, or `+= A·B` when `accumulate`: `A` row-major
/// pairs (`m` rows of stride `lda` `u32`s, `pairs(k)` used), `B` packed ([`pack_b`]).
///
/// # Panics
/// If the CPU lacks AVX512-BF16 ([`available`]) or the buffers are too short: callers
/// choose the kernel path once and size the buffers from the shapes, never from input.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    unit: Unit,
    m: usize,
    n: usize,
    k: usize,
    a: &[u32],
    lda: usize,
    b: &[u32],
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    assert!(b.len() >= b_len(k, n), "bf16 gemm: b");
    product(
        unit,
        m,
        n,
        k,
        a,
        lda,
        b,
        BLayout::Packed,
        c,
        ldc,
        accumulate,
    )
}

/// [`gemm`] with `B` as rows of pairs: pair row `p` (rows `2p` and `2p + 1` of `B`
/// interleaved) at `b[p·ldb..]`, `ldb` at least `n` rounded up to [`NR`] (the kernel
/// reads whole blocks of columns; those past `n` are not stored).
#[allow(clippy::too_many_arguments)]
pub fn gemm_pair_rows(
    unit: Unit,
    m: usize,
    n: usize,
    k: usize,
    a: &[u32],
    lda: usize,
    b: &[u32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    assert!(ldb >= n.div_ceil(NR) * NR, "bf16 gemm: ldb");
    assert!(b.len() >= pairs(k) * ldb, "bf16 gemm: b");
    product(
        unit,
        m,
        n,
        k,
        a,
        lda,
        b,
        BLayout::Rows(ldb),
        c,
        ldc,
        accumulate,
    )
}

/// Where `B`'s pairs are.
#[derive(Clone, Copy)]
enum BLayout {
    /// [`pack_b`]'s blocks.
    Packed,
    /// Rows of pairs at this stride.
    Rows(usize),
}

#[allow(clippy::too_many_arguments)]
fn product(
    unit: Unit,
    m: usize,
    n: usize,
    k: usize,
    a: &[u32],
    lda: usize,
    b: &[u32],
    layout: BLayout,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    check();
    let k2 = pairs(k);
    assert!(lda >= k2, "bf16 gemm: operands");
    assert!(m == 0 || a.len() >= (m - 1) * lda + k2, "bf16 gemm: a");
    assert!(m == 0 || c.len() >= (m - 1) * ldc + n, "bf16 gemm: c");
    if m == 0 || n == 0 {
        return;
    }
    if k2 == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * ldc..i * ldc + n].fill(0.0);
            }
        }
        return;
    }
    if unit == Unit::Amx {
        let blocks = match layout {
            BLayout::Packed => super::amx::BBlocks {
                per_block: k2 * NR,
                stride: NR,
            },
            BLayout::Rows(ldb) => super::amx::BBlocks {
                per_block: NR,
                stride: ldb,
            },
        };
        return super::amx::product(m, n, k2, a, lda, b, blocks, c, ldc, accumulate);
    }
    #[cfg(target_arch = "x86_64")]
    for jb in 0..n.div_ceil(NR) {
        let cols = NR.min(n - jb * NR);
        let mut kc = 0;
        while kc < k2 {
            let kl = KC.min(k2 - kc);
            // The block's first pair and the stride between pairs (both checked
            // against `b` by the callers' length checks).
            let (start, ldb) = match layout {
                BLayout::Packed => (jb * k2 * NR + kc * NR, NR),
                BLayout::Rows(ldb) => (kc * ldb + jb * NR, ldb),
            };
            let bp = &b[start..start + (kl - 1) * ldb + NR];
            for i0 in (0..m).step_by(MR) {
                let rows = MR.min(m - i0);
                let ap = &a[i0 * lda + kc..(i0 + rows - 1) * lda + kc + kl];
                let cp = &mut c[i0 * ldc + jb * NR..(i0 + rows - 1) * ldc + jb * NR + cols];
                // SAFETY: the CPU has AVX512-BF16 (checked); `ap` holds `rows` rows of
                // `kl` pairs at stride `lda`, `bp` `kl` runs of `NR` pairs at stride
                // `ldb`, `cp` `rows` rows of `cols` at stride `ldc` (the slices above).
                unsafe {
                    avx512::kernel(
                        kl,
                        ap.as_ptr(),
                        lda,
                        bp.as_ptr(),
                        ldb,
                        cp.as_mut_ptr(),
                        ldc,
                        rows,
                        cols,
                        accumulate || kc > 0,
                    )
                };
            }
            kc += kl;
        }
    }
}

/// `out[j] = (lo[j], hi[j])` as a pair (`lo` in the low half) for `j < lo.len()`, `hi`
/// zero when `None`: two bf16 rows interleaved.
pub fn interleave(lo: &[u16], hi: Option<&[u16]>, out: &mut [u32]) {
    check();
    let len = lo.len();
    assert!(out.len() >= len && hi.is_none_or(|h| h.len() >= len));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX512-BF16 (checked); `lo`, `hi` hold `len` values, `out` `len` pairs.
    unsafe {
        avx512::interleave(lo.as_ptr(), hi.map(<[u16]>::as_ptr), len, out.as_mut_ptr())
    }
}

/// The mark of a tap in the zero padding, for [`interleave_taps`].
pub const OUTSIDE: usize = usize::MAX;

/// For each of the taps `t`, `out[t·ci..(t + 1)·ci]` = the channels of input pixel
/// `lo[t]` interleaved with those of `hi[t]` (pairs as [`interleave`]): `x` holds pixels
/// of `ci` bf16 values; a pixel [`OUTSIDE`] (or `hi` `None`) gives zeros.
///
/// # Panics
/// If a pixel is past `x` or `out` is short: callers build the pixels from the shapes.
pub fn interleave_taps(x: &[u16], ci: usize, lo: &[usize], hi: Option<&[usize]>, out: &mut [u32]) {
    check();
    let taps = lo.len();
    let pixels = x.len() / ci.max(1);
    assert!(out.len() >= taps * ci && hi.is_none_or(|h| h.len() >= taps));
    let ok = |p: usize| p == OUTSIDE || p < pixels;
    assert!(
        lo.iter().all(|&p| ok(p)) && hi.is_none_or(|h| h[..taps].iter().all(|&p| ok(p))),
        "bf16 interleave_taps: a pixel past the input"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX512-BF16 (checked); every pixel read is inside `x` (checked) or not read
    // (a zero mask), `out` holds `taps·ci` pairs.
    unsafe {
        avx512::interleave_taps(
            x.as_ptr(),
            ci,
            lo.as_ptr(),
            hi.map(<[usize]>::as_ptr),
            taps,
            out.as_mut_ptr(),
        )
    }
}

/// A convolution as a product without the patch matrix ("implicit GEMM"): `c` (`rows ×
/// n`, row stride `ldc`) `= Σ_t Σ_q x[off(r, t) + q] · B[t·ci2 + q]`, where each output
/// row `r` reads, for each of the `taps` kernel taps, the `ci2` channel pairs of one input
/// pixel starting at `off(r, t)` in `x` (bf16 pairs), or zeros where that offset is
/// `x.len()` (the padding). The offsets are in tiles of [`MR`] rows, tap by tap:
/// `off(r, t) = offs[((r / MR)·taps + t)·MR + r % MR]` (rows past `rows` in the last tile
/// are read, not stored: any offset will do). `B` is the weights packed by [`pack_b`] with
/// `k = 2·taps·ci2` (taps-major, as the patch matrix's columns).
///
/// # Panics
/// If the CPU lacks AVX512-BF16, the buffers are too short or an offset points past
/// `x`: callers build the offsets from the shapes, never from input.
#[allow(clippy::too_many_arguments)]
pub fn gemm_taps(
    unit: Unit,
    rows: usize,
    n: usize,
    ci2: usize,
    taps: usize,
    x: &[u32],
    offs: &[usize],
    b: &[u32],
    c: &mut [f32],
    ldc: usize,
) {
    check();
    let k2 = taps * ci2;
    let tiles = rows.div_ceil(MR);
    assert!(b.len() >= b_len(2 * k2, n), "bf16 gemm_taps: b");
    assert!(offs.len() >= tiles * taps * MR, "bf16 gemm_taps: offsets");
    assert!(
        rows == 0 || c.len() >= (rows - 1) * ldc + n,
        "bf16 gemm_taps: c"
    );
    if rows == 0 || n == 0 {
        return;
    }
    let zeros = vec![0u32; ci2.max(1)];
    // Every offset checked at once, the padding's counted as 0 (a loop without an early
    // exit, which vectorises); the kernel then reads without a check each.
    let offs = &offs[..tiles * taps * MR];
    let padding = x.len();
    let last = offs
        .iter()
        .map(|&o| if o == padding { 0 } else { o })
        .fold(0, usize::max);
    assert!(
        ci2 <= x.len() && last <= x.len() - ci2,
        "bf16 gemm_taps: an offset past x"
    );
    if unit == Unit::Amx {
        return super::amx::taps(rows, n, ci2, taps, MR, x, offs, b, c, ldc);
    }
    // The blocks of columns outside, so that one block of `B` stays in the cache while
    // the tiles pass.
    #[cfg(target_arch = "x86_64")]
    for jb in 0..n.div_ceil(NR) {
        let cols = NR.min(n - jb * NR);
        let bp = &b[jb * k2 * NR..][..k2 * NR];
        for (i, to) in offs.chunks_exact(taps * MR).enumerate() {
            let i0 = i * MR;
            let tile = MR.min(rows - i0);
            let cp = &mut c[i0 * ldc + jb * NR..(i0 + tile - 1) * ldc + jb * NR + cols];
            // SAFETY: AVX512-BF16 (checked); every offset but the padding's is at most
            // `x.len() − ci2` (checked above), the padding reads `ci2` pairs of `zeros`;
            // `to` holds `taps·MR` offsets, `bp` `k2` pairs of a block, `cp` `tile` rows
            // of `cols` at stride `ldc`.
            unsafe {
                avx512::kernel_taps(
                    ci2,
                    taps,
                    x.as_ptr(),
                    padding,
                    zeros.as_ptr(),
                    to.as_ptr(),
                    bp.as_ptr(),
                    cp.as_mut_ptr(),
                    ldc,
                    tile,
                    cols,
                )
            };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    use super::super::fma::avx512::{mask, store_row};

    /// `dst[..len] = bf16(src[..len])`.
    ///
    /// # Safety
    /// AVX512-BF16 present; `src` and `dst` valid for `len` elements.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn convert(src: *const f32, dst: *mut u16, len: usize) {
        let mut i = 0;
        while i < len {
            let m = mask(len - i);
            let v = _mm512_maskz_loadu_ps(m, src.add(i));
            let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
            _mm256_mask_storeu_epi16(dst.add(i) as *mut i16, m, h);
            i += 16;
        }
    }

    /// `d[j] = (bf16(lo[j]), bf16(hi[j]))` for `j < cols` (`hi` zero when `None`), and
    /// zero up to `NR`.
    ///
    /// # Safety
    /// AVX512-BF16 present; `lo`, `hi` valid for `cols ≤ NR` reads, `d` for `NR` writes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn pair_rows(
        lo: *const f32,
        hi: Option<*const f32>,
        cols: usize,
        d: *mut u32,
    ) {
        for h in 0..NR / 16 {
            let n = cols.saturating_sub(16 * h);
            let m = mask(n);
            let l: __m256i =
                std::mem::transmute(_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, lo.add(16 * h))));
            let mut v = _mm512_cvtepu16_epi32(l);
            if let Some(hi) = hi {
                let u: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(
                    m,
                    hi.add(16 * h),
                )));
                v = _mm512_or_si512(v, _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(u)));
            }
            _mm512_storeu_si512(d.add(16 * h) as *mut __m512i, v);
        }
    }

    /// Mask of the first `n` (up to 32) of 32 lanes.
    fn mask32(n: usize) -> __mmask32 {
        if n >= 32 {
            u32::MAX
        } else {
            (1u32 << n) - 1
        }
    }

    /// `(lo[j], hi[j])` pairs for `j < n` (at most 32) into `d`: two 512-bit loads (a
    /// zero mask where `lo_on` / `hi_on` is false: nothing read) and two permutes.
    ///
    /// # Safety
    /// AVX-512 BW present; `lo` (when `lo_on`) and `hi` (when `hi_on`) valid for `n`
    /// reads, `d` for `n` writes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn pairs32(
        lo: *const u16,
        hi: *const u16,
        lo_on: bool,
        hi_on: bool,
        n: usize,
        d: *mut u32,
    ) {
        // Word indices into (a, b): a's j-th word, then b's (b's words are 32 + j).
        const IDX: [[u16; 32]; 2] = {
            let mut idx = [[0u16; 32]; 2];
            let mut h = 0;
            while h < 2 {
                let mut j = 0;
                while j < 16 {
                    idx[h][2 * j] = (16 * h + j) as u16;
                    idx[h][2 * j + 1] = (32 + 16 * h + j) as u16;
                    j += 1;
                }
                h += 1;
            }
            idx
        };
        let m = mask32(n);
        let a = _mm512_maskz_loadu_epi16(if lo_on { m } else { 0 }, lo as *const i16);
        let b = _mm512_maskz_loadu_epi16(if hi_on { m } else { 0 }, hi as *const i16);
        for (h, idx) in IDX.iter().enumerate() {
            if n > 16 * h {
                let i = _mm512_loadu_si512(idx.as_ptr() as *const __m512i);
                let v = _mm512_permutex2var_epi16(a, i, b);
                _mm512_mask_storeu_epi32(d.add(16 * h) as *mut i32, mask(n - 16 * h), v);
            }
        }
    }

    /// `d[j] = lo[j] | hi[j] << 16` for `j < len` (`hi` zero when `None`).
    ///
    /// # Safety
    /// AVX-512 BW present; `lo`, `hi` valid for `len` reads, `d` for `len` writes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn interleave(
        lo: *const u16,
        hi: Option<*const u16>,
        len: usize,
        d: *mut u32,
    ) {
        let h = hi.unwrap_or(lo);
        let mut i = 0;
        while i < len {
            pairs32(
                lo.add(i),
                h.wrapping_add(i),
                true,
                hi.is_some(),
                len - i,
                d.add(i),
            );
            i += 32;
        }
    }

    /// [`super::interleave_taps`].
    ///
    /// # Safety
    /// AVX-512 BW present; `lo` (and `hi`) hold `taps` pixels, each [`super::OUTSIDE`] or
    /// valid for `ci` reads at `x + pixel·ci`; `d` valid for `taps·ci` writes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn interleave_taps(
        x: *const u16,
        ci: usize,
        lo: *const usize,
        hi: Option<*const usize>,
        taps: usize,
        d: *mut u32,
    ) {
        for t in 0..taps {
            let (l, h) = (*lo.add(t), hi.map_or(super::OUTSIDE, |h| *h.add(t)));
            // A pixel outside reads nothing (a zero mask) from a pointer never used.
            let pl = x.wrapping_add(l.wrapping_mul(ci));
            let ph = x.wrapping_add(h.wrapping_mul(ci));
            let (lo_on, hi_on) = (l != super::OUTSIDE, h != super::OUTSIDE);
            let dt = d.add(t * ci);
            let mut i = 0;
            while i < ci {
                pairs32(
                    pl.wrapping_add(i),
                    ph.wrapping_add(i),
                    lo_on,
                    hi_on,
                    ci - i,
                    dt.add(i),
                );
                i += 32;
            }
        }
    }

    /// `dst[j·ldd + i] = src[i·lds + j]` for `i, j < 16`: a 16 × 16 tile of `u32`s
    /// transposed in registers.
    ///
    /// # Safety
    /// AVX-512F present; `src` valid for 16 rows of 16 reads at stride `lds`, `dst` for 16
    /// rows of 16 writes at stride `ldd`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose16(src: *const u32, lds: usize, dst: *mut u32, ldd: usize) {
        let mut r = [_mm512_setzero_si512(); 16];
        for (i, v) in r.iter_mut().enumerate() {
            *v = _mm512_loadu_si512(src.add(i * lds) as *const __m512i);
        }
        // Rows 2i and 2i + 1 interleaved by 32 bits, then by 64: `r[4i + m]` holds, in
        // its 128-bit lane `l`, column `4l + m` of rows `4i..4i + 4`.
        let mut t = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        for i in 0..4 {
            r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
            r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
            r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
            r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
        }
        // Then the lanes: column `4l + m` gathers lane `l` of `r[m]`, `r[4 + m]`,
        // `r[8 + m]`, `r[12 + m]`.
        for m in 0..4 {
            let t1 = _mm512_shuffle_i32x4::<0x88>(r[m], r[4 + m]);
            let t2 = _mm512_shuffle_i32x4::<0xdd>(r[m], r[4 + m]);
            let t3 = _mm512_shuffle_i32x4::<0x88>(r[8 + m], r[12 + m]);
            let t4 = _mm512_shuffle_i32x4::<0xdd>(r[8 + m], r[12 + m]);
            for (col, v) in [
                (m, _mm512_shuffle_i32x4::<0x88>(t1, t3)),
                (4 + m, _mm512_shuffle_i32x4::<0x88>(t2, t4)),
                (8 + m, _mm512_shuffle_i32x4::<0xdd>(t1, t3)),
                (12 + m, _mm512_shuffle_i32x4::<0xdd>(t2, t4)),
            ] {
                _mm512_storeu_si512(dst.add(col * ldd) as *mut __m512i, v);
            }
        }
    }

    /// One `MR × NR` tile of [`super::gemm_taps`]: `c[..rows][..cols] = Σ_t Σ_q
    /// x[offs[t][r] + q] ⊗ b[t·ci2 + q]` (`zeros` for the offset `padding`), the sums kept
    /// in registers across the taps.
    ///
    /// # Safety
    /// AVX512-BF16 present; `offs` holds `taps·MR` offsets, each `padding` or valid for
    /// `ci2` reads at `x + offset`; `zeros` valid for `ci2` reads; `b` valid for
    /// `taps·ci2·NR`, `c` for `rows` rows of stride `ldc`, `cols` each.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn kernel_taps(
        ci2: usize,
        taps: usize,
        x: *const u32,
        padding: usize,
        zeros: *const u32,
        offs: *const usize,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        let mut bp = b;
        for t in 0..taps {
            let to = offs.add(t * MR);
            let ar: [*const u32; MR] = std::array::from_fn(|r| {
                let o = *to.add(r);
                if o == padding {
                    zeros
                } else {
                    x.wrapping_add(o)
                }
            });
            for q in 0..ci2 {
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_ps(bp as *const f32));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_ps(bp.add(16) as *const f32));
                bp = bp.add(NR);
                // Unrolled by hand: a loop over the rows here is not unrolled by the
                // compiler, and its sums go through memory.
                macro_rules! rows {
                    ($($r:literal)*) => {$(
                        let av: __m512bh =
                            std::mem::transmute(_mm512_set1_epi32(*ar[$r].add(q) as i32));
                        acc[$r][0] = _mm512_dpbf16_ps(acc[$r][0], av, b0);
                        acc[$r][1] = _mm512_dpbf16_ps(acc[$r][1], av, b1);
                    )*};
                }
                const _: () = assert!(MR == 12);
                rows!(0 1 2 3 4 5 6 7 8 9 10 11);
            }
        }
        let (m0, m1) = (mask(cols), mask(cols.saturating_sub(16)));
        // Constant indices only (as above), so that the sums stay in registers.
        macro_rules! store {
            ($($r:literal)*) => {$(
                if $r < rows {
                    let row = c.add($r * ldc);
                    _mm512_mask_storeu_ps(row, m0, acc[$r][0]);
                    _mm512_mask_storeu_ps(row.add(16), m1, acc[$r][1]);
                }
            )*};
        }
        store!(0 1 2 3 4 5 6 7 8 9 10 11);
    }

    /// One `MR × NR` tile: `c[..rows][..cols] (+)= Σ_p a[.., p] ⊗ b[p]` over `k2` pairs.
    ///
    /// # Safety
    /// AVX512-BF16 present; `a` valid for `rows` rows of `k2` reads at stride `lda`, `b`
    /// for `k2` runs of `NR` at stride `ldb`, `c` for `rows` rows of stride `ldc`, `cols`
    /// each.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn kernel(
        k2: usize,
        a: *const u32,
        lda: usize,
        b: *const u32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) {
        // Rows past `rows` read the last row again; their sums are not stored.
        let mut ar = [a; MR];
        for (r, p) in ar.iter_mut().enumerate() {
            *p = a.add(r.min(rows - 1) * lda);
        }
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for p in 0..k2 {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_ps(b.add(p * ldb) as *const f32));
            let b1: __m512bh =
                std::mem::transmute(_mm512_loadu_ps(b.add(p * ldb + 16) as *const f32));
            for (acc, row) in acc.iter_mut().zip(&ar) {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*row.add(p) as i32));
                acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
            }
        }
        let (m0, m1) = (mask(cols), mask(cols.saturating_sub(16)));
        for (r, acc) in acc.iter().enumerate().take(rows) {
            store_row(c.add(r * ldc), *acc, m0, m1, accumulate);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Whether the CPU has the kernel; says so once where it has not (a missing CPU
    /// feature is not a missing tool: the test passes without running).
    pub(crate) fn has_kernel(test: &str) -> bool {
        let ok = available();
        if !ok {
            eprintln!("{test}: not run: this CPU has no AVX512-BF16");
        }
        ok
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::SplitMix(seed);
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    #[test]
    fn the_kernel_matches_an_f64_product_of_the_rounded_inputs() {
        if !has_kernel("the_kernel_matches_an_f64_product_of_the_rounded_inputs") {
            return;
        }
        // Tails of every kind: rows past a panel, columns past a block, an odd k, a k
        // past one block of pairs (KC), one row, one column.
        for (m, k, n) in [
            (12, 2, 32),
            (1, 1, 1),
            (13, 7, 33),
            (25, 431, 70),
            (40, 2 * KC + 5, 16),
            (7, 64, 5),
        ] {
            let a = values(m * k, 1 + m as u64);
            let b = values(k * n, 2 + n as u64);
            // A as rows of pairs, two pairs of padding per row.
            let lda = pairs(k) + 2;
            let mut pa = vec![0u32; m * lda];
            for i in 0..m {
                let row: &mut [u16] = bytemuck::cast_slice_mut(&mut pa[i * lda..(i + 1) * lda]);
                convert(&a[i * k..(i + 1) * k], &mut row[..k]);
            }
            let mut pb = vec![7u32; b_len(k, n)];
            pack_b(&b, k, n, n, &mut pb);
            // The same from bf16 rows.
            let mut b16 = vec![0u16; k * n];
            convert(&b, &mut b16);
            // And as rows of pairs (interleaved bf16 rows), the padding past n not zero.
            let ldb = n.div_ceil(NR) * NR + NR;
            let mut rb = vec![0x7fc0_7fc0u32; pairs(k) * ldb];
            for p in 0..pairs(k) {
                let lo = &b16[2 * p * n..(2 * p + 1) * n];
                let hi = (2 * p + 1 < k).then(|| &b16[(2 * p + 1) * n..(2 * p + 2) * n]);
                interleave(lo, hi, &mut rb[p * ldb..p * ldb + n]);
                for j in 0..n {
                    assert_eq!(
                        rb[p * ldb + j],
                        pb[(j / NR) * pairs(k) * NR + p * NR + j % NR]
                    );
                }
            }
            // Bᵀ turned back into rows of pairs gives B's blocks' values.
            let mut bt = vec![0u32; n * pairs(k)];
            transpose_pairs(&b, k, n, &mut bt, pairs(k), &mut Vec::new());
            let mut bt16 = vec![1u32; n * pairs(k)];
            transpose_pairs_bf16(&b16, k, n, &mut bt16, pairs(k), &mut Vec::new());
            assert_eq!(bt, bt16, "Bᵀ's pairs from f32 and from bf16");
            // At a wider stride (the 16 × 16 tiles and the edges), the padding untouched.
            let wide = pairs(k) + 3;
            let mut btw = vec![9u32; n * wide];
            transpose_pairs(&b, k, n, &mut btw, wide, &mut Vec::new());
            for j in 0..n {
                assert_eq!(
                    btw[j * wide..j * wide + pairs(k)],
                    bt[j * pairs(k)..(j + 1) * pairs(k)]
                );
                assert!(btw[j * wide + pairs(k)..(j + 1) * wide]
                    .iter()
                    .all(|&v| v == 9));
            }
            for j in 0..n {
                for p in 0..pairs(k) {
                    assert_eq!(
                        bt[j * pairs(k) + p],
                        pb[(j / NR) * pairs(k) * NR + p * NR + j % NR]
                    );
                }
            }
            let ldc = n + 3;
            let mut c = vec![f32::NAN; m * ldc];
            gemm(Unit::Avx512, m, n, k, &pa, lda, &pb, &mut c, ldc, false);
            for i in 0..m {
                for j in 0..n {
                    let (mut want, mut mag) = (0.0f64, 0.0f64);
                    for t in 0..k {
                        let p = f64::from(round_bf16(a[i * k + t]))
                            * f64::from(round_bf16(b[t * n + j]));
                        want += p;
                        mag += p.abs();
                    }
                    let got = f64::from(c[i * ldc + j]);
                    // f32 sums of exact products: k roundings of at most 2^-24 each.
                    let tol = mag * k as f64 * 6e-8 + 1e-30;
                    assert!(
                        (got - want).abs() <= tol,
                        "{m}x{k}x{n} [{i},{j}]: {got} vs {want}"
                    );
                }
                // The padding between rows is not touched.
                for j in n..ldc.min((m - i) * ldc) {
                    if i + 1 < m {
                        assert!(c[i * ldc + j].is_nan(), "{m}x{k}x{n}: wrote past column n");
                    }
                }
            }
            // B as rows of pairs: the same sums in the same order, the same bits.
            let mut c2 = vec![f32::NAN; m * ldc];
            gemm_pair_rows(
                Unit::Avx512,
                m,
                n,
                k,
                &pa,
                lda,
                &rb,
                ldb,
                &mut c2,
                ldc,
                false,
            );
            for i in 0..m {
                for j in 0..n {
                    assert_eq!(c2[i * ldc + j].to_bits(), c[i * ldc + j].to_bits());
                }
            }
            // Accumulating adds the same product again.
            let before = c.clone();
            gemm(Unit::Avx512, m, n, k, &pa, lda, &pb, &mut c, ldc, true);
            for i in 0..m {
                for j in 0..n {
                    let (x, y) = (c[i * ldc + j], 2.0 * before[i * ldc + j]);
                    assert!((x - y).abs() <= 1e-5 * y.abs().max(1e-3), "{m}x{k}x{n} acc");
                }
            }
        }
    }

    #[test]
    fn rounding_to_bf16_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: even is the upper.
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0 + 1.0 / 65536.0), 0x3f81);
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
        assert_eq!(from_bf16(to_bf16(f32::MAX)), f32::INFINITY);
        for i in 0..10_000 {
            let x = (i as f32 - 5000.0) * 0.01731;
            let r = round_bf16(x);
            assert!((r - x).abs() <= x.abs() / 256.0, "{x} → {r}");
        }
    }
}
