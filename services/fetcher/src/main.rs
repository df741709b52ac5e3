//! `stargaze-fetcher`: the service that reads layers from registries and
//! the only writer of the node's chunk cache. It serves `stargaze.v1.Fetcher` on a unix
//! socket to the fs and snapshotter services (see the library docs for the
//! parts).
//!
//! Start-up: open the cache as its single writer (re-verifying present
//! chunks when the last stop was not clean), build the registry client
//! (containerd's `/etc/containerd/certs.d` hosts files, the docker config for
//! credentials), bind the socket (0600), tell systemd it is ready. SIGTERM
//! or SIGINT stop serving and record a clean stop.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use stargaze_cache::Cache;
use stargaze_fetcher::FetchOptions;
use stargaze_fetcher::recover::Recovery;
use stargaze_fetcher::service::FetcherService;
use stargaze_proto::v1::fetcher_server::FetcherServer;
use stargaze_service::CommonArgs;
use stargaze_service::config::{CacheIo, FetcherConfig};

/// Fetches eStargz layers lazily from registries into the node's chunk cache.
#[derive(Debug, Parser)]
#[command(name = "stargaze-fetcher", version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Directory of containerd hosts.toml files (mirrors, CAs, headers);
    /// overrides [fetcher] hosts_dir.
    #[arg(long, value_name = "DIR")]
    hosts_dir: Option<PathBuf>,
    /// Do not fetch whole layers in the background after prefetch
    /// (overrides [fetcher] background_fetch).
    #[arg(long)]
    no_background_fetch: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Applied to the service, not the config: `--print-config` shows the file's value.
    let background_fetch_off = args.no_background_fetch;
    stargaze_service::run(
        "stargaze-fetcher",
        &args.common,
        |config| {
            if let Some(dir) = &args.hosts_dir {
                config.fetcher.hosts_dir = dir.clone();
            }
        },
        |startup| serve(startup.config.fetcher, background_fetch_off),
    )
}

async fn serve(c: FetcherConfig, background_fetch_off: bool) -> Result<()> {
    let (cache, recovery) = open_cache(&c)?;
    let opts = FetchOptions {
        merge_gap: c.merge_gap,
        max_merged_range: c.max_merged_range,
        whole_file_below: c.whole_file_below,
        read_amplify: c.read_amplify,
        sweep_max_window: c.sweep_max_window,
        ..Default::default()
    };
    let service = FetcherService::new(
        cache.clone(),
        registry_client(&c)?,
        opts,
        c.prefetch_size,
        c.background_fetch && !background_fetch_off,
    )
    .with_background_silence(c.background_silence, c.background_max_wait)
    .with_background_bandwidth(c.background_bandwidth)
    .with_entrypoint_prefetch(c.prefetch_entrypoint)
    .with_load_following(c.prefetch_loads, c.whole_mapped_file_below)
    .with_learned_traces(
        c.learn_traces,
        c.trace_window,
        c.fetch_published_traces,
        c.publish_traces,
    )
    .with_recovery(recovery.0, recovery.1)
    .with_cache_limit(stargaze_cache::EvictOptions {
        limit: c.cache_size_limit,
        keep_unused: c.cache_keep_unused,
        ..Default::default()
    });
    service.start_eviction();
    if c.cache_size_limit > 0 {
        tracing::info!(
            limit = c.cache_size_limit,
            keep_unused = ?c.cache_keep_unused,
            "cache size limit set: unused layers are evicted beyond it"
        );
    }
    let svc = service.clone();
    stargaze_service::metrics_endpoint(&c.metrics_address, Arc::new(move || svc.render_metrics()))
        .await?;
    let rpc = service.rpc_metrics();
    let stopping = service.clone();
    let routes = tonic::service::Routes::new(FetcherServer::new(service));
    stargaze_service::serve(&c.socket, routes, rpc, || {
        tracing::info!(
            socket = %c.socket.display(),
            cache = %c.cache_dir.display(),
            "stargaze-fetcher serving"
        );
    })
    .await?;
    // What images' containers read so far is kept, not lost with the window.
    stopping.save_traces().await;
    cache.mark_clean()?;
    Ok(())
}

/// The cache as its single writer, re-verified after an unclean stop
/// (what that found, and how long it took).
fn open_cache(c: &FetcherConfig) -> Result<(Arc<Cache>, (Recovery, Duration))> {
    let mut cache = Cache::open_writer(&c.cache_dir)
        .with_context(|| format!("opening the cache {}", c.cache_dir.display()))?;
    let mut recovery = Default::default();
    if cache.was_unclean() {
        tracing::warn!(
            cache = %c.cache_dir.display(),
            "the last stop was not clean: re-verifying cached chunks"
        );
        let t0 = Instant::now();
        let r = tokio::task::block_in_place(|| stargaze_fetcher::recover::reverify(&cache));
        recovery = (r, t0.elapsed());
        tracing::warn!(
            layers = r.layers,
            checked = r.chunks_checked,
            cleared = r.chunks_cleared,
            shared_checked = r.shared_checked,
            shared_removed = r.shared_removed,
            temps_removed = r.temps_removed,
            took = ?recovery.1,
            "re-verification done"
        );
    }
    if c.cache_io == CacheIo::IoUring {
        match cache.use_io_uring() {
            Ok(()) => tracing::info!("cache writes go through io_uring (a ring per decode thread)"),
            Err(e) => {
                tracing::warn!(error = %e, "io_uring is not available: cache writes use pwrite")
            }
        }
    }
    Ok((Arc::new(cache), recovery))
}

/// The registry client: containerd's hosts.toml files, the Go
/// snapshotter's `[resolver]` mirrors, docker credentials.
fn registry_client(c: &FetcherConfig) -> Result<stargaze_registry::Client> {
    let mut hosts = stargaze_registry::Hosts::new();
    if c.hosts_dir.is_dir() {
        tracing::info!(
            dir = %c.hosts_dir.display(),
            "registry hosts from containerd's hosts.toml files"
        );
        hosts = hosts.with_hosts_dir(&c.hosts_dir);
    }
    if !c.stargz_config.as_os_str().is_empty() && c.stargz_config.is_file() {
        let file = c.stargz_config.display();
        let text = std::fs::read_to_string(&c.stargz_config)
            .with_context(|| format!("reading {file} ([fetcher] stargz_config)"))?;
        hosts = hosts.with_stargz_config_text(&text).with_context(|| {
            format!("{file} ([fetcher] stargz_config): its [resolver] section is not valid")
        })?;
        tracing::info!(file = %file, "registry mirrors from the Go snapshotter's [resolver]");
    }
    Ok(stargaze_registry::Client::new(
        hosts,
        stargaze_registry::DockerConfig::from_env(),
        stargaze_registry::ClientOptions {
            max_connections_per_host: c.max_connections_per_host as usize,
            request_timeout: c.request_timeout,
            retries: c.retries,
            endpoint_backoff: c.endpoint_backoff,
            ..Default::default()
        },
    ))
}
