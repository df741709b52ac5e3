//! The command-line contract every stargaze service binary keeps:
//! `--print-config`, unknown keys and bad values reported with file and line,
//! a missing explicit config file, bad log levels, the default path being
//! optional. Each service's `tests/cli.rs` runs it with
//! [`service_cli_tests!`](crate::service_cli_tests).

use std::path::Path;
use std::process::{Command, Output, Stdio};

use stargaze_config::Config;

/// A service binary under test.
pub struct ServiceCli {
    pub bin: &'static str,
    pub name: &'static str,
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn write(dir: &Path, name: &str, content: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p.to_str().unwrap().to_string()
}

impl ServiceCli {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(self.bin)
            .args(args)
            .env_remove("STARGAZE_CONFIG")
            .stdin(Stdio::null())
            .output()
            .expect("cannot run the binary")
    }

    /// Run the binary where the default config path is absent although
    /// this machine has a file there: in a private mount namespace with an
    /// empty tmpfs over its directory (root, as the tests run in CI).
    fn run_without_default_config(&self, args: &[&str]) -> Output {
        crate::require_that(
            crate::is_root(),
            &format!(
                "root, to hide {} in a private mount namespace",
                stargaze_config::DEFAULT_PATH
            ),
            "run the tests as root, as CI does",
        );
        let dir = Path::new(stargaze_config::DEFAULT_PATH)
            .parent()
            .expect("the default path has a directory");
        Command::new(crate::require("unshare"))
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(r#"mount -t tmpfs stargaze-test "$0" && exec "$@""#)
            .arg(dir)
            .arg(self.bin)
            .args(args)
            .env_remove("STARGAZE_CONFIG")
            .stdin(Stdio::null())
            .output()
            .expect("cannot run the binary under unshare")
    }

    pub fn print_config_prints_the_effective_toml(&self) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = write(
            dir.path(),
            "c.toml",
            "[fetcher]\nretries = 2\n[log]\nformat = \"json\"\n",
        );
        let out = self.run(&["--config", &cfg, "--print-config", "--log-level", "debug"]);
        assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
        let stdout = text(&out.stdout);
        let printed = Config::from_toml_str(&stdout, Path::new("<stdout>")).unwrap();
        let mut want = Config::default();
        want.fetcher.retries = 2;
        want.log.format = stargaze_config::LogFormat::Json;
        want.log.level = "debug".into();
        assert_eq!(printed, want, "{stdout}");
        // Nothing but the TOML on stdout, no log lines.
        assert!(stdout.starts_with("[fetcher]"), "{stdout}");
    }

    pub fn unknown_key_is_an_error_naming_file_and_key(&self) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = write(dir.path(), "bad.toml", "[fs]\nn_thread = 3\n");
        let out = self.run(&["--config", &cfg]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
        assert!(
            stderr.starts_with(&format!("{}: error: ", self.name)),
            "{stderr}"
        );
        assert!(stderr.contains(&cfg), "{stderr}");
        assert!(
            stderr.contains("unknown key `n_thread` in section [fs]"),
            "{stderr}"
        );
        assert!(stderr.contains("did you mean `n_threads`?"), "{stderr}");
        assert!(out.stdout.is_empty());
    }

    pub fn bad_value_is_an_error_even_with_print_config(&self) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = write(dir.path(), "bad.toml", "[fetcher]\nrequest_timeout = 30\n");
        let out = self.run(&["--config", &cfg, "--print-config"]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
        assert!(stderr.contains(&cfg), "{stderr}");
        assert!(stderr.contains("line 2"), "{stderr}");
        assert!(stderr.contains("\"30s\""), "{stderr}");
        assert!(out.stdout.is_empty());

        let cfg = write(dir.path(), "syntax.toml", "[log\n");
        let out = self.run(&["--config", &cfg]);
        assert_eq!(out.status.code(), Some(1));
        assert!(text(&out.stderr).contains(&cfg));
    }

    pub fn missing_explicit_config_is_an_error(&self) {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.toml");
        let missing = missing.to_str().unwrap();
        let out = self.run(&["--config", missing]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
        assert!(
            stderr.contains(&format!("config file {missing} does not exist")),
            "{stderr}"
        );

        // The environment variable is an explicit choice too.
        let out = Command::new(self.bin)
            .env("STARGAZE_CONFIG", missing)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(text(&out.stderr).contains(missing));
    }

    pub fn bad_log_level_flag_is_an_error(&self) {
        let out = self.run(&["--log-level", "loud", "--print-config"]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
        assert!(stderr.contains("unknown log level `loud`"), "{stderr}");
    }

    pub fn default_path_may_be_absent(&self) {
        let out = if Path::new(stargaze_config::DEFAULT_PATH).exists() {
            self.run_without_default_config(&["--print-config"])
        } else {
            self.run(&["--print-config"])
        };
        assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), Config::default().to_toml());
    }
}

/// One `#[test]` per contract item for a service binary.
#[macro_export]
macro_rules! service_cli_tests {
    ($bin:expr, $name:expr) => {
        const CLI: $crate::service_cli::ServiceCli = $crate::service_cli::ServiceCli {
            bin: $bin,
            name: $name,
        };
        #[test]
        fn print_config_prints_the_effective_toml() {
            CLI.print_config_prints_the_effective_toml()
        }
        #[test]
        fn unknown_key_is_an_error_naming_file_and_key() {
            CLI.unknown_key_is_an_error_naming_file_and_key()
        }
        #[test]
        fn bad_value_is_an_error_even_with_print_config() {
            CLI.bad_value_is_an_error_even_with_print_config()
        }
        #[test]
        fn missing_explicit_config_is_an_error() {
            CLI.missing_explicit_config_is_an_error()
        }
        #[test]
        fn bad_log_level_flag_is_an_error() {
            CLI.bad_log_level_flag_is_an_error()
        }
        #[test]
        fn default_path_may_be_absent() {
            CLI.default_path_may_be_absent()
        }
    };
}
