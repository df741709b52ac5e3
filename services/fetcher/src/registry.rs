//! Registry blobs as [`RemoteBlob`]s.

use std::ops::Range;

use stargaze_registry::Blob;

use crate::{BlobError, RemoteBlob};

/// A layer blob read from its registry.
pub struct RegistryBlob(pub Blob);

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
