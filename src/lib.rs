//! cifar-df: learn image classifiers from a live stream of CIFAR-10, on Apache Arrow and
//! DataFusion.
//!
//! The modules follow the data's path: [`dataset`] (CIFAR-10 and CIFAR-100 files, image
//! folders, the [`dataset::synth`]etic set) → [`wire`] (formats on the socket, Kafka) →
//! [`server`] (the stream server) / [`source`] (sources into Arrow [`batch`]es, and
//! [`source::table`], the live `stream` table in DataFusion) → [`transforms`] (preprocessing
//! UDFs on the [`pixels`] kernels) → [`features`] (extractors) → [`bridge`] (Arrow → ndarray,
//! zero-copy) → [`model`] (learners) → [`run`] (the trainer, metrics, checkpoints, the run
//! tables) → [`query`] (SQL) → [`plot`] (PNG) and [`ui`] (the dashboard); [`sink`] writes a
//! stream out (Parquet, Kafka); [`distributed`] runs the SQL and the feature job over
//! workers. docs/architecture.md has the map.
#![warn(missing_docs)]

pub mod batch;
pub mod bridge;
pub mod cli;
pub mod dataset;
pub mod distributed;
pub mod error;
pub mod features;
pub mod limits;
pub mod linalg;
pub mod model;
pub mod pixels;
pub mod plot;
pub mod progress;
pub mod query;
pub mod rng;
pub mod run;
pub mod server;
pub mod sink;
pub mod source;
pub mod store;
#[doc(hidden)]
pub mod testing;
pub mod transforms;
pub mod ui;
pub mod wire;

pub use error::{Error, Result};
