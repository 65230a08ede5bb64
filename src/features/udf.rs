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
use crate::dataset::IMAGE_BYTES;

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

/// Registers `extract_features` bound to `extractor` in `ctx` (replacing an earlier one).
pub fn register(ctx: &SessionContext, extractor: Arc<Extractor>) {
    ctx.register_udf(ScalarUDF::from(ExtractUdf::new(extractor)));
}

impl ScalarUDFImpl for ExtractUdf {
    fn name(&self) -> &str {
        NAME
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        match &arg_types[0] {
            DataType::FixedSizeList(f, n)
                if f.data_type() == &DataType::UInt8 && *n as usize == IMAGE_BYTES =>
            {
                Ok(self.output_type())
            }
            other => plan_err!(
                "{NAME}: the image must be FixedSizeList<UInt8, {IMAGE_BYTES}> (a CIFAR image), got {other}"
            ),
        }
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let images = args.args[0].to_array(args.number_rows)?;
        let Some(list) = images.as_any().downcast_ref::<FixedSizeListArray>() else {
            return exec_err!("{NAME}: the image is not a fixed-size list");
        };
        let Some(values) = list.values().as_any().downcast_ref::<UInt8Array>() else {
            return exec_err!("{NAME}: the image values are not UInt8");
        };
        let n = list.len();
        let start = list.offset() * IMAGE_BYTES;
        let Some(pixels) = values.values().get(start..start + n * IMAGE_BYTES) else {
            return exec_err!("{NAME}: the image list holds fewer values than its length says");
        };
        let features = self.extractor.encode(pixels)?;
        let width = self.extractor.width();
        let (flat, _) = features.into_raw_vec_and_offset();
        let out = FixedSizeListArray::try_new(
            Arc::new(Field::new("item", DataType::Float32, false)),
            width as i32,
            Arc::new(Float32Array::from(flat)),
            list.nulls().cloned(),
        )?;
        Ok(ColumnarValue::Array(Arc::new(out) as ArrayRef))
    }
}
