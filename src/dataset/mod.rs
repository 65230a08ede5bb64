//! CIFAR-10 datasets on disk.
//!
//! The dataset ships in two layouts: `cifar-10-batches-bin/` (records of one label byte and
//! 3,072 pixel bytes) and `cifar-10-batches-py/` (Python-2 pickles of a dict holding a numpy
//! array). This module finds a dataset on disk, reads and writes both layouts with std only
//! (the pickle side is a small, strict pickle VM that understands exactly what numpy writes
//! for such a dict), and hands out the images of a split as plain byte vectors. Every error
//! from a file names the file and the byte offset where it went wrong; nothing here panics on
//! file input.

use std::fmt;
use std::fs;
use std::io::{self, BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::{Error, Result};

pub mod folder;
mod pickle;
pub mod synth;

use pickle::{encode_pickle, put_int, put_str, Vm};
use synth::SynthSpec;

/// Bytes of one image: 1,024 red, 1,024 green, then 1,024 blue, each plane row-major 32×32.
pub const IMAGE_BYTES: usize = 3072;
/// Width and height of an image in pixels.
pub const SIDE: usize = 32;
/// Bytes of one colour plane (`SIDE * SIDE`).
pub const PLANE_BYTES: usize = SIDE * SIDE;
/// Number of classes.
pub const CLASSES: usize = 10;

/// The most classes a run can have (labels are `u16`; a 1,000-class confusion matrix is
/// 8 MB).
pub const MAX_CLASSES: usize = 1000;
/// Bytes of one record in the binary layout: a label byte and the pixels.
pub const RECORD_BYTES: usize = IMAGE_BYTES + 1;
/// Number of training files (`data_batch_1` … `data_batch_5`).
pub const TRAIN_FILES: usize = 5;
/// Class names, indexed by label.
pub const CLASS_NAMES: [&str; CLASSES] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// Which part of the dataset: the training or the test images.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    /// The five training files.
    Train,
    /// The test file.
    Test,
}

impl Split {
    /// Both splits, train first.
    pub const ALL: [Split; 2] = [Split::Train, Split::Test];

    /// The lower-case name, as parsed by `FromStr`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Split {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "train" => Ok(Split::Train),
            "test" => Ok(Split::Test),
            _ => Err(Error::usage(format!(
                "unknown split '{s}': expected one of train, test"
            ))),
        }
    }
}

/// The on-disk layout of a dataset folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layout {
    /// `cifar-10-batches-bin/`: `data_batch_N.bin` records of label byte + pixels.
    Bin,
    /// `cifar-10-batches-py/`: `data_batch_N` Python pickles.
    Py,
}

impl Layout {
    /// Both layouts, binary first.
    pub const ALL: [Layout; 2] = [Layout::Bin, Layout::Py];

    /// The lower-case name, as parsed by `FromStr`.
    pub fn name(self) -> &'static str {
        match self {
            Layout::Bin => "bin",
            Layout::Py => "py",
        }
    }

    /// The folder name the official archive uses for this layout.
    pub fn dir_name(self) -> &'static str {
        match self {
            Layout::Bin => "cifar-10-batches-bin",
            Layout::Py => "cifar-10-batches-py",
        }
    }

    /// The file-name suffix of the batch files (`.bin` or nothing).
    pub fn suffix(self) -> &'static str {
        match self {
            Layout::Bin => ".bin",
            Layout::Py => "",
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Layout {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "bin" => Ok(Layout::Bin),
            "py" => Ok(Layout::Py),
            _ => Err(Error::usage(format!(
                "unknown layout '{s}': expected one of bin, py"
            ))),
        }
    }
}

/// Images of one file (or batch): label `i` is `labels[i]`; its pixels are
/// `pixels[i * b..(i + 1) * b]` with `b = 3·side²` ([`IMAGE_BYTES`] for CIFAR's 32×32).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Images {
    /// One label (0..K) per image.
    pub labels: Vec<u16>,
    /// `3·side²` pixel bytes per image, in CIFAR layout (red plane, green, blue).
    pub pixels: Vec<u8>,
    /// Width and height of every image in pixels ([`SIDE`] for CIFAR's files).
    pub side: usize,
}

impl Default for Images {
    fn default() -> Self {
        Images {
            labels: Vec::new(),
            pixels: Vec::new(),
            side: SIDE,
        }
    }
}

/// Bytes of one `side`×`side` RGB image in CIFAR layout.
pub const fn image_bytes(side: usize) -> usize {
    3 * side * side
}

/// The most pixels a side of a stream's images may have (`--image-size`): 512×512 RGB is
/// 768 KiB an image.
pub const MAX_IMAGE_SIDE: usize = 512;

/// Checks an image side given by a user (`--image-size`, a config's `image_size`).
pub fn check_side(side: usize) -> Result<usize> {
    if (4..=MAX_IMAGE_SIDE).contains(&side) {
        Ok(side)
    } else {
        Err(Error::usage(format!(
            "image size {side}: give a side of 4 to {MAX_IMAGE_SIDE} pixels"
        )))
    }
}

impl Images {
    /// An empty set of 32×32 images with room for `n`.
    pub fn with_capacity(n: usize) -> Self {
        Images::with_side(n, SIDE)
    }

    /// An empty set of `side`×`side` images with room for `n`.
    pub fn with_side(n: usize, side: usize) -> Self {
        Images {
            labels: Vec::with_capacity(n),
            pixels: Vec::with_capacity(n.saturating_mul(image_bytes(side))),
            side,
        }
    }

    /// Bytes of one image (`3·side²`).
    pub fn image_bytes(&self) -> usize {
        image_bytes(self.side)
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The pixels of image `i`.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn image(&self, i: usize) -> &[u8] {
        let b = self.image_bytes();
        &self.pixels[i * b..(i + 1) * b]
    }

    /// Append one image.
    ///
    /// # Panics
    /// If `pixels.len()` is not [`image_bytes`](Self::image_bytes).
    pub fn push(&mut self, label: u16, pixels: &[u8]) {
        let b = self.image_bytes();
        assert_eq!(pixels.len(), b, "an image is {b} bytes");
        self.labels.push(label);
        self.pixels.extend_from_slice(pixels);
    }

    /// Append images `range` of `other` (an empty set takes `other`'s side).
    ///
    /// # Panics
    /// If `range` is not within `0..other.len()`, or the sides differ.
    pub fn extend_range(&mut self, other: &Images, range: Range<usize>) {
        if self.is_empty() {
            self.side = other.side;
        }
        assert_eq!(self.side, other.side, "images of different sides");
        let b = self.image_bytes();
        self.labels.extend_from_slice(&other.labels[range.clone()]);
        self.pixels
            .extend_from_slice(&other.pixels[range.start * b..range.end * b]);
    }

    /// The images as `(label, pixels)` pairs.
    pub fn iter(&self) -> impl Iterator<Item = (u16, &[u8])> + '_ {
        self.labels
            .iter()
            .copied()
            .zip(self.pixels.chunks_exact(self.image_bytes()))
    }

    /// The same images resized to `side`×`side` (bilinear with half-pixel centres, the
    /// `resize` transform's kernel); unchanged when they have that side already.
    pub fn resized(self, side: usize) -> Result<Images> {
        if side == self.side {
            return Ok(self);
        }
        let plan = crate::transforms::pixels::Resize::new(self.side, side, side)?;
        let b = image_bytes(side);
        let mut pixels = vec![0u8; self.len() * b];
        for (src, dst) in self
            .pixels
            .chunks_exact(self.image_bytes())
            .zip(pixels.chunks_exact_mut(b))
        {
            plan.apply(src, dst)?;
        }
        Ok(Images {
            labels: self.labels,
            pixels,
            side,
        })
    }

    /// Check that the pixel bytes match the labels and every label is a class.
    pub fn check(&self) -> Result<()> {
        if Some(self.pixels.len()) != self.labels.len().checked_mul(self.image_bytes()) {
            return Err(Error::usage(format!(
                "images: {} labels but {} pixel bytes (expected {} per image)",
                self.labels.len(),
                self.pixels.len(),
                self.image_bytes()
            )));
        }
        if let Some((i, l)) = self
            .labels
            .iter()
            .enumerate()
            .find(|(_, &l)| usize::from(l) >= CLASSES)
        {
            return Err(Error::usage(format!(
                "images: label {l} of image {i} is not a class 0..{}",
                CLASSES - 1
            )));
        }
        Ok(())
    }
}

/// Splits a dataset's files into batches the way the original server does: images in file
/// order, what does not fill a batch at the end of a file carried into the next file, and the
/// final remainder sent as one last, smaller batch.
#[derive(Clone, Debug)]
pub struct Batcher {
    size: usize,
    file: usize,
    pos: usize,
    carry: Images,
}

impl Batcher {
    /// Batches of `size` images (at least 1).
    pub fn new(size: usize) -> Self {
        Batcher {
            size: size.max(1),
            file: 0,
            pos: 0,
            carry: Images::default(),
        }
    }

    /// The next batch of `files`; `None` at the end of the split.
    pub fn next(&mut self, files: &[Images]) -> Option<Images> {
        loop {
            let Some(f) = files.get(self.file) else {
                return (!self.carry.is_empty()).then(|| std::mem::take(&mut self.carry));
            };
            let need = self.size - self.carry.len();
            if f.len() - self.pos >= need {
                let mut out = std::mem::take(&mut self.carry);
                out.extend_range(f, self.pos..self.pos + need);
                self.pos += need;
                return Some(out);
            }
            self.carry.extend_range(f, self.pos..f.len());
            self.file += 1;
            self.pos = 0;
        }
    }
}

/// Where a dataset is: a folder or the built-in synthetic set.
#[derive(Clone, Debug, PartialEq)]
pub enum DataSpec {
    /// A folder holding (or being the parent of) `cifar-10-batches-bin/` or `-py/`.
    Folder(PathBuf),
    /// Images generated on the fly by [`crate::dataset::synth`].
    Synthetic(SynthSpec),
}

impl DataSpec {
    /// Parse `synthetic`, `synthetic:TRAIN`, `synthetic:TRAIN:TEST` or
    /// `synthetic:TRAIN:TEST:SEED` (missing parts take [`SynthSpec::default`]); anything else
    /// is a folder path (write `./synthetic` for a folder of that name).
    pub fn parse(s: &str) -> Result<DataSpec> {
        if s == "synthetic" {
            return Ok(DataSpec::Synthetic(SynthSpec::default()));
        }
        if let Some(rest) = s.strip_prefix("synthetic:") {
            let parts: Vec<&str> = rest.split(':').collect();
            if parts.len() > 3 {
                return Err(Error::usage(format!(
                    "bad data spec '{s}': expected synthetic[:TRAIN[:TEST[:SEED]]]"
                )));
            }
            let mut spec = SynthSpec::default();
            let number = |what: &str, text: &str| -> Result<u64> {
                text.parse::<u64>().map_err(|_| {
                    Error::usage(format!(
                        "bad data spec '{s}': {what} '{text}' is not a non-negative integer \
                         (expected synthetic[:TRAIN[:TEST[:SEED]]])"
                    ))
                })
            };
            let count = |what: &str, text: &str| -> Result<usize> {
                usize::try_from(number(what, text)?)
                    .map_err(|_| Error::usage(format!("bad data spec '{s}': {what} too large")))
            };
            if let Some(t) = parts.first() {
                spec.train = count("TRAIN", t)?;
            }
            if let Some(t) = parts.get(1) {
                spec.test = count("TEST", t)?;
            }
            if let Some(t) = parts.get(2) {
                spec.seed = number("SEED", t)?;
            }
            return Ok(DataSpec::Synthetic(spec));
        }
        if s.is_empty() {
            return Err(Error::usage(
                "empty data spec: give a folder or synthetic[:TRAIN[:TEST[:SEED]]]",
            ));
        }
        Ok(DataSpec::Folder(PathBuf::from(s)))
    }
}

impl FromStr for DataSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        DataSpec::parse(s)
    }
}

impl fmt::Display for DataSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataSpec::Folder(p) => write!(f, "{}", p.display()),
            DataSpec::Synthetic(s) => write!(f, "synthetic:{}:{}:{}", s.train, s.test, s.seed),
        }
    }
}

/// Find the layout: `dir` may be the parent of `cifar-10-batches-bin/` /
/// `cifar-10-batches-py/`, or either of them (recognised by `data_batch_1.bin` /
/// `test_batch.bin`, or `data_batch_1` / `test_batch`). Binary wins when both exist.
/// Returns the folder holding the files and its layout.
pub fn locate(dir: &Path) -> Result<(PathBuf, Layout)> {
    let meta = fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
    if !meta.is_dir() {
        return Err(Error::usage(format!(
            "{}: not a folder (expected a CIFAR-10 dataset folder)",
            dir.display()
        )));
    }
    let candidates = [
        (dir.to_path_buf(), Layout::Bin),
        (dir.join(Layout::Bin.dir_name()), Layout::Bin),
        (dir.to_path_buf(), Layout::Py),
        (dir.join(Layout::Py.dir_name()), Layout::Py),
    ];
    for (folder, layout) in candidates {
        let marker = |name: &str| folder.join(format!("{name}{}", layout.suffix())).is_file();
        if marker("data_batch_1") || marker("test_batch") {
            return Ok((folder, layout));
        }
    }
    let d = dir.display();
    Err(Error::usage(format!(
        "no CIFAR-10 dataset in {d}: looked for data_batch_1.bin or test_batch.bin in {d} and \
         {d}/cifar-10-batches-bin, and for data_batch_1 or test_batch in {d} and \
         {d}/cifar-10-batches-py"
    )))
}

/// The files of `split` in a folder of the given layout, in order: `data_batch_1` …
/// `data_batch_5` for train, `test_batch` for test (with `.bin` for [`Layout::Bin`]).
pub fn split_files(dir_holding_files: &Path, layout: Layout, split: Split) -> Vec<PathBuf> {
    let suffix = layout.suffix();
    match split {
        Split::Train => (1..=TRAIN_FILES)
            .map(|i| dir_holding_files.join(format!("data_batch_{i}{suffix}")))
            .collect(),
        Split::Test => vec![dir_holding_files.join(format!("test_batch{suffix}"))],
    }
}

/// Read one batch file of the given layout.
pub fn read_file(path: &Path, layout: Layout) -> Result<Images> {
    match layout {
        Layout::Bin => read_bin(path),
        Layout::Py => read_pickle(path),
    }
}

/// Check the record structure of a binary batch file and return its labels.
fn bin_labels(bytes: &[u8], path: &Path) -> Result<Vec<u16>> {
    let whole = bytes.len() / RECORD_BYTES;
    let rest = bytes.len() % RECORD_BYTES;
    if rest != 0 {
        let at = whole * RECORD_BYTES;
        return Err(Error::format(
            path,
            at as u64,
            format!(
                "truncated record {whole}: it has {rest} of {RECORD_BYTES} bytes \
                 (the file is {} bytes, not a multiple of {RECORD_BYTES})",
                bytes.len()
            ),
        ));
    }
    let mut labels = Vec::with_capacity(whole);
    for (i, record) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
        let label = record.first().copied().unwrap_or(0);
        if usize::from(label) >= CLASSES {
            return Err(Error::format(
                path,
                (i * RECORD_BYTES) as u64,
                format!(
                    "record {i}: label {label} is not a class 0..{}",
                    CLASSES - 1
                ),
            ));
        }
        labels.push(u16::from(label));
    }
    Ok(labels)
}

/// Read a binary batch file: records of one label byte and `IMAGE_BYTES` pixel bytes.
pub fn read_bin(path: &Path) -> Result<Images> {
    let mut bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    let labels = bin_labels(&bytes, path)?;
    // Drop the label bytes in place: record i's pixels move to i * IMAGE_BYTES.
    for i in 0..labels.len() {
        let from = i * RECORD_BYTES + 1;
        bytes.copy_within(from..from + IMAGE_BYTES, i * IMAGE_BYTES);
    }
    bytes.truncate(labels.len() * IMAGE_BYTES);
    Ok(Images {
        labels,
        pixels: bytes,
        side: SIDE,
    })
}

/// Parse the bytes of a binary batch file (`path` only names it in errors).
pub fn parse_bin(bytes: &[u8], path: &Path) -> Result<Images> {
    let labels = bin_labels(bytes, path)?;
    let mut pixels = Vec::with_capacity(labels.len() * IMAGE_BYTES);
    for record in bytes.chunks_exact(RECORD_BYTES) {
        pixels.extend_from_slice(record.get(1..).unwrap_or(&[]));
    }
    Ok(Images {
        labels,
        pixels,
        side: SIDE,
    })
}

/// Read a Python batch file (a pickled dict with `labels` and a numpy `data` array).
pub fn read_pickle(path: &Path) -> Result<Images> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_pickle(&bytes, path)
}

/// Parse the bytes of a Python batch file (`path` only names it in errors).
///
/// Accepts pickle protocols 0–5 as far as they can describe a dict with `labels` (a list of
/// ints 0..10) and `data` (a C-order uint8 numpy array of shape `(N, 3072)`), whether written
/// by Python 2 (`str` data) or Python 3 (`bytes`, or `_codecs.encode(str, 'latin1')` under
/// protocol 2). Other keys are ignored.
pub fn parse_pickle(bytes: &[u8], path: &Path) -> Result<Images> {
    let mut vm = Vm::new(bytes, path);
    let top = vm.run()?;
    vm.finish(top)
}

/// What a data folder holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// CIFAR-10 batch files in the folder, in the given layout.
    Cifar10(PathBuf, Layout),
    /// CIFAR-100's `train`/`test` files (`.bin` for [`Layout::Bin`]) and its class names.
    Cifar100(PathBuf, Layout),
    /// An image folder (`train/CLASS/*`, see [`folder`]).
    Images(PathBuf),
}

/// Folder names of the official CIFAR-100 archives.
pub const CIFAR100_DIRS: [(&str, Layout); 2] = [
    ("cifar-100-binary", Layout::Bin),
    ("cifar-100-python", Layout::Py),
];

/// Finds what `dir` holds: CIFAR-10 (see [`locate`]), CIFAR-100 (`train.bin` or the
/// pickle `train` with `meta`, in `dir` or its `cifar-100-binary/` / `cifar-100-python/`),
/// or an image folder (`dir/train/CLASS/`), in that order.
pub fn find(dir: &Path) -> Result<Found> {
    let ten = locate(dir);
    if let Ok((folder, layout)) = ten {
        return Ok(Found::Cifar10(folder, layout));
    }
    let mut candidates = vec![
        (dir.to_path_buf(), Layout::Bin),
        (dir.to_path_buf(), Layout::Py),
    ];
    for (name, layout) in CIFAR100_DIRS {
        candidates.push((dir.join(name), layout));
    }
    for (folder, layout) in candidates {
        let hit = match layout {
            Layout::Bin => folder.join("train.bin").is_file() || folder.join("test.bin").is_file(),
            Layout::Py => folder.join("meta").is_file() && folder.join("train").is_file(),
        };
        if hit {
            return Ok(Found::Cifar100(folder, layout));
        }
    }
    if folder::is_image_folder(dir) {
        return Ok(Found::Images(dir.to_path_buf()));
    }
    match ten {
        Err(e) if !dir.is_dir() => Err(e),
        _ => {
            let d = dir.display();
            Err(Error::usage(format!(
                "no dataset in {d}: looked for CIFAR-10 (data_batch_1.bin or test_batch.bin in \
                 {d} or {d}/cifar-10-batches-bin; data_batch_1 or test_batch in {d} or \
                 {d}/cifar-10-batches-py), CIFAR-100 (train.bin, or train and meta, in {d}, \
                 {d}/cifar-100-binary or {d}/cifar-100-python) and an image folder \
                 ({d}/train/CLASS/*.jpg or *.png, one folder per class)"
            )))
        }
    }
}

/// Bytes of one CIFAR-100 binary record: coarse label, fine label, pixels.
pub const RECORD100_BYTES: usize = IMAGE_BYTES + 2;

/// Reads a CIFAR-100 binary file (`train.bin`, `test.bin`) with its fine labels.
pub fn read_bin100(path: &Path) -> Result<Images> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_bin100(&bytes, path)
}

/// Parses the bytes of a CIFAR-100 binary file (`path` only names it in errors).
pub fn parse_bin100(bytes: &[u8], path: &Path) -> Result<Images> {
    let whole = bytes.len() / RECORD100_BYTES;
    let rest = bytes.len() % RECORD100_BYTES;
    if rest != 0 {
        return Err(Error::format(
            path,
            (whole * RECORD100_BYTES) as u64,
            format!(
                "truncated record {whole}: it has {rest} of {RECORD100_BYTES} bytes (coarse \
                 label, fine label, {IMAGE_BYTES} pixels)"
            ),
        ));
    }
    let mut images = Images::with_capacity(whole);
    for (i, record) in bytes.chunks_exact(RECORD100_BYTES).enumerate() {
        let fine = record[1];
        if usize::from(fine) >= CIFAR100_CLASSES {
            return Err(Error::format(
                path,
                (i * RECORD100_BYTES + 1) as u64,
                format!("record {i}: fine label {fine} is not a class 0..99"),
            ));
        }
        images.push(u16::from(fine), &record[2..]);
    }
    Ok(images)
}

/// CIFAR-100's number of fine classes.
pub const CIFAR100_CLASSES: usize = 100;

/// Reads a CIFAR-100 Python file (`train`, `test`: a pickled dict with `data` and
/// `fine_labels`).
pub fn read_pickle100(path: &Path) -> Result<Images> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut vm = Vm::new(&bytes, path);
    let top = vm.run()?;
    vm.finish_with(top, b"fine_labels", CIFAR100_CLASSES)
}

/// CIFAR-100's fine class names: `fine_label_names.txt` (binary layout, one per line) or
/// the `meta` pickle's `fine_label_names`.
pub fn cifar100_names(folder: &Path, layout: Layout) -> Result<Vec<String>> {
    let names = match layout {
        Layout::Bin => {
            let path = folder.join("fine_label_names.txt");
            let text = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect::<Vec<_>>()
        }
        Layout::Py => {
            let path = folder.join("meta");
            let bytes = fs::read(&path).map_err(|e| Error::io(&path, e))?;
            let mut vm = Vm::new(&bytes, &path);
            let top = vm.run()?;
            vm.finish_names(top, b"fine_label_names")?
        }
    };
    if names.len() != CIFAR100_CLASSES {
        return Err(Error::usage(format!(
            "{}: {} fine class names, expected {CIFAR100_CLASSES}",
            folder.display(),
            names.len()
        )));
    }
    Ok(names)
}

/// Whether the dataset has images of `split`: an image folder may have no `test/`.
pub fn has_split(spec: &DataSpec, split: Split) -> bool {
    match spec {
        DataSpec::Folder(dir) => match find(dir) {
            Ok(Found::Images(root)) => root.join(split.name()).is_dir(),
            _ => true,
        },
        DataSpec::Synthetic(_) => true,
    }
}

/// The class names of a dataset, label 0 first: CIFAR-10's ten, CIFAR-100's hundred fine
/// classes, or an image folder's class folders in sorted order.
pub fn class_names(spec: &DataSpec) -> Result<Vec<String>> {
    let cifar10 = || CLASS_NAMES.iter().map(|s| s.to_string()).collect();
    match spec {
        DataSpec::Synthetic(_) => Ok(cifar10()),
        DataSpec::Folder(dir) => match find(dir)? {
            Found::Cifar10(..) => Ok(cifar10()),
            Found::Cifar100(folder, layout) => cifar100_names(&folder, layout),
            Found::Images(root) => folder::classes(&root),
        },
    }
}

/// The split's images, one `Images` per file in order (CIFAR-10 train: 5 files; test: 1;
/// CIFAR-100 and image folders: 1). An image folder's rejected files are named in the log
/// and not returned; [`load_split_counted`] also counts them.
pub fn load_split(spec: &DataSpec, split: Split) -> Result<Vec<Images>> {
    Ok(load_split_counted(spec, split)?.0)
}

/// [`load_split`], and the number of image files rejected (an image folder's files that
/// are not images, are truncated or have zero size).
pub fn load_split_counted(spec: &DataSpec, split: Split) -> Result<(Vec<Images>, usize)> {
    load_split_sized(spec, split, SIDE)
}

/// [`load_split_counted`] with the images `side`×`side` (`--image-size`): an image
/// folder's files are decoded straight to that side, CIFAR's and the synthetic 32×32
/// images are resized (bilinear, the `resize` transform's kernel).
pub fn load_split_sized(
    spec: &DataSpec,
    split: Split,
    side: usize,
) -> Result<(Vec<Images>, usize)> {
    let (files, rejected) = load_split_native(spec, split, side)?;
    if files.iter().any(|f| f.side != side) {
        let n: usize = files.iter().map(Images::len).sum();
        check_resized(n, side)?;
    }
    let files = files
        .into_iter()
        .map(|f| f.resized(side))
        .collect::<Result<_>>()?;
    Ok((files, rejected))
}

/// Checks `n` images of `side`×`side` against the memory limit before they are made.
pub fn check_resized(n: usize, side: usize) -> Result<()> {
    crate::limits::check(
        &format!("{n} images of {side}x{side} (--image-size {side})"),
        crate::limits::product(&[n, image_bytes(side)]),
    )
}

/// [`load_split_sized`] of the first `n` images only (the rest are dropped before any
/// resize): what fitting an extractor on the first images needs.
pub fn load_split_first(
    spec: &DataSpec,
    split: Split,
    side: usize,
    n: usize,
) -> Result<(Vec<Images>, usize)> {
    let (files, rejected) = load_split_native(spec, split, side)?;
    check_resized(n.min(files.iter().map(Images::len).sum()), side)?;
    let mut left = n;
    let mut out = Vec::new();
    for f in files {
        if left == 0 {
            break;
        }
        let take = left.min(f.len());
        left -= take;
        let mut part = Images::with_side(take, f.side);
        part.extend_range(&f, 0..take);
        out.push(part.resized(side)?);
    }
    Ok((out, rejected))
}

/// The split as stored: CIFAR's and synthetic images at 32×32, an image folder's at `side`.
fn load_split_native(spec: &DataSpec, split: Split, side: usize) -> Result<(Vec<Images>, usize)> {
    match spec {
        DataSpec::Synthetic(s) => Ok((synth::generate(s, split), 0)),
        DataSpec::Folder(dir) => match find(dir)? {
            Found::Cifar10(folder, layout) => Ok((
                split_files(&folder, layout, split)
                    .iter()
                    .map(|f| read_file(f, layout))
                    .collect::<Result<_>>()?,
                0,
            )),
            Found::Cifar100(folder, layout) => {
                let name = split.name();
                let images = match layout {
                    Layout::Bin => read_bin100(&folder.join(format!("{name}.bin")))?,
                    Layout::Py => read_pickle100(&folder.join(name))?,
                };
                Ok((vec![images], 0))
            }
            Found::Images(root) => {
                let classes = folder::classes(&root)?;
                let loaded = folder::load(&root, split, &classes, side)?;
                Ok((vec![loaded.images], loaded.rejected.len()))
            }
        },
    }
}

/// Write `images` as a binary batch file.
pub fn write_bin(path: &Path, images: &Images) -> Result<()> {
    images.check()?;
    let file = fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = BufWriter::with_capacity(1 << 16, file);
    let write = |w: &mut BufWriter<fs::File>| -> io::Result<()> {
        for (label, pixels) in images.iter() {
            // `check` keeps every label a CIFAR-10 class: it fits the format's byte.
            w.write_all(&[label as u8])?;
            w.write_all(pixels)?;
        }
        w.flush()
    };
    write(&mut w).map_err(|e| Error::io(path, e))
}

/// Write `images` as a Python batch file: a protocol-2 pickle with the same opcodes as the
/// official Python-2 files (`batch_label`, `labels`, `data`), loadable by `parse_pickle` and
/// by Python's `pickle.load(f, encoding='bytes')` with numpy installed.
pub fn write_pickle(path: &Path, images: &Images, batch_label: &str) -> Result<()> {
    images.check()?;
    let file = fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = BufWriter::with_capacity(1 << 16, file);
    encode_pickle(&mut w, images, batch_label)
        .and_then(|()| w.flush())
        .map_err(|e| Error::io(path, e))
}

/// Write `batches.meta` (the Python layout's class-name file) for batches of `per_batch`
/// images.
pub fn write_meta_pickle(path: &Path, per_batch: usize) -> Result<()> {
    let encode = || -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"\x80\x02}q\x01(");
        put_str(&mut out, b"num_cases_per_batch")?;
        out.extend_from_slice(b"q\x02");
        put_int(&mut out, per_batch)?;
        put_str(&mut out, b"label_names")?;
        out.extend_from_slice(b"q\x03]q\x04(");
        for name in CLASS_NAMES {
            put_str(&mut out, name.as_bytes())?;
        }
        out.push(b'e');
        put_str(&mut out, b"num_vis")?;
        out.extend_from_slice(b"q\x05");
        put_int(&mut out, IMAGE_BYTES)?;
        out.extend_from_slice(b"u.");
        Ok(out)
    };
    encode()
        .and_then(|bytes| fs::write(path, bytes))
        .map_err(|e| Error::io(path, e))
}

/// Write `batches.meta.txt` (the binary layout's class-name file).
pub fn write_meta_txt(path: &Path) -> Result<()> {
    let mut text = String::new();
    for name in CLASS_NAMES {
        text.push_str(name);
        text.push('\n');
    }
    fs::write(path, text).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "cifar-df-dataset-test-{}-{name}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create scratch dir");
        dir
    }

    fn sample(n: usize) -> Images {
        let mut images = Images::with_capacity(n);
        let mut px = vec![0u8; IMAGE_BYTES];
        for i in 0..n {
            for (j, p) in px.iter_mut().enumerate() {
                *p = (i * 31 + j * 7) as u8;
            }
            images.push((i % CLASSES) as u16, &px);
        }
        images
    }

    fn encoded(images: &Images, label: &str) -> Vec<u8> {
        let mut out = Vec::new();
        encode_pickle(&mut out, images, label).expect("encode");
        out
    }

    /// A path in the real CIFAR-10 sample (`$CIFAR10_MINI`, default
    /// `../shared/data/cifar10-mini`), or `None` with a note when it is not there.
    fn mini(rel: &str) -> Option<PathBuf> {
        let dir = std::env::var_os("CIFAR10_MINI")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/cifar10-mini")
            });
        let p = dir.join(rel);
        if p.exists() {
            Some(p)
        } else {
            crate::testing::skip("a test on the real images", &p.display().to_string());
            None
        }
    }

    fn format_offset(e: &Error) -> u64 {
        match e {
            Error::Format { offset, .. } => *offset,
            other => panic!("expected a format error, got {other}"),
        }
    }

    #[test]
    fn bin_round_trip() {
        let dir = scratch_dir("bin");
        let images = sample(7);
        let path = dir.join("x.bin");
        write_bin(&path, &images).expect("write");
        assert_eq!(
            fs::metadata(&path).expect("meta").len(),
            7 * RECORD_BYTES as u64
        );
        assert_eq!(read_bin(&path).expect("read"), images);
        assert_eq!(read_file(&path, Layout::Bin).expect("read"), images);
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn truncated_bin_names_offset() {
        let mut bytes = Vec::new();
        for (l, p) in sample(3).iter() {
            bytes.push(l as u8);
            bytes.extend_from_slice(p);
        }
        bytes.truncate(2 * RECORD_BYTES + 100);
        let err = parse_bin(&bytes, Path::new("t.bin")).expect_err("truncated");
        assert_eq!(format_offset(&err), 2 * RECORD_BYTES as u64);
        let msg = err.to_string();
        assert!(msg.contains("t.bin") && msg.contains("truncated"), "{msg}");
    }

    #[test]
    fn bad_label_names_record() {
        let mut bytes = Vec::new();
        for (l, p) in sample(3).iter() {
            bytes.push(l as u8);
            bytes.extend_from_slice(p);
        }
        bytes[RECORD_BYTES] = 10;
        let err = parse_bin(&bytes, Path::new("t.bin")).expect_err("bad label");
        assert_eq!(format_offset(&err), RECORD_BYTES as u64);
        assert!(err.to_string().contains("label 10"), "{err}");
    }

    #[test]
    fn pickle_matches_bin_on_real_files() {
        let (Some(py), Some(bin)) = (
            mini("cifar-10-batches-py/test_batch"),
            mini("cifar-10-batches-bin/test_batch.bin"),
        ) else {
            return;
        };
        let a = read_pickle(&py).expect("pickle");
        let b = read_bin(&bin).expect("bin");
        assert_eq!(a.len(), 500);
        assert_eq!(a, b);
        // Our writer reproduces the official bytes exactly.
        let official = fs::read(&py).expect("read");
        assert_eq!(encoded(&a, "testing batch 1 of 1"), official);
    }

    #[test]
    fn meta_files_match_official() {
        let (Some(py), Some(txt)) = (
            mini("cifar-10-batches-py/batches.meta"),
            mini("cifar-10-batches-bin/batches.meta.txt"),
        ) else {
            return;
        };
        let dir = scratch_dir("meta");
        write_meta_pickle(&dir.join("m"), 1000).expect("meta");
        write_meta_txt(&dir.join("t")).expect("txt");
        assert_eq!(fs::read(dir.join("m")).ok(), fs::read(py).ok());
        assert_eq!(fs::read(dir.join("t")).ok(), fs::read(txt).ok());
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn load_real_splits() {
        let Some(dir) = mini("") else { return };
        let spec = DataSpec::Folder(dir.clone());
        let train = load_split(&spec, Split::Train).expect("train");
        assert_eq!(train.len(), 5);
        assert!(train.iter().all(|f| f.len() == 1000));
        let py = DataSpec::Folder(dir.join("cifar-10-batches-py"));
        assert_eq!(load_split(&py, Split::Test).expect("py test")[0].len(), 500);
    }

    #[test]
    fn pickle_round_trip() {
        let dir = scratch_dir("pickle");
        for n in [0, 1, 2, 1000, 1001, 2005] {
            let images = sample(n);
            let path = dir.join(format!("b{n}"));
            write_pickle(&path, &images, "training batch 1 of 5").expect("write");
            assert_eq!(read_pickle(&path).expect("read"), images, "n = {n}");
        }
        let long_label = "x".repeat(300);
        let bytes = encoded(&sample(3), &long_label);
        assert_eq!(
            parse_pickle(&bytes, Path::new("m")).expect("parse"),
            sample(3)
        );
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn pickle_labels_above_a_byte_round_trip() {
        // BININT2 for labels of 256 and more; `finish_with` checks them against the classes.
        let mut images = sample(3);
        images.labels = vec![255, 256, 999];
        let bytes = encoded(&images, "b");
        let path = Path::new("m");
        let mut v = Vm::new(&bytes, path);
        let top = v.run().expect("run");
        assert_eq!(v.finish_with(top, b"labels", 1000).expect("1000"), images);
        let mut v = Vm::new(&bytes, path);
        let top = v.run().expect("run");
        let e = v
            .finish_with(top, b"labels", 999)
            .expect_err("999")
            .to_string();
        assert!(e.contains("labels[2] is 999"), "{e}");
    }

    #[test]
    fn numpy_underscore_core_variant() {
        let images = sample(4);
        let bytes = encoded(&images, "b");
        let from = b"cnumpy.core.multiarray\n";
        let to = b"cnumpy._core.multiarray\n";
        let at = bytes
            .windows(from.len())
            .position(|w| w == from)
            .expect("global present");
        let mut patched = bytes[..at].to_vec();
        patched.extend_from_slice(to);
        patched.extend_from_slice(&bytes[at + from.len()..]);
        assert_eq!(
            parse_pickle(&patched, Path::new("m")).expect("parse"),
            images
        );
    }

    /// What Python 3 + numpy writes under protocol 2: str keys, bytes as
    /// `_codecs.encode(<latin-1 str>, 'latin1')`, MEMOIZE-free BINPUTs.
    fn python3_style(images: &Images) -> Vec<u8> {
        fn unicode(out: &mut Vec<u8>, s: &str) {
            out.push(b'X');
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        fn latin1(out: &mut Vec<u8>, bytes: &[u8]) {
            out.extend_from_slice(b"c_codecs\nencode\nq\x20");
            let text: String = bytes.iter().map(|&b| char::from(b)).collect();
            unicode(out, &text);
            unicode(out, "latin1");
            out.extend_from_slice(b"\x86R");
        }
        let mut out = b"\x80\x02}q\x00(".to_vec();
        unicode(&mut out, "labels");
        out.extend_from_slice(b"]q\x01(");
        for &l in &images.labels {
            out.extend_from_slice(&[b'K', l as u8]);
        }
        out.push(b'e');
        unicode(&mut out, "data");
        out.extend_from_slice(b"cnumpy._core.multiarray\n_reconstruct\nq\x02cnumpy\nndarray\n");
        out.extend_from_slice(b"K\x00\x85");
        latin1(&mut out, b"b");
        out.extend_from_slice(b"\x87Rq\x03(K\x01");
        out.extend_from_slice(b"K");
        out.push(images.len() as u8);
        out.extend_from_slice(b"M\x00\x0c\x86cnumpy\ndtype\nq\x04");
        unicode(&mut out, "u1");
        out.extend_from_slice(b"\x89\x88\x87Rq\x05(K\x03");
        unicode(&mut out, "|");
        out.extend_from_slice(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89");
        latin1(&mut out, &images.pixels);
        // BUILD, then a memo GET of the array and a POP, to exercise them.
        out.extend_from_slice(b"tbh\x03\x30");
        out.extend_from_slice(b"u.");
        out
    }

    #[test]
    fn codecs_encode_variant() {
        let images = sample(5);
        let bytes = python3_style(&images);
        let got = parse_pickle(&bytes, Path::new("p3")).expect("parse");
        assert_eq!(got, images);
    }

    /// Bytes written by Python 3.11 + numpy 2.4, `pickle.dumps(d, protocol=2)` for
    /// `{'batch_label': 'x', 'labels': [3], 'data': arange(3072) % 256 as uint8 (1, 3072)}`:
    /// `numpy._core`, `_codecs.encode(<latin-1 str>, 'latin1')` reached through BINGET.
    #[test]
    fn real_numpy_protocol2_pickles() {
        let prefix: &[u8] = b"\x80\x02}q\x00(X\x0b\x00\x00\x00batch_labelq\x01X\x01\x00\x00\x00xq\x02X\x06\x00\x00\x00labelsq\x03]q\x04K\x03aX\x04\x00\x00\x00dataq\x05cnumpy._core.multiarray\x0a_reconstruct\x0aq\x06cnumpy\x0andarray\x0aq\x07K\x00\x85q\x08c_codecs\x0aencode\x0aq\x09X\x01\x00\x00\x00bq\x0aX\x06\x00\x00\x00latin1q\x0b\x86q\x0cRq\x0d\x87q\x0eRq\x0f(K\x01K\x01M\x00\x0c\x86q\x10cnumpy\x0adtype\x0aq\x11X\x02\x00\x00\x00u1q\x12\x89\x88\x87q\x13Rq\x14(K\x03X\x01\x00\x00\x00|q\x15NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tq\x16b\x89h\x09X\x00\x12\x00\x00";
        let suffix: &[u8] = b"q\x17h\x0b\x86q\x18Rq\x19tq\x1abu.";
        let pixels: Vec<u8> = (0..IMAGE_BYTES).map(|i| i as u8).collect();
        let text: String = pixels.iter().map(|&b| char::from(b)).collect();
        let mut bytes = prefix.to_vec();
        bytes.extend_from_slice(text.as_bytes());
        bytes.extend_from_slice(suffix);
        let got = parse_pickle(&bytes, Path::new("np2")).expect("parse");
        assert_eq!(got.labels, vec![3]);
        assert_eq!(got.pixels, pixels);

        // No images: the empty data is `__builtin__.bytes()`.
        let empty: &[u8] = b"\x80\x02}q\x00(X\x06\x00\x00\x00labelsq\x01]q\x02X\x04\x00\x00\x00dataq\x03cnumpy._core.multiarray\x0a_reconstruct\x0aq\x04cnumpy\x0andarray\x0aq\x05K\x00\x85q\x06c_codecs\x0aencode\x0aq\x07X\x01\x00\x00\x00bq\x08X\x06\x00\x00\x00latin1q\x09\x86q\x0aRq\x0b\x87q\x0cRq\x0d(K\x01K\x00M\x00\x0c\x86q\x0ecnumpy\x0adtype\x0aq\x0fX\x02\x00\x00\x00u1q\x10\x89\x88\x87q\x11Rq\x12(K\x03X\x01\x00\x00\x00|q\x13NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tq\x14b\x89c__builtin__\x0abytes\x0aq\x15)Rq\x16tq\x17bu.";
        assert!(parse_pickle(empty, Path::new("np2"))
            .expect("empty")
            .is_empty());
        no_panic_fuzz(empty, 5_000, 17);
    }

    #[test]
    fn protocol0_strings() {
        let got = pickle::unquote_string(br"'a\x00\n\\\'b\101'").expect("unquote");
        assert_eq!(got, b"a\x00\n\\'bA");
        assert_eq!(
            pickle::raw_unicode_escape(b"a\\u00ffb\xe9").expect("decode"),
            "a\u{ff}b\u{e9}"
        );
    }

    #[test]
    fn pickle_errors_name_offsets() {
        let bytes = encoded(&sample(2), "b");
        // Unknown opcode right after PROTO.
        let mut bad = bytes.clone();
        bad[2] = 0xff;
        let err = parse_pickle(&bad, Path::new("x")).expect_err("unknown");
        assert_eq!(format_offset(&err), 2);
        assert!(err.to_string().contains("0xff"), "{err}");
        // Truncated in the data string.
        let err = parse_pickle(&bytes[..bytes.len() - 100], Path::new("x")).expect_err("short");
        assert!(err.to_string().contains("truncated"), "{err}");
        // A label out of range.
        let at = bytes
            .windows(4)
            .position(|w| w == b"(K\x00K")
            .expect("labels");
        let mut bad = bytes.clone();
        bad[at + 2] = 12;
        let err = parse_pickle(&bad, Path::new("x")).expect_err("label");
        assert!(err.to_string().contains("labels[0]"), "{err}");
        // Wrong dtype.
        let at = bytes
            .windows(4)
            .position(|w| w == b"U\x02u1")
            .expect("dtype");
        let mut bad = bytes.clone();
        bad[at + 2] = b'f';
        let err = parse_pickle(&bad, Path::new("x")).expect_err("dtype");
        assert!(err.to_string().contains("uint8"), "{err}");
    }

    /// A tiny xorshift for the fuzz test (no dependency on `synth`).
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    fn no_panic_fuzz(bytes: &[u8], trials: usize, seed: u64) {
        let path = Path::new("fuzz");
        // Every truncation of the head, and a spread of longer ones.
        let head = bytes.len().min(1400);
        for n in (0..head).chain((head..bytes.len()).step_by(997)) {
            assert!(
                parse_pickle(&bytes[..n], path).is_err(),
                "prefix {n} parsed"
            );
        }
        let mut state = seed | 1;
        let mut copy = bytes.to_vec();
        for _ in 0..trials {
            let flips = 1 + (xorshift(&mut state) % 4) as usize;
            let mut touched = Vec::new();
            for _ in 0..flips {
                let r = xorshift(&mut state) as usize;
                // Mostly in the opcode-dense head, sometimes anywhere.
                let at = if r.is_multiple_of(4) {
                    r / 4 % bytes.len()
                } else {
                    r / 4 % head
                };
                copy[at] = xorshift(&mut state) as u8;
                touched.push(at);
            }
            let _ = parse_pickle(&copy, path);
            for at in touched {
                copy[at] = bytes[at];
            }
        }
    }

    #[test]
    fn pickle_fuzz_no_panic() {
        no_panic_fuzz(&encoded(&sample(3), "batch"), 20_000, 7);
        no_panic_fuzz(&python3_style(&sample(2)), 20_000, 11);
        if let Some(py) = mini("cifar-10-batches-py/test_batch") {
            let bytes = fs::read(py).expect("read");
            no_panic_fuzz(&bytes, 3_000, 13);
        }
    }

    #[test]
    fn locate_finds_layouts() {
        let dir = scratch_dir("locate");
        assert!(locate(&dir).is_err());
        let err = locate(&dir).expect_err("empty").to_string();
        assert!(err.contains("cifar-10-batches-bin"), "{err}");
        assert!(locate(&dir.join("missing")).is_err());

        let py = dir.join("cifar-10-batches-py");
        fs::create_dir_all(&py).expect("mkdir");
        fs::write(py.join("test_batch"), b"").expect("touch");
        assert_eq!(locate(&dir).expect("py"), (py.clone(), Layout::Py));
        assert_eq!(locate(&py).expect("py"), (py.clone(), Layout::Py));

        let bin = dir.join("cifar-10-batches-bin");
        fs::create_dir_all(&bin).expect("mkdir");
        fs::write(bin.join("data_batch_1.bin"), b"").expect("touch");
        assert_eq!(locate(&dir).expect("bin"), (bin.clone(), Layout::Bin));
        assert_eq!(locate(&bin).expect("bin"), (bin.clone(), Layout::Bin));
        assert_eq!(locate(&py).expect("py"), (py.clone(), Layout::Py));

        let err = load_split(&DataSpec::Folder(dir.clone()), Split::Test).expect_err("missing");
        assert!(err.to_string().contains("test_batch.bin"), "{err}");

        assert_eq!(
            split_files(&bin, Layout::Bin, Split::Train)[4],
            bin.join("data_batch_5.bin")
        );
        assert_eq!(
            split_files(&py, Layout::Py, Split::Test),
            vec![py.join("test_batch")]
        );
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn data_spec_parse() {
        let d = SynthSpec::default();
        assert_eq!(
            DataSpec::parse("synthetic").expect("s"),
            DataSpec::Synthetic(d.clone())
        );
        assert_eq!(
            DataSpec::parse("synthetic:100").expect("s"),
            DataSpec::Synthetic(SynthSpec {
                train: 100,
                ..d.clone()
            })
        );
        let full = DataSpec::parse("synthetic:100:20:7").expect("s");
        assert_eq!(
            full,
            DataSpec::Synthetic(SynthSpec {
                train: 100,
                test: 20,
                seed: 7
            })
        );
        assert_eq!(full.to_string(), "synthetic:100:20:7");
        assert_eq!(DataSpec::parse(&full.to_string()).expect("again"), full);
        assert!(DataSpec::parse("synthetic:x").is_err());
        assert!(DataSpec::parse("synthetic:1:2:3:4").is_err());
        assert!(DataSpec::parse("").is_err());
        assert_eq!(
            DataSpec::parse("data/cifar").expect("f"),
            DataSpec::Folder(PathBuf::from("data/cifar"))
        );
        assert_eq!("test".parse::<Split>().expect("split"), Split::Test);
        let err = "valid".parse::<Split>().expect_err("bad").to_string();
        assert!(err.contains("train, test"), "{err}");
        assert_eq!("py".parse::<Layout>().expect("layout"), Layout::Py);
        assert_eq!(Layout::Bin.to_string(), "bin");
        assert!("csv".parse::<Layout>().is_err());
    }

    #[test]
    fn images_helpers() {
        let all = sample(5);
        let mut part = Images::with_capacity(2);
        part.extend_range(&all, 1..3);
        assert_eq!(part.len(), 2);
        assert_eq!(part.image(1), all.image(2));
        assert_eq!(part.labels, vec![1, 2]);
        assert!(Images::default().is_empty());
        let bad = Images {
            labels: vec![1],
            pixels: vec![0; 5],
            side: SIDE,
        };
        assert!(bad.check().is_err());
    }
}
