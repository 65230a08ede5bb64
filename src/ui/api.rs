//! The dashboard's data: each endpoint is SQL over the run tables (the engine of
//! `cifar-df query`), shaped as JSON for the page.

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::time::UNIX_EPOCH;

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::datatypes::Int64Type;
use datafusion::arrow::record_batch::RecordBatch;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::query::{self, OutputFormat};
use crate::run::{read, tables};

/// The most rows the SQL box returns as JSON (the CSV download has them all).
pub const SQL_ROWS: usize = 10_000;
/// The most points a curve is drawn with when the page does not say.
pub const DEFAULT_POINTS: usize = 1_000;
/// The most points a page may ask for per curve.
pub const MAX_POINTS: usize = 20_000;

/// The per-batch columns a curve can show.
pub const METRICS: [&str; 16] = [
    "acc",
    "loss",
    "precision",
    "recall",
    "f1",
    "acc_mean",
    "loss_mean",
    "precision_mean",
    "recall_mean",
    "f1_mean",
    "acc_window",
    "loss_window",
    "precision_window",
    "recall_window",
    "f1_window",
    "images_per_s",
];

/// `?filter=REGEX`: the runs whose name matches.
#[derive(Debug, Default, Deserialize)]
pub struct RunsQuery {
    /// A regular expression over run names (empty: every run).
    #[serde(default)]
    pub filter: String,
}

/// `?run=A,B&metric=acc&x=batch&points=800[&from=X&to=X]`.
#[derive(Debug, Default, Deserialize)]
pub struct CurvesQuery {
    /// Run names, comma-separated.
    pub run: String,
    /// One of [`METRICS`]; default `acc`.
    #[serde(default)]
    pub metric: Option<String>,
    /// `batch` (default), `images` (learnt so far) or `time` (ms since the Unix epoch).
    #[serde(default)]
    pub x: Option<String>,
    /// Points per curve, at most [`MAX_POINTS`].
    #[serde(default)]
    pub points: Option<usize>,
    /// Only points with x at or above this (a zoomed view).
    #[serde(default)]
    pub from: Option<f64>,
    /// Only points with x at or below this.
    #[serde(default)]
    pub to: Option<f64>,
}

/// `?run=R&split=test`.
#[derive(Debug, Default, Deserialize)]
pub struct ConfusionQuery {
    /// The run.
    pub run: String,
    /// `test` (default), `train-eval` or `train` (the last epoch).
    #[serde(default)]
    pub split: Option<String>,
}

/// The SQL box's request, `{"q": "SQL"}` (a JSON body).
#[derive(Debug, Default, Deserialize)]
pub struct SqlQuery {
    /// The query.
    pub q: String,
}

pub(crate) use crate::run::read::literal as lit;

/// What the dashboard's queries may spend (see [`query::Limits`]), and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SqlLimits {
    /// Time for one query, from planning to its last row.
    pub timeout: std::time::Duration,
    /// DataFusion's memory pool for one query, in bytes.
    pub memory: usize,
}

impl Default for SqlLimits {
    fn default() -> Self {
        SqlLimits {
            timeout: std::time::Duration::from_secs(30),
            memory: 512 << 20,
        }
    }
}

impl SqlLimits {
    /// The session limits: this memory, on one core (a query beside a training run leaves
    /// it the other).
    fn session(&self) -> Result<datafusion::prelude::SessionContext> {
        query::limited_session(query::Limits {
            memory: self.memory,
            partitions: 1,
        })
    }

    fn timed_out(&self) -> Error {
        Error::usage(format!(
            "the query ran past the dashboard's time limit of {} s (cifar-df ui \
             --sql-timeout; or run it with `cifar-df query` from a shell)",
            self.timeout.as_secs_f64()
        ))
    }
}

/// Runs `sql` over the run tables of `root`, over the runs in `only` alone (all when
/// `None`), read-only and under the default [`SqlLimits`]. A folder that changes under the
/// query (a part renamed by a compaction) can fail one read: it is retried twice on a fresh
/// listing.
pub(crate) async fn sql_over(
    root: &Path,
    sql: &str,
    only: Option<&[&str]>,
) -> Result<Vec<RecordBatch>> {
    read_over(root, only, |ctx| async move {
        query::run_read_only(&ctx, sql).await
    })
    .await
}

/// `read` on a session with the run tables of `root` (of the runs in `only`), under the
/// default [`SqlLimits`] and tried again as [`with_fresh_tables`] says.
async fn read_over<T, F, Fut>(root: &Path, only: Option<&[&str]>, read: F) -> Result<T>
where
    F: FnMut(datafusion::prelude::SessionContext) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let limits = SqlLimits::default();
    let work = with_fresh_tables(root, only, &limits, read);
    tokio::time::timeout(limits.timeout, work)
        .await
        .map_err(|_| limits.timed_out())?
}

/// `attempt` on a session under `limits` with the run tables of `root` (of the runs in
/// `only`) registered, tried up to three times on a fresh listing while it fails in a way
/// a listing can mend ([`is_transient`]: a part renamed by a compaction).
async fn with_fresh_tables<T, F, Fut>(
    root: &Path,
    only: Option<&[&str]>,
    limits: &SqlLimits,
    mut attempt: F,
) -> Result<T>
where
    F: FnMut(datafusion::prelude::SessionContext) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut last = None;
    for round in 0..3 {
        if round > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let ctx = limits.session()?;
        if let Err(e) = tables::register_tables_of(&ctx, root, only) {
            last = Some(e);
            continue;
        }
        match attempt(ctx).await {
            Ok(v) => return Ok(v),
            Err(e) => {
                let transient = is_transient(&e);
                last = Some(e);
                if !transient {
                    break;
                }
            }
        }
    }
    Err(last.unwrap_or_else(|| Error::usage("query failed")))
}

/// Whether a failed read may pass when tried again (a part file replaced under it); a
/// mistake in the query itself will not go away, and is said at once.
fn is_transient(e: &Error) -> bool {
    e.is_transient()
}

/// A query of the SQL box, planned read-only over the run tables, as a stream of batches
/// (tried again as [`with_fresh_tables`] says).
async fn sql_box_stream(
    root: &Path,
    sql_text: &str,
    limits: &SqlLimits,
) -> Result<datafusion::physical_plan::SendableRecordBatchStream> {
    if sql_text.trim().is_empty() {
        return Err(Error::usage("empty query"));
    }
    with_fresh_tables(root, None, limits, |ctx| async move {
        let df = query::plan_read_only(&ctx, sql_text).await?;
        Ok(df.execute_stream().await?)
    })
    .await
}

/// Column `name` of `b` as f64 values (nulls as NaN): [`read::f64_values`].
pub(crate) fn f64_column(b: &RecordBatch, name: &str) -> Result<Vec<f64>> {
    read::f64_values(std::slice::from_ref(b), name)
}

/// Column `name` of `b` as unsigned integers: [`read::u64_values`].
pub(crate) fn int_column(b: &RecordBatch, name: &str) -> Result<Vec<u64>> {
    read::u64_values(std::slice::from_ref(b), name)
}

/// Every run of `root` whose name matches `q.filter`, newest first: its `run.json` and the
/// test accuracy of its last prediction pass. No folder, or an empty one, is no runs (and
/// says so in `note`).
pub async fn runs(root: &Path, q: &RunsQuery, results: &TestResults) -> Result<Value> {
    let filter = regex::Regex::new(&q.filter)
        .map_err(|e| Error::usage(format!("filter {:?}: {e}", q.filter)))?;
    if !root.is_dir() {
        return Ok(json!({ "runs": [], "note": format!("no runs folder {}", root.display()) }));
    }
    let mut infos = tables::read_run_infos(root)?;
    infos.retain(|i| filter.is_match(&i.run));
    infos.sort_by(|a, b| b.start_ms.cmp(&a.start_ms).then(a.run.cmp(&b.run)));
    let names: Vec<String> = infos.iter().map(|i| i.run.clone()).collect();
    let test = results.of(root, &names).await.unwrap_or_default();
    let list: Vec<Value> = infos
        .iter()
        .map(|i| {
            json!({
                "run": i.run,
                "model": i.model,
                "status": i.effective_status(),
                "source": i.source,
                "images": i.images,
                "batches": i.batches,
                "start_ms": i.start_ms,
                "end_ms": i.end_ms,
                "error": i.error,
                "test_acc": test.get(&i.run).and_then(|r| r["acc"].as_f64()),
            })
        })
        .collect();
    let note = if list.is_empty() {
        json!(format!("no runs in {}", root.display()))
    } else {
        Value::Null
    };
    Ok(json!({ "runs": list, "note": note }))
}

/// Keeps at most `points` of the (x, y) series: in each of `points / 2` equal x buckets the
/// first minimum and the first maximum of y, in x order (the extremes a pixel column would
/// show, as W&B does). Where there are no more than `points`, all of them.
pub fn downsample(x: &[f64], y: &[f64], points: usize) -> (Vec<f64>, Vec<f64>) {
    let n = x.len().min(y.len());
    if n <= points || points < 2 {
        return (x[..n].to_vec(), y[..n].to_vec());
    }
    let buckets = points / 2;
    let (lo, hi) = (x[0], x[n - 1]);
    let span = (hi - lo).max(f64::MIN_POSITIVE);
    let (mut ox, mut oy) = (Vec::with_capacity(points), Vec::with_capacity(points));
    let mut i = 0;
    for b in 0..buckets {
        let end = if b + 1 == buckets {
            hi
        } else {
            lo + span * (b + 1) as f64 / buckets as f64
        };
        let start = i;
        while i < n && (x[i] < end || (b + 1 == buckets && x[i] <= end)) {
            i += 1;
        }
        if i == start {
            continue;
        }
        let (mut min, mut max) = (start, start);
        for k in start..i {
            // NaN (a missing value) is neither.
            if y[k] < y[min] || y[min].is_nan() {
                min = k;
            }
            if y[k] > y[max] || y[max].is_nan() {
                max = k;
            }
        }
        let (a, b) = if min <= max { (min, max) } else { (max, min) };
        ox.push(x[a]);
        oy.push(y[a]);
        if b != a {
            ox.push(x[b]);
            oy.push(y[b]);
        }
    }
    (ox, oy)
}

/// The per-batch curve of `q.metric` for each run in `q.run`, downsampled to `q.points`,
/// with the x of each drift alarm and the number of batches in all.
pub async fn curves(root: &Path, q: &CurvesQuery) -> Result<Value> {
    let metric = q.metric.as_deref().unwrap_or("acc");
    if !METRICS.contains(&metric) {
        return Err(Error::usage(format!(
            "metric {metric:?}: expected one of {}",
            METRICS.join(", ")
        )));
    }
    let xaxis = q.x.as_deref().unwrap_or("batch");
    if !["batch", "images", "time"].contains(&xaxis) {
        return Err(Error::usage(format!(
            "x {xaxis:?}: expected batch, images or time"
        )));
    }
    let points = q.points.unwrap_or(DEFAULT_POINTS).clamp(2, MAX_POINTS);
    let mut runs: Vec<&str> = Vec::new();
    for r in q.run.split(',').filter(|r| !r.is_empty()) {
        tables::Run::new(root, r)?;
        if !runs.contains(&r) {
            runs.push(r);
        }
    }
    if runs.is_empty() {
        return Err(Error::usage("run: name at least one run"));
    }
    let column = if metric == "images_per_s" {
        "cast(images as double) / greatest(seconds, 1e-9)".to_string()
    } else {
        metric.to_string()
    };
    // One query for every run asked for (a session per run would list the folder each time).
    let all = sql_over(
        root,
        &format!(
            "select run, batch, images, ts, {column} as y, drift from metrics \
             where run in ({}) and split = 'train' order by run, batch",
            runs.iter().map(|r| lit(r)).collect::<Vec<_>>().join(", ")
        ),
        Some(&runs),
    )
    .await?;
    let mut by_run: std::collections::HashMap<String, Vec<RecordBatch>> =
        std::collections::HashMap::new();
    for b in &all {
        let names = cast(b.column(0), &DataType::Utf8)?;
        let names = names
            .as_any()
            .downcast_ref::<datafusion::arrow::array::StringArray>()
            .ok_or_else(|| Error::usage("run names are not text"))?;
        // Rows are in run order: one slice per run.
        let mut start = 0;
        for i in 1..=b.num_rows() {
            if i == b.num_rows() || names.value(i) != names.value(start) {
                by_run
                    .entry(names.value(start).to_string())
                    .or_default()
                    .push(b.slice(start, i - start));
                start = i;
            }
        }
    }
    let mut out = Vec::new();
    for run in runs {
        let mut batches = by_run.remove(run).unwrap_or_default();
        let committed = batches
            .iter()
            .flat_map(|b| f64_column(b, "batch").unwrap_or_default())
            .fold(-1.0, f64::max);
        batches.extend(live_rows(root, run, committed));
        let (mut x, mut y, mut drift) = (Vec::new(), Vec::new(), Vec::new());
        let mut learnt = 0.0;
        for b in &batches {
            let batch = f64_column(b, "batch")?;
            let images = f64_column(b, "images")?;
            let ts = ts_column(b)?;
            let ys = if b.column_by_name("y").is_some() {
                f64_column(b, "y")?
            } else if metric == "images_per_s" {
                let s = f64_column(b, "seconds")?;
                images.iter().zip(s).map(|(i, s)| i / s.max(1e-9)).collect()
            } else {
                f64_column(b, metric)?
            };
            let alarm = b.column_by_name("drift").and_then(|c| {
                c.as_any()
                    .downcast_ref::<datafusion::arrow::array::BooleanArray>()
                    .cloned()
            });
            for i in 0..b.num_rows() {
                learnt += images[i];
                let xv = match xaxis {
                    "batch" => batch[i],
                    "images" => learnt,
                    _ => ts[i],
                };
                if q.from.is_some_and(|f| xv < f) || q.to.is_some_and(|t| xv > t) {
                    continue;
                }
                if alarm.as_ref().is_some_and(|a| !a.is_null(i) && a.value(i)) {
                    drift.push(xv);
                }
                x.push(xv);
                y.push(ys[i]);
            }
        }
        let total = x.len();
        let (x, y) = downsample(&x, &y, points);
        let y: Vec<Value> = y
            .into_iter()
            .map(|v| if v.is_finite() { json!(v) } else { Value::Null })
            .collect();
        out.push(json!({ "run": run, "x": x, "y": y, "drift": drift, "total": total }));
    }
    Ok(json!({ "metric": metric, "x": xaxis, "curves": out }))
}

/// The rows of a running run's live feed ([`tables::LIVE_FILE`]: learnt, not committed yet)
/// after batch `after`; none for a run that is not running, or a feed that cannot be read
/// (being replaced: the next update has it).
fn live_rows(root: &Path, run: &str, after: f64) -> Vec<RecordBatch> {
    let Ok(r) = tables::Run::new(root, run) else {
        return Vec::new();
    };
    let running = matches!(r.read_info(), Ok(Some(i)) if i.effective_status() == "running");
    let Ok(file) = fs::File::open(r.dir.join(tables::LIVE_FILE)) else {
        return Vec::new();
    };
    if !running {
        return Vec::new();
    }
    let Ok(reader) = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for b in reader.flatten() {
        let Ok(batch) = f64_column(&b, "batch") else {
            continue;
        };
        let keep: datafusion::arrow::array::BooleanArray =
            batch.iter().map(|&v| Some(v > after)).collect();
        if let Ok(kept) = datafusion::arrow::compute::filter_record_batch(&b, &keep) {
            if kept.num_rows() > 0 {
                out.push(kept);
            }
        }
    }
    out
}

/// The `ts` column (milliseconds) as f64.
fn ts_column(b: &RecordBatch) -> Result<Vec<f64>> {
    let col = b
        .column_by_name("ts")
        .ok_or_else(|| Error::usage("query result has no column \"ts\""))?;
    let col = cast(col, &DataType::Int64)?;
    Ok(col
        .as_primitive::<Int64Type>()
        .values()
        .iter()
        .map(|&v| v as f64)
        .collect())
}

/// Per run, the weighted means of its test passes (images, accuracy, loss, macro
/// precision, recall, F1), kept between requests: a run is read again only when its
/// `eval_metrics` folder changed, so a page over hundreds of runs costs a listing of their
/// folders, not a query over all of them, each time one run writes.
#[derive(Debug, Default)]
pub struct TestResults {
    kept: std::sync::Mutex<HashMap<String, (Stamp, Option<Value>)>>,
}

/// A folder's part files: how many, their bytes, the newest modification time.
type Stamp = (u64, u64, u128);

fn folder_stamp(dir: &Path) -> Stamp {
    let mut stamp = (0, 0, 0);
    for f in fs::read_dir(dir).into_iter().flatten().flatten() {
        if let Ok(m) = f.metadata() {
            let t = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            stamp = (stamp.0 + 1, stamp.1 + m.len(), stamp.2.max(t));
        }
    }
    stamp
}

impl TestResults {
    /// The test results of each of `names` that has any.
    pub async fn of(&self, root: &Path, names: &[String]) -> Result<HashMap<String, Value>> {
        let stamps: Vec<Stamp> = names
            .iter()
            .map(|n| folder_stamp(&root.join(n).join("eval_metrics")))
            .collect();
        let stale: Vec<&str> = {
            let kept = self
                .kept
                .lock()
                .map_err(|_| Error::internal("results lock poisoned"))?;
            names
                .iter()
                .zip(&stamps)
                .filter(|(n, s)| kept.get(n.as_str()).is_none_or(|(k, _)| k != *s))
                .map(|(n, _)| n.as_str())
                .collect()
        };
        if !stale.is_empty() {
            let runs = &stale;
            let found = read_over(root, Some(runs), |ctx| async move {
                read::test_scores(&ctx, runs).await
            })
            .await?;
            let mut fresh: HashMap<String, Value> = found
                .into_iter()
                .map(|t| {
                    let row = json!({ "run": &t.run, "images": t.images, "acc": t.acc,
                        "loss": t.loss, "precision": t.precision, "recall": t.recall,
                        "f1": t.f1 });
                    (t.run, row)
                })
                .collect();
            let mut kept = self
                .kept
                .lock()
                .map_err(|_| Error::internal("results lock poisoned"))?;
            for (n, s) in names.iter().zip(&stamps) {
                if stale.contains(&n.as_str()) {
                    kept.insert(n.clone(), (*s, fresh.remove(n)));
                }
            }
        }
        let kept = self
            .kept
            .lock()
            .map_err(|_| Error::internal("results lock poisoned"))?;
        Ok(names
            .iter()
            .filter_map(|n| Some((n.clone(), kept.get(n)?.1.clone()?)))
            .collect())
    }
}

/// Each matching run's test results (see [`TestResults`]), by run name.
pub async fn results(root: &Path, q: &RunsQuery, results: &TestResults) -> Result<Value> {
    let filter = regex::Regex::new(&q.filter)
        .map_err(|e| Error::usage(format!("filter {:?}: {e}", q.filter)))?;
    if !root.is_dir() {
        return Ok(json!({ "results": [] }));
    }
    let mut names: Vec<String> = tables::read_run_infos(root)?
        .into_iter()
        .map(|i| i.run)
        .filter(|n| filter.is_match(n))
        .collect();
    names.sort();
    let found = results.of(root, &names).await?;
    let rows: Vec<Value> = names.iter().filter_map(|n| found.get(n).cloned()).collect();
    Ok(json!({ "results": rows }))
}

/// A run's confusion matrix over a split (`counts[actual][predicted]`), with its class
/// names ([`read::confusion`]).
pub async fn confusion(root: &Path, q: &ConfusionQuery) -> Result<Value> {
    tables::Run::new(root, &q.run)?;
    let split = q.split.as_deref().unwrap_or("test");
    let c = read_over(root, Some(&[q.run.as_str()]), |ctx| async move {
        read::confusion(&ctx, root, &q.run, split).await
    })
    .await?;
    let note = (c.dropped_cells > 0).then(|| {
        format!(
            "{} cells ({} images) name a class outside the run's {} and are left out",
            c.dropped_cells, c.dropped_images, c.bound
        )
    });
    Ok(
        json!({ "run": q.run, "split": split, "classes": c.classes, "counts": c.counts,
        "dropped": c.dropped_images, "note": note }),
    )
}

/// Rows of `batches` as JSON objects.
fn json_rows(batches: &[RecordBatch]) -> Result<Vec<Value>> {
    let text = query::format_batches(batches, OutputFormat::Json)?;
    match serde_json::from_str(&text) {
        Ok(Value::Array(rows)) => Ok(rows),
        Ok(_) => Ok(Vec::new()),
        Err(e) => Err(Error::usage(format!("query result: {e}"))),
    }
}

/// The SQL box: the columns and up to [`SQL_ROWS`] rows of `sql`, how many rows it has in
/// all, and whether there were more. Only reading SQL runs ([`query::read_only`]), within
/// `limits`; rows past the first [`SQL_ROWS`] are counted, not kept.
pub async fn sql_json(root: &Path, sql_text: &str, limits: &SqlLimits) -> Result<Value> {
    use futures::StreamExt;
    let work = async {
        let mut stream = sql_box_stream(root, sql_text, limits).await?;
        let columns: Vec<String> = stream
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let (mut kept, mut total) = (Vec::new(), 0usize);
        while let Some(b) = stream.next().await {
            let b = b?;
            let take = b.num_rows().min(SQL_ROWS.saturating_sub(total));
            if take > 0 {
                kept.push(b.slice(0, take));
            }
            total += b.num_rows();
        }
        Ok::<_, Error>((columns, kept, total))
    };
    let (columns, kept, total) = tokio::time::timeout(limits.timeout, work)
        .await
        .map_err(|_| limits.timed_out())??;
    let rows = json_rows(&kept)?;
    let rows: Vec<Value> = rows
        .into_iter()
        .map(|r| Value::Array(columns.iter().map(|c| r[c].clone()).collect()))
        .collect();
    Ok(json!({ "columns": columns, "rows": rows, "total": total, "truncated": total > SQL_ROWS }))
}

/// The most bytes of CSV the SQL box's download gives (more: `cifar-df query --format csv`).
pub const SQL_CSV_BYTES: usize = 64 << 20;

/// The whole result of `sql` as CSV (at most [`SQL_CSV_BYTES`]), read-only and within
/// `limits`.
pub async fn sql_csv(root: &Path, sql_text: &str, limits: &SqlLimits) -> Result<Vec<u8>> {
    use futures::StreamExt;
    let work = async {
        let mut stream = sql_box_stream(root, sql_text, limits).await?;
        let mut buf = Vec::new();
        let mut first = true;
        while let Some(b) = stream.next().await {
            // A writer per batch (the header with the first) so the size is seen as it grows.
            datafusion::arrow::csv::WriterBuilder::new()
                .with_header(first)
                .build(&mut buf)
                .write(&b?)?;
            first = false;
            if buf.len() > SQL_CSV_BYTES {
                return Err(Error::usage(format!(
                    "the result is over {} of CSV, more than the dashboard gives; \
                     write it with `cifar-df query --format csv` from a shell",
                    crate::limits::human(SQL_CSV_BYTES as u128)
                )));
            }
        }
        if buf.is_empty() {
            // No batch at all: still the header.
            let schema = stream.schema();
            let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            buf.extend_from_slice(names.join(",").as_bytes());
            buf.push(b'\n');
        }
        Ok::<_, Error>(buf)
    };
    tokio::time::timeout(limits.timeout, work)
        .await
        .map_err(|_| limits.timed_out())?
}

/// What changes when a run writes: per run folder, its `run.json` and each table folder's
/// file count, bytes and newest modification time.
pub fn fingerprint(root: &Path) -> Vec<(String, u64, u64, u128)> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(root) else {
        return out;
    };
    let stamp = |p: &Path| -> Option<(u64, u128)> {
        let m = fs::metadata(p).ok()?;
        let t = m
            .modified()
            .ok()?
            .duration_since(UNIX_EPOCH)
            .ok()?
            .as_nanos();
        Some((m.len(), t))
    };
    for e in entries.flatten() {
        let dir = e.path();
        if !dir.is_dir() {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        for file in [tables::RUN_FILE, tables::LIVE_FILE] {
            if let Some((len, t)) = stamp(&dir.join(file)) {
                out.push((format!("{name}/{file}"), 1, len, t));
            }
        }
        for table in tables::TABLES {
            let Ok(files) = fs::read_dir(dir.join(table)) else {
                continue;
            };
            let (mut n, mut bytes, mut newest) = (0u64, 0u64, 0u128);
            for f in files.flatten() {
                if let Some((len, t)) = stamp(&f.path()) {
                    n += 1;
                    bytes += len;
                    newest = newest.max(t);
                }
            }
            out.push((format!("{name}/{table}"), n, bytes, newest));
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downsampling_keeps_each_buckets_extremes_in_order() {
        let x: Vec<f64> = (0..1000).map(f64::from).collect();
        let mut y: Vec<f64> = x.iter().map(|v| (v / 50.0).sin()).collect();
        y[500] = 9.0; // a spike must survive
        y[733] = -9.0;
        let (dx, dy) = downsample(&x, &y, 100);
        assert!(dx.len() <= 100 && dx.len() >= 90, "{}", dx.len());
        assert!(dx.windows(2).all(|w| w[0] < w[1]), "x in order");
        assert!(dy.contains(&9.0) && dy.contains(&-9.0));
        // Each kept point is a real point.
        for (a, b) in dx.iter().zip(&dy) {
            assert_eq!(y[*a as usize], *b);
        }
        // Each bucket of 20 source points keeps its own min and max.
        for b in 0..50 {
            let s = &y[b * 20..(b + 1) * 20];
            let lo = s.iter().cloned().fold(f64::INFINITY, f64::min);
            let hi = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let kept: Vec<f64> = dx
                .iter()
                .zip(&dy)
                .filter(|(x, _)| (**x as usize) / 20 == b)
                .map(|(_, y)| *y)
                .collect();
            assert!(kept.contains(&lo) && kept.contains(&hi), "bucket {b}");
        }
        // Few points: all of them.
        assert_eq!(downsample(&x[..10], &y[..10], 100).0.len(), 10);
    }
}
