//! Where missing chunks come from: the fetcher.
//!
//! The FUSE read path only needs "make these bytes of this file present";
//! [`ChunkSource`] says that, [`GrpcFetcher`] does it over the fetcher's
//! socket (retrying while the fetcher restarts), and tests plug the fetcher's
//! engine in directly.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use stargaze_proto::v1::fetcher_client::FetcherClient;
use stargaze_proto::v1::{FetchRequest, FileRange, NoteReadsRequest, Priority};

/// Why a range could not be made present (the read fails with EIO and
/// this is logged with the layer and file).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The fetcher's socket did not answer for the whole patience.
    #[error(
        "the fetcher ({socket}) did not answer within {waited:?}; is stargaze-fetcher running?"
    )]
    Unavailable { socket: PathBuf, waited: Duration },
    /// The fetcher answered with an error (its message names the cause).
    #[error("fetcher ({socket}): {message} ({code:?})")]
    Fetch {
        socket: PathBuf,
        code: tonic::Code,
        message: String,
    },
    /// An in-process source (the fetcher's engine in tests) failed.
    #[error(transparent)]
    InProcess(Box<dyn std::error::Error + Send + Sync>),
}

/// Makes file ranges of attached layers present in the cache.
#[tonic::async_trait]
pub trait ChunkSource: Send + Sync + 'static {
    /// Bytes `[offset, offset + len)` of inode `ino` (the layer index's
    /// numbering) of `layer`. Returns when they are present.
    async fn fetch(&self, layer: &str, ino: u64, offset: u64, len: u64) -> Result<(), SourceError>;

    /// Best effort: make whole files `(inode, size)` present ahead of any
    /// read. Nobody waits for it and failures are ignored (a later read
    /// fetches on demand).
    async fn prefetch_files(&self, layer: &str, files: Vec<(u64, u64)>) {
        let _ = (layer, files);
    }

    /// Best effort: file `ino` of `layer` is being executed; its head and
    /// what it loads (interpreter, libraries) are fetched ahead of the
    /// reads that follow.
    async fn executing(&self, layer: &str, ino: u64) {
        let _ = (layer, ino);
    }

    /// Best effort: these ranges `(inode, offset, length)` of `layer` were
    /// read, in this order (`reads.rs`). Returns the fetcher's recording
    /// generation, `None` when it could not be told.
    async fn note_reads(&self, layer: &str, ranges: Vec<(u64, u64, u64)>) -> Option<u64> {
        let _ = (layer, ranges);
        None
    }
}

/// The fetcher service over its unix socket.
pub struct GrpcFetcher {
    client: FetcherClient<tonic::transport::Channel>,
    socket: PathBuf,
    /// How long reads wait for a fetcher that is restarting.
    pub patience: Duration,
}

impl GrpcFetcher {
    pub fn new(socket: &std::path::Path) -> Result<GrpcFetcher, stargaze_proto::SocketError> {
        Ok(GrpcFetcher {
            client: FetcherClient::new(stargaze_proto::connect_unix(socket)?),
            socket: socket.to_path_buf(),
            patience: Duration::from_secs(30),
        })
    }
}

#[tonic::async_trait]
impl ChunkSource for GrpcFetcher {
    async fn fetch(&self, layer: &str, ino: u64, offset: u64, len: u64) -> Result<(), SourceError> {
        let start = Instant::now();
        let mut wait = Duration::from_millis(50);
        loop {
            let req = FetchRequest {
                layer_digest: layer.to_string(),
                ranges: vec![FileRange {
                    inode: ino,
                    offset,
                    length: len,
                }],
                priority: Priority::OnDemand as i32,
                follow_loads: false,
            };
            match self.client.clone().fetch(req).await {
                Ok(_) => return Ok(()),
                // The fetcher is restarting: wait for it, within reason.
                Err(s)
                    if s.code() == tonic::Code::Unavailable && start.elapsed() < self.patience =>
                {
                    tracing::debug!(socket = %self.socket.display(), "waiting for the fetcher");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
                Err(s) if s.code() == tonic::Code::Unavailable => {
                    return Err(SourceError::Unavailable {
                        socket: self.socket.clone(),
                        waited: start.elapsed(),
                    });
                }
                Err(s) => {
                    return Err(SourceError::Fetch {
                        socket: self.socket.clone(),
                        code: s.code(),
                        message: s.message().to_string(),
                    });
                }
            }
        }
    }

    async fn prefetch_files(&self, layer: &str, files: Vec<(u64, u64)>) {
        let req = FetchRequest {
            layer_digest: layer.to_string(),
            ranges: files
                .into_iter()
                .map(|(inode, length)| FileRange {
                    inode,
                    offset: 0,
                    length,
                })
                .collect(),
            priority: Priority::Prefetch as i32,
            follow_loads: false,
        };
        if let Err(s) = self.client.clone().fetch(req).await {
            tracing::debug!(layer, error = %s.message(), "sibling prefetch failed");
        }
    }

    async fn executing(&self, layer: &str, ino: u64) {
        let req = FetchRequest {
            layer_digest: layer.to_string(),
            ranges: vec![FileRange {
                inode: ino,
                offset: 0,
                length: EXEC_HEAD,
            }],
            priority: Priority::OnDemand as i32,
            follow_loads: true,
        };
        if let Err(s) = self.client.clone().fetch(req).await {
            tracing::debug!(layer, ino, error = %s.message(), "fetching what an executed file loads failed");
        }
    }

    async fn note_reads(&self, layer: &str, ranges: Vec<(u64, u64, u64)>) -> Option<u64> {
        let req = NoteReadsRequest {
            layer_digest: layer.to_string(),
            ranges: ranges
                .into_iter()
                .map(|(inode, offset, length)| FileRange {
                    inode,
                    offset,
                    length,
                })
                .collect(),
        };
        match self.client.clone().note_reads(req).await {
            Ok(r) => Some(r.into_inner().generation),
            Err(s) => {
                tracing::debug!(layer, error = %s.message(), "reporting reads for traces failed");
                None
            }
        }
    }
}

/// Bytes of an executed file's start fetched when it is opened: its
/// headers (the kernel reads them first).
const EXEC_HEAD: u64 = 64 << 10;
