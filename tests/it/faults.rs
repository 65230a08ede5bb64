//! A panic in the source thread (injected with `CIFAR_DF_FAULT=source-panic:N`, as a buggy
//! reader would panic) reaches the command: non-zero exit, the cause said once, and what
//! was received before it kept and committed.

use crate::common;

use common::{bin, query_csv, run_ok};

#[test]
fn a_panicking_source_fails_export_and_keeps_the_batches_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = bin()
        .env("CIFAR_DF_FAULT", "source-panic:3")
        .args([
            "-q",
            "export",
            "--source",
            "synthetic:1000:10",
            "--batch-size",
            "100",
        ])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("the source failed after 3 batches") && err.contains("300 images"),
        "{err}"
    );
    assert_eq!(err.matches("injected fault").count(), 1, "said once: {err}");
    assert!(
        !err.contains("panicked at"),
        "the panic hook spoke too: {err}"
    );
    let (n, _) = run_ok(bin().args([
        "-q",
        "query",
        "--format",
        "csv",
        &format!("select count(*) as n from '{}'", out.display()),
    ]));
    assert_eq!(n.trim(), "n\n300");
}

#[test]
fn a_panicking_source_fails_training_with_a_checkpoint_to_resume_from() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let r = runs.to_str().unwrap();
    let o = bin()
        .env("CIFAR_DF_FAULT", "source-panic:5")
        .args([
            "-q",
            "train",
            "--data",
            "synthetic:1000:100",
            "--batch-size",
            "100",
        ])
        .args(["--runs", r, "--run", "f", "--no-plots"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("the source failed after 5 batches"), "{err}");
    let info = std::fs::read_to_string(runs.join("f/run.json")).unwrap();
    assert!(info.contains("\"status\": \"failed\"") && info.contains("injected fault"));
    assert!(
        info.contains("\"checkpoint\": \"epoch-1-batch-5\""),
        "{info}"
    );
    let q = query_csv(
        &runs,
        "select count(*) as n, count(distinct batch) as b from metrics",
    );
    assert_eq!(q.trim(), "n,b\n5,5");
    // Resuming carries on from the checkpoint: each batch once.
    run_ok(bin().args([
        "-q",
        "train",
        "--runs",
        r,
        "--run",
        "f",
        "--resume",
        "--no-plots",
    ]));
    let q = query_csv(
        &runs,
        "select count(*) as n, count(distinct batch) as b from metrics",
    );
    assert_eq!(q.trim(), "n,b\n10,10");
}
