//! SQL over everything cifar-df writes, with DataFusion.
//!
//! [`session`] makes the one `SessionContext` every command uses: Parquet files and
//! directories can be named directly in a query (`SELECT count(*) FROM 'out.parquet'`), and
//! later stages register their tables and functions here too; both sessions come with the
//! image functions of [`crate::transforms`] (seed 0). [`format_batches`] prints
//! results as a table, CSV or JSON.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::{DynamicFileCatalog, TableProvider, UrlTableFactory};
use datafusion::datasource::dynamic_file::DynamicListTableFactory;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::execution::config::SessionConfig;
use datafusion::execution::context::SessionState;
use datafusion::prelude::SessionContext;

use crate::error::{Error, Result};

/// A new session for queries over stored data: files named in queries are tables, one
/// target partition per core.
pub fn session() -> SessionContext {
    let config = SessionConfig::new().with_information_schema(true);
    let ctx = with_url_tables(SessionContext::new_with_config(config));
    crate::transforms::register(&ctx, 0);
    ctx
}

/// DataFusion's `enable_url_table` (files and folders named in a query are tables), but a
/// folder that holds Parquet files next to other files (a features cache's root, with
/// its `cache.json`, `extractor/`, and the parts in `train/` and `test/`) is read as the
/// table of every Parquet file under it, where DataFusion would take the format of
/// whichever file it listed first; a folder with none is an error naming what it holds.
fn with_url_tables(ctx: SessionContext) -> SessionContext {
    let current = Arc::clone(ctx.state().catalog_list());
    let factory = Arc::new(UrlTables::default());
    let catalogs = Arc::new(DynamicFileCatalog::new(
        current,
        Arc::clone(&factory) as Arc<dyn UrlTableFactory>,
    ));
    let session_id = ctx.session_id();
    let ctx: SessionContext = ctx
        .into_state_builder()
        .with_session_id(session_id)
        .with_catalog_list(catalogs)
        .build()
        .into();
    factory
        .inner
        .session_store()
        .with_state(ctx.state_weak_ref());
    ctx
}

/// See [`with_url_tables`].
#[derive(Debug, Default)]
struct UrlTables {
    inner: DynamicListTableFactory,
}

/// The folders under `dir` (itself included) that hold Parquet files, and the other
/// files (hidden and temporary ones, `.name` and `_name`, left out), each sorted.
fn folder_files(dir: &Path) -> (Vec<std::path::PathBuf>, Vec<String>) {
    let (mut parquet, mut other) = (Vec::new(), Vec::new());
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        let mut here = false;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name.starts_with('_') {
                continue;
            }
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if name.ends_with(".parquet") {
                here = true;
            } else {
                other.push(
                    path.strip_prefix(dir)
                        .unwrap_or(&path)
                        .display()
                        .to_string(),
                );
            }
        }
        if here {
            parquet.push(d);
        }
    }
    parquet.sort();
    other.sort();
    (parquet, other)
}

#[async_trait::async_trait]
impl UrlTableFactory for UrlTables {
    async fn try_new(
        &self,
        url: &str,
    ) -> datafusion::error::Result<Option<Arc<dyn TableProvider>>> {
        let dir = Path::new(url);
        if !dir.is_dir() {
            return self.inner.try_new(url).await;
        }
        let (parquet, other) = folder_files(dir);
        if other.is_empty() {
            return self.inner.try_new(url).await;
        }
        if parquet.is_empty() {
            let shown: Vec<&str> = other.iter().take(5).map(String::as_str).collect();
            return Err(datafusion::error::DataFusionError::Plan(format!(
                "{url}: a folder with no Parquet file to read as a table (it holds {}{}); \
                 name a Parquet file or a folder of them",
                shown.join(", "),
                if other.len() > shown.len() {
                    ", …"
                } else {
                    ""
                }
            )));
        }
        let state = self
            .inner
            .session_store()
            .get_session()
            .upgrade()
            .and_then(|s| s.read().as_any().downcast_ref::<SessionState>().cloned());
        let Some(state) = state else {
            return self.inner.try_new(url).await;
        };
        // Every folder that holds Parquet files (DataFusion lists one folder's own files).
        let urls = parquet
            .iter()
            .map(|d| ListingTableUrl::parse(format!("{}/", d.display())))
            .collect::<datafusion::error::Result<Vec<_>>>()?;
        let options =
            ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
        let config = ListingTableConfig::new_with_multi_paths(urls)
            .with_listing_options(options)
            .infer_schema(&state)
            .await?;
        Ok(Some(Arc::new(ListingTable::try_new(config)?)))
    }
}

/// A new session for a query over the live `stream` table: one partition, so batches leave
/// in the order they arrived (no round-robin repartitioning), and no coalescing of small
/// batches, so each incoming batch is passed on as soon as it is there. (A `WHERE` on the
/// stream still buffers its output up to the session batch size: DataFusion's filter
/// coalesces; keep per-batch consumers to projections.)
pub fn stream_session() -> SessionContext {
    let config = SessionConfig::new()
        .with_information_schema(true)
        .with_target_partitions(1)
        .with_coalesce_batches(false);
    let ctx = SessionContext::new_with_config(config).enable_url_table();
    crate::transforms::register(&ctx, 0);
    ctx
}

/// Run `sql` and collect the result.
pub async fn run(ctx: &SessionContext, sql: &str) -> Result<Vec<RecordBatch>> {
    let df = ctx.sql(sql).await?;
    Ok(df.collect().await?)
}

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OutputFormat {
    /// An aligned text table.
    #[default]
    Table,
    /// CSV with a header line.
    Csv,
    /// A JSON array of objects.
    Json,
}

impl FromStr for OutputFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "table" => Ok(OutputFormat::Table),
            "csv" => Ok(OutputFormat::Csv),
            "json" => Ok(OutputFormat::Json),
            _ => Err(Error::usage(format!(
                "unknown output format {s:?} (expected table, csv or json)"
            ))),
        }
    }
}

impl fmt::Display for OutputFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OutputFormat::Table => "table",
            OutputFormat::Csv => "csv",
            OutputFormat::Json => "json",
        })
    }
}

/// Run `sql` and write its result to `out` in `format`. CSV and JSON are written batch by
/// batch as the query yields them, so a large result (`SELECT * FROM 'images/'`) is not
/// held in memory; a table needs every row for its column widths and is collected first.
pub async fn write_result(
    ctx: &SessionContext,
    sql: &str,
    format: OutputFormat,
    out: &mut dyn std::io::Write,
) -> Result<()> {
    use futures::StreamExt;
    let df = ctx.sql(sql).await?;
    let io = |e: std::io::Error| Error::io("standard output", e);
    match format {
        OutputFormat::Table => {
            let batches = df.collect().await?;
            out.write_all(format_batches(&batches, format)?.as_bytes())
                .map_err(io)?;
        }
        OutputFormat::Csv => {
            let mut stream = df.execute_stream().await?;
            let mut w = datafusion::arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut *out);
            while let Some(batch) = stream.next().await {
                w.write(&batch?)?;
            }
        }
        OutputFormat::Json => {
            let mut stream = df.execute_stream().await?;
            {
                // Writes `[`, the rows, `]` (and `[]` for no rows) as it goes.
                let mut w = datafusion::arrow::json::ArrayWriter::new(&mut *out);
                while let Some(batch) = stream.next().await {
                    w.write(&batch?)?;
                }
                w.finish()?;
            }
            out.write_all(b"\n").map_err(io)?;
        }
    }
    out.flush().map_err(io)
}

/// Render `batches` in `format`.
pub fn format_batches(batches: &[RecordBatch], format: OutputFormat) -> Result<String> {
    match format {
        OutputFormat::Table => {
            let mut s =
                datafusion::arrow::util::pretty::pretty_format_batches(batches)?.to_string();
            s.push('\n');
            Ok(s)
        }
        OutputFormat::Csv => {
            let mut buf = Vec::new();
            {
                let mut w = datafusion::arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(&mut buf);
                for b in batches {
                    w.write(b)?;
                }
            }
            Ok(String::from_utf8_lossy(&buf).into_owned())
        }
        OutputFormat::Json => {
            let mut buf = Vec::new();
            {
                let mut w = datafusion::arrow::json::ArrayWriter::new(&mut buf);
                let refs: Vec<&RecordBatch> = batches.iter().collect();
                w.write_batches(&refs)?;
                w.finish()?;
            }
            if buf.is_empty() {
                buf.extend_from_slice(b"[]");
            }
            buf.push(b'\n');
            Ok(String::from_utf8_lossy(&buf).into_owned())
        }
    }
}
