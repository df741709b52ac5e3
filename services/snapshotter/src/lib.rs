//! The snapshotter: containerd's proxy snapshot plugin.
//!
//! * [`store`] keeps snapshot metadata in redb (one write transaction per
//!   RPC) and their directories, with the semantics of containerd's overlay
//!   snapshotter, and builds their bind/overlay mounts.
//! * [`filters`] evaluates containerd's list filters.
//! * [`service`] serves `containerd.services.snapshots.v1.Snapshots` over
//!   the store, counting what it does in [`stats`].
//! * [`status`] serves `stargaze.v1.Snapshotter` (for `stargaze status`) on
//!   the same socket and renders the Prometheus metrics.
//!
//! * [`cri_proxy`] serves CRI's `ImageService` for the kubelet in front of
//!   containerd's (`[cri_keychain]`), and [`cri_keychain`] hands each
//!   `PullImage`'s credentials to the fetcher (which keeps them in memory,
//!   expiring) so that private images are pulled lazily too.
//!
//! * [`remote`] turns a `Prepare` that carries a layer's labels into a
//!   remote snapshot: the fetcher resolves the layer (TOC verified, index
//!   written), the fs service attaches it as a directory of its FUSE mount,
//!   and the store commits a snapshot whose tree is that directory. Any
//!   failure falls back to an ordinary snapshot that containerd unpacks.
//!
//! Data flow of a lazy pull: containerd `Prepare(key, parent, labels)` →
//! [`service`] → [`remote::Remote::mount`] (fetcher `ResolveLayer`, fs
//! `Attach`, fetcher `Prefetch` in the background) → [`store::Store::create_remote`]
//! (one transaction) → `AlreadyExists` back to containerd, which then
//! stacks the layer directories as overlay `lowerdir`s of the container.

pub mod cri_keychain;
pub mod cri_proxy;
pub mod filters;
pub mod mounts;
pub mod remote;
pub mod service;
pub mod stats;
pub mod status;
pub mod store;
