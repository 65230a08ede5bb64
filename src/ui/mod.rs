//! `cifar-df ui`: a live dashboard of the runs folder, served from the binary itself.
//!
//! The page (`assets/`, embedded with `include_str!`; uPlot vendored, MIT) asks the JSON
//! endpoints of [`api`] for the runs, their curves (downsampled on the server: the minimum
//! and maximum of each pixel bucket), test results and SQL, and holds one server-sent event
//! stream (`/api/events`) that says when the runs folder changed, so new batches appear
//! without a reload. Every answer is read from the run tables as they are on disk: a run
//! half written or being compacted is read as far as it can be, never a failed page.

pub mod api;
pub mod gallery;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
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
}

const INDEX: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const UPLOT_JS: &str = include_str!("assets/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("assets/uPlot.min.css");
const UPLOT_LICENSE: &str = include_str!("assets/uPlot.LICENSE");

/// The dashboard's routes over `runs`.
pub fn router(runs: PathBuf) -> Router {
    let state = Arc::new(Ui {
        runs,
        images: gallery::ImageCache::default(),
        results: api::TestResults::default(),
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
        .route("/api/sql", post(sql_handler))
        .route("/api/sql.csv", get(sql_csv_handler))
        .route("/api/events", get(events_handler))
        .with_state(state)
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

/// Serves the dashboard over `runs` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    runs: PathBuf,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    axum::serve(listener, router(runs))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| Error::io("ui server", e))
}

/// A JSON answer, or a 400 with the error's text (shown by the page; never a 500).
fn json_or_400(r: Result<serde_json::Value>) -> Response {
    match r {
        Ok(v) => ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response(),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::json!({ "error": e.to_string() }).to_string(),
        )
            .into_response(),
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

async fn sql_handler(State(ui): State<Arc<Ui>>, body: String) -> Response {
    json_or_400(api::sql_json(&ui.runs, &body).await)
}

async fn sql_csv_handler(State(ui): State<Arc<Ui>>, Query(q): Query<api::SqlQuery>) -> Response {
    match api::sql_csv(&ui.runs, &q.q).await {
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
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
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
