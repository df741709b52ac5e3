//! systemd's readiness protocol (`Type=notify`) and descriptor store,
//! without libsystemd.
//!
//! The descriptors handed back at start-up are read by the `sd-notify`
//! crate. Sending stays here: `sd-notify` 0.5 connects to `NOTIFY_SOCKET`
//! as a path, so an abstract socket (`@name`, which the variable may name)
//! would not be reached.

/// Tell systemd (`Type=notify`) about the service's state, e.g. `READY=1` or
/// `STOPPING=1`. Does nothing outside systemd (no `NOTIFY_SOCKET`).
pub fn sd_notify(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let addr = match path.strip_prefix('@') {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes()),
        None => SocketAddr::from_pathname(&path),
    };
    let sent = UnixDatagram::unbound().and_then(|s| s.send_to_addr(state.as_bytes(), &addr?));
    if let Err(e) = sent {
        tracing::warn!(socket = %path, error = %e, "cannot notify systemd");
    }
}

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The descriptors systemd handed this process, by name, until taken.
static STORED: std::sync::Mutex<Option<Vec<(String, OwnedFd)>>> = std::sync::Mutex::new(None);

/// Take the descriptors systemd's descriptor store handed back
/// (`LISTEN_FDS`, `LISTEN_FDNAMES`, for this process's `LISTEN_PID`),
/// close-on-exec, and clear those variables. [`crate::run`] calls it before
/// the async runtime starts any thread; later calls do nothing.
pub fn adopt_stored_fds() {
    let mut stored = STORED.lock().unwrap_or_else(|e| e.into_inner());
    if stored.is_some() {
        return;
    }
    // SAFETY: `run` calls this while the process has one thread, before
    // anything can read or write the environment concurrently (the
    // condition of `std::env::remove_var`, which this calls for
    // LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES). A process not started by
    // `run` must call it first thing in `main`, as tests do.
    let passed = match unsafe { sd_notify::listen_fds_with_names_and_unset_env() } {
        Ok(passed) => passed,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring the descriptors systemd passed");
            *stored = Some(Vec::new());
            return;
        }
    };
    let fds = passed
        .map(|(fd, name)| {
            // SAFETY: systemd passes descriptors 3.. to this process, which
            // owns them; with the variables gone nothing else takes them.
            (name, unsafe { OwnedFd::from_raw_fd(fd) })
        })
        .collect();
    *stored = Some(fds);
}

/// The descriptor systemd's descriptor store handed back under `name`, if
/// any (the first of that name; each is taken once).
pub fn take_stored_fd(name: &str) -> Option<OwnedFd> {
    adopt_stored_fds();
    let mut stored = STORED.lock().unwrap_or_else(|e| e.into_inner());
    let fds = stored.as_mut()?;
    let at = fds.iter().position(|(n, _)| n == name)?;
    Some(fds.swap_remove(at).1)
}

/// Remove what systemd's descriptor store keeps under `name`.
pub fn remove_stored_fd(name: &str) {
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        let msg = format!("FDSTOREREMOVE=1\nFDNAME={name}\n");
        let _ = send_with_fds(&path.to_string_lossy(), msg.as_bytes(), &[]);
    }
}

/// Hand a copy of `fd` to systemd's descriptor store under `name` (the
/// unit needs `FileDescriptorStoreMax=`). False outside systemd (no
/// `NOTIFY_SOCKET`) or when the message could not be sent.
pub fn store_fd(fd: RawFd, name: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let path = path.to_string_lossy().into_owned();
    let msg = format!("FDSTORE=1\nFDNAME={name}\n");
    match send_with_fds(&path, msg.as_bytes(), &[fd]) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(socket = %path, error = %e, name, "cannot store a descriptor with systemd");
            false
        }
    }
}

/// Send `msg` to the datagram socket at `socket` (`@name`: abstract),
/// with `fds` attached (`SCM_RIGHTS`) unless there are none.
pub fn send_with_fds(socket: &str, msg: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    use nix::sys::socket::{
        AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr, sendmsg,
    };
    let addr = match socket.strip_prefix('@') {
        Some(name) => UnixAddr::new_abstract(name.as_bytes())?,
        None => UnixAddr::new(socket)?,
    };
    let s = nix::sys::socket::socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let rights = [ControlMessage::ScmRights(fds)];
    // Without descriptors the datagram carries no control message at all.
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    sendmsg(
        s.as_raw_fd(),
        &[std::io::IoSlice::new(msg)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        Some(&addr),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::IoSliceMut;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixDatagram;

    use nix::sys::socket::{ControlMessageOwned, MsgFlags, UnixAddr, recvmsg};

    use super::send_with_fds;

    /// One datagram from `s`: its bytes and the descriptors it carried.
    fn receive(s: &UnixDatagram) -> (Vec<u8>, Vec<i32>) {
        let mut buf = [0u8; 256];
        let mut space = nix::cmsg_space!([i32; 2]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let m = recvmsg::<UnixAddr>(s.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::empty())
            .unwrap();
        let mut fds = Vec::new();
        for c in m.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(r) = c {
                fds.extend(r);
            }
        }
        let n = m.bytes;
        (buf[..n].to_vec(), fds)
    }

    #[test]
    fn a_descriptor_reaches_the_socket_with_the_message() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("notify");
        let store = UnixDatagram::bind(&sock).unwrap();
        let file_path = dir.path().join("stored");
        let file = std::fs::File::create(&file_path).unwrap();
        send_with_fds(
            sock.to_str().unwrap(),
            b"FDSTORE=1\nFDNAME=x\n",
            &[file.as_raw_fd()],
        )
        .unwrap();
        let (msg, fds) = receive(&store);
        assert_eq!(msg, b"FDSTORE=1\nFDNAME=x\n");
        assert_eq!(fds.len(), 1, "{fds:?}");
        // A new descriptor of the same open file.
        assert_ne!(fds[0], file.as_raw_fd());
        assert_eq!(
            std::fs::read_link(format!("/proc/self/fd/{}", fds[0])).unwrap(),
            file_path
        );
        nix::unistd::close(fds[0]).unwrap();

        // No descriptor: the message alone.
        send_with_fds(sock.to_str().unwrap(), b"FDSTOREREMOVE=1\n", &[]).unwrap();
        assert_eq!(receive(&store), (b"FDSTOREREMOVE=1\n".to_vec(), vec![]));
    }

    /// systemd's NOTIFY_SOCKET may be abstract, written `@name`.
    #[test]
    fn an_abstract_socket_is_named_with_an_at_sign() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("stargaze-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let store = UnixDatagram::bind_addr(&addr).unwrap();
        let (r, _w) = std::io::pipe().unwrap();
        send_with_fds(&format!("@{name}"), b"READY=1\n", &[r.as_raw_fd()]).unwrap();
        let (msg, fds) = receive(&store);
        assert_eq!(msg, b"READY=1\n");
        assert_eq!(fds.len(), 1);
        nix::unistd::close(fds[0]).unwrap();
        // A path socket of that name does not exist.
        assert!(send_with_fds(&name, b"READY=1\n", &[]).is_err());
    }

    /// The child half of [`a_stored_descriptor_is_taken_by_name`]: the same
    /// test run again as systemd starts a unit (`LISTEN_*` and descriptors
    /// 3 and 4).
    fn child_takes_its_stored_descriptor() {
        use std::io::Read;
        // What `run` does before any thread starts.
        super::adopt_stored_fds();
        for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            assert!(std::env::var_os(v).is_none(), "{v} still set");
        }
        for (name, contents) in [("b", "B"), ("a", "A")] {
            let fd = super::take_stored_fd(name).expect(name);
            // Not inherited by what the service starts.
            let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
            assert_ne!(flags & libc::FD_CLOEXEC, 0, "close-on-exec");
            let mut text = String::new();
            std::fs::File::from(fd).read_to_string(&mut text).unwrap();
            assert_eq!(text, contents);
        }
        assert!(super::take_stored_fd("b").is_none(), "taken once");
    }

    #[test]
    fn a_stored_descriptor_is_taken_by_name() {
        if std::env::var_os("LISTEN_FDS").is_some() {
            return child_takes_its_stored_descriptor();
        }
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), "A").unwrap();
        std::fs::write(dir.path().join("b"), "B").unwrap();
        let a = std::fs::File::open(dir.path().join("a")).unwrap();
        let b = std::fs::File::open(dir.path().join("b")).unwrap();
        let raw = [a.as_raw_fd(), b.as_raw_fd()];
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.arg("-c")
            .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
            .arg(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "notify::tests::a_stored_descriptor_is_taken_by_name",
                "--test-threads=1",
                "--nocapture",
            ])
            .env("LISTEN_FDS", "2")
            .env("LISTEN_FDNAMES", "a:b");
        // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork
        // and exec, on descriptors this process holds.
        unsafe {
            cmd.pre_exec(move || {
                // Out of the way of 3 and 4 first, then into place (dup2
                // clears close-on-exec).
                let mut high = [0; 2];
                for (h, fd) in high.iter_mut().zip(raw) {
                    *h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 1000);
                    if *h < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (i, h) in high.into_iter().enumerate() {
                    if libc::dup2(h, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
