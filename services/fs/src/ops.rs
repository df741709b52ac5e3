//! The FUSE filesystem: the mount root lists attached layers; each layer's
//! tree is read straight from its mapped TOC index.
//!
//! Metadata operations (lookup, getattr, readdir, readlink, xattrs) are
//! answered from the index on the FUSE thread: no allocation per entry, no
//! I/O. Reads of present chunks are `pread`s of the cache file, also on the
//! FUSE thread. A read that needs missing chunks moves its reply into a task
//! on the tokio runtime, which asks the fetcher and answers when the chunks
//! are present, so FUSE threads never wait for the network.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use fuser::{
    AccessFlags, Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};

use crate::FsShared;
use crate::entries::{ROOT_TTL, layer_attr};
use crate::layers::{Attached, MOUNT_ROOT};
use crate::metrics::Op;
use crate::readahead::{SMALL_FILE, present, small_siblings};

/// The `fuser::Filesystem` of the node's mount.
pub struct StargazeFs {
    pub shared: Arc<FsShared>,
}

impl StargazeFs {
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
                // execve opens with __FMODE_EXEC (through overlayfs too):
                // what the program loads is fetched from now, not as its
                // loader finds it one round trip at a time.
                if flags.0 & FMODE_EXEC != 0 {
                    let (source, digest) = (self.shared.source.clone(), a.digest.clone());
                    self.shared
                        .runtime
                        .spawn(async move { source.executing(&digest, local).await });
                }
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
        // Missing chunks: fetch on the runtime and answer from there (the
        // fetcher fetches small files whole: `[fetcher] whole_file_below`).
        let (fetch_off, fetch_len) = (offset, end - offset);
        // A small file is often read with its neighbours (modules of a
        // package, locale files): fetch the next small ones of its directory
        // alongside, at the cost of a few KiB instead of a round trip each.
        let siblings = if file_size <= SMALL_FILE {
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
/// The open flag execve adds (`__FMODE_EXEC`); FUSE passes it on.
const FMODE_EXEC: i32 = 0o40;

fn libc_o_accmode() -> i32 {
    0o3
}
