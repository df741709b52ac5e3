//! Keeping the node's FUSE connection alive across a restart of `stargaze-fs`.
//!
//! The kernel ends a FUSE connection when the last descriptor of its
//! `/dev/fuse` file closes; every overlay stacked on the mount then answers
//! ENOTCONN, so a crash of this process would break every running
//! container. Three things keep the connection:
//!
//! * **The descriptor is stored outside the process.** After mounting, a
//!   copy goes to systemd's file descriptor store (`sd_notify` with
//!   `FDSTORE=1`, `FDNAME=stargaze-fuse`; the unit sets
//!   `FileDescriptorStoreMax=1`). systemd hands it back to the restarted
//!   process (`LISTEN_FDS`, `LISTEN_FDNAMES`). Requests that arrive
//!   meanwhile wait in the kernel's queue.
//! * **The session file** (`<mountpoint>.session`, on /run: it must not
//!   outlive the mount) keeps what the new process needs to answer the
//!   kernel exactly as the old one did: the kernel's INIT request (the
//!   connection is initialised once; the new process negotiates the same
//!   capabilities from the saved bytes), the mount's device number (is the
//!   descriptor still the mount's?), and the attached layers with their
//!   inode slots (the kernel still holds node ids `slot << 40 | inode`).
//!   Open files are in [`crate::opens`].
//! * **Requests read but not answered** by the dead process are given back
//!   to the queue with `FUSE_NOTIFY_RESEND` (Linux >= 6.9) once the layers
//!   are attached again.
//!
//! fuser only starts a session with an INIT handshake, which the kernel
//! sends once per connection. So fuser is given one end of a socket pair
//! carrying the INIT request (the kernel's on a fresh mount, the saved one
//! on a take-over), its reply is forwarded to the kernel (fresh) or dropped
//! (take-over), and then the socket's descriptor number is made the
//! `/dev/fuse` descriptor with `dup3`, before any session thread reads.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use stargaze_service::mountinfo;

/// The name of the descriptor in systemd's store.
pub const FDNAME: &str = "stargaze-fuse";
/// `FUSE_NOTIFY_RESEND` in `enum fuse_notify_code` (Linux 6.9).
const FUSE_NOTIFY_RESEND: i32 = 7;
/// Larger than any request before INIT (the kernel refuses reads into
/// buffers smaller than its maximum request).
const READ_BUFFER: usize = (1 << 20) + 4096;

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the session file {path} is unreadable ({reason}); it is replaced at the next mount")]
    BadSession { path: PathBuf, reason: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HandoverError {
    let what = what.into();
    move |source| HandoverError::Io { what, source }
}

/// A layer as it was attached, to attach it again in the same slot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SavedLayer {
    pub digest: String,
    pub slot: u64,
}

/// What a restarted process needs to serve the same connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SessionState {
    /// The kernel's INIT request, hex.
    pub init: String,
    /// `major:minor` of the mount in /proc/self/mountinfo.
    pub device: String,
    /// Slots are never reused while the connection lives.
    pub next_slot: u64,
    pub layers: Vec<SavedLayer>,
    /// The transport the connection was set up with (`classic`, or
    /// `io_uring`: the kernel then sends requests only to ring entries).
    /// Files of older versions have none: classic.
    #[serde(default)]
    pub transport: String,
}

/// The session file beside the mountpoint.
#[derive(Debug, Clone)]
pub struct SessionFile {
    pub path: PathBuf,
}

impl SessionFile {
    pub fn beside(mountpoint: &Path) -> SessionFile {
        let mut name = mountpoint.as_os_str().to_owned();
        name.push(".session");
        SessionFile {
            path: PathBuf::from(name),
        }
    }

    pub fn load(&self) -> Result<Option<SessionState>, HandoverError> {
        let text = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(format!("reading {}", self.path.display()))(e)),
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| HandoverError::BadSession {
                path: self.path.clone(),
                reason: e.to_string(),
            })
    }

    /// Write atomically: a crash of the process leaves the old or the new
    /// state. Not synced to disk: the FUSE connection it describes does not
    /// outlive the machine, so only a process crash matters, and the page
    /// cache survives that (an fsync here cost every attach milliseconds,
    /// with the layer table locked).
    pub fn save(&self, state: &SessionState) -> Result<(), HandoverError> {
        let tmp = self.path.with_extension("session.tmp");
        let text = serde_json::to_vec(state).expect("session state serialises");
        let mut f = File::create(&tmp).map_err(io(format!("writing {}", tmp.display())))?;
        f.write_all(&text)
            .map_err(io(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, &self.path).map_err(io(format!("renaming {}", tmp.display())))
    }

    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The `major:minor` of the FUSE mount at `mountpoint`, from mountinfo (a
/// `stat` of the mount root would wait for a server that is not there yet).
pub fn mount_device(mountpoint: &Path) -> Option<String> {
    mountinfo::read()
        .into_iter()
        .rev()
        .find(|m| m.mount_point == mountpoint && m.fstype.starts_with("fuse"))
        .map(|m| m.device)
}

pub use stargaze_service::notify::{store_fd, take_stored_fd};

/// A connection handed back that cannot be taken over (no session file, or
/// not the mount's any more): abort it through fusectl, so its waiting
/// callers fail (ENOTCONN) instead of waiting for a server that never comes,
/// and drop it from systemd's store.
pub fn abandon(mountpoint: &Path) {
    if let Some(minor) = mount_device(mountpoint)
        .as_deref()
        .and_then(|d| d.strip_prefix("0:"))
    {
        let connections = Path::new("/sys/fs/fuse/connections");
        if !connections.join(minor).exists() {
            // systemd mounts fusectl at boot; elsewhere it may be missing.
            let _ = nix::mount::mount(
                Some("fusectl"),
                connections,
                Some("fusectl"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            );
        }
        let abort = connections.join(minor).join("abort");
        if let Err(e) = std::fs::write(&abort, b"1") {
            tracing::warn!(file = %abort.display(), error = %e, "cannot abort the old FUSE connection");
        }
    }
    stargaze_service::notify::remove_stored_fd(FDNAME);
}

/// Mount the node's filesystem at `mountpoint` with a new `/dev/fuse`
/// connection and read the kernel's INIT request from it.
pub fn mount_fresh(mountpoint: &Path) -> Result<(OwnedFd, Vec<u8>), HandoverError> {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(io("opening /dev/fuse"))?;
    let data = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other",
        dev.as_raw_fd()
    );
    nix::mount::mount(
        Some("stargaze"),
        mountpoint,
        Some("fuse.stargaze"),
        nix::mount::MsFlags::MS_RDONLY | nix::mount::MsFlags::MS_NODEV,
        Some(data.as_str()),
    )
    .map_err(|e| io(format!("mounting FUSE at {}", mountpoint.display()))(e.into()))?;
    let mut dev = dev;
    let mut buf = vec![0u8; READ_BUFFER];
    let n = loop {
        match dev.read(&mut buf) {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH);
                return Err(io("reading the kernel's FUSE INIT request")(e));
            }
        }
    };
    buf.truncate(n);
    Ok((OwnedFd::from(dev), buf))
}

/// Start a fuser session on `dev` whose INIT request is `init`: fuser
/// handshakes over a socket pair, its reply goes to the kernel when
/// `answer_kernel` (a fresh mount), amended to take FUSE over io_uring
/// when `uring`, and then the session's descriptor is replaced by `dev`.
pub fn start_session<FS: fuser::Filesystem>(
    fs: FS,
    dev: OwnedFd,
    init: &[u8],
    answer_kernel: bool,
    uring: bool,
    config: fuser::Config,
) -> Result<Started<FS>, HandoverError> {
    let mut pair = [0; 2];
    // SAFETY: socketpair fills the two descriptors, owned below.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            pair.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(io("creating a socket pair for the FUSE handshake")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: fresh descriptors from socketpair.
    let (ours, theirs) = unsafe { (File::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
    let theirs_raw = theirs.as_raw_fd();
    let mut ours = ours;
    ours.write_all(init)
        .map_err(io("passing INIT to the FUSE session"))?;
    let session = fuser::Session::from_fd(fs, theirs, fuser::SessionACL::All, config)
        .map_err(io("the FUSE INIT handshake"))?;
    let mut reply = vec![0u8; 4096];
    let n = ours
        .read(&mut reply)
        .map_err(io("reading the session's INIT reply"))?;
    if answer_kernel {
        if uring && !crate::uring::negotiate(init, &mut reply[..n]) {
            return Err(io("accepting FUSE over io_uring in the INIT reply")(
                std::io::Error::from(std::io::ErrorKind::Unsupported),
            ));
        }
        let mut dev_file = File::from(dev.try_clone().map_err(io("duplicating /dev/fuse"))?);
        dev_file
            .write_all(&reply[..n])
            .map_err(io("answering the kernel's FUSE INIT"))?;
    }
    // SAFETY: `theirs_raw` is the session's descriptor; dup3 atomically makes
    // it the /dev/fuse connection. No session thread runs yet.
    let r = unsafe { libc::dup3(dev.as_raw_fd(), theirs_raw, libc::O_CLOEXEC) };
    if r < 0 {
        return Err(io("giving the FUSE session its /dev/fuse descriptor")(
            std::io::Error::last_os_error(),
        ));
    }
    drop(dev);
    Ok(Started {
        session,
        dev_fd: theirs_raw,
    })
}

/// A session ready to spawn, and its `/dev/fuse` descriptor number.
pub struct Started<FS: fuser::Filesystem> {
    pub session: fuser::Session<FS>,
    pub dev_fd: RawFd,
}

/// Ask the kernel to queue again the requests a previous process read and
/// never answered. Linux < 6.9 does not know the notification: those
/// requests stay unanswered (their callers wait until the mount goes).
pub fn resend_pending(dev_fd: RawFd) -> std::io::Result<()> {
    // struct fuse_out_header { len: u32, error: i32, unique: u64 }
    let mut msg = [0u8; 16];
    msg[0..4].copy_from_slice(&16u32.to_ne_bytes());
    msg[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    // SAFETY: a write of a local buffer to a descriptor we hold.
    let n = unsafe { libc::write(dev_fd, msg.as_ptr() as *const libc::c_void, msg.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_state_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = SessionFile::beside(&dir.path().join("mnt"));
        assert_eq!(f.path, dir.path().join("mnt.session"));
        assert_eq!(f.load().unwrap(), None);
        let s = SessionState {
            init: hex::encode([1, 2, 0xfe]),
            device: "0:61".into(),
            next_slot: 3,
            layers: vec![SavedLayer {
                digest: format!("sha256:{}", "a".repeat(64)),
                slot: 2,
            }],
            transport: "io_uring".into(),
        };
        f.save(&s).unwrap();
        assert_eq!(f.load().unwrap(), Some(s.clone()));
        assert_eq!(hex::decode(&s.init).ok(), Some(vec![1, 2, 0xfe]));
        // A file of a version without transports: classic.
        std::fs::write(
            &f.path,
            br#"{"init":"","device":"0:1","next_slot":1,"layers":[]}"#,
        )
        .unwrap();
        assert_eq!(f.load().unwrap().unwrap().transport, "");
        std::fs::write(&f.path, b"{").unwrap();
        assert!(matches!(f.load(), Err(HandoverError::BadSession { .. })));
    }

    #[test]
    fn odd_or_non_hex_is_refused() {
        assert_eq!(hex::decode("abc").ok(), None);
        assert_eq!(hex::decode("zz").ok(), None);
        assert_eq!(hex::decode("").ok(), Some(vec![]));
    }
}
