//! Image folders: the layout torchvision's `ImageFolder` and Keras's
//! `image_dataset_from_directory` read, `DIR/train/CLASS/*.{jpg,jpeg,png}` and optionally
//! `DIR/test/CLASS/*`.
//!
//! The classes are the folder names of `train/` in sorted (byte) order, label 0 first. Each
//! image is decoded (JPEG with zune-jpeg, PNG with png; grey, grey + alpha, palette and
//! RGBA all become RGB, alpha dropped, 16-bit samples cut to 8), resized to 32×32 with the
//! pipeline's own bilinear kernel ([`crate::pixels::Resize`], half-pixel
//! centres) unless it already is, and laid out as a CIFAR row (red plane, green, blue).
//! Files are decoded on every core. A file that is not an image, is truncated or has zero
//! size is rejected: named with its path and reason, counted, and the rest go on. The
//! training split comes out in a shuffled order, fixed by [`SHUFFLE_SEED`], so that its
//! batches mix the classes; the test split stays in class, then file-name order.

use std::fs;
use std::path::{Path, PathBuf};

use super::{image_bytes, Images, Split, MAX_CLASSES, SIDE};
use crate::error::{Error, Result};
use crate::pixels::Resize;
use crate::rng::SplitMix;

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

/// Decodes every file of `work` on all cores, in order.
fn decode_all(work: &[(u16, PathBuf)], side: usize) -> Vec<std::result::Result<Vec<u8>, String>> {
    let threads = std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(1)
        .clamp(1, 16);
    let chunk = work.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = work
            .chunks(chunk)
            .map(|part| {
                let files = part.len();
                let handle = s.spawn(move || {
                    let mut scratch = Vec::new();
                    part.iter()
                        .map(|(_, path)| {
                            fs::read(path)
                                .map_err(|e| format!("cannot read: {e}"))
                                .and_then(|bytes| decode_sized(&bytes, side, &mut scratch))
                        })
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

/// Decodes one image file's bytes (JPEG or PNG, by content) into a 32×32 CIFAR row.
pub fn decode(bytes: &[u8], scratch: &mut Vec<f32>) -> std::result::Result<Vec<u8>, String> {
    decode_sized(bytes, SIDE, scratch)
}

/// Decodes one image file's bytes (JPEG or PNG, by content) into a `side`×`side` CIFAR
/// row (`3·side²` bytes).
pub fn decode_sized(
    bytes: &[u8],
    side: usize,
    scratch: &mut Vec<f32>,
) -> std::result::Result<Vec<u8>, String> {
    if bytes.is_empty() {
        return Err("empty file (0 bytes)".into());
    }
    // A decoder that panics on a hostile file rejects that file, not the run.
    let rgb = std::panic::catch_unwind(|| {
        if bytes.starts_with(&[0xff, 0xd8]) {
            decode_jpeg(bytes)
        } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            decode_png(bytes)
        } else {
            Err("not a JPEG or PNG file (unknown signature)".into())
        }
    })
    .unwrap_or_else(|_| Err("the decoder failed on this file".into()))?;
    let (h, w, interleaved) = rgb;
    if h == 0 || w == 0 {
        return Err(format!("image of zero size ({w}x{h})"));
    }
    to_cifar(h, w, side, &interleaved, scratch)
}

/// Height, width and interleaved RGB bytes.
type Rgb = (usize, usize, Vec<u8>);

fn decode_jpeg(bytes: &[u8]) -> std::result::Result<Rgb, String> {
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
    let info = d.info().ok_or("bad JPEG: no header")?;
    let (w, h) = (usize::from(info.width), usize::from(info.height));
    if w == 0 || h == 0 {
        return Err(format!("image of zero size ({w}x{h})"));
    }
    let px = d.decode().map_err(|e| format!("bad JPEG: {e}"))?;
    if px.len() != w * h * 3 {
        return Err(format!(
            "bad JPEG: {} bytes decoded for {w}x{h} RGB",
            px.len()
        ));
    }
    Ok((h, w, px))
}

fn decode_png(bytes: &[u8]) -> std::result::Result<Rgb, String> {
    let mut d = png::Decoder::new(std::io::Cursor::new(bytes));
    d.set_transformations(png::Transformations::normalize_to_color8());
    let mut r = d.read_info().map_err(|e| format!("bad PNG: {e}"))?;
    let size = r
        .output_buffer_size()
        .ok_or("bad PNG: the image is too large")?;
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
        let (h, w, px) = decode_png(&grey).unwrap();
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
}
