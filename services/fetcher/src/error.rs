//! Why resolving or fetching failed.

use std::sync::Arc;

use stargaze_format::Digest;

use crate::blob::BlobError;
use tonic::Status;

/// Why resolving or fetching failed; every message names the layer.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// A layer digest that is not `sha256:<64 lower-case hex>`, refused
    /// where it came in (it would otherwise name a cache directory).
    #[error("layer digest: {0}")]
    BadDigest(#[from] stargaze_format::digest::DigestParseError),
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
    /// Resolving the layer found the cache's filesystem full (its index or
    /// presence map could not be written).
    #[error(
        "layer {layer}: the filesystem of the cache {cache} is full ({reason}); eviction is making room, so resolving it again can succeed; set [fetcher] cache_size_limit below that filesystem's free space so that it does not fill up"
    )]
    CacheFull {
        layer: String,
        cache: std::path::PathBuf,
        reason: String,
    },
    #[error("layer {layer}: no inode {ino} in its TOC index")]
    NoSuchInode { layer: String, ino: u64 },
    #[error("layer {layer}, file {file}: {source}")]
    Chunk {
        layer: String,
        file: String,
        #[source]
        source: Box<ChunkError>,
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
                FetchError::NoSuchInode { .. } | FetchError::BadDigest(_) => {
                    Status::invalid_argument(msg)
                }
                FetchError::CacheFull { .. } => Status::unavailable(msg),
                FetchError::Blob { source, .. } if source.retryable => Status::unavailable(msg),
                FetchError::Chunk { .. } => Status::data_loss(msg),
                _ => Status::internal(msg),
            }
        }
    }
}

/// Why one chunk could not be made present. [`FetchError::Chunk`] adds the
/// layer and the file; each variant carries the rest. `Clone`: every caller
/// waiting for the chunk gets the same outcome.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ChunkError {
    /// The chunk's bytes do not hash to the digest its TOC gives.
    #[error(
        "verification failed: chunk at offset {offset} hashes to {actual}, the TOC says {expected}"
    )]
    Mismatch {
        offset: u64,
        actual: Digest,
        expected: Digest,
    },
    /// The member holding the chunk does not decompress: its bytes were
    /// damaged, as a mismatch would show.
    #[error("verification failed: {cause}")]
    Decode { cause: String },
    /// The read of the member failed.
    #[error(transparent)]
    Transport(BlobError),
    /// The read succeeded but did not bring the member in full.
    #[error("{blob}: the registry's answer did not match the ranges asked for")]
    ShortAnswer { blob: String },
    /// The verified bytes could not be written to the cache.
    #[error(transparent)]
    CacheWrite(Arc<stargaze_cache::CacheError>),
    /// The cache's filesystem is full (or over quota): the verified bytes
    /// were not stored. Eviction was asked to make room.
    #[error(
        "the filesystem of the cache {cache} is full ({source}): the chunk was fetched and verified but could not be stored, and nothing was served from it; eviction is making room, so the read can be retried; set [fetcher] cache_size_limit below that filesystem's free space so that it does not fill up"
    )]
    CacheFull {
        cache: std::path::PathBuf,
        source: Arc<stargaze_cache::CacheError>,
    },
    /// Eviction deleted the layer's files meanwhile.
    #[error(
        "the layer was evicted from the cache meanwhile (the cache is over [fetcher] cache_size_limit and no snapshot used the layer); resolve it again"
    )]
    Evicted,
    /// The chunk's file is no longer in the layer's index.
    #[error("inode {ino} vanished from the index")]
    NoInode { ino: u64 },
    /// Decoding the member panicked (a bug; logged where it happened).
    #[error("the decoder failed")]
    DecoderPanicked,
    /// The task fetching the chunk went away without an outcome.
    #[error("the fetch was abandoned")]
    Abandoned,
    /// The batch holding the chunk ended without an outcome for it.
    #[error("chunk was not fetched")]
    NotFetched,
}

impl ChunkError {
    /// Worth fetching once more: the bytes that came were wrong (a flipped
    /// bit on the way, a proxy's bad cache); anything else would fail the
    /// same way again right now.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ChunkError::Mismatch { .. } | ChunkError::Decode { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_wrong_bytes_are_retried() {
        let d = Digest([0; 32]);
        let retried = [
            ChunkError::Mismatch {
                offset: 0,
                actual: d,
                expected: d,
            },
            ChunkError::Decode {
                cause: "bad gzip".into(),
            },
        ];
        for e in &retried {
            assert!(e.is_retryable(), "{e}");
            assert!(e.to_string().starts_with("verification failed"), "{e}");
        }
        let blob = "verification failed.example/app@sha256:1".to_string();
        let not_retried = [
            ChunkError::Transport(BlobError {
                blob: blob.clone(),
                message: "connection reset".into(),
                retryable: true,
            }),
            ChunkError::ShortAnswer { blob },
            ChunkError::CacheFull {
                cache: "/var/lib/stargaze/cache".into(),
                source: Arc::new(stargaze_cache::CacheError::Io {
                    path: "/var/lib/stargaze/cache/layers/x/files/3".into(),
                    source: std::io::Error::from_raw_os_error(28),
                }),
            },
            ChunkError::Evicted,
            ChunkError::NoInode { ino: 3 },
            ChunkError::DecoderPanicked,
            ChunkError::Abandoned,
            ChunkError::NotFetched,
        ];
        for e in &not_retried {
            assert!(!e.is_retryable(), "{e}");
        }
    }
}
