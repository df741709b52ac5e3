//! Fetcher benchmarks, side by side in one run (issue 3):
//!
//! 1. whole layer from a real registry (Debian docker-registry on loopback)
//!    into the cache, against `curl` downloading the same blob;
//! 2. decompress + verify + write through the engine from a local file,
//!    against a single-core libdeflate + sha256 loop over the same chunks;
//! 3. a cold random-read workload: HTTP requests issued per chunk needed
//!    (merging and batching), with 16 concurrent readers;
//! 4. peak RSS of this process while fetching.
//!
//! The layer is built from this machine's files (Python stdlib, Perl, ICU,
//! sbin: ~180 MB uncompressed). `BENCH_LAYER_PATHS` (space separated,
//! relative to /) overrides them; `BENCH_SYNTHETIC_MB` builds a synthetic
//! layer of that size instead. `BENCH_REGISTRY` (host:port) uses a registry
//! already running, e.g. behind a shaped link (`bench/fetch-link.sh`), with
//! `BENCH_LINK` describing it; `BENCH_ONLY` picks sections (registry,
//! engine, writers, random, rss; writers: `BENCH_WRITER_ROUNDS` rounds); `BENCH_ROUNDS` sets the registry section's rounds.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use stargaze_cache::Cache;
use stargaze_fetcher::engine::STAGE_CPU;
use stargaze_fetcher::registry::RegistryBlob;
use stargaze_fetcher::{FetchOptions, FileBlob, Layer, resolve_layer};
use stargaze_format::Digest;
use stargaze_format::chunk::decompress_prefix;
use stargaze_format::footer::Compression;
use stargaze_registry::{Client, ClientOptions, DockerConfig, Hosts, Reference};
use stargaze_testkit::{Registry, image, run};

/// Start the release `stargaze-fetcher`, resolve and prefetch the whole
/// layer through it, and return its peak RSS (MB) and the time taken.
async fn service_rss(dir: &std::path::Path, registry: &str, digest: &str, toc: &str) -> (f64, f64) {
    use stargaze_proto::v1::fetcher_client::FetcherClient;
    use stargaze_proto::v1::*;
    let bin = std::env::current_exe()
        .unwrap()
        .with_file_name("stargaze-fetcher");
    assert!(
        bin.exists(),
        "build it first: cargo build --release -p stargaze-fetcher"
    );
    let sock = dir.join("svc.sock");
    let config = dir.join("svc.toml");
    std::fs::write(
        &config,
        format!(
            "[fetcher]\nsocket = \"{}\"\ncache_dir = \"{}\"\nhosts_dir = \"{}\"\nstargz_config = \"\"\n[log]\nlevel = \"warn\"\n",
            sock.display(),
            dir.join("svc-cache").display(),
            dir.join("certs.d").display()
        ),
    )
    .unwrap();
    // Plain HTTP to the registry, through containerd's hosts.toml as on a node.
    let hosts = dir.join("certs.d").join(registry);
    std::fs::create_dir_all(&hosts).unwrap();
    std::fs::write(
        hosts.join("hosts.toml"),
        format!("server = \"http://{registry}\"\n[host.\"http://{registry}\"]\ncapabilities = [\"pull\", \"resolve\"]\n"),
    )
    .unwrap();
    let mut child = Command::new(&bin)
        .arg("--config")
        .arg(&config)
        .arg("--no-background-fetch")
        .spawn()
        .expect("start stargaze-fetcher");
    while !sock.exists() {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut client = FetcherClient::new(stargaze_proto::connect_unix(&sock).unwrap());
    let t = Instant::now();
    let layer = LayerSource {
        image_ref: format!("{registry}/bench/layer:x"),
        digest: digest.into(),
        annotations: [(
            stargaze_format::TOC_DIGEST_ANNOTATION.to_string(),
            toc.to_string(),
        )]
        .into(),
        ..Default::default()
    };
    let resolved = client
        .resolve_layer(ResolveLayerRequest {
            layer: Some(layer),
            allow_unverified: false,
        })
        .await
        .expect("resolve")
        .into_inner();
    // Every chunk of every file, in blob order, 256 ranges per call.
    let index = stargaze_index::LayerIndex::open(std::path::Path::new(&resolved.index_path))
        .expect("index");
    let mut ranges = Vec::new();
    for ino in 1..=index.inode_count() {
        let Some(n) = index.inode(ino) else { continue };
        for c in n.chunks() {
            ranges.push((
                c.compressed_offset,
                FileRange {
                    inode: ino,
                    offset: c.file_offset,
                    length: c.size,
                },
            ));
        }
    }
    ranges.sort_by_key(|(o, _)| *o);
    let ranges: Vec<FileRange> = ranges.into_iter().map(|(_, r)| r).collect();
    for batch in ranges.chunks(256) {
        client
            .fetch(FetchRequest {
                layer_digest: digest.into(),
                ranges: batch.to_vec(),
                priority: Priority::Background as i32,
                follow_loads: false,
            })
            .await
            .expect("fetch");
    }
    let secs = t.elapsed().as_secs_f64();
    let rss = peak_rss_mb(&format!("/proc/{}/status", child.id()));
    let _ = child.kill();
    let _ = child.wait();
    (rss, secs)
}

fn peak_rss_mb(status_path: &str) -> f64 {
    let status = std::fs::read_to_string(status_path).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn all_chunks(layer: &Layer) -> Vec<(u64, u64, u64)> {
    let mut out = Vec::new();
    for ino in 1..=layer.index.inode_count() {
        let Some(n) = layer.index.inode(ino) else {
            continue;
        };
        if n.is_reg() {
            for c in n.chunks() {
                out.push((c.compressed_offset, ino, c.file_offset, c.size));
            }
        }
    }
    out.sort();
    out.into_iter().map(|(_, i, o, s)| (i, o, s)).collect()
}

/// Resolve the local blob into a fresh cache at `root`.
/// How the cache's content files are written.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Writes {
    Pwrite,
    /// `cache_io = "io_uring"` before 2026-12-07: one ring on a dedicated
    /// thread, every write a hop to it.
    SharedRing,
    /// `cache_io = "io_uring"`: a ring per decode thread, a member's writes
    /// batched.
    ThreadRings,
}

impl Writes {
    fn name(self) -> &'static str {
        match self {
            Writes::Pwrite => "pwrite",
            Writes::SharedRing => "one ring on its own thread (old io_uring)",
            Writes::ThreadRings => "a ring per decode thread (io_uring)",
        }
    }
}

async fn local_layer(
    root: &std::path::Path,
    writes: Writes,
    blob_path: &std::path::Path,
    digest: &str,
    toc_digest: Digest,
) -> Arc<Layer> {
    let mut cache = Cache::open_writer(root).expect("cache");
    match writes {
        Writes::Pwrite => {}
        Writes::SharedRing => cache
            .use_io_uring_thread()
            .expect("io_uring is not available on this machine"),
        Writes::ThreadRings => cache
            .use_io_uring()
            .expect("io_uring is not available on this machine"),
    }
    Arc::new(
        resolve_layer(
            Arc::new(cache),
            Arc::new(FileBlob::open(blob_path).unwrap()),
            digest,
            Some(toc_digest),
            false,
            &opts(),
        )
        .await
        .expect("resolve"),
    )
}

/// CPU seconds (user + system) of all of this process's threads so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given; all-zero is a valid
    // rusage to start from.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(u.ru_utime) + secs(u.ru_stime)
}

/// Busy CPU seconds of the whole machine so far (every process and the
/// kernel: the registry and the network stack share the cores with us).
fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: all but idle, iowait.
    let busy: f64 = ticks
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .take(6)
        .map(|(_, t)| t)
        .sum();
    // SAFETY: sysconf has no preconditions.
    busy / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

async fn fetch_everything(layer: &Arc<Layer>) -> u64 {
    // As the fetcher's prefetch and background fetch do it.
    stargaze_fetcher::engine::fetch_in_batches(
        layer,
        all_chunks(layer),
        256,
        4,
        stargaze_fetcher::Purpose::Landmark,
    )
    .await
    .expect("fetch")
}

/// The engine's options; `BENCH_MAX_READ_BYTES` and `BENCH_INFLIGHT`
/// override the read size and concurrency (to measure other defaults).
fn opts() -> FetchOptions {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let d = FetchOptions::default();
    FetchOptions {
        whole_file_below: 0,
        max_read_bytes: env("BENCH_MAX_READ_BYTES").unwrap_or(d.max_read_bytes),
        max_inflight_reads: env("BENCH_INFLIGHT").map_or(d.max_inflight_reads, |n| n as usize),
        ..d
    }
}

/// Files of a synthetic layer of about `mb` megabytes: sizes from 1 KiB to
/// 4 MiB, a third of the bytes random (gzip gets them to ~40 %, like
/// binaries and libraries).
fn synthetic_tar(mb: u64) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut x: u32 = 0x9e37_79b9;
    let (mut total, mut i) = (0u64, 0u64);
    while total < mb << 20 {
        let size = [1 << 10, 20 << 10, 300 << 10, 4 << 20][(i % 4) as usize];
        let data = image::file_bytes(size, &mut x);
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(size as u64);
        b.append_data(&mut h, format!("data/{}/f{i}", i % 64), &data[..])
            .expect("tar");
        total += size as u64;
        i += 1;
    }
    b.into_inner().expect("tar")
}

/// Push a blob as it is (no recompression) with the registry API.
fn push_blob(registry: &str, blob_path: &std::path::Path, digest: &str) {
    let url = format!("http://{registry}/v2/bench/layer/blobs/uploads/");
    let out =
        run(Command::new("curl").args(["-sS", "-X", "POST", "-D", "-", "-o", "/dev/null", &url]));
    let location = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            l.strip_prefix("Location: ")
                .or_else(|| l.strip_prefix("location: "))
                .map(|s| s.trim().to_string())
        })
        .expect("upload location");
    let sep = if location.contains('?') { '&' } else { '?' };
    run(Command::new("curl")
        .args(["-sS", "-X", "PUT", "--data-binary"])
        .arg(format!("@{}", blob_path.display()))
        .args(["-H", "Content-Type: application/octet-stream"])
        .arg(format!("{location}{sep}digest={digest}")));
}

/// The filesystem holding `path` and, for ext4, whether it has a journal:
/// without one ext4 steps over every inode deleted in the last ~30 s when
/// it creates a file (`recently_deleted`), which makes a cache that was just
/// emptied slow to fill again. Production ext4 has a journal.
fn describe_fs(path: &std::path::Path) -> String {
    use stargaze_service::mountinfo;
    // The deepest mount point the path is under (the topmost of equals).
    let best = mountinfo::read()
        .into_iter()
        .filter(|m| mountinfo::is_under(path, &m.mount_point))
        .max_by_key(|m| m.mount_point.components().count());
    let Some(mountinfo::Mount {
        mount_point,
        fstype,
        source,
        ..
    }) = best
    else {
        return "unknown filesystem".into();
    };
    let mount_point = mount_point.display();
    let source = source.as_str();
    let journal = if fstype == "ext4" {
        let dev = source.rsplit('/').next().unwrap_or(source);
        let journaled = std::fs::read_dir("/proc/fs/jbd2")
            .map(|d| {
                d.flatten().any(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(&format!("{dev}-"))
                })
            })
            .unwrap_or(false);
        if journaled {
            ", with a journal"
        } else {
            ", without a journal"
        }
    } else {
        ""
    };
    format!("{fstype} on {source} at {mount_point}{journal}")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// `BENCH_ONLY` (comma separated: registry, engine, random, rss) limits the
/// sections; all by default.
fn wanted(section: &str) -> bool {
    std::env::var("BENCH_ONLY")
        .map(|v| v.split(',').any(|s| s.trim() == section))
        .unwrap_or(true)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    // BENCH_LOG: a tracing filter (e.g. `stargaze_fetcher=debug`) to see
    // the engine's range reads with their timing, on stderr.
    if let Ok(filter) = std::env::var("BENCH_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    let work = tempfile::tempdir().expect("temp dir");
    let tar = match std::env::var("BENCH_SYNTHETIC_MB") {
        Ok(mb) => {
            let mb: u64 = mb.parse().expect("BENCH_SYNTHETIC_MB: megabytes");
            eprintln!("== building a synthetic layer of {mb} MiB");
            synthetic_tar(mb)
        }
        Err(_) => {
            let paths_env = std::env::var("BENCH_LAYER_PATHS").unwrap_or_else(|_| {
                "usr/lib/python3.11 usr/share/perl5 usr/lib/x86_64-linux-gnu/perl usr/sbin"
                    .to_string()
            });
            let paths: Vec<&str> = paths_env.split_whitespace().collect();
            eprintln!("== building the layer from {paths:?}");
            image::tar_of_host_paths(&paths)
        }
    };
    let raw = tar.len() as u64;
    let mut blob = Vec::new();
    let res = stargaze_format::convert("bench", &tar, &mut blob, &Default::default(), None)
        .expect("convert");
    drop(tar);
    let blob_path = work.path().join("blob");
    std::fs::write(&blob_path, &blob).expect("write blob");
    let digest = res.digest.to_string();
    let size = blob.len() as u64;
    let mb = |b: u64, s: f64| b as f64 / s / 1e6;
    let mut rows: Vec<String> = Vec::new();
    let mut chunk_count = 0;

    // --- 2: pipeline vs single-core loop (local file, no network) ---
    if wanted("engine") {
        eprintln!("== decompress + verify: engine vs single-core loop");
        let local = |root: std::path::PathBuf, writes: Writes| {
            let (blob_path, digest, toc) = (blob_path.clone(), digest.clone(), res.toc_digest);
            async move { local_layer(&root, writes, &blob_path, &digest, toc).await }
        };
        let layer = local(work.path().join("cache-local"), Writes::Pwrite).await;
        let chunks: Vec<_> = {
            let mut v = Vec::new();
            for ino in 1..=layer.index.inode_count() {
                if let Some(n) = layer.index.inode(ino) {
                    v.extend(n.chunks());
                }
            }
            v
        };
        chunk_count = chunks.len();
        // The reference loop. This machine's speed drifts by tens of per
        // cent from second to second (a VM), so the loop runs right before
        // every engine round and each ratio is taken within its pair.
        let loop_bytes: u64 = chunks.iter().map(|c| c.size).sum();
        let reference_loop = || {
            let t = Instant::now();
            for c in &chunks {
                let member = &blob[c.compressed_offset as usize..c.compressed_end as usize];
                let data = decompress_prefix(Compression::Gzip, member, c.inner_offset + c.size)
                    .expect("decompress");
                let d = Digest::of(&data[c.inner_offset as usize..]);
                assert_eq!(d.0, c.digest);
            }
            t.elapsed().as_secs_f64()
        };
        drop(layer);
        // Each way of writing the cache, rounds into a fresh cache each:
        // median wall time and median CPU time of all the process's threads
        // (the engine is all that runs meanwhile), each also as a ratio to
        // the loop run just before it. On tmpfs the filesystem's
        // block and inode allocation (one content file per file digest)
        // is left out; io_uring writes through a ring per decode thread
        // instead of pwrite.
        let (disk, shm) = (work.path(), std::path::Path::new("/dev/shm"));
        struct Timed {
            wall: f64,
            cpu: f64,
            loop_secs: f64,
            /// Median of loop / wall and of loop / CPU over the rounds.
            wall_ratio: f64,
            cpu_ratio: f64,
            /// The engine's own accounting of its decode threads: CPU in
            /// decompress + verify, and in writing (medians), and the
            /// median of loop / (decompress + verify).
            decode_cpu: f64,
            write_cpu: f64,
            decode_ratio: f64,
        }
        let mut timed: Vec<Timed> = Vec::new();
        // Every round's cache is kept until the end: deleting thousands of
        // files just before creating as many makes ext4's inode allocation
        // slow (it steps over inodes deleted in the last 30 s,
        // `recently_deleted` in its profile), which no node does per fetch.
        let mut caches = Vec::new();
        for (base, writes, rounds) in [
            (disk, Writes::Pwrite, 5),
            (shm, Writes::Pwrite, 3),
            (disk, Writes::ThreadRings, 3),
            (shm, Writes::ThreadRings, 3),
        ] {
            let (mut walls, mut cpus, mut loops) = (Vec::new(), Vec::new(), Vec::new());
            let (mut wall_ratios, mut cpu_ratios) = (Vec::new(), Vec::new());
            let (mut decode_cpus, mut write_cpus, mut decode_ratios) =
                (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..rounds {
                let tmp = tempfile::tempdir_in(base).expect("cache dir");
                let layer = local(tmp.path().to_path_buf(), writes).await;
                let loop_secs = reference_loop();
                let stages = STAGE_CPU.seconds();
                let (t, cpu) = (Instant::now(), cpu_seconds());
                let engine_bytes = fetch_everything(&layer).await;
                let (wall, cpu) = (t.elapsed().as_secs_f64(), cpu_seconds() - cpu);
                let after = STAGE_CPU.seconds();
                let decode = (after.0 - stages.0) + (after.1 - stages.1);
                decode_cpus.push(decode);
                write_cpus.push(after.2 - stages.2);
                decode_ratios.push(loop_secs / decode);
                assert_eq!(engine_bytes, loop_bytes);
                caches.push(tmp);
                walls.push(wall);
                cpus.push(cpu);
                loops.push(loop_secs);
                wall_ratios.push(loop_secs / wall);
                cpu_ratios.push(loop_secs / cpu);
            }
            timed.push(Timed {
                wall: median(walls),
                cpu: median(cpus),
                loop_secs: median(loops),
                wall_ratio: median(wall_ratios),
                cpu_ratio: median(cpu_ratios),
                decode_cpu: median(decode_cpus),
                write_cpu: median(write_cpus),
                decode_ratio: median(decode_ratios),
            });
        }
        let (pw, tmpfs) = (&timed[0], &timed[1]);
        let uring_secs = [timed[2].wall, timed[3].wall];
        let (engine_secs, tmpfs_secs) = (pw.wall, tmpfs.wall);
        rows.push(format!(
            "| decompress + verify + write, local blob (engine, all cores) | {:.2} s, {:.0} MB/s | single-core libdeflate + sha256 loop, run just before each round: {:.2} s, {:.0} MB/s | **{:.2}×** |",
            pw.wall,
            mb(loop_bytes, pw.wall),
            pw.loop_secs,
            mb(loop_bytes, pw.loop_secs),
            pw.wall_ratio
        ));
        rows.push(format!(
            "| the same per core used: MB per CPU-second of all its threads (decompress, verify, write, scheduling) | {:.2} CPU-s, {:.0} MB/s per core | the loop: {:.0} MB/s on its one core | **{:.2}×** |",
            pw.cpu,
            mb(loop_bytes, pw.cpu),
            mb(loop_bytes, pw.loop_secs),
            pw.cpu_ratio
        ));
        rows.push(format!(
            "| of it, decompress + verify per core: the decode threads' CPU in those two stages (the engine's own thread-CPU accounting; writing the cache took {:.2} CPU-s more) | {:.2} CPU-s, {:.0} MB/s per core | the loop: {:.0} MB/s on its one core | **{:.2}×** |",
            pw.write_cpu,
            pw.decode_cpu,
            mb(loop_bytes, pw.decode_cpu),
            mb(loop_bytes, pw.loop_secs),
            pw.decode_ratio
        ));
        rows.push(format!(
            "| the same, cache on tmpfs (no ext4 inode allocation; writing took {:.2} CPU-s): wall / per core used | {:.2} s, {:.0} MB/s / {:.2} CPU-s, {:.0} MB/s per core | the loop: {:.0} MB/s | **{:.2}× / {:.2}×** |",
            tmpfs.write_cpu,
            tmpfs.wall,
            mb(loop_bytes, tmpfs.wall),
            tmpfs.cpu,
            mb(loop_bytes, tmpfs.cpu),
            mb(loop_bytes, tmpfs.loop_secs),
            tmpfs.wall_ratio,
            tmpfs.cpu_ratio
        ));
        rows.push(format!(
            "| the same with `cache_io = \"io_uring\"`, cache on disk / on tmpfs | {:.2} s, {:.0} MB/s / {:.2} s, {:.0} MB/s | pwrite (the two rows above): {:.2} s / {:.2} s | **{:.2}× / {:.2}×** |",
            uring_secs[0],
            mb(loop_bytes, uring_secs[0]),
            uring_secs[1],
            mb(loop_bytes, uring_secs[1]),
            engine_secs,
            tmpfs_secs,
            engine_secs / uring_secs[0],
            tmpfs_secs / uring_secs[1]
        ));
    }

    // --- 2b: the three ways of writing the cache, rounds alternated ---
    if wanted("writers") {
        eprintln!("== cache writers: pwrite, one shared ring, a ring per thread");
        let rounds: usize = std::env::var("BENCH_WRITER_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5);
        let kinds = [Writes::Pwrite, Writes::SharedRing, Writes::ThreadRings];
        let (disk, shm) = (work.path(), std::path::Path::new("/dev/shm"));
        let mut caches = Vec::new();
        for (where_, base) in [("disk", disk), ("tmpfs", shm)] {
            // Per writer: wall, process CPU, write-stage CPU of the decode
            // threads, one entry per round.
            let mut got: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> =
                kinds.iter().map(|_| Default::default()).collect();
            let mut bytes = 0;
            for round in 0..rounds {
                // Alternated, and the order rotated each round, so that the
                // machine's drift spreads over all three.
                for k in 0..kinds.len() {
                    let k = (k + round) % kinds.len();
                    let tmp = tempfile::tempdir_in(base).expect("cache dir");
                    let layer =
                        local_layer(tmp.path(), kinds[k], &blob_path, &digest, res.toc_digest)
                            .await;
                    let stages = STAGE_CPU.seconds();
                    let (t, cpu) = (Instant::now(), cpu_seconds());
                    bytes = fetch_everything(&layer).await;
                    let (wall, cpu) = (t.elapsed().as_secs_f64(), cpu_seconds() - cpu);
                    let write = STAGE_CPU.seconds().2 - stages.2;
                    eprintln!(
                        "  {where_} round {round} {}: {:.3} s, {:.0} MB/s, {:.2} CPU-s/GB, write stage {:.3} CPU-s/GB",
                        kinds[k].name(),
                        wall,
                        mb(bytes, wall),
                        cpu / (bytes as f64 / 1e9),
                        write / (bytes as f64 / 1e9)
                    );
                    got[k].0.push(wall);
                    got[k].1.push(cpu);
                    got[k].2.push(write);
                    // On disk every cache is kept till the end (see the
                    // engine section); tmpfs holds them in memory.
                    if base == disk {
                        caches.push(tmp);
                    }
                }
            }
            let gb = bytes as f64 / 1e9;
            let pwrite_wall = median(got[0].0.clone());
            for (k, (walls, cpus, writes)) in kinds.iter().zip(got) {
                let wall = median(walls.clone());
                rows.push(format!(
                    "| cache writes, {where_}: {} | {:.0} MB/s (rounds {}) | {:.2} CPU-s/GB, write stage {:.3} CPU-s/GB | **{:.2}×** pwrite |",
                    k.name(),
                    mb(bytes, wall),
                    walls
                        .iter()
                        .map(|w| format!("{:.0}", mb(bytes, *w)))
                        .collect::<Vec<_>>()
                        .join(", "),
                    median(cpus) / gb,
                    median(writes) / gb,
                    pwrite_wall / wall
                ));
            }
        }
    }

    // --- 1: whole layer from a registry vs curl ---
    // BENCH_REGISTRY: a registry already running (bench/fetch-link.sh puts
    // one behind a shaped link); else Debian's registry on loopback.
    let (_local_registry, registry, link) = match std::env::var("BENCH_REGISTRY") {
        Ok(addr) => {
            let link = std::env::var("BENCH_LINK").unwrap_or_else(|_| format!("registry {addr}"));
            (None, addr, link)
        }
        Err(_) => {
            let reg = Registry::start();
            let addr = reg.addr.clone();
            (Some(reg), addr, "loopback registry".to_string())
        }
    };
    if wanted("registry") || wanted("rss") {
        push_blob(&registry, &blob_path, &digest);
    }
    if wanted("registry") {
        eprintln!("== whole layer from the registry vs curl ({link})");
        let blob_url = format!("http://{registry}/v2/bench/layer/blobs/{digest}");
        let mut curl_times = Vec::new();
        let mut fetch_times = Vec::new();
        let mut requests = 0;
        // Interleaved, so that both see the same link and machine state.
        let rounds: usize = std::env::var("BENCH_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3);
        for round in 0..rounds {
            let o = run(Command::new("curl").args([
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{time_total}",
                &blob_url,
            ]));
            curl_times.push(
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<f64>()
                    .unwrap(),
            );
            let cache_dir = work.path().join(format!("cache-reg-{round}"));
            let client = Client::new(
                Hosts::new().with_plain_http(&registry),
                DockerConfig::in_dir(work.path()),
                ClientOptions::default(),
            );
            let r = Reference::parse(&format!("{registry}/bench/layer:x")).unwrap();
            let blob = Arc::new(RegistryBlob(client.blob(&r, &digest)));
            let cache = Arc::new(Cache::open_writer(&cache_dir).unwrap());
            let t = Instant::now();
            let cpu0 = cpu_seconds();
            let busy0 = machine_busy_seconds();
            let layer = Arc::new(
                resolve_layer(cache, blob, &digest, Some(res.toc_digest), false, &opts())
                    .await
                    .unwrap(),
            );
            let resolved = t.elapsed().as_secs_f64();
            fetch_everything(&layer).await;
            fetch_times.push(t.elapsed().as_secs_f64());
            eprintln!(
                "round {round}: curl {:.3} s; stargaze {:.3} s (resolve {resolved:.3} s, {:.2} CPU-s, machine {:.2} CPU-s busy)",
                curl_times[round],
                fetch_times[round],
                cpu_seconds() - cpu0,
                machine_busy_seconds() - busy0
            );
            requests = client
                .stats()
                .iter()
                .map(|(_, s)| s.requests.load(Ordering::Relaxed))
                .sum::<u64>();
            drop(layer);
            // Each round's cache stays until the end of the run (removed
            // with `work`), as in the engine section: refilling a cache
            // right after deleting one as large makes inode allocation on
            // an ext4 without a journal twice as slow (0.85 s instead of
            // 0.45 s per round here), which no node does per fetch.
            let _ = cache_dir;
        }
        let (curl_secs, fetch_secs) = (median(curl_times), median(fetch_times));
        rows.insert(0, format!(
            "| whole layer registry → cache (resolve + every chunk decompressed, verified, written) | {:.2} s, {:.0} MB/s of blob, {requests} requests | `curl` of the blob to /dev/null: {:.2} s, {:.0} MB/s | **{:.2}×** |",
            fetch_secs,
            mb(size, fetch_secs),
            curl_secs,
            mb(size, curl_secs),
            curl_secs / fetch_secs
        ));
    }

    // --- 3: cold random reads, 16 readers ---
    if wanted("random") {
        eprintln!("== random reads");
        let cache_dir = work.path().join("cache-random");
        let fblob = Arc::new(FileBlob::open(&blob_path).unwrap());
        let cache = Arc::new(Cache::open_writer(&cache_dir).unwrap());
        let layer = Arc::new(
            resolve_layer(
                cache,
                fblob.clone(),
                &digest,
                Some(res.toc_digest),
                false,
                &opts(),
            )
            .await
            .unwrap(),
        );
        let files: Vec<(u64, u64)> = (1..=layer.index.inode_count())
            .filter_map(|i| {
                layer
                    .index
                    .inode(i)
                    .filter(|n| n.is_reg() && n.size() > 0)
                    .map(|n| (i, n.size()))
            })
            .collect();
        let reads: Vec<(u64, u64)> = (0..2000usize)
            .map(|i| {
                let (ino, size) = files[(i * 7919) % files.len()];
                (ino, (i as u64 * 104_729) % size)
            })
            .collect();
        let needed: BTreeSet<u32> = reads
            .iter()
            .filter_map(|&(ino, off)| layer.index.inode(ino)?.chunk_at(off).map(|c| c.global))
            .collect();
        let before = fblob.requests();
        let t = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..16 {
            let l = layer.clone();
            let mine: Vec<(u64, u64)> = reads.iter().skip(w).step_by(16).copied().collect();
            tasks.push(tokio::spawn(async move {
                for (ino, off) in mine {
                    l.fetch(&[(ino, off, 4096)]).await.expect("random read");
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let random_secs = t.elapsed().as_secs_f64();
        let random_requests = fblob.requests() - before;
        let fetched = layer.counters.chunks_fetched.load(Ordering::Relaxed);
        chunk_count = layer.index.chunk_count() as usize;
        rows.push(format!(
            "| cold random reads: 2000 × 4 KiB, 16 readers | {random_requests} requests for {} chunks needed ({fetched} fetched incl. small whole files), {:.2} s | one request per chunk: {} | **{:.1} chunks per request** |",
            needed.len(),
            random_secs,
            needed.len(),
            fetched as f64 / random_requests.max(1) as f64
        ));
    }

    // --- 4: the real service's memory while it fetches the whole layer ---
    if wanted("rss") {
        eprintln!("== stargaze-fetcher RSS while fetching the whole layer");
        let (rss_peak, service_secs) =
            service_rss(work.path(), &registry, &digest, &res.toc_digest.to_string()).await;
        rows.push(format!(
            "| `stargaze-fetcher` process: ResolveLayer + Fetch of every chunk over gRPC | {:.2} s, peak RSS {:.0} MB | target: < 64 MB | |",
            service_secs, rss_peak
        ));
    }

    println!(
        "### Fetcher ({} cores, {link})\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!(
        "Layer: {:.1} MB uncompressed, {:.1} MB eStargz{}. Medians of {} rounds (engine rows: 5 rounds on disk with pwrite, 3 for the others, the loop run right before each).\n",
        raw as f64 / 1e6,
        size as f64 / 1e6,
        if chunk_count > 0 {
            format!(", {chunk_count} chunks")
        } else {
            String::new()
        },
        std::env::var("BENCH_ROUNDS").unwrap_or_else(|_| "3".into())
    );
    println!("Cache \"on disk\": {}.\n", describe_fs(work.path()));
    println!("| measure | stargaze | reference | ratio |");
    println!("|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    if std::env::var("BENCH_REGISTRY").is_err() {
        println!(
            "\nThe registry is on loopback, so `curl` runs at memory speed; on a real link the network, not decompression, sets both times (`bench/fetch-link.sh`, `bench/results/fetch-link.md`). io_uring vs pwrite: ratios above 1 mean io_uring was faster."
        );
    }
}
