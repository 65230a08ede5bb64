//! The `spark-json` wire format: one JSON object per batch of CIFAR-10 images.
//!
//! A batch is one line of UTF-8 text terminated by `\n`:
//!
//! ```text
//! {"0": {"feature0": 59, "feature1": 43, ..., "feature3071": 84, "label": 6}, "1": {...}}
//! ```
//!
//! The top-level keys are the decimal row indices within the batch; every row
//! holds the 3,072 pixel values `"feature0"`..`"feature3071"` (0..=255, CIFAR
//! order) followed by `"label"` (0..=9). [`encode`] writes exactly what
//! Python's `json.dumps` writes with its default separators (`", "` and
//! `": "`), plus the trailing `\n`.
//!
//! [`decode`] accepts any valid JSON with that shape: whitespace anywhere
//! between tokens, keys in any order within a row, and unknown keys in a row
//! (their values are validated and skipped). It has two fast paths, one for the
//! canonical `json.dumps` layout and one for the compact layout without spaces
//! (`{"feature0":59,...}`), which compare each key against a precomputed table
//! and parse values with a few branch-free word operations; any row that does
//! not match byte for byte is parsed again by the general by-name parser, which
//! alone decides what is accepted and produces every error message.
//!
//! Rules enforced by [`decode`]:
//! - values of pixels and labels must be plain JSON integers without sign,
//!   fraction or exponent (`-0`, `1.0`, `1e2`, `"7"`, `null` are rejected),
//!   pixels within 0..=255 and labels within 0..=65535 ([`decode_classes`] then checks them against the run's classes; [`decode`]: CIFAR-10's 0..=9);
//! - a row must contain every `featureK` (K in 0..3072) and `label` exactly once;
//! - a key made of `feature` and decimal digits must name a pixel in canonical
//!   form: `feature3072` and `feature01` are errors, while other keys such as
//!   `filenames`, `feature` or `features` are unknown and skipped;
//! - keys may be written with JSON escapes (`"feature\u0030"` is `feature0`);
//! - top-level keys must be decimal integers without sign or leading zeros
//!   that fit in a `u32`; they are reported in [`DecodedBatch::rows`] in the
//!   order they appear, and neither their order nor their uniqueness is checked;
//! - strings must be valid JSON strings (valid escapes, no raw control
//!   characters, valid UTF-8); nothing but whitespace may follow the object.
//!
//! Nothing in this module panics on any input line, and nesting depth in
//! skipped values is limited only by the length of the line (no recursion).

use std::fmt;
use std::sync::OnceLock;

/// Number of pixel values (`feature0`..`feature3071`) in one image.
pub const FEATURES: usize = 3072;

/// Key index used for `label` (pixel keys use their index 0..FEATURES).
const LABEL: usize = FEATURES;
/// The largest label the wire accepts (a `u16`); the run's classes are checked after.
const LABEL_MAX: u32 = u16::MAX as u32;
/// Number of required keys in a row: every pixel and the label.
const ROW_KEYS: usize = FEATURES + 1;
/// Words in the bitset of keys seen in a row.
const SEEN_WORDS: usize = ROW_KEYS.div_ceil(64);
/// Spare bytes the encoder writes past the end before truncating.
const ENCODE_SLACK: usize = 32;

/// A decoded batch; buffers are reused across calls.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DecodedBatch {
    /// The top-level keys (row indices) as numbers, in the order they appear.
    pub rows: Vec<u32>,
    /// The label of each row.
    pub labels: Vec<u16>,
    /// The pixels of all rows, `rows.len() * FEATURES` bytes: pixel K of row i
    /// is at `i * FEATURES + K`.
    pub pixels: Vec<u8>,
}

impl DecodedBatch {
    /// Removes all rows, keeping the allocated buffers.
    pub fn clear(&mut self) {
        self.rows.clear();
        self.labels.clear();
        self.pixels.clear();
    }

    /// Number of rows (images) in the batch.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the batch has no rows.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Why a line was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineError {
    /// The row's key if it parsed as an integer, else the row's 0-based
    /// position; `None` for errors outside any row (not an object, trailing
    /// garbage, bad separator between rows).
    pub row: Option<u32>,
    /// Byte offset within the line where the problem is.
    pub offset: usize,
    /// Short human-readable description of the problem.
    pub reason: String,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.row {
            Some(row) => write!(f, "row {row}, byte {}: {}", self.offset, self.reason),
            None => write!(f, "byte {}: {}", self.offset, self.reason),
        }
    }
}

impl std::error::Error for LineError {}

/// A parse error before the row it belongs to is attached.
#[derive(Debug)]
struct PErr {
    offset: usize,
    reason: String,
}

impl PErr {
    fn new(offset: usize, reason: impl Into<String>) -> Self {
        PErr {
            offset,
            reason: reason.into(),
        }
    }

    fn at_row(self, row: Option<u32>) -> LineError {
        LineError {
            row,
            offset: self.offset,
            reason: self.reason,
        }
    }
}

type PResult<T> = Result<T, PErr>;

fn eol(line: &[u8]) -> PErr {
    PErr::new(line.len(), "unexpected end of line")
}

// ---------------------------------------------------------------------------
// Precomputed tables
// ---------------------------------------------------------------------------

/// The expected bytes of every key of a row in one fixed layout, including
/// the separator before it (`{` for the first key, `, ` or `,` for the
/// others) and the `: ` or `:` after it.
struct KeyTable {
    /// The first (up to) 16 bytes of each key, little-endian, zero-padded.
    head: Box<[u128]>,
    /// Length of each key in bytes (12..=17).
    len: Box<[u8]>,
}

impl KeyTable {
    fn new(compact: bool) -> Self {
        let (sep, colon): (&[u8], &[u8]) = if compact {
            (b",", b":")
        } else {
            (b", ", b": ")
        };
        let mut head = Vec::with_capacity(ROW_KEYS);
        let mut len = Vec::with_capacity(ROW_KEYS);
        let mut key = Vec::with_capacity(32);
        for k in 0..ROW_KEYS {
            key.clear();
            key.extend_from_slice(if k == 0 { b"{" } else { sep });
            key.push(b'"');
            key.extend_from_slice(key_name(k).as_bytes());
            key.push(b'"');
            key.extend_from_slice(colon);
            // Only canonical 4-digit keys are 17 bytes long; their last byte is
            // the space after the colon, which `match_key` checks on its own.
            debug_assert!(key.len() <= 16 || (key.len() == 17 && key[16] == b' '));
            let mut bytes = [0u8; 16];
            let n = key.len().min(16);
            bytes[..n].copy_from_slice(&key[..n]);
            head.push(u128::from_le_bytes(bytes));
            len.push(key.len() as u8);
        }
        KeyTable {
            head: head.into_boxed_slice(),
            len: len.into_boxed_slice(),
        }
    }
}

/// All tables, built once.
struct Tables {
    /// `json.dumps` layout: `, "feature1": `.
    canonical: KeyTable,
    /// Layout without spaces: `,"feature1":`.
    compact: KeyTable,
    /// Digits of every byte value in the low bytes, digit count in the top byte.
    values: [u32; 256],
}

fn tables() -> &'static Tables {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    TABLES.get_or_init(|| {
        let mut values = [0u32; 256];
        for (v, slot) in values.iter_mut().enumerate() {
            let digits = v.to_string();
            let mut word = (digits.len() as u32) << 24;
            for (i, d) in digits.bytes().enumerate() {
                word |= u32::from(d) << (8 * i);
            }
            *slot = word;
        }
        Tables {
            canonical: KeyTable::new(false),
            compact: KeyTable::new(true),
            values,
        }
    })
}

/// The name of row key `k` (`featureK` or `label`).
fn key_name(k: usize) -> String {
    if k == LABEL {
        "label".to_owned()
    } else {
        format!("feature{k}")
    }
}

// ---------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------

/// Number of decimal digits of `n`.
fn digits(mut n: usize) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

/// Exact encoded length in bytes (including the trailing `'\n'`), for buffer
/// sizing.
///
/// The result is meaningful when `pixels.len() == labels.len() * FEATURES`
/// (what [`encode`] requires); otherwise it counts the digits of all given
/// pixels and the keys of `labels.len()` rows.
pub fn encoded_len(labels: &[u16], pixels: &[u8]) -> usize {
    let t = tables();
    let n = labels.len();
    // `{`, `}` and `\n`.
    let mut len = 3;
    if n == 0 {
        return len;
    }
    // Keys (with separators) of one row, `{` of the row included, plus `}`.
    let row_keys: usize = t
        .canonical
        .len
        .iter()
        .map(|&l| usize::from(l))
        .sum::<usize>()
        + 1;
    len += n * row_keys;
    // `"i": ` for every row and `, ` between rows.
    len += 4 * n + 2 * (n - 1);
    // Row index digits: sum over 0..n.
    let mut start = 0;
    let mut width = 1;
    let mut next = 10;
    while start < n {
        let end = n.min(next);
        len += (end - start) * width;
        start = end;
        width += 1;
        next = next.saturating_mul(10);
    }
    len += labels
        .iter()
        .map(|&l| digits(usize::from(l)))
        .sum::<usize>();
    // Pixel digits: 1 + (v >= 10) + (v >= 100); written to vectorise.
    let mut extra = 0usize;
    for chunk in pixels.chunks(FEATURES) {
        let mut c: u32 = 0;
        for &v in chunk {
            c += u32::from(v >= 10) + u32::from(v >= 100);
        }
        extra += c as usize;
    }
    len + pixels.len() + extra
}

/// Append the encoding of a batch (`labels.len()` images, `pixels.len() ==
/// labels.len() * FEATURES`), including the trailing `'\n'`.
///
/// The output is byte for byte what Python writes for
/// `json.dumps({0: {"feature0": p0, ..., "feature3071": p3071, "label": l}, 1: ...}) + "\n"`.
/// Labels are written as given, even outside 0..=9.
///
/// # Panics
///
/// Panics if `pixels.len() != labels.len() * FEATURES`.
pub fn encode(labels: &[u16], pixels: &[u8], out: &mut Vec<u8>) {
    assert!(
        labels.len().checked_mul(FEATURES) == Some(pixels.len()),
        "spark_json::encode: {} pixel bytes for {} labels (expected {} per image)",
        pixels.len(),
        labels.len(),
        FEATURES
    );
    let t = tables();
    let len = encoded_len(labels, pixels);
    let start = out.len();
    out.resize(start + len + ENCODE_SLACK, 0);
    let buf = &mut out[start..];
    buf[0] = b'{';
    let mut p = 1;
    let keys = &t.canonical;
    for (i, (image, &label)) in pixels.chunks_exact(FEATURES).zip(labels).enumerate() {
        if i > 0 {
            buf[p..p + 2].copy_from_slice(b", ");
            p += 2;
        }
        buf[p] = b'"';
        p += 1;
        p += write_usize(&mut buf[p..], i);
        buf[p..p + 3].copy_from_slice(b"\": ");
        p += 3;
        for ((&v, &head), &klen) in image
            .iter()
            .zip(&keys.head[..FEATURES])
            .zip(&keys.len[..FEATURES])
        {
            buf[p..p + 16].copy_from_slice(&head.to_le_bytes());
            buf[p + 16] = b' ';
            p += usize::from(klen);
            let word = t.values[usize::from(v)];
            buf[p..p + 4].copy_from_slice(&word.to_le_bytes());
            p += (word >> 24) as usize;
        }
        buf[p..p + 16].copy_from_slice(&keys.head[LABEL].to_le_bytes());
        p += usize::from(keys.len[LABEL]);
        p += write_usize(&mut buf[p..], usize::from(label));
        buf[p] = b'}';
        p += 1;
    }
    buf[p..p + 2].copy_from_slice(b"}\n");
    p += 2;
    debug_assert_eq!(p, len);
    out.truncate(start + p);
}

/// Writes `n` in decimal at the start of `buf`, returning the digit count.
fn write_usize(buf: &mut [u8], mut n: usize) -> usize {
    let d = digits(n);
    for slot in buf[..d].iter_mut().rev() {
        *slot = b'0' + (n % 10) as u8;
        n /= 10;
    }
    d
}

// ---------------------------------------------------------------------------
// Decoding: fast paths
// ---------------------------------------------------------------------------

/// Checks that key `k` of table `t` (with its separators) is at `p`; returns
/// the position after it.
#[inline(always)]
fn match_key(line: &[u8], p: usize, t: &KeyTable, k: usize) -> Option<usize> {
    let len = usize::from(t.len[k]);
    let word = match line.get(p..)?.first_chunk::<16>() {
        Some(chunk) => u128::from_le_bytes(*chunk),
        // Near the end of the line (the label key of the last row).
        None => {
            let rest = line.get(p..p + len.min(16))?;
            let mut bytes = [0u8; 16];
            bytes[..rest.len()].copy_from_slice(rest);
            u128::from_le_bytes(bytes)
        }
    };
    let mask = u128::MAX >> (128 - 8 * len.min(16));
    if word & mask != t.head[k] {
        return None;
    }
    if len > 16 && line.get(p + 16) != Some(&b' ') {
        return None;
    }
    Some(p + len)
}

/// Parses a canonical integer of 1..=3 digits at `p` that is at most 255;
/// returns it and its digit count. Anything else (including a number at the
/// very end of the line) gives `None`.
#[inline(always)]
fn small_uint(line: &[u8], p: usize) -> Option<(u8, usize)> {
    let x = u32::from_le_bytes(*line.get(p..)?.first_chunk::<4>()?);
    let t = x ^ 0x3030_3030;
    // High bit of each byte set where the byte is not an ASCII digit.
    let non_digit = (((t & 0x7f7f_7f7f) + 0x7676_7676) | t) & 0x8080_8080;
    let n = non_digit.trailing_zeros() / 8;
    // Move the n digits to the top bytes: d0 in byte 1, d1 in byte 2, d2 in byte 3.
    let s = t.wrapping_shl(32 - 8 * n);
    let v = ((s >> 8) & 0xff) * 100 + ((s >> 16) & 0xff) * 10 + (s >> 24);
    let bad = (n.wrapping_sub(1) > 2) | ((n > 1) & (t & 0xff == 0)) | (v > 255);
    if bad {
        return None;
    }
    Some((v as u8, n as usize))
}

/// Parses a row laid out exactly as table `t` describes, starting at its `{`.
/// Returns the position after the row's `}` and the label. Fills `px` (maybe
/// partially when it fails).
#[inline(always)]
fn fast_row(
    line: &[u8],
    mut p: usize,
    t: &KeyTable,
    px: &mut [u8; FEATURES],
) -> Option<(usize, u16)> {
    for (k, slot) in px.iter_mut().enumerate() {
        p = match_key(line, p, t, k)?;
        let (v, n) = small_uint(line, p)?;
        *slot = v;
        p += n;
    }
    p = match_key(line, p, t, LABEL)?;
    match line.get(p..p + 2)? {
        [d @ b'0'..=b'9', b'}'] => Some((p + 2, u16::from(d - b'0'))),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Decoding: general parser
// ---------------------------------------------------------------------------

/// Reusable buffers for the general parser.
#[derive(Default)]
struct Scratch {
    /// Open containers while skipping a value (`b'{'` or `b'['`).
    stack: Vec<u8>,
    /// A key with escapes, decoded.
    key: Vec<u8>,
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn skip_ws(line: &[u8], mut p: usize) -> usize {
    while line.get(p).is_some_and(|&b| is_ws(b)) {
        p += 1;
    }
    p
}

/// Checks for `byte` at `p` and returns the position after it.
fn expect(line: &[u8], p: usize, byte: u8, what: &str) -> PResult<usize> {
    match line.get(p) {
        Some(&b) if b == byte => Ok(p + 1),
        Some(_) => Err(PErr::new(p, format!("expected {what}"))),
        None => Err(eol(line)),
    }
}

/// Quotes `bytes` for an error message, shortened when long.
fn quoted(bytes: &[u8]) -> String {
    const MAX: usize = 40;
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX)]);
    let ellipsis = if bytes.len() > MAX { "..." } else { "" };
    format!("\"{}{ellipsis}\"", text.escape_debug())
}

fn hex_value(b: u8) -> Option<u32> {
    (b as char).to_digit(16)
}

/// Validates the JSON string starting with the `"` at `p`. Returns the
/// position after the closing quote and whether the string has escapes.
fn read_string(line: &[u8], p: usize) -> PResult<(usize, bool)> {
    let start = p + 1;
    let mut q = start;
    let mut escaped = false;
    let mut high = 0u8;
    loop {
        let Some(&b) = line.get(q) else {
            return Err(eol(line));
        };
        match b {
            b'"' => break,
            b'\\' => {
                escaped = true;
                match line.get(q + 1) {
                    None => return Err(eol(line)),
                    Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => q += 2,
                    Some(b'u') => {
                        let hex = line.get(q + 2..q + 6).ok_or_else(|| eol(line))?;
                        if !hex.iter().all(u8::is_ascii_hexdigit) {
                            return Err(PErr::new(q, "invalid \\u escape in string"));
                        }
                        q += 6;
                    }
                    Some(_) => return Err(PErr::new(q, "invalid escape in string")),
                }
            }
            0..=0x1f => return Err(PErr::new(q, "control character in string")),
            _ => {
                high |= b;
                q += 1;
            }
        }
    }
    if high >= 0x80 {
        if let Err(e) = std::str::from_utf8(&line[start..q]) {
            return Err(PErr::new(
                start + e.valid_up_to(),
                "invalid UTF-8 in string",
            ));
        }
    }
    Ok((q + 1, escaped))
}

/// Decodes the escapes of a validated string body into `out`. Characters
/// outside ASCII become `0xff`, which no known key contains.
fn unescape(raw: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let mut i = 0;
    while let Some(&b) = raw.get(i) {
        if b != b'\\' {
            out.push(if b < 0x80 { b } else { 0xff });
            i += 1;
            continue;
        }
        let c = match raw.get(i + 1) {
            Some(b'b') => 0x08,
            Some(b'f') => 0x0c,
            Some(b'n') => b'\n',
            Some(b'r') => b'\r',
            Some(b't') => b'\t',
            Some(b'u') => {
                let code = raw
                    .get(i + 2..i + 6)
                    .unwrap_or_default()
                    .iter()
                    .try_fold(0u32, |acc, &h| Some(acc * 16 + hex_value(h)?));
                i += 4;
                match code {
                    Some(c) if c < 0x80 => c as u8,
                    _ => 0xff,
                }
            }
            Some(&other) => other,
            None => 0xff,
        };
        out.push(c);
        i += 2;
    }
}

/// Reads the key string at `p`; returns the position after it and the key's
/// bytes (escapes decoded into `scratch`).
fn read_key<'a>(line: &'a [u8], p: usize, scratch: &'a mut Vec<u8>) -> PResult<(usize, &'a [u8])> {
    expect(line, p, b'"', "'\"' (a key)")?;
    let (end, escaped) = read_string(line, p)?;
    let raw = &line[p + 1..end - 1];
    if escaped {
        unescape(raw, scratch);
        Ok((end, scratch))
    } else {
        Ok((end, raw))
    }
}

/// What a key of a row names.
enum RowKey {
    /// Pixel K or the label (index [`LABEL`]).
    Known(usize),
    /// Anything else; its value is skipped.
    Unknown,
}

fn classify_key(key: &[u8], offset: usize) -> PResult<RowKey> {
    if key == b"label" {
        return Ok(RowKey::Known(LABEL));
    }
    let Some(digits) = key.strip_prefix(b"feature") else {
        return Ok(RowKey::Unknown);
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Ok(RowKey::Unknown);
    }
    if digits.len() > 1 && digits[0] == b'0' {
        return Err(PErr::new(
            offset,
            format!("invalid pixel key {}", quoted(key)),
        ));
    }
    let k = if digits.len() <= 4 {
        digits
            .iter()
            .fold(0usize, |acc, &d| acc * 10 + usize::from(d - b'0'))
    } else {
        usize::MAX
    };
    if k >= FEATURES {
        return Err(PErr::new(
            offset,
            format!("key {} out of range", quoted(key)),
        ));
    }
    Ok(RowKey::Known(k))
}

/// Parses the value of key `k` (pixel or label) at `p`; returns the value and
/// the position after it.
fn parse_known_value(line: &[u8], p: usize, k: usize) -> PResult<(u16, usize)> {
    let max: u32 = if k == LABEL { LABEL_MAX } else { 255 };
    let describe = |text: &[u8]| {
        if k == LABEL {
            format!(
                "label {} outside 0..{LABEL_MAX}",
                String::from_utf8_lossy(text)
            )
        } else {
            format!(
                "value {} of \"feature{k}\" outside 0..255",
                String::from_utf8_lossy(text)
            )
        }
    };
    let not_integer = || PErr::new(p, format!("value of \"{}\" is not an integer", key_name(k)));
    let negative = line.get(p) == Some(&b'-');
    let first = p + usize::from(negative);
    let mut q = first;
    while line.get(q).is_some_and(u8::is_ascii_digit) {
        q += 1;
    }
    if q == first {
        return match line.get(q) {
            None => Err(eol(line)),
            Some(_) if negative => Err(PErr::new(p, "invalid number")),
            Some(_) => Err(not_integer()),
        };
    }
    if q - first > 1 && line[first] == b'0' {
        return Err(PErr::new(p, "invalid number (leading zero)"));
    }
    if matches!(line.get(q), Some(b'.' | b'e' | b'E')) {
        return Err(not_integer());
    }
    let text = &line[p..q];
    if text.len() > 24 {
        let mut short = text[..20].to_vec();
        short.extend_from_slice(b"...");
        return Err(PErr::new(p, describe(&short)));
    }
    let value = line[first..q].iter().fold(0u32, |acc, &d| {
        acc.saturating_mul(10).saturating_add(u32::from(d - b'0'))
    });
    if negative || value > max {
        return Err(PErr::new(p, describe(text)));
    }
    Ok((value as u16, q))
}

/// Skips a JSON number at `p`, validating its grammar.
fn skip_number(line: &[u8], mut p: usize) -> PResult<usize> {
    let start = p;
    let digit_at = |q: usize| line.get(q).is_some_and(u8::is_ascii_digit);
    let invalid = |q: usize| {
        if q >= line.len() {
            eol(line)
        } else {
            PErr::new(start, "invalid number")
        }
    };
    if line.get(p) == Some(&b'-') {
        p += 1;
    }
    match line.get(p) {
        Some(b'0') => p += 1,
        Some(b'1'..=b'9') => {
            while digit_at(p) {
                p += 1;
            }
        }
        _ => return Err(invalid(p)),
    }
    if line.get(p) == Some(&b'.') {
        p += 1;
        if !digit_at(p) {
            return Err(invalid(p));
        }
        while digit_at(p) {
            p += 1;
        }
    }
    if matches!(line.get(p), Some(b'e' | b'E')) {
        p += 1;
        if matches!(line.get(p), Some(b'+' | b'-')) {
            p += 1;
        }
        if !digit_at(p) {
            return Err(invalid(p));
        }
        while digit_at(p) {
            p += 1;
        }
    }
    Ok(p)
}

/// Skips (and validates) any JSON value at `p` (after whitespace); returns
/// the position after it. Iterative, so deep nesting cannot overflow the stack.
fn skip_value(line: &[u8], mut p: usize, stack: &mut Vec<u8>) -> PResult<usize> {
    stack.clear();
    loop {
        // A value starts at p (after whitespace).
        p = skip_ws(line, p);
        let Some(&b) = line.get(p) else {
            return Err(eol(line));
        };
        match b {
            b'"' => p = read_string(line, p)?.0,
            b'-' | b'0'..=b'9' => p = skip_number(line, p)?,
            b't' | b'f' | b'n' => {
                let word: &[u8] = match b {
                    b't' => b"true",
                    b'f' => b"false",
                    _ => b"null",
                };
                match line.get(p..p + word.len()) {
                    Some(w) if w == word => p += word.len(),
                    Some(_) => return Err(PErr::new(p, "invalid literal")),
                    None if line[p..] == word[..line.len() - p] => return Err(eol(line)),
                    None => return Err(PErr::new(p, "invalid literal")),
                }
            }
            b'[' | b'{' => {
                p = skip_ws(line, p + 1);
                let close = if b == b'[' { b']' } else { b'}' };
                if line.get(p) == Some(&close) {
                    p += 1;
                } else {
                    stack.push(b);
                    if b == b'{' {
                        p = skip_member_key(line, p)?;
                    }
                    continue;
                }
            }
            _ => return Err(PErr::new(p, "expected a value")),
        }
        // After a value: close finished containers, or move to the next item.
        loop {
            let Some(&open) = stack.last() else {
                return Ok(p);
            };
            p = skip_ws(line, p);
            let close = if open == b'[' { b']' } else { b'}' };
            match line.get(p) {
                None => return Err(eol(line)),
                Some(&b',') => {
                    p += 1;
                    if open == b'{' {
                        p = skip_member_key(line, skip_ws(line, p))?;
                    }
                    break;
                }
                Some(&c) if c == close => {
                    stack.pop();
                    p += 1;
                }
                Some(_) => {
                    let what = if open == b'[' {
                        "',' or ']'"
                    } else {
                        "',' or '}'"
                    };
                    return Err(PErr::new(p, format!("expected {what}")));
                }
            }
        }
    }
}

/// Skips `"key" :` inside a skipped object; returns the position after `:`.
fn skip_member_key(line: &[u8], p: usize) -> PResult<usize> {
    expect(line, p, b'"', "'\"' (a key)")?;
    let (p, _) = read_string(line, p)?;
    expect(line, skip_ws(line, p), b':', "':'")
}

/// Parses a row by key name, starting at its `{`. Returns the position after
/// its `}` and the label; fills all of `px`.
fn slow_row(
    line: &[u8],
    p: usize,
    px: &mut [u8; FEATURES],
    scratch: &mut Scratch,
) -> PResult<(usize, u16)> {
    let mut seen = [0u64; SEEN_WORDS];
    let mut count = 0usize;
    let mut label = 0u16;
    let mut p = skip_ws(line, p + 1);
    if line.get(p) != Some(&b'}') {
        loop {
            let key_at = p;
            let (after, id) = match quick_key(line, p) {
                Some((after, k)) => (after, RowKey::Known(k)),
                None => {
                    let (after, key) = read_key(line, p, &mut scratch.key)?;
                    (after, classify_key(key, key_at)?)
                }
            };
            p = expect(line, skip_ws(line, after), b':', "':'")?;
            p = skip_ws(line, p);
            match id {
                RowKey::Known(k) => {
                    let (word, bit) = (k / 64, 1u64 << (k % 64));
                    if seen[word] & bit != 0 {
                        return Err(PErr::new(
                            key_at,
                            format!("duplicate key \"{}\"", key_name(k)),
                        ));
                    }
                    seen[word] |= bit;
                    count += 1;
                    let (v, q) = match small_uint(line, p) {
                        // `small_uint` stops at a non-digit; make sure the number ends there.
                        Some((v, n))
                            if !matches!(line.get(p + n), Some(b'.' | b'e' | b'E'))
                                && (k != LABEL || v <= 9) =>
                        {
                            (u16::from(v), p + n)
                        }
                        _ => parse_known_value(line, p, k)?,
                    };
                    if k == LABEL {
                        label = v;
                    } else {
                        // `parse_known_value` keeps a pixel within 0..=255.
                        px[k] = v as u8;
                    }
                    p = q;
                }
                RowKey::Unknown => p = skip_value(line, p, &mut scratch.stack)?,
            }
            p = skip_ws(line, p);
            match line.get(p) {
                Some(b',') => p = skip_ws(line, p + 1),
                Some(b'}') => break,
                Some(_) => return Err(PErr::new(p, "expected ',' or '}'")),
                None => return Err(eol(line)),
            }
        }
    }
    if count != ROW_KEYS {
        let missing = (0..ROW_KEYS)
            .find(|&k| seen[k / 64] & (1 << (k % 64)) == 0)
            .unwrap_or(LABEL);
        return Err(PErr::new(
            p,
            format!("missing key \"{}\"", key_name(missing)),
        ));
    }
    Ok((p + 1, label))
}

/// Recognises a plain `"featureK"` (canonical K below [`FEATURES`]) or
/// `"label"` key at `p`; returns the position after it and the key index.
/// Anything else, including errors, is left to the general key parser.
#[inline(always)]
fn quick_key(line: &[u8], p: usize) -> Option<(usize, usize)> {
    let head = line.get(p..)?.first_chunk::<8>()?;
    if head == b"\"feature" {
        let mut q = p + 8;
        let mut k = 0usize;
        while let Some(&d) = line.get(q).filter(|d| d.is_ascii_digit()) {
            k = k * 10 + usize::from(d - b'0');
            q += 1;
            if q - p > 12 {
                return None;
            }
        }
        let n = q - (p + 8);
        let canonical = n == 1 || (n > 1 && line[p + 8] != b'0');
        (canonical && k < FEATURES && line.get(q) == Some(&b'"')).then_some((q + 1, k))
    } else if &head[..7] == b"\"label\"" {
        Some((p + 7, LABEL))
    } else {
        None
    }
}

/// Parses a top-level key as a row index.
fn parse_row_key(key: &[u8], offset: usize) -> PResult<u32> {
    let canonical = !key.is_empty()
        && key.iter().all(u8::is_ascii_digit)
        && (key.len() == 1 || key[0] != b'0')
        && key.len() <= 10;
    let value = canonical
        .then(|| {
            key.iter().try_fold(0u32, |acc, &d| {
                acc.checked_mul(10)?.checked_add(u32::from(d - b'0'))
            })
        })
        .flatten();
    value.ok_or_else(|| {
        PErr::new(
            offset,
            format!("row key {} is not a decimal integer", quoted(key)),
        )
    })
}

/// Decode one line (without its `'\n'`) into `out`, replacing its contents.
/// On error `out` is left in an unspecified (but valid) state.
pub fn decode(line: &[u8], out: &mut DecodedBatch) -> Result<(), LineError> {
    decode_classes(line, out, crate::model::CLASSES)
}

/// [`decode`] for a run of `classes` classes: a row whose label is not below `classes`
/// rejects the line, naming the row.
pub fn decode_classes(
    line: &[u8],
    out: &mut DecodedBatch,
    classes: usize,
) -> Result<(), LineError> {
    decode_with(line, out, true)?;
    if let Some(i) = out.labels.iter().position(|&l| usize::from(l) >= classes) {
        return Err(LineError {
            row: out.rows.get(i).copied(),
            offset: 0,
            reason: format!(
                "label {} outside 0..{} (the run's classes)",
                out.labels[i],
                classes.saturating_sub(1)
            ),
        });
    }
    Ok(())
}

/// [`decode`], with the fast paths optionally disabled (for testing that
/// they agree with the general parser).
fn decode_with(line: &[u8], out: &mut DecodedBatch, fast: bool) -> Result<(), LineError> {
    out.clear();
    let t = tables();
    let mut scratch = Scratch::default();
    let mut p = skip_ws(line, 0);
    p = expect(line, p, b'{', "'{'").map_err(|e| e.at_row(None))?;
    p = skip_ws(line, p);
    if line.get(p) == Some(&b'}') {
        p += 1;
    } else {
        loop {
            let position = out.rows.len() as u32;
            let key_at = p;
            let (after, key) =
                read_key(line, p, &mut scratch.key).map_err(|e| e.at_row(Some(position)))?;
            let row = parse_row_key(key, key_at).map_err(|e| e.at_row(Some(position)))?;
            let in_row = |e: PErr| e.at_row(Some(row));
            p = expect(line, skip_ws(line, after), b':', "':'").map_err(in_row)?;
            p = skip_ws(line, p);
            expect(line, p, b'{', "'{' (a row object)").map_err(in_row)?;

            let base = out.pixels.len();
            out.pixels.resize(base + FEATURES, 0);
            let px: &mut [u8; FEATURES] = out.pixels[base..]
                .first_chunk_mut()
                .expect("just resized to hold FEATURES more bytes");
            let done = if fast {
                fast_row(line, p, &t.canonical, px).or_else(|| fast_row(line, p, &t.compact, px))
            } else {
                None
            };
            let (end, label) = match done {
                Some(done) => done,
                None => slow_row(line, p, px, &mut scratch).map_err(in_row)?,
            };
            out.rows.push(row);
            out.labels.push(label);

            p = skip_ws(line, end);
            match line.get(p) {
                Some(b',') => p = skip_ws(line, p + 1),
                Some(b'}') => {
                    p += 1;
                    break;
                }
                Some(_) => return Err(PErr::new(p, "expected ',' or '}'").at_row(None)),
                None => return Err(eol(line).at_row(None)),
            }
        }
    }
    p = skip_ws(line, p);
    if p != line.len() {
        return Err(PErr::new(p, "trailing characters after '}'").at_row(None));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// xorshift64* pseudo-random generator.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn random_batch(rng: &mut Rng, n: usize) -> (Vec<u16>, Vec<u8>) {
        let labels = (0..n).map(|_| rng.below(10) as u16).collect();
        let pixels = (0..n * FEATURES).map(|_| rng.next() as u8).collect();
        (labels, pixels)
    }

    fn encoded(labels: &[u16], pixels: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(labels, pixels, &mut out);
        out
    }

    fn decoded(line: &[u8]) -> Result<DecodedBatch, LineError> {
        let mut out = DecodedBatch::default();
        decode(line, &mut out).map(|()| out)
    }

    /// Strips the trailing newline of an encoded batch.
    fn body(line: &[u8]) -> &[u8] {
        line.strip_suffix(b"\n").unwrap()
    }

    fn check_batch(batch: &DecodedBatch, labels: &[u16], pixels: &[u8]) {
        assert_eq!(batch.len(), labels.len());
        assert_eq!(batch.rows, (0..labels.len() as u32).collect::<Vec<_>>());
        assert_eq!(batch.labels, labels);
        assert!(batch.pixels == pixels, "pixels differ");
    }

    /// Renders a batch in an arbitrary style: `ws` yields the whitespace
    /// between tokens, `shuffle` permutes the keys of each row and `extra`
    /// adds unknown keys with assorted values.
    fn render(
        labels: &[u16],
        pixels: &[u8],
        rng: &mut Rng,
        ws: &dyn Fn(&mut Rng) -> String,
        shuffle: bool,
        extra: bool,
    ) -> Vec<u8> {
        let mut s = String::new();
        s += &ws(rng);
        s.push('{');
        for (i, &label) in labels.iter().enumerate() {
            if i > 0 {
                s += &ws(rng);
                s.push(',');
            }
            s += &format!("{}\"{i}\"{}:{}{{", ws(rng), ws(rng), ws(rng));
            let mut members: Vec<(String, String)> = (0..FEATURES)
                .map(|k| (format!("feature{k}"), pixels[i * FEATURES + k].to_string()))
                .collect();
            members.push(("label".into(), label.to_string()));
            if extra {
                members.push(("filenames".into(), r#""a\"b\\c\u00e9\n/é.png""#.into()));
                members.push((
                    "nested".into(),
                    r#"{"a": [1, -2.5e+3, {"b": [[], {}]}, true, false, null], "c": ""}"#.into(),
                ));
                members.push(("feature".into(), "[]".into()));
                members.push(("featureX".into(), "0.5".into()));
                members.push(("Label".into(), "-0".into()));
            }
            if shuffle {
                for j in (1..members.len()).rev() {
                    members.swap(j, rng.below(j + 1));
                }
            }
            for (j, (k, v)) in members.iter().enumerate() {
                if j > 0 {
                    s += &ws(rng);
                    s.push(',');
                }
                s += &format!("{}\"{k}\"{}:{}{v}", ws(rng), ws(rng), ws(rng));
            }
            s += &ws(rng);
            s.push('}');
        }
        s += &ws(rng);
        s.push('}');
        s += &ws(rng);
        s.into_bytes()
    }

    fn messy_ws(rng: &mut Rng) -> String {
        const WS: [char; 4] = [' ', '\t', '\n', '\r'];
        (0..rng.below(4)).map(|_| WS[rng.below(4)]).collect()
    }

    #[test]
    fn labels_up_to_u16_round_trip_and_the_run_bounds_them() {
        let mut rng = Rng(7);
        let (_, pixels) = random_batch(&mut rng, 4);
        let labels = [0u16, 255, 999, 65535];
        let line = encoded(&labels, &pixels);
        assert!(body(&line).ends_with(b"\"label\": 65535}}"));
        let mut out = DecodedBatch::default();
        decode_classes(body(&line), &mut out, 65536).unwrap();
        check_batch(&out, &labels, &pixels);
        let e = decode_classes(body(&line), &mut out, 1000).unwrap_err();
        assert_eq!(e.row, Some(3));
        assert!(
            e.reason.contains("label 65535 outside 0..999"),
            "{}",
            e.reason
        );
        let big = String::from_utf8(body(&line).to_vec())
            .unwrap()
            .replace("\"label\": 65535", "\"label\": 65536");
        let e = decode_classes(big.as_bytes(), &mut out, 1000).unwrap_err();
        assert!(
            e.reason.contains("label 65536 outside 0..65535"),
            "{}",
            e.reason
        );
    }

    #[test]
    fn round_trip() {
        let mut rng = Rng(0x1234_5678_9abc_def0);
        let mut batch = DecodedBatch::default();
        for n in [0, 1, 2, 7, 128] {
            let (labels, pixels) = random_batch(&mut rng, n);
            let mut out = b"prefix".to_vec();
            encode(&labels, &pixels, &mut out);
            assert_eq!(&out[..6], b"prefix");
            let line = &out[6..];
            assert_eq!(line.len(), encoded_len(&labels, &pixels));
            assert_eq!(line.last(), Some(&b'\n'));
            decode(body(line), &mut batch).unwrap();
            check_batch(&batch, &labels, &pixels);
        }
        assert_eq!(encoded(&[], &[]), b"{}\n");
    }

    #[test]
    fn extreme_values_round_trip() {
        let mut pixels = vec![0u8; 3 * FEATURES];
        pixels[FEATURES..2 * FEATURES].fill(255);
        for (i, p) in pixels[2 * FEATURES..].iter_mut().enumerate() {
            *p = [9, 10, 99, 100][i % 4];
        }
        let labels = [0, 9, 5];
        let line = encoded(&labels, &pixels);
        check_batch(&decoded(body(&line)).unwrap(), &labels, &pixels);
    }

    #[test]
    fn many_rows_have_multi_digit_keys() {
        let mut rng = Rng(99);
        let (labels, pixels) = random_batch(&mut rng, 1001);
        let line = encoded(&labels, &pixels);
        assert_eq!(line.len(), encoded_len(&labels, &pixels));
        check_batch(&decoded(body(&line)).unwrap(), &labels, &pixels);
    }

    #[test]
    fn matches_python_json_dumps() {
        let mut rng = Rng(42);
        for n in [0usize, 1, 3, 12] {
            let (labels, pixels) = random_batch(&mut rng, n);
            let path =
                std::env::temp_dir().join(format!("spark_json_py_{}_{n}.bin", std::process::id()));
            let mut data: Vec<u8> = labels.iter().map(|&l| l as u8).collect();
            data.extend_from_slice(&pixels);
            std::fs::write(&path, &data).unwrap();
            let script = format!(
                "import json, sys\n\
                 data = open(sys.argv[1], 'rb').read()\n\
                 n = {n}\n\
                 labels, px = data[:n], data[n:]\n\
                 batch = {{i: {{**{{'feature%d' % k: px[i * {FEATURES} + k] for k in range({FEATURES})}}, 'label': labels[i]}} for i in range(n)}}\n\
                 sys.stdout.write(json.dumps(batch) + '\\n')\n"
            );
            let result = Command::new("python3")
                .arg("-c")
                .arg(&script)
                .arg(&path)
                .output();
            let _ = std::fs::remove_file(&path);
            let Ok(output) = result else {
                crate::testing::skip("the json.dumps comparison", "python3");
                return;
            };
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            let ours = encoded(&labels, &pixels);
            assert!(
                ours == output.stdout,
                "encoding of {n} rows differs from json.dumps"
            );
        }
    }

    #[test]
    fn whitespace_variants_decode_the_same() {
        let mut rng = Rng(7);
        let (labels, pixels) = random_batch(&mut rng, 3);
        let none = render(&labels, &pixels, &mut rng, &|_| String::new(), false, false);
        check_batch(&decoded(&none).unwrap(), &labels, &pixels);
        let spaces = render(&labels, &pixels, &mut rng, &|_| "  ".into(), false, false);
        check_batch(&decoded(&spaces).unwrap(), &labels, &pixels);
        for _ in 0..3 {
            let messy = render(&labels, &pixels, &mut rng, &messy_ws, false, false);
            check_batch(&decoded(&messy).unwrap(), &labels, &pixels);
        }
        // Canonical rows with a single deviation (falls back mid-row).
        let line = encoded(&labels, &pixels);
        let text = String::from_utf8(body(&line).to_vec()).unwrap();
        for (from, to) in [
            ("\"feature3071\": ", "\"feature3071\":\t"),
            (", \"label\": ", " ,\"label\" : "),
            ("\"feature0\": ", "\"feature0\":  "),
            ("}}", "} }"),
        ] {
            let changed = text.replacen(from, to, 2);
            assert_ne!(changed, text);
            check_batch(&decoded(changed.as_bytes()).unwrap(), &labels, &pixels);
        }
    }

    #[test]
    fn shuffled_keys_and_unknown_keys_decode_the_same() {
        let mut rng = Rng(11);
        let (labels, pixels) = random_batch(&mut rng, 4);
        for extra in [false, true] {
            let canon = |_: &mut Rng| String::new();
            let line = render(&labels, &pixels, &mut rng, &canon, true, extra);
            check_batch(&decoded(&line).unwrap(), &labels, &pixels);
            let line = render(&labels, &pixels, &mut rng, &messy_ws, true, extra);
            check_batch(&decoded(&line).unwrap(), &labels, &pixels);
        }
    }

    #[test]
    fn escaped_keys_are_recognised() {
        let mut rng = Rng(5);
        let (labels, pixels) = random_batch(&mut rng, 2);
        let line = encoded(&labels, &pixels);
        let text = String::from_utf8(body(&line).to_vec()).unwrap();
        let text = text
            .replace("\"feature0\"", "\"feature\\u0030\"")
            .replace("\"label\"", "\"l\\u0061bel\"")
            .replace("\"1\": {", "\"\\u0031\": {");
        check_batch(&decoded(text.as_bytes()).unwrap(), &labels, &pixels);
    }

    #[test]
    fn empty_object_is_an_empty_batch() {
        for line in [&b"{}"[..], b" { } ", b"\t{\r\n}\n"] {
            let batch = decoded(line).unwrap();
            assert!(batch.is_empty());
            assert!(batch.pixels.is_empty());
        }
        let mut batch = decoded(body(&encoded(&[3], &[1; FEATURES]))).unwrap();
        decode(b"{}", &mut batch).unwrap();
        assert_eq!(batch, DecodedBatch::default());
    }

    #[test]
    fn row_keys_are_reported_as_given() {
        let row = String::from_utf8(body(&encoded(&[4], &[8; FEATURES]))[6..].to_vec()).unwrap();
        let row = row.strip_suffix('}').unwrap();
        let line = format!("{{\"7\": {row}, \"4294967295\": {row}}}");
        let batch = decoded(line.as_bytes()).unwrap();
        assert_eq!(batch.rows, [7, 4_294_967_295]);
        assert_eq!(batch.labels, [4, 4]);
    }

    /// A canonical 2-row line as text.
    fn sample() -> String {
        let mut rng = Rng(3);
        let (mut labels, mut pixels) = random_batch(&mut rng, 2);
        labels[1] = 6;
        pixels[FEATURES + 5] = 77;
        pixels[FEATURES + 17] = 1;
        String::from_utf8(body(&encoded(&labels, &pixels)).to_vec()).unwrap()
    }

    #[track_caller]
    fn assert_rejected(line: &str, row: Option<u32>, reason: &str) {
        let err = decoded(line.as_bytes()).expect_err("line was accepted");
        assert_eq!(err.row, row, "{err}");
        assert!(err.reason.contains(reason), "{err:?} lacks {reason:?}");
        assert!(err.offset <= line.len());
        assert!(!err.to_string().is_empty());
    }

    #[test]
    fn rejections() {
        let s = sample();
        let in_row1 = |from: &str, to: &str| {
            let (head, tail) = s.split_at(s.find("\"1\": {").unwrap());
            format!("{head}{}", tail.replacen(from, to, 1))
        };
        assert_rejected(
            &in_row1("\"feature17\": 1, ", ""),
            Some(1),
            "missing key \"feature17\"",
        );
        assert_rejected(
            &in_row1(", \"label\": 6", ""),
            Some(1),
            "missing key \"label\"",
        );
        assert_rejected(
            &in_row1("\"feature5\": 77", "\"feature5\": 77, \"feature5\": 77"),
            Some(1),
            "duplicate key \"feature5\"",
        );
        assert_rejected(
            &in_row1("\"label\": 6", "\"label\": 6, \"label\": 6"),
            Some(1),
            "duplicate key \"label\"",
        );
        for bad in ["1.5", "\"7\"", "1e2", "null", "true", "[1]", "{}", "1.0"] {
            let line = in_row1("\"feature5\": 77", &format!("\"feature5\": {bad}"));
            assert_rejected(&line, Some(1), "value of \"feature5\" is not an integer");
        }
        assert_rejected(
            &in_row1("\"feature5\": 77", "\"feature5\": -1"),
            Some(1),
            "value -1 of \"feature5\" outside 0..255",
        );
        assert_rejected(
            &in_row1("\"feature5\": 77", "\"feature5\": 300"),
            Some(1),
            "value 300 of \"feature5\" outside 0..255",
        );
        assert_rejected(
            &in_row1("\"feature5\": 77", "\"feature5\": 256"),
            Some(1),
            "outside 0..255",
        );
        assert_rejected(
            &in_row1(
                "\"feature5\": 77",
                "\"feature5\": 99999999999999999999999999999999",
            ),
            Some(1),
            "outside 0..255",
        );
        assert_rejected(
            &in_row1("\"feature5\": 77", "\"feature5\": 077"),
            Some(1),
            "invalid number",
        );
        assert_rejected(
            &in_row1("\"label\": 6", "\"label\": 12"),
            Some(1),
            "label 12 outside 0..9",
        );
        assert_rejected(
            &in_row1("\"label\": 6", "\"label\": -3"),
            Some(1),
            "label -3 outside 0..65535",
        );
        assert_rejected(
            &in_row1("\"label\": 6", "\"label\": 6.0"),
            Some(1),
            "not an integer",
        );
        assert_rejected(
            &in_row1("\"feature5\": 77", "\"feature5\": 77, \"feature3072\": 1"),
            Some(1),
            "key \"feature3072\" out of range",
        );
        assert_rejected(
            &in_row1(
                "\"feature5\": 77",
                "\"feature5\": 77, \"feature123456789012345678901\": 1",
            ),
            Some(1),
            "out of range",
        );
        assert_rejected(
            &in_row1("\"feature5\": 77", "\"feature05\": 77"),
            Some(1),
            "invalid pixel key",
        );
        assert_rejected(
            &in_row1("\"feature5\": 77", "\"feature5\" 77"),
            Some(1),
            "expected ':'",
        );
        assert_rejected(
            &in_row1("\"feature5\": 77, ", "\"feature5\": 77 "),
            Some(1),
            "expected ',' or '}'",
        );
        assert_rejected(
            &in_row1("\"feature5\": 77", "\"feature5\": 77,"),
            Some(1),
            "expected '\"'",
        );
        assert_rejected(
            &in_row1("\"label\": 6}", "\"label\": 6, \"x\": [1, 2}"),
            Some(1),
            "expected ',' or ']'",
        );
        assert_rejected(
            &in_row1("\"label\": 6}", "\"label\": 6, \"x\": \"a\\qb\"}"),
            Some(1),
            "invalid escape",
        );
        assert_rejected(
            &in_row1("\"label\": 6}", "\"label\": 6, \"x\": \"a\tb\"}"),
            Some(1),
            "control character",
        );
        assert_rejected(
            &in_row1("\"label\": 6}", "\"label\": 6, \"x\": nul}"),
            Some(1),
            "invalid literal",
        );
        assert_rejected(
            &in_row1("\"label\": 6}", "\"label\": 6, \"x\": 01}"),
            Some(1),
            "expected ',' or '}'",
        );
        assert_rejected(
            &in_row1("\"label\": 6}", "\"label\": 6, \"x\": 1.}"),
            Some(1),
            "invalid number",
        );
        assert_rejected(
            &in_row1("\"label\": 6}", "\"label\": 6, \"x\": {1: 2}}"),
            Some(1),
            "expected '\"'",
        );
        // Row keys.
        assert_rejected(
            &s.replacen("\"1\": {", "\"x\": {", 1),
            Some(1),
            "row key \"x\" is not a decimal integer",
        );
        assert_rejected(
            &s.replacen("\"1\": {", "\"01\": {", 1),
            Some(1),
            "not a decimal integer",
        );
        assert_rejected(
            &s.replacen("\"1\": {", "\"-1\": {", 1),
            Some(1),
            "not a decimal integer",
        );
        assert_rejected(
            &s.replacen("\"1\": {", "\"4294967296\": {", 1),
            Some(1),
            "not a decimal integer",
        );
        assert_rejected(&s.replacen("\"1\": {", "1: {", 1), Some(1), "expected '\"'");
        assert_rejected(
            &s.replacen("\"1\": {", "\"1\": [", 1),
            Some(1),
            "expected '{'",
        );
        // Outside rows.
        assert_rejected(&format!("{s}x"), None, "trailing characters");
        assert_rejected(&format!("{s} }}"), None, "trailing characters");
        assert_rejected(
            &s.replacen("}, \"1\"", "} \"1\"", 1),
            None,
            "expected ',' or '}'",
        );
        assert_rejected(&s[..s.len() - 1], None, "unexpected end of line");
        assert_rejected("", None, "unexpected end of line");
        assert_rejected("   ", None, "unexpected end of line");
        assert_rejected("[]", None, "expected '{'");
        assert_rejected("{", Some(0), "unexpected end of line");
        assert_rejected("{\"0\": {}}", Some(0), "missing key \"feature0\"");
        assert_rejected(
            "{\"0\": {\"label\": 3}}",
            Some(0),
            "missing key \"feature0\"",
        );
    }

    #[test]
    fn error_positions() {
        let s = sample();
        let row1 = s.find("\"1\": {").unwrap();
        let bad = format!(
            "{}{}",
            &s[..row1],
            s[row1..].replacen("\"feature5\": 77", "\"feature5\": 300", 1)
        );
        let at1 = row1 + s[row1..].find("\"feature5\": 77").unwrap();
        let err = decoded(bad.as_bytes()).unwrap_err();
        assert_eq!(err.offset, at1 + "\"feature5\": ".len());
        assert_eq!(
            err.to_string(),
            format!(
                "row 1, byte {}: value 300 of \"feature5\" outside 0..255",
                err.offset
            )
        );
        let err = decoded(format!("{s}  x").as_bytes()).unwrap_err();
        assert_eq!(err.offset, s.len() + 2);
        assert_eq!(
            err.to_string(),
            format!("byte {}: trailing characters after '}}'", s.len() + 2)
        );
    }

    #[test]
    fn no_panics_on_truncations_and_flips() {
        let mut rng = Rng(0xdead_beef);
        let (labels, pixels) = random_batch(&mut rng, 2);
        let line = encoded(&labels, &pixels);
        let line = body(&line);
        let messy = render(&labels, &pixels, &mut rng, &messy_ws, true, true);
        let mut batch = DecodedBatch::default();
        for base in [line, &messy[..]] {
            // Truncations: every length near both ends, random ones in between.
            let n = base.len();
            // Cutting only trailing whitespace leaves a valid line.
            let end = n - base.iter().rev().take_while(|&&b| is_ws(b)).count();
            let mut cuts: Vec<usize> = (0..300).chain(n - 300..n).collect();
            cuts.extend((0..300).map(|_| rng.below(n)));
            for cut in cuts {
                let result = decode(&base[..cut], &mut batch);
                assert!(
                    result.is_err() || cut >= end,
                    "truncation at {cut} accepted"
                );
            }
            // Random byte flips and insertions.
            let mut mutated = base.to_vec();
            for _ in 0..1500 {
                mutated.clear();
                mutated.extend_from_slice(base);
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(mutated.len());
                    match rng.below(3) {
                        0 => mutated[at] = rng.next() as u8,
                        1 => mutated[at] ^= 1 << rng.below(8),
                        _ => {
                            const BYTES: &[u8] = b"{}[]\",: 0-\\u";
                            mutated.insert(at, BYTES[rng.below(BYTES.len())]);
                        }
                    }
                }
                if decode(&mutated, &mut batch).is_ok() {
                    assert_eq!(batch.len(), 2);
                    assert_eq!(batch.pixels.len(), 2 * FEATURES);
                }
            }
        }
        // Small hand-made lines, fully mutated.
        let small = br#"{"0": {"x": [1, {"y": "\u00e9\n"}, -2.5e-3, true, null], "z": {}}}"#;
        for _ in 0..20000 {
            let mut m = small.to_vec();
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(m.len());
                const BYTES: &[u8] = b"{}[]\",:0-9.eE+\\u \ttfn\xff\x80";
                m[at] = BYTES[rng.below(BYTES.len())];
            }
            let cut = rng.below(m.len() + 1);
            let _ = decode(&m[..cut], &mut batch);
            let _ = decode(&m, &mut batch);
        }
        // Deep nesting does not overflow the stack.
        let deep = format!(
            "{{\"0\": {{\"x\": {}{}}}}}",
            "[".repeat(200_000),
            "]".repeat(200_000)
        );
        let err = decoded(deep.as_bytes()).unwrap_err();
        assert!(err.reason.contains("missing key"), "{err}");
        let deep = format!("{{\"0\": {{\"x\": {}", "[{\"a\":".repeat(100_000));
        assert!(decoded(deep.as_bytes()).is_err());
    }

    #[test]
    fn fast_paths_take_their_layouts() {
        let mut rng = Rng(21);
        let (labels, pixels) = random_batch(&mut rng, 1);
        let t = tables();
        let mut px = [0u8; FEATURES];
        let line = encoded(&labels, &pixels);
        let at = line.iter().position(|&b| b == b'{').unwrap() + 1;
        let at = at + line[at..].iter().position(|&b| b == b'{').unwrap();
        assert_eq!(
            fast_row(&line, at, &t.canonical, &mut px),
            Some((line.len() - 2, labels[0]))
        );
        assert!(px[..] == pixels[..]);
        let compact = render(&labels, &pixels, &mut rng, &|_| String::new(), false, false);
        assert_eq!(
            fast_row(&compact, 5, &t.compact, &mut px),
            Some((compact.len() - 1, labels[0]))
        );
        assert_eq!(fast_row(&compact, 5, &t.canonical, &mut px), None);
    }

    #[test]
    fn fast_paths_agree_with_general_parser() {
        let mut rng = Rng(77);
        let (labels, pixels) = random_batch(&mut rng, 2);
        let canonical = encoded(&labels, &pixels);
        let compact = render(&labels, &pixels, &mut rng, &|_| String::new(), false, false);
        let (mut fast, mut slow) = (DecodedBatch::default(), DecodedBatch::default());
        const BYTES: &[u8] = b"0123456789 ,:.eE-+\"}{x";
        for base in [body(&canonical), &compact[..]] {
            let mut m = base.to_vec();
            for _ in 0..1200 {
                m.clear();
                m.extend_from_slice(base);
                for _ in 0..1 + rng.below(2) {
                    let at = rng.below(m.len());
                    match rng.below(3) {
                        0 => m[at] = BYTES[rng.below(BYTES.len())],
                        1 => {
                            m.remove(at);
                        }
                        _ => m.insert(at, BYTES[rng.below(BYTES.len())]),
                    }
                }
                let a = decode_with(&m, &mut fast, true);
                let b = decode_with(&m, &mut slow, false);
                assert_eq!(a, b);
                if a.is_ok() {
                    assert_eq!(fast, slow);
                }
            }
        }
    }

    #[test]
    fn invalid_utf8_is_rejected() {
        let s = sample();
        let mut line = s
            .replacen("\"label\": 6}", "\"label\": 6, \"x\": \"ab\"}", 1)
            .into_bytes();
        let at = line.windows(4).position(|w| w == b"\"ab\"").unwrap() + 1;
        line[at] = 0xff;
        let err = decoded(&line).unwrap_err();
        assert!(err.reason.contains("UTF-8"), "{err}");
        assert_eq!(err.offset, at);
    }
}
