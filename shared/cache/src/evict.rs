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
//! A pass ([`Evictor::run`]) first scans without blocking writers: every
//! file of every layer directory (its index, presence map and files) and
//! every shared content file, by inode, so that a file linked from several
//! layers and from `content/` is counted once; each layer's last use and
//! whether it is pinned. If the total is over the limit, it takes the
//! cache's write gate ([`crate::Cache::writing`] is its shared side, held by
//! every content write and layer resolution), adds layers that appeared
//! since the scan, and deletes, oldest first, until the total is below
//! `low_water_percent` of the limit: shared content no layer links to any
//! more (a crash, or its layers went), and unused layers — each first
//! locked exclusively (so fs cannot pin it meanwhile), handed to the
//! `forget` callback (the fetcher drops it from memory), its directory
//! removed, then the shared content that only it still linked to.
//!
//! Presence bits are per layer and describe the layer's own files (which
//! may be links to shared content), so deleting a layer or a `content/`
//! name never takes bytes from a remaining layer.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use stargaze_format::Digest;

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

/// A file of the cache by device and inode: the same bytes under a
/// layer's name and a `content/` name are one entry.
type FileId = (u64, u64);

#[derive(Default)]
struct FileEntry {
    bytes: u64,
    /// Layer directories that hold it.
    layers: u32,
    /// Held by a layer that is kept.
    kept: bool,
    /// Its name in `content/`, if shared.
    shared: Option<Digest>,
    mtime: Option<SystemTime>,
}

struct LayerEntry {
    digest: Digest,
    last_used: SystemTime,
    files: Vec<FileId>,
    pinned: bool,
    kept: bool,
}

enum Victim {
    Orphan(FileId),
    Layer(usize),
}

fn allocated(m: &std::fs::Metadata) -> u64 {
    m.blocks() * 512
}

fn file_id(m: &std::fs::Metadata) -> FileId {
    (m.dev(), m.ino())
}

/// Every file of a layer directory (its own and in `files/`).
fn layer_files(dir: &Path) -> Vec<std::fs::Metadata> {
    let mut out = Vec::new();
    for sub in [dir.to_path_buf(), dir.join("files")] {
        let Ok(entries) = std::fs::read_dir(&sub) else {
            continue;
        };
        out.extend(
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file()),
        );
    }
    out
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

    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    pub fn options(&self) -> &EvictOptions {
        &self.opts
    }

    /// Layers with a directory in the cache. A directory whose name is
    /// not a digest's lower-case hex is none of the fetcher's and is left
    /// alone.
    fn layer_digests(&self) -> Vec<Digest> {
        std::fs::read_dir(self.cache.root().join("layers"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| {
                        let name = e.file_name().into_string().ok()?;
                        format!("sha256:{name}").parse().ok()
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
    fn pinned_now(&self, digest: &Digest) -> bool {
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

    /// Shared content files into `files`.
    fn scan_content(&self, files: &mut HashMap<FileId, FileEntry>) -> u64 {
        let mut count = 0;
        let Ok(shards) = std::fs::read_dir(self.cache.root().join("content")) else {
            return count;
        };
        for shard in shards.flatten() {
            let Ok(entries) = std::fs::read_dir(shard.path()) else {
                continue;
            };
            for f in entries.flatten() {
                let (Some(key), Ok(m)) = (
                    f.file_name()
                        .to_str()
                        .and_then(|n| format!("sha256:{n}").parse::<Digest>().ok()),
                    f.metadata(),
                ) else {
                    continue;
                };
                count += 1;
                let e = files.entry(file_id(&m)).or_default();
                e.bytes = allocated(&m);
                e.shared = Some(key);
                e.mtime = Some(m.modified().unwrap_or(SystemTime::UNIX_EPOCH));
            }
        }
        count
    }

    /// Count a layer's files into `files`; `kept` marks them as not
    /// evictable. Returns the layer's file ids.
    fn add_layer(
        &self,
        files: &mut HashMap<FileId, FileEntry>,
        digest: &Digest,
        kept: bool,
    ) -> Vec<FileId> {
        layer_files(&self.cache.layer_dir(digest))
            .iter()
            .map(|m| {
                let id = file_id(m);
                let e = files.entry(id).or_default();
                e.bytes = allocated(m);
                e.layers += 1;
                e.kept |= kept;
                id
            })
            .collect()
    }

    /// Scan the cache and, when it is over the limit, evict. `forget` is
    /// called with each layer's digest just before its directory is deleted
    /// (with the write gate held: no resolution or write runs meanwhile).
    pub fn run(&self, forget: &mut dyn FnMut(&Digest)) -> Eviction {
        self.run_under(false, forget)
    }

    /// [`Evictor::run`] after a write found the cache's filesystem full:
    /// the pass takes what the cache uses now as its limit (or the
    /// configured limit if lower), so that it frees the low-water share of
    /// it whatever the configured limit is.
    pub fn run_full(&self, forget: &mut dyn FnMut(&Digest)) -> Eviction {
        self.run_under(true, forget)
    }

    /// A pass; `full`: the limit is at most the usage found.
    fn run_under(&self, full: bool, forget: &mut dyn FnMut(&Digest)) -> Eviction {
        let t0 = Instant::now();
        let mut files: HashMap<FileId, FileEntry> = HashMap::new();
        let content_files = self.scan_content(&mut files);
        let mut layers = Vec::new();
        for digest in self.layer_digests() {
            let dir = self.cache.layer_dir(&digest);
            let pinned = self.pinned_now(&digest);
            let last_used = self.last_used(&dir).unwrap_or(SystemTime::UNIX_EPOCH);
            let kept = pinned || self.is_recent(last_used);
            layers.push(LayerEntry {
                files: self.add_layer(&mut files, &digest, kept),
                digest,
                last_used,
                pinned,
                kept,
            });
        }
        let mut usage: u64 = files.values().map(|f| f.bytes).sum();
        let kept_bytes = |files: &HashMap<FileId, FileEntry>| {
            files
                .values()
                .filter(|f| f.kept)
                .map(|f| f.bytes)
                .sum::<u64>()
        };
        let mut pass = Eviction {
            usage_before: usage,
            layers: layers.len() as u32,
            layers_pinned: layers.iter().filter(|l| l.pinned).count() as u32,
            content_files,
            ..Default::default()
        };
        let limit = match (full, self.opts.limit) {
            (true, 0) => usage,
            (true, l) => l.min(usage),
            (false, l) => l,
        };
        if limit == 0 || (!full && usage <= limit) {
            pass.usage_after = usage;
            pass.kept_bytes = kept_bytes(&files);
            pass.elapsed = t0.elapsed();
            return pass;
        }
        let target =
            (u128::from(limit) * u128::from(self.opts.low_water_percent.min(100)) / 100) as u64;

        // Oldest first: shared content no layer holds, and unused layers.
        let mut victims: Vec<(SystemTime, Victim)> = Vec::new();
        for (id, f) in &files {
            if let (Some(_), Some(mtime), 0) = (f.shared, f.mtime, f.layers)
                && !self.is_recent(mtime)
            {
                victims.push((mtime, Victim::Orphan(*id)));
            }
        }
        for (i, l) in layers.iter().enumerate() {
            if !l.kept {
                victims.push((l.last_used, Victim::Layer(i)));
            }
        }
        victims.sort_by_key(|(t, _)| *t);

        let _gate = self.cache.evicting();
        // Layers resolved since the scan hold their files too.
        let seen: HashSet<Digest> = layers.iter().map(|l| l.digest).collect();
        for d in self.layer_digests() {
            if !seen.contains(&d) {
                self.add_layer(&mut files, &d, true);
            }
        }
        let unshare = |f: &FileEntry, usage: &mut u64, pass: &mut Eviction| {
            let Some(key) = f.shared else { return };
            let path = self.cache.content_path(&key);
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    *usage = usage.saturating_sub(f.bytes);
                    pass.files_evicted += 1;
                    pass.bytes_freed += f.bytes;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot evict a cache file")
                }
            }
        };
        for (_, victim) in victims {
            if usage <= target {
                break;
            }
            match victim {
                Victim::Orphan(id) => {
                    if let Some(f) = files.get(&id)
                        && f.layers == 0
                    {
                        unshare(f, &mut usage, &mut pass);
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
                    forget(&l.digest);
                    if let Err(e) = std::fs::remove_dir_all(&dir) {
                        tracing::warn!(layer = %l.digest, dir = %dir.display(), error = %e, "cannot evict a layer's files");
                        continue;
                    }
                    pass.layers_evicted += 1;
                    tracing::debug!(layer = %l.digest, "evicted from the cache");
                    for id in &l.files {
                        let Some(f) = files.get_mut(id) else { continue };
                        f.layers = f.layers.saturating_sub(1);
                        if f.layers > 0 || f.kept {
                            continue;
                        }
                        if f.shared.is_some() {
                            // Shared content only this layer held goes with it.
                            unshare(f, &mut usage, &mut pass);
                        } else {
                            usage = usage.saturating_sub(f.bytes);
                            pass.bytes_freed += f.bytes;
                        }
                    }
                }
            }
        }
        pass.usage_after = usage;
        pass.kept_bytes = kept_bytes(&files);
        pass.elapsed = t0.elapsed();
        pass
    }
}
