//! What the fetcher reads of an image, typed: its manifest (the layers in
//! stack order, each with its digest, size, media type and annotations)
//! and its config (the program it runs), parsed with `oci-spec` from the
//! bytes the registry client returned (already checked against their
//! digest). Docker's schema-2 manifests and configs have the same shape.
//!
//! The converter (`stargaze-oci`) keeps its own JSON view on purpose: it
//! rewrites manifests and must not drop fields; the fetcher only reads.

use std::collections::HashMap;

use oci_spec::image::{Config, Descriptor, ImageConfiguration, ImageManifest};

/// A manifest that is not an image manifest (another schema, a field of
/// the wrong type, an invalid digest), naming what was read.
#[derive(Debug, thiserror::Error)]
#[error("{what} is not an OCI or Docker image manifest: {source}")]
pub struct ManifestError {
    what: String,
    #[source]
    source: oci_spec::OciSpecError,
}

/// Parse `bytes` as an image manifest; `what` names it in the error
/// (image reference and digest).
pub fn parse_manifest(bytes: &[u8], what: &str) -> Result<ImageManifest, ManifestError> {
    ImageManifest::from_reader(bytes).map_err(|source| ManifestError {
        what: what.to_string(),
        source,
    })
}

/// The execution parameters of an image config (`None` if it is not one,
/// or has none).
pub fn parse_config(bytes: &[u8]) -> Option<Config> {
    ImageConfiguration::from_reader(bytes)
        .ok()
        .and_then(|c| c.config().clone())
}

/// The digests of a manifest's layers, bottom first, as strings
/// (`sha256:<hex>`, how containerd's labels and the cache name them).
pub fn layer_digests(m: &ImageManifest) -> Vec<String> {
    m.layers().iter().map(|d| d.digest().to_string()).collect()
}

/// The layer descriptor of `digest`, if the manifest lists it.
pub fn layer<'a>(m: &'a ImageManifest, digest: &str) -> Option<&'a Descriptor> {
    m.layers().iter().find(|d| d.digest().to_string() == digest)
}

/// A descriptor's annotations (none: empty).
pub fn annotations(d: &Descriptor) -> HashMap<String, String> {
    d.annotations().clone().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "4a3c5e0dd1b7f0e3a2f5f4b1e0c9d8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1";

    #[test]
    fn docker_and_oci_manifests_read_alike() {
        for media in [
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.oci.image.manifest.v1+json",
        ] {
            let m = format!(
                r#"{{"schemaVersion":2,"mediaType":"{media}",
                "config":{{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"sha256:{HEX}","size":7}},
                "layers":[{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"sha256:{HEX}","size":9,
                  "annotations":{{"containerd.io/snapshot/stargz/toc.digest":"sha256:{HEX}"}}}}],
                "unknown":{{"kept":"out"}}}}"#
            );
            let m = parse_manifest(m.as_bytes(), "img").unwrap();
            let digests = layer_digests(&m);
            assert_eq!(digests, [format!("sha256:{HEX}")]);
            let d = layer(&m, &digests[0]).unwrap();
            assert_eq!(d.size(), 9);
            assert_eq!(
                annotations(d)["containerd.io/snapshot/stargz/toc.digest"],
                format!("sha256:{HEX}")
            );
            assert!(layer(&m, "sha256:00").is_none());
        }
    }

    #[test]
    fn what_is_not_a_manifest_is_an_error_naming_it() {
        for bad in [
            &b"not json"[..],
            br#"{"schemaVersion":2,"layers":[]}"#,
            br#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:zz","size":1},"layers":[]}"#,
        ] {
            let e = parse_manifest(bad, "reg/img@sha256:1").unwrap_err();
            assert!(e.to_string().contains("reg/img@sha256:1"), "{e}");
        }
    }

    #[test]
    fn a_config_gives_its_program() {
        let c = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},
            "config":{"Entrypoint":["/bin/sh","-c"],"Cmd":["echo hi"],"Env":["PATH=/bin"],"WorkingDir":"/w"}}"#;
        let c = parse_config(c).unwrap();
        assert_eq!(
            c.entrypoint().as_deref(),
            Some(&["/bin/sh".to_string(), "-c".into()][..])
        );
        assert_eq!(c.working_dir().as_deref(), Some("/w"));
        assert!(parse_config(b"[]").is_none());
    }
}
