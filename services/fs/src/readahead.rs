//! What a read finds in the cache, and what a small file's miss fetches
//! alongside it: the next small files of its directory, and once a second
//! file of the same directory missed, every small file of it.
//!
//! Programs read small files a directory at a time (a package's modules,
//! a library's headers, a locale's categories), one after another, each
//! only once the one before it was read: lazily, a round trip each. The
//! first miss in a directory fetches the few small files after it (name
//! order, the order image builders write them); a second miss in the same
//! directory says the program works through it, and fetches all of its
//! small files in one go (bounded), a few hundred KiB of compressed bytes
//! instead of a round trip per file. Nothing here knows a program: only
//! where its misses fall.

use std::collections::HashMap;

use parking_lot::Mutex;

use crate::layers::Attached;

/// A miss on a file up to this size fetches its small neighbours too.
pub(crate) const SMALL_FILE: u64 = 128 << 10;

/// Files fetched as neighbours are at most this large.
const NEIGHBOUR_MAX_FILE: u64 = 64 << 10;

/// How far a miss's neighbours go in its directory: entries looked at,
/// files and bytes (uncompressed) taken, and whether the files before the
/// missed one count too.
struct Reach {
    scan: usize,
    files: usize,
    bytes: u64,
    wrap: bool,
}

/// A first miss: the few small files after it.
const NEXT_FEW: Reach = Reach {
    scan: 32,
    files: 8,
    bytes: 256 << 10,
    wrap: false,
};
/// A directory's second miss: every small file of it, bounded so that a
/// directory of thousands of files costs a bounded read.
const WHOLE_DIRECTORY: Reach = Reach {
    scan: usize::MAX,
    files: 512,
    bytes: 1 << 20,
    wrap: true,
};
/// Directories whose misses are counted per layer; the counts are
/// forgotten beyond this (a long-lived container's misses are rare).
const COUNTED_DIRECTORIES: usize = 4096;

/// Small-file misses per directory of one attached layer: how many files
/// missed, and the last one (a file missed twice, by concurrent reads of
/// its pages, counts once).
#[derive(Default)]
pub(crate) struct DirectoryMisses(Mutex<HashMap<u64, (u32, u64)>>);

impl DirectoryMisses {
    /// Count a miss on `file` in `dir`: how many files of `dir` missed,
    /// this one included.
    fn count(&self, dir: u64, file: u64) -> u32 {
        let mut m = self.0.lock();
        if m.len() >= COUNTED_DIRECTORIES && !m.contains_key(&dir) {
            m.clear();
        }
        let (n, last) = m.entry(dir).or_insert((0, u64::MAX));
        if *last != file {
            *n = n.saturating_add(1);
            *last = file;
        }
        *n
    }
}

/// What a miss on the small file `local` fetches alongside it, not yet
/// present: the directory's small files once this is its second miss,
/// else the next few after it.
pub(crate) fn neighbours(a: &Attached, local: u64) -> Vec<(u64, u64)> {
    let Some(node) = a.index.inode(local) else {
        return Vec::new();
    };
    let dir = node.parent();
    let reach = if a.directory_misses.count(dir, local) == 2 {
        WHOLE_DIRECTORY
    } else {
        NEXT_FEW
    };
    small_files_after(a, local, dir, &reach)
}

/// Small regular files of `dir`, not yet present, in name order (the
/// order image builders write them) from the one after `local` on, and
/// with `reach.wrap` on round to the ones before it.
fn small_files_after(a: &Attached, local: u64, dir: u64, reach: &Reach) -> Vec<(u64, u64)> {
    let after = a
        .index
        .readdir(dir, 0)
        .skip_while(|e| e.ino != local)
        .skip(1);
    let before = a
        .index
        .readdir(dir, 0)
        .take_while(|e| e.ino != local)
        .filter(|_| reach.wrap);
    let mut out = Vec::new();
    let mut bytes = 0;
    for e in after.chain(before).take(reach.scan) {
        if out.len() >= reach.files {
            break;
        }
        let Some(n) = a.index.inode(e.ino) else {
            continue;
        };
        let size = n.size();
        if !n.is_reg() || size == 0 || size > NEIGHBOUR_MAX_FILE || bytes + size > reach.bytes {
            continue;
        }
        if !present(a, e.ino, 0, size) {
            out.push((e.ino, size));
            bytes += size;
        }
    }
    out
}

/// Are the chunks of `[offset, end)` all present?
pub(crate) fn present(a: &Attached, local: u64, offset: u64, end: u64) -> bool {
    let Some(n) = a.index.inode(local) else {
        return false;
    };
    if end > offset && n.chunk_at(offset).is_none() {
        return false;
    }
    n.chunks_in(offset, end)
        .all(|c| a.presence.is_present(c.global))
}
