//! Read-ahead in blob order: a workload that reads the files of a layer
//! one after another (`find | xargs cat`, a build scanning a source tree,
//! a package manager verifying files) misses on each small file in turn,
//! one round trip each, while the link idles. The kernel's read-ahead
//! cannot help across files; this does the same thing in the order the
//! layer stores its files.
//!
//! Each on-demand read of a layer is placed in the layer's blob (its
//! chunks' compressed offsets). When [`SEQUENTIAL_AFTER`] reads in a row
//! each start at most [`MAX_GAP`] after where the previous one ended, and
//! each read that moves on to another file read the file before it to its
//! end (a scan that only looks at files' heads, `file /usr/bin/*`, is no
//! sweep: it would fetch every file whole for a few bytes of each), the
//! layer is being swept: the next `window` compressed bytes in blob order
//! are fetched ahead (not waited for), and the window doubles with every
//! further sequential read up to the layer's `sweep_max_window`
//! ([`MAX_WINDOW`] by default; 0 turns the sweep off), so a sweep soon streams
//! at link rate in large requests. A read anywhere else resets it: random
//! access (a program's imports, a database) fetches nothing extra.
//!
//! What is fetched ahead stays inside the directory being swept: the
//! deepest directory holding every file the sweep has read so far. Layers
//! store a directory's files together, so a sweep of `/usr/share/doc`
//! reads ahead to that directory's end in the blob and not a window's
//! worth past it into files nobody asked for; when the reads go on into
//! the next directory, the swept directory widens to their common parent
//! and the window goes on from there (one miss per widening).

use std::sync::OnceLock;

use parking_lot::Mutex;
use stargaze_index::{ChunkInfo, LayerIndex, ROOT_INO};

/// Sequential reads in a row before anything is fetched ahead.
pub const SEQUENTIAL_AFTER: u32 = 3;
/// Compressed bytes between the end of a read and the start of the next
/// that still count as "next" (neighbours prefetched meanwhile, entries
/// without data).
pub const MAX_GAP: u64 = 512 << 10;
/// The first window fetched ahead, and the largest.
pub const FIRST_WINDOW: u64 = 1 << 20;
pub const MAX_WINDOW: u64 = 32 << 20;

#[derive(Default)]
struct State {
    /// Where the last on-demand read started and ended in the blob.
    start: u64,
    end: u64,
    /// Sequential reads in a row.
    run: u32,
    window: u64,
    /// Fetched ahead up to here already.
    ahead: u64,
    /// The last read's file, and whether it read that file to its end.
    file: u64,
    file_done: bool,
    /// The deepest directory holding every file read in this run.
    dir: u64,
}

/// A layer's sweep detector and its chunks in blob order.
#[derive(Default)]
pub struct Sweep {
    state: Mutex<State>,
    /// (compressed offset, inode, chunk index) of every chunk, in blob
    /// order; built on the first sweep.
    order: OnceLock<Vec<(u64, u64, u32)>>,
}

impl Sweep {
    /// An on-demand read of `ranges` (inode, offset, length) of the layer:
    /// the file ranges to fetch ahead, when it continues a sweep.
    pub fn read(
        &self,
        index: &LayerIndex,
        ranges: &[(u64, u64, u64)],
        max_window: u64,
    ) -> Vec<(u64, u64, u64)> {
        if max_window == 0 {
            return Vec::new();
        }
        let Some((start, end)) = blob_span(index, ranges) else {
            return Vec::new();
        };
        let Some(&(file, offset, len)) = ranges.last() else {
            return Vec::new();
        };
        let file_done = index
            .inode(file)
            .is_some_and(|n| offset.saturating_add(len) >= n.size());
        let parent = index.inode(file).map_or(ROOT_INO, |n| n.parent());
        {
            let mut s = self.state.lock();
            // Just after where the last read ended, or inside (or just
            // past) what was fetched ahead since.
            // Forward only: a read behind the last one is no sweep.
            let reach = s.end.max(s.ahead);
            let moved_on = file != s.file;
            let sequential = s.end > 0
                && start > s.start
                && start <= reach + MAX_GAP
                && (!moved_on || s.file_done);
            if sequential {
                s.run += 1;
                s.start = start;
                s.end = s.end.max(end);
                s.file = file;
                s.file_done = file_done;
                s.dir = common_dir(index, s.dir, parent);
            } else {
                *s = State {
                    start,
                    end,
                    file,
                    file_done,
                    dir: parent,
                    ..State::default()
                };
            }
            if s.run < SEQUENTIAL_AFTER {
                return Vec::new();
            }
            s.window = (s.window * 2).clamp(FIRST_WINDOW.min(max_window), max_window);
            let from = s.ahead.max(end);
            let to = end + s.window;
            if from >= to {
                return Vec::new();
            }
            // Up to the window's end or the first chunk of a file outside
            // the swept directory, whichever comes first; a later read
            // that widens the directory goes on from there.
            let order = self.order.get_or_init(|| blob_order(index));
            let first = order.partition_point(|&(off, ..)| off < from);
            let mut ahead = Vec::new();
            s.ahead = to;
            for &(off, ino, i) in &order[first..] {
                if off >= to {
                    break;
                }
                if !is_within(index, ino, s.dir) {
                    s.ahead = off;
                    break;
                }
                if let Some(c) = index.inode(ino).and_then(|n| n.chunk(i as usize)) {
                    ahead.push((ino, c.file_offset, c.size));
                }
            }
            ahead
        }
    }
}

/// Parents walked at most (a TOC's deepest path is far shallower; bounds
/// the walk should parent links form a cycle).
const MAX_DEPTH: usize = 4096;

/// Whether `ino` lies somewhere below directory `dir`.
fn is_within(index: &LayerIndex, ino: u64, dir: u64) -> bool {
    let mut cur = ino;
    for _ in 0..MAX_DEPTH {
        let Some(parent) = index.inode(cur).map(|n| n.parent()) else {
            return false;
        };
        if parent == dir {
            return true;
        }
        if parent == cur || cur == ROOT_INO {
            return false;
        }
        cur = parent;
    }
    false
}

/// The deepest directory holding both directory `a` and directory `b`.
fn common_dir(index: &LayerIndex, a: u64, b: u64) -> u64 {
    let mut cur = a;
    for _ in 0..MAX_DEPTH {
        if cur == b || cur == ROOT_INO || is_within(index, b, cur) {
            return cur;
        }
        match index.inode(cur).map(|n| n.parent()) {
            Some(p) if p != cur => cur = p,
            _ => return ROOT_INO,
        }
    }
    ROOT_INO
}

impl Sweep {
    /// Chunks lying wholly within `[end, end + window)` of the blob, in
    /// blob order: what a read ending at `end` amplifies to
    /// (`read_amplify`).
    pub fn following(&self, index: &LayerIndex, end: u64, window: u64) -> Vec<(u64, ChunkInfo)> {
        let order = self.order.get_or_init(|| blob_order(index));
        let first = order.partition_point(|&(off, ..)| off < end);
        let limit = end.saturating_add(window);
        order[first..]
            .iter()
            .take_while(|&&(off, ..)| off < limit)
            .filter_map(|&(_, ino, i)| {
                let c = index.inode(ino)?.chunk(i as usize)?;
                (c.compressed_end <= limit).then_some((ino, c))
            })
            .collect()
    }
}

/// The blob extent (first compressed offset, last compressed end) of the
/// chunks a read covers.
fn blob_span(index: &LayerIndex, ranges: &[(u64, u64, u64)]) -> Option<(u64, u64)> {
    let mut span: Option<(u64, u64)> = None;
    for &(ino, offset, len) in ranges {
        let node = index.inode(ino)?;
        for c in node.chunks_in(offset, offset.saturating_add(len.max(1))) {
            span = Some(match span {
                None => (c.compressed_offset, c.compressed_end),
                Some((s, e)) => (s.min(c.compressed_offset), e.max(c.compressed_end)),
            });
        }
    }
    span
}

/// Every chunk of the layer, in blob order.
fn blob_order(index: &LayerIndex) -> Vec<(u64, u64, u32)> {
    let mut out = Vec::new();
    for ino in 1..=index.inode_count() {
        let Some(n) = index.inode(ino) else {
            continue;
        };
        if !n.is_reg() {
            continue;
        }
        for c in n.chunks() {
            out.push((c.compressed_offset, ino, c.index as u32));
        }
    }
    out.sort_unstable();
    out
}
