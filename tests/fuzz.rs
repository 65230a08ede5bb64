//! A seeded mutation fuzzer over every reader of untrusted bytes: the three wire formats
//! (read from a file source: spark-json, ndjson, Arrow IPC), the CIFAR-10 binary and
//! pickle readers, the checkpoint loader and the config parser. Each valid input is
//! mutated (bit flips, overwritten bytes, huge numbers, truncation, deleted and duplicated
//! spans, invalid UTF-8) a bounded number of times; every read must end with data or an
//! error, never a panic, an abort or a hang. A failing case prints its seed and mutation;
//! the seeds are fixed, so every case found stays a regression test. (Seed 3 found that a
//! corrupt Arrow IPC body length made Arrow's reader allocate 50 PB and abort; cifar-df
//! now checks the framing and bounds every length first.)

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use arrow::ipc::writer::StreamWriter;
use cifar_df::batch::{make_batch, stream_schema};
use cifar_df::dataset::{self, Images, IMAGE_BYTES};
use cifar_df::model::{self, Learner};
use cifar_df::rng::SplitMix;
use cifar_df::run::config::RunConfig;
use cifar_df::source::{self, SourceOptions, SourceSpec};
use cifar_df::wire::{ndjson, spark_json};

/// Cases per reader.
const CASES: usize = 150;

/// One mutation of `good`, chosen by `rng`; returns the bytes and what was done.
fn mutate(good: &[u8], rng: &mut SplitMix) -> (Vec<u8>, String) {
    let mut b = good.to_vec();
    let n = b.len().max(1);
    let what = match rng.below(7) {
        0 => {
            let i = rng.below(n).min(b.len().saturating_sub(1));
            if !b.is_empty() {
                b[i] ^= 1 << rng.below(8);
            }
            format!("bit flip at {i}")
        }
        1 => {
            for _ in 0..4 {
                if !b.is_empty() {
                    let i = rng.below(b.len());
                    b[i] = rng.below(256) as u8;
                }
            }
            "4 overwritten bytes".into()
        }
        2 => {
            // A huge number, as text for the text formats and as 8 bytes for the others.
            let i = rng.below(n).min(b.len());
            let huge: &[u8] = if rng.below(2) == 0 {
                b"99999999999999999999999999"
            } else {
                &[0xff; 8]
            };
            b.splice(i..(i + huge.len()).min(b.len()), huge.iter().copied());
            format!("huge number at {i}")
        }
        3 => {
            let at = rng.below(n);
            b.truncate(at);
            format!("truncated at {at}")
        }
        4 => {
            let i = rng.below(n).min(b.len());
            let j = (i + 1 + rng.below(200)).min(b.len());
            b.drain(i..j);
            format!("deleted {i}..{j}")
        }
        5 => {
            let i = rng.below(n).min(b.len());
            let j = (i + 1 + rng.below(200)).min(b.len());
            let span = b[i..j].to_vec();
            b.splice(i..i, span);
            format!("duplicated {i}..{j}")
        }
        _ => {
            let i = rng.below(n).min(b.len());
            b.splice(i..i, [0xc3, 0x28, 0xff, 0xfe]);
            format!("invalid UTF-8 at {i}")
        }
    };
    (b, what)
}

/// Runs `read` on `CASES` mutations of `good`; panics (naming the case) if any panics.
/// Returns how many of them were errors.
fn fuzz(name: &str, seed: u64, good: &[u8], mut read: impl FnMut(&[u8]) -> bool) -> usize {
    assert!(read(good), "{name}: the valid input must read");
    let mut rng = SplitMix(seed);
    let mut errors = 0;
    for case in 0..CASES {
        let (bytes, what) = mutate(good, &mut rng);
        match catch_unwind(AssertUnwindSafe(|| read(&bytes))) {
            Ok(ok) => errors += usize::from(!ok),
            Err(_) => panic!("{name}: case {case} (seed {seed}, {what}) panicked"),
        }
    }
    println!("{name}: {CASES} mutations, {errors} errors, no panic");
    errors
}

fn images(n: usize) -> Images {
    Images {
        labels: (0..n).map(|i| (i % 10) as u16).collect(),
        pixels: (0..n * IMAGE_BYTES).map(|i| (i * 7 % 256) as u8).collect(),
        side: 32,
    }
}

/// Reads a file source to its end; true when it ended without an error.
fn read_stream(path: &Path, bytes: &[u8]) -> bool {
    std::fs::write(path, bytes).unwrap();
    let spec = SourceSpec::parse(&format!("file:{}", path.display())).unwrap();
    let mut src = match source::open(&spec, &SourceOptions::default()) {
        Ok(s) => s,
        Err(_) => return false,
    };
    for _ in 0..10_000 {
        match src.next_batch() {
            Ok(Some(_)) => {}
            Ok(None) => return src.report().snapshot().rejected == 0,
            Err(_) => return false,
        }
    }
    panic!("the source did not end");
}

#[test]
fn wire_formats_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stream");
    let im = images(6);
    let mut spark = Vec::new();
    for b in 0..3 {
        let r = b * 2..b * 2 + 2;
        spark_json::encode(
            &im.labels[r.clone()],
            &im.pixels[r.start * IMAGE_BYTES..r.end * IMAGE_BYTES],
            &mut spark,
        );
        spark.push(b'\n');
    }
    let mut nd = Vec::new();
    for i in 0..6 {
        ndjson::encode(
            &im.labels[i..i + 1],
            &im.pixels[i * IMAGE_BYTES..(i + 1) * IMAGE_BYTES],
            &mut nd,
        );
        nd.push(b'\n');
    }
    let mut w = StreamWriter::try_new(Vec::new(), &stream_schema()).unwrap();
    for b in 0..3u64 {
        let r = b as usize * 2..b as usize * 2 + 2;
        let batch = make_batch(
            b,
            None,
            im.labels[r.clone()].to_vec(),
            im.pixels[r.start * IMAGE_BYTES..r.end * IMAGE_BYTES].to_vec(),
        )
        .unwrap();
        w.write(&batch).unwrap();
    }
    w.finish().unwrap();
    let ipc = w.into_inner().unwrap();
    let mut errors = 0;
    errors += fuzz("spark-json", 1, &spark, |b| read_stream(&path, b));
    errors += fuzz("ndjson", 2, &nd, |b| read_stream(&path, b));
    errors += fuzz("arrow", 3, &ipc, |b| read_stream(&path, b));
    assert!(
        errors > CASES,
        "the mutations should break many inputs: {errors}"
    );
}

#[test]
fn dataset_readers_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let im = images(5);
    let bin = dir.path().join("data_batch_1.bin");
    dataset::write_bin(&bin, &im).unwrap();
    let pkl = dir.path().join("data_batch_1");
    dataset::write_pickle(&pkl, &im, "training batch 1 of 5").unwrap();
    let (bin_bytes, pkl_bytes) = (std::fs::read(&bin).unwrap(), std::fs::read(&pkl).unwrap());
    let e1 = fuzz("cifar binary", 4, &bin_bytes, |b| {
        dataset::parse_bin(b, &bin).is_ok()
    });
    let e2 = fuzz("cifar pickle", 5, &pkl_bytes, |b| {
        dataset::parse_pickle(b, &pkl).is_ok()
    });
    assert!(e1 + e2 > CASES / 2, "{e1} {e2}");
}

#[test]
fn checkpoint_and_config_loaders_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let x = ndarray::Array2::from_shape_fn((20, 6), |(i, j)| ((i * 3 + j) % 7) as f32 / 7.0);
    let y = ndarray::Array1::from_shape_fn(20, |i| (i % 10) as u16);
    let mut total = 0;
    for (seed, name) in [(6u64, "logreg"), (7, "mlp"), (8, "kmeans"), (9, "svm")] {
        let mut m = cifar_df::run::config::build_model(name, &toml::Table::new()).unwrap();
        m.partial_fit(x.view(), y.view()).unwrap();
        m.save(&ck).unwrap();
        for file in [model::TENSORS_FILE, model::META_FILE] {
            let path = ck.join(file);
            let good = std::fs::read(&path).unwrap();
            total += fuzz(&format!("{name} {file}"), seed, &good, |b| {
                std::fs::write(&path, b).unwrap();
                model::load(&ck).is_ok_and(|m: Box<dyn Learner>| m.predict(x.view()).is_ok())
            });
            std::fs::write(&path, &good).unwrap();
        }
    }
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/patches.toml"))
            .unwrap();
    let cfg_path = dir.path().join("c.toml");
    total += fuzz("config", 10, text.as_bytes(), |b| {
        std::str::from_utf8(b)
            .ok()
            .is_some_and(|t| RunConfig::parse(t, &cfg_path).is_ok())
    });
    assert!(total > CASES, "{total}");
}
