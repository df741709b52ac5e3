//! The converter's memory does not grow with the layer: a tar is mapped,
//! and the pages it has read must leave the mapping as it goes, or a
//! layer's whole size counts in its RSS (registry-to-registry conversion
//! promises a bound whatever the image).

use std::io::Write;

use stargaze_format::convert::{ConvertOptions, convert_file};

/// Peak resident memory of this process (each test runs in its own
/// process under nextest).
fn peak_rss_mb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status");
    kb / 1024
}

#[test]
fn converting_a_layer_larger_than_the_bound_keeps_the_rss_under_it() {
    const FILE_MB: usize = 320;
    let dir = tempfile::tempdir().unwrap();
    // One large file (hashed and chunked like lib/modules in a JRE layer)
    // and a few small ones, written a MiB at a time.
    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    let piece: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    let mut big = std::fs::File::create(tree.join("big")).unwrap();
    for _ in 0..FILE_MB {
        big.write_all(&piece).unwrap();
    }
    drop(big);
    for i in 0..64 {
        std::fs::write(tree.join(format!("small{i}")), &piece[..4096]).unwrap();
    }
    let tar = dir.path().join("layer.tar");
    let status = std::process::Command::new("tar")
        .args(["-cf"])
        .arg(&tar)
        .arg("-C")
        .arg(&tree)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    let before = peak_rss_mb();

    let converted = convert_file(
        "test-layer",
        &tar,
        dir.path(),
        std::io::sink(),
        &ConvertOptions::default(),
        None,
    )
    .unwrap();
    assert!(converted.uncompressed_size > (FILE_MB as u64) << 20);

    let peak = peak_rss_mb();
    assert!(
        peak < before + 200,
        "converting a {FILE_MB} MB layer took the peak RSS from {before} MB to {peak} MB"
    );
}
