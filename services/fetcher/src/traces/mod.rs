//! Learned access traces, recorded here and replayed by WarmLayers (the
//! file format: `stargaze_cache::trace`).
//!
//! Recording: WarmLayers names an image (reference, manifest digest,
//! layers: [`Traces::image_pulled`]); for [`RECORD_FOR`] from then, and
//! again after each container start on the image (PauseBackground whose
//! top layer is the image's: [`Traces::container_started`]), every read
//! of one of its layers that fs reports (`NoteReads`: each chunk's first
//! read, cache hits included) is noted, in order ([`Traces::note`]): what
//! the programs read, not what a prefetch guessed they would (a file the
//! entrypoint prefetch fetched but nothing read stays out). When the
//! window closes, the reads are merged into the image's trace file, after
//! those it had.
//!
//! Replay: [`Traces::image_pulled`] returns the image's trace when it has
//! a valid one (from the cache, else published in the image's registry:
//! [`registry`]). WarmLayers reads the trace's blob spans at once, before
//! the TOCs are in ([`early`]), stores them as each layer resolves, then
//! fetches each layer's traced ranges still missing in trace order: what
//! the image's containers read first arrives from the first round trips,
//! whatever the programs are. A trace saved while its layers are resolved
//! keeps those spans ([`early::spans_of`]).
//! With `publish_traces`, a trace that learned something new is pushed to
//! the image's repository for other nodes.

pub mod early;
pub mod registry;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use stargaze_cache::{Cache, Trace, TraceRead};
use stargaze_registry::{Client, Reference};
use tokio::sync::{mpsc, oneshot, watch};

use crate::FetchError;

use crate::engine::Layer;

/// How long reads are recorded after an image is pulled or a container of
/// it starts: the start of a program, not its whole life.
pub const RECORD_FOR: Duration = Duration::from_secs(30);
/// Images tracked at once.
const MAX_IMAGES: usize = 256;

/// One image being (or having been) recorded.
struct Image {
    image: String,
    manifest: String,
    /// The image manifest's media type and size (a published trace's
    /// `subject`).
    manifest_type: String,
    manifest_size: u64,
    layers: Vec<String>,
    /// Recording until then; `None` when not recording.
    until: Option<Instant>,
    /// A task will save the reads when the window closes.
    saver: bool,
    reads: Vec<TraceRead>,
    seen: HashSet<TraceRead>,
}

/// What a recording learned, when its window closed.
struct Learned {
    image: String,
    manifest: String,
    layers: Vec<String>,
    reads: Vec<TraceRead>,
    manifest_type: String,
    manifest_size: u64,
}

impl Image {
    /// Close the recording window (`recording` counts open ones) and take
    /// what it learned.
    fn end(&mut self, recording: &AtomicUsize) -> Learned {
        if self.until.take().is_some() {
            recording.fetch_sub(1, Ordering::Relaxed);
        }
        self.seen.clear();
        Learned {
            image: self.image.clone(),
            manifest: self.manifest.clone(),
            layers: self.layers.clone(),
            reads: std::mem::take(&mut self.reads),
            manifest_type: self.manifest_type.clone(),
            manifest_size: self.manifest_size,
        }
    }
}

/// The images whose reads are recorded.
pub struct Traces {
    cache: Arc<Cache>,
    images: Mutex<HashMap<String, Image>>,
    /// Images recording now (a read checks this before taking the lock).
    recording: AtomicUsize,
    /// Counts recording windows opened: fs reports every chunk's first
    /// read again when it changes (`NoteReads`).
    generation: AtomicU64,
    /// The recording window, in milliseconds.
    record_for_ms: AtomicU64,
    /// The registry client, when traces are read from or published to
    /// registries.
    client: Option<Client>,
    /// Read traces published in the image's repository.
    read_published: AtomicBool,
    /// Publish traces that learned something new.
    publish: AtomicBool,
    /// The resolved layers, by digest: a trace saved while its layers are
    /// resolved keeps where its reads lie in their blobs (`early.rs`).
    layers: OnceLock<LayerLookup>,
}

/// A resolved layer by digest.
pub(crate) type LayerLookup = Box<dyn Fn(&str) -> Option<Arc<Layer>> + Send + Sync>;

/// What an image pulled is known by.
pub struct Pulled<'a> {
    pub image: &'a str,
    pub manifest: &'a str,
    pub manifest_type: &'a str,
    pub manifest_size: u64,
    pub layers: &'a [String],
}

/// The trace a pull replays: known at once from the cache, or once the
/// image's registry answered.
#[derive(Clone)]
pub struct PendingTrace(watch::Receiver<Option<Option<Arc<Trace>>>>);

impl PendingTrace {
    fn ready(t: Option<Arc<Trace>>) -> PendingTrace {
        PendingTrace(watch::channel(Some(t)).1)
    }

    /// The trace if it is known already (from the cache).
    pub fn known(&self) -> Option<Arc<Trace>> {
        self.0.borrow().clone().flatten()
    }

    /// The trace, once known (`None`: there is none).
    pub async fn get(mut self) -> Option<Arc<Trace>> {
        self.0
            .wait_for(|v| v.is_some())
            .await
            .ok()
            .and_then(|v| v.clone().flatten())
    }
}

impl Traces {
    pub fn new(cache: Arc<Cache>, client: Option<Client>) -> Arc<Traces> {
        Arc::new(Traces {
            cache,
            images: Mutex::default(),
            recording: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
            record_for_ms: AtomicU64::new(RECORD_FOR.as_millis() as u64),
            client,
            read_published: AtomicBool::new(true),
            publish: AtomicBool::new(false),
            layers: OnceLock::new(),
        })
    }

    /// Where saved traces find the layers they name (set once).
    pub(crate) fn set_layers(&self, lookup: LayerLookup) {
        let _ = self.layers.set(lookup);
    }

    /// Whether traces are read from (`read`) and pushed to (`publish`)
    /// images' repositories.
    pub fn set_sharing(&self, read: bool, publish: bool) {
        self.read_published.store(read, Ordering::Relaxed);
        self.publish.store(publish, Ordering::Relaxed);
    }

    /// Record for `window` after each pull or container start.
    pub fn set_window(&self, window: Duration) {
        self.record_for_ms
            .store(window.as_millis() as u64, Ordering::Relaxed);
    }

    /// The image's trace, when it has a valid one (a trace that cannot be
    /// used is logged once, with the file and why, and ignored).
    pub fn load(&self, manifest: &str, layers: &[String]) -> Option<Trace> {
        let path = self.cache.trace_path(manifest)?;
        if !path.exists() {
            return None;
        }
        match Trace::read(&path, manifest, layers) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(error = %e, "trace ignored");
                None
            }
        }
    }

    /// An image is being pulled: record its reads from now, and return the
    /// trace learned before, if any (from the cache, else the registry).
    pub fn image_pulled(self: &Arc<Self>, p: &Pulled) -> PendingTrace {
        {
            let mut images = self.images.lock();
            if images.len() >= MAX_IMAGES && !images.contains_key(p.manifest) {
                images.retain(|_, i| i.until.is_some());
            }
            if images.len() < MAX_IMAGES {
                images
                    .entry(p.manifest.to_string())
                    .or_insert_with(|| Image {
                        image: p.image.to_string(),
                        manifest: p.manifest.to_string(),
                        manifest_type: p.manifest_type.to_string(),
                        manifest_size: p.manifest_size,
                        layers: p.layers.to_vec(),
                        until: None,
                        saver: false,
                        reads: Vec::new(),
                        seen: HashSet::new(),
                    });
            }
        }
        self.open_window(p.manifest);
        if let Some(t) = self.load(p.manifest, p.layers) {
            return PendingTrace::ready(Some(Arc::new(t)));
        }
        let (Some(client), true, Ok(reference)) = (
            self.client.clone(),
            self.read_published.load(Ordering::Relaxed),
            Reference::parse(p.image),
        ) else {
            return PendingTrace::ready(None);
        };
        let (tx, rx) = watch::channel(None);
        let (me, manifest, layers) = (self.clone(), p.manifest.to_string(), p.layers.to_vec());
        tokio::spawn(async move {
            let found = match registry::read(&client, &reference, &manifest, &layers).await {
                Ok(Some(t)) => {
                    tracing::info!(image = %reference, reads = t.reads.len(), "using the access trace published in the registry");
                    // Kept: the next pull does not ask, and reads learned
                    // here are merged into it.
                    if let Some(path) = me.cache.trace_path(&manifest) {
                        let t = t.clone();
                        let _ = tokio::task::spawn_blocking(move || t.write(&path)).await;
                    }
                    Some(Arc::new(t))
                }
                Ok(None) => None,
                Err(e) => {
                    tracing::warn!(error = %e, "published trace ignored");
                    None
                }
            };
            let _ = tx.send(Some(found));
        });
        PendingTrace(rx)
    }

    /// A container starts on these layers (top first): if its top layer is
    /// a known image's, record that image's reads again for a while.
    pub fn container_started(self: &Arc<Self>, top_first: &[String]) {
        let Some(top) = top_first.first() else {
            return;
        };
        let manifests: Vec<String> = self
            .images
            .lock()
            .values()
            .filter(|i| i.layers.last() == Some(top))
            .map(|i| i.manifest.clone())
            .collect();
        for m in manifests {
            self.open_window(&m);
        }
    }

    /// Record from now for the window; a task saves the reads when it
    /// closes.
    fn open_window(self: &Arc<Self>, manifest: &str) {
        let start_saver = {
            let mut images = self.images.lock();
            let Some(img) = images.get_mut(manifest) else {
                return;
            };
            if img.until.is_none() {
                self.recording.fetch_add(1, Ordering::Relaxed);
                self.generation.fetch_add(1, Ordering::Relaxed);
            }
            img.until = Some(
                Instant::now() + Duration::from_millis(self.record_for_ms.load(Ordering::Relaxed)),
            );
            !std::mem::replace(&mut img.saver, true)
        };
        if start_saver {
            let (me, manifest) = (self.clone(), manifest.to_string());
            tokio::spawn(async move { me.save_when_closed(&manifest).await });
        }
    }

    async fn save_when_closed(&self, manifest: &str) {
        loop {
            let until = match self.images.lock().get_mut(manifest) {
                Some(Image {
                    until: Some(until), ..
                }) => *until,
                // Closed meanwhile (`close`): a new window needs a new task.
                Some(img) => {
                    img.saver = false;
                    return;
                }
                None => return,
            };
            if Instant::now() < until {
                tokio::time::sleep_until(until.into()).await;
                continue;
            }
            let learned = {
                let mut images = self.images.lock();
                let Some(img) = images.get_mut(manifest) else {
                    return;
                };
                if img.until.is_some_and(|u| Instant::now() < u) {
                    continue;
                }
                img.saver = false;
                img.end(&self.recording)
            };
            self.save(learned).await;
            return;
        }
    }

    /// Close every open recording now and save what each learned.
    pub async fn close_all(&self) {
        let images: Vec<String> = self
            .images
            .lock()
            .values()
            .filter(|i| i.until.is_some())
            .map(|i| i.image.clone())
            .collect();
        for image in images {
            self.close(&image).await;
        }
    }

    /// Close the recording of the image pulled as `image` now, save what
    /// it learned, and return its whole trace (`None`: no such image, or
    /// nothing learned).
    pub async fn close(&self, image: &str) -> Option<Trace> {
        let learned = {
            let mut images = self.images.lock();
            let normal =
                |r: &str| Reference::parse(r).map_or_else(|_| r.to_string(), |r| r.to_string());
            let wanted = normal(image);
            let img = images
                .values_mut()
                .find(|i| i.image == image || normal(&i.image) == wanted)?;
            img.end(&self.recording)
        };
        let (manifest, layers) = (learned.manifest.clone(), learned.layers.clone());
        self.save(learned).await;
        self.load(&manifest, &layers)
    }

    /// Merge what a recording learned into the image's trace file, after
    /// its own reads.
    async fn save(&self, learned: Learned) {
        let Learned {
            image,
            manifest,
            layers,
            reads,
            manifest_type,
            manifest_size,
        } = learned;
        let (image, manifest) = (image.as_str(), manifest.as_str());
        if reads.is_empty() {
            return;
        }
        let Some(path) = self.cache.trace_path(manifest) else {
            return;
        };
        let mut trace = self
            .load(manifest, &layers)
            .unwrap_or_else(|| Trace::new(image, manifest, layers));
        let before = trace.reads.len();
        trace.merge(reads);
        let spanless = trace.spans.is_empty();
        if trace.reads.len() == before && !spanless {
            return;
        }
        // Where the reads lie in the blobs, while the layers are at hand;
        // else the spans saved before stay (a later pull reads them early
        // and the replay fetches the rest).
        if let Some(lookup) = self.layers.get()
            && let Some(spans) =
                early::spans_of(&trace, |i| trace.layers.get(i).and_then(|d| lookup(d)))
        {
            trace.spans = spans;
        }
        if trace.reads.len() == before && trace.spans.is_empty() {
            return;
        }
        let n = trace.reads.len();
        let trace = Arc::new(trace);
        let t = trace.clone();
        match tokio::task::spawn_blocking(move || t.write(&path)).await {
            Ok(Ok(())) => tracing::info!(
                image,
                reads = n,
                new = n - before,
                spans = trace.spans.len(),
                "access trace saved"
            ),
            Ok(Err(e)) => tracing::warn!(image, error = %e, "access trace not saved"),
            Err(_) => {}
        }
        if let (true, Some(client)) = (self.publish.load(Ordering::Relaxed), &self.client) {
            match registry::publish(client, &trace, &manifest_type, manifest_size).await {
                Ok(()) => tracing::info!(image, reads = n, "access trace published"),
                Err(e) => {
                    tracing::warn!(image, error = %e, "access trace not published; check the node's push credentials for the repository, or set publish_traces = false")
                }
            }
        }
    }

    /// A read of `[offset, offset + length)` of `path` in layer `layer`:
    /// noted for every image recording now that has the layer.
    pub fn note(&self, layer: &str, path: &str, offset: u64, length: u64) {
        if self.recording.load(Ordering::Relaxed) == 0 || length == 0 {
            return;
        }
        let now = Instant::now();
        let mut images = self.images.lock();
        for img in images.values_mut() {
            if img.until.is_none_or(|u| now >= u)
                || img.reads.len() >= stargaze_cache::trace::MAX_READS
            {
                continue;
            }
            let Some(i) = img.layers.iter().position(|d| d == layer) else {
                continue;
            };
            let read = TraceRead {
                layer: i as u32,
                path: path.to_string(),
                offset,
                length,
            };
            if img.seen.insert(read.clone()) {
                img.reads.push(read);
            }
        }
    }

    /// Changes whenever a recording window opens.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Is anything recording now?
    pub fn recording(&self) -> bool {
        self.recording.load(Ordering::Relaxed) > 0
    }
}

/// File ranges `(inode, offset, length)` fetched in one call.
type Call = Vec<(u64, u64, u64)>;

/// A resolved layer handed to [`replay`], and what to tell once its
/// traced reads are in (or failed): the layer's other prefetches wait for
/// it.
pub type Resolved = (Arc<Layer>, oneshot::Sender<()>);

/// Fetch the ranges `trace` lists, in trace order across the image's
/// layers, in large batches: each layer's traced reads join as soon as the
/// layer resolves (`resolved`), and calls go out by the position of their
/// first read in the trace, [`REPLAY_PARALLEL`] at a time over all layers.
/// One replay per layer instead would split the link between the base
/// layer's first reads (the program, its libraries) and every other
/// layer's last ones. A call waits only for the chunks it claimed
/// (`Layer::fetch_own`): chunks read early and still on the wire hold
/// none of the calls in flight.
pub async fn replay(trace: Arc<Trace>, mut resolved: mpsc::UnboundedReceiver<Resolved>) {
    /// Per layer: calls left, bytes fetched, the first error, and whom to
    /// tell when it is done.
    struct Replaying {
        layer: Arc<Layer>,
        left: usize,
        reads: usize,
        bytes: u64,
        error: Option<FetchError>,
        done: Option<oneshot::Sender<()>>,
        t0: Instant,
    }
    let mut layers: Vec<Replaying> = Vec::new();
    // Calls not yet sent, by their first read's position in the trace.
    let mut ready: BTreeMap<usize, (usize, Call)> = BTreeMap::new();
    let mut inflight = tokio::task::JoinSet::new();
    // Each call's layer, so that a call that panicked still counts.
    let mut call_layer: HashMap<tokio::task::Id, usize> = HashMap::new();
    let mut open = true;
    loop {
        while inflight.len() < REPLAY_PARALLEL
            && let Some((_, (i, call))) = ready.pop_first()
        {
            let layer = layers[i].layer.clone();
            let task = inflight.spawn(async move {
                layer
                    .fetch_own(&call, crate::Purpose::Trace)
                    .await
                    .map(|s| s.bytes_fetched)
            });
            call_layer.insert(task.id(), i);
        }
        if !open && inflight.is_empty() && ready.is_empty() {
            break;
        }
        tokio::select! {
            Some(joined) = inflight.join_next_with_id(), if !inflight.is_empty() => {
                let (id, r) = match joined {
                    Ok((id, r)) => (id, Some(r)),
                    Err(e) => (e.id(), None),
                };
                let Some(i) = call_layer.remove(&id) else { continue };
                let l = &mut layers[i];
                match r {
                    Some(Ok(b)) => l.bytes += b,
                    Some(Err(e)) => l.error = l.error.take().or(Some(e)),
                    None => tracing::warn!(image = %trace.image, layer = %l.layer.digest, "a trace replay call panicked; its reads fetch on demand"),
                }
                l.left -= 1;
                if l.left == 0 {
                    l.layer.set_replaying(false);
                    replayed(&trace, l.layer.as_ref(), l.reads, l.bytes, l.error.take(), l.t0);
                    if let Some(done) = l.done.take() {
                        let _ = done.send(());
                    }
                }
            }
            next = resolved.recv(), if open => {
                let Some(first) = next else {
                    open = false;
                    continue;
                };
                // Layers that resolved together are ordered together.
                let mut batch = vec![first];
                while let Ok(more) = resolved.try_recv() {
                    batch.push(more);
                }
                for (layer, done) in batch {
                    let calls = traced_calls(&trace, &layer);
                    if calls.is_empty() {
                        let _ = done.send(());
                        continue;
                    }
                    layer.set_replaying(true);
                    let i = layers.len();
                    layers.push(Replaying {
                        layer,
                        left: calls.len(),
                        reads: calls.iter().map(|(_, c)| c.len()).sum(),
                        bytes: 0,
                        error: None,
                        done: Some(done),
                        t0: Instant::now(),
                    });
                    ready.extend(calls.into_iter().map(|(seq, call)| (seq, (i, call))));
                }
            }
        }
    }
}

/// One layer's replay is over: say how it went.
fn replayed(
    trace: &Trace,
    layer: &Layer,
    reads: usize,
    bytes: u64,
    error: Option<FetchError>,
    t0: Instant,
) {
    match error {
        None => {
            tracing::debug!(image = %trace.image, layer = %layer.digest, reads, bytes, elapsed = ?t0.elapsed(), "trace replayed")
        }
        Some(e) => {
            tracing::debug!(image = %trace.image, layer = %layer.digest, error = %e, "trace replay failed; reads fetch on demand")
        }
    }
}

/// The ranges `trace` lists for `layer`, in trace order, cut into fetch
/// calls; each call keyed by its first read's position in the trace.
fn traced_calls(trace: &Trace, layer: &Layer) -> Vec<(usize, Call)> {
    let name = layer.digest.to_string();
    let Some(i) = trace.layers.iter().position(|d| *d == name) else {
        return Vec::new();
    };
    let mut unknown = 0usize;
    let ranges: Vec<(usize, (u64, u64, u64))> = trace
        .reads
        .iter()
        .enumerate()
        .filter(|(_, r)| r.layer as usize == i)
        .filter_map(|(seq, r)| match layer.index.lookup_path(&r.path) {
            Some(ino) => Some((seq, (ino, r.offset, r.length))),
            None => {
                unknown += 1;
                None
            }
        })
        .collect();
    if unknown > 0 {
        tracing::warn!(image = %trace.image, layer = %layer.digest, files = unknown, "the image's trace names files this layer does not have: skipped");
    }
    in_calls(layer, ranges, REPLAY_CALL_BYTES)
}

/// Cut traced reads, in trace order, into fetch calls of about `budget`
/// compressed bytes each (a file's chunks as the index places them); each
/// call keyed by its first read's position.
fn in_calls(
    layer: &Layer,
    ranges: Vec<(usize, (u64, u64, u64))>,
    budget: u64,
) -> Vec<(usize, Call)> {
    let mut calls: Vec<(usize, Call)> = Vec::new();
    let mut bytes = budget;
    for (seq, (ino, offset, length)) in ranges {
        let size: u64 = layer.index.inode(ino).map_or(0, |n| {
            n.chunks_in(offset, offset.saturating_add(length))
                .map(|c| c.compressed_end - c.compressed_offset)
                .sum()
        });
        if bytes >= budget {
            calls.push((seq, Vec::new()));
            bytes = 0;
        }
        bytes += size;
        if let Some((_, call)) = calls.last_mut() {
            call.push((ino, offset, length));
        }
    }
    calls
}

/// Compressed bytes per fetch call while replaying, and calls in flight:
/// calls go out in trace order, each one read of about this size, a few
/// at a time so the link stays busy while one decodes; small enough that
/// what the program reads first arrives first (a read's ranges come in
/// blob order), large enough that a round trip per call costs little.
const REPLAY_CALL_BYTES: u64 = 1 << 20;
const REPLAY_PARALLEL: usize = 3;
