//! The command line's arguments: [`Cli`], its subcommands and their flags (clap).

use super::*;

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
    /// Side of the images in pixels: a dataset's images are resized to SIDE×SIDE
    /// (bilinear; an image folder's are decoded straight to it), a stream's must have it
    /// [train: the config's `image_size`, a resumed run's, --extractor's side, or 32,
    /// CIFAR's; predict: the run's].
    #[arg(long, value_name = "SIDE")]
    pub image_size: Option<usize>,
}

impl TrainSourceArgs {
    /// The flags as the plan's [`plan::SourceRequest`], with `sleep` seconds between
    /// batches.
    pub(super) fn request(&self, sleep: f64) -> plan::SourceRequest {
        plan::SourceRequest {
            source: self.source.clone(),
            data: self.data.clone(),
            format: self.format,
            batch_size: self.batch_size,
            max_line_bytes: self.max_line_bytes,
            connect_timeout: self.connect_timeout,
            follow: self.follow,
            sql: self.sql.clone(),
            image_size: self.image_size,
            sleep,
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
    /// The model (the list comes from the registry, `model::MODELS`).
    #[arg(long, help = crate::model::registry::help())]
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
    /// Precision of the cnn's products: bf16 (bf16 inputs, f32 sums and master weights,
    /// as PyTorch's autocast; the default where the CPU has AVX512-BF16), f32 (the default
    /// elsewhere) or auto. With --resume: go on in another precision (a bf16 run on a CPU
    /// without bf16: --precision f32).
    #[arg(long, value_parser = ["bf16", "f32", "auto"])]
    pub precision: Option<String>,
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

impl TrainArgs {
    /// The hyper-parameters the flags set: each key with its value, `None` where the flag
    /// is not given. `--lr` sets `lr_key` (the model's, from the registry).
    pub(super) fn param_flags(
        &self,
        lr_key: &'static str,
    ) -> [(&'static str, Option<toml::Value>); 10] {
        let int = |n: usize| toml::Value::Integer(n as i64);
        let text = |s: &String| toml::Value::String(s.clone());
        [
            (lr_key, self.lr.map(toml::Value::Float)),
            ("alpha", self.alpha.map(toml::Value::Float)),
            (
                "hidden",
                self.hidden
                    .as_ref()
                    .map(|h| toml::Value::Array(h.iter().map(|&n| int(n)).collect())),
            ),
            ("passes", self.passes.map(int)),
            ("optimizer", self.optimizer.as_ref().map(text)),
            ("loss", self.loss.as_ref().map(text)),
            ("learning_rate", self.learning_rate.as_ref().map(text)),
            ("k", self.k.map(int)),
            ("buffer", self.buffer.map(int)),
            ("kernel", self.kernel.as_ref().map(text)),
        ]
    }

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
        let lr_key = crate::model::registry::find(&model)?.lr_key;
        for (key, value) in self.param_flags(lr_key) {
            if let Some(v) = value {
                cfg.set_param(&model, key, v);
            }
        }
        if let Some(p) = &self.precision {
            if model != crate::model::cnn::NAME {
                return Err(crate::error::Error::usage(format!(
                    "--precision {p}: only the cnn has a precision to choose (the model is {model})"
                ))
                .into());
            }
            cfg.set_param(&model, "precision", toml::Value::String(p.clone()));
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
    /// Side of the images in pixels: a dataset's images are resized to SIDE×SIDE
    /// (bilinear; an image folder's are decoded straight to it)
    /// [default: 32, CIFAR's].
    #[arg(long, value_name = "SIDE")]
    pub image_size: Option<usize>,
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
    /// Side of the images in pixels: a dataset's images are resized to SIDE×SIDE
    /// (bilinear; an image folder's are decoded straight to it), a stream's must have it
    /// [default: 32, CIFAR's].
    #[arg(long, value_name = "SIDE")]
    pub image_size: Option<usize>,
}

impl SourceArgs {
    pub(super) fn open(&self) -> anyhow::Result<(SourceSpec, SourceOptions)> {
        let spec = SourceSpec::parse(&self.source)?;
        if !(self.connect_timeout >= 0.0 && self.connect_timeout.is_finite()) {
            bail!("--connect-timeout must be a number of seconds ≥ 0");
        }
        let mut opts = SourceOptions {
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
            image_side: crate::dataset::SIDE,
        };
        opts.set_image_side(crate::dataset::check_side(
            self.image_size.unwrap_or(crate::dataset::SIDE),
        )?);
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
    /// Side of the images in pixels: a dataset's images are resized to SIDE×SIDE
    /// (bilinear; an image folder's are decoded straight to it) [default: a resumed job's,
    /// else the extractor's side (a fitted patch extractor, a run's CNN), else 32,
    /// CIFAR's].
    #[arg(long, value_name = "SIDE")]
    pub image_size: Option<usize>,
}

/// `--workers`, `--connect-timeout` and `--secret-file`, for the commands that can run on
/// workers.
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
    /// The workers' shared secret.
    #[command(flatten)]
    pub secret: SecretArgs,
}

impl WorkersArgs {
    /// The workers and how to reach them (the time to wait for each, the secret), when
    /// `--workers` is given.
    pub(super) fn resolve(
        &self,
    ) -> anyhow::Result<Option<(Vec<url::Url>, crate::distributed::Connect)>> {
        let Some(list) = &self.workers else {
            if self.secret.secret_file.is_some() {
                bail!("--secret-file goes with --workers");
            }
            return Ok(None);
        };
        if !(self.connect_timeout > 0.0 && self.connect_timeout.is_finite()) {
            bail!("--connect-timeout must be a number of seconds > 0");
        }
        let workers = crate::distributed::parse_workers(list)?;
        Ok(Some((
            workers,
            crate::distributed::Connect::new(
                Duration::from_secs_f64(self.connect_timeout),
                self.secret.resolve()?,
            ),
        )))
    }
}

/// `--secret-file`, for the worker and the commands that use workers: both read the
/// workers' shared secret the same way.
#[derive(Debug, Args)]
pub struct SecretArgs {
    /// A file holding the workers' shared secret (keep it private: chmod 600), the same
    /// for the workers and the commands that use them [default: the CIFAR_DF_SECRET
    /// variable; a secret is never given on the command line].
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
}

impl SecretArgs {
    /// The secret of `--secret-file`, else of `CIFAR_DF_SECRET`, else none.
    pub(super) fn resolve(&self) -> anyhow::Result<Option<crate::distributed::Secret>> {
        Ok(crate::distributed::Secret::resolve(
            self.secret_file.as_deref(),
        )?)
    }
}

/// `cifar-df worker`.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Address to listen on, IP:PORT. Anything but loopback (127.0.0.1) lets other
    /// machines send it queries: it needs the shared secret (--secret-file or
    /// CIFAR_DF_SECRET), or --insecure.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// The shared secret every call must present (the commands that use this worker read
    /// the same one).
    #[command(flatten)]
    pub secret: SecretArgs,
    /// Listen beyond loopback without a secret: anyone who reaches the port can run
    /// queries that read any file this user can. Only on a network you trust.
    #[arg(long)]
    pub insecure: bool,
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
    /// Address to listen on, IP:PORT (port 0: any free port). Beyond loopback every
    /// request needs a token (a random one is made and printed, in the URL to open);
    /// prefer loopback and an SSH tunnel.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// The token requests must carry (at least 16 of A-Z a-z 0-9 - _ . ~), instead of a
    /// random one;
    /// with it a loopback server needs it too. A flag shows in `ps`: on a shared machine
    /// set CIFAR_DF_UI_TOKEN instead.
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
    /// Another name this machine is reached by (a DNS name, or a proxy's NAME:PORT),
    /// accepted as the Host of requests besides the address served and loopback names;
    /// repeatable.
    #[arg(long, value_name = "NAME[:PORT]")]
    pub allow_host: Vec<String>,
    /// Seconds one SQL box query may run.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    pub sql_timeout: f64,
    /// Memory one SQL box query may use (sorts, joins, aggregates), e.g. 512M.
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    pub sql_memory: String,
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
