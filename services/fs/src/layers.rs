//! The table of attached layers and the inode numbering of the mount.
//!
//! The mount root is inode 1; a layer attached in slot `s` has its index's
//! inode `i` at `s << SLOT_SHIFT | i`, so inode numbers are unique across
//! layers without any per-inode table, and a layer's slot is never reused
//! while the FUSE connection lives (the kernel may still hold old numbers):
//! with a session file ([`crate::handover`]) every change of the table is
//! saved, so a restarted process attaches the same layers in the same slots.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

use parking_lot::RwLock;
use stargaze_cache::{Cache, LayerPin, PresenceMap};
use stargaze_format::Digest;
use stargaze_index::LayerIndex;

use crate::handover::{SavedLayer, SessionFile, SessionState};

/// Bits of a global inode number that hold the index's inode.
pub const SLOT_SHIFT: u32 = 40;
pub const MOUNT_ROOT: u64 = 1;

/// Counters of one attached layer.
#[derive(Debug, Default)]
pub struct LayerStats {
    pub reads: AtomicU64,
    pub read_errors: AtomicU64,
}

/// A layer served under the mount.
pub struct Attached {
    pub digest: Digest,
    /// Directory name in the mount: the digest's hex.
    pub name: String,
    pub slot: u64,
    pub index: LayerIndex,
    pub presence: PresenceMap,
    pub cache: Arc<Cache>,
    pub stats: LayerStats,
    /// The chunks whose first read was reported for traces (`reads.rs`).
    pub reported: crate::reads::Reported,
    /// Small-file misses per directory (`readahead.rs`).
    pub(crate) directory_misses: crate::readahead::DirectoryMisses,
    /// Keeps the fetcher's eviction away from the layer while attached.
    _pin: LayerPin,
}

impl Attached {
    pub fn global(&self, local: u64) -> u64 {
        self.slot << SLOT_SHIFT | local
    }
}

/// Why a layer cannot be attached.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("layer {layer}: {source}")]
    Index {
        layer: String,
        #[source]
        source: stargaze_index::IndexError,
    },
    #[error("layer {layer}: {source}")]
    Presence {
        layer: String,
        #[source]
        source: stargaze_cache::CacheError,
    },
    #[error("layer {layer}: the index at {index} belongs to layer {other}")]
    Mismatch {
        layer: String,
        index: PathBuf,
        other: String,
    },
    /// Refused where the digest came in (a request, the saved session):
    /// it would otherwise name cache files.
    #[error("layer digest: {0}")]
    BadDigest(#[from] stargaze_format::digest::DigestParseError),
}

/// Attached layers by slot and by name, from the node's cache.
pub struct LayerTable {
    /// The fetcher's cache (`[fetcher] cache_dir`): a layer's index and
    /// presence map are where the cache keeps them for its digest.
    cache: Arc<Cache>,
    inner: RwLock<Table>,
    journal: OnceLock<Journal>,
}

/// Where the table is saved, with the rest of the session's state.
struct Journal {
    file: SessionFile,
    init: String,
    device: String,
    transport: String,
}

#[derive(Default)]
struct Table {
    by_slot: HashMap<u64, Arc<Attached>>,
    by_name: HashMap<String, u64>,
    next_slot: u64,
}

impl LayerTable {
    /// An empty table serving layers of the cache at `cache_root`.
    pub fn new(cache_root: &Path) -> LayerTable {
        LayerTable {
            cache: Arc::new(Cache::open_reader(cache_root)),
            inner: RwLock::default(),
            journal: OnceLock::new(),
        }
    }

    /// Save the table (and the session's INIT, device and transport) to
    /// `file` from now on, at every change; saves it once now.
    pub fn journal_to(&self, file: SessionFile, init: String, device: String, transport: &str) {
        let _ = self.journal.set(Journal {
            file,
            init,
            device,
            transport: transport.to_string(),
        });
        let t = self.inner.read();
        self.save(&t);
    }

    fn save(&self, t: &Table) {
        let Some(j) = self.journal.get() else {
            return;
        };
        let mut layers: Vec<SavedLayer> = t
            .by_slot
            .values()
            .map(|a| SavedLayer {
                digest: a.digest.to_string(),
                slot: a.slot,
            })
            .collect();
        layers.sort_by_key(|l| l.slot);
        let state = SessionState {
            init: j.init.clone(),
            device: j.device.clone(),
            next_slot: t.next_slot,
            layers,
            transport: j.transport.clone(),
        };
        if let Err(e) = j.file.save(&state) {
            tracing::warn!(error = %e, "cannot save the FUSE session: after a restart of stargaze-fs running containers may lose their layers");
        }
    }

    /// Slots up to `next_slot` were given out by a previous process.
    pub fn reserve_slots(&self, next_slot: u64) {
        let mut t = self.inner.write();
        t.next_slot = t.next_slot.max(next_slot);
    }

    /// Attach (or find) a layer the fetcher resolved; returns it.
    pub fn attach(&self, digest: &Digest) -> Result<Arc<Attached>, AttachError> {
        self.attach_in(digest, None)
    }

    /// Attach a layer in the slot a previous process gave it.
    pub fn attach_in(
        &self,
        digest: &Digest,
        slot: Option<u64>,
    ) -> Result<Arc<Attached>, AttachError> {
        let name = digest.hex();
        if let Some(a) = self.by_name(&name) {
            return Ok(a);
        }
        // Pinned before anything is opened: eviction cannot delete the files
        // between here and the detach.
        let cache = self.cache.clone();
        let (index_path, presence_path) = (cache.index_path(digest), cache.presence_path(digest));
        let pin = cache
            .pin_layer(digest)
            .map_err(|source| AttachError::Presence {
                layer: digest.to_string(),
                source,
            })?;
        let index = LayerIndex::open(&index_path).map_err(|source| AttachError::Index {
            layer: digest.to_string(),
            source,
        })?;
        if index.layer_digest() != digest.to_string() {
            return Err(AttachError::Mismatch {
                layer: digest.to_string(),
                index: index_path.clone(),
                other: index.layer_digest().to_string(),
            });
        }
        let presence =
            PresenceMap::open_ro(&presence_path).map_err(|source| AttachError::Presence {
                layer: digest.to_string(),
                source,
            })?;
        let mut t = self.inner.write();
        if let Some(slot) = t.by_name.get(&name) {
            return Ok(t.by_slot[slot].clone());
        }
        let slot = match slot {
            Some(s) if !t.by_slot.contains_key(&s) => {
                t.next_slot = t.next_slot.max(s);
                s
            }
            _ => {
                t.next_slot += 1;
                t.next_slot
            }
        };
        let reported = crate::reads::Reported::new(index.chunk_count() as usize);
        let a = Arc::new(Attached {
            digest: *digest,
            name: name.clone(),
            slot,
            reported,
            directory_misses: Default::default(),
            index,
            presence,
            cache,
            stats: LayerStats::default(),
            _pin: pin,
        });
        t.by_slot.insert(slot, a.clone());
        t.by_name.insert(name, slot);
        self.save(&t);
        Ok(a)
    }

    pub fn detach(&self, name: &str) -> Option<Arc<Attached>> {
        let mut t = self.inner.write();
        let slot = t.by_name.remove(name)?;
        let a = t.by_slot.remove(&slot);
        self.save(&t);
        a
    }

    pub fn by_name(&self, name: &str) -> Option<Arc<Attached>> {
        let t = self.inner.read();
        t.by_name.get(name).and_then(|s| t.by_slot.get(s)).cloned()
    }

    /// The layer attached in `slot`.
    pub fn by_slot(&self, slot: u64) -> Option<Arc<Attached>> {
        self.inner.read().by_slot.get(&slot).cloned()
    }

    /// The layer and local inode of a global inode number.
    pub fn resolve(&self, ino: u64) -> Option<(Arc<Attached>, u64)> {
        let slot = ino >> SLOT_SHIFT;
        let local = ino & ((1 << SLOT_SHIFT) - 1);
        let t = self.inner.read();
        t.by_slot.get(&slot).map(|a| (a.clone(), local))
    }

    /// Every attached layer, sorted by name (the mount root's listing).
    pub fn list(&self) -> Vec<Arc<Attached>> {
        let t = self.inner.read();
        let mut v: Vec<_> = t.by_slot.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn len(&self) -> usize {
        self.inner.read().by_slot.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A panic while the table is locked (a bug in one request) must not
    /// make every later lookup, attach and detach of the mount panic.
    #[test]
    fn a_panic_while_the_table_is_locked_leaves_it_usable() {
        let t = LayerTable::new(Path::new("/nonexistent"));
        std::thread::scope(|s| {
            let bug = s.spawn(|| {
                let _held = t.inner.write();
                panic!("a bug while holding the layer table");
            });
            assert!(bug.join().is_err());
        });
        assert!(t.resolve(1 << SLOT_SHIFT | 1).is_none());
        assert!(t.by_name("x").is_none());
        assert!(t.detach("x").is_none());
        t.reserve_slots(3);
        assert!(t.list().is_empty() && t.is_empty());
    }
}
