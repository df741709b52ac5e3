//! A long run through a hostile network. A proxy between the fetcher and a
//! real registry picks, for a third of the requests, one fault at random:
//! it resets the connection mid-body, cuts the body short, flips a byte,
//! answers 5xx, answers 429 with `Retry-After`, stalls past the request
//! timeout, or serves another blob's bytes. Over many random reads of
//! several layers (fresh caches every round, so that reads keep reaching
//! the network): no wrong byte ever reaches a reader; every failed read
//! fails within a bound with an error naming the layer, the file and the
//! cause; once the proxy behaves, the same reads succeed.
//!
//! `HOSTILE_READS` sets the number of reads (default 1500; `make soak`
//! runs 10,000).

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use stargaze_cache::Cache;
use stargaze_fetcher::registry::RegistryBlob;
use stargaze_fetcher::{FetchOptions, Layer, resolve_layer};
use stargaze_format::tar::{TarKind, TarReader};
use stargaze_format::tree::normalize_path;
use stargaze_format::{Digest, TOC_DIGEST_ANNOTATION};
use stargaze_oci::{ImageConvertOptions, OciLayout};
use stargaze_registry::{Client, ClientOptions, DockerConfig, Hosts, Reference};
use stargaze_testkit::{Registry, image, run};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

mod common;

/// A stall is longer than this; a read that fails must fail within
/// [`READ_BOUND`].
const REQUEST_TIMEOUT: Duration = Duration::from_millis(400);
const READ_BOUND: Duration = Duration::from_secs(20);
const PARALLEL_READS: usize = 8;
const READS_PER_ROUND: usize = 60;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    Reset,
    Truncate,
    Corrupt,
    ServerError,
    TooManyRequests,
    Stall,
    OtherBlob,
}

const FAULTS: [Fault; 7] = [
    Fault::Reset,
    Fault::Truncate,
    Fault::Corrupt,
    Fault::ServerError,
    Fault::TooManyRequests,
    Fault::Stall,
    Fault::OtherBlob,
];

/// xorshift64*: reproducible randomness without a dependency.
struct Rng(AtomicU64);

impl Rng {
    fn next(&self) -> u64 {
        let mut x = self.0.load(Ordering::Relaxed);
        loop {
            let mut y = x;
            y ^= y >> 12;
            y ^= y << 25;
            y ^= y >> 27;
            match self
                .0
                .compare_exchange(x, y, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return y.wrapping_mul(0x2545_F491_4F6C_DD1D),
                Err(now) => x = now,
            }
        }
    }

    fn below(&self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

struct Proxy {
    addr: String,
    hostile: Arc<AtomicBool>,
    faults: Arc<std::sync::Mutex<BTreeMap<Fault, usize>>>,
    requests: Arc<AtomicUsize>,
}

/// One request per connection, forwarded with `Connection: close`; while
/// `hostile`, a quarter of them get a fault. `blobs` are the layer digests
/// one may be swapped for another (the "other blob" fault).
async fn proxy(upstream: String, blobs: Vec<String>, seed: u64) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let hostile = Arc::new(AtomicBool::new(false));
    let faults = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
    let requests = Arc::new(AtomicUsize::new(0));
    let rng = Arc::new(Rng(AtomicU64::new(seed | 1)));
    let (h, f, n) = (hostile.clone(), faults.clone(), requests.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let (h, f, n, rng, upstream, blobs) = (
                h.clone(),
                f.clone(),
                n.clone(),
                rng.clone(),
                upstream.clone(),
                blobs.clone(),
            );
            tokio::spawn(async move {
                let Some(head) = common::read_head(&mut client).await else {
                    return;
                };
                n.fetch_add(1, Ordering::Relaxed);
                let mut head = String::from_utf8_lossy(&head).to_string();
                let ranged = head.to_ascii_lowercase().contains("\r\nrange:");
                let fault = (h.load(Ordering::Relaxed) && rng.below(3) == 0)
                    .then(|| FAULTS[rng.below(FAULTS.len() as u64) as usize]);
                // Faults on the body only make sense for ranged reads.
                let fault = fault.filter(|f| {
                    ranged
                        || matches!(
                            f,
                            Fault::ServerError | Fault::TooManyRequests | Fault::Stall
                        )
                });
                if let Some(fault) = fault {
                    *f.lock().unwrap().entry(fault).or_default() += 1;
                }
                match fault {
                    Some(Fault::ServerError) => {
                        let status = [
                            "500 Internal Server Error",
                            "502 Bad Gateway",
                            "503 Service Unavailable",
                        ][rng.below(3) as usize];
                        let _ = client
                            .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes())
                            .await;
                        return;
                    }
                    Some(Fault::TooManyRequests) => {
                        let _ = client
                            .write_all(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                            .await;
                        return;
                    }
                    Some(Fault::Stall) => {
                        tokio::time::sleep(REQUEST_TIMEOUT * 3).await;
                        return;
                    }
                    Some(Fault::OtherBlob) => {
                        if let Some(from) = blobs.iter().find(|b| head.contains(b.as_str())) {
                            let to = blobs.iter().find(|b| *b != from).expect("several blobs");
                            head = head.replace(from.as_str(), to);
                        }
                    }
                    _ => {}
                }
                let Some((mut answer, body_at)) = common::forward(&head, &upstream).await else {
                    return;
                };
                let body = answer.len() - body_at;
                match fault {
                    Some(Fault::Reset) if body > 1 => {
                        let cut = body_at + 1 + rng.below(body as u64 - 1) as usize;
                        let _ = client.write_all(&answer[..cut]).await;
                        // SO_LINGER 0: the close sends a reset, not a FIN.
                        #[allow(deprecated)]
                        let _ = client.set_linger(Some(Duration::ZERO));
                        return;
                    }
                    Some(Fault::Truncate) if body > 1 => {
                        answer.truncate(body_at + rng.below(body as u64) as usize);
                    }
                    Some(Fault::Corrupt) if body > 0 => {
                        let at = body_at + rng.below(body as u64) as usize;
                        answer[at] ^= 1 << rng.below(8);
                    }
                    _ => {}
                }
                let _ = client.write_all(&answer).await;
            });
        }
    });
    Proxy {
        addr,
        hostile,
        faults,
        requests,
    }
}

struct Source {
    digest: String,
    toc: Digest,
    files: Vec<(String, Vec<u8>)>,
}

struct Setup {
    _reg: Registry,
    _work: tempfile::TempDir,
    proxy: Proxy,
    repo: String,
    layers: Vec<Source>,
}

/// Three layers of assorted files in one image, converted with small
/// chunks, pushed to a registry behind the proxy.
async fn setup() -> Setup {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let tars: Vec<Vec<u8>> = [41, 42, 43].map(|s| image::data_layer(s).0).to_vec();
    image::write_layout(&src, "x", "src", &tars);
    let out = work.path().join("out");
    let dst = OciLayout::open_or_create(&out).unwrap();
    let opts = ImageConvertOptions {
        layer: stargaze_format::ConvertOptions {
            chunk_size: 64 << 10,
            ..Default::default()
        },
        tmp_dir: None,
    };
    stargaze_oci::convert_image(
        &OciLayout::open(&src).unwrap(),
        Some("src"),
        &dst,
        "esgz",
        &opts,
        &|_| {},
    )
    .unwrap();
    run(Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:esgz", out.display()))
        .arg(format!("docker://{}/hostile/app:esgz", reg.addr)));
    let m = dst
        .read_json(&dst.resolve(Some("esgz")).unwrap().digest)
        .unwrap();
    let layers: Vec<Source> = tars
        .iter()
        .enumerate()
        .map(|(i, tar)| {
            let desc = &m["layers"][i];
            let mut files = Vec::new();
            for e in TarReader::new(tar) {
                let e = e.unwrap();
                if e.kind == TarKind::Regular && e.size > 0 && !e.name.contains(".wh.") {
                    files.push((
                        normalize_path(&e.name).unwrap(),
                        tar[e.data_offset as usize..(e.data_offset + e.size) as usize].to_vec(),
                    ));
                }
            }
            Source {
                digest: desc["digest"].as_str().unwrap().into(),
                toc: desc["annotations"][TOC_DIGEST_ANNOTATION]
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap(),
                files,
            }
        })
        .collect();
    let blobs = layers.iter().map(|l| l.digest.clone()).collect();
    let proxy = proxy(reg.addr.clone(), blobs, 0x5eed_cafe).await;
    Setup {
        repo: format!("{}/hostile/app:esgz", proxy.addr),
        layers,
        proxy,
        _reg: reg,
        _work: work,
    }
}

fn client_options() -> ClientOptions {
    ClientOptions {
        request_timeout: REQUEST_TIMEOUT,
        retries: 2,
        min_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(100),
        ..Default::default()
    }
}

/// Resolve every layer into a fresh cache (the proxy behaving).
async fn resolve_all(s: &Setup, client: &Client, cache_dir: &std::path::Path) -> Vec<Arc<Layer>> {
    let cache = Arc::new(Cache::open_writer(cache_dir).unwrap());
    let opts = FetchOptions {
        whole_file_below: 0,
        ..Default::default()
    };
    let mut out = Vec::new();
    for l in &s.layers {
        let blob = Arc::new(RegistryBlob(
            client.blob(&Reference::parse(&s.repo).unwrap(), &l.digest),
        ));
        out.push(Arc::new(
            resolve_layer(cache.clone(), blob, &l.digest, Some(l.toc), false, &opts)
                .await
                .unwrap(),
        ));
    }
    out
}

#[derive(Clone, Debug)]
struct Read {
    layer: usize,
    file: usize,
    offset: u64,
    len: u64,
}

/// Fetch the read's range and compare what the cache then holds with the
/// file's bytes: `Ok` only with the right bytes; a wrong byte panics.
async fn read(s: &Setup, layers: &[Arc<Layer>], r: &Read) -> Result<(), String> {
    let l = &layers[r.layer];
    let (path, data) = &s.layers[r.layer].files[r.file];
    let ino = l.index.lookup_path(path).unwrap();
    let started = Instant::now();
    let fetched = tokio::time::timeout(READ_BOUND, l.fetch(&[(ino, r.offset, r.len)])).await;
    let elapsed = started.elapsed();
    match fetched {
        Err(_) => panic!("{path}: a read took longer than {READ_BOUND:?}"),
        Ok(Err(e)) => {
            let e = e.to_string();
            assert!(
                e.contains(&s.layers[r.layer].digest) && e.contains(path.as_str()),
                "a failed read names its layer and file: {e}"
            );
            assert!(elapsed < READ_BOUND, "{e} after {elapsed:?}");
            Err(e)
        }
        Ok(Ok(_)) => {
            let file = std::fs::File::open(l.content_path(ino)).unwrap();
            let mut got = vec![0u8; r.len as usize];
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut got, r.offset).unwrap();
            let want = &data[r.offset as usize..(r.offset + r.len) as usize];
            assert!(
                got == want,
                "{path} [{}, +{}]: a wrong byte reached a reader",
                r.offset,
                r.len
            );
            Ok(())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_reads_through_a_hostile_network_never_see_a_wrong_byte() {
    let total: usize = std::env::var("HOSTILE_READS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    let s = Arc::new(setup().await);
    let rng = Rng(AtomicU64::new(0x0123_4567_89ab_cdef));
    let work = tempfile::tempdir().unwrap();
    let mut done = 0;
    let mut failed: Vec<(Vec<Arc<Layer>>, Read, String)> = Vec::new();
    let mut round = 0;
    let started = Instant::now();
    while done < total {
        // A fresh cache and client each round: reads keep reaching the
        // network, connections start anew.
        round += 1;
        s.proxy.hostile.store(false, Ordering::Relaxed);
        let client = Client::new(
            Hosts::new(),
            DockerConfig::in_dir(work.path()),
            client_options(),
        );
        let layers = resolve_all(&s, &client, &work.path().join(format!("cache{round}"))).await;
        s.proxy.hostile.store(true, Ordering::Relaxed);
        let n = READS_PER_ROUND.min(total - done);
        let reads: Vec<Read> = (0..n)
            .map(|_| {
                let layer = rng.below(s.layers.len() as u64) as usize;
                let file = rng.below(s.layers[layer].files.len() as u64) as usize;
                let size = s.layers[layer].files[file].1.len() as u64;
                let offset = rng.below(size);
                let len = 1 + rng.below((size - offset).min(256 << 10));
                Read {
                    layer,
                    file,
                    offset,
                    len,
                }
            })
            .collect();
        for batch in reads.chunks(PARALLEL_READS) {
            let mut set = tokio::task::JoinSet::new();
            for r in batch {
                let (s, layers, r) = (s.clone(), layers.clone(), r.clone());
                set.spawn(async move {
                    let res = read(&s, &layers, &r).await;
                    (r, res)
                });
            }
            while let Some(joined) = set.join_next().await {
                let (r, res) = joined.expect("a read panicked");
                if let Err(e) = res {
                    failed.push((layers.clone(), r, e));
                }
            }
        }
        done += n;
    }
    let faults = s.proxy.faults.lock().unwrap().clone();
    eprintln!(
        "{done} reads in {:?} over {round} rounds, {} requests, faults injected: {faults:?}, {} reads failed",
        started.elapsed(),
        s.proxy.requests.load(Ordering::Relaxed),
        failed.len()
    );
    for f in FAULTS {
        assert!(
            faults.get(&f).copied().unwrap_or(0) > 0,
            "{f:?} was never injected: {faults:?}"
        );
    }
    // The network heals: every read that failed succeeds, with the right
    // bytes (so nothing wrong was published while it failed).
    s.proxy.hostile.store(false, Ordering::Relaxed);
    for (layers, r, e) in &failed {
        read(&s, layers, r)
            .await
            .unwrap_or_else(|e2| panic!("failed with {e}, then again with {e2}"));
    }
}
