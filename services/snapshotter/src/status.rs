//! What the snapshotter counts, for operators: `stargaze.v1.Snapshotter`
//! (`stargaze status`) on the snapshotter's socket next to containerd's
//! Snapshots service, and its Prometheus text.
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `stargaze_snapshotter_snapshots` | kind | snapshots in the database (`active`, `view`, `committed`, `remote`) |
//! | `stargaze_snapshotter_remote_prepared_total` | | layers mounted lazily (Prepare answered with a remote snapshot) |
//! | `stargaze_snapshotter_fallbacks_total` | | layers with lazy-pull labels that containerd had to unpack |
//! | `stargaze_snapshotter_reattached_total` | | remote layers re-attached after fs lost them (restart, reboot) |
//! | `stargaze_snapshotter_grpc_requests_total` | method, code | requests from containerd and `stargaze status` |
//! | `stargaze_snapshotter_grpc_request_duration_seconds` | method | their latency |
//! | `stargaze_snapshotter_cri_credentials` | | repositories whose pull credentials the fetcher keeps (CRI keychain; not expired) |
//! | `stargaze_snapshotter_cri_pulls_with_auth_total` | | `PullImage`s through the CRI keychain that carried credentials |
//! | `stargaze_snapshotter_cri_handover_failures_total` | | credentials the fetcher did not take |
//! | `stargaze_snapshotter_cri_grpc_requests_total` | method, code | CRI ImageService calls passed on to containerd |
//! | `stargaze_snapshotter_cri_grpc_request_duration_seconds` | method | their latency, through the proxy |

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use stargaze_proto::v1::snapshotter_server::Snapshotter;
use stargaze_proto::v1::{
    CriKeychainStatus, RemoteSnapshot, SnapshotterStatusRequest, SnapshotterStatusResponse,
};
use stargaze_service::metrics::family;
use tonic::{Request, Response, Status};

use crate::cri_keychain::KeychainStats;
use crate::remote::layer_from_labels;
use crate::service::SnapshotService;
use crate::store::{Kind, Record};

/// `stargaze.v1.Snapshotter`.
#[derive(Clone)]
pub struct StatusService {
    pub snapshots: SnapshotService,
    pub lazy_pull: bool,
    pub cri_keychain: Option<CriKeychainInfo>,
}

/// The CRI keychain as status and metrics show it.
#[derive(Clone)]
pub struct CriKeychainInfo {
    pub socket: String,
    pub containerd_socket: String,
    pub ttl: std::time::Duration,
    pub stats: Arc<KeychainStats>,
}

impl CriKeychainInfo {
    fn status(&self) -> CriKeychainStatus {
        let s = &self.stats;
        CriKeychainStatus {
            socket: self.socket.clone(),
            containerd_socket: self.containerd_socket.clone(),
            credential_ttl_millis: self.ttl.as_millis() as u64,
            credentials: s.live_credentials() as u32,
            calls: s.rpc.total(),
            pulls_with_auth: s.pulls_with_auth.load(Ordering::Relaxed),
            handover_failures: s.handover_failures.load(Ordering::Relaxed),
        }
    }
}

#[tonic::async_trait]
impl Snapshotter for StatusService {
    async fn status(
        &self,
        _: Request<SnapshotterStatusRequest>,
    ) -> Result<Response<SnapshotterStatusResponse>, Status> {
        let s = &self.snapshots;
        let all = s.run(|store| store.all()).await?;
        let remote: Vec<&(String, Record)> =
            all.iter().filter(|(_, r)| r.remote_dir.is_some()).collect();
        // The same check Mounts makes: does the layer's directory answer?
        let served = s.served(remote.iter().map(|(_, r)| r)).await;
        let stats = &s.stats;
        Ok(Response::new(SnapshotterStatusResponse {
            root: s.store.root().display().to_string(),
            lazy_pull: self.lazy_pull,
            snapshots: all.len() as u32,
            remote: remote
                .into_iter()
                .zip(served)
                .map(|((key, r), served)| {
                    let l = layer_from_labels(&r.labels);
                    RemoteSnapshot {
                        key: key.clone(),
                        image_ref: l.as_ref().map(|l| l.image_ref.clone()).unwrap_or_default(),
                        layer_digest: l.map(|l| l.digest).unwrap_or_default(),
                        served,
                    }
                })
                .collect(),
            remote_prepared: stats.remote_prepared.load(Ordering::Relaxed),
            fallbacks: stats.fallbacks.load(Ordering::Relaxed),
            reattached: stats.reattached.load(Ordering::Relaxed),
            recent_errors: stats.errors.list(),
            cri_keychain: self.cri_keychain.as_ref().map(CriKeychainInfo::status),
        }))
    }
}

/// The snapshotter's Prometheus collector.
#[derive(Clone)]
pub struct SnapshotterMetrics(pub SnapshotService, pub Option<Arc<KeychainStats>>);

impl std::fmt::Debug for SnapshotterMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SnapshotterMetrics")
    }
}

impl SnapshotterMetrics {
    pub fn render(&self) -> String {
        stargaze_service::metrics::render(self.clone())
    }
}

impl Collector for SnapshotterMetrics {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.0;
        // A read transaction: cheap, and scrapes are rare.
        let (mut active, mut view, mut committed, mut remote) = (0, 0, 0, 0);
        if let Ok(all) = s.store.all() {
            for (_, r) in all {
                match r.kind {
                    Kind::Active => active += 1,
                    Kind::View => view += 1,
                    Kind::Committed => committed += 1,
                }
                if r.remote_dir.is_some() {
                    remote += 1;
                }
            }
        }
        let kind = |k: &str, n: u64| (vec![("kind".to_string(), k.to_string())], n);
        family(
            &mut e,
            "stargaze_snapshotter_snapshots",
            "Snapshots in the database by kind; remote ones also count as committed",
            MetricType::Gauge,
            &[
                kind("active", active),
                kind("view", view),
                kind("committed", committed),
                kind("remote", remote),
            ],
        )?;
        let one = |n: &AtomicU64| [(vec![], n.load(Ordering::Relaxed))];
        family(
            &mut e,
            "stargaze_snapshotter_remote_prepared",
            "Layers mounted lazily",
            MetricType::Counter,
            &one(&s.stats.remote_prepared),
        )?;
        family(
            &mut e,
            "stargaze_snapshotter_fallbacks",
            "Layers with lazy-pull labels that containerd had to unpack",
            MetricType::Counter,
            &one(&s.stats.fallbacks),
        )?;
        family(
            &mut e,
            "stargaze_snapshotter_reattached",
            "Remote layers re-attached after the fs service lost them",
            MetricType::Counter,
            &one(&s.stats.reattached),
        )?;
        s.stats.rpc.encode("stargaze_snapshotter", &mut e)?;
        if let Some(k) = &self.1 {
            family(
                &mut e,
                "stargaze_snapshotter_cri_credentials",
                "Repositories whose pull credentials (CRI keychain) the fetcher keeps, not expired",
                MetricType::Gauge,
                &[(vec![], k.live_credentials() as u64)],
            )?;
            family(
                &mut e,
                "stargaze_snapshotter_cri_pulls_with_auth",
                "PullImage calls through the CRI keychain that carried credentials",
                MetricType::Counter,
                &one(&k.pulls_with_auth),
            )?;
            family(
                &mut e,
                "stargaze_snapshotter_cri_handover_failures",
                "Pull credentials the fetcher did not take (down, or malformed auth)",
                MetricType::Counter,
                &one(&k.handover_failures),
            )?;
            k.rpc.encode("stargaze_snapshotter_cri", &mut e)?;
        }
        Ok(())
    }
}
