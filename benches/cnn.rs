//! The CNN's training speed: one SGD step (forward, backward, update) on a mini-batch of
//! random images, for the default network (widths 32/64/128) and airbench94's
//! (64/256/256), in images/s, in f32 and (where the CPU has a bf16 kernel) bf16;
//! `benches/cnn_torch.py` runs the same network in PyTorch.
//!
//!     cargo bench --bench cnn
//!     python3 benches/cnn_torch.py

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ndarray::{Array1, Array2};

use cifar_df::model::cnn::{Cnn, CnnParams, Kernel, Precision};
use cifar_df::model::Learner;
use cifar_df::rng::SplitMix;

fn batch(n: usize, seed: u64) -> (Array2<f32>, Array1<u16>) {
    let mut rng = SplitMix(seed);
    let x = Array2::from_shape_fn((n, 3072), |_| rng.normal() as f32);
    let y = (0..n).map(|_| rng.below(10) as u16).collect();
    (x, y)
}

fn train_step(c: &mut Criterion) {
    let n = 256;
    let (x, y) = batch(n, 1);
    let mut group = c.benchmark_group("cnn_train");
    group.sample_size(10);
    group.throughput(Throughput::Elements(n as u64));
    let mut precisions = vec![Precision::F32];
    match Kernel::best_bf16() {
        Some(k) => {
            eprintln!("bf16 on the {} kernel", k.name());
            precisions.push(Precision::Bf16);
        }
        None => eprintln!("no bf16 kernel on this CPU: f32 only"),
    }
    for (widths, precision) in [
        vec![32, 64, 128],
        vec![48, 96, 192],
        vec![64, 128, 256],
        vec![64, 256, 256],
    ]
    .into_iter()
    .flat_map(|w| precisions.iter().map(move |&p| (w.clone(), p)))
    {
        let mut model = Cnn::new(CnnParams {
            widths: widths.clone(),
            precision,
            batch_size: n,
            // The bench measures the steady state: the whitening bias frozen.
            whiten_bias_images: 0,
            ..CnnParams::default()
        })
        .unwrap();
        model.partial_fit(x.view(), y.view()).unwrap();
        let arch = model.params().arch();
        eprintln!(
            "widths {widths:?}: {:.1} MFLOP per image per training step (after the whitening \
             bias is frozen): GFLOP/s = images/s × {:.4}",
            2.0 * arch.train_macs_per_image(false) as f64 / 1e6,
            2.0 * arch.train_macs_per_image(false) as f64 / 1e9
        );
        let name = format!(
            "{}_batch{n}_{}",
            widths
                .iter()
                .map(|w| w.to_string())
                .collect::<Vec<_>>()
                .join("_"),
            if precision == Precision::Bf16 {
                "bf16"
            } else {
                "f32"
            }
        );
        group.bench_function(name, |b| {
            b.iter(|| model.partial_fit(x.view(), y.view()).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, train_step);
criterion_main!(benches);
