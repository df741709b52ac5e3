//! The reads fs reports to the fetcher for its learned access traces
//! (`NoteReads`). The fetcher only sees misses; a trace made of misses
//! alone lacks every file a prefetch (read amplification, small siblings,
//! the dependency prefetch, a sweep) had already brought in when it was
//! read, and the next pull that replays it meets those files as misses
//! again, one round trip each. fs sees every read, so it reports them.
//!
//! Each attached layer has one bit per chunk ([`Reported`]); a read (or
//! an open of a complete file for passthrough, after which the kernel
//! reads without us) is queued ([`ReadLog::read`]) only when one of its
//! chunks has no bit yet, next to the previous entry when it continues it,
//! so a hit costs one atomic load per chunk. A task ([`flush_every`])
//! sends the queue to the fetcher every [`FLUSH_EVERY`], in read order.
//! The fetcher answers with its recording generation, which changes when
//! an image's recording window opens (fs asks for it every second when it
//! has nothing to send): fs then clears every bit, so a new recording sees
//! each chunk's first read again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use crate::FsShared;
use crate::layers::{Attached, LayerTable};

/// How often queued reads go to the fetcher.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Reads queued at most between two flushes (more are dropped: a trace is
/// a prefetch hint, and a fetcher that does not answer must not make fs
/// grow).
const MAX_QUEUED: usize = 1 << 16;
/// No generation seen yet.
const UNKNOWN: u64 = u64::MAX;

/// One bit per chunk of a layer: its first read was reported.
pub struct Reported {
    bits: Box<[AtomicU64]>,
}

impl Reported {
    pub fn new(chunks: usize) -> Reported {
        Reported {
            bits: (0..chunks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    /// Set the bits of `chunks`; true when one of them was clear.
    fn mark(&self, chunks: impl Iterator<Item = u32>) -> bool {
        let mut any = false;
        for c in chunks {
            let (word, bit) = ((c / 64) as usize, 1u64 << (c % 64));
            let Some(w) = self.bits.get(word) else {
                continue;
            };
            if w.load(Ordering::Relaxed) & bit == 0 {
                any |= w.fetch_or(bit, Ordering::Relaxed) & bit == 0;
            }
        }
        any
    }

    fn clear(&self) {
        for w in self.bits.iter() {
            w.store(0, Ordering::Relaxed);
        }
    }
}

/// A read to report: layer, inode (the index's numbering), range. By
/// slot, not the attached layer itself: a queued read must not keep a
/// detached layer (and its pin against eviction) alive; the digest is
/// looked up when the queue is sent (a layer detached by then is skipped).
struct Noted {
    slot: u64,
    ino: u64,
    offset: u64,
    length: u64,
}

/// Reads of one layer `(inode, offset, length)`, in order; no layer: a
/// request for the generation alone.
type Batch = (Option<stargaze_format::Digest>, Vec<(u64, u64, u64)>);

/// Reads waiting for the next flush.
pub struct ReadLog {
    queue: Mutex<Vec<Noted>>,
    generation: AtomicU64,
}

impl Default for ReadLog {
    fn default() -> Self {
        ReadLog {
            queue: Mutex::new(Vec::new()),
            generation: AtomicU64::new(UNKNOWN),
        }
    }
}

impl ReadLog {
    /// `[offset, end)` of file `ino` of `a` was read (or will be read by
    /// the kernel through passthrough).
    pub fn read(&self, a: &Attached, ino: u64, offset: u64, end: u64) {
        let Some(node) = a.index.inode(ino) else {
            return;
        };
        if end <= offset
            || !a
                .reported
                .mark(node.chunks_in(offset, end).map(|c| c.global))
        {
            return;
        }
        let mut q = self.queue.lock();
        if let Some(last) = q.last_mut()
            && last.ino == ino
            && last.slot == a.slot
            && last.offset + last.length == offset
        {
            last.length = end - last.offset;
            return;
        }
        if q.len() < MAX_QUEUED {
            q.push(Noted {
                slot: a.slot,
                ino,
                offset,
                length: end - offset,
            });
        }
    }

    /// The queue in read order, cut where the layer changes; reads of
    /// layers no longer attached are dropped.
    fn take(&self, layers: &LayerTable) -> Vec<Batch> {
        let queued = std::mem::take(&mut *self.queue.lock());
        let mut out: Vec<(u64, Batch)> = Vec::new();
        for n in queued {
            let range = (n.ino, n.offset, n.length);
            match out.last_mut() {
                Some((slot, (_, ranges))) if *slot == n.slot => ranges.push(range),
                _ => {
                    let Some(a) = layers.by_slot(n.slot) else {
                        continue;
                    };
                    out.push((n.slot, (Some(a.digest), vec![range])));
                }
            }
        }
        out.into_iter().map(|(_, b)| b).collect()
    }

    /// The fetcher's recording generation is `g`: when it changed, every
    /// chunk's next read is reported again.
    fn generation(&self, g: u64, shared: &FsShared) {
        let before = self.generation.swap(g, Ordering::Relaxed);
        if before != g && before != UNKNOWN {
            for a in shared.layers.list() {
                a.reported.clear();
            }
        }
    }
}

/// Send the queued reads to the fetcher every [`FLUSH_EVERY`], for as long
/// as `shared` lives.
pub async fn flush_every(shared: std::sync::Weak<FsShared>) {
    let mut since_asked = Duration::ZERO;
    loop {
        tokio::time::sleep(FLUSH_EVERY).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut batches = shared.reads.take(&shared.layers);
        since_asked += FLUSH_EVERY;
        // Nothing read: still ask for the generation now and then, or
        // chunks reported before a recording opened would never be
        // reported to it.
        if batches.is_empty() && since_asked >= ASK_EVERY {
            batches.push((None, Vec::new()));
        }
        for (layer, ranges) in batches {
            since_asked = Duration::ZERO;
            if let Some(g) = shared.source.note_reads(layer.as_ref(), ranges).await {
                shared.reads.generation(g, &shared);
            }
        }
    }
}

/// How often fs asks for the generation when it has nothing to report.
const ASK_EVERY: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::Reported;

    #[test]
    fn a_chunk_is_reported_once_until_cleared() {
        let r = Reported::new(130);
        assert!(r.mark([0u32, 129].into_iter()));
        assert!(!r.mark([0u32, 129].into_iter()));
        assert!(r.mark([1u32, 129].into_iter()));
        // Beyond the layer's chunks: ignored, never a panic.
        assert!(!r.mark([500u32].into_iter()));
        r.clear();
        assert!(r.mark([129u32].into_iter()));
    }
}
