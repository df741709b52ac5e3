//! `stargaze-fetcher`: the node's only client of the registries. It will own
//! registry access (auth, mirrors, TLS), resolving a layer's footer and TOC,
//! the TOC index files, batching and coalescing of range requests,
//! decompression (libdeflate for gzip, zstd), chunk verification, writing the
//! chunk cache and publishing presence, prefetch and background fetch. It will
//! serve `stargaze.v1.Fetcher` on a unix socket to the fs and snapshotter
//! services.
//!
//! For now it is a skeleton: it parses its flags, loads and checks the
//! configuration (`[fetcher]` and `[log]`), prints it with `--print-config`,
//! and otherwise logs that it is not implemented yet and exits 0.

use std::process::ExitCode;

use clap::Parser;
use stargaze_service::CommonArgs;

/// Fetches eStargz layers lazily from registries into the node's chunk cache.
#[derive(Debug, Parser)]
#[command(name = "stargaze-fetcher", version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    stargaze_service::run(
        "stargaze-fetcher",
        &args.common,
        |_| {},
        |startup| {
            let c = &startup.config.fetcher;
            stargaze_service::not_implemented(
                "stargaze-fetcher",
                &startup,
                &[
                    ("socket", c.socket.display().to_string()),
                    ("cache_dir", c.cache_dir.display().to_string()),
                ],
            );
            Ok(())
        },
    )
}
