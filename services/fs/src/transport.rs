//! Which transport carries the mount's FUSE requests: `classic` (fuser's
//! threads reading and writing `/dev/fuse`) or `io_uring` (the rings of
//! [`crate::uring`]), chosen when the connection is set up and kept for its
//! life (a process taking it over uses what the session file says).

use stargaze_service::config::FsTransport;

/// Overrides `[fs] transport` (tests run the suite with each transport).
pub const ENV: &str = "STARGAZE_FS_TRANSPORT";

/// The transport serving a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Classic,
    IoUring,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Classic => "classic",
            Transport::IoUring => "io_uring",
        }
    }

    /// As written in the session file ("" from versions without transports).
    pub fn from_session(s: &str) -> Transport {
        if s == "io_uring" {
            Transport::IoUring
        } else {
            Transport::Classic
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{ENV}={0:?} is not a transport: use auto, io_uring or classic")]
    BadEnv(String),
    #[error(
        "the FUSE transport io_uring was asked for, but {0}; set `[fs] transport = \"auto\"` to fall back to classic"
    )]
    Unavailable(String),
}

/// The configured transport, unless the environment overrides it.
pub fn wanted(configured: FsTransport) -> Result<FsTransport, TransportError> {
    match std::env::var(ENV) {
        Ok(v) if !v.is_empty() => FsTransport::parse(&v).ok_or(TransportError::BadEnv(v)),
        _ => Ok(configured),
    }
}

/// Why the kernel did not offer io_uring in INIT, for the log.
pub fn why_not_offered() -> String {
    match crate::uring::module_enabled() {
        Some(false) => "the fuse module's enable_uring is off (echo Y > /sys/module/fuse/parameters/enable_uring, or see deploy/modprobe.d)".into(),
        Some(true) => "the kernel did not offer it in INIT".into(),
        None => "this kernel has no FUSE over io_uring (needs Linux >= 6.14 with CONFIG_FUSE_IO_URING)".into(),
    }
}
