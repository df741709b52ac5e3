//! `stargaze-fs`: the node's one FUSE mount, in which every attached layer is
//! a directory named by its digest. It will own the inode tables read from the
//! mmapped TOC index, the read path (serving verified bytes from the chunk
//! cache, asking the fetcher on a miss), FUSE passthrough for files that are
//! complete in the cache, and overlay whiteouts and opaque directories. It
//! will serve `stargaze.v1.Fs` on a unix socket to the snapshotter.
//!
//! For now it is a skeleton: it parses its flags, loads and checks the
//! configuration (`[fs]` and `[log]`), prints it with `--print-config`, and
//! otherwise logs that it is not implemented yet and exits 0.

use std::process::ExitCode;

use clap::Parser;
use stargaze_service::CommonArgs;

/// Serves lazily pulled layers through one FUSE mount per node.
#[derive(Debug, Parser)]
#[command(name = "stargaze-fs", version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    stargaze_service::run(
        "stargaze-fs",
        &args.common,
        |_| {},
        |startup| {
            let c = &startup.config.fs;
            stargaze_service::not_implemented(
                "stargaze-fs",
                &startup,
                &[
                    ("socket", c.socket.display().to_string()),
                    ("mountpoint", c.mountpoint.display().to_string()),
                ],
            );
            Ok(())
        },
    )
}
