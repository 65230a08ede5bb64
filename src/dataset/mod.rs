//! CIFAR-10 datasets on disk.
//!
//! The dataset ships in two layouts: `cifar-10-batches-bin/` (records of one label byte and
//! 3,072 pixel bytes) and `cifar-10-batches-py/` (Python-2 pickles of a dict holding a numpy
//! array). This module finds a dataset on disk, reads and writes both layouts with std only
//! (the pickle side is a small, strict pickle VM that understands exactly what numpy writes
//! for such a dict), and hands out the images of a split as plain byte vectors. Every error
//! from a file names the file and the byte offset where it went wrong; nothing here panics on
//! file input.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{self, BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::synth::{self, SynthSpec};

pub mod folder;

/// Bytes of one image: 1,024 red, 1,024 green, then 1,024 blue, each plane row-major 32×32.
pub const IMAGE_BYTES: usize = 3072;
/// Width and height of an image in pixels.
pub const SIDE: usize = 32;
/// Bytes of one colour plane (`SIDE * SIDE`).
pub const PLANE_BYTES: usize = SIDE * SIDE;
/// Number of classes.
pub const CLASSES: usize = 10;
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
/// `pixels[i * IMAGE_BYTES..(i + 1) * IMAGE_BYTES]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Images {
    /// One label (0..K) per image.
    pub labels: Vec<u16>,
    /// `IMAGE_BYTES` pixel bytes per image, in CIFAR layout.
    pub pixels: Vec<u8>,
}

impl Images {
    /// An empty set with room for `n` images.
    pub fn with_capacity(n: usize) -> Self {
        Images {
            labels: Vec::with_capacity(n),
            pixels: Vec::with_capacity(n.saturating_mul(IMAGE_BYTES)),
        }
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
        &self.pixels[i * IMAGE_BYTES..(i + 1) * IMAGE_BYTES]
    }

    /// Append one image.
    ///
    /// # Panics
    /// If `pixels.len() != IMAGE_BYTES`.
    pub fn push(&mut self, label: u16, pixels: &[u8]) {
        assert_eq!(pixels.len(), IMAGE_BYTES, "an image is {IMAGE_BYTES} bytes");
        self.labels.push(label);
        self.pixels.extend_from_slice(pixels);
    }

    /// Append images `range` of `other`.
    ///
    /// # Panics
    /// If `range` is not within `0..other.len()`.
    pub fn extend_range(&mut self, other: &Images, range: Range<usize>) {
        self.labels.extend_from_slice(&other.labels[range.clone()]);
        self.pixels
            .extend_from_slice(&other.pixels[range.start * IMAGE_BYTES..range.end * IMAGE_BYTES]);
    }

    /// The images as `(label, pixels)` pairs.
    pub fn iter(&self) -> impl Iterator<Item = (u16, &[u8])> + '_ {
        self.labels
            .iter()
            .copied()
            .zip(self.pixels.chunks_exact(IMAGE_BYTES))
    }

    /// Check that the pixel bytes match the labels and every label is a class.
    pub fn check(&self) -> Result<()> {
        if Some(self.pixels.len()) != self.labels.len().checked_mul(IMAGE_BYTES) {
            return Err(Error::usage(format!(
                "images: {} labels but {} pixel bytes (expected {} per image)",
                self.labels.len(),
                self.pixels.len(),
                IMAGE_BYTES
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

/// Where a dataset is: a folder or the built-in synthetic set.
#[derive(Clone, Debug, PartialEq)]
pub enum DataSpec {
    /// A folder holding (or being the parent of) `cifar-10-batches-bin/` or `-py/`.
    Folder(PathBuf),
    /// Images generated on the fly by [`crate::synth`].
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
    })
}

/// Parse the bytes of a binary batch file (`path` only names it in errors).
pub fn parse_bin(bytes: &[u8], path: &Path) -> Result<Images> {
    let labels = bin_labels(bytes, path)?;
    let mut pixels = Vec::with_capacity(labels.len() * IMAGE_BYTES);
    for record in bytes.chunks_exact(RECORD_BYTES) {
        pixels.extend_from_slice(record.get(1..).unwrap_or(&[]));
    }
    Ok(Images { labels, pixels })
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
                let loaded = folder::load(&root, split, &classes)?;
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

// ---------------------------------------------------------------------------------------
// Pickle writer.

/// The 4-byte length of a BINSTRING (Python 2 reads it as a signed int).
fn binstring_len(len: usize) -> io::Result<[u8; 4]> {
    i32::try_from(len).map(i32::to_le_bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a string of {len} bytes is too long for a protocol-2 pickle (2 GiB)"),
        )
    })
}

/// A pickled string: SHORT_BINSTRING up to 255 bytes, BINSTRING beyond.
fn put_str(out: &mut Vec<u8>, s: &[u8]) -> io::Result<()> {
    if let Ok(n) = u8::try_from(s.len()) {
        out.push(b'U');
        out.push(n);
    } else {
        out.push(b'T');
        out.extend_from_slice(&binstring_len(s.len())?);
    }
    out.extend_from_slice(s);
    Ok(())
}

/// A pickled non-negative int with the smallest of BININT1, BININT2, BININT.
fn put_int(out: &mut Vec<u8>, n: usize) -> io::Result<()> {
    if let Ok(b) = u8::try_from(n) {
        out.extend_from_slice(&[b'K', b]);
    } else if let Ok(h) = u16::try_from(n) {
        out.push(b'M');
        out.extend_from_slice(&h.to_le_bytes());
    } else {
        let i = i32::try_from(n)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "int too large for BININT"))?;
        out.push(b'J');
        out.extend_from_slice(&i.to_le_bytes());
    }
    Ok(())
}

/// The whole batch pickle, streamed to `w` (the pixel data is not copied).
fn encode_pickle<W: Write>(w: &mut W, images: &Images, batch_label: &str) -> io::Result<()> {
    let mut head = Vec::with_capacity(4096);
    head.extend_from_slice(b"\x80\x02}q\x01(");
    put_str(&mut head, b"batch_label")?;
    head.extend_from_slice(b"q\x02");
    put_str(&mut head, batch_label.as_bytes())?;
    head.extend_from_slice(b"q\x03");
    put_str(&mut head, b"labels")?;
    head.extend_from_slice(b"q\x04]q\x05");
    w.write_all(&head)?;
    // Like cPickle: APPENDS in batches of 1,000; a batch of one is a plain APPEND.
    for chunk in images.labels.chunks(1000) {
        head.clear();
        let int = |head: &mut Vec<u8>, label: u16| match u8::try_from(label) {
            // BININT1 for a byte, BININT2 above it.
            Ok(b) => head.extend_from_slice(&[b'K', b]),
            Err(_) => {
                head.push(b'M');
                head.extend_from_slice(&label.to_le_bytes());
            }
        };
        if let [label] = chunk {
            int(&mut head, *label);
            head.push(b'a');
        } else {
            head.push(b'(');
            for &label in chunk {
                int(&mut head, label);
            }
            head.push(b'e');
        }
        w.write_all(&head)?;
    }
    head.clear();
    put_str(&mut head, b"data")?;
    head.extend_from_slice(
        b"q\x06cnumpy.core.multiarray\n_reconstruct\nq\x07cnumpy\nndarray\nq\x08",
    );
    head.extend_from_slice(b"K\x00\x85U\x01b\x87Rq\x09(K\x01");
    put_int(&mut head, images.len())?;
    put_int(&mut head, IMAGE_BYTES)?;
    head.extend_from_slice(b"\x86cnumpy\ndtype\nq\x0aU\x02u1K\x00K\x01\x87Rq\x0b");
    head.extend_from_slice(b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89");
    head.push(b'T');
    head.extend_from_slice(&binstring_len(images.pixels.len())?);
    w.write_all(&head)?;
    w.write_all(&images.pixels)?;
    w.write_all(b"tbq\x0cu.")
}

// ---------------------------------------------------------------------------------------
// Pickle reader: a small VM with a value stack, a mark stack and a memo.
//
// Containers live in an arena (`Vm::nodes`) and values refer to them by index, so shared and
// even cyclic references (via the memo) are harmless and nothing is dropped recursively.
// Strings and bytes are borrowed from the input; only text that needs decoding is owned.

/// A value on the stack or in the memo.
#[derive(Clone, Copy, Debug)]
enum Value<'a> {
    None,
    Bool(bool),
    Int(i64),
    /// An int that does not fit in 64 bits (never valid where this reader needs an int).
    BigInt,
    Float(f64),
    /// A Python-2 `str` or Python-3 `bytes`, borrowed from the input.
    Bytes(&'a [u8]),
    /// A unicode string, borrowed from the input.
    Text(&'a str),
    /// Anything else: an index into the arena.
    Node(usize),
}

/// An arena object.
#[derive(Debug)]
enum Node<'a> {
    Tuple(Vec<Value<'a>>),
    List(Vec<Value<'a>>),
    Dict(Vec<(Value<'a>, Value<'a>)>),
    Set(Vec<Value<'a>>),
    Bytes(Vec<u8>),
    Text(String),
    Global(Global),
    Dtype(Dtype),
    Array(Array<'a>),
}

impl Node<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Node::Tuple(_) => "tuple",
            Node::List(_) => "list",
            Node::Dict(_) => "dict",
            Node::Set(_) => "set",
            Node::Bytes(_) => "bytes",
            Node::Text(_) => "str",
            Node::Global(_) => "global",
            Node::Dtype(_) => "numpy dtype",
            Node::Array(_) => "numpy array",
        }
    }
}

/// The globals this reader knows how to call.
#[derive(Clone, Debug)]
enum Global {
    /// `numpy.core.multiarray._reconstruct` (or `numpy._core…`).
    Reconstruct,
    /// `numpy.core.numeric._frombuffer` (protocol 5 numpy pickles).
    FromBuffer,
    /// `numpy.ndarray`.
    NdArray,
    /// `numpy.dtype`.
    Dtype,
    /// `_codecs.encode`.
    CodecsEncode,
    /// `__builtin__.bytes` / `builtins.bytes` / `bytearray`.
    Bytes,
    /// Anything else, by its dotted name (an error if called).
    Other(String),
}

impl Global {
    fn resolve(module: &str, name: &str) -> Global {
        let numpy = module == "numpy" || module.starts_with("numpy.");
        match (module, name) {
            (_, "_reconstruct") if numpy => Global::Reconstruct,
            (_, "_frombuffer") if numpy => Global::FromBuffer,
            (_, "ndarray") if numpy => Global::NdArray,
            (_, "dtype") if numpy => Global::Dtype,
            ("_codecs", "encode") => Global::CodecsEncode,
            ("__builtin__" | "builtins", "bytes" | "bytearray") => Global::Bytes,
            _ => Global::Other(format!("{module}.{name}")),
        }
    }
}

/// A numpy dtype: the type string given to `numpy.dtype` and the byte order from its state.
#[derive(Clone, Debug)]
struct Dtype {
    name: String,
    order: u8,
}

impl Dtype {
    /// Kind letter and item size of a plain numeric dtype (`'u1'` → `(b'u', 1)`).
    fn simple(&self) -> Option<(u8, usize)> {
        let name = self.name.trim_start_matches(['<', '>', '|', '=']);
        let named = match name {
            "uint8" | "B" => Some((b'u', 1)),
            "int8" | "b" => Some((b'i', 1)),
            "uint16" => Some((b'u', 2)),
            "int16" => Some((b'i', 2)),
            "uint32" => Some((b'u', 4)),
            "int32" => Some((b'i', 4)),
            "uint64" => Some((b'u', 8)),
            "int64" => Some((b'i', 8)),
            _ => None,
        };
        if named.is_some() {
            return named;
        }
        let (&kind, size) = name.as_bytes().split_first()?;
        if !b"biufc".contains(&kind) {
            return None;
        }
        let size = std::str::from_utf8(size).ok()?.parse::<usize>().ok()?;
        Some((kind, size))
    }

    fn big_endian(&self) -> bool {
        self.order == b'>' || self.name.starts_with('>')
    }

    fn is_uint8(&self) -> bool {
        self.simple() == Some((b'u', 1))
    }
}

/// A numpy array: empty after `_reconstruct`, filled by BUILD.
#[derive(Debug)]
enum Array<'a> {
    Empty,
    Filled(NdArray<'a>),
}

/// A filled numpy array. Its byte length matches its shape and item size.
#[derive(Clone, Debug)]
struct NdArray<'a> {
    dims: Vec<i64>,
    dtype: Dtype,
    fortran: bool,
    /// The raw bytes: `Value::Bytes` or a `Node::Bytes`.
    data: Value<'a>,
}

/// The pickle opcodes' names, for messages.
fn op_name(op: u8) -> Option<&'static str> {
    Some(match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => return None,
    })
}

/// The pickle machine.
struct Vm<'a> {
    input: &'a [u8],
    path: &'a Path,
    /// Next byte to read.
    pos: usize,
    /// Offset of the opcode being executed (for errors).
    op_at: usize,
    op: u8,
    stack: Vec<Value<'a>>,
    /// Stack heights at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u64, Value<'a>>,
    nodes: Vec<Node<'a>>,
    /// Offset of the opcode that created each node.
    node_at: Vec<usize>,
}

impl<'a> Vm<'a> {
    fn new(input: &'a [u8], path: &'a Path) -> Self {
        Vm {
            input,
            path,
            pos: 0,
            op_at: 0,
            op: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            nodes: Vec::new(),
            node_at: Vec::new(),
        }
    }

    fn err_at(&self, at: usize, reason: impl Into<String>) -> Error {
        Error::format(self.path, at as u64, reason)
    }

    /// An error at the current opcode, prefixed with its name.
    fn err(&self, reason: impl fmt::Display) -> Error {
        let name = op_name(self.op).unwrap_or("?");
        self.err_at(self.op_at, format!("pickle {name}: {reason}"))
    }

    fn new_node(&mut self, node: Node<'a>) -> Value<'a> {
        self.nodes.push(node);
        self.node_at.push(self.op_at);
        Value::Node(self.nodes.len() - 1)
    }

    // --- reading the input ---

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let input = self.input;
        let end = self.pos.checked_add(n).filter(|&e| e <= input.len());
        match end.and_then(|e| input.get(self.pos..e)) {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => Err(self.err(format!(
                "truncated: needs {n} bytes of argument, the file has {} left",
                input.len().saturating_sub(self.pos)
            ))),
        }
    }

    fn take_array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn read_u8(&mut self) -> Result<u8> {
        Ok(self.take_array::<1>()?[0])
    }

    fn read_u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take_array()?))
    }

    fn read_u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take_array()?))
    }

    fn read_i32(&mut self) -> Result<i32> {
        Ok(i32::from_le_bytes(self.take_array()?))
    }

    fn read_u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take_array()?))
    }

    /// A length from a u64, as usize.
    fn len64(&mut self) -> Result<usize> {
        let n = self.read_u64()?;
        usize::try_from(n).map_err(|_| self.err(format!("length {n} too large")))
    }

    /// A length from a signed 4-byte int (Python 2 BINSTRING, LONG4).
    fn len_i32(&mut self) -> Result<usize> {
        let n = self.read_i32()?;
        usize::try_from(n).map_err(|_| self.err(format!("negative length {n}")))
    }

    /// A newline-terminated line, without the newline.
    fn line(&mut self) -> Result<&'a [u8]> {
        let input = self.input;
        let rest = input.get(self.pos..).unwrap_or(&[]);
        match rest.iter().position(|&b| b == b'\n') {
            Some(n) => {
                let line = rest.get(..n).unwrap_or(&[]);
                self.pos += n + 1;
                Ok(line)
            }
            None => Err(self.err("truncated: argument line has no newline")),
        }
    }

    fn line_str(&mut self) -> Result<&'a str> {
        let line = self.line()?;
        std::str::from_utf8(line).map_err(|_| self.err("argument line is not UTF-8"))
    }

    fn text(&self, bytes: &'a [u8]) -> Result<&'a str> {
        std::str::from_utf8(bytes).map_err(|e| self.err(format!("string is not valid UTF-8: {e}")))
    }

    // --- the stacks ---

    /// Height of the stack at the innermost MARK (values below it are out of reach).
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn push(&mut self, v: Value<'a>) {
        self.stack.push(v);
    }

    fn pop(&mut self) -> Result<Value<'a>> {
        if self.stack.len() <= self.floor() {
            return Err(self.err("stack underflow"));
        }
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }

    fn top(&self) -> Result<Value<'a>> {
        if self.stack.len() <= self.floor() {
            return Err(self.err("stack underflow"));
        }
        self.stack
            .last()
            .copied()
            .ok_or_else(|| self.err("stack underflow"))
    }

    /// Pop everything above the innermost MARK, and the MARK.
    fn pop_mark(&mut self) -> Result<Vec<Value<'a>>> {
        let Some(m) = self.marks.pop() else {
            return Err(self.err("no MARK on the stack"));
        };
        if m > self.stack.len() {
            return Err(self.err("MARK above the stack top"));
        }
        Ok(self.stack.split_off(m))
    }

    fn pop_n(&mut self, n: usize) -> Result<Vec<Value<'a>>> {
        if self.stack.len() < self.floor() + n {
            return Err(self.err("stack underflow"));
        }
        Ok(self.stack.split_off(self.stack.len() - n))
    }

    fn memo_put(&mut self, key: u64) -> Result<()> {
        let v = self.top()?;
        self.memo.insert(key, v);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Result<()> {
        match self.memo.get(&key) {
            Some(&v) => {
                self.push(v);
                Ok(())
            }
            None => Err(self.err(format!("memo key {key} was never stored"))),
        }
    }

    // --- looking at values ---

    fn node(&self, v: Value<'a>) -> Option<&Node<'a>> {
        match v {
            Value::Node(i) => self.nodes.get(i),
            _ => None,
        }
    }

    fn describe(&self, v: Value<'a>) -> String {
        match v {
            Value::None => "None".into(),
            Value::Bool(b) => format!("bool {b}"),
            Value::Int(i) => format!("int {i}"),
            Value::BigInt => "a big int".into(),
            Value::Float(f) => format!("float {f}"),
            Value::Bytes(b) => format!("bytes of length {}", b.len()),
            Value::Text(t) => format!("str of length {}", t.len()),
            Value::Node(_) => match self.node(v) {
                Some(Node::Global(Global::Other(name))) => format!("global {name}"),
                Some(n) => n.kind().into(),
                None => "?".into(),
            },
        }
    }

    /// The bytes of a str/bytes value, for keys and names.
    fn bytes_of(&self, v: Value<'a>) -> Option<&[u8]> {
        match v {
            Value::Bytes(b) => Some(b),
            Value::Text(t) => Some(t.as_bytes()),
            _ => match self.node(v) {
                Some(Node::Bytes(b)) => Some(b),
                Some(Node::Text(t)) => Some(t.as_bytes()),
                _ => None,
            },
        }
    }

    fn name_of(&self, v: Value<'a>, what: &str) -> Result<String> {
        self.bytes_of(v)
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .ok_or_else(|| self.err(format!("{what} is {}, not a string", self.describe(v))))
    }

    /// The text of a unicode value (only `str`, not bytes).
    fn text_of(&self, v: Value<'a>) -> Option<&str> {
        match v {
            Value::Text(t) => Some(t),
            _ => match self.node(v) {
                Some(Node::Text(t)) => Some(t),
                _ => None,
            },
        }
    }

    /// The items of a small tuple (argument lists, states, shapes). Longer tuples are an
    /// error, so that a hostile pickle cannot make every REDUCE copy a huge tuple.
    fn tuple_items(&self, v: Value<'a>, what: &str) -> Result<Vec<Value<'a>>> {
        const MAX_ITEMS: usize = 32;
        match self.node(v) {
            Some(Node::Tuple(items)) if items.len() <= MAX_ITEMS => Ok(items.clone()),
            Some(Node::Tuple(items)) => Err(self.err(format!(
                "{what} is a tuple of {} items, expected at most {MAX_ITEMS}",
                items.len()
            ))),
            _ => Err(self.err(format!("{what} is {}, not a tuple", self.describe(v)))),
        }
    }

    fn int_of(&self, v: Value<'a>, what: &str) -> Result<i64> {
        match v {
            Value::Int(i) => Ok(i),
            Value::Bool(b) => Ok(i64::from(b)),
            _ => Err(self.err(format!("{what} is {}, not an int", self.describe(v)))),
        }
    }

    // --- the machine ---

    fn run(&mut self) -> Result<Value<'a>> {
        loop {
            self.op_at = self.pos;
            let Some(&op) = self.input.get(self.pos) else {
                return Err(self.err_at(
                    self.pos,
                    "pickle truncated: the file ends before the STOP opcode",
                ));
            };
            self.op = op;
            self.pos += 1;
            if op == b'.' {
                return self.pop();
            }
            self.step(op)?;
        }
    }

    fn step(&mut self, op: u8) -> Result<()> {
        match op {
            0x80 => {
                let proto = self.read_u8()?;
                if proto > 5 {
                    return Err(self.err(format!("unsupported protocol {proto}")));
                }
            }
            0x95 => {
                // FRAME: only a length prefix; the framed opcodes follow inline.
                self.read_u64()?;
            }
            b'(' => self.marks.push(self.stack.len()),
            b'0' => {
                if self.stack.len() > self.floor() {
                    self.stack.pop();
                } else {
                    self.pop_mark()?;
                }
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let v = self.top()?;
                self.push(v);
            }
            b'N' => self.push(Value::None),
            0x88 => self.push(Value::Bool(true)),
            0x89 => self.push(Value::Bool(false)),
            b'I' => {
                let line = self.line_str()?;
                let v = match line {
                    "00" => Value::Bool(false),
                    "01" => Value::Bool(true),
                    _ => self.parse_int(line)?,
                };
                self.push(v);
            }
            b'L' => {
                let line = self.line_str()?;
                let v = self.parse_int(line.strip_suffix('L').unwrap_or(line))?;
                self.push(v);
            }
            b'J' => {
                let i = self.read_i32()?;
                self.push(Value::Int(i64::from(i)));
            }
            b'K' => {
                let i = self.read_u8()?;
                self.push(Value::Int(i64::from(i)));
            }
            b'M' => {
                let i = self.read_u16()?;
                self.push(Value::Int(i64::from(i)));
            }
            0x8a => {
                let n = usize::from(self.read_u8()?);
                let bytes = self.take(n)?;
                self.push(decode_long(bytes));
            }
            0x8b => {
                let n = self.len_i32()?;
                let bytes = self.take(n)?;
                self.push(decode_long(bytes));
            }
            b'F' => {
                let line = self.line_str()?;
                let f = line
                    .trim()
                    .parse::<f64>()
                    .map_err(|_| self.err(format!("bad float {line:?}")))?;
                self.push(Value::Float(f));
            }
            b'G' => {
                let f = f64::from_be_bytes(self.take_array()?);
                self.push(Value::Float(f));
            }
            b'S' => {
                let line = self.line()?;
                let bytes = unquote_string(line).map_err(|e| self.err(e))?;
                let v = self.new_node(Node::Bytes(bytes));
                self.push(v);
            }
            b'T' => {
                let n = self.len_i32()?;
                let b = self.take(n)?;
                self.push(Value::Bytes(b));
            }
            b'U' | b'C' => {
                let n = usize::from(self.read_u8()?);
                let b = self.take(n)?;
                self.push(Value::Bytes(b));
            }
            b'B' => {
                let n = self.read_u32()? as usize;
                let b = self.take(n)?;
                self.push(Value::Bytes(b));
            }
            0x8e | 0x96 => {
                let n = self.len64()?;
                let b = self.take(n)?;
                self.push(Value::Bytes(b));
            }
            b'V' => {
                let line = self.line()?;
                let text = raw_unicode_escape(line).map_err(|e| self.err(e))?;
                let v = self.new_node(Node::Text(text));
                self.push(v);
            }
            b'X' => {
                let n = self.read_u32()? as usize;
                let b = self.take(n)?;
                let t = self.text(b)?;
                self.push(Value::Text(t));
            }
            0x8c => {
                let n = usize::from(self.read_u8()?);
                let b = self.take(n)?;
                let t = self.text(b)?;
                self.push(Value::Text(t));
            }
            0x8d => {
                let n = self.len64()?;
                let b = self.take(n)?;
                let t = self.text(b)?;
                self.push(Value::Text(t));
            }
            b'}' => {
                let v = self.new_node(Node::Dict(Vec::new()));
                self.push(v);
            }
            b']' => {
                let v = self.new_node(Node::List(Vec::new()));
                self.push(v);
            }
            b')' => {
                let v = self.new_node(Node::Tuple(Vec::new()));
                self.push(v);
            }
            0x8f => {
                let v = self.new_node(Node::Set(Vec::new()));
                self.push(v);
            }
            b'd' => {
                let items = self.pop_mark()?;
                let pairs = self.pairs(items)?;
                let v = self.new_node(Node::Dict(pairs));
                self.push(v);
            }
            b'l' => {
                let items = self.pop_mark()?;
                let v = self.new_node(Node::List(items));
                self.push(v);
            }
            b't' => {
                let items = self.pop_mark()?;
                let v = self.new_node(Node::Tuple(items));
                self.push(v);
            }
            0x91 => {
                let items = self.pop_mark()?;
                let v = self.new_node(Node::Set(items));
                self.push(v);
            }
            0x85..=0x87 => {
                let items = self.pop_n(usize::from(op - 0x84))?;
                let v = self.new_node(Node::Tuple(items));
                self.push(v);
            }
            b'a' => {
                let v = self.pop()?;
                self.extend_top(vec![v])?;
            }
            b'e' | 0x90 => {
                let items = self.pop_mark()?;
                self.extend_top(items)?;
            }
            b's' => {
                let items = self.pop_n(2)?;
                self.set_items_top(items)?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.set_items_top(items)?;
            }
            b'p' => {
                let key = self.line_int_arg()?;
                self.memo_put(key)?;
            }
            b'q' => {
                let key = self.read_u8()?;
                self.memo_put(u64::from(key))?;
            }
            b'r' => {
                let key = self.read_u32()?;
                self.memo_put(u64::from(key))?;
            }
            0x94 => {
                let key = self.memo.len() as u64;
                self.memo_put(key)?;
            }
            b'g' => {
                let key = self.line_int_arg()?;
                self.memo_get(key)?;
            }
            b'h' => {
                let key = self.read_u8()?;
                self.memo_get(u64::from(key))?;
            }
            b'j' => {
                let key = self.read_u32()?;
                self.memo_get(u64::from(key))?;
            }
            b'c' => {
                let module = self.line_str()?;
                let name = self.line_str()?;
                let v = self.new_node(Node::Global(Global::resolve(module, name)));
                self.push(v);
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let name = self.name_of(name, "global name")?;
                let module = self.name_of(module, "global module")?;
                let v = self.new_node(Node::Global(Global::resolve(&module, &name)));
                self.push(v);
            }
            b'R' => {
                let args = self.pop()?;
                let func = self.pop()?;
                let v = self.reduce(func, args)?;
                self.push(v);
            }
            b'b' => {
                let state = self.pop()?;
                let obj = self.top()?;
                self.build(obj, state)?;
            }
            _ => {
                return Err(match op_name(op) {
                    Some(name) => self.err_at(
                        self.op_at,
                        format!("unsupported pickle opcode {name} (0x{op:02x})"),
                    ),
                    None => self.err_at(
                        self.op_at,
                        format!(
                            "unknown pickle opcode 0x{op:02x} ({:?}): not a pickle, or corrupt",
                            char::from(op)
                        ),
                    ),
                });
            }
        }
        Ok(())
    }

    fn parse_int(&self, text: &str) -> Result<Value<'a>> {
        let t = text.trim();
        if let Ok(i) = t.parse::<i64>() {
            return Ok(Value::Int(i));
        }
        let digits = t.strip_prefix(['-', '+']).unwrap_or(t);
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            Ok(Value::BigInt)
        } else {
            Err(self.err(format!("bad int {text:?}")))
        }
    }

    fn line_int_arg(&mut self) -> Result<u64> {
        let line = self.line_str()?;
        line.trim()
            .parse::<u64>()
            .map_err(|_| self.err(format!("bad memo key {line:?}")))
    }

    fn pairs(&self, items: Vec<Value<'a>>) -> Result<Vec<(Value<'a>, Value<'a>)>> {
        if !items.len().is_multiple_of(2) {
            return Err(self.err(format!("odd number of items ({}) for a dict", items.len())));
        }
        let mut it = items.into_iter();
        let mut pairs = Vec::with_capacity(it.len() / 2);
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            pairs.push((k, v));
        }
        Ok(pairs)
    }

    fn extend_top(&mut self, items: Vec<Value<'a>>) -> Result<()> {
        let target = self.top()?;
        if let Value::Node(i) = target {
            if let Some(Node::List(list) | Node::Set(list)) = self.nodes.get_mut(i) {
                list.extend(items);
                return Ok(());
            }
        }
        Err(self.err(format!("cannot append to {}", self.describe(target))))
    }

    fn set_items_top(&mut self, items: Vec<Value<'a>>) -> Result<()> {
        let pairs = self.pairs(items)?;
        let target = self.top()?;
        if let Value::Node(i) = target {
            if let Some(Node::Dict(dict)) = self.nodes.get_mut(i) {
                dict.extend(pairs);
                return Ok(());
            }
        }
        Err(self.err(format!("cannot set items of {}", self.describe(target))))
    }

    fn reduce(&mut self, func: Value<'a>, args: Value<'a>) -> Result<Value<'a>> {
        let global = match self.node(func) {
            Some(Node::Global(g)) => g.clone(),
            _ => {
                return Err(self.err(format!(
                    "cannot call {}: only numpy globals are supported",
                    self.describe(func)
                )))
            }
        };
        let args = self.tuple_items(args, "argument list")?;
        match global {
            Global::Reconstruct => match args.as_slice() {
                [_class, _shape, _typecode] => Ok(self.new_node(Node::Array(Array::Empty))),
                _ => Err(self.err(format!(
                    "numpy _reconstruct takes 3 arguments, got {}",
                    args.len()
                ))),
            },
            Global::Dtype => match args.as_slice() {
                [name, ..] if args.len() <= 3 => {
                    let name = self.name_of(*name, "dtype")?;
                    Ok(self.new_node(Node::Dtype(Dtype { name, order: b'=' })))
                }
                _ => Err(self.err(format!(
                    "numpy dtype takes 1 to 3 arguments, got {}",
                    args.len()
                ))),
            },
            Global::CodecsEncode => {
                let (text, encoding) = match args.as_slice() {
                    [t] => (*t, "utf-8".to_string()),
                    [t, e] => (*t, self.name_of(*e, "encoding")?),
                    _ => {
                        return Err(self.err(format!(
                            "_codecs.encode takes 1 or 2 arguments, got {}",
                            args.len()
                        )))
                    }
                };
                let Some(text) = self.text_of(text) else {
                    return Err(self.err(format!(
                        "_codecs.encode of {}, not a str",
                        self.describe(text)
                    )));
                };
                let bytes = encode_text(text, &encoding).map_err(|e| self.err(e))?;
                Ok(self.new_node(Node::Bytes(bytes)))
            }
            Global::Bytes => match args.as_slice() {
                [] => Ok(self.new_node(Node::Bytes(Vec::new()))),
                [b] if self.bytes_of(*b).is_some() && self.text_of(*b).is_none() => Ok(*b),
                _ => Err(self.err("unsupported arguments to bytes()")),
            },
            Global::FromBuffer => match args.as_slice() {
                [buf, dtype, shape, order] => {
                    let fortran = self.bytes_of(*order) == Some(b"F");
                    let array = self.make_array(*shape, *dtype, fortran, *buf)?;
                    Ok(self.new_node(Node::Array(Array::Filled(array))))
                }
                _ => Err(self.err(format!(
                    "numpy _frombuffer takes 4 arguments, got {}",
                    args.len()
                ))),
            },
            Global::NdArray => Err(self.err("calling numpy.ndarray directly is not supported")),
            Global::Other(name) => Err(self.err(format!(
                "cannot call {name}: this reader only builds numpy arrays"
            ))),
        }
    }

    fn build(&mut self, obj: Value<'a>, state: Value<'a>) -> Result<()> {
        match self.node(obj) {
            Some(Node::Array(Array::Empty)) => {
                let items = self.tuple_items(state, "array state")?;
                let (shape, dtype, fortran, data) = match items.as_slice() {
                    [version, shape, dtype, fortran, data] => {
                        let v = self.int_of(*version, "array state version")?;
                        if v != 1 {
                            return Err(self.err(format!("unsupported array state version {v}")));
                        }
                        (*shape, *dtype, *fortran, *data)
                    }
                    [shape, dtype, fortran, data] => (*shape, *dtype, *fortran, *data),
                    _ => {
                        return Err(self.err(format!(
                            "array state has {} items, expected 4 or 5",
                            items.len()
                        )))
                    }
                };
                let fortran = self.int_of(fortran, "array Fortran flag")? != 0;
                let array = self.make_array(shape, dtype, fortran, data)?;
                if let Value::Node(i) = obj {
                    if let Some(n) = self.nodes.get_mut(i) {
                        *n = Node::Array(Array::Filled(array));
                    }
                    if let Some(at) = self.node_at.get_mut(i) {
                        *at = self.op_at;
                    }
                }
                Ok(())
            }
            Some(Node::Array(Array::Filled(_))) => {
                Err(self.err("BUILD on an array that was already filled"))
            }
            Some(Node::Dtype(_)) => {
                // (version, byte order, subarray, names, fields, elsize, alignment, flags)
                let items = self.tuple_items(state, "dtype state")?;
                let order = match items.get(1) {
                    None => b'=',
                    Some(v) => match self.bytes_of(*v) {
                        Some([o @ (b'|' | b'<' | b'>' | b'=')]) => *o,
                        _ => {
                            return Err(self.err(format!(
                                "dtype byte order is {}, expected one of | < > =",
                                self.describe(*v)
                            )))
                        }
                    },
                };
                if let Value::Node(i) = obj {
                    if let Some(Node::Dtype(d)) = self.nodes.get_mut(i) {
                        d.order = order;
                    }
                }
                Ok(())
            }
            _ => Err(self.err(format!(
                "cannot BUILD {}: only numpy arrays and dtypes are supported",
                self.describe(obj)
            ))),
        }
    }

    /// Check an array description: a shape of non-negative ints, a dtype, and raw bytes of
    /// the matching length.
    fn make_array(
        &self,
        shape: Value<'a>,
        dtype: Value<'a>,
        fortran: bool,
        data: Value<'a>,
    ) -> Result<NdArray<'a>> {
        let Some(Node::Dtype(dtype)) = self.node(dtype) else {
            return Err(self.err(format!(
                "array dtype is {}, not a numpy dtype",
                self.describe(dtype)
            )));
        };
        let dims = self.tuple_items(shape, "array shape")?;
        let dims = dims
            .iter()
            .map(|d| match self.int_of(*d, "array dimension")? {
                n if n < 0 => Err(self.err(format!("negative array dimension {n}"))),
                n => Ok(n),
            })
            .collect::<Result<Vec<i64>>>()?;
        let Some(bytes) = self.bytes_of(data) else {
            return Err(self.err(format!(
                "array data is {}, expected raw bytes (object arrays are not supported)",
                self.describe(data)
            )));
        };
        if let Some((_, size)) = dtype.simple() {
            let need = dims
                .iter()
                .try_fold(size as u128, |acc, &d| acc.checked_mul(d as u128));
            if need != Some(bytes.len() as u128) {
                return Err(self.err(format!(
                    "array data is {} bytes, but shape {dims:?} of '{}' needs {}",
                    bytes.len(),
                    dtype.name,
                    need.map_or_else(|| "more".to_string(), |n| n.to_string())
                )));
            }
        }
        Ok(NdArray {
            dims,
            dtype: dtype.clone(),
            fortran,
            data,
        })
    }

    /// The labels: a list or tuple of ints, or a 1-D integer numpy array. Returns them with
    /// the offset of the opcode that made them.
    fn label_values(&self, labels: Value<'a>, stop_at: usize) -> Result<(Vec<i64>, usize)> {
        let Value::Node(i) = labels else {
            let what = self.describe(labels);
            return Err(self.err_at(stop_at, format!("'labels' is {what}, not a list")));
        };
        let at = self.node_at.get(i).copied().unwrap_or(stop_at);
        match self.nodes.get(i) {
            Some(Node::List(items) | Node::Tuple(items)) => {
                let mut out = Vec::with_capacity(items.len());
                for (k, v) in items.iter().enumerate() {
                    match v {
                        Value::Int(l) => out.push(*l),
                        _ => {
                            return Err(self.err_at(
                                at,
                                format!(
                                    "labels[{k}] is {}, not an int (list starts here)",
                                    self.describe(*v)
                                ),
                            ))
                        }
                    }
                }
                Ok((out, at))
            }
            Some(Node::Array(Array::Filled(a))) => {
                let (kind, size) = a.dtype.simple().unwrap_or((b'?', 0));
                let int = (kind == b'i' || kind == b'u') && matches!(size, 1 | 2 | 4 | 8);
                let bytes = self.bytes_of(a.data).unwrap_or(&[]);
                if !int || a.dims.len() != 1 {
                    return Err(self.err_at(
                        at,
                        format!(
                            "'labels' is a numpy array of '{}' with shape {:?}, expected 1-D ints",
                            a.dtype.name, a.dims
                        ),
                    ));
                }
                let big = a.dtype.big_endian();
                let out = bytes
                    .chunks_exact(size)
                    .map(|c| {
                        // Widen to 8 little-endian bytes, sign-extending signed kinds.
                        let mut le = [0u8; 8];
                        for (k, &b) in c.iter().enumerate() {
                            let k = if big { size - 1 - k } else { k };
                            if let Some(d) = le.get_mut(k) {
                                *d = b;
                            }
                        }
                        let top = le.get(size - 1).copied().unwrap_or(0);
                        if kind == b'i' && top & 0x80 != 0 {
                            for d in le.iter_mut().skip(size) {
                                *d = 0xff;
                            }
                        }
                        i64::from_le_bytes(le)
                    })
                    .collect();
                Ok((out, at))
            }
            _ => {
                let what = self.describe(labels);
                Err(self.err_at(at, format!("'labels' is {what}, not a list")))
            }
        }
    }

    /// Turn the unpickled dict into images.
    fn finish(self, top: Value<'a>) -> Result<Images> {
        self.finish_with(top, b"labels", CLASSES)
    }

    /// The list of strings under `key` of the top dict (CIFAR-100's `meta`).
    fn finish_names(self, top: Value<'a>, key: &[u8]) -> Result<Vec<String>> {
        let stop_at = self.op_at;
        let k = String::from_utf8_lossy(key).into_owned();
        let Some(Node::Dict(pairs)) = self.node(top) else {
            let what = self.describe(top);
            return Err(self.err_at(stop_at, format!("the pickle holds {what}, expected a dict")));
        };
        let Some(list) = pairs
            .iter()
            .rev()
            .find(|(q, _)| self.bytes_of(*q) == Some(key))
            .map(|(_, v)| *v)
        else {
            return Err(self.err_at(stop_at, format!("the dict has no key '{k}'")));
        };
        let Some(Node::List(items) | Node::Tuple(items)) = self.node(list) else {
            let what = self.describe(list);
            return Err(self.err_at(stop_at, format!("'{k}' is {what}, not a list")));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| match self.bytes_of(*v) {
                Some(b) => Ok(String::from_utf8_lossy(b).into_owned()),
                None => Err(self.err_at(
                    stop_at,
                    format!("'{k}'[{i}] is {}, not a string", self.describe(*v)),
                )),
            })
            .collect()
    }

    /// The images of the top dict: `data` and the labels under `label_key`, each below
    /// `classes`.
    fn finish_with(mut self, top: Value<'a>, label_key: &[u8], classes: usize) -> Result<Images> {
        let stop_at = self.op_at;
        let key_name = String::from_utf8_lossy(label_key).into_owned();
        let Some(Node::Dict(pairs)) = self.node(top) else {
            let what = self.describe(top);
            return Err(self.err_at(
                stop_at,
                format!("the pickle holds {what}, expected a dict with 'data' and 'labels'"),
            ));
        };
        let find = |key: &[u8]| {
            pairs
                .iter()
                .rev()
                .find(|(k, _)| self.bytes_of(*k) == Some(key))
                .map(|(_, v)| *v)
        };
        let (Some(data), Some(labels)) = (find(b"data"), find(label_key)) else {
            let keys: Vec<String> = pairs
                .iter()
                .map(|(k, _)| match self.bytes_of(*k) {
                    Some(b) => format!("'{}'", String::from_utf8_lossy(b)),
                    None => self.describe(*k),
                })
                .collect();
            return Err(self.err_at(
                stop_at,
                format!(
                    "the dict needs keys 'data' and '{key_name}'; it has [{}]",
                    keys.join(", ")
                ),
            ));
        };
        let (array, array_at) = match (data, self.node(data)) {
            (Value::Node(i), Some(Node::Array(Array::Filled(a)))) => {
                (a.clone(), self.node_at.get(i).copied().unwrap_or(stop_at))
            }
            (Value::Node(i), Some(Node::Array(Array::Empty))) => {
                let at = self.node_at.get(i).copied().unwrap_or(stop_at);
                return Err(self.err_at(at, "'data' array was never filled (no BUILD)"));
            }
            _ => {
                let what = self.describe(data);
                return Err(self.err_at(stop_at, format!("'data' is {what}, not a numpy array")));
            }
        };
        if !array.dtype.is_uint8() {
            return Err(self.err_at(
                array_at,
                format!("'data' dtype is '{}', expected uint8", array.dtype.name),
            ));
        }
        let rows = match array.dims.as_slice() {
            [n, 3072] | [n, 3, 32, 32] => usize::try_from(*n).ok(),
            _ => None,
        };
        let Some(rows) = rows else {
            return Err(self.err_at(
                array_at,
                format!(
                    "'data' shape is {:?}, expected (N, {IMAGE_BYTES})",
                    array.dims
                ),
            ));
        };
        if array.fortran && rows > 1 {
            return Err(self.err_at(array_at, "'data' is in Fortran order, expected C order"));
        }
        let (values, labels_at) = self.label_values(labels, stop_at)?;
        if values.len() != rows {
            return Err(self.err_at(
                labels_at,
                format!(
                    "'labels' has {} entries but 'data' has {rows} images",
                    values.len()
                ),
            ));
        }
        let mut out = Vec::with_capacity(rows);
        for (i, &v) in values.iter().enumerate() {
            match u16::try_from(v).ok().filter(|&l| usize::from(l) < classes) {
                Some(l) => out.push(l),
                None => {
                    return Err(self.err_at(
                        labels_at,
                        format!(
                            "{key_name}[{i}] is {v}, not a class 0..{} (the labels start here)",
                            classes - 1
                        ),
                    ))
                }
            }
        }
        let raw = array.data;
        let pixels = match raw {
            Value::Bytes(b) => b.to_vec(),
            Value::Node(i) => match self.nodes.get_mut(i) {
                Some(Node::Bytes(b)) => std::mem::take(b),
                Some(Node::Text(t)) => std::mem::take(t).into_bytes(),
                _ => return Err(self.err_at(array_at, "array data is not bytes")),
            },
            Value::Text(t) => t.as_bytes().to_vec(),
            _ => return Err(self.err_at(array_at, "array data is not bytes")),
        };
        Ok(Images {
            labels: out,
            pixels,
        })
    }
}

/// `_codecs.encode(text, encoding)`: how Python 3 pickles `bytes` under protocol 2 (as
/// latin-1 text, one code point per byte).
fn encode_text(text: &str, encoding: &str) -> std::result::Result<Vec<u8>, String> {
    match encoding.to_ascii_lowercase().replace('_', "-").as_str() {
        "latin1" | "latin-1" | "iso-8859-1" | "iso8859-1" | "l1" => {
            // UTF-8 takes at least one byte per character: one allocation, no regrowth.
            let mut out = Vec::with_capacity(text.len());
            for c in text.chars() {
                let b = u8::try_from(u32::from(c)).map_err(|_| {
                    format!(
                        "character U+{:04X} cannot be encoded as latin-1",
                        u32::from(c)
                    )
                })?;
                out.push(b);
            }
            Ok(out)
        }
        "utf-8" | "utf8" => Ok(text.as_bytes().to_vec()),
        "ascii" if text.is_ascii() => Ok(text.as_bytes().to_vec()),
        _ => Err(format!(
            "unsupported encoding '{encoding}' for _codecs.encode"
        )),
    }
}

/// A LONG1/LONG4 payload: little-endian two's complement.
fn decode_long(bytes: &[u8]) -> Value<'static> {
    if bytes.len() > 8 {
        return Value::BigInt;
    }
    let negative = bytes.last().is_some_and(|&b| b & 0x80 != 0);
    let mut buf = if negative { [0xffu8; 8] } else { [0u8; 8] };
    for (dst, src) in buf.iter_mut().zip(bytes) {
        *dst = *src;
    }
    Value::Int(i64::from_le_bytes(buf))
}

/// The body of a protocol-0 STRING argument: a quoted Python-2 string literal.
fn unquote_string(line: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let body = match line {
        [q @ (b'\'' | b'"'), body @ .., last] if last == q => body,
        _ => return Err("STRING argument is not quoted".into()),
    };
    let mut out = Vec::with_capacity(body.len());
    let mut it = body.iter().copied().peekable();
    while let Some(b) = it.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        let Some(e) = it.next() else {
            return Err("STRING ends in a lone backslash".into());
        };
        match e {
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'r' => out.push(b'\r'),
            b'a' => out.push(7),
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'v' => out.push(11),
            b'\\' | b'\'' | b'"' => out.push(e),
            b'\n' => {}
            b'x' => {
                let hi = it.next().and_then(hex_digit);
                let lo = it.next().and_then(hex_digit);
                match (hi, lo) {
                    (Some(h), Some(l)) => out.push(h << 4 | l),
                    _ => return Err("bad \\x escape in STRING".into()),
                }
            }
            b'0'..=b'7' => {
                let mut v = u32::from(e - b'0');
                for _ in 0..2 {
                    match it.peek() {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            it.next();
                        }
                        _ => break,
                    }
                }
                out.push((v & 0xff) as u8);
            }
            other => {
                out.push(b'\\');
                out.push(other);
            }
        }
    }
    Ok(out)
}

fn hex_digit(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).map(|d| d as u8)
}

/// The argument of a protocol-0 UNICODE opcode: raw-unicode-escape (latin-1 bytes with
/// `\uXXXX` and `\UXXXXXXXX` escapes).
fn raw_unicode_escape(line: &[u8]) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    while let Some(&b) = line.get(i) {
        let width = match (b, line.get(i + 1)) {
            (b'\\', Some(b'u')) => 4,
            (b'\\', Some(b'U')) => 8,
            _ => 0,
        };
        if width == 0 {
            out.push(char::from(b));
            i += 1;
            continue;
        }
        let digits = line
            .get(i + 2..i + 2 + width)
            .ok_or("truncated \\u escape in UNICODE")?;
        let code = std::str::from_utf8(digits)
            .ok()
            .and_then(|d| u32::from_str_radix(d, 16).ok())
            .ok_or("bad \\u escape in UNICODE")?;
        out.push(char::from_u32(code).ok_or("\\u escape is not a character")?);
        i += 2 + width;
    }
    Ok(out)
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
            eprintln!("skipping: {} is missing", p.display());
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
        let got = unquote_string(br"'a\x00\n\\\'b\101'").expect("unquote");
        assert_eq!(got, b"a\x00\n\\'bA");
        assert_eq!(
            raw_unicode_escape(b"a\\u00ffb\xe9").expect("decode"),
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
        };
        assert!(bad.check().is_err());
    }
}
