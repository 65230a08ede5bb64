//! The pickle writer: a CIFAR batch dict with the opcodes of the official Python-2 files.

use std::io::{self, Write};

use crate::dataset::{Images, IMAGE_BYTES};

/// The 4-byte length of a BINSTRING (Python 2 reads it as a signed int).
fn binstring_len(len: usize) -> io::Result<[u8; 4]> {
    i32::try_from(len).map(i32::to_le_bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a string of {len} bytes is too long for a protocol-2 pickle (2 GiB)"),
        )
    })
}

/// A pickled string: SHORT_BINSTRING up to 255 bytes, BINSTRING beyond.
pub(in crate::dataset) fn put_str(out: &mut Vec<u8>, s: &[u8]) -> io::Result<()> {
    if let Ok(n) = u8::try_from(s.len()) {
        out.push(b'U');
        out.push(n);
    } else {
        out.push(b'T');
        out.extend_from_slice(&binstring_len(s.len())?);
    }
    out.extend_from_slice(s);
    Ok(())
}

/// A pickled non-negative int with the smallest of BININT1, BININT2, BININT.
pub(in crate::dataset) fn put_int(out: &mut Vec<u8>, n: usize) -> io::Result<()> {
    if let Ok(b) = u8::try_from(n) {
        out.extend_from_slice(&[b'K', b]);
    } else if let Ok(h) = u16::try_from(n) {
        out.push(b'M');
        out.extend_from_slice(&h.to_le_bytes());
    } else {
        let i = i32::try_from(n)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "int too large for BININT"))?;
        out.push(b'J');
        out.extend_from_slice(&i.to_le_bytes());
    }
    Ok(())
}

/// The whole batch pickle, streamed to `w` (the pixel data is not copied).
pub(in crate::dataset) fn encode_pickle<W: Write>(
    w: &mut W,
    images: &Images,
    batch_label: &str,
) -> io::Result<()> {
    let mut head = Vec::with_capacity(4096);
    head.extend_from_slice(b"\x80\x02}q\x01(");
    put_str(&mut head, b"batch_label")?;
    head.extend_from_slice(b"q\x02");
    put_str(&mut head, batch_label.as_bytes())?;
    head.extend_from_slice(b"q\x03");
    put_str(&mut head, b"labels")?;
    head.extend_from_slice(b"q\x04]q\x05");
    w.write_all(&head)?;
    // Like cPickle: APPENDS in batches of 1,000; a batch of one is a plain APPEND.
    for chunk in images.labels.chunks(1000) {
        head.clear();
        let int = |head: &mut Vec<u8>, label: u16| match u8::try_from(label) {
            // BININT1 for a byte, BININT2 above it.
            Ok(b) => head.extend_from_slice(&[b'K', b]),
            Err(_) => {
                head.push(b'M');
                head.extend_from_slice(&label.to_le_bytes());
            }
        };
        if let [label] = chunk {
            int(&mut head, *label);
            head.push(b'a');
        } else {
            head.push(b'(');
            for &label in chunk {
                int(&mut head, label);
            }
            head.push(b'e');
        }
        w.write_all(&head)?;
    }
    head.clear();
    put_str(&mut head, b"data")?;
    head.extend_from_slice(
        b"q\x06cnumpy.core.multiarray\n_reconstruct\nq\x07cnumpy\nndarray\nq\x08",
    );
    head.extend_from_slice(b"K\x00\x85U\x01b\x87Rq\x09(K\x01");
    put_int(&mut head, images.len())?;
    put_int(&mut head, IMAGE_BYTES)?;
    head.extend_from_slice(b"\x86cnumpy\ndtype\nq\x0aU\x02u1K\x00K\x01\x87Rq\x0b");
    head.extend_from_slice(b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89");
    head.push(b'T');
    head.extend_from_slice(&binstring_len(images.pixels.len())?);
    w.write_all(&head)?;
    w.write_all(&images.pixels)?;
    w.write_all(b"tbq\x0cu.")
}
