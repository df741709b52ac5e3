//! FUSE passthrough bookkeeping: which inodes have a kernel backing id (one
//! per inode, shared by its open handles, closed with the last of them),
//! which are open in cached mode (and so must not get one), and the backing
//! ids and handles a previous process left open on the connection.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::layers::Attached;
use crate::opens::{Mode, OpenHandle};
use crate::{FsShared, StargazeFs};

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
    by_handle: Mutex<HashMap<u64, Arc<Backing>>>,
    by_inode: Mutex<HashMap<u64, std::sync::Weak<Backing>>>,
    /// Files opened with passthrough.
    pub opens: AtomicU64,
    /// Handles opened without passthrough. The kernel refuses (EIO) a
    /// passthrough open of an inode that has files open in cached mode, e.g.
    /// a binary that started running before it was complete: such an inode
    /// is opened in cached mode until its last cached handle is released.
    pub(crate) cached: Mutex<CachedOpens>,
    /// Backing ids a previous process registered, by inode, while handles
    /// it opened are open: new opens of the inode must use the same one.
    restored: Mutex<HashMap<u64, Restored>>,
    /// Those handles, to their inode.
    restored_fh: Mutex<HashMap<u64, u64>>,
    /// The turns of inodes being opened: see [`Passthrough::gate`].
    gates: Mutex<HashMap<u64, Arc<Mutex<()>>>>,
}

/// An inode's turn to choose the mode of an open and record it.
pub(crate) struct Gate<'a> {
    gates: &'a Mutex<HashMap<u64, Arc<Mutex<()>>>>,
    ino: u64,
    turn: Arc<Mutex<()>>,
}

impl Gate<'_> {
    /// Wait for the turn: opens of the inode before it are recorded.
    pub(crate) fn wait(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.turn.lock()
    }
}

impl Drop for Gate<'_> {
    fn drop(&mut self) {
        let mut gates = self.gates.lock();
        // The table's and ours only: no open of the inode waits.
        if Arc::strong_count(&self.turn) == 2 {
            gates.remove(&self.ino);
        }
    }
}

/// A backing id inherited from a previous process.
struct Restored {
    raw: u32,
    /// Its handles still open.
    old_handles: u32,
    /// Wrapped at the first new open; dropped (closing the id once no new
    /// handle holds it either) when the old handles are gone.
    held: Option<Arc<Backing>>,
}

/// `FUSE_DEV_IOC_BACKING_CLOSE`: `_IOW(229, 2, uint32_t)`.
const FUSE_DEV_IOC_BACKING_CLOSE: libc::c_ulong = (1 << 30) | (4 << 16) | (229 << 8) | 2;

/// A kernel backing id open on the connection, closed when dropped. Ours,
/// not fuser's: the io_uring transport has no fuser reply to make one.
#[derive(Debug)]
pub struct Backing {
    raw: u32,
    /// The connection's descriptor, kept open while the id is.
    dev: Arc<OwnedFd>,
}

impl Backing {
    /// Own `raw`, open on the connection of `dev`.
    ///
    /// # Safety
    /// `raw` must be open on that connection and closed by nothing else.
    unsafe fn own(raw: u32, dev: Arc<OwnedFd>) -> Backing {
        Backing { raw, dev }
    }

    pub fn raw(&self) -> u32 {
        self.raw
    }
}

impl Drop for Backing {
    fn drop(&mut self) {
        close_backing(self.dev.as_raw_fd(), self.raw);
    }
}

/// Close the backing id `raw` on the connection of `dev_fd` (none: -1).
fn close_backing(dev_fd: RawFd, raw: u32) {
    if dev_fd < 0 {
        return;
    }
    // SAFETY: an ioctl on the session's /dev/fuse descriptor with a local u32.
    let r = unsafe { libc::ioctl(dev_fd, FUSE_DEV_IOC_BACKING_CLOSE as _, &raw) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOENT) {
            // Every id closed here is one a handle or its record named: a
            // record naming an id closed already answers opens of its
            // inode with it (EIO).
            tracing::warn!(
                backing_id = raw,
                "closing a FUSE backing id failed: the open-file records named an id that was not open"
            );
        } else {
            tracing::debug!(backing_id = raw, error = %e, "closing a FUSE backing id failed");
        }
    }
}

/// Close the backing ids a previous process may have left open, named by
/// no open handle (see [`crate::opens`]), on the connection of `dev_fd`
/// before any open is served; how many were open.
pub(crate) fn close_left_open(dev_fd: RawFd, ids: &[u32]) -> usize {
    ids.iter()
        .filter(|&&raw| {
            // SAFETY: an ioctl on the connection's /dev/fuse descriptor with a local u32.
            unsafe { libc::ioctl(dev_fd, FUSE_DEV_IOC_BACKING_CLOSE as _, &raw) == 0 }
        })
        .count()
}

/// Handles open in cached mode (tracked only while passthrough is wanted).
#[derive(Default)]
pub(crate) struct CachedOpens {
    inode_of: HashMap<u64, u64>,
    pub(crate) per_inode: HashMap<u64, u32>,
}

impl CachedOpens {
    pub(crate) fn add(&mut self, fh: u64, ino: u64) {
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
    pub(crate) fn give_up(&self, why: &str) {
        if self.active.swap(false, Ordering::AcqRel) {
            tracing::warn!(
                reason = why,
                "FUSE passthrough off: files are served through read()"
            );
        }
    }

    /// Forget the handle `fh`; whether that closed its backing id (it was
    /// the inode's last handle).
    pub(crate) fn release(&self, fh: u64, dev: Option<&OwnedFd>) -> bool {
        let mut closed = false;
        // A handle of the previous process: the last one of its inode
        // lets the inherited backing id go.
        let old = self.restored_fh.lock().remove(&fh);
        if let Some(ino) = old {
            let mut restored = self.restored.lock();
            if let Some(r) = restored.get_mut(&ino) {
                r.old_handles = r.old_handles.saturating_sub(1);
                if r.old_handles == 0
                    && let Some(r) = restored.remove(&ino)
                {
                    match r.held {
                        // Dropped here, unless new handles hold it.
                        Some(id) => closed |= Arc::into_inner(id).is_some(),
                        // Never used since: close it here.
                        None => {
                            close_backing(dev.map_or(-1, |d| d.as_raw_fd()), r.raw);
                            closed = true;
                        }
                    }
                }
            }
        }
        // `wanted` is set before mounting and never changes: without
        // passthrough there is nothing else to forget.
        if !self.wanted.load(Ordering::Relaxed) {
            return closed;
        }
        // The last holder of the inode's id closes it, when dropped here.
        let last = self.by_handle.lock().remove(&fh).and_then(Arc::into_inner);
        self.cached.lock().remove(fh);
        closed || last.is_some()
    }

    /// The turn of `ino` to be opened: opens of one inode choose their mode
    /// and record it one at a time (two must not choose different modes),
    /// opens of other inodes go on meanwhile, whatever disk I/O choosing a
    /// backing file takes.
    pub(crate) fn gate(&self, ino: u64) -> Gate<'_> {
        let turn = self.gates.lock().entry(ino).or_default().clone();
        Gate {
            gates: &self.gates,
            ino,
            turn,
        }
    }

    /// Keep `id` for the handle `fh` until its release.
    pub(crate) fn hold(&self, fh: u64, id: Arc<Backing>) {
        self.by_handle.lock().insert(fh, id);
    }

    pub(crate) fn has_backing(&self, ino: u64) -> bool {
        self.restored.lock().contains_key(&ino)
            || self
                .by_inode
                .lock()
                .get(&ino)
                .is_some_and(|w| w.strong_count() > 0)
    }
}

impl FsShared {
    /// Take over the handles a previous process left open: their numbers
    /// stay reserved and their inodes keep their I/O mode.
    pub(crate) fn restore_handles(&self, left: Vec<OpenHandle>) {
        let p = &self.passthrough;
        let wanted = p.wanted.load(Ordering::Relaxed);
        let mut restored = p.restored.lock();
        let mut cached = p.cached.lock();
        let (mut n_cached, mut n_passthrough, mut n_phantom) = (0, 0, 0);
        // The kernel never has an inode open in both modes. A cached record
        // beside a passthrough one is an open that was never answered:
        // earlier builds recorded every open as cached first and switched
        // the record once the backing file was registered, so a crash in
        // between left such a record (the kernel resends that open), and a
        // table they wrote may be taken over by this one. Counted, it would
        // make every later open of the inode cached beside the kernel's
        // passthrough handles: EIO.
        let with_backing: std::collections::HashSet<u64> = left
            .iter()
            .filter(|h| matches!(h.mode, Mode::Passthrough(_)))
            .map(|h| h.ino)
            .collect();
        for h in left {
            if h.mode == Mode::Cached && with_backing.contains(&h.ino) {
                n_phantom += 1;
                if let Some(t) = self.opens.get() {
                    t.release(h.fh);
                }
                continue;
            }
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
        if n_phantom > 0 {
            tracing::warn!(
                records = n_phantom,
                "dropped records of cached opens of inodes open with passthrough: opens the previous process never answered"
            );
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

impl StargazeFs {
    /// The kernel backing id of a complete file's cache file, shared by all
    /// open handles of the inode and kept until the last one is released.
    /// The caller has the inode's [`gate`](Passthrough::gate): one backing
    /// id is registered per inode.
    pub(crate) fn backing(&self, a: &Attached, local: u64) -> std::io::Result<Arc<Backing>> {
        let p = &self.shared.passthrough;
        // Set by `serve` before any request is served.
        let Some(dev) = self.shared.dev.lock().clone() else {
            return Err(std::io::Error::other(
                "no copy of the /dev/fuse descriptor to register backing files on",
            ));
        };
        let ino = a.global(local);
        let shared = p
            .by_inode
            .lock()
            .get(&ino)
            .and_then(std::sync::Weak::upgrade);
        if let Some(id) = shared {
            return Ok(id);
        }
        // The kernel's inode may have the previous process's backing file.
        let inherited = p.restored.lock().get_mut(&ino).map(|r| match &r.held {
            Some(id) => id.clone(),
            None => {
                // SAFETY: the id is open on this connection (the previous
                // process never closed it) and is closed only through this
                // wrapper from now on.
                let id = Arc::new(unsafe { Backing::own(r.raw, dev.clone()) });
                r.held = Some(id.clone());
                id
            }
        });
        let id = match inherited {
            Some(id) => id,
            None => {
                // No lock held across the open and the registration.
                let file = std::fs::File::open(a.cache.layer_file_path(&a.digest, local))?;
                // The raw id goes into the open-file table.
                let raw = fuser::BackingId::create_raw(dev.as_fd(), &file)?;
                // SAFETY: just opened on this connection; closed only
                // through the wrapper.
                Arc::new(unsafe { Backing::own(raw, dev) })
            }
        };
        let mut by_inode = p.by_inode.lock();
        by_inode.retain(|_, w| w.strong_count() > 0);
        by_inode.insert(ino, Arc::downgrade(&id));
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use crate::FsShared;
    use crate::opens::{Mode, OpenHandle, OpenTable};
    use crate::source::ChunkSource;

    struct NoFetcher;

    #[tonic::async_trait]
    impl ChunkSource for NoFetcher {
        async fn fetch(
            &self,
            _: &stargaze_format::Digest,
            _: u64,
            _: u64,
            _: u64,
        ) -> Result<(), crate::SourceError> {
            Err(crate::SourceError::InProcess(
                "no fetcher in this test".into(),
            ))
        }
    }

    /// A mount's shared state with no fetcher behind it.
    fn test_shared(rt: &tokio::runtime::Runtime) -> FsShared {
        FsShared::new(
            std::path::Path::new("/nonexistent"),
            Arc::new(NoFetcher),
            rt.handle().clone(),
            Duration::from_secs(1),
        )
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
    fn a_backing_id_keeps_its_connection_descriptor_open() {
        use std::os::fd::{AsRawFd, OwnedFd};
        let session = std::fs::File::open("/dev/null").unwrap();
        let copy = Arc::new(OwnedFd::from(session.try_clone().unwrap()));
        let fd = copy.as_raw_fd();
        // SAFETY: id 7 is open nowhere; closing it on /dev/null fails
        // (ENOTTY), which is only logged.
        let id = unsafe { super::Backing::own(7, copy) };
        // The session's descriptor goes (its number free for the next open).
        drop(session);
        // SAFETY: F_GETFD on a descriptor number, open or not.
        let open = |fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
        assert!(open(fd), "the id's descriptor outlives the session's");
        drop(id);
        assert!(!open(fd), "and goes with the id");
    }

    #[test]
    fn a_panic_while_a_lock_is_held_leaves_later_requests_working() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let shared = test_shared(&rt);
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
        panic_holding!(p.gates.lock());
        {
            let gate = p.gate(44);
            panic_holding!(gate.wait());
        }

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
        let fh = shared.new_handle(44, Mode::Cached, 0);
        assert_ne!(fh, 0);
        p.release(fh, None);
        p.release(8, None);
        p.release(7, None);
        assert!(!p.has_backing(42));
        assert!(!shared.detach("absent"));
    }

    /// A table written by a build that recorded every open as cached
    /// before switching it to passthrough, left by a crash between the two:
    /// the cached record beside the inode's passthrough one is an open the
    /// kernel never saw. Counted, it would make the next opens of the inode
    /// cached while the kernel has it open with passthrough (EIO).
    #[test]
    fn a_cached_record_beside_a_passthrough_one_is_not_taken_over() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = OpenTable::beside(&dir.path().join("mnt"));
        let (t, _) = OpenTable::open(&path, false).unwrap();
        let answered = t.open_handle(42, Mode::Passthrough(3), 0);
        let phantom = t.open_handle(42, Mode::Cached, 0);
        let other = t.open_handle(43, Mode::Cached, 0);
        drop(t);

        let shared = test_shared(&rt);
        let p = &shared.passthrough;
        p.wanted.store(true, Ordering::Relaxed);
        let (t, left) = OpenTable::open(&path, true).unwrap();
        assert_eq!(left.len(), 3);
        assert!(shared.opens.set(t).is_ok());
        shared.restore_handles(left);
        assert!(p.has_backing(42));
        let per_inode = p.cached.lock().per_inode.clone();
        assert_eq!(
            per_inode.get(&42),
            None,
            "the phantom counts: {per_inode:?}"
        );
        assert_eq!(per_inode.get(&43), Some(&1));
        // The phantom's number is free; the others stay reserved.
        assert_eq!(shared.new_handle(44, Mode::Cached, 0), phantom);
        assert!(![answered, phantom, other].contains(&shared.new_handle(45, Mode::Cached, 0)));
        // Released once the restored opens are gone (what the next process
        // would restore).
        drop(shared);
        let (_t, left) = OpenTable::open(&path, true).unwrap();
        assert_eq!(
            left.iter()
                .map(|h| h.fh)
                .filter(|fh| *fh == phantom)
                .count(),
            1,
            "the number went to the new open of 44"
        );
        assert!(
            left.iter()
                .all(|h| !(h.ino == 42 && h.mode == Mode::Cached))
        );
    }

    /// A release resent after a take-over that the previous process had
    /// already done leaves the open now holding its handle number alone.
    #[test]
    fn a_resent_release_of_another_inode_closes_nothing() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let shared = Arc::new(test_shared(&rt));
        let dir = tempfile::tempdir().unwrap();
        let (table, _) =
            OpenTable::open(&OpenTable::beside(&dir.path().join("mnt")), false).unwrap();
        assert!(shared.opens.set(table).is_ok());
        let fs = crate::ops::StargazeFs {
            shared: shared.clone(),
        };
        let fh = shared.new_handle(44, Mode::Cached, 0);
        let file = Arc::new(std::fs::File::open("/dev/null").unwrap());
        shared.handles.lock().insert(fh, file);
        fs.op_release(45, fh);
        assert!(
            shared.handles.lock().contains_key(&fh),
            "another inode's release"
        );
        fs.op_release(44, fh);
        assert!(!shared.handles.lock().contains_key(&fh));
        // Released already: a second one is stale too.
        shared
            .handles
            .lock()
            .insert(fh, Arc::new(std::fs::File::open("/dev/null").unwrap()));
        fs.op_release(44, fh);
        assert!(
            shared.handles.lock().contains_key(&fh),
            "a release done before"
        );
    }
}
