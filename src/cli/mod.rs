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

use crate::dataset::synth::{self, SynthSpec};
use crate::dataset::{DataSpec, Layout, Split};
use crate::features::Extractor;
use crate::plot;
use crate::query::{self, OutputFormat};
use crate::run::config::{self, RunConfig};
use crate::run::metrics::Metrics;
use crate::run::tables;
use crate::run::trainer::{self, PredictOptions, Progress, TrainOptions};
use crate::serve::{self, ServeOptions};
use crate::sink::{self, parquet::ExportOptions};
use crate::source::table;
use crate::source::{self, SourceOptions, SourceSpec, DEFAULT_MAX_LINE_BYTES};
use crate::wire::Format;

mod args;
mod train;

use crate::run::plan::{self, run_flip_test};
pub use args::*;
use train::{open_extractor, predict_cmd, train_cmd};

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
        if std::thread::current().name() != Some(crate::source::table::SOURCE_THREAD) {
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

fn export_model_cmd(a: ExportModelArgs) -> anyhow::Result<ExitCode> {
    use crate::model::cnn::onnx;
    let dir = crate::run::extractor::run_folder(&a.run, &a.runs);
    let e = crate::run::extractor::cnn_of_run(&dir, a.checkpoint.as_deref())?;
    let tta = onnx::Tta {
        flip: run_flip_test(&dir)?,
        translate: e.params.tta_translate,
    };
    let bytes = onnx::export(&e.net, tta, &format!("cifar-df CNN from run {}", e.source));
    crate::store::write_atomic(&a.out, &bytes)?;
    println!(
        "wrote {} ({} bytes): run {}, widths {:?}, outputs logits, probabilities (flip {}, \
         translate {}), features [{}]; input image [N, 3, {s}, {s}] RGB in [0, 1]",
        a.out.display(),
        bytes.len(),
        e.source,
        e.net.arch.widths,
        if tta.flip { "on" } else { "off" },
        if tta.translate { "on" } else { "off" },
        e.net.arch.feature_width(),
        s = e.net.arch.side
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
        image_side: crate::dataset::check_side(a.image_size.unwrap_or(crate::dataset::SIDE))?,
    };
    if a.to.is_none() {
        opts.format.check_side(opts.image_side)?;
    }
    if let Some(to) = &a.to {
        if !(a.connect_timeout >= 0.0 && a.connect_timeout.is_finite()) {
            bail!("--connect-timeout must be a number of seconds ≥ 0");
        }
        let url = crate::wire::kafka::KafkaUrl::parse(to)?;
        let timeout = Duration::from_secs_f64(a.connect_timeout);
        let t = Instant::now();
        let summary = tokio::task::spawn_blocking(move || {
            crate::sink::kafka::publish_dataset(&url, &opts, timeout)
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
    let listener = serve::bind(&a.host, a.port)?;
    let addr = serve::local_addr(&listener)?;
    if !addr.ip().is_loopback() {
        tracing::warn!("serving on {addr}, reachable from other machines");
    }
    eprintln!("listening on {addr}");
    let t = Instant::now();
    let summary = tokio::task::spawn_blocking(move || serve::serve(&listener, &opts)).await??;
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
    let url = crate::wire::kafka::KafkaUrl::parse(to)?;
    if let Some(why) = format.refuses_side(
        opts.image_side,
        "publish them with --to-format ndjson or arrow",
    ) {
        bail!(why);
    }
    let timeout = opts.connect_timeout;
    let url2 = url.clone();
    let mut publisher = tokio::task::spawn_blocking(move || {
        crate::sink::kafka::Publisher::connect(&url2, format, timeout)
    })
    .await??;
    let ctx = query::stream_session();
    let source = source::open(spec, opts)?;
    let report = table::register_stream(&ctx, source, spec.is_bounded())?;
    let bar = crate::progress::spinner(progress, crate::progress::BATCHES);
    let t = Instant::now();
    let mut images = 0u64;
    let summary = tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(sink::kafka::publish(
            &ctx,
            &mut publisher,
            |b| {
                images += b.num_rows() as u64;
                bar.inc(1);
                bar.set_message(format!(
                    "{images} images · {:.0} images/s",
                    images as f64 / t.elapsed().as_secs_f64().max(1e-9)
                ));
            },
        ))
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
    let summary = sink::parquet::export(&ctx, out, out_opts, |b| {
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
    if let Some((workers, connect)) = a.on.resolve()? {
        let runs_dir = a.runs.clone();
        let prepare = move |ctx: &datafusion::prelude::SessionContext| {
            tables::register_tables(ctx, &runs_dir)
        };
        let batches =
            crate::distributed::collect(&workers, extractor, &connect, &prepare, &a.sql).await?;
        let mut out = std::io::stdout().lock();
        out.write_all(query::format_batches(&batches, a.format)?.as_bytes())?;
        out.flush()?;
        return Ok(ExitCode::SUCCESS);
    }
    let ctx = query::session();
    tables::register_tables(&ctx, &a.runs)?;
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
    let listener = serve::bind("127.0.0.1", 0)?;
    let addr = serve::local_addr(&listener)?;
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
        image_side: crate::dataset::SIDE,
    };
    let server = tokio::task::spawn_blocking(move || serve::serve(&listener, &serve_opts));
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
    let path = query::literal(&a.out.display().to_string());
    let sql = include_str!("../../sql/stream_summary.sql").replace("{table}", &path);
    let batches = query::run(&ctx, &sql).await?;
    print!("{}", query::format_batches(&batches, OutputFormat::Table)?);
    Ok(code)
}

async fn ui_cmd(a: UiArgs) -> anyhow::Result<ExitCode> {
    if !(a.sql_timeout > 0.0 && a.sql_timeout.is_finite()) {
        bail!("--sql-timeout must be a number of seconds > 0");
    }
    let limits = crate::ui::api::SqlLimits {
        timeout: Duration::from_secs_f64(a.sql_timeout),
        memory: usize::try_from(crate::limits::parse_size(&a.sql_memory).map_err(|_| {
            anyhow::anyhow!(
                "--sql-memory {:?}: expected a size, e.g. 512M",
                a.sql_memory
            )
        })?)
        .unwrap_or(usize::MAX),
    };
    let token = a.token.clone().or_else(ui_token_from_env);
    let listener = crate::ui::bind(a.listen).await?;
    let settings = ui_settings(&listener, token, &a.allow_host, limits)?;
    // The first line says where; tests and scripts read it.
    println!(
        "dashboard on {} (runs: {})",
        settings.access.url(),
        a.runs.display()
    );
    std::io::stdout().flush()?;
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    crate::ui::serve(listener, a.runs, settings, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// `CIFAR_DF_UI_TOKEN`, when set and not empty.
fn ui_token_from_env() -> Option<String> {
    std::env::var(crate::ui::guard::TOKEN_ENV)
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// The dashboard's settings on `listener`'s address: beyond loopback a token is needed (a
/// random one where none was given), said once on stderr with how to reach it safely.
fn ui_settings(
    listener: &tokio::net::TcpListener,
    token: Option<String>,
    allow_hosts: &[String],
    limits: crate::ui::api::SqlLimits,
) -> anyhow::Result<crate::ui::Settings> {
    let addr = listener.local_addr()?;
    let access = crate::ui::guard::Access::new(addr, token, allow_hosts)?;
    if !crate::ui::is_loopback(&addr) {
        eprintln!(
            "note: the dashboard listens on {addr}, beyond this machine: every request needs \
             its token (in the address printed; from another machine put this machine's name \
             in place of 127.0.0.1). The traffic is not encrypted: prefer 127.0.0.1 and an \
             SSH tunnel (ssh -L 8080:127.0.0.1:8080 HOST)."
        );
    }
    Ok(crate::ui::Settings { access, limits })
}

async fn worker_cmd(a: WorkerArgs) -> anyhow::Result<ExitCode> {
    let extractor = bound_extractor(a.extractor.as_deref(), a.node.as_deref(), Path::new("runs"))?;
    let secret = a.secret.resolve()?;
    let listener = crate::distributed::bind(&a.listen, secret.as_ref(), a.insecure).await?;
    let addr = listener
        .local_addr()
        .with_context(|| format!("worker: listening on {}", a.listen))?;
    match &secret {
        Some(s) => eprintln!(
            "worker: every call must present the shared secret (from {})",
            s.from()
        ),
        None => eprintln!("worker: no secret: every call is taken"),
    }
    eprintln!(
        "worker listening on http://{addr} ({})",
        crate::distributed::version(extractor.as_deref())
    );
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    crate::distributed::serve(listener, extractor, secret, shutdown).await?;
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
    let asked = a
        .image_size
        .or(cfg.image_size)
        .map(crate::dataset::check_side)
        .transpose()?;
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
            None => {
                let (e, note) = crate::features::fit_patches(
                    &cfg.patch_params()?.unwrap_or_default(),
                    &data,
                    asked.unwrap_or(crate::dataset::SIDE),
                )?;
                eprintln!("{note}");
                e
            }
        };
        if let Some(s) = asked {
            e.check_side(s)?;
        }
        e.save(&ex_dir)?;
        e
    };
    // The side asked for, else a resumed job's or the extractor's own, else CIFAR's.
    let recorded = cache::recorded_side(&a.out)?.or(extractor.image_side());
    let side = match (asked, recorded) {
        (Some(s), Some(r)) if s != r => bail!(
            "{} holds features of images of {r}x{r}; --image-size {s} differs (write to a new \
             --out)",
            a.out.display()
        ),
        (Some(s), _) => {
            extractor.check_side(s)?;
            s
        }
        (None, Some(s)) => s,
        (None, None) => crate::dataset::SIDE,
    };
    cache::record_side(&a.out, side)?;
    let bar = crate::progress::spinner(progress, "{spinner} features {msg} [{elapsed}]");
    let bar2 = bar.clone();
    let t = Instant::now();
    let mut opts = CacheOptions {
        data,
        out: a.out.clone(),
        flip: a.flip,
        rows_per_part: a.rows_per_part,
        batch_size: a.batch_size,
        image_side: side,
        on_part: Some(Box::new(move |split, done, n| {
            bar2.set_message(format!("{split} {done}/{n} images"))
        })),
    };
    let summary = match &workers {
        Some((urls, connect)) => {
            crate::distributed::features::write_cache_on_workers(
                &extractor, &mut opts, urls, connect,
            )
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
