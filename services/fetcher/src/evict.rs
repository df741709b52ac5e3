//! The cache's size limit (`[fetcher] cache_size_limit`): a task that runs
//! eviction passes ([`stargaze_cache::Evictor`]) on the blocking pool.
//!
//! A full pass stats every content file, so it does not run on every write:
//! between passes the task estimates the cache's size as the last pass's
//! result plus the bytes written since ([`stargaze_cache::Cache::written`],
//! checked every second), and runs a pass when that estimate crosses the
//! limit (at most every 5 s; after a pass that could not get under the
//! limit — everything left is in use — only once the cache has grown by
//! another 5 % of the limit), and every 10 minutes to correct the estimate.
//! In between it records every minute which layers are attached, so that
//! eviction's "least recently used" means used by a container, not fetched.
//! A write that finds the cache's filesystem full ([`Cache::note_full`])
//! starts a pass at the next check whatever the estimate: it frees part
//! of what the cache uses even when the limit is above the disk's size,
//! or when no limit is set (the task then does nothing else).

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use stargaze_cache::{Cache, EvictOptions, Eviction, Evictor};
use stargaze_format::Digest;

const CHECK_EVERY: Duration = Duration::from_secs(1);
const MIN_GAP: Duration = Duration::from_secs(5);
const RESCAN_EVERY: Duration = Duration::from_secs(600);
const TOUCH_EVERY: Duration = Duration::from_secs(60);

/// What eviction did since the fetcher started.
#[derive(Debug, Default, Clone)]
pub struct EvictionTotals {
    pub passes: u64,
    pub layers: u64,
    pub files: u64,
    pub bytes: u64,
    /// The last pass.
    pub last: Option<Eviction>,
}

/// The fetcher's eviction state.
pub struct CacheLimit {
    evictor: Evictor,
    totals: Mutex<EvictionTotals>,
}

impl CacheLimit {
    pub fn new(cache: Arc<Cache>, opts: EvictOptions) -> CacheLimit {
        CacheLimit {
            evictor: Evictor::new(cache, opts),
            totals: Mutex::default(),
        }
    }

    pub fn limit(&self) -> u64 {
        self.evictor.options().limit
    }

    pub fn totals(&self) -> EvictionTotals {
        self.totals.lock().clone()
    }

    /// One pass now; `forget` drops an evicted layer from the fetcher's
    /// memory (called with the cache's write gate held).
    pub fn pass(&self, forget: &mut dyn FnMut(&Digest)) -> Eviction {
        self.record(self.evictor.run(forget), false)
    }

    /// A pass after a write found the cache's filesystem full: it frees
    /// part of what the cache uses whatever the limit.
    pub fn pass_full(&self, forget: &mut dyn FnMut(&Digest)) -> Eviction {
        self.record(self.evictor.run_full(forget), true)
    }

    fn record(&self, pass: Eviction, full: bool) -> Eviction {
        let mut t = self.totals.lock();
        t.passes += 1;
        t.layers += u64::from(pass.layers_evicted);
        t.files += pass.files_evicted;
        t.bytes += pass.bytes_freed;
        t.last = Some(pass.clone());
        drop(t);
        let mb = |b: u64| b as f64 / 1e6;
        if full {
            tracing::warn!(
                cache = %self.evictor.cache().root().display(),
                layers = pass.layers_evicted,
                files = pass.files_evicted,
                freed_mb = mb(pass.bytes_freed),
                usage_mb = mb(pass.usage_after),
                "the cache's filesystem was full: evicted least recently used layers to make room; set [fetcher] cache_size_limit below the filesystem's free space"
            );
        } else if pass.layers_evicted > 0 || pass.files_evicted > 0 {
            tracing::info!(
                layers = pass.layers_evicted,
                files = pass.files_evicted,
                freed_mb = mb(pass.bytes_freed),
                before_mb = mb(pass.usage_before),
                after_mb = mb(pass.usage_after),
                limit_mb = mb(self.limit()),
                elapsed = ?pass.elapsed,
                "cache over its limit: evicted least recently used layers"
            );
        }
        if pass.usage_after > self.limit() {
            tracing::warn!(
                usage_mb = mb(pass.usage_after),
                limit_mb = mb(self.limit()),
                kept_mb = mb(pass.kept_bytes),
                pinned_layers = pass.layers_pinned,
                "the cache stays over [fetcher] cache_size_limit: what is left belongs to attached or recently used layers; raise the limit or remove unused images"
            );
        }
        pass
    }

    /// Run passes as described in the module docs, for as long as the
    /// runtime lives.
    pub async fn run(
        self: Arc<Self>,
        cache: Arc<Cache>,
        forget: Arc<dyn Fn(&Digest) + Send + Sync>,
    ) {
        let limit = self.limit();
        let mut last_scan: Option<Instant> = None;
        let mut last_touch = Instant::now();
        let (mut base_usage, mut base_written) = (0u64, 0u64);
        let mut stuck_until = 0u64;
        loop {
            let estimate = base_usage + cache.written().saturating_sub(base_written);
            let since = last_scan.map(|t| t.elapsed());
            // A write found the filesystem full: make room now.
            let full = cache.take_full();
            // Without a limit, only a full filesystem starts a pass.
            let due = full
                || limit > 0
                    && match since {
                        None => true,
                        Some(s) => {
                            s >= RESCAN_EVERY
                                || (estimate > limit && estimate >= stuck_until && s >= MIN_GAP)
                        }
                    };
            if due {
                let written = cache.written();
                let (me, forget) = (self.clone(), forget.clone());
                if let Ok(pass) = tokio::task::spawn_blocking(move || {
                    let mut forget = |d: &Digest| forget(d);
                    if full {
                        me.pass_full(&mut forget)
                    } else {
                        me.pass(&mut forget)
                    }
                })
                .await
                {
                    base_usage = pass.usage_after;
                    base_written = written;
                    stuck_until = if pass.usage_after > limit {
                        pass.usage_after + limit / 20
                    } else {
                        0
                    };
                }
                last_scan = Some(Instant::now());
                last_touch = Instant::now();
            } else if last_touch.elapsed() >= TOUCH_EVERY {
                let me = self.clone();
                let _ = tokio::task::spawn_blocking(move || me.evictor.touch_pinned()).await;
                last_touch = Instant::now();
            }
            tokio::time::sleep(CHECK_EVERY).await;
        }
    }
}
