//! The command line: parse arguments, run one command, report.
//!
//! Each subcommand is a thin layer over the library: it turns flags into the library's
//! option structs, runs, and prints a summary on stderr (results on stdout).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{ArgGroup, Args, Parser, Subcommand};

use crate::checkpoint;
use crate::config::{self, RunConfig};
use crate::dataset::synth::{self, SynthSpec};
use crate::dataset::{DataSpec, Layout, Split};
use crate::export::{self, ExportOptions};
use crate::features::Extractor;
use crate::metrics::Metrics;
use crate::plot;
use crate::query::{self, OutputFormat};
use crate::runs::{self, Run};
use crate::server::{self, ServeOptions};
use crate::source::{self, SourceOptions, SourceSpec, DEFAULT_MAX_LINE_BYTES};
use crate::table;
use crate::trainer::{self, PredictOptions, Progress, TrainOptions, TrainSource};
use crate::wire::Format;

/// Learn image classifiers from a live CIFAR-10 stream, on Apache Arrow and DataFusion.
#[derive(Debug, Parser)]
#[command(name = "cifar-df", version, about, long_about = None)]
pub struct Cli {
    /// More log output (-v: debug, -vv: trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only errors on stderr; no progress bars.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Cores to use: worker threads of the runtime and of the models' matrix products
    /// (default: all). Two trainers side by side on 8 cores: --threads 4 each.
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    /// Most memory a model, extractor or batch may ask for, e.g. 8G (default: this
    /// machine's memory, or CIFAR_DF_MEMORY_LIMIT); larger sizes are refused before
    /// anything is allocated.
    #[arg(long, global = true, value_parser = parse_memory_limit)]
    pub memory_limit: Option<u64>,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole stream core on the built-in synthetic set: serve it over loopback TCP,
    /// read it back as a client, export it to Parquet and summarise it with SQL.
    Demo(DemoArgs),
    /// Write a synthetic CIFAR-format dataset folder.
    Synth(SynthArgs),
    /// Serve a dataset over TCP, as the original stream.py did.
    Stream(StreamArgs),
    /// Write every batch a source delivers to Parquet.
    Export(ExportArgs),
    /// Compute features of a dataset once and cache them as Parquet (fits a patch extractor
    /// on the training images unless --extractor names one).
    Features(FeaturesArgs),
    /// Train a model on a stream, batch by batch; metrics and the model go to runs/NAME.
    Train(Box<TrainArgs>),
    /// Score a trained run's model on a split; writes test metrics, confusion, predictions.
    Predict(PredictArgs),
    /// Write a run's trained CNN as an ONNX model (preprocessing and test-time averaging
    /// included) for onnxruntime, PyTorch or `--extractor onnx:`.
    ExportModel(ExportModelArgs),
    /// Run SQL over Parquet files and directories named in the query, and over the run
    /// tables `metrics`, `eval_metrics`, `confusion`, `predictions` and `runs`.
    Query(QueryArgs),
    /// Draw PNG plots of runs: per-batch curves, test bars across runs, confusion heatmaps.
    Plot(PlotArgs),
    /// Serve as a worker for `query --workers` and `features --workers`: runs parts of
    /// their SQL, with cifar-df's functions.
    Worker(WorkerArgs),
    /// Serve a live web dashboard of the runs: curves as they learn, test results, the
    /// confusion matrix, SQL over the run tables.
    Ui(UiArgs),
}

/// Where `train` and `predict` read from.
#[derive(Debug, Args)]
pub struct TrainSourceArgs {
    /// `tcp://HOST:PORT`, `file:PATH`, `kafka://HOST:PORT/TOPIC[?partitions=0,1&start=
    /// earliest|latest|OFFSET]`, a dataset folder or `synthetic`.
    #[arg(long, conflicts_with = "data")]
    pub source: Option<String>,
    /// A dataset folder or `synthetic[:TRAIN[:TEST[:SEED]]]`, read in process.
    #[arg(long)]
    pub data: Option<String>,
    /// Wire format of a tcp/file source (default: detected).
    #[arg(long)]
    pub format: Option<Format>,
    /// Images per batch (dataset sources), also the models' mini-batch [default: 128].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Longest accepted line, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_LINE_BYTES)]
    pub max_line_bytes: usize,
    /// Seconds a tcp or kafka source keeps trying to connect (and a kafka source waits
    /// for a broker that went away).
    #[arg(long, default_value_t = 30.0)]
    pub connect_timeout: f64,
    /// Keep reading a kafka topic as it grows (endless; Ctrl-C checkpoints and stops),
    /// instead of stopping at the end offsets seen at the start.
    #[arg(long)]
    pub follow: bool,
    /// Preprocessing SQL file (default: the built-in sql/train.sql or sql/eval.sql).
    #[arg(long)]
    pub sql: Option<PathBuf>,
}

impl TrainSourceArgs {
    /// The source: `--source` as given; `--data` (or the config's `data`) served over a
    /// loopback TCP connection in this process; without either, `fallback` (a resumed
    /// run's own source) or the built-in synthetic set over loopback.
    fn resolve(
        &self,
        split: Split,
        epochs: Option<u64>,
        batch_size: usize,
        config_data: Option<&str>,
        fallback: Option<TrainSource>,
        sleep: f64,
    ) -> anyhow::Result<(TrainSource, SourceOptions)> {
        if !(sleep >= 0.0 && sleep.is_finite()) {
            bail!("--sleep must be a number of seconds ≥ 0");
        }
        let sleep = Duration::from_secs_f64(sleep);
        let source = match (&self.source, self.data.as_deref().or(config_data), fallback) {
            (Some(s), _, _) => TrainSource::Spec(SourceSpec::parse(s)?),
            (None, Some(d), _) => TrainSource::Loopback {
                data: DataSpec::parse(d)?,
                sleep,
            },
            (None, None, Some(TrainSource::Loopback { data, .. })) => {
                TrainSource::Loopback { data, sleep }
            }
            (None, None, Some(f)) => f,
            (None, None, None) => {
                eprintln!(
                    "no --source or --data given: streaming the built-in synthetic set over \
                     loopback TCP"
                );
                TrainSource::Loopback {
                    data: DataSpec::parse("synthetic")?,
                    sleep,
                }
            }
        };
        if !(self.connect_timeout >= 0.0 && self.connect_timeout.is_finite()) {
            bail!("--connect-timeout must be a number of seconds ≥ 0");
        }
        // A dataset over loopback is paced by its server; any other source by the reader.
        let pace = match &source {
            TrainSource::Spec(_) => sleep,
            TrainSource::Loopback { .. } => Duration::ZERO,
        };
        Ok((
            source,
            SourceOptions {
                format: self.format,
                split,
                batch_size,
                epochs,
                max_line_bytes: self.max_line_bytes,
                connect_timeout: Duration::from_secs_f64(self.connect_timeout),
                skip: 0,
                follow: self.follow,
                kafka_offsets: None,
                pace,
                shuffle: false,
                // Set from the model by `train` and `predict`.
                classes: crate::model::CLASSES,
            },
        ))
    }

    fn sql(&self, default: &str, config_sql: Option<&PathBuf>) -> anyhow::Result<String> {
        match self.sql.as_ref().or(config_sql) {
            Some(p) => {
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
            }
            None => Ok(default.to_string()),
        }
    }
}

/// `cifar-df train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Run config (TOML; see configs/): model, epochs, batch size, seed, data, SQL and
    /// hyper-parameters. Flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Model: logreg, svm, mlp, kmeans or svm-kernel [default: logreg].
    #[arg(long)]
    pub model: Option<String>,
    /// The source.
    #[command(flatten)]
    pub source: TrainSourceArgs,
    /// Run name (default: MODEL-YYYYMMDD-HHMMSS).
    #[arg(long)]
    pub run: Option<String>,
    /// Directory of runs.
    #[arg(long, default_value = "runs")]
    pub runs: PathBuf,
    /// Passes over a dataset source [default: 1].
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Seed of augmentation decisions and the model's randomness [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Learning rate (logreg, mlp) or eta0 (svm).
    #[arg(long)]
    pub lr: Option<f64>,
    /// L2 regularisation (logreg, svm, mlp).
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Hidden layer sizes of the mlp, e.g. 128,64.
    #[arg(long, value_delimiter = ',')]
    pub hidden: Option<Vec<usize>>,
    /// Passes of the mlp over each incoming batch.
    #[arg(long)]
    pub passes: Option<usize>,
    /// Optimiser of the mlp: adam or sgd.
    #[arg(long)]
    pub optimizer: Option<String>,
    /// Loss of the svm: hinge or squared_hinge.
    #[arg(long)]
    pub loss: Option<String>,
    /// Learning-rate schedule of the svm: optimal, constant or invscaling.
    #[arg(long)]
    pub learning_rate: Option<String>,
    /// Clusters of kmeans.
    #[arg(long)]
    pub k: Option<usize>,
    /// Images svm-kernel buffers and fits on.
    #[arg(long)]
    pub buffer: Option<usize>,
    /// Kernel of svm-kernel: rbf or linear.
    #[arg(long)]
    pub kernel: Option<String>,
    /// Any hyper-parameter of the model, KEY=VALUE (repeatable), e.g. --set average=1.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// A feature extractor computing features in the streaming SQL (`sql/features.sql`):
    /// a fitted extractor folder (`F/extractor` of a cache, or a run's `extractor`), or
    /// `onnx:FILE.onnx`, a pretrained ONNX model.
    #[arg(long, value_name = "DIR|onnx:FILE")]
    pub extractor: Option<String>,
    /// With `--extractor onnx:FILE`: the node (or tensor) whose output are the features
    /// (default: the model's output).
    #[arg(long)]
    pub node: Option<String>,
    /// Score each batch after learning from it (the original's way); the default scores
    /// it before (test-then-train, honest training metrics).
    #[arg(long)]
    pub eval_after_fit: bool,
    /// Checkpoint every N stream batches, besides every epoch's end (0: epoch ends only).
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: u64,
    /// Mid-epoch checkpoints to keep, the latest ones (0: all). Epoch ends are all kept.
    #[arg(long, default_value_t = 3)]
    pub keep_checkpoints: usize,
    /// Batches in the rolling window of the metrics rows (`*_window` columns).
    #[arg(long, default_value_t = 20)]
    pub window: usize,
    /// Continue run --run from its latest checkpoint, skipping the batches it learnt.
    #[arg(long, requires = "run")]
    pub resume: bool,
    /// Delete an existing run of the same name first.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Stop after learning N batches (checkpointed; continue with --resume).
    #[arg(long)]
    pub max_batches: Option<u64>,
    /// Seconds to pause after each batch (a slower stream): the built-in server's pause
    /// with --data, the reader's with --source.
    #[arg(long, default_value_t = 0.0)]
    pub sleep: f64,
    /// Skip scoring the dataset's test split at the end.
    #[arg(long)]
    pub no_test: bool,
    /// Test-time flip averaging in the test pass: each test image is scored by the mean
    /// of the model's probabilities for it and its mirror image.
    #[arg(long)]
    pub flip_test: bool,
    /// With --data: serve each epoch in a new order, shuffled from the run's seed and the
    /// epoch (the default is the files' order, as the original's server).
    #[arg(long)]
    pub shuffle: bool,
    /// Skip drawing the run's plots at the end.
    #[arg(long)]
    pub no_plots: bool,
    /// Serve the dashboard (`cifar-df ui`) inside this process while it trains, on IP:PORT
    /// (default 127.0.0.1:8080; port 0: any free port); it prints the address.
    #[arg(long, value_name = "IP:PORT", num_args = 0..=1, default_missing_value = "127.0.0.1:8080")]
    pub ui: Option<std::net::SocketAddr>,
    /// The classes of a stream that does not carry them (TCP, Kafka, a features cache):
    /// a count (`--classes 100`) or the names, comma-separated. With --data they come
    /// from the data (CIFAR-10's ten, CIFAR-100's hundred, an image folder's folders).
    #[arg(long)]
    pub classes: Option<String>,
}

/// The class names `--classes` gives: `N` (named "0" … "N-1") or comma-separated names.
fn parse_classes(s: &str) -> anyhow::Result<Vec<String>> {
    let names: Vec<String> = match s.trim().parse::<usize>() {
        Ok(n) => (0..n).map(|i| i.to_string()).collect(),
        Err(_) => s.split(',').map(|n| n.trim().to_string()).collect(),
    };
    if !(2..=crate::model::MAX_CLASSES).contains(&names.len()) || names.iter().any(String::is_empty)
    {
        anyhow::bail!(
            "--classes {s:?}: give a count from 2 to {} or that many non-empty names, \
             comma-separated",
            crate::model::MAX_CLASSES
        );
    }
    Ok(names)
}

/// A new run's classes: the data's (checked against `--classes` if both are given), else
/// `--classes`, else the config's, else CIFAR-10's.
fn run_classes(
    a: &TrainArgs,
    cfg: &RunConfig,
    source: &TrainSource,
) -> anyhow::Result<Vec<String>> {
    let flag = a.classes.as_deref().map(parse_classes).transpose()?;
    // The data's own classes: a dataset's, or those a features cache recorded.
    let known = match source {
        TrainSource::Spec(SourceSpec::Features(dir)) => {
            crate::features::cache::Manifest::read(dir)?
                .map(|m| m.classes)
                .filter(|c| !c.is_empty())
                .map(|c| (c, format!("the features cache {}", dir.display())))
        }
        _ => match source.dataset() {
            Some(data) => Some((crate::dataset::class_names(data)?, data.to_string())),
            None => None,
        },
    };
    if let Some((names, what)) = known {
        if let Some(f) = &flag {
            if f.len() != names.len() {
                anyhow::bail!(
                    "--classes gives {} classes but {what} has {}",
                    f.len(),
                    names.len()
                );
            }
        }
        return Ok(names);
    }
    Ok(flag.unwrap_or_else(|| cfg.class_names()))
}

impl TrainArgs {
    /// The run's settings: the config file (if any) with the flags applied on top.
    pub fn config(&self) -> anyhow::Result<(String, RunConfig)> {
        let mut cfg = match &self.config {
            Some(p) => RunConfig::load(p)?,
            None => RunConfig::default(),
        };
        if let Some(m) = &self.model {
            config::check_model_name(m)?;
            cfg.model = Some(m.clone());
        }
        let model = config::model_or_default(&cfg);
        cfg.epochs = self.epochs.or(cfg.epochs).or(Some(1));
        cfg.seed = self.seed.or(cfg.seed).or(Some(0));
        cfg.batch_size = self.source.batch_size.or(cfg.batch_size).or(Some(128));
        if self.shuffle {
            cfg.shuffle = Some(true);
        }
        if self.flip_test {
            cfg.flip_test = Some(true);
        }
        let lr_key = if model == "svm" { "eta0" } else { "lr" };
        let flags: [(&str, Option<toml::Value>); 9] = [
            (lr_key, self.lr.map(toml::Value::Float)),
            ("alpha", self.alpha.map(toml::Value::Float)),
            (
                "hidden",
                self.hidden.as_ref().map(|h| {
                    toml::Value::Array(h.iter().map(|&n| toml::Value::Integer(n as i64)).collect())
                }),
            ),
            (
                "passes",
                self.passes.map(|n| toml::Value::Integer(n as i64)),
            ),
            ("optimizer", self.optimizer.clone().map(toml::Value::String)),
            ("loss", self.loss.clone().map(toml::Value::String)),
            (
                "learning_rate",
                self.learning_rate.clone().map(toml::Value::String),
            ),
            ("k", self.k.map(|n| toml::Value::Integer(n as i64))),
            (
                "buffer",
                self.buffer.map(|n| toml::Value::Integer(n as i64)),
            ),
        ];
        for (key, value) in flags {
            if let Some(v) = value {
                cfg.set_param(&model, key, v);
            }
        }
        if let Some(k) = &self.kernel {
            cfg.set_param(&model, "kernel", toml::Value::String(k.clone()));
        }
        if self.source.batch_size.is_some() {
            cfg.set_param(
                &model,
                "batch_size",
                toml::Value::Integer(cfg.batch_size.unwrap_or(128) as i64),
            );
        }
        for s in &self.set {
            let (k, v) = config::parse_override(s)?;
            cfg.set_param(&model, &k, v);
        }
        Ok((model, cfg))
    }
}

/// `cifar-df predict`.
#[derive(Debug, Args)]
pub struct PredictArgs {
    /// The trained run.
    #[arg(long)]
    pub run: String,
    /// Directory of runs.
    #[arg(long, default_value = "runs")]
    pub runs: PathBuf,
    /// The source.
    #[command(flatten)]
    pub source: TrainSourceArgs,
    /// Split to score.
    #[arg(long, default_value = "test")]
    pub split: Split,
    /// Checkpoint to load, e.g. epoch-3 or epoch-2-batch-100 (default: the latest).
    #[arg(long)]
    pub checkpoint: Option<String>,
    /// Test-time flip averaging: each image is scored by the mean of the model's
    /// probabilities for it and its mirror image (default: as the run was trained,
    /// its config's `flip_test`).
    #[arg(long)]
    pub flip_test: bool,
    /// No flip averaging, even for a run trained with `flip_test`.
    #[arg(long, conflicts_with = "flip_test")]
    pub no_flip_test: bool,
}

/// `cifar-df export-model`.
#[derive(Debug, Args)]
pub struct ExportModelArgs {
    /// The run whose CNN to export (a name under --runs, or a run folder).
    #[arg(long)]
    pub run: String,
    /// Directory of runs.
    #[arg(long, default_value = "runs")]
    pub runs: PathBuf,
    /// Checkpoint to export, e.g. epoch-3 (default: the latest).
    #[arg(long)]
    pub checkpoint: Option<String>,
    /// The ONNX file to write.
    #[arg(long)]
    pub out: PathBuf,
}

/// `cifar-df demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where to write the Parquet file.
    #[arg(long, default_value = "runs/demo/stream.parquet")]
    pub out: PathBuf,
    /// Dataset to stream (a folder or `synthetic[:TRAIN[:TEST[:SEED]]]`).
    #[arg(long, default_value = "synthetic")]
    pub data: String,
    /// Images per batch.
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
}

/// `cifar-df synth`.
#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Output folder (gets cifar-10-batches-bin/ and/or cifar-10-batches-py/).
    #[arg(long)]
    pub out: PathBuf,
    /// Training images (split over data_batch_1..5).
    #[arg(long, default_value_t = SynthSpec::default().train)]
    pub train: usize,
    /// Test images.
    #[arg(long, default_value_t = SynthSpec::default().test)]
    pub test: usize,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Layouts to write: bin, py or both.
    #[arg(long, default_value = "bin")]
    pub layout: String,
}

/// `cifar-df stream`.
#[derive(Debug, Args)]
pub struct StreamArgs {
    /// Dataset folder, or `synthetic[:TRAIN[:TEST[:SEED]]]`.
    #[arg(long)]
    pub data: String,
    /// Split to stream.
    #[arg(long, default_value = "train")]
    pub split: Split,
    /// Images per batch.
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
    /// Repeat the split forever (one pass is an epoch).
    #[arg(long)]
    pub endless: bool,
    /// Seconds to pause after each batch.
    #[arg(long, default_value_t = 0.0)]
    pub sleep: f64,
    /// Address to bind; anything but loopback must be given explicitly.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port, printed on stderr).
    #[arg(long, default_value_t = 6100)]
    pub port: u16,
    /// Wire format: spark-json (the original's), ndjson or arrow.
    #[arg(long, default_value = "spark-json")]
    pub format: Format,
    /// Stop after this many batches (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub limit: u64,
    /// Give up (exit 1) on a client that reads nothing for this many seconds; until then a
    /// slow client slows the server down, holding at most a few batches (0: wait forever).
    #[arg(long, default_value_t = 600.0)]
    pub write_timeout: f64,
    /// Publish to Kafka instead of serving TCP: `kafka://HOST:PORT/TOPIC[?partitions=0,1]`,
    /// one record per batch, key = the batch number (a missing topic is created).
    #[arg(long)]
    pub to: Option<String>,
    /// Seconds to keep trying to reach the broker (with --to).
    #[arg(long, default_value_t = 30.0)]
    pub connect_timeout: f64,
}

/// Flags that choose and tune a source.
#[derive(Debug, Args)]
pub struct SourceArgs {
    /// `tcp://HOST:PORT`, `file:PATH` (`file:-` for stdin), `kafka://HOST:PORT/TOPIC[?..]`,
    /// a dataset folder or `synthetic`.
    #[arg(long)]
    pub source: String,
    /// Wire format of a tcp/file source (default: detected from the first bytes).
    #[arg(long)]
    pub format: Option<Format>,
    /// Split, for a dataset source.
    #[arg(long, default_value = "train")]
    pub split: Split,
    /// Images per batch for a dataset source; most lines in one ndjson batch.
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
    /// Passes over a dataset source.
    #[arg(long, default_value_t = 1)]
    pub epochs: u64,
    /// Longest accepted line, in bytes; longer lines are rejected unread.
    #[arg(long, default_value_t = DEFAULT_MAX_LINE_BYTES)]
    pub max_line_bytes: usize,
    /// Seconds a tcp or kafka source keeps trying to connect (and a kafka source waits
    /// for a broker that went away).
    #[arg(long, default_value_t = 30.0)]
    pub connect_timeout: f64,
    /// Keep reading a kafka topic as it grows, instead of stopping at the end offsets seen
    /// at the start.
    #[arg(long)]
    pub follow: bool,
}

impl SourceArgs {
    fn open(&self) -> anyhow::Result<(SourceSpec, SourceOptions)> {
        let spec = SourceSpec::parse(&self.source)?;
        if !(self.connect_timeout >= 0.0 && self.connect_timeout.is_finite()) {
            bail!("--connect-timeout must be a number of seconds ≥ 0");
        }
        let opts = SourceOptions {
            format: self.format,
            split: self.split,
            batch_size: self.batch_size,
            epochs: Some(self.epochs),
            max_line_bytes: self.max_line_bytes,
            connect_timeout: Duration::from_secs_f64(self.connect_timeout),
            skip: 0,
            follow: self.follow,
            kafka_offsets: None,
            pace: Duration::ZERO,
            shuffle: false,
            classes: crate::model::CLASSES,
        };
        Ok((spec, opts))
    }
}

/// `cifar-df export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The source.
    #[command(flatten)]
    pub source: SourceArgs,
    /// Output: `NAME.parquet` (one file) or a directory of part files.
    #[arg(long, required_unless_present = "to", conflicts_with = "to")]
    pub out: Option<PathBuf>,
    /// Publish to Kafka instead: `kafka://HOST:PORT/TOPIC[?partitions=0,1]`, one record
    /// per batch (a missing topic is created).
    #[arg(long)]
    pub to: Option<String>,
    /// Wire format of the records published with --to: spark-json, ndjson or arrow.
    #[arg(long, default_value = "spark-json")]
    pub to_format: Format,
    /// Rows per part file, in directory mode.
    #[arg(long, default_value_t = 10_000)]
    pub rows_per_file: usize,
    /// Replace an existing `NAME.parquet` (without it an existing file is refused; a
    /// directory output always appends parts).
    #[arg(long)]
    pub overwrite: bool,
}

/// `cifar-df features`.
#[derive(Debug, Args)]
pub struct FeaturesArgs {
    /// The dataset folder or `synthetic[:TRAIN[:TEST[:SEED]]]`.
    #[arg(long)]
    pub data: String,
    /// The cache folder: `extractor/`, `train/`, `test/`, `cache.json`.
    #[arg(long)]
    pub out: PathBuf,
    /// Use this extractor instead of fitting one: a fitted extractor folder (e.g. another
    /// cache's `F/extractor`), `onnx:FILE.onnx`, a pretrained ONNX model, or `run:NAME`,
    /// the CNN a run learnt (`run:NAME@CHECKPOINT` for another than its latest).
    #[arg(long, value_name = "DIR|onnx:FILE|run:NAME")]
    pub extractor: Option<String>,
    /// Directory of runs, where `--extractor run:NAME` looks for NAME.
    #[arg(long, default_value = "runs")]
    pub runs: PathBuf,
    /// With `--extractor onnx:FILE`: the node (or tensor) whose output are the features
    /// (default: the model's output).
    #[arg(long)]
    pub node: Option<String>,
    /// A config whose `[features]` table sets the extractor's parameters.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Extractor parameters, `KEY=VALUE` (repeatable): the patch extractor's (as in
    /// `[features]`), or with `--extractor onnx:FILE` the ONNX ones (`mean`, `std`,
    /// `size`, `batch`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Add the horizontally flipped copy of every training image (`flipped = true`); a
    /// flip-invariant extractor needs none.
    #[arg(long)]
    pub flip: bool,
    /// Images per part file.
    #[arg(long, default_value_t = 1000)]
    pub rows_per_part: usize,
    /// The stream batch size the `batch` and `row` columns number images by.
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// Compute the features on workers.
    #[command(flatten)]
    pub on: WorkersArgs,
}

/// `--workers` and `--connect-timeout`, for the commands that can run on workers.
#[derive(Debug, Args)]
pub struct WorkersArgs {
    /// Run on these workers (`cifar-df worker`), comma-separated `HOST:PORT`; the files
    /// read and written (the query's, `features --out`) must be at the same path on every
    /// worker (a shared folder).
    #[arg(long, value_name = "HOST:PORT,...")]
    pub workers: Option<String>,
    /// Seconds to wait for each worker's answer before leaving it out.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,
}

impl WorkersArgs {
    /// The workers and the time to wait for each, when `--workers` is given.
    fn resolve(&self) -> anyhow::Result<Option<(Vec<url::Url>, Duration)>> {
        let Some(list) = &self.workers else {
            return Ok(None);
        };
        if !(self.connect_timeout > 0.0 && self.connect_timeout.is_finite()) {
            bail!("--connect-timeout must be a number of seconds > 0");
        }
        Ok(Some((
            crate::distributed::parse_workers(list)?,
            Duration::from_secs_f64(self.connect_timeout),
        )))
    }
}

/// `cifar-df worker`.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Address to listen on, IP:PORT. Anything but loopback (127.0.0.1) lets other
    /// machines send it queries, with no authentication: ask for it only on a trusted
    /// network.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// An extractor bound to `extract_features(image)` in the queries this worker runs (as
    /// `query --extractor`; coordinators must name the same one).
    #[arg(long, value_name = "DIR|onnx:FILE")]
    pub extractor: Option<String>,
    /// With `--extractor onnx:FILE`: the node whose output are the features.
    #[arg(long)]
    pub node: Option<String>,
}

/// `cifar-df ui`.
#[derive(Debug, Args)]
pub struct UiArgs {
    /// Directory of runs to show.
    #[arg(long, default_value = "runs")]
    pub runs: PathBuf,
    /// Address to listen on, IP:PORT (port 0: any free port). Anything but loopback lets
    /// other machines read the runs and run SQL that can read files: prefer an SSH tunnel.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
}

/// `cifar-df query`.
#[derive(Debug, Args)]
pub struct QueryArgs {
    /// The SQL; name Parquet files or directories in quotes: `SELECT count(*) FROM 'x.parquet'`.
    pub sql: String,
    /// Output format: table, csv or json.
    #[arg(long, default_value = "table")]
    pub format: OutputFormat,
    /// Directory of runs whose tables are registered.
    #[arg(long, default_value = "runs")]
    pub runs: PathBuf,
    /// An extractor bound to `extract_features(image)` in the query: a fitted extractor
    /// folder, or `onnx:FILE.onnx`.
    #[arg(long, value_name = "DIR|onnx:FILE")]
    pub extractor: Option<String>,
    /// With `--extractor onnx:FILE`: the node whose output are the features.
    #[arg(long)]
    pub node: Option<String>,
    /// Run the query on workers.
    #[command(flatten)]
    pub on: WorkersArgs,
}

/// `cifar-df plot`.
#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("what")
        .args(["run", "compare", "confusion"])
        .required(true)
        .multiple(true)
))]
pub struct PlotArgs {
    /// Per-batch training curves of this run: loss, accuracy, precision, recall, F1.
    #[arg(long, value_name = "NAME")]
    pub run: Option<String>,
    /// Bar charts of the test accuracy and loss of these runs (scored with `predict`).
    #[arg(long, value_name = "RUN", num_args = 1..)]
    pub compare: Vec<String>,
    /// Confusion-matrix heatmap of this run.
    #[arg(long, value_name = "RUN")]
    pub confusion: Option<String>,
    /// Split of the --confusion heatmap: test, or train (its last epoch).
    #[arg(long, default_value = "test", requires = "confusion")]
    pub split: Split,
    /// Output folder [default: RUNS/NAME/plots; RUNS/plots for --compare].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Directory of runs.
    #[arg(long, value_name = "DIR", default_value = "runs")]
    pub runs: PathBuf,
}

/// The message for a failed command: the error and each of its causes, every cause said
/// once. (An error that already quotes its cause, as `Error::Io`'s "PATH: what the OS
/// said" does, would otherwise repeat it: "PATH: not found: not found".)
pub fn error_message(err: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        // DataFusion wraps our errors from inside a query as "External error: …".
        let text = text.strip_prefix("External error: ").unwrap_or(&text);
        if text.is_empty() || msg.contains(text) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(text);
    }
    msg
}

/// Parse the process's arguments and run.
pub fn main() -> anyhow::Result<ExitCode> {
    // A panic in the source thread is caught and becomes the command's error message;
    // the default hook would print it a second time.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // `cifar-df predict ... | head`: once the reader has gone, `println!` panics with
        // EPIPE; end quietly, with what was printed, as other command-line tools do.
        let text = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if text.starts_with("failed printing to stdout") && text.contains("Broken pipe") {
            std::process::exit(0);
        }
        if std::thread::current().name() != Some(crate::table::SOURCE_THREAD) {
            default_hook(info);
        }
    }));
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.quiet);
    if let Some(bytes) = cli.memory_limit {
        crate::limits::set_memory_limit(bytes);
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        builder.worker_threads(n);
        crate::model::set_threads(n);
    }
    let runtime = builder
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(cli))
}

fn parse_memory_limit(s: &str) -> std::result::Result<u64, String> {
    crate::limits::parse_size(s).map_err(|e| e.to_string())
}

fn init_logging(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CIFAR_DF_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("warn,cifar_df={level}")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .without_time()
        .try_init();
}

/// Run a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let progress = !cli.quiet;
    match cli.command {
        Command::Demo(a) => demo(a, progress).await,
        Command::Synth(a) => synth_cmd(a),
        Command::Stream(a) => stream_cmd(a, progress).await,
        Command::Export(a) => export_cmd(a, progress).await,
        Command::Features(a) => features_cmd(a, progress).await,
        Command::Train(a) => train_cmd(*a, progress).await,
        Command::Predict(a) => predict_cmd(a, progress).await,
        Command::ExportModel(a) => export_model_cmd(a),
        Command::Query(a) => query_cmd(a).await,
        Command::Plot(a) => plot_cmd(a).await,
        Command::Worker(a) => worker_cmd(a).await,
        Command::Ui(a) => ui_cmd(a).await,
    }
}

/// Whether a run scores with test-time flip averaging: its saved config's `flip_test`.
fn run_flip_test(run_dir: &Path) -> anyhow::Result<bool> {
    let path = run_dir.join(crate::checkpoint::CONFIG_FILE);
    if !path.is_file() {
        return Ok(false);
    }
    Ok(RunConfig::load(&path)?.flip_test.unwrap_or(false))
}

fn export_model_cmd(a: ExportModelArgs) -> anyhow::Result<ExitCode> {
    use crate::model::cnn::onnx;
    let dir = crate::features::cnn::run_folder(&a.run, &a.runs);
    let e = crate::features::cnn::CnnExtractor::from_run(&dir, a.checkpoint.as_deref())?;
    let tta = onnx::Tta {
        flip: run_flip_test(&dir)?,
        translate: e.params.tta_translate,
    };
    let bytes = onnx::export(&e.net, tta, &format!("cifar-df CNN from run {}", e.source));
    crate::store::write_atomic(&a.out, &bytes)?;
    println!(
        "wrote {} ({} bytes): run {}, widths {:?}, outputs logits, probabilities (flip {}, \
         translate {}), features [{}]; input image [N, 3, 32, 32] RGB in [0, 1]",
        a.out.display(),
        bytes.len(),
        e.source,
        e.net.arch.widths,
        if tta.flip { "on" } else { "off" },
        if tta.translate { "on" } else { "off" },
        e.net.arch.feature_width()
    );
    Ok(ExitCode::SUCCESS)
}

fn synth_cmd(a: SynthArgs) -> anyhow::Result<ExitCode> {
    let layouts = match a.layout.as_str() {
        "both" => vec![Layout::Bin, Layout::Py],
        other => vec![other.parse::<Layout>()?],
    };
    let spec = SynthSpec {
        train: a.train,
        test: a.test,
        seed: a.seed,
    };
    let t = Instant::now();
    synth::write_folder(&a.out, &spec, &layouts)?;
    eprintln!(
        "wrote {} train + {} test synthetic images (seed {}) to {} in {:.2} s",
        spec.train,
        spec.test,
        spec.seed,
        a.out.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

async fn stream_cmd(a: StreamArgs, progress: bool) -> anyhow::Result<ExitCode> {
    if !(a.sleep >= 0.0 && a.sleep.is_finite()) {
        bail!("--sleep must be a number of seconds ≥ 0");
    }
    if !(a.write_timeout >= 0.0 && a.write_timeout < 1e9) {
        bail!("--write-timeout must be a number of seconds ≥ 0 (0: wait forever)");
    }
    let opts = ServeOptions {
        data: DataSpec::parse(&a.data)?,
        split: a.split,
        batch_size: a.batch_size,
        endless: a.endless,
        sleep: Duration::from_secs_f64(a.sleep),
        format: a.format,
        limit: (a.limit > 0).then_some(a.limit),
        progress,
        write_timeout: (a.write_timeout > 0.0).then(|| Duration::from_secs_f64(a.write_timeout)),
        shuffle: None,
    };
    if let Some(to) = &a.to {
        if !(a.connect_timeout >= 0.0 && a.connect_timeout.is_finite()) {
            bail!("--connect-timeout must be a number of seconds ≥ 0");
        }
        let url = crate::kafka::KafkaUrl::parse(to)?;
        let timeout = Duration::from_secs_f64(a.connect_timeout);
        let t = Instant::now();
        let summary = tokio::task::spawn_blocking(move || {
            crate::kafka::publish_dataset(&url, &opts, timeout)
        })
        .await??;
        let secs = t.elapsed().as_secs_f64().max(1e-9);
        if progress {
            eprintln!(
                "published {} batches, {} images, {:.1} MB to {to} in {:.2} s ({:.0} images/s)",
                summary.batches,
                summary.images,
                summary.bytes as f64 / 1e6,
                secs,
                summary.images as f64 / secs,
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let listener = server::bind(&a.host, a.port)?;
    let addr = server::local_addr(&listener)?;
    if !addr.ip().is_loopback() {
        tracing::warn!("serving on {addr}, reachable from other machines");
    }
    eprintln!("listening on {addr}");
    let t = Instant::now();
    let summary = tokio::task::spawn_blocking(move || server::serve(&listener, &opts)).await??;
    let secs = t.elapsed().as_secs_f64().max(1e-9);
    if progress {
        eprintln!(
            "sent {} batches, {} images, {:.1} MB in {:.2} s ({:.0} images/s){}",
            summary.batches,
            summary.images,
            summary.bytes as f64 / 1e6,
            secs,
            summary.images as f64 / secs,
            if summary.client_left {
                "; the client left early"
            } else {
                ""
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn export_cmd(a: ExportArgs, progress: bool) -> anyhow::Result<ExitCode> {
    let (spec, opts) = a.source.open()?;
    let out = match (&a.out, &a.to) {
        (Some(out), _) => out.clone(),
        (None, Some(to)) => return publish_source(&spec, &opts, to, a.to_format, progress).await,
        (None, None) => bail!("give --out PATH or --to kafka://HOST:PORT/TOPIC"),
    };
    let single = out.extension().is_some_and(|e| e == "parquet");
    if single && !a.overwrite && out.exists() {
        bail!(
            "{} already exists; pass --overwrite to replace it, or give a directory to add \
             part files to",
            out.display()
        );
    }
    let opts_out = ExportOptions {
        rows_per_file: a.rows_per_file,
        ..ExportOptions::default()
    };
    export_source(&spec, &opts, &out, &opts_out, progress).await
}

/// `export --to kafka://...`: every batch of the source, published.
async fn publish_source(
    spec: &SourceSpec,
    opts: &SourceOptions,
    to: &str,
    format: Format,
    progress: bool,
) -> anyhow::Result<ExitCode> {
    let url = crate::kafka::KafkaUrl::parse(to)?;
    let timeout = opts.connect_timeout;
    let url2 = url.clone();
    let mut publisher = tokio::task::spawn_blocking(move || {
        crate::kafka::Publisher::connect(&url2, format, timeout)
    })
    .await??;
    let ctx = query::stream_session();
    let source = source::open(spec, opts)?;
    let report = table::register_stream(&ctx, source, spec.is_bounded())?;
    let bar = crate::progress::spinner(progress, crate::progress::BATCHES);
    let t = Instant::now();
    let mut images = 0u64;
    let summary = tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(export::publish(&ctx, &mut publisher, |b| {
            images += b.num_rows() as u64;
            bar.inc(1);
            bar.set_message(format!(
                "{images} images · {:.0} images/s",
                images as f64 / t.elapsed().as_secs_f64().max(1e-9)
            ));
        }))
    });
    bar.finish_and_clear();
    // What was queued is delivered (or the failure said) even when the stream failed.
    let delivered = tokio::task::spawn_blocking(move || publisher.finish()).await?;
    let summary = summary?;
    let sent = delivered?;
    let secs = t.elapsed().as_secs_f64().max(1e-9);
    let r = report.snapshot();
    if progress {
        eprintln!(
            "published {} images in {} batches ({:.1} MB of {format}) from {spec} to {url} in \
             {secs:.2} s ({:.0} images/s); {} rejected{}",
            sent.images,
            sent.batches,
            sent.bytes as f64 / 1e6,
            sent.images as f64 / secs,
            r.rejected,
            if summary.interrupted {
                "; interrupted"
            } else {
                ""
            }
        );
    }
    if let Some(e) = summary.error {
        return Err(anyhow::Error::new(e).context(format!(
            "the stream ended early; the {} images received before it were published to {url}",
            summary.rows
        )));
    }
    Ok(ExitCode::SUCCESS)
}

/// Export `spec` to `out`, printing a summary; non-zero exit when the stream ended in error.
async fn export_source(
    spec: &SourceSpec,
    opts: &SourceOptions,
    out: &std::path::Path,
    out_opts: &ExportOptions,
    progress: bool,
) -> anyhow::Result<ExitCode> {
    let ctx = query::stream_session();
    let source = source::open(spec, opts)?;
    let report = table::register_stream(&ctx, source, spec.is_bounded())?;
    let bar = crate::progress::spinner(progress, crate::progress::BATCHES);
    let t = Instant::now();
    let mut images = 0u64;
    let summary = export::export(&ctx, out, out_opts, |b| {
        images += b.num_rows() as u64;
        bar.inc(1);
        bar.set_message(format!(
            "{images} images · {:.0} images/s",
            images as f64 / t.elapsed().as_secs_f64().max(1e-9)
        ));
    })
    .await?;
    bar.finish_and_clear();
    let secs = t.elapsed().as_secs_f64().max(1e-9);
    let r = report.snapshot();
    if progress {
        eprintln!(
        "exported {} images in {} batches from {} ({}) to {} in {:.2} s ({:.0} images/s, {:.0} MB/s read); {} rejected{}{}",
        summary.rows,
        summary.batches,
        spec,
        r.format.map(|f| f.to_string()).unwrap_or_else(|| "in process".into()),
        out.display(),
        secs,
        summary.rows as f64 / secs,
        r.bytes as f64 / 1e6 / secs,
        r.rejected,
        if r.empty > 0 { format!("; {} empty batches passed over", r.empty) } else { String::new() },
        if summary.interrupted { "; interrupted" } else { "" }
    );
    }
    if let Some(e) = summary.error {
        return Err(anyhow::Error::new(e).context(format!(
            "the stream ended early; the {} images received before it are in {}",
            summary.rows,
            out.display()
        )));
    }
    Ok(ExitCode::SUCCESS)
}

/// The extractor `--extractor SPEC [--node NAME]` binds to `extract_features`, if any.
fn bound_extractor(
    spec: Option<&str>,
    node: Option<&str>,
    runs: &Path,
) -> anyhow::Result<Option<std::sync::Arc<Extractor>>> {
    match spec {
        Some(spec) => Ok(Some(std::sync::Arc::new(open_extractor(
            spec,
            node,
            &[],
            runs,
        )?))),
        None if node.is_some() => bail!("--node goes with --extractor onnx:FILE"),
        None => Ok(None),
    }
}

async fn query_cmd(a: QueryArgs) -> anyhow::Result<ExitCode> {
    let extractor = bound_extractor(a.extractor.as_deref(), a.node.as_deref(), &a.runs)?;
    if let Some((workers, timeout)) = a.on.resolve()? {
        let runs_dir = a.runs.clone();
        let prepare =
            move |ctx: &datafusion::prelude::SessionContext| runs::register_tables(ctx, &runs_dir);
        let batches =
            crate::distributed::collect(&workers, extractor, timeout, &prepare, &a.sql).await?;
        let mut out = std::io::stdout().lock();
        out.write_all(query::format_batches(&batches, a.format)?.as_bytes())?;
        out.flush()?;
        return Ok(ExitCode::SUCCESS);
    }
    let ctx = query::session();
    runs::register_tables(&ctx, &a.runs)?;
    if let Some(e) = extractor {
        crate::features::udf::register(&ctx, e);
    }
    let mut out = std::io::stdout().lock();
    query::write_result(&ctx, &a.sql, a.format, &mut out).await?;
    Ok(ExitCode::SUCCESS)
}

async fn plot_cmd(a: PlotArgs) -> anyhow::Result<ExitCode> {
    let out_for = |run: &str| {
        a.out
            .clone()
            .unwrap_or_else(|| a.runs.join(run).join("plots"))
    };
    let mut paths = Vec::new();
    if let Some(run) = &a.run {
        paths.extend(plot::plot_run(&a.runs, run, &out_for(run)).await?);
    }
    if let Some(run) = &a.confusion {
        let split = a.split.to_string();
        paths.push(plot::plot_confusion(&a.runs, run, &split, &out_for(run)).await?);
    }
    if !a.compare.is_empty() {
        let out = a.out.clone().unwrap_or_else(|| a.runs.join("plots"));
        paths.extend(plot::plot_compare(&a.runs, &a.compare, &out).await?);
    }
    let mut stdout = std::io::stdout().lock();
    for p in &paths {
        writeln!(stdout, "{}", p.display())?;
    }
    stdout.flush()?;
    Ok(ExitCode::SUCCESS)
}

async fn demo(a: DemoArgs, progress: bool) -> anyhow::Result<ExitCode> {
    let data = DataSpec::parse(&a.data)?;
    eprintln!("demo: streaming {data} over loopback TCP, reading it back, exporting to Parquet");
    let listener = server::bind("127.0.0.1", 0)?;
    let addr = server::local_addr(&listener)?;
    let serve_opts = ServeOptions {
        data,
        split: Split::Train,
        batch_size: a.batch_size,
        endless: false,
        sleep: Duration::ZERO,
        format: Format::SparkJson,
        limit: None,
        progress: false,
        write_timeout: None,
        shuffle: None,
    };
    let server = tokio::task::spawn_blocking(move || server::serve(&listener, &serve_opts));
    let spec = SourceSpec::Tcp {
        host: addr.ip().to_string(),
        port: addr.port(),
    };
    let code = export_source(
        &spec,
        &SourceOptions::default(),
        &a.out,
        &ExportOptions::default(),
        progress,
    )
    .await?;
    let sent = server.await??;
    eprintln!(
        "server sent {} batches, {} images, {:.1} MB of spark-json",
        sent.batches,
        sent.images,
        sent.bytes as f64 / 1e6
    );
    let ctx = query::session();
    let path = a.out.display().to_string().replace('\'', "''");
    let sql = include_str!("../sql/stream_summary.sql").replace("{table}", &format!("'{path}'"));
    let batches = query::run(&ctx, &sql).await?;
    print!("{}", query::format_batches(&batches, OutputFormat::Table)?);
    Ok(code)
}

fn print_metrics(title: &str, m: &Metrics) {
    println!(
        "{title}: {} images · accuracy {:.4} · loss {:.4} · precision {:.4} · recall {:.4} · F1 {:.4}",
        m.images, m.acc, m.loss, m.precision, m.recall, m.f1
    );
}

impl TrainArgs {
    /// Flags of a resumed run: it goes on with its saved config, so flags that would change
    /// it are refused, naming the saved and the given value; flags that equal it (the same
    /// command re-run with `--resume` appended) are fine.
    fn check_resume_flags(&self, saved_model: &str, saved: &RunConfig) -> anyhow::Result<()> {
        let refused = [
            ("--sql", self.source.sql.is_some()),
            ("--extractor", self.extractor.is_some()),
            ("--node", self.node.is_some()),
            ("--eval-after-fit", self.eval_after_fit),
        ];
        let bad: Vec<&str> = refused
            .iter()
            .filter(|(_, g)| *g)
            .map(|(f, _)| *f)
            .collect();
        if !bad.is_empty() {
            bail!(
                "--resume continues the run with its saved config, SQL and extractor; drop {}",
                bad.join(", ")
            );
        }
        let compared = self.config.is_some()
            || self.model.is_some()
            || self.seed.is_some()
            || self.source.batch_size.is_some()
            || self.lr.is_some()
            || self.alpha.is_some()
            || self.hidden.is_some()
            || self.passes.is_some()
            || self.optimizer.is_some()
            || self.loss.is_some()
            || self.learning_rate.is_some()
            || self.k.is_some()
            || self.buffer.is_some()
            || self.kernel.is_some()
            || !self.set.is_empty();
        if !compared {
            return Ok(());
        }
        let (model, given) = self.config()?;
        // What decides how the run learns; --epochs may extend it and the source is given
        // apart, so those are not compared.
        let flat = |model: &str, cfg: &RunConfig| -> anyhow::Result<Vec<(String, String)>> {
            let t: toml::Table = toml::from_str(&cfg.to_toml(model))?;
            let mut out = Vec::new();
            for (k, v) in t {
                match (k.as_str(), v) {
                    // The classes come from the data, not from flags.
                    ("epochs" | "data" | "sql" | "classes", _) => {}
                    (_, toml::Value::Table(inner)) if k == model => {
                        // The model's hyper-parameters with their defaults filled in.
                        let p = config::effective_params(model, &inner)?;
                        for (ik, iv) in p.as_object().into_iter().flatten() {
                            if ik == "classes" {
                                continue;
                            }
                            // An f32 parameter reads as its shortest f32 form (0.01).
                            let text = match iv.as_f64() {
                                Some(f) if iv.is_f64() && f64::from(f as f32) == f => {
                                    (f as f32).to_string()
                                }
                                _ => iv.to_string(),
                            };
                            out.push((format!("{k}.{ik}"), text));
                        }
                    }
                    (_, toml::Value::Table(inner)) => {
                        for (ik, iv) in inner {
                            out.push((format!("{k}.{ik}"), iv.to_string()));
                        }
                    }
                    (_, v) => out.push((k, v.to_string())),
                }
            }
            out.sort();
            Ok(out)
        };
        let a = flat(saved_model, saved)?;
        let b = flat(&model, &given)?;
        let get = |v: &[(String, String)], k: &str| {
            v.iter()
                .find(|(key, _)| key == k)
                .map(|(_, val)| val.clone())
        };
        let mut keys: Vec<&String> = a.iter().chain(&b).map(|(k, _)| k).collect();
        keys.sort();
        keys.dedup();
        let diffs: Vec<String> = keys
            .into_iter()
            .filter_map(|k| {
                let (x, y) = (get(&a, k), get(&b, k));
                (x != y).then(|| {
                    format!(
                        "{k}: saved {}, given {}",
                        x.as_deref().unwrap_or("(default)"),
                        y.as_deref().unwrap_or("(default)")
                    )
                })
            })
            .collect();
        if !diffs.is_empty() {
            bail!(
                "--resume continues the run with its saved config, and these flags differ \
                 from it: {} (drop them, or train a new run)",
                diffs.join("; ")
            );
        }
        Ok(())
    }
}

/// A future that completes on Ctrl-C or SIGTERM, setting `flag`.
fn stop_signal(flag: std::sync::Arc<std::sync::atomic::AtomicBool>) -> trainer::StopSignal {
    Box::pin(async move {
        #[cfg(unix)]
        {
            let term = async {
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(_) => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
    })
}

/// Progress bar text for a pass.
fn progress_message(p: &Progress) -> String {
    let epoch = match p.epochs {
        Some(e) => format!("epoch {}/{e}", p.epoch),
        None => format!("epoch {}", p.epoch),
    };
    let batch = match p.per_epoch {
        Some(n) => format!("batch {}/{n}", p.batch_in_epoch),
        None => format!("batch {}", p.batch_in_epoch),
    };
    format!(
        "{epoch} · {batch} · {:.0} images/s · acc {:.3} · loss {:.3}",
        p.images_per_second, p.acc, p.loss
    )
}

/// Updates `bar` after every batch: the message, and, once the pass knows its length
/// (epochs × batches per epoch), a bar with an ETA in place of the spinner.
fn progress_callback(bar: &indicatif::ProgressBar) -> trainer::OnBatch {
    let bar = bar.clone();
    Box::new(move |p: &Progress| {
        if let (Some(epochs), Some(per)) = (p.epochs, p.per_epoch) {
            let total = epochs.saturating_mul(per);
            if bar.length() != Some(total) {
                bar.set_length(total);
                if let Ok(style) = indicatif::ProgressStyle::with_template(
                    "{bar:24} {pos}/{len} {msg} [{elapsed}<{eta}]",
                ) {
                    bar.set_style(style);
                }
            }
            bar.set_position(u64::from(p.epoch.saturating_sub(1)) * per + p.batch_in_epoch);
        }
        bar.set_message(progress_message(p));
    })
}

async fn train_cmd(a: TrainArgs, progress: bool) -> anyhow::Result<ExitCode> {
    let (model, mut cfg, fallback_source) = if a.resume {
        let name = a.run.as_deref().unwrap_or_default();
        let run = Run::new(&a.runs, name)?;
        let ck = trainer::resume_point(&run)?;
        let mut cfg = RunConfig::parse(&ck.config()?, &ck.dir.join(checkpoint::CONFIG_FILE))?;
        let model = config::model_or_default(&cfg);
        a.check_resume_flags(&model, &cfg)?;
        if a.epochs.is_some() {
            cfg.epochs = a.epochs;
        }
        let source = match run.read_info()? {
            Some(i) => Some(TrainSource::parse(&i.source)?),
            None => None,
        };
        (model, cfg, source)
    } else {
        let (m, c) = a.config()?;
        (m, c, None)
    };
    let params = cfg.model_table(&model);
    // Check the model and its hyper-parameters before touching the source.
    trainer::new_model(&model, &params)?;
    let epochs = cfg.epochs.unwrap_or(1);
    let (source, mut opts) = a.source.resolve(
        Split::Train,
        Some(epochs),
        cfg.batch_size.unwrap_or(128),
        cfg.data.as_deref(),
        fallback_source,
        a.sleep,
    )?;
    opts.shuffle = cfg.shuffle.unwrap_or(false);
    if !a.resume {
        let names = run_classes(&a, &cfg, &source)?;
        cfg.set_param(&model, "classes", toml::Value::Integer(names.len() as i64));
        cfg.classes = Some(names);
    }
    let params = cfg.model_table(&model);
    trainer::new_model(&model, &params)?;
    let extractor = if a.resume {
        None
    } else {
        train_extractor(&a, &cfg, &source)?
    };
    let cached = matches!(source, TrainSource::Spec(SourceSpec::Features(_)));
    let flip_test = a.flip_test || cfg.flip_test.unwrap_or(false);
    if flip_test && !a.no_test {
        // Refused now rather than after training.
        eval_sql(cached, extractor.is_some(), true)?;
    }
    let default_sql = if cached {
        trainer::CACHED_SQL
    } else if extractor.is_some() {
        trainer::FEATURES_SQL
    } else {
        trainer::TRAIN_SQL
    };
    let sql = a.source.sql(default_sql, cfg.sql.as_ref())?;
    let name = a
        .run
        .clone()
        .unwrap_or_else(|| format!("{model}-{}", chrono_like_stamp()));
    let run = Run::new(&a.runs, &name)?;
    // Serves until the command ends.
    let ui = match a.ui {
        Some(listen) => Some(TrainUi::start(listen, a.runs.clone()).await?),
        None => None,
    };
    let bar = crate::progress::spinner(progress, "{spinner} train {msg} [{elapsed}]");
    let signalled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let summary = trainer::train(TrainOptions {
        params,
        config: cfg.to_toml(&model),
        seed: cfg.seed.unwrap_or(0),
        sql,
        eval_after_fit: a.eval_after_fit,
        checkpoint_every: a.checkpoint_every,
        keep_checkpoints: a.keep_checkpoints,
        window: a.window,
        resume: a.resume,
        overwrite: a.overwrite,
        max_batches: a.max_batches,
        stop: Some(stop_signal(signalled.clone())),
        on_batch: Some(progress_callback(&bar)),
        extractor: extractor.clone(),
        ..TrainOptions::new(run.clone(), &model, source.clone(), opts.clone())
    })
    .await?;
    bar.finish_and_clear();
    let runs_dir = a.runs.display().to_string();
    println!(
        "run {name}: {} on {source} · {} batches{} · {:.1} s · {:.0} images/s · {} rejected",
        model,
        summary.batches,
        match &summary.resumed_from {
            Some(c) => format!(" (resumed from {c}, {} in all)", summary.total_batches),
            None => String::new(),
        },
        summary.seconds,
        summary.images_per_second,
        summary.rejected
    );
    let how = if a.eval_after_fit {
        "scored after learning"
    } else {
        "scored before learning"
    };
    print_metrics(
        &format!("train ({how}), epoch {}", summary.epoch),
        &summary.last_epoch,
    );
    println!(
        "model fit {:.0} images/s ({:.2} s in partial_fit over the run)",
        summary.overall.images as f64 / summary.fit_seconds.max(1e-9),
        summary.fit_seconds
    );
    if let Some(c) = &summary.checkpoint {
        println!("checkpoint: {}", run.checkpoints_dir().join(c).display());
    }
    if summary.interrupted {
        println!(
            "interrupted: continue with  cifar-df train --runs {runs_dir} --run {name} --resume"
        );
        let signalled = signalled.load(std::sync::atomic::Ordering::SeqCst);
        if let Some(ui) = ui {
            ui.finish().await?;
        }
        return Ok(if signalled {
            ExitCode::from(130)
        } else {
            ExitCode::SUCCESS
        });
    }
    let mut tested = false;
    let has_test = source
        .dataset()
        .is_none_or(|d| crate::dataset::has_split(d, Split::Test));
    if !has_test && !a.no_test {
        println!("test: none (the image folder has no test/ folder)");
    }
    if !a.no_test && has_test && (source.dataset().is_some() || cached) {
        let test_source = match &source {
            TrainSource::Loopback { data, .. } => TrainSource::Loopback {
                data: data.clone(),
                sleep: Duration::ZERO,
            },
            other => other.clone(),
        };
        let test_sql = eval_sql(cached, trainer::has_extractor(&run), flip_test)?;
        let bar = crate::progress::spinner(progress, "{spinner} test {msg} [{elapsed}]");
        let test = trainer::predict(PredictOptions {
            run: run.clone(),
            checkpoint: None,
            sql: test_sql.to_string(),
            source: test_source,
            // In file order, never shuffled: a prediction's (batch, row) is then its
            // image's place in the split (the dashboard's gallery finds it there).
            source_opts: SourceOptions {
                split: Split::Test,
                epochs: Some(1),
                skip: 0,
                shuffle: false,
                ..opts.clone()
            },
            split: "test".into(),
            window: a.window,
            on_batch: Some(progress_callback(&bar)),
        })
        .await?;
        bar.finish_and_clear();
        print_metrics(
            &format!(
                "test ({})",
                summary.checkpoint.as_deref().unwrap_or("model")
            ),
            &test.overall,
        );
        tested = true;
    }
    if !a.no_plots {
        match crate::plot::plot_all_for_run(&a.runs, &name, &run.plots_dir()).await {
            Ok(paths) if !paths.is_empty() => println!(
                "plots: {} PNGs in {} ({})",
                paths.len(),
                run.plots_dir().display(),
                paths
                    .iter()
                    .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!("plots not drawn: {e}"),
        }
    }
    println!(
        "tables: {dir}/metrics, eval_metrics, confusion, predictions (Parquet; run record {dir}/run.json)",
        dir = run.dir.display()
    );
    println!(
        "query:  cifar-df query --runs {runs_dir} \"select epoch, avg(acc) as acc, avg(loss) as loss from metrics where run = '{name}' and split = 'train' group by epoch order by epoch\""
    );
    if !tested {
        println!(
            "test:   cifar-df predict --runs {runs_dir} --run {name} --data DIR (or --source ...)"
        );
    }
    if let Some(ui) = ui {
        ui.finish().await?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn predict_cmd(a: PredictArgs, progress: bool) -> anyhow::Result<ExitCode> {
    let run = Run::new(&a.runs, &a.run)?;
    let fallback = match run.read_info()? {
        Some(i) => match TrainSource::parse(&i.source)? {
            TrainSource::Loopback { data, .. } => Some(TrainSource::Loopback {
                data,
                sleep: Duration::ZERO,
            }),
            TrainSource::Spec(SourceSpec::Data(d)) => Some(TrainSource::Spec(SourceSpec::Data(d))),
            TrainSource::Spec(SourceSpec::Features(d)) => {
                Some(TrainSource::Spec(SourceSpec::Features(d)))
            }
            TrainSource::Spec(_) => None,
        },
        None => None,
    };
    let (source, opts) = a.source.resolve(
        a.split,
        Some(1),
        a.source.batch_size.unwrap_or(128),
        None,
        fallback,
        0.0,
    )?;
    let split = match a.split {
        Split::Test => "test".to_string(),
        Split::Train => "train-eval".to_string(),
    };
    let cached = matches!(source, TrainSource::Spec(SourceSpec::Features(_)));
    // The run's own test-time flip averaging (its config's flip_test) unless asked here.
    let flip_test = !a.no_flip_test && (a.flip_test || (!cached && run_flip_test(&run.dir)?));
    let default_sql = eval_sql(cached, trainer::has_extractor(&run), flip_test)?;
    let bar = crate::progress::spinner(progress, "{spinner} predict {msg} [{elapsed}]");
    let summary = trainer::predict(PredictOptions {
        run,
        checkpoint: a.checkpoint.clone(),
        sql: a.source.sql(default_sql, None)?,
        source: source.clone(),
        source_opts: opts,
        split: split.clone(),
        window: 20,
        on_batch: Some(progress_callback(&bar)),
    })
    .await?;
    bar.finish_and_clear();
    let m = &summary.overall;
    println!(
        "run {}: checkpoint {} on {source} ({}) · {} batches · {:.0} images/s",
        a.run,
        summary.checkpoint.as_deref().unwrap_or("?"),
        a.split,
        summary.batches,
        summary.images_per_second
    );
    print_metrics(&split, m);
    println!("confusion matrix (rows: actual, columns: predicted):");
    print!("{:>12}", "");
    let names = crate::runs::run_classes(&a.runs, &a.run);
    for name in &names {
        print!("{:>6}", name.chars().take(5).collect::<String>());
    }
    println!();
    for (i, row) in m.confusion.iter().enumerate() {
        let name = names
            .get(i)
            .map_or_else(|| i.to_string(), |n| n.chars().take(12).collect());
        print!("{name:>12}");
        for c in row {
            print!("{c:>6}");
        }
        println!();
    }
    if let Some(first) = summary.cluster_grids.first() {
        println!(
            "cluster image grids: {} PNGs in {}",
            summary.cluster_grids.len(),
            first.parent().unwrap_or(first).display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The extractor a new run computes features with: `--extractor DIR`, or one fitted on the
/// first images of the source's training split when the config has a `[features]` table.
fn train_extractor(
    a: &TrainArgs,
    cfg: &RunConfig,
    source: &TrainSource,
) -> anyhow::Result<Option<std::sync::Arc<Extractor>>> {
    if let Some(spec) = &a.extractor {
        let e = open_extractor(spec, a.node.as_deref(), &[], &a.runs)?;
        eprintln!("extractor {spec}: {}", e.describe());
        return Ok(Some(std::sync::Arc::new(e)));
    }
    if a.node.is_some() {
        bail!("--node goes with --extractor onnx:FILE");
    }
    let Some(params) = cfg.patch_params()? else {
        return Ok(None);
    };
    let Some(data) = source.dataset() else {
        bail!(
            "the config's [features] table fits an extractor on the first training images, which \
             needs a dataset source (--data DIR or --source DIR); for {source}, fit one with \
             `cifar-df features` and pass --extractor F/extractor"
        );
    };
    let e = fit_patches(&params, data)?;
    Ok(Some(std::sync::Arc::new(e)))
}

/// The evaluation SQL of a run: for a `features:` source, a run with an extractor, or
/// pixels; with `flip_test`, the variant that also computes the mirrored images' features.
fn eval_sql(cached: bool, extractor: bool, flip_test: bool) -> anyhow::Result<&'static str> {
    Ok(match (cached, extractor, flip_test) {
        (true, _, false) => trainer::CACHED_SQL,
        (true, _, true) => bail!(
            "--flip-test needs images: a features: cache's test split holds no mirrored \
             features (score the image data with --data instead)"
        ),
        (false, true, false) => trainer::FEATURES_SQL,
        (false, true, true) => trainer::FEATURES_FLIP_SQL,
        (false, false, false) => trainer::EVAL_SQL,
        (false, false, true) => trainer::EVAL_FLIP_SQL,
    })
}

/// The extractor `--extractor SPEC [--node NAME] [--set K=V…]` names: a fitted extractor
/// folder, or `onnx:FILE` with its parameters from `node` and `set`.
fn open_extractor(
    spec: &str,
    node: Option<&str>,
    set: &[String],
    runs: &Path,
) -> anyhow::Result<Extractor> {
    let onnx = spec.starts_with(crate::features::ONNX_PREFIX);
    if !onnx && node.is_some() {
        bail!("--node goes with --extractor onnx:FILE, not with the extractor folder {spec}");
    }
    let mut params = crate::features::OnnxParams::default();
    if onnx && !set.is_empty() {
        let mut t = toml::Table::new();
        for kv in set {
            let (k, v) = config::parse_override(kv)?;
            t.insert(k, v);
        }
        params = toml::Value::Table(t)
            .try_into()
            .map_err(|e| anyhow::anyhow!("--set for an ONNX extractor: {e}"))?;
    }
    if let Some(n) = node {
        params.node = Some(n.to_string());
    }
    Ok(Extractor::open(spec, params, runs)?)
}

/// Fits a patch extractor on the first `fit_images` training images of `data`.
fn fit_patches(
    params: &crate::features::PatchParams,
    data: &DataSpec,
) -> anyhow::Result<Extractor> {
    let t = Instant::now();
    let files = crate::dataset::load_split(data, Split::Train)?;
    let mut pixels = Vec::new();
    for f in &files {
        let want = params.fit_images * crate::dataset::IMAGE_BYTES;
        let room = want.saturating_sub(pixels.len());
        pixels.extend_from_slice(&f.pixels[..room.min(f.pixels.len())]);
    }
    let e = Extractor::Patches(crate::features::PatchExtractor::fit(params, &pixels)?);
    eprintln!(
        "extractor fitted on {} images in {:.1} s: {}",
        pixels.len() / crate::dataset::IMAGE_BYTES,
        t.elapsed().as_secs_f64(),
        e.describe()
    );
    Ok(e)
}

async fn ui_cmd(a: UiArgs) -> anyhow::Result<ExitCode> {
    warn_if_exposed(&a.listen);
    let listener = crate::ui::bind(a.listen).await?;
    // The first line says where; tests and scripts read it.
    println!(
        "dashboard on http://{}/ (runs: {})",
        listener.local_addr()?,
        a.runs.display()
    );
    std::io::stdout().flush()?;
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    crate::ui::serve(listener, a.runs, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// `train --ui`: the dashboard inside the training process, over its runs folder, until
/// [`TrainUi::finish`] (or its drop) stops it.
struct TrainUi {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<crate::error::Result<()>>,
}

impl TrainUi {
    async fn start(listen: std::net::SocketAddr, runs: PathBuf) -> anyhow::Result<TrainUi> {
        warn_if_exposed(&listen);
        let listener = crate::ui::bind(listen).await?;
        eprintln!("dashboard on http://{}/", listener.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            crate::ui::serve(listener, runs, shutdown).await
        });
        Ok(TrainUi { stop, task })
    }

    /// Stops the dashboard; an error it stopped with is the command's. A page still open
    /// holds its event stream: after 2 s the server is left to the process's exit.
    async fn finish(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        match tokio::time::timeout(Duration::from_secs(2), self.task).await {
            Ok(Ok(r)) => Ok(r.context("train --ui: the dashboard failed")?),
            Ok(Err(e)) => Err(anyhow::anyhow!("train --ui: the dashboard failed: {e}")),
            Err(_) => Ok(()),
        }
    }
}

/// A warning, once, when the dashboard listens beyond this machine.
fn warn_if_exposed(addr: &std::net::SocketAddr) {
    if !crate::ui::is_loopback(addr) {
        eprintln!(
            "warning: the dashboard listens on {addr}, beyond this machine, with no \
             authentication; its SQL box can read any file this user can. Prefer \
             127.0.0.1 and an SSH tunnel (ssh -L 8080:127.0.0.1:8080 HOST)."
        );
    }
}

async fn worker_cmd(a: WorkerArgs) -> anyhow::Result<ExitCode> {
    let extractor = bound_extractor(a.extractor.as_deref(), a.node.as_deref(), Path::new("runs"))?;
    let listener = crate::distributed::bind(&a.listen).await?;
    let addr = listener
        .local_addr()
        .with_context(|| format!("worker: listening on {}", a.listen))?;
    eprintln!(
        "worker listening on http://{addr} ({})",
        crate::distributed::version(extractor.as_deref())
    );
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    crate::distributed::serve(listener, extractor, shutdown).await?;
    eprintln!("worker on {addr} stopped");
    Ok(ExitCode::SUCCESS)
}

async fn features_cmd(a: FeaturesArgs, progress: bool) -> anyhow::Result<ExitCode> {
    use crate::features::cache::{self, CacheOptions};
    let data = DataSpec::parse(&a.data)?;
    let workers = a.on.resolve()?;
    let ex_dir = a.out.join(cache::EXTRACTOR_DIR);
    let mut cfg = match &a.config {
        Some(p) => RunConfig::load(p)?,
        None => RunConfig::default(),
    };
    let given = a.extractor.as_deref();
    let onnx = given.is_some_and(|g| g.starts_with(crate::features::ONNX_PREFIX));
    if !a.set.is_empty() && given.is_some() && !onnx {
        bail!(
            "--set: the extractor {} is already fitted; its parameters cannot change",
            given.unwrap_or_default()
        );
    }
    if !a.set.is_empty() && !onnx {
        let t = cfg.features.get_or_insert_with(toml::Table::new);
        for kv in &a.set {
            let (k, v) = config::parse_override(kv)?;
            t.insert(k, v);
        }
    }
    let open_given = |spec: &str| open_extractor(spec, a.node.as_deref(), &a.set, &a.runs);
    if given.is_none() && a.node.is_some() {
        bail!("--node goes with --extractor onnx:FILE");
    }
    let extractor = if ex_dir.exists() {
        // A job that stopped part-way: carry on with the extractor it fitted.
        let e = Extractor::load(&ex_dir)?;
        if let Some(spec) = given {
            let other = open_given(spec)?;
            if other.stamp() != e.stamp() || other.width() != e.width() {
                bail!(
                    "{} already holds features of another extractor ({}); write to a new --out",
                    a.out.display(),
                    ex_dir.display()
                );
            }
        }
        eprintln!("resuming {}: extractor {}", a.out.display(), e.describe());
        e
    } else {
        let e = match given {
            Some(spec) => open_given(spec)?,
            None => fit_patches(&cfg.patch_params()?.unwrap_or_default(), &data)?,
        };
        e.save(&ex_dir)?;
        e
    };
    let bar = crate::progress::spinner(progress, "{spinner} features {msg} [{elapsed}]");
    let bar2 = bar.clone();
    let t = Instant::now();
    let mut opts = CacheOptions {
        data,
        out: a.out.clone(),
        flip: a.flip,
        rows_per_part: a.rows_per_part,
        batch_size: a.batch_size,
        on_part: Some(Box::new(move |split, done, n| {
            bar2.set_message(format!("{split} {done}/{n} images"))
        })),
    };
    let summary = match &workers {
        Some((urls, timeout)) => {
            crate::features::remote::write_cache_on_workers(&extractor, &mut opts, urls, *timeout)
                .await?
        }
        None => cache::write_cache(&extractor, &mut opts)?,
    };
    bar.finish_and_clear();
    let secs = summary.encode_seconds.max(1e-9);
    let gflops = extractor.macs_per_image().map_or_else(String::new, |macs| {
        let g = 2.0 * macs as f64 * summary.images_encoded as f64 / secs / 1e9;
        format!(", {g:.0} GFLOP/s")
    });
    println!(
        "features: {} · {} parts written, {} kept · {} images encoded in {:.1} s ({:.0} images/s{gflops}) · {:.1} s in all",
        a.out.display(),
        summary.parts_written,
        summary.parts_kept,
        summary.images_encoded,
        summary.encode_seconds,
        summary.images_encoded as f64 / secs,
        t.elapsed().as_secs_f64()
    );
    println!(
        "train on them: cifar-df train --source features:{} --model ridge",
        a.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `YYYYMMDD-HHMMSS` in UTC, for default run names.
fn chrono_like_stamp() -> String {
    let secs = runs::now_ms() / 1000;
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
