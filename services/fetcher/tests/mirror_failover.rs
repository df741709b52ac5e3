//! A mirror that dies in the middle of a lazy pull. The mirror is a real
//! pull-through cache (docker-registry with `proxy.remoteurl` pointing at
//! the origin registry), listed first in the origin's `hosts.toml`. Reads
//! run in parallel through the fetcher's layers; the mirror is killed
//! (SIGKILL) while they run. Every read succeeds with the right bytes, the
//! reads after the kill are answered by the origin, and once the mirror is
//! back and the endpoint back-off has passed, reads go to the mirror again.
//!
//! `MIRROR_READS` sets the reads per phase (default 120).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use stargaze_cache::Cache;
use stargaze_fetcher::Layer;
use stargaze_registry::{Client, ClientOptions, DockerConfig, Hosts};
use stargaze_testkit::{Registry, image};

#[path = "support/pushed.rs"]
#[allow(dead_code)]
mod pushed;
use pushed::Source;

const ENDPOINT_BACKOFF: Duration = Duration::from_secs(2);
const PARALLEL_READS: usize = 4;

/// Two layers of assorted files, converted with small chunks and pushed
/// to `origin`.
fn push_image(origin: &Registry, work: &std::path::Path) -> Vec<Source> {
    let tars: Vec<Vec<u8>> = [51, 52].map(|s| image::data_layer(s).0).to_vec();
    pushed::push(
        &tars,
        32 << 10,
        &format!("{}/mirrored/app:esgz", origin.addr),
        work,
    )
}

/// containerd's `hosts.toml` for the origin: the mirror first.
fn hosts_dir(origin: &Registry, mirror: &Registry, dir: &std::path::Path) -> Hosts {
    let d = dir.join(&origin.addr);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("hosts.toml"),
        format!(
            "server = \"http://{}\"\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            origin.addr, mirror.addr
        ),
    )
    .unwrap();
    Hosts::new().with_hosts_dir(dir)
}

async fn resolve_all(
    client: &Client,
    repo: &str,
    sources: &[Source],
    cache_dir: &std::path::Path,
) -> Vec<Arc<Layer>> {
    let cache = Arc::new(Cache::open_writer(cache_dir).unwrap());
    let mut out = Vec::new();
    for s in sources {
        out.push(Arc::new(
            pushed::resolve(client, repo, s, &cache).await.unwrap(),
        ));
    }
    out
}

/// Bytes the client received from `host` so far.
fn received(client: &Client, host: &str) -> u64 {
    client
        .stats()
        .iter()
        .find(|(h, _)| h == host)
        .map_or(0, |(_, s)| s.bytes.load(Ordering::Relaxed))
}

fn failovers(client: &Client, host: &str) -> u64 {
    client
        .stats()
        .iter()
        .find(|(h, _)| h == host)
        .map_or(0, |(_, s)| s.failovers.load(Ordering::Relaxed))
}

/// `n` random reads (fixed seed per phase), `PARALLEL_READS` at a time;
/// `midway` runs once half of them are done, while the rest are in flight.
/// Every read must succeed and equal the file's bytes. Returns the bytes
/// verified and the slowest read.
async fn read_phase(
    sources: Arc<Vec<Source>>,
    layers: Vec<Arc<Layer>>,
    n: usize,
    seed: u64,
    midway: impl FnOnce(),
) -> (u64, Duration) {
    let done = Arc::new(AtomicUsize::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = tokio::task::JoinSet::new();
    for w in 0..PARALLEL_READS {
        let (sources, layers, done, next) =
            (sources.clone(), layers.clone(), done.clone(), next.clone());
        set.spawn(async move {
            let mut x = seed ^ (w as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut rand = move |m: u64| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x % m.max(1)
            };
            let (mut bytes, mut slowest) = (0u64, Duration::ZERO);
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let li = rand(sources.len() as u64) as usize;
                let (path, data) =
                    &sources[li].files[rand(sources[li].files.len() as u64) as usize];
                let offset = rand(data.len() as u64);
                let len = 1 + rand((data.len() as u64 - offset).min(96 << 10));
                let l = &layers[li];
                let ino = l.index.lookup_path(path).unwrap();
                let t = Instant::now();
                tokio::time::timeout(Duration::from_secs(20), l.fetch(&[(ino, offset, len)]))
                    .await
                    .unwrap_or_else(|_| panic!("{path}: a read hung"))
                    .unwrap_or_else(|e| panic!("{path} [{offset}, +{len}]: {e}"));
                slowest = slowest.max(t.elapsed());
                let file = std::fs::File::open(l.content_path(ino)).unwrap();
                let mut got = vec![0u8; len as usize];
                std::os::unix::fs::FileExt::read_exact_at(&file, &mut got, offset).unwrap();
                assert!(
                    got[..] == data[offset as usize..(offset + len) as usize],
                    "{path} [{offset}, +{len}]: wrong bytes"
                );
                bytes += len;
                done.fetch_add(1, Ordering::Relaxed);
            }
            (bytes, slowest)
        });
    }
    while done.load(Ordering::Relaxed) < n / 2 && !set.is_empty() {
        if let Some(r) = set.try_join_next() {
            r.expect("a read failed");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    midway();
    let (mut bytes, mut slowest) = (0, Duration::ZERO);
    while let Some(r) = set.join_next().await {
        let (b, s) = r.expect("a read failed");
        bytes += b;
        slowest = slowest.max(s);
    }
    (bytes, slowest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_fail_over_to_the_origin_when_the_mirror_dies_and_come_back_to_it() {
    let reads: usize = std::env::var("MIRROR_READS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    let origin = Registry::start();
    let mirror = Arc::new(std::sync::Mutex::new(Registry::start_mirror_of(&origin)));
    let mirror_addr = mirror.lock().unwrap().addr.clone();
    let work = tempfile::tempdir().unwrap();
    let sources = Arc::new(push_image(&origin, work.path()));
    let repo = format!("{}/mirrored/app:esgz", origin.addr);
    let client = Client::new(
        hosts_dir(
            &origin,
            &mirror.lock().unwrap(),
            &work.path().join("certs.d"),
        ),
        DockerConfig::in_dir(work.path()),
        ClientOptions {
            request_timeout: Duration::from_secs(5),
            retries: 2,
            min_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(50),
            endpoint_backoff: ENDPOINT_BACKOFF,
            ..Default::default()
        },
    );
    let started = Instant::now();

    // 1. The mirror answers; it is killed half-way through the reads.
    let layers = resolve_all(&client, &repo, &sources, &work.path().join("cache1")).await;
    let killed_at = Arc::new(std::sync::Mutex::new((0, 0)));
    let (m, k, c, o) = (
        mirror.clone(),
        killed_at.clone(),
        client.clone(),
        origin.addr.clone(),
    );
    let mirror_bytes = received(&client, &mirror_addr);
    let blob = sources[0].digest[7..].to_string();
    let origin_log_before = origin.answered(&blob);
    let (bytes1, slowest1) = read_phase(sources.clone(), layers, reads, 0x1111, move || {
        m.lock().unwrap().kill();
        *k.lock().unwrap() = (received(&c, &o), received(&c, &mirror_addr));
    })
    .await;
    let mirror_addr = mirror.lock().unwrap().addr.clone();
    let (origin_at_kill, mirror_at_kill) = *killed_at.lock().unwrap();
    let origin_after = received(&client, &origin.addr);
    eprintln!(
        "phase 1: {reads} reads, {bytes1} bytes verified, slowest read {slowest1:?}; from the mirror before the kill {mirror_at_kill} bytes (at resolve {mirror_bytes}), from the origin {origin_at_kill} before and {origin_after} after; failovers away from the mirror: {}",
        failovers(&client, &mirror_addr)
    );
    assert!(
        mirror_at_kill > mirror_bytes,
        "reads went to the mirror while it was up"
    );
    assert!(
        origin_after > origin_at_kill,
        "after the kill the origin answered the reads"
    );
    assert!(failovers(&client, &mirror_addr) >= 1);

    // 2. The mirror is down: a fresh cache, every read from the origin;
    // then, after the back-off, the mirror is tried again, is still down,
    // and is set aside again.
    let layers = resolve_all(&client, &repo, &sources, &work.path().join("cache2")).await;
    let (mut bytes2, _) =
        read_phase(sources.clone(), layers.clone(), reads / 4, 0x2222, || {}).await;
    tokio::time::sleep(ENDPOINT_BACKOFF).await;
    bytes2 += read_phase(sources.clone(), layers.clone(), reads / 4, 0x2223, || {})
        .await
        .0;
    assert!(received(&client, &origin.addr) > origin_after);
    // The origin's own access log shows the reads (the mirror, which also
    // asks the origin, is down).
    assert!(
        origin.answered(&blob) > origin_log_before,
        "the origin's log shows the reads after the kill"
    );

    // 3. The mirror comes back; once the back-off of its last failure (in
    // the reads above at the latest) has passed, the same layers' reads
    // return to it.
    let t = Instant::now();
    mirror.lock().unwrap().restart();
    tokio::time::sleep((ENDPOINT_BACKOFF + Duration::from_millis(300)).saturating_sub(t.elapsed()))
        .await;
    let mirror_before = received(&client, &mirror_addr);
    let origin_before = received(&client, &origin.addr);
    let mirror_log_before = mirror.lock().unwrap().answered(&blob);
    let (bytes3, _) = read_phase(sources.clone(), layers.clone(), reads, 0x3333, || {}).await;
    let from_mirror = received(&client, &mirror_addr) - mirror_before;
    let from_origin = received(&client, &origin.addr) - origin_before;
    eprintln!(
        "phase 2: {} reads, {bytes2} bytes verified from the origin; phase 3 (mirror back after {:?}): {} reads, {bytes3} bytes verified, {from_mirror} bytes from the mirror and {from_origin} from the origin; the mirror's log: {} answers for the first layer's blob; total {:?}",
        reads / 2,
        t.elapsed(),
        reads,
        mirror.lock().unwrap().answered(&blob) - mirror_log_before,
        started.elapsed()
    );
    assert!(
        mirror.lock().unwrap().answered(&blob) > mirror_log_before,
        "the mirror's log shows the reads once it is back"
    );
    assert!(from_mirror > 0, "reads came back to the mirror");
    // Only the reads running while one of them probes the mirror again
    // (about one per worker and layer) still went to the origin.
    assert!(
        from_mirror > from_origin,
        "the mirror, once back, answers the reads ({from_mirror} vs {from_origin} bytes)"
    );
    // From then on, the origin sees none.
    let origin_before = received(&client, &origin.addr);
    let (bytes4, _) = read_phase(sources.clone(), layers, reads / 2, 0x4444, || {}).await;
    assert!(bytes4 > 0);
    assert_eq!(
        received(&client, &origin.addr),
        origin_before,
        "every read goes to the mirror once it is back"
    );
}
