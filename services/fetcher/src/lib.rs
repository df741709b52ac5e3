//! The fetcher: the only process that talks to registries and the only
//! writer of the node's chunk cache.
//!
//! * [`blob`]: where bytes come from ([`RemoteBlob`]: size + several ranges
//!   per request; the registry client implements it, [`FileBlob`] serves
//!   local files).
//! * [`resolve`]: a layer's footer and TOC in as few reads as possible (one
//!   tail window that usually holds both), the TOC checked as the request
//!   says ([`resolve::TocCheck`]: the layer's `toc.digest`, or for
//!   zstd:chunked the compressed TOC against the manifest's
//!   `manifest-checksum`, or nothing where unverified layers are allowed),
//!   the TOC index and presence map written into the cache
//!   ([`resolve::resolve_layer`]).
//! * [`engine`]: turning "bytes of these files" into present chunks: chunks
//!   already present are skipped, chunks in flight are waited for (never
//!   fetched twice at once), the rest are queued; a batch takes everything
//!   queued when a request slot frees up, merges neighbouring members into
//!   ranges (gap and size caps), reads them in one call, decompresses each
//!   member once, verifies every chunk's sha256, writes the content file and
//!   only then sets the chunk's presence bit. A chunk that fails verification
//!   is fetched once more, then reported, never served.
//!
//! * [`evict`]: the cache's size limit, a task running eviction passes
//!   (`stargaze_cache::evict`) when the cache outgrows it; evicted layers
//!   are dropped from memory and resolved anew when asked for again.
//!
//! The gRPC service (`stargaze.v1.Fetcher`) and the registry glue sit on top.

pub mod blob;
pub mod engine;
pub mod entrypoint;
pub mod evict;
pub mod metrics;
pub mod recover;
pub mod registry;
pub mod resolve;
pub mod service;

pub use blob::{BlobError, FileBlob, RemoteBlob};
pub use engine::{FetchStats, Layer};
pub use resolve::{resolve_layer, resolve_with_toc};

/// Tunables of resolution and fetching.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Bytes first read from the end of a blob: the footer and a small
    /// TOC in one request, else a second request reads exactly the rest of
    /// the TOC. 64 KiB: a bigger window saves the second round trip for
    /// TOCs up to its size but reads layer data nobody asked for in front
    /// of every smaller TOC (256 KiB cost the benchmark image 0.3 MB, 6 %
    /// of a cold start's bytes; its layers resolve in parallel, so the
    /// largest TOC's two round trips set the time anyway).
    pub tail_window: u64,
    /// Members closer than this are fetched in one range.
    pub merge_gap: u64,
    /// Upper bound on one merged range.
    pub max_merged_range: u64,
    /// Concurrent range reads per layer; requests queued meanwhile are
    /// batched into the next read.
    pub max_inflight_reads: usize,
    /// Reads one fetch call keeps in flight when it claims more than one
    /// read's worth (`max_read_bytes`) of members. Two keep the link busy
    /// while the members of the other read decode; more only add buffers:
    /// with 4, the fetcher's peak RSS while fetching a 1 GiB layer rose
    /// from 58 to 80 MB at the same speed (`bench/fetch-link.sh`).
    pub max_reads_per_fetch: usize,
    /// Compressed bytes one read may carry (bounds memory per read; with
    /// `max_inflight_reads` it bounds the fetcher's buffers).
    pub max_read_bytes: u64,
    /// Files up to this size are fetched whole on their first read.
    pub whole_file_below: u64,
    /// Refuse TOCs larger than this (uncompressed).
    pub max_toc_size: u64,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            tail_window: 64 << 10,
            merge_gap: 256 << 10,
            max_merged_range: 16 << 20,
            max_inflight_reads: 4,
            max_reads_per_fetch: 2,
            max_read_bytes: 8 << 20,
            whole_file_below: 256 << 10,
            max_toc_size: stargaze_format::reader::DEFAULT_MAX_TOC_SIZE,
        }
    }
}

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
