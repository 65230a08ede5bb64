//! The shape of the data in flight: one Arrow `RecordBatch` per incoming batch.
//!
//! Every source, whatever its wire format, yields batches with the same schema, so that the
//! rest of the pipeline (SQL, transforms, models, Parquet) sees one thing:
//!
//! | column  | type                           | meaning                                    |
//! |---------|--------------------------------|--------------------------------------------|
//! | `batch` | `UInt64`                       | sequence number of the batch, from 0       |
//! | `row`   | `UInt32`                       | row within the batch                       |
//! | `label` | `UInt16`                       | class 0..K−1 (the run's K classes)          |
//! | `image` | `FixedSizeList<UInt8, 3·s²>`   | CIFAR order: red plane, green, blue; each `s`×`s` row-major (3,072 bytes for CIFAR's 32×32) |
//!
//! The side `s` is the run's image size (`--image-size`, 32 by default); the list's length
//! gives it to every stage downstream ([`crate::transforms::pixels::side`]).
//!
//! Building a batch from decoded buffers moves the `Vec`s into Arrow buffers without copying.

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

use arrow::array::{
    Array, ArrayRef, FixedSizeListArray, UInt16Array, UInt32Array, UInt64Array, UInt8Array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;

use crate::dataset::{image_bytes, SIDE};
use crate::error::{Error, Result};

/// The element field of the `image` list.
pub fn image_item_field() -> Arc<Field> {
    Arc::new(Field::new("item", DataType::UInt8, false))
}

/// The type of the `image` column of 32×32 images.
pub fn image_type() -> DataType {
    image_type_sized(SIDE)
}

/// The type of the `image` column of `side`×`side` images.
pub fn image_type_sized(side: usize) -> DataType {
    DataType::FixedSizeList(image_item_field(), image_bytes(side) as i32)
}

/// The schema of every batch a source of 32×32 images yields.
pub fn stream_schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA.get_or_init(|| build_schema(SIDE)).clone()
}

/// The schema of every batch a source of `side`×`side` images yields.
pub fn stream_schema_sized(side: usize) -> SchemaRef {
    if side == SIDE {
        stream_schema()
    } else {
        build_schema(side)
    }
}

fn build_schema(side: usize) -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("batch", DataType::UInt64, false),
        Field::new("row", DataType::UInt32, false),
        Field::new("label", DataType::UInt16, false),
        Field::new("image", image_type_sized(side), false),
    ]))
}

/// The sequence number of a stream batch (its first `batch` value), if it has one.
pub fn batch_number(batch: &RecordBatch) -> Option<u64> {
    let col = batch.column_by_name("batch")?;
    let a = col.as_any().downcast_ref::<UInt64Array>()?;
    (!a.is_empty()).then(|| a.value(0))
}

/// Build one stream batch of 32×32 images from owned buffers (no copy of the pixels).
///
/// `rows` may be `None` for rows numbered 0..n. `pixels.len()` must be `labels.len() * 3072`.
pub fn make_batch(
    batch: u64,
    rows: Option<Vec<u32>>,
    labels: Vec<u16>,
    pixels: Vec<u8>,
) -> Result<RecordBatch> {
    make_batch_sized(batch, rows, labels, pixels, SIDE)
}

/// Build one stream batch of `side`×`side` images from owned buffers (no copy of the
/// pixels): `pixels.len()` must be `labels.len() · 3·side²`.
pub fn make_batch_sized(
    batch: u64,
    rows: Option<Vec<u32>>,
    labels: Vec<u16>,
    pixels: Vec<u8>,
    side: usize,
) -> Result<RecordBatch> {
    let n = labels.len();
    let per = image_bytes(side);
    if pixels.len() != n * per {
        return Err(Error::Decode {
            batch,
            row: None,
            reason: format!(
                "{} pixel bytes for {n} labels (expected {})",
                pixels.len(),
                n * per
            ),
        });
    }
    let rows = rows.unwrap_or_else(|| (0..n as u32).collect());
    let image = image_array_sized(pixels, side)?;
    Ok(RecordBatch::try_new(
        stream_schema_sized(side),
        vec![
            Arc::new(UInt64Array::from(vec![batch; n])) as ArrayRef,
            Arc::new(UInt32Array::from(rows)),
            Arc::new(UInt16Array::from(labels)),
            Arc::new(image),
        ],
    )?)
}

/// Wrap a pixel buffer (a multiple of 3072 bytes) as the `image` column, without copying.
pub fn image_array(pixels: Vec<u8>) -> Result<FixedSizeListArray> {
    image_array_sized(pixels, SIDE)
}

/// Wrap a pixel buffer (a multiple of `3·side²` bytes) as the `image` column, without
/// copying.
pub fn image_array_sized(pixels: Vec<u8>, side: usize) -> Result<FixedSizeListArray> {
    let values = UInt8Array::from(pixels);
    Ok(FixedSizeListArray::try_new(
        image_item_field(),
        image_bytes(side) as i32,
        Arc::new(values),
        None,
    )?)
}

/// A label column's values: borrowed from a UInt16 column, widened from a UInt8 one (files
/// written before labels were two bytes). Any other type, or a null, is an error naming it.
pub fn label_values(column: &dyn Array) -> std::result::Result<Cow<'_, [u16]>, String> {
    if column.null_count() > 0 {
        return Err(format!("`label` has {} nulls", column.null_count()));
    }
    if let Some(a) = column.as_any().downcast_ref::<UInt16Array>() {
        return Ok(Cow::Borrowed(&a.values()[..]));
    }
    if let Some(a) = column.as_any().downcast_ref::<UInt8Array>() {
        return Ok(Cow::Owned(
            a.values().iter().map(|&l| u16::from(l)).collect(),
        ));
    }
    Err(format!(
        "`label` is {}, not UInt16 (or UInt8)",
        column.data_type()
    ))
}

/// `batch` with its `label` column widened from UInt8 to UInt16 (files written before
/// labels were two bytes); any other batch is returned as it is.
pub fn widen_labels(batch: RecordBatch) -> Result<RecordBatch> {
    let Some(i) = batch
        .schema()
        .fields()
        .iter()
        .position(|f| f.name() == "label" && f.data_type() == &DataType::UInt8)
    else {
        return Ok(batch);
    };
    let mut fields: Vec<Field> = batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields[i] = fields[i].clone().with_data_type(DataType::UInt16);
    let mut columns = batch.columns().to_vec();
    columns[i] = arrow::compute::cast(&columns[i], &DataType::UInt16)?;
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns,
    )?)
}

/// The first row whose label is not below `classes`, with that label.
pub fn first_bad_label(labels: &[u16], classes: usize) -> Option<(usize, u16)> {
    labels
        .iter()
        .position(|&l| l as usize >= classes)
        .map(|i| (i, labels[i]))
}
