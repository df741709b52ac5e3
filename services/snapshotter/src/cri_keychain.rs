//! The CRI keychain's bookkeeping: turning the `auth` of a kubelet's
//! `PullImage` into registry credentials for the fetcher, handing them
//! over, and counting what is remembered.
//!
//! The secrets live in memory only, in two places: the fetcher's registry
//! client's keychain, which uses them for the image's repository until the
//! TTL has passed, and here, so that a fetcher that restarted (and lost
//! them) is handed them again within [`RESEND_EVERY`], with what is left of
//! their TTL, or until the kubelet removes the repository's last image
//! ([`Keychain::forget_removed`], a `RememberCredentials` with a zero TTL
//! to the fetcher). Which repositories have credentials and until when feeds the
//! `stargaze_snapshotter_cri_credentials` gauge and `stargaze status`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use parking_lot::Mutex;
use stargaze_proto::cri::AuthConfig;
use stargaze_proto::v1::fetcher_client::FetcherClient;
use stargaze_proto::v1::{RegistryCredentials, RememberCredentialsRequest};
use stargaze_service::metrics::RpcMetrics;
use tonic::transport::Channel;

/// Why a pull's credentials could not be used. The messages name the image
/// and never the secret.
#[derive(Debug, thiserror::Error)]
pub enum KeychainError {
    #[error(
        "image {image}: the pull's auth field is not base64 of user:password; the kubelet's pull secret is malformed"
    )]
    BadAuth { image: String },
    #[error(
        "image {image}: stargaze-fetcher did not take the pull's credentials ({message}); they are handed over again every 2 s, but layers prepared before that are unpacked by containerd unless the fetcher has other credentials for the registry"
    )]
    Fetcher { image: String, message: String },
}

/// The credentials in a CRI `AuthConfig`, or `None` when it carries none
/// (an anonymous pull). `auth` is docker's base64 `user:password`, used as
/// containerd does: when there is neither a user name nor an identity
/// token. `server_address` is not needed: credentials are filed under the
/// pulled image's own registry.
pub fn credentials_of(
    image: &str,
    auth: &AuthConfig,
) -> Result<Option<RegistryCredentials>, KeychainError> {
    let (mut username, mut password) = (auth.username.clone(), auth.password.clone());
    if username.is_empty() && auth.identity_token.is_empty() && !auth.auth.is_empty() {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.auth.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| KeychainError::BadAuth {
                image: image.to_string(),
            })?;
        let (u, p) = decoded
            .split_once(':')
            .ok_or_else(|| KeychainError::BadAuth {
                image: image.to_string(),
            })?;
        (username, password) = (u.to_string(), p.to_string());
    }
    let c = RegistryCredentials {
        username,
        password,
        registry_token: auth.registry_token.clone(),
        identity_token: auth.identity_token.clone(),
    };
    let empty = c.username.is_empty() && c.registry_token.is_empty() && c.identity_token.is_empty();
    Ok((!empty).then_some(c))
}

/// The registry host and repository of an image name: containerd's full
/// form ("docker.io/library/nginx:1", "r.example:5000/app@sha256:…") or
/// the kubelet's short one ("nginx:1", "team/app"), normalized as
/// containerd normalizes it. `None` for an image ID ("sha256:…").
pub fn repository_of(name: &str) -> Option<(String, String)> {
    let name = name.trim();
    let name = name.split('@').next().unwrap_or(name);
    if name.is_empty() || name.starts_with("sha256:") {
        return None;
    }
    let (host, path) = match name.split_once('/') {
        Some((h, rest)) if h.contains('.') || h.contains(':') || h == "localhost" => {
            (h.to_string(), rest.to_string())
        }
        _ => ("docker.io".to_string(), name.to_string()),
    };
    // A tag follows the last ':' of the path.
    let path = match path.rsplit_once(':') {
        Some((p, tag)) if !tag.contains('/') => p.to_string(),
        _ => path,
    };
    if path.is_empty() {
        return None;
    }
    let path = if host == "docker.io" && !path.contains('/') {
        format!("library/{path}")
    } else {
        path
    };
    Some((host, path))
}

/// How often every live credential is handed to the fetcher again (a
/// local call each; the fetcher logs only new ones).
pub const RESEND_EVERY: Duration = Duration::from_secs(2);

/// What the proxy counts: the calls it passed on (by method and code) and
/// the credentials handed to the fetcher.
#[derive(Debug, Default)]
pub struct KeychainStats {
    /// Calls served on the proxy's socket.
    pub rpc: Arc<RpcMetrics>,
    /// `PullImage`s that carried credentials.
    pub pulls_with_auth: AtomicU64,
    /// Credentials the fetcher did not take (it was down, or the auth was
    /// malformed).
    pub handover_failures: AtomicU64,
    /// (host, repository) → until when the fetcher keeps its credentials.
    remembered: Mutex<HashMap<(String, String), Instant>>,
}

impl KeychainStats {
    /// Repositories whose credentials have not expired yet.
    pub fn live_credentials(&self) -> usize {
        let now = Instant::now();
        let mut r = self.remembered.lock();
        r.retain(|_, until| *until > now);
        r.len()
    }
}

/// A pull's credentials as held here (by image reference).
struct Held {
    credentials: RegistryCredentials,
    pulled: Instant,
    until: Instant,
    /// The registry host and repository the fetcher filed them under,
    /// once it answered.
    repository: Option<(String, String)>,
}

/// Hands pull credentials to the fetcher.
#[derive(Clone)]
pub struct Keychain {
    fetcher: FetcherClient<Channel>,
    ttl: Duration,
    held: Arc<Mutex<HashMap<String, Held>>>,
    pub stats: Arc<KeychainStats>,
}

impl Keychain {
    pub fn new(fetcher: FetcherClient<Channel>, ttl: Duration) -> Keychain {
        Keychain {
            fetcher,
            ttl,
            held: Arc::default(),
            stats: Arc::default(),
        }
    }

    /// Hand every live credential to the fetcher again, every
    /// [`RESEND_EVERY`], until the process stops: a restarted fetcher has
    /// lost them, and one that was down at the pull never had them.
    pub async fn keep_fetcher_supplied(self) {
        loop {
            tokio::time::sleep(RESEND_EVERY).await;
            let now = Instant::now();
            let mut live: Vec<(Instant, String, RegistryCredentials, Duration)> = {
                let mut held = self.held.lock();
                held.retain(|_, h| h.until > now);
                held.iter()
                    .map(|(image, h)| {
                        let left = h.until - now;
                        (h.pulled, image.clone(), h.credentials.clone(), left)
                    })
                    .collect()
            };
            // Oldest pull first: where two pulls of one repository brought
            // different secrets, the latest is handed over last and wins.
            live.sort_by_key(|(pulled, ..)| *pulled);
            for (_, image, credentials, left) in live {
                if let Err(e) = self.hand_over(&image, credentials, left).await {
                    tracing::debug!(error = %e, "CRI keychain: handing credentials over again");
                }
            }
        }
    }

    /// One `RememberCredentials` call; notes what the fetcher filed.
    async fn hand_over(
        &self,
        image: &str,
        credentials: RegistryCredentials,
        ttl: Duration,
    ) -> Result<(String, String), KeychainError> {
        let until = Instant::now() + ttl;
        let answer = self
            .fetcher
            .clone()
            .remember_credentials(RememberCredentialsRequest {
                image_ref: image.to_string(),
                credentials: Some(credentials),
                ttl_millis: ttl.as_millis() as u64,
            })
            .await
            .map_err(|s| KeychainError::Fetcher {
                image: image.to_string(),
                message: s.message().to_string(),
            })?
            .into_inner();
        self.stats
            .remembered
            .lock()
            .insert((answer.host.clone(), answer.repository.clone()), until);
        let repository = (answer.host, answer.repository);
        self.supersede(image, &repository);
        Ok(repository)
    }

    /// The fetcher keeps one credential per repository, the last handed
    /// over: credentials of earlier pulls of the same repository are
    /// dropped here too, so that handing everything over again never
    /// brings an older secret back.
    fn supersede(&self, image: &str, repository: &(String, String)) {
        let mut held = self.held.lock();
        let Some(pulled) = held.get_mut(image).map(|h| {
            h.repository = Some(repository.clone());
            h.pulled
        }) else {
            return;
        };
        held.retain(|other, h| {
            other == image || h.repository.as_ref() != Some(repository) || h.pulled > pulled
        });
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Does it hold (or has it handed over) any credential?
    pub fn holds_any(&self) -> bool {
        !self.held.lock().is_empty() || self.stats.live_credentials() > 0
    }

    /// After containerd removed an image named `removed` (its tags and
    /// digests): forget, here and in the fetcher, the credentials of each
    /// of its repositories that no image in `remaining` (what containerd
    /// still has) belongs to. A repository with another image left keeps
    /// them: a container started from that image later reads its layers
    /// lazily too, without the kubelet pulling (so handing over) again.
    /// Returns the (host, repository) pairs forgotten.
    pub async fn forget_removed(
        &self,
        removed: &[String],
        remaining: &[String],
    ) -> Vec<(String, String)> {
        use std::collections::BTreeSet;
        let gone: BTreeSet<(String, String)> =
            removed.iter().filter_map(|n| repository_of(n)).collect();
        let kept: BTreeSet<(String, String)> =
            remaining.iter().filter_map(|n| repository_of(n)).collect();
        let mut forgotten = Vec::new();
        for repo in gone.difference(&kept) {
            let dropped = {
                let mut held = self.held.lock();
                let before = held.len();
                held.retain(|image, h| {
                    let of = h.repository.clone().or_else(|| repository_of(image));
                    of.as_ref() != Some(repo)
                });
                before - held.len()
            };
            let handed_over = self.stats.remembered.lock().remove(repo).is_some();
            if dropped == 0 && !handed_over {
                continue;
            }
            let image_ref = format!("{}/{}", repo.0, repo.1);
            let answer = self
                .fetcher
                .clone()
                .remember_credentials(RememberCredentialsRequest {
                    image_ref: image_ref.clone(),
                    credentials: None,
                    ttl_millis: 0,
                })
                .await;
            match answer {
                Ok(_) => tracing::info!(
                    registry = repo.0,
                    repository = repo.1,
                    "pull credentials forgotten: the repository's last image was removed"
                ),
                Err(s) => tracing::warn!(
                    registry = repo.0,
                    repository = repo.1,
                    error = s.message(),
                    "the repository's last image was removed but stargaze-fetcher could not be told to forget its pull credentials; it keeps them until their TTL ends"
                ),
            }
            forgotten.push(repo.clone());
        }
        forgotten
    }

    /// Give the fetcher the credentials of a pull of `image`, if it has
    /// any. Errors are for the log: the pull goes on either way.
    pub async fn remember(
        &self,
        image: &str,
        auth: Option<&AuthConfig>,
    ) -> Result<(), KeychainError> {
        let Some(auth) = auth else { return Ok(()) };
        let credentials = match credentials_of(image, auth) {
            Ok(Some(c)) => c,
            Ok(None) => return Ok(()),
            Err(e) => {
                self.stats.handover_failures.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        self.stats.pulls_with_auth.fetch_add(1, Ordering::Relaxed);
        // Kept first: if the fetcher is down now, the next round of
        // `keep_fetcher_supplied` delivers them.
        let now = Instant::now();
        self.held.lock().insert(
            image.to_string(),
            Held {
                credentials: credentials.clone(),
                pulled: now,
                until: now + self.ttl,
                repository: None,
            },
        );
        match self.hand_over(image, credentials, self.ttl).await {
            Ok((host, repository)) => {
                tracing::info!(
                    image,
                    registry = host,
                    repository,
                    ttl = ?self.ttl,
                    "pull credentials handed to the fetcher"
                );
                Ok(())
            }
            Err(e) => {
                self.stats.handover_failures.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(f: impl FnOnce(&mut AuthConfig)) -> AuthConfig {
        let mut a = AuthConfig::default();
        f(&mut a);
        a
    }

    #[test]
    fn auth_config_forms() {
        let image = "r.example/app:1";
        let plain = credentials_of(
            image,
            &auth(|a| {
                a.username = "u".into();
                a.password = "p".into();
            }),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (plain.username.as_str(), plain.password.as_str()),
            ("u", "p")
        );
        // docker's base64 "user:password" (what a dockerconfigjson secret holds).
        let encoded = credentials_of(image, &auth(|a| a.auth = "dTpwOnE=".into()))
            .unwrap()
            .unwrap();
        assert_eq!(
            (encoded.username.as_str(), encoded.password.as_str()),
            ("u", "p:q")
        );
        let token = credentials_of(image, &auth(|a| a.registry_token = "t".into()))
            .unwrap()
            .unwrap();
        assert_eq!(token.registry_token, "t");
        assert!(
            credentials_of(image, &AuthConfig::default())
                .unwrap()
                .is_none()
        );
        let bad = credentials_of(image, &auth(|a| a.auth = "not base64!".into())).unwrap_err();
        assert!(bad.to_string().contains(image), "{bad}");
    }

    #[tokio::test]
    async fn a_later_pull_of_a_repository_supersedes_earlier_ones() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("fetcher.sock");
        let fetcher = FetcherClient::new(stargaze_proto::connect_unix(&socket).unwrap());
        let k = Keychain::new(fetcher, Duration::from_secs(60));
        let now = Instant::now();
        let repo = |r: &str| ("r.example".to_string(), r.to_string());
        let held = |user: &str, pulled: Instant, repository: Option<(String, String)>| Held {
            credentials: RegistryCredentials {
                username: user.into(),
                ..Default::default()
            },
            pulled,
            until: now + Duration::from_secs(60),
            repository,
        };
        {
            let mut h = k.held.lock();
            h.insert(
                "r.example/app:1".into(),
                held("old", now, Some(repo("app"))),
            );
            h.insert(
                "r.example/app:2".into(),
                held("new", now + Duration::from_secs(1), None),
            );
            h.insert(
                "r.example/other:1".into(),
                held("o", now, Some(repo("other"))),
            );
        }
        let keys = |k: &Keychain| {
            let mut v: Vec<String> = k.held.lock().keys().cloned().collect();
            v.sort();
            v
        };
        k.supersede("r.example/app:2", &repo("app"));
        assert_eq!(keys(&k), ["r.example/app:2", "r.example/other:1"]);
        // An older pull handed over late drops nothing newer.
        k.held.lock().insert(
            "r.example/app:0".into(),
            held("older", now - Duration::from_secs(1), None),
        );
        k.supersede("r.example/app:0", &repo("app"));
        assert_eq!(
            keys(&k),
            ["r.example/app:0", "r.example/app:2", "r.example/other:1"]
        );
        k.supersede("r.example/app:2", &repo("app"));
        assert_eq!(keys(&k), ["r.example/app:2", "r.example/other:1"]);
    }

    #[test]
    fn repositories_of_full_and_short_names() {
        let r = |n: &str| repository_of(n).map(|(h, p)| format!("{h} {p}"));
        assert_eq!(r("nginx").as_deref(), Some("docker.io library/nginx"));
        assert_eq!(r("nginx:1").as_deref(), Some("docker.io library/nginx"));
        assert_eq!(
            r("docker.io/library/nginx:1").as_deref(),
            Some("docker.io library/nginx")
        );
        assert_eq!(r("team/app:2").as_deref(), Some("docker.io team/app"));
        assert_eq!(
            r("r.example:5000/team/app@sha256:abcd").as_deref(),
            Some("r.example:5000 team/app")
        );
        assert_eq!(r("localhost/app").as_deref(), Some("localhost app"));
        assert_eq!(r("sha256:abcd"), None);
        assert_eq!(r(""), None);
    }

    #[test]
    fn debug_output_is_redacted() {
        let a = auth(|a| {
            a.username = "u".into();
            a.password = "hunter2".into();
            a.auth = "aHVudGVyMg==".into();
        });
        let c = credentials_of("r.example/app:1", &a).unwrap().unwrap();
        let text = format!("{a:?} {c:?}");
        assert!(
            !text.contains("hunter2") && !text.contains("aHVudGVyMg"),
            "{text}"
        );
    }
}
