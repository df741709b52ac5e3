//! Which layers are in use: the fs service holds a shared `flock` on a
//! layer's presence file for as long as the layer is attached; eviction
//! takes an exclusive one (without waiting) before it deletes a layer.
//!
//! A lock dies with its process, so a crashed fs service never keeps a
//! layer pinned, and nothing has to be cleaned up after it. (Eviction also
//! spares layers used recently, which covers the seconds between an fs
//! restart and the snapshotter re-attaching its layers.)

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use stargaze_format::Digest;

use crate::{Cache, CacheError};

/// A layer kept from eviction while this lives (fs holds one per attached
/// layer).
#[derive(Debug)]
pub struct LayerPin {
    _lock: Flock<File>,
}

/// An exclusive lock on an unused layer, held while it is deleted.
pub(crate) type RemovalLock = Flock<File>;

impl Cache {
    /// Pin a layer (shared lock on its presence file). Waits while eviction
    /// holds the layer, then fails with [`CacheError::Evicted`] if eviction
    /// deleted it meanwhile.
    pub fn pin_layer(&self, layer_digest: &Digest) -> Result<LayerPin, CacheError> {
        let path = self.presence_path(layer_digest);
        let file = File::open(&path).map_err(|e| CacheError::io(&path, e))?;
        let lock = Flock::lock(file, FlockArg::LockShared)
            .map_err(|(_, e)| CacheError::io(&path, e.into()))?;
        // The lock is on the file we opened: is it still the layer's?
        let held = lock.metadata().map_err(|e| CacheError::io(&path, e))?;
        match std::fs::metadata(&path) {
            Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {
                Ok(LayerPin { _lock: lock })
            }
            _ => Err(CacheError::Evicted {
                layer: *layer_digest,
                path: self.root().to_path_buf(),
            }),
        }
    }

    /// Is the layer pinned by some process (attached in fs)?
    pub fn layer_in_use(&self, layer_digest: &Digest) -> bool {
        match lock_for_removal(&self.presence_path(layer_digest)) {
            Ok(Some(_)) => false,
            Ok(None) => true,
            // No presence file: nobody can have it attached.
            Err(_) => false,
        }
    }
}

/// Lock a layer's presence file exclusively if nobody pins it: `None` when
/// it is pinned; an error when there is no such file.
pub(crate) fn lock_for_removal(presence: &Path) -> std::io::Result<Option<RemovalLock>> {
    match Flock::lock(File::open(presence)?, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pinned_layer_is_in_use_until_the_pin_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open_writer(dir.path()).unwrap();
        let layer = Digest([0xab; 32]);
        crate::PresenceMap::open_rw(&cache.presence_path(&layer), 10, &layer).unwrap();
        assert!(!cache.layer_in_use(&layer));
        let pin = cache.pin_layer(&layer).unwrap();
        assert!(cache.layer_in_use(&layer));
        // A second reader may pin it too.
        let pin2 = cache.pin_layer(&layer).unwrap();
        drop(pin);
        assert!(cache.layer_in_use(&layer));
        drop(pin2);
        assert!(!cache.layer_in_use(&layer));
        // Removed (and recreated) while a pin was waiting: the pin fails.
        let held = lock_for_removal(&cache.presence_path(&layer))
            .unwrap()
            .unwrap();
        let c2 = Cache::open_reader(dir.path());
        let l2 = layer;
        let waiter = std::thread::spawn(move || c2.pin_layer(&l2).map(|_| ()));
        std::thread::sleep(std::time::Duration::from_millis(100));
        std::fs::remove_dir_all(cache.layer_dir(&layer)).unwrap();
        crate::PresenceMap::open_rw(&cache.presence_path(&layer), 10, &layer).unwrap();
        drop(held);
        let err = waiter.join().unwrap().unwrap_err();
        assert!(matches!(err, CacheError::Evicted { .. }), "{err}");
        assert!(err.to_string().contains(&layer.to_string()), "{err}");
    }
}
