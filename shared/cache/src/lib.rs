//! The node's chunk cache, shared by the fetcher (its only writer) and the
//! fs service (a reader).
//!
//! ```text
//! <root>/lock                          flock held by the fetcher while it runs
//! <root>/clean                         exists only after a clean stop
//! <root>/layers/<hex>/index            TOC index (stargaze-index), written once
//! <root>/layers/<hex>/presence         presence map: one bit per chunk of the index
//! <root>/content/<hh>/<hex>            uncompressed file content by file digest, sparse
//!                                      (mode 0444 once complete and verified)
//! ```
//!
//! Data flows one way: the fetcher decompresses and verifies a chunk, writes
//! it into the content file ([`ContentFile::write_at`]) and only then sets the
//! chunk's bit in the layer's [`PresenceMap`] with release ordering; the fs
//! service reads the bit with acquire ordering and serves bytes from the
//! content file only when it is set. Content is keyed by the file's digest,
//! so a file shared by many layers or images is stored once; presence is per
//! layer because layers may chunk the same file differently.
//!
//! Content writes are `pwrite`s, or go through io_uring on a dedicated
//! thread after [`Cache::use_io_uring`] ([`uring`]); either way a write has
//! returned before its presence bit is set.
//!
//! [`Cache::open_writer`] detects an unclean stop (no `clean` marker): the
//! fetcher must then re-verify present chunks before trusting them
//! ([`verify_range`]), because bits and data are not flushed in order.

mod content;
pub mod evict;
mod pin;
mod presence;
pub mod uring;

pub use content::{ContentFile, verify_range};
pub use evict::{EvictOptions, Eviction, Evictor};
pub use pin::LayerPin;
pub use presence::{PRESENCE_HEADER, PresenceMap};

use std::fs::File;
use std::path::{Path, PathBuf};

use stargaze_format::Digest;

/// Errors of the cache; each names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cache {path} is locked by another fetcher (pid in the lock file); stop it or use another cache directory"
    )]
    Locked { path: PathBuf },
    #[error("presence map {path} is corrupt ({reason}); delete it and the fetcher rebuilds it")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "layer {layer} was evicted from the cache {path} while it was being attached; resolve it again"
    )]
    Evicted { layer: String, path: PathBuf },
}

impl CacheError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> CacheError {
        CacheError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The cache directory.
#[derive(Debug)]
pub struct Cache {
    root: PathBuf,
    /// Held by the writer: an exclusive flock on `<root>/lock`.
    _lock: Option<nix::fcntl::Flock<File>>,
    unclean: bool,
    /// Content writes go through this ring when set.
    uring: Option<std::sync::Arc<uring::UringWriter>>,
    /// Held shared while layer files or content are written, exclusively
    /// while eviction deletes ([`Cache::writing`], [`Cache::evicting`]).
    gate: std::sync::RwLock<()>,
    /// Content bytes written since the cache was opened (eviction's
    /// estimate of growth between scans).
    written: std::sync::atomic::AtomicU64,
}

/// Mode of a content file that is complete and verified.
pub const COMPLETE_MODE: u32 = 0o444;
/// Mode of a content file still being filled.
pub const PARTIAL_MODE: u32 = 0o644;

fn layer_key(layer_digest: &str) -> &str {
    layer_digest.strip_prefix("sha256:").unwrap_or(layer_digest)
}

impl Cache {
    /// Open the cache as its single writer (the fetcher): take the lock,
    /// note whether the last stop was clean, and clear the clean marker so a
    /// crash from now on is detected at the next start.
    pub fn open_writer(root: &Path) -> Result<Cache, CacheError> {
        for d in ["layers", "content"] {
            std::fs::create_dir_all(root.join(d)).map_err(|e| CacheError::io(root, e))?;
        }
        let lock_path = root.join("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| CacheError::io(&lock_path, e))?;
        let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|_| CacheError::Locked {
                path: lock_path.clone(),
            })?;
        let _ = lock.set_len(0);
        let _ = std::os::unix::fs::FileExt::write_all_at(
            &*lock,
            format!("{}\n", std::process::id()).as_bytes(),
            0,
        );
        let clean_path = root.join("clean");
        let had_content = std::fs::read_dir(root.join("layers"))
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
        let unclean = had_content && !clean_path.exists();
        match std::fs::remove_file(&clean_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(CacheError::io(&clean_path, e)),
        }
        Ok(Cache {
            root: root.to_path_buf(),
            _lock: Some(lock),
            unclean,
            uring: None,
            gate: Default::default(),
            written: Default::default(),
        })
    }

    /// Open the cache for reading (the fs service).
    pub fn open_reader(root: &Path) -> Cache {
        Cache {
            root: root.to_path_buf(),
            _lock: None,
            unclean: false,
            uring: None,
            gate: Default::default(),
            written: Default::default(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The previous writer did not stop cleanly: re-verify before trusting.
    pub fn was_unclean(&self) -> bool {
        self.unclean
    }

    /// Record a clean stop (call after every write has been issued).
    pub fn mark_clean(&self) -> Result<(), CacheError> {
        let path = self.root.join("clean");
        nix::unistd::sync();
        std::fs::write(&path, b"").map_err(|e| CacheError::io(&path, e))
    }

    pub fn layer_dir(&self, layer_digest: &str) -> PathBuf {
        self.root.join("layers").join(layer_key(layer_digest))
    }

    pub fn index_path(&self, layer_digest: &str) -> PathBuf {
        self.layer_dir(layer_digest).join("index")
    }

    pub fn presence_path(&self, layer_digest: &str) -> PathBuf {
        self.layer_dir(layer_digest).join("presence")
    }

    /// Content file of a file digest.
    pub fn content_path(&self, file_digest: &Digest) -> PathBuf {
        let hex = file_digest.hex();
        self.root.join("content").join(&hex[..2]).join(hex)
    }

    /// Is the content of this file complete and verified in the cache?
    /// (Complete content files are read-only: one `chmod` marks them, no
    /// extra file per content file.)
    pub fn is_complete(&self, file_digest: &Digest) -> bool {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(self.content_path(file_digest))
            .map(|m| m.permissions().mode() & 0o777 == COMPLETE_MODE)
            .unwrap_or(false)
    }

    /// Record that every chunk of the file has been written and verified.
    pub fn mark_complete(&self, file_digest: &Digest) -> Result<(), CacheError> {
        use std::os::unix::fs::PermissionsExt;
        let p = self.content_path(file_digest);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(COMPLETE_MODE))
            .map_err(|e| CacheError::io(&p, e))
    }

    /// Forget that a file is complete (after a failed re-verification).
    pub fn unmark_complete(&self, file_digest: &Digest) {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(
            self.content_path(file_digest),
            std::fs::Permissions::from_mode(PARTIAL_MODE),
        );
    }

    /// Open (creating, sparse, at its final size) a file's content for writing.
    pub fn content_writer(
        &self,
        file_digest: &Digest,
        size: u64,
    ) -> Result<ContentFile, CacheError> {
        let mut f = ContentFile::open_rw(&self.content_path(file_digest), size)?;
        f.uring = self.uring.clone();
        Ok(f)
    }

    /// Write content through io_uring from now on. On error (io_uring not
    /// available here) the cache keeps using `pwrite`.
    pub fn use_io_uring(&mut self) -> std::io::Result<()> {
        self.uring = Some(uring::UringWriter::start()?);
        Ok(())
    }

    /// Whether content writes go through io_uring.
    pub fn uses_io_uring(&self) -> bool {
        self.uring.is_some()
    }

    /// Hold while writing a layer's files or content (and publishing it):
    /// eviction cannot delete anything meanwhile.
    pub fn writing(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Held by eviction while it deletes.
    pub(crate) fn evicting(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Count content bytes written (eviction's growth estimate).
    pub fn note_written(&self, bytes: u64) {
        self.written
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Content bytes written since the cache was opened.
    pub fn written(&self) -> u64 {
        self.written.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Record that a layer is in use now (its directory's mtime is its
    /// last use, which eviction orders by).
    pub fn touch_layer(&self, layer_digest: &str) {
        // A directory opened read-only takes futimens (we own it).
        if let Ok(dir) = std::fs::File::open(self.layer_dir(layer_digest)) {
            let _ =
                dir.set_times(std::fs::FileTimes::new().set_modified(std::time::SystemTime::now()));
        }
    }

    /// Open a file's content for reading.
    pub fn content_reader(&self, file_digest: &Digest) -> Result<ContentFile, CacheError> {
        ContentFile::open_ro(&self.content_path(file_digest))
    }
}
