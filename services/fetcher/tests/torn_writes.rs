//! Torn writes, injected. A layer is partly fetched into a cache, then the
//! cache is damaged as a crash of the machine can leave it: a partial file
//! cut short, a byte flipped in a present chunk, a byte flipped in a
//! complete file shared as content, and half-written temporary files
//! beside the layer's index, source, files and the traces. Re-verification
//! on the next open must count exactly that damage, leave no present chunk
//! whose bytes are wrong (the fs service serves every present chunk) and
//! no temporary file; the same reads then succeed with the right bytes.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stargaze_cache::{Cache, PresenceMap};
use stargaze_fetcher::Layer;
use stargaze_fetcher::recover::{Recovery, reverify};
use stargaze_format::Digest;
use stargaze_registry::{Client, ClientOptions, DockerConfig, Hosts};
use stargaze_testkit::{Registry, image};

#[path = "support/pushed.rs"]
#[allow(dead_code)]
mod pushed;
mod reopen;

const CHUNK: u64 = 64 << 10;

/// Every present chunk of `layer` holds the bytes of `source`'s file.
fn present_chunks_are_right(cache: &Cache, layer: &Layer, source: &pushed::Source) -> u64 {
    let presence =
        PresenceMap::open_ro(&cache.presence_path(&layer_digest(&source.digest))).unwrap();
    let mut checked = 0;
    for (path, data) in &source.files {
        let ino = layer.index.lookup_path(path).unwrap();
        let node = layer.index.inode(ino).unwrap();
        for c in node.chunks() {
            if !presence.is_present(c.global) {
                continue;
            }
            let file = std::fs::File::open(layer.content_path(ino)).unwrap();
            let mut got = vec![0u8; c.size as usize];
            file.read_exact_at(&mut got, c.file_offset)
                .unwrap_or_else(|e| panic!("{path}: a present chunk cannot be read: {e}"));
            let want = &data[c.file_offset as usize..(c.file_offset + c.size) as usize];
            assert!(
                got == want,
                "{path} [{}, +{}]: a present chunk holds wrong bytes",
                c.file_offset,
                c.size
            );
            checked += 1;
        }
    }
    checked
}

/// Fetch `len` bytes at `offset` of `path` and return what the cache holds.
async fn read(layer: &Arc<Layer>, path: &str, offset: u64, len: u64) -> Vec<u8> {
    let ino = layer.index.lookup_path(path).unwrap();
    layer.fetch(&[(ino, offset, len)]).await.unwrap();
    let mut got = vec![0u8; len as usize];
    std::fs::File::open(layer.content_path(ino))
        .unwrap()
        .read_exact_at(&mut got, offset)
        .unwrap();
    got
}

fn flip(path: &std::path::Path, at: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reverification_finds_every_torn_write_and_nothing_torn_is_served() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let reference = format!("{}/torn/writes:esgz", reg.addr);
    let sources = pushed::push(&[image::data_layer(61).0], CHUNK, &reference, work.path());
    let s = &sources[0];
    let file = |name: &str| {
        s.files
            .iter()
            .find(|(p, _)| p.ends_with(name))
            .map(|(p, d)| (p.clone(), d.clone()))
            .unwrap()
    };
    // 65,537 bytes (2 chunks), 300,000 (5 chunks), 5,000,000 (77 chunks).
    let (small, small_data) = file("file5");
    let (mid, mid_data) = file("file6");
    let (big, big_data) = file("file7");
    let client = Client::new(
        Hosts::new(),
        DockerConfig::in_dir(work.path()),
        ClientOptions::default(),
    );
    let cache_dir = work.path().join("cache");

    // 1. Fetch: two whole files (complete, shared as content) and the
    // first 10 chunks of the big one (a partial file).
    let mid_digest: Digest;
    {
        let cache = Arc::new(Cache::open_writer(&cache_dir).unwrap());
        let layer = Arc::new(
            pushed::resolve(&client, &reference, s, &cache)
                .await
                .unwrap(),
        );
        assert!(read(&layer, &small, 0, small_data.len() as u64).await == small_data);
        assert!(read(&layer, &mid, 0, mid_data.len() as u64).await == mid_data);
        assert!(read(&layer, &big, 0, 10 * CHUNK).await == big_data[..10 * CHUNK as usize]);
        let digest_of = |p: &str| {
            let ino = layer.index.lookup_path(p).unwrap();
            layer.index.inode(ino).unwrap().digest().unwrap()
        };
        mid_digest = digest_of(&mid);
        // Sharing a multi-chunk file hashes it on the background threads.
        let t = Instant::now();
        while !(cache.is_shared(&mid_digest) && cache.is_shared(&digest_of(&small))) {
            assert!(t.elapsed() < Duration::from_secs(10), "never shared");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // dropped without mark_clean: a crash
    }
    // The fetch that answered the last read may hold the layer (and the
    // cache's lock) a moment longer; damage the cache only once it let go.
    // Opening and dropping the writer leaves the cache unclean.
    drop(reopen::reopen_cache(&cache_dir));

    // 2. The damage a crash of the machine can leave.
    let layer_dir = {
        let cache = Cache::open_reader(&cache_dir);
        cache.layer_dir(&layer_digest(&s.digest))
    };
    let index = stargaze_index::LayerIndex::open(&layer_dir.join("index")).unwrap();
    let path_of = |p: &str| {
        layer_dir
            .join("files")
            .join(index.lookup_path(p).unwrap().to_string())
    };
    // The partial file cut inside its 5th chunk: chunks 4..=9 are torn.
    std::fs::OpenOptions::new()
        .write(true)
        .open(path_of(&big))
        .unwrap()
        .set_len(4 * CHUNK + 100)
        .unwrap();
    // A flipped byte in its 2nd chunk.
    flip(&path_of(&big), CHUNK + 7);
    // A flipped byte in the 3rd chunk of the complete, shared file (the
    // layer's file and the content file are one inode).
    flip(&path_of(&mid), 2 * CHUNK + 11);
    // Half-written temporaries of the index, the source, a dedup link and
    // a trace.
    let temps = [
        layer_dir.join(".index.tmpA1b2C3"),
        layer_dir.join("source.json.tmp"),
        layer_dir.join("files/7.dedup.4242.0"),
        cache_dir.join("traces/sha256-0123.json.tmp"),
    ];
    for t in &temps {
        std::fs::create_dir_all(t.parent().unwrap()).unwrap();
        std::fs::write(t, b"half a wri").unwrap();
    }

    // 3. The next start re-verifies.
    let cache = Arc::new(Cache::open_writer(&cache_dir).unwrap());
    assert!(cache.was_unclean());
    let t = Instant::now();
    let r = reverify(&cache);
    let took = t.elapsed();
    eprintln!(
        "faults injected: 1 truncation (6 chunks), 2 flipped bytes, 4 temporary files; found: {r:?} in {took:?}"
    );
    assert_eq!(
        r,
        Recovery {
            layers: 1,
            // 2 + 5 + 10 present chunks.
            chunks_checked: 17,
            // 6 cut off, 1 flipped in the big file, 1 in the shared one.
            chunks_cleared: 8,
            shared_checked: 2,
            shared_removed: 1,
            temps_removed: 4,
        }
    );
    for t in &temps {
        assert!(!t.exists(), "{} was left behind", t.display());
    }
    assert!(!cache.is_shared(&mid_digest), "the damaged content is gone");

    // 4. Nothing torn is served: every chunk still present is right, and
    // every read brings the right bytes again.
    let layer = Arc::new(
        pushed::resolve(&client, &reference, s, &cache)
            .await
            .unwrap(),
    );
    let present = present_chunks_are_right(&cache, &layer, s);
    // 17 checked - 8 cleared - the 4 other chunks of the removed shared file.
    assert_eq!(present, 5, "chunks still present after re-verification");
    assert!(read(&layer, &big, 0, 10 * CHUNK).await == big_data[..10 * CHUNK as usize]);
    assert!(read(&layer, &mid, 0, mid_data.len() as u64).await == mid_data);
    assert!(read(&layer, &small, 0, small_data.len() as u64).await == small_data);
    assert_eq!(present_chunks_are_right(&cache, &layer, s), 17);
}

/// A layer digest a test has as text (from a response or a manifest).
fn layer_digest(s: &str) -> stargaze_format::Digest {
    s.parse().expect("a layer digest")
}
