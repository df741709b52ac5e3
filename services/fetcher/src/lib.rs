//! The fetcher: the service that reads layers from registries (the CLI's
//! `rpull` and `convert` use the same registry client for manifests and
//! pushes) and the only writer of the node's chunk cache.
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
//! * [`evict`]: the cache's size limit, a task running eviction passes
//!   (`stargaze_cache::evict`) when the cache outgrows it, or at once when
//!   a write found the cache's filesystem full (with or without a limit;
//!   that read fails with [`ChunkError::CacheFull`], never serving the
//!   unstored chunk); evicted layers are dropped from memory and resolved
//!   anew when asked for again.
//!
//! The service on top, in the order a request goes through it:
//! [`service`] is the `stargaze.v1.Fetcher` adapter (requests in, status
//! codes out through [`FetchError::status`]); `layers` keeps the table of
//! resolved layers and resolves them (the TOC check from the request's
//! labels or the image's manifest, external TOCs from the `-esgztoc`
//! image, the layer's source saved in the cache so that a restart recovers
//! it); `schedule` runs the work nobody waits for (prefetch, then the
//! background fetch once on-demand work is quiet, within a bandwidth
//! budget); `warm` answers WarmLayers (tails read ahead, layers resolved
//! from the manifest ([`image`]: manifests and configs typed by oci-spec), [`entrypoint`] prefetch); [`loads`] fetches what a
//! program loads (its interpreter, its libraries as the dynamic loader
//! finds them) as soon as a read reaches its start, looking paths up
//! through the layer [`stack`]s containers run on; [`sweep`] reads ahead in blob order when
//! on-demand reads go through a layer's files one after another; [`traces`] records
//! what an image's first containers read and replays it on its next cold
//! pull; [`credentials`] files the pull secrets the snapshotter's CRI
//! keychain hands over in the registry client's keychain; [`registry`] adapts the
//! registry client to [`RemoteBlob`]; [`recover`] re-verifies the cache
//! after an unclean stop; [`metrics`] renders Prometheus metrics, among
//! them the bytes read per [`purpose`] (which mechanism asked for them). [`options`] and [`error`] hold the
//! tunables and the errors ([`FetchError`], and [`ChunkError`] for one
//! chunk, whose variant decides the one refetch) every layer above uses.

pub mod blob;
pub mod credentials;
pub mod engine;
pub mod entrypoint;
pub mod error;
pub mod evict;
pub mod image;
mod layers;
pub mod loads;
pub mod metrics;
pub mod options;
pub mod purpose;
pub mod recover;
pub mod registry;
pub mod resolve;
mod schedule;
pub mod service;
pub mod stack;
pub mod sweep;
pub mod traces;
mod warm;

pub use blob::{BlobError, FileBlob, RemoteBlob};
pub use engine::{FetchStats, Layer};
pub use error::{ChunkError, FetchError};
pub use options::FetchOptions;
pub use purpose::Purpose;
pub use resolve::{resolve_layer, resolve_with_toc};
