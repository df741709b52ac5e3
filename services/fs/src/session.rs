//! The lifecycle of the node's FUSE session: mount anew or take over the
//! connection a previous process left in systemd's store (see
//! [`handover`](crate::handover)), start the FUSE threads, detach a stale
//! mount, unmount.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use stargaze_service::mountinfo;

use stargaze_service::config::FsTransport;

use crate::handover::{self, HandoverError, SessionFile};
use crate::opens::OpenTable;
use crate::transport::{self, Transport};
use crate::uring::{self, Rings};
use crate::{FsShared, StargazeFs};

/// The node's FUSE mount being served.
pub struct FuseMount {
    session: Option<fuser::BackgroundSession>,
    pub mountpoint: PathBuf,
    /// The session's `/dev/fuse` descriptor (owned by the session).
    pub dev_fd: RawFd,
    /// The connection was inherited from a previous process.
    pub taken_over: bool,
    /// The transport serving it.
    pub transport: Transport,
    rings: Option<Rings>,
}

impl FuseMount {
    /// Unmount and wait for the session's threads (tests, benchmarks).
    pub fn umount_and_join(mut self) -> std::io::Result<()> {
        if nix::mount::umount(&self.mountpoint).is_err() {
            let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
        }
        let joined = match self.session.take() {
            Some(s) => s.join(),
            None => Ok(()),
        };
        if let Some(r) = self.rings.take() {
            r.join();
        }
        joined
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
    serve(shared, mountpoint, n_threads, dev, &init, None)
}

fn transport_error(e: transport::TransportError) -> HandoverError {
    HandoverError::Io {
        what: "choosing the FUSE transport".into(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// The rings to serve with: on a fresh connection as `[fs] transport`
/// (or its override) and the kernel's INIT allow, on a taken-over one as
/// it was set up (`inherited`).
fn choose_rings(
    shared: &Arc<FsShared>,
    mountpoint: &Path,
    init: &[u8],
    inherited: Option<Transport>,
) -> Result<Option<uring::Prepared>, HandoverError> {
    let wanted = *shared.transport_wanted.lock();
    if let Some(t) = inherited {
        if t.as_str() != wanted.as_str() && wanted != FsTransport::Auto {
            tracing::warn!(
                connection = t.as_str(),
                wanted = wanted.as_str(),
                "the FUSE connection taken over keeps the transport it was set up with; the configured one applies from the next fresh mount"
            );
        }
        if t == Transport::Classic {
            return Ok(None);
        }
        let p = uring::prepare(shared, mountpoint, -1, true).map_err(|e| HandoverError::Io {
            what: "setting up the io_uring queues of the connection taken over".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        return Ok(Some(p));
    }
    if wanted == FsTransport::Classic {
        return Ok(None);
    }
    if !uring::decode::init_offers_uring(init) {
        let why = transport::why_not_offered();
        if wanted == FsTransport::IoUring {
            return Err(transport_error(transport::TransportError::Unavailable(why)));
        }
        tracing::info!(reason = %why, "FUSE transport: classic (io_uring not available)");
        return Ok(None);
    }
    match uring::prepare(shared, mountpoint, -1, false) {
        Ok(p) => Ok(Some(p)),
        Err(e) if wanted == FsTransport::IoUring => Err(transport_error(
            transport::TransportError::Unavailable(e.to_string()),
        )),
        Err(e) => {
            tracing::warn!(error = %e, "FUSE transport: classic (the io_uring queues cannot be set up)");
            Ok(None)
        }
    }
}

/// Start serving `dev`; `inherited` is the transport of a connection a
/// previous process set up (its INIT was answered then).
fn serve(
    shared: Arc<FsShared>,
    mountpoint: &Path,
    n_threads: usize,
    dev: OwnedFd,
    init: &[u8],
    inherited: Option<Transport>,
) -> Result<FuseMount, HandoverError> {
    let taken_over = inherited.is_some();
    // What is read goes to the fetcher's traces for as long as we serve.
    shared
        .runtime
        .spawn(crate::reads::flush_every(Arc::downgrade(&shared)));
    let rings = choose_rings(&shared, mountpoint, init, inherited)?;
    let transport = if rings.is_some() {
        Transport::IoUring
    } else {
        Transport::Classic
    };
    // With the rings, fuser's threads serve only what still comes through
    // /dev/fuse (forgets, interrupts): one is enough.
    let threads = if rings.is_some() { 1 } else { n_threads };
    let session = handover::start_session(
        StargazeFs {
            shared: shared.clone(),
        },
        dev,
        init,
        !taken_over,
        rings.is_some() && !taken_over,
        session_config(threads),
    )?;
    let dev_fd = session.dev_fd;
    // SAFETY: the session's descriptor is open here (it was just set up).
    let copy = unsafe { std::os::fd::BorrowedFd::borrow_raw(dev_fd) }.try_clone_to_owned();
    match copy {
        Ok(fd) => *shared.dev.lock() = Some(Arc::new(fd)),
        Err(e) => {
            tracing::warn!(error = %e, "cannot copy the /dev/fuse descriptor: FUSE passthrough off")
        }
    }
    *shared.transport.lock() = Some(transport);
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
    let rings = rings.map(|mut p| {
        p.set_dev_fd(dev_fd);
        p.start()
    });
    if taken_over && let Some(r) = &rings {
        uring::wake_queues(mountpoint, r.queues);
    }
    tracing::info!(transport = transport.as_str(), "FUSE transport");
    Ok(FuseMount {
        session: Some(session),
        mountpoint: mountpoint.to_path_buf(),
        dev_fd,
        taken_over,
        transport,
        rings,
    })
}

/// Detach whatever is mounted at `dir` when it is a dead FUSE mount of
/// ours; `known_ours` skips the liveness probe (a connection systemd still
/// holds but nobody serves would make it wait forever).
pub fn clean_stale_mount(dir: &Path, known_ours: bool) {
    let mounts = mountinfo::read();
    if mountinfo::mounted_at(&mounts, dir).is_none() {
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
    let unfinished = table.unfinished_releases();
    let _ = shared.opens.set(table);
    let mounted = match takeover {
        Some((dev, init, state)) => {
            if !unfinished.is_empty() {
                let closed = crate::passthrough::close_left_open(dev.as_raw_fd(), &unfinished);
                if closed > 0 {
                    tracing::info!(
                        closed,
                        "closed the backing ids of releases the previous process did not finish"
                    );
                }
                if let Some(t) = shared.opens.get() {
                    t.unfinished_closed();
                }
            }
            shared.restore_handles(left);
            shared.layers.reserve_slots(state.next_slot);
            let mut attached = 0;
            for l in &state.layers {
                let attached_again = l
                    .digest
                    .parse()
                    .map_err(crate::layers::AttachError::from)
                    .and_then(|d| shared.layers.attach_in(&d, Some(l.slot)));
                match attached_again {
                    Ok(_) => attached += 1,
                    Err(e) => tracing::warn!(
                        layer = %l.digest,
                        error = %e,
                        "cannot attach a layer of the previous session again: its files answer ENOENT until the snapshotter attaches it"
                    ),
                }
            }
            let inherited = Transport::from_session(&state.transport);
            let m = serve(
                shared.clone(),
                mountpoint,
                n_threads,
                dev,
                &init,
                Some(inherited),
            )?;
            shared.layers.journal_to(
                file,
                state.init.clone(),
                state.device.clone(),
                m.transport.as_str(),
            );
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
            let m = serve(shared.clone(), mountpoint, n_threads, dev, &init, None)?;
            shared
                .layers
                .journal_to(file, hex::encode(&init), device, m.transport.as_str());
            m
        }
    };
    Ok(mounted)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn is_mount_point(p: &Path) -> bool {
        let parent = p.parent().expect("a parent");
        std::fs::metadata(p).unwrap().dev() != std::fs::metadata(parent).unwrap().dev()
    }

    /// The kernel writes a space in a mount point as `\040`: a stale mount
    /// at a mountpoint with a space must still be found and detached.
    #[test]
    fn a_stale_mount_at_a_path_with_a_space_is_detached() {
        stargaze_testkit::require_that(
            // SAFETY: geteuid has no preconditions and cannot fail.
            unsafe { libc::geteuid() } == 0,
            "root, to mount tmpfs",
            "run the tests as root, as CI does",
        );
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("stargaze mnt");
        std::fs::create_dir(&mnt).unwrap();
        nix::mount::mount(
            Some("stargaze-test"),
            &mnt,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        assert!(is_mount_point(&mnt));

        clean_stale_mount(&mnt, true);

        let detached = !is_mount_point(&mnt);
        while nix::mount::umount2(&mnt, nix::mount::MntFlags::MNT_DETACH).is_ok() {}
        assert!(detached, "{} is still mounted", mnt.display());
    }
}
