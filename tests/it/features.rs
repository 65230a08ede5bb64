//! The features stage: the patch extractor against a numpy reference, the feature cache
//! (Parquet round trip, flipped copies, resume by part), every model trained from
//! `features:`, `extract_features` in SQL, the one-command streaming run, bad input, and
//! the accuracy on real CIFAR-10 images.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use arrow::array::{Array, BooleanArray, FixedSizeListArray, Float32Array, UInt16Array};
use cifar_df::dataset::synth::{self, SynthSpec};
use cifar_df::dataset::{Split, IMAGE_BYTES};
use cifar_df::features::patches::{Encoding, PatchExtractor, PatchParams};
use cifar_df::features::Extractor;
use common::{bin, fails, have_python, query_csv, query_value, resume_run, run_ok, train_run};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

fn synth_pixels(n: usize) -> Vec<u8> {
    let spec = SynthSpec {
        train: n,
        test: 0,
        seed: 9,
    };
    synth::generate(&spec, Split::Train)
        .into_iter()
        .flat_map(|i| i.pixels)
        .collect()
}

fn small(encoding: Encoding, invariant: bool) -> PatchParams {
    PatchParams {
        atoms: 48,
        samples: 3000,
        stats_images: 30,
        encoding,
        invariant,
        grid: 2,
        patch: 5,
        ..PatchParams::default()
    }
}

#[test]
fn the_extractor_matches_a_numpy_reference() {
    if !have_python("numpy", "the extractor reference") {
        return;
    }
    let px = synth_pixels(60);
    let dir = tempfile::tempdir().unwrap();
    for (i, (enc, inv)) in [
        (Encoding::Threshold, false),
        (Encoding::Threshold, true),
        (Encoding::Triangle, true),
    ]
    .into_iter()
    .enumerate()
    {
        let params = PatchParams {
            grid: if i == 1 { 3 } else { 2 },
            components: if i == 2 { 40 } else { 0 },
            ..small(enc, inv)
        };
        let ex = Extractor::Patches(PatchExtractor::fit(&params, &px, 32).unwrap());
        let folder = dir.path().join(format!("ex{i}"));
        ex.save(&folder).unwrap();
        // Load it back: the reference reads the files, we encode with the loaded copy.
        let ex = Extractor::load(&folder).unwrap();
        let some = &px[..5 * IMAGE_BYTES];
        let f = ex.encode(some).unwrap();
        let images = dir.path().join(format!("img{i}.u8"));
        let feats = dir.path().join(format!("f{i}.f32"));
        std::fs::write(&images, some).unwrap();
        let bytes: Vec<u8> = f.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(&feats, bytes).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ref/patches_reference.py");
        let (out, _) = run_ok(
            Command::new("python3")
                .arg(script)
                .arg(&folder)
                .arg(&images)
                .arg(&feats),
        );
        assert!(out.contains("features: 5 images"), "{out}");
    }
}

/// Rows of a cache part: (label, flipped, features).
fn read_part(path: &Path) -> Vec<(u16, bool, Vec<f32>)> {
    let file = std::fs::File::open(path).unwrap();
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    fn column<T: Array + Clone + 'static>(b: &arrow::record_batch::RecordBatch, name: &str) -> T {
        b.column_by_name(name)
            .unwrap()
            .as_any()
            .downcast_ref::<T>()
            .unwrap()
            .clone()
    }
    let mut out = Vec::new();
    for b in reader {
        let b = b.unwrap();
        let label = column::<UInt16Array>(&b, "label");
        let flipped = column::<BooleanArray>(&b, "flipped");
        let feats = column::<FixedSizeListArray>(&b, "features");
        for i in 0..b.num_rows() {
            let v = feats.value(i);
            let v = v
                .as_any()
                .downcast_ref::<Float32Array>()
                .unwrap()
                .values()
                .to_vec();
            out.push((label.value(i), flipped.value(i), v));
        }
    }
    out
}

fn parts(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

/// `-q features --data DATA --out OUT` with the small extractor, not run yet.
fn small_features(data: &str, out: &Path) -> Command {
    let mut cmd = bin();
    cmd.args(["-q", "features", "--data", data, "--out"])
        .arg(out)
        .args(common::SMALL_EXTRACTOR);
    cmd
}

/// A small features cache of `data` in parts of 100 rows, plus `extra`, asserting success.
fn features_cmd(data: &str, out: &Path, extra: &[&str]) -> (String, String) {
    run_ok(
        small_features(data, out)
            .args(["--rows-per-part", "100"])
            .args(extra),
    )
}

#[test]
fn the_cache_round_trips_with_flipped_copies_and_resumes_by_part() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("F");
    let (out, _) = features_cmd(
        "synthetic:250:60:4",
        &f,
        &["--flip", "--set", "invariant=false"],
    );
    assert!(out.contains("4 parts written, 0 kept"), "{out}");
    let train = parts(&f.join("train"));
    assert_eq!(train.len(), 3);
    let rows: Vec<_> = train.iter().flat_map(|p| read_part(p)).collect();
    assert_eq!(rows.len(), 500, "each image and its flipped copy");
    // The cached features are the extractor's, image by image, and the flipped copies
    // are the features of the mirrored images.
    let ex = Extractor::load(&f.join("extractor")).unwrap();
    let spec = SynthSpec {
        train: 250,
        test: 60,
        seed: 4,
    };
    let images: Vec<u8> = synth::generate(&spec, Split::Train)
        .into_iter()
        .flat_map(|i| i.pixels)
        .collect();
    let labels: Vec<u16> = synth::generate(&spec, Split::Train)
        .into_iter()
        .flat_map(|i| i.labels)
        .collect();
    let some = &images[..3 * IMAGE_BYTES];
    let mut mirrored = some.to_vec();
    for row in mirrored.chunks_mut(32) {
        row.reverse();
    }
    let direct = ex.encode(some).unwrap();
    let flipped = ex.encode(&mirrored).unwrap();
    let scale = direct.iter().fold(0f32, |m, v| m.max(v.abs()));
    for i in 0..3 {
        let (l, fl, v) = &rows[2 * i];
        assert_eq!((*l, *fl), (labels[i], false));
        assert_eq!(v.as_slice(), direct.row(i).as_slice().unwrap());
        let (l2, fl2, v2) = &rows[2 * i + 1];
        assert_eq!((*l2, *fl2), (labels[i], true));
        for (a, b) in v2.iter().zip(flipped.row(i).iter()) {
            assert!(
                (a - b).abs() <= 1e-3 * scale,
                "flipped copy of image {i}: {a} vs {b}"
            );
        }
    }
    assert_eq!(
        read_part(&parts(&f.join("test"))[0]).len(),
        60,
        "no flipped copies in the test split"
    );
    // An interrupted job: a part missing, an unfinished temporary file left behind.
    let before = std::fs::read(&train[1]).unwrap();
    std::fs::remove_file(&train[1]).unwrap();
    std::fs::write(train[1].with_extension("parquet.inprogress"), b"torn").unwrap();
    let (out, _) = features_cmd(
        "synthetic:250:60:4",
        &f,
        &["--flip", "--set", "invariant=false"],
    );
    assert!(out.contains("1 parts written, 3 kept"), "{out}");
    assert_eq!(read_part(&train[1]), {
        let tmp = dir.path().join("before.parquet");
        std::fs::write(&tmp, &before).unwrap();
        read_part(&tmp)
    });
    // The cache is queryable as any Parquet folder.
    let q = query_csv(
        dir.path(),
        &format!(
            "select count(*) as n, sum(cast(flipped as int)) as f from '{}/'",
            f.join("train").display()
        ),
    );
    assert!(q.contains("500,250"), "{q}");
    // The cache's root, Parquet parts next to cache.json and the extractor, reads as the
    // table of its parts (train and test).
    let q = query_csv(
        dir.path(),
        &format!("select count(*) as n from '{}/'", f.display()),
    );
    assert_eq!(q, "n\n560\n");
    // A folder with no Parquet file is an error naming what it holds.
    let err = fails(bin().args([
        "query",
        &format!("select * from '{}/'", f.join("extractor").display()),
    ]));
    assert!(
        err.contains("no Parquet file") && err.contains(".json"),
        "{err}"
    );
}

#[test]
fn every_model_trains_from_features_and_predicts() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("F");
    features_cmd("synthetic:400:100:5", &f, &[]);
    let runs = dir.path().join("runs");
    for model in ["ridge", "logreg", "svm", "mlp", "kmeans"] {
        let (out, _) = run_ok(train_run(&runs, model).args([
            "--source",
            &format!("features:{}", f.display()),
            "--model",
            model,
            "--no-plots",
            "--batch-size",
            "50",
        ]));
        assert!(
            out.contains("test ("),
            "{model}: the test split is scored\n{out}"
        );
        let (out, _) = run_ok(bin().args([
            "-q",
            "predict",
            "--run",
            model,
            "--runs",
            runs.to_str().unwrap(),
            "--source",
            &format!("features:{}", f.display()),
        ]));
        assert!(out.contains("accuracy"), "{out}");
    }
    let q = query_csv(&runs, "select run, sum(images) as n from eval_metrics where split = 'test' group by run order by run");
    for model in ["kmeans", "logreg", "mlp", "ridge", "svm"] {
        assert!(q.contains(&format!("{model},100")), "{q}");
    }
    // The ridge model learns the synthetic classes from the features well above chance.
    let acc: f64 = query_value(
        &runs,
        "select sum(acc * images) / sum(images) as a from eval_metrics where run = 'ridge'",
    );
    assert!(acc > 0.4, "ridge test accuracy {acc}");
}

#[test]
fn extract_features_is_a_sql_function_over_parquet_images() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("F");
    features_cmd("synthetic:200:50:6", &f, &[]);
    let images = dir.path().join("img.parquet");
    run_ok(bin().args([
        "-q",
        "export",
        "--source",
        "synthetic:200:50:6",
        "--split",
        "test",
        "--out",
        images.to_str().unwrap(),
    ]));
    let (out, _) = run_ok(bin().args([
        "query", "--format", "csv", "--extractor", f.join("extractor").to_str().unwrap(),
        &format!("select label, extract_features(image)[1] as f0 from '{}' order by batch, \"row\" limit 2", images.display()),
    ]));
    // Same values as the cache's test split.
    let cached = read_part(&parts(&f.join("test"))[0]);
    let line = out.lines().nth(1).unwrap();
    let (label, f0) = line.split_once(',').unwrap();
    assert_eq!(label.parse::<u16>().unwrap(), cached[0].0, "{out}");
    let f0: f32 = f0.parse().unwrap();
    assert!(
        (f0 - cached[0].2[0]).abs() <= 1e-5 * cached[0].2[0].abs().max(1.0),
        "{f0} vs {}",
        cached[0].2[0]
    );
    fails(bin().args([
        "query",
        "select extract_features(label) from (select 1 as label)",
    ]));
}

/// A config with a small extractor, for the one-command tests.
fn small_config(dir: &Path) -> PathBuf {
    let p = dir.join("small.toml");
    std::fs::write(
        &p,
        "model = \"ridge\"\nbatch_size = 64\n[features]\natoms = 64\nsamples = 5000\nstats_images = 100\nfit_images = 300\n[ridge]\nrefit = 256\n",
    )
    .unwrap();
    p
}

#[test]
fn one_command_fits_the_extractor_streams_features_and_predicts_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let cfg = small_config(dir.path());
    let (out, err) = run_ok(train_run(&runs, "p").args([
        "--config",
        cfg.to_str().unwrap(),
        "--data",
        "synthetic:600:150:2",
        "--no-plots",
    ]));
    assert!(out.contains("test ("), "{out}\n{err}");
    assert!(runs.join("p/extractor/extractor.safetensors").is_file());
    // predict on other data applies the run's own extractor.
    let (out, _) = run_ok(bin().args([
        "-q",
        "predict",
        "--run",
        "p",
        "--runs",
        runs.to_str().unwrap(),
        "--data",
        "synthetic:100:80:3",
    ]));
    assert!(out.contains("accuracy"), "{out}");
    let q = query_csv(
        &runs,
        "select sum(images) as n from eval_metrics where run = 'p' and split = 'test'",
    );
    assert!(q.contains("80"), "{q}");
    // Resume of the finished run with more epochs reuses the saved extractor.
    let (out, _) = run_ok(resume_run(&runs, "p").args(["--epochs", "2"]));
    assert!(out.contains("resumed from"), "{out}");
}

/// `predict --run R --runs RUNS --data D [extra]`, then the run's test predictions as
/// "batch,row,predicted,p_max" lines.
fn predictions(runs: &Path, run: &str, data: &str, extra: &[&str]) -> String {
    let (out, _) = run_ok(
        bin()
            .args([
                "-q",
                "predict",
                "--run",
                run,
                "--runs",
                runs.to_str().unwrap(),
            ])
            .args(["--data", data])
            .args(extra),
    );
    assert!(out.contains("accuracy"), "{out}");
    query_csv(
        runs,
        &format!(
            "select batch, \"row\", predicted, p_max from predictions \
             where run = '{run}' and split = 'test' order by batch, \"row\""
        ),
    )
}

#[test]
fn flip_test_averages_each_image_with_its_mirror() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let r = runs.to_str().unwrap();
    // Pixels: the mirrored images change the scores.
    run_ok(train_run(&runs, "px").args([
        "--model",
        "logreg",
        "--data",
        "synthetic:400:100:6",
        "--no-plots",
        "--flip-test",
    ]));
    let data = "synthetic:50:100:6";
    let plain = predictions(&runs, "px", data, &["--no-flip-test"]);
    let flipped = predictions(&runs, "px", data, &["--flip-test"]);
    assert_eq!(plain.lines().count(), 101, "{plain}");
    assert_ne!(plain, flipped);
    // By default a run is scored as it was trained: this one with --flip-test.
    assert_eq!(predictions(&runs, "px", data, &[]), flipped);
    // The averaging itself: a "mirror" that is the image gives the plain scores exactly.
    let sql = dir.path().join("same.sql");
    std::fs::write(
        &sql,
        "SELECT batch, \"row\", label, image, \
         normalize(image, 0.4914, 0.4822, 0.4465, 0.2470, 0.2435, 0.2616) AS features, \
         normalize(image, 0.4914, 0.4822, 0.4465, 0.2470, 0.2435, 0.2616) AS features_flipped \
         FROM stream",
    )
    .unwrap();
    let same = predictions(&runs, "px", data, &["--sql", sql.to_str().unwrap()]);
    assert_eq!(plain, same);

    // The flip-invariant patch extractor: the mirror's features are the image's, so flip
    // averaging changes nothing (a wrong flip, e.g. vertical, would).
    let cfg = small_config(dir.path());
    run_ok(train_run(&runs, "pa").args([
        "--config",
        cfg.to_str().unwrap(),
        "--data",
        "synthetic:400:100:6",
        "--no-plots",
    ]));
    // (Up to rounding: the mirror's products are summed in another order.)
    let plain = predictions(&runs, "pa", data, &[]);
    let flipped = predictions(&runs, "pa", data, &["--flip-test"]);
    assert_eq!(plain.lines().count(), flipped.lines().count());
    for (a, b) in plain.lines().zip(flipped.lines()).skip(1) {
        let (a, b): (Vec<&str>, Vec<&str>) = (a.split(',').collect(), b.split(',').collect());
        assert_eq!(a[..3], b[..3], "{a:?} {b:?}");
        let (pa, pb): (f64, f64) = (a[3].parse().unwrap(), b[3].parse().unwrap());
        assert!((pa - pb).abs() < 1e-4, "{a:?} {b:?}");
    }

    // A features: cache has no mirrored test features: refused before training.
    let f = dir.path().join("F");
    features_cmd("synthetic:100:20:7", &f, &[]);
    let e = fails(
        bin()
            .args([
                "train",
                "--source",
                &format!("features:{}", f.display()),
                "--flip-test",
            ])
            .args(["--runs", r, "--run", "c"]),
    );
    assert!(e.contains("--flip-test needs images"), "{e}");
    assert!(!runs.join("c").exists());
}

#[test]
fn bad_input_is_a_clear_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let fail = |args: &[&str]| fails(bin().args(args));
    // A missing extractor folder.
    let e = fail(&[
        "train",
        "--extractor",
        "/nonexistent/ex",
        "--data",
        "synthetic:50:10",
        "--runs",
        runs.to_str().unwrap(),
    ]);
    assert!(
        e.contains("/nonexistent/ex") && e.contains("extractor"),
        "{e}"
    );
    // A torn extractor: the two files from different saves.
    let f = dir.path().join("F");
    features_cmd("synthetic:200:40:7", &f, &[]);
    let json = f.join("extractor/extractor.json");
    let text = std::fs::read_to_string(&json).unwrap();
    let torn = dir.path().join("torn");
    std::fs::create_dir(&torn).unwrap();
    std::fs::copy(
        f.join("extractor/extractor.safetensors"),
        torn.join("extractor.safetensors"),
    )
    .unwrap();
    let stamp = text.find("\"stamp\"").unwrap();
    let mut t = text.clone();
    t.replace_range(stamp..stamp + 12, "\"stamp\": \"x");
    std::fs::write(torn.join("extractor.json"), t).unwrap();
    let e = fail(&[
        "train",
        "--extractor",
        torn.to_str().unwrap(),
        "--data",
        "synthetic:50:10",
        "--runs",
        runs.to_str().unwrap(),
    ]);
    assert!(
        e.contains("extractor.json") || e.contains("extractor.safetensors"),
        "{e}"
    );
    // `predict --run r` from the features cache `cache`, which must fail; its stderr.
    let predict_r = |cache: &Path| {
        let source = format!("features:{}", cache.display());
        let runs = runs.to_str().unwrap();
        fail(&["predict", "--run", "r", "--runs", runs, "--source", &source])
    };
    // A features folder without a test split.
    let g = dir.path().join("G");
    std::fs::create_dir_all(g.join("train")).unwrap();
    std::fs::write(
        g.join("cache.json"),
        std::fs::read_to_string(f.join("cache.json"))
            .unwrap()
            .replace("\"test\"", "\"nope\""),
    )
    .unwrap();
    run_ok(train_run(&runs, "r").args([
        "--source",
        &format!("features:{}", f.display()),
        "--model",
        "ridge",
        "--no-plots",
    ]));
    let e = predict_r(&g);
    assert!(
        e.contains("no complete test split") && e.contains(g.to_str().unwrap()),
        "{e}"
    );
    // Features whose width does not match the checkpoint.
    let h = dir.path().join("H");
    run_ok(small_features("synthetic:200:40:7", &h).args(["--set", "atoms=16"]));
    let e = predict_r(&h);
    assert!(e.contains("features per row but the model expects"), "{e}");
    // Not a cache at all.
    let e = fail(&[
        "train",
        "--source",
        &format!("features:{}", dir.path().display()),
        "--runs",
        runs.to_str().unwrap(),
    ]);
    assert!(e.contains("not a feature cache"), "{e}");
}

/// The default pipeline on real CIFAR-10 (5,000 training images, 500 test): at least 70%.
#[test]
fn patches_reach_seventy_percent_on_real_cifar10() {
    let Some(mini) = common::mini() else { return };
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/patches.toml");
    run_ok(train_run(&runs, "best").args([
        "--config",
        cfg.to_str().unwrap(),
        "--data",
        mini.to_str().unwrap(),
        "--no-plots",
    ]));
    let acc: f64 = query_value(
        &runs,
        "select sum(acc * images) / sum(images) as a from eval_metrics where split = 'test'",
    );
    assert!(acc >= 0.70, "test accuracy {acc}");
}
