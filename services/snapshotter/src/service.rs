//! containerd's `Snapshots` service over the [`Store`].
//!
//! Keys arrive as `<namespace>/<seq>/<name>` (containerd's metadata layer
//! rewrites them), so they are opaque here and namespaces cannot collide.
//! Store calls block on redb and the filesystem, so each runs on the
//! blocking pool.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use stargaze_proto::containerd::services::snapshots::v1 as api;
use stargaze_proto::containerd::services::snapshots::v1::snapshots_server::Snapshots;
use tonic::{Request, Response, Status};

use crate::filters::Filter;
use crate::remote::{REMOTE_LABEL, REMOTE_LABEL_VALUE, Remote, TARGET_LABEL, layer_from_labels};
use crate::stats::SnapshotterStats;
use crate::store::{Kind, Record, SnapError, Store, mounts};

/// The snapshots service.
#[derive(Clone)]
pub struct SnapshotService {
    pub store: Arc<Store>,
    /// The fetcher and fs services; `None` serves ordinary snapshots only.
    pub remote: Option<Arc<Remote>>,
    /// Layers whose fallback reason was already logged at warn level.
    warned: Arc<Mutex<HashSet<String>>>,
    /// Layer lists already warmed (image reference and digests).
    warmed: Arc<Mutex<HashSet<String>>>,
    /// Held shared while a layer is attached and its snapshot recorded, and
    /// exclusively while Cleanup detaches unused layers, so Cleanup never
    /// detaches a layer between its attach and its record.
    attach_lock: Arc<tokio::sync::RwLock<()>>,
    /// Counters and recent errors for `stargaze status` and Prometheus.
    pub stats: Arc<SnapshotterStats>,
}

/// Upper bound on resolving and attaching one layer in Prepare; past it the
/// layer is unpacked normally (the fetcher has its own per-request limits).
const REMOTE_PREPARE_TIMEOUT: Duration = Duration::from_secs(120);

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
    pub fn new(store: Arc<Store>, remote: Option<Arc<Remote>>) -> SnapshotService {
        SnapshotService {
            store,
            remote,
            warned: Arc::default(),
            warmed: Arc::default(),
            attach_lock: Arc::default(),
            stats: Arc::default(),
        }
    }

    /// Try to prepare `key` as a remote snapshot committed under its target
    /// name. `Ok(Some(target))` when done (the caller answers AlreadyExists),
    /// `Ok(None)` to fall back to an ordinary snapshot.
    async fn prepare_remote(
        &self,
        key: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Option<String>, Status> {
        let (Some(remote), Some(target)) = (&self.remote, labels.get(TARGET_LABEL)) else {
            return Ok(None);
        };
        let Some(layer) = layer_from_labels(labels) else {
            return Ok(None);
        };
        // Parents must be served before a child can stack on them.
        if !parent.is_empty() {
            self.ensure_served(parent).await?;
        }
        // The first layer's Prepare names the image's layers: read their
        // TOCs ahead, once per image, while containerd goes layer by layer.
        if !layer.layers.is_empty() {
            let first = {
                let mut warmed = self.warmed.lock();
                if warmed.len() >= 4096 {
                    warmed.clear();
                }
                warmed.insert(format!("{} {}", layer.image_ref, layer.layers.join(",")))
            };
            if first {
                remote.warm(&layer.image_ref, &layer.layers).await;
            }
        }
        let _guard = self.attach_lock.read().await;
        let mounted = tokio::time::timeout(REMOTE_PREPARE_TIMEOUT, remote.mount(&layer, labels))
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "no answer within {}s",
                    REMOTE_PREPARE_TIMEOUT.as_secs()
                ))
            });
        let dir = match mounted {
            Ok(dir) => dir,
            Err(reason) => {
                self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
                self.stats.errors.push(
                    layer.digest.clone(),
                    format!(
                        "image {}: unpacked instead of lazily pulled: {reason}",
                        layer.image_ref
                    ),
                );
                let first = self.warned.lock().insert(layer.digest.clone());
                if first {
                    tracing::warn!(
                        key, layer = %layer.digest, image = %layer.image_ref, %reason,
                        remote_snapshot_prepared = false,
                        "layer cannot be pulled lazily; containerd unpacks it instead"
                    );
                } else {
                    tracing::debug!(key, layer = %layer.digest, %reason, remote_snapshot_prepared = false, "unpacking layer");
                }
                return Ok(None);
            }
        };
        let mut l = labels.clone();
        l.insert(REMOTE_LABEL.into(), REMOTE_LABEL_VALUE.into());
        let (target2, parent2) = (target.clone(), parent.to_string());
        let created = self
            .run(move |s| s.create_remote(&target2, &parent2, l, &dir))
            .await;
        match created {
            Ok(_) => {}
            // Another unpack of the same chain won the race: that is success too.
            Err(e) if e.code() == tonic::Code::AlreadyExists => {}
            Err(e) => {
                tracing::warn!(key, layer = %layer.digest, reason = %e.message(), remote_snapshot_prepared = false, "cannot record remote snapshot; containerd unpacks the layer instead");
                self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
                self.stats.errors.push(
                    layer.digest.clone(),
                    format!("cannot record remote snapshot: {}", e.message()),
                );
                return Ok(None);
            }
        }
        tracing::info!(key, target = %target, layer = %layer.digest, remote_snapshot_prepared = true, "remote snapshot prepared");
        self.stats.remote_prepared.fetch_add(1, Ordering::Relaxed);
        Ok(Some(target.clone()))
    }

    /// Make sure every remote layer in the chain ending at `key` (inclusive)
    /// is served, re-attaching layers the fs service lost (it restarted, or
    /// the node rebooted).
    /// Re-attach the remote layers of `key`'s chain that are not served
    /// (after an fs restart); returns their layer digests, top first.
    async fn ensure_served(&self, key: &str) -> Result<Vec<String>, Status> {
        let Some(remote) = &self.remote else {
            return Ok(Vec::new());
        };
        let key2 = key.to_string();
        let chain = self
            .run(move |s| {
                let r = s.stat(&key2)?;
                let mut chain = s.parents(&r)?;
                chain.insert(0, (key2, r));
                Ok(chain)
            })
            .await?;
        let served = self.served(chain.iter().map(|(_, r)| r)).await;
        let stack: Vec<String> = chain
            .iter()
            .filter(|(_, r)| r.remote_dir.is_some())
            .filter_map(|(_, r)| layer_from_labels(&r.labels).map(|l| l.digest))
            .collect();
        for ((k, r), served) in chain.into_iter().zip(served) {
            if served || r.remote_dir.is_none() {
                continue;
            }
            let layer = layer_from_labels(&r.labels).ok_or_else(|| {
                Status::internal(format!(
                    "remote snapshot {k} has no layer labels; remove the image and pull it again"
                ))
            })?;
            let _guard = self.attach_lock.read().await;
            let new_dir = tokio::time::timeout(REMOTE_PREPARE_TIMEOUT, remote.mount(&layer, &r.labels))
                .await
                .unwrap_or_else(|_| Err("no answer".into()))
                .map_err(|reason| {
                    let msg = format!(
                        "layer {} of {} (snapshot {k}) is not served and cannot be re-attached: {reason}; check stargaze-fetcher and stargaze-fs",
                        layer.digest, layer.image_ref
                    );
                    self.stats.errors.push(k.clone(), msg.clone());
                    Status::unavailable(msg)
                })?;
            self.stats.reattached.fetch_add(1, Ordering::Relaxed);
            tracing::info!(snapshot = %k, layer = %layer.digest, dir = %new_dir, "remote layer re-attached");
            // Records the dir (it may have moved) and re-points the link.
            self.run(move |s| s.set_remote_dir(&k, &new_dir)).await?;
        }
        Ok(stack)
    }

    /// Whether each snapshot's tree answers: always for ordinary snapshots;
    /// for remote ones, one blocking check for all of them, the stat of the
    /// `snapshots/<id>/fs` link (it covers the link and the layer dir: ENOENT
    /// after an fs restart, ENOTCONN on a dead mount).
    pub(crate) async fn served<'a>(&self, records: impl Iterator<Item = &'a Record>) -> Vec<bool> {
        let links: Vec<Option<PathBuf>> = records
            .map(|r| r.remote_dir.as_ref().map(|_| self.store.fs_dir(r)))
            .collect();
        let n = links.len();
        let check = tokio::task::spawn_blocking(move || {
            links
                .iter()
                .map(|l| {
                    l.as_ref()
                        .is_none_or(|l| std::fs::metadata(l).is_ok_and(|m| m.is_dir()))
                })
                .collect::<Vec<bool>>()
        });
        // A hung FUSE server blocks stat: then every remote layer counts as lost.
        match tokio::time::timeout(Duration::from_secs(5), check).await {
            Ok(Ok(v)) => v,
            _ => vec![false; n],
        }
    }

    /// Re-attach every remote layer recorded in the database (at start).
    pub async fn restore(&self) {
        if self.remote.is_none() {
            return;
        }
        let Ok(all) = self.run(|s| s.all()).await else {
            return;
        };
        let (mut ok, mut failed) = (0, 0);
        for (k, r) in all {
            if r.remote_dir.is_none() {
                continue;
            }
            match self.ensure_served(&k).await {
                Ok(_) => ok += 1,
                Err(e) => {
                    failed += 1;
                    tracing::warn!(snapshot = %k, error = %e.message(), "cannot restore remote snapshot; it is retried when a container uses it");
                }
            }
        }
        if ok + failed > 0 {
            tracing::info!(restored = ok, failed, "remote snapshots restored");
        }
    }

    /// Detach fs layers that no snapshot uses any more.
    async fn detach_unused(&self) -> Result<(), Status> {
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        let _guard = self.attach_lock.write().await;
        let all = self.run(|s| s.all()).await?;
        let used: HashSet<String> = all
            .iter()
            .filter(|(_, r)| r.remote_dir.is_some())
            .filter_map(|(_, r)| layer_from_labels(&r.labels).map(|l| l.digest))
            .collect();
        let attached = match remote.attached().await {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e.message(), "fs service not reachable; no layers detached");
                return Ok(());
            }
        };
        for digest in attached.into_iter().filter(|d| !used.contains(d)) {
            match remote.detach(&digest).await {
                Ok(()) => tracing::info!(layer = %digest, "detached unused layer"),
                Err(e) => {
                    tracing::info!(layer = %digest, reason = %e.message(), "unused layer stays attached")
                }
            }
        }
        Ok(())
    }

    /// Run a store call on the blocking pool.
    pub(crate) async fn run<T: Send + 'static>(
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
        if let Some(target) = self.prepare_remote(&req.key, &req.parent, &l).await? {
            // containerd's unpacker takes AlreadyExists as "the layer is there".
            return Err(Status::already_exists(format!(
                "target snapshot {target:?}: already exists"
            )));
        }
        let stack = if req.parent.is_empty() {
            Vec::new()
        } else {
            self.ensure_served(&req.parent).await?
        };
        if let Some(remote) = &self.remote {
            // A container (or an unpack) starts now: without waiting, ask
            // the fetcher to keep background fetches out of its way, and
            // tell it the layers the container's programs load from.
            let (remote, key) = (remote.clone(), req.key.clone());
            tokio::spawn(async move { remote.pause_background(&key, stack).await });
        }
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
        if !req.parent.is_empty() {
            self.ensure_served(&req.parent).await?;
        }
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
        self.ensure_served(&key).await?;
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
        self.detach_unused().await?;
        if n > 0 {
            tracing::info!(
                directories = n,
                "cleanup removed directories no snapshot owns"
            );
        }
        Ok(Response::new(()))
    }
}
