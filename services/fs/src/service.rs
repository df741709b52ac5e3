//! `stargaze.v1.Fs`: attach, detach, list, status.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use stargaze_proto::v1::fs_server::Fs;
use stargaze_proto::v1::*;
use stargaze_service::mountinfo;
use tonic::{Request, Response, Status};

use crate::FsShared;
use crate::layers::AttachError;

/// The fs service's gRPC side.
#[derive(Clone)]
pub struct FsService {
    pub shared: Arc<FsShared>,
    pub mountpoint: PathBuf,
    pub fuse_threads: u32,
}

/// Overlay mounts whose options (lower, upper and work directories) name
/// `dir` or a path under it.
pub fn overlays_using(dir: &Path) -> Vec<String> {
    mountinfo::read()
        .into_iter()
        .filter(|m| m.fstype == "overlay")
        .filter(|m| {
            m.super_options
                .split([',', ':', '='])
                .any(|p| mountinfo::is_under(Path::new(&mountinfo::unescape(p)), dir))
        })
        .map(|m| m.mount_point.display().to_string())
        .collect()
}

impl FsService {
    fn dir_of(&self, name: &str) -> PathBuf {
        self.mountpoint.join(name)
    }
}

/// A layer digest from a request, parsed where it enters: a malformed one
/// (not `sha256:<64 lower-case hex>`) is refused naming it, and never
/// becomes a path in the cache or a name in the mount.
fn request_digest(digest: &str) -> Result<stargaze_format::Digest, AttachError> {
    Ok(digest.parse()?)
}

#[tonic::async_trait]
impl Fs for FsService {
    async fn attach(&self, r: Request<AttachRequest>) -> Result<Response<AttachResponse>, Status> {
        let req = r.into_inner();
        let a = request_digest(&req.layer_digest)
            .and_then(|d| self.shared.layers.attach(&d))
            .map_err(|e| match e {
                AttachError::BadDigest(_) => Status::invalid_argument(e.to_string()),
                _ => Status::failed_precondition(format!(
                    "{e}; resolve the layer with the fetcher first"
                )),
            })?;
        tracing::info!(layer = %a.digest, dir = %self.dir_of(&a.name).display(), "layer attached");
        Ok(Response::new(AttachResponse {
            dir: self.dir_of(&a.name).display().to_string(),
        }))
    }

    async fn detach(&self, r: Request<DetachRequest>) -> Result<Response<DetachResponse>, Status> {
        let req = r.into_inner();
        let digest = request_digest(&req.layer_digest)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // A layer's name in the mount is its digest's hex.
        let name = &digest.hex();
        if self.shared.layers.by_name(name).is_none() {
            return Err(Status::not_found(format!(
                "layer {} is not attached",
                req.layer_digest
            )));
        }
        let users = overlays_using(&self.dir_of(name));
        if !users.is_empty() && !req.force {
            return Err(Status::failed_precondition(format!(
                "layer {} is in use by overlay mounts at {}; unmount them (stop the containers) first",
                req.layer_digest,
                users.join(", ")
            )));
        }
        self.shared.detach(name);
        tracing::info!(layer = %req.layer_digest, "layer detached");
        Ok(Response::new(DetachResponse {}))
    }

    async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let layers = self
            .shared
            .layers
            .list()
            .into_iter()
            .map(|a| AttachedLayer {
                layer_digest: a.digest.to_string(),
                dir: self.dir_of(&a.name).display().to_string(),
                chunks: a.presence.chunk_count(),
                chunks_present: a.presence.count_present(),
                reads: a.stats.reads.load(Ordering::Relaxed),
                read_errors: a.stats.read_errors.load(Ordering::Relaxed),
            })
            .collect();
        Ok(Response::new(ListResponse { layers }))
    }

    async fn status(
        &self,
        _: Request<FsStatusRequest>,
    ) -> Result<Response<FsStatusResponse>, Status> {
        let l = &self.shared.layers;
        let c = &self.shared.counters;
        Ok(Response::new(FsStatusResponse {
            mountpoint: self.mountpoint.display().to_string(),
            layers: l.len() as u32,
            passthrough: self.shared.passthrough.active.load(Ordering::Acquire),
            // Node-wide, including layers detached since.
            bytes_from_cache: c.bytes_from_cache.load(Ordering::Relaxed),
            bytes_after_fetch: c.bytes_after_fetch.load(Ordering::Relaxed),
            fetch_errors: self.shared.fetch_errors.load(Ordering::Relaxed),
            fuse_threads: self.fuse_threads,
            recent_errors: self.shared.errors.list(),
            transport: self
                .shared
                .transport
                .lock()
                .map(|t| t.as_str().to_string())
                .unwrap_or_default(),
            ring_requests: self.shared.uring_requests.load(Ordering::Relaxed),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A digest from a request that is not `sha256:<64 lower-case hex>` is
    /// refused before it names anything in the cache or the mount, with
    /// an error naming it and asking for an invalid argument.
    #[test]
    fn malformed_request_digests_are_refused_naming_them() {
        let hex = "ab".repeat(32);
        for bad in [
            "sha256:../../x".to_string(),
            format!("sha256:../{}", &hex[3..]),
            format!("sha256:{}", &hex[2..]),
            format!("sha256:{}", hex.to_uppercase()),
            hex.clone(),
            format!("sha512:{hex}"),
            String::new(),
        ] {
            let e = request_digest(&bad).unwrap_err();
            assert!(matches!(e, AttachError::BadDigest(_)), "{bad}: {e}");
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
        assert_eq!(request_digest(&format!("sha256:{hex}")).unwrap().hex(), hex);
    }
}
