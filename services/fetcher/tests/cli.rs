//! Runs the `stargaze-fetcher` binary: `--print-config`, bad and missing config
//! files, and the skeleton's clean exit.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use stargaze_service::config::Config;

const BIN: &str = env!("CARGO_BIN_EXE_stargaze-fetcher");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
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
fn print_config_prints_the_effective_toml() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "c.toml",
        "[fetcher]\nretries = 2\n[log]\nformat = \"json\"\n",
    );
    let out = run(&["--config", &cfg, "--print-config", "--log-level", "debug"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let printed = Config::from_toml_str(&stdout, Path::new("<stdout>")).unwrap();
    let mut want = Config::default();
    want.fetcher.retries = 2;
    want.log.format = stargaze_service::config::LogFormat::Json;
    want.log.level = "debug".into();
    assert_eq!(printed, want, "{stdout}");
    // Nothing but the TOML on stdout, no log lines.
    assert!(stdout.starts_with("[fetcher]"), "{stdout}");
}

#[test]
fn unknown_key_is_an_error_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "bad.toml", "[fs]\nn_thread = 3\n");
    let out = run(&["--config", &cfg]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.starts_with("stargaze-fetcher: error: "), "{stderr}");
    assert!(stderr.contains(&cfg), "{stderr}");
    assert!(
        stderr.contains("unknown key `n_thread` in section [fs]"),
        "{stderr}"
    );
    assert!(stderr.contains("did you mean `n_threads`?"), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn bad_value_is_an_error_even_with_print_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "bad.toml", "[fetcher]\nrequest_timeout = 30\n");
    let out = run(&["--config", &cfg, "--print-config"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains(&cfg), "{stderr}");
    assert!(stderr.contains("line 2"), "{stderr}");
    assert!(stderr.contains("\"30s\""), "{stderr}");
    assert!(out.stdout.is_empty());

    let cfg = write(dir.path(), "syntax.toml", "[log\n");
    let out = run(&["--config", &cfg]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains(&cfg));
}

#[test]
fn missing_explicit_config_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let missing = missing.to_str().unwrap();
    let out = run(&["--config", missing]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains(&format!("config file {missing} does not exist")),
        "{stderr}"
    );

    // The environment variable is an explicit choice too.
    let out = Command::new(BIN)
        .env("STARGAZE_CONFIG", missing)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains(missing));
}

#[test]
fn bad_log_level_flag_is_an_error() {
    let out = run(&["--log-level", "loud", "--print-config"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("unknown log level `loud`"), "{stderr}");
}

#[test]
fn default_path_may_be_absent() {
    if Path::new(stargaze_service::config::DEFAULT_PATH).exists() {
        eprintln!(
            "skipped: {} exists on this machine",
            stargaze_service::config::DEFAULT_PATH
        );
        return;
    }
    let out = run(&["--print-config"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), Config::default().to_toml());
}
