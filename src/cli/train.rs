//! `cifar-df train` and `cifar-df predict`: flags to options, the extractor, the
//! progress bar, Ctrl-C, and the dashboard of `train --ui`.

use super::*;

pub(super) fn print_metrics(title: &str, m: &Metrics) {
    println!(
        "{title}: {} images · accuracy {:.4} · loss {:.4} · precision {:.4} · recall {:.4} · F1 {:.4}",
        m.images, m.acc, m.loss, m.precision, m.recall, m.f1
    );
}

impl TrainArgs {
    /// The flags as a run's options ([`plan::TrainRequest`]): the model and config they
    /// give, for a resumed run only when a flag that sets them is there (the plan then
    /// compares them with the saved ones).
    pub(super) fn request(&self) -> anyhow::Result<plan::TrainRequest> {
        // Any flag that sets the config or a hyper-parameter (the list `config()` applies).
        let sets_config = self.config.is_some()
            || self.model.is_some()
            || self.seed.is_some()
            || self.source.batch_size.is_some()
            || self.param_flags("lr").iter().any(|(_, v)| v.is_some())
            || !self.set.is_empty();
        let config = if !self.resume || sets_config {
            Some(self.config()?)
        } else {
            None
        };
        Ok(plan::TrainRequest {
            runs: self.runs.clone(),
            run: self.run.clone(),
            resume: self.resume,
            config,
            epochs: self.epochs,
            source: self.source.request(self.sleep),
            classes: self.classes.clone(),
            extractor: plan::ExtractorRequest {
                spec: self.extractor.clone(),
                node: self.node.clone(),
                set: Vec::new(),
            },
            eval_after_fit: self.eval_after_fit,
            flip_test: self.flip_test,
            no_test: self.no_test,
            precision: self.precision.clone(),
        })
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
    let plan = plan::train(&a.request()?)?;
    for note in &plan.notes {
        eprintln!("{note}");
    }
    let (name, model, source, run) = (&plan.name, &plan.model, &plan.source, &plan.run);
    // Serves until the command ends.
    let ui = match a.ui {
        Some(listen) => Some(TrainUi::start(listen, a.runs.clone()).await?),
        None => None,
    };
    let bar = crate::progress::spinner(progress, "{spinner} train {msg} [{elapsed}]");
    let signalled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let summary = trainer::train(TrainOptions {
        eval_after_fit: a.eval_after_fit,
        checkpoint_every: a.checkpoint_every,
        keep_checkpoints: a.keep_checkpoints,
        window: a.window,
        resume: a.resume,
        overwrite: a.overwrite,
        max_batches: a.max_batches,
        stop: Some(stop_signal(signalled.clone())),
        on_batch: Some(progress_callback(&bar)),
        ..plan.options()
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
    if !plan.has_test() && !a.no_test {
        println!("test: none (the image folder has no test/ folder)");
    }
    let test_opts = if a.no_test {
        None
    } else {
        plan.test_options(a.window)?
    };
    if let Some(opts) = test_opts {
        let bar = crate::progress::spinner(progress, "{spinner} test {msg} [{elapsed}]");
        let test = trainer::predict(PredictOptions {
            on_batch: Some(progress_callback(&bar)),
            ..opts
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
        match crate::plot::plot_all_for_run(&a.runs, name, &run.plots_dir()).await {
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
    let plan = plan::predict(&plan::PredictRequest {
        runs: a.runs.clone(),
        run: a.run.clone(),
        source: a.source.request(0.0),
        split: a.split,
        checkpoint: a.checkpoint.clone(),
        flip_test: a.flip_test,
        no_flip_test: a.no_flip_test,
    })?;
    for note in &plan.notes {
        eprintln!("{note}");
    }
    let (split, source) = (plan.split.clone(), plan.options.source.clone());
    let bar = crate::progress::spinner(progress, "{spinner} predict {msg} [{elapsed}]");
    let summary = trainer::predict(PredictOptions {
        on_batch: Some(progress_callback(&bar)),
        ..plan.options
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

/// The extractor `--extractor SPEC [--node NAME] [--set K=V…]` names: a fitted extractor
/// folder, `run:NAME` or `onnx:FILE` with its parameters from `node` and `set`.
pub(super) fn open_extractor(
    spec: &str,
    node: Option<&str>,
    set: &[String],
    runs: &Path,
) -> anyhow::Result<Extractor> {
    let asked = plan::ExtractorRequest {
        spec: Some(spec.to_string()),
        node: node.map(str::to_string),
        set: set.to_vec(),
    };
    Ok(asked
        .open(runs)?
        .ok_or_else(|| crate::error::Error::internal("an extractor asked for and not opened"))?)
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
