//! PNG grids of CIFAR images: to look at what a model has learnt (say, the images that
//! fall in each k-means cluster).
//!
//! [`image_grid`] lays images out in memory, [`write_png`] writes RGB pixels as a PNG
//! file (atomically), and [`write_cluster_grids`] does both for a set of clusters.

use std::path::{Path, PathBuf};

use super::create_dir;
use crate::error::{Error, Result};
use crate::store::write_atomic;

/// Side of a CIFAR image, in pixels.
const SIDE: usize = 32;

/// Pixels in one colour plane of a CIFAR image.
const PLANE: usize = SIDE * SIDE;

/// Bytes of a CIFAR image: three planes.
pub const IMAGE_BYTES: usize = 3 * PLANE;

/// The light grey of the borders between images.
pub const BORDER_GREY: u8 = 0xE0;

/// Columns of the grids [`write_cluster_grids`] draws.
const CLUSTER_COLS: usize = 10;

/// Upscaling of the images in [`write_cluster_grids`].
const CLUSTER_SCALE: usize = 2;

/// Border between the images in [`write_cluster_grids`].
const CLUSTER_PAD: usize = 2;

/// Writes `rgb` (`width × height` pixels, row-major, 3 bytes per pixel: R, G, B) to
/// `path` as an 8-bit RGB PNG, atomically (a temporary file in the same folder renamed
/// over `path`).
///
/// Errors if `width` or `height` is 0, if `rgb` is not `width · height · 3` bytes long,
/// or on I/O; each error names `path`.
pub fn write_png(path: &Path, width: u32, height: u32, rgb: &[u8]) -> Result<()> {
    write_png_titled(path, width, height, rgb, None)
}

/// [`write_png`], with an optional title stored as the PNG's `Title` text chunk (UTF-8,
/// `iTXt`).
fn write_png_titled(
    path: &Path,
    width: u32,
    height: u32,
    rgb: &[u8],
    title: Option<&str>,
) -> Result<()> {
    let bytes = encode_png(width, height, rgb, title).map_err(|reason| {
        Error::usage(format!("{}: cannot write PNG: {reason}", path.display()))
    })?;
    write_atomic(path, &bytes)
}

/// The PNG file for `rgb` (see [`write_png`]); errors are reasons.
pub(crate) fn encode_png(
    width: u32,
    height: u32,
    rgb: &[u8],
    title: Option<&str>,
) -> std::result::Result<Vec<u8>, String> {
    if width == 0 || height == 0 {
        return Err(format!("an image must not be empty ({width} × {height})"));
    }
    let want = u64::from(width) * u64::from(height) * 3;
    if rgb.len() as u64 != want {
        return Err(format!(
            "{width} × {height} RGB pixels are {want} bytes, not {}",
            rgb.len()
        ));
    }
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    if let Some(t) = title {
        enc.add_itxt_chunk("Title".to_string(), t.to_string())
            .map_err(|e| e.to_string())?;
    }
    let mut writer = enc.write_header().map_err(|e| e.to_string())?;
    writer.write_image_data(rgb).map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())?;
    Ok(out)
}

/// Lays out CIFAR images as a grid: returns `(width, height, rgb)`, the pixels
/// row-major and interleaved (R, G, B), ready for [`write_png`].
///
/// Each image is [`IMAGE_BYTES`] bytes in CIFAR layout: 1024 bytes of red, then 1024
/// of green, then 1024 of blue, each a 32 × 32 plane in row-major order. Image `i`
/// goes to row `i / cols`, column `i % cols`, upscaled `scale` times (each pixel a
/// `scale × scale` square). `pad` pixels of light grey ([`BORDER_GREY`]) separate the
/// images and surround the grid, so with `c = min(cols, n)` columns and
/// `r = ⌈n / cols⌉` rows the grid is `c·32·scale + (c + 1)·pad` pixels wide and
/// `r·32·scale + (r + 1)·pad` high. Grid cells after the last image stay grey.
///
/// `cols` and `scale` of 0 are taken as 1. No images give `(0, 0, [])`. An image
/// shorter than [`IMAGE_BYTES`] is drawn black where its bytes are missing; bytes past
/// [`IMAGE_BYTES`] are ignored.
pub fn image_grid(images: &[&[u8]], cols: usize, scale: usize, pad: usize) -> (u32, u32, Vec<u8>) {
    let n = images.len();
    if n == 0 {
        return (0, 0, Vec::new());
    }
    let (cols, scale) = (cols.max(1), scale.max(1));
    let ncols = cols.min(n);
    let nrows = n.div_ceil(cols);
    let cell = SIDE * scale;
    let width = ncols * cell + (ncols + 1) * pad;
    let height = nrows * cell + (nrows + 1) * pad;
    let mut rgb = vec![BORDER_GREY; width * height * 3];
    for (i, img) in images.iter().enumerate() {
        let (x0, y0) = (
            pad + (i % cols) * (cell + pad),
            pad + (i / cols) * (cell + pad),
        );
        for y in 0..SIDE {
            for x in 0..SIDE {
                let at = |plane: usize| img.get(plane * PLANE + y * SIDE + x).copied().unwrap_or(0);
                let px = [at(0), at(1), at(2)];
                for dy in 0..scale {
                    let row = (y0 + y * scale + dy) * width;
                    let from = (row + x0 + x * scale) * 3;
                    for chunk in rgb[from..from + 3 * scale].chunks_exact_mut(3) {
                        chunk.copy_from_slice(&px);
                    }
                }
            }
        }
    }
    let to_u32 = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    (to_u32(width), to_u32(height), rgb)
}

/// Writes one PNG per non-empty cluster into `dir` (created if needed):
/// `cluster-{i:02}.png` for cluster `i`, a grid (10 images wide, each upscaled twice,
/// 2-pixel grey borders; see [`image_grid`]) of its first `max_per_cluster` images.
/// `clusters[i]` holds cluster `i`'s images, each [`IMAGE_BYTES`] bytes in CIFAR layout.
///
/// `labels[i]`, when present, is a title for cluster `i` (its majority class, say): it
/// is not drawn, only stored as the PNG's `Title` text chunk. Clusters without images
/// (or every cluster if `max_per_cluster` is 0) get no file. Returns the paths written,
/// in cluster order.
pub fn write_cluster_grids(
    dir: &Path,
    clusters: &[Vec<Vec<u8>>],
    labels: &[String],
    max_per_cluster: usize,
) -> Result<Vec<PathBuf>> {
    create_dir(dir)?;
    let mut paths = Vec::new();
    for (i, images) in clusters.iter().enumerate() {
        let shown: Vec<&[u8]> = images
            .iter()
            .take(max_per_cluster)
            .map(Vec::as_slice)
            .collect();
        if shown.is_empty() {
            continue;
        }
        let (w, h, rgb) = image_grid(&shown, CLUSTER_COLS, CLUSTER_SCALE, CLUSTER_PAD);
        let path = dir.join(format!("cluster-{i:02}.png"));
        write_png_titled(&path, w, h, &rgb, labels.get(i).map(String::as_str))?;
        paths.push(path);
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::io::Cursor;

    /// An image whose every pixel is distinct: R = i + x, G = y, B = 3·x + y (mod 256).
    fn image(i: u8) -> Vec<u8> {
        let mut v = vec![0u8; IMAGE_BYTES];
        for y in 0..SIDE {
            for x in 0..SIDE {
                let p = y * SIDE + x;
                v[p] = i.wrapping_add(x as u8);
                v[PLANE + p] = y as u8;
                v[2 * PLANE + p] = (3 * x + y) as u8;
            }
        }
        v
    }

    /// Pixel (x, y) of an interleaved RGB buffer `width` wide.
    fn pixel(rgb: &[u8], width: u32, x: usize, y: usize) -> [u8; 3] {
        let at = (y * width as usize + x) * 3;
        [rgb[at], rgb[at + 1], rgb[at + 2]]
    }

    /// Decodes a PNG file: (width, height, colour type, bit depth, pixels, title).
    fn decode(
        path: &Path,
    ) -> (
        u32,
        u32,
        png::ColorType,
        png::BitDepth,
        Vec<u8>,
        Option<String>,
    ) {
        let bytes = fs::read(path).unwrap();
        let mut reader = png::Decoder::new(Cursor::new(bytes)).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        buf.truncate(info.buffer_size());
        let title = reader
            .info()
            .utf8_text
            .iter()
            .find(|t| t.keyword == "Title")
            .map(|t| t.get_text().unwrap());
        (
            info.width,
            info.height,
            info.color_type,
            info.bit_depth,
            buf,
            title,
        )
    }

    #[test]
    fn grid_puts_each_pixel_in_its_place() {
        let imgs: Vec<Vec<u8>> = (0..5).map(|i| image(10 * i)).collect();
        let refs: Vec<&[u8]> = imgs.iter().map(Vec::as_slice).collect();
        let (cols, scale, pad) = (3, 2, 1);
        let (w, h, rgb) = image_grid(&refs, cols, scale, pad);
        assert_eq!((w, h), (3 * 64 + 4, 2 * 64 + 3));
        assert_eq!(rgb.len(), (w * h * 3) as usize);
        for (i, img) in imgs.iter().enumerate() {
            let (x0, y0) = (pad + (i % cols) * 65, pad + (i / cols) * 65);
            for (x, y) in [(0, 0), (31, 0), (0, 31), (31, 31), (5, 17), (20, 3)] {
                let p = y * SIDE + x;
                let want = [img[p], img[PLANE + p], img[2 * PLANE + p]];
                assert_eq!(want, [10 * i as u8 + x as u8, y as u8, (3 * x + y) as u8]);
                for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                    let got = pixel(&rgb, w, x0 + 2 * x + dx, y0 + 2 * y + dy);
                    assert_eq!(got, want, "image {i} pixel ({x}, {y}) + ({dx}, {dy})");
                }
            }
        }
        // Borders, the gap between images and the empty sixth cell are grey.
        let grey = [BORDER_GREY; 3];
        for (x, y) in [
            (0, 0),
            (65, 10),
            (10, 65),
            (195, 130),
            (2 * 65 + 1, 65 + 1),
            (195, 100),
        ] {
            assert_eq!(pixel(&rgb, w, x, y), grey, "({x}, {y})");
        }
        // The exact image, scale 1 and no padding, is the planar → interleaved copy.
        let (w, h, one) = image_grid(&refs[..1], 10, 1, 0);
        assert_eq!((w, h), (32, 32));
        let want: Vec<u8> = (0..PLANE)
            .flat_map(|p| [imgs[0][p], imgs[0][PLANE + p], imgs[0][2 * PLANE + p]])
            .collect();
        assert_eq!(one, want);
    }

    #[test]
    fn grid_edge_cases_do_not_panic() {
        assert_eq!(image_grid(&[], 10, 2, 2), (0, 0, Vec::new()));
        let short = [7u8; 10];
        let (w, h, rgb) = image_grid(&[&short], 0, 0, 0);
        assert_eq!((w, h), (32, 32));
        assert_eq!(pixel(&rgb, w, 9, 0), [7, 0, 0]);
        assert_eq!(pixel(&rgb, w, 10, 0), [0, 0, 0]);
    }

    #[test]
    fn write_png_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.png");
        let imgs: Vec<Vec<u8>> = (0..12).map(|i| image(i * 20)).collect();
        let refs: Vec<&[u8]> = imgs.iter().map(Vec::as_slice).collect();
        let (w, h, rgb) = image_grid(&refs, 5, 3, 2);
        write_png(&path, w, h, &rgb).unwrap();
        let (dw, dh, ct, bd, px, title) = decode(&path);
        assert_eq!(
            (dw, dh, ct, bd),
            (w, h, png::ColorType::Rgb, png::BitDepth::Eight)
        );
        assert_eq!(px, rgb);
        assert_eq!(title, None);
        // Overwrites, leaving no temporary file.
        write_png(&path, 1, 1, &[1, 2, 3]).unwrap();
        assert_eq!(decode(&path).4, [1, 2, 3]);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn write_png_rejects_bad_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.png");
        for (w, h, len) in [
            (2, 2, 11),
            (2, 2, 13),
            (2, 2, 0),
            (0, 2, 0),
            (2, 0, 0),
            (1, 1, 4),
        ] {
            let e = write_png(&path, w, h, &vec![0; len]).unwrap_err();
            assert!(e.to_string().contains("bad.png"), "{e}");
        }
        assert!(!path.exists());
        let e = write_png(&dir.path().join("no/such/dir.png"), 1, 1, &[0, 0, 0]).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
    }

    #[test]
    fn cluster_grids_one_file_per_non_empty_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("grids");
        let clusters = vec![
            (0..25).map(|i| image(i as u8)).collect::<Vec<_>>(),
            Vec::new(),
            vec![image(200)],
        ];
        let labels = vec!["cat".to_string(), "dog".to_string(), "émeu".to_string()];
        let paths = write_cluster_grids(&out, &clusters, &labels, 12).unwrap();
        assert_eq!(
            paths,
            [out.join("cluster-00.png"), out.join("cluster-02.png")]
        );
        let (w, h, _, _, px, title) = decode(&paths[0]);
        // 12 images, 10 wide, 64-pixel cells, 2-pixel borders.
        assert_eq!((w, h), (10 * 64 + 11 * 2, 2 * 64 + 3 * 2));
        assert_eq!(title.as_deref(), Some("cat"));
        // Image 11 (row 1, column 1), pixel (4, 6).
        let p = 6 * SIDE + 4;
        let want = [
            clusters[0][11][p],
            clusters[0][11][PLANE + p],
            clusters[0][11][2 * PLANE + p],
        ];
        assert_eq!(pixel(&px, w, 2 + 66 + 8, 2 + 66 + 12), want);
        let (w, h, _, _, _, title) = decode(&paths[1]);
        assert_eq!((w, h), (64 + 4, 64 + 4));
        assert_eq!(title.as_deref(), Some("émeu"));
        // Fewer labels than clusters is fine; no images per cluster writes nothing.
        assert_eq!(
            write_cluster_grids(&out, &clusters, &[], 1).unwrap().len(),
            2
        );
        assert!(write_cluster_grids(&out, &clusters, &labels, 0)
            .unwrap()
            .is_empty());
    }
}
