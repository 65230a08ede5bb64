//! The CNN's training speed: one SGD step (forward, backward, update) on a mini-batch of
//! random images, for the default network (widths 32/64/128) and airbench94's
//! (64/256/256), in images/s, in f32 and (where the CPU has a bf16 kernel) bf16;
//! `benches/cnn_torch.py` runs the same network in PyTorch. The group `cnn_conv` times
//! each convolution of the default network alone (its rate in multiply-adds per second);
//! `CIFAR_DF_BENCH_THREADS=1` runs on one thread, `CIFAR_DF_NO_FMA=1` on the `gemm` crate;
//! bf16 runs on AMX where the CPU lends it, `CIFAR_DF_NO_AMX=1` keeps it on AVX512-BF16.
//! The group `cpu_peak` times the CPU's own ceiling for the kernels: back-to-back f32 FMAs
//! and (where the CPU has them) AVX512-BF16 dot products on all the bench's threads, in
//! multiply-adds per second, the figure each product's rate is a fraction of.
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
/// per second (`elem/s`), to see how near each product runs to the CPU's peak, and the
/// weight gradient alone; in f32 and on the CPU's best bf16 kernel.
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
        // The weight gradient alone (the backward pair less this is the input gradient).
        group.throughput(Throughput::Elements(s.macs() as u64));
        group.bench_function(format!("weight_grad_{name}"), |b| {
            b.iter(|| conv_backward(&x, &y, &turned, &s, &mut dwt, None, &mut scratch))
        });
    }
    group.finish();
}

/// The most multiply-adds per second the CPU does with `vfmadd231ps` (16 per instruction)
/// and with `vdpbf16ps` (32), each thread running 16 independent sums in registers:
/// no memory is read, so this is the ceiling of the `cnn_conv` rates.
fn cpu_peak(c: &mut Criterion) {
    bench_threads();
    let mut group = c.benchmark_group("cpu_peak");
    group.sample_size(10);
    #[cfg(target_arch = "x86_64")]
    {
        const STEPS: usize = 1_000_000;
        let threads = cifar_df::linalg::threads();
        let avx512 = std::arch::is_x86_feature_detected!("avx512f");
        let bf16 = cifar_df::model::cnn::Kernel::Avx512Bf16.available();
        let on_threads = |f: fn() -> f32| {
            std::thread::scope(|s| {
                let hs: Vec<_> = (0..threads).map(|_| s.spawn(f)).collect();
                hs.into_iter().map(|h| h.join().unwrap()).sum::<f32>()
            })
        };
        if avx512 {
            group.throughput(Throughput::Elements((threads * STEPS * 16 * 16) as u64));
            group.bench_function("fma_f32", |b| {
                // SAFETY: AVX-512F is present (checked above).
                b.iter(|| on_threads(|| unsafe { peak::fma(STEPS) }))
            });
        }
        if bf16 {
            group.throughput(Throughput::Elements((threads * STEPS * 16 * 32) as u64));
            group.bench_function("dpbf16", |b| {
                // SAFETY: AVX512-BF16 is present (checked above).
                b.iter(|| on_threads(|| unsafe { peak::dpbf16(STEPS) }))
            });
        }
    }
    group.finish();
}

#[cfg(target_arch = "x86_64")]
mod peak {
    use std::arch::x86_64::*;

    /// 16 independent sums, each named (an array of them gets moved around in registers
    /// and spilled), `steps` rounds of `$op`; returns their total.
    macro_rules! sixteen {
        ($steps:expr, $op:expr) => {{
            let z = _mm512_setzero_ps();
            let (mut s0, mut s1, mut s2, mut s3, mut s4, mut s5, mut s6, mut s7) =
                (z, z, z, z, z, z, z, z);
            let (mut s8, mut s9, mut s10, mut s11, mut s12, mut s13, mut s14, mut s15) =
                (z, z, z, z, z, z, z, z);
            for _ in 0..$steps {
                s0 = $op(s0);
                s1 = $op(s1);
                s2 = $op(s2);
                s3 = $op(s3);
                s4 = $op(s4);
                s5 = $op(s5);
                s6 = $op(s6);
                s7 = $op(s7);
                s8 = $op(s8);
                s9 = $op(s9);
                s10 = $op(s10);
                s11 = $op(s11);
                s12 = $op(s12);
                s13 = $op(s13);
                s14 = $op(s14);
                s15 = $op(s15);
            }
            [
                s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15,
            ]
            .iter()
            .map(|&v| _mm512_reduce_add_ps(v))
            .sum()
        }};
    }

    /// `steps` rounds of 16 independent FMAs (16 multiply-adds each).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma(steps: usize) -> f32 {
        let (a, b) = (_mm512_set1_ps(0.999), _mm512_set1_ps(1e-3));
        sixteen!(steps, |v| _mm512_fmadd_ps(v, a, b))
    }

    /// `steps` rounds of 16 independent `vdpbf16ps` (32 multiply-adds each).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn dpbf16(steps: usize) -> f32 {
        let a: __m512bh = std::mem::transmute(_mm512_set1_epi16(0x3f80));
        let b: __m512bh = std::mem::transmute(_mm512_set1_epi16(0x3a83));
        sixteen!(steps, |v| _mm512_dpbf16_ps(v, a, b))
    }
}

criterion_group!(benches, train_step, conv_products, cpu_peak);
criterion_main!(benches);
