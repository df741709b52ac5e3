//! The `stargaze-fs` binary started under an emulated descriptor store, as
//! the restart tests run it; the fetcher it talks to, served from the test
//! process (only fs is killed); a layer resolved and attached through both.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stargaze_cache::Cache;
use stargaze_fetcher::FetchOptions;
use stargaze_fetcher::service::FetcherService;
use stargaze_proto::v1::fetcher_server::FetcherServer;
use stargaze_registry::{Client, ClientOptions, DockerConfig, Hosts};

use stargaze_proto::v1::fetcher_client::FetcherClient;
use stargaze_proto::v1::fs_client::FsClient;
use stargaze_proto::v1::{AttachRequest, LayerSource, ResolveLayerRequest, ResolveLayerResponse};
use stargaze_testkit::fdstore::FdStore;
use tonic::transport::Channel;

/// Write `w/config.toml` for the restart tests' fs: its socket and mount
/// point, the fetcher at `fetcher_sock` caching in `cache_dir`, `fs_lines`
/// (transport, passthrough, ...) in the `[fs]` section, fs's debug log
/// on. Returns the file's path.
pub fn write_config(
    w: &Path,
    fetcher_sock: &Path,
    cache_dir: &Path,
    fs_sock: &Path,
    mnt: &Path,
    fs_lines: &[&str],
) -> PathBuf {
    let config = w.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[fetcher]\nsocket = \"{}\"\ncache_dir = \"{}\"\n[fs]\nsocket = \"{}\"\nmountpoint = \"{}\"\n{}\n[log]\nlevel = \"info,stargaze_fs=debug\"\n",
            fetcher_sock.display(),
            cache_dir.display(),
            fs_sock.display(),
            mnt.display(),
            fs_lines.join("\n")
        ),
    )
    .unwrap();
    config
}

/// Start `stargaze-fs` with `config` under `store`, its output appended to
/// `log`, and wait until it listens on `sock`. The transport is the
/// config's, whatever the suite runs with (these tests are about one).
/// `env` is added to its environment (a kill point to arm).
pub fn spawn_fs(
    store: &mut FdStore,
    config: &Path,
    log: &Path,
    sock: &Path,
    env: &[(&str, &str)],
) -> Child {
    let _ = std::fs::remove_file(sock);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut child = store
        .command(Path::new(env!("CARGO_BIN_EXE_stargaze-fs")))
        .arg("--config")
        .arg(config)
        .env_remove(stargaze_fs::transport::ENV)
        .env_remove(stargaze_fs::kill_point::ENV)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        if let Ok(Some(s)) = child.try_wait() {
            panic!("stargaze-fs exited at start: {s}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "fs did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Resolve the layer `desc` (a manifest's layer descriptor, as JSON) of
/// `image_ref` through the fetcher and attach it to fs: the resolution and
/// the layer's directory in the mount.
pub async fn resolve_and_attach(
    fetch: &mut FetcherClient<Channel>,
    fs: &mut FsClient<Channel>,
    image_ref: &str,
    desc: &serde_json::Value,
) -> (ResolveLayerResponse, PathBuf) {
    let r = fetch
        .resolve_layer(ResolveLayerRequest {
            layer: Some(LayerSource {
                image_ref: image_ref.to_string(),
                digest: desc["digest"].as_str().unwrap().into(),
                annotations: serde_json::from_value(desc["annotations"].clone()).unwrap(),
                ..Default::default()
            }),
            allow_unverified: false,
        })
        .await
        .unwrap()
        .into_inner();
    let dir = PathBuf::from(
        fs.attach(AttachRequest {
            layer_digest: r.layer_digest.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .dir,
    );
    (r, dir)
}

/// Serve a fetcher with its cache in `cache_dir` from this process on
/// `work/fetcher.sock`; its socket.
pub async fn serve_fetcher(work: &Path, cache_dir: &Path) -> PathBuf {
    let sock = work.join("fetcher.sock");
    let cache = Arc::new(Cache::open_writer(cache_dir).unwrap());
    let client = Client::new(
        Hosts::new(),
        DockerConfig::in_dir(work),
        ClientOptions::default(),
    );
    let fetcher = FetcherService::new(cache, client, FetchOptions::default(), 0, false);
    let listener = stargaze_proto::bind_unix(&sock).await.unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(FetcherServer::new(fetcher))
            .serve_with_incoming(stargaze_proto::incoming(listener)),
    );
    sock
}
