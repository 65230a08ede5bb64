//! The feature cache: a dataset's features, computed once and kept as Parquet, as the
//! original cached its ResNet50 features.
//!
//! ```text
//! F/extractor/                  the extractor (extractor.safetensors + extractor.json)
//! F/train/part-FIRST-LAST.parquet   images FIRST..LAST of the train split (with flipped copies)
//! F/test/part-FIRST-LAST.parquet    the test split
//! F/cache.json                  what is complete: the splits, their image counts, the width
//! ```
//!
//! Every part holds `batch, row, label, flipped, features FixedSizeList<Float32, D>` for a
//! range of images (`batch`/`row`: the image's place in the stream at `batch_size`), and is
//! written under a temporary name and renamed when complete. A job that stops part-way is
//! resumed by running it again: parts already there are kept, the rest computed with the
//! same extractor (the one in `F/extractor/`).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{
    ArrayRef, BooleanArray, FixedSizeListArray, Float32Array, UInt16Array, UInt32Array, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};

use super::Extractor;
use crate::dataset::{self, DataSpec, Images, Split};
use crate::error::{Error, Result};
use crate::store::write_parquet_file;

/// The file of a cache folder that records the side its images were encoded at (written
/// when a job starts, so that a resumed job encodes the rest at the same side).
pub const SIDE_FILE: &str = "image-size";

/// The side a cache folder's job encodes images at, if one has started there.
pub fn recorded_side(dir: &Path) -> Result<Option<usize>> {
    let path = dir.join(SIDE_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => {
            text.trim().parse::<usize>().map(Some).map_err(|_| {
                Error::format(&path, 0, format!("not an image side: {:?}", text.trim()))
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Records the side a cache folder's job encodes images at.
pub fn record_side(dir: &Path, side: usize) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    crate::store::write_atomic(&dir.join(SIDE_FILE), format!("{side}\n").as_bytes())
}

/// The extractor's folder inside a cache.
pub const EXTRACTOR_DIR: &str = "extractor";
/// The cache's record of what is complete.
pub const MANIFEST: &str = "cache.json";

/// The schema of a cache part for features of `width`.
pub fn schema(width: usize) -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("batch", DataType::UInt64, false),
        Field::new("row", DataType::UInt32, false),
        Field::new("label", DataType::UInt16, false),
        Field::new("flipped", DataType::Boolean, false),
        Field::new("features", features_type(width), false),
    ]))
}

/// `FixedSizeList<Float32, width>`.
pub fn features_type(width: usize) -> DataType {
    DataType::FixedSizeList(
        Arc::new(Field::new("item", DataType::Float32, false)),
        width as i32,
    )
}

/// What `cache.json` records.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Manifest {
    /// The extractor's kind.
    pub extractor: String,
    /// Width of the features.
    pub width: usize,
    /// The data the features were computed from.
    pub data: String,
    /// Complete splits: name, images, whether flipped copies were added.
    pub splits: Vec<SplitEntry>,
    /// The data's class names, in label order (empty in caches written before they were
    /// recorded).
    #[serde(default)]
    pub classes: Vec<String>,
}

/// One complete split of a cache.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SplitEntry {
    /// `train` or `test`.
    pub split: String,
    /// Images (flipped copies not counted).
    pub images: usize,
    /// Whether each image is followed by its flipped copy.
    pub flipped: bool,
}

impl Manifest {
    /// Reads `F/cache.json`; `None` where there is none yet.
    pub fn read(dir: &Path) -> Result<Option<Manifest>> {
        let path = dir.join(MANIFEST);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::format(&path, 0, format!("invalid cache record: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    pub(crate) fn write(&self, dir: &Path) -> Result<()> {
        let mut json = serde_json::to_vec_pretty(self).map_err(|e| Error::usage(e.to_string()))?;
        json.push(b'\n');
        crate::store::write_atomic(&dir.join(MANIFEST), &json)
    }
}

/// Called after each part with (split, images done, images in the split).
pub type OnPart = Box<dyn FnMut(&str, usize, usize) + Send>;

/// What a feature job does.
pub struct CacheOptions {
    /// The data.
    pub data: DataSpec,
    /// The cache folder.
    pub out: PathBuf,
    /// Add the flipped copy of every training image.
    pub flip: bool,
    /// Images per part.
    pub rows_per_part: usize,
    /// The stream batch size the `batch`/`row` columns number images by.
    pub batch_size: usize,
    /// Called after each part with (split, images done, images in the split).
    pub on_part: Option<OnPart>,
    /// The side the images are resized to before they are encoded (`--image-size`; a
    /// patch extractor's must be the side it was fitted on).
    pub image_side: usize,
}

/// What a feature job did.
#[derive(Clone, Debug, Default)]
pub struct CacheSummary {
    /// Parts written by this job.
    pub parts_written: usize,
    /// Parts found complete and kept.
    pub parts_kept: usize,
    /// Images encoded by this job.
    pub images_encoded: usize,
    /// Seconds spent encoding.
    pub encode_seconds: f64,
    /// Width of the features.
    pub width: usize,
}

pub(crate) fn part_name(first: usize, last: usize) -> String {
    format!("part-{first:06}-{last:06}.parquet")
}

/// Writes the features of `data`'s train and test splits under `out` with `extractor`
/// (already saved in `out/extractor/` by the caller, or loaded from there).
pub fn write_cache(extractor: &Extractor, opts: &mut CacheOptions) -> Result<CacheSummary> {
    let mut summary = CacheSummary {
        width: extractor.width(),
        ..CacheSummary::default()
    };
    let mut manifest = Manifest {
        extractor: extractor.kind().into(),
        width: extractor.width(),
        data: opts.data.to_string(),
        splits: Vec::new(),
        classes: crate::dataset::class_names(&opts.data)?,
    };
    for split in Split::ALL {
        let all = split_images(&opts.data, split, opts.image_side)?;
        let n = all.len();
        let dir = opts.out.join(split.name());
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        // Flipped copies of the training images only (the test split is scored as it is).
        let flip = opts.flip && split == Split::Train && !extractor.flip_invariant();
        let step = opts.rows_per_part.max(1);
        let mut first = 0;
        while first < n {
            let last = (first + step).min(n);
            let path = dir.join(part_name(first, last));
            if path.is_file() {
                summary.parts_kept += 1;
            } else {
                let t = Instant::now();
                let per = all.image_bytes();
                let pixels = &all.pixels[first * per..last * per];
                let x = extractor.encode_sized(pixels, all.side)?;
                let fx = if flip {
                    Some(extractor.encode_flipped_sized(pixels, &x, all.side)?)
                } else {
                    None
                };
                summary.encode_seconds += t.elapsed().as_secs_f64();
                summary.images_encoded += last - first;
                let batch = part_batch(
                    &x,
                    &all.labels[first..last],
                    first,
                    opts.batch_size,
                    fx.as_ref(),
                )?;
                write_parquet_file(&path, &[batch])?;
                summary.parts_written += 1;
            }
            if let Some(f) = opts.on_part.as_mut() {
                f(split.name(), last, n);
            }
            first = last;
        }
        manifest.splits.push(SplitEntry {
            split: split.name().into(),
            images: n,
            flipped: flip,
        });
    }
    manifest.write(&opts.out)?;
    Ok(summary)
}

/// All the images of `split` at `side`×`side`, in order, as one set.
pub(crate) fn split_images(data: &DataSpec, split: Split, side: usize) -> Result<Images> {
    let files = dataset::load_split_sized(data, split, side)?.0;
    let n: usize = files.iter().map(Images::len).sum();
    // The split's files and their joined copy.
    dataset::check_resized(n.saturating_mul(2), side)?;
    let mut all = Images::with_side(n, side);
    for f in &files {
        all.extend_range(f, 0..f.len());
    }
    Ok(all)
}

/// One part: the images' rows, each followed by its flipped copy when `flipped_x` (the
/// flipped images' features) is given.
pub(crate) fn part_batch(
    x: &ndarray::Array2<f32>,
    labels: &[u16],
    first: usize,
    batch_size: usize,
    flipped_x: Option<&ndarray::Array2<f32>>,
) -> Result<RecordBatch> {
    let width = x.ncols();
    let copies = if flipped_x.is_some() { 2 } else { 1 };
    let rows = x.nrows() * copies;
    let mut batch = Vec::with_capacity(rows);
    let mut row = Vec::with_capacity(rows);
    let mut label = Vec::with_capacity(rows);
    let mut flipped = Vec::with_capacity(rows);
    let mut values: Vec<f32> = Vec::with_capacity(rows * width);
    for (i, feats) in x.rows().into_iter().enumerate() {
        let index = first + i;
        let b = (index / batch_size.max(1)) as u64;
        let r = (index % batch_size.max(1)) as u32;
        batch.push(b);
        row.push(r);
        label.push(labels[i]);
        flipped.push(false);
        values.extend(feats.iter());
        if let Some(f) = flipped_x {
            batch.push(b);
            row.push(r);
            label.push(labels[i]);
            flipped.push(true);
            values.extend(f.row(i).iter());
        }
    }
    let list = FixedSizeListArray::try_new(
        Arc::new(Field::new("item", DataType::Float32, false)),
        width as i32,
        Arc::new(Float32Array::from(values)),
        None,
    )?;
    Ok(RecordBatch::try_new(
        schema(width),
        vec![
            Arc::new(UInt64Array::from(batch)) as ArrayRef,
            Arc::new(UInt32Array::from(row)),
            Arc::new(UInt16Array::from(label)),
            Arc::new(BooleanArray::from(flipped)),
            Arc::new(list),
        ],
    )?)
}

/// The complete parts of `split` in a cache folder, in image order. A folder that is not
/// a cache, or whose record does not list `split` as complete, is an error naming it.
pub fn split_parts(dir: &Path, split: Split) -> Result<(Manifest, Vec<PathBuf>)> {
    let Some(manifest) = Manifest::read(dir)? else {
        return Err(Error::usage(format!(
            "{}: not a feature cache (no {MANIFEST}; write one with `cifar-df features --data DIR --out {}`)",
            dir.display(),
            dir.display()
        )));
    };
    if !manifest.splits.iter().any(|s| s.split == split.name()) {
        return Err(Error::usage(format!(
            "{}: the feature cache has no complete {} split (it has: {})",
            dir.display(),
            split.name(),
            manifest
                .splits
                .iter()
                .map(|s| s.split.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let sdir = dir.join(split.name());
    let mut parts: Vec<(usize, PathBuf)> = Vec::new();
    for entry in fs::read_dir(&sdir).map_err(|e| Error::io(&sdir, e))? {
        let entry = entry.map_err(|e| Error::io(&sdir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(first) = name
            .strip_prefix("part-")
            .and_then(|r| r.strip_suffix(".parquet"))
            .and_then(|r| r.split('-').next())
            .and_then(|f| f.parse::<usize>().ok())
        {
            parts.push((first, entry.path()));
        }
    }
    parts.sort();
    Ok((manifest, parts.into_iter().map(|(_, p)| p).collect()))
}
