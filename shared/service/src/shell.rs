//! The serving side every daemon shares: its gRPC services on a unix
//! socket (0600, the directory created), each request accounted by
//! [`RpcMetricsLayer`], systemd told `READY=1` once the socket is bound and
//! `STOPPING=1` at SIGTERM or SIGINT, the socket removed after the last
//! request; and the optional Prometheus endpoint.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::signal::unix::{SignalKind, signal};

use crate::metrics::{RpcMetrics, RpcMetricsLayer};
use crate::notify::sd_notify;

/// Serve `routes` on the unix socket `socket` until SIGTERM or SIGINT.
///
/// `serving` runs once the socket is bound, before systemd hears `READY=1`:
/// the service logs there what it serves. In-flight requests are finished
/// before this returns; the socket file is gone by then.
pub async fn serve(
    socket: &Path,
    routes: tonic::service::Routes,
    rpc: Arc<RpcMetrics>,
    serving: impl FnOnce(),
) -> Result<()> {
    serve_keeping_listener(socket, None, routes, rpc, serving).await
}

/// [`serve`], with the listening socket kept in systemd's descriptor store
/// under `store_name` (when given and the unit has one,
/// `FileDescriptorStoreMax=`): after a crash or restart the next process
/// takes the same listener over, so clients that connect meanwhile wait in
/// its backlog instead of being refused (containerd fails the calls of a
/// proxy plugin it cannot connect to). The socket file then stays when
/// the process ends: the stored listener still answers at its path.
pub async fn serve_keeping_listener(
    socket: &Path,
    store_name: Option<&str>,
    routes: tonic::service::Routes,
    rpc: Arc<RpcMetrics>,
    serving: impl FnOnce(),
) -> Result<()> {
    // Registered before READY: a stop right after start-up must not kill
    // the process with the default disposition.
    let term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let (listener, stored) = match store_name {
        None => (stargaze_proto::bind_unix(socket).await?, false),
        Some(name) => listener_from_store(socket, name).await?,
    };
    serving();
    sd_notify("READY=1");
    tonic::transport::Server::builder()
        .layer(RpcMetricsLayer(rpc))
        .add_routes(routes)
        .serve_with_incoming_shutdown(stargaze_proto::incoming(listener), stop_signal(term))
        .await
        .context("serving gRPC")?;
    if !stored {
        let _ = std::fs::remove_file(socket);
    }
    Ok(())
}

/// The listener systemd kept for the previous process, if it still
/// answers at `socket`; else a new one, handed to the store. Returns
/// whether the store has it.
async fn listener_from_store(
    socket: &Path,
    name: &str,
) -> Result<(tokio::net::UnixListener, bool)> {
    use std::os::fd::AsRawFd;
    if let Some(fd) = crate::notify::take_stored_fd(name) {
        let listener = std::os::unix::net::UnixListener::from(fd);
        let at_path = listener
            .local_addr()
            .ok()
            .is_some_and(|a| a.as_pathname() == Some(socket));
        // The socket file must still be there (a client connecting at the
        // path reaches the stored listener).
        let same_file = {
            use std::os::unix::fs::FileTypeExt;
            std::fs::symlink_metadata(socket).is_ok_and(|m| m.file_type().is_socket())
        };
        if at_path && same_file {
            listener
                .set_nonblocking(true)
                .context("the stored listening socket")?;
            tracing::info!(socket = %socket.display(), "took the listening socket over from systemd's descriptor store: clients waited in its backlog meanwhile");
            let l = tokio::net::UnixListener::from_std(listener)
                .context("the stored listening socket")?;
            return Ok((l, true));
        }
        tracing::warn!(socket = %socket.display(), "the stored listening socket is not the one at the socket's path any more: listening anew");
    }
    let l = stargaze_proto::bind_unix(socket).await?;
    let stored = crate::notify::store_fd(l.as_raw_fd(), name);
    Ok((l, stored))
}

/// Wait for SIGTERM (systemd's stop) or SIGINT (a terminal's ^C).
async fn stop_signal(mut term: tokio::signal::unix::Signal) {
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    sd_notify("STOPPING=1");
    tracing::info!("stopping");
}

/// Serve Prometheus `/metrics` on `address` (a `[<section>] metrics_address`)
/// and log where; an empty address means off.
pub async fn metrics_endpoint(
    address: &str,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> Result<()> {
    if address.is_empty() {
        return Ok(());
    }
    let bound = serve_metrics(address, render).await?;
    tracing::info!(address = %bound, "serving Prometheus metrics on /metrics");
    Ok(())
}

/// Serve Prometheus metrics: `GET /metrics` on `addr` answers with the text
/// `render` produces at each scrape; other paths get 404. Runs until the
/// process ends; a bind failure is returned at once.
pub async fn serve_metrics(
    addr: &str,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let render = render.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let render = render.clone();
                        async move {
                            let resp = if req.uri().path() == "/metrics" {
                                http::Response::builder()
                                .header(
                                    http::header::CONTENT_TYPE,
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )
                                .body(http_body_util::Full::new(bytes::Bytes::from(render())))
                            } else {
                                http::Response::builder()
                                    .status(http::StatusCode::NOT_FOUND)
                                    .body(http_body_util::Full::new(bytes::Bytes::from_static(
                                        b"try /metrics\n",
                                    )))
                            };
                            resp.map_err(std::io::Error::other)
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(local)
}
