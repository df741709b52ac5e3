//! The client against the real Debian docker-registry (plain HTTP, TLS
//! with htpasswd auth, mutual TLS), and against a small misbehaving server.

use std::ops::Range;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use stargaze_registry::{
    Client, ClientOptions, DockerConfig, Hosts, Platform, Reference, RegistryError, UploadSource,
};
use stargaze_testkit::{Registry, image, require, run};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Push a one-layer image; returns (layer digest, layer bytes).
fn push(dir: &Path, dest: &str, extra: &[&str]) -> (String, Vec<u8>) {
    require("skopeo");
    let layout = dir.join("layout");
    let (tar, _) = image::data_layer(9);
    image::write_layout(&layout, "x", "v1", &[tar]);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let m = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(&m[7..])).unwrap())
            .unwrap();
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let bytes = std::fs::read(layout.join("blobs/sha256").join(&layer[7..])).unwrap();
    run(Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--dest-tls-verify=false"])
        .args(extra)
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker://{dest}")));
    (layer, bytes)
}

fn client(hosts: Hosts, creds_dir: &Path) -> Client {
    Client::new(
        hosts,
        DockerConfig::in_dir(creds_dir),
        ClientOptions {
            min_backoff: Duration::from_millis(1),
            ..Default::default()
        },
    )
}

fn slices(data: &[u8], ranges: &[Range<u64>]) -> Vec<Vec<u8>> {
    ranges
        .iter()
        .map(|r| data[r.start as usize..r.end as usize].to_vec())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_manifests_and_errors_against_a_real_registry() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let dest = format!("{}/test/app:v1", reg.addr);
    let (layer, data) = push(work.path(), &dest, &[]);
    let c = client(Hosts::new(), work.path());
    let r = Reference::parse(&dest).unwrap();

    let m = c.resolve_manifest(&r, &Platform::host()).await.unwrap();
    let mj: serde_json::Value = serde_json::from_slice(&m.bytes).unwrap();
    assert_eq!(mj["layers"][0]["digest"], layer.as_str());
    let config = c
        .fetch_small_blob(&r, mj["config"]["digest"].as_str().unwrap())
        .await
        .unwrap();
    assert!(serde_json::from_slice::<serde_json::Value>(&config).unwrap()["rootfs"].is_object());

    let blob = c.blob(&r, &layer);
    let size = blob.size().await.unwrap();
    assert_eq!(size, data.len() as u64);
    let host_stats = || {
        c.stats()
            .into_iter()
            .find(|(h, _)| *h == reg.addr)
            .unwrap()
            .1
    };
    let cases: Vec<Vec<Range<u64>>> = vec![
        vec![0..10],
        vec![size - 7..size],
        vec![100..200, 5000..5001, size - 3..size],
        (0..20).map(|i| i * 1000 + 3..i * 1000 + 500).collect(),
        // More bytes than the blob: the registry answers 200 with all of it.
        vec![0..size, 0..10],
    ];
    for ranges in cases {
        let before = host_stats().requests.load(Ordering::Relaxed);
        let got = blob.read_ranges(&ranges).await.unwrap();
        let got: Vec<Vec<u8>> = got.iter().map(|b| b.to_vec()).collect();
        assert_eq!(got, slices(&data, &ranges), "{ranges:?}");
        assert_eq!(
            host_stats().requests.load(Ordering::Relaxed) - before,
            1,
            "one request for {ranges:?}"
        );
    }
    // The tail with the size in one suffix-range request, on a fresh handle.
    for n in [1u64, 4096, size, size + 10] {
        let fresh = c.blob(&r, &layer);
        let before = host_stats().requests.load(Ordering::Relaxed);
        let (total, start, bytes) = fresh.read_tail(n).await.unwrap();
        assert_eq!(
            host_stats().requests.load(Ordering::Relaxed) - before,
            1,
            "one request for the last {n} bytes"
        );
        assert_eq!(total, size);
        assert_eq!(start, size - n.min(size));
        assert_eq!(&bytes[..], &data[start as usize..], "tail of {n}");
        // The handle is probed now: reads need no further probe.
        let before = host_stats().requests.load(Ordering::Relaxed);
        fresh
            .read_ranges(std::slice::from_ref(&(0..10)))
            .await
            .unwrap();
        assert_eq!(host_stats().requests.load(Ordering::Relaxed) - before, 1);
    }
    // Outside the blob: refused before any request.
    assert!(
        blob.read_ranges(std::slice::from_ref(&(size..size + 1)))
            .await
            .is_err()
    );

    let missing = c.blob(&r, &format!("sha256:{}", "0".repeat(64)));
    let e = missing.size().await.unwrap_err().to_string();
    assert!(
        e.contains(&reg.addr) && e.contains("test/app") && e.contains("404"),
        "{e}"
    );
    let e = c
        .resolve_manifest(
            &Reference::parse(&format!("{}/test/nope:v1", reg.addr)).unwrap(),
            &Platform::host(),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("test/nope"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_basic_auth_through_hosts_toml_and_docker_config() {
    let (reg, ca) = Registry::start_tls_auth("alice", "s3cret");
    let work = tempfile::tempdir().unwrap();
    let dest = format!("{}/private/app:v1", reg.addr);
    let (layer, data) = push(work.path(), &dest, &["--dest-creds", "alice:s3cret"]);
    let hosts_dir = work.path().join("certs.d");
    std::fs::create_dir_all(hosts_dir.join(&reg.addr)).unwrap();
    std::fs::write(
        hosts_dir.join(&reg.addr).join("hosts.toml"),
        format!(
            "server = \"https://{}\"\nca = \"{}\"\n",
            reg.addr,
            ca.display()
        ),
    )
    .unwrap();
    let creds = work.path().join("docker");
    std::fs::create_dir_all(&creds).unwrap();
    let write_creds = |pass: &str| {
        use base64::Engine as _;
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("alice:{pass}"));
        std::fs::write(
            creds.join("config.json"),
            format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, reg.addr),
        )
        .unwrap();
    };
    let r = Reference::parse(&dest).unwrap();

    write_creds("s3cret");
    let c = client(Hosts::new().with_hosts_dir(&hosts_dir), &creds);
    let blob = c.blob(&r, &layer);
    let got = blob.read_ranges(&[10..20, 3000..4000]).await.unwrap();
    assert_eq!(&got[1][..], &data[3000..4000]);
    let stats = c.stats();
    let s = &stats.iter().find(|(h, _)| *h == reg.addr).unwrap().1;
    assert!(
        s.http2.load(Ordering::Relaxed) > 0,
        "TLS registry speaks HTTP/2"
    );

    write_creds("wrong");
    let c = client(Hosts::new().with_hosts_dir(&hosts_dir), &creds);
    let e = c.blob(&r, &layer).size().await.unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(&reg.addr) && !msg.contains("wrong"), "{msg}");

    // Without the CA the certificate is refused.
    let c = client(Hosts::new(), &creds);
    let e = c.blob(&r, &layer).size().await.unwrap_err();
    assert!(e.to_string().contains(&reg.addr), "{e}");
}

/// Mutual TLS: a registry that accepts only clients whose certificate its
/// CA signed is read with hosts.toml's `client` (containerd's forms: a
/// `[certificate, key]` pair with paths relative to the hosts directory,
/// or one file holding both); without a client certificate the handshake
/// fails and the error names the registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_from_hosts_toml_open_a_mutual_tls_registry() {
    let (reg, pki) = Registry::start_mtls();
    let work = tempfile::tempdir().unwrap();
    // skopeo's certificate directory: the CA as *.crt, the pair as
    // *.cert and *.key.
    let skopeo_certs = work.path().join("skopeo-certs");
    std::fs::create_dir_all(&skopeo_certs).unwrap();
    std::fs::copy(&pki.ca, skopeo_certs.join("ca.crt")).unwrap();
    std::fs::copy(&pki.client_cert, skopeo_certs.join("client.cert")).unwrap();
    std::fs::copy(&pki.client_key, skopeo_certs.join("client.key")).unwrap();
    let dest = format!("{}/mtls/app:v1", reg.addr);
    let cert_dir = format!("--dest-cert-dir={}", skopeo_certs.display());
    let (layer, data) = push(work.path(), &dest, &[&cert_dir]);
    let r = Reference::parse(&dest).unwrap();

    let hosts_dir = work.path().join("certs.d");
    let host_dir = hosts_dir.join(&reg.addr);
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::copy(&pki.client_cert, host_dir.join("client.pem")).unwrap();
    std::fs::copy(&pki.client_key, host_dir.join("client-key.pem")).unwrap();
    let mut combined = std::fs::read(&pki.client_cert).unwrap();
    combined.extend(std::fs::read(&pki.client_key).unwrap());
    std::fs::write(host_dir.join("combined.pem"), combined).unwrap();
    let read_with = |client_line: &str| {
        std::fs::write(
            host_dir.join("hosts.toml"),
            format!(
                "server = \"https://{}\"\n\n[host.\"https://{}\"]\nca = \"{}\"\n{client_line}\n",
                reg.addr,
                reg.addr,
                pki.ca.display()
            ),
        )
        .unwrap();
        let c = client(Hosts::new().with_hosts_dir(&hosts_dir), work.path());
        let blob = c.blob(&r, &layer);
        async move { blob.read_ranges(&[10..20, 3000..4000]).await }
    };
    for line in [
        r#"client = [["client.pem", "client-key.pem"]]"#,
        r#"client = "combined.pem""#,
        r#"client = ["combined.pem"]"#,
    ] {
        let got = read_with(line)
            .await
            .unwrap_or_else(|e| panic!("{line}: {e}"));
        assert_eq!(got, slices(&data, &[10..20, 3000..4000]), "{line}");
    }
    let e = read_with("").await.unwrap_err();
    assert!(e.to_string().contains(&reg.addr), "{e}");
    // A key that is not there is a configuration error naming the file.
    let e = read_with(r#"client = [["client.pem", "missing-key.pem"]]"#)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("missing-key.pem"), "{e}");
}

/// A registry on IPv6's loopback (`[::1]:port`): the reference, the
/// endpoint's URL and Host header, pushes and ranged reads all work with
/// the bracketed address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_registry_is_pushed_to_and_read_from() {
    let reg = Registry::start_ipv6();
    assert!(reg.addr.starts_with("[::1]:"), "{}", reg.addr);
    let work = tempfile::tempdir().unwrap();
    let c = client(Hosts::new(), work.path());
    let r = Reference::parse(&format!("{}/six/app:v1", reg.addr)).unwrap();
    let data: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let layer = stargaze_format::Digest::of(&data).to_string();
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = stargaze_format::Digest::of(config).to_string();
    for (digest, bytes) in [(&layer, data.clone()), (&config_digest, config.to_vec())] {
        let len = bytes.len() as u64;
        c.push_blob(&r, digest, len, UploadSource::Bytes(bytes.into()), &|_| {})
            .await
            .unwrap();
    }
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":{}}}]}}"#,
        config.len(),
        data.len()
    );
    c.push_manifest(
        &r,
        "v1",
        "application/vnd.oci.image.manifest.v1+json",
        manifest.clone().into(),
    )
    .await
    .unwrap();
    let m = c.resolve_manifest(&r, &Platform::host()).await.unwrap();
    assert_eq!(&m.bytes[..], manifest.as_bytes());
    let got = c
        .blob(&r, &layer)
        .read_ranges(&[0..10, 500_000..600_000])
        .await
        .unwrap();
    assert_eq!(got, slices(&data, &[0..10, 500_000..600_000]));
}

/// A registry that serves one blob but answers 503 to its first two
/// requests and 400 to every multi-range request.
async fn flaky_server(data: Arc<Vec<u8>>, hits: Arc<AtomicUsize>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let data = data.clone();
            let hits = hits.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut have = 0;
                loop {
                    let Ok(n) = sock.read(&mut buf[have..]).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    have += n;
                    let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let req = String::from_utf8_lossy(&buf[..end]).to_string();
                    buf.copy_within(end + 4..have, 0);
                    have -= end + 4;
                    let n = hits.fetch_add(1, Ordering::SeqCst);
                    let range = req.lines().find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("range: bytes=")
                            .map(String::from)
                    });
                    let resp: Vec<u8> = if n < 2 {
                        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n".to_vec()
                    } else {
                        match range {
                            Some(r) if r.contains(',') => {
                                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n".to_vec()
                            }
                            Some(r) => {
                                let (a, b) = r.split_once('-').unwrap();
                                let (a, b): (usize, usize) =
                                    (a.parse().unwrap(), b.parse().unwrap());
                                let mut out = format!(
                                    "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b}/{}\r\nContent-Length: {}\r\n\r\n",
                                    data.len(),
                                    b - a + 1
                                )
                                .into_bytes();
                                out.extend_from_slice(&data[a..=b]);
                                out
                            }
                            None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
                        }
                    };
                    if sock.write_all(&resp).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_503_and_falls_back_to_single_ranges_on_400() {
    let data: Arc<Vec<u8>> = Arc::new((0..100_000u32).map(|i| (i % 251) as u8).collect());
    let hits = Arc::new(AtomicUsize::new(0));
    let addr = flaky_server(data.clone(), hits.clone()).await;
    let work = tempfile::tempdir().unwrap();
    let c = client(Hosts::new(), work.path());
    let r = Reference::parse(&format!("{addr}/flaky/app:v1")).unwrap();
    let blob = c.blob(&r, &format!("sha256:{}", "1".repeat(64)));
    assert_eq!(blob.size().await.unwrap(), 100_000, "after two 503s");
    let ranges = vec![5..10, 50_000..50_100, 99_990..100_000];
    let got = blob.read_ranges(&ranges).await.unwrap();
    let got: Vec<Vec<u8>> = got.iter().map(|b| b.to_vec()).collect();
    assert_eq!(got, slices(&data, &ranges));
    // The host is now in single-range mode: no more 400s.
    let before = hits.load(Ordering::SeqCst);
    blob.read_ranges(&[0..1, 2..3]).await.unwrap();
    assert_eq!(hits.load(Ordering::SeqCst) - before, 2);

    // A host that only fails is reported with the URL, after bounded retries.
    let dead = Reference::parse("127.0.0.1:1/none/app:v1").unwrap();
    let e = c
        .blob(&dead, &format!("sha256:{}", "2".repeat(64)))
        .size()
        .await
        .unwrap_err();
    assert!(
        matches!(e, RegistryError::Request { .. }) && e.to_string().contains("127.0.0.1:1"),
        "{e}"
    );
}

/// A registry that answers 429 with `Retry-After: 1` is asked again only
/// after that second, whatever the client's own backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_is_retried_after_the_retry_after_it_gives() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let times = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = times.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut have = 0;
                loop {
                    let Ok(n) = sock.read(&mut buf[have..]).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    have += n;
                    if !buf[..have].windows(4).any(|w| w == b"\r\n\r\n") {
                        continue;
                    }
                    have = 0;
                    let first = {
                        let mut t = seen.lock().unwrap();
                        t.push(std::time::Instant::now());
                        t.len() == 1
                    };
                    let resp: &[u8] = if first {
                        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n"
                    } else {
                        b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n"
                    };
                    if sock.write_all(resp).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let work = tempfile::tempdir().unwrap();
    let c = Client::new(
        Hosts::new(),
        DockerConfig::in_dir(work.path()),
        stargaze_registry::ClientOptions {
            min_backoff: std::time::Duration::from_millis(1),
            max_backoff: std::time::Duration::from_millis(5),
            ..Default::default()
        },
    );
    let r = Reference::parse(&format!("{addr}/limited/app:v1")).unwrap();
    let blob = c.blob(&r, &format!("sha256:{}", "3".repeat(64)));
    assert_eq!(blob.size().await.unwrap(), 7);
    let t = times.lock().unwrap().clone();
    assert_eq!(t.len(), 2, "one 429, one answer");
    assert!(
        t[1] - t[0] >= std::time::Duration::from_millis(950),
        "asked again after {:?}",
        t[1] - t[0]
    );
}

/// When every endpoint fails, the error names each one and why: a mirror
/// that refuses connections and an origin without the object, in the
/// order tried; the origin's answer is what `last_answer` reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_failing_names_each_endpoint_and_its_error() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let dead = format!("127.0.0.1:{}", stargaze_testkit::free_port());
    let hosts_dir = work.path().join("certs.d");
    std::fs::create_dir_all(hosts_dir.join(&reg.addr)).unwrap();
    std::fs::write(
        hosts_dir.join(&reg.addr).join("hosts.toml"),
        format!(
            "server = \"http://{}\"\n\n[host.\"http://{dead}\"]\ncapabilities = [\"pull\", \"resolve\"]\n",
            reg.addr
        ),
    )
    .unwrap();
    let c = Client::new(
        Hosts::new().with_hosts_dir(&hosts_dir),
        DockerConfig::in_dir(work.path()),
        ClientOptions {
            min_backoff: Duration::from_millis(1),
            retries: 1,
            ..Default::default()
        },
    );
    let r = Reference::parse(&format!("{}/nothing/here:v1", reg.addr)).unwrap();
    let digest = format!("sha256:{}", "0".repeat(64));
    let manifest = c.resolve_manifest(&r, &Platform::host()).await.unwrap_err();
    let blob = c.blob(&r, &digest).size().await.unwrap_err();
    for e in [manifest, blob] {
        let RegistryError::Endpoints { failures, .. } = &e else {
            panic!("not every endpoint's error: {e:?}");
        };
        let tried: Vec<(&str, bool)> = failures
            .iter()
            .map(|f| (f.endpoint.as_str(), f.mirror))
            .collect();
        assert_eq!(
            tried,
            [
                (format!("http://{dead}").as_str(), true),
                (format!("http://{}", reg.addr).as_str(), false)
            ]
        );
        assert!(
            matches!(failures[0].error, RegistryError::Request { .. }),
            "{e:?}"
        );
        assert!(
            matches!(e.last_answer(), RegistryError::Status { status: 404, .. }),
            "{e:?}"
        );
        assert!(!e.is_transient(), "the origin's 404 decides: {e}");
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("mirror http://{dead}"))
                && msg.contains("onnection refused")
                && msg.contains(&format!("origin http://{}", reg.addr))
                && msg.contains("HTTP 404"),
            "{msg}"
        );
    }
}
