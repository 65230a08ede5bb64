//! Where a stream goes out (`cifar-df export`): Parquet files ([`parquet`]) or a Kafka
//! topic ([`kafka`]).
//!
//! The batches come through the streaming table (`SELECT * FROM stream`), the same path
//! every later consumer uses. On an error or Ctrl-C the batches already received are still
//! finished and kept.

pub mod kafka;
pub mod parquet;

use std::path::PathBuf;

use datafusion::arrow::record_batch::RecordBatch;
use futures::StreamExt;

use crate::error::{Error, Result};

/// What an export wrote.
#[derive(Debug, Default)]
pub struct ExportSummary {
    /// Batches written.
    pub batches: u64,
    /// Rows (images) written.
    pub rows: u64,
    /// Files completed, in order.
    pub files: Vec<PathBuf>,
    /// Whether Ctrl-C stopped it.
    pub interrupted: bool,
    /// The error that ended the stream early, if any (what came before it was written).
    pub error: Option<Error>,
}

/// Runs `df` to its end (or Ctrl-C, or a stream error, kept in the summary), handing each
/// non-empty batch to `write`.
async fn drive(
    df: datafusion::dataframe::DataFrame,
    write: &mut dyn FnMut(&RecordBatch) -> Result<()>,
    mut on_batch: impl FnMut(&RecordBatch),
) -> Result<ExportSummary> {
    let mut summary = ExportSummary::default();
    let mut stream = df.execute_stream().await?;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let next = tokio::select! {
            next = stream.next() => next,
            _ = &mut ctrl_c => {
                summary.interrupted = true;
                break;
            }
        };
        match next {
            None => break,
            Some(Ok(batch)) => {
                if batch.num_rows() == 0 {
                    continue;
                }
                write(&batch)?;
                summary.batches += 1;
                summary.rows += batch.num_rows() as u64;
                on_batch(&batch);
            }
            Some(Err(e)) => {
                summary.error = Some(e.into());
                break;
            }
        }
    }
    Ok(summary)
}
