//! A docker-registry with `auth: token` and the bearer-token server it
//! trusts (`tests/go/token-server`), both on 127.0.0.1.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{Registry, free_port, go_build, stop, wait_until};

pub struct TokenRegistry {
    pub registry: Registry,
    /// The token endpoint (`http://127.0.0.1:PORT/token`).
    pub realm: String,
    /// JSON lines, one per token request: user, scopes, granted access,
    /// grant (`basic` or `refresh_token`).
    pub token_log: PathBuf,
    /// An OAuth2 refresh token (docker's identity token) the server
    /// accepts for the user, POSTed with `grant_type=refresh_token`.
    pub refresh_token: String,
    server: Child,
    _dir: tempfile::TempDir,
}

impl TokenRegistry {
    /// Tokens for `user`/`password` live `lifetime_secs` (the registry then
    /// answers 401 with a new challenge); pull is granted on every
    /// repository, push on all but `readonly/...`.
    pub fn start(user: &str, password: &str, lifetime_secs: u32) -> TokenRegistry {
        let bin = go_build("token-server");
        let dir = tempfile::Builder::new()
            .prefix("sg-token-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let cert = dir.path().join("signer.pem");
        let token_log = dir.path().join("tokens.jsonl");
        let addr = format!("127.0.0.1:{}", free_port());
        let out = std::fs::File::create(dir.path().join("server.log")).expect("log");
        let server = Command::new(bin)
            .args(["-addr", &addr, "-user", user, "-password", password])
            .args(["-lifetime", &lifetime_secs.to_string()])
            .args(["-refresh-token", &format!("refresh-{password}")])
            .arg("-cert")
            .arg(&cert)
            .arg("-log")
            .arg(&token_log)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("start token-server");
        let a = addr.clone();
        let c = cert.clone();
        wait_until(
            "token-server",
            Duration::from_secs(20),
            &dir.path().join("server.log"),
            || c.is_file() && std::net::TcpStream::connect(&a).is_ok(),
        );
        let realm = format!("http://{addr}/token");
        let extra = format!(
            "auth:\n  token:\n    realm: {realm}\n    service: stargaze-test\n    issuer: stargaze-test-issuer\n    rootcertbundle: {}\n",
            cert.display()
        );
        let registry = Registry::start_with(&extra, None);
        TokenRegistry {
            registry,
            realm,
            token_log,
            refresh_token: format!("refresh-{password}"),
            server,
            _dir: dir,
        }
    }

    /// The token requests so far.
    pub fn token_requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.token_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for TokenRegistry {
    fn drop(&mut self) {
        stop(&mut self.server);
    }
}
