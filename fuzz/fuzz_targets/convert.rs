//! Differential: any tar our reader accepts converts, and the converted
//! blob reads back with the same file contents.
#![no_main]
use libfuzzer_sys::fuzz_target;
use stargaze_format::convert::{ConvertOptions, TargetFormat};
use stargaze_format::tar::{TarKind, TarReader};
use stargaze_format::{Digest, OpenOptions, open_blob, read_file};

fuzz_target!(|data: &[u8]| {
    if data.len() > 1 << 16 || TarReader::new(data).any(|e| e.is_err()) {
        return;
    }
    let format = if data.len() % 2 == 0 { TargetFormat::Estargz } else { TargetFormat::ZstdChunked };
    let opts = ConvertOptions { format, chunk_size: 97, threads: 1, level: Some(1), ..Default::default() };
    let mut out = Vec::new();
    // Names the TOC cannot hold (e.g. escaping "..") are refused, not converted.
    let Ok(res) = stargaze_format::convert("fuzz", data, &mut out, &opts, None) else { return };
    let layer = open_blob("fuzz", &out[..], &OpenOptions {
        expected_toc_digest: Some(res.toc_digest), ..Default::default()
    }).expect("our own output must open");
    for e in TarReader::new(data).flatten() {
        if e.kind != TarKind::Regular { continue; }
        let Some(id) = layer.toc.lookup(&e.name) else { continue };
        let node = layer.toc.node(id);
        if node.kind != stargaze_format::NodeKind::Reg { continue; }
        let got = read_file("fuzz", &out[..], &layer, node).expect("our own output must read");
        assert_eq!(Some(Digest::of(&got)), node.digest);
    }
});
