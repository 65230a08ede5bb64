//! `features:DIR`: a feature cache ([`crate::features::cache`]) read back as a stream.
//!
//! The split's parts are read in image order and cut into batches of `batch_size` rows
//! (flipped copies count as rows), numbered from 0 across epochs like a dataset source.
//! Batches have the cache's schema (`batch, row, label, flipped, features`), so the
//! training SQL is a plain projection (`sql/cached.sql`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{UInt32Array, UInt64Array};
use arrow::compute::concat_batches;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};

use super::{BatchSource, Report, SourceOptions};
use crate::error::{Error, Result};
use crate::features::cache;

/// Reads a feature cache's split.
pub struct FeatureSource {
    parts: Vec<PathBuf>,
    schema: SchemaRef,
    width: usize,
    rows_per_epoch: usize,
    batch_size: usize,
    epochs: Option<u64>,
    epoch: u64,
    part: usize,
    reader: Option<(PathBuf, ParquetRecordBatchReader)>,
    pending: Vec<RecordBatch>,
    pending_rows: usize,
    next_batch: u64,
    skip: u64,
    report: Report,
}

impl FeatureSource {
    /// Opens the split `opts.split` of the cache in `dir`.
    pub fn open(dir: &Path, opts: &SourceOptions) -> Result<Self> {
        let (manifest, parts) = cache::split_parts(dir, opts.split)?;
        let entry = manifest
            .splits
            .iter()
            .find(|s| s.split == opts.split.name())
            .cloned();
        let rows_per_epoch = entry.map_or(0, |e| e.images * if e.flipped { 2 } else { 1 });
        Ok(FeatureSource {
            parts,
            schema: cache::schema(manifest.width),
            width: manifest.width,
            rows_per_epoch,
            batch_size: opts.batch_size.max(1),
            epochs: opts.epochs,
            epoch: 0,
            part: 0,
            reader: None,
            pending: Vec::new(),
            pending_rows: 0,
            next_batch: 0,
            skip: opts.skip,
            report: Report::default(),
        })
    }

    /// The next batch of rows from the parts, `None` at the end of an epoch.
    fn next_rows(&mut self) -> Result<Option<RecordBatch>> {
        loop {
            if let Some((path, reader)) = self.reader.as_mut() {
                match reader.next() {
                    Some(Ok(b)) => {
                        let b = crate::wire::batch::widen_labels(b)?;
                        if b.schema().fields() != self.schema.fields() {
                            return Err(Error::format(
                                path.clone(),
                                0,
                                format!(
                                    "not a feature cache part of width {}: schema {:?}",
                                    self.width,
                                    b.schema()
                                        .fields()
                                        .iter()
                                        .map(|f| format!("{} {}", f.name(), f.data_type()))
                                        .collect::<Vec<_>>()
                                ),
                            ));
                        }
                        return Ok(Some(b));
                    }
                    Some(Err(e)) => {
                        return Err(Error::format(
                            path.clone(),
                            0,
                            format!("reading the part: {e}"),
                        ))
                    }
                    None => self.reader = None,
                }
            }
            let Some(path) = self.parts.get(self.part).cloned() else {
                return Ok(None);
            };
            self.part += 1;
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            let reader = ParquetRecordBatchReaderBuilder::try_new(file)
                .and_then(|b| b.with_batch_size(4096).build())
                .map_err(|e| Error::format(&path, 0, format!("not a Parquet file: {e}")))?;
            self.reader = Some((path, reader));
        }
    }

    /// Cuts the pending rows into one batch of at most `batch_size` rows, renumbered.
    fn take_batch(&mut self) -> Result<RecordBatch> {
        let all = concat_batches(&self.schema, &self.pending)?;
        let n = self.batch_size.min(all.num_rows());
        let out = all.slice(0, n);
        let rest = all.slice(n, all.num_rows() - n);
        self.pending_rows = rest.num_rows();
        self.pending = if rest.num_rows() > 0 {
            vec![rest]
        } else {
            Vec::new()
        };
        let seq = self.next_batch;
        self.next_batch += 1;
        let mut cols = out.columns().to_vec();
        cols[0] = Arc::new(UInt64Array::from(vec![seq; n]));
        cols[1] = Arc::new(UInt32Array::from_iter_values(0..n as u32));
        Ok(RecordBatch::try_new(self.schema.clone(), cols)?)
    }
}

impl BatchSource for FeatureSource {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn batches_per_epoch(&self) -> Option<u64> {
        Some(self.rows_per_epoch.div_ceil(self.batch_size) as u64)
    }

    fn next_batch(&mut self) -> Result<Option<RecordBatch>> {
        loop {
            if self.epochs.is_some_and(|e| self.epoch >= e) {
                return Ok(None);
            }
            while self.pending_rows < self.batch_size {
                match self.next_rows()? {
                    Some(b) => {
                        self.pending_rows += b.num_rows();
                        self.pending.push(b);
                    }
                    None => break,
                }
            }
            if self.pending_rows == 0 {
                // End of an epoch: start over.
                self.epoch += 1;
                self.part = 0;
                if self.parts.is_empty() {
                    return Ok(None);
                }
                continue;
            }
            // The epoch's last rows make a smaller batch of their own.
            let b = self.take_batch()?;
            if self.next_batch - 1 < self.skip {
                continue;
            }
            self.report.accept(b.num_rows());
            return Ok(Some(b));
        }
    }

    fn report(&self) -> Report {
        self.report.clone()
    }
}
