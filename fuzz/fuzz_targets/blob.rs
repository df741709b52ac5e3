//! Any bytes as a layer blob: open it and read every file; errors are
//! fine, panics and unbounded allocations are not.
#![no_main]
use libfuzzer_sys::fuzz_target;
use stargaze_format::{NodeKind, OpenOptions, open_blob, read_file};

fuzz_target!(|data: &[u8]| {
    let opts = OpenOptions { max_toc_size: 1 << 20, ..Default::default() };
    let Ok(layer) = open_blob("fuzz", data, &opts) else { return };
    for n in &layer.toc.nodes {
        if n.kind == NodeKind::Reg && n.size < (1 << 20) {
            let _ = read_file("fuzz", data, &layer, n);
        }
    }
});
