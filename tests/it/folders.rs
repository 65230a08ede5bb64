//! Data of other shapes than CIFAR-10's files: image folders (JPEG and PNG, grey, RGBA,
//! palette, odd sizes; 3, 12 and 1,000 classes), CIFAR-100's binary and Python files, every
//! model with 3 and 100 classes, and the bad input of each. The folders and files are
//! written by the test-only script `tests/ref/datasets.py` (Pillow, numpy), which also
//! checks the decoded images against Pillow's.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{bin, fails, have_python, on_data, query_csv, query_value, run_ok};

fn script(args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ref/datasets.py"))
        .args(args)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "datasets.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An image folder of `classes` classes under a new temporary folder.
fn folder(tmp: &Path, name: &str, classes: usize, per_class: usize, test: usize) -> PathBuf {
    let dir = tmp.join(name);
    script(&[
        "folder",
        dir.to_str().unwrap(),
        &classes.to_string(),
        &per_class.to_string(),
        &test.to_string(),
        "1",
    ]);
    dir
}

/// A new temporary folder for a test that needs python3 with `modules` (for `what`), or
/// `None` where it has not (the test is skipped; under CI, a panic).
fn scratch(modules: &str, what: &str) -> Option<tempfile::TempDir> {
    have_python(modules, what).then(|| tempfile::tempdir().unwrap())
}

/// The `config.toml` of `run`.
fn run_config(runs: &Path, run: &str) -> String {
    std::fs::read_to_string(runs.join(run).join("config.toml")).unwrap()
}

/// `train --data DATA --runs RUNS --run RUN --model MODEL --no-plots EXTRA`, asserting success.
fn train(data: &Path, runs: &Path, run: &str, model: &str, extra: &[&str]) -> (String, String) {
    run_ok(
        on_data(&["train"], data, runs)
            .args(["--run", run, "--model", model, "--no-plots"])
            .args(extra),
    )
}

fn test_accuracy(runs: &Path, run: &str) -> f64 {
    query_value(
        runs,
        &format!(
            "select sum(acc * images) / sum(images) from eval_metrics \
             where run = '{run}' and split = 'test'"
        ),
    )
}

#[test]
fn an_image_folder_gives_pillows_pixels_its_classes_and_a_test_split() {
    let Some(tmp) = scratch("PIL, numpy, pyarrow", "image folders") else {
        return;
    };
    let data = folder(tmp.path(), "f3", 3, 24, 6);
    // Exported images against Pillow: PNGs exactly, JPEGs within rounding.
    let parquet = tmp.path().join("f3.parquet");
    run_ok(
        bin()
            .args(["-q", "export", "--source"])
            .arg(&data)
            .arg("--out")
            .arg(&parquet),
    );
    let report = script(&["compare", data.to_str().unwrap(), parquet.to_str().unwrap()]);
    assert!(report.contains("exact"), "{report}");
    let runs = tmp.path().join("runs");
    let (stdout, _) = train(&data, &runs, "lr", "logreg", &["--epochs", "5"]);
    assert!(stdout.contains("test (epoch-5): 18 images"), "{stdout}");
    let config = run_config(&runs, "lr");
    assert!(
        config.contains("\"c00\"") && config.contains("\"c02\""),
        "{config}"
    );
    assert!(config.contains("classes = 3"), "{config}");
    // Learnable colours: far above chance (1/3).
    assert!(test_accuracy(&runs, "lr") > 0.8);
    let labels = query_csv(
        &runs,
        "select max(label) as a, max(predicted) as p, count(*) as n from predictions where split = 'test'",
    );
    assert_eq!(labels.lines().nth(1).unwrap(), "2,2,18");
    // predict prints the confusion matrix with the run's class names.
    let (out, _) = run_ok(&mut on_data(&["predict", "--run", "lr"], &data, &runs));
    assert!(out.contains("c01"), "{out}");
}

#[test]
fn twelve_classes_of_odd_sizes_and_bad_files_are_read_and_named() {
    let Some(tmp) = scratch("PIL, numpy", "image folders") else {
        return;
    };
    let data = folder(tmp.path(), "f12", 12, 9, 0);
    let runs = tmp.path().join("runs");
    let (stdout, _) = train(&data, &runs, "mlp", "mlp", &["--epochs", "2"]);
    assert!(stdout.contains("epoch 2: 108 images"), "{stdout}");
    assert!(stdout.contains("test: none"), "{stdout}");
    assert!(run_config(&runs, "mlp").contains("classes = 12"));

    // Files that are not images, truncated or empty: rejected by name, the rest learnt.
    let bad = tmp.path().join("bad");
    script(&["bad", bad.to_str().unwrap()]);
    let (stdout, stderr) = train(&bad, &runs, "bad", "logreg", &[]);
    assert!(
        stdout.contains("18 images") && stdout.contains("3 rejected"),
        "{stdout}"
    );
    for name in ["notes.jpg", "cut.png", "empty.png"] {
        assert!(stderr.contains(name), "{name}: {stderr}");
    }
    assert!(stderr.contains("0 bytes"), "{stderr}");
}

#[test]
fn bad_folders_are_errors_naming_the_folder() {
    let Some(tmp) = scratch("PIL, numpy", "image folders") else {
        return;
    };
    let runs = tmp.path().join("runs");
    // No class subfolders.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(empty.join("train")).unwrap();
    let e = fails(&mut on_data(&["train"], &empty, &runs));
    assert!(
        e.contains("no class subfolders") || e.contains("no dataset"),
        "{e}"
    );
    // An empty class.
    let data = folder(tmp.path(), "f3", 3, 3, 1);
    std::fs::create_dir_all(data.join("train/c03")).unwrap();
    let e = fails(&mut on_data(&["train"], &data, &runs));
    assert!(e.contains("c03") && e.contains("no image file"), "{e}");
    std::fs::remove_dir(data.join("train/c03")).unwrap();
    // A test class the training split does not have.
    std::fs::create_dir_all(data.join("test/zebra")).unwrap();
    std::fs::copy(
        data.join("test/c00/0000.png"),
        data.join("test/zebra/0.png"),
    )
    .unwrap();
    let e = fails(&mut on_data(&["train", "--model", "logreg"], &data, &runs));
    assert!(e.contains("zebra") && e.contains("not a class"), "{e}");
    std::fs::remove_dir_all(data.join("test/zebra")).unwrap();
    // More classes than the checkpoint was trained with.
    train(&data, &runs, "three", "logreg", &[]);
    let twelve = folder(tmp.path(), "f12", 12, 2, 1);
    let e = fails(&mut on_data(&["predict", "--run", "three"], &twelve, &runs));
    assert!(
        e.contains("12 classes") && e.contains("trained with 3"),
        "{e}"
    );
}

#[test]
fn cifar100_binary_and_pickle_files_give_a_hundred_named_classes() {
    let Some(tmp) = scratch("PIL, numpy", "CIFAR-100 files") else {
        return;
    };
    let data = tmp.path().join("c100");
    script(&["cifar100", data.to_str().unwrap(), "4", "1", "3"]);
    let runs = tmp.path().join("runs");
    let bin_dir = data.join("cifar-100-binary");
    let py_dir = data.join("cifar-100-python");
    let (a, _) = train(&bin_dir, &runs, "b", "logreg", &["--epochs", "3"]);
    let (b, _) = train(&py_dir, &runs, "p", "logreg", &["--epochs", "3"]);
    for (out, run) in [(a, "b"), (b, "p")] {
        assert!(out.contains("test (epoch-3): 100 images"), "{out}");
        let config = run_config(&runs, run);
        assert!(config.contains("\"fine99\"") && config.contains("classes = 100"));
    }
    // The same images either way: the same predictions.
    let same = query_csv(
        &runs,
        "select count(*) from predictions b join predictions p on b.batch = p.batch and \
         b.row = p.row and b.split = p.split where b.run = 'b' and p.run = 'p' and \
         b.split = 'test' and b.predicted = p.predicted and b.label = p.label",
    );
    assert_eq!(same.lines().nth(1).unwrap(), "100");
}

/// Every model learns 3 and 100 classes: its probabilities have that many columns (the
/// metrics accept them) and it does better than chance on learnable data.
#[test]
fn every_model_learns_three_and_a_hundred_classes() {
    let Some(tmp) = scratch("PIL, numpy", "image folders") else {
        return;
    };
    let three = folder(tmp.path(), "f3", 3, 30, 10);
    let c100 = tmp.path().join("c100");
    script(&["cifar100", c100.to_str().unwrap(), "6", "2", "5"]);
    let c100 = c100.join("cifar-100-binary");
    let runs = tmp.path().join("runs");
    let cnn = ["--set", "widths=[8,8,8]", "--set", "batch_size=32"];
    for (model, extra) in [
        ("logreg", &[][..]),
        ("svm", &[][..]),
        ("mlp", &[][..]),
        ("kmeans", &["--k", "200"][..]),
        ("svm-kernel", &[][..]),
        ("ridge", &["--set", "kernel=\"linear\""][..]),
        ("cnn", &cnn[..]),
    ] {
        for (data, k) in [(&three, 3usize), (&c100, 100)] {
            let run = format!("{model}-{k}");
            // The CNN learns from few images more slowly: more passes.
            let mut args = vec!["--epochs", if model == "cnn" { "10" } else { "3" }];
            args.extend_from_slice(extra);
            train(data, &runs, &run, model, &args);
            let acc = test_accuracy(&runs, &run);
            let chance = 1.0 / k as f64;
            assert!(
                acc > 2.0 * chance,
                "{model} with {k} classes: test accuracy {acc}"
            );
            let n = query_csv(
                &runs,
                &format!("select max(predicted) from predictions where run = '{run}'"),
            );
            let max: usize = n.lines().nth(1).unwrap().parse().unwrap();
            assert!(max < k, "{run}: predicted {max}");
        }
    }
}

#[test]
fn a_thousand_classes_are_learnt_and_one_more_is_refused() {
    let Some(tmp) = scratch("PIL, numpy", "image folders") else {
        return;
    };
    let data = folder(tmp.path(), "f1000", 1000, 2, 1);
    let runs = tmp.path().join("runs");
    let (stdout, _) = train(&data, &runs, "k1000", "logreg", &["--epochs", "4"]);
    assert!(stdout.contains("2000 images"), "{stdout}");
    assert!(run_config(&runs, "k1000").contains("classes = 1000"));
    // Labels above a byte's range reach the model, the metrics and the tables.
    let csv = query_csv(
        &runs,
        "select max(label), max(predicted), count(*), \
         sum(case when label = predicted then 1 else 0 end) from predictions \
         where run = 'k1000' and split = 'test'",
    );
    let row: Vec<usize> = csv
        .lines()
        .nth(1)
        .unwrap()
        .split(',')
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(row[0], 999, "{csv}");
    assert!(row[1] > 255 && row[1] < 1000, "{csv}");
    assert_eq!(row[2], 1000, "{csv}");
    // Chance is 1 in 1,000.
    assert!(
        row[3] > 20,
        "1,000 classes: {} of 1,000 test images right",
        row[3]
    );

    // One class more than the limit: an error naming the folder and the count.
    std::fs::create_dir_all(data.join("train/zz")).unwrap();
    std::fs::copy(data.join("train/c00/0000.png"), data.join("train/zz/0.png")).unwrap();
    let e = fails(&mut on_data(&["train", "--model", "logreg"], &data, &runs));
    assert!(
        e.contains("1001 class folders") && e.contains("at most 1000"),
        "{e}"
    );
}

#[test]
fn a_features_cache_records_the_folders_classes() {
    let Some(tmp) = scratch("PIL, numpy", "image folders") else {
        return;
    };
    let data = folder(tmp.path(), "f3", 3, 20, 5);
    let f = tmp.path().join("F");
    run_ok(
        bin()
            .args(["-q", "features", "--data", data.to_str().unwrap(), "--out"])
            .arg(&f)
            .args(common::SMALL_EXTRACTOR),
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.join("cache.json")).unwrap()).unwrap();
    assert_eq!(
        manifest["classes"],
        serde_json::json!(["c00", "c01", "c02"]),
        "{manifest}"
    );
    // Training from the cache takes its classes without --classes.
    let runs = tmp.path().join("runs");
    let source = format!("features:{}", f.display());
    run_ok(
        bin()
            .args(["-q", "train", "--source", &source, "--model", "logreg"])
            .args(["--runs", runs.to_str().unwrap(), "--run", "r", "--no-plots"]),
    );
    let config = run_config(&runs, "r");
    assert!(config.contains("\"c00\""), "{config}");
    let e = fails(
        bin()
            .args(["train", "--source", &source, "--classes", "5"])
            .args(["--runs", runs.to_str().unwrap()]),
    );
    assert!(
        e.contains("--classes gives 5 classes") && e.contains("features cache"),
        "{e}"
    );
}

/// `--image-size`: a folder of 64×64 photos (and others) decoded at 64×64, Pillow's pixels
/// where no resize happens; every path (export, train with pixels, with patch features and
/// the CNN, predict, a features cache, a TCP stream in ndjson and arrow) at that side;
/// CIFAR-sized images upscaled exactly as the SQL `resize` does; and each mismatch a clear
/// error.
#[test]
fn an_image_size_carries_images_of_that_side_through_every_stage() {
    let Some(tmp) = scratch("PIL, numpy, pyarrow", "image folders") else {
        return;
    };
    let dir = tmp.path().join("f64");
    script(&[
        "folder",
        dir.to_str().unwrap(),
        "3",
        "24",
        "6",
        "1",
        "64x64,17x23,80x96",
    ]);
    let data = dir.to_str().unwrap();
    // Export at 64: the 64×64 PNGs exactly as Pillow reads them, JPEGs within rounding.
    let parquet = tmp.path().join("f64.parquet");
    run_ok(
        bin()
            .args([
                "-q",
                "export",
                "--source",
                data,
                "--image-size",
                "64",
                "--out",
            ])
            .arg(&parquet),
    );
    let rows = common::read_parquet(&parquet);
    assert_eq!(rows.len(), 72);
    assert!(rows.iter().all(|r| r.3.len() == 3 * 64 * 64));
    let report = script(&["compare", data, parquet.to_str().unwrap(), "64"]);
    assert!(report.contains("exact"), "{report}");

    // Train on pixels at 64: the run records its side and predict uses it.
    let runs = tmp.path().join("runs");
    let (stdout, _) = train(
        &dir,
        &runs,
        "lr",
        "logreg",
        &["--epochs", "5", "--image-size", "64"],
    );
    assert!(stdout.contains("test (epoch-5): 18 images"), "{stdout}");
    let config = run_config(&runs, "lr");
    assert!(config.contains("image_size = 64"), "{config}");
    assert!(test_accuracy(&runs, "lr") > 0.8);
    let (out, _) = run_ok(&mut on_data(&["predict", "--run", "lr"], data, &runs));
    assert!(out.contains("c01"), "{out}");
    let e = fails(on_data(&["predict", "--run", "lr"], data, &runs).args(["--image-size", "32"]));
    assert!(e.contains("64x64") && e.contains("--image-size 32"), "{e}");

    // Patch features fitted at 64 (the extractor records its side), through a cache too.
    let cfg = tmp.path().join("p.toml");
    std::fs::write(
        &cfg,
        "model = \"ridge\"\n[features]\natoms = 32\nfit_images = 60\nsamples = 4000\n\
         stats_images = 50\n[ridge]\n",
    )
    .unwrap();
    let (stdout, _) = run_ok(
        on_data(&["train", "--config", cfg.to_str().unwrap()], data, &runs).args([
            "--image-size",
            "64",
            "--run",
            "pf",
            "--no-plots",
        ]),
    );
    assert!(stdout.contains("test (epoch-1): 18 images"), "{stdout}");
    let ex = std::fs::read_to_string(runs.join("pf/extractor/extractor.json")).unwrap();
    assert!(ex.contains("\"side\": 64"), "{ex}");
    assert!(test_accuracy(&runs, "pf") > 0.8);
    let f = tmp.path().join("F");
    let features = |extra: &[&str]| {
        let mut c = bin();
        c.args(["-q", "features", "--data", data, "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(&f)
            .args(extra);
        c
    };
    run_ok(&mut features(&["--image-size", "64"]));
    // A resumed cache job keeps its extractor's side; another side is refused.
    run_ok(&mut features(&[]));
    let e = fails(&mut features(&["--image-size", "32"]));
    assert!(e.contains("holds features of images of 64x64"), "{e}");
    assert_eq!(
        std::fs::read_to_string(f.join("image-size"))
            .unwrap()
            .trim(),
        "64"
    );
    // A side is the run's, not an extractor's or a network's parameter.
    let e = fails(
        bin()
            .args(["features", "--data", data, "--set", "side=64", "--out"])
            .arg(tmp.path().join("F2")),
    );
    assert!(e.contains("`side` is the run's image size"), "{e}");

    // Over TCP: ndjson and arrow carry 64×64; spark-json (the original's) is 32×32 only.
    let e = fails(bin().args(["stream", "--data", data, "--image-size", "64"]));
    assert!(
        e.contains("spark-json") && e.contains("ndjson or arrow"),
        "{e}"
    );
    for format in ["ndjson", "arrow"] {
        let mut server = common::start_ours(
            &dir,
            &[
                "--image-size",
                "64",
                "--format",
                format,
                "--batch-size",
                "16",
            ],
        );
        let out = tmp.path().join(format!("tcp-{format}.parquet"));
        run_ok(
            bin()
                .args(["-q", "export", "--image-size", "64", "--source"])
                .arg(format!("tcp://127.0.0.1:{}", server.port))
                .arg("--out")
                .arg(&out),
        );
        let _ = server.child.wait();
        let got = common::read_parquet(&out);
        assert_eq!(got.len(), 72, "{format}");
        for (a, b) in got.iter().zip(&rows) {
            assert_eq!((a.2, &a.3), (b.2, &b.3), "{format}");
        }
        // A reader expecting 32×32 rejects each image, naming the sides.
        let mut server = common::start_ours(
            &dir,
            &[
                "--image-size",
                "64",
                "--format",
                format,
                "--batch-size",
                "16",
            ],
        );
        let (_, stderr) = run_ok(
            bin()
                .args(["export", "--source"])
                .arg(format!("tcp://127.0.0.1:{}", server.port))
                .arg("--out")
                .arg(tmp.path().join(format!("bad-{format}"))),
        );
        let _ = server.child.wait();
        assert!(
            stderr.contains("rejected") && stderr.contains("--image-size"),
            "{format}: {stderr}"
        );
    }
    // The CNN at 64×64: the network's input side is the run's, and so is its ONNX export's.
    let (stdout, _) = train(
        &dir,
        &runs,
        "cnn",
        "cnn",
        &[
            "--image-size",
            "64",
            "--epochs",
            "8",
            "--set",
            "widths=[8,16,16]",
        ],
    );
    assert!(stdout.contains("test (epoch-8): 18 images"), "{stdout}");
    let config = run_config(&runs, "cnn");
    assert!(config.contains("side = 64"), "{config}");
    assert!(test_accuracy(&runs, "cnn") > 0.6);
    let onnx = tmp.path().join("cnn.onnx");
    let (out, _) = run_ok(
        bin()
            .args(["export-model", "--run", "cnn", "--out"])
            .arg(&onnx)
            .arg("--runs")
            .arg(&runs),
    );
    assert!(out.contains("[N, 3, 64, 64]"), "{out}");

    // Features of the 64×64 CNN for another model: the run takes the extractor's side.
    let (stdout, _) = train(
        &dir,
        &runs,
        "on-cnn",
        "logreg",
        &["--extractor", "run:cnn", "--epochs", "3"],
    );
    assert!(stdout.contains("18 images"), "{stdout}");
    let config = run_config(&runs, "on-cnn");
    assert!(config.contains("image_size = 64"), "{config}");
    let e = fails(on_data(&["train"], data, &runs).args(["--model", "cnn", "--set", "side=64"]));
    assert!(e.contains("--image-size"), "{e}");
    // A network that fits its side though not 32×32 (five blocks at 128×128).
    run_ok(
        on_data(&["-q", "train"], "synthetic:16:0:1", &runs)
            .args(["--image-size", "128"])
            .args(["--model", "cnn", "--set", "widths=[4,4,4,4,4]", "--no-test"])
            .args(["--no-plots", "--run", "deep"]),
    );
    // Batches larger than the default line cap (64 MiB: 100 images of 512×512 are 79 MB
    // as one Arrow message over loopback).
    let (stdout, _) = run_ok(
        on_data(&["train"], "synthetic:100:0:1", &runs)
            .args([
                "--image-size",
                "512",
                "--batch-size",
                "100",
                "--model",
                "logreg",
            ])
            .args(["--no-test", "--no-plots", "--run", "big"]),
    );
    assert!(stdout.contains("100 images"), "{stdout}");
    // Resized images are checked against the memory limit before they are made.
    let e = fails(
        bin()
            .args([
                "--memory-limit",
                "200M",
                "export",
                "--source",
                "synthetic:1000:0",
            ])
            .args(["--image-size", "512", "--out"])
            .arg(tmp.path().join("huge")),
    );
    assert!(e.contains("1000 images of 512x512"), "{e}");
    // Publishing 64×64 images in spark-json is refused before any broker is reached.
    let e = fails(
        bin()
            .args(["export", "--source", data, "--image-size", "64"])
            .args(["--to", "kafka://127.0.0.1:9/t", "--connect-timeout", "1"]),
    );
    assert!(e.contains("--to-format ndjson or arrow"), "{e}");

    // CIFAR-sized images at --image-size 48: the SQL `resize` kernel's bytes.
    let up = tmp.path().join("up.parquet");
    run_ok(
        bin()
            .args([
                "-q",
                "export",
                "--source",
                "synthetic:40:0:3",
                "--image-size",
                "48",
            ])
            .arg("--out")
            .arg(&up),
    );
    let csv = common::query_csv(
        &runs,
        &format!(
            "select count(*) from '{}' a join (select batch, \"row\", resize(image, 48, 48) as r \
             from '{}') b on a.batch = b.batch and a.\"row\" = b.\"row\" where a.image = b.r",
            up.display(),
            {
                let p = tmp.path().join("s32.parquet");
                run_ok(
                    bin()
                        .args(["-q", "export", "--source", "synthetic:40:0:3", "--out"])
                        .arg(&p),
                );
                p.display().to_string()
            }
        ),
    );
    assert_eq!(csv.lines().nth(1), Some("40"), "{csv}");
    let e = fails(
        bin()
            .args([
                "export",
                "--source",
                "synthetic",
                "--image-size",
                "2",
                "--out",
            ])
            .arg(tmp.path().join("x")),
    );
    assert!(e.contains("image size 2"), "{e}");
}

/// A PNG of `w`×`h` in one colour, written row by row (12000x12000 is a few hundred KB).
fn one_colour_png(path: &Path, w: u32, h: u32, rgb: [u8; 3]) {
    use std::io::Write;
    let file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut e = png::Encoder::new(file, w, h);
    e.set_color(png::ColorType::Rgb);
    e.set_compression(png::Compression::Fast);
    let mut writer = e.write_header().unwrap();
    let mut stream = writer.stream_writer().unwrap();
    let row: Vec<u8> = (0..w).flat_map(|_| rgb).collect();
    for _ in 0..h {
        stream.write_all(&row).unwrap();
    }
    stream.finish().unwrap();
    writer.finish().unwrap();
}

/// Runs `cmd` and returns (success, stdout, stderr, its peak resident memory in MiB when
/// python3 can measure it: `ru_maxrss` of the child).
fn run_measured(cmd: &Command) -> (bool, String, String, Option<f64>) {
    let measure = "import resource, subprocess, sys\n\
                   r = subprocess.run(sys.argv[1:])\n\
                   print('peak-kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, \
                   file=sys.stderr)\n\
                   sys.exit(r.returncode)";
    let out = Command::new("python3")
        .args(["-c", measure])
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .output();
    let out = match out {
        Ok(out) => out,
        Err(_) => {
            let out = Command::new(cmd.get_program())
                .args(cmd.get_args())
                .output()
                .unwrap();
            return (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
                None,
            );
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let peak = stderr
        .lines()
        .find_map(|l| l.strip_prefix("peak-kib "))
        .and_then(|k| k.trim().parse::<f64>().ok())
        .map(|k| k / 1024.0);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
        peak,
    )
}

#[test]
fn oversized_images_are_refused_before_decoding_and_the_rest_are_used() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("big");
    for (class, base) in [("a", 20u8), ("b", 150)] {
        let dir = data.join("train").join(class);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..4u8 {
            one_colour_png(
                &dir.join(format!("small-{i}.png")),
                16,
                16,
                [base + i, 9, 99],
            );
        }
    }
    let (a, b) = (data.join("train/a"), data.join("train/b"));
    // Three 12000x12000 PNGs (the review's case), a JPEG header of 16384x16384, and a
    // 5000x5000 PNG that fits the pixel cap but not half of 300 MiB.
    one_colour_png(&a.join("big-1.png"), 12000, 12000, [200, 30, 30]);
    std::fs::copy(a.join("big-1.png"), a.join("big-2.png")).unwrap();
    std::fs::copy(a.join("big-1.png"), b.join("big-3.png")).unwrap();
    let mut jpeg = include_bytes!("../ref/images/baseline.jpg").to_vec();
    let sof = jpeg.windows(2).position(|m| m == [0xff, 0xc0]).unwrap();
    jpeg[sof + 5..sof + 9].copy_from_slice(&[0x40, 0, 0x40, 0]);
    std::fs::write(a.join("huge.jpg"), jpeg).unwrap();
    one_colour_png(&b.join("mid.png"), 5000, 5000, [1, 2, 3]);

    let export = |limit: Option<&str>, out: &Path| {
        let mut cmd = bin();
        if let Some(limit) = limit {
            cmd.args(["--memory-limit", limit]);
        }
        cmd.args(["export", "--source"])
            .arg(&data)
            .arg("--out")
            .arg(out);
        let (ok, stdout, stderr, peak) = run_measured(&cmd);
        assert!(ok, "{cmd:?} failed:\n{stdout}\n{stderr}");
        (stdout, stderr, peak)
    };
    let out = tmp.path().join("limited.parquet");
    let (stdout, stderr, peak) = export(Some("300M"), &out);
    assert_eq!(common::parquet_rows(&out), 8, "{stdout}\n{stderr}");
    assert!(stderr.contains("; 5 rejected"), "{stderr}");
    for name in ["big-1.png", "big-2.png", "big-3.png"] {
        let line = stderr
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("{name} is not named: {stderr}"));
        assert!(
            line.contains("PNG header declares 12000x12000 pixels")
                && line.contains("8192x8192")
                && line.contains("refused before decoding"),
            "{line}"
        );
    }
    let line = stderr.lines().find(|l| l.contains("huge.jpg")).unwrap();
    assert!(
        line.contains("JPEG header declares 16384x16384 pixels"),
        "{line}"
    );
    let line = stderr.lines().find(|l| l.contains("mid.png")).unwrap();
    assert!(
        line.contains("PNG header declares 5000x5000 pixels: decoding it needs about")
            && line.contains("150.0 MiB")
            && line.contains("300.0 MiB (--memory-limit)"),
        "{line}"
    );
    // Nothing big was decoded: the whole command stayed well within the limit (decoding
    // one 12000x12000 image alone takes over 1 GiB).
    if let Some(peak) = peak {
        println!("export under --memory-limit 300M: peak {peak:.0} MiB");
        assert!(peak < 300.0, "peak {peak:.0} MiB");
    }
    // Without the limit the 5000x5000 image fits and is used; the others stay refused.
    let out = tmp.path().join("all.parquet");
    let (stdout, stderr, _) = export(None, &out);
    assert_eq!(common::parquet_rows(&out), 9, "{stdout}\n{stderr}");
    assert!(stderr.contains("; 4 rejected"), "{stderr}");
    assert!(!stderr.contains("mid.png"), "{stderr}");
}
