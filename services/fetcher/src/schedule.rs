//! Scheduling of the work nobody waits for: a layer's prefetch (its
//! landmark, the label's size or the configured size) and then, in the
//! background, the rest of it. Background fetches share the registry link
//! with on-demand reads, so they wait for a quiet period ([`Activity`]),
//! go in small batches, and spend at most a node-wide bandwidth budget.

use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use stargaze_format::Prefetch;
use stargaze_service::metrics::RecentErrors;

use crate::engine::Layer;
use crate::error::FetchError;

/// Ranges per engine call while prefetching (bounds memory per call).
const PREFETCH_BATCH: usize = 256;
/// Batches in flight at once, so that reading one overlaps decoding another.
const PREFETCH_PARALLEL: usize = 4;
/// Ranges per background batch: small, so that on-demand reads arriving
/// meanwhile wait for at most one of them on the link.
const BACKGROUND_BATCH: usize = 16;
/// Default quiet period before background fetches (the Go snapshotter
/// waits 2 s of silence too).
pub const DEFAULT_BACKGROUND_SILENCE: Duration = Duration::from_secs(2);
/// Default upper bound on that wait: cold starts of ordinary containers are
/// over well before it.
pub const DEFAULT_BACKGROUND_MAX_WAIT: Duration = Duration::from_secs(10);

/// How a layer's prefetch and background fetch went (`stargaze status`).
#[derive(Default)]
pub(crate) struct Progress {
    pub(crate) prefetch_done: AtomicBool,
    /// The background fetch was started (once per layer, however many
    /// prefetches ask for it).
    pub(crate) background_started: AtomicBool,
    pub(crate) background_done: AtomicBool,
    pub(crate) last_error: Mutex<String>,
}

/// What is prefetched and when the rest of a layer is fetched.
pub(crate) struct Schedule {
    /// On-demand work, which background fetches make way for.
    pub(crate) activity: Arc<Activity>,
    /// Bytes prefetched when the layer has no landmark and no label.
    prefetch_size: u64,
    pub(crate) background: bool,
    /// Background fetches wait until on-demand work has been quiet this long.
    pub(crate) background_silence: Duration,
    /// ... but for at most this long after the layer's prefetch.
    pub(crate) background_max_wait: Duration,
    /// Node-wide cap on background fetching, compressed bytes per second
    /// (0 = none), and when the budget spent so far runs out.
    pub(crate) background_bandwidth: u64,
    background_budget: Mutex<Instant>,
}

/// On-demand work (reads fs waits for, layer resolution) in flight and when
/// it last ended. Background fetches share the registry link with it and
/// would make a cold start wait behind whole layers, so they only run after
/// a quiet period and pause between batches while on-demand work runs.
pub(crate) struct Activity {
    in_flight: AtomicUsize,
    last_end: Mutex<Instant>,
    /// Background fetches wait until then whatever their deadline: a
    /// container is starting (PauseBackground).
    held_until: Mutex<Instant>,
}

/// Marks one piece of on-demand work while alive.
pub(crate) struct OnDemand<'a>(&'a Activity);

impl Drop for OnDemand<'_> {
    fn drop(&mut self) {
        *self.0.last_end.lock() = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Activity {
    pub(crate) fn new() -> Activity {
        Activity {
            in_flight: AtomicUsize::new(0),
            last_end: Mutex::new(Instant::now()),
            held_until: Mutex::new(Instant::now()),
        }
    }

    /// Hold background fetches for `d` from now.
    pub(crate) fn hold(&self, d: Duration) {
        let mut until = self.held_until.lock();
        *until = (*until).max(Instant::now() + d);
    }

    pub(crate) fn begin(&self) -> OnDemand<'_> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        OnDemand(self)
    }

    /// Wait until nothing on-demand has run for `silence`, or until
    /// `deadline`: a workload that never pauses (a build, a test suite, one
    /// reading most of the image) would otherwise starve the background
    /// fetch and pay a small request per miss for the whole layer.
    async fn quiet(&self, silence: Duration, deadline: Instant) {
        loop {
            let held = *self.held_until.lock();
            if held > Instant::now() {
                tokio::time::sleep_until(held.into()).await;
                continue;
            }
            let busy = self.in_flight.load(Ordering::Acquire) > 0;
            let since = self.last_end.lock().elapsed();
            let now = Instant::now();
            if (!busy && since >= silence) || now >= deadline {
                return;
            }
            let wait = if busy { silence } else { silence - since };
            let wait = wait.min(deadline - now);
            tokio::time::sleep(wait.max(Duration::from_millis(10))).await;
        }
    }
}

/// When a shared bandwidth budget that ran out at `budget` runs out after
/// spending `bytes` more at `rate` bytes/s: time already idle is not saved up.
fn pace(budget: Instant, now: Instant, bytes: u64, rate: u64) -> Instant {
    budget.max(now) + Duration::from_secs_f64(bytes as f64 / rate.max(1) as f64)
}

impl Schedule {
    pub(crate) fn new(prefetch_size: u64, background: bool) -> Schedule {
        Schedule {
            activity: Arc::new(Activity::new()),
            prefetch_size,
            background,
            background_silence: DEFAULT_BACKGROUND_SILENCE,
            background_max_wait: DEFAULT_BACKGROUND_MAX_WAIT,
            background_bandwidth: 0,
            background_budget: Mutex::new(Instant::now()),
        }
    }

    /// File ranges (inode, offset, length) of chunks whose compressed
    /// offset is below `limit` (or all, with `None`), skipping present ones.
    fn ranges_below(layer: &Layer, limit: Option<u64>) -> Vec<(u64, u64, u64)> {
        let mut out = Vec::new();
        for ino in 1..=layer.index.inode_count() {
            let Some(n) = layer.index.inode(ino) else {
                continue;
            };
            if !n.is_reg() {
                continue;
            }
            for c in n.chunks() {
                if limit.is_some_and(|l| c.compressed_offset >= l)
                    || layer.presence.is_present(c.global)
                {
                    continue;
                }
                out.push((ino, c.file_offset, c.size));
            }
        }
        // In blob order: neighbouring members merge into few requests.
        out.sort_by_key(|&(ino, off, _)| {
            layer
                .index
                .inode(ino)
                .and_then(|n| n.chunk_at(off))
                .map(|c| c.compressed_offset)
                .unwrap_or(0)
        });
        out
    }

    async fn fetch_all(
        layer: &Arc<Layer>,
        ranges: Vec<(u64, u64, u64)>,
    ) -> Result<u64, FetchError> {
        crate::engine::fetch_in_batches(
            layer,
            ranges,
            PREFETCH_BATCH,
            PREFETCH_PARALLEL,
            crate::Purpose::Landmark,
        )
        .await
    }

    /// Fetch the rest of a layer one small batch at a time, each after
    /// on-demand work has been quiet for the configured period.
    async fn background(&self, layer: &Arc<Layer>) -> Result<u64, FetchError> {
        let rest = Self::ranges_below(layer, None);
        let mut bytes = 0;
        let deadline = Instant::now() + self.background_max_wait;
        let mut next = 0;
        while next < rest.len() {
            self.activity.quiet(self.background_silence, deadline).await;
            // Past the deadline the workload never pauses (a build, a scan
            // of the image): the rest streams in large requests instead of
            // one small batch per round trip.
            let n = if Instant::now() >= deadline {
                PREFETCH_BATCH
            } else {
                BACKGROUND_BATCH
            };
            let batch = &rest[next..(next + n).min(rest.len())];
            next += batch.len();
            let before = layer.counters.compressed_bytes.load(Ordering::Relaxed);
            // Chunks fetched on demand meanwhile are skipped by the engine.
            bytes += layer
                .fetch_for(batch, crate::Purpose::Background)
                .await?
                .bytes_fetched;
            if self.background_bandwidth > 0 {
                // The counter also moves with on-demand reads of this layer
                // meanwhile; charging them too errs on the quiet side.
                let spent = layer.counters.compressed_bytes.load(Ordering::Relaxed) - before;
                let until = {
                    let mut budget = self.background_budget.lock();
                    *budget = pace(*budget, Instant::now(), spent, self.background_bandwidth);
                    *budget
                };
                tokio::time::sleep_until(until.into()).await;
            }
        }
        Ok(bytes)
    }

    /// Prefetch per the layer's landmark, the label or the configuration,
    /// then (in the background) everything else; `progress` and `errors`
    /// record how it went. With `wait`, returns when the prefetch is done.
    pub(crate) async fn prefetch(
        self: &Arc<Self>,
        layer: Arc<Layer>,
        label_size: u64,
        progress: Arc<Progress>,
        errors: Arc<RecentErrors>,
        wait: bool,
    ) -> Result<u64, FetchError> {
        let limit = match layer.index.prefetch() {
            Prefetch::Disabled => Some(0),
            Prefetch::UpTo(off) => Some(off),
            Prefetch::Unspecified => Some(if label_size > 0 {
                label_size
            } else {
                self.prefetch_size
            }),
        };
        let ranges = Self::ranges_below(&layer, limit);
        let background = self.background;
        let schedule = self.clone();
        let run = {
            let layer = layer.clone();
            let progress = progress.clone();
            async move {
                let r = Self::fetch_all(&layer, ranges).await;
                progress.prefetch_done.store(true, Ordering::Release);
                if let Err(e) = &r {
                    *progress.last_error.lock() = e.to_string();
                    errors.push(layer.digest.to_string(), format!("prefetch: {e}"));
                }
                if background && !progress.background_started.swap(true, Ordering::AcqRel) {
                    let layer2 = layer.clone();
                    let progress2 = progress.clone();
                    let schedule = schedule.clone();
                    tokio::spawn(async move {
                        let r = schedule.background(&layer2).await;
                        if let Err(e) = &r
                            && !layer2.is_evicted()
                        {
                            tracing::warn!(layer = %layer2.digest, error = %e, "background fetch stopped");
                            *progress2.last_error.lock() = e.to_string();
                            errors
                                .push(layer2.digest.to_string(), format!("background fetch: {e}"));
                        }
                        progress2.background_done.store(true, Ordering::Release);
                    });
                }
                r
            }
        };
        if wait {
            run.await
        } else {
            tokio::spawn(run);
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_bandwidth_budget() {
        let t0 = Instant::now();
        // 1 MB at 1 MB/s: one second after now.
        let b = pace(t0, t0, 1_000_000, 1_000_000);
        assert_eq!(b - t0, Duration::from_secs(1));
        // Spending more before it ran out extends it.
        let b2 = pace(b, t0 + Duration::from_millis(10), 500_000, 1_000_000);
        assert_eq!(b2 - t0, Duration::from_millis(1500));
        // After an idle period the budget starts from now, not from the past.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(
            pace(b2, later, 250_000, 1_000_000) - later,
            Duration::from_millis(250)
        );
    }

    #[tokio::test]
    async fn background_waits_for_quiet_but_not_past_the_deadline() {
        let a = Activity::new();
        // Quiet long enough already: no wait.
        *a.last_end.lock() = Instant::now() - Duration::from_secs(5);
        let t = Instant::now();
        a.quiet(Duration::from_secs(2), t + Duration::from_secs(60))
            .await;
        assert!(t.elapsed() < Duration::from_millis(100));
        // Busy the whole time: the deadline ends the wait.
        let busy = a.begin();
        let t = Instant::now();
        a.quiet(Duration::from_secs(2), t + Duration::from_millis(200))
            .await;
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_secs(1),
            "{waited:?}"
        );
        // Not busy any more, but work ended just now: waits for the silence.
        drop(busy);
        let t = Instant::now();
        a.quiet(Duration::from_millis(300), t + Duration::from_secs(60))
            .await;
        assert!(
            t.elapsed() >= Duration::from_millis(250),
            "{:?}",
            t.elapsed()
        );
    }
}
