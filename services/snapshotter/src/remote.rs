//! Remote snapshots: layers mounted lazily through the fetcher and fs
//! services instead of being unpacked.
//!
//! containerd's unpacker calls `Prepare` with `containerd.io/snapshot.ref`
//! (the chain ID it will commit) and the layer's annotations as labels. The
//! layer is found from either label set the Go Stargz Snapshotter accepts:
//! `containerd.io/snapshot/remote/stargz.{reference,digest,prefetch}`
//! (ctr-remote, nerdctl, BuildKit) or `containerd.io/snapshot/cri.{image-ref,
//! layer-digest}` (CRI with `disable_snapshot_annotations = false`). The TOC
//! digest comes in `containerd.io/snapshot/stargz/toc.digest`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use stargaze_proto::patiently;
use stargaze_proto::v1::fetcher_client::FetcherClient;
use stargaze_proto::v1::fs_client::FsClient;
use stargaze_proto::v1::{
    AttachRequest, DetachRequest, LayerSource, ListRequest, PauseBackgroundRequest,
    PrefetchRequest, ResolveLayerRequest, WarmLayersRequest,
};
use tonic::transport::Channel;

pub const TARGET_LABEL: &str = "containerd.io/snapshot.ref";
pub const REMOTE_LABEL: &str = "containerd.io/snapshot/remote";
pub const REMOTE_LABEL_VALUE: &str = "remote snapshot";
const STARGZ_REF: &str = "containerd.io/snapshot/remote/stargz.reference";
const STARGZ_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";
const STARGZ_PREFETCH: &str = "containerd.io/snapshot/remote/stargz.prefetch";
const STARGZ_LAYERS: &str = "containerd.io/snapshot/remote/stargz.layers";
const CRI_REF: &str = "containerd.io/snapshot/cri.image-ref";
const CRI_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
const CRI_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
const TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";

/// How long resolving or attaching a layer waits for a fetcher or fs that
/// does not answer (systemd starts a crashed service again after 1 s)
/// before the layer is unpacked instead.
pub const SERVICE_PATIENCE: Duration = Duration::from_secs(30);

/// The layer a `Prepare` is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerLabels {
    pub image_ref: String,
    pub digest: String,
    pub prefetch: u64,
    /// This layer and (some of) the image's other layers, a hint for
    /// reading their TOCs ahead.
    pub layers: Vec<String>,
}

/// The layer named by a snapshot's labels, if any.
pub fn layer_from_labels(labels: &BTreeMap<String, String>) -> Option<LayerLabels> {
    let (image_ref, digest, layers) = match (labels.get(STARGZ_REF), labels.get(STARGZ_DIGEST)) {
        (Some(r), Some(d)) => (r, d, labels.get(STARGZ_LAYERS)),
        _ => (
            labels.get(CRI_REF)?,
            labels.get(CRI_DIGEST)?,
            labels.get(CRI_LAYERS),
        ),
    };
    Some(LayerLabels {
        image_ref: image_ref.clone(),
        digest: digest.clone(),
        prefetch: labels
            .get(STARGZ_PREFETCH)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        layers: layers
            .map(|l| {
                l.split(',')
                    .map(str::trim)
                    .filter(|d| !d.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// A layer is mounted for a `Prepare` only if the TOC the fetcher resolved
/// is the one this `Prepare`'s `toc.digest` label names: the same blob may
/// be named by several manifests, and each one's label is checked.
fn check_toc_digest(
    layer: &LayerLabels,
    labels: &BTreeMap<String, String>,
    resolved: &str,
) -> Result<(), String> {
    match labels.get(TOC_DIGEST) {
        Some(expected) if expected != resolved => Err(format!(
            "layer {} of {}: its {TOC_DIGEST} label says {expected} but the layer's TOC hashes to {resolved}; the manifest does not describe this layer",
            layer.digest, layer.image_ref
        )),
        _ => Ok(()),
    }
}

/// Clients of the fetcher and fs services.
pub struct Remote {
    fetcher: FetcherClient<Channel>,
    fs: FsClient<Channel>,
    /// The Go snapshotter's `allow_no_verification` (with the skipverify label).
    pub allow_unverified: bool,
    /// How long a layer's resolve or attach waits for a service that does
    /// not answer ([`SERVICE_PATIENCE`]).
    pub patience: Duration,
}

impl Remote {
    pub fn new(
        fetcher_socket: &Path,
        fs_socket: &Path,
        allow_unverified: bool,
    ) -> Result<Remote, stargaze_proto::SocketError> {
        Ok(Remote {
            fetcher: FetcherClient::new(stargaze_proto::connect_unix(fetcher_socket)?),
            fs: FsClient::new(stargaze_proto::connect_unix(fs_socket)?),
            allow_unverified,
            patience: SERVICE_PATIENCE,
        })
    }

    /// Ask the fetcher to read the TOCs of an image's layers ahead, in
    /// parallel, while containerd prepares them one after the other.
    pub async fn warm(&self, image_ref: &str, digests: &[String]) {
        let r = self
            .fetcher
            .clone()
            .warm_layers(WarmLayersRequest {
                image_ref: image_ref.to_string(),
                digests: digests.to_vec(),
            })
            .await;
        if let Err(s) = r {
            tracing::debug!(image = image_ref, error = %s.message(), "warming layers failed");
        }
    }

    /// Tell the fetcher a container is starting, on which lazily served
    /// layers (top first), so that background fetches pause meanwhile and
    /// what its programs load is looked up in its stack.
    pub async fn pause_background(&self, key: &str, layers: Vec<String>) {
        let r = self
            .fetcher
            .clone()
            .pause_background(PauseBackgroundRequest {
                key: key.to_string(),
                layers,
            })
            .await;
        if let Err(s) = r {
            tracing::debug!(snapshot = key, error = %s.message(), "pausing background fetches failed");
        }
    }

    /// Digests of the layers the fs service has attached.
    pub async fn attached(&self) -> Result<Vec<String>, tonic::Status> {
        Ok(self
            .fs
            .clone()
            .list(ListRequest {})
            .await?
            .into_inner()
            .layers
            .into_iter()
            .map(|l| l.layer_digest)
            .collect())
    }

    /// Detach a layer (refused by the fs service while an overlay uses it).
    pub async fn detach(&self, digest: &str) -> Result<(), tonic::Status> {
        self.fs
            .clone()
            .detach(DetachRequest {
                layer_digest: digest.to_string(),
                force: false,
            })
            .await?;
        Ok(())
    }

    /// Resolve and attach the layer; returns its directory in the fs mount.
    /// The prefetch starts in the background. Errors are the reason to log.
    pub async fn mount(
        &self,
        layer: &LayerLabels,
        labels: &BTreeMap<String, String>,
    ) -> Result<String, String> {
        // A fetcher or fs that restarts is waited for: unpacking the layer
        // instead would download what was to be fetched lazily.
        let request = ResolveLayerRequest {
            layer: Some(LayerSource {
                image_ref: layer.image_ref.clone(),
                digest: layer.digest.clone(),
                annotations: labels.clone().into_iter().collect(),
                ..Default::default()
            }),
            allow_unverified: self.allow_unverified,
        };
        let resolved = patiently("fetcher", self.patience, || {
            let (mut fetcher, request) = (self.fetcher.clone(), request.clone());
            async move { fetcher.resolve_layer(request).await }
        })
        .await
        .map_err(|s| format!("fetcher: {}", s.message()))?
        .into_inner();
        check_toc_digest(layer, labels, &resolved.toc_digest)?;
        let request = AttachRequest {
            layer_digest: resolved.layer_digest.clone(),
        };
        let attached = patiently("fs", self.patience, || {
            let (mut fs, request) = (self.fs.clone(), request.clone());
            async move { fs.attach(request).await }
        })
        .await
        .map_err(|s| format!("fs: {}", s.message()))?
        .into_inner();
        let _ = self
            .fetcher
            .clone()
            .prefetch(PrefetchRequest {
                layer_digest: resolved.layer_digest,
                prefetch_size: layer.prefetch,
                wait: false,
            })
            .await;
        Ok(attached.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_label_sets() {
        let mut l = BTreeMap::new();
        assert!(layer_from_labels(&l).is_none());
        l.insert(CRI_REF.into(), "r/a:1".into());
        l.insert(CRI_DIGEST.into(), "sha256:cri".into());
        assert_eq!(layer_from_labels(&l).unwrap().digest, "sha256:cri");
        l.insert(STARGZ_REF.into(), "r/a:1".into());
        l.insert(STARGZ_DIGEST.into(), "sha256:sgz".into());
        l.insert(STARGZ_PREFETCH.into(), "10485760".into());
        l.insert(STARGZ_LAYERS.into(), "sha256:sgz,sha256:b".into());
        let x = layer_from_labels(&l).unwrap();
        assert_eq!((x.digest.as_str(), x.prefetch), ("sha256:sgz", 10 << 20));
        assert_eq!(x.layers, ["sha256:sgz", "sha256:b"]);
    }

    #[test]
    fn a_resolved_toc_other_than_the_label_is_refused() {
        let mut l = BTreeMap::new();
        l.insert(STARGZ_REF.into(), "r/a:1".into());
        l.insert(STARGZ_DIGEST.into(), "sha256:layer".into());
        let layer = layer_from_labels(&l).unwrap();
        assert!(check_toc_digest(&layer, &l, "sha256:any").is_ok());
        l.insert(TOC_DIGEST.into(), "sha256:want".into());
        assert!(check_toc_digest(&layer, &l, "sha256:want").is_ok());
        let e = check_toc_digest(&layer, &l, "sha256:other").unwrap_err();
        for part in ["sha256:layer", "r/a:1", "sha256:want", "sha256:other"] {
            assert!(e.contains(part), "{e}");
        }
    }
}
