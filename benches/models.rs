//! Model fit throughput in images/s at batch 128 on 3,072 features (normalized synthetic
//! images), for every model. `cargo bench --bench models`.
//!
//! `svm` is the default ASGD (averaging costs a pass over the weights per image);
//! `svm-last` the same SGD without averaging (scikit-learn's default).
//!
//! Each `fit/MODEL` iteration is one `partial_fit` of a 128-image batch on a model that
//! keeps learning (its state carries over between iterations, as in a run). `svm-kernel`
//! is not incremental: its iteration buffers 128 images and, every `buffer / 128`
//! iterations, refits on the buffer, so its figure is the amortised rate.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ndarray::{s, Array1, Array2};

use cifar_df::dataset::synth;
use cifar_df::dataset::Split;
use cifar_df::run::config::build_model;

const BATCH: usize = 128;
const BATCHES: usize = 16;

fn data(n: usize) -> (Array2<f32>, Array1<u16>) {
    let mut x = Array2::<f32>::zeros((n, 3072));
    let mut y = Array1::<u16>::zeros(n);
    let mut px = vec![0u8; 3072];
    for i in 0..n {
        y[i] = synth::image(7, Split::Train, i as u64, &mut px);
        for (k, &p) in px.iter().enumerate() {
            x[[i, k]] = (p as f32 / 255.0 - 0.47) / 0.25;
        }
    }
    (x, y)
}

fn table(text: &str) -> toml::Table {
    text.parse().expect("bench params")
}

fn models(c: &mut Criterion) {
    let (x, y) = data(BATCH * BATCHES);
    let mut group = c.benchmark_group("fit");
    group.throughput(Throughput::Elements(BATCH as u64));
    for (label, name, params) in [
        ("logreg", "logreg", ""),
        ("svm", "svm", ""),
        ("svm-last", "svm", "average = 0"),
        ("mlp", "mlp", ""),
        ("kmeans", "kmeans", ""),
        ("svm-kernel", "svm-kernel", "buffer = 1024"),
    ] {
        let mut model = build_model(name, &table(params)).expect("model");
        // Warm up: fix the width, initialise, run the first fits.
        for b in 0..2 {
            let r = b * BATCH..(b + 1) * BATCH;
            model
                .partial_fit(x.slice(s![r.clone(), ..]), y.slice(s![r]))
                .expect("fit");
        }
        let mut i = 0;
        group.bench_function(format!("{label}/batch128"), |b| {
            b.iter(|| {
                let s0 = (i % BATCHES) * BATCH;
                i += 1;
                model
                    .partial_fit(x.slice(s![s0..s0 + BATCH, ..]), y.slice(s![s0..s0 + BATCH]))
                    .expect("fit")
            })
        });
        group.bench_function(format!("{label}/predict128"), |b| {
            b.iter(|| {
                model
                    .predict_proba(x.slice(s![0..BATCH, ..]))
                    .expect("predict")
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(3));
    targets = models
}
criterion_main!(benches);
