//! The CNN (`--model cnn`) against an independent float64 numpy reference
//! (`tests/ref/cnn_reference.py`): the logits, the gradient of every layer's parameters
//! (the reference checks its own against finite differences), the BatchNorm running
//! statistics, and two Nesterov SGD steps.

mod common;

use std::process::Command;

use common::{have_python, run_ok};
use ndarray::{Array1, Array2};

use cifar_df::model::cnn::net::{smoothed_ce, Tape};
use cifar_df::model::cnn::{Cnn, CnnParams};
use cifar_df::model::{Learner, SplitMix};

fn images(n: usize, seed: u64) -> (Array2<f32>, Array1<u8>) {
    let mut rng = SplitMix(seed);
    // Smooth images (a few low frequencies per channel) plus noise, so that pooling
    // windows have clear maxima and the whitening sees real correlations.
    let x = Array2::from_shape_fn((n, 3072), |(_, j)| {
        let (c, p) = (j / 1024, j % 1024);
        let (yy, xx) = ((p / 32) as f32, (p % 32) as f32);
        ((yy * 0.3 + c as f32).sin() + (xx * 0.2).cos()) * 0.7 + rng.normal() as f32 * 0.5
    });
    let y = (0..n).map(|_| rng.below(10) as u8).collect();
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
    let n = 4;
    let (x, y) = images(n, 3);
    let params = CnnParams {
        widths: vec![4, 6, 8],
        batch_size: n,
        // Large enough for two steps on four images to move the weights well past the
        // comparison's tolerance.
        lr: 200.0,
        lookahead_every: 0,
        whiten_bias_images: 1_000_000,
        ..CnnParams::default()
    };
    let mut model = Cnn::new(params.clone()).unwrap();
    model.init_from(x.view()).unwrap();
    let net0 = model.net().unwrap().clone();
    // The first forward and backward pass, by hand.
    let xs = nhwc(&x);
    let mut net = net0.clone();
    let mut tape = Tape::default();
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
    close("logits", &logits, &floats(&r["logits"]), 1e-4);
    let names = net0.arch.param_shapes();
    for (t, g) in grads.iter().enumerate() {
        close(
            &format!("d {}", names[t].0),
            g,
            &floats(&r["grads"][t]),
            1e-4,
        );
    }
    for (i, (rm, rv)) in net.running_mean.iter().zip(&net.running_var).enumerate() {
        close(
            &format!("running mean {i}"),
            rm,
            &floats(&r["running_mean"][i]),
            1e-4,
        );
        close(
            &format!("running var {i}"),
            rv,
            &floats(&r["running_var"][i]),
            1e-4,
        );
    }
    let after = model.net().unwrap();
    for (t, p) in after.params.iter().enumerate() {
        close(
            &format!("{} after two steps", names[t].0),
            p,
            &floats(&r["after"][t]),
            1e-4,
        );
    }
    // The steps moved the weights by more than the tolerance.
    let moved = after.params[1]
        .iter()
        .zip(&net0.params[1])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(moved > 1e-3, "{moved}");
}

fn nhwc(x: &Array2<f32>) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.rows() {
        for p in 0..1024 {
            for c in 0..3 {
                out.push(row[c * 1024 + p]);
            }
        }
    }
    out
}
