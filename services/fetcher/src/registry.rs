//! Registry blobs as [`RemoteBlob`]s.

use std::ops::Range;
use std::sync::Arc;

use parking_lot::Mutex;
use stargaze_registry::Blob;

use crate::blob::{BlobError, RemoteBlob};

/// A layer blob read from its registry.
pub struct RegistryBlob(pub Blob);

impl RegistryBlob {
    fn error(&self, e: stargaze_registry::RegistryError) -> BlobError {
        BlobError {
            blob: self.0.name(),
            retryable: e.is_transient(),
            message: e.to_string(),
        }
    }
}

/// A layer's tail read ahead by `WarmLayers`, with the blob handle that
/// read it (probed: later reads skip the probe).
pub struct WarmTail {
    pub blob: Arc<RegistryBlob>,
    pub size: u64,
    pub bytes: Vec<u8>,
}

/// A registry blob whose first tail read is answered from a [`WarmTail`],
/// which it then lets go of (a node with many layers keeps no tails).
pub struct WarmBlob {
    blob: Arc<RegistryBlob>,
    tail: Mutex<Option<Arc<WarmTail>>>,
}

impl WarmBlob {
    pub fn new(tail: Arc<WarmTail>) -> WarmBlob {
        WarmBlob {
            blob: tail.blob.clone(),
            tail: Mutex::new(Some(tail)),
        }
    }
}

#[tonic::async_trait]
impl RemoteBlob for WarmBlob {
    fn name(&self) -> String {
        self.blob.name()
    }

    async fn size(&self) -> Result<u64, BlobError> {
        self.blob.size().await
    }

    async fn read_ranges(&self, ranges: &[Range<u64>]) -> Result<Vec<bytes::Bytes>, BlobError> {
        self.blob.read_ranges(ranges).await
    }

    async fn stream_ranges(
        &self,
        ranges: &[Range<u64>],
        ends: &[Vec<u64>],
        sink: &mut (dyn FnMut(usize, bytes::Bytes) + Send),
    ) -> Result<(), BlobError> {
        self.blob.stream_ranges(ranges, ends, sink).await
    }

    /// At least the last `n` bytes: all that was read ahead when that is
    /// more (a window sized by the TOC's last known size).
    async fn read_tail(&self, n: u64) -> Result<(u64, Vec<u8>), BlobError> {
        let warm = self.tail.lock().take();
        match warm {
            Some(t) if t.bytes.len() as u64 >= n.min(t.size) => Ok((t.size, t.bytes.clone())),
            _ => self.blob.read_tail(n).await,
        }
    }
}

#[tonic::async_trait]
impl RemoteBlob for RegistryBlob {
    fn name(&self) -> String {
        self.0.name()
    }

    async fn size(&self) -> Result<u64, BlobError> {
        self.0.size().await.map_err(|e| self.error(e))
    }

    /// One suffix-range request on a fresh handle (see `Blob::read_tail`).
    async fn read_tail(&self, n: u64) -> Result<(u64, Vec<u8>), BlobError> {
        let (size, _, bytes) = self.0.read_tail(n).await.map_err(|e| self.error(e))?;
        Ok((size, bytes.to_vec()))
    }

    async fn read_ranges(&self, ranges: &[Range<u64>]) -> Result<Vec<bytes::Bytes>, BlobError> {
        match self.0.read_ranges(ranges).await {
            Ok(parts) => Ok(parts),
            Err(e) => Err(self.error(e)),
        }
    }

    /// Pieces cut at member ends: each member is handed on the moment its
    /// last byte is in, as a view of the answer's buffer (never copied).
    async fn stream_ranges(
        &self,
        ranges: &[Range<u64>],
        ends: &[Vec<u64>],
        sink: &mut (dyn FnMut(usize, bytes::Bytes) + Send),
    ) -> Result<(), BlobError> {
        self.0
            .stream_ranges(ranges, ends, sink)
            .await
            .map_err(|e| self.error(e))
    }
}
