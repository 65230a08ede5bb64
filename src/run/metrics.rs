//! Classification metrics, computed one way for every model: accuracy, log loss, macro
//! precision / recall / F1 and the confusion matrix.
//!
//! Models learn from the live stream test-then-train: each batch is scored before the
//! model trains on it, and whole splits are scored at the end. Every model reports the
//! same numbers, through this one [`Accumulator`], so that runs compare with each other
//! and with Python baselines. The definitions are scikit-learn's, so the numbers can be
//! checked against `sklearn.metrics`:
//!
//! * accuracy: correct / n (`accuracy_score`).
//! * log loss: the mean over rows of −ln(clip(p_true, 1e−15, 1 − 1e−15)), in `f64`, where
//!   p_true is the probability given to the true class. Rows are not renormalised.
//!   scikit-learn's `log_loss` on the same probabilities as float64 agrees to rounding
//!   wherever p_true ≥ 1e−15. Below that the versions differ: scikit-learn ≥ 1.5 clips at
//!   the machine epsilon of the input's dtype (2.2e−16 for float64, 1.2e−7 for float32),
//!   and scikit-learn ≤ 1.4 with `eps=1e-15` clips as here but then renormalises each row
//!   (which changes nothing only for rows that sum to 1).
//! * precision, recall, F1: per class over all the run's classes (the columns of the
//!   probabilities), then the plain mean over the classes
//!   (`precision_recall_fscore_support(y, pred, labels=range(K),
//!   average="macro", zero_division=0)`). A class never predicted has precision 0, a class
//!   never present has recall 0, and the F1 of a class is 2PR/(P + R), or 0 when P + R = 0.
//!   Macro F1 is the mean of the per-class F1 values, not the F1 of the macro P and R.
//! * confusion: `confusion[actual][predicted]` counts (`confusion_matrix`).
//!
//! Counts are kept, not rates, so [`Accumulator::merge`] gives exactly the counts of one
//! accumulator over all the batches; the summed loss is kept with compensated (Neumaier)
//! summation, so it agrees to rounding.

use ndarray::{ArrayView1, ArrayView2};

use crate::error::{Error, Result};

/// Lower clip of the true-class probability in the log loss; the upper clip is
/// `1 - LOG_LOSS_EPS`.
pub const LOG_LOSS_EPS: f64 = 1e-15;

/// Metrics of one batch (or a whole split).
///
/// All rates are 0.0 when `images` is 0.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metrics {
    /// Number of images scored.
    pub images: u64,
    /// Accuracy: correct predictions / images.
    pub acc: f64,
    /// Mean log loss per image (natural log), with the true-class probability clipped to
    /// `[1e-15, 1 - 1e-15]`.
    pub loss: f64,
    /// Macro precision: mean over the classes of TP / predicted (0 for a class never
    /// predicted).
    pub precision: f64,
    /// Macro recall: mean over the classes of TP / actual (0 for a class never present).
    pub recall: f64,
    /// Macro F1: mean over the classes of 2PR/(P + R) (0 for a class with P + R = 0).
    pub f1: f64,
    /// Confusion matrix, `confusion[actual][predicted]`: K × K for K classes (empty
    /// before anything was scored).
    pub confusion: Vec<Vec<u64>>,
}

/// Accumulates predictions: [`update`](Accumulator::update) per batch,
/// [`get`](Accumulator::get) at any time (River-style update/get).
///
/// The number of classes K is the width of the first probabilities it is given (every
/// later batch must have as many); an empty accumulator has none yet.
///
/// An update that fails leaves the accumulator as it was. It serialises (to a training
/// checkpoint) exactly: counts, and the loss sum with its compensation term.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Accumulator {
    /// `confusion[actual][predicted]`, K × K (empty before the first update).
    confusion: Vec<Vec<u64>>,
    /// Images seen.
    images: u64,
    /// Sum of the per-image log losses.
    loss: Sum,
}

impl Accumulator {
    /// An empty accumulator: [`get`](Accumulator::get) gives 0 images and 0.0 rates.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one batch: `y` holds the n true labels, `proba` is n × K with one row of class
    /// probabilities per image.
    ///
    /// The predicted class is the argmax of the row, the lowest index on ties. NaN entries
    /// are never the maximum (a row of NaN only predicts class 0), and a NaN true-class
    /// probability counts as 1e−15 in the loss (the largest per-row loss, as for
    /// probability 0). Rows need not sum to 1; they are not renormalised. An empty batch
    /// (0 rows) adds nothing.
    ///
    /// Errors when `proba` has fewer than 2 columns or not as many as earlier batches had,
    /// when its row count differs from `y`'s length, or when a label is not below K.
    pub fn update(&mut self, y: ArrayView1<u16>, proba: ArrayView2<f32>) -> Result<()> {
        let (rows, cols) = proba.dim();
        let k = self.classes().unwrap_or(cols);
        if cols != k || cols < 2 {
            return Err(Error::usage(format!(
                "metrics: probabilities have {cols} columns, expected one per class ({k}, at \
                 least 2)"
            )));
        }
        if rows != y.len() {
            return Err(Error::usage(format!(
                "metrics: {rows} rows of probabilities for {} labels",
                y.len()
            )));
        }
        let mut batch = Accumulator::with_classes(k);
        for (row, (&label, p)) in y.iter().zip(proba.rows()).enumerate() {
            let actual = class(label, k, "label", row)?;
            batch.confusion[actual][argmax(p)] += 1;
            batch.loss.add(log_loss_row(p[actual]));
        }
        batch.images = rows as u64;
        self.merge(&batch);
        Ok(())
    }

    /// Adds one batch given as predicted labels and an already computed sum of the
    /// per-image log losses (for models without probabilities; see [`log_loss_row`]).
    ///
    /// K is `classes` (or the accumulator's, once it has one). Errors when `y` and
    /// `predicted` differ in length, when a label is not below K, or when `loss_sum` is
    /// negative, NaN or infinite. An empty batch with `loss_sum` 0 adds nothing.
    pub fn update_labels(
        &mut self,
        y: &[u16],
        predicted: &[u16],
        loss_sum: f64,
        classes: usize,
    ) -> Result<()> {
        let k = self.classes().unwrap_or(classes);
        if k != classes {
            return Err(Error::usage(format!(
                "metrics: {classes} classes, but earlier batches had {k}"
            )));
        }
        if y.len() != predicted.len() {
            return Err(Error::usage(format!(
                "metrics: {} predicted labels for {} true labels",
                predicted.len(),
                y.len()
            )));
        }
        if !(loss_sum.is_finite() && loss_sum >= 0.0) {
            return Err(Error::usage(format!(
                "metrics: summed log loss {loss_sum} is not a finite number ≥ 0"
            )));
        }
        let mut batch = Accumulator::with_classes(k);
        for (row, (&actual, &pred)) in y.iter().zip(predicted).enumerate() {
            let actual = class(actual, k, "label", row)?;
            let pred = class(pred, k, "predicted label", row)?;
            batch.confusion[actual][pred] += 1;
        }
        batch.images = y.len() as u64;
        batch.loss.add(loss_sum);
        self.merge(&batch);
        Ok(())
    }

    /// An empty accumulator of `classes` classes.
    pub fn with_classes(classes: usize) -> Self {
        Accumulator {
            confusion: vec![vec![0; classes]; classes],
            ..Self::default()
        }
    }

    /// The number of classes, once known (from the first update).
    pub fn classes(&self) -> Option<usize> {
        Some(self.confusion.len()).filter(|&k| k > 0)
    }

    /// The metrics of everything added so far. With nothing added, `images` is 0 and every
    /// rate is 0.0.
    pub fn get(&self) -> Metrics {
        let mut correct = 0;
        let (mut precision, mut recall, mut f1) = (0.0, 0.0, 0.0);
        let classes = self.confusion.len();
        for k in 0..classes {
            let tp = self.confusion[k][k];
            let actual: u64 = self.confusion[k].iter().sum();
            let predicted: u64 = self.confusion.iter().map(|row| row[k]).sum();
            correct += tp;
            precision += ratio(tp, predicted);
            recall += ratio(tp, actual);
            // 2PR/(P + R) with P = tp/predicted and R = tp/actual, which is
            // 2·tp/(actual + predicted), and 0 when tp = 0 (as P + R = 0 then).
            f1 += ratio(2 * tp, actual + predicted);
        }
        let classes = classes.max(1) as f64;
        Metrics {
            images: self.images,
            acc: ratio(correct, self.images),
            loss: if self.images == 0 {
                0.0
            } else {
                self.loss.value() / self.images as f64
            },
            precision: precision / classes,
            recall: recall / classes,
            f1: f1 / classes,
            confusion: self.confusion.clone(),
        }
    }

    /// Adds everything `other` has accumulated, as if its batches had been added here.
    /// An accumulator with fewer classes grows to the other's (the new cells are 0).
    pub fn merge(&mut self, other: &Accumulator) {
        let k = self.confusion.len().max(other.confusion.len());
        self.confusion.resize(k, Vec::new());
        for row in &mut self.confusion {
            row.resize(k, 0);
        }
        for (mine, theirs) in self.confusion.iter_mut().zip(&other.confusion) {
            for (m, t) in mine.iter_mut().zip(theirs) {
                *m = m.saturating_add(*t);
            }
        }
        self.images = self.images.saturating_add(other.images);
        self.loss.merge(&other.loss);
    }
}

/// The five rates of `m` in the order of [`RATES`]: accuracy, loss, precision, recall, F1.
pub fn rates(m: &Metrics) -> [f64; 5] {
    [m.acc, m.loss, m.precision, m.recall, m.f1]
}

/// Names of the rates [`rates`] returns, as the metrics table names its columns.
pub const RATES: [&str; 5] = ["acc", "loss", "precision", "recall", "f1"];

/// The smoothed curves of a stream of per-batch metrics: the running mean of each rate
/// over all batches so far (the original's "smooth" curves) and the mean over the last
/// `window` batches. Plain means over batches (each batch counts once, whatever its size).
/// Serialisable (floats as their bit patterns: JSON parsers need not read decimal
/// floats back exactly), so that a resumed run continues the same curves exactly.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(from = "RunningBits", into = "RunningBits")]
pub struct Running {
    window: usize,
    count: u64,
    sums: [f64; 5],
    recent: std::collections::VecDeque<[f64; 5]>,
}

/// [`Running`] with its floats as bit patterns.
#[derive(serde::Serialize, serde::Deserialize)]
struct RunningBits {
    window: usize,
    count: u64,
    sums: [u64; 5],
    recent: Vec<[u64; 5]>,
}

impl From<RunningBits> for Running {
    fn from(b: RunningBits) -> Self {
        Running {
            window: b.window.max(1),
            count: b.count,
            sums: b.sums.map(f64::from_bits),
            recent: b
                .recent
                .into_iter()
                .map(|r| r.map(f64::from_bits))
                .collect(),
        }
    }
}

impl From<Running> for RunningBits {
    fn from(r: Running) -> Self {
        RunningBits {
            window: r.window,
            count: r.count,
            sums: r.sums.map(f64::to_bits),
            recent: r.recent.iter().map(|v| v.map(f64::to_bits)).collect(),
        }
    }
}

impl Running {
    /// Curves with a rolling window of `window` batches (at least 1).
    pub fn new(window: usize) -> Self {
        Running {
            window: window.max(1),
            count: 0,
            sums: [0.0; 5],
            recent: std::collections::VecDeque::new(),
        }
    }

    /// The window length, in batches.
    pub fn window(&self) -> usize {
        self.window
    }

    /// Adds a batch's metrics; returns (running means, window means), each in the order of
    /// [`RATES`].
    pub fn push(&mut self, m: &Metrics) -> ([f64; 5], [f64; 5]) {
        let r = rates(m);
        self.count += 1;
        for (s, v) in self.sums.iter_mut().zip(r) {
            *s += v;
        }
        self.recent.push_back(r);
        while self.recent.len() > self.window {
            self.recent.pop_front();
        }
        let n = self.count as f64;
        let mean = self.sums.map(|s| s / n);
        let mut window = [0.0; 5];
        for row in &self.recent {
            for (w, v) in window.iter_mut().zip(row) {
                *w += v;
            }
        }
        let k = self.recent.len() as f64;
        (mean, window.map(|w| w / k))
    }
}

/// The metrics of one batch; see [`Accumulator::update`] for the arguments, errors and the
/// handling of NaN and of an empty batch (0 images, 0.0 rates).
pub fn batch_metrics(y: ArrayView1<u16>, proba: ArrayView2<f32>) -> Result<Metrics> {
    let mut acc = Accumulator::new();
    acc.update(y, proba)?;
    Ok(acc.get())
}

/// Log loss of one row from the probability of its true class:
/// −ln(clip(p_true, 1e−15, 1 − 1e−15)), computed in `f64`. NaN counts as 1e−15.
pub fn log_loss_row(p_true: f32) -> f64 {
    let p = f64::from(p_true);
    let p = if p.is_nan() {
        LOG_LOSS_EPS
    } else {
        p.clamp(LOG_LOSS_EPS, 1.0 - LOG_LOSS_EPS)
    };
    -p.ln()
}

/// `label` as a class index below `classes`, or an error naming the row.
fn class(label: u16, classes: usize, what: &str, row: usize) -> Result<usize> {
    let k = usize::from(label);
    if k < classes {
        Ok(k)
    } else {
        Err(Error::usage(format!(
            "metrics: row {row}: {what} {label} is not a class (0..{})",
            classes - 1
        )))
    }
}

/// Index of the largest non-NaN entry, the lowest index on ties; 0 when all are NaN.
fn argmax(p: ArrayView1<f32>) -> usize {
    let mut best: Option<(usize, f32)> = None;
    for (k, &v) in p.iter().enumerate() {
        if !v.is_nan() && best.is_none_or(|(_, b)| v > b) {
            best = Some((k, v));
        }
    }
    best.map_or(0, |(k, _)| k)
}

/// `num / den`, or 0.0 when `den` is 0 (scikit-learn's `zero_division=0`).
fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

/// A compensated (Neumaier) sum, so that long streams of losses lose no precision.
/// Serialised as the bit patterns of its two parts, so that it reads back exactly.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(from = "[u64; 2]", into = "[u64; 2]")]
struct Sum {
    /// The running sum.
    sum: f64,
    /// The low-order bits lost from `sum`.
    comp: f64,
}

impl From<[u64; 2]> for Sum {
    fn from(b: [u64; 2]) -> Self {
        Sum {
            sum: f64::from_bits(b[0]),
            comp: f64::from_bits(b[1]),
        }
    }
}

impl From<Sum> for [u64; 2] {
    fn from(s: Sum) -> Self {
        [s.sum.to_bits(), s.comp.to_bits()]
    }
}

impl Sum {
    /// Adds `x`.
    fn add(&mut self, x: f64) {
        let t = self.sum + x;
        if self.sum.abs() >= x.abs() {
            self.comp += (self.sum - t) + x;
        } else {
            self.comp += (x - t) + self.sum;
        }
        self.sum = t;
    }

    /// Adds another sum.
    fn merge(&mut self, other: &Sum) {
        self.add(other.sum);
        self.add(other.comp);
    }

    /// The sum.
    fn value(&self) -> f64 {
        self.sum + self.comp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array1, Array2};

    /// CIFAR-10's class count, for the tests' fixed-size rows.
    const CLASSES: usize = 10;

    /// An n × CLASSES probability array from its rows.
    fn proba(rows: &[[f32; CLASSES]]) -> Array2<f32> {
        Array2::from_shape_vec(
            (rows.len(), CLASSES),
            rows.iter().flatten().copied().collect(),
        )
        .unwrap()
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    /// A row with `(class, probability)` entries and zeros elsewhere.
    fn row(entries: &[(usize, f32)]) -> [f32; CLASSES] {
        let mut r = [0.0; CLASSES];
        for &(k, p) in entries {
            r[k] = p;
        }
        r
    }

    /// −ln(1e−15) = 15·ln 10.
    const MAX_LOSS: f64 = 34.538_776_394_910_684;

    #[test]
    fn hand_worked_batch() {
        // row y  probabilities                predicted       p_true
        // 0   0  [.7, .2, .1]                 0 (correct)     .7
        // 1   1  [.6, .4]                     0               .4
        // 2   1  [.25, .5, .25]               1 (correct)     .5
        // 3   2  [.5, .5]   (tie: lowest)     0               0 → clipped to 1e−15
        let y = Array1::from(vec![0u16, 1, 1, 2]);
        let p = proba(&[
            row(&[(0, 0.7), (1, 0.2), (2, 0.1)]),
            row(&[(0, 0.6), (1, 0.4)]),
            row(&[(0, 0.25), (1, 0.5), (2, 0.25)]),
            row(&[(0, 0.5), (1, 0.5)]),
        ]);
        let m = batch_metrics(y.view(), p.view()).unwrap();
        let mut confusion = [[0u64; CLASSES]; CLASSES];
        confusion[0][0] = 1;
        confusion[1][0] = 1;
        confusion[1][1] = 1;
        confusion[2][0] = 1;
        assert_eq!(m.confusion, confusion);
        assert_eq!(m.images, 4);
        // 2 correct of 4.
        assert_eq!(m.acc, 0.5);
        // (−ln .7 − ln .4 − ln .5 + 15 ln 10) / 4, with the f32 values of .7 and .4.
        let loss =
            (-f64::from(0.7f32).ln() - f64::from(0.4f32).ln() - 0.5f64.ln() + MAX_LOSS) / 4.0;
        assert!(close(m.loss, loss, 1e-12), "{} vs {loss}", m.loss);
        // class 0: tp 1, predicted 3, actual 1 → P 1/3, R 1, F1 2·(1/3)/(4/3) = 1/2
        // class 1: tp 1, predicted 1, actual 2 → P 1, R 1/2, F1 2·(1/2)/(3/2) = 2/3
        // class 2: tp 0, never predicted, actual 1 → P 0 (zero_division), R 0, F1 0
        // classes 3..9: never present nor predicted → 0, 0, 0
        assert!(close(m.precision, (1.0 / 3.0 + 1.0) / 10.0, 1e-15));
        assert!(close(m.recall, (1.0 + 0.5) / 10.0, 1e-15));
        assert!(close(m.f1, (0.5 + 2.0 / 3.0) / 10.0, 1e-15));
    }

    #[test]
    fn class_predicted_but_never_present() {
        // y = [3, 3], predicted = [3, 5]
        // class 3: tp 1, predicted 1, actual 2 → P 1, R 1/2, F1 2/3
        // class 5: tp 0, predicted 1, never present → P 0/1 = 0, R 0 (zero_division), F1 0
        // loss: the given sum 3.0 over 2 images = 1.5; accuracy 1/2.
        let mut acc = Accumulator::new();
        acc.update_labels(&[3, 3], &[3, 5], 3.0, CLASSES).unwrap();
        let m = acc.get();
        assert_eq!(m.images, 2);
        assert_eq!(m.acc, 0.5);
        assert_eq!(m.loss, 1.5);
        assert!(close(m.precision, 1.0 / 10.0, 1e-15));
        assert!(close(m.recall, 0.5 / 10.0, 1e-15));
        assert!(close(m.f1, (2.0 / 3.0) / 10.0, 1e-15));
        assert_eq!(m.confusion[3][3], 1);
        assert_eq!(m.confusion[3][5], 1);
        assert_eq!(m.confusion.iter().flatten().sum::<u64>(), 2);
    }

    #[test]
    fn perfect_one_hot_predictions_clip_at_one_minus_eps() {
        // Every class once, predicted with probability exactly 1: all rates 1, and the loss
        // of each row is −ln(1 − 1e−15) ≈ 1e−15, not 0.
        let y = Array1::from((0..CLASSES as u16).collect::<Vec<_>>());
        let rows: Vec<_> = (0..CLASSES).map(|k| row(&[(k, 1.0)])).collect();
        let m = batch_metrics(y.view(), proba(&rows).view()).unwrap();
        assert_eq!((m.acc, m.precision, m.recall, m.f1), (1.0, 1.0, 1.0, 1.0));
        let top = -(1.0 - 1e-15f64).ln();
        assert!(top > 0.0 && close(top, 1e-15, 1e-17));
        assert!(close(m.loss, top, 1e-24), "{}", m.loss);
    }

    #[test]
    fn log_loss_row_clips() {
        // Upper clip: only p = 1 (or more) reaches it in f32.
        assert_eq!(log_loss_row(1.0), -(1.0 - 1e-15f64).ln());
        assert_eq!(log_loss_row(2.0), -(1.0 - 1e-15f64).ln());
        assert!(log_loss_row(1.0 - f32::EPSILON / 2.0) > log_loss_row(1.0));
        // Lower clip: 0, negative, tiny and NaN all give −ln(1e−15) = 15 ln 10.
        for p in [0.0, -0.0, -1.0, 1e-20, 1e-45, f32::NEG_INFINITY, f32::NAN] {
            assert!(close(log_loss_row(p), MAX_LOSS, 1e-12), "{p}");
        }
        assert!(close(MAX_LOSS, 15.0 * 10f64.ln(), 1e-12));
        // Just above the clip it is not clipped: −ln(1e−14) = 14 ln 10.
        assert!(close(log_loss_row(1e-14), -f64::from(1e-14f32).ln(), 0.0));
        assert!(close(log_loss_row(0.5), std::f64::consts::LN_2, 1e-15));
    }

    #[test]
    fn nan_probabilities() {
        // row 0: y 0, [NaN, .3, .7] → predicted 2, p_true NaN → loss 15 ln 10
        // row 1: y 1, all NaN → predicted 0, loss 15 ln 10
        // row 2: y 2, [.1, NaN, .9] → predicted 2 (correct), loss −ln .9
        let y = Array1::from(vec![0u16, 1, 2]);
        let p = proba(&[
            row(&[(0, f32::NAN), (1, 0.3), (2, 0.7)]),
            [f32::NAN; CLASSES],
            row(&[(0, 0.1), (1, f32::NAN), (2, 0.9)]),
        ]);
        let m = batch_metrics(y.view(), p.view()).unwrap();
        assert_eq!(m.confusion[0][2], 1);
        assert_eq!(m.confusion[1][0], 1);
        assert_eq!(m.confusion[2][2], 1);
        let loss = (2.0 * MAX_LOSS - f64::from(0.9f32).ln()) / 3.0;
        assert!(close(m.loss, loss, 1e-12));
        assert!(m.precision.is_finite() && m.recall.is_finite() && m.f1.is_finite());
    }

    #[test]
    fn argmax_ties_take_the_lowest_index() {
        assert_eq!(argmax(Array1::from(vec![0.1f32; CLASSES]).view()), 0);
        assert_eq!(
            argmax(row(&[(3, 0.4), (7, 0.4), (9, 0.2)]).as_slice().into()),
            3
        );
        assert_eq!(argmax(row(&[(0, -0.0), (1, 0.0)]).as_slice().into()), 0);
        assert_eq!(argmax([f32::NEG_INFINITY; CLASSES].as_slice().into()), 0);
        let mut r = [f32::NAN; CLASSES];
        r[8] = -5.0;
        assert_eq!(argmax(r.as_slice().into()), 8);
    }

    #[test]
    fn empty() {
        let m = Accumulator::new().get();
        assert_eq!(m, Metrics::default());
        assert_eq!((m.images, m.acc, m.loss, m.f1), (0, 0.0, 0.0, 0.0));
        let y = Array1::<u16>::zeros(0);
        let p = Array2::<f32>::zeros((0, CLASSES));
        // An empty batch fixes the class count and nothing else.
        assert_eq!(
            batch_metrics(y.view(), p.view()).unwrap(),
            Metrics {
                confusion: vec![vec![0; CLASSES]; CLASSES],
                ..Metrics::default()
            }
        );
        let mut acc = Accumulator::new();
        acc.update_labels(&[], &[], 0.0, CLASSES).unwrap();
        assert_eq!(acc.get().images, 0);
    }

    #[test]
    fn bad_input_is_an_error_and_changes_nothing() {
        let mut acc = Accumulator::new();
        acc.update_labels(&[1, 2], &[1, 1], 1.0, CLASSES).unwrap();
        let before = acc.get();
        let y = Array1::from(vec![0u16, 10]);
        let good = proba(&[row(&[(0, 1.0)]), row(&[(0, 1.0)])]);
        // Label 10 in the last row, after a valid row.
        assert!(acc.update(y.view(), good.view()).is_err());
        // Wrong number of columns, wrong number of rows.
        let y = Array1::from(vec![0u16, 1]);
        assert!(acc.update(y.view(), Array2::zeros((2, 9)).view()).is_err());
        assert!(acc
            .update(y.view(), Array2::zeros((3, CLASSES)).view())
            .is_err());
        assert!(acc.update(y.view(), Array2::zeros((0, 0)).view()).is_err());
        // Labels: lengths, true and predicted labels out of range, bad loss sums.
        assert!(acc.update_labels(&[0], &[0, 1], 0.0, CLASSES).is_err());
        assert!(acc.update_labels(&[0, 255], &[0, 1], 0.0, CLASSES).is_err());
        assert!(acc.update_labels(&[0, 1], &[0, 10], 0.0, CLASSES).is_err());
        for bad in [f64::NAN, -1.0, f64::INFINITY, f64::NEG_INFINITY] {
            assert!(
                acc.update_labels(&[0], &[0], bad, CLASSES).is_err(),
                "{bad}"
            );
        }
        assert_eq!(acc.get(), before);
        let e = acc
            .update_labels(&[0, 12], &[0, 1], 0.0, CLASSES)
            .unwrap_err();
        assert!(e.to_string().contains("row 1"), "{e}");
    }

    /// SplitMix64: a tiny deterministic PRNG for the random cases.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        /// Uniform in (0, 1].
        fn unit(&mut self) -> f32 {
            ((self.next() >> 40) as f32 + 1.0) / (1u64 << 24) as f32
        }
    }

    /// A random batch of `n` rows mixing: random probabilities leaning to the true class,
    /// small integer weights (ties and exact zeros), one-hot rows (p_true 0 or 1), and rows
    /// with a tiny p_true (below the clip; such rows no longer sum to 1, which the metrics
    /// must not correct). Labels come from a random subset of the classes, so that some
    /// classes are never present.
    fn random_case(rng: &mut Rng, n: usize) -> (Array1<u16>, Array2<f32>) {
        let present: Vec<u16> = {
            let mut all: Vec<u16> = (0..CLASSES as u16).collect();
            for i in (1..all.len()).rev() {
                all.swap(i, rng.below(i + 1));
            }
            all.truncate(1 + rng.below(CLASSES));
            all
        };
        let mut y = Vec::with_capacity(n);
        let mut p = Vec::with_capacity(n * CLASSES);
        for _ in 0..n {
            let label = present[rng.below(present.len())];
            let t = usize::from(label);
            let mut r = [0f32; CLASSES];
            match rng.below(4) {
                0 => {
                    for v in &mut r {
                        *v = rng.unit();
                    }
                    r[t] += 2.0 * rng.unit();
                }
                1 => {
                    for v in &mut r {
                        *v = rng.below(4) as f32;
                    }
                    if r.iter().all(|&v| v == 0.0) {
                        r[rng.below(CLASSES)] = 1.0;
                    }
                }
                2 => {
                    let k = if rng.below(2) == 0 {
                        t
                    } else {
                        rng.below(CLASSES)
                    };
                    r[k] = 1.0;
                }
                _ => {
                    for v in &mut r {
                        *v = rng.unit();
                    }
                    r[t] = 0.0;
                }
            }
            let total: f32 = r.iter().sum();
            for v in &mut r {
                *v /= total;
            }
            if rng.below(8) == 0 {
                r[t] = 1e-20;
            }
            y.push(label);
            p.extend_from_slice(&r);
        }
        (
            Array1::from(y),
            Array2::from_shape_vec((n, CLASSES), p).unwrap(),
        )
    }

    /// The same quantities in numpy only, from the definitions (F1 as 2PR/(P + R)).
    const NUMPY_REFERENCE: &str = r#"
import sys
import numpy as np
lines = open(sys.argv[1]).read().split("\n")
i = 0
cases = int(lines[i]); i += 1
for _ in range(cases):
    n = int(lines[i]); i += 1
    y = np.array([int(t) for t in lines[i].split()], dtype=np.int64); i += 1
    p = np.array([[float(t) for t in lines[i + r].split()] for r in range(n)], dtype=np.float64); i += n
    p = p.reshape(n, 10)
    pred = np.argmax(p, axis=1)
    acc = np.mean(pred == y)
    loss = np.mean(-np.log(np.clip(p[np.arange(n), y], 1e-15, 1 - 1e-15)))
    cm = np.zeros((10, 10), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    tp = np.diag(cm).astype(np.float64)
    def div(a, b):
        out = np.zeros_like(a, dtype=np.float64)
        np.divide(a, b, out=out, where=b != 0)
        return out
    prec = div(tp, cm.sum(axis=0).astype(np.float64))
    rec = div(tp, cm.sum(axis=1).astype(np.float64))
    f1 = div(2 * prec * rec, prec + rec)
    out = [repr(float(v)) for v in (acc, loss, prec.mean(), rec.mean(), f1.mean())]
    out += [str(int(c)) for c in cm.ravel()]
    print(" ".join(out))
"#;

    #[test]
    fn matches_a_numpy_reference() {
        let probe = std::process::Command::new("python3")
            .args(["-c", "import numpy"])
            .output();
        if !probe.is_ok_and(|o| o.status.success()) {
            crate::testing::skip("the metrics' numpy reference", "python3 with numpy");
            return;
        }
        let mut rng = Rng(2024);
        let sizes = [1usize, 2, 3, 7, 10, 33, 64, 200, 1000, 5];
        let cases: Vec<_> = sizes.iter().map(|&n| random_case(&mut rng, n)).collect();
        let mut text = format!("{}\n", cases.len());
        for (y, p) in &cases {
            text += &format!("{}\n", y.len());
            let labels: Vec<String> = y.iter().map(u16::to_string).collect();
            text += &(labels.join(" ") + "\n");
            for r in p.rows() {
                let values: Vec<String> =
                    r.iter().map(|&v| format!("{:e}", f64::from(v))).collect();
                text += &(values.join(" ") + "\n");
            }
        }
        let path =
            std::env::temp_dir().join(format!("cifar_df_metrics_{}.txt", std::process::id()));
        std::fs::write(&path, text).unwrap();
        let output = std::process::Command::new("python3")
            .arg("-c")
            .arg(NUMPY_REFERENCE)
            .arg(&path)
            .output();
        let _ = std::fs::remove_file(&path);
        let output = output.unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8(output.stdout).unwrap();
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), cases.len());
        for ((y, p), line) in cases.iter().zip(lines) {
            let fields: Vec<&str> = line.split(' ').collect();
            assert_eq!(fields.len(), 5 + CLASSES * CLASSES);
            let want: Vec<f64> = fields[..5].iter().map(|f| f.parse().unwrap()).collect();
            let mut confusion = [[0u64; CLASSES]; CLASSES];
            for (k, f) in fields[5..].iter().enumerate() {
                confusion[k / CLASSES][k % CLASSES] = f.parse().unwrap();
            }
            // One shot, and in chunks of 7 rows.
            let one = batch_metrics(y.view(), p.view()).unwrap();
            let mut acc = Accumulator::new();
            for start in (0..y.len()).step_by(7) {
                let end = (start + 7).min(y.len());
                acc.update(
                    y.slice(ndarray::s![start..end]),
                    p.slice(ndarray::s![start..end, ..]),
                )
                .unwrap();
            }
            for m in [one, acc.get()] {
                assert_eq!(m.images, y.len() as u64);
                assert_eq!(m.confusion, confusion, "n = {}", y.len());
                let got = [m.acc, m.loss, m.precision, m.recall, m.f1];
                for (name, (g, w)) in ["acc", "loss", "precision", "recall", "f1"]
                    .iter()
                    .zip(got.iter().zip(&want))
                {
                    assert!(
                        close(*g, *w, 1e-9),
                        "n = {}: {name} {g} vs numpy {w}",
                        y.len()
                    );
                }
            }
        }
    }

    #[test]
    fn merge_equals_one_accumulator_over_the_concatenation() {
        let mut rng = Rng(7);
        let (y, p) = random_case(&mut rng, 500);
        let mut whole = Accumulator::new();
        whole.update(y.view(), p.view()).unwrap();
        whole
            .update_labels(&[4, 4, 9], &[4, 1, 9], 2.5, CLASSES)
            .unwrap();
        for cut in [0, 1, 123, 499, 500] {
            let mut a = Accumulator::new();
            a.update(y.slice(ndarray::s![..cut]), p.slice(ndarray::s![..cut, ..]))
                .unwrap();
            let mut b = Accumulator::new();
            b.update(y.slice(ndarray::s![cut..]), p.slice(ndarray::s![cut.., ..]))
                .unwrap();
            b.update_labels(&[4, 4, 9], &[4, 1, 9], 2.5, CLASSES)
                .unwrap();
            a.merge(&b);
            let (m, w) = (a.get(), whole.get());
            assert_eq!((m.images, m.confusion), (w.images, w.confusion));
            assert_eq!(
                (m.acc, m.precision, m.recall, m.f1),
                (w.acc, w.precision, w.recall, w.f1)
            );
            assert!(
                close(m.loss, w.loss, 1e-13),
                "cut {cut}: {} vs {}",
                m.loss,
                w.loss
            );
        }
        // Merging an empty accumulator changes nothing.
        let mut m = whole.clone();
        m.merge(&Accumulator::new());
        assert_eq!(m.get(), whole.get());
    }

    fn m(acc: f64, loss: f64) -> Metrics {
        Metrics {
            images: 10,
            acc,
            loss,
            precision: acc / 2.0,
            recall: acc / 4.0,
            f1: acc / 8.0,
            ..Metrics::default()
        }
    }

    #[test]
    fn running_means_and_window_by_hand() {
        let mut r = Running::new(2);
        let (mean, win) = r.push(&m(0.5, 2.0));
        assert_eq!(mean, [0.5, 2.0, 0.25, 0.125, 0.0625]);
        assert_eq!(win, mean);
        r.push(&m(0.1, 1.0));
        let (mean, win) = r.push(&m(0.3, 0.0));
        // Running mean of (0.5, 0.1, 0.3); window of the last two (0.1, 0.3).
        assert!(close(mean[0], 0.3, 1e-15) && close(mean[1], 1.0, 1e-15));
        assert!(close(win[0], 0.2, 1e-15) && close(win[1], 0.5, 1e-15));
        assert!(close(win[4], 0.2 / 8.0, 1e-15));
    }

    #[test]
    fn three_classes_by_hand() {
        // y = [0, 1, 2, 2], predicted [0, 2, 2, 1]: confusion [[1,0,0],[0,0,1],[0,1,1]];
        // per class P = (1, 0, 1/2), R = (1, 0, 1/2), F1 = (1, 0, 1/2): macro 1/2 each.
        let y = Array1::from(vec![0u16, 1, 2, 2]);
        let p = Array2::from_shape_vec(
            (4, 3),
            vec![0.8, 0.1, 0.1, 0.2, 0.3, 0.5, 0.1, 0.1, 0.8, 0.25, 0.5, 0.25],
        )
        .unwrap();
        let m = batch_metrics(y.view(), p.view()).unwrap();
        assert_eq!(
            m.confusion,
            vec![vec![1, 0, 0], vec![0, 0, 1], vec![0, 1, 1]]
        );
        assert_eq!((m.acc, m.precision, m.recall, m.f1), (0.5, 0.5, 0.5, 0.5));
        let want = -(0.8f32.ln() + 0.3f32.ln() + 0.8f32.ln() + 0.25f32.ln()) as f64 / 4.0;
        assert!((m.loss - want).abs() < 1e-6);
        // Once three, always three: ten columns, or a label 3, are errors.
        let mut acc = Accumulator::new();
        acc.update(y.view(), p.view()).unwrap();
        assert!(acc
            .update(y.view(), Array2::<f32>::zeros((4, CLASSES)).view())
            .is_err());
        let e = acc
            .update(
                Array1::from(vec![3u16]).view(),
                Array2::zeros((1, 3)).view(),
            )
            .unwrap_err();
        assert!(e.to_string().contains("label 3"), "{e}");
        assert_eq!(acc.get(), m);
    }

    #[test]
    fn running_state_round_trips_exactly_through_json() {
        let mut a = Running::new(3);
        let mut acc = Accumulator::new();
        for i in 0..5 {
            a.push(&m(0.1 * f64::from(i) + 1.0 / 3.0, 2.0 / 7.0 * f64::from(i)));
        }
        acc.update_labels(&[1, 2, 3], &[1, 2, 4], 1.0 / 3.0, CLASSES)
            .unwrap();
        let mut b: Running = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        let acc2: Accumulator =
            serde_json::from_str(&serde_json::to_string(&acc).unwrap()).unwrap();
        assert_eq!(acc2, acc);
        assert_eq!(b, a);
        let next = m(0.77, 0.123);
        assert_eq!(a.push(&next), b.push(&next));
    }
}
