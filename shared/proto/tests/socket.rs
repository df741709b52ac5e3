//! A Fetcher server and client over a unix socket, as the services use them.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use stargaze_proto::{Failure, patiently};

use stargaze_proto::v1::fetcher_client::FetcherClient;
use stargaze_proto::v1::fetcher_server::{Fetcher, FetcherServer};
use stargaze_proto::v1::*;
use tonic::{Request, Response, Status};

struct Fake;

#[tonic::async_trait]
impl Fetcher for Fake {
    async fn resolve_layer(
        &self,
        r: Request<ResolveLayerRequest>,
    ) -> Result<Response<ResolveLayerResponse>, Status> {
        let layer = r
            .into_inner()
            .layer
            .ok_or_else(|| Status::invalid_argument("no layer"))?;
        Ok(Response::new(ResolveLayerResponse {
            layer_digest: layer.digest,
            ..Default::default()
        }))
    }
    async fn fetch(&self, _: Request<FetchRequest>) -> Result<Response<FetchResponse>, Status> {
        Err(Status::unimplemented("fetch"))
    }
    // What the fetcher answers when the registry behind it is down.
    async fn prefetch(
        &self,
        _: Request<PrefetchRequest>,
    ) -> Result<Response<PrefetchResponse>, Status> {
        Err(Status::unavailable("registry: 503"))
    }
    async fn warm_layers(
        &self,
        _: Request<WarmLayersRequest>,
    ) -> Result<Response<WarmLayersResponse>, Status> {
        Err(Status::unimplemented("warm_layers"))
    }
    async fn pause_background(
        &self,
        _: Request<PauseBackgroundRequest>,
    ) -> Result<Response<PauseBackgroundResponse>, Status> {
        Err(Status::unimplemented("pause_background"))
    }
    async fn layer_status(
        &self,
        _: Request<LayerStatusRequest>,
    ) -> Result<Response<LayerStatusResponse>, Status> {
        Err(Status::unimplemented("layer_status"))
    }
    async fn image_trace(
        &self,
        _: Request<ImageTraceRequest>,
    ) -> Result<Response<ImageTraceResponse>, Status> {
        Err(Status::unimplemented("image_trace"))
    }
    async fn remember_credentials(
        &self,
        _: Request<RememberCredentialsRequest>,
    ) -> Result<Response<RememberCredentialsResponse>, Status> {
        Err(Status::unimplemented("remember_credentials"))
    }
    async fn note_reads(
        &self,
        _: Request<NoteReadsRequest>,
    ) -> Result<Response<NoteReadsResponse>, Status> {
        Err(Status::unimplemented("note_reads"))
    }
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse {
            cache_dir: "/x".into(),
            ..Default::default()
        }))
    }
}

#[tokio::test]
async fn serves_and_calls_over_a_private_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("run/fetcher.sock");
    let listener = stargaze_proto::bind_unix(&sock).await.unwrap();
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // A second server on the same socket is refused while the first runs.
    assert!(matches!(
        stargaze_proto::bind_unix(&sock).await,
        Err(stargaze_proto::SocketError::InUse { .. })
    ));
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(FetcherServer::new(Fake))
            .serve_with_incoming(stargaze_proto::incoming(listener)),
    );
    let mut client = FetcherClient::new(stargaze_proto::connect_unix(&sock).unwrap());
    let s = client.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(s.cache_dir, "/x");
    let r = client
        .resolve_layer(ResolveLayerRequest {
            layer: Some(LayerSource {
                digest: "sha256:abc".into(),
                ..Default::default()
            }),
            allow_unverified: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.layer_digest, "sha256:abc");
    let e = client.fetch(FetchRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented);
    server.abort();
    let _ = server.await;
    // A stale socket left by a dead server is replaced.
    let again = stargaze_proto::bind_unix(&sock).await;
    assert!(again.is_ok());
}

/// Serve the fake on `sock` until the task is aborted.
async fn serve(sock: &Path) -> tokio::task::JoinHandle<Result<(), tonic::transport::Error>> {
    let listener = stargaze_proto::bind_unix(sock).await.unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(FetcherServer::new(Fake))
            .serve_with_incoming(stargaze_proto::incoming(listener)),
    )
}

#[tokio::test]
async fn a_failure_is_no_answer_only_when_the_client_made_it() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("fetcher.sock");
    let mut client = FetcherClient::new(stargaze_proto::connect_unix(&sock).unwrap());
    // Nothing listens: the client's own status, UNAVAILABLE like the
    // service's own, told apart by its transport error.
    let refused = client.status(StatusRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert_eq!(Failure::of(&refused), Failure::NoAnswer, "{refused:?}");

    let server = serve(&sock).await;
    // The service's UNAVAILABLE, sent over the wire.
    let sent = client
        .prefetch(PrefetchRequest::default())
        .await
        .unwrap_err();
    assert_eq!(sent.message(), "registry: 503");
    assert_eq!(Failure::of(&sent), Failure::Unavailable, "{sent:?}");
    let other = client.fetch(FetchRequest::default()).await.unwrap_err();
    assert_eq!(
        Failure::of(&other),
        Failure::Answered(tonic::Code::Unimplemented)
    );
    assert_eq!(
        Failure::of(&Status::unavailable("made here")),
        Failure::Unavailable
    );
    server.abort();
    let _ = server.await;
}

#[tokio::test]
async fn patiently_waits_for_a_service_that_restarts_and_takes_its_answers_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("fetcher.sock");
    let client = FetcherClient::new(stargaze_proto::connect_unix(&sock).unwrap());

    // Not there for the whole patience: the last status, soon after it.
    let start = Instant::now();
    let r = patiently("fetcher", Duration::from_millis(300), || {
        let mut c = client.clone();
        async move { c.status(StatusRequest {}).await }
    })
    .await;
    assert_eq!(Failure::of(&r.unwrap_err()), Failure::NoAnswer);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );

    // Started while the caller waits: its answer.
    let sock2 = sock.clone();
    let later = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        serve(&sock2).await.abort_handle()
    });
    let calls = AtomicUsize::new(0);
    let r = patiently("fetcher", Duration::from_secs(20), || {
        calls.fetch_add(1, Ordering::Relaxed);
        let mut c = client.clone();
        async move { c.status(StatusRequest {}).await }
    })
    .await;
    assert_eq!(r.unwrap().into_inner().cache_dir, "/x");
    assert!(calls.load(Ordering::Relaxed) > 1);

    // An answer, UNAVAILABLE included, is taken at once.
    calls.store(0, Ordering::Relaxed);
    let r = patiently("fetcher", Duration::from_secs(20), || {
        calls.fetch_add(1, Ordering::Relaxed);
        let mut c = client.clone();
        async move { c.prefetch(PrefetchRequest::default()).await }
    })
    .await;
    assert_eq!(r.unwrap_err().message(), "registry: 503");
    assert_eq!(calls.load(Ordering::Relaxed), 1);
    later.await.unwrap().abort();
}
