//! Plots (placeholder until the plot module lands).
use std::path::{Path, PathBuf};

use crate::error::Result;

/// Draws the run's plots.
pub async fn plot_all_for_run(_root: &Path, _run: &str, _out: &Path) -> Result<Vec<PathBuf>> {
    Ok(Vec::new())
}
