//! Opening a cache again after the layers of a first "run" are dropped: a
//! fetch answers its waiters as soon as their chunks are stored, so the
//! drain task that read them may still hold the layer (and the cache's
//! lock) for a moment after the test's last read returned.

use std::path::Path;
use std::time::{Duration, Instant};

use stargaze_cache::{Cache, CacheError};

pub fn reopen_cache(dir: &Path) -> Cache {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Cache::open_writer(dir) {
            Err(CacheError::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            r => return r.expect("reopen the cache"),
        }
    }
}
