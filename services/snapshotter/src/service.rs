//! containerd's `Snapshots` service over the [`Store`].
//!
//! Keys arrive as `<namespace>/<seq>/<name>` (containerd's metadata layer
//! rewrites them), so they are opaque here and namespaces cannot collide.
//! Store calls block on redb and the filesystem, so each runs on the
//! blocking pool.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;

use stargaze_proto::containerd::services::snapshots::v1 as api;
use stargaze_proto::containerd::services::snapshots::v1::snapshots_server::Snapshots;
use tonic::{Request, Response, Status};

use crate::filters::Filter;
use crate::store::{Kind, Record, SnapError, Store, mounts};

/// The snapshots service.
#[derive(Clone)]
pub struct SnapshotService {
    pub store: Arc<Store>,
}

fn timestamp(ns: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ns.div_euclid(1_000_000_000),
        nanos: ns.rem_euclid(1_000_000_000) as i32,
    }
}

pub fn info(key: &str, r: &Record) -> api::Info {
    api::Info {
        name: key.to_string(),
        parent: r.parent.clone(),
        kind: match r.kind {
            Kind::View => api::Kind::View,
            Kind::Active => api::Kind::Active,
            Kind::Committed => api::Kind::Committed,
        } as i32,
        created_at: Some(timestamp(r.created)),
        updated_at: Some(timestamp(r.updated)),
        labels: r.labels.clone().into_iter().collect(),
    }
}

fn labels(l: HashMap<String, String>) -> Result<BTreeMap<String, String>, Status> {
    for (k, v) in &l {
        if k.len() + v.len() > 4096 {
            return Err(Status::invalid_argument(format!(
                "label {k:?} is longer than 4096 bytes with its value"
            )));
        }
    }
    Ok(l.into_iter().collect())
}

impl SnapshotService {
    /// Run a store call on the blocking pool.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, SnapError> + Send + 'static,
    ) -> Result<T, Status> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| Status::internal(format!("snapshotter task failed: {e}")))?
            .map_err(Status::from)
    }
}

type ListStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<api::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Snapshots for SnapshotService {
    async fn prepare(
        &self,
        r: Request<api::PrepareSnapshotRequest>,
    ) -> Result<Response<api::PrepareSnapshotResponse>, Status> {
        let req = r.into_inner();
        let l = labels(req.labels)?;
        let mounts = self
            .run(move |s| {
                let rec = s.create(&req.key, &req.parent, l, Kind::Active)?;
                mounts(s, &rec)
            })
            .await?;
        Ok(Response::new(api::PrepareSnapshotResponse { mounts }))
    }

    async fn view(
        &self,
        r: Request<api::ViewSnapshotRequest>,
    ) -> Result<Response<api::ViewSnapshotResponse>, Status> {
        let req = r.into_inner();
        let l = labels(req.labels)?;
        let mounts = self
            .run(move |s| {
                let rec = s.create(&req.key, &req.parent, l, Kind::View)?;
                mounts(s, &rec)
            })
            .await?;
        Ok(Response::new(api::ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        r: Request<api::MountsRequest>,
    ) -> Result<Response<api::MountsResponse>, Status> {
        let key = r.into_inner().key;
        let mounts = self
            .run(move |s| {
                let rec = s.stat(&key)?;
                if rec.kind == Kind::Committed {
                    return Err(SnapError::FailedPrecondition(format!(
                        "snapshot {key} is committed: mounts exist only for active snapshots and views"
                    )));
                }
                mounts(s, &rec)
            })
            .await?;
        Ok(Response::new(api::MountsResponse { mounts }))
    }

    async fn commit(&self, r: Request<api::CommitSnapshotRequest>) -> Result<Response<()>, Status> {
        let req = r.into_inner();
        let l = labels(req.labels)?;
        self.run(move |s| s.commit(&req.name, &req.key, l)).await?;
        Ok(Response::new(()))
    }

    async fn remove(&self, r: Request<api::RemoveSnapshotRequest>) -> Result<Response<()>, Status> {
        let key = r.into_inner().key;
        self.run(move |s| s.remove(&key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        r: Request<api::StatSnapshotRequest>,
    ) -> Result<Response<api::StatSnapshotResponse>, Status> {
        let key = r.into_inner().key;
        let rec = self
            .run({
                let key = key.clone();
                move |s| s.stat(&key)
            })
            .await?;
        Ok(Response::new(api::StatSnapshotResponse {
            info: Some(info(&key, &rec)),
        }))
    }

    async fn update(
        &self,
        r: Request<api::UpdateSnapshotRequest>,
    ) -> Result<Response<api::UpdateSnapshotResponse>, Status> {
        let req = r.into_inner();
        let i = req
            .info
            .ok_or_else(|| Status::invalid_argument("update without info"))?;
        let paths = req.update_mask.map(|m| m.paths).unwrap_or_default();
        let l = labels(i.labels)?;
        let key = i.name.clone();
        let rec = self
            .run(move |s| s.update_labels(&i.name, l, &paths))
            .await?;
        Ok(Response::new(api::UpdateSnapshotResponse {
            info: Some(info(&key, &rec)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        r: Request<api::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let filter = Filter::parse(&r.into_inner().filters).map_err(Status::from)?;
        let all = self.run(|s| s.all()).await?;
        let infos: Vec<api::Info> = all
            .iter()
            .filter(|(k, rec)| filter.matches(k, &rec.parent, rec.kind, &rec.labels))
            .map(|(k, rec)| info(k, rec))
            .collect();
        // Batches of 100, as containerd's own service sends them.
        let batches: Vec<Result<api::ListSnapshotsResponse, Status>> = infos
            .chunks(100)
            .map(|c| Ok(api::ListSnapshotsResponse { info: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        r: Request<api::UsageRequest>,
    ) -> Result<Response<api::UsageResponse>, Status> {
        let key = r.into_inner().key;
        let (size, inodes) = self.run(move |s| s.usage(&key)).await?;
        Ok(Response::new(api::UsageResponse { size, inodes }))
    }

    async fn cleanup(&self, _: Request<api::CleanupRequest>) -> Result<Response<()>, Status> {
        let n = self.run(|s| s.cleanup()).await?;
        if n > 0 {
            tracing::info!(
                directories = n,
                "cleanup removed directories no snapshot owns"
            );
        }
        Ok(Response::new(()))
    }
}
