//! `--extractor SPEC` as a run sees it: where SPEC names a run (`run:NAME`), its CNN
//! comes from that run's checkpoint, found here in the run store; every other kind
//! (`onnx:FILE`, a fitted extractor folder) opens in [`crate::features`].
//!
//! This is the run's side of the CNN extractor so that `features/` never reads the run
//! store: the data's path goes features → run, not back.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::features::cnn::{CnnExtractor, RUN_PREFIX};
use crate::features::{Extractor, OnnxParams};
use crate::run::checkpoint;

/// The extractor `--extractor SPEC` names: `onnx:FILE` (an ONNX model, with `params`),
/// `run:NAME` (the CNN of run NAME under `runs`, or of the run folder NAME, at its latest
/// checkpoint or `run:NAME@CHECKPOINT`) or a fitted extractor folder (`params` must then
/// be the defaults).
pub fn open(spec: &str, params: OnnxParams, runs: &Path) -> Result<Extractor> {
    let Some(run) = spec.strip_prefix(RUN_PREFIX) else {
        return Extractor::open(spec, params);
    };
    if params != OnnxParams::default() {
        return Err(Error::usage(format!(
            "--node and ONNX parameters apply to --extractor {}FILE, not to {spec}",
            crate::features::ONNX_PREFIX
        )));
    }
    let (name, checkpoint) = match run.rsplit_once('@') {
        Some((n, c)) => (n, Some(c)),
        None => (run, None),
    };
    Ok(Extractor::Cnn(cnn_of_run(
        &run_folder(name, runs),
        checkpoint,
    )?))
}

/// The CNN of the run folder `run` at checkpoint `checkpoint` (the latest when `None`). A
/// run without checkpoints or whose model is not a CNN is an error naming it.
pub fn cnn_of_run(run: &Path, checkpoint: Option<&str>) -> Result<CnnExtractor> {
    let root = run.join("checkpoints");
    let ck = match checkpoint {
        Some(c) => checkpoint::find(&root, c)?,
        None => checkpoint::latest(&root)?.ok_or_else(|| {
            Error::usage(format!(
                "--extractor {RUN_PREFIX}{}: the run has no checkpoint to take a CNN from (is \
                 it a run folder?)",
                run.display()
            ))
        })?,
    };
    CnnExtractor::from_run_checkpoint(run, &ck.dir, &ck.name())
}

/// The run folder `run:NAME` names: NAME itself when it is a folder holding a run, else
/// NAME under `runs`.
pub fn run_folder(name: &str, runs: &Path) -> PathBuf {
    let direct = PathBuf::from(name);
    if direct.join("run.json").is_file() {
        direct
    } else {
        runs.join(name)
    }
}
