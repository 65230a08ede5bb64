//! The CNN's training speed: one SGD step (forward, backward, update) on a mini-batch of
//! random images, for the default network (widths 32/64/128) and airbench94's
//! (64/256/256), in images/s, in f32 and (where the CPU has a bf16 kernel) bf16;
//! `benches/cnn_torch.py` runs the same network in PyTorch. The group `cnn_conv` times
//! each convolution of the default network alone (its rate in multiply-adds per second);
//! `CIFAR_DF_BENCH_THREADS=1` runs on one thread, `CIFAR_DF_NO_FMA=1` on the `gemm` crate;
//! bf16 runs on AMX where the CPU lends it, `CIFAR_DF_NO_AMX=1` keeps it on AVX512-BF16.
//!
//!     cargo bench --bench cnn
//!     python3 benches/cnn_torch.py

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ndarray::{Array1, Array2};

use cifar_df::model::cnn::ops::{conv_backward, conv_forward, turned_weights, Scratch};
use cifar_df::model::cnn::{Cnn, CnnParams, Kernel, Precision};
use cifar_df::model::Learner;
use cifar_df::rng::SplitMix;

fn batch(n: usize, seed: u64) -> (Array2<f32>, Array1<u16>) {
    let mut rng = SplitMix(seed);
    let x = Array2::from_shape_fn((n, 3072), |_| rng.normal() as f32);
    let y = (0..n).map(|_| rng.below(10) as u16).collect();
    (x, y)
}

/// `CIFAR_DF_BENCH_THREADS=1`: one thread, to see a kernel's own rate (default: all
/// cores).
fn bench_threads() {
    if let Some(t) = std::env::var("CIFAR_DF_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        cifar_df::model::set_threads(t);
    }
}

fn train_step(c: &mut Criterion) {
    bench_threads();
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

/// Each convolution of the default network (widths 32/64/128) alone, batch 64: the
/// forward product and the backward pair (weight and input gradients), in multiply-adds
/// per second (`elem/s`), to see how near each product runs to the CPU's peak; in f32
/// and on the CPU's best bf16 kernel.
fn conv_products(c: &mut Criterion) {
    let n = 64;
    bench_threads();
    let arch = CnnParams::default().arch();
    let mut group = c.benchmark_group("cnn_conv");
    group.sample_size(10);
    let mut rng = SplitMix(3);
    // f32, and the CPU's best bf16 kernel where it has one (AMX's tiles, else
    // AVX512-BF16), each product named by its kernel.
    let kernels: Vec<Kernel> = std::iter::once(Kernel::F32)
        .chain(Kernel::best_bf16())
        .collect();
    let shapes = arch.conv_shapes(n).into_iter().enumerate();
    for (kernel, (i, s)) in shapes.flat_map(|c| kernels.iter().map(move |&k| (k, c))) {
        let x: Vec<f32> = (0..n * s.h * s.w * s.ci)
            .map(|_| rng.normal() as f32)
            .collect();
        let wt: Vec<f32> = (0..s.kdim() * s.co).map(|_| rng.normal() as f32).collect();
        let mut y = vec![0f32; n * s.oh() * s.ow() * s.co];
        let mut scratch = Scratch::new(kernel);
        let name = format!("{i}_{}x{}_{}to{}_{}", s.h, s.w, s.ci, s.co, kernel.name());
        group.throughput(Throughput::Elements(s.macs() as u64));
        group.bench_function(format!("forward_{name}"), |b| {
            b.iter(|| conv_forward(&x, &wt, &s, &mut y, &mut scratch))
        });
        let turned = turned_weights(&wt, &s);
        let (mut dwt, mut dx) = (vec![0f32; wt.len()], vec![0f32; x.len()]);
        group.throughput(Throughput::Elements(2 * s.macs() as u64));
        group.bench_function(format!("backward_{name}"), |b| {
            b.iter(|| conv_backward(&x, &y, &turned, &s, &mut dwt, Some(&mut dx), &mut scratch))
        });
    }
    group.finish();
}

criterion_group!(benches, train_step, conv_products);
criterion_main!(benches);
