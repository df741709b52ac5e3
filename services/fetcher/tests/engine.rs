//! Resolution and chunk fetching against converted layers in local files.

mod reopen;

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use stargaze_cache::Cache;
use stargaze_fetcher::{BlobError, FetchError, FetchOptions, FileBlob, RemoteBlob, resolve_layer};
use stargaze_format::convert::{ConvertOptions, TargetFormat};
use stargaze_format::tar::{TarKind, TarReader};
use stargaze_format::{Digest, tree::normalize_path};
use stargaze_testkit::image;

struct Fixture {
    _dir: tempfile::TempDir,
    blob_path: std::path::PathBuf,
    cache_dir: std::path::PathBuf,
    toc: Digest,
    digest: String,
    files: BTreeMap<String, Vec<u8>>,
}

fn fixture(opts: ConvertOptions) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut tar = image::busybox_layer();
    let end = TarReader::new(&tar).last().unwrap().unwrap().end_offset as usize;
    tar.truncate(end);
    tar.extend(image::data_layer(5).0);
    let mut files = BTreeMap::new();
    for e in TarReader::new(&tar) {
        let e = e.unwrap();
        // Whiteouts are devices in the index, not files.
        if e.kind == TarKind::Regular && !e.name.contains(".wh.") {
            let data = tar[e.data_offset as usize..(e.data_offset + e.size) as usize].to_vec();
            files.insert(normalize_path(&e.name).unwrap(), data);
        }
    }
    let mut out = Vec::new();
    let res = stargaze_format::convert("fixture", &tar, &mut out, &opts, None).unwrap();
    let blob_path = dir.path().join("blob");
    std::fs::write(&blob_path, &out).unwrap();
    Fixture {
        blob_path,
        cache_dir: dir.path().join("cache"),
        toc: res.toc_digest,
        digest: res.digest.to_string(),
        files,
        _dir: dir,
    }
}

fn small_chunks() -> ConvertOptions {
    ConvertOptions {
        chunk_size: 64 << 10,
        ..Default::default()
    }
}

fn opts() -> FetchOptions {
    FetchOptions {
        whole_file_below: 0,
        read_amplify: 0,
        ..Default::default()
    }
}

async fn resolve(
    f: &Fixture,
    o: &FetchOptions,
) -> (Arc<stargaze_fetcher::Layer>, Arc<FileBlob>, Arc<Cache>) {
    let cache = Arc::new(Cache::open_writer(&f.cache_dir).unwrap());
    // Ranges stream in pieces of an odd size, smaller than most members:
    // members straddle pieces and must be joined before they are decoded.
    let blob = Arc::new(FileBlob::open(&f.blob_path).unwrap().with_piece_size(4093));
    let layer = resolve_layer(
        cache.clone(),
        blob.clone(),
        &f.digest,
        Some(f.toc),
        false,
        o,
    )
    .await
    .unwrap();
    (Arc::new(layer), blob, cache)
}

fn read_content(layer: &stargaze_fetcher::Layer, ino: u64, range: Range<u64>) -> Vec<u8> {
    if range.is_empty() {
        return Vec::new(); // empty files have no content file: fs answers them itself
    }
    let bytes = std::fs::read(layer.content_path(ino)).unwrap();
    bytes[range.start as usize..range.end as usize].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_file_and_arbitrary_ranges_come_back_exactly() {
    for (label, conv) in [
        ("estargz 64k", small_chunks()),
        (
            "zstd:chunked",
            ConvertOptions {
                format: TargetFormat::ZstdChunked,
                ..small_chunks()
            },
        ),
        (
            "min-chunk-size",
            ConvertOptions {
                min_chunk_size: 32 << 10,
                ..small_chunks()
            },
        ),
    ] {
        let f = fixture(conv);
        let (layer, _blob, _cache) = resolve(&f, &opts()).await;
        // Odd ranges first: chunk boundaries, single bytes, past the end.
        for (path, data) in &f.files {
            let ino = layer.index.lookup_path(path).unwrap();
            let len = data.len() as u64;
            for (off, n) in [
                (0, 1),
                (len / 2, 7),
                (len.saturating_sub(3), 10),
                (65_535, 2),
            ] {
                if off >= len {
                    continue;
                }
                layer.fetch(&[(ino, off, n)]).await.unwrap();
                let end = (off + n).min(len);
                assert_eq!(
                    read_content(&layer, ino, off..end),
                    data[off as usize..end as usize],
                    "{label}: {path} {off}+{n}"
                );
            }
        }
        // Then everything.
        let all: Vec<_> = f
            .files
            .iter()
            .map(|(p, d)| (layer.index.lookup_path(p).unwrap(), 0, d.len() as u64))
            .collect();
        layer.fetch(&all).await.unwrap();
        for (path, data) in &f.files {
            let ino = layer.index.lookup_path(path).unwrap();
            assert_eq!(
                read_content(&layer, ino, 0..data.len() as u64),
                *data,
                "{label}: {path}"
            );
        }
        let (present, total) = layer.progress();
        assert_eq!(present, total, "{label}: every chunk present");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_fetch_each_chunk_once() {
    let f = fixture(small_chunks());
    let (layer, blob, _cache) = resolve(&f, &opts()).await;
    let ino = layer.index.lookup_path("data/file7").unwrap();
    let chunks = layer.index.inode(ino).unwrap().chunk_count() as u64;
    let reads_before = blob.requests();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let l = layer.clone();
        tasks.push(tokio::spawn(async move {
            l.fetch(&[(ino, 0, 5_000_000)]).await
        }));
    }
    let mut claimed = 0;
    for t in tasks {
        claimed += t.await.unwrap().unwrap().chunks_fetched as u64;
    }
    assert_eq!(claimed, chunks, "every chunk claimed by exactly one caller");
    assert_eq!(
        layer.counters.chunks_fetched.load(Ordering::Relaxed),
        chunks
    );
    assert!(
        blob.requests() - reads_before <= 4,
        "batched into few reads"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neighbouring_misses_merge_into_one_request() {
    let f = fixture(small_chunks());
    let (layer, blob, _cache) = resolve(&f, &opts()).await;
    let small: Vec<_> = [
        "data/file1",
        "data/file2",
        "data/file3",
        "data/file4",
        "etc/passwd",
    ]
    .iter()
    .map(|p| (layer.index.lookup_path(p).unwrap(), 0, 10))
    .collect();
    let before = blob.requests();
    layer.fetch(&small).await.unwrap();
    assert_eq!(
        blob.requests() - before,
        1,
        "one read for neighbouring small files"
    );
    // With merging disabled by a zero gap and tiny cap, the same needs more.
    let f2 = fixture(small_chunks());
    let o = FetchOptions {
        merge_gap: 0,
        max_merged_range: 1,
        ..opts()
    };
    let (layer2, _blob2, _c) = resolve(&f2, &o).await;
    let before = layer2.counters.ranges.load(Ordering::Relaxed);
    let small2: Vec<_> = ["data/file1", "data/file2", "data/file3"]
        .iter()
        .map(|p| (layer2.index.lookup_path(p).unwrap(), 0, 10))
        .collect();
    layer2.fetch(&small2).await.unwrap();
    assert_eq!(layer2.counters.ranges.load(Ordering::Relaxed) - before, 3);
}

/// A blob whose bytes are corrupted in one region.
struct Corrupt {
    inner: FileBlob,
    at: u64,
}

#[tonic::async_trait]
impl RemoteBlob for Corrupt {
    fn name(&self) -> String {
        "corrupt-blob".into()
    }
    async fn size(&self) -> Result<u64, BlobError> {
        self.inner.size().await
    }
    async fn read_ranges(&self, ranges: &[Range<u64>]) -> Result<Vec<bytes::Bytes>, BlobError> {
        let mut out = self.inner.read_ranges(ranges).await?;
        for (r, b) in ranges.iter().zip(out.iter_mut()) {
            if r.contains(&self.at) {
                let mut v = b.to_vec();
                v[(self.at - r.start) as usize] ^= 0x5a;
                *b = v.into();
            }
        }
        Ok(out)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_bytes_are_refetched_once_then_reported_never_published() {
    let f = fixture(small_chunks());
    // Find the middle of file7's second chunk's member.
    let (probe, _, _) = resolve(&f, &opts()).await;
    let ino = probe.index.lookup_path("data/file7").unwrap();
    let c = probe.index.inode(ino).unwrap().chunk(1).unwrap();
    drop(probe);
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::open_writer(cache_dir.path()).unwrap());
    let blob = Arc::new(Corrupt {
        inner: FileBlob::open(&f.blob_path).unwrap(),
        at: (c.compressed_offset + c.compressed_end) / 2,
    });
    let layer = Arc::new(
        resolve_layer(cache, blob, &f.digest, Some(f.toc), false, &opts())
            .await
            .unwrap(),
    );
    let err = layer
        .fetch(&[(ino, c.file_offset, 10)])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("/data/file7") && err.contains(&f.digest),
        "{err}"
    );
    assert!(
        !layer.presence.is_present(c.global),
        "bad bytes are never published"
    );
    assert_eq!(
        layer.counters.verification_failures.load(Ordering::Relaxed),
        2,
        "fetched twice"
    );
    // Other chunks still work.
    layer.fetch(&[(ino, 0, 10)]).await.unwrap();
}

/// A blob that records how many reads it serves at once.
struct Concurrency {
    inner: FileBlob,
    now: std::sync::atomic::AtomicUsize,
    max: std::sync::atomic::AtomicUsize,
}

#[tonic::async_trait]
impl RemoteBlob for Concurrency {
    fn name(&self) -> String {
        "concurrency-blob".into()
    }
    async fn size(&self) -> Result<u64, BlobError> {
        self.inner.size().await
    }
    async fn read_ranges(&self, ranges: &[Range<u64>]) -> Result<Vec<bytes::Bytes>, BlobError> {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(n, Ordering::SeqCst);
        // As if on the wire for a while.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let out = self.inner.read_ranges(ranges).await;
        self.now.fetch_sub(1, Ordering::SeqCst);
        out
    }
}

/// One fetch of more than a read's worth of bytes goes out as parallel
/// reads (`max_reads_per_fetch` of them), not one read after another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_fetch_reads_in_parallel() {
    let f = fixture(small_chunks());
    let cache = Arc::new(Cache::open_writer(&f.cache_dir).unwrap());
    let blob = Arc::new(Concurrency {
        inner: FileBlob::open(&f.blob_path).unwrap(),
        now: Default::default(),
        max: Default::default(),
    });
    let o = FetchOptions {
        max_read_bytes: 32 << 10,
        max_inflight_reads: 4,
        max_reads_per_fetch: 2,
        ..opts()
    };
    let layer = Arc::new(
        resolve_layer(cache, blob.clone(), &f.digest, Some(f.toc), false, &o)
            .await
            .unwrap(),
    );
    blob.max.store(0, Ordering::SeqCst);
    let all: Vec<_> = f
        .files
        .iter()
        .map(|(p, d)| (layer.index.lookup_path(p).unwrap(), 0, d.len() as u64))
        .collect();
    layer.fetch(&all).await.unwrap();
    let max = blob.max.load(Ordering::SeqCst);
    assert_eq!(max, 2, "reads at once: {max}");
    for (path, data) in &f.files {
        let ino = layer.index.lookup_path(path).unwrap();
        assert_eq!(read_content(&layer, ino, 0..data.len() as u64), *data);
    }
}

#[tokio::test]
async fn verification_is_required_unless_allowed() {
    let f = fixture(small_chunks());
    let cache = Arc::new(Cache::open_writer(&f.cache_dir).unwrap());
    let blob = Arc::new(FileBlob::open(&f.blob_path).unwrap());
    let e = resolve_layer(cache.clone(), blob.clone(), &f.digest, None, false, &opts())
        .await
        .err()
        .unwrap();
    assert!(matches!(e, FetchError::NotVerifiable { .. }) && e.is_not_lazy());
    let e = resolve_layer(
        cache.clone(),
        blob.clone(),
        &f.digest,
        Some(Digest::of(b"x")),
        false,
        &opts(),
    )
    .await
    .err()
    .unwrap();
    assert!(e.to_string().contains("TOC digest mismatch"), "{e}");
    assert!(
        resolve_layer(cache, blob, &f.digest, None, true, &opts())
            .await
            .is_ok()
    );
}

/// A blob that must not be read.
struct Gone;

#[tonic::async_trait]
impl RemoteBlob for Gone {
    fn name(&self) -> String {
        "unreachable".into()
    }
    async fn size(&self) -> Result<u64, BlobError> {
        Err(BlobError {
            blob: self.name(),
            message: "registry down".into(),
            retryable: true,
        })
    }
    async fn read_ranges(&self, _: &[Range<u64>]) -> Result<Vec<bytes::Bytes>, BlobError> {
        self.size().await.map(|_| Vec::new())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_reuses_the_index_and_the_cached_chunks() {
    let f = fixture(small_chunks());
    {
        let (layer, _, cache) = resolve(&f, &opts()).await;
        let ino = layer.index.lookup_path("data/file6").unwrap();
        layer.fetch(&[(ino, 0, 300_000)]).await.unwrap();
        cache.mark_clean().unwrap();
    }
    let cache = Arc::new(reopen::reopen_cache(&f.cache_dir));
    assert!(!cache.was_unclean());
    let layer = Arc::new(
        resolve_layer(
            cache,
            Arc::new(Gone),
            &f.digest,
            Some(f.toc),
            false,
            &opts(),
        )
        .await
        .unwrap(),
    );
    let ino = layer.index.lookup_path("data/file6").unwrap();
    let stats = layer.fetch(&[(ino, 0, 300_000)]).await.unwrap();
    assert_eq!(
        stats.chunks_fetched, 0,
        "served from the cache without the registry"
    );
    let err = layer
        .fetch(&[(layer.index.lookup_path("data/file7").unwrap(), 0, 1)])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("registry down"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_completed_by_one_layer_are_present_in_another() {
    let a = fixture(small_chunks());
    let b = fixture(ConvertOptions {
        chunk_size: 64 << 10,
        min_chunk_size: 16 << 10, // a different layer with the same files
        ..Default::default()
    });
    assert_ne!(a.digest, b.digest);
    let cache = Arc::new(Cache::open_writer(&a.cache_dir).unwrap());
    let la = Arc::new(
        resolve_layer(
            cache.clone(),
            Arc::new(FileBlob::open(&a.blob_path).unwrap()),
            &a.digest,
            Some(a.toc),
            false,
            &opts(),
        )
        .await
        .unwrap(),
    );
    let ino = la.index.lookup_path("bin/busybox").unwrap();
    la.fetch(&[(ino, 0, u64::MAX / 2)]).await.unwrap();
    // Complete, the file is hashed whole (background threads) and shared.
    let digest = la.index.inode(ino).unwrap().digest().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !cache.is_shared(&digest) {
        assert!(std::time::Instant::now() < deadline, "never shared");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // The second layer holds the same file (other chunking): once the first
    // completed and shared it, it is present there at resolve time.
    let lb = Arc::new(
        resolve_layer(
            cache,
            Arc::new(FileBlob::open(&b.blob_path).unwrap()),
            &b.digest,
            Some(b.toc),
            false,
            &opts(),
        )
        .await
        .unwrap(),
    );
    let ino_b = lb.index.lookup_path("bin/busybox").unwrap();
    let stats = lb.fetch(&[(ino_b, 0, u64::MAX / 2)]).await.unwrap();
    assert_eq!(stats.chunks_fetched, 0);
    use std::os::unix::fs::MetadataExt;
    let inode = |p: std::path::PathBuf| std::fs::metadata(p).unwrap().ino();
    assert_eq!(
        inode(lb.content_path(ino_b)),
        inode(la.content_path(ino)),
        "stored once"
    );
}

/// A blob that answers every chunk read with nothing at all (a registry
/// or proxy that drops the ranges it was asked for), under a name that
/// reads like a verification failure.
struct EmptyAnswers {
    inner: FileBlob,
    streams: std::sync::atomic::AtomicUsize,
}

#[tonic::async_trait]
impl RemoteBlob for EmptyAnswers {
    fn name(&self) -> String {
        "verification failed.example/app@sha256:0".into()
    }
    async fn size(&self) -> Result<u64, BlobError> {
        self.inner.size().await
    }
    async fn read_ranges(&self, ranges: &[Range<u64>]) -> Result<Vec<bytes::Bytes>, BlobError> {
        self.inner.read_ranges(ranges).await
    }
    async fn stream_ranges(
        &self,
        _: &[Range<u64>],
        _: &[Vec<u64>],
        _: &mut (dyn FnMut(usize, bytes::Bytes) + Send),
    ) -> Result<(), BlobError> {
        self.streams.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Only wrong bytes are fetched again and counted as verification
/// failures; a read that brought nothing is reported at once, whatever
/// its message says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_answer_is_not_a_verification_failure() {
    let f = fixture(small_chunks());
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::open_writer(cache_dir.path()).unwrap());
    let blob = Arc::new(EmptyAnswers {
        inner: FileBlob::open(&f.blob_path).unwrap(),
        streams: Default::default(),
    });
    let layer = Arc::new(
        resolve_layer(cache, blob.clone(), &f.digest, Some(f.toc), false, &opts())
            .await
            .unwrap(),
    );
    let ino = layer.index.lookup_path("data/file7").unwrap();
    let err = layer.fetch(&[(ino, 0, 10)]).await.unwrap_err();
    let FetchError::Chunk { source, .. } = &err else {
        panic!("{err}");
    };
    assert!(
        matches!(**source, stargaze_fetcher::ChunkError::ShortAnswer { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("did not match the ranges"),
        "{err}"
    );
    assert_eq!(blob.streams.load(Ordering::SeqCst), 1, "not read again");
    assert_eq!(
        layer.counters.verification_failures.load(Ordering::Relaxed),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetched_bytes_are_counted_by_what_asked_for_them() {
    use stargaze_fetcher::Purpose;
    let f = fixture(small_chunks());
    let o = FetchOptions {
        whole_file_below: 1 << 20,
        merge_gap: 0,
        ..opts()
    };
    let (layer, _blob, _cache) = resolve(&f, &o).await;
    let by = |p| layer.counters.by_purpose.get(p);
    // 300,000 bytes in 64 KiB chunks: a read of the first bytes fetches the
    // whole small file, the rest of it counted as whole_file.
    let file6 = layer.index.lookup_path("data/file6").unwrap();
    layer.fetch(&[(file6, 0, 10)]).await.unwrap();
    assert!(by(Purpose::Read) > 0, "the chunk read counts as read");
    assert!(
        by(Purpose::WholeFile) > 3 * by(Purpose::Read),
        "the other four chunks count as whole_file: {} vs {}",
        by(Purpose::WholeFile),
        by(Purpose::Read)
    );
    // A large file's range for the sweep counts as sweep only.
    let file7 = layer.index.lookup_path("data/file7").unwrap();
    layer
        .fetch_for(&[(file7, 0, 200_000)], Purpose::Sweep)
        .await
        .unwrap();
    assert!(by(Purpose::Sweep) > 0);
    assert_eq!(by(Purpose::Background), 0);
    // What was already present is not counted again, whatever asks.
    let before = layer.counters.compressed_bytes.load(Ordering::Relaxed);
    layer
        .fetch_for(&[(file6, 0, 300_000)], Purpose::Loads)
        .await
        .unwrap();
    assert_eq!(by(Purpose::Loads), 0);
    // Every byte read is under one purpose or a merged gap.
    let total: u64 =
        Purpose::ALL.iter().map(|&p| by(p)).sum::<u64>() + layer.counters.by_purpose.gaps();
    assert_eq!(total, before);
    assert_eq!(layer.counters.by_purpose.gaps(), 0, "merge_gap 0: no gaps");
}

/// A blob behind a slow link: each range streams in 64 KiB pieces at
/// `bytes_per_sec`.
struct SlowLink {
    inner: FileBlob,
    bytes_per_sec: f64,
}

#[tonic::async_trait]
impl RemoteBlob for SlowLink {
    fn name(&self) -> String {
        "slow-blob".into()
    }
    async fn size(&self) -> Result<u64, BlobError> {
        self.inner.size().await
    }
    async fn read_ranges(&self, ranges: &[Range<u64>]) -> Result<Vec<bytes::Bytes>, BlobError> {
        let bytes: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        tokio::time::sleep(std::time::Duration::from_secs_f64(
            bytes as f64 / self.bytes_per_sec,
        ))
        .await;
        self.inner.read_ranges(ranges).await
    }
    async fn stream_ranges(
        &self,
        ranges: &[Range<u64>],
        _ends: &[Vec<u64>],
        sink: &mut (dyn FnMut(usize, bytes::Bytes) + Send),
    ) -> Result<(), BlobError> {
        for (i, r) in ranges.iter().enumerate() {
            let mut at = r.start;
            while at < r.end {
                let end = (at + (64 << 10)).min(r.end);
                let piece = self
                    .read_ranges(std::slice::from_ref(&(at..end)))
                    .await?
                    .remove(0);
                sink(i, piece);
                at = end;
            }
        }
        Ok(())
    }
}

/// A layer of a 4 MiB incompressible file followed by a small one, read
/// through a 1 MB/s link.
async fn big_then_small(
    dir: &std::path::Path,
    o: &FetchOptions,
) -> (Arc<stargaze_fetcher::Layer>, u64, u64) {
    let mut x = 7u32;
    let big = image::file_bytes(4 << 20, &mut x);
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [("big", &big[..]), ("small", &b"small file"[..])] {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, data).unwrap();
    }
    let tar = b.into_inner().unwrap();
    let mut out = Vec::new();
    let res = stargaze_format::convert("fixture", &tar, &mut out, &small_chunks(), None).unwrap();
    std::fs::write(dir.join("blob"), &out).unwrap();
    let cache = Arc::new(Cache::open_writer(&dir.join("cache")).unwrap());
    let blob = Arc::new(SlowLink {
        inner: FileBlob::open(&dir.join("blob")).unwrap(),
        bytes_per_sec: 1e6,
    });
    let layer = Arc::new(
        resolve_layer(
            cache,
            blob,
            &res.digest.to_string(),
            Some(res.toc_digest),
            false,
            o,
        )
        .await
        .unwrap(),
    );
    let big = layer.index.lookup_path("big").unwrap();
    let small = layer.index.lookup_path("small").unwrap();
    (layer, big, small)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_does_not_wait_behind_a_prefetch() {
    let dir = tempfile::tempdir().unwrap();
    let o = FetchOptions {
        max_inflight_reads: 1,
        max_read_bytes: 256 << 10,
        ..opts()
    };
    let (layer, big, small) = big_then_small(dir.path(), &o).await;
    // Four seconds of prefetch queued in 256 KiB reads on the layer's one
    // read slot; the small file lies after all of it in the blob.
    let prefetch = {
        let layer = layer.clone();
        tokio::spawn(async move {
            layer
                .fetch_for(&[(big, 0, 4 << 20)], stargaze_fetcher::Purpose::Landmark)
                .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let t0 = std::time::Instant::now();
    layer.fetch(&[(small, 0, 10)]).await.unwrap();
    let waited = t0.elapsed();
    assert!(
        waited < std::time::Duration::from_millis(1500),
        "the read waited {waited:?} behind the prefetch"
    );
    assert!(
        !prefetch.is_finished(),
        "the prefetch should still be running"
    );
    assert_eq!(read_content(&layer, small, 0..10), b"small file");
    prefetch.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_is_answered_when_stored_not_when_its_whole_read_is_in() {
    let dir = tempfile::tempdir().unwrap();
    let o = FetchOptions {
        max_inflight_reads: 1,
        ..opts()
    };
    let (layer, big, _small) = big_then_small(dir.path(), &o).await;
    // One 4 MiB read (4 s at 1 MB/s) holds the file's first chunk.
    let prefetch = {
        let layer = layer.clone();
        tokio::spawn(async move {
            layer
                .fetch_for(&[(big, 0, 4 << 20)], stargaze_fetcher::Purpose::Landmark)
                .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let t0 = std::time::Instant::now();
    layer.fetch(&[(big, 0, 4096)]).await.unwrap();
    let waited = t0.elapsed();
    assert!(
        waited < std::time::Duration::from_millis(1500),
        "the first chunk was answered after {waited:?}"
    );
    assert!(
        !prefetch.is_finished(),
        "the read should still be streaming"
    );
    prefetch.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_brings_the_chunks_that_follow_it_in_the_same_request() {
    use stargaze_fetcher::Purpose;
    for amplify in [0, 64 << 10] {
        let f = fixture(small_chunks());
        let o = FetchOptions {
            read_amplify: amplify,
            ..opts()
        };
        let (layer, blob, _cache) = resolve(&f, &o).await;
        let ino = |p: &str| layer.index.lookup_path(p).unwrap();
        let before = blob.requests();
        layer.fetch(&[(ino("data/file2"), 0, 10)]).await.unwrap();
        assert_eq!(blob.requests() - before, 1);
        // The next small files of the blob came with it, unasked.
        let next = ino("data/file3");
        let present = |i| {
            layer
                .index
                .inode(i)
                .unwrap()
                .chunks()
                .all(|c| layer.presence.is_present(c.global))
        };
        if amplify == 0 {
            assert!(
                !present(next),
                "read_amplify = 0 fetches only what was asked"
            );
            assert_eq!(layer.counters.by_purpose.get(Purpose::Neighbours), 0);
            continue;
        }
        // Answered when its own chunk is stored: the rest of the read may
        // still be arriving.
        let after = ino("data/file4");
        for _ in 0..100 {
            if present(next) && present(after) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(present(next), "data/file3 follows data/file2 in the blob");
        assert!(present(after));
        assert_eq!(read_content(&layer, next, 0..512), f.files["data/file3"]);
        assert!(layer.counters.by_purpose.get(Purpose::Neighbours) > 0);
        let before = blob.requests();
        layer.fetch(&[(next, 0, 512)]).await.unwrap();
        assert_eq!(blob.requests() - before, 0, "already here");
    }
}

/// A batch that only replays a trace reads the ranges the trace names and
/// no gap between them; other prefetches merge gaps up to `merge_gap`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_replay_reads_no_gaps() {
    use stargaze_fetcher::Purpose;
    for (purpose, gaps) in [(Purpose::Trace, false), (Purpose::Landmark, true)] {
        let f = fixture(small_chunks());
        let (layer, _blob, _cache) = resolve(&f, &opts()).await;
        let file7 = layer.index.lookup_path("data/file7").unwrap();
        // Chunks 0 and 2 of 64 KiB chunks: chunk 1 lies between them.
        layer
            .fetch_for(&[(file7, 0, 10), (file7, 140_000, 10)], purpose)
            .await
            .unwrap();
        assert_eq!(
            layer.counters.by_purpose.gaps() > 0,
            gaps,
            "{purpose:?}: {} bytes of gaps",
            layer.counters.by_purpose.gaps()
        );
    }
}

/// A blob whose tail read returns at least `ahead` bytes, as a tail read
/// ahead with the TOC's known size does (`WarmBlob`).
struct TailAhead {
    inner: FileBlob,
    ahead: u64,
}

#[tonic::async_trait]
impl RemoteBlob for TailAhead {
    fn name(&self) -> String {
        "tail-ahead".into()
    }
    async fn size(&self) -> Result<u64, BlobError> {
        self.inner.size().await
    }
    async fn read_ranges(&self, ranges: &[Range<u64>]) -> Result<Vec<bytes::Bytes>, BlobError> {
        self.inner.read_ranges(ranges).await
    }
    async fn read_tail(&self, n: u64) -> Result<(u64, Vec<u8>), BlobError> {
        self.inner.read_tail(n.max(self.ahead)).await
    }
}

/// A TOC longer than the tail window costs a second read; its size is
/// remembered beside the traces, and a tail read of that size resolves
/// the layer in one read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tocs_size_is_remembered_and_then_read_in_one_go() {
    let f = fixture(small_chunks());
    let o = FetchOptions {
        tail_window: 4096,
        ..opts()
    };
    let (_layer, blob, cache) = resolve(&f, &o).await;
    assert_eq!(blob.requests(), 2, "the tail window, then the TOC's head");
    let start = std::time::Instant::now();
    let hint = loop {
        if let Some(h) = cache.tail_hint(&layer_digest(&f.digest)) {
            break h;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "no hint"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert!(hint > 4096, "{hint}");
    // Another node's cache, or this one after the layer's eviction.
    let dir = tempfile::tempdir().unwrap();
    let cache2 = Arc::new(Cache::open_writer(dir.path()).unwrap());
    let ahead = Arc::new(TailAhead {
        inner: FileBlob::open(&f.blob_path).unwrap(),
        ahead: hint,
    });
    resolve_layer(cache2, ahead.clone(), &f.digest, Some(f.toc), false, &o)
        .await
        .unwrap();
    assert_eq!(ahead.inner.requests(), 1, "footer and TOC in one read");
}

/// A layer digest a test has as text (from a response or a manifest).
fn layer_digest(s: &str) -> stargaze_format::Digest {
    s.parse().expect("a layer digest")
}
