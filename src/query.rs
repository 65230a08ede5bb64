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
use datafusion::execution::context::{SQLOptions, SessionState};
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

/// What a query served to others (the dashboard) may use: at most `memory` bytes of
/// DataFusion's memory pool (sorts, joins and aggregates past it fail with an error
/// rather than grow), no spilling to disk (nothing is written), and `partitions` cores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of the session's memory pool.
    pub memory: usize,
    /// Target partitions (cores a query runs on).
    pub partitions: usize,
}

/// [`session`] under `limits`.
pub fn limited_session(limits: Limits) -> Result<SessionContext> {
    use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
    use datafusion::execution::runtime_env::RuntimeEnvBuilder;
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_limit(limits.memory.max(1), 1.0)
        .with_disk_manager_builder(
            DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
        )
        .build_arc()?;
    let config = SessionConfig::new()
        .with_information_schema(true)
        .with_target_partitions(limits.partitions.max(1));
    let ctx = with_url_tables(SessionContext::new_with_config_rt(config, runtime));
    crate::transforms::register(&ctx, 0);
    Ok(ctx)
}

/// `s` as a SQL string literal: in single quotes, its own quotes doubled. The one place
/// the crate quotes text into SQL (run names, splits, paths).
pub fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The SQL that only reads: no DDL (`CREATE [EXTERNAL] TABLE`, `CREATE VIEW`, `DROP`, …),
/// no DML (`COPY … TO`, `INSERT`, `DELETE`, `UPDATE`) and no statements (`SET`, `RESET`,
/// `PREPARE`, `EXECUTE`), checked over the whole plan (an `EXPLAIN ANALYZE COPY` too).
pub fn read_only() -> SQLOptions {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
}

/// Runs `sql` only if it reads ([`read_only`]), and collects the result; a statement that
/// would write or change the session is an error saying so, before anything runs.
pub async fn run_read_only(ctx: &SessionContext, sql: &str) -> Result<Vec<RecordBatch>> {
    let df = plan_read_only(ctx, sql).await?;
    Ok(df.collect().await?)
}

/// Plans `sql` if it only reads ([`read_only`]).
pub async fn plan_read_only(
    ctx: &SessionContext,
    sql: &str,
) -> Result<datafusion::dataframe::DataFrame> {
    ctx.sql_with_options(sql, read_only()).await.map_err(|e| {
        let text = e.to_string();
        if text.contains("not supported: ") {
            Error::usage(format!(
                "this SQL is read-only: {} (only queries that read are run here; write with \
                 `cifar-df query` from a shell)",
                text.trim_start_matches("Error during planning: ")
            ))
        } else {
            e.into()
        }
    })
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

/// The most entries [`folder_files`] looks at under a folder named in a query: a table
/// is a folder of parts, not a file system (`select * from '/'` is an error, not a walk
/// over every disk).
pub const MAX_FOLDER_ENTRIES: usize = 200_000;

/// The folders under `dir` (itself included) that hold Parquet files, and the other
/// files (hidden and temporary ones, `.name` and `_name`, left out), each sorted; an
/// error past `cap` entries.
fn folder_files(
    dir: &Path,
    cap: usize,
) -> datafusion::error::Result<(Vec<std::path::PathBuf>, Vec<String>)> {
    let (mut parquet, mut other) = (Vec::new(), Vec::new());
    let mut stack = vec![dir.to_path_buf()];
    let mut seen = 0usize;
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        let mut here = false;
        for e in entries.flatten() {
            seen += 1;
            if seen > cap {
                return Err(datafusion::error::DataFusionError::Plan(format!(
                    "{}: more than {cap} files and folders under it: name a Parquet file or \
                     a folder of them",
                    dir.display()
                )));
            }
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
    Ok((parquet, other))
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
        // A walk of the disk: off the async threads, so a query's time limit can end it.
        let owned = dir.to_path_buf();
        let (parquet, other) =
            tokio::task::spawn_blocking(move || folder_files(&owned, MAX_FOLDER_ENTRIES))
                .await
                .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))??;
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

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::Int32Array;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    #[tokio::test]
    async fn a_literal_reads_back_as_its_text() {
        assert_eq!(literal("a'b"), "'a''b'");
        // What DataFusion reads back is the text itself, quotes and all.
        let ctx = session();
        for text in ["a'b", "''", "it's'; DROP TABLE t; --", "", "ü/ß\\"] {
            let batches = run(&ctx, &format!("SELECT {} AS v", literal(text)))
                .await
                .unwrap();
            let v =
                datafusion::arrow::util::display::array_value_to_string(batches[0].column(0), 0);
            assert_eq!(v.unwrap(), text);
        }
    }

    /// Every statement DataFusion 55 plans that writes a file, changes a table, a catalog
    /// or the session: `{dir}` is a folder no statement may write into.
    const WRITING: [&str; 26] = [
        "COPY (select 1 as x) TO '{dir}/copy.csv' STORED AS CSV",
        "COPY t TO '{dir}/copy.parquet' STORED AS PARQUET",
        "COPY (select 1 as x) TO '{dir}/copy_dir/' STORED AS JSON",
        "INSERT INTO t VALUES (2)",
        "INSERT INTO t SELECT a FROM t",
        "DELETE FROM t WHERE a = 1",
        "UPDATE t SET a = 3",
        "CREATE TABLE t2 AS SELECT 1 AS x",
        "CREATE TABLE t3 (a INT)",
        "CREATE OR REPLACE TABLE t AS SELECT 5 AS a",
        "CREATE EXTERNAL TABLE e (a INT) STORED AS CSV LOCATION '{dir}/e.csv'",
        "CREATE VIEW v AS SELECT 1 AS x",
        "CREATE OR REPLACE VIEW v AS SELECT 2 AS x",
        "CREATE SCHEMA s",
        "CREATE DATABASE d",
        "DROP TABLE t",
        "DROP TABLE IF EXISTS t",
        "DROP VIEW IF EXISTS v",
        "DROP SCHEMA IF EXISTS s",
        "DROP FUNCTION IF EXISTS f",
        "SET datafusion.execution.batch_size = 7",
        "RESET datafusion.execution.batch_size",
        "PREPARE p(INT) AS SELECT $1",
        "EXPLAIN ANALYZE COPY (select 1 as x) TO '{dir}/explained.csv' STORED AS CSV",
        "EXPLAIN ANALYZE INSERT INTO t VALUES (9)",
        "EXPLAIN COPY (select 1 as x) TO '{dir}/explain.csv' STORED AS CSV",
    ];

    fn with_table(ctx: SessionContext) -> SessionContext {
        let schema = Arc::new(Schema::new(vec![Field::new("a", DataType::Int32, false)]));
        let batch =
            RecordBatch::try_new(schema, vec![Arc::new(Int32Array::from(vec![1]))]).unwrap();
        let table =
            datafusion::datasource::MemTable::try_new(batch.schema(), vec![vec![batch]]).unwrap();
        ctx.register_table("t", Arc::new(table)).unwrap();
        ctx
    }

    #[tokio::test]
    async fn read_only_sql_refuses_every_writing_statement_and_runs_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().display().to_string();
        let ctx = with_table(
            limited_session(Limits {
                memory: 64 << 20,
                partitions: 1,
            })
            .unwrap(),
        );
        let before = ctx.copied_config().batch_size();
        for stmt in WRITING {
            let sql = stmt.replace("{dir}", &dir);
            // DataFusion accepts it: it plans in a session that may write.
            let open = with_table(session());
            open.state()
                .create_logical_plan(&sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: DataFusion does not plan it: {e}"));
            // The read-only session refuses it, saying why, before anything runs.
            let e = run_read_only(&ctx, &sql).await.unwrap_err().to_string();
            assert!(
                e.contains("read-only") && e.contains("cifar-df query"),
                "{sql}: {e}"
            );
        }
        // Nothing was written, nothing changed.
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
        assert_eq!(ctx.copied_config().batch_size(), before);
        let b = run_read_only(&ctx, "select count(*) as n, max(a) as m from t")
            .await
            .unwrap();
        let text = format_batches(&b, OutputFormat::Csv).unwrap();
        assert_eq!(text, "n,m\n1,1\n");
        for gone in ["t2", "t3", "e", "v"] {
            assert!(!ctx.table_exist(gone).unwrap(), "{gone}");
        }
        // Reading still works: a query, SHOW, DESCRIBE, EXPLAIN of a query, a file by path.
        std::fs::write(tmp.path().join("r.csv"), "x\n4\n").unwrap();
        for sql in [
            "select a * 2 from t".to_string(),
            "show tables".to_string(),
            "describe t".to_string(),
            "explain select * from t".to_string(),
            format!("select * from '{dir}/r.csv'"),
        ] {
            run_read_only(&ctx, &sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
        // The shell's session still writes (`cifar-df query "COPY …"` is a feature).
        let open = session();
        run(
            &open,
            &format!("COPY (select 1 as x) TO '{dir}/ok.csv' STORED AS CSV"),
        )
        .await
        .unwrap();
        assert!(tmp.path().join("ok.csv").exists());
    }

    #[test]
    fn a_folder_named_in_a_query_is_looked_through_up_to_a_cap() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("sub")).unwrap();
        for f in ["a.parquet", "b.txt", "sub/c.parquet", "sub/d.json"] {
            std::fs::write(tmp.path().join(f), b"x").unwrap();
        }
        let (parquet, other) = folder_files(tmp.path(), 10).unwrap();
        assert_eq!(parquet, [tmp.path().to_path_buf(), tmp.path().join("sub")]);
        assert_eq!(other, ["b.txt", "sub/d.json"]);
        let e = folder_files(tmp.path(), 3).unwrap_err().to_string();
        assert!(e.contains("more than 3 files and folders"), "{e}");
        assert!(e.contains(&tmp.path().display().to_string()), "{e}");
    }

    #[tokio::test]
    async fn a_limited_session_stops_a_query_past_its_memory() {
        let ctx = limited_session(Limits {
            memory: 4 << 20,
            partitions: 1,
        })
        .unwrap();
        // A grouping of two million distinct keys needs far more than 4 MiB, and may not
        // spill to disk.
        let e = run_read_only(
            &ctx,
            "select value % 2000000 as k, count(*) from generate_series(1, 4000000) group by k",
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("Resources exhausted") || e.contains("memory"),
            "{e}"
        );
        // The same query in a session without the limit runs.
        let b = run_read_only(
            &session(),
            "select count(*) from (select value % 2000000 as k, count(*) from \
             generate_series(1, 4000000) group by k)",
        )
        .await
        .unwrap();
        assert_eq!(
            format_batches(&b, OutputFormat::Csv)
                .unwrap()
                .lines()
                .nth(1),
            Some("2000000")
        );
    }
}
