//! Any tail of any blob: recognised or rejected, never a panic, and a
//! recognised footer always describes ranges inside the blob.
#![no_main]
use libfuzzer_sys::fuzz_target;
use stargaze_format::footer::parse_footer;

fuzz_target!(|data: &[u8]| {
    // The first 8 bytes choose how much larger than the tail the blob is.
    let (extra, tail) = if data.len() >= 8 {
        (u64::from_le_bytes(data[..8].try_into().unwrap()) >> 20, &data[8..])
    } else {
        (0, data)
    };
    let size = tail.len() as u64 + extra;
    if let Ok(footer) = parse_footer(tail, size) {
        assert!(footer.size() <= size);
        assert!(footer.payload_end(size) <= size);
        if let Some(r) = footer.toc_range(size) {
            assert!(r.start <= r.end && r.end <= size);
        }
    }
});
