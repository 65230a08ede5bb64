//! The feature job over workers (`cifar-df features --workers`): the same cache as
//! [`cache::write_cache`], computed by a distributed SQL query.
//!
//! The images of every part still to compute are staged as Parquet, one file (one row
//! group) per part, under `F/.staging/SPLIT/`. One query per split,
//!
//! ```sql
//! SELECT idx, extract_features_from('F/extractor', 'STAMP', WIDTH, image) AS f
//! FROM 'F/.staging/train/'
//! ```
//!
//! runs on the workers: each task scans some of the part files, and each part reaches the
//! function as one batch, as the local job encodes it, so the features are bit-identical
//! to the local job's (same extractor, same CPU kind). The extractor reaches the workers
//! by path: the plan names the folder and its stamp, each worker reads the folder once and
//! refuses one with another stamp. Paths are absolute, so `F` must be at the same path on
//! every machine (a shared file system).
//!
//! The coordinator gathers the rows, and writes a part (atomically, as the local job) as
//! soon as all of its rows are back, then drops its staged file. A worker lost mid-job is
//! left out and the query runs again, on the others, over the parts not yet written; a
//! job stopped any other way is resumed by running it again. Mirror-image features (with
//! `--flip`) are the permuted features where the extractor has a permutation, else the
//! features of `hflip(image, 1.0)`, computed by the workers too.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, ArrayRef, FixedSizeListArray, Float32Array, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use futures::StreamExt;
use ndarray::Array2;
use url::Url;

use super::cache::{self, CacheOptions, CacheSummary, Manifest, SplitEntry};
use super::Extractor;
use crate::dataset::{self, Images, Split, IMAGE_BYTES};
use crate::distributed;
use crate::error::{Error, Result};
use crate::export::write_parquet_file;

/// The staging folder inside a cache.
pub const STAGING_DIR: &str = ".staging";

/// One part still to compute.
struct Pending {
    first: usize,
    last: usize,
    staged: PathBuf,
    out: PathBuf,
}

/// Rows of one part gathered so far.
struct Gathered {
    features: Vec<f32>,
    mirror: Vec<f32>,
    have: Vec<bool>,
    count: usize,
}

/// Writes the cache of `opts.data` under `opts.out` with `extractor` (saved in
/// `opts.out/extractor/` by the caller) on `workers`.
pub async fn write_cache_on_workers(
    extractor: &Extractor,
    opts: &mut CacheOptions,
    workers: &[Url],
    timeout: Duration,
) -> Result<CacheSummary> {
    let out = fs::canonicalize(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
    let ex_dir = out.join(cache::EXTRACTOR_DIR);
    let stamp = extractor.stamp();
    let width = extractor.width();
    let mut summary = CacheSummary {
        width,
        ..CacheSummary::default()
    };
    let mut manifest = Manifest {
        extractor: extractor.kind().into(),
        width,
        data: opts.data.to_string(),
        splits: Vec::new(),
    };
    // The job's own function is found by path, so any worker of this cifar-df will do,
    // whatever extractor it has bound for `extract_features`.
    let accept = distributed::Expect::same_cifar_df();
    let step = opts.rows_per_part.max(1);
    for split in Split::ALL {
        let files = dataset::load_split(&opts.data, split)?;
        let mut all = Images::with_capacity(files.iter().map(Images::len).sum());
        for f in &files {
            all.extend_range(f, 0..f.len());
        }
        drop(files);
        let n = all.len();
        let dir = out.join(split.name());
        let staging = out.join(STAGING_DIR).join(split.name());
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
        let flip = opts.flip && split == Split::Train && !extractor.flip_invariant();
        let perm = if flip {
            extractor.flip_permutation()
        } else {
            None
        };
        let remote_mirror = flip && perm.is_none();
        let mut pending: Vec<Pending> = Vec::new();
        let mut first = 0;
        while first < n {
            let last = (first + step).min(n);
            let name = cache::part_name(first, last);
            let path = dir.join(&name);
            let staged = staging.join(&name);
            if path.is_file() {
                summary.parts_kept += 1;
                let _ = fs::remove_file(&staged);
            } else {
                if !staged.is_file() {
                    stage_part(&all, first, last, &staged)?;
                }
                pending.push(Pending {
                    first,
                    last,
                    staged,
                    out: path,
                });
            }
            first = last;
        }
        if let Some(f) = opts.on_part.as_mut() {
            f(
                split.name(),
                n - pending.iter().map(|p| p.last - p.first).sum::<usize>(),
                n,
            );
        }
        if !pending.is_empty() {
            remove_leftovers(&staging)?;
            let sql = format!(
                "SELECT idx, {f}('{ex}', '{stamp}', {width}, image) AS f{m} FROM '{dir}/'",
                f = super::udf::FROM_NAME,
                ex = sql_text(&ex_dir)?,
                m = if remote_mirror {
                    format!(
                        ", {}('{}', '{stamp}', {width}, hflip(image, 1.0)) AS m",
                        super::udf::FROM_NAME,
                        sql_text(&ex_dir)?
                    )
                } else {
                    String::new()
                },
                dir = sql_text(&staging)?,
            );
            let t = Instant::now();
            let state = std::cell::RefCell::new((pending, 0usize));
            let labels = &all.labels;
            let on_part = &mut opts.on_part;
            let batch_size = opts.batch_size;
            let on_part = std::cell::RefCell::new(on_part);
            let parts_written = std::cell::Cell::new(0usize);
            distributed::with_retries(workers, &accept, timeout, |up| {
                let state = &state;
                let on_part = &on_part;
                let parts_written = &parts_written;
                let sql = sql.clone();
                let perm = perm.clone();
                async move {
                    let ctx = distributed::session(&up, None)?;
                    let mut stream = ctx.sql(&sql).await?.execute_stream().await?;
                    // Rows of a failed attempt come again: start each attempt afresh.
                    let mut gathered: HashMap<usize, Gathered> = HashMap::new();
                    while let Some(batch) = stream.next().await {
                        let batch = batch?;
                        let mut st = state.borrow_mut();
                        let (pending, done) = &mut *st;
                        for i in take_rows(&batch, pending, &mut gathered, width, remote_mirror)? {
                            let p = pending.remove(i);
                            let g = gathered.remove(&p.first).ok_or_else(|| {
                                Error::usage("internal: a complete part was not gathered")
                            })?;
                            let x = to_array(g.features, p.last - p.first, width)?;
                            let fx = match (&perm, remote_mirror) {
                                (Some(perm), _) => Some(x.select(ndarray::Axis(1), perm)),
                                (None, true) => Some(to_array(g.mirror, p.last - p.first, width)?),
                                (None, false) => None,
                            };
                            let part = cache::part_batch(
                                &x,
                                &labels[p.first..p.last],
                                p.first,
                                batch_size,
                                fx.as_ref(),
                            )?;
                            write_parquet_file(&p.out, &[part])?;
                            let _ = fs::remove_file(&p.staged);
                            parts_written.set(parts_written.get() + 1);
                            *done += p.last - p.first;
                            let left: usize = pending.iter().map(|p| p.last - p.first).sum();
                            if let Some(f) = on_part.borrow_mut().as_mut() {
                                f(split.name(), n - left, n);
                            }
                        }
                    }
                    let st = state.borrow();
                    if let Some(p) = st.0.first() {
                        return Err(Error::Worker {
                            what: "the feature query".into(),
                            reason: format!(
                                "ended without the features of images {}..{} of the {} split",
                                p.first,
                                p.last,
                                split.name()
                            ),
                        });
                    }
                    Ok(())
                }
            })
            .await?;
            summary.encode_seconds += t.elapsed().as_secs_f64();
            summary.images_encoded += state.borrow().1;
            summary.parts_written += parts_written.get();
        }
        let _ = fs::remove_dir(&staging);
        manifest.splits.push(SplitEntry {
            split: split.name().into(),
            images: n,
            flipped: flip,
        });
    }
    let _ = fs::remove_dir(out.join(STAGING_DIR));
    manifest.write(&out)?;
    Ok(summary)
}

/// Writes images `first..last` as one Parquet file (one row group): `idx`, `image`.
fn stage_part(all: &Images, first: usize, last: usize, path: &Path) -> Result<()> {
    let idx: Vec<u32> = (first..last)
        .map(|i| u32::try_from(i).map_err(|_| Error::usage("more than 2^32 images in a split")))
        .collect::<Result<_>>()?;
    let pixels = all.pixels[first * IMAGE_BYTES..last * IMAGE_BYTES].to_vec();
    let schema = Arc::new(Schema::new(vec![
        Field::new("idx", DataType::UInt32, false),
        Field::new("image", crate::batch::image_type(), false),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(UInt32Array::from(idx)) as ArrayRef,
            Arc::new(crate::batch::image_array(pixels)?),
        ],
    )?;
    write_parquet_file(path, &[batch])
}

/// Files the rows of `batch` under their parts; the positions in `pending` of the parts
/// now complete, last first (so that removing them in turn keeps the others' places).
fn take_rows(
    batch: &RecordBatch,
    pending: &[Pending],
    gathered: &mut HashMap<usize, Gathered>,
    width: usize,
    mirror: bool,
) -> Result<Vec<usize>> {
    let bad = |what: String| Error::Worker {
        what: "the feature query".into(),
        reason: what,
    };
    let idx = batch
        .column(0)
        .as_any()
        .downcast_ref::<UInt32Array>()
        .ok_or_else(|| bad("idx is not UInt32".into()))?;
    let list = |c: usize| -> Result<&Float32Array> {
        let l = batch
            .column(c)
            .as_any()
            .downcast_ref::<FixedSizeListArray>()
            .filter(|l| l.value_length() as usize == width && l.null_count() == 0)
            .ok_or_else(|| bad(format!("column {c} is not {width} features per row")))?;
        let v = l
            .values()
            .as_any()
            .downcast_ref::<Float32Array>()
            .ok_or_else(|| bad("features are not Float32".into()))?;
        if l.offset() != 0 || v.len() < l.len() * width {
            return Err(bad("features column is sliced".into()));
        }
        Ok(v)
    };
    let f = list(1)?;
    let m = if mirror { Some(list(2)?) } else { None };
    let mut complete = Vec::new();
    for r in 0..batch.num_rows() {
        let i = idx.value(r) as usize;
        let Some(pos) = pending.iter().position(|p| p.first <= i && i < p.last) else {
            return Err(bad(format!(
                "image {i} belongs to no part still to compute"
            )));
        };
        let p = &pending[pos];
        let len = p.last - p.first;
        let g = gathered.entry(p.first).or_insert_with(|| Gathered {
            features: vec![0.0; len * width],
            mirror: if mirror {
                vec![0.0; len * width]
            } else {
                Vec::new()
            },
            have: vec![false; len],
            count: 0,
        });
        let k = i - p.first;
        if g.have[k] {
            return Err(bad(format!("image {i} came back twice")));
        }
        g.have[k] = true;
        g.count += 1;
        g.features[k * width..(k + 1) * width]
            .copy_from_slice(&f.values()[r * width..(r + 1) * width]);
        if let Some(m) = m {
            g.mirror[k * width..(k + 1) * width]
                .copy_from_slice(&m.values()[r * width..(r + 1) * width]);
        }
        if g.count == len {
            complete.push(pos);
        }
    }
    complete.sort_unstable_by(|a, b| b.cmp(a));
    Ok(complete)
}

fn to_array(values: Vec<f32>, rows: usize, width: usize) -> Result<Array2<f32>> {
    Array2::from_shape_vec((rows, width), values)
        .map_err(|e| Error::usage(format!("internal: features of {rows} images: {e}")))
}

/// A path as the text of a SQL string literal (quotes doubled).
fn sql_text(path: &Path) -> Result<String> {
    let s = path.to_str().ok_or_else(|| {
        Error::usage(format!(
            "{}: a cache path for --workers must be UTF-8",
            path.display()
        ))
    })?;
    Ok(s.replace('\'', "''"))
}

/// Removes temporary files a stopped job left in `dir` (they are not parts).
fn remove_leftovers(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.extension().is_some_and(|e| e == "inprogress") {
            fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}
