//! Hostile peers and sizes (issue 11, item 7): a client that never reads, a line that does
//! not end, endless runs of tiny, empty or bad batches, and configs asking for more memory
//! than there is. Each ends in back-pressure or a clear error, with the child's peak
//! resident memory (VmHWM) bounded; `benches/hostile_memory.py` measures the figures.

use crate::common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cifar_df::wire::spark_json;
use common::bin;

/// The child's peak resident set so far, in MiB (Linux).
fn peak_mib(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
}

struct Watched {
    code: Option<i32>,
    stderr: String,
    peak_mib: f64,
}

/// Runs `cmd` to its end (killed after `limit`), polling its peak memory.
fn watched(mut cmd: Command, limit: Duration) -> Watched {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cifar-df");
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let (code, peak_mib) = wait_watching(&mut child, limit);
    Watched {
        code,
        stderr: reader.join().unwrap(),
        peak_mib,
    }
}

/// Waits for `child` (killed after `limit`: exit code `None`), polling its peak memory.
fn wait_watching(child: &mut std::process::Child, limit: Duration) -> (Option<i32>, f64) {
    let start = Instant::now();
    let mut peak = 0f64;
    let status = loop {
        if let Some(p) = peak_mib(child.id()) {
            peak = peak.max(p);
        }
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.code(), peak)
}

/// A one-client server on a free loopback port writing `chunks`, then closing.
fn serve(chunks: impl Iterator<Item = Vec<u8>> + Send + 'static) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        if let Ok((mut conn, _)) = listener.accept() {
            for c in chunks {
                if conn.write_all(&c).is_err() {
                    break;
                }
            }
        }
    });
    port
}

/// One spark-json line holding `n` images of `label`.
fn batch_line(n: usize, label: u16) -> Vec<u8> {
    let labels = vec![label; n];
    let pixels: Vec<u8> = (0..n * 3072).map(|i| (i * 7 % 256) as u8).collect();
    let mut out = Vec::new();
    spark_json::encode(&labels, &pixels, &mut out);
    out.push(b'\n');
    out
}

#[test]
fn the_server_gives_up_on_a_client_that_never_reads() {
    let mut child = bin()
        .args([
            "stream",
            "--data",
            "synthetic:2000:10",
            "--endless",
            "--port",
            "0",
            "--write-timeout",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = child.stderr.take().unwrap();
    // Read the "listening on" line byte by byte, keeping the rest for later.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !String::from_utf8_lossy(&head).contains("listening on") || byte[0] != b'\n' {
        assert_eq!(err.read(&mut byte).unwrap(), 1, "the server exited early");
        head.push(byte[0]);
    }
    let line = String::from_utf8_lossy(&head).into_owned();
    let port: u16 = line.trim().rsplit(':').next().unwrap().parse().unwrap();
    let client = common::connect(port); // never read from
    let (code, peak) = wait_watching(&mut child, Duration::from_secs(60));
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    drop(client);
    assert!(
        code.is_some(),
        "the server was still waiting on a client that reads nothing"
    );
    assert_eq!(code, Some(1), "{rest}");
    assert!(
        rest.contains("the client read nothing for 1 s (--write-timeout)")
            && rest.contains("giving up on it"),
        "{rest}"
    );
    // An endless stream into a full socket: the encoder stays a couple of batches ahead.
    assert!(
        peak < 300.0,
        "peak {peak:.0} MiB while blocked on the client"
    );
}

#[test]
fn a_line_that_does_not_end_is_read_through_at_the_cap_and_the_next_batch_kept() {
    // 256 MiB of digits in one line (cap 1 MiB), then a good batch of 3 images.
    let mb = vec![b'1'; 1 << 20];
    let good = batch_line(3, 4);
    let head = br#"{"0": {"feature0": "#.to_vec();
    let chunks = std::iter::once(head)
        .chain(std::iter::repeat_n(mb, 256))
        .chain(std::iter::once(b"}}\n".to_vec()))
        .chain(std::iter::once(good));
    let port = serve(chunks);
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = bin();
    cmd.args([
        "export",
        "--source",
        &format!("tcp://127.0.0.1:{port}"),
        "--max-line-bytes",
        "1048576",
    ])
    .arg("--out")
    .arg(dir.path().join("out"));
    let w = watched(cmd, Duration::from_secs(120));
    assert_eq!(w.code, Some(0), "{}", w.stderr);
    assert!(
        w.stderr.contains("is over") && w.stderr.contains("has not ended"),
        "the long line was not reported while being read: {}",
        w.stderr
    );
    assert_eq!(w.stderr.matches("has not ended").count(), 1, "{}", w.stderr);
    assert!(
        w.stderr.contains("longer than the cap of 1048576 bytes"),
        "{}",
        w.stderr
    );
    assert!(
        w.stderr.contains("exported 3 images in 1 batches") && w.stderr.contains("1 rejected"),
        "{}",
        w.stderr
    );
    assert!(
        w.peak_mib < 200.0,
        "peak {:.0} MiB for a 256 MiB line with a 1 MiB cap",
        w.peak_mib
    );
}

#[test]
fn a_flood_of_bad_lines_is_counted_not_printed_line_by_line() {
    let bad = b"{\"0\": {\"label\": 3}}\n".repeat(5000);
    let port = serve(std::iter::once(bad));
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = bin();
    cmd.args(["export", "--source", &format!("tcp://127.0.0.1:{port}")])
        .arg("--out")
        .arg(dir.path().join("out"));
    let w = watched(cmd, Duration::from_secs(60));
    assert_eq!(w.code, Some(0), "{}", w.stderr);
    let one_by_one = w.stderr.matches("rejected batch").count();
    // 20 in full, then tallies at 100 and 1000 (each naming the latest).
    assert_eq!(one_by_one, 22, "{}", w.stderr);
    assert!(
        w.stderr.contains("further rejections are counted"),
        "{}",
        w.stderr
    );
    assert!(
        w.stderr.contains("1000 lines rejected so far"),
        "{}",
        w.stderr
    );
    assert!(w.stderr.contains("5000 rejected"), "{}", w.stderr);
}

#[test]
fn empty_batches_are_passed_over_and_counted() {
    let mut chunks = vec![b"{}\n".repeat(100_000)];
    chunks.push(batch_line(2, 1));
    let port = serve(chunks.into_iter());
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = bin();
    cmd.args(["export", "--source", &format!("tcp://127.0.0.1:{port}")])
        .arg("--out")
        .arg(dir.path().join("out"));
    let w = watched(cmd, Duration::from_secs(60));
    assert_eq!(w.code, Some(0), "{}", w.stderr);
    assert!(
        w.stderr.contains("exported 2 images in 1 batches")
            && w.stderr.contains("100000 empty batches passed over"),
        "{}",
        w.stderr
    );
}

#[test]
fn an_endless_run_of_one_image_batches_trains_in_bounded_memory() {
    let lines: Vec<Vec<u8>> = (0..10).map(|k| batch_line(1, k)).collect();
    let n = 3000;
    let port = serve((0..n).map(move |k| lines[k % 10].clone()));
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let mut cmd = bin();
    cmd.args([
        "-q",
        "train",
        "--source",
        &format!("tcp://127.0.0.1:{port}"),
        "--model",
        "logreg",
        "--run",
        "tiny",
        "--checkpoint-every",
        "500",
    ])
    .arg("--runs")
    .arg(&runs);
    let w = watched(cmd, Duration::from_secs(300));
    assert_eq!(w.code, Some(0), "{}", w.stderr);
    let csv = common::query_csv(&runs, "select count(*) as n, sum(images) as i from metrics");
    assert_eq!(csv.trim(), format!("n,i\n{n},{n}"));
    assert!(w.peak_mib < 400.0, "peak {:.0} MiB", w.peak_mib);
}

/// `train` with `config` (TOML text) on a small synthetic set; the watched result.
fn train_with_config(config: &str, extra: &[&str]) -> Watched {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = bin();
    cmd.args(["-q"])
        .args(extra)
        .args(["train", "--data", "synthetic:300:100", "--run", "r"])
        .arg("--config")
        .arg(&path)
        .arg("--runs")
        .arg(dir.path().join("runs"));
    watched(cmd, Duration::from_secs(300))
}

#[test]
fn configs_asking_for_more_memory_than_there_is_are_refused_before_allocating() {
    let cases = [
        (
            "model = \"mlp\"\n[mlp]\nhidden = [1000000, 1000000]\n",
            "mlp (hidden = [1000000, 1000000], 3072 inputs",
        ),
        (
            "model = \"ridge\"\n[ridge]\nbuffer = 100000000\n",
            "ridge (buffer = 100000000",
        ),
        (
            "model = \"svm-kernel\"\n[svm-kernel]\nbuffer = 100000000\n",
            "(buffer = 100000000",
        ),
        (
            "model = \"kmeans\"\n[kmeans]\nk = 4000000000\n",
            "kmeans (k = 4000000000",
        ),
        (
            "model = \"logreg\"\n[features]\nsamples = 10000000000\nfit_images = 100\n",
            "the patch extractor (samples = 10000000000",
        ),
        (
            "model = \"logreg\"\n[features]\natoms = 65536\ngrid = 27\nfit_images = 100\n\
             samples = 40000\nstats_images = 1\n",
            "features of a batch of 128 images, 47775744 each",
        ),
    ];
    for (i, (config, names)) in cases.into_iter().enumerate() {
        // The last case fits (about 1.5 GiB) and then refuses each batch's features; a
        // limit makes that the same on a machine of any size.
        let extra: &[&str] = if i == 5 {
            &["--memory-limit", "3G"]
        } else {
            &[]
        };
        let w = train_with_config(config, extra);
        assert_eq!(w.code, Some(1), "{config}: {}", w.stderr);
        assert!(
            w.stderr.contains(names) && w.stderr.contains("over the memory limit"),
            "{config}: {}",
            w.stderr
        );
        assert!(
            w.stderr.contains("--memory-limit"),
            "the way out is not named: {}",
            w.stderr
        );
        assert_eq!(w.stderr.matches("over the memory limit").count(), 1);
        assert!(w.peak_mib < 3072.0, "{config}: peak {:.0} MiB", w.peak_mib);
    }
}

#[test]
fn the_memory_limit_flag_and_variable_set_the_limit() {
    let mlp = "model = \"mlp\"\n[mlp]\nhidden = [256]\n";
    // 3072 x 256 weights with gradients and Adam moments: about 12 MiB.
    let w = train_with_config(mlp, &["--memory-limit", "4M"]);
    assert_eq!(w.code, Some(1), "{}", w.stderr);
    assert!(
        w.stderr
            .contains("over the memory limit of 4.0 MiB (--memory-limit)"),
        "{}",
        w.stderr
    );
    let w = train_with_config(mlp, &["--memory-limit", "64M"]);
    assert_eq!(w.code, Some(0), "{}", w.stderr);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, mlp).unwrap();
    let o = bin()
        .env("CIFAR_DF_MEMORY_LIMIT", "2M")
        .args(["-q", "train", "--data", "synthetic:300:100", "--run", "r"])
        .arg("--config")
        .arg(&path)
        .arg("--runs")
        .arg(dir.path().join("runs"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("(CIFAR_DF_MEMORY_LIMIT)"), "{err}");
    let o = bin()
        .args(["--memory-limit", "lots", "query", "select 1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("\"lots\" is not a size"), "{err}");
}

#[test]
fn a_ten_thousand_key_config_is_refused_at_its_first_unknown_key() {
    let mut config = String::from("model = \"mlp\"\n[mlp]\n");
    for k in 0..10_000 {
        config.push_str(&format!("col{k} = {k}\n"));
    }
    let w = train_with_config(&config, &[]);
    assert_eq!(w.code, Some(1), "{}", w.stderr);
    assert!(w.stderr.contains("col0"), "{}", w.stderr);
    assert!(
        w.stderr.len() < 2000,
        "the error lists too much: {}",
        w.stderr
    );
    assert!(w.peak_mib < 200.0, "peak {:.0} MiB", w.peak_mib);
}

#[test]
fn a_ten_thousand_column_feature_config_trains() {
    // 9 cells x 1112 atoms (mirror pairs folded): 10,008 feature columns per image.
    let config =
        "model = \"logreg\"\nbatch_size = 50\n[features]\natoms = 1112\nfit_images = 100\n\
                  samples = 2000\nstats_images = 50\n";
    let w = train_with_config(config, &[]);
    assert_eq!(w.code, Some(0), "{}", w.stderr);
    assert!(w.peak_mib < 1024.0, "peak {:.0} MiB", w.peak_mib);
}
