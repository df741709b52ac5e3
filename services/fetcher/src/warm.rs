//! WarmLayers: an image's layers made ready ahead of their Prepares. The
//! tail of each layer (footer and, usually, TOC) is read at once; the
//! image's manifest gives each layer's TOC check, so layers resolve and
//! start their prefetch in parallel. An image with a learned trace has its
//! trace's blob spans read alongside the tails and its traced reads
//! fetched first (`traces/`); one without has the program its config
//! names, and what that loads, fetched first (`entrypoint.rs`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use stargaze_format::{Digest, TOC_DIGEST_ANNOTATION, manifest_checksum_annotation};
use stargaze_proto::v1::{LayerSource, WarmLayersRequest};
use stargaze_registry::Reference;
use tokio::sync::watch;
use tonic::Status;

use crate::blob::RemoteBlob;
use crate::registry::{RegistryBlob, WarmTail};
use crate::service::FetcherService;
use crate::traces::early::EarlyReads;

/// Layer tails (each `tail_window` bytes) WarmLayers keeps at most.
const MAX_WARM_TAILS: usize = 256;

impl FetcherService {
    /// Start reading the tails of the layers `req` names that are neither
    /// resolved nor being read, then resolve them early; returns how many
    /// were started.
    pub(crate) fn warm(&self, req: WarmLayersRequest) -> Result<u32, Status> {
        let reference = Reference::parse(&req.image_ref)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut started = 0;
        let mut warming = Vec::new();
        for d in req.digests {
            let Ok(digest) = d.parse::<Digest>() else {
                continue;
            };
            let cell = {
                let mut tails = self.shared.layers.tails.lock();
                // Bounded: tails of layers nobody resolves stay until then.
                if self.layer(&digest).is_some()
                    || tails.contains_key(&digest)
                    || tails.len() >= MAX_WARM_TAILS
                {
                    continue;
                }
                tails.entry(digest).or_default().clone()
            };
            started += 1;
            warming.push(digest.to_string());
            let shared = self.shared.clone();
            let blob = RegistryBlob(
                self.shared
                    .layers
                    .client
                    .blob(&reference, &digest.to_string()),
            );
            tokio::spawn(async move {
                let _on_demand = shared.schedule.activity.begin();
                // The footer and TOC in one read when this node has seen
                // the blob before.
                let opts = &shared.layers.opts;
                let known = shared
                    .layers
                    .cache
                    .tail_hint(&digest)
                    .map_or(0, |n| n.min(opts.max_toc_size.saturating_add(1 << 10)));
                let window = opts
                    .tail_window
                    .max(known)
                    .max(stargaze_format::footer::MAX_FOOTER_SIZE as u64);
                cell.get_or_init(|| async move {
                    let (size, bytes) = blob.read_tail(window).await.ok()?;
                    Some(Arc::new(WarmTail {
                        blob: Arc::new(blob),
                        size,
                        bytes,
                    }))
                })
                .await;
                // Resolved meanwhile without it: drop it.
                if shared.layers.is_resolved(&digest) {
                    shared.layers.tails.lock().remove(&digest);
                }
            });
        }
        if !warming.is_empty() {
            let me = self.clone();
            tokio::spawn(
                async move { me.resolve_early(&req.image_ref, &reference, warming).await },
            );
        }
        Ok(started)
    }

    /// Resolve and prefetch the layers being warmed before their Prepare
    /// arrives: the image's manifest (one request, alongside the tail
    /// reads) gives every layer's `toc.digest` (or zstd:chunked
    /// `manifest-checksum`), so each layer is verified and its prefetch
    /// starts as soon as its own TOC is in, not after the layers below it
    /// were prepared one by one. Layers without either annotation, or whose digest the manifest does not list (the tag
    /// moved), wait for their Prepare as before; so do all of them when
    /// the manifest cannot be read.
    async fn resolve_early(&self, image_ref: &str, reference: &Reference, digests: Vec<String>) {
        let Some(m) = self.shared.layers.image_manifest(reference).await else {
            tracing::debug!(image = image_ref, "no early resolution: manifest not read");
            return;
        };
        let layers = crate::image::layer_digests(&m.manifest);
        // The image's stack: where the files its programs load are looked
        // up when they are first read (`loads.rs`).
        self.shared
            .loads
            .stacks
            .note(layers.iter().rev().cloned().collect());
        // Its reads are recorded from now; what was learned before is
        // fetched first, layer by layer as they resolve (`traces.rs`).
        let trace = self.shared.learn_traces.then(|| {
            self.shared.traces.image_pulled(&crate::traces::Pulled {
                image: image_ref,
                manifest: &m.digest,
                manifest_type: &m.media_type,
                manifest_size: m.size,
                layers: &layers,
            })
        });
        // The config (for the entrypoint) is read while the layers resolve,
        // unless the image's trace says what its programs read.
        let traced = trace
            .as_ref()
            .and_then(|t| t.known())
            .is_some_and(|t| !t.reads.is_empty());
        let config = (self.shared.entrypoint && !traced)
            .then(|| m.manifest.config().digest().to_string())
            .map(|digest| {
                let (client, reference) = (self.shared.layers.client.clone(), reference.clone());
                tokio::spawn(async move { client.fetch_small_blob(&reference, &digest).await })
            });
        // The layers resolved here, ahead of their Prepares: those being
        // warmed whose TOC the manifest lets us check.
        let ahead: Vec<(usize, &oci_spec::image::Descriptor)> = m
            .manifest
            .layers()
            .iter()
            .enumerate()
            .filter(|(i, d)| {
                let annotations = crate::image::annotations(d);
                digests.contains(&layers[*i])
                    && (annotations.contains_key(TOC_DIGEST_ANNOTATION)
                        || manifest_checksum_annotation(&annotations).is_some())
            })
            .collect();
        // The trace's blob spans of those layers are read at once, before
        // any TOC is in (`traces/early.rs`); its reads then go out in trace
        // order over all layers, each layer's as soon as it resolves
        // (`traces::replay`).
        let (early_tx, early_rx) = watch::channel(None);
        let replaying = trace.map(|trace| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let blobs: HashMap<usize, Arc<dyn RemoteBlob>> = ahead
                .iter()
                .map(|&(i, _)| {
                    let blob = self.shared.layers.client.blob(reference, &layers[i]);
                    (i, Arc::new(RegistryBlob(blob)) as Arc<dyn RemoteBlob>)
                })
                .collect();
            tokio::spawn(async move {
                let trace = trace.get().await;
                let early = trace.as_deref().and_then(|t| EarlyReads::start(t, blobs));
                let _ = early_tx.send(Some(early));
                if let Some(trace) = trace {
                    crate::traces::replay(trace, rx).await;
                }
            });
            tx
        });
        let mut set = tokio::task::JoinSet::new();
        let mut early: HashSet<String> = HashSet::new();
        for (i, d) in ahead {
            let digest = &layers[i];
            let annotations = crate::image::annotations(d);
            early.insert(digest.to_string());
            let mut early_rx = early_rx.clone();
            let src = LayerSource {
                image_ref: image_ref.to_string(),
                digest: digest.to_string(),
                annotations,
                ..Default::default()
            };
            let me = self.clone();
            let replaying = replaying.clone();
            set.spawn(async move {
                match me.resolve(&src, false).await {
                    Ok(layer) => {
                        tracing::debug!(layer = %src.digest, "resolved ahead of its Prepare");
                        // What was read early is stored first: the replay
                        // then finds it present.
                        let early = match replaying {
                            Some(_) => early_rx
                                .wait_for(Option::is_some)
                                .await
                                .ok()
                                .and_then(|e| e.clone().flatten()),
                            None => None,
                        };
                        if let Some(e) = early {
                            me.take_early(&layer, e.take(i)).await;
                        }
                        // The layer's own prefetch once its traced reads
                        // are in (at once when there is no trace: the
                        // replay dropped its end).
                        if let Some(tx) = replaying {
                            let (done, replayed) = tokio::sync::oneshot::channel();
                            if tx.send((layer.clone(), done)).is_ok() {
                                let _ = replayed.await;
                            }
                        }
                        let _ = me.prefetch(layer, 0, false).await;
                    }
                    Err(e) => {
                        tracing::debug!(layer = %src.digest, error = %e.message(), "early resolution failed; the layer's Prepare resolves it")
                    }
                }
            });
        }
        // While the layers resolve: once the config is in and the layers
        // resolved so far decide which file the program is (it and the
        // layers above it are known), its fetch starts — it is usually the
        // largest file a start needs, and the last layer to resolve is often
        // the base image's, far below it. The full entrypoint prefetch
        // after the loop finds it in flight or present.
        let mut config = config;
        let mut config_bytes: Option<Vec<u8>> = None;
        // The config's program, parsed once; `None` once started or when
        // there is nothing to start.
        let mut program: Option<crate::entrypoint::Command> = None;
        let read_config = |read: Result<Result<_, _>, tokio::task::JoinError>| match read {
            Ok(Ok(bytes)) => Some(bytes),
            Ok(Err(e)) => {
                tracing::debug!(image = image_ref, error = %e, "no entrypoint prefetch: config not read");
                None
            }
            Err(_) => None,
        };
        loop {
            tokio::select! {
                done = set.join_next() => {
                    if done.is_none() {
                        break;
                    }
                }
                read = async { config.as_mut().expect("guarded").await }, if config.is_some() => {
                    config = None;
                    config_bytes = read_config(read).map(|b| b.to_vec());
                    program = config_bytes
                        .as_deref()
                        .and_then(crate::image::parse_config)
                        .and_then(|c| crate::entrypoint::Command::from_config(&c));
                }
            }
            if let Some(command) = &program
                && self.start_program_fetch(command, &layers, &early)
            {
                program = None;
            }
        }
        if let Some(config) = config {
            config_bytes = read_config(config.await).map(|b| b.to_vec());
        }
        if let Some(bytes) = config_bytes {
            self.prefetch_entrypoint(image_ref, &bytes, &layers).await;
        }
    }

    /// Hand a layer that just resolved what was read early for it: every
    /// span's chunks are claimed at once, before any is decoded, so that no
    /// read meanwhile fetches them a second time; those that arrived are
    /// stored now, those still on the wire when they come.
    async fn take_early(&self, layer: &Arc<crate::Layer>, taken: crate::traces::early::Taken) {
        let arrived: Vec<_> = taken
            .arrived
            .into_iter()
            .map(|(at, bytes)| {
                let end = at + bytes.len() as u64;
                (layer.reserve(at..end), bytes)
            })
            .collect();
        let reading: Vec<_> = taken
            .reading
            .into_iter()
            .map(|(ranges, answer)| {
                let claims: Vec<_> = ranges.into_iter().map(|r| layer.reserve(r)).collect();
                (claims, answer)
            })
            .collect();
        let (spans, on_wire, mut chunks) = (arrived.len(), reading.len(), 0);
        for (claim, bytes) in arrived {
            chunks += layer.fill(claim, Some(bytes)).await;
        }
        tracing::debug!(layer = %layer.digest, spans, chunks, on_wire, "stored what was read early");
        for (claims, answer) in reading {
            let layer = layer.clone();
            tokio::spawn(async move {
                let parts = answer.bytes().await;
                for (i, claim) in claims.into_iter().enumerate() {
                    let bytes = parts.as_ref().and_then(|p| p.get(i).cloned());
                    layer.fill(claim, bytes).await;
                }
            });
        }
    }

    /// Start fetching `command`'s program if the layers resolved so far
    /// decide it (`layers` bottom first; those in `resolving` may still
    /// come, the others are not served lazily). True once started, or when
    /// there is nothing to start.
    fn start_program_fetch(
        &self,
        command: &crate::entrypoint::Command,
        layers: &[String],
        resolving: &HashSet<String>,
    ) -> bool {
        let stack = crate::stack::Stack::partial(
            layers
                .iter()
                .rev()
                .filter_map(|d| match self.shared.layers.named(d) {
                    Some(l) => Some(Some(l)),
                    None if resolving.contains(d) => Some(None),
                    None => None,
                })
                .collect(),
        );
        let Some((layer, ino)) = stack.program_known(&command.candidates()) else {
            return false;
        };
        let Some(size) = layer.index.inode(ino).map(|n| n.size()) else {
            return true;
        };
        tracing::debug!(layer = %layer.digest, program = %layer.index.path_of(ino), "the program's fetch starts before the image's other layers are resolved");
        tokio::spawn(async move {
            let _ = layer
                .fetch_for(&[(ino, 0, size)], crate::Purpose::Entrypoint)
                .await;
        });
        true
    }

    /// Fetch the program the image's config runs and what it loads
    /// (`entrypoint.rs`), from the image's lazily served layers
    /// (`layers` bottom first, as the manifest lists them).
    async fn prefetch_entrypoint(&self, image_ref: &str, config: &[u8], layers: &[String]) {
        let Some(config) = crate::image::parse_config(config) else {
            return;
        };
        let Some(command) = crate::entrypoint::Command::from_config(&config) else {
            return;
        };
        // Layers unpacked by containerd instead are not ours to fetch; the
        // paths they hold are looked up in the remaining ones.
        let stack = crate::stack::Stack::new(
            layers
                .iter()
                .rev()
                .filter_map(|d| self.shared.layers.named(d))
                .collect(),
        );
        let t0 = Instant::now();
        let done = crate::entrypoint::prefetch(&self.shared.loads, &stack, &command).await;
        self.shared
            .entrypoint_files
            .fetch_add(done.files.len() as u64, Ordering::Relaxed);
        self.shared
            .entrypoint_bytes
            .fetch_add(done.bytes, Ordering::Relaxed);
        tracing::info!(
            image = image_ref,
            program = %command.program,
            files = ?done.files,
            bytes = done.bytes,
            elapsed = ?t0.elapsed(),
            "prefetched the entrypoint and what it loads"
        );
    }
}
