//! The cache's contract between its writer and its readers.

use std::process::Command;

use stargaze_cache::{Cache, CacheError, PresenceMap, verify_range};
use stargaze_format::Digest;

const LAYER: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

#[test]
fn presence_bits_written_by_the_writer_are_seen_by_readers() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open_writer(dir.path()).unwrap();
    let path = cache.presence_path(LAYER);
    let w = PresenceMap::open_rw(&path, 200, LAYER).unwrap();
    let r = PresenceMap::open_ro(&path).unwrap();
    assert_eq!(r.chunk_count(), 200);
    assert_eq!(r.count_present(), 0);
    for i in [0, 63, 64, 199] {
        assert!(!r.is_present(i));
        w.set_present(i);
        assert!(r.is_present(i), "bit {i} visible through the other mapping");
    }
    assert!(!r.is_present(200), "out of range is never present");
    assert_eq!(r.count_present(), 4);
    assert!(r.all_present(63..65));
    assert!(!r.all_present(62..65));
    w.clear(63);
    assert!(!r.is_present(63));
}

#[test]
fn reopening_keeps_bits_and_a_mismatched_map_starts_empty() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("presence");
    {
        let w = PresenceMap::open_rw(&path, 10, LAYER).unwrap();
        w.set_present(3);
    }
    assert!(
        PresenceMap::open_rw(&path, 10, LAYER)
            .unwrap()
            .is_present(3)
    );
    // A different chunk count or layer: the old bits mean nothing.
    assert!(
        !PresenceMap::open_rw(&path, 11, LAYER)
            .unwrap()
            .is_present(3)
    );
    let other = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
    let w = PresenceMap::open_rw(&path, 11, other).unwrap();
    w.set_present(1);
    assert!(
        !PresenceMap::open_rw(&path, 11, LAYER)
            .unwrap()
            .is_present(1)
    );
}

#[test]
fn corrupt_maps_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("presence");
    std::fs::write(&path, b"garbage").unwrap();
    assert!(matches!(
        PresenceMap::open_ro(&path),
        Err(CacheError::Corrupt { .. })
    ));
    PresenceMap::open_rw(&path, 100, LAYER).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(4096 + 8).unwrap(); // truncated bitmap
    assert!(matches!(
        PresenceMap::open_ro(&path),
        Err(CacheError::Corrupt { .. })
    ));
}

#[test]
fn content_is_sparse_until_written_and_verifiable() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open_writer(dir.path()).unwrap();
    let data = b"hello, lazily pulled world";
    let d = Digest::of(data);
    let w = cache.content_writer(&d, data.len() as u64).unwrap();
    w.write_at(7, &data[7..]).unwrap();
    let r = cache.content_reader(&d).unwrap();
    assert!(verify_range(
        &r,
        7,
        (data.len() - 7) as u64,
        &Digest::of(&data[7..])
    ));
    assert!(
        !verify_range(&r, 0, 7, &Digest::of(&data[..7])),
        "hole reads as zeros"
    );
    w.write_at(0, &data[..7]).unwrap();
    assert!(verify_range(&r, 0, data.len() as u64, &d));
    assert!(!cache.is_complete(&d));
    cache.mark_complete(&d).unwrap();
    assert!(cache.is_complete(&d));
    cache.unmark_complete(&d);
    assert!(!cache.is_complete(&d));
    assert!(
        cache
            .content_path(&d)
            .starts_with(dir.path().join("content"))
    );
}

#[test]
fn one_writer_at_a_time_and_unclean_stops_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    {
        let c = Cache::open_writer(dir.path()).unwrap();
        assert!(!c.was_unclean(), "an empty cache is clean");
        assert!(matches!(
            Cache::open_writer(dir.path()),
            Err(CacheError::Locked { .. })
        ));
        std::fs::create_dir_all(c.layer_dir(LAYER)).unwrap();
        // dropped without mark_clean: a crash
    }
    {
        let c = Cache::open_writer(dir.path()).unwrap();
        assert!(c.was_unclean());
        c.mark_clean().unwrap();
    }
    let c = Cache::open_writer(dir.path()).unwrap();
    assert!(!c.was_unclean());
}

/// A reader in another process sees a bit the writer sets, with the data.
#[test]
fn bits_cross_process_boundaries() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open_writer(dir.path()).unwrap();
    let path = cache.presence_path(LAYER);
    let w = PresenceMap::open_rw(&path, 64, LAYER).unwrap();
    let d = Digest::of(b"x");
    cache
        .content_writer(&d, 1)
        .unwrap()
        .write_at(0, b"x")
        .unwrap();
    w.set_present(42);
    // Read the bit with a plain read of the file from another process: the
    // kernel's page cache is the shared memory.
    let out = Command::new("od")
        .args(["-A", "n", "-t", "x8", "-j", "4096", "-N", "8"])
        .arg(&path)
        .output()
        .unwrap();
    let word = u64::from_str_radix(String::from_utf8_lossy(&out.stdout).trim(), 16).unwrap();
    assert_eq!(word, 1 << 42);
}

#[test]
fn content_files_reach_their_final_size_whichever_chunk_lands_first() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open_writer(dir.path()).unwrap();
    let len = |d: &Digest| std::fs::metadata(cache.content_path(d)).unwrap().len();
    // A chunk in the middle of a new file: the file is sparse at its size.
    let middle = Digest::of(b"middle");
    let w = cache.content_writer(&middle, 1000).unwrap();
    w.write_at(100, b"abc").unwrap();
    assert_eq!(len(&middle), 1000);
    // A chunk covering the whole new file: one write, exact size.
    let whole = Digest::of(b"whole");
    let w = cache.content_writer(&whole, 5).unwrap();
    w.write_at(0, b"whole").unwrap();
    assert_eq!(len(&whole), 5);
    // An existing file of the wrong size (a crash mid-create) is resized
    // when opened, before any write.
    std::fs::write(cache.content_path(&middle), b"short").unwrap();
    let _w = cache.content_writer(&middle, 1000).unwrap();
    assert_eq!(len(&middle), 1000);
    // The last chunk first, then the first: size right after each.
    let tail = Digest::of(b"tail");
    let w = cache.content_writer(&tail, 10).unwrap();
    w.write_at(6, b"tail").unwrap();
    assert_eq!(len(&tail), 10);
    let w = cache.content_writer(&tail, 10).unwrap();
    w.write_at(0, b"head").unwrap();
    assert_eq!(len(&tail), 10);
}
