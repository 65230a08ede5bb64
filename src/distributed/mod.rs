//! Scale-out: SQL and the feature job over workers, on `datafusion-distributed`.
//!
//! A **worker** ([`serve`], `cifar-df worker`) is a gRPC (Arrow Flight) server that runs
//! parts of a query's plan. Its sessions have cifar-df's functions registered: the image
//! functions of [`crate::transforms`], `extract_features_from(dir, stamp, width, image)`
//! (an extractor found by path, see [`crate::features::udf`]), and, where the worker was
//! started with `--extractor`, `extract_features(image)`. Plans travel between machines as
//! protobuf and name a function by its name only, so a function's state (an extractor's
//! fitted tensors) never rides with the plan: it is read from a path every worker sees.
//!
//! The **coordinator** ([`session`]) is any cifar-df command given `--workers`: it plans
//! the query, splits its Parquet scans into tasks (by row group) over the workers that
//! answer, and gathers the result as Arrow. [`check_workers`] asks each worker for its
//! version first: a worker that does not answer is left out with a warning, one with
//! other functions (another cifar-df version, another extractor) is refused. The engine
//! does not retry a task whose worker is lost, so [`collect`] does: it asks again which
//! workers answer and runs the query again on those.
//!
//! **Who may send work** ([`auth`]): workers and coordinators share a secret
//! (`--secret-file` or `CIFAR_DF_SECRET`); every call carries an HMAC of its time under it,
//! and a worker with a secret refuses calls without a valid one. A worker beyond loopback
//! needs a secret, or `--insecure`. Workers refuse plans that write files.

pub mod auth;
pub mod features;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::record_batch::RecordBatch;
use datafusion::execution::{FunctionRegistry, SessionState, SessionStateBuilder};
use datafusion::logical_expr::ScalarUDF;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion_distributed::{
    grpc, DistributedExt, GetWorkerInfoRequest, SessionStateBuilderExt, Worker, WorkerQueryContext,
    WorkerResolver,
};
use url::Url;

use crate::error::{Error, Result};
use crate::features::Extractor;

pub use auth::{Secret, SECRET_ENV};

/// The port `cifar-df worker` listens on unless told.
pub const DEFAULT_PORT: u16 = 50051;

/// The workers of `--workers`: `HOST:PORT` or `http://HOST:PORT`, comma-separated.
pub fn parse_workers(list: &str) -> Result<Vec<Url>> {
    let mut urls: Vec<Url> = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let text = if item.contains("://") {
            item.to_string()
        } else {
            format!("http://{item}")
        };
        let url = Url::parse(&text).map_err(|e| {
            Error::usage(format!(
                "--workers: {item:?} is not a worker address (HOST:PORT or http://HOST:PORT): {e}"
            ))
        })?;
        if url.scheme() != "http" || url.host_str().is_none() || url.port().is_none() {
            return Err(Error::usage(format!(
                "--workers: {item:?} is not a worker address (HOST:PORT or http://HOST:PORT, \
                 with the port)"
            )));
        }
        if !urls.contains(&url) {
            urls.push(url);
        }
    }
    if urls.is_empty() {
        return Err(Error::usage("--workers: no worker address given"));
    }
    Ok(urls)
}

/// `HOST:PORT` of a worker, for messages.
pub fn name(url: &Url) -> String {
    format!(
        "{}:{}",
        url.host_str().unwrap_or("?"),
        url.port_or_known_default().unwrap_or(0)
    )
}

/// The version a worker reports, and a coordinator expects: cifar-df's version and the
/// extractor bound to `extract_features`, by stamp. Workers whose version differs run
/// other functions under the same names and are refused.
pub fn version(extractor: Option<&Extractor>) -> String {
    format!(
        "cifar-df {}; extract_features: {}",
        env!("CARGO_PKG_VERSION"),
        extractor.map_or_else(|| "none".to_string(), Extractor::stamp)
    )
}

/// Which worker versions a command accepts.
#[derive(Clone, Debug)]
pub struct Expect {
    version: String,
    any_extractor: bool,
}

impl Expect {
    /// Exactly `version` (a query that may call `extract_features`).
    pub fn exactly(version: String) -> Self {
        Expect {
            version,
            any_extractor: false,
        }
    }

    /// This cifar-df, with any extractor bound (a job that calls only functions found by
    /// path).
    pub fn same_cifar_df() -> Self {
        Expect {
            version: version(None),
            any_extractor: true,
        }
    }

    fn accepts(&self, got: &str) -> bool {
        if self.any_extractor {
            got.split(';').next() == self.version.split(';').next()
        } else {
            got == self.version
        }
    }
}

/// cifar-df's functions for a distributed session: the image functions (seed 0, as in
/// `cifar-df query`), `extract_features_from`, and `extract_features` when bound.
pub fn functions(extractor: Option<Arc<Extractor>>) -> Vec<ScalarUDF> {
    let mut f = crate::transforms::udfs(0);
    f.push(crate::features::udf::from_udf());
    if let Some(e) = extractor {
        f.push(crate::features::udf::udf(e));
    }
    f
}

/// Adds `udfs` to a built session (next to DataFusion's own functions).
fn with_functions(
    mut state: SessionState,
    udfs: &[ScalarUDF],
) -> datafusion::error::Result<SessionState> {
    for f in udfs {
        state.register_udf(Arc::new(f.clone()))?;
    }
    Ok(state)
}

/// Serves as a worker on `listener` until `shutdown` completes. With a `secret`, every
/// call must carry its header ([`auth::Gate`]), and the worker's own calls to other
/// workers (shuffles) carry it; plans that write are refused either way.
pub async fn serve(
    listener: tokio::net::TcpListener,
    extractor: Option<Arc<Extractor>>,
    secret: Option<Secret>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let addr = listener.local_addr().ok();
    let version = version(extractor.as_deref());
    let udfs = Arc::new(functions(extractor));
    let channels = auth::Channels::new(secret.clone());
    let worker = Worker::from_session_builder(move |ctx: WorkerQueryContext| {
        let udfs = Arc::clone(&udfs);
        let channels = channels.clone();
        async move {
            tracing::info!("running a task of a query");
            let state = ctx
                .builder
                .with_distributed_channel_resolver(channels)
                .with_distributed_worker_plan_rewrite_handler(auth::refuse_writing_plans)
                .build();
            with_functions(state, &udfs)
        }
    })
    .with_version(version);
    tonic::transport::Server::builder()
        .layer(tonic::service::InterceptorLayer::new(auth::Gate::new(
            secret,
        )))
        .add_service(worker.into_worker_server())
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown,
        )
        .await
        .map_err(|e| Error::Worker {
            what: format!(
                "worker on {}",
                addr.map_or_else(|| "?".into(), |a| a.to_string())
            ),
            reason: e.to_string(),
        })
}

/// Binds a worker's listener on `listen` (`IP:PORT`). Beyond loopback, a worker needs a
/// `secret`: without one it refuses to start, unless `insecure`, and then says aloud that it
/// runs any query it is sent and reads any file its user can.
pub async fn bind(
    listen: &str,
    secret: Option<&Secret>,
    insecure: bool,
) -> Result<tokio::net::TcpListener> {
    let addr: SocketAddr = listen.parse().map_err(|e| {
        Error::usage(format!(
            "--listen {listen:?}: expected IP:PORT, e.g. 127.0.0.1:{DEFAULT_PORT} ({e})"
        ))
    })?;
    if !addr.ip().is_loopback() {
        match (secret, insecure) {
            (Some(s), _) => tracing::info!(
                "the worker on {addr} is reachable from other machines; it takes only calls \
                 made with the shared secret ({}); the traffic itself is not encrypted",
                s.from()
            ),
            (None, false) => {
                return Err(Error::usage(format!(
                    "worker: --listen {addr} is reachable from other machines, and this worker \
                     has no secret: anyone who reaches it could run queries that read any file \
                     this user can. Set {SECRET_ENV} or --secret-file FILE (the same on the \
                     commands that use it), or pass --insecure on a network you trust"
                )))
            }
            (None, true) => tracing::warn!(
                "the worker on {addr} is reachable from other machines: it runs any query sent to it \
                 and reads any file this user can, with no authentication (--insecure); keep it on a \
                 trusted network, or set {SECRET_ENV} / --secret-file"
            ),
        }
    }
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Net {
            what: format!("worker: listening on {addr}"),
            source: e,
        })
}

/// Tasks a stage may give each worker.
///
/// The planner makes at most one task per listed address and runs a plan of one task in
/// the coordinator itself, so one worker listed once would never be sent anything. Each
/// worker is listed this many times (interleaved: the tasks go round the list), so a single
/// worker still runs the query, and a stage over many files is cut into this many tasks
/// per worker; each task runs its partitions on all the worker's cores.
pub const TASKS_PER_WORKER: usize = 2;

/// The workers a query runs on (those that answered [`check_workers`]).
#[derive(Clone)]
struct Workers(Vec<Url>);

impl WorkerResolver for Workers {
    fn get_urls(&self) -> datafusion::error::Result<Vec<Url>> {
        Ok((0..TASKS_PER_WORKER)
            .flat_map(|_| self.0.iter().cloned())
            .collect())
    }
}

/// How a coordinator reaches its workers: how long to wait for each one's answer, and the
/// secret its calls present (none: they carry no header).
#[derive(Clone, Debug)]
pub struct Connect {
    /// The wait for each worker's answer to the version check.
    pub timeout: Duration,
    /// The workers' shared secret.
    pub secret: Option<Secret>,
}

impl Connect {
    /// Waits `timeout` for each worker; presents `secret`.
    pub fn new(timeout: Duration, secret: Option<Secret>) -> Self {
        Connect { timeout, secret }
    }
}

/// A coordinating session: queries are planned here and run on `workers`, with
/// cifar-df's functions (and `extract_features` bound to `extractor`) on both sides, every
/// call presenting `secret`. Files named in queries are tables, as in
/// [`crate::query::session`]; each Parquet file or row group can be a task of its own.
pub fn session(
    workers: &[Url],
    extractor: Option<Arc<Extractor>>,
    secret: Option<&Secret>,
) -> Result<SessionContext> {
    let config = SessionConfig::new().with_information_schema(true);
    let state = SessionStateBuilder::new()
        .with_default_features()
        .with_config(config)
        .with_distributed_worker_resolver(Workers(workers.to_vec()))
        .with_distributed_channel_resolver(auth::Channels::new(secret.cloned()))
        .with_distributed_planner()
        .with_distributed_file_scan_config_bytes_per_partition(1)?
        .build();
    let state = with_functions(state, &functions(extractor))?;
    Ok(SessionContext::from(state).enable_url_table())
}

/// A worker's answer to the version check.
enum Answer {
    /// Its version.
    Version(String),
    /// No answer: why.
    Down(String),
    /// It refused the call for its secret: what it said.
    Refused(String),
}

/// Asks the worker at `url` for its version, within `connect.timeout`, presenting
/// `connect.secret`.
async fn ask(url: &Url, connect: &Connect) -> Answer {
    let channels = auth::Channels::new(connect.secret.clone());
    let call = async {
        let channel = channels
            .channel(url)
            .await
            .map_err(|e| Answer::Down(first_line(&e.to_string())))?;
        let mut client = grpc::create_worker_client(channel);
        client
            .get_worker_info(GetWorkerInfoRequest {})
            .await
            .map(|r| r.version)
            .map_err(|e| match auth::refusal(&e) {
                Some(said) => Answer::Refused(said),
                None => Answer::Down(first_line(&e.to_string())),
            })
    };
    match tokio::time::timeout(connect.timeout, call).await {
        Ok(Ok(v)) => Answer::Version(v),
        Ok(Err(a)) => a,
        Err(_) => Answer::Down(format!(
            "no answer in {:.0} s",
            connect.timeout.as_secs_f64()
        )),
    }
}

/// The error for a worker that refused this command's secret (or its lack of one).
fn refused(url: &Url, said: &str, connect: &Connect) -> Error {
    let fix = match &connect.secret {
        None => format!(
            "this command has no secret: set {SECRET_ENV} or --secret-file FILE to the \
             worker's secret"
        ),
        Some(s) => format!(
            "this command's secret (from {}) is not the worker's, or the clocks differ by \
             more than {} s: set the same {SECRET_ENV} or --secret-file as the worker",
            s.from(),
            auth::MAX_SKEW_SECS
        ),
    };
    // The worker says `cifar-df worker: wrong or missing secret: WHY (set …)`: keep WHY.
    let why = said
        .split_once(&format!("{}: ", auth::REFUSED))
        .map_or(said, |(_, rest)| {
            rest.split(" (set the same").next().unwrap_or(rest)
        });
    Error::Worker {
        what: format!("worker {}", name(url)),
        reason: format!("refuses this command: the secret is wrong or missing ({why}); {fix}"),
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_string()
}

/// The workers of `urls` that answer with the `expected` version. One that does not
/// answer is left out with a warning naming it; one with another version is an error
/// (it would run other functions under the same names), and so is one that refuses the
/// secret; none answering is an error.
pub async fn check_workers(urls: &[Url], expected: &Expect, connect: &Connect) -> Result<Vec<Url>> {
    let answers = futures::future::join_all(urls.iter().map(|u| ask(u, connect))).await;
    let mut up = Vec::new();
    let mut down = Vec::new();
    for (url, answer) in urls.iter().zip(answers) {
        match answer {
            Answer::Version(v) if expected.accepts(&v) => up.push(url.clone()),
            Answer::Refused(said) => return Err(refused(url, &said, connect)),
            Answer::Version(v) => {
                return Err(Error::Worker {
                    what: format!("worker {}", name(url)),
                    reason: format!(
                        "runs {v:?}, this command needs {:?} (start it with the same \
                         cifar-df and the same --extractor)",
                        expected.version
                    ),
                })
            }
            Answer::Down(e) => {
                tracing::warn!("worker {} does not answer ({e}); left out", name(url));
                down.push(format!("{} ({e})", name(url)));
            }
        }
    }
    if up.is_empty() {
        return Err(Error::Worker {
            what: "no worker answers".into(),
            reason: down.join(", "),
        });
    }
    Ok(up)
}

/// Runs a query on the workers again and again until it succeeds, or fails with every
/// worker still answering: after each failure the workers are asked again, the lost ones
/// are left out (with a warning naming them) and `attempt` runs on the others. `attempt`
/// gets the workers to use; the result of the first success is returned.
pub async fn with_retries<T, F, Fut>(
    urls: &[Url],
    expected: &Expect,
    connect: &Connect,
    mut attempt: F,
) -> Result<T>
where
    F: FnMut(Vec<Url>) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut workers = check_workers(urls, expected, connect).await?;
    loop {
        let err = match attempt(workers.clone()).await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let answer = futures::future::join_all(workers.iter().map(|u| ask(u, connect))).await;
        let mut still: Vec<Url> = Vec::new();
        for (url, a) in workers.iter().zip(answer) {
            match a {
                Answer::Version(v) if expected.accepts(&v) => still.push(url.clone()),
                // Restarted with another secret: not lost, misconfigured.
                Answer::Refused(said) => return Err(refused(url, &said, connect)),
                _ => {}
            }
        }
        if still.len() == workers.len() {
            // Every worker is there: the query itself failed.
            return Err(err);
        }
        let lost: Vec<String> = workers
            .iter()
            .filter(|u| !still.contains(u))
            .map(name)
            .collect();
        if still.is_empty() {
            return Err(Error::Worker {
                what: format!("lost worker {} during the query", lost.join(", ")),
                reason: format!(
                    "no worker is left to run it ({})",
                    first_line(&err.to_string())
                ),
            });
        }
        tracing::warn!(
            "lost worker {} during the query ({}); running it again on {}",
            lost.join(", "),
            first_line(&err.to_string()),
            still.iter().map(name).collect::<Vec<_>>().join(", ")
        );
        workers = still;
    }
}

/// Runs `sql` on the workers (with [`with_retries`]) and collects its result. `prepare`
/// registers tables on each attempt's session (the run tables).
pub async fn collect(
    urls: &[Url],
    extractor: Option<Arc<Extractor>>,
    connect: &Connect,
    prepare: &(dyn Fn(&SessionContext) -> Result<()> + Sync),
    sql: &str,
) -> Result<Vec<RecordBatch>> {
    let expected = Expect::exactly(version(extractor.as_deref()));
    with_retries(urls, &expected, connect, |workers| {
        let extractor = extractor.clone();
        async move {
            let ctx = session(&workers, extractor, connect.secret.as_ref())?;
            prepare(&ctx)?;
            crate::query::run(&ctx, sql).await
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_addresses_parse_with_or_without_the_scheme() {
        let w = parse_workers("127.0.0.1:5000, http://node2:6000,127.0.0.1:5000").unwrap();
        assert_eq!(
            w.iter().map(name).collect::<Vec<_>>(),
            ["127.0.0.1:5000", "node2:6000"]
        );
        for bad in [
            "",
            "node2",
            "https://node2:5000",
            "127.0.0.1:notaport",
            "http://:5000",
        ] {
            let e = parse_workers(bad).unwrap_err().to_string();
            assert!(e.contains("--workers"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_version_names_the_bound_extractor() {
        assert!(version(None).ends_with("extract_features: none"));
        assert!(version(None).starts_with(&format!("cifar-df {}", env!("CARGO_PKG_VERSION"))));
    }

    fn secret(s: &str) -> Secret {
        Secret::new(s.as_bytes(), "test").unwrap()
    }

    /// A worker served in this process on 127.0.0.1 (stopped when the sender drops).
    async fn start(secret: Option<Secret>) -> (Url, tokio::sync::oneshot::Sender<()>) {
        let listener = bind("127.0.0.1:0", secret.as_ref(), false).await.unwrap();
        let url = Url::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, None, secret, async {
            let _ = rx.await;
        }));
        (url, tx)
    }

    fn connect(secret: Option<Secret>) -> Connect {
        Connect::new(Duration::from_secs(10), secret)
    }

    #[tokio::test]
    async fn a_worker_with_a_secret_answers_only_calls_made_with_it() {
        let (url, _stop) = start(Some(secret("s3cret"))).await;
        let right = connect(Some(secret("s3cret\n")));
        assert!(matches!(ask(&url, &right).await, Answer::Version(v) if v == version(None)));
        let expect = Expect::same_cifar_df();
        assert_eq!(
            check_workers(std::slice::from_ref(&url), &expect, &right)
                .await
                .unwrap(),
            std::slice::from_ref(&url)
        );
        for (who, c) in [
            ("none", connect(None)),
            ("wrong", connect(Some(secret("guess")))),
        ] {
            let Answer::Refused(said) = ask(&url, &c).await else {
                panic!("{who}: not refused");
            };
            assert!(said.contains(auth::REFUSED), "{who}: {said}");
            // Not "does not answer; left out": an error naming the worker and the secret.
            let e = check_workers(std::slice::from_ref(&url), &expect, &c)
                .await
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("worker {}", name(&url)))
                    && e.contains("secret is wrong or missing")
                    && e.contains(SECRET_ENV),
                "{who}: {e}"
            );
        }
        // A worker without a secret takes calls with or without one.
        let (open, _stop2) = start(None).await;
        for c in [connect(None), right] {
            assert!(matches!(ask(&open, &c).await, Answer::Version(_)));
        }
    }

    #[tokio::test]
    async fn a_worker_beyond_loopback_needs_a_secret_or_insecure() {
        let e = bind("0.0.0.0:0", None, false)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("0.0.0.0")
                && e.contains(SECRET_ENV)
                && e.contains("--secret-file")
                && e.contains("--insecure"),
            "{e}"
        );
        bind("0.0.0.0:0", None, true).await.unwrap();
        bind("0.0.0.0:0", Some(&secret("s")), false).await.unwrap();
        bind("127.0.0.1:0", None, false).await.unwrap();
    }

    /// A plan that writes, sent over gRPC as a coordinator would (with the right secret),
    /// is refused before it runs; a plan that reads is taken.
    #[tokio::test]
    async fn a_worker_refuses_a_plan_that_writes_and_writes_nothing() {
        use datafusion::physical_plan::metrics::ExecutionPlanMetricsSet;
        use datafusion::physical_plan::ExecutionPlan;
        use datafusion_distributed::{MaybeEncoded, SetPlanRequest, TaskKey};
        use futures::StreamExt;

        let s = secret("s3cret");
        let (url, _stop) = start(Some(s.clone())).await;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("pwned.csv");
        let ctx = SessionContext::new();
        let plan = |sql: String| {
            let ctx = ctx.clone();
            async move {
                ctx.sql(&sql)
                    .await
                    .unwrap()
                    .create_physical_plan()
                    .await
                    .unwrap()
            }
        };
        let copy = plan(format!(
            "COPY (select 1 as x) TO '{}' STORED AS CSV",
            out.display()
        ))
        .await;
        let select = plan("select 1 as x".into()).await;
        let channels = auth::Channels::new(Some(s));
        let send = |plan: Arc<dyn ExecutionPlan>, n: u128| {
            let (channels, url, task_ctx) = (channels.clone(), url.clone(), ctx.task_ctx());
            async move {
                let mut client = grpc::create_worker_client(channels.channel(&url).await.unwrap());
                let request = SetPlanRequest {
                    task_key: TaskKey {
                        query_id: uuid::Uuid::from_u128(n),
                        stage_id: 1,
                        task_number: 0,
                    },
                    task_count: 1,
                    plan: MaybeEncoded::Decoded(plan),
                    work_unit_feed_declarations: Vec::new(),
                    target_worker_url: url.clone(),
                    query_start_time_ns: 0,
                };
                client
                    .coordinator_channel(
                        Default::default(),
                        request,
                        futures::stream::pending().boxed(),
                        ExecutionPlanMetricsSet::new(),
                        &task_ctx,
                    )
                    .await
                    .map(|_| ())
            }
        };
        let e = send(copy, 1).await.unwrap_err().to_string();
        assert!(
            e.contains("workers only read") && e.contains("DataSinkExec"),
            "{e}"
        );
        send(select, 2).await.unwrap();
        assert!(!out.exists(), "the worker wrote {}", out.display());
    }
}
