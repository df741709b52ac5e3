//! `stargaze.v1.Fetcher`: the gRPC adapter over the fetcher's parts. It
//! turns requests into calls on the layer table (`layers.rs`: resolution,
//! recovery after a restart), the engine (`engine.rs`: Fetch), the
//! scheduler (`schedule.rs`: prefetch, background fetch, pauses) and
//! WarmLayers (`warm.rs`), errors into status codes
//! ([`FetchError::status`](crate::FetchError::status)), and reports status.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use stargaze_cache::{Cache, EvictOptions};
use stargaze_format::{Digest, Prefetch};
use stargaze_proto::v1::fetcher_server::Fetcher;
use stargaze_proto::v1::*;
use stargaze_service::metrics::RpcMetrics;
use tonic::{Request, Response, Status};

use crate::engine::Layer;
use crate::evict::CacheLimit;
use crate::layers::Layers;
use crate::loads::Loads;
use crate::options::FetchOptions;
use crate::schedule::Schedule;
use crate::traces::Traces;

pub use crate::schedule::{DEFAULT_BACKGROUND_MAX_WAIT, DEFAULT_BACKGROUND_SILENCE};

pub(crate) struct Shared {
    pub(crate) layers: Arc<Layers>,
    pub(crate) schedule: Arc<Schedule>,
    /// Files the entrypoint prefetch fetched.
    pub(crate) entrypoint_files: AtomicU64,
    /// ... and their uncompressed bytes.
    pub(crate) entrypoint_bytes: AtomicU64,
    /// Prefetch each new image's entrypoint chain (`entrypoint.rs`).
    pub(crate) entrypoint: bool,
    /// Runtime dependency prefetch (`loads.rs`).
    pub(crate) loads: Loads,
    /// Follow what a file loads on its first read (`loads.rs`).
    pub(crate) follow_loads: bool,
    /// Learned access traces (`traces.rs`).
    pub(crate) traces: Arc<Traces>,
    /// Record and replay them.
    pub(crate) learn_traces: bool,
    /// Requests served, by method and code (Prometheus).
    pub(crate) rpc: Arc<RpcMetrics>,
    /// Eviction: the cache's size limit (0 = none) and the passes that
    /// make room on a full filesystem, which run even without a limit.
    pub(crate) cache_limit: Option<Arc<CacheLimit>>,
    /// What re-verification found at start, and how long it took.
    pub(crate) recovery: (crate::recover::Recovery, std::time::Duration),
    /// `NoteReads` calls answered so far (fs reports the reads it served
    /// every 100 ms): `ImageTrace` waits for the reports made after it was
    /// asked.
    pub(crate) reports: tokio::sync::watch::Sender<u64>,
}

/// How long `ImageTrace` waits for fs's reports of the last reads.
const REPORTS_WAIT: std::time::Duration = std::time::Duration::from_millis(2500);

/// The fetcher's gRPC service.
#[derive(Clone)]
pub struct FetcherService {
    pub(crate) shared: Arc<Shared>,
}

impl FetcherService {
    pub fn new(
        cache: Arc<Cache>,
        client: stargaze_registry::Client,
        opts: FetchOptions,
        prefetch_size: u64,
        background: bool,
    ) -> FetcherService {
        let schedule = Schedule::new(prefetch_size, background);
        let traces = Traces::new(cache.clone(), Some(client.clone()));
        let layers = Arc::new(Layers::new(cache, client, opts, schedule.activity.clone()));
        let lookup = Arc::downgrade(&layers);
        traces.set_layers(Box::new(move |d| lookup.upgrade()?.named(d)));
        FetcherService {
            shared: Arc::new(Shared {
                layers,
                schedule: Arc::new(schedule),
                entrypoint: true,
                loads: Loads::new(crate::loads::DEFAULT_WHOLE_MAPPED_BELOW),
                follow_loads: true,
                traces,
                learn_traces: true,
                entrypoint_files: AtomicU64::new(0),
                entrypoint_bytes: AtomicU64::new(0),
                rpc: Arc::default(),
                cache_limit: None,
                recovery: Default::default(),
                reports: tokio::sync::watch::Sender::new(0),
            }),
        }
    }

    /// The scheduler's settings, before serving (`None` once shared).
    fn schedule_mut(&mut self) -> Option<&mut Schedule> {
        Arc::get_mut(&mut Arc::get_mut(&mut self.shared)?.schedule)
    }

    /// Cap background fetching at `bytes_per_sec` compressed bytes per
    /// second across all layers (0 = no cap; before serving).
    pub fn with_background_bandwidth(mut self, bytes_per_sec: u64) -> FetcherService {
        if let Some(schedule) = self.schedule_mut() {
            schedule.background_bandwidth = bytes_per_sec;
        }
        self
    }

    /// Whether WarmLayers prefetches the image's entrypoint chain (on by
    /// default; before serving).
    pub fn with_entrypoint_prefetch(mut self, on: bool) -> FetcherService {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.entrypoint = on;
        }
        self
    }

    /// Close every trace recording and save what it learned (at a clean
    /// stop).
    pub async fn save_traces(&self) {
        self.shared.traces.close_all().await;
    }

    /// Whether images' first reads are recorded and replayed on their
    /// next cold pull (`traces.rs`; before serving).
    /// `read_published`: traces published in an image's repository are
    /// used when the cache has none; `publish`: traces that learned
    /// something are pushed there.
    pub fn with_learned_traces(
        mut self,
        on: bool,
        window: Duration,
        read_published: bool,
        publish: bool,
    ) -> FetcherService {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.learn_traces = on;
            shared.traces.set_window(window);
            shared.traces.set_sharing(read_published, publish);
        }
        self
    }

    /// Whether a file's first read fetches what it loads, and up to which
    /// size mapped files are fetched whole (`loads.rs`; before serving).
    pub fn with_load_following(mut self, on: bool, whole_mapped_below: u64) -> FetcherService {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.follow_loads = on;
            shared.loads.whole_mapped_below = whole_mapped_below;
        }
        self
    }

    /// Set the quiet period background fetches wait for, and for how long
    /// at most (before serving).
    pub fn with_background_silence(
        mut self,
        silence: Duration,
        max_wait: Duration,
    ) -> FetcherService {
        if let Some(schedule) = self.schedule_mut() {
            schedule.background_silence = silence;
            schedule.background_max_wait = max_wait;
        }
        self
    }

    /// What re-verification after an unclean stop found (before serving;
    /// the status reports it).
    pub fn with_recovery(
        mut self,
        found: crate::recover::Recovery,
        took: std::time::Duration,
    ) -> FetcherService {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.recovery = (found, took);
        }
        self
    }

    /// Keep the cache under `opts.limit` bytes (0 = no limit: eviction then
    /// runs only when a write finds the filesystem full), before serving;
    /// the passes start with [`FetcherService::start_eviction`].
    pub fn with_cache_limit(mut self, opts: EvictOptions) -> FetcherService {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            let cache = shared.layers.cache.clone();
            shared.cache_limit = Some(Arc::new(CacheLimit::new(cache, opts)));
        }
        self
    }

    /// The cache's size limit, when one is set.
    pub(crate) fn size_limit(&self) -> Option<Arc<CacheLimit>> {
        self.shared.cache_limit.clone().filter(|l| l.limit() > 0)
    }

    /// Start the eviction task (on the current runtime).
    pub fn start_eviction(&self) {
        if let Some(limit) = &self.shared.cache_limit {
            tokio::spawn(
                limit
                    .clone()
                    .run(self.shared.layers.cache.clone(), self.forgetter()),
            );
        }
    }

    /// One eviction pass now (tests, and `None` without a limit).
    pub async fn evict_now(&self) -> Option<stargaze_cache::Eviction> {
        let limit = self.size_limit()?;
        let forget = self.forgetter();
        tokio::task::spawn_blocking(move || limit.pass(&mut |d| forget(d)))
            .await
            .ok()
    }

    /// Drops an evicted layer from memory: later requests resolve it anew.
    fn forgetter(&self) -> Arc<dyn Fn(&Digest) + Send + Sync> {
        let layers = self.shared.layers.clone();
        Arc::new(move |digest: &Digest| layers.forget(digest))
    }

    /// Every resolved layer.
    pub fn layers(&self) -> Vec<Arc<Layer>> {
        self.shared.layers.all()
    }

    /// A resolved layer.
    pub fn layer(&self, digest: &Digest) -> Option<Arc<Layer>> {
        self.shared.layers.get(digest)
    }

    /// Resolve once per layer; concurrent callers share the work. Every
    /// call checks the layer against its own labels: a layer resolved for
    /// one image is served for another only when that image names the
    /// same TOC (or allows unverified layers).
    pub async fn resolve(
        &self,
        src: &LayerSource,
        allow_unverified: bool,
    ) -> Result<Arc<Layer>, Status> {
        self.shared.layers.resolve(src, allow_unverified).await
    }

    /// A resolved layer, or one resolved before a restart (from its saved
    /// source; the index in the cache is reused, so this costs no request).
    /// `digest` is a request's: a malformed one is refused here, naming it.
    pub async fn layer_or_recover(&self, digest: &str) -> Result<Arc<Layer>, Status> {
        self.shared.layers.recover(&request_digest(digest)?).await
    }

    /// Fetch what file `ino` of `layer` loads (`loads.rs`), without
    /// holding up the read that reached its start.
    fn follow_loads(&self, layer: &Arc<Layer>, ino: u64) {
        let (me, layer) = (self.clone(), layer.clone());
        tokio::spawn(async move {
            let layers = me.shared.layers.clone();
            me.shared
                .loads
                .first_read(&layer, ino, |d| layers.named(d))
                .await;
        });
    }

    /// Prefetch per the layer's landmark, the label or the configuration,
    /// then (in the background) everything else.
    pub async fn prefetch(
        &self,
        layer: Arc<Layer>,
        label_size: u64,
        wait: bool,
    ) -> Result<u64, Status> {
        let progress = self.shared.layers.info(&layer.digest).progress.clone();
        let errors = self.shared.layers.errors.clone();
        self.shared
            .schedule
            .prefetch(layer, label_size, progress, errors, wait)
            .await
            .map_err(|e| e.status())
    }
}

/// A layer digest from a request, parsed where it enters: a malformed one
/// (not `sha256:<64 lower-case hex>`) is an invalid argument naming it,
/// never a lookup or a cache path.
fn request_digest(digest: &str) -> Result<Digest, Status> {
    digest
        .parse()
        .map_err(|e| Status::invalid_argument(format!("layer digest: {e}")))
}

#[tonic::async_trait]
impl Fetcher for FetcherService {
    async fn resolve_layer(
        &self,
        r: Request<ResolveLayerRequest>,
    ) -> Result<Response<ResolveLayerResponse>, Status> {
        let req = r.into_inner();
        let src = req
            .layer
            .ok_or_else(|| Status::invalid_argument("no layer given"))?;
        let (layer, check) = self
            .shared
            .layers
            .resolve_checked(&src, req.allow_unverified)
            .await?;
        let idx = &layer.index;
        let (mut files, mut file_bytes) = (0u64, 0u64);
        for ino in 1..=idx.inode_count() {
            if let Some(n) = idx.inode(ino)
                && n.is_reg()
            {
                files += 1;
                file_bytes += n.size();
            }
        }
        let prefetch = match idx.prefetch() {
            Prefetch::Disabled => PrefetchPlan {
                kind: prefetch_plan::Kind::Disabled as i32,
                compressed_bytes: 0,
            },
            Prefetch::UpTo(o) => PrefetchPlan {
                kind: prefetch_plan::Kind::Landmark as i32,
                compressed_bytes: o,
            },
            Prefetch::Unspecified => PrefetchPlan::default(),
        };
        Ok(Response::new(ResolveLayerResponse {
            layer_digest: layer.digest.to_string(),
            format: idx.format().map(|f| f.to_string()).unwrap_or_default(),
            toc_digest: idx.toc_digest().to_string(),
            toc_verified: check.verifies(),
            index_path: self
                .shared
                .layers
                .cache
                .index_path(&layer.digest)
                .display()
                .to_string(),
            presence_path: self
                .shared
                .layers
                .cache
                .presence_path(&layer.digest)
                .display()
                .to_string(),
            blob_size: idx.blob_size(),
            entries: idx.inode_count(),
            files,
            file_bytes,
            chunks: idx.chunk_count(),
            prefetch: Some(prefetch),
        }))
    }

    async fn fetch(&self, r: Request<FetchRequest>) -> Result<Response<FetchResponse>, Status> {
        let req = r.into_inner();
        let _on_demand = (req.priority != Priority::Background as i32)
            .then(|| self.shared.schedule.activity.begin());
        let layer = self.layer_or_recover(&req.layer_digest).await?;
        let ranges: Vec<(u64, u64, u64)> = req
            .ranges
            .iter()
            .map(|r| (r.inode, r.offset, r.length))
            .collect();
        let purpose = if req.priority == Priority::Background as i32 {
            crate::Purpose::Background
        } else if req.priority == Priority::Prefetch as i32 {
            crate::Purpose::Neighbours
        } else {
            crate::Purpose::Read
        };
        let stats = layer.fetch_for(&ranges, purpose).await.map_err(|e| {
            self.shared
                .layers
                .errors
                .push(layer.digest.to_string(), format!("fetch: {e}"));
            e.status()
        })?;
        if req.priority == Priority::OnDemand as i32 {
            // A sweep through the layer: fetch ahead in blob order.
            let ahead = layer.sweep_ahead(&ranges);
            if !ahead.is_empty() {
                let layer = layer.clone();
                tokio::spawn(async move {
                    if let Err(e) = layer.fetch_for(&ahead, crate::Purpose::Sweep).await {
                        tracing::debug!(layer = %layer.digest, error = %e, "read-ahead failed");
                    }
                });
            }
            // What was read goes into traces through NoteReads: fs reports
            // every first read, hits included, in the order made.
            // A file being executed: what it loads comes next.
            if req.follow_loads && self.shared.follow_loads {
                for &(ino, ..) in &ranges {
                    self.follow_loads(&layer, ino);
                }
            }
        }
        Ok(Response::new(FetchResponse {
            chunks_fetched: stats.chunks_fetched,
            bytes_fetched: stats.bytes_fetched,
        }))
    }

    async fn prefetch(
        &self,
        r: Request<PrefetchRequest>,
    ) -> Result<Response<PrefetchResponse>, Status> {
        let req = r.into_inner();
        let layer = self.layer_or_recover(&req.layer_digest).await?;
        let bytes = FetcherService::prefetch(self, layer, req.prefetch_size, req.wait).await?;
        Ok(Response::new(PrefetchResponse {
            prefetched_bytes: bytes,
        }))
    }

    async fn warm_layers(
        &self,
        r: Request<WarmLayersRequest>,
    ) -> Result<Response<WarmLayersResponse>, Status> {
        let started = self.warm(r.into_inner())?;
        Ok(Response::new(WarmLayersResponse { started }))
    }

    async fn pause_background(
        &self,
        r: Request<PauseBackgroundRequest>,
    ) -> Result<Response<PauseBackgroundResponse>, Status> {
        let PauseBackgroundRequest { key, layers } = r.into_inner();
        if self.shared.learn_traces {
            self.shared.traces.container_started(&layers);
        }
        self.shared.loads.stacks.note(layers);
        let hold = self.shared.schedule.background_silence;
        self.shared.schedule.activity.hold(hold);
        tracing::debug!(snapshot = %key, hold = ?hold, "a container is starting: background fetches pause");
        Ok(Response::new(PauseBackgroundResponse {}))
    }

    async fn image_trace(
        &self,
        r: Request<ImageTraceRequest>,
    ) -> Result<Response<ImageTraceResponse>, Status> {
        let image = r.into_inner().image_ref;
        // The reads a container made just before this call may still sit
        // in fs's queue: fs sends it every 100 ms (every second when it is
        // empty), so the second report from now holds everything read
        // before now. Bounded: without fs, no report comes.
        let mut reports = self.shared.reports.subscribe();
        let asked = *reports.borrow_and_update();
        let _ = tokio::time::timeout(
            REPORTS_WAIT,
            reports.wait_for(|&n| n >= asked.saturating_add(2)),
        )
        .await;
        let trace = self.shared.traces.close(&image).await.ok_or_else(|| {
            Status::not_found(format!(
                "no access trace of {image}: it is recorded when the image is pulled lazily (WarmLayers) and read, with [fetcher] learn_traces on"
            ))
        })?;
        Ok(Response::new(ImageTraceResponse {
            manifest: trace.manifest,
            layers: trace.layers,
            reads: trace
                .reads
                .into_iter()
                .map(|r| TraceRead {
                    layer: r.layer,
                    path: r.path,
                    offset: r.offset,
                    length: r.length,
                })
                .collect(),
        }))
    }

    /// Reads fs served, for the recordings open now (`traces/`).
    async fn note_reads(
        &self,
        r: Request<NoteReadsRequest>,
    ) -> Result<Response<NoteReadsResponse>, Status> {
        let req = r.into_inner();
        let traces = &self.shared.traces;
        if traces.recording()
            && let Ok(digest) = req.layer_digest.parse::<Digest>()
            && let Some(layer) = self.shared.layers.get(&digest)
        {
            // Traces name layers as their files do, by the digest's text.
            let name = layer.digest.to_string();
            for FileRange {
                inode,
                offset,
                length,
            } in req.ranges
            {
                traces.note(&name, &layer.index.path_of(inode), offset, length);
            }
        }
        self.shared.reports.send_modify(|n| *n += 1);
        Ok(Response::new(NoteReadsResponse {
            generation: traces.generation(),
        }))
    }

    /// The CRI keychain's credentials (`credentials.rs`).
    async fn remember_credentials(
        &self,
        r: Request<RememberCredentialsRequest>,
    ) -> Result<Response<RememberCredentialsResponse>, Status> {
        crate::credentials::remember(&self.shared.layers.client, r.into_inner()).map(Response::new)
    }

    async fn layer_status(
        &self,
        r: Request<LayerStatusRequest>,
    ) -> Result<Response<LayerStatusResponse>, Status> {
        let req = r.into_inner();
        let layer = self.layer_or_recover(&req.layer_digest).await?;
        let info = self.shared.layers.info(&layer.digest);
        let (present, total) = layer.progress();
        let (mut bytes, mut bytes_present) = (0u64, 0u64);
        for ino in 1..=layer.index.inode_count() {
            let Some(n) = layer.index.inode(ino) else {
                continue;
            };
            for c in n.chunks() {
                bytes += c.size;
                if layer.presence.is_present(c.global) {
                    bytes_present += c.size;
                }
            }
        }
        Ok(Response::new(LayerStatusResponse {
            layer_digest: layer.digest.to_string(),
            image_ref: info.image_ref.lock().clone(),
            blob_size: layer.index.blob_size(),
            chunks: total,
            chunks_present: present,
            file_bytes: bytes,
            file_bytes_present: bytes_present,
            prefetch_done: info.progress.prefetch_done.load(Ordering::Acquire),
            background_done: info.progress.background_done.load(Ordering::Acquire),
            last_error: info.progress.last_error.lock().clone(),
        }))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let layers = self.layers();
        let sum = |f: &dyn Fn(&Layer) -> u64| layers.iter().map(|l| f(l)).sum::<u64>();
        let registry_bytes: u64 = self
            .shared
            .layers
            .client
            .stats()
            .iter()
            .map(|(_, s)| s.bytes.load(Ordering::Relaxed))
            .sum();
        let requests: u64 = self
            .shared
            .layers
            .client
            .stats()
            .iter()
            .map(|(_, s)| s.requests.load(Ordering::Relaxed))
            .sum();
        let limit = self.shared.cache_limit.clone();
        let totals = limit.as_ref().map(|l| l.totals()).unwrap_or_default();
        let (recovery, took) = self.shared.recovery;
        Ok(Response::new(StatusResponse {
            cache_dir: self.shared.layers.cache.root().display().to_string(),
            cache_bytes: dir_bytes(self.shared.layers.cache.root()),
            layers: layers.len() as u32,
            bytes_fetched: registry_bytes,
            requests,
            chunks_verified: sum(&|l| l.counters.chunks_fetched.load(Ordering::Relaxed)),
            verification_failures: sum(&|l| {
                l.counters.verification_failures.load(Ordering::Relaxed)
            }),
            recovered_from_unclean_stop: self.shared.layers.cache.was_unclean(),
            chunk_cache_hits: sum(&|l| l.counters.chunks_hit.load(Ordering::Relaxed)),
            background_fetch: self.shared.schedule.background,
            recent_errors: self.shared.layers.errors.list(),
            cache_limit_bytes: limit.as_ref().map_or(0, |l| l.limit()),
            evicted_layers: totals.layers,
            evicted_files: totals.files,
            evicted_bytes: totals.bytes,
            cache_kept_bytes: totals.last.map_or(0, |p| p.kept_bytes),
            recovery_layers: recovery.layers,
            recovery_chunks_checked: recovery.chunks_checked,
            recovery_chunks_cleared: recovery.chunks_cleared,
            recovery_shared_checked: recovery.shared_checked,
            recovery_shared_removed: recovery.shared_removed,
            recovery_temps_removed: recovery.temps_removed,
            recovery_millis: took.as_millis() as u64,
        }))
    }
}

/// Disk blocks used below `dir` (sparse files count what is really stored).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    // Shared content is hard-linked from layers: count each file once.
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) if seen.insert((m.dev(), m.ino())) => total += m.blocks() * 512,
                Ok(_) => {}
                Err(_) => {}
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    /// A request's layer digest that is not `sha256:<64 lower-case hex>`
    /// is an invalid argument naming it, before any lookup or cache path.
    #[test]
    fn malformed_request_digests_are_invalid_arguments_naming_them() {
        let hex = "cd".repeat(32);
        for bad in [
            "sha256:../../x".to_string(),
            format!("sha256:{}", &hex[1..]),
            format!("sha256:{}", hex.to_uppercase()),
            hex.clone(),
        ] {
            let s = super::request_digest(&bad).unwrap_err();
            assert_eq!(s.code(), tonic::Code::InvalidArgument, "{bad}");
            assert!(s.message().contains(&format!("{bad:?}")), "{}", s.message());
        }
        assert!(super::request_digest(&format!("sha256:{hex}")).is_ok());
    }

    #[test]
    fn a_file_linked_twice_counts_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("content")).unwrap();
        let file = dir.path().join("content/a");
        std::fs::write(&file, vec![7u8; 64 << 10]).unwrap();
        let once = super::dir_bytes(dir.path());
        assert!(once >= 64 << 10, "{once}");
        std::fs::hard_link(&file, dir.path().join("b")).unwrap();
        assert_eq!(super::dir_bytes(dir.path()), once);
    }
}
