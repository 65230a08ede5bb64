//! A seeded mutation fuzzer over every reader of untrusted bytes: the three wire formats
//! (read from a file source: spark-json, ndjson, Arrow IPC), the CIFAR-10 binary and
//! pickle readers, the image folders' PNG and JPEG decoders (small valid images of each
//! kind, and headers declaring sizes that must be refused; the JPEGs in `tests/ref/images`
//! were written by Pillow: 20x14 baseline 4:2:0, 13x9 progressive 4:4:4, 11x8 grey), the
//! checkpoint loader (every model, the CNN, ridge and kernel SVM also with the scalars of
//! their JSON and safetensors headers replaced by edge values), the trainer's state and the
//! config parser. Each valid input is mutated (bit flips, overwritten bytes, huge numbers,
//! truncation, deleted and duplicated spans, invalid UTF-8) a bounded number of times;
//! every read must end with data or an error (for a checkpoint, one naming its file), never
//! a panic, an abort or a hang. A failing case prints its seed and mutation;
//! the seeds are fixed, so every case found stays a regression test. (Seed 3 found that a
//! corrupt Arrow IPC body length made Arrow's reader allocate 50 PB and abort; cifar-df
//! now checks the framing and bounds every length first.)

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use arrow::ipc::writer::StreamWriter;
use cifar_df::dataset::{self, folder, Images, IMAGE_BYTES};
use cifar_df::model::{self, Learner};
use cifar_df::rng::SplitMix;
use cifar_df::run::checkpoint::{self, TrainState};
use cifar_df::run::config::RunConfig;
use cifar_df::source::{self, SourceOptions, SourceSpec};
use cifar_df::testing::{header_only_png, jpeg_declaring};
use cifar_df::wire::batch::{make_batch, stream_schema};
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

/// Values that a JSON scalar is replaced with: the edges of the integer types, huge and
/// tiny floats, and other types.
const EDGES: [&str; 18] = [
    "0",
    "-1",
    "1",
    "2",
    "65536",
    "2147483648",
    "4294967296",
    "9007199254740993",
    "18446744073709551615",
    "18446744073709551616",
    "1e300",
    "-1e300",
    "1e-300",
    "0.5",
    "null",
    "true",
    "false",
    "[]",
];

/// One JSON scalar (number, `true`, `false`, `null`) of `good[region]` replaced with one of
/// [`EDGES`]. Returns the bytes, the change in length, and what was done.
fn mutate_scalar(
    good: &[u8],
    region: std::ops::Range<usize>,
    rng: &mut SplitMix,
) -> (Vec<u8>, isize, String) {
    let mut spans = Vec::new();
    let (mut i, mut in_string) = (region.start, false);
    while i < region.end {
        let c = good[i];
        if in_string {
            match c {
                b'\\' => i += 1,
                b'"' => in_string = false,
                _ => {}
            }
            i += 1;
        } else if c == b'"' {
            in_string = true;
            i += 1;
        } else if c == b'-' || c.is_ascii_digit() || matches!(c, b't' | b'f' | b'n') {
            let start = i;
            while i < region.end && (good[i].is_ascii_alphanumeric() || b"+-.".contains(&good[i])) {
                i += 1;
            }
            spans.push(start..i);
        } else {
            i += 1;
        }
    }
    let mut b = good.to_vec();
    if spans.is_empty() {
        return (b, 0, "no scalar".into());
    }
    let span = spans[rng.below(spans.len())].clone();
    let edge = EDGES[rng.below(EDGES.len())];
    let what = format!(
        "{} at {} replaced by {edge}",
        String::from_utf8_lossy(&good[span.clone()]),
        span.start
    );
    let delta = edge.len() as isize - span.len() as isize;
    b.splice(span, edge.bytes());
    (b, delta, what)
}

/// A scalar of a JSON file replaced.
fn mutate_json(good: &[u8], rng: &mut SplitMix) -> (Vec<u8>, String) {
    let (b, _, what) = mutate_scalar(good, 0..good.len(), rng);
    (b, what)
}

/// A scalar of a safetensors file's JSON header (shapes, offsets, dtypes' neighbours)
/// replaced, the header's length prefix kept right.
fn mutate_safetensors(good: &[u8], rng: &mut SplitMix) -> (Vec<u8>, String) {
    let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let (mut b, delta, what) = mutate_scalar(good, 8..8 + n, rng);
    let n = (n as isize + delta) as u64;
    b[..8].copy_from_slice(&n.to_le_bytes());
    (b, format!("header: {what}"))
}

/// Runs `read` on `CASES` mutations of `good`; panics (naming the case) if any panics.
/// Returns how many of them were errors.
fn fuzz(name: &str, seed: u64, good: &[u8], mut read: impl FnMut(&[u8]) -> bool) -> usize {
    assert!(read(good), "{name}: the valid input must read");
    mutations(name, seed, good, read)
}

/// [`fuzz`] without requiring `start` itself to read (an input that must be refused).
fn mutations(name: &str, seed: u64, start: &[u8], read: impl FnMut(&[u8]) -> bool) -> usize {
    mutations_by(name, seed, start, mutate, read)
}

/// [`mutations`] by the mutator `mutate`.
fn mutations_by(
    name: &str,
    seed: u64,
    start: &[u8],
    mut mutate: impl FnMut(&[u8], &mut SplitMix) -> (Vec<u8>, String),
    mut read: impl FnMut(&[u8]) -> bool,
) -> usize {
    let mut rng = SplitMix(seed);
    let mut errors = 0;
    for case in 0..CASES {
        let (bytes, what) = mutate(start, &mut rng);
        match catch_unwind(AssertUnwindSafe(|| read(&bytes))) {
            Ok(ok) => errors += usize::from(!ok),
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("{name}: case {case} (seed {seed}, {what}) panicked: {msg}")
            }
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

/// Decodes `bytes` as a file of an image folder would be, with 64 MiB for the decoder;
/// true when it gave an image.
fn read_image(bytes: &[u8], scratch: &mut Vec<f32>) -> bool {
    match folder::decode_within(bytes, 32, scratch, 64 << 20, "64 MiB (fuzz)") {
        Ok(row) => {
            assert_eq!(row.len(), IMAGE_BYTES);
            true
        }
        Err(e) => {
            assert!(!e.is_empty());
            false
        }
    }
}

/// A PNG of `w`×`h` of colour `color` and `depth`, its samples from `i`.
fn png_image(w: u32, h: u32, color: png::ColorType, depth: png::BitDepth) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut e = png::Encoder::new(&mut out, w, h);
        e.set_color(color);
        e.set_depth(depth);
        if color == png::ColorType::Indexed {
            e.set_palette((0..16 * 3).map(|i| (i * 5) as u8).collect::<Vec<_>>());
        }
        let mut writer = e.write_header().unwrap();
        let samples = match color {
            png::ColorType::Grayscale | png::ColorType::Indexed => 1,
            png::ColorType::GrayscaleAlpha => 2,
            png::ColorType::Rgb => 3,
            png::ColorType::Rgba => 4,
        };
        let bits = samples * depth as usize;
        let row = (w as usize * bits).div_ceil(8);
        let data: Vec<u8> = (0..row * h as usize)
            .map(|i| match color {
                png::ColorType::Indexed => (i % 16) as u8 & if bits == 4 { 0xff } else { 0x0f },
                _ => (i * 37 % 251) as u8,
            })
            .collect();
        writer.write_image_data(&data).unwrap();
    }
    out
}

const JPEGS: [(&str, &[u8]); 3] = [
    (
        "baseline 4:2:0",
        include_bytes!("../ref/images/baseline.jpg").as_slice(),
    ),
    (
        "progressive 4:4:4",
        include_bytes!("../ref/images/progressive.jpg").as_slice(),
    ),
    ("grey", include_bytes!("../ref/images/grey.jpg").as_slice()),
];

#[test]
fn image_decoders_never_panic() {
    use png::{BitDepth, ColorType};
    let mut scratch = Vec::new();
    let mut read = |b: &[u8]| read_image(b, &mut scratch);
    let mut errors = 0;
    let pngs = [
        ("png rgb", png_image(12, 9, ColorType::Rgb, BitDepth::Eight)),
        (
            "png grey+alpha 16-bit",
            png_image(7, 5, ColorType::GrayscaleAlpha, BitDepth::Sixteen),
        ),
        (
            "png palette 4-bit",
            png_image(6, 6, ColorType::Indexed, BitDepth::Four),
        ),
        (
            "png rgba 32x32",
            png_image(32, 32, ColorType::Rgba, BitDepth::Eight),
        ),
    ];
    for (seed, (name, good)) in (20u64..).zip(&pngs) {
        errors += fuzz(name, seed, good, &mut read);
    }
    for (seed, (name, good)) in (24u64..).zip(JPEGS) {
        errors += fuzz(&format!("jpeg {name}"), seed, good, &mut read);
    }
    // Oversized and corrupt headers: refused before decoding, by what they declare.
    let huge = [
        (
            "png 12000x12000",
            header_only_png(12000, 12000),
            "12000x12000",
        ),
        (
            "png 1x2147483647",
            header_only_png(1, i32::MAX as u32),
            "1x2147483647",
        ),
        (
            "png 3000x3000",
            header_only_png(3000, 3000),
            "over 64 MiB (fuzz)",
        ),
        (
            "jpeg 16384x16384",
            jpeg_declaring(JPEGS[0].1, 16384, 16384),
            "16384x16384",
        ),
        (
            "jpeg 8000x1000",
            jpeg_declaring(JPEGS[1].1, 8000, 1000),
            "over 64 MiB (fuzz)",
        ),
    ];
    for (seed, (name, bytes, want)) in (27u64..).zip(&huge) {
        let e = folder::decode_within(bytes, 32, &mut Vec::new(), 64 << 20, "64 MiB (fuzz)")
            .unwrap_err();
        assert!(
            e.contains(want) && e.contains("refused before decoding"),
            "{name}: {e}"
        );
        errors += mutations(&format!("{name} header"), seed, bytes, &mut read);
    }
    assert!(
        errors > CASES,
        "the mutations should break many images: {errors}"
    );
}

/// Fuzzes both files of the checkpoint in `ck` (a trained `name`), by the generic
/// mutations (seed `seed`) and by replacing the scalars of their JSON (seed `seed + 100`):
/// every load ends with a model that predicts, or an error naming the checkpoint's file.
fn fuzz_checkpoint(name: &str, seed: u64, ck: &Path, x: ndarray::ArrayView2<f32>) -> usize {
    let mut errors = 0;
    for file in [model::TENSORS_FILE, model::META_FILE] {
        let path = ck.join(file);
        let good = std::fs::read(&path).unwrap();
        let mut read = |b: &[u8]| {
            std::fs::write(&path, b).unwrap();
            match model::load(ck) {
                Ok(m) => m.predict(x).is_ok(),
                Err(e) => {
                    let msg = e.to_string();
                    assert!(
                        msg.contains(model::TENSORS_FILE) || msg.contains(model::META_FILE),
                        "{name}: a load error that names no file: {msg}"
                    );
                    false
                }
            }
        };
        errors += fuzz(&format!("{name} {file}"), seed, &good, &mut read);
        let scalars = if file == model::META_FILE {
            mutate_json
        } else {
            mutate_safetensors
        };
        errors += mutations_by(
            &format!("{name} {file} scalars"),
            seed + 100,
            &good,
            scalars,
            &mut read,
        );
        std::fs::write(&path, &good).unwrap();
    }
    errors
}

#[test]
fn newer_checkpoints_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let table = |text: &str| -> toml::Table { text.parse().unwrap() };
    let mut total = 0;
    // The CNN on 32x32 images (3,072 features), with a slow copy (lookahead).
    let mut rng = SplitMix(11);
    let images = ndarray::Array2::from_shape_fn((24, 3072), |_| rng.below(256) as f32 / 255.0);
    let labels = ndarray::Array1::from_shape_fn(24, |i| (i % 10) as u16);
    let ck = dir.path().join("cnn");
    let mut m = cifar_df::run::config::build_model(
        "cnn",
        &table("widths = [4, 6, 8]\nbatch_size = 8\nlookahead_every = 2"),
    )
    .unwrap();
    m.partial_fit(images.view(), labels.view()).unwrap();
    m.save(&ck).unwrap();
    total += fuzz_checkpoint("cnn", 11, &ck, images.view());
    // Ridge, exact (Gram matrix) and Nyström, and the kernel SVM, fitted.
    let x = ndarray::Array2::from_shape_fn((20, 6), |(i, j)| ((i * 3 + j) % 7) as f32 / 7.0);
    let y = ndarray::Array1::from_shape_fn(20, |i| (i % 10) as u16);
    for (seed, name, model, params) in [
        (12u64, "ridge", "ridge", "buffer = 16\nrefit = 8"),
        (
            13,
            "ridge nystrom",
            "ridge",
            "buffer = 8\nrefit = 4\nnystrom = true\nnystrom_refit = 4",
        ),
        (14, "svm-kernel", "svm-kernel", "buffer = 12"),
    ] {
        let ck = dir.path().join(name.replace(' ', "-"));
        let mut m = cifar_df::run::config::build_model(model, &table(params)).unwrap();
        m.partial_fit(x.view(), y.view()).unwrap();
        m.save(&ck).unwrap();
        total += fuzz_checkpoint(name, seed, &ck, x.view());
    }
    // The trainer's state beside a run checkpoint's model.
    let state = TrainState::new("r", "ridge", 1, false, 20);
    let run_ck = checkpoint::save(&dir.path().join("run"), &state, m.as_ref(), "").unwrap();
    let path = run_ck.join(checkpoint::STATE_FILE);
    let good = std::fs::read(&path).unwrap();
    let mut read = |b: &[u8]| {
        std::fs::write(&path, b).unwrap();
        match checkpoint::open(&run_ck) {
            Ok(c) => c.model().is_ok(),
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains(checkpoint::STATE_FILE), "{msg}");
                false
            }
        }
    };
    total += fuzz("trainer state", 15, &good, &mut read);
    total += mutations_by("trainer state scalars", 115, &good, mutate_json, &mut read);
    assert!(total > CASES, "{total}");
}
