//! The network: an airbench94-style CNN (Keller Jordan, 2024), forward and backward.
//!
//! ```text
//! image 32×32×3 ─ whitening conv 2×2 (frozen weights, learnt bias) ─ GELU      31×31×24
//!   ─ block(w1) ─ block(w2) ─ block(w3) ─ max pool 3×3 ─ linear(w3 → classes) · scale
//! block(w): conv 3×3 ─ max pool 2×2 ─ BN ─ GELU ─ conv 3×3 ─ BN ─ GELU
//! ```
//!
//! The whitening weights are the eigenvectors of the 2×2 patches' covariance scaled by
//! their inverse square root eigenvalues, and their negatives ([`whitening_weights`]);
//! BatchNorm has no scale (fixed at 1) and a learnt shift; convolutions have no bias and
//! start as identities on their first channels (PyTorch's `dirac_`), the rest uniform in
//! ±1/sqrt(fan-in), as PyTorch's default. A [`Net`] holds the parameters; [`Net::forward_train`]
//! keeps what the backward pass needs in a [`Tape`], [`Net::backward`] fills a
//! [`Grads`] of the same layout as [`Net::params`].

// The buffers that layers of different sizes share are `sized`: grown, never shrunk, so
// that a step neither frees nor zeroes them anew (every user overwrites its part).
use super::ops::{self, grown as sized, BnCache, ConvShape, Grad, Kernel, Out, PoolShape, Scratch};
use crate::rng::SplitMix;

/// Side of the input images unless the run's image size says otherwise (CIFAR's 32).
pub const SIDE: usize = crate::dataset::SIDE;
/// Channels of the input images.
pub const CHANNELS: usize = 3;
/// Kernel size of the whitening layer.
pub const WHITEN_K: usize = 2;
/// Output channels of the whitening layer: the 12 patch directions and their negatives.
pub const WHITEN_WIDTH: usize = 2 * CHANNELS * WHITEN_K * WHITEN_K;

/// The shape of a network.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Arch {
    /// Channels of each block (three in airbench94).
    pub widths: Vec<usize>,
    /// Classes of the output.
    pub classes: usize,
    /// Multiplies the logits (airbench94: 1/9).
    pub scale: f32,
    /// BatchNorm's `eps`.
    pub bn_eps: f32,
    /// BatchNorm's running-statistics momentum, PyTorch's convention (airbench94: 0.4).
    pub bn_momentum: f32,
    /// Side of the input images (the run's image size; 32 in checkpoints written before
    /// it was recorded). The parameters do not depend on it: the final pool takes the
    /// last block's whole output.
    #[serde(default = "default_side")]
    pub side: usize,
}

fn default_side() -> usize {
    SIDE
}

impl Arch {
    /// Side of the output of each block, the whitening layer's first.
    pub fn sides(&self) -> Vec<usize> {
        let mut s = vec![self.side + 1 - WHITEN_K];
        for _ in &self.widths {
            let last = *s.last().unwrap_or(&0);
            s.push(last / 2);
        }
        s
    }

    /// Checks that the network fits its images: each block halves the side, and the
    /// last block's output must still be at least 1×1 (the final pool takes its whole
    /// extent: 3×3 at 32×32).
    pub fn check(&self) -> Result<(), String> {
        if !(WHITEN_K..=crate::dataset::MAX_IMAGE_SIDE).contains(&self.side) {
            return Err(format!(
                "images of side {} (2 to {})",
                self.side,
                crate::dataset::MAX_IMAGE_SIDE
            ));
        }
        if self.widths.is_empty() {
            return Err("the network needs at least one block (widths = [])".into());
        }
        if let Some(w) = self.widths.iter().find(|&&w| w == 0 || w > 4096) {
            return Err(format!("a block width of {w} (1 to 4096)"));
        }
        if !(2..=1000).contains(&self.classes) {
            return Err(format!("{} classes (2 to 1000)", self.classes));
        }
        let sides = self.sides();
        let last = *sides.last().unwrap_or(&0);
        if last == 0 {
            return Err(format!(
                "{} blocks do not fit {s}×{s} images: each halves the side ({}), and the last \
                 would have no pixel left; use at most {} blocks",
                self.widths.len(),
                sides
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join(" → "),
                max_blocks(self.side),
                s = self.side
            ));
        }
        Ok(())
    }

    /// The final pooling window: the last block's whole output.
    pub fn final_pool(&self) -> usize {
        *self.sides().last().unwrap_or(&1)
    }

    /// Width of the pooled features (the last block's channels).
    pub fn feature_width(&self) -> usize {
        *self.widths.last().unwrap_or(&0)
    }

    /// The six (two per block) convolution shapes for a batch of `n` images.
    pub fn conv_shapes(&self, n: usize) -> Vec<ConvShape> {
        let sides = self.sides();
        let mut out = Vec::new();
        let mut ci = WHITEN_WIDTH;
        for (b, &w) in self.widths.iter().enumerate() {
            let h = sides[b];
            out.push(ConvShape {
                n,
                h,
                w: h,
                ci,
                co: w,
                k: 3,
                pad: 1,
            });
            let h2 = h / 2;
            out.push(ConvShape {
                n,
                h: h2,
                w: h2,
                ci: w,
                co: w,
                k: 3,
                pad: 1,
            });
            ci = w;
        }
        out
    }

    /// The whitening layer's shape for `n` images.
    pub fn whiten_shape(&self, n: usize) -> ConvShape {
        ConvShape {
            n,
            h: self.side,
            w: self.side,
            ci: CHANNELS,
            co: WHITEN_WIDTH,
            k: WHITEN_K,
            pad: 0,
        }
    }

    /// Multiply-adds of one image's forward pass.
    pub fn macs_per_image(&self) -> usize {
        self.whiten_shape(1).macs()
            + self
                .conv_shapes(1)
                .iter()
                .map(ConvShape::macs)
                .sum::<usize>()
            + self.feature_width() * self.classes
    }

    /// Multiply-adds of one image's training step: the forward pass, the weight
    /// gradients of every convolution and of the head, and the input gradients of every
    /// convolution but the first block's first (whose input gradient only the whitening
    /// bias needs, while it learns: `whiten_bias`).
    pub fn train_macs_per_image(&self, whiten_bias: bool) -> usize {
        let convs = self.conv_shapes(1);
        let all: usize = convs.iter().map(ConvShape::macs).sum();
        let head = self.feature_width() * self.classes;
        let dx = if whiten_bias {
            all
        } else {
            all - convs[0].macs()
        };
        self.macs_per_image() + all + head + dx + head
    }

    /// Floats of the activations [`Net::forward_train`] keeps per image.
    pub fn tape_floats_per_image(&self) -> usize {
        let sides = self.sides();
        let mut f = 2 * sides[0] * sides[0] * WHITEN_WIDTH;
        for (b, &w) in self.widths.iter().enumerate() {
            let (h, h2) = (sides[b], sides[b] / 2);
            // conv1's output, the pooled z and y, conv2's z and y, and their gradients.
            f += 2 * h * h * w + 6 * h2 * h2 * w;
        }
        f
    }

    /// Parameters: the whitening bias, the convolutions, the BatchNorm shifts, the head.
    pub fn param_shapes(&self) -> Vec<(String, usize)> {
        let mut p = vec![("whiten.bias".to_string(), WHITEN_WIDTH)];
        for (i, s) in self.conv_shapes(1).iter().enumerate() {
            p.push((format!("conv{i}.weight"), s.kdim() * s.co));
        }
        for (i, s) in self.conv_shapes(1).iter().enumerate() {
            p.push((format!("norm{i}.bias"), s.co));
        }
        p.push(("head.weight".into(), self.feature_width() * self.classes));
        p
    }
}

/// The most blocks that fit images of `side`×`side`.
pub fn max_blocks(side: usize) -> usize {
    let mut side = (side + 1).saturating_sub(WHITEN_K);
    let mut b = 0;
    while side / 2 > 0 {
        side /= 2;
        b += 1;
    }
    b
}

/// The whitening layer's weights (`[2·2·3, 24]`, rows kernel row, kernel column,
/// channel) from the covariance of the 2×2 patches of `images` (NHWC, already
/// normalised): eigenvectors `v` scaled by `1/sqrt(λ + eps)`, largest first, then their
/// negatives, as airbench94.
pub fn whitening_weights(images: &[f32], n: usize, side: usize, eps: f64) -> Vec<f32> {
    let d = WHITEN_K * WHITEN_K * CHANNELS;
    let s = ConvShape {
        n,
        h: side,
        w: side,
        ci: CHANNELS,
        co: 1,
        k: WHITEN_K,
        pad: 0,
    };
    let per = s.oh() * s.ow();
    let mut cov = ndarray::Array2::<f64>::zeros((d, d));
    let mut patch = vec![0.0f32; d];
    let mut count = 0usize;
    for img in 0..n {
        let x = &images[img * side * side * CHANNELS..(img + 1) * side * side * CHANNELS];
        for p in 0..per {
            let (oy, ox) = (p / s.ow(), p % s.ow());
            for ky in 0..WHITEN_K {
                let src = ((oy + ky) * side + ox) * CHANNELS;
                patch[ky * WHITEN_K * CHANNELS..(ky + 1) * WHITEN_K * CHANNELS]
                    .copy_from_slice(&x[src..src + WHITEN_K * CHANNELS]);
            }
            for i in 0..d {
                let pi = f64::from(patch[i]);
                for j in i..d {
                    cov[[i, j]] += pi * f64::from(patch[j]);
                }
            }
            count += 1;
        }
    }
    for i in 0..d {
        for j in i..d {
            let v = cov[[i, j]] / count.max(1) as f64;
            cov[[i, j]] = v;
            cov[[j, i]] = v;
        }
    }
    let (vals, vecs) = crate::linalg::eigh(&cov);
    // Largest first.
    let mut order: Vec<usize> = (0..d).collect();
    order.sort_by(|&a, &b| vals[b].total_cmp(&vals[a]));
    let mut w = vec![0.0f32; d * WHITEN_WIDTH];
    for (o, &e) in order.iter().enumerate() {
        let scale = 1.0 / (vals[e].max(0.0) + eps).sqrt();
        for r in 0..d {
            let v = (vecs[[r, e]] * scale) as f32;
            w[r * WHITEN_WIDTH + o] = v;
            w[r * WHITEN_WIDTH + d + o] = -v;
        }
    }
    w
}

/// The parameters and running statistics of a network.
#[derive(Clone, Debug, PartialEq)]
pub struct Net {
    /// The shape.
    pub arch: Arch,
    /// The whitening weights (`[12, 24]`, frozen).
    pub whiten: Vec<f32>,
    /// The learnt tensors, in the order of [`Arch::param_shapes`].
    pub params: Vec<Vec<f32>>,
    /// BatchNorm running means, one per convolution.
    pub running_mean: Vec<Vec<f32>>,
    /// BatchNorm running variances, one per convolution.
    pub running_var: Vec<Vec<f32>>,
}

/// The name of the whitening weights in a saved network.
pub(crate) const WHITEN_TENSOR: &str = "whiten.weight";

/// Gradients, in the layout of [`Net::params`].
pub type Grads = Vec<Vec<f32>>;

/// What the backward pass needs of a forward pass.
#[derive(Default)]
pub struct Tape {
    n: usize,
    /// The whitening layer's pre-activation and output.
    z0: Vec<f32>,
    a0: Vec<f32>,
    /// Per block: pool index, BN z and y after the pool, BN z and y after conv2, rstd's.
    arg: Vec<Vec<u8>>,
    z1: Vec<Vec<f32>>,
    a1: Vec<Vec<f32>>,
    z2: Vec<Vec<f32>>,
    a2: Vec<Vec<f32>>,
    bn1: Vec<BnCache>,
    bn2: Vec<BnCache>,
    /// Per convolution, on a bf16 kernel: its input in bf16, written so by the layer
    /// before (the f32 activations `a0`, `a1` and all but the last `a2` are then not
    /// kept), for its product and its weight gradient.
    kept: Vec<Vec<u32>>,
    /// The final pool's index (a window as wide as the last block's output: any number of
    /// positions) and the pooled features.
    final_arg: Vec<u32>,
    features: Vec<f32>,
    /// Buffers reused across steps.
    conv: Vec<f32>,
    grad_a: Vec<f32>,
    grad_b: Vec<f32>,
    /// On a bf16 kernel: a convolution's output gradient in bf16, and scratch for it.
    grad_h: Vec<u32>,
    grad_tmp: Vec<u32>,
    scratch: Scratch,
}

impl Tape {
    /// Makes the convolutions of the next passes multiply on `kernel` (which must be
    /// [`Kernel::available`]).
    pub fn set_kernel(&mut self, kernel: Kernel) {
        if self.scratch.kernel() != kernel {
            self.scratch = Scratch::new(kernel);
        }
    }
}

fn resize(v: &mut Vec<f32>, len: usize) {
    v.resize(len, 0.0);
}

/// `len` bf16 values in `v` (grown to fit, never shrunk).
fn halves(v: &mut Vec<u32>, len: usize) -> &mut [u16] {
    &mut bytemuck::cast_slice_mut(sized(v, len.div_ceil(2)))[..len]
}

/// The first `len` bf16 values of `v`.
fn halves_of(v: &[u32], len: usize) -> &[u16] {
    &bytemuck::cast_slice(v)[..len]
}

impl Net {
    /// A new network: convolutions as PyTorch initialises them (uniform in
    /// ±1/sqrt(fan-in), then identity on the first `ci` output channels), BatchNorm
    /// shifts 0 and running statistics (0, 1), the head uniform in ±1/sqrt(w3).
    pub fn new(arch: Arch, whiten: Vec<f32>, rng: &mut SplitMix) -> Net {
        let shapes = arch.conv_shapes(1);
        let mut params = vec![vec![0.0f32; WHITEN_WIDTH]];
        for s in &shapes {
            let bound = 1.0 / (s.kdim() as f64).sqrt();
            let mut w: Vec<f32> = (0..s.kdim() * s.co)
                .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
                .collect();
            // dirac_ on the first ci filters: output o copies input o at the centre tap.
            for o in 0..s.ci.min(s.co) {
                for t in 0..s.k * s.k {
                    for c in 0..s.ci {
                        let centre = t == (s.k / 2) * s.k + s.k / 2;
                        w[(t * s.ci + c) * s.co + o] = if centre && c == o { 1.0 } else { 0.0 };
                    }
                }
            }
            params.push(w);
        }
        for s in &shapes {
            params.push(vec![0.0; s.co]);
        }
        let fw = arch.feature_width();
        let bound = 1.0 / (fw as f64).sqrt();
        params.push(
            (0..fw * arch.classes)
                .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
                .collect(),
        );
        let running_mean = shapes.iter().map(|s| vec![0.0; s.co]).collect();
        let running_var = shapes.iter().map(|s| vec![1.0; s.co]).collect();
        Net {
            arch,
            whiten,
            params,
            running_mean,
            running_var,
        }
    }

    /// The names [`Net::put_tensors`] writes for a network of shape `arch`.
    pub(crate) fn tensor_names(arch: &Arch, prefix: &str) -> Vec<String> {
        let mut names: Vec<String> = arch
            .param_shapes()
            .into_iter()
            .map(|(n, _)| format!("{prefix}{n}"))
            .collect();
        for i in 0..arch.conv_shapes(1).len() {
            names.push(format!("{prefix}norm{i}.running_mean"));
            names.push(format!("{prefix}norm{i}.running_var"));
        }
        names
    }

    /// Adds the parameters and the running statistics (not the whitening weights, which
    /// a checkpoint holds once) to `t`, each name after `prefix`.
    pub(crate) fn put_tensors(&self, t: &mut crate::model::TensorsOut, prefix: &str) {
        for ((name, len), w) in self.arch.param_shapes().iter().zip(&self.params) {
            t.f32(&format!("{prefix}{name}"), &[*len], w.iter());
        }
        for (i, (m, v)) in self.running_mean.iter().zip(&self.running_var).enumerate() {
            t.f32(
                &format!("{prefix}norm{i}.running_mean"),
                &[m.len()],
                m.iter(),
            );
            t.f32(
                &format!("{prefix}norm{i}.running_var"),
                &[v.len()],
                v.iter(),
            );
        }
    }

    /// The network of shape `arch` that [`Net::put_tensors`] wrote under `prefix`, with
    /// the whitening weights `whiten`.
    pub(crate) fn read_tensors(
        ck: &crate::model::Checkpoint,
        arch: &Arch,
        whiten: &[f32],
        prefix: &str,
    ) -> crate::error::Result<Net> {
        let params = arch
            .param_shapes()
            .iter()
            .map(|(name, len)| ck.f32(&format!("{prefix}{name}"), &[*len]))
            .collect::<crate::error::Result<Vec<_>>>()?;
        let mut running_mean = Vec::new();
        let mut running_var = Vec::new();
        for (i, s) in arch.conv_shapes(1).iter().enumerate() {
            running_mean.push(ck.f32(&format!("{prefix}norm{i}.running_mean"), &[s.co])?);
            running_var.push(ck.f32(&format!("{prefix}norm{i}.running_var"), &[s.co])?);
        }
        Ok(Net {
            arch: arch.clone(),
            whiten: whiten.to_vec(),
            params,
            running_mean,
            running_var,
        })
    }

    /// Reads the whitening weights of a saved network of shape `arch`.
    pub(crate) fn read_whiten(
        ck: &crate::model::Checkpoint,
        arch: &Arch,
    ) -> crate::error::Result<Vec<f32>> {
        let s = arch.whiten_shape(1);
        ck.f32(WHITEN_TENSOR, &[s.kdim() * s.co])
    }

    /// The name of the first tensor (a parameter or a BatchNorm running statistic) that
    /// holds an infinite or NaN value, if any.
    pub fn first_non_finite(&self) -> Option<String> {
        let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
        for ((name, _), v) in self.arch.param_shapes().iter().zip(&self.params) {
            if !finite(v) {
                return Some(format!("the weights {name}"));
            }
        }
        for (i, (m, v)) in self.running_mean.iter().zip(&self.running_var).enumerate() {
            if !finite(m) || !finite(v) {
                return Some(format!("the BatchNorm statistics of norm{i}"));
            }
        }
        None
    }

    fn blocks(&self) -> usize {
        self.arch.widths.len()
    }

    /// Index of convolution `i`'s weights in [`Net::params`].
    pub fn conv_index(&self, i: usize) -> usize {
        1 + i
    }

    /// Index of BatchNorm `i`'s shift in [`Net::params`].
    pub fn norm_index(&self, i: usize) -> usize {
        1 + 2 * self.blocks() + i
    }

    /// Index of the head in [`Net::params`].
    pub fn head_index(&self) -> usize {
        1 + 4 * self.blocks()
    }

    /// The logits (`[n, classes]`) of `x` (`n` NHWC images, normalised) with the
    /// running statistics, and the pooled features (`[n, w3]`) when `features` is given;
    /// the convolutions multiply on `kernel` (which must be [`Kernel::available`]).
    pub fn forward_score(
        &self,
        x: &[f32],
        n: usize,
        features: Option<&mut Vec<f32>>,
        kernel: Kernel,
    ) -> Vec<f32> {
        let mut scratch = Scratch::pooled(kernel);
        let sides = self.arch.sides();
        let ws = self.arch.whiten_shape(n);
        let mut z = vec![0.0f32; n * sides[0] * sides[0] * WHITEN_WIDTH];
        ops::conv_forward(x, &self.whiten, &ws, &mut z, &mut scratch);
        let mut a = vec![0.0f32; z.len()];
        ops::bias_gelu(&mut z, &mut a, &self.params[0]);
        let shapes = self.arch.conv_shapes(n);
        for b in 0..self.blocks() {
            let (s1, s2) = (&shapes[2 * b], &shapes[2 * b + 1]);
            let mut c = vec![0.0f32; n * s1.oh() * s1.ow() * s1.co];
            ops::conv_forward(
                &a,
                &self.params[self.conv_index(2 * b)],
                s1,
                &mut c,
                &mut scratch,
            );
            let h2 = s1.oh() / 2;
            let mut p = vec![0.0f32; n * h2 * h2 * s1.co];
            let mut arg = vec![0u8; p.len()];
            ops::maxpool_forward(
                &c,
                PoolShape {
                    n,
                    h: s1.oh(),
                    w: s1.ow(),
                    c: s1.co,
                    p: 2,
                },
                &mut p,
                &mut arg,
            );
            let mut z1 = vec![0.0f32; p.len()];
            let mut a1 = vec![0.0f32; p.len()];
            ops::bn_gelu_score(
                &p,
                &self.params[self.norm_index(2 * b)],
                self.arch.bn_eps,
                &self.running_mean[2 * b],
                &self.running_var[2 * b],
                &mut z1,
                &mut a1,
            );
            let mut c2 = vec![0.0f32; n * s2.oh() * s2.ow() * s2.co];
            ops::conv_forward(
                &a1,
                &self.params[self.conv_index(2 * b + 1)],
                s2,
                &mut c2,
                &mut scratch,
            );
            let mut z2 = vec![0.0f32; c2.len()];
            a = vec![0.0f32; c2.len()];
            ops::bn_gelu_score(
                &c2,
                &self.params[self.norm_index(2 * b + 1)],
                self.arch.bn_eps,
                &self.running_mean[2 * b + 1],
                &self.running_var[2 * b + 1],
                &mut z2,
                &mut a,
            );
        }
        let (fp, fw) = (self.arch.final_pool(), self.arch.feature_width());
        let mut feats = vec![0.0f32; n * fw];
        let mut arg = vec![0u32; feats.len()];
        ops::maxpool_forward(
            &a,
            PoolShape {
                n,
                h: fp,
                w: fp,
                c: fw,
                p: fp,
            },
            &mut feats,
            &mut arg,
        );
        scratch.recycle();
        let logits = self.head(&feats, n);
        if let Some(f) = features {
            *f = feats;
        }
        logits
    }

    fn head(&self, feats: &[f32], n: usize) -> Vec<f32> {
        let (fw, k) = (self.arch.feature_width(), self.arch.classes);
        let w = &self.params[self.head_index()];
        let mut logits = vec![0.0f32; n * k];
        let a = ndarray::ArrayView2::from_shape((n, fw), feats).expect("head: features");
        let b = ndarray::ArrayView2::from_shape((fw, k), &w[..]).expect("head: weights");
        let mut c = ndarray::ArrayViewMut2::from_shape((n, k), &mut logits[..]).expect("head");
        crate::linalg::gemm(self.arch.scale, &a, &b, 0.0, &mut c);
        logits
    }

    /// The forward pass in training (batch statistics, which also move the running
    /// ones): the logits, and the `tape` filled for [`Net::backward`].
    pub fn forward_train(&mut self, x: &[f32], n: usize, tape: &mut Tape) -> Vec<f32> {
        let sides = self.arch.sides();
        let nb = self.blocks();
        tape.n = n;
        tape.arg.resize_with(nb, Vec::new);
        for v in [&mut tape.z1, &mut tape.a1, &mut tape.z2, &mut tape.a2] {
            v.resize_with(nb, Vec::new);
        }
        tape.bn1.resize_with(nb, BnCache::default);
        tape.bn2.resize_with(nb, BnCache::default);
        tape.kept.resize_with(2 * nb, Vec::new);
        // On a bf16 kernel each layer before a convolution writes its output in bf16,
        // where the convolution reads it (`kept`).
        let bf = tape.scratch.kernel().is_bf16();
        let ws = self.arch.whiten_shape(n);
        resize(&mut tape.z0, n * sides[0] * sides[0] * WHITEN_WIDTH);
        ops::conv_forward(x, &self.whiten, &ws, &mut tape.z0, &mut tape.scratch);
        if bf {
            let a0 = halves(&mut tape.kept[0], tape.z0.len());
            ops::bias_gelu_out(&mut tape.z0, Out::Bf16(a0), &self.params[0]);
        } else {
            resize(&mut tape.a0, tape.z0.len());
            ops::bias_gelu(&mut tape.z0, &mut tape.a0, &self.params[0]);
        }
        let shapes = self.arch.conv_shapes(n);
        for b in 0..nb {
            let (s1, s2) = (shapes[2 * b], shapes[2 * b + 1]);
            let (i1, i2) = (2 * b, 2 * b + 1);
            let l1 = n * s1.oh() * s1.ow() * s1.co;
            let w = &self.params[1 + i1];
            if bf {
                let input = halves_of(&tape.kept[i1], n * s1.h * s1.w * s1.ci);
                let out = sized(&mut tape.conv, l1);
                ops::conv_forward_bf16(input, w, &s1, out, &mut tape.scratch);
            } else {
                let input = if b == 0 { &tape.a0 } else { &tape.a2[b - 1] };
                let out = sized(&mut tape.conv, l1);
                ops::conv_forward(input, w, &s1, out, &mut tape.scratch);
            }
            let h2 = s1.oh() / 2;
            let len = n * h2 * h2 * s1.co;
            let mut pooled = std::mem::take(&mut tape.grad_a);
            tape.arg[b].resize(len, 0);
            ops::maxpool_forward(
                &tape.conv[..l1],
                PoolShape {
                    n,
                    h: s1.oh(),
                    w: s1.ow(),
                    c: s1.co,
                    p: 2,
                },
                sized(&mut pooled, len),
                &mut tape.arg[b],
            );
            resize(&mut tape.z1[b], len);
            let a1 = if bf {
                Out::Bf16(halves(&mut tape.kept[i2], len))
            } else {
                resize(&mut tape.a1[b], len);
                Out::F32(&mut tape.a1[b])
            };
            let ni1 = self.norm_index(i1);
            tape.bn1[b] = ops::bn_gelu_forward(
                &pooled[..len],
                &self.params[ni1],
                self.arch.bn_eps,
                &mut self.running_mean[i1],
                &mut self.running_var[i1],
                self.arch.bn_momentum,
                &mut tape.z1[b],
                a1,
            );
            tape.grad_a = pooled;
            let len2 = n * s2.oh() * s2.ow() * s2.co;
            let w = &self.params[1 + i2];
            let out = sized(&mut tape.conv, len2);
            if bf {
                let input = halves_of(&tape.kept[i2], len);
                ops::conv_forward_bf16(input, w, &s2, out, &mut tape.scratch);
            } else {
                ops::conv_forward(&tape.a1[b], w, &s2, out, &mut tape.scratch);
            }
            resize(&mut tape.z2[b], len2);
            // The last block's output goes to the final pool, in f32.
            let a2 = if bf && b + 1 < nb {
                Out::Bf16(halves(&mut tape.kept[i2 + 1], len2))
            } else {
                resize(&mut tape.a2[b], len2);
                Out::F32(&mut tape.a2[b])
            };
            let ni2 = self.norm_index(i2);
            tape.bn2[b] = ops::bn_gelu_forward(
                &tape.conv[..len2],
                &self.params[ni2],
                self.arch.bn_eps,
                &mut self.running_mean[i2],
                &mut self.running_var[i2],
                self.arch.bn_momentum,
                &mut tape.z2[b],
                a2,
            );
        }
        let (fp, fw) = (self.arch.final_pool(), self.arch.feature_width());
        resize(&mut tape.features, n * fw);
        tape.final_arg.resize(n * fw, 0);
        ops::maxpool_forward(
            &tape.a2[nb - 1],
            PoolShape {
                n,
                h: fp,
                w: fp,
                c: fw,
                p: fp,
            },
            &mut tape.features,
            &mut tape.final_arg,
        );
        self.head(&tape.features, n)
    }

    /// The gradients of `Σ loss` given `dlogits` (its gradient with respect to the
    /// logits, `[n, classes]`) after [`Net::forward_train`]. The whitening bias's
    /// gradient is computed only when `whiten_bias` (else left at 0).
    pub fn backward(&self, dlogits: &[f32], tape: &mut Tape, whiten_bias: bool, grads: &mut Grads) {
        let n = tape.n;
        let nb = self.blocks();
        let (fw, k) = (self.arch.feature_width(), self.arch.classes);
        for (g, p) in grads.iter_mut().zip(&self.params) {
            g.resize(p.len(), 0.0);
        }
        // Head: logits = scale · feats · W.
        let hi = self.head_index();
        {
            let f = ndarray::ArrayView2::from_shape((n, fw), &tape.features[..]).expect("f");
            let d = ndarray::ArrayView2::from_shape((n, k), dlogits).expect("dlogits");
            let mut gw =
                ndarray::ArrayViewMut2::from_shape((fw, k), &mut grads[hi][..]).expect("gw");
            crate::linalg::gemm(self.arch.scale, &f.t(), &d, 0.0, &mut gw);
        }
        let mut dfeat = vec![0.0f32; n * fw];
        {
            let w = ndarray::ArrayView2::from_shape((fw, k), &self.params[hi][..]).expect("w");
            let d = ndarray::ArrayView2::from_shape((n, k), dlogits).expect("dlogits");
            let mut df = ndarray::ArrayViewMut2::from_shape((n, fw), &mut dfeat[..]).expect("df");
            crate::linalg::gemm(self.arch.scale, &d, &w.t(), 0.0, &mut df);
        }
        let sides = self.arch.sides();
        let fp = self.arch.final_pool();
        // `da` holds the gradient with respect to the current block's output.
        let mut da = std::mem::take(&mut tape.grad_a);
        let mut da_len = n * fp * fp * fw;
        ops::maxpool_backward(
            &dfeat,
            &tape.final_arg,
            PoolShape {
                n,
                h: fp,
                w: fp,
                c: fw,
                p: fp,
            },
            sized(&mut da, da_len),
        );
        let shapes = self.arch.conv_shapes(n);
        let mut dtmp = std::mem::take(&mut tape.grad_b);
        // On a bf16 kernel the layers after a convolution write its output gradient in
        // bf16 (`grad_h`), and its input is in `kept` (the f32 one is not).
        let bf = tape.scratch.kernel().is_bf16();
        for b in (0..nb).rev() {
            let (s1, s2) = (shapes[2 * b], shapes[2 * b + 1]);
            let (i1, i2) = (2 * b, 2 * b + 1);
            let a1_len = tape.z1[b].len();
            // conv2 → BN → GELU.
            let (ni2, ci2) = (self.norm_index(i2), self.conv_index(i2));
            {
                let (before, rest) = grads.split_at_mut(ni2);
                ops::bn_gelu_backward(
                    &tape.z2[b],
                    &self.params[ni2],
                    &tape.bn2[b],
                    &mut da[..da_len],
                    &mut rest[0],
                    bf.then(|| halves(&mut tape.grad_h, da_len)),
                );
                let turned = ops::turned_weights(&self.params[ci2], &s2);
                let (input, dy) = if bf {
                    (&[][..], Grad::Bf16(halves_of(&tape.grad_h, da_len)))
                } else {
                    (&tape.a1[b][..], Grad::F32(&da[..da_len]))
                };
                ops::conv_backward_kept(
                    input,
                    Some(&tape.kept[i2]),
                    dy,
                    &turned,
                    &s2,
                    &mut before[ci2],
                    Some(sized(&mut dtmp, a1_len)),
                    &mut tape.scratch,
                );
            }
            // pool → BN → GELU.
            let (ni1, ci1) = (self.norm_index(i1), self.conv_index(i1));
            {
                let (before, rest) = grads.split_at_mut(ni1);
                ops::bn_gelu_backward(
                    &tape.z1[b],
                    &self.params[ni1],
                    &tape.bn1[b],
                    &mut dtmp[..a1_len],
                    &mut rest[0],
                    None,
                );
                let h = sides[b];
                let lc = n * h * h * s1.co;
                let pool = PoolShape {
                    n,
                    h,
                    w: h,
                    c: s1.co,
                    p: 2,
                };
                let dy = if bf {
                    let out = halves(&mut tape.grad_h, lc);
                    ops::maxpool2_backward_bf16(
                        &dtmp[..a1_len],
                        &tape.arg[b],
                        pool,
                        out,
                        &mut tape.grad_tmp,
                    );
                    Grad::Bf16(halves_of(&tape.grad_h, lc))
                } else {
                    let out = sized(&mut tape.conv, lc);
                    ops::maxpool_backward(&dtmp[..a1_len], &tape.arg[b], pool, out);
                    Grad::F32(&tape.conv[..lc])
                };
                let input: &[f32] = match (bf, b) {
                    (true, _) => &[],
                    (false, 0) => &tape.a0,
                    (false, _) => &tape.a2[b - 1],
                };
                let need_dx = b > 0 || whiten_bias;
                da_len = n * s1.h * s1.w * s1.ci;
                // The turned weights serve the input gradient only.
                let turned = if need_dx {
                    ops::turned_weights(&self.params[ci1], &s1)
                } else {
                    Vec::new()
                };
                ops::conv_backward_kept(
                    input,
                    Some(&tape.kept[i1]),
                    dy,
                    &turned,
                    &s1,
                    &mut before[ci1],
                    if need_dx {
                        Some(sized(&mut da, da_len))
                    } else {
                        None
                    },
                    &mut tape.scratch,
                );
            }
        }
        if whiten_bias {
            ops::gelu_backward(&tape.z0, &mut da[..da_len]);
            ops::bias_grad(&da[..da_len], &mut grads[0]);
        } else {
            grads[0].fill(0.0);
        }
        tape.grad_a = da;
        tape.grad_b = dtmp;
    }
}

/// The mean label-smoothed cross-entropy of `logits` (`[n, k]`) and its gradient with
/// respect to the logits for the *summed* loss (PyTorch's `CrossEntropyLoss(
/// label_smoothing = eps, reduction = 'none').sum()`): `softmax − ((1 − eps)·onehot +
/// eps/k)`. Also returns the plain cross-entropy's mean (the reported loss).
pub fn smoothed_ce(logits: &[f32], y: &[u16], k: usize, eps: f32) -> (Vec<f32>, f64, f64) {
    let n = y.len();
    let mut grad = vec![0.0f32; n * k];
    let (mut smooth, mut plain) = (0.0f64, 0.0f64);
    for i in 0..n {
        let row = &logits[i * k..(i + 1) * k];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = row.iter().map(|&v| f64::from(v - max).exp()).sum();
        let lse = f64::from(max) + sum.ln();
        let yi = usize::from(y[i]);
        let nll = lse - f64::from(row[yi]);
        let mean_nll = lse - row.iter().map(|&v| f64::from(v)).sum::<f64>() / k as f64;
        smooth += (1.0 - f64::from(eps)) * nll + f64::from(eps) * mean_nll;
        plain += nll;
        for j in 0..k {
            let p = (f64::from(row[j]) - lse).exp();
            let t = if j == yi { 1.0 - f64::from(eps) } else { 0.0 } + f64::from(eps) / k as f64;
            grad[i * k + j] = (p - t) as f32;
        }
    }
    (grad, smooth / n.max(1) as f64, plain / n.max(1) as f64)
}
