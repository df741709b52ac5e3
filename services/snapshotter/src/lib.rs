//! The snapshotter: containerd's proxy snapshot plugin.
//!
//! * [`store`] keeps snapshot metadata in redb (one write transaction per
//!   RPC) and their directories, with the semantics of containerd's overlay
//!   snapshotter, and builds their bind/overlay mounts.
//! * [`filters`] evaluates containerd's list filters.
//! * [`service`] serves `containerd.services.snapshots.v1.Snapshots` over
//!   the store.
//!
//! Remote snapshots (layers mounted lazily through the fetcher and fs
//! services) join here next; until then every layer is unpacked by
//! containerd into ordinary snapshots.

pub mod filters;
pub mod mounts;
pub mod service;
pub mod store;
