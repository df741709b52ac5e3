//! What the FUSE threads and the gRPC service share: the layer table, the
//! chunk source, the runtime that answers reads after a fetch, counters,
//! the passthrough state, and the numbers and cache files of open handles.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fuser::INodeNo;
use parking_lot::Mutex;

use crate::layers::{LayerTable, MOUNT_ROOT};
use crate::metrics::FsCounters;
use crate::opens::{Mode, OpenTable};
use crate::passthrough::Passthrough;
use crate::source::ChunkSource;
use crate::transport::Transport;
use stargaze_service::config::FsTransport;

/// Default of `[fs] readahead`.
pub const DEFAULT_READAHEAD: u64 = 1 << 20;

/// Everything the FUSE threads and the gRPC service share.
pub struct FsShared {
    pub layers: LayerTable,
    pub source: Arc<dyn ChunkSource>,
    pub runtime: tokio::runtime::Handle,
    /// Entry and attribute timeout inside layers (they never change).
    pub ttl: Duration,
    /// Bytes fetched ahead after a read that missed, when reading on.
    pub readahead: u64,
    pub fetch_errors: AtomicU64,
    /// Operation latencies and bytes served, node-wide.
    pub counters: Arc<FsCounters>,
    /// Failed reads, for `stargaze status`.
    pub errors: stargaze_service::metrics::RecentErrors,
    /// FUSE passthrough of files complete in the cache.
    pub passthrough: Passthrough,
    /// Set once mounted: tells the kernel to forget entries (on detach).
    pub notifier: Mutex<Option<fuser::Notifier>>,
    pub(crate) handles: Mutex<HashMap<u64, Arc<std::fs::File>>>,
    pub(crate) next_fh: AtomicU64,
    /// Open handles, recorded so a restarted process knows them.
    pub(crate) opens: OnceLock<OpenTable>,
    /// A copy of the session's `/dev/fuse` descriptor, set once mounted:
    /// backing files are registered on it, and the backing ids hold it and
    /// are closed through it (the session's own may be closed, and its
    /// number reused by another file or connection, while an id is open).
    pub(crate) dev: Mutex<Option<Arc<OwnedFd>>>,
    /// The transport asked for (`[fs] transport`, or the
    /// `STARGAZE_FS_TRANSPORT` the binary was started with).
    pub transport_wanted: Mutex<FsTransport>,
    /// The transport serving the mount, once mounted.
    pub transport: Mutex<Option<Transport>>,
    /// Requests served through the io_uring rings.
    pub uring_requests: AtomicU64,
    /// Reads waiting to be reported to the fetcher (`reads.rs`).
    pub reads: crate::reads::ReadLog,
}

impl FsShared {
    /// Shared state serving layers of the cache at `cache_root` (the
    /// fetcher's `cache_dir`).
    pub fn new(
        cache_root: &std::path::Path,
        source: Arc<dyn ChunkSource>,
        runtime: tokio::runtime::Handle,
        ttl: Duration,
    ) -> FsShared {
        FsShared {
            layers: LayerTable::new(cache_root),
            source,
            runtime,
            ttl,
            readahead: DEFAULT_READAHEAD,
            fetch_errors: AtomicU64::new(0),
            counters: Arc::default(),
            errors: Default::default(),
            passthrough: Passthrough::default(),
            notifier: Mutex::new(None),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            opens: OnceLock::new(),
            dev: Mutex::new(None),
            transport_wanted: Mutex::new(FsTransport::Classic),
            transport: Mutex::new(None),
            uring_requests: AtomicU64::new(0),
            reads: Default::default(),
        }
    }

    /// A handle number for the open request `unique` of `ino` in `mode`,
    /// recorded (with its final mode: see [`crate::opens`]) before the
    /// open is answered.
    pub(crate) fn new_handle(&self, ino: u64, mode: Mode, unique: u64) -> u64 {
        match self.opens.get() {
            Some(t) => t.open_handle(ino, mode, unique),
            None => self.next_fh.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Detach a layer and make the kernel forget its directory entry.
    pub fn detach(&self, name: &str) -> bool {
        let found = self.layers.detach(name).is_some();
        if found && let Some(n) = self.notifier.lock().as_ref() {
            let _ = n.inval_entry(INodeNo(MOUNT_ROOT), OsStr::new(name));
        }
        found
    }
}
