//! `stargaze-fs`: the node's one FUSE mount of lazily pulled layers, and
//! `stargaze.v1.Fs` on a unix socket to attach and detach them (see the
//! library docs for the parts).
//!
//! Start-up: a stale mount left at the mountpoint by a crash ("transport
//! endpoint is not connected") is detached first; then the filesystem is
//! mounted with `n_threads` FUSE threads, the socket bound (0600) and systemd
//! told it is ready. SIGTERM or SIGINT unmount (lazily, so overlays already
//! using it keep their references until they go) and exit.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use stargaze_fs::service::FsService;
use stargaze_fs::{FsShared, GrpcFetcher};
use stargaze_proto::v1::fs_server::FsServer;
use stargaze_service::CommonArgs;

/// Serves lazily pulled layers through one FUSE mount.
#[derive(Debug, Parser)]
#[command(name = "stargaze-fs", version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

/// Detach whatever is mounted at `dir` when it is a dead FUSE mount of ours.
fn clean_stale_mount(dir: &Path) {
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(&dir.to_string_lossy()));
    if !mounted {
        return;
    }
    if std::fs::read_dir(dir).is_ok() {
        tracing::warn!(mountpoint = %dir.display(), "something is already mounted here and answering; leaving it");
        return;
    }
    tracing::warn!(mountpoint = %dir.display(), "detaching a stale mount left by a previous run");
    let _ = nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH);
}

fn main() -> ExitCode {
    let args = Args::parse();
    stargaze_service::run(
        "stargaze-fs",
        &args.common,
        |_| {},
        |startup| {
            let c = startup.config.fs.clone();
            let fetcher_socket = startup.config.fetcher.socket.clone();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let handle = runtime.handle().clone();
            runtime.block_on(async move {
            // First the stale mount: a dead FUSE mount fails every stat
            // (ENOTCONN), which makes creating the directory fail too.
            clean_stale_mount(&c.mountpoint);
            std::fs::create_dir_all(&c.mountpoint)
                .with_context(|| format!("creating the mountpoint {}", c.mountpoint.display()))?;
            let source = Arc::new(GrpcFetcher::new(&fetcher_socket)?);
            let shared = Arc::new(FsShared::new(source, handle, c.entry_timeout.max(c.attr_timeout)));
            shared.passthrough.wanted.store(c.passthrough, std::sync::atomic::Ordering::Release);
            let session = stargaze_fs::mount(shared.clone(), &c.mountpoint, c.n_threads as usize)
                .with_context(|| format!("mounting FUSE at {}", c.mountpoint.display()))?;
            let rpc = Arc::new(stargaze_service::metrics::RpcMetrics::default());
            if !c.metrics_address.is_empty() {
                let metrics = stargaze_fs::metrics::FsMetrics {
                    shared: shared.clone(),
                    rpc: rpc.clone(),
                    fuse_threads: u64::from(c.n_threads),
                };
                let addr = stargaze_service::serve_metrics(
                    &c.metrics_address,
                    Arc::new(move || metrics.render()),
                )
                .await?;
                tracing::info!(address = %addr, "serving Prometheus metrics on /metrics");
            }
            let service = FsService {
                shared,
                mountpoint: c.mountpoint.clone(),
                fuse_threads: c.n_threads,
            };
            let listener = stargaze_proto::bind_unix(&c.socket).await?;
            tracing::info!(socket = %c.socket.display(), mountpoint = %c.mountpoint.display(), "stargaze-fs serving");
            stargaze_service::sd_notify("READY=1");
            let shutdown = async {
                let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                stargaze_service::sd_notify("STOPPING=1");
            };
            tonic::transport::Server::builder()
                .layer(stargaze_service::metrics::RpcMetricsLayer(rpc))
                .add_service(FsServer::new(service))
                .serve_with_incoming_shutdown(stargaze_proto::incoming(listener), shutdown)
                .await
                .context("serving gRPC")?;
            let _ = std::fs::remove_file(&c.socket);
            // Lazy unmount: overlays that still use the mount keep it until they go.
            let _ = nix::mount::umount2(&c.mountpoint, nix::mount::MntFlags::MNT_DETACH);
            drop(session);
            Ok(())
        })
        },
    )
}
