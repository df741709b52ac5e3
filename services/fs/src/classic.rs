//! The classic transport: fuser reads requests from `/dev/fuse` and writes
//! the replies back; each callback hands its arguments to the
//! transport-neutral operations in [`crate::ops`] and its reply object the
//! answer. With the io_uring transport these threads stay, serving what
//! the kernel still sends through `/dev/fuse` (INIT, forgets, interrupts).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::Ordering;

use fuser::{
    AccessFlags, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyXattr, Request,
};

use crate::StargazeFs;
use crate::ops::{Opened, Xattr};

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
        match self.op_lookup(u64::from(parent), name.as_bytes()) {
            Ok((attr, ttl)) => reply.entry(&ttl, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.op_getattr(u64::from(ino)) {
            Ok((attr, ttl)) => reply.attr(&ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.op_readlink(u64::from(ino)) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.op_open(u64::from(ino), flags.0, req.unique().0) {
            Ok(Opened::Cached { fh }) => {
                // The layer never changes: let the kernel keep cached pages.
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE)
            }
            Ok(Opened::Passthrough { fh, backing_id }) => {
                // SAFETY: the id is open on this connection and kept by the
                // passthrough table; the wrapper is only lent to the reply
                // and given up (into_raw) without closing it.
                let id = unsafe { reply.wrap_backing(backing_id) };
                reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id);
                let _ = id.into_raw();
            }
            Err(e) => reply.error(e),
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
        self.op_read(
            u64::from(ino),
            u64::from(fh),
            offset,
            size,
            move |r| match r {
                Ok(buf) => reply.data(&buf),
                Err(e) => reply.error(e),
            },
        );
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.op_release(u64::from(ino), u64::from(fh));
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
        let listed = self.op_readdir(u64::from(ino), offset, false, |e| {
            !reply.add(INodeNo(e.ino), e.next, e.kind, OsStr::from_bytes(e.name))
        });
        match listed {
            Ok(()) => reply.ok(),
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
        let listed = self.op_readdir(u64::from(ino), offset, true, |e| {
            // A readdirplus listing offers every entry with its attributes.
            let Some((attr, ttl)) = e.attr else {
                return true;
            };
            let name = OsStr::from_bytes(e.name);
            !reply.add(INodeNo(e.ino), e.next, name, &ttl, &attr, Generation(0))
        });
        match listed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.op_statfs();
        reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.op_getxattr(u64::from(ino), name.as_bytes(), size) {
            Ok(Xattr::Size(n)) => reply.size(n),
            Ok(Xattr::Data(v)) => reply.data(&v),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.op_listxattr(u64::from(ino), size) {
            Ok(Xattr::Size(n)) => reply.size(n),
            Ok(Xattr::Data(v)) => reply.data(&v),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        self.op_access();
        reply.ok();
    }
}
