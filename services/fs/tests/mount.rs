//! Real FUSE mounts (root and /dev/fuse, which CI has: without them the
//! tests fail, they never skip): the mounted layer, converted by our
//! converter and by the Go estargz library `ctr-remote` uses, against GNU
//! tar's extraction of the same tar, field by field; a layer's overlayfs
//! xattrs against containerd's unpack under overlayfs; concurrent cold
//! reads; passthrough.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use stargaze_cache::Cache;
use stargaze_fetcher::{FileBlob, Layer, resolve_layer};
use stargaze_format::Digest;
use stargaze_fs::{ChunkSource, FsShared, SourceError};
use stargaze_testkit::{image, run, unmount_below};

/// The fetcher's engine in process, as the chunk source.
struct Engine(HashMap<Digest, Arc<Layer>>);

#[tonic::async_trait]
impl ChunkSource for Engine {
    async fn fetch(
        &self,
        layer: &Digest,
        ino: u64,
        offset: u64,
        len: u64,
    ) -> Result<(), SourceError> {
        let l = self
            .0
            .get(layer)
            .ok_or_else(|| SourceError::InProcess(format!("unknown layer {layer}").into()))?;
        l.fetch(&[(ino, offset, len)])
            .await
            .map(|_| ())
            .map_err(|e| SourceError::InProcess(Box::new(e)))
    }

    async fn executing(&self, layer: &Digest, ino: u64) {
        EXECUTED.lock().unwrap().push((layer.to_string(), ino));
    }

    async fn prefetch_files(&self, _layer: &Digest, files: Vec<(u64, u64)>) {
        // Recorded, not fetched: a test sees what each miss asked for.
        PREFETCHED
            .lock()
            .unwrap()
            .push(files.into_iter().map(|(ino, _)| ino).collect());
    }

    async fn note_reads(
        &self,
        layer: Option<&Digest>,
        ranges: Vec<(u64, u64, u64)>,
    ) -> Option<u64> {
        let layer = layer.map(Digest::to_string).unwrap_or_default();
        let mut noted = NOTED.lock().unwrap();
        noted.extend(ranges.into_iter().map(|r| (layer.clone(), r)));
        Some(GENERATION.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// A read fs reported for traces: layer, (inode, offset, length).
type Noted = (String, (u64, u64, u64));
/// Reads fs reported for traces, and the recording generation it is told.
static NOTED: std::sync::Mutex<Vec<Noted>> = std::sync::Mutex::new(Vec::new());
static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The files of each prefetch fs asked for alongside a miss.
static PREFETCHED: std::sync::Mutex<Vec<Vec<u64>>> = std::sync::Mutex::new(Vec::new());

/// Files fs said were being executed (each test is its own process).
static EXECUTED: std::sync::Mutex<Vec<(String, u64)>> = std::sync::Mutex::new(Vec::new());

/// Every entry type GNU tar can extract (no whiteouts: those are overlay's business).
fn layer_tar() -> Vec<u8> {
    let mut tar = image::busybox_layer();
    let end = stargaze_format::tar::TarReader::new(&tar)
        .last()
        .unwrap()
        .unwrap()
        .end_offset as usize;
    tar.truncate(end);
    let mut b = tar::Builder::new(tar);
    let add = |b: &mut tar::Builder<Vec<u8>>,
               kind: tar::EntryType,
               name: &str,
               mode: u32,
               data: &[u8],
               f: &dyn Fn(&mut tar::Header)| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_mtime(1_650_000_000);
        h.set_uid(1234);
        h.set_gid(5678);
        f(&mut h);
        b.append_data(&mut h, name, data).unwrap();
    };
    let none = |_: &mut tar::Header| {};
    add(
        &mut b,
        tar::EntryType::Directory,
        "srv/",
        0o2775,
        b"",
        &none,
    );
    add(
        &mut b,
        tar::EntryType::Directory,
        "srv/sticky/",
        0o1777,
        b"",
        &none,
    );
    add(
        &mut b,
        tar::EntryType::Regular,
        "srv/setuid",
        0o4755,
        b"#!/bin/sh\n",
        &none,
    );
    add(
        &mut b,
        tar::EntryType::Regular,
        "srv/empty",
        0o600,
        b"",
        &none,
    );
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    add(
        &mut b,
        tar::EntryType::Regular,
        "srv/big.bin",
        0o644,
        &big,
        &none,
    );
    add(&mut b, tar::EntryType::Fifo, "srv/fifo", 0o640, b"", &none);
    add(&mut b, tar::EntryType::Char, "srv/null", 0o666, b"", &|h| {
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
    });
    add(
        &mut b,
        tar::EntryType::Block,
        "srv/disk",
        0o660,
        b"",
        &|h| {
            h.set_device_major(8).unwrap();
            h.set_device_minor(300).unwrap();
        },
    );
    b.append_pax_extensions([("SCHILY.xattr.user.comment", &b"\xff\x00binary"[..])])
        .unwrap();
    add(
        &mut b,
        tar::EntryType::Regular,
        "srv/xattr",
        0o644,
        b"x",
        &none,
    );
    // The link's header says what its target's says, as builders write
    // it: GNU tar leaves the inode as the target's header made it, while
    // containerd (and the mount) apply the link's header to it.
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Link);
    h.set_mode(0o644);
    h.set_mtime(1_650_000_000);
    h.set_uid(1234);
    h.set_gid(5678);
    h.set_size(0);
    b.append_link(&mut h, "srv/big-link", "srv/big.bin")
        .unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_mode(0o777);
    h.set_size(0);
    h.set_mtime(1_650_000_000);
    b.append_link(&mut h, "srv/link", "../bin/busybox").unwrap();
    let long = format!("srv/{}/ünïcödé-{}", "d".repeat(120), "n".repeat(100));
    add(
        &mut b,
        tar::EntryType::Directory,
        &format!("{}/", long.rsplit_once('/').unwrap().0),
        0o755,
        b"",
        &none,
    );
    add(
        &mut b,
        tar::EntryType::Regular,
        &long,
        0o644,
        b"long",
        &none,
    );
    b.into_inner().unwrap()
}

#[derive(Debug, Default, PartialEq)]
struct Entry {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: i64,
    nlink: u64,
    rdev: u64,
    link: Option<PathBuf>,
    xattrs: BTreeMap<String, Vec<u8>>,
    sha: Option<String>,
    /// Why `lstat` failed (overlayfs refuses some lookups).
    error: Option<&'static str>,
}

/// Every xattr name of `p` (not following a symlink).
fn xattr_names(p: &Path) -> Vec<String> {
    let mut buf = vec![0u8; 4096];
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: valid C string and buffer.
    let n = unsafe { nix::libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    buf[..n.max(0) as usize]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect()
}

/// The xattrs of `p` that do not depend on the host: `user.*` and file
/// capabilities (the LSM's `security.*` and `trusted.*` do).
fn xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let mut out = BTreeMap::new();
    for name in xattr_names(p) {
        if !name.starts_with("user.") && name != "security.capability" {
            continue;
        }
        let cn = std::ffi::CString::new(name.as_bytes()).unwrap();
        let mut v = vec![0u8; 4096];
        // SAFETY: valid C strings and buffer.
        let m = unsafe {
            nix::libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len())
        };
        v.truncate(m.max(0) as usize);
        out.insert(name, v);
    }
    out
}

fn walk(root: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            let m = match std::fs::symlink_metadata(&p) {
                Ok(m) => m,
                Err(e) => {
                    let errno = nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0));
                    let error = Some(errno.desc());
                    out.insert(
                        rel,
                        Entry {
                            error,
                            ..Default::default()
                        },
                    );
                    continue;
                }
            };
            let ft = m.file_type();
            let kind = if ft.is_dir() {
                stack.push(p.clone());
                "dir"
            } else if ft.is_symlink() {
                "symlink"
            } else if ft.is_fifo() {
                "fifo"
            } else if ft.is_char_device() {
                "char"
            } else if ft.is_block_device() {
                "block"
            } else {
                "reg"
            };
            let sha = (kind == "reg")
                .then(|| stargaze_format::Digest::of(&std::fs::read(&p).unwrap()).to_string());
            out.insert(
                rel,
                Entry {
                    kind,
                    mode: m.mode() & 0o7777,
                    uid: m.uid(),
                    gid: m.gid(),
                    size: if kind == "dir" { 0 } else { m.size() },
                    mtime: m.mtime(),
                    nlink: m.nlink(),
                    rdev: m.rdev(),
                    link: (kind == "symlink").then(|| std::fs::read_link(&p).unwrap()),
                    xattrs: xattrs(&p),
                    sha,
                    error: None,
                },
            );
        }
    }
    out
}

struct Mounted {
    dir: tempfile::TempDir,
    session: Option<stargaze_fs::FuseMount>,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.umount_and_join();
        }
        unmount_below(self.dir.path());
        remove_session_files(self.dir.path());
    }
}

/// fs keeps `<mountpoint>.session` and `<mountpoint>.opens` beside its
/// mountpoint (for a restart to take the mount over): gone with the test.
fn remove_session_files(mountpoint: &Path) {
    for ext in [".session", ".opens", ".rings"] {
        let mut name = mountpoint.as_os_str().to_owned();
        name.push(ext);
        let _ = std::fs::remove_file(name);
    }
}

/// Which converter writes the layer.
#[derive(Clone, Copy)]
enum Converter {
    Stargaze,
    /// The Go estargz library, as `ctr-remote image convert --estargz`
    /// runs it (`tests/go/esgz-build`).
    Go,
}

async fn setup(tar: &[u8], work: &Path) -> (Arc<FsShared>, Arc<Layer>, String) {
    setup_with(tar, work, Converter::Stargaze).await
}

async fn setup_with(
    tar: &[u8],
    work: &Path,
    converter: Converter,
) -> (Arc<FsShared>, Arc<Layer>, String) {
    let blob_path = work.join("blob");
    let toc_digest: stargaze_format::Digest = match converter {
        Converter::Stargaze => {
            let mut blob = Vec::new();
            let opts = stargaze_format::ConvertOptions {
                chunk_size: 256 << 10,
                ..Default::default()
            };
            let res = stargaze_format::convert("t", tar, &mut blob, &opts, None).unwrap();
            std::fs::write(&blob_path, &blob).unwrap();
            res.toc_digest
        }
        Converter::Go => {
            let tar_path = work.join("layer-for-go.tar");
            std::fs::write(&tar_path, tar).unwrap();
            let out = run(Command::new(stargaze_testkit::go_build("esgz-build"))
                .arg(&tar_path)
                .arg(&blob_path)
                .arg((256 << 10).to_string()));
            String::from_utf8(out.stdout)
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        }
    };
    let digest = stargaze_format::Digest::of(&std::fs::read(&blob_path).unwrap()).to_string();
    let cache_dir = work.join("cache");
    let cache = Arc::new(Cache::open_writer(&cache_dir).unwrap());
    // Chunk by chunk and nothing brought along, so that a test can count
    // exactly the chunks its reads fetched.
    let fopts = stargaze_fetcher::FetchOptions {
        whole_file_below: 0,
        read_amplify: 0,
        sweep_max_window: 0,
        ..Default::default()
    };
    let layer = Arc::new(
        resolve_layer(
            cache.clone(),
            Arc::new(FileBlob::open(&blob_path).unwrap()),
            &digest,
            Some(toc_digest),
            false,
            &fopts,
        )
        .await
        .unwrap(),
    );
    let source = Arc::new(Engine([(layer.digest, layer.clone())].into()));
    let shared = Arc::new(FsShared::new(
        &cache_dir,
        source,
        tokio::runtime::Handle::current(),
        Duration::from_secs(3600),
    ));
    shared.layers.attach(&layer.digest).unwrap();
    (shared, layer, digest)
}

/// Mount with the transport the suite runs with (`STARGAZE_FS_TRANSPORT`,
/// as the binary would take it).
fn mount(shared: Arc<FsShared>) -> Mounted {
    *shared.transport_wanted.lock() =
        stargaze_fs::transport::wanted(stargaze_service::config::FsTransport::Classic).unwrap();
    mount_as_set(shared)
}

fn mount_as_set(shared: Arc<FsShared>) -> Mounted {
    let dir = tempfile::Builder::new()
        .prefix("sg-fs-")
        .tempdir_in("/tmp")
        .unwrap();
    let session = stargaze_fs::mount(shared, dir.path(), 4).unwrap();
    Mounted {
        dir,
        session: Some(session),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mounted_layer_is_the_tree_gnu_tar_extracts() {
    mounted_tree_equals_gnu_tar(Converter::Stargaze).await;
}

/// The same for a layer written by the Go converter (`ctr-remote`'s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_converted_by_the_go_library_is_the_tree_gnu_tar_extracts() {
    mounted_tree_equals_gnu_tar(Converter::Go).await;
}

async fn mounted_tree_equals_gnu_tar(converter: Converter) {
    stargaze_testkit::require_root_fuse();
    let work = tempfile::tempdir().unwrap();
    let tar = layer_tar();
    let (shared, _layer, digest) = setup_with(&tar, work.path(), converter).await;
    let m = mount(shared);
    let layer_dir = m.dir.path().join(&digest[7..]);

    let extracted = work.path().join("extracted");
    std::fs::create_dir_all(&extracted).unwrap();
    std::fs::write(work.path().join("layer.tar"), &tar).unwrap();
    run(Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf"])
        .arg(work.path().join("layer.tar"))
        .arg("-C")
        .arg(&extracted));

    let (want, got) = tokio::task::spawn_blocking(move || (walk(&extracted), walk(&layer_dir)))
        .await
        .unwrap();
    assert_eq!(
        want.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>(),
        "same names"
    );
    // GNU tar creates symlinks after restoring directory times, so a
    // directory's mtime comes from the tar header itself.
    let header_mtimes: HashMap<PathBuf, i64> = stargaze_format::tar::TarReader::new(&tar)
        .map(|e| e.unwrap())
        .map(|e| {
            (
                PathBuf::from(stargaze_format::tree::normalize_path(&e.name).unwrap()),
                e.mtime,
            )
        })
        .collect();
    for (path, w) in &want {
        let g = &got[path];
        if w.kind == "dir" {
            assert_eq!(g.mtime, header_mtimes[path], "{}: mtime", path.display());
            let w = Entry {
                mtime: g.mtime,
                xattrs: w.xattrs.clone(),
                link: None,
                sha: None,
                ..*w
            };
            assert_eq!(*g, w, "{}", path.display());
        } else {
            assert_eq!(g, w, "{}", path.display());
        }
    }
    // The mount root lists the layer by its digest's hex.
    let names: Vec<_> = std::fs::read_dir(m.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, [std::ffi::OsString::from(&digest[7..])]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_readers_of_a_cold_file_fetch_each_chunk_once() {
    stargaze_testkit::require_root_fuse();
    let work = tempfile::tempdir().unwrap();
    let (shared, layer, digest) = setup(&layer_tar(), work.path()).await;
    let m = mount(shared.clone());
    let path = m.dir.path().join(&digest[7..]).join("srv/big.bin");
    let ino = layer.index.lookup_path("srv/big.bin").unwrap();
    let chunks = layer.index.inode(ino).unwrap().chunk_count() as u64;
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let p = path.clone();
            std::thread::spawn(move || stargaze_format::Digest::of(&std::fs::read(p).unwrap()))
        })
        .collect();
    let digests: Vec<_> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    assert!(digests.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(
        digests[0],
        layer.index.inode(ino).unwrap().digest().unwrap()
    );
    assert_eq!(
        layer.counters.chunks_fetched.load(Ordering::Relaxed),
        chunks,
        "each chunk fetched once"
    );
    // The only layer attached: the node-wide counter is this layer's.
    assert!(shared.counters.bytes_after_fetch.load(Ordering::Relaxed) > 0);
}

/// A file complete in the cache is opened with FUSE passthrough (the kernel
/// reads the cache file itself) and still reads the same, also through an
/// overlay stacked on the mount (max_stack_depth 1). A file that is not
/// complete yet is served through read().
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_files_are_opened_with_passthrough() {
    stargaze_testkit::require_root_fuse();
    stargaze_testkit::require_fuse_passthrough();
    let work = tempfile::tempdir().unwrap();
    let (shared, layer, digest) = setup(&layer_tar(), work.path()).await;
    shared.passthrough.wanted.store(true, Ordering::Release);
    let m = mount(shared.clone());
    let layer_dir = m.dir.path().join(&digest[7..]);
    let ino = layer.index.lookup_path("srv/big.bin").unwrap();
    let want = layer.index.inode(ino).unwrap().digest().unwrap();
    let p = &shared.passthrough;

    // Cold: the file is not complete at open, so it goes through read().
    // It stays open (as a running binary would) while it becomes complete.
    let big = layer_dir.join("srv/big.bin");
    let mut first = std::fs::File::open(&big).unwrap();
    let mut cold = Vec::new();
    std::io::Read::read_to_end(&mut first, &mut cold).unwrap();
    assert_eq!(stargaze_format::Digest::of(&cold), want);
    assert_eq!(p.opens.load(Ordering::Relaxed), 0);
    // Complete now, but the kernel refuses passthrough for an inode with a
    // file open in cached mode: a second open must still work, cached.
    let again = std::fs::read(&big).unwrap();
    assert_eq!(stargaze_format::Digest::of(&again), want);
    assert_eq!(p.opens.load(Ordering::Relaxed), 0);
    drop(first);
    assert!(
        p.active.load(Ordering::Acquire),
        "the kernel offers passthrough but it is not active"
    );

    // Once the cached handles are released (FUSE_RELEASE arrives
    // asynchronously after close), opens use passthrough; same bytes.
    let mut tries = 0;
    while p.opens.load(Ordering::Relaxed) == 0 {
        tries += 1;
        assert!(
            tries < 100,
            "no passthrough open after the cached handles closed"
        );
        let warm = std::fs::read(&big).unwrap();
        assert_eq!(stargaze_format::Digest::of(&warm), want);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(p.active.load(Ordering::Acquire), "passthrough was given up");

    // An overlay can still stack on the mount and read through it.
    let (upper, lower_work, merged) = (
        work.path().join("upper"),
        work.path().join("work"),
        work.path().join("merged"),
    );
    for d in [&upper, &lower_work, &merged] {
        std::fs::create_dir_all(d).unwrap();
    }
    run(Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!(
            "lowerdir={},upperdir={},workdir={}",
            layer_dir.display(),
            upper.display(),
            lower_work.display()
        ))
        .arg(&merged));
    let through_overlay = std::fs::read(merged.join("srv/big.bin"));
    let _ = nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH);
    assert_eq!(stargaze_format::Digest::of(&through_overlay.unwrap()), want);
    assert!(p.opens.load(Ordering::Relaxed) >= 2);
}

/// Whether a thread of this process waits in the kernel for a FIFO's writer.
fn waits_on_a_fifo() -> bool {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return false;
    };
    tasks.filter_map(|t| t.ok()).any(|t| {
        std::fs::read_to_string(t.path().join("stack")).is_ok_and(|s| s.contains("fifo_open"))
    })
}

/// Opens a FIFO's writing end when dropped, so that an open of its reading
/// end waiting for one goes on.
struct Writer(PathBuf);

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.0);
    }
}

/// Choosing a backing file opens the cache file and registers it with the
/// kernel: while that takes long for one file (its cache file is a FIFO
/// here, waiting for a writer), opens of other files must go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_backing_file_holds_up_no_open_of_another_file() {
    stargaze_testkit::require_root_fuse();
    stargaze_testkit::require_fuse_passthrough();
    let work = tempfile::tempdir().unwrap();
    let (shared, layer, digest) = setup(&layer_tar(), work.path()).await;
    shared.passthrough.wanted.store(true, Ordering::Release);
    // Classic: a ring serves its CPU's requests one at a time whatever fs
    // does, and both opens may come from one CPU.
    *shared.transport_wanted.lock() = stargaze_service::config::FsTransport::Classic;
    let m = mount_as_set(shared.clone());
    let layer_dir = m.dir.path().join(&digest[7..]);
    let (slow, other) = ("srv/big.bin", "srv/setuid");
    // Both complete in the cache, never opened: opened with passthrough.
    for name in [slow, other] {
        let ino = layer.index.lookup_path(name).unwrap();
        let size = layer.index.inode(ino).unwrap().size();
        shared
            .source
            .fetch(&layer.digest, ino, 0, size)
            .await
            .unwrap();
    }
    let a = shared.layers.by_name(&digest[7..]).unwrap();
    let slow_cache = a
        .cache
        .layer_file_path(&a.digest, layer.index.lookup_path(slow).unwrap());
    std::fs::rename(&slow_cache, slow_cache.with_extension("aside")).unwrap();
    nix::unistd::mkfifo(&slow_cache, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let slow_path = layer_dir.join(slow);
    let waiting = std::thread::spawn(move || std::fs::File::open(slow_path).map(|_| ()));
    // Let the waiting open go on at the end, whatever happens.
    let writer = Writer(slow_cache);
    let start = std::time::Instant::now();
    while !waits_on_a_fifo() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no fs thread waits for the slow backing file"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let (tx, rx) = std::sync::mpsc::channel();
    let other_path = layer_dir.join(other);
    let reader = std::thread::spawn(move || {
        let _ = tx.send(std::fs::read(other_path));
    });
    let got = rx.recv_timeout(Duration::from_secs(5));
    drop(writer);
    let _ = waiting.join();
    let _ = reader.join();
    drop(m);
    match got {
        Ok(r) => assert_eq!(r.unwrap(), b"#!/bin/sh\n"),
        Err(_) => panic!("the open of {other} waited for the backing file of {slow}"),
    }
}

/// Handle numbers come from the open-file table and are given again once
/// released: a new open must never see the state (the cached cache file,
/// a backing id) of the handle that had its number before. Many threads
/// open, read and close many different small files at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_handle_numbers_never_serve_another_files_bytes() {
    stargaze_testkit::require_root_fuse();
    let mut b = tar::Builder::new(Vec::new());
    let mut files = Vec::new();
    for i in 0..64u32 {
        // Different sizes and contents: a read through a stale handle
        // returns other bytes or fails.
        let data: Vec<u8> = (0..(i * 131 + 1)).map(|j| (i * 7 + j) as u8).collect();
        let name = format!("many/f{i:02}");
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, &name, &data[..]).unwrap();
        files.push((name, data));
    }
    let work = tempfile::tempdir().unwrap();
    let (shared, _layer, digest) = setup(&b.into_inner().unwrap(), work.path()).await;
    let dir = tempfile::Builder::new()
        .prefix("sg-fs-")
        .tempdir_in("/tmp")
        .unwrap();
    let m = stargaze_fs::mount_or_take_over(shared, dir.path(), 4, None).unwrap();
    let root = dir.path().join(&digest[7..]);
    let files = Arc::new(files);
    let threads: Vec<_> = (0..6)
        .map(|t| {
            let (root, files) = (root.clone(), files.clone());
            std::thread::spawn(move || {
                for n in 0..1500usize {
                    let (name, want) = &files[(n * 7 + t * 13) % files.len()];
                    // Out of the page cache first, so the read reaches fs
                    // through this handle.
                    let mut f = std::fs::File::open(root.join(name)).unwrap();
                    nix::fcntl::posix_fadvise(
                        &f,
                        0,
                        0,
                        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
                    )
                    .unwrap();
                    let mut got = Vec::new();
                    std::io::Read::read_to_end(&mut f, &mut got).unwrap();
                    assert!(&got == want, "{name}: wrong bytes through a reused handle");
                }
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join()).collect();
    let _ = m.umount_and_join();
    remove_session_files(dir.path());
    for r in results {
        r.unwrap();
    }
}

/// One tar entry: name, type, contents (a symlink's target), xattrs.
type TarItem<'a> = (&'a str, tar::EntryType, &'a [u8], &'a [(&'a str, &'a [u8])]);

/// A tar of `items`, owned by root, of one mtime, xattrs as PAX
/// `SCHILY.xattr.*` records (as `tar --xattrs` and image builders write them).
fn tar_of(items: &[TarItem]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for &(name, kind, data, attrs) in items {
        if !attrs.is_empty() {
            let records: Vec<(String, &[u8])> = attrs
                .iter()
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
                .collect();
            b.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v)))
                .unwrap();
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mtime(1_650_000_000);
        h.set_uid(0);
        h.set_gid(0);
        match kind {
            tar::EntryType::Symlink => {
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, name, std::str::from_utf8(data).unwrap())
                    .unwrap();
            }
            _ => {
                h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
                h.set_size(data.len() as u64);
                b.append_data(&mut h, name, data).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// A read-only overlay of `lowers` (first on top) at `at`, unmounted when
/// dropped.
struct Overlay(PathBuf);

impl Overlay {
    fn mount(lowers: &[&Path], at: PathBuf) -> Overlay {
        std::fs::create_dir_all(&at).unwrap();
        let lowerdir: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
        run(Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!("lowerdir={}", lowerdir.join(":")))
            .arg(&at));
        Overlay(at)
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// containerd's applier refuses a layer's `trusted.*` xattrs, so overlayfs
/// never sees them; a lazily mounted layer must not show them either, or
/// its `trusted.overlay.*` would steer the overlay of a container's rootfs
/// (this kernel follows `trusted.overlay.redirect` in lower layers). A
/// layer carrying redirect, opaque, metacopy and whiteout xattrs, lazily
/// mounted above another layer, shows under overlayfs exactly what
/// containerd's unpack of the same two layers shows, and keeps its
/// `user.*` and `security.capability`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layers_overlay_xattrs_change_nothing_overlayfs_shows() {
    use tar::EntryType::{Directory as D, Regular as R, Symlink as L};
    stargaze_testkit::require_root_fuse();
    let ctd_apply = stargaze_testkit::go_build("ctd-apply");
    // VFS capabilities v2, effective, cap_net_bind_service permitted.
    const CAP: &[u8] = &[1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let user: (&str, &[u8]) = ("user.x", b"\xff\x00u");
    let cap: (&str, &[u8]) = ("security.capability", CAP);
    let below = tar_of(&[
        ("a/", D, b"", &[]),
        ("a/old", R, b"old", &[]),
        ("b/", D, b"", &[]),
        ("b/from-b", R, b"b", &[]),
        ("w/", D, b"", &[]),
        ("w/gone", R, b"lower", &[]),
        ("m/", D, b"", &[]),
        ("m/meta", R, b"lower data", &[]),
        ("o/", D, b"", &[]),
        ("o/hidden", R, b"h", &[]),
        ("gone2", R, b"g", &[]),
    ]);
    let steering = tar_of(&[
        ("a/", D, b"", &[("trusted.overlay.opaque", b"y")]),
        ("a/new", R, b"new", &[]),
        (
            "r/",
            D,
            b"",
            &[("trusted.overlay.redirect", b"/b"), user, cap],
        ),
        ("r/own", R, b"own", &[]),
        (
            "w/",
            D,
            b"",
            &[
                ("trusted.overlay.opaque", b"x"),
                ("trusted.overlay.whiteouts", b"y"),
            ],
        ),
        ("w/gone", R, b"", &[("trusted.overlay.whiteout", b"y")]),
        ("m/", D, b"", &[]),
        (
            "m/meta",
            R,
            b"upper data",
            &[("trusted.overlay.metacopy", b""), user, cap],
        ),
        // The tar's own opaque directory and whiteout still work.
        ("o/", D, b"", &[]),
        ("o/.wh..wh..opq", R, b"", &[]),
        ("o/kept", R, b"k", &[]),
        (".wh.gone2", R, b"", &[]),
        // The kernel refuses user.* on a symlink; containerd skips it.
        ("link", L, b"r/own", &[("user.x", b"on a symlink")]),
    ]);

    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    // The reference: both layers unpacked by containerd's applier.
    for (name, tar, parents) in [
        ("below", &below, vec![]),
        ("steering", &steering, vec![w.join("below")]),
    ] {
        let tar_path = w.join(format!("{name}.tar"));
        std::fs::write(&tar_path, tar).unwrap();
        run(Command::new(&ctd_apply)
            .arg(&tar_path)
            .arg(w.join(name))
            .args(parents));
    }
    let (shared, _layer, digest) = setup(&steering, w).await;
    let m = mount(shared);
    let lazy_layer = m.dir.path().join(&digest[7..]);
    // Dropped before `m`: the overlays go before the FUSE mount.
    let unpacked = Overlay::mount(&[&w.join("steering"), &w.join("below")], w.join("unpacked"));
    let lazy = Overlay::mount(&[&lazy_layer, &w.join("below")], w.join("lazy"));

    let (want, got) = {
        let (u, l) = (unpacked.0.clone(), lazy.0.clone());
        tokio::task::spawn_blocking(move || (walk(&u), walk(&l)))
            .await
            .unwrap()
    };
    let names = |t: &BTreeMap<PathBuf, Entry>| t.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&got), names(&want), "the same names under overlayfs");
    for (path, w) in &want {
        assert_eq!(&got[path], w, "{}", path.display());
    }
    // Not vacuous: containerd's unpack keeps these, so the lazy one does.
    let kept: BTreeMap<String, Vec<u8>> = [user, cap]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_vec()))
        .collect();
    for p in ["r", "m/meta"] {
        assert_eq!(got[Path::new(p)].xattrs, kept, "{p}");
    }
    assert_eq!(std::fs::read(lazy.0.join("m/meta")).unwrap(), b"upper data");
    // On the lazy layer itself: no trusted.* but the opaque marker's.
    for p in ["a", "r", "w", "w/gone", "m/meta", "link", "o"] {
        let trusted: Vec<String> = xattr_names(&lazy_layer.join(p))
            .into_iter()
            .filter(|n| n.starts_with("trusted."))
            .collect();
        let want: &[&str] = if p == "o" {
            &["trusted.overlay.opaque"]
        } else {
            &[]
        };
        assert_eq!(trusted, want, "{p}: trusted xattrs on the lazy layer");
    }
    drop((lazy, unpacked));
}

/// execve's open reaches fs with its exec flag, and fs tells the source
/// (the fetcher fetches what the program loads); reading the same file
/// does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executed_file_is_told_apart_from_a_read_one() {
    stargaze_testkit::require_root_fuse();
    let work = tempfile::tempdir().unwrap();
    // This machine's dynamically linked `true`: its loader and libc are
    // the host's own, so it runs from the mount.
    let host = std::fs::read(std::fs::canonicalize("/bin/true").unwrap()).unwrap();
    use stargaze_testkit::crafted;
    let tar = crafted::tar_of(&[
        crafted::dir("bin/"),
        crafted::reg("bin/prog", &host).mode(0o755),
        crafted::reg("bin/data", b"data"),
    ]);
    let (shared, layer, digest) = setup(&tar, work.path()).await;
    let m = mount(shared);
    let dir = m.dir.path().join(&digest[7..]);
    let prog = layer.index.lookup_path("/bin/prog").unwrap();
    let out = std::process::Command::new("cat")
        .arg(dir.join("bin/prog"))
        .arg(dir.join("bin/data"))
        .output()
        .unwrap();
    assert!(out.status.success());
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(EXECUTED.lock().unwrap().is_empty(), "a read is no exec");
    let status = std::process::Command::new(dir.join("bin/prog"))
        .status()
        .unwrap();
    assert!(status.success(), "ran from the mount");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(*EXECUTED.lock().unwrap(), [(digest.clone(), prog)]);
}

/// The io_uring transport serves the same tree as the classic one, and
/// really from its rings: a layer mounted once with each transport walks
/// the same (names, attributes, xattrs, symlinks, file bytes), the ring
/// mount counts the requests its rings served, the classic mount none, and
/// the metrics say which transport serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_io_uring_transport_serves_the_same_tree_from_its_rings() {
    use stargaze_fs::transport::Transport;
    use stargaze_service::config::FsTransport;
    stargaze_testkit::require_root_fuse();
    stargaze_testkit::require_that(
        stargaze_fs::uring::module_enabled() == Some(true),
        "FUSE over io_uring (Linux >= 6.14, the fuse module's enable_uring = Y)",
        "echo Y > /sys/module/fuse/parameters/enable_uring, as CI does",
    );
    let tar = layer_tar();
    let mut trees = Vec::new();
    for (t, want) in [
        (FsTransport::IoUring, Transport::IoUring),
        (FsTransport::Classic, Transport::Classic),
    ] {
        let work = tempfile::tempdir().unwrap();
        let (shared, _layer, digest) = setup(&tar, work.path()).await;
        *shared.transport_wanted.lock() = t;
        let m = mount_as_set(shared.clone());
        let dir = m.dir.path().join(&digest[7..]);
        let tree = tokio::task::spawn_blocking(move || walk(&dir))
            .await
            .unwrap();
        assert!(tree.len() > 5, "{tree:#?}");
        assert_eq!(*shared.transport.lock(), Some(want));
        let served = shared.uring_requests.load(Ordering::Relaxed);
        let metrics = stargaze_fs::metrics::FsMetrics {
            shared: shared.clone(),
            rpc: Default::default(),
            fuse_threads: 4,
        }
        .render();
        let line = format!("stargaze_fs_transport{{transport=\"{}\"}} 1", want.as_str());
        assert!(metrics.contains(&line), "{metrics}");
        if want == Transport::IoUring {
            // Lookups, getattrs, listings, xattrs, opens, reads, releases.
            assert!(served > tree.len() as u64, "{served} requests on the rings");
        } else {
            assert_eq!(served, 0);
        }
        drop(m);
        trees.push(tree);
    }
    assert_eq!(trees[0], trees[1]);
}

/// fs reports what it served, hits included (a file a prefetch brought in
/// is read without a miss, and a trace needs it all the same), each
/// chunk's first read once, and again after the fetcher's recording
/// generation changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_reported_for_traces_hits_included_once_per_generation() {
    stargaze_testkit::require_root_fuse();
    let work = tempfile::tempdir().unwrap();
    use stargaze_testkit::crafted;
    let big: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
    let tar = crafted::tar_of(&[
        crafted::dir("d/"),
        crafted::reg("d/prefetched", &[7u8; 10_000]),
        crafted::reg("d/big", &big),
    ]);
    let (shared, layer, digest) = setup(&tar, work.path()).await;
    let pre = layer.index.lookup_path("/d/prefetched").unwrap();
    let big_ino = layer.index.lookup_path("/d/big").unwrap();
    // In the cache before any read: fs will never ask for it.
    layer.fetch(&[(pre, 0, 10_000)]).await.unwrap();
    let m = mount(shared);
    let dir = m.dir.path().join(&digest[7..]);
    let direct_read = |name: &str, skip_4k: u64| {
        let out = std::process::Command::new("dd")
            .arg(format!("if={}", dir.join(name).display()))
            .args(["of=/dev/null", "bs=4096", "count=1", "iflag=direct"])
            .arg(format!("skip={skip_4k}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let noted = |ino: u64| -> Vec<(u64, u64)> {
        NOTED
            .lock()
            .unwrap()
            .iter()
            .filter(|(l, r)| *l == digest && r.0 == ino)
            .map(|(_, r)| (r.1, r.2))
            .collect()
    };
    let settle = || tokio::time::sleep(stargaze_fs::reads::FLUSH_EVERY * 4);

    direct_read("d/prefetched", 0);
    direct_read("d/prefetched", 0);
    direct_read("d/big", 0);
    direct_read("d/big", 100);
    settle().await;
    assert_eq!(noted(pre), [(0, 4096)], "the hit reported, once");
    assert_eq!(
        noted(big_ino),
        [(0, 4096), (409_600, 4096)],
        "in read order"
    );

    // A recording opened: the same reads are reported again.
    GENERATION.store(2, std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    direct_read("d/prefetched", 0);
    settle().await;
    assert_eq!(noted(pre), [(0, 4096), (0, 4096)]);
}

/// A small file's miss fetches the next few small files of its directory;
/// the second file of the same directory to miss fetches every small file
/// of it (a program working through a package's modules or a library's
/// headers); another directory is not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_miss_in_a_directory_fetches_all_its_small_files() {
    stargaze_testkit::require_root_fuse();
    let work = tempfile::tempdir().unwrap();
    use stargaze_testkit::crafted;
    let mut items = vec![crafted::dir("mods/"), crafted::dir("other/")];
    let name = |i: usize| format!("mods/m{i:02}.pm");
    for i in 0..30 {
        items.push(crafted::reg(&name(i), &vec![b'a' + (i % 26) as u8; 1000]));
    }
    for i in 0..5 {
        items.push(crafted::reg(&format!("other/o{i}"), b"other"));
    }
    let tar = crafted::tar_of(&items);
    let (shared, layer, digest) = setup(&tar, work.path()).await;
    let m = mount(shared);
    let dir = m.dir.path().join(&digest[7..]);
    let ino = |p: &str| layer.index.lookup_path(&format!("/{p}")).unwrap();
    let mods: Vec<u64> = (0..30).map(|i| ino(&name(i))).collect();
    let others: Vec<u64> = (0..5).map(|i| ino(&format!("other/o{i}"))).collect();
    let asked = || std::mem::take(&mut *PREFETCHED.lock().unwrap());

    std::fs::read(dir.join(name(20))).unwrap();
    let first = asked().concat();
    assert!(!first.is_empty(), "the first miss fetches some neighbours");
    assert!(
        first.iter().all(|i| mods[21..].contains(i)),
        "the first miss fetches only files after it: {first:?}"
    );

    std::fs::read(dir.join(name(3))).unwrap();
    let mut second = asked().concat();
    second.sort_unstable();
    let mut want: Vec<u64> = mods
        .iter()
        .copied()
        .filter(|&i| i != mods[3] && i != mods[20])
        .collect();
    want.sort_unstable();
    assert_eq!(
        second, want,
        "the second miss fetches the directory's other small files"
    );
    assert!(second.iter().all(|i| !others.contains(i)));

    // A third miss is back to the few after it.
    std::fs::read(dir.join(name(10))).unwrap();
    let third = asked().concat();
    assert!(third.len() <= 8, "{third:?}");
}

/// Every entry of the directory at `dir` as `getdents64` returns it:
/// (inode, offset to resume after it, name). `std::fs::read_dir` hides
/// the offsets, and the kernel resumes listings from exactly those.
fn getdents(dir: &Path) -> Vec<(u64, u64, Vec<u8>)> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(dir).unwrap();
    let mut buf = vec![0u8; 32 << 10];
    let mut out = Vec::new();
    loop {
        // SAFETY: the buffer outlives the call and its length is passed.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                f.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        assert!(n >= 0, "getdents64: {}", std::io::Error::last_os_error());
        if n == 0 {
            return out;
        }
        let mut at = 0;
        while at < n as usize {
            // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
            let e = &buf[at..];
            let ino = u64::from_ne_bytes(e[0..8].try_into().unwrap());
            let off = u64::from_ne_bytes(e[8..16].try_into().unwrap());
            let reclen = u16::from_ne_bytes(e[16..18].try_into().unwrap()) as usize;
            let name = &e[19..reclen];
            let len = name.iter().position(|&b| b == 0).unwrap();
            out.push((ino, off, name[..len].to_vec()));
            at += reclen;
        }
    }
}

/// Listing a large directory costs each entry once, not once per reply
/// it might have gone into: a full listing of a 10,000-entry directory
/// through each transport builds at most two entries per entry listed
/// (counted by fs, not timed), and lists exactly the index's names, inodes
/// and offsets (`.` = 1, `..` = 2, entry `i` = `i + 3`), which the kernel
/// resumes from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_directory_is_listed_building_each_entry_once() {
    use stargaze_service::config::FsTransport;
    stargaze_testkit::require_root_fuse();
    stargaze_testkit::require_that(
        stargaze_fs::uring::module_enabled() == Some(true),
        "FUSE over io_uring (Linux >= 6.14, the fuse module's enable_uring = Y)",
        "echo Y > /sys/module/fuse/parameters/enable_uring, as CI does",
    );
    const N: usize = 10_000;
    let names: Vec<String> = (0..N).map(|i| format!("big/file-{i:05}")).collect();
    let mut items: Vec<TarItem> = vec![("big/", tar::EntryType::Directory, b"", &[])];
    items.extend(
        names
            .iter()
            .map(|n| (n.as_str(), tar::EntryType::Regular, &b""[..], &[][..])),
    );
    let tar = tar_of(&items);
    for t in [FsTransport::IoUring, FsTransport::Classic] {
        let work = tempfile::tempdir().unwrap();
        let (shared, _layer, digest) = setup(&tar, work.path()).await;
        *shared.transport_wanted.lock() = t;
        let m = mount_as_set(shared.clone());
        let a = shared.layers.by_name(&digest[7..]).unwrap();
        let big = a.index.lookup_path("big").unwrap();
        let mut want = vec![
            (a.global(big), 1, b".".to_vec()),
            (a.global(stargaze_index::ROOT_INO), 2, b"..".to_vec()),
        ];
        want.extend(
            a.index
                .readdir(big, 0)
                .map(|d| (a.global(d.ino), d.offset as u64 + 3, d.name.to_vec())),
        );
        assert_eq!(want.len(), N + 2);
        let dir = m.dir.path().join(&digest[7..]).join("big");
        let before = shared.counters.listed_entries.load(Ordering::Relaxed);
        let got = tokio::task::spawn_blocking(move || getdents(&dir))
            .await
            .unwrap();
        let built = shared.counters.listed_entries.load(Ordering::Relaxed) - before;
        assert!(got == want, "{t:?}: the listing differs from the index");
        assert!(
            built <= 2 * want.len() as u64,
            "{t:?}: {built} entries built to list {}",
            want.len()
        );
        if t == FsTransport::IoUring {
            assert!(shared.uring_requests.load(Ordering::Relaxed) > 0);
        }
        drop(m);
    }
}
