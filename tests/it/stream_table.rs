//! The source as DataFusion's streaming table `stream`: one long-running query consumes it.

use std::io::Write;
use std::net::TcpListener;
use std::time::Duration;

use arrow::array::{Array, UInt16Array, UInt64Array};
use cifar_df::query;
use cifar_df::source::table::register_stream;
use cifar_df::source::{self, SourceOptions, SourceSpec};
use cifar_df::wire::spark_json;
use futures::StreamExt;

fn opts() -> SourceOptions {
    SourceOptions {
        batch_size: 50,
        ..SourceOptions::default()
    }
}

#[tokio::test]
async fn sql_aggregates_a_bounded_source() {
    let ctx = query::session();
    let spec = SourceSpec::parse("synthetic:300:0:3").unwrap();
    let report = register_stream(&ctx, source::open(&spec, &opts()).unwrap(), true).unwrap();
    let batches = query::run(
        &ctx,
        "SELECT count(*) AS n, count(DISTINCT batch) AS b, max(\"row\") AS r FROM stream",
    )
    .await
    .unwrap();
    let text = query::format_batches(&batches, query::OutputFormat::Csv).unwrap();
    assert_eq!(text, "n,b,r\n300,6,49\n");
    assert_eq!(report.snapshot().images, 300);
    // A source is read once.
    let err = query::run(&ctx, "SELECT count(*) FROM stream")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already been read"), "{err}");
}

#[tokio::test]
async fn a_live_tcp_stream_is_consumed_batch_by_batch() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut released = false;
        for b in 0..4u8 {
            let mut line = Vec::new();
            spark_json::encode(
                &[u16::from(b), u16::from(9 - b)],
                &vec![b; 2 * 3072],
                &mut line,
            );
            s.write_all(&line).unwrap();
            s.flush().unwrap();
            if b == 1 {
                // Hold the rest back until the consumer has seen the first batches.
                released = go_rx.recv_timeout(Duration::from_secs(20)).is_ok();
            }
        }
        released
    });
    let ctx = query::stream_session();
    let spec = SourceSpec::parse(&format!("tcp://127.0.0.1:{port}")).unwrap();
    register_stream(&ctx, source::open(&spec, &opts()).unwrap(), false).unwrap();
    let df = ctx.sql("SELECT batch, label FROM stream").await.unwrap();
    let mut stream = df.execute_stream().await.unwrap();
    let mut seen = Vec::new();
    while let Some(b) = stream.next().await {
        let b = b.unwrap();
        let batch = b.column(0).as_any().downcast_ref::<UInt64Array>().unwrap();
        let label = b.column(1).as_any().downcast_ref::<UInt16Array>().unwrap();
        seen.extend((0..b.num_rows()).map(|i| (batch.value(i), label.value(i))));
        if seen.len() == 4 {
            // The query yields results while the connection is still open.
            go_tx.send(()).unwrap();
        }
    }
    assert!(
        server.join().unwrap(),
        "the query must yield the first batches while the connection is open"
    );
    // Batch b holds labels b and 9 - b, in order.
    let want: Vec<(u64, u16)> = (0..4u16)
        .flat_map(|b| [(b as u64, b), (b as u64, 9 - b)])
        .collect();
    assert_eq!(seen, want);
}

#[tokio::test]
async fn limit_ends_the_query_early() {
    let ctx = query::session();
    let spec = SourceSpec::parse("synthetic:1000:0:1").unwrap();
    let o = SourceOptions {
        epochs: None, // endless
        ..opts()
    };
    register_stream(&ctx, source::open(&spec, &o).unwrap(), false).unwrap();
    let batches = query::run(&ctx, "SELECT label FROM stream LIMIT 120")
        .await
        .unwrap();
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 120);
}
