//! Checkpoints, resume and crash safety through the command line: a run interrupted after
//! k batches (cleanly, or by `kill -9`) and resumed ends with the same checkpoint bytes and
//! the same metrics as the run done in one go, with every batch in the tables once.

use crate::common;

use std::path::Path;
use std::process::Stdio;

use common::*;

const DATA: &str = "synthetic:1200:200:4";

/// `train` with the settings every run here shares, plus `extra`.
fn train(runs: &Path, run: &str, model: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "-q",
        "train",
        "--model",
        model,
        "--data",
        DATA,
        "--epochs",
        "2",
        "--batch-size",
        "100",
        "--checkpoint-every",
        "5",
        "--no-test",
        "--no-plots",
        "--run",
        run,
        "--runs",
        runs.to_str().unwrap(),
    ];
    if model == "svm-kernel" {
        args.extend(["--buffer", "300"]);
    }
    if model == "kmeans" {
        args.extend(["--k", "20"]);
    }
    if model == "cnn" {
        // Each epoch in its own order: a resumed run must see the order it left.
        args.extend(["--set", "widths=[8,16,16]", "--shuffle"]);
        // In bf16 wherever the CPU has it (`auto` may choose f32 where bf16 is slower).
        if cifar_df::model::cnn::Kernel::best_bf16().is_some() {
            args.extend(["--precision", "bf16"]);
        }
    }
    args.extend_from_slice(extra);
    run_ok(bin().args(&args)).0
}

/// `train --resume` of `run` without a test pass, plus `extra`, asserting success; its stdout.
fn resume(runs: &Path, run: &str, extra: &[&str]) -> String {
    run_ok(resume_run(runs, run).arg("--no-test").args(extra)).0
}

/// The model files of checkpoint `name` of two runs are byte for byte the same.
fn assert_same_checkpoint(runs: &Path, a: &str, b: &str, name: &str) {
    for file in ["model.safetensors", "model.json"] {
        let pa = runs.join(a).join("checkpoints").join(name).join(file);
        let pb = runs.join(b).join("checkpoints").join(name).join(file);
        let (x, y) = (std::fs::read(&pa).unwrap(), std::fs::read(&pb).unwrap());
        assert!(x == y, "{} and {} differ", pa.display(), pb.display());
    }
}

/// The training metrics of a run, batch by batch (everything but timings).
fn train_metrics(runs: &Path, run: &str) -> String {
    query_csv(
        runs,
        &format!(
            "select epoch, batch, images, acc, loss, precision, recall, f1, acc_mean, loss_mean, \
             f1_mean, acc_window, loss_window from metrics where run = '{run}' and split = 'train' \
             order by batch"
        ),
    )
}

fn batches_once(runs: &Path, run: &str) -> String {
    query_csv(
        runs,
        &format!(
            "select count(*) as n, count(distinct batch) as b from metrics where run = '{run}' \
             and split = 'train'"
        ),
    )
}

#[test]
fn interrupted_and_resumed_runs_end_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    // 12 batches per epoch, 2 epochs, a checkpoint every 5 stream batches.
    for model in ["logreg", "mlp", "svm", "kmeans", "svm-kernel", "cnn"] {
        let full = format!("{model}-full");
        train(&runs, &full, model, &[]);
        assert_eq!(batches_once(&runs, &full), "n,b\n24,24\n", "{model}");
        let reference = train_metrics(&runs, &full);
        // Stops after 1 batch, mid-epoch, exactly at the epoch's end, and in epoch 2.
        for k in [1u64, 7, 12, 17] {
            let run = format!("{model}-k{k}");
            let out = train(&runs, &run, model, &["--max-batches", &k.to_string()]);
            assert!(out.contains("interrupted"), "{out}");
            let status = query_csv(
                &runs,
                &format!("select status, batches from runs where run = '{run}'"),
            );
            assert_eq!(
                status,
                format!("status,batches\ninterrupted,{k}\n"),
                "{model} k={k}"
            );
            let out = resume(&runs, &run, &[]);
            assert!(out.contains("resumed from epoch-"), "{out}");
            assert_same_checkpoint(&runs, &full, &run, "epoch-2");
            assert_same_checkpoint(&runs, &full, &run, "epoch-1");
            assert_eq!(batches_once(&runs, &run), "n,b\n24,24\n", "{model} k={k}");
            assert_eq!(train_metrics(&runs, &run), reference, "{model} k={k}");
        }
    }
    // Interrupted twice, the second time with another thread count.
    train(&runs, "twice", "mlp", &["--max-batches", "3"]);
    resume(&runs, "twice", &["--max-batches", "11", "--threads", "1"]);
    resume(&runs, "twice", &[]);
    assert_same_checkpoint(&runs, "mlp-full", "twice", "epoch-2");
    assert_eq!(
        train_metrics(&runs, "twice"),
        train_metrics(&runs, "mlp-full")
    );
    let st = query_csv(
        &runs,
        "select status, resumes from runs where run = 'twice'",
    );
    assert_eq!(st, "status,resumes\nfinished,2\n");
    // A resumed run may go on for more epochs than it started with.
    resume(&runs, "twice", &["--epochs", "3"]);
    assert_eq!(batches_once(&runs, "twice"), "n,b\n36,36\n");
    assert!(runs.join("twice/checkpoints/epoch-3").is_dir());
}

/// Every Parquet file under `dir` reads to the end.
fn assert_all_parquet_readable(dir: &Path) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            n += assert_all_parquet_readable(&p);
        } else if p.extension().is_some_and(|e| e == "parquet") {
            let rows = parquet_rows(&p);
            assert!(rows > 0, "{}", p.display());
            n += 1;
        }
    }
    n
}

#[test]
fn kill_9_mid_epoch_then_resume_matches_an_uninterrupted_run() {
    kill_9_then_resume(&["--model", "mlp", "--hidden", "32"]);
    kill_9_then_resume(&["--model", "cnn", "--set", "widths=[8,16,16]"]);
}

/// A run of `model` (its flags) killed by SIGKILL after its third checkpoint, then
/// resumed, ends as the run done in one go.
fn kill_9_then_resume(model: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let args = |run: &str, sleep: &str| -> Vec<String> {
        ["-q", "train"]
            .iter()
            .chain(model)
            .chain(&[
                "--data",
                "synthetic:3000:100:2",
                "--epochs",
                "2",
                "--batch-size",
                "50",
                "--checkpoint-every",
                "7",
                "--sleep",
                sleep,
                "--no-test",
                "--no-plots",
                "--run",
                run,
                "--runs",
                runs.to_str().unwrap(),
            ])
            .map(|s| s.to_string())
            .collect()
    };
    run_ok(bin().args(args("whole", "0")));
    // 120 batches at ≥ 20 ms each: killed well before the end.
    kill_after_checkpoints(
        bin().args(args("killed", "0.02")),
        &runs.join("killed/checkpoints"),
        3,
    );
    // Everything in the run directory is readable; the run shows as interrupted.
    assert!(assert_all_parquet_readable(&runs.join("killed")) > 0);
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(runs.join("killed/run.json")).unwrap()).unwrap();
    assert_eq!(info["status"], "running");
    assert_eq!(
        query_csv(&runs, "select status from runs where run = 'killed'"),
        "status\ninterrupted\n"
    );
    // No batch twice, none after a gap.
    let got = query_csv(
        &runs,
        "select count(*) = count(distinct batch) as once, coalesce(max(batch) + 1, 0) = count(*) as dense, count(*) < 120 as partial from metrics where run = 'killed'",
    );
    assert_eq!(got, "once,dense,partial\ntrue,true,true\n");
    let out = resume(&runs, "killed", &[]);
    assert!(out.contains("resumed from epoch-"), "{out}");
    assert_same_checkpoint(&runs, "whole", "killed", "epoch-2");
    assert_eq!(batches_once(&runs, "killed"), "n,b\n120,120\n");
    assert_eq!(
        train_metrics(&runs, "killed"),
        train_metrics(&runs, "whole")
    );
    assert_eq!(
        query_csv(&runs, "select status from runs where run = 'killed'"),
        "status\nfinished\n"
    );
}

#[test]
fn two_trainers_at_once_do_not_interfere() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let runs_s = runs.to_str().unwrap();
    let cmd = |run: &str, model: &str, threads: &str| {
        let mut c = bin();
        c.args([
            "-q",
            "--threads",
            threads,
            "train",
            "--model",
            model,
            "--data",
            "synthetic:2000:100:1",
            "--epochs",
            "2",
            "--no-plots",
            "--run",
            run,
            "--runs",
            runs_s,
        ]);
        c
    };
    let a = cmd("a", "mlp", "1").stdout(Stdio::piped()).spawn().unwrap();
    let b = cmd("b", "logreg", "1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    for (child, what) in [(a, "a"), (b, "b")] {
        wait_ok(child, what);
    }
    // The same runs one at a time, with all cores.
    run_ok(&mut cmd("a-solo", "mlp", "2"));
    run_ok(&mut cmd("b-solo", "logreg", "2"));
    assert_same_checkpoint(&runs, "a", "a-solo", "epoch-2");
    assert_same_checkpoint(&runs, "b", "b-solo", "epoch-2");
    assert_eq!(
        query_csv(
            &runs,
            "select run, status, batches from runs where run in ('a', 'b') order by run"
        ),
        "run,status,batches\na,finished,32\nb,finished,32\n"
    );
    assert_eq!(
        query_csv(
            &runs,
            "select run, count(*) as n, count(distinct batch) as d from metrics where split = 'train' and run in ('a', 'b') group by run order by run"
        ),
        "run,n,d\na,32,32\nb,32,32\n"
    );
}

/// A bf16 run records its kernel; on a CPU without it (hidden with `CIFAR_DF_NO_BF16`)
/// a resume says which path the run used and how to go on in f32, `--precision bf16`
/// names the CPU feature missing, and `--resume --precision f32` goes on (recorded).
#[test]
fn a_bf16_run_goes_on_in_f32_when_asked_on_a_cpu_without_bf16() {
    use cifar_df::model::cnn::Kernel;
    let Some(kernel) = Kernel::best_bf16() else {
        eprintln!("a bf16 run resumed without bf16: not run: this CPU has no bf16 kernel");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path();
    let compute = || compute_of(runs, "p");
    let out = train(runs, "p", "cnn", &["--max-batches", "3"]);
    assert_eq!(compute(), format!("bf16 ({})", kernel.name()), "{out}");
    // `cmd` on a CPU without bf16, as far as the binary knows.
    let without = |cmd: &mut std::process::Command| {
        cmd.env("CIFAR_DF_NO_BF16", "1");
    };
    let runs_s = runs.to_str().unwrap();
    // The resume of run "p" without a test pass, on a CPU without bf16.
    let base = || {
        let mut cmd = resume_run(runs, "p");
        cmd.arg("--no-test");
        without(&mut cmd);
        cmd
    };
    let err = fails(&mut base());
    assert!(
        err.contains(kernel.name()) && err.contains("--precision f32"),
        "{err}"
    );
    assert_eq!(
        err.matches("--precision f32").count(),
        1,
        "said once: {err}"
    );
    let mut q = bin();
    without(q.args([
        "-q",
        "train",
        "--model",
        "cnn",
        "--data",
        DATA,
        "--precision",
        "bf16",
        "--run",
        "q",
        "--runs",
        runs_s,
        "--no-plots",
    ]));
    let err = fails(&mut q);
    assert!(err.contains("AVX512-BF16"), "{err}");
    run_ok(base().args(["--precision", "f32"]));
    assert_eq!(compute(), "f32");
}

/// A run learnt on AMX resumed where AMX is missing (here hidden with `CIFAR_DF_NO_AMX`;
/// on a CPU without AMX the run's checkpoints are marked as an AMX CPU writes them): the
/// error names the run's kernel and both ways on, once each, and `--resume --precision
/// bf16` goes on in bf16 on AVX512-BF16 (recorded).
#[test]
fn an_amx_run_goes_on_in_bf16_on_avx512_when_asked() {
    use cifar_df::model::cnn::Kernel;
    if !Kernel::Avx512Bf16.available() {
        eprintln!("an AMX run resumed on AVX512-BF16: not run: this CPU has no AVX512-BF16");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path();
    let compute = || compute_of(runs, "p");
    let out = train(runs, "p", "cnn", &["--max-batches", "3"]);
    if compute() != "bf16 (amx-bf16)" {
        assert_eq!(compute(), "bf16 (avx512-bf16)", "{out}");
        // What a run on an AMX CPU records: the kernel in each checkpoint's model.json.
        let mut marked = 0;
        let mut stack = vec![runs.join("p")];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.file_name().is_some_and(|n| n == "model.json") {
                    let mut v: serde_json::Value =
                        serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
                    if v.get("kernel").is_some() {
                        v["kernel"] = "amx-bf16".into();
                        std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
                        marked += 1;
                    }
                }
            }
        }
        assert!(marked > 0, "no checkpoint records a kernel");
    }
    let base = || {
        let mut cmd = resume_run(runs, "p");
        cmd.arg("--no-test").env("CIFAR_DF_NO_AMX", "1");
        cmd
    };
    let err = fails(&mut base());
    for want in [
        "amx-bf16",
        "--precision bf16",
        "avx512-bf16",
        "--precision f32",
    ] {
        assert_eq!(err.matches(want).count(), 1, "{want} once: {err}");
    }
    run_ok(base().args(["--precision", "bf16"]));
    assert_eq!(compute(), "bf16 (avx512-bf16)");
}

/// What run `run` records as its products' compute (`run.json`'s `compute`).
fn compute_of(runs: &Path, run: &str) -> String {
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(runs.join(run).join("run.json")).unwrap()).unwrap();
    info["compute"].as_str().unwrap_or_default().to_string()
}
