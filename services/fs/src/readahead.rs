//! What a read finds in the cache, and what a small file's miss fetches
//! alongside it: the next small files of its directory; once a second
//! file of the same directory missed, every small file of it; once misses
//! came through three subdirectories of one directory, every small file of
//! that directory's tree, when the tree is small.
//!
//! Programs read small files a directory at a time (a package's modules,
//! a library's headers, a locale's categories), one after another, each
//! only once the one before it was read: lazily, a round trip each. The
//! first miss in a directory fetches the few small files after it (name
//! order, the order image builders write them); a second miss in the same
//! directory says the program works through it, and fetches all of its
//! small files in one go (bounded), a few hundred KiB of compressed bytes
//! instead of a round trip per file. An interpreter's library is a tree
//! (`perl/5.36.0/{Data,Digest,Encode,...}`, `include/{bits,sys,...}`)
//! whose modules each sit in their own subdirectory: misses in three
//! subdirectories of one directory fetch the whole tree's small files, if
//! they add up to little ([`SUBTREE_MAX_BYTES`]); a tree larger than that
//! (`/usr/lib`, a whole language runtime) is never fetched this way.
//! Nothing here knows a program: only where its misses fall.

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
/// A tree's small files are fetched once misses came through this many of
/// its top directory's subdirectories...
const SUBTREE_AFTER: usize = 3;
/// ...looking this many levels up from a miss's directory...
const SUBTREE_LEVELS: usize = 3;
/// ...when its small files add up to at most this (uncompressed; a few
/// MiB of compressed bytes, a fraction of a second of a 100 Mbit/s link)
/// and its walk visits at most this many entries.
const SUBTREE_MAX_BYTES: u64 = 8 << 20;
const SUBTREE_MAX_ENTRIES: usize = 20_000;

/// Where one attached layer's small files missed.
#[derive(Default)]
pub(crate) struct DirectoryMisses(Mutex<Misses>);

#[derive(Default)]
struct Misses {
    /// Per directory: how many of its files missed, and the last one (a
    /// file missed twice, by concurrent reads of its pages, counts once).
    files: HashMap<u64, (u32, u64)>,
    /// Per ancestor of a miss: the subdirectories misses came through, or
    /// `None` once its tree was fetched or found too large.
    trees: HashMap<u64, Option<Vec<u64>>>,
}

impl DirectoryMisses {
    /// Count a miss on `file` in `dir`: how many files of `dir` missed,
    /// this one included.
    fn count(&self, dir: u64, file: u64) -> u32 {
        let mut m = self.0.lock();
        if m.files.len() >= COUNTED_DIRECTORIES && !m.files.contains_key(&dir) {
            m.files.clear();
        }
        let (n, last) = m.files.entry(dir).or_insert((0, u64::MAX));
        if *last != file {
            *n = n.saturating_add(1);
            *last = file;
        }
        *n
    }

    /// Note a miss in `dir` in each ancestor up to [`SUBTREE_LEVELS`]
    /// above it; the deepest ancestor that now had misses through
    /// [`SUBTREE_AFTER`] of its subdirectories, if any (settled: it is not
    /// returned again).
    fn tree_to_fetch(&self, a: &Attached, dir: u64) -> Option<u64> {
        let mut m = self.0.lock();
        if m.trees.len() >= COUNTED_DIRECTORIES {
            m.trees.clear();
        }
        let (mut child, mut found) = (dir, None);
        for _ in 0..SUBTREE_LEVELS {
            let parent = a.index.inode(child)?.parent();
            if parent == child || child == stargaze_index::ROOT_INO {
                break;
            }
            let entry = m.trees.entry(parent).or_insert_with(|| Some(Vec::new()));
            // Fetched, or too large: so is everything above it.
            let Some(children) = entry else { break };
            if !children.contains(&child) {
                children.push(child);
            }
            if found.is_none() && children.len() >= SUBTREE_AFTER {
                *entry = None;
                found = Some(parent);
            }
            child = parent;
        }
        found
    }
}

/// What a miss on the small file `local` fetches alongside it, not yet
/// present: a small tree's small files once misses came through enough of
/// its subdirectories, else the directory's small files once this is its
/// second miss, else the next few after it.
pub(crate) fn neighbours(a: &Attached, local: u64) -> Vec<(u64, u64)> {
    let Some(node) = a.index.inode(local) else {
        return Vec::new();
    };
    let dir = node.parent();
    let nth = a.directory_misses.count(dir, local);
    if let Some(top) = a.directory_misses.tree_to_fetch(a, dir)
        && let Some(files) = whole_tree(a, local, top)
    {
        return files;
    }
    if nth == 2 {
        whole_directory(a, local, dir)
    } else {
        small_siblings(a, local)
    }
}

/// Every small regular file under `top`, not yet present (depth first,
/// name order: the order image builders write them), or `None` when its
/// small files add up to more than [`SUBTREE_MAX_BYTES`] or the walk to
/// more than [`SUBTREE_MAX_ENTRIES`] entries: a tree that large is a
/// runtime or a system directory, not one package's library.
fn whole_tree(a: &Attached, local: u64, top: u64) -> Option<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let (mut total, mut visited) = (0u64, 0usize);
    let mut dirs = vec![top];
    while let Some(dir) = dirs.pop() {
        let mut subdirs = Vec::new();
        for e in a.index.readdir(dir, 0) {
            visited += 1;
            if visited > SUBTREE_MAX_ENTRIES {
                return None;
            }
            let Some(n) = a.index.inode(e.ino) else {
                continue;
            };
            if n.is_dir() {
                subdirs.push(e.ino);
                continue;
            }
            let size = n.size();
            if !n.is_reg() || size == 0 || size > NEIGHBOUR_MAX_FILE {
                continue;
            }
            total += size;
            if total > SUBTREE_MAX_BYTES {
                return None;
            }
            if e.ino != local && !present(a, e.ino, 0, size) {
                out.push((e.ino, size));
            }
        }
        // Depth first in name order: the first subdirectory next.
        dirs.extend(subdirs.into_iter().rev());
    }
    Some(out)
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
