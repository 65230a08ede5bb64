//! The whole training pipeline in images/s, as `cifar-df train` runs it: a stream server in
//! the process sends the synthetic set as spark-json over a loopback TCP connection, the
//! client decodes it into Arrow, `sql/train.sql` augments and normalizes it in DataFusion,
//! the model scores each batch and learns from it, and metrics, predictions and checkpoints
//! go to Parquet and safetensors in a fresh run folder.
//!
//! - `train/loopback/MODEL`: 5,000 images in batches of 128, one epoch, a checkpoint every
//!   10 batches (the test pass and plots are the CLI's, not included).
//! - `train/in-process/logreg`: the same without TCP (`--source synthetic`).
//!
//! The original Spark Streaming pipeline ran at about 90 images/s on 2 cores.
//! `cargo bench --bench train`.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use cifar_df::dataset::{DataSpec, Split};
use cifar_df::run::tables::Run;
use cifar_df::run::trainer::{self, TrainOptions, TrainSource};
use cifar_df::source::{SourceOptions, SourceSpec};

const IMAGES: u64 = 5_000;
const DATA: &str = "synthetic:5000:0:7";

fn run_once(model: &str, source: TrainSource) {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = Run::new(dir.path(), "bench").expect("run");
    let opts = SourceOptions {
        split: Split::Train,
        batch_size: 128,
        epochs: Some(1),
        ..SourceOptions::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let summary = runtime
        .block_on(trainer::train(TrainOptions {
            checkpoint_every: 10,
            ..TrainOptions::new(run, model, source, opts)
        }))
        .expect("train");
    assert_eq!(summary.overall.images, IMAGES);
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("train");
    g.throughput(Throughput::Elements(IMAGES));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    let data = DataSpec::parse(DATA).expect("data");
    for model in ["logreg", "svm", "mlp"] {
        let source = TrainSource::Loopback {
            data: data.clone(),
            sleep: Duration::ZERO,
        };
        g.bench_with_input(BenchmarkId::new("loopback", model), &model, |b, m| {
            b.iter(|| run_once(m, source.clone()))
        });
    }
    let direct = TrainSource::Spec(SourceSpec::Data(data));
    g.bench_function(BenchmarkId::new("in-process", "logreg"), |b| {
        b.iter(|| run_once("logreg", direct.clone()))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
