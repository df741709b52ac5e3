//! What the snapshot service counts as it serves containerd (read by
//! [`crate::status`] for `stargaze status` and the metrics).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use stargaze_service::metrics::{RecentErrors, RpcMetrics};

/// Counters kept by [`crate::service::SnapshotService`].
#[derive(Debug, Default)]
pub struct SnapshotterStats {
    pub remote_prepared: AtomicU64,
    pub fallbacks: AtomicU64,
    pub reattached: AtomicU64,
    /// Fallback reasons and failed re-attaches.
    pub errors: RecentErrors,
    pub rpc: Arc<RpcMetrics>,
}
