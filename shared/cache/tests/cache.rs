//! The cache's contract between its writer and its readers.

use std::process::Command;

use stargaze_cache::{Cache, CacheError, PresenceMap, hashes_to, verify_range};
use stargaze_format::Digest;

const LAYER: Digest = Digest([0x11; 32]);

#[test]
fn presence_bits_written_by_the_writer_are_seen_by_readers() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open_writer(dir.path()).unwrap();
    let path = cache.presence_path(&LAYER);
    let w = PresenceMap::open_rw(&path, 200, &LAYER).unwrap();
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
        let w = PresenceMap::open_rw(&path, 10, &LAYER).unwrap();
        w.set_present(3);
    }
    assert!(
        PresenceMap::open_rw(&path, 10, &LAYER)
            .unwrap()
            .is_present(3)
    );
    // A different chunk count or layer: the old bits mean nothing.
    assert!(
        !PresenceMap::open_rw(&path, 11, &LAYER)
            .unwrap()
            .is_present(3)
    );
    let other = &Digest([0x22; 32]);
    let w = PresenceMap::open_rw(&path, 11, other).unwrap();
    w.set_present(1);
    assert!(
        !PresenceMap::open_rw(&path, 11, &LAYER)
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
    PresenceMap::open_rw(&path, 100, &LAYER).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(4096 + 8).unwrap(); // truncated bitmap
    assert!(matches!(
        PresenceMap::open_ro(&path),
        Err(CacheError::Corrupt { .. })
    ));
}

fn writer(cache: &Cache, layer: &Digest, ino: u64, size: u64) -> stargaze_cache::ContentFile {
    cache
        .layer_file_writer(layer, ino, size)
        .unwrap()
        .expect("not complete")
}

#[test]
fn layer_files_are_sparse_until_written_and_verifiable() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open_writer(dir.path()).unwrap();
    let data = b"hello, lazily pulled world";
    let d = Digest::of(data);
    let w = writer(&cache, &LAYER, 7, data.len() as u64);
    w.write_at(7, &data[7..]).unwrap();
    let r = cache.layer_file_reader(&LAYER, 7).unwrap();
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
    assert!(hashes_to(&r, data.len() as u64, &d));
    assert!(!hashes_to(&r, data.len() as u64 - 1, &d), "a lying size");
    assert!(!cache.layer_file_is_complete(&LAYER, 7));
    assert!(
        cache
            .layer_file_path(&LAYER, 7)
            .starts_with(cache.layer_dir(&LAYER))
    );
}

const OTHER: Digest = Digest([0x22; 32]);

/// Sharing: a verified file is linked into content/, becomes read-only and
/// is never opened for writing again; a second layer that completes the
/// same content stores it once.
#[test]
fn shared_files_are_complete_read_only_and_stored_once() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open_writer(dir.path()).unwrap();
    let data = b"shared bytes";
    let d = Digest::of(data);
    let w = writer(&cache, &LAYER, 3, data.len() as u64);
    w.write_at(0, data).unwrap();
    assert!(!cache.is_shared(&d));
    cache.share(&LAYER, 3, &w, &d).unwrap();
    assert!(cache.is_shared(&d));
    assert!(cache.layer_file_is_complete(&LAYER, 3));
    assert!(
        cache
            .layer_file_writer(&LAYER, 3, data.len() as u64)
            .unwrap()
            .is_none(),
        "a complete file is never opened for writing"
    );
    let ino = |p: &std::path::Path| std::fs::metadata(p).unwrap().ino();
    assert_eq!(
        ino(&cache.layer_file_path(&LAYER, 3)),
        ino(&cache.content_path(&d))
    );
    // Another layer fills its own file with the same bytes, then shares:
    // its file becomes the one copy.
    let w2 = writer(&cache, &OTHER, 9, data.len() as u64);
    w2.write_at(0, data).unwrap();
    assert_ne!(
        ino(&cache.layer_file_path(&OTHER, 9)),
        ino(&cache.content_path(&d))
    );
    cache.share(&OTHER, 9, &w2, &d).unwrap();
    assert_eq!(
        ino(&cache.layer_file_path(&OTHER, 9)),
        ino(&cache.content_path(&d))
    );
    assert_eq!(
        std::fs::read(cache.layer_file_path(&OTHER, 9)).unwrap(),
        data
    );
}

/// Adoption: a layer uses shared content only when its TOC agrees with the
/// bytes (size and the caller's chunk check) and it has no file of its own.
#[test]
fn shared_content_is_adopted_only_when_the_layer_agrees() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open_writer(dir.path()).unwrap();
    let data = b"0123456789";
    let d = Digest::of(data);
    assert!(
        !cache.adopt(&OTHER, 1, &d, 10, |_| true),
        "nothing shared yet"
    );
    let w = writer(&cache, &LAYER, 1, 10);
    w.write_at(0, data).unwrap();
    cache.share(&LAYER, 1, &w, &d).unwrap();
    assert!(!cache.adopt(&OTHER, 1, &d, 11, |_| true), "another size");
    assert!(
        !cache.adopt(&OTHER, 1, &d, 10, |_| false),
        "chunks disagree"
    );
    assert!(!cache.layer_file_path(&OTHER, 1).exists());
    // A layer with a file of its own keeps it.
    writer(&cache, &OTHER, 2, 10).write_at(0, b"01234").unwrap();
    assert!(!cache.adopt(&OTHER, 2, &d, 10, |_| true));
    assert_eq!(
        &std::fs::read(cache.layer_file_path(&OTHER, 2)).unwrap()[..5],
        b"01234"
    );
    assert!(cache.adopt(&OTHER, 1, &d, 10, |c| verify_range(c, 0, 10, &d)));
    assert_eq!(
        std::fs::read(cache.layer_file_path(&OTHER, 1)).unwrap(),
        data
    );
    assert!(cache.layer_file_writer(&OTHER, 1, 10).unwrap().is_none());
}

/// A layer directory made by a release from before layer digests were
/// typed (named by the digest's bare hex, its presence header holding that
/// hex, written here byte by byte as those releases did) is found under
/// the typed digest, with its bits and files: an upgrade keeps the cache.
#[test]
fn a_layer_dir_named_by_earlier_releases_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let hex = "11".repeat(32);
    let old = dir.path().join("layers").join(&hex);
    std::fs::create_dir_all(old.join("files")).unwrap();
    std::fs::write(old.join("files/7"), b"cached bytes").unwrap();
    let mut header = vec![0u8; 4096 + 8];
    header[..8].copy_from_slice(b"SGPRES01");
    header[8..12].copy_from_slice(&1u32.to_le_bytes());
    header[16..20].copy_from_slice(&10u32.to_le_bytes());
    header[32..96].copy_from_slice(hex.as_bytes());
    header[4096] = 1 << 3; // chunk 3 present
    std::fs::write(old.join("presence"), &header).unwrap();
    std::fs::write(dir.path().join("layout"), "2\n").unwrap();

    let cache = Cache::open_writer(dir.path()).unwrap();
    assert_eq!(cache.layer_dir(&LAYER), old);
    assert_eq!(cache.presence_path(&LAYER), old.join("presence"));
    let mut r = String::new();
    std::io::Read::read_to_string(
        &mut std::fs::File::open(cache.layer_file_path(&LAYER, 7)).unwrap(),
        &mut r,
    )
    .unwrap();
    assert_eq!(r, "cached bytes");
    let w = PresenceMap::open_rw(&cache.presence_path(&LAYER), 10, &LAYER).unwrap();
    assert!(w.is_present(3), "the old map's bits are kept, not reset");
    assert!(!w.is_present(2));
    assert_eq!(
        std::fs::read(old.join("presence")).unwrap()[..96],
        header[..96],
        "the header is byte-identical"
    );
}

/// A cache written with another layout (content keyed by the TOC's word)
/// is emptied, not trusted.
#[test]
fn a_cache_of_an_older_layout_is_emptied() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("content/ab/abcd");
    std::fs::create_dir_all(old.parent().unwrap()).unwrap();
    std::fs::write(&old, b"x").unwrap();
    std::fs::create_dir_all(dir.path().join("layers/11")).unwrap();
    drop(Cache::open_writer(dir.path()).unwrap());
    assert!(!old.exists());
    assert!(!dir.path().join("layers/11").exists());
    // The current layout is kept as it is.
    std::fs::create_dir_all(old.parent().unwrap()).unwrap();
    std::fs::write(old.with_file_name("abce"), b"y").unwrap();
    drop(Cache::open_writer(dir.path()).unwrap());
    assert!(old.with_file_name("abce").exists());
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
        std::fs::create_dir_all(c.layer_dir(&LAYER)).unwrap();
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
    let path = cache.presence_path(&LAYER);
    let w = PresenceMap::open_rw(&path, 64, &LAYER).unwrap();
    writer(&cache, &LAYER, 5, 1).write_at(0, b"x").unwrap();
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
fn layer_files_reach_their_final_size_whichever_chunk_lands_first() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open_writer(dir.path()).unwrap();
    let len = |ino: u64| {
        std::fs::metadata(cache.layer_file_path(&LAYER, ino))
            .unwrap()
            .len()
    };
    // A chunk in the middle of a new file: the file is sparse at its size.
    let w = writer(&cache, &LAYER, 1, 1000);
    w.write_at(100, b"abc").unwrap();
    assert_eq!(len(1), 1000);
    // A chunk covering the whole new file: one write, exact size.
    let w = writer(&cache, &LAYER, 2, 5);
    w.write_at(0, b"whole").unwrap();
    assert_eq!(len(2), 5);
    // An existing file of the wrong size (a crash mid-create) is resized
    // when opened, before any write.
    std::fs::write(cache.layer_file_path(&LAYER, 1), b"short").unwrap();
    let _w = writer(&cache, &LAYER, 1, 1000);
    assert_eq!(len(1), 1000);
    // The last chunk first, then the first: size right after each.
    let w = writer(&cache, &LAYER, 3, 10);
    w.write_at(6, b"tail").unwrap();
    assert_eq!(len(3), 10);
    let w = writer(&cache, &LAYER, 3, 10);
    w.write_at(0, b"head").unwrap();
    assert_eq!(len(3), 10);
}
