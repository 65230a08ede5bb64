//! Preprocessing throughput in images/s, on one core.
//!
//! - `pipeline/train`: `sql/train.sql` (`normalize(hflip(image, 0.345, batch, "row"), …)`)
//!   through DataFusion over an in-memory `stream` table of 128-image batches, one partition;
//!   `pipeline/eval` (`sql/eval.sql`, normalize only) and `pipeline/scan` (`SELECT image`)
//!   for comparison.
//! - `kernels/*`: the per-image kernels over one 128-image batch.
//!
//! `cargo bench --bench preprocess`.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use futures::StreamExt;

use cifar_df::dataset::synth;
use cifar_df::dataset::Split;
use cifar_df::transforms::pixels::{self, Normalize, Resize};
use cifar_df::wire::batch::{make_batch, stream_schema};
use cifar_df::{query, transforms};

const BATCH: usize = 128;
const BATCHES: usize = 40;
const S: usize = 32;
const LEN: usize = 3 * S * S;

fn pixels(n: usize) -> (Vec<u16>, Vec<u8>) {
    let mut labels = Vec::with_capacity(n);
    let mut pixels = vec![0u8; n * LEN];
    for (i, px) in pixels.chunks_exact_mut(LEN).enumerate() {
        labels.push(synth::image(42, Split::Train, i as u64, px));
    }
    (labels, pixels)
}

fn table() -> Vec<RecordBatch> {
    let (labels, pixels) = pixels(BATCH * BATCHES);
    labels
        .chunks(BATCH)
        .zip(pixels.chunks(BATCH * LEN))
        .enumerate()
        .map(|(b, (l, p))| make_batch(b as u64, None, l.to_vec(), p.to_vec()).unwrap())
        .collect()
}

fn session(batches: &[RecordBatch]) -> SessionContext {
    let ctx = query::stream_session();
    transforms::register(&ctx, 7);
    let table = MemTable::try_new(stream_schema(), vec![batches.to_vec()]).unwrap();
    ctx.register_table("stream", Arc::new(table)).unwrap();
    ctx
}

async fn run(ctx: &SessionContext, sql: &str) -> usize {
    let mut stream = ctx.sql(sql).await.unwrap().execute_stream().await.unwrap();
    let mut rows = 0;
    while let Some(b) = stream.next().await {
        rows += b.unwrap().num_rows();
    }
    rows
}

fn pipeline(c: &mut Criterion) {
    let batches = table();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements((BATCH * BATCHES) as u64));
    for (name, sql) in [
        ("train", include_str!("../sql/train.sql")),
        ("eval", include_str!("../sql/eval.sql")),
        ("scan", "SELECT batch, \"row\", label, image FROM stream"),
    ] {
        group.bench_function(name, |b| {
            b.iter_batched(
                || session(&batches),
                |ctx| assert_eq!(rt.block_on(run(&ctx, sql)), BATCH * BATCHES),
                criterion::BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

fn kernels_bench(c: &mut Criterion) {
    let (_, src) = pixels(BATCH);
    let srcf: Vec<f32> = src.iter().map(|&v| f32::from(v) / 255.0).collect();
    let mut dst = vec![0u8; src.len()];
    let mut dstf = vec![0f32; src.len()];
    let mut group = c.benchmark_group("kernels");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("hflip/u8", |b| {
        b.iter(|| {
            for (s, d) in src.chunks_exact(LEN).zip(dst.chunks_exact_mut(LEN)) {
                pixels::hflip(s, S, d).unwrap();
            }
        })
    });
    group.bench_function("vflip/u8", |b| {
        b.iter(|| {
            for (s, d) in src.chunks_exact(LEN).zip(dst.chunks_exact_mut(LEN)) {
                pixels::vflip(s, S, d).unwrap();
            }
        })
    });
    group.bench_function("color_shift/u8", |b| {
        b.iter(|| {
            for (s, d) in src.chunks_exact(LEN).zip(dst.chunks_exact_mut(LEN)) {
                pixels::color_shift(s, S, 3, -5, 7, d).unwrap();
            }
        })
    });
    group.bench_function("crop/u8", |b| {
        b.iter(|| {
            for (i, (s, d)) in src
                .chunks_exact(LEN)
                .zip(dst.chunks_exact_mut(LEN))
                .enumerate()
            {
                pixels::crop(s, S, 4, i % 9, (i / 9) % 9, d).unwrap();
            }
        })
    });
    let norm = Normalize::new([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]).unwrap();
    group.bench_function("normalize/u8", |b| {
        b.iter(|| {
            for (s, d) in src.chunks_exact(LEN).zip(dstf.chunks_exact_mut(LEN)) {
                norm.apply_u8(s, S, d).unwrap();
            }
        })
    });
    group.bench_function("normalize/f32", |b| {
        b.iter(|| {
            for (s, d) in srcf.chunks_exact(LEN).zip(dstf.chunks_exact_mut(LEN)) {
                norm.apply_f32(s, S, d).unwrap();
            }
        })
    });
    for (h, w) in [(24, 24), (64, 64)] {
        let plan = Resize::new(S, h, w).unwrap();
        let out = plan.out_len();
        let mut big = vec![0u8; BATCH * out];
        let mut scratch = Vec::new();
        group.bench_function(BenchmarkId::new("resize/u8", format!("{h}x{w}")), |b| {
            b.iter(|| {
                for (s, d) in src.chunks_exact(LEN).zip(big.chunks_exact_mut(out)) {
                    plan.apply_with(s, d, &mut scratch).unwrap();
                }
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(4));
    targets = pipeline, kernels_bench
}
criterion_main!(benches);
