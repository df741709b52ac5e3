//! Writes seed inputs for the fuzz targets (`make fuzz`): small tars in
//! several header dialects, converted eStargz and zstd:chunked blobs, their
//! TOC JSON and footers.
//!
//! Usage: cargo run -p stargaze-format --example fuzz_seeds -- OUT_DIR

use std::path::Path;

use stargaze_format::convert::{ConvertOptions, TargetFormat};
use stargaze_format::{OpenOptions, open_blob};

fn sample_tar(gnu: bool) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, size: u64| {
        let mut h = if gnu {
            tar::Header::new_gnu()
        } else {
            tar::Header::new_ustar()
        };
        h.set_entry_type(kind);
        h.set_mode(0o755);
        h.set_size(size);
        h.set_mtime(1_600_000_000);
        h
    };
    b.append_data(&mut header(tar::EntryType::Directory, 0), "d/", &[][..])
        .unwrap();
    let body: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
    b.append_data(
        &mut header(tar::EntryType::Regular, 300),
        "d/file",
        &body[..],
    )
    .unwrap();
    b.append_pax_extensions([("SCHILY.xattr.user.x", &b"\xff"[..])])
        .unwrap();
    b.append_data(&mut header(tar::EntryType::Regular, 3), "d/x", &b"abc"[..])
        .unwrap();
    b.append_link(&mut header(tar::EntryType::Symlink, 0), "d/sym", "file")
        .unwrap();
    b.append_link(&mut header(tar::EntryType::Link, 0), "d/hard", "d/file")
        .unwrap();
    let long = format!("d/{}", "n".repeat(150));
    b.append_data(&mut header(tar::EntryType::Regular, 1), &long, &b"z"[..])
        .unwrap();
    b.into_inner().unwrap()
}

fn main() {
    let out = std::env::args().nth(1).expect("usage: fuzz_seeds OUT_DIR");
    let out = Path::new(&out);
    let put = |target: &str, name: &str, bytes: &[u8]| {
        let dir = out.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    for gnu in [false, true] {
        let tar = sample_tar(gnu);
        let dialect = if gnu { "gnu" } else { "ustar" };
        put("tar", dialect, &tar);
        put("convert", dialect, &tar);
        for (fmt, name) in [
            (TargetFormat::Estargz, "estargz"),
            (TargetFormat::ZstdChunked, "zstd"),
        ] {
            for min_chunk in [0, 256] {
                let opts = ConvertOptions {
                    format: fmt,
                    chunk_size: 128,
                    min_chunk_size: min_chunk,
                    ..Default::default()
                };
                let mut blob = Vec::new();
                stargaze_format::convert("seed", &tar, &mut blob, &opts, None).unwrap();
                let label = format!("{dialect}-{name}-{min_chunk}");
                put("blob", &label, &blob);
                let layer = open_blob("seed", &blob[..], &OpenOptions::default()).unwrap();
                put("toc", &label, &layer.toc_json);
                let tail = &blob[blob.len().saturating_sub(72)..];
                let mut footer_seed = 0u64.to_le_bytes().to_vec();
                footer_seed.extend_from_slice(tail);
                put("footer", &label, &footer_seed);
            }
        }
    }
    println!("seeds written to {}", out.display());
}
