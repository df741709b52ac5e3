//! HTTP to registries: pools, limits, authentication, retries.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client as HyperClient;
use parking_lot::Mutex;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::auth::{Challenge, Credential, DockerConfig, TokenCache, basic_header, parse_challenge};
use crate::hosts::{Endpoint, Hosts};
use crate::keychain::{Keychain, Lease};
use crate::proxy::{Proxies, ProxyConnector};
use crate::{Reference, RegistryError};

type Http = HyperClient<hyper_rustls::HttpsConnector<ProxyConnector>, Full<Bytes>>;

/// Tunables of the client.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub max_connections_per_host: usize,
    /// One request, connection to last byte.
    pub request_timeout: Duration,
    /// Retries after the first try (connection errors, timeouts, 429, 5xx but 501).
    pub retries: u32,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// Most ranges in one multi-range request.
    pub max_ranges_per_request: usize,
    /// Always read one range per request (registries that mishandle multi-range).
    pub force_single_range: bool,
    /// How long an endpoint that failed a blob read (connection errors,
    /// 5xx, broken answers, after the retries) is set aside: reads go to
    /// the next endpoint (a mirror's successor, finally the origin) and
    /// come back to it once this has passed.
    pub endpoint_backoff: Duration,
    /// Proxies for registry connections: by default `HTTPS_PROXY`,
    /// `HTTP_PROXY` and `NO_PROXY` of the environment, as containerd
    /// reads them (see [`crate::proxy`]).
    pub proxies: Proxies,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            max_connections_per_host: 8,
            request_timeout: Duration::from_secs(30),
            retries: 5,
            min_backoff: Duration::from_millis(30),
            max_backoff: Duration::from_secs(10),
            max_ranges_per_request: 64,
            force_single_range: false,
            endpoint_backoff: Duration::from_secs(30),
            proxies: Proxies::from_env(),
        }
    }
}

/// Counters per registry host.
#[derive(Debug, Default)]
pub struct HostStats {
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
    pub errors: AtomicU64,
    pub retries: AtomicU64,
    /// Responses that came over HTTP/2.
    pub http2: AtomicU64,
    /// Times blob reads left this host for the next endpoint.
    pub failovers: AtomicU64,
    /// Sum of request latencies (time to response headers), microseconds.
    pub latency_us: AtomicU64,
    /// Requests per latency bucket (upper bounds in [`LATENCY_BUCKETS`], seconds).
    pub latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
}

/// Upper bounds (seconds) of the request latency histogram.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl HostStats {
    fn observe(&self, d: Duration) {
        self.latency_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        let secs = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
            self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[derive(Hash, PartialEq, Eq, Clone)]
struct TlsKey {
    skip_verify: bool,
    ca: Vec<std::path::PathBuf>,
    client: Vec<(std::path::PathBuf, Option<std::path::PathBuf>)>,
}

pub(crate) struct Inner {
    pub(crate) opts: ClientOptions,
    pub(crate) hosts: Hosts,
    keychain: Keychain,
    tokens: TokenCache,
    pools: Mutex<HashMap<TlsKey, Http>>,
    limits: Mutex<HashMap<String, Arc<Semaphore>>>,
    pub(crate) single_range: Mutex<HashSet<String>>,
    /// Endpoints (by origin) set aside after a failure, until when.
    resting: Mutex<HashMap<String, Instant>>,
    stats: Mutex<HashMap<String, Arc<HostStats>>>,
    proxies: Arc<Proxies>,
}

/// A registry client; cheap to clone.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

/// A response with the host's connection slot held until it is dropped.
pub(crate) struct Resp {
    pub resp: Response<Incoming>,
    _permit: OwnedSemaphorePermit,
    pub stats: Arc<HostStats>,
}

/// Accepts any certificate: for hosts configured `skip_verify` / `insecure`.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn build_pool(key: &TlsKey, proxies: &Arc<Proxies>) -> Result<Http, RegistryError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| RegistryError::Config(format!("TLS: {e}")))?;
    let builder = if key.skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
    } else {
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(system_roots());
        for path in &key.ca {
            for cert in pem_certificates(path, "CA file")? {
                roots.add(cert).map_err(|e| {
                    RegistryError::Config(format!("CA file {}: {e}", path.display()))
                })?;
            }
        }
        builder.with_root_certificates(roots)
    };
    // One client certificate per connection: the first pair listed (a
    // registry that asks for one names no choice rustls could use to pick
    // among several; containerd's Go client offers the first too).
    let config = match key.client.first() {
        None => builder.with_no_client_auth(),
        Some((cert, key_file)) => {
            let chain = pem_certificates(cert, "client certificate")?;
            let key_path = key_file.as_ref().unwrap_or(cert);
            let private = PrivateKeyDer::from_pem_file(key_path).map_err(|e| {
                RegistryError::Config(format!(
                    "client key {}: {e} (hosts.toml `client` names the certificate and its key)",
                    key_path.display()
                ))
            })?;
            builder.with_client_auth_cert(chain, private).map_err(|e| {
                RegistryError::Config(format!(
                    "client certificate {} with key {}: {e}",
                    cert.display(),
                    key_path.display()
                ))
            })?
        }
    };
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(ProxyConnector::new(proxies.clone()));
    Ok(HyperClient::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(https))
}

/// Every certificate of a PEM file; `what` names the file in errors.
fn pem_certificates(
    path: &std::path::Path,
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, RegistryError> {
    let bad = |e: &dyn std::fmt::Display| {
        RegistryError::Config(format!("{what} {}: {e}", path.display()))
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&e))?;
    if certs.is_empty() {
        return Err(bad(&"no PEM certificate in it"));
    }
    Ok(certs)
}

/// The system's trusted roots as `rustls-native-certs` finds them: the
/// `SSL_CERT_FILE` / `SSL_CERT_DIR` the environment names, else the
/// distribution's bundle. Unreadable entries are logged and skipped, as
/// containerd skips them.
fn system_roots() -> Vec<CertificateDer<'static>> {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!(error = %e, "a system CA certificate could not be loaded");
    }
    found.certs
}

/// An error with its causes ("connect: tls: invalid certificate ...").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The longest `Retry-After` waited for before a retry.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// `Retry-After` in seconds (the form registries send; an HTTP date is
/// not honoured and the usual backoff applies).
fn parse_retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let v = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The access a request needs, as a token scope: `repository:NAME:ACTIONS`
/// items separated by spaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Scope(String);

impl Scope {
    pub(crate) fn pull(r: &Reference) -> Scope {
        Scope(format!("repository:{}:pull", r.repository))
    }

    pub(crate) fn push(r: &Reference) -> Scope {
        Scope(format!("repository:{}:pull,push", r.repository))
    }

    /// Push to `r` and pull from `from` (a cross-repository mount).
    pub(crate) fn push_and_pull(r: &Reference, from: &str) -> Scope {
        if from == r.repository {
            return Scope::push(r);
        }
        Scope(format!(
            "repository:{}:pull,push repository:{from}:pull",
            r.repository
        ))
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Percent-encode a query value (RFC 3986 unreserved characters stay).
pub(crate) fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// How long a Basic header or a registry token is kept when nothing
/// shorter (a lease) bounds it.
const LONG_LIVED: Duration = Duration::from_secs(24 * 3600);

/// The cache key of the Basic header for requests of `scope`.
fn basic_key(scope: &str) -> String {
    format!("basic {scope}")
}

/// What to do when the registry wants credentials it did not get or
/// refused: says where credentials were looked for (never what they are).
fn missing_credentials(reference: &Reference, lease: Option<&Lease>) -> String {
    match lease {
        Some(l) => format!(
            "the credentials from the {} for {}/{} were refused; check them",
            l.source, reference.host, reference.repository
        ),
        None => format!(
            "no credentials for {}/{}: log in with the docker config (`docker login {}`), or pull through the CRI keychain with a pull secret (expired ones are forgotten)",
            reference.host, reference.repository, reference.host
        ),
    }
}

/// True the first time `what` is seen in this process: the proxies in
/// use and each registry reached through one are logged once, however
/// many clients a process makes (the CLI makes one per image location).
fn log_once(what: String) -> bool {
    static SEEN: std::sync::LazyLock<Mutex<HashSet<String>>> =
        std::sync::LazyLock::new(Default::default);
    SEEN.lock().insert(what)
}

/// Did a proxy refuse the connection (so that retrying is pointless)?
fn refused_by_proxy(e: &Option<hyper_util::client::legacy::Error>) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> =
        e.as_ref().map(|e| e as &(dyn std::error::Error + 'static));
    while let Some(c) = cur {
        if let Some(f) = c.downcast_ref::<crate::proxy::ProxyFailed>() {
            return f.refused;
        }
        cur = c.source();
    }
    false
}

/// What to do when a proxy wants credentials.
fn proxy_auth_advice(p: &crate::Proxy) -> String {
    if p.auth().is_some() {
        format!(
            "the proxy refused the credentials in {}; check them",
            p.var()
        )
    } else {
        format!(
            "the proxy wants credentials (HTTP 407): put them in {} as http://USER:PASSWORD@HOST:PORT",
            p.var()
        )
    }
}

/// Should a failure be retried?
pub(crate) fn retryable(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS
        || (status.is_server_error() && status != StatusCode::NOT_IMPLEMENTED)
}

impl Client {
    /// A client whose credentials come from its [`Keychain`]: remembered
    /// ones first (see [`Client::keychain`]), then `creds`.
    pub fn new(hosts: Hosts, creds: DockerConfig, opts: ClientOptions) -> Client {
        let proxies = Arc::new(opts.proxies.clone());
        if !proxies.is_empty() && log_once(format!("proxies {}", proxies.describe())) {
            tracing::info!(proxies = %proxies.describe(), "registry requests go through proxies (HTTPS_PROXY / HTTP_PROXY / NO_PROXY)");
        }
        Client {
            inner: Arc::new(Inner {
                opts,
                hosts,
                keychain: Keychain::new(creds),
                tokens: TokenCache::default(),
                pools: Mutex::new(HashMap::new()),
                limits: Mutex::new(HashMap::new()),
                single_range: Mutex::new(HashSet::new()),
                resting: Mutex::new(HashMap::new()),
                stats: Mutex::new(HashMap::new()),
                proxies,
            }),
        }
    }

    /// Where the client looks credentials up; the fetcher files the CRI
    /// keychain's credentials in its [`Keychain::remembered`].
    pub fn keychain(&self) -> &Keychain {
        &self.inner.keychain
    }

    /// Forget the CRI keychain's credential for `repository` on `host`
    /// and every token or Basic header cached for the repository, so that
    /// nothing made from it is sent again. Whether there was a credential.
    pub fn forget_credentials(&self, host: &str, repository: &str) -> bool {
        let had = self.inner.keychain.remembered().forget(host, repository);
        self.inner.tokens.forget_repository(repository);
        had
    }

    pub fn options(&self) -> &ClientOptions {
        &self.inner.opts
    }

    pub fn endpoints(&self, r: &Reference) -> Result<Vec<Endpoint>, RegistryError> {
        self.usable(self.inner.hosts.endpoints(r)?)
    }

    /// `endpoints`, each with TLS settings that can be used: a CA or client
    /// certificate file that is missing or unreadable is the operator's to
    /// fix, so its error is the answer (as containerd fails loading such a
    /// hosts.toml) rather than the error of the next endpoint tried.
    pub(crate) fn usable(&self, endpoints: Vec<Endpoint>) -> Result<Vec<Endpoint>, RegistryError> {
        for ep in endpoints.iter().filter(|e| e.is_https()) {
            self.pool(ep)?;
        }
        Ok(endpoints)
    }

    /// Counters of every host contacted so far.
    pub fn stats(&self) -> Vec<(String, Arc<HostStats>)> {
        let s = self.inner.stats.lock();
        let mut v: Vec<_> = s.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Until when `ep` is set aside, if it is.
    pub(crate) fn resting_until(&self, ep: &Endpoint) -> Option<Instant> {
        let mut resting = self.inner.resting.lock();
        match resting.get(&ep.origin) {
            Some(t) if *t > Instant::now() => Some(*t),
            Some(_) => {
                resting.remove(&ep.origin);
                None
            }
            None => None,
        }
    }

    /// Set `ep` aside for [`ClientOptions::endpoint_backoff`] after `error`.
    pub(crate) fn set_aside(&self, ep: &Endpoint, error: &RegistryError) {
        let until = Instant::now() + self.inner.opts.endpoint_backoff;
        self.inner.resting.lock().insert(ep.origin.clone(), until);
        self.host_stats(ep.host())
            .failovers
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            endpoint = %ep.origin,
            %error,
            backoff = ?self.inner.opts.endpoint_backoff,
            "registry endpoint failed: reading from the next endpoint, and from this one again after the back-off"
        );
    }

    fn host_stats(&self, host: &str) -> Arc<HostStats> {
        self.inner
            .stats
            .lock()
            .entry(host.to_string())
            .or_default()
            .clone()
    }

    fn pool(&self, ep: &Endpoint) -> Result<Http, RegistryError> {
        let key = TlsKey {
            skip_verify: ep.skip_verify,
            ca: ep.ca.clone(),
            client: ep.client.clone(),
        };
        let mut pools = self.inner.pools.lock();
        if let Some(p) = pools.get(&key) {
            return Ok(p.clone());
        }
        let p = build_pool(&key, &self.inner.proxies)?;
        pools.insert(key, p.clone());
        Ok(p)
    }

    async fn permit(&self, host: &str) -> OwnedSemaphorePermit {
        let sem = self
            .inner
            .limits
            .lock()
            .entry(host.to_string())
            .or_insert_with(|| {
                Arc::new(Semaphore::new(
                    self.inner.opts.max_connections_per_host.max(1),
                ))
            })
            .clone();
        sem.acquire_owned()
            .await
            .expect("semaphores are never closed")
    }

    fn backoff(&self, attempt: u32) -> Duration {
        // Exponential with full jitter.
        let cap = self
            .inner
            .opts
            .min_backoff
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.inner.opts.max_backoff);
        cap.mul_f64(fastrand::f64())
    }

    /// Send a request to `url` on endpoint `ep` for `reference`,
    /// authenticating when challenged and retrying transient failures.
    /// `authenticate = false` for pre-signed redirect URLs.
    pub(crate) async fn send(
        &self,
        ep: &Endpoint,
        reference: &Reference,
        method: Method,
        url: &str,
        headers: &HeaderMap,
        authenticate: bool,
    ) -> Result<Resp, RegistryError> {
        let scope = Scope::pull(reference);
        self.send_body(
            ep,
            reference,
            method,
            url,
            headers,
            Bytes::new(),
            &scope,
            authenticate,
        )
        .await
    }

    /// [`Client::send`] with a request body (resent whole on a retry) and
    /// the access the request needs (`pull`, `pull,push`, or a push plus a
    /// pull of a cross-mount's source repository).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn send_body(
        &self,
        ep: &Endpoint,
        reference: &Reference,
        method: Method,
        url: &str,
        headers: &HeaderMap,
        body: Bytes,
        scope: &Scope,
        authenticate: bool,
    ) -> Result<Resp, RegistryError> {
        let scope = scope.to_string();
        let host = url
            .split_once("://")
            .map(|(_, r)| r.split('/').next().unwrap_or(r))
            .unwrap_or(url)
            .to_string();
        let stats = self.host_stats(&host);
        let pool = self.pool(ep)?;
        let via = match self.inner.proxies.for_url(url) {
            None => None,
            Some(Ok(p)) => Some(p.clone()),
            Some(Err(e)) => {
                return Err(RegistryError::Config(format!(
                    "{e} (needed for {url}; or list the host in NO_PROXY)"
                )));
            }
        };
        if let Some(p) = &via
            && log_once(format!("via {host} {}", p.url()))
        {
            tracing::info!(registry = %host, proxy = %p.url(), from = p.var(), "registry reached through a proxy");
        }
        let proxy_error = |p: &crate::Proxy, reason: String| RegistryError::Proxy {
            url: url.to_string(),
            proxy: p.url(),
            var: p.var().to_string(),
            reason,
        };
        let timeout = ep.timeout.unwrap_or(self.inner.opts.request_timeout);
        let mut reauthenticated = false;
        let mut attempt = 0u32;
        loop {
            let permit = self.permit(&host).await;
            let mut req = Request::builder().method(method.clone()).uri(url);
            for (k, v) in headers {
                req = req.header(k, v);
            }
            // Plain HTTP through a proxy: the proxy reads each request.
            if let Some(p) = &via
                && url.starts_with("http://")
                && let Some(a) = p.auth()
            {
                req = req.header(http::header::PROXY_AUTHORIZATION, a.clone());
            }
            if authenticate {
                for (k, v) in &ep.headers {
                    req = req.header(k.as_str(), v.as_str());
                }
                if let Some(a) = self.auth_header(&host, &scope) {
                    req = req.header(http::header::AUTHORIZATION, a);
                }
            }
            let req = req
                .body(Full::new(body.clone()))
                .map_err(|e| RegistryError::Request {
                    url: url.to_string(),
                    reason: e.to_string(),
                })?;
            stats.requests.fetch_add(1, Ordering::Relaxed);
            let t0 = Instant::now();
            let outcome = tokio::time::timeout(timeout, pool.request(req)).await;
            stats.observe(t0.elapsed());
            // A registry that says when to come back is believed (up to
            // a bound): retrying sooner only earns another 429.
            let mut retry_after = None;
            let mut outcome_error = None;
            let failure = match outcome {
                Ok(Ok(resp)) => {
                    if resp.version() == http::Version::HTTP_2 {
                        stats.http2.fetch_add(1, Ordering::Relaxed);
                    }
                    let status = resp.status();
                    if status == StatusCode::PROXY_AUTHENTICATION_REQUIRED
                        && let Some(p) = &via
                    {
                        stats.errors.fetch_add(1, Ordering::Relaxed);
                        return Err(proxy_error(p, proxy_auth_advice(p)));
                    }
                    if status == StatusCode::UNAUTHORIZED && authenticate && !reauthenticated {
                        reauthenticated = true;
                        let challenge = resp
                            .headers()
                            .get(http::header::WWW_AUTHENTICATE)
                            .and_then(|v| v.to_str().ok())
                            .and_then(parse_challenge);
                        drop(resp);
                        drop(permit);
                        let authenticated = self
                            .authenticate(ep, &host, &scope, challenge, reference)
                            .await;
                        match (authenticated, &via) {
                            (Ok(()), _) => {}
                            // Some proxies (tinyproxy) answer refused proxy
                            // credentials with a 401 of their own.
                            (Err(RegistryError::Unauthorized { host, reason }), Some(p)) => {
                                return Err(RegistryError::Unauthorized {
                                    host,
                                    reason: format!(
                                        "{reason} (the request went through proxy {} from {}, which may be the one refusing: {})",
                                        p.url(),
                                        p.var(),
                                        proxy_auth_advice(p)
                                    ),
                                });
                            }
                            (Err(e), _) => return Err(e),
                        }
                        continue;
                    }
                    if retryable(status) && attempt < self.inner.opts.retries {
                        retry_after = parse_retry_after(resp.headers());
                        format!("HTTP {status}")
                    } else {
                        if !status.is_success() && status != StatusCode::PARTIAL_CONTENT {
                            stats.errors.fetch_add(1, Ordering::Relaxed);
                        }
                        return Ok(Resp {
                            resp,
                            _permit: permit,
                            stats,
                        });
                    }
                }
                Ok(Err(e)) => {
                    let f = error_chain(&e);
                    outcome_error = Some(e);
                    f
                }
                Err(_) => format!("no answer within {timeout:?}"),
            };
            drop(permit);
            stats.errors.fetch_add(1, Ordering::Relaxed);
            // A certificate the client does not trust will not become trusted
            // by trying again, nor will a proxy let through what it refused.
            let proxy_refused = refused_by_proxy(&outcome_error);
            let permanent = failure.contains("certificate") || proxy_refused;
            if let Some(p) = &via
                && (attempt >= self.inner.opts.retries || permanent)
            {
                let advice = if proxy_refused && failure.contains("credentials") {
                    format!("; {}", proxy_auth_advice(p))
                } else {
                    String::new()
                };
                return Err(proxy_error(
                    p,
                    format!("{failure}{advice} (after {} attempts)", attempt + 1),
                ));
            }
            if attempt >= self.inner.opts.retries || permanent {
                return Err(RegistryError::Request {
                    url: url.to_string(),
                    reason: format!("{failure} (after {} attempts)", attempt + 1),
                });
            }
            stats.retries.fetch_add(1, Ordering::Relaxed);
            let wait = self
                .backoff(attempt)
                .max(retry_after.unwrap_or_default().min(MAX_RETRY_AFTER));
            tracing::debug!(%url, %failure, ?wait, "retrying registry request");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    fn auth_header(&self, host: &str, scope: &str) -> Option<String> {
        if let Some(t) = self.inner.tokens.get(host, scope) {
            return Some(format!("Bearer {t}"));
        }
        // Basic credentials are sent once a Basic challenge was seen.
        self.inner.tokens.get(host, &basic_key(scope))
    }

    async fn authenticate(
        &self,
        ep: &Endpoint,
        host: &str,
        scope: &str,
        challenge: Option<Challenge>,
        reference: &Reference,
    ) -> Result<(), RegistryError> {
        let keychain = &self.inner.keychain;
        // The mirror's own credentials only when the image's host has none
        // (a lookup may run a docker credential helper).
        let mut lease = keychain.lookup(&reference.host, &reference.repository)?;
        if lease.is_none() && reference.host != host {
            lease = keychain.lookup(host, &reference.repository)?;
        }
        let until = lease.as_ref().and_then(|l| l.until);
        let cred = lease.as_ref().map(|l| &l.credential);
        // A registry token is the answer to any challenge: it is what the
        // token service would have handed out.
        if let (Some(Credential::RegistryToken(token)), Some(_)) = (cred, &challenge) {
            self.inner
                .tokens
                .put_leased(host, scope, token.clone(), LONG_LIVED, until);
            return Ok(());
        }
        match challenge {
            Some(Challenge::Basic) => {
                let Some(Credential::Basic { username, password }) = cred else {
                    return Err(RegistryError::Unauthorized {
                        host: host.to_string(),
                        reason: missing_credentials(reference, lease.as_ref()),
                    });
                };
                // Per scope (so per repository): the CRI keychain's
                // credentials are for one repository, and the header
                // expires with them.
                self.inner.tokens.put_leased(
                    host,
                    &basic_key(scope),
                    basic_header(username, password),
                    LONG_LIVED,
                    until,
                );
                Ok(())
            }
            Some(Challenge::Bearer {
                realm,
                service,
                scope: challenge_scope,
            }) => {
                // What the request needs and what the registry asked for,
                // one `scope=` parameter each, as the token spec has it.
                let mut scopes: Vec<&str> = scope.split(' ').collect();
                for s in challenge_scope.iter().flat_map(|s| s.split(' ')) {
                    if !s.is_empty() && !scopes.contains(&s) {
                        scopes.push(s);
                    }
                }
                let mut query: Vec<String> = scopes
                    .iter()
                    .map(|s| format!("scope={}", query_escape(s)))
                    .collect();
                if let Some(s) = service {
                    query.push(format!("service={}", query_escape(&s)));
                }
                let sep = if realm.contains('?') { '&' } else { '?' };
                let url = format!("{realm}{sep}{}", query.join("&"));
                let mut headers = HeaderMap::new();
                if let Some(Credential::Basic { username, password }) = cred
                    && let Ok(v) = HeaderValue::from_str(&basic_header(username, password))
                {
                    headers.insert(http::header::AUTHORIZATION, v);
                }
                let token_ep = Endpoint {
                    origin: url.split('/').take(3).collect::<Vec<_>>().join("/"),
                    headers: Vec::new(),
                    ..ep.clone()
                };
                let resp = if let Some(Credential::IdentityToken(refresh)) = cred {
                    // An identity token is an OAuth2 refresh token: POSTed
                    // as a form to the realm, as docker and containerd do.
                    query.push("grant_type=refresh_token".into());
                    query.push(format!("refresh_token={}", query_escape(refresh)));
                    query.push("client_id=stargaze".into());
                    headers.insert(
                        http::header::CONTENT_TYPE,
                        HeaderValue::from_static("application/x-www-form-urlencoded"),
                    );
                    Box::pin(self.send_body(
                        &token_ep,
                        reference,
                        Method::POST,
                        &realm,
                        &headers,
                        Bytes::from(query.join("&")),
                        &Scope::pull(reference),
                        false,
                    ))
                    .await?
                } else {
                    Box::pin(self.send(&token_ep, reference, Method::GET, &url, &headers, false))
                        .await?
                };
                let status = resp.resp.status();
                let body = resp
                    .resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| RegistryError::Request {
                        url: realm.clone(),
                        reason: e.to_string(),
                    })?
                    .to_bytes();
                if !status.is_success() {
                    return Err(RegistryError::Unauthorized {
                        host: host.to_string(),
                        reason: format!(
                            "token service {realm} answered HTTP {status} for {}; {}",
                            reference.repository,
                            missing_credentials(reference, lease.as_ref())
                        ),
                    });
                }
                let v: serde_json::Value =
                    serde_json::from_slice(&body).map_err(|e| RegistryError::Unauthorized {
                        host: host.to_string(),
                        reason: format!("token service {realm} sent no JSON: {e}"),
                    })?;
                let token = v["token"]
                    .as_str()
                    .or(v["access_token"].as_str())
                    .ok_or_else(|| RegistryError::Unauthorized {
                        host: host.to_string(),
                        reason: format!("token service {realm} sent no token"),
                    })?;
                let lifetime = Duration::from_secs(v["expires_in"].as_u64().unwrap_or(60).max(10));
                self.inner
                    .tokens
                    .put_leased(host, scope, token.to_string(), lifetime, until);
                Ok(())
            }
            None => Err(RegistryError::Unauthorized {
                host: host.to_string(),
                reason: "HTTP 401 without a usable WWW-Authenticate challenge".into(),
            }),
        }
    }

    /// GET a small document (manifest, config) and return its bytes.
    pub(crate) async fn get_small(
        &self,
        ep: &Endpoint,
        r: &Reference,
        url: &str,
        accept: &str,
        limit: usize,
    ) -> Result<(StatusCode, HeaderMap, Bytes), RegistryError> {
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(accept) {
            headers.insert(http::header::ACCEPT, v);
        }
        let resp = self.send(ep, r, Method::GET, url, &headers, true).await?;
        let status = resp.resp.status();
        let hdrs = resp.resp.headers().clone();
        let body = http_body_util::Limited::new(resp.resp.into_body(), limit)
            .collect()
            .await
            .map_err(|e| RegistryError::Request {
                url: url.to_string(),
                reason: format!("reading the body: {e}"),
            })?
            .to_bytes();
        resp.stats
            .bytes
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        Ok((status, hdrs, body))
    }
}
