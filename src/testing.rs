//! For the unit tests only: how a test that lacks a tool (python3 with a module, the real
//! CIFAR-10 sample) says so. As `tests/common::skip`: a panic under CI (`CI` set), else a
//! note and a line in the file `CIFAR_DF_SKIP_LOG` names, which `.ci/run` counts.

/// Says `what` checks nothing for want of `needs`.
pub fn skip(what: &str, needs: &str) {
    if let Some(log) = std::env::var_os("CIFAR_DF_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = writeln!(f, "{what}: no {needs}");
        }
    }
    if std::env::var_os("CI").is_some() {
        panic!("CI needs {needs} for {what}");
    }
    eprintln!("skipping {what}: no {needs}");
}
