//! What the three stargaze daemons share around their own state: start-up,
//! the serving shell, metrics.
//!
//! Each service's `main` flattens [`CommonArgs`] into its own clap parser,
//! then calls [`run`] with an async body that gets the effective [`Config`]
//! (file, then command-line overrides). `run` handles `--print-config`,
//! sets up logging, starts the tokio runtime and turns any error into one
//! clear line on stderr and exit code 1. (Usage errors are clap's: exit
//! code 2.) The body builds the service's state from its config section and
//! hands its gRPC services to [`serve`] ([`shell`]): the unix socket, systemd
//! notification ([`notify`]), SIGTERM/SIGINT, socket cleanup; what the
//! service must do at stop (mark the cache clean, leave or detach the FUSE
//! mount) follows when `serve` returns.
//!
//! [`metrics`] holds what the services share for Prometheus: latency
//! histograms, gRPC request accounting (the tower layer `serve` installs),
//! recent errors for `stargaze status`; [`metrics_endpoint`] answers the
//! scrapes. [`mountinfo`] reads the mount table (fs and the snapshotter
//! find their mounts and the overlays on them there).

pub mod metrics;
pub mod mountinfo;
pub mod notify;
pub mod shell;

pub use notify::sd_notify;
pub use shell::{metrics_endpoint, serve, serve_keeping_listener, serve_metrics};

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
/// logging, then run `body` on a multi-threaded tokio runtime. Errors become
/// `<name>: error: ...` on stderr and exit code 1.
/// glibc gives threads that allocate at once arenas of their own (up to
/// eight per core) and reuses memory freed in one arena only there: a TOC
/// parsed on one blocking thread, a layer's reads decoded on others and
/// the async workers each grow an arena to their own peak, and the
/// process's peak RSS is their sum. Two arenas let freed memory serve the
/// next allocation; these daemons wait on I/O, not on the allocator's
/// locks.
fn limit_malloc_arenas() {
    // SAFETY: sets one allocator parameter; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

pub fn run<F>(
    name: &str,
    args: &CommonArgs,
    overrides: impl FnOnce(&mut Config),
    body: impl FnOnce(Startup) -> F,
) -> ExitCode
where
    F: Future<Output = Result<()>>,
{
    let result = (|| {
        let startup = load_config(args, overrides)?;
        if args.print_config {
            let mut out = std::io::stdout().lock();
            out.write_all(startup.config.to_toml().as_bytes())
                .and_then(|()| out.flush())
                .context("cannot write the configuration to stdout")?;
            return Ok(());
        }
        limit_malloc_arenas();
        notify::adopt_stored_fds();
        init_logging(&startup.config)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        runtime.block_on(body(startup))
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
