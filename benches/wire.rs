//! Wire throughput: `spark-json` decode and encode of batches of 128 synthetic images, in
//! MB/s (bytes of JSON) and images/s; `ndjson` decode through arrow-json for comparison.
//!
//! `cargo bench --bench wire`. The Python baseline for the same lines is
//! `python3 benches/json_loads.py` (it writes the lines with this crate's binary).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use cifar_df::dataset::synth;
use cifar_df::dataset::Split;
use cifar_df::wire::{ndjson, spark_json};

const BATCH: usize = 128;

fn batch() -> (Vec<u16>, Vec<u8>) {
    let mut labels = Vec::with_capacity(BATCH);
    let mut pixels = vec![0u8; BATCH * 3072];
    for (i, px) in pixels.chunks_exact_mut(3072).enumerate() {
        labels.push(synth::image(42, Split::Train, i as u64, px));
    }
    (labels, pixels)
}

fn spark(c: &mut Criterion) {
    let (labels, pixels) = batch();
    let mut line = Vec::new();
    spark_json::encode(&labels, &pixels, &mut line);
    line.pop();
    let mut group = c.benchmark_group("spark-json");
    for (unit, tp) in [
        ("bytes", Throughput::Bytes(line.len() as u64)),
        ("images", Throughput::Elements(BATCH as u64)),
    ] {
        group.throughput(tp);
        let mut out = spark_json::DecodedBatch::default();
        group.bench_function(BenchmarkId::new("decode", unit), |b| {
            b.iter(|| {
                spark_json::decode(&line, &mut out).unwrap();
                assert_eq!(out.len(), BATCH);
            })
        });
        let mut buf = Vec::with_capacity(line.len() + 1);
        group.bench_function(BenchmarkId::new("encode", unit), |b| {
            b.iter(|| {
                buf.clear();
                spark_json::encode(&labels, &pixels, &mut buf);
            })
        });
    }
    group.finish();
}

fn nd(c: &mut Criterion) {
    let (labels, pixels) = batch();
    let mut text = Vec::new();
    ndjson::encode(&labels, &pixels, &mut text);
    let lines: Vec<&[u8]> = text
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    let mut group = c.benchmark_group("ndjson");
    group.throughput(Throughput::Bytes(text.len() as u64));
    let mut dec = ndjson::LineDecoder::new().unwrap();
    let mut out = Vec::with_capacity(pixels.len());
    group.bench_function("decode/bytes", |b| {
        b.iter(|| {
            out.clear();
            for l in &lines {
                dec.decode_line(l, &mut out).unwrap();
            }
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(4));
    targets = spark, nd
}
criterion_main!(benches);
