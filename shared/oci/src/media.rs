//! Media types of OCI and Docker images.

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

pub fn is_manifest(media_type: &str) -> bool {
    media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST
}

/// Layers whose blobs may not be redistributed or fetched from the image's
/// registry (Windows base layers): never converted.
pub fn is_foreign_layer(media_type: &str) -> bool {
    media_type.contains("nondistributable") || media_type.contains("foreign")
}

/// Image layers we know how to read (tar, tar+gzip, tar+zstd, Docker gzip).
pub fn is_layer(media_type: &str) -> bool {
    !is_foreign_layer(media_type)
        && (media_type.starts_with("application/vnd.oci.image.layer.v1.tar")
            || media_type == DOCKER_LAYER_GZIP
            || media_type == "application/vnd.docker.image.rootfs.diff.tar")
}
