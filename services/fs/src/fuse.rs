//! The FUSE filesystem: the mount root lists attached layers; each layer's
//! tree is read straight from its mapped TOC index.
//!
//! Metadata operations (lookup, getattr, readdir, readlink, xattrs) are
//! answered from the index on the FUSE thread: no allocation per entry, no
//! I/O. Reads of present chunks are `pread`s of the cache file, also on the
//! FUSE thread. A read that needs missing chunks moves its reply into a task
//! on the tokio runtime, which asks the fetcher and answers when the chunks
//! are present, so FUSE threads never wait for the network.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use parking_lot::Mutex;
use stargaze_index::model::kind;

use crate::handover::{self, HandoverError, SessionFile};
use crate::layers::{Attached, LayerTable, MOUNT_ROOT};
use crate::metrics::{FsCounters, Op};
use crate::opens::{Mode, OpenHandle, OpenTable};
use crate::source::ChunkSource;

/// How long the kernel may cache what the mount root lists (layers come and go).
const ROOT_TTL: Duration = Duration::from_secs(1);

/// Everything the FUSE threads and the gRPC service share.
pub struct FsShared {
    pub layers: LayerTable,
    pub source: Arc<dyn ChunkSource>,
    pub runtime: tokio::runtime::Handle,
    /// Entry and attribute timeout inside layers (they never change).
    pub ttl: Duration,
    /// Files up to this size are fetched whole on their first read.
    pub whole_file_below: u64,
    /// Bytes fetched ahead after a read that missed, when reading on.
    pub readahead: u64,
    pub fetch_errors: AtomicU64,
    /// Operation latencies and bytes served, node-wide.
    pub counters: Arc<FsCounters>,
    /// Failed reads, for `stargaze status`.
    pub errors: stargaze_service::metrics::RecentErrors,
    /// FUSE passthrough of files complete in the cache.
    pub passthrough: Passthrough,
    /// Set once mounted: tells the kernel to forget entries (on detach).
    pub notifier: Mutex<Option<fuser::Notifier>>,
    handles: Mutex<HashMap<u64, Arc<std::fs::File>>>,
    next_fh: AtomicU64,
    /// Open handles, recorded so a restarted process knows them.
    opens: OnceLock<OpenTable>,
    /// The session's `/dev/fuse` descriptor (backing files are registered on it).
    dev_fd: AtomicI32,
}

impl FsShared {
    pub fn new(
        source: Arc<dyn ChunkSource>,
        runtime: tokio::runtime::Handle,
        ttl: Duration,
    ) -> FsShared {
        FsShared {
            layers: LayerTable::default(),
            source,
            runtime,
            ttl,
            whole_file_below: 128 << 10,
            readahead: 1 << 20,
            fetch_errors: AtomicU64::new(0),
            counters: Arc::default(),
            errors: Default::default(),
            passthrough: Passthrough::default(),
            notifier: Mutex::new(None),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            opens: OnceLock::new(),
            dev_fd: AtomicI32::new(-1),
        }
    }

    /// A handle number for a new open of `ino`.
    fn new_handle(&self, ino: u64) -> u64 {
        match self.opens.get() {
            Some(t) => t.open_handle(ino, Mode::Cached),
            None => self.next_fh.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Take over the handles a previous process left open: their numbers
    /// stay reserved and their inodes keep their I/O mode.
    fn restore_handles(&self, left: Vec<OpenHandle>) {
        let p = &self.passthrough;
        let wanted = p.wanted.load(Ordering::Relaxed);
        let mut restored = p.restored.lock();
        let mut cached = p.cached.lock();
        let (mut n_cached, mut n_passthrough) = (0, 0);
        for h in left {
            match h.mode {
                Mode::Cached => {
                    n_cached += 1;
                    if wanted {
                        cached.add(h.fh, h.ino);
                    }
                }
                Mode::Passthrough(raw) => {
                    n_passthrough += 1;
                    let r = restored.entry(h.ino).or_insert(Restored {
                        raw,
                        old_handles: 0,
                        held: None,
                    });
                    r.old_handles += 1;
                    p.restored_fh.lock().insert(h.fh, h.ino);
                }
            }
        }
        if n_cached + n_passthrough > 0 {
            tracing::info!(
                cached = n_cached,
                passthrough = n_passthrough,
                inodes_with_backing_files = restored.len(),
                "took over the files the previous process left open"
            );
        }
    }
}

/// FUSE passthrough: a file whose every chunk is in the cache is opened with
/// its cache file as the kernel's backing file, so reads never reach this
/// process. Asked for with `[fs] passthrough`; the kernel must offer it at
/// init (Linux >= 6.9) and accept the backing file (root, cache on a
/// non-stacked filesystem). If either refuses, files are served through
/// `read` as before and the reason is logged once.
#[derive(Default)]
pub struct Passthrough {
    /// Asked for in the configuration.
    pub wanted: AtomicBool,
    /// Granted by the kernel and not given up after a refused backing file.
    pub active: AtomicBool,
    /// Backing ids by open handle (closed when the last handle of the
    /// inode is released) and by inode (shared by concurrent opens).
    by_handle: Mutex<HashMap<u64, Arc<fuser::BackingId>>>,
    /// (with the kernel's number of the id, for the open table).
    by_inode: Mutex<HashMap<u64, (std::sync::Weak<fuser::BackingId>, u32)>>,
    /// Files opened with passthrough.
    pub opens: AtomicU64,
    /// Handles opened without passthrough. The kernel refuses (EIO) a
    /// passthrough open of an inode that has files open in cached mode, e.g.
    /// a binary that started running before it was complete: such an inode
    /// is opened in cached mode until its last cached handle is released.
    cached: Mutex<CachedOpens>,
    /// Backing ids a previous process registered, by inode, while handles
    /// it opened are open: new opens of the inode must use the same one.
    restored: Mutex<HashMap<u64, Restored>>,
    /// Those handles, to their inode.
    restored_fh: Mutex<HashMap<u64, u64>>,
}

/// A backing id inherited from a previous process.
struct Restored {
    raw: u32,
    /// Its handles still open.
    old_handles: u32,
    /// Wrapped at the first new open; dropped (closing the id once no new
    /// handle holds it either) when the old handles are gone.
    held: Option<Arc<fuser::BackingId>>,
}

/// `FUSE_DEV_IOC_BACKING_CLOSE`: `_IOW(229, 2, uint32_t)`.
const FUSE_DEV_IOC_BACKING_CLOSE: libc::c_ulong = (1 << 30) | (4 << 16) | (229 << 8) | 2;

/// Handles open in cached mode (tracked only while passthrough is wanted).
#[derive(Default)]
struct CachedOpens {
    inode_of: HashMap<u64, u64>,
    per_inode: HashMap<u64, u32>,
}

impl CachedOpens {
    fn add(&mut self, fh: u64, ino: u64) {
        self.inode_of.insert(fh, ino);
        *self.per_inode.entry(ino).or_default() += 1;
    }

    fn remove(&mut self, fh: u64) {
        if let Some(ino) = self.inode_of.remove(&fh)
            && let Some(n) = self.per_inode.get_mut(&ino)
        {
            *n -= 1;
            if *n == 0 {
                self.per_inode.remove(&ino);
            }
        }
    }
}

impl Passthrough {
    /// Stop using passthrough, saying why once.
    fn give_up(&self, why: &str) {
        if self.active.swap(false, Ordering::AcqRel) {
            tracing::warn!(
                reason = why,
                "FUSE passthrough off: files are served through read()"
            );
        }
    }

    fn release(&self, fh: u64, dev_fd: RawFd) {
        // A handle of the previous process: the last one of its inode
        // lets the inherited backing id go.
        let old = self.restored_fh.lock().remove(&fh);
        if let Some(ino) = old {
            let mut restored = self.restored.lock();
            if let Some(r) = restored.get_mut(&ino) {
                r.old_handles -= 1;
                if r.old_handles == 0 {
                    let r = restored.remove(&ino).expect("present");
                    if r.held.is_none() && dev_fd >= 0 {
                        // Never used since: close it here.
                        // SAFETY: an ioctl on our /dev/fuse descriptor with a local u32.
                        unsafe {
                            libc::ioctl(dev_fd, FUSE_DEV_IOC_BACKING_CLOSE as _, &r.raw);
                        }
                    }
                }
            }
        }
        // `wanted` is set before mounting and never changes: without
        // passthrough there is nothing else to forget.
        if !self.wanted.load(Ordering::Relaxed) {
            return;
        }
        self.by_handle.lock().remove(&fh);
        self.cached.lock().remove(fh);
    }

    fn has_backing(&self, ino: u64) -> bool {
        self.restored.lock().contains_key(&ino)
            || self
                .by_inode
                .lock()
                .get(&ino)
                .is_some_and(|(w, _)| w.strong_count() > 0)
    }
}

/// A directory entry to list: (inode, offset of the next entry, type, name, attributes).
type Listed = (u64, u64, FileType, Vec<u8>, Option<FileAttr>);

/// The `fuser::Filesystem` of the node's mount.
pub struct StargazeFs {
    pub shared: Arc<FsShared>,
}

fn file_type(k: u8) -> FileType {
    match k {
        kind::DIR => FileType::Directory,
        kind::SYMLINK => FileType::Symlink,
        kind::CHAR => FileType::CharDevice,
        kind::BLOCK => FileType::BlockDevice,
        kind::FIFO => FileType::NamedPipe,
        _ => FileType::RegularFile,
    }
}

/// Linux `new_encode_dev`.
fn rdev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

fn time(secs: i64, nsec: u32) -> SystemTime {
    let t = if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    };
    t + Duration::from_nanos(u64::from(nsec))
}

fn layer_attr(a: &Attached, local: u64) -> Option<FileAttr> {
    let n = a.index.inode(local)?;
    let t = time(n.mtime(), n.mtime_nsec());
    let (major, minor) = n.rdev();
    Some(FileAttr {
        ino: INodeNo(a.global(local)),
        size: n.size(),
        blocks: n.blocks(),
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: file_type(n.kind()),
        perm: n.perm() as u16,
        nlink: n.nlink(),
        uid: n.uid(),
        gid: n.gid(),
        rdev: rdev(major, minor),
        blksize: 4096,
        flags: 0,
    })
}

impl StargazeFs {
    fn root_attr(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo(MOUNT_ROOT),
            size: 0,
            blocks: 0,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: FileType::Directory,
            perm: 0o755,
            nlink: 2 + self.shared.layers.len() as u32,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// (ino, offset of the next entry, type, name, attr) of a directory
    /// listing from `offset` on.
    fn listing(&self, ino: u64, offset: u64) -> Result<Vec<Listed>, Errno> {
        let mut out = Vec::new();
        if ino == MOUNT_ROOT {
            let root = self.root_attr();
            let mut all = vec![
                (MOUNT_ROOT, FileType::Directory, b".".to_vec(), Some(root)),
                (MOUNT_ROOT, FileType::Directory, b"..".to_vec(), Some(root)),
            ];
            for a in self.shared.layers.list() {
                all.push((
                    a.global(1),
                    FileType::Directory,
                    a.name.as_bytes().to_vec(),
                    layer_attr(&a, 1),
                ));
            }
            for (i, (ino, t, name, attr)) in all.into_iter().enumerate().skip(offset as usize) {
                out.push((ino, i as u64 + 1, t, name, attr));
            }
            return Ok(out);
        }
        let (a, local) = self.shared.layers.resolve(ino).ok_or(Errno::ENOENT)?;
        let node = a.index.inode(local).ok_or(Errno::ENOENT)?;
        if !node.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        let parent = if local == stargaze_index::ROOT_INO {
            MOUNT_ROOT
        } else {
            a.global(node.parent())
        };
        if offset == 0 {
            out.push((
                ino,
                1,
                FileType::Directory,
                b".".to_vec(),
                layer_attr(&a, local),
            ));
        }
        if offset <= 1 {
            let pattr = if parent == MOUNT_ROOT {
                Some(self.root_attr())
            } else {
                layer_attr(&a, node.parent())
            };
            out.push((parent, 2, FileType::Directory, b"..".to_vec(), pattr));
        }
        for d in a.index.readdir(local, offset.saturating_sub(2) as usize) {
            out.push((
                a.global(d.ino),
                d.offset as u64 + 3,
                file_type(d.kind),
                d.name.to_vec(),
                layer_attr(&a, d.ino),
            ));
        }
        Ok(out)
    }

    /// Serve `[offset, end)` of a file from its cache file.
    fn read_cached(
        &self,
        a: &Attached,
        local: u64,
        fh: u64,
        offset: u64,
        end: u64,
    ) -> Result<Vec<u8>, Errno> {
        let file = self.content(a, local, fh)?;
        let mut buf = vec![0u8; (end - offset) as usize];
        file.read_exact_at(&mut buf, offset)
            .map_err(|_| Errno::EIO)?;
        Ok(buf)
    }

    /// The kernel backing id of a complete file's cache file, shared by all
    /// open handles of the inode and kept until the last one is released.
    fn backing(
        &self,
        a: &Attached,
        local: u64,
        fh: u64,
        reply: &ReplyOpen,
    ) -> std::io::Result<Arc<fuser::BackingId>> {
        let p = &self.shared.passthrough;
        let ino = a.global(local);
        let mut by_inode = p.by_inode.lock();
        let live = by_inode
            .get(&ino)
            .and_then(|(w, raw)| Some((w.upgrade()?, *raw)));
        let (id, raw) = match live {
            Some(live) => live,
            None => {
                let mut restored = p.restored.lock();
                let (id, raw) = if let Some(r) = restored.get_mut(&ino) {
                    // The kernel's inode already has this backing file.
                    let id = match &r.held {
                        Some(id) => id.clone(),
                        None => {
                            // SAFETY: the id is open on this connection (the
                            // previous process never closed it) and is closed
                            // only through this wrapper from now on.
                            let id = Arc::new(unsafe { reply.wrap_backing(r.raw) });
                            r.held = Some(id.clone());
                            id
                        }
                    };
                    (id, r.raw)
                } else {
                    let file = std::fs::File::open(
                        a.cache.layer_file_path(a.index.layer_digest(), local),
                    )?;
                    // Set by `serve` before the session's threads start.
                    let dev = self.shared.dev_fd.load(Ordering::Relaxed);
                    // SAFETY: the session's descriptor lives as long as the mount.
                    let dev = unsafe { BorrowedFd::borrow_raw(dev) };
                    // The raw id goes into the open-file table.
                    let raw = fuser::BackingId::create_raw(dev, &file)?;
                    // SAFETY: just opened on this connection; closed only
                    // through the wrapper.
                    (Arc::new(unsafe { reply.wrap_backing(raw) }), raw)
                };
                drop(restored);
                by_inode.retain(|_, (w, _)| w.strong_count() > 0);
                by_inode.insert(ino, (Arc::downgrade(&id), raw));
                (id, raw)
            }
        };
        drop(by_inode);
        if let Some(t) = self.shared.opens.get() {
            t.set_mode(fh, Mode::Passthrough(raw));
        }
        p.by_handle.lock().insert(fh, id.clone());
        Ok(id)
    }

    /// The open cache file of a handle (opened on first use: the file may
    /// not exist before the first chunk arrives).
    fn content(&self, a: &Attached, local: u64, fh: u64) -> Result<Arc<std::fs::File>, Errno> {
        if let Some(f) = self.shared.handles.lock().get(&fh) {
            return Ok(f.clone());
        }
        let path = a.cache.layer_file_path(a.index.layer_digest(), local);
        let f = Arc::new(std::fs::File::open(path).map_err(|_| Errno::EIO)?);
        if fh != 0 {
            self.shared.handles.lock().insert(fh, f.clone());
        }
        Ok(f)
    }
}

/// Small regular files that follow `local` in its directory (name order,
/// which is also the order image builders write them), not yet present.
fn small_siblings(a: &Attached, local: u64) -> Vec<(u64, u64)> {
    const MAX_FILES: usize = 8;
    const MAX_FILE: u64 = 64 << 10;
    const MAX_BYTES: u64 = 256 << 10;
    const SCAN: usize = 32;
    let Some(node) = a.index.inode(local) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut bytes = 0;
    let mut after = false;
    let mut scanned = 0;
    for e in a.index.readdir(node.parent(), 0) {
        if !after {
            after = e.ino == local;
            continue;
        }
        scanned += 1;
        if scanned > SCAN || out.len() >= MAX_FILES {
            break;
        }
        let Some(n) = a.index.inode(e.ino) else {
            continue;
        };
        let size = n.size();
        if !n.is_reg() || size == 0 || size > MAX_FILE || bytes + size > MAX_BYTES {
            continue;
        }
        if !present(a, e.ino, 0, size) {
            out.push((e.ino, size));
            bytes += size;
        }
    }
    out
}

/// Are the chunks of `[offset, end)` all present?
fn present(a: &Attached, local: u64, offset: u64, end: u64) -> bool {
    let Some(n) = a.index.inode(local) else {
        return false;
    };
    let Some(first) = n.chunk_at(offset) else {
        return end <= offset;
    };
    for i in first.index..n.chunk_count() {
        let Some(c) = n.chunk(i) else { return false };
        if c.file_offset >= end {
            break;
        }
        if !a.presence.is_present(c.global) {
            return false;
        }
    }
    true
}

impl Filesystem for StargazeFs {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        let p = &self.shared.passthrough;
        if !p.wanted.load(Ordering::Acquire) {
            return Ok(());
        }
        match config.add_capabilities(fuser::InitFlags::FUSE_PASSTHROUGH) {
            Ok(()) => {
                // Depth 1: the mount itself can still be a lower layer of an
                // overlay (the kernel allows two levels of stacking).
                let _ = config.set_max_stack_depth(1);
                p.active.store(true, Ordering::Release);
                tracing::info!("FUSE passthrough on for files complete in the cache");
            }
            Err(_) => tracing::warn!(
                "FUSE passthrough is configured but this kernel does not offer it (needs Linux >= 6.9): files are served through read()"
            ),
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _timer = self.shared.counters.timer(Op::Lookup);
        let parent = u64::from(parent);
        if parent == MOUNT_ROOT {
            match self
                .shared
                .layers
                .by_name(&name.to_string_lossy())
                .and_then(|a| layer_attr(&a, 1))
            {
                Some(attr) => reply.entry(&ROOT_TTL, &attr, Generation(0)),
                None => reply.error(Errno::ENOENT),
            }
            return;
        }
        let Some((a, local)) = self.shared.layers.resolve(parent) else {
            return reply.error(Errno::ENOENT);
        };
        match a
            .index
            .lookup(local, name.as_bytes())
            .and_then(|ino| layer_attr(&a, ino))
        {
            Some(attr) => reply.entry(&self.shared.ttl, &attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _timer = self.shared.counters.timer(Op::Getattr);
        let ino = u64::from(ino);
        if ino == MOUNT_ROOT {
            return reply.attr(&ROOT_TTL, &self.root_attr());
        }
        match self
            .shared
            .layers
            .resolve(ino)
            .and_then(|(a, l)| layer_attr(&a, l))
        {
            Some(attr) => reply.attr(&self.shared.ttl, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _timer = self.shared.counters.timer(Op::Readlink);
        match self
            .shared
            .layers
            .resolve(u64::from(ino))
            .and_then(|(a, l)| a.index.inode(l)?.symlink().map(<[u8]>::to_vec))
        {
            Some(t) => reply.data(&t),
            None => reply.error(Errno::EINVAL),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _timer = self.shared.counters.timer(Op::Open);
        let Some((a, local)) = self.shared.layers.resolve(u64::from(ino)) else {
            return reply.error(Errno::ENOENT);
        };
        if flags.0 & (libc_o_accmode()) != 0 {
            return reply.error(Errno::EROFS);
        }
        match a.index.inode(local) {
            Some(n) if n.is_reg() => {
                let ino = a.global(local);
                let fh = self.shared.new_handle(ino);
                let p = &self.shared.passthrough;
                if !p.wanted.load(Ordering::Relaxed) {
                    // The layer never changes: let the kernel keep cached pages.
                    return reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
                }
                // Held across the decision and the reply, so a concurrent
                // open of the same inode cannot choose the other mode.
                let mut cached = p.cached.lock();
                // An inode with a live backing file stays in passthrough
                // mode even if passthrough was given up meanwhile: the
                // kernel refuses mixing the modes on one inode.
                if n.size() > 0
                    && !cached.per_inode.contains_key(&ino)
                    && (p.has_backing(ino)
                        || (p.active.load(Ordering::Acquire) && present(&a, local, 0, n.size())))
                {
                    match self.backing(&a, local, fh, &reply) {
                        Ok(id) => {
                            p.opens.fetch_add(1, Ordering::Relaxed);
                            return reply.opened_passthrough(
                                FileHandle(fh),
                                FopenFlags::empty(),
                                &id,
                            );
                        }
                        // The cache file vanished: serve through read().
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        // The kernel refused the backing file (not root, a
                        // stacked cache filesystem): it would refuse again.
                        Err(e) => p.give_up(&format!(
                            "the kernel refused a cache file as backing file ({e}); put the cache on a local non-stacked filesystem and run as root"
                        )),
                    }
                }
                cached.add(fh, ino);
                drop(cached);
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
            }
            Some(_) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let timer = self.shared.counters.timer(Op::Read);
        let Some((a, local)) = self.shared.layers.resolve(u64::from(ino)) else {
            return reply.error(Errno::ENOENT);
        };
        let Some(node) = a.index.inode(local) else {
            return reply.error(Errno::ENOENT);
        };
        a.stats.reads.fetch_add(1, Ordering::Relaxed);
        let file_size = node.size();
        let end = offset.saturating_add(size as u64).min(file_size);
        if offset >= end {
            return reply.data(&[]);
        }
        let fh = u64::from(fh);
        if present(&a, local, offset, end) {
            match self.read_cached(&a, local, fh, offset, end) {
                Ok(buf) => {
                    self.shared
                        .counters
                        .bytes_from_cache
                        .fetch_add(buf.len() as u64, Ordering::Relaxed);
                    reply.data(&buf)
                }
                Err(e) => {
                    a.stats.read_errors.fetch_add(1, Ordering::Relaxed);
                    let file = a.index.path_of(local);
                    tracing::warn!(layer = %a.digest, file = %file, offset, "read of a cached file failed: EIO");
                    self.shared.errors.push(
                        a.digest.clone(),
                        format!("read of {file} at {offset} from the cache failed"),
                    );
                    reply.error(e)
                }
            }
            return;
        }
        // Missing chunks: fetch on the runtime and answer from there.
        let (fetch_off, fetch_len) = if file_size <= self.shared.whole_file_below {
            (0, file_size)
        } else {
            (offset, end - offset)
        };
        // A small file is often read with its neighbours (modules of a
        // package, locale files): fetch the next small ones of its directory
        // alongside, at the cost of a few KiB instead of a round trip each.
        let siblings = if file_size <= self.shared.whole_file_below {
            small_siblings(&a, local)
        } else {
            Vec::new()
        };
        let me = StargazeFs {
            shared: self.shared.clone(),
        };
        let readahead = self.shared.readahead;
        self.shared.runtime.spawn(async move {
            let timer = timer;
            let source = me.shared.source.clone();
            if !siblings.is_empty() {
                let (source, digest) = (source.clone(), a.digest.clone());
                tokio::spawn(async move { source.prefetch_files(&digest, siblings).await });
            }
            match source.fetch(&a.digest, local, fetch_off, fetch_len).await {
                Ok(()) => {
                    match me.read_cached(&a, local, fh, offset, end) {
                        Ok(buf) => {
                            me.shared.counters.bytes_after_fetch.fetch_add(buf.len() as u64, Ordering::Relaxed);
                            reply.data(&buf)
                        }
                        Err(e) => reply.error(e),
                    }
                    drop(timer);
                    // Reading on through a large file: fetch what comes next.
                    if offset > 0 && end < file_size && readahead > 0 {
                        let _ = source
                            .fetch(&a.digest, local, end, readahead.min(file_size - end))
                            .await;
                    }
                }
                Err(reason) => {
                    a.stats.read_errors.fetch_add(1, Ordering::Relaxed);
                    me.shared.fetch_errors.fetch_add(1, Ordering::Relaxed);
                    let file = a.index.path_of(local);
                    tracing::warn!(layer = %a.digest, file = %file, offset, %reason, "read failed: EIO");
                    me.shared.errors.push(a.digest.clone(), format!("read of {file} at {offset} failed: {reason}"));
                    reply.error(Errno::EIO);
                }
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _timer = self.shared.counters.timer(Op::Release);
        let fh = u64::from(fh);
        self.shared.handles.lock().remove(&fh);
        self.shared
            .passthrough
            .release(fh, self.shared.dev_fd.load(Ordering::Relaxed));
        // Last: from here on the number may be given to a new open, which
        // must not find this handle's file or backing id.
        if let Some(t) = self.shared.opens.get() {
            t.release(fh);
        }
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Read-only: nothing to write back. (Left unimplemented, fuser
        // would log a warning for the first close on every mount.)
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _timer = self.shared.counters.timer(Op::Readdir);
        match self.listing(u64::from(ino), offset) {
            Ok(entries) => {
                for (ino, next, t, name, _) in entries {
                    if reply.add(INodeNo(ino), next, t, OsStr::from_bytes(&name)) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _timer = self.shared.counters.timer(Op::Readdirplus);
        let ttl = if u64::from(ino) == MOUNT_ROOT {
            ROOT_TTL
        } else {
            self.shared.ttl
        };
        match self.listing(u64::from(ino), offset) {
            Ok(entries) => {
                for (ino, next, _, name, attr) in entries {
                    let Some(attr) = attr else { continue };
                    if reply.add(
                        INodeNo(ino),
                        next,
                        OsStr::from_bytes(&name),
                        &ttl,
                        &attr,
                        Generation(0),
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _timer = self.shared.counters.timer(Op::Statfs);
        reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _timer = self.shared.counters.timer(Op::Getxattr);
        let Some((a, local)) = self.shared.layers.resolve(u64::from(ino)) else {
            return reply.error(Errno::ENODATA);
        };
        match a.index.inode(local).and_then(|n| n.xattr(name.as_bytes())) {
            Some(v) if size == 0 => reply.size(v.len() as u32),
            Some(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Some(v) => reply.data(v),
            None => reply.error(Errno::ENODATA),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _timer = self.shared.counters.timer(Op::Listxattr);
        let mut names = Vec::new();
        if let Some((a, local)) = self.shared.layers.resolve(u64::from(ino))
            && let Some(n) = a.index.inode(local)
        {
            for x in n.xattrs() {
                names.extend_from_slice(x.name);
                names.push(0);
            }
        }
        if size == 0 {
            reply.size(names.len() as u32)
        } else if names.len() > size as usize {
            reply.error(Errno::ERANGE)
        } else {
            reply.data(&names)
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        let _timer = self.shared.counters.timer(Op::Access);
        // `default_permissions`: the kernel checks modes itself.
        reply.ok();
    }
}

/// O_WRONLY | O_RDWR
fn libc_o_accmode() -> i32 {
    0o3
}

/// The node's FUSE mount being served.
pub struct FuseMount {
    session: Option<fuser::BackgroundSession>,
    pub mountpoint: PathBuf,
    /// The session's `/dev/fuse` descriptor (owned by the session).
    pub dev_fd: RawFd,
    /// The connection was inherited from a previous process.
    pub taken_over: bool,
}

impl FuseMount {
    /// Unmount and wait for the session's threads (tests, benchmarks).
    pub fn umount_and_join(mut self) -> std::io::Result<()> {
        if nix::mount::umount(&self.mountpoint).is_err() {
            let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
        }
        match self.session.take() {
            Some(s) => s.join(),
            None => Ok(()),
        }
    }
}

fn session_config(n_threads: usize) -> fuser::Config {
    let mut config = fuser::Config::default();
    config.acl = fuser::SessionACL::All;
    config.n_threads = Some(n_threads.max(1));
    // All threads read the one descriptor systemd keeps: the kernel ends the
    // requests a closing descriptor holds (ECONNABORTED), so requests read
    // through per-thread clones would fail when the process dies, where
    // those on the kept descriptor wait to be resent to the next process.
    config.clone_fd = false;
    config
}

/// Mount the node's filesystem at `mountpoint` with `n_threads` FUSE
/// threads, as a new connection, without a session file.
pub fn mount(
    shared: Arc<FsShared>,
    mountpoint: &Path,
    n_threads: usize,
) -> Result<FuseMount, HandoverError> {
    let (dev, init) = handover::mount_fresh(mountpoint)?;
    serve(shared, mountpoint, n_threads, dev, &init, false)
}

/// Start serving `dev`; `taken_over` when its INIT was answered by a
/// previous process.
fn serve(
    shared: Arc<FsShared>,
    mountpoint: &Path,
    n_threads: usize,
    dev: OwnedFd,
    init: &[u8],
    taken_over: bool,
) -> Result<FuseMount, HandoverError> {
    let session = handover::start_session(
        StargazeFs {
            shared: shared.clone(),
        },
        dev,
        init,
        !taken_over,
        session_config(n_threads),
    )?;
    let dev_fd = session.dev_fd;
    shared.dev_fd.store(dev_fd, Ordering::Release);
    if taken_over {
        // Requests the previous process read and never answered go back to
        // the queue before any thread reads it (once threads run, a resend
        // would also duplicate what they are serving).
        match handover::resend_pending(dev_fd) {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(error = %e, "the kernel cannot resend the requests the previous process held (needs Linux >= 6.9): their callers wait until the mount goes")
            }
        }
    }
    let session = session.session.spawn().map_err(|e| HandoverError::Io {
        what: "starting the FUSE threads".into(),
        source: e,
    })?;
    *shared.notifier.lock() = Some(session.notifier());
    Ok(FuseMount {
        session: Some(session),
        mountpoint: mountpoint.to_path_buf(),
        dev_fd,
        taken_over,
    })
}

/// Detach whatever is mounted at `dir` when it is a dead FUSE mount of
/// ours; `known_ours` skips the liveness probe (a connection systemd still
/// holds but nobody serves would make it wait forever).
pub fn clean_stale_mount(dir: &Path, known_ours: bool) {
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(&dir.to_string_lossy()));
    if !mounted {
        return;
    }
    if !known_ours && std::fs::read_dir(dir).is_ok() {
        tracing::warn!(mountpoint = %dir.display(), "something is already mounted here and answering; leaving it");
        return;
    }
    tracing::warn!(mountpoint = %dir.display(), "detaching a stale mount left by a previous run");
    let _ = nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH);
}

/// Serve the node's mount at `mountpoint`: take over the connection of a
/// previous process when `inherited` (its `/dev/fuse` descriptor, from
/// systemd's store) is still the mount's and the session file describes
/// it; otherwise mount anew. Either way the session file and the open-file
/// table beside the mountpoint describe the new session from then on.
pub fn mount_or_take_over(
    shared: Arc<FsShared>,
    mountpoint: &Path,
    n_threads: usize,
    inherited: Option<OwnedFd>,
) -> Result<FuseMount, HandoverError> {
    let file = SessionFile::beside(mountpoint);
    let state = match file.load() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "starting a new FUSE session");
            None
        }
    };
    let had_fd = inherited.is_some();
    let device_now = handover::mount_device(mountpoint);
    let takeover = match (inherited, state) {
        (Some(fd), Some(state)) if device_now.as_deref() == Some(state.device.as_str()) => {
            hex::decode(&state.init).ok().map(|init| (fd, init, state))
        }
        (Some(_), Some(state)) => {
            tracing::warn!(
                mountpoint = %mountpoint.display(),
                saved = %state.device,
                now = ?device_now,
                "the stored FUSE descriptor is not the mount's any more: mounting anew"
            );
            None
        }
        (Some(_), None) => {
            tracing::warn!(
                "a FUSE descriptor was handed over without a session file: mounting anew"
            );
            None
        }
        (None, _) => None,
    };
    let (table_path, keep) = (OpenTable::beside(mountpoint), takeover.is_some());
    let (table, left) = OpenTable::open(&table_path, keep).map_err(|e| HandoverError::Io {
        what: format!("opening the open-file table {}", table_path.display()),
        source: e,
    })?;
    let _ = shared.opens.set(table);
    let mounted = match takeover {
        Some((dev, init, state)) => {
            shared.restore_handles(left);
            shared.layers.reserve_slots(state.next_slot);
            let mut attached = 0;
            for l in &state.layers {
                match shared.layers.attach_in(
                    &l.digest,
                    &l.index_path,
                    &l.presence_path,
                    Some(l.slot),
                ) {
                    Ok(_) => attached += 1,
                    Err(e) => tracing::warn!(
                        layer = %l.digest,
                        error = %e,
                        "cannot attach a layer of the previous session again: its files answer ENOENT until the snapshotter attaches it"
                    ),
                }
            }
            let m = serve(shared.clone(), mountpoint, n_threads, dev, &init, true)?;
            shared
                .layers
                .journal_to(file, state.init.clone(), state.device.clone());
            tracing::info!(
                mountpoint = %mountpoint.display(),
                layers = attached,
                "took over the FUSE connection of the previous stargaze-fs: running containers keep their files"
            );
            m
        }
        None => {
            // An inherited descriptor that cannot be served: systemd still
            // holds a copy, so the connection would wait forever. End it.
            if had_fd {
                handover::abandon(mountpoint);
            }
            clean_stale_mount(mountpoint, had_fd);
            std::fs::create_dir_all(mountpoint).map_err(|e| HandoverError::Io {
                what: format!("creating the mountpoint {}", mountpoint.display()),
                source: e,
            })?;
            let (dev, init) = handover::mount_fresh(mountpoint)?;
            let device = handover::mount_device(mountpoint).unwrap_or_default();
            let m = serve(shared.clone(), mountpoint, n_threads, dev, &init, false)?;
            shared.layers.journal_to(file, hex::encode(&init), device);
            m
        }
    };
    Ok(mounted)
}

impl FsShared {
    /// Detach a layer and make the kernel forget its directory entry.
    pub fn detach(&self, name: &str) -> bool {
        let found = self.layers.detach(name).is_some();
        if found && let Some(n) = self.notifier.lock().as_ref() {
            let _ = n.inval_entry(INodeNo(MOUNT_ROOT), OsStr::new(name));
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoFetcher;

    #[tonic::async_trait]
    impl ChunkSource for NoFetcher {
        async fn fetch(&self, _: &str, _: u64, _: u64, _: u64) -> Result<(), crate::SourceError> {
            Err(crate::SourceError::InProcess(
                "no fetcher in this test".into(),
            ))
        }
    }

    /// Take a lock on another thread and panic while holding it, as a bug
    /// in one FUSE request would.
    macro_rules! panic_holding {
        ($lock:expr) => {
            std::thread::scope(|s| {
                let bug = s.spawn(|| {
                    let _held = $lock;
                    panic!(concat!("a bug while holding ", stringify!($lock)));
                });
                assert!(bug.join().is_err());
            })
        };
    }

    /// A request that panics while it holds one of the mount's locks must
    /// not turn every later open, read and release into a panic (as a
    /// poisoned std mutex with `.lock().expect(..)` did).
    #[test]
    fn a_panic_while_a_lock_is_held_leaves_later_requests_working() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let shared = FsShared::new(
            Arc::new(NoFetcher),
            rt.handle().clone(),
            Duration::from_secs(1),
        );
        let dir = tempfile::tempdir().unwrap();
        let (table, _) =
            OpenTable::open(&OpenTable::beside(&dir.path().join("mnt")), false).unwrap();
        assert!(shared.opens.set(table).is_ok());
        let p = &shared.passthrough;
        p.wanted.store(true, Ordering::Relaxed);

        panic_holding!(p.by_handle.lock());
        panic_holding!(p.by_inode.lock());
        panic_holding!(p.cached.lock());
        panic_holding!(p.restored.lock());
        panic_holding!(p.restored_fh.lock());

        // What a restarted process, an open and a release take next.
        shared.restore_handles(vec![
            OpenHandle {
                fh: 7,
                ino: 42,
                mode: Mode::Passthrough(3),
            },
            OpenHandle {
                fh: 8,
                ino: 43,
                mode: Mode::Cached,
            },
        ]);
        assert!(p.has_backing(42));
        assert!(!p.has_backing(43));
        let fh = shared.new_handle(44);
        assert_ne!(fh, 0);
        p.release(fh, -1);
        p.release(8, -1);
        p.release(7, -1);
        assert!(!p.has_backing(42));
        assert!(!shared.detach("absent"));
    }
}
