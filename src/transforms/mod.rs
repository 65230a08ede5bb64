//! Image preprocessing and augmentation as DataFusion scalar functions, so that a training
//! pipeline is one SQL query over the `stream` table.
//!
//! Images are `FixedSizeList<UInt8 or Float32, 3·s·s>` in CIFAR order (red plane, green
//! plane, blue plane; each plane `s`×`s` row-major). The side `s` is inferred from the list
//! length (32 for CIFAR). [`register`] adds these functions to a session:
//!
//! | function | result |
//! |----------|--------|
//! | `normalize(image, mean_r, mean_g, mean_b, std_r, std_g, std_b)` | `FixedSizeList<Float32, len>`: `(x − mean_c) / std_c` per channel, where `x` is `pixel / 255` for UInt8 images and the value itself for Float32 images (taken to be in `[0, 1]` already) |
//! | `hflip(image, p [, batch, row])` | the image mirrored across its width (columns reversed) with probability `p` |
//! | `hflip_alternating(image, epoch)` | airbench94's alternating flip: in epoch 0 the image is mirrored or not by a coin that is a hash of (seed, the image's values), in every later epoch exactly when it was not in the epoch before (`epoch` an integer ≥ 0; pass the raw image, before any random transform) |
//! | `epoch(batch)` | the epoch a batch number falls in, `batch / batches per epoch`, for a source that knows its epochs (a dataset served over loopback by `train --data`); elsewhere an error saying so |
//! | `vflip(image, p [, batch, row])` | the image mirrored across its height (rows reversed) with probability `p` |
//! | `color_shift(image, r, g, b, p [, batch, row])` | with probability `p`: the red plane rolled by `r` rows, the green plane by `g` columns, the blue plane by `b` rows (`numpy.roll`: wrap-around, positive shifts towards higher indices) |
//! | `random_crop(image, padding [, batch, row])` | each plane zero-padded by `padding` on all sides, then an `s`×`s` window cropped at offsets drawn uniformly from `0..=2·padding` on each axis (`padding = 0` is the identity) |
//! | `translate(image, pixels [, batch, row])` | the image shifted by offsets drawn uniformly from `-pixels..=pixels` on each axis, the pixels it uncovers filled by reflection at the border (PyTorch's `reflect` padding, then a crop: airbench's augmentation); `pixels` below the side |
//! | `resize(image, height, width)` | bilinear resampling with half-pixel centres (OpenCV `INTER_LINEAR`, torch `align_corners=False`, no antialiasing) to `3·height·width` values |
//!
//! The image functions other than `normalize` keep the element type: UInt8 in, UInt8 out
//! (`resize` rounds half away from zero and clamps to 0..=255), Float32 in, Float32 out (no
//! rounding). A null image gives a null result, and so does a null in any other argument of
//! that row. Every numeric argument may be a constant or a column, of any integer or float
//! type — except `resize`'s `height` and `width`, which set the result type and so must be
//! constants. Arguments that must be integers (`r`, `g`, `b`, `padding`, `height`, `width`)
//! may be given as floats with integral values. Bad types, lengths and values are errors
//! that name the function and the argument; nothing here panics on input.
//!
//! # Reproducible randomness
//!
//! Each random decision is a pure function of `(seed, function, batch, row)`: the 64-bit
//! hash `h = mix(mix(seed, salt), mix(batch, row))` (with [`crate::rng::mix`], and `salt`
//! the FNV-1a hash of the function's name) gives `u = (h >> 11) · 2⁻⁵³`, uniform in
//! `[0, 1)`, and the transform is applied iff `u < p` — so `p = 0` never applies it and
//! `p = 1` always does, exactly. `random_crop` draws its offsets as `⌊h·(2·padding+1) / 2⁶⁴⌋`
//! (rows) and the same of `mix(h, 1)` (columns); `translate` draws them the same way with
//! `pixels` for `padding`. `p` must be in `[0, 1]`.
//!
//! The random functions take the position as two optional trailing arguments, `batch` and
//! `row` (integers of any type; the stream table's `batch` and `"row"` columns are meant):
//! `hflip(image, p, batch, "row")`. **Training SQL should pass them**: then the augmentation
//! of every image is reproducible across runs, engines and batchings. Without them the
//! position is (a call counter of this function instance, the row's index in the evaluated
//! array): reproducible for the same sequence of batches within one registration, but not
//! across runs or plans. [`register`] with a new seed replaces the functions (and resets
//! their counters).

pub mod pixels;

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use datafusion::arrow::array::builder::NullBufferBuilder;
use datafusion::arrow::array::{
    Array, ArrayRef, FixedSizeListArray, Float32Array, Float64Array, PrimitiveArray, UInt64Array,
    UInt8Array,
};
use datafusion::arrow::buffer::ScalarBuffer;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{
    ArrowPrimitiveType, DataType, Field, FieldRef, Int64Type, UInt64Type,
};
use datafusion::common::{exec_datafusion_err, internal_err, plan_err, Result, ScalarValue};
use datafusion::error::DataFusionError;
use datafusion::logical_expr::{
    ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
    Volatility,
};
use datafusion::prelude::SessionContext;

use crate::rng::mix;

/// The largest `padding` accepted by `random_crop`.
pub const MAX_PADDING: usize = 1 << 16;

/// Names of the functions [`register`] adds.
pub const FUNCTIONS: [&str; 9] = [
    "normalize",
    "hflip",
    "hflip_alternating",
    "epoch",
    "vflip",
    "color_shift",
    "random_crop",
    "translate",
    "resize",
];

/// Register the image functions in `ctx`, with `seed` for the random ones; registering
/// again replaces them (a trainer calls this with its run's seed).
pub fn register(ctx: &SessionContext, seed: u64) {
    for udf in udfs(seed) {
        ctx.register_udf(udf);
    }
    register_epochs(ctx, None);
}

/// Register `epoch(batch)`: `batch / per_epoch` for a source of `per_epoch` batches per
/// epoch (a dataset served over loopback), or, with `None`, a function that says the
/// source's epochs are not known.
pub fn register_epochs(ctx: &SessionContext, per_epoch: Option<u64>) {
    ctx.register_udf(ScalarUDF::from(EpochUdf::new(per_epoch)));
}

/// The image functions as DataFusion UDFs, with `seed` for the random ones.
pub fn udfs(seed: u64) -> Vec<ScalarUDF> {
    Kind::ALL
        .iter()
        .map(|&kind| ScalarUDF::from(ImageUdf::new(kind, seed)))
        .collect()
}

use pixels::{Pixel, MAX_RESIZE_SIDE};

/// 2⁻⁵³, to turn the top 53 bits of a hash into a float in `[0, 1)`.
const UNIT: f64 = 1.0 / (1u64 << 53) as f64;

/// The hash behind every random decision at one position.
fn position_hash(seed: u64, salt: u64, batch: u64, row: u64) -> u64 {
    mix(mix(seed, salt), mix(batch, row))
}

/// A uniform float in `[0, 1)` from a hash.
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 * UNIT
}

/// A uniform integer in `0..n` from a hash.
fn below(h: u64, n: u64) -> u64 {
    ((u128::from(h) * u128::from(n)) >> 64) as u64
}

/// The 64-bit FNV prime, of [`fnv1a`] and the image hash of [`alternating_flip`].
const FNV_PRIME: u64 = 0x0100_0000_01b3;

/// FNV-1a of a name: each function's salt.
fn fnv1a(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    })
}

/// airbench94's alternating flip: whether `image` is mirrored in `epoch`. Its first
/// epoch's coin is a hash of (seed, function, the image's values), so the same image gets
/// the same coin wherever and whenever it arrives (shuffled into any batch and row, after
/// a resume, as UInt8 or as the same values in Float32); each later epoch mirrors exactly
/// the images the epoch before did not.
fn alternating_flip<T: Pixel>(seed: u64, salt: u64, image: &[T], epoch: u64) -> bool {
    // Two values per step of a multiply-xor hash (f32 bits: a u8 and its f32 agree),
    // finished by `mix`.
    let h = image.chunks(2).fold(0x9e37_79b9_7f4a_7c15u64, |h, c| {
        let lo = u64::from(c[0].to_f32().to_bits());
        let hi = c.get(1).map_or(0, |v| u64::from(v.to_f32().to_bits()));
        (h ^ (hi << 32 | lo)).wrapping_mul(FNV_PRIME)
    });
    (mix(mix(seed, salt), h) >> 63) ^ (epoch & 1) == 1
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Normalize,
    HFlip,
    HFlipAlternating,
    VFlip,
    ColorShift,
    RandomCrop,
    Translate,
    Resize,
}

impl Kind {
    const ALL: [Kind; 8] = [
        Kind::Normalize,
        Kind::HFlip,
        Kind::HFlipAlternating,
        Kind::VFlip,
        Kind::ColorShift,
        Kind::RandomCrop,
        Kind::Translate,
        Kind::Resize,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::Normalize => "normalize",
            Kind::HFlip => "hflip",
            Kind::HFlipAlternating => "hflip_alternating",
            Kind::VFlip => "vflip",
            Kind::ColorShift => "color_shift",
            Kind::RandomCrop => "random_crop",
            Kind::Translate => "translate",
            Kind::Resize => "resize",
        }
    }

    /// The numeric arguments after the image.
    fn params(self) -> &'static [&'static str] {
        match self {
            Kind::Normalize => &["mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b"],
            Kind::HFlip | Kind::VFlip => &["p"],
            Kind::HFlipAlternating => &["epoch"],
            Kind::ColorShift => &["r", "g", "b", "p"],
            Kind::RandomCrop => &["padding"],
            Kind::Translate => &["pixels"],
            Kind::Resize => &["height", "width"],
        }
    }

    /// Whether the function is random (and takes the optional `batch, row`).
    fn random(self) -> bool {
        matches!(
            self,
            Kind::HFlip | Kind::VFlip | Kind::ColorShift | Kind::RandomCrop | Kind::Translate
        )
    }

    /// `name(image, a, b [, batch, row])`, for messages.
    fn usage(self) -> String {
        let mut s = format!("{}(image", self.name());
        for p in self.params() {
            s.push_str(", ");
            s.push_str(p);
        }
        if self.random() {
            s.push_str(" [, batch, row]");
        }
        s.push(')');
        s
    }

    /// Check the argument count; says whether `batch, row` are there.
    fn arity(self, n: usize) -> Result<bool> {
        let base = 1 + self.params().len();
        if n == base {
            Ok(false)
        } else if self.random() && n == base + 2 {
            Ok(true)
        } else {
            let expected = if self.random() {
                format!("{base} or {}", base + 2)
            } else {
                base.to_string()
            };
            plan_err!(
                "{}: takes {expected} arguments, got {n} (usage: {})",
                self.name(),
                self.usage()
            )
        }
    }

    /// The name of argument `i` (0 = image).
    fn arg_name(self, i: usize) -> &'static str {
        let params = self.params();
        match i {
            0 => "image",
            i if i <= params.len() => params[i - 1],
            i if i == params.len() + 1 => "batch",
            _ => "row",
        }
    }
}

/// One of the image functions.
struct ImageUdf {
    kind: Kind,
    seed: u64,
    salt: u64,
    signature: Signature,
    /// Calls so far, the position's first half when `batch, row` are not given.
    calls: AtomicU64,
}

impl ImageUdf {
    fn new(kind: Kind, seed: u64) -> Self {
        let volatility = if kind.random() {
            Volatility::Volatile
        } else {
            Volatility::Immutable
        };
        ImageUdf {
            kind,
            seed,
            salt: fnv1a(kind.name()),
            signature: Signature::user_defined(volatility),
            calls: AtomicU64::new(0),
        }
    }

    fn name_str(&self) -> &'static str {
        self.kind.name()
    }

    /// The image type's element type and length, or a plan error.
    fn image_type(&self, t: &DataType) -> Result<(FieldRef, usize)> {
        let name = self.name_str();
        match t {
            DataType::FixedSizeList(item, len)
                if matches!(item.data_type(), DataType::UInt8 | DataType::Float32) =>
            {
                let len = usize::try_from(*len).unwrap_or(0);
                if pixels::side(len).is_none() {
                    return plan_err!(
                        "{name}: argument image has {len} values per image, which is not 3·s·s \
                         for any side s (3072 for 32x32)"
                    );
                }
                Ok((item.clone(), len))
            }
            other => plan_err!(
                "{name}: argument image must be FixedSizeList<UInt8 or Float32, 3·s·s>, got \
                 {other}"
            ),
        }
    }

    /// The result type, from the argument types and constant arguments.
    fn output_type(
        &self,
        types: &[DataType],
        scalars: &[Option<&ScalarValue>],
    ) -> Result<DataType> {
        let name = self.name_str();
        self.kind.arity(types.len())?;
        let (item, len) = self.image_type(&types[0])?;
        match self.kind {
            Kind::Normalize => Ok(DataType::FixedSizeList(
                Arc::new(Field::new(
                    item.name(),
                    DataType::Float32,
                    item.is_nullable(),
                )),
                len as i32,
            )),
            Kind::Resize => {
                let mut size = [0usize; 2];
                for (k, slot) in size.iter_mut().enumerate() {
                    let arg = self.kind.arg_name(1 + k);
                    let Some(v) = scalars.get(1 + k).copied().flatten() else {
                        return plan_err!(
                            "{name}: argument {arg} must be a constant (it sets the result \
                             type's length)"
                        );
                    };
                    *slot = resize_side(arg, scalar_f64(name, arg, v)?)?;
                }
                Ok(DataType::FixedSizeList(
                    item,
                    (3 * size[0] * size[1]) as i32,
                ))
            }
            _ => Ok(types[0].clone()),
        }
    }

    fn invoke(&self, args: ScalarFunctionArgs) -> Result<ArrayRef> {
        let kind = self.kind;
        let name = kind.name();
        let with_position = kind.arity(args.args.len())?;
        let n = args.number_rows;
        let image = args.args[0].to_array(n)?;
        let (_, in_len) = self.image_type(image.data_type())?;
        let list = image
            .as_any()
            .downcast_ref::<FixedSizeListArray>()
            .ok_or_else(|| exec_datafusion_err!("{name}: argument image is not a list array"))?;
        let s = pixels::side(in_len)
            .ok_or_else(|| exec_datafusion_err!("{name}: bad image length {in_len}"))?;
        let (out_item, out_len) = match args.return_type() {
            DataType::FixedSizeList(item, len) => {
                (item.clone(), usize::try_from(*len).unwrap_or(0))
            }
            other => return internal_err!("{name}: unexpected return type {other}"),
        };
        let np = kind.params().len();
        let params = (0..np)
            .map(|k| NumArg::new(name, kind.arg_name(1 + k), &args.args[1 + k]))
            .collect::<Result<Vec<_>>>()?;
        let position = if !kind.random() {
            Position::Counter(0)
        } else if with_position {
            Position::Columns(
                PosArg::new(name, "batch", &args.args[np + 1])?,
                PosArg::new(name, "row", &args.args[np + 2])?,
            )
        } else {
            Position::Counter(self.calls.fetch_add(1, Ordering::Relaxed))
        };
        check_element_nulls(name, list, in_len)?;
        let env = Env {
            name,
            seed: self.seed,
            salt: self.salt,
            s,
            in_len,
            out_len,
            out_item,
            params,
            position,
        };
        let values = list.values();
        match values.data_type() {
            DataType::UInt8 => {
                let src = values
                    .as_any()
                    .downcast_ref::<UInt8Array>()
                    .ok_or_else(|| exec_datafusion_err!("{name}: image values are not UInt8"))?;
                env.dispatch::<u8>(kind, list, src.values())
            }
            DataType::Float32 => {
                let src = values
                    .as_any()
                    .downcast_ref::<Float32Array>()
                    .ok_or_else(|| exec_datafusion_err!("{name}: image values are not Float32"))?;
                env.dispatch::<f32>(kind, list, src.values())
            }
            other => Err(DataFusionError::Execution(format!(
                "{name}: argument image must have UInt8 or Float32 elements, got {other}"
            ))),
        }
    }
}

/// `resize`'s height or width, checked.
fn resize_side(arg: &str, v: f64) -> Result<usize> {
    let max = MAX_RESIZE_SIDE;
    if v.fract() != 0.0 || !(1.0..=max as f64).contains(&v) {
        return plan_err!("resize: argument {arg} must be an integer in 1..={max}, got {v}");
    }
    Ok(v as usize)
}

/// A numeric constant as `f64`.
fn scalar_f64(name: &str, arg: &str, v: &ScalarValue) -> Result<f64> {
    match NumArg::new(name, arg, &ColumnarValue::Scalar(v.clone()))? {
        NumArg::Scalar(Some(x)) => Ok(x),
        _ => plan_err!("{name}: argument {arg} must not be null"),
    }
}

/// A row whose image is not null but holds null elements is an error: the kernels see
/// only values.
fn check_element_nulls(name: &str, list: &FixedSizeListArray, len: usize) -> Result<()> {
    let Some(nulls) = list.values().logical_nulls() else {
        return Ok(());
    };
    if nulls.null_count() == 0 {
        return Ok(());
    }
    for i in 0..list.len() {
        if list.is_valid(i) && nulls.slice(i * len, len).null_count() > 0 {
            return Err(DataFusionError::Execution(format!(
                "{name}: the image in row {i} has null elements (a null image is fine; null \
                 pixels are not)"
            )));
        }
    }
    Ok(())
}

/// A numeric argument, constant or per row, as `f64`.
enum NumArg {
    Scalar(Option<f64>),
    Column(Float64Array),
}

impl NumArg {
    fn new(name: &str, arg: &str, v: &ColumnarValue) -> Result<NumArg> {
        let t = v.data_type();
        if !(t.is_numeric() || t == DataType::Null) {
            return Err(DataFusionError::Execution(format!(
                "{name}: argument {arg} must be a number, got {t}"
            )));
        }
        match v {
            ColumnarValue::Scalar(sv) if sv.is_null() => Ok(NumArg::Scalar(None)),
            ColumnarValue::Scalar(sv) => match sv.cast_to(&DataType::Float64)? {
                ScalarValue::Float64(x) => Ok(NumArg::Scalar(x)),
                other => internal_err!("{name}: {arg} cast to {}", other.data_type()),
            },
            ColumnarValue::Array(a) => {
                let c = cast(a, &DataType::Float64)?;
                let c = c
                    .as_any()
                    .downcast_ref::<Float64Array>()
                    .ok_or_else(|| exec_datafusion_err!("{name}: {arg} did not cast to Float64"))?
                    .clone();
                Ok(NumArg::Column(c))
            }
        }
    }

    #[inline]
    fn get(&self, i: usize) -> Option<f64> {
        match self {
            NumArg::Scalar(v) => *v,
            NumArg::Column(a) => a.is_valid(i).then(|| a.value(i)),
        }
    }
}

/// A position argument (`batch` or `row`), as the bits of a `u64`.
enum PosArg {
    Scalar(Option<u64>),
    Column(UInt64Array),
}

impl PosArg {
    fn new(name: &str, arg: &str, v: &ColumnarValue) -> Result<PosArg> {
        let t = v.data_type();
        let target = if t.is_signed_integer() {
            DataType::Int64
        } else if t.is_unsigned_integer() || t == DataType::Null {
            DataType::UInt64
        } else {
            return Err(DataFusionError::Execution(format!(
                "{name}: argument {arg} must be an integer, got {t}"
            )));
        };
        match v {
            ColumnarValue::Scalar(sv) => Ok(PosArg::Scalar(match sv.cast_to(&target)? {
                ScalarValue::Int64(x) => x.map(|x| x as u64),
                ScalarValue::UInt64(x) => x,
                _ => None,
            })),
            ColumnarValue::Array(a) => {
                let c = cast(a, &target)?;
                let c = if let Some(signed) = c.as_any().downcast_ref::<PrimitiveArray<Int64Type>>()
                {
                    signed.unary::<_, UInt64Type>(|x| x as u64)
                } else {
                    c.as_any()
                        .downcast_ref::<UInt64Array>()
                        .ok_or_else(|| exec_datafusion_err!("{name}: {arg} did not cast"))?
                        .clone()
                };
                Ok(PosArg::Column(c))
            }
        }
    }

    #[inline]
    fn get(&self, i: usize) -> Option<u64> {
        match self {
            PosArg::Scalar(v) => *v,
            PosArg::Column(a) => a.is_valid(i).then(|| a.value(i)),
        }
    }
}

/// Where a row is, for its random decisions.
enum Position {
    /// (call counter, row index).
    Counter(u64),
    /// The `batch` and `row` arguments.
    Columns(PosArg, PosArg),
}

impl Position {
    #[inline]
    fn get(&self, i: usize) -> Option<(u64, u64)> {
        match self {
            Position::Counter(c) => Some((*c, i as u64)),
            Position::Columns(b, r) => Some((b.get(i)?, r.get(i)?)),
        }
    }
}

/// Everything one evaluation needs.
struct Env {
    name: &'static str,
    seed: u64,
    salt: u64,
    s: usize,
    in_len: usize,
    out_len: usize,
    out_item: FieldRef,
    params: Vec<NumArg>,
    position: Position,
}

/// A probability argument, checked.
fn probability(name: &str, p: f64, row: usize) -> Result<f64> {
    if !(0.0..=1.0).contains(&p) {
        return Err(DataFusionError::Execution(format!(
            "{name}: argument p must be in [0, 1], got {p} (row {row})"
        )));
    }
    Ok(p)
}

/// An integer argument, checked.
fn integer(name: &str, arg: &str, v: f64, row: usize) -> Result<i64> {
    // 2^53: beyond it not every integer is a float; far beyond any sensible shift.
    if v.fract() != 0.0 || v.abs() > 9_007_199_254_740_992.0 {
        return Err(DataFusionError::Execution(format!(
            "{name}: argument {arg} must be an integer, got {v} (row {row})"
        )));
    }
    Ok(v as i64)
}

impl Env {
    fn hash(&self, i: usize) -> Option<u64> {
        let (b, r) = self.position.get(i)?;
        Some(position_hash(self.seed, self.salt, b, r))
    }

    fn dispatch<T: Pixel>(
        &self,
        kind: Kind,
        list: &FixedSizeListArray,
        src: &[T],
    ) -> Result<ArrayRef> {
        let name = self.name;
        let s = self.s;
        match kind {
            Kind::Normalize => self.normalize(list, src),
            Kind::HFlipAlternating => self.map_rows::<T, T>(list, src, |i, from, to| {
                let Some(epoch) = self.params[0].get(i) else {
                    return Ok(false);
                };
                let epoch = integer(name, "epoch", epoch, i)?;
                if epoch < 0 {
                    return Err(DataFusionError::Execution(format!(
                        "{name}: argument epoch must be ≥ 0, got {epoch} (row {i})"
                    )));
                }
                if alternating_flip(self.seed, self.salt, from, epoch as u64) {
                    pixels::hflip(from, s, to)?;
                } else {
                    to.copy_from_slice(from);
                }
                Ok(true)
            }),
            Kind::HFlip | Kind::VFlip => {
                let flip = if kind == Kind::HFlip {
                    pixels::hflip::<T>
                } else {
                    pixels::vflip::<T>
                };
                self.map_rows::<T, T>(list, src, |i, from, to| {
                    let Some(p) = self.params[0].get(i) else {
                        return Ok(false);
                    };
                    let p = probability(name, p, i)?;
                    let Some(h) = self.hash(i) else {
                        return Ok(false);
                    };
                    if unit(h) < p {
                        flip(from, s, to)?;
                    } else {
                        to.copy_from_slice(from);
                    }
                    Ok(true)
                })
            }
            Kind::ColorShift => self.map_rows::<T, T>(list, src, |i, from, to| {
                let mut v = [0f64; 4];
                for (k, slot) in v.iter_mut().enumerate() {
                    match self.params[k].get(i) {
                        Some(x) => *slot = x,
                        None => return Ok(false),
                    }
                }
                let r = integer(name, "r", v[0], i)?;
                let g = integer(name, "g", v[1], i)?;
                let b = integer(name, "b", v[2], i)?;
                let p = probability(name, v[3], i)?;
                let Some(h) = self.hash(i) else {
                    return Ok(false);
                };
                if unit(h) < p {
                    pixels::color_shift(from, s, r, g, b, to)?;
                } else {
                    to.copy_from_slice(from);
                }
                Ok(true)
            }),
            Kind::RandomCrop => self.map_rows::<T, T>(list, src, |i, from, to| {
                let Some(padding) = self.params[0].get(i) else {
                    return Ok(false);
                };
                let padding = integer(name, "padding", padding, i)?;
                if !(0..=MAX_PADDING as i64).contains(&padding) {
                    return Err(DataFusionError::Execution(format!(
                        "{name}: argument padding must be in 0..={MAX_PADDING}, got {padding} \
                         (row {i})"
                    )));
                }
                let Some(h) = self.hash(i) else {
                    return Ok(false);
                };
                let n = 2 * padding as u64 + 1;
                let oy = below(h, n) as usize;
                let ox = below(mix(h, 1), n) as usize;
                pixels::crop(from, s, padding as usize, oy, ox, to)?;
                Ok(true)
            }),
            Kind::Translate => self.map_rows::<T, T>(list, src, |i, from, to| {
                let Some(pixels) = self.params[0].get(i) else {
                    return Ok(false);
                };
                let pixels = integer(name, "pixels", pixels, i)?;
                if !(0..s as i64).contains(&pixels) {
                    return Err(DataFusionError::Execution(format!(
                        "{name}: argument pixels must be in 0..{s} (below the side), got \
                         {pixels} (row {i})"
                    )));
                }
                let Some(h) = self.hash(i) else {
                    return Ok(false);
                };
                let n = 2 * pixels as u64 + 1;
                let dy = below(h, n) as i64 - pixels;
                let dx = below(mix(h, 1), n) as i64 - pixels;
                pixels::translate_reflect(from, s, dy, dx, to)?;
                Ok(true)
            }),
            Kind::Resize => {
                let mut size = [0usize; 2];
                for (k, slot) in size.iter_mut().enumerate() {
                    let arg = kind.arg_name(1 + k);
                    match &self.params[k] {
                        NumArg::Scalar(Some(v)) => *slot = resize_side(arg, *v)?,
                        _ => {
                            return Err(DataFusionError::Execution(format!(
                                "{name}: argument {arg} must be a non-null constant"
                            )))
                        }
                    }
                }
                let plan = pixels::Resize::new(s, size[0], size[1])?;
                if plan.out_len() != self.out_len {
                    return internal_err!(
                        "{name}: planned for {} values, asked for {}",
                        self.out_len,
                        plan.out_len()
                    );
                }
                let mut scratch = Vec::new();
                self.map_rows::<T, T>(list, src, |_, from, to| {
                    plan.apply_with(from, to, &mut scratch)?;
                    Ok(true)
                })
            }
        }
    }

    fn normalize<T: Pixel>(&self, list: &FixedSizeListArray, src: &[T]) -> Result<ArrayRef> {
        let name = self.name;
        let s = self.s;
        let mut current: Option<([u64; 6], pixels::Normalize)> = None;
        self.map_rows::<T, f32>(list, src, |i, from, to| {
            let mut v = [0f64; 6];
            for (k, slot) in v.iter_mut().enumerate() {
                match self.params[k].get(i) {
                    Some(x) => *slot = x,
                    None => return Ok(false),
                }
            }
            let bits = v.map(f64::to_bits);
            let fresh = match &current {
                Some((b, _)) => *b != bits,
                None => true,
            };
            if fresh {
                let norm = pixels::Normalize::new([v[0], v[1], v[2]], [v[3], v[4], v[5]])
                    .map_err(|e| DataFusionError::Execution(format!("{e} (row {i})")))?;
                current = Some((bits, norm));
            }
            let Some((_, norm)) = &current else {
                return internal_err!("{name}: no normalization");
            };
            T::normalize(norm, from, s, to)?;
            Ok(true)
        })
    }

    /// Run `row` over every non-null image: it writes `to` and says whether the row is
    /// valid (false: a null argument made it null).
    fn map_rows<I: Copy, O: Pixel>(
        &self,
        list: &FixedSizeListArray,
        src: &[I],
        mut row: impl FnMut(usize, &[I], &mut [O]) -> Result<bool>,
    ) -> Result<ArrayRef> {
        let name = self.name;
        let n = list.len();
        let (in_len, out_len) = (self.in_len, self.out_len);
        let src = n
            .checked_mul(in_len)
            .and_then(|total| src.get(..total))
            .ok_or_else(|| exec_datafusion_err!("{name}: image values shorter than the array"))?;
        let total = n.checked_mul(out_len).ok_or_else(|| {
            exec_datafusion_err!("{name}: {n} images of {out_len} values is too many")
        })?;
        let mut out = vec![O::default(); total];
        let mut nulls = NullBufferBuilder::new(n);
        if in_len > 0 && out_len > 0 {
            for (i, (to, from)) in out
                .chunks_exact_mut(out_len)
                .zip(src.chunks_exact(in_len))
                .enumerate()
            {
                if list.is_null(i) {
                    nulls.append_null();
                } else if row(i, from, to)? {
                    nulls.append_non_null();
                } else {
                    to.fill(O::default());
                    nulls.append_null();
                }
            }
        }
        let values = PrimitiveArray::<O::Arrow>::new(ScalarBuffer::from(out), None);
        let item = if self.out_item.data_type() == &<O::Arrow as ArrowPrimitiveType>::DATA_TYPE {
            self.out_item.clone()
        } else {
            return internal_err!(
                "{name}: result elements are {}, not {}",
                self.out_item.data_type(),
                <O::Arrow as ArrowPrimitiveType>::DATA_TYPE
            );
        };
        Ok(Arc::new(FixedSizeListArray::try_new(
            item,
            out_len as i32,
            Arc::new(values),
            nulls.finish(),
        )?))
    }
}

impl fmt::Debug for ImageUdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageUdf")
            .field("name", &self.kind.name())
            .field("seed", &self.seed)
            .finish_non_exhaustive()
    }
}

impl PartialEq for ImageUdf {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && self.seed == other.seed
    }
}

impl Eq for ImageUdf {}

impl Hash for ImageUdf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.kind.hash(state);
        self.seed.hash(state);
    }
}

/// `epoch(batch)`: `batch / per_epoch`, or an error where the source's epochs are not
/// known (`per_epoch` is `None`, or 0).
#[derive(Debug, PartialEq, Eq, Hash)]
struct EpochUdf {
    per_epoch: Option<u64>,
    signature: Signature,
}

impl EpochUdf {
    fn new(per_epoch: Option<u64>) -> Self {
        EpochUdf {
            per_epoch: per_epoch.filter(|&n| n > 0),
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for EpochUdf {
    fn name(&self) -> &str {
        "epoch"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        match arg_types {
            [t] if t.is_integer() || *t == DataType::Null => Ok(vec![DataType::UInt64]),
            [t] => plan_err!("epoch: argument batch must be an integer, got {t}"),
            _ => plan_err!("epoch: takes 1 argument (batch), got {}", arg_types.len()),
        }
    }

    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(DataType::UInt64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let Some(per) = self.per_epoch else {
            return Err(DataFusionError::Execution(
                "epoch(batch): this source's epochs are not known; a dataset served by \
                 `train --data DIR` knows them (a tcp, file or Kafka source does not)"
                    .into(),
            ));
        };
        let [batch] = args.args.as_slice() else {
            return plan_err!("epoch: takes 1 argument (batch), got {}", args.args.len());
        };
        let batch = batch.to_array(args.number_rows)?;
        let batch = batch
            .as_any()
            .downcast_ref::<UInt64Array>()
            .ok_or_else(|| exec_datafusion_err!("epoch: argument batch is not UInt64"))?;
        let out: UInt64Array = batch.iter().map(|b| b.map(|b| b / per)).collect();
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}

impl ScalarUDFImpl for ImageUdf {
    fn name(&self) -> &str {
        self.kind.name()
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        let name = self.name_str();
        let with_position = self.kind.arity(arg_types.len())?;
        self.image_type(&arg_types[0])?;
        let np = self.kind.params().len();
        for (i, t) in arg_types.iter().enumerate().skip(1) {
            let arg = self.kind.arg_name(i);
            let ok = if with_position && i > np {
                t.is_integer() || *t == DataType::Null
            } else {
                t.is_numeric() || *t == DataType::Null
            };
            if !ok {
                let what = if with_position && i > np {
                    "an integer"
                } else {
                    "a number"
                };
                return plan_err!("{name}: argument {arg} must be {what}, got {t}");
            }
        }
        // Accepted as they are: the function casts at run time.
        Ok(arg_types.to_vec())
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.output_type(arg_types, &[])
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        let types: Vec<DataType> = args
            .arg_fields
            .iter()
            .map(|f| f.data_type().clone())
            .collect();
        let t = self.output_type(&types, args.scalar_arguments)?;
        let nullable = args.arg_fields.iter().any(|f| f.is_nullable());
        Ok(Arc::new(Field::new(self.name(), t, nullable)))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        Ok(ColumnarValue::Array(self.invoke(args)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int32Array, UInt32Array};
    use datafusion::arrow::buffer::NullBuffer;
    use datafusion::arrow::datatypes::Float32Type;
    use datafusion::config::ConfigOptions;

    /// A 2×2 image: red plane 1 2 / 3 4, green 5 6 / 7 8, blue 9 10 / 11 12.
    const IMG2: [u8; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

    fn list<T: Pixel>(values: Vec<T>, len: usize, nulls: Option<NullBuffer>) -> ArrayRef {
        let item = Arc::new(Field::new(
            "item",
            <T::Arrow as ArrowPrimitiveType>::DATA_TYPE,
            false,
        ));
        let values = PrimitiveArray::<T::Arrow>::new(ScalarBuffer::from(values), None);
        Arc::new(FixedSizeListArray::try_new(item, len as i32, Arc::new(values), nulls).unwrap())
    }

    fn repeat<T: Pixel>(img: &[T], n: usize) -> ArrayRef {
        list(img.repeat(n), img.len(), None)
    }

    fn udf(name: &str, seed: u64) -> ScalarUDF {
        udfs(seed).into_iter().find(|u| u.name() == name).unwrap()
    }

    fn lit(v: impl Into<ScalarValue>) -> ColumnarValue {
        ColumnarValue::Scalar(v.into())
    }

    fn col(a: ArrayRef) -> ColumnarValue {
        ColumnarValue::Array(a)
    }

    /// Plan and invoke `udf` the way DataFusion does.
    fn call(udf: &ScalarUDF, args: Vec<ColumnarValue>) -> Result<FixedSizeListArray> {
        let n = args
            .iter()
            .find_map(|a| match a {
                ColumnarValue::Array(a) => Some(a.len()),
                ColumnarValue::Scalar(_) => None,
            })
            .unwrap_or(1);
        let fields: Vec<FieldRef> = args
            .iter()
            .map(|a| Arc::new(Field::new("a", a.data_type(), true)))
            .collect();
        let types: Vec<DataType> = fields.iter().map(|f| f.data_type().clone()).collect();
        udf.coerce_types(&types)?;
        let scalars: Vec<Option<&ScalarValue>> = args
            .iter()
            .map(|a| match a {
                ColumnarValue::Scalar(s) => Some(s),
                ColumnarValue::Array(_) => None,
            })
            .collect();
        let return_field = udf.return_field_from_args(ReturnFieldArgs {
            arg_fields: &fields,
            scalar_arguments: &scalars,
        })?;
        let out = udf.invoke_with_args(ScalarFunctionArgs {
            args,
            arg_fields: fields,
            number_rows: n,
            return_field,
            config_options: Arc::new(ConfigOptions::default()),
        })?;
        let out = out.to_array(n)?;
        Ok(out
            .as_any()
            .downcast_ref::<FixedSizeListArray>()
            .unwrap()
            .clone())
    }

    fn rows<T: Pixel>(a: &FixedSizeListArray) -> Vec<Option<Vec<T>>> {
        (0..a.len())
            .map(|i| {
                a.is_valid(i).then(|| {
                    a.value(i)
                        .as_any()
                        .downcast_ref::<PrimitiveArray<T::Arrow>>()
                        .unwrap()
                        .values()
                        .to_vec()
                })
            })
            .collect()
    }

    /// `batch` = 7 and `row` = 0..n, as columns.
    fn positions(n: usize) -> [ColumnarValue; 2] {
        [
            col(Arc::new(UInt64Array::from(vec![7u64; n]))),
            col(Arc::new(UInt32Array::from_iter_values(0..n as u32))),
        ]
    }

    fn err_text(r: Result<FixedSizeListArray>) -> String {
        r.expect_err("expected an error").to_string()
    }

    fn flipped(img: &[u8]) -> Vec<u8> {
        let mut out = vec![0; img.len()];
        pixels::hflip(img, pixels::side(img.len()).unwrap(), &mut out).unwrap();
        out
    }

    /// airbench94's alternating flip: each image's coin in epoch 0 comes from its values
    /// (not its position): about half are mirrored; every later epoch mirrors exactly
    /// the images the epoch before did not; the same values in Float32 get the same coins;
    /// another seed other coins.
    #[test]
    fn hflip_alternating_mirrors_each_image_every_other_epoch() {
        let n: usize = 400;
        let mut rng = crate::rng::SplitMix(5);
        let imgs: Vec<Vec<u8>> = (0..n)
            .map(|_| (0..12).map(|_| rng.below(256) as u8).collect())
            .collect();
        assert!(imgs.iter().all(|i| flipped(i) != *i));
        let decide = |seed: u64, images: &[Vec<u8>], epoch: ColumnarValue, float: bool| {
            let flat = images.concat();
            let array = if float {
                list(
                    flat.iter().map(|&v| f32::from(v)).collect::<Vec<f32>>(),
                    12,
                    None,
                )
            } else {
                list(flat, 12, None)
            };
            let out = call(&udf("hflip_alternating", seed), vec![col(array), epoch]).unwrap();
            let rows: Vec<Vec<u8>> = if float {
                rows::<f32>(&out)
                    .into_iter()
                    .map(|r| r.unwrap().iter().map(|&v| v as u8).collect())
                    .collect()
            } else {
                rows::<u8>(&out).into_iter().map(|r| r.unwrap()).collect()
            };
            rows.iter()
                .zip(images)
                .map(|(row, img)| {
                    assert!(*row == *img || *row == flipped(img), "{row:?}");
                    *row != *img
                })
                .collect::<Vec<bool>>()
        };
        let first = decide(3, &imgs, lit(0i64), false);
        let mirrored = first.iter().filter(|&&f| f).count();
        assert!(
            (160..=240).contains(&mirrored),
            "{mirrored} of {n} mirrored"
        );
        let not: Vec<bool> = first.iter().map(|f| !f).collect();
        assert_eq!(decide(3, &imgs, lit(1i64), false), not);
        assert_eq!(decide(3, &imgs, lit(2i64), false), first);
        assert_eq!(decide(3, &imgs, lit(7u64), false), not);
        // Not the position: the same images in the reverse order get the same coins.
        let reversed: Vec<Vec<u8>> = imgs.iter().rev().cloned().collect();
        let mut back = decide(3, &reversed, lit(0i64), false);
        back.reverse();
        assert_eq!(back, first);
        // Float32 images of the same values, and an epoch per row.
        assert_eq!(decide(3, &imgs, lit(0i64), true), first);
        let epochs = Arc::new(Int32Array::from_iter_values((0..n as i32).map(|i| i % 2)));
        let per_row = decide(3, &imgs, col(epochs), false);
        for (i, (&got, &f)) in per_row.iter().zip(&first).enumerate() {
            assert_eq!(got, f ^ (i % 2 == 1), "row {i}");
        }
        let other = decide(4, &imgs, lit(0i64), false);
        assert!(other != first, "another seed, the same coins");
        // Bad epochs name the function, the argument and the row; a null gives null.
        let f = udf("hflip_alternating", 3);
        let e = call(&f, vec![col(repeat(&IMG2, 2)), lit(-1i64)]).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("hflip_alternating") && e.contains("epoch") && e.contains("row 0"),
            "{e}"
        );
        let e = call(&f, vec![col(repeat(&IMG2, 2)), lit(1.5)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("epoch") && e.contains("integer"), "{e}");
        let out = call(
            &f,
            vec![col(repeat(&IMG2, 2)), lit(ScalarValue::Int64(None))],
        )
        .unwrap();
        assert_eq!(out.null_count(), 2);
    }

    /// `epoch(batch)` is the batch number over the batches per epoch where the source
    /// knows them, and an error that says so where it does not.
    #[tokio::test]
    async fn epoch_is_the_batch_over_the_batches_per_epoch_where_known() {
        let ctx = SessionContext::new();
        register(&ctx, 0);
        let q = "SELECT epoch(b) AS e FROM (VALUES (0), (19), (20), (45)) AS t(b)";
        let e = ctx
            .sql(q)
            .await
            .unwrap()
            .collect()
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("epoch(batch)") && e.contains("train --data"),
            "{e}"
        );
        register_epochs(&ctx, Some(20));
        let out = ctx.sql(q).await.unwrap().collect().await.unwrap();
        let e = out[0]
            .column(0)
            .as_any()
            .downcast_ref::<UInt64Array>()
            .unwrap();
        assert_eq!(e.values().to_vec(), vec![0, 0, 1, 2]);
        let e = ctx.sql("SELECT epoch(1.5)").await.unwrap_err().to_string();
        assert!(e.contains("epoch") && e.contains("integer"), "{e}");
    }

    /// Which of `n` rows `hflip(IMG2, p, 7, row)` flipped, with `seed`.
    fn hflip_decisions(seed: u64, p: f64, n: usize) -> Vec<bool> {
        let [b, r] = positions(n);
        let out = call(
            &udf("hflip", seed),
            vec![col(repeat(&IMG2, n)), lit(p), b, r],
        )
        .unwrap();
        let f = flipped(&IMG2);
        rows::<u8>(&out)
            .into_iter()
            .map(|row| {
                let row = row.unwrap();
                assert!(row == IMG2 || row == f, "{row:?}");
                row == f
            })
            .collect()
    }

    #[test]
    fn side_from_length() {
        assert_eq!(pixels::side(3), Some(1));
        assert_eq!(pixels::side(12), Some(2));
        assert_eq!(pixels::side(27), Some(3));
        assert_eq!(pixels::side(3072), Some(32));
        for bad in [0, 1, 6, 9, 3000, 3073, usize::MAX] {
            assert_eq!(pixels::side(bad), None, "{bad}");
        }
    }

    #[test]
    fn flip_kernels() {
        let mut out = [0u8; 12];
        // Each 2-value row reversed: 1 2 → 2 1, 3 4 → 4 3, …
        pixels::hflip(&IMG2, 2, &mut out).unwrap();
        assert_eq!(out, [2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11]);
        // The two rows of each plane swapped: 1 2 / 3 4 → 3 4 / 1 2, …
        pixels::vflip(&IMG2, 2, &mut out).unwrap();
        assert_eq!(out, [3, 4, 1, 2, 7, 8, 5, 6, 11, 12, 9, 10]);
    }

    #[test]
    fn color_shift_kernel() {
        // s = 3: red 1..9, green 10..18, blue 19..27, each row-major.
        let img: Vec<u8> = (1..=27).collect();
        let mut out = vec![0u8; 27];
        pixels::color_shift(&img, 3, 1, -1, 4, &mut out).unwrap();
        #[rustfmt::skip]
        let expected = [
            // red rolled by 1 row: the last row comes first (np.roll(plane, 1, axis=0)).
            7, 8, 9, 1, 2, 3, 4, 5, 6,
            // green rolled by −1 column: out[x] = in[x + 1 mod 3].
            11, 12, 10, 14, 15, 13, 17, 18, 16,
            // blue rolled by 4 ≡ 1 row.
            25, 26, 27, 19, 20, 21, 22, 23, 24,
        ];
        assert_eq!(out, expected);
        // Shifts by multiples of s are the identity.
        pixels::color_shift(&img, 3, 3, -6, 0, &mut out).unwrap();
        assert_eq!(out, img);
    }

    #[test]
    fn crop_kernel() {
        // Red plane 1 2 / 3 4 padded by 1:
        //   0 0 0 0
        //   0 1 2 0
        //   0 3 4 0
        //   0 0 0 0
        let mut out = [0u8; 12];
        pixels::crop(&IMG2, 2, 1, 0, 0, &mut out).unwrap();
        assert_eq!(out, [0, 0, 0, 1, 0, 0, 0, 5, 0, 0, 0, 9]);
        pixels::crop(&IMG2, 2, 1, 2, 2, &mut out).unwrap();
        assert_eq!(out, [4, 0, 0, 0, 8, 0, 0, 0, 12, 0, 0, 0]);
        pixels::crop(&IMG2, 2, 1, 0, 2, &mut out).unwrap();
        assert_eq!(out, [0, 0, 2, 0, 0, 0, 6, 0, 0, 0, 10, 0]);
        pixels::crop(&IMG2, 2, 1, 1, 1, &mut out).unwrap();
        assert_eq!(out, IMG2);
        pixels::crop(&IMG2, 2, 0, 0, 0, &mut out).unwrap();
        assert_eq!(out, IMG2);
        // Offsets past the padding only crop padding.
        pixels::crop(&IMG2, 2, 1, 9, 0, &mut out).unwrap();
        assert_eq!(out, [0; 12]);
    }

    #[test]
    fn resize_kernel() {
        // Every plane 0 4 / 8 12 (plus 0, 20, 40 per channel), 2×2 → 4×4. Source
        // coordinates of outputs 0..4: (o + 0.5)·0.5 − 0.5 = −0.25→0, 0.25, 0.75, 1.25→1
        // (clamped), so each row 0 4 becomes 0 1 3 4 and rows mix 1:0, 3:1, 1:3, 0:1.
        let img: Vec<f32> = [0.0, 4.0, 8.0, 12.0]
            .iter()
            .cycle()
            .take(12)
            .enumerate()
            .map(|(i, v)| v + 20.0 * (i / 4) as f32)
            .collect();
        let plan = pixels::Resize::new(2, 4, 4).unwrap();
        let mut out = vec![0f32; 48];
        plan.apply(&img, &mut out).unwrap();
        #[rustfmt::skip]
        let plane = [
            0.0, 1.0, 3.0, 4.0,
            2.0, 3.0, 5.0, 6.0,
            6.0, 7.0, 9.0, 10.0,
            8.0, 9.0, 11.0, 12.0,
        ];
        for c in 0..3 {
            let want: Vec<f32> = plane.iter().map(|v| v + 20.0 * c as f32).collect();
            assert_eq!(out[c * 16..][..16], want[..], "channel {c}");
        }
        // The same in u8: all results are integers.
        let img8: Vec<u8> = img.iter().map(|&v| v as u8).collect();
        let mut out8 = vec![0u8; 48];
        plan.apply(&img8, &mut out8).unwrap();
        assert_eq!(out8, out.iter().map(|&v| v as u8).collect::<Vec<_>>());
        // 2×2 → 1×1: source coordinate (0.5)·2 − 0.5 = 0.5 on both axes: the mean of 4.
        let plan = pixels::Resize::new(2, 1, 1).unwrap();
        let mut one = [0f32; 3];
        plan.apply(&img, &mut one).unwrap();
        assert_eq!(one, [6.0, 26.0, 46.0]);
        // u8 rounds half away from zero: mean 0.5 → 1, mean 0.25 → 0.
        let mut one8 = [0u8; 3];
        plan.apply(&[0, 1, 0, 1, 0, 1, 0, 0, 1, 1, 1, 1], &mut one8)
            .unwrap();
        assert_eq!(one8, [1, 0, 1]);
        // Same size: the identity.
        let plan = pixels::Resize::new(2, 2, 2).unwrap();
        let mut same = [0u8; 12];
        plan.apply(&IMG2, &mut same).unwrap();
        assert_eq!(same, IMG2);
    }

    #[test]
    fn u8_rounding_is_half_away_from_zero_and_clamped() {
        for (v, want) in [
            (0.0f32, 0u8),
            (0.49, 0),
            (0.5, 1),
            (1.5, 2),
            (2.5, 3),
            (2.499_999, 2),
            (254.5, 255),
            (255.0, 255),
            (300.0, 255),
            (-0.4, 0),
            (-3.0, 0),
            (f32::NAN, 0),
            (f32::INFINITY, 255),
            (f32::NEG_INFINITY, 0),
        ] {
            assert_eq!(<u8 as Pixel>::from_f32(v), want, "{v}");
        }
    }

    #[test]
    fn normalize_kernel() {
        // One pixel per channel: 255 → (1 − 0.5)/0.5 = 1; 0 → (0 − 0.5)/0.25 = −2;
        // 51 → (0.2 − 0.5)/0.2 = −1.5.
        let norm = pixels::Normalize::new([0.5; 3], [0.5, 0.25, 0.2]).unwrap();
        let mut out = [0f32; 3];
        norm.apply_u8(&[255, 0, 51], 1, &mut out).unwrap();
        for (o, w) in out.iter().zip([1.0, -2.0, -1.5]) {
            assert!((o - w).abs() < 1e-6, "{out:?}");
        }
        // Float32 input is taken as already in [0, 1].
        norm.apply_f32(&[1.0, 0.0, 0.2], 1, &mut out).unwrap();
        for (o, w) in out.iter().zip([1.0, -2.0, -1.5]) {
            assert!((o - w).abs() < 1e-6, "{out:?}");
        }
        let e = pixels::Normalize::new([0.5; 3], [0.5, 0.0, 0.2]).unwrap_err();
        assert!(e.to_string().contains("std_g"), "{e}");
        let e = pixels::Normalize::new([0.5, f64::NAN, 0.5], [1.0; 3]).unwrap_err();
        assert!(e.to_string().contains("mean_g"), "{e}");
    }

    #[test]
    fn kernels_reject_bad_shapes_without_panicking() {
        let mut out = [0u8; 12];
        assert!(pixels::hflip(&IMG2, 0, &mut out).is_err());
        assert!(pixels::hflip(&IMG2, 3, &mut out).is_err());
        assert!(pixels::vflip(&IMG2[..11], 2, &mut out).is_err());
        assert!(pixels::color_shift(&IMG2, 2, 1, 1, 1, &mut out[..4]).is_err());
        assert!(pixels::crop(&IMG2, 2, 1, 0, 0, &mut out[..11]).is_err());
        assert!(pixels::Resize::new(0, 4, 4).is_err());
        assert!(pixels::Resize::new(2, 0, 4).is_err());
        assert!(pixels::Resize::new(2, 4, MAX_RESIZE_SIDE + 1).is_err());
        let plan = pixels::Resize::new(2, 3, 3).unwrap();
        assert!(plan.apply(&IMG2, &mut out).is_err());
        let norm = pixels::Normalize::new([0.0; 3], [1.0; 3]).unwrap();
        assert!(norm.apply_u8(&IMG2, 2, &mut [0f32; 3]).is_err());
    }

    #[test]
    fn normalize_function() {
        let img = list(vec![255u8, 0, 51, 0, 255, 0], 3, None);
        let out = call(
            &udf("normalize", 0),
            vec![
                col(img),
                lit(0.5),
                lit(0.5),
                lit(0.5),
                lit(0.5),
                lit(0.25f32),
                lit(1i64),
            ],
        )
        .unwrap();
        assert_eq!(
            out.data_type(),
            &DataType::FixedSizeList(Arc::new(Field::new("item", DataType::Float32, false)), 3)
        );
        let got = rows::<f32>(&out);
        // Row 0: 1, −2, (0.2 − 0.5)/1; row 1: −1, 2, −0.5.
        let want = [[1.0, -2.0, -0.3], [-1.0, 2.0, -0.5]];
        for (row, want) in got.iter().zip(want) {
            for (o, w) in row.as_ref().unwrap().iter().zip(want) {
                assert!((o - w).abs() < 1e-6, "{got:?}");
            }
        }
        // Means and stds from columns, per row.
        let stds = Arc::new(Float64Array::from(vec![1.0, 0.5]));
        let out = call(
            &udf("normalize", 0),
            vec![
                col(list(vec![255u8, 255, 255, 255, 255, 255], 3, None)),
                lit(0i32),
                lit(0i32),
                lit(0i32),
                col(stds.clone()),
                col(stds.clone()),
                col(stds),
            ],
        )
        .unwrap();
        assert_eq!(
            rows::<f32>(&out),
            vec![Some(vec![1.0; 3]), Some(vec![2.0; 3])]
        );
    }

    #[test]
    fn p_zero_never_and_p_one_always() {
        let n = 1000;
        let input = repeat(&IMG2, n);
        let expect = |name: &str| -> Vec<u8> {
            let mut out = vec![0u8; 12];
            match name {
                "hflip" => pixels::hflip(&IMG2, 2, &mut out).unwrap(),
                "vflip" => pixels::vflip(&IMG2, 2, &mut out).unwrap(),
                _ => pixels::color_shift(&IMG2, 2, 1, 1, 1, &mut out).unwrap(),
            }
            out
        };
        for name in ["hflip", "vflip", "color_shift"] {
            for (p, want) in [(0.0, IMG2.to_vec()), (1.0, expect(name))] {
                for with_positions in [false, true] {
                    let mut args = vec![col(input.clone())];
                    if name == "color_shift" {
                        args.extend([lit(1i64), lit(1i64), lit(1i64)]);
                    }
                    args.push(lit(p));
                    if with_positions {
                        args.extend(positions(n));
                    }
                    let out = call(&udf(name, 42), args).unwrap();
                    assert!(
                        rows::<u8>(&out)
                            .iter()
                            .all(|r| r.as_deref() == Some(&want[..])),
                        "{name} p={p}"
                    );
                }
            }
        }
        // random_crop with padding 0 is the identity.
        let [b, r] = positions(n);
        let out = call(&udf("random_crop", 42), vec![col(input), lit(0i64), b, r]).unwrap();
        assert!(rows::<u8>(&out)
            .iter()
            .all(|r| r.as_deref() == Some(&IMG2[..])));
    }

    #[test]
    fn decisions_are_reproducible_and_depend_on_the_seed() {
        let a = hflip_decisions(1, 0.5, 1000);
        assert_eq!(a, hflip_decisions(1, 0.5, 1000));
        let b = hflip_decisions(2, 0.5, 1000);
        assert_ne!(a, b);
        // Not just a few rows: independent decisions disagree on about half.
        let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        assert!((350..650).contains(&differ), "{differ}");
        // The same holds for crops.
        let crop = |seed| {
            let [b, r] = positions(1000);
            rows::<u8>(
                &call(
                    &udf("random_crop", seed),
                    vec![col(repeat(&IMG2, 1000)), lit(1i64), b, r],
                )
                .unwrap(),
            )
        };
        assert_eq!(crop(5), crop(5));
        assert_ne!(crop(5), crop(6));
    }

    #[test]
    fn flip_rate_is_near_p() {
        let n = 10_000;
        let count = hflip_decisions(3, 0.345, n).iter().filter(|&&f| f).count();
        // Binomial(10000, 0.345): sd ≈ 47.5; allow over 5 sd.
        assert!((3450 - 240..3450 + 240).contains(&count), "{count}");
        // color_shift and vflip the same way.
        for name in ["vflip", "color_shift"] {
            let [b, r] = positions(n);
            let mut args = vec![col(repeat(&IMG2, n))];
            if name == "color_shift" {
                args.extend([lit(1i64), lit(0i64), lit(0i64)]);
            }
            args.extend([lit(0.345), b, r]);
            let out = call(&udf(name, 3), args).unwrap();
            let changed = rows::<u8>(&out)
                .iter()
                .filter(|r| r.as_deref() != Some(&IMG2[..]))
                .count();
            assert!(
                (3450 - 240..3450 + 240).contains(&changed),
                "{name}: {changed}"
            );
        }
        // Crop offsets: padding 1 gives 9 offsets, each about 1/9 of the rows.
        let [b, r] = positions(9000);
        let out = call(
            &udf("random_crop", 3),
            vec![col(repeat(&IMG2, 9000)), lit(1i64), b, r],
        )
        .unwrap();
        let mut counts = std::collections::HashMap::new();
        for row in rows::<u8>(&out) {
            *counts.entry(row.unwrap()).or_insert(0usize) += 1;
        }
        assert_eq!(counts.len(), 9);
        assert!(
            counts.values().all(|&c| (850..1150).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn functions_use_independent_streams() {
        // hflip and vflip with the same seed and positions decide differently.
        let n = 1000;
        let [b, r] = positions(n);
        let out = call(
            &udf("vflip", 1),
            vec![col(repeat(&IMG2, n)), lit(0.5), b, r],
        )
        .unwrap();
        let v: Vec<bool> = rows::<u8>(&out)
            .iter()
            .map(|r| r.as_deref() != Some(&IMG2[..]))
            .collect();
        assert_ne!(v, hflip_decisions(1, 0.5, n));
    }

    #[test]
    fn without_positions_a_call_counter_is_used() {
        let n = 1000;
        let f = udf("hflip", 9);
        let decide = |f: &ScalarUDF| -> Vec<bool> {
            let out = call(f, vec![col(repeat(&IMG2, n)), lit(0.5)]).unwrap();
            rows::<u8>(&out)
                .iter()
                .map(|r| r.as_deref() != Some(&IMG2[..]))
                .collect()
        };
        let first = decide(&f);
        let second = decide(&f);
        assert_ne!(first, second, "each call (batch) gets new decisions");
        let g = udf("hflip", 9);
        assert_eq!(decide(&g), first, "a fresh registration replays them");
        assert_eq!(decide(&g), second);
    }

    #[test]
    fn element_type_is_kept() {
        let img: Vec<f32> = IMG2.iter().map(|&v| f32::from(v) / 16.0).collect();
        let cases: Vec<(&str, Vec<ColumnarValue>)> = vec![
            ("hflip", vec![lit(1.0)]),
            ("vflip", vec![lit(1.0)]),
            ("color_shift", vec![lit(1), lit(1), lit(1), lit(1.0)]),
            ("random_crop", vec![lit(1)]),
            ("translate", vec![lit(1)]),
            ("resize", vec![lit(3), lit(4)]),
        ];
        for (name, rest) in cases {
            let mut args = vec![col(repeat(&img, 2))];
            args.extend(rest.clone());
            let out = call(&udf(name, 0), args).unwrap();
            assert_eq!(out.value_type(), DataType::Float32, "{name}");
            let mut args = vec![col(repeat(&IMG2, 2))];
            args.extend(rest);
            let out = call(&udf(name, 0), args).unwrap();
            assert_eq!(out.value_type(), DataType::UInt8, "{name}");
            let len = if name == "resize" { 36 } else { 12 };
            assert_eq!(out.value_length(), len, "{name}");
        }
        // A Float32 flip is the same flip.
        let out = call(&udf("hflip", 0), vec![col(repeat(&img, 1)), lit(1)]).unwrap();
        let want: Vec<f32> = flipped(&IMG2)
            .iter()
            .map(|&v| f32::from(v) / 16.0)
            .collect();
        assert_eq!(rows::<f32>(&out), vec![Some(want)]);
    }

    #[test]
    fn nulls_give_null_rows() {
        let nulls = NullBuffer::from(vec![true, false, true]);
        let img = list(IMG2.repeat(3), 12, Some(nulls));
        let out = call(&udf("hflip", 0), vec![col(img.clone()), lit(1.0)]).unwrap();
        let f = flipped(&IMG2);
        assert_eq!(
            rows::<u8>(&out),
            vec![Some(f.clone()), None, Some(f.clone())]
        );
        // A null p or position nulls that row.
        let p = Arc::new(Float64Array::from(vec![Some(1.0), Some(1.0), None]));
        let out = call(&udf("hflip", 0), vec![col(img.clone()), col(p)]).unwrap();
        assert_eq!(rows::<u8>(&out), vec![Some(f.clone()), None, None]);
        let batch = Arc::new(UInt64Array::from(vec![None, Some(1), Some(1)]));
        let out = call(
            &udf("hflip", 0),
            vec![col(img.clone()), lit(1.0), col(batch), lit(0u32)],
        )
        .unwrap();
        assert_eq!(rows::<u8>(&out), vec![None, None, Some(f)]);
        let out = call(
            &udf("normalize", 0),
            vec![
                col(img),
                lit(0),
                lit(0),
                lit(0),
                lit(1),
                lit(1),
                lit(ScalarValue::Float64(None)),
            ],
        )
        .unwrap();
        assert_eq!(out.null_count(), 3);
    }

    #[test]
    fn column_arguments() {
        let n = 6;
        let p = Arc::new(Float64Array::from_iter_values(
            (0..n).map(|i| (i % 2) as f64),
        ));
        let out = call(&udf("hflip", 0), vec![col(repeat(&IMG2, n)), col(p)]).unwrap();
        let f = flipped(&IMG2);
        for (i, row) in rows::<u8>(&out).into_iter().enumerate() {
            let want = if i % 2 == 1 { f.clone() } else { IMG2.to_vec() };
            assert_eq!(row.unwrap(), want, "row {i}");
        }
        // Shifts from an integer column.
        let shifts = Arc::new(Int32Array::from_iter_values(0..n as i32));
        let out = call(
            &udf("color_shift", 0),
            vec![col(repeat(&IMG2, n)), col(shifts), lit(0), lit(0), lit(1)],
        )
        .unwrap();
        for (i, row) in rows::<u8>(&out).into_iter().enumerate() {
            let mut want = vec![0u8; 12];
            pixels::color_shift(&IMG2, 2, i as i64, 0, 0, &mut want).unwrap();
            assert_eq!(row.unwrap(), want, "row {i}");
        }
        // Padding from a column, positions from signed integers.
        let pad = Arc::new(Int32Array::from(vec![0, 0, 0]));
        let rows_ = Arc::new(Int32Array::from(vec![-1, 0, 1]));
        let out = call(
            &udf("random_crop", 0),
            vec![col(repeat(&IMG2, 3)), col(pad), lit(-5i64), col(rows_)],
        )
        .unwrap();
        assert_eq!(out.null_count(), 0);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let hflip = udf("hflip", 0);
        // Length not 3·s·s.
        let bad = list(vec![0u8; 3000], 3000, None);
        let e = err_text(call(&hflip, vec![col(bad), lit(0.5)]));
        assert!(e.contains("hflip") && e.contains("3000"), "{e}");
        // Element type.
        let ints = Arc::new(Int32Array::from(vec![0; 12]));
        let item = Arc::new(Field::new("item", DataType::Int32, false));
        let bad = Arc::new(FixedSizeListArray::try_new(item, 12, ints, None).unwrap());
        let e = err_text(call(&hflip, vec![col(bad), lit(0.5)]));
        assert!(e.contains("hflip") && e.contains("UInt8 or Float32"), "{e}");
        // Not a list.
        let e = err_text(call(&hflip, vec![lit(3i64), lit(0.5)]));
        assert!(e.contains("argument image"), "{e}");
        // Arity, including batch without row.
        let e = err_text(call(&hflip, vec![col(repeat(&IMG2, 1))]));
        assert!(e.contains("2 or 4"), "{e}");
        let e = err_text(call(&hflip, vec![col(repeat(&IMG2, 1)), lit(0.5), lit(1)]));
        assert!(e.contains("2 or 4"), "{e}");
        // p out of range, and not a number.
        let e = err_text(call(&hflip, vec![col(repeat(&IMG2, 1)), lit(1.5)]));
        assert!(e.contains("hflip") && e.contains("argument p"), "{e}");
        let e = err_text(call(&hflip, vec![col(repeat(&IMG2, 1)), lit("x")]));
        assert!(e.contains("argument p must be a number"), "{e}");
        // Positions must be integers.
        let e = err_text(call(
            &hflip,
            vec![col(repeat(&IMG2, 1)), lit(0.5), lit(1.5), lit(1)],
        ));
        assert!(e.contains("argument batch must be an integer"), "{e}");
        // std 0, constant or in one row of a column.
        let norm = udf("normalize", 0);
        let mut args = vec![col(repeat(&IMG2, 2))];
        args.extend([lit(0.5), lit(0.5), lit(0.5), lit(1.0), lit(0.0), lit(1.0)]);
        let e = err_text(call(&norm, args));
        assert!(e.contains("normalize") && e.contains("std_g"), "{e}");
        let mut args = vec![col(repeat(&IMG2, 2))];
        args.extend([lit(0.5), lit(0.5), lit(0.5), lit(1.0), lit(1.0)]);
        args.push(col(Arc::new(Float64Array::from(vec![1.0, 0.0]))));
        let e = err_text(call(&norm, args));
        assert!(e.contains("std_b") && e.contains("row 1"), "{e}");
        // Shifts and padding must be integers; padding not negative.
        let e = err_text(call(
            &udf("color_shift", 0),
            vec![col(repeat(&IMG2, 1)), lit(1.5), lit(0), lit(0), lit(1)],
        ));
        assert!(e.contains("color_shift") && e.contains("argument r"), "{e}");
        let e = err_text(call(
            &udf("random_crop", 0),
            vec![col(repeat(&IMG2, 1)), lit(-1)],
        ));
        assert!(e.contains("random_crop") && e.contains("padding"), "{e}");
        // resize: constant, positive sizes.
        let resize = udf("resize", 0);
        let e = err_text(call(
            &resize,
            vec![
                col(repeat(&IMG2, 1)),
                col(Arc::new(Int32Array::from(vec![4]))),
                lit(4),
            ],
        ));
        assert!(
            e.contains("resize") && e.contains("height") && e.contains("constant"),
            "{e}"
        );
        let e = err_text(call(&resize, vec![col(repeat(&IMG2, 1)), lit(4), lit(0)]));
        assert!(e.contains("width"), "{e}");
        // Null pixels inside a non-null image.
        let values = UInt8Array::from(
            vec![Some(1u8); 11]
                .into_iter()
                .chain([None])
                .collect::<Vec<_>>(),
        );
        let item = Arc::new(Field::new("item", DataType::UInt8, true));
        let bad = Arc::new(FixedSizeListArray::try_new(item, 12, Arc::new(values), None).unwrap());
        let e = err_text(call(&hflip, vec![col(bad), lit(0.5)]));
        assert!(e.contains("null elements"), "{e}");
    }

    #[tokio::test]
    async fn through_sql() {
        let ctx = crate::query::session();
        let pixels: Vec<u8> = (0..2 * 3072).map(|i| (i % 251) as u8).collect();
        let batch = crate::wire::batch::make_batch(4, None, vec![1, 2], pixels.clone()).unwrap();
        ctx.register_batch("t", batch).unwrap();
        let sql = "SELECT hflip(hflip(image, 1, batch, \"row\"), 1.0) AS same, \
                   normalize(vflip(image, 0), 0, 0, 0, 1, 1, 1) AS f, \
                   resize(image, 16, 8) AS small FROM t";
        let out = crate::query::run(&ctx, sql).await.unwrap();
        let b = &out[0];
        let same = b
            .column(0)
            .as_any()
            .downcast_ref::<FixedSizeListArray>()
            .unwrap();
        assert_eq!(
            same.values()
                .as_any()
                .downcast_ref::<UInt8Array>()
                .unwrap()
                .values(),
            &pixels[..]
        );
        let f = b
            .column(1)
            .as_any()
            .downcast_ref::<FixedSizeListArray>()
            .unwrap();
        let f = f
            .values()
            .as_any()
            .downcast_ref::<PrimitiveArray<Float32Type>>()
            .unwrap();
        assert!((f.value(5) - 5.0 / 255.0).abs() < 1e-7);
        assert_eq!(
            b.schema().field(2).data_type(),
            &DataType::FixedSizeList(Arc::new(Field::new("item", DataType::UInt8, false)), 384)
        );
        let e = crate::query::run(&ctx, "SELECT hflip(image, 'x') FROM t")
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("hflip: argument p must be a number"), "{e}");
        let e = crate::query::run(&ctx, "SELECT resize(image, \"row\" + 1, 2) FROM t")
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("must be a constant"), "{e}");
        let e = crate::query::run(&ctx, "SELECT hflip(label, 0.5) FROM t")
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("argument image must be FixedSizeList"), "{e}");
    }
}
