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
        let _ = send_with_fd(&path.to_string_lossy(), msg.as_bytes(), -1);
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
    match send_with_fd(&path, msg.as_bytes(), fd) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(socket = %path, error = %e, name, "cannot store a descriptor with systemd");
            false
        }
    }
}

/// Send `msg` to the datagram socket at `socket` (`@name`: abstract),
/// with `fd` attached (`SCM_RIGHTS`) unless it is negative.
pub fn send_with_fd(socket: &str, msg: &[u8], fd: RawFd) -> std::io::Result<()> {
    // SAFETY: plain syscalls on locally owned buffers and descriptors.
    unsafe {
        let s = libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let s = OwnedFd::from_raw_fd(s);
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let bytes = socket.as_bytes();
        if bytes.len() >= addr.sun_path.len() {
            return Err(std::io::ErrorKind::InvalidInput.into());
        }
        for (d, b) in addr.sun_path.iter_mut().zip(bytes) {
            *d = *b as libc::c_char;
        }
        if bytes.first() == Some(&b'@') {
            addr.sun_path[0] = 0;
        }
        let addr_len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len()) as u32;
        let mut iov = libc::iovec {
            iov_base: msg.as_ptr() as *mut libc::c_void,
            iov_len: msg.len(),
        };
        let space = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
        let mut control = vec![0u8; space];
        let mut hdr: libc::msghdr = std::mem::zeroed();
        hdr.msg_name = &mut addr as *mut _ as *mut libc::c_void;
        hdr.msg_namelen = addr_len;
        hdr.msg_iov = &mut iov;
        hdr.msg_iovlen = 1;
        // A negative `fd`: the message alone.
        if fd >= 0 {
            hdr.msg_control = control.as_mut_ptr() as *mut libc::c_void;
            hdr.msg_controllen = space as _;
            let cmsg = libc::CMSG_FIRSTHDR(&hdr);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut RawFd, fd);
        }
        if libc::sendmsg(s.as_raw_fd(), &hdr, libc::MSG_NOSIGNAL) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
