//! The `ndjson` wire format: one image per line, decoded by stock `arrow-json`.
//!
//! ```text
//! {"label": 6, "image": [59, 43, 50, ...3072 integers...]}
//! ```
//! The image is in CIFAR order (red plane, green, blue). cifar-df's stream server ends every
//! batch with a blank line; a reader also closes a batch when it reaches its batch size, so
//! streams from other writers (no blank lines) work too.
//!
//! Each line is decoded on its own by an `arrow_json::reader::Decoder` with the schema
//! `label: UInt8, image: FixedSizeList<UInt8, 3072>`, so that one bad line is rejected alone
//! and the decoder is rebuilt after it; the others are kept.

use std::sync::Arc;

use arrow::array::{Array, FixedSizeListArray, UInt16Array, UInt8Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::json::reader::{Decoder, ReaderBuilder};

#[cfg(test)]
use crate::dataset::IMAGE_BYTES;
use crate::dataset::{image_bytes, CLASSES, SIDE};
use crate::error::Result;
use crate::wire::batch::image_type_sized;

/// Append one line per image (each ending in `\n`; no blank line after the batch).
pub fn encode(labels: &[u16], pixels: &[u8], out: &mut Vec<u8>) {
    let table = digits();
    // Images of any side: each is its share of the pixels.
    let per = pixels.len().checked_div(labels.len()).unwrap_or(1).max(1);
    out.reserve(labels.len() * (per * 5 + 32));
    for (label, image) in labels.iter().zip(pixels.chunks_exact(per)) {
        out.extend_from_slice(b"{\"label\": ");
        out.extend_from_slice(label.to_string().as_bytes());
        out.extend_from_slice(b", \"image\": [");
        for (k, &p) in image.iter().enumerate() {
            if k > 0 {
                out.extend_from_slice(b", ");
            }
            out.extend_from_slice(table[p as usize].as_bytes());
        }
        out.extend_from_slice(b"]}\n");
    }
}

fn digits() -> &'static [String; 256] {
    static TABLE: std::sync::OnceLock<[String; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|i| i.to_string()))
}

/// The schema one ndjson line of a 32×32 image decodes to.
pub fn line_schema() -> SchemaRef {
    line_schema_sized(SIDE)
}

/// The schema one ndjson line of a `side`×`side` image decodes to.
pub fn line_schema_sized(side: usize) -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("label", DataType::UInt16, false),
        Field::new("image", image_type_sized(side), false),
    ]))
}

/// Decodes ndjson lines one at a time with `arrow-json`.
pub struct LineDecoder {
    schema: SchemaRef,
    decoder: Decoder,
    classes: usize,
    side: usize,
}

impl LineDecoder {
    /// A decoder for the ndjson line schema.
    pub fn new() -> Result<Self> {
        let schema = line_schema();
        let decoder = Self::build(&schema)?;
        Ok(LineDecoder {
            schema,
            decoder,
            classes: CLASSES,
            side: SIDE,
        })
    }

    /// A decoder for a run of `classes` classes: a label not below it is an error.
    pub fn with_classes(classes: usize) -> Result<Self> {
        Self::sized(classes, SIDE)
    }

    /// A decoder for a run of `classes` classes and `side`×`side` images: a label not
    /// below `classes`, or an image of another number of values, is an error.
    pub fn sized(classes: usize, side: usize) -> Result<Self> {
        let schema = line_schema_sized(side);
        let decoder = Self::build(&schema)?;
        Ok(LineDecoder {
            schema,
            decoder,
            classes,
            side,
        })
    }

    fn build(schema: &SchemaRef) -> Result<Decoder> {
        Ok(ReaderBuilder::new(schema.clone())
            .with_batch_size(1)
            .build_decoder()?)
    }

    /// Decode one line into its label, appending its `3·side²` pixels to `pixels`.
    ///
    /// On error nothing is appended and the reason is returned.
    pub fn decode_line(&mut self, line: &[u8], pixels: &mut Vec<u8>) -> Result<u16, String> {
        let result = self.decode_inner(line, pixels).map_err(|e| {
            if e.contains("number of elements for FixedSizeList") {
                // An image of another side than the run's.
                format!(
                    "{e} (this run's images are {s}x{s}: --image-size)",
                    s = self.side
                )
            } else {
                e
            }
        });
        if result.is_err() {
            // The decoder's state after an error is unspecified: start afresh.
            match Self::build(&self.schema) {
                Ok(d) => self.decoder = d,
                Err(e) => return Err(format!("cannot rebuild the JSON decoder: {e}")),
            }
        }
        result
    }

    fn decode_inner(&mut self, line: &[u8], pixels: &mut Vec<u8>) -> Result<u16, String> {
        let used = self.decoder.decode(line).map_err(|e| e.to_string())?;
        if used != line.len() {
            return Err("more than one JSON object on the line".into());
        }
        if self.decoder.has_partial_record() {
            return Err("incomplete JSON object".into());
        }
        let batch = self
            .decoder
            .flush()
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "no JSON object on the line".to_string())?;
        if batch.num_rows() != 1 {
            return Err(format!("{} JSON objects on the line", batch.num_rows()));
        }
        let label = batch
            .column(0)
            .as_any()
            .downcast_ref::<UInt16Array>()
            .ok_or("`label` did not decode as UInt16")?;
        if label.is_null(0) {
            return Err("missing key \"label\"".into());
        }
        let label = label.value(0);
        if label as usize >= self.classes {
            return Err(format!(
                "label {label} outside 0..{}",
                self.classes.saturating_sub(1)
            ));
        }
        let image = batch
            .column(1)
            .as_any()
            .downcast_ref::<FixedSizeListArray>()
            .ok_or("`image` did not decode as a list")?;
        if image.is_null(0) {
            return Err("missing key \"image\"".into());
        }
        let values = image.value(0);
        let values = values
            .as_any()
            .downcast_ref::<UInt8Array>()
            .ok_or("`image` values did not decode as UInt8")?;
        let want = image_bytes(self.side);
        if values.len() != want {
            return Err(format!(
                "image has {} values, not {want} ({s}x{s} RGB)",
                values.len(),
                s = self.side
            ));
        }
        if values.null_count() > 0 {
            return Err("image has null values".into());
        }
        pixels.extend_from_slice(values.values());
        Ok(label)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(seed: u8) -> Vec<u8> {
        (0..IMAGE_BYTES)
            .map(|k| (k as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn encode_then_decode() {
        let mut pixels = image(3);
        pixels.extend(image(200));
        let labels = [4u16, 9];
        let mut text = Vec::new();
        encode(&labels, &pixels, &mut text);
        let lines: Vec<&[u8]> = text
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with(b"{\"label\": 4, \"image\": [3, 34, 65"));
        let mut dec = LineDecoder::new().unwrap();
        let mut out = Vec::new();
        let got: Vec<u16> = lines
            .iter()
            .map(|l| dec.decode_line(l, &mut out).unwrap())
            .collect();
        assert_eq!(got, labels);
        assert_eq!(out, pixels);
    }

    #[test]
    fn rejects_bad_lines_and_recovers() {
        let good = {
            let mut t = Vec::new();
            encode(&[1], &image(0), &mut t);
            t.pop();
            t
        };
        let mut dec = LineDecoder::new().unwrap();
        let mut out = Vec::new();
        let ten = String::from_utf8(good.clone())
            .unwrap()
            .replace("\"label\": 1", "\"label\": 10");
        let big = String::from_utf8(good.clone())
            .unwrap()
            .replacen("[0, ", "[300, ", 1);
        let short = String::from_utf8(good.clone())
            .unwrap()
            .replacen("[0, ", "[", 1);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (ten.into_bytes(), "label 10 outside 0..9"),
            (big.into_bytes(), "300"),
            (short.into_bytes(), ""),
            (b"{\"image\": [1, 2]".to_vec(), "incomplete"),
            (b"{\"label\": 3}".to_vec(), ""),
            (b"not json".to_vec(), ""),
        ];
        for (line, want) in cases {
            let err = dec.decode_line(&line, &mut out).unwrap_err();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
            assert!(out.is_empty(), "a rejected line must append nothing");
            // The decoder keeps working after every error.
            assert_eq!(dec.decode_line(&good, &mut out), Ok(1));
            out.clear();
        }
    }
}
