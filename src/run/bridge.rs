//! The bridge from Arrow to ndarray: a batch's feature column as a matrix, without copying.
//!
//! Preprocessing (SQL + UDFs) ends with a `FixedSizeList<Float32, d>` column; models work on
//! `ndarray` matrices. [`features_view`] lends the list's value buffer to ndarray as an
//! `ArrayView2<f32>` of rows × features, pointing straight into Arrow's memory; a sliced
//! array is still a view (Arrow slices the child values, which stay contiguous). Nulls and
//! other types are refused with an error naming the column: a model must never see a
//! silently zero-filled image.

use datafusion::arrow::array::{Array, FixedSizeListArray, Float32Array, UInt16Array, UInt8Array};
use datafusion::arrow::record_batch::RecordBatch;
use ndarray::{Array1, ArrayView1, ArrayView2, CowArray, Ix1};

use crate::error::{Error, Result};

/// The Float32 fixed-size-list column `column` of `batch` as a rows × features view.
pub fn features_view<'a>(batch: &'a RecordBatch, column: &str) -> Result<ArrayView2<'a, f32>> {
    let col = batch
        .column_by_name(column)
        .ok_or_else(|| Error::data(format!("no column `{column}` in the batch")))?;
    let list = col
        .as_any()
        .downcast_ref::<FixedSizeListArray>()
        .ok_or_else(|| {
            Error::data(format!(
                "column `{column}` is {}, not FixedSizeList<Float32, d>",
                col.data_type()
            ))
        })?;
    list_view(list, column)
}

/// A `FixedSizeList<Float32, d>` array as a rows × d view.
pub fn list_view<'a>(list: &'a FixedSizeListArray, column: &str) -> Result<ArrayView2<'a, f32>> {
    if list.null_count() > 0 {
        return Err(Error::data(format!(
            "column `{column}` has {} null rows",
            list.null_count()
        )));
    }
    let values = list
        .values()
        .as_any()
        .downcast_ref::<Float32Array>()
        .ok_or_else(|| {
            Error::data(format!(
                "column `{column}` holds {}, not Float32",
                list.values().data_type()
            ))
        })?;
    if values.null_count() > 0 {
        return Err(Error::data(format!("column `{column}` has null values")));
    }
    let (rows, d) = (list.len(), list.value_length() as usize);
    let data = values
        .values()
        .get(..rows * d)
        .ok_or_else(|| Error::data(format!("column `{column}`: fewer values than rows × {d}")))?;
    ArrayView2::from_shape((rows, d), data)
        .map_err(|e| Error::data(format!("column `{column}`: {e}")))
}

/// The UInt16 column `column` (labels) as a view; a UInt8 column (files written before
/// labels were widened) is widened into a copy.
pub fn labels_view<'a>(batch: &'a RecordBatch, column: &str) -> Result<CowArray<'a, u16, Ix1>> {
    let col = batch
        .column_by_name(column)
        .ok_or_else(|| Error::data(format!("no column `{column}` in the batch")))?;
    if col.null_count() > 0 {
        return Err(Error::data(format!(
            "column `{column}` has {} null labels",
            col.null_count()
        )));
    }
    if let Some(labels) = col.as_any().downcast_ref::<UInt16Array>() {
        return Ok(CowArray::from(ArrayView1::from(&labels.values()[..])));
    }
    if let Some(labels) = col.as_any().downcast_ref::<UInt8Array>() {
        let wide: Array1<u16> = labels.values().iter().map(|&l| u16::from(l)).collect();
        return Ok(CowArray::from(wide));
    }
    Err(Error::data(format!(
        "column `{column}` is {}, not UInt16 (or UInt8)",
        col.data_type()
    )))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{ArrayRef, Int32Array};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn batch(rows: usize, d: usize) -> RecordBatch {
        let values = Float32Array::from_iter_values((0..rows * d).map(|i| i as f32));
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        let x = FixedSizeListArray::try_new(item, d as i32, Arc::new(values), None).unwrap();
        let y = UInt16Array::from_iter_values((0..rows).map(|i| (i % 10) as u16));
        let schema = Schema::new(vec![
            Field::new("x", x.data_type().clone(), false),
            Field::new("label", DataType::UInt16, false),
        ]);
        RecordBatch::try_new(Arc::new(schema), vec![Arc::new(x) as ArrayRef, Arc::new(y)]).unwrap()
    }

    fn value_ptr(b: &RecordBatch) -> *const f32 {
        let list = b
            .column(0)
            .as_any()
            .downcast_ref::<FixedSizeListArray>()
            .unwrap();
        let v = list
            .values()
            .as_any()
            .downcast_ref::<Float32Array>()
            .unwrap();
        v.values().as_ptr()
    }

    #[test]
    fn views_point_into_the_arrow_buffers() {
        let b = batch(4, 3);
        let x = features_view(&b, "x").unwrap();
        assert_eq!(x.dim(), (4, 3));
        assert_eq!(x[[2, 1]], 7.0);
        assert_eq!(x.as_ptr(), value_ptr(&b), "the view must not copy");
        let y = labels_view(&b, "label").unwrap();
        let labels = b.column(1).as_any().downcast_ref::<UInt16Array>().unwrap();
        assert_eq!(y.as_ptr(), labels.values().as_ptr());
        assert_eq!(y.to_vec(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn a_sliced_batch_is_still_a_view() {
        let b = batch(5, 2);
        let s = b.slice(2, 2);
        let x = features_view(&s, "x").unwrap();
        assert_eq!(x.dim(), (2, 2));
        assert_eq!(x[[0, 0]], 4.0);
        // The view starts 2 rows × 2 values into the original buffer.
        assert_eq!(x.as_ptr(), unsafe { value_ptr(&b).add(4) });
        assert_eq!(labels_view(&s, "label").unwrap().to_vec(), vec![2, 3]);
    }

    #[test]
    fn wrong_types_and_nulls_are_errors() {
        let b = batch(2, 2);
        assert!(features_view(&b, "nope")
            .unwrap_err()
            .to_string()
            .contains("no column `nope`"));
        assert!(features_view(&b, "label")
            .unwrap_err()
            .to_string()
            .contains("not FixedSizeList"));
        assert!(labels_view(&b, "x")
            .unwrap_err()
            .to_string()
            .contains("not UInt16"));
        // Labels of files written before they were two bytes are widened.
        let narrow = RecordBatch::try_from_iter([(
            "label",
            Arc::new(UInt8Array::from(vec![3u8, 255])) as ArrayRef,
        )])
        .unwrap();
        assert_eq!(
            labels_view(&narrow, "label").unwrap().to_vec(),
            vec![3, 255]
        );
        let ints = FixedSizeListArray::try_new(
            Arc::new(Field::new("item", DataType::Int32, false)),
            1,
            Arc::new(Int32Array::from(vec![1, 2])),
            None,
        )
        .unwrap();
        assert!(list_view(&ints, "ints")
            .unwrap_err()
            .to_string()
            .contains("not Float32"));
        let nullable = FixedSizeListArray::try_new(
            Arc::new(Field::new("item", DataType::Float32, true)),
            1,
            Arc::new(Float32Array::from(vec![Some(1.0), None])),
            None,
        )
        .unwrap();
        assert!(list_view(&nullable, "n")
            .unwrap_err()
            .to_string()
            .contains("null values"));
        let null_rows = FixedSizeListArray::try_new(
            Arc::new(Field::new("item", DataType::Float32, false)),
            1,
            Arc::new(Float32Array::from(vec![1.0, 2.0])),
            Some(vec![true, false].into()),
        )
        .unwrap();
        assert!(list_view(&null_rows, "r")
            .unwrap_err()
            .to_string()
            .contains("1 null rows"));
    }
}
