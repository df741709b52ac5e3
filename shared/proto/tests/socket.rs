//! A Fetcher server and client over a unix socket, as the services use them.

use std::os::unix::fs::PermissionsExt;

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
    async fn prefetch(
        &self,
        _: Request<PrefetchRequest>,
    ) -> Result<Response<PrefetchResponse>, Status> {
        Err(Status::unimplemented("prefetch"))
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
