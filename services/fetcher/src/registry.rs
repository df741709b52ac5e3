//! Registry blobs as [`RemoteBlob`]s.

use std::ops::Range;

use stargaze_registry::Blob;

use crate::{BlobError, RemoteBlob};

/// A layer blob read from its registry.
pub struct RegistryBlob(pub Blob);

/// The size and last bytes of a blob, read ahead of resolving its layer,
/// with the blob handle that read them (it keeps the probed endpoint and
/// size, so later reads skip the probe).
pub struct Tail {
    pub blob: std::sync::Arc<RegistryBlob>,
    pub size: u64,
    pub start: u64,
    pub bytes: Vec<u8>,
}

impl Tail {
    /// Read the last `window` bytes of `blob`: one suffix-range request
    /// that also tells the size (two where the registry ignores those).
    pub async fn read(blob: RegistryBlob, window: u64) -> Result<Tail, BlobError> {
        let (size, start, bytes) = blob.0.read_tail(window).await.map_err(|e| BlobError {
            blob: blob.0.name(),
            retryable: e.is_transient(),
            message: e.to_string(),
        })?;
        Ok(Tail {
            blob: std::sync::Arc::new(blob),
            size,
            start,
            bytes: bytes.to_vec(),
        })
    }
}

/// A registry blob whose tail was read ahead: reads inside it cost no
/// request until [`WarmBlob::forget_tail`] (after resolution, so that a
/// node with many layers does not keep their tails in memory).
pub struct WarmBlob {
    pub blob: std::sync::Arc<RegistryBlob>,
    tail: std::sync::Mutex<Option<std::sync::Arc<Tail>>>,
}

impl WarmBlob {
    pub fn new(blob: std::sync::Arc<RegistryBlob>, tail: Option<std::sync::Arc<Tail>>) -> WarmBlob {
        WarmBlob {
            blob,
            tail: std::sync::Mutex::new(tail),
        }
    }

    pub fn forget_tail(&self) {
        *self.tail.lock().expect("tail") = None;
    }

    fn tail(&self) -> Option<std::sync::Arc<Tail>> {
        self.tail.lock().expect("tail").clone()
    }
}

#[tonic::async_trait]
impl RemoteBlob for WarmBlob {
    fn name(&self) -> String {
        self.blob.name()
    }

    async fn size(&self) -> Result<u64, BlobError> {
        match self.tail() {
            Some(t) => Ok(t.size),
            None => self.blob.size().await,
        }
    }

    async fn read_ranges(&self, ranges: &[Range<u64>]) -> Result<Vec<Vec<u8>>, BlobError> {
        if let Some(t) = self.tail()
            && t.bytes.len() as u64 == t.size - t.start
            && ranges.iter().all(|r| r.start >= t.start && r.end <= t.size)
        {
            return Ok(ranges
                .iter()
                .map(|r| t.bytes[(r.start - t.start) as usize..(r.end - t.start) as usize].to_vec())
                .collect());
        }
        self.blob.read_ranges(ranges).await
    }
}

#[tonic::async_trait]
impl RemoteBlob for RegistryBlob {
    fn name(&self) -> String {
        self.0.name()
    }

    async fn size(&self) -> Result<u64, BlobError> {
        self.0.size().await.map_err(|e| BlobError {
            blob: self.0.name(),
            retryable: e.is_transient(),
            message: e.to_string(),
        })
    }

    async fn read_ranges(&self, ranges: &[Range<u64>]) -> Result<Vec<Vec<u8>>, BlobError> {
        match self.0.read_ranges(ranges).await {
            Ok(parts) => Ok(parts.into_iter().map(|b| b.to_vec()).collect()),
            Err(e) => Err(BlobError {
                blob: self.0.name(),
                retryable: e.is_transient(),
                message: e.to_string(),
            }),
        }
    }
}
