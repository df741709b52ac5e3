//! What a read finds in the cache, and what a small file's miss fetches
//! alongside it: the next small files of its directory.

use crate::layers::Attached;

/// A miss on a file up to this size fetches its small neighbours too.
pub(crate) const SMALL_FILE: u64 = 128 << 10;

/// Small regular files that follow `local` in its directory (name order,
/// which is also the order image builders write them), not yet present.
pub(crate) fn small_siblings(a: &Attached, local: u64) -> Vec<(u64, u64)> {
    const MAX_FILES: usize = 8;
    const MAX_FILE: u64 = 64 << 10;
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
