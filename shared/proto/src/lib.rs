//! The gRPC APIs between stargaze's services and the unix-socket plumbing
//! they share.
//!
//! * [`containerd`] holds containerd's APIs, written from their published
//!   messages: snapshots (the snapshotter serves it as a proxy plugin), and
//!   content, images, leases and diff (`stargaze rpull` calls them).
//! * [`cri`] is the Kubernetes CRI API v1 (`runtime.v1`, vendored whole
//!   from k8s.io/cri-api): the snapshotter's CRI keychain serves its
//!   `ImageService` in front of containerd's, and the tests call it in
//!   place of crictl, which Debian lacks.
//! * [`v1`] is `stargaze.v1`, generated from `proto/` at build time with
//!   protox and tonic: the `Fetcher` service (resolve a layer, fetch ranges,
//!   prefetch, status, traces, credentials) that fs and the snapshotter
//!   call, the `Fs` service (attach, detach, list) the snapshotter calls,
//!   and the `Snapshotter` status `stargaze status` reads.
//! * [`bind_unix`] binds a server to a unix socket (stale socket removed,
//!   mode 0600, parent directory created) and [`connect_unix`] dials one.
//! * [`Failure`] says what a failed call means for its caller (no answer,
//!   the service's UNAVAILABLE, another answer), and [`patiently`] calls
//!   again while a service gives no answer because it restarts: the one
//!   retry rule the snapshotter and fs share.

pub mod v1 {
    tonic::include_proto!("stargaze.v1");
}

/// The Kubernetes CRI API v1.
pub mod cri {
    // Generated from the vendored proto, whose comments are Kubernetes'
    // prose, not rustdoc: its lists trip clippy's doc lints.
    #![allow(clippy::doc_lazy_continuation, clippy::doc_overindented_list_items)]
    tonic::include_proto!("runtime.v1");

    // Written by hand (build.rs skips the derived one): a pull secret
    // must not reach a log through `{:?}`.
    impl std::fmt::Debug for AuthConfig {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("AuthConfig")
                .field("username", &self.username)
                .field("server_address", &self.server_address)
                .field("secrets", &"<redacted>")
                .finish()
        }
    }
}

// As for `cri::AuthConfig`: never print the secrets.
impl std::fmt::Debug for v1::RegistryCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryCredentials")
            .field("username", &self.username)
            .field("secrets", &"<redacted>")
            .finish()
    }
}

/// containerd's APIs, in the module tree of their proto packages (the
/// generated code refers to `super::super::super::types::Mount`).
pub mod containerd {
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    pub mod services {
        pub mod snapshots {
            pub mod v1 {
                tonic::include_proto!("containerd.services.snapshots.v1");
            }
        }
        pub mod content {
            pub mod v1 {
                tonic::include_proto!("containerd.services.content.v1");
            }
        }
        pub mod images {
            pub mod v1 {
                tonic::include_proto!("containerd.services.images.v1");
            }
        }
        pub mod leases {
            pub mod v1 {
                tonic::include_proto!("containerd.services.leases.v1");
            }
        }
        pub mod diff {
            pub mod v1 {
                tonic::include_proto!("containerd.services.diff.v1");
            }
        }
    }
}

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Errors setting up a socket.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("socket {path} is in use by a running process; stop it first")]
    InUse { path: PathBuf },
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Bind a unix socket for a gRPC server: create the parent directory
/// (0755), refuse a socket another process still serves, remove a stale one,
/// and restrict the new socket to its owner (0600).
pub async fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener, SocketError> {
    let io = |source| SocketError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(SocketError::InUse {
                path: path.to_path_buf(),
            });
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// A stream of connections for `tonic::transport::Server::serve_with_incoming`.
pub fn incoming(listener: tokio::net::UnixListener) -> tokio_stream::wrappers::UnixListenerStream {
    tokio_stream::wrappers::UnixListenerStream::new(listener)
}

/// A channel to a gRPC server on a unix socket. The connection is made
/// lazily and re-made after the server restarts.
pub fn connect_unix(path: &Path) -> Result<tonic::transport::Channel, SocketError> {
    let path = path.to_path_buf();
    let p = path.clone();
    // The URI is required by the API but unused: the connector dials the socket.
    let endpoint = tonic::transport::Endpoint::try_from("http://[::]:50051").map_err(|source| {
        SocketError::Connect {
            path: path.clone(),
            source,
        }
    })?;
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_: tonic::transport::Uri| {
            let p = p.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(p).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        })),
    )
}

/// What a failed call tells its caller, for deciding whether to call again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No answer came: the service could not be reached, or its connection
    /// broke mid-call (the process died). tonic makes such a status itself
    /// from the transport error, which it keeps as the status's source,
    /// whatever code it picks. Worth waiting for: the service restarts.
    NoAnswer,
    /// The service answered UNAVAILABLE: what stands behind it (a registry,
    /// a full cache) failed after its own retries. Calling again at once
    /// would wait on the same failure.
    Unavailable,
    /// The service answered with another code.
    Answered(tonic::Code),
}

impl Failure {
    /// Classify a status: a status a service sent has no source (tonic
    /// reads it from the response's headers), one the client made from a
    /// transport error has one.
    pub fn of(status: &tonic::Status) -> Failure {
        if std::error::Error::source(status).is_some() {
            Failure::NoAnswer
        } else if status.code() == tonic::Code::Unavailable {
            Failure::Unavailable
        } else {
            Failure::Answered(status.code())
        }
    }
}

/// The first wait before calling a service that gave no answer again.
const FIRST_WAIT: Duration = Duration::from_millis(50);
/// The longest wait between calls (systemd starts a crashed service again
/// after 1 s).
const LONGEST_WAIT: Duration = Duration::from_secs(1);

/// `call` again while `service` gives [`Failure::NoAnswer`] (it
/// restarts), backing off from 50 ms to 1 s, for up to `patience`; any
/// answer, or the last status once the patience is spent, is returned.
/// A status that comes back is [`Failure::NoAnswer`] only if the patience
/// ran out.
pub async fn patiently<T, F, Fut>(
    service: &str,
    patience: Duration,
    mut call: F,
) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let start = Instant::now();
    let mut wait = FIRST_WAIT;
    loop {
        match call().await {
            Err(s) if Failure::of(&s) == Failure::NoAnswer && start.elapsed() + wait < patience => {
                tracing::debug!(service, error = %s.message(), "no answer; waiting for it");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(LONGEST_WAIT);
            }
            r => return r,
        }
    }
}
