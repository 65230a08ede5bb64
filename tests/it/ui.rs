//! `cifar-df ui`: every endpoint over a real runs folder (JSON shape, downsampling, bad
//! input), the event stream announcing a new run, an empty or missing folder, a port in use,
//! and the page in a real headless browser (tests/ref/ui_browser.py, selenium + chromium)
//! where one is installed.

use crate::common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{available, bin, png_decode, run_ok};
use serde_json::Value;

/// A `cifar-df ui` on a free port, killed when dropped.
struct Ui {
    child: Child,
    port: u16,
}

impl Ui {
    fn start(runs: &Path, extra: &[&str]) -> Ui {
        let mut child = bin()
            .args(["ui", "--listen", "127.0.0.1:0", "--runs"])
            .arg(runs)
            .args(extra)
            .env_remove("CIFAR_DF_UI_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .split("127.0.0.1:")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        Ui { child, port }
    }

    /// One HTTP/1.1 request from this machine (`Host: 127.0.0.1:PORT`); the status and
    /// the body.
    fn request(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let (status, _, body) = self.raw(method, path, &[], body);
        (status, body)
    }

    /// The SQL box's request: a POST of `{"q": sql}` as JSON.
    fn sql(&self, path: &str, sql: &str) -> (u16, String) {
        let body = serde_json::json!({ "q": sql }).to_string();
        let (status, _, body) =
            self.raw("POST", path, &[("Content-Type", "application/json")], &body);
        (status, body)
    }

    /// One request with `headers` (a `Host` among them replaces this machine's); the
    /// status, the head and the body.
    fn raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, String, String) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let mut head = format!("{method} {path} HTTP/1.1\r\n");
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            head.push_str(&format!("Host: 127.0.0.1:{}\r\n", self.port));
        }
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        write!(
            s,
            "{head}Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, rest) = text.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(rest)
        } else {
            rest.to_string()
        };
        (status, head.to_string(), body)
    }

    fn json(&self, path: &str) -> Value {
        let (status, body) = self.request("GET", path, "");
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }
}

impl Drop for Ui {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

fn train(runs: &Path, run: &str, extra: &[&str]) {
    run_ok(
        bin()
            .args([
                "-q",
                "train",
                "--data",
                "synthetic:600:200:3",
                "--batch-size",
                "20",
            ])
            .args(["--model", "logreg", "--no-plots", "--run", run, "--runs"])
            .arg(runs)
            .args(extra),
    );
}

/// `cifar-df train` of `logreg` on `data` in batches of 10, paused `sleep` seconds after each
/// batch (a run slow enough to watch), with `extra` flags; stdout discarded.
fn slow_training(runs: &Path, run: &str, data: &str, sleep: &str, extra: &[&str]) -> Command {
    let mut cmd = bin();
    cmd.args(["train", "--data", data, "--batch-size", "10"])
        .args(["--model", "logreg", "--no-plots", "--run", run])
        .args(["--sleep", sleep])
        .args(extra)
        .arg("--runs")
        .arg(runs)
        .stdout(Stdio::null());
    cmd
}

#[test]
fn every_endpoint_answers_over_a_runs_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    train(&runs, "alpha", &["--epochs", "2"]);
    train(&runs, "beta", &[]);
    let ui = Ui::start(&runs, &[]);

    // The page and its files, from the binary.
    let (status, page) = ui.request("GET", "/", "");
    assert_eq!(status, 200);
    assert!(page.contains("<script src=\"/app.js\">"), "{page}");
    for path in ["/app.js", "/uPlot.js", "/uPlot.css", "/uPlot.LICENSE"] {
        let (status, body) = ui.request("GET", path, "");
        assert_eq!(status, 200, "{path}");
        assert!(body.len() > 500, "{path}: {} bytes", body.len());
    }

    // Runs: both, newest first, with their images and test accuracy; the filter is a regex.
    let r = ui.json("/api/runs");
    let list = r["runs"].as_array().unwrap();
    let names: Vec<&str> = list.iter().map(|r| r["run"].as_str().unwrap()).collect();
    assert_eq!(names, ["beta", "alpha"]);
    assert_eq!(list[1]["images"], 1200);
    assert_eq!(list[1]["status"], "finished");
    assert!(list[1]["test_acc"].as_f64().unwrap() > 0.3, "{r}");
    let r = ui.json("/api/runs?filter=%5Eal");
    assert_eq!(r["runs"].as_array().unwrap().len(), 1);
    let (status, body) = ui.request("GET", "/api/runs?filter=(", "");
    assert_eq!(status, 400);
    assert!(body.contains("filter"), "{body}");

    // Curves: every batch where there are few, the extremes where there are many.
    let r = ui.json("/api/curves?run=alpha,beta&metric=loss");
    let curves = r["curves"].as_array().unwrap();
    assert_eq!(curves[0]["total"], 60);
    assert_eq!(curves[0]["x"].as_array().unwrap().len(), 60);
    assert_eq!(curves[1]["total"], 30);
    let r = ui.json("/api/curves?run=alpha&points=10");
    let x = r["curves"][0]["x"].as_array().unwrap();
    assert!(x.len() <= 10 && x.len() >= 6, "{r}");
    let r = ui.json("/api/curves?run=alpha&x=images&from=300&to=600");
    let x: Vec<f64> = r["curves"][0]["x"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(x.first(), Some(&300.0));
    assert_eq!(x.last(), Some(&600.0));
    let r = ui.json("/api/curves?run=alpha&x=time&metric=images_per_s");
    assert!(r["curves"][0]["y"][0].as_f64().unwrap() > 0.0, "{r}");
    for bad in [
        "/api/curves?run=alpha&metric=drop",
        "/api/curves?run=alpha&x=sideways",
        "/api/curves?run=",
    ] {
        let (status, body) = ui.request("GET", bad, "");
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body.contains("error"), "{bad}: {body}");
    }

    // Test results and the confusion matrix, which sums to the test split.
    let r = ui.json("/api/results");
    assert_eq!(r["results"].as_array().unwrap().len(), 2);
    assert_eq!(r["results"][0]["images"], 200);
    // The server keeps each run's results until its eval_metrics change: a new test pass
    // of beta (on a test split of 100 images; it replaces the last) shows at once.
    run_ok(
        bin()
            .args([
                "-q",
                "predict",
                "--run",
                "beta",
                "--data",
                "synthetic:600:100:3",
            ])
            .arg("--runs")
            .arg(&runs),
    );
    let r = ui.json("/api/results");
    assert_eq!(r["results"][0]["run"], "alpha");
    assert_eq!(r["results"][0]["images"], 200);
    assert_eq!(r["results"][1]["run"], "beta");
    assert_eq!(r["results"][1]["images"], 100);
    let r = ui.json("/api/confusion?run=alpha");
    assert_eq!(r["classes"].as_array().unwrap().len(), 10);
    let total: u64 = r["counts"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap())
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(total, 200);

    // SQL: rows as JSON, errors as 400 with the engine's message, the whole result as CSV.
    let (status, body) = ui.sql(
        "/api/sql",
        "select run, count(*) as n from metrics group by run order by run",
    );
    assert_eq!(status, 200, "{body}");
    let r: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(r["columns"], serde_json::json!(["run", "n"]));
    assert_eq!(r["rows"], serde_json::json!([["alpha", 60], ["beta", 30]]));
    let (status, body) = ui.sql("/api/sql", "select nope from metrics");
    assert_eq!(status, 400);
    assert!(body.contains("nope"), "{body}");
    let (status, csv) = ui.sql(
        "/api/sql.csv",
        "select batch from metrics where run = 'beta'",
    );
    assert_eq!(status, 200);
    assert_eq!(csv.lines().count(), 31, "{csv}");
    // No rows: the header alone.
    let (status, csv) = ui.sql(
        "/api/sql.csv",
        "select batch from metrics where run = 'none'",
    );
    assert_eq!((status, csv.as_str()), (200, "batch\n"));
}

/// Whether `dir` holds any file (a written `COPY` target) anywhere below it.
fn written(dir: &Path, name: &str) -> bool {
    std::fs::read_dir(dir).unwrap().flatten().any(|e| {
        let p = e.path();
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().contains(name))
            || (p.is_dir() && written(&p, name))
    })
}

#[test]
fn the_dashboard_only_reads_and_only_answers_its_own_pages() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    train(&runs, "alpha", &[]);
    let ui = Ui::start(&runs, &[]);
    let target = tmp.path().join("pwned.csv");
    let copy = format!(
        "COPY (select 42 as pwned) TO '{}' STORED AS CSV",
        target.display()
    );
    let encoded: String = url::form_urlencoded::byte_serialize(copy.as_bytes()).collect();

    // The issue's first curl: SQL in a URL, by GET. Not run.
    let (status, body) = ui.request("GET", &format!("/api/sql.csv?q={encoded}"), "");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("POST"), "{body}");
    assert_eq!(
        ui.request("GET", &format!("/api/sql?q={encoded}"), "").0,
        400
    );
    // The second: a POST from another site's page. Refused before anything is read.
    let (status, _, body) = ui.raw(
        "POST",
        "/api/sql",
        &[("Origin", "http://evil.example")],
        &copy,
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("evil.example"), "{body}");
    // From the page itself, but as text (what another site can send without asking): 415.
    let (status, _, body) = ui.raw("POST", "/api/sql", &[("Content-Type", "text/plain")], &copy);
    assert_eq!(status, 415, "{body}");
    // As JSON, from here: the SQL is read-only, and says so.
    for sql in [
        copy.clone(),
        format!("EXPLAIN ANALYZE {copy}"),
        "CREATE TABLE x AS SELECT 1".to_string(),
        format!(
            "CREATE EXTERNAL TABLE e STORED AS CSV LOCATION '{}'",
            tmp.path().join("e.csv").display()
        ),
        "SET datafusion.execution.batch_size = 1".to_string(),
        "DROP TABLE metrics".to_string(),
    ] {
        for path in ["/api/sql", "/api/sql.csv"] {
            let (status, body) = ui.sql(path, &sql);
            assert_eq!(status, 400, "{path} {sql}: {body}");
            assert!(body.contains("read-only"), "{path} {sql}: {body}");
        }
    }
    assert!(!written(tmp.path(), "pwned"), "a file was written");
    assert!(!tmp.path().join("e.csv").exists());
    // The tables are all still there.
    let (status, body) = ui.sql("/api/sql", "select count(*) as n from metrics");
    assert_eq!(status, 200, "{body}");

    // Another Host (DNS rebinding: a page whose name now points here), another address, or
    // a cross-site fetch: 403 on every path, the page included.
    for host in [
        format!("evil.example:{}", ui.port),
        format!("10.9.8.7:{}", ui.port),
        "evil.example".to_string(),
    ] {
        for path in ["/", "/api/runs", "/app.js"] {
            let (status, _, body) = ui.raw("GET", path, &[("Host", &host)], "");
            assert_eq!(status, 403, "{host}{path}: {body}");
        }
    }
    let (status, _, _) = ui.raw(
        "GET",
        "/api/runs",
        &[("Host", &format!("localhost:{}", ui.port))],
        "",
    );
    assert_eq!(status, 200);
    for origin in ["http://localhost:3000", "null", "https://evil.example"] {
        let (status, _, _) = ui.raw("GET", "/api/runs", &[("Origin", origin)], "");
        assert_eq!(status, 403, "{origin}");
    }
    let own = format!("http://127.0.0.1:{}", ui.port);
    let (status, _, _) = ui.raw("GET", "/api/runs", &[("Origin", &own)], "");
    assert_eq!(status, 200);
    let (status, _, _) = ui.raw("GET", "/api/runs", &[("Sec-Fetch-Site", "cross-site")], "");
    assert_eq!(status, 403);
    // A link from another site opens the page (its data comes by its own requests); an
    // SSH tunnel from another local port reaches it by a loopback name.
    let link = [
        ("Sec-Fetch-Site", "cross-site"),
        ("Sec-Fetch-Mode", "navigate"),
    ];
    assert_eq!(ui.raw("GET", "/", &link, "").0, 200);
    assert_eq!(ui.raw("GET", "/api/runs", &link, "").0, 403);
    let tunnel = [
        ("Host", "localhost:9000"),
        ("Origin", "http://localhost:9000"),
    ];
    assert_eq!(ui.raw("GET", "/api/runs", &tunnel, "").0, 200);

    // Every answer says what the browser may do with it.
    for path in ["/", "/app.js", "/api/runs", "/nothing"] {
        let (_, head, _) = ui.raw("GET", path, &[], "");
        let head = head.to_ascii_lowercase();
        assert!(
            head.contains("x-content-type-options: nosniff"),
            "{path}: {head}"
        );
        assert!(
            head.contains("content-security-policy: default-src 'none'; script-src 'self'"),
            "{path}: {head}"
        );
        assert!(head.contains("x-frame-options: deny"), "{path}: {head}");
    }

    // Run names are names, never paths; the confusion matrix is bounded by the run's
    // classes, and what lies beyond is said.
    for bad in ["../alpha", "alpha/../../x", ".hidden"] {
        let q: String = url::form_urlencoded::byte_serialize(bad.as_bytes()).collect();
        for path in ["/api/confusion", "/api/gallery", "/api/curves"] {
            let (status, body) = ui.request("GET", &format!("{path}?run={q}"), "");
            assert_eq!(status, 400, "{path} {bad}: {body}");
            assert!(body.contains("run name"), "{path} {bad}: {body}");
        }
    }
    let part = std::fs::read_dir(runs.join("alpha/confusion"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "parquet"))
        .unwrap();
    let schema = cifar_df::run::tables::confusion_schema();
    let far = arrow::record_batch::RecordBatch::try_new(
        schema,
        vec![
            std::sync::Arc::new(arrow::array::StringArray::from(vec!["alpha"])),
            std::sync::Arc::new(arrow::array::StringArray::from(vec!["test"])),
            std::sync::Arc::new(arrow::array::UInt32Array::from(vec![0])),
            std::sync::Arc::new(arrow::array::UInt64Array::from(vec![0])),
            std::sync::Arc::new(arrow::array::UInt16Array::from(vec![65535])),
            std::sync::Arc::new(arrow::array::UInt16Array::from(vec![65535])),
            std::sync::Arc::new(arrow::array::UInt64Array::from(vec![7])),
        ],
    )
    .unwrap();
    let extra = part.with_file_name("part-zz-extra.parquet");
    cifar_df::store::write_parquet_file(&extra, &[far]).unwrap();
    let c = ui.json("/api/confusion?run=alpha");
    assert_eq!(c["counts"].as_array().unwrap().len(), 10, "{c}");
    assert_eq!(c["dropped"], 7, "{c}");
    assert!(
        c["note"].as_str().unwrap().contains("outside the run's 10"),
        "{c}"
    );
}

#[test]
fn the_dashboards_sql_has_a_time_and_memory_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    std::fs::create_dir_all(&runs).unwrap();
    let ui = Ui::start(&runs, &["--sql-timeout", "1", "--sql-memory", "4M"]);
    let t = Instant::now();
    let (status, body) = ui.sql(
        "/api/sql",
        "select count(*) from generate_series(1, 100000000000)",
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("time limit of 1 s"), "{body}");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    let (status, body) = ui.sql(
        "/api/sql",
        "select value % 2000000 as k, count(*) from generate_series(1, 4000000) group by k",
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("Resources exhausted"), "{body}");
    // The server is still there for the next query.
    let (status, body) = ui.sql("/api/sql", "select 1 as one");
    assert_eq!(status, 200, "{body}");
}

#[test]
fn a_token_protected_dashboard_refuses_calls_without_it() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    train(&runs, "alpha", &[]);
    let token = "0123456789abcdef-token";
    let ui = Ui::start(&runs, &["--token", token]);
    for path in ["/", "/api/runs", "/api/curves?run=alpha", "/api/events"] {
        let (status, body) = ui.request("GET", path, "");
        assert_eq!(status, 401, "{path}: {body}");
    }
    let (status, body) = ui.sql("/api/sql", "select 1 as one");
    assert_eq!(status, 401, "{body}");
    let wrong = format!("Bearer {token}x");
    assert_eq!(
        ui.raw("GET", "/api/runs", &[("Authorization", &wrong)], "")
            .0,
        401
    );
    let bearer = format!("Bearer {token}");
    let (status, _, body) = ui.raw("GET", "/api/runs", &[("Authorization", &bearer)], "");
    assert_eq!(status, 200, "{body}");
    // The printed link: the token goes to a cookie, and the address loses it.
    let (status, head, _) = ui.raw("GET", &format!("/?token={token}"), &[], "");
    assert_eq!(status, 303, "{head}");
    assert!(
        head.lines().any(|l| l.eq_ignore_ascii_case("location: /")),
        "{head}"
    );
    let cookie = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("set-cookie: ")
                .or_else(|| l.strip_prefix("Set-Cookie: "))
        })
        .unwrap_or_else(|| panic!("no cookie: {head}"));
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap();
    let (status, _, page) = ui.raw("GET", "/", &[("Cookie", pair)], "");
    assert_eq!(status, 200);
    assert!(page.contains("/app.js"));
    let (status, _, body) = ui.raw(
        "POST",
        "/api/sql",
        &[("Cookie", pair), ("Content-Type", "application/json")],
        r#"{"q": "select count(*) as n from metrics"}"#,
    );
    assert_eq!(status, 200, "{body}");
    // A short token is refused at the start.
    let out = bin()
        .args([
            "ui",
            "--listen",
            "127.0.0.1:0",
            "--token",
            "short",
            "--runs",
        ])
        .arg(&runs)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 16"));
}

#[test]
fn the_event_stream_announces_a_new_run() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    std::fs::create_dir_all(&runs).unwrap();
    let ui = Ui::start(&runs, &[]);
    // An empty folder is an empty page that says so.
    let r = ui.json("/api/runs");
    assert_eq!(r["runs"].as_array().unwrap().len(), 0);
    assert!(r["note"].as_str().unwrap().contains("no runs"), "{r}");

    let mut s = TcpStream::connect(("127.0.0.1", ui.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\r\n",
        ui.port
    )
    .unwrap();
    let mut reader = BufReader::new(s);
    let mut events = Vec::new();
    let mut line = String::new();
    // The first event comes at once; the next when a run writes.
    let mut wait_event = |reader: &mut BufReader<TcpStream>, events: &mut Vec<String>| loop {
        line.clear();
        if reader.read_line(&mut line).unwrap() == 0 {
            panic!("the stream ended");
        }
        if let Some(d) = line.trim().strip_prefix("data: ") {
            events.push(d.to_string());
            return;
        }
    };
    wait_event(&mut reader, &mut events);
    let t = Instant::now();
    train(&runs, "gamma", &[]);
    wait_event(&mut reader, &mut events);
    assert!(events.len() == 2 && events[1] != events[0], "{events:?}");
    assert!(t.elapsed() < Duration::from_secs(60));
    let r = ui.json("/api/runs");
    assert_eq!(r["runs"][0]["run"], "gamma");
}

#[test]
fn a_missing_folder_is_no_runs_and_a_taken_port_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let ui = Ui::start(&tmp.path().join("nothing-here"), &[]);
    let r = ui.json("/api/runs");
    assert_eq!(r["runs"].as_array().unwrap().len(), 0);
    assert!(
        r["note"].as_str().unwrap().contains("no runs folder"),
        "{r}"
    );
    assert_eq!(ui.json("/api/results")["results"], serde_json::json!([]));

    let taken = format!("127.0.0.1:{}", ui.port);
    let out = bin()
        .args(["ui", "--listen", &taken, "--runs"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains(&taken) && e.contains("cannot listen"), "{e}");

    // Beyond loopback: a note, said once, and a token in the address to open.
    let wide = bin()
        .args(["ui", "--listen", "0.0.0.0:0", "--runs"])
        .arg(tmp.path())
        .env_remove("CIFAR_DF_UI_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut wide = Ui {
        child: wide,
        port: 0,
    };
    let mut line = String::new();
    BufReader::new(wide.child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.contains("token") && line.contains("SSH tunnel"),
        "{line}"
    );
    let mut url = String::new();
    BufReader::new(wide.child.stdout.take().unwrap())
        .read_line(&mut url)
        .unwrap();
    let token = url
        .split("?token=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no token in {url:?}"))
        .to_string();
    assert_eq!(token.len(), 48, "{url}");
    wide.port = url
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no address in {url:?}"));
    // Without the token: 401, the page too; with it: the runs.
    assert_eq!(wide.request("GET", "/api/runs", "").0, 401);
    assert_eq!(wide.request("GET", "/", "").0, 401);
    assert_eq!(
        wide.request("GET", &format!("/api/runs?token={token}"), "")
            .0,
        200
    );
    // Any name of the machine on the port (the token guards it), not another port.
    let (status, _, _) = wide.raw(
        "GET",
        &format!("/api/runs?token={token}"),
        &[("Host", &format!("node7.lan:{}", wide.port))],
        "",
    );
    assert_eq!(status, 200);
    let (status, _, _) = wide.raw(
        "GET",
        &format!("/api/runs?token={token}"),
        &[("Host", "node7.lan:1")],
        "",
    );
    assert_eq!(status, 403);
}

#[test]
fn the_page_works_in_a_headless_browser() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ref/ui_browser.py");
    let ready = Command::new("python3")
        .arg(&script)
        .arg("--check")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !available(
        ready,
        "chromium, chromium-driver and selenium",
        "the browser test",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    train(&runs, "done", &[]);
    let ui = Ui::start(&runs, &[]);
    // A run in progress: slowed so the page sees batches arrive without a reload.
    let mut live = slow_training(&runs, "live", "synthetic:3000:100:5", "0.05", &["-q"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pwned = tmp.path().join("pwned.csv");
    let out = Command::new("python3")
        .arg(&script)
        .arg(format!("http://127.0.0.1:{}/", ui.port))
        .env("UI_PWNED", &pwned)
        .output()
        .unwrap();
    let _ = live.kill();
    let _ = live.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("ok"), "{stdout}");
    assert!(stdout.contains("ran nothing"), "{stdout}");
    assert!(!pwned.exists());
}

#[test]
fn a_running_run_shows_batches_before_they_are_committed() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    std::fs::create_dir_all(&runs).unwrap();
    let ui = Ui::start(&runs, &[]);
    // 300 batches of 10, 0.1 s each: the trainer commits every 50 batches (5 s).
    let mut live = slow_training(
        &runs,
        "slow",
        "synthetic:3000:10:5",
        "0.1",
        &["-q", "--checkpoint-every", "0"],
    )
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let t = Instant::now();
    let mut seen = Vec::new();
    let found = loop {
        let (status, body) = ui.request("GET", "/api/curves?run=slow", "");
        if status == 200 {
            let r: Value = serde_json::from_str(&body).unwrap();
            let total = r["curves"][0]["total"].as_u64().unwrap();
            seen.push(total);
            // Rows past the last commit come from the live feed.
            if !total.is_multiple_of(50) {
                break true;
            }
        }
        if t.elapsed() > Duration::from_secs(25) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = live.kill();
    let _ = live.wait();
    assert!(found, "only committed rows seen: {seen:?}");
    // A run that is not running any more: its stale feed is not shown.
    let info = runs.join("slow/run.json");
    let text = std::fs::read_to_string(&info).unwrap();
    std::fs::write(&info, text.replace("\"running\"", "\"failed\"")).unwrap();
    let r = ui.json("/api/curves?run=slow");
    let total = r["curves"][0]["total"].as_u64().unwrap();
    assert_eq!(total % 50, 0, "{r}");
}

#[test]
fn train_ui_serves_the_dashboard_while_it_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let mut child = slow_training(
        &runs,
        "here",
        "synthetic:2000:10:5",
        "0.05",
        &["--ui", "127.0.0.1:0"],
    )
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let port: u16 = loop {
        let line = lines.next().expect("train exited").unwrap();
        if let Some(rest) = line.strip_prefix("dashboard on http://127.0.0.1:") {
            break rest.trim_end_matches('/').parse().unwrap();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let ui = Ui { child, port };
    let t = Instant::now();
    loop {
        let r = ui.json("/api/runs");
        if r["runs"][0]["status"] == "running" {
            let c = ui.json("/api/curves?run=here");
            if c["curves"][0]["total"].as_u64().unwrap() > 0 {
                break;
            }
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{r}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Writes a CIFAR-10 binary folder of synthetic images (`train` and `test` images).
fn write_cifar_bin(dir: &Path, train: usize, test: usize) -> cifar_df::dataset::Images {
    use cifar_df::dataset::synth::{generate, SynthSpec};
    use cifar_df::dataset::{write_bin, Split};
    let spec = SynthSpec {
        train,
        test,
        seed: 9,
    };
    let bin = dir.join("cifar-10-batches-bin");
    std::fs::create_dir_all(&bin).unwrap();
    for (i, f) in generate(&spec, Split::Train).iter().enumerate() {
        write_bin(&bin.join(format!("data_batch_{}.bin", i + 1)), f).unwrap();
    }
    let test = generate(&spec, Split::Test).remove(0);
    write_bin(&bin.join("test_batch.bin"), &test).unwrap();
    test
}

#[test]
fn the_gallery_shows_the_test_images_a_run_gets_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    // 230 test images in batches of 20: the last batch is short.
    let test = write_cifar_bin(&data, 600, 230);
    let runs = tmp.path().join("runs");
    // Shuffled training: the test pass still reads its split in file order.
    run_ok(
        bin()
            .args(["-q", "train", "--data"])
            .arg(&data)
            .args(["--batch-size", "20", "--shuffle", "--model", "logreg"])
            .args(["--no-plots", "--run", "g", "--runs"])
            .arg(&runs),
    );
    let ui = Ui::start(&runs, &[]);
    let cm = ui.json("/api/confusion?run=g");
    let counts: Vec<Vec<u64>> = serde_json::from_value(cm["counts"].clone()).unwrap();
    let wrong: u64 = (0..10)
        .flat_map(|a| (0..10).map(move |p| (a, p)))
        .filter(|(a, p)| a != p)
        .map(|(a, p)| counts[a][p])
        .sum();
    assert!(wrong > 0 && wrong < 230, "{cm}");

    // Every wrong image, most confident first, each the test image it names.
    let g = ui.json("/api/gallery?run=g&limit=500");
    assert_eq!(g["images_note"], Value::Null, "{g}");
    assert_eq!(g["matching"].as_u64().unwrap(), wrong);
    let images = g["images"].as_array().unwrap();
    assert_eq!(images.len() as u64, wrong);
    let p: Vec<f64> = images
        .iter()
        .map(|i| i["p_max"].as_f64().unwrap())
        .collect();
    assert!(p.windows(2).all(|w| w[0] >= w[1]), "{p:?}");
    for i in images {
        let index = i["index"].as_u64().unwrap() as usize;
        assert_eq!(i["label"].as_u64().unwrap(), u64::from(test.labels[index]));
        assert_ne!(i["label"], i["predicted"]);
        assert_eq!(
            i["label_name"],
            cifar_df::dataset::CLASS_NAMES[test.labels[index] as usize]
        );
    }
    // The pictures: the test images' pixels, as RGB PNGs.
    for i in images.iter().take(5) {
        let index = i["index"].as_u64().unwrap() as usize;
        let mut s = TcpStream::connect(("127.0.0.1", ui.port)).unwrap();
        write!(
            s,
            "GET {} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
            i["src"].as_str().unwrap(),
            ui.port
        )
        .unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        let at = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&raw[..at]).to_ascii_lowercase();
        assert!(
            head.contains(" 200 ") && head.contains("image/png"),
            "{head}"
        );
        let (w, h, rgb) = png_decode(&raw[at + 4..]);
        assert_eq!((w, h), (32, 32));
        let px = test.image(index);
        for k in 0..1024 {
            assert_eq!(
                [rgb[3 * k], rgb[3 * k + 1], rgb[3 * k + 2]],
                [px[k], px[1024 + k], px[2048 + k]],
                "image {index}, pixel {k}"
            );
        }
    }

    // One confusion cell, off and on the diagonal.
    let (a, p) = (0..10)
        .flat_map(|a| (0..10).map(move |p| (a, p)))
        .filter(|(a, p)| a != p)
        .max_by_key(|&(a, p)| counts[a][p])
        .unwrap();
    let g = ui.json(&format!("/api/gallery?run=g&label={a}&predicted={p}"));
    assert_eq!(g["matching"].as_u64().unwrap(), counts[a][p]);
    for i in g["images"].as_array().unwrap() {
        assert_eq!(
            (i["label"].as_u64(), i["predicted"].as_u64()),
            (Some(a as u64), Some(p as u64))
        );
    }
    let g = ui.json(&format!(
        "/api/gallery?run=g&label={a}&predicted={a}&limit=3"
    ));
    assert_eq!(g["matching"].as_u64().unwrap(), counts[a][a]);
    assert_eq!(
        g["images"].as_array().unwrap().len() as u64,
        counts[a][a].min(3)
    );

    // Bad input: a 400 naming the problem.
    let (status, body) = ui.request("GET", "/api/image?run=g&index=230", "");
    assert_eq!(status, 400);
    assert!(body.contains("230 images"), "{body}");
    let (status, body) = ui.request("GET", "/api/gallery?run=g&split=sideways", "");
    assert_eq!(status, 400);
    assert!(body.contains("sideways"), "{body}");
    drop(ui);

    // The data changed since the run: no wrong pictures, a note saying why.
    let mut shifted = test.clone();
    shifted.labels.iter_mut().for_each(|l| *l = (*l + 1) % 10);
    cifar_df::dataset::write_bin(&data.join("cifar-10-batches-bin/test_batch.bin"), &shifted)
        .unwrap();
    let ui = Ui::start(&runs, &[]);
    let g = ui.json("/api/gallery?run=g");
    assert!(
        g["images_note"].as_str().unwrap().contains("data changed"),
        "{g}"
    );
    assert!(g["images"]
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i["src"].is_null()));
    // A run fed by a stream keeps no images: its rows, and why there are no pictures.
    let info = runs.join("g/run.json");
    let text = std::fs::read_to_string(&info).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let old = v["source"].as_str().unwrap().to_string();
    std::fs::write(
        &info,
        text.replace(&format!("\"{old}\""), "\"tcp://127.0.0.1:9\""),
    )
    .unwrap();
    let g = ui.json("/api/gallery?run=g");
    assert!(
        g["images_note"]
            .as_str()
            .unwrap()
            .contains("keeps no images"),
        "{g}"
    );
    assert_eq!(g["matching"].as_u64().unwrap(), wrong);
}
