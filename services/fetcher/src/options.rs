//! Tunables of resolution and fetching.

/// Tunables of resolution and fetching.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Bytes first read from the end of a blob: the footer and a small
    /// TOC in one request, else a second request reads exactly the rest of
    /// the TOC. Small: a bigger window saves the second round trip for
    /// TOCs up to its size but reads layer data nobody asked for in front
    /// of every smaller TOC, and layers resolve in parallel, so the largest
    /// TOC's two round trips set the time anyway (measured in
    /// `bench/results/startup.md`).
    pub tail_window: u64,
    /// Members closer than this are fetched in one range.
    pub merge_gap: u64,
    /// Upper bound on one merged range.
    pub max_merged_range: u64,
    /// Concurrent range reads per layer; requests queued meanwhile are
    /// batched into the next read.
    pub max_inflight_reads: usize,
    /// Reads one fetch call keeps in flight when it claims more than one
    /// read's worth (`max_read_bytes`) of members. Two keep the link busy
    /// while the members of the other read decode; more only add buffers
    /// (peak RSS, not speed: `bench/results/fetch-link.md`).
    pub max_reads_per_fetch: usize,
    /// Compressed bytes one read may carry (bounds memory per read; with
    /// `max_inflight_reads` it bounds the fetcher's buffers).
    pub max_read_bytes: u64,
    /// Files up to this size are fetched whole on their first read.
    pub whole_file_below: u64,
    /// A read that misses also fetches, in the same request, the chunks
    /// that follow it in the blob up to this many compressed bytes (what
    /// the same package installed next to it: the modules an interpreter
    /// loads next, the headers a compiler opens next); 0 = off.
    pub read_amplify: u64,
    /// The largest window read ahead in blob order during a sweep
    /// (`sweep.rs`); 0 = no sweep read-ahead.
    pub sweep_max_window: u64,
    /// Refuse TOCs larger than this (uncompressed).
    pub max_toc_size: u64,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            tail_window: 64 << 10,
            merge_gap: 256 << 10,
            max_merged_range: 16 << 20,
            max_inflight_reads: 4,
            max_reads_per_fetch: 2,
            max_read_bytes: 8 << 20,
            whole_file_below: 256 << 10,
            read_amplify: 128 << 10,
            sweep_max_window: crate::sweep::MAX_WINDOW,
            max_toc_size: stargaze_format::reader::DEFAULT_MAX_TOC_SIZE,
        }
    }
}
