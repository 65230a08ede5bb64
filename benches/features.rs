//! The features stage and the matrix products under it. `cargo bench --bench features`.
//!
//! - `features/encode`: the default patch extractor (2,048 atoms, 6x6 patches, 3x3 grid,
//!   flip-invariant) on batches of 128 synthetic images: images/s; the GFLOP/s reached
//!   are `2 · 729 · 108 · 2048` flops per image times images/s (printed once).
//! - `gemm/*`: one matrix product at the shapes that matter, through the `gemm` crate
//!   (what cifar-df uses) and through matrixmultiply (ndarray's `general_mat_mul`, what
//!   the MLP used before): the patch encoding's 81 × 108 × 2048 and the MLP's first layer
//!   forward (128 × 3072 × 128) and weight gradient (3072 × 128 × 128).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ndarray::linalg::general_mat_mul;
use ndarray::Array2;

use cifar_df::dataset::synth::{self, SynthSpec};
use cifar_df::dataset::{Split, IMAGE_BYTES};
use cifar_df::features::{PatchExtractor, PatchParams};

fn encode(c: &mut Criterion) {
    let spec = SynthSpec {
        train: 1000,
        test: 0,
        seed: 1,
    };
    let px: Vec<u8> = synth::generate(&spec, Split::Train)
        .into_iter()
        .flat_map(|i| i.pixels)
        .collect();
    let ex = PatchExtractor::fit(
        &PatchParams {
            stats_images: 200,
            ..PatchParams::default()
        },
        &px,
        32,
    )
    .unwrap();
    let batch = &px[..128 * IMAGE_BYTES];
    let t = std::time::Instant::now();
    ex.encode(batch).unwrap();
    let s = t.elapsed().as_secs_f64();
    eprintln!(
        "features/encode warm-up: {:.0} images/s, {:.0} GFLOP/s",
        128.0 / s,
        2.0 * ex.macs_per_image() as f64 * 128.0 / s / 1e9
    );
    let mut g = c.benchmark_group("features");
    g.throughput(Throughput::Elements(128));
    g.sample_size(10);
    g.bench_function("encode", |b| b.iter(|| ex.encode(batch).unwrap()));
    g.finish();
}

fn products(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemm");
    for (name, m, k, n) in [
        ("patches-81x108x2048", 81, 108, 2048),
        ("mlp-forward-128x3072x128", 128, 3072, 128),
        ("mlp-grad-3072x128x128", 3072, 128, 128),
    ] {
        let a = Array2::from_shape_fn((m, k), |(i, j)| ((i * 7 + j * 3) % 13) as f32 * 0.1);
        let bm = Array2::from_shape_fn((k, n), |(i, j)| ((i * 5 + j) % 11) as f32 * 0.1);
        let mut out = Array2::<f32>::zeros((m, n));
        g.throughput(Throughput::Elements((2 * m * k * n) as u64));
        g.bench_function(format!("{name}/gemm-crate"), |b| {
            b.iter(|| cifar_df::linalg::gemm(1.0, &a, &bm, 0.0, &mut out))
        });
        g.bench_function(format!("{name}/matrixmultiply"), |b| {
            b.iter(|| general_mat_mul(1.0, &a, &bm, 0.0, &mut out))
        });
    }
    g.finish();
}

criterion_group!(benches, encode, products);
criterion_main!(benches);
