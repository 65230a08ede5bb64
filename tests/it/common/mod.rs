//! Helpers shared by the integration tests: the mini CIFAR-10 data, running the binary,
//! reading Parquet back.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use arrow::array::{Array, FixedSizeListArray, UInt16Array, UInt32Array, UInt64Array, UInt8Array};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// The real CIFAR-10 sample in `../shared/data/cifar10-mini`, or `None` (with a note) when
/// it is not there. Under CI it must be there.
pub fn mini() -> Option<PathBuf> {
    let dir = std::env::var_os("CIFAR10_MINI")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/cifar10-mini")
        });
    if dir.join("cifar-10-batches-bin").is_dir() {
        return Some(dir);
    }
    skip(
        "a test on the real images",
        &format!(
            "the CIFAR-10 sample at {} (set CIFAR10_MINI)",
            dir.display()
        ),
    );
    None
}

/// Says a test does not check anything for want of `needs`: a panic under CI (`CI`
/// set), elsewhere a note; logged to `CIFAR_DF_SKIP_LOG` (`.ci/run` counts them).
pub fn skip(what: &str, needs: &str) {
    cifar_df::testing::skip(what, needs)
}

/// Whether `python3 -c "import MODULES"` works, for a test comparing with a Python
/// reference (`what`). Under CI it must (a panic); elsewhere the test is skipped, with a note.
pub fn have_python(modules: &str, what: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    available(ok, &format!("python3 with {modules}"), what)
}

/// Whether a test's tool is `ok`; under CI it must be (a panic naming `needs` and `what`),
/// elsewhere the test is skipped with a note.
pub fn available(ok: bool, needs: &str, what: &str) -> bool {
    if !ok {
        skip(what, needs);
    }
    ok
}

/// `--set` flags for a small, quickly fitted patch extractor (32 atoms), for `features`.
pub const SMALL_EXTRACTOR: [&str; 8] = [
    "--set",
    "atoms=32",
    "--set",
    "samples=4000",
    "--set",
    "stats_images=50",
    "--set",
    "fit_images=200",
];

/// The reference server script.
pub fn reference_server() -> PathBuf {
    std::env::var_os("STREAM_REFERENCE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/tools/stream_reference.py")
        })
}

/// The `cifar-df` binary under test.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cifar-df"))
}

/// Raw records of the binary layout, straight from the files (independent of the crate's
/// dataset reader): (label, pixels) per image, in split order.
pub fn raw_records(mini: &Path, split: &str) -> Vec<(u8, Vec<u8>)> {
    let names: Vec<String> = if split == "train" {
        (1..=5).map(|i| format!("data_batch_{i}.bin")).collect()
    } else {
        vec!["test_batch.bin".into()]
    };
    let mut out = Vec::new();
    for n in names {
        let bytes = std::fs::read(mini.join("cifar-10-batches-bin").join(n)).unwrap();
        for rec in bytes.chunks_exact(3073) {
            out.push((rec[0], rec[1..].to_vec()));
        }
    }
    out
}

/// A spawned server and the port it announced on stderr ("listening on HOST:PORT").
pub struct Server {
    pub child: Child,
    pub port: u16,
}

impl Server {
    /// Spawn `cmd` (stderr piped) and wait for its "listening on" line.
    pub fn start(mut cmd: Command) -> Server {
        cmd.stderr(Stdio::piped()).stdout(Stdio::null());
        let mut child = cmd.spawn().expect("spawn server");
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let port = loop {
            let line = lines
                .next()
                .expect("server exited before listening")
                .unwrap();
            if let Some(addr) = line.strip_prefix("listening on ") {
                break addr.rsplit(':').next().unwrap().trim().parse().unwrap();
            }
        };
        // Keep draining stderr so the server never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        Server { child, port }
    }

    /// Read everything the server sends to one client.
    pub fn read_all(&mut self) -> Vec<u8> {
        let mut s = connect(self.port);
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        out
    }

    pub fn wait(mut self) {
        let status = self.child.wait().unwrap();
        assert!(status.success(), "server failed: {status}");
    }
}

pub fn connect(port: u16) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => return s,
            Err(e) if Instant::now() > deadline => panic!("connect {port}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The reference Python server on a free port.
pub fn start_reference(data: &Path, args: &[&str]) -> Server {
    let mut cmd = Command::new("python3");
    cmd.arg(reference_server())
        .arg(data)
        .args(["--port", "0"])
        .args(args);
    Server::start(cmd)
}

/// `cifar-df stream` on a free port.
pub fn start_ours(data: &Path, args: &[&str]) -> Server {
    let mut cmd = bin();
    cmd.args(["-q", "stream", "--data"])
        .arg(data)
        .args(["--port", "0"])
        .args(args);
    Server::start(cmd)
}

/// All rows of a Parquet file or directory of part files with the stream schema:
/// (batch, row, label, pixels) in file order.
/// `cifar-df query SQL --format csv --runs RUNS`, its stdout.
pub fn query_csv(runs: &Path, sql: &str) -> String {
    run_ok(Command::new(env!("CARGO_BIN_EXE_cifar-df")).args([
        "query",
        sql,
        "--format",
        "csv",
        "--runs",
        runs.to_str().unwrap(),
    ]))
    .0
}

/// Width, height and number of distinct colours of an RGB PNG file.
pub fn decode_png(path: &Path) -> (u32, u32, usize) {
    let (width, height, buf) = png_pixels(path);
    let colours: std::collections::HashSet<&[u8]> = buf.chunks_exact(3).collect();
    (width, height, colours.len())
}

/// A PNG file's width, height and RGB bytes.
#[allow(dead_code)]
pub fn png_pixels(path: &Path) -> (u32, u32, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    png_decode(&bytes)
}

/// A PNG's width, height and RGB bytes.
#[allow(dead_code)]
pub fn png_decode(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

/// Reads every row group of any Parquet file to the end; returns its row count.
pub fn parquet_rows(path: &Path) -> usize {
    let file = std::fs::File::open(path).unwrap();
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .build()
        .unwrap();
    reader
        .map(|b| {
            b.unwrap_or_else(|e| panic!("{}: {e}", path.display()))
                .num_rows()
        })
        .sum()
}

pub fn read_parquet(path: &Path) -> Vec<(u64, u32, u16, Vec<u8>)> {
    let mut files: Vec<PathBuf> = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    let mut out = Vec::new();
    for f in files.drain(..) {
        let file = std::fs::File::open(&f).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        for b in reader {
            let b = b.unwrap();
            let batch = b.column(0).as_any().downcast_ref::<UInt64Array>().unwrap();
            let row = b.column(1).as_any().downcast_ref::<UInt32Array>().unwrap();
            let label = b.column(2).as_any().downcast_ref::<UInt16Array>().unwrap();
            let image = b
                .column(3)
                .as_any()
                .downcast_ref::<FixedSizeListArray>()
                .unwrap();
            for i in 0..b.num_rows() {
                let px = image.value(i);
                let px = px.as_any().downcast_ref::<UInt8Array>().unwrap();
                out.push((
                    batch.value(i),
                    row.value(i),
                    label.value(i),
                    px.values().to_vec(),
                ));
            }
        }
    }
    out
}

/// Run the binary, assert success, and return (stdout, stderr).
pub fn run_ok(cmd: &mut Command) -> (String, String) {
    let out = cmd.output().expect("run cifar-df");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    (stdout, stderr)
}

/// Runs `cmd` and asserts that it failed (a non-zero exit; the panic shows the command
/// and both outputs); returns its stderr.
pub fn fails(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run cifar-df");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{cmd:?} should fail but succeeded\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    stderr
}

/// Waits for a spawned `child` (`what` names it) and asserts that it succeeded, with
/// its outputs in the panic message; returns (stdout, stderr).
pub fn wait_ok(child: Child, what: &str) -> (String, String) {
    let out = child.wait_with_output().expect("wait for cifar-df");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{what} failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    (stdout, stderr)
}

/// Spawns a training `cmd` (outputs discarded), waits (at most 60 s) for its checkpoint
/// folder `ckpts` to hold `n` checkpoints, then SIGKILLs it 37 ms later, asserting it failed.
pub fn kill_after_checkpoints(cmd: &mut Command, ckpts: &Path, n: usize) {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    loop {
        let have = std::fs::read_dir(ckpts)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .count()
            })
            .unwrap_or(0);
        if have >= n {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no checkpoints");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(37));
    child.kill().unwrap(); // SIGKILL
    assert!(!child.wait().unwrap().success());
}

/// `cifar-df ARGS --data DATA --runs RUNS`, not run yet (more flags may follow).
pub fn on_data(args: &[&str], data: impl AsRef<OsStr>, runs: &Path) -> Command {
    let mut cmd = bin();
    cmd.args(args)
        .arg("--data")
        .arg(data)
        .arg("--runs")
        .arg(runs);
    cmd
}

/// `cifar-df -q train --runs RUNS --run RUN`, not run yet (the model, data and the rest
/// follow).
pub fn train_run(runs: &Path, run: &str) -> Command {
    let mut cmd = bin();
    cmd.args(["-q", "train", "--runs"])
        .arg(runs)
        .args(["--run", run]);
    cmd
}

/// `cifar-df -q train --run RUN --resume --no-plots --runs RUNS`, not run yet.
pub fn resume_run(runs: &Path, run: &str) -> Command {
    let mut cmd = bin();
    cmd.args([
        "-q",
        "train",
        "--run",
        run,
        "--resume",
        "--no-plots",
        "--runs",
    ])
    .arg(runs);
    cmd
}

/// The second line of [`query_csv`]'s answer (the one value of a one-row, one-column
/// query), parsed; panics if there is none or it does not parse.
pub fn query_value<T: std::str::FromStr>(runs: &Path, sql: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    let csv = query_csv(runs, sql);
    let line = csv
        .lines()
        .nth(1)
        .unwrap_or_else(|| panic!("{sql}: no row in {csv:?}"));
    line.parse()
        .unwrap_or_else(|e| panic!("{sql}: {line:?} does not parse: {e:?}"))
}
pub mod broker;

/// Runs the test `name` (its full path, as `--list` prints it) of this test binary again
/// in a child process with the environment variable `key` set to `value` (to try a path
/// the process chooses once, such as the patch-matrix convolutions with
/// `CIFAR_DF_NO_FMA=1`), and asserts that it ran and passed.
pub fn rerun_with_env(name: &str, key: &str, value: &str) {
    let exe = std::env::current_exe().expect("the test binary");
    let out = Command::new(exe)
        .args(["--exact", name, "--test-threads", "1"])
        .env(key, value)
        .output()
        .expect("run the test binary again");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1 passed"),
        "{name} with {key}={value}:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
