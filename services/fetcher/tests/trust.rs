//! One image can never change what another reads through the shared cache.
//!
//! Content is shared between layers by file digest, and a file digest in a
//! TOC is the word of whoever built the image. Here layer B's TOC gives one
//! of its files the digest of a file of layer A while its chunk digests are
//! true to B's own bytes (so every chunk of B verifies): whichever layer is
//! read first, A reads A's bytes and B reads B's — never A's silently and
//! never a mix of the two.

mod reopen;

use std::sync::Arc;
use std::time::{Duration, Instant};

use stargaze_cache::Cache;
use stargaze_fetcher::{FetchOptions, FileBlob, Layer, resolve_layer};
use stargaze_format::Digest;
use stargaze_format::convert::ConvertOptions;
use stargaze_format::toc::JsonToc;

struct Layered {
    blob: std::path::PathBuf,
    digest: String,
    toc: Digest,
}

fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// Convert a tar to eStargz (64 KiB chunks), then let `edit` rewrite the
/// TOC; the blob gets the edited TOC and a footer pointing at it, and the
/// TOC digest is the edited TOC's (so the layer verifies as the image's
/// `toc.digest` annotation would have it).
fn layer(
    dir: &std::path::Path,
    name: &str,
    files: &[(&str, &[u8])],
    edit: impl FnOnce(&mut JsonToc),
) -> Layered {
    let opts = ConvertOptions {
        chunk_size: 64 << 10,
        ..Default::default()
    };
    let mut blob = Vec::new();
    stargaze_format::convert(name, &tar_of(files), &mut blob, &opts, None).unwrap();
    let (blob, toc) = stargaze_format::convert::with_edited_toc(&blob, edit).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, &blob).unwrap();
    Layered {
        blob: path,
        digest: Digest::of(&blob).to_string(),
        toc,
    }
}

/// Give `path` the file digest `digest` in the TOC (its chunk digests stay).
fn claim(toc: &mut JsonToc, path: &str, digest: Digest) {
    let e = toc
        .entries
        .iter_mut()
        .find(|e| e.name == path && e.kind == "reg")
        .unwrap_or_else(|| panic!("{path} not in the TOC"));
    e.digest = digest.to_string();
}

async fn resolve(cache: &Arc<Cache>, l: &Layered) -> Arc<Layer> {
    Arc::new(
        resolve_layer(
            cache.clone(),
            Arc::new(FileBlob::open(&l.blob).unwrap()),
            &l.digest,
            Some(l.toc),
            false,
            &FetchOptions::default(),
        )
        .await
        .unwrap(),
    )
}

/// Read a file the way the fs service does: fetch its chunks, then read
/// the layer's cache file.
async fn read(layer: &Arc<Layer>, path: &str) -> Vec<u8> {
    let ino = layer.index.lookup_path(path).unwrap();
    let size = layer.index.inode(ino).unwrap().size();
    layer.fetch(&[(ino, 0, size)]).await.unwrap();
    std::fs::read(layer.content_path(ino)).unwrap()
}

/// Wait until the complete file of `digest` is shared (its whole-file
/// hash runs on background threads).
async fn wait_shared(cache: &Cache, digest: &Digest) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cache.is_shared(digest) {
        assert!(Instant::now() < deadline, "{digest} never shared");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Let background sharing that might happen do so.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

fn patterned(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

struct Pair {
    _dir: tempfile::TempDir,
    cache: Arc<Cache>,
    a: Layered,
    b: Layered,
    a_bytes: Vec<u8>,
    b_bytes: Vec<u8>,
}

/// A holds `etc/a.txt` with `a_bytes`; B holds `etc/b.txt` with `b_bytes`
/// but its TOC claims `a_bytes`' digest for it.
fn pair(a_bytes: Vec<u8>, b_bytes: Vec<u8>) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::open_writer(&dir.path().join("cache")).unwrap());
    let a = layer(
        dir.path(),
        "a",
        &[("etc/a.txt", &a_bytes), ("etc/other", b"unrelated")],
        |_| {},
    );
    let claimed = Digest::of(&a_bytes);
    let b = layer(dir.path(), "b", &[("etc/b.txt", &b_bytes)], |toc| {
        claim(toc, "etc/b.txt", claimed)
    });
    Pair {
        _dir: dir,
        cache,
        a,
        b,
        a_bytes,
        b_bytes,
    }
}

async fn a_first(p: Pair) {
    let la = resolve(&p.cache, &p.a).await;
    assert!(read(&la, "etc/a.txt").await == p.a_bytes, "bytes differ");
    wait_shared(&p.cache, &Digest::of(&p.a_bytes)).await;
    let lb = resolve(&p.cache, &p.b).await;
    assert!(
        read(&lb, "etc/b.txt").await == p.b_bytes,
        "B reads its own bytes"
    );
    settle().await;
    assert!(read(&la, "etc/a.txt").await == p.a_bytes, "A is unchanged");
    assert!(
        std::fs::read(p.cache.content_path(&Digest::of(&p.a_bytes))).unwrap() == p.a_bytes,
        "the shared copy is unchanged"
    );
    // A layer resolved later still gets A's bytes.
    drop(la);
    let la = resolve(&p.cache, &p.a).await;
    assert!(read(&la, "etc/a.txt").await == p.a_bytes, "bytes differ");
}

async fn b_first(p: Pair) {
    let lb = resolve(&p.cache, &p.b).await;
    assert!(read(&lb, "etc/b.txt").await == p.b_bytes, "bytes differ");
    settle().await;
    assert!(
        !p.cache.is_shared(&Digest::of(&p.a_bytes)),
        "bytes that do not hash to the claimed digest are never shared"
    );
    let la = resolve(&p.cache, &p.a).await;
    assert!(
        read(&la, "etc/a.txt").await == p.a_bytes,
        "A reads its own bytes"
    );
    wait_shared(&p.cache, &Digest::of(&p.a_bytes)).await;
    assert!(read(&lb, "etc/b.txt").await == p.b_bytes, "B is unchanged");
    // B resolved again (a restart) keeps its own bytes too.
    drop(lb);
    let lb = resolve(&p.cache, &p.b).await;
    assert!(read(&lb, "etc/b.txt").await == p.b_bytes, "bytes differ");
}

/// A one-chunk file's chunk digest is its file digest: a TOC that gives
/// it another image's file digest contradicts itself and the layer is
/// refused at resolve (naming the entry), before anything is read; A is
/// untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_file_claiming_another_images_digest_is_refused() {
    let p = pair(b"AAAAAA".to_vec(), b"BBBBBB".to_vec());
    let la = resolve(&p.cache, &p.a).await;
    assert!(read(&la, "etc/a.txt").await == p.a_bytes);
    wait_shared(&p.cache, &Digest::of(&p.a_bytes)).await;
    let err = resolve_layer(
        p.cache.clone(),
        Arc::new(FileBlob::open(&p.b.blob).unwrap()),
        &p.b.digest,
        Some(p.b.toc),
        false,
        &FetchOptions::default(),
    )
    .await
    .err()
    .expect("a self-contradicting TOC is refused")
    .to_string();
    assert!(
        err.contains(&p.b.digest) && err.contains("etc/b.txt") && err.contains("contradicts"),
        "{err}"
    );
    assert!(read(&la, "etc/a.txt").await == p.a_bytes);
}

/// Multi-chunk files whose first chunk is the same in both: a file made of
/// A's first chunk and B's second would verify chunk by chunk against
/// either TOC's first chunk digest.
fn multi_chunk() -> (Vec<u8>, Vec<u8>) {
    let a = patterned(1, 200 << 10);
    let mut b = a.clone();
    b[(64 << 10) + 5..].copy_from_slice(&patterned(9, (200 << 10) - (64 << 10) - 5));
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_file_claiming_another_images_digest_a_first() {
    let (a, b) = multi_chunk();
    a_first(pair(a, b)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_file_claiming_another_images_digest_b_first() {
    let (a, b) = multi_chunk();
    b_first(pair(a, b)).await;
}

/// An honest second layer with the same file uses the shared copy without
/// fetching it; its file is the same inode (stored once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_honest_layer_with_the_same_file_uses_the_shared_copy() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::open_writer(&dir.path().join("cache")).unwrap());
    let data = patterned(3, 150 << 10);
    let a = layer(dir.path(), "a", &[("usr/lib/x.so", &data)], |_| {});
    let b = layer(
        dir.path(),
        "b",
        &[("opt/x.so", &data), ("opt/y", b"y")],
        |_| {},
    );
    let la = resolve(&cache, &a).await;
    assert!(read(&la, "usr/lib/x.so").await == data, "bytes differ");
    wait_shared(&cache, &Digest::of(&data)).await;
    let lb = resolve(&cache, &b).await;
    let ino = lb.index.lookup_path("opt/x.so").unwrap();
    let stats = lb.fetch(&[(ino, 0, data.len() as u64)]).await.unwrap();
    assert_eq!(stats.chunks_fetched, 0, "adopted at resolve");
    assert!(
        std::fs::read(lb.content_path(ino)).unwrap() == data,
        "bytes differ"
    );
    let inode = |p: std::path::PathBuf| std::fs::metadata(p).unwrap().ino();
    assert_eq!(
        inode(lb.content_path(ino)),
        inode(la.content_path(la.index.lookup_path("usr/lib/x.so").unwrap()))
    );
}

/// After an unclean stop a shared file may not hold what its name says:
/// re-verification hashes shared content whole and removes what fails, and
/// a layer whose complete file (a link to it) fails starts a file of its
/// own, fetched again with the right bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_hashes_shared_content_whole_and_refetches_what_fails() {
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().join("cache");
    let data = patterned(5, 150 << 10);
    let a = layer(dir.path(), "a", &[("usr/lib/x.so", &data)], |_| {});
    let digest = Digest::of(&data);
    {
        let cache = Arc::new(Cache::open_writer(&cache_dir).unwrap());
        let la = resolve(&cache, &a).await;
        assert!(read(&la, "usr/lib/x.so").await == data, "bytes differ");
        wait_shared(&cache, &digest).await;
        // Bytes that never reached the disk before a crash: the shared
        // copy (and so the layer's link to it) holds something else.
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(cache.content_path(&digest))
            .unwrap();
        f.write_all_at(&[0u8; 4096], 70_000).unwrap();
        // dropped without mark_clean: a crash
    }
    let cache = Arc::new(reopen::reopen_cache(&cache_dir));
    assert!(cache.was_unclean());
    let r = stargaze_fetcher::recover::reverify(&cache);
    assert_eq!((r.shared_checked, r.shared_removed), (1, 1), "{r:?}");
    assert!(r.chunks_cleared > 0, "{r:?}");
    assert!(!cache.is_shared(&digest));
    let la = resolve(&cache, &a).await;
    let ino = la.index.lookup_path("usr/lib/x.so").unwrap();
    assert_eq!(
        la.progress().0,
        0,
        "every chunk of the failed file is cleared"
    );
    assert!(read(&la, "usr/lib/x.so").await == data, "bytes differ");
    wait_shared(&cache, &digest).await;
    assert!(
        std::fs::read(cache.content_path(&digest)).unwrap() == data,
        "bytes differ"
    );
    assert!(
        std::fs::read(la.content_path(ino)).unwrap() == data,
        "bytes differ"
    );
}
