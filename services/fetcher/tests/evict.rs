//! The cache's size limit against real layers in one cache: layers nobody
//! pins are evicted least recently used first, with the content only they
//! referenced; pinned and recently used layers and every file they
//! reference stay; content no layer references goes; an evicted layer can
//! be resolved and fetched again.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use stargaze_cache::{Cache, EvictOptions, Evictor};
use stargaze_fetcher::{FetchError, FetchOptions, FileBlob, Layer, resolve_layer};
use stargaze_format::Digest;
use stargaze_format::convert::ConvertOptions;
use stargaze_format::tar::{TarKind, TarReader};
use stargaze_format::tree::normalize_path;
use stargaze_testkit::image;

struct Source {
    blob: PathBuf,
    digest: String,
    toc: Digest,
    files: BTreeMap<String, Vec<u8>>,
}

fn convert(dir: &Path, name: &str, tar: &[u8], min_chunk_size: u64) -> Source {
    let mut files = BTreeMap::new();
    for e in TarReader::new(tar) {
        let e = e.unwrap();
        if e.kind == TarKind::Regular && !e.name.contains(".wh.") {
            let data = tar[e.data_offset as usize..(e.data_offset + e.size) as usize].to_vec();
            files.insert(normalize_path(&e.name).unwrap(), data);
        }
    }
    let opts = ConvertOptions {
        chunk_size: 64 << 10,
        min_chunk_size,
        ..Default::default()
    };
    let mut out = Vec::new();
    let res = stargaze_format::convert(name, tar, &mut out, &opts, None).unwrap();
    let blob = dir.join(name);
    std::fs::write(&blob, &out).unwrap();
    Source {
        blob,
        digest: res.digest.to_string(),
        toc: res.toc_digest,
        files,
    }
}

async fn resolve_all(cache: &Arc<Cache>, s: &Source) -> Arc<Layer> {
    let layer = Arc::new(
        resolve_layer(
            cache.clone(),
            Arc::new(FileBlob::open(&s.blob).unwrap()),
            &s.digest,
            Some(s.toc),
            false,
            &FetchOptions::default(),
        )
        .await
        .unwrap(),
    );
    let all: Vec<_> = s
        .files
        .iter()
        .map(|(p, d)| (layer.index.lookup_path(p).unwrap(), 0, d.len() as u64))
        .collect();
    layer.fetch(&all).await.unwrap();
    wait_shared(cache, &layer);
    layer
}

/// Complete files are shared (hashed whole on background threads): wait
/// until every one of the layer's is.
fn wait_shared(cache: &Cache, layer: &Layer) {
    let digests: Vec<Digest> = (1..=layer.index.inode_count())
        .filter_map(|ino| layer.index.inode(ino))
        .filter(|n| n.is_reg() && n.chunk_count() > 0)
        .filter_map(|n| n.digest())
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !digests.iter().all(|d| cache.is_shared(d)) {
        assert!(std::time::Instant::now() < deadline, "files not shared");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn assert_content(layer: &Layer, s: &Source) {
    for (path, data) in &s.files {
        if data.is_empty() {
            continue;
        }
        let ino = layer.index.lookup_path(path).unwrap();
        assert!(
            std::fs::read(layer.content_path(ino)).unwrap() == *data,
            "{path} of {}",
            s.digest
        );
    }
}

/// The files holding a layer's content, by inode (a file shared by
/// several layers is one), with their allocated bytes.
fn content_files(layer: &Layer, s: &Source) -> BTreeMap<(u64, u64), u64> {
    s.files
        .iter()
        .filter(|(_, d)| !d.is_empty())
        .map(|(p, _)| {
            let m =
                std::fs::metadata(layer.content_path(layer.index.lookup_path(p).unwrap())).unwrap();
            ((m.dev(), m.ino()), m.blocks() * 512)
        })
        .collect()
}

fn allocated(files: &BTreeMap<(u64, u64), u64>) -> u64 {
    files.values().sum()
}

/// The layer directory's own files (index, presence map).
fn dir_allocated(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap())
        .filter(|m| m.is_file())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// The shared content paths of a source's files.
fn shared_paths(cache: &Cache, s: &Source) -> Vec<PathBuf> {
    s.files
        .values()
        .filter(|d| !d.is_empty())
        .map(|d| cache.content_path(&Digest::of(d)))
        .collect()
}

fn set_last_use(cache: &Cache, digest: &str, ago: Duration) {
    std::fs::File::open(cache.layer_dir(&layer_digest(digest)))
        .unwrap()
        .set_modified(SystemTime::now() - ago)
        .unwrap();
}

fn evictor(cache: &Arc<Cache>, limit: u64, keep_unused: Duration) -> Evictor {
    Evictor::new(
        cache.clone(),
        EvictOptions {
            limit,
            keep_unused,
            ..Default::default()
        },
    )
    // Started long ago: the grace period after a start is over.
    .with_start(SystemTime::now() - Duration::from_secs(86_400))
}

const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_recently_used_unpinned_layers_are_evicted_with_their_own_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A and B hold the same files (chunked differently), C and D their own.
    let (data1, _) = image::data_layer(1);
    let a = convert(d, "a", &data1, 0);
    let b = convert(d, "b", &data1, 16 << 10);
    let c = convert(d, "c", &image::data_layer(2).0, 0);
    let e = convert(d, "d", &image::data_layer(3).0, 0);
    assert_eq!(
        [&a, &b, &c, &e]
            .iter()
            .map(|s| &s.digest)
            .collect::<HashSet<_>>()
            .len(),
        4
    );
    let cache = Arc::new(Cache::open_writer(&d.join("cache")).unwrap());
    let la = resolve_all(&cache, &a).await;
    let lb = resolve_all(&cache, &b).await;
    let lc = resolve_all(&cache, &c).await;
    let ld = resolve_all(&cache, &e).await;
    assert_eq!(
        content_files(&la, &a),
        content_files(&lb, &b),
        "stored once"
    );
    // Attached in fs (pinned), and the oldest by far.
    let pin = cache.pin_layer(&layer_digest(&a.digest)).unwrap();
    set_last_use(&cache, &a.digest, 4 * HOUR);
    set_last_use(&cache, &c.digest, 3 * HOUR);
    set_last_use(&cache, &e.digest, 2 * HOUR);
    set_last_use(&cache, &b.digest, HOUR);
    // Content no layer references (left by a crash), older than all.
    let orphan = cache.content_path(&Digest::of(b"orphan"));
    std::fs::create_dir_all(orphan.parent().unwrap()).unwrap();
    std::fs::write(&orphan, vec![7u8; 100_000]).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&orphan)
        .unwrap()
        .set_modified(SystemTime::now() - 5 * HOUR)
        .unwrap();

    // Under the limit: a scan, nothing else.
    let mut forgotten = Vec::new();
    let pass = evictor(&cache, 1 << 40, Duration::ZERO).run(&mut |d| forgotten.push(d.to_string()));
    let shared = allocated(&content_files(&la, &a));
    let only_c = allocated(&content_files(&lc, &c));
    let only_d = allocated(&content_files(&ld, &e));
    let orphan_bytes = std::fs::metadata(&orphan).unwrap().blocks() * 512;
    let layer_dirs: u64 = [&a, &b, &c, &e]
        .iter()
        .map(|s| dir_allocated(&cache.layer_dir(&layer_digest(&s.digest))))
        .sum();
    assert_eq!(
        pass.usage_before,
        shared + only_c + only_d + orphan_bytes + layer_dirs,
        "usage is the allocated size of content and layer files"
    );
    assert!(shared > 5_000_000 && only_c > 5_000_000, "{pass:?}");
    assert_eq!((pass.layers, pass.layers_pinned), (4, 1));
    assert_eq!((pass.layers_evicted, pass.files_evicted), (0, 0));
    assert!(forgotten.is_empty());

    // Just over: the orphan goes first, then C (the oldest unpinned layer)
    // with its files; that is enough.
    let need = pass.usage_before
        - orphan_bytes
        - only_c
        - dir_allocated(&cache.layer_dir(&layer_digest(&c.digest)));
    let limit = need * 100 / 90 + 4096;
    let pass = evictor(&cache, limit, Duration::ZERO).run(&mut |d| forgotten.push(d.to_string()));
    assert_eq!(forgotten, std::slice::from_ref(&c.digest), "{pass:?}");
    assert!(!orphan.exists());
    assert!(!cache.layer_dir(&layer_digest(&c.digest)).exists());
    assert!(shared_paths(&cache, &c).iter().all(|p| !p.exists()));
    assert!(pass.usage_after <= limit * 90 / 100, "{pass:?}");
    assert_eq!(pass.bytes_freed, pass.usage_before - pass.usage_after);
    assert_content(&la, &a);
    assert_content(&ld, &e);
    assert!(cache.layer_dir(&layer_digest(&b.digest)).exists());

    // Far over, D used a moment ago: B goes (its files stay, A has them
    // pinned), D stays as recently used, A as pinned; the cache stays over.
    set_last_use(&cache, &e.digest, Duration::from_secs(60));
    forgotten.clear();
    let pass = evictor(&cache, 1, 30 * 60 * Duration::from_secs(1))
        .run(&mut |d| forgotten.push(d.to_string()));
    assert_eq!(forgotten, std::slice::from_ref(&b.digest), "{pass:?}");
    assert_eq!(pass.files_evicted, 0, "A's files are shared: kept");
    assert_content(&la, &a);
    assert_content(&ld, &e);
    assert!(
        pass.usage_after > 1 && pass.kept_bytes == pass.usage_after,
        "{pass:?}"
    );
    // The pass recorded A's use (it is pinned): once unpinned, it is
    // still recent for a `keep_unused` period.
    drop(pin);
    let pass = evictor(&cache, 1, 30 * 60 * Duration::from_secs(1)).run(&mut |_| {});
    assert_eq!(pass.layers_evicted, 0, "{pass:?}");

    // With no grace: everything goes, and nothing is left in content/.
    forgotten.clear();
    let pass = evictor(&cache, 1, Duration::ZERO).run(&mut |d| forgotten.push(d.to_string()));
    forgotten.sort();
    let mut want = vec![a.digest.clone(), e.digest.clone()];
    want.sort();
    assert_eq!(forgotten, want, "{pass:?}");
    assert_eq!(pass.usage_after, 0, "{pass:?}");
    for shard in std::fs::read_dir(cache.root().join("content")).unwrap() {
        assert_eq!(std::fs::read_dir(shard.unwrap().path()).unwrap().count(), 0);
    }

    // An evicted layer's old handle refuses to write; resolving it again
    // fetches it anew, with the right bytes.
    lc.mark_evicted(); // what the fetcher's `forget` does
    let ino = lc.index.lookup_path("data/file7").unwrap();
    let err = lc.fetch(&[(ino, 0, 10)]).await.unwrap_err();
    assert!(matches!(err, FetchError::Evicted { .. }), "{err}");
    assert!(err.to_string().contains(&c.digest), "{err}");
    let lc2 = resolve_all(&cache, &c).await;
    assert_content(&lc2, &c);
    let (present, total) = lc2.progress();
    assert_eq!(present, total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_evicted_until_keep_unused_after_a_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let c = convert(d, "c", &image::data_layer(2).0, 0);
    let cache = Arc::new(Cache::open_writer(&d.join("cache")).unwrap());
    resolve_all(&cache, &c).await;
    set_last_use(&cache, &c.digest, 24 * HOUR);
    // Just started (a reboot): the snapshotter has not re-attached yet.
    let fresh = Evictor::new(
        cache.clone(),
        EvictOptions {
            limit: 1,
            keep_unused: Duration::from_secs(600),
            ..Default::default()
        },
    );
    let pass = fresh.run(&mut |_| {});
    assert_eq!(pass.layers_evicted, 0, "{pass:?}");
    assert!(cache.layer_dir(&layer_digest(&c.digest)).exists());
    let pass = evictor(&cache, 1, Duration::from_secs(600)).run(&mut |_| {});
    assert_eq!(pass.layers_evicted, 1, "{pass:?}");
}

/// A layer digest a test has as text (from a response or a manifest).
fn layer_digest(s: &str) -> stargaze_format::Digest {
    s.parse().expect("a layer digest")
}
