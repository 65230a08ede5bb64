//! Folder → `cifar-df stream` → source → `cifar-df export` → Parquet equals the source
//! images and labels, for both dataset layouts, every wire format and every kind of source.

use crate::common;

use std::io::Write;
use std::path::Path;

use common::*;

/// Assert the exported rows are exactly `want`, in order, with batch/row numbering for
/// batches of `batch_size`.
fn assert_rows(out: &Path, want: &[(u8, Vec<u8>)], batch_size: usize) {
    let got = read_parquet(out);
    assert_eq!(got.len(), want.len(), "row count of {}", out.display());
    for (i, ((batch, row, label, px), (wl, wpx))) in got.iter().zip(want).enumerate() {
        assert_eq!(*batch, (i / batch_size) as u64, "batch of image {i}");
        assert_eq!(*row, (i % batch_size) as u32, "row of image {i}");
        assert_eq!(*label, u16::from(*wl), "label of image {i}");
        assert!(px == wpx, "pixels of image {i} differ");
    }
}

fn export_from(source: &str, out: &Path, extra: &[&str]) -> String {
    let (_, stderr) = run_ok(
        bin()
            .args(["export", "--source", source, "--out"])
            .arg(out)
            .args(extra),
    );
    stderr
}

fn tcp_round_trip(layout_dir: &str, format: &str) {
    let Some(mini) = mini() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.parquet");
    let mut server = start_ours(
        &mini.join(layout_dir),
        &["--batch-size", "100", "--format", format],
    );
    export_from(&format!("tcp://127.0.0.1:{}", server.port), &out, &[]);
    server.child.wait().unwrap();
    assert_rows(&out, &raw_records(&mini, "train"), 100);
}

#[test]
fn tcp_spark_json_from_the_bin_layout() {
    tcp_round_trip("cifar-10-batches-bin", "spark-json");
}

#[test]
fn tcp_spark_json_from_the_py_layout() {
    tcp_round_trip("cifar-10-batches-py", "spark-json");
}

#[test]
fn tcp_ndjson() {
    tcp_round_trip("", "ndjson");
}

#[test]
fn tcp_arrow() {
    tcp_round_trip("", "arrow");
}

#[test]
fn reference_server_into_export_and_query() {
    let Some(mini) = mini() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.parquet");
    let server = start_reference(&mini, &["--batch-size", "100"]);
    export_from(&format!("tcp://127.0.0.1:{}", server.port), &out, &[]);
    server.wait();
    assert_rows(&out, &raw_records(&mini, "train"), 100);
    let (stdout, _) = run_ok(bin().args([
        "query",
        &format!("select count(*) as n from '{}'", out.display()),
        "--format",
        "csv",
    ]));
    assert_eq!(stdout.trim(), "n\n5000");
}

#[test]
fn captured_file_sources_in_every_format() {
    let Some(mini) = mini() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let want = raw_records(&mini, "test");
    for format in ["spark-json", "ndjson", "arrow"] {
        // Capture what the server sends, then read it back through `file:`.
        let mut server = start_ours(
            &mini,
            &["--split", "test", "--batch-size", "128", "--format", format],
        );
        let bytes = server.read_all();
        server.wait();
        let capture = tmp.path().join(format!("capture.{format}"));
        std::fs::File::create(&capture)
            .unwrap()
            .write_all(&bytes)
            .unwrap();
        let out = tmp.path().join(format!("{format}.parquet"));
        // ndjson batches end at the server's blank lines; --batch-size caps them.
        export_from(
            &format!("file:{}", capture.display()),
            &out,
            &["--batch-size", "128"],
        );
        assert_rows(&out, &want, 128);
        // The same capture with the format given explicitly.
        let out2 = tmp.path().join(format!("{format}-explicit.parquet"));
        export_from(
            &format!("file:{}", capture.display()),
            &out2,
            &["--format", format, "--batch-size", "128"],
        );
        assert_eq!(read_parquet(&out2), read_parquet(&out));
    }
}

#[test]
fn dataset_sources_in_process_both_layouts() {
    let Some(mini) = mini() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let want = raw_records(&mini, "test");
    for (i, dir) in [
        mini.clone(),
        mini.join("cifar-10-batches-bin"),
        mini.join("cifar-10-batches-py"),
    ]
    .iter()
    .enumerate()
    {
        let out = tmp.path().join(format!("t{i}.parquet"));
        export_from(dir.to_str().unwrap(), &out, &["--split", "test"]);
        assert_rows(&out, &want, 100);
    }
}

#[test]
fn directory_export_writes_complete_parts() {
    let Some(mini) = mini() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("parts");
    export_from(
        mini.to_str().unwrap(),
        &out,
        &["--split", "test", "--rows-per-file", "200"],
    );
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "part-00000.parquet",
            "part-00001.parquet",
            "part-00002.parquet"
        ]
    );
    assert_rows(&out, &raw_records(&mini, "test"), 100);
    // A second export into the same directory appends new parts.
    export_from(
        mini.to_str().unwrap(),
        &out,
        &["--split", "test", "--rows-per-file", "1000"],
    );
    assert!(out.join("part-00003.parquet").exists());
    let (stdout, _) = run_ok(bin().args([
        "query",
        &format!(
            "select count(*) as n, count(distinct batch) as b from '{}/'",
            out.display()
        ),
        "--format",
        "json",
    ]));
    assert_eq!(stdout.trim(), r#"[{"n":1000,"b":5}]"#);
}

#[test]
fn synthetic_source_needs_no_files() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("s.parquet");
    export_from("synthetic:500:100:7", &out, &["--batch-size", "64"]);
    let rows = read_parquet(&out);
    assert_eq!(rows.len(), 500);
    assert_eq!(
        rows.last().unwrap().0,
        7,
        "500 images in batches of 64 → batches 0..7"
    );
    // Deterministic for a seed.
    let out2 = tmp.path().join("s2.parquet");
    export_from("synthetic:500:100:7", &out2, &["--batch-size", "64"]);
    assert_eq!(read_parquet(&out2), rows);
}

#[test]
fn pyarrow_reads_the_export() {
    let Some(mini) = mini() else { return };
    let probe = std::process::Command::new("python3")
        .args(["-c", "import pyarrow"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        common::skip("pyarrow_reads_the_export", "python3 with pyarrow");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("t.parquet");
    export_from(mini.to_str().unwrap(), &out, &["--split", "test"]);
    let script = format!(
        r#"
import pyarrow.parquet as pq
t = pq.read_table({out:?})
assert t.num_rows == 500, t.num_rows
assert t.schema.names == ["batch", "row", "label", "image"], t.schema.names
raw = open({bin:?}, "rb").read()
for i, (label, image) in enumerate(zip(t.column("label").to_pylist(), t.column("image").to_pylist())):
    rec = raw[i * 3073:(i + 1) * 3073]
    assert label == rec[0], (i, label, rec[0])
    assert bytes(image) == rec[1:], i
print("ok", t.num_rows)
"#,
        out = out.display().to_string(),
        bin = mini
            .join("cifar-10-batches-bin/test_batch.bin")
            .display()
            .to_string()
    );
    let o = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "pyarrow check failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "ok 500");
}
