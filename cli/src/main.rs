//! `stargaze`: the command-line tool.
//!
//! * `stargaze convert` turns an image into eStargz or zstd:chunked, from
//!   and to OCI layouts, registries and archives (locations in skopeo's
//!   syntax: `oci:`, `docker://`, `oci-archive:`, `docker-archive:`);
//!   `stargaze image convert` is the same with nerdctl's and ctr-remote's
//!   flags and plain image references.
//! * `stargaze inspect` shows a layer's format and TOC and verifies every
//!   chunk, for a blob file or every layer of an image.
//!
//! * `stargaze rpull` pulls an image into containerd lazily: manifest and
//!   config into the content store, each layer prepared through the
//!   stargaze snapshotter as a remote snapshot (`ctr-remote image rpull`'s
//!   job, against plain containerd 1.6).
//! * `stargaze status` asks the three services what they are doing: up or
//!   down, lazily pulled images and how much of each layer is cached,
//!   cache use and hit rate, recent errors (`--json` for scripts).

mod convert;
mod convert_progress;
mod image;
mod image_store;
mod inspect;
mod optimize;
mod rpull;
mod status;
mod trace;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "stargaze",
    version,
    about = "Lazy-pulling images for containerd: convert, inspect and lazily pull eStargz / zstd:chunked images"
)]
struct Cli {
    /// Log level (error, warn, info, debug, trace) or a tracing filter.
    #[arg(long, global = true, default_value = "warn", env = "STARGAZE_LOG")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert an image to eStargz or zstd:chunked (SRC and DST as oci:DIR[:TAG],
    /// docker://REF, oci-archive:PATH or docker-archive:PATH).
    Convert(convert::Args),
    /// nerdctl-style image commands (`stargaze image convert`).
    #[command(subcommand)]
    Image(image::Command),
    /// Show a layer's format and table of contents and verify every chunk.
    Inspect(inspect::Args),
    /// Pull an image into containerd lazily through the stargaze snapshotter.
    Rpull(rpull::Args),
    /// Run a workload in a container of SRC (pulled lazily), then write DST
    /// with the files it read first, behind a prefetch landmark:
    /// `stargaze optimize docker://SRC DST -- CMD ARGS...`.
    Optimize(optimize::Args),
    /// Show the services' state: lazily pulled images, cache, recent errors.
    Status(status::Args),
    /// Learned access traces (`stargaze trace show IMAGE`).
    #[command(subcommand)]
    Trace(trace::Command),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Convert(a) => convert::run(a),
        Command::Image(c) => image::run(c),
        Command::Inspect(a) => inspect::run(a),
        Command::Rpull(a) => rpull::run(a),
        Command::Optimize(a) => optimize::run(a),
        Command::Status(a) => status::run(a),
        Command::Trace(c) => trace::run(c),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("stargaze: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Parse a byte count: `4194304`, `4MiB`, `64KiB`, `4M` (2^20), `100MB`
/// (10^6); the config files' parser, so both read a size alike.
pub fn parse_size(s: &str) -> Result<u64, String> {
    stargaze_config::parse_size(s)
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::parse_size("4194304").unwrap(), 4 << 20);
        assert_eq!(super::parse_size("4MiB").unwrap(), 4 << 20);
        assert_eq!(super::parse_size("64k").unwrap(), 64 << 10);
        assert_eq!(super::parse_size("4M").unwrap(), 4 << 20);
        // SI, as in config files (it used to be 2^20 here).
        assert_eq!(super::parse_size("4MB").unwrap(), 4_000_000);
        assert!(super::parse_size("4XB").is_err());
        assert!(super::parse_size("").is_err());
    }
}
