//! The node's chunk cache, shared by the fetcher (its only writer) and the
//! fs service (a reader).
//!
//! ```text
//! <root>/lock                          flock held by the fetcher while it runs
//! <root>/clean                         exists only after a clean stop
//! <root>/layout                        the layout's version (older caches are emptied)
//! <root>/layers/<hex>/index            TOC index (stargaze-index), written once
//! <root>/layers/<hex>/presence         presence map: one bit per chunk of the index
//! <root>/layers/<hex>/source.json      where the layer comes from ([`LayerSource`]), so a
//!                                      restarted fetcher can resolve it again
//! <root>/layers/<hex>/files/<ino>      the layer's regular file <ino>, sparse until
//!                                      complete (mode 0444 once complete and verified)
//! <root>/content/<hh>/<hex>            verified content by file digest: hard links to
//!                                      complete layer files, shared by all layers
//! <root>/traces/sha256-<hex>.json      learned access trace of an image, by manifest
//!                                      digest ([`Trace`]): what to fetch first next time
//! ```
//!
//! Data flows one way: the fetcher decompresses and verifies a chunk
//! against its layer's TOC, writes it into that layer's file
//! ([`Cache::layer_file_writer`], [`ContentFile::write_at`]) and only then
//! sets the chunk's bit in the layer's [`PresenceMap`] with release
//! ordering; the fs service reads the bit with acquire ordering and serves
//! bytes from the layer's file only when it is set.
//!
//! A file digest in a TOC is a claim made by whoever built the image, so
//! nothing is shared on its word. A layer fills files of its own; once one
//! is complete and its bytes hash to the digest its TOC gives, it becomes
//! read-only and is linked into `content/` ([`Cache::share`]): the same
//! file in many layers or images is then stored once. Another layer uses
//! shared content without fetching it only when its own TOC agrees with
//! the bytes (size and every chunk digest, [`Cache::adopt`]) and it has no
//! file of its own yet; a complete file is never written again. So a TOC
//! that lies about a digest can only ever change what its own layer reads.
//! Presence is per layer because layers may chunk the same file differently.
//!
//! Content writes are `pwrite`s, or after [`Cache::use_io_uring`] go
//! through a ring per writing thread ([`rings`]: the writer batches a
//! member's writes and reaps them before it publishes any), or after
//! [`Cache::use_io_uring_thread`] through one ring on a dedicated thread
//! ([`uring`], kept for comparison); either way a write has completed
//! before its presence bit is set.
//!
//! A write that finds the filesystem full ([`CacheError::is_out_of_space`])
//! is noted with [`Cache::note_full`]; the fetcher's eviction task takes
//! the note ([`Cache::take_full`]) and makes room ([`Evictor::run_full`]).
//!
//! [`Cache::open_writer`] detects an unclean stop (no `clean` marker): the
//! fetcher must then re-verify present chunks and shared content before
//! trusting them ([`verify_range`], [`hashes_to`]), because bits and data
//! are not flushed in order.

mod content;
pub mod evict;
mod pin;
mod presence;
pub mod rings;
mod source;
pub mod trace;
pub mod uring;

pub use content::{ContentFile, hashes_to, verify_range};
pub use evict::{EvictOptions, Eviction, Evictor};
pub use pin::LayerPin;
pub use presence::{PRESENCE_HEADER, PresenceMap};
pub use source::{LayerSource, SourceError};
pub use trace::{Trace, TraceError, TraceRead, TraceSpan};

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
    Evicted { layer: Digest, path: PathBuf },
}

impl CacheError {
    /// Did the filesystem run out of space (ENOSPC) or the user out of
    /// quota (EDQUOT)? Decided by the error number, not the text.
    pub fn is_out_of_space(&self) -> bool {
        match self {
            CacheError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            ),
            _ => false,
        }
    }

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
    /// Writers batch content writes on their own thread's ring ([`rings`]).
    thread_rings: bool,
    /// Held shared while layer files or content are written, exclusively
    /// while eviction deletes ([`Cache::writing`], [`Cache::evicting`]).
    gate: std::sync::RwLock<()>,
    /// Content bytes written since the cache was opened (eviction's
    /// estimate of growth between scans).
    written: std::sync::atomic::AtomicU64,
    /// A write found the filesystem full since eviction last looked.
    full: std::sync::atomic::AtomicBool,
}

/// Version of the directory layout above. A cache of another version is
/// emptied when the fetcher opens it: its presence bits describe files
/// where this version does not look (everything is fetched again).
const LAYOUT_VERSION: &str = "2";

/// Empty a cache whose layout is not [`LAYOUT_VERSION`], then record it.
fn check_layout(root: &Path) -> Result<(), CacheError> {
    let path = root.join("layout");
    match std::fs::read_to_string(&path) {
        Ok(v) if v.trim() == LAYOUT_VERSION => return Ok(()),
        Ok(_) | Err(_) => {}
    }
    let used = ["layers", "content"].iter().any(|d| {
        std::fs::read_dir(root.join(d))
            .map(|mut e| e.next().is_some())
            .unwrap_or(false)
    });
    if used {
        tracing::warn!(
            cache = %root.display(),
            "the cache has an older layout: emptying it (its layers are fetched again)"
        );
        for d in ["layers", "content"] {
            let dir = root.join(d);
            std::fs::remove_dir_all(&dir).map_err(|e| CacheError::io(&dir, e))?;
            std::fs::create_dir_all(&dir).map_err(|e| CacheError::io(&dir, e))?;
        }
    }
    std::fs::write(&path, format!("{LAYOUT_VERSION}\n")).map_err(|e| CacheError::io(&path, e))
}

/// Mode of a content file that is complete and verified.
pub const COMPLETE_MODE: u32 = 0o444;
/// Mode of a content file still being filled.
pub const PARTIAL_MODE: u32 = 0o644;

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
        check_layout(root)?;
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
            thread_rings: false,
            gate: Default::default(),
            written: Default::default(),
            full: Default::default(),
        })
    }

    /// Open the cache for reading (the fs service).
    pub fn open_reader(root: &Path) -> Cache {
        Cache {
            root: root.to_path_buf(),
            _lock: None,
            unclean: false,
            uring: None,
            thread_rings: false,
            gate: Default::default(),
            written: Default::default(),
            full: Default::default(),
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

    /// A layer's directory, named by the digest's bare hex (the name every
    /// earlier release used too, so existing caches stay valid). Only a
    /// parsed [`Digest`] gets here: a digest string from the network never
    /// becomes a path component unchecked.
    pub fn layer_dir(&self, layer_digest: &Digest) -> PathBuf {
        self.root.join("layers").join(layer_digest.hex())
    }

    pub fn index_path(&self, layer_digest: &Digest) -> PathBuf {
        self.layer_dir(layer_digest).join("index")
    }

    pub fn presence_path(&self, layer_digest: &Digest) -> PathBuf {
        self.layer_dir(layer_digest).join("presence")
    }

    /// Shared, verified content of a file digest (see the module docs).
    pub fn content_path(&self, file_digest: &Digest) -> PathBuf {
        let hex = file_digest.hex();
        self.root.join("content").join(&hex[..2]).join(hex)
    }

    /// Is verified content of this digest shared in the cache?
    pub fn is_shared(&self, file_digest: &Digest) -> bool {
        std::fs::metadata(self.content_path(file_digest))
            .map(|m| content::is_complete_mode(&m))
            .unwrap_or(false)
    }

    /// A layer's file for its regular file `ino`: what the layer's presence
    /// bits describe and the fs service reads.
    pub fn layer_file_path(&self, layer_digest: &Digest, ino: u64) -> PathBuf {
        self.layer_dir(layer_digest)
            .join("files")
            .join(ino.to_string())
    }

    /// Open (creating, sparse, at its final size) a layer's file for
    /// writing verified chunks; `None` when it is complete (every byte
    /// verified for this layer, perhaps shared: never written again).
    pub fn layer_file_writer(
        &self,
        layer_digest: &Digest,
        ino: u64,
        size: u64,
    ) -> Result<Option<ContentFile>, CacheError> {
        let Some(mut f) = ContentFile::open_rw(&self.layer_file_path(layer_digest, ino), size)?
        else {
            return Ok(None);
        };
        f.uring = self.uring.clone();
        Ok(Some(f))
    }

    /// Open a layer's file for reading.
    pub fn layer_file_reader(
        &self,
        layer_digest: &Digest,
        ino: u64,
    ) -> Result<ContentFile, CacheError> {
        ContentFile::open_ro(&self.layer_file_path(layer_digest, ino))
    }

    /// Is the layer's file complete (read-only)?
    pub fn layer_file_is_complete(&self, layer_digest: &Digest, ino: u64) -> bool {
        std::fs::symlink_metadata(self.layer_file_path(layer_digest, ino))
            .map(|m| content::is_complete_mode(&m))
            .unwrap_or(false)
    }

    /// Drop a layer's file (after a failed re-verification): the next
    /// write starts a new file of the layer's own, whatever the old one
    /// was linked to.
    pub fn remove_layer_file(&self, layer_digest: &Digest, ino: u64) -> Result<(), CacheError> {
        let p = self.layer_file_path(layer_digest, ino);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CacheError::io(&p, e)),
        }
    }

    /// Share a layer's complete file as the content of `file_digest`. The
    /// caller has checked that every byte of `file` hashes to that digest
    /// ([`hashes_to`], or the one chunk of a one-chunk file had it as its
    /// chunk digest). The file becomes read-only and is linked into
    /// `content/`; where another layer shared the same content first, the
    /// layer's file is replaced by a link to that copy (the same bytes,
    /// stored once; open descriptors keep the old copy, equal to it).
    pub fn share(
        &self,
        layer_digest: &Digest,
        ino: u64,
        file: &ContentFile,
        file_digest: &Digest,
    ) -> Result<(), CacheError> {
        use std::os::unix::fs::MetadataExt;
        file.mark_complete()?;
        let own = self.layer_file_path(layer_digest, ino);
        if std::fs::symlink_metadata(&own).is_err() {
            return Ok(()); // the layer was evicted meanwhile
        }
        let shared = self.content_path(file_digest);
        let link = |from: &Path, to: &Path| -> std::io::Result<()> {
            match std::fs::hard_link(from, to) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if let Some(dir) = to.parent() {
                        std::fs::create_dir_all(dir)?;
                    }
                    std::fs::hard_link(from, to)
                }
                r => r,
            }
        };
        match link(&own, &shared) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let (Ok(a), Ok(b)) = (std::fs::metadata(&own), std::fs::metadata(&shared)) else {
                    return Ok(());
                };
                if a.ino() == b.ino() || !content::is_complete_mode(&b) || b.len() != a.len() {
                    return Ok(());
                }
                // Store once: the layer's file becomes a link to the copy.
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let tmp = own.with_extension(format!("dedup.{}.{n}", std::process::id()));
                let _ = std::fs::remove_file(&tmp);
                std::fs::hard_link(&shared, &tmp)
                    .and_then(|()| std::fs::rename(&tmp, &own))
                    .map_err(|e| {
                        let _ = std::fs::remove_file(&tmp);
                        CacheError::io(&own, e)
                    })
            }
            Err(e) => Err(CacheError::io(&shared, e)),
        }
    }

    /// Let a layer use the shared content of `file_digest` for its file
    /// `ino` without fetching it. Only when the layer has no file of its
    /// own yet, the content is complete and has the size the layer's TOC
    /// gives, and `agrees` (the layer's own chunk digests over the shared
    /// bytes) holds: a layer whose TOC disagrees with shared content never
    /// uses it. Returns whether the layer's file is now that content.
    pub fn adopt(
        &self,
        layer_digest: &Digest,
        ino: u64,
        file_digest: &Digest,
        size: u64,
        agrees: impl FnOnce(&ContentFile) -> bool,
    ) -> bool {
        let shared = self.content_path(file_digest);
        let Ok(content) = ContentFile::open_ro(&shared) else {
            return false;
        };
        match content.file().metadata() {
            Ok(m) if content::is_complete_mode(&m) && m.len() == size => {}
            _ => return false,
        }
        if !agrees(&content) {
            return false;
        }
        let own = self.layer_file_path(layer_digest, ino);
        let linked = match std::fs::hard_link(&shared, &own) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => own
                .parent()
                .map(std::fs::create_dir_all)
                .unwrap_or(Ok(()))
                .and_then(|()| std::fs::hard_link(&shared, &own)),
            r => r,
        };
        // AlreadyExists: the layer has a file of its own; it keeps it.
        linked.is_ok()
    }

    /// Write content through a ring per writing thread from now on
    /// ([`rings`]; writers that batch check [`Cache::uses_thread_rings`]).
    /// On error (io_uring not available here) the cache keeps using
    /// `pwrite`.
    pub fn use_io_uring(&mut self) -> std::io::Result<()> {
        rings::probe()?;
        self.uring = None;
        self.thread_rings = true;
        Ok(())
    }

    /// Write content through one ring on a dedicated thread from now on
    /// ([`uring`]: the earlier design, slower than `pwrite`, kept for the
    /// benchmark's comparison).
    pub fn use_io_uring_thread(&mut self) -> std::io::Result<()> {
        self.uring = Some(uring::UringWriter::start()?);
        self.thread_rings = false;
        Ok(())
    }

    /// Whether content writes go through io_uring (either design).
    pub fn uses_io_uring(&self) -> bool {
        self.uring.is_some() || self.thread_rings
    }

    /// Whether writers should batch content writes on their thread's ring
    /// ([`rings::Batch`], with [`ContentFile::prepare_write`] first).
    /// [`ContentFile::write_at`] itself stays a `pwrite` then.
    pub fn uses_thread_rings(&self) -> bool {
        self.thread_rings
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

    /// Record that a write found the cache's filesystem full: eviction
    /// makes room at its next look ([`Cache::take_full`]). True when it
    /// was not noted already.
    pub fn note_full(&self) -> bool {
        !self.full.swap(true, std::sync::atomic::Ordering::Relaxed)
    }

    /// Was the filesystem found full since the last call?
    pub fn take_full(&self) -> bool {
        self.full.swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    /// Record that a layer is in use now (its directory's mtime is its
    /// last use, which eviction orders by).
    pub fn touch_layer(&self, layer_digest: &Digest) {
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
