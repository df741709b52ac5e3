//! Traces shared through the image's registry, so that a trace learned on
//! one node helps every other node's first cold pull.
//!
//! A trace is published as a small OCI artifact in the image's own
//! repository under the tag `sha256-<manifest hex>.stargaze-trace` (the
//! tag scheme that works on registries without the referrers API, such as
//! Debian's registry 2.8), with `subject` naming the image's manifest for
//! registries that have it: an empty config, one layer (the trace's JSON).
//! Reading it is one manifest request in parallel with the pull's first
//! requests, then one blob verified by its digest; the trace must then be
//! of this very image (manifest digest and layer list) and pass the same
//! checks as a local one. Whoever can push to the repository can publish a
//! trace: it only ever decides what is fetched early, never what a read
//! returns, and it is never used for another image.

use bytes::Bytes;
use serde_json::json;
use stargaze_cache::Trace;
use stargaze_registry::{Client, Reference, RegistryError, UploadSource};

/// The tag suffix of a published trace.
pub const TAG_SUFFIX: &str = "stargaze-trace";
/// The media type of a trace (the artifact's type and its layer's).
pub const MEDIA_TYPE: &str = "application/vnd.stargaze.trace.v1+json";
const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI's empty descriptor: the config of an artifact with none.
const EMPTY_TYPE: &str = "application/vnd.oci.empty.v1+json";
const EMPTY: &[u8] = b"{}";

/// The tag of the trace of the image with manifest digest `manifest`.
pub fn tag(manifest: &str) -> Option<String> {
    let digest: stargaze_format::Digest = manifest.parse().ok()?;
    Some(format!("sha256-{}.{TAG_SUFFIX}", digest.hex()))
}

/// Why a published trace was not used.
#[derive(Debug, thiserror::Error)]
pub enum SharedTraceError {
    #[error("{0}")]
    Registry(#[from] RegistryError),
    #[error("trace artifact {tag} of {image}: {reason}")]
    Artifact {
        image: String,
        tag: String,
        reason: String,
    },
    #[error("trace artifact {tag} of {image}: {source}")]
    Trace {
        image: String,
        tag: String,
        #[source]
        source: stargaze_cache::TraceError,
    },
}

/// The trace published for the image (`Ok(None)` when there is none).
pub async fn read(
    client: &Client,
    image: &Reference,
    manifest: &str,
    layers: &[String],
) -> Result<Option<Trace>, SharedTraceError> {
    let Some(tag) = tag(manifest) else {
        return Ok(None);
    };
    let artifact = match client.fetch_manifest(image, &tag).await {
        Ok(m) => m,
        // Not there (on the origin, after any mirrors): none published.
        Err(e) if matches!(e.last_answer(), RegistryError::Status { status: 404, .. }) => {
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    let bad = |reason: &str| SharedTraceError::Artifact {
        image: image.to_string(),
        tag: tag.clone(),
        reason: reason.to_string(),
    };
    let m = crate::image::parse_manifest(&artifact.bytes, &format!("{image}:{tag}"))
        .map_err(|e| bad(&e.to_string()))?;
    let layer = m
        .layers()
        .iter()
        .find(|d| d.media_type().to_string() == MEDIA_TYPE)
        .ok_or_else(|| bad("no layer of type application/vnd.stargaze.trace.v1+json"))?;
    let (digest, size) = (layer.digest().to_string(), layer.size());
    let digest = digest.as_str();
    if size > stargaze_cache::trace::MAX_TRACE_BYTES {
        return Err(bad(&format!(
            "its trace is {size} bytes, more than {}",
            stargaze_cache::trace::MAX_TRACE_BYTES
        )));
    }
    // Verified against the digest the artifact gives.
    let bytes = client.fetch_blob(image, digest, size).await?;
    let path = std::path::PathBuf::from(format!("{}@{tag}", image.repository));
    let trace = Trace::parse(&bytes, &path).map_err(|source| SharedTraceError::Trace {
        image: image.to_string(),
        tag: tag.clone(),
        source,
    })?;
    if trace.manifest != manifest || trace.layers != layers {
        return Err(bad(&format!(
            "it is the trace of {} (manifest {}), not of this image",
            trace.image, trace.manifest
        )));
    }
    Ok(Some(trace))
}

/// Publish `trace` in its image's repository (`manifest_size`: the size of
/// the image's manifest, for the artifact's `subject`).
pub async fn publish(
    client: &Client,
    trace: &Trace,
    manifest_type: &str,
    manifest_size: u64,
) -> Result<(), SharedTraceError> {
    let image = Reference::parse(&trace.image)?;
    let Some(tag) = tag(&trace.manifest) else {
        return Ok(());
    };
    let body = Bytes::from(
        serde_json::to_vec(trace).map_err(|e| SharedTraceError::Artifact {
            image: trace.image.clone(),
            tag: tag.clone(),
            reason: e.to_string(),
        })?,
    );
    let body_digest = stargaze_format::Digest::of(&body).to_string();
    let empty_digest = stargaze_format::Digest::of(EMPTY).to_string();
    for (digest, bytes) in [
        (&empty_digest, Bytes::from_static(EMPTY)),
        (&body_digest, body.clone()),
    ] {
        if !client.blob_exists(&image, digest).await? {
            let size = bytes.len() as u64;
            client
                .push_blob(&image, digest, size, UploadSource::Bytes(bytes), &|_| {})
                .await?;
        }
    }
    let artifact = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "artifactType": MEDIA_TYPE,
        "config": {"mediaType": EMPTY_TYPE, "digest": empty_digest, "size": EMPTY.len()},
        "layers": [{"mediaType": MEDIA_TYPE, "digest": body_digest, "size": body.len()}],
        "subject": {"mediaType": manifest_type, "digest": trace.manifest, "size": manifest_size},
        "annotations": {"org.opencontainers.image.title": "stargaze access trace"},
    });
    let bytes =
        Bytes::from(
            serde_json::to_vec(&artifact).map_err(|e| SharedTraceError::Artifact {
                image: trace.image.clone(),
                tag: tag.clone(),
                reason: e.to_string(),
            })?,
        );
    client
        .push_manifest(&image, &tag, MANIFEST_TYPE, bytes)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tag_is_derived_from_the_manifest_digest_only() {
        let m = format!("sha256:{}", "0f".repeat(32));
        assert_eq!(
            tag(&m).unwrap(),
            format!("sha256-{}.stargaze-trace", "0f".repeat(32))
        );
        assert!(tag("sha256:short").is_none());
        assert!(tag("latest").is_none());
    }
}
