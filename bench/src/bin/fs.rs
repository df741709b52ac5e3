//! fs benchmarks, side by side in one run (issue 4). Needs root and
//! /dev/fuse.
//!
//! 1. Cached reads: a layer of 4 × 64 MiB incompressible files, every chunk
//!    already in the cache, mounted through stargaze-fs with and without
//!    FUSE passthrough, against the same files on the same local disk.
//!    Sequential (1 MiB reads) and random (4 KiB preads) throughput, with
//!    the page cache dropped before each pass so every byte comes from disk.
//! 2. `stat` of every file of a 100k-file layer against the same tree on
//!    disk: the first walk (each name looked up through FUSE) and a second
//!    walk (entries and attributes cached by the kernel, as after a
//!    container's first access).
//! 3. The release `stargaze-fs` service: RSS and thread count with one and
//!    with 500 layers attached.
//!
//! Work files go to `BENCH_DIR` (default /var/tmp), which should be a local
//! disk.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stargaze_cache::Cache;
use stargaze_fetcher::{FetchOptions, FileBlob, Layer, resolve_layer};
use stargaze_fs::{ChunkSource, FsShared, SourceError};
use stargaze_service::config::FsTransport;

const FILES: usize = 4;
const FILE_MIB: usize = 64;
const RANDOM_READS: usize = 4096;
const STAT_DIRS: usize = 1000;
const STAT_FILES_PER_DIR: usize = 100;
const MANY_LAYERS: usize = 500;

/// The fetcher's engine in process, as the chunk source (the cache is
/// complete before any measurement, so it is never asked).
struct Engine(HashMap<String, Arc<Layer>>);

#[tonic::async_trait]
impl ChunkSource for Engine {
    async fn fetch(&self, layer: &str, ino: u64, offset: u64, len: u64) -> Result<(), SourceError> {
        let l = self
            .0
            .get(layer)
            .ok_or_else(|| SourceError::InProcess(format!("unknown layer {layer}").into()))?;
        l.fetch(&[(ino, offset, len)])
            .await
            .map(|_| ())
            .map_err(|e| SourceError::InProcess(Box::new(e)))
    }
}

/// Incompressible bytes (xorshift), so that the layer's size is its content.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn tar_of(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(1_600_000_000);
        b.append_data(&mut h, name, data.as_slice()).expect("tar");
    }
    b.into_inner().expect("tar")
}

/// Convert `tar` to eStargz, resolve it into `cache` and fetch every chunk.
async fn cached_layer(
    name: &str,
    tar: &[u8],
    work: &Path,
    cache: &Arc<Cache>,
    fetch_all: bool,
) -> Arc<Layer> {
    let mut blob = Vec::new();
    let res =
        stargaze_format::convert(name, tar, &mut blob, &Default::default(), None).expect("convert");
    let path = work.join(format!("{}.blob", res.digest.hex()));
    std::fs::write(&path, &blob).expect("write blob");
    let layer = Arc::new(
        resolve_layer(
            cache.clone(),
            Arc::new(FileBlob::open(&path).expect("blob")),
            &res.digest.to_string(),
            Some(res.toc_digest),
            false,
            &FetchOptions::default(),
        )
        .await
        .expect("resolve"),
    );
    if fetch_all {
        let ranges: Vec<(u64, u64, u64)> = (1..=layer.index.inode_count())
            .filter_map(|ino| {
                let n = layer.index.inode(ino)?;
                (n.is_reg() && n.size() > 0).then(|| (ino, 0, n.size()))
            })
            .collect();
        layer.fetch(&ranges).await.expect("fetch");
    }
    layer
}

fn drop_caches() {
    // SAFETY: sync has no preconditions.
    unsafe { nix::libc::sync() };
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// MB/s of reading every file whole, 1 MiB at a time.
fn sequential(paths: &[PathBuf]) -> f64 {
    drop_caches();
    let start = Instant::now();
    let mut total = 0;
    let mut buf = vec![0u8; 1 << 20];
    for p in paths {
        let mut f = std::fs::File::open(p).expect("open");
        loop {
            let n = f.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            total += n;
        }
    }
    total as f64 / 1e6 / start.elapsed().as_secs_f64()
}

/// 4 KiB reads per second at random offsets.
fn random(paths: &[PathBuf]) -> f64 {
    drop_caches();
    let files: Vec<std::fs::File> = paths
        .iter()
        .map(|p| std::fs::File::open(p).expect("open"))
        .collect();
    let size = (FILE_MIB << 20) as u64;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; 4096];
    let start = Instant::now();
    for i in 0..RANDOM_READS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % (size / 4096)) * 4096;
        files[i % files.len()]
            .read_exact_at(&mut buf, off)
            .expect("pread");
    }
    RANDOM_READS as f64 / start.elapsed().as_secs_f64()
}

/// Seconds to stat every path.
fn stat_all(paths: &[PathBuf]) -> f64 {
    let start = Instant::now();
    for p in paths {
        std::fs::symlink_metadata(p).expect("stat");
    }
    start.elapsed().as_secs_f64()
}

struct Mount {
    dir: tempfile::TempDir,
    session: Option<stargaze_fs::FuseMount>,
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.umount_and_join();
        }
        stargaze_testkit::unmount_below(self.dir.path());
    }
}

fn mount(
    layers: &[(&Arc<Layer>, &Arc<Cache>)],
    passthrough: bool,
    transport: FsTransport,
    work: &Path,
) -> Mount {
    let engine = Engine(
        layers
            .iter()
            .map(|(l, _)| (l.digest.clone(), (*l).clone()))
            .collect(),
    );
    let cache_root = layers
        .first()
        .map_or(work.to_path_buf(), |(_, c)| c.root().to_path_buf());
    let shared = Arc::new(FsShared::new(
        &cache_root,
        Arc::new(engine),
        tokio::runtime::Handle::current(),
        Duration::from_secs(3600),
    ));
    shared
        .passthrough
        .wanted
        .store(passthrough, std::sync::atomic::Ordering::Release);
    for (l, _) in layers {
        shared.layers.attach(&l.digest).expect("attach");
    }
    let dir = tempfile::Builder::new()
        .prefix("sg-bench-fs-")
        .tempdir_in(work)
        .expect("mountpoint");
    *shared.transport_wanted.lock() = transport;
    let session = stargaze_fs::mount(shared.clone(), dir.path(), 4).expect("mount");
    if passthrough {
        assert!(
            shared
                .passthrough
                .active
                .load(std::sync::atomic::Ordering::Acquire),
            "this kernel does not offer FUSE passthrough"
        );
    }
    Mount {
        dir,
        session: Some(session),
    }
}

fn proc_status(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// RSS (MB) and threads of the release stargaze-fs with 1 and with
/// `MANY_LAYERS` layers attached over its gRPC API.
async fn service_footprint(work: &Path) -> [(f64, u64); 2] {
    use stargaze_proto::v1::AttachRequest;
    use stargaze_proto::v1::fs_client::FsClient;
    let bin = std::env::current_exe()
        .expect("exe")
        .with_file_name("stargaze-fs");
    assert!(
        bin.exists(),
        "build it first: cargo build --release -p stargaze-fs"
    );
    let cache = Arc::new(Cache::open_writer(&work.join("many-cache")).expect("cache"));
    let mut layers = Vec::new();
    for i in 0..MANY_LAYERS {
        let tar = tar_of(&[(format!("layer{i}/f"), format!("layer {i}\n").into_bytes())]);
        layers.push(cached_layer("small", &tar, work, &cache, true).await);
    }
    let socket = work.join("fs.sock");
    let config = work.join("fs.toml");
    std::fs::write(
        &config,
        format!(
            "[fs]\nsocket = \"{}\"\nmountpoint = \"{}\"\n[fetcher]\nsocket = \"{}\"\ncache_dir = \"{}\"\n[log]\nlevel = \"warn\"\n",
            socket.display(),
            work.join("fs-mnt").display(),
            work.join("no-fetcher.sock").display(),
            cache.root().display()
        ),
    )
    .expect("config");
    let mut child = std::process::Command::new(bin)
        .arg("--config")
        .arg(&config)
        .spawn()
        .expect("start stargaze-fs");
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "stargaze-fs did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut client = FsClient::new(stargaze_proto::connect_unix(&socket).expect("socket"));
    let mut out = [(0.0, 0); 2];
    for (i, l) in layers.iter().enumerate() {
        client
            .attach(AttachRequest {
                layer_digest: l.digest.clone(),
            })
            .await
            .expect("attach");
        if i == 0 || i + 1 == MANY_LAYERS {
            // Read a file so the layer is really in use.
            let dir = work
                .join("fs-mnt")
                .join(&l.digest[7..])
                .join(format!("layer{i}/f"));
            std::fs::read(&dir).expect("read through the service");
            let pid = child.id();
            out[usize::from(i > 0)] = (
                proc_status(pid, "VmRSS:") as f64 / 1024.0,
                proc_status(pid, "Threads:"),
            );
        }
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    stargaze_testkit::unmount_below(&work.join("fs-mnt"));
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    assert!(
        Path::new("/dev/fuse").exists() && nix::unistd::geteuid().is_root(),
        "the fs benchmark needs root and /dev/fuse"
    );
    let base = std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let work = tempfile::Builder::new()
        .prefix("stargaze-bench-fs-")
        .tempdir_in(&base)
        .expect("work dir");
    let w = work.path();

    // 1. Cached reads.
    let files: Vec<(String, Vec<u8>)> = (0..FILES)
        .map(|i| (format!("data/f{i}"), noise(FILE_MIB << 20, i as u64 + 1)))
        .collect();
    let native = w.join("native");
    std::fs::create_dir_all(native.join("data")).expect("mkdir");
    for (name, data) in &files {
        std::fs::write(native.join(name), data).expect("write native");
    }
    let cache = Arc::new(Cache::open_writer(&w.join("cache")).expect("cache"));
    let big = cached_layer("big", &tar_of(&files), w, &cache, true).await;
    drop(files);
    let native_paths: Vec<PathBuf> = (0..FILES)
        .map(|i| native.join(format!("data/f{i}")))
        .collect();
    let disk_seq = sequential(&native_paths);
    let disk_rand = random(&native_paths);
    // FUSE over io_uring where the kernel offers it (enable_uring).
    let uring = stargaze_fs::uring::module_enabled() == Some(true);
    let mut paths_of = vec![(false, FsTransport::Classic), (true, FsTransport::Classic)];
    if uring {
        paths_of.insert(1, (false, FsTransport::IoUring));
    }
    let mut rows = Vec::new();
    for (passthrough, transport) in paths_of {
        let m = mount(&[(&big, &cache)], passthrough, transport, w);
        let paths: Vec<PathBuf> = (0..FILES)
            .map(|i| {
                m.dir
                    .path()
                    .join(&big.digest[7..])
                    .join(format!("data/f{i}"))
            })
            .collect();
        rows.push((passthrough, transport, sequential(&paths), random(&paths)));
    }

    // 2. stat of 100k files.
    let names: Vec<String> = (0..STAT_DIRS)
        .flat_map(|d| (0..STAT_FILES_PER_DIR).map(move |f| format!("d{d:04}/f{f:03}")))
        .collect();
    let tree = w.join("tree");
    for d in 0..STAT_DIRS {
        std::fs::create_dir_all(tree.join(format!("d{d:04}"))).expect("mkdir");
    }
    for n in &names {
        std::fs::write(tree.join(n), b"").expect("touch");
    }
    let many = cached_layer(
        "100k",
        &tar_of(
            &names
                .iter()
                .map(|n| (n.clone(), Vec::new()))
                .collect::<Vec<_>>(),
        ),
        w,
        &cache,
        false,
    )
    .await;
    let native_paths: Vec<PathBuf> = names.iter().map(|n| tree.join(n)).collect();
    stat_all(&native_paths);
    let native_stat = stat_all(&native_paths);
    let mut walks = Vec::new();
    let transports: &[FsTransport] = if uring {
        &[FsTransport::Classic, FsTransport::IoUring]
    } else {
        &[FsTransport::Classic]
    };
    for t in transports {
        let m = mount(&[(&many, &cache)], true, *t, w);
        let fuse_paths: Vec<PathBuf> = names
            .iter()
            .map(|n| m.dir.path().join(&many.digest[7..]).join(n))
            .collect();
        let first = stat_all(&fuse_paths);
        let second = stat_all(&fuse_paths);
        drop(m);
        walks.push((*t, first, second));
    }

    // 3. The service's footprint.
    let footprint = service_footprint(w).await;

    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    println!("# fs benchmarks\n");
    println!(
        "`./target/release/fs` (part of `make bench`), Linux {kernel}, {} CPUs, work files in {base}.\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!(
        "## Cached reads ({FILES} × {FILE_MIB} MiB incompressible files, page cache dropped before each pass)\n"
    );
    println!(
        "| read path | sequential MB/s | vs local disk | random 4 KiB reads/s | vs local disk |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| local disk (same files, same filesystem) | {disk_seq:.0} | 1.00× | {disk_rand:.0} | 1.00× |"
    );
    for (passthrough, transport, seq, rand) in &rows {
        let what = if *passthrough {
            format!("stargaze-fs, passthrough ({})", transport.as_str())
        } else {
            format!("stargaze-fs, through read() ({})", transport.as_str())
        };
        println!(
            "| {what} | {seq:.0} | {:.2}× | {rand:.0} | {:.2}× |",
            seq / disk_seq,
            rand / disk_rand
        );
    }
    println!("\n## stat of every file of a {}-file layer\n", names.len());
    println!("| tree | first walk | second walk | second walk vs disk |");
    println!("|---|---|---|---|");
    println!(
        "| local disk (dentries cached) | | {:.0} ms | 1.00× |",
        native_stat * 1e3
    );
    for (t, first, second) in &walks {
        println!(
            "| stargaze-fs ({}) | {:.0} ms | {:.0} ms | {:.2}× |",
            t.as_str(),
            first * 1e3,
            second * 1e3,
            second / native_stat
        );
    }
    println!("\n## stargaze-fs service footprint (release build)\n");
    println!("| layers attached | RSS | threads |");
    println!("|---|---|---|");
    println!("| 1 | {:.1} MB | {} |", footprint[0].0, footprint[0].1);
    println!(
        "| {MANY_LAYERS} | {:.1} MB | {} |",
        footprint[1].0, footprint[1].1
    );
}
