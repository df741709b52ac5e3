//! What the fs service counts, and its Prometheus text.
//!
//! FUSE operations are timed by an [`OpTimer`] taken at the top of each
//! `Filesystem` method; a read that waits for the fetcher carries its timer
//! into the task that answers it, so its latency includes the fetch.
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `stargaze_fs_operation_duration_seconds` | op | histogram of FUSE operations, request to reply (`_count` = operations) |
//! | `stargaze_fs_bytes_served_total` | source | bytes answered to reads: `cache` (present when asked) or `fetch` (after waiting for the fetcher) |
//! | `stargaze_fs_read_errors_total` | | reads answered EIO because a fetch failed |
//! | `stargaze_fs_listed_entries_total` | | directory entries built for readdir/readdirplus replies (about one per entry listed, plus one per reply that filled up) |
//! | `stargaze_fs_layers_attached` | | layers attached to the mount |
//! | `stargaze_fs_layer_chunks` / `_chunks_present` | layer | chunks of each attached layer, and how many are cached |
//! | `stargaze_fs_fuse_threads` | | threads serving FUSE requests (fixed; does not grow with layers) |
//! | `stargaze_fs_transport` | transport | 1 for the transport serving the mount (`classic` or `io_uring`), 0 for the other |
//! | `stargaze_fs_ring_requests_total` | | FUSE requests served through the io_uring rings |
//! | `stargaze_fs_passthrough_active` | | 1 when files complete in the cache are opened with FUSE passthrough |
//! | `stargaze_fs_passthrough_opens_total` | | files opened with passthrough (their reads bypass this process and the counters above) |
//! | `stargaze_fs_grpc_requests_total` | method, code | `stargaze.v1.Fs` requests |
//! | `stargaze_fs_grpc_request_duration_seconds` | method | their latency |

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use stargaze_service::metrics::{Histogram, RpcMetrics, family, histogram_family};

use crate::FsShared;
use crate::transport::Transport;

/// The FUSE operations the filesystem implements.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    Lookup,
    Getattr,
    Readlink,
    Open,
    Read,
    Release,
    Readdir,
    Readdirplus,
    Statfs,
    Getxattr,
    Listxattr,
    Access,
}

const OPS: [(Op, &str); 12] = [
    (Op::Lookup, "lookup"),
    (Op::Getattr, "getattr"),
    (Op::Readlink, "readlink"),
    (Op::Open, "open"),
    (Op::Read, "read"),
    (Op::Release, "release"),
    (Op::Readdir, "readdir"),
    (Op::Readdirplus, "readdirplus"),
    (Op::Statfs, "statfs"),
    (Op::Getxattr, "getxattr"),
    (Op::Listxattr, "listxattr"),
    (Op::Access, "access"),
];

/// Node-wide counters of the mount (they outlive detached layers, so the
/// Prometheus counters never go down).
#[derive(Debug, Default)]
pub struct FsCounters {
    ops: [Histogram; OPS.len()],
    pub bytes_from_cache: AtomicU64,
    pub bytes_after_fetch: AtomicU64,
    /// Directory entries built for listing replies: a full listing of a
    /// directory should cost about one per entry, however many replies
    /// it takes.
    pub listed_entries: AtomicU64,
}

impl FsCounters {
    /// Start timing one operation; it is recorded when the timer drops.
    pub fn timer(self: &Arc<Self>, op: Op) -> OpTimer {
        OpTimer {
            counters: self.clone(),
            op,
            start: Instant::now(),
        }
    }

    pub fn operations(&self, op: Op) -> u64 {
        self.ops[op as usize].count()
    }
}

/// Records its operation's latency when dropped (after the reply).
pub struct OpTimer {
    counters: Arc<FsCounters>,
    op: Op,
    start: Instant,
}

impl Drop for OpTimer {
    fn drop(&mut self) {
        self.counters.ops[self.op as usize].observe(self.start.elapsed());
    }
}

/// Everything a scrape reads (cheap to clone: a scrape renders a clone).
#[derive(Clone)]
pub struct FsMetrics {
    pub shared: Arc<FsShared>,
    pub rpc: Arc<RpcMetrics>,
    pub fuse_threads: u64,
}

impl std::fmt::Debug for FsMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FsMetrics")
    }
}

impl Collector for FsMetrics {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let c = &self.shared.counters;
        histogram_family(
            &mut e,
            "stargaze_fs_operation_duration_seconds",
            "FUSE operations, from request to reply",
            OPS.iter().map(|(op, name)| {
                (
                    vec![("op".to_string(), name.to_string())],
                    &c.ops[*op as usize],
                )
            }),
        )?;
        family(
            &mut e,
            "stargaze_fs_bytes_served",
            "Bytes answered to reads, by where they were when asked for",
            MetricType::Counter,
            &[
                (
                    vec![("source".into(), "cache".into())],
                    c.bytes_from_cache.load(Ordering::Relaxed),
                ),
                (
                    vec![("source".into(), "fetch".into())],
                    c.bytes_after_fetch.load(Ordering::Relaxed),
                ),
            ],
        )?;
        family(
            &mut e,
            "stargaze_fs_read_errors",
            "Reads answered EIO because a fetch failed",
            MetricType::Counter,
            &[(vec![], self.shared.fetch_errors.load(Ordering::Relaxed))],
        )?;
        family(
            &mut e,
            "stargaze_fs_listed_entries",
            "Directory entries built for readdir and readdirplus replies",
            MetricType::Counter,
            &[(vec![], c.listed_entries.load(Ordering::Relaxed))],
        )?;
        let layers = self.shared.layers.list();
        family(
            &mut e,
            "stargaze_fs_layers_attached",
            "Layers attached to the mount",
            MetricType::Gauge,
            &[(vec![], layers.len() as u64)],
        )?;
        let per_layer = |f: &dyn Fn(&crate::Attached) -> u64| -> Vec<_> {
            layers
                .iter()
                .map(|a| (vec![("layer".to_string(), a.digest.to_string())], f(a)))
                .collect()
        };
        family(
            &mut e,
            "stargaze_fs_layer_chunks",
            "Chunks of each attached layer",
            MetricType::Gauge,
            &per_layer(&|a| a.presence.chunk_count() as u64),
        )?;
        family(
            &mut e,
            "stargaze_fs_layer_chunks_present",
            "Chunks of each attached layer in the cache",
            MetricType::Gauge,
            &per_layer(&|a| a.presence.count_present() as u64),
        )?;
        family(
            &mut e,
            "stargaze_fs_fuse_threads",
            "Threads serving FUSE requests",
            MetricType::Gauge,
            &[(vec![], self.fuse_threads)],
        )?;
        let used = *self.shared.transport.lock();
        family(
            &mut e,
            "stargaze_fs_transport",
            "1 for the FUSE transport serving the mount",
            MetricType::Gauge,
            &[Transport::Classic, Transport::IoUring].map(|t| {
                (
                    vec![("transport".to_string(), t.as_str().to_string())],
                    u64::from(used == Some(t)),
                )
            }),
        )?;
        family(
            &mut e,
            "stargaze_fs_ring_requests",
            "FUSE requests served through the io_uring rings",
            MetricType::Counter,
            &[(vec![], self.shared.uring_requests.load(Ordering::Relaxed))],
        )?;
        let p = &self.shared.passthrough;
        family(
            &mut e,
            "stargaze_fs_passthrough_active",
            "1 when complete files are opened with FUSE passthrough",
            MetricType::Gauge,
            &[(vec![], u64::from(p.active.load(Ordering::Acquire)))],
        )?;
        family(
            &mut e,
            "stargaze_fs_passthrough_opens",
            "Files opened with FUSE passthrough",
            MetricType::Counter,
            &[(vec![], p.opens.load(Ordering::Relaxed))],
        )?;
        self.rpc.encode("stargaze_fs", &mut e)
    }
}

impl FsMetrics {
    /// Prometheus text of the fs service.
    pub fn render(&self) -> String {
        stargaze_service::metrics::render(self.clone())
    }
}
