//! Drift detection on a stream of numbers (the per-batch loss): ADWIN, adaptive windowing
//! (Bifet & Gavaldà, "Learning from time-changing data with adaptive windowing", SDM 2007),
//! in its ADWIN2 form with exponential histograms, with River's parameters and defaults
//! (`delta` 0.002, `clock` 32, `max_buckets` 5, `min_window_length` 5, `grace_period` 10)
//! and River's convention that a detector which has reported a drift starts afresh on the
//! next value.
//!
//! The window is kept as levels of buckets: level `i` holds up to `max_buckets` buckets of
//! `2^i` values each (their sum and their sum of squared deviations), oldest first. A new
//! value enters level 0; a level that overflows merges its two oldest buckets into one of
//! the next level. Every `clock` values, once the window is longer than `grace_period`,
//! every split of the window into an older part `W0` and a newer part `W1` (at bucket
//! boundaries, each part at least `min_window_length` long) is tested: the means differ
//! significantly when
//!
//! ```text
//! |mean(W0) - mean(W1)| > sqrt(2 m σ² δ') + 2/3 m δ',
//! δ' = ln(2 ln(n) / δ),  m = 1/(n0 - L + 1) + 1/(n1 - L + 1)
//! ```
//!
//! with `σ²` the window's variance, `n` its length and `L` = `min_window_length`. On such a
//! split the oldest bucket is dropped and the test repeats; the update reports a drift.
//! [`Adwin::update`] also says which way the mean moved ([`Change`]): the mean of the
//! window after the shrink against the mean of the window before it. A learning model's
//! loss falls, and ADWIN reports that too; the trainer flags only a rise (a change the model
//! suffers from) as drift. `tests/it/drift.rs` checks the detection indices and directions
//! against River's `drift.ADWIN`.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// ADWIN's parameters (River's names and defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdwinParams {
    /// Significance level, in (0, 1).
    pub delta: f64,
    /// Test for a change every this many values (≥ 1).
    pub clock: u64,
    /// Buckets kept per level before the two oldest are merged (≥ 1).
    pub max_buckets: usize,
    /// Shortest sub-window a split may leave on either side.
    pub min_window_length: u64,
    /// No test until the window is longer than this.
    pub grace_period: u64,
}

impl Default for AdwinParams {
    fn default() -> Self {
        AdwinParams {
            delta: 0.002,
            clock: 32,
            max_buckets: 5,
            min_window_length: 5,
            grace_period: 10,
        }
    }
}

impl AdwinParams {
    /// Checks the values, naming the bad one.
    pub fn check(&self) -> Result<()> {
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(Error::usage(format!(
                "drift: delta = {} must be in (0, 1)",
                self.delta
            )));
        }
        if self.clock == 0 || self.max_buckets == 0 {
            return Err(Error::usage(
                "drift: clock and max_buckets must be at least 1",
            ));
        }
        Ok(())
    }
}

/// A change ADWIN found: which way the window's mean moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// The recent values are higher than the older ones (for a loss: the model got worse).
    Rise,
    /// The recent values are lower (for a loss: the model learnt).
    Fall,
}

/// One bucket: `2^level` values summarised.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
struct Bucket {
    #[serde(with = "bits")]
    sum: f64,
    /// Sum of squared deviations from the bucket's mean.
    #[serde(with = "bits")]
    m2: f64,
}

/// f64 saved as its bit pattern, so that a checkpoint restores it exactly.
mod bits {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(x.to_bits())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        u64::deserialize(d).map(f64::from_bits)
    }
}

/// The ADWIN detector; see the module documentation. It serialises exactly (a trainer's
/// checkpoint carries it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Adwin {
    params: AdwinParams,
    /// `levels[i]`: buckets of `2^i` values, oldest first.
    levels: Vec<VecDeque<Bucket>>,
    /// Values in the window.
    #[serde(with = "bits")]
    width: f64,
    /// Their sum.
    #[serde(with = "bits")]
    sum: f64,
    /// Their sum of squared deviations from the window's mean.
    #[serde(with = "bits")]
    m2: f64,
    /// Values seen since the last reset.
    tick: u64,
    /// Whether the last update reported a drift (the next one starts afresh).
    drifted: bool,
    /// Drifts reported in all.
    detections: u64,
}

impl Default for Adwin {
    /// An empty detector with River's defaults.
    fn default() -> Self {
        Adwin::new(AdwinParams::default()).expect("the defaults are valid")
    }
}

impl Adwin {
    /// An empty detector.
    pub fn new(params: AdwinParams) -> Result<Self> {
        params.check()?;
        Ok(Adwin {
            params,
            levels: Vec::new(),
            width: 0.0,
            sum: 0.0,
            m2: 0.0,
            tick: 0,
            drifted: false,
            detections: 0,
        })
    }

    /// Adds `x`; `Some` when the window changed significantly (a drift), with the
    /// direction: the mean of the window left after the shrink against the mean of the
    /// window (with `x`) before it.
    pub fn update(&mut self, x: f64) -> Option<Change> {
        if self.drifted {
            let detections = self.detections;
            *self = Adwin {
                detections,
                ..Adwin::new(self.params.clone()).expect("checked parameters")
            };
        }
        self.insert(x);
        let before = self.mean();
        self.drifted = self.detect();
        if !self.drifted {
            return None;
        }
        self.detections += 1;
        Some(if self.mean() > before {
            Change::Rise
        } else {
            Change::Fall
        })
    }

    /// Values in the current window.
    pub fn width(&self) -> u64 {
        self.width as u64
    }

    /// Mean of the current window (0 when empty).
    pub fn mean(&self) -> f64 {
        if self.width > 0.0 {
            self.sum / self.width
        } else {
            0.0
        }
    }

    /// Drifts reported so far.
    pub fn detections(&self) -> u64 {
        self.detections
    }

    fn insert(&mut self, x: f64) {
        self.width += 1.0;
        if self.width > 1.0 {
            // Welford: the deviation from the mean of the values before this one.
            let d = x - self.sum / (self.width - 1.0);
            self.m2 += (self.width - 1.0) * d * d / self.width;
        }
        self.sum += x;
        if self.levels.is_empty() {
            self.levels.push(VecDeque::new());
        }
        self.levels[0].push_back(Bucket { sum: x, m2: 0.0 });
        // A level over its capacity merges its two oldest buckets into the next level.
        let mut level = 0;
        while self.levels[level].len() > self.params.max_buckets {
            let (Some(a), Some(b)) = (
                self.levels[level].pop_front(),
                self.levels[level].pop_front(),
            ) else {
                break;
            };
            let n = (level as f64).exp2();
            let (ma, mb) = (a.sum / n, b.sum / n);
            let merged = Bucket {
                sum: a.sum + b.sum,
                m2: a.m2 + b.m2 + n * 0.5 * (ma - mb) * (ma - mb),
            };
            if self.levels.len() == level + 1 {
                self.levels.push(VecDeque::new());
            }
            self.levels[level + 1].push_back(merged);
            level += 1;
        }
    }

    /// Drops the oldest bucket (from the highest level).
    fn drop_oldest(&mut self) {
        let Some(top) = self.levels.len().checked_sub(1) else {
            return;
        };
        let Some(b) = self.levels[top].pop_front() else {
            return;
        };
        let n = (top as f64).exp2();
        self.width -= n;
        self.sum -= b.sum;
        let mean_bucket = b.sum / n;
        let mean_rest = self.sum / self.width;
        self.m2 -= b.m2
            + n * self.width * (mean_bucket - mean_rest) * (mean_bucket - mean_rest)
                / (n + self.width);
        if self.levels[top].is_empty() {
            self.levels.pop();
        }
    }

    /// Tests every split (on the clock) and shrinks the window while one is significant.
    fn detect(&mut self) -> bool {
        self.tick += 1;
        if !self.tick.is_multiple_of(self.params.clock)
            || self.width <= self.params.grace_period as f64
        {
            return false;
        }
        let mut changed = false;
        while self.significant_split() {
            changed = true;
            if self.width <= 0.0 {
                break;
            }
            self.drop_oldest();
        }
        changed
    }

    /// Whether some split of the window, oldest buckets first, is significant.
    fn significant_split(&self) -> bool {
        let min = self.params.min_window_length as f64;
        let (mut n0, mut s0) = (0.0f64, 0.0f64);
        let (mut n1, mut s1) = (self.width, self.sum);
        for (level, buckets) in self.levels.iter().enumerate().rev() {
            let n = (level as f64).exp2();
            for (k, b) in buckets.iter().enumerate() {
                n0 += n;
                n1 -= n;
                s0 += b.sum;
                s1 -= b.sum;
                if level == 0 && k + 1 == buckets.len() {
                    return false; // the newest bucket: W1 would be empty
                }
                if n0 >= min && n1 >= min && self.cut(n0, n1, s0 / n0 - s1 / n1) {
                    return true;
                }
            }
        }
        false
    }

    fn cut(&self, n0: f64, n1: f64, diff: f64) -> bool {
        let min = self.params.min_window_length as f64;
        let dd = (2.0 * self.width.ln() / self.params.delta).ln();
        let m = 1.0 / (n0 - min + 1.0) + 1.0 / (n1 - min + 1.0);
        let eps = (2.0 * m * (self.m2 / self.width) * dd).sqrt() + 2.0 / 3.0 * dd * m;
        diff.abs() > eps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_statistics_are_exact_while_nothing_drifts() {
        let mut a = Adwin::new(AdwinParams::default()).unwrap();
        let xs: Vec<f64> = (0..1000).map(|i| ((i * 37) % 11) as f64 / 10.0).collect();
        for &x in &xs {
            assert_eq!(a.update(x), None);
        }
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let m2: f64 = xs.iter().map(|x| (x - mean) * (x - mean)).sum();
        assert_eq!(a.width(), 1000);
        assert!((a.mean() - mean).abs() < 1e-12);
        assert!((a.m2 - m2).abs() < 1e-9 * m2, "{} vs {m2}", a.m2);
        // Bucket counts add up to the width, at most max_buckets per level.
        let counted: f64 = a
            .levels
            .iter()
            .enumerate()
            .map(|(i, l)| l.len() as f64 * (i as f64).exp2())
            .sum();
        assert_eq!(counted, 1000.0);
        assert!(a.levels.iter().all(|l| l.len() <= 5));
    }

    #[test]
    fn a_jump_is_detected_and_the_detector_starts_afresh() {
        let mut a = Adwin::new(AdwinParams::default()).unwrap();
        let mut at = None;
        for i in 0..2000 {
            let x = if i < 1000 { 0.2 } else { 0.8 } + ((i * 13) % 7) as f64 * 0.01;
            if let Some(c) = a.update(x) {
                assert_eq!(c, Change::Rise, "the mean went up at {i}");
                at.get_or_insert(i);
            }
        }
        let at = at.expect("no drift detected");
        assert!((1000..1100).contains(&at), "detected at {at}");
        assert!(a.detections() >= 1);
        // After the report, the next value starts a new window.
        let before = a.detections();
        a.update(0.5);
        if a.detections() == before {
            assert!(a.width() <= 2000);
        }
    }

    #[test]
    fn a_fall_is_reported_as_a_fall() {
        let mut a = Adwin::new(AdwinParams::default()).unwrap();
        let changes: Vec<(usize, Change)> = (0..2000)
            .filter_map(|i| {
                let x = if i < 1000 { 0.8 } else { 0.2 } + ((i * 13) % 7) as f64 * 0.01;
                a.update(x).map(|c| (i, c))
            })
            .collect();
        assert!(!changes.is_empty());
        assert!(
            changes.iter().all(|&(i, c)| i >= 1000 && c == Change::Fall),
            "{changes:?}"
        );
    }

    #[test]
    fn bad_parameters_are_refused() {
        for p in [
            AdwinParams {
                delta: 0.0,
                ..AdwinParams::default()
            },
            AdwinParams {
                clock: 0,
                ..AdwinParams::default()
            },
        ] {
            assert!(Adwin::new(p).is_err());
        }
    }

    #[test]
    fn it_serialises_exactly() {
        let mut a = Adwin::new(AdwinParams::default()).unwrap();
        for i in 0..500 {
            a.update((i % 9) as f64 * 0.1);
        }
        let text = serde_json::to_string(&a).unwrap();
        let mut b: Adwin = serde_json::from_str(&text).unwrap();
        assert_eq!(a, b);
        for i in 0..500 {
            let x = if i < 100 { 0.3 } else { 2.0 };
            assert_eq!(a.update(x), b.update(x));
        }
        assert_eq!(a, b);
    }
}
