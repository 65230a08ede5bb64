//! The run store: what training and prediction write, as Parquet tables under `runs/NAME/`.
//!
//! ```text
//! runs/NAME/run.json                            the run: model, config, status, counts
//! runs/NAME/config.toml                         the effective run config
//! runs/NAME/checkpoints/epoch-E[-batch-B]/      model + optimiser + trainer state
//! runs/NAME/metrics/      part-*.parquet        one row per training batch
//! runs/NAME/eval_metrics/ part-*.parquet        one row per batch of a prediction pass
//! runs/NAME/confusion/    part-*.parquet        nonzero cells of each batch's 10x10 matrix
//! runs/NAME/predictions/  part-*.parquet        one row per scored image
//! runs/NAME/plots/        *.png                 curves and heatmaps (`cifar-df plot`)
//! ```
//! Every part file is written under a temporary name and renamed when complete, so the tables
//! are always readable, by `cifar-df query` (which registers `metrics`, `eval_metrics`,
//! `confusion`, `predictions` and `runs` over all runs) or by any Parquet reader.
//!
//! The trainer's parts are named by the stream batches they hold,
//! `part-fit-FIRST-LAST.parquet`, and are committed at least at every checkpoint; a resumed
//! run deletes the parts past its checkpoint ([`Run::discard_after`]) before redoing those
//! batches, so every batch is in the tables exactly once. A prediction pass writes
//! `part-eval-SPLIT-STAMP.parquet` and replaces the previous pass over the same split.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use datafusion::arrow::array::{
    ArrayRef, Float32Array, Float64Array, StringArray, TimestampMillisecondArray, UInt16Array,
    UInt32Array, UInt64Array,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;

use crate::error::{Error, Result};
use crate::run::metrics::{rates, Metrics};
use crate::store::write_parquet_file;

/// The tables a run has.
pub const TABLES: [&str; 4] = ["metrics", "eval_metrics", "confusion", "predictions"];

/// Schema of the `metrics` table.
pub fn metrics_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("run", DataType::Utf8, false),
        Field::new("model", DataType::Utf8, false),
        Field::new("split", DataType::Utf8, false),
        Field::new("epoch", DataType::UInt32, false),
        Field::new("batch", DataType::UInt64, false),
        Field::new("images", DataType::UInt64, false),
        Field::new("acc", DataType::Float64, false),
        Field::new("loss", DataType::Float64, false),
        Field::new("precision", DataType::Float64, false),
        Field::new("recall", DataType::Float64, false),
        Field::new("f1", DataType::Float64, false),
        Field::new("acc_mean", DataType::Float64, false),
        Field::new("loss_mean", DataType::Float64, false),
        Field::new("precision_mean", DataType::Float64, false),
        Field::new("recall_mean", DataType::Float64, false),
        Field::new("f1_mean", DataType::Float64, false),
        Field::new("acc_window", DataType::Float64, false),
        Field::new("loss_window", DataType::Float64, false),
        Field::new("precision_window", DataType::Float64, false),
        Field::new("recall_window", DataType::Float64, false),
        Field::new("f1_window", DataType::Float64, false),
        Field::new("seconds", DataType::Float64, false),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
        // Nullable: parts written before the drift detector have no such column.
        Field::new("drift", DataType::Boolean, true),
    ]))
}

/// Schema of the `confusion` table.
pub fn confusion_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("run", DataType::Utf8, false),
        Field::new("split", DataType::Utf8, false),
        Field::new("epoch", DataType::UInt32, false),
        Field::new("batch", DataType::UInt64, false),
        Field::new("actual", DataType::UInt16, false),
        Field::new("predicted", DataType::UInt16, false),
        Field::new("count", DataType::UInt64, false),
    ]))
}

/// Schema of the `predictions` table.
pub fn predictions_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("run", DataType::Utf8, false),
        Field::new("split", DataType::Utf8, false),
        Field::new("epoch", DataType::UInt32, false),
        Field::new("batch", DataType::UInt64, false),
        Field::new("row", DataType::UInt32, false),
        Field::new("label", DataType::UInt16, false),
        Field::new("predicted", DataType::UInt16, false),
        Field::new("p_max", DataType::Float32, false),
    ]))
}

fn schema_of(table: &str) -> Result<SchemaRef> {
    match table {
        "metrics" | "eval_metrics" => Ok(metrics_schema()),
        "confusion" => Ok(confusion_schema()),
        "predictions" => Ok(predictions_schema()),
        other => Err(Error::usage(format!("unknown run table {other:?}"))),
    }
}

/// One row of the metrics table.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricsRow {
    /// `train` (scored while training) or the split of a prediction pass.
    pub split: String,
    /// Epoch, from 1.
    pub epoch: u32,
    /// Batch sequence number in the stream.
    pub batch: u64,
    /// The batch's metrics.
    pub metrics: Metrics,
    /// Running means of acc, loss, precision, recall and F1 over the batches so far.
    pub mean: [f64; 5],
    /// Means of the same over the last batches (the rolling window).
    pub window: [f64; 5],
    /// Seconds spent on the batch (predict + fit).
    pub seconds: f64,
    /// When it was done, in milliseconds since the Unix epoch.
    pub ts_ms: i64,
    /// Whether the drift detector (ADWIN on the per-batch loss) reported a change at this
    /// batch; always false in a prediction pass.
    pub drift: bool,
}

/// The class names of run `run` under `root`, label 0 first: its `config.toml`'s
/// `classes`, or CIFAR-10's (a run from before classes were saved, or without a config).
pub fn run_classes(root: &Path, run: &str) -> Vec<String> {
    // A name from a request or a table: checked as a run name, never joined as a path.
    let Ok(r) = Run::new(root, run) else {
        return Vec::new();
    };
    let path = r.dir.join("config.toml");
    std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| crate::run::config::RunConfig::parse(&t, &path).ok())
        .unwrap_or_default()
        .class_names()
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `YYYYMMDD-HHMMSS` in UTC, for default run names.
pub fn stamp_now() -> String {
    let secs = now_ms() / 1000;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A named run under a runs directory.
#[derive(Clone, Debug)]
pub struct Run {
    /// `runs/NAME`.
    pub dir: PathBuf,
    /// `NAME`.
    pub name: String,
}

impl Run {
    /// The run `name` under `root` (nothing is created yet). Names are plain: letters,
    /// digits, `-`, `_`, `.`.
    pub fn new(root: &Path, name: &str) -> Result<Self> {
        let ok = !name.is_empty()
            && !name.starts_with('.')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            return Err(Error::usage(format!(
                "run name {name:?}: use letters, digits, '-', '_' and '.' (not first)"
            )));
        }
        Ok(Run {
            dir: root.join(name),
            name: name.to_string(),
        })
    }

    /// Where the run's checkpoints are.
    pub fn checkpoints_dir(&self) -> PathBuf {
        self.dir.join("checkpoints")
    }

    /// Where `cifar-df plot` and `train` put the run's PNGs.
    pub fn plots_dir(&self) -> PathBuf {
        self.dir.join("plots")
    }

    /// Writes `batch` to `table` as the part file `file` (atomically: a temporary file
    /// renamed when complete; an existing part of that name is replaced).
    pub fn write_part(&self, table: &str, file: &str, batch: &RecordBatch) -> Result<PathBuf> {
        schema_of(table)?;
        let dir = self.dir.join(table);
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let path = dir.join(file);
        write_parquet_file(&path, std::slice::from_ref(batch))?;
        Ok(path)
    }

    /// The metrics table rows for `model`.
    pub fn metrics_batch(&self, model: &str, rows: &[MetricsRow]) -> Result<RecordBatch> {
        let n = rows.len();
        let f = |g: &dyn Fn(&MetricsRow) -> f64| {
            Arc::new(Float64Array::from_iter_values(rows.iter().map(g))) as ArrayRef
        };
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(vec![self.name.as_str(); n])),
            Arc::new(StringArray::from(vec![model; n])),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.split.as_str()),
            )),
            Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.epoch))),
            Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.batch))),
            Arc::new(UInt64Array::from_iter_values(
                rows.iter().map(|r| r.metrics.images),
            )),
        ];
        for k in 0..5 {
            columns.push(f(&|r| rates(&r.metrics)[k]));
        }
        for k in 0..5 {
            columns.push(f(&|r| r.mean[k]));
        }
        for k in 0..5 {
            columns.push(f(&|r| r.window[k]));
        }
        columns.push(f(&|r| r.seconds));
        columns.push(Arc::new(
            TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| r.ts_ms))
                .with_timezone("UTC"),
        ));
        columns.push(Arc::new(datafusion::arrow::array::BooleanArray::from_iter(
            rows.iter().map(|r| Some(r.drift)),
        )));
        Ok(RecordBatch::try_new(metrics_schema(), columns)?)
    }

    /// The confusion table rows of `rows`: the nonzero cells of each row's matrix.
    pub fn confusion_batch(&self, rows: &[MetricsRow]) -> Result<RecordBatch> {
        let (mut split, mut epoch, mut batch) = (Vec::new(), Vec::new(), Vec::new());
        let (mut actual, mut predicted, mut count) = (Vec::new(), Vec::new(), Vec::new());
        for r in rows {
            for (a, cells) in r.metrics.confusion.iter().enumerate() {
                for (p, &c) in cells.iter().enumerate() {
                    if c > 0 {
                        split.push(r.split.as_str());
                        epoch.push(r.epoch);
                        batch.push(r.batch);
                        actual.push(a as u16);
                        predicted.push(p as u16);
                        count.push(c);
                    }
                }
            }
        }
        Ok(RecordBatch::try_new(
            confusion_schema(),
            vec![
                Arc::new(StringArray::from(vec![self.name.as_str(); count.len()])),
                Arc::new(StringArray::from(split)),
                Arc::new(UInt32Array::from(epoch)),
                Arc::new(UInt64Array::from(batch)),
                Arc::new(UInt16Array::from(actual)),
                Arc::new(UInt16Array::from(predicted)),
                Arc::new(UInt64Array::from(count)),
            ],
        )?)
    }

    /// Build a predictions batch (one row per image).
    #[allow(clippy::too_many_arguments)]
    pub fn predictions_batch(
        &self,
        split: &str,
        epoch: u32,
        batch: &[u64],
        row: &[u32],
        label: &[u16],
        predicted: &[u16],
        p_max: &[f32],
    ) -> Result<RecordBatch> {
        let n = batch.len();
        Ok(RecordBatch::try_new(
            predictions_schema(),
            vec![
                Arc::new(StringArray::from(vec![self.name.as_str(); n])),
                Arc::new(StringArray::from(vec![split; n])),
                Arc::new(UInt32Array::from(vec![epoch; n])),
                Arc::new(UInt64Array::from(batch.to_vec())),
                Arc::new(UInt32Array::from(row.to_vec())),
                Arc::new(UInt16Array::from(label.to_vec())),
                Arc::new(UInt16Array::from(predicted.to_vec())),
                Arc::new(Float32Array::from(p_max.to_vec())),
            ],
        )?)
    }

    /// Deletes what a crash may have left past a checkpoint: the trainer's part files that
    /// start at stream batch `next_batch` or later, and unfinished (`.inprogress`) files.
    /// Returns how many files were removed.
    pub fn discard_after(&self, next_batch: u64) -> Result<usize> {
        // A merged part reaching past the checkpoint keeps only its batches before it.
        let mut trimmed = 0;
        for table in TABLES {
            let dir = self.dir.join(table);
            for (first, last, name) in fit_parts(&dir) {
                if first < next_batch && next_batch <= last {
                    self.trim_part(table, &dir.join(&name), first, next_batch)?;
                    trimmed += 1;
                }
            }
        }
        self.repair_parts()?;
        let removed = self.remove_parts(|name| {
            name.ends_with(".inprogress")
                || fit_part_range(name).is_some_and(|(first, _)| first >= next_batch)
        })?;
        Ok(removed + trimmed)
    }

    /// Rewrites fit part `path` of `table` (from batch `first`) without its batches from
    /// `next_batch` on.
    fn trim_part(&self, table: &str, path: &Path, first: u64, next_batch: u64) -> Result<()> {
        use datafusion::arrow::array::UInt64Array;
        let schema = schema_of(table)?;
        let batches = read_parquet_batches(path)?
            .into_iter()
            .map(|b| conform(b, &schema, path))
            .collect::<Result<Vec<_>>>()?;
        let all = datafusion::arrow::compute::concat_batches(&schema, &batches)?;
        let batch_col = all
            .column_by_name("batch")
            .and_then(|c| c.as_any().downcast_ref::<UInt64Array>())
            .ok_or_else(|| Error::format(path, 0, "no UInt64 `batch` column"))?;
        let keep = datafusion::arrow::array::BooleanArray::from_iter(
            batch_col
                .iter()
                .map(|b| Some(b.is_some_and(|b| b < next_batch))),
        );
        let kept = datafusion::arrow::compute::filter_record_batch(&all, &keep)?;
        let last = datafusion::arrow::compute::max(
            kept.column_by_name("batch")
                .and_then(|c| c.as_any().downcast_ref::<UInt64Array>())
                .ok_or_else(|| Error::format(path, 0, "no UInt64 `batch` column"))?,
        );
        if let Some(last) = last.filter(|_| kept.num_rows() > 0) {
            self.write_part(table, &fit_part_name(first, last), &kept)?;
        }
        fs::remove_file(path).map_err(|e| Error::io(path, e))
    }

    /// Merges the trainer's small parts, so that a long run of tiny batches does not leave
    /// one file per flush: once [`COMPACT_AT`] fit parts of fewer than
    /// [`SMALL_PART_BATCHES`] metrics rows are there, each run of adjacent small parts
    /// becomes one part (`part-fit-FIRST-LAST` of the first and last batches), in every
    /// table. The merged file is committed before the parts it replaces are deleted, and
    /// readers and [`Run::repair_parts`] pass over a part whose batches another part
    /// covers, so a crash in between leaves no batch twice. Returns the parts removed.
    pub fn compact_fit_parts(&self) -> Result<usize> {
        self.repair_parts()?;
        let dir = self.dir.join("metrics");
        let mut parts: Vec<(u64, u64, String, bool)> = Vec::new();
        for (first, last, name) in fit_parts(&dir) {
            let small = parquet_rows(&dir.join(&name))? < SMALL_PART_BATCHES;
            parts.push((first, last, name, small));
        }
        if parts.iter().filter(|p| p.3).count() < COMPACT_AT {
            return Ok(0);
        }
        let mut removed = 0;
        let mut group: Vec<&(u64, u64, String, bool)> = Vec::new();
        for part in parts
            .iter()
            .chain(std::iter::once(&(0, 0, String::new(), false)))
        {
            if part.3 {
                group.push(part);
                continue;
            }
            if group.len() >= 2 {
                let (first, last) = (group[0].0, group[group.len() - 1].1);
                let names: Vec<&str> = group.iter().map(|p| p.2.as_str()).collect();
                removed += self.merge_parts(&names, &fit_part_name(first, last))?;
            }
            group.clear();
        }
        Ok(removed)
    }

    /// Writes the concatenation of parts `names` as `merged` in each table that has
    /// them, then deletes them.
    fn merge_parts(&self, names: &[&str], merged: &str) -> Result<usize> {
        let mut removed = 0;
        for table in TABLES {
            let dir = self.dir.join(table);
            let paths: Vec<PathBuf> = names
                .iter()
                .map(|n| dir.join(n))
                .filter(|p| p.exists())
                .collect();
            if paths.is_empty() {
                continue;
            }
            let schema = schema_of(table)?;
            let mut batches = Vec::new();
            for p in &paths {
                for b in read_parquet_batches(p)? {
                    batches.push(conform(b, &schema, p)?);
                }
            }
            let all = datafusion::arrow::compute::concat_batches(&schema, &batches)?;
            self.write_part(table, merged, &all)?;
            for p in &paths {
                fs::remove_file(p).map_err(|e| Error::io(p, e))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Deletes fit parts whose batches another part covers (what a crash during
    /// [`Run::compact_fit_parts`] leaves). Returns how many were removed.
    pub fn repair_parts(&self) -> Result<usize> {
        let mut removed = 0;
        for table in TABLES {
            let dir = self.dir.join(table);
            for name in covered_parts(&fit_parts(&dir)) {
                let p = dir.join(name);
                fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Deletes the parts of earlier prediction passes over `split`, keeping `keep`.
    pub fn remove_eval_parts(&self, split: &str, keep: &str) -> Result<()> {
        self.remove_parts(|name| name != keep && eval_part_split(name) == Some(split))
            .map(|_| ())
    }

    /// Deletes the files of the run's tables whose names `doomed` picks; returns how many.
    fn remove_parts(&self, doomed: impl Fn(&str) -> bool) -> Result<usize> {
        let mut removed = 0;
        for table in TABLES {
            let Ok(entries) = fs::read_dir(self.dir.join(table)) else {
                continue;
            };
            for e in entries.filter_map(|e| e.ok()) {
                if doomed(&e.file_name().to_string_lossy()) {
                    let p = e.path();
                    fs::remove_file(&p).map_err(|err| Error::io(&p, err))?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

/// Fit parts with fewer metrics rows than this are merged by [`Run::compact_fit_parts`].
pub const SMALL_PART_BATCHES: usize = 5000;
/// How many small fit parts there must be before they are merged.
pub const COMPACT_AT: usize = 16;

/// The fit parts in `dir`, sorted: (first batch, last batch, file name).
fn fit_parts(dir: &Path) -> Vec<(u64, u64, String)> {
    let mut out: Vec<(u64, u64, String)> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    fit_part_range(&name).map(|(a, b)| (a, b, name))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The names among sorted `parts` whose range lies inside another part's (a merged part
/// and the parts it replaced, after a crash between the two).
fn covered_parts(parts: &[(u64, u64, String)]) -> Vec<&str> {
    parts
        .iter()
        .filter(|(a, b, name)| {
            parts
                .iter()
                .any(|(c, d, other)| other != name && c <= a && b <= d && (c, d) != (a, b))
        })
        .map(|(_, _, n)| n.as_str())
        .collect()
}

fn parquet_rows(path: &Path) -> Result<usize> {
    let file = fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = datafusion::parquet::file::reader::SerializedFileReader::new(file)?;
    use datafusion::parquet::file::reader::FileReader;
    Ok(meta.metadata().file_metadata().num_rows().max(0) as usize)
}

/// `batch` (read from `path`) in the table's current `schema`: a nullable column that the
/// file predates (`drift` in `metrics`) is filled with nulls.
fn conform(batch: RecordBatch, schema: &SchemaRef, path: &Path) -> Result<RecordBatch> {
    if batch.schema().fields() == schema.fields() {
        return Ok(batch);
    }
    let columns = schema
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() => Ok(c.clone()),
            None if f.is_nullable() => Ok(datafusion::arrow::array::new_null_array(
                f.data_type(),
                batch.num_rows(),
            )),
            _ => Err(Error::format(
                path,
                0,
                format!("column {} is missing or of another type", f.name()),
            )),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

fn read_parquet_batches(path: &Path) -> Result<Vec<RecordBatch>> {
    let file = fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let reader =
        datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)?
            .build()?;
    Ok(reader.collect::<std::result::Result<Vec<_>, _>>()?)
}

/// The file name of the trainer's part holding stream batches `first..=last`.
pub fn fit_part_name(first: u64, last: u64) -> String {
    format!("part-fit-{first:012}-{last:012}.parquet")
}

/// The batches a trainer part holds, from its file name.
pub fn fit_part_range(name: &str) -> Option<(u64, u64)> {
    let rest = name.strip_prefix("part-fit-")?.strip_suffix(".parquet")?;
    let (a, b) = rest.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// The file name of a prediction pass's part over `split`.
pub fn eval_part_name(split: &str) -> String {
    format!("part-eval-{:013}-{split}.parquet", now_ms())
}

fn eval_part_split(name: &str) -> Option<&str> {
    let rest = name.strip_prefix("part-eval-")?.strip_suffix(".parquet")?;
    Some(rest.split_once('-')?.1)
}

/// The file of a run's training rows not committed yet: the live feed the dashboard reads
/// between commits (written at most every [`LIVE_EVERY`], removed at each commit).
pub const LIVE_FILE: &str = "live.parquet";
/// How often the live feed is rewritten while rows wait for their commit.
pub const LIVE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Rows and predictions not yet written: the trainer collects them batch by batch and
/// commits them as one part per table.
#[derive(Default)]
pub struct Pending {
    rows: Vec<MetricsRow>,
    predictions: Vec<RecordBatch>,
    live_at: Option<std::time::Instant>,
}

impl Pending {
    /// Adds one batch's metrics row and its predictions.
    pub fn add(&mut self, row: MetricsRow, predictions: RecordBatch) {
        self.rows.push(row);
        self.predictions.push(predictions);
    }

    /// Writes the rows held to the run's live feed ([`LIVE_FILE`]) when the last write is
    /// [`LIVE_EVERY`] old: the dashboard shows them before they are committed.
    pub fn publish(&mut self, run: &Run, model: &str) -> Result<()> {
        if self.rows.is_empty() || self.live_at.is_some_and(|t| t.elapsed() < LIVE_EVERY) {
            return Ok(());
        }
        self.live_at = Some(std::time::Instant::now());
        write_parquet_file(
            &run.dir.join(LIVE_FILE),
            &[run.metrics_batch(model, &self.rows)?],
        )
    }

    /// Batches held.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Writes everything held to `run`'s tables as part file `file`, then forgets it. With
    /// `None` (the trainer) the rows go to `metrics` as `part-fit-FIRST-LAST`; with a name
    /// (a prediction pass) to `eval_metrics`, so that `metrics` holds each training batch
    /// once. Confusion cells and predictions go to `confusion` and `predictions`.
    pub fn commit(&mut self, run: &Run, model: &str, file: Option<&str>) -> Result<()> {
        let (Some(first), Some(last)) = (self.rows.first(), self.rows.last()) else {
            return Ok(());
        };
        let name = match file {
            Some(f) => f.to_string(),
            None => fit_part_name(first.batch, last.batch),
        };
        let table = if file.is_some() {
            "eval_metrics"
        } else {
            "metrics"
        };
        run.write_part(table, &name, &run.metrics_batch(model, &self.rows)?)?;
        let confusion = run.confusion_batch(&self.rows)?;
        if confusion.num_rows() > 0 {
            run.write_part("confusion", &name, &confusion)?;
        }
        let preds =
            datafusion::arrow::compute::concat_batches(&predictions_schema(), &self.predictions)?;
        if preds.num_rows() > 0 {
            run.write_part("predictions", &name, &preds)?;
        }
        self.rows.clear();
        self.predictions.clear();
        if file.is_none() {
            // Committed: the live feed's rows are in `metrics` now.
            let live = run.dir.join(LIVE_FILE);
            if live.exists() {
                fs::remove_file(&live).map_err(|e| Error::io(&live, e))?;
            }
            self.live_at = None;
        }
        Ok(())
    }
}

/// What `runs/NAME/run.json` records about a training run.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunInfo {
    /// The run's name.
    pub run: String,
    /// Model name.
    pub model: String,
    /// `running`, `finished`, `failed` or `interrupted` (stopped by a signal or
    /// `--max-batches`, or found `running` with its process gone, as after `kill -9`).
    pub status: String,
    /// The run seed.
    pub seed: u64,
    /// Where the training data came from.
    pub source: String,
    /// The model's hyper-parameters (TOML).
    pub config: String,
    /// Start, milliseconds since the Unix epoch (UTC).
    pub start_ms: i64,
    /// End (finished or failed), milliseconds since the Unix epoch.
    pub end_ms: Option<i64>,
    /// Batches learnt from.
    pub batches: u64,
    /// Images learnt from.
    pub images: u64,
    /// Why it failed.
    pub error: Option<String>,
    /// The latest checkpoint's name.
    #[serde(default)]
    pub checkpoint: Option<String>,
    /// Times the run was resumed.
    #[serde(default)]
    pub resumes: u32,
    /// The process training it (while `running`).
    #[serde(default)]
    pub pid: Option<u32>,
    /// How the model's products computed, where it has a choice (the cnn: `bf16
    /// (amx-bf16)`, `bf16 (avx512-bf16)` or `f32`), as of the latest pass.
    #[serde(default)]
    pub compute: Option<String>,
}

impl RunInfo {
    /// `status`, except that a `running` run whose process no longer exists (killed
    /// without a chance to say so) is `interrupted`.
    pub fn effective_status(&self) -> &str {
        if self.status == "running" {
            if let Some(pid) = self.pid {
                if pid != std::process::id() && !process_alive(pid) {
                    return "interrupted";
                }
            }
        }
        &self.status
    }
}

/// Whether process `pid` exists (Linux: `/proc/PID`; elsewhere assumed alive).
fn process_alive(pid: u32) -> bool {
    let proc = Path::new("/proc");
    if !proc.is_dir() {
        return true;
    }
    // A zombie (killed, not yet reaped by its parent) is gone for our purposes.
    match fs::read_to_string(proc.join(pid.to_string()).join("stat")) {
        Ok(stat) => !stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
        Err(_) => false,
    }
}

/// The name of a run's info file.
pub const RUN_FILE: &str = "run.json";

impl Run {
    /// Writes `info` to `runs/NAME/run.json` atomically (creating the folder).
    pub fn write_info(&self, info: &RunInfo) -> Result<()> {
        fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let path = self.dir.join(RUN_FILE);
        let mut json = serde_json::to_vec_pretty(info)
            .map_err(|e| Error::io(&path, std::io::Error::other(e)))?;
        json.push(b'\n');
        crate::store::write_atomic(&path, &json)
    }

    /// The run's `run.json`, if it has one.
    pub fn read_info(&self) -> Result<Option<RunInfo>> {
        let path = self.dir.join(RUN_FILE);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                Error::format(&path, e.column() as u64, format!("invalid run info: {e}"))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&path, e)),
        }
    }
}

/// The schema of the `runs` table.
pub fn runs_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("run", DataType::Utf8, false),
        Field::new("model", DataType::Utf8, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("seed", DataType::UInt64, false),
        Field::new("source", DataType::Utf8, false),
        Field::new(
            "start",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
        Field::new(
            "end",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            true,
        ),
        Field::new("batches", DataType::UInt64, false),
        Field::new("images", DataType::UInt64, false),
        Field::new("error", DataType::Utf8, true),
        Field::new("checkpoint", DataType::Utf8, true),
        Field::new("resumes", DataType::UInt32, false),
        Field::new("config", DataType::Utf8, false),
        Field::new("compute", DataType::Utf8, true),
    ]))
}

/// Reads every `run.json` under `root` (sorted by run name). A file that cannot be
/// read or parsed is an error naming it.
pub fn read_run_infos(root: &Path) -> Result<Vec<RunInfo>> {
    let mut paths: Vec<PathBuf> = match fs::read_dir(root) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .map(|e| e.path().join(RUN_FILE))
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    paths.sort();
    paths
        .iter()
        .map(|p| {
            let bytes = fs::read(p).map_err(|e| Error::io(p, e))?;
            serde_json::from_slice(&bytes)
                .map_err(|e| Error::format(p, e.column() as u64, format!("invalid run info: {e}")))
        })
        .collect()
}

fn runs_batch(infos: &[RunInfo]) -> Result<RecordBatch> {
    let strings = |f: &dyn Fn(&RunInfo) -> String| -> ArrayRef {
        Arc::new(StringArray::from(infos.iter().map(f).collect::<Vec<_>>()))
    };
    let ts = |v: Vec<Option<i64>>| -> ArrayRef {
        Arc::new(TimestampMillisecondArray::from(v).with_timezone("UTC"))
    };
    let columns: Vec<ArrayRef> = vec![
        strings(&|i| i.run.clone()),
        strings(&|i| i.model.clone()),
        strings(&|i| i.effective_status().to_string()),
        Arc::new(UInt64Array::from(
            infos.iter().map(|i| i.seed).collect::<Vec<_>>(),
        )),
        strings(&|i| i.source.clone()),
        ts(infos.iter().map(|i| Some(i.start_ms)).collect()),
        ts(infos.iter().map(|i| i.end_ms).collect()),
        Arc::new(UInt64Array::from(
            infos.iter().map(|i| i.batches).collect::<Vec<_>>(),
        )),
        Arc::new(UInt64Array::from(
            infos.iter().map(|i| i.images).collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from(
            infos.iter().map(|i| i.error.clone()).collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from(
            infos
                .iter()
                .map(|i| i.checkpoint.clone())
                .collect::<Vec<_>>(),
        )),
        Arc::new(UInt32Array::from(
            infos.iter().map(|i| i.resumes).collect::<Vec<_>>(),
        )),
        strings(&|i| i.config.clone()),
        Arc::new(StringArray::from(
            infos.iter().map(|i| i.compute.clone()).collect::<Vec<_>>(),
        )),
    ];
    Ok(RecordBatch::try_new(runs_schema(), columns)?)
}

/// Register `metrics`, `eval_metrics`, `confusion` and `predictions` over every run under
/// `root` in `ctx`, and `runs` (one row per `run.json`). A table no run has yet is registered empty, so
/// queries over it still work.
pub fn register_tables(ctx: &SessionContext, root: &Path) -> Result<()> {
    register_tables_of(ctx, root, None)
}

/// [`register_tables`], with the four tables over the runs named in `only` (all runs when
/// `None`): a query about a few runs then plans over their files alone.
pub fn register_tables_of(ctx: &SessionContext, root: &Path, only: Option<&[&str]>) -> Result<()> {
    let infos = read_run_infos(root)?;
    let batch = runs_batch(&infos)?;
    ctx.deregister_table("runs")?;
    ctx.register_table(
        "runs",
        Arc::new(MemTable::try_new(runs_schema(), vec![vec![batch]])?),
    )?;
    for table in TABLES {
        let schema = schema_of(table)?;
        let mut urls = Vec::new();
        if let Ok(entries) = fs::read_dir(root) {
            let mut dirs: Vec<PathBuf> = entries
                .filter_map(|e| e.ok())
                .filter(|e| {
                    only.is_none_or(|names| {
                        names.iter().any(|n| e.file_name().to_str() == Some(*n))
                    })
                })
                .map(|e| e.path().join(table))
                .filter(|p| has_parts(p))
                .collect();
            dirs.sort();
            for d in dirs {
                let d = fs::canonicalize(&d).map_err(|e| Error::io(&d, e))?;
                let covered = covered_parts(&fit_parts(&d))
                    .into_iter()
                    .map(str::to_string)
                    .collect::<Vec<_>>();
                if covered.is_empty() {
                    urls.push(ListingTableUrl::parse(format!("{}/", d.display()))?);
                    continue;
                }
                // A crash during compaction left parts that a merged part covers: list the
                // files one by one without them.
                let mut files: Vec<PathBuf> = fs::read_dir(&d)
                    .map_err(|e| Error::io(&d, e))?
                    .filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| {
                        let n = p.file_name().map(|n| n.to_string_lossy().into_owned());
                        n.is_some_and(|n| {
                            n.starts_with("part-")
                                && n.ends_with(".parquet")
                                && !covered.contains(&n)
                        })
                    })
                    .collect();
                files.sort();
                for f in files {
                    urls.push(ListingTableUrl::parse(f.display().to_string())?);
                }
            }
        }
        ctx.deregister_table(table)?;
        if urls.is_empty() {
            let empty = MemTable::try_new(schema, vec![vec![]])?;
            ctx.register_table(table, Arc::new(empty))?;
            continue;
        }
        let options =
            ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
        let config = ListingTableConfig::new_with_multi_paths(urls)
            .with_listing_options(options)
            .with_schema(schema);
        ctx.register_table(table, Arc::new(ListingTable::try_new(config)?))?;
    }
    Ok(())
}

fn has_parts(dir: &Path) -> bool {
    fs::read_dir(dir)
        .map(|entries| {
            entries.filter_map(|e| e.ok()).any(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.starts_with("part-") && name.ends_with(".parquet")
            })
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::metrics::batch_metrics;

    /// Commits fit parts of `per` batches each, batches `0..n`, with one-image batches.
    fn commit_parts(run: &Run, n: u64, per: u64) {
        let mut pending = Pending::default();
        for b in 0..n {
            let y = ndarray::Array1::from(vec![(b % 10) as u16]);
            let mut p = ndarray::Array2::<f32>::from_elem((1, 10), 0.05);
            p[[0, (b % 7) as usize]] = 0.55;
            let m = batch_metrics(y.view(), p.view()).unwrap();
            let preds = run
                .predictions_batch(
                    "train",
                    1,
                    &[b],
                    &[0],
                    &[(b % 10) as u16],
                    &[(b % 7) as u16],
                    &[0.55],
                )
                .unwrap();
            pending.add(
                MetricsRow {
                    split: "train".into(),
                    epoch: 1,
                    batch: b,
                    metrics: m,
                    mean: [0.0; 5],
                    window: [0.0; 5],
                    seconds: 0.0,
                    ts_ms: 0,
                    drift: b == 7,
                },
                preds,
            );
            if (b + 1) % per == 0 {
                pending.commit(run, "logreg", None).unwrap();
            }
        }
        pending.commit(run, "logreg", None).unwrap();
    }

    fn names(dir: &Path) -> Vec<String> {
        fit_parts(dir).into_iter().map(|p| p.2).collect()
    }

    fn count(root: &Path, sql: &str) -> i64 {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let ctx = crate::query::session();
            register_tables(&ctx, root).unwrap();
            let b = crate::query::run(&ctx, sql).await.unwrap();
            b[0].column(0)
                .as_any()
                .downcast_ref::<datafusion::arrow::array::Int64Array>()
                .unwrap()
                .value(0)
        })
    }

    #[test]
    fn small_parts_are_merged_and_every_batch_stays_once() {
        let dir = tempfile::tempdir().unwrap();
        let run = Run::new(dir.path(), "r").unwrap();
        commit_parts(&run, 150, 10); // 15 parts: under COMPACT_AT
        assert_eq!(run.compact_fit_parts().unwrap(), 0);
        assert_eq!(names(&run.dir.join("metrics")).len(), 15);
        assert_eq!(count(dir.path(), "select count(*) from predictions"), 150);
        // 25 parts, all small: one merged part per table.
        let more = Run::new(dir.path(), "s").unwrap();
        commit_parts(&more, 250, 10);
        let removed = more.compact_fit_parts().unwrap();
        assert_eq!(removed, 3 * 25, "metrics, confusion and predictions");
        for table in ["metrics", "confusion", "predictions"] {
            assert_eq!(
                names(&more.dir.join(table)),
                vec![fit_part_name(0, 249)],
                "{table}"
            );
        }
        assert_eq!(
            count(
                dir.path(),
                "select count(distinct batch) from metrics where run = 's'"
            ),
            250
        );
        assert_eq!(
            count(
                dir.path(),
                "select count(*) from predictions where run = 's'"
            ),
            250
        );
    }

    #[test]
    fn a_crash_between_merge_and_delete_leaves_no_batch_twice() {
        let dir = tempfile::tempdir().unwrap();
        let run = Run::new(dir.path(), "r").unwrap();
        commit_parts(&run, 40, 10);
        // What a crash leaves: the merged part written, the parts it replaces not deleted.
        let m = run.dir.join("metrics");
        let batches = read_parquet_batches(&m.join(fit_part_name(0, 9))).unwrap();
        let mut all = batches;
        for first in [10u64, 20, 30] {
            all.extend(read_parquet_batches(&m.join(fit_part_name(first, first + 9))).unwrap());
        }
        let merged = datafusion::arrow::compute::concat_batches(&metrics_schema(), &all).unwrap();
        run.write_part("metrics", &fit_part_name(0, 39), &merged)
            .unwrap();
        assert_eq!(names(&m).len(), 5);
        // Readers pass over the covered parts...
        assert_eq!(count(dir.path(), "select count(*) from metrics"), 40);
        // ... and the trainer deletes them.
        assert_eq!(run.repair_parts().unwrap(), 4);
        assert_eq!(names(&m), vec![fit_part_name(0, 39)]);
        assert_eq!(count(dir.path(), "select count(*) from metrics"), 40);
    }

    #[test]
    fn resuming_inside_a_merged_part_keeps_only_the_batches_before_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let run = Run::new(dir.path(), "r").unwrap();
        commit_parts(&run, 200, 10);
        run.compact_fit_parts().unwrap();
        assert_eq!(names(&run.dir.join("metrics")), vec![fit_part_name(0, 199)]);
        run.discard_after(123).unwrap();
        for table in ["metrics", "predictions"] {
            assert_eq!(
                names(&run.dir.join(table)),
                vec![fit_part_name(0, 122)],
                "{table}"
            );
        }
        assert_eq!(count(dir.path(), "select count(*) from metrics"), 123);
        assert_eq!(
            count(
                dir.path(),
                "select count(*) from metrics where batch >= 123"
            ),
            0
        );
        assert_eq!(count(dir.path(), "select count(*) from predictions"), 123);
    }
}
