//! `cifar-df train` and `cifar-df predict`: flags to options, the extractor, the
//! progress bar, Ctrl-C, and the dashboard of `train --ui`.

use super::*;

/// A new run's classes: the data's (checked against `--classes` if both are given), else
/// `--classes`, else the config's, else CIFAR-10's.
pub(super) fn run_classes(
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

pub(super) fn print_metrics(title: &str, m: &Metrics) {
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
                    // --image-size is checked against the run's on its own.
                    ("epochs" | "data" | "sql" | "classes" | "image_size", _) => {}
                    (_, toml::Value::Table(inner)) if k == model => {
                        // The model's hyper-parameters with their defaults filled in.
                        let p = config::effective_params(model, &inner)?;
                        for (ik, iv) in p.as_object().into_iter().flatten() {
                            // Set from the data and --image-size, not from flags.
                            // --precision may change on a resume (checked apart).
                            if ik == "classes" || ik == "side" || ik == "precision" {
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
pub(super) fn stop_signal(
    flag: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> trainer::StopSignal {
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
pub(super) fn progress_message(p: &Progress) -> String {
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
pub(super) fn progress_callback(bar: &indicatif::ProgressBar) -> trainer::OnBatch {
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

pub(super) async fn train_cmd(a: TrainArgs, progress: bool) -> anyhow::Result<ExitCode> {
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
    if let Some(s) = a.source.image_size {
        if a.resume && s != cfg.image_side() {
            bail!(
                "--resume continues the run with its images of {0}x{0}; drop --image-size {s}",
                cfg.image_side()
            );
        }
        cfg.image_size = Some(s);
    }
    crate::dataset::check_side(cfg.image_side())?;
    if !a.resume && model == crate::model::cnn::NAME {
        if cfg.model_table(&model).contains_key("side") {
            bail!(
                "the cnn's `side` is the run's image size: give --image-size (or `image_size` \
                 in the config) instead"
            );
        }
        // The network's input side is the run's image size.
        cfg.set_param(
            &model,
            "side",
            toml::Value::Integer(cfg.image_side() as i64),
        );
    }
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
    opts.set_image_side(cfg.image_side());
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
    // An extractor with a side of its own (a fitted patch extractor, a run's CNN) sets
    // the run's when none was asked for, and refuses another.
    if let Some(s) = extractor.as_ref().and_then(|e| e.image_side()) {
        if cfg.image_size.is_some_and(|asked| asked != s) {
            bail!(
                "the extractor encodes images of {s}x{s}, and this run's are {0}x{0} \
                 (--image-size or `image_size`): give --image-size {s}",
                cfg.image_side()
            );
        }
        if s != crate::dataset::SIDE {
            cfg.image_size = Some(s);
        }
        opts.set_image_side(s);
    }
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
        precision: match (&a.precision, a.resume) {
            (Some(p), true) => {
                Some(crate::model::cnn::Precision::parse(p).map_err(crate::error::Error::usage)?)
            }
            _ => None,
        },
        ..TrainOptions::new(run.clone(), &model, source.clone(), opts.clone())
    })
    .await?;
    bar.finish_and_clear();
    let runs_dir = a.runs.display().to_string();
    println!(
        "run {name}: {}{} on {source} · {} batches{} · {:.1} s · {:.0} images/s · {} rejected",
        model,
        summary
            .compute
            .as_ref()
            .map(|c| format!(" in {c}"))
            .unwrap_or_default(),
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

pub(super) async fn predict_cmd(a: PredictArgs, progress: bool) -> anyhow::Result<ExitCode> {
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
    let (source, mut opts) = a.source.resolve(
        a.split,
        Some(1),
        a.source.batch_size.unwrap_or(128),
        None,
        fallback,
        0.0,
    )?;
    // The run's images' side; a stream of another is refused before it is read.
    let side = run_image_side(&run.dir)?;
    if let Some(s) = a.source.image_size.filter(|&s| s != side) {
        bail!(
            "run {} learnt from images of {side}x{side}; --image-size {s} differs (drop it: \
             the run's side is used)",
            a.run
        );
    }
    opts.set_image_side(side);
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
    let names = crate::run::tables::run_classes(&a.runs, &a.run);
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
pub(super) fn train_extractor(
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
    let e = fit_patches(&params, data, cfg.image_side())?;
    Ok(Some(std::sync::Arc::new(e)))
}

/// The evaluation SQL of a run: for a `features:` source, a run with an extractor, or
/// pixels; with `flip_test`, the variant that also computes the mirrored images' features.
pub(super) fn eval_sql(
    cached: bool,
    extractor: bool,
    flip_test: bool,
) -> anyhow::Result<&'static str> {
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
pub(super) fn open_extractor(
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

/// Fits a patch extractor on the first `fit_images` training images of `data`, at
/// `side`×`side`.
pub(super) fn fit_patches(
    params: &crate::features::PatchParams,
    data: &DataSpec,
    side: usize,
) -> anyhow::Result<Extractor> {
    let t = Instant::now();
    let per = crate::dataset::image_bytes(side);
    // Only the fitting images are resized: a file past them is not touched.
    let (files, _) = crate::dataset::load_split_first(data, Split::Train, side, params.fit_images)?;
    let mut pixels = Vec::new();
    for f in &files {
        let want = params.fit_images * per;
        let room = want.saturating_sub(pixels.len());
        pixels.extend_from_slice(&f.pixels[..room.min(f.pixels.len())]);
    }
    let e = Extractor::Patches(crate::features::PatchExtractor::fit(params, &pixels, side)?);
    eprintln!(
        "extractor fitted on {} images of {side}x{side} in {:.1} s: {}",
        pixels.len() / per,
        t.elapsed().as_secs_f64(),
        e.describe()
    );
    Ok(e)
}

/// `train --ui`: the dashboard inside the training process, over its runs folder, until
/// [`TrainUi::finish`] (or its drop) stops it.
struct TrainUi {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<crate::error::Result<()>>,
}

impl TrainUi {
    async fn start(listen: std::net::SocketAddr, runs: PathBuf) -> anyhow::Result<TrainUi> {
        let listener = crate::ui::bind(listen).await?;
        let settings = super::ui_settings(
            &listener,
            super::ui_token_from_env(),
            &[],
            crate::ui::api::SqlLimits::default(),
        )?;
        eprintln!("dashboard on {}", settings.access.url());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            crate::ui::serve(listener, runs, settings, shutdown).await
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
