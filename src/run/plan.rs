//! What a run will do, decided once: from the options a caller gives (the CLI's flags,
//! or another program's) to a checked [`TrainPlan`] or [`PredictPlan`] that
//! [`trainer::train`] and [`trainer::predict`] carry out.
//!
//! Every rule of a run lives here, not in the CLI: the image side (asked, a resumed run's,
//! an extractor's), the classes (the data's, `--classes`, the config's), what a resumed run
//! keeps (derived from the model registry), the SQL preset (pixels, features, a feature
//! cache, flip-averaged scoring), the extractor (opened, or fitted by [`crate::features`]),
//! and the model's hyper-parameters, checked before the source is touched. The CLI maps
//! flags to [`TrainRequest`] and prints; the plan's [`notes`](TrainPlan::notes) are what it
//! says on the way.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::dataset::{DataSpec, Split};
use crate::error::{Error, Result};
use crate::features::{Extractor, OnnxParams};
use crate::run::checkpoint;
use crate::run::config::{self, RunConfig};
use crate::run::tables::Run;
use crate::run::trainer::{self, PredictOptions, TrainOptions, TrainSource};
use crate::source::{SourceOptions, SourceSpec};
use crate::wire::Format;

/// Where the images come from, as asked. (`Default` gives no source, no limits of its own:
/// set `max_line_bytes` and `connect_timeout`, as the CLI's defaults do.)
#[derive(Clone, Debug, Default)]
pub struct SourceRequest {
    /// A source spec (`tcp://`, `file:`, `kafka://`, a dataset folder, `synthetic`).
    pub source: Option<String>,
    /// A dataset folder or `synthetic[:…]`, served over loopback TCP in this process.
    pub data: Option<String>,
    /// Wire format of a tcp/file source (detected when `None`).
    pub format: Option<Format>,
    /// Images per batch (and the models' mini-batch); the config's, else 128.
    pub batch_size: Option<usize>,
    /// Longest accepted line, in bytes.
    pub max_line_bytes: usize,
    /// Seconds a tcp or kafka source keeps trying to connect.
    pub connect_timeout: f64,
    /// Keep reading a kafka topic as it grows.
    pub follow: bool,
    /// A preprocessing SQL file instead of the preset.
    pub sql: Option<PathBuf>,
    /// The side of the images.
    pub image_size: Option<usize>,
    /// Seconds between batches.
    pub sleep: f64,
}

impl SourceRequest {
    /// The source: `source` as given; `data` (or the config's `data`) served over a
    /// loopback TCP connection in this process; without either, `fallback` (a resumed
    /// run's own source) or the built-in synthetic set over loopback (with a note).
    pub fn resolve(
        &self,
        split: Split,
        epochs: Option<u64>,
        batch_size: usize,
        config_data: Option<&str>,
        fallback: Option<TrainSource>,
        notes: &mut Vec<String>,
    ) -> Result<(TrainSource, SourceOptions)> {
        if !(self.sleep >= 0.0 && self.sleep.is_finite()) {
            return Err(Error::usage("--sleep must be a number of seconds ≥ 0"));
        }
        let sleep = Duration::from_secs_f64(self.sleep);
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
                notes.push(
                    "no --source or --data given: streaming the built-in synthetic set over \
                     loopback TCP"
                        .into(),
                );
                TrainSource::Loopback {
                    data: DataSpec::parse("synthetic")?,
                    sleep,
                }
            }
        };
        if !(self.connect_timeout >= 0.0 && self.connect_timeout.is_finite()) {
            return Err(Error::usage(
                "--connect-timeout must be a number of seconds ≥ 0",
            ));
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
                // Set from the model below.
                classes: crate::model::CLASSES,
                // Set from the request, the config or the run below.
                image_side: crate::dataset::SIDE,
            },
        ))
    }

    /// The preprocessing SQL: the file asked for (or the config's), else `default`.
    pub fn sql(&self, default: &str, config_sql: Option<&PathBuf>) -> Result<String> {
        match self.sql.as_ref().or(config_sql) {
            Some(p) => std::fs::read_to_string(p).map_err(|e| Error::io(p, e)),
            None => Ok(default.to_string()),
        }
    }
}

/// An extractor as asked: `--extractor SPEC`, with an ONNX model's output node.
#[derive(Clone, Debug, Default)]
pub struct ExtractorRequest {
    /// `onnx:FILE`, `run:NAME[@CHECKPOINT]` or a fitted extractor folder.
    pub spec: Option<String>,
    /// The output node of an ONNX model.
    pub node: Option<String>,
    /// `KEY=VALUE` parameters of an ONNX model.
    pub set: Vec<String>,
}

impl ExtractorRequest {
    /// The extractor asked for, if any (opened through [`crate::run::extractor::open`]).
    pub fn open(&self, runs: &Path) -> Result<Option<Extractor>> {
        let Some(spec) = &self.spec else {
            if self.node.is_some() {
                return Err(Error::usage("--node goes with --extractor onnx:FILE"));
            }
            return Ok(None);
        };
        let onnx = spec.starts_with(crate::features::ONNX_PREFIX);
        if !onnx && self.node.is_some() {
            return Err(Error::usage(format!(
                "--node goes with --extractor onnx:FILE, not with the extractor folder {spec}"
            )));
        }
        let mut params = OnnxParams::default();
        if onnx && !self.set.is_empty() {
            let mut t = toml::Table::new();
            for kv in &self.set {
                let (k, v) = config::parse_override(kv)?;
                t.insert(k, v);
            }
            params = toml::Value::Table(t)
                .try_into()
                .map_err(|e| Error::usage(format!("--set for an ONNX extractor: {e}")))?;
        }
        if let Some(n) = &self.node {
            params.node = Some(n.clone());
        }
        Ok(Some(crate::run::extractor::open(spec, params, runs)?))
    }
}

/// What a training run is asked to do.
#[derive(Clone, Debug, Default)]
pub struct TrainRequest {
    /// The folder of runs.
    pub runs: PathBuf,
    /// The run's name (a new run: `MODEL-YYYYMMDD-HHMMSS` when `None`).
    pub run: Option<String>,
    /// Continue run `run` from its latest checkpoint, with its saved config.
    pub resume: bool,
    /// The model and config given (a config file with flags on top). For a resumed run,
    /// only when something was given that sets them: it must then equal the saved one.
    pub config: Option<(String, RunConfig)>,
    /// Passes over a dataset source (a resumed run may extend them).
    pub epochs: Option<u64>,
    /// The source.
    pub source: SourceRequest,
    /// The classes of a stream that does not carry them: a count or names.
    pub classes: Option<String>,
    /// The extractor of a features run.
    pub extractor: ExtractorRequest,
    /// Score the training batches after learning them (a new run only).
    pub eval_after_fit: bool,
    /// Test-time flip averaging in the test pass.
    pub flip_test: bool,
    /// Skip the test pass.
    pub no_test: bool,
    /// The cnn's precision on a resumed run.
    pub precision: Option<String>,
}

/// A checked training run: what [`trainer::train`] gets, and the test pass after it.
pub struct TrainPlan {
    /// The run.
    pub run: Run,
    /// Its name.
    pub name: String,
    /// The model.
    pub model: String,
    /// The run's config, everything decided.
    pub config: RunConfig,
    /// The source.
    pub source: TrainSource,
    /// How the source is read.
    pub source_opts: SourceOptions,
    /// The preprocessing SQL.
    pub sql: String,
    /// The extractor of a features run (a new run: opened or fitted here).
    pub extractor: Option<Arc<Extractor>>,
    /// The source is a `features:` cache.
    pub cached: bool,
    /// Flip-averaged test scores.
    pub flip_test: bool,
    /// The precision a resumed cnn switches to.
    pub precision: Option<crate::model::cnn::Precision>,
    /// What the plan says on the way (a default taken, an extractor fitted), in order.
    pub notes: Vec<String>,
}

impl TrainPlan {
    /// The trainer's options for this plan; the caller adds its own (checkpoint cadence,
    /// limits, hooks) with `..`.
    pub fn options(&self) -> TrainOptions {
        TrainOptions {
            params: self.config.model_table(&self.model),
            config: self.config.to_toml(&self.model),
            seed: self.config.seed.unwrap_or(0),
            sql: self.sql.clone(),
            extractor: self.extractor.clone(),
            precision: self.precision,
            ..TrainOptions::new(
                self.run.clone(),
                &self.model,
                self.source.clone(),
                self.source_opts.clone(),
            )
        }
    }

    /// Whether the source has a test split to score after training.
    pub fn has_test(&self) -> bool {
        self.source
            .dataset()
            .is_none_or(|d| crate::dataset::has_split(d, Split::Test))
    }

    /// The test pass after training (`window`: the rolling window of its metrics), when
    /// the source is a dataset or a feature cache with a test split.
    pub fn test_options(&self, window: usize) -> Result<Option<PredictOptions>> {
        if !self.has_test() || !(self.source.dataset().is_some() || self.cached) {
            return Ok(None);
        }
        let source = match &self.source {
            TrainSource::Loopback { data, .. } => TrainSource::Loopback {
                data: data.clone(),
                sleep: Duration::ZERO,
            },
            other => other.clone(),
        };
        let sql = eval_sql(
            self.cached,
            trainer::has_extractor(&self.run),
            self.flip_test,
        )?;
        Ok(Some(PredictOptions {
            run: self.run.clone(),
            checkpoint: None,
            sql: sql.to_string(),
            source,
            // In file order, never shuffled: a prediction's (batch, row) is then its
            // image's place in the split (the dashboard's gallery finds it there).
            source_opts: SourceOptions {
                split: Split::Test,
                epochs: Some(1),
                skip: 0,
                shuffle: false,
                ..self.source_opts.clone()
            },
            split: "test".into(),
            window,
            on_batch: None,
        }))
    }
}

/// Plans a training run: everything checked before the source is read or the run folder
/// touched (the extractor may be fitted, from the source's first images).
pub fn train(req: &TrainRequest) -> Result<TrainPlan> {
    let mut notes = Vec::new();
    let (model, mut cfg, fallback_source) = if req.resume {
        let name = req.run.as_deref().unwrap_or_default();
        let run = Run::new(&req.runs, name)?;
        let ck = trainer::resume_point(&run)?;
        let mut cfg = RunConfig::parse(&ck.config()?, &ck.dir.join(checkpoint::CONFIG_FILE))?;
        let model = config::model_or_default(&cfg);
        check_resume(req, &model, &cfg)?;
        if req.epochs.is_some() {
            cfg.epochs = req.epochs;
        }
        let source = match run.read_info()? {
            Some(i) => Some(TrainSource::parse(&i.source)?),
            None => None,
        };
        (model, cfg, source)
    } else {
        let (m, c) = req.config.clone().unwrap_or_else(|| {
            (
                config::model_or_default(&RunConfig::default()),
                RunConfig::default(),
            )
        });
        (m, c, None)
    };
    if let Some(s) = req.source.image_size {
        if req.resume && s != cfg.image_side() {
            return Err(Error::usage(format!(
                "--resume continues the run with its images of {0}x{0}; drop --image-size {s}",
                cfg.image_side()
            )));
        }
        cfg.image_size = Some(s);
    }
    crate::dataset::check_side(cfg.image_side())?;
    if !req.resume && model == crate::model::cnn::NAME {
        if cfg.model_table(&model).contains_key("side") {
            return Err(Error::usage(
                "the cnn's `side` is the run's image size: give --image-size (or `image_size` \
                 in the config) instead",
            ));
        }
        // The network's input side is the run's image size.
        cfg.set_param(
            &model,
            "side",
            toml::Value::Integer(cfg.image_side() as i64),
        );
    }
    let kind = crate::model::registry::find(&model)?;
    // Check the model and its hyper-parameters before touching the source. (A resumed
    // run's were checked when it began, and its checkpoint, not this CPU, says how it
    // computes: a bf16 run on a CPU without bf16 is told so when it loads.)
    if !req.resume {
        kind.build(&cfg.model_table(&model))?;
    }
    let epochs = cfg.epochs.unwrap_or(1);
    let (source, mut opts) = req.source.resolve(
        Split::Train,
        Some(epochs),
        cfg.batch_size.unwrap_or(128),
        cfg.data.as_deref(),
        fallback_source,
        &mut notes,
    )?;
    opts.shuffle = cfg.shuffle.unwrap_or(false);
    opts.set_image_side(cfg.image_side());
    if !req.resume {
        let names = classes(req, &cfg, &source)?;
        cfg.set_param(&model, "classes", toml::Value::Integer(names.len() as i64));
        cfg.classes = Some(names);
        // Again, with the classes the data gave.
        kind.build(&cfg.model_table(&model))?;
    }
    let extractor = if req.resume {
        None
    } else {
        train_extractor(req, &cfg, &source, &mut notes)?
    };
    // An extractor with a side of its own (a fitted patch extractor, a run's CNN) sets
    // the run's when none was asked for, and refuses another.
    if let Some(s) = extractor.as_ref().and_then(|e| e.image_side()) {
        if cfg.image_size.is_some_and(|asked| asked != s) {
            return Err(Error::usage(format!(
                "the extractor encodes images of {s}x{s}, and this run's are {0}x{0} \
                 (--image-size or `image_size`): give --image-size {s}",
                cfg.image_side()
            )));
        }
        if s != crate::dataset::SIDE {
            cfg.image_size = Some(s);
        }
        opts.set_image_side(s);
    }
    let cached = matches!(source, TrainSource::Spec(SourceSpec::Features(_)));
    let flip_test = req.flip_test || cfg.flip_test.unwrap_or(false);
    if flip_test && !req.no_test {
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
    let sql = req.source.sql(default_sql, cfg.sql.as_ref())?;
    let name = req
        .run
        .clone()
        .unwrap_or_else(|| format!("{model}-{}", crate::run::tables::stamp_now()));
    let run = Run::new(&req.runs, &name)?;
    let precision = match (&req.precision, req.resume) {
        (Some(p), true) => Some(crate::model::cnn::Precision::parse(p).map_err(Error::usage)?),
        _ => None,
    };
    Ok(TrainPlan {
        run,
        name,
        model,
        config: cfg,
        source,
        source_opts: opts,
        sql,
        extractor,
        cached,
        flip_test,
        precision,
        notes,
    })
}

/// A resumed run goes on with its saved config, so options that would change it are
/// refused, naming the saved and the given value; options that equal it (the same command
/// re-run with `--resume` appended) are fine. What is compared comes from the model
/// registry: every hyper-parameter with its default filled in, except those the model
/// takes from elsewhere.
fn check_resume(req: &TrainRequest, saved_model: &str, saved: &RunConfig) -> Result<()> {
    let refused = [
        ("--sql", req.source.sql.is_some()),
        ("--extractor", req.extractor.spec.is_some()),
        ("--node", req.extractor.node.is_some()),
        ("--eval-after-fit", req.eval_after_fit),
    ];
    let bad: Vec<&str> = refused
        .iter()
        .filter(|(_, g)| *g)
        .map(|(f, _)| *f)
        .collect();
    if !bad.is_empty() {
        return Err(Error::usage(format!(
            "--resume continues the run with its saved config, SQL and extractor; drop {}",
            bad.join(", ")
        )));
    }
    let Some((model, given)) = &req.config else {
        return Ok(());
    };
    let a = compared_settings(saved_model, saved)?;
    let b = compared_settings(model, given)?;
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
        return Err(Error::usage(format!(
            "--resume continues the run with its saved config, and these flags differ \
             from it: {} (drop them, or train a new run)",
            diffs.join("; ")
        )));
    }
    Ok(())
}

/// What decides how a run learns, as `key = value` text, sorted: `--epochs` may extend a
/// run and the source is given apart, so those are not compared.
fn compared_settings(model: &str, cfg: &RunConfig) -> Result<Vec<(String, String)>> {
    let t: toml::Table = toml::from_str(&cfg.to_toml(model))
        .map_err(|e| Error::internal(format!("a run config that does not read back: {e}")))?;
    let mut out = Vec::new();
    for (k, v) in t {
        match (k.as_str(), v) {
            // The classes come from the data, not from flags.
            // --image-size is checked against the run's on its own.
            ("epochs" | "data" | "sql" | "classes" | "image_size", _) => {}
            (_, toml::Value::Table(inner)) if k == model => {
                // The model's hyper-parameters with their defaults filled in.
                let kind = crate::model::registry::find(model)?;
                let p = kind.effective_params(&inner)?;
                for (ik, iv) in p.as_object().into_iter().flatten() {
                    // Set from the data or --image-size, or checked apart
                    // (--precision may change on a resume): the registry says.
                    if kind.not_compared_on_resume.contains(&ik.as_str()) {
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
}

/// The class names `--classes` gives: `N` (named "0" … "N-1") or comma-separated names.
pub fn parse_classes(s: &str) -> Result<Vec<String>> {
    let names: Vec<String> = match s.trim().parse::<usize>() {
        Ok(n) => (0..n).map(|i| i.to_string()).collect(),
        Err(_) => s.split(',').map(|n| n.trim().to_string()).collect(),
    };
    if !(2..=crate::dataset::MAX_CLASSES).contains(&names.len())
        || names.iter().any(String::is_empty)
    {
        return Err(Error::usage(format!(
            "--classes {s:?}: give a count from 2 to {} or that many non-empty names, \
             comma-separated",
            crate::dataset::MAX_CLASSES
        )));
    }
    Ok(names)
}

/// A new run's classes: the data's (checked against `--classes` if both are given), else
/// `--classes`, else the config's, else CIFAR-10's.
fn classes(req: &TrainRequest, cfg: &RunConfig, source: &TrainSource) -> Result<Vec<String>> {
    let flag = req.classes.as_deref().map(parse_classes).transpose()?;
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
                return Err(Error::usage(format!(
                    "--classes gives {} classes but {what} has {}",
                    f.len(),
                    names.len()
                )));
            }
        }
        return Ok(names);
    }
    Ok(flag.unwrap_or_else(|| cfg.class_names()))
}

/// The extractor a new run computes features with: the one asked for, or one fitted on
/// the first images of the source's training split when the config has a `[features]`
/// table.
fn train_extractor(
    req: &TrainRequest,
    cfg: &RunConfig,
    source: &TrainSource,
    notes: &mut Vec<String>,
) -> Result<Option<Arc<Extractor>>> {
    let asked = ExtractorRequest {
        set: Vec::new(),
        ..req.extractor.clone()
    };
    if let Some(e) = asked.open(&req.runs)? {
        notes.push(format!(
            "extractor {}: {}",
            asked.spec.as_deref().unwrap_or_default(),
            e.describe()
        ));
        return Ok(Some(Arc::new(e)));
    }
    let Some(params) = cfg.patch_params()? else {
        return Ok(None);
    };
    let Some(data) = source.dataset() else {
        return Err(Error::usage(format!(
            "the config's [features] table fits an extractor on the first training images, \
             which needs a dataset source (--data DIR or --source DIR); for {source}, fit one \
             with `cifar-df features` and pass --extractor F/extractor"
        )));
    };
    let (e, note) = crate::features::fit_patches(&params, data, cfg.image_side())?;
    notes.push(note);
    Ok(Some(Arc::new(e)))
}

/// The evaluation SQL of a run: for a `features:` source, a run with an extractor, or
/// pixels; with `flip_test`, the variant that also computes the mirrored images' features.
pub fn eval_sql(cached: bool, extractor: bool, flip_test: bool) -> Result<&'static str> {
    Ok(match (cached, extractor, flip_test) {
        (true, _, false) => trainer::CACHED_SQL,
        (true, _, true) => {
            return Err(Error::usage(
                "--flip-test needs images: a features: cache's test split holds no mirrored \
                 features (score the image data with --data instead)",
            ))
        }
        (false, true, false) => trainer::FEATURES_SQL,
        (false, true, true) => trainer::FEATURES_FLIP_SQL,
        (false, false, false) => trainer::EVAL_SQL,
        (false, false, true) => trainer::EVAL_FLIP_SQL,
    })
}

/// What a prediction pass over a trained run is asked to do.
#[derive(Clone, Debug)]
pub struct PredictRequest {
    /// The folder of runs.
    pub runs: PathBuf,
    /// The trained run.
    pub run: String,
    /// The source (by default the run's own, where it can be read again).
    pub source: SourceRequest,
    /// The split to score.
    pub split: Split,
    /// The checkpoint to load (the latest when `None`).
    pub checkpoint: Option<String>,
    /// Flip-averaged scores (the run's own setting when neither this nor `no_flip_test`).
    pub flip_test: bool,
    /// No flip averaging, whatever the run's config says.
    pub no_flip_test: bool,
}

/// A checked prediction pass: what [`trainer::predict`] gets.
pub struct PredictPlan {
    /// The trainer's options (add `on_batch` with `..`).
    pub options: PredictOptions,
    /// The split's name in the run tables (`test`, `train-eval`).
    pub split: String,
    /// What the plan says on the way.
    pub notes: Vec<String>,
}

/// Plans a prediction pass over a trained run.
pub fn predict(req: &PredictRequest) -> Result<PredictPlan> {
    let mut notes = Vec::new();
    let run = Run::new(&req.runs, &req.run)?;
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
    let source_req = SourceRequest {
        sleep: 0.0,
        ..req.source.clone()
    };
    let (source, mut opts) = source_req.resolve(
        req.split,
        Some(1),
        req.source.batch_size.unwrap_or(128),
        None,
        fallback,
        &mut notes,
    )?;
    // The run's images' side; a stream of another is refused before it is read.
    let side = run_image_side(&run.dir)?;
    if let Some(s) = req.source.image_size.filter(|&s| s != side) {
        return Err(Error::usage(format!(
            "run {} learnt from images of {side}x{side}; --image-size {s} differs (drop it: \
             the run's side is used)",
            req.run
        )));
    }
    opts.set_image_side(side);
    let split = match req.split {
        Split::Test => "test".to_string(),
        Split::Train => "train-eval".to_string(),
    };
    let cached = matches!(source, TrainSource::Spec(SourceSpec::Features(_)));
    // The run's own test-time flip averaging (its config's flip_test) unless asked here.
    let flip_test = !req.no_flip_test && (req.flip_test || (!cached && run_flip_test(&run.dir)?));
    let default_sql = eval_sql(cached, trainer::has_extractor(&run), flip_test)?;
    let sql = req.source.sql(default_sql, None)?;
    Ok(PredictPlan {
        options: PredictOptions {
            run,
            checkpoint: req.checkpoint.clone(),
            sql,
            source,
            source_opts: opts,
            split: split.clone(),
            window: 20,
            on_batch: None,
        },
        split,
        notes,
    })
}

/// Whether a run's saved config asks for test-time flip averaging.
pub fn run_flip_test(run_dir: &Path) -> Result<bool> {
    let path = run_dir.join(checkpoint::CONFIG_FILE);
    if !path.is_file() {
        return Ok(false);
    }
    Ok(RunConfig::load(&path)?.flip_test.unwrap_or(false))
}

/// The side of a run's images: its saved config's `image_size`, or CIFAR's 32.
pub fn run_image_side(run_dir: &Path) -> Result<usize> {
    let path = run_dir.join(checkpoint::CONFIG_FILE);
    if !path.is_file() {
        return Ok(crate::dataset::SIDE);
    }
    Ok(RunConfig::load(&path)?.image_side())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(runs: &Path, model: &str, cfg: RunConfig) -> TrainRequest {
        TrainRequest {
            runs: runs.to_path_buf(),
            run: Some("a".into()),
            config: Some((model.to_string(), cfg)),
            source: SourceRequest {
                data: Some("synthetic:40:20".into()),
                max_line_bytes: crate::source::DEFAULT_MAX_LINE_BYTES,
                connect_timeout: 30.0,
                ..SourceRequest::default()
            },
            ..TrainRequest::default()
        }
    }

    #[test]
    fn a_new_run_is_planned_with_the_datas_classes_the_pixel_sql_and_a_test_pass() {
        let tmp = tempfile::tempdir().unwrap();
        let plan = train(&request(tmp.path(), "logreg", RunConfig::default())).unwrap();
        assert_eq!(plan.name, "a");
        assert_eq!(plan.sql, trainer::TRAIN_SQL);
        assert!(plan.extractor.is_none() && !plan.cached && plan.notes.is_empty());
        let classes = plan.config.classes.clone().unwrap();
        assert_eq!(classes.len(), 10);
        assert_eq!(
            plan.config.model_table("logreg")["classes"].as_integer(),
            Some(10)
        );
        assert!(matches!(plan.source, TrainSource::Loopback { .. }));
        let test = plan.test_options(20).unwrap().expect("a test pass");
        assert_eq!(test.sql, trainer::EVAL_SQL);
        assert_eq!(test.source_opts.split, Split::Test);
        // Planning touched nothing on disk.
        assert!(!tmp.path().join("a").exists());
    }

    #[test]
    fn the_cnn_takes_the_runs_image_side_and_refuses_one_of_its_own() {
        let tmp = tempfile::tempdir().unwrap();
        let mut req = request(tmp.path(), "cnn", RunConfig::default());
        req.source.image_size = Some(40);
        let plan = train(&req).unwrap();
        assert_eq!(
            plan.config.model_table("cnn")["side"].as_integer(),
            Some(40)
        );
        assert_eq!(plan.source_opts.image_side, 40);
        let mut cfg = RunConfig::default();
        cfg.set_param("cnn", "side", toml::Value::Integer(40));
        let e = train(&request(tmp.path(), "cnn", cfg)).err().unwrap();
        assert!(e.to_string().contains("give --image-size"), "{e}");
        assert_eq!(e.kind(), crate::error::ErrorKind::Usage);
    }

    #[test]
    fn bad_options_are_refused_before_the_source_is_read() {
        let tmp = tempfile::tempdir().unwrap();
        // A hyper-parameter the model does not have.
        let mut cfg = RunConfig::default();
        cfg.set_param("logreg", "momentum", toml::Value::Float(0.9));
        let e = train(&request(tmp.path(), "logreg", cfg)).err().unwrap();
        assert!(e.to_string().contains("[logreg] hyper-parameters"), "{e}");
        // Classes that disagree with the data's.
        let mut req = request(tmp.path(), "logreg", RunConfig::default());
        req.classes = Some("3".into());
        let e = train(&req).err().unwrap();
        assert!(e.to_string().contains("--classes gives 3 classes"), "{e}");
        // Resuming a run that is not there.
        let mut req = request(tmp.path(), "logreg", RunConfig::default());
        req.resume = true;
        assert!(train(&req).is_err());
        // Flip averaging has no mirrored features in a feature cache.
        assert!(eval_sql(true, false, true).is_err());
        assert_eq!(
            eval_sql(false, true, true).unwrap(),
            trainer::FEATURES_FLIP_SQL
        );
    }

    #[test]
    fn classes_are_a_count_or_names() {
        assert_eq!(parse_classes("3").unwrap(), ["0", "1", "2"]);
        assert_eq!(parse_classes("cat, dog").unwrap(), ["cat", "dog"]);
        assert!(parse_classes("1").is_err());
        assert!(parse_classes("cat,,dog").is_err());
    }
}
