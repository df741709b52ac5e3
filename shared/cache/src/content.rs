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
}

impl ContentFile {
    /// Open for writing; a new file is created sparse at its final size so
    /// that chunks can land in any order. (This runs once per chunk stored:
    /// the fan-out directory is created only when the open says it is
    /// missing, and the size set only on a file of another size.)
    pub fn open_rw(path: &Path, size: u64) -> Result<ContentFile, CacheError> {
        // Root writes even to a complete (0444) file, which happens when a
        // chunk is fetched again for another layer: same verified bytes.
        let open = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(crate::PARTIAL_MODE)
                .open(path)
        };
        let file = match open() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| CacheError::io(dir, e))?;
                }
                open()
            }
            r => r,
        }
        .map_err(|e| CacheError::io(path, e))?;
        let len = file.metadata().map_err(|e| CacheError::io(path, e))?.len();
        if len != size {
            file.set_len(size).map_err(|e| CacheError::io(path, e))?;
        }
        Ok(ContentFile {
            file,
            path: path.to_path_buf(),
            uring: None,
        })
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
