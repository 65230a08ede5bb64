//! The trainer through the command line: the one-command run, test-then-train against
//! score-after-fit, checkpoints by name, and bad input to the trainer.

use crate::common;

use std::path::Path;

use cifar_df::wire::spark_json;
use common::*;

#[test]
fn one_command_trains_over_loopback_tcp_and_reports() {
    // The README's first command, in an empty folder: no flags at all.
    let tmp = tempfile::tempdir().unwrap();
    let (stdout, stderr) = run_ok(bin().arg("train").current_dir(tmp.path()));
    assert!(stderr.contains("loopback TCP"), "{stderr}");
    assert!(
        stdout.contains("logreg on loopback:synthetic:5000:1000:0 · 40 batches"),
        "{stdout}"
    );
    assert!(stdout.contains("test (epoch-1): 1000 images"), "{stdout}");
    assert!(
        stdout.contains("query:") && stdout.contains("tables:"),
        "{stdout}"
    );
    let runs = tmp.path().join("runs");
    let names: Vec<String> = std::fs::read_dir(&runs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].starts_with("logreg-"), "{names:?}");
    let run = runs.join(&names[0]);
    assert!(run.join("checkpoints/epoch-1/model.safetensors").is_file());
    // The plots the summary points to.
    assert!(stdout.contains("plots: 6 PNGs"), "{stdout}");
    for png in [
        "loss",
        "accuracy",
        "precision",
        "recall",
        "f1",
        "confusion-test",
    ] {
        let path = run.join("plots").join(format!("{png}.png"));
        let (width, height, _) = decode_png(&path);
        assert!(width >= 600 && height >= 400, "{}", path.display());
    }
    assert_eq!(
        query_csv(
            &runs,
            "select count(*) as n, count(distinct batch) as b, sum(images) as i from metrics"
        ),
        "n,b,i\n40,40,5000\n"
    );
    assert_eq!(
        query_csv(
            &runs,
            "select split, count(*) as n, count(distinct batch) as b, sum(images) as i from eval_metrics group by split"
        ),
        "split,n,b,i\ntest,8,8,1000\n"
    );
    assert_eq!(
        query_csv(&runs, "select status, batches, images from runs"),
        "status,batches,images\nfinished,40,5000\n"
    );
    // Test accuracy well above chance.
    let acc: f64 = query_value(
        &runs,
        "select sum(acc * images) / sum(images) from eval_metrics where split = 'test'",
    );
    assert!(acc > 0.3, "{acc}");
}

#[test]
fn test_then_train_and_score_after_fit() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let runs_s = runs.to_str().unwrap();
    for (run, extra) in [("before", None), ("after", Some("--eval-after-fit"))] {
        let mut c = bin();
        c.args([
            "-q",
            "train",
            "--data",
            "synthetic:1000:100:3",
            "--batch-size",
            "100",
            "--no-plots",
            "--no-test",
            "--run",
            run,
            "--runs",
            runs_s,
        ]);
        if let Some(e) = extra {
            c.arg(e);
        }
        run_ok(&mut c);
    }
    // Scored before learning, the first batch meets logreg's all-zero weights: uniform
    // probabilities, loss ln 10. Scored after, the model has seen it.
    let first = |run: &str| -> f64 {
        query_value(
            &runs,
            &format!("select loss from metrics where run = '{run}' and batch = 0"),
        )
    };
    assert!(
        (first("before") - 10f64.ln()).abs() < 1e-6,
        "{}",
        first("before")
    );
    assert!(
        first("after") < first("before") - 0.05,
        "{}",
        first("after")
    );
    // Scoring after fitting is the optimistic view: higher training accuracy.
    let acc = query_csv(
        &runs,
        "select run, sum(acc * images) / sum(images) as a from metrics group by run order by run",
    );
    let vals: Vec<f64> = acc
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
        .collect();
    assert!(vals[0] > vals[1], "after {} vs before {}", vals[0], vals[1]);
    // How a batch is scored does not change what the model learns.
    for f in ["model.safetensors", "model.json"] {
        assert_eq!(
            std::fs::read(runs.join("before/checkpoints/epoch-1").join(f)).unwrap(),
            std::fs::read(runs.join("after/checkpoints/epoch-1").join(f)).unwrap()
        );
    }
}

#[test]
fn predict_loads_a_checkpoint_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let runs_s = runs.to_str().unwrap();
    run_ok(bin().args([
        "-q",
        "train",
        "--data",
        "synthetic:600:200:2",
        "--epochs",
        "3",
        "--batch-size",
        "100",
        "--checkpoint-every",
        "4",
        "--keep-checkpoints",
        "0",
        "--no-plots",
        "--run",
        "c",
        "--runs",
        runs_s,
    ]));
    let mut names: Vec<String> = std::fs::read_dir(runs.join("c/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    // 6 batches per epoch, a checkpoint every 4 stream batches: 4, 8 (epoch 2, batch 2),
    // 12 is epoch 2's end, 16 (epoch 3, batch 4).
    assert_eq!(
        names,
        [
            "epoch-1",
            "epoch-1-batch-4",
            "epoch-2",
            "epoch-2-batch-2",
            "epoch-3",
            "epoch-3-batch-4"
        ]
    );
    let predict = |ck: Option<&str>| -> String {
        let mut c = bin();
        c.args(["-q", "predict", "--run", "c", "--runs", runs_s]);
        if let Some(ck) = ck {
            c.args(["--checkpoint", ck]);
        }
        // Everything but the first line's timing.
        let out = run_ok(&mut c).0;
        let (head, rest) = out.split_once('\n').unwrap();
        format!("{}\n{rest}", head.split(" · ").next().unwrap())
    };
    let latest = predict(None);
    assert!(
        latest.contains("checkpoint epoch-3 on loopback:synthetic:600:200:2"),
        "{latest}"
    );
    assert_eq!(predict(Some("epoch-3")), latest);
    let first = predict(Some("epoch-1-batch-4"));
    assert!(first.contains("checkpoint epoch-1-batch-4"), "{first}");
    assert_ne!(first, latest);
    // The test rows are the last pass's, tagged with its checkpoint's epoch.
    assert_eq!(
        query_csv(
            &runs,
            "select epoch, count(*) as n from eval_metrics where split = 'test' group by epoch"
        ),
        "epoch,n\n1,2\n"
    );
    let err = fails(bin().args([
        "-q",
        "predict",
        "--run",
        "c",
        "--runs",
        runs_s,
        "--checkpoint",
        "epoch-9",
    ]));
    assert!(
        err.contains("no checkpoint \"epoch-9\"") && err.contains("epoch-2-batch-2"),
        "{err}"
    );
}

/// A spark-json stream of `batches` batches of 3 images; batch `bad` has label 12 in row 1.
fn stream_file(path: &Path, batches: usize, bad: usize) {
    let mut out = Vec::new();
    for b in 0..batches {
        let labels: Vec<u16> = (0..3).map(|r| ((b + r) % 10) as u16).collect();
        let pixels: Vec<u8> = (0..3 * 3072)
            .map(|i| ((i * 7 + b * 13) % 256) as u8)
            .collect();
        let mut line = Vec::new();
        spark_json::encode(&labels, &pixels, &mut line);
        let mut text = String::from_utf8(line).unwrap();
        if b == bad {
            let row = text.find("\"1\": {").unwrap();
            let at = row + text[row..].find("\"label\": ").unwrap() + 9;
            let end = at + text[at..].find('}').unwrap();
            text.replace_range(at..end, "12");
        }
        out.extend_from_slice(text.as_bytes());
    }
    std::fs::write(path, out).unwrap();
}

#[test]
fn bad_input_to_the_trainer_is_a_clear_error_or_a_counted_rejection() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let runs_s = runs.to_str().unwrap();
    // `ARGS --runs RUNS` fails with `needle` in its stderr, and does not panic.
    let fails = |args: &[&str], needle: &str| {
        let err = common::fails(bin().args(args).args(["--runs", runs_s]));
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    };
    // Resuming a run with no checkpoint: a clear error, and no run is made up.
    fails(
        &["-q", "train", "--run", "ghost", "--resume"],
        "has no checkpoint to resume from",
    );
    assert!(!runs.join("ghost/run.json").exists());
    // A label outside 0..9 in the stream: that batch is rejected and counted, the rest
    // is learnt.
    let stream = tmp.path().join("s.jsonl");
    stream_file(&stream, 6, 2);
    let src = format!("file:{}", stream.display());
    // `FLAGS train` of run "s" from the stream, then `extra`, asserting success.
    let train_s = |flags: &[&str], extra: &[&str]| {
        run_ok(
            bin()
                .args(flags)
                .args(["train", "--source", &src, "--batch-size", "3", "--no-plots"])
                .args(["--run", "s", "--runs", runs_s])
                .args(extra),
        )
    };
    let (stdout, stderr) = train_s(&[], &[]);
    assert!(
        stdout.contains("5 batches") && stdout.contains("1 rejected"),
        "{stdout}"
    );
    assert!(stderr.contains("label 12"), "{stderr}");
    assert_eq!(
        query_csv(&runs, "select count(*) as n, sum(images) as i, min(batch) as lo, max(batch) as hi from metrics where run = 's'"),
        "n,i,lo,hi\n5,15,0,5\n"
    );
    assert_eq!(
        query_csv(
            &runs,
            "select count(*) as n from metrics where run = 's' and batch = 2"
        ),
        "n\n0\n"
    );
    // Training into an existing run without --resume: refused, nothing touched.
    let before = std::fs::read(runs.join("s/run.json")).unwrap();
    fails(
        &[
            "-q",
            "train",
            "--source",
            &src,
            "--batch-size",
            "3",
            "--run",
            "s",
        ],
        "--resume",
    );
    assert_eq!(std::fs::read(runs.join("s/run.json")).unwrap(), before);
    // --overwrite starts it over.
    train_s(&["-q"], &["--overwrite"]);
    assert_eq!(
        query_csv(&runs, "select count(*) as n from metrics where run = 's'"),
        "n\n5\n"
    );
    // A resumed run keeps its settings: a flag that changes them is refused, naming the
    // saved and the given value; the same command with --resume appended is fine.
    fails(
        &["-q", "train", "--run", "s", "--resume", "--lr", "0.5"],
        "logreg.lr: saved 0.01, given 0.5",
    );
    fails(
        &[
            "-q",
            "train",
            "--source",
            &src,
            "--batch-size",
            "4",
            "--run",
            "s",
            "--resume",
        ],
        "batch_size: saved 3, given 4",
    );
    let (out, _) = train_s(&["-q"], &["--resume", "--epochs", "2"]);
    assert!(out.contains("resumed from"), "{out}");
    // An unknown model, a config key that does not exist.
    fails(
        &["-q", "train", "--model", "forest"],
        "unknown model \"forest\"",
    );
    let cfg = tmp.path().join("c.toml");
    std::fs::write(&cfg, "model = \"logreg\"\nepoch = 2\n").unwrap();
    fails(
        &["-q", "train", "--config", cfg.to_str().unwrap()],
        "unknown key `epoch`",
    );
    // A source that never connects: the run is marked failed (tests/it/train.rs has the
    // details); one that connects and closes at once is an empty, finished run.
    fails(
        &[
            "-q",
            "train",
            "--source",
            "tcp://127.0.0.1:1",
            "--connect-timeout",
            "0.2",
            "--run",
            "f",
        ],
        "127.0.0.1:1",
    );
    assert_eq!(
        query_csv(&runs, "select run, status from runs order by run"),
        "run,status\nf,failed\ns,finished\n"
    );
}

#[test]
fn a_reader_that_goes_away_ends_the_output_quietly() {
    // `cifar-df predict ... | true`: the reader is gone before the metrics are printed.
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    run_ok(
        bin()
            .args(["-q", "train", "--data", "synthetic:200:100:1", "--no-plots"])
            .args(["--model", "logreg", "--run", "p", "--runs"])
            .arg(&runs),
    );
    let exe = env!("CARGO_BIN_EXE_cifar-df");
    let script = format!(
        "set -o pipefail; {exe} -q predict --run p --data synthetic:200:100:1 --runs {} | true",
        runs.display()
    );
    let out = std::process::Command::new("bash")
        .args(["-c", &script])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{stderr}");
}
