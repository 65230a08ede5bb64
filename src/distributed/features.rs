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
//! soon as all of its rows are back; the staged files of the parts written are removed
//! once the query has ended (a scan of a byte range of a file that holds no row group may
//! open the file after its rows are back). A worker lost mid-job is
//! left out and the query runs again, on the others, over the parts not yet written; a
//! job stopped any other way is resumed by running it again. Mirror-image features (with
//! `--flip`) are the permuted features where the extractor has a permutation, else the
//! features of `hflip(image, 1.0)`, computed by the workers too.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{Array, ArrayRef, FixedSizeListArray, Float32Array, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use futures::StreamExt;
use ndarray::Array2;
use url::Url;

use crate::dataset::{Images, Split};
use crate::distributed;
use crate::error::{Error, Result};
use crate::features::cache::{self, CacheOptions, CacheSummary, Manifest, SplitEntry};
use crate::features::Extractor;
use crate::store::write_parquet_file;

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
/// `opts.out/extractor/` by the caller) on `workers`, reached as `connect` says.
pub async fn write_cache_on_workers(
    extractor: &Extractor,
    opts: &mut CacheOptions,
    workers: &[Url],
    connect: &distributed::Connect,
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
        classes: crate::dataset::class_names(&opts.data)?,
    };
    // The job's own function is found by path, so any worker of this cifar-df will do,
    // whatever extractor it has bound for `extract_features`.
    let accept = distributed::Expect::same_cifar_df();
    let step = opts.rows_per_part.max(1);
    for split in Split::ALL {
        let all = cache::split_images(&opts.data, split, opts.image_side)?;
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
        // The parts still to compute, by their first image.
        let mut pending: BTreeMap<usize, Pending> = BTreeMap::new();
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
                let part = Pending {
                    first,
                    last,
                    staged,
                    out: path,
                };
                pending.insert(first, part);
            }
            first = last;
        }
        let left = |pending: &BTreeMap<usize, Pending>| -> usize {
            pending.values().map(|p| p.last - p.first).sum()
        };
        if let Some(f) = opts.on_part.as_mut() {
            f(split.name(), n - left(&pending), n);
        }
        if !pending.is_empty() {
            remove_leftovers(&staging)?;
            let call = |image: &str| -> Result<String> {
                Ok(format!(
                    "{}({}, '{stamp}', {width}, {image})",
                    crate::features::udf::FROM_NAME,
                    sql_text(&ex_dir)?
                ))
            };
            let sql = format!(
                "SELECT idx, {} AS f{} FROM {}",
                call("image")?,
                if remote_mirror {
                    format!(", {} AS m", call("hflip(image, 1.0)")?)
                } else {
                    String::new()
                },
                sql_text(&staging.join(""))?,
            );
            let t = Instant::now();
            let images_before = left(&pending);
            let (labels, batch_size) = (&all.labels, opts.batch_size);
            let job = RefCell::new((pending, &mut opts.on_part, 0usize));
            distributed::with_retries(workers, &accept, connect, |up| {
                let (job, sql, perm) = (&job, &sql, &perm);
                async move {
                    // A staged file is read by several scan partitions (the planner cuts
                    // each file into byte ranges; the range that holds the row group reads
                    // the rows, the others open the file only to find no row group), and
                    // those may open it after all its rows are back. So the staged files of
                    // the parts written are removed only once the query has ended.
                    let mut done: Vec<PathBuf> = Vec::new();
                    let result: Result<()> = async {
                        let ctx = distributed::session(&up, None, connect.secret.as_ref())?;
                        let mut stream = ctx.sql(sql).await?.execute_stream().await?;
                        // Rows of a failed attempt come again: start each attempt afresh.
                        let mut gathered: HashMap<usize, Gathered> = HashMap::new();
                        while let Some(batch) = stream.next().await {
                            let batch = batch?;
                            let mut job = job.borrow_mut();
                            let (pending, on_part, written) = &mut *job;
                            for first in
                                take_rows(&batch, pending, &mut gathered, width, remote_mirror)?
                            {
                                let (Some(p), Some(g)) =
                                    (pending.remove(&first), gathered.remove(&first))
                                else {
                                    return Err(Error::usage(
                                        "internal: a complete part was not gathered",
                                    ));
                                };
                                let rows = p.last - p.first;
                                let x = to_array(g.features, rows, width)?;
                                let fx = match perm {
                                    Some(perm) => Some(x.select(ndarray::Axis(1), perm)),
                                    None if remote_mirror => Some(to_array(g.mirror, rows, width)?),
                                    None => None,
                                };
                                let part = cache::part_batch(
                                    &x,
                                    &labels[p.first..p.last],
                                    p.first,
                                    batch_size,
                                    fx.as_ref(),
                                )?;
                                write_parquet_file(&p.out, &[part])?;
                                done.push(p.staged);
                                *written += 1;
                                if let Some(f) = on_part.as_mut() {
                                    f(split.name(), n - left(pending), n);
                                }
                            }
                        }
                        // The stream (every scan of the query) is dropped here.
                        Ok(())
                    }
                    .await;
                    for staged in done {
                        let _ = fs::remove_file(staged);
                    }
                    result?;
                    if let Some(p) = job.borrow().0.values().next() {
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
            let (pending, _, written) = job.into_inner();
            summary.encode_seconds += t.elapsed().as_secs_f64();
            summary.images_encoded += images_before - left(&pending);
            summary.parts_written += written;
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
    let per = all.image_bytes();
    let pixels = all.pixels[first * per..last * per].to_vec();
    let schema = Arc::new(Schema::new(vec![
        Field::new("idx", DataType::UInt32, false),
        Field::new(
            "image",
            crate::wire::batch::image_type_sized(all.side),
            false,
        ),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(UInt32Array::from(idx)) as ArrayRef,
            Arc::new(crate::wire::batch::image_array_sized(pixels, all.side)?),
        ],
    )?;
    write_parquet_file(path, &[batch])
}

/// Files the rows of `batch` under their parts; the parts now complete, by first image.
fn take_rows(
    batch: &RecordBatch,
    pending: &BTreeMap<usize, Pending>,
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
        let Some(p) = pending
            .range(..=i)
            .next_back()
            .map(|(_, p)| p)
            .filter(|p| i < p.last)
        else {
            return Err(bad(format!(
                "image {i} belongs to no part still to compute"
            )));
        };
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
            complete.push(p.first);
        }
    }
    Ok(complete)
}

fn to_array(values: Vec<f32>, rows: usize, width: usize) -> Result<Array2<f32>> {
    Array2::from_shape_vec((rows, width), values)
        .map_err(|e| Error::internal(format!("features of {rows} images: {e}")))
}

/// A path as a SQL string literal ([`crate::query::literal`]).
fn sql_text(path: &Path) -> Result<String> {
    let s = path.to_str().ok_or_else(|| {
        Error::usage(format!(
            "{}: a cache path for --workers must be UTF-8",
            path.display()
        ))
    })?;
    Ok(crate::query::literal(s))
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
