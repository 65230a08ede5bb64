//! The ADWIN drift detector against River's `drift.ADWIN` (defaults) on fixed sequences:
//! the same detection indices, exactly.

mod common;

use std::process::Command;

use cifar_df::drift::{Adwin, AdwinParams};

#[test]
fn adwin_detects_where_river_does() {
    if !common::have_python("river", "the ADWIN reference") {
        return;
    }
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/ref/adwin_reference.py"
        ))
        .output()
        .expect("run the ADWIN reference");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut cases = 0;
    let mut total = 0;
    for line in text.lines() {
        let case: serde_json::Value = serde_json::from_str(line).unwrap();
        let name = case["name"].as_str().unwrap();
        let values: Vec<f64> = case["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let want: Vec<usize> = case["detections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let mut adwin = Adwin::new(AdwinParams::default()).unwrap();
        let got: Vec<usize> = values
            .iter()
            .enumerate()
            .filter_map(|(i, &v)| adwin.update(v).then_some(i))
            .collect();
        assert_eq!(got, want, "{name}: detection indices differ from River's");
        eprintln!(
            "{name}: {} values, detections at {got:?} (River: the same)",
            values.len()
        );
        cases += 1;
        total += want.len();
    }
    assert_eq!(cases, 4);
    assert!(total > 5, "the sequences must have drifts to find");
}
