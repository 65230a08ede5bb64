//! The memory budget: what a model, an extractor or a batch may ask for before anything is
//! allocated.
//!
//! A config or flag can name sizes that no machine holds (`hidden = [1000000, 1000000]`,
//! `atoms = 10000000`, a kernel buffer of a billion rows). Allocating them fails with an
//! abort, not an error, so every stage whose memory follows from its parameters works out
//! the bytes it needs first and calls [`check`], which refuses anything over the limit with
//! an error naming the parameters and both sizes.
//!
//! The limit is this machine's physical memory (`MemTotal` in `/proc/meminfo`), or what
//! `--memory-limit` (global flag) or `CIFAR_DF_MEMORY_LIMIT` says: a number of bytes with
//! an optional `K`, `M`, `G` or `T` suffix (powers of 1024).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// The environment variable read when no limit was set by flag.
pub const ENV: &str = "CIFAR_DF_MEMORY_LIMIT";

/// 0: not set yet (work it out on first use).
static LIMIT: AtomicU64 = AtomicU64::new(0);

/// Sets the limit for the rest of the process (the `--memory-limit` flag).
pub fn set_memory_limit(bytes: u64) {
    LIMIT.store(bytes.max(1), Ordering::Relaxed);
}

/// The limit in bytes, and where it comes from (for the error message).
pub fn memory_limit() -> (u64, &'static str) {
    let set = LIMIT.load(Ordering::Relaxed);
    if set > 0 {
        return (set, "--memory-limit");
    }
    // Worked out once: the check runs on every batch an extractor encodes.
    static DEFAULT: std::sync::OnceLock<(u64, &'static str)> = std::sync::OnceLock::new();
    *DEFAULT.get_or_init(|| {
        if let Some(n) = std::env::var(ENV).ok().and_then(|v| parse_size(&v).ok()) {
            return (n.max(1), ENV);
        }
        match physical_memory() {
            Some(n) => (n, "this machine's memory"),
            None => (u64::MAX, "no limit known"),
        }
    })
}

/// `MemTotal` from `/proc/meminfo`, in bytes.
fn physical_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Parses `123`, `64K`, `512M`, `8G`, `1.5T` (powers of 1024; a trailing `B` or `iB` is
/// allowed).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = match t.chars().last() {
        Some(c @ ('K' | 'k' | 'M' | 'm' | 'G' | 'g' | 'T' | 't')) => {
            let p = match c.to_ascii_uppercase() {
                'K' => 1,
                'M' => 2,
                'G' => 3,
                _ => 4,
            };
            (&t[..t.len() - 1], 1024f64.powi(p))
        }
        _ => (t, 1.0),
    };
    let x: f64 = num.trim().parse().map_err(|_| bad_size(s))?;
    let bytes = x * mult;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(bad_size(s));
    }
    Ok(bytes as u64)
}

fn bad_size(s: &str) -> Error {
    Error::usage(format!(
        "memory limit {s:?} is not a size (bytes, or a number with K, M, G or T)"
    ))
}

/// Bytes as a person reads them: `512 B`, `3.0 KiB`, `16.0 TiB`.
pub fn human(bytes: u128) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut x = bytes as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{x:.1} {}", UNITS[u])
    }
}

/// `Ok` when `bytes` fit in the limit; otherwise an error saying that `what` needs them.
/// `what` names the parameters that decide the size, e.g. `"mlp (hidden = [1000000],
/// 3072 inputs): weights, gradients and Adam moments"`.
pub fn check(what: &str, bytes: u128) -> Result<()> {
    let (limit, from) = memory_limit();
    if bytes <= limit as u128 {
        return Ok(());
    }
    Err(Error::usage(format!(
        "{what} need {}, over the memory limit of {} ({from}); choose smaller sizes{}",
        human(bytes),
        human(limit as u128),
        if from == "--memory-limit" {
            ""
        } else {
            ", or raise the limit with --memory-limit"
        }
    )))
}

/// `a * b * c …` in u128, saturating (sizes from a config can overflow u64).
pub fn product(factors: &[usize]) -> u128 {
    factors
        .iter()
        .fold(1u128, |acc, &f| acc.saturating_mul(f as u128))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("123").unwrap(), 123);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_size("1.5t").unwrap(), 3 << 39);
        for bad in ["", "G", "-1G", "0", "x", "1e30T", "nan"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 10), "3.0 KiB");
        assert_eq!(human(16 << 40), "16.0 TiB");
    }

    #[test]
    fn product_saturates() {
        assert_eq!(product(&[3, 4, 5]), 60);
        assert_eq!(product(&[usize::MAX, usize::MAX, usize::MAX]), u128::MAX);
    }

    #[test]
    fn the_machine_limit_is_its_memory() {
        // No flag is set in this test process; with no environment override the limit is
        // MemTotal, which /proc/meminfo states on Linux.
        if std::env::var(ENV).is_err() {
            let (limit, from) = memory_limit();
            assert_eq!(Some(limit), physical_memory());
            assert_eq!(from, "this machine's memory");
            assert!(check("a tiny thing", 1024).is_ok());
            let e = check("mlp (hidden = [huge]): weights", limit as u128 + 1).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains("mlp (hidden = [huge]): weights need"), "{msg}");
            assert!(msg.contains("over the memory limit"), "{msg}");
        }
    }
}
