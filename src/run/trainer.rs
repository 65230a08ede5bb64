//! The trainer: one streaming SQL query over the live `stream` table feeds a learner batch
//! by batch, and every batch's metrics go to the run store.
//!
//! `train` runs the preprocessing SQL (`sql/train.sql` unless told otherwise) as **one**
//! DataFusion query for the whole run; each output batch is viewed zero-copy as ndarray
//! ([`crate::run::bridge`]), scored *before* the model learns from it (test-then-train, so the
//! training metrics are honest; `eval_after_fit` gives the original's score-after-fit),
//! then learned from. Every `checkpoint_every` batches and at every epoch's end the
//! metrics, confusion and prediction rows so far are committed as Parquet parts and a
//! checkpoint is written ([`crate::run::checkpoint`]); a resumed run starts from the latest one,
//! skips the batches it learnt and ends bit-identical to an uninterrupted run.
//! `predict` loads a checkpoint, runs `sql/eval.sql` and writes test metrics, the
//! confusion matrix and per-image predictions.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Array, UInt32Array, UInt64Array};
use datafusion::arrow::record_batch::RecordBatch;
use futures::StreamExt;
use ndarray::{Array2, ArrayView1};

use crate::dataset::{self, DataSpec, Images};
use crate::error::{Error, Result};
use crate::features::{self, Extractor};
use crate::model::Learner;
use crate::query;
use crate::run::bridge::{features_view, labels_view};
use crate::run::checkpoint::{self, Checkpoint, TrainState};
use crate::run::config;
use crate::run::drift::Change;
use crate::run::metrics::{batch_metrics, Accumulator, Metrics, Running};
use crate::run::tables::{self, now_ms, MetricsRow, Pending, Run, RunInfo};
use crate::serve::{self, ServeOptions, ServeSummary};
use crate::source::table::register_stream;
use crate::source::{self, Report, SourceOptions, SourceSpec};
use crate::transforms;
use crate::wire::Format;

/// The training preprocessing shipped with cifar-df.
pub const TRAIN_SQL: &str = include_str!("../../sql/train.sql");
/// The evaluation preprocessing shipped with cifar-df.
pub const EVAL_SQL: &str = include_str!("../../sql/eval.sql");
/// The preprocessing of a run with a feature extractor: `extract_features(image)`.
pub const FEATURES_SQL: &str = include_str!("../../sql/features.sql");
/// [`EVAL_SQL`] with flip averaging: also the mirrored images' features, [`FLIPPED`].
pub const EVAL_FLIP_SQL: &str = include_str!("../../sql/eval_flip.sql");
/// [`FEATURES_SQL`] with flip averaging: also the mirrored images' features, [`FLIPPED`].
pub const FEATURES_FLIP_SQL: &str = include_str!("../../sql/features_flip.sql");
/// The preprocessing of a `features:` source: the cached features as they are.
pub const CACHED_SQL: &str = include_str!("../../sql/cached.sql");
/// Where a run keeps its feature extractor.
pub const EXTRACTOR_DIR: &str = "extractor";
/// The column the preprocessing SQL must produce for the model.
pub const FEATURES: &str = "features";
/// The optional column of an evaluation query with the mirrored images' features: when a
/// batch has it, each image's probabilities are the mean of the model's for the two
/// (test-time flip averaging).
pub const FLIPPED: &str = "features_flipped";
/// Models `train --model` knows.
pub use crate::model::MODELS;

/// Metrics rows are also committed every this many batches between checkpoints, so that
/// `query` sees a long epoch as it goes (a resumed run replaces those past its checkpoint).
const FLUSH_EVERY: usize = 50;

/// A new learner by name, with the hyper-parameters in `params` (a TOML table; missing
/// keys take their defaults).
pub fn new_model(name: &str, params: &toml::Table) -> Result<Box<dyn Learner>> {
    config::build_model(name, params)
}

/// Where the training data comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum TrainSource {
    /// A source as `--source` names it: `tcp://`, `file:`, or a dataset read in process.
    Spec(SourceSpec),
    /// A dataset served by a stream server inside this process and read back over a real
    /// loopback TCP connection, as the original's two processes did.
    Loopback {
        /// The dataset.
        data: DataSpec,
        /// Pause of the server after each batch.
        sleep: Duration,
    },
}

impl TrainSource {
    /// Parses what [`TrainSource`]'s `Display` writes (`loopback:DATA` or a source).
    pub fn parse(s: &str) -> Result<Self> {
        match s.strip_prefix("loopback:") {
            Some(d) => Ok(TrainSource::Loopback {
                data: DataSpec::parse(d)?,
                sleep: Duration::ZERO,
            }),
            None => Ok(TrainSource::Spec(SourceSpec::parse(s)?)),
        }
    }

    /// The dataset behind the source, when there is one (to score its test split).
    pub fn dataset(&self) -> Option<&DataSpec> {
        match self {
            TrainSource::Spec(SourceSpec::Data(d)) => Some(d),
            TrainSource::Loopback { data, .. } => Some(data),
            TrainSource::Spec(_) => None,
        }
    }
}

impl std::fmt::Display for TrainSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TrainSource::Spec(s) => write!(f, "{s}"),
            TrainSource::Loopback { data, .. } => write!(f, "loopback:{data}"),
        }
    }
}

/// Where a pass is, for progress bars.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    /// Epoch, from 1.
    pub epoch: u32,
    /// Epochs in the run, when known.
    pub epochs: Option<u64>,
    /// Position of the batch in its epoch, from 1.
    pub batch_in_epoch: u64,
    /// Batches per epoch, when known.
    pub per_epoch: Option<u64>,
    /// Batches done in this pass.
    pub batches: u64,
    /// Images per second in this pass.
    pub images_per_second: f64,
    /// Running mean of the batch accuracies.
    pub acc: f64,
    /// Running mean of the batch losses.
    pub loss: f64,
}

/// Called after every batch.
pub type OnBatch = Box<dyn FnMut(&Progress) + Send>;

/// A future that, when it completes, asks a pass to stop (checkpointed; resumable).
pub type StopSignal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What `train` needs.
pub struct TrainOptions {
    /// The run to write.
    pub run: Run,
    /// Model name.
    pub model: String,
    /// Hyper-parameters (the model's table of a run config).
    pub params: toml::Table,
    /// The effective run config (TOML), saved in the run and in every checkpoint.
    pub config: String,
    /// Seed of the augmentation decisions.
    pub seed: u64,
    /// Preprocessing SQL (a `SELECT ... FROM stream` with `label` and `features`).
    pub sql: String,
    /// Where the training data comes from.
    pub source: TrainSource,
    /// How to read it (`epochs` is the run's total; `skip` is set by a resume).
    pub source_opts: SourceOptions,
    /// Score each batch after learning from it (the original's way) instead of before.
    pub eval_after_fit: bool,
    /// Checkpoint every this many stream batches (0: only at epoch ends).
    pub checkpoint_every: u64,
    /// Mid-epoch checkpoints to keep (0: all); epoch-end checkpoints are all kept.
    pub keep_checkpoints: usize,
    /// Batches in the rolling window of the metrics rows.
    pub window: usize,
    /// Continue the run from its latest checkpoint.
    pub resume: bool,
    /// Delete an existing run of this name first.
    pub overwrite: bool,
    /// Stop (checkpointed, status `interrupted`) after learning this many batches.
    pub max_batches: Option<u64>,
    /// Stop (checkpointed, status `interrupted`) when this completes (Ctrl-C).
    pub stop: Option<StopSignal>,
    /// Called after every batch.
    pub on_batch: Option<OnBatch>,
    /// The feature extractor bound to `extract_features` in the SQL (saved with the run
    /// in `runs/NAME/extractor/`; a resumed run loads its own).
    pub extractor: Option<Arc<Extractor>>,
    /// A resumed run goes on in this precision (`--precision`), not its own.
    pub precision: Option<crate::model::cnn::Precision>,
}

impl TrainOptions {
    /// Options with the defaults: test-then-train, a checkpoint every 100 batches and at
    /// epoch ends, the last 3 mid-epoch checkpoints kept, a rolling window of 20.
    pub fn new(run: Run, model: &str, source: TrainSource, source_opts: SourceOptions) -> Self {
        TrainOptions {
            run,
            model: model.to_string(),
            params: toml::Table::new(),
            config: String::new(),
            extractor: None,
            seed: 0,
            sql: TRAIN_SQL.to_string(),
            source,
            source_opts,
            eval_after_fit: false,
            checkpoint_every: 100,
            keep_checkpoints: 3,
            window: 20,
            resume: false,
            overwrite: false,
            max_batches: None,
            stop: None,
            on_batch: None,
            precision: None,
        }
    }
}

/// What a training or prediction pass did.
#[derive(Debug, Default)]
pub struct Summary {
    /// Batches processed in this pass (a resumed run: since the resume).
    pub batches: u64,
    /// Batches learnt over the whole run (train).
    pub total_batches: u64,
    /// Metrics over everything processed (train: the whole run, scored before learning).
    pub overall: Metrics,
    /// Metrics over the last epoch (train) or the whole pass (predict).
    pub last_epoch: Metrics,
    /// Epoch of the last batch, from 1 (train; predict: the checkpoint's).
    pub epoch: u32,
    /// Wall-clock seconds of this pass.
    pub seconds: f64,
    /// Lines the source rejected, plus batches the trainer rejected.
    pub rejected: u64,
    /// Images per second through the whole pipeline in this pass.
    pub images_per_second: f64,
    /// Seconds spent in the model's `partial_fit` (train) or `predict_proba` (predict).
    pub fit_seconds: f64,
    /// Whether the pass stopped early (signal or `max_batches`); resumable.
    pub interrupted: bool,
    /// The latest checkpoint (train) or the one used (predict).
    pub checkpoint: Option<String>,
    /// The checkpoint a resumed run started from.
    pub resumed_from: Option<String>,
    /// Part files a resume removed (rows past its checkpoint).
    pub discarded_parts: usize,
    /// PNG grids of the images in each cluster (`predict` of a clustering model whose
    /// SQL keeps the `image` column).
    pub cluster_grids: Vec<std::path::PathBuf>,
    /// How the model's products computed, where it has a choice ([`RunInfo::compute`]).
    pub compute: Option<String>,
}

/// Images kept per cluster for its PNG grid.
const GRID_IMAGES: usize = 100;

/// Adds the raw images of `batch` (its `image` column, if any) to the per-cluster lists,
/// up to [`GRID_IMAGES`] each, as 32×32 thumbnails (images of another side are resized).
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
    let Some(side) = crate::transforms::pixels::side(width) else {
        return;
    };
    let thumb = (side != crate::dataset::SIDE)
        .then(|| {
            crate::transforms::pixels::Resize::new(side, crate::dataset::SIDE, crate::dataset::SIDE)
                .ok()
        })
        .flatten();
    let base = list.offset() * width;
    for (i, &c) in clusters.iter().enumerate() {
        let c = c as usize;
        if into.len() <= c {
            into.resize(c + 1, Vec::new());
        }
        if into[c].len() < GRID_IMAGES && !list.is_null(i) {
            let start = base + i * width;
            if let Some(px) = values.values().get(start..start + width) {
                match &thumb {
                    None => into[c].push(px.to_vec()),
                    Some(plan) => {
                        let mut small = vec![0u8; crate::dataset::IMAGE_BYTES];
                        if plan.apply(px, &mut small).is_ok() {
                            into[c].push(small);
                        }
                    }
                }
            }
        }
    }
}

/// The stream of a pass, with the server behind it when it runs in this process.
struct Opened {
    stream: datafusion::execution::SendableRecordBatchStream,
    report: Report,
    per_epoch: Option<u64>,
    server: Option<Loopback>,
}

/// An in-process server: its address and thread.
struct Loopback {
    addr: SocketAddr,
    handle: std::thread::JoinHandle<Result<ServeSummary>>,
}

impl Loopback {
    /// Ends the server thread: if no client ever connected (the pass failed first), one
    /// connects and leaves, so that `accept` returns.
    fn finish(self) {
        if !self.handle.is_finished() {
            let _ = std::net::TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        }
        let _ = self.handle.join();
    }
}

/// Opens `source` for a pass running `sql`: a loopback source gets its server started
/// here (streaming `opts.epochs` passes over the split).
async fn open_stream(
    sql: &str,
    seed: u64,
    source: &TrainSource,
    opts: &SourceOptions,
    extractor: Option<&Arc<Extractor>>,
) -> Result<Opened> {
    let mut rejected_files = 0;
    let (spec, per_epoch, server) = match source {
        TrainSource::Spec(spec) => (spec.clone(), None, None),
        TrainSource::Loopback { data, sleep } => {
            let side = dataset::check_side(opts.image_side)?;
            let (files, rejected) = dataset::load_split_sized(data, opts.split, side)?;
            rejected_files = rejected as u64;
            let images: usize = files.iter().map(Images::len).sum();
            let per_epoch = images.div_ceil(opts.batch_size.max(1)) as u64;
            let serve = ServeOptions {
                data: data.clone(),
                split: opts.split,
                batch_size: opts.batch_size,
                endless: true,
                sleep: *sleep,
                // The original's format for its 32×32 images; Arrow carries any side.
                format: if side == dataset::SIDE {
                    Format::SparkJson
                } else {
                    Format::Arrow
                },
                limit: Some(opts.epochs.unwrap_or(1).saturating_mul(per_epoch)),
                progress: false,
                write_timeout: None,
                shuffle: opts.shuffle.then_some(seed),
                image_side: side,
            };
            let (addr, handle) = serve::spawn_loopback(files, serve)?;
            let spec = SourceSpec::Tcp {
                host: addr.ip().to_string(),
                port: addr.port(),
            };
            (spec, Some(per_epoch), Some(Loopback { addr, handle }))
        }
    };
    let opened = async {
        let ctx = query::stream_session();
        transforms::register(&ctx, seed);
        // `epoch(batch)` where the batches per epoch are known: a dataset over loopback.
        transforms::register_epochs(&ctx, per_epoch);
        if let Some(e) = extractor {
            features::udf::register(&ctx, e.clone());
        }
        let src = source::open(&spec, opts)?;
        let per_epoch = per_epoch.or(src.batches_per_epoch());
        let report = register_stream(&ctx, src, spec.is_bounded())?;
        // An image folder's unreadable files, named in the log as they were read.
        report.count_rejected(rejected_files);
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
    .await;
    match opened {
        Ok((stream, report, per_epoch)) => Ok(Opened {
            stream,
            report,
            per_epoch,
            server,
        }),
        Err(e) => {
            if let Some(s) = server {
                s.finish();
            }
            Err(e)
        }
    }
}

/// The first label of `y` that is not a class, with its row.
fn bad_label(y: ArrayView1<u16>, classes: usize) -> Option<(usize, u16)> {
    y.iter()
        .enumerate()
        .find(|(_, &l)| usize::from(l) >= classes)
        .map(|(i, &l)| (i, l))
}

/// Predicted class and its probability, per row.
fn argmax_rows(proba: &Array2<f32>) -> (Vec<u16>, Vec<f32>) {
    let (mut predicted, mut p_max) = (Vec::new(), Vec::new());
    for row in proba.rows() {
        let (mut best, mut p) = (0usize, f32::NEG_INFINITY);
        for (k, &v) in row.iter().enumerate() {
            if v > p {
                best = k;
                p = v;
            }
        }
        // At most MAX_CLASSES columns: the index fits in a u16.
        predicted.push(best as u16);
        p_max.push(p);
    }
    (predicted, p_max)
}

/// The `row` and `batch` columns of a batch (row numbers 0..n and `number` without them).
fn row_and_batch_columns(batch: &RecordBatch, number: u64) -> (Vec<u32>, Vec<u64>) {
    let rows = match batch
        .column_by_name("row")
        .and_then(|c| c.as_any().downcast_ref::<UInt32Array>().cloned())
    {
        Some(r) => r.values().to_vec(),
        None => (0..batch.num_rows() as u32).collect(),
    };
    let numbers = match batch
        .column_by_name("batch")
        .and_then(|c| c.as_any().downcast_ref::<UInt64Array>().cloned())
    {
        Some(b) => b.values().to_vec(),
        None => vec![number; batch.num_rows()],
    };
    (rows, numbers)
}

/// The checkpoint `--resume` continues `run` from: its latest. An error says so when the
/// run has none.
pub fn resume_point(run: &Run) -> Result<Checkpoint> {
    checkpoint::latest(&run.checkpoints_dir())?.ok_or_else(|| {
        Error::usage(format!(
            "run {:?} has no checkpoint to resume from (nothing in {}); train it without --resume",
            run.name,
            run.checkpoints_dir().display()
        ))
    })
}

/// A run directory holds a run already (checkpoints or table parts).
fn has_run_data(run: &Run) -> bool {
    let nonempty = |p: std::path::PathBuf| {
        std::fs::read_dir(p)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
    };
    nonempty(run.checkpoints_dir()) || tables::TABLES.iter().any(|t| nonempty(run.dir.join(t)))
}

/// Train a model on a source, batch by batch, writing metrics, checkpoints and the run
/// record to the run.
///
/// `runs/NAME/run.json` records the run (model, seed, source, hyper-parameters, start)
/// with status `running`, then `finished` (with the end time and counts), `interrupted`
/// (stopped early; `resume` continues it) or `failed` (with the error). A new run refuses
/// a folder that already holds one unless `overwrite`; `resume` needs a checkpoint.
pub async fn train(opts: TrainOptions) -> Result<Summary> {
    let run = opts.run.clone();
    let resume = if opts.resume {
        let ck = resume_point(&run)?;
        if ck.state.model != opts.model {
            return Err(Error::usage(format!(
                "run {:?} was trained with model {}, not {}",
                run.name, ck.state.model, opts.model
            )));
        }
        Some(ck)
    } else {
        if has_run_data(&run) {
            if !opts.overwrite {
                return Err(Error::usage(format!(
                    "run {:?} already exists in {}: continue it with --resume, or start it \
                     over with --overwrite (or pick another --run)",
                    run.name,
                    run.dir.display()
                )));
            }
            std::fs::remove_dir_all(&run.dir).map_err(|e| Error::io(&run.dir, e))?;
        }
        None
    };
    let mut info = match (&resume, run.read_info().ok().flatten()) {
        (Some(_), Some(mut i)) => {
            i.status = "running".into();
            i.resumes += 1;
            i.end_ms = None;
            i.error = None;
            i
        }
        _ => RunInfo {
            run: run.name.clone(),
            model: opts.model.clone(),
            status: "running".into(),
            seed: opts.seed,
            source: opts.source.to_string(),
            config: opts.config.clone(),
            start_ms: now_ms(),
            end_ms: None,
            batches: 0,
            images: 0,
            error: None,
            checkpoint: None,
            resumes: 0,
            pid: None,
            compute: None,
        },
    };
    info.pid = Some(std::process::id());
    run.write_info(&info)?;
    let mut opts = opts;
    if resume.is_some() {
        if let Some(e) = run_extractor(&run)? {
            opts.extractor = Some(e);
        }
    } else if let Some(e) = &opts.extractor {
        e.save(&run.dir.join(EXTRACTOR_DIR))?;
    }
    let config_path = run.dir.join("config.toml");
    crate::store::write_atomic(&config_path, opts.config.as_bytes())?;
    let result = train_inner(opts, resume, &mut info).await;
    info.end_ms = Some(now_ms());
    info.pid = None;
    match &result {
        Ok(s) => {
            info.status = if s.interrupted {
                "interrupted"
            } else {
                "finished"
            }
            .into();
            info.batches = s.total_batches;
            info.images = s.overall.images;
            info.checkpoint = s.checkpoint.clone();
        }
        Err(e) => {
            // "interrupted" when the stream failed after what was learnt was checkpointed.
            if info.status != "interrupted" {
                info.status = "failed".into();
            }
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

/// Whether a run was trained with a feature extractor (`runs/NAME/extractor/`).
pub fn has_extractor(run: &Run) -> bool {
    run.dir.join(EXTRACTOR_DIR).exists()
}

/// The feature extractor a run was trained with, if it has one (`runs/NAME/extractor/`).
pub fn run_extractor(run: &Run) -> Result<Option<Arc<Extractor>>> {
    let dir = run.dir.join(EXTRACTOR_DIR);
    if dir.exists() {
        Ok(Some(Arc::new(Extractor::load(&dir)?)))
    } else {
        Ok(None)
    }
}

/// What the training loop carries between batches besides the model.
struct Loop {
    st: TrainState,
    pending: Pending,
    /// `next_batch` of the latest checkpoint written or resumed from.
    saved_at: Option<(u64, bool)>,
    checkpoint: Option<String>,
    /// The source's report: where it stood after each batch (Kafka offsets).
    report: Option<Report>,
}

impl Loop {
    /// Commits the pending rows, then writes a checkpoint of `model` (unless one of this
    /// very state exists) and updates `run.json`.
    fn checkpoint(
        &mut self,
        opts: &TrainOptions,
        model: &dyn Learner,
        info: &mut RunInfo,
    ) -> Result<()> {
        self.pending.commit(&opts.run, &opts.model, None)?;
        let here = (self.st.next_batch, self.st.epoch_done);
        if self.saved_at == Some(here) || self.st.batches == 0 {
            return Ok(());
        }
        self.st.created_ms = now_ms();
        let last = self.st.next_batch.checked_sub(1);
        if let Some(pos) = last.and_then(|b| self.report.as_ref()?.position_after(b)) {
            self.st.source_offsets = Some(pos);
        }
        let dir = checkpoint::save(&opts.run.checkpoints_dir(), &self.st, model, &opts.config)?;
        checkpoint::prune(&opts.run.checkpoints_dir(), opts.keep_checkpoints)?;
        opts.run.compact_fit_parts()?;
        self.saved_at = Some(here);
        let name = self.st.name();
        tracing::debug!("checkpoint {} ({})", name, dir.display());
        info.checkpoint = Some(name.clone());
        info.batches = self.st.batches;
        info.images = self.st.images;
        opts.run.write_info(info)?;
        self.checkpoint = Some(name);
        Ok(())
    }

    /// Closes the current epoch: the model's end-of-epoch work, then a checkpoint.
    fn close_epoch(
        &mut self,
        opts: &TrainOptions,
        model: &mut dyn Learner,
        info: &mut RunInfo,
    ) -> Result<()> {
        model.end_epoch()?;
        self.st.epoch_done = true;
        self.checkpoint(opts, model, info)
    }
}

async fn train_inner(
    mut opts: TrainOptions,
    resume: Option<Checkpoint>,
    info: &mut RunInfo,
) -> Result<Summary> {
    let mut summary = Summary::default();
    let (mut model, st) = match &resume {
        Some(ck) => (ck.model()?, ck.state.clone()),
        None => (
            new_model(&opts.model, &opts.params)?,
            TrainState::new(
                &opts.run.name,
                &opts.model,
                opts.seed,
                opts.eval_after_fit,
                opts.window,
            ),
        ),
    };
    // The stream's labels are checked against the model's classes.
    opts.source_opts.classes = model.classes();
    if let (Some(p), Some(_)) = (opts.precision, &resume) {
        model.switch_precision(p)?;
    }
    info.compute = model.compute();
    summary.compute = info.compute.clone();
    if let Some(c) = &info.compute {
        tracing::info!("{}: products in {c}", opts.model);
    }
    if let Some(ck) = &resume {
        // The run goes on as it started: same preprocessing, same seed.
        if !ck.state.sql.is_empty() {
            opts.sql = ck.state.sql.clone();
        }
        opts.seed = ck.state.seed;
        summary.resumed_from = Some(ck.name());
        summary.discarded_parts = opts.run.discard_after(ck.state.next_batch)?;
        checkpoint::prune(&opts.run.checkpoints_dir(), 0)?;
        tracing::info!(
            "resuming run {} from checkpoint {} (stream batch {})",
            opts.run.name,
            ck.name(),
            ck.state.next_batch
        );
    }
    let mut st = st;
    st.sql = opts.sql.clone();
    let mut lp = Loop {
        saved_at: resume
            .as_ref()
            .map(|c| (c.state.next_batch, c.state.epoch_done)),
        checkpoint: resume.as_ref().map(Checkpoint::name),
        st,
        pending: Pending::default(),
        report: None,
    };
    opts.source_opts.skip = lp.st.next_batch;
    opts.source_opts.kafka_offsets = lp.st.source_offsets.clone();
    let Opened {
        stream,
        report,
        per_epoch,
        server,
    } = open_stream(
        &opts.sql,
        opts.seed,
        &opts.source,
        &opts.source_opts,
        opts.extractor.as_ref(),
    )
    .await?;
    // Read one batch ahead: the next batch's preprocessing (the features of a features
    // model) runs while the model learns this one, on the cores it leaves idle.
    let mut stream = read_ahead(stream);
    lp.st.per_epoch = per_epoch;
    lp.report = Some(report.clone());
    // The stream's planned length, for a model with a schedule: epochs of a dataset whose
    // size is known; unknown for a followed or endless stream.
    let planned = per_epoch.filter(|_| !opts.source_opts.follow).map(|p| {
        p.saturating_mul(opts.source_opts.epochs.unwrap_or(1))
            .saturating_mul(opts.source_opts.batch_size as u64)
    });
    model.plan(planned);
    let result = train_loop(
        &mut opts,
        model.as_mut(),
        &mut lp,
        &mut stream,
        info,
        &mut summary,
    )
    .await;
    drop(stream);
    if let Some(s) = server {
        s.finish();
    }
    result?;
    let st = &lp.st;
    summary.total_batches = st.batches;
    summary.epoch = st.epoch;
    summary.overall = st.overall.get();
    summary.last_epoch = st.epoch_metrics.get();
    summary.fit_seconds = st.fit_seconds;
    summary.rejected += report.snapshot().rejected;
    summary.checkpoint = lp.checkpoint.clone();
    Ok(summary)
}

/// `stream` polled on a task of its own, one batch ahead of its reader; its errors come
/// through in order, and dropping the result stops the task.
fn read_ahead(
    mut stream: datafusion::execution::SendableRecordBatchStream,
) -> datafusion::execution::SendableRecordBatchStream {
    let mut ahead = datafusion::physical_plan::stream::RecordBatchReceiverStreamBuilder::new(
        stream.schema(),
        1,
    );
    let tx = ahead.tx();
    ahead.spawn(async move {
        while let Some(batch) = stream.next().await {
            if tx.send(batch).await.is_err() {
                break; // the reader is gone
            }
        }
        Ok(())
    });
    ahead.build()
}

async fn train_loop(
    opts: &mut TrainOptions,
    model: &mut dyn Learner,
    lp: &mut Loop,
    stream: &mut datafusion::execution::SendableRecordBatchStream,
    info: &mut RunInfo,
    summary: &mut Summary,
) -> Result<()> {
    let started = Instant::now();
    let per_epoch = lp.st.per_epoch;
    let mut images_here = 0u64;
    let mut stop = opts.stop.take();
    let mut seq = lp.st.next_batch;
    loop {
        let next = match stop.as_mut() {
            Some(s) => tokio::select! {
                b = stream.next() => b,
                _ = s => {
                    summary.interrupted = true;
                    break;
                }
            },
            None => stream.next().await,
        };
        let Some(batch) = next else {
            break;
        };
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                // Keep what was learnt: a checkpoint commits the rows so far, and
                // `--resume` carries on from it. The stream's error is the one reported.
                // A network or broker failure interrupts the run (it goes on when the peer
                // is back); anything else (a source that panicked) fails it.
                let e = Error::from(e);
                let outside = e.kind() == crate::error::ErrorKind::Net;
                if summary.batches > 0 {
                    match lp.checkpoint(opts, model, info) {
                        Err(ck) => tracing::error!("checkpoint after the stream failed: {ck}"),
                        Ok(()) if !outside => {}
                        Ok(()) => {
                            info.status = "interrupted".into();
                            tracing::warn!(
                                "run {} interrupted by the stream's error: what it learnt up to \
                                 batch {} is checkpointed ({}); continue with `cifar-df train \
                                 --runs {} --run {} --resume`",
                                opts.run.name,
                                lp.st.next_batch.saturating_sub(1),
                                lp.checkpoint.as_deref().unwrap_or("-"),
                                opts.run
                                    .dir
                                    .parent()
                                    .unwrap_or(std::path::Path::new("."))
                                    .display(),
                                opts.run.name
                            );
                        }
                    }
                }
                return Err(e);
            }
        };
        if batch.num_rows() == 0 {
            continue;
        }
        let t = Instant::now();
        let number = crate::wire::batch::batch_number(&batch).unwrap_or(seq);
        seq = number + 1;
        if number < lp.st.next_batch {
            continue; // learnt before the checkpoint this run resumed from
        }
        let x = features_view(&batch, FEATURES)?;
        let y_col = labels_view(&batch, "label")?;
        let y = y_col.view();
        if let Some((row, label)) = bad_label(y, model.classes()) {
            tracing::warn!(
                "batch {number} rejected: row {row} has label {label}, outside the run's \
                 classes 0..{}",
                model.classes() - 1
            );
            summary.rejected += 1;
            continue;
        }
        let (epoch, pos) = match per_epoch {
            Some(p) => ((number / p.max(1) + 1) as u32, number % p.max(1) + 1),
            None => (1, number + 1),
        };
        if epoch != lp.st.epoch {
            if !lp.st.epoch_done {
                // The previous epoch's last batch never came (rejected): close it now.
                lp.close_epoch(opts, model, info)?;
            }
            lp.st.epoch = epoch;
            lp.st.epoch_done = false;
            lp.st.epoch_metrics = Accumulator::new();
        }
        // Test, then train (or the other way round, as the original did).
        // A model that scores each image on its way to learning it (the CNN's forward
        // pass before its step) gives the test-then-train scores itself.
        let scored = !lp.st.eval_after_fit && model.scores_while_learning();
        let before = if lp.st.eval_after_fit || scored {
            None
        } else {
            Some(model.predict_proba(x)?)
        };
        let f = Instant::now();
        // A model that cannot learn the batch (the CNN whose loss became NaN) stops the
        // run: what it holds now is not checkpointed, the last checkpoint stays.
        let (_, during) = model.partial_fit_scored(x, y).map_err(|e| {
            Error::usage(format!(
                "batch {number} (epoch {epoch}): {e}; the run stops, its last checkpoint \
                 ({}) is kept",
                lp.checkpoint.as_deref().unwrap_or("none yet")
            ))
        })?;
        lp.st.fit_seconds += f.elapsed().as_secs_f64();
        let proba = match (before, during.filter(|_| scored)) {
            (Some(p), _) | (None, Some(p)) => p,
            (None, None) => model.predict_proba(x)?,
        };
        let m = batch_metrics(y, proba.view())?;
        lp.st.overall.update(y, proba.view())?;
        lp.st.epoch_metrics.update(y, proba.view())?;
        let (mean, window) = lp.st.running.push(&m);
        // A significant rise of the loss is drift; a significant fall is the model learning.
        let change = lp.st.drift.update(m.loss);
        let drift = change == Some(Change::Rise);
        if drift {
            tracing::warn!(
                "drift at batch {number}: the loss rose (ADWIN; the window now {} batches with \
                 mean loss {:.4})",
                lp.st.drift.width(),
                lp.st.drift.mean()
            );
        } else if change.is_some() {
            tracing::debug!(
                "batch {number}: the loss fell significantly (ADWIN; the model learnt, not \
                 drift); the window now {} batches with mean loss {:.4}",
                lp.st.drift.width(),
                lp.st.drift.mean()
            );
        }
        let (predicted, p_max) = argmax_rows(&proba);
        let (rows, numbers) = row_and_batch_columns(&batch, number);
        let labels = y.to_vec();
        let preds = opts
            .run
            .predictions_batch("train", epoch, &numbers, &rows, &labels, &predicted, &p_max)?;
        images_here += m.images;
        lp.st.images += m.images;
        lp.st.batches += 1;
        lp.st.next_batch = number + 1;
        lp.st.batch_in_epoch = pos;
        lp.pending.add(
            MetricsRow {
                split: "train".into(),
                epoch,
                batch: number,
                metrics: m,
                mean,
                window,
                seconds: t.elapsed().as_secs_f64(),
                ts_ms: now_ms(),
                drift,
            },
            preds,
        );
        summary.batches += 1;
        if per_epoch.is_some_and(|p| pos == p) {
            lp.close_epoch(opts, model, info)?;
        } else if opts.checkpoint_every > 0 && (number + 1).is_multiple_of(opts.checkpoint_every) {
            lp.checkpoint(opts, model, info)?;
        } else if lp.pending.len() >= FLUSH_EVERY {
            lp.pending.commit(&opts.run, &opts.model, None)?;
        } else {
            lp.pending.publish(&opts.run, &opts.model)?;
        }
        if let Some(f) = opts.on_batch.as_mut() {
            f(&Progress {
                epoch,
                epochs: opts.source_opts.epochs,
                batch_in_epoch: pos,
                per_epoch,
                batches: summary.batches,
                images_per_second: images_here as f64 / started.elapsed().as_secs_f64().max(1e-9),
                acc: mean[0],
                loss: mean[1],
            });
        }
        if opts.max_batches.is_some_and(|n| summary.batches >= n) {
            summary.interrupted = true;
            break;
        }
    }
    if summary.interrupted {
        lp.checkpoint(opts, model, info)?;
    } else if !lp.st.epoch_done {
        lp.close_epoch(opts, model, info)?;
    } else {
        lp.checkpoint(opts, model, info)?;
    }
    summary.seconds = started.elapsed().as_secs_f64();
    summary.images_per_second = images_here as f64 / summary.seconds.max(1e-9);
    Ok(())
}

/// What `predict` needs.
pub struct PredictOptions {
    /// The run whose model to use and where to write.
    pub run: Run,
    /// The checkpoint to load (default: the latest).
    pub checkpoint: Option<String>,
    /// Preprocessing SQL.
    pub sql: String,
    /// Where the data comes from.
    pub source: TrainSource,
    /// How to read it (usually the test split).
    pub source_opts: SourceOptions,
    /// Name of the split in the tables (`test`; a pass over the training split is
    /// `train-eval`, apart from the rows scored while training).
    pub split: String,
    /// Batches in the rolling window of the metrics rows.
    pub window: usize,
    /// Called after every batch.
    pub on_batch: Option<OnBatch>,
}

/// Score a checkpoint of a run on a source; writes metrics, confusion and predictions of
/// the split (replacing an earlier pass over the same split).
pub async fn predict(mut opts: PredictOptions) -> Result<Summary> {
    let root = opts.run.checkpoints_dir();
    let ck = match &opts.checkpoint {
        Some(name) => checkpoint::find(&root, name)?,
        None => checkpoint::latest(&root)?.ok_or_else(|| {
            Error::usage(format!(
                "run {:?} has no checkpoint in {} (train it first)",
                opts.run.name,
                root.display()
            ))
        })?,
    };
    let model = ck.model()?;
    let epoch = ck.state.epoch;
    if let Some(data) = opts.source.dataset() {
        let names = dataset::class_names(data)?;
        if names.len() > model.classes() {
            return Err(Error::usage(format!(
                "{data} has {} classes but run {:?} was trained with {}: score it on data of \
                 the run's classes",
                names.len(),
                opts.run.name,
                model.classes()
            )));
        }
    }
    opts.source_opts.classes = model.classes();
    let extractor = run_extractor(&opts.run)?;
    let Opened {
        mut stream,
        report,
        per_epoch,
        server,
    } = open_stream(
        &opts.sql,
        0,
        &opts.source,
        &opts.source_opts,
        extractor.as_ref(),
    )
    .await?;
    let result = predict_loop(
        &mut opts,
        model.as_ref(),
        epoch,
        per_epoch,
        &mut stream,
        &report,
    )
    .await;
    drop(stream);
    if let Some(s) = server {
        s.finish();
    }
    let mut summary = result?;
    summary.checkpoint = Some(ck.name());
    summary.epoch = epoch;
    Ok(summary)
}

async fn predict_loop(
    opts: &mut PredictOptions,
    model: &dyn Learner,
    epoch: u32,
    per_epoch: Option<u64>,
    stream: &mut datafusion::execution::SendableRecordBatchStream,
    report: &Report,
) -> Result<Summary> {
    let started = Instant::now();
    let mut summary = Summary::default();
    let mut all = Accumulator::new();
    let mut running = Running::new(opts.window);
    let mut pending = Pending::default();
    let mut cluster_images: Vec<Vec<Vec<u8>>> = Vec::new();
    let mut cluster_sizes: Vec<u64> = Vec::new();
    let mut seq = 0u64;
    let mut images = 0u64;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        if batch.num_rows() == 0 {
            continue;
        }
        let t = Instant::now();
        let number = crate::wire::batch::batch_number(&batch).unwrap_or(seq);
        seq = number + 1;
        let x = features_view(&batch, FEATURES)?;
        let y_col = labels_view(&batch, "label")?;
        let y = y_col.view();
        if let Some((row, label)) = bad_label(y, model.classes()) {
            tracing::warn!(
                "batch {number} rejected: row {row} has label {label}, outside the model's \
                 classes 0..{}",
                model.classes() - 1
            );
            summary.rejected += 1;
            continue;
        }
        let f = Instant::now();
        let mut proba = model.predict_proba(x)?;
        if batch.column_by_name(FLIPPED).is_some() {
            let mirrored = model.predict_proba(features_view(&batch, FLIPPED)?)?;
            proba.zip_mut_with(&mirrored, |p, &q| *p = 0.5 * (*p + q));
        }
        summary.fit_seconds += f.elapsed().as_secs_f64();
        let m = batch_metrics(y, proba.view())?;
        all.update(y, proba.view())?;
        images += m.images;
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
        let (predicted, p_max) = argmax_rows(&proba);
        let (rows, numbers) = row_and_batch_columns(&batch, number);
        let labels = y.to_vec();
        let preds = opts.run.predictions_batch(
            &opts.split,
            epoch,
            &numbers,
            &rows,
            &labels,
            &predicted,
            &p_max,
        )?;
        let (mean, window) = running.push(&m);
        pending.add(
            MetricsRow {
                split: opts.split.clone(),
                epoch,
                batch: number,
                metrics: m,
                mean,
                window,
                seconds: t.elapsed().as_secs_f64(),
                ts_ms: now_ms(),
                drift: false,
            },
            preds,
        );
        summary.batches += 1;
        if let Some(f) = opts.on_batch.as_mut() {
            f(&Progress {
                epoch,
                epochs: None,
                batch_in_epoch: number + 1,
                per_epoch,
                batches: summary.batches,
                images_per_second: images as f64 / started.elapsed().as_secs_f64().max(1e-9),
                acc: mean[0],
                loss: mean[1],
            });
        }
    }
    let file = tables::eval_part_name(&opts.split);
    pending.commit(&opts.run, model.name(), Some(&file))?;
    opts.run.remove_eval_parts(&opts.split, &file)?;
    let overall = all.get();
    if cluster_images.iter().any(|c| !c.is_empty()) {
        let titles: Vec<String> = cluster_sizes
            .iter()
            .enumerate()
            .map(|(c, n)| format!("cluster {c}: {n} images"))
            .collect();
        summary.cluster_grids = crate::store::png::write_cluster_grids(
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
    summary.rejected += report.snapshot().rejected;
    Ok(summary)
}
