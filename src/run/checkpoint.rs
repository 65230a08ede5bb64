//! Checkpoints of a training run: everything needed to continue it bit for bit.
//!
//! ```text
//! runs/NAME/checkpoints/epoch-2-batch-100/   after 100 batches of epoch 2
//! runs/NAME/checkpoints/epoch-2/             at the end of epoch 2
//!     model.safetensors   the model's tensors, with its optimiser state (Adam moments, ...)
//!     model.json          kind, hyper-parameters, counters and RNG state of the model
//!     state.json          the trainer: epoch / batch counters, the next stream batch,
//!                         running metrics and the smoothed curves' state
//!     config.toml         the effective run config
//! ```
//! Names follow the original Trainer's (`epoch-E`, `epoch-E-batch-B`; epochs count from 1,
//! B is the batch's position in its epoch). A checkpoint is written into a hidden temporary
//! folder and renamed into place when complete, so after a crash a checkpoint folder is
//! either whole or absent. [`latest`] is the one furthest into the stream.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::Learner;
use crate::run::metrics::{Accumulator, Running};
use crate::store::{rename_durable, write_atomic};

/// The trainer's state file in a checkpoint.
pub const STATE_FILE: &str = "state.json";
/// The run config in a checkpoint.
pub const CONFIG_FILE: &str = "config.toml";

/// The trainer's side of a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// The run.
    pub run: String,
    /// The model's name.
    pub model: String,
    /// Run seed.
    pub seed: u64,
    /// The preprocessing SQL the run uses.
    #[serde(default)]
    pub sql: String,
    /// The epoch of the last batch learnt (from 1; 0 before any).
    pub epoch: u32,
    /// Whether that epoch was closed (the model's end-of-epoch work done).
    pub epoch_done: bool,
    /// Position in its epoch of the last batch learnt (from 1).
    pub batch_in_epoch: u64,
    /// The stream batch number to continue from: every batch before it was learnt.
    pub next_batch: u64,
    /// Batches learnt.
    pub batches: u64,
    /// Images learnt.
    pub images: u64,
    /// Batches per epoch, when the source knows.
    pub per_epoch: Option<u64>,
    /// Whether batches are scored after learning (the original's way) instead of before.
    pub eval_after_fit: bool,
    /// The smoothed curves of the training metrics.
    pub running: Running,
    /// Training metrics over the whole run.
    pub overall: Accumulator,
    /// Training metrics over the current epoch.
    pub epoch_metrics: Accumulator,
    /// Seconds spent in `partial_fit`.
    pub fit_seconds: f64,
    /// When the checkpoint was written, milliseconds since the Unix epoch.
    pub created_ms: i64,
    /// The drift detector on the per-batch training loss (fresh in older checkpoints).
    #[serde(default)]
    pub drift: crate::run::drift::Adwin,
    /// A Kafka source's position after the last batch learnt: (partition, next offset).
    /// A resumed run seeks there; `None` for other sources.
    #[serde(default)]
    pub source_offsets: Option<Vec<(i32, i64)>>,
}

impl TrainState {
    /// The state before the first batch.
    pub fn new(run: &str, model: &str, seed: u64, eval_after_fit: bool, window: usize) -> Self {
        TrainState {
            run: run.to_string(),
            model: model.to_string(),
            seed,
            sql: String::new(),
            epoch: 0,
            epoch_done: true,
            batch_in_epoch: 0,
            next_batch: 0,
            batches: 0,
            images: 0,
            per_epoch: None,
            eval_after_fit,
            running: Running::new(window),
            overall: Accumulator::new(),
            epoch_metrics: Accumulator::new(),
            fit_seconds: 0.0,
            created_ms: 0,
            drift: crate::run::drift::Adwin::default(),
            source_offsets: None,
        }
    }

    /// The checkpoint name for this state: `epoch-E` at an epoch's end, else
    /// `epoch-E-batch-B`.
    pub fn name(&self) -> String {
        if self.epoch_done {
            format!("epoch-{}", self.epoch)
        } else {
            format!("epoch-{}-batch-{}", self.epoch, self.batch_in_epoch)
        }
    }

    /// Order of checkpoints along the stream: by the next batch, an epoch's end after the
    /// mid-epoch checkpoint at the same place.
    fn position(&self) -> (u64, bool) {
        (self.next_batch, self.epoch_done)
    }
}

/// A checkpoint on disk.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// Its folder.
    pub dir: PathBuf,
    /// Its trainer state.
    pub state: TrainState,
}

impl Checkpoint {
    /// The checkpoint's name (its folder's).
    pub fn name(&self) -> String {
        self.dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Loads its model.
    pub fn model(&self) -> Result<Box<dyn Learner>> {
        crate::model::load(&self.dir)
    }

    /// Its run config (TOML text).
    pub fn config(&self) -> Result<String> {
        let p = self.dir.join(CONFIG_FILE);
        fs::read_to_string(&p).map_err(|e| Error::io(&p, e))
    }
}

/// Writes a checkpoint of `model` and `state` under `root` (the run's `checkpoints/`),
/// atomically: into a temporary folder, then renamed to its name. Returns its folder.
pub fn save(root: &Path, state: &TrainState, model: &dyn Learner, config: &str) -> Result<PathBuf> {
    fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    let name = state.name();
    let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    model.save(&tmp)?;
    let json = serde_json::to_vec_pretty(state)
        .map_err(|e| Error::io(tmp.join(STATE_FILE), std::io::Error::other(e)))?;
    write_atomic(&tmp.join(STATE_FILE), &json)?;
    write_atomic(&tmp.join(CONFIG_FILE), config.as_bytes())?;
    let dir = root.join(&name);
    if dir.exists() {
        // Only a checkpoint at this very place (an earlier attempt of the same batches).
        fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    // Its files were each committed with `write_atomic` (folder flushed); now the rename.
    rename_durable(&tmp, &dir)?;
    Ok(dir)
}

/// Reads the checkpoint in `dir`.
pub fn open(dir: &Path) -> Result<Checkpoint> {
    let p = dir.join(STATE_FILE);
    let bytes = fs::read(&p).map_err(|e| Error::io(&p, e))?;
    let state: TrainState = serde_json::from_slice(&bytes)
        .map_err(|e| Error::format(&p, e.column() as u64, format!("invalid trainer state: {e}")))?;
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        state,
    })
}

/// Every checkpoint under `root`, in stream order (an absent folder has none). Temporary
/// folders of unfinished checkpoints are skipped.
pub fn list(root: &Path) -> Result<Vec<Checkpoint>> {
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(root, e)),
    };
    let mut all = Vec::new();
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !e.path().is_dir() {
            continue;
        }
        all.push(open(&e.path())?);
    }
    all.sort_by_key(|c| c.state.position());
    Ok(all)
}

/// The checkpoint furthest into the stream, if any.
pub fn latest(root: &Path) -> Result<Option<Checkpoint>> {
    Ok(list(root)?.pop())
}

/// The checkpoint called `name`; the error lists the ones there are.
pub fn find(root: &Path, name: &str) -> Result<Checkpoint> {
    let all = list(root)?;
    if let Some(c) = all.iter().find(|c| c.name() == name) {
        return Ok(c.clone());
    }
    let names: Vec<String> = all.iter().map(Checkpoint::name).collect();
    Err(Error::usage(format!(
        "no checkpoint {name:?} in {} (there are: {})",
        root.display(),
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    )))
}

/// Removes unfinished temporary folders and all but the latest `keep` mid-epoch
/// checkpoints (`keep` 0 keeps all). Epoch-end checkpoints are always kept.
pub fn prune(root: &Path, keep: usize) -> Result<()> {
    if let Ok(entries) = fs::read_dir(root) {
        for e in entries.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") {
                let p = e.path();
                fs::remove_dir_all(&p).map_err(|err| Error::io(&p, err))?;
            }
        }
    }
    if keep == 0 {
        return Ok(());
    }
    let mid: Vec<Checkpoint> = list(root)?
        .into_iter()
        .filter(|c| !c.state.epoch_done)
        .collect();
    for c in mid.iter().take(mid.len().saturating_sub(keep)) {
        fs::remove_dir_all(&c.dir).map_err(|e| Error::io(&c.dir, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::random_batch;

    fn model() -> Box<dyn Learner> {
        crate::run::config::build_model("logreg", &toml::Table::new()).unwrap()
    }

    fn state(next: u64, epoch: u32, pos: u64, done: bool) -> TrainState {
        let mut s = TrainState::new("r", "logreg", 0, false, 5);
        s.next_batch = next;
        s.epoch = epoch;
        s.batch_in_epoch = pos;
        s.epoch_done = done;
        s
    }

    #[test]
    fn names_order_find_and_prune() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("checkpoints");
        let mut m = model();
        let (x, y) = random_batch(&mut crate::rng::SplitMix(3), 16, 3072);
        m.partial_fit(x.view(), y.view()).unwrap();
        for s in [
            state(3, 1, 3, false),
            state(10, 1, 10, true),
            state(13, 2, 3, false),
            state(6, 1, 6, false),
        ] {
            save(&root, &s, m.as_ref(), "model = \"logreg\"\n").unwrap();
        }
        let names: Vec<String> = list(&root).unwrap().iter().map(|c| c.name()).collect();
        assert_eq!(
            names,
            [
                "epoch-1-batch-3",
                "epoch-1-batch-6",
                "epoch-1",
                "epoch-2-batch-3"
            ]
        );
        let last = latest(&root).unwrap().unwrap();
        assert_eq!(last.name(), "epoch-2-batch-3");
        assert_eq!(last.state.next_batch, 13);
        assert_eq!(last.config().unwrap(), "model = \"logreg\"\n");
        let loaded = find(&root, "epoch-1").unwrap().model().unwrap();
        assert_eq!(
            loaded.predict_proba(x.view()).unwrap(),
            m.predict_proba(x.view()).unwrap()
        );
        let err = find(&root, "epoch-9").unwrap_err().to_string();
        assert!(
            err.contains("epoch-9") && err.contains("epoch-1-batch-3"),
            "{err}"
        );
        // A torn checkpoint's temporary folder is ignored, then pruned.
        fs::create_dir_all(root.join(".tmp-epoch-3-1")).unwrap();
        assert_eq!(list(&root).unwrap().len(), 4);
        prune(&root, 1).unwrap();
        let names: Vec<String> = list(&root).unwrap().iter().map(|c| c.name()).collect();
        assert_eq!(names, ["epoch-1", "epoch-2-batch-3"]);
        assert!(!root.join(".tmp-epoch-3-1").exists());
    }

    #[test]
    fn empty_or_missing_folder_has_no_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        assert!(latest(&dir.path().join("nope")).unwrap().is_none());
        assert!(find(dir.path(), "epoch-1")
            .unwrap_err()
            .to_string()
            .contains("none"));
    }
}
