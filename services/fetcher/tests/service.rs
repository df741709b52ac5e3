//! The `stargaze-fetcher` binary end to end: a real registry holding an
//! image converted by `stargaze-oci`, the service on a private socket, a gRPC
//! client resolving every layer and fetching every file, then a clean stop.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stargaze_cache::Cache;
use stargaze_format::tar::{TarKind, TarReader};
use stargaze_format::tree::normalize_path;
use stargaze_index::LayerIndex;
use stargaze_oci::{ImageConvertOptions, OciLayout};
use stargaze_proto::v1::fetcher_client::FetcherClient;
use stargaze_proto::v1::*;
use stargaze_testkit::{Registry, image, skopeo_copy};

struct Fetcher {
    child: Child,
    socket: PathBuf,
    cache: PathBuf,
}

impl Fetcher {
    fn start(dir: &Path, metrics_port: u16) -> Fetcher {
        Fetcher::start_with(dir, metrics_port, "")
    }

    /// `extra` lines go into the `[fetcher]` section.
    fn start_with(dir: &Path, metrics_port: u16, extra: &str) -> Fetcher {
        // Never the machine's Go snapshotter config, unless a test names one.
        let extra = if extra.contains("stargz_config") {
            extra.to_string()
        } else {
            format!("stargz_config = \"\"\n{extra}")
        };
        let socket = dir.join("f.sock");
        let cache = dir.join("cache");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[fetcher]\nsocket = \"{}\"\ncache_dir = \"{}\"\nmetrics_address = \"127.0.0.1:{metrics_port}\"\n{extra}\n[log]\nlevel = \"debug\"\n",
                socket.display(),
                cache.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("fetcher.log")).unwrap();
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
        let start = Instant::now();
        while !socket.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "fetcher did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Fetcher {
            child,
            socket,
            cache,
        }
    }

    fn stop(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Fetcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The fetcher's Prometheus metrics, as text.
fn scrape(metrics_port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", metrics_port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Scrape until the metrics contain `line`: counters an async task bumps
/// after its work is visible (the entrypoint prefetch counts its files when
/// the last one is in) lag the cache by a moment. Panics with the last
/// scrape after 10 s.
fn scrape_until(metrics_port: u16, line: &str) -> String {
    let start = Instant::now();
    loop {
        let metrics = scrape(metrics_port);
        if metrics.lines().any(|l| l == line) {
            return metrics;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no `{line}` in the metrics:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Convert the layout at `src` (tag `src`) into `out` under `tag`, push
/// that tag to `image_ref` and return the converted manifest.
fn convert(
    src: &Path,
    out: &Path,
    tag: &str,
    opts: &ImageConvertOptions,
    image_ref: &str,
) -> serde_json::Value {
    let dst = OciLayout::open_or_create(out).unwrap();
    stargaze_oci::convert_image(
        &OciLayout::open(src).unwrap(),
        Some("src"),
        &dst,
        tag,
        opts,
        &|_| {},
    )
    .unwrap();
    skopeo_copy(
        &format!("oci:{}:{tag}", out.display()),
        &format!("docker://{image_ref}"),
    );
    dst.read_json(&dst.resolve(Some(tag)).unwrap().digest)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolves_and_fetches_every_file_from_a_real_registry() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let layers = vec![image::busybox_layer(), image::data_layer(21).0];
    image::write_layout(&src, "x", "src", &layers);
    let image_ref = format!("{}/stargaze/fetcher:esgz", reg.addr);
    let opts = ImageConvertOptions {
        layer: stargaze_format::ConvertOptions {
            chunk_size: 128 << 10,
            ..Default::default()
        },
        tmp_dir: None,
    };
    let manifest = convert(&src, &work.path().join("out"), "esgz", &opts, &image_ref);
    // Also an ordinary gzip image: not lazily pullable.
    let plain_ref = format!("{}/stargaze/fetcher:plain", reg.addr);
    skopeo_copy(
        &format!("oci:{}:src", src.display()),
        &format!("docker://{plain_ref}"),
    );

    let metrics_port = stargaze_testkit::free_port();
    let mut fetcher = Fetcher::start(work.path(), metrics_port);
    let mut client = FetcherClient::new(stargaze_proto::connect_unix(&fetcher.socket).unwrap());
    let reader = Cache::open_reader(&fetcher.cache);
    let mut resolved = Vec::new();
    for (desc, tar) in manifest["layers"].as_array().unwrap().iter().zip(&layers) {
        let annotations: std::collections::HashMap<String, String> =
            serde_json::from_value(desc["annotations"].clone()).unwrap();
        let source = LayerSource {
            image_ref: image_ref.clone(),
            digest: desc["digest"].as_str().unwrap().into(),
            annotations,
            ..Default::default()
        };
        // Concurrent resolves of one layer do the work once and agree.
        let (mut c1, mut c2) = (client.clone(), client.clone());
        let req = || ResolveLayerRequest {
            layer: Some(source.clone()),
            allow_unverified: false,
        };
        let (a, b) = tokio::join!(c1.resolve_layer(req()), c2.resolve_layer(req()));
        let (a, b) = (a.unwrap().into_inner(), b.unwrap().into_inner());
        assert_eq!(a, b);
        assert_eq!(a.format, "estargz");
        assert!(a.toc_verified);
        let index = LayerIndex::open(Path::new(&a.index_path)).unwrap();

        let mut files = BTreeMap::new();
        for e in TarReader::new(tar) {
            let e = e.unwrap();
            if e.kind == TarKind::Regular && e.size > 0 && !e.name.contains(".wh.") {
                files.insert(
                    normalize_path(&e.name).unwrap(),
                    tar[e.data_offset as usize..(e.data_offset + e.size) as usize].to_vec(),
                );
            }
        }
        let ranges: Vec<FileRange> = files
            .iter()
            .map(|(p, d)| FileRange {
                inode: index.lookup_path(p).unwrap(),
                offset: 0,
                length: d.len() as u64,
            })
            .collect();
        let r = client
            .fetch(FetchRequest {
                layer_digest: a.layer_digest.clone(),
                ranges,
                priority: Priority::OnDemand as i32,
                follow_loads: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.chunks_fetched > 0);
        for (p, d) in &files {
            let ino = index.lookup_path(p).unwrap();
            let content =
                std::fs::read(reader.layer_file_path(&layer_digest(&a.layer_digest), ino)).unwrap();
            assert!(content == *d, "{p}: bytes differ");
        }
        let st = client
            .layer_status(LayerStatusRequest {
                layer_digest: a.layer_digest.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(st.chunks, st.chunks_present);
        assert_eq!(st.image_ref, image_ref);
        resolved.push(a.layer_digest);
    }

    // A plain gzip layer: FAILED_PRECONDITION, so the snapshotter falls back.
    let plain_manifest = OciLayout::open(&src)
        .unwrap()
        .read_json(
            &OciLayout::open(&src)
                .unwrap()
                .resolve(Some("src"))
                .unwrap()
                .digest,
        )
        .unwrap();
    let e = client
        .resolve_layer(ResolveLayerRequest {
            layer: Some(LayerSource {
                image_ref: plain_ref,
                digest: plain_manifest["layers"][1]["digest"]
                    .as_str()
                    .unwrap()
                    .into(),
                annotations: [(
                    stargaze_format::TOC_DIGEST_ANNOTATION.to_string(),
                    format!("sha256:{}", "0".repeat(64)),
                )]
                .into(),
                ..Default::default()
            }),
            allow_unverified: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("not an eStargz"), "{}", e.message());

    let s = client.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(s.layers, 2);
    assert!(s.requests > 0 && s.bytes_fetched > 0);
    assert_eq!(s.verification_failures, 0);

    // Prometheus metrics describe what happened.
    let metrics = scrape(metrics_port);
    for name in [
        "stargaze_fetcher_registry_requests_total{host=",
        "stargaze_fetcher_registry_request_duration_seconds_bucket{",
        "stargaze_fetcher_chunks_fetched_total{layer=",
        "stargaze_fetcher_layer_chunks_present{layer=",
        "stargaze_fetcher_verification_failures_total{layer=",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
    // Where the decode threads' CPU went: chunks were inflated and hashed.
    for stage in ["decompress", "verify", "write"] {
        let series = format!("stargaze_fetcher_decode_cpu_seconds_total{{stage=\"{stage}\"}} ");
        let secs: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{series} missing from:\n{metrics}"));
        assert!(secs > 0.0, "{series}{secs}");
    }

    let status = fetcher.stop();
    assert!(
        status.success(),
        "{status:?}: {}",
        std::fs::read_to_string(work.path().join("fetcher.log")).unwrap()
    );
    assert!(
        fetcher.cache.join("clean").exists(),
        "a clean stop is recorded"
    );
    assert!(!fetcher.socket.exists());

    // Restarted, the fetcher serves the layers it resolved before from
    // their saved sources (fs keeps them attached across the restart),
    // without a ResolveLayer.
    let _restarted = Fetcher::start(work.path(), stargaze_testkit::free_port());
    let mut client = FetcherClient::new(stargaze_proto::connect_unix(&fetcher.socket).unwrap());
    for digest in &resolved {
        let st = client
            .layer_status(LayerStatusRequest {
                layer_digest: digest.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("{digest} not recovered: {e:?}"))
            .into_inner();
        assert_eq!(st.chunks, st.chunks_present, "{digest}");
        assert_eq!(st.image_ref, image_ref, "{digest}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_toc_layers_get_their_toc_from_the_esgztoc_image() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let (tar, files) = image::data_layer(8);
    image::write_layout(&src, "x", "src", std::slice::from_ref(&tar));
    let out = work.path().join("out");
    let opts = ImageConvertOptions {
        layer: stargaze_format::ConvertOptions {
            external_toc: true,
            keep_diff_id: true,
            ..Default::default()
        },
        tmp_dir: None,
    };
    let image_ref = format!("{}/stargaze/ext:ext", reg.addr);
    let manifest = convert(&src, &out, "ext", &opts, &image_ref);
    let desc = &manifest["layers"][0];
    let annotations: std::collections::HashMap<String, String> =
        serde_json::from_value(desc["annotations"].clone()).unwrap();
    let source = LayerSource {
        image_ref: format!("{}/stargaze/ext:ext", reg.addr),
        digest: desc["digest"].as_str().unwrap().into(),
        annotations,
        ..Default::default()
    };
    let fetcher = Fetcher::start(work.path(), stargaze_testkit::free_port());
    let mut client = FetcherClient::new(stargaze_proto::connect_unix(&fetcher.socket).unwrap());
    let req = || ResolveLayerRequest {
        layer: Some(source.clone()),
        allow_unverified: false,
    };
    // Without the TOC image: not lazily pullable, and the message says why.
    let e = client.resolve_layer(req()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("-esgztoc"), "{}", e.message());
    // With it: resolved, verified against toc.digest, files readable.
    skopeo_copy(
        &format!("oci:{}:ext-esgztoc", out.display()),
        &format!("docker://{image_ref}-esgztoc"),
    );
    let r = client.resolve_layer(req()).await.unwrap().into_inner();
    assert!(r.toc_verified);
    let index = LayerIndex::open(Path::new(&r.index_path)).unwrap();
    let (name, data) = files.iter().find(|(_, d)| d.len() > 100_000).unwrap();
    let ino = index.lookup_path(name).unwrap();
    client
        .fetch(FetchRequest {
            layer_digest: r.layer_digest.clone(),
            ranges: vec![FileRange {
                inode: ino,
                offset: 0,
                length: data.len() as u64,
            }],
            priority: Priority::OnDemand as i32,
            follow_loads: false,
        })
        .await
        .unwrap();
    let reader = Cache::open_reader(&fetcher.cache);
    let content =
        std::fs::read(reader.layer_file_path(&layer_digest(index.layer_digest()), ino)).unwrap();
    assert!(content == *data);

    // A malformed layer digest is refused where it enters, naming it,
    // before any lookup or cache path.
    let bad = "sha256:../../../etc".to_string();
    let e = client
        .fetch(FetchRequest {
            layer_digest: bad.clone(),
            ranges: vec![FileRange {
                inode: ino,
                offset: 0,
                length: 1,
            }],
            priority: Priority::OnDemand as i32,
            follow_loads: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains(&bad), "{}", e.message());
    let mut bad_source = source.clone();
    bad_source.digest = bad.clone();
    let e = client
        .resolve_layer(ResolveLayerRequest {
            layer: Some(bad_source),
            allow_unverified: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains(&bad), "{}", e.message());
}

/// A node switching from the Go snapshotter keeps its mirrors: the
/// `[[resolver.host."HOST".mirrors]]` tables of its config file
/// (`[fetcher] stargz_config`) are used unchanged. The image is named by a
/// host that cannot resolve, so only the mirror can serve it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_snapshotter_resolver_mirrors_are_used() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    image::write_layout(&src, "x", "src", &[image::busybox_layer()]);
    let manifest = convert(
        &src,
        &work.path().join("out"),
        "esgz",
        &ImageConvertOptions::default(),
        &format!("{}/stargaze/mirrored:esgz", reg.addr),
    );
    // A Go snapshotter config as operators write it, other keys included.
    let go_config = work.path().join("containerd-stargz-grpc.toml");
    std::fs::write(
        &go_config,
        format!(
            "noprefetch = false\n\n[[resolver.host.\"registry.invalid\".mirrors]]\nhost = \"{}\"\ninsecure = true\n",
            reg.addr
        ),
    )
    .unwrap();
    let fetcher = Fetcher::start_with(
        work.path(),
        stargaze_testkit::free_port(),
        &format!("stargz_config = \"{}\"", go_config.display()),
    );
    let mut client = FetcherClient::new(stargaze_proto::connect_unix(&fetcher.socket).unwrap());
    let desc = &manifest["layers"][0];
    let r = client
        .resolve_layer(ResolveLayerRequest {
            layer: Some(LayerSource {
                image_ref: "registry.invalid/stargaze/mirrored:esgz".into(),
                digest: desc["digest"].as_str().unwrap().into(),
                annotations: serde_json::from_value(desc["annotations"].clone()).unwrap(),
                ..Default::default()
            }),
            allow_unverified: false,
        })
        .await
        .expect("resolved through the mirror")
        .into_inner();
    assert_eq!(r.format, "estargz");
    assert!(r.toc_verified);
}

/// WarmLayers alone resolves every layer of the image (its manifest gives
/// the `toc.digest`s) and prefetches their landmark files, before any
/// ResolveLayer; a later ResolveLayer costs no registry request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warming_resolves_and_prefetches_layers_before_their_prepare() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let (data, files) = image::data_layer(22);
    image::write_layout(&src, "x", "src", &[image::busybox_layer(), data]);
    // Optimized: the data layer's files first, behind a prefetch landmark.
    let opts = ImageConvertOptions {
        layer: stargaze_format::ConvertOptions {
            prioritized_files: Some(files.iter().map(|(n, _)| n.clone()).collect()),
            ..Default::default()
        },
        tmp_dir: None,
    };
    let image_ref = format!("{}/stargaze/warm:esgz", reg.addr);
    let manifest = convert(&src, &work.path().join("out"), "esgz", &opts, &image_ref);
    let descs = manifest["layers"].as_array().unwrap().clone();
    let digests: Vec<String> = descs
        .iter()
        .map(|d| d["digest"].as_str().unwrap().to_string())
        .collect();

    let mut fetcher = Fetcher::start_with(
        work.path(),
        stargaze_testkit::free_port(),
        "background_fetch = false",
    );
    let mut client = FetcherClient::new(stargaze_proto::connect_unix(&fetcher.socket).unwrap());
    let started = client
        .warm_layers(WarmLayersRequest {
            image_ref: image_ref.clone(),
            digests: digests.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .started;
    assert_eq!(started, 2);
    let start = Instant::now();
    loop {
        let s = client.status(StatusRequest {}).await.unwrap().into_inner();
        if s.layers == 2 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "layers not resolved by warming alone: {s:?}\n{}",
            std::fs::read_to_string(work.path().join("fetcher.log")).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The data layer's landmark files arrive without anyone asking.
    let data_digest = &digests[1];
    let start = Instant::now();
    loop {
        let l = client
            .layer_status(LayerStatusRequest {
                layer_digest: data_digest.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if l.prefetch_done {
            assert!(l.file_bytes_present > 5_000_000, "{l:?}");
            assert!(l.last_error.is_empty(), "{l:?}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "prefetch did not finish: {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Resolving now (the Prepare) needs nothing from the registry.
    let before = client
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .requests;
    for d in &descs {
        let annotations: std::collections::HashMap<String, String> =
            serde_json::from_value(d["annotations"].clone()).unwrap();
        client
            .resolve_layer(ResolveLayerRequest {
                layer: Some(LayerSource {
                    image_ref: image_ref.clone(),
                    digest: d["digest"].as_str().unwrap().into(),
                    annotations,
                    ..Default::default()
                }),
                allow_unverified: false,
            })
            .await
            .unwrap();
    }
    let after = client
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .requests;
    assert_eq!(
        before, after,
        "resolving a warmed layer went to the registry"
    );
    assert!(fetcher.stop().success());
}

/// A tar entry for `tar_of`: a file from this machine, a symlink, or a
/// directory.
enum Entry {
    Host(&'static str, &'static str),
    /// A regular file with these bytes.
    Data(&'static str, &'static [u8]),
    Link(&'static str, &'static str),
    Dir(&'static str),
}

fn tar_of(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_ustar();
        h.set_mtime(1_600_000_000);
        match e {
            Entry::Host(name, host) => {
                let bytes = std::fs::read(host).unwrap_or_else(|e| panic!("{host}: {e}"));
                h.set_mode(0o755);
                h.set_size(bytes.len() as u64);
                b.append_data(&mut h, name, &bytes[..]).unwrap();
            }
            Entry::Data(name, bytes) => {
                h.set_mode(0o644);
                h.set_size(bytes.len() as u64);
                b.append_data(&mut h, name, *bytes).unwrap();
            }
            Entry::Link(name, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, name, target).unwrap();
            }
            Entry::Dir(name) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, name, &[][..]).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// What a layer has present in the cache, in file bytes (0 until it is
/// resolved).
async fn present_bytes(client: &mut FetcherClient<tonic::transport::Channel>, digest: &str) -> u64 {
    client
        .layer_status(LayerStatusRequest {
            layer_digest: digest.to_string(),
        })
        .await
        .map(|r| r.into_inner().file_bytes_present)
        .unwrap_or(0)
}

/// The warming tests build images from this machine's own ELF files (CI's
/// machine is x86_64 Debian): without them they must fail, not pass.
fn require_debian_x86_64_libraries(paths: &[&str]) {
    stargaze_testkit::require_that(
        cfg!(target_arch = "x86_64"),
        "an x86_64 machine (the images are built from its Debian libraries)",
        "run the tests on x86_64 Debian, as CI does",
    );
    for p in paths {
        stargaze_testkit::require_file(
            p,
            "install Debian's libc6 and libstdc++6 (`apt-get install libc6 libstdc++6`)",
        );
    }
}

const LIBC: &str = "/usr/lib/x86_64-linux-gnu/libc.so.6";
const LOADER: &str = "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2";
const DECOY: &str = "/usr/lib/x86_64-linux-gnu/libstdc++.so.6";

/// An image of this machine's dash on Debian's merged /usr: the lower
/// layer has /bin, /lib64 as symlinks, the loader a symlink in /usr/lib64,
/// and a library nobody loads beside the ones dash needs; the upper layer
/// has dash, reached as /bin/sh (the config's Cmd) through the lower
/// layer's /bin and a relative link. Returns its reference and its layer
/// digests, bottom first.
fn dash_image(reg: &Registry, work: &Path, repo: &str) -> (String, Vec<String>) {
    require_debian_x86_64_libraries(&[LIBC, LOADER, DECOY]);
    let src = work.join("src");
    let lower = tar_of(&[
        Entry::Link("bin", "usr/bin"),
        Entry::Link("lib", "usr/lib"),
        Entry::Link("lib64", "usr/lib64"),
        Entry::Dir("usr/"),
        Entry::Dir("usr/bin/"),
        Entry::Dir("usr/lib/"),
        Entry::Dir("usr/lib/x86_64-linux-gnu/"),
        Entry::Dir("usr/lib64/"),
        Entry::Host("usr/lib/x86_64-linux-gnu/libc.so.6", LIBC),
        Entry::Host("usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", LOADER),
        Entry::Host("usr/lib/x86_64-linux-gnu/libstdc++.so.6", DECOY),
        Entry::Link(
            "usr/lib64/ld-linux-x86-64.so.2",
            "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        ),
    ]);
    let upper = tar_of(&[
        Entry::Dir("usr/"),
        Entry::Dir("usr/bin/"),
        Entry::Host("usr/bin/dash", "/usr/bin/dash"),
        Entry::Link("usr/bin/sh", "dash"),
        Entry::Data("usr/bin/notes.txt", b"not a program\n"),
    ]);
    image::write_layout(&src, "x", "src", &[lower, upper]);
    let image_ref = format!("{}/stargaze/{repo}:esgz", reg.addr);
    let manifest = convert(
        &src,
        &work.join("out"),
        "esgz",
        &ImageConvertOptions::default(),
        &image_ref,
    );
    let digests: Vec<String> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["digest"].as_str().unwrap().to_string())
        .collect();
    (image_ref, digests)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warming_prefetches_the_entrypoint_its_loader_and_its_libraries_only() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let (image_ref, digests) = dash_image(&reg, work.path(), "entry");

    let metrics_port = stargaze_testkit::free_port();
    let mut fetcher = Fetcher::start_with(work.path(), metrics_port, "background_fetch = false");
    let mut client = FetcherClient::new(stargaze_proto::connect_unix(&fetcher.socket).unwrap());
    client
        .warm_layers(WarmLayersRequest {
            image_ref: image_ref.clone(),
            digests: digests.clone(),
        })
        .await
        .unwrap();
    let size = |p: &str| std::fs::metadata(p).unwrap().len();
    let want_lower = size(LIBC) + size(LOADER);
    let want_upper = size("/usr/bin/dash");
    let start = Instant::now();
    loop {
        let lower = present_bytes(&mut client, &digests[0]).await;
        let upper = present_bytes(&mut client, &digests[1]).await;
        if lower >= want_lower && upper >= want_upper {
            // Exactly those files: the unused library was left alone.
            assert_eq!((lower, upper), (want_lower, want_upper));
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "entrypoint chain not prefetched: {lower}/{want_lower} {upper}/{want_upper}\n{}",
            std::fs::read_to_string(work.path().join("fetcher.log")).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The cached bytes are the files' own.
    let cache = Cache::open_reader(&fetcher.cache);
    for (layer, path, host) in [
        (&digests[0], "usr/lib/x86_64-linux-gnu/libc.so.6", LIBC),
        (&digests[1], "usr/bin/dash", "/usr/bin/dash"),
    ] {
        let index = LayerIndex::open(&cache.index_path(&layer_digest(layer))).unwrap();
        let ino = index.lookup_path(path).unwrap();
        let cached = std::fs::read(cache.layer_file_path(&layer_digest(layer), ino)).unwrap();
        assert!(cached == std::fs::read(host).unwrap(), "{path} differs");
    }
    scrape_until(metrics_port, "stargaze_fetcher_entrypoint_files_total 3");
    assert!(fetcher.stop().success());
}

/// A program not in the config, executed by a container (fs passes on
/// execve's open flag): the fetcher fetches its loader and libraries at
/// once, from the layer below, in the container's stack (from
/// PauseBackground); a program only read, or a data file, fetches nothing
/// more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executed_program_fetches_what_it_loads_from_the_stack() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let (image_ref, digests) = dash_image(&reg, work.path(), "loads");
    let metrics_port = stargaze_testkit::free_port();
    let mut fetcher = Fetcher::start_with(
        work.path(),
        metrics_port,
        "background_fetch = false\nprefetch_entrypoint = false",
    );
    let mut client = FetcherClient::new(stargaze_proto::connect_unix(&fetcher.socket).unwrap());
    // Resolved from the manifest (the entrypoint prefetch is off).
    warm_and_resolve(&mut client, &image_ref, &digests).await;
    client
        .pause_background(PauseBackgroundRequest {
            key: "c1".into(),
            layers: digests.iter().rev().cloned().collect(),
        })
        .await
        .unwrap();
    let cache = Cache::open_reader(&fetcher.cache);
    let upper = LayerIndex::open(&cache.index_path(&layer_digest(&digests[1]))).unwrap();
    let first_read = |path: &str, executed: bool| FetchRequest {
        layer_digest: digests[1].clone(),
        ranges: vec![FileRange {
            inode: upper.lookup_path(path).unwrap(),
            offset: 0,
            length: 4096,
        }],
        priority: Priority::OnDemand as i32,
        follow_loads: executed,
    };
    // Read, not executed (`file`, a checksum): nothing more. Executed but
    // not a program: nothing more either.
    for (path, executed) in [("/usr/bin/dash", false), ("/usr/bin/notes.txt", true)] {
        client.fetch(first_read(path, executed)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        present_bytes(&mut client, &digests[0]).await,
        0,
        "what dash loads is fetched only when it is executed"
    );

    client
        .fetch(first_read("/usr/bin/dash", true))
        .await
        .unwrap();
    let size = |p: &str| std::fs::metadata(p).unwrap().len();
    let want = size(LIBC) + size(LOADER);
    let start = Instant::now();
    loop {
        let lower = present_bytes(&mut client, &digests[0]).await;
        if lower >= want {
            assert_eq!(lower, want, "only the loader and libc, not the decoy");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "what dash loads was not fetched: {lower}/{want}\n{}",
            std::fs::read_to_string(work.path().join("fetcher.log")).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    scrape_until(metrics_port, "stargaze_fetcher_loads_files_total 2");
    assert!(fetcher.stop().success());
}

/// Is the chunk at `offset` of `path` in layer `layer` present in the
/// cache at `root`?
fn chunk_present(root: &Path, layer: &str, path: &str, offset: u64) -> bool {
    let cache = Cache::open_reader(root);
    let index = LayerIndex::open(&cache.index_path(&layer_digest(layer))).unwrap();
    let presence =
        stargaze_cache::PresenceMap::open_ro(&cache.presence_path(&layer_digest(layer))).unwrap();
    let node = index.inode(index.lookup_path(path).unwrap()).unwrap();
    let chunk = node.chunk_at(offset).unwrap();
    presence.is_present(chunk.global)
}

/// Warm an image and wait until its layers are resolved.
async fn warm_and_resolve(
    client: &mut FetcherClient<tonic::transport::Channel>,
    image_ref: &str,
    digests: &[String],
) {
    client
        .warm_layers(WarmLayersRequest {
            image_ref: image_ref.to_string(),
            digests: digests.to_vec(),
        })
        .await
        .unwrap();
    let start = Instant::now();
    for d in digests {
        while client
            .layer_status(LayerStatusRequest {
                layer_digest: d.clone(),
            })
            .await
            .is_err()
        {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{d} not resolved"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The first cold pull's reads are recorded (in order, by layer and path)
/// into the cache's trace of the image; on a node with an empty cache and
/// that trace, the next cold pull fetches those ranges with nothing read
/// yet; a corrupted or foreign trace is logged with its file and ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learned_trace_is_fetched_first_on_the_next_cold_pull() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let (image_ref, digests) = dash_image(&reg, work.path(), "trace");
    // Only what reads ask for, so the trace holds exactly those reads.
    let quiet = "background_fetch = false\nprefetch_entrypoint = false\nprefetch_loads = false\ntrace_window = \"1s\"";
    let first = work.path().join("first");
    std::fs::create_dir_all(&first).unwrap();
    let mut fetcher = Fetcher::start_with(&first, stargaze_testkit::free_port(), quiet);
    let mut client = FetcherClient::new(stargaze_proto::connect_unix(&fetcher.socket).unwrap());
    warm_and_resolve(&mut client, &image_ref, &digests).await;
    let cache = Cache::open_reader(&fetcher.cache);
    let lower = LayerIndex::open(&cache.index_path(&layer_digest(&digests[0]))).unwrap();
    let upper = LayerIndex::open(&cache.index_path(&layer_digest(&digests[1]))).unwrap();
    let reads = [
        (1usize, "/usr/bin/dash", 0u64, 4096u64),
        (0, "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", 0, 8192),
        (0, "/usr/lib/x86_64-linux-gnu/libc.so.6", 65536, 4096),
    ];
    for (layer, path, offset, length) in reads {
        let index = if layer == 0 { &lower } else { &upper };
        let inode = index.lookup_path(path).unwrap();
        read_as_fs(&mut client, &digests[layer], inode, offset, length).await;
    }
    let (path, trace) = saved_trace(&fetcher.cache).await;
    assert_eq!(trace.layers, digests);
    assert_eq!(trace.image, image_ref);
    let got: Vec<(usize, &str, u64, u64)> = trace
        .reads
        .iter()
        .map(|r| (r.layer as usize, r.path.as_str(), r.offset, r.length))
        .collect();
    assert_eq!(got, reads, "the reads, in the order they were made");
    // Beside the reads, where their chunks lie in the layer blobs.
    for (layer, path, offset, _) in reads {
        let index = if layer == 0 { &lower } else { &upper };
        let node = index.inode(index.lookup_path(path).unwrap()).unwrap();
        let c = node.chunk_at(offset).unwrap();
        assert!(
            trace.spans.iter().any(|s| s.layer as usize == layer
                && s.start <= c.compressed_offset
                && c.compressed_end <= s.end),
            "no span holds {path} at {offset}: {:?}",
            trace.spans
        );
    }
    assert!(fetcher.stop().success());

    // A node with the trace and nothing else: the pull alone fetches the
    // traced ranges (the whole small files, the chunk of libc).
    let second = work.path().join("second");
    std::fs::create_dir_all(second.join("cache/traces")).unwrap();
    let name = path.file_name().unwrap();
    std::fs::copy(&path, second.join("cache/traces").join(name)).unwrap();
    let mut fetcher = Fetcher::start_with(&second, stargaze_testkit::free_port(), quiet);
    let mut client = FetcherClient::new(stargaze_proto::connect_unix(&fetcher.socket).unwrap());
    warm_and_resolve(&mut client, &image_ref, &digests).await;
    let present = |root: &Path, layer: usize, path: &str, offset: u64| {
        chunk_present(root, &digests[layer], path, offset)
    };
    let start = Instant::now();
    while !reads
        .iter()
        .all(|&(l, p, o, _)| present(&fetcher.cache, l, p, o))
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the trace was not replayed:\n{}",
            std::fs::read_to_string(second.join("fetcher.log")).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Its spans were read before the layers resolved and handed to them
    // when they did: arrived (stored at once) or still on the wire
    // (claimed, stored when they come; on a local registry they race).
    let log = std::fs::read_to_string(second.join("fetcher.log")).unwrap();
    assert!(
        log.lines().any(|l| l.contains("stored what was read early")
            && !(l.contains(" spans=0 ") && l.contains(" on_wire=0"))),
        "nothing read early was handed to a layer:\n{log}"
    );
    assert!(fetcher.stop().success());

    // Corrupted, then another image's: ignored with one warning naming the
    // file; the pull goes on.
    for (n, bytes) in [
        ("corrupt", b"{not json".to_vec()),
        ("foreign", {
            let mut t = trace.clone();
            t.layers = vec!["sha256:0000".into(); t.layers.len()];
            serde_json::to_vec(&t).unwrap()
        }),
    ] {
        let dir = work.path().join(n);
        std::fs::create_dir_all(dir.join("cache/traces")).unwrap();
        std::fs::write(dir.join("cache/traces").join(name), bytes).unwrap();
        let mut fetcher = Fetcher::start_with(&dir, stargaze_testkit::free_port(), quiet);
        let mut client = FetcherClient::new(stargaze_proto::connect_unix(&fetcher.socket).unwrap());
        warm_and_resolve(&mut client, &image_ref, &digests).await;
        let log = std::fs::read_to_string(dir.join("fetcher.log")).unwrap();
        let warned: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("trace ignored"))
            .collect();
        assert_eq!(warned.len(), 1, "{n}: {log}");
        assert!(
            warned[0].contains(&name.to_string_lossy().to_string()),
            "{n}: {}",
            warned[0]
        );
        assert!(
            !present(
                &fetcher.cache,
                0,
                "/usr/lib/x86_64-linux-gnu/libc.so.6",
                65536
            ),
            "{n}: an ignored trace fetched nothing"
        );
        assert!(fetcher.stop().success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_container_pauses_background_fetches() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    image::write_layout(&src, "x", "src", &[image::data_layer(23).0]);
    let image_ref = format!("{}/stargaze/pause:esgz", reg.addr);
    let manifest = convert(
        &src,
        &work.path().join("out"),
        "esgz",
        &ImageConvertOptions::default(),
        &image_ref,
    );
    let desc = &manifest["layers"][0];
    // No quiet period to wait for otherwise: without a pause the background
    // fetch starts right after the prefetch (of nothing: no landmark).
    let mut fetcher = Fetcher::start_with(
        work.path(),
        stargaze_testkit::free_port(),
        "background_fetch = true\nbackground_silence = \"3s\"\nbackground_max_wait = \"0s\"\nprefetch_entrypoint = false",
    );
    let mut client = FetcherClient::new(stargaze_proto::connect_unix(&fetcher.socket).unwrap());
    client
        .pause_background(PauseBackgroundRequest {
            key: "c1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let paused_at = Instant::now();
    let digest = desc["digest"].as_str().unwrap().to_string();
    client
        .resolve_layer(ResolveLayerRequest {
            layer: Some(LayerSource {
                image_ref: image_ref.clone(),
                digest: digest.clone(),
                annotations: serde_json::from_value(desc["annotations"].clone()).unwrap(),
                ..Default::default()
            }),
            allow_unverified: false,
        })
        .await
        .unwrap();
    client
        .prefetch(PrefetchRequest {
            layer_digest: digest.clone(),
            prefetch_size: 0,
            wait: true,
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = present_bytes(&mut client, &digest).await;
    // (A machine so slow that the pause is over by now proves nothing.)
    if paused_at.elapsed() < Duration::from_millis(2500) {
        assert_eq!(during, 0, "background fetch ran during the pause");
    }
    // After the pause it fetches the whole layer.
    let start = Instant::now();
    loop {
        let l = client
            .layer_status(LayerStatusRequest {
                layer_digest: digest.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if l.file_bytes_present == l.file_bytes {
            assert!(paused_at.elapsed() >= Duration::from_secs(3));
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "background fetch did not resume: {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(fetcher.stop().success());
}

/// A layer already resolved for one manifest is checked against every
/// later request's labels: another manifest naming the same blob with
/// another `toc.digest`, or with none (where unverified layers are not
/// allowed), is refused, while the first manifest's requests still succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_checked_against_its_own_toc_digest() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    image::write_layout(
        &src,
        "x",
        "src",
        &[image::busybox_layer(), image::data_layer(5).0],
    );
    let image_ref = format!("{}/stargaze/tocs:esgz", reg.addr);
    let manifest = convert(
        &src,
        &work.path().join("out"),
        "esgz",
        &ImageConvertOptions::default(),
        &image_ref,
    );
    let layer = |i: usize| {
        manifest["layers"][i]["digest"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let toc = |i: usize| {
        manifest["layers"][i]["annotations"][stargaze_format::TOC_DIGEST_ANNOTATION]
            .as_str()
            .unwrap()
            .to_string()
    };
    let fetcher = Fetcher::start(work.path(), stargaze_testkit::free_port());
    let mut client = FetcherClient::new(stargaze_proto::connect_unix(&fetcher.socket).unwrap());
    let resolve = |labels: Vec<(&'static str, String)>, allow_unverified: bool| {
        let mut client = client.clone();
        let (image_ref, digest) = (image_ref.clone(), layer(1));
        async move {
            client
                .resolve_layer(ResolveLayerRequest {
                    layer: Some(LayerSource {
                        image_ref,
                        digest,
                        annotations: labels
                            .into_iter()
                            .map(|(k, v)| (k.to_string(), v))
                            .collect(),
                        ..Default::default()
                    }),
                    allow_unverified,
                })
                .await
        }
    };
    let toc_label = stargaze_format::TOC_DIGEST_ANNOTATION;
    let skip_verify = "containerd.io/snapshot/remote/stargz.skipverify";

    // The first manifest: resolved and verified.
    let r = resolve(vec![(toc_label, toc(1))], false)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.toc_digest, toc(1));
    // Another manifest names the same blob with the other layer's TOC
    // digest: refused, naming the layer and both digests.
    let e = resolve(vec![(toc_label, toc(0))], false)
        .await
        .expect_err("a resolved layer was served for a manifest naming another TOC");
    for part in [layer(1), toc(0), toc(1)] {
        assert!(
            e.message().contains(&part),
            "{part} not in: {}",
            e.message()
        );
    }
    // No digest at all: refused unless unverified layers are allowed and
    // the request carries the skipverify label.
    let e = resolve(vec![], false)
        .await
        .expect_err("a resolved layer was served for a manifest without toc.digest");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains(&layer(1)), "{}", e.message());
    assert!(resolve(vec![], true).await.is_err(), "no skipverify label");
    resolve(vec![(skip_verify, String::new())], true)
        .await
        .unwrap();
    // The first manifest's requests are served as before, and so are its reads.
    let r = resolve(vec![(toc_label, toc(1))], false)
        .await
        .unwrap()
        .into_inner();
    let index = LayerIndex::open(Path::new(&r.index_path)).unwrap();
    let (ino, size) = (1..=index.inode_count())
        .filter_map(|i| index.inode(i).map(|n| (i, n)))
        .find(|(_, n)| n.is_reg() && n.size() > 0)
        .map(|(i, n)| (i, n.size()))
        .unwrap();
    client
        .fetch(FetchRequest {
            layer_digest: layer(1),
            ranges: vec![FileRange {
                inode: ino,
                offset: 0,
                length: size,
            }],
            priority: Priority::OnDemand as i32,
            follow_loads: false,
        })
        .await
        .unwrap();
}

/// The trace files in a cache's `traces/` (beside them: `tails/`).
fn trace_files(traces: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(traces)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect()
        })
        .unwrap_or_default()
}

/// The first trace the fetcher saves in its cache (its file and what it
/// holds), waited for up to 20 s.
async fn saved_trace(cache: &Path) -> (std::path::PathBuf, stargaze_cache::Trace) {
    let traces = cache.join("traces");
    let start = Instant::now();
    let path = loop {
        if let Some(p) = trace_files(&traces).pop() {
            break p;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no trace saved");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let trace = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    (path, trace)
}

/// A read as fs makes it: the bytes fetched on demand, then the read
/// reported for traces (`NoteReads`; fs reports hits too).
async fn read_as_fs(
    client: &mut FetcherClient<tonic::transport::Channel>,
    layer: &str,
    inode: u64,
    offset: u64,
    length: u64,
) {
    let range = FileRange {
        inode,
        offset,
        length,
    };
    client
        .fetch(FetchRequest {
            layer_digest: layer.to_string(),
            ranges: vec![range],
            priority: Priority::OnDemand as i32,
            follow_loads: false,
        })
        .await
        .unwrap();
    client
        .note_reads(NoteReadsRequest {
            layer_digest: layer.to_string(),
            ranges: vec![range],
        })
        .await
        .unwrap();
}

/// With `publish_traces`, a node pushes the trace it learned to the
/// image's repository (tag `sha256-<hex>.stargaze-trace`); another node
/// with an empty cache replays it on its first pull and keeps it. A
/// published trace of other layers is ignored with one warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_trace_helps_another_nodes_first_pull() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let (image_ref, digests) = dash_image(&reg, work.path(), "shared-trace");
    let quiet = "background_fetch = false\nprefetch_entrypoint = false\nprefetch_loads = false\ntrace_window = \"1s\"";
    let node = |name: &str| {
        let dir = work.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    };
    let (a, b, c) = (node("a"), node("b"), node("c"));
    let mut fetcher = Fetcher::start_with(
        &a,
        stargaze_testkit::free_port(),
        &format!("{quiet}\npublish_traces = true"),
    );
    let mut client = FetcherClient::new(stargaze_proto::connect_unix(&fetcher.socket).unwrap());
    warm_and_resolve(&mut client, &image_ref, &digests).await;
    let libc = "/usr/lib/x86_64-linux-gnu/libc.so.6";
    let lower = LayerIndex::open(
        &Cache::open_reader(&fetcher.cache).index_path(&layer_digest(&digests[0])),
    )
    .unwrap();
    let inode = lower.lookup_path(libc).unwrap();
    read_as_fs(&mut client, &digests[0], inode, 65536, 4096).await;
    let start = Instant::now();
    while !std::fs::read_to_string(a.join("fetcher.log"))
        .unwrap()
        .contains("access trace published")
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "not published:\n{}",
            std::fs::read_to_string(a.join("fetcher.log")).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(fetcher.stop().success());
    let local = trace_files(&a.join("cache/traces")).pop().unwrap();
    let trace: stargaze_cache::Trace =
        serde_json::from_slice(&std::fs::read(&local).unwrap()).unwrap();

    // Node b: nothing in its cache; the registry's trace is replayed.
    let mut fetcher = Fetcher::start_with(&b, stargaze_testkit::free_port(), quiet);
    let mut client = FetcherClient::new(stargaze_proto::connect_unix(&fetcher.socket).unwrap());
    warm_and_resolve(&mut client, &image_ref, &digests).await;
    let start = Instant::now();
    while !chunk_present(&fetcher.cache, &digests[0], libc, 65536) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the published trace was not replayed:\n{}",
            std::fs::read_to_string(b.join("fetcher.log")).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        b.join("cache/traces")
            .join(local.file_name().unwrap())
            .exists(),
        "kept in the cache"
    );
    assert!(fetcher.stop().success());

    // A trace of other layers published under the image's tag: ignored.
    let registry = stargaze_registry::Client::new(
        stargaze_registry::Hosts::new(),
        stargaze_registry::DockerConfig::in_dir(work.path()),
        stargaze_registry::ClientOptions::default(),
    );
    let mut forged = trace.clone();
    forged.layers = vec![format!("sha256:{}", "00".repeat(32)); forged.layers.len()];
    stargaze_fetcher::traces::registry::publish(
        &registry,
        &forged,
        "application/vnd.oci.image.manifest.v1+json",
        1,
    )
    .await
    .unwrap();
    let mut fetcher = Fetcher::start_with(&c, stargaze_testkit::free_port(), quiet);
    let mut client = FetcherClient::new(stargaze_proto::connect_unix(&fetcher.socket).unwrap());
    warm_and_resolve(&mut client, &image_ref, &digests).await;
    let start = Instant::now();
    let log = loop {
        let log = std::fs::read_to_string(c.join("fetcher.log")).unwrap();
        if log.contains("published trace ignored") {
            break log;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no warning:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("trace ignored"))
        .collect();
    assert_eq!(warned.len(), 1, "{log}");
    assert!(warned[0].contains("not of this image"), "{}", warned[0]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!chunk_present(&fetcher.cache, &digests[0], libc, 65536));
    assert!(
        !c.join("cache/traces")
            .join(local.file_name().unwrap())
            .exists()
    );
    assert!(fetcher.stop().success());
}

/// A clean stop saves what the open recordings learned, however long
/// their window still had to run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_saves_the_open_trace_recordings() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let (mut fetcher, mut client, _, digests, dash) =
        traced_dash(&reg, work.path(), "trace-stop", NO_PREFETCH_LONG_TRACE).await;
    read_as_fs(&mut client, &digests[1], dash, 0, 4096).await;
    let traces = fetcher.cache.join("traces");
    assert!(trace_files(&traces).is_empty());
    assert!(fetcher.stop().success());
    let saved = trace_files(&traces).pop().expect("saved at stop");
    let trace: stargaze_cache::Trace =
        serde_json::from_slice(&std::fs::read(saved).unwrap()).unwrap();
    assert_eq!(trace.reads.len(), 1);
    assert_eq!(trace.reads[0].path, "/usr/bin/dash");
}

/// A trace holds what was read, not what a prefetch guessed would be: the
/// libraries the dependency prefetch fetched for an executed program stay
/// out of it until something reads them (fs reports reads, `NoteReads`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_holds_what_was_read_not_what_was_prefetched() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let (mut fetcher, mut client, _, digests, dash) = traced_dash(
        &reg,
        work.path(),
        "trace-prefetched",
        "background_fetch = false\nprefetch_entrypoint = false\ntrace_window = \"2s\"",
    )
    .await;
    // Executed: what dash loads (the loader, libc) is fetched with it.
    client
        .fetch(FetchRequest {
            layer_digest: digests[1].clone(),
            ranges: vec![FileRange {
                inode: dash,
                offset: 0,
                length: 4096,
            }],
            priority: Priority::OnDemand as i32,
            follow_loads: true,
        })
        .await
        .unwrap();
    client
        .note_reads(NoteReadsRequest {
            layer_digest: digests[1].clone(),
            ranges: vec![FileRange {
                inode: dash,
                offset: 0,
                length: 4096,
            }],
        })
        .await
        .unwrap();
    let lower = LayerIndex::open(
        &Cache::open_reader(&fetcher.cache).index_path(&layer_digest(&digests[0])),
    )
    .unwrap();
    let libc = lower
        .lookup_path("/usr/lib/x86_64-linux-gnu/libc.so.6")
        .unwrap();
    let start = Instant::now();
    while present_bytes(&mut client, &digests[0]).await == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "libc {libc} was not prefetched"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, trace) = saved_trace(&fetcher.cache).await;
    let got: Vec<(u32, &str)> = trace
        .reads
        .iter()
        .map(|r| (r.layer, r.path.as_str()))
        .collect();
    assert_eq!(got, [(1, "/usr/bin/dash")], "only the read is traced");
    assert!(fetcher.stop().success());
}

/// `ImageTrace` (what `stargaze optimize` asks) waits for fs's reports
/// made after it was called: a read fs still held in its queue (it sends
/// the queue every 100 ms) is in the trace it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_trace_waits_for_the_reads_fs_still_holds() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let (_fetcher, mut client, image_ref, digests, dash) =
        traced_dash(&reg, work.path(), "trace-late", NO_PREFETCH_LONG_TRACE).await;
    // The read reaches the fetcher only after ImageTrace was asked, as
    // fs's next flush would bring it, followed by the flush after it.
    let mut late = client.clone();
    let layer = digests[1].clone();
    let fs = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        read_as_fs(&mut late, &layer, dash, 0, 4096).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        late.note_reads(NoteReadsRequest {
            layer_digest: String::new(),
            ranges: Vec::new(),
        })
        .await
        .unwrap();
    });
    let trace = client
        .image_trace(ImageTraceRequest {
            image_ref: image_ref.clone(),
        })
        .await
        .map(|r| r.into_inner());
    fs.await.unwrap();
    let trace = trace.expect("a trace of the image");
    assert!(
        trace.reads.iter().any(|r| r.path == "/usr/bin/dash"),
        "the read fs reported after the question is missing: {:?}",
        trace.reads
    );
}

/// Traces recorded for an hour, nothing prefetched: a trace holds exactly
/// the test's reads.
const NO_PREFETCH_LONG_TRACE: &str = "background_fetch = false\nprefetch_entrypoint = false\nprefetch_loads = false\ntrace_window = \"1h\"";

/// A fetcher with `config` and a client, the dash image (pushed to `reg`
/// as `repo`) warmed and resolved: its reference, layer digests, and the
/// inode of `/usr/bin/dash` in its upper layer.
async fn traced_dash(
    reg: &Registry,
    work: &Path,
    repo: &str,
    config: &str,
) -> (
    Fetcher,
    FetcherClient<tonic::transport::Channel>,
    String,
    Vec<String>,
    u64,
) {
    let (image_ref, digests) = dash_image(reg, work, repo);
    let fetcher = Fetcher::start_with(work, stargaze_testkit::free_port(), config);
    let mut client = FetcherClient::new(stargaze_proto::connect_unix(&fetcher.socket).unwrap());
    warm_and_resolve(&mut client, &image_ref, &digests).await;
    let upper = LayerIndex::open(
        &Cache::open_reader(&fetcher.cache).index_path(&layer_digest(&digests[1])),
    )
    .unwrap();
    let dash = upper.lookup_path("/usr/bin/dash").unwrap();
    (fetcher, client, image_ref, digests, dash)
}

/// A layer digest a test has as text (from a response or a manifest).
fn layer_digest(s: &str) -> stargaze_format::Digest {
    s.parse().expect("a layer digest")
}
