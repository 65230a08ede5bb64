//! Error messages as a user sees them: each cause said once, with the path or the query.

use crate::common;

use common::bin;

/// Runs `cifar-df ARGS`, which must fail; its stderr.
fn fails(args: &[&str]) -> String {
    let o = bin().args(args).output().unwrap();
    assert!(!o.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn each_cause_is_said_once() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let runs = runs.to_str().unwrap();
    let cases: [(&[&str], &str, &str); 4] = [
        (
            &["train", "--data", "/nonexistent/d", "--runs", runs],
            "/nonexistent/d",
            "No such file or directory",
        ),
        (
            &["export", "--source", "/nonexistent/d", "--out", "x.parquet"],
            "/nonexistent/d",
            "No such file or directory",
        ),
        (
            &[
                "query",
                "select * from '/nonexistent/t.parquet'",
                "--runs",
                runs,
            ],
            "/nonexistent/t.parquet",
            "not found",
        ),
        (
            &["query", "select nope from (select 1 as a)", "--runs", runs],
            "nope",
            "No field named nope",
        ),
    ];
    for (args, what, cause) in cases {
        let e = fails(args);
        let line = e.lines().find(|l| l.starts_with("error: ")).unwrap_or("");
        assert!(line.contains(what), "{args:?}: {e}");
        assert_eq!(
            e.matches(cause).count(),
            1,
            "{args:?} says {cause:?} more than once: {e}"
        );
    }
}

#[test]
fn export_onto_an_existing_file_needs_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.parquet");
    let out_s = out.to_str().unwrap();
    let export = |extra: &[&str]| {
        bin()
            .args([
                "-q",
                "export",
                "--source",
                "synthetic:200:10",
                "--out",
                out_s,
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    assert!(export(&[]).status.success());
    let before = std::fs::read(&out).unwrap();
    let o = export(&["--batch-size", "50"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{e}");
    assert!(
        e.contains(out_s) && e.contains("already exists") && e.contains("--overwrite"),
        "{e}"
    );
    assert_eq!(e.matches("already exists").count(), 1, "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), before, "the file was touched");
    assert!(export(&["--overwrite", "--batch-size", "50"])
        .status
        .success());
    assert_ne!(std::fs::read(&out).unwrap(), before);
}
