//! Kafka source and sink against a real Kafka-protocol broker (Tansu; see
//! `tests/common/broker.rs`): round trips in each format and over several partitions, the
//! partition and offset columns, offsets in the checkpoint with a `kill -9` and a resume that
//! ends bit-identical, many readers, and the bad-input cases of issue 12.

use crate::common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::broker::{self, Broker};
use common::{
    bin, fails, kill_after_checkpoints, query_csv, query_value, read_parquet, resume_run, run_ok,
    wait_ok,
};

/// Publishes `data`'s training split to `topic` with `stream --to`.
fn publish(b: &Broker, topic: &str, data: &str, extra: &[&str]) {
    run_ok(
        bin()
            .args(["-q", "stream", "--data", data, "--to"])
            .arg(b.url(topic))
            .args(extra),
    );
}

/// `export --source SOURCE --out OUT`, not run yet.
fn export_cmd(source: &str, out: &std::path::Path) -> Command {
    let mut cmd = bin();
    cmd.args(["export", "--source", source, "--out"]).arg(out);
    cmd
}

/// Exports a source to `out` (a `.parquet` file).
fn export(source: &str, out: &std::path::Path, extra: &[&str]) -> String {
    run_ok(
        export_cmd(source, out)
            .args(["--connect-timeout", "10"])
            .args(extra),
    )
    .1
}

/// `train_args` with `extra` after them, spawned with stdout discarded and stderr piped.
fn spawn_train(args: &[String], extra: &[&str]) -> std::process::Child {
    bin()
        .args(args)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// (batch, row, label, image) of the images in a Parquet export, without the numbering.
fn images(path: &std::path::Path) -> Vec<(u16, Vec<u8>)> {
    read_parquet(path)
        .into_iter()
        .map(|(_, _, l, i)| (l, i))
        .collect()
}

#[test]
fn a_dataset_goes_through_a_topic_unchanged_in_each_format() {
    let Some(b) = broker::shared("kafka round trip") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = "synthetic:950:10:4";
    let direct = dir.path().join("direct.parquet");
    export(data, &direct, &["--batch-size", "100"]);
    let want = images(&direct);
    assert_eq!(want.len(), 950);
    for format in ["spark-json", "arrow", "ndjson"] {
        let topic = broker::topic(&format!("round-{format}"));
        publish(
            &b,
            &topic,
            data,
            &["--batch-size", "100", "--format", format],
        );
        let back = dir.path().join(format!("{format}.parquet"));
        let summary = export(&b.url(&topic), &back, &[]);
        assert!(summary.contains(&format!("({format})")), "{summary}");
        assert_eq!(
            images(&back),
            want,
            "{format}: images differ after the topic"
        );
        // Each batch keeps its partition and offset: one partition, offsets 0..9 in order.
        let rows = read_batch_positions(&back);
        let batches: Vec<(u64, i32, i64)> = rows.iter().step_by(100).cloned().collect();
        assert_eq!(
            batches,
            (0..10).map(|i| (i, 0, i as i64)).collect::<Vec<_>>(),
            "{format}"
        );
    }
}

/// Images of another side than 32×32 (`--image-size 40`) go through a topic unchanged in
/// the formats that carry them, and a reader expecting 32×32 rejects every record, naming
/// both sides; spark-json (the original's format) is refused before anything is sent.
#[test]
fn images_of_another_side_go_through_a_topic_in_ndjson_and_arrow() {
    let Some(b) = broker::shared("kafka image size") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = "synthetic:120:10:6";
    let size = ["--image-size", "40"];
    let direct = dir.path().join("direct.parquet");
    export(
        data,
        &direct,
        &[&["--batch-size", "40"][..], &size[..]].concat(),
    );
    let want = images(&direct);
    assert_eq!(want.len(), 120);
    assert!(want.iter().all(|(_, px)| px.len() == 3 * 40 * 40));
    for format in ["arrow", "ndjson"] {
        let topic = broker::topic(&format!("side-{format}"));
        publish(
            &b,
            &topic,
            data,
            &[&["--batch-size", "40", "--format", format][..], &size[..]].concat(),
        );
        let back = dir.path().join(format!("{format}.parquet"));
        export(&b.url(&topic), &back, &size);
        assert_eq!(
            images(&back),
            want,
            "{format}: images differ after the topic"
        );
        let stderr = export(
            &b.url(&topic),
            &dir.path().join(format!("{format}-32")),
            &[],
        );
        assert!(
            stderr.contains("3 rejected") && stderr.contains("--image-size"),
            "{format}: {stderr}"
        );
    }
    let e = fails(
        bin()
            .args(["stream", "--data", data, "--image-size", "40", "--to"])
            .arg(b.url(&broker::topic("side-spark"))),
    );
    assert!(
        e.contains("spark-json") && e.contains("ndjson or arrow"),
        "{e}"
    );
}

/// (batch, partition, offset) of every row of a Kafka export.
fn read_batch_positions(path: &std::path::Path) -> Vec<(u64, i32, i64)> {
    use arrow::array::{Array, Int32Array, Int64Array, UInt64Array};
    let file = std::fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.unwrap();
        let col = |name: &str| batch.column_by_name(name).unwrap().clone();
        let b = col("batch");
        let b = b.as_any().downcast_ref::<UInt64Array>().unwrap();
        let p = col("partition");
        let p = p.as_any().downcast_ref::<Int32Array>().unwrap();
        let o = col("offset");
        let o = o.as_any().downcast_ref::<Int64Array>().unwrap();
        for i in 0..batch.num_rows() {
            out.push((b.value(i), p.value(i), o.value(i)));
        }
    }
    out
}

#[test]
fn several_partitions_are_read_in_turn_in_the_published_order() {
    let Some(b) = broker::shared("kafka partitions") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = "synthetic:1000:10:5";
    let direct = dir.path().join("direct.parquet");
    export(data, &direct, &["--batch-size", "50"]);
    let topic = broker::topic("three");
    // A missing topic is created with the partitions named; batch n goes to partition n mod 3.
    run_ok(
        bin()
            .args(["-q", "export", "--source", data, "--batch-size", "50"])
            .arg("--to")
            .arg(format!("{}?partitions=0,1,2", b.url(&topic)))
            .args(["--to-format", "arrow"]),
    );
    let back = dir.path().join("back.parquet");
    export(&b.url(&topic), &back, &[]);
    assert_eq!(
        images(&back),
        images(&direct),
        "round robin restores the order"
    );
    let pos: Vec<(u64, i32, i64)> = read_batch_positions(&back)
        .into_iter()
        .step_by(50)
        .collect();
    assert_eq!(
        pos,
        (0..20u64)
            .map(|i| (i, (i % 3) as i32, (i / 3) as i64))
            .collect::<Vec<_>>()
    );
    // One partition alone, from an offset.
    let one = dir.path().join("one.parquet");
    export(
        &format!("{}?partitions=1&start=2", b.url(&topic)),
        &one,
        &[],
    );
    let pos: Vec<(u64, i32, i64)> = read_batch_positions(&one).into_iter().step_by(50).collect();
    // Partition 1 holds batches 1, 4, .., 19 at offsets 0..6.
    assert_eq!(
        pos,
        (0..5).map(|i| (i, 1, i as i64 + 2)).collect::<Vec<_>>()
    );
    // start=latest without --follow: nothing after the end seen at the start.
    let none = dir.path().join("none.parquet");
    export(&format!("{}?start=latest", b.url(&topic)), &none, &[]);
    assert_eq!(common::parquet_rows(&none), 0);
}

fn train_args(runs: &std::path::Path, run: &str, source: &str) -> Vec<String> {
    [
        "-q",
        "train",
        "--model",
        "mlp",
        "--hidden",
        "32",
        "--source",
        source,
        "--batch-size",
        "50",
        "--checkpoint-every",
        "7",
        "--no-plots",
        "--run",
        run,
        "--runs",
        runs.to_str().unwrap(),
        "--connect-timeout",
        "10",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The per-batch training metrics of a run, as text.
fn train_metrics(runs: &std::path::Path, run: &str) -> String {
    query_csv(
        runs,
        &format!(
            "select batch, images, acc, loss, f1, acc_mean, loss_window, drift from metrics \
             where run = '{run}' order by batch"
        ),
    )
}

fn checkpoint_bytes(runs: &std::path::Path, run: &str, name: &str) -> Vec<u8> {
    let dir = runs.join(run).join("checkpoints").join(name);
    std::fs::read(dir.join("model.safetensors")).unwrap_or_else(|e| panic!("{run}/{name}: {e}"))
}

#[test]
fn a_run_killed_mid_topic_resumes_from_its_checkpointed_offsets_bit_identical() {
    let Some(b) = broker::shared("kafka kill -9 and resume") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let topic = broker::topic("resume");
    publish(&b, &topic, "synthetic:6000:10:6", &["--batch-size", "50"]);
    let url = b.url(&topic);
    run_ok(bin().args(train_args(&runs, "whole", &url)));
    // 120 batches at ≥ 20 ms each: killed after a few checkpoints, well before the end.
    let ckpts = runs.join("killed/checkpoints");
    kill_after_checkpoints(
        bin()
            .args(train_args(&runs, "killed", &url))
            .args(["--sleep", "0.02"]),
        &ckpts,
        3,
    );
    let partial: usize = query_value(&runs, "select count(*) from metrics where run = 'killed'");
    assert!(partial < 120, "{partial} batches before the kill");
    // The checkpoint holds the topic's next offset, which the resume seeks to.
    let state: serde_json::Value = {
        let mut names: Vec<_> = std::fs::read_dir(&ckpts)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.join("state.json").is_file())
            .collect();
        names.sort();
        serde_json::from_slice(&std::fs::read(names.last().unwrap().join("state.json")).unwrap())
            .unwrap()
    };
    let next = state["next_batch"].as_u64().unwrap();
    assert_eq!(
        state["source_offsets"],
        serde_json::json!([[0, next]]),
        "one partition: the next offset is the next batch"
    );
    let (out, _) = run_ok(&mut resume_run(&runs, "killed"));
    assert!(out.contains("resumed from"), "{out}");
    assert_eq!(
        query_csv(
            &runs,
            "select count(*) as n, count(distinct batch) as b from metrics where run = 'killed'"
        ),
        "n,b\n120,120\n"
    );
    assert_eq!(
        train_metrics(&runs, "killed"),
        train_metrics(&runs, "whole")
    );
    assert_eq!(
        checkpoint_bytes(&runs, "killed", "epoch-1"),
        checkpoint_bytes(&runs, "whole", "epoch-1"),
        "the resumed model ends bit-identical"
    );
    // `predict` reads a topic too: every batch scored once.
    run_ok(bin().args([
        "-q",
        "predict",
        "--run",
        "whole",
        "--runs",
        runs.to_str().unwrap(),
        "--source",
        &url,
    ]));
    assert_eq!(
        query_csv(
            &runs,
            "select count(*) as n, count(distinct batch) as b, sum(images) as i from \
             eval_metrics where run = 'whole'"
        ),
        "n,b,i\n120,120,6000\n"
    );
}

#[test]
fn readers_of_one_topic_each_read_all_of_it_at_their_own_pace() {
    let Some(b) = broker::shared("kafka many readers") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let topic = broker::topic("readers");
    publish(&b, &topic, "synthetic:3000:10:7", &["--batch-size", "50"]);
    let url = b.url(&topic);
    // Two trainers at once, one slowed down; a third after both.
    let slow = spawn_train(&train_args(&runs, "slow", &url), &["--sleep", "0.01"]);
    let fast = spawn_train(&train_args(&runs, "fast", &url), &[]);
    for (child, what) in [(fast, "fast"), (slow, "slow")] {
        wait_ok(child, what);
    }
    run_ok(bin().args(train_args(&runs, "later", &url)));
    let whole = train_metrics(&runs, "fast");
    assert_eq!(whole.lines().count(), 61, "60 batches and a header");
    assert_eq!(train_metrics(&runs, "slow"), whole);
    assert_eq!(train_metrics(&runs, "later"), whole);
}

#[test]
fn a_growing_topic_is_followed_until_ctrl_c() {
    let Some(b) = broker::shared("kafka --follow") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let topic = broker::topic("follow");
    publish(&b, &topic, "synthetic:500:10:8", &["--batch-size", "50"]);
    let mut args = train_args(&runs, "f", &b.url(&topic));
    args.push("--follow".into());
    let child = bin()
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let metrics_rows = || {
        std::panic::catch_unwind(|| {
            query_value::<usize>(&runs, "select count(*) from metrics where run = 'f'")
        })
        .unwrap_or(0)
    };
    // Published after the trainer started: read too.
    publish(&b, &topic, "synthetic:500:10:9", &["--batch-size", "50"]);
    // The trainer commits its rows at checkpoints (every 7 batches): wait for 14.
    let t = Instant::now();
    while metrics_rows() < 14 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the follower learnt nothing"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Ctrl-C: checkpoints what it learnt (all 20 batches) and stops.
    std::thread::sleep(Duration::from_millis(1500));
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(130),
        "stopped by a signal\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("interrupted: continue with"), "{stdout}");
    assert_eq!(metrics_rows(), 20, "{stderr}");
}

#[test]
fn a_broker_that_is_down_is_retried_until_the_connect_timeout() {
    let port = broker::free_port();
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let err = fails(
        export_cmd(
            &format!("kafka://127.0.0.1:{port}/nothing"),
            &dir.path().join("x.parquet"),
        )
        .args(["--connect-timeout", "2"]),
    );
    let secs = t.elapsed().as_secs_f64();
    assert!(
        err.contains(&format!(
            "cannot reach the Kafka broker 127.0.0.1:{port} within 2 s"
        )),
        "{err}"
    );
    assert!((1.9..30.0).contains(&secs), "gave up after {secs} s");
    assert_eq!(err.matches("cannot reach").count(), 1, "said once: {err}");
    // The sink too.
    let err = fails(
        bin()
            .args([
                "stream",
                "--data",
                "synthetic:10:0",
                "--connect-timeout",
                "2",
                "--to",
            ])
            .arg(format!("kafka://127.0.0.1:{port}/nothing")),
    );
    assert!(err.contains("cannot reach the Kafka broker"), "{err}");
}

#[test]
fn an_unknown_topic_or_partition_is_named() {
    let Some(b) = broker::shared("kafka unknown topic") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();

    let err = fails(&mut export_cmd(
        &b.url(&broker::topic("no-such-topic")),
        &dir.path().join("x1.parquet"),
    ));
    assert!(
        err.contains("the broker has no topic \"no-such-topic-"),
        "{err}"
    );
    let topic = broker::topic("two-parts");
    publish(&b, &topic, "synthetic:100:0", &["--batch-size", "50"]);
    let err = fails(&mut export_cmd(
        &format!("{}?partitions=0,5", b.url(&topic)),
        &dir.path().join("x2.parquet"),
    ));
    assert!(
        err.contains("partition 5 does not exist (the topic has partitions 0..0)"),
        "{err}"
    );
    let err = fails(&mut export_cmd(
        &format!("{}?start=99", b.url(&topic)),
        &dir.path().join("x3.parquet"),
    ));
    assert!(
        err.contains("start offset 99 is not on the broker, which keeps offsets 0..2"),
        "{err}"
    );
}

/// Produces raw record values with rdkafka (the test's own producer).
fn produce_raw(addr: &str, topic: &str, values: &[Vec<u8>]) {
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", addr)
        .set("message.max.bytes", "100000000")
        // One record per produce request: Tansu 0.6 gives a request of several records one
        // offset (see src/sink/kafka.rs).
        .set("batch.num.messages", "1")
        .create()
        .unwrap();
    for (i, v) in values.iter().enumerate() {
        let key = i.to_string();
        p.send(BaseRecord::to(topic).key(&key).payload(v).partition(0))
            .map_err(|(e, _)| e)
            .unwrap();
        p.poll(Duration::ZERO);
    }
    p.flush(Duration::from_secs(30)).unwrap();
}

#[test]
fn a_record_that_does_not_decode_is_rejected_with_partition_and_offset() {
    let Some(b) = broker::shared("kafka bad records") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let topic = broker::topic("bad-records");
    // Three good batches of two images, with bad records between them.
    publish(&b, &topic, "synthetic:2:0:1", &["--batch-size", "2"]);
    let good = dir.path().join("good.parquet");
    export(&b.url(&topic), &good, &[]);
    // A valid spark-json batch of two images, from the library's encoder.
    let mut line = Vec::new();
    let pixels: Vec<u8> = (0..2 * 3072).map(|i| (i % 256) as u8).collect();
    cifar_df::wire::spark_json::encode(&[3, 4], &pixels, &mut line);
    let line = line.trim_ascii_end().to_vec();
    let mut truncated = line.clone();
    truncated.truncate(line.len() / 2);
    let bad_label = String::from_utf8(line.clone())
        .unwrap()
        .replacen("\"label\": ", "\"label\": 1", 1)
        .into_bytes();
    produce_raw(
        &b.addr,
        &topic,
        &[
            b"hello".to_vec(),
            truncated,
            bad_label,
            line.clone(),
            b"{}".to_vec(),
        ],
    );
    let out = dir.path().join("all.parquet");
    let stderr = export(&b.url(&topic), &out, &[]);
    // Offsets 0 (published), 1..3 bad, 4 good, 5 empty.
    for (offset, what) in [(1, "no known format"), (2, ""), (3, "label")] {
        let needle = format!("(partition 0, offset {offset}): ");
        let at = stderr
            .find(&needle)
            .unwrap_or_else(|| panic!("offset {offset}: {stderr}"));
        assert!(
            stderr[at..].lines().next().unwrap().contains(what),
            "{stderr}"
        );
    }
    assert!(stderr.contains("3 rejected"), "{stderr}");
    assert_eq!(common::parquet_rows(&out), 4, "the two good batches");
    let pos: Vec<(u64, i32, i64)> = read_batch_positions(&out).into_iter().step_by(2).collect();
    assert_eq!(pos, vec![(0, 0, 0), (4, 0, 4)]);
}

#[test]
fn a_broker_that_goes_away_is_waited_for_and_read_on_from_the_last_offset() {
    let Some((b, proxy)) = broker::behind_proxy("kafka broker away") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let topic = broker::topic("away");
    publish(&b, &topic, "synthetic:6000:10:10", &["--batch-size", "50"]);
    let url = b.url(&topic);
    run_ok(bin().args(train_args(&runs, "whole", &url)));
    let mut args = train_args(&runs, "cut", &url);
    args.retain(|a| a != "-q"); // the warnings are the point
    let child = spawn_train(&args, &["--sleep", "0.05"]);
    std::thread::sleep(Duration::from_millis(1200));
    proxy.cut();
    std::thread::sleep(Duration::from_secs(4));
    proxy.heal();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("does not answer; retrying"), "{stderr}");
    assert!(
        stderr.contains("answers again; reading on from partition 0 offset"),
        "{stderr}"
    );
    // Every batch once, and the same run as without the outage.
    assert_eq!(train_metrics(&runs, "cut"), train_metrics(&runs, "whole"));
}

#[test]
fn a_broker_that_loses_the_topic_interrupts_the_run_and_a_stale_checkpoint_is_refused() {
    let Some(mut b) = broker::own("kafka broker lost") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let topic = "lost";
    // 120 batches (350 MB of spark-json): more than the reader prefetches (about one
    // 64 MiB fetch), so the run still needs the broker when it restarts.
    publish(&b, topic, "synthetic:6000:10:11", &["--batch-size", "50"]);
    let url = b.url(topic);
    let mut args = train_args(&runs, "r", &url);
    let at = args.iter().position(|a| a == "--connect-timeout").unwrap();
    args[at + 1] = "3".into();
    args.retain(|a| a != "-q");
    let child = spawn_train(&args, &["--sleep", "0.05"]);
    std::thread::sleep(Duration::from_millis(1500));
    // The broker restarts empty (memory storage): what the run needs next is gone.
    b.restart();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}: {stderr}", out.status);
    // The broker answers again, without the records the run needs next: it has no such
    // partition, or (Tansu, once asked for it) an empty one.
    assert!(
        stderr.contains("was it restarted without its data?")
            && (stderr.contains("the broker no longer has this partition")
                || stderr.contains("which now keeps offsets 0..0")),
        "{stderr}"
    );
    assert_eq!(
        query_csv(&runs, "select status from runs where run = 'r'"),
        "status\ninterrupted\n"
    );
    // A smaller topic of the same name: the checkpoint's offsets are past its end.
    publish(&b, topic, "synthetic:100:10:11", &["--batch-size", "50"]);
    let err = fails(&mut resume_run(&runs, "r"));
    assert!(
        err.contains("the checkpoint's next offset") && err.contains("which keeps offsets 0..2"),
        "{err}"
    );
}
