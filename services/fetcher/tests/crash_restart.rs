//! `kill -9` of the fetcher in the middle of chunk writes, again and again.
//! The `stargaze-fetcher` binary runs on one cache directory under load
//! (parallel Fetch requests of random ranges of two layers not fetched
//! before, so that every run writes); at a random moment it is killed
//! with SIGKILL and started again on the same cache, which keeps what the
//! earlier runs fetched. After every restart: its status says it re-verified the
//! cache and what that found; every chunk the cache says is present (what
//! the fs service would serve) holds the right bytes; every read that
//! succeeds brings the right bytes. At the end, a clean stop is recognised
//! as clean.
//!
//! `CRASH_KILLS` sets the number of kills (default 5).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use stargaze_cache::{Cache, PresenceMap};
use stargaze_index::LayerIndex;
use stargaze_proto::v1::fetcher_client::FetcherClient;
use stargaze_proto::v1::*;
use stargaze_testkit::Registry;

#[path = "support/pushed.rs"]
#[allow(dead_code)]
mod pushed;
use pushed::Source;

const PARALLEL: usize = 6;
/// New layers read in each run.
const LAYERS_PER_RUN: usize = 2;

struct Fetcher {
    child: Child,
    socket: PathBuf,
}

impl Fetcher {
    /// Start on `dir`'s config and cache; returns once it serves, and how
    /// long that took (re-verification included).
    fn start(dir: &Path) -> (Fetcher, Duration) {
        let socket = dir.join("f.sock");
        let _ = std::fs::remove_file(&socket);
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[fetcher]\nsocket = \"{}\"\ncache_dir = \"{}\"\nstargz_config = \"\"\nbackground_fetch = false\n[log]\nlevel = \"info\"\n",
                socket.display(),
                dir.join("cache").display()
            ),
        )
        .unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("fetcher.log"))
            .unwrap();
        let t = Instant::now();
        let child = Command::new(env!("CARGO_BIN_EXE_stargaze-fetcher"))
            .arg("--config")
            .arg(&config)
            .arg("--hosts-dir")
            .arg(dir.join("no-hosts"))
            .env("DOCKER_CONFIG", dir.join("docker"))
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let f = Fetcher { child, socket };
        while std::os::unix::net::UnixStream::connect(&f.socket).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "the fetcher did not start; its log: {}",
                std::fs::read_to_string(dir.join("fetcher.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        (f, t.elapsed())
    }

    fn client(&self) -> FetcherClient<tonic::transport::Channel> {
        FetcherClient::new(stargaze_proto::connect_unix(&self.socket).unwrap())
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Fetcher {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Every chunk the cache marks present holds its file's bytes; returns how
/// many chunks were checked.
fn present_chunks_are_right(cache_dir: &Path, sources: &[&Source]) -> u64 {
    let cache = Cache::open_reader(cache_dir);
    let mut checked = 0;
    for s in sources {
        let (Ok(index), Ok(presence)) = (
            LayerIndex::open(&cache.index_path(&layer_digest(&s.digest))),
            PresenceMap::open_ro(&cache.presence_path(&layer_digest(&s.digest))),
        ) else {
            continue; // not resolved yet
        };
        for (path, data) in &s.files {
            let ino = index.lookup_path(path).unwrap();
            for c in index.inode(ino).unwrap().chunks() {
                if !presence.is_present(c.global) {
                    continue;
                }
                let mut got = vec![0u8; c.size as usize];
                std::os::unix::fs::FileExt::read_exact_at(
                    &std::fs::File::open(cache.layer_file_path(&layer_digest(&s.digest), ino))
                        .unwrap(),
                    &mut got,
                    c.file_offset,
                )
                .unwrap_or_else(|e| panic!("{path}: a present chunk cannot be read: {e}"));
                assert!(
                    got[..] == data[c.file_offset as usize..(c.file_offset + c.size) as usize],
                    "{path} [{}, +{}]: a present chunk holds wrong bytes after a kill -9",
                    c.file_offset,
                    c.size
                );
                checked += 1;
            }
        }
    }
    checked
}

async fn resolve_all(
    client: &mut FetcherClient<tonic::transport::Channel>,
    reference: &str,
    sources: &[Source],
) -> Vec<LayerIndex> {
    let mut out = Vec::new();
    for s in sources {
        let r = client
            .resolve_layer(ResolveLayerRequest {
                layer: Some(LayerSource {
                    image_ref: reference.into(),
                    digest: s.digest.clone(),
                    annotations: s.annotations.clone(),
                    ..Default::default()
                }),
                allow_unverified: false,
            })
            .await
            .unwrap()
            .into_inner();
        out.push(LayerIndex::open(Path::new(&r.index_path)).unwrap());
    }
    out
}

/// Random reads until the fetcher goes away; each one that succeeds is
/// checked. Returns (reads, bytes verified).
async fn load(
    mut client: FetcherClient<tonic::transport::Channel>,
    cache_dir: PathBuf,
    sources: Arc<Vec<Source>>,
    indexes: Arc<Vec<LayerIndex>>,
    seed: u64,
    stop_after: Option<usize>,
) -> (u64, u64) {
    let mut x = seed | 1;
    let mut rand = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n.max(1)
    };
    let cache = Cache::open_reader(&cache_dir);
    let (mut reads, mut bytes) = (0, 0);
    loop {
        if stop_after.is_some_and(|n| reads as usize >= n) {
            return (reads, bytes);
        }
        let li = rand(sources.len() as u64) as usize;
        let (path, data) = &sources[li].files[rand(sources[li].files.len() as u64) as usize];
        let offset = rand(data.len() as u64);
        let len = 1 + rand((data.len() as u64 - offset).min(256 << 10));
        let ino = indexes[li].lookup_path(path).unwrap();
        let fetched = client
            .fetch(FetchRequest {
                layer_digest: sources[li].digest.clone(),
                ranges: vec![FileRange {
                    inode: ino,
                    offset,
                    length: len,
                }],
                priority: Priority::OnDemand as i32,
                follow_loads: false,
            })
            .await;
        if fetched.is_err() {
            // Killed: the reads of this run end here.
            return (reads, bytes);
        }
        let mut got = vec![0u8; len as usize];
        std::os::unix::fs::FileExt::read_exact_at(
            &std::fs::File::open(cache.layer_file_path(&layer_digest(&sources[li].digest), ino))
                .unwrap(),
            &mut got,
            offset,
        )
        .unwrap();
        assert!(
            got[..] == data[offset as usize..(offset + len) as usize],
            "{path} [{offset}, +{len}]: wrong bytes"
        );
        reads += 1;
        bytes += len;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_the_middle_of_chunk_writes_loses_nothing_and_serves_nothing_torn() {
    let kills: usize = std::env::var("CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let reference = format!("{}/crash/restart:esgz", reg.addr);
    let tars: Vec<Vec<u8>> = (0..(kills + 1) * LAYERS_PER_RUN)
        .map(|i| pushed::noise_layer(100 + i as u64, 4, 2 << 20))
        .collect();
    let all = pushed::push(&tars, 64 << 10, &reference, work.path());
    let mut runs: Vec<Arc<Vec<Source>>> = Vec::new();
    let mut all = all.into_iter();
    for _ in 0..=kills {
        runs.push(Arc::new(all.by_ref().take(LAYERS_PER_RUN).collect()));
    }
    let every =
        |upto: usize| -> Vec<&Source> { runs[..upto].iter().flat_map(|r| r.iter()).collect() };
    let cache_dir = work.path().join("cache");
    let seed = AtomicU64::new(0x00c0_ffee);
    let next = || {
        let s = seed.fetch_add(0x9E37_79B9, Ordering::Relaxed);
        s ^ (s >> 7)
    };
    let (mut reads, mut bytes) = (0u64, 0u64);
    let mut slowest_start = Duration::ZERO;
    let mut found = Vec::new();
    let mut interrupted = Vec::new();
    let chunks_of = |run: &[Source]| -> u64 {
        run.iter()
            .flat_map(|s| s.files.iter())
            .map(|(_, d)| (d.len() as u64).div_ceil(64 << 10))
            .sum()
    };
    for round in 0..=kills {
        let (mut fetcher, took) = Fetcher::start(work.path());
        slowest_start = slowest_start.max(took);
        let mut client = fetcher.client();
        let st = client.status(StatusRequest {}).await.unwrap().into_inner();
        if round > 0 {
            assert!(
                st.recovered_from_unclean_stop,
                "the status says the cache was re-verified after the kill"
            );
            assert_eq!(
                st.recovery_layers as usize,
                round * LAYERS_PER_RUN,
                "every layer resolved so far was re-verified"
            );
            found.push((
                st.recovery_chunks_checked,
                st.recovery_chunks_cleared,
                st.recovery_shared_removed,
                st.recovery_temps_removed,
                st.recovery_millis,
            ));
        }
        // What fs would serve now is right.
        let checked = present_chunks_are_right(&cache_dir, &every(round));
        if round > 0 {
            assert!(checked > 0, "chunks fetched before the kill are kept");
            // The kill came in the middle of the last run's writes.
            let total: u64 = runs[round - 1]
                .iter()
                .map(|s| s.files.iter().map(|(_, d)| d.len() as u64).sum::<u64>())
                .sum();
            let killed: Vec<&Source> = runs[round - 1].iter().collect();
            interrupted.push((
                present_chunks_are_right(&cache_dir, &killed),
                chunks_of(&runs[round - 1]),
                total,
            ));
        }
        let sources = runs[round].clone();
        let indexes = Arc::new(resolve_all(&mut client, &reference, &sources).await);
        let last = round == kills;
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..PARALLEL {
            tasks.spawn(load(
                fetcher.client(),
                cache_dir.clone(),
                sources.clone(),
                indexes.clone(),
                next(),
                last.then_some(20),
            ));
        }
        if !last {
            // A random moment while the reads and the background fetch write.
            tokio::time::sleep(Duration::from_millis(150 + next() % 600)).await;
            fetcher.kill9();
        }
        let mut round_reads = 0;
        while let Some(r) = tasks.join_next().await {
            let (n, b) = r.expect("a reader saw wrong bytes");
            round_reads += n;
            bytes += b;
        }
        reads += round_reads;
        if last {
            assert_eq!(round_reads, PARALLEL as u64 * 20, "every read succeeds");
        }
        if last {
            fetcher.stop();
        }
    }
    // A clean stop is recognised as clean.
    let (fetcher, _) = Fetcher::start(work.path());
    let st = fetcher
        .client()
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!st.recovered_from_unclean_stop);
    let checked = present_chunks_are_right(&cache_dir, &every(kills + 1));
    eprintln!(
        "{kills} kill -9 under load; {reads} reads, {bytes} bytes verified; after each restart (chunks checked, cleared, shared removed, temps removed, ms): {found:?}; chunks of the killed run present after it (present, of, bytes): {interrupted:?}; slowest start {slowest_start:?}; {checked} present chunks verified at the end"
    );
    assert!(
        interrupted.iter().any(|(p, of, _)| p < of),
        "at least one kill came before its run had fetched everything"
    );
}

/// A layer digest a test has as text (from a response or a manifest).
fn layer_digest(s: &str) -> stargaze_format::Digest {
    s.parse().expect("a layer digest")
}
