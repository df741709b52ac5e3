//! systemd's readiness protocol (`Type=notify`), without libsystemd.

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

/// The descriptor systemd's descriptor store handed back under `name`
/// (`LISTEN_FDS`, `LISTEN_FDNAMES`, for this process's `LISTEN_PID`), if
/// any. Call once, at start-up: the `LISTEN_*` variables are cleared and
/// the other passed descriptors closed.
pub fn take_stored_fd(name: &str) -> Option<OwnedFd> {
    let pid_ok = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let count: i32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    // SAFETY: start-up, before any other thread reads the environment.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    if !pid_ok || count <= 0 {
        return None;
    }
    let mut found = None;
    for (i, n) in (0..count).zip(names.split(':').chain(std::iter::repeat(""))) {
        // SAFETY: systemd passes descriptors 3.. to this process, which owns them.
        let fd = unsafe { OwnedFd::from_raw_fd(3 + i) };
        if n == name && found.is_none() {
            found = Some(fd);
        }
    }
    found
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
}
