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
    /// Set by [`crate::Cache::layer_file_writer`] when writes go through io_uring.
    pub(crate) uring: Option<std::sync::Arc<crate::uring::UringWriter>>,
    /// The file's final size.
    size: u64,
    /// Created by this open and not yet at its final size: the first write
    /// sets it.
    size_pending: std::sync::atomic::AtomicBool,
}

impl ContentFile {
    /// Open for writing, or `None` when the file is complete: a complete
    /// file holds verified bytes, may be shared with other layers (hard
    /// links), and is never opened for writing again.
    ///
    /// This runs once per chunk stored, so it costs as few system calls as
    /// it can: a new file is created with `O_EXCL` (no `fstat`), its
    /// directory made only when the create says it is missing, and its
    /// length set by the first write (a chunk that covers the whole file,
    /// the common small file, needs no `ftruncate`; any other write first
    /// makes the file sparse at its final size so that chunks can land in
    /// any order). An existing file is looked at read-only first; one of
    /// another size is resized.
    pub fn open_rw(path: &Path, size: u64) -> Result<Option<ContentFile>, CacheError> {
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
                    return Ok(Some(ContentFile {
                        file,
                        path: path.to_path_buf(),
                        uring: None,
                        size,
                        size_pending: std::sync::atomic::AtomicBool::new(size > 0),
                    }));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !made_dir => {
                    if let Some(dir) = path.parent() {
                        std::fs::create_dir_all(dir).map_err(|e| CacheError::io(dir, e))?;
                    }
                    made_dir = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    // Root could write a read-only file: look before opening.
                    let meta = match std::fs::symlink_metadata(path) {
                        // Deleted meanwhile: create it again.
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        r => r.map_err(|e| CacheError::io(path, e))?,
                    };
                    if is_complete_mode(&meta) {
                        return Ok(None);
                    }
                    let file = match options(false).open(path) {
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        r => r.map_err(|e| CacheError::io(path, e))?,
                    };
                    if meta.len() != size {
                        file.set_len(size).map_err(|e| CacheError::io(path, e))?;
                    }
                    return Ok(Some(ContentFile {
                        file,
                        path: path.to_path_buf(),
                        uring: None,
                        size,
                        size_pending: std::sync::atomic::AtomicBool::new(false),
                    }));
                }
                Err(e) => return Err(CacheError::io(path, e)),
            }
        }
        Err(CacheError::io(
            path,
            std::io::Error::other("the file kept vanishing while being opened"),
        ))
    }

    /// Mark this file complete: every byte written and verified (the
    /// mode of the file, through the open descriptor).
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
        self.prepare_write(offset, data.len() as u64)?;
        match &self.uring {
            Some(u) => u.write_all_at(&self.file, data, offset),
            None => self.file.write_all_at(data, offset),
        }
        .map_err(|e| CacheError::io(&self.path, e))
    }

    /// What [`ContentFile::write_at`] does before it writes `len` bytes at
    /// `offset`, for writers that write [`ContentFile::file`] themselves
    /// ([`crate::rings::Batch`]): the first write into a new file that
    /// does not cover all of it sizes the file first.
    pub fn prepare_write(&self, offset: u64, len: u64) -> Result<(), CacheError> {
        if self
            .size_pending
            .swap(false, std::sync::atomic::Ordering::Relaxed)
            && offset + len != self.size
        {
            self.file
                .set_len(self.size)
                .map_err(|e| CacheError::io(&self.path, e))?;
        }
        Ok(())
    }

    /// A write's error as the cache's (with the file's path).
    pub fn io_error(&self, e: std::io::Error) -> CacheError {
        CacheError::io(&self.path, e)
    }

    /// Read exactly `buf.len()` bytes at `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), CacheError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| CacheError::io(&self.path, e))
    }
}

/// Is this the mode of a complete file ([`crate::COMPLETE_MODE`])?
pub(crate) fn is_complete_mode(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.is_file() && meta.permissions().mode() & 0o777 == crate::COMPLETE_MODE
}

/// Do the first `size` bytes of `content` hash to `digest`, and is that
/// the file's whole length? Read in blocks: files can be large.
pub fn hashes_to(content: &ContentFile, size: u64, digest: &Digest) -> bool {
    const BLOCK: u64 = 1 << 20;
    match content.file.metadata() {
        Ok(m) if m.len() == size => {}
        _ => return false,
    }
    let mut hasher = stargaze_format::digest::Hasher::new();
    let mut buf = vec![0u8; BLOCK.min(size) as usize];
    let mut offset = 0;
    while offset < size {
        let n = BLOCK.min(size - offset) as usize;
        if content.read_at(offset, &mut buf[..n]).is_err() {
            return false;
        }
        hasher.update(&buf[..n]);
        offset += n as u64;
    }
    hasher.finish() == *digest
}

/// Does `content[offset..offset+len]` hash to `digest`? Used to re-verify
/// chunks after an unclean stop, and a layer's chunks over shared content.
pub fn verify_range(content: &ContentFile, offset: u64, len: u64, digest: &Digest) -> bool {
    let Ok(len) = usize::try_from(len) else {
        return false;
    };
    let mut buf = vec![0u8; len];
    content.read_at(offset, &mut buf).is_ok() && Digest::of(&buf) == *digest
}
