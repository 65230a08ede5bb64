//! `cifar-df ui`: a live dashboard of the runs folder, served from the binary itself.
//!
//! The page (`assets/`, embedded with `include_str!`; uPlot vendored, MIT) asks the JSON
//! endpoints of [`api`] for the runs, their curves (downsampled on the server: the minimum
//! and maximum of each pixel bucket), test results and SQL, and holds one server-sent event
//! stream (`/api/events`) that says when the runs folder changed, so new batches appear
//! without a reload. Every answer is read from the run tables as they are on disk: a run
//! half written or being compacted is read as far as it can be, never a failed page.
//!
//! The server only reads: its SQL is planned read-only (no `COPY … TO`, DDL or `SET`),
//! within a time and memory limit, and sent by POST as JSON (which a page of another site
//! cannot do without asking first); [`guard`] refuses requests from other sites and, beyond
//! loopback, requests without the token.

pub mod api;
pub mod gallery;
pub mod guard;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::Stream;

use crate::error::{Error, Result};

/// How often the event stream looks at the runs folder.
pub const POLL: Duration = Duration::from_millis(500);

/// What every handler shares.
#[derive(Debug)]
pub struct Ui {
    /// The runs folder.
    pub runs: PathBuf,
    /// The split whose images the gallery shows, loaded once.
    pub images: gallery::ImageCache,
    /// Each run's test results, read again when its `eval_metrics` change.
    pub results: api::TestResults,
    /// What the SQL box's queries may spend.
    pub limits: api::SqlLimits,
    /// One SQL box query at a time: a second waits (within the time limit).
    pub sql_turn: tokio::sync::Semaphore,
}

/// How a dashboard is served: who may use it and what its SQL may spend.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Who may use it.
    pub access: guard::Access,
    /// The SQL box's limits.
    pub limits: api::SqlLimits,
}

const INDEX: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");
const UPLOT_JS: &str = include_str!("assets/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("assets/uPlot.min.css");
const UPLOT_LICENSE: &str = include_str!("assets/uPlot.LICENSE");

/// The dashboard's routes over `runs`, behind [`guard::guard`].
pub fn router(runs: PathBuf, settings: Settings) -> Router {
    let state = Arc::new(Ui {
        runs,
        images: gallery::ImageCache::default(),
        results: api::TestResults::default(),
        limits: settings.limits,
        sql_turn: tokio::sync::Semaphore::new(1),
    });
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/app.js",
            get(|| async { asset("text/javascript", APP_JS) }),
        )
        .route("/app.css", get(|| async { asset("text/css", APP_CSS) }))
        .route(
            "/uPlot.js",
            get(|| async { asset("text/javascript", UPLOT_JS) }),
        )
        .route("/uPlot.css", get(|| async { asset("text/css", UPLOT_CSS) }))
        .route(
            "/uPlot.LICENSE",
            get(|| async { asset("text/plain; charset=utf-8", UPLOT_LICENSE) }),
        )
        .route("/api/runs", get(runs_handler))
        .route("/api/curves", get(curves_handler))
        .route("/api/results", get(results_handler))
        .route("/api/confusion", get(confusion_handler))
        .route("/api/gallery", get(gallery_handler))
        .route("/api/image", get(image_handler))
        .route("/api/sql", post(sql_handler).get(sql_by_get))
        .route("/api/sql.csv", post(sql_csv_handler).get(sql_by_get))
        .route("/api/events", get(events_handler))
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(settings.access),
            guard::guard,
        ))
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, kind)], body).into_response()
}

/// Binds `listen`; a taken or impossible address is an error naming it.
pub async fn bind(listen: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Error::usage(format!("ui: cannot listen on {listen}: {e}")))
}

/// Serves the dashboard over `runs` on `listener` with `settings` until `shutdown`
/// resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    runs: PathBuf,
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    axum::serve(listener, router(runs, settings))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| Error::io("ui server", e))
}

/// A JSON answer, or a 400 with the error's text (shown by the page; never a 500).
fn json_or_400(r: Result<serde_json::Value>) -> Response {
    match r {
        Ok(v) => ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response(),
        Err(e) => error_response(StatusCode::BAD_REQUEST, &e.to_string()),
    }
}

async fn runs_handler(State(ui): State<Arc<Ui>>, Query(q): Query<api::RunsQuery>) -> Response {
    json_or_400(api::runs(&ui.runs, &q, &ui.results).await)
}

async fn curves_handler(State(ui): State<Arc<Ui>>, Query(q): Query<api::CurvesQuery>) -> Response {
    json_or_400(api::curves(&ui.runs, &q).await)
}

async fn results_handler(State(ui): State<Arc<Ui>>, Query(q): Query<api::RunsQuery>) -> Response {
    json_or_400(api::results(&ui.runs, &q, &ui.results).await)
}

async fn confusion_handler(
    State(ui): State<Arc<Ui>>,
    Query(q): Query<api::ConfusionQuery>,
) -> Response {
    json_or_400(api::confusion(&ui.runs, &q).await)
}

async fn gallery_handler(
    State(ui): State<Arc<Ui>>,
    Query(q): Query<gallery::GalleryQuery>,
) -> Response {
    json_or_400(gallery::gallery(&ui.runs, &ui.images, &q).await)
}

async fn image_handler(
    State(ui): State<Arc<Ui>>,
    Query(q): Query<gallery::ImageQuery>,
) -> Response {
    match gallery::image_png(&ui.runs, &ui.images, &q).await {
        Ok(png) => (
            [
                (header::CONTENT_TYPE, "image/png"),
                (header::CACHE_CONTROL, "max-age=60"),
            ],
            png,
        )
            .into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

/// A refused request: its status and why.
type Refusal = (StatusCode, String);

/// The SQL of a request to the SQL box: a POST whose body is JSON, `{"q": "SQL"}`. Any
/// other content type is refused: a page of another site can send text or a form to this
/// server without asking, but not JSON.
fn sql_of(headers: &HeaderMap, body: &str) -> std::result::Result<String, Refusal> {
    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json_type {
        return Err((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the SQL endpoints take a POST with Content-Type: application/json and the \
             body {\"q\": \"SQL\"}"
                .into(),
        ));
    }
    serde_json::from_str::<api::SqlQuery>(body)
        .map(|q| q.q)
        .map_err(|e| {
            (
                StatusCode::BAD_REQUEST,
                format!("the body is not {{\"q\": \"SQL\"}}: {e}"),
            )
        })
}

fn error_response(status: StatusCode, text: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({ "error": text }).to_string(),
    )
        .into_response()
}

/// SQL in a URL (a link any page can hold) is not run.
async fn sql_by_get() -> Response {
    error_response(
        StatusCode::BAD_REQUEST,
        "SQL is not run from a URL: send a POST with Content-Type: application/json and the \
         body {\"q\": \"SQL\"}",
    )
}

/// The SQL of a request to the SQL box ([`sql_of`]) and its turn: one query at a time, a
/// second waiting within the time limit.
async fn sql_request<'a>(
    ui: &'a Ui,
    headers: &HeaderMap,
    body: &str,
) -> std::result::Result<(String, tokio::sync::SemaphorePermit<'a>), Refusal> {
    let sql = sql_of(headers, body)?;
    match tokio::time::timeout(ui.limits.timeout, ui.sql_turn.acquire()).await {
        Ok(Ok(turn)) => Ok((sql, turn)),
        _ => Err((
            StatusCode::SERVICE_UNAVAILABLE,
            "another query is still running: try again when it is done".into(),
        )),
    }
}

async fn sql_handler(State(ui): State<Arc<Ui>>, headers: HeaderMap, body: String) -> Response {
    match sql_request(&ui, &headers, &body).await {
        Ok((sql, _turn)) => json_or_400(api::sql_json(&ui.runs, &sql, &ui.limits).await),
        Err((status, why)) => error_response(status, &why),
    }
}

async fn sql_csv_handler(State(ui): State<Arc<Ui>>, headers: HeaderMap, body: String) -> Response {
    let (sql, _turn) = match sql_request(&ui, &headers, &body).await {
        Ok(r) => r,
        Err((status, why)) => return error_response(status, &why),
    };
    match api::sql_csv(&ui.runs, &sql, &ui.limits).await {
        Ok(csv) => (
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"query.csv\"",
                ),
            ],
            csv,
        )
            .into_response(),
        Err(e) => error_response(StatusCode::BAD_REQUEST, &e.to_string()),
    }
}

/// One event per change of the runs folder (`data` is a counter), and a keep-alive comment
/// every 15 s. The stream ends when the browser goes: axum drops it, and its timer with it.
async fn events_handler(
    State(ui): State<Arc<Ui>>,
) -> Sse<impl Stream<Item = std::result::Result<Event, Infallible>>> {
    let root = ui.runs.clone();
    let stream = futures::stream::unfold((None, 0u64), move |(last, n)| {
        let root = root.clone();
        async move {
            loop {
                let r = root.clone();
                let now = tokio::task::spawn_blocking(move || api::fingerprint(&r))
                    .await
                    .unwrap_or_default();
                if last.as_ref() != Some(&now) {
                    let event = Event::default().event("change").data((n + 1).to_string());
                    return Some((Ok(event), (Some(now), n + 1)));
                }
                tokio::time::sleep(POLL).await;
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// Whether `addr` is reachable only from this machine.
pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}
