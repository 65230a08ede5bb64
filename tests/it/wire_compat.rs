//! `cifar-df stream` in spark-json writes byte for byte what the reference Python server
//! (`../shared/tools/stream_reference.py`) writes, for the same data and flags.

use crate::common;

use common::*;

fn same_bytes(args: &[&str]) {
    let Some(mini) = mini() else { return };
    let mut theirs = start_reference(&mini, args);
    let want = theirs.read_all();
    theirs.wait();
    let mut ours = start_ours(&mini, args);
    let got = ours.read_all();
    ours.wait();
    assert!(!want.is_empty());
    assert_eq!(got.len(), want.len(), "byte counts differ for {args:?}");
    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
        panic!(
            "first difference at byte {i} for {args:?}: ours {:?} theirs {:?}",
            String::from_utf8_lossy(&got[i.saturating_sub(40)..(i + 40).min(got.len())]),
            String::from_utf8_lossy(&want[i.saturating_sub(40)..(i + 40).min(want.len())])
        );
    }
}

#[test]
fn train_split_default_batches() {
    same_bytes(&["--split", "train", "--batch-size", "100"]);
}

#[test]
fn train_split_remainders_carry_across_files() {
    // 1,000 images per file: batches of 384 leave remainders that carry into the next file,
    // and a final smaller batch.
    same_bytes(&["--split", "train", "--batch-size", "384"]);
}

#[test]
fn test_split() {
    same_bytes(&["--split", "test", "--batch-size", "64"]);
}

#[test]
fn endless_with_limit() {
    // The test split (500 images) in batches of 300: each epoch ends with a 200-image batch.
    same_bytes(&[
        "--split",
        "test",
        "--batch-size",
        "300",
        "--endless",
        "--limit",
        "5",
    ]);
}
