//! `stargaze-fs`: the node's one FUSE mount of lazily pulled layers, and
//! `stargaze.v1.Fs` on a unix socket to attach and detach them (see the
//! library docs for the parts).
//!
//! Start-up: when systemd hands back the `/dev/fuse` descriptor of a
//! previous run (its file descriptor store) and the mount is still that
//! connection's, the connection is taken over (see `handover` in the
//! library): running containers keep their files. Otherwise a stale mount
//! left at the mountpoint ("transport endpoint is not connected") is
//! detached and the filesystem mounted anew, and its descriptor is given to
//! systemd's store. Then `n_threads` FUSE threads serve it, the socket is
//! bound (0600) and systemd told it is ready. SIGTERM or SIGINT: with the
//! descriptor in systemd's store the mount is left to the next run (a
//! `systemctl restart` keeps containers running; a stop closes the store
//! and the next start detaches the dead mount); without it the mount is
//! detached lazily, so overlays already using it keep their references
//! until they go.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use stargaze_fs::handover::{self, SessionFile};
use stargaze_fs::opens::OpenTable;
use stargaze_fs::service::FsService;
use stargaze_fs::{FsShared, GrpcFetcher};
use stargaze_proto::v1::fs_server::FsServer;
use stargaze_service::CommonArgs;
use stargaze_service::config::{FetcherConfig, FsConfig};

/// Serves lazily pulled layers through one FUSE mount.
#[derive(Debug, Parser)]
#[command(name = "stargaze-fs", version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    stargaze_service::run(
        "stargaze-fs",
        &args.common,
        |_| {},
        |startup| serve(startup.config.fs, startup.config.fetcher),
    )
}

async fn serve(c: FsConfig, fetcher: FetcherConfig) -> Result<()> {
    let source = Arc::new(GrpcFetcher::new(&fetcher.socket)?);
    let runtime = tokio::runtime::Handle::current();
    // Layers are read from the fetcher's cache, found by their digest.
    let mut shared = FsShared::new(
        &fetcher.cache_dir,
        source,
        runtime,
        c.entry_timeout.max(c.attr_timeout),
    );
    shared.readahead = c.readahead;
    *shared.transport_wanted.lock() = stargaze_fs::transport::wanted(c.transport)?;
    let shared = Arc::new(shared);
    shared
        .passthrough
        .wanted
        .store(c.passthrough, std::sync::atomic::Ordering::Release);
    let inherited = handover::take_stored_fd(handover::FDNAME);
    let session = stargaze_fs::mount_or_take_over(
        shared.clone(),
        &c.mountpoint,
        c.n_threads as usize,
        inherited,
    )
    .with_context(|| format!("serving FUSE at {}", c.mountpoint.display()))?;
    let stored = handover::store_fd(session.dev_fd, handover::FDNAME);
    let rpc = Arc::new(stargaze_service::metrics::RpcMetrics::default());
    let metrics = stargaze_fs::metrics::FsMetrics {
        shared: shared.clone(),
        rpc: rpc.clone(),
        fuse_threads: u64::from(c.n_threads),
    };
    stargaze_service::metrics_endpoint(&c.metrics_address, Arc::new(move || metrics.render()))
        .await?;
    let service = FsService {
        shared,
        mountpoint: c.mountpoint.clone(),
        fuse_threads: c.n_threads,
    };
    let routes = tonic::service::Routes::new(FsServer::new(service));
    stargaze_service::serve(&c.socket, routes, rpc, || {
        tracing::info!(
            socket = %c.socket.display(),
            mountpoint = %c.mountpoint.display(),
            "stargaze-fs serving"
        );
    })
    .await?;
    if stored {
        // Exit at once: dropping the runtime would answer the reads
        // still waiting for the fetcher with EIO; unanswered, the
        // kernel gives them to the next run (FUSE_NOTIFY_RESEND).
        tracing::info!(
            "the FUSE connection stays with systemd's descriptor store for the next run"
        );
        std::process::exit(0);
    }
    // Lazy unmount: overlays that still use the mount keep it until they go.
    let _ = nix::mount::umount2(&c.mountpoint, nix::mount::MntFlags::MNT_DETACH);
    SessionFile::beside(&c.mountpoint).remove();
    let _ = std::fs::remove_file(OpenTable::beside(&c.mountpoint));
    let _ = std::fs::remove_file(stargaze_fs::uring::memory::RingMemory::path_beside(
        &c.mountpoint,
    ));
    drop(session);
    Ok(())
}
