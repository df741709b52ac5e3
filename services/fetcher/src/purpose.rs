//! Why chunks are fetched. Every fetch names its purpose; the engine counts
//! the compressed bytes it reads per purpose
//! (`stargaze_fetcher_fetched_bytes_total{purpose}`), so an operator — or a
//! benchmark — can see which mechanism a node's registry traffic pays for,
//! and background fetches decode on low-priority threads.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Purpose {
    /// A process is waiting for these bytes.
    Read,
    /// The rest of a small file one of whose bytes was read
    /// (`[fetcher] whole_file_below`).
    WholeFile,
    /// Small files next to one being read (fs asks for them).
    Neighbours,
    /// Read-ahead in blob order (`sweep.rs`).
    Sweep,
    /// What a program being executed loads, and mapped programs fetched
    /// whole (`loads/`).
    Loads,
    /// The image config's program at warm-up (`warm.rs`).
    Entrypoint,
    /// A layer's prefetch landmark, or an explicit Prefetch call.
    Landmark,
    /// A learned access trace being replayed (`traces/`).
    Trace,
    /// The rest of a layer while nobody waits (`schedule.rs`).
    Background,
}

impl Purpose {
    pub const ALL: [Purpose; 9] = [
        Purpose::Read,
        Purpose::WholeFile,
        Purpose::Neighbours,
        Purpose::Sweep,
        Purpose::Loads,
        Purpose::Entrypoint,
        Purpose::Landmark,
        Purpose::Trace,
        Purpose::Background,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Purpose::Read => "read",
            Purpose::WholeFile => "whole_file",
            Purpose::Neighbours => "neighbours",
            Purpose::Sweep => "sweep",
            Purpose::Loads => "loads",
            Purpose::Entrypoint => "entrypoint",
            Purpose::Landmark => "landmark",
            Purpose::Trace => "trace",
            Purpose::Background => "background",
        }
    }

    /// A process waits for these bytes: fetched before any prefetch.
    pub fn is_urgent(self) -> bool {
        matches!(self, Purpose::Read | Purpose::WholeFile)
    }

    /// Decoded on the low-priority threads.
    pub fn is_background(self) -> bool {
        self == Purpose::Background
    }
}

/// Compressed bytes read per purpose, plus the gaps merged into ranges
/// between wanted members (`[fetcher] merge_gap`).
#[derive(Debug, Default)]
pub struct PurposeBytes {
    by_purpose: [AtomicU64; Purpose::ALL.len()],
    gaps: AtomicU64,
}

/// The process's totals, for the metrics: they outlive evicted layers,
/// whose own counters go with them.
pub static FETCHED: PurposeBytes = PurposeBytes::new();

impl PurposeBytes {
    pub const fn new() -> PurposeBytes {
        PurposeBytes {
            by_purpose: [const { AtomicU64::new(0) }; Purpose::ALL.len()],
            gaps: AtomicU64::new(0),
        }
    }

    pub fn add(&self, purpose: Purpose, bytes: u64) {
        self.by_purpose[purpose as usize].fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn add_gap(&self, bytes: u64) {
        self.gaps.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn get(&self, purpose: Purpose) -> u64 {
        self.by_purpose[purpose as usize].load(Ordering::Relaxed)
    }

    pub fn gaps(&self) -> u64 {
        self.gaps.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_purpose_has_its_own_slot_and_label() {
        let b = PurposeBytes::default();
        for (i, p) in Purpose::ALL.iter().enumerate() {
            assert_eq!(*p as usize, i);
            b.add(*p, i as u64 + 1);
        }
        for (i, p) in Purpose::ALL.iter().enumerate() {
            assert_eq!(b.get(*p), i as u64 + 1);
        }
        let mut labels: Vec<_> = Purpose::ALL.iter().map(|p| p.label()).collect();
        labels.dedup();
        assert_eq!(labels.len(), Purpose::ALL.len());
    }
}
