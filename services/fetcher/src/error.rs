//! Why resolving or fetching failed.

use crate::blob::BlobError;
use tonic::Status;

/// Why resolving or fetching failed; every message names the layer.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("layer {layer}: {source}")]
    Blob {
        layer: String,
        #[source]
        source: BlobError,
    },
    #[error(transparent)]
    Format(#[from] stargaze_format::Error),
    #[error("layer {layer}: {source}")]
    Cache {
        layer: String,
        #[source]
        source: stargaze_cache::CacheError,
    },
    #[error("layer {layer}: {source}")]
    Index {
        layer: String,
        #[source]
        source: stargaze_index::IndexError,
    },
    #[error(
        "layer {layer} has no containerd.io/snapshot/stargz/toc.digest annotation: it is not an eStargz layer (convert the image with `stargaze convert` to pull it lazily), or it was converted without OCI annotations (ctr-remote needs --oci); without the digest its TOC cannot be verified; to mount such layers (legacy stargz, for one) unverified, set [snapshotter] allow_no_verification = true and pull with the containerd.io/snapshot/remote/stargz.skipverify label (`ctr-remote image rpull --skip-content-verify`)"
    )]
    NotVerifiable { layer: String },
    #[error(
        "layer {layer} keeps its TOC in a separate -esgztoc image and no TOC for it was found there; push the TOC image (<tag>-esgztoc) with the image"
    )]
    ExternalToc { layer: String },
    #[error(
        "layer {layer} was evicted from the cache (the cache is over [fetcher] cache_size_limit and no snapshot used the layer); resolve it again"
    )]
    Evicted { layer: String },
    #[error("layer {layer}: no inode {ino} in its TOC index")]
    NoSuchInode { layer: String, ino: u64 },
    #[error("layer {layer}, file {file}: {reason}")]
    Chunk {
        layer: String,
        file: String,
        reason: String,
    },
}

impl FetchError {
    /// Is the layer simply not lazily pullable (the caller should fall back
    /// to a normal pull) rather than broken?
    pub fn is_not_lazy(&self) -> bool {
        matches!(
            self,
            FetchError::Format(stargaze_format::Error {
                kind: stargaze_format::ErrorKind::NotLazy(_),
                ..
            }) | FetchError::ExternalToc { .. }
                | FetchError::NotVerifiable { .. }
        )
    }
}

impl FetchError {
    /// The gRPC status a caller sees: its code is what callers decide by
    /// (FAILED_PRECONDITION: pull the layer normally; UNAVAILABLE: try
    /// again; DATA_LOSS: the bytes could not be had verified), the message
    /// is for people.
    pub fn status(&self) -> Status {
        let msg = self.to_string();
        if self.is_not_lazy() {
            Status::failed_precondition(msg)
        } else {
            match self {
                FetchError::NoSuchInode { .. } => Status::invalid_argument(msg),
                FetchError::Blob { source, .. } if source.retryable => Status::unavailable(msg),
                FetchError::Chunk { .. } => Status::data_loss(msg),
                _ => Status::internal(msg),
            }
        }
    }
}
