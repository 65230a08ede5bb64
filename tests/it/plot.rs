//! `cifar-df plot` end to end: train and score a run on the synthetic set, then plot it.

use crate::common;

use std::path::PathBuf;

use common::*;

#[test]
fn plot_draws_curves_confusion_and_comparison_of_a_trained_run() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let runs_s = runs.to_str().unwrap();
    let data = "synthetic:600:200";
    run_ok(bin().args([
        "-q", "train", "--data", data, "--epochs", "2", "--run", "a", "--runs", runs_s,
    ]));
    run_ok(bin().args([
        "-q", "predict", "--run", "a", "--runs", runs_s, "--data", data,
    ]));
    let (stdout, _) = run_ok(bin().args([
        "plot",
        "--run",
        "a",
        "--confusion",
        "a",
        "--compare",
        "a",
        "--runs",
        runs_s,
    ]));
    let printed: Vec<PathBuf> = stdout.lines().map(PathBuf::from).collect();
    let plots = runs.join("a/plots");
    let mut expected: Vec<PathBuf> = [
        "loss",
        "accuracy",
        "precision",
        "recall",
        "f1",
        "confusion-test",
    ]
    .iter()
    .map(|n| plots.join(format!("{n}.png")))
    .collect();
    expected.push(runs.join("plots/test_accuracy.png"));
    expected.push(runs.join("plots/test_loss.png"));
    assert_eq!(printed, expected, "{stdout}");
    for p in &expected {
        let (w, h, colours) = decode_png(p);
        assert!(w >= 700 && h >= 600, "{}: {w}x{h}", p.display());
        assert!(colours > 20, "{} looks blank", p.display());
    }

    // --out, and the train confusion (the last epoch's rows scored while training).
    let out_dir = tmp.path().join("elsewhere");
    let out = bin()
        .args([
            "plot",
            "--confusion",
            "a",
            "--split",
            "train",
            "--runs",
            runs_s,
            "--out",
            out_dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let train = out_dir.join("confusion-train.png");
    assert_eq!(stdout.trim(), train.to_str().unwrap());
    assert_eq!(decode_png(&train).0, 800);
    // A split with no rows is an error naming the run and the split.
    let out = bin()
        .args(["plot", "--confusion", "a", "--split", "train", "--runs"])
        .arg(tmp.path().join("empty-runs"))
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn plot_errors_name_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let runs_s = runs.to_str().unwrap();
    let out = bin().args(["plot", "--runs", runs_s]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--run") && stderr.contains("--compare"),
        "{stderr}"
    );

    let out = bin()
        .args(["plot", "--compare", "a", "nope", "--runs", runs_s])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown run a"), "{stderr}");

    let out = bin()
        .args(["plot", "--run", "ghost", "--runs", runs_s])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("run ghost has no training metrics"),
        "{stderr}"
    );
    assert!(!runs.join("ghost/plots").exists());
}
