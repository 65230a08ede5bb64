//! Bad input: every malformed case is rejected, counted and reported with its batch, row and
//! reason; the source goes on with the next line, and nothing already accepted is lost.

use crate::common;

use std::io::{Cursor, Write};
use std::net::TcpListener;
use std::time::Duration;

use arrow::array::{Array, UInt16Array, UInt64Array};
use arrow::record_batch::RecordBatch;
use cifar_df::source::{self, BatchSource, Report, SourceOptions, SourceSpec};
use cifar_df::wire::{ndjson, spark_json, Format};
use common::*;

fn image(seed: u8) -> Vec<u8> {
    (0..3072u32)
        .map(|k| (k as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

/// A valid spark-json line (without '\n') of `n` images with labels 0..n.
fn spark_line(n: usize) -> String {
    let labels: Vec<u16> = (0..n as u16).collect();
    let pixels: Vec<u8> = (0..n as u8).flat_map(image).collect();
    let mut out = Vec::new();
    spark_json::encode(&labels, &pixels, &mut out);
    assert_eq!(out.pop(), Some(b'\n'));
    String::from_utf8(out).unwrap()
}

/// Replace the `key` of row `row` in a spark-json line.
fn edit_row(line: &str, row: usize, from: &str, to: &str) -> String {
    let start = line.find(&format!("\"{row}\": {{")).unwrap();
    let end = start + line[start..].find('}').unwrap();
    let (head, rest) = line.split_at(start);
    let (row_text, tail) = rest.split_at(end - start);
    assert!(row_text.contains(from), "{from} not in row {row}");
    format!("{head}{}{tail}", row_text.replacen(from, to, 1))
}

fn drain(mut src: Box<dyn BatchSource>) -> (Vec<RecordBatch>, Option<String>) {
    let mut out = Vec::new();
    loop {
        match src.next_batch() {
            Ok(Some(b)) => out.push(b),
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e.to_string())),
        }
    }
}

fn batch_numbers(batches: &[RecordBatch]) -> Vec<u64> {
    batches
        .iter()
        .map(|b| {
            b.column(0)
                .as_any()
                .downcast_ref::<UInt64Array>()
                .unwrap()
                .value(0)
        })
        .collect()
}

fn from_bytes(bytes: Vec<u8>, opts: &SourceOptions) -> (Box<dyn BatchSource>, Report) {
    let report = Report::default();
    let src =
        source::reader::from_reader(Box::new(Cursor::new(bytes)), "test", opts, report.clone())
            .unwrap();
    (src, report)
}

#[test]
fn spark_json_bad_lines_are_rejected_with_batch_row_and_reason() {
    let good = spark_line(3);
    let opts = SourceOptions {
        max_line_bytes: good.len() * 3 / 2,
        ..SourceOptions::default()
    };
    let value = |line: &str, row: usize, key: &str| -> String {
        // The value text of `key` in `row`.
        let row_at = line.find(&format!("\"{row}\": {{")).unwrap();
        let k = row_at + line[row_at..].find(&format!("\"{key}\": ")).unwrap() + key.len() + 4;
        let len = line[k..].find([',', '}']).unwrap();
        line[k..k + len].to_string()
    };
    let f17 = value(&good, 1, "feature17");
    let f5 = value(&good, 2, "feature5");
    let lines = [
        good.clone(),                                               // 0 ok
        edit_row(&good, 1, &format!("\"feature17\": {f17}, "), ""), // 1 missing key
        edit_row(
            &good,
            2,
            &format!("\"feature5\": {f5},"),
            "\"feature5\": 256,",
        ), // 2 value > 255
        edit_row(&good, 0, "\"label\": 0", "\"label\": 10"),        // 3 label > 9
        "hello, not json".to_string(),                              // 4 not JSON
        format!("{good}{}", " ".repeat(good.len())),                // 5 too long
        good.clone(),                                               // 6 ok
    ];
    let mut bytes = lines.join("\n").into_bytes();
    bytes.extend_from_slice(b"\n");
    bytes.extend_from_slice(&good.as_bytes()[..good.len() / 2]); // 7: cut mid-line
    let (src, report) = from_bytes(bytes, &opts);
    let (batches, err) = drain(src);
    assert_eq!(err, None);
    assert_eq!(batch_numbers(&batches), vec![0, 6]);
    assert!(batches.iter().all(|b| b.num_rows() == 3));
    let r = report.snapshot();
    assert_eq!(r.format, Some(Format::SparkJson));
    assert_eq!((r.batches, r.images, r.rejected), (2, 6, 6));
    let seen: Vec<(u64, Option<u32>)> = r.rejections.iter().map(|x| (x.batch, x.row)).collect();
    assert_eq!(
        seen,
        vec![
            (1, Some(1)),
            (2, Some(2)),
            (3, Some(0)),
            (4, None),
            (5, None),
            (7, Some(1))
        ]
    );
    let reasons: Vec<&str> = r.rejections.iter().map(|x| x.reason.as_str()).collect();
    let expect = [
        "feature17",
        "256",
        "label 10",
        "",
        "longer than the cap",
        "ended inside a line",
    ];
    for (reason, want) in reasons.iter().zip(expect) {
        assert!(reason.contains(want), "{reason:?} should mention {want:?}");
    }
    assert!(reasons[0].contains("missing"), "{}", reasons[0]);
    // The offsets point into the right line.
    let line_start = |i: usize| lines[..i].iter().map(|l| l.len() as u64 + 1).sum::<u64>();
    for (rej, i) in r.rejections.iter().zip([1usize, 2, 3, 4, 5, 7]) {
        assert!(rej.offset >= line_start(i), "{rej} before line {i}");
        if i < 7 {
            assert!(rej.offset < line_start(i + 1), "{rej} after line {i}");
        }
    }
    assert_eq!(
        r.rejections[0].to_string().split(" (").next().unwrap(),
        "rejected batch 1, row 1"
    );
}

#[test]
fn ndjson_bad_lines_are_rejected_and_the_batch_keeps_the_rest() {
    let mut good = Vec::new();
    ndjson::encode(
        &[3, 4, 5],
        &[image(1), image(2), image(3)].concat(),
        &mut good,
    );
    let lines: Vec<String> = String::from_utf8(good)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let text = [
        lines[0].clone(),
        lines[1].replace("\"label\": 4", "\"label\": 12"),
        lines[2].clone(),
        String::new(), // end of batch 0
        lines[0].replacen("[1, ", "[300, ", 1),
        lines[1].clone(),
        String::new(), // end of batch 1
        "{\"label\": 1}".into(),
        String::new(), // batch 2: nothing accepted
        lines[2].clone(),
    ]
    .join("\n");
    let (src, report) = from_bytes(text.into_bytes(), &SourceOptions::default());
    let (batches, err) = drain(src);
    assert_eq!(err, None);
    assert_eq!(batch_numbers(&batches), vec![0, 1, 3]);
    let labels: Vec<Vec<u16>> = batches
        .iter()
        .map(|b| {
            b.column(2)
                .as_any()
                .downcast_ref::<UInt16Array>()
                .unwrap()
                .values()
                .to_vec()
        })
        .collect();
    assert_eq!(labels, vec![vec![3, 5], vec![4], vec![5]]);
    let r = report.snapshot();
    assert_eq!(r.format, Some(Format::Ndjson));
    let seen: Vec<(u64, Option<u32>)> = r.rejections.iter().map(|x| (x.batch, x.row)).collect();
    assert_eq!(seen, vec![(0, Some(1)), (1, Some(0)), (2, Some(0))]);
    assert!(r.rejections[0].reason.contains("label 12 outside 0..9"));
    assert!(
        r.rejections[1].reason.contains("300"),
        "{}",
        r.rejections[1].reason
    );
}

#[test]
fn arrow_batches_with_bad_labels_are_rejected_and_corruption_ends_the_stream() {
    use cifar_df::wire::batch::make_batch;
    let mut buf = Vec::new();
    {
        let schema = cifar_df::wire::batch::stream_schema();
        let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut buf, &schema).unwrap();
        w.write(&make_batch(0, None, vec![1, 2], [image(0), image(1)].concat()).unwrap())
            .unwrap();
        // Labels outside 0..9 cannot come from make_batch's callers on the wire; build it raw.
        let bad = make_batch(1, None, vec![3, 4], [image(2), image(3)].concat()).unwrap();
        let mut cols = bad.columns().to_vec();
        cols[2] = std::sync::Arc::new(UInt16Array::from(vec![3u16, 11]));
        w.write(&RecordBatch::try_new(schema.clone(), cols).unwrap())
            .unwrap();
        w.write(&make_batch(2, None, vec![5], image(4)).unwrap())
            .unwrap();
        w.finish().unwrap();
    }
    let (src, report) = from_bytes(buf.clone(), &SourceOptions::default());
    let (batches, err) = drain(src);
    assert_eq!(err, None);
    assert_eq!(batch_numbers(&batches), vec![0, 2]);
    let r = report.snapshot();
    assert_eq!(r.rejections.len(), 1);
    assert_eq!((r.rejections[0].batch, r.rejections[0].row), (1, Some(1)));
    assert!(r.rejections[0].reason.contains("label 11"));

    // Cut the stream in the middle of the third message: the first two stay accepted.
    let cut = buf.len() - 2000;
    let (src, _) = from_bytes(buf[..cut].to_vec(), &SourceOptions::default());
    let (batches, err) = drain(src);
    assert_eq!(batch_numbers(&batches), vec![0]);
    let err = err.expect("a cut IPC stream is an error");
    assert!(
        err.contains("batch 2") && err.contains("Arrow IPC"),
        "{err}"
    );
}

#[test]
fn connection_dropped_mid_line_loses_only_that_line() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let good = spark_line(2);
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(format!("{good}\n{good}\n").as_bytes()).unwrap();
        s.write_all(&good.as_bytes()[..1000]).unwrap();
        // Dropping the socket closes the connection mid-line.
    });
    let spec = SourceSpec::parse(&format!("tcp://127.0.0.1:{port}")).unwrap();
    let src = source::open(&spec, &SourceOptions::default()).unwrap();
    let report = src.report();
    let (batches, err) = drain(src);
    server.join().unwrap();
    assert_eq!(err, None);
    assert_eq!(batch_numbers(&batches), vec![0, 1]);
    let r = report.snapshot();
    assert_eq!(r.rejections.len(), 1);
    assert_eq!(r.rejections[0].batch, 2);
    assert!(
        r.rejections[0].reason.contains("1000 bytes"),
        "{}",
        r.rejections[0]
    );
}

#[test]
fn tcp_source_waits_for_a_late_server_and_gives_up_on_none() {
    // A server that starts 300 ms after the client.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let good = spark_line(1);
    let server = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(format!("{good}\n").as_bytes()).unwrap();
    });
    let spec = SourceSpec::parse(&format!("tcp://127.0.0.1:{port}")).unwrap();
    let (batches, err) = drain(source::open(&spec, &SourceOptions::default()).unwrap());
    server.join().unwrap();
    assert_eq!((batches.len(), err), (1, None));

    // Nobody listening: a clear error after the timeout.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let opts = SourceOptions {
        connect_timeout: Duration::from_millis(300),
        ..SourceOptions::default()
    };
    let spec = SourceSpec::parse(&format!("tcp://127.0.0.1:{port}")).unwrap();
    let (batches, err) = drain(source::open(&spec, &opts).unwrap());
    assert!(batches.is_empty());
    let err = err.unwrap();
    assert!(
        err.contains(&format!("tcp://127.0.0.1:{port}")) && err.contains("gave up"),
        "{err}"
    );
}

#[test]
fn cli_export_reports_rejections_and_keeps_good_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let good = spark_line(2);
    let capture = tmp.path().join("c.jsonl");
    let bad = edit_row(&good, 1, "\"label\": 1", "\"label\": 42");
    std::fs::write(&capture, format!("{good}\n{bad}\n{good}\n")).unwrap();
    let out = tmp.path().join("o.parquet");
    let (_, stderr) = run_ok(
        bin()
            .args(["export", "--source"])
            .arg(format!("file:{}", capture.display()))
            .arg("--out")
            .arg(&out),
    );
    assert!(stderr.contains("rejected batch 1, row 1"), "{stderr}");
    assert!(stderr.contains("label 42 outside 0..9"), "{stderr}");
    assert!(stderr.contains("1 rejected"), "{stderr}");
    let rows = read_parquet(&out);
    assert_eq!(rows.len(), 4);
    assert_eq!(
        rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![0, 0, 2, 2]
    );
}

#[test]
fn cli_errors_name_what_and_where() {
    let tmp = tempfile::tempdir().unwrap();
    // A truncated dataset file: the error names the file and the byte offset.
    let dir = tmp.path().join("cifar-10-batches-bin");
    std::fs::create_dir_all(&dir).unwrap();
    let mut rec = vec![3u8];
    rec.extend(image(9));
    let mut bytes = rec.repeat(3);
    bytes.truncate(3073 * 2 + 100);
    std::fs::write(dir.join("test_batch.bin"), &bytes).unwrap();
    let out = bin()
        .args(["export", "--split", "test", "--out"])
        .arg(tmp.path().join("o.parquet"))
        .arg("--source")
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("test_batch.bin") && err.contains("6146"),
        "{err}"
    );

    // A source that never connects.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let out = bin()
        .args(["-q", "export", "--connect-timeout", "0.2", "--out"])
        .arg(tmp.path().join("n.parquet"))
        .arg("--source")
        .arg(format!("tcp://127.0.0.1:{port}"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("gave up"), "{err}");

    // Unknown format and unreadable stream start.
    let capture = tmp.path().join("junk.txt");
    std::fs::write(&capture, "hello world\n").unwrap();
    let out = bin()
        .args(["export", "--out"])
        .arg(tmp.path().join("j.parquet"))
        .arg("--source")
        .arg(format!("file:{}", capture.display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot tell the wire format"), "{err}");
}
