//! The layers of the convolutional network, forward and backward, on the CPU.
//!
//! Activations are NHWC (`[batch, height, width, channels]`, channels fastest) in plain
//! `f32` slices. On a CPU with AVX-512 the f32 convolutions run on the kernels of
//! [`fma`](super::fma), which read the input pixels in place (no patch matrix).
//! Elsewhere (or with `CIFAR_DF_NO_FMA=1`) a convolution is an im2col product on the
//! `gemm` crate: the patches of a band of output pixels are copied into a small matrix
//! (one row per pixel, `K·K·C_in` columns, zero where the kernel overhangs the border)
//! and multiplied by the weights
//! (`[K·K·C_in, C_out]`, rows ordered kernel row, kernel column, input channel). The band
//! keeps the copied patches in the cache, and the weight gradient and the input gradient
//! are the same kind of product ([`conv_backward`]): the input gradient is the "full"
//! convolution of the output gradient with the kernel turned by 180 degrees, so no
//! scatter (col2im) is needed.
//!
//! The element-wise layers are fused: max pooling keeps the index of each window's
//! maximum; batch normalisation (statistics of the batch, a learnt shift, no scale) and
//! GELU run as one pass forward and one backward ([`bn_gelu_forward`],
//! [`bn_gelu_backward`]). GELU is the exact one (`x·Φ(x)`, as PyTorch's default), with
//! `erf` from Abramowitz & Stegun 7.1.26 (error below 1.5e-7) and a polynomial `exp`, so
//! that the loops vectorise; the hot loops are compiled for AVX-512 and AVX2 too and
//! chosen once per call. Every reduction runs in a fixed order: the same inputs give the
//! same bits, whatever the thread count.
//!
//! With bf16 products, the layers on either side of a convolution hand it bf16 directly
//! ([`Out::Bf16`], [`Grad::Bf16`]): the GELU and batch norm write its input, the pooling
//! and batch norm backward write its output gradient, each converting in the L1 cache the
//! f32 values it computed (the same bits as converting them afterwards, without the f32
//! tensor's round trip through memory).

use super::bf16;
use super::fma;
use crate::linalg;

/// Output pixels per im2col band (about 0.5–1 MB of patches for the default widths).
const BAND_ROWS: usize = 1024;

/// The shape of a convolution: `k`×`k` kernel, `pad` zeros on each side, stride 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    /// Images.
    pub n: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Input channels.
    pub ci: usize,
    /// Output channels.
    pub co: usize,
    /// Kernel size.
    pub k: usize,
    /// Zero padding on each side.
    pub pad: usize,
}

impl ConvShape {
    /// Output height.
    pub fn oh(&self) -> usize {
        self.h + 2 * self.pad + 1 - self.k
    }

    /// Output width.
    pub fn ow(&self) -> usize {
        self.w + 2 * self.pad + 1 - self.k
    }

    /// Columns of the patch matrix (rows of the weights).
    pub fn kdim(&self) -> usize {
        self.k * self.k * self.ci
    }

    /// Multiply-adds of the forward product.
    pub fn macs(&self) -> usize {
        self.n * self.oh() * self.ow() * self.kdim() * self.co
    }

    /// The shape of the input gradient's product: a convolution of the output gradient
    /// (`co` channels) with the turned kernel, `k - 1 - pad` zeros around it.
    fn transposed(&self) -> ConvShape {
        ConvShape {
            n: self.n,
            h: self.oh(),
            w: self.ow(),
            ci: self.co,
            co: self.ci,
            k: self.k,
            pad: self.k - 1 - self.pad,
        }
    }
}

/// Copies the patches of output pixels `first..first + rows` (numbered over the whole
/// batch, row-major in each image) into `col` (`rows × k·k·ci`).
fn im2col(x: &[f32], s: &ConvShape, first: usize, rows: usize, col: &mut [f32]) {
    im2col_any(x, s, first, rows, col, s.kdim())
}

/// [`im2col`] of any element (f32, or bf16 bits) into rows of stride `ld` (at least
/// `k·k·ci`; the padding past `k·k·ci` zero).
fn im2col_any<T: Copy + Default>(
    x: &[T],
    s: &ConvShape,
    first: usize,
    rows: usize,
    col: &mut [T],
    ld: usize,
) {
    let (oh, ow, ci, k) = (s.oh(), s.ow(), s.ci, s.k);
    let kdim = s.kdim();
    let per_image = oh * ow;
    let zero = T::default();
    for r in 0..rows {
        let p = first + r;
        let (img, rest) = (p / per_image, p % per_image);
        let (oy, ox) = (rest / ow, rest % ow);
        let dst = &mut col[r * ld..(r + 1) * ld];
        // (Empty fills skipped: most rows have none, and each is a call to memset.)
        if ld > kdim {
            dst[kdim..].fill(zero);
        }
        let base = img * s.h * s.w * ci;
        for ky in 0..k {
            let iy = (oy + ky) as isize - s.pad as isize;
            let row = &mut dst[ky * k * ci..(ky + 1) * k * ci];
            if iy < 0 || iy >= s.h as isize {
                row.fill(zero);
                continue;
            }
            let iy = iy as usize;
            // The kernel row's pixels that fall inside the image are contiguous.
            let x0 = ox as isize - s.pad as isize;
            let lo = (-x0).max(0) as usize;
            let hi = ((s.w as isize - x0).min(k as isize)).max(lo as isize) as usize;
            if lo > 0 {
                row[..lo * ci].fill(zero);
            }
            if hi < k {
                row[hi * ci..].fill(zero);
            }
            if hi > lo {
                let src = base + (iy * s.w + (x0 + lo as isize) as usize) * ci;
                row[lo * ci..hi * ci].copy_from_slice(&x[src..src + (hi - lo) * ci]);
            }
        }
    }
}

/// `x` as bf16 bits in `out` (grown to fit): the input of the bf16 products, converted
/// once (each value is in up to `k·k` patches).
/// The buffer holds `u32`s, so that an even count of values can be read as pairs.
fn to_bf16_buf<'a>(x: &[f32], out: &'a mut Vec<u32>) -> &'a [u16] {
    let words = grown(out, x.len().div_ceil(2));
    let o = &mut bytemuck::cast_slice_mut::<u32, u16>(words)[..x.len()];
    // Two halves on two threads for large tensors (the halves do not depend on the count).
    const HALF: usize = 1 << 16;
    if x.len() >= 2 * HALF && linalg::threads() > 1 {
        let mid = x.len() / 2;
        let (o1, o2) = o.split_at_mut(mid);
        std::thread::scope(|sc| {
            sc.spawn(|| bf16::convert(&x[mid..], o2));
            bf16::convert(&x[..mid], o1);
        });
    } else {
        bf16::convert(x, o);
    }
    o
}

/// `c (m×n) = a (m×k) · b (k×n) + beta·c`, all row-major slices.
fn matmul(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], beta: f32, c: &mut [f32]) {
    let a = ndarray::ArrayView2::from_shape((m, k), &a[..m * k]).expect("matmul: a");
    let b = ndarray::ArrayView2::from_shape((k, n), &b[..k * n]).expect("matmul: b");
    let mut c = ndarray::ArrayViewMut2::from_shape((m, n), &mut c[..m * n]).expect("matmul: c");
    linalg::gemm(1.0, &a, &b, beta, &mut c);
}

/// `c (m×n) = aᵀ · b + beta·c` where `a` is `k×m` and `b` is `k×n`, row-major.
fn matmul_tn(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], beta: f32, c: &mut [f32]) {
    let a = ndarray::ArrayView2::from_shape((k, m), &a[..k * m]).expect("matmul_tn: a");
    let b = ndarray::ArrayView2::from_shape((k, n), &b[..k * n]).expect("matmul_tn: b");
    let mut c = ndarray::ArrayViewMut2::from_shape((m, n), &mut c[..m * n]).expect("matmul_tn: c");
    linalg::gemm(1.0, &a.t(), &b, beta, &mut c);
}

/// How the convolutions multiply: in f32 (the [`fma`] kernels, or the `gemm` crate), or
/// with bf16 inputs and f32 sums on AVX512-BF16 ([`bf16`](super::bf16)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kernel {
    /// f32 products: the [`fma`] kernels on AVX-512, the `gemm` crate elsewhere (any
    /// CPU).
    #[default]
    F32,
    /// bf16 × bf16 → f32 products with `vdpbf16ps` (AVX512-BF16).
    Avx512Bf16,
    /// The same products on Intel AMX's tiles (`tdpbf16ps`, [`amx`](super::amx)), the
    /// conversions on AVX512-BF16.
    AmxBf16,
}

impl Kernel {
    /// The kernel's name as the run records it.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::F32 => "f32",
            Kernel::Avx512Bf16 => "avx512-bf16",
            Kernel::AmxBf16 => "amx-bf16",
        }
    }

    /// The unit its bf16 products run on.
    fn unit(self) -> bf16::Unit {
        match self {
            Kernel::AmxBf16 => bf16::Unit::Amx,
            _ => bf16::Unit::Avx512,
        }
    }

    /// Whether it rounds the products' inputs to bf16.
    pub fn is_bf16(self) -> bool {
        self != Kernel::F32
    }

    /// Whether this CPU runs it.
    pub fn available(self) -> bool {
        match self {
            Kernel::F32 => true,
            Kernel::Avx512Bf16 => super::bf16::available(),
            Kernel::AmxBf16 => super::amx::available() && super::bf16::available(),
        }
    }

    /// Whether its products can run now: [`Kernel::available`], or, in the unit tests,
    /// AMX on the tests' stand-in for the tile unit.
    pub fn runs_here(self) -> bool {
        #[cfg(test)]
        if self == Kernel::AmxBf16 && super::amx::emulate::installed() {
            return true;
        }
        self.available()
    }

    /// The fastest bf16 kernel this CPU runs, if any: AMX, else AVX512-BF16.
    pub fn best_bf16() -> Option<Kernel> {
        [Kernel::AmxBf16, Kernel::Avx512Bf16]
            .into_iter()
            .find(|k| k.available())
    }

    /// The kernel `precision = "auto"` takes: AMX where the CPU lends it (PyTorch's bf16
    /// on AMX was 2.3x and 3.2x its fastest f32 on an AMX Xeon, issue 35), else
    /// AVX512-BF16 where that is faster than f32 on this CPU
    /// ([`super::bf16::faster_than_f32`]), else f32.
    pub fn auto() -> Kernel {
        match Kernel::best_bf16() {
            Some(Kernel::AmxBf16) => Kernel::AmxBf16,
            Some(k) if super::bf16::faster_than_f32() => k,
            _ => Kernel::F32,
        }
    }
}

/// Reusable buffers for the products (the patch matrix of one band, packed operands)
/// and the kernel they use.
#[derive(Default)]
pub struct Scratch {
    kernel: Kernel,
    col: Vec<f32>,
    packed_a: Vec<u32>,
    packed_b: Vec<u32>,
    acc: Vec<f32>,
    tmp: Vec<u32>,
    dyt: Vec<u32>,
    input: Vec<u32>,
    grad_in: Vec<u32>,
    offs: Vec<usize>,
    packed_f32: Vec<f32>,
    pairs: Vec<(usize, usize)>,
    tiles: fma::Tiles,
}

impl Scratch {
    /// Buffers for products on `kernel`, which must be [`Kernel::available`].
    pub fn new(kernel: Kernel) -> Scratch {
        Scratch {
            kernel,
            ..Scratch::default()
        }
    }

    /// A scratch from the process's pool (its buffers already grown by earlier products,
    /// so no new pages are mapped and zeroed), set to `kernel`; give it back with
    /// [`Scratch::recycle`]. The helper threads of a product, each started anew, and the
    /// scoring passes use these.
    pub(crate) fn pooled(kernel: Kernel) -> Scratch {
        let mut s = SPARE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_default();
        s.kernel = kernel;
        s
    }

    /// Returns a scratch to the pool (which keeps at most [`SPARES`]).
    pub(crate) fn recycle(self) {
        let mut pool = SPARE.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < SPARES {
            pool.push(self);
        }
    }

    /// The kernel.
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    fn col(&mut self, len: usize) -> &mut [f32] {
        if self.col.len() < len {
            self.col.resize(len, 0.0);
        }
        &mut self.col[..len]
    }
}

/// Scratches kept for reuse by [`Scratch::pooled`].
static SPARE: std::sync::Mutex<Vec<Scratch>> = std::sync::Mutex::new(Vec::new());

/// The most scratches [`SPARE`] keeps: one per helper thread and a scoring pass, with
/// room for a second model in the same process.
const SPARES: usize = 4;

/// `v[..len]`, grown (never shrunk) to hold it.
pub(super) fn grown<T: Copy + Default>(v: &mut Vec<T>, len: usize) -> &mut [T] {
    if v.len() < len {
        v.resize(len, T::default());
    }
    &mut v[..len]
}

/// `y = conv(x, wt)` (no bias): `x` is `[n, h, w, ci]`, `wt` `[k·k·ci, co]`, `y`
/// `[n, oh, ow, co]`. The bands of output pixels are shared out over up to
/// [`linalg::threads`] threads; each band is computed the same way whatever the count.
pub fn conv_forward(x: &[f32], wt: &[f32], s: &ConvShape, y: &mut [f32], scratch: &mut Scratch) {
    conv_forward_kept(x, wt, s, y, scratch, None)
}

/// [`conv_forward`], keeping the bf16 copy of `x` that a bf16 product makes in `keep`
/// (when given) for [`conv_backward_kept`], which then need not make it again.
pub fn conv_forward_kept(
    x: &[f32],
    wt: &[f32],
    s: &ConvShape,
    y: &mut [f32],
    scratch: &mut Scratch,
    keep: Option<&mut Vec<u32>>,
) {
    let total = s.n * s.oh() * s.ow();
    debug_assert_eq!(x.len(), s.n * s.h * s.w * s.ci);
    debug_assert_eq!(wt.len(), s.kdim() * s.co);
    debug_assert_eq!(y.len(), total * s.co);
    if scratch.kernel.is_bf16() {
        let mut own = std::mem::take(&mut scratch.input);
        let xb = keep.unwrap_or(&mut own);
        forward_bf16(to_bf16_buf(x, xb), wt, s, y, scratch);
        scratch.input = own;
        return;
    }
    if uses_fma(s) {
        // The weights packed once, shared by the threads.
        let mut wb = std::mem::take(&mut scratch.packed_f32);
        let len = fma::b_len(s.kdim(), s.co);
        fma::pack_b(wt, s.kdim(), s.co, grown(&mut wb, len));
        over_bands(
            total,
            fma_band(total),
            s.co,
            y,
            scratch,
            |first, rows, out, sc| forward_bands_fma(x, &wb[..len], s, first, rows, out, sc),
        );
        scratch.packed_f32 = wb;
        return;
    }
    over_bands(
        total,
        BAND_ROWS,
        s.co,
        y,
        scratch,
        |first, rows, out, sc| forward_bands(x, wt, s, first, rows, out, sc),
    );
}

/// [`conv_forward`] of an input already in bf16 (`xh`, written so by the layer before:
/// [`Out::Bf16`]), on the bf16 kernel `scratch` holds.
///
/// # Panics
/// If `scratch`'s kernel is not a bf16 one, or `xh` is not the shape's input.
pub fn conv_forward_bf16(
    xh: &[u16],
    wt: &[f32],
    s: &ConvShape,
    y: &mut [f32],
    scratch: &mut Scratch,
) {
    assert!(
        scratch.kernel.is_bf16(),
        "conv_forward_bf16 on the f32 kernel"
    );
    assert_eq!(
        xh.len(),
        s.n * s.h * s.w * s.ci,
        "conv_forward_bf16: the input"
    );
    assert_eq!(
        y.len(),
        s.n * s.oh() * s.ow() * s.co,
        "conv_forward_bf16: the output"
    );
    forward_bf16(xh, wt, s, y, scratch)
}

/// [`conv_forward`] in bf16 of an input already in bf16 (`xh`).
fn forward_bf16(xh: &[u16], wt: &[f32], s: &ConvShape, y: &mut [f32], scratch: &mut Scratch) {
    let total = s.n * s.oh() * s.ow();
    // The weights packed once, shared by the threads.
    let mut wb = std::mem::take(&mut scratch.packed_b);
    let len = bf16::b_len(s.kdim(), s.co);
    bf16::pack_b(wt, s.kdim(), s.co, s.co, grown(&mut wb, len));
    let band = balanced_band(total, bf16_band_rows(s.kdim()), bf16::MR);
    over_bands(total, band, s.co, y, scratch, |first, rows, out, sc| {
        forward_bands_bf16(xh, &wb[..len], s, first, rows, band, out, sc)
    });
    scratch.packed_b = wb;
}

/// Output rows `0..total` (of `width` values each) in bands of `band` rows, shared out
/// over up to [`linalg::threads`] threads as contiguous runs of whole bands: `f(first,
/// rows, out, scratch)` computes rows `first..first + rows` into `out`. Each band is
/// computed the same way whatever the thread count.
fn over_bands(
    total: usize,
    band: usize,
    width: usize,
    y: &mut [f32],
    scratch: &mut Scratch,
    f: impl Fn(usize, usize, &mut [f32], &mut Scratch) + Sync,
) {
    let bands = total.div_ceil(band);
    let threads = linalg::threads().min(bands).max(1);
    if threads == 1 {
        f(0, total, y, scratch);
        return;
    }
    let per = bands.div_ceil(threads) * band;
    let kernel = scratch.kernel;
    std::thread::scope(|sc| {
        let mut rest = y;
        let mut first = 0;
        let mut jobs = Vec::new();
        while first < total {
            let rows = per.min(total - first);
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(rows * width);
            rest = tail;
            jobs.push((first, rows, mine));
            first += rows;
        }
        let mut jobs = jobs.into_iter();
        let own = jobs.next();
        let f = &f;
        for (first, rows, out) in jobs {
            sc.spawn(move || {
                let mut local = Scratch::pooled(kernel);
                f(first, rows, out, &mut local);
                local.recycle();
            });
        }
        if let Some((first, rows, out)) = own {
            f(first, rows, out, scratch);
        }
    });
}

/// Output pixels per band of the bf16 product: the bf16 patches of a band about
/// 512 KB (in the L2 cache while the weights' blocks pass), a whole number of kernel
/// tiles, at most [`BAND_ROWS`].
fn bf16_band_rows(kdim: usize) -> usize {
    let rows = (512 * 1024 / (2 * kdim.max(1))) / bf16::MR * bf16::MR;
    rows.clamp(bf16::MR, BAND_ROWS)
}

/// [`tap_pixels`]' mark of a tap that falls in the zero padding.
const OUTSIDE: usize = bf16::OUTSIDE;

/// For each output pixel `first..first + count` (numbered over the batch), the input
/// pixel each of the `k·k` taps reads (numbered over the batch, in the patch matrix's
/// order) times `scale`, or `outside` where the tap falls in the zero padding:
/// `put(r, taps)` for the pixel `first + r`.
fn tap_pixels(
    s: &ConvShape,
    first: usize,
    count: usize,
    scale: usize,
    outside: usize,
    mut put: impl FnMut(usize, &[usize]),
) {
    let (oh, ow, k) = (s.oh(), s.ow(), s.k);
    let taps = k * k;
    // The taps' steps from the window's first pixel, for windows wholly inside.
    let steps: Vec<usize> = (0..taps).map(|t| ((t / k) * s.w + t % k) * scale).collect();
    let mut o = vec![0usize; taps];
    // The first pixel's place, then a step at a time.
    let (mut img, rest) = (first / (oh * ow), first % (oh * ow));
    let (mut oy, mut ox) = (rest / ow, rest % ow);
    for r in 0..count {
        let (y0, x0) = (
            (oy as isize) - s.pad as isize,
            (ox as isize) - s.pad as isize,
        );
        let inside = y0 >= 0 && x0 >= 0 && (y0 as usize) + k <= s.h && (x0 as usize) + k <= s.w;
        if inside {
            let base = ((img * s.h + y0 as usize) * s.w + x0 as usize) * scale;
            for (v, &st) in o.iter_mut().zip(&steps) {
                *v = base + st;
            }
        } else {
            for (ky, row) in o.chunks_exact_mut(k).enumerate() {
                let iy = (oy + ky).wrapping_sub(s.pad);
                if iy >= s.h {
                    row.fill(outside);
                    continue;
                }
                let base = (img * s.h + iy) * s.w;
                for (kx, v) in row.iter_mut().enumerate() {
                    let ix = (ox + kx).wrapping_sub(s.pad);
                    *v = if ix < s.w {
                        (base + ix) * scale
                    } else {
                        outside
                    };
                }
            }
        }
        put(r, &o);
        ox += 1;
        if ox == ow {
            (ox, oy) = (0, oy + 1);
            if oy == oh {
                (oy, img) = (0, img + 1);
            }
        }
    }
}

/// Output pixels per band of the bf16 product without a patch matrix: 24 tiles of the
/// kernel, whose pointers are built once and used for every block of output channels.
const TAP_BAND: usize = 24 * bf16::MR;

/// [`forward_bands`] with bf16 products: `wb` is the weights packed by [`bf16::pack_b`].
#[allow(clippy::too_many_arguments)]
fn forward_bands_bf16(
    x: &[u16],
    wb: &[u32],
    s: &ConvShape,
    first: usize,
    rows: usize,
    band: usize,
    y: &mut [f32],
    scratch: &mut Scratch,
) {
    let kdim = s.kdim();
    if s.ci.is_multiple_of(2) {
        // Pairs of channels: no patch matrix, the kernel reads the pixels in place.
        let (ci2, taps) = (s.ci / 2, s.k * s.k);
        let xp: &[u32] = bytemuck::cast_slice(x);
        let mut done = 0;
        while done < rows {
            let r = TAP_BAND.min(rows - done);
            // The offsets in tiles of the kernel's rows, tap by tap (rows past the band
            // read the padding).
            let offs = grown(&mut scratch.offs, r.div_ceil(bf16::MR) * bf16::MR * taps);
            offs.fill(xp.len());
            tap_pixels(s, first + done, r, ci2, xp.len(), |p, v| {
                let (tile, row) = (p / bf16::MR, p % bf16::MR);
                for (t, &o) in v.iter().enumerate() {
                    offs[(tile * taps + t) * bf16::MR + row] = o;
                }
            });
            bf16::gemm_taps(
                scratch.kernel.unit(),
                r,
                s.co,
                ci2,
                taps,
                xp,
                offs,
                wb,
                &mut y[done * s.co..(done + r) * s.co],
                s.co,
            );
            done += r;
        }
        return;
    }
    let lda = bf16::pairs(kdim);
    let mut done = 0;
    while done < rows {
        let r = band.min(rows - done);
        let a = grown(&mut scratch.packed_a, r * lda);
        im2col_any(x, s, first + done, r, bytemuck::cast_slice_mut(a), 2 * lda);
        bf16::gemm(
            scratch.kernel.unit(),
            r,
            s.co,
            kdim,
            a,
            lda,
            wb,
            &mut y[done * s.co..(done + r) * s.co],
            s.co,
            false,
        );
        done += r;
    }
}

/// Output pixels per band of the f32 product without a patch matrix: enough that most
/// of a band's tiles are full once its pixels are grouped by the taps they skip
/// ([`fma::Tiles`]), and its input pixels stay in the L2 cache.
const FMA_BAND: usize = 96 * fma::MR;

/// The band of [`forward_bands_fma`] for `total` output pixels: at most [`FMA_BAND`].
/// (A pixel's sum does not depend on its band.)
fn fma_band(total: usize) -> usize {
    balanced_band(total, FMA_BAND, fma::MR)
}

/// A band of at most `most` rows (a multiple of `grain`) for [`over_bands`] of `total`
/// rows, such that each thread gets the same number of bands of about the same size:
/// the threads then finish together (cut at a fixed size, a 7×7 layer's 12,544 pixels of
/// a batch of 256 went 6,912 to one thread and 5,632 to the other).
fn balanced_band(total: usize, most: usize, grain: usize) -> usize {
    let per_thread = total.div_ceil(linalg::threads().max(1));
    let bands = per_thread.div_ceil(most.max(1)).max(1);
    (per_thread.div_ceil(bands).div_ceil(grain) * grain).clamp(grain, most.max(grain))
}

/// [`forward_bands`] on the AVX-512 f32 kernel without a patch matrix ([`fma`]): `wb` is
/// the weights packed by [`fma::pack_b`].
fn forward_bands_fma(
    x: &[f32],
    wb: &[f32],
    s: &ConvShape,
    first: usize,
    rows: usize,
    y: &mut [f32],
    scratch: &mut Scratch,
) {
    let band = fma_band(s.n * s.oh() * s.ow());
    let windows = Windows::new(s);
    let mut done = 0;
    while done < rows {
        let r = band.min(rows - done);
        let tiles = &mut scratch.tiles;
        tiles.start(windows.steps.iter().copied());
        windows.each(first + done, r, |base, mask| tiles.push(base, mask));
        tiles.group();
        fma::gemm_tiles(
            tiles,
            s.co,
            s.ci,
            x,
            wb,
            &mut y[done * s.co..(done + r) * s.co],
            s.co,
        );
        done += r;
    }
}

/// Whether the f32 products of `s` run on the [`fma`] kernels: the CPU has them, and
/// the kernel has at most [`fma::Tiles::MAX_TAPS`] taps.
fn uses_fma(s: &ConvShape) -> bool {
    fma::available() && s.k * s.k <= fma::Tiles::MAX_TAPS
}

/// Where each output pixel's window lies in the input of a convolution, for the
/// kernels without a patch matrix ([`fma`]): tap `t` of a pixel reads the input pixel at
/// `base + steps[t]` (in f32s), and its `mask` has bit `t` set where that tap falls
/// inside the image (not in the zero padding).
struct Windows {
    s: ConvShape,
    steps: Vec<isize>,
    /// Per output row / column, the taps whose kernel row / column falls inside.
    row_mask: Vec<u64>,
    col_mask: Vec<u64>,
}

impl Windows {
    /// The windows of `s`, whose `k·k` is at most [`fma::Tiles::MAX_TAPS`].
    fn new(s: &ConvShape) -> Windows {
        let (k, pad) = (s.k, s.pad);
        assert!(k * k <= fma::Tiles::MAX_TAPS, "Windows: a {k}×{k} kernel");
        let inside = |o: usize, size: usize, along: bool| -> u64 {
            (0..k * k)
                .filter(|&t| {
                    let d = if along { t / k } else { t % k };
                    (o + d).wrapping_sub(pad) < size
                })
                .fold(0, |m, t| m | 1 << t)
        };
        Windows {
            s: *s,
            steps: (0..k * k)
                .map(|t| (((t / k) * s.w + t % k) * s.ci) as isize)
                .collect(),
            row_mask: (0..s.oh()).map(|oy| inside(oy, s.h, true)).collect(),
            col_mask: (0..s.ow()).map(|ox| inside(ox, s.w, false)).collect(),
        }
    }

    /// `f(base, mask)` for the output pixels `first..first + count` (numbered over the
    /// batch), in order.
    fn each(&self, first: usize, count: usize, mut f: impl FnMut(isize, u64)) {
        let s = &self.s;
        let (oh, ow) = (s.oh(), s.ow());
        let (mut img, rest) = (first / (oh * ow), first % (oh * ow));
        let (mut oy, mut ox) = (rest / ow, rest % ow);
        for _ in 0..count {
            let y0 = (img * s.h + oy) as isize - s.pad as isize;
            let base = (y0 * s.w as isize + ox as isize - s.pad as isize) * s.ci as isize;
            f(base, self.row_mask[oy] & self.col_mask[ox]);
            ox += 1;
            if ox == ow {
                (ox, oy) = (0, oy + 1);
                if oy == oh {
                    (oy, img) = (0, img + 1);
                }
            }
        }
    }
}

/// Output pixels `first..first + rows` of [`conv_forward`] into `y` (their rows only).
fn forward_bands(
    x: &[f32],
    wt: &[f32],
    s: &ConvShape,
    first: usize,
    rows: usize,
    y: &mut [f32],
    scratch: &mut Scratch,
) {
    let kdim = s.kdim();
    let mut done = 0;
    while done < rows {
        let r = BAND_ROWS.min(rows - done);
        let col = scratch.col(r * kdim);
        im2col(x, s, first + done, r, col);
        matmul(
            r,
            kdim,
            s.co,
            col,
            wt,
            0.0,
            &mut y[done * s.co..(done + r) * s.co],
        );
        done += r;
    }
}

/// The weights of the input gradient's product: `wt` (`[k·k·ci, co]`) turned by 180
/// degrees and transposed, `[k·k·co, ci]`.
pub fn turned_weights(wt: &[f32], s: &ConvShape) -> Vec<f32> {
    let (k, ci, co) = (s.k, s.ci, s.co);
    let mut out = vec![0.0f32; k * k * co * ci];
    for ky in 0..k {
        for kx in 0..k {
            let src_tap = (k - 1 - ky) * k + (k - 1 - kx);
            let dst_tap = ky * k + kx;
            transpose_into(
                &wt[src_tap * ci * co..(src_tap + 1) * ci * co],
                ci,
                co,
                &mut out[dst_tap * co * ci..(dst_tap + 1) * co * ci],
            );
        }
    }
    out
}

/// `dst[j·rows + i] = src[i·cols + j]`: a `rows × cols` matrix transposed, in tiles
/// that stay in the L1 cache.
fn transpose_into(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    const T: usize = 16;
    assert!(src.len() >= rows * cols && dst.len() >= rows * cols);
    for i0 in (0..rows).step_by(T) {
        for j0 in (0..cols).step_by(T) {
            for i in i0..(i0 + T).min(rows) {
                for j in j0..(j0 + T).min(cols) {
                    dst[j * rows + i] = src[i * cols + j];
                }
            }
        }
    }
}

/// Groups of bands whose weight gradients are summed separately, then added: a fixed
/// number, so that the sum's order does not depend on the thread count.
const WEIGHT_GROUPS: usize = 2;

/// The weight gradient's groups start at multiples of this many output pixels: whole
/// bands of the f32 kernel ([`FMA_GRAD_BAND`]), and even (the bf16 product's pairs of
/// pixels never straddle two groups).
const GROUP_GRAIN: usize = 128;

/// The gradients of [`conv_forward`]: `dwt = Σ patches(x)ᵀ · dy` (overwritten), and,
/// when `dx` is given, `dx = conv(dy, turned weights)` (overwritten). `turned` is
/// [`turned_weights`] of `wt`.
pub fn conv_backward(
    x: &[f32],
    dy: &[f32],
    turned: &[f32],
    s: &ConvShape,
    dwt: &mut [f32],
    dx: Option<&mut [f32]>,
    scratch: &mut Scratch,
) {
    conv_backward_kept(x, None, Grad::F32(dy), turned, s, dwt, dx, scratch)
}

/// [`conv_backward`] given the bf16 copy of the input kept by [`conv_forward_kept`] or
/// written by the layer before (used when the product is in bf16 and the copy holds the
/// whole input; `x` is then not read and may be empty), and the output gradient in f32 or
/// already in bf16 (written so by the layer after: [`maxpool2_backward_bf16`],
/// [`bn_gelu_backward`]'s `out`).
#[allow(clippy::too_many_arguments)]
pub fn conv_backward_kept(
    x: &[f32],
    kept: Option<&[u32]>,
    dy: Grad,
    turned: &[f32],
    s: &ConvShape,
    dwt: &mut [f32],
    dx: Option<&mut [f32]>,
    scratch: &mut Scratch,
) {
    let total = s.n * s.oh() * s.ow();
    debug_assert_eq!(dy.len(), total * s.co);
    debug_assert_eq!(dwt.len(), s.kdim() * s.co);
    // Groups of equal size (to a multiple of GROUP_GRAIN), so that the two threads
    // finish together.
    let groups = if total >= 2 * GROUP_GRAIN {
        WEIGHT_GROUPS
    } else {
        1
    };
    let per = total.div_ceil(groups).div_ceil(GROUP_GRAIN) * GROUP_GRAIN;
    let ranges: Vec<(usize, usize)> = (0..groups)
        .map(|g| (g * per, ((g + 1) * per).min(total)))
        .filter(|(a, b)| a < b)
        .collect();
    if scratch.kernel.is_bf16() {
        let Some(dx) = dx else {
            // Only the weight gradient: its pairs straight from the gradient as it is.
            weight_grad_bf16(x, kept, dy, s, &ranges, dwt, scratch);
            return;
        };
        // The output gradient in bf16 (once, for both products, if it is not yet).
        let mut dyb = std::mem::take(&mut scratch.grad_in);
        let dyh = match dy {
            Grad::F32(g) => to_bf16_buf(g, &mut dyb),
            Grad::Bf16(g) => g,
        };
        weight_grad_bf16(x, kept, Grad::Bf16(dyh), s, &ranges, dwt, scratch);
        let t = s.transposed();
        debug_assert_eq!(t.oh(), s.h);
        forward_bf16(dyh, turned, &t, dx, scratch);
        scratch.grad_in = dyb;
        return;
    }
    let widened: Vec<f32>;
    let dy = match dy {
        Grad::F32(g) => g,
        Grad::Bf16(g) => {
            widened = g.iter().map(|&h| bf16::from_bf16(h)).collect();
            &widened
        }
    };
    let mut partial = vec![0.0f32; if ranges.len() > 1 { dwt.len() } else { 0 }];
    if linalg::threads() < 2 || ranges.len() < 2 {
        weight_grad_bands(x, dy, s, ranges[0], dwt, scratch);
        if ranges.len() > 1 {
            weight_grad_bands(x, dy, s, ranges[1], &mut partial, scratch);
        }
    } else {
        std::thread::scope(|sc| {
            let (r1, p) = (ranges[1], &mut partial);
            sc.spawn(move || {
                let mut local = Scratch::pooled(Kernel::F32);
                weight_grad_bands(x, dy, s, r1, p, &mut local);
                local.recycle();
            });
            weight_grad_bands(x, dy, s, ranges[0], dwt, scratch);
        });
    }
    if ranges.len() > 1 {
        for (d, p) in dwt.iter_mut().zip(&partial) {
            *d += p;
        }
    }
    if let Some(dx) = dx {
        let t = s.transposed();
        debug_assert_eq!(t.oh(), s.h);
        conv_forward(dy, turned, &t, dx, scratch);
    }
}

/// [`conv_backward`]'s weight gradient with bf16 products: per group of bands (the
/// ranges), `dwtᵀ (co × kdim) = Σ dyᵀ · patches(x)` (the sum over pixels is the
/// product's `k`, in pairs), then the groups added in order and turned into `dwt`.
fn weight_grad_bf16(
    x: &[f32],
    kept: Option<&[u32]>,
    dy: Grad,
    s: &ConvShape,
    ranges: &[(usize, usize)],
    dwt: &mut [f32],
    scratch: &mut Scratch,
) {
    let (kdim, co) = (s.kdim(), s.co);
    let mut xb = std::mem::take(&mut scratch.input);
    let len = s.n * s.h * s.w * s.ci;
    let x: &[u16] = match kept {
        Some(k) if 2 * k.len() >= len => &bytemuck::cast_slice(k)[..len],
        _ => {
            assert_eq!(x.len(), len, "conv_backward: the input");
            to_bf16_buf(x, &mut xb)
        }
    };
    let mut acc = std::mem::take(&mut scratch.acc);
    grown(&mut acc, ranges.len() * co * kdim);
    let parts = &mut acc[..ranges.len() * co * kdim];
    if linalg::threads() < 2 || ranges.len() < 2 {
        for (r, part) in ranges.iter().zip(parts.chunks_exact_mut(co * kdim)) {
            weight_grad_bands_bf16(x, dy, s, *r, part, scratch);
        }
    } else {
        let kernel = scratch.kernel;
        std::thread::scope(|sc| {
            let mut chunks = parts.chunks_exact_mut(co * kdim);
            let own = chunks.next();
            for (r, part) in ranges[1..].iter().zip(chunks) {
                sc.spawn(move || {
                    let mut local = Scratch::pooled(kernel);
                    weight_grad_bands_bf16(x, dy, s, *r, part, &mut local);
                    local.recycle();
                });
            }
            if let Some(part) = own {
                weight_grad_bands_bf16(x, dy, s, ranges[0], part, scratch);
            }
        });
    }
    // The groups added in order (into the first), then turned.
    let (first, rest) = parts.split_at_mut(co * kdim);
    for part in rest.chunks_exact(co * kdim) {
        for (a, &b) in first.iter_mut().zip(part) {
            *a += b;
        }
    }
    transpose_into(first, co, kdim, dwt);
    scratch.acc = acc;
    scratch.input = xb;
}

/// `dwtᵀ = Σ dyᵀ · patches(x)` over output pixels `range` (overwritten), `[co, kdim]`:
/// per band of pixels, `B` is the patches of each pair of pixels interleaved, written
/// straight from the bf16 input (no patch matrix), and `A` the output gradient turned
/// into pairs of pixels.
fn weight_grad_bands_bf16(
    x: &[u16],
    dy: Grad,
    s: &ConvShape,
    (start, end): (usize, usize),
    dwt_t: &mut [f32],
    scratch: &mut Scratch,
) {
    let (kdim, co, ci, taps) = (s.kdim(), s.co, s.ci, s.k * s.k);
    let ldb = kdim.div_ceil(bf16::NR) * bf16::NR;
    let mut first = start;
    let mut rows_b = std::mem::take(&mut scratch.packed_b);
    let mut tmp = std::mem::take(&mut scratch.tmp);
    let mut dyt = std::mem::take(&mut scratch.dyt);
    let mut pix = std::mem::take(&mut scratch.offs);
    while first < end {
        let rows = GRAD_BAND.min(end - first);
        let k2 = bf16::pairs(rows);
        let b = grown(&mut rows_b, k2 * ldb);
        let px = grown(&mut pix, rows * taps);
        tap_pixels(s, first, rows, 1, OUTSIDE, |p, v| {
            px[p * taps..(p + 1) * taps].copy_from_slice(v)
        });
        for (q, brow) in b.chunks_exact_mut(ldb).enumerate() {
            let (p0, p1) = (2 * q, 2 * q + 1);
            let hi = (p1 < rows).then(|| &px[p1 * taps..(p1 + 1) * taps]);
            bf16::interleave_taps(x, ci, &px[p0 * taps..(p0 + 1) * taps], hi, brow);
        }
        let (a, r) = (grown(&mut dyt, co * k2), first * co..(first + rows) * co);
        match dy {
            Grad::F32(g) => bf16::transpose_pairs(&g[r], rows, co, a, k2, &mut tmp),
            Grad::Bf16(g) => bf16::transpose_pairs_bf16(&g[r], rows, co, a, k2, &mut tmp),
        }
        bf16::gemm_pair_rows(
            scratch.kernel.unit(),
            co,
            kdim,
            rows,
            &dyt[..co * k2],
            k2,
            &rows_b[..k2 * ldb],
            ldb,
            dwt_t,
            kdim,
            first != start,
        );
        first += rows;
    }
    if start >= end {
        dwt_t.fill(0.0);
    }
    scratch.packed_b = rows_b;
    scratch.tmp = tmp;
    scratch.dyt = dyt;
    scratch.offs = pix;
}

/// An output gradient, in f32 or already in bf16.
#[derive(Clone, Copy)]
pub enum Grad<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// bf16 bits, as [`bf16::convert`] writes them.
    Bf16(&'a [u16]),
}

impl Grad<'_> {
    fn len(&self) -> usize {
        match self {
            Grad::F32(g) => g.len(),
            Grad::Bf16(g) => g.len(),
        }
    }
}

/// Output pixels per band of the bf16 weight gradient: one block of the product's `k`
/// (its sums go through memory once per band), an even number (pairs of pixels do not
/// straddle two bands).
const GRAD_BAND: usize = 384;

/// Output pixels per band of [`weight_grad_bands_fma`]: a band's rows of `dy` (one block
/// of `NR` columns) and the input pixels its taps read stay in the L1 cache while the
/// tiles of taps and channels pass.
const FMA_GRAD_BAND: usize = 128;

/// [`weight_grad_bands`] on the AVX-512 kernel without a patch matrix
/// ([`fma::weight_grad`]).
fn weight_grad_bands_fma(
    x: &[f32],
    dy: &[f32],
    s: &ConvShape,
    (start, end): (usize, usize),
    dwt: &mut [f32],
    scratch: &mut Scratch,
) {
    let taps = s.k * s.k;
    let windows = Windows::new(s);
    let mut counts = vec![0usize; taps];
    let mut px = Vec::with_capacity(FMA_GRAD_BAND);
    let mut first = start;
    while first < end {
        let rows = FMA_GRAD_BAND.min(end - first);
        px.clear();
        windows.each(first, rows, |base, mask| px.push((base, mask)));
        // Per tap, the (input offset, output pixel) pairs of the pixels whose tap falls
        // inside the image, `rows` apart (without a branch: each pair is written, and
        // kept where the tap is inside).
        let pairs = grown(&mut scratch.pairs, taps * rows);
        for (t, (list, count)) in pairs.chunks_exact_mut(rows).zip(&mut counts).enumerate() {
            let step = windows.steps[t];
            let mut n = 0;
            for (p, &(base, mask)) in px.iter().enumerate() {
                list[n] = (base.wrapping_add(step) as usize, p);
                n += (mask >> t & 1) as usize;
            }
            *count = n;
        }
        fma::weight_grad(
            x,
            s.ci,
            pairs,
            rows,
            &counts,
            &dy[first * s.co..(first + rows) * s.co],
            s.co,
            dwt,
            first != start,
        );
        first += rows;
    }
}

/// `dwt = Σ patches(x)ᵀ · dy` over output pixels `range` (overwritten).
fn weight_grad_bands(
    x: &[f32],
    dy: &[f32],
    s: &ConvShape,
    (start, end): (usize, usize),
    dwt: &mut [f32],
    scratch: &mut Scratch,
) {
    if uses_fma(s) {
        return weight_grad_bands_fma(x, dy, s, (start, end), dwt, scratch);
    }
    let kdim = s.kdim();
    let mut first = start;
    while first < end {
        let rows = BAND_ROWS.min(end - first);
        let col = scratch.col(rows * kdim);
        im2col(x, s, first, rows, col);
        let beta = if first == start { 0.0 } else { 1.0 };
        matmul_tn(
            kdim,
            rows,
            s.co,
            col,
            &dy[first * s.co..(first + rows) * s.co],
            beta,
            dwt,
        );
        first += rows;
    }
}

/// The shape of a max pooling: `n` images of `h`×`w`×`c`, windows of `p`×`p`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolShape {
    /// Images.
    pub n: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Channels.
    pub c: usize,
    /// Window side (and stride).
    pub p: usize,
}

/// Where in its window a maximum is (`dy·p + dx`): a `u8` for the blocks' 2×2 windows (a
/// quarter of the bytes), a `u32` for a window of any side (the final pool covers the last
/// block's whole output: 17×17 = 289 positions at `--image-size 136`, which a `u8` would
/// wrap, sending the gradient to the wrong pixel).
pub trait Tap: bytemuck::Pod + Default + Send + Sync {
    /// Whether every position of a `p`×`p` window fits.
    fn holds(p: usize) -> bool;
    /// Position `t` (which [`Tap::holds`]).
    fn at(t: usize) -> Self;
    /// The position.
    fn pos(self) -> usize;
}

impl Tap for u8 {
    fn holds(p: usize) -> bool {
        p.checked_mul(p).is_some_and(|n| n <= 1 << 8)
    }
    fn at(t: usize) -> Self {
        t as u8
    }
    fn pos(self) -> usize {
        usize::from(self)
    }
}

impl Tap for u32 {
    fn holds(p: usize) -> bool {
        p.checked_mul(p).is_some_and(|n| n as u64 <= 1 << 32)
    }
    fn at(t: usize) -> Self {
        t as u32
    }
    fn pos(self) -> usize {
        self as usize
    }
}

/// Max pooling over `p`×`p` windows, stride `p`, the last rows and columns dropped when
/// `p` does not divide the size (PyTorch's floor mode). `x` is `[n, h, w, c]`; `y` is
/// `[n, h/p, w/p, c]` and `arg` the window position (`dy·p + dx`) of each maximum, the
/// first on ties. Panics where `T` cannot hold a `p`×`p` window's positions (a caller's
/// choice of type, not input).
pub fn maxpool_forward<T: Tap>(x: &[f32], shape: PoolShape, y: &mut [f32], arg: &mut [T]) {
    let PoolShape { n, h, w, c, p } = shape;
    let (oh, ow) = (h / p, w / p);
    debug_assert_eq!(y.len(), n * oh * ow * c);
    assert!(
        T::holds(p),
        "a {p}x{p} pooling window's positions do not fit its index type"
    );
    if p == 2 && std::mem::size_of::<T>() == 1 {
        let arg: &mut [u8] = bytemuck::cast_slice_mut(arg);
        let (s1, s2, at_in, at_out) = image_halves(shape);
        let (x1, x2) = x.split_at(at_in);
        let (y1, y2) = y.split_at_mut(at_out);
        let (a1, a2) = arg.split_at_mut(at_out);
        both(
            x.len() >= PAR_ELEMS,
            (x1, y1, a1, s1),
            (x2, y2, a2, s2),
            |(x, y, a, s)| pool2_forward(x, s, y, a),
        )
    } else {
        maxpool_forward_any(x, shape, y, arg)
    }
}

/// [`maxpool_forward`] for any window (the 2×2 one has its own vectorised loop).
fn maxpool_forward_any<T: Tap>(x: &[f32], shape: PoolShape, y: &mut [f32], arg: &mut [T]) {
    let PoolShape { n, h, w, c, p } = shape;
    let (oh, ow) = (h / p, w / p);
    for img in 0..n {
        for oy in 0..oh {
            for ox in 0..ow {
                let o = ((img * oh + oy) * ow + ox) * c;
                let (yo, ao) = (&mut y[o..o + c], &mut arg[o..o + c]);
                let i0 = ((img * h + oy * p) * w + ox * p) * c;
                yo.copy_from_slice(&x[i0..i0 + c]);
                ao.fill(T::at(0));
                for dy in 0..p {
                    for dx in 0..p {
                        if dy == 0 && dx == 0 {
                            continue;
                        }
                        let i = ((img * h + oy * p + dy) * w + ox * p + dx) * c;
                        let tap = T::at(dy * p + dx);
                        for ((m, a), &v) in yo.iter_mut().zip(ao.iter_mut()).zip(&x[i..i + c]) {
                            // `!(v <= m)` also takes a NaN, as PyTorch does.
                            if v > *m || (v.is_nan() && !m.is_nan()) {
                                *m = v;
                                *a = tap;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The gradient of [`maxpool_forward`]: `dx` (overwritten) is zero but at each window's
/// maximum, which gets the window's `dy`.
pub fn maxpool_backward<T: Tap>(dy: &[f32], arg: &[T], shape: PoolShape, dx: &mut [f32]) {
    if shape.p == 2 && std::mem::size_of::<T>() == 1 {
        pool2_backward_halves(dy, bytemuck::cast_slice(arg), shape, dx, pool2_backward)
    } else {
        maxpool_backward_any(dy, arg, shape, dx)
    }
}

/// [`maxpool_backward`] of 2×2 windows writing `dx` in bf16, for the bf16 product that
/// reads it next: `dy` (a quarter of `dx`'s values) converted first (into `tmp`), then
/// spread. The same bits as converting the f32 `dx`.
pub fn maxpool2_backward_bf16(
    dy: &[f32],
    arg: &[u8],
    shape: PoolShape,
    dx: &mut [u16],
    tmp: &mut Vec<u32>,
) {
    assert_eq!(shape.p, 2, "maxpool2_backward_bf16: a 2×2 window");
    let g = to_bf16_buf(dy, tmp);
    pool2_backward_halves(g, arg, shape, dx, pool2_backward_h)
}

/// A 2×2 pooling's images in two halves: the two shapes, and where the input and the
/// output split.
fn image_halves(shape: PoolShape) -> (PoolShape, PoolShape, usize, usize) {
    let PoolShape { n, h, w, c, .. } = shape;
    let n1 = n / 2;
    (
        PoolShape { n: n1, ..shape },
        PoolShape { n: n - n1, ..shape },
        n1 * h * w * c,
        n1 * (h / 2) * (w / 2) * c,
    )
}

/// Runs the 2×2 pooling's backward pass `f` on two halves of the images (on two threads
/// where large).
fn pool2_backward_halves<V: Copy + Send + Sync>(
    dy: &[V],
    arg: &[u8],
    shape: PoolShape,
    dx: &mut [V],
    f: fn(&[V], &[u8], PoolShape, &mut [V]),
) {
    let PoolShape { n, h, w, c, .. } = shape;
    let (per_in, per_out) = (h * w * c, (h / 2) * (w / 2) * c);
    assert!(dx.len() >= n * per_in && dy.len() >= n * per_out && arg.len() >= n * per_out);
    let big = dx.len() >= PAR_ELEMS;
    let (s1, s2, at_in, at_out) = image_halves(shape);
    let (d1, d2) = dx.split_at_mut(at_in);
    let (g1, g2) = dy.split_at(at_out);
    let (a1, a2) = arg.split_at(at_out);
    both(big, (g1, a1, s1, d1), (g2, a2, s2, d2), |(g, a, s, d)| {
        f(g, a, s, d)
    })
}

/// [`maxpool_backward`] for any window.
fn maxpool_backward_any<T: Tap>(dy: &[f32], arg: &[T], shape: PoolShape, dx: &mut [f32]) {
    let PoolShape { n, h, w, c, p } = shape;
    let (oh, ow) = (h / p, w / p);
    dx.fill(0.0);
    for img in 0..n {
        for oy in 0..oh {
            for ox in 0..ow {
                let o = ((img * oh + oy) * ow + ox) * c;
                for ch in 0..c {
                    let tap = arg[o + ch].pos();
                    let (dyy, dxx) = (tap / p, tap % p);
                    let i = ((img * h + oy * p + dyy) * w + ox * p + dxx) * c + ch;
                    dx[i] = dy[o + ch];
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// GELU and the fused batch normalisation.
// ---------------------------------------------------------------------------------------

const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// 1.5·2²³: added to an `f32` of magnitude below 2²², it rounds it to the nearest
/// integer (ties to even) and leaves that integer in the low bits of its mantissa.
const ROUNDER: f32 = 12_582_912.0;

/// `exp(x)` for the GELU, branch-free and without float-to-int casts so that it
/// vectorises (16 lanes on AVX-512): `2^n · p(r)` with `x = n·ln 2 + r`, `|r| ≤ ln 2 / 2`,
/// a degree-6 polynomial (relative error about 2e-7) and `n` clamped so that very
/// negative `x` give 0.
#[inline(always)]
fn exp_poly(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // n = round(x·log2 e), as a float and (in `shifted`'s low bits) as an integer.
    let shifted = x * std::f32::consts::LOG2_E + ROUNDER;
    let n = shifted - ROUNDER;
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let mut p = 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    // 2^n: n + 127 in the exponent's bits (n is in −126..=127).
    let bits = shifted
        .to_bits()
        .wrapping_sub(ROUNDER.to_bits())
        .wrapping_add(127)
        << 23;
    p * f32::from_bits(bits)
}

/// `(Φ(z), φ(z))`: the standard normal CDF and density.
#[inline(always)]
fn phi(z: f32) -> (f32, f32) {
    let e = exp_poly(-0.5 * z * z);
    let a = z.abs() * std::f32::consts::FRAC_1_SQRT_2;
    // Abramowitz & Stegun 7.1.26: erf(a) = 1 − t·poly(t)·exp(−a²), t = 1/(1 + p·a).
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    // erf(z) = ±erf(|z|), by z's sign bit.
    let erf = f32::from_bits((1.0 - poly * e).to_bits() ^ (z.to_bits() & 0x8000_0000));
    (0.5 * (1.0 + erf), FRAC_1_SQRT_2PI * e)
}

/// The exact GELU, `z·Φ(z)`.
#[inline(always)]
pub fn gelu(z: f32) -> f32 {
    z * phi(z).0
}

/// The GELU's derivative, `Φ(z) + z·φ(z)`.
#[inline(always)]
pub fn gelu_grad(z: f32) -> f32 {
    let (cdf, pdf) = phi(z);
    cdf + z * pdf
}

/// Compiles `$body` (a generic function taking the same arguments) three times: for
/// AVX-512, AVX2+FMA and the baseline, and calls the best the CPU has.
macro_rules! dispatch {
    ($vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? => $body:ident) => {
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { $body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { $body($($arg),*) }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (checked just above).
                    return unsafe { v4($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has AVX2 and FMA (checked just above).
                    return unsafe { v3($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

/// Runs `f` on `a` and on `b` (the two halves of one job), on two threads where there
/// are and the job is `big`, else one after the other: the same results either way.
fn both<T: Send>(big: bool, a: T, b: T, f: impl Fn(T) + Sync) {
    if big && linalg::threads() > 1 {
        std::thread::scope(|sc| {
            let f = &f;
            sc.spawn(move || f(b));
            f(a);
        });
    } else {
        f(a);
        f(b);
    }
}

/// Elements from which an element-wise pass is worth a second thread.
const PAR_ELEMS: usize = 1 << 15;

/// Where a `[rows, c]` matrix of `len` values splits into two halves of whole rows.
fn half(len: usize, c: usize) -> usize {
    (len / c.max(1)) / 2 * c
}

/// Whether `v` replaces the maximum `m` so far: larger, or a NaN over a number (as
/// PyTorch's max pooling).
#[inline(always)]
fn pool_takes(v: f32, m: f32) -> bool {
    v > m || (v.is_nan() && !m.is_nan())
}

#[inline(always)]
fn pool2_forward_body(x: &[f32], shape: PoolShape, y: &mut [f32], arg: &mut [u8]) {
    let PoolShape { n, h, w, c, .. } = shape;
    let (oh, ow) = (h / 2, w / 2);
    for img in 0..n {
        for oy in 0..oh {
            let r0 = ((img * h + 2 * oy) * w) * c;
            let r1 = r0 + w * c;
            let o = (img * oh + oy) * ow * c;
            let (yr, ar) = (&mut y[o..o + ow * c], &mut arg[o..o + ow * c]);
            for (ox, (yo, ao)) in yr
                .chunks_exact_mut(c)
                .zip(ar.chunks_exact_mut(c))
                .enumerate()
            {
                let a = &x[r0 + 2 * ox * c..][..c];
                let b = &x[r0 + (2 * ox + 1) * c..][..c];
                let cc = &x[r1 + 2 * ox * c..][..c];
                let d = &x[r1 + (2 * ox + 1) * c..][..c];
                for (((((m, t), &va), &vb), &vc), &vd) in yo
                    .iter_mut()
                    .zip(ao.iter_mut())
                    .zip(a)
                    .zip(b)
                    .zip(cc)
                    .zip(d)
                {
                    let (mut best, mut tap) = (va, 0u8);
                    if pool_takes(vb, best) {
                        best = vb;
                        tap = 1;
                    }
                    if pool_takes(vc, best) {
                        best = vc;
                        tap = 2;
                    }
                    if pool_takes(vd, best) {
                        best = vd;
                        tap = 3;
                    }
                    *m = best;
                    *t = tap;
                }
            }
        }
    }
}

dispatch!(fn pool2_forward(x: &[f32], shape: PoolShape, y: &mut [f32], arg: &mut [u8]) => pool2_forward_body);

#[inline(always)]
fn pool2_backward_body<V: Copy + Default>(dy: &[V], arg: &[u8], shape: PoolShape, dx: &mut [V]) {
    let zero = V::default();
    let PoolShape { n, h, w, c, .. } = shape;
    let (oh, ow) = (h / 2, w / 2);
    for img in 0..n {
        let base = img * h * w * c;
        for oy in 0..oh {
            let r0 = base + 2 * oy * w * c;
            let o = (img * oh + oy) * ow * c;
            let (gr, ar) = (&dy[o..o + ow * c], &arg[o..o + ow * c]);
            let (top, bottom) = dx[r0..r0 + 2 * w * c].split_at_mut(w * c);
            for (ox, (g, t)) in gr.chunks_exact(c).zip(ar.chunks_exact(c)).enumerate() {
                let (a, b) = top[2 * ox * c..(2 * ox + 2) * c].split_at_mut(c);
                let (cc, d) = bottom[2 * ox * c..(2 * ox + 2) * c].split_at_mut(c);
                for (((((&g, &t), a), b), cc), d) in g
                    .iter()
                    .zip(t)
                    .zip(a.iter_mut())
                    .zip(b.iter_mut())
                    .zip(cc.iter_mut())
                    .zip(d.iter_mut())
                {
                    *a = if t == 0 { g } else { zero };
                    *b = if t == 1 { g } else { zero };
                    *cc = if t == 2 { g } else { zero };
                    *d = if t == 3 { g } else { zero };
                }
            }
            // An odd width's last column is in no window.
            if w % 2 == 1 {
                top[(w - 1) * c..].fill(zero);
                bottom[(w - 1) * c..].fill(zero);
            }
        }
        // An odd height's last row is in no window.
        if h % 2 == 1 {
            dx[base + (h - 1) * w * c..base + h * w * c].fill(zero);
        }
    }
}

dispatch!(fn pool2_backward(dy: &[f32], arg: &[u8], shape: PoolShape, dx: &mut [f32]) => pool2_backward_body);
dispatch!(fn pool2_backward_h(dy: &[u16], arg: &[u8], shape: PoolShape, dx: &mut [u16]) => pool2_backward_body);

/// Where an element-wise pass writes its output: f32, or bf16 bits for the bf16 product
/// that reads it next (which then need not convert it). The bf16 values are those the
/// product would have converted the f32 ones to: the pass computes each chunk in f32 into
/// a buffer in the L1 cache and converts it there ([`bf16::convert`]).
pub enum Out<'a> {
    /// f32 values.
    F32(&'a mut [f32]),
    /// bf16 bits, as [`bf16::convert`] writes them.
    Bf16(&'a mut [u16]),
}

impl Out<'_> {
    fn len(&self) -> usize {
        match self {
            Out::F32(y) => y.len(),
            Out::Bf16(y) => y.len(),
        }
    }

    fn split_at_mut(&mut self, m: usize) -> (Out<'_>, Out<'_>) {
        match self {
            Out::F32(y) => {
                let (a, b) = y.split_at_mut(m);
                (Out::F32(a), Out::F32(b))
            }
            Out::Bf16(y) => {
                let (a, b) = y.split_at_mut(m);
                (Out::Bf16(a), Out::Bf16(b))
            }
        }
    }
}

/// Values per chunk of an element-wise pass that writes bf16 (16 KB of f32).
const CHUNK: usize = 4096;

/// Runs `f(range, out)` over `0..len` into `y`: in one call for f32, in chunks of whole
/// `unit`s for bf16 (`out` then an f32 buffer, converted into `y[range]`).
fn write_out(
    len: usize,
    unit: usize,
    y: Out,
    mut f: impl FnMut(std::ops::Range<usize>, &mut [f32]),
) {
    match y {
        Out::F32(y) => f(0..len, &mut y[..len]),
        Out::Bf16(y) => {
            let chunk = (CHUNK / unit.max(1)).max(1) * unit.max(1);
            let mut tmp = vec![0.0f32; chunk.min(len)];
            let mut start = 0;
            while start < len {
                let end = (start + chunk).min(len);
                let t = &mut tmp[..end - start];
                f(start..end, t);
                bf16::convert(t, &mut y[start..end]);
                start = end;
            }
        }
    }
}

#[inline(always)]
fn bias_gelu_body(z: &mut [f32], y: &mut [f32], bias: &[f32], wide: &[f32]) {
    // Rows in groups of `wide` (the bias repeated to a whole number of vectors: 24
    // channels vectorise as 48), the rows left over one by one.
    let whole = z.len() / wide.len() * wide.len();
    let (z1, z2) = z.split_at_mut(whole);
    let (y1, y2) = y.split_at_mut(whole);
    for (b, z, y) in [(wide, z1, y1), (bias, z2, y2)] {
        for (zr, yr) in z.chunks_exact_mut(b.len()).zip(y.chunks_exact_mut(b.len())) {
            for ((zv, yv), &bv) in zr.iter_mut().zip(yr.iter_mut()).zip(b) {
                *zv += bv;
                *yv = gelu(*zv);
            }
        }
    }
}

dispatch!(fn bias_gelu_inner(z: &mut [f32], y: &mut [f32], bias: &[f32], wide: &[f32]) => bias_gelu_body);

/// `z += bias` (per channel, in place) and `y = gelu(z)`: the whitening layer's output.
pub fn bias_gelu(z: &mut [f32], y: &mut [f32], bias: &[f32]) {
    bias_gelu_out(z, Out::F32(y), bias)
}

/// [`bias_gelu`] writing `y` as [`Out`] says.
pub fn bias_gelu_out(z: &mut [f32], mut y: Out, bias: &[f32]) {
    let c = bias.len();
    let mut wide = bias.to_vec();
    while !wide.len().is_multiple_of(16) && wide.len() < 16 * c {
        wide.extend_from_slice(bias);
    }
    assert_eq!(z.len(), y.len(), "bias_gelu: lengths");
    let m = half(z.len(), c);
    let (z1, z2) = z.split_at_mut(m);
    let (y1, y2) = y.split_at_mut(m);
    both(z1.len() >= PAR_ELEMS, (z1, y1), (z2, y2), |(z, y)| {
        write_out(z.len(), wide.len(), y, |r, out| {
            bias_gelu_inner(&mut z[r], out, bias, &wide)
        })
    })
}

#[inline(always)]
fn gelu_backward_body(z: &[f32], dy: &mut [f32]) {
    for (d, &zv) in dy.iter_mut().zip(z) {
        *d *= gelu_grad(zv);
    }
}

dispatch!(fn gelu_backward_inner(z: &[f32], dy: &mut [f32]) => gelu_backward_body);

/// `dy *= gelu'(z)`, in place: the gradient through a GELU from its input `z`.
pub fn gelu_backward(z: &[f32], dy: &mut [f32]) {
    let m = z.len() / 2;
    let (z1, z2) = z.split_at(m);
    let (d1, d2) = dy.split_at_mut(m);
    both(m >= PAR_ELEMS, (z1, d1), (z2, d2), |(z, d)| {
        gelu_backward_inner(z, d)
    })
}

/// Rows per block of the per-channel sums: a block is summed in f32, the blocks' sums in
/// f64.
const SUM_ROWS: usize = 64;

#[inline(always)]
fn sums_body(x: &[f32], centre: &[f32], squares: bool, out: &mut [f64], part: &mut [f32]) {
    let c = out.len();
    out.fill(0.0);
    for block in x.chunks(c * SUM_ROWS) {
        part.fill(0.0);
        for row in block.chunks_exact(c) {
            // Zipped (no indices), so that the loops vectorise.
            if squares {
                for ((p, &v), &m) in part.iter_mut().zip(row).zip(centre) {
                    let d = v - m;
                    *p += d * d;
                }
            } else {
                for (p, &v) in part.iter_mut().zip(row) {
                    *p += v;
                }
            }
        }
        for (o, &p) in out.iter_mut().zip(part.iter()) {
            *o += f64::from(p);
        }
    }
}

dispatch!(fn sums_inner(x: &[f32], centre: &[f32], squares: bool, out: &mut [f64], part: &mut [f32]) => sums_body);

/// Where a `[rows, c]` matrix of `len` values splits into two runs of whole blocks of
/// [`SUM_ROWS`] rows (the second may be empty).
fn sum_half(len: usize, c: usize) -> usize {
    let rows = len / c.max(1);
    ((rows / 2).div_ceil(SUM_ROWS) * SUM_ROWS).min(rows) * c
}

/// Per-channel sums of a `[rows, c]` matrix `x` (`c = out.len()`), or of `(x − centre)²`
/// when `squares`, into `out`, in a fixed order: blocks of [`SUM_ROWS`] rows in f32, their
/// sums in f64 over each half of the rows, the two halves (on two threads where `x` is
/// large) added last. The same bits whatever the thread count.
fn channel_sums(x: &[f32], centre: &[f32], squares: bool, out: &mut [f64]) {
    let c = out.len();
    let (x1, x2) = x.split_at(sum_half(x.len(), c));
    let mut second = vec![0.0f64; c];
    both(
        x1.len() >= PAR_ELEMS,
        (x1, &mut *out),
        (x2, &mut second[..]),
        |(x, o)| sums_inner(x, centre, squares, o, &mut vec![0.0f32; c]),
    );
    for (o, s) in out.iter_mut().zip(second) {
        *o += s;
    }
}

/// Batch statistics kept for the backward pass of [`bn_gelu_forward`].
#[derive(Clone, Debug, Default)]
pub struct BnCache {
    /// `1 / sqrt(var + eps)` per channel.
    pub rstd: Vec<f32>,
}

#[inline(always)]
fn bn_apply_body(
    x: &[f32],
    z: &mut [f32],
    y: &mut [f32],
    mean: &[f32],
    rstd: &[f32],
    bias: &[f32],
) {
    let c = mean.len();
    for ((xr, zr), yr) in x
        .chunks_exact(c)
        .zip(z.chunks_exact_mut(c))
        .zip(y.chunks_exact_mut(c))
    {
        // Zipped (no indices), so that the loop vectorises.
        for (((((&xv, zv), yv), &m), &r), &b) in xr
            .iter()
            .zip(zr.iter_mut())
            .zip(yr.iter_mut())
            .zip(mean)
            .zip(rstd)
            .zip(bias)
        {
            let v = (xv - m) * r + b;
            *zv = v;
            *yv = gelu(v);
        }
    }
}

dispatch!(fn bn_apply_inner(x: &[f32], z: &mut [f32], y: &mut [f32], mean: &[f32], rstd: &[f32], bias: &[f32]) => bn_apply_body);

fn bn_apply(x: &[f32], z: &mut [f32], mut y: Out, mean: &[f32], rstd: &[f32], bias: &[f32]) {
    assert!(
        z.len() == x.len() && y.len() == x.len(),
        "batch norm: lengths"
    );
    let m = half(x.len(), mean.len());
    let (x1, x2) = x.split_at(m);
    let (z1, z2) = z.split_at_mut(m);
    let (y1, y2) = y.split_at_mut(m);
    both(m >= PAR_ELEMS, (x1, z1, y1), (x2, z2, y2), |(x, z, y)| {
        write_out(x.len(), mean.len(), y, |r, out| {
            bn_apply_inner(&x[r.clone()], &mut z[r], out, mean, rstd, bias)
        })
    })
}

/// Batch normalisation without a scale, then GELU, over a `[rows, c]` matrix, in
/// training: `z = (x − mean)/sqrt(var + eps) + bias`, `y = gelu(z)`, with the mean and
/// (biased) variance of this batch; the running statistics move towards them,
/// `r = (1 − m)·r + m·batch` with the unbiased variance (as PyTorch's `momentum = m`).
/// Returns the batch's `rstd` for the backward pass.
#[allow(clippy::too_many_arguments)]
pub fn bn_gelu_forward(
    x: &[f32],
    bias: &[f32],
    eps: f32,
    rmean: &mut [f32],
    rvar: &mut [f32],
    m: f32,
    z: &mut [f32],
    y: Out,
) -> BnCache {
    let c = bias.len();
    let rows = x.len() / c;
    let mut s = vec![0.0f64; c];
    channel_sums(x, &[], false, &mut s);
    let mean: Vec<f32> = s.iter().map(|v| (v / rows as f64) as f32).collect();
    // Two passes: the squared deviations from the mean.
    let mut dev = vec![0.0f64; c];
    channel_sums(x, &mean, true, &mut dev);
    let var: Vec<f32> = dev.iter().map(|v| (v / rows as f64) as f32).collect();
    let unbias = if rows > 1 {
        rows as f32 / (rows - 1) as f32
    } else {
        1.0
    };
    for j in 0..c {
        rmean[j] = (1.0 - m) * rmean[j] + m * mean[j];
        rvar[j] = (1.0 - m) * rvar[j] + m * var[j] * unbias;
    }
    let rstd: Vec<f32> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    bn_apply(x, z, y, &mean, &rstd, bias);
    BnCache { rstd }
}

/// [`bn_gelu_forward`] for scoring: the running statistics `rmean`, `rvar`.
#[allow(clippy::too_many_arguments)]
pub fn bn_gelu_score(
    x: &[f32],
    bias: &[f32],
    eps: f32,
    rmean: &[f32],
    rvar: &[f32],
    z: &mut [f32],
    y: &mut [f32],
) {
    let rstd: Vec<f32> = rvar.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    bn_apply(x, z, Out::F32(y), rmean, &rstd, bias);
}

#[inline(always)]
fn scale_shift_body(
    d: &mut [f32],
    z: &[f32],
    dz_mean: &[f32],
    k: &[f32],
    bias: &[f32],
    rstd: &[f32],
) {
    let c = rstd.len();
    for (dr, zr) in d.chunks_exact_mut(c).zip(z.chunks_exact(c)) {
        for (((((dv, &zv), &b), &r), &dm), &kv) in dr
            .iter_mut()
            .zip(zr)
            .zip(bias)
            .zip(rstd)
            .zip(dz_mean)
            .zip(k)
        {
            let xhat = zv - b;
            *dv = r * (*dv - dm - xhat * kv);
        }
    }
}

dispatch!(fn bn_input_grad_inner(d: &mut [f32], z: &[f32], dz_mean: &[f32], k: &[f32], bias: &[f32], rstd: &[f32]) => scale_shift_body);

/// [`scale_shift_body`] into `out`, `d` left as it is.
#[inline(always)]
fn scale_shift_to_body(
    d: &[f32],
    z: &[f32],
    dz_mean: &[f32],
    k: &[f32],
    bias: &[f32],
    rstd: &[f32],
    out: &mut [f32],
) {
    let c = rstd.len();
    for ((dr, zr), or) in d
        .chunks_exact(c)
        .zip(z.chunks_exact(c))
        .zip(out.chunks_exact_mut(c))
    {
        for ((((((&dv, &zv), &b), &r), &dm), &kv), ov) in dr
            .iter()
            .zip(zr)
            .zip(bias)
            .zip(rstd)
            .zip(dz_mean)
            .zip(k)
            .zip(or.iter_mut())
        {
            let xhat = zv - b;
            *ov = r * (dv - dm - xhat * kv);
        }
    }
}

dispatch!(fn bn_input_grad_to_inner(d: &[f32], z: &[f32], dz_mean: &[f32], k: &[f32], bias: &[f32], rstd: &[f32], out: &mut [f32]) => scale_shift_to_body);

/// The input gradient of the batch norm: in place in `d`, or (`out` given) into `out` in
/// bf16, `d` left as it is.
#[allow(clippy::too_many_arguments)]
fn bn_input_grad(
    d: &mut [f32],
    z: &[f32],
    dz_mean: &[f32],
    k: &[f32],
    bias: &[f32],
    rstd: &[f32],
    out: Option<&mut [u16]>,
) {
    let m = half(z.len(), rstd.len());
    let (d1, d2) = d.split_at_mut(m);
    let (z1, z2) = z.split_at(m);
    let Some(out) = out else {
        both(m >= PAR_ELEMS, (d1, z1), (d2, z2), |(d, z)| {
            bn_input_grad_inner(d, z, dz_mean, k, bias, rstd)
        });
        return;
    };
    assert_eq!(out.len(), z.len(), "batch norm: the gradient's length");
    let (o1, o2) = out.split_at_mut(m);
    both(
        m >= PAR_ELEMS,
        (&*d1, z1, o1),
        (&*d2, z2, o2),
        |(d, z, o)| {
            write_out(z.len(), rstd.len(), Out::Bf16(o), |r, t| {
                bn_input_grad_to_inner(&d[r.clone()], &z[r], dz_mean, k, bias, rstd, t)
            })
        },
    )
}

#[inline(always)]
fn gelu_sums_body(z: &[f32], bias: &[f32], d: &mut [f32], s: &mut [f64], sx: &mut [f64]) {
    let c = bias.len();
    s.fill(0.0);
    sx.fill(0.0);
    let (mut ps, mut px) = (vec![0.0f32; c], vec![0.0f32; c]);
    for (db, zb) in d.chunks_mut(c * SUM_ROWS).zip(z.chunks(c * SUM_ROWS)) {
        ps.fill(0.0);
        px.fill(0.0);
        for (dr, zr) in db.chunks_exact_mut(c).zip(zb.chunks_exact(c)) {
            for ((((dv, &zv), &b), a), q) in dr
                .iter_mut()
                .zip(zr)
                .zip(bias)
                .zip(ps.iter_mut())
                .zip(px.iter_mut())
            {
                let g = *dv * gelu_grad(zv);
                *dv = g;
                *a += g;
                *q += g * (zv - b);
            }
        }
        for ((o, p), (ox, pxv)) in s.iter_mut().zip(&ps).zip(sx.iter_mut().zip(&px)) {
            *o += f64::from(*p);
            *ox += f64::from(*pxv);
        }
    }
}

dispatch!(fn gelu_sums_inner(z: &[f32], bias: &[f32], d: &mut [f32], s: &mut [f64], sx: &mut [f64]) => gelu_sums_body);

/// `d *= gelu'(z)` in place, and per channel `(Σ d, Σ d·(z − bias))` of the result, in
/// [`channel_sums`]' order (two halves, on two threads where large).
fn gelu_channel_sums(z: &[f32], bias: &[f32], d: &mut [f32]) -> (Vec<f64>, Vec<f64>) {
    let c = bias.len();
    let m = sum_half(z.len(), c);
    let (z1, z2) = z.split_at(m);
    let (d1, d2) = d.split_at_mut(m);
    let mut out = [
        vec![0.0f64; c],
        vec![0.0f64; c],
        vec![0.0f64; c],
        vec![0.0f64; c],
    ];
    {
        let [s1, x1, s2, x2] = &mut out;
        both(
            z1.len() >= PAR_ELEMS,
            (z1, d1, s1, x1),
            (z2, d2, s2, x2),
            |(z, d, s, sx)| gelu_sums_inner(z, bias, d, s, sx),
        );
    }
    let [mut s1, mut x1, s2, x2] = out;
    for (a, b) in s1.iter_mut().zip(s2).chain(x1.iter_mut().zip(x2)) {
        *a += b;
    }
    (s1, x1)
}

/// The backward pass of [`bn_gelu_forward`] in training: `d` holds `dL/dy` and becomes
/// `dL/dx`; `dbias` (overwritten) is `dL/dbias`. `z` is the forward pass's `z`. With
/// `out`, `dL/dx` goes there in bf16 instead (for a bf16 product), and `d` is left
/// holding `dL/dz`.
pub fn bn_gelu_backward(
    z: &[f32],
    bias: &[f32],
    cache: &BnCache,
    d: &mut [f32],
    dbias: &mut [f32],
    out: Option<&mut [u16]>,
) {
    let c = bias.len();
    let rows = z.len() / c;
    // One pass: `d` through the GELU, with Σ dz and Σ dz·x̂ per channel (x̂ = z − bias).
    let (s, sx) = gelu_channel_sums(z, bias, d);
    for j in 0..c {
        dbias[j] = s[j] as f32;
    }
    let dz_mean: Vec<f32> = s.iter().map(|v| (v / rows as f64) as f32).collect();
    let k: Vec<f32> = sx.iter().map(|v| (v / rows as f64) as f32).collect();
    bn_input_grad(d, z, &dz_mean, &k, bias, &cache.rstd, out);
}

/// Per-channel sums of `d` (`[rows, c]`) into `out` (overwritten): a bias's gradient.
pub fn bias_grad(d: &[f32], out: &mut [f32]) {
    let mut s = vec![0.0f64; out.len()];
    channel_sums(d, &[], false, &mut s);
    for (o, v) in out.iter_mut().zip(s) {
        *o = v as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` images of `h`×`w`×`ci`, `co` outputs, a `k`×`k` kernel, `pad` zeros.
    fn shape(
        n: usize,
        h: usize,
        w: usize,
        ci: usize,
        co: usize,
        k: usize,
        pad: usize,
    ) -> ConvShape {
        ConvShape {
            n,
            h,
            w,
            ci,
            co,
            k,
            pad,
        }
    }

    #[test]
    fn the_two_by_two_pool_matches_the_general_one_with_ties_nans_and_odd_sides() {
        let mut rng = crate::rng::SplitMix(5);
        for (h, w, c) in [(4, 4, 16), (5, 7, 3), (31, 31, 24), (3, 2, 33)] {
            let n = 2;
            // Few distinct values, so that windows tie; a few NaNs.
            let x: Vec<f32> = (0..n * h * w * c)
                .map(|_| match rng.below(20) {
                    0 => f32::NAN,
                    v => (v % 4) as f32,
                })
                .collect();
            let shape = PoolShape { n, h, w, c, p: 2 };
            let len = n * (h / 2) * (w / 2) * c;
            let (mut y1, mut a1) = (vec![0.0f32; len], vec![9u8; len]);
            let (mut y2, mut a2) = (vec![0.0f32; len], vec![9u8; len]);
            maxpool_forward(&x, shape, &mut y1, &mut a1);
            maxpool_forward_any(&x, shape, &mut y2, &mut a2);
            assert_eq!(a1, a2, "{h}x{w}x{c}");
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&y1), bits(&y2), "{h}x{w}x{c}");
            assert!(a1.iter().all(|&t| t < 4));
            let dy: Vec<f32> = (0..len).map(|i| i as f32 + 1.0).collect();
            let (mut d1, mut d2) = (vec![7.0f32; x.len()], vec![7.0f32; x.len()]);
            maxpool_backward(&dy, &a1, shape, &mut d1);
            maxpool_backward_any(&dy, &a1, shape, &mut d2);
            assert_eq!(d1, d2, "{h}x{w}x{c}");
            // Every window's gradient lands once; the rest is zero.
            assert_eq!(d1.iter().filter(|&&v| v != 0.0).count(), len);
            // In bf16 (for a bf16 product): the f32 gradient's bits converted.
            if bf16::available() {
                let dy: Vec<f32> = dy.iter().map(|v| v * 1.001).collect();
                maxpool_backward(&dy, &a1, shape, &mut d1);
                let mut want = vec![0u16; d1.len()];
                bf16::convert(&d1, &mut want);
                let mut got = vec![7u16; d1.len()];
                maxpool2_backward_bf16(&dy, &a1, shape, &mut got, &mut Vec::new());
                assert_eq!(got, want, "{h}x{w}x{c} in bf16");
            }
        }
    }

    fn erf64(x: f64) -> f64 {
        // An independent erf to 1e-12: the Maclaurin series below 2, the continued
        // fraction of erfc (evaluated from its tail) above.
        let a = x.abs();
        let v = if a < 2.0 {
            let mut sum = a;
            let mut term = a;
            let mut k = 0.0;
            loop {
                k += 1.0;
                term *= -a * a / k;
                let add = term / (2.0 * k + 1.0);
                sum += add;
                if add.abs() < 1e-17 {
                    break;
                }
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc(a) = exp(−a²)/√π · 1/(a + (1/2)/(a + 1/(a + (3/2)/(a + 2/(a + …))))).
            let mut f = a;
            for k in (1..200).rev() {
                f = a + (k as f64 / 2.0) / f;
            }
            1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / f
        };
        v.copysign(x)
    }

    #[test]
    fn gelu_and_its_derivative_match_the_closed_form() {
        for i in -4000..=4000 {
            let z = i as f64 / 500.0;
            let cdf = 0.5 * (1.0 + erf64(z / 2f64.sqrt()));
            let pdf = (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let g = gelu(z as f32) as f64;
            let d = gelu_grad(z as f32) as f64;
            assert!(
                (g - z * cdf).abs() < 1e-6 * (1.0 + z.abs()),
                "gelu({z}) = {g}"
            );
            assert!((d - (cdf + z * pdf)).abs() < 2e-6, "gelu'({z}) = {d}");
        }
        assert_eq!(gelu(-100.0), 0.0);
        assert_eq!(gelu(100.0), 100.0);
        for x in [-80.0f32, -10.0, -1.0, 0.0, 0.3, 1.0, 10.0, 80.0] {
            let rel = ((exp_poly(x) as f64) - (x as f64).exp()).abs() / (x as f64).exp();
            assert!(rel < 5e-7, "exp({x}): {rel}");
        }
    }

    #[test]
    fn the_passes_that_write_bf16_write_the_f32_values_converted() {
        if !bf16::tests::has_kernel("the_passes_that_write_bf16_write_the_f32_values_converted") {
            return;
        }
        // Large enough for two threads, a row count that is not a whole number of chunks.
        let (rows, c) = (PAR_ELEMS / 16 + 37, 48);
        let x = values(rows * c, 21);
        let bias = values(c, 22);
        let convert = |v: &[f32]| {
            let mut h = vec![0u16; v.len()];
            bf16::convert(v, &mut h);
            h
        };
        // The whitening layer's bias and GELU.
        let (mut z1, mut z2) = (x.clone(), x.clone());
        let mut y = vec![0.0f32; x.len()];
        let mut yh = vec![0u16; x.len()];
        bias_gelu(&mut z1, &mut y, &bias);
        bias_gelu_out(&mut z2, Out::Bf16(&mut yh), &bias);
        assert_eq!(z1, z2);
        assert_eq!(yh, convert(&y));
        // Batch norm and GELU, forward.
        let (mut rm, mut rv) = (vec![0.0f32; c], vec![1.0f32; c]);
        let (mut rm2, mut rv2) = (rm.clone(), rv.clone());
        let (mut z1, mut z2) = (vec![0.0f32; x.len()], vec![0.0f32; x.len()]);
        let c1 = bn_gelu_forward(
            &x,
            &bias,
            1e-5,
            &mut rm,
            &mut rv,
            0.4,
            &mut z1,
            Out::F32(&mut y),
        );
        let c2 = bn_gelu_forward(
            &x,
            &bias,
            1e-5,
            &mut rm2,
            &mut rv2,
            0.4,
            &mut z2,
            Out::Bf16(&mut yh),
        );
        assert_eq!((&z1, &rm, &rv, &c1.rstd), (&z2, &rm2, &rv2, &c2.rstd));
        assert_eq!(yh, convert(&y));
        // And backward: the input gradient in bf16, `d` left holding the gradient through
        // the GELU.
        let g = values(x.len(), 23);
        let (mut d1, mut d2, mut d3) = (g.clone(), g.clone(), g.clone());
        let (mut b1, mut b2) = (vec![0.0f32; c], vec![0.0f32; c]);
        let mut dh = vec![0u16; x.len()];
        bn_gelu_backward(&z1, &bias, &c1, &mut d1, &mut b1, None);
        bn_gelu_backward(&z1, &bias, &c1, &mut d2, &mut b2, Some(&mut dh));
        assert_eq!(b1, b2);
        assert_eq!(dh, convert(&d1));
        gelu_backward(&z1, &mut d3);
        assert_eq!(d2, d3);
    }

    #[test]
    fn the_vectorised_gelu_passes_equal_the_scalar_gelu_bit_for_bit() {
        // Lanes of every kind: both signs, ties of the exponent's rounding, the clamps,
        // zeros, infinities, a NaN; more than PAR_ELEMS, so that two threads share it.
        // 24 channels (the whitening layer's: a bias repeated to 48 lanes, and an odd
        // row count, so that a row is left over after the groups of two).
        let c = 24;
        let mut z: Vec<f32> = (0..(c * (PAR_ELEMS / 12 + 3)))
            .map(|i| ((i as f32) * 0.001_37 - 40.0) * if i % 3 == 0 { -1.0 } else { 1.0 })
            .collect();
        z[..8].copy_from_slice(&[0.0, -0.0, 200.0, -200.0, f32::INFINITY, -13.0, 1.0, 0.5]);
        let bias: Vec<f32> = (0..c).map(|j| j as f32 * 0.01 - 0.1).collect();
        let mut zz = z.clone();
        let mut y = vec![0.0f32; z.len()];
        bias_gelu(&mut zz, &mut y, &bias);
        let mut d = vec![1.5f32; z.len()];
        gelu_backward(&z, &mut d);
        for (i, &v) in z.iter().enumerate() {
            let zb = v + bias[i % c];
            assert_eq!(zz[i].to_bits(), zb.to_bits(), "z + bias at {i}");
            assert_eq!(y[i].to_bits(), gelu(zb).to_bits(), "gelu({zb})");
            assert_eq!(d[i].to_bits(), (1.5 * gelu_grad(v)).to_bits(), "gelu'({v})");
        }
        // The backward pass's fused sums: the same gradient, and its per-channel sums
        // (of d and of d·(z − bias)) as f64 sums of the same values give them.
        let mut fused = vec![1.5f32; z.len()];
        let (s, sx) = gelu_channel_sums(&z, &bias, &mut fused);
        assert!(fused
            .iter()
            .zip(&d)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        for j in 0..c {
            let col = (j..z.len()).step_by(c);
            let ds: Vec<f64> = col.clone().map(|i| f64::from(d[i])).collect();
            let dx: Vec<f64> = col
                .map(|i| f64::from(d[i]) * f64::from(z[i] - bias[j]))
                .collect();
            for (got, terms, what) in [(s[j], &ds, "Σ d"), (sx[j], &dx, "Σ d·x̂")] {
                // f32 sums of blocks of 64 rows: within 1e-5 of the terms' magnitudes.
                let want: f64 = terms.iter().sum();
                let size: f64 = terms.iter().map(|v| v.abs()).sum();
                let close = if want.is_finite() {
                    (got - want).abs() <= 1e-5 * (1.0 + size)
                } else {
                    got == want
                };
                assert!(close, "{what} of channel {j}: {got} against {want}");
            }
        }
        let mut nan = vec![f32::NAN; 2 * c];
        let mut out = vec![0.0f32; 2 * c];
        bias_gelu(&mut nan, &mut out, &bias);
        assert!(out.iter().all(|v| v.is_nan()));
    }

    fn naive_conv(x: &[f32], wt: &[f32], s: &ConvShape) -> Vec<f64> {
        let (oh, ow) = (s.oh(), s.ow());
        let mut y = vec![0.0f64; s.n * oh * ow * s.co];
        for img in 0..s.n {
            for oy in 0..oh {
                for ox in 0..ow {
                    for o in 0..s.co {
                        let mut acc = 0.0f64;
                        for ky in 0..s.k {
                            for kx in 0..s.k {
                                let iy = (oy + ky) as isize - s.pad as isize;
                                let ix = (ox + kx) as isize - s.pad as isize;
                                if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize {
                                    continue;
                                }
                                for c in 0..s.ci {
                                    let xv = x[((img * s.h + iy as usize) * s.w + ix as usize)
                                        * s.ci
                                        + c];
                                    let wv = wt[((ky * s.k + kx) * s.ci + c) * s.co + o];
                                    acc += f64::from(xv) * f64::from(wv);
                                }
                            }
                        }
                        y[((img * oh + oy) * ow + ox) * s.co + o] = acc;
                    }
                }
            }
        }
        y
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let v = (i as u32)
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed * 97);
                ((v >> 8) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// The `convolutions_…` tests again in a child process with the implicit products
    /// hidden ([`fma::HIDE_ENV`]): the patch-matrix path on the `gemm` crate, which CPUs
    /// without AVX-512 take.
    #[test]
    fn the_patch_matrix_path_matches_the_sums_too() {
        let filter = "model::cnn::ops::tests::convolutions_";
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([filter, "--test-threads", "1"])
            .env(fma::HIDE_ENV, "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("test result: ok. 2 passed"),
            "{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The f32 products at the network's widths (several blocks of output channels, the
    /// last partial; input channels in blocks of taps; 3×3 and 7×7 images, where most
    /// pixels skip some taps; a 5×5 kernel with two pixels of padding) against the f64
    /// sums, within f32's rounding of their terms, on one thread and two, bit for bit.
    #[test]
    fn convolutions_at_network_widths_match_f64_sums() {
        for s in [
            shape(2, 7, 7, 64, 70, 3, 1),
            shape(5, 3, 3, 40, 33, 3, 1),
            shape(2, 9, 8, 3, 4, 5, 2),
            shape(1, 31, 31, 24, 32, 3, 1),
        ] {
            let x = values(s.n * s.h * s.w * s.ci, 1);
            let wt = values(s.kdim() * s.co, 2);
            let g = values(s.n * s.oh() * s.ow() * s.co, 3);
            let turned = turned_weights(&wt, &s);
            let mut runs = Vec::new();
            for threads in [1, 2] {
                linalg::set_threads(threads);
                let mut scratch = Scratch::default();
                let mut y = vec![0.0; g.len()];
                conv_forward(&x, &wt, &s, &mut y, &mut scratch);
                let (mut dwt, mut dx) = (vec![0.0; wt.len()], vec![0.0; x.len()]);
                conv_backward(&x, &g, &turned, &s, &mut dwt, Some(&mut dx), &mut scratch);
                runs.push([y, dwt, dx]);
            }
            linalg::set_threads(0);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            for (a, b) in runs[0].iter().zip(&runs[1]) {
                assert_eq!(bits(a), bits(b), "{s:?}: one thread and two differ");
            }
            let (want_y, want_dw, want_dx) = conv_reference(&x, &wt, &g, &s);
            let [y, dwt, dx] = &runs[0];
            for (what, got, want) in [
                ("y", y, &want_y),
                ("dw", dwt, &want_dw),
                ("dx", dx, &want_dx),
            ] {
                for (i, (&v, &(w, mag))) in got.iter().zip(want.iter()).enumerate() {
                    assert!(
                        (f64::from(v) - w).abs() <= 1e-5 * mag + 1e-30,
                        "{s:?} {what}[{i}]: {v} vs {w} (terms {mag})"
                    );
                }
            }
        }
    }

    #[test]
    fn convolutions_forward_and_backward_match_a_direct_sum() {
        for s in [
            shape(2, 7, 5, 3, 4, 3, 1),
            shape(3, 6, 6, 3, 5, 2, 0),
            // More output pixels than a band.
            shape(3, 19, 21, 2, 3, 3, 1),
        ] {
            let x = values(s.n * s.h * s.w * s.ci, 1);
            let wt = values(s.kdim() * s.co, 2);
            let mut y = vec![0.0; s.n * s.oh() * s.ow() * s.co];
            let mut scratch = Scratch::default();
            conv_forward(&x, &wt, &s, &mut y, &mut scratch);
            let want = naive_conv(&x, &wt, &s);
            for (a, b) in y.iter().zip(&want) {
                assert!((f64::from(*a) - b).abs() < 1e-4, "{s:?}: {a} vs {b}");
            }
            // Backward of L = Σ y·g: dW[t, o] = Σ patch·g, dx by the adjoint.
            let g = values(y.len(), 3);
            let mut dwt = vec![0.0; wt.len()];
            let mut dx = vec![0.0; x.len()];
            let turned = turned_weights(&wt, &s);
            conv_backward(&x, &g, &turned, &s, &mut dwt, Some(&mut dx), &mut scratch);
            // dL/dW by linearity: the conv of x with a one-hot kernel.
            for t in 0..wt.len() {
                let mut e = vec![0.0f32; wt.len()];
                e[t] = 1.0;
                let yt = naive_conv(&x, &e, &s);
                let want: f64 = yt.iter().zip(&g).map(|(a, b)| a * f64::from(*b)).sum();
                assert!((f64::from(dwt[t]) - want).abs() < 1e-3, "{s:?} dw[{t}]");
            }
            for i in (0..x.len()).step_by(7) {
                let mut e = vec![0.0f32; x.len()];
                e[i] = 1.0;
                let yi = naive_conv(&e, &wt, &s);
                let want: f64 = yi.iter().zip(&g).map(|(a, b)| a * f64::from(*b)).sum();
                assert!((f64::from(dx[i]) - want).abs() < 1e-4, "{s:?} dx[{i}]");
            }
        }
    }

    /// `(value, Σ|terms|)` of the convolution's three products in f64: the output, the
    /// weight gradient and the input gradient, from `x`, `wt` and the output gradient `g`.
    #[allow(clippy::type_complexity)]
    fn conv_reference(
        x: &[f32],
        wt: &[f32],
        g: &[f32],
        s: &ConvShape,
    ) -> (Vec<(f64, f64)>, Vec<(f64, f64)>, Vec<(f64, f64)>) {
        let (oh, ow) = (s.oh(), s.ow());
        let mut y = vec![(0.0, 0.0); s.n * oh * ow * s.co];
        let mut dw = vec![(0.0, 0.0); wt.len()];
        let mut dx = vec![(0.0, 0.0); x.len()];
        let add = |acc: &mut (f64, f64), a: f32, b: f32| {
            let p = f64::from(a) * f64::from(b);
            acc.0 += p;
            acc.1 += p.abs();
        };
        for img in 0..s.n {
            for oy in 0..oh {
                for ox in 0..ow {
                    for ky in 0..s.k {
                        for kx in 0..s.k {
                            let iy = (oy + ky) as isize - s.pad as isize;
                            let ix = (ox + kx) as isize - s.pad as isize;
                            if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize {
                                continue;
                            }
                            let xi = ((img * s.h + iy as usize) * s.w + ix as usize) * s.ci;
                            let yi = ((img * oh + oy) * ow + ox) * s.co;
                            for c in 0..s.ci {
                                for o in 0..s.co {
                                    let wi = ((ky * s.k + kx) * s.ci + c) * s.co + o;
                                    add(&mut y[yi + o], x[xi + c], wt[wi]);
                                    add(&mut dw[wi], x[xi + c], g[yi + o]);
                                    add(&mut dx[xi + c], g[yi + o], wt[wi]);
                                }
                            }
                        }
                    }
                }
            }
        }
        (y, dw, dx)
    }

    /// Each bf16 product against the f64 products of the same bf16-rounded inputs: equal
    /// up to the f32 sums (a relative 1e-5 of the terms' magnitude at these sizes), on
    /// shapes with more than one band of each product and tails of every kind.
    #[test]
    fn bf16_convolutions_match_the_f64_sums_of_their_rounded_inputs() {
        if !bf16::tests::has_kernel("bf16_convolutions_match_the_f64_sums_of_their_rounded_inputs")
        {
            return;
        }
        let round = |v: &[f32]| v.iter().map(|&x| bf16::round_bf16(x)).collect::<Vec<_>>();
        // Both bf16 kernels: AMX's on the CPU where it has it, else on the tests'
        // stand-in for the tile unit.
        let mut kernels = vec![Kernel::Avx512Bf16];
        if super::super::amx::tests::ready("bf16_convolutions_match_the_f64_sums (AMX)") {
            kernels.push(Kernel::AmxBf16);
        }
        for (kernel, (s, threads)) in kernels.into_iter().flat_map(|k| {
            [
                (shape(2, 7, 5, 3, 4, 3, 1), 1),
                (shape(3, 31, 31, 3, 24, 2, 0), 2),
                (shape(3, 16, 16, 97, 40, 3, 1), 2),
                // Even channel counts: the products read the pixels in place (no patches),
                // a block of columns cut short (70), tiles straddling rows and images.
                (shape(3, 9, 11, 24, 40, 3, 1), 2),
                (shape(2, 6, 5, 32, 70, 3, 1), 1),
            ]
            .map(|c| (k, c))
        }) {
            eprintln!("{}: {s:?}", kernel.name());
            linalg::set_threads(threads);
            let x = values(s.n * s.h * s.w * s.ci, 11);
            let wt = values(s.kdim() * s.co, 12);
            let g = values(s.n * s.oh() * s.ow() * s.co, 13);
            let mut scratch = Scratch::new(kernel);
            let mut y = vec![f32::NAN; g.len()];
            conv_forward(&x, &wt, &s, &mut y, &mut scratch);
            let mut dwt = vec![f32::NAN; wt.len()];
            let mut dx = vec![f32::NAN; x.len()];
            let turned = turned_weights(&wt, &s);
            conv_backward(&x, &g, &turned, &s, &mut dwt, Some(&mut dx), &mut scratch);
            // The same with the input's bf16 copy kept from the forward pass.
            let (mut keep, mut y2, mut dwt2, mut dx2) = (
                Vec::new(),
                vec![0.0; y.len()],
                vec![0.0; dwt.len()],
                vec![0.0; dx.len()],
            );
            conv_forward_kept(&x, &wt, &s, &mut y2, &mut scratch, Some(&mut keep));
            assert!(2 * keep.len() >= x.len());
            let g2 = &g;
            conv_backward_kept(
                &x,
                Some(&keep),
                Grad::F32(g2),
                &turned,
                &s,
                &mut dwt2,
                Some(&mut dx2),
                &mut scratch,
            );
            // Without the input gradient (the output gradient paired from f32, not
            // converted first): the same weight gradient.
            let mut dwt3 = vec![0.0; dwt.len()];
            conv_backward_kept(
                &x,
                Some(&keep),
                Grad::F32(g2),
                &turned,
                &s,
                &mut dwt3,
                None,
                &mut scratch,
            );
            // The input and the output gradient given in bf16 (as the layers around a
            // convolution write them), `x` not passed: the same again, both ways.
            let mut gh = vec![0u16; g.len()];
            bf16::convert(&g, &mut gh);
            let kept_h: Vec<u16> = bytemuck::cast_slice::<u32, u16>(&keep)[..x.len()].to_vec();
            let mut y4 = vec![0.0; y.len()];
            conv_forward_bf16(&kept_h, &wt, &s, &mut y4, &mut scratch);
            let (mut dwt4, mut dx4, mut dwt5) = (
                vec![0.0; dwt.len()],
                vec![0.0; dx.len()],
                vec![0.0; dwt.len()],
            );
            for (dw, dxo) in [(&mut dwt4, Some(&mut dx4[..])), (&mut dwt5, None)] {
                conv_backward_kept(
                    &[],
                    Some(&keep),
                    Grad::Bf16(&gh),
                    &turned,
                    &s,
                    dw,
                    dxo,
                    &mut scratch,
                );
            }
            for (a, b) in [
                (&y, &y2),
                (&dwt, &dwt2),
                (&dx, &dx2),
                (&dwt, &dwt3),
                (&y, &y4),
                (&dwt, &dwt4),
                (&dx, &dx4),
                (&dwt, &dwt5),
            ] {
                assert!(a
                    .iter()
                    .zip(b.iter())
                    .all(|(u, v)| u.to_bits() == v.to_bits()));
            }
            let (want_y, want_dw, want_dx) =
                conv_reference(&round(&x), &round(&wt), &round(&g), &s);
            for (what, got, want) in [
                ("y", &y, &want_y),
                ("dw", &dwt, &want_dw),
                ("dx", &dx, &want_dx),
            ] {
                for (i, (&v, &(w, mag))) in got.iter().zip(want.iter()).enumerate() {
                    assert!(
                        (f64::from(v) - w).abs() <= 1e-5 * mag + 1e-30,
                        "{s:?} {what}[{i}]: {v} vs {w} (terms {mag})"
                    );
                }
            }
            // Not the f32 product: the inputs were rounded.
            let mut y32 = vec![0.0; y.len()];
            conv_forward(&x, &wt, &s, &mut y32, &mut Scratch::default());
            assert!(
                y.iter().zip(&y32).any(|(a, b)| a != b),
                "{s:?}: bf16 = f32?"
            );
        }
        linalg::set_threads(0);
    }

    /// A window of 17×17 or more has positions past 255: the final pool at
    /// `--image-size 136` and up. Each maximum is found and gets its gradient, at every
    /// position of the window (a `u8` index wrapped past 255 and sent it elsewhere).
    #[test]
    fn a_wide_window_routes_the_gradient_to_its_maximum_past_position_255() {
        assert!(u8::holds(16) && !u8::holds(17));
        assert!(u32::holds(512));
        for p in [3usize, 16, 17, 20] {
            let (n, c) = (1, p * p);
            let (h, w) = (p, p);
            // Channel k's maximum at window position k: every position, 0 to p²-1, once.
            let mut x = vec![0.0f32; n * h * w * c];
            for pos in 0..p * p {
                for k in 0..c {
                    x[pos * c + k] = if pos == k {
                        100.0 + k as f32
                    } else {
                        (pos % 7) as f32
                    };
                }
            }
            let shape = PoolShape { n, h, w, c, p };
            let mut y = vec![0.0f32; c];
            let mut arg = vec![0u32; c];
            maxpool_forward(&x, shape, &mut y, &mut arg);
            for k in 0..c {
                assert_eq!(y[k], 100.0 + k as f32, "p {p} channel {k}");
                assert_eq!(arg[k] as usize, k, "p {p} channel {k}");
            }
            let dy: Vec<f32> = (0..c).map(|k| 1.0 + k as f32).collect();
            let mut dx = vec![7.0f32; x.len()];
            maxpool_backward(&dy, &arg, shape, &mut dx);
            for pos in 0..p * p {
                for k in 0..c {
                    let want = if pos == k { dy[k] } else { 0.0 };
                    assert_eq!(dx[pos * c + k], want, "p {p} position {pos} channel {k}");
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "do not fit")]
    fn a_u8_index_refuses_a_window_past_16() {
        let shape = PoolShape {
            n: 1,
            h: 17,
            w: 17,
            c: 1,
            p: 17,
        };
        let (mut y, mut arg) = (vec![0.0f32; 1], vec![0u8; 1]);
        maxpool_forward(&vec![0.0f32; 289], shape, &mut y, &mut arg);
    }

    #[test]
    fn max_pooling_routes_the_gradient_to_each_maximum() {
        let (n, h, w, c, p) = (2, 7, 7, 3, 2);
        let x = values(n * h * w * c, 5);
        let (oh, ow) = (h / p, w / p);
        let mut y = vec![0.0; n * oh * ow * c];
        let mut arg = vec![0u8; y.len()];
        maxpool_forward(&x, PoolShape { n, h, w, c, p }, &mut y, &mut arg);
        for img in 0..n {
            for oy in 0..oh {
                for ox in 0..ow {
                    for ch in 0..c {
                        let mut m = f32::NEG_INFINITY;
                        for dy in 0..p {
                            for dx in 0..p {
                                m = m.max(x[((img * h + oy * p + dy) * w + ox * p + dx) * c + ch]);
                            }
                        }
                        assert_eq!(y[((img * oh + oy) * ow + ox) * c + ch], m);
                    }
                }
            }
        }
        let g = values(y.len(), 6);
        let mut dx = vec![1.0; x.len()];
        maxpool_backward(&g, &arg, PoolShape { n, h, w, c, p }, &mut dx);
        assert!((dx.iter().sum::<f32>() - g.iter().sum::<f32>()).abs() < 1e-4);
        for (i, (&xv, &d)) in x.iter().zip(&dx).enumerate() {
            if d != 0.0 {
                assert!(y.contains(&xv), "x[{i}] is no maximum");
            }
        }
    }
}
