//! The stream server under a slow client: it waits for the client instead of queueing
//! batches in memory.

use crate::common;

use std::io::Read;
use std::time::Duration;

use common::*;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_slow_client_slows_the_server_instead_of_growing_its_memory() {
    if !std::path::Path::new("/proc/self/status").exists() {
        skip("the server's memory test", "/proc");
        return;
    }
    // Endless: an unbounded queue would grow by ~1 GB/s of encoded JSON here.
    let mut server = start_ours(
        std::path::Path::new("synthetic:2000:0:5"),
        &["--endless", "--batch-size", "100"],
    );
    let mut client = connect(server.port);
    std::thread::sleep(Duration::from_millis(1500));
    let idle = rss_kib(server.child.id());
    // Read a few batches slowly, then stall again.
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0usize;
    while got < 50 << 20 {
        got += client.read(&mut buf).unwrap();
    }
    std::thread::sleep(Duration::from_millis(1000));
    let after = rss_kib(server.child.id());
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    // The data set is 6 MB; a few encoded batches are 6 MB each.
    assert!(
        idle < 150 * 1024,
        "server RSS {idle} KiB while the client did not read"
    );
    assert!(
        after < 150 * 1024,
        "server RSS {after} KiB after a slow read"
    );
}
