//! The filesystem's operations, whatever transport carries them (fuser on
//! `/dev/fuse` in [`crate::classic`], the io_uring rings in
//! [`crate::uring`]): the mount root lists attached layers; each layer's
//! tree is read straight from its mapped TOC index.
//!
//! Metadata operations (lookup, getattr, readdir, readlink, xattrs) are
//! answered from the index on the calling thread: no allocation per entry,
//! no I/O. Reads of present chunks are `pread`s of the cache file, also on
//! the calling thread. A read that needs missing chunks moves its answer
//! into a task on the tokio runtime, which asks the fetcher and answers
//! when the chunks are present, so transport threads never wait for the
//! network.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fuser::{Errno, FileAttr};

use crate::FsShared;
use crate::entries::{Listed, ROOT_TTL, layer_attr};
use crate::kill_point::{self, Point};
use crate::layers::{Attached, MOUNT_ROOT};
use crate::metrics::Op;
use crate::opens::Mode;
use crate::readahead::{SMALL_FILE, neighbours, present};

/// The node's filesystem, behind either transport.
pub struct StargazeFs {
    pub shared: Arc<FsShared>,
}

/// The result of an open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Opened {
    /// Served through `read`, the kernel keeping cached pages.
    Cached { fh: u64 },
    /// The kernel reads the cache file behind this backing id itself.
    Passthrough { fh: u64, backing_id: u32 },
}

/// An xattr answer: the size asked for, or the bytes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Xattr {
    Size(u32),
    Data(Vec<u8>),
}

/// O_WRONLY | O_RDWR
const O_ACCMODE: i32 = 0o3;
/// Bytes of a file opened for passthrough reported as read for traces:
/// most such files are small ones a prefetch completed; a large program
/// or library is in the trace through the dependency prefetch already.
const PASSTHROUGH_REPORTED: u64 = 1 << 20;
/// The open flag execve adds (`__FMODE_EXEC`); FUSE passes it on.
const FMODE_EXEC: i32 = 0o40;

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
        let path = a.cache.layer_file_path(&a.digest, local);
        let f = Arc::new(std::fs::File::open(path).map_err(|_| Errno::EIO)?);
        if fh != 0 {
            self.shared.handles.lock().insert(fh, f.clone());
        }
        Ok(f)
    }

    pub(crate) fn op_lookup(
        &self,
        parent: u64,
        name: &[u8],
    ) -> Result<(FileAttr, Duration), Errno> {
        let _timer = self.shared.counters.timer(Op::Lookup);
        if parent == MOUNT_ROOT {
            return self
                .shared
                .layers
                .by_name(&String::from_utf8_lossy(name))
                .and_then(|a| layer_attr(&a, 1))
                .map(|attr| (attr, ROOT_TTL))
                .ok_or(Errno::ENOENT);
        }
        let (a, local) = self.shared.layers.resolve(parent).ok_or(Errno::ENOENT)?;
        a.index
            .lookup(local, name)
            .and_then(|ino| layer_attr(&a, ino))
            .map(|attr| (attr, self.shared.ttl))
            .ok_or(Errno::ENOENT)
    }

    pub(crate) fn op_getattr(&self, ino: u64) -> Result<(FileAttr, Duration), Errno> {
        let _timer = self.shared.counters.timer(Op::Getattr);
        if ino == MOUNT_ROOT {
            return Ok((self.root_attr(), ROOT_TTL));
        }
        self.shared
            .layers
            .resolve(ino)
            .and_then(|(a, l)| layer_attr(&a, l))
            .map(|attr| (attr, self.shared.ttl))
            .ok_or(Errno::ENOENT)
    }

    pub(crate) fn op_readlink(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        let _timer = self.shared.counters.timer(Op::Readlink);
        self.shared
            .layers
            .resolve(ino)
            .and_then(|(a, l)| a.index.inode(l)?.symlink().map(<[u8]>::to_vec))
            .ok_or(Errno::EINVAL)
    }

    /// Open `ino` for the kernel's request `unique`.
    pub(crate) fn op_open(&self, ino: u64, flags: i32, unique: u64) -> Result<Opened, Errno> {
        let _timer = self.shared.counters.timer(Op::Open);
        // A request the previous process recorded a handle for and died
        // before answering: the kernel never got that handle and will never
        // release it, so it goes before the open is served again.
        if let Some(fh) = self
            .shared
            .opens
            .get()
            .and_then(|t| t.unanswered(unique, ino))
        {
            tracing::debug!(
                fh,
                ino,
                "an open the previous process recorded and never answered: its handle dropped"
            );
            self.drop_handle(ino, fh);
        }
        let opened = self.open(ino, flags, unique);
        if opened.is_ok() {
            kill_point::reached(&self.shared, Point::OpenRecorded, ino);
        }
        opened
    }

    fn open(&self, ino: u64, flags: i32, unique: u64) -> Result<Opened, Errno> {
        let (a, local) = self.shared.layers.resolve(ino).ok_or(Errno::ENOENT)?;
        if flags & O_ACCMODE != 0 {
            return Err(Errno::EROFS);
        }
        let n = match a.index.inode(local) {
            Some(n) if n.is_reg() => n,
            Some(_) => return Err(Errno::EISDIR),
            None => return Err(Errno::ENOENT),
        };
        // execve opens with __FMODE_EXEC (through overlayfs too): what the
        // program loads is fetched from now, not as its loader finds it one
        // round trip at a time.
        if flags & FMODE_EXEC != 0 {
            let (source, digest) = (self.shared.source.clone(), a.digest);
            self.shared
                .runtime
                .spawn(async move { source.executing(&digest, local).await });
        }
        let ino = a.global(local);
        let p = &self.shared.passthrough;
        if !p.wanted.load(Ordering::Relaxed) {
            // The layer never changes: let the kernel keep cached pages.
            let fh = self.shared.new_handle(ino, Mode::Cached, unique);
            return Ok(Opened::Cached { fh });
        }
        // The inode's turn, held across the decision and the record, so a
        // concurrent open of the same inode cannot choose the other mode
        // (releases only end handles: none makes the decision wrong). The
        // handle is recorded only once its mode is chosen: a record that
        // said cached while the open was still getting its backing file
        // would, after a crash there, make the next process open the inode
        // in cached mode beside the kernel's passthrough handles (EIO).
        let gate = p.gate(ino);
        let _turn = gate.wait();
        let open_cached = p.cached.lock().per_inode.contains_key(&ino);
        // An inode with a live backing file stays in passthrough mode even
        // if passthrough was given up meanwhile: the kernel refuses mixing
        // the modes on one inode.
        if n.size() > 0
            && !open_cached
            && (p.has_backing(ino)
                || (p.active.load(Ordering::Acquire) && present(&a, local, 0, n.size())))
        {
            match self.backing(&a, local) {
                Ok(id) => {
                    let fh = self
                        .shared
                        .new_handle(ino, Mode::Passthrough(id.raw()), unique);
                    let backing_id = id.raw();
                    p.hold(fh, id);
                    p.opens.fetch_add(1, Ordering::Relaxed);
                    // The kernel reads it without us from now on: report
                    // its head as read (whole, for a small file).
                    self.shared
                        .reads
                        .read(&a, local, 0, n.size().min(PASSTHROUGH_REPORTED));
                    return Ok(Opened::Passthrough { fh, backing_id });
                }
                // The cache file vanished: serve through read().
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                // The kernel refused the backing file (not root, a stacked
                // cache filesystem): it would refuse again.
                Err(e) => p.give_up(&format!(
                    "the kernel refused a cache file as backing file ({e}); put the cache on a local non-stacked filesystem and run as root"
                )),
            }
        }
        let fh = self.shared.new_handle(ino, Mode::Cached, unique);
        p.cached.lock().add(fh, ino);
        Ok(Opened::Cached { fh })
    }

    /// Read `size` bytes at `offset`; `done` gets the answer, on this
    /// thread when the bytes are in the cache, from a runtime task after a
    /// fetch otherwise.
    pub(crate) fn op_read(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        size: u32,
        done: impl FnOnce(Result<Vec<u8>, Errno>) + Send + 'static,
    ) {
        let timer = self.shared.counters.timer(Op::Read);
        let Some((a, local)) = self.shared.layers.resolve(ino) else {
            return done(Err(Errno::ENOENT));
        };
        let Some(node) = a.index.inode(local) else {
            return done(Err(Errno::ENOENT));
        };
        a.stats.reads.fetch_add(1, Ordering::Relaxed);
        let file_size = node.size();
        let end = offset.saturating_add(size as u64).min(file_size);
        if offset >= end {
            return done(Ok(Vec::new()));
        }
        self.shared.reads.read(&a, local, offset, end);
        if present(&a, local, offset, end) {
            match self.read_cached(&a, local, fh, offset, end) {
                Ok(buf) => {
                    self.shared
                        .counters
                        .bytes_from_cache
                        .fetch_add(buf.len() as u64, Ordering::Relaxed);
                    done(Ok(buf))
                }
                Err(e) => {
                    a.stats.read_errors.fetch_add(1, Ordering::Relaxed);
                    let file = a.index.path_of(local);
                    tracing::warn!(layer = %a.digest, file = %file, offset, "read of a cached file failed: EIO");
                    self.shared.errors.push(
                        a.digest.to_string(),
                        format!("read of {file} at {offset} from the cache failed"),
                    );
                    done(Err(e))
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
            neighbours(&a, local)
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
                let (source, digest) = (source.clone(), a.digest);
                tokio::spawn(async move { source.prefetch_files(&digest, siblings).await });
            }
            match source.fetch(&a.digest, local, fetch_off, fetch_len).await {
                Ok(()) => {
                    match me.read_cached(&a, local, fh, offset, end) {
                        Ok(buf) => {
                            me.shared.counters.bytes_after_fetch.fetch_add(buf.len() as u64, Ordering::Relaxed);
                            done(Ok(buf))
                        }
                        Err(e) => done(Err(e)),
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
                    me.shared.errors.push(a.digest.to_string(), format!("read of {file} at {offset} failed: {reason}"));
                    done(Err(Errno::EIO));
                }
            }
        });
    }

    pub(crate) fn op_release(&self, ino: u64, fh: u64) {
        let _timer = self.shared.counters.timer(Op::Release);
        // A release the previous process did, resent after a take-over:
        // acting on it again would close another open's file.
        if let Some(t) = self.shared.opens.get()
            && t.is_stale_release(fh, ino)
        {
            tracing::debug!(
                fh,
                ino,
                "a resent release of a handle already released: ignored"
            );
            return;
        }
        self.drop_handle(ino, fh);
    }

    /// Forget the handle `fh` of `ino`: its record, cache file and backing id.
    fn drop_handle(&self, ino: u64, fh: u64) {
        // The record first: a process killed from here on leaves none
        // naming a backing id it may have closed (the next process would
        // give that id to the inode's opens: EIO); the id it may not have
        // closed yet, the next process closes (see `crate::opens`).
        let unrecorded = self.shared.opens.get().and_then(|t| t.unrecord(fh));
        if unrecorded.as_ref().is_some_and(|u| u.passthrough()) {
            kill_point::reached(&self.shared, Point::ReleaseUnrecorded, ino);
        }
        self.shared.handles.lock().remove(&fh);
        let dev = self.shared.dev.lock().clone();
        let closed = self.shared.passthrough.release(fh, dev.as_deref());
        if closed {
            kill_point::reached(&self.shared, Point::ReleaseClosedBacking, ino);
        }
        // Last: from here on the number may be given to a new open, which
        // must not find this handle's file or backing id.
        if let (Some(t), Some(u)) = (self.shared.opens.get(), unrecorded) {
            t.free(u);
        }
    }

    /// A directory listing from `offset` on, offered entry by entry to
    /// `add` until it returns false (the reply is full); with `plus`, each
    /// entry carries its attributes and their timeout.
    pub(crate) fn op_readdir(
        &self,
        ino: u64,
        offset: u64,
        plus: bool,
        add: impl FnMut(Listed<'_>) -> bool,
    ) -> Result<(), Errno> {
        let _timer = self
            .shared
            .counters
            .timer(if plus { Op::Readdirplus } else { Op::Readdir });
        let ttl = if ino == MOUNT_ROOT {
            ROOT_TTL
        } else {
            self.shared.ttl
        };
        self.listing(ino, offset, plus.then_some(ttl), add)
    }

    pub(crate) fn op_statfs(&self) {
        let _timer = self.shared.counters.timer(Op::Statfs);
    }

    pub(crate) fn op_getxattr(&self, ino: u64, name: &[u8], size: u32) -> Result<Xattr, Errno> {
        let _timer = self.shared.counters.timer(Op::Getxattr);
        let (a, local) = self.shared.layers.resolve(ino).ok_or(Errno::ENODATA)?;
        match a.index.inode(local).and_then(|n| n.xattr(name)) {
            Some(v) if size == 0 => Ok(Xattr::Size(v.len() as u32)),
            Some(v) if v.len() > size as usize => Err(Errno::ERANGE),
            Some(v) => Ok(Xattr::Data(v.to_vec())),
            None => Err(Errno::ENODATA),
        }
    }

    pub(crate) fn op_listxattr(&self, ino: u64, size: u32) -> Result<Xattr, Errno> {
        let _timer = self.shared.counters.timer(Op::Listxattr);
        let mut names = Vec::new();
        if let Some((a, local)) = self.shared.layers.resolve(ino)
            && let Some(n) = a.index.inode(local)
        {
            for x in n.xattrs() {
                names.extend_from_slice(x.name);
                names.push(0);
            }
        }
        if size == 0 {
            Ok(Xattr::Size(names.len() as u32))
        } else if names.len() > size as usize {
            Err(Errno::ERANGE)
        } else {
            Ok(Xattr::Data(names))
        }
    }

    pub(crate) fn op_access(&self) {
        let _timer = self.shared.counters.timer(Op::Access);
        // `default_permissions`: the kernel checks modes itself.
    }
}
