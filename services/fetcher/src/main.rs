//! `stargaze-fetcher`: the node's only client of the registries and the
//! only writer of its chunk cache. It serves `stargaze.v1.Fetcher` on a unix
//! socket to the fs and snapshotter services (see the library docs for the
//! parts).
//!
//! Start-up: open the cache as its single writer (re-verifying present
//! chunks when the last stop was not clean), build the registry client
//! (containerd's `/etc/containerd/certs.d` hosts files, the docker config for
//! credentials), bind the socket (0600), tell systemd it is ready. SIGTERM
//! or SIGINT stop serving and record a clean stop.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use stargaze_fetcher::FetchOptions;
use stargaze_fetcher::service::FetcherService;
use stargaze_proto::v1::fetcher_server::FetcherServer;
use stargaze_service::CommonArgs;

/// Fetches eStargz layers lazily from registries into the node's chunk cache.
#[derive(Debug, Parser)]
#[command(name = "stargaze-fetcher", version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Directory of containerd hosts.toml files (mirrors, CAs, headers);
    /// overrides [fetcher] hosts_dir.
    #[arg(long, value_name = "DIR")]
    hosts_dir: Option<std::path::PathBuf>,
    /// Do not fetch whole layers in the background after prefetch
    /// (overrides [fetcher] background_fetch).
    #[arg(long)]
    no_background_fetch: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    stargaze_service::run(
        "stargaze-fetcher",
        &args.common,
        |config| {
            if let Some(dir) = &args.hosts_dir {
                config.fetcher.hosts_dir = dir.clone();
            }
        },
        |startup| {
            let c = startup.config.fetcher.clone();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(async move {
            let cache = stargaze_cache::Cache::open_writer(&c.cache_dir)
                .with_context(|| format!("opening the cache {}", c.cache_dir.display()))?;
            if cache.was_unclean() {
                tracing::warn!(cache = %c.cache_dir.display(), "the last stop was not clean: re-verifying cached chunks");
                let r = tokio::task::block_in_place(|| stargaze_fetcher::recover::reverify(&cache));
                tracing::warn!(layers = r.layers, checked = r.chunks_checked, cleared = r.chunks_cleared, shared_checked = r.shared_checked, shared_removed = r.shared_removed, "re-verification done");
            }
            let mut cache = cache;
            if c.cache_io == stargaze_service::config::CacheIo::IoUring {
                match cache.use_io_uring() {
                    Ok(()) => tracing::info!("cache writes go through io_uring"),
                    Err(e) => tracing::warn!(error = %e, "io_uring is not available: cache writes use pwrite"),
                }
            }
            let cache = Arc::new(cache);
            let mut hosts = stargaze_registry::Hosts::new();
            if c.hosts_dir.is_dir() {
                tracing::info!(dir = %c.hosts_dir.display(), "registry hosts from containerd's hosts.toml files");
                hosts = hosts.with_hosts_dir(&c.hosts_dir);
            }
            if !c.stargz_config.as_os_str().is_empty() && c.stargz_config.is_file() {
                let text = std::fs::read_to_string(&c.stargz_config)
                    .with_context(|| format!("reading {} ([fetcher] stargz_config)", c.stargz_config.display()))?;
                hosts = hosts.with_stargz_config_text(&text).with_context(|| {
                    format!("{} ([fetcher] stargz_config): its [resolver] section is not valid", c.stargz_config.display())
                })?;
                tracing::info!(file = %c.stargz_config.display(), "registry mirrors from the Go snapshotter's [resolver]");
            }
            let client = stargaze_registry::Client::new(
                hosts,
                stargaze_registry::DockerConfig::from_env(),
                stargaze_registry::ClientOptions {
                    max_connections_per_host: c.max_connections_per_host as usize,
                    request_timeout: c.request_timeout,
                    retries: c.retries,
                    ..Default::default()
                },
            );
            let opts = FetchOptions {
                merge_gap: c.merge_gap,
                max_merged_range: c.max_merged_range,
                ..Default::default()
            };
            let service = FetcherService::new(cache.clone(), client, opts, c.prefetch_size, c.background_fetch && !args.no_background_fetch)
                .with_background_silence(c.background_silence, c.background_max_wait)
                .with_background_bandwidth(c.background_bandwidth)
                .with_entrypoint_prefetch(c.prefetch_entrypoint)
                .with_load_following(c.prefetch_loads, c.whole_mapped_file_below)
                .with_learned_traces(c.learn_traces, c.trace_window, c.fetch_published_traces, c.publish_traces)
                .with_cache_limit(stargaze_cache::EvictOptions {
                    limit: c.cache_size_limit,
                    keep_unused: c.cache_keep_unused,
                    ..Default::default()
                });
            service.start_eviction();
            if c.cache_size_limit > 0 {
                tracing::info!(limit = c.cache_size_limit, keep_unused = ?c.cache_keep_unused, "cache size limit set: unused layers are evicted beyond it");
            }
            if !c.metrics_address.is_empty() {
                let svc = service.clone();
                let addr = stargaze_service::serve_metrics(&c.metrics_address, Arc::new(move || svc.render_metrics())).await?;
                tracing::info!(address = %addr, "serving Prometheus metrics on /metrics");
            }
            let listener = stargaze_proto::bind_unix(&c.socket).await?;
            tracing::info!(socket = %c.socket.display(), cache = %c.cache_dir.display(), "stargaze-fetcher serving");
            stargaze_service::sd_notify("READY=1");
            let shutdown = async {
                let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                stargaze_service::sd_notify("STOPPING=1");
                tracing::info!("stopping");
            };
            let rpc = stargaze_service::metrics::RpcMetricsLayer(service.rpc_metrics());
            tonic::transport::Server::builder()
                .layer(rpc)
                .add_service(FetcherServer::new(service))
                .serve_with_incoming_shutdown(stargaze_proto::incoming(listener), shutdown)
                .await
                .context("serving gRPC")?;
            let _ = std::fs::remove_file(&c.socket);
            cache.mark_clean()?;
            Ok(())
        })
        },
    )
}
