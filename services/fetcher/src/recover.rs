//! Re-verification after an unclean stop.
//!
//! Presence bits, content bytes and the links that share content reach the
//! disk in no particular order, so after a crash a bit may describe bytes
//! that never landed and a shared file may not hold what its name says.
//! Before serving anything, every shared content file is hashed whole and
//! removed unless it matches its digest, and every present chunk of every
//! layer is read back and hashed; chunks that fail are cleared (and
//! refetched on demand). A layer's file that was complete (perhaps a link
//! to shared content) and fails is removed, so that what is fetched again
//! goes into a file of the layer's own. Temporary files a write left
//! half done (a layer's index, source or deduplication link, a trace) are
//! removed: each is written beside its final name and renamed into place,
//! so a leftover one was never in use.

use stargaze_cache::{Cache, PresenceMap, hashes_to, verify_range};
use stargaze_format::Digest;
use stargaze_index::LayerIndex;

/// Counts of a recovery pass.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    pub layers: u32,
    pub chunks_checked: u64,
    pub chunks_cleared: u64,
    /// Shared content files hashed whole, and those removed.
    pub shared_checked: u64,
    pub shared_removed: u64,
    /// Temporary files left by interrupted writes, removed.
    pub temps_removed: u64,
}

/// Is this file name one of the cache's temporary files (see the module
/// docs)? `<ino>.dedup.<pid>.<n>` (`Cache::share`), `*.json.tmp`
/// (`LayerSource`, `Trace`), `.index.tmp*` (the index writer).
fn is_temp(name: &str) -> bool {
    name.ends_with(".json.tmp") || name.starts_with(".index.tmp") || name.contains(".dedup.")
}

/// Remove the temporary files directly in `dir`.
fn remove_temps(dir: &std::path::Path, r: &mut Recovery) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if !e.file_name().to_str().is_some_and(is_temp) {
            continue;
        }
        match std::fs::remove_file(e.path()) {
            Ok(()) => r.temps_removed += 1,
            Err(err) => {
                tracing::warn!(file = %e.path().display(), error = %err, "cannot remove a temporary cache file left by an interrupted write")
            }
        }
    }
}

/// Re-verify the shared content and every layer in the cache.
pub fn reverify(cache: &Cache) -> Recovery {
    let mut r = Recovery::default();
    reverify_shared(cache, &mut r);
    remove_temps(&cache.root().join("traces"), &mut r);
    let Ok(dirs) = std::fs::read_dir(cache.root().join("layers")) else {
        return r;
    };
    for d in dirs.flatten() {
        remove_temps(&d.path(), &mut r);
        remove_temps(&d.path().join("files"), &mut r);
        // Directories are named by the digest's hex; anything else in
        // `layers/` is none of the fetcher's.
        let Ok(digest) = format!("sha256:{}", d.file_name().to_string_lossy()).parse::<Digest>()
        else {
            continue;
        };
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
            let content = cache.layer_file_reader(&digest, ino).ok();
            let complete = cache.layer_file_is_complete(&digest, ino);
            let mut failed = false;
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
                    r.chunks_cleared += 1;
                    failed = true;
                }
            }
            if failed && complete {
                // Never write into a complete file: start a new one.
                for c in n.chunks() {
                    presence.clear(c.global);
                }
                if let Err(e) = cache.remove_layer_file(&digest, ino) {
                    tracing::warn!(layer = %digest, file = %index.path_of(ino), error = %e, "cannot remove a cache file that failed re-verification");
                }
            }
        }
    }
    r
}

/// Hash every shared content file whole; remove those that do not match
/// the digest they are named by.
fn reverify_shared(cache: &Cache, r: &mut Recovery) {
    let Ok(shards) = std::fs::read_dir(cache.root().join("content")) else {
        return;
    };
    for shard in shards.flatten() {
        let Ok(files) = std::fs::read_dir(shard.path()) else {
            continue;
        };
        for f in files.flatten() {
            let path = f.path();
            let digest = f
                .file_name()
                .to_str()
                .and_then(|n| format!("sha256:{n}").parse::<Digest>().ok());
            let good = digest.is_some_and(|d| {
                r.shared_checked += 1;
                cache.content_reader(&d).is_ok_and(|c| {
                    let size = c.file().metadata().map(|m| m.len()).unwrap_or(0);
                    hashes_to(&c, size, &d)
                })
            });
            if !good {
                r.shared_removed += 1;
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::warn!(file = %path.display(), error = %e, "cannot remove a shared cache file that failed re-verification");
                }
            }
        }
    }
}
