//! The table of resolved layers and their resolution: a layer's TOC
//! check decided from its request (the `toc.digest` label, else a
//! zstd:chunked manifest checksum from the request or the image's manifest,
//! else none where allowed), its footer and TOC read (from a tail WarmLayers
//! read ahead when there is one; from the `-esgztoc` image for a layer with
//! an external TOC), the index built (`resolve.rs`), and the layer's source
//! saved in the cache so that a restarted fetcher recovers it. Concurrent
//! resolutions of one layer share the work; eviction takes layers out.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stargaze_cache::Cache;
use stargaze_format::{
    Digest, TOC_DIGEST_ANNOTATION, ZSTD_V2_MANIFEST_CHECKSUM_ANNOTATION,
    manifest_checksum_annotation,
};
use stargaze_proto::v1::LayerSource;
use stargaze_registry::Reference;
use stargaze_service::metrics::RecentErrors;
use tokio::sync::OnceCell;
use tonic::Status;

use crate::blob::RemoteBlob;
use crate::engine::Layer;
use crate::error::FetchError;
use crate::options::FetchOptions;
use crate::registry::{RegistryBlob, WarmBlob, WarmTail};
use crate::resolve::{TocCheck, resolve_with_toc};
use crate::schedule::{Activity, Progress};

/// Label that lets a layer without `toc.digest` through when the request allows it.
const SKIP_VERIFY_LABEL: &str = "containerd.io/snapshot/remote/stargz.skipverify";
/// A layer tail read ahead once (`None`: the read failed; the resolve then
/// reads it itself and reports the error).
type TailCell = Arc<OnceCell<Option<Arc<WarmTail>>>>;

/// An image's manifest, read once (`None`: it could not be read).
type ManifestCell = Arc<OnceCell<Option<Arc<ImageManifest>>>>;

/// An image's manifest for this platform: its digest and what it says.
pub(crate) struct ImageManifest {
    pub(crate) digest: String,
    pub(crate) media_type: String,
    pub(crate) size: u64,
    pub(crate) manifest: oci_spec::image::ImageManifest,
}
/// How long a manifest read by reference is used again: the length of a
/// pull, not longer, since a tag may move.
const MANIFEST_TTL: Duration = Duration::from_secs(60);
/// Manifests kept at most.
const MAX_MANIFESTS: usize = 256;

/// What is known about a layer besides its index.
#[derive(Default)]
pub(crate) struct LayerInfo {
    pub(crate) image_ref: Mutex<String>,
    pub(crate) progress: Arc<Progress>,
    /// The sha256 of the layer's compressed TOC, once known (what a
    /// zstd:chunked manifest checksum names).
    toc_checksum: Mutex<Option<Digest>>,
}

/// The resolved layers, by digest, and what resolving them needs.
pub(crate) struct Layers {
    pub(crate) cache: Arc<Cache>,
    pub(crate) client: stargaze_registry::Client,
    pub(crate) opts: FetchOptions,
    /// Resolution is on-demand work: background fetches wait for it.
    activity: Arc<Activity>,
    /// Failures users should see in `stargaze status`, by layer.
    pub(crate) errors: Arc<RecentErrors>,
    /// Tails read ahead by WarmLayers, by digest, until the layer's resolve
    /// takes them.
    pub(crate) tails: Mutex<HashMap<Digest, TailCell>>,
    table: Mutex<HashMap<Digest, Arc<OnceCell<Arc<Layer>>>>>,
    /// Image manifests by reference, read once for WarmLayers and for the
    /// zstd:chunked checksums that containerd does not pass as labels;
    /// kept for [`MANIFEST_TTL`].
    manifests: Mutex<HashMap<String, (Instant, ManifestCell)>>,
    info: Mutex<HashMap<Digest, Arc<LayerInfo>>>,
}

/// The TOC blob of an external-TOC layer: the layer of the `<tag>-esgztoc`
/// image (same registry and repository) annotated with the layer's digest.
async fn external_toc(
    layers: &Layers,
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
    let manifest = layers
        .client
        .resolve_manifest(&toc_ref, &stargaze_registry::Platform::host())
        .await
        .map_err(|e| {
            tracing::warn!(layer = %digest, toc_image = %toc_ref, error = %e, "no external TOC image");
            missing()
        })?;
    let m = crate::image::parse_manifest(&manifest.bytes, &toc_ref.to_string()).map_err(|e| {
        tracing::warn!(layer = %digest, error = %e, "no external TOC image");
        missing()
    })?;
    let toc_digest = m
        .layers()
        .iter()
        .find(|l| {
            l.annotations()
                .as_ref()
                .and_then(|a| a.get(stargaze_format::TOC_LAYER_DIGEST_ANNOTATION))
                .is_some_and(|d| d == digest)
        })
        .map(|l| l.digest().to_string())
        .ok_or_else(missing)?;
    let bytes = layers
        .client
        .fetch_blob(&toc_ref, &toc_digest, layers.opts.max_toc_size)
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
impl Layers {
    pub(crate) fn new(
        cache: Arc<Cache>,
        client: stargaze_registry::Client,
        opts: FetchOptions,
        activity: Arc<Activity>,
    ) -> Layers {
        Layers {
            cache,
            client,
            opts,
            activity,
            errors: Arc::default(),
            tails: Mutex::new(HashMap::new()),
            table: Mutex::new(HashMap::new()),
            manifests: Mutex::new(HashMap::new()),
            info: Mutex::new(HashMap::new()),
        }
    }

    /// The tail WarmLayers read (or is reading) for a layer, taken out of
    /// the map; `None` when none was asked for, so a resolve that can reuse
    /// the index in the cache never touches the registry.
    async fn take_warm_tail(&self, digest: &Digest) -> Option<Arc<WarmTail>> {
        let cell = self.tails.lock().get(digest).cloned()?;
        let tail = cell.get_or_init(|| async { None }).await.clone();
        self.tails.lock().remove(digest);
        tail
    }

    /// Drop an evicted layer from memory: later requests resolve it anew.
    pub(crate) fn forget(&self, digest: &Digest) {
        if let Some(cell) = self.table.lock().remove(digest)
            && let Some(layer) = cell.get()
        {
            layer.mark_evicted();
        }
        self.info.lock().remove(digest);
    }

    /// Is the layer resolved (or being resolved and done)?
    pub(crate) fn is_resolved(&self, digest: &Digest) -> bool {
        self.table
            .lock()
            .get(digest)
            .is_some_and(|c| c.initialized())
    }

    /// Every resolved layer.
    pub(crate) fn all(&self) -> Vec<Arc<Layer>> {
        self.table
            .lock()
            .values()
            .filter_map(|c| c.get().cloned())
            .collect()
    }

    /// A resolved layer.
    pub(crate) fn get(&self, digest: &Digest) -> Option<Arc<Layer>> {
        self.table.lock().get(digest).and_then(|c| c.get().cloned())
    }

    /// A resolved layer by a digest a manifest, trace or stack names as a
    /// string (one that is not a digest names no layer).
    pub(crate) fn named(&self, digest: &str) -> Option<Arc<Layer>> {
        self.get(&digest.parse().ok()?)
    }

    pub(crate) fn info(&self, digest: &Digest) -> Arc<LayerInfo> {
        self.info.lock().entry(*digest).or_default().clone()
    }
    /// The manifest `reference` names for this host's platform, read once
    /// per [`MANIFEST_TTL`]; `None` when it cannot be read.
    pub(crate) async fn image_manifest(&self, reference: &Reference) -> Option<Arc<ImageManifest>> {
        let key = reference.to_string();
        let cell = {
            let mut m = self.manifests.lock();
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
            match self.client.resolve_manifest(reference, &platform).await {
                Ok(m) => match crate::image::parse_manifest(
                    &m.bytes,
                    &format!("{reference}@{}", m.digest),
                ) {
                    Ok(manifest) => Some(Arc::new(ImageManifest {
                        size: m.bytes.len() as u64,
                        digest: m.digest,
                        media_type: m.media_type,
                        manifest,
                    })),
                    Err(e) => {
                        tracing::debug!(image = %reference, error = %e, "manifest not used");
                        None
                    }
                },
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
        let listed = self
            .image_manifest(reference)
            .await
            .and_then(|m| crate::image::layer(&m.manifest, digest).map(crate::image::annotations));
        if let Some(v) = listed.as_ref().and_then(manifest_checksum_annotation) {
            return Ok(TocCheck::ManifestChecksum(parse(
                ZSTD_V2_MANIFEST_CHECKSUM_ANNOTATION,
                v,
            )?));
        }
        TocCheck::new(digest, None, allow).map_err(|e| e.status())
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
                let blob = RegistryBlob(self.client.blob(reference, &layer.digest.to_string()));
                let d = crate::resolve::compressed_toc_digest(
                    &blob,
                    &layer.digest.to_string(),
                    layer.index.toc_digest(),
                    &self.opts,
                )
                .await?;
                *info.toc_checksum.lock() = Some(d);
                d
            }
        };
        if actual != expected {
            return Err(FetchError::Format(stargaze_format::Error::new(
                layer.digest.to_string(),
                stargaze_format::ErrorKind::ManifestChecksumMismatch { expected, actual },
            )));
        }
        Ok(())
    }

    /// Resolve once per layer; concurrent callers share the work. Every
    /// call checks the layer against its own labels: a layer resolved for
    /// one image is served for another only when that image names the
    /// same TOC (or allows unverified layers).
    pub(crate) async fn resolve(
        self: &Arc<Self>,
        src: &LayerSource,
        allow_unverified: bool,
    ) -> Result<Arc<Layer>, Status> {
        self.resolve_checked(src, allow_unverified)
            .await
            .map(|(layer, _)| layer)
    }

    /// [`Layers::resolve`], also saying how the layer was checked.
    pub(crate) async fn resolve_checked(
        self: &Arc<Self>,
        src: &LayerSource,
        allow_unverified: bool,
    ) -> Result<(Arc<Layer>, TocCheck), Status> {
        let digest: Digest = src
            .digest
            .parse()
            .map_err(|e| Status::invalid_argument(format!("layer digest: {e}")))?;
        let reference = Reference::parse(&src.image_ref)
            .map_err(|e| Status::invalid_argument(format!("layer {digest}: {e}")))?;
        let _on_demand = self.activity.begin();
        let report = |e: FetchError| {
            tracing::warn!(layer = %src.digest, image = %src.image_ref, error = %e, "layer not resolved");
            self.errors.push(
                src.digest.clone(),
                format!("resolving (image {}): {e}", src.image_ref),
            );
            e.status()
        };
        // As in the Go snapshotter: the configuration must allow it and the
        // layer must carry the skipverify label.
        let allow = allow_unverified && src.annotations.contains_key(SKIP_VERIFY_LABEL);
        let check = match self
            .toc_check(src, &reference, &digest.to_string(), allow)
            .await
        {
            Ok(c) => c,
            Err(s) => {
                tracing::warn!(layer = %src.digest, image = %src.image_ref, error = %s.message(), "layer not resolved");
                self.errors.push(
                    src.digest.clone(),
                    format!("resolving (image {}): {}", src.image_ref, s.message()),
                );
                return Err(s);
            }
        };
        let (layer, fresh) = loop {
            let cell = self.table.lock().entry(digest).or_default().clone();
            let fresh = !cell.initialized();
            let (layers, reference) = (self.clone(), reference.clone());
            let layer = cell
                .get_or_try_init(|| async move {
                    // The footer and TOC may have been read ahead (WarmLayers).
                    let blob: Arc<dyn RemoteBlob> = match layers.take_warm_tail(&digest).await {
                        Some(t) => Arc::new(WarmBlob::new(t)),
                        None => Arc::new(RegistryBlob(
                            layers.client.blob(&reference, &digest.to_string()),
                        )),
                    };
                    let resolved = match resolve_with_toc(
                        layers.cache.clone(),
                        blob.clone(),
                        &digest,
                        check,
                        None,
                        &layers.opts,
                    )
                    .await
                    {
                        Err(FetchError::ExternalToc { .. }) => {
                            let toc =
                                external_toc(&layers, &reference, &digest.to_string()).await?;
                            resolve_with_toc(
                                layers.cache.clone(),
                                blob,
                                &digest,
                                check,
                                Some(toc),
                                &layers.opts,
                            )
                            .await
                        }
                        other => other,
                    };
                    if let (Ok(_), TocCheck::ManifestChecksum(sum)) = (&resolved, check) {
                        let info = layers.info.lock().entry(digest).or_default().clone();
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
        match (check.check_index(&digest.to_string(), &layer.index), check) {
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
            let (cache, d) = (self.cache.clone(), digest);
            let _ = tokio::task::spawn_blocking(move || cache.touch_layer(&d)).await;
        }
        *self.info(&layer.digest).image_ref.lock() = src.image_ref.clone();
        Ok((layer, check))
    }

    fn save_source(
        &self,
        digest: &Digest,
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
        if let Err(e) = self.cache.save_source(digest, &saved) {
            tracing::warn!(layer = %digest, error = %e, "cannot record the layer's source");
        }
    }

    /// A resolved layer, or one resolved before a restart (from its saved
    /// source; the index in the cache is reused, so this costs no request).
    pub(crate) async fn recover(self: &Arc<Self>, digest: &Digest) -> Result<Arc<Layer>, Status> {
        if let Some(l) = self.get(digest) {
            return Ok(l);
        }
        let not_resolved = || {
            Status::not_found(format!(
                "layer {digest} is not resolved; call ResolveLayer first"
            ))
        };
        let saved = match self.cache.load_source(digest) {
            Ok(Some(saved)) => saved,
            Ok(None) => return Err(not_resolved()),
            Err(e) => {
                tracing::warn!(layer = %digest, error = %e, "layer not recovered");
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
        tracing::info!(layer = %digest, image = %src.image_ref, "layer recovered from its saved source");
        self.resolve(&src, allow).await
    }
}
