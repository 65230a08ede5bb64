//! The live stream as a DataFusion table.
//!
//! A source is registered as the unbounded streaming table `stream`, so that one
//! long-running query (`SELECT ... FROM stream`) consumes the data as it arrives, batch by
//! batch. The source is read on its own thread (decoding JSON is the expensive part) and
//! handed to the query through a small bounded channel: a slow consumer slows the reader,
//! and through TCP flow control the server, instead of growing memory.
//!
//! A source can be read once: a second query over the same registration gets an error.

use std::fmt;
use std::sync::{Arc, Mutex};

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::error::DataFusionError;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::prelude::SessionContext;

use crate::error::Result;
use crate::source::{catch_panic, BatchSource, Report};

/// Name of the streaming table.
pub const STREAM_TABLE: &str = "stream";

/// How many decoded batches may wait for the consumer.
const QUEUE: usize = 2;

/// One source as a DataFusion partition.
pub struct SourcePartition {
    schema: SchemaRef,
    source: Mutex<Option<Box<dyn BatchSource>>>,
}

impl fmt::Debug for SourcePartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourcePartition").finish_non_exhaustive()
    }
}

impl SourcePartition {
    /// Wrap a source.
    pub fn new(source: Box<dyn BatchSource>) -> Self {
        SourcePartition {
            schema: source.schema(),
            source: Mutex::new(Some(source)),
        }
    }
}

/// The name of the thread that reads a source; a panic there is reported as the stream's
/// error (the CLI's panic hook keeps quiet about it, so it is said once).
pub const SOURCE_THREAD: &str = "cifar-df-source";

/// Fault injection for tests: `CIFAR_DF_FAULT=source-panic:N` makes the source thread
/// panic when asked for its N-th batch (0-based), as a buggy reader would.
fn injected_source_panic() -> Option<u64> {
    std::env::var("CIFAR_DF_FAULT")
        .ok()?
        .strip_prefix("source-panic:")?
        .parse()
        .ok()
}

impl PartitionStream for SourcePartition {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let source = self.source.lock().unwrap_or_else(|e| e.into_inner()).take();
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        match source {
            None => {
                let _ = tx.try_send(Err(DataFusionError::Execution(
                    "the stream source has already been read by another query".into(),
                )));
            }
            Some(mut source) => {
                let fault = injected_source_panic();
                let tx2 = tx.clone();
                let spawned = std::thread::Builder::new()
                    .name(SOURCE_THREAD.into())
                    .spawn(move || {
                        let mut delivered = 0u64;
                        loop {
                            // A panic in a reader becomes the stream's error, never a
                            // silent end of the stream.
                            let next = catch_panic(|| {
                                if fault == Some(delivered) {
                                    panic!(
                                        "injected fault (CIFAR_DF_FAULT=source-panic:{delivered})"
                                    );
                                }
                                source.next_batch()
                            });
                            let item = match next {
                                Ok(Ok(Some(b))) => Ok(b),
                                Ok(Ok(None)) => break,
                                Ok(Err(e)) => Err(DataFusionError::from(e)),
                                Err(panic) => Err(DataFusionError::Execution(format!(
                                    "the source failed after {delivered} batches ({} bytes \
                                     read): {panic}",
                                    source.report().snapshot().bytes
                                ))),
                            };
                            let stop = item.is_err();
                            delivered += 1;
                            // The receiver is gone when the query ended early (LIMIT, error).
                            if tx.blocking_send(item).is_err() || stop {
                                break;
                            }
                        }
                    });
                if let Err(e) = spawned {
                    let _ = tx2.try_send(Err(DataFusionError::Execution(format!(
                        "cannot start the source thread: {e}"
                    ))));
                }
            }
        }
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Box::pin(RecordBatchStreamAdapter::new(self.schema.clone(), stream))
    }
}

/// Register `source` as the streaming table `stream` in `ctx`; returns its report.
///
/// `bounded` says whether the source ends by itself (a file or a dataset) or is a live
/// connection (unbounded, which DataFusion plans as an infinite stream).
pub fn register_stream(
    ctx: &SessionContext,
    source: Box<dyn BatchSource>,
    bounded: bool,
) -> Result<Report> {
    let report = source.report();
    let schema = source.schema();
    let partition: Arc<dyn PartitionStream> = Arc::new(SourcePartition::new(source));
    let table = StreamingTable::try_new(schema, vec![partition])?.with_infinite_table(!bounded);
    ctx.deregister_table(STREAM_TABLE)?;
    ctx.register_table(STREAM_TABLE, Arc::new(table))?;
    Ok(report)
}
