//! The ADWIN drift detector against River's `drift.ADWIN` (defaults) on fixed sequences:
//! the same detection indices and directions, exactly; the trainer flags the rises of its
//! loss; a stream whose classes change halfway is flagged after the change and not before.

use crate::common;

use std::process::Command;

use cifar_df::run::drift::{Adwin, AdwinParams, Change};

#[test]
fn adwin_detects_where_river_does() {
    if !common::have_python("river", "the ADWIN reference") {
        return;
    }
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/ref/adwin_reference.py"
        ))
        .output()
        .expect("run the ADWIN reference");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut cases = 0;
    let mut total = 0;
    for line in text.lines() {
        let case: serde_json::Value = serde_json::from_str(line).unwrap();
        let name = case["name"].as_str().unwrap();
        let values: Vec<f64> = case["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let want: Vec<usize> = case["detections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let want_rises: Vec<bool> = case["rises"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_bool().unwrap())
            .collect();
        let mut adwin = Adwin::new(AdwinParams::default()).unwrap();
        let (got, rises): (Vec<usize>, Vec<bool>) = values
            .iter()
            .enumerate()
            .filter_map(|(i, &v)| adwin.update(v).map(|c| (i, c == Change::Rise)))
            .unzip();
        assert_eq!(got, want, "{name}: detection indices differ from River's");
        assert_eq!(rises, want_rises, "{name}: directions differ from River's");
        eprintln!(
            "{name}: {} values, detections at {got:?} (River: the same)",
            values.len()
        );
        cases += 1;
        total += want.len();
    }
    assert_eq!(cases, 4);
    assert!(total > 5, "the sequences must have drifts to find");
}

/// A synthetic training set (8,000 images in five CIFAR binary files) whose classes change
/// halfway: from image 4,000 on, every label is the next class (a permutation of the
/// classes, so what a model learnt becomes wrong at once).
fn class_change_folder(root: &std::path::Path) -> std::path::PathBuf {
    let dir = root.join("change");
    common::run_ok(
        common::bin()
            .args([
                "-q", "synth", "--train", "8000", "--test", "10", "--seed", "3",
            ])
            .args(["--layout", "bin", "--out"])
            .arg(&dir),
    );
    let mut image = 0usize;
    for k in 1..=5 {
        let path = dir.join(format!("cifar-10-batches-bin/data_batch_{k}.bin"));
        let mut bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() % 3073, 0);
        for record in bytes.chunks_exact_mut(3073) {
            if image >= 4000 {
                record[0] = (record[0] + 1) % 10;
            }
            image += 1;
        }
        std::fs::write(&path, bytes).unwrap();
    }
    assert_eq!(image, 8000);
    dir
}

/// River's ADWIN on `losses` (one per line): the indices where it detected a rise of the
/// mean, and those where it detected a fall.
fn river_changes(losses: &str) -> (Vec<usize>, Vec<usize>) {
    let script = "import sys\nfrom river import drift\na = drift.ADWIN()\nfor i, l in \
                  enumerate(sys.stdin):\n    v = float(l)\n    before = (a.estimation * \
                  a.width + v) / (a.width + 1)\n    a.update(v)\n    if a.drift_detected: \
                  print(i, 'rise' if a.estimation > before else 'fall')\n";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(losses.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let (mut rises, mut falls) = (Vec::new(), Vec::new());
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let (i, way) = line.split_once(' ').unwrap();
        let i: usize = i.parse().unwrap();
        if way == "rise" {
            rises.push(i)
        } else {
            falls.push(i)
        }
    }
    (rises, falls)
}

/// The trainer's `drift` column on a stream whose classes change at batch 200 (of 400):
/// flagged after the change and never before, for logreg and the MLP; the flags are
/// River's ADWIN rises on the same per-batch losses (read back from `metrics`), also for
/// a run interrupted after 150 batches and resumed (the detector's state is checkpointed);
/// the loss plot marks each flagged batch.
#[test]
fn a_class_change_is_flagged_after_it_and_not_before() {
    if !common::have_python("river", "the ADWIN reference") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = class_change_folder(dir.path());
    let runs = dir.path().join("runs");
    let r = runs.to_str().unwrap();
    let train = |run: &str, extra: &[&str]| {
        common::run_ok(
            common::bin()
                .args(["-q", "train", "--runs", r, "--run", run, "--no-test"])
                .args(["--no-plots", "--batch-size", "20", "--data"])
                .arg(&data)
                .args(extra),
        )
    };
    train("logreg", &["--model", "logreg", "--max-batches", "150"]);
    train("logreg", &["--resume"]);
    train("mlp", &["--model", "mlp"]);
    for run in ["logreg", "mlp"] {
        let csv = common::query_csv(
            &runs,
            &format!("select batch, loss, drift from metrics where run = '{run}' order by batch"),
        );
        let mut losses = String::new();
        let mut ours = Vec::new();
        for (i, line) in csv.lines().skip(1).enumerate() {
            let f: Vec<&str> = line.split(',').collect();
            assert_eq!(f[0], i.to_string(), "{run}: each batch once, in order");
            losses.push_str(f[1]);
            losses.push('\n');
            if f[2] == "true" {
                ours.push(i);
            }
        }
        assert_eq!(csv.lines().count(), 401, "{run}: 400 batches");
        let (rises, falls) = river_changes(&losses);
        eprintln!("{run}: flagged {ours:?}; River: rises {rises:?}, falls {falls:?}");
        assert_eq!(
            ours, rises,
            "{run}: drift flags vs River's rises on the same losses"
        );
        assert!(
            ours.iter().all(|&b| b >= 200),
            "{run}: a drift flagged before the change at batch 200: {ours:?}"
        );
        assert!(
            ours.first().is_some_and(|&b| b < 264),
            "{run}: the change at batch 200 was not flagged within 64 batches: {ours:?}"
        );
    }

    // The loss plot marks each flagged batch with a dashed purple line (128, 40, 170).
    let plots = dir.path().join("plots");
    common::run_ok(
        common::bin()
            .args(["-q", "plot", "--runs", r, "--run", "logreg", "--out"])
            .arg(&plots),
    );
    let flagged = common::query_csv(
        &runs,
        "select count(*) from metrics where run = 'logreg' and drift",
    );
    let flagged: usize = flagged.lines().nth(1).unwrap().parse().unwrap();
    let (_, _, buf) = common::png_pixels(&plots.join("loss.png"));
    let purple = buf
        .chunks_exact(3)
        .filter(|p| p == &[128u8, 40, 170])
        .count();
    // Each marker is a 2-pixel dashed line over most of the plot's height (~500 px).
    assert!(
        purple > 150 * flagged,
        "{purple} marker pixels for {flagged} drifts"
    );
}
