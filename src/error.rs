//! One error type for the library.
//!
//! Every error that can come from input (a file, the network, a query) names *what* and
//! *where*: the file and byte offset, or the batch and row of the stream. The binary turns
//! these into messages with `anyhow`; the library never panics on input.

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
    /// A bad argument, option or configuration value.
    #[error("{0}")]
    Usage(String),
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
