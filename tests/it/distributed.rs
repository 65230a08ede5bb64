//! Scale-out: `cifar-df worker` child processes on 127.0.0.1 (stopped by pid), the
//! feature job and SQL over them equal to the local ones, and the faults: a worker down at
//! the start, a worker killed mid-job (the others finish it; with none left, a clear error
//! and no partial file; the rerun finishes it), a worker with other functions refused.
//! Workers with the shared secret (from `CIFAR_DF_SECRET` or `--secret-file`) run the
//! query and the feature job for a coordinator with the same one and refuse one with
//! another or none; a worker beyond loopback needs a secret or `--insecure`.

use crate::common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use common::{bin, have_python, run_ok, train_run};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// The variable the workers' secret is read from.
const SECRET_ENV: &str = "CIFAR_DF_SECRET";
/// The secret of these tests' workers.
const SECRET: &str = "a shared secret for the tests";

/// A secret file holding `secret`, with permissions `mode`.
fn secret_file(dir: &Path, name: &str, secret: &str, mode: u32) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{secret}\n")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    #[cfg(not(unix))]
    let _ = mode;
    path
}

/// A `cifar-df worker` child process; killed (by pid) when dropped.
struct Worker {
    child: Child,
    addr: String,
    log: Arc<Mutex<String>>,
}

impl Worker {
    fn start(extra: &[&str]) -> Worker {
        Self::start_on("127.0.0.1:0", extra)
    }

    fn start_on(listen: &str, extra: &[&str]) -> Worker {
        Self::start_env(listen, extra, &[])
    }

    /// A worker with `env` set (and no `CIFAR_DF_SECRET` but one given there).
    fn start_env(listen: &str, extra: &[&str], env: &[(&str, &str)]) -> Worker {
        let mut child = bin()
            .args(["worker", "--listen", listen])
            .args(extra)
            .env_remove(SECRET_ENV)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start a worker");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = Arc::clone(&log);
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line
                    .split("worker listening on http://")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr.to_string());
                    }
                }
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("the worker did not start: {}", log.lock().unwrap()));
        Worker { child, addr, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn tasks(&self) -> usize {
        self.log().matches("running a task of a query").count()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

fn list(workers: &[&Worker]) -> String {
    workers
        .iter()
        .map(|w| w.addr.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// An address where nothing listens.
fn dead_address() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a.to_string()
}

/// `cmd` spawned with stdout and stderr piped.
fn spawn_piped(cmd: &mut Command) -> Child {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs a command that must fail (exit 1) within 60 s; its stderr.
fn run_fail(cmd: &mut Command) -> String {
    let mut child = spawn_piped(cmd);
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{cmd:?} still runs after 60 s: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{cmd:?} should fail: {stderr}");
    stderr
}

/// Exported images in a folder of several part files.
fn images(dir: &Path, data: &str, rows_per_file: usize) -> PathBuf {
    let out = dir.join("images");
    run_ok(bin().args([
        "-q",
        "export",
        "--source",
        data,
        "--out",
        out.to_str().unwrap(),
        "--rows-per-file",
        &rows_per_file.to_string(),
    ]));
    out
}

fn query(runs: &Path, sql: &str, workers: Option<&str>, extra: &[&str]) -> (String, String) {
    let mut cmd = bin();
    cmd.args(["query", "--format", "csv", "--runs", runs.to_str().unwrap()])
        .args(extra)
        .arg(sql)
        .env_remove(SECRET_ENV);
    if let Some(w) = workers {
        cmd.args(["--workers", w]);
    }
    run_ok(&mut cmd)
}

#[test]
fn queries_on_two_workers_equal_the_local_ones_and_both_workers_run_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let img = images(dir.path(), "synthetic:1200:0:3", 200);
    let runs = dir.path().join("runs");
    for run in ["a", "b"] {
        run_ok(
            train_run(&runs, run)
                .args(["--no-test", "--no-plots", "--model", "logreg"])
                .args(["--data", "synthetic:300:0:4", "--batch-size", "50"]),
        );
    }
    // Both workers hold the secret: one from the environment, one from a file (which
    // others may read: said once).
    let open_file = secret_file(dir.path(), "worker-secret", SECRET, 0o644);
    let a = Worker::start_env("127.0.0.1:0", &[], &[(SECRET_ENV, SECRET)]);
    let b = Worker::start(&["--secret-file", open_file.to_str().unwrap()]);
    assert!(
        a.log().contains("shared secret (from CIFAR_DF_SECRET)"),
        "{}",
        a.log()
    );
    assert!(
        b.log().contains("shared secret (from --secret-file")
            && b.log().contains("readable by other users")
            && b.log().contains("chmod 600"),
        "{}",
        b.log()
    );
    let workers = list(&[&a, &b]);
    // The coordinator's copy, private.
    let key = secret_file(dir.path(), "secret", SECRET, 0o600);
    let with_secret = ["--secret-file", key.to_str().unwrap()];
    let img = img.display();
    let queries = [
        format!("select label, count(*) as n from '{img}/' group by label order by label"),
        format!("select batch, \"row\", label from '{img}/' where label = 3 order by batch, \"row\""),
        format!(
            "select batch, \"row\", array_element(normalize(image, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25), 7) as n7, \
             array_element(hflip(image, 1.0), 1) as f1 from '{img}/' order by batch, \"row\" limit 300"
        ),
        "select run, count(*) as batches, round(avg(acc), 6) as acc from metrics group by run order by run"
            .to_string(),
        "select count(*) as runs from runs".to_string(),
    ];
    for sql in &queries {
        let (local, _) = query(&runs, sql, None, &[]);
        let (remote, stderr) = query(&runs, sql, Some(&workers), &with_secret);
        assert!(local.lines().count() > 1, "{sql}: {local}");
        assert_eq!(remote, local, "{sql}");
        assert!(!stderr.contains("readable by other users"), "{stderr}");
    }
    // The group-by over six files ran on both workers (and they shuffled to each other,
    // with the secret too).
    assert!(a.tasks() > 0 && b.tasks() > 0, "{}\n{}", a.log(), b.log());
    assert!(!a.log().contains("refused a call"), "{}", a.log());
    assert!(!b.log().contains("refused a call"), "{}", b.log());

    // A coordinator with another secret, or none, is refused by either worker: a clear
    // error naming the worker and the secret, not "does not answer".
    for w in [&a, &b] {
        let sql = &queries[0];
        let e = run_fail(
            bin()
                .args(["query", sql, "--workers", &w.addr])
                .env_remove(SECRET_ENV),
        );
        assert!(
            e.contains(&format!("worker {}", w.addr))
                && e.contains("the secret is wrong or missing")
                && e.contains("this command has no secret")
                && !e.contains("does not answer"),
            "{e}"
        );
        let e = run_fail(
            bin()
                .args(["query", sql, "--workers", &w.addr])
                .env(SECRET_ENV, "a guess"),
        );
        assert!(
            e.contains(&format!("worker {}", w.addr))
                && e.contains("the secret is wrong or missing")
                && e.contains("(from CIFAR_DF_SECRET) is not the worker's"),
            "{e}"
        );
        assert!(w.log().contains("refused a call"), "{}", w.log());
    }
    // The right one from the environment works as well as from the file.
    let (remote, _) = run_ok(
        bin()
            .args([
                "query",
                "--format",
                "csv",
                &queries[0],
                "--workers",
                &workers,
            ])
            .env(SECRET_ENV, SECRET),
    );
    assert_eq!(remote, query(&runs, &queries[0], None, &[]).0);
    // Writing stays with the coordinator: a COPY of a query the workers compute writes
    // here (the workers refuse plans that write; this one's sink is the coordinator's).
    let copied = dir.path().join("copied.csv");
    run_ok(
        bin()
            .args([
                "query",
                &format!(
                    "COPY ({}) TO '{}' STORED AS CSV",
                    queries[0],
                    copied.display()
                ),
                "--workers",
                &workers,
            ])
            .env(SECRET_ENV, SECRET),
    );
    let text = std::fs::read_to_string(&copied).unwrap();
    let local = query(&runs, &queries[0], None, &[]).0;
    let (mut got, mut want): (Vec<&str>, Vec<&str>) =
        (text.lines().collect(), local.lines().collect());
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(got, want);
    // An empty secret, an unreadable file, a file without --workers: usage errors naming them.
    let e = run_fail(
        bin()
            .args(["query", "select 1", "--workers", &workers])
            .env(SECRET_ENV, " "),
    );
    assert!(e.contains("CIFAR_DF_SECRET") && e.contains("empty"), "{e}");
    let gone = dir.path().join("no-such-secret");
    let e = run_fail(bin().args([
        "query",
        "select 1",
        "--workers",
        &workers,
        "--secret-file",
        gone.to_str().unwrap(),
    ]));
    assert!(e.contains(gone.to_str().unwrap()), "{e}");
    let e = run_fail(bin().args(["query", "select 1", "--secret-file", key.to_str().unwrap()]));
    assert!(e.contains("--secret-file goes with --workers"), "{e}");
}

#[test]
fn a_worker_down_at_the_start_is_left_out_and_none_up_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let img = images(dir.path(), "synthetic:400:0:3", 100);
    let runs = dir.path().join("runs");
    let sql = format!(
        "select label, count(*) as n from '{}/' group by label order by label",
        img.display()
    );
    let a = Worker::start(&[]);
    let dead = dead_address();
    let (local, _) = query(&runs, &sql, None, &[]);
    let (remote, stderr) = query(&runs, &sql, Some(&format!("{dead},{}", a.addr)), &[]);
    assert_eq!(remote, local);
    // One worker is still a worker: the query ran there, not in the coordinator.
    assert!(a.tasks() > 0, "{}", a.log());
    assert!(
        stderr.contains(&format!("worker {dead} does not answer")) && stderr.contains("left out"),
        "{stderr}"
    );
    let e = run_fail(bin().args(["query", &sql, "--workers", &dead, "--connect-timeout", "3"]));
    assert!(e.contains("no worker answers") && e.contains(&dead), "{e}");
    let e = run_fail(bin().args(["query", &sql, "--workers", "node-without-port"]));
    assert!(
        e.contains("--workers") && e.contains("node-without-port"),
        "{e}"
    );
}

#[test]
fn a_worker_killed_mid_query_is_left_out_and_the_query_runs_again() {
    let dir = tempfile::tempdir().unwrap();
    let img = images(dir.path(), "synthetic:3000:0:3", 250);
    let runs = dir.path().join("runs");
    // Heavy enough to outlast the kill: every image resized to 256x256.
    let sql = format!(
        "select label, count(*) as n, sum(array_element(resize(image, 256, 256), 100000)) as s \
         from '{}/' group by label order by label",
        img.display()
    );
    let (local, _) = query(&runs, &sql, None, &[]);
    let a = Worker::start(&[]);
    let mut b = Worker::start(&[]);
    let child = spawn_piped(
        bin()
            .args([
                "query",
                "--format",
                "csv",
                "--runs",
                runs.to_str().unwrap(),
                &sql,
            ])
            .args(["--workers", &list(&[&a, &b])]),
    );
    let t = Instant::now();
    while b.tasks() == 0 && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    b.kill();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), local);
    assert!(
        stderr.contains(&format!("lost worker {}", b.addr))
            && stderr.contains("running it again on"),
        "{stderr}"
    );
}

#[test]
fn a_worker_with_other_functions_is_refused_and_listening_beyond_loopback_is_said() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("F");
    features(&f, "synthetic:200:20:6", &[]);
    let ex = f.join("extractor");
    let a = Worker::start(&["--extractor", ex.to_str().unwrap()]);
    let e = run_fail(bin().args(["query", "select 1", "--workers", &a.addr]));
    assert!(
        e.contains(&format!("worker {}", a.addr)) && e.contains("extract_features: none"),
        "{e}"
    );
    // With the same extractor named, `extract_features` runs on the worker.
    let img = images(dir.path(), "synthetic:200:0:6", 50);
    let sql = format!(
        "select batch, \"row\", extract_features(image)[1] as f from '{}/' order by batch, \"row\"",
        img.display()
    );
    let runs = dir.path().join("runs");
    let with = ["--extractor", ex.to_str().unwrap()];
    let (local, _) = query(&runs, &sql, None, &with);
    let (remote, _) = query(&runs, &sql, Some(&a.addr), &with);
    assert_eq!(remote, local);
    let help = run_ok(bin().args(["worker", "--help"])).0;
    assert!(help.contains("[default: 127.0.0.1:50051]"), "{help}");
    assert!(
        help.contains("--secret-file") && help.contains("--insecure"),
        "{help}"
    );
    // Beyond loopback without a secret: refuses to start, saying how to set one.
    let e = run_fail(
        bin()
            .args(["worker", "--listen", "0.0.0.0:0"])
            .env_remove(SECRET_ENV),
    );
    assert!(
        e.contains("reachable from other machines")
            && e.contains("CIFAR_DF_SECRET")
            && e.contains("--secret-file")
            && e.contains("--insecure"),
        "{e}"
    );
    // With --insecure it starts, and says so aloud.
    let open = Worker::start_on("0.0.0.0:0", &["--insecure"]);
    assert!(open.addr.starts_with("0.0.0.0:"), "{}", open.addr);
    assert!(
        open.log().contains("reachable from other machines")
            && open.log().contains("no authentication"),
        "{}",
        open.log()
    );
    // With a secret it starts, and serves a coordinator with the same one.
    let guarded = Worker::start_env("0.0.0.0:0", &[], &[(SECRET_ENV, SECRET)]);
    let (out, _) = run_ok(
        bin()
            .args([
                "query",
                "--format",
                "csv",
                "select 1 as one",
                "--workers",
                &guarded.addr,
            ])
            .env(SECRET_ENV, SECRET),
    );
    assert_eq!(out, "one\n1\n");
    assert!(
        !guarded.log().contains("no authentication"),
        "{}",
        guarded.log()
    );
}

fn features(out: &Path, data: &str, extra: &[&str]) -> (String, String) {
    run_ok(&mut features_cmd(out, data, extra))
}

fn features_cmd(out: &Path, data: &str, extra: &[&str]) -> Command {
    let mut cmd = bin();
    cmd.args(["features", "--data", data, "--out"])
        .arg(out)
        .args(["--rows-per-part", "100"])
        .args(extra)
        .env_remove(SECRET_ENV);
    if !extra.contains(&"--extractor") {
        cmd.args(common::SMALL_EXTRACTOR);
    }
    cmd
}

/// Every file of a cache (names relative to it) with its decoded batches; `cache.json`
/// and the extractor's files as bytes.
fn cache_contents(dir: &Path) -> Vec<(String, Vec<RecordBatch>, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let name = p.strip_prefix(dir).unwrap().display().to_string();
            if name.ends_with(".parquet") {
                let r = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&p).unwrap())
                    .unwrap()
                    .build()
                    .unwrap();
                out.push((name, r.map(|b| b.unwrap()).collect(), Vec::new()));
            } else {
                out.push((name, Vec::new(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Bit-for-bit equality of two caches (Arrow equality would take NaN != NaN; the
/// features' bits are compared through their Parquet-decoded buffers).
fn assert_same_cache(a: &Path, b: &Path) {
    let (ca, cb) = (cache_contents(a), cache_contents(b));
    let names = |c: &[(String, Vec<RecordBatch>, Vec<u8>)]| {
        c.iter().map(|x| x.0.clone()).collect::<Vec<_>>()
    };
    assert_eq!(names(&ca), names(&cb));
    assert!(
        ca.iter().any(|x| x.0.starts_with("train/part-")),
        "{:?}",
        names(&ca)
    );
    for ((name, ba, ra), (_, bb, rb)) in ca.iter().zip(&cb) {
        assert_eq!(ra, rb, "{name}");
        assert_eq!(ba.len(), bb.len(), "{name}");
        for (x, y) in ba.iter().zip(bb) {
            assert_eq!(x.schema(), y.schema(), "{name}");
            for (cx, cy) in x.columns().iter().zip(y.columns()) {
                let (dx, dy) = (cx.to_data(), cy.to_data());
                let bits = |d: &arrow::array::ArrayData| -> Vec<u8> {
                    let mut v: Vec<u8> = d
                        .buffers()
                        .iter()
                        .flat_map(|b| b.as_slice().to_vec())
                        .collect();
                    for c in d.child_data() {
                        v.extend(c.buffers().iter().flat_map(|b| b.as_slice().to_vec()));
                    }
                    v
                };
                assert_eq!(dx.len(), dy.len(), "{name}");
                assert!(
                    bits(&dx) == bits(&dy),
                    "{name}: column {:?} differs",
                    cx.data_type()
                );
            }
        }
    }
}

#[test]
fn the_feature_job_on_two_workers_writes_the_local_cache_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let data = "synthetic:700:250:8";
    let local = dir.path().join("local");
    features(&local, data, &["--flip"]);
    // Workers with the secret, one from the environment and one from a file.
    let key = secret_file(dir.path(), "secret", SECRET, 0o600);
    let a = Worker::start_env("127.0.0.1:0", &[], &[(SECRET_ENV, SECRET)]);
    let b = Worker::start(&["--secret-file", key.to_str().unwrap()]);
    let remote = dir.path().join("remote");
    let ex = local.join("extractor");
    let w = list(&[&a, &b]);
    let args = [
        "--flip",
        "--extractor",
        ex.to_str().unwrap(),
        "--workers",
        &w,
    ];
    // Without the secret the job is refused, naming a worker and the secret.
    let refused = dir.path().join("refused");
    let e = run_fail(features_cmd(&refused, data, &args).env_remove(SECRET_ENV));
    assert!(
        e.contains(&format!("worker {}", a.addr)) && e.contains("the secret is wrong or missing"),
        "{e}"
    );
    assert!(!refused.join("cache.json").exists());
    // With it (the coordinator's from the environment), the job runs on both.
    let (out, _) = run_ok(features_cmd(&remote, data, &args).env(SECRET_ENV, SECRET));
    assert!(out.contains("10 parts written"), "{out}");
    assert!(a.tasks() > 0 && b.tasks() > 0, "{}\n{}", a.log(), b.log());
    assert!(!remote.join(".staging").exists());
    assert_same_cache(&local, &remote);
    // Trains from it like the local one.
    let runs = dir.path().join("runs");
    run_ok(train_run(&runs, "r").args([
        "--no-plots",
        "--model",
        "ridge",
        "--source",
        &format!("features:{}", remote.display()),
    ]));
}

#[test]
fn an_onnx_feature_job_with_mirror_images_on_workers_equals_the_local_one() {
    if !have_python("numpy, onnx", "the test ONNX models") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ref/onnx_reference.py");
    run_ok(
        Command::new("python3")
            .arg(script)
            .arg("build")
            .arg(dir.path()),
    );
    let spec = format!("onnx:{}", dir.path().join("cnn.onnx").display());
    let data = "synthetic:300:100:5";
    let args = ["--extractor", spec.as_str(), "--node", "features", "--flip"];
    let local = dir.path().join("local");
    features(&local, data, &args);
    let a = Worker::start(&[]);
    let b = Worker::start(&[]);
    let remote = dir.path().join("remote");
    let w = list(&[&a, &b]);
    let mut with = args.to_vec();
    with.extend(["--workers", w.as_str()]);
    features(&remote, data, &with);
    // The mirror images' features (an ONNX model has no permutation) were computed on
    // the workers, from hflip(image, 1.0).
    assert_same_cache(&local, &remote);
}

/// The interleaving behind a flaky failure ("Object at location .staging/... not found"):
/// the planner cuts each staged file into byte ranges, and the scan of a range that holds
/// no row group may open the file after all its rows are back and the part is written.
/// Here that late reader is the progress callback, which runs right after each part is
/// written and opens every staged file the query named: it must find each of them there
/// until the query has ended, every time.
#[test]
fn a_staged_part_outlives_its_rows_until_the_query_ends() {
    use cifar_df::dataset::DataSpec;
    use cifar_df::features::cache::CacheOptions;
    use cifar_df::features::Extractor;
    let dir = tempfile::tempdir().unwrap();
    let data = "synthetic:400:100:4";
    let local = dir.path().join("local");
    features(&local, data, &[]);
    let extractor = Extractor::load(&local.join("extractor")).unwrap();
    let a = Worker::start(&[]);
    let b = Worker::start(&[]);
    let remote = dir.path().join("remote");
    std::fs::create_dir_all(&remote).unwrap();
    // The workers read the extractor from the cache folder, where the command saves it.
    extractor.save(&remote.join("extractor")).unwrap();
    let staging = remote.join(".staging").join("train");
    let named: Arc<Mutex<Vec<PathBuf>>> = Arc::default();
    let missing: Arc<Mutex<Vec<String>>> = Arc::default();
    let calls = Arc::new(Mutex::new(0usize));
    let (named2, missing2, calls2, staging2) = (
        Arc::clone(&named),
        Arc::clone(&missing),
        Arc::clone(&calls),
        staging.clone(),
    );
    let mut opts = CacheOptions {
        data: DataSpec::parse(data).unwrap(),
        out: remote.clone(),
        flip: false,
        rows_per_part: 100,
        batch_size: 100,
        image_side: 32,
        on_part: Some(Box::new(move |split, done, n| {
            if split != "train" {
                return;
            }
            *calls2.lock().unwrap() += 1;
            let mut named = named2.lock().unwrap();
            if done == 0 {
                // Before the query: the files it will scan.
                *named = std::fs::read_dir(&staging2)
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .collect();
                return;
            }
            if done == n {
                return;
            }
            for f in named.iter() {
                let read = std::fs::File::open(f)
                    .map_err(|e| e.to_string())
                    .and_then(|file| {
                        ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| e.to_string())
                    });
                if let Err(e) = read {
                    missing2
                        .lock()
                        .unwrap()
                        .push(format!("after {done}/{n}: {}: {e}", f.display()));
                }
            }
        })),
    };
    let urls = cifar_df::distributed::parse_workers(&list(&[&a, &b])).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(cifar_df::distributed::features::write_cache_on_workers(
        &extractor,
        &mut opts,
        &urls,
        &cifar_df::distributed::Connect::new(Duration::from_secs(10), None),
    ))
    .unwrap();
    assert_eq!(named.lock().unwrap().len(), 4, "the staged parts");
    assert_eq!(
        *calls.lock().unwrap(),
        5,
        "one call before the query and one per part"
    );
    let missing = missing.lock().unwrap();
    assert!(
        missing.is_empty(),
        "staged files gone while the query ran: {missing:#?}"
    );
    assert!(
        !remote.join(".staging").exists(),
        "staging is removed at the end"
    );
    let m = std::fs::read(remote.join("cache.json")).unwrap();
    assert_eq!(m, std::fs::read(local.join("cache.json")).unwrap());
}

#[test]
fn a_feature_job_survives_a_lost_worker_and_with_none_left_stops_cleanly_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    // Default-size extractor (0.3 GFLOP per image): long enough to kill a worker mid-job.
    let data = "synthetic:6000:300:9";
    let local = dir.path().join("local");
    run_ok(
        bin()
            .args(["-q", "features", "--data", data, "--out"])
            .arg(&local)
            .args([
                "--rows-per-part",
                "100",
                "--set",
                "fit_images=300",
                "--set",
                "samples=4000",
            ]),
    );
    let ex = local.join("extractor");
    let ex = ex.to_str().unwrap();
    let first_part = |dir: &Path| {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(120) {
            let n = std::fs::read_dir(dir.join("train"))
                .map(|r| {
                    r.filter(|e| {
                        e.as_ref()
                            .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".parquet"))
                    })
                    .count()
                })
                .unwrap_or(0);
            if n > 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("no part written in 120 s");
    };

    // Two workers, one killed once parts come back: the other finishes the job.
    let a = Worker::start(&[]);
    let mut b = Worker::start(&[]);
    let remote = dir.path().join("remote");
    let job = spawn_piped(&mut features_cmd(
        &remote,
        data,
        &["--extractor", ex, "--workers", &list(&[&a, &b])],
    ));
    first_part(&remote);
    b.kill();
    let out = job.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("lost worker {}", b.addr)) && stderr.contains(&a.addr),
        "{stderr}"
    );
    assert_same_cache(&local, &remote);

    // One worker, killed: a clear error naming it, only complete parts, no cache record.
    let mut c = Worker::start(&[]);
    let again = dir.path().join("again");
    let job = spawn_piped(&mut features_cmd(
        &again,
        data,
        &["--extractor", ex, "--workers", &c.addr],
    ));
    first_part(&again);
    c.kill();
    let out = job.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("lost worker {}", c.addr)) && stderr.contains("no worker is left"),
        "{stderr}"
    );
    assert!(!again.join("cache.json").exists());
    let parts: Vec<_> = std::fs::read_dir(again.join("train"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!parts.is_empty() && parts.len() < 60, "{parts:?}");
    for p in &parts {
        assert!(p.ends_with(".parquet"), "a partial file was left: {p}");
        assert_eq!(
            common::parquet_rows(&again.join("train").join(p)),
            100,
            "{p}"
        );
    }
    // The rerun, on a new worker, finishes it: same cache as the local job.
    let d = Worker::start(&[]);
    let (out, _) = features(&again, data, &["--extractor", ex, "--workers", &d.addr]);
    assert!(out.contains(&format!("{} kept", parts.len())), "{out}");
    assert_same_cache(&local, &again);
}
