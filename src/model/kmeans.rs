//! `kmeans`: mini-batch k-means (scikit-learn's `MiniBatchKMeans`) used as a classifier.
//!
//! The clustering itself ignores the labels: centres are seeded by greedy k-means++ on
//! the first batch, then every incoming batch is one mini-batch step of Sculley's
//! algorithm as scikit-learn's `partial_fit` does it (each centre moves to the running
//! mean of every image ever assigned to it, a per-centre step of 1/count), with
//! scikit-learn's random reassignment of centres that stop receiving images. To
//! classify, the model also counts the training labels that land in each cluster and
//! answers, for an image, the (smoothed) label distribution of its nearest cluster.
//!
//! Distances are squared Euclidean, computed for a whole batch at once with one matrix
//! product: ‖x − c‖² = ‖x‖² − 2x·c + ‖c‖². Everything is deterministic: the only
//! randomness (seeding and reassignment) comes from a [`SplitMix`] seeded with
//! [`KMeansParams::seed`], whose state is saved with the model, so a model saved and
//! loaded continues exactly as the one that was not saved.

use std::path::Path;

use ndarray::linalg::general_mat_mul;
use ndarray::{s, Array2, ArrayView1, ArrayView2, ArrayViewMut2};
use serde::{Deserialize, Serialize};

use super::{
    check_features, save_checkpoint, Checkpoint, Learner, SplitMix, TensorsOut, TENSORS_FILE,
};
use crate::error::{Error, Result};

/// The model's name: [`Learner::name`] and the `"model"` field of its checkpoint.
pub(crate) const NAME: &str = "kmeans";

/// Largest squared norm accepted for an image (features and centres alike): far enough
/// below `f32::MAX` (≈ 3.4e38) that no distance or centre update can overflow.
const MAX_SQ_NORM: f32 = 1e36;

/// Rows per matrix product when predicting, to bound the work space.
const PREDICT_CHUNK: usize = 4096;

/// Hyper-parameters of [`KMeans`]. Missing fields take their defaults when read from
/// JSON; unknown fields are an error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KMeansParams {
    /// Number of clusters (centres); at least 1. Default 10.
    pub k: usize,
    /// Centres whose count falls below this fraction of the largest count are moved to
    /// random images of the batch (scikit-learn's `reassignment_ratio`); finite, in
    /// `[0, 1]`, 0 turning reassignment off. Default 0.01, as scikit-learn.
    pub reassignment_ratio: f32,
    /// Mini-batch size; at least 1. Kept for uniformity with the other models: as with
    /// scikit-learn's `partial_fit`, every incoming batch is one mini-batch, whatever
    /// its size, so this value does not change training. Default 128.
    pub batch_size: usize,
    /// Seed of the random generator used for k-means++ seeding and reassignment.
    /// Default 0.
    pub seed: u64,
    /// Number of classes K: labels are 0..K and the probabilities have K columns. The
    /// trainer sets it from the data's classes; 2 to 1,000. Default 10 (CIFAR-10).
    pub classes: usize,
}

impl Default for KMeansParams {
    fn default() -> Self {
        KMeansParams {
            classes: super::CLASSES,
            k: 10,
            reassignment_ratio: 0.01,
            batch_size: 128,
            seed: 0,
        }
    }
}

impl KMeansParams {
    /// Checks the values: `k` in `1..=u32::MAX`, `reassignment_ratio` finite and in
    /// `[0, 1]`, `batch_size` ≥ 1.
    pub fn check(&self) -> Result<()> {
        super::check_classes("kmeans", self.classes)?;
        if self.k == 0 || u32::try_from(self.k).is_err() {
            return Err(Error::usage(format!(
                "kmeans: k must be between 1 and {}, not {}",
                u32::MAX,
                self.k
            )));
        }
        let r = self.reassignment_ratio;
        if !(r.is_finite() && (0.0..=1.0).contains(&r)) {
            return Err(Error::usage(format!(
                "kmeans: reassignment_ratio must be in [0, 1], not {r}"
            )));
        }
        if self.batch_size == 0 {
            return Err(Error::usage("kmeans: batch_size must be at least 1"));
        }
        Ok(())
    }
}

/// Mini-batch k-means over the images, with a cluster → label mapping to classify.
///
/// **Seeding.** The first non-empty batch seeds the `k` centres by greedy k-means++ as
/// scikit-learn's `_kmeans_plusplus`: the first centre is a uniformly random row; each
/// next one is the best (lowest resulting potential) of `2 + ⌊ln k⌋` candidate rows
/// drawn with probability proportional to their squared distance to the nearest centre
/// so far. If that batch has no more rows than `k`, all its rows become centres (in
/// order) and the remaining centres are seeded the same way from the next batches,
/// k-means++ continuing from the centres already there; until then only the seeded
/// centres take part in assignment and prediction.
///
/// **Step.** Each batch is one mini-batch step, as scikit-learn's `_mini_batch_step`:
/// each row is assigned to its nearest seeded centre (squared Euclidean distance, lowest
/// index on ties) with the centres as they were before the step; then each centre `j`
/// that received `m_j > 0` rows becomes
/// `(c_j · count_j + Σ rows assigned to j) / (count_j + m_j)` and `count_j += m_j`:
/// the mean of every image it ever received, i.e. a step of 1/count per image.
///
/// **Reassignment** (scikit-learn's `_random_reassign`): before a step, the images since
/// the last reassignment are counted; once they reach `10·k` (or while some seeded
/// centre has count 0, as scikit-learn) the counter restarts and, after the step, every
/// centre whose count is below `reassignment_ratio · max count` (at most ⌊n/2⌋ of them
/// for a batch of n rows, those with the smallest counts) moves to a distinct random row
/// of the batch, its count set to the smallest count of the centres not moved and its
/// label counts cleared (it is a new cluster).
///
/// **Classification.** The model counts, per cluster, the labels of the training images
/// assigned to it (assignment before the step, as above): a `k × K` table. An
/// image's class probabilities are the label distribution of its nearest cluster with
/// add-one (Laplace) smoothing, `(count_l + 1) / (total + K)`: the argmax is the
/// cluster's majority label (the lowest label on ties), rows sum to 1, and a cluster
/// that has seen no labels answers uniformly. Before any training every row is uniform.
#[derive(Clone, Debug)]
pub struct KMeans {
    /// Hyper-parameters (checked).
    params: KMeansParams,
    /// k × d centres (rows `seeded..` are zero and unused); `None` until the first
    /// non-empty batch fixes d.
    centres: Option<Array2<f32>>,
    /// Number of centres seeded so far (the first rows of `centres`).
    seeded: usize,
    /// Per centre, the number of images it has received (scikit-learn's weight sums).
    counts: Vec<u64>,
    /// k × K: per cluster, the training labels assigned to it.
    label_counts: Array2<u64>,
    /// Images learnt from.
    seen: u64,
    /// Mini-batch steps taken (non-empty batches).
    steps: u64,
    /// Images since the last reassignment check that fired.
    since_reassign: u64,
    /// Centres reassigned so far.
    reassignments: u64,
    /// The random generator (seeding, reassignment).
    rng: SplitMix,
    /// Buffers reused from batch to batch; not part of the model's state.
    scratch: Scratch,
}

/// Work buffers of [`KMeans::partial_fit`], kept so a batch allocates (nearly) nothing.
#[derive(Clone, Debug, Default)]
struct Scratch {
    /// −2·x·cᵀ: (at least) batch × k.
    dots: Array2<f32>,
    /// Squared norms of the batch's rows.
    x_sq: Vec<f32>,
    /// Squared norms of the centres.
    c_sq: Vec<f32>,
    /// Nearest centre of each row.
    assign: Vec<u32>,
    /// Rows assigned to each centre in this batch.
    n_assigned: Vec<u64>,
    /// Centres to reassign.
    flagged: Vec<usize>,
}

/// What `model.json` holds for a [`KMeans`] (besides `model` and `stamp`).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    /// Hyper-parameters.
    params: KMeansParams,
    /// Width of the centres; `null` before the first batch.
    n_features: Option<usize>,
    /// Centres seeded so far.
    seeded: usize,
    /// Images learnt from.
    seen: u64,
    /// Mini-batch steps taken.
    steps: u64,
    /// Images since the last reassignment check that fired.
    since_reassign: u64,
    /// Centres reassigned so far.
    reassignments: u64,
    /// State of the random generator.
    rng: SplitMix,
}

impl KMeans {
    /// A new, untrained model (after checking `params`).
    pub fn new(params: KMeansParams) -> Result<Self> {
        params.check()?;
        let (k, classes) = (params.k, params.classes);
        crate::limits::check(
            &format!("kmeans (k = {k}): the per-cluster counts"),
            crate::limits::product(&[k, 8 * (1 + params.classes)]),
        )?;
        Ok(KMeans {
            rng: SplitMix(params.seed),
            params,
            centres: None,
            seeded: 0,
            counts: vec![0; k],
            label_counts: Array2::zeros((k, classes)),
            seen: 0,
            steps: 0,
            since_reassign: 0,
            reassignments: 0,
            scratch: Scratch::default(),
        })
    }

    /// The hyper-parameters.
    pub fn params(&self) -> &KMeansParams {
        &self.params
    }

    /// The seeded centres, one row each (`seeded()` × d; all k once seeding is done);
    /// `None` before the first non-empty batch.
    pub fn centres(&self) -> Option<ArrayView2<'_, f32>> {
        self.centres
            .as_ref()
            .map(|c| c.slice(s![..self.seeded, ..]))
    }

    /// Per centre (all k), the number of images it has received; reassigned centres
    /// restart at the smallest count of the others.
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// k × K: per cluster, how many training images of each label it got.
    pub fn label_counts(&self) -> ArrayView2<'_, u64> {
        self.label_counts.view()
    }

    /// Number of centres seeded so far (k once the first batch had more than k rows).
    pub fn seeded(&self) -> usize {
        self.seeded
    }

    /// Number of images learnt from so far.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Number of mini-batch steps (non-empty batches) taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Number of centre reassignments so far.
    pub fn reassignments(&self) -> u64 {
        self.reassignments
    }

    /// Loads a model saved by [`Learner::save`] from `dir`, checking both files: the
    /// kind, the hyper-parameters and counters, the tensors' names, dtypes, shapes and
    /// values (finite centres), and that the two files come from the same save. Errors
    /// name the file.
    pub fn load(dir: &Path) -> Result<Self> {
        let ck = Checkpoint::open(dir, NAME)?;
        let meta: Meta = ck.meta()?;
        meta.params
            .check()
            .map_err(|e| ck.bad_meta(format!("bad params: {e}")))?;
        let k = meta.params.k;
        match meta.n_features {
            Some(0) => return Err(ck.bad_meta("n_features is 0")),
            Some(_) if meta.seeded == 0 || meta.seeded > k => {
                return Err(ck.bad_meta(format!(
                    "seeded is {} but must be between 1 and k = {k}",
                    meta.seeded
                )))
            }
            None if meta.seen != 0 || meta.steps != 0 || meta.seeded != 0 => {
                return Err(ck.bad_meta("n_features is null but the model has been trained"))
            }
            _ => {}
        }
        let mut names = vec!["counts".to_string(), "label_counts".to_string()];
        if meta.n_features.is_some() {
            names.push("centres".to_string());
        }
        ck.expect_names(&names)?;
        let centres = match meta.n_features {
            Some(d) => Some(ck.f32_2d("centres", k, d)?),
            None => None,
        };
        if let Some(c) = &centres {
            if let Some(j) = c.rows().into_iter().position(|r| too_large(r.dot(&r))) {
                return Err(Error::format(
                    dir.join(TENSORS_FILE),
                    8,
                    format!(
                        "tensor \"centres\" row {j} is too large (squared norm > {MAX_SQ_NORM:e})"
                    ),
                ));
            }
        }
        let counts = ck.u64("counts", &[k])?;
        let lc = ck.u64("label_counts", &[k, meta.params.classes])?;
        let label_counts = Array2::from_shape_vec((k, meta.params.classes), lc).map_err(|e| {
            Error::format(
                dir.join(TENSORS_FILE),
                8,
                format!("tensor \"label_counts\": {e}"),
            )
        })?;
        Ok(KMeans {
            params: meta.params,
            centres,
            seeded: meta.seeded,
            counts,
            label_counts,
            seen: meta.seen,
            steps: meta.steps,
            since_reassign: meta.since_reassign,
            reassignments: meta.reassignments,
            rng: meta.rng,
            scratch: Scratch::default(),
        })
    }

    /// The nearest seeded centre of each row of `x` (checked), or `None` before the
    /// first batch.
    fn nearest_centres(&self, x: ArrayView2<f32>) -> Result<Option<Vec<u32>>> {
        check_features(x, self.n_features())?;
        let Some(centres) = self.centres() else {
            return Ok(None);
        };
        let x_sq = row_sq_norms(x)?;
        let c_sq: Vec<f32> = centres.rows().into_iter().map(|r| r.dot(&r)).collect();
        let n = x.nrows();
        let mut assign = vec![0u32; n];
        let mut dots = Array2::zeros((n.min(PREDICT_CHUNK), centres.nrows()));
        for start in (0..n).step_by(PREDICT_CHUNK) {
            let end = (start + PREDICT_CHUNK).min(n);
            nearest(
                x.slice(s![start..end, ..]),
                &x_sq[start..end],
                centres,
                &c_sq,
                dots.slice_mut(s![..end - start, ..]),
                &mut assign[start..end],
            );
        }
        Ok(Some(assign))
    }
}

/// Whether a squared norm is above [`MAX_SQ_NORM`] (or NaN).
fn too_large(sq: f32) -> bool {
    sq.is_nan() || sq > MAX_SQ_NORM
}

/// Squared norm of each row of `x`; an error if one exceeds [`MAX_SQ_NORM`].
fn row_sq_norms(x: ArrayView2<f32>) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(x.nrows());
    push_row_sq_norms(x, &mut out)?;
    Ok(out)
}

/// Appends the squared norm of each row of `x` to `out` (cleared first); an error if
/// one exceeds [`MAX_SQ_NORM`].
fn push_row_sq_norms(x: ArrayView2<f32>, out: &mut Vec<f32>) -> Result<()> {
    out.clear();
    for (i, row) in x.rows().into_iter().enumerate() {
        let sq = row.dot(&row);
        if too_large(sq) {
            return Err(Error::data(format!(
                "kmeans: batch row {i} is too large (squared norm {sq:e} > {MAX_SQ_NORM:e}); \
                 scale the features"
            )));
        }
        out.push(sq);
    }
    Ok(())
}

/// The nearest of the centres `c` (s ≥ 1 rows, squared norms `c_sq`) to each row of `x`
/// (squared norms `x_sq`), lowest index on ties, into `assign`, using `dots` (n × s) as
/// work space. Returns the sum of the squared distances (each clamped at 0).
fn nearest(
    x: ArrayView2<f32>,
    x_sq: &[f32],
    c: ArrayView2<f32>,
    c_sq: &[f32],
    mut dots: ArrayViewMut2<f32>,
    assign: &mut [u32],
) -> f64 {
    general_mat_mul(-2.0, &x, &c.t(), 0.0, &mut dots);
    let mut total = 0.0f64;
    for ((row, &xs), a) in dots.rows().into_iter().zip(x_sq).zip(assign.iter_mut()) {
        let (mut best, mut best_v) = (0usize, f32::INFINITY);
        for (j, (&dot, &cs)) in row.iter().zip(c_sq).enumerate() {
            let v = dot + cs;
            if v < best_v {
                best = j;
                best_v = v;
            }
        }
        // k ≤ u32::MAX (checked with the params).
        *a = best as u32;
        total += f64::from((xs + best_v).max(0.0));
    }
    total
}

/// Squared distances (≥ 0) from each row of `c` (m × d, squared norms `c_sq`) to each
/// row of `x` (n × d, squared norms `x_sq`): m × n.
fn sq_dists(c: ArrayView2<f32>, c_sq: &[f32], x: ArrayView2<f32>, x_sq: &[f32]) -> Array2<f32> {
    let mut out = Array2::zeros((c.nrows(), x.nrows()));
    general_mat_mul(-2.0, &c, &x.t(), 0.0, &mut out);
    for (mut row, &cs) in out.rows_mut().into_iter().zip(c_sq) {
        for (v, &xs) in row.iter_mut().zip(x_sq) {
            *v = (*v + cs + xs).max(0.0);
        }
    }
    out
}

/// Seeds centres `seeded..k` from the rows of `x` (squared norms `x_sq`, n ≥ 1 rows) by
/// greedy k-means++ (see [`KMeans`]); if `x` has no more rows than centres are missing,
/// they all become centres, in order. Returns the new number of seeded centres.
fn seed_centres(
    centres: &mut Array2<f32>,
    seeded: usize,
    x: ArrayView2<f32>,
    x_sq: &[f32],
    rng: &mut SplitMix,
) -> usize {
    let (k, n) = (centres.nrows(), x.nrows());
    let need = k - seeded;
    if n <= need {
        centres.slice_mut(s![seeded..seeded + n, ..]).assign(&x);
        return seeded + n;
    }
    let mut s = seeded;
    if s == 0 {
        centres.row_mut(0).assign(&x.row(rng.below(n)));
        s = 1;
    }
    // Squared distance of each row to its nearest centre so far.
    let existing = centres.slice(s![..s, ..]);
    let e_sq: Vec<f32> = existing.rows().into_iter().map(|r| r.dot(&r)).collect();
    let d0 = sq_dists(existing, &e_sq, x, x_sq);
    let mut closest: Vec<f32> = (0..n)
        .map(|i| d0.column(i).fold(f32::INFINITY, |a, &b| a.min(b)))
        .collect();

    let trials = 2 + (k as f64).ln() as usize;
    let mut cum = vec![0.0f64; n];
    let mut ids = vec![0usize; trials];
    let mut cand = Array2::zeros((trials, x.ncols()));
    let mut cand_sq = vec![0.0f32; trials];
    while s < k {
        let mut acc = 0.0f64;
        for (c, &v) in cum.iter_mut().zip(&closest) {
            acc += f64::from(v);
            *c = acc;
        }
        for ((id_out, sq_out), mut row) in ids.iter_mut().zip(&mut cand_sq).zip(cand.rows_mut()) {
            let r = rng.uniform() * acc;
            // The first row whose cumulative weight exceeds r: drawn ∝ its distance².
            let id = cum.partition_point(|&c| c <= r).min(n - 1);
            *id_out = id;
            *sq_out = x_sq[id];
            row.assign(&x.row(id));
        }
        let dist = sq_dists(cand.view(), &cand_sq, x, x_sq);
        let (mut best, mut best_pot) = (0usize, f64::INFINITY);
        for (t, row) in dist.rows().into_iter().enumerate() {
            let pot: f64 = row
                .iter()
                .zip(&closest)
                .map(|(&a, &b)| f64::from(a.min(b)))
                .sum();
            if pot < best_pot {
                best = t;
                best_pot = pot;
            }
        }
        for (c, &v) in closest.iter_mut().zip(dist.row(best)) {
            *c = c.min(v);
        }
        centres.row_mut(s).assign(&x.row(ids[best]));
        s += 1;
    }
    s
}

impl crate::model::Model for KMeans {
    const NAME: &'static str = NAME;
    const ABOUT: &'static str = "mini-batch k-means; each cluster predicts its majority class";
    type Params = KMeansParams;

    fn build(params: KMeansParams) -> Result<Self> {
        KMeans::new(params)
    }

    fn open(dir: &Path) -> Result<Self> {
        KMeans::load(dir)
    }
}

impl Learner for KMeans {
    fn name(&self) -> &'static str {
        NAME
    }

    fn n_features(&self) -> Option<usize> {
        self.centres.as_ref().map(Array2::ncols)
    }

    fn classes(&self) -> usize {
        self.params.classes
    }

    /// One mini-batch step on the whole batch (see [`KMeans`]), seeding the centres
    /// first if some are missing.
    ///
    /// Returns the batch's inertia per image: the mean squared distance of each image
    /// to its nearest centre *before* the step (after seeding, on the batch that seeds),
    /// the k-means counterpart of [`Learner::partial_fit`]'s progressive loss.
    ///
    /// The batch is checked first (as [`Learner::partial_fit`] says, plus no row of
    /// squared norm above 1e36); a bad batch is an `Err` and changes nothing. An empty
    /// batch is `Ok(0.0)` and changes nothing.
    fn fit_batch(&mut self, x: ArrayView2<f32>, y: ArrayView1<u16>) -> Result<f64> {
        let n = x.nrows();
        let d = x.ncols();
        if self.centres.is_none() {
            crate::limits::check(
                &format!(
                    "kmeans (k = {}, {d} features, {n} images a batch): the centres and the \
                     distances",
                    self.params.k
                ),
                4 * (2 * crate::limits::product(&[self.params.k, d])
                    + crate::limits::product(&[n, self.params.k])),
            )?;
        }
        let KMeans {
            params,
            centres,
            seeded,
            counts,
            label_counts,
            seen,
            steps,
            since_reassign,
            reassignments,
            rng,
            scratch,
        } = self;
        push_row_sq_norms(x, &mut scratch.x_sq)?;

        // Nothing has changed so far; from here on the step cannot fail.
        let k = params.k;
        let centres = centres.get_or_insert_with(|| Array2::zeros((k, d)));
        if *seeded < k {
            *seeded = seed_centres(centres, *seeded, x, &scratch.x_sq, rng);
        }
        let s = *seeded;

        // As scikit-learn: decide on reassignment before the step.
        *since_reassign += n as u64;
        let reassign = counts[..s].contains(&0) || *since_reassign >= 10 * k as u64;
        if reassign {
            *since_reassign = 0;
        }

        // Assignment, with the centres before the step.
        let c = centres.slice(s![..s, ..]);
        scratch.c_sq.clear();
        scratch.c_sq.extend(c.rows().into_iter().map(|r| r.dot(&r)));
        if scratch.dots.nrows() < n || scratch.dots.ncols() != k {
            scratch.dots = Array2::zeros((n, k));
        }
        scratch.assign.resize(n, 0);
        let inertia = nearest(
            x,
            &scratch.x_sq,
            c,
            &scratch.c_sq,
            scratch.dots.slice_mut(s![..n, ..s]),
            &mut scratch.assign,
        );

        // Update: c_j ← (c_j·count_j + Σ assigned rows) / (count_j + m_j).
        scratch.n_assigned.clear();
        scratch.n_assigned.resize(k, 0);
        for (&a, &label) in scratch.assign.iter().zip(y) {
            let a = a as usize;
            scratch.n_assigned[a] += 1;
            label_counts[[a, usize::from(label)]] += 1;
        }
        for (j, mut row) in centres.rows_mut().into_iter().enumerate().take(s) {
            if scratch.n_assigned[j] > 0 {
                row *= counts[j] as f32;
            }
        }
        for (row, &a) in x.rows().into_iter().zip(&scratch.assign) {
            let mut c = centres.row_mut(a as usize);
            c += &row;
        }
        for (j, mut row) in centres.rows_mut().into_iter().enumerate().take(s) {
            let m = scratch.n_assigned[j];
            if m > 0 {
                counts[j] += m;
                row *= 1.0 / counts[j] as f32;
            }
        }

        if reassign && params.reassignment_ratio > 0.0 {
            *reassignments += reassign_small(
                centres,
                &mut counts[..s],
                label_counts,
                x,
                params.reassignment_ratio,
                rng,
                &mut scratch.flagged,
            ) as u64;
        }
        *seen += n as u64;
        *steps += 1;
        Ok(inertia / n as f64)
    }

    /// See [`Learner::predict_proba`]: the smoothed label distribution of each row's
    /// nearest cluster (see [`KMeans`]); uniform (1/K) before the first batch.
    /// A row of squared norm above 1e36 is an `Err`.
    fn predict_proba(&self, x: ArrayView2<f32>) -> Result<Array2<f32>> {
        let Some(assign) = self.nearest_centres(x)? else {
            return Ok(Array2::from_elem(
                (x.nrows(), self.params.classes),
                1.0 / self.params.classes as f32,
            ));
        };
        let dist = Array2::from_shape_fn((self.params.k, self.params.classes), |(j, l)| {
            let row = self.label_counts.row(j);
            let total: f64 = row.iter().map(|&c| c as f64).sum();
            ((row[l] as f64 + 1.0) / (total + self.params.classes as f64)) as f32
        });
        let mut out = Array2::zeros((x.nrows(), self.params.classes));
        for (mut row, &a) in out.rows_mut().into_iter().zip(&assign) {
            row.assign(&dist.row(a as usize));
        }
        Ok(out)
    }

    /// The nearest centre of each row of `x` (lowest index on ties). Errors as
    /// [`predict_proba`](Learner::predict_proba), and on a non-empty `x` before the
    /// first batch (there are no centres yet).
    fn clusters(&self, x: ArrayView2<f32>) -> Option<Result<Vec<u32>>> {
        Some(match self.nearest_centres(x) {
            Ok(Some(a)) => Ok(a),
            Ok(None) if x.nrows() == 0 => Ok(Vec::new()),
            Ok(None) => Err(Error::usage(
                "kmeans: the model has no centres yet (train it first)",
            )),
            Err(e) => Err(e),
        })
    }

    /// See [`Learner::save`]. The tensors file holds `"counts"` (k, U64),
    /// `"label_counts"` (k × K, U64) and, once the width is fixed,
    /// `"centres"` (k × d, F32; rows not yet seeded are zero). `model.json` has
    /// `params`, `n_features` (`null` before the first batch), `seeded`, `seen`, `steps`,
    /// `since_reassign`, `reassignments` and `rng` (the generator's state), so that a
    /// loaded model continues bit for bit as the saved one would have. Both files carry
    /// the stamp `"{seen}-{steps}"`.
    fn save(&self, dir: &Path) -> Result<()> {
        let mut tensors = TensorsOut::default();
        if let Some(c) = &self.centres {
            tensors.f32("centres", &[c.nrows(), c.ncols()], c.iter());
        }
        tensors.u64("counts", &[self.params.k], &self.counts);
        tensors.u64(
            "label_counts",
            &[self.params.k, self.params.classes],
            &self.label_counts,
        );
        let meta = Meta {
            params: self.params.clone(),
            n_features: self.n_features(),
            seeded: self.seeded,
            seen: self.seen,
            steps: self.steps,
            since_reassign: self.since_reassign,
            reassignments: self.reassignments,
            rng: self.rng.clone(),
        };
        let stamp = format!("{}-{}", self.seen, self.steps);
        save_checkpoint(dir, NAME, &stamp, &meta, tensors)
    }
}

/// scikit-learn's reassignment after a step: the centres (among the seeded ones, whose
/// counts are `counts`) with a count below `ratio · max count` — at most ⌊n/2⌋, those
/// of smallest count — move to distinct random rows of `x`, get the smallest count of
/// the others and lose their label counts. Returns how many moved.
fn reassign_small(
    centres: &mut Array2<f32>,
    counts: &mut [u64],
    label_counts: &mut Array2<u64>,
    x: ArrayView2<f32>,
    ratio: f32,
    rng: &mut SplitMix,
    flagged: &mut Vec<usize>,
) -> usize {
    let n = x.nrows();
    let Some(&max) = counts.iter().max() else {
        return 0;
    };
    let threshold = f64::from(ratio) * max as f64;
    flagged.clear();
    flagged.extend((0..counts.len()).filter(|&j| (counts[j] as f64) < threshold));
    let cap = n / 2;
    if flagged.len() > cap {
        // Flagged counts are all below the others': keep the `cap` smallest.
        flagged.sort_by_key(|&j| (counts[j], j));
        flagged.truncate(cap);
        flagged.sort_unstable();
    }
    if flagged.is_empty() {
        return 0;
    }
    // ratio ≤ 1, so the largest count is never flagged and the minimum exists.
    let min_other = (0..counts.len())
        .filter(|j| flagged.binary_search(j).is_err())
        .map(|j| counts[j])
        .min()
        .unwrap_or(0);
    // Distinct rows: a partial Fisher–Yates shuffle.
    let mut rows: Vec<usize> = (0..n).collect();
    for (t, &j) in flagged.iter().enumerate() {
        let r = t + rng.below(n - t);
        rows.swap(t, r);
        centres.row_mut(j).assign(&x.row(rows[t]));
        counts[j] = min_other;
        label_counts.row_mut(j).fill(0);
    }
    flagged.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::CLASSES;
    use crate::model::{self, META_FILE};
    use ndarray::{array, Array1, Axis};
    use std::fs;
    use std::time::Instant;

    fn params(k: usize, seed: u64) -> KMeansParams {
        KMeansParams {
            k,
            seed,
            ..KMeansParams::default()
        }
    }

    /// `n` points from `centres.nrows()` Gaussian blobs (label = blob).
    fn blobs(
        rng: &mut SplitMix,
        centres: &Array2<f32>,
        n: usize,
        spread: f64,
    ) -> (Array2<f32>, Array1<u16>) {
        let y: Array1<u16> = (0..n).map(|_| rng.below(centres.nrows()) as u16).collect();
        let x = Array2::from_shape_fn((n, centres.ncols()), |(i, j)| {
            centres[[usize::from(y[i]), j]] + (spread * rng.normal()) as f32
        });
        (x, y)
    }

    fn blob_centres(rng: &mut SplitMix, k: usize, d: usize, scale: f64) -> Array2<f32> {
        Array2::from_shape_fn((k, d), |_| (scale * rng.normal()) as f32)
    }

    fn accuracy(m: &dyn Learner, x: ArrayView2<f32>, y: ArrayView1<u16>) -> f64 {
        let pred = m.predict(x).unwrap();
        pred.iter().zip(y).filter(|(p, t)| p == t).count() as f64 / y.len() as f64
    }

    fn fit_batches(m: &mut KMeans, x: &Array2<f32>, y: &Array1<u16>, bs: usize) -> Vec<f64> {
        x.axis_chunks_iter(Axis(0), bs)
            .zip(y.axis_chunks_iter(Axis(0), bs))
            .map(|(xb, yb)| m.partial_fit(xb, yb).unwrap())
            .collect()
    }

    /// Everything that makes up the model's state, bit for bit.
    fn state(m: &KMeans) -> (Vec<u32>, Vec<u64>, Vec<u64>, [u64; 7]) {
        (
            m.centres
                .as_ref()
                .map(|c| c.iter().map(|v| v.to_bits()).collect())
                .unwrap_or_default(),
            m.counts.clone(),
            m.label_counts.iter().copied().collect(),
            [
                m.seeded as u64,
                m.seen,
                m.steps,
                m.since_reassign,
                m.reassignments,
                m.rng.0,
                m.n_features().map_or(u64::MAX, |d| d as u64),
            ],
        )
    }

    #[test]
    fn params_are_checked() {
        assert!(KMeansParams::default().check().is_ok());
        let bad = [
            KMeansParams {
                k: 0,
                ..KMeansParams::default()
            },
            KMeansParams {
                batch_size: 0,
                ..KMeansParams::default()
            },
            KMeansParams {
                reassignment_ratio: -0.1,
                ..KMeansParams::default()
            },
            KMeansParams {
                reassignment_ratio: 1.5,
                ..KMeansParams::default()
            },
            KMeansParams {
                reassignment_ratio: f32::NAN,
                ..KMeansParams::default()
            },
        ];
        for p in bad {
            assert!(p.check().is_err(), "{p:?}");
            assert!(KMeans::new(p).is_err());
        }
        let p: KMeansParams = serde_json::from_str("{\"k\": 7}").unwrap();
        assert_eq!(
            p,
            KMeansParams {
                k: 7,
                ..KMeansParams::default()
            }
        );
        assert_eq!((p.reassignment_ratio, p.batch_size, p.seed), (0.01, 128, 0));
        assert!(serde_json::from_str::<KMeansParams>("{\"kk\": 7}").is_err());
    }

    #[test]
    fn update_follows_the_one_over_count_rule_1d() {
        let mut m = KMeans::new(params(2, 0)).unwrap();
        // Two rows for two centres: both become centres, in order.
        let inertia = m
            .partial_fit(array![[0.0f32], [10.0]].view(), array![3u16, 4].view())
            .unwrap();
        assert_eq!(inertia, 0.0);
        assert_eq!(m.centres().unwrap(), array![[0.0f32], [10.0]]);
        assert_eq!(m.counts(), &[1, 1]);
        // 1 and 2 go to centre 0 (count 1 → 3), 9 to centre 1 (count 1 → 2).
        let inertia = m
            .partial_fit(
                array![[1.0f32], [2.0], [9.0]].view(),
                array![3u16, 5, 4].view(),
            )
            .unwrap();
        assert_eq!(inertia, (1.0 + 4.0 + 1.0) / 3.0);
        assert_eq!(m.centres().unwrap(), array![[1.0f32], [9.5]]);
        assert_eq!(m.counts(), &[3, 2]);
        assert_eq!(
            m.label_counts().row(0).to_vec(),
            [0, 0, 0, 2, 0, 1, 0, 0, 0, 0]
        );
        assert_eq!(
            m.label_counts().row(1).to_vec(),
            [0, 0, 0, 0, 2, 0, 0, 0, 0, 0]
        );
        assert_eq!((m.seen(), m.steps(), m.reassignments()), (5, 2, 0));
        // 4 goes to centre 0 (|4-1| = 3 < |4-9.5|): (1·3 + 4) / 4 = 1.75.
        m.partial_fit(array![[4.0f32]].view(), array![0u16].view())
            .unwrap();
        assert_eq!(m.centres().unwrap(), array![[1.75f32], [9.5]]);
        assert_eq!(m.counts(), &[4, 2]);
    }

    #[test]
    fn update_follows_the_one_over_count_rule_2d() {
        let mut m = KMeans::new(params(2, 0)).unwrap();
        m.partial_fit(
            array![[0.0f32, 0.0], [4.0, 4.0]].view(),
            array![0u16, 1].view(),
        )
        .unwrap();
        // All three rows are nearer (0, 0): (0·1 + (1, 0) + (0, 2) + (−1, 2)) / 4.
        let x = array![[1.0f32, 0.0], [0.0, 2.0], [-1.0, 2.0]];
        let inertia = m.partial_fit(x.view(), array![0u16, 0, 2].view()).unwrap();
        assert_eq!(inertia, (1.0 + 4.0 + 5.0) / 3.0);
        assert_eq!(m.centres().unwrap(), array![[0.0f32, 1.0], [4.0, 4.0]]);
        assert_eq!(m.counts(), &[4, 1], "a centre without rows keeps its count");
        assert_eq!(
            m.label_counts().row(0).to_vec(),
            [3, 0, 1, 0, 0, 0, 0, 0, 0, 0]
        );
        // Several rows to each centre at once, in f32 as the rule says.
        let x = array![[0.5f32, 1.5], [3.0, 5.0], [5.0, 3.5], [-0.5, 0.5]];
        m.partial_fit(x.view(), array![0u16, 1, 1, 0].view())
            .unwrap();
        let c0 = [
            (0.0f32 * 4.0 + 0.5 - 0.5) / 6.0,
            (1.0f32 * 4.0 + 1.5 + 0.5) / 6.0,
        ];
        let c1 = [(4.0f32 + 3.0 + 5.0) / 3.0, (4.0f32 + 5.0 + 3.5) / 3.0];
        let got = m.centres().unwrap();
        for (g, w) in got.iter().zip(c0.iter().chain(&c1)) {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                "{got} vs {c0:?} {c1:?}"
            );
        }
        assert_eq!(m.counts(), &[6, 3]);
    }

    #[test]
    fn predict_proba_is_the_smoothed_label_distribution_of_the_cluster() {
        let mut m = KMeans::new(params(2, 0)).unwrap();
        let x0 = Array2::<f32>::zeros((3, 1));
        // Untrained: uniform, any width.
        let p = m.predict_proba(x0.view()).unwrap();
        assert!(p.iter().all(|&v| v == 0.1));
        assert_eq!(
            m.predict_proba(Array2::zeros((2, 5)).view()).unwrap().dim(),
            (2, CLASSES)
        );
        assert!(m.clusters(x0.view()).unwrap().is_err());
        assert_eq!(
            m.clusters(Array2::zeros((0, 1)).view()).unwrap().unwrap(),
            Vec::<u32>::new()
        );

        m.partial_fit(array![[0.0f32], [10.0]].view(), array![7u16, 2].view())
            .unwrap();
        m.partial_fit(
            array![[0.5f32], [-0.5], [0.2], [9.0], [11.0]].view(),
            array![3u16, 3, 7, 2, 5].view(),
        )
        .unwrap();
        // Cluster 0: labels 7, 3, 3, 7 (tie 3/7); cluster 1: 2, 2, 5.
        let x = array![[0.1f32], [9.9], [-3.0]];
        assert_eq!(m.clusters(x.view()).unwrap().unwrap(), vec![0, 1, 0]);
        let p = m.predict_proba(x.view()).unwrap();
        let mut want0 = [1.0f32 / 14.0; CLASSES];
        want0[3] = 3.0 / 14.0;
        want0[7] = 3.0 / 14.0;
        let mut want1 = [1.0f32 / 13.0; CLASSES];
        want1[2] = 3.0 / 13.0;
        want1[5] = 2.0 / 13.0;
        for (row, want) in p.rows().into_iter().zip([want0, want1, want0]) {
            for (a, b) in row.iter().zip(want) {
                assert!((a - b).abs() < 1e-7, "{row} vs {want:?}");
            }
            assert!((row.sum() - 1.0).abs() < 1e-6);
        }
        assert_eq!(m.predict(x.view()).unwrap(), array![3u16, 2, 3]);
    }

    #[test]
    fn recovers_gaussian_blobs() {
        let mut rng = SplitMix(42);
        let (k, d) = (10, 20);
        let truth = blob_centres(&mut rng, k, d, 5.0);
        let (x, y) = blobs(&mut rng, &truth, 4096, 1.0);
        let (xt, yt) = blobs(&mut rng, &truth, 1024, 1.0);
        let mut m = KMeans::new(params(k, 1)).unwrap();
        let inertia = fit_batches(&mut m, &x, &y, 128);
        // Inertia per image falls to about d·spread² = 20.
        let last = *inertia.last().unwrap();
        println!("blobs: inertia first {:.1}, last {last:.2}", inertia[0]);
        assert!(last < 1.3 * d as f64, "{inertia:?}");
        // Purity: each blob's points land in one cluster.
        let cl = m.clusters(xt.view()).unwrap().unwrap();
        let mut table = Array2::<usize>::zeros((k, k));
        for (&c, &l) in cl.iter().zip(&yt) {
            table[[usize::from(l), c as usize]] += 1;
        }
        for (blob, row) in table.rows().into_iter().enumerate() {
            let purity = *row.iter().max().unwrap() as f64 / row.sum() as f64;
            assert!(purity >= 0.95, "blob {blob}: {row}");
        }
        let acc = accuracy(&m, xt.view(), yt.view());
        println!(
            "blobs: held-out accuracy {acc:.4}, reassignments {}",
            m.reassignments()
        );
        assert!(acc >= 0.95, "accuracy {acc}\n{table}");
        // Every training label is in the label table (unless a reassignment cleared some).
        if m.reassignments() == 0 {
            assert_eq!(m.label_counts().sum(), 4096);
        }
    }

    #[test]
    fn kmeans_plus_plus_spreads_the_seeds() {
        // Three tight groups far apart: one seed in each, whatever the seed.
        let base = array![[0.0f32, 0.0], [100.0, 0.0], [0.0, 100.0]];
        for seed in 0..20 {
            let mut rng = SplitMix(seed + 1000);
            let (x, y) = blobs(&mut rng, &base, 60, 0.5);
            let mut m = KMeans::new(params(3, seed)).unwrap();
            let mut c = Array2::zeros((3, 2));
            let mut x_sq = Vec::new();
            push_row_sq_norms(x.view(), &mut x_sq).unwrap();
            assert_eq!(seed_centres(&mut c, 0, x.view(), &x_sq, &mut m.rng), 3);
            let mut groups: Vec<usize> = c
                .rows()
                .into_iter()
                .map(|r| usize::from(r[0] > 50.0) + 2 * usize::from(r[1] > 50.0))
                .collect();
            groups.sort_unstable();
            assert_eq!(groups, [0, 1, 2], "seed {seed}: {c}");
            m.partial_fit(x.view(), y.view()).unwrap();
            assert_eq!(m.seeded(), 3);
        }
    }

    #[test]
    fn fewer_rows_than_k_seeds_the_rest_later() {
        let mut rng = SplitMix(5);
        let truth = blob_centres(&mut rng, 4, 3, 20.0);
        let (x, y) = blobs(&mut rng, &truth, 200, 0.5);
        let mut m = KMeans::new(params(4, 9)).unwrap();
        m.partial_fit(x.slice(s![..2, ..]), y.slice(s![..2]))
            .unwrap();
        assert_eq!(m.seeded(), 2);
        assert_eq!(m.centres().unwrap(), x.slice(s![..2, ..]));
        assert_eq!(m.counts(), &[1, 1, 0, 0]);
        // Only the seeded centres are used meanwhile.
        assert!(m
            .clusters(x.view())
            .unwrap()
            .unwrap()
            .iter()
            .all(|&c| c < 2));
        m.partial_fit(x.slice(s![2..3, ..]), y.slice(s![2..3]))
            .unwrap();
        assert_eq!(m.seeded(), 3);
        // Save here and check the seeding continues identically after loading.
        let dir = tempfile::tempdir().unwrap();
        m.save(dir.path()).unwrap();
        let mut loaded = KMeans::load(dir.path()).unwrap();
        assert_eq!(state(&loaded), state(&m));
        m.partial_fit(x.slice(s![3..40, ..]), y.slice(s![3..40]))
            .unwrap();
        loaded
            .partial_fit(x.slice(s![3..40, ..]), y.slice(s![3..40]))
            .unwrap();
        assert_eq!(m.seeded(), 4);
        assert_eq!(state(&loaded), state(&m));
        fit_batches(
            &mut m,
            &x.slice(s![40.., ..]).to_owned(),
            &y.slice(s![40..]).to_owned(),
            32,
        );
        assert!(accuracy(&m, x.view(), y.view()) > 0.9);
    }

    #[test]
    fn reassigns_a_centre_that_gets_no_points() {
        let mut rng = SplitMix(11);
        let truth = blob_centres(&mut rng, 3, 4, 10.0);
        let (x, y) = blobs(&mut rng, &truth, 640, 0.5);
        let p = KMeansParams {
            k: 3,
            reassignment_ratio: 0.5,
            seed: 2,
            ..KMeansParams::default()
        };
        let mut m = KMeans::new(p).unwrap();
        m.partial_fit(x.slice(s![..64, ..]), y.slice(s![..64]))
            .unwrap();
        assert_eq!(m.since_reassign, 0, "empty centres force the first check");
        let r0 = m.reassignments();
        // Move centre 2 far away: it gets no more points, its count stays.
        m.centres.as_mut().unwrap().row_mut(2).fill(1e6);
        let c2 = m.counts()[2];
        let mut moved_at = None;
        for (b, (xb, yb)) in x
            .slice(s![64.., ..])
            .axis_chunks_iter(Axis(0), 8)
            .zip(y.slice(s![64..]).axis_chunks_iter(Axis(0), 8))
            .enumerate()
        {
            m.partial_fit(xb, yb).unwrap();
            let max = m.counts()[0].max(m.counts()[1]);
            // The check fires once 10·k = 30 images have passed: every 4th batch of 8.
            let check = (b + 1) % 4 == 0;
            assert_eq!(
                m.since_reassign,
                if check { 0 } else { 8 * (b as u64 % 4 + 1) }
            );
            if m.reassignments() > r0 {
                assert!(check && (c2 as f64) < 0.5 * max as f64, "batch {b}");
                moved_at = Some(b);
                break;
            }
            assert!(!check || c2 as f64 >= 0.5 * max as f64, "batch {b}");
            assert_eq!(m.counts()[2], c2);
        }
        let b = moved_at.expect("centre 2 was never reassigned");
        assert_eq!(m.reassignments(), r0 + 1);
        assert_eq!(m.counts()[2], m.counts()[0].min(m.counts()[1]));
        assert_eq!(m.label_counts().row(2).sum(), 0);
        let c = m.centres().unwrap();
        let start = 64 + 8 * b;
        assert!(
            x.slice(s![start..start + 8, ..])
                .rows()
                .into_iter()
                .any(|r| r == c.row(2)),
            "the new centre is a row of the batch"
        );
        // Back among the points, it gets some again.
        let before = m.counts()[2];
        fit_batches(
            &mut m,
            &x.slice(s![..256, ..]).to_owned(),
            &y.slice(s![..256]).to_owned(),
            64,
        );
        assert!(m.counts()[2] > before);
    }

    #[test]
    fn save_load_continues_bit_identically() {
        let mut rng = SplitMix(3);
        let truth = blob_centres(&mut rng, 6, 16, 3.0);
        let (x, y) = blobs(&mut rng, &truth, 1200, 2.0);
        let p = KMeansParams {
            k: 8,
            reassignment_ratio: 0.3,
            seed: 17,
            ..KMeansParams::default()
        };
        let mut a = KMeans::new(p).unwrap();
        fit_batches(
            &mut a,
            &x.slice(s![..300, ..]).to_owned(),
            &y.slice(s![..300]).to_owned(),
            100,
        );
        let dir = tempfile::tempdir().unwrap();
        a.save(dir.path()).unwrap();
        let mut b = KMeans::load(dir.path()).unwrap();
        assert_eq!(state(&a), state(&b));
        assert_eq!(b.params(), a.params());
        let boxed = model::load(dir.path()).unwrap();
        assert_eq!(boxed.name(), NAME);
        let pa = a.predict_proba(x.view()).unwrap();
        assert_eq!(pa, b.predict_proba(x.view()).unwrap());
        assert_eq!(pa, boxed.predict_proba(x.view()).unwrap());
        assert_eq!(
            a.clusters(x.view()).unwrap().unwrap(),
            boxed.clusters(x.view()).unwrap().unwrap()
        );
        let rest_x = x.slice(s![300.., ..]).to_owned();
        let rest_y = y.slice(s![300..]).to_owned();
        let la = fit_batches(&mut a, &rest_x, &rest_y, 100);
        let lb = fit_batches(&mut b, &rest_x, &rest_y, 100);
        assert_eq!(la, lb);
        assert_eq!(state(&a), state(&b));
        assert!(
            a.reassignments() > 0,
            "the run should exercise reassignment"
        );
        // Saving again over the same folder, and loading, still agrees.
        b.save(dir.path()).unwrap();
        assert_eq!(state(&KMeans::load(dir.path()).unwrap()), state(&a));
    }

    #[test]
    fn untrained_save_load() {
        let dir = tempfile::tempdir().unwrap();
        let m = KMeans::new(params(5, 99)).unwrap();
        m.save(dir.path()).unwrap();
        let mut l = KMeans::load(dir.path()).unwrap();
        assert_eq!(state(&l), state(&m));
        assert_eq!(l.params(), m.params());
        assert_eq!(l.n_features(), None);
        let p = l.predict_proba(Array2::zeros((2, 7)).view()).unwrap();
        assert!(p.iter().all(|&v| v == 0.1));
        // It trains as a new one would.
        let mut fresh = KMeans::new(params(5, 99)).unwrap();
        let x = Array2::from_shape_fn((20, 3), |(i, j)| ((i * 7 + j * 3) % 11) as f32);
        let y: Array1<u16> = (0..20).map(|i| (i % 10) as u16).collect();
        assert_eq!(
            l.partial_fit(x.view(), y.view()).unwrap(),
            fresh.partial_fit(x.view(), y.view()).unwrap()
        );
        assert_eq!(state(&l), state(&fresh));
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = KMeans::new(params(3, 0)).unwrap();
        let x = Array2::from_shape_fn((6, 2), |(i, j)| (i * 2 + j) as f32);
        m.partial_fit(x.view(), array![0u16, 1, 2, 3, 4, 5].view())
            .unwrap();
        m.save(dir.path()).unwrap();
        let st = dir.path().join(TENSORS_FILE);
        let js = dir.path().join(META_FILE);
        let good_js = fs::read_to_string(&js).unwrap();
        let good_st = fs::read(&st).unwrap();
        let names = |e: &Error, file: &str| matches!(e, Error::Format { path, .. } | Error::Io { path, .. } if path.ends_with(file));
        for (what, bad) in [
            ("k 0", good_js.replace("\"k\": 3", "\"k\": 0")),
            (
                "seeded > k",
                good_js.replace("\"seeded\": 3", "\"seeded\": 4"),
            ),
            (
                "seeded 0",
                good_js.replace("\"seeded\": 3", "\"seeded\": 0"),
            ),
            (
                "n_features 0",
                good_js.replace("\"n_features\": 2", "\"n_features\": 0"),
            ),
            (
                "unknown field",
                good_js.replace("\"seen\": 6", "\"seen\": 6, \"x\": 1"),
            ),
            ("truncated", good_js[..good_js.len() / 2].to_string()),
        ] {
            assert_ne!(bad, good_js, "{what}: the edit did not apply");
            fs::write(&js, bad).unwrap();
            let e = KMeans::load(dir.path()).err().unwrap();
            assert!(names(&e, META_FILE), "{what}: {e}");
        }
        fs::write(
            &js,
            good_js.replace("\"n_features\": 2", "\"n_features\": 3"),
        )
        .unwrap();
        let e = KMeans::load(dir.path()).err().unwrap();
        assert!(
            names(&e, TENSORS_FILE) && e.to_string().contains("shape"),
            "{e}"
        );
        // A save torn between its two renames: model.json from a later save.
        let later = tempfile::tempdir().unwrap();
        m.partial_fit(x.view(), array![0u16, 1, 2, 3, 4, 5].view())
            .unwrap();
        m.save(later.path()).unwrap();
        fs::copy(later.path().join(META_FILE), &js).unwrap();
        let e = KMeans::load(dir.path()).err().unwrap();
        assert!(
            names(&e, TENSORS_FILE) && e.to_string().contains("different saves"),
            "{e}"
        );
        fs::write(&js, &good_js).unwrap();
        fs::write(&st, &good_st[..good_st.len() - 3]).unwrap();
        let e = model::load(dir.path()).err().unwrap();
        assert!(names(&e, TENSORS_FILE), "{e}");
        fs::write(&st, &good_st).unwrap();
        assert!(model::load(dir.path()).is_ok());
    }

    #[test]
    fn bad_batches_are_errors_and_change_nothing() {
        let mut m = KMeans::new(params(3, 0)).unwrap();
        let x = Array2::from_shape_fn((5, 4), |(i, j)| (i * j) as f32 / 10.0);
        let y = array![1u16, 2, 3, 4, 5];
        let empty = Array2::<f32>::zeros((0, 4));
        assert_eq!(m.partial_fit(empty.view(), array![].view()).unwrap(), 0.0);
        assert!(m
            .partial_fit(x.view(), array![1u16, 2, 3, 4, 10].view())
            .is_err());
        let mut huge = x.clone();
        huge[[3, 0]] = 1e19;
        let e = m.partial_fit(huge.view(), y.view()).unwrap_err();
        assert!(e.to_string().contains("row 3"), "{e}");
        assert_eq!(
            state(&m),
            state(&KMeans::new(params(3, 0)).unwrap()),
            "nothing fixed"
        );

        m.partial_fit(x.view(), y.view()).unwrap();
        let before = state(&m);
        let wide = Array2::<f32>::zeros((5, 5));
        let e = m.partial_fit(wide.view(), y.view()).unwrap_err();
        assert!(
            e.to_string().contains("5 features") && e.to_string().contains("expects 4"),
            "{e}"
        );
        assert!(m.predict_proba(wide.view()).is_err());
        assert!(m.clusters(wide.view()).unwrap().is_err());
        let e = m
            .partial_fit(x.view(), array![1u16, 2, 3, 4, 10].view())
            .unwrap_err();
        assert!(e.to_string().contains("label 10"), "{e}");
        assert!(m.partial_fit(x.view(), array![1u16, 2].view()).is_err());
        let mut nan = x.clone();
        nan[[2, 1]] = f32::NAN;
        assert!(m.partial_fit(nan.view(), y.view()).is_err());
        assert!(m.predict_proba(nan.view()).is_err());
        nan[[2, 1]] = f32::INFINITY;
        assert!(m.partial_fit(nan.view(), y.view()).is_err());
        assert!(m.partial_fit(huge.view(), y.view()).is_err());
        assert!(m.predict_proba(huge.view()).is_err());
        assert_eq!(m.partial_fit(empty.view(), array![].view()).unwrap(), 0.0);
        assert_eq!(state(&m), before);
        assert_eq!(m.predict_proba(empty.view()).unwrap().dim(), (0, CLASSES));
    }

    #[test]
    fn same_seed_same_model() {
        let mut rng = SplitMix(8);
        let truth = blob_centres(&mut rng, 10, 12, 2.0);
        let (x, y) = blobs(&mut rng, &truth, 1000, 1.5);
        let run = |seed: u64| {
            let mut m = KMeans::new(params(10, seed)).unwrap();
            let l = fit_batches(&mut m, &x, &y, 128);
            (l, state(&m))
        };
        assert_eq!(run(4), run(4));
        assert_ne!(run(4).1 .0, run(5).1 .0, "another seed, other centres");
        // A transposed (column-major) view gives the same model.
        let xt = x.t().to_owned();
        let mut a = KMeans::new(params(10, 4)).unwrap();
        let mut b = KMeans::new(params(10, 4)).unwrap();
        a.partial_fit(x.slice(s![..200, ..]), y.slice(s![..200]))
            .unwrap();
        b.partial_fit(xt.t().slice(s![..200, ..]), y.slice(s![..200]))
            .unwrap();
        let (ca, cb) = (a.centres().unwrap(), b.centres().unwrap());
        assert!(ca.iter().zip(cb).all(|(p, q)| (p - q).abs() < 1e-4));
    }

    /// `n` synthetic training images from index `from`, normalised as the trainer does.
    fn synth_images(from: u64, n: usize) -> (Array2<f32>, Array1<u16>) {
        let mut buf = vec![0u8; 3072];
        let mut x = Array2::zeros((n, 3072));
        let mut y = Array1::zeros(n);
        for (i, mut row) in x.rows_mut().into_iter().enumerate() {
            y[i] = crate::dataset::synth::image(
                0,
                crate::dataset::Split::Train,
                from + i as u64,
                &mut buf,
            );
            for (v, &p) in row.iter_mut().zip(&buf) {
                *v = (f32::from(p) / 255.0 - 0.47) / 0.25;
            }
        }
        (x, y)
    }

    #[test]
    fn learns_the_synthetic_set_above_chance() {
        // Raw pixels cluster mostly by colour, which the synthetic labels do not follow,
        // so k = 10 clusters map to labels barely above chance (about 0.13 held out);
        // more clusters give a finer map: k = 200 gets about 0.18 from 2048 images.
        let (x, y) = synth_images(0, 2048);
        let (xt, yt) = synth_images(100_000, 1024);
        let mut m = KMeans::new(KMeansParams {
            k: 200,
            ..KMeansParams::default()
        })
        .unwrap();
        let inertia = fit_batches(&mut m, &x, &y, 128);
        let acc = accuracy(&m, xt.view(), yt.view());
        println!(
            "synth k=200: inertia per image second batch {:.1}, last {:.1}; held-out accuracy {acc:.3}",
            inertia[1],
            inertia.last().unwrap()
        );
        assert!(acc >= 0.15, "accuracy {acc}");
        // The first batch (128 < k rows) became centres, each at distance 0 (up to the
        // rounding of ‖x‖² − 2x·c + ‖c‖²).
        assert!(inertia[0] < 1e-3 * inertia[1], "{inertia:?}");
        assert_eq!(m.seeded(), 200);
    }

    /// Throughput of partial_fit at d = 3072, k = 10, batches of 128 (run with
    /// `MATMUL_NUM_THREADS=1 cargo test --release --lib -- --ignored --nocapture
    /// kmeans::tests::throughput`).
    #[test]
    #[ignore]
    fn throughput() {
        let (n, d) = (16_384, 3072);
        let mut rng = SplitMix(1);
        let x = Array2::from_shape_fn((n, d), |_| (rng.uniform() * 2.0 - 1.0) as f32);
        let y: Array1<u16> = (0..n).map(|i| (i % CLASSES) as u16).collect();
        let mut m = KMeans::new(KMeansParams::default()).unwrap();
        fit_batches(
            &mut m,
            &x.slice(s![..1024, ..]).to_owned(),
            &y.slice(s![..1024]).to_owned(),
            128,
        );
        let passes = 4;
        let t = Instant::now();
        for _ in 0..passes {
            for (xb, yb) in x
                .axis_chunks_iter(Axis(0), 128)
                .zip(y.axis_chunks_iter(Axis(0), 128))
            {
                m.partial_fit(xb, yb).unwrap();
            }
        }
        let fit = (passes * n) as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut s = 0.0;
        for _ in 0..passes {
            s += m.predict_proba(x.view()).unwrap()[[0, 0]];
        }
        let pred = (passes * n) as f64 / t.elapsed().as_secs_f64();
        println!("kmeans d={d} k=10 batch 128: partial_fit {fit:.0} images/s, predict_proba {pred:.0} images/s ({s})");
    }
}
