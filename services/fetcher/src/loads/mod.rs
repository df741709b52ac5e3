//! Runtime dependency prefetch: what a program loads, fetched as soon as
//! the program is first read.
//!
//! Exec'ing a program is a chain of files, each known only once the one
//! before it was read: the kernel reads the program's headers and maps its
//! interpreter (the dynamic loader of an ELF program, the interpreter of a
//! `#!` script); the loader reads `/etc/ld.so.cache` and maps each library
//! the program needs, then each library those need. Lazily, every link of
//! that chain is a registry round trip after the last, and every page
//! fault on a mapped file another one.
//!
//! When a file is executed (fs sees execve's open flag and sends a Fetch
//! of its head with `follow_loads`; `service.rs` calls
//! [`Loads::first_read`]; a file only read, by `file` or a checksum, is
//! not followed), the fetcher reads the file's
//! head itself ([`elf::head`]): for an ELF object, its interpreter and its
//! dynamic segment's library names and search paths, read as ranges
//! ([`elf`]) so that they are known while the rest of a large program is
//! still arriving; for a script, its interpreter. Each name is resolved as
//! the loader would — `DT_RPATH`/`DT_RUNPATH` (with `$ORIGIN`), the
//! image's own `ld.so.cache` ([`ldcache`]), the default directories —
//! through the layer stacks that hold the file ([`stacks`], [`Stack`]),
//! and every file found is fetched at once, in parallel, and examined the
//! same way ([`Loads::follow`]). Mapped objects (executables, shared
//! libraries) are fetched whole up to `whole_mapped_below`: the faults on
//! them would otherwise arrive one small miss at a time in random order.
//!
//! This runs for every exec a container makes during its life, whatever
//! the program, and only fetches files the loader will open; the image's
//! entrypoint prefetch (`entrypoint.rs`) starts the same chain from the
//! config's program before the first read.

pub mod elf;
pub mod ldcache;
pub mod stacks;

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use stargaze_format::Digest;

use crate::engine::Layer;
use crate::purpose::Purpose;
use crate::stack::Stack;
use elf::Head;
use ldcache::LdCache;
use stacks::Stacks;

/// Files one follow fetches at most.
const MAX_FILES: usize = 64;
/// Bytes (uncompressed) one follow fetches at most.
const MAX_BYTES: u64 = 256 << 20;
/// Files remembered as examined; the set is forgotten beyond this.
const MAX_EXAMINED: usize = 1 << 16;
/// The loader's cache, wherever the image has it.
const LD_CACHE: &str = "/etc/ld.so.cache";
/// Parsed loader caches kept (one per image base, usually).
const MAX_LD_CACHES: usize = 64;
/// Default for [`Loads::whole_mapped_below`].
pub const DEFAULT_WHOLE_MAPPED_BELOW: u64 = 64 << 20;

/// How a file found is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum What {
    /// Examined for what it loads (ELF or `#!`), fetched whole when mapped.
    Program,
    /// Fetched whole, not examined.
    Data,
}

/// A file found in a stack: its path, layer position and inode.
#[derive(Debug, Clone)]
pub struct Found {
    pub path: String,
    pub at: usize,
    pub ino: u64,
    pub what: What,
}

/// What one follow fetched.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Followed {
    /// The paths, in the order they were found.
    pub files: Vec<String>,
    /// Their uncompressed size.
    pub bytes: u64,
}

/// What one examined file leads to.
#[derive(Debug, Default)]
struct Leads {
    /// Interpreters: absolute paths, or bare names to look up in `PATH`.
    programs: Vec<String>,
    /// Libraries, with where to look before the loader's cache.
    libraries: Vec<Library>,
}

#[derive(Debug)]
struct Library {
    name: String,
    /// `DT_RPATH` (when no `DT_RUNPATH`), then `DT_RUNPATH`, `$ORIGIN`
    /// substituted.
    dirs: Vec<String>,
    machine: u16,
    is_64: bool,
}

/// Parsed loader caches, by (layer, inode) of the file.
type LdCaches = HashMap<(Digest, u64), Arc<LdCache>>;

/// Runtime dependency prefetch: the stacks known, the files examined.
pub struct Loads {
    pub stacks: Stacks,
    examined: Mutex<HashSet<(Digest, u64)>>,
    /// Parsed loader caches, by (layer, inode) of the file.
    ld_caches: Arc<Mutex<LdCaches>>,
    /// Mapped ELF files (programs, libraries) up to this size are fetched
    /// whole when examined; 0 = never.
    pub whole_mapped_below: u64,
    /// Files and uncompressed bytes fetched by follows.
    pub files: AtomicU64,
    pub bytes: AtomicU64,
}

impl Loads {
    pub fn new(whole_mapped_below: u64) -> Loads {
        Loads {
            stacks: Stacks::default(),
            examined: Mutex::default(),
            ld_caches: Arc::default(),
            whole_mapped_below,
            files: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }

    /// Mark a file examined; false when it was already.
    fn first_time(&self, layer: &Digest, ino: u64) -> bool {
        let mut examined = self.examined.lock();
        if examined.len() >= MAX_EXAMINED {
            examined.clear();
        }
        examined.insert((*layer, ino))
    }

    /// A read reached the start of file `ino` of `layer` (and its first
    /// bytes are present): follow what it loads, in the stacks that hold
    /// the layer. `layer_of` finds the resolved layers of a stack.
    pub async fn first_read(
        &self,
        layer: &Arc<Layer>,
        ino: u64,
        layer_of: impl Fn(&str) -> Option<Arc<Layer>>,
    ) {
        if self.examined.lock().contains(&(layer.digest, ino)) {
            return;
        }
        for digests in self.stacks.holding(&layer.digest.to_string()) {
            let stack = Stack::new(digests.iter().filter_map(|d| layer_of(d)).collect());
            let Some(at) = stack.position(&layer.digest) else {
                continue;
            };
            let start = Found {
                path: layer.index.path_of(ino),
                at,
                ino,
                what: What::Program,
            };
            let own = layer.index.inode(ino).map_or(0, |n| n.size());
            let done = self.follow(&stack, vec![start], &[]).await;
            // The file read is not counted: what it loads is.
            self.count(
                done.files.len().saturating_sub(1),
                done.bytes.saturating_sub(own),
            );
            if done.files.len() > 1 {
                tracing::debug!(layer = %layer.digest, file = %done.files[0], files = ?&done.files[1..], bytes = done.bytes, "fetched what the file loads");
            }
        }
    }

    /// Fetch `start` and everything the programs among them load, found
    /// through `stack`: each file's follow-ups start as soon as it is
    /// examined. `path`: the directories a bare interpreter name (`#!/usr/bin/env
    /// perl`) is looked up in (the default `PATH` when empty).
    pub async fn follow(&self, stack: &Stack, start: Vec<Found>, path: &[String]) -> Followed {
        let path: Vec<String> = if path.is_empty() {
            crate::entrypoint::DEFAULT_PATH
                .split(':')
                .map(str::to_string)
                .collect()
        } else {
            path.to_vec()
        };
        let mut out = Followed::default();
        let mut pending = start;
        let mut seen: HashSet<(usize, u64)> = HashSet::new();
        // The loader's cache: fetched alongside the first files, awaited
        // when the first library is looked up.
        let mut ld_cache = Some(self.ld_cache(stack));
        let mut cache: Option<Arc<LdCache>> = None;
        let mut set = tokio::task::JoinSet::new();
        loop {
            for f in pending.drain(..) {
                if out.files.len() >= MAX_FILES || !seen.insert((f.at, f.ino)) {
                    continue;
                }
                let layer = stack.layer(f.at).clone();
                if f.what == What::Program && !self.first_time(&layer.digest, f.ino) {
                    continue;
                }
                let Some(size) = layer.index.inode(f.ino).map(|n| n.size()) else {
                    continue;
                };
                if out.bytes + size > MAX_BYTES {
                    continue;
                }
                out.bytes += size;
                out.files.push(f.path.clone());
                let whole = self.whole_mapped_below;
                set.spawn(examine(layer, f.ino, f.path, size, f.what, whole));
            }
            let Some(done) = set.join_next().await else {
                break;
            };
            let Ok(leads) = done else {
                continue;
            };
            for p in leads.programs {
                let candidates: Vec<String> = if p.starts_with('/') {
                    vec![p]
                } else {
                    path.iter().map(|d| format!("{d}/{p}")).collect()
                };
                pending.extend(found(stack, &candidates, What::Program));
            }
            if leads.libraries.is_empty() {
                continue;
            }
            if let Some(pending_cache) = ld_cache.take() {
                cache = pending_cache.await;
            }
            for lib in leads.libraries {
                let paths = search(&lib, cache.as_deref());
                pending.extend(found(stack, &paths, What::Program));
            }
        }
        out
    }

    /// Count files fetched because a program loads them (metrics).
    pub fn count(&self, files: usize, bytes: u64) {
        self.files.fetch_add(files as u64, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The stack's loader cache: a future that fetches and parses it (once
    /// per file: parsed caches are kept).
    fn ld_cache(
        &self,
        stack: &Stack,
    ) -> impl std::future::Future<Output = Option<Arc<LdCache>>> + use<> {
        let known = stack.resolve(LD_CACHE).map(|(at, ino)| {
            let layer = stack.layer(at).clone();
            let parsed = self.ld_caches.lock().get(&(layer.digest, ino)).cloned();
            (layer, ino, parsed)
        });
        let caches = self.ld_caches.clone();
        async move {
            let (layer, ino, parsed) = known?;
            if parsed.is_some() {
                return parsed;
            }
            let size = layer.index.inode(ino)?.size();
            if size > ldcache::MAX_SIZE {
                return None;
            }
            let bytes = read(&layer, ino, 0, size).await?;
            let parsed = Arc::new(LdCache::parse(&bytes)?);
            let mut caches = caches.lock();
            if caches.len() >= MAX_LD_CACHES {
                caches.clear();
            }
            caches.insert((layer.digest, ino), parsed.clone());
            Some(parsed)
        }
    }
}

/// The first of `paths` that is a regular file of `stack`.
fn found(stack: &Stack, paths: &[String], what: What) -> Option<Found> {
    stack.first_file(paths).map(|(path, at, ino)| Found {
        path,
        at,
        ino,
        what,
    })
}

/// Where the loader looks for `lib`, in its order: the object's own
/// directories, the cache, the default directories.
fn search(lib: &Library, cache: Option<&LdCache>) -> Vec<String> {
    if lib.name.contains('/') {
        return vec![lib.name.clone()];
    }
    let mut out: Vec<String> = lib
        .dirs
        .iter()
        .map(|d| format!("{}/{}", d.trim_end_matches('/'), lib.name))
        .collect();
    if let Some(cache) = cache {
        out.extend(
            cache
                .lookup(&lib.name, lib.machine, lib.is_64)
                .into_iter()
                .map(str::to_string),
        );
    }
    out.extend(
        default_dirs(lib.machine, lib.is_64)
            .into_iter()
            .map(|d| format!("{d}/{}", lib.name)),
    );
    out
}

/// The loader's default directories when neither the object nor the
/// cache names the library: the multiarch ones of Debian's layout for the
/// machine, then the classic ones.
fn default_dirs(machine: u16, is_64: bool) -> Vec<String> {
    use goblin::elf::header::*;
    let triple = match (machine, is_64) {
        (EM_X86_64, true) => Some("x86_64-linux-gnu"),
        (EM_AARCH64, true) => Some("aarch64-linux-gnu"),
        (EM_ARM, false) => Some("arm-linux-gnueabihf"),
        (EM_PPC64, true) => Some("powerpc64le-linux-gnu"),
        (EM_S390, true) => Some("s390x-linux-gnu"),
        (EM_386, false) => Some("i386-linux-gnu"),
        _ => None,
    };
    let mut out = Vec::new();
    if let Some(t) = triple {
        out.push(format!("/lib/{t}"));
        out.push(format!("/usr/lib/{t}"));
    }
    if is_64 {
        out.extend(["/lib64", "/usr/lib64"].map(str::to_string));
    }
    out.extend(["/lib", "/usr/lib"].map(str::to_string));
    out
}

/// Bytes `[offset, offset + len)` of a file: fetched, then read from the
/// layer's cache file.
async fn read(layer: &Arc<Layer>, ino: u64, offset: u64, len: u64) -> Option<Vec<u8>> {
    if let Err(e) = layer.fetch_for(&[(ino, offset, len)], Purpose::Loads).await {
        tracing::debug!(layer = %layer.digest, file = %layer.index.path_of(ino), error = %e, "dependency prefetch: read failed");
        return None;
    }
    let path = layer.content_path(ino);
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(path).ok()?;
        let mut buf = vec![0u8; usize::try_from(len).ok()?];
        file.read_exact_at(&mut buf, offset).ok()?;
        Some(buf)
    })
    .await
    .ok()
    .flatten()
}

/// Fetch one file found and read what it leads to.
async fn examine(
    layer: Arc<Layer>,
    ino: u64,
    path: String,
    size: u64,
    what: What,
    whole_mapped_below: u64,
) -> Leads {
    let mut leads = Leads::default();
    if what == What::Data {
        if let Err(e) = layer.fetch_for(&[(ino, 0, size)], Purpose::Loads).await {
            tracing::debug!(layer = %layer.digest, file = %path, error = %e, "dependency prefetch failed");
        }
        return leads;
    }
    let head_len = size.min(elf::HEAD);
    let Some(head) = read(&layer, ino, 0, head_len).await else {
        return leads;
    };
    let e = match elf::head(&head) {
        Head::Other => return leads,
        Head::Script {
            interpreter,
            via_env,
        } => {
            leads.programs.push(interpreter);
            leads.programs.extend(via_env);
            return leads;
        }
        Head::Elf(e) => e,
    };
    if e.mapped && size > head_len && size <= whole_mapped_below {
        let layer = layer.clone();
        tokio::spawn(async move {
            let _ = layer.fetch_for(&[(ino, 0, size)], Purpose::Loads).await;
        });
    }
    // Each piece from the head when it is there, else fetched.
    let piece = |r: std::ops::Range<u64>| {
        let layer = layer.clone();
        let within =
            (r.end <= head.len() as u64).then(|| head[r.start as usize..r.end as usize].to_vec());
        async move {
            match within {
                Some(b) => Some(b),
                None => read(&layer, ino, r.start, r.end - r.start).await,
            }
        }
    };
    if let Some(r) = e.interpreter.clone()
        && let Some(bytes) = piece(r).await
    {
        leads.programs.extend(e.interpreter_path(&bytes));
    }
    let Some(r) = e.dynamic.clone() else {
        return leads;
    };
    let Some(bytes) = piece(r).await else {
        return leads;
    };
    let dynamic = e.dynamic(&bytes);
    let (Some(r), false) = (dynamic.strings.clone(), dynamic.is_empty()) else {
        return leads;
    };
    let Some(strings) = piece(r).await else {
        return leads;
    };
    let names = dynamic.names(&strings);
    let origin = path.rsplit_once('/').map_or("/", |(d, _)| d).to_string();
    // The loader ignores DT_RPATH when DT_RUNPATH is set.
    let own = if names.runpath.is_empty() {
        &names.rpath
    } else {
        &names.runpath
    };
    let dirs: Vec<String> = own
        .iter()
        .map(|d| d.replace("$ORIGIN", &origin).replace("${ORIGIN}", &origin))
        .filter(|d| d.starts_with('/') && !d.contains('$'))
        .collect();
    leads.libraries = names
        .libraries
        .into_iter()
        .map(|name| Library {
            name,
            dirs: dirs.clone(),
            machine: e.machine,
            is_64: e.is_64,
        })
        .collect();
    leads
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libraries_are_searched_in_the_loaders_order() {
        let lib = Library {
            name: "libfoo.so.1".into(),
            dirs: vec!["/opt/app/lib/".into()],
            machine: goblin::elf::header::EM_X86_64,
            is_64: true,
        };
        let paths = search(&lib, None);
        assert_eq!(paths[0], "/opt/app/lib/libfoo.so.1");
        assert_eq!(paths[1], "/lib/x86_64-linux-gnu/libfoo.so.1");
        assert_eq!(paths.last().unwrap(), "/usr/lib/libfoo.so.1");
        let by_path = Library {
            name: "/abs/libbar.so".into(),
            ..lib
        };
        assert_eq!(search(&by_path, None), ["/abs/libbar.so"]);
    }
}
