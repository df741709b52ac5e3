//! Keeping the cache under its size limit: least recently used layers that
//! nobody uses are deleted, with the content files only they referenced.
//!
//! What is kept, whatever the limit:
//! * layers **pinned** by the fs service (attached: a shared `flock` on the
//!   presence file, see [`crate::LayerPin`]), and every content file such a
//!   layer references, even when another layer shares it;
//! * layers **used recently** (directory mtime within
//!   [`EvictOptions::keep_unused`]; the fetcher touches a layer when it
//!   resolves or fetches it, and each pass touches the pinned ones), and no
//!   layer at all until `keep_unused` has passed since the fetcher started,
//!   so that a reboot gives the snapshotter the time to re-attach its layers
//!   before anything counts as unused.
//!
//! A pass ([`Evictor::run`]) first scans without blocking writers: the
//! allocated size of every content file, every layer directory's size,
//! last use and whether it is pinned, and how many layers reference each
//! content file (read from their indexes). If the total is over the limit,
//! it takes the cache's write gate ([`crate::Cache::writing`] is its shared
//! side, held by every content write and layer resolution), adds layers
//! that appeared since the scan, and deletes, oldest first, until the total
//! is below `low_water_percent` of the limit: content files no layer
//! references (left by a crash), and unused layers — each first locked
//! exclusively (so fs cannot pin it meanwhile), handed to the `forget`
//! callback (the fetcher drops it from memory), its directory removed, then
//! every content file whose last referencing layer it was.
//!
//! Presence bits are per layer, and a content file is deleted only when no
//! remaining layer references it, so no remaining presence map can describe
//! a deleted file. A crash midway leaves content files without a layer;
//! the next pass removes them.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use stargaze_format::Digest;
use stargaze_index::LayerIndex;

use crate::Cache;

/// When and how far to evict.
#[derive(Debug, Clone)]
pub struct EvictOptions {
    /// Upper bound on the cache's disk use in bytes; 0 = none.
    pub limit: u64,
    /// A pass that evicts goes on until the cache uses at most this
    /// percentage of the limit, so that it does not run again at once.
    pub low_water_percent: u8,
    /// Layers unused for less than this are never evicted.
    pub keep_unused: Duration,
}

impl Default for EvictOptions {
    fn default() -> Self {
        EvictOptions {
            limit: 0,
            low_water_percent: 90,
            keep_unused: Duration::from_secs(600),
        }
    }
}

/// What one pass found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Eviction {
    /// Bytes the cache used when the pass started (allocated blocks of
    /// content files and layer directories).
    pub usage_before: u64,
    /// ... and when it ended.
    pub usage_after: u64,
    /// Of `usage_after`, bytes of layers pinned or used recently (what no
    /// pass may evict now).
    pub kept_bytes: u64,
    pub layers: u32,
    pub layers_pinned: u32,
    pub content_files: u64,
    pub layers_evicted: u32,
    pub files_evicted: u64,
    pub bytes_freed: u64,
    pub elapsed: Duration,
}

/// Runs eviction passes over one cache.
pub struct Evictor {
    cache: Arc<Cache>,
    opts: EvictOptions,
    /// Nothing is evicted until `keep_unused` after this (see the module docs).
    started: SystemTime,
}

struct ContentEntry {
    bytes: u64,
    mtime: SystemTime,
}

#[derive(Default)]
struct Refs {
    layers: u32,
    /// Referenced by a layer that is kept.
    kept: bool,
}

struct LayerEntry {
    digest: String,
    last_used: SystemTime,
    bytes: u64,
    pinned: bool,
    kept: bool,
}

enum Victim {
    Orphan(Digest),
    Layer(usize),
}

fn allocated(m: &std::fs::Metadata) -> u64 {
    m.blocks() * 512
}

fn dir_allocated(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| allocated(&m))
                .sum()
        })
        .unwrap_or(0)
}

/// Content keys a layer's index references (deduplicated).
fn layer_keys(index: &LayerIndex) -> HashSet<Digest> {
    (1..=index.inode_count())
        .filter(|&ino| {
            index
                .inode(ino)
                .is_some_and(|n| n.is_reg() && n.chunk_count() > 0)
        })
        .map(|ino| index.content_key(ino))
        .collect()
}

impl Evictor {
    pub fn new(cache: Arc<Cache>, opts: EvictOptions) -> Evictor {
        Evictor {
            cache,
            opts,
            started: SystemTime::now(),
        }
    }

    /// Count the grace period after start from `t` instead of now.
    pub fn with_start(mut self, t: SystemTime) -> Evictor {
        self.started = t;
        self
    }

    pub fn options(&self) -> &EvictOptions {
        &self.opts
    }

    /// Layer digests (`sha256:<hex>`) with a directory in the cache.
    fn layer_digests(&self) -> Vec<String> {
        std::fs::read_dir(self.cache.root().join("layers"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| {
                        let name = e.file_name().into_string().ok()?;
                        let ok = name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit());
                        ok.then(|| format!("sha256:{name}"))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Record now as the last use of every pinned layer; returns how many.
    pub fn touch_pinned(&self) -> u32 {
        self.layer_digests()
            .iter()
            .filter(|d| self.pinned_now(d))
            .count() as u32
    }

    /// Is the layer pinned? If so, now is its last use.
    fn pinned_now(&self, digest: &str) -> bool {
        let pinned = self.cache.layer_in_use(digest);
        if pinned {
            self.cache.touch_layer(digest);
        }
        pinned
    }

    fn last_used(&self, dir: &Path) -> Option<SystemTime> {
        std::fs::metadata(dir).ok()?.modified().ok()
    }

    /// Used (or the fetcher started) within `keep_unused`?
    fn is_recent(&self, t: SystemTime) -> bool {
        let now = SystemTime::now();
        let within = |t: SystemTime| {
            now.duration_since(t)
                .map(|age| age < self.opts.keep_unused)
                .unwrap_or(true)
        };
        within(t) || within(self.started)
    }

    fn scan_content(&self) -> HashMap<Digest, ContentEntry> {
        let mut out = HashMap::new();
        let Ok(shards) = std::fs::read_dir(self.cache.root().join("content")) else {
            return out;
        };
        for shard in shards.flatten() {
            let Ok(files) = std::fs::read_dir(shard.path()) else {
                continue;
            };
            for f in files.flatten() {
                let (Some(key), Ok(m)) = (
                    f.file_name()
                        .to_str()
                        .and_then(|n| format!("sha256:{n}").parse::<Digest>().ok()),
                    f.metadata(),
                ) else {
                    continue;
                };
                out.insert(
                    key,
                    ContentEntry {
                        bytes: allocated(&m),
                        mtime: m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    },
                );
            }
        }
        out
    }

    /// Count a layer's references; `kept` marks its keys as not evictable.
    fn add_refs(&self, refs: &mut HashMap<Digest, Refs>, digest: &str, kept: bool) {
        if let Ok(index) = LayerIndex::open(&self.cache.index_path(digest)) {
            for k in layer_keys(&index) {
                let r = refs.entry(k).or_default();
                r.layers += 1;
                r.kept |= kept;
            }
        }
    }

    /// Scan the cache and, when it is over the limit, evict. `forget` is
    /// called with each layer's digest just before its directory is deleted
    /// (with the write gate held: no resolution or write runs meanwhile).
    pub fn run(&self, forget: &mut dyn FnMut(&str)) -> Eviction {
        let t0 = Instant::now();
        let content = self.scan_content();
        let mut refs: HashMap<Digest, Refs> = HashMap::new();
        let mut layers = Vec::new();
        for digest in self.layer_digests() {
            let dir = self.cache.layer_dir(&digest);
            let pinned = self.pinned_now(&digest);
            let last_used = self.last_used(&dir).unwrap_or(SystemTime::UNIX_EPOCH);
            let kept = pinned || self.is_recent(last_used);
            self.add_refs(&mut refs, &digest, kept);
            layers.push(LayerEntry {
                bytes: dir_allocated(&dir),
                digest,
                last_used,
                pinned,
                kept,
            });
        }
        let content_bytes: u64 = content.values().map(|c| c.bytes).sum();
        let layer_bytes: u64 = layers.iter().map(|l| l.bytes).sum();
        let mut usage = content_bytes + layer_bytes;
        let kept_bytes = |refs: &HashMap<Digest, Refs>, layers: &[LayerEntry]| {
            let c: u64 = content
                .iter()
                .filter(|(k, _)| refs.get(*k).is_some_and(|r| r.kept))
                .map(|(_, c)| c.bytes)
                .sum();
            c + layers
                .iter()
                .filter(|l| l.kept)
                .map(|l| l.bytes)
                .sum::<u64>()
        };
        let mut pass = Eviction {
            usage_before: usage,
            layers: layers.len() as u32,
            layers_pinned: layers.iter().filter(|l| l.pinned).count() as u32,
            content_files: content.len() as u64,
            ..Default::default()
        };
        if self.opts.limit == 0 || usage <= self.opts.limit {
            pass.usage_after = usage;
            pass.kept_bytes = kept_bytes(&refs, &layers);
            pass.elapsed = t0.elapsed();
            return pass;
        }
        let target = (u128::from(self.opts.limit)
            * u128::from(self.opts.low_water_percent.min(100))
            / 100) as u64;

        // Oldest first: content no layer references, and unused layers.
        let mut victims: Vec<(SystemTime, Victim)> = Vec::new();
        for (k, c) in &content {
            if !refs.contains_key(k) && !self.is_recent(c.mtime) {
                victims.push((c.mtime, Victim::Orphan(*k)));
            }
        }
        for (i, l) in layers.iter().enumerate() {
            if !l.kept {
                victims.push((l.last_used, Victim::Layer(i)));
            }
        }
        victims.sort_by_key(|(t, _)| *t);

        let _gate = self.cache.evicting();
        // Layers resolved since the scan reference their files too.
        let seen: HashSet<&str> = layers.iter().map(|l| l.digest.as_str()).collect();
        for d in self.layer_digests() {
            if !seen.contains(d.as_str()) {
                self.add_refs(&mut refs, &d, true);
            }
        }
        let unlink = |key: &Digest, usage: &mut u64, pass: &mut Eviction| {
            let Some(c) = content.get(key) else { return };
            match std::fs::remove_file(self.cache.content_path(key)) {
                Ok(()) => {
                    *usage = usage.saturating_sub(c.bytes);
                    pass.files_evicted += 1;
                    pass.bytes_freed += c.bytes;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %self.cache.content_path(key).display(), error = %e, "cannot evict a cache file")
                }
            }
        };
        for (_, victim) in victims {
            if usage <= target {
                break;
            }
            match victim {
                Victim::Orphan(key) => {
                    if !refs.contains_key(&key) {
                        unlink(&key, &mut usage, &mut pass);
                    }
                }
                Victim::Layer(i) => {
                    let l = &layers[i];
                    let dir = self.cache.layer_dir(&l.digest);
                    // Pinned since the scan, or used again: keep it.
                    let _lock =
                        match crate::pin::lock_for_removal(&self.cache.presence_path(&l.digest)) {
                            Ok(Some(lock)) => Some(lock),
                            Ok(None) => continue,
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                            Err(_) => continue,
                        };
                    if self.last_used(&dir).is_some_and(|t| t > l.last_used) {
                        continue;
                    }
                    let keys = LayerIndex::open(&self.cache.index_path(&l.digest))
                        .map(|i| layer_keys(&i))
                        .unwrap_or_default();
                    forget(&l.digest);
                    if let Err(e) = std::fs::remove_dir_all(&dir) {
                        tracing::warn!(layer = %l.digest, dir = %dir.display(), error = %e, "cannot evict a layer's files");
                        continue;
                    }
                    usage = usage.saturating_sub(l.bytes);
                    pass.bytes_freed += l.bytes;
                    pass.layers_evicted += 1;
                    tracing::debug!(layer = %l.digest, "evicted from the cache");
                    for k in keys {
                        let Some(r) = refs.get_mut(&k) else { continue };
                        r.layers = r.layers.saturating_sub(1);
                        if r.layers == 0 && !r.kept {
                            refs.remove(&k);
                            unlink(&k, &mut usage, &mut pass);
                        }
                    }
                }
            }
        }
        pass.usage_after = usage;
        pass.kept_bytes = kept_bytes(&refs, &layers);
        pass.elapsed = t0.elapsed();
        pass
    }
}
