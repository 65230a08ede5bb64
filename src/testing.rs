//! For the tests only (the unit tests and `tests/`; hidden from the docs): how a test that
//! lacks a tool (python3 with a module, the real CIFAR-10 sample) says so, and image files
//! whose headers declare what a test needs.

/// Says `what` checks nothing for want of `needs`: a line in the file `CIFAR_DF_SKIP_LOG`
/// names (which `.ci/run` counts), then a panic under CI (`CI` set), else a note.
pub fn skip(what: &str, needs: &str) {
    if let Some(log) = std::env::var_os("CIFAR_DF_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = writeln!(f, "{what}: no {needs}");
        }
    }
    if std::env::var_os("CI").is_some() {
        panic!("CI needs {needs} for {what}");
    }
    eprintln!("skipping {what}: no {needs}");
}

/// A PNG whose header declares `w`×`h` RGB, with a scrap of image data: all a decoder
/// reads before the image data.
pub fn header_only_png(w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut e = png::Encoder::new(&mut out, w, h);
        e.set_color(png::ColorType::Rgb);
        let mut writer = e.write_header().expect("a PNG header");
        writer
            .write_chunk(png::chunk::IDAT, &[0x78, 0x01, 0x01, 0x00])
            .expect("a PNG chunk");
    }
    out
}

/// `jpeg` with its frame header saying `w`×`h`.
pub fn jpeg_declaring(jpeg: &[u8], w: u16, h: u16) -> Vec<u8> {
    let mut b = jpeg.to_vec();
    let sof = b
        .windows(2)
        .position(|m| m[0] == 0xff && (m[1] == 0xc0 || m[1] == 0xc2))
        .expect("a JPEG frame header");
    b[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    b[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    b
}
