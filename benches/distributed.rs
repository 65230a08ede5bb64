//! Scale-out overheads, with two workers served in this process on 127.0.0.1 (one
//! physical core here: these measure what distribution costs, not what it gains).
//! `cargo bench --bench distributed`.
//!
//! - `distributed/query/{local,2-workers}`: `SELECT label, count(*) … GROUP BY label` over
//!   a folder of 20 Parquet parts (4,000 images): the fixed cost of a distributed query
//!   (version check, planning, one gRPC stream per task).
//! - `distributed/features/{local,2-workers}`: the feature job on 4,000 synthetic images in
//!   parts of 200 with a small extractor (16 atoms: encoding is cheap, so the time is the
//!   job's own): staging, the query, gathering and writing the parts. The difference over
//!   the 20 parts is the overhead per part (batch); over the images, per image.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};

use cifar_df::dataset::synth::{self, SynthSpec};
use cifar_df::dataset::{DataSpec, Split};
use cifar_df::distributed;
use cifar_df::distributed::features as remote;
use cifar_df::features::cache::{self, CacheOptions};
use cifar_df::features::{Extractor, PatchExtractor, PatchParams};

const DATA: &str = "synthetic:4000:0:1";

fn options(out: &std::path::Path) -> CacheOptions {
    CacheOptions {
        data: DataSpec::parse(DATA).unwrap(),
        out: out.to_path_buf(),
        flip: false,
        rows_per_part: 200,
        batch_size: 128,
        on_part: None,
        image_side: 32,
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut workers = Vec::new();
    let mut stops = Vec::new();
    for _ in 0..2 {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        workers.push(url::Url::parse(&format!("http://{addr}")).unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        stops.push(tx);
        rt.spawn(distributed::serve(listener, None, None, async {
            let _ = rx.await;
        }));
    }
    let spec = SynthSpec {
        train: 1000,
        test: 0,
        seed: 1,
    };
    let px: Vec<u8> = synth::generate(&spec, Split::Train)
        .into_iter()
        .flat_map(|i| i.pixels)
        .collect();
    let ex = Extractor::Patches(
        PatchExtractor::fit(
            &PatchParams {
                atoms: 16,
                fit_images: 200,
                samples: 2000,
                stats_images: 50,
                ..PatchParams::default()
            },
            &px,
            32,
        )
        .unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let prepare = |out: &std::path::Path| {
        let _ = std::fs::remove_dir_all(out);
        ex.save(&out.join(cache::EXTRACTOR_DIR)).unwrap();
    };
    let connect = distributed::Connect::new(Duration::from_secs(10), None);

    // A folder of Parquet parts to query: a cache's train split.
    let parts = dir.path().join("parts");
    prepare(&parts);
    cache::write_cache(&ex, &mut options(&parts)).unwrap();
    let sql = format!(
        "select label, count(*) as n from '{}/' group by label order by label",
        parts.join("train").display()
    );
    let mut g = c.benchmark_group("distributed");
    g.sample_size(10);
    g.bench_function("query/local", |b| {
        b.iter(|| {
            rt.block_on(async {
                let ctx = cifar_df::query::session();
                cifar_df::query::run(&ctx, &sql).await.unwrap()
            })
        })
    });
    let none = |_: &datafusion::prelude::SessionContext| Ok(());
    g.bench_function("query/2-workers", |b| {
        b.iter(|| {
            rt.block_on(distributed::collect(&workers, None, &connect, &none, &sql))
                .unwrap()
        })
    });

    let out = dir.path().join("F");
    g.measurement_time(Duration::from_secs(20));
    g.bench_function("features/local", |b| {
        b.iter(|| {
            prepare(&out);
            cache::write_cache(&ex, &mut options(&out)).unwrap()
        })
    });
    g.bench_function("features/2-workers", |b| {
        b.iter(|| {
            prepare(&out);
            rt.block_on(remote::write_cache_on_workers(
                &ex,
                &mut options(&out),
                &workers,
                &connect,
            ))
            .unwrap()
        })
    });
    g.finish();
    for s in stops {
        let _ = s.send(());
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
