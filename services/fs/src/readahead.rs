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
/// A directory's whole fetch: at most this many bytes (uncompressed) and
/// files, so that a directory of thousands of files costs a bounded read.
const DIRECTORY_MAX_BYTES: u64 = 1 << 20;
const DIRECTORY_MAX_FILES: usize = 512;
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
    if a.directory_misses.count(node.parent(), local) == 2 {
        whole_directory(a, local, node.parent())
    } else {
        small_siblings(a, local)
    }
}

/// Every small regular file of `dir` but `local`, not yet present, in
/// name order starting after `local` and wrapping around, within the
/// directory budget.
fn whole_directory(a: &Attached, local: u64, dir: u64) -> Vec<(u64, u64)> {
    let entries: Vec<u64> = a.index.readdir(dir, 0).map(|e| e.ino).collect();
    let at = entries
        .iter()
        .position(|&e| e == local)
        .map_or(0, |i| i + 1);
    let mut out = Vec::new();
    let mut bytes = 0;
    for &ino in entries[at..].iter().chain(&entries[..at]) {
        if out.len() >= DIRECTORY_MAX_FILES {
            break;
        }
        if ino == local {
            continue;
        }
        let Some(n) = a.index.inode(ino) else {
            continue;
        };
        let size = n.size();
        if !n.is_reg()
            || size == 0
            || size > NEIGHBOUR_MAX_FILE
            || bytes + size > DIRECTORY_MAX_BYTES
        {
            continue;
        }
        if !present(a, ino, 0, size) {
            out.push((ino, size));
            bytes += size;
        }
    }
    out
}

/// Small regular files that follow `local` in its directory (name order,
/// which is also the order image builders write them), not yet present.
fn small_siblings(a: &Attached, local: u64) -> Vec<(u64, u64)> {
    const MAX_FILES: usize = 8;
    const MAX_FILE: u64 = NEIGHBOUR_MAX_FILE;
    const MAX_BYTES: u64 = 256 << 10;
    const SCAN: usize = 32;
    let Some(node) = a.index.inode(local) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut bytes = 0;
    let mut after = false;
    let mut scanned = 0;
    for e in a.index.readdir(node.parent(), 0) {
        if !after {
            after = e.ino == local;
            continue;
        }
        scanned += 1;
        if scanned > SCAN || out.len() >= MAX_FILES {
            break;
        }
        let Some(n) = a.index.inode(e.ino) else {
            continue;
        };
        let size = n.size();
        if !n.is_reg() || size == 0 || size > MAX_FILE || bytes + size > MAX_BYTES {
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
