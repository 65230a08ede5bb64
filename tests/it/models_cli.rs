//! Every model through the command line: `train --config configs/MODEL.toml` on the
//! synthetic set, `predict` on its test split, metrics in the run tables; k-means cluster
//! grids; config files and flag overrides, and their errors.

use crate::common;

use std::path::Path;

use common::*;

fn config(name: &str) -> String {
    format!("{}/configs/{name}.toml", env!("CARGO_MANIFEST_DIR"))
}

/// Trains `model` from its shipped config on a small synthetic set and returns the test
/// accuracy `predict` prints.
fn train_and_predict(runs: &Path, model: &str, extra: &[&str]) -> f64 {
    let runs_s = runs.to_str().unwrap();
    let data = "synthetic:1500:400:3";
    let cfg = config(model);
    let mut args = vec![
        "-q", "train", "--config", &cfg, "--data", data, "--epochs", "2", "--run", model, "--runs",
        runs_s,
    ];
    args.extend_from_slice(extra);
    let (stdout, _) = run_ok(bin().args(&args));
    assert!(stdout.contains(&format!("run {model}")), "{stdout}");
    assert!(stdout.contains("model fit"), "{stdout}");
    let (stdout, _) = run_ok(bin().args([
        "-q", "predict", "--run", model, "--runs", runs_s, "--data", data,
    ]));
    stdout
        .split("accuracy ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no accuracy in {stdout}"))
}

#[test]
fn every_model_learns_the_synthetic_set_from_its_config() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    // Chance is 0.1; the bars are well below what each model gets (see docs/training.md).
    for (model, bar, extra) in [
        ("svm", 0.25, &["--set", "average=1"][..]),
        ("mlp", 0.3, &["--lr", "0.001"][..]),
        ("kmeans", 0.13, &["--k", "100"][..]),
        ("svm-kernel", 0.3, &["--buffer", "600"][..]),
        ("cnn", 0.3, &["--set", "widths=[16,32,32]"][..]),
    ] {
        let acc = train_and_predict(&runs, model, extra);
        assert!(acc > bar, "{model}: test accuracy {acc}");
        let saved = std::fs::read_to_string(runs.join(model).join("config.toml")).unwrap();
        assert!(saved.contains(&format!("model = \"{model}\"")), "{saved}");
    }
    // The runs' metrics are all in the one table.
    let (csv, _) = run_ok(bin().args([
        "query",
        "select model, count(distinct run) as runs from eval_metrics where split = 'test' group by model order by model",
        "--format",
        "csv",
        "--runs",
        runs.to_str().unwrap(),
    ]));
    assert_eq!(
        csv,
        "model,runs\ncnn,1\nkmeans,1\nmlp,1\nsvm,1\nsvm-kernel,1\n"
    );
    // The CNN's pooled last layer as features for another model (transfer learning).
    let f = tmp.path().join("cnn-features");
    let (out, _) = run_ok(bin().args([
        "-q",
        "features",
        "--data",
        "synthetic:1500:400:3",
        "--extractor",
        "run:cnn",
        "--runs",
        runs.to_str().unwrap(),
        "--out",
        f.to_str().unwrap(),
    ]));
    assert!(out.contains("parts written"), "{out}");
    let (out, _) = run_ok(bin().args([
        "-q",
        "train",
        "--model",
        "logreg",
        "--source",
        &format!("features:{}", f.display()),
        "--runs",
        runs.to_str().unwrap(),
        "--run",
        "on-cnn-features",
        "--no-plots",
    ]));
    let acc: f64 = out
        .split("test (")
        .nth(1)
        .and_then(|s| s.split("accuracy ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no test accuracy in {out}"));
    assert!(acc > 0.3, "logreg on the CNN's features: {acc}");
    // A run whose model is not a CNN, and one that does not exist, are named.
    for (spec, want) in [("run:svm", "not a CNN"), ("run:nothing", "no checkpoint")] {
        let f = tmp.path().join("bad");
        let out = bin()
            .args([
                "-q",
                "features",
                "--data",
                "synthetic:100:10:3",
                "--extractor",
                spec,
            ])
            .args([
                "--runs",
                runs.to_str().unwrap(),
                "--out",
                f.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{spec}: {err}");
    }
    // k-means predict wrote a PNG grid per non-empty cluster.
    let grids: Vec<_> = std::fs::read_dir(runs.join("kmeans/clusters"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        grids.len() >= 10 && grids.len() <= 100,
        "{} grids",
        grids.len()
    );
    for g in &grids {
        let bytes = std::fs::read(g).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", g.display());
    }
}

#[test]
fn flags_override_the_config_and_bad_settings_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let runs_s = runs.to_str().unwrap();
    let (_, _) = run_ok(bin().args([
        "-q",
        "train",
        "--config",
        &config("mlp"),
        "--data",
        "synthetic:300:10",
        "--hidden",
        "16,8",
        "--set",
        "optimizer=sgd",
        "--set",
        "passes=2",
        "--epochs",
        "1",
        "--run",
        "o",
        "--runs",
        runs_s,
    ]));
    let saved = std::fs::read_to_string(runs.join("o/config.toml")).unwrap();
    assert!(
        saved.contains("hidden = [16, 8]") || saved.contains("hidden = [\n    16,\n    8,\n]"),
        "{saved}"
    );
    assert!(
        saved.contains("optimizer = \"sgd\"") && saved.contains("passes = 2"),
        "{saved}"
    );
    assert!(saved.contains("lr = 0.0003"), "config value kept: {saved}");
    let meta = std::fs::read_to_string(runs.join("o/checkpoints/epoch-1/model.json")).unwrap();
    assert!(meta.contains("\"optimizer\": \"sgd\""), "{meta}");

    let bad_cfg = tmp.path().join("bad.toml");
    std::fs::write(&bad_cfg, "model = \"mlp\"\nepoch = 3\n").unwrap();
    for (args, needle) in [
        (
            vec!["--config", bad_cfg.to_str().unwrap()],
            "unknown key `epoch`",
        ),
        (vec!["--model", "forest"], "unknown model \"forest\""),
        (
            vec!["--model", "kmeans", "--lr", "0.1"],
            "unknown field `lr`",
        ),
        (
            vec!["--model", "mlp", "--set", "hiden=[3]"],
            "unknown field `hiden`",
        ),
        (
            vec!["--model", "svm", "--loss", "log"],
            "unknown variant `log`",
        ),
        (vec!["--model", "mlp", "--set", "lr=-1"], "lr must be"),
        (
            vec!["--config", "/no/such/config.toml"],
            "/no/such/config.toml",
        ),
    ] {
        let out = bin()
            .args([
                "-q",
                "train",
                "--data",
                "synthetic:100:10",
                "--runs",
                runs_s,
            ])
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
