//! The trainer: one streaming SQL query over the live `stream` table feeds a learner batch
//! by batch, and every batch's metrics go to the run store.
//!
//! `train` runs the preprocessing SQL (`sql/train.sql` unless told otherwise) as **one**
//! DataFusion query for the whole run; each output batch is viewed zero-copy as ndarray
//! ([`crate::bridge`]), scored *before* the model learns from it (test-then-train, so the
//! training metrics are honest), then learned from. `predict` loads the saved model, runs
//! `sql/eval.sql` and writes test metrics, the confusion matrix and per-image predictions.

use std::time::Instant;

use datafusion::arrow::array::{Array, UInt32Array, UInt64Array};
use datafusion::arrow::record_batch::RecordBatch;
use futures::StreamExt;
use ndarray::{Array2, ArrayView1, ArrayView2};

use crate::bridge::{features_view, labels_view};
use crate::config;
use crate::error::{Error, Result};
use crate::metrics::{batch_metrics, Accumulator, Metrics};
use crate::model::{self, Learner};
use crate::query;
use crate::runs::{now_ms, MetricsRow, Run, RunInfo};
use crate::source::{self, Report, SourceOptions, SourceSpec};
use crate::table::register_stream;
use crate::transforms;

/// The training preprocessing shipped with cifar-df.
pub const TRAIN_SQL: &str = include_str!("../sql/train.sql");
/// The evaluation preprocessing shipped with cifar-df.
pub const EVAL_SQL: &str = include_str!("../sql/eval.sql");
/// The column the preprocessing SQL must produce for the model.
pub const FEATURES: &str = "features";
/// Models `train --model` knows.
pub use crate::model::MODELS;

/// Metrics rows are written to the run store every this many batches (and at the end).
const FLUSH_EVERY: usize = 50;

/// A new learner by name, with the hyper-parameters in `params` (a TOML table; missing
/// keys take their defaults).
pub fn new_model(name: &str, params: &toml::Table) -> Result<Box<dyn Learner>> {
    config::build_model(name, params)
}

/// Called after every training batch with (batches done, epoch, running epoch metrics).
pub type OnBatch = Box<dyn FnMut(u64, u32, &Metrics) + Send>;

/// What `train` needs.
pub struct TrainOptions {
    /// The run to write.
    pub run: Run,
    /// Model name.
    pub model: String,
    /// Hyper-parameters (the model's table of a run config).
    pub params: toml::Table,
    /// Seed of the augmentation decisions.
    pub seed: u64,
    /// Preprocessing SQL (a `SELECT ... FROM stream` with `label` and `features`).
    pub sql: String,
    /// Where the training data comes from.
    pub source: SourceSpec,
    /// How to read it.
    pub source_opts: SourceOptions,
    /// Called after every batch with (batches done, epoch, running metrics).
    pub on_batch: Option<OnBatch>,
}

/// What a training or prediction pass did.
#[derive(Debug, Default)]
pub struct Summary {
    /// Batches processed.
    pub batches: u64,
    /// Metrics over everything processed (train: scored before learning).
    pub overall: Metrics,
    /// Metrics over the last epoch (train) or the whole pass (predict).
    pub last_epoch: Metrics,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Lines the source rejected.
    pub rejected: u64,
    /// Images per second through the whole pipeline.
    pub images_per_second: f64,
    /// Seconds spent in the model's `partial_fit` (train) or `predict_proba` (predict).
    pub fit_seconds: f64,
    /// PNG grids of the images in each cluster (`predict` of a clustering model whose
    /// SQL keeps the `image` column).
    pub cluster_grids: Vec<std::path::PathBuf>,
}

/// Images kept per cluster for its PNG grid.
const GRID_IMAGES: usize = 100;

/// Adds the raw images of `batch` (its `image` column, if any) to the per-cluster lists,
/// up to [`GRID_IMAGES`] each.
fn collect_cluster_images(batch: &RecordBatch, clusters: &[u32], into: &mut Vec<Vec<Vec<u8>>>) {
    use datafusion::arrow::array::{FixedSizeListArray, UInt8Array};
    let Some(list) = batch
        .column_by_name("image")
        .and_then(|c| c.as_any().downcast_ref::<FixedSizeListArray>())
    else {
        return;
    };
    let Some(values) = list.values().as_any().downcast_ref::<UInt8Array>() else {
        return;
    };
    let width = list.value_length() as usize;
    if width != crate::dataset::IMAGE_BYTES {
        return;
    }
    let base = list.offset() * width;
    for (i, &c) in clusters.iter().enumerate() {
        let c = c as usize;
        if into.len() <= c {
            into.resize(c + 1, Vec::new());
        }
        if into[c].len() < GRID_IMAGES && !list.is_null(i) {
            let start = base + i * width;
            if let Some(px) = values.values().get(start..start + width) {
                into[c].push(px.to_vec());
            }
        }
    }
}

/// A scored batch: features and labels (views into the batch's buffers), the model's
/// probabilities for it, and its metrics under them.
struct Scored<'a> {
    x: ArrayView2<'a, f32>,
    y: ArrayView1<'a, u8>,
    proba: Array2<f32>,
    metrics: Metrics,
}

fn score<'a>(batch: &'a RecordBatch, model: &dyn Learner) -> Result<Scored<'a>> {
    let x = features_view(batch, FEATURES)?;
    let y = labels_view(batch, "label")?;
    let proba = model.predict_proba(x)?;
    let metrics = batch_metrics(y, proba.view())?;
    Ok(Scored {
        x,
        y,
        proba,
        metrics,
    })
}

fn first_u64(batch: &RecordBatch, name: &str) -> Option<u64> {
    let col = batch.column_by_name(name)?;
    let a = col.as_any().downcast_ref::<UInt64Array>()?;
    (!a.is_empty()).then(|| a.value(0))
}

async fn open_stream(
    sql: &str,
    seed: u64,
    spec: &SourceSpec,
    opts: &SourceOptions,
) -> Result<(
    datafusion::execution::SendableRecordBatchStream,
    Report,
    Option<u64>,
)> {
    let ctx = query::stream_session();
    transforms::register(&ctx, seed);
    let src = source::open(spec, opts)?;
    let per_epoch = src.batches_per_epoch();
    let report = register_stream(&ctx, src, spec.is_bounded())?;
    let df = ctx.sql(sql).await?;
    let fields = df.schema().fields();
    for need in ["label", FEATURES] {
        if !fields.iter().any(|f| f.name() == need) {
            return Err(Error::usage(format!(
                "the preprocessing SQL must produce a `{need}` column (it produces: {})",
                fields
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    Ok((df.execute_stream().await?, report, per_epoch))
}

/// Train a model on a source, batch by batch, writing metrics and the model to the run.
///
/// `runs/NAME/run.json` records the run (model, seed, source, hyper-parameters, start)
/// with status `running`, then `finished` (with the end time and counts) or `failed`
/// (with the error).
pub async fn train(opts: TrainOptions) -> Result<Summary> {
    let mut info = RunInfo {
        run: opts.run.name.clone(),
        model: opts.model.clone(),
        status: "running".into(),
        seed: opts.seed,
        source: opts.source.to_string(),
        config: toml::to_string(&opts.params).unwrap_or_default(),
        start_ms: now_ms(),
        end_ms: None,
        batches: 0,
        images: 0,
        error: None,
    };
    let run = opts.run.clone();
    run.write_info(&info)?;
    let result = train_inner(opts).await;
    info.end_ms = Some(now_ms());
    match &result {
        Ok(s) => {
            info.status = "finished".into();
            info.batches = s.batches;
            info.images = s.overall.images;
        }
        Err(e) => {
            info.status = "failed".into();
            info.error = Some(e.to_string());
        }
    }
    // The run's own error matters more than one writing its record.
    if let Err(e) = run.write_info(&info) {
        if result.is_ok() {
            return Err(e);
        }
    }
    result
}

async fn train_inner(mut opts: TrainOptions) -> Result<Summary> {
    let mut model = new_model(&opts.model, &opts.params)?;
    let (mut stream, report, per_epoch) =
        open_stream(&opts.sql, opts.seed, &opts.source, &opts.source_opts).await?;
    let started = Instant::now();
    let mut summary = Summary::default();
    let (mut overall, mut epoch_acc) = (Accumulator::new(), Accumulator::new());
    let mut rows: Vec<MetricsRow> = Vec::new();
    let mut current_epoch = 0u32;
    let mut seq = 0u64;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        if batch.num_rows() == 0 {
            continue;
        }
        let t = Instant::now();
        let number = first_u64(&batch, "batch").unwrap_or(seq);
        seq += 1;
        let epoch = per_epoch.map(|p| (number / p.max(1)) as u32).unwrap_or(0);
        if epoch != current_epoch {
            model.end_epoch()?;
            epoch_acc = Accumulator::new();
            current_epoch = epoch;
        }
        // Test, then train.
        let Scored {
            x,
            y,
            proba,
            metrics: m,
        } = score(&batch, model.as_ref())?;
        overall.update(y, proba.view())?;
        epoch_acc.update(y, proba.view())?;
        let f = Instant::now();
        model.partial_fit(x, y)?;
        summary.fit_seconds += f.elapsed().as_secs_f64();
        rows.push(MetricsRow {
            split: "train".into(),
            epoch,
            batch: number,
            metrics: m,
            seconds: t.elapsed().as_secs_f64(),
            ts_ms: now_ms(),
        });
        summary.batches += 1;
        if rows.len() >= FLUSH_EVERY {
            opts.run.append_metrics(&opts.model, &rows)?;
            rows.clear();
        }
        if let Some(f) = opts.on_batch.as_mut() {
            f(summary.batches, epoch, &epoch_acc.get());
        }
    }
    model.end_epoch()?;
    opts.run.append_metrics(&opts.model, &rows)?;
    model.save(&opts.run.model_dir())?;
    summary.seconds = started.elapsed().as_secs_f64();
    summary.overall = overall.get();
    summary.last_epoch = epoch_acc.get();
    summary.rejected = report.snapshot().rejected;
    summary.images_per_second = summary.overall.images as f64 / summary.seconds.max(1e-9);
    Ok(summary)
}

/// What `predict` needs.
pub struct PredictOptions {
    /// The run whose model to use and where to write.
    pub run: Run,
    /// Preprocessing SQL.
    pub sql: String,
    /// Where the data comes from.
    pub source: SourceSpec,
    /// How to read it (usually the test split).
    pub source_opts: SourceOptions,
    /// Name of the split in the tables.
    pub split: String,
}

/// Score a saved model on a source; writes metrics, confusion and predictions.
pub async fn predict(opts: PredictOptions) -> Result<Summary> {
    let model_dir = opts.run.model_dir();
    if !model_dir.join(model::META_FILE).exists() {
        return Err(Error::usage(format!(
            "run {:?} has no model at {} (train it first)",
            opts.run.name,
            model_dir.display()
        )));
    }
    let model = model::load(&model_dir)?;
    let (mut stream, report, _) =
        open_stream(&opts.sql, 0, &opts.source, &opts.source_opts).await?;
    let started = Instant::now();
    let mut summary = Summary::default();
    let mut all = Accumulator::new();
    let mut rows = Vec::new();
    let mut preds = Vec::new();
    let mut cluster_images: Vec<Vec<Vec<u8>>> = Vec::new();
    let mut cluster_sizes: Vec<u64> = Vec::new();
    let mut seq = 0u64;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        if batch.num_rows() == 0 {
            continue;
        }
        let t = Instant::now();
        let number = first_u64(&batch, "batch").unwrap_or(seq);
        seq += 1;
        let Scored {
            x,
            y,
            proba,
            metrics: m,
        } = score(&batch, model.as_ref())?;
        all.update(y, proba.view())?;
        if let Some(clusters) = model.clusters(x) {
            let clusters = clusters?;
            for &c in &clusters {
                let c = c as usize;
                if cluster_sizes.len() <= c {
                    cluster_sizes.resize(c + 1, 0);
                }
                cluster_sizes[c] += 1;
            }
            collect_cluster_images(&batch, &clusters, &mut cluster_images);
        }
        let (mut predicted, mut p_max) = (Vec::new(), Vec::new());
        for row in proba.rows() {
            let (mut best, mut p) = (0usize, f32::NEG_INFINITY);
            for (k, &v) in row.iter().enumerate() {
                if v > p {
                    best = k;
                    p = v;
                }
            }
            predicted.push(best as u8);
            p_max.push(p);
        }
        let rows_col: Vec<u32> = match batch
            .column_by_name("row")
            .and_then(|c| c.as_any().downcast_ref::<UInt32Array>().cloned())
        {
            Some(r) => r.values().to_vec(),
            None => (0..batch.num_rows() as u32).collect(),
        };
        let numbers: Vec<u64> = match batch
            .column_by_name("batch")
            .and_then(|c| c.as_any().downcast_ref::<UInt64Array>().cloned())
        {
            Some(b) => b.values().to_vec(),
            None => vec![number; batch.num_rows()],
        };
        preds.push(
            opts.run.predictions_batch(
                &opts.split,
                &numbers,
                &rows_col,
                &y.as_slice()
                    .map(std::borrow::Cow::Borrowed)
                    .unwrap_or_else(|| std::borrow::Cow::Owned(y.to_vec())),
                &predicted,
                &p_max,
            )?,
        );
        rows.push(MetricsRow {
            split: opts.split.clone(),
            epoch: 0,
            batch: number,
            metrics: m,
            seconds: t.elapsed().as_secs_f64(),
            ts_ms: now_ms(),
        });
        summary.batches += 1;
    }
    let model_name = model.name();
    opts.run.append_metrics(model_name, &rows)?;
    let overall = all.get();
    opts.run.append_confusion(&opts.split, &overall.confusion)?;
    if !preds.is_empty() {
        let merged = datafusion::arrow::compute::concat_batches(&preds[0].schema(), &preds)?;
        opts.run.append("predictions", &merged)?;
    }
    if cluster_images.iter().any(|c| !c.is_empty()) {
        let titles: Vec<String> = cluster_sizes
            .iter()
            .enumerate()
            .map(|(c, n)| format!("cluster {c}: {n} images"))
            .collect();
        summary.cluster_grids = crate::grid::write_cluster_grids(
            &opts.run.dir.join("clusters"),
            &cluster_images,
            &titles,
            GRID_IMAGES,
        )?;
    }
    summary.seconds = started.elapsed().as_secs_f64();
    summary.images_per_second = overall.images as f64 / summary.seconds.max(1e-9);
    summary.overall = overall.clone();
    summary.last_epoch = overall;
    summary.rejected = report.snapshot().rejected;
    Ok(summary)
}
