//! Where layer bytes come from.
//!
//! The engine reads a blob only through [`RemoteBlob`]: its size and several
//! byte ranges at once (one HTTP request with a multi-range header for a
//! registry). [`FileBlob`] serves a local file the same way, for tests, the
//! benchmarks and `stargaze inspect`-style tools; it counts requests so
//! tests can check how reads were merged.

use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

/// A failed read of a blob; `retryable` says whether trying again may help.
#[derive(Debug, Clone, thiserror::Error)]
#[error("blob {blob}: {message}")]
pub struct BlobError {
    pub blob: String,
    pub message: String,
    pub retryable: bool,
}

/// A layer blob that can be read by ranges.
#[tonic::async_trait]
pub trait RemoteBlob: Send + Sync + 'static {
    /// A name for messages: registry, repository and digest.
    fn name(&self) -> String;
    async fn size(&self) -> Result<u64, BlobError>;
    /// Read every range, in order; implementations use as few requests as
    /// the transport allows. Each returned buffer has exactly its range's length.
    async fn read_ranges(&self, ranges: &[Range<u64>]) -> Result<Vec<Bytes>, BlobError>;

    /// [`RemoteBlob::read_ranges`], handing the bytes on as they arrive:
    /// `sink(range index, bytes)`, each range's bytes in order, so that a
    /// reader can decode the start of a range while the rest is on the
    /// wire. `ends[i]` are blob offsets inside range `i` (ascending) where
    /// the reader's units end: a transport that can, cuts its pieces there
    /// as soon as the bytes up to one are in, so that no unit straddles two
    /// pieces. Transports that cannot stream hand each range on whole (the
    /// default). After an error, what was handed on is still valid.
    async fn stream_ranges(
        &self,
        ranges: &[Range<u64>],
        ends: &[Vec<u64>],
        sink: &mut (dyn FnMut(usize, Bytes) + Send),
    ) -> Result<(), BlobError> {
        let _ = ends;
        for (i, bytes) in self.read_ranges(ranges).await?.into_iter().enumerate() {
            sink(i, bytes);
        }
        Ok(())
    }

    /// The blob's size and its last `n` bytes (all of it when smaller);
    /// a tail read ahead may hand over more than `n`.
    /// Transports that can do both in one request override this.
    async fn read_tail(&self, n: u64) -> Result<(u64, Vec<u8>), BlobError> {
        let size = self.size().await?;
        let start = size - n.min(size);
        if start == size {
            return Ok((size, Vec::new()));
        }
        let tail = self
            .read_ranges(std::slice::from_ref(&(start..size)))
            .await?
            .pop()
            .unwrap_or_default();
        Ok((size, tail.to_vec()))
    }
}

/// A blob in a local file.
pub struct FileBlob {
    path: PathBuf,
    file: std::fs::File,
    requests: AtomicU64,
    bytes: AtomicU64,
    /// Bytes per piece of [`RemoteBlob::stream_ranges`]; whole ranges
    /// unless a test asks for pieces (a local read is done at once: nothing
    /// to overlap, and whole ranges let every member be a view, not a copy).
    piece: Option<usize>,
}

impl FileBlob {
    pub fn open(path: &Path) -> std::io::Result<FileBlob> {
        Ok(FileBlob {
            path: path.to_path_buf(),
            file: std::fs::File::open(path)?,
            requests: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            piece: None,
        })
    }

    /// Stream ranges in pieces of `piece` bytes (tests use odd sizes so
    /// that members straddle pieces).
    pub fn with_piece_size(mut self, piece: usize) -> FileBlob {
        self.piece = Some(piece.max(1));
        self
    }

    /// `read_ranges` calls so far (one would be one HTTP request).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

#[tonic::async_trait]
impl RemoteBlob for FileBlob {
    fn name(&self) -> String {
        self.path.display().to_string()
    }

    async fn size(&self) -> Result<u64, BlobError> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| BlobError {
                blob: self.name(),
                message: e.to_string(),
                retryable: false,
            })
    }

    async fn read_ranges(&self, ranges: &[Range<u64>]) -> Result<Vec<Bytes>, BlobError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut out = Vec::with_capacity(ranges.len());
        for r in ranges {
            let len = usize::try_from(r.end.saturating_sub(r.start)).unwrap_or(usize::MAX);
            let mut buf = vec![0u8; len];
            self.file
                .read_exact_at(&mut buf, r.start)
                .map_err(|e| BlobError {
                    blob: self.name(),
                    message: format!("range {}-{}: {e}", r.start, r.end),
                    retryable: false,
                })?;
            self.bytes.fetch_add(len as u64, Ordering::Relaxed);
            out.push(Bytes::from(buf));
        }
        Ok(out)
    }

    /// Whole ranges, or pieces of a fixed size whatever `ends` says: tests
    /// use odd sizes so that members straddle pieces and must be joined.
    async fn stream_ranges(
        &self,
        ranges: &[Range<u64>],
        _ends: &[Vec<u64>],
        sink: &mut (dyn FnMut(usize, Bytes) + Send),
    ) -> Result<(), BlobError> {
        for (i, bytes) in self.read_ranges(ranges).await?.into_iter().enumerate() {
            let mut at = 0;
            while at < bytes.len() {
                let n = self.piece.unwrap_or(usize::MAX).min(bytes.len() - at);
                sink(i, bytes.slice(at..at + n));
                at += n;
            }
        }
        Ok(())
    }
}
