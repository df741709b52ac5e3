//! `stargaze.v1.Fetcher` over the engine: resolved layers by digest,
//! prefetch and background fetch, status.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use stargaze_cache::Cache;
use stargaze_format::{
    Digest, Prefetch, TOC_DIGEST_ANNOTATION, ZSTD_V2_MANIFEST_CHECKSUM_ANNOTATION,
    manifest_checksum_annotation,
};
use stargaze_proto::v1::fetcher_server::Fetcher;
use stargaze_proto::v1::*;
use stargaze_registry::Reference;
use stargaze_service::metrics::{RecentErrors, RpcMetrics};
use tokio::sync::OnceCell;
use tonic::{Request, Response, Status};

use crate::blob::RemoteBlob;
use crate::engine::Layer;
use crate::error::FetchError;
use crate::evict::CacheLimit;
use crate::options::FetchOptions;
use crate::registry::{RegistryBlob, WarmBlob, WarmTail};
use crate::resolve::{TocCheck, resolve_with_toc};
use stargaze_cache::EvictOptions;

/// Label that lets a layer without `toc.digest` through when the request allows it.
const SKIP_VERIFY_LABEL: &str = "containerd.io/snapshot/remote/stargz.skipverify";
/// Ranges per engine call while prefetching (bounds memory per call).
const PREFETCH_BATCH: usize = 256;
/// Batches in flight at once, so that reading one overlaps decoding another.
const PREFETCH_PARALLEL: usize = 4;
/// Ranges per background batch: small, so that on-demand reads arriving
/// meanwhile wait for at most one of them on the link.
const BACKGROUND_BATCH: usize = 16;
/// A layer tail read ahead once (`None`: the read failed; the resolve then
/// reads it itself and reports the error).
type TailCell = Arc<OnceCell<Option<Arc<WarmTail>>>>;

/// An image's manifest, read once (`None`: it could not be read).
type ManifestCell = Arc<OnceCell<Option<Arc<serde_json::Value>>>>;
/// How long a manifest read by reference is used again: the length of a
/// pull, not longer, since a tag may move.
const MANIFEST_TTL: Duration = Duration::from_secs(60);
/// Manifests kept at most.
const MAX_MANIFESTS: usize = 256;

/// Layer tails (each `tail_window` bytes) WarmLayers keeps at most.
const MAX_WARM_TAILS: usize = 256;
/// Default quiet period before background fetches (the Go snapshotter
/// waits 2 s of silence too).
pub const DEFAULT_BACKGROUND_SILENCE: Duration = Duration::from_secs(2);
/// Default upper bound on that wait: cold starts of ordinary containers are
/// over well before it.
pub const DEFAULT_BACKGROUND_MAX_WAIT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct LayerInfo {
    image_ref: Mutex<String>,
    prefetch_done: AtomicBool,
    /// The background fetch was started (once per layer, however many
    /// prefetches ask for it).
    background_started: AtomicBool,
    background_done: AtomicBool,
    last_error: Mutex<String>,
    /// The sha256 of the layer's compressed TOC, once known (what a
    /// zstd:chunked manifest checksum names).
    toc_checksum: Mutex<Option<Digest>>,
}

pub(crate) struct Shared {
    pub(crate) cache: Arc<Cache>,
    pub(crate) client: stargaze_registry::Client,
    opts: FetchOptions,
    /// Bytes prefetched when the layer has no landmark and no label.
    prefetch_size: u64,
    background: bool,
    /// Background fetches wait until on-demand work has been quiet this long.
    background_silence: Duration,
    /// ... but for at most this long after the layer's prefetch.
    background_max_wait: Duration,
    /// Node-wide cap on background fetching, compressed bytes per second
    /// (0 = none), and when the budget spent so far runs out.
    background_bandwidth: u64,
    background_budget: Mutex<Instant>,
    /// Files the entrypoint prefetch fetched.
    pub(crate) entrypoint_files: AtomicU64,
    /// ... and their uncompressed bytes.
    pub(crate) entrypoint_bytes: AtomicU64,
    /// Prefetch each new image's entrypoint chain (`entrypoint.rs`).
    entrypoint: bool,
    activity: Activity,
    /// Tails read ahead by WarmLayers, by digest, until the layer's resolve
    /// takes them.
    tails: Mutex<HashMap<String, TailCell>>,
    layers: Mutex<HashMap<String, Arc<OnceCell<Arc<Layer>>>>>,
    /// Image manifests by reference, read once for WarmLayers and for the
    /// zstd:chunked checksums that containerd does not pass as labels;
    /// kept for [`MANIFEST_TTL`].
    manifests: Mutex<HashMap<String, (Instant, ManifestCell)>>,
    info: Mutex<HashMap<String, Arc<LayerInfo>>>,
    /// Failures users should see in `stargaze status`.
    errors: RecentErrors,
    /// Requests served, by method and code (Prometheus).
    pub(crate) rpc: Arc<RpcMetrics>,
    /// The cache's size limit, when one is set.
    pub(crate) cache_limit: Option<Arc<CacheLimit>>,
}

impl Shared {
    /// The tail WarmLayers read (or is reading) for a layer, taken out of
    /// the map; `None` when none was asked for, so a resolve that can reuse
    /// the index in the cache never touches the registry.
    async fn take_warm_tail(&self, digest: &str) -> Option<Arc<WarmTail>> {
        let cell = self.tails.lock().get(digest).cloned()?;
        let tail = cell.get_or_init(|| async { None }).await.clone();
        self.tails.lock().remove(digest);
        tail
    }
}

/// On-demand work (reads fs waits for, layer resolution) in flight and when
/// it last ended. Background fetches share the registry link with it and
/// would make a cold start wait behind whole layers, so they only run after
/// a quiet period and pause between batches while on-demand work runs.
struct Activity {
    in_flight: AtomicUsize,
    last_end: Mutex<Instant>,
    /// Background fetches wait until then whatever their deadline: a
    /// container is starting (PauseBackground).
    held_until: Mutex<Instant>,
}

/// Marks one piece of on-demand work while alive.
struct OnDemand<'a>(&'a Activity);

impl Drop for OnDemand<'_> {
    fn drop(&mut self) {
        *self.0.last_end.lock() = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Activity {
    fn new() -> Activity {
        Activity {
            in_flight: AtomicUsize::new(0),
            last_end: Mutex::new(Instant::now()),
            held_until: Mutex::new(Instant::now()),
        }
    }

    /// Hold background fetches for `d` from now.
    fn hold(&self, d: Duration) {
        let mut until = self.held_until.lock();
        *until = (*until).max(Instant::now() + d);
    }

    fn begin(&self) -> OnDemand<'_> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        OnDemand(self)
    }

    /// Wait until nothing on-demand has run for `silence`, or until
    /// `deadline`: a workload that never pauses (a build, a test suite, one
    /// reading most of the image) would otherwise starve the background
    /// fetch and pay a small request per miss for the whole layer.
    async fn quiet(&self, silence: Duration, deadline: Instant) {
        loop {
            let held = *self.held_until.lock();
            if held > Instant::now() {
                tokio::time::sleep_until(held.into()).await;
                continue;
            }
            let busy = self.in_flight.load(Ordering::Acquire) > 0;
            let since = self.last_end.lock().elapsed();
            let now = Instant::now();
            if (!busy && since >= silence) || now >= deadline {
                return;
            }
            let wait = if busy { silence } else { silence - since };
            let wait = wait.min(deadline - now);
            tokio::time::sleep(wait.max(Duration::from_millis(10))).await;
        }
    }
}

/// When a shared bandwidth budget that ran out at `budget` runs out after
/// spending `bytes` more at `rate` bytes/s: time already idle is not saved up.
fn pace(budget: Instant, now: Instant, bytes: u64, rate: u64) -> Instant {
    budget.max(now) + Duration::from_secs_f64(bytes as f64 / rate.max(1) as f64)
}

/// The fetcher's gRPC service.
#[derive(Clone)]
pub struct FetcherService {
    pub(crate) shared: Arc<Shared>,
}

fn status_of(e: &FetchError) -> Status {
    let msg = e.to_string();
    if e.is_not_lazy() {
        Status::failed_precondition(msg)
    } else {
        match e {
            FetchError::NoSuchInode { .. } => Status::invalid_argument(msg),
            FetchError::Blob { source, .. } if source.retryable => Status::unavailable(msg),
            FetchError::Chunk { .. } => Status::data_loss(msg),
            _ => Status::internal(msg),
        }
    }
}

/// The TOC blob of an external-TOC layer: the layer of the `<tag>-esgztoc`
/// image (same registry and repository) annotated with the layer's digest.
async fn external_toc(
    shared: &Shared,
    reference: &Reference,
    digest: &str,
) -> Result<Vec<u8>, FetchError> {
    let missing = || FetchError::ExternalToc {
        layer: digest.to_string(),
    };
    let mut toc_ref = reference.clone();
    toc_ref.tag = Some(format!(
        "{}{}",
        reference.tag.as_deref().unwrap_or("latest"),
        stargaze_format::EXTERNAL_TOC_REF_SUFFIX
    ));
    toc_ref.digest = None;
    let manifest = shared
        .client
        .resolve_manifest(&toc_ref, &stargaze_registry::Platform::host())
        .await
        .map_err(|e| {
            tracing::warn!(layer = %digest, toc_image = %toc_ref, error = %e, "no external TOC image");
            missing()
        })?;
    let v: serde_json::Value = serde_json::from_slice(&manifest.bytes).map_err(|_| missing())?;
    let toc_digest = v["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| l["annotations"][stargaze_format::TOC_LAYER_DIGEST_ANNOTATION] == digest)
        .and_then(|l| l["digest"].as_str())
        .ok_or_else(missing)?
        .to_string();
    let bytes = shared
        .client
        .fetch_blob(&toc_ref, &toc_digest, shared.opts.max_toc_size)
        .await
        .map_err(|e| FetchError::Blob {
            layer: digest.to_string(),
            source: crate::blob::BlobError {
                blob: format!("{toc_ref}@{toc_digest}"),
                message: e.to_string(),
                retryable: e.is_transient(),
            },
        })?;
    Ok(bytes.to_vec())
}

impl FetcherService {
    pub fn new(
        cache: Arc<Cache>,
        client: stargaze_registry::Client,
        opts: FetchOptions,
        prefetch_size: u64,
        background: bool,
    ) -> FetcherService {
        FetcherService {
            shared: Arc::new(Shared {
                cache,
                client,
                opts,
                prefetch_size,
                background,
                background_silence: DEFAULT_BACKGROUND_SILENCE,
                background_max_wait: DEFAULT_BACKGROUND_MAX_WAIT,
                background_bandwidth: 0,
                background_budget: Mutex::new(Instant::now()),
                entrypoint: true,
                entrypoint_files: AtomicU64::new(0),
                entrypoint_bytes: AtomicU64::new(0),
                activity: Activity::new(),
                tails: Mutex::new(HashMap::new()),
                layers: Mutex::new(HashMap::new()),
                manifests: Mutex::new(HashMap::new()),
                info: Mutex::new(HashMap::new()),
                errors: RecentErrors::default(),
                rpc: Arc::default(),
                cache_limit: None,
            }),
        }
    }

    /// Cap background fetching at `bytes_per_sec` compressed bytes per
    /// second across all layers (0 = no cap; before serving).
    pub fn with_background_bandwidth(mut self, bytes_per_sec: u64) -> FetcherService {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.background_bandwidth = bytes_per_sec;
        }
        self
    }

    /// Whether WarmLayers prefetches the image's entrypoint chain (on by
    /// default; before serving).
    pub fn with_entrypoint_prefetch(mut self, on: bool) -> FetcherService {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.entrypoint = on;
        }
        self
    }

    /// Set the quiet period background fetches wait for, and for how long
    /// at most (before serving).
    pub fn with_background_silence(
        mut self,
        silence: Duration,
        max_wait: Duration,
    ) -> FetcherService {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.background_silence = silence;
            shared.background_max_wait = max_wait;
        }
        self
    }

    /// Keep the cache under `opts.limit` bytes (before serving; the passes
    /// start with [`FetcherService::start_eviction`]).
    pub fn with_cache_limit(mut self, opts: EvictOptions) -> FetcherService {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.cache_limit =
                (opts.limit > 0).then(|| Arc::new(CacheLimit::new(shared.cache.clone(), opts)));
        }
        self
    }

    /// Start the eviction task (on the current runtime), if a limit is set.
    pub fn start_eviction(&self) {
        if let Some(limit) = &self.shared.cache_limit {
            tokio::spawn(
                limit
                    .clone()
                    .run(self.shared.cache.clone(), self.forgetter()),
            );
        }
    }

    /// One eviction pass now (tests, and `None` without a limit).
    pub async fn evict_now(&self) -> Option<stargaze_cache::Eviction> {
        let limit = self.shared.cache_limit.clone()?;
        let forget = self.forgetter();
        tokio::task::spawn_blocking(move || limit.pass(&mut |d| forget(d)))
            .await
            .ok()
    }

    /// Drops an evicted layer from memory: later requests resolve it anew.
    fn forgetter(&self) -> Arc<dyn Fn(&str) + Send + Sync> {
        let shared = self.shared.clone();
        Arc::new(move |digest: &str| {
            if let Some(cell) = shared.layers.lock().remove(digest)
                && let Some(layer) = cell.get()
            {
                layer.mark_evicted();
            }
            shared.info.lock().remove(digest);
        })
    }

    /// Every resolved layer.
    pub fn layers(&self) -> Vec<Arc<Layer>> {
        self.shared
            .layers
            .lock()
            .values()
            .filter_map(|c| c.get().cloned())
            .collect()
    }

    /// A resolved layer.
    pub fn layer(&self, digest: &str) -> Option<Arc<Layer>> {
        self.shared
            .layers
            .lock()
            .get(digest)
            .and_then(|c| c.get().cloned())
    }

    fn info(&self, digest: &str) -> Arc<LayerInfo> {
        self.shared
            .info
            .lock()
            .entry(digest.to_string())
            .or_default()
            .clone()
    }

    /// The manifest `reference` names for this host's platform, read once
    /// per [`MANIFEST_TTL`]; `None` when it cannot be read.
    async fn image_manifest(&self, reference: &Reference) -> Option<Arc<serde_json::Value>> {
        let key = reference.to_string();
        let cell = {
            let mut m = self.shared.manifests.lock();
            m.retain(|_, (at, _)| at.elapsed() < MANIFEST_TTL);
            if m.len() >= MAX_MANIFESTS {
                m.clear();
            }
            m.entry(key)
                .or_insert_with(|| (Instant::now(), ManifestCell::default()))
                .1
                .clone()
        };
        cell.get_or_init(|| async {
            let platform = stargaze_registry::Platform::host();
            match self
                .shared
                .client
                .resolve_manifest(reference, &platform)
                .await
            {
                Ok(m) => serde_json::from_slice(&m.bytes).ok().map(Arc::new),
                Err(e) => {
                    tracing::debug!(image = %reference, error = %e, "manifest not read");
                    None
                }
            }
        })
        .await
        .clone()
    }

    /// How this request's layer is verified: its `toc.digest` label; else a
    /// zstd:chunked manifest checksum, from the request or (containerd
    /// passes only `containerd.io/snapshot/` annotations as labels) from
    /// the image's manifest; else nothing, where that is allowed.
    async fn toc_check(
        &self,
        src: &LayerSource,
        reference: &Reference,
        digest: &str,
        allow: bool,
    ) -> Result<TocCheck, Status> {
        let parse = |key: &str, v: &str| {
            v.parse::<Digest>()
                .map_err(|e| Status::invalid_argument(format!("layer {digest}: {key}: {e}")))
        };
        if let Some(v) = src.annotations.get(TOC_DIGEST_ANNOTATION) {
            return Ok(TocCheck::TocDigest(parse(TOC_DIGEST_ANNOTATION, v)?));
        }
        if let Some(v) = manifest_checksum_annotation(&src.annotations) {
            return Ok(TocCheck::ManifestChecksum(parse(
                ZSTD_V2_MANIFEST_CHECKSUM_ANNOTATION,
                v,
            )?));
        }
        let listed = self.image_manifest(reference).await.and_then(|m| {
            let desc = m["layers"]
                .as_array()?
                .iter()
                .find(|l| l["digest"].as_str() == Some(digest))?
                .clone();
            Some(annotations_of(&desc))
        });
        if let Some(v) = listed.as_ref().and_then(manifest_checksum_annotation) {
            return Ok(TocCheck::ManifestChecksum(parse(
                ZSTD_V2_MANIFEST_CHECKSUM_ANNOTATION,
                v,
            )?));
        }
        TocCheck::new(digest, None, allow).map_err(|e| status_of(&e))
    }

    /// A layer checked by its manifest checksum: compare it with the
    /// layer's compressed TOC digest (known when the layer was resolved by
    /// checksum, else read from the blob once).
    async fn check_checksum(
        &self,
        layer: &Layer,
        reference: &Reference,
        expected: Digest,
    ) -> Result<(), FetchError> {
        let info = self.info(&layer.digest);
        let known = *info.toc_checksum.lock();
        let actual = match known {
            Some(d) => d,
            None => {
                let blob = RegistryBlob(self.shared.client.blob(reference, &layer.digest));
                let d = crate::resolve::compressed_toc_digest(
                    &blob,
                    &layer.digest,
                    layer.index.toc_digest(),
                    &self.shared.opts,
                )
                .await?;
                *info.toc_checksum.lock() = Some(d);
                d
            }
        };
        if actual != expected {
            return Err(FetchError::Format(stargaze_format::Error::new(
                &layer.digest,
                stargaze_format::ErrorKind::ManifestChecksumMismatch { expected, actual },
            )));
        }
        Ok(())
    }

    /// Resolve once per layer; concurrent callers share the work. Every
    /// call checks the layer against its own labels: a layer resolved for
    /// one image is served for another only when that image names the
    /// same TOC (or allows unverified layers).
    pub async fn resolve(
        &self,
        src: &LayerSource,
        allow_unverified: bool,
    ) -> Result<Arc<Layer>, Status> {
        self.resolve_checked(src, allow_unverified)
            .await
            .map(|(layer, _)| layer)
    }

    /// [`FetcherService::resolve`], also saying how the layer was checked.
    async fn resolve_checked(
        &self,
        src: &LayerSource,
        allow_unverified: bool,
    ) -> Result<(Arc<Layer>, TocCheck), Status> {
        let digest: Digest = src
            .digest
            .parse()
            .map_err(|e| Status::invalid_argument(format!("layer digest: {e}")))?;
        let digest = digest.to_string();
        let reference = Reference::parse(&src.image_ref)
            .map_err(|e| Status::invalid_argument(format!("layer {digest}: {e}")))?;
        let _on_demand = self.shared.activity.begin();
        let report = |e: FetchError| {
            tracing::warn!(layer = %src.digest, image = %src.image_ref, error = %e, "layer not resolved");
            self.shared.errors.push(
                src.digest.clone(),
                format!("resolving (image {}): {e}", src.image_ref),
            );
            status_of(&e)
        };
        // As in the Go snapshotter: the configuration must allow it and the
        // layer must carry the skipverify label.
        let allow = allow_unverified && src.annotations.contains_key(SKIP_VERIFY_LABEL);
        let check = match self.toc_check(src, &reference, &digest, allow).await {
            Ok(c) => c,
            Err(s) => {
                tracing::warn!(layer = %src.digest, image = %src.image_ref, error = %s.message(), "layer not resolved");
                self.shared.errors.push(
                    src.digest.clone(),
                    format!("resolving (image {}): {}", src.image_ref, s.message()),
                );
                return Err(s);
            }
        };
        let (layer, fresh) = loop {
            let cell = self
                .shared
                .layers
                .lock()
                .entry(digest.clone())
                .or_default()
                .clone();
            let fresh = !cell.initialized();
            let (shared, reference, digest) =
                (self.shared.clone(), reference.clone(), digest.clone());
            let layer = cell
                .get_or_try_init(|| async move {
                    // The footer and TOC may have been read ahead (WarmLayers).
                    let blob: Arc<dyn RemoteBlob> = match shared.take_warm_tail(&digest).await {
                        Some(t) => Arc::new(WarmBlob::new(t)),
                        None => Arc::new(RegistryBlob(shared.client.blob(&reference, &digest))),
                    };
                    let resolved = match resolve_with_toc(
                        shared.cache.clone(),
                        blob.clone(),
                        &digest,
                        check,
                        None,
                        &shared.opts,
                    )
                    .await
                    {
                        Err(FetchError::ExternalToc { .. }) => {
                            let toc = external_toc(&shared, &reference, &digest).await?;
                            resolve_with_toc(
                                shared.cache.clone(),
                                blob,
                                &digest,
                                check,
                                Some(toc),
                                &shared.opts,
                            )
                            .await
                        }
                        other => other,
                    };
                    if let (Ok(_), TocCheck::ManifestChecksum(sum)) = (&resolved, check) {
                        let info = shared
                            .info
                            .lock()
                            .entry(digest.clone())
                            .or_default()
                            .clone();
                        *info.toc_checksum.lock() = Some(sum);
                    }
                    resolved.map(Arc::new)
                })
                .await
                .map_err(report)?
                .clone();
            // Evicted between the lookup and now (the pass took it out of
            // the map): the next lookup resolves it anew.
            if !layer.is_evicted() {
                break (layer, fresh);
            }
        };
        // The layer may have been resolved for another image's Prepare.
        match (check.check_index(&digest, &layer.index), check) {
            (Some(r), _) => r.map_err(report)?,
            (None, TocCheck::ManifestChecksum(sum)) => self
                .check_checksum(&layer, &reference, sum)
                .await
                .map_err(report)?,
            (None, _) => {}
        }
        if fresh {
            self.save_source(&layer.digest, src, check, allow_unverified);
        } else {
            // A new use of a layer resolved before (eviction's LRU order).
            let (cache, d) = (self.shared.cache.clone(), digest.clone());
            let _ = tokio::task::spawn_blocking(move || cache.touch_layer(&d)).await;
        }
        *self.info(&layer.digest).image_ref.lock() = src.image_ref.clone();
        Ok((layer, check))
    }

    fn save_source(
        &self,
        digest: &str,
        src: &LayerSource,
        check: TocCheck,
        allow_unverified: bool,
    ) {
        let keep = |k: &String| k == TOC_DIGEST_ANNOTATION || k == SKIP_VERIFY_LABEL;
        let mut annotations: BTreeMap<String, String> = src
            .annotations
            .iter()
            .filter(|(k, _)| keep(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // A checksum read from the manifest is what the layer was checked by.
        if let TocCheck::ManifestChecksum(sum) = check {
            annotations.insert(
                ZSTD_V2_MANIFEST_CHECKSUM_ANNOTATION.to_string(),
                sum.to_string(),
            );
        }
        let saved = stargaze_cache::LayerSource {
            image_ref: src.image_ref.clone(),
            digest: digest.to_string(),
            annotations,
            allow_unverified,
        };
        if let Err(e) = self.shared.cache.save_source(&saved) {
            tracing::warn!(layer = digest, error = %e, "cannot record the layer's source");
        }
    }

    /// A resolved layer, or one resolved before a restart (from its saved
    /// source; the index in the cache is reused, so this costs no request).
    pub async fn layer_or_recover(&self, digest: &str) -> Result<Arc<Layer>, Status> {
        if let Some(l) = self.layer(digest) {
            return Ok(l);
        }
        let not_resolved = || {
            Status::not_found(format!(
                "layer {digest} is not resolved; call ResolveLayer first"
            ))
        };
        let Ok(parsed) = digest.parse::<Digest>() else {
            return Err(not_resolved());
        };
        let saved = match self.shared.cache.load_source(&parsed.to_string()) {
            Ok(Some(saved)) => saved,
            Ok(None) => return Err(not_resolved()),
            Err(e) => {
                tracing::warn!(layer = digest, error = %e, "layer not recovered");
                return Err(not_resolved());
            }
        };
        let src = LayerSource {
            image_ref: saved.image_ref,
            digest: digest.to_string(),
            annotations: saved.annotations.into_iter().collect(),
            ..Default::default()
        };
        let allow = saved.allow_unverified;
        tracing::info!(layer = digest, image = %src.image_ref, "layer recovered from its saved source");
        self.resolve(&src, allow).await
    }

    /// Resolve and prefetch the layers being warmed before their Prepare
    /// arrives: the image's manifest (one request, alongside the tail
    /// reads) gives every layer's `toc.digest` (or zstd:chunked
    /// `manifest-checksum`), so each layer is verified and its prefetch
    /// starts as soon as its own TOC is in, not after the layers below it
    /// were prepared one by one. Layers without either annotation, or whose digest the manifest does not list (the tag
    /// moved), wait for their Prepare as before; so do all of them when
    /// the manifest cannot be read.
    async fn resolve_early(&self, image_ref: &str, reference: &Reference, digests: Vec<String>) {
        let Some(v) = self.image_manifest(reference).await else {
            tracing::debug!(image = image_ref, "no early resolution: manifest not read");
            return;
        };
        let descs = v["layers"].as_array().cloned().unwrap_or_default();
        // The config (for the entrypoint) is read while the layers resolve.
        let config = v["config"]["digest"]
            .as_str()
            .filter(|_| self.shared.entrypoint)
            .map(|digest| {
                let (client, reference, digest) = (
                    self.shared.client.clone(),
                    reference.clone(),
                    digest.to_string(),
                );
                tokio::spawn(async move { client.fetch_small_blob(&reference, &digest).await })
            });
        let mut set = tokio::task::JoinSet::new();
        let mut early: HashSet<String> = HashSet::new();
        for d in descs.iter().cloned() {
            let Some(digest) = d["digest"]
                .as_str()
                .filter(|x| digests.iter().any(|w| w == x))
            else {
                continue;
            };
            let annotations = annotations_of(&d);
            if !annotations.contains_key(TOC_DIGEST_ANNOTATION)
                && manifest_checksum_annotation(&annotations).is_none()
            {
                continue;
            }
            early.insert(digest.to_string());
            let src = LayerSource {
                image_ref: image_ref.to_string(),
                digest: digest.to_string(),
                annotations,
                ..Default::default()
            };
            let me = self.clone();
            set.spawn(async move {
                match me.resolve(&src, false).await {
                    Ok(layer) => {
                        tracing::debug!(layer = %src.digest, "resolved ahead of its Prepare");
                        let _ = me.prefetch(layer, 0, false).await;
                    }
                    Err(e) => {
                        tracing::debug!(layer = %src.digest, error = %e.message(), "early resolution failed; the layer's Prepare resolves it")
                    }
                }
            });
        }
        let layers: Vec<String> = descs
            .iter()
            .filter_map(|d| d["digest"].as_str().map(str::to_string))
            .collect();
        // While the layers resolve: once the config is in and the layers
        // resolved so far decide which file the program is (it and the
        // layers above it are known), its fetch starts — it is usually the
        // largest file a start needs, and the last layer to resolve is often
        // the base image's, far below it. The full entrypoint prefetch
        // after the loop finds it in flight or present.
        let mut config = config;
        let mut config_bytes: Option<Vec<u8>> = None;
        // The config's program, parsed once; `None` once started or when
        // there is nothing to start.
        let mut program: Option<crate::entrypoint::Command> = None;
        let read_config = |read: Result<Result<_, _>, tokio::task::JoinError>| match read {
            Ok(Ok(bytes)) => Some(bytes),
            Ok(Err(e)) => {
                tracing::debug!(image = image_ref, error = %e, "no entrypoint prefetch: config not read");
                None
            }
            Err(_) => None,
        };
        loop {
            tokio::select! {
                done = set.join_next() => {
                    if done.is_none() {
                        break;
                    }
                }
                read = async { config.as_mut().expect("guarded").await }, if config.is_some() => {
                    config = None;
                    config_bytes = read_config(read).map(|b| b.to_vec());
                    program = config_bytes
                        .as_deref()
                        .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
                        .and_then(|c| crate::entrypoint::Command::from_config(&c));
                }
            }
            if let Some(command) = &program
                && self.start_program_fetch(command, &layers, &early)
            {
                program = None;
            }
        }
        if let Some(config) = config {
            config_bytes = read_config(config.await).map(|b| b.to_vec());
        }
        if let Some(bytes) = config_bytes {
            self.prefetch_entrypoint(image_ref, &bytes, &layers).await;
        }
    }

    /// Start fetching `command`'s program if the layers resolved so far
    /// decide it (`layers` bottom first; those in `resolving` may still
    /// come, the others are not served lazily). True once started, or when
    /// there is nothing to start.
    fn start_program_fetch(
        &self,
        command: &crate::entrypoint::Command,
        layers: &[String],
        resolving: &HashSet<String>,
    ) -> bool {
        let stack = crate::entrypoint::Stack::partial(
            layers
                .iter()
                .rev()
                .filter_map(|d| match self.layer(d) {
                    Some(l) => Some(Some(l)),
                    None if resolving.contains(d) => Some(None),
                    None => None,
                })
                .collect(),
        );
        let Some((layer, ino)) = stack.program_known(command) else {
            return false;
        };
        let Some(size) = layer.index.inode(ino).map(|n| n.size()) else {
            return true;
        };
        tracing::debug!(layer = %layer.digest, program = %layer.index.path_of(ino), "the program's fetch starts before the image's other layers are resolved");
        tokio::spawn(async move {
            let _ = layer.fetch(&[(ino, 0, size)]).await;
        });
        true
    }

    /// Fetch the program the image's config runs and what it loads
    /// (`entrypoint.rs`), from the image's lazily served layers
    /// (`layers` bottom first, as the manifest lists them).
    async fn prefetch_entrypoint(&self, image_ref: &str, config: &[u8], layers: &[String]) {
        let Ok(config) = serde_json::from_slice::<serde_json::Value>(config) else {
            return;
        };
        let Some(command) = crate::entrypoint::Command::from_config(&config) else {
            return;
        };
        // Layers unpacked by containerd instead are not ours to fetch; the
        // paths they hold are looked up in the remaining ones.
        let stack = crate::entrypoint::Stack::new(
            layers.iter().rev().filter_map(|d| self.layer(d)).collect(),
        );
        let t0 = Instant::now();
        let done = crate::entrypoint::prefetch(&stack, &command).await;
        self.shared
            .entrypoint_files
            .fetch_add(done.files.len() as u64, Ordering::Relaxed);
        self.shared
            .entrypoint_bytes
            .fetch_add(done.bytes, Ordering::Relaxed);
        tracing::info!(
            image = image_ref,
            program = %command.program,
            files = ?done.files,
            bytes = done.bytes,
            elapsed = ?t0.elapsed(),
            "prefetched the entrypoint and what it loads"
        );
    }

    /// File ranges (inode, offset, length) of chunks whose compressed
    /// offset is below `limit` (or all, with `None`), skipping present ones.
    fn ranges_below(layer: &Layer, limit: Option<u64>) -> Vec<(u64, u64, u64)> {
        let mut out = Vec::new();
        for ino in 1..=layer.index.inode_count() {
            let Some(n) = layer.index.inode(ino) else {
                continue;
            };
            if !n.is_reg() {
                continue;
            }
            for c in n.chunks() {
                if limit.is_some_and(|l| c.compressed_offset >= l)
                    || layer.presence.is_present(c.global)
                {
                    continue;
                }
                out.push((ino, c.file_offset, c.size));
            }
        }
        // In blob order: neighbouring members merge into few requests.
        out.sort_by_key(|&(ino, off, _)| {
            layer
                .index
                .inode(ino)
                .and_then(|n| n.chunk_at(off))
                .map(|c| c.compressed_offset)
                .unwrap_or(0)
        });
        out
    }

    async fn fetch_all(
        layer: &Arc<Layer>,
        ranges: Vec<(u64, u64, u64)>,
    ) -> Result<u64, FetchError> {
        crate::engine::fetch_in_batches(layer, ranges, PREFETCH_BATCH, PREFETCH_PARALLEL).await
    }

    /// Fetch the rest of a layer one small batch at a time, each after
    /// on-demand work has been quiet for the configured period.
    async fn background(shared: &Shared, layer: &Arc<Layer>) -> Result<u64, FetchError> {
        let rest = Self::ranges_below(layer, None);
        let mut bytes = 0;
        let deadline = Instant::now() + shared.background_max_wait;
        for batch in rest.chunks(BACKGROUND_BATCH) {
            shared
                .activity
                .quiet(shared.background_silence, deadline)
                .await;
            let before = layer.counters.compressed_bytes.load(Ordering::Relaxed);
            // Chunks fetched on demand meanwhile are skipped by the engine.
            bytes += layer
                .fetch_at(batch, crate::engine::Priority::Background)
                .await?
                .bytes_fetched;
            if shared.background_bandwidth > 0 {
                // The counter also moves with on-demand reads of this layer
                // meanwhile; charging them too errs on the quiet side.
                let spent = layer.counters.compressed_bytes.load(Ordering::Relaxed) - before;
                let until = {
                    let mut budget = shared.background_budget.lock();
                    *budget = pace(*budget, Instant::now(), spent, shared.background_bandwidth);
                    *budget
                };
                tokio::time::sleep_until(until.into()).await;
            }
        }
        Ok(bytes)
    }

    /// Prefetch per the layer's landmark, the label or the configuration,
    /// then (in the background) everything else.
    pub async fn prefetch(
        &self,
        layer: Arc<Layer>,
        label_size: u64,
        wait: bool,
    ) -> Result<u64, Status> {
        let limit = match layer.index.prefetch() {
            Prefetch::Disabled => Some(0),
            Prefetch::UpTo(off) => Some(off),
            Prefetch::Unspecified => Some(if label_size > 0 {
                label_size
            } else {
                self.shared.prefetch_size
            }),
        };
        let info = self.info(&layer.digest);
        let ranges = Self::ranges_below(&layer, limit);
        let background = self.shared.background;
        let shared = self.shared.clone();
        let run = {
            let layer = layer.clone();
            let info = info.clone();
            async move {
                let r = Self::fetch_all(&layer, ranges).await;
                info.prefetch_done.store(true, Ordering::Release);
                if let Err(e) = &r {
                    *info.last_error.lock() = e.to_string();
                    shared
                        .errors
                        .push(layer.digest.clone(), format!("prefetch: {e}"));
                }
                if background && !info.background_started.swap(true, Ordering::AcqRel) {
                    let layer2 = layer.clone();
                    let info2 = info.clone();
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let r = Self::background(&shared, &layer2).await;
                        if let Err(e) = &r
                            && !layer2.is_evicted()
                        {
                            tracing::warn!(layer = %layer2.digest, error = %e, "background fetch stopped");
                            *info2.last_error.lock() = e.to_string();
                            shared
                                .errors
                                .push(layer2.digest.clone(), format!("background fetch: {e}"));
                        }
                        info2.background_done.store(true, Ordering::Release);
                    });
                }
                r
            }
        };
        if wait {
            run.await.map_err(|e| status_of(&e))
        } else {
            tokio::spawn(run);
            Ok(0)
        }
    }
}

#[tonic::async_trait]
impl Fetcher for FetcherService {
    async fn resolve_layer(
        &self,
        r: Request<ResolveLayerRequest>,
    ) -> Result<Response<ResolveLayerResponse>, Status> {
        let req = r.into_inner();
        let src = req
            .layer
            .ok_or_else(|| Status::invalid_argument("no layer given"))?;
        let (layer, check) = self.resolve_checked(&src, req.allow_unverified).await?;
        let idx = &layer.index;
        let (mut files, mut file_bytes) = (0u64, 0u64);
        for ino in 1..=idx.inode_count() {
            if let Some(n) = idx.inode(ino)
                && n.is_reg()
            {
                files += 1;
                file_bytes += n.size();
            }
        }
        let prefetch = match idx.prefetch() {
            Prefetch::Disabled => PrefetchPlan {
                kind: prefetch_plan::Kind::Disabled as i32,
                compressed_bytes: 0,
            },
            Prefetch::UpTo(o) => PrefetchPlan {
                kind: prefetch_plan::Kind::Landmark as i32,
                compressed_bytes: o,
            },
            Prefetch::Unspecified => PrefetchPlan::default(),
        };
        Ok(Response::new(ResolveLayerResponse {
            layer_digest: layer.digest.clone(),
            format: idx.format().map(|f| f.to_string()).unwrap_or_default(),
            toc_digest: idx.toc_digest().to_string(),
            toc_verified: check.verifies(),
            index_path: self
                .shared
                .cache
                .index_path(&layer.digest)
                .display()
                .to_string(),
            presence_path: self
                .shared
                .cache
                .presence_path(&layer.digest)
                .display()
                .to_string(),
            blob_size: idx.blob_size(),
            entries: idx.inode_count(),
            files,
            file_bytes,
            chunks: idx.chunk_count(),
            prefetch: Some(prefetch),
        }))
    }

    async fn fetch(&self, r: Request<FetchRequest>) -> Result<Response<FetchResponse>, Status> {
        let req = r.into_inner();
        let _on_demand =
            (req.priority != Priority::Background as i32).then(|| self.shared.activity.begin());
        let layer = self.layer_or_recover(&req.layer_digest).await?;
        let ranges: Vec<(u64, u64, u64)> = req
            .ranges
            .iter()
            .map(|r| (r.inode, r.offset, r.length))
            .collect();
        let stats = layer.fetch(&ranges).await.map_err(|e| {
            self.shared
                .errors
                .push(layer.digest.clone(), format!("fetch: {e}"));
            status_of(&e)
        })?;
        Ok(Response::new(FetchResponse {
            chunks_fetched: stats.chunks_fetched,
            bytes_fetched: stats.bytes_fetched,
        }))
    }

    async fn prefetch(
        &self,
        r: Request<PrefetchRequest>,
    ) -> Result<Response<PrefetchResponse>, Status> {
        let req = r.into_inner();
        let layer = self.layer_or_recover(&req.layer_digest).await?;
        let bytes = FetcherService::prefetch(self, layer, req.prefetch_size, req.wait).await?;
        Ok(Response::new(PrefetchResponse {
            prefetched_bytes: bytes,
        }))
    }

    async fn warm_layers(
        &self,
        r: Request<WarmLayersRequest>,
    ) -> Result<Response<WarmLayersResponse>, Status> {
        let req = r.into_inner();
        let reference = Reference::parse(&req.image_ref)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut started = 0;
        let mut warming = Vec::new();
        for d in req.digests {
            let Ok(digest) = d.parse::<Digest>() else {
                continue;
            };
            let digest = digest.to_string();
            let cell = {
                let mut tails = self.shared.tails.lock();
                // Bounded: tails of layers nobody resolves stay until then.
                if self.layer(&digest).is_some()
                    || tails.contains_key(&digest)
                    || tails.len() >= MAX_WARM_TAILS
                {
                    continue;
                }
                tails.entry(digest.clone()).or_default().clone()
            };
            started += 1;
            warming.push(digest.clone());
            let shared = self.shared.clone();
            let blob = RegistryBlob(self.shared.client.blob(&reference, &digest));
            tokio::spawn(async move {
                let _on_demand = shared.activity.begin();
                let window = shared
                    .opts
                    .tail_window
                    .max(stargaze_format::footer::MAX_FOOTER_SIZE as u64);
                cell.get_or_init(|| async move {
                    let (size, bytes) = blob.read_tail(window).await.ok()?;
                    Some(Arc::new(WarmTail {
                        blob: Arc::new(blob),
                        size,
                        bytes,
                    }))
                })
                .await;
                // Resolved meanwhile without it: drop it.
                let resolved = shared
                    .layers
                    .lock()
                    .get(&digest)
                    .is_some_and(|c| c.initialized());
                if resolved {
                    shared.tails.lock().remove(&digest);
                }
            });
        }
        if !warming.is_empty() {
            let me = self.clone();
            tokio::spawn(
                async move { me.resolve_early(&req.image_ref, &reference, warming).await },
            );
        }
        Ok(Response::new(WarmLayersResponse { started }))
    }

    async fn pause_background(
        &self,
        r: Request<PauseBackgroundRequest>,
    ) -> Result<Response<PauseBackgroundResponse>, Status> {
        let key = r.into_inner().key;
        self.shared.activity.hold(self.shared.background_silence);
        tracing::debug!(snapshot = %key, hold = ?self.shared.background_silence, "a container is starting: background fetches pause");
        Ok(Response::new(PauseBackgroundResponse {}))
    }

    async fn layer_status(
        &self,
        r: Request<LayerStatusRequest>,
    ) -> Result<Response<LayerStatusResponse>, Status> {
        let req = r.into_inner();
        let layer = self.layer_or_recover(&req.layer_digest).await?;
        let info = self.info(&layer.digest);
        let (present, total) = layer.progress();
        let (mut bytes, mut bytes_present) = (0u64, 0u64);
        for ino in 1..=layer.index.inode_count() {
            let Some(n) = layer.index.inode(ino) else {
                continue;
            };
            for c in n.chunks() {
                bytes += c.size;
                if layer.presence.is_present(c.global) {
                    bytes_present += c.size;
                }
            }
        }
        Ok(Response::new(LayerStatusResponse {
            layer_digest: layer.digest.clone(),
            image_ref: info.image_ref.lock().clone(),
            blob_size: layer.index.blob_size(),
            chunks: total,
            chunks_present: present,
            file_bytes: bytes,
            file_bytes_present: bytes_present,
            prefetch_done: info.prefetch_done.load(Ordering::Acquire),
            background_done: info.background_done.load(Ordering::Acquire),
            last_error: info.last_error.lock().clone(),
        }))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let layers: Vec<Arc<Layer>> = self
            .shared
            .layers
            .lock()
            .values()
            .filter_map(|c| c.get().cloned())
            .collect();
        let sum = |f: &dyn Fn(&Layer) -> u64| layers.iter().map(|l| f(l)).sum::<u64>();
        let registry_bytes: u64 = self
            .shared
            .client
            .stats()
            .iter()
            .map(|(_, s)| s.bytes.load(Ordering::Relaxed))
            .sum();
        let requests: u64 = self
            .shared
            .client
            .stats()
            .iter()
            .map(|(_, s)| s.requests.load(Ordering::Relaxed))
            .sum();
        let limit = self.shared.cache_limit.clone();
        let totals = limit.as_ref().map(|l| l.totals()).unwrap_or_default();
        Ok(Response::new(StatusResponse {
            cache_dir: self.shared.cache.root().display().to_string(),
            cache_bytes: dir_bytes(self.shared.cache.root()),
            layers: layers.len() as u32,
            bytes_fetched: registry_bytes,
            requests,
            chunks_verified: sum(&|l| l.counters.chunks_fetched.load(Ordering::Relaxed)),
            verification_failures: sum(&|l| {
                l.counters.verification_failures.load(Ordering::Relaxed)
            }),
            recovered_from_unclean_stop: self.shared.cache.was_unclean(),
            chunk_cache_hits: sum(&|l| l.counters.chunks_hit.load(Ordering::Relaxed)),
            background_fetch: self.shared.background,
            recent_errors: self.shared.errors.list(),
            cache_limit_bytes: limit.as_ref().map_or(0, |l| l.limit()),
            evicted_layers: totals.layers,
            evicted_files: totals.files,
            evicted_bytes: totals.bytes,
            cache_kept_bytes: totals.last.map_or(0, |p| p.kept_bytes),
        }))
    }
}

/// The string `annotations` of a manifest's layer descriptor.
fn annotations_of(v: &serde_json::Value) -> HashMap<String, String> {
    v["annotations"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// Disk blocks used below `dir` (sparse files count what is really stored).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.blocks() * 512,
                Err(_) => {}
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_bandwidth_budget() {
        let t0 = Instant::now();
        // 1 MB at 1 MB/s: one second after now.
        let b = pace(t0, t0, 1_000_000, 1_000_000);
        assert_eq!(b - t0, Duration::from_secs(1));
        // Spending more before it ran out extends it.
        let b2 = pace(b, t0 + Duration::from_millis(10), 500_000, 1_000_000);
        assert_eq!(b2 - t0, Duration::from_millis(1500));
        // After an idle period the budget starts from now, not from the past.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(
            pace(b2, later, 250_000, 1_000_000) - later,
            Duration::from_millis(250)
        );
    }

    #[tokio::test]
    async fn background_waits_for_quiet_but_not_past_the_deadline() {
        let a = Activity::new();
        // Quiet long enough already: no wait.
        *a.last_end.lock() = Instant::now() - Duration::from_secs(5);
        let t = Instant::now();
        a.quiet(Duration::from_secs(2), t + Duration::from_secs(60))
            .await;
        assert!(t.elapsed() < Duration::from_millis(100));
        // Busy the whole time: the deadline ends the wait.
        let busy = a.begin();
        let t = Instant::now();
        a.quiet(Duration::from_secs(2), t + Duration::from_millis(200))
            .await;
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_secs(1),
            "{waited:?}"
        );
        // Not busy any more, but work ended just now: waits for the silence.
        drop(busy);
        let t = Instant::now();
        a.quiet(Duration::from_millis(300), t + Duration::from_secs(60))
            .await;
        assert!(
            t.elapsed() >= Duration::from_millis(250),
            "{:?}",
            t.elapsed()
        );
    }
}
