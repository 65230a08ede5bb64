//! The kernels on one image, for the functions and for benchmarks.
//!
//! Each takes one image as a slice of `3·s·s` values in CIFAR order and writes the result
//! into `dst`; a slice whose length does not fit `s` is an error (never a panic).
use std::fmt;

use datafusion::arrow::datatypes::{ArrowNativeType, ArrowPrimitiveType};

use crate::error::{Error, Result};

/// The largest `height` or `width` accepted by `resize`.
pub const MAX_RESIZE_SIDE: usize = 4096;

/// A pixel type the image functions work on: `u8` or `f32`.
pub trait Pixel: ArrowNativeType + Copy + Default + Send + Sync + fmt::Debug + 'static {
    /// The Arrow type of a list of these.
    type Arrow: ArrowPrimitiveType<Native = Self>;
    /// The value as `f32`.
    fn to_f32(self) -> f32;
    /// A value from `f32`: rounded half away from zero and clamped to 0..=255 for `u8`
    /// (NaN gives 0), unchanged for `f32`.
    fn from_f32(v: f32) -> Self;
    /// Normalize one image of this type with `norm`.
    fn normalize(norm: &Normalize, src: &[Self], s: usize, dst: &mut [f32]) -> Result<()>;
}

impl Pixel for u8 {
    type Arrow = datafusion::arrow::datatypes::UInt8Type;
    #[inline]
    fn to_f32(self) -> f32 {
        f32::from(self)
    }
    #[inline]
    fn from_f32(v: f32) -> Self {
        // Round half away from zero without a libm call (`f32::round` is one on baseline
        // x86-64): truncate, then compare the exact remainder. NaN truncates to 0.
        let v = v.clamp(0.0, 255.0);
        let t = v as u8;
        if v - f32::from(t) >= 0.5 {
            t + 1
        } else {
            t
        }
    }
    fn normalize(norm: &Normalize, src: &[u8], s: usize, dst: &mut [f32]) -> Result<()> {
        norm.apply_u8(src, s, dst)
    }
}

impl Pixel for f32 {
    type Arrow = datafusion::arrow::datatypes::Float32Type;
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline]
    fn from_f32(v: f32) -> Self {
        v
    }
    fn normalize(norm: &Normalize, src: &[f32], s: usize, dst: &mut [f32]) -> Result<()> {
        norm.apply_f32(src, s, dst)
    }
}

/// The side `s` of an image of `len` values (`len = 3·s·s`), if there is one.
pub fn side(len: usize) -> Option<usize> {
    if len == 0 || !len.is_multiple_of(3) {
        return None;
    }
    let plane = len / 3;
    let mut s = (plane as f64).sqrt() as usize;
    // Correct the float estimate.
    while s.saturating_mul(s) > plane {
        s -= 1;
    }
    while (s + 1).saturating_mul(s + 1) <= plane {
        s += 1;
    }
    (s * s == plane).then_some(s)
}

fn check(what: &str, s: usize, src: usize, dst: usize, dst_expected: usize) -> Result<()> {
    let len = s.checked_mul(s).and_then(|p| p.checked_mul(3));
    if s == 0 || len != Some(src) || dst != dst_expected {
        return Err(Error::usage(format!(
            "{what}: an image of side {s} needs {} source and {dst_expected} destination \
             values, got {src} and {dst}",
            len.map_or_else(|| "too many".to_string(), |l| l.to_string())
        )));
    }
    Ok(())
}

/// Mirror across the width: column `x` of every row becomes column `s − 1 − x`.
pub fn hflip<T: Copy>(src: &[T], s: usize, dst: &mut [T]) -> Result<()> {
    check("hflip", s, src.len(), dst.len(), src.len())?;
    for (d, r) in dst.chunks_exact_mut(s).zip(src.chunks_exact(s)) {
        d.copy_from_slice(r);
        d.reverse();
    }
    Ok(())
}

/// Mirror across the height: row `y` of every plane becomes row `s − 1 − y`.
pub fn vflip<T: Copy>(src: &[T], s: usize, dst: &mut [T]) -> Result<()> {
    check("vflip", s, src.len(), dst.len(), src.len())?;
    let plane = s * s;
    for (d, p) in dst.chunks_exact_mut(plane).zip(src.chunks_exact(plane)) {
        for (o, i) in d.chunks_exact_mut(s).zip(p.chunks_exact(s).rev()) {
            o.copy_from_slice(i);
        }
    }
    Ok(())
}

/// `numpy.roll` of the rows of one plane by `k` (already reduced to `0..s`).
fn roll_rows<T: Copy>(src: &[T], s: usize, k: usize, dst: &mut [T]) {
    // Output row y is input row (y − k) mod s: the last k input rows come first.
    let split = (s - k) * s;
    dst[..k * s].copy_from_slice(&src[split..]);
    dst[k * s..].copy_from_slice(&src[..split]);
}

/// `numpy.roll` of the columns of one plane by `k` (already reduced to `0..s`).
fn roll_cols<T: Copy>(src: &[T], s: usize, k: usize, dst: &mut [T]) {
    for (d, r) in dst.chunks_exact_mut(s).zip(src.chunks_exact(s)) {
        d[..k].copy_from_slice(&r[s - k..]);
        d[k..].copy_from_slice(&r[..s - k]);
    }
}

/// The original's ColorShift, applied: the red plane rolled by `r` rows, the green plane
/// by `g` columns, the blue plane by `b` rows (`numpy.roll`: wrap-around, a positive
/// shift moves values towards higher indices; any integer, reduced modulo `s`).
pub fn color_shift<T: Copy>(
    src: &[T],
    s: usize,
    r: i64,
    g: i64,
    b: i64,
    dst: &mut [T],
) -> Result<()> {
    check("color_shift", s, src.len(), dst.len(), src.len())?;
    let plane = s * s;
    let m = |v: i64| v.rem_euclid(s as i64) as usize;
    let (sr, rest) = src.split_at(plane);
    let (sg, sb) = rest.split_at(plane);
    let (dr, rest) = dst.split_at_mut(plane);
    let (dg, db) = rest.split_at_mut(plane);
    roll_rows(sr, s, m(r), dr);
    roll_cols(sg, s, m(g), dg);
    roll_rows(sb, s, m(b), db);
    Ok(())
}

/// Zero-pad every plane by `padding` and crop the `s`×`s` window whose top-left corner
/// is at (`oy`, `ox`) in the padded plane (`0..=2·padding` each; larger offsets just
/// crop more of the padding).
pub fn crop<T: Copy + Default>(
    src: &[T],
    s: usize,
    padding: usize,
    oy: usize,
    ox: usize,
    dst: &mut [T],
) -> Result<()> {
    check("random_crop", s, src.len(), dst.len(), src.len())?;
    let si = s as i64;
    // Source coordinate = output coordinate + d.
    let dy = oy as i64 - padding as i64;
    let dx = ox as i64 - padding as i64;
    let x0 = (-dx).clamp(0, si) as usize;
    let x1 = (si - dx).clamp(0, si) as usize;
    let plane = s * s;
    for (dp, sp) in dst.chunks_exact_mut(plane).zip(src.chunks_exact(plane)) {
        for (y, drow) in dp.chunks_exact_mut(s).enumerate() {
            let sy = y as i64 + dy;
            if sy < 0 || sy >= si || x0 >= x1 {
                drow.fill(T::default());
                continue;
            }
            let srow = &sp[sy as usize * s..][..s];
            drow[..x0].fill(T::default());
            let from = (x0 as i64 + dx) as usize;
            drow[x0..x1].copy_from_slice(&srow[from..from + (x1 - x0)]);
            drow[x1..].fill(T::default());
        }
    }
    Ok(())
}

/// Coordinate `i` of a side of `s` pixels reflected at the border (`-1 → 1`,
/// `s → s − 2`: PyTorch's `reflect` padding), for `|i|` up to about `s`.
pub fn reflect(i: i64, s: i64) -> usize {
    let r = if i < 0 {
        -i
    } else if i >= s {
        2 * (s - 1) - i
    } else {
        i
    };
    r.clamp(0, s - 1) as usize
}

/// The image shifted so that output pixel (y, x) is input pixel (y + dy, x + dx),
/// coordinates outside the image reflected at the border (`-1 → 1`, `s → s − 2`:
/// PyTorch's `reflect` padding). `|dy|, |dx|` must be below `s`.
pub fn translate_reflect<T: Copy>(
    src: &[T],
    s: usize,
    dy: i64,
    dx: i64,
    dst: &mut [T],
) -> Result<()> {
    check("translate", s, src.len(), dst.len(), src.len())?;
    let si = s as i64;
    if dy.abs() >= si.max(1) || dx.abs() >= si.max(1) {
        return Err(Error::usage(format!(
            "translate: a shift of ({dy}, {dx}) on a side of {s}"
        )));
    }
    let reflect = |i: i64| reflect(i, si);
    let cols: Vec<usize> = (0..si).map(|x| reflect(x + dx)).collect();
    let plane = s * s;
    for (dp, sp) in dst.chunks_exact_mut(plane).zip(src.chunks_exact(plane)) {
        for (y, drow) in dp.chunks_exact_mut(s).enumerate() {
            let srow = &sp[reflect(y as i64 + dy) * s..][..s];
            for (d, &c) in drow.iter_mut().zip(&cols) {
                *d = srow[c];
            }
        }
    }
    Ok(())
}

/// Bilinear resampling with half-pixel centres from side `s` to `height`×`width`,
/// precomputed once for many images.
#[derive(Clone, Debug, PartialEq)]
pub struct Resize {
    /// Source height and width.
    sh: usize,
    sw: usize,
    height: usize,
    width: usize,
    ys: Vec<(usize, usize, f32)>,
    xs: Vec<(usize, usize, f32)>,
}

/// Source taps of each output index: (lower, upper, weight of upper). The source
/// coordinate is `(o + 0.5)·n_in/n_out − 0.5`, clamped below at 0; the upper index is
/// clamped to the last one (torch `align_corners=False`, OpenCV `INTER_LINEAR`).
fn taps(n_in: usize, n_out: usize) -> Vec<(usize, usize, f32)> {
    let scale = n_in as f64 / n_out as f64;
    (0..n_out)
        .map(|o| {
            let src = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(n_in - 1);
            let i1 = (i0 + 1).min(n_in - 1);
            (i0, i1, (src - i0 as f64) as f32)
        })
        .collect()
}

impl Resize {
    /// A plan from side `s` to `height`×`width` (each 1..=[`MAX_RESIZE_SIDE`];
    /// `s` ≥ 1).
    pub fn new(s: usize, height: usize, width: usize) -> Result<Resize> {
        Self::rect(s, s, height, width)
    }

    /// A plan from a `src_height`×`src_width` image (each 1..=2²⁰) to
    /// `height`×`width` (each 1..=[`MAX_RESIZE_SIDE`]).
    pub fn rect(
        src_height: usize,
        src_width: usize,
        height: usize,
        width: usize,
    ) -> Result<Resize> {
        let max = MAX_RESIZE_SIDE;
        let src = 1..=(1 << 20);
        if !src.contains(&src_height)
            || !src.contains(&src_width)
            || !(1..=max).contains(&height)
            || !(1..=max).contains(&width)
        {
            return Err(Error::usage(format!(
                "resize: cannot resize {src_height}x{src_width} to {height}x{width} \
                 (sides 1..={max})"
            )));
        }
        Ok(Resize {
            sh: src_height,
            sw: src_width,
            height,
            width,
            ys: taps(src_height, height),
            xs: taps(src_width, width),
        })
    }

    /// Values of one source image (`3·src_height·src_width`).
    pub fn src_len(&self) -> usize {
        3 * self.sh * self.sw
    }

    /// Values of one output image (`3·height·width`).
    pub fn out_len(&self) -> usize {
        3 * self.height * self.width
    }

    /// Resize one image.
    pub fn apply<T: Pixel>(&self, src: &[T], dst: &mut [T]) -> Result<()> {
        self.apply_with(src, dst, &mut Vec::new())
    }

    /// Resize one image, with `scratch` for the intermediate rows (reused across calls
    /// to save an allocation per image).
    pub fn apply_with<T: Pixel>(
        &self,
        src: &[T],
        dst: &mut [T],
        scratch: &mut Vec<f32>,
    ) -> Result<()> {
        let (sh, sw) = (self.sh, self.sw);
        if sh == sw {
            check("resize", sh, src.len(), dst.len(), self.out_len())?;
        } else if src.len() != 3 * sh * sw || dst.len() != self.out_len() {
            return Err(Error::usage(format!(
                "resize: an image of {sh}x{sw} needs {} source and {} destination values, \
                 got {} and {}",
                3 * sh * sw,
                self.out_len(),
                src.len(),
                dst.len()
            )));
        }
        let (h, w) = (self.height, self.width);
        // Every source row resampled across the width once, then blended row pairs.
        scratch.clear();
        scratch.resize(sh * w, 0.0);
        for (sp, dp) in src.chunks_exact(sh * sw).zip(dst.chunks_exact_mut(h * w)) {
            for (r, t) in sp.chunks_exact(sw).zip(scratch.chunks_exact_mut(w)) {
                for (o, &(x0, x1, lx)) in t.iter_mut().zip(&self.xs) {
                    *o = r[x0].to_f32() * (1.0 - lx) + r[x1].to_f32() * lx;
                }
            }
            for (&(y0, y1, ly), drow) in self.ys.iter().zip(dp.chunks_exact_mut(w)) {
                let r0 = &scratch[y0 * w..][..w];
                let r1 = &scratch[y1 * w..][..w];
                let ky = 1.0 - ly;
                for ((o, &t), &b) in drow.iter_mut().zip(r0).zip(r1) {
                    *o = T::from_f32(t * ky + b * ly);
                }
            }
        }
        Ok(())
    }
}

/// Per-channel normalization `(x − mean_c) / std_c`, with `x = pixel / 255` for `u8`.
#[derive(Clone, Debug, PartialEq)]
pub struct Normalize {
    mean: [f64; 3],
    std: [f64; 3],
    lut: Box<[[f32; 256]; 3]>,
}

impl Normalize {
    /// A normalization; every mean and std must be finite and every std non-zero.
    pub fn new(mean: [f64; 3], std: [f64; 3]) -> Result<Normalize> {
        const NAMES: [&str; 3] = ["r", "g", "b"];
        for c in 0..3 {
            if !mean[c].is_finite() {
                return Err(Error::usage(format!(
                    "normalize: mean_{} must be finite, got {}",
                    NAMES[c], mean[c]
                )));
            }
            if !std[c].is_finite() || std[c] == 0.0 {
                return Err(Error::usage(format!(
                    "normalize: std_{} must be finite and non-zero, got {}",
                    NAMES[c], std[c]
                )));
            }
        }
        let mut lut = Box::new([[0f32; 256]; 3]);
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, out) in table.iter_mut().enumerate() {
                *out = ((v as f64 / 255.0 - mean[c]) / std[c]) as f32;
            }
        }
        Ok(Normalize { mean, std, lut })
    }

    /// Normalize a `u8` image (values divided by 255 first).
    pub fn apply_u8(&self, src: &[u8], s: usize, dst: &mut [f32]) -> Result<()> {
        check("normalize", s, src.len(), dst.len(), src.len())?;
        let plane = s * s;
        for ((dp, sp), table) in dst
            .chunks_exact_mut(plane)
            .zip(src.chunks_exact(plane))
            .zip(self.lut.iter())
        {
            for (o, &v) in dp.iter_mut().zip(sp) {
                *o = table[usize::from(v)];
            }
        }
        Ok(())
    }

    /// Normalize an `f32` image (values taken as already in `[0, 1]`: no division).
    pub fn apply_f32(&self, src: &[f32], s: usize, dst: &mut [f32]) -> Result<()> {
        check("normalize", s, src.len(), dst.len(), src.len())?;
        let plane = s * s;
        for (c, (dp, sp)) in dst
            .chunks_exact_mut(plane)
            .zip(src.chunks_exact(plane))
            .enumerate()
        {
            let (mean, std) = (self.mean[c], self.std[c]);
            for (o, &v) in dp.iter_mut().zip(sp) {
                *o = ((f64::from(v) - mean) / std) as f32;
            }
        }
        Ok(())
    }
}
