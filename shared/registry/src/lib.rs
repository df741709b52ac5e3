//! The OCI distribution client: the only code that talks to registries,
//! used by the fetcher (layers, manifests, traces) and by the CLI's
//! `rpull` and `convert` (manifests, pushes).
//!
//! * [`reference`] parses image references the way containerd does.
//! * [`hosts`] decides where requests go: the Go Stargz Snapshotter's
//!   `[[resolver.host."HOST".mirrors]]`, containerd's `hosts.toml` mirrors,
//!   then the origin; plain HTTP for localhost and insecure hosts.
//! * [`auth`] reads docker config credentials (and credential helpers),
//!   answers `WWW-Authenticate` challenges and caches bearer tokens per host
//!   and scope, refreshing them before they expire.
//! * [`keychain`] asks credential sources in order by host and repository:
//!   what the snapshotter's CRI keychain handed over (in memory, expiring),
//!   then the docker config; nothing derived from a credential outlives it.
//! * [`client`] sends requests over hyper 1 + rustls (HTTP/2 when offered),
//!   with a connection limit per host, timeouts and jittered retries.
//! * [`proxy`] routes them through `HTTPS_PROXY` / `HTTP_PROXY` (CONNECT
//!   tunnels for https, absolute-form requests for http) unless `NO_PROXY`
//!   or loopback says otherwise, as containerd does.
//! * [`blob`] reads byte ranges of a blob: endpoint and size found with one
//!   probe, an endpoint that fails a read (by error variant) set aside for
//!   a back-off while reads go on from the next one (mirror → origin) and
//!   come back after it, redirects followed and refreshed on 403, many ranges per request
//!   with `206`, `206 multipart/byteranges` and `200` answers all handled, a
//!   fall back to one range per request for registries that refuse
//!   multi-range, and 416 answers never leaving a poisoned connection behind;
//!   `stream_ranges` hands an answer on while it arrives, in pieces cut
//!   where the caller's members end, and resumes a broken answer after the
//!   bytes already handed on.
//! * [`Client::resolve_manifest`] turns a reference into a platform's
//!   manifest (through an index when there is one).
//! * [`push`] writes to registries (for `stargaze convert docker://…`):
//!   blob existence checks, cross-repository mounts, uploads in one PUT or
//!   in PATCH chunks (memory stays at one chunk), manifest PUTs, and whole
//!   blobs downloaded as a stream and verified. Requests that write ask
//!   for `pull,push` tokens (plus `pull` on a mount's source repository).

pub mod auth;
pub mod blob;
pub mod client;
pub mod hosts;
pub mod keychain;
pub mod proxy;
pub mod push;
pub mod reference;

pub use auth::DockerConfig;
pub use blob::Blob;
pub use client::{Client, ClientOptions, HostStats};
pub use hosts::{Endpoint, Hosts};
pub use keychain::{Keychain, Lease, Remembered};
pub use proxy::{Proxies, Proxy};
pub use push::UploadSource;
pub use reference::Reference;

use http::StatusCode;

/// Registry errors; each names the host, repository and object, and never
/// credentials.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    #[error("image reference {reference:?}: {reason}")]
    Reference { reference: String, reason: String },
    #[error("registry configuration: {0}")]
    Config(String),
    #[error("request to {url} failed: {reason}")]
    Request { url: String, reason: String },
    /// A request through a proxy (`HTTPS_PROXY` / `HTTP_PROXY`) failed.
    #[error(
        "request to {url} through proxy {proxy} (from {var}) failed: {reason}; check the proxy, or list the registry in NO_PROXY to bypass it"
    )]
    Proxy {
        url: String,
        proxy: String,
        var: String,
        reason: String,
    },
    /// Every endpoint of the registry (mirrors, then the origin) failed:
    /// each one's error, in the order they were tried.
    #[error("every endpoint for {reference} failed: {}", list_failures(.failures))]
    Endpoints {
        reference: String,
        failures: Vec<EndpointFailure>,
    },
    #[error("registry {host} refused the credentials: {reason}")]
    Unauthorized { host: String, reason: String },
    #[error("registry {host}, repository {repository}, {object}: HTTP {status} while {what}")]
    Status {
        host: String,
        repository: String,
        object: String,
        status: u16,
        what: String,
    },
    #[error("blob {blob}: {reason}")]
    Range { blob: String, reason: String },
    /// The answer's body broke off or came back short: worth another try.
    #[error("blob {blob}: {reason}")]
    Body { blob: String, reason: String },
    #[error("the registry refuses multi-range requests")]
    MultiRangeRefused,
    #[error("{what} {digest} from {host}: content does not match its digest")]
    Digest {
        what: String,
        digest: String,
        host: String,
    },
    #[error("image {reference}: no manifest for platform {platform} (available: {available})")]
    NoPlatform {
        reference: String,
        platform: String,
        available: String,
    },
}

/// One endpoint's failure in [`RegistryError::Endpoints`].
#[derive(Debug, Clone)]
pub struct EndpointFailure {
    /// `scheme://host[:port]` of the endpoint.
    pub endpoint: String,
    /// A mirror (not the reference's own host).
    pub mirror: bool,
    pub error: RegistryError,
}

fn list_failures(failures: &[EndpointFailure]) -> String {
    failures
        .iter()
        .map(|f| {
            let kind = if f.mirror { "mirror" } else { "origin" };
            format!("[{kind} {}: {}]", f.endpoint, f.error)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl RegistryError {
    /// The error after trying `failures` (in order): none = no endpoint,
    /// one = its error as it is, more = [`RegistryError::Endpoints`].
    pub(crate) fn after_endpoints(r: &Reference, mut failures: Vec<EndpointFailure>) -> Self {
        if failures.len() > 1 {
            return RegistryError::Endpoints {
                reference: format!("{}/{}", r.host, r.repository),
                failures,
            };
        }
        match failures.pop() {
            Some(f) => f.error,
            None => RegistryError::Config(format!("no endpoint for {}", r.host)),
        }
    }

    /// The answer of the endpoint tried last (normally the origin) for
    /// [`RegistryError::Endpoints`]; the error itself otherwise. What a
    /// caller asks "was it a 404?" of.
    pub fn last_answer(&self) -> &RegistryError {
        match self {
            RegistryError::Endpoints { failures, .. } => failures
                .last()
                .map(|f| f.error.last_answer())
                .unwrap_or(self),
            e => e,
        }
    }

    /// Might the same request succeed later? (For several endpoints: the
    /// last one's answer decides, as it did when only it was kept.)
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Endpoints { .. } => {
                let last = self.last_answer();
                !matches!(last, RegistryError::Endpoints { .. }) && last.is_transient()
            }
            RegistryError::Request { .. }
            | RegistryError::Proxy { .. }
            | RegistryError::Body { .. } => true,
            RegistryError::Status { status, .. } => StatusCode::from_u16(*status)
                .map(client::retryable)
                .unwrap_or(false),
            _ => false,
        }
    }
}

impl RegistryError {
    /// Did the endpoint fail (rather than the request or the blob), so
    /// that another endpoint of the same registry may answer? Connection
    /// errors and timeouts, 5xx and 429 (after the client's retries), and
    /// answers that broke off.
    pub fn is_endpoint_failure(&self) -> bool {
        self.is_transient()
    }
}

/// os/architecture[/variant]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// The platform of this machine.
    pub fn host() -> Platform {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            other => other,
        };
        Platform {
            os: "linux".into(),
            architecture: architecture.into(),
            variant: (architecture == "arm64").then(|| "v8".into()),
        }
    }

    fn matches(&self, p: &serde_json::Value) -> bool {
        p["os"] == self.os.as_str()
            && p["architecture"] == self.architecture.as_str()
            && match (&self.variant, p["variant"].as_str()) {
                (Some(v), Some(w)) => v == w,
                _ => true,
            }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";
const MAX_MANIFEST: usize = 4 << 20;

/// A manifest as fetched: its digest, media type and bytes (verified).
#[derive(Debug, Clone)]
pub struct Manifest {
    pub digest: String,
    pub media_type: String,
    pub bytes: bytes::Bytes,
}

impl Client {
    /// A handle to read a blob of a repository.
    pub fn blob(&self, reference: &Reference, digest: &str) -> Blob {
        Blob::new(self.clone(), reference.clone(), digest.to_string())
    }

    async fn get_manifest(&self, r: &Reference, object: &str) -> Result<Manifest, RegistryError> {
        let mut failures = Vec::new();
        for ep in self.endpoints(r)? {
            let url = ep.url(r, "manifests", object);
            let failed = |error| EndpointFailure {
                endpoint: ep.origin.clone(),
                mirror: ep.mirror,
                error,
            };
            let (status, headers, body) = match self
                .get_small(&ep, r, &url, MANIFEST_ACCEPT, MAX_MANIFEST)
                .await
            {
                Ok(x) => x,
                Err(e) => {
                    failures.push(failed(e));
                    continue;
                }
            };
            if !status.is_success() {
                failures.push(failed(RegistryError::Status {
                    host: r.host.clone(),
                    repository: r.repository.clone(),
                    object: object.to_string(),
                    status: status.as_u16(),
                    what: "fetching the manifest".into(),
                }));
                continue;
            }
            let digest = stargaze_format::Digest::of(&body).to_string();
            if object.starts_with("sha256:") && digest != object {
                return Err(RegistryError::Digest {
                    what: "manifest".into(),
                    digest: object.into(),
                    host: ep.host().into(),
                });
            }
            let media_type = headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(String::from)
                .or_else(|| {
                    serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()?
                        .get("mediaType")?
                        .as_str()
                        .map(String::from)
                })
                .unwrap_or_default();
            return Ok(Manifest {
                digest,
                media_type,
                bytes: body,
            });
        }
        Err(RegistryError::after_endpoints(r, failures))
    }

    /// The image manifest of `r` for `platform` (through an index if needed).
    pub async fn resolve_manifest(
        &self,
        r: &Reference,
        platform: &Platform,
    ) -> Result<Manifest, RegistryError> {
        let top = self.get_manifest(r, r.object()).await?;
        let v: serde_json::Value = serde_json::from_slice(&top.bytes)
            .map_err(|e| RegistryError::Config(format!("{r}: manifest is not JSON: {e}")))?;
        let Some(list) = v["manifests"].as_array() else {
            return Ok(top);
        };
        let pick = list
            .iter()
            .find(|m| platform.matches(&m["platform"]))
            .ok_or_else(|| RegistryError::NoPlatform {
                reference: r.to_string(),
                platform: platform.to_string(),
                available: list
                    .iter()
                    .map(|m| {
                        format!(
                            "{}/{}",
                            m["platform"]["os"].as_str().unwrap_or("?"),
                            m["platform"]["architecture"].as_str().unwrap_or("?")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        let digest = pick["digest"].as_str().unwrap_or_default().to_string();
        self.get_manifest(r, &digest).await
    }

    /// A small blob (an image config) in one request, verified.
    pub async fn fetch_small_blob(
        &self,
        r: &Reference,
        digest: &str,
    ) -> Result<bytes::Bytes, RegistryError> {
        self.fetch_blob(r, digest, MAX_MANIFEST as u64).await
    }

    /// A whole blob of at most `max` bytes in one request, verified.
    pub async fn fetch_blob(
        &self,
        r: &Reference,
        digest: &str,
        max: u64,
    ) -> Result<bytes::Bytes, RegistryError> {
        let blob = self.blob(r, digest);
        // A suffix range of `max` bytes: the whole of a smaller blob and its
        // size in one round trip (a size probe first would cost another).
        let (size, start, data) = blob.read_tail(max).await?;
        if start > 0 {
            return Err(RegistryError::Range {
                blob: blob.name(),
                reason: format!("{size} bytes is more than the {max} allowed"),
            });
        }
        if stargaze_format::Digest::of(&data).to_string() != digest {
            return Err(RegistryError::Digest {
                what: "blob".into(),
                digest: digest.into(),
                host: r.host.clone(),
            });
        }
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fail-over to the next endpoint is decided by the error's variant
    /// (and status code), never by its text.
    #[test]
    fn only_failures_of_the_endpoint_fail_over() {
        let status = |status| RegistryError::Status {
            host: "mirror.example".into(),
            repository: "app".into(),
            object: "sha256:1".into(),
            status,
            what: "reading ranges".into(),
        };
        let endpoint = [
            RegistryError::Request {
                url: "http://mirror.example/v2/app/blobs/sha256:1".into(),
                reason: "connection refused".into(),
            },
            RegistryError::Body {
                blob: "b".into(),
                reason: "reset".into(),
            },
            status(500),
            status(502),
            status(503),
            status(429),
        ];
        for e in &endpoint {
            assert!(e.is_endpoint_failure(), "{e}");
        }
        let not_endpoint = [
            status(404),
            status(401),
            status(403),
            status(416),
            status(501),
            RegistryError::Digest {
                what: "blob".into(),
                digest: "sha256:1".into(),
                host: "mirror.example".into(),
            },
            RegistryError::Range {
                blob: "b".into(),
                reason: "connection refused".into(),
            },
            RegistryError::MultiRangeRefused,
            RegistryError::Unauthorized {
                host: "mirror.example".into(),
                reason: "HTTP 503".into(),
            },
        ];
        for e in &not_endpoint {
            assert!(!e.is_endpoint_failure(), "{e}");
        }
    }
}
