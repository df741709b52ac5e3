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
//! 4. The FUSE transports, classic against io_uring (issue 21), over
//!    `BENCH_ROUNDS` rounds (default 5) that alternate which goes first:
//!    `stat` of the 100k files, `readdir` of a 10k-entry directory, random
//!    4 KiB reads through `read()` with 1 and 16 readers, open+read+close of
//!    10k small files; ops/s and p99 latency, median and spread. Needs
//!    `/sys/module/fuse/parameters/enable_uring` = Y.
//!
//! `BENCH_ONLY` (comma separated: reads, stat, footprint, transports) runs
//! only those sections; `BENCH_ONLY=transports` does not drop the page
//! cache, so it can run beside other work.
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
use stargaze_fs::metrics::Op;
use stargaze_fs::{ChunkSource, FsShared, SourceError};
use stargaze_service::config::FsTransport;

const FILES: usize = 4;
const FILE_MIB: usize = 64;
const RANDOM_READS: usize = 4096;
const STAT_DIRS: usize = 1000;
const STAT_FILES_PER_DIR: usize = 100;
const MANY_LAYERS: usize = 500;
const READDIR_ENTRIES: usize = 10_000;
const READDIR_LISTINGS: usize = 10;
const SMALL_FILES: usize = 10_000;
const RANDOM_READS_1: usize = 8192;
const RANDOM_READS_16: usize = 16384;

/// The fetcher's engine in process, as the chunk source (the cache is
/// complete before any measurement, so it is never asked).
struct Engine(HashMap<stargaze_format::Digest, Arc<Layer>>);

#[tonic::async_trait]
impl ChunkSource for Engine {
    async fn fetch(
        &self,
        layer: &stargaze_format::Digest,
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

/// Per-operation latencies of one pass, in nanoseconds, and its wall time.
struct Pass {
    lat: Vec<u64>,
    wall: Duration,
}

impl Pass {
    fn ops_per_s(&self) -> f64 {
        self.lat.len() as f64 / self.wall.as_secs_f64()
    }

    /// Nearest rank: the smallest latency that 99 % of the operations do
    /// not exceed.
    fn p99_us(&self) -> f64 {
        let mut v = self.lat.clone();
        v.sort_unstable();
        v[(v.len() * 99).div_ceil(100) - 1] as f64 / 1e3
    }
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed().as_nanos() as u64)
}

/// `stat` of every path, each timed.
fn stat_pass(paths: &[PathBuf]) -> Pass {
    let start = Instant::now();
    let lat = paths
        .iter()
        .map(|p| timed(|| std::fs::symlink_metadata(p).expect("stat")).1)
        .collect();
    Pass {
        lat,
        wall: start.elapsed(),
    }
}

/// Full listings of `dir`, each `getdents64` call (4 KiB buffer, so about
/// one FUSE READDIR(PLUS) request) timed on its own.
fn readdir_pass(dir: &Path, listings: usize) -> (Pass, usize) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).expect("path");
    let mut buf = vec![0u8; 4096];
    let mut lat = Vec::new();
    let mut entries = 0;
    let start = Instant::now();
    for _ in 0..listings {
        // SAFETY: a valid C string; the descriptor is closed below.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        assert!(fd >= 0, "opendir: {}", std::io::Error::last_os_error());
        loop {
            // SAFETY: buf is writable for its length; fd is an open directory.
            let (n, ns) = timed(|| unsafe {
                libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len())
            });
            assert!(n >= 0, "getdents64: {}", std::io::Error::last_os_error());
            if n == 0 {
                break;
            }
            lat.push(ns);
            // Count the records (d_reclen is at offset 16).
            let mut at = 0;
            while at < n as usize {
                entries += 1;
                at += u16::from_ne_bytes([buf[at + 16], buf[at + 17]]) as usize;
            }
        }
        // SAFETY: fd was opened above and is not used after.
        unsafe { libc::close(fd) };
    }
    (
        Pass {
            lat,
            wall: start.elapsed(),
        },
        entries / listings,
    )
}

/// `readers` threads, each reading its own share of `offsets` (4 KiB at
/// each, every (file, offset) pair once, so no read is answered by the
/// kernel's page cache of the mount), each read timed.
fn random_read_pass(paths: &[PathBuf], offsets: &[(usize, u64)], readers: usize) -> Pass {
    let barrier = std::sync::Barrier::new(readers + 1);
    let chunk = offsets.len().div_ceil(readers);
    let start = std::thread::scope(|s| {
        let handles: Vec<_> = offsets
            .chunks(chunk)
            .map(|share| {
                let barrier = &barrier;
                s.spawn(move || {
                    let files: Vec<std::fs::File> = paths
                        .iter()
                        .map(|p| std::fs::File::open(p).expect("open"))
                        .collect();
                    let mut buf = vec![0u8; 4096];
                    barrier.wait();
                    share
                        .iter()
                        .map(|&(f, off)| {
                            timed(|| files[f].read_exact_at(&mut buf, off).expect("pread")).1
                        })
                        .collect::<Vec<u64>>()
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let lat: Vec<u64> = handles
            .into_iter()
            .flat_map(|h| h.join().expect("reader"))
            .collect();
        (start.elapsed(), lat)
    });
    Pass {
        lat: start.1,
        wall: start.0,
    }
}

/// open + read to the end + close of every path, each timed as one.
fn small_files_pass(paths: &[PathBuf]) -> Pass {
    let mut buf = Vec::with_capacity(1 << 16);
    let start = Instant::now();
    let lat = paths
        .iter()
        .map(|p| {
            timed(|| {
                buf.clear();
                let mut f = std::fs::File::open(p).expect("open");
                f.read_to_end(&mut buf).expect("read");
                drop(f);
            })
            .1
        })
        .collect();
    Pass {
        lat,
        wall: start.elapsed(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn spread(v: &[f64]) -> (f64, f64) {
    (
        v.iter().copied().fold(f64::INFINITY, f64::min),
        v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    )
}

/// `BENCH_ONLY` (comma separated: reads, stat, footprint, transports)
/// limits the sections; all by default.
fn wanted(section: &str) -> bool {
    std::env::var("BENCH_ONLY")
        .map(|v| v.split(',').any(|s| s.trim() == section))
        .unwrap_or(true)
}

/// One row of the transport table: a workload's ops/s and p99 (µs) per
/// round, for classic and for io_uring.
#[derive(Default)]
struct Row {
    ops: [Vec<f64>; 2],
    p99: [Vec<f64>; 2],
    /// Requests of the row's kind that reached fs per operation timed (so
    /// the table shows what the kernel answered from its own caches).
    requests: [Vec<f64>; 2],
}

impl Row {
    fn add(&mut self, t: usize, p: &Pass, requests: u64) {
        self.ops[t].push(p.ops_per_s());
        self.p99[t].push(p.p99_us());
        self.requests[t].push(requests as f64 / p.lat.len() as f64);
    }
}

const TRANSPORT_ROWS: [&str; 5] = [
    "stat, 100k-file layer, fresh mount",
    "readdir (getdents64, 4 KiB) of a 10k-entry directory",
    "random 4 KiB read(), 1 reader",
    "random 4 KiB read(), 16 readers",
    "open+read+close, 10k small files",
];

/// Section 4: classic against io_uring, each workload on a fresh mount
/// (nothing of it in the kernel's dentry, attribute or page caches: the
/// same as dropping them, without dropping the page cache of the rest of
/// a shared machine), the transports alternating first over `rounds`.
async fn transports(
    w: &Path,
    cache: &Arc<Cache>,
    big: &Arc<Layer>,
    many: &Arc<Layer>,
    rounds: usize,
) -> Vec<Row> {
    let dir_names: Vec<String> = (0..READDIR_ENTRIES)
        .map(|i| format!("dir/e{i:05}"))
        .collect();
    let wide = cached_layer(
        "10k-dir",
        &tar_of(
            &dir_names
                .iter()
                .map(|n| (n.clone(), Vec::new()))
                .collect::<Vec<_>>(),
        ),
        w,
        cache,
        false,
    )
    .await;
    let small: Vec<(String, Vec<u8>)> = (0..SMALL_FILES)
        .map(|i| {
            (
                format!("s{:02}/f{i:05}", i / 1000),
                noise(1024 + (i * 37 % 3072), i as u64 + 100),
            )
        })
        .collect();
    let smalls = cached_layer("10k-small", &tar_of(&small), w, cache, true).await;
    let small_names: Vec<String> = small.into_iter().map(|(n, _)| n).collect();
    let stat_names: Vec<String> = (0..STAT_DIRS)
        .flat_map(|d| (0..STAT_FILES_PER_DIR).map(move |f| format!("d{d:04}/f{f:03}")))
        .collect();
    // Every (file, 4 KiB block) of the big layer once, in a random order:
    // the first RANDOM_READS_1 for one reader, the next RANDOM_READS_16
    // for sixteen, so no read of a mount repeats one before it.
    let blocks = (FILE_MIB << 20) as u64 / 4096;
    let mut offsets: Vec<(usize, u64)> = (0..FILES)
        .flat_map(|f| (0..blocks).map(move |b| (f, b * 4096)))
        .collect();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in (1..offsets.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        offsets.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let (one, rest) = offsets.split_at(RANDOM_READS_1);
    let sixteen = &rest[..RANDOM_READS_16];
    // The cache's content files are read warm from the page cache, so the
    // rows compare the transports, not the disk.
    {
        let m = mount(&[(big, cache)], false, FsTransport::Classic, w);
        let paths: Vec<PathBuf> = (0..FILES)
            .map(|i| {
                m.dir
                    .path()
                    .join(big.digest.hex())
                    .join(format!("data/f{i}"))
            })
            .collect();
        for p in &paths {
            std::fs::read(p).expect("warm read");
        }
    }
    let kinds = [FsTransport::Classic, FsTransport::IoUring];
    let mut rows: Vec<Row> = TRANSPORT_ROWS.iter().map(|_| Row::default()).collect();
    for round in 0..rounds {
        for k in 0..2 {
            let t = (k + round) % 2;
            let m = mount(
                &[
                    (many, cache),
                    (&wide, cache),
                    (big, cache),
                    (&smalls, cache),
                ],
                false,
                kinds[t],
                w,
            );
            let root = m.dir.path();
            let stat_paths: Vec<PathBuf> = stat_names
                .iter()
                .map(|n| root.join(many.digest.hex()).join(n))
                .collect();
            let c = &m.shared.counters;
            let ops = |kinds: &[Op]| kinds.iter().map(|&k| c.operations(k)).sum::<u64>();
            let before = ops(&[Op::Lookup]);
            let p = stat_pass(&stat_paths);
            rows[0].add(t, &p, ops(&[Op::Lookup]) - before);
            let before = ops(&[Op::Readdir, Op::Readdirplus]);
            let (p, entries) =
                readdir_pass(&root.join(wide.digest.hex()).join("dir"), READDIR_LISTINGS);
            assert!(entries > READDIR_ENTRIES, "listed {entries} entries");
            rows[1].add(t, &p, ops(&[Op::Readdir, Op::Readdirplus]) - before);
            let big_paths: Vec<PathBuf> = (0..FILES)
                .map(|i| root.join(big.digest.hex()).join(format!("data/f{i}")))
                .collect();
            let before = ops(&[Op::Read]);
            let p = random_read_pass(&big_paths, one, 1);
            rows[2].add(t, &p, ops(&[Op::Read]) - before);
            let before = ops(&[Op::Read]);
            let p = random_read_pass(&big_paths, sixteen, 16);
            rows[3].add(t, &p, ops(&[Op::Read]) - before);
            let small_paths: Vec<PathBuf> = small_names
                .iter()
                .map(|n| root.join(smalls.digest.hex()).join(n))
                .collect();
            // Names looked up first: the row is open, read and release.
            stat_pass(&small_paths);
            let before = ops(&[Op::Open]);
            let p = small_files_pass(&small_paths);
            rows[4].add(t, &p, ops(&[Op::Open]) - before);
            eprintln!(
                "round {}/{rounds} {}: stat {:.0}/s, readdir {:.0}/s, 1 reader {:.0}/s, 16 readers {:.0}/s, small files {:.0}/s",
                round + 1,
                kinds[t].as_str(),
                rows[0].ops[t].last().unwrap(),
                rows[1].ops[t].last().unwrap(),
                rows[2].ops[t].last().unwrap(),
                rows[3].ops[t].last().unwrap(),
                rows[4].ops[t].last().unwrap(),
            );
        }
    }
    rows
}

fn print_transports(rows: &[Row], rounds: usize) {
    println!(
        "\n## Transports: classic vs FUSE over io_uring ({rounds} rounds, alternating which goes first)\n"
    );
    println!(
        "Each cell: the median of the rounds, with the lowest and highest in brackets. Ratios are io_uring ÷ classic of the medians; \"paired\" is the median (lowest–highest) of each round's own ratio, the two transports of a round having run back to back, which the machine's load swings disturb less. The issue's targets are ops/s ≥ 1.5× and p99 ≤ 0.7×.\n"
    );
    println!(
        "| workload | classic ops/s | io_uring ops/s | ops/s ratio | paired | classic p99 µs | io_uring p99 µs | p99 ratio | paired | fs requests per op (classic / io_uring) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let cell = |v: &[f64]| {
        let (lo, hi) = spread(v);
        format!("{:.0} ({lo:.0}–{hi:.0})", median(v.to_vec()))
    };
    let paired = |v: &[Vec<f64>; 2]| {
        let ratios: Vec<f64> = v[1].iter().zip(&v[0]).map(|(u, c)| u / c).collect();
        let (lo, hi) = spread(&ratios);
        format!("{:.2}× ({lo:.2}–{hi:.2})", median(ratios))
    };
    for (name, r) in TRANSPORT_ROWS.iter().zip(rows) {
        let ops = median(r.ops[1].clone()) / median(r.ops[0].clone());
        let p99 = median(r.p99[1].clone()) / median(r.p99[0].clone());
        println!(
            "| {name} | {} | {} | {ops:.2}× {} | {} | {} | {} | {p99:.2}× {} | {} | {:.2} / {:.2} |",
            cell(&r.ops[0]),
            cell(&r.ops[1]),
            if ops >= 1.5 { "✓" } else { "✗" },
            paired(&r.ops),
            cell(&r.p99[0]),
            cell(&r.p99[1]),
            if p99 <= 0.7 { "✓" } else { "✗" },
            paired(&r.p99),
            median(r.requests[0].clone()),
            median(r.requests[1].clone()),
        );
    }
}

struct Mount {
    dir: tempfile::TempDir,
    shared: Arc<FsShared>,
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
            .map(|(l, _)| (l.digest, (*l).clone()))
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
    assert_eq!(
        session.transport.as_str(),
        transport.as_str(),
        "the mount is served by another transport than asked"
    );
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
        shared,
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
                layer_digest: l.digest.to_string(),
            })
            .await
            .expect("attach");
        if i == 0 || i + 1 == MANY_LAYERS {
            // Read a file so the layer is really in use.
            let dir = work
                .join("fs-mnt")
                .join(l.digest.hex())
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
    // FUSE over io_uring where the kernel offers it (enable_uring).
    let uring = stargaze_fs::uring::module_enabled() == Some(true);
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .map(|v| v.parse().expect("BENCH_ROUNDS: a number"))
        .unwrap_or(5);
    assert!(
        !wanted("transports") || (uring && rounds > 0),
        "the transports section needs /sys/module/fuse/parameters/enable_uring = Y and BENCH_ROUNDS > 0 (or BENCH_ONLY without transports)"
    );

    let cache = Arc::new(Cache::open_writer(&w.join("cache")).expect("cache"));
    let big = if wanted("reads") || wanted("transports") {
        let files: Vec<(String, Vec<u8>)> = (0..FILES)
            .map(|i| (format!("data/f{i}"), noise(FILE_MIB << 20, i as u64 + 1)))
            .collect();
        if wanted("reads") {
            let native = w.join("native");
            std::fs::create_dir_all(native.join("data")).expect("mkdir");
            for (name, data) in &files {
                std::fs::write(native.join(name), data).expect("write native");
            }
        }
        Some(cached_layer("big", &tar_of(&files), w, &cache, true).await)
    } else {
        None
    };

    // 1. Cached reads.
    let mut reads = None;
    if wanted("reads") {
        let big = big.as_ref().expect("big layer");
        let native = w.join("native");
        let native_paths: Vec<PathBuf> = (0..FILES)
            .map(|i| native.join(format!("data/f{i}")))
            .collect();
        let disk_seq = sequential(&native_paths);
        let disk_rand = random(&native_paths);
        let mut paths_of = vec![(false, FsTransport::Classic), (true, FsTransport::Classic)];
        if uring {
            paths_of.insert(1, (false, FsTransport::IoUring));
        }
        let mut rows = Vec::new();
        for (passthrough, transport) in paths_of {
            let m = mount(&[(big, &cache)], passthrough, transport, w);
            let paths: Vec<PathBuf> = (0..FILES)
                .map(|i| {
                    m.dir
                        .path()
                        .join(big.digest.hex())
                        .join(format!("data/f{i}"))
                })
                .collect();
            rows.push((passthrough, transport, sequential(&paths), random(&paths)));
        }
        reads = Some((disk_seq, disk_rand, rows));
    }

    // 2. stat of 100k files.
    let names: Vec<String> = (0..STAT_DIRS)
        .flat_map(|d| (0..STAT_FILES_PER_DIR).map(move |f| format!("d{d:04}/f{f:03}")))
        .collect();
    let many = if wanted("stat") || wanted("transports") {
        Some(
            cached_layer(
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
            .await,
        )
    } else {
        None
    };
    let mut stat = None;
    if wanted("stat") {
        let many = many.as_ref().expect("100k layer");
        let tree = w.join("tree");
        for d in 0..STAT_DIRS {
            std::fs::create_dir_all(tree.join(format!("d{d:04}"))).expect("mkdir");
        }
        for n in &names {
            std::fs::write(tree.join(n), b"").expect("touch");
        }
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
            let m = mount(&[(many, &cache)], true, *t, w);
            let fuse_paths: Vec<PathBuf> = names
                .iter()
                .map(|n| m.dir.path().join(many.digest.hex()).join(n))
                .collect();
            let first = stat_all(&fuse_paths);
            let second = stat_all(&fuse_paths);
            drop(m);
            walks.push((*t, first, second));
        }
        stat = Some((native_stat, walks));
    }

    // 3. The service's footprint.
    let footprint = if wanted("footprint") {
        Some(service_footprint(w).await)
    } else {
        None
    };

    // 4. The transports.
    let transport_rows = if wanted("transports") {
        Some(
            transports(
                w,
                &cache,
                big.as_ref().expect("big layer"),
                many.as_ref().expect("100k layer"),
                rounds,
            )
            .await,
        )
    } else {
        None
    };

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
    if let Some((disk_seq, disk_rand, rows)) = reads {
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
    }
    if let Some((native_stat, walks)) = stat {
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
    }
    if let Some(footprint) = footprint {
        println!("\n## stargaze-fs service footprint (release build)\n");
        println!("| layers attached | RSS | threads |");
        println!("|---|---|---|");
        println!("| 1 | {:.1} MB | {} |", footprint[0].0, footprint[0].1);
        println!(
            "| {MANY_LAYERS} | {:.1} MB | {} |",
            footprint[1].0, footprint[1].1
        );
    }
    if let Some(rows) = transport_rows {
        print_transports(&rows, rounds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p99_is_the_nearest_rank() {
        let pass = |lat: Vec<u64>| Pass {
            lat,
            wall: Duration::from_secs(1),
        };
        // 1..=100 µs: 99 of them are ≤ 99 µs.
        assert_eq!(
            pass((1..=100).rev().map(|u| u * 1000).collect()).p99_us(),
            99.0
        );
        assert_eq!(pass(vec![5000]).p99_us(), 5.0);
        // 1000 operations, 11 slow ones: the p99 is slow.
        let mut lat = vec![1000; 989];
        lat.extend([9000; 11]);
        assert_eq!(pass(lat).p99_us(), 9.0);
        assert_eq!(pass(vec![1000; 4]).ops_per_s(), 4.0);
    }

    #[test]
    fn median_and_spread() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(spread(&[3.0, 1.0, 2.0]), (1.0, 3.0));
    }
}
