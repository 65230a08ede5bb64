//! The dashboard's server (`cifar-df ui`): how long each answer takes over a large runs
//! folder, and what the live page costs a machine that trains.
//!
//! The folder: one run of 100,000 batches (metrics in 100 parts, as a long run leaves them
//! after compaction) and 200 runs of 500 batches, each with a test pass.
//!
//! - `ui/curves/100k`: a 100,000-batch curve downsampled to 1,400 points (a page's width).
//! - `ui/curves/100k-zoom`: 1,000 batches of it in full (a drag to zoom).
//! - `ui/curves/10-of-200`: ten runs overlaid.
//! - `ui/runs/200-cold`: the runs list of 201 runs with their test accuracy, on a fresh
//!   server (every run's test results read).
//! - `ui/runs/200`, `ui/results/200`: the same and the test results table, as a page's
//!   refresh asks for them (test results kept, each run's folder listed).
//! - `ui/fingerprint/201`: the event stream's look at the folder, done every 0.5 s.
//! - `ui/refresh/201`: what one change event makes a page ask for (runs, one run's curve,
//!   results), about once a second while a run trains.
//!
//! The server's share of a core while a page watches a run is then about
//! `2 · fingerprint + refresh` per second. `cargo bench --bench ui`.

use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};

use cifar_df::run::metrics::Metrics;
use cifar_df::run::tables::{MetricsRow, Run, RunInfo};
use cifar_df::ui::api::{self, CurvesQuery, RunsQuery, TestResults};

fn row(split: &str, batch: u64) -> MetricsRow {
    let acc = 0.3 + 0.4 * (1.0 - (-(batch as f64) / 5_000.0).exp()) + 0.05 * (batch as f64).sin();
    MetricsRow {
        split: split.into(),
        epoch: 1 + (batch / 10_000) as u32,
        batch,
        metrics: Metrics {
            images: 128,
            acc,
            loss: 2.0 - acc,
            precision: acc,
            recall: acc,
            f1: acc,
            confusion: Vec::new(),
        },
        mean: [acc; 5],
        window: [acc; 5],
        seconds: 0.05,
        ts_ms: 1_780_000_000_000 + batch as i64 * 50,
        drift: batch % 20_000 == 7,
    }
}

fn write_run(root: &Path, name: &str, batches: u64, per_part: u64, start_ms: i64) {
    let run = Run::new(root, name).expect("run");
    let mut b = 0;
    while b < batches {
        let rows: Vec<MetricsRow> = (b..(b + per_part).min(batches))
            .map(|i| row("train", i))
            .collect();
        let part = run.metrics_batch("logreg", &rows).expect("rows");
        run.write_part("metrics", &format!("part-{b:010}.parquet"), &part)
            .expect("part");
        b += per_part;
    }
    let test: Vec<MetricsRow> = (0..10).map(|i| row("test", i)).collect();
    let part = run.metrics_batch("logreg", &test).expect("rows");
    run.write_part("eval_metrics", "part-0000000000.parquet", &part)
        .expect("part");
    run.write_info(&RunInfo {
        run: name.into(),
        model: "logreg".into(),
        status: "finished".into(),
        seed: 0,
        source: "synthetic".into(),
        config: String::new(),
        start_ms,
        end_ms: Some(start_ms + 1_000),
        batches,
        images: batches * 128,
        error: None,
        checkpoint: None,
        resumes: 0,
        pid: None,
        compute: None,
    })
    .expect("run.json");
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    write_run(root, "long", 100_000, 1_000, 1_780_000_000_000);
    for i in 0..200 {
        write_run(root, &format!("r{i:03}"), 500, 500, 1_780_000_000_000 + i);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let curves = |run: &str, points, from, to| CurvesQuery {
        run: run.into(),
        metric: Some("acc".into()),
        x: Some("batch".into()),
        points: Some(points),
        from,
        to,
    };
    let all = RunsQuery::default();
    let ten: Vec<String> = (0..10).map(|i| format!("r{:03}", i * 20)).collect();
    let ten = ten.join(",");

    let mut g = c.benchmark_group("ui");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    g.bench_function("curves/100k", |b| {
        b.iter(|| {
            let v = rt
                .block_on(api::curves(root, &curves("long", 1_400, None, None)))
                .expect("curves");
            assert_eq!(v["curves"][0]["total"], 100_000);
        })
    });
    g.bench_function("curves/100k-zoom", |b| {
        b.iter(|| {
            let q = curves("long", 1_400, Some(50_000.0), Some(50_999.0));
            let v = rt.block_on(api::curves(root, &q)).expect("curves");
            assert_eq!(v["curves"][0]["total"], 1_000);
        })
    });
    g.bench_function("curves/10-of-200", |b| {
        b.iter(|| {
            let v = rt
                .block_on(api::curves(root, &curves(&ten, 1_400, None, None)))
                .expect("curves");
            assert_eq!(v["curves"].as_array().map(Vec::len), Some(10));
        })
    });
    g.bench_function("runs/200-cold", |b| {
        b.iter(|| {
            let fresh = TestResults::default();
            let v = rt.block_on(api::runs(root, &all, &fresh)).expect("runs");
            assert_eq!(v["runs"].as_array().map(Vec::len), Some(201));
        })
    });
    let kept = TestResults::default();
    g.bench_function("runs/200", |b| {
        b.iter(|| {
            let v = rt.block_on(api::runs(root, &all, &kept)).expect("runs");
            assert_eq!(v["runs"].as_array().map(Vec::len), Some(201));
        })
    });
    g.bench_function("results/200", |b| {
        b.iter(|| {
            let v = rt
                .block_on(api::results(root, &all, &kept))
                .expect("results");
            assert_eq!(v["results"].as_array().map(Vec::len), Some(201));
        })
    });
    g.bench_function("fingerprint/201", |b| {
        b.iter(|| assert!(api::fingerprint(root).len() >= 201 * 3))
    });
    g.bench_function("refresh/201", |b| {
        b.iter(|| {
            rt.block_on(async {
                api::runs(root, &all, &kept).await.expect("runs");
                api::curves(root, &curves("r000", 1_400, None, None))
                    .await
                    .expect("curves");
                api::results(root, &all, &kept).await.expect("results");
            })
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
