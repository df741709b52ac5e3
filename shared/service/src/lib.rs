//! Start-up shared by the three stargaze daemons.
//!
//! Each service's `main` flattens [`CommonArgs`] into its own clap parser,
//! then calls [`run`] with a closure that gets the effective [`Config`]
//! (file, then command-line overrides). `run` handles `--print-config`,
//! sets up logging and turns any error into one clear line on stderr and
//! exit code 1. (Usage errors are clap's: exit code 2.)
//!
//! [`metrics`] holds what the services share for Prometheus: latency
//! histograms, gRPC request accounting (a tower layer), recent errors for
//! `stargaze status`; [`serve_metrics`] answers the scrapes.

pub mod metrics;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use stargaze_config::{Config, LogFormat};

pub use stargaze_config as config;

/// Flags every service accepts.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CommonArgs {
    /// Configuration file. Without this flag /etc/stargaze/config.toml is read
    /// if it exists; a file named here must exist.
    #[arg(long, value_name = "PATH", env = "STARGAZE_CONFIG")]
    pub config: Option<PathBuf>,

    /// Log level (error, warn, info, debug, trace) or filter directives such as
    /// "info,stargaze_fetcher=debug"; overrides [log] level.
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,

    /// Print the effective configuration (file, defaults and flags) as TOML
    /// and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// What a service's body receives.
pub struct Startup {
    pub config: Config,
    /// The file that was read, or `None` when only the defaults apply.
    pub config_file: Option<PathBuf>,
}

/// Load the configuration, apply `overrides` (the service's own flags) and the
/// common flags, and check the result.
pub fn load_config(args: &CommonArgs, overrides: impl FnOnce(&mut Config)) -> Result<Startup> {
    let (mut config, config_file) = Config::load_with_origin(args.config.as_deref())?;
    overrides(&mut config);
    if let Some(level) = &args.log_level {
        config.log.level = level.clone();
    }
    config
        .validate()
        .context("invalid configuration after applying command-line flags")?;
    Ok(Startup {
        config,
        config_file,
    })
}

/// Install the global tracing subscriber: stderr, text or JSON per `[log]`.
pub fn init_logging(config: &Config) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(config.log.filter_directives())
        .with_context(|| format!("invalid [log] level {:?}", config.log.level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let result = match config.log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))
}

/// Run a service: load the configuration, handle `--print-config`, set up
/// logging, then call `body`. Errors become `<name>: error: ...` on stderr and
/// exit code 1.
pub fn run(
    name: &str,
    args: &CommonArgs,
    overrides: impl FnOnce(&mut Config),
    body: impl FnOnce(Startup) -> Result<()>,
) -> ExitCode {
    let result = (|| {
        let startup = load_config(args, overrides)?;
        if args.print_config {
            let mut out = std::io::stdout().lock();
            out.write_all(startup.config.to_toml().as_bytes())
                .and_then(|()| out.flush())
                .context("cannot write the configuration to stdout")?;
            return Ok(());
        }
        init_logging(&startup.config)?;
        body(startup)
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole chain on one line: "context: cause: ...".
            eprintln!("{name}: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

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

/// Serve Prometheus metrics: `GET /metrics` on `addr` answers with the text
/// `render` produces at each scrape; other paths get 404. Runs until the
/// process ends; a bind failure is returned at once.
pub async fn serve_metrics(
    addr: &str,
    render: std::sync::Arc<dyn Fn() -> String + Send + Sync>,
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
