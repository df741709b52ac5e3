//! Learned access traces, recorded here and replayed by WarmLayers (the
//! file format: `stargaze_cache::trace`).
//!
//! Recording: WarmLayers names an image (reference, manifest digest,
//! layers: [`Traces::image_pulled`]); for [`RECORD_FOR`] from then, and
//! again after each container start on the image (PauseBackground whose
//! top layer is the image's: [`Traces::container_started`]), every
//! on-demand read of one of its layers (`service.rs` Fetch) and every file
//! the dependency prefetch fetched for it (`loads.rs`) is noted, in order
//! ([`Traces::note`]). When the window closes, the reads are merged into
//! the image's trace file, after those it had.
//!
//! Replay: [`Traces::image_pulled`] returns the image's trace when it has
//! a valid one, and WarmLayers fetches each layer's traced ranges in trace
//! order as soon as the layer resolves: what the image's containers read
//! first arrives from the first round trip, whatever the programs are.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use stargaze_cache::{Cache, Trace, TraceRead};

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
    layers: Vec<String>,
    /// Recording until then; `None` when not recording.
    until: Option<Instant>,
    /// A task will save the reads when the window closes.
    saver: bool,
    reads: Vec<TraceRead>,
    seen: HashSet<TraceRead>,
}

/// The images whose reads are recorded.
pub struct Traces {
    cache: Arc<Cache>,
    images: Mutex<HashMap<String, Image>>,
    /// Images recording now (a read checks this before taking the lock).
    recording: AtomicUsize,
    /// The recording window, in milliseconds.
    record_for_ms: AtomicU64,
}

impl Traces {
    pub fn new(cache: Arc<Cache>) -> Arc<Traces> {
        Arc::new(Traces {
            cache,
            images: Mutex::default(),
            recording: AtomicUsize::new(0),
            record_for_ms: AtomicU64::new(RECORD_FOR.as_millis() as u64),
        })
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
    /// trace learned before, if any.
    pub fn image_pulled(
        self: &Arc<Self>,
        image: &str,
        manifest: &str,
        layers: &[String],
    ) -> Option<Trace> {
        {
            let mut images = self.images.lock();
            if images.len() >= MAX_IMAGES && !images.contains_key(manifest) {
                images.retain(|_, i| i.until.is_some());
            }
            if images.len() < MAX_IMAGES {
                images.entry(manifest.to_string()).or_insert_with(|| Image {
                    image: image.to_string(),
                    manifest: manifest.to_string(),
                    layers: layers.to_vec(),
                    until: None,
                    saver: false,
                    reads: Vec::new(),
                    seen: HashSet::new(),
                });
            }
        }
        self.open_window(manifest);
        self.load(manifest, layers)
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
            let until = match self.images.lock().get(manifest) {
                Some(Image {
                    until: Some(until), ..
                }) => *until,
                _ => return,
            };
            if Instant::now() < until {
                tokio::time::sleep_until(until.into()).await;
                continue;
            }
            let (image, layers, reads) = {
                let mut images = self.images.lock();
                let Some(img) = images.get_mut(manifest) else {
                    return;
                };
                if img.until.is_some_and(|u| Instant::now() < u) {
                    continue;
                }
                img.until = None;
                img.saver = false;
                self.recording.fetch_sub(1, Ordering::Relaxed);
                img.seen.clear();
                (
                    img.image.clone(),
                    img.layers.clone(),
                    std::mem::take(&mut img.reads),
                )
            };
            if !reads.is_empty() {
                self.save(&image, manifest, layers, reads).await;
            }
            return;
        }
    }

    /// Merge `reads` into the image's trace file, after its own reads.
    async fn save(&self, image: &str, manifest: &str, layers: Vec<String>, reads: Vec<TraceRead>) {
        let Some(path) = self.cache.trace_path(manifest) else {
            return;
        };
        let mut trace = self
            .load(manifest, &layers)
            .unwrap_or_else(|| Trace::new(image, manifest, layers));
        let before = trace.reads.len();
        trace.merge(reads);
        if trace.reads.len() == before {
            return;
        }
        let n = trace.reads.len();
        match tokio::task::spawn_blocking(move || trace.write(&path)).await {
            Ok(Ok(())) => tracing::info!(image, reads = n, new = n - before, "access trace saved"),
            Ok(Err(e)) => tracing::warn!(image, error = %e, "access trace not saved"),
            Err(_) => {}
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

    /// Is anything recording now?
    pub fn recording(&self) -> bool {
        self.recording.load(Ordering::Relaxed) > 0
    }
}

/// Fetch the ranges `trace` lists for `layer`, in trace order (a few
/// batches in flight: each merges neighbouring chunks into large reads).
pub async fn replay(layer: &Arc<Layer>, trace: &Trace) {
    let Some(i) = trace.layers.iter().position(|d| *d == layer.digest) else {
        return;
    };
    let mut unknown = 0usize;
    let ranges: Vec<(u64, u64, u64)> = trace
        .reads
        .iter()
        .filter(|r| r.layer as usize == i)
        .filter_map(|r| match layer.index.lookup_path(&r.path) {
            Some(ino) => Some((ino, r.offset, r.length)),
            None => {
                unknown += 1;
                None
            }
        })
        .collect();
    if unknown > 0 {
        tracing::warn!(image = %trace.image, layer = %layer.digest, files = unknown, "the image's trace names files this layer does not have: skipped");
    }
    if ranges.is_empty() {
        return;
    }
    let t0 = Instant::now();
    let n = ranges.len();
    match crate::engine::fetch_in_batches(layer, ranges, REPLAY_BATCH, 2).await {
        Ok(bytes) => {
            tracing::debug!(image = %trace.image, layer = %layer.digest, reads = n, bytes, elapsed = ?t0.elapsed(), "trace replayed")
        }
        Err(e) => {
            tracing::debug!(image = %trace.image, layer = %layer.digest, error = %e, "trace replay failed; reads fetch on demand")
        }
    }
}

/// Traced reads per fetch call while replaying.
const REPLAY_BATCH: usize = 64;
