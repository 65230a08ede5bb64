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

/// Serves as a worker on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    extractor: Option<Arc<Extractor>>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let addr = listener.local_addr().ok();
    let version = version(extractor.as_deref());
    let udfs = Arc::new(functions(extractor));
    let worker = Worker::from_session_builder(move |ctx: WorkerQueryContext| {
        let udfs = Arc::clone(&udfs);
        async move {
            tracing::info!("running a task of a query");
            with_functions(ctx.builder.build(), &udfs)
        }
    })
    .with_version(version);
    tonic::transport::Server::builder()
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

/// Binds a worker's listener on `listen` (`IP:PORT`). Anything but loopback is said
/// aloud: a worker runs any query it is sent, reads any file its user can, and has no
/// authentication.
pub async fn bind(listen: &str) -> Result<tokio::net::TcpListener> {
    let addr: SocketAddr = listen.parse().map_err(|e| {
        Error::usage(format!(
            "--listen {listen:?}: expected IP:PORT, e.g. 127.0.0.1:{DEFAULT_PORT} ({e})"
        ))
    })?;
    if !addr.ip().is_loopback() {
        tracing::warn!(
            "the worker on {addr} is reachable from other machines: it runs any query sent to it \
             and reads any file this user can, with no authentication; keep it on a trusted network"
        );
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

/// A coordinating session: queries are planned here and run on `workers`, with
/// cifar-df's functions (and `extract_features` bound to `extractor`) on both sides.
/// Files named in queries are tables, as in [`crate::query::session`]; each Parquet file
/// or row group can be a task of its own.
pub fn session(workers: &[Url], extractor: Option<Arc<Extractor>>) -> Result<SessionContext> {
    let config = SessionConfig::new().with_information_schema(true);
    let state = SessionStateBuilder::new()
        .with_default_features()
        .with_config(config)
        .with_distributed_worker_resolver(Workers(workers.to_vec()))
        .with_distributed_planner()
        .with_distributed_file_scan_config_bytes_per_partition(1)?
        .build();
    let state = with_functions(state, &functions(extractor))?;
    Ok(SessionContext::from(state).enable_url_table())
}

/// Asks the worker at `url` for its version, within `timeout`.
async fn ask(url: &Url, timeout: Duration) -> std::result::Result<String, String> {
    let resolver = grpc::DefaultChannelResolver::default();
    let call = async {
        let channel = resolver
            .get_channel(url)
            .await
            .map_err(|e| first_line(&e.to_string()))?;
        let mut client = grpc::create_worker_client(channel);
        client
            .get_worker_info(GetWorkerInfoRequest {})
            .await
            .map(|r| r.version)
            .map_err(|e| first_line(&e.to_string()))
    };
    match tokio::time::timeout(timeout, call).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer in {:.0} s", timeout.as_secs_f64())),
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_string()
}

/// The workers of `urls` that answer with the `expected` version. One that does not
/// answer is left out with a warning naming it; one with another version is an error
/// (it would run other functions under the same names); none answering is an error.
pub async fn check_workers(urls: &[Url], expected: &Expect, timeout: Duration) -> Result<Vec<Url>> {
    let answers = futures::future::join_all(urls.iter().map(|u| ask(u, timeout))).await;
    let mut up = Vec::new();
    let mut down = Vec::new();
    for (url, answer) in urls.iter().zip(answers) {
        match answer {
            Ok(v) if expected.accepts(&v) => up.push(url.clone()),
            Ok(v) => {
                return Err(Error::Worker {
                    what: format!("worker {}", name(url)),
                    reason: format!(
                        "runs {v:?}, this command needs {:?} (start it with the same \
                         cifar-df and the same --extractor)",
                        expected.version
                    ),
                })
            }
            Err(e) => {
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
    timeout: Duration,
    mut attempt: F,
) -> Result<T>
where
    F: FnMut(Vec<Url>) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut workers = check_workers(urls, expected, timeout).await?;
    loop {
        let err = match attempt(workers.clone()).await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let answer = futures::future::join_all(workers.iter().map(|u| ask(u, timeout))).await;
        let still: Vec<Url> = workers
            .iter()
            .zip(answer)
            .filter(|(_, a)| a.as_deref().is_ok_and(|v| expected.accepts(v)))
            .map(|(u, _)| u.clone())
            .collect();
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
    timeout: Duration,
    prepare: &(dyn Fn(&SessionContext) -> Result<()> + Sync),
    sql: &str,
) -> Result<Vec<RecordBatch>> {
    let expected = Expect::exactly(version(extractor.as_deref()));
    with_retries(urls, &expected, timeout, |workers| {
        let extractor = extractor.clone();
        async move {
            let ctx = session(&workers, extractor)?;
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
}
