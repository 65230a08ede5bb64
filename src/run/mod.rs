//! A training run: what it will do, decided once from the caller's options ([`plan`]),
//! the loop that learns from the stream ([`trainer`], fed by the [`bridge`] from Arrow to
//! ndarray), its settings ([`config`]), what it keeps while it
//! runs ([`checkpoint`]s, [`metrics`], the loss's [`drift`] detector), the CNN it lends as
//! an [`extractor`], the tables it writes under `runs/NAME/` ([`tables`]) and their one
//! read side ([`read`]), which `query`, `plot` and the dashboard use.

pub mod bridge;
pub mod checkpoint;
pub mod config;
pub mod drift;
pub mod extractor;
pub mod metrics;
pub mod plan;
pub mod read;
pub mod tables;
pub mod trainer;
