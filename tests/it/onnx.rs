//! `--extractor onnx:FILE`: a user's pretrained ONNX backbone. Small seeded CNNs are built
//! by a test-only script (`tests/ref/onnx_reference.py`, `onnx` + numpy), and cifar-df's
//! features (tract, our resize and normalisation, global pooling) are compared with
//! onnxruntime's (its own `Resize` and the same model) to 1e-4. Then the CLI: the cache,
//! flipped copies, training and predicting with the run's own ONNX extractor, and bad input.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use cifar_df::dataset::synth::{self, SynthSpec};
use cifar_df::dataset::Split;
use cifar_df::features::{Extractor, OnnxParams};
use common::{bin, have_python, run_ok};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ref/onnx_reference.py")
}

/// Builds the test models in `dir`; returns the node names of `cnn.onnx`.
fn build_models(dir: &Path) -> Vec<String> {
    let (out, _) = run_ok(Command::new("python3").arg(script()).arg("build").arg(dir));
    out.lines().map(str::to_string).collect()
}

/// `n` images: the real CIFAR-10 test images when the sample is there, else synthetic.
fn images(n: usize) -> Vec<u8> {
    if let Some(mini) = common::mini() {
        let recs = common::raw_records(&mini, "test");
        return recs.into_iter().take(n).flat_map(|(_, p)| p).collect();
    }
    let spec = SynthSpec {
        train: n,
        test: 0,
        seed: 4,
    };
    synth::generate(&spec, Split::Train)
        .into_iter()
        .flat_map(|i| i.pixels)
        .collect()
}

/// onnxruntime's features of `pixels` for `model` with extra script flags.
fn reference(dir: &Path, model: &Path, pixels: &[u8], flags: &[&str]) -> Vec<f32> {
    let img = dir.join("images.u8");
    let out = dir.join("ref.f32");
    std::fs::write(&img, pixels).unwrap();
    run_ok(
        Command::new("python3")
            .arg(script())
            .arg("features")
            .arg(model)
            .arg(&img)
            .arg(&out)
            .args(flags),
    );
    std::fs::read(&out)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn assert_close(ours: &[f32], theirs: &[f32], what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths");
    let worst = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
        .fold(0.0f32, f32::max);
    println!(
        "{what}: {} values, worst relative difference {worst:.2e}",
        ours.len()
    );
    assert!(worst <= 1e-4, "{what}: worst difference {worst}");
    // The features are not all alike (a real comparison, not of constants).
    let spread = theirs.iter().cloned().fold(f32::MIN, f32::max)
        - theirs.iter().cloned().fold(f32::MAX, f32::min);
    assert!(spread > 1e-2, "{what}: spread {spread}");
}

#[test]
fn onnx_features_match_onnxruntime() {
    if !have_python("numpy, onnx, onnxruntime", "the ONNX reference") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let nodes = build_models(dir.path());
    assert!(nodes.contains(&"block_add".to_string()), "{nodes:?}");
    let cnn = dir.path().join("cnn.onnx");
    let spec = format!("onnx:{}", cnn.display());
    // 23 images: a symbolic batch of 16 runs twice, the second padded.
    let px = images(23);
    let cases: [(Option<&str>, &[&str], usize); 4] = [
        (None, &[], 10),                                  // the model's output, [N, 10]
        (Some("block_add"), &["--node", "block_add"], 8), // a node: [N, 8, 40, 40], pooled
        (Some("features"), &["--node", "features"], 16),  // a tensor's name: [N, 16, 10, 10]
        (Some("gap"), &["--node", "gap"], 16),            // [N, 16, 1, 1]
    ];
    for (node, flags, width) in cases {
        let params = OnnxParams {
            node: node.map(str::to_string),
            batch: 16,
            ..OnnxParams::default()
        };
        let e = cifar_df::run::extractor::open(&spec, params, Path::new("runs")).unwrap();
        assert_eq!(e.width(), width, "{node:?}");
        let ours = e.encode(&px).unwrap();
        assert_eq!(ours.dim(), (23, width));
        let theirs = reference(dir.path(), &cnn, &px, flags);
        assert_close(ours.as_slice().unwrap(), &theirs, &format!("cnn {node:?}"));
    }

    // Other normalisation, and a channels-last model with a fixed batch of 1 whose output
    // is a feature map (downsampling 32 → 24).
    let params = OnnxParams {
        mean: Some([0.5, 0.4, 0.3]),
        std: Some([0.2, 0.3, 0.4]),
        batch: 5,
        ..OnnxParams::default()
    };
    let e = cifar_df::run::extractor::open(&spec, params, Path::new("runs")).unwrap();
    let theirs = reference(
        dir.path(),
        &cnn,
        &px,
        &["--mean", "0.5,0.4,0.3", "--std", "0.2,0.3,0.4"],
    );
    assert_close(
        e.encode(&px).unwrap().as_slice().unwrap(),
        &theirs,
        "cnn, own mean/std",
    );
    let nhwc = dir.path().join("nhwc.onnx");
    let e = cifar_df::run::extractor::open(
        &format!("onnx:{}", nhwc.display()),
        OnnxParams::default(),
        Path::new("runs"),
    )
    .unwrap();
    let Extractor::Onnx(o) = &e else {
        panic!("not onnx")
    };
    assert!(o.input.channels_last);
    assert_eq!((o.input.batch, o.input.height, o.input.width), (1, 24, 24));
    let px = images(7);
    let theirs = reference(dir.path(), &nhwc, &px, &[]);
    assert_close(e.encode(&px).unwrap().as_slice().unwrap(), &theirs, "nhwc");

    // Saved and loaded back, the extractor gives the same features, bit for bit.
    let saved = dir.path().join("saved");
    e.save(&saved).unwrap();
    let back = Extractor::load(&saved).unwrap();
    assert_eq!(back.stamp(), e.stamp());
    assert_eq!(back.encode(&px).unwrap(), e.encode(&px).unwrap());
}

#[test]
fn onnx_extractor_caches_trains_and_predicts() {
    if !have_python("numpy, onnx, onnxruntime", "the ONNX reference") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    build_models(dir.path());
    let cnn = dir.path().join("cnn.onnx");
    let spec = format!("onnx:{}", cnn.display());
    let f = dir.path().join("F");
    let cache = || {
        run_ok(bin().args([
            "-q",
            "features",
            "--data",
            "synthetic:120:40:5",
            "--out",
            f.to_str().unwrap(),
            "--extractor",
            &spec,
            "--node",
            "features",
            "--flip",
            "--rows-per-part",
            "50",
        ]))
    };
    let (out, _) = cache();
    assert!(out.contains("160 images encoded"), "{out}");
    assert!(f.join("extractor/model.onnx").is_file());
    let json = std::fs::read_to_string(f.join("cache.json")).unwrap();
    assert!(
        json.contains("\"onnx\"") && json.contains("\"width\": 16"),
        "{json}"
    );
    // The flipped rows hold the features of the mirrored images.
    let q = run_ok(bin().args([
        "-q",
        "query",
        "--format",
        "csv",
        &format!(
            "select count(*) as n, sum(case when flipped then 1 else 0 end) as f from '{}'",
            f.join("train").display()
        ),
    ]))
    .0;
    assert!(q.contains("240,120"), "{q}");

    // Any model trains from the cache.
    let runs = dir.path().join("runs");
    let (out, err) = run_ok(bin().args([
        "-q",
        "train",
        "--source",
        &format!("features:{}", f.display()),
        "--model",
        "mlp",
        "--run",
        "m",
        "--runs",
        runs.to_str().unwrap(),
        "--no-plots",
    ]));
    assert!(out.contains("test ("), "{out}\n{err}");

    // A run re-run on the same cache with the same extractor keeps every part.
    let (out, _) = cache();
    assert!(out.contains("0 parts written"), "{out}");

    // One command: features in the streaming SQL, the model saved with the run's copy
    // of the ONNX model, and predict with it on other data.
    let (out, err) = run_ok(bin().args([
        "-q",
        "train",
        "--data",
        "synthetic:200:60:2",
        "--extractor",
        &spec,
        "--node",
        "gap",
        "--model",
        "logreg",
        "--run",
        "o",
        "--runs",
        runs.to_str().unwrap(),
        "--no-plots",
    ]));
    assert!(out.contains("test ("), "{out}\n{err}");
    assert!(runs.join("o/extractor/model.onnx").is_file());
    std::fs::remove_file(&cnn).unwrap(); // the run needs only its own copy
    let (out, _) = run_ok(bin().args([
        "-q",
        "predict",
        "--run",
        "o",
        "--runs",
        runs.to_str().unwrap(),
        "--data",
        "synthetic:50:30:3",
    ]));
    assert!(out.contains("accuracy"), "{out}");
}

#[test]
fn bad_onnx_input_is_a_clear_error_naming_the_file() {
    if !have_python("numpy, onnx, onnxruntime", "the ONNX reference") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    build_models(dir.path());
    let fail = |args: &[&str]| {
        let o = bin().args(args).output().unwrap();
        assert!(!o.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let features = |spec: &str, out: &Path, extra: &[&str]| {
        let mut a = vec![
            "-q",
            "features",
            "--data",
            "synthetic:40:10:1",
            "--extractor",
            spec,
            "--out",
            out.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let out = dir.path().join("out");
    let run = |args: Vec<String>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        fail(&refs)
    };

    // A file that is not ONNX.
    let junk = dir.path().join("junk.onnx");
    std::fs::write(&junk, b"\x08\x07garbage, not protobuf \xff\xff\xff").unwrap();
    let e = run(features(&format!("onnx:{}", junk.display()), &out, &[]));
    assert!(
        e.contains("junk.onnx") && e.contains("not an ONNX model"),
        "{e}"
    );
    // A file that is not there.
    let e = run(features("onnx:/nonexistent/m.onnx", &out, &[]));
    assert!(e.contains("/nonexistent/m.onnx"), "{e}");
    // A node that does not exist: the error lists the model's nodes.
    let cnn = format!("onnx:{}", dir.path().join("cnn.onnx").display());
    let e = run(features(&cnn, &out, &["--node", "no_such_node"]));
    assert!(
        e.contains("cnn.onnx") && e.contains("no_such_node") && e.contains("stem_conv"),
        "{e}"
    );
    // A model whose input is not an image.
    let vector = format!("onnx:{}", dir.path().join("vector.onnx").display());
    let e = run(features(&vector, &out, &[]));
    assert!(
        e.contains("vector.onnx") && e.contains("expected an image batch") && e.contains("[?, 10]"),
        "{e}"
    );
    // Bad parameters, --node without an ONNX extractor.
    let e = run(features(&cnn, &out, &["--set", "std=[0.2, 0.0, 0.2]"]));
    assert!(e.contains("std"), "{e}");
    let e = run(features(&cnn, &out, &["--set", "atoms=12"]));
    assert!(e.contains("atoms"), "{e}");
    let e = fail(&[
        "train",
        "--data",
        "synthetic:40:10",
        "--node",
        "gap",
        "--runs",
        dir.path().join("runs").to_str().unwrap(),
    ]);
    assert!(e.contains("--node goes with --extractor onnx:"), "{e}");
    assert!(!out.exists(), "a failed start wrote {}", out.display());

    // A cache of one ONNX extractor refuses another one, and keeps what it has.
    run_ok(
        bin().args(
            features(&cnn, &out, &["--node", "gap"])
                .iter()
                .map(String::as_str),
        ),
    );
    let before = std::fs::read(out.join("cache.json")).unwrap();
    let e = run(features(&cnn, &out, &["--node", "features"]));
    assert!(e.contains("another extractor"), "{e}");
    assert_eq!(std::fs::read(out.join("cache.json")).unwrap(), before);

    // A torn extractor folder: the model file swapped for another.
    let ex = out.join("extractor");
    std::fs::copy(dir.path().join("nhwc.onnx"), ex.join("model.onnx")).unwrap();
    let e = fail(&["query", "--extractor", ex.to_str().unwrap(), "select 1"]);
    assert!(
        e.contains("model.onnx") && e.contains("different saves"),
        "{e}"
    );
}
