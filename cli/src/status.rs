//! `stargaze status`: what the node's three services are doing, from their
//! own status RPCs (fetcher `Status` + `LayerStatus`, fs `Status` + `List`,
//! snapshotter `stargaze.v1.Snapshotter/Status`), read from the sockets in
//! the configuration file. A service that does not answer is reported down
//! and the rest is shown from the others; the exit code is 1 when any
//! service is down, so the command doubles as a health check.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::Serialize;
use stargaze_format::Digest;
use stargaze_proto::v1::fetcher_client::FetcherClient;
use stargaze_proto::v1::fs_client::FsClient;
use stargaze_proto::v1::snapshotter_client::SnapshotterClient;
use stargaze_proto::v1::{self as pb};

/// How long each service may take to answer.
const RPC_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(clap::Args)]
pub struct Args {
    /// Configuration file with the services' sockets (default
    /// /etc/stargaze/config.toml when it exists, else the built-in defaults).
    #[arg(long, value_name = "PATH", env = "STARGAZE_CONFIG")]
    config: Option<PathBuf>,
    /// Print JSON for scripts instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    services: Vec<ServiceState>,
    images: Vec<Image>,
    cache: Option<CacheState>,
    fs: Option<FsState>,
    snapshotter: Option<SnapshotterState>,
    /// Oldest first.
    recent_errors: Vec<ErrorEntry>,
}

#[derive(Serialize)]
struct ServiceState {
    name: &'static str,
    socket: String,
    up: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Serialize)]
struct Image {
    image: String,
    layers: Vec<LayerState>,
    /// Uncompressed bytes of the image's lazily pulled files, and how many
    /// of them are in the cache.
    bytes_total: u64,
    bytes_fetched: u64,
}

#[derive(Serialize, Clone)]
struct LayerState {
    digest: String,
    /// The snapshot containerd knows it by, if the snapshotter answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshot: Option<String>,
    /// The fs service has it attached (its directory answers).
    attached: bool,
    bytes_total: u64,
    bytes_fetched: u64,
    chunks: u32,
    chunks_present: u32,
    prefetch_done: bool,
    /// Every chunk is in the cache: the layer no longer needs the registry.
    complete: bool,
    background_done: bool,
    reads: u64,
    read_errors: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    last_error: String,
}

/// Re-verification of the cache after an unclean stop of the fetcher.
#[derive(Serialize)]
struct RecoveryState {
    layers: u32,
    chunks_checked: u64,
    /// Chunks whose bytes did not match (torn writes): cleared, fetched
    /// again when read.
    chunks_cleared: u64,
    shared_checked: u64,
    shared_removed: u64,
    /// Temporary files of interrupted writes.
    temps_removed: u64,
    millis: u64,
}

#[derive(Serialize)]
struct CacheState {
    dir: String,
    bytes_on_disk: u64,
    layers: u32,
    registry_bytes: u64,
    registry_requests: u64,
    chunks_verified: u64,
    verification_failures: u64,
    recovered_from_unclean_stop: bool,
    /// What that re-verification found (absent after a clean stop).
    #[serde(skip_serializing_if = "Option::is_none")]
    recovery: Option<RecoveryState>,
    /// Layers are fetched whole in the background after their prefetch.
    background_fetch: bool,
    /// Bytes read by containers that were in the cache when asked for, as a
    /// fraction of all bytes read (fs counters); `null` before any read.
    read_hit_rate: Option<f64>,
    /// `[fetcher] cache_size_limit` (0 = none).
    limit_bytes: u64,
    /// At the last eviction pass: bytes of attached or recently used
    /// layers, which cannot be evicted.
    kept_bytes: u64,
    /// Evicted since the fetcher started.
    evicted_layers: u64,
    evicted_files: u64,
    evicted_bytes: u64,
}

#[derive(Serialize)]
struct FsState {
    mountpoint: String,
    layers: u32,
    fuse_threads: u32,
    /// `classic` or `io_uring`.
    transport: String,
    ring_requests: u64,
    passthrough: bool,
    bytes_from_cache: u64,
    bytes_after_fetch: u64,
    read_errors: u64,
}

#[derive(Serialize)]
struct SnapshotterState {
    root: String,
    lazy_pull: bool,
    snapshots: u32,
    remote_snapshots: usize,
    remote_prepared: u64,
    fallbacks: u64,
    reattached: u64,
    /// The CRI ImageService proxy (`[cri_keychain]`); absent when off.
    #[serde(skip_serializing_if = "Option::is_none")]
    cri_keychain: Option<CriKeychainState>,
}

#[derive(Serialize)]
struct CriKeychainState {
    socket: String,
    containerd_socket: String,
    credential_ttl_secs: u64,
    /// Repositories whose pull credentials the fetcher keeps.
    credentials: u32,
    calls: u64,
    pulls_with_auth: u64,
    handover_failures: u64,
}

#[derive(Serialize)]
struct ErrorEntry {
    service: &'static str,
    /// RFC 3339, UTC.
    time: String,
    unix_time: u64,
    subject: String,
    message: String,
}

fn errors(service: &'static str, list: Vec<pb::RecentError>) -> impl Iterator<Item = ErrorEntry> {
    list.into_iter().map(move |e| ErrorEntry {
        service,
        time: humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(e.unix_time))
            .to_string(),
        unix_time: e.unix_time,
        subject: e.subject,
        message: e.message,
    })
}

/// One RPC with the timeout, its error as one line.
async fn call<T>(
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    match tokio::time::timeout(RPC_TIMEOUT, fut).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        // Only a status the client made from a transport error means the
        // service is down; an UNAVAILABLE it sent means it is up and what
        // stands behind it failed.
        Ok(Err(s)) if stargaze_proto::Failure::of(&s) == stargaze_proto::Failure::NoAnswer => {
            Err(format!("not reachable: {}", s.message()))
        }
        Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
        Err(_) => Err(format!("no answer within {} s", RPC_TIMEOUT.as_secs())),
    }
}

pub fn run(args: Args) -> Result<ExitCode> {
    let (config, _) = stargaze_config::Config::load_with_origin(args.config.as_deref())
        .context("reading the stargaze configuration (pass --config PATH)")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let report = runtime.block_on(gather(&config));
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).context("encoding the report")?
        );
    } else {
        print_table(&report);
    }
    Ok(if report.services.iter().all(|s| s.up) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn gather(config: &stargaze_config::Config) -> Report {
    let sockets = [
        ("fetcher", config.fetcher.socket.clone()),
        ("fs", config.fs.socket.clone()),
        ("snapshotter", config.snapshotter.socket.clone()),
    ];
    let mut states: Vec<ServiceState> = sockets
        .iter()
        .map(|(name, socket)| ServiceState {
            name,
            socket: socket.display().to_string(),
            up: false,
            error: None,
        })
        .collect();
    let channel = |i: usize| stargaze_proto::connect_unix(&sockets[i].1).map_err(|e| e.to_string());

    let fetcher = channel(0).map(FetcherClient::new);
    let fetcher_status = match &fetcher {
        Ok(c) => call(c.clone().status(pb::StatusRequest {})).await,
        Err(e) => Err(e.clone()),
    };
    let fs = channel(1).map(FsClient::new);
    let fs_status = match &fs {
        Ok(c) => call(c.clone().status(pb::FsStatusRequest {})).await,
        Err(e) => Err(e.clone()),
    };
    let fs_list = match &fs {
        Ok(c) if fs_status.is_ok() => call(c.clone().list(pb::ListRequest {})).await.ok(),
        _ => None,
    };
    let snap_status = match channel(2).map(SnapshotterClient::new) {
        Ok(mut c) => call(c.status(pb::SnapshotterStatusRequest {})).await,
        Err(e) => Err(e),
    };
    for (state, result) in states.iter_mut().zip([
        fetcher_status.as_ref().err(),
        fs_status.as_ref().err(),
        snap_status.as_ref().err(),
    ]) {
        state.up = result.is_none();
        state.error = result.cloned();
    }

    // Every layer either the snapshotter records or fs has attached.
    let attached: BTreeMap<String, pb::AttachedLayer> = fs_list
        .map(|l| {
            l.layers
                .into_iter()
                .map(|a| (a.layer_digest.clone(), a))
                .collect()
        })
        .unwrap_or_default();
    let mut layer_images: BTreeMap<String, Vec<(String, Option<String>)>> = BTreeMap::new();
    if let Ok(s) = &snap_status {
        for r in &s.remote {
            layer_images
                .entry(r.layer_digest.clone())
                .or_default()
                .push((r.image_ref.clone(), Some(r.key.clone())));
        }
    }
    for d in attached.keys() {
        layer_images.entry(d.clone()).or_default();
    }

    let mut images: BTreeMap<String, Vec<LayerState>> = BTreeMap::new();
    for (digest, owners) in layer_images {
        let fetched = match &fetcher {
            Ok(c) if fetcher_status.is_ok() => {
                call(c.clone().layer_status(pb::LayerStatusRequest {
                    layer_digest: digest.clone(),
                }))
                .await
                .ok()
            }
            _ => None,
        };
        let a = attached.get(&digest);
        let f = fetched.clone().unwrap_or_default();
        let chunks = a.map(|a| a.chunks).unwrap_or(f.chunks);
        let chunks_present = a.map(|a| a.chunks_present).unwrap_or(f.chunks_present);
        let layer = LayerState {
            digest: digest.clone(),
            snapshot: None,
            attached: a.is_some(),
            bytes_total: f.file_bytes,
            bytes_fetched: f.file_bytes_present,
            chunks,
            chunks_present,
            prefetch_done: f.prefetch_done,
            complete: chunks > 0 && chunks_present == chunks,
            background_done: f.background_done,
            reads: a.map(|a| a.reads).unwrap_or(0),
            read_errors: a.map(|a| a.read_errors).unwrap_or(0),
            last_error: f.last_error.clone(),
        };
        let owners = if owners.is_empty() {
            // Attached, but no snapshot names it (the snapshotter is down,
            // or the layer waits for Cleanup): the fetcher knows its image.
            vec![(fetched.map(|f| f.image_ref).unwrap_or_default(), None)]
        } else {
            owners
        };
        for (image, snapshot) in owners {
            let mut l = layer.clone();
            l.snapshot = snapshot;
            let image = if image.is_empty() {
                "(unknown image)".to_string()
            } else {
                image
            };
            images.entry(image).or_default().push(l);
        }
    }
    let images = images
        .into_iter()
        .map(|(image, layers)| Image {
            bytes_total: layers.iter().map(|l| l.bytes_total).sum(),
            bytes_fetched: layers.iter().map(|l| l.bytes_fetched).sum(),
            image,
            layers,
        })
        .collect();

    let mut recent_errors = Vec::new();
    let read_hit_rate = fs_status.as_ref().ok().and_then(|s| {
        let all = s.bytes_from_cache + s.bytes_after_fetch;
        (all > 0).then(|| s.bytes_from_cache as f64 / all as f64)
    });
    let cache = fetcher_status.ok().map(|s| {
        recent_errors.extend(errors("fetcher", s.recent_errors));
        CacheState {
            dir: s.cache_dir,
            bytes_on_disk: s.cache_bytes,
            layers: s.layers,
            registry_bytes: s.bytes_fetched,
            registry_requests: s.requests,
            chunks_verified: s.chunks_verified,
            verification_failures: s.verification_failures,
            recovered_from_unclean_stop: s.recovered_from_unclean_stop,
            recovery: s.recovered_from_unclean_stop.then_some(RecoveryState {
                layers: s.recovery_layers,
                chunks_checked: s.recovery_chunks_checked,
                chunks_cleared: s.recovery_chunks_cleared,
                shared_checked: s.recovery_shared_checked,
                shared_removed: s.recovery_shared_removed,
                temps_removed: s.recovery_temps_removed,
                millis: s.recovery_millis,
            }),
            background_fetch: s.background_fetch,
            read_hit_rate,
            limit_bytes: s.cache_limit_bytes,
            kept_bytes: s.cache_kept_bytes,
            evicted_layers: s.evicted_layers,
            evicted_files: s.evicted_files,
            evicted_bytes: s.evicted_bytes,
        }
    });
    let fs = fs_status.ok().map(|s| {
        recent_errors.extend(errors("fs", s.recent_errors));
        FsState {
            mountpoint: s.mountpoint,
            layers: s.layers,
            fuse_threads: s.fuse_threads,
            transport: s.transport,
            ring_requests: s.ring_requests,
            passthrough: s.passthrough,
            bytes_from_cache: s.bytes_from_cache,
            bytes_after_fetch: s.bytes_after_fetch,
            read_errors: s.fetch_errors,
        }
    });
    let snapshotter = snap_status.ok().map(|s| {
        recent_errors.extend(errors("snapshotter", s.recent_errors));
        SnapshotterState {
            root: s.root,
            lazy_pull: s.lazy_pull,
            snapshots: s.snapshots,
            remote_snapshots: s.remote.len(),
            remote_prepared: s.remote_prepared,
            fallbacks: s.fallbacks,
            reattached: s.reattached,
            cri_keychain: s.cri_keychain.map(|k| CriKeychainState {
                socket: k.socket,
                containerd_socket: k.containerd_socket,
                credential_ttl_secs: k.credential_ttl_millis / 1000,
                credentials: k.credentials,
                calls: k.calls,
                pulls_with_auth: k.pulls_with_auth,
                handover_failures: k.handover_failures,
            }),
        }
    });
    recent_errors.sort_by_key(|e| e.unix_time);
    Report {
        services: states,
        images,
        cache,
        fs,
        snapshotter,
        recent_errors,
    }
}

fn mb(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}

fn percent(part: u64, all: u64) -> String {
    if all == 0 {
        "-".into()
    } else {
        format!("{:.0} %", part as f64 * 100.0 / all as f64)
    }
}

/// The first 12 hex digits of a layer digest; anything else (an error's
/// subject may be an image) unchanged.
pub fn short(subject: &str) -> std::borrow::Cow<'_, str> {
    match subject.parse::<Digest>() {
        Ok(d) => d.hex()[..12].to_string().into(),
        Err(_) => subject.into(),
    }
}

fn print_table(r: &Report) {
    println!("services");
    for s in &r.services {
        let state = if s.up { "up" } else { "DOWN" };
        print!("  {:<12} {:<5} {}", s.name, state, s.socket);
        if let Some(e) = &s.error {
            print!("  ({e})");
        }
        println!();
    }
    if let Some(f) = &r.fs {
        let transport = match f.transport.as_str() {
            "io_uring" => format!("FUSE over io_uring ({} requests)", f.ring_requests),
            "" => format!("{} FUSE threads", f.fuse_threads),
            t => format!("{} FUSE threads, {t}", f.fuse_threads),
        };
        println!(
            "  mount {} with {} layers, {}{}",
            f.mountpoint,
            f.layers,
            transport,
            if f.passthrough { ", passthrough" } else { "" }
        );
    }

    println!();
    if r.images.is_empty() {
        println!("no lazily pulled layers");
    } else {
        println!("lazily pulled images (file bytes in the cache / in the layers)");
    }
    let background = r.cache.as_ref().is_none_or(|c| c.background_fetch);
    for i in &r.images {
        println!(
            "  {}  {} layers, {} of {} fetched ({})",
            i.image,
            i.layers.len(),
            mb(i.bytes_fetched),
            mb(i.bytes_total),
            percent(i.bytes_fetched, i.bytes_total)
        );
        for l in &i.layers {
            let state = if !l.attached {
                "NOT ATTACHED (re-attached when a container uses it)"
            } else if l.complete {
                "complete"
            } else if !background && l.prefetch_done {
                "fetched on demand (background fetch off)"
            } else if l.background_done {
                "background fetch stopped"
            } else if l.prefetch_done {
                "background fetch running"
            } else {
                "prefetching"
            };
            println!(
                "    {}  {:>9} / {:<9} {:>5}  {state}{}",
                short(&l.digest),
                mb(l.bytes_fetched),
                mb(l.bytes_total),
                percent(l.bytes_fetched, l.bytes_total),
                if l.last_error.is_empty() {
                    String::new()
                } else {
                    format!("  last error: {}", l.last_error)
                }
            );
        }
    }

    println!();
    if let Some(c) = &r.cache {
        println!(
            "cache  {}: {} on disk, {} layers; {} from registries in {} requests; {} chunks verified, {} failed{}",
            c.dir,
            mb(c.bytes_on_disk),
            c.layers,
            mb(c.registry_bytes),
            c.registry_requests,
            c.chunks_verified,
            c.verification_failures,
            if c.recovered_from_unclean_stop {
                "; re-verified after an unclean stop"
            } else {
                ""
            }
        );
        if c.limit_bytes > 0 {
            println!(
                "       limit {}: {} evicted since start ({} layers, {} files); {} held by layers in use{}",
                mb(c.limit_bytes),
                mb(c.evicted_bytes),
                c.evicted_layers,
                c.evicted_files,
                mb(c.kept_bytes),
                if c.bytes_on_disk > c.limit_bytes {
                    " — over the limit: raise it or remove unused images"
                } else {
                    ""
                }
            );
        }
        if let Some(r) = &c.recovery {
            println!(
                "       re-verified after an unclean stop in {} ms: {} chunks of {} layers checked, {} torn chunks cleared (fetched again when read), {} of {} shared files removed, {} temporary files removed",
                r.millis,
                r.chunks_checked,
                r.layers,
                r.chunks_cleared,
                r.shared_removed,
                r.shared_checked,
                r.temps_removed
            );
        }
        if let Some(rate) = c.read_hit_rate {
            println!(
                "       reads served from the cache: {:.1} % of bytes",
                rate * 100.0
            );
        }
    }
    if let Some(s) = &r.snapshotter {
        println!(
            "snapshotter  {}: {} snapshots, {} remote; since start {} layers lazily pulled, {} unpacked instead, {} re-attached{}",
            s.root,
            s.snapshots,
            s.remote_snapshots,
            s.remote_prepared,
            s.fallbacks,
            s.reattached,
            if s.lazy_pull {
                ""
            } else {
                " (lazy_pull = false)"
            }
        );
        if let Some(k) = &s.cri_keychain {
            println!(
                "cri keychain {} -> containerd {}: {} repositories with pull credentials (ttl {} s); since start {} calls passed on, {} pulls with credentials, {} not handed to the fetcher",
                k.socket,
                k.containerd_socket,
                k.credentials,
                k.credential_ttl_secs,
                k.calls,
                k.pulls_with_auth,
                k.handover_failures
            );
        }
    }
    if !r.recent_errors.is_empty() {
        println!();
        println!("recent errors (oldest first)");
        for e in &r.recent_errors {
            println!(
                "  {} {:<11} {}  {}",
                e.time,
                e.service,
                short(&e.subject),
                e.message
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::call;

    /// A service that answered UNAVAILABLE is up (what stands behind it
    /// failed); only a status the client made from a transport error says
    /// the service is not reachable.
    #[tokio::test]
    async fn only_a_transport_failure_reads_as_not_reachable() {
        let sent = call::<()>(async { Err(tonic::Status::unavailable("registry down")) }).await;
        assert_eq!(sent.unwrap_err(), "Unavailable: registry down");
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let made = tonic::Status::from_error(Box::new(refused));
        let down = call::<()>(async move { Err(made) }).await.unwrap_err();
        assert!(down.starts_with("not reachable"), "{down}");
    }
}
