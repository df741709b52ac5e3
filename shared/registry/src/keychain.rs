//! Where the client finds credentials: a list of sources consulted in
//! order by registry host and repository, the first answer wins.
//!
//! The fetcher's list is [`Remembered`] first (what the kubelet handed the
//! snapshotter's CRI keychain with a `PullImage`, in memory only, for one
//! repository and a limited time), then the node's [`DockerConfig`]. A
//! credential comes as a [`Lease`] that says until when it may be used, so
//! that nothing derived from it (a cached Basic header, a bearer token)
//! outlives it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::RegistryError;
use crate::auth::{Credential, DockerConfig};

/// A credential and how long it may be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub credential: Credential,
    /// `None`: as long as its source keeps answering with it.
    pub until: Option<Instant>,
    /// Which source answered (for logs and errors; never the secret).
    pub source: &'static str,
}

impl Lease {
    /// `want`, shortened so as not to outlast the lease.
    pub fn cap(&self, want: Duration) -> Duration {
        match self.until {
            Some(until) => want.min(until.saturating_duration_since(Instant::now())),
            None => want,
        }
    }
}

/// One place credentials come from.
pub trait CredentialSource: Send + Sync {
    /// A short name for logs and errors ("cri", "docker config").
    fn name(&self) -> &'static str;
    /// Credentials for `repository` on registry `host`, if this source has any.
    fn lookup(&self, host: &str, repository: &str) -> Result<Option<Lease>, RegistryError>;
}

impl CredentialSource for DockerConfig {
    fn name(&self) -> &'static str {
        "docker config"
    }

    /// Docker's config knows hosts only: every repository of a host shares
    /// its entry.
    fn lookup(&self, host: &str, _repository: &str) -> Result<Option<Lease>, RegistryError> {
        Ok(DockerConfig::lookup(self, host)?.map(|credential| Lease {
            credential,
            until: None,
            source: "docker config",
        }))
    }
}

/// Credentials handed over at run time for one repository each, kept in
/// memory only until their time is up. Expired entries are dropped by
/// whichever call sees them first.
#[derive(Default)]
pub struct Remembered {
    entries: Mutex<HashMap<(String, String), (Credential, Instant)>>,
}

impl std::fmt::Debug for Remembered {
    // Which repositories, never the secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let e = self.entries.lock();
        f.debug_list().entries(e.keys()).finish()
    }
}

impl Remembered {
    /// Keep `credential` for `repository` on `host` for `ttl` (replacing
    /// what was there: the kubelet's latest pull secret wins). A zero `ttl`
    /// forgets the entry instead. Whether the credential is new for the
    /// repository (not the one it already had, or none).
    pub fn remember(
        &self,
        host: &str,
        repository: &str,
        credential: Credential,
        ttl: Duration,
    ) -> bool {
        let key = (host.to_string(), repository.to_string());
        let mut e = self.entries.lock();
        if ttl.is_zero() {
            e.remove(&key);
            return false;
        }
        let now = Instant::now();
        let new = !matches!(e.get(&key), Some((c, until)) if *c == credential && *until > now);
        e.insert(key, (credential, now + ttl));
        new
    }

    /// Forget `repository`'s credential on `host`; whether there was one.
    pub fn forget(&self, host: &str, repository: &str) -> bool {
        let key = (host.to_string(), repository.to_string());
        self.entries.lock().remove(&key).is_some()
    }

    /// How many unexpired credentials are kept.
    pub fn len(&self) -> usize {
        let mut e = self.entries.lock();
        let now = Instant::now();
        e.retain(|_, (_, until)| *until > now);
        e.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl CredentialSource for Remembered {
    fn name(&self) -> &'static str {
        "cri"
    }

    fn lookup(&self, host: &str, repository: &str) -> Result<Option<Lease>, RegistryError> {
        let mut e = self.entries.lock();
        let key = (host.to_string(), repository.to_string());
        match e.get(&key) {
            Some((_, until)) if *until <= Instant::now() => {
                e.remove(&key);
                Ok(None)
            }
            Some((credential, until)) => Ok(Some(Lease {
                credential: credential.clone(),
                until: Some(*until),
                source: "cri",
            })),
            None => Ok(None),
        }
    }
}

/// The sources, in the order they are asked.
#[derive(Clone)]
pub struct Keychain {
    remembered: Arc<Remembered>,
    sources: Vec<Arc<dyn CredentialSource>>,
}

impl Keychain {
    /// [`Remembered`] credentials first, then the docker config.
    pub fn new(docker: DockerConfig) -> Keychain {
        let remembered = Arc::new(Remembered::default());
        Keychain {
            sources: vec![remembered.clone(), Arc::new(docker)],
            remembered,
        }
    }

    /// Where run-time credentials (the CRI keychain's) are kept.
    pub fn remembered(&self) -> &Arc<Remembered> {
        &self.remembered
    }

    /// The first source's answer for `repository` on `host`.
    pub fn lookup(&self, host: &str, repository: &str) -> Result<Option<Lease>, RegistryError> {
        for s in &self.sources {
            if let Some(lease) = s.lookup(host, repository)? {
                tracing::debug!(host, repository, source = s.name(), "credentials found");
                return Ok(Some(lease));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(u: &str) -> Credential {
        Credential::Basic {
            username: u.into(),
            password: format!("{u}-secret"),
        }
    }

    #[test]
    fn remembered_first_then_docker_config_by_host_and_repository() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"auths":{"r.example":{"username":"docker","password":"d"}}}"#,
        )
        .unwrap();
        let k = Keychain::new(DockerConfig::in_dir(dir.path()));
        k.remembered().remember(
            "r.example",
            "team/app",
            basic("cri"),
            Duration::from_secs(60),
        );
        let got = k.lookup("r.example", "team/app").unwrap().unwrap();
        assert_eq!((got.credential, got.source), (basic("cri"), "cri"));
        assert!(got.until.is_some());
        // Another repository of the host: the docker config's host entry.
        let other = k.lookup("r.example", "team/other").unwrap().unwrap();
        assert_eq!(other.source, "docker config");
        assert_eq!(other.until, None);
        assert_eq!(k.lookup("elsewhere.example", "team/app").unwrap(), None);
    }

    #[test]
    fn remembered_credentials_expire_and_zero_ttl_forgets() {
        let r = Remembered::default();
        r.remember("h", "a", basic("a"), Duration::from_millis(30));
        assert!(r.remember("h", "b", basic("b"), Duration::from_secs(60)));
        // Handed over again (the snapshotter does after a restart): not new.
        assert!(!r.remember("h", "b", basic("b"), Duration::from_secs(59)));
        assert_eq!(r.len(), 2);
        let lease = r.lookup("h", "a").unwrap().unwrap();
        assert!(lease.cap(Duration::from_secs(3600)) <= Duration::from_millis(30));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(r.lookup("h", "a").unwrap(), None);
        assert_eq!(r.len(), 1);
        r.remember("h", "b", basic("b"), Duration::ZERO);
        assert!(r.is_empty());
    }

    #[test]
    fn debug_shows_no_secret() {
        let r = Remembered::default();
        r.remember("h", "a", basic("user"), Duration::from_secs(60));
        let text = format!("{r:?} {:?}", r.lookup("h", "a").unwrap());
        assert!(!text.contains("user-secret"), "{text}");
        assert!(text.contains("redacted"), "{text}");
    }
}
