//! cifar-df: learn image classifiers from a live stream of CIFAR-10, on Apache Arrow and
//! DataFusion.
//!
//! The modules follow the data's path: [`dataset`] (CIFAR-10 files and the [`dataset::synth`]etic
//! set) → [`wire`] (formats on the socket) → [`server`] (the stream server) / [`source`]
//! (sources into Arrow [`batch`]es) → [`table`] (the live `stream` table in DataFusion) →
//! [`transforms`] (preprocessing UDFs) → [`bridge`] (Arrow → ndarray, zero-copy) →
//! [`model`] (learners) → [`metrics`] → [`export`] (Parquet) → [`query`] (SQL) → [`plot`]
//! (PNG); [`distributed`] runs the SQL and the feature job over workers.
#![warn(missing_docs)]

pub mod batch;
pub mod bridge;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod dataset;
pub mod distributed;
pub mod drift;
pub mod error;
pub mod export;
pub mod features;
pub mod grid;
pub mod kafka;
pub mod limits;
pub mod linalg;
pub mod metrics;
pub mod model;
pub mod plot;
pub mod progress;
pub mod query;
pub mod runs;
pub mod server;
pub mod source;
pub mod store;
pub mod table;
pub mod trainer;
pub mod transforms;
pub mod ui;
pub mod wire;

pub use error::{Error, Result};
