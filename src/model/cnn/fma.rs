//! f32 convolutions without a patch matrix, on AVX-512 FMA ("implicit GEMM").
//!
//! The same tile as the bf16 kernel ([`super::bf16`]): `MR` output pixels × `NR` output
//! channels of sums in 24 AVX-512 registers. For each kernel tap and input channel the
//! kernel broadcasts the channel's value at each of the tile's `MR` input pixels (read in
//! place, through one offset per pixel and tap: no copied patches) and adds its products
//! with a row of `NR` weights. The weights are packed once per product in blocks of `NR`
//! columns, `[k][NR]` each, the order the kernel reads them.
//!
//! The im2col product on the `gemm` crate spent a fifth of a training step copying
//! patches (`perf`, widths 32/64/128, Intel Xeon); these kernels read each input pixel
//! where it is. Every sum runs in a fixed order that depends only on the shapes: the same
//! inputs give the same bits, whatever the thread count.

/// Rows (output pixels) of the kernel's tile.
pub const MR: usize = 12;
/// Columns (output channels) of a packed block: two AVX-512 registers.
pub const NR: usize = 32;
/// Rows of the weights per block of the product (`KC·NR` f32s: 24 KB, in the L1 cache).
const KC: usize = 192;

/// The environment variable that hides these kernels (`CIFAR_DF_NO_FMA=1`): the f32
/// products then go through the patch matrix and the `gemm` crate, as on a CPU without
/// AVX-512 (to compare the paths, and in tests).
pub const HIDE_ENV: &str = "CIFAR_DF_NO_FMA";

/// Whether the f32 products use these kernels: the CPU has AVX-512F, and [`HIDE_ENV`]
/// does not hide them. Asked once.
pub fn available() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        let hidden = std::env::var_os(HIDE_ENV).is_some_and(|v| !v.is_empty() && v != "0");
        !hidden && cpu_has_avx512f()
    })
}

fn cpu_has_avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn check() {
    assert!(cpu_has_avx512f(), "an AVX-512 kernel on a CPU without it");
}

/// f32s of `k × n` packed by [`pack_b`].
pub fn b_len(k: usize, n: usize) -> usize {
    n.div_ceil(NR) * NR * k
}

/// Packs a row-major `B` (`k × n`) into `out` ([`b_len`]): blocks of [`NR`] columns,
/// each `k` rows of `NR` (the columns past `n` zero).
pub fn pack_b(b: &[f32], k: usize, n: usize, out: &mut [f32]) {
    assert!(b.len() >= k * n && out.len() >= b_len(k, n));
    for (blk, dst) in out[..b_len(k, n)].chunks_exact_mut(k * NR).enumerate() {
        let j0 = blk * NR;
        let cols = NR.min(n - j0);
        for (p, d) in dst.chunks_exact_mut(NR).enumerate() {
            d[..cols].copy_from_slice(&b[p * n + j0..][..cols]);
            d[cols..].fill(0.0);
        }
    }
}

/// A band of output pixels of a convolution, for [`gemm_tiles`]: the pixels grouped by
/// which of their kernel taps fall inside the image, in tiles of [`MR`] pixels that
/// share them, so that a tile skips its taps in the zero padding (whose products are
/// zero) instead of multiplying zeros: a third of the products of a 3×3 convolution of
/// 7×7 images with one pixel of padding, two fifths at 3×3.
///
/// Tap `t` of a pixel reads the input at `base + steps[t]` (in f32s): one base per pixel
/// (where its window's first tap would be, outside the input for a window that
/// overhangs the top or left) and one step per tap serve every pixel and tap.
///
/// Each pixel's sum runs over its taps in order whatever tile it falls in: the result
/// does not depend on how a band is cut.
#[derive(Default)]
pub struct Tiles {
    steps: Vec<isize>,
    /// Per pixel: its base, and the mask of its taps inside the input.
    bases: Vec<isize>,
    masks: Vec<u64>,
    /// Per tile: its `MR` bases and output rows (past its count: its last again).
    tile_bases: Vec<isize>,
    rows: Vec<usize>,
    /// Per tile: its pixels, and its taps as a range of `lists`.
    tiles: Vec<(usize, usize, usize)>,
    /// The taps the tiles compute, in order.
    lists: Vec<usize>,
    /// Per group (pixels of one mask): the mask and its pixel count; the pixels' order.
    groups: Vec<(u64, usize)>,
    group_of: Vec<usize>,
    order: Vec<usize>,
}

impl Tiles {
    /// The most taps a kernel may have.
    pub const MAX_TAPS: usize = 64;

    /// Starts a band of a convolution whose tap `t` reads `steps[t]` f32s from a pixel's
    /// base; then [`push`](Tiles::push) each pixel and [`group`](Tiles::group).
    ///
    /// # Panics
    /// With more than [`Tiles::MAX_TAPS`] taps.
    pub fn start(&mut self, steps: impl IntoIterator<Item = isize>) {
        self.steps.clear();
        self.steps.extend(steps);
        assert!(
            self.steps.len() <= Self::MAX_TAPS,
            "fma Tiles: too many taps"
        );
        self.bases.clear();
        self.masks.clear();
    }

    /// Adds the next output pixel (the next row of the product): its base and the mask
    /// of its taps that fall inside the input (bit `t` for tap `t`).
    pub fn push(&mut self, base: isize, mask: u64) {
        self.bases.push(base);
        self.masks.push(mask);
    }

    /// Groups the pixels into tiles.
    pub fn group(&mut self) {
        let taps = self.steps.len();
        self.groups.clear();
        self.group_of.clear();
        // Each pixel's group: most pixels share the previous one's, so that is tried
        // first; there are at most a few dozen groups.
        let mut last = usize::MAX;
        for &mask in &self.masks {
            let g = if last < self.groups.len() && self.groups[last].0 == mask {
                last
            } else if let Some(g) = self.groups.iter().position(|&(m, _)| m == mask) {
                g
            } else {
                self.groups.push((mask, 0));
                self.groups.len() - 1
            };
            self.groups[g].1 += 1;
            self.group_of.push(g);
            last = g;
        }
        // The pixels in order of group (a counting sort: stable).
        let mut at: Vec<usize> = self
            .groups
            .iter()
            .scan(0, |acc, &(_, c)| {
                let start = *acc;
                *acc += c;
                Some(start)
            })
            .collect();
        self.order.clear();
        self.order.resize(self.masks.len(), 0);
        for (p, &g) in self.group_of.iter().enumerate() {
            self.order[at[g]] = p;
            at[g] += 1;
        }
        self.tiles.clear();
        self.lists.clear();
        self.tile_bases.clear();
        self.rows.clear();
        let mut start = 0;
        for &(mask, count) in &self.groups {
            let first = self.lists.len();
            self.lists.extend((0..taps).filter(|&t| mask >> t & 1 == 1));
            let list = (first, self.lists.len());
            for chunk in self.order[start..start + count].chunks(MR) {
                let used = chunk.len();
                self.tiles.push((used, list.0, list.1));
                let pick = |r: usize| chunk[r.min(used - 1)];
                self.tile_bases.extend((0..MR).map(|r| self.bases[pick(r)]));
                self.rows.extend((0..MR).map(pick));
            }
            start += count;
        }
    }

    /// Tiles (for tests and benches).
    pub fn len(&self) -> usize {
        self.tiles.len()
    }

    /// Whether there are no tiles.
    pub fn is_empty(&self) -> bool {
        self.tiles.is_empty()
    }
}

/// A convolution as a product without the patch matrix: row `p` of `c` (`n` wide, row
/// stride `ldc`) `= Σ_t Σ_q x[base(p) + step(t) + q] · B[t·ci + q]` for the output pixels
/// `p` of `tiles` (numbered from 0 in the order pushed: rows of `c`), over the taps `t`
/// in the pixel's mask (the others fall in the zero padding and add nothing). `B` is the
/// weights packed by [`pack_b`] with `k = taps·ci` (taps-major, as the patch matrix's
/// columns).
///
/// # Panics
/// If the CPU lacks AVX-512F, the buffers are too short, or a tap in a pixel's mask
/// reads outside `x`: callers build the tiles from the shapes, never from input.
pub fn gemm_tiles(
    tiles: &Tiles,
    n: usize,
    ci: usize,
    x: &[f32],
    b: &[f32],
    c: &mut [f32],
    ldc: usize,
) {
    check();
    let taps = tiles.steps.len();
    let k = taps * ci;
    assert!(b.len() >= b_len(k, n), "fma gemm_tiles: b");
    let pixels = tiles.bases.len();
    assert!(
        n <= ldc && (pixels == 0 || c.len() >= (pixels - 1) * ldc + n),
        "fma gemm_tiles: c"
    );
    assert!(
        tiles.rows.len() == tiles.tiles.len() * MR,
        "fma gemm_tiles: not grouped"
    );
    if pixels == 0 || n == 0 {
        return;
    }
    // Every pixel's reads inside `x`: its taps' first and last steps (every step between
    // reads between them), per group, then each pixel against its group's.
    assert!(ci <= x.len(), "fma gemm_tiles: x");
    let room = (x.len() - ci) as isize;
    let reach: Vec<(isize, isize)> = tiles
        .groups
        .iter()
        .map(|&(mask, _)| {
            let listed = (0..taps).filter(|t| mask >> t & 1 == 1);
            let steps = listed.map(|t| tiles.steps[t]);
            steps.fold((isize::MAX, isize::MIN), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            })
        })
        .collect();
    let ok = tiles.bases.iter().zip(&tiles.group_of).all(|(&base, &g)| {
        let (lo, hi) = reach[g];
        // (A pixel with no tap inside reads nothing.)
        lo > hi || (base + lo >= 0 && base + hi <= room)
    });
    assert!(ok, "fma gemm_tiles: a tap reads outside x");
    // Taps per block of the product's `k`: the block's weights (`≤ KC` rows of `NR`)
    // stay in the L1 cache while the tiles pass; each block adds its sums to `c`.
    let per = (KC / ci.max(1)).clamp(1, taps.max(1));
    #[cfg(target_arch = "x86_64")]
    for jb in 0..n.div_ceil(NR) {
        let cols = NR.min(n - jb * NR);
        let block = &b[jb * k * NR..][..k * NR];
        for t0 in (0..taps.max(1)).step_by(per) {
            for (i, &(used, l0, l1)) in tiles.tiles.iter().enumerate() {
                let list = &tiles.lists[l0..l1];
                // This block's taps of the tile's, and whether an earlier block had any.
                let lo = list.partition_point(|&t| t < t0);
                let hi = list.partition_point(|&t| t < t0 + per);
                let rows = &tiles.rows[i * MR..][..MR];
                if lo == hi {
                    if t0 + per >= taps && lo == 0 {
                        // No tap inside the input: zeros.
                        for &r in &rows[..used] {
                            c[r * ldc + jb * NR..][..cols].fill(0.0);
                        }
                    }
                    continue;
                }
                // SAFETY: AVX-512F (checked); every listed tap of every pixel reads `ci`
                // values inside `x` (checked above), and the tile's bases are its
                // pixels'; `block` holds the `taps·ci` rows of a block and each listed
                // tap is below `taps`; each row is below `pixels`, so its `cols` values
                // from `jb·NR` are inside `c`.
                unsafe {
                    avx512::kernel_taps(
                        ci,
                        &list[lo..hi],
                        &tiles.steps,
                        x.as_ptr(),
                        tiles.tile_bases[i * MR..].as_ptr(),
                        block.as_ptr(),
                        c[jb * NR..].as_mut_ptr(),
                        rows.as_ptr(),
                        ldc,
                        used,
                        cols,
                        lo > 0,
                    )
                };
            }
        }
    }
}

/// A convolution's weight gradient without the patch matrix: `dwt` (`taps·ci × co`,
/// rows ordered tap, input channel) `(+)= Σ_i x[o_i + q] ⊗ dy[p_i]` over the pairs
/// `(o_i, p_i)` of each tap `t`: `pairs[t·stride..][..counts[t]]`, where `p_i` is an
/// output pixel (a row of `dy`, `co` wide) and `o_i` the offset in `x` of the input
/// pixel (its `ci` channels) the tap reads for it. Pixels whose tap falls in the zero
/// padding are left out of the lists: their products are zero. The sums are stored in
/// `dwt`, or added to it (`accumulate`).
///
/// The kernel's tile is `MR` input channels of one tap × `NR` output channels; for each
/// pair it broadcasts the `MR` channels of the input pixel (contiguous in `x`) against
/// the pixel's row of `dy`, both read in place.
///
/// # Panics
/// If the CPU lacks AVX-512F, the buffers are too short, or an offset or pixel points
/// past `x` or `dy`: callers build them from the shapes, never from input.
#[allow(clippy::too_many_arguments)]
pub fn weight_grad(
    x: &[f32],
    ci: usize,
    pairs: &[(usize, usize)],
    stride: usize,
    counts: &[usize],
    dy: &[f32],
    co: usize,
    dwt: &mut [f32],
    accumulate: bool,
) {
    check();
    let taps = counts.len();
    assert!(dwt.len() >= taps * ci * co, "fma weight_grad: dwt");
    if !accumulate {
        dwt[..taps * ci * co].fill(0.0);
    }
    if ci == 0 || co == 0 {
        return;
    }
    let lists: Vec<&[(usize, usize)]> = counts
        .iter()
        .enumerate()
        .map(|(t, &n)| {
            assert!(n <= stride, "fma weight_grad: a tap's count");
            &pairs[t * stride..][..n]
        })
        .collect();
    let rows_dy = dy.len() / co;
    // Every pair checked at once (loops without an early exit, which vectorise); the
    // kernel then reads without a check each.
    let last_o = lists.iter().flat_map(|l| l.iter().map(|&(o, _)| o)).max();
    let last_p = lists.iter().flat_map(|l| l.iter().map(|&(_, p)| p)).max();
    if let (Some(o), Some(p)) = (last_o, last_p) {
        assert!(
            ci <= x.len() && o <= x.len() - ci && p < rows_dy,
            "fma weight_grad: an offset past x or a pixel past dy"
        );
    }
    #[cfg(target_arch = "x86_64")]
    for jb in 0..co.div_ceil(NR) {
        let cols = NR.min(co - jb * NR);
        for (t, to) in lists.iter().enumerate() {
            if to.is_empty() {
                continue;
            }
            for c0 in (0..ci).step_by(MR) {
                let rows = MR.min(ci - c0);
                let at = (t * ci + c0) * co + jb * NR;
                let cp = &mut dwt[at..at + (rows - 1) * co + cols];
                // SAFETY: AVX-512F (checked); each offset is at most `x.len() − ci`
                // (checked), so the `rows ≤ ci − c0` channels read from `x + c0 +
                // offset` are inside `x`; each pixel is a row of `dy` (checked), of
                // which `cols` from `jb·NR` are read; `cp` holds `rows` rows of `cols`
                // at stride `co`.
                unsafe {
                    avx512::kernel_grad(
                        rows,
                        to.len(),
                        x.as_ptr().add(c0),
                        to.as_ptr(),
                        dy.as_ptr().add(jb * NR),
                        co,
                        cp.as_mut_ptr(),
                        co,
                        cols,
                    )
                };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// The mask of the first `n` (at most 16) lanes: the columns of a partial block.
    pub(in crate::model::cnn) fn mask(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as u16
        }
    }

    /// Stores a row of a tile's sums (two registers, the lanes of `m0` and `m1`) at `row`,
    /// or (`accumulate`) adds them to what is there.
    ///
    /// # Safety
    /// AVX-512F present; `row` valid for the lanes of both masks (`row + 16` for `m1`'s).
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(in crate::model::cnn) unsafe fn store_row(
        row: *mut f32,
        acc: [__m512; 2],
        m0: __mmask16,
        m1: __mmask16,
        accumulate: bool,
    ) {
        let (mut v0, mut v1) = (acc[0], acc[1]);
        if accumulate {
            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
            v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row.add(16)));
        }
        _mm512_mask_storeu_ps(row, m0, v0);
        _mm512_mask_storeu_ps(row.add(16), m1, v1);
    }

    /// One `MR × NR` tile of [`super::gemm_tiles`] over the taps `list`, its sums stored
    /// in `c`'s rows `rows[..used]` or (`accumulate`) added to them.
    ///
    /// # Safety
    /// AVX-512F present; `bases` holds `MR` bases, each with `ci` reads valid at `x +
    /// base + steps[t]` for each listed tap `t`; `b` valid for `ci·NR` at `t·ci·NR` for
    /// each listed tap; `rows` holds `MR` rows, `c` valid for `cols` values at
    /// `row·ldc` for each of the first `used`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn kernel_taps(
        ci: usize,
        list: &[usize],
        steps: &[isize],
        x: *const f32,
        bases: *const isize,
        b: *const f32,
        c: *mut f32,
        rows: *const usize,
        ldc: usize,
        used: usize,
        cols: usize,
        accumulate: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        let base: [*const f32; MR] = std::array::from_fn(|r| x.wrapping_offset(*bases.add(r)));
        for &t in list {
            let step = *steps.get_unchecked(t);
            let ar: [*const f32; MR] = std::array::from_fn(|r| base[r].wrapping_offset(step));
            let mut bp = b.add(t * ci * NR);
            for q in 0..ci {
                let b0 = _mm512_loadu_ps(bp);
                let b1 = _mm512_loadu_ps(bp.add(16));
                bp = bp.add(NR);
                // Unrolled by hand, so that the sums stay in registers.
                macro_rules! rows {
                    ($($r:literal)*) => {$(
                        let av = _mm512_set1_ps(*ar[$r].add(q));
                        acc[$r][0] = _mm512_fmadd_ps(av, b0, acc[$r][0]);
                        acc[$r][1] = _mm512_fmadd_ps(av, b1, acc[$r][1]);
                    )*};
                }
                const _: () = assert!(MR == 12);
                rows!(0 1 2 3 4 5 6 7 8 9 10 11);
            }
        }
        let (m0, m1) = (mask(cols), mask(cols.saturating_sub(16)));
        // Constant indices only, so that the sums stay in registers.
        macro_rules! store {
            ($($r:literal)*) => {$(
                if $r < used {
                    store_row(c.add(*rows.add($r) * ldc), acc[$r], m0, m1, accumulate);
                }
            )*};
        }
        store!(0 1 2 3 4 5 6 7 8 9 10 11);
    }

    /// One tile of [`super::weight_grad`]: `rows` (≤ `MR`) channels, dispatched to a
    /// kernel compiled for that count.
    ///
    /// # Safety
    /// As [`kernel_grad_rows`].
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn kernel_grad(
        rows: usize,
        pixels: usize,
        x: *const f32,
        taps: *const (usize, usize),
        dy: *const f32,
        ldy: usize,
        c: *mut f32,
        ldc: usize,
        cols: usize,
    ) {
        macro_rules! by_rows {
            ($($n:literal)*) => {
                match rows {
                    $($n => kernel_grad_rows::<$n>(pixels, x, taps, dy, ldy, c, ldc, cols),)*
                    _ => unreachable!("a weight-gradient tile of {rows} rows"),
                }
            };
        }
        const _: () = assert!(MR == 12);
        by_rows!(1 2 3 4 5 6 7 8 9 10 11 12)
    }

    /// `R` rows of [`kernel_grad`]: `c[r][..cols] += Σ_i x[o_i + r] · dy[p_i][..cols]`
    /// over the `pixels` pairs `(o_i, p_i)` of `taps`.
    ///
    /// # Safety
    /// AVX-512F present; `taps` valid for `pixels` reads, each with `R` reads at `x + o_i`
    /// valid and `cols` at `dy + p_i·ldy`; `c` valid for `R` rows of stride `ldc`, `cols`
    /// each.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel_grad_rows<const R: usize>(
        pixels: usize,
        x: *const f32,
        taps: *const (usize, usize),
        dy: *const f32,
        ldy: usize,
        c: *mut f32,
        ldc: usize,
        cols: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        let (m0, m1) = (mask(cols), mask(cols.saturating_sub(16)));
        for i in 0..pixels {
            let (o, p) = *taps.add(i);
            let a = x.add(o);
            let row = dy.add(p * ldy);
            let b0 = _mm512_maskz_loadu_ps(m0, row);
            let b1 = _mm512_maskz_loadu_ps(m1, row.add(16));
            macro_rules! rows {
                ($($r:literal)*) => {$(
                    if $r < R {
                        let av = _mm512_set1_ps(*a.add($r));
                        acc[$r][0] = _mm512_fmadd_ps(av, b0, acc[$r][0]);
                        acc[$r][1] = _mm512_fmadd_ps(av, b1, acc[$r][1]);
                    }
                )*};
            }
            rows!(0 1 2 3 4 5 6 7 8 9 10 11);
        }
        // Constant indices only, so that the sums stay in registers.
        macro_rules! store {
            ($($r:literal)*) => {$(
                if $r < R {
                    store_row(c.add($r * ldc), acc[$r], m0, m1, true);
                }
            )*};
        }
        store!(0 1 2 3 4 5 6 7 8 9 10 11);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix;

    /// The tiled product against the f64 sum of the same products: pixels whose window
    /// overhangs the input (a base before it, its first taps left out), several masks (so
    /// several groups and partial tiles), a pixel with no tap inside, and a last block of
    /// fewer than `NR` columns.
    #[test]
    fn gemm_tiles_matches_f64_sums() {
        if !cpu_has_avx512f() {
            eprintln!("fma: no AVX-512F on this CPU, the kernel test did not run");
            return;
        }
        let mut rng = SplitMix(7);
        for (ci, taps, n) in [(5, 3, 45), (40, 9, 64), (1, 2, 7), (3, 64, 33)] {
            let (inputs, pixels): (usize, usize) = (80, 61);
            let x: Vec<f32> = (0..inputs * ci).map(|_| rng.normal() as f32).collect();
            let k = taps * ci;
            let w: Vec<f32> = (0..k * n).map(|_| rng.normal() as f32).collect();
            // Tap t steps t pixels; pixel p's base is p − 3 pixels, so that the first
            // taps of pixels 0..3 fall before the input (and the last taps of the last
            // pixels, with 64 taps, past it).
            let steps: Vec<isize> = (0..taps).map(|t| (t * ci) as isize).collect();
            let mut tiles = Tiles::default();
            tiles.start(steps.iter().copied());
            let mut want_rows = Vec::new();
            for p in 0..pixels {
                let base = (p as isize - 3) * ci as isize;
                let mut mask = 0u64;
                for (t, &step) in steps.iter().enumerate() {
                    let at = base + step;
                    let inside = at >= 0 && at as usize + ci <= x.len();
                    let dropped = (p % 4 == 1 && t % 2 == 0) || (p % 7 == 3 && t == 0) || p == 5;
                    if inside && !dropped {
                        mask |= 1 << t;
                    }
                }
                tiles.push(base, mask);
                want_rows.push((base, mask));
            }
            tiles.group();
            assert!(tiles.len() >= pixels.div_ceil(MR));
            let mut packed = vec![f32::NAN; b_len(k, n)];
            pack_b(&w, k, n, &mut packed);
            let ldc = n + 3;
            let mut c = vec![-7.0f32; pixels * ldc];
            gemm_tiles(&tiles, n, ci, &x, &packed, &mut c, ldc);
            for (p, &(base, mask)) in want_rows.iter().enumerate() {
                for j in 0..n {
                    let mut want = 0f64;
                    for t in (0..taps).filter(|t| mask >> t & 1 == 1) {
                        let o = (base + steps[t]) as usize;
                        for q in 0..ci {
                            want += f64::from(x[o + q]) * f64::from(w[(t * ci + q) * n + j]);
                        }
                    }
                    let got = f64::from(c[p * ldc + j]);
                    assert!(
                        (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                        "ci {ci} taps {taps} ({p},{j}): {got} vs {want}"
                    );
                }
                // The gap past `n` in each row is not written.
                assert!(c[p * ldc + n..(p + 1) * ldc].iter().all(|&v| v == -7.0));
            }
        }
    }

    /// A tap in a pixel's mask that would read outside the input is refused.
    #[test]
    #[should_panic(expected = "reads outside x")]
    fn gemm_tiles_refuses_a_read_outside() {
        if !cpu_has_avx512f() {
            panic!("fma gemm_tiles: a tap reads outside x (no AVX-512F: not run)");
        }
        let mut tiles = Tiles::default();
        tiles.start([0isize, 4]);
        tiles.push(-4, 0b11);
        tiles.group();
        let x = vec![1f32; 8];
        let b = vec![0f32; b_len(2 * 4, 1)];
        let mut c = vec![0f32; 1];
        gemm_tiles(&tiles, 1, 4, &x, &b, &mut c, 1);
    }

    /// The weight gradient against the f64 sums, with taps whose lists are short or
    /// empty, channel tiles of fewer than `MR` rows, a last block of fewer than `NR`
    /// columns, and accumulation.
    #[test]
    fn weight_grad_matches_f64_sums() {
        if !cpu_has_avx512f() {
            eprintln!("fma: no AVX-512F on this CPU, the kernel test did not run");
            return;
        }
        let mut rng = SplitMix(11);
        for (ci, co) in [(5, 45), (12, 32), (29, 70), (1, 3)] {
            let (inputs, taps, pixels) = (37, 4, 53);
            let x: Vec<f32> = (0..inputs * ci).map(|_| rng.normal() as f32).collect();
            let dy: Vec<f32> = (0..pixels * co).map(|_| rng.normal() as f32).collect();
            // Tap t lists every pixel but one in t + 2 (tap 3: none), in order.
            let stride = pixels + 1;
            let mut pairs = vec![(usize::MAX, usize::MAX); taps * stride];
            let mut counts = vec![0; taps];
            for t in 0..taps - 1 {
                for p in (0..pixels).filter(|p| p % (t + 2) != 0) {
                    let o = rng.below(inputs) * ci;
                    pairs[t * stride + counts[t]] = (o, p);
                    counts[t] += 1;
                }
            }
            let start: Vec<f32> = (0..taps * ci * co).map(|_| rng.normal() as f32).collect();
            for accumulate in [false, true] {
                let mut dwt = start.clone();
                weight_grad(
                    &x, ci, &pairs, stride, &counts, &dy, co, &mut dwt, accumulate,
                );
                for t in 0..taps {
                    for q in 0..ci {
                        for j in 0..co {
                            let i = (t * ci + q) * co + j;
                            let mut want = if accumulate { f64::from(start[i]) } else { 0.0 };
                            for &(o, p) in &pairs[t * stride..][..counts[t]] {
                                want += f64::from(x[o + q]) * f64::from(dy[p * co + j]);
                            }
                            let got = f64::from(dwt[i]);
                            assert!(
                                (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                                "ci {ci} co {co} ({t},{q},{j}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
