//! What systemd's file descriptor store does for a `Type=notify` unit with
//! `FileDescriptorStoreMax=`: descriptors the service sends on
//! `NOTIFY_SOCKET` with `FDSTORE=1` (and `FDNAME=`) are kept, and every
//! later start of the service gets them as descriptors 3.. with
//! `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID`. A descriptor already
//! stored (the same open file) is not stored twice.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sys::socket::{ControlMessageOwned, MsgFlags, UnixAddr, recvmsg};

pub struct FdStore {
    socket: UnixDatagram,
    path: PathBuf,
    fds: Vec<(String, OwnedFd)>,
}

impl FdStore {
    /// Listen for notifications at `path`.
    pub fn bind(path: &Path) -> FdStore {
        let _ = std::fs::remove_file(path);
        let socket = UnixDatagram::bind(path).expect("bind the notify socket");
        socket
            .set_nonblocking(true)
            .expect("non-blocking notify socket");
        FdStore {
            socket,
            path: path.to_path_buf(),
            fds: Vec::new(),
        }
    }

    /// Names of the stored descriptors.
    pub fn names(&mut self) -> Vec<String> {
        self.drain();
        self.fds.iter().map(|(n, _)| n.clone()).collect()
    }

    /// The stored descriptor named `name`.
    pub fn fd(&mut self, name: &str) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.drain();
        self.fds
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, fd)| fd.as_fd())
    }

    /// Take in every notification sent so far.
    pub fn drain(&mut self) {
        loop {
            let mut buf = [0u8; 4096];
            let (n, fds) = {
                let mut iov = [IoSliceMut::new(&mut buf)];
                let mut space = nix::cmsg_space!([RawFd; 16]);
                let Ok(m) = recvmsg::<UnixAddr>(
                    self.socket.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
                ) else {
                    return;
                };
                let mut fds = Vec::new();
                for c in m.cmsgs().into_iter().flatten() {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        // SAFETY: the kernel just installed these
                        // descriptors in this process for this message;
                        // nothing else owns them.
                        fds.extend(
                            raw.into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
                (m.bytes, fds)
            };
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            let store = text.lines().any(|l| l == "FDSTORE=1");
            if !store {
                continue;
            }
            let name = text
                .lines()
                .find_map(|l| l.strip_prefix("FDNAME="))
                .unwrap_or("stored")
                .to_string();
            for fd in fds {
                if !self.fds.iter().any(|(_, have)| same_file(have, &fd)) {
                    self.fds.push((name.clone(), fd));
                }
            }
        }
    }

    /// Prepare `cmd` to start as systemd starts a unit with this store:
    /// `NOTIFY_SOCKET`, and the stored descriptors. `cmd` must run the
    /// service through `/bin/sh -c 'LISTEN_PID=$$ exec "$0" "$@"'` (see
    /// [`FdStore::command`]): `LISTEN_PID` is the service's own pid.
    pub fn command(&mut self, program: &Path) -> Command {
        self.drain();
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(if self.fds.is_empty() {
                "exec \"$0\" \"$@\""
            } else {
                "LISTEN_PID=$$ exec \"$0\" \"$@\""
            })
            .arg(program)
            .env("NOTIFY_SOCKET", &self.path)
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_FDNAMES");
        if !self.fds.is_empty() {
            let names: Vec<&str> = self.fds.iter().map(|(n, _)| n.as_str()).collect();
            cmd.env("LISTEN_FDS", self.fds.len().to_string())
                .env("LISTEN_FDNAMES", names.join(":"));
            let raw: Vec<RawFd> = self.fds.iter().map(|(_, f)| f.as_raw_fd()).collect();
            // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork
            // and exec, on descriptors this process holds.
            unsafe {
                cmd.pre_exec(move || {
                    // Out of the way of 3.. first, then into place (dup2
                    // clears close-on-exec).
                    let mut high = Vec::with_capacity(raw.len());
                    for fd in &raw {
                        let h = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 1000);
                        if h < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        high.push(h);
                    }
                    for (i, h) in high.iter().enumerate() {
                        if libc::dup2(*h, 3 + i as i32) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        cmd
    }

    /// Close every stored descriptor (the unit was stopped).
    pub fn clear(&mut self) {
        self.drain();
        self.fds.clear();
    }
}

/// The same open file description (systemd compares with kcmp too).
fn same_file(a: &OwnedFd, b: &OwnedFd) -> bool {
    const KCMP_FILE: libc::c_long = 0;
    let pid = std::process::id() as libc::c_long;
    // SAFETY: kcmp only compares two descriptors of this process.
    unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid,
            pid,
            KCMP_FILE,
            a.as_raw_fd() as libc::c_long,
            b.as_raw_fd() as libc::c_long,
        ) == 0
    }
}
