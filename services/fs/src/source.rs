//! Where missing chunks come from: the fetcher.
//!
//! The FUSE read path only needs "make these bytes of this file present";
//! [`ChunkSource`] says that, [`GrpcFetcher`] does it over the fetcher's
//! socket (retrying while the fetcher restarts), and tests plug the fetcher's
//! engine in directly.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use stargaze_format::Digest;
use stargaze_proto::Failure;
use stargaze_proto::v1::fetcher_client::FetcherClient;
use stargaze_proto::v1::{FetchRequest, FileRange, NoteReadsRequest, Priority};

/// Why a range could not be made present (the read fails with EIO and
/// this is logged with the layer and file).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The fetcher gave no answer (its socket refused, or the connection
    /// broke mid-call) for the whole patience.
    #[error(
        "the fetcher ({socket}) did not answer within {waited:?}; is stargaze-fetcher running?"
    )]
    Unavailable { socket: PathBuf, waited: Duration },
    /// The fetcher answered with an error (its message names the cause),
    /// UNAVAILABLE included: it had retried the registry already.
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
    async fn fetch(
        &self,
        layer: &Digest,
        ino: u64,
        offset: u64,
        len: u64,
    ) -> Result<(), SourceError>;

    /// Best effort: make whole files `(inode, size)` present ahead of any
    /// read. Nobody waits for it and failures are ignored (a later read
    /// fetches on demand).
    async fn prefetch_files(&self, layer: &Digest, files: Vec<(u64, u64)>) {
        let _ = (layer, files);
    }

    /// Best effort: file `ino` of `layer` is being executed; its head and
    /// what it loads (interpreter, libraries) are fetched ahead of the
    /// reads that follow.
    async fn executing(&self, layer: &Digest, ino: u64) {
        let _ = (layer, ino);
    }

    /// Best effort: these ranges `(inode, offset, length)` of `layer` were
    /// read, in this order (`reads.rs`); no layer (and no ranges) only
    /// asks. Returns the fetcher's recording generation, `None` when it
    /// could not be told.
    async fn note_reads(
        &self,
        layer: Option<&Digest>,
        ranges: Vec<(u64, u64, u64)>,
    ) -> Option<u64> {
        let _ = (layer, ranges);
        None
    }
}

/// The fetcher service over its unix socket.
pub struct GrpcFetcher {
    client: FetcherClient<tonic::transport::Channel>,
    socket: PathBuf,
    /// How long reads wait for a fetcher that gives no answer (restarts).
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
    async fn fetch(
        &self,
        layer: &Digest,
        ino: u64,
        offset: u64,
        len: u64,
    ) -> Result<(), SourceError> {
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
        let start = Instant::now();
        // Only a fetcher that gives no answer (it restarts) is waited for.
        // Its own UNAVAILABLE (a registry down, a full cache) comes after
        // it retried the registry: the read fails at once rather than
        // stretching the time until EIO.
        let r = stargaze_proto::patiently("fetcher", self.patience, || {
            let (mut client, req) = (self.client.clone(), req.clone());
            async move { client.fetch(req).await }
        })
        .await;
        match r {
            Ok(_) => Ok(()),
            Err(s) if Failure::of(&s) == Failure::NoAnswer => Err(SourceError::Unavailable {
                socket: self.socket.clone(),
                waited: start.elapsed(),
            }),
            Err(s) => Err(SourceError::Fetch {
                socket: self.socket.clone(),
                code: s.code(),
                message: s.message().to_string(),
            }),
        }
    }

    async fn prefetch_files(&self, layer: &Digest, files: Vec<(u64, u64)>) {
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
            tracing::debug!(%layer, error = %s.message(), "sibling prefetch failed");
        }
    }

    async fn executing(&self, layer: &Digest, ino: u64) {
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
            tracing::debug!(%layer, ino, error = %s.message(), "fetching what an executed file loads failed");
        }
    }

    async fn note_reads(
        &self,
        layer: Option<&Digest>,
        ranges: Vec<(u64, u64, u64)>,
    ) -> Option<u64> {
        // No layer: an empty digest, which the fetcher notes nothing for.
        let layer = layer.map(Digest::to_string).unwrap_or_default();
        let req = NoteReadsRequest {
            layer_digest: layer.clone(),
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
                tracing::debug!(%layer, error = %s.message(), "reporting reads for traces failed");
                None
            }
        }
    }
}

/// Bytes of an executed file's start fetched when it is opened: its
/// headers (the kernel reads them first).
const EXEC_HEAD: u64 = 64 << 10;

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll};

    use super::*;

    /// A fetcher that answers every call with `code`, as the real one does
    /// when the registry behind it stays down. Counts the calls.
    #[derive(Clone)]
    struct Answers {
        code: tonic::Code,
        calls: Arc<AtomicUsize>,
    }

    impl tower_service::Service<http::Request<tonic::body::Body>> for Answers {
        type Response = http::Response<tonic::body::Body>;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<tonic::body::Body>) -> Self::Future {
            self.calls.fetch_add(1, Ordering::Relaxed);
            let s = tonic::Status::new(self.code, "registry: 503 after 4 tries");
            std::future::ready(Ok(s.into_http()))
        }
    }

    impl tonic::server::NamedService for Answers {
        const NAME: &'static str = "stargaze.v1.Fetcher";
    }

    /// Serve `answers` on `sock` until the task is aborted.
    async fn serve(sock: &std::path::Path, answers: Answers) -> tokio::task::JoinHandle<()> {
        let listener = stargaze_proto::bind_unix(sock).await.unwrap();
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(answers)
                .serve_with_incoming(stargaze_proto::incoming(listener))
                .await;
        })
    }

    #[tokio::test]
    async fn the_fetchers_own_unavailable_fails_the_read_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("fetcher.sock");
        let calls = Arc::new(AtomicUsize::new(0));
        let server = serve(
            &sock,
            Answers {
                code: tonic::Code::Unavailable,
                calls: calls.clone(),
            },
        )
        .await;
        let mut fetcher = GrpcFetcher::new(&sock).unwrap();
        fetcher.patience = Duration::from_secs(10);
        let start = Instant::now();
        let e = fetcher
            .fetch(&Digest([0xab; 32]), 3, 0, 4096)
            .await
            .unwrap_err();
        let took = start.elapsed();
        assert!(
            matches!(
                e,
                SourceError::Fetch {
                    code: tonic::Code::Unavailable,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("registry: 503"), "{e}");
        assert!(took < Duration::from_secs(1), "took {took:?}");
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        server.abort();
    }

    #[tokio::test]
    async fn a_fetcher_that_restarts_is_waited_for_and_one_that_stays_away_is_not_forever() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("fetcher.sock");
        let mut fetcher = GrpcFetcher::new(&sock).unwrap();

        // Nobody listens for the whole patience.
        fetcher.patience = Duration::from_millis(300);
        let start = Instant::now();
        let e = fetcher
            .fetch(&Digest([0xab; 32]), 3, 0, 4096)
            .await
            .unwrap_err();
        assert!(matches!(e, SourceError::Unavailable { .. }), "{e}");
        assert!(start.elapsed() < Duration::from_secs(2));

        // It comes back while the read waits: the read gets its answer.
        fetcher.patience = Duration::from_secs(20);
        let calls = Arc::new(AtomicUsize::new(0));
        let answers = Answers {
            code: tonic::Code::NotFound,
            calls: calls.clone(),
        };
        let s = sock.clone();
        let later = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            serve(&s, answers).await.abort_handle()
        });
        let e = fetcher
            .fetch(&Digest([0xab; 32]), 3, 0, 4096)
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                SourceError::Fetch {
                    code: tonic::Code::NotFound,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        later.await.unwrap().abort();
    }
}
