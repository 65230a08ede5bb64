//! Synthetic CIFAR-format data.
//!
//! Tests, demos and benchmarks need a dataset that is always there, costs nothing to
//! download and behaves like the real thing: 32×32 colour images in ten classes that a model
//! can learn only partly. Each class here has its own shape family, colour tendency and
//! texture, drawn at random places, sizes and angles over gradient backgrounds with clutter
//! and pixel noise, so a linear model lands well above chance and well below perfect. Every
//! image is a pure function of `(seed, split, index)`, so any slice of the set can be made
//! independently and reproducibly. The small PRNG and hash used for that are public, for
//! reproducible augmentation elsewhere.

use std::fs;
use std::path::Path;

use crate::dataset::{
    self, Images, Layout, Split, CLASSES, IMAGE_BYTES, PLANE_BYTES, SIDE, TRAIN_FILES,
};
use crate::error::{Error, Result};
use crate::rng::{mix, Rng};

/// How many synthetic images to make, and from which seed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynthSpec {
    /// Training images (spread over five files).
    pub train: usize,
    /// Test images (one file).
    pub test: usize,
    /// Seed: the same seed gives the same bytes.
    pub seed: u64,
}

impl Default for SynthSpec {
    fn default() -> Self {
        SynthSpec {
            train: 5000,
            test: 1000,
            seed: 0,
        }
    }
}

impl SynthSpec {
    /// Number of images in `split`.
    pub fn count(&self, split: Split) -> usize {
        match split {
            Split::Train => self.train,
            Split::Test => self.test,
        }
    }
}

/// The sizes of the files of a split with `n` images: five as-equal-as-possible train files
/// (larger ones first), or one test file.
pub fn file_sizes(n: usize, split: Split) -> Vec<usize> {
    match split {
        Split::Train => (0..TRAIN_FILES)
            .map(|k| n / TRAIN_FILES + usize::from(k < n % TRAIN_FILES))
            .collect(),
        Split::Test => vec![n],
    }
}

/// The shape family of each class, in label order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    Disc,
    Square,
    Triangle,
    Ring,
    Cross,
    HStripes,
    VStripes,
    Checker,
    Diagonal,
    TwoBlobs,
}

const FAMILIES: [Family; CLASSES] = [
    Family::Disc,
    Family::Square,
    Family::Triangle,
    Family::Ring,
    Family::Cross,
    Family::HStripes,
    Family::VStripes,
    Family::Checker,
    Family::Diagonal,
    Family::TwoBlobs,
];

/// The colour each class leans towards (RGB, 0..255).
const CLASS_COLOURS: [[f32; 3]; CLASSES] = [
    [90.0, 140.0, 230.0],  // airplane: blue
    [220.0, 40.0, 40.0],   // automobile: red
    [240.0, 210.0, 40.0],  // bird: yellow
    [230.0, 120.0, 30.0],  // cat: orange
    [140.0, 90.0, 50.0],   // deer: brown
    [60.0, 60.0, 70.0],    // dog: dark grey
    [50.0, 190.0, 60.0],   // frog: green
    [235.0, 235.0, 235.0], // horse: white
    [40.0, 190.0, 200.0],  // ship: cyan
    [180.0, 50.0, 200.0],  // truck: purple
];

/// How strongly the object's colour follows its class colour: the weight of the class colour
/// against a random one is uniform in this range. Calibrated so that multinomial logistic
/// regression on 5,000 training images scores about 55% on 1,000 test images.
const COLOUR_PULL: (f32, f32) = (0.6, 1.0);

/// One shape to paint.
#[derive(Clone, Copy, Debug)]
struct Shape {
    family: Family,
    cx: f32,
    cy: f32,
    /// Radius in pixels.
    size: f32,
    cos: f32,
    sin: f32,
    /// Half the stripe/check period in pixels.
    half: f32,
    phase: f32,
    colour: [f32; 3],
    /// The second tone of textured families.
    colour2: [f32; 3],
}

impl Shape {
    fn random(
        rng: &mut Rng,
        family: Family,
        size: f32,
        cx: f32,
        cy: f32,
        colour: [f32; 3],
    ) -> Self {
        use std::f32::consts::PI;
        let angle = match family {
            Family::HStripes | Family::VStripes => rng.range_f32(-0.25, 0.25),
            Family::Checker => rng.range_f32(-0.4, 0.4),
            Family::Diagonal => rng.range_f32(-0.25, 0.25),
            _ => rng.range_f32(0.0, 2.0 * PI),
        };
        let shade = rng.range_f32(0.3, 0.6);
        Shape {
            family,
            cx,
            cy,
            size,
            cos: angle.cos(),
            sin: angle.sin(),
            half: rng.range_f32(1.2, 2.6),
            phase: rng.range_f32(0.0, 8.0),
            colour,
            colour2: colour.map(|c| c * shade),
        }
    }

    /// 0 outside, 1 first tone, 2 second tone, at rotated offset `(u, v)` in pixels.
    fn tone(&self, u: f32, v: f32) -> u8 {
        let r = self.size;
        let stripe = |t: f32| 1 + (((t + self.phase) / self.half).floor() as i32 & 1) as u8;
        match self.family {
            Family::Disc => u8::from(u * u + v * v <= r * r),
            Family::Square => u8::from(u.abs() <= 0.8 * r && v.abs() <= 0.8 * r),
            Family::Triangle => {
                let h = 0.85 * r;
                u8::from(v >= -h && v <= h && u.abs() <= (v + h) * 0.6)
            }
            Family::Ring => {
                let d = u * u + v * v;
                u8::from(d <= r * r && d >= 0.36 * r * r)
            }
            Family::Cross => {
                let w = 0.3 * r;
                u8::from((u.abs() <= w && v.abs() <= r) || (v.abs() <= w && u.abs() <= r))
            }
            Family::TwoBlobs => {
                let b = 0.5 * r;
                let (du, dv) = (u.abs() - 0.6 * r, v);
                u8::from(du * du + dv * dv <= b * b)
            }
            Family::HStripes | Family::VStripes | Family::Checker | Family::Diagonal => {
                if u.abs() > 1.05 * r || v.abs() > 1.05 * r {
                    return 0;
                }
                match self.family {
                    Family::HStripes => stripe(v),
                    Family::VStripes => stripe(u),
                    Family::Diagonal => stripe((u + v) * std::f32::consts::FRAC_1_SQRT_2),
                    _ => {
                        let a = ((u + self.phase) / self.half).floor() as i32;
                        let b = ((v + self.phase) / self.half).floor() as i32;
                        1 + ((a + b) & 1) as u8
                    }
                }
            }
        }
    }

    fn paint(&self, img: &mut [u8]) {
        let reach = self.size * 1.5 + 1.0;
        let lo = |c: f32| (c - reach).floor().clamp(0.0, SIDE as f32) as usize;
        let hi = |c: f32| (c + reach).ceil().clamp(0.0, SIDE as f32) as usize;
        let (x0, x1, y0, y1) = (lo(self.cx), hi(self.cx), lo(self.cy), hi(self.cy));
        let c1 = self.colour.map(to_u8);
        let c2 = self.colour2.map(to_u8);
        for y in y0..y1 {
            let dy = y as f32 + 0.5 - self.cy;
            for x in x0..x1 {
                let dx = x as f32 + 0.5 - self.cx;
                let u = dx * self.cos + dy * self.sin;
                let v = dy * self.cos - dx * self.sin;
                let c = match self.tone(u, v) {
                    0 => continue,
                    1 => c1,
                    _ => c2,
                };
                let p = y * SIDE + x;
                for (plane, value) in img.chunks_exact_mut(PLANE_BYTES).zip(c) {
                    if let Some(px) = plane.get_mut(p) {
                        *px = value;
                    }
                }
            }
        }
    }
}

/// Float to byte; `as` saturates (and maps NaN to 0).
fn to_u8(c: f32) -> u8 {
    c as u8
}

fn random_colour(rng: &mut Rng) -> [f32; 3] {
    [
        rng.range_f32(0.0, 255.0),
        rng.range_f32(0.0, 255.0),
        rng.range_f32(0.0, 255.0),
    ]
}

/// The tag that separates the splits' image streams.
fn split_tag(split: Split) -> u64 {
    match split {
        Split::Train => 0x7472_6169_6e00_0001,
        Split::Test => 0x7465_7374_0000_0002,
    }
}

/// Image `index` of `split` for this seed: deterministic and independent of any other image
/// (its PRNG is seeded from `mix(mix(seed, split), index)`). Fills `pixels_out` (exactly
/// `IMAGE_BYTES` long) in CIFAR layout and returns the label.
///
/// # Panics
/// If `pixels_out.len() != IMAGE_BYTES`.
pub fn image(seed: u64, split: Split, index: u64, pixels_out: &mut [u8]) -> u16 {
    assert_eq!(
        pixels_out.len(),
        IMAGE_BYTES,
        "an image is {IMAGE_BYTES} bytes"
    );
    let mut rng = Rng::new(mix(mix(seed, split_tag(split)), index));
    let label = rng.below(CLASSES);

    // Background: a linear gradient between two random colours.
    let c0 = random_colour(&mut rng);
    let c1 = c0.map(|c| c + rng.range_f32(-90.0, 90.0));
    let angle = rng.range_f32(0.0, std::f32::consts::TAU);
    let (gx, gy) = (angle.cos() / SIDE as f32, angle.sin() / SIDE as f32);
    for (plane, (a, b)) in pixels_out
        .chunks_exact_mut(PLANE_BYTES)
        .zip(c0.into_iter().zip(c1))
    {
        let step = (b - a) * gx;
        for (y, row) in plane.chunks_exact_mut(SIDE).enumerate() {
            let mut v = a + (b - a) * (0.5 - 15.5 * gx + (y as f32 - 15.5) * gy);
            for px in row {
                *px = to_u8(v);
                v += step;
            }
        }
    }

    // Clutter: small shapes of any family in any colour.
    let clutter = rng.below(4);
    for _ in 0..clutter {
        let family = FAMILIES[rng.below(CLASSES)];
        let (size, cx, cy) = (
            rng.range_f32(2.0, 4.5),
            rng.range_f32(0.0, 32.0),
            rng.range_f32(0.0, 32.0),
        );
        let colour = random_colour(&mut rng);
        Shape::random(&mut rng, family, size, cx, cy, colour).paint(pixels_out);
    }

    // The object: the class's family, leaning towards the class's colour.
    let pull = rng.range_f32(COLOUR_PULL.0, COLOUR_PULL.1);
    let base = CLASS_COLOURS[label];
    let jitter = random_colour(&mut rng);
    let colour = [0, 1, 2].map(|c| base[c] * pull + jitter[c] * (1.0 - pull));
    let (size, cx, cy) = (
        rng.range_f32(5.0, 11.0),
        rng.range_f32(9.0, 23.0),
        rng.range_f32(9.0, 23.0),
    );
    Shape::random(&mut rng, FAMILIES[label], size, cx, cy, colour).paint(pixels_out);

    // Sometimes a distractor in front of the object.
    if rng.chance(0.25) {
        let family = FAMILIES[rng.below(CLASSES)];
        let (size, cx, cy) = (
            rng.range_f32(2.0, 4.0),
            rng.range_f32(4.0, 28.0),
            rng.range_f32(4.0, 28.0),
        );
        let colour = random_colour(&mut rng);
        Shape::random(&mut rng, family, size, cx, cy, colour).paint(pixels_out);
    }

    // Pixel noise, uniform in [-amp, amp].
    let amp = 4 + rng.below(13) as i32;
    let span = 2 * amp + 1;
    for chunk in pixels_out.chunks_mut(8) {
        let bits = rng.next_u64().to_le_bytes();
        for (px, b) in chunk.iter_mut().zip(bits) {
            let n = ((i32::from(b) * span) >> 8) - amp;
            *px = (i32::from(*px) + n).clamp(0, 255) as u8;
        }
    }
    label as u16
}

/// The images of `split`: five train files (sizes as equal as possible, in order
/// `data_batch_1` … `data_batch_5`) or one test file. Image `i` of the split (counting
/// across files) is `image(spec.seed, split, i, …)`.
pub fn generate(spec: &SynthSpec, split: Split) -> Vec<Images> {
    let mut index = 0u64;
    file_sizes(spec.count(split), split)
        .into_iter()
        .map(|n| {
            let mut images = Images {
                labels: Vec::with_capacity(n),
                pixels: vec![0u8; n * IMAGE_BYTES],
                side: SIDE,
            };
            for px in images.pixels.chunks_exact_mut(IMAGE_BYTES) {
                images.labels.push(image(spec.seed, split, index, px));
                index += 1;
            }
            images
        })
        .collect()
}

/// Write the synthetic dataset in the given layouts: `out/cifar-10-batches-bin/`
/// (`data_batch_1.bin` … `data_batch_5.bin`, `test_batch.bin`, `batches.meta.txt`) and/or
/// `out/cifar-10-batches-py/` (`data_batch_1` … `data_batch_5`, `test_batch`,
/// `batches.meta`). Creates the folders.
pub fn write_folder(out: &Path, spec: &SynthSpec, layouts: &[Layout]) -> Result<()> {
    if layouts.is_empty() {
        return Err(Error::usage("write_folder: no layout given"));
    }
    for &layout in layouts {
        let dir = out.join(layout.dir_name());
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    for split in Split::ALL {
        let files = generate(spec, split);
        for &layout in layouts {
            let dir = out.join(layout.dir_name());
            let paths = dataset::split_files(&dir, layout, split);
            let total = paths.len();
            for (k, (path, images)) in paths.iter().zip(&files).enumerate() {
                match layout {
                    Layout::Bin => dataset::write_bin(path, images)?,
                    Layout::Py => {
                        let label = match split {
                            Split::Train => format!("training batch {} of {total}", k + 1),
                            Split::Test => format!("testing batch {} of {total}", k + 1),
                        };
                        dataset::write_pickle(path, images, &label)?;
                    }
                }
            }
        }
    }
    for &layout in layouts {
        let dir = out.join(layout.dir_name());
        match layout {
            Layout::Bin => dataset::write_meta_txt(&dir.join("batches.meta.txt"))?,
            Layout::Py => {
                let per_batch = file_sizes(spec.train, Split::Train)
                    .first()
                    .copied()
                    .unwrap_or(0);
                dataset::write_meta_pickle(&dir.join("batches.meta"), per_batch)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::{load_split, locate, read_bin, DataSpec};

    fn small() -> SynthSpec {
        SynthSpec {
            train: 503,
            test: 97,
            seed: 42,
        }
    }

    #[test]
    fn deterministic() {
        let a = generate(&small(), Split::Train);
        let b = generate(&small(), Split::Train);
        assert_eq!(a, b);
        let other = generate(
            &SynthSpec {
                seed: 43,
                ..small()
            },
            Split::Train,
        );
        assert_ne!(a, other);
        // Image i does not depend on how many images are made.
        let fewer = generate(
            &SynthSpec {
                train: 10,
                ..small()
            },
            Split::Train,
        );
        assert_eq!(fewer[0].image(0), a[0].image(0));
        // fewer's second file starts at image 2 of the split.
        assert_eq!(fewer[1].image(0), a[0].image(2));
        let mut px = vec![0u8; IMAGE_BYTES];
        let label = image(42, Split::Train, 0, &mut px);
        assert_eq!((label, px.as_slice()), (a[0].labels[0], a[0].image(0)));
        // Train and test streams differ.
        let test = generate(&small(), Split::Test);
        assert_ne!(test[0].image(0), a[0].image(0));
    }

    #[test]
    fn file_layout_and_labels() {
        let train = generate(&small(), Split::Train);
        let sizes: Vec<usize> = train.iter().map(Images::len).collect();
        assert_eq!(sizes, vec![101, 101, 101, 100, 100]);
        let test = generate(&small(), Split::Test);
        assert_eq!(test.len(), 1);
        assert_eq!(test[0].len(), 97);
        let mut counts = [0usize; CLASSES];
        for images in &train {
            images.check().expect("consistent");
            for &l in &images.labels {
                counts[usize::from(l)] += 1;
            }
        }
        assert!(counts.iter().all(|&c| c > 20), "{counts:?}");
    }

    #[test]
    fn written_folder_reads_back() {
        let dir = std::env::temp_dir().join(format!("cifar-df-synth-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let spec = SynthSpec {
            train: 23,
            test: 7,
            seed: 5,
        };
        write_folder(&dir, &spec, &[Layout::Bin, Layout::Py]).expect("write");
        let (found, layout) = locate(&dir).expect("locate");
        assert_eq!(layout, Layout::Bin);
        assert_eq!(
            read_bin(&found.join("test_batch.bin")).expect("bin"),
            generate(&spec, Split::Test)[0]
        );
        let py = DataSpec::Folder(dir.join("cifar-10-batches-py"));
        assert_eq!(
            load_split(&py, Split::Train).expect("py"),
            generate(&spec, Split::Train)
        );
        assert_eq!(
            load_split(&DataSpec::Synthetic(spec.clone()), Split::Train).expect("synth"),
            generate(&spec, Split::Train)
        );
        assert!(dir.join("cifar-10-batches-py/batches.meta").is_file());
        assert!(dir.join("cifar-10-batches-bin/batches.meta.txt").is_file());
        let _ = fs::remove_dir_all(&dir);
    }
}
