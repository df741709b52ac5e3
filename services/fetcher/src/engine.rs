//! Fetching chunks of a resolved layer into the cache.
//!
//! A [`Layer::fetch`] call turns file ranges into chunks, skips the present
//! ones, waits for the ones already in flight and claims the rest: claimed
//! chunks join the layer's queue and a drain task is started. A drain task
//! first takes one of `max_inflight_reads` read slots, then takes everything
//! queued at that moment as one batch — so misses that arrive while reads
//! are outstanding are batched without any timer — and fetches it:
//! members (the gzip member or zstd frame holding a chunk; several chunks
//! may share one) are merged into ranges while the gap between them is at
//! most `merge_gap` and the range at most `max_merged_range`, all ranges are
//! read in one `stream_ranges` call, and each member is decompressed once,
//! as soon as its last byte has arrived (an [`Assembly`] cuts the streamed
//! pieces into members), on the decode threads while the rest of the read
//! is still on the wire; each chunk is verified against its sha256, written
//! to the content file, and only then published in the presence map. A
//! fetch of more than one read's worth starts up to `max_reads_per_fetch`
//! drains, so that its reads overlap. Claims are completed through watch
//! channels, each as soon as its chunk is stored (not when its whole read
//! is in); the drain runs as its own task, so a caller that gives up never
//! strands chunks that others wait for.
//!
//! Claims a process waits for ([`Purpose::is_urgent`]) go to their own
//! queue, served first by every drain and by `URGENT_READS` read slots of
//! their own, and a prefetch claim still queued when a reader asks for its
//! chunk moves there: what the kernel asks for never waits behind
//! megabytes of prefetch.
//!
//! Blob bytes read before the layer resolved (a trace's early spans) enter
//! through [`Layer::ingest`] (`engine/ingest.rs`): the same claims, decoding
//! and verification, without a read.

mod ingest;

pub use ingest::Reserved;

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use stargaze_cache::{Cache, PresenceMap};
use stargaze_format::Digest;
use stargaze_format::chunk::with_decompressed_prefix;
use stargaze_format::footer::Compression;
use stargaze_index::{ChunkInfo, LayerIndex};
use tokio::sync::{Semaphore, watch};

use crate::blob::RemoteBlob;
use crate::error::{ChunkError, FetchError};
use crate::options::FetchOptions;
use crate::purpose::{FETCHED, Purpose, PurposeBytes};

type Outcome = Option<Result<(), ChunkError>>;

#[derive(Clone, Copy, Debug)]
struct Claim {
    ino: u64,
    chunk: ChunkInfo,
    purpose: Purpose,
}

#[derive(Default)]
struct State {
    inflight: HashMap<u32, watch::Sender<Outcome>>,
    /// Claims a process waits for: taken before any other.
    urgent: Vec<Claim>,
    /// Claims of prefetches (and the background fetch).
    queue: Vec<Claim>,
}

/// Reads per layer kept for claims a process waits for, besides
/// `max_inflight_reads`: a read of the kernel's never queues behind
/// megabytes of prefetch (8 MiB reads take 0.7 s at 100 Mbit/s).
const URGENT_READS: usize = 2;

/// The gap merged between the ranges of a batch that only replays a trace.
const TRACE_MERGE_GAP: u64 = 16 << 10;

/// Counters of one layer.
#[derive(Debug, Default)]
pub struct LayerCounters {
    pub requests: AtomicU64,
    pub ranges: AtomicU64,
    pub compressed_bytes: AtomicU64,
    pub chunks_fetched: AtomicU64,
    /// Chunks asked for that were already present (cache hits).
    pub chunks_hit: AtomicU64,
    pub verification_failures: AtomicU64,
    /// `compressed_bytes` by what asked for them.
    pub by_purpose: PurposeBytes,
}

/// What one fetch call caused.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FetchStats {
    /// Chunks this call claimed and fetched (others were present or in flight).
    pub chunks_fetched: u32,
    /// Their uncompressed bytes.
    pub bytes_fetched: u64,
}

/// A resolved layer: its index, presence map and blob.
pub struct Layer {
    pub digest: Digest,
    pub index: LayerIndex,
    pub presence: PresenceMap,
    pub counters: LayerCounters,
    blob: Arc<dyn RemoteBlob>,
    cache: Arc<Cache>,
    opts: FetchOptions,
    compression: Compression,
    state: Mutex<State>,
    read_slots: Arc<Semaphore>,
    urgent_slots: Arc<Semaphore>,
    /// Set when eviction deleted the layer's files: nothing more is written.
    evicted: std::sync::atomic::AtomicBool,
    /// When the layer's last use was last recorded, in seconds after
    /// `resolved` (resolution records one).
    touched: AtomicU64,
    resolved: std::time::Instant,
    /// Read-ahead in blob order for sweeping workloads (`sweep.rs`).
    pub sweep: crate::sweep::Sweep,
    /// A learned trace is being replayed into the layer: it knows what
    /// comes next better than a sweep's guess, which would only take the
    /// link from it.
    replaying: std::sync::atomic::AtomicBool,
}

/// A member to decode and the claims it serves.
struct Member {
    end: u64,
    claims: Vec<Claim>,
}

impl Layer {
    pub(crate) fn new(
        digest: Digest,
        index: LayerIndex,
        presence: PresenceMap,
        blob: Arc<dyn RemoteBlob>,
        cache: Arc<Cache>,
        opts: FetchOptions,
    ) -> Layer {
        let compression = index
            .format()
            .map(|f| f.compression())
            .unwrap_or(Compression::Gzip);
        Layer {
            digest,
            index,
            presence,
            counters: LayerCounters::default(),
            blob,
            cache,
            read_slots: Arc::new(Semaphore::new(opts.max_inflight_reads.max(1))),
            urgent_slots: Arc::new(Semaphore::new(URGENT_READS)),
            opts,
            compression,
            state: Mutex::new(State::default()),
            evicted: Default::default(),
            touched: AtomicU64::new(0),
            resolved: std::time::Instant::now(),
            sweep: Default::default(),
            replaying: Default::default(),
        }
    }

    /// Eviction deleted the layer's files (called with the cache's write
    /// gate held): fetches fail from now on; resolving again makes a new one.
    pub fn mark_evicted(&self) {
        self.evicted.store(true, Ordering::Release);
    }

    pub fn is_evicted(&self) -> bool {
        self.evicted.load(Ordering::Acquire)
    }

    fn evicted_error(&self) -> FetchError {
        FetchError::Evicted {
            layer: self.digest.to_string(),
        }
    }

    /// Record a use of the layer for eviction's LRU order (at most every
    /// 30 s: it is a metadata write).
    fn touch(&self) {
        let now = self.resolved.elapsed().as_secs();
        let last = self.touched.load(Ordering::Relaxed);
        if now >= last + 30
            && self
                .touched
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.cache.touch_layer(&self.digest);
        }
    }

    /// The cache file holding inode `ino`'s content for this layer.
    pub fn content_path(&self, ino: u64) -> std::path::PathBuf {
        self.cache.layer_file_path(&self.digest, ino)
    }

    /// Chunks covering `[offset, offset + len)` of a file (the whole file
    /// when it is small: the chunks beyond the range asked for are claimed
    /// as [`Purpose::WholeFile`] when a read asked).
    fn chunks_for(
        &self,
        ino: u64,
        offset: u64,
        len: u64,
        purpose: Purpose,
    ) -> Result<Vec<Claim>, FetchError> {
        let node = self
            .index
            .inode(ino)
            .ok_or_else(|| FetchError::NoSuchInode {
                layer: self.digest.to_string(),
                ino,
            })?;
        if !node.is_reg() || len == 0 {
            return Ok(Vec::new());
        }
        let asked_end = offset.saturating_add(len).min(node.size());
        let (start, end) = if node.size() <= self.opts.whole_file_below {
            (0, node.size())
        } else {
            (offset, asked_end)
        };
        Ok(node
            .chunks_in(start, end)
            .map(|chunk| {
                let asked =
                    chunk.file_offset < asked_end && chunk.file_offset + chunk.size.max(1) > offset;
                Claim {
                    ino,
                    chunk,
                    purpose: if purpose == Purpose::Read && !asked {
                        Purpose::WholeFile
                    } else {
                        purpose
                    },
                }
            })
            .collect())
    }

    /// Make the given file ranges `(inode, offset, length)` present for a
    /// process waiting for them.
    pub async fn fetch(
        self: &Arc<Self>,
        ranges: &[(u64, u64, u64)],
    ) -> Result<FetchStats, FetchError> {
        self.fetch_for(ranges, Purpose::Read).await
    }

    /// [`Layer::fetch`] for another purpose (counted under it; background
    /// fetches decode on low-priority threads).
    pub async fn fetch_for(
        self: &Arc<Self>,
        ranges: &[(u64, u64, u64)],
        purpose: Purpose,
    ) -> Result<FetchStats, FetchError> {
        self.claim_and_wait(ranges, purpose, true).await
    }

    /// [`Layer::fetch_for`] that waits only for the chunks it claimed:
    /// a prefetch that paces itself by its own reads (the replay of a
    /// trace) does not sit on chunks another read brings in.
    pub async fn fetch_own(
        self: &Arc<Self>,
        ranges: &[(u64, u64, u64)],
        purpose: Purpose,
    ) -> Result<FetchStats, FetchError> {
        self.claim_and_wait(ranges, purpose, false).await
    }

    async fn claim_and_wait(
        self: &Arc<Self>,
        ranges: &[(u64, u64, u64)],
        purpose: Purpose,
        others: bool,
    ) -> Result<FetchStats, FetchError> {
        if self.is_evicted() {
            return Err(self.evicted_error());
        }
        self.touch();
        let mut wanted: Vec<Claim> = Vec::new();
        for &(ino, off, len) in ranges {
            wanted.extend(self.chunks_for(ino, off, len, purpose)?);
        }
        let asked = wanted.len();
        wanted.retain(|c| !self.presence.is_present(c.chunk.global));
        self.counters
            .chunks_hit
            .fetch_add((asked - wanted.len()) as u64, Ordering::Relaxed);
        if wanted.is_empty() {
            return Ok(FetchStats::default());
        }
        // The strongest purpose of a chunk claimed twice is kept.
        wanted.sort_by_key(|c| (c.chunk.global, c.purpose));
        wanted.dedup_by_key(|c| c.chunk.global);
        let amplified = if purpose.is_urgent() {
            self.amplify(&wanted)
        } else {
            Vec::new()
        };
        let mut waits: Vec<(Claim, watch::Receiver<Outcome>)> = Vec::with_capacity(wanted.len());
        let mut stats = FetchStats::default();
        // Compressed bytes of the members newly claimed (each counted once).
        let mut claimed_bytes = 0u64;
        let mut last_member = None;
        let urgent = purpose.is_urgent();
        // Prefetch claims a reader now waits for, moved to the urgent queue.
        let mut promoted = 0;
        {
            let mut st = self.state.lock();
            for c in wanted {
                if self.presence.is_present(c.chunk.global) {
                    continue;
                }
                if let Some(tx) = st.inflight.get(&c.chunk.global) {
                    if others {
                        waits.push((c, tx.subscribe()));
                    }
                    if urgent
                        && let Some(i) = st
                            .queue
                            .iter()
                            .position(|q| q.chunk.global == c.chunk.global)
                    {
                        let mut q = st.queue.swap_remove(i);
                        q.purpose = q.purpose.min(c.purpose);
                        st.urgent.push(q);
                        promoted += 1;
                    }
                    continue;
                }
                let (tx, rx) = watch::channel(None);
                st.inflight.insert(c.chunk.global, tx);
                if urgent {
                    st.urgent.push(c);
                } else {
                    st.queue.push(c);
                }
                stats.chunks_fetched += 1;
                stats.bytes_fetched += c.chunk.size;
                if last_member != Some(c.chunk.compressed_offset) {
                    claimed_bytes += c.chunk.compressed_end - c.chunk.compressed_offset;
                    last_member = Some(c.chunk.compressed_offset);
                }
                waits.push((c, rx));
            }
            // Claimed alongside, in the same queue (so in the same read),
            // but nobody waits for them.
            for c in amplified {
                if self.presence.is_present(c.chunk.global)
                    || st.inflight.contains_key(&c.chunk.global)
                {
                    continue;
                }
                let (tx, _) = watch::channel(None);
                st.inflight.insert(c.chunk.global, tx);
                st.urgent.push(c);
                if last_member != Some(c.chunk.compressed_offset) {
                    claimed_bytes += c.chunk.compressed_end - c.chunk.compressed_offset;
                    last_member = Some(c.chunk.compressed_offset);
                }
            }
        }
        if stats.chunks_fetched > 0 {
            // One drain per read's worth of bytes, up to
            // `max_reads_per_fetch`: a large fetch goes out as parallel
            // reads instead of one read after another (each waiting for the
            // decoding of the last); every drain still takes a read slot.
            let drains = claimed_bytes
                .div_ceil(self.opts.max_read_bytes.max(1))
                .clamp(1, self.opts.max_reads_per_fetch.max(1) as u64);
            for _ in 0..drains {
                tokio::spawn(self.clone().drain(urgent));
            }
        } else if promoted > 0 {
            tokio::spawn(self.clone().drain(true));
        }
        for (c, mut rx) in waits {
            let outcome = rx
                .wait_for(|o| o.is_some())
                .await
                .map(|o| o.clone())
                .unwrap_or_else(|_| Some(Err(ChunkError::Abandoned)));
            if let Some(Err(source)) = outcome {
                return Err(FetchError::Chunk {
                    layer: self.digest.to_string(),
                    file: self.index.path_of(c.ino),
                    source: Box::new(source),
                });
            }
        }
        Ok(stats)
    }

    /// Whether a learned trace is being replayed into the layer (no sweep
    /// read-ahead meanwhile).
    pub fn set_replaying(&self, on: bool) {
        self.replaying.store(on, Ordering::Relaxed);
    }

    pub fn is_replaying(&self) -> bool {
        self.replaying.load(Ordering::Relaxed)
    }

    /// What an on-demand read of `ranges` fetches ahead when it continues
    /// a sweep of the layer (`sweep.rs`; nothing while a trace is being
    /// replayed into it).
    pub fn sweep_ahead(&self, ranges: &[(u64, u64, u64)]) -> Vec<(u64, u64, u64)> {
        if self.replaying.load(Ordering::Relaxed) {
            return Vec::new();
        }
        self.sweep
            .read(&self.index, ranges, self.opts.sweep_max_window)
    }

    /// The chunks following a read's last missing member in the blob, up
    /// to `read_amplify` compressed bytes: fetched in the same request,
    /// claimed as [`Purpose::Neighbours`].
    fn amplify(&self, wanted: &[Claim]) -> Vec<Claim> {
        if self.opts.read_amplify == 0 {
            return Vec::new();
        }
        let Some(end) = wanted.iter().map(|c| c.chunk.compressed_end).max() else {
            return Vec::new();
        };
        self.sweep
            .following(&self.index, end, self.opts.read_amplify)
            .into_iter()
            .filter(|(_, chunk)| !chunk.zeros && !self.presence.is_present(chunk.global))
            .map(|(ino, chunk)| Claim {
                ino,
                chunk,
                purpose: Purpose::Neighbours,
            })
            .collect()
    }

    /// Take a read slot, then everything queued, and fetch it. An urgent
    /// drain takes one of the slots kept for readers and only their claims;
    /// the others take readers' claims first, then prefetches'.
    async fn drain(self: Arc<Self>, urgent: bool) {
        let slots = if urgent {
            &self.urgent_slots
        } else {
            &self.read_slots
        };
        let Ok(_permit) = slots.clone().acquire_owned().await else {
            return;
        };
        loop {
            let batch = {
                let mut st = self.state.lock();
                let batch = take_budget(&mut st.urgent, self.opts.max_read_bytes);
                if batch.is_empty() && !urgent {
                    take_budget(&mut st.queue, self.opts.max_read_bytes)
                } else {
                    batch
                }
            };
            if batch.is_empty() {
                return;
            }
            let results = self.fetch_batch(&batch).await;
            let mut st = self.state.lock();
            for (c, r) in batch.iter().zip(results) {
                if let Some(tx) = st.inflight.remove(&c.chunk.global) {
                    let _ = tx.send(Some(r));
                }
            }
        }
    }

    /// Plan ranges over members: merge while the gap and size caps allow.
    /// A batch that only replays a trace merges small gaps only: the trace
    /// names every range it needs, and a gap's bytes would be read for
    /// nothing (a range more in a request costs a part header, a gap of
    /// `merge_gap` costs 20 ms at 100 Mbit/s).
    fn plan(&self, members: &BTreeMap<u64, Member>) -> Vec<(Range<u64>, Vec<u64>)> {
        let traced = members
            .values()
            .flat_map(|m| &m.claims)
            .all(|c| c.purpose == Purpose::Trace);
        let gap = if traced {
            self.opts.merge_gap.min(TRACE_MERGE_GAP)
        } else {
            self.opts.merge_gap
        };
        let mut out: Vec<(Range<u64>, Vec<u64>)> = Vec::new();
        for (&start, m) in members {
            if let Some((r, list)) = out.last_mut()
                && start <= r.end.saturating_add(gap)
                && m.end.max(r.end) - r.start <= self.opts.max_merged_range
            {
                r.end = r.end.max(m.end);
                list.push(start);
                continue;
            }
            out.push((start..m.end, vec![start]));
        }
        out
    }

    /// Count a read's bytes by purpose: each member under its claims'
    /// strongest purpose, the rest of the ranges as merged gaps.
    fn count_purposes(&self, ranges: &[Range<u64>], todo: &BTreeMap<u64, Member>) {
        let total: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        let mut members = 0;
        for (&start, m) in todo {
            let Some(purpose) = m.claims.iter().map(|c| c.purpose).min() else {
                continue;
            };
            members += m.end - start;
            self.counters.by_purpose.add(purpose, m.end - start);
            FETCHED.add(purpose, m.end - start);
        }
        let gap = total.saturating_sub(members);
        self.counters.by_purpose.add_gap(gap);
        FETCHED.add_gap(gap);
    }

    /// The purposes of a read's claims, for its log line.
    fn purposes_of(&self, todo: &BTreeMap<u64, Member>) -> String {
        let mut seen: Vec<&'static str> = todo
            .values()
            .flat_map(|m| &m.claims)
            .map(|c| c.purpose.label())
            .collect();
        seen.sort_unstable();
        seen.dedup();
        seen.join(",")
    }

    /// The first few files a read brings in, in blob order, for its log
    /// line (a timeline of a cold start is read from these lines).
    fn files_of(&self, todo: &BTreeMap<u64, Member>) -> String {
        const SHOWN: usize = 4;
        let mut seen = std::collections::HashSet::new();
        let inos: Vec<u64> = todo
            .values()
            .flat_map(|m| &m.claims)
            .map(|c| c.ino)
            .filter(|&ino| seen.insert(ino))
            .collect();
        let mut names: Vec<String> = inos
            .iter()
            .take(SHOWN)
            .map(|&ino| self.index.path_of(ino))
            .collect();
        if inos.len() > SHOWN {
            names.push(format!("+{} more", inos.len() - SHOWN));
        }
        names.join(" ")
    }

    /// Fetch, verify, write and publish a batch; one result per claim.
    async fn fetch_batch(self: &Arc<Self>, batch: &[Claim]) -> Vec<Result<(), ChunkError>> {
        let mut results: HashMap<u32, Result<(), ChunkError>> = HashMap::new();
        let mut members: BTreeMap<u64, Member> = BTreeMap::new();
        for c in batch {
            if c.chunk.zeros {
                // A hole: nothing to fetch, but still verified.
                results.insert(
                    c.chunk.global,
                    self.store(c, &vec![0u8; c.chunk.size as usize]),
                );
                continue;
            }
            let m = members.entry(c.chunk.compressed_offset).or_insert(Member {
                end: c.chunk.compressed_end,
                claims: Vec::new(),
            });
            m.end = m.end.max(c.chunk.compressed_end);
            m.claims.push(*c);
        }
        let mut retry: BTreeMap<u64, Member> = BTreeMap::new();
        for attempt in 0..2 {
            let todo = if attempt == 0 {
                std::mem::take(&mut members)
            } else {
                std::mem::take(&mut retry)
            };
            if todo.is_empty() {
                break;
            }
            let plan = self.plan(&todo);
            let ranges: Vec<Range<u64>> = plan.iter().map(|(r, _)| r.clone()).collect();
            // Where members end: the transport cuts its pieces there.
            let ends: Vec<Vec<u64>> = plan
                .iter()
                .map(|(_, starts)| {
                    let mut e: Vec<u64> = starts.iter().map(|s| todo[s].end).collect();
                    e.sort_unstable();
                    e
                })
                .collect();
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            self.counters
                .ranges
                .fetch_add(ranges.len() as u64, Ordering::Relaxed);
            // Members are decoded while the read streams in: each as soon as
            // its last byte has arrived, on the decode threads
            // (decompression and hashing are the CPU-heavy part), so that
            // little is left to decode when the last byte is in.
            // Low-priority threads only when nobody waits for any chunk of
            // the batch.
            self.count_purposes(&ranges, &todo);
            let background = todo
                .values()
                .flat_map(|m| &m.claims)
                .all(|c| c.purpose.is_background());
            let pool = background.then(background_pool).flatten();
            let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
            let mut assembly = Assembly::new(&plan, &todo);
            let t0 = std::time::Instant::now();
            let mut outcomes: HashMap<u64, Vec<Result<(), ChunkError>>> = HashMap::new();
            // Each member's waiters are answered as soon as it is stored,
            // not when the whole read is in: a reader whose chunk came
            // first in an 8 MiB read does not wait for the rest.
            let mut answer = |start: u64, outcome: Vec<Result<(), ChunkError>>| {
                self.answer_stored(&todo[&start].claims, &outcome);
                outcomes.insert(start, outcome);
            };
            let read = {
                let mut sink = |i: usize, piece: bytes::Bytes| {
                    self.counters
                        .compressed_bytes
                        .fetch_add(piece.len() as u64, Ordering::Relaxed);
                    for (start, member) in assembly.add(i, piece) {
                        self.decode_later(pool, start, member, &todo[&start].claims, &done_tx);
                    }
                };
                let read = self.blob.stream_ranges(&ranges, &ends, &mut sink);
                tokio::pin!(read);
                loop {
                    tokio::select! {
                        r = &mut read => break r,
                        Some((start, outcome)) = done_rx.recv() => answer(start, outcome),
                    }
                }
            };
            let read_time = t0.elapsed();
            drop(done_tx);
            while let Some((start, outcome)) = done_rx.recv().await {
                answer(start, outcome);
            }
            tracing::debug!(
                layer = %self.digest,
                purposes = %self.purposes_of(&todo),
                files = %self.files_of(&todo),
                ranges = ranges.len(),
                bytes = ranges.iter().map(|r| r.end - r.start).sum::<u64>(),
                first = ranges.first().map(|r| r.start).unwrap_or(0),
                elapsed = ?read_time,
                decode_after_read = ?t0.elapsed() - read_time,
                "range read"
            );
            // Members the read did not bring in full.
            let missing = match &read {
                Err(e) => ChunkError::Transport(e.clone()),
                Ok(()) => ChunkError::ShortAnswer {
                    blob: self.blob.name(),
                },
            };
            for (start, m) in &todo {
                let outcome = outcomes
                    .remove(start)
                    .unwrap_or_else(|| vec![Err(missing.clone()); m.claims.len()]);
                let mut failed = Vec::new();
                for (c, r) in m.claims.iter().zip(outcome) {
                    match r {
                        Err(reason) if attempt == 0 && reason.is_retryable() => {
                            self.counters
                                .verification_failures
                                .fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(layer = %self.digest, file = %self.index.path_of(c.ino), %reason, "refetching a chunk that failed verification");
                            failed.push(*c);
                        }
                        r => {
                            if matches!(r, Err(ref reason) if reason.is_retryable()) {
                                self.counters
                                    .verification_failures
                                    .fetch_add(1, Ordering::Relaxed);
                            }
                            results.insert(c.chunk.global, r);
                        }
                    }
                }
                if !failed.is_empty() {
                    retry.insert(
                        *start,
                        Member {
                            end: m.end,
                            claims: failed,
                        },
                    );
                }
            }
        }
        batch
            .iter()
            .map(|c| {
                results
                    .remove(&c.chunk.global)
                    .unwrap_or(Err(ChunkError::NotFetched))
            })
            .collect()
    }

    /// Answer the waiters of the claims stored successfully (failures are
    /// answered at the end of the batch, after the one retry).
    fn answer_stored(&self, claims: &[Claim], outcome: &[Result<(), ChunkError>]) {
        let mut st = self.state.lock();
        for (c, r) in claims.iter().zip(outcome) {
            if r.is_ok()
                && let Some(tx) = st.inflight.remove(&c.chunk.global)
            {
                let _ = tx.send(Some(Ok(())));
            }
        }
    }

    /// Decode a member on the decode threads (`pool`, else rayon's shared
    /// pool); its outcome, one result per claim, goes to `done`.
    fn decode_later(
        self: &Arc<Self>,
        pool: Option<&'static rayon::ThreadPool>,
        start: u64,
        member: bytes::Bytes,
        claims: &[Claim],
        done: &tokio::sync::mpsc::UnboundedSender<(u64, Vec<Result<(), ChunkError>>)>,
    ) {
        let (me, claims, done) = (self.clone(), claims.to_vec(), done.clone());
        let job = move || {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                me.decode_member(&member, &claims)
            }))
            .unwrap_or_else(|_| vec![Err(ChunkError::DecoderPanicked); claims.len()]);
            let _ = done.send((start, outcome));
        };
        match pool {
            Some(p) => p.spawn(job),
            None => rayon::spawn(job),
        }
    }

    /// Decompress one member and store every chunk it serves.
    fn decode_member(&self, compressed: &[u8], claims: &[Claim]) -> Vec<Result<(), ChunkError>> {
        let needed = claims
            .iter()
            .map(|c| c.chunk.inner_offset + c.chunk.size)
            .max()
            .unwrap_or(0);
        let started = thread_cpu_ns();
        let stored = with_decompressed_prefix(self.compression, compressed, needed, |data| {
            STAGE_CPU.add(&STAGE_CPU.decompress_ns, started);
            if self.cache.uses_thread_rings() {
                return self.store_batched(claims, data);
            }
            claims
                .iter()
                .map(|c| {
                    let from = c.chunk.inner_offset as usize;
                    self.store(c, &data[from..from + c.chunk.size as usize])
                })
                .collect()
        });
        stored.unwrap_or_else(|cause| vec![Err(ChunkError::Decode { cause }); claims.len()])
    }

    /// Verify a chunk's bytes, write them, then publish the chunk.
    fn store(&self, c: &Claim, data: &[u8]) -> Result<(), ChunkError> {
        let started = thread_cpu_ns();
        let checked = verify(c, data);
        // The end of the hash is the start of the write (one clock read).
        let verified = STAGE_CPU.add(&STAGE_CPU.verify_ns, started);
        checked?;
        let stored = self.write_and_publish(c, data);
        STAGE_CPU.add(&STAGE_CPU.write_ns, verified);
        stored
    }

    /// [`Self::store`] for a member's chunks at once, with the writes on
    /// this thread's ring (`cache_io = "io_uring"`): verify every chunk,
    /// open their files, queue every write without waiting, then reap the
    /// completions, and only then publish the chunks whose writes completed
    /// in full. `data` is the member's decompressed bytes.
    fn store_batched(&self, claims: &[Claim], data: &[u8]) -> Vec<Result<(), ChunkError>> {
        let started = thread_cpu_ns();
        let slice = |c: &Claim| {
            let from = c.chunk.inner_offset as usize;
            &data[from..from + c.chunk.size as usize]
        };
        let mut out: Vec<Result<(), ChunkError>> =
            claims.iter().map(|c| verify(c, slice(c))).collect();
        let verified = STAGE_CPU.add(&STAGE_CPU.verify_ns, started);
        // Eviction cannot delete a file between its open and its bit.
        let writing = self.cache.writing();
        let evicted = self.is_evicted();
        // `None` with an `Ok`: the file is complete (see `write_and_publish`).
        let mut files: Vec<Option<stargaze_cache::ContentFile>> = Vec::with_capacity(claims.len());
        for (c, o) in claims.iter().zip(out.iter_mut()) {
            let opened = o.is_ok().then(|| {
                if evicted {
                    return Err(ChunkError::Evicted);
                }
                let content = self.content_file(c)?;
                if let Some(content) = &content {
                    content
                        .prepare_write(c.chunk.file_offset, c.chunk.size)
                        .map_err(|e| self.write_error(e))?;
                }
                Ok(content)
            });
            files.push(match opened {
                Some(Ok(f)) => f,
                Some(Err(e)) => {
                    *o = Err(e);
                    None
                }
                None => None,
            });
        }
        let written = write_on_thread_ring(claims, &files, slice);
        for (((c, o), f), w) in claims.iter().zip(out.iter_mut()).zip(&files).zip(written) {
            if o.is_err() {
                continue;
            }
            if let Some(f) = f {
                // A file without a result must never read as written.
                let w =
                    w.unwrap_or_else(|| Err(std::io::Error::other("no result for a queued write")));
                if let Err(e) = w {
                    // The bit stays clear: partly written bytes are never
                    // served.
                    *o = Err(self.write_error(f.io_error(e)));
                    continue;
                }
                self.cache.note_written(c.chunk.size);
            }
            self.presence.set_present(c.chunk.global);
            self.counters.chunks_fetched.fetch_add(1, Ordering::Relaxed);
        }
        drop(writing);
        for ((c, o), f) in claims.iter().zip(&out).zip(files) {
            let (Ok(()), Some(content)) = (o, f) else {
                continue;
            };
            self.share_if_complete(c, content);
        }
        STAGE_CPU.add(&STAGE_CPU.write_ns, verified);
        out
    }

    /// Write verified bytes to the layer's file, then publish the chunk.
    /// The chunk that completes a file shares it with other layers once
    /// the whole file is verified.
    fn write_and_publish(&self, c: &Claim, data: &[u8]) -> Result<(), ChunkError> {
        // Eviction cannot delete the file between this check and the bit.
        let writing = self.cache.writing();
        if self.is_evicted() {
            return Err(ChunkError::Evicted);
        }
        let content = self.content_file(c)?;
        // `None`: the file is complete, every byte already verified for
        // this layer (the chunk was cleared after a crash, or the file was
        // adopted from shared content meanwhile).
        if let Some(content) = &content {
            content
                .write_at(c.chunk.file_offset, data)
                .map_err(|e| self.write_error(e))?;
            self.cache.note_written(c.chunk.size);
        }
        self.presence.set_present(c.chunk.global);
        self.counters.chunks_fetched.fetch_add(1, Ordering::Relaxed);
        drop(writing);
        if let Some(content) = content {
            self.share_if_complete(c, content);
        }
        Ok(())
    }

    /// The content file `c`'s chunk is written into, opened for writing;
    /// `None` when the file is complete (every byte already verified for
    /// this layer).
    fn content_file(&self, c: &Claim) -> Result<Option<stargaze_cache::ContentFile>, ChunkError> {
        let node = self
            .index
            .inode(c.ino)
            .ok_or(ChunkError::NoInode { ino: c.ino })?;
        self.cache
            .layer_file_writer(&self.digest, c.ino, node.size())
            .map_err(|e| self.write_error(e))
    }

    /// `c` was published: when it completed its file, share the file with
    /// other layers once its whole-file digest is verified.
    fn share_if_complete(&self, c: &Claim, content: stargaze_cache::ContentFile) {
        let Some(node) = self.index.inode(c.ino) else {
            return;
        };
        let first = c.chunk.global - c.chunk.index as u32;
        if let Some(digest) = node.digest()
            && self
                .presence
                .all_present(first..first + node.chunk_count() as u32)
        {
            let whole_chunk = node.chunk_count() == 1
                && c.chunk.size == node.size()
                && c.chunk.digest == digest.0;
            self.share_later(c.ino, content, digest, node.size(), whole_chunk);
        }
    }

    /// A failed cache write as a chunk's error. A full filesystem asks
    /// eviction to make room; the bit stays clear, so the partly written
    /// bytes are never served.
    fn write_error(&self, e: stargaze_cache::CacheError) -> ChunkError {
        if !e.is_out_of_space() {
            return ChunkError::CacheWrite(Arc::new(e));
        }
        // Once per eviction look, not once per chunk.
        if self.cache.note_full() {
            tracing::warn!(
                layer = %self.digest,
                cache = %self.cache.root().display(),
                error = %e,
                "the cache's filesystem is full: verified chunks cannot be stored (their reads fail until eviction makes room); set [fetcher] cache_size_limit below the filesystem's free space"
            );
        }
        ChunkError::CacheFull {
            cache: self.cache.root().to_path_buf(),
            source: Arc::new(e),
        }
    }

    /// Share a complete file once its bytes hash to its TOC digest. A
    /// one-chunk file whose chunk digest is the file digest was just
    /// verified by that chunk and is shared at once; any other file is
    /// hashed whole (against the TOC's size too) on the background threads:
    /// the layer reads its own file meanwhile, and only other layers wait
    /// for the shared copy.
    fn share_later(
        &self,
        ino: u64,
        content: stargaze_cache::ContentFile,
        digest: Digest,
        size: u64,
        verified: bool,
    ) {
        if verified {
            return share_verified(&self.cache, &self.digest, ino, &content, &digest, || {
                self.index.path_of(ino)
            });
        }
        // The file's name, for the log lines only.
        let path = self.index.path_of(ino);
        let (cache, layer) = (self.cache.clone(), self.digest);
        let job = move || {
            if !stargaze_cache::hashes_to(&content, size, &digest) {
                tracing::warn!(
                    layer = %layer,
                    file = %path,
                    toc_digest = %digest,
                    "the file's chunks match their digests but the whole file does not hash to the digest the TOC gives: it is kept to this layer and never shared"
                );
                return;
            }
            share_verified(&cache, &layer, ino, &content, &digest, || path);
        };
        match background_pool() {
            Some(p) => p.spawn(job),
            None => rayon::spawn(job),
        }
    }

    /// Chunks present / total.
    pub fn progress(&self) -> (u32, u32) {
        (self.presence.count_present(), self.presence.chunk_count())
    }
}

/// Share a layer's complete file whose bytes are known to hash to `digest`
/// (`file` names it in the log, computed only on failure).
fn share_verified(
    cache: &Cache,
    layer: &Digest,
    ino: u64,
    content: &stargaze_cache::ContentFile,
    digest: &Digest,
    file: impl FnOnce() -> String,
) {
    let _writing = cache.writing();
    if let Err(e) = cache.share(layer, ino, content, digest) {
        tracing::warn!(%layer, file = %file(), error = %e, "cannot share a verified file (it stays the layer's own)");
    }
}

/// CPU time spent on each stage of storing chunks, by every layer of the
/// process since it started: thread CPU time of the threads doing it, so
/// that time they spent preempted is not counted. What a node's fetcher
/// spends its CPU on (metrics), and the engine's per-core decode rate
/// (bench/).
#[derive(Debug)]
pub struct StageCpu {
    /// Inflating gzip members and zstd frames.
    pub decompress_ns: AtomicU64,
    /// sha256 of every chunk against its TOC digest.
    pub verify_ns: AtomicU64,
    /// Opening content files, writing them, publishing presence bits.
    pub write_ns: AtomicU64,
}

pub static STAGE_CPU: StageCpu = StageCpu {
    decompress_ns: AtomicU64::new(0),
    verify_ns: AtomicU64::new(0),
    write_ns: AtomicU64::new(0),
};

impl StageCpu {
    /// Add this thread's CPU time since `started` to `stage`; returns the
    /// clock read, which starts the next stage.
    fn add(&self, stage: &AtomicU64, started: u64) -> u64 {
        let now = thread_cpu_ns();
        stage.fetch_add(now.saturating_sub(started), Ordering::Relaxed);
        now
    }

    /// `(decompress, verify, write)` in seconds.
    pub fn seconds(&self) -> (f64, f64, f64) {
        let s = |v: &AtomicU64| v.load(Ordering::Relaxed) as f64 / 1e9;
        (
            s(&self.decompress_ns),
            s(&self.verify_ns),
            s(&self.write_ns),
        )
    }
}

/// A chunk's bytes against its digest in the TOC.
fn verify(c: &Claim, data: &[u8]) -> Result<(), ChunkError> {
    let actual = Digest::of(data);
    if actual.0 == c.chunk.digest {
        return Ok(());
    }
    Err(ChunkError::Mismatch {
        offset: c.chunk.file_offset,
        actual,
        expected: Digest(c.chunk.digest),
    })
}

/// CPU time of the calling thread, in nanoseconds (0 if unavailable).
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec it is given.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0;
    }
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// Write each claim's bytes into its open file (`None`: nothing to write)
/// on this thread's ring, all queued before any is waited for; one result
/// per claim that had a file, each reaped (the write completed or failed)
/// before this returns. Where this thread gets no ring, `pwrite`.
fn write_on_thread_ring<'a>(
    claims: &[Claim],
    files: &'a [Option<stargaze_cache::ContentFile>],
    slice: impl Fn(&Claim) -> &'a [u8],
) -> Vec<Option<std::io::Result<()>>> {
    let Ok(mut batch) = stargaze_cache::rings::Batch::new() else {
        return claims
            .iter()
            .zip(files)
            .map(|(c, f)| {
                f.as_ref()
                    .map(|f| f.file().write_all_at(slice(c), c.chunk.file_offset))
            })
            .collect();
    };
    let queued: Vec<Option<usize>> = claims
        .iter()
        .zip(files)
        .map(|(c, f)| {
            f.as_ref()
                .map(|f| batch.write(f.file(), slice(c), c.chunk.file_offset))
        })
        .collect();
    let mut results: Vec<Option<std::io::Result<()>>> =
        batch.finish().into_iter().map(Some).collect();
    queued
        .into_iter()
        .map(|i| i.and_then(|i| results[i].take()))
        .collect()
}

/// The threads that decode background batches: as many as the machine has
/// cores, each at nice 19, so that a running container gets nearly all of a
/// busy CPU. (Not `SCHED_IDLE`: on a fully loaded node that would stall a
/// batch for good, and with it any on-demand read of one of its chunks.)
/// `None` if the pool cannot be built: background batches then decode on
/// the shared pool.
fn background_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("background-decode-{i}"))
            .start_handler(|_| {
                // SAFETY: a plain syscall; on Linux, PRIO_PROCESS with
                // who = 0 sets the calling thread's nice value only.
                // Failure leaves the thread at the normal priority.
                let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
                if rc != 0 {
                    tracing::debug!(error = %std::io::Error::last_os_error(), "background decode thread keeps its priority");
                }
            })
            .build()
            .map_err(|e| tracing::warn!(error = %e, "no low-priority decode threads; background batches decode on the shared pool"))
            .ok()
    })
    .as_ref()
}

/// The pieces of a streamed read turned into whole members: each member
/// is handed out as soon as its last byte is in, as a view of the piece
/// holding it (copied only when it straddles pieces).
struct Assembly {
    ranges: Vec<RangeAssembly>,
}

struct RangeAssembly {
    /// Blob offset after the bytes received so far.
    received: u64,
    end: u64,
    /// Pieces that may still hold bytes of a waiting member, with their
    /// blob offsets.
    held: VecDeque<(u64, bytes::Bytes)>,
    /// Members still waiting for bytes, `(start, end)` by start.
    waiting: VecDeque<(u64, u64)>,
    /// More bytes came back than the range holds: the rest is ignored.
    overflowed: bool,
}

impl Assembly {
    fn new(plan: &[(Range<u64>, Vec<u64>)], members: &BTreeMap<u64, Member>) -> Assembly {
        Assembly {
            ranges: plan
                .iter()
                .map(|(range, starts)| RangeAssembly {
                    received: range.start,
                    end: range.end,
                    held: VecDeque::new(),
                    waiting: starts.iter().map(|s| (*s, members[s].end)).collect(),
                    overflowed: false,
                })
                .collect(),
        }
    }

    /// Take the next piece of range `i`; returns the members it completed
    /// as `(start, bytes)`.
    fn add(&mut self, i: usize, piece: bytes::Bytes) -> Vec<(u64, bytes::Bytes)> {
        let Some(r) = self.ranges.get_mut(i) else {
            return Vec::new();
        };
        if r.overflowed || r.received + piece.len() as u64 > r.end {
            r.overflowed = true;
            return Vec::new();
        }
        if !piece.is_empty() {
            let at = r.received;
            r.received += piece.len() as u64;
            r.held.push_back((at, piece));
        }
        let mut out = Vec::new();
        while let Some(&(start, end)) = r.waiting.front() {
            if end > r.received {
                break;
            }
            r.waiting.pop_front();
            out.push((start, gather(&r.held, start..end)));
        }
        // Pieces wholly before the next waiting member are done with.
        let keep_from = r.waiting.front().map_or(u64::MAX, |m| m.0);
        while r
            .held
            .front()
            .is_some_and(|(at, p)| at + p.len() as u64 <= keep_from)
        {
            r.held.pop_front();
        }
        out
    }
}

/// Bytes `want` out of consecutive pieces that hold all of it.
fn gather(held: &VecDeque<(u64, bytes::Bytes)>, want: Range<u64>) -> bytes::Bytes {
    let overlapping = || {
        held.iter()
            .filter(move |(at, p)| *at < want.end && want.start < at + p.len() as u64)
    };
    if let Some((at, p)) =
        overlapping().find(|(at, p)| *at <= want.start && want.end <= at + p.len() as u64)
    {
        return p.slice((want.start - at) as usize..(want.end - at) as usize);
    }
    let mut joined = bytes::BytesMut::with_capacity((want.end - want.start) as usize);
    for (at, p) in overlapping() {
        let from = want.start.max(*at) - at;
        let to = want.end.min(at + p.len() as u64) - at;
        joined.extend_from_slice(&p[from as usize..to as usize]);
    }
    joined.freeze()
}

/// Take queued claims, oldest first, until their members add up to
/// `budget` compressed bytes (at least one member), and with them every
/// queued claim of the members taken (a member is never fetched twice).
/// Oldest first: a trace replay or a prefetch is served in the order it
/// asked (what a program reads first, first), not in blob order; a read's
/// ranges are still requested in blob order (`plan`). The budget bounds the
/// memory of one read however large the layer's chunks are.
fn take_budget(queue: &mut Vec<Claim>, budget: u64) -> Vec<Claim> {
    let mut bytes = 0u64;
    let mut members: std::collections::HashSet<u64> = std::collections::HashSet::new();
    let mut taken = Vec::new();
    let mut rest = Vec::new();
    let mut full = false;
    for c in queue.drain(..) {
        let member = c.chunk.compressed_offset;
        if members.contains(&member) {
            taken.push(c);
            continue;
        }
        let size = c.chunk.compressed_end - member;
        if full || (!taken.is_empty() && bytes + size > budget) {
            full = true;
            rest.push(c);
            continue;
        }
        bytes += size;
        members.insert(member);
        taken.push(c);
    }
    *queue = rest;
    taken
}

/// Fetch `calls` (each a list of file ranges), `parallel` calls at a time
/// and started in order (reads overlap decoding); returns the bytes
/// fetched.
pub async fn fetch_calls(
    layer: &Arc<Layer>,
    calls: Vec<Vec<(u64, u64, u64)>>,
    parallel: usize,
    purpose: Purpose,
) -> Result<u64, FetchError> {
    let mut set = tokio::task::JoinSet::new();
    let mut bytes = 0;
    let mut first_error = None;
    let mut collect = |r: Result<Result<u64, FetchError>, tokio::task::JoinError>| match r {
        Ok(Ok(b)) => bytes += b,
        Ok(Err(e)) => first_error = first_error.take().or(Some(e)),
        Err(_) => {}
    };
    for call in calls {
        while set.len() >= parallel.max(1) {
            if let Some(r) = set.join_next().await {
                collect(r);
            }
        }
        let l = layer.clone();
        set.spawn(async move { l.fetch_for(&call, purpose).await.map(|s| s.bytes_fetched) });
    }
    while let Some(r) = set.join_next().await {
        collect(r);
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(bytes),
    }
}

/// Fetch many ranges in batches of `batch`, `parallel` batches at a time
/// (reads overlap decoding); returns the bytes fetched.
pub async fn fetch_in_batches(
    layer: &Arc<Layer>,
    ranges: Vec<(u64, u64, u64)>,
    batch: usize,
    parallel: usize,
    purpose: Purpose,
) -> Result<u64, FetchError> {
    let calls = ranges.chunks(batch.max(1)).map(<[_]>::to_vec).collect();
    fetch_calls(layer, calls, parallel, purpose).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A claim of a chunk stored at `[offset, end)` of the blob.
    fn claim(global: u32, offset: u64, end: u64) -> Claim {
        Claim {
            ino: 1,
            chunk: ChunkInfo {
                index: 0,
                global,
                file_offset: 0,
                size: 1,
                compressed_offset: offset,
                compressed_end: end,
                inner_offset: 0,
                digest: [0; 32],
                zeros: false,
            },
            purpose: Purpose::Trace,
        }
    }

    /// Queued claims are taken oldest first (a replay's first reads first),
    /// not in blob order, and a member's claims go together.
    #[test]
    fn queued_claims_are_taken_oldest_first_with_their_members() {
        let mut queue = vec![
            claim(0, 9000, 10000),
            claim(1, 0, 1000),
            claim(2, 5000, 6000),
            // The first member's other chunk, queued later.
            claim(3, 9000, 10000),
        ];
        let first = take_budget(&mut queue, 2000);
        let globals = |v: &[Claim]| v.iter().map(|c| c.chunk.global).collect::<Vec<_>>();
        assert_eq!(globals(&first), [0, 1, 3]);
        assert_eq!(globals(&queue), [2]);
        assert_eq!(globals(&take_budget(&mut queue, 2000)), [2]);
        assert!(queue.is_empty());
    }

    fn members(spans: &[(u64, u64)]) -> BTreeMap<u64, Member> {
        spans
            .iter()
            .map(|&(start, end)| {
                (
                    start,
                    Member {
                        end,
                        claims: Vec::new(),
                    },
                )
            })
            .collect()
    }

    /// Blob bytes: each byte its offset, modulo 251.
    fn blob(range: Range<u64>) -> bytes::Bytes {
        range.map(|i| (i % 251) as u8).collect::<Vec<u8>>().into()
    }

    /// Members of two ranges (with a gap inside the first) come out whole
    /// and in order however the ranges are cut into pieces, each as soon
    /// as its last byte is in.
    #[test]
    fn streamed_pieces_become_whole_members() {
        let todo = members(&[(10, 20), (20, 45), (60, 61), (100, 180)]);
        let plan = vec![(10..61, vec![10, 20, 60]), (100..180, vec![100])];
        for piece in [1, 3, 7, 10, 25, 51, 80, 1000] {
            let mut asm = Assembly::new(&plan, &todo);
            let mut got = Vec::new();
            for (i, (range, _)) in plan.iter().enumerate() {
                let mut at = range.start;
                while at < range.end {
                    let to = (at + piece).min(range.end);
                    for (start, bytes) in asm.add(i, blob(at..to)) {
                        // Complete when handed out, never later than needed.
                        assert!(todo[&start].end <= to, "piece {piece}: {start} early");
                        assert!(todo[&start].end > at, "piece {piece}: {start} late");
                        got.push((start, bytes));
                    }
                    at = to;
                }
            }
            let want: Vec<(u64, bytes::Bytes)> =
                todo.iter().map(|(s, m)| (*s, blob(*s..m.end))).collect();
            assert_eq!(got, want, "piece size {piece}");
            // Nothing is held once every member is out.
            assert!(asm.ranges.iter().all(|r| r.held.is_empty()));
        }
    }

    /// A member inside one piece is a view of it, not a copy.
    #[test]
    fn a_member_inside_one_piece_is_not_copied() {
        let todo = members(&[(0, 10), (10, 30)]);
        let plan = vec![(0..30, vec![0, 10])];
        let mut asm = Assembly::new(&plan, &todo);
        let piece = blob(0..30);
        let out = asm.add(0, piece.clone());
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].1.as_ptr(), piece[10..].as_ptr());
    }

    /// Bytes past a range's end (a registry answering more than asked)
    /// and pieces for a range never asked for complete nothing.
    #[test]
    fn too_many_bytes_complete_nothing() {
        let todo = members(&[(0, 10), (10, 20)]);
        let plan = vec![(0..20, vec![0, 10])];
        let mut asm = Assembly::new(&plan, &todo);
        assert_eq!(asm.add(0, blob(0..12)).len(), 1);
        assert!(asm.add(0, blob(12..25)).is_empty());
        assert!(
            asm.add(0, blob(12..20)).is_empty(),
            "the range stays refused"
        );
        assert!(asm.add(3, blob(0..20)).is_empty());
    }
}
