//! `cache_io = "io_uring"`: a ring per decode thread, a member's writes
//! batched without waiting. A chunk's presence bit must never be set before
//! its write completed: a reader that sees the bit reads the chunk's bytes
//! from the content file at once, and they must hash to the chunk's digest
//! (a bit set early would show it the sparse file's zeros).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use stargaze_cache::Cache;
use stargaze_format::Digest;
use stargaze_registry::{Client, ClientOptions, DockerConfig, Hosts};
use stargaze_testkit::Registry;

#[path = "support/pushed.rs"]
#[allow(dead_code)]
mod pushed;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presence_bit_is_set_only_after_its_ring_write_completed() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let reference = format!("{}/uring/writes:esgz", reg.addr);
    let tars = vec![pushed::noise_layer(7, 16, 1 << 20)];
    let sources = pushed::push(&tars, 16 << 10, &reference, work.path());
    let s = &sources[0];
    let client = Client::new(
        Hosts::new(),
        DockerConfig::in_dir(work.path()),
        ClientOptions::default(),
    );
    let mut cache = Cache::open_writer(&work.path().join("cache")).unwrap();
    // CI's kernel offers io_uring: where it is refused this fails rather
    // than testing pwrite.
    cache
        .use_io_uring()
        .expect("io_uring for the cache's writes");
    assert!(cache.uses_thread_rings());
    let cache = Arc::new(cache);
    let layer = Arc::new(
        pushed::resolve(&client, &reference, s, &cache)
            .await
            .unwrap(),
    );

    // Every chunk: (bit, content file, offset, size, digest).
    let mut chunks = Vec::new();
    for (path, _) in &s.files {
        let ino = layer.index.lookup_path(path).unwrap();
        for c in layer.index.inode(ino).unwrap().chunks() {
            chunks.push((
                c.global,
                layer.content_path(ino),
                c.file_offset,
                c.size,
                c.digest,
            ));
        }
    }
    assert!(chunks.len() > 500, "{} chunks", chunks.len());

    // The observer: polls the bits while the fetch runs and checks each
    // chunk's bytes as soon as its bit shows.
    let done = Arc::new(AtomicBool::new(false));
    let observer = {
        let (layer, done) = (layer.clone(), done.clone());
        std::thread::spawn(move || {
            let mut seen = vec![false; chunks.len()];
            let (mut checked, mut early) = (0usize, Vec::new());
            loop {
                let last = done.load(Ordering::Acquire);
                for (k, (bit, path, offset, size, digest)) in chunks.iter().enumerate() {
                    if seen[k] || !layer.presence.is_present(*bit) {
                        continue;
                    }
                    seen[k] = true;
                    checked += 1;
                    let file = std::fs::File::open(path).unwrap();
                    let mut buf = vec![0u8; *size as usize];
                    let ok = std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, *offset)
                        .is_ok()
                        && Digest::of(&buf).0 == *digest;
                    if !ok {
                        early.push((path.clone(), *offset));
                    }
                }
                if last {
                    return (checked, early);
                }
                std::thread::yield_now();
            }
        })
    };
    let ranges: Vec<(u64, u64, u64)> = s
        .files
        .iter()
        .map(|(path, data)| (layer.index.lookup_path(path).unwrap(), 0, data.len() as u64))
        .collect();
    tokio::time::timeout(Duration::from_secs(60), layer.fetch(&ranges))
        .await
        .expect("the fetch hung")
        .unwrap();
    done.store(true, Ordering::Release);
    let (checked, early) = observer.join().unwrap();
    assert!(
        early.is_empty(),
        "{} bits set before their bytes were written, the first: {:?}",
        early.len(),
        early.iter().take(3).collect::<Vec<_>>()
    );
    assert_eq!(checked, s.files.len() * ((1 << 20) / (16 << 10)));
    // And the files hold what the layer holds.
    for (path, data) in &s.files {
        let ino = layer.index.lookup_path(path).unwrap();
        assert!(
            std::fs::read(layer.content_path(ino)).unwrap() == *data,
            "{path}"
        );
    }
}
