//! `stargaze-snapshotter`: containerd's proxy snapshot plugin. It owns the
//! `containerd.services.snapshots.v1.Snapshots` API, snapshot metadata in an
//! embedded transactional database (redb), remote-snapshot decisions from the
//! labels containerd passes, overlay mounts over the fs service's layer
//! directories, the fallback to ordinary unpacking for layers that cannot be
//! pulled lazily, and restoring remote layers after a restart. It calls the
//! fetcher and fs services on their sockets from the `[fetcher]` and `[fs]`
//! sections of the shared config.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use stargaze_proto::containerd::services::snapshots::v1::snapshots_server::SnapshotsServer;
use stargaze_proto::v1::snapshotter_server::SnapshotterServer;
use stargaze_service::CommonArgs;
use stargaze_service::config::Config;
use stargaze_snapshotter::cri_keychain::Keychain;
use stargaze_snapshotter::cri_proxy::CriProxy;
use stargaze_snapshotter::remote::Remote;
use stargaze_snapshotter::service::SnapshotService;
use stargaze_snapshotter::status::{CriKeychainInfo, SnapshotterMetrics, StatusService};
use stargaze_snapshotter::store::Store;

/// The name of the listening socket in systemd's descriptor store.
const LISTENER_NAME: &str = "stargaze-snapshotter-socket";

/// containerd proxy snapshotter for lazily pulled eStargz images.
#[derive(Debug, Parser)]
#[command(name = "stargaze-snapshotter", version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,

    /// Socket containerd connects to; overrides [snapshotter] socket
    /// (same flag as containerd-stargz-grpc).
    #[arg(long, value_name = "PATH")]
    address: Option<PathBuf>,

    /// Directory for snapshot metadata and data; overrides [snapshotter] root
    /// (same flag as containerd-stargz-grpc).
    #[arg(long, value_name = "PATH")]
    root: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    stargaze_service::run(
        "stargaze-snapshotter",
        &args.common,
        |config| {
            if let Some(address) = &args.address {
                config.snapshotter.socket = address.clone();
            }
            if let Some(root) = &args.root {
                config.snapshotter.root = root.clone();
            }
        },
        |startup| serve(startup.config),
    )
}

async fn serve(config: Config) -> Result<()> {
    let c = config.snapshotter.clone();
    let store = Store::open(&c.root).with_context(|| format!("opening {}", c.root.display()))?;
    let remote = if c.lazy_pull {
        let r = Remote::new(
            &config.fetcher.socket,
            &config.fs.socket,
            c.allow_no_verification,
        )
        .context("cannot set up clients of stargaze-fetcher and stargaze-fs")?;
        Some(Arc::new(r))
    } else {
        tracing::info!("lazy_pull = false: every layer is unpacked by containerd");
        None
    };
    let service = SnapshotService::new(Arc::new(store), remote);
    // Re-attach remote layers in the background: containerd may
    // connect meanwhile, and Mounts repairs any layer on demand.
    tokio::spawn({
        let service = service.clone();
        async move { service.restore().await }
    });
    let cri_keychain = if config.cri_keychain.enable {
        Some(start_cri_keychain(&config).await?)
    } else {
        None
    };
    let metrics = SnapshotterMetrics(
        service.clone(),
        cri_keychain.as_ref().map(|k| k.stats.clone()),
    );
    stargaze_service::metrics_endpoint(&c.metrics_address, Arc::new(move || metrics.render()))
        .await?;
    let status = StatusService {
        snapshots: service.clone(),
        lazy_pull: c.lazy_pull,
        cri_keychain,
    };
    let rpc = service.stats.rpc.clone();
    let routes = tonic::service::Routes::new(SnapshotsServer::new(service))
        .add_service(SnapshotterServer::new(status));
    // The listener waits in systemd's descriptor store across a restart:
    // containerd's calls meanwhile wait for the next process instead of
    // failing (its proxy client fails calls it cannot connect).
    stargaze_service::serve_keeping_listener(&c.socket, Some(LISTENER_NAME), routes, rpc, || {
        tracing::info!(
            socket = %c.socket.display(),
            root = %c.root.display(),
            "stargaze-snapshotter serving"
        );
    })
    .await?;
    if config.cri_keychain.enable {
        let _ = std::fs::remove_file(&config.cri_keychain.image_service_path);
    }
    Ok(())
}

/// `[cri_keychain]`: bind the kubelet's ImageService socket now (so that a
/// bad path stops the start with its error) and serve it in the background.
async fn start_cri_keychain(config: &Config) -> Result<CriKeychainInfo> {
    let k = &config.cri_keychain;
    let fetcher = stargaze_proto::v1::fetcher_client::FetcherClient::new(
        stargaze_proto::connect_unix(&config.fetcher.socket)
            .context("cannot set up the client of stargaze-fetcher for the CRI keychain")?,
    );
    let keychain = Keychain::new(fetcher, k.credential_ttl);
    let stats = keychain.stats.clone();
    tokio::spawn(keychain.clone().keep_fetcher_supplied());
    let proxy = CriProxy::new(&k.containerd_image_service, keychain).context(
        "cannot set up the client of containerd's CRI ([cri_keychain] containerd_image_service)",
    )?;
    let listener = stargaze_proto::bind_unix(&k.image_service_path)
        .await
        .context("[cri_keychain] image_service_path")?;
    let socket = k.image_service_path.clone();
    tokio::spawn(async move {
        if let Err(e) = proxy.serve(listener, &socket).await {
            tracing::error!(error = %e, "CRI keychain: serving the ImageService failed");
        }
    });
    Ok(CriKeychainInfo {
        socket: k.image_service_path.display().to_string(),
        containerd_socket: k.containerd_image_service.display().to_string(),
        ttl: k.credential_ttl,
        stats,
    })
}
