//! `stargaze-snapshotter`: containerd's proxy snapshot plugin. It will own
//! the `containerd.services.snapshots.v1.Snapshots` API, snapshot metadata in
//! an embedded transactional database (redb), remote-snapshot decisions from
//! the labels containerd passes, overlay mounts over the fs service's layer
//! directories, the fallback to ordinary unpacking for layers that cannot be
//! pulled lazily, and restoring mounts after a restart. It calls the fs and
//! fetcher services.
//!
//! For now it is a skeleton: it parses its flags (including the Go Stargz
//! Snapshotter's `--address` and `--root`), loads and checks the
//! configuration (`[snapshotter]` and `[log]`), prints it with
//! `--print-config`, and otherwise logs that it is not implemented yet and
//! exits 0.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use stargaze_service::CommonArgs;

/// containerd proxy snapshotter for lazily pulled eStargz images.
#[derive(Debug, Parser)]
#[command(name = "stargaze-snapshotter", version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,

    /// Socket containerd connects to; overrides [snapshotter] socket
    /// (same flag as containerd-stargz-grpc).
    #[arg(long, value_name = "PATH")]
    address: Option<PathBuf>,

    /// Directory for snapshot metadata and data; overrides [snapshotter] root
    /// (same flag as containerd-stargz-grpc).
    #[arg(long, value_name = "PATH")]
    root: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    stargaze_service::run(
        "stargaze-snapshotter",
        &args.common,
        |config| {
            if let Some(address) = &args.address {
                config.snapshotter.socket = address.clone();
            }
            if let Some(root) = &args.root {
                config.snapshotter.root = root.clone();
            }
        },
        |startup| {
            let c = &startup.config.snapshotter;
            stargaze_service::not_implemented(
                "stargaze-snapshotter",
                &startup,
                &[
                    ("socket", c.socket.display().to_string()),
                    ("root", c.root.display().to_string()),
                ],
            );
            Ok(())
        },
    )
}
