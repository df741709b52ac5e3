//! CRI's `runtime.v1.ImageService`, served on its own socket for the
//! kubelet (`--image-service-endpoint`) and passed on, call by call, to
//! containerd's CRI plugin. The one thing it adds: the credentials of each
//! `PullImage` go to the fetcher first ([`crate::cri_keychain`]), so that
//! the layers containerd then asks us to prepare can be read lazily from a
//! private registry instead of being downloaded whole by containerd.
//! And on `RemoveImage`, once containerd has removed the image, the
//! credentials of its repositories are forgotten (here and in the
//! fetcher) unless containerd still has another image of the repository.
//!
//! Requests are decoded and re-encoded with the whole vendored CRI proto,
//! so nothing the kubelet sends is lost on the way. Errors from containerd
//! come back unchanged (the kubelet acts on their codes).

use std::path::{Path, PathBuf};
use std::time::Instant;

use stargaze_proto::cri::image_service_client::ImageServiceClient;
use stargaze_proto::cri::image_service_server::{ImageService, ImageServiceServer};
use stargaze_proto::cri::*;
use stargaze_service::metrics::RpcMetricsLayer;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::cri_keychain::Keychain;

/// The proxy: containerd's ImageService behind, the keychain beside.
#[derive(Clone)]
pub struct CriProxy {
    containerd: ImageServiceClient<Channel>,
    containerd_socket: PathBuf,
    keychain: Keychain,
}

impl CriProxy {
    /// A proxy in front of containerd's socket (dialled lazily, and again
    /// after containerd restarts).
    pub fn new(
        containerd_socket: &Path,
        keychain: Keychain,
    ) -> Result<CriProxy, stargaze_proto::SocketError> {
        Ok(CriProxy {
            containerd: ImageServiceClient::new(stargaze_proto::connect_unix(containerd_socket)?),
            containerd_socket: containerd_socket.to_path_buf(),
            keychain,
        })
    }

    /// containerd's answer, or its error with the socket named when it
    /// could not be reached at all (the kubelet logs it).
    fn backend<T>(&self, r: Result<Response<T>, Status>) -> Result<Response<T>, Status> {
        r.map_err(|s| {
            if s.code() == tonic::Code::Unavailable {
                Status::unavailable(format!(
                    "stargaze CRI keychain: containerd's CRI at {} is unavailable: {}; check that containerd runs with its CRI plugin ([cri_keychain] containerd_image_service)",
                    self.containerd_socket.display(),
                    s.message()
                ))
            } else {
                s
            }
        })
    }

    /// Serve on `listener` (bound to `socket` with mode 0600 by
    /// `stargaze_proto::bind_unix`) until the process stops, counting every
    /// call in the keychain's stats.
    pub async fn serve(
        self,
        listener: tokio::net::UnixListener,
        socket: &Path,
    ) -> Result<(), tonic::transport::Error> {
        tracing::info!(
            socket = %socket.display(),
            containerd = %self.containerd_socket.display(),
            ttl = ?self.keychain.ttl(),
            "CRI keychain: serving runtime.v1.ImageService (kubelet --image-service-endpoint=unix://{})",
            socket.display()
        );
        let rpc = self.keychain.stats.rpc.clone();
        tonic::transport::Server::builder()
            .layer(RpcMetricsLayer(rpc))
            .add_service(ImageServiceServer::new(self))
            .serve_with_incoming(stargaze_proto::incoming(listener))
            .await?;
        Ok(())
    }
}

impl CriProxy {
    /// The tags and digests containerd lists for the image `spec` names
    /// (none when it does not know it or cannot be asked).
    async fn image_names(&self, spec: &ImageSpec) -> Vec<String> {
        let answer = self
            .containerd
            .clone()
            .image_status(ImageStatusRequest {
                image: Some(spec.clone()),
                verbose: false,
            })
            .await;
        match answer.map(|a| a.into_inner().image) {
            Ok(Some(image)) => [image.repo_tags, image.repo_digests].concat(),
            Ok(None) => Vec::new(),
            Err(s) => {
                tracing::debug!(
                    image = spec.image,
                    error = s.message(),
                    "CRI keychain: ImageStatus before RemoveImage"
                );
                Vec::new()
            }
        }
    }

    /// After `removed` (an image's names) is gone: forget the pull
    /// credentials of its repositories unless containerd still has
    /// another image of them (then they may be needed again, without a
    /// pull). When containerd's image list cannot be read, nothing is
    /// forgotten: the credentials expire with their TTL as before.
    async fn forget_credentials(&self, removed: &[String]) {
        let remaining = match self
            .containerd
            .clone()
            .list_images(ListImagesRequest { filter: None })
            .await
        {
            Ok(a) => a
                .into_inner()
                .images
                .into_iter()
                .flat_map(|i| i.repo_tags.into_iter().chain(i.repo_digests))
                .collect::<Vec<_>>(),
            Err(s) => {
                tracing::warn!(
                    error = s.message(),
                    "CRI keychain: containerd's image list could not be read after a RemoveImage; the pull credentials are kept until their TTL ends"
                );
                return;
            }
        };
        self.keychain.forget_removed(removed, &remaining).await;
    }
}

#[tonic::async_trait]
impl ImageService for CriProxy {
    async fn list_images(
        &self,
        r: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        let answer = self.containerd.clone().list_images(r.into_inner()).await;
        self.backend(answer)
    }

    type StreamImagesStream = tonic::Streaming<StreamImagesResponse>;

    async fn stream_images(
        &self,
        r: Request<StreamImagesRequest>,
    ) -> Result<Response<Self::StreamImagesStream>, Status> {
        let answer = self.containerd.clone().stream_images(r.into_inner()).await;
        self.backend(answer)
    }

    async fn image_status(
        &self,
        r: Request<ImageStatusRequest>,
    ) -> Result<Response<ImageStatusResponse>, Status> {
        let answer = self.containerd.clone().image_status(r.into_inner()).await;
        self.backend(answer)
    }

    async fn pull_image(
        &self,
        r: Request<PullImageRequest>,
    ) -> Result<Response<PullImageResponse>, Status> {
        let r = r.into_inner();
        let image = r
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default();
        // Before containerd pulls: the layers it prepares next need them.
        let t0 = Instant::now();
        if let Err(e) = self.keychain.remember(&image, r.auth.as_ref()).await {
            tracing::warn!(error = %e, "CRI keychain");
        }
        tracing::debug!(image, took = ?t0.elapsed(), "PullImage passed on to containerd");
        let answer = self.containerd.clone().pull_image(r).await;
        self.backend(answer)
    }

    async fn remove_image(
        &self,
        r: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        let r = r.into_inner();
        // The kubelet names the image by its ID, usually: its names come
        // from containerd, asked before it forgets them.
        let names = match (&r.image, self.keychain.holds_any()) {
            (Some(spec), true) => {
                let mut names = self.image_names(spec).await;
                names.push(spec.image.clone());
                names
            }
            _ => Vec::new(),
        };
        let answer = self.containerd.clone().remove_image(r).await;
        if answer.is_ok() && !names.is_empty() {
            self.forget_credentials(&names).await;
        }
        self.backend(answer)
    }

    async fn image_fs_info(
        &self,
        r: Request<ImageFsInfoRequest>,
    ) -> Result<Response<ImageFsInfoResponse>, Status> {
        let answer = self.containerd.clone().image_fs_info(r.into_inner()).await;
        self.backend(answer)
    }
}
