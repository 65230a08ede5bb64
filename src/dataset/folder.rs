//! Image folders: the layout torchvision's `ImageFolder` and Keras's
//! `image_dataset_from_directory` read, `DIR/train/CLASS/*.{jpg,jpeg,png}` and optionally
//! `DIR/test/CLASS/*`.
//!
//! The classes are the folder names of `train/` in sorted (byte) order, label 0 first. Each
//! image is decoded (JPEG with zune-jpeg, PNG with png; grey, grey + alpha, palette and
//! RGBA all become RGB, alpha dropped, 16-bit samples cut to 8), resized to 32×32 with the
//! pipeline's own bilinear kernel ([`crate::transforms::pixels::Resize`], half-pixel
//! centres) unless it already is, and laid out as a CIFAR row (red plane, green, blue).
//! Files are decoded on every core. A file that is not an image, is truncated or has zero
//! size is rejected: named with its path and reason, counted, and the rest go on. The
//! training split comes out in a shuffled order, fixed by [`SHUFFLE_SEED`], so that its
//! batches mix the classes; the test split stays in class, then file-name order.
//!
//! Files come from anywhere, so each is sized before it costs memory: a file over
//! [`MAX_FILE_BYTES`] is refused unread, and each image's width and height are read from
//! its header (PNG's `IHDR`, JPEG's frame header) before anything is decoded. An image
//! over [`MAX_IMAGE_PIXELS`], or whose decoding ([`Declared::bytes`]: the file, the
//! decoder's output and working buffers, the copies made from them) would not fit in the
//! decoders' share of the memory limit (1/[`DECODE_SHARE`] of `--memory-limit`), is refused
//! with its declared size and the limit, like any unreadable file. The decoding threads
//! reserve what their file needs from that one share before reading it, so together they
//! stay within it.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, PoisonError};

use super::{image_bytes, Images, Split, MAX_CLASSES, SIDE};
use crate::error::{Error, Result};
use crate::limits::human;
use crate::rng::SplitMix;
use crate::transforms::pixels::Resize;

/// Bytes read from one image file at most: a larger file is refused without being read.
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// Pixels one image may declare (8192×8192), whatever the memory limit: a larger image is
/// refused before it is decoded.
pub const MAX_IMAGE_PIXELS: u64 = 8192 * 8192;

/// The image decoders together (every thread's file, output and working buffers) may use
/// 1/`DECODE_SHARE` of the memory limit; the rest is the process's.
pub const DECODE_SHARE: u64 = 2;

/// Seed of the training split's order.
pub const SHUFFLE_SEED: u64 = 0x5eed_f01d;

/// File extensions read (case-insensitive); other files in a class folder are skipped
/// with a notice.
pub const EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// Whether `dir` looks like an image folder: it has a `train/` folder holding folders.
pub fn is_image_folder(dir: &Path) -> bool {
    let train = dir.join("train");
    train.is_dir()
        && fs::read_dir(&train)
            .is_ok_and(|mut entries| entries.any(|e| e.is_ok_and(|e| e.path().is_dir())))
}

/// The sorted subfolder names of `dir`.
fn subfolders(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if entry.path().is_dir() {
            let name = entry.file_name();
            let name = name.to_str().ok_or_else(|| {
                Error::usage(format!(
                    "{}: the class folder name {name:?} is not UTF-8",
                    dir.display()
                ))
            })?;
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// The classes of the image folder `root`: the folder names of `root/train`, sorted.
/// Errors when there are fewer than 2 or more than [`MAX_CLASSES`].
pub fn classes(root: &Path) -> Result<Vec<String>> {
    let train = root.join("train");
    if !train.is_dir() {
        return Err(Error::usage(format!(
            "{}: not an image folder (no train/ folder; expected train/CLASS/*.jpg or *.png)",
            root.display()
        )));
    }
    let names = subfolders(&train)?;
    match names.len() {
        0 => Err(Error::usage(format!(
            "{}: no class subfolders (expected {}/CLASS/*.jpg or *.png, one folder per class)",
            train.display(),
            train.display()
        ))),
        1 => Err(Error::usage(format!(
            "{}: only one class folder ({}); a classifier needs at least 2",
            train.display(),
            names[0]
        ))),
        n if n > MAX_CLASSES => Err(Error::usage(format!(
            "{}: {n} class folders; at most {MAX_CLASSES} classes are supported",
            train.display()
        ))),
        _ => Ok(names),
    }
}

/// The image files of one class folder, sorted by name, and the other files skipped.
fn class_files(dir: &Path) -> Result<(Vec<PathBuf>, usize)> {
    let mut files = Vec::new();
    let mut skipped = 0;
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if !path.is_file() {
            continue;
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        if ext.is_some_and(|e| EXTENSIONS.contains(&e.as_str())) {
            files.push(path);
        } else {
            skipped += 1;
        }
    }
    files.sort();
    Ok((files, skipped))
}

/// A split of an image folder, decoded.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The images, CIFAR layout, labels by the train classes.
    pub images: Images,
    /// The file of each image, in the same order.
    pub files: Vec<PathBuf>,
    /// Files rejected, with why.
    pub rejected: Vec<(PathBuf, String)>,
}

/// Reads `split` of the image folder `root` with the given classes (from [`classes`]).
/// The test split is empty when `root/test` does not exist. A class folder in `test/`
/// that `train/` does not have, and a training class folder with no image file, are
/// errors naming the folder.
pub fn load(root: &Path, split: Split, classes: &[String], side: usize) -> Result<Loaded> {
    let dir = root.join(split.name());
    if split == Split::Test && !dir.exists() {
        return Ok(Loaded {
            images: Images::with_side(0, side),
            ..Loaded::default()
        });
    }
    let mut work: Vec<(u16, PathBuf)> = Vec::new();
    let mut skipped = 0;
    for name in subfolders(&dir)? {
        let Some(label) = classes.iter().position(|c| *c == name) else {
            return Err(Error::usage(format!(
                "{}: class folder {name:?} is not a class of {}/train ({})",
                dir.join(&name).display(),
                root.display(),
                classes.join(", ")
            )));
        };
        let (files, other) = class_files(&dir.join(&name))?;
        skipped += other;
        if files.is_empty() && split == Split::Train {
            return Err(Error::usage(format!(
                "{}: class {name:?} has no image file (.jpg, .jpeg or .png)",
                dir.join(&name).display()
            )));
        }
        // At most MAX_CLASSES classes: the label fits in a u16.
        let label = u16::try_from(label).unwrap_or(u16::MAX);
        work.extend(files.into_iter().map(|f| (label, f)));
    }
    if skipped > 0 {
        tracing::info!(
            "{}: {skipped} files without a .jpg, .jpeg or .png extension skipped",
            dir.display()
        );
    }
    if split == Split::Train {
        SplitMix(SHUFFLE_SEED).shuffle(&mut work);
    }
    super::check_resized(work.len(), side)?;
    let decoded = decode_all(&work, side);
    let mut out = Loaded {
        images: Images::with_side(work.len(), side),
        ..Loaded::default()
    };
    for ((label, path), result) in work.into_iter().zip(decoded) {
        match result {
            Ok(pixels) => {
                out.images.push(label, &pixels);
                out.files.push(path);
            }
            Err(reason) => {
                if out.rejected.len() < 20 {
                    tracing::warn!("rejected image {}: {reason}", path.display());
                }
                out.rejected.push((path, reason));
            }
        }
    }
    if !out.rejected.is_empty() {
        tracing::warn!(
            "{}: {} of {} image files rejected (each named above, up to 20); the other {} are used",
            dir.display(),
            out.rejected.len(),
            out.rejected.len() + out.images.len(),
            out.images.len()
        );
    }
    if out.images.is_empty() && split == Split::Train {
        return Err(Error::usage(format!(
            "{}: no readable image (all {} files rejected)",
            dir.display(),
            out.rejected.len()
        )));
    }
    Ok(out)
}

/// Decodes every file of `work` on all cores, in order, within the decoders' share of the
/// memory limit.
fn decode_all(work: &[(u16, PathBuf)], side: usize) -> Vec<std::result::Result<Vec<u8>, String>> {
    let threads = std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(1)
        .clamp(1, 16);
    let chunk = work.len().div_ceil(threads).max(1);
    let budget = Budget::from_limit();
    let budget = &budget;
    std::thread::scope(|s| {
        let handles: Vec<_> = work
            .chunks(chunk)
            .map(|part| {
                let files = part.len();
                let handle = s.spawn(move || {
                    let mut scratch = Vec::new();
                    part.iter()
                        .map(|(_, path)| load_file(path, side, &mut scratch, budget))
                        .collect::<Vec<_>>()
                });
                (files, handle)
            })
            .collect();
        // A thread that died rejects each of its files, so the results stay in step with
        // `work` (decode itself catches a decoder's panic per file).
        handles
            .into_iter()
            .flat_map(|(files, h)| {
                h.join()
                    .unwrap_or_else(|_| vec![Err("the decoding thread failed".to_string()); files])
            })
            .collect()
    })
}

/// The memory the decoding threads share: each reserves what its file needs before using
/// it and gives it back when done, so that together they stay within `total`.
struct Budget {
    /// Bytes the decoders may hold together.
    total: u128,
    /// `total` for a person: the size and where it comes from.
    what: String,
    /// Bytes reserved now.
    used: Mutex<u128>,
    /// Signalled when bytes are given back.
    freed: Condvar,
}

/// Bytes reserved from a [`Budget`], given back when dropped.
struct Held<'a> {
    budget: &'a Budget,
    bytes: u128,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut used = self
            .budget
            .used
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *used = used.saturating_sub(self.bytes);
        self.budget.freed.notify_all();
    }
}

impl Budget {
    fn new(total: u128, what: String) -> Budget {
        Budget {
            total,
            what,
            used: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    /// 1/[`DECODE_SHARE`] of the memory limit.
    fn from_limit() -> Budget {
        let (limit, from) = crate::limits::memory_limit();
        let total = u128::from(limit / DECODE_SHARE);
        let what = format!(
            "{}, the image decoders' share (1/{DECODE_SHARE}) of the memory limit of {} ({from})",
            human(total),
            human(u128::from(limit))
        );
        Budget::new(total, what)
    }

    /// Reserves `bytes` (at most `total`), waiting until the other threads have given
    /// back enough. A thread waits holding nothing, so every wait ends.
    fn reserve(&self, bytes: u128) -> Held<'_> {
        let bytes = bytes.min(self.total);
        let mut used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        while *used + bytes > self.total {
            used = self
                .freed
                .wait(used)
                .unwrap_or_else(PoisonError::into_inner);
        }
        *used += bytes;
        Held {
            budget: self,
            bytes,
        }
    }

    /// Reserves `bytes` if they are free now.
    fn try_reserve(&self, bytes: u128) -> Option<Held<'_>> {
        let mut used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        if *used + bytes > self.total {
            return None;
        }
        *used += bytes;
        Some(Held {
            budget: self,
            bytes,
        })
    }
}

/// What an image file's header declares, read before anything is decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Declared {
    /// `"PNG"` or `"JPEG"`.
    pub format: &'static str,
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Memory that decoding it takes at most: the file's bytes, the decoder's output and
    /// working buffers (a JPEG's coefficients, a PNG's rows), the RGB and planar copies
    /// and the resize's rows.
    pub bytes: u128,
}

impl Declared {
    /// `"PNG header declares 12000x12000 pixels"`.
    fn describe(&self) -> String {
        format!(
            "{} header declares {}x{} pixels",
            self.format, self.width, self.height
        )
    }

    /// A PNG of `width`×`height` whose decoder output takes `output` bytes, from a file of
    /// `file` bytes, resized to `side`.
    fn png(width: usize, height: usize, output: u128, file: usize, side: usize) -> Declared {
        let (w, h) = (width as u128, height as u128);
        // The decoder: its output, the current and previous raw rows (8 bytes a pixel at
        // most, RGBA of 16 bits) twice over, its inflate window and the chunks it copies
        // (no more than the file).
        let decoder = output + 4 * (8 * w + 1) + (256 << 10) + file as u128;
        Declared {
            format: "PNG",
            width,
            height,
            bytes: file as u128 + decoder + 3 * w * h + after_decode(width, height, side),
        }
    }

    /// A JPEG of `width`×`height` and `components` colour components, from a file of
    /// `file` bytes, resized to `side`.
    fn jpeg(width: usize, height: usize, components: usize, file: usize, side: usize) -> Declared {
        let (w, h) = (width as u128, height as u128);
        let c = components.max(1) as u128;
        // A progressive (or non-interleaved) JPEG keeps every component's coefficients
        // (2 bytes a sample, sides padded to a whole MCU of up to 32 pixels); then the RGB
        // output, the decoder's row buffers, and the segments it copies (ICC, EXIF: no
        // more than the file).
        let pad = |n: u128| n.div_ceil(32) * 32;
        let decoder = 2 * c * pad(w) * pad(h) + 3 * w * h + 64 * c * pad(w) + file as u128;
        Declared {
            format: "JPEG",
            width,
            height,
            bytes: file as u128 + decoder + after_decode(width, height, side),
        }
    }
}

/// Memory of the steps after the decoder: the planar copy and the resize's rows.
fn after_decode(width: usize, height: usize, side: usize) -> u128 {
    let (w, h) = (width as u128, height as u128);
    3 * w * h + 4 * h * side as u128 + 24 * (w + h)
}

/// Why a file was not decoded.
enum Reject {
    /// The file is refused or undecodable: why.
    Bad(String),
    /// The memory it needs (this many bytes in all) is not free now: wait, then try again.
    Busy(u128),
}

impl From<String> for Reject {
    fn from(reason: String) -> Self {
        Reject::Bad(reason)
    }
}

impl From<&str> for Reject {
    fn from(reason: &str) -> Self {
        Reject::Bad(reason.to_string())
    }
}

/// The checks on every image whatever the memory: its pixels, at most
/// [`MAX_IMAGE_PIXELS`], and its decoding's memory, at most `max` (`what`: the limit for a
/// person).
fn check_declared(d: &Declared, max: u128, what: &str) -> std::result::Result<(), String> {
    let pixels = d.width as u128 * d.height as u128;
    if pixels > u128::from(MAX_IMAGE_PIXELS) {
        return Err(format!(
            "{} ({pixels}), over the limit of {MAX_IMAGE_PIXELS} pixels (8192x8192) per \
             image; refused before decoding",
            d.describe()
        ));
    }
    if d.bytes > max {
        return Err(format!(
            "{}: decoding it needs about {}, over {what}; refused before decoding",
            d.describe(),
            human(d.bytes)
        ));
    }
    Ok(())
}

/// Reads and decodes one file, within `budget`: its size checked before it is read, its
/// header before it is decoded, the memory of both reserved first.
fn load_file(
    path: &Path,
    side: usize,
    scratch: &mut Vec<f32>,
    budget: &Budget,
) -> std::result::Result<Vec<u8>, String> {
    let len = fs::metadata(path)
        .map_err(|e| format!("cannot read: {e}"))?
        .len();
    if len > MAX_FILE_BYTES {
        return Err(format!(
            "the file has {len} bytes, over the limit of {MAX_FILE_BYTES} ({}) read from one \
             image file; refused unread",
            human(u128::from(MAX_FILE_BYTES))
        ));
    }
    if u128::from(len) > budget.total {
        return Err(format!(
            "the file has {len} bytes, over {}; refused unread",
            budget.what
        ));
    }
    // First the file's bytes only; then, once its header is read, the rest if it is free.
    let held = budget.reserve(u128::from(len));
    let bytes = read_capped(path)?;
    let mut more = None;
    let first = decode_with(&bytes, side, scratch, &mut |d| {
        check_declared(d, budget.total, &budget.what)?;
        let extra = d.bytes.saturating_sub(held.bytes);
        more = Some(budget.try_reserve(extra).ok_or(Reject::Busy(d.bytes))?);
        Ok(())
    });
    let need = match first {
        Err(Reject::Busy(need)) => need,
        Err(Reject::Bad(reason)) => return Err(reason),
        Ok(row) => return Ok(row),
    };
    // Not free now: give everything back (a thread waits holding nothing), wait for the
    // whole need at once, then read and decode again.
    drop((bytes, held, more));
    let held = budget.reserve(need);
    let bytes = read_capped(path)?;
    decode_with(&bytes, side, scratch, &mut |d| {
        check_declared(d, budget.total, &budget.what)?;
        if d.bytes > held.bytes {
            return Err(Reject::Bad("the file changed while it was read".into()));
        }
        Ok(())
    })
    .map_err(|r| match r {
        Reject::Bad(reason) => reason,
        Reject::Busy(_) => "the file changed while it was read".into(),
    })
}

/// The bytes of `path`, refusing a file over [`MAX_FILE_BYTES`] (it may have grown since
/// it was sized) without reading more than that.
fn read_capped(path: &Path) -> std::result::Result<Vec<u8>, String> {
    let file = fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    crate::store::read_at_most(file, MAX_FILE_BYTES)
        .map_err(|e| format!("cannot read: {e}"))?
        .ok_or_else(|| {
            format!(
                "the file has more than {MAX_FILE_BYTES} bytes ({}), the limit read from one \
                 image file",
                human(u128::from(MAX_FILE_BYTES))
            )
        })
}

/// Decodes one image file's bytes (JPEG or PNG, by content) into a 32×32 CIFAR row.
pub fn decode(bytes: &[u8], scratch: &mut Vec<f32>) -> std::result::Result<Vec<u8>, String> {
    decode_sized(bytes, SIDE, scratch)
}

/// Decodes one image file's bytes (JPEG or PNG, by content) into a `side`×`side` CIFAR
/// row (`3·side²` bytes), refusing (before decoding) an image over [`MAX_IMAGE_PIXELS`]
/// or whose decoding would not fit in the decoders' share of the memory limit.
pub fn decode_sized(
    bytes: &[u8],
    side: usize,
    scratch: &mut Vec<f32>,
) -> std::result::Result<Vec<u8>, String> {
    let budget = Budget::from_limit();
    decode_within(bytes, side, scratch, budget.total, &budget.what)
}

/// [`decode_sized`] with the memory a decode may take given: at most `max_bytes`
/// ([`Declared::bytes`]), `what` saying that limit in the refusal.
pub fn decode_within(
    bytes: &[u8],
    side: usize,
    scratch: &mut Vec<f32>,
    max_bytes: u128,
    what: &str,
) -> std::result::Result<Vec<u8>, String> {
    decode_with(bytes, side, scratch, &mut |d| {
        Ok(check_declared(d, max_bytes, what)?)
    })
    .map_err(|r| match r {
        Reject::Bad(reason) => reason,
        Reject::Busy(_) => "the decoders' memory is busy".into(),
    })
}

/// What a file's header must pass before it is decoded.
type Admit<'a> = dyn FnMut(&Declared) -> std::result::Result<(), Reject> + 'a;

/// Decodes `bytes` once `admit` has passed what their header declares.
fn decode_with(
    bytes: &[u8],
    side: usize,
    scratch: &mut Vec<f32>,
    admit: &mut Admit<'_>,
) -> std::result::Result<Vec<u8>, Reject> {
    if bytes.is_empty() {
        return Err("empty file (0 bytes)".into());
    }
    // A decoder that panics on a hostile file rejects that file, not the run.
    let rgb = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if bytes.starts_with(&[0xff, 0xd8]) {
            decode_jpeg(bytes, side, admit)
        } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            decode_png(bytes, side, admit)
        } else {
            Err("not a JPEG or PNG file (unknown signature)".into())
        }
    }))
    .unwrap_or_else(|_| Err("the decoder failed on this file".into()))?;
    let (h, w, interleaved) = rgb;
    if h == 0 || w == 0 {
        return Err(format!("image of zero size ({w}x{h})").into());
    }
    Ok(to_cifar(h, w, side, &interleaved, scratch)?)
}

/// Height, width and interleaved RGB bytes.
type Rgb = (usize, usize, Vec<u8>);

fn decode_jpeg(
    bytes: &[u8],
    side: usize,
    admit: &mut Admit<'_>,
) -> std::result::Result<Rgb, Reject> {
    use zune_jpeg::zune_core::bytestream::ZCursor;
    use zune_jpeg::zune_core::colorspace::ColorSpace;
    use zune_jpeg::zune_core::options::DecoderOptions;
    let options = DecoderOptions::default()
        .jpeg_set_out_colorspace(ColorSpace::RGB)
        .set_strict_mode(true)
        .set_max_width(1 << 14)
        .set_max_height(1 << 14);
    let mut d = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    d.decode_headers().map_err(|e| format!("bad JPEG: {e}"))?;
    let (w, h) = d.dimensions().ok_or("bad JPEG: no header")?;
    if w == 0 || h == 0 {
        return Err(format!("image of zero size ({w}x{h})").into());
    }
    let components = d.input_colorspace().map_or(4, |c| c.num_components());
    admit(&Declared::jpeg(w, h, components, bytes.len(), side))?;
    let px = d.decode().map_err(|e| format!("bad JPEG: {e}"))?;
    if px.len() != w * h * 3 {
        return Err(format!("bad JPEG: {} bytes decoded for {w}x{h} RGB", px.len()).into());
    }
    Ok((h, w, px))
}

fn decode_png(
    bytes: &[u8],
    side: usize,
    admit: &mut Admit<'_>,
) -> std::result::Result<Rgb, Reject> {
    let mut d = png::Decoder::new(std::io::Cursor::new(bytes));
    d.set_transformations(png::Transformations::normalize_to_color8());
    let mut r = d.read_info().map_err(|e| format!("bad PNG: {e}"))?;
    let (w, h) = (r.info().width as usize, r.info().height as usize);
    let size = r
        .output_buffer_size()
        .ok_or_else(|| format!("bad PNG: {w}x{h} is too large"))?;
    admit(&Declared::png(w, h, size as u128, bytes.len(), side))?;
    let mut buf = vec![0; size];
    let info = r
        .next_frame(&mut buf)
        .map_err(|e| format!("bad PNG: {e}"))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let channels = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => return Err("bad PNG: palette not expanded".into()),
    };
    let line = info.line_size;
    let mut px = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        let row = buf
            .get(y * line..y * line + w * channels)
            .ok_or("bad PNG: short image data")?;
        for p in row.chunks_exact(channels) {
            match channels {
                1 | 2 => px.extend_from_slice(&[p[0], p[0], p[0]]),
                _ => px.extend_from_slice(&p[..3]),
            }
        }
    }
    Ok((h, w, px))
}

/// Interleaved RGB of `h`×`w` into a CIFAR row: resized to `side`×`side` (bilinear,
/// half-pixel centres, rounded to the nearest byte) unless it is already that size, then
/// planar.
fn to_cifar(
    h: usize,
    w: usize,
    side: usize,
    rgb: &[u8],
    scratch: &mut Vec<f32>,
) -> std::result::Result<Vec<u8>, String> {
    let plane = h * w;
    let mut planar = vec![0u8; 3 * plane];
    for (i, p) in rgb.chunks_exact(3).enumerate() {
        planar[i] = p[0];
        planar[plane + i] = p[1];
        planar[2 * plane + i] = p[2];
    }
    if h == side && w == side {
        return Ok(planar);
    }
    let plan = Resize::rect(h, w, side, side).map_err(|e| e.to_string())?;
    let mut out = vec![0u8; image_bytes(side)];
    plan.apply_with(&planar, &mut out, scratch)
        .map_err(|e| e.to_string())?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grey_and_rgba_pngs_become_rgb_and_odd_sizes_are_resized() {
        let mut grey = Vec::new();
        {
            let mut e = png::Encoder::new(&mut grey, 5, 3);
            e.set_color(png::ColorType::Grayscale);
            let mut w = e.write_header().unwrap();
            w.write_image_data(&(0..15).map(|v| v * 10).collect::<Vec<u8>>())
                .unwrap();
        }
        let mut scratch = Vec::new();
        let (h, w, px) =
            decode_png(&grey, SIDE, &mut |_| Ok(())).unwrap_or_else(|_| panic!("the PNG decodes"));
        assert_eq!((h, w), (3, 5));
        assert_eq!(&px[..6], &[0, 0, 0, 10, 10, 10]);
        let row = decode(&grey, &mut scratch).unwrap();
        assert_eq!(row.len(), crate::dataset::IMAGE_BYTES);
        // Grey in, grey out: the three planes are equal.
        assert_eq!(row[..1024], row[1024..2048]);
        assert_eq!(row[..1024], row[2048..]);

        let mut rgba = Vec::new();
        {
            let mut e = png::Encoder::new(&mut rgba, 32, 32);
            e.set_color(png::ColorType::Rgba);
            let mut w = e.write_header().unwrap();
            let data: Vec<u8> = (0..32 * 32)
                .flat_map(|i| [(i % 256) as u8, 7, 200, 0])
                .collect();
            w.write_image_data(&data).unwrap();
        }
        let row = decode(&rgba, &mut scratch).unwrap();
        // 32x32 stays as it is: planar, alpha dropped.
        assert_eq!(row[5], 5);
        assert_eq!(row[1024 + 5], 7);
        assert_eq!(row[2048 + 5], 200);
    }

    #[test]
    fn bad_files_are_errors_not_panics() {
        let mut scratch = Vec::new();
        assert!(decode(b"", &mut scratch).unwrap_err().contains("0 bytes"));
        assert!(decode(b"hello", &mut scratch)
            .unwrap_err()
            .contains("not a JPEG or PNG"));
        let mut png_bytes = Vec::new();
        {
            let mut e = png::Encoder::new(&mut png_bytes, 8, 8);
            e.set_color(png::ColorType::Rgb);
            let mut w = e.write_header().unwrap();
            w.write_image_data(&[9u8; 8 * 8 * 3]).unwrap();
        }
        let cut = &png_bytes[..png_bytes.len() - 20];
        assert!(decode(cut, &mut scratch).is_err());
        assert!(decode(&[0xff, 0xd8, 0xff, 0xe0, 0, 16], &mut scratch).is_err());
    }

    use crate::testing::{header_only_png, jpeg_declaring};

    const BASELINE_JPEG: &[u8] = include_bytes!("../../tests/ref/images/baseline.jpg");
    const PROGRESSIVE_JPEG: &[u8] = include_bytes!("../../tests/ref/images/progressive.jpg");
    const GREY_JPEG: &[u8] = include_bytes!("../../tests/ref/images/grey.jpg");

    #[test]
    fn jpegs_decode_baseline_progressive_and_grey() {
        let mut scratch = Vec::new();
        for (jpeg, w, h) in [
            (BASELINE_JPEG, 20, 14),
            (PROGRESSIVE_JPEG, 13, 9),
            (GREY_JPEG, 11, 8),
        ] {
            let (dh, dw, px) = decode_jpeg(jpeg, SIDE, &mut |d| {
                assert_eq!((d.format, d.width, d.height), ("JPEG", w, h));
                Ok(())
            })
            .unwrap_or_else(|_| panic!("{w}x{h} decodes"));
            assert_eq!((dw, dh, px.len()), (w, h, w * h * 3));
            assert_eq!(decode(jpeg, &mut scratch).unwrap().len(), 3 * SIDE * SIDE);
        }
    }

    #[test]
    fn oversized_headers_are_refused_before_decoding() {
        let mut scratch = Vec::new();
        // Over the pixel cap whatever the memory: refused by the header, not for the
        // missing image data.
        let e = decode(&header_only_png(12000, 12000), &mut scratch).unwrap_err();
        assert!(
            e.contains("PNG header declares 12000x12000 pixels (144000000)")
                && e.contains("over the limit of 67108864 pixels (8192x8192)")
                && e.contains("refused before decoding"),
            "{e}"
        );
        let e = decode(&jpeg_declaring(BASELINE_JPEG, 16384, 16384), &mut scratch).unwrap_err();
        assert!(
            e.contains("JPEG header declares 16384x16384 pixels (268435456)")
                && e.contains("8192x8192"),
            "{e}"
        );
        // Within the pixel cap but over the memory given: refused by the memory, with it.
        let png = header_only_png(3000, 3000);
        let e = decode_within(&png, SIDE, &mut scratch, 64 << 20, "64.0 MiB (test)").unwrap_err();
        assert!(
            e.contains("PNG header declares 3000x3000 pixels: decoding it needs about")
                && e.contains("over 64.0 MiB (test); refused before decoding"),
            "{e}"
        );
        // With more memory the same file gets as far as its (missing) image data.
        let e = decode_within(&png, SIDE, &mut scratch, 1 << 30, "1 GiB").unwrap_err();
        assert!(e.starts_with("bad PNG"), "{e}");
        let jpeg = jpeg_declaring(PROGRESSIVE_JPEG, 4000, 3000);
        let e = decode_within(&jpeg, SIDE, &mut scratch, 64 << 20, "64.0 MiB").unwrap_err();
        assert!(
            e.contains("JPEG header declares 4000x3000 pixels: decoding"),
            "{e}"
        );
        // What a decode is counted to take: at least its output and two copies.
        let d = Declared::png(12000, 12000, 3 * 144_000_000, 419_000, SIDE);
        assert!(
            d.bytes > 9 * 144_000_000 && d.bytes < 10 * 144_000_000,
            "{d:?}"
        );
        let d = Declared::jpeg(16384, 16384, 3, 1000, SIDE);
        assert!(d.bytes >= 12 * 16384 * 16384, "{d:?}");
    }

    #[test]
    fn a_folder_keeps_its_images_and_names_the_oversized_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        for (class, value) in [("a", 10u8), ("b", 200)] {
            let dir = root.join("train").join(class);
            fs::create_dir_all(&dir).unwrap();
            for i in 0..3 {
                let mut bytes = Vec::new();
                {
                    let mut e = png::Encoder::new(&mut bytes, 8, 8);
                    e.set_color(png::ColorType::Rgb);
                    let mut w = e.write_header().unwrap();
                    w.write_image_data(&[value + i; 8 * 8 * 3]).unwrap();
                }
                fs::write(dir.join(format!("{i}.png")), bytes).unwrap();
            }
        }
        let a = root.join("train/a");
        fs::write(a.join("huge.png"), header_only_png(12000, 12000)).unwrap();
        fs::write(
            a.join("huge.jpg"),
            jpeg_declaring(BASELINE_JPEG, 16384, 16384),
        )
        .unwrap();
        fs::write(a.join("photo.jpg"), BASELINE_JPEG).unwrap();
        let classes = classes(root).unwrap();
        let loaded = load(root, Split::Train, &classes, SIDE).unwrap();
        assert_eq!(loaded.images.len(), 7);
        assert_eq!(loaded.files.len(), 7);
        let mut rejected: Vec<_> = loaded
            .rejected
            .iter()
            .map(|(p, why)| (p.file_name().unwrap().to_str().unwrap(), why.as_str()))
            .collect();
        rejected.sort();
        assert_eq!(rejected.len(), 2, "{rejected:?}");
        assert_eq!(rejected[0].0, "huge.jpg");
        assert!(rejected[0].1.contains("16384x16384"), "{rejected:?}");
        assert_eq!(rejected[1].0, "huge.png");
        assert!(rejected[1].1.contains("12000x12000"), "{rejected:?}");
    }

    #[test]
    fn a_thread_waits_for_the_memory_its_file_needs() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("x.jpg");
        fs::write(&path, PROGRESSIVE_JPEG).unwrap();
        let need = Declared::jpeg(13, 9, 3, PROGRESSIVE_JPEG.len(), SIDE).bytes;
        // All but a little of the budget is held: the file's bytes fit, its decoding not.
        let budget = Budget::new(need + 100, "test".into());
        let held = budget.reserve(need + 100 - PROGRESSIVE_JPEG.len() as u128);
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let t = s.spawn(|| {
                let row = load_file(&path, SIDE, &mut Vec::new(), &budget);
                done.store(true, std::sync::atomic::Ordering::SeqCst);
                row
            });
            std::thread::sleep(std::time::Duration::from_millis(200));
            assert!(!done.load(std::sync::atomic::Ordering::SeqCst), "it waits");
            drop(held);
            assert_eq!(t.join().unwrap().unwrap().len(), 3 * SIDE * SIDE);
        });
        assert_eq!(*budget.used.lock().unwrap(), 0);
        // A file whose decoding needs more than the whole budget is refused, not waited for.
        let small = Budget::new(need - 1, "a small budget".into());
        let e = load_file(&path, SIDE, &mut Vec::new(), &small).unwrap_err();
        assert!(e.contains("over a small budget"), "{e}");
        // So is one over the byte cap, unread.
        let big = tmp.path().join("big.png");
        let f = fs::File::create(&big).unwrap();
        f.set_len(MAX_FILE_BYTES + 1).unwrap();
        let e = load_file(&big, SIDE, &mut Vec::new(), &budget).unwrap_err();
        assert!(
            e.contains("67108865 bytes, over the limit of 67108864 (64.0 MiB)"),
            "{e}"
        );
    }
}
