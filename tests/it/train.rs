//! End to end: synthetic data → `train` → `predict` → `query` over the run tables.

use crate::common;

use common::*;

#[test]
fn train_predict_query_on_the_synthetic_set() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let runs_s = runs.to_str().unwrap();
    let (stdout, _) = run_ok(bin().args([
        "-q",
        "train",
        "--model",
        "logreg",
        "--data",
        "synthetic:1000:300:1",
        "--epochs",
        "2",
        "--batch-size",
        "100",
        "--run",
        "r1",
        "--runs",
        runs_s,
    ]));
    assert!(stdout.contains("run r1"), "{stdout}");
    // train scored the dataset's test split at the end, from its last checkpoint.
    assert!(stdout.contains("test (epoch-2): 300 images"), "{stdout}");
    assert!(runs
        .join("r1/checkpoints/epoch-2/model.safetensors")
        .exists());
    assert!(runs
        .join("r1/checkpoints/epoch-1/model.safetensors")
        .exists());
    let (stdout, _) = run_ok(bin().args([
        "-q",
        "predict",
        "--run",
        "r1",
        "--runs",
        runs_s,
        "--data",
        "synthetic:1000:300:1",
    ]));
    assert!(stdout.contains("confusion matrix"), "{stdout}");
    // predict replaced the test rows train wrote (a second pass over the same split).
    let q = |sql: &str| query_csv(&runs, sql);
    // One metrics row per batch: 2 epochs × 10 batches of train, 3 batches of test.
    assert_eq!(
        q("select split, count(*) as n, count(distinct batch) as b, sum(images) as i from metrics group by split union all select split, count(*), count(distinct batch), sum(images) from eval_metrics group by split order by split"),
        "split,n,b,i\ntest,3,3,300\ntrain,20,20,2000\n"
    );
    assert_eq!(
        q("select min(epoch) as a, max(epoch) as e from metrics where split = 'train'"),
        "a,e\n1,2\n"
    );
    // The confusion matrix and predictions agree with each other and with the metrics,
    // for the test pass and for the batches scored while training.
    assert_eq!(
        q("select split, sum(count) as n from confusion group by split order by split"),
        "split,n\ntest,300\ntrain,2000\n"
    );
    for split in ["test", "train"] {
        assert_eq!(
            q(&format!("select count(*) as n, sum(case when label = predicted then 1 else 0 end) as ok from predictions where split = '{split}'")),
            q(&format!("select sum(images) as n, cast(round(sum(acc * images)) as bigint) as ok from {} where split = '{split}'", if split == "test" { "eval_metrics" } else { "metrics" })),
            "{split}"
        );
        assert_eq!(
            q(&format!("select sum(count) as ok from confusion where actual = predicted and split = '{split}'")),
            q(&format!("select sum(case when label = predicted then 1 else 0 end) as ok from predictions where split = '{split}'")),
            "{split}"
        );
    }
    // Running means: the last train row's acc_mean is the mean of all its acc values,
    // and acc_window the mean of the last 20 (here: all 20).
    assert_eq!(
        q("select round(avg(acc), 12) = round(max(case when batch = 19 then acc_mean end), 12) as m, round(avg(acc), 12) = round(max(case when batch = 19 then acc_window end), 12) as w from metrics where split = 'train'"),
        "m,w\ntrue,true\n"
    );
    // It learned: test accuracy well above chance (0.1).
    let acc: f64 = query_value(
        &runs,
        "select sum(acc * images) / sum(images) as a from eval_metrics where split = 'test'",
    );
    assert!(acc > 0.25, "test accuracy {acc}");
    // The runs table: one row per run.json.
    assert_eq!(
        q("select run, model, status, seed, batches, images, error is null as ok, \"end\" >= start as ordered from runs"),
        "run,model,status,seed,batches,images,ok,ordered\nr1,logreg,finished,0,20,2000,true,true\n"
    );
    // avg over the whole table just works.
    let avg = q("select avg(acc) from metrics");
    assert!(avg.lines().count() == 2, "{avg}");
}

#[test]
fn train_errors_are_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let err = fails(&mut on_data(
        &["-q", "train", "--model", "nope"],
        "synthetic:100:10",
        &runs,
    ));
    assert!(
        err.contains("unknown model \"nope\"") && err.contains("logreg"),
        "{err}"
    );
    let err = fails(&mut on_data(
        &["-q", "predict", "--run", "missing"],
        "synthetic:100:10",
        &runs,
    ));
    assert!(err.contains("has no checkpoint"), "{err}");
    // A query over runs that do not exist yet still answers.
    let stdout = query_csv(&runs, "select count(*) as n from metrics");
    assert_eq!(stdout, "n\n0\n");
}

#[test]
fn a_run_that_fails_is_marked_failed() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    // Nothing listens on port 1: the source never connects.
    let err = fails(
        bin()
            .args([
                "-q",
                "train",
                "--model",
                "svm",
                "--source",
                "tcp://127.0.0.1:1",
            ])
            .args(["--connect-timeout", "0.2", "--run", "f", "--runs"])
            .arg(&runs),
    );
    assert!(
        err.contains("127.0.0.1:1") && !err.contains("panicked"),
        "{err}"
    );
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(runs.join("f/run.json")).unwrap()).unwrap();
    assert_eq!(info["status"], "failed", "{info}");
    assert_eq!(info["model"], "svm");
    assert!(
        info["error"].as_str().unwrap().contains("127.0.0.1:1"),
        "{info}"
    );
    let csv = query_csv(&runs, "select run, status from runs");
    assert_eq!(csv, "run,status\nf,failed\n");
}

/// airbench94's alternating flip in the training SQL, `hflip_alternating(image,
/// epoch(batch))`: over loopback (`--data`) the batches per epoch are known and the run
/// learns; from a source that does not know its epochs the error names `epoch(batch)` and
/// how to give them, once.
#[test]
fn alternating_flip_needs_a_source_that_knows_its_epochs() {
    let tmp = tempfile::tempdir().unwrap();
    let sql = tmp.path().join("alternating.sql");
    std::fs::write(
        &sql,
        "SELECT batch, \"row\", label, \
         normalize(hflip_alternating(image, epoch(batch)), \
                   0.4914, 0.4822, 0.4465, 0.2470, 0.2435, 0.2616) AS features \
         FROM stream",
    )
    .unwrap();
    let runs = tmp.path().join("runs");
    let train = |source: &str, data: &str| {
        let mut cmd = bin();
        cmd.args([
            "-q",
            "train",
            "--model",
            "logreg",
            "--run",
            &source[2..],
            source,
            data,
        ])
        .args(["--epochs", "2", "--batch-size", "100", "--runs"])
        .arg(&runs)
        .arg("--sql")
        .arg(&sql);
        cmd
    };
    let (stdout, _) = run_ok(&mut train("--data", "synthetic:400:100:1"));
    assert!(stdout.contains("test (epoch-2): 100 images"), "{stdout}");
    let e = fails(&mut train("--source", "synthetic:400:100:1"));
    assert!(
        e.contains("epoch(batch)") && e.contains("train --data"),
        "{e}"
    );
    assert_eq!(e.matches("epochs are not known").count(), 1, "{e}");
}
