//! Registry authentication: docker config credentials, `WWW-Authenticate`
//! challenges, bearer tokens cached per host and scope.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::RegistryError;

/// Credentials for one registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    Basic {
        username: String,
        password: String,
    },
    /// An OAuth2 refresh token (docker's `identitytoken`).
    IdentityToken(String),
    /// A bearer token for the registry itself, sent as it is (CRI's
    /// `registry_token`).
    RegistryToken(String),
}

impl std::fmt::Debug for Credential {
    // Never print secrets, not even in debug logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Credential::IdentityToken(_) => f.write_str("IdentityToken(<redacted>)"),
            Credential::RegistryToken(_) => f.write_str("RegistryToken(<redacted>)"),
        }
    }
}

/// `~/.docker/config.json` (or `$DOCKER_CONFIG/config.json`), read on every
/// lookup so that a `docker login` on the node takes effect at once.
#[derive(Debug, Clone)]
pub struct DockerConfig {
    path: PathBuf,
}

impl DockerConfig {
    /// The config of the current user (`$DOCKER_CONFIG`, else `$HOME/.docker`).
    pub fn from_env() -> DockerConfig {
        let dir = std::env::var_os("DOCKER_CONFIG")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))
            .unwrap_or_else(|| PathBuf::from("/root/.docker"));
        DockerConfig::in_dir(&dir)
    }

    pub fn in_dir(dir: &Path) -> DockerConfig {
        DockerConfig {
            path: dir.join("config.json"),
        }
    }

    /// Credentials for a registry host (`docker.io` uses docker's index key).
    pub fn lookup(&self, host: &str) -> Result<Option<Credential>, RegistryError> {
        let Ok(text) = std::fs::read(&self.path) else {
            return Ok(None);
        };
        let cfg: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| RegistryError::Config(format!("{}: {e}", self.path.display())))?;
        let keys: Vec<String> = if host == "docker.io" || host == "registry-1.docker.io" {
            vec![
                "https://index.docker.io/v1/".into(),
                "docker.io".into(),
                "index.docker.io".into(),
            ]
        } else {
            vec![
                host.into(),
                format!("https://{host}"),
                format!("http://{host}"),
            ]
        };
        let helper = keys
            .iter()
            .find_map(|k| cfg["credHelpers"][k].as_str())
            .or_else(|| cfg["credsStore"].as_str());
        for k in &keys {
            let a = &cfg["auths"][k];
            if a.is_null() {
                continue;
            }
            if let Some(t) = a["identitytoken"].as_str().filter(|t| !t.is_empty()) {
                return Ok(Some(Credential::IdentityToken(t.into())));
            }
            if let Some(auth) = a["auth"].as_str().filter(|s| !s.is_empty()) {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| {
                        RegistryError::Config(format!(
                            "{}: auths.{k}.auth is not base64 user:password",
                            self.path.display()
                        ))
                    })?;
                if let Some((u, p)) = decoded.split_once(':') {
                    return Ok(Some(Credential::Basic {
                        username: u.into(),
                        password: p.into(),
                    }));
                }
            }
            if let (Some(u), Some(p)) = (a["username"].as_str(), a["password"].as_str()) {
                return Ok(Some(Credential::Basic {
                    username: u.into(),
                    password: p.into(),
                }));
            }
        }
        match helper {
            Some(h) => credential_helper(h, &keys[0]),
            None => Ok(None),
        }
    }
}

/// Run `docker-credential-<name> get` with the server URL on stdin.
fn credential_helper(name: &str, server: &str) -> Result<Option<Credential>, RegistryError> {
    use std::io::Write;
    let program = format!("docker-credential-{name}");
    let mut child = match std::process::Command::new(&program)
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            return Err(RegistryError::Config(format!(
                "credential helper {program}: {e}"
            )));
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(server.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| RegistryError::Config(format!("credential helper {program}: {e}")))?;
    if !out.status.success() {
        // "credentials not found" is not an error: anonymous access may work.
        return Ok(None);
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        RegistryError::Config(format!("credential helper {program}: bad output: {e}"))
    })?;
    let user = v["Username"].as_str().unwrap_or_default();
    let secret = v["Secret"].as_str().unwrap_or_default().to_string();
    Ok(Some(if user == "<token>" {
        Credential::IdentityToken(secret)
    } else {
        Credential::Basic {
            username: user.into(),
            password: secret,
        }
    }))
}

/// A parsed `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let (scheme, rest) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
    let mut params = HashMap::new();
    let mut s = rest;
    while !s.is_empty() {
        let (k, after) = s.split_once('=')?;
        let after = after.trim_start();
        let (v, next) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (&q[..end], &q[end + 1..])
        } else {
            match after.find(',') {
                Some(i) => (&after[..i], &after[i..]),
                None => (after, ""),
            }
        };
        params.insert(k.trim().to_ascii_lowercase(), v.to_string());
        s = next.trim_start_matches([',', ' ']);
    }
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Some(Challenge::Basic),
        "bearer" => Some(Challenge::Bearer {
            realm: params.remove("realm")?,
            service: params.remove("service"),
            scope: params.remove("scope"),
        }),
        _ => None,
    }
}

/// Cached authorization values (bearer tokens, Basic headers) by (host,
/// key), each with the moment it stops being used.
#[derive(Default)]
pub struct TokenCache {
    tokens: parking_lot::Mutex<HashMap<(String, String), (String, Instant)>>,
}

/// How long before a token's stated expiry it is no longer sent.
const EXPIRY_MARGIN: Duration = Duration::from_secs(5);

impl TokenCache {
    /// A value still within its time.
    pub fn get(&self, host: &str, scope: &str) -> Option<String> {
        let t = self.tokens.lock();
        t.get(&(host.to_string(), scope.to_string()))
            .filter(|(_, until)| *until > Instant::now())
            .map(|(tok, _)| tok.clone())
    }

    /// Drop every token and Basic header made for `repository` (on any
    /// host: mirrors cache theirs under their own): after its credentials
    /// were forgotten, nothing made from them is sent again.
    pub fn forget_repository(&self, repository: &str) -> usize {
        let prefix = format!("repository:{repository}:");
        let mut t = self.tokens.lock();
        let before = t.len();
        t.retain(|(_, scope), _| {
            !scope
                .split(' ')
                .any(|item| item.starts_with(&prefix) && item.split(':').count() == 3)
        });
        before - t.len()
    }

    /// Keep a token that lives `lifetime`: refreshed before it expires,
    /// at 90 % of its lifetime less a few seconds for requests in flight.
    pub fn put(&self, host: &str, scope: &str, token: String, lifetime: Duration) {
        self.put_leased(host, scope, token, lifetime, None);
    }

    /// [`TokenCache::put`], and never past `lease_until`: a value made from
    /// a credential that expires (the CRI keychain's) expires with it.
    pub fn put_leased(
        &self,
        host: &str,
        scope: &str,
        token: String,
        lifetime: Duration,
        lease_until: Option<Instant>,
    ) {
        let mut until = Instant::now() + lifetime.mul_f64(0.9).saturating_sub(EXPIRY_MARGIN);
        if let Some(lease) = lease_until {
            until = until.min(lease);
        }
        self.tokens
            .lock()
            .insert((host.to_string(), scope.to_string()), (token, until));
    }

    pub fn forget(&self, host: &str, scope: &str) {
        self.tokens
            .lock()
            .remove(&(host.to_string(), scope.to_string()));
    }
}

pub fn basic_header(username: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/python:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/python:pull".into())
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate"), None);
    }

    #[test]
    fn docker_config_lookup() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"auths":{"r.example:5000":{"auth":"dXNlcjpwYXNz"},"https://index.docker.io/v1/":{"identitytoken":"tok"},"x.io":{"username":"a","password":"b"}}}"#,
        )
        .unwrap();
        let c = DockerConfig::in_dir(dir.path());
        assert_eq!(
            c.lookup("r.example:5000").unwrap(),
            Some(Credential::Basic {
                username: "user".into(),
                password: "pass".into()
            })
        );
        assert_eq!(
            c.lookup("docker.io").unwrap(),
            Some(Credential::IdentityToken("tok".into()))
        );
        assert!(matches!(
            c.lookup("x.io").unwrap(),
            Some(Credential::Basic { .. })
        ));
        assert_eq!(c.lookup("other.io").unwrap(), None);
        assert!(format!("{:?}", c.lookup("r.example:5000").unwrap()).contains("redacted"));
    }

    #[test]
    fn forgetting_a_repository_drops_its_tokens_on_every_host() {
        let t = TokenCache::default();
        let hour = Duration::from_secs(3600);
        t.put("r.example", "repository:team/app:pull", "a".into(), hour);
        t.put(
            "mirror.example",
            "basic repository:team/app:pull",
            "b".into(),
            hour,
        );
        t.put(
            "r.example",
            "repository:team/app:pull,push repository:base:pull",
            "c".into(),
            hour,
        );
        t.put("r.example", "repository:team/app2:pull", "d".into(), hour);
        t.put("r.example", "repository:base:pull", "e".into(), hour);
        assert_eq!(t.forget_repository("team/app"), 3);
        assert_eq!(t.get("r.example", "repository:team/app:pull"), None);
        assert_eq!(
            t.get("r.example", "repository:team/app2:pull").as_deref(),
            Some("d")
        );
        assert_eq!(
            t.get("r.example", "repository:base:pull").as_deref(),
            Some("e")
        );
    }
}
