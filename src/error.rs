//! One error type for the library.
//!
//! Every error that can come from input (a file, the network, a query) names *what* and
//! *where*: the file and byte offset, or the batch and row of the stream. The binary turns
//! these into messages with `anyhow`; the library never panics on input.
//!
//! Each error is of one [`ErrorKind`]: the user can fix the command ([`ErrorKind::Usage`]),
//! the data is bad ([`ErrorKind::Data`]), learning failed ([`ErrorKind::Model`]), a file or
//! a peer failed ([`ErrorKind::Io`], [`ErrorKind::Net`]: [`Error::is_transient`], worth
//! another try), or cifar-df itself is at fault ([`ErrorKind::Internal`]). Callers decide on
//! the kind, never on the message's text.

use std::path::PathBuf;

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in cifar-df.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a named file or folder.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// A dataset or captured-stream file whose bytes are not what its format says.
    #[error("{path}: at byte offset {offset}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// Byte offset of the problem in the file.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A batch from a stream that could not be decoded.
    #[error("batch {batch}{}: {reason}", row.map(|r| format!(", row {r}")).unwrap_or_default())]
    Decode {
        /// Sequence number of the batch.
        batch: u64,
        /// Row within the batch, when the problem is in one row.
        row: Option<u32>,
        /// What is wrong.
        reason: String,
    },
    /// The network: connect, accept, read or write.
    #[error("{what}: {source}")]
    Net {
        /// What was being done, with the address.
        what: String,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// A Kafka broker or client: what was being done (with the address, topic, partition
    /// and offset), and what the broker or librdkafka said.
    #[error("{what}: {reason}")]
    Kafka {
        /// What was being done, and where.
        what: String,
        /// What went wrong.
        reason: String,
    },
    /// A distributed worker, or the workers of a query: which (its address) and what went
    /// wrong.
    #[error("{what}: {reason}")]
    Worker {
        /// The worker's address, or which workers.
        what: String,
        /// What went wrong.
        reason: String,
    },
    /// A bad argument, option or configuration value: the user can fix the command.
    #[error("{0}")]
    Usage(String),
    /// Data that cannot be used as it is (a batch of the wrong width, a label out of
    /// range, a non-finite feature), naming where: the batch and row, the column.
    #[error("{0}")]
    Data(String),
    /// A model that failed to learn (its loss not finite, its system singular), naming
    /// the step.
    #[error("{0}")]
    Model(String),
    /// A broken invariant of cifar-df itself (a poisoned lock, a shape that cannot be):
    /// a bug to report, not something the user can fix.
    #[error("internal error: {0}")]
    Internal(String),
    /// An error from Arrow.
    #[error(transparent)]
    Arrow(#[from] arrow::error::ArrowError),
    /// An error from Parquet.
    #[error(transparent)]
    Parquet(#[from] parquet::errors::ParquetError),
    /// An error from DataFusion.
    #[error(transparent)]
    DataFusion(datafusion::error::DataFusionError),
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A format error in `path` at byte `offset`.
    pub fn format(path: impl Into<PathBuf>, offset: u64, reason: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            offset,
            reason: reason.into(),
        }
    }

    /// A usage error.
    pub fn usage(msg: impl Into<String>) -> Self {
        Error::Usage(msg.into())
    }

    /// A data error; `msg` names where (batch, row, column).
    pub fn data(msg: impl Into<String>) -> Self {
        Error::Data(msg.into())
    }

    /// A model that failed to learn.
    pub fn model(msg: impl Into<String>) -> Self {
        Error::Model(msg.into())
    }

    /// A broken invariant of cifar-df itself.
    pub fn internal(msg: impl Into<String>) -> Self {
        Error::Internal(msg.into())
    }

    /// What kind of error this is (see [`ErrorKind`]).
    pub fn kind(&self) -> ErrorKind {
        use datafusion::error::DataFusionError as Df;
        match self {
            Error::Usage(_) => ErrorKind::Usage,
            Error::Format { .. } | Error::Decode { .. } | Error::Data(_) | Error::Arrow(_) => {
                ErrorKind::Data
            }
            Error::Model(_) => ErrorKind::Model,
            Error::Internal(_) => ErrorKind::Internal,
            Error::Io { .. } | Error::Parquet(_) => ErrorKind::Io,
            Error::Net { .. } | Error::Kafka { .. } | Error::Worker { .. } => ErrorKind::Net,
            Error::DataFusion(e) => match e.find_root() {
                // A file read under the query: a part replaced or gone.
                Df::ObjectStore(_) | Df::IoError(_) | Df::ParquetError(_) => ErrorKind::Io,
                Df::ArrowError(..) => ErrorKind::Data,
                Df::Internal(_) => ErrorKind::Internal,
                // The query itself (SQL, plan, schema, limits): the user's to fix.
                _ => ErrorKind::Usage,
            },
        }
    }

    /// Whether the same call may pass when tried again: a file replaced under a read
    /// (a compaction renaming a part), a peer or a broker that went away.
    pub fn is_transient(&self) -> bool {
        matches!(self.kind(), ErrorKind::Io | ErrorKind::Net)
    }
}

/// What kind of error an [`Error`] is: what its caller can do about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// A bad argument, option, configuration or query: the user can fix the command.
    Usage,
    /// Bad data: a file whose bytes are not its format, a batch that cannot be decoded or
    /// used. The error names the file and offset, or the batch and row.
    Data,
    /// A model that failed to learn.
    Model,
    /// A file could not be read or written (transient: the file may be back).
    Io,
    /// The network, a broker or a worker failed (transient: the peer may be back).
    Net,
    /// A bug in cifar-df.
    Internal,
}

impl From<datafusion::error::DataFusionError> for Error {
    /// One of ours that crossed a query (a source's error, wrapped by DataFusion as
    /// "External error: …") comes back as itself.
    fn from(e: datafusion::error::DataFusionError) -> Self {
        match e {
            datafusion::error::DataFusionError::External(inner) => {
                match inner.downcast::<Error>() {
                    Ok(ours) => *ours,
                    Err(other) => {
                        Error::DataFusion(datafusion::error::DataFusionError::External(other))
                    }
                }
            }
            other => Error::DataFusion(other),
        }
    }
}

impl From<Error> for datafusion::error::DataFusionError {
    fn from(e: Error) -> Self {
        match e {
            Error::DataFusion(e) => e,
            Error::Arrow(e) => datafusion::error::DataFusionError::ArrowError(Box::new(e), None),
            other => datafusion::error::DataFusionError::External(Box::new(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::error::DataFusionError as Df;

    #[test]
    fn each_error_has_its_kind_and_only_io_and_net_are_transient() {
        let gone = || std::io::Error::from(std::io::ErrorKind::NotFound);
        let cases = [
            (Error::usage("--lr -1"), ErrorKind::Usage),
            (Error::data("batch 3, row 2: label 12"), ErrorKind::Data),
            (Error::format("a.bin", 8, "short"), ErrorKind::Data),
            (Error::model("loss NaN at step 4"), ErrorKind::Model),
            (Error::internal("lock poisoned"), ErrorKind::Internal),
            (Error::io("runs/a/metrics", gone()), ErrorKind::Io),
            (
                Error::Net {
                    what: "connect 127.0.0.1:1".into(),
                    source: gone(),
                },
                ErrorKind::Net,
            ),
            (
                Error::Kafka {
                    what: "topic t".into(),
                    reason: "broker down".into(),
                },
                ErrorKind::Net,
            ),
            // DataFusion's errors by their root: a file read under a query is I/O, a
            // mistake in the query is the user's, however deep the context.
            (Error::from(Df::IoError(gone())), ErrorKind::Io),
            (
                Error::from(Df::Context(
                    "reading part".into(),
                    Box::new(Df::IoError(gone())),
                )),
                ErrorKind::Io,
            ),
            (Error::from(Df::Plan("no table x".into())), ErrorKind::Usage),
            (
                Error::from(Df::Internal("a plan that cannot be".into())),
                ErrorKind::Internal,
            ),
        ];
        for (e, kind) in cases {
            assert_eq!(e.kind(), kind, "{e}");
            assert_eq!(
                e.is_transient(),
                matches!(kind, ErrorKind::Io | ErrorKind::Net),
                "{e}"
            );
        }
        // One of ours that crossed a query comes back as itself, with its kind.
        let crossed = Error::from(Df::from(Error::data("batch 1, row 0")));
        assert_eq!(crossed.kind(), ErrorKind::Data);
        assert_eq!(crossed.to_string(), "batch 1, row 0");
    }
}
