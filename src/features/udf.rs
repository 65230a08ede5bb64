//! `extract_features(image)`: a fitted [`Extractor`] as a DataFusion scalar function.
//!
//! The extractor is bound when the function is registered ([`register`]), so one query
//! (the streaming `sql/features.sql`, or `cifar-df query` over Parquet images) computes
//! features with it: `UInt8` images of 3,072 values (CIFAR layout) in,
//! `FixedSizeList<Float32, width>` out; a null image gives a null row. A batch's images
//! are encoded together (one matrix product per image, images spread over the cores).

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, FixedSizeListArray, Float32Array, UInt8Array};
use datafusion::arrow::datatypes::{DataType, Field};
use datafusion::common::{exec_err, plan_err, Result};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::SessionContext;

use super::Extractor;

/// The function's name in SQL.
pub const NAME: &str = "extract_features";

/// `extract_features` bound to one extractor.
#[derive(Debug)]
pub struct ExtractUdf {
    extractor: Arc<Extractor>,
    signature: Signature,
}

impl PartialEq for ExtractUdf {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.extractor, &other.extractor)
    }
}

impl Eq for ExtractUdf {}

impl Hash for ExtractUdf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (Arc::as_ptr(&self.extractor) as usize).hash(state);
    }
}

impl ExtractUdf {
    /// The function for `extractor`.
    pub fn new(extractor: Arc<Extractor>) -> Self {
        ExtractUdf {
            extractor,
            signature: Signature::any(1, Volatility::Immutable),
        }
    }

    fn output_type(&self) -> DataType {
        DataType::FixedSizeList(
            Arc::new(Field::new("item", DataType::Float32, false)),
            self.extractor.width() as i32,
        )
    }
}

/// The side of the images of an `image` argument: `FixedSizeList<UInt8, 3·s²>`.
fn image_side(name: &str, t: &DataType) -> Result<usize> {
    match t {
        DataType::FixedSizeList(f, n) if f.data_type() == &DataType::UInt8 => {
            match crate::transforms::pixels::side(*n as usize) {
                Some(s) => Ok(s),
                None => plan_err!(
                    "{name}: an image of {n} values is not a square RGB image (3·side² values)"
                ),
            }
        }
        other => plan_err!(
            "{name}: the image must be FixedSizeList<UInt8, 3·side²> (3,072 for CIFAR's \
             32x32), got {other}"
        ),
    }
}

/// Registers `extract_features` bound to `extractor` in `ctx` (replacing an earlier one).
pub fn register(ctx: &SessionContext, extractor: Arc<Extractor>) {
    ctx.register_udf(udf(extractor));
}

/// `extract_features` bound to `extractor`, as a DataFusion function.
pub fn udf(extractor: Arc<Extractor>) -> ScalarUDF {
    ScalarUDF::from(ExtractUdf::new(extractor))
}

impl ScalarUDFImpl for ExtractUdf {
    fn name(&self) -> &str {
        NAME
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        let side = image_side(NAME, &arg_types[0])?;
        if let Err(e) = self.extractor.check_side(side) {
            return plan_err!("{NAME}: {e}");
        }
        Ok(self.output_type())
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        features_of(NAME, &self.extractor, &args.args[0], args.number_rows)
    }
}

/// The features of a column of images with `extractor`, for the function `name`: the
/// batch's images encoded together, a null image giving a null row.
fn features_of(
    name: &str,
    extractor: &Extractor,
    images: &ColumnarValue,
    number_rows: usize,
) -> Result<ColumnarValue> {
    let images = images.to_array(number_rows)?;
    let Some(list) = images.as_any().downcast_ref::<FixedSizeListArray>() else {
        return exec_err!("{name}: the image is not a fixed-size list");
    };
    let Some(values) = list.values().as_any().downcast_ref::<UInt8Array>() else {
        return exec_err!("{name}: the image values are not UInt8");
    };
    let n = list.len();
    let per = list.value_length() as usize;
    let Some(side) = crate::transforms::pixels::side(per) else {
        return exec_err!("{name}: an image of {per} values is not a square RGB image");
    };
    let start = list.offset() * per;
    let Some(pixels) = values.values().get(start..start + n * per) else {
        return exec_err!("{name}: the image list holds fewer values than its length says");
    };
    let features = extractor.encode_sized(pixels, side)?;
    let (flat, _) = features.into_raw_vec_and_offset();
    let out = FixedSizeListArray::try_new(
        Arc::new(Field::new("item", DataType::Float32, false)),
        extractor.width() as i32,
        Arc::new(Float32Array::from(flat)),
        list.nulls().cloned(),
    )?;
    Ok(ColumnarValue::Array(Arc::new(out) as ArrayRef))
}

/// The name in SQL of the function that finds its extractor by path.
pub const FROM_NAME: &str = "extract_features_from";

/// `extract_features_from(dir, stamp, width, image)`: the features of `image` with the
/// extractor saved in the folder `dir` (as [`Extractor::save`] writes it, e.g. a cache's
/// `F/extractor`). The folder is read once per process and kept; its stamp must be `stamp`
/// and its width `width` (the result's type is known from the literals, before the
/// folder is read): a folder that differs, on any machine that runs the query, is an error
/// naming it, never other features.
///
/// This is how a distributed feature job reaches its workers: the plan carries the path
/// and the stamp, each worker reads the folder from the same path.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct ExtractFromUdf {
    signature: Signature,
}

impl Default for ExtractFromUdf {
    fn default() -> Self {
        ExtractFromUdf {
            signature: Signature::any(4, Volatility::Immutable),
        }
    }
}

/// `extract_features_from` as a DataFusion function.
pub fn from_udf() -> ScalarUDF {
    ScalarUDF::from(ExtractFromUdf::default())
}

/// The extractors this process has read for `extract_features_from`, by folder and stamp.
type Loaded = std::sync::Mutex<std::collections::HashMap<(String, String), Arc<Extractor>>>;

fn loaded() -> &'static Loaded {
    static LOADED: std::sync::OnceLock<Loaded> = std::sync::OnceLock::new();
    LOADED.get_or_init(Default::default)
}

/// The extractor in `dir`, read once per process; its stamp must be `stamp`.
fn extractor_at(dir: &str, stamp: &str) -> Result<Arc<Extractor>> {
    let key = (dir.to_string(), stamp.to_string());
    if let Some(e) = loaded().lock().ok().and_then(|m| m.get(&key).cloned()) {
        return Ok(e);
    }
    let e = Extractor::load(std::path::Path::new(dir))
        .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
    let got = e.stamp();
    if got != stamp {
        return exec_err!(
            "{FROM_NAME}: the extractor in {dir} has stamp {got}, the query expects {stamp} \
             (the folder differs on this machine: is it the same file system?)"
        );
    }
    let e = Arc::new(e);
    if let Ok(mut m) = loaded().lock() {
        m.insert(key, Arc::clone(&e));
    }
    Ok(e)
}

fn literal_str<'a>(v: Option<&'a datafusion::common::ScalarValue>, what: &str) -> Result<&'a str> {
    match v.and_then(|v| v.try_as_str()).flatten() {
        Some(s) => Ok(s),
        None => plan_err!("{FROM_NAME}: argument {what} must be a string literal"),
    }
}

impl ScalarUDFImpl for ExtractFromUdf {
    fn name(&self) -> &str {
        FROM_NAME
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        plan_err!("{FROM_NAME}: the width must be a literal (its third argument)")
    }

    fn return_field_from_args(
        &self,
        args: datafusion::logical_expr::ReturnFieldArgs,
    ) -> Result<datafusion::arrow::datatypes::FieldRef> {
        use datafusion::common::ScalarValue;
        literal_str(args.scalar_arguments[0], "dir")?;
        literal_str(args.scalar_arguments[1], "stamp")?;
        let width = match args.scalar_arguments[2] {
            Some(ScalarValue::Int64(Some(w))) if *w > 0 => *w,
            Some(ScalarValue::Int32(Some(w))) if *w > 0 => i64::from(*w),
            Some(ScalarValue::UInt64(Some(w))) if *w > 0 => *w as i64,
            Some(ScalarValue::UInt32(Some(w))) if *w > 0 => i64::from(*w),
            _ => {
                return plan_err!("{FROM_NAME}: argument width must be a positive integer literal")
            }
        };
        let Ok(width) = i32::try_from(width) else {
            return plan_err!("{FROM_NAME}: width {width} is too large");
        };
        image_side(FROM_NAME, args.arg_fields[3].data_type())?;
        Ok(Arc::new(Field::new(
            FROM_NAME,
            DataType::FixedSizeList(
                Arc::new(Field::new("item", DataType::Float32, false)),
                width,
            ),
            args.arg_fields[3].is_nullable(),
        )))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let text = |i: usize, what: &str| -> Result<String> {
            match &args.args[i] {
                ColumnarValue::Scalar(v) => Ok(literal_str(Some(v), what)?.to_string()),
                ColumnarValue::Array(_) => {
                    plan_err!("{FROM_NAME}: argument {what} must be a string literal")
                }
            }
        };
        let dir = text(0, "dir")?;
        let stamp = text(1, "stamp")?;
        let extractor = extractor_at(&dir, &stamp)?;
        let DataType::FixedSizeList(_, width) = args.return_field.data_type() else {
            return exec_err!("{FROM_NAME}: unexpected return type");
        };
        if *width as usize != extractor.width() {
            return exec_err!(
                "{FROM_NAME}: the extractor in {dir} gives {} features, the query expects {width}",
                extractor.width()
            );
        }
        features_of(FROM_NAME, &extractor, &args.args[3], args.number_rows)
    }
}
