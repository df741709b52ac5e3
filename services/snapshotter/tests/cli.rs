//! The `stargaze-snapshotter` binary keeps the services' command-line contract
//! (`stargaze_testkit::service_cli`).

stargaze_testkit::service_cli_tests!(
    env!("CARGO_BIN_EXE_stargaze-snapshotter"),
    "stargaze-snapshotter"
);

use std::path::Path;
use std::process::{Command, Output, Stdio};

use stargaze_service::config::Config;

fn run(args: &[&str]) -> Output {
    Command::new(CLI.bin)
        .args(args)
        .env_remove("STARGAZE_CONFIG")
        .stdin(Stdio::null())
        .output()
        .expect("cannot run the binary")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn write(dir: &Path, name: &str, content: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn go_compatible_address_and_root_flags() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "c.toml", "[snapshotter]\nroot = \"/srv/a\"\n");
    let out = run(&[
        "--config",
        &cfg,
        "--address",
        "/run/x/snap.sock",
        "--root",
        "/srv/b",
        "--print-config",
    ]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let printed = Config::from_toml_str(&text(&out.stdout), Path::new("<stdout>")).unwrap();
    assert_eq!(printed.snapshotter.socket, Path::new("/run/x/snap.sock"));
    assert_eq!(printed.snapshotter.root, Path::new("/srv/b"));

    let out = run(&["--config", &cfg, "--root", "relative/dir"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("command-line flags"), "{stderr}");
    assert!(stderr.contains("[snapshotter] root"), "{stderr}");
    assert!(stderr.contains("absolute"), "{stderr}");

    // A socket that clashes with another service is caught too.
    let out = run(&["--address", "/run/stargaze/fetcher.sock", "--print-config"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("is also [fetcher] socket"));
}
