//! Model fit throughput in images/s at batch 128 on 3,072 features (normalized synthetic
//! images). `cargo bench --bench models`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ndarray::{Array1, Array2};

use cifar_df::dataset::Split;
use cifar_df::model::{Learner, LogReg, LogRegParams};
use cifar_df::synth;

const BATCH: usize = 128;

fn data(n: usize) -> (Array2<f32>, Array1<u8>) {
    let mut x = Array2::<f32>::zeros((n, 3072));
    let mut y = Array1::<u8>::zeros(n);
    let mut px = vec![0u8; 3072];
    for i in 0..n {
        y[i] = synth::image(7, Split::Train, i as u64, &mut px);
        for (k, &p) in px.iter().enumerate() {
            x[[i, k]] = (p as f32 / 255.0 - 0.47) / 0.25;
        }
    }
    (x, y)
}

fn logreg(c: &mut Criterion) {
    let (x, y) = data(BATCH * 8);
    let mut group = c.benchmark_group("fit");
    group.throughput(Throughput::Elements(BATCH as u64));
    let mut model = LogReg::new(LogRegParams {
        batch_size: BATCH,
        ..LogRegParams::default()
    })
    .unwrap();
    let mut i = 0;
    group.bench_function("logreg/batch128", |b| {
        b.iter(|| {
            let s = (i % 8) * BATCH;
            i += 1;
            model
                .partial_fit(
                    x.slice(ndarray::s![s..s + BATCH, ..]),
                    y.slice(ndarray::s![s..s + BATCH]),
                )
                .unwrap()
        })
    });
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("logreg/predict128", |b| {
        b.iter(|| {
            model
                .predict_proba(x.slice(ndarray::s![0..BATCH, ..]))
                .unwrap()
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(3));
    targets = logreg
}
criterion_main!(benches);
