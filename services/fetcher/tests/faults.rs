//! Faults between the fetcher and a real registry, injected by a small HTTP
//! proxy: slow answers, 503s, 400 to multi-range requests, bodies cut short
//! and corrupted bytes. Reads either return the right bytes or a clear error
//! within a bounded time, and bad bytes are never published.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    None,
    /// Answer 503 to the next N requests.
    Unavailable(usize),
    /// Answer 400 to every multi-range request.
    NoMultiRange,
    /// Delay every answer.
    Slow(Duration),
    /// Close after half of the body of the next N range answers.
    Truncate(usize),
    /// Flip a byte in every range answer's body.
    Corrupt,
}

struct Proxy {
    addr: String,
    fault: Arc<Mutex<Fault>>,
    requests: Arc<AtomicUsize>,
    /// The `Range` header of every ranged request, in arrival order.
    ranges: Arc<Mutex<Vec<String>>>,
}

/// One request per connection: forward it upstream with `Connection: close`,
/// read the whole answer, apply the fault, answer and close.
async fn proxy(upstream: String) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let fault = Arc::new(Mutex::new(Fault::None));
    let requests = Arc::new(AtomicUsize::new(0));
    let ranges = Arc::new(Mutex::new(Vec::new()));
    let (f, n, seen) = (fault.clone(), requests.clone(), ranges.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let (f, n, seen, upstream) = (f.clone(), n.clone(), seen.clone(), upstream.clone());
            tokio::spawn(async move {
                let Some(head) = common::read_head(&mut client).await else {
                    return;
                };
                n.fetch_add(1, Ordering::SeqCst);
                let head = String::from_utf8_lossy(&head).to_string();
                let multi = head
                    .lines()
                    .any(|l| l.to_ascii_lowercase().starts_with("range:") && l.contains(','));
                let ranged = head
                    .lines()
                    .any(|l| l.to_ascii_lowercase().starts_with("range:"));
                if let Some(r) = head
                    .lines()
                    .find(|l| l.to_ascii_lowercase().starts_with("range:"))
                {
                    seen.lock().unwrap().push(r[6..].trim().to_string());
                }
                let fault = {
                    let mut g = f.lock().unwrap();
                    let now = *g;
                    match now {
                        Fault::Unavailable(k) if k > 0 => *g = Fault::Unavailable(k - 1),
                        Fault::Truncate(k) if k > 0 && ranged => *g = Fault::Truncate(k - 1),
                        _ => {}
                    }
                    now
                };
                match fault {
                    Fault::Unavailable(k) if k > 0 => {
                        let _ = client.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
                        return;
                    }
                    Fault::NoMultiRange if multi => {
                        let _ = client.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
                        return;
                    }
                    Fault::Slow(d) => tokio::time::sleep(d).await,
                    _ => {}
                }
                // Forward with the connection closed after the answer.
                let Some((mut answer, body_at)) = common::forward(&head, &upstream).await else {
                    return;
                };
                let is_range = answer.starts_with(b"HTTP/1.1 206");
                match fault {
                    Fault::Truncate(k) if k > 0 && is_range => {
                        let cut = body_at + (answer.len() - body_at) / 2;
                        answer.truncate(cut);
                    }
                    Fault::Corrupt if is_range && answer.len() > body_at + 10 => {
                        let mid = body_at + (answer.len() - body_at) / 2;
                        answer[mid] ^= 0x55;
                    }
                    _ => {}
                }
                let _ = client.write_all(&answer).await;
            });
        }
    });
    Proxy {
        addr,
        fault,
        requests,
        ranges,
    }
}

struct Setup {
    _reg: Registry,
    _work: tempfile::TempDir,
    proxy: Proxy,
    layer_digest: String,
    toc: Digest,
    repo: String,
    files: BTreeMap<String, Vec<u8>>,
}

async fn setup() -> Setup {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let (tar, _) = image::data_layer(33);
    image::write_layout(&src, "x", "src", std::slice::from_ref(&tar));
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
        .arg(format!("docker://{}/faults/app:esgz", reg.addr)));
    let m = dst
        .read_json(&dst.resolve(Some("esgz")).unwrap().digest)
        .unwrap();
    let desc = &m["layers"][0];
    let mut files = BTreeMap::new();
    for e in TarReader::new(&tar) {
        let e = e.unwrap();
        if e.kind == TarKind::Regular && e.size > 0 && !e.name.contains(".wh.") {
            files.insert(
                normalize_path(&e.name).unwrap(),
                tar[e.data_offset as usize..(e.data_offset + e.size) as usize].to_vec(),
            );
        }
    }
    let proxy = proxy(reg.addr.clone()).await;
    Setup {
        repo: format!("{}/faults/app:esgz", proxy.addr),
        layer_digest: desc["digest"].as_str().unwrap().into(),
        toc: desc["annotations"][TOC_DIGEST_ANNOTATION]
            .as_str()
            .unwrap()
            .parse()
            .unwrap(),
        files,
        proxy,
        _reg: reg,
        _work: work,
    }
}

async fn layer(s: &Setup, cache_dir: &Path, client_opts: ClientOptions) -> Arc<Layer> {
    let client = Client::new(Hosts::new(), DockerConfig::in_dir(cache_dir), client_opts);
    let blob = Arc::new(RegistryBlob(
        client.blob(&Reference::parse(&s.repo).unwrap(), &s.layer_digest),
    ));
    let cache = Arc::new(Cache::open_writer(cache_dir).unwrap());
    let opts = FetchOptions {
        whole_file_below: 0,
        ..Default::default()
    };
    Arc::new(
        resolve_layer(cache, blob, &s.layer_digest, Some(s.toc), false, &opts)
            .await
            .unwrap(),
    )
}

fn fast() -> ClientOptions {
    ClientOptions {
        min_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(50),
        request_timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

async fn fetch_all_and_check(s: &Setup, l: &Arc<Layer>) -> Result<(), String> {
    let ranges: Vec<(u64, u64, u64)> = s
        .files
        .iter()
        .map(|(p, d)| (l.index.lookup_path(p).unwrap(), 0, d.len() as u64))
        .collect();
    l.fetch(&ranges).await.map_err(|e| e.to_string())?;
    for (p, d) in &s.files {
        let content = std::fs::read(l.content_path(l.index.lookup_path(p).unwrap())).unwrap();
        assert!(content == *d, "{p}: wrong bytes served");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_faults_are_survived() {
    let s = setup().await;
    for fault in [
        Fault::Unavailable(3),
        Fault::NoMultiRange,
        Fault::Slow(Duration::from_millis(150)),
        Fault::Truncate(2),
    ] {
        let cache = tempfile::tempdir().unwrap();
        *s.proxy.fault.lock().unwrap() = Fault::None;
        let l = layer(&s, cache.path(), fast()).await;
        *s.proxy.fault.lock().unwrap() = fault;
        let start = Instant::now();
        fetch_all_and_check(&s, &l)
            .await
            .unwrap_or_else(|e| panic!("{fault:?}: {e}"));
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{fault:?} took {:?}",
            start.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_bytes_fail_clearly_and_are_never_cached() {
    let s = setup().await;
    let cache = tempfile::tempdir().unwrap();
    let l = layer(&s, cache.path(), fast()).await;
    *s.proxy.fault.lock().unwrap() = Fault::Corrupt;
    let start = Instant::now();
    let err = fetch_all_and_check(&s, &l).await.unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(30));
    assert!(
        err.contains(&s.layer_digest) && err.contains("verification failed"),
        "{err}"
    );
    let (present, total) = l.progress();
    assert!(present < total, "corrupt chunks are not published");
    // Once the network heals, the same layer serves the right bytes.
    *s.proxy.fault.lock().unwrap() = Fault::None;
    fetch_all_and_check(&s, &l).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_too_slow_registry_is_an_error_in_bounded_time() {
    let s = setup().await;
    let cache = tempfile::tempdir().unwrap();
    let opts = ClientOptions {
        request_timeout: Duration::from_millis(300),
        retries: 2,
        ..fast()
    };
    let l = layer(&s, cache.path(), opts).await;
    *s.proxy.fault.lock().unwrap() = Fault::Slow(Duration::from_secs(3));
    let start = Instant::now();
    let err = fetch_all_and_check(&s, &l).await.unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    assert!(err.contains(&s.proxy.addr), "{err}");
    assert!(s.proxy.requests.load(Ordering::SeqCst) > 0);
}

/// An answer cut off mid-body is resumed after the bytes already handed
/// on, not asked for again from the start, and the bytes come out whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_answer_resumes_after_what_arrived() {
    let s = setup().await;
    let work = tempfile::tempdir().unwrap();
    let client = Client::new(Hosts::new(), DockerConfig::in_dir(work.path()), fast());
    let blob = client.blob(&Reference::parse(&s.repo).unwrap(), &s.layer_digest);
    let size = blob.size().await.unwrap();
    let want = blob
        .read_ranges(std::slice::from_ref(&(0..size)))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(Digest::of(&want).to_string(), s.layer_digest);
    s.proxy.ranges.lock().unwrap().clear();
    *s.proxy.fault.lock().unwrap() = Fault::Truncate(1);
    let mut got: Vec<u8> = Vec::new();
    let mut pieces = 0;
    let mut pieces_at_ends = true;
    // Pieces may end every 4 KiB, as if members were that long.
    let ends = vec![(4096..size).step_by(4096).collect::<Vec<u64>>()];
    blob.stream_ranges(std::slice::from_ref(&(0..size)), &ends, &mut |i, bytes| {
        assert_eq!(i, 0);
        pieces += 1;
        got.extend_from_slice(&bytes);
        pieces_at_ends &= (got.len() as u64).is_multiple_of(4096) || got.len() as u64 == size;
    })
    .await
    .unwrap();
    assert!(got == want[..], "the resumed read returns the blob");
    assert!(pieces_at_ends, "pieces end where members end");
    assert!(pieces > 2, "handed on while it arrived ({pieces} pieces)");
    let seen = s.proxy.ranges.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0], format!("bytes=0-{}", size - 1));
    let resumed_at: u64 = seen[1]
        .strip_prefix("bytes=")
        .and_then(|r| r.split('-').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("{seen:?}"));
    assert!(
        resumed_at > 0 && resumed_at <= size / 2,
        "resumed at {resumed_at} of {size}: {seen:?}"
    );
    assert_eq!(seen[1], format!("bytes={resumed_at}-{}", size - 1));
}
