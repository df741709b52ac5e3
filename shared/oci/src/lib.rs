//! OCI images on disk and their conversion to lazily pullable formats.
//!
//! * [`location`] parses skopeo's transport syntax (`oci:DIR[:TAG]`,
//!   `docker://REF`) so that `stargaze convert` pipes with skopeo.
//! * [`layout`] reads and writes OCI image layouts: `index.json`, tags
//!   (`org.opencontainers.image.ref.name`), digest-verified blobs written
//!   atomically.
//! * [`media`] names the media types and recognises layer compressions.
//! * [`convert`] walks an image (index → manifests → config and layers),
//!   converts each distinct layer once with `stargaze_format::convert_file`,
//!   rewrites descriptors, diff_ids, configs, manifests and the index, keeps
//!   every JSON field it does not need to change, and writes the external TOC
//!   image when asked.
//!
//! Manifests, indexes and configs are handled as `serde_json::Value` on
//! purpose: conversion must not drop fields this code does not know.

pub mod archive;
pub mod convert;
pub mod layout;
pub mod location;
pub mod media;
pub mod platform;
pub mod registry;
pub mod store;

pub use convert::{
    ConvertReport, Direction, ImageConvertOptions, LayerEvent, LayerOutcome, convert_between,
    convert_image,
};
pub use layout::{Descriptor, OciLayout};
pub use location::ImageLocation;
pub use platform::PlatformFilter;
pub use registry::RegistryImage;
pub use store::{ImageDest, ImageSource, LocalBlob};

use std::path::PathBuf;

/// Errors about images and layouts; each names the image, blob or file.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    /// A digest that is not `sha256:<64 lower-case hex>` (from a manifest,
    /// an index or a caller), refused before it names a blob file.
    #[error("unsupported or malformed blob digest: {0}")]
    Digest(#[from] stargaze_format::digest::DigestParseError),
    #[error("image {image}: no tag {tag:?} in {dir} (tags there: {available})")]
    NoSuchTag {
        image: String,
        tag: String,
        dir: PathBuf,
        available: String,
    },
    #[error(
        "blob {digest} in {dir} does not match its digest (got {actual}); the layout is corrupt"
    )]
    BlobDigest {
        digest: String,
        actual: String,
        dir: PathBuf,
    },
    #[error("image {image}, layer {layer}: {source}")]
    Layer {
        image: String,
        layer: String,
        #[source]
        source: Box<stargaze_format::Error>,
    },
    #[error(
        "{0} needs the registry client, which is not built yet; copy the image into a layout first: skopeo copy {0} oci:DIR:TAG"
    )]
    RegistryUnsupported(String),
    /// The registry error is part of the message (not a source, which
    /// would print it twice in a chain).
    #[error("image {image}: {error}")]
    Registry {
        image: String,
        error: Box<stargaze_registry::RegistryError>,
    },
}

impl OciError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> OciError {
        OciError::Io {
            path: path.into(),
            source,
        }
    }
}
