//! Hostile TOC JSON: parse and check; whatever is accepted must be a
//! consistent tree (chunks contiguous and inside the data area), and the
//! one-pass parse must accept exactly that tree.
#![no_main]
use libfuzzer_sys::fuzz_target;
use stargaze_format::toc::JsonToc;
use stargaze_format::{LayerFormat, NodeKind, Toc};

fuzz_target!(|data: &[u8]| {
    let Ok(json) = JsonToc::parse(data) else {
        assert!(Toc::parse(data, LayerFormat::Estargz, 1 << 20).is_err());
        return;
    };
    for format in [LayerFormat::Estargz, LayerFormat::ZstdChunked] {
        let payload_end = 1 << 20;
        let built = Toc::build(&json, format, payload_end);
        let parsed = Toc::parse(data, format, payload_end);
        assert_eq!(format!("{:?}", built.as_ref().ok()), format!("{:?}", parsed.as_ref().ok()));
        let Ok(toc) = built else { continue };
        for n in &toc.nodes {
            let mut at = 0;
            for c in &n.chunks {
                assert_eq!(c.file_offset, at);
                assert!(c.size > 0);
                assert!(c.compressed_offset < c.compressed_end);
                assert!(c.compressed_end <= payload_end);
                at += c.size;
            }
            if n.kind == NodeKind::Reg {
                assert!(n.chunks.is_empty() || at == n.size);
            }
            for child in n.children.values() {
                assert!((*child as usize) < toc.nodes.len());
            }
        }
        let _ = toc.walk();
    }
});
