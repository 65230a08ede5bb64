//! The read side of the run tables: what `plot` draws and the dashboard shows, read one
//! way.
//!
//! Both read through a DataFusion session on which [`crate::run::tables`] registered the
//! tables (the plot on a plain one, the dashboard on one under its limits, tried again on
//! a fresh listing when a compaction renames a part under it). The rules live here: typed
//! columns of a query result ([`f64_values`], [`u64_values`], [`string_values`]), the
//! image-weighted [`test_scores`] of runs, and a run's [`confusion`] matrix (the run's
//! classes square; cells naming a class outside them counted and left out). Names go into
//! SQL through one quoting helper, [`literal`].

use std::path::Path;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::{cast, cast_with_options, CastOptions};
use arrow::datatypes::{DataType, Float64Type, UInt64Type};
use datafusion::prelude::SessionContext;

use crate::error::{Error, Result};
use crate::run::tables;

/// Text as a SQL string literal (the one quoting helper, [`crate::query::literal`]).
pub use crate::query::literal;

/// Column `name` of a query result, cast to `to`, batch by batch.
fn column<'a>(
    batches: &'a [RecordBatch],
    name: &'a str,
    to: &'a DataType,
) -> impl Iterator<Item = Result<arrow::array::ArrayRef>> + 'a {
    batches.iter().map(move |b| {
        let col = b
            .column_by_name(name)
            .ok_or_else(|| Error::usage(format!("query result has no column {name:?}")))?;
        Ok(cast(col, to)?)
    })
}

/// Column `name` of a query result as `f64` (nulls as NaN).
pub fn f64_values(batches: &[RecordBatch], name: &str) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    for col in column(batches, name, &DataType::Float64) {
        let col = col?;
        let a = col.as_primitive::<Float64Type>();
        out.extend((0..a.len()).map(|i| if a.is_null(i) { f64::NAN } else { a.value(i) }));
    }
    Ok(out)
}

/// Column `name` of a query result as unsigned integers (nulls as 0). A value that does
/// not fit (a negative one) is an error naming the column.
pub fn u64_values(batches: &[RecordBatch], name: &str) -> Result<Vec<u64>> {
    // Cast without turning a value that does not fit into a null.
    let strict = CastOptions {
        safe: false,
        ..CastOptions::default()
    };
    let mut out = Vec::new();
    for b in batches {
        let col = b
            .column_by_name(name)
            .ok_or_else(|| Error::usage(format!("query result has no column {name:?}")))?;
        let col = cast_with_options(col, &DataType::UInt64, &strict)
            .map_err(|e| Error::data(format!("column {name}: {e}")))?;
        let a = col.as_primitive::<UInt64Type>();
        out.extend((0..a.len()).map(|i| if a.is_null(i) { 0 } else { a.value(i) }));
    }
    Ok(out)
}

/// Column `name` of a query result as strings (nulls as empty).
pub fn string_values(batches: &[RecordBatch], name: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for col in column(batches, name, &DataType::Utf8) {
        let col = col?;
        let a = col.as_string::<i32>();
        out.extend((0..a.len()).map(|i| {
            if a.is_null(i) {
                String::new()
            } else {
                a.value(i).to_string()
            }
        }));
    }
    Ok(out)
}

/// A run's scores on its test split, each metric weighted by images:
/// `sum(v · images) / sum(images)` over its test rows.
#[derive(Clone, Debug, PartialEq)]
pub struct TestScores {
    /// The run.
    pub run: String,
    /// Its model.
    pub model: String,
    /// Test images scored.
    pub images: u64,
    /// Accuracy.
    pub acc: f64,
    /// Cross-entropy.
    pub loss: f64,
    /// Macro precision.
    pub precision: f64,
    /// Macro recall.
    pub recall: f64,
    /// Macro F1.
    pub f1: f64,
}

impl TestScores {
    /// The score of metric column `name` (`acc`, `loss`, `precision`, `recall`, `f1`).
    pub fn get(&self, name: &str) -> Option<f64> {
        match name {
            "acc" => Some(self.acc),
            "loss" => Some(self.loss),
            "precision" => Some(self.precision),
            "recall" => Some(self.recall),
            "f1" => Some(self.f1),
            _ => None,
        }
    }
}

/// The test scores of each run of `runs` that has test rows (by run name).
pub async fn test_scores(ctx: &SessionContext, runs: &[&str]) -> Result<Vec<TestScores>> {
    if runs.is_empty() {
        return Ok(Vec::new());
    }
    let names: Vec<String> = runs.iter().map(|r| literal(r)).collect();
    let weighted = |c: &str| {
        format!("CAST(sum(\"{c}\" * CAST(images AS DOUBLE)) / sum(CAST(images AS DOUBLE)) AS DOUBLE) AS \"{c}\"")
    };
    let sql = format!(
        "SELECT run, min(model) AS model, sum(CAST(images AS DOUBLE)) AS images, {}, {}, {}, \
         {}, {} FROM eval_metrics WHERE split = 'test' AND run IN ({}) GROUP BY run ORDER BY run",
        weighted("acc"),
        weighted("loss"),
        weighted("precision"),
        weighted("recall"),
        weighted("f1"),
        names.join(", ")
    );
    let b = crate::query::run_read_only(ctx, &sql).await?;
    let run = string_values(&b, "run")?;
    let model = string_values(&b, "model")?;
    let images = f64_values(&b, "images")?;
    let [acc, loss, precision, recall, f1] =
        ["acc", "loss", "precision", "recall", "f1"].map(|c| f64_values(&b, c));
    let (acc, loss, precision, recall, f1) = (acc?, loss?, precision?, recall?, f1?);
    Ok((0..run.len())
        // A run whose test rows hold no images has no scores.
        .filter(|&i| images[i] > 0.0)
        .map(|i| TestScores {
            run: run[i].clone(),
            model: model[i].clone(),
            images: images[i] as u64,
            acc: acc[i],
            loss: loss[i],
            precision: precision[i],
            recall: recall[i],
            f1: f1[i],
        })
        .collect())
}

/// A run's confusion matrix over a split.
#[derive(Clone, Debug, PartialEq)]
pub struct Confusion {
    /// The run's class names (empty when the run does not say).
    pub classes: Vec<String>,
    /// `counts[actual][predicted]`: the run's classes square (as many as the cells name,
    /// up to [`crate::dataset::MAX_CLASSES`], for a run that does not say); empty when the
    /// split has no cell to count.
    pub counts: Vec<Vec<u64>>,
    /// The epoch of the rows counted: on `train` its last one (the only one counted); on
    /// other splits the last one found. `None`: the split has no rows.
    pub last_epoch: Option<u32>,
    /// Cells naming a class outside the run's, left out, and their images.
    pub dropped_cells: u64,
    /// Images of the cells left out.
    pub dropped_images: u64,
    /// The most classes a cell may name: the run's, or (a run that does not name them)
    /// [`crate::dataset::MAX_CLASSES`].
    pub bound: usize,
}

/// The confusion matrix of `run` (under `root`) on `split`, summed over the split's rows
/// (on `train`, over its last epoch's).
pub async fn confusion(
    ctx: &SessionContext,
    root: &Path,
    run: &str,
    split: &str,
) -> Result<Confusion> {
    tables::Run::new(root, run)?;
    let (q, s) = (literal(run), literal(split));
    let last = crate::query::run_read_only(
        ctx,
        &format!("SELECT max(epoch) AS epoch FROM confusion WHERE run = {q} AND split = {s}"),
    )
    .await?;
    let last_epoch = f64_values(&last, "epoch")?
        .first()
        .filter(|e| e.is_finite())
        .map(|&e| e as u32);
    let classes = tables::run_classes(root, run);
    // The run's classes square; a run that does not name them gets as many as its cells
    // name, up to MAX_CLASSES. Cells beyond are counted and said, not drawn.
    let bound = if classes.is_empty() {
        crate::dataset::MAX_CLASSES
    } else {
        classes.len()
    };
    let mut out = Confusion {
        classes,
        counts: Vec::new(),
        last_epoch,
        dropped_cells: 0,
        dropped_images: 0,
        bound,
    };
    let Some(last_epoch) = last_epoch else {
        return Ok(out);
    };
    let epoch = if split == "train" {
        format!(" AND epoch = {last_epoch}")
    } else {
        String::new()
    };
    let b = crate::query::run_read_only(
        ctx,
        &format!(
            "SELECT CAST(actual AS BIGINT) AS actual, CAST(predicted AS BIGINT) AS predicted, \
             CAST(sum(\"count\") AS BIGINT) AS n FROM confusion \
             WHERE run = {q} AND split = {s}{epoch} GROUP BY actual, predicted"
        ),
    )
    .await?;
    let (actual, predicted, n) = (
        u64_values(&b, "actual")?,
        u64_values(&b, "predicted")?,
        u64_values(&b, "n")?,
    );
    let mut k = out.classes.len();
    let mut cells = Vec::new();
    for i in 0..actual.len() {
        let (a, p) = (actual[i] as usize, predicted[i] as usize);
        if a >= bound || p >= bound {
            out.dropped_cells += 1;
            out.dropped_images += n[i];
            continue;
        }
        k = k.max(a + 1).max(p + 1);
        cells.push((a, p, n[i]));
    }
    if !cells.is_empty() {
        out.counts = vec![vec![0u64; k]; k];
        for (a, p, n) in cells {
            out.counts[a][p] += n;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, Int64Array};
    use std::sync::Arc;

    fn batch(values: Vec<Option<i64>>) -> RecordBatch {
        let col: ArrayRef = Arc::new(Int64Array::from(values));
        RecordBatch::try_from_iter([("n", col)]).unwrap()
    }

    /// Counts read as unsigned: nulls as 0; a negative one (which a cast would turn into
    /// a null, so a 0) is a data error naming the column.
    #[test]
    fn u64_values_read_counts_and_refuse_a_negative_one() {
        let ok = [batch(vec![Some(3), None]), batch(vec![Some(7)])];
        assert_eq!(u64_values(&ok, "n").unwrap(), [3, 0, 7]);
        let e = u64_values(&[batch(vec![Some(3), Some(-1)])], "n").unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Data, "{e}");
        assert!(e.to_string().contains("column n"), "{e}");
        let e = u64_values(&ok, "m").unwrap_err();
        assert!(e.to_string().contains("\"m\""), "{e}");
    }
}
