//! A cache on a filesystem that fills up. The fetcher's cache lives on a
//! small loop-mounted ext4; layers whose files together are larger than it
//! are read through the fetcher's layers, with the cache's eviction task
//! running as the fetcher runs it with the default configuration (no size
//! limit: a full filesystem is what starts a pass). A read whose chunk cannot be stored fails with
//! an error naming the layer, the file and the cache directory and saying
//! what to do, never with wrong bytes; the full disk starts an eviction
//! pass, after which the same reads succeed; the fetcher (this process)
//! keeps running; and re-verification afterwards finds nothing corrupt.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use stargaze_cache::{Cache, EvictOptions};
use stargaze_fetcher::evict::CacheLimit;
use stargaze_fetcher::recover::reverify;
use stargaze_fetcher::{FetchError, Layer};
use stargaze_registry::{Client, ClientOptions, DockerConfig, Hosts};
use stargaze_testkit::{LoopFs, Registry};

#[path = "support/pushed.rs"]
#[allow(dead_code)]
mod pushed;

const DISK_MIB: u64 = 32;
const LAYERS: u64 = 5;
const FILES_PER_LAYER: usize = 4;
const FILE_SIZE: usize = 2 << 20;
const READ: u64 = 512 << 10;
/// A read that failed on the full disk must succeed again within this.
const RECOVER_WITHIN: Duration = Duration::from_secs(20);

/// Read `len` bytes at `offset` of a file and check them; `Err` with the
/// fetch error's text.
async fn read(layer: &Arc<Layer>, path: &str, data: &[u8], offset: u64) -> Result<u64, String> {
    let ino = layer.index.lookup_path(path).unwrap();
    let len = READ.min(data.len() as u64 - offset);
    tokio::time::timeout(Duration::from_secs(30), layer.fetch(&[(ino, offset, len)]))
        .await
        .unwrap_or_else(|_| panic!("{path}: a read hung"))
        .map_err(|e| e.to_string())?;
    let file = std::fs::File::open(layer.content_path(ino)).unwrap();
    let mut got = vec![0u8; len as usize];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut got, offset).unwrap();
    assert!(
        got[..] == data[offset as usize..(offset + len) as usize],
        "{path} [{offset}, +{len}]: wrong bytes reached a reader"
    );
    Ok(len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cache_disk_fails_reads_clearly_evicts_and_recovers() {
    full_disk(false).await
}

/// The same with `cache_io = "io_uring"`: a ring per decode thread, whose
/// ENOSPC completions must be handled as pwrite's errors are (the bit
/// stays clear, eviction starts, the read succeeds later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cache_disk_with_io_uring_writes_fails_reads_clearly_evicts_and_recovers() {
    full_disk(true).await
}

async fn full_disk(io_uring: bool) {
    let disk = LoopFs::new(DISK_MIB);
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let reference = format!("{}/full/disk:esgz", reg.addr);
    let tars: Vec<Vec<u8>> = (0..LAYERS)
        .map(|i| pushed::noise_layer(i + 1, FILES_PER_LAYER, FILE_SIZE))
        .collect();
    let sources = pushed::push(&tars, 256 << 10, &reference, work.path());
    let client = Client::new(
        Hosts::new(),
        DockerConfig::in_dir(work.path()),
        ClientOptions::default(),
    );
    let cache_dir = disk.path().join("cache");
    let mut cache = Cache::open_writer(&cache_dir).unwrap();
    if io_uring {
        // CI's kernel offers io_uring: where it is refused this fails
        // rather than testing pwrite twice.
        cache
            .use_io_uring()
            .expect("io_uring for the cache's writes");
        assert!(cache.uses_thread_rings());
    }
    let cache = Arc::new(cache);
    // Evicted layers are dropped from this table, as the service does.
    let table: Arc<Mutex<HashMap<stargaze_format::Digest, Arc<Layer>>>> = Arc::default();
    let limit = Arc::new(CacheLimit::new(
        cache.clone(),
        EvictOptions {
            limit: 0,
            keep_unused: Duration::ZERO,
            ..Default::default()
        },
    ));
    let t = table.clone();
    let evictor = tokio::spawn(limit.clone().run(
        cache.clone(),
        Arc::new(move |d: &stargaze_format::Digest| {
            if let Some(l) = t.lock().remove(d) {
                l.mark_evicted();
            }
        }),
    ));

    let started = Instant::now();
    let (mut reads, mut bytes, mut full_errors) = (0u64, 0u64, 0u64);
    let mut recovery = Duration::ZERO;
    for s in &sources {
        // Resolving writes the layer's index and presence map: on a full
        // disk it fails the same way, and succeeds once eviction made room.
        let t = Instant::now();
        let layer = loop {
            match pushed::resolve(&client, &reference, s, &cache).await {
                Ok(l) => break Arc::new(l),
                Err(e @ FetchError::CacheFull { .. }) if t.elapsed() < RECOVER_WITHIN => {
                    full_errors += 1;
                    assert!(e.to_string().contains(&s.digest), "{e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("resolving {}: {e}", s.digest),
            }
        };
        table.lock().insert(layer.digest, layer.clone());
        for (path, data) in &s.files {
            for offset in (0..data.len() as u64).step_by(READ as usize) {
                reads += 1;
                let e = match read(&layer, path, data, offset).await {
                    Ok(n) => {
                        bytes += n;
                        continue;
                    }
                    Err(e) => e,
                };
                full_errors += 1;
                for what in [
                    s.digest.as_str(),
                    path.as_str(),
                    &cache_dir.to_string_lossy(),
                ] {
                    assert!(e.contains(what), "the error names {what}: {e}");
                }
                assert!(
                    e.contains("full") && e.contains("cache_size_limit"),
                    "the error says the disk is full and what to do: {e}"
                );
                // Eviction makes room: the same read succeeds soon.
                let t = Instant::now();
                loop {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    match read(&layer, path, data, offset).await {
                        Ok(n) => {
                            bytes += n;
                            break;
                        }
                        Err(_) if t.elapsed() < RECOVER_WITHIN => reads += 1,
                        Err(e) => panic!("{path}: still failing after {RECOVER_WITHIN:?}: {e}"),
                    }
                }
                recovery = recovery.max(t.elapsed());
            }
        }
    }
    let totals = limit.totals();
    evictor.abort();
    eprintln!(
        "{reads} reads, {bytes} bytes verified, {full_errors} reads failed on the full {DISK_MIB} MiB disk, longest recovery {recovery:?}; eviction: {} passes, {} layers, {} MB freed; {} MiB free at the end; {:?}",
        totals.passes,
        totals.layers,
        totals.bytes / 1_000_000,
        disk.free() >> 20,
        started.elapsed()
    );
    assert!(full_errors > 0, "the disk filled up during the reads");
    assert!(totals.layers > 0, "eviction made room");
    // Nothing that stayed cached is corrupt.
    let r = reverify(&cache);
    eprintln!("re-verification: {r:?}");
    assert!(r.chunks_checked > 0);
    assert_eq!((r.chunks_cleared, r.shared_removed), (0, 0), "{r:?}");
}
