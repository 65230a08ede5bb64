//! The ADWIN drift detector against River's `drift.ADWIN` (defaults) on fixed sequences:
//! the same detection indices, exactly.

mod common;

use std::process::Command;

use cifar_df::drift::{Adwin, AdwinParams};

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
        let mut adwin = Adwin::new(AdwinParams::default()).unwrap();
        let got: Vec<usize> = values
            .iter()
            .enumerate()
            .filter_map(|(i, &v)| adwin.update(v).then_some(i))
            .collect();
        assert_eq!(got, want, "{name}: detection indices differ from River's");
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

/// The trainer's `drift` column: River's ADWIN run on the same per-batch losses (read
/// back from `metrics`) flags the same batches, and the flags survive a resume.
#[test]
fn the_trainers_drift_flags_are_rivers_on_its_losses() {
    if !common::have_python("river", "the ADWIN reference") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let r = runs.to_str().unwrap();
    let train = |extra: &[&str]| {
        common::run_ok(
            common::bin()
                .args([
                    "-q",
                    "train",
                    "--runs",
                    r,
                    "--run",
                    "d",
                    "--no-test",
                    "--no-plots",
                ])
                .args(extra),
        )
    };
    // Interrupted after 150 batches and resumed: the detector's state is checkpointed.
    train(&[
        "--data",
        "synthetic:4000:100",
        "--batch-size",
        "10",
        "--model",
        "logreg",
        "--max-batches",
        "150",
    ]);
    train(&["--resume"]);
    let csv = common::query_csv(
        &runs,
        "select batch, loss, drift from metrics order by batch",
    );
    let mut losses = String::new();
    let mut ours = Vec::new();
    for (i, line) in csv.lines().skip(1).enumerate() {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f[0], i.to_string());
        losses.push_str(f[1]);
        losses.push('\n');
        if f[2] == "true" {
            ours.push(i);
        }
    }
    assert_eq!(
        ours.len(),
        csv.lines().skip(1).filter(|l| l.ends_with("true")).count()
    );
    let script = "import sys\nfrom river import drift\na = drift.ADWIN()\nfor i, l in \
                  enumerate(sys.stdin):\n    a.update(float(l))\n    if a.drift_detected: \
                  print(i)\n";
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
    let river: Vec<usize> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(
        ours, river,
        "drift flags in metrics vs River on the same losses"
    );
    assert!(
        !ours.is_empty(),
        "the loss curve of a fresh model should drift"
    );

    // The loss plot marks each flagged batch with a dashed purple line (128, 40, 170).
    let plots = dir.path().join("plots");
    common::run_ok(
        common::bin()
            .args(["-q", "plot", "--runs", r, "--run", "d", "--out"])
            .arg(&plots),
    );
    let (_, _, buf) = common::png_pixels(&plots.join("loss.png"));
    let purple = buf
        .chunks_exact(3)
        .filter(|p| p == &[128u8, 40, 170])
        .count();
    // Each marker is a 2-pixel dashed line over most of the plot's height (~500 px).
    assert!(
        purple > 150 * ours.len(),
        "{purple} marker pixels for {} drifts",
        ours.len()
    );
}
