//! The stream server (`cifar-df stream`), the original `stream.py` re-made.
//!
//! It binds, accepts one client and writes the split's images to it in batches, in the
//! original's order and batching (see [`crate::dataset::Batcher`]). In `spark-json` the bytes
//! are exactly what the original Python server wrote.
//!
//! Encoding runs on its own thread, ahead of the socket by at most a couple of batches
//! (a bounded queue): a slow client slows the server down instead of growing its memory.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use arrow::ipc::writer::StreamWriter;

use crate::dataset::Batcher;
use crate::dataset::{self, DataSpec, Images, Split};
use crate::error::{Error, Result};
use crate::wire::batch::{make_batch_sized, stream_schema_sized};
use crate::wire::{ndjson, spark_json, Format};

/// How the server streams.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The dataset.
    pub data: DataSpec,
    /// Which split.
    pub split: Split,
    /// Images per batch.
    pub batch_size: usize,
    /// Repeat the split forever.
    pub endless: bool,
    /// Pause after each batch.
    pub sleep: Duration,
    /// Wire format.
    pub format: Format,
    /// Stop after this many batches.
    pub limit: Option<u64>,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// Give up on a client that reads nothing for this long (`None`: wait for it forever;
    /// either way the server holds at most a few encoded batches while it waits).
    pub write_timeout: Option<Duration>,
    /// Serve each epoch in a new order, shuffled from (this seed, the epoch): SGD then
    /// sees other mini-batches every epoch. `None` (the original's way): file order.
    pub shuffle: Option<u64>,
    /// The side of the images served (`--image-size`): the dataset's are resized to it
    /// (CIFAR's 32 by default). Only `ndjson` and `arrow` carry sides other than 32.
    pub image_side: usize,
}

/// What a server sent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServeSummary {
    /// Batches written.
    pub batches: u64,
    /// Images written.
    pub images: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Whether the client went away before the end.
    pub client_left: bool,
}

/// Bind the listening socket. Port 0 picks a free port.
pub fn bind(host: &str, port: u16) -> Result<TcpListener> {
    TcpListener::bind((host, port)).map_err(|e| Error::Net {
        what: format!("bind {host}:{port}"),
        source: e,
    })
}

/// Address a listener is bound to.
pub fn local_addr(listener: &TcpListener) -> Result<SocketAddr> {
    listener.local_addr().map_err(|e| Error::Net {
        what: "local address".into(),
        source: e,
    })
}

/// Load the split, accept one client on `listener` and stream to it.
pub fn serve(listener: &TcpListener, opts: &ServeOptions) -> Result<ServeSummary> {
    if opts.batch_size == 0 {
        return Err(Error::usage("--batch-size must be at least 1"));
    }
    opts.format.check_side(opts.image_side)?;
    let side = dataset::check_side(opts.image_side)?;
    let files = dataset::load_split_sized(&opts.data, opts.split, side)?.0;
    let (conn, peer) = listener.accept().map_err(|e| Error::Net {
        what: "accept a client".into(),
        source: e,
    })?;
    tracing::info!("client {peer} connected");
    let _ = conn.set_nodelay(false);
    conn.set_write_timeout(opts.write_timeout.filter(|t| !t.is_zero()))
        .map_err(|e| Error::Net {
            what: "set the write timeout".into(),
            source: e,
        })?;
    stream_to(conn, &files, opts)
}

/// A server on a free loopback port, on its own thread, streaming `files` (already loaded)
/// to the first client that connects: the one-process way to train over a real TCP
/// connection. Returns the address to connect to and the thread to join.
pub fn spawn_loopback(
    files: Vec<Images>,
    opts: ServeOptions,
) -> Result<(SocketAddr, std::thread::JoinHandle<Result<ServeSummary>>)> {
    if opts.batch_size == 0 {
        return Err(Error::usage("batch size must be at least 1"));
    }
    let listener = bind("127.0.0.1", 0)?;
    let addr = local_addr(&listener)?;
    let handle = std::thread::Builder::new()
        .name("cifar-df-server".into())
        .spawn(move || {
            let (conn, peer) = listener.accept().map_err(|e| Error::Net {
                what: "accept a client".into(),
                source: e,
            })?;
            tracing::debug!("loopback client {peer} connected");
            stream_to(conn, &files, &opts)
        })
        .map_err(|e| Error::Net {
            what: "start the loopback server thread".into(),
            source: e,
        })?;
    Ok((addr, handle))
}

/// One encoded chunk for the writer, and what it holds.
struct Chunk {
    bytes: Vec<u8>,
    images: usize,
    epoch: u64,
}

/// Stream `files` (one `Images` per dataset file) to `out` as the options say.
pub fn stream_to<W: Write>(
    mut out: W,
    files: &[Images],
    opts: &ServeOptions,
) -> Result<ServeSummary> {
    if let Some(f) = files.iter().find(|f| f.side != dataset::SIDE) {
        opts.format.check_side(f.side)?;
    }
    let (tx, rx) = mpsc::sync_channel::<Result<Chunk>>(2);
    let (back_tx, back_rx) = mpsc::channel::<Vec<u8>>();
    let mut summary = ServeSummary::default();
    let progress = crate::progress::spinner(opts.progress, crate::progress::BATCHES);
    let started = Instant::now();
    std::thread::scope(|scope| {
        let encoder = scope.spawn(move || encode_all(files, opts, tx, back_rx));
        for chunk in rx.iter() {
            let chunk = chunk?;
            if let Err(e) = out.write_all(&chunk.bytes).and_then(|_| out.flush()) {
                if is_disconnect(&e) {
                    summary.client_left = true;
                    tracing::debug!("client left after {} batches", summary.batches);
                    break;
                }
                if is_timeout(&e) {
                    let secs = opts.write_timeout.map_or(0.0, |t| t.as_secs_f64());
                    return Err(Error::Net {
                        what: format!(
                            "the client read nothing for {secs} s (--write-timeout) after {} \
                             batches ({} bytes) were sent; giving up on it",
                            summary.batches, summary.bytes
                        ),
                        source: e,
                    });
                }
                return Err(Error::Net {
                    what: "write to the client".into(),
                    source: e,
                });
            }
            summary.bytes += chunk.bytes.len() as u64;
            if chunk.images > 0 {
                summary.batches += 1;
                summary.images += chunk.images as u64;
                let secs = started.elapsed().as_secs_f64().max(1e-9);
                progress.set_position(summary.batches);
                progress.set_message(format!(
                    "epoch {} · {} images · {:.0} images/s",
                    chunk.epoch + 1,
                    summary.images,
                    summary.images as f64 / secs
                ));
                if !opts.sleep.is_zero() {
                    std::thread::sleep(opts.sleep);
                }
            }
            let _ = back_tx.send(chunk.bytes);
        }
        drop(rx);
        match encoder.join() {
            Ok(()) => Ok(()),
            Err(_) => Err(Error::usage("the encoder thread panicked")),
        }
    })?;
    progress.finish_and_clear();
    Ok(summary)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
    )
}

/// Encode every batch in order into `tx`, reusing buffers the writer sends back.
fn encode_all(
    files: &[Images],
    opts: &ServeOptions,
    tx: mpsc::SyncSender<Result<Chunk>>,
    back: mpsc::Receiver<Vec<u8>>,
) {
    let mut sent: u64 = 0;
    let mut epoch: u64 = 0;
    let mut ipc: Option<StreamWriter<Vec<u8>>> = None;
    let nonempty = files.iter().any(|f| !f.is_empty());
    'epochs: loop {
        let shuffled;
        let files = match opts.shuffle {
            Some(seed) => {
                shuffled = [shuffled_epoch(files, seed, epoch)];
                &shuffled[..]
            }
            None => files,
        };
        let mut batcher = Batcher::new(opts.batch_size);
        while let Some(images) = batcher.next(files) {
            if opts.limit.is_some_and(|l| sent >= l) {
                break 'epochs;
            }
            let mut buf = back.try_recv().unwrap_or_default();
            buf.clear();
            let encoded = match opts.format {
                Format::SparkJson => {
                    buf.reserve(spark_json::encoded_len(&images.labels, &images.pixels));
                    spark_json::encode(&images.labels, &images.pixels, &mut buf);
                    Ok(buf)
                }
                Format::Ndjson => {
                    ndjson::encode(&images.labels, &images.pixels, &mut buf);
                    buf.push(b'\n');
                    Ok(buf)
                }
                Format::Arrow => encode_ipc(&mut ipc, sent, images.clone()),
            };
            let chunk = encoded.map(|bytes| Chunk {
                bytes,
                images: images.len(),
                epoch,
            });
            let failed = chunk.is_err();
            if tx.send(chunk).is_err() || failed {
                return;
            }
            sent += 1;
        }
        epoch += 1;
        if !opts.endless || !nonempty {
            break;
        }
    }
    if let Some(mut w) = ipc {
        let end = w.finish().map(|_| std::mem::take(w.get_mut()));
        let _ = tx.send(end.map_err(Error::from).map(|bytes| Chunk {
            bytes,
            images: 0,
            epoch,
        }));
    }
}

/// All the images of `files` in the order of epoch `epoch` (Fisher–Yates from
/// `mix(seed, epoch)`): the same for the same seed and epoch, so a resumed run sees the
/// stream it left.
pub fn shuffled_epoch(files: &[Images], seed: u64, epoch: u64) -> Images {
    let n: usize = files.iter().map(Images::len).sum();
    let mut order: Vec<(usize, usize)> = files
        .iter()
        .enumerate()
        .flat_map(|(f, imgs)| (0..imgs.len()).map(move |i| (f, i)))
        .collect();
    let mut rng = crate::rng::SplitMix(crate::rng::mix(seed, epoch));
    rng.shuffle(&mut order);
    let side = files.first().map_or(dataset::SIDE, |f| f.side);
    let mut out = Images::with_side(n, side);
    for (f, i) in order {
        out.push(files[f].labels[i], files[f].image(i));
    }
    out
}

/// Append one batch to the IPC stream (schema first, the first time) and take its bytes.
fn encode_ipc(
    ipc: &mut Option<StreamWriter<Vec<u8>>>,
    seq: u64,
    images: Images,
) -> Result<Vec<u8>> {
    if ipc.is_none() {
        *ipc = Some(StreamWriter::try_new(
            Vec::new(),
            &stream_schema_sized(images.side),
        )?);
    }
    let w = ipc.as_mut().ok_or_else(|| Error::usage("no IPC writer"))?;
    let batch = make_batch_sized(seq, None, images.labels, images.pixels, images.side)?;
    w.write(&batch)?;
    Ok(std::mem::take(w.get_mut()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shuffled_epoch_is_a_seeded_permutation_of_every_file() {
        let files: Vec<Images> = (0..3u8)
            .map(|f| Images {
                labels: (0..4).map(|i| u16::from(f * 4 + i)).collect(),
                pixels: (0..4u8)
                    .flat_map(|i| std::iter::repeat_n(f * 4 + i, dataset::IMAGE_BYTES))
                    .collect(),
                side: dataset::SIDE,
            })
            .collect();
        let a = shuffled_epoch(&files, 7, 0);
        assert_eq!(a, shuffled_epoch(&files, 7, 0));
        let mut labels = a.labels.clone();
        labels.sort();
        assert_eq!(labels, (0..12).collect::<Vec<u16>>());
        // Each image keeps its pixels.
        for (i, &l) in a.labels.iter().enumerate() {
            assert!(
                a.pixels[i * dataset::IMAGE_BYTES..(i + 1) * dataset::IMAGE_BYTES]
                    .iter()
                    .all(|&p| u16::from(p) == l)
            );
        }
        assert_ne!(a.labels, shuffled_epoch(&files, 7, 1).labels);
        assert_ne!(a.labels, shuffled_epoch(&files, 8, 0).labels);
    }
}
