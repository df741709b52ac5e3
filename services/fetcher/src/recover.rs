//! Re-verification after an unclean stop.
//!
//! Presence bits and content bytes reach the disk in no particular order, so
//! after a crash a bit may describe bytes that never landed. Before serving
//! anything, every present chunk is read back and hashed; chunks that fail
//! are cleared (and refetched on demand), and files marked complete that no
//! longer match their digest lose the mark.

use stargaze_cache::{Cache, PresenceMap, verify_range};
use stargaze_format::Digest;
use stargaze_index::LayerIndex;

/// Counts of a recovery pass.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    pub layers: u32,
    pub chunks_checked: u64,
    pub chunks_cleared: u64,
}

/// Re-verify every layer in the cache.
pub fn reverify(cache: &Cache) -> Recovery {
    let mut r = Recovery::default();
    let Ok(dirs) = std::fs::read_dir(cache.root().join("layers")) else {
        return r;
    };
    for d in dirs.flatten() {
        let digest = format!("sha256:{}", d.file_name().to_string_lossy());
        let (Ok(index), true) = (
            LayerIndex::open(&cache.index_path(&digest)),
            cache.presence_path(&digest).exists(),
        ) else {
            continue;
        };
        let Ok(presence) =
            PresenceMap::open_rw(&cache.presence_path(&digest), index.chunk_count(), &digest)
        else {
            continue;
        };
        r.layers += 1;
        for ino in 1..=index.inode_count() {
            let Some(n) = index.inode(ino) else { continue };
            if !n.is_reg() || n.chunk_count() == 0 {
                continue;
            }
            let key = index.content_key(ino);
            let content = cache.content_reader(&key).ok();
            for c in n.chunks() {
                if !presence.is_present(c.global) {
                    continue;
                }
                r.chunks_checked += 1;
                let ok = content
                    .as_ref()
                    .is_some_and(|f| verify_range(f, c.file_offset, c.size, &Digest(c.digest)));
                if !ok {
                    presence.clear(c.global);
                    cache.unmark_complete(&key);
                    r.chunks_cleared += 1;
                }
            }
        }
    }
    r
}
