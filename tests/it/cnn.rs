//! The CNN (`--model cnn`) against an independent float64 numpy reference
//! (`tests/ref/cnn_reference.py`): the logits, the gradient of every layer's parameters
//! (the reference checks its own against finite differences), the BatchNorm running
//! statistics, and two Nesterov SGD steps.

use crate::common;

use std::process::Command;

use common::{have_python, run_ok};
use ndarray::{Array1, Array2};

use cifar_df::model::cnn::net::{smoothed_ce, Tape};
use cifar_df::model::cnn::{Cnn, CnnParams, Kernel, Precision};
use cifar_df::model::Learner;
use cifar_df::rng::SplitMix;

fn images(n: usize, seed: u64, side: usize) -> (Array2<f32>, Array1<u16>) {
    let mut rng = SplitMix(seed);
    let plane = side * side;
    // Smooth images (a few low frequencies per channel) plus noise, so that pooling
    // windows have clear maxima and the whitening sees real correlations.
    let x = Array2::from_shape_fn((n, 3 * plane), |(_, j)| {
        let (c, p) = (j / plane, j % plane);
        let (yy, xx) = ((p / side) as f32, (p % side) as f32);
        ((yy * 0.3 + c as f32).sin() + (xx * 0.2).cos()) * 0.7 + rng.normal() as f32 * 0.5
    });
    let y = (0..n).map(|_| rng.below(10) as u16).collect();
    (x, y)
}

fn close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-3);
    let mut worst = 0.0f64;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (f64::from(*g) - w).abs() / scale;
        worst = worst.max(err);
        assert!(
            err <= tol,
            "{what}[{i}]: {g} vs {w} (relative to {scale}: {err:e})"
        );
    }
    eprintln!(
        "{what}: {} values, largest {scale:.3e}, worst relative error {worst:.1e}",
        got.len()
    );
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn forward_backward_and_sgd_match_numpy() {
    if !have_python("numpy", "the CNN reference") {
        return;
    }
    // CIFAR's 32×32, and images of other sides (`--image-size`): the final pool then
    // covers 2×2 (at 24 and 20) instead of 3×3. Larger images have so many pooling windows
    // that some hold near-ties (values at GELU's flat minimum, equal in f32), where f32 and
    // the f64 reference pick different maxima: a property of the input, not of the code.
    for side in [32, 24, 20] {
        eprintln!("side {side}:");
        against_numpy(side, &[4, 6, 8], Precision::F32, (1e-4, 1e-4));
    }
    // A final pool of 17×17 (two blocks at 68, as three blocks at 136): window positions
    // past 255, which a one-byte index wrapped, sending the gradient to the wrong pixel.
    eprintln!("side 68, two blocks:");
    against_numpy(68, &[4, 6], Precision::F32, (1e-4, 1e-4));
}

/// The same on the patch-matrix convolutions (the `gemm` crate), which CPUs without
/// AVX-512 use: here the implicit products are hidden (`CIFAR_DF_NO_FMA=1`).
#[test]
fn forward_backward_and_sgd_match_numpy_on_the_patch_matrix_path() {
    if !have_python("numpy", "the CNN reference") {
        return;
    }
    common::rerun_with_env(
        "cnn::forward_backward_and_sgd_match_numpy",
        cifar_df::model::cnn::fma::HIDE_ENV,
        "1",
    );
}

/// The network in bf16 (bf16 inputs to every convolution, f32 sums, f32 master weights)
/// against the same float64 reference: the logits, the running statistics and the
/// weights after two SGD steps within 6% of each tensor's largest value, the gradients
/// (and the biases after two steps, which start at zero) within 20%. A bf16 keeps 8 bits of mantissa (each rounding moves a value by up to 2^-9
/// of it), and on four images BatchNorm, which normalises over a few pixels, amplifies
/// each rounding on the way back (measured: logits 1.2%, gradients up to 15%, the
/// weights after two steps 5%). A wrong layout, sign or routing is off by the whole
/// value; and the bf16 network is not the f32 one (its products did round).
#[test]
fn the_bf16_network_matches_numpy_within_bf16_rounding() {
    if Kernel::best_bf16().is_none() {
        eprintln!("the bf16 network: not run: this CPU has no bf16 kernel (AVX512-BF16)");
        return;
    }
    if !have_python("numpy", "the CNN reference") {
        return;
    }
    for side in [32, 24] {
        eprintln!("side {side}, bf16:");
        against_numpy(side, &[4, 6, 8], Precision::Bf16, (6e-2, 2e-1));
    }
}

/// The final pool over windows of 17×17 and 20×20 (the final pool at `--image-size` 136
/// and 160 with three blocks): its maxima and where their gradients go, against the numpy
/// reference's `maxpool` and `maxpool_grad`, on random values in many channels so that
/// maxima fall at window positions past 255 (which a one-byte index wrapped, sending the
/// gradient to the wrong pixel).
#[test]
fn a_final_pool_of_17_or_more_matches_numpy() {
    use cifar_df::model::cnn::ops::{maxpool_backward, maxpool_forward, PoolShape};
    if !have_python("numpy", "the pooling reference") {
        return;
    }
    let refs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ref");
    let script = format!(
        "import json, sys\n\
         sys.path.insert(0, {:?})\n\
         import numpy as np, cnn_reference as r\n\
         d = json.load(open(sys.argv[1]))\n\
         n, p, c = d['n'], d['p'], d['c']\n\
         x = np.asarray(d['x'], dtype=np.float64).reshape(n, p, p, c)\n\
         dy = np.asarray(d['dy'], dtype=np.float64).reshape(n, 1, 1, c)\n\
         out = {{'y': r.maxpool(x, p).reshape(-1).tolist(),\n\
                'dx': r.maxpool_grad(x, p, dy).reshape(-1).tolist()}}\n\
         json.dump(out, open(sys.argv[2], 'w'))\n",
        refs.display().to_string()
    );
    let mut rng = SplitMix(17);
    for p in [17usize, 20] {
        let (n, c) = (2, 64);
        let x: Vec<f32> = (0..n * p * p * c).map(|_| rng.normal() as f32).collect();
        let dy: Vec<f32> = (0..n * c).map(|_| rng.normal() as f32).collect();
        let shape = PoolShape {
            n,
            h: p,
            w: p,
            c,
            p,
        };
        let (mut y, mut arg) = (vec![0.0f32; n * c], vec![0u32; n * c]);
        maxpool_forward(&x, shape, &mut y, &mut arg);
        let mut dx = vec![7.0f32; x.len()];
        maxpool_backward(&dy, &arg, shape, &mut dx);
        let dir = tempfile::tempdir().unwrap();
        let (inp, out) = (dir.path().join("in.json"), dir.path().join("out.json"));
        // As f64, so that the reference reads the very values (f32 text would round).
        let wide = |v: &[f32]| v.iter().map(|&f| f64::from(f)).collect::<Vec<f64>>();
        let input = serde_json::json!({ "n": n, "p": p, "c": c, "x": wide(&x), "dy": wide(&dy) });
        std::fs::write(&inp, serde_json::to_vec(&input).unwrap()).unwrap();
        run_ok(
            Command::new("python3")
                .args(["-c", &script])
                .arg(&inp)
                .arg(&out),
        );
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        // Maxima and gradients move values, never compute them: equal up to serde_json's
        // float parsing (within an f64 ulp), a billion times finer than f32's.
        let exact = |what: &str, got: &[f32], want: &[f64]| {
            assert_eq!(got.len(), want.len(), "{what}");
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                let g = f64::from(*g);
                assert!(
                    (g - w).abs() <= 1e-14 * w.abs().max(1.0),
                    "p {p}: {what}[{i}]: {g} vs {w}"
                );
            }
        };
        exact("y", &y, &floats(&r["y"]));
        exact("dx", &dx, &floats(&r["dx"]));
        let past = arg.iter().filter(|&&a| a >= 256).count();
        assert!(past > 0, "p {p}: no maximum past position 255");
        eprintln!(
            "p {p}: {} maxima, {past} past position 255, equal to numpy's",
            n * c
        );
    }
}

/// `(tol, grad_tol)`: the tolerances of the values (logits, running statistics, weights
/// after two steps) and of the gradients, relative to each tensor's largest value.
fn against_numpy(side: usize, widths: &[usize], precision: Precision, (tol, grad_tol): (f64, f64)) {
    let n = 4;
    let (x, y) = images(n, 3, side);
    let params = CnnParams {
        side,
        widths: widths.to_vec(),
        batch_size: n,
        // Large enough for two steps on four images to move the weights well past the
        // comparison's tolerance.
        lr: 200.0,
        lookahead_every: 0,
        whiten_bias_images: 1_000_000,
        precision,
        ..CnnParams::default()
    };
    let mut model = Cnn::new(params.clone()).unwrap();
    assert_eq!(model.kernel().is_bf16(), precision == Precision::Bf16);
    model.init_from(x.view()).unwrap();
    let net0 = model.net().unwrap().clone();
    // The first forward and backward pass, by hand.
    let xs = nhwc(&x, side);
    let mut net = net0.clone();
    let mut tape = Tape::default();
    tape.set_kernel(model.kernel());
    let logits = net.forward_train(&xs, n, &mut tape);
    let (dlogits, _, _) = smoothed_ce(&logits, y.as_slice().unwrap(), 10, params.label_smoothing);
    let mut grads = Vec::new();
    grads.resize(net.params.len(), Vec::new());
    net.backward(&dlogits, &mut tape, true, &mut grads);
    // Two steps of the learner on the same batch, with the rates it will use.
    let m = params.momentum;
    let kilo = 1024.0 * (1.0 + 1.0 / (1.0 - m));
    let mut steps = Vec::new();
    for s in 0..2u64 {
        let factor = model.lr_factor(s * n as u64);
        let lr = params.lr / kilo * factor;
        let wd = params.weight_decay * n as f64 / kilo * factor;
        let (mut lrs, mut decays) = (Vec::new(), Vec::new());
        for t in 0..net0.params.len() {
            let is_norm = (net0.norm_index(0)..net0.head_index()).contains(&t);
            let lr_t = if is_norm { lr * params.bias_scaler } else { lr };
            lrs.push(lr_t);
            decays.push(wd / lr_t);
        }
        steps.push(serde_json::json!({"lr": lrs, "decay": decays}));
    }
    for _ in 0..2 {
        model.partial_fit(x.view(), y.view()).unwrap();
    }
    let input = serde_json::json!({
        "net": {
            "widths": params.widths,
            "classes": 10,
            "bn_eps": 1e-12,
            "bn_momentum": params.bn_momentum,
            "scale": params.scale,
            "label_smoothing": params.label_smoothing,
            "whiten": net0.whiten,
        },
        "x": xs,
        "side": side,
        "y": y.to_vec(),
        "params": net0.params,
        "sgd": {"momentum": m, "steps": steps},
    });
    let dir = tempfile::tempdir().unwrap();
    let (inp, out) = (dir.path().join("in.json"), dir.path().join("out.json"));
    std::fs::write(&inp, serde_json::to_vec(&input).unwrap()).unwrap();
    if let Some(keep) = std::env::var_os("CIFAR_DF_KEEP_CNN_INPUT") {
        std::fs::copy(&inp, keep).unwrap();
    }
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ref/cnn_reference.py");
    run_ok(Command::new("python3").arg(script).arg(&inp).arg(&out));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let worst = r["fd_worst"].as_f64().unwrap();
    assert!(
        worst < 1e-5,
        "the reference's own finite differences: {worst}"
    );
    eprintln!(
        "reference: finite differences agree to {worst:e}; loss {}",
        r["loss"]
    );
    close("logits", &logits, &floats(&r["logits"]), tol);
    let names = net0.arch.param_shapes();
    for (t, g) in grads.iter().enumerate() {
        close(
            &format!("d {}", names[t].0),
            g,
            &floats(&r["grads"][t]),
            grad_tol,
        );
    }
    for (i, (rm, rv)) in net.running_mean.iter().zip(&net.running_var).enumerate() {
        close(
            &format!("running mean {i}"),
            rm,
            &floats(&r["running_mean"][i]),
            tol,
        );
        close(
            &format!("running var {i}"),
            rv,
            &floats(&r["running_var"][i]),
            tol,
        );
    }
    let after = model.net().unwrap();
    for (t, p) in after.params.iter().enumerate() {
        close(
            &format!("{} after two steps", names[t].0),
            p,
            &floats(&r["after"][t]),
            // Tensors that start at zero (the biases) are two gradient steps after them.
            if net0.params[t].iter().all(|&v| v == 0.0) {
                grad_tol
            } else {
                tol
            },
        );
    }
    // The steps moved the weights by more than the tolerance.
    let moved = after.params[1]
        .iter()
        .zip(&net0.params[1])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(moved > 1e-3, "{moved}");
    if precision == Precision::Bf16 {
        // The same first pass in f32 differs: the products did round their inputs.
        let mut net32 = net0.clone();
        let mut tape32 = Tape::default();
        let logits32 = net32.forward_train(&xs, n, &mut tape32);
        assert!(
            logits.iter().zip(&logits32).any(|(a, b)| a != b),
            "bf16 = f32"
        );
    }
}

fn nhwc(x: &Array2<f32>, side: usize) -> Vec<f32> {
    let plane = side * side;
    let mut out = Vec::with_capacity(x.len());
    for row in x.rows() {
        for p in 0..plane {
            for c in 0..3 {
                out.push(row[c * plane + p]);
            }
        }
    }
    out
}

/// Images of `side`×`side` as CIFAR rows normalised as `sql/cnn.sql` does, optionally
/// mirrored.
fn normalised_rows(pixels: &[u8], side: usize, flip: bool) -> Array2<f32> {
    use cifar_df::model::cnn::{MEAN, STD};
    let plane = side * side;
    let n = pixels.len() / (3 * plane);
    Array2::from_shape_fn((n, 3 * plane), |(i, j)| {
        let (c, p) = (j / plane, j % plane);
        let (y, x) = (p / side, p % side);
        let sx = if flip { side - 1 - x } else { x };
        let v = f32::from(pixels[i * 3 * plane + c * plane + y * side + sx]);
        (v / 255.0 - MEAN[c]) / STD[c]
    })
}

/// `export-model` writes the run's network so that onnxruntime (the independent
/// reference) and cifar-df's own `--extractor onnx:` (tract) give cifar-df's logits,
/// test-time probabilities and features.
#[test]
fn an_exported_cnn_gives_cifar_dfs_outputs_in_onnxruntime_and_tract() {
    if !have_python("numpy, onnx, onnxruntime", "the ONNX export check") {
        return;
    }
    // CIFAR's side, and a network learnt from 40×40 images (`--image-size 40`): the
    // export's input, flips and shifts follow the side.
    for side in [32, 40] {
        export_check(side);
    }
}

fn export_check(side: usize) {
    let plane = side * side;
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let runs_s = runs.to_str().unwrap();
    let bf16_if_any = if Kernel::best_bf16().is_some() {
        "bf16"
    } else {
        "f32"
    };
    let cfg = format!("{}/configs/cnn.toml", env!("CARGO_MANIFEST_DIR"));
    run_ok(common::bin().args([
        "-q",
        "train",
        "--config",
        &cfg,
        "--data",
        "synthetic:600:40:3",
        "--epochs",
        "2",
        "--set",
        "widths=[8,16,24]",
        "--image-size",
        &side.to_string(),
        "--run",
        "small",
        "--runs",
        runs_s,
        "--no-plots",
        "--precision",
        bf16_if_any,
    ]));
    let model = dir.path().join("small.onnx");
    let (out, _) = run_ok(common::bin().args([
        "export-model",
        "--run",
        "small",
        "--runs",
        runs_s,
        "--out",
        model.to_str().unwrap(),
    ]));
    assert!(
        out.contains("flip on") && out.contains("translate on"),
        "{out}"
    );

    // Images: smooth patterns plus noise, and two plain ones (all black, all white).
    let n = 19;
    let mut rng = SplitMix(11);
    let mut pixels: Vec<u8> = (0..(n - 2) * 3 * plane)
        .map(|j| {
            let p = (j % plane) as f64;
            let v = 128.0 + 80.0 * (p * 0.05).sin() + 40.0 * rng.normal();
            v.clamp(0.0, 255.0) as u8
        })
        .collect();
    pixels.extend(std::iter::repeat_n(0u8, 3 * plane));
    pixels.extend(std::iter::repeat_n(255u8, 3 * plane));

    // cifar-df: the network's logits and features, and the run's test-time scores (the
    // model's probabilities with translations, averaged with the mirror images').
    let ex = cifar_df::run::extractor::cnn_of_run(&runs.join("small"), None).unwrap();
    assert_eq!(ex.side(), side);
    let rows = normalised_rows(&pixels, side, false);
    let mut feats = Vec::new();
    // The ONNX file is fp32 whatever the run's precision: it gives the f32 network's
    // outputs (a bf16 run's own scores are within bf16 rounding of them, checked below).
    let logits = ex
        .net
        .forward_score(&nhwc(&rows, side), n, Some(&mut feats), Kernel::F32);
    let ck = cifar_df::run::checkpoint::latest(&runs.join("small/checkpoints"))
        .unwrap()
        .unwrap();
    let mut cnn = Cnn::load(&ck.dir).unwrap();
    // The run learnt in bf16 where the CPU has it (asked), and recorded so.
    assert_eq!(cnn.kernel(), Kernel::best_bf16().unwrap_or(Kernel::F32));
    let bf16_proba = cnn.predict_proba(rows.view()).unwrap();
    let was_bf16 = cnn.kernel().is_bf16();
    cnn.switch_precision(Precision::F32).unwrap();
    let mut proba = cnn.predict_proba(rows.view()).unwrap();
    if was_bf16 {
        // The bf16 run's own scores: within bf16 rounding of the f32 network's.
        let want: Vec<f64> = proba.iter().map(|&v| f64::from(v)).collect();
        close(
            "the bf16 scores against the f32 ones",
            bf16_proba.as_slice().unwrap(),
            &want,
            2e-2,
        );
    }
    let mirrored = cnn
        .predict_proba(normalised_rows(&pixels, side, true).view())
        .unwrap();
    proba.zip_mut_with(&mirrored, |p, &q| *p = 0.5 * (*p + q));

    // onnxruntime.
    let (img, res) = (dir.path().join("img.u8"), dir.path().join("ort.json"));
    std::fs::write(&img, &pixels).unwrap();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ref/onnx_export_check.py");
    run_ok(
        Command::new("python3")
            .arg(script)
            .arg(&model)
            .arg(&img)
            .arg(n.to_string())
            .arg(&res)
            .arg(side.to_string()),
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&res).unwrap()).unwrap();
    assert_eq!(r["shapes"]["logits"], serde_json::json!([n, 10]));
    assert_eq!(r["shapes"]["features"], serde_json::json!([n, 24]));
    assert_eq!(r["metadata"]["image_mean"], "0,0,0");
    close("onnxruntime logits", &logits, &floats(&r["logits"]), 1e-4);
    close(
        "onnxruntime features",
        &feats,
        &floats(&r["features"]),
        1e-4,
    );
    close(
        "onnxruntime probabilities",
        proba.as_slice().unwrap(),
        &floats(&r["probabilities"]),
        1e-4,
    );
    assert!(
        r["alone_diff"].as_f64().unwrap() < 1e-5,
        "{}",
        r["alone_diff"]
    );
    // The test-time averaging changes the answer (so the check above is not the logits').
    let plain: Vec<f64> = logits
        .chunks(10)
        .flat_map(|row| {
            let m = row.iter().fold(f32::MIN, |a, &b| a.max(b));
            let e: Vec<f64> = row.iter().map(|&v| f64::from(v - m).exp()).collect();
            let sum: f64 = e.iter().sum();
            e.into_iter().map(move |v| v / sum)
        })
        .collect();
    let moved = plain
        .iter()
        .zip(proba.iter())
        .map(|(a, &b)| (a - f64::from(b)).abs())
        .fold(0.0, f64::max);
    assert!(moved > 1e-3, "{moved}");

    // tract, through --extractor onnx: (its normalisation from the model's metadata).
    let spec = format!("onnx:{}", model.display());
    for (node, want) in [("features", &feats), ("logits", &logits)] {
        let params = cifar_df::features::OnnxParams {
            node: Some(node.into()),
            batch: 8,
            ..Default::default()
        };
        let e = cifar_df::run::extractor::open(&spec, params, &runs).unwrap();
        let got = e.encode_sized(&pixels, side).unwrap();
        let want: Vec<f64> = want.iter().map(|&v| f64::from(v)).collect();
        close(
            &format!("tract {node}"),
            got.as_slice().unwrap(),
            &want,
            1e-4,
        );
    }

    // A run that is not a CNN, and one that does not exist, are named.
    run_ok(common::bin().args([
        "-q",
        "train",
        "--model",
        "logreg",
        "--data",
        "synthetic:100:10:3",
        "--run",
        "linear",
        "--runs",
        runs_s,
        "--no-plots",
    ]));
    for (run, want) in [("linear", "not a CNN"), ("nothing", "no checkpoint")] {
        let o = common::bin()
            .args(["export-model", "--run", run, "--runs", runs_s, "--out"])
            .arg(dir.path().join("x.onnx"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{run}: {err}");
    }
    assert!(!dir.path().join("x.onnx").exists());
}

/// A learning rate that blows the network up stops the run with an error naming the
/// batch; the checkpoint before it stays, and the run can be scored from it.
#[test]
fn a_learning_rate_that_blows_up_stops_the_run_naming_the_batch_and_keeps_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let runs_s = runs.to_str().unwrap();
    // The rate warms up from almost nothing to a huge one: the first batches learn, a
    // later one diverges.
    let o = common::bin()
        .args([
            "-q",
            "train",
            "--model",
            "cnn",
            "--data",
            "synthetic:2000:50:3",
            "--batch-size",
            "100",
            "--epochs",
            "3",
            "--checkpoint-every",
            "1",
            "--set",
            "widths=[8,8,8]",
            "--set",
            "lr=1e10",
            "--set",
            "lr_start=1e-14",
            "--set",
            "warmup=0.9",
            "--run",
            "blown",
            "--runs",
            runs_s,
            "--no-plots",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    let batch: u64 = err
        .split("batch ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no batch named in {err}"));
    assert!(
        err.contains("infinite or NaN") || err.contains("the loss is"),
        "{err}"
    );
    assert!(
        err.contains("learning rate (10000000000) is too high"),
        "{err}"
    );
    // (Here at batch 4; a checkpoint follows every batch, so any batch after the first
    // leaves one.)
    assert!(batch >= 1, "diverged at batch {batch}: {err}");
    // The error names the checkpoint kept, and it holds a working network.
    let kept = err
        .split("last checkpoint (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .unwrap_or_else(|| panic!("no checkpoint named in {err}"))
        .to_string();
    assert!(kept.starts_with("epoch-"), "{err}");
    assert_eq!(err.matches("too high").count(), 1, "said once: {err}");
    let (out, _) = run_ok(common::bin().args([
        "-q",
        "predict",
        "--run",
        "blown",
        "--runs",
        runs_s,
        "--checkpoint",
        &kept,
        "--data",
        "synthetic:2000:50:3",
    ]));
    assert!(out.contains("accuracy"), "{out}");
    let info = std::fs::read_to_string(runs.join("blown/run.json")).unwrap();
    assert!(info.contains("\"failed\""), "{info}");
}
