//! cifar-df: learn image classifiers from a live stream of CIFAR-10, on Apache Arrow and
//! DataFusion.
//!
//! The modules follow the data's path: [`dataset`] (CIFAR-10 and CIFAR-100 files, image
//! folders, the [`dataset::synth`]etic set) → [`wire`] (formats on the socket, Kafka) →
//! [`serve`] (the stream server) / [`source`] (sources into Arrow [`wire::batch`]es, and
//! [`source::table`], the live `stream` table in DataFusion) → [`transforms`] (preprocessing
//! UDFs on the [`transforms::pixels`] kernels) → [`features`] (extractors) → [`model`]
//! (learners) → [`run`] (the trainer, with [`run::bridge`] from Arrow to ndarray zero-copy;
//! metrics, checkpoints, the run tables) → [`query`] (SQL) → [`plot`] (PNG) and [`ui`] (the
//! dashboard); [`store`] writes files durably; [`sink`] writes a
//! stream out (Parquet, Kafka); [`distributed`] runs the SQL and the feature job over
//! workers. docs/architecture.md has the map.
#![warn(missing_docs)]

pub mod cli;
pub mod dataset;
pub mod distributed;
pub mod error;
pub mod features;
pub mod limits;
pub mod linalg;
pub mod model;
pub mod plot;
pub mod progress;
pub mod query;
pub mod rng;
pub mod run;
pub mod serve;
pub mod sink;
pub mod source;
pub mod store;
#[doc(hidden)]
pub mod testing;
pub mod transforms;
pub mod ui;
pub mod wire;

pub use error::{Error, ErrorKind, Result};
