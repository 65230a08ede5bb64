//! The image functions through SQL, against an independent numpy reference, and the
//! training / evaluation queries in `sql/` over the streaming table.
//!
//! The reference is computed by a python3 script spawned from the test. Without numpy the
//! numpy comparison is skipped with a note, except under CI (env `CI` set), where it fails.

use crate::common;

use common::have_python;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use arrow::array::{Array, FixedSizeListArray, Float32Array, UInt32Array, UInt64Array, UInt8Array};
use arrow::datatypes::{DataType, Field};
use arrow::record_batch::RecordBatch;
use cifar_df::dataset::synth;
use cifar_df::dataset::Split;
use cifar_df::query;
use cifar_df::source::table::register_stream;
use cifar_df::source::{self, SourceOptions, SourceSpec};
use cifar_df::wire::batch::make_batch;

const N: usize = 16;
const PADDING: usize = 4;

/// The numpy reference: reads `images.u8` (N×3×32×32) from the folder in argv[1] and
/// writes what each query column should be.
const REFERENCE: &str = r#"
import os, sys
import numpy as np

d = sys.argv[1]
img = np.fromfile(os.path.join(d, "images.u8"), dtype=np.uint8).reshape(-1, 3, 32, 32)
n = img.shape[0]
x = img.astype(np.float64)

def put(name, a, dtype):
    np.ascontiguousarray(a, dtype=dtype).tofile(os.path.join(d, name))

mean = np.array([0.4914, 0.4822, 0.4465])[None, :, None, None]
std = np.array([0.2470, 0.2435, 0.2616])[None, :, None, None]
put("norm.f64", (x / 255.0 - mean) / std, "<f8")
put("hflip.u8", img[:, :, :, ::-1], np.uint8)
put("vflip.u8", img[:, :, ::-1, :], np.uint8)

def color_shift(im, r, g, b):
    return np.stack([np.roll(im[0], r, axis=0), np.roll(im[1], g, axis=1),
                     np.roll(im[2], b, axis=0)])

put("cshift.u8", np.stack([color_shift(im, 3, -5, 33) for im in img]), np.uint8)
put("cshift_rows.u8", np.stack([color_shift(im, i, -i, 2 * i) for i, im in enumerate(img)]),
    np.uint8)

def taps(n_in, n_out):
    # Half-pixel centres, clamped at the edges (torch align_corners=False, OpenCV INTER_LINEAR).
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0

def resize(a, h, w):
    y0, y1, wy = taps(a.shape[2], h)
    x0, x1, wx = taps(a.shape[3], w)
    rows = a[:, :, y0, :] * (1 - wy)[:, None] + a[:, :, y1, :] * wy[:, None]
    return rows[:, :, :, x0] * (1 - wx) + rows[:, :, :, x1] * wx

for (h, w) in [(24, 40), (64, 48), (7, 13)]:
    put(f"resize_{h}x{w}.f64", resize(x, h, w), "<f8")
    put(f"resize_{h}x{w}_unit.f64", resize(x / 255.0, h, w), "<f8")

p = int(sys.argv[2])
padded = np.pad(img, ((0, 0), (0, 0), (p, p), (p, p)))
crops = np.stack([padded[:, :, oy:oy + 32, ox:ox + 32]
                  for oy in range(2 * p + 1) for ox in range(2 * p + 1)], axis=1)
put("crops.u8", crops, np.uint8)
t = 2
reflected = np.pad(img, ((0, 0), (0, 0), (t, t), (t, t)), mode="reflect")
shifts = np.stack([reflected[:, :, oy:oy + 32, ox:ox + 32]
                   for oy in range(2 * t + 1) for ox in range(2 * t + 1)], axis=1)
put("translations.u8", shifts, np.uint8)
"#;

fn images() -> (Vec<u16>, Vec<u8>) {
    let mut labels = Vec::with_capacity(N);
    let mut pixels = vec![0u8; N * 3072];
    for (i, px) in pixels.chunks_exact_mut(3072).enumerate() {
        labels.push(synth::image(11, Split::Train, i as u64, px));
    }
    (labels, pixels)
}

fn read_u8(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap()
}

fn read_f64(dir: &Path, name: &str) -> Vec<f64> {
    std::fs::read(dir.join(name))
        .unwrap()
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn list<'a>(batch: &'a RecordBatch, name: &str) -> &'a FixedSizeListArray {
    batch
        .column_by_name(name)
        .unwrap_or_else(|| panic!("no column {name}"))
        .as_any()
        .downcast_ref::<FixedSizeListArray>()
        .unwrap()
}

fn u8_values(batch: &RecordBatch, name: &str) -> Vec<u8> {
    let l = list(batch, name);
    assert_eq!(l.value_type(), DataType::UInt8, "{name}");
    assert_eq!(l.null_count(), 0, "{name}");
    l.values()
        .as_any()
        .downcast_ref::<UInt8Array>()
        .unwrap()
        .values()
        .to_vec()
}

fn f32_values(batch: &RecordBatch, name: &str) -> Vec<f32> {
    let l = list(batch, name);
    assert_eq!(l.value_type(), DataType::Float32, "{name}");
    assert_eq!(l.null_count(), 0, "{name}");
    l.values()
        .as_any()
        .downcast_ref::<Float32Array>()
        .unwrap()
        .values()
        .to_vec()
}

/// The largest |a − b|.
fn max_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - y).abs())
        .fold(0.0, f64::max)
}

async fn run_on_images(pixels: &[u8], labels: &[u16], sql: &str) -> RecordBatch {
    let ctx = query::session();
    let batch = make_batch(3, None, labels.to_vec(), pixels.to_vec()).unwrap();
    ctx.register_batch("t", batch).unwrap();
    let out = query::run(&ctx, sql).await.unwrap();
    arrow::compute::concat_batches(&out[0].schema(), &out).unwrap()
}

const QUERY: &str = r#"
SELECT "row",
       normalize(image, 0.4914, 0.4822, 0.4465, 0.2470, 0.2435, 0.2616) AS norm,
       hflip(image, 1.0) AS h1,
       hflip(image, 0.0) AS h0,
       hflip(image, 1, batch, "row") AS h1_pos,
       vflip(image, 1) AS v1,
       vflip(image, 0) AS v0,
       hflip(normalize(image, 0, 0, 0, 1, 1, 1), 1.0) AS h1_unit,
       vflip(normalize(image, 0, 0, 0, 1, 1, 1), 1.0) AS v1_unit,
       color_shift(image, 3, -5, 33, 1.0) AS cs,
       color_shift(image, 3, -5, 33, 0.0) AS cs0,
       color_shift(image, "row", -CAST("row" AS BIGINT), 2 * "row", 1) AS cs_rows,
       resize(image, 24, 40) AS r_24x40,
       resize(normalize(image, 0, 0, 0, 1, 1, 1), 24, 40) AS r_24x40_unit,
       resize(image, 64, 48) AS r_64x48,
       resize(normalize(image, 0, 0, 0, 1, 1, 1), 64, 48) AS r_64x48_unit,
       resize(image, 7.0, 13) AS r_7x13,
       resize(normalize(image, 0, 0, 0, 1, 1, 1), 7, 13) AS r_7x13_unit,
       random_crop(image, 4, batch, "row") AS crop,
       translate(image, 2, batch, "row") AS shifted,
       translate(normalize(image, 0, 0, 0, 1, 1, 1), 2, batch, "row") AS shifted_unit
FROM t
ORDER BY "row"
"#;

#[tokio::test]
async fn functions_match_numpy() {
    if !have_python("numpy", "the transforms reference") {
        return;
    }
    let (labels, pixels) = images();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("images.u8"), &pixels).unwrap();
    let script = dir.path().join("reference.py");
    std::fs::write(&script, REFERENCE).unwrap();
    let out = Command::new("python3")
        .arg(&script)
        .arg(dir.path())
        .arg(PADDING.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "reference script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = dir.path();
    let b = run_on_images(&pixels, &labels, QUERY).await;
    assert_eq!(b.num_rows(), N);

    // normalize, to 1e-6.
    let norm = f32_values(&b, "norm");
    let diff = max_diff(&norm, &read_f64(d, "norm.f64"));
    assert!(diff < 1e-6, "normalize differs from numpy by {diff}");

    // Flips at p = 1 are numpy's; at p = 0 the input.
    assert_eq!(u8_values(&b, "h1"), read_u8(d, "hflip.u8"));
    assert_eq!(u8_values(&b, "h1_pos"), read_u8(d, "hflip.u8"));
    assert_eq!(u8_values(&b, "h0"), pixels);
    assert_eq!(u8_values(&b, "v1"), read_u8(d, "vflip.u8"));
    assert_eq!(u8_values(&b, "v0"), pixels);
    // Float32 images keep their type and flip the same way.
    for (col, reference) in [("h1_unit", "hflip.u8"), ("v1_unit", "vflip.u8")] {
        let want: Vec<f64> = read_u8(d, reference)
            .iter()
            .map(|&v| f64::from(v) / 255.0)
            .collect();
        let diff = max_diff(&f32_values(&b, col), &want);
        assert!(diff < 1e-7, "{col}: {diff}");
    }

    // color_shift at p = 1 is np.roll per plane; shifts from columns too.
    assert_eq!(u8_values(&b, "cs"), read_u8(d, "cshift.u8"));
    assert_eq!(u8_values(&b, "cs0"), pixels);
    assert_eq!(u8_values(&b, "cs_rows"), read_u8(d, "cshift_rows.u8"));

    // resize: 1e-4 for Float32, ±1 for UInt8 (rounding).
    for (h, w) in [(24, 40), (64, 48), (7, 13)] {
        let name = format!("r_{h}x{w}");
        let got = u8_values(&b, &name);
        assert_eq!(got.len(), N * 3 * h * w, "{name}");
        let want = read_f64(d, &format!("resize_{h}x{w}.f64"));
        let mut off = 0;
        for (&g, &r) in got.iter().zip(&want) {
            let e = (f64::from(g) - r.round()).abs();
            assert!(e <= 1.0, "{name}: {g} vs {r}");
            off += usize::from(e > 0.0);
        }
        // Off by one only where float32 and float64 round a value near .5 differently.
        assert!(off * 20 < got.len(), "{name}: {off} values off by one");
        eprintln!("{name}: {off} of {} UInt8 values off by one", got.len());
        let got = f32_values(&b, &format!("{name}_unit"));
        let diff = max_diff(&got, &read_f64(d, &format!("resize_{h}x{w}_unit.f64")));
        assert!(diff < 1e-4, "{name}_unit differs from numpy by {diff}");
    }

    // random_crop is numpy's crop of the zero-padded image at some offset in range.
    let crop = u8_values(&b, "crop");
    let candidates = read_u8(d, "crops.u8");
    let k = (2 * PADDING + 1) * (2 * PADDING + 1);
    let mut offsets = Vec::new();
    for (i, got) in crop.chunks_exact(3072).enumerate() {
        let found = candidates[i * k * 3072..(i + 1) * k * 3072]
            .chunks_exact(3072)
            .position(|c| c == got);
        let found = found.unwrap_or_else(|| panic!("row {i}: crop matches no offset"));
        offsets.push((found / (2 * PADDING + 1), found % (2 * PADDING + 1)));
    }
    offsets.sort();
    offsets.dedup();
    assert!(offsets.len() > 3, "offsets hardly vary: {offsets:?}");
    // translate is numpy's crop of the reflect-padded image (mode="reflect") at some
    // offset in range; a Float32 image moves the same way.
    let shifted = u8_values(&b, "shifted");
    let candidates = read_u8(d, "translations.u8");
    let mut offsets = Vec::new();
    for (i, got) in shifted.chunks_exact(3072).enumerate() {
        let found = candidates[i * 25 * 3072..(i + 1) * 25 * 3072]
            .chunks_exact(3072)
            .position(|c| c == got);
        offsets.push(found.unwrap_or_else(|| panic!("row {i}: translation matches no offset")));
    }
    offsets.sort();
    offsets.dedup();
    assert!(offsets.len() > 3, "translations hardly vary: {offsets:?}");
    let unit: Vec<f64> = shifted.iter().map(|&v| f64::from(v) / 255.0).collect();
    assert!(max_diff(&f32_values(&b, "shifted_unit"), &unit) < 1e-7);
    // The same seed and positions give the same crops (and flips) in a new session.
    let again = run_on_images(&pixels, &labels, QUERY).await;
    assert_eq!(u8_values(&again, "crop"), crop);
    assert_eq!(u8_values(&again, "shifted"), shifted);
}

/// Run one of the `sql/` files over `synthetic:300:0:1` (100-image batches).
async fn run_sql_file(sql: &str) -> Vec<RecordBatch> {
    let ctx = query::stream_session();
    let spec = SourceSpec::parse("synthetic:300:0:1").unwrap();
    let src = source::open(&spec, &SourceOptions::default()).unwrap();
    register_stream(&ctx, src, true).unwrap();
    query::run(&ctx, sql).await.unwrap()
}

fn check_features(batches: &[RecordBatch]) {
    assert_eq!(batches.len(), 3, "one output batch per input batch");
    for (i, b) in batches.iter().enumerate() {
        assert_eq!(b.num_rows(), 100);
        let schema = b.schema();
        // eval.sql also passes the raw `image` through (for the k-means cluster grids).
        let names: Vec<&str> = schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .filter(|&n| n != "image")
            .collect();
        assert_eq!(names, ["batch", "row", "label", "features"]);
        let features = schema.index_of("features").unwrap();
        assert_eq!(
            b.schema().field(features).data_type(),
            &DataType::FixedSizeList(Arc::new(Field::new("item", DataType::Float32, false)), 3072)
        );
        let batch = b.column(0).as_any().downcast_ref::<UInt64Array>().unwrap();
        assert!(batch.values().iter().all(|&v| v == i as u64));
        let row = b.column(1).as_any().downcast_ref::<UInt32Array>().unwrap();
        assert!(row.values().iter().copied().eq(0..100));
    }
}

#[tokio::test]
async fn train_and_eval_sql_run_on_the_stream() {
    let train = run_sql_file(include_str!("../../sql/train.sql")).await;
    let eval = run_sql_file(include_str!("../../sql/eval.sql")).await;
    check_features(&train);
    check_features(&eval);
    // Each training row is the evaluation row, or the same mirrored across the width
    // (normalization is per channel, so it commutes with the flip).
    let mut flipped = 0;
    for (t, e) in train.iter().zip(&eval) {
        let t = f32_values(t, "features");
        let e = f32_values(e, "features");
        for (tr, er) in t.chunks_exact(3072).zip(e.chunks_exact(3072)) {
            if tr == er {
                continue;
            }
            let mirrored: Vec<f32> = er
                .chunks_exact(32)
                .flat_map(|row| row.iter().rev().copied())
                .collect();
            assert_eq!(
                tr,
                &mirrored[..],
                "a training row is neither eval nor its flip"
            );
            flipped += 1;
        }
    }
    // p = 0.345 over 300 images: 103.5 expected, sd ≈ 8.2.
    assert!((60..150).contains(&flipped), "{flipped} of 300 flipped");
}
