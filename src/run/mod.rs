//! A training run: the loop that learns from the stream ([`trainer`]), its settings
//! ([`config`]), what it keeps while it runs ([`checkpoint`]s, [`metrics`], the loss's
//! [`drift`] detector) and the tables it writes under `runs/NAME/` ([`tables`]), which
//! `query`, `plot` and the dashboard read.

pub mod checkpoint;
pub mod config;
pub mod drift;
pub mod metrics;
pub mod tables;
pub mod trainer;
