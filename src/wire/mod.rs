//! Wire formats: how batches of images travel between the stream server and a source.
//!
//! - [`spark_json`]: the original system's format, byte for byte what Python's `json.dumps`
//!   wrote (one JSON object per batch per line). Slow to parse by nature; decoded here by a
//!   parser built for its shape.
//! - [`ndjson`]: one image per line, `{"label": 6, "image": [..3072 ints..]}`, decoded by
//!   stock `arrow-json`. cifar-df's server ends each batch with a blank line.
//! - `arrow`: an Arrow IPC stream (schema once, then one record batch per batch).
//!
//! [`detect`] tells them apart from the first bytes of a stream.

pub mod batch;
pub mod kafka;
pub mod ndjson;
pub mod spark_json;

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// A wire format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// One JSON object per batch, as the original Python server wrote it.
    SparkJson,
    /// One JSON object per image; a blank line ends a batch.
    Ndjson,
    /// An Arrow IPC stream.
    Arrow,
}

impl Format {
    /// Why the format cannot carry images of `side`, if it cannot: spark-json, the
    /// original's format, names 3,072 features (32×32 only). `remedy` ends the message.
    pub fn refuses_side(self, side: usize, remedy: &str) -> Option<String> {
        (self == Format::SparkJson && side != crate::dataset::SIDE).then(|| {
            format!(
                "the spark-json format (the original's) carries 32x32 images only, and these \
                 are {side}x{side} (--image-size {side}): {remedy}"
            )
        })
    }

    /// An error when the format cannot carry images of `side` (spark-json, the
    /// original's format, names 3,072 features: 32×32 only), naming the formats that can.
    pub fn check_side(self, side: usize) -> crate::error::Result<()> {
        match self.refuses_side(side, "send them with --format ndjson or arrow") {
            Some(why) => Err(Error::usage(why)),
            None => Ok(()),
        }
    }

    /// All formats, for messages.
    pub const ALL: [Format; 3] = [Format::SparkJson, Format::Ndjson, Format::Arrow];

    /// The format's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Format::SparkJson => "spark-json",
            Format::Ndjson => "ndjson",
            Format::Arrow => "arrow",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Format::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                Error::usage(format!(
                    "unknown wire format {s:?} (expected spark-json, ndjson or arrow)"
                ))
            })
    }
}

/// What the first bytes of a stream say about its format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    /// The format is known.
    Format(Format),
    /// More bytes are needed to tell.
    NeedMore,
    /// These bytes are no known format.
    Unknown,
}

/// Tell the format from a stream's first bytes.
///
/// An Arrow IPC stream starts with the continuation marker `0xFFFFFFFF`; a JSON stream with
/// `{`, and then its first key is a row number (`"0"`, spark-json) or a field name
/// (`"label"`/`"image"`, ndjson). `{}` (an empty spark-json batch) counts as spark-json.
pub fn detect(prefix: &[u8], at_eof: bool) -> Detected {
    let need_more = if at_eof {
        Detected::Unknown
    } else {
        Detected::NeedMore
    };
    if prefix.len() >= 4 && prefix[..4] == [0xFF; 4] {
        return Detected::Format(Format::Arrow);
    }
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < prefix.len() && matches!(prefix[*i], b' ' | b'\t' | b'\r' | b'\n') {
            *i += 1;
        }
    };
    skip_ws(&mut i);
    match prefix.get(i) {
        None => return need_more,
        Some(b'{') => i += 1,
        Some(0xFF) if prefix.len() < 4 && prefix.iter().all(|&b| b == 0xFF) => return need_more,
        Some(_) => return Detected::Unknown,
    }
    skip_ws(&mut i);
    match prefix.get(i) {
        None => need_more,
        Some(b'}') => Detected::Format(Format::SparkJson),
        Some(b'"') => match prefix.get(i + 1) {
            None => need_more,
            Some(b'0'..=b'9') => Detected::Format(Format::SparkJson),
            Some(_) => Detected::Format(Format::Ndjson),
        },
        Some(_) => Detected::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_each_format() {
        assert_eq!(
            detect(b"{\"0\": {\"feature0\": 1", false),
            Detected::Format(Format::SparkJson)
        );
        assert_eq!(
            detect(b"  {  \"12\":", false),
            Detected::Format(Format::SparkJson)
        );
        assert_eq!(detect(b"{}\n", false), Detected::Format(Format::SparkJson));
        assert_eq!(
            detect(b"{\"label\": 3, \"image\": [", false),
            Detected::Format(Format::Ndjson)
        );
        assert_eq!(
            detect(b"{\"image\": [", false),
            Detected::Format(Format::Ndjson)
        );
        assert_eq!(
            detect(&[0xFF, 0xFF, 0xFF, 0xFF, 0x10, 0, 0, 0], false),
            Detected::Format(Format::Arrow)
        );
        assert_eq!(detect(b"", false), Detected::NeedMore);
        assert_eq!(detect(b"  {", false), Detected::NeedMore);
        assert_eq!(detect(&[0xFF, 0xFF], false), Detected::NeedMore);
        assert_eq!(detect(b"  {", true), Detected::Unknown);
        assert_eq!(detect(b"hello", false), Detected::Unknown);
        assert_eq!(detect(b"[1, 2]", false), Detected::Unknown);
    }

    #[test]
    fn format_names_round_trip() {
        for f in Format::ALL {
            assert_eq!(f.name().parse::<Format>().unwrap(), f);
        }
        let err = "csv".parse::<Format>().unwrap_err().to_string();
        assert!(err.contains("csv") && err.contains("ndjson"), "{err}");
    }
}
