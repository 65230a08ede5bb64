//! The patch extractor: single-layer features learnt from the images themselves, without
//! labels (Coates, Lee & Ng 2011; Thiry et al. 2021).
//!
//! Fitting, from the first images of the source:
//! 1. `samples` random `patch`×`patch`×3 patches, each normalised for brightness and
//!    contrast: `(p − mean(p)) / sqrt(var(p) + 10)` on the 0..255 scale;
//! 2. ZCA whitening `W = U·diag(1/sqrt(λ + eps))·Uᵀ` from their covariance, estimated on
//!    the patches *and their mirror images* so that `W` commutes with the horizontal
//!    mirror;
//! 3. a dictionary of `atoms` unit atoms in the whitened space: `atoms/2` sampled whitened
//!    patches (`dictionary = "patches"`) or spherical k-means centres (`"kmeans"`), plus
//!    the mirror image of each;
//! 4. the mean and standard deviation of every feature over `stats_images` images, for
//!    the final standardisation.
//!
//! Encoding an image: every patch (stride 1) is normalised, whitened and compared with
//! every atom in **one matrix product** (`patches × (atoms·W)ᵀ`, 729 × 108 × 2,048 for the
//! defaults); the responses `r` are encoded by a soft threshold with a polarity split
//! (`max(0, r − α)`, `max(0, −r − α)`) or Coates' triangle (`max(0, mean(z) − z_k)`, `z` the
//! distances to the atoms), averaged over the cells of a `grid`×`grid` spatial grid,
//! raised to `power` (0.5 in `configs/patches.toml`: the square root), and standardised.
//!
//! Because the dictionary, the whitening and the grid are all mirror-symmetric, the
//! features of a mirrored image are a fixed permutation of the image's own
//! ([`PatchExtractor::flip_permutation`]): flipped copies cost nothing to make. With
//! `invariant = true` (the default) each feature is summed with its mirror partner and
//! only one of each pair is kept: half the width, and a linear model on them is the same
//! as one trained on the images and their flipped copies and scored flip-averaged.

use ndarray::{s, Array1, Array2, ArrayView2};
use serde::{Deserialize, Serialize};

use crate::dataset::image_bytes;
#[cfg(test)]
use crate::dataset::IMAGE_BYTES;
use crate::error::{Error, Result};
use crate::limits;
use crate::linalg;
use crate::rng::SplitMix;

/// Side of a CIFAR image.
const SIDE: usize = crate::dataset::SIDE;
/// Colour channels.
const CHANNELS: usize = 3;
/// The brightness/contrast normalisation's variance floor (0..255 scale, Coates').
const CONTRAST_FLOOR: f32 = 10.0;
/// Patch-position rows whose responses are computed in one product (memory in cache).
const ROWS_PER_CHUNK: usize = 3;

/// How the dictionary is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dictionary {
    /// Randomly sampled whitened patches (Thiry et al.).
    Patches,
    /// Spherical k-means centres of whitened patches (Coates et al.).
    Kmeans,
}

/// How responses are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// `max(0, d·x − α)` and `max(0, −d·x − α)`: two features per atom.
    Threshold,
    /// Coates' triangle: `max(0, mean_k(z) − z_k)`, `z_k = ‖x − d_k‖`: one per atom.
    Triangle,
}

/// Hyper-parameters of the patch extractor (the `[features]` table of a config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PatchParams {
    /// Side of a patch in pixels.
    pub patch: usize,
    /// Atoms in the dictionary, mirror images included (even).
    pub atoms: usize,
    /// How the dictionary is made.
    pub dictionary: Dictionary,
    /// How responses are encoded.
    pub encoding: Encoding,
    /// The soft threshold α.
    pub alpha: f32,
    /// Whitening regularisation added to the covariance's eigenvalues.
    pub eps: f64,
    /// Keep only the top principal components of the patches (0: all `3·patch²`): the
    /// encoding's product shrinks in proportion.
    pub components: usize,
    /// Pooling grid side (cells per axis).
    pub grid: usize,
    /// Images the extractor is fitted from (the first of the source).
    pub fit_images: usize,
    /// Patches sampled from them for the whitening and the dictionary.
    pub samples: usize,
    /// Of the fitting images, how many are encoded for the standardisation statistics.
    pub stats_images: usize,
    /// Spherical k-means iterations (`dictionary = "kmeans"`).
    pub kmeans_iters: usize,
    /// Sum each feature with its mirror partner (flip-invariant, half the width).
    pub invariant: bool,
    /// Power normalisation of the pooled features before the standardisation: each becomes
    /// `v^power` (1: none; 0.5: the square root, a Hellinger kernel's map). Pooled features
    /// are means of non-negative codes; the sign is kept all the same.
    pub power: f32,
    /// Seed of the patch sampling.
    pub seed: u64,
    /// Side of the images it encodes, in pixels: the run's image size (`--image-size`),
    /// set when the extractor is fitted.
    pub side: usize,
}

impl Default for PatchParams {
    fn default() -> Self {
        PatchParams {
            patch: 6,
            atoms: 2048,
            dictionary: Dictionary::Patches,
            encoding: Encoding::Threshold,
            alpha: 0.75,
            eps: 0.01,
            components: 0,
            grid: 3,
            fit_images: 5000,
            samples: 100_000,
            stats_images: 1000,
            kmeans_iters: 10,
            invariant: true,
            power: 1.0,
            seed: 0,
            side: SIDE,
        }
    }
}

impl PatchParams {
    /// Checks the values once, with a message naming the bad one.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::usage(format!("features: {m}")));
        let side = self.side;
        if !(4..=crate::dataset::MAX_IMAGE_SIDE).contains(&side) {
            return bad(format!(
                "side = {side} must be 4..={} (the images' side)",
                crate::dataset::MAX_IMAGE_SIDE
            ));
        }
        if self.patch == 0 || self.patch > side {
            return bad(format!(
                "patch = {} must be 1..={side} (the images are {side}x{side})",
                self.patch
            ));
        }
        if self.atoms < 2 || !self.atoms.is_multiple_of(2) || self.atoms > 65_536 {
            return bad(format!(
                "atoms = {} must be even, 2..=65536 (each atom comes with its mirror image)",
                self.atoms
            ));
        }
        let positions = side - self.patch + 1;
        if self.grid == 0 || self.grid > positions {
            return bad(format!("grid = {} must be 1..={positions}", self.grid));
        }
        if !(self.power > 0.0 && self.power <= 1.0) {
            return bad(format!("power = {} must be in (0, 1]", self.power));
        }
        if !(self.alpha.is_finite() && self.alpha >= 0.0) {
            return bad(format!("alpha = {} must be finite and ≥ 0", self.alpha));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad(format!("eps = {} must be finite and > 0", self.eps));
        }
        if self.fit_images == 0 || self.samples < self.atoms / 2 || self.stats_images == 0 {
            return bad(format!(
                "fit_images = {}, samples = {} and stats_images = {} must be ≥ 1, and samples ≥ atoms/2",
                self.fit_images, self.samples, self.stats_images
            ));
        }
        Ok(())
    }

    fn dim(&self) -> usize {
        CHANNELS * self.patch * self.patch
    }

    /// Patch positions along an axis.
    fn positions(&self) -> usize {
        self.side - self.patch + 1
    }

    /// Bytes of one image it encodes.
    pub fn image_bytes(&self) -> usize {
        image_bytes(self.side)
    }

    /// Principal components kept of `d`.
    fn kept(&self, d: usize) -> usize {
        if self.components == 0 {
            d
        } else {
            self.components.min(d)
        }
    }

    fn polarities(&self) -> usize {
        match self.encoding {
            Encoding::Threshold => 2,
            Encoding::Triangle => 1,
        }
    }

    /// Width of the pooled features before the flip-invariant fold.
    fn full_width(&self) -> usize {
        self.polarities() * self.grid * self.grid * self.atoms
    }

    /// Width of the extractor's output.
    pub fn width(&self) -> usize {
        if self.invariant {
            self.full_width() / 2
        } else {
            self.full_width()
        }
    }
}

/// A fitted patch extractor.
#[derive(Clone, Debug)]
pub struct PatchExtractor {
    /// Its hyper-parameters.
    pub params: PatchParams,
    /// Mean of the normalised patches (`dim`).
    pub mean: Array1<f32>,
    /// Covariance of the normalised patches and their mirrors (`dim` × `dim`), kept so
    /// the whitening can be checked.
    pub cov: Array2<f32>,
    /// The ZCA whitening matrix (`dim` × `dim`).
    pub whiten: Array2<f32>,
    /// The dictionary in the whitened space (`atoms` × `dim`); atom `k + atoms/2` is the
    /// mirror image of atom `k`.
    pub atoms: Array2<f32>,
    /// Mean of each output feature before standardisation.
    pub feature_mean: Array1<f32>,
    /// Standard deviation of each output feature (floored) before standardisation.
    pub feature_std: Array1<f32>,
    /// `(atoms·W)ᵀ` (`dim` × `atoms`), or with `components` the factor after the basis
    /// (`c` × `atoms`): the product every patch goes through.
    filters_t: Array2<f32>,
    /// The top principal directions (`dim` × `c`) when `components` keeps fewer than all.
    basis: Option<Array2<f32>>,
    /// `atoms·W·mean` (`atoms`): subtracted from every response.
    bias: Array1<f32>,
    /// `‖d_k‖²` (`atoms`), for the triangle encoding.
    atom_sq: Array1<f32>,
    /// The pairs an invariant extractor sums ([`PatchExtractor::pairs`]), computed once.
    pair_list: Vec<(usize, usize)>,
    /// The pooling cells of each patch position along an axis, and each cell's count.
    axis: Vec<Vec<usize>>,
    counts: Vec<f32>,
}

/// Index of the patch element (channel, dy, dx) in a patch vector.
fn pidx(p: usize, c: usize, dy: usize, dx: usize) -> usize {
    (c * p + dy) * p + dx
}

/// The mirror image of a patch vector, as an index map.
fn patch_mirror(p: usize) -> Vec<usize> {
    let mut m = vec![0; CHANNELS * p * p];
    for c in 0..CHANNELS {
        for dy in 0..p {
            for dx in 0..p {
                m[pidx(p, c, dy, dx)] = pidx(p, c, dy, p - 1 - dx);
            }
        }
    }
    m
}

/// Writes the normalised patch at (y, x) of `img` (an image of `side`×`side`) into `out`
/// (length 3·p²).
fn normalised_patch(img: &[u8], side: usize, p: usize, y: usize, x: usize, out: &mut [f32]) {
    let mut i = 0;
    for c in 0..CHANNELS {
        for dy in 0..p {
            let row = &img[c * side * side + (y + dy) * side + x..][..p];
            for &v in row {
                out[i] = f32::from(v);
                i += 1;
            }
        }
    }
    let n = out.len() as f32;
    let mean = out.iter().sum::<f32>() / n;
    let var = out.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let inv = 1.0 / (var + CONTRAST_FLOOR).sqrt();
    for v in out.iter_mut() {
        *v = (*v - mean) * inv;
    }
}

/// The cells of a `grid`-cell axis that patch position `x` of `s` positions pools into:
/// mirror-symmetric (position `s−1−x` pools into the mirrored cells); the centre position
/// of an odd `s` with an even `grid` pools into both middle cells.
fn cells_of(x: usize, s: usize, grid: usize) -> Vec<usize> {
    let left = |x: usize| x * grid / s;
    if 2 * x + 1 < s {
        vec![left(x)]
    } else if 2 * x + 1 > s {
        vec![grid - 1 - left(s - 1 - x)]
    } else {
        let (a, b) = (left(x), grid - 1 - left(x));
        if a == b {
            vec![a]
        } else {
            vec![a.min(b), a.max(b)]
        }
    }
}

/// Per-thread scratch of the encoder.
struct Scratch {
    patches: Array2<f32>,
    responses: Array2<f32>,
    whitened: Array2<f32>,
    projected: Array2<f32>,
    pooled: Vec<f32>,
}

impl PatchExtractor {
    /// Fits an extractor on `pixels` (whole images of `side`×`side`, CIFAR layout: `3·side²`
    /// bytes each; the
    /// first `fit_images` are used). Deterministic for the params' seed.
    pub fn fit(params: &PatchParams, pixels: &[u8], side: usize) -> Result<PatchExtractor> {
        let params = &PatchParams {
            side,
            ..params.clone()
        };
        params.validate()?;
        let per_image = params.image_bytes();
        let n_images = (pixels.len() / per_image).min(params.fit_images);
        if n_images == 0 {
            return Err(Error::usage("features: no images to fit the extractor on"));
        }
        let p = params.patch;
        let d = params.dim();
        let s = params.positions();
        // The samples with their centred and mirrored copies, the dictionary with a chunk
        // of its k-means responses, and the encoded statistics images.
        limits::check(
            &format!(
                "the patch extractor (samples = {}, atoms = {}, patch = {p}, grid = {}, \
                 stats_images = {}): its fitting arrays",
                params.samples, params.atoms, params.grid, params.stats_images
            ),
            4 * (3 * limits::product(&[params.samples, d])
                + limits::product(&[4096, params.atoms])
                + 3 * limits::product(&[params.atoms, d])
                + limits::product(&[params.stats_images.min(n_images), params.full_width()])),
        )?;
        let mirror = patch_mirror(p);
        let mut rng = SplitMix(params.seed ^ 0x5eed_f00d_0000_0001);
        let mut samples = Array2::<f32>::zeros((params.samples, d));
        for mut row in samples.rows_mut() {
            let i = rng.below(n_images);
            let (y, x) = (rng.below(s), rng.below(s));
            let img = &pixels[i * per_image..(i + 1) * per_image];
            normalised_patch(
                img,
                side,
                p,
                y,
                x,
                row.as_slice_mut().expect("contiguous row"),
            );
        }
        // Mean and covariance over the patches and their mirror images (f64 sums).
        let mut mean = vec![0f64; d];
        for row in samples.rows() {
            for j in 0..d {
                mean[j] += f64::from(row[j]) + f64::from(row[mirror[j]]);
            }
        }
        let count = 2.0 * params.samples as f64;
        mean.iter_mut().for_each(|m| *m /= count);
        let mean32 = Array1::from_iter(mean.iter().map(|&m| m as f32));
        let centred = &samples - &mean32;
        let mirrored = centred.select(ndarray::Axis(1), &mirror);
        let mut cov32 = Array2::<f32>::zeros((d, d));
        linalg::gemm(
            1.0,
            &centred.t(),
            &centred.view(),
            0.0,
            &mut cov32.view_mut(),
        );
        linalg::gemm(
            1.0,
            &mirrored.t(),
            &mirrored.view(),
            1.0,
            &mut cov32.view_mut(),
        );
        let mut cov = cov32.mapv(|v| f64::from(v) / (count - 1.0));
        // Exactly symmetric (the two products round differently).
        for i in 0..d {
            for j in 0..i {
                let v = 0.5 * (cov[[i, j]] + cov[[j, i]]);
                cov[[i, j]] = v;
                cov[[j, i]] = v;
            }
        }
        let (vals, vecs) = linalg::eigh(&cov);
        let first = d - params.kept(d); // eigenvalues ascend: the top ones are last
        let scaled = Array2::from_shape_fn((d, d), |(r, c)| {
            if c < first {
                0.0
            } else {
                vecs[[r, c]] / (vals[c].max(0.0) + params.eps).sqrt()
            }
        });
        let whiten = scaled.dot(&vecs.t()).mapv(|v| v as f32);
        let whitened = {
            let mut w = Array2::<f32>::zeros((params.samples, d));
            linalg::gemm(1.0, &centred.view(), &whiten.t(), 0.0, &mut w.view_mut());
            w
        };
        let half = params.atoms / 2;
        let mut base = match params.dictionary {
            Dictionary::Patches => {
                let picks = sample_without_replacement(&mut rng, params.samples, half);
                whitened.select(ndarray::Axis(0), &picks)
            }
            Dictionary::Kmeans => spherical_kmeans(&whitened, half, params.kmeans_iters, &mut rng),
        };
        for mut row in base.rows_mut() {
            let norm = row.dot(&row).sqrt().max(1e-12);
            row.mapv_inplace(|v| v / norm);
        }
        let mut atoms = Array2::<f32>::zeros((params.atoms, d));
        atoms.slice_mut(s![..half, ..]).assign(&base);
        atoms
            .slice_mut(s![half.., ..])
            .assign(&base.select(ndarray::Axis(1), &mirror));
        let width = params.width();
        let mut ex = PatchExtractor::assemble(
            params.clone(),
            mean32,
            cov.mapv(|v| v as f32),
            whiten,
            atoms,
            Array1::zeros(width),
            Array1::ones(width),
        )?;
        // Standardisation statistics over the first `stats_images` images.
        let n_stats = params.stats_images.min(n_images);
        let raw = ex.encode_raw(&pixels[..n_stats * per_image])?;
        let (m, sd) = ex.statistics(raw.view());
        ex.feature_mean = m;
        ex.feature_std = sd;
        Ok(ex)
    }

    /// An extractor from its saved parts (checked for shape and finiteness).
    pub fn assemble(
        params: PatchParams,
        mean: Array1<f32>,
        cov: Array2<f32>,
        whiten: Array2<f32>,
        atoms: Array2<f32>,
        feature_mean: Array1<f32>,
        feature_std: Array1<f32>,
    ) -> Result<PatchExtractor> {
        params.validate()?;
        let d = params.dim();
        let width = params.width();
        let shapes_ok = mean.len() == d
            && cov.dim() == (d, d)
            && whiten.dim() == (d, d)
            && atoms.dim() == (params.atoms, d)
            && feature_mean.len() == width
            && feature_std.len() == width;
        if !shapes_ok {
            return Err(Error::usage(format!(
                "patch extractor: tensor shapes do not match its parameters (patch {}, atoms {}, width {width})",
                params.patch, params.atoms
            )));
        }
        if feature_std.iter().any(|&v| v.is_nan() || v <= 0.0) {
            return Err(Error::usage(
                "patch extractor: a feature standard deviation is not positive",
            ));
        }
        let filters = atoms.dot(&whiten); // atoms × dim
        let bias = filters.dot(&mean);
        // With fewer components the product factors through them: patches × basis
        // (dim × c), then × (atoms·basis·diag)ᵀ (c × atoms).
        let c = params.kept(d);
        let (basis, filters_t) = if c < d {
            let (vals, vecs) = linalg::eigh(&cov.mapv(f64::from));
            let basis = vecs.slice(s![.., d - c..]).mapv(|v| v as f32);
            let scale = Array1::from_iter(
                vals.iter()
                    .skip(d - c)
                    .map(|&l| (1.0 / (l.max(0.0) + params.eps).sqrt()) as f32),
            );
            let f = atoms.dot(&basis) * &scale; // atoms × c
            (Some(basis), f.t().as_standard_layout().to_owned())
        } else {
            (None, filters.t().as_standard_layout().to_owned())
        };
        let atom_sq = Array1::from_iter(atoms.rows().into_iter().map(|r| r.dot(&r)));
        let s = params.positions();
        let g = params.grid;
        let axis: Vec<Vec<usize>> = (0..s).map(|x| cells_of(x, s, g)).collect();
        let mut counts = vec![0f32; g * g];
        for cy in &axis {
            for cx in &axis {
                for &a in cy {
                    for &b in cx {
                        counts[a * g + b] += 1.0;
                    }
                }
            }
        }
        let mut ex = PatchExtractor {
            params,
            mean,
            cov,
            whiten,
            atoms,
            feature_mean,
            feature_std,
            filters_t,
            basis,
            bias,
            atom_sq,
            pair_list: Vec::new(),
            axis,
            counts,
        };
        ex.pair_list = ex.pairs();
        Ok(ex)
    }

    /// Width of the output features.
    pub fn width(&self) -> usize {
        self.params.width()
    }

    /// Multiply-adds per image of the main product (for GFLOP/s figures).
    pub fn macs_per_image(&self) -> u64 {
        let s = self.params.positions() as u64;
        s * s * self.params.dim() as u64 * self.params.atoms as u64
    }

    /// Standardised features of the images in `pixels` (n × [`width`](Self::width)).
    pub fn encode(&self, pixels: &[u8]) -> Result<Array2<f32>> {
        let mut x = self.encode_raw(pixels)?;
        let inv: Vec<f32> = self.feature_std.iter().map(|s| 1.0 / s).collect();
        for mut row in x.rows_mut() {
            for ((v, m), i) in row.iter_mut().zip(self.feature_mean.iter()).zip(&inv) {
                *v = (*v - m) * i;
            }
        }
        Ok(x)
    }

    /// The features before standardisation.
    fn encode_raw(&self, pixels: &[u8]) -> Result<Array2<f32>> {
        let per_image = self.params.image_bytes();
        if !pixels.len().is_multiple_of(per_image) {
            return Err(Error::usage(format!(
                "patch extractor: {} pixel bytes is not a whole number of {per_image}-byte \
                 images ({s}x{s}, the side it was fitted on)",
                pixels.len(),
                s = self.params.side
            )));
        }
        let n = pixels.len() / per_image;
        let width = self.width();
        let mut out = Array2::<f32>::zeros((n, width));
        if n == 0 {
            return Ok(out);
        }
        let threads = linalg::threads().clamp(1, n);
        let per = n.div_ceil(threads);
        let out_slice = out.as_slice_mut().expect("standard layout");
        std::thread::scope(|sc| {
            for (chunk_out, chunk_in) in out_slice
                .chunks_mut(per * width)
                .zip(pixels.chunks(per * per_image))
            {
                sc.spawn(move || {
                    let mut scratch = self.scratch();
                    for (o, img) in chunk_out.chunks_mut(width).zip(chunk_in.chunks(per_image)) {
                        self.encode_one(img, &mut scratch, o);
                    }
                });
            }
        });
        Ok(out)
    }

    fn scratch(&self) -> Scratch {
        let s = self.params.positions();
        let rows = ROWS_PER_CHUNK.min(s) * s;
        Scratch {
            patches: Array2::zeros((rows, self.params.dim())),
            responses: Array2::zeros((rows, self.params.atoms)),
            whitened: Array2::zeros((rows, self.params.dim())),
            projected: Array2::zeros((rows, self.basis.as_ref().map_or(0, |b| b.ncols()))),
            pooled: vec![0.0; self.params.full_width()],
        }
    }

    /// Encodes one image into `out` (the extractor's width), unstandardised.
    fn encode_one(&self, img: &[u8], sc: &mut Scratch, out: &mut [f32]) {
        let p = self.params.patch;
        let k = self.params.atoms;
        let g = self.params.grid;
        let side = self.params.side;
        let s = self.params.positions();
        let pol = self.params.polarities();
        let alpha = self.params.alpha;
        let axis = &self.axis;
        let counts = &self.counts;
        sc.pooled.iter_mut().for_each(|v| *v = 0.0);
        let mut y0 = 0;
        let mut cell_acc = vec![0f32; pol * k];
        while y0 < s {
            let y1 = (y0 + ROWS_PER_CHUNK).min(s);
            let rows = (y1 - y0) * s;
            for (r, mut row) in sc.patches.rows_mut().into_iter().take(rows).enumerate() {
                let (y, x) = (y0 + r / s, r % s);
                normalised_patch(
                    img,
                    side,
                    p,
                    y,
                    x,
                    row.as_slice_mut().expect("contiguous row"),
                );
            }
            let pv = sc.patches.slice(s![..rows, ..]);
            let mut rv = sc.responses.slice_mut(s![..rows, ..]);
            match &self.basis {
                None => linalg::gemm(1.0, &pv, &self.filters_t.view(), 0.0, &mut rv),
                Some(b) => {
                    let mut proj = sc.projected.slice_mut(s![..rows, ..]);
                    linalg::gemm(1.0, &pv, &b.view(), 0.0, &mut proj);
                    linalg::gemm(1.0, &proj.view(), &self.filters_t.view(), 0.0, &mut rv);
                }
            }
            let norms: Option<Vec<f32>> = match self.params.encoding {
                Encoding::Threshold => None,
                Encoding::Triangle => {
                    let centred = &pv - &self.mean;
                    let mut wv = sc.whitened.slice_mut(s![..rows, ..]);
                    linalg::gemm(1.0, &centred.view(), &self.whiten.t(), 0.0, &mut wv);
                    Some(wv.rows().into_iter().map(|r| r.dot(&r)).collect())
                }
            };
            for y in y0..y1 {
                // One image row of positions: accumulate per x-cell, then into the grid.
                for (x, cx) in axis.iter().enumerate() {
                    let r = (y - y0) * s + x;
                    let resp = sc.responses.row(r);
                    let resp = resp.as_slice().expect("contiguous row");
                    let single = axis[y].len() == 1 && cx.len() == 1;
                    match norms.as_ref() {
                        None if single => {
                            // The common case, fused: threshold straight into the one cell.
                            let cell = axis[y][0] * g + cx[0];
                            let (pos_part, neg_part) = sc.pooled.split_at_mut(g * g * k);
                            let pos = &mut pos_part[cell * k..][..k];
                            let neg = &mut neg_part[cell * k..][..k];
                            for (((rv, b), pp), nn) in resp
                                .iter()
                                .zip(self.bias.iter())
                                .zip(pos.iter_mut())
                                .zip(neg.iter_mut())
                            {
                                let v = rv - b;
                                *pp += (v - alpha).max(0.0);
                                *nn += (-v - alpha).max(0.0);
                            }
                            continue;
                        }
                        None => {
                            let (pos, neg) = cell_acc.split_at_mut(k);
                            for ((rv, b), (pp, nn)) in resp
                                .iter()
                                .zip(self.bias.iter())
                                .zip(pos.iter_mut().zip(neg.iter_mut()))
                            {
                                let v = rv - b;
                                *pp = (v - alpha).max(0.0);
                                *nn = (-v - alpha).max(0.0);
                            }
                        }
                        Some(nsq) => {
                            let wsq = nsq[r];
                            let mut sum = 0f32;
                            for ((z, rv), (b, dsq)) in cell_acc
                                .iter_mut()
                                .zip(resp)
                                .zip(self.bias.iter().zip(self.atom_sq.iter()))
                            {
                                *z = (wsq + dsq - 2.0 * (rv - b)).max(0.0).sqrt();
                                sum += *z;
                            }
                            let mean = sum / k as f32;
                            cell_acc.iter_mut().for_each(|z| *z = (mean - *z).max(0.0));
                        }
                    }
                    for &a in &axis[y] {
                        for &b in cx {
                            let cell = a * g + b;
                            for q in 0..pol {
                                let dst = &mut sc.pooled[(q * g * g + cell) * k..][..k];
                                for (d, v) in dst.iter_mut().zip(&cell_acc[q * k..(q + 1) * k]) {
                                    *d += *v;
                                }
                            }
                        }
                    }
                }
            }
            y0 = y1;
        }
        // Mean over each cell's positions.
        for q in 0..pol {
            for (cell, &c) in counts.iter().enumerate() {
                for v in &mut sc.pooled[(q * g * g + cell) * k..][..k] {
                    *v /= c;
                }
            }
        }
        if self.params.invariant {
            for (o, &(i, j)) in out.iter_mut().zip(&self.pair_list) {
                *o = sc.pooled[i] + sc.pooled[j];
            }
        } else {
            out.copy_from_slice(&sc.pooled[..out.len()]);
        }
        let power = self.params.power;
        if power != 1.0 {
            for v in out.iter_mut() {
                *v = v.abs().powf(power).copysign(*v);
            }
        }
    }

    /// Index of the pooled feature (polarity, cell row, cell column, atom).
    fn full_index(&self, q: usize, gi: usize, gj: usize, a: usize) -> usize {
        let (g, k) = (self.params.grid, self.params.atoms);
        ((q * g + gi) * g + gj) * k + a
    }

    /// The mirror partner of each pooled feature: same polarity and cell row, mirrored
    /// cell column, mirror atom.
    fn full_mirror(&self) -> Vec<usize> {
        let (g, k) = (self.params.grid, self.params.atoms);
        let half = k / 2;
        let mut m = vec![0; self.params.full_width()];
        for q in 0..self.params.polarities() {
            for gi in 0..g {
                for gj in 0..g {
                    for a in 0..k {
                        m[self.full_index(q, gi, gj, a)] =
                            self.full_index(q, gi, g - 1 - gj, (a + half) % k);
                    }
                }
            }
        }
        m
    }

    /// The pairs (feature, mirror partner) an invariant extractor sums, one per output
    /// feature: left cell columns with every atom, the middle column (odd grids) with the
    /// first half of the atoms.
    fn pairs(&self) -> Vec<(usize, usize)> {
        let (g, k) = (self.params.grid, self.params.atoms);
        let m = self.full_mirror();
        let mut out = Vec::with_capacity(self.width());
        for q in 0..self.params.polarities() {
            for gi in 0..g {
                for gj in 0..g.div_ceil(2) {
                    let atoms = if 2 * gj + 1 == g { k / 2 } else { k };
                    for a in 0..atoms {
                        let i = self.full_index(q, gi, gj, a);
                        out.push((i, m[i]));
                    }
                }
            }
        }
        out
    }

    /// The permutation taking an image's features to its mirror image's: feature `i` of
    /// the flipped image is feature `perm[i]` of the image. The identity for an invariant
    /// extractor.
    pub fn flip_permutation(&self) -> Vec<usize> {
        if self.params.invariant {
            (0..self.width()).collect()
        } else {
            self.full_mirror()
        }
    }

    /// Mean and floored standard deviation of each column of unstandardised features,
    /// made mirror-symmetric for a non-invariant extractor (so that standardised features
    /// still permute under a flip).
    fn statistics(&self, raw: ArrayView2<f32>) -> (Array1<f32>, Array1<f32>) {
        let n = raw.nrows().max(1) as f64;
        let w = raw.ncols();
        let mut m1 = vec![0f64; w];
        let mut m2 = vec![0f64; w];
        for row in raw.rows() {
            for (j, &v) in row.iter().enumerate() {
                let v = f64::from(v);
                m1[j] += v;
                m2[j] += v * v;
            }
        }
        if !self.params.invariant {
            let perm = self.full_mirror();
            let (a, b) = (m1.clone(), m2.clone());
            for j in 0..w {
                m1[j] = 0.5 * (a[j] + a[perm[j]]);
                m2[j] = 0.5 * (b[j] + b[perm[j]]);
            }
        }
        let var: Vec<f64> = (0..w)
            .map(|j| (m2[j] / n - (m1[j] / n).powi(2)).max(0.0))
            .collect();
        let mean_var = var.iter().sum::<f64>() / w.max(1) as f64;
        let floor = 1e-2 * mean_var.sqrt().max(1e-12);
        let mean = Array1::from_iter(m1.iter().map(|v| (v / n) as f32));
        let std = Array1::from_iter(var.iter().map(|v| (v.sqrt() + floor) as f32));
        (mean, std)
    }
}

/// `k` distinct indices of `0..n` (a partial Fisher–Yates shuffle).
fn sample_without_replacement(rng: &mut SplitMix, n: usize, k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    for i in 0..k.min(n) {
        let j = i + rng.below(n - i);
        idx.swap(i, j);
    }
    idx.truncate(k);
    idx
}

/// Spherical k-means (Coates & Ng): unit centres, each sample assigned to the centre of
/// largest |d·x|, a centre becoming the normalised sum of its samples weighted by d·x;
/// an empty centre is re-drawn from the samples.
fn spherical_kmeans(x: &Array2<f32>, k: usize, iters: usize, rng: &mut SplitMix) -> Array2<f32> {
    let n = x.nrows();
    let picks = sample_without_replacement(rng, n, k);
    let mut c = x.select(ndarray::Axis(0), &picks);
    let normalise = |c: &mut Array2<f32>| {
        for mut row in c.rows_mut() {
            let norm = row.dot(&row).sqrt().max(1e-12);
            row.mapv_inplace(|v| v / norm);
        }
    };
    normalise(&mut c);
    const CHUNK: usize = 4096;
    let mut dots = Array2::<f32>::zeros((CHUNK, k));
    for _ in 0..iters {
        let mut sums = Array2::<f32>::zeros(c.dim());
        let mut used = vec![false; k];
        let mut start = 0;
        while start < n {
            let end = (start + CHUNK).min(n);
            let xs = x.slice(s![start..end, ..]);
            let mut dv = dots.slice_mut(s![..end - start, ..]);
            linalg::par_gemm(1.0, &xs, &c.t(), 0.0, &mut dv);
            for (i, row) in dv.rows().into_iter().enumerate() {
                let (mut best, mut bv) = (0, f32::NEG_INFINITY);
                for (j, &v) in row.iter().enumerate() {
                    if v.abs() > bv {
                        bv = v.abs();
                        best = j;
                    }
                }
                used[best] = true;
                let w = row[best];
                sums.row_mut(best).scaled_add(w, &xs.row(i));
            }
            start = end;
        }
        for (j, u) in used.iter().enumerate() {
            if !*u {
                sums.row_mut(j).assign(&x.row(rng.below(n)));
            }
        }
        c = sums;
        normalise(&mut c);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::synth;

    fn images(n: usize) -> Vec<u8> {
        let spec = synth::SynthSpec {
            train: n,
            test: 0,
            seed: 3,
        };
        synth::generate(&spec, crate::dataset::Split::Train)
            .into_iter()
            .flat_map(|i| i.pixels)
            .collect()
    }

    fn small() -> PatchParams {
        PatchParams {
            atoms: 64,
            samples: 4000,
            stats_images: 40,
            ..PatchParams::default()
        }
    }

    #[test]
    fn pooling_cells_are_mirror_symmetric() {
        for (s, g) in [(27, 3), (27, 2), (28, 2), (28, 3), (27, 1), (5, 4)] {
            for x in 0..s {
                let mut mirrored: Vec<usize> = cells_of(s - 1 - x, s, g)
                    .iter()
                    .map(|c| g - 1 - c)
                    .collect();
                mirrored.sort();
                assert_eq!(cells_of(x, s, g), mirrored, "s {s} g {g} x {x}");
            }
            // Every cell gets positions.
            for c in 0..g {
                assert!(
                    (0..s).any(|x| cells_of(x, s, g).contains(&c)),
                    "s {s} g {g} cell {c}"
                );
            }
        }
    }

    #[test]
    fn flipped_image_features_are_the_permuted_features() {
        let px = images(60);
        for encoding in [Encoding::Threshold, Encoding::Triangle] {
            let params = PatchParams {
                invariant: false,
                encoding,
                ..small()
            };
            let ex = PatchExtractor::fit(&params, &px, 32).unwrap();
            let some = &px[..4 * IMAGE_BYTES];
            let mut flipped = some.to_vec();
            for img in flipped.chunks_mut(IMAGE_BYTES) {
                for row in img.chunks_mut(SIDE) {
                    row.reverse();
                }
            }
            let f = ex.encode(some).unwrap();
            let ff = ex.encode(&flipped).unwrap();
            let perm = ex.flip_permutation();
            let scale = f.iter().fold(0f32, |m, v| m.max(v.abs()));
            for i in 0..4 {
                for (j, &p) in perm.iter().enumerate() {
                    assert!(
                        (ff[[i, j]] - f[[i, p]]).abs() <= 1e-3 * scale,
                        "{encoding:?} image {i} feature {j}"
                    );
                }
            }
            // Invariant features do not change under a flip.
            let inv = PatchExtractor::fit(
                &PatchParams {
                    invariant: true,
                    encoding,
                    ..small()
                },
                &px,
                32,
            )
            .unwrap();
            let (a, b) = (inv.encode(some).unwrap(), inv.encode(&flipped).unwrap());
            let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(a
                .iter()
                .zip(b.iter())
                .all(|(x, y)| (x - y).abs() <= 1e-3 * scale));
            assert_eq!(inv.width() * 2, ex.width());
        }
    }

    #[test]
    fn power_raises_each_pooled_feature_and_the_statistics_follow() {
        let px = images(50);
        let plain = PatchExtractor::fit(&small(), &px, 32).unwrap();
        let root = PatchExtractor::fit(
            &PatchParams {
                power: 0.5,
                ..small()
            },
            &px,
            32,
        )
        .unwrap();
        // Same fit (the power comes after the pooling): the same atoms.
        assert_eq!(plain.atoms, root.atoms);
        let some = &px[..6 * IMAGE_BYTES];
        let (a, b) = (
            plain.encode_raw(some).unwrap(),
            root.encode_raw(some).unwrap(),
        );
        assert!(a.iter().all(|&v| v >= 0.0), "pooled codes are non-negative");
        for (x, y) in a.iter().zip(b.iter()) {
            assert!((x.sqrt() - y).abs() <= 1e-6 * (1.0 + y.abs()), "{x} {y}");
        }
        // The standardisation is of the powered features: mean 0 over the statistics images.
        let f = root.encode(&px[..40 * IMAGE_BYTES]).unwrap();
        let m = f.mean_axis(ndarray::Axis(0)).unwrap();
        assert!(m.iter().all(|v| v.abs() < 1e-2));
        assert_ne!(plain.feature_mean, root.feature_mean);
        // A saved extractor from before the option reads as power 1.
        let mut json = serde_json::to_value(small()).unwrap();
        json.as_object_mut().unwrap().remove("power");
        let back: PatchParams = serde_json::from_value(json).unwrap();
        assert_eq!(back.power, 1.0);
    }

    #[test]
    fn fitting_is_deterministic_and_whitening_decorrelates() {
        let px = images(50);
        let a = PatchExtractor::fit(&small(), &px, 32).unwrap();
        let b = PatchExtractor::fit(&small(), &px, 32).unwrap();
        assert_eq!(a.atoms, b.atoms);
        assert_eq!(a.feature_mean, b.feature_mean);
        // W·C·W = U·diag(λ/(λ+eps))·Uᵀ: eigenvalues in [0, 1).
        let c = a.cov.mapv(f64::from);
        let w = a.whiten.mapv(f64::from);
        let wcw = w.dot(&c).dot(&w);
        let (vals, _) = linalg::eigh(&wcw);
        assert!(
            vals.iter().all(|&v| v > -1e-4 && v < 1.0 + 1e-4),
            "{vals:?}"
        );
        // Standardised features of the statistics images: mean 0.
        let f = a.encode(&px[..40 * IMAGE_BYTES]).unwrap();
        let m = f.mean_axis(ndarray::Axis(0)).unwrap();
        assert!(
            m.iter().all(|v| v.abs() < 1e-2),
            "{}",
            m.iter().fold(0f32, |x, v| x.max(v.abs()))
        );
        let k = PatchExtractor::fit(
            &PatchParams {
                dictionary: Dictionary::Kmeans,
                ..small()
            },
            &px,
            32,
        )
        .unwrap();
        assert!(k
            .atoms
            .rows()
            .into_iter()
            .all(|r| (r.dot(&r) - 1.0).abs() < 1e-4));
    }

    #[test]
    fn bad_params_are_named() {
        for (p, what) in [
            (
                PatchParams {
                    atoms: 7,
                    ..small()
                },
                "atoms",
            ),
            (
                PatchParams {
                    patch: 40,
                    ..small()
                },
                "patch",
            ),
            (PatchParams { grid: 0, ..small() }, "grid"),
            (
                PatchParams {
                    power: 0.0,
                    ..small()
                },
                "power",
            ),
            (
                PatchParams {
                    power: f32::NAN,
                    ..small()
                },
                "power",
            ),
            (
                PatchParams {
                    eps: 0.0,
                    ..small()
                },
                "eps",
            ),
        ] {
            let e = PatchExtractor::fit(&p, &images(5), 32)
                .unwrap_err()
                .to_string();
            assert!(e.contains(what), "{e}");
        }
        let ex = PatchExtractor::fit(&small(), &images(5), 32).unwrap();
        assert!(ex.encode(&[0u8; 100]).is_err());
    }
}
