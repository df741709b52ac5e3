//! The fs service: one FUSE mount per node in which every attached layer is
//! a directory named by its digest's hex.
//!
//! * [`layers`] keeps the attached layers (mapped TOC index, read-only
//!   presence map, cache directory) and numbers inodes `slot << 40 | inode`
//!   so they are unique across layers without a table.
//! * [`ops`] is the filesystem, whatever transport carries its requests:
//!   metadata straight from the mapped index (`entries`), reads of present
//!   chunks from the cache file, reads of missing chunks answered from a
//!   tokio task once the fetcher made them present, with read-ahead and,
//!   for a small file, its small neighbours fetched alongside
//!   (`readahead`). [`FsShared`] is the state the transports and the gRPC
//!   service share, open handles included.
//! * Two transports ([`transport`] chooses): `classic` is fuser's threads
//!   on `/dev/fuse` (`classic.rs` adapts its callbacks to [`ops`]);
//!   [`uring`] is FUSE over io_uring, its own request decoder, reply
//!   encoder and one ring per CPU queue.
//! * [`passthrough`] gives files complete in the cache to the kernel as
//!   backing files (one backing id per inode, never for an inode open in
//!   cached mode).
//! * [`session`] mounts the filesystem or takes over the connection of the
//!   previous process, and starts the FUSE threads; [`handover`] keeps the
//!   FUSE connection across a restart: the `/dev/fuse` descriptor in
//!   systemd's store, the session file (the kernel's INIT, the layers and
//!   their inode slots) and the resend of requests the dead process held;
//!   [`opens`] records open handles and their I/O mode (cached or
//!   passthrough with its backing id) in a shared mapping, so the next
//!   process answers the kernel consistently.
//! * [`source`] is how missing chunks are asked for (the fetcher's gRPC
//!   `Fetch`, retried while the fetcher restarts); [`reads`] reports what
//!   was read, hits included, for the fetcher's learned access traces.
//!
//! * [`service`] is `stargaze.v1.Fs`: attach, detach (refused while an
//!   overlay mount uses the layer), list, status.
//! * [`kill_point`] kills the process at a chosen point of an open or a
//!   release, for the tests of a take-over after `kill -9`.
//! * [`metrics`] times every FUSE operation and counts bytes served from the
//!   cache vs after a fetch, for Prometheus and `stargaze status`.

mod classic;
mod entries;
pub mod handover;
pub mod kill_point;
pub mod layers;
pub mod metrics;
pub mod opens;
pub mod ops;
pub mod passthrough;
mod readahead;
pub mod reads;
pub mod service;
pub mod session;
mod shared;
pub mod source;
pub mod transport;
pub mod uring;

pub use layers::{Attached, LayerTable};
pub use ops::StargazeFs;
pub use session::{FuseMount, mount, mount_or_take_over};
pub use shared::FsShared;
pub use source::{ChunkSource, GrpcFetcher, SourceError};
