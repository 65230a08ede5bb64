//! The run store: what training and prediction write, as Parquet tables under `runs/NAME/`.
//!
//! ```text
//! runs/NAME/model/            model.safetensors + model.json
//! runs/NAME/metrics/          part-*.parquet   one row per batch (train and test)
//! runs/NAME/confusion/        part-*.parquet   the 10x10 matrix of a prediction pass
//! runs/NAME/predictions/      part-*.parquet   one row per predicted image
//! ```
//! Every part file is written under a temporary name and renamed when complete, so the tables
//! are always readable, by `cifar-df query` (which registers `metrics`, `confusion` and
//! `predictions` over all runs) or by any Parquet reader.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use datafusion::arrow::array::{
    ArrayRef, Float32Array, Float64Array, StringArray, TimestampMillisecondArray, UInt32Array,
    UInt64Array, UInt8Array,
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
use crate::export::write_parquet_file;
use crate::metrics::Metrics;

/// The tables a run has.
pub const TABLES: [&str; 3] = ["metrics", "confusion", "predictions"];

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
    ]))
}

/// Schema of the `confusion` table.
pub fn confusion_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("run", DataType::Utf8, false),
        Field::new("split", DataType::Utf8, false),
        Field::new("epoch", DataType::UInt32, false),
        Field::new("batch", DataType::UInt64, false),
        Field::new("actual", DataType::UInt8, false),
        Field::new("predicted", DataType::UInt8, false),
        Field::new("count", DataType::UInt64, false),
    ]))
}

/// Schema of the `predictions` table.
pub fn predictions_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("run", DataType::Utf8, false),
        Field::new("split", DataType::Utf8, false),
        Field::new("batch", DataType::UInt64, false),
        Field::new("row", DataType::UInt32, false),
        Field::new("label", DataType::UInt8, false),
        Field::new("predicted", DataType::UInt8, false),
        Field::new("p_max", DataType::Float32, false),
    ]))
}

fn schema_of(table: &str) -> Result<SchemaRef> {
    match table {
        "metrics" => Ok(metrics_schema()),
        "confusion" => Ok(confusion_schema()),
        "predictions" => Ok(predictions_schema()),
        other => Err(Error::usage(format!("unknown run table {other:?}"))),
    }
}

/// One row of the metrics table.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricsRow {
    /// `train` or `test`.
    pub split: String,
    /// Epoch, from 0.
    pub epoch: u32,
    /// Batch sequence number in the stream.
    pub batch: u64,
    /// The batch's metrics.
    pub metrics: Metrics,
    /// Seconds spent on the batch (predict + fit).
    pub seconds: f64,
    /// When it was done, in milliseconds since the Unix epoch.
    pub ts_ms: i64,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
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

    /// Where the model is saved.
    pub fn model_dir(&self) -> PathBuf {
        self.dir.join("model")
    }

    /// Append `batch` to `table` as a new part file (atomically).
    pub fn append(&self, table: &str, batch: &RecordBatch) -> Result<PathBuf> {
        schema_of(table)?;
        let dir = self.dir.join(table);
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        // Names sort in write order: milliseconds, then a counter for the same millisecond.
        let stamp = now_ms();
        let mut n = 0;
        let path = loop {
            let p = dir.join(format!("part-{stamp:013}-{n:03}.parquet"));
            if !p.exists() {
                break p;
            }
            n += 1;
        };
        write_parquet_file(&path, std::slice::from_ref(batch))?;
        Ok(path)
    }

    /// Append metrics rows for `model`.
    pub fn append_metrics(&self, model: &str, rows: &[MetricsRow]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let n = rows.len();
        let f = |g: fn(&MetricsRow) -> f64| {
            Arc::new(Float64Array::from_iter_values(rows.iter().map(g))) as ArrayRef
        };
        let batch = RecordBatch::try_new(
            metrics_schema(),
            vec![
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
                f(|r| r.metrics.acc),
                f(|r| r.metrics.loss),
                f(|r| r.metrics.precision),
                f(|r| r.metrics.recall),
                f(|r| r.metrics.f1),
                // Placeholder until the trainer keeps running means and windows: the
                // per-batch values.
                f(|r| r.metrics.acc),
                f(|r| r.metrics.loss),
                f(|r| r.metrics.precision),
                f(|r| r.metrics.recall),
                f(|r| r.metrics.f1),
                f(|r| r.metrics.acc),
                f(|r| r.metrics.loss),
                f(|r| r.metrics.precision),
                f(|r| r.metrics.recall),
                f(|r| r.metrics.f1),
                f(|r| r.seconds),
                Arc::new(
                    TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| r.ts_ms))
                        .with_timezone("UTC"),
                ),
            ],
        )?;
        self.append("metrics", &batch).map(|_| ())
    }

    /// Append the confusion matrix of `split`.
    pub fn append_confusion(&self, split: &str, confusion: &[[u64; 10]; 10]) -> Result<()> {
        let (mut actual, mut predicted, mut count) = (Vec::new(), Vec::new(), Vec::new());
        for (a, row) in confusion.iter().enumerate() {
            for (p, &c) in row.iter().enumerate() {
                actual.push(a as u8);
                predicted.push(p as u8);
                count.push(c);
            }
        }
        let batch = RecordBatch::try_new(
            confusion_schema(),
            vec![
                Arc::new(StringArray::from(vec![self.name.as_str(); 100])),
                Arc::new(StringArray::from(vec![split; 100])),
                // Placeholder until the trainer writes per-batch matrices.
                Arc::new(UInt32Array::from(vec![0u32; 100])),
                Arc::new(UInt64Array::from(vec![0u64; 100])),
                Arc::new(UInt8Array::from(actual)),
                Arc::new(UInt8Array::from(predicted)),
                Arc::new(UInt64Array::from(count)),
            ],
        )?;
        self.append("confusion", &batch).map(|_| ())
    }

    /// Build a predictions batch (one row per image).
    pub fn predictions_batch(
        &self,
        split: &str,
        batch: &[u64],
        row: &[u32],
        label: &[u8],
        predicted: &[u8],
        p_max: &[f32],
    ) -> Result<RecordBatch> {
        let n = batch.len();
        Ok(RecordBatch::try_new(
            predictions_schema(),
            vec![
                Arc::new(StringArray::from(vec![self.name.as_str(); n])),
                Arc::new(StringArray::from(vec![split; n])),
                Arc::new(UInt64Array::from(batch.to_vec())),
                Arc::new(UInt32Array::from(row.to_vec())),
                Arc::new(UInt8Array::from(label.to_vec())),
                Arc::new(UInt8Array::from(predicted.to_vec())),
                Arc::new(Float32Array::from(p_max.to_vec())),
            ],
        )?)
    }
}

/// What `runs/NAME/run.json` records about a training run.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunInfo {
    /// The run's name.
    pub run: String,
    /// Model name.
    pub model: String,
    /// `running`, `finished` or `failed`.
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
        crate::model::write_atomic(&path, &json)
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
        Field::new("config", DataType::Utf8, false),
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
        strings(&|i| i.status.clone()),
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
        strings(&|i| i.config.clone()),
    ];
    Ok(RecordBatch::try_new(runs_schema(), columns)?)
}

/// Register `metrics`, `confusion` and `predictions` over every run under `root` in `ctx`,
/// and `runs` (one row per `run.json`). A table no run has yet is registered empty, so
/// queries over it still work.
pub fn register_tables(ctx: &SessionContext, root: &Path) -> Result<()> {
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
                .map(|e| e.path().join(table))
                .filter(|p| has_parts(p))
                .collect();
            dirs.sort();
            for d in dirs {
                let d = fs::canonicalize(&d).map_err(|e| Error::io(&d, e))?;
                urls.push(ListingTableUrl::parse(format!("{}/", d.display()))?);
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
