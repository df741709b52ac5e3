//! Kubernetes pull secrets end to end, with the real components: Debian's
//! containerd 1.6 with its CRI plugin (snapshotter = stargaze), our three
//! services with `[cri_keychain]` on, and a private Debian docker-registry,
//! once behind htpasswd (over TLS, its CA trusted by containerd and the
//! fetcher) and once with `auth: token` and our token server. Images are
//! pulled as the kubelet pulls them: `PullImage` with `auth`, through the
//! snapshotter's CRI ImageService proxy.
//!
//! * Pulled from containerd's CRI directly, the fetcher never sees the
//!   secret and the layer falls back to a full download (the bug this
//!   fixes); pulled through the proxy, the layer is mounted lazily and no
//!   layer blob reaches containerd's content store.
//! * A pull through the proxy without auth fails.
//! * A fetcher killed and started again gets the credentials back from
//!   the snapshotter within seconds.
//! * After `credential_ttl` the credentials are gone: the status says so
//!   and the fetcher can no longer resolve another layer of the repository.
//! * Neither the password nor its base64 form appears in any log or file
//!   the services, containerd or the fetcher's cache wrote.
//!
//! Needs root, /dev/fuse and the Debian packages `make deps` installs.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use stargaze_proto::cri::image_service_client::ImageServiceClient;
use stargaze_proto::cri::{
    AuthConfig, ImageFsInfoRequest, ImageSpec, ImageStatusRequest, ListImagesRequest,
    RemoveImageRequest,
};
use stargaze_proto::v1::fetcher_client::FetcherClient;
use stargaze_proto::v1::snapshotter_client::SnapshotterClient;
use stargaze_proto::v1::{LayerSource, ResolveLayerRequest, SnapshotterStatusRequest};
use stargaze_testkit::stack::{Service, Stack, workspace_bin};
use stargaze_testkit::token::TokenRegistry;
use stargaze_testkit::{Containerd, Registry, free_port, image, require, run};

mod common;

use common::{Node, convert_to_esgz, cri_pull_request, needs, work_dir};

const USER: &str = "kubelet";
/// Credentials expire this long after the pull that gave them: long
/// enough for the layer's background fetch to finish on a loaded CI
/// machine (it needs them), short enough to wait for.
const TTL: Duration = Duration::from_secs(12);

/// A private registry and what the fetcher and containerd need to reach it.
struct Private {
    host: String,
    password: String,
    /// What the kubelet sends in `PullImage`.
    auth: AuthConfig,
    /// What must never be written: the password, its base64 form, tokens.
    secrets: Vec<String>,
    /// The CA of a TLS registry.
    ca: Option<PathBuf>,
    _registry: Box<dyn std::any::Any>,
}

fn secret() -> String {
    format!("pw-{:016x}", fastrand::u64(..))
}

fn htpasswd_registry() -> Private {
    require("openssl");
    let password = secret();
    let (registry, ca) = Registry::start_tls_auth(USER, &password);
    // docker's base64 form, as a dockerconfigjson pull secret has it.
    let auth = AuthConfig {
        auth: base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{password}")),
        ..Default::default()
    };
    Private {
        host: registry.addr.clone(),
        secrets: vec![password.clone(), auth.auth.clone()],
        auth,
        password,
        ca: Some(ca),
        _registry: Box::new(registry),
    }
}

/// `identity`: the kubelet sends an identity token (an OAuth2 refresh
/// token the token server accepts) instead of the password.
fn token_registry(identity: bool) -> Private {
    let password = secret();
    let t = TokenRegistry::start(USER, &password, 300);
    let auth = if identity {
        AuthConfig {
            identity_token: t.refresh_token.clone(),
            ..Default::default()
        }
    } else {
        AuthConfig {
            username: USER.into(),
            password: password.clone(),
            ..Default::default()
        }
    };
    Private {
        host: t.registry.addr.clone(),
        secrets: vec![
            password.clone(),
            base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{password}")),
            t.refresh_token.clone(),
        ],
        auth,
        password,
        ca: None,
        _registry: Box::new(t),
    }
}

impl Private {
    fn scheme(&self) -> &str {
        if self.ca.is_some() { "https" } else { "http" }
    }

    /// `hosts.toml` for this registry in a `certs.d` directory: the
    /// fetcher's `[fetcher] hosts_dir`, one endpoint (the registry itself,
    /// so that an error is its answer), or containerd's CRI `config_path`
    /// (containerd 1.6 rejects a file without a `[host]` table).
    fn write_hosts_toml(&self, certs_d: &Path, containerd: bool) {
        let dir = certs_d.join(&self.host);
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("{}://{}", self.scheme(), self.host);
        let ca = match &self.ca {
            Some(ca) => format!("ca = \"{}\"\n", ca.display()),
            None => String::new(),
        };
        let text = if containerd {
            format!("[host.\"{url}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  {ca}")
        } else {
            format!("server = \"{url}\"\n{ca}")
        };
        std::fs::write(dir.join("hosts.toml"), text).unwrap();
    }

    /// A one-layer eStargz image (its files made from `seed`) pushed as
    /// `repo:tag` with the credentials; its layer's descriptor.
    fn push(&self, work: &Path, seed: u32, repo_tag: &str) -> Layer {
        let src = work.join(format!("src-{seed}"));
        let (data, _) = image::data_layer(seed);
        image::write_layout(&src, "stargaze.test/cri:src", "src", &[data]);
        let out = work.join(format!("out-{seed}"));
        convert_to_esgz(&src, &out);
        run(Command::new("skopeo")
            .args(["--insecure-policy", "copy", "--dest-tls-verify=false"])
            .arg("--dest-creds")
            .arg(format!("{USER}:{}", self.password))
            .arg(format!("oci:{}:esgz", out.display()))
            .arg(format!("docker://{}/{repo_tag}", self.host)));
        layer_of(&out)
    }

    /// The kubelet's `server_address` is a URL (containerd 1.6 parses it
    /// as one); left empty it means "the image's registry".
    fn auth(&self) -> AuthConfig {
        self.auth.clone()
    }
}

/// A pushed layer: its digest and TOC digest annotation.
struct Layer {
    digest: String,
    toc_digest: String,
}

/// The layer of the single-layer image tagged `esgz` in an OCI layout.
fn layer_of(layout: &Path) -> Layer {
    let json = |p: PathBuf| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let index = json(layout.join("index.json"));
    let m = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "esgz")
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest = json(layout.join("blobs/sha256").join(&m[7..]));
    let layer = &manifest["layers"][0];
    Layer {
        digest: layer["digest"].as_str().unwrap().to_string(),
        toc_digest: layer["annotations"]["containerd.io/snapshot/stargz/toc.digest"]
            .as_str()
            .unwrap()
            .to_string(),
    }
}

/// The services' logs, for a failure's message.
fn logs(ctd: &Containerd, stack: &Stack) -> String {
    format!(
        "--- containerd\n{}\n--- snapshotter\n{}\n--- fetcher\n{}",
        ctd.log(),
        stack.log(Service::Snapshotter),
        stack.log(Service::Fetcher)
    )
}

/// A fetcher `ResolveLayer` of `layer` of `image`, its TOC digest given.
fn resolve_request(image: &str, layer: &Layer) -> ResolveLayerRequest {
    ResolveLayerRequest {
        layer: Some(LayerSource {
            image_ref: image.to_string(),
            digest: layer.digest.clone(),
            annotations: [(
                "containerd.io/snapshot/stargz/toc.digest".to_string(),
                layer.toc_digest.clone(),
            )]
            .into(),
            ..Default::default()
        }),
        allow_unverified: false,
    }
}

/// Blobs in the CRI plugin's content store (namespace k8s.io).
fn cri_blobs(ctd: &Containerd) -> String {
    let out = run(Command::new("ctr").arg("--address").arg(&ctd.socket).args([
        "--namespace",
        "k8s.io",
        "content",
        "ls",
        "-q",
    ]));
    String::from_utf8(out.stdout).unwrap()
}

/// `GET /metrics` of the snapshotter.
fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Every regular file below `dir` (not following links, not entering
/// `skip`) whose bytes contain one of `needles`.
fn files_containing(dir: &Path, skip: &[&Path], needles: &[&str], found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if skip.iter().any(|s| *s == p) {
            continue;
        }
        let Ok(t) = e.file_type() else { continue };
        if t.is_dir() {
            files_containing(&p, skip, needles, found);
        } else if t.is_file()
            && let Ok(bytes) = std::fs::read(&p)
            && needles
                .iter()
                .any(|n| bytes.windows(n.len()).any(|w| w == n.as_bytes()))
        {
            found.push(p);
        }
    }
}

/// The stack in `sdir` with the CRI keychain on (credentials kept `ttl`;
/// `more` lines of configuration), and a CRI containerd in front of it,
/// both with `private`'s hosts.toml; and the socket of the keychain's
/// image service (the proxy a kubelet talks to).
fn keychain_node(
    private: &Private,
    sdir: &Path,
    ttl: &str,
    more: &[(&str, &str)],
) -> (Node, PathBuf) {
    std::fs::create_dir_all(sdir).unwrap();
    private.write_hosts_toml(&sdir.join("certs.d"), false);
    let cri_socket = sdir.join("cri.sock");
    // containerd starts after the stack (it needs the snapshotter's
    // socket): the proxy dials this link, made once containerd is up.
    let containerd_link = sdir.join("containerd.sock");
    let keychain_config = [
        "enable = true".to_string(),
        format!("image_service_path = \"{}\"", cri_socket.display()),
        format!(
            "containerd_image_service = \"{}\"",
            containerd_link.display()
        ),
        format!("credential_ttl = \"{ttl}\""),
    ];
    let mut extra: Vec<(&str, &str)> = keychain_config
        .iter()
        .map(|l| ("cri_keychain", l.as_str()))
        .collect();
    extra.extend_from_slice(more);
    let node = Node::cri_on(Stack::start(sdir, &extra));
    private.write_hosts_toml(&node.ctd.dir.path().join("certs.d"), true);
    std::os::unix::fs::symlink(&node.ctd.socket, &containerd_link).unwrap();
    (node, cri_socket)
}

fn pull_secrets_make_private_layers_lazy(private: Private) {
    needs(&["skopeo", "containerd", "docker-registry"]);
    let work = work_dir("sg-crik-");
    let w = work.path();
    let images = w.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let direct = format!("{}/private/direct:1", private.host);
    let lazy = format!("{}/private/app:lazy", private.host);
    let anonymous = format!("{}/private/app:anon", private.host);
    let direct_layer = private.push(&images, 61, "private/direct:1").digest;
    let lazy_layer = private.push(&images, 62, "private/app:lazy").digest;
    private.push(&images, 63, "private/app:anon");
    let late_layer = private.push(&images, 64, "private/app:late");
    let restart_layer = private.push(&images, 65, "private/app:restart");

    // The stack in its own directory (grepped for secrets at the end).
    let sdir = w.join("s");
    let metrics_address = format!("127.0.0.1:{}", free_port());
    let metrics_line = format!("metrics_address = \"{metrics_address}\"");
    let (Node { ctd, mut stack }, cri_socket) = keychain_node(
        &private,
        &sdir,
        &format!("{}s", TTL.as_secs()),
        &[("snapshotter", &metrics_line)],
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // The channels are made (lazily) inside the runtime.
    let _entered = runtime.enter();
    let containerd_cri =
        ImageServiceClient::new(stargaze_proto::connect_unix(&ctd.socket).unwrap());
    let proxy = ImageServiceClient::new(stargaze_proto::connect_unix(&cri_socket).unwrap());
    let fetcher = FetcherClient::new(stargaze_proto::connect_unix(&stack.fetcher_socket).unwrap());
    let snapshotter =
        SnapshotterClient::new(stargaze_proto::connect_unix(&stack.snapshotter_socket).unwrap());

    // 1. The bug: containerd's CRI directly, with the secret. containerd
    //    pulls, but the fetcher has no credentials: the layer is unpacked.
    runtime
        .block_on(
            containerd_cri
                .clone()
                .pull_image(cri_pull_request(&direct, Some(private.auth()))),
        )
        .unwrap_or_else(|s| {
            panic!(
                "PullImage {direct} from containerd: {s}\n{}",
                logs(&ctd, &stack)
            )
        });
    assert!(
        cri_blobs(&ctd).contains(&direct_layer),
        "without the keychain the layer of {direct} is downloaded whole\n{}",
        logs(&ctd, &stack)
    );
    let fallback = stack.log(Service::Snapshotter);
    assert!(
        fallback
            .lines()
            .any(|l| l.contains("cannot be pulled lazily") && l.contains(&direct_layer)),
        "the fallback is logged:\n{fallback}"
    );

    // 2. Through the proxy, with the secret: lazy, nothing downloaded.
    let t0 = Instant::now();
    let pulled = runtime
        .block_on(
            proxy
                .clone()
                .pull_image(cri_pull_request(&lazy, Some(private.auth()))),
        )
        .unwrap_or_else(|s| {
            panic!(
                "PullImage {lazy} through the proxy: {s}\n{}",
                logs(&ctd, &stack)
            )
        })
        .into_inner();
    let pulled_at = t0;
    let pull_took = t0.elapsed();
    assert!(pulled.image_ref.starts_with("sha256:"), "{pulled:?}");
    let blobs = cri_blobs(&ctd);
    assert!(
        !blobs.contains(&lazy_layer),
        "layer {lazy_layer} of {lazy} was downloaded, not mounted lazily\n{}",
        logs(&ctd, &stack)
    );
    let log = stack.log(Service::Snapshotter);
    // What handing the credentials over cost the pull (logged at debug).
    if let Some(line) = log
        .lines()
        .find(|l| l.contains("PullImage passed on to containerd"))
    {
        eprintln!("credential handover before the pull: {line}");
    }
    eprintln!("PullImage through the proxy: {pull_took:?}");
    assert_eq!(
        log.matches("remote_snapshot_prepared=true").count(),
        1,
        "the private layer is a remote snapshot:\n{log}"
    );
    // The fetcher reads the whole layer in the background, with the
    // credentials, from the private registry.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = runtime
            .block_on(
                fetcher
                    .clone()
                    .layer_status(stargaze_proto::v1::LayerStatusRequest {
                        layer_digest: lazy_layer.clone(),
                    }),
            )
            .unwrap()
            .into_inner();
        if s.chunks > 0 && s.chunks_present == s.chunks {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "layer {lazy_layer} not fetched in the background: {s:?}\n{}",
            logs(&ctd, &stack)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = runtime
        .block_on(snapshotter.clone().status(SnapshotterStatusRequest {}))
        .unwrap()
        .into_inner();
    let k = status
        .cri_keychain
        .expect("status reports the CRI keychain");
    assert_eq!(
        (k.credentials, k.pulls_with_auth, k.handover_failures),
        (1, 1, 0)
    );
    assert_eq!(k.socket, cri_socket.display().to_string());
    let m = scrape(&metrics_address);
    assert_eq!(
        metric(&m, "stargaze_snapshotter_cri_credentials"),
        Some(1.0),
        "{m}"
    );
    assert!(
        m.contains(
            "stargaze_snapshotter_cri_grpc_requests_total{method=\"PullImage\",code=\"OK\"} 1"
        ),
        "{m}"
    );

    // A fetcher restart loses what it kept in memory; the snapshotter
    // hands the credentials over again (every 2 s) with what is left of
    // their TTL: another layer of the repository resolves.
    stack.kill(Service::Fetcher);
    stack.spawn(Service::Fetcher);
    let deadline = Instant::now() + Duration::from_secs(10);
    let restart_ref = format!("{}/private/app:restart", private.host);
    while let Err(e) = runtime.block_on(
        fetcher
            .clone()
            .resolve_layer(resolve_request(&restart_ref, &restart_layer)),
    ) {
        assert!(
            Instant::now() < deadline,
            "after a restart the fetcher gets the credentials back: {e:?}\n{}",
            logs(&ctd, &stack)
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The proxy's cost per call: ImageStatus straight to containerd and
    // through the proxy, alternately.
    let (mut straight, mut proxied) = (Duration::ZERO, Duration::ZERO);
    const CALLS: u32 = 50;
    for _ in 0..CALLS {
        let req = || ImageStatusRequest {
            image: Some(ImageSpec {
                image: lazy.clone(),
                ..Default::default()
            }),
            verbose: false,
        };
        let t = Instant::now();
        let a = runtime
            .block_on(containerd_cri.clone().image_status(req()))
            .unwrap()
            .into_inner();
        straight += t.elapsed();
        let t = Instant::now();
        let b = runtime
            .block_on(proxy.clone().image_status(req()))
            .unwrap()
            .into_inner();
        proxied += t.elapsed();
        assert_eq!(a, b, "the proxy answers what containerd answers");
    }
    eprintln!(
        "ImageStatus: {:?} per call from containerd, {:?} through the proxy",
        straight / CALLS,
        proxied / CALLS
    );

    // Every other ImageService call is answered as containerd answers it.
    let straight = runtime
        .block_on(
            containerd_cri
                .clone()
                .list_images(ListImagesRequest::default()),
        )
        .unwrap()
        .into_inner();
    let listed = runtime
        .block_on(proxy.clone().list_images(ListImagesRequest::default()))
        .unwrap()
        .into_inner();
    // containerd lists from a Go map: in any order.
    let by_id = |mut l: Vec<stargaze_proto::cri::Image>| {
        l.sort_by(|a, b| a.id.cmp(&b.id));
        l
    };
    assert_eq!(by_id(straight.images), by_id(listed.images.clone()));
    assert!(
        listed.images.iter().any(|i| i.repo_tags.contains(&lazy)),
        "{listed:?}"
    );
    let fs = runtime
        .block_on(proxy.clone().image_fs_info(ImageFsInfoRequest {}))
        .unwrap()
        .into_inner();
    assert!(!fs.image_filesystems.is_empty(), "{fs:?}");
    let spec = |image: &str| {
        Some(ImageSpec {
            image: image.to_string(),
            ..Default::default()
        })
    };
    runtime
        .block_on(proxy.clone().remove_image(RemoveImageRequest {
            image: spec(&direct),
        }))
        .unwrap();
    let gone = runtime
        .block_on(proxy.clone().image_status(ImageStatusRequest {
            image: spec(&direct),
            verbose: false,
        }))
        .unwrap()
        .into_inner();
    assert!(gone.image.is_none(), "{direct} removed: {gone:?}");

    // 3. Through the proxy without the secret: containerd cannot pull.
    let anon = runtime.block_on(proxy.clone().pull_image(cri_pull_request(&anonymous, None)));
    let e = anon.expect_err("a private image cannot be pulled without credentials");
    assert_ne!(e.code(), tonic::Code::Unavailable, "{e:?}");

    // 4. After the TTL the credentials are gone: the status and metrics
    //    say so, and the fetcher cannot resolve another layer of the
    //    repository any more.
    std::thread::sleep(
        (pulled_at + TTL + Duration::from_millis(500)).saturating_duration_since(Instant::now()),
    );
    let status = runtime
        .block_on(snapshotter.clone().status(SnapshotterStatusRequest {}))
        .unwrap()
        .into_inner();
    assert_eq!(status.cri_keychain.unwrap().credentials, 0);
    let m = scrape(&metrics_address);
    assert_eq!(
        metric(&m, "stargaze_snapshotter_cri_credentials"),
        Some(0.0),
        "{m}"
    );
    let late = runtime.block_on(fetcher.clone().resolve_layer(resolve_request(
        &format!("{}/private/app:late", private.host),
        &late_layer,
    )));
    let e = late.expect_err("expired credentials are not used");
    assert!(
        e.message().contains("no credentials for"),
        "the error says credentials are missing: {e:?}"
    );

    // `stargaze status` shows the proxy.
    let out = run(Command::new(workspace_bin("stargaze"))
        .args(["status", "--json", "--config"])
        .arg(&stack.config));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let k = &report["snapshotter"]["cri_keychain"];
    assert_eq!(k["socket"], cri_socket.display().to_string(), "{report}");
    assert_eq!(k["credentials"], 0, "{report}");
    assert_eq!(k["pulls_with_auth"], 1, "{report}");

    // 5. The secret is nowhere: not in a log, not in a file the services,
    //    containerd or the cache wrote.
    let ctd_dir = ctd.dir.path().to_path_buf();
    let mut found = Vec::new();
    let needles: Vec<&str> = private.secrets.iter().map(String::as_str).collect();
    files_containing(&sdir, &[&stack.mountpoint], &needles, &mut found);
    files_containing(&ctd_dir, &[], &needles, &mut found);
    assert!(found.is_empty(), "the secret was written to {found:?}");
    drop(ctd);
    drop(stack);
}

#[test]
fn htpasswd_registry_pull_secret_through_the_cri_keychain() {
    pull_secrets_make_private_layers_lazy(htpasswd_registry());
}

#[test]
fn token_registry_pull_secret_through_the_cri_keychain() {
    pull_secrets_make_private_layers_lazy(token_registry(false));
}

#[test]
fn token_registry_identity_token_through_the_cri_keychain() {
    pull_secrets_make_private_layers_lazy(token_registry(true));
}

/// `RemoveImage` through the proxy (by image ID, as the kubelet's image
/// GC sends it): the pull credentials of a repository are forgotten, in
/// the snapshotter and in the fetcher, when its last image is removed,
/// and kept while another image of it remains (a container started from
/// that one later reads lazily without a new pull). Other repositories
/// keep theirs. The TTL is long: forgetting, not expiry, is what shows.
#[test]
fn removing_a_repositorys_last_image_forgets_its_pull_credentials() {
    needs(&["skopeo", "containerd", "docker-registry"]);
    let private = htpasswd_registry();
    let work = work_dir("sg-crirm-");
    let w = work.path();
    let images = w.join("images");
    std::fs::create_dir_all(&images).unwrap();
    private.push(&images, 71, "private/app:one");
    private.push(&images, 72, "private/app:two");
    private.push(&images, 73, "private/other:1");
    let kept_layer = private.push(&images, 74, "private/app:kept");
    let gone_layer = private.push(&images, 75, "private/app:gone");
    let other_layer = private.push(&images, 76, "private/other:2");

    let (Node { ctd, stack }, cri_socket) = keychain_node(&private, &w.join("s"), "1h", &[]);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _entered = runtime.enter();
    let proxy = ImageServiceClient::new(stargaze_proto::connect_unix(&cri_socket).unwrap());
    let fetcher = FetcherClient::new(stargaze_proto::connect_unix(&stack.fetcher_socket).unwrap());
    let snapshotter =
        SnapshotterClient::new(stargaze_proto::connect_unix(&stack.snapshotter_socket).unwrap());
    let name = |repo_tag: &str| format!("{}/{repo_tag}", private.host);
    let pull = |repo_tag: &str| {
        runtime
            .block_on(
                proxy
                    .clone()
                    .pull_image(cri_pull_request(&name(repo_tag), Some(private.auth()))),
            )
            .unwrap_or_else(|s| panic!("PullImage {repo_tag}: {s}\n{}", logs(&ctd, &stack)))
            .into_inner()
            .image_ref
    };
    let remove = |id: &str| {
        runtime
            .block_on(proxy.clone().remove_image(RemoveImageRequest {
                image: Some(ImageSpec {
                    image: id.to_string(),
                    ..Default::default()
                }),
            }))
            .unwrap_or_else(|s| panic!("RemoveImage {id}: {s}\n{}", logs(&ctd, &stack)));
    };
    let credentials = || {
        runtime
            .block_on(snapshotter.clone().status(SnapshotterStatusRequest {}))
            .unwrap()
            .into_inner()
            .cri_keychain
            .expect("status reports the CRI keychain")
            .credentials
    };
    let resolve = |repo_tag: &str, layer: &Layer| {
        runtime.block_on(
            fetcher
                .clone()
                .resolve_layer(resolve_request(&name(repo_tag), layer)),
        )
    };

    let one = pull("private/app:one");
    let two = pull("private/app:two");
    pull("private/other:1");
    assert!(one.starts_with("sha256:") && one != two, "{one} {two}");
    assert_eq!(credentials(), 2, "private/app and private/other");

    // Another image of private/app is left: its credentials stay.
    remove(&one);
    assert_eq!(credentials(), 2);
    resolve("private/app:kept", &kept_layer).unwrap_or_else(|e| {
        panic!(
            "with private/app:two left the credentials are kept: {e:?}\n{}",
            logs(&ctd, &stack)
        )
    });

    // The last one: forgotten here and in the fetcher (tokens included).
    remove(&two);
    assert_eq!(credentials(), 1, "only private/other's are left");
    let e = resolve("private/app:gone", &gone_layer)
        .expect_err("the fetcher forgot private/app's credentials");
    assert!(
        e.message().contains("no credentials for"),
        "the error says credentials are missing: {e:?}"
    );
    let log = stack.log(Service::Snapshotter);
    assert!(
        log.contains("pull credentials forgotten") && log.contains("private/app"),
        "{log}"
    );
    assert!(
        stack
            .log(Service::Fetcher)
            .contains("credentials from the CRI keychain forgotten"),
        "{}",
        logs(&ctd, &stack)
    );
    resolve("private/other:2", &other_layer).unwrap_or_else(|e| {
        panic!(
            "private/other keeps its credentials: {e:?}\n{}",
            logs(&ctd, &stack)
        )
    });
    drop(ctd);
    drop(stack);
}
