//! Any bytes as a tar: entries come out with offsets inside the input.
#![no_main]
use libfuzzer_sys::fuzz_target;
use stargaze_format::tar::TarReader;

fuzz_target!(|data: &[u8]| {
    for e in TarReader::new(data) {
        let Ok(e) = e else { break };
        assert!(e.header_offset < e.data_offset);
        assert!(e.data_offset + e.size <= e.end_offset);
        assert!(e.end_offset as usize <= data.len());
    }
});
