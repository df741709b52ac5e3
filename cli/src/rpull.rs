//! `stargaze rpull`: pull an image into containerd lazily, the way
//! `ctr-remote image rpull` does, against a plain containerd 1.6.
//!
//! The manifest and config come from the registry (our registry client:
//! hosts.toml, docker credentials, `--plain-http`) and go into containerd's
//! content store. Then each layer is prepared through containerd's snapshots
//! service with the labels the Go Stargz Snapshotter's pull handler sets
//! (`containerd.io/snapshot/remote/stargz.{reference,digest,layers,prefetch}`,
//! the layer's `containerd.io/snapshot/...` annotations such as
//! `stargz/toc.digest`, and `containerd.io/snapshot.ref` = the chain ID). A
//! remote snapshotter answers ALREADY_EXISTS: the layer is mounted lazily
//! and no byte of it is downloaded here. When it answers with mounts
//! instead (the layer cannot be pulled lazily), the layer blob is streamed
//! into the content store and containerd's diff service applies it, as
//! containerd's own unpacker would. Everything happens under a lease, so
//! garbage collection cannot take it away before the image record and the
//! config's `containerd.io/gc.ref.snapshot.<snapshotter>` label hold it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use oci_spec::image as oci;
use stargaze_format::Digest;
use stargaze_proto::containerd::services::content::v1 as content;
use stargaze_proto::containerd::services::diff::v1 as diff;
use stargaze_proto::containerd::services::images::v1 as images;
use stargaze_proto::containerd::services::leases::v1 as leases;
use stargaze_proto::containerd::services::snapshots::v1 as snapshots;
use stargaze_proto::containerd::types::Descriptor;
use stargaze_registry::{Client, ClientOptions, DockerConfig, Hosts, Platform, Reference};
use tonic::transport::Channel;
use tonic::{Code, Request};

const SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
const STARGZ_REF: &str = "containerd.io/snapshot/remote/stargz.reference";
const STARGZ_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";
const STARGZ_LAYERS: &str = "containerd.io/snapshot/remote/stargz.layers";
const STARGZ_PREFETCH: &str = "containerd.io/snapshot/remote/stargz.prefetch";
/// containerd refuses labels longer than this (key and value together).
const MAX_LABEL: usize = 4096;
/// Piece size when a layer must be downloaded (fallback); containerd takes
/// gRPC messages of at most 16 MiB.
const PIECE: u64 = 4 << 20;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image reference, e.g. registry.example.com/app:1.0 (docker.io names
    /// may be short).
    reference: String,
    /// containerd's gRPC socket.
    #[arg(
        long,
        short = 'a',
        default_value = "/run/containerd/containerd.sock",
        env = "CONTAINERD_ADDRESS"
    )]
    address: PathBuf,
    /// containerd namespace.
    #[arg(
        long,
        short = 'n',
        default_value = "default",
        env = "CONTAINERD_NAMESPACE"
    )]
    namespace: String,
    /// The snapshotter (containerd's name for the stargaze proxy plugin).
    #[arg(long, default_value = "stargaze")]
    snapshotter: String,
    /// Talk plain HTTP to the registry.
    #[arg(long)]
    plain_http: bool,
    /// Bytes of each layer to prefetch when it has no prefetch landmark
    /// (sent as containerd.io/snapshot/remote/stargz.prefetch); 0 leaves it
    /// to the fetcher's `prefetch_size`. A size such as 8MiB (K/M/G and
    /// KiB/MiB/GiB are powers of 1024, KB/MB/GB of 1000).
    #[arg(long, default_value = "0", value_parser = crate::parse_size)]
    prefetch_size: u64,
    /// Platform of the image to pull from an index (os/arch[/variant]);
    /// default: this machine's.
    #[arg(long)]
    platform: Option<String>,
    /// Directory of containerd `hosts.toml` files (mirrors, CAs, headers).
    #[arg(long, default_value = "/etc/containerd/certs.d")]
    hosts_dir: PathBuf,
    /// No progress display.
    #[arg(long, short)]
    quiet: bool,
}

impl Args {
    /// A quiet lazy pull of `reference` (for `stargaze optimize`).
    pub fn lazy(
        reference: &str,
        address: &std::path::Path,
        namespace: &str,
        snapshotter: &str,
        plain_http: bool,
        hosts_dir: &std::path::Path,
    ) -> Args {
        Args {
            reference: reference.to_string(),
            address: address.to_path_buf(),
            namespace: namespace.to_string(),
            snapshotter: snapshotter.to_string(),
            plain_http,
            prefetch_size: 0,
            platform: None,
            hosts_dir: hosts_dir.to_path_buf(),
            quiet: true,
        }
    }
}

/// containerd's services on one connection, with the namespace and lease
/// headers containerd reads.
struct Containerd {
    channel: Channel,
    namespace: String,
    lease: Option<String>,
}

impl Containerd {
    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        // Both values were checked to be valid header text at start.
        if let Ok(v) = self.namespace.parse() {
            r.metadata_mut().insert("containerd-namespace", v);
        }
        if let Some(l) = &self.lease
            && let Ok(v) = l.parse()
        {
            r.metadata_mut().insert("containerd-lease", v);
        }
        r
    }

    fn content(&self) -> content::content_client::ContentClient<Channel> {
        content::content_client::ContentClient::new(self.channel.clone())
            .max_decoding_message_size(64 << 20)
    }

    fn snapshots(&self) -> snapshots::snapshots_client::SnapshotsClient<Channel> {
        snapshots::snapshots_client::SnapshotsClient::new(self.channel.clone())
    }

    /// Store a small blob; already present is fine (its labels are updated).
    async fn write_content(
        &self,
        digest: &str,
        data: Vec<u8>,
        labels: HashMap<String, String>,
    ) -> anyhow::Result<()> {
        let msg = content::WriteContentRequest {
            action: content::WriteAction::Commit as i32,
            r#ref: format!("stargaze-rpull-{digest}"),
            total: data.len() as i64,
            expected: digest.to_string(),
            offset: 0,
            data,
            labels: labels.clone(),
        };
        let deadline = Instant::now() + LOCKED_REF_PATIENCE;
        let mut wait = Duration::from_millis(16);
        let result = loop {
            let result = async {
                let mut s = self
                    .content()
                    .write(self.req(tokio_stream::iter(vec![msg.clone()])))
                    .await?
                    .into_inner();
                while s.message().await?.is_some() {}
                Ok::<(), tonic::Status>(())
            }
            .await;
            match result {
                // Another pull is storing the same blob.
                Err(s) if ref_locked(&s) && Instant::now() < deadline => {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
                r => break r,
            }
        };
        match result {
            Ok(()) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => self.set_labels(digest, labels).await,
            Err(s) => Err(anyhow!(
                "storing {digest} in containerd's content store: {}",
                s.message()
            )),
        }
    }

    /// Set some labels of a blob in the content store.
    async fn set_labels(
        &self,
        digest: &str,
        labels: HashMap<String, String>,
    ) -> anyhow::Result<()> {
        if labels.is_empty() {
            return Ok(());
        }
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        self.content()
            .update(self.req(content::UpdateRequest {
                info: Some(content::Info {
                    digest: digest.to_string(),
                    labels,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask { paths }),
            }))
            .await
            .map_err(|s| anyhow!("labelling {digest} in containerd: {}", s.message()))?;
        Ok(())
    }
}

/// Chain IDs of a layer stack (OCI image spec: sha256 of "parent diffid").
fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let id = match out.last() {
            None => d.clone(),
            Some(parent) => Digest::of(format!("{parent} {d}").as_bytes()).to_string(),
        };
        out.push(id);
    }
    out
}

/// The labels of one layer's Prepare, as the Go snapshotter's pull handler
/// and containerd's unpacker build them together.
fn layer_labels(
    reference: &str,
    layers: &[oci::Descriptor],
    i: usize,
    chain_id: &str,
    prefetch: u64,
) -> HashMap<String, String> {
    let mut l = HashMap::new();
    for (k, v) in layers[i].annotations().iter().flatten() {
        if k.starts_with("containerd.io/snapshot/") {
            l.insert(k.clone(), v.clone());
        }
    }
    let digest = layers[i].digest().to_string();
    l.insert(STARGZ_REF.into(), reference.to_string());
    l.insert(STARGZ_DIGEST.into(), digest.to_string());
    // This layer and the ones above it, as far as the label size allows
    // (only a hint for prefetching the next layers).
    let mut list = String::new();
    for d in layers[i..].iter().map(|l| l.digest().to_string()) {
        let next = if list.is_empty() {
            d.to_string()
        } else {
            format!("{list},{d}")
        };
        if STARGZ_LAYERS.len() + next.len() > MAX_LABEL {
            break;
        }
        list = next;
    }
    l.insert(STARGZ_LAYERS.into(), list);
    l.insert(STARGZ_PREFETCH.into(), prefetch.to_string());
    l.insert(SNAPSHOT_REF.into(), chain_id.to_string());
    l
}

fn parse_platform(s: &str) -> anyhow::Result<Platform> {
    let parts: Vec<&str> = s.split('/').collect();
    match parts.as_slice() {
        [os, arch] => Ok(Platform {
            os: os.to_string(),
            architecture: arch.to_string(),
            variant: None,
        }),
        [os, arch, variant] => Ok(Platform {
            os: os.to_string(),
            architecture: arch.to_string(),
            variant: Some(variant.to_string()),
        }),
        _ => bail!("--platform {s:?}: expected os/arch or os/arch/variant, e.g. linux/amd64"),
    }
}

fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}-{nanos}", std::process::id())
}

/// What the registry said about the image.
struct ImageParts {
    reference: Reference,
    /// The image name in containerd.
    name: String,
    layers: Vec<oci::Descriptor>,
    diff_ids: Vec<String>,
    chain: Vec<String>,
}

/// The part of an image config a pull needs. Only `rootfs` is read, as
/// containerd's unpacker does: oci-spec's whole `ImageConfiguration` would
/// also require `architecture` and `os`, which containerd does not check.
#[derive(serde::Deserialize)]
struct ConfigRootFs {
    rootfs: oci::RootFs,
}

/// How a layer ended up.
enum LayerOutcome {
    Present,
    Lazy,
    Unpacked(u64),
}

pub fn run(args: Args) -> anyhow::Result<std::process::ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(rpull(args))?;
    Ok(std::process::ExitCode::SUCCESS)
}

async fn rpull(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let reference = Reference::parse(&args.reference).map_err(|e| anyhow!("{e}"))?;
    let name = reference.to_string();
    let platform = match &args.platform {
        Some(p) => parse_platform(p)?,
        None => Platform::host(),
    };
    if args
        .namespace
        .parse::<tonic::metadata::MetadataValue<_>>()
        .is_err()
    {
        bail!("namespace {:?} is not valid header text", args.namespace);
    }

    // The registry side.
    let mut hosts = Hosts::new().with_hosts_dir(&args.hosts_dir);
    if args.plain_http {
        hosts = hosts.with_plain_http(&reference.host);
    }
    let registry = Client::new(hosts, DockerConfig::from_env(), ClientOptions::default());
    let manifest = registry
        .resolve_manifest(&reference, &platform)
        .await
        .map_err(|e| anyhow!("{name}: {e}"))?;
    let m = oci::ImageManifest::from_reader(&manifest.bytes[..]).with_context(|| {
        format!(
            "{name}: the manifest {} is not an OCI or Docker image manifest",
            manifest.digest
        )
    })?;
    let config_digest = m.config().digest().to_string();
    let layers = m.layers().clone();
    tracing::debug!(elapsed = ?started.elapsed(), manifest = %manifest.digest, "manifest resolved");
    let config = registry
        .fetch_small_blob(&reference, &config_digest)
        .await
        .map_err(|e| anyhow!("{name}: config {config_digest}: {e}"))?;
    let diff_ids = serde_json::from_slice::<ConfigRootFs>(&config)
        .with_context(|| format!("{name}: the config {config_digest} has no rootfs.diff_ids"))?
        .rootfs
        .diff_ids()
        .clone();
    if diff_ids.len() != layers.len() {
        bail!(
            "{name}: the config lists {} diff IDs for {} layers; the image is inconsistent",
            diff_ids.len(),
            layers.len()
        );
    }
    let chain = chain_ids(&diff_ids);
    tracing::debug!(elapsed = ?started.elapsed(), "config fetched");

    // containerd, under a lease that expires by itself if we die.
    let channel = stargaze_proto::connect_unix(&args.address)
        .with_context(|| format!("containerd at {}", args.address.display()))?;
    let mut ctd = Containerd {
        channel,
        namespace: args.namespace.clone(),
        lease: None,
    };
    let lease_id = format!("stargaze-rpull-{}", unique_suffix());
    let expire = humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(3600));
    leases::leases_client::LeasesClient::new(ctd.channel.clone())
        .create(ctd.req(leases::CreateRequest {
            id: lease_id.clone(),
            labels: [("containerd.io/gc.expire".to_string(), expire.to_string())].into(),
        }))
        .await
        .map_err(|s| {
            anyhow!(
                "containerd at {}: {} (is containerd running, and is this the right --address?)",
                args.address.display(),
                s.message()
            )
        })?;
    ctd.lease = Some(lease_id.clone());
    tracing::debug!(elapsed = ?started.elapsed(), "lease created");

    let parts = ImageParts {
        reference: reference.clone(),
        name: name.clone(),
        layers: layers.clone(),
        diff_ids,
        chain: chain.clone(),
    };
    // Config and manifest, with the references garbage collection follows.
    let host_label = format!("containerd.io/distribution.source.{}", reference.host);
    let mut config_labels = HashMap::from([(host_label.clone(), reference.repository.clone())]);
    if let Some(top) = chain.last() {
        config_labels.insert(
            format!("containerd.io/gc.ref.snapshot.{}", args.snapshotter),
            top.clone(),
        );
    }
    let mut manifest_labels = HashMap::from([
        (host_label, reference.repository.clone()),
        (
            "containerd.io/gc.ref.content.config".to_string(),
            config_digest.clone(),
        ),
    ]);
    for (i, l) in layers.iter().enumerate() {
        manifest_labels.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            l.digest().to_string(),
        );
    }
    // Stored while the layers are prepared (the lease keeps them): each
    // commit is a containerd transaction with an fsync, off the path of the
    // remote snapshots.
    let content = async {
        ctd.write_content(&config_digest, config.to_vec(), config_labels)
            .await?;
        ctd.write_content(&manifest.digest, manifest.bytes.to_vec(), manifest_labels)
            .await
    };
    let (result, stored) = tokio::join!(pull_into(&ctd, &args, &registry, &parts), content);
    let outcome = match result.and_then(|o| stored.map(|()| o)) {
        Ok(o) => o,
        Err(e) => {
            delete_lease(&ctd, &lease_id).await;
            return Err(e);
        }
    };
    tracing::debug!(elapsed = ?started.elapsed(), "layers prepared");
    let media_type = m
        .media_type()
        .as_ref()
        .map(|t| t.to_string())
        .unwrap_or_else(|| manifest.media_type.clone());
    let image = images::Image {
        name: name.clone(),
        target: Some(Descriptor {
            media_type,
            digest: manifest.digest.clone(),
            size: manifest.bytes.len() as i64,
            annotations: HashMap::new(),
        }),
        ..Default::default()
    };
    let mut images_client = images::images_client::ImagesClient::new(ctd.channel.clone());
    let created = images_client
        .create(ctd.req(images::CreateImageRequest {
            image: Some(image.clone()),
        }))
        .await;
    match created {
        Ok(_) => {}
        Err(s) if s.code() == Code::AlreadyExists => {
            images_client
                .update(ctd.req(images::UpdateImageRequest {
                    image: Some(image),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["target".into()],
                    }),
                }))
                .await
                .map_err(|s| anyhow!("updating image {name} in containerd: {}", s.message()))?;
        }
        Err(s) => {
            delete_lease(&ctd, &lease_id).await;
            bail!("creating image {name} in containerd: {}", s.message());
        }
    }
    delete_lease(&ctd, &lease_id).await;

    if !args.quiet {
        let lazy = outcome
            .iter()
            .filter(|o| matches!(o, LayerOutcome::Lazy))
            .count();
        let present = outcome
            .iter()
            .filter(|o| matches!(o, LayerOutcome::Present))
            .count();
        let unpacked: Vec<u64> = outcome
            .iter()
            .filter_map(|o| match o {
                LayerOutcome::Unpacked(b) => Some(*b),
                _ => None,
            })
            .collect();
        eprintln!(
            "{name}: {} layers: {lazy} mounted lazily, {present} already present, {} downloaded and unpacked ({:.1} MB); {:.2} s",
            outcome.len(),
            unpacked.len(),
            unpacked.iter().sum::<u64>() as f64 / 1e6,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

async fn delete_lease(ctd: &Containerd, id: &str) {
    let _ = leases::leases_client::LeasesClient::new(ctd.channel.clone())
        .delete(ctd.req(leases::DeleteRequest {
            id: id.to_string(),
            sync: false,
        }))
        .await;
}

/// Prepare every layer through containerd's snapshots service.
async fn pull_into(
    ctd: &Containerd,
    args: &Args,
    registry: &Client,
    image: &ImageParts,
) -> anyhow::Result<Vec<LayerOutcome>> {
    let ImageParts {
        reference,
        name,
        layers,
        diff_ids,
        chain,
    } = image;
    let bars = MultiProgress::new();
    if args.quiet {
        bars.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let style = ProgressStyle::with_template("{prefix} {msg}").expect("static template");
    let mut out = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        let digest = layer.digest().to_string();
        let digest = digest.as_str();
        let short = &digest[..digest.len().min(19)];
        let bar = bars.add(ProgressBar::new_spinner());
        bar.set_style(style.clone());
        bar.set_prefix(short.to_string());
        bar.set_message("preparing");
        let parent = if i == 0 { "" } else { chain[i - 1].as_str() };
        let mut snaps = ctd.snapshots();
        // Already there (an earlier pull of an image sharing the layers).
        let stat = snaps
            .stat(ctd.req(snapshots::StatSnapshotRequest {
                snapshotter: args.snapshotter.clone(),
                key: chain[i].clone(),
            }))
            .await;
        if stat.is_ok() {
            bar.finish_with_message("already present");
            out.push(LayerOutcome::Present);
            continue;
        }
        let key = format!("extract-{} {}", unique_suffix(), chain[i]);
        let labels = layer_labels(name, layers, i, &chain[i], args.prefetch_size);
        let prepared = snaps
            .prepare(ctd.req(snapshots::PrepareSnapshotRequest {
                snapshotter: args.snapshotter.clone(),
                key: key.clone(),
                parent: parent.to_string(),
                labels,
            }))
            .await;
        let mounts = match prepared {
            Err(s) if s.code() == Code::AlreadyExists => {
                tracing::debug!(layer = digest, "remote snapshot prepared");
                bar.finish_with_message("mounted lazily (remote snapshot)");
                out.push(LayerOutcome::Lazy);
                continue;
            }
            Err(s) => bail!(
                "{name}: preparing layer {digest} with snapshotter {:?}: {} (is the snapshotter registered in containerd's [proxy_plugins]?)",
                args.snapshotter,
                s.message()
            ),
            Ok(r) => r.into_inner().mounts,
        };
        // Not lazily pullable: download and apply it like containerd would.
        bar.set_message("cannot be pulled lazily: downloading");
        let applied = unpack_layer(ctd, registry, reference, layer, mounts, &bar).await;
        let diff_id = match applied {
            Ok(d) => d,
            Err(e) => {
                remove_snapshot(ctd, args, &key).await;
                return Err(e.context(format!("{name}: layer {digest}")));
            }
        };
        if diff_id != diff_ids[i] {
            remove_snapshot(ctd, args, &key).await;
            bail!(
                "{name}: layer {digest} unpacked to {diff_id}, but the image config says {}; the image is corrupt",
                diff_ids[i]
            );
        }
        let size = layer.size();
        let committed = snaps
            .commit(ctd.req(snapshots::CommitSnapshotRequest {
                snapshotter: args.snapshotter.clone(),
                name: chain[i].clone(),
                key: key.clone(),
                labels: HashMap::new(),
                parent: String::new(),
            }))
            .await;
        match committed {
            Ok(_) => {}
            // Another pull committed the same chain meanwhile.
            Err(s) if s.code() == Code::AlreadyExists => remove_snapshot(ctd, args, &key).await,
            Err(s) => {
                remove_snapshot(ctd, args, &key).await;
                bail!("{name}: committing layer {digest}: {}", s.message());
            }
        }
        bar.finish_with_message(format!(
            "downloaded and unpacked ({:.1} MB)",
            size as f64 / 1e6
        ));
        out.push(LayerOutcome::Unpacked(size));
    }
    Ok(out)
}

async fn remove_snapshot(ctd: &Containerd, args: &Args, key: &str) {
    let _ = ctd
        .snapshots()
        .remove(ctd.req(snapshots::RemoveSnapshotRequest {
            snapshotter: args.snapshotter.clone(),
            key: key.to_string(),
        }))
        .await;
}

/// Stream a layer blob into the content store and apply it to `mounts`
/// with containerd's diff service; returns the applied diff ID.
async fn unpack_layer(
    ctd: &Containerd,
    registry: &Client,
    reference: &Reference,
    layer: &oci::Descriptor,
    mounts: Vec<stargaze_proto::containerd::types::Mount>,
    bar: &ProgressBar,
) -> anyhow::Result<String> {
    let digest = layer.digest().to_string();
    let media_type = layer.media_type().to_string();
    let blob = registry.blob(reference, &digest);
    let size = blob.size().await.map_err(|e| anyhow!("{e}"))?;
    let deadline = Instant::now() + LOCKED_REF_PATIENCE;
    let mut wait = Duration::from_millis(16);
    loop {
        match store_blob(ctd, &blob, &digest, size, bar).await? {
            Ok(()) => break,
            // Stored meanwhile by another pull (or before this one).
            Err(s) if s.code() == Code::AlreadyExists => break,
            Err(s) if ref_locked(&s) && Instant::now() < deadline => {
                bar.set_message("another pull is storing this layer: waiting for it");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(1));
            }
            Err(s) => bail!("storing the layer blob in containerd: {}", s.message()),
        }
    }
    bar.set_message("applying");
    let applied = diff::diff_client::DiffClient::new(ctd.channel.clone())
        .apply(ctd.req(diff::ApplyRequest {
            diff: Some(Descriptor {
                media_type,
                digest: digest.clone(),
                size: size as i64,
                annotations: HashMap::new(),
            }),
            mounts,
            payloads: HashMap::new(),
        }))
        .await
        .map_err(|s| anyhow!("applying the layer: {}", s.message()))?
        .into_inner();
    Ok(applied.applied.map(|d| d.digest).unwrap_or_default())
}

/// How long a pull waits for another one storing the same blob.
const LOCKED_REF_PATIENCE: Duration = Duration::from_secs(600);

/// containerd lets one writer at a time have a content ref (`ref ...
/// locked for ...: unavailable`): another pull of an image with this blob
/// is storing it under the same ref. containerd's own client waits for it
/// and then finds the blob stored (`errdefs.IsUnavailable`: by the code
/// containerd sent, not its text); so does rpull. An UNAVAILABLE that
/// tonic made because containerd could not be reached is not a lock.
fn ref_locked(s: &tonic::Status) -> bool {
    stargaze_proto::Failure::of(s) == stargaze_proto::Failure::Unavailable
}

/// Stream a layer blob from the registry into the content store under the
/// ref `stargaze-rpull-<digest>`. The outer error is the registry's, the
/// inner one containerd's answer.
async fn store_blob(
    ctd: &Containerd,
    blob: &stargaze_registry::Blob,
    digest: &str,
    size: u64,
    bar: &ProgressBar,
) -> anyhow::Result<Result<(), tonic::Status>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<content::WriteContentRequest>(2);
    let write_ref = format!("stargaze-rpull-{digest}");
    let mut content_client = ctd.content();
    let responses = content_client.write(ctd.req(tokio_stream::wrappers::ReceiverStream::new(rx)));
    let producer = async move {
        let mut offset = 0u64;
        while offset < size {
            let end = (offset + PIECE).min(size);
            let data = blob
                .read_ranges(std::slice::from_ref(&(offset..end)))
                .await
                .map_err(|e| anyhow!("{e}"))?
                .pop()
                .unwrap_or_default();
            let last = end == size;
            let msg = content::WriteContentRequest {
                action: if last {
                    content::WriteAction::Commit
                } else {
                    content::WriteAction::Write
                } as i32,
                r#ref: write_ref.clone(),
                total: size as i64,
                expected: digest.to_string(),
                offset: offset as i64,
                data: data.to_vec(),
                labels: HashMap::new(),
            };
            if tx.send(msg).await.is_err() {
                break;
            }
            offset = end;
            bar.set_message(format!(
                "cannot be pulled lazily: downloading {:.1}/{:.1} MB",
                offset as f64 / 1e6,
                size as f64 / 1e6
            ));
        }
        Ok::<(), anyhow::Error>(())
    };
    let consumer = async {
        let mut s = responses.await?.into_inner();
        while s.message().await?.is_some() {}
        Ok::<(), tonic::Status>(())
    };
    let (produced, consumed) = tokio::join!(producer, consumer);
    match (produced, consumed) {
        // containerd refused the write at once (the producer stopped
        // sending when the call ended): its answer is what counts.
        (_, Err(s)) if ref_locked(&s) || s.code() == Code::AlreadyExists => Ok(Err(s)),
        (Err(e), _) => Err(e),
        (Ok(()), consumed) => Ok(consumed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A locked ref is containerd's UNAVAILABLE answer, whatever its text;
    /// a containerd that could not be reached is not a lock to wait on.
    #[test]
    fn a_locked_ref_is_told_by_the_code_containerd_sent() {
        assert!(ref_locked(&tonic::Status::unavailable(
            "ref bench/1/stargaze-rpull-sha256:ab locked for 2s: unavailable"
        )));
        assert!(ref_locked(&tonic::Status::unavailable("another wording")));
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let mut down = tonic::Status::from_error(Box::new(refused));
        assert!(!ref_locked(&down));
        down = tonic::Status::already_exists("content sha256:ab: already exists");
        assert!(!ref_locked(&down));
    }

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let c = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(c[0], a);
        assert_eq!(c[1], Digest::of(format!("{a} {b}").as_bytes()).to_string());
    }

    #[test]
    fn layer_labels_carry_both_sets() {
        let layers: Vec<oci::Descriptor> = (0..3)
            .map(|i| {
                serde_json::from_value(serde_json::json!({
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": format!("sha256:{i:064}"),
                    "size": 1,
                    "annotations": {
                        "containerd.io/snapshot/stargz/toc.digest": "sha256:toc",
                        "io.containers.estargz.uncompressed-size": "1"
                    }
                }))
                .unwrap()
            })
            .collect();
        let l = layer_labels("r/a:1", &layers, 1, "sha256:chain", 0);
        assert_eq!(l[SNAPSHOT_REF], "sha256:chain");
        assert_eq!(l["containerd.io/snapshot/stargz/toc.digest"], "sha256:toc");
        assert!(!l.contains_key("io.containers.estargz.uncompressed-size"));
        assert_eq!(l[STARGZ_LAYERS].split(',').count(), 2);
        assert_eq!(l[STARGZ_DIGEST], format!("sha256:{:064}", 1));
    }
}
