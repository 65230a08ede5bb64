//! The dashboard's gallery: the images a run gets wrong, with their true and predicted
//! class and the model's confidence.
//!
//! A row of the `predictions` table names an image by its pass's stream batch and row. A
//! test pass reads its split in file order (never shuffled), in batches of one size `B`,
//! so the image is number `batch · B + row` of the split, `B` being the largest `row` + 1
//! of the pass. The images come from the data the run was trained on, as `run.json`'s
//! `source` names it: a dataset (`--data`: CIFAR files, an image folder, the synthetic
//! set) or a features cache (whose `cache.json` names its data). The split is loaded once
//! and kept while the page asks for its images. Each image's label in the data must equal
//! the prediction's `label`; where one does not (the data changed since the run), the
//! gallery says so instead of showing wrong images. A run fed by a stream (TCP, a file,
//! Kafka) keeps no images: its gallery lists the rows and says why there are no pictures.

use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use crate::dataset::{self, DataSpec, Images, Split};
use crate::error::{Error, Result};
use crate::features::cache::Manifest;
use crate::run::tables;
use crate::run::trainer::TrainSource;
use crate::source::SourceSpec;

use super::api::{self, lit};

/// The most images the gallery shows at once.
pub const MAX_IMAGES: usize = 500;
/// Images shown when the page does not say.
pub const DEFAULT_IMAGES: usize = 60;

/// `?run=R&split=test&label=A&predicted=P&limit=N`.
#[derive(Debug, Default, Deserialize)]
pub struct GalleryQuery {
    /// The run.
    pub run: String,
    /// `test` (default) or `train-eval` (a `predict --split train` pass).
    #[serde(default)]
    pub split: Option<String>,
    /// Only images of this true class.
    #[serde(default)]
    pub label: Option<u16>,
    /// Only images predicted as this class. With `label` equal to it, the images got
    /// right in that class; otherwise only wrong ones are shown.
    #[serde(default)]
    pub predicted: Option<u16>,
    /// At most this many images, most confident first ([`DEFAULT_IMAGES`]).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// `?run=R&split=test&index=I`.
#[derive(Debug, Default, Deserialize)]
pub struct ImageQuery {
    /// The run.
    pub run: String,
    /// The split.
    #[serde(default)]
    pub split: Option<String>,
    /// The image's number in the split.
    pub index: usize,
}

/// The one split kept in memory: what it was loaded from, and its images in order.
#[derive(Default)]
pub struct ImageCache {
    kept: Mutex<Option<(String, Arc<Images>)>>,
}

impl std::fmt::Debug for ImageCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ImageCache")
    }
}

/// Where a run's images are: its data, and whether each image of the split is followed by
/// its flipped copy in the pass (a features cache built with `--flip`).
fn image_source(root: &Path, run: &str, split: Split) -> Result<(DataSpec, bool)> {
    let (data, flipped) = recorded_source(root, run, split)?;
    // A relative path is as the trainer was given it: from this folder, or else from the
    // folder holding the runs folder (where `train` usually runs).
    if let DataSpec::Folder(p) = &data {
        if p.is_relative() && !p.exists() {
            let beside = root.parent().map(|d| d.join(p));
            if let Some(b) = beside.filter(|b| b.exists()) {
                return Ok((DataSpec::Folder(b), flipped));
            }
        }
    }
    Ok((data, flipped))
}

/// The data `run.json`'s `source` names, as written there.
fn recorded_source(root: &Path, run: &str, split: Split) -> Result<(DataSpec, bool)> {
    let r = tables::Run::new(root, run)?;
    let info = r
        .read_info()?
        .ok_or_else(|| Error::usage(format!("run {run:?}: no {}", tables::RUN_FILE)))?;
    match TrainSource::parse(&info.source)? {
        TrainSource::Loopback { data, .. } | TrainSource::Spec(SourceSpec::Data(data)) => {
            Ok((data, false))
        }
        TrainSource::Spec(SourceSpec::Features(dir)) => {
            let manifest = Manifest::read(&dir)?.ok_or_else(|| {
                Error::usage(format!(
                    "run {run:?} learnt from the features cache {}, which is gone",
                    dir.display()
                ))
            })?;
            let flipped = manifest
                .splits
                .iter()
                .any(|s| s.split == split.name() && s.flipped);
            Ok((DataSpec::parse(&manifest.data)?, flipped))
        }
        TrainSource::Spec(other) => Err(Error::usage(format!(
            "run {run:?} learnt from the stream {other}, which keeps no images: the gallery \
             shows the images of runs trained on a dataset (--data) or a features cache"
        ))),
    }
}

fn split_of(name: Option<&str>) -> Result<(Split, &'static str)> {
    match name.unwrap_or("test") {
        "test" => Ok((Split::Test, "test")),
        "train-eval" => Ok((Split::Train, "train-eval")),
        other => Err(Error::usage(format!(
            "split {other:?}: the gallery shows test or train-eval predictions"
        ))),
    }
}

impl ImageCache {
    /// The images of `split` of `data`, loaded on first use (on a blocking thread).
    async fn get(&self, data: &DataSpec, split: Split) -> Result<Arc<Images>> {
        let key = format!("{data}|{}", split.name());
        let mut kept = self.kept.lock().await;
        if let Some((k, images)) = kept.as_ref() {
            if *k == key {
                return Ok(images.clone());
            }
        }
        let spec = data.clone();
        let images = tokio::task::spawn_blocking(move || -> Result<Images> {
            let files = dataset::load_split(&spec, split)?;
            let n = files.iter().map(Images::len).sum();
            let mut all = Images::with_capacity(n);
            for f in &files {
                all.extend_range(f, 0..f.len());
            }
            Ok(all)
        })
        .await
        .map_err(|e| Error::usage(format!("loading the images of {data}: {e}")))??;
        let images = Arc::new(images);
        *kept = Some((key, images.clone()));
        Ok(images)
    }
}

/// The wrongly classified images of a run's pass (or one confusion cell's images), most
/// confident first: per image its number in the split, true and predicted class and
/// confidence, and the URL of its picture; `images_note` says why there are no pictures
/// when there cannot be.
pub async fn gallery(root: &Path, cache: &ImageCache, q: &GalleryQuery) -> Result<Value> {
    tables::Run::new(root, &q.run)?;
    let (split, split_name) = split_of(q.split.as_deref())?;
    let limit = q.limit.unwrap_or(DEFAULT_IMAGES).clamp(1, MAX_IMAGES);
    let pass = format!("run = {} and split = {}", lit(&q.run), lit(split_name));
    let mut cond = pass.clone();
    if let Some(a) = q.label {
        cond += &format!(" and label = {a}");
    }
    if let Some(p) = q.predicted {
        cond += &format!(" and predicted = {p}");
    }
    if !(q.label.is_some() && q.label == q.predicted) {
        cond += " and label <> predicted";
    }
    let batches = api::sql_over(
        root,
        &format!(
            "select cast(batch as bigint) as batch, cast(\"row\" as bigint) as \"row\", \
             cast(label as bigint) as label, cast(predicted as bigint) as predicted, \
             cast(p_max as double) as p_max, \
             (select max(\"row\") + 1 from predictions where {pass}) as per_batch, \
             (select count(*) from predictions where {cond}) as matching \
             from predictions where {cond} order by p_max desc, batch, \"row\" limit {limit}"
        ),
        Some(&[q.run.as_str()]),
    )
    .await?;
    let mut rows = Vec::new();
    let mut matching = 0;
    for b in &batches {
        let batch = api::int_column(b, "batch")?;
        let row = api::int_column(b, "row")?;
        let label = api::int_column(b, "label")?;
        let predicted = api::int_column(b, "predicted")?;
        let p_max = api::f64_column(b, "p_max")?;
        let per_batch = api::int_column(b, "per_batch")?;
        matching = api::int_column(b, "matching")?
            .first()
            .copied()
            .unwrap_or(0);
        for i in 0..b.num_rows() {
            let pos = batch[i] * per_batch[i] + row[i];
            rows.push((pos, label[i], predicted[i], p_max[i]));
        }
    }
    let names = tables::run_classes(root, &q.run);
    let name = |k: u64| {
        names
            .get(k as usize)
            .cloned()
            .unwrap_or_else(|| k.to_string())
    };
    // The pictures: each row's image in the run's data, checked against its label.
    let mut note = Value::Null;
    let mut index: Vec<Option<usize>> = vec![None; rows.len()];
    if !rows.is_empty() {
        match image_source(root, &q.run, split) {
            Ok((data, flipped)) => match cache.get(&data, split).await {
                Ok(images) => {
                    let mut bad = 0;
                    for (k, &(pos, label, _, _)) in rows.iter().enumerate() {
                        let i = if flipped { pos / 2 } else { pos } as usize;
                        if images.labels.get(i).map(|&l| u64::from(l)) == Some(label) {
                            index[k] = Some(i);
                        } else {
                            bad += 1;
                        }
                    }
                    if bad > 0 {
                        index.iter_mut().for_each(|i| *i = None);
                        note = json!(format!(
                            "{bad} of {} images in {data} do not carry the label the run \
                             scored them with: the data changed since the run, so no images \
                             are shown",
                            rows.len()
                        ));
                    }
                }
                Err(e) => note = json!(format!("the images could not be read: {e}")),
            },
            Err(e) => note = json!(e.to_string()),
        }
    }
    let images: Vec<Value> = rows
        .iter()
        .zip(&index)
        .map(|(&(pos, label, predicted, p_max), i)| {
            json!({
                "index": i.unwrap_or(pos as usize),
                "label": label,
                "predicted": predicted,
                "label_name": name(label),
                "predicted_name": name(predicted),
                "p_max": p_max,
                "src": i.map(|i| format!(
                    "/api/image?run={}&split={split_name}&index={i}",
                    url::form_urlencoded::byte_serialize(q.run.as_bytes()).collect::<String>()
                )),
            })
        })
        .collect();
    Ok(json!({
        "run": q.run,
        "split": split_name,
        "matching": matching,
        "images": images,
        "images_note": note,
    }))
}

/// Image `q.index` of the run's split as a 32 × 32 PNG.
pub async fn image_png(root: &Path, cache: &ImageCache, q: &ImageQuery) -> Result<Vec<u8>> {
    let (split, _) = split_of(q.split.as_deref())?;
    let (data, _) = image_source(root, &q.run, split)?;
    let images = cache.get(&data, split).await?;
    if q.index >= images.len() {
        return Err(Error::usage(format!(
            "image {}: the {} split of {data} has {} images",
            q.index,
            split.name(),
            images.len()
        )));
    }
    let (w, h, rgb) = crate::store::png::image_grid(&[images.image(q.index)], 1, 1, 0);
    crate::store::png::encode_png(w, h, &rgb, None).map_err(Error::usage)
}
