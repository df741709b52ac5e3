//! Content files: a file's uncompressed bytes, keyed by its digest, sparse
//! until every chunk has been written.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use stargaze_format::Digest;

use crate::CacheError;

/// An open content file.
pub struct ContentFile {
    file: std::fs::File,
    path: PathBuf,
    /// Set by [`crate::Cache::content_writer`] when writes go through io_uring.
    pub(crate) uring: Option<std::sync::Arc<crate::uring::UringWriter>>,
    /// The file's final size.
    size: u64,
    /// Created by this open and not yet at its final size: the first write
    /// sets it.
    size_pending: std::sync::atomic::AtomicBool,
}

impl ContentFile {
    /// Open for writing. This runs once per chunk stored, so it costs as
    /// few system calls as it can: a new file is created with `O_EXCL`
    /// (no `fstat`), its fan-out directory made only when the create says
    /// it is missing, and its length set by the first write (a chunk that
    /// covers the whole file, the common small file, needs no `ftruncate`;
    /// any other write first makes the file sparse at its final size so
    /// that chunks can land in any order). An existing file of another size
    /// is resized here.
    pub fn open_rw(path: &Path, size: u64) -> Result<ContentFile, CacheError> {
        // Root writes even to a complete (0444) file, which happens when a
        // chunk is fetched again for another layer: same verified bytes.
        let options = |new: bool| {
            let mut o = std::fs::OpenOptions::new();
            o.read(true).write(true).mode(crate::PARTIAL_MODE);
            if new {
                o.create_new(true);
            }
            o
        };
        let mut made_dir = false;
        for _ in 0..4 {
            match options(true).open(path) {
                Ok(file) => {
                    return Ok(ContentFile {
                        file,
                        path: path.to_path_buf(),
                        uring: None,
                        size,
                        size_pending: std::sync::atomic::AtomicBool::new(size > 0),
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !made_dir => {
                    if let Some(dir) = path.parent() {
                        std::fs::create_dir_all(dir).map_err(|e| CacheError::io(dir, e))?;
                    }
                    made_dir = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let file = match options(false).open(path) {
                        // Deleted between the two opens: create it again.
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        r => r.map_err(|e| CacheError::io(path, e))?,
                    };
                    let len = file.metadata().map_err(|e| CacheError::io(path, e))?.len();
                    if len != size {
                        file.set_len(size).map_err(|e| CacheError::io(path, e))?;
                    }
                    return Ok(ContentFile {
                        file,
                        path: path.to_path_buf(),
                        uring: None,
                        size,
                        size_pending: std::sync::atomic::AtomicBool::new(false),
                    });
                }
                Err(e) => return Err(CacheError::io(path, e)),
            }
        }
        Err(CacheError::io(
            path,
            std::io::Error::other("the file kept vanishing while being opened"),
        ))
    }

    /// Mark this file complete: every chunk written and verified (the
    /// open descriptor's mode, as [`crate::Cache::mark_complete`] does by
    /// path).
    pub fn mark_complete(&self) -> Result<(), CacheError> {
        use std::os::unix::fs::PermissionsExt;
        self.file
            .set_permissions(std::fs::Permissions::from_mode(crate::COMPLETE_MODE))
            .map_err(|e| CacheError::io(&self.path, e))
    }

    pub fn open_ro(path: &Path) -> Result<ContentFile, CacheError> {
        let file = std::fs::File::open(path).map_err(|e| CacheError::io(path, e))?;
        Ok(ContentFile {
            file,
            path: path.to_path_buf(),
            uring: None,
            // Never written through this handle.
            size: 0,
            size_pending: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &std::fs::File {
        &self.file
    }

    /// Write verified bytes at `offset` (pwrite or io_uring; returns when
    /// the kernel has them).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), CacheError> {
        if self
            .size_pending
            .swap(false, std::sync::atomic::Ordering::Relaxed)
            && offset + data.len() as u64 != self.size
        {
            self.file
                .set_len(self.size)
                .map_err(|e| CacheError::io(&self.path, e))?;
        }
        match &self.uring {
            Some(u) => u.write_all_at(&self.file, data, offset),
            None => self.file.write_all_at(data, offset),
        }
        .map_err(|e| CacheError::io(&self.path, e))
    }

    /// Read exactly `buf.len()` bytes at `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), CacheError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| CacheError::io(&self.path, e))
    }
}

/// Does `content[offset..offset+len]` hash to `digest`? Used to re-verify
/// chunks after an unclean stop.
pub fn verify_range(content: &ContentFile, offset: u64, len: u64, digest: &Digest) -> bool {
    let Ok(len) = usize::try_from(len) else {
        return false;
    };
    let mut buf = vec![0u8; len];
    content.read_at(offset, &mut buf).is_ok() && Digest::of(&buf) == *digest
}
