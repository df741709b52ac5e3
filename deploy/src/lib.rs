//! The files an operator installs on a node, kept next to the code so they
//! change with it, and the tests that check them.
//!
//! * `systemd/*.service`: one unit per service, started fetcher → fs →
//!   snapshotter → containerd; `make install` fills in the binary directory.
//! * `containerd.toml`: the `[proxy_plugins.stargaze]` entry and the CRI
//!   settings to merge into containerd's config.
//! * `config.toml`: every key of `/etc/stargaze/config.toml` at its default
//!   (checked against the code by the `stargaze-config` tests).
//!
//! `scripts/install.sh` (`make install` / `make uninstall`) copies them into
//! place; `tests/install.rs` installs into a scratch root and checks the result
//! with `systemd-analyze verify` and `systemd-analyze security`.

/// The units `make install` puts in place, in start order.
pub const UNITS: [&str; 3] = [
    "stargaze-fetcher.service",
    "stargaze-fs.service",
    "stargaze-snapshotter.service",
];
