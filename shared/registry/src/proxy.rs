//! HTTP proxies from the environment, honoured the way containerd honours
//! them (Go's `http.ProxyFromEnvironment`, golang.org/x/net/http/httpproxy):
//!
//! * `HTTPS_PROXY` / `https_proxy` for `https://` registries: the TLS
//!   connection goes through an HTTP `CONNECT` tunnel to the proxy;
//!   `HTTP_PROXY` / `http_proxy` for plain-HTTP registries: requests go to
//!   the proxy in absolute form. The upper-case name wins; an empty value
//!   counts as unset. `ALL_PROXY` is not read (Go does not read it).
//! * A proxy URL without a scheme is `http://`; its port defaults to 80.
//!   Credentials in it (`http://user:pass@proxy:3128`, percent-encoded)
//!   are sent as `Proxy-Authorization: Basic`. `https://` (TLS to the
//!   proxy) and SOCKS proxies are refused with an error naming the
//!   variable, rather than bypassed silently.
//! * `NO_PROXY` / `no_proxy`: comma-separated; `*` bypasses every host;
//!   an IP address or CIDR range bypasses those addresses; `name` bypasses
//!   the name and its subdomains, `.name` and `*.name` the subdomains only;
//!   any of these but CIDRs may carry `:port` to bypass that port only.
//! * `localhost` and loopback addresses (127.0.0.0/8, ::1) never go
//!   through a proxy.
//!
//! hyper-util's `client::proxy::matcher::Matcher` follows curl instead
//! (`ALL_PROXY` read, no `host:port` entries, no loopback exception, an
//! empty upper-case variable hides the lower-case one), so the rules are
//! written here. So is the `CONNECT` handshake: hyper-util's `Tunnel`
//! reports every refusal as "tunnel error: unsuccessful", and an operator
//! needs the proxy's status (403 for a port it does not allow, 401/407 for
//! credentials).

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use base64::Engine as _;
use http::{HeaderValue, Uri};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A proxy to send requests through.
#[derive(Clone)]
pub struct Proxy {
    /// `http://host:port/`: where connections go (no credentials).
    uri: Uri,
    /// The variable it came from, for messages.
    var: &'static str,
    /// `Basic …` from the URL's credentials.
    auth: Option<HeaderValue>,
}

impl Proxy {
    /// `http://host:port`, never with credentials: for logs and errors.
    pub fn url(&self) -> String {
        let a = self.uri.authority().map(|a| a.as_str()).unwrap_or("");
        format!("http://{a}")
    }

    /// The environment variable it was read from.
    pub fn var(&self) -> &'static str {
        self.var
    }

    /// The `Proxy-Authorization` value, when the URL had credentials.
    pub(crate) fn auth(&self) -> Option<&HeaderValue> {
        self.auth.as_ref()
    }
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (from {}", self.url(), self.var)?;
        if self.auth.is_some() {
            f.write_str(", with credentials")?;
        }
        f.write_str(")")
    }
}

/// The proxies of the environment and the hosts that bypass them.
#[derive(Clone, Debug, Default)]
pub struct Proxies {
    http: Option<Result<Proxy, String>>,
    https: Option<Result<Proxy, String>>,
    no: NoProxy,
}

impl Proxies {
    /// No proxy at all.
    pub fn none() -> Proxies {
        Proxies::default()
    }

    /// From `HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY` (upper case first,
    /// then lower case; empty values count as unset).
    pub fn from_env() -> Proxies {
        let get = |names: [&'static str; 2]| {
            names.into_iter().find_map(|n| {
                std::env::var(n)
                    .ok()
                    .filter(|v| !v.trim().is_empty())
                    .map(|v| (n, v))
            })
        };
        let http = get(["HTTP_PROXY", "http_proxy"]);
        let https = get(["HTTPS_PROXY", "https_proxy"]);
        let no = get(["NO_PROXY", "no_proxy"]);
        Proxies {
            http: http.map(|(n, v)| parse_proxy(&v, n)),
            https: https.map(|(n, v)| parse_proxy(&v, n)),
            no: NoProxy::parse(no.map(|(_, v)| v).as_deref().unwrap_or("")),
        }
    }

    /// From explicit values, as if they were `HTTP_PROXY`, `HTTPS_PROXY`
    /// and `NO_PROXY` (empty = unset).
    pub fn from_values(http: &str, https: &str, no_proxy: &str) -> Proxies {
        let one = |v: &str, var| (!v.trim().is_empty()).then(|| parse_proxy(v, var));
        Proxies {
            http: one(http, "HTTP_PROXY"),
            https: one(https, "HTTPS_PROXY"),
            no: NoProxy::parse(no_proxy),
        }
    }

    /// Is any proxy configured?
    pub fn is_empty(&self) -> bool {
        self.http.is_none() && self.https.is_none()
    }

    /// One line for the log: the proxies (without credentials) and the
    /// `NO_PROXY` rules.
    pub fn describe(&self) -> String {
        let one = |p: &Option<Result<Proxy, String>>| match p {
            None => "none".to_string(),
            Some(Ok(p)) => format!("{p:?}"),
            Some(Err(e)) => format!("unusable: {e}"),
        };
        format!(
            "https: {}, http: {}, bypassed: {}",
            one(&self.https),
            one(&self.http),
            self.no.describe()
        )
    }

    /// The proxy for `uri`, if it goes through one: `Err` when the
    /// variable that applies holds no usable proxy URL.
    pub fn for_uri(&self, uri: &Uri) -> Option<Result<&Proxy, &str>> {
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return None,
        };
        let proxy = if https { &self.https } else { &self.http };
        let proxy = proxy.as_ref()?;
        let host = uri.host()?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
            .to_ascii_lowercase();
        let host = host.strip_suffix('.').unwrap_or(&host);
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        if self.no.bypasses(host, port) {
            return None;
        }
        Some(proxy.as_ref().map_err(|e| e.as_str()))
    }

    /// [`Proxies::for_uri`] of a URL string (`None` if it does not parse).
    pub fn for_url(&self, url: &str) -> Option<Result<&Proxy, &str>> {
        self.for_uri(&url.parse::<Uri>().ok()?)
    }
}

/// Parse a proxy variable's value the way Go does: no scheme = `http://`,
/// no port = 80; credentials become a Basic `Proxy-Authorization`.
fn parse_proxy(value: &str, var: &'static str) -> Result<Proxy, String> {
    let v = value.trim();
    let (scheme, rest) = match v.split_once("://") {
        Some((s, r)) => (s.to_ascii_lowercase(), r),
        None => ("http".to_string(), v),
    };
    if scheme != "http" {
        return Err(format!(
            "{var} names a {scheme}:// proxy; only http:// proxies are supported (HTTPS registries are still reached through them with CONNECT)"
        ));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    if hostport.is_empty() {
        return Err(format!("{var} has no proxy host"));
    }
    let has_port = match hostport.rsplit_once(':') {
        Some((h, p)) => !h.ends_with(':') && !p.contains(']') && !p.is_empty(),
        None => false,
    };
    let hostport = if has_port {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    let uri: Uri = format!("http://{hostport}/")
        .parse()
        .map_err(|e| format!("{var} is not a proxy URL (host and port {hostport:?}): {e}"))?;
    if uri.port_u16().is_none() {
        return Err(format!("{var} has no usable port in {hostport:?}"));
    }
    let auth = match userinfo {
        None => None,
        Some(u) => {
            let (user, pass) = u.split_once(':').unwrap_or((u, ""));
            let plain = format!("{}:{}", percent_decode(user), percent_decode(pass));
            let encoded = base64::engine::general_purpose::STANDARD.encode(plain);
            let mut h = HeaderValue::from_str(&format!("Basic {encoded}"))
                .map_err(|e| format!("{var}: credentials: {e}"))?;
            h.set_sensitive(true);
            Some(h)
        }
    };
    Ok(Proxy { uri, var, auth })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `NO_PROXY`, as Go's httpproxy reads it.
#[derive(Clone, Debug, Default)]
struct NoProxy {
    all: bool,
    rules: Vec<Rule>,
}

#[derive(Clone, Debug)]
enum Rule {
    Cidr(IpAddr, u8),
    Ip(IpAddr, Option<u16>),
    /// `suffix` starts with a dot; `exact`: the name itself matches too.
    Domain {
        suffix: String,
        exact: bool,
        port: Option<u16>,
    },
}

impl NoProxy {
    fn parse(list: &str) -> NoProxy {
        let mut no = NoProxy::default();
        for entry in list.split(',') {
            let p = entry.trim().to_ascii_lowercase();
            if p.is_empty() {
                continue;
            }
            if p == "*" {
                no.all = true;
                continue;
            }
            if let Some((ip, len)) = p.split_once('/')
                && let (Ok(ip), Ok(len)) = (ip.parse::<IpAddr>(), len.parse::<u8>())
                && len <= if ip.is_ipv4() { 32 } else { 128 }
            {
                no.rules.push(Rule::Cidr(ip, len));
                continue;
            }
            let (host, port) = match split_host_port(&p) {
                Some((h, port)) => match port.parse::<u16>() {
                    Ok(port) => (h.to_string(), Some(port)),
                    // A port that is no number matches nothing.
                    Err(_) => continue,
                },
                None => (p.clone(), None),
            };
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(&host)
                .to_string();
            if host.is_empty() {
                continue;
            }
            if let Ok(ip) = host.parse::<IpAddr>() {
                no.rules.push(Rule::Ip(ip, port));
                continue;
            }
            let host = host.strip_prefix('*').unwrap_or(&host);
            let (suffix, exact) = match host.strip_prefix('.') {
                Some(_) => (host.to_string(), false),
                None => (format!(".{host}"), true),
            };
            if suffix.len() > 1 {
                no.rules.push(Rule::Domain {
                    suffix,
                    exact,
                    port,
                });
            }
        }
        no
    }

    /// Does `host` (lower case, no brackets) on `port` bypass the proxy?
    fn bypasses(&self, host: &str, port: u16) -> bool {
        if host == "localhost" {
            return true;
        }
        let ip = host.parse::<IpAddr>().ok().map(|ip| ip.to_canonical());
        if ip.is_some_and(|ip| ip.is_loopback()) || self.all {
            return true;
        }
        let port_ok = |p: &Option<u16>| p.is_none_or(|p| p == port);
        self.rules.iter().any(|r| match r {
            Rule::Cidr(net, len) => ip.is_some_and(|ip| in_net(ip, *net, *len)),
            Rule::Ip(a, p) => ip == Some(a.to_canonical()) && port_ok(p),
            Rule::Domain {
                suffix,
                exact,
                port,
            } => {
                ip.is_none()
                    && (host.ends_with(suffix.as_str()) || (*exact && host == &suffix[1..]))
                    && port_ok(port)
            }
        })
    }

    fn describe(&self) -> String {
        if self.all {
            return "every host".into();
        }
        let mut v: Vec<String> = vec!["localhost".into(), "loopback".into()];
        v.extend(self.rules.iter().map(|r| match r {
            Rule::Cidr(ip, len) => format!("{ip}/{len}"),
            Rule::Ip(ip, None) => ip.to_string(),
            Rule::Ip(ip, Some(p)) => format!("{ip} port {p}"),
            Rule::Domain {
                suffix,
                exact,
                port,
            } => {
                let name = if *exact {
                    suffix[1..].to_string()
                } else {
                    format!("*{suffix}")
                };
                match port {
                    Some(p) => format!("{name} port {p}"),
                    None => name,
                }
            }
        }));
        v.join(", ")
    }
}

/// Go's `net.SplitHostPort` for the forms NO_PROXY uses: `host:port`,
/// `[v6]:port`; `None` when there is no port (bare names and IPv6).
fn split_host_port(s: &str) -> Option<(&str, &str)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        return after.strip_prefix(':').map(|p| (h, p));
    }
    let (h, p) = s.split_once(':')?;
    (!p.contains(':')).then_some((h, p))
}

fn in_net(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net.to_canonical()) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// A connection failure on the way to or through a proxy: names the
/// proxy and the variable it came from.
#[derive(Debug, thiserror::Error)]
#[error("proxy {proxy} (from {var}): {what}")]
pub(crate) struct ProxyFailed {
    proxy: String,
    var: &'static str,
    what: String,
    /// The proxy said no (401, 403, 407 to CONNECT): trying again will
    /// not help.
    pub(crate) refused: bool,
    #[source]
    source: BoxError,
}

/// The connector under TLS: straight to the registry, or to the proxy
/// (`CONNECT` tunnel for https, absolute-form requests for http).
#[derive(Clone)]
pub(crate) struct ProxyConnector {
    direct: HttpConnector,
    proxies: Arc<Proxies>,
}

impl ProxyConnector {
    pub(crate) fn new(proxies: Arc<Proxies>) -> ProxyConnector {
        let mut direct = HttpConnector::new();
        // https URIs reach it too: TLS is layered on top by hyper-rustls.
        direct.enforce_http(false);
        ProxyConnector { direct, proxies }
    }
}

/// A TCP connection, to the registry or to a proxy.
pub(crate) struct ProxyStream {
    io: TokioIo<TcpStream>,
    /// Plain HTTP to a proxy: requests must be in absolute form.
    absolute_form: bool,
}

impl Service<Uri> for ProxyConnector {
    type Response = ProxyStream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<ProxyStream, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.direct.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let mut direct = self.direct.clone();
        let route = self
            .proxies
            .for_uri(&dst)
            .map(|r| r.cloned().map_err(str::to_string));
        match route {
            None => Box::pin(async move {
                let io = direct.call(dst).await?;
                Ok(ProxyStream {
                    io,
                    absolute_form: false,
                })
            }),
            Some(Err(e)) => Box::pin(async move { Err(e.into()) }),
            Some(Ok(p)) => {
                let (proxy, var) = (p.url(), p.var);
                let failed = move |what: String, source: BoxError, refused: bool| ProxyFailed {
                    proxy,
                    var,
                    what,
                    refused,
                    source,
                };
                let target = dst
                    .authority()
                    .map(|a| a.as_str().to_string())
                    .unwrap_or_default();
                if dst.scheme_str() == Some("https") {
                    let proxy_uri = p.uri.clone();
                    let auth = p.auth.clone();
                    let port = dst.port_u16().unwrap_or(443);
                    let host = dst.host().unwrap_or_default().to_string();
                    let refused_by = failed.clone();
                    Box::pin(async move {
                        let conn = direct.call(proxy_uri).await.map_err(|e| {
                            failed(format!("connecting to tunnel to {target}"), e.into(), false)
                        })?;
                        let io = connect_tunnel(conn, &host, port, auth.as_ref())
                            .await
                            .map_err(|(e, refused)| {
                                refused_by(format!("CONNECT {host}:{port}"), e, refused)
                            })?;
                        Ok(ProxyStream {
                            io,
                            absolute_form: false,
                        })
                    })
                } else {
                    let proxy_uri = p.uri.clone();
                    Box::pin(async move {
                        let io = direct.call(proxy_uri).await.map_err(|e| {
                            failed(
                                format!("connecting to send {target}'s requests"),
                                e.into(),
                                false,
                            )
                        })?;
                        Ok(ProxyStream {
                            io,
                            absolute_form: true,
                        })
                    })
                }
            }
        }
    }
}

/// Open a tunnel to `host:port` through the proxy connection `conn`:
/// `CONNECT`, then the proxy's answer up to the end of its headers. The
/// error says whether the proxy refused (401, 403, 407).
async fn connect_tunnel(
    mut conn: TokioIo<TcpStream>,
    host: &str,
    port: u16,
    auth: Option<&HeaderValue>,
) -> Result<TokioIo<TcpStream>, (BoxError, bool)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io_err = |e: std::io::Error| (Box::new(e) as BoxError, false);
    let mut req = format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n").into_bytes();
    if let Some(a) = auth {
        req.extend_from_slice(b"Proxy-Authorization: ");
        req.extend_from_slice(a.as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    let tcp = conn.inner_mut();
    tcp.write_all(&req).await.map_err(io_err)?;
    // Byte by byte: nothing after the headers may be consumed (it is
    // the start of the TLS handshake's answer).
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= 16 * 1024 {
            return Err((
                "the proxy's answer to CONNECT has over 16 KiB of headers".into(),
                false,
            ));
        }
        let mut b = [0u8; 1];
        if tcp.read(&mut b).await.map_err(io_err)? == 0 {
            return Err((
                "the proxy closed the connection before answering CONNECT".into(),
                false,
            ));
        }
        head.push(b[0]);
    }
    let text = String::from_utf8_lossy(&head);
    let status_line = text.lines().next().unwrap_or("").trim().to_string();
    let code = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok());
    match code {
        Some(200..=299) => Ok(conn),
        Some(c @ (401 | 403 | 407)) => {
            let what = if c == 403 {
                format!("the proxy refused: {status_line} (does it allow CONNECT to port {port}?)")
            } else {
                format!("the proxy wants credentials: {status_line}")
            };
            Err((what.into(), true))
        }
        _ => Err((format!("the proxy answered {status_line:?}").into(), false)),
    }
}

impl Connection for ProxyStream {
    fn connected(&self) -> Connected {
        self.io.connected().proxy(self.absolute_form)
    }
}

impl hyper::rt::Read for ProxyStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for ProxyStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn via(p: &Proxies, url: &str) -> Option<String> {
        p.for_url(url)
            .map(|r| r.map(|p| p.url()).unwrap_or_else(|e| e.into()))
    }

    #[test]
    fn schemes_pick_their_variable_and_loopback_is_never_proxied() {
        let p = Proxies::from_values("http-proxy:3128", "http://u:p%40ss@sproxy", "");
        assert_eq!(
            via(&p, "https://ghcr.io/v2/").as_deref(),
            Some("http://sproxy:80")
        );
        assert_eq!(
            via(&p, "http://reg.lan:5000/v2/").as_deref(),
            Some("http://http-proxy:3128")
        );
        for local in [
            "http://localhost:5000/v2/",
            "https://127.0.0.1/v2/",
            "https://127.8.9.10:443/",
            "http://[::1]:5000/v2/",
            "https://[::ffff:127.0.0.1]/",
        ] {
            assert_eq!(via(&p, local), None, "{local}");
        }
        let auth = p
            .for_url("https://ghcr.io/")
            .unwrap()
            .unwrap()
            .auth()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        // user "u", password "p@ss"
        assert_eq!(
            auth,
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("u:p@ss")
            )
        );
        assert!(!format!("{p:?} {}", p.describe()).contains("p@ss"));
        assert_eq!(via(&Proxies::none(), "https://ghcr.io/"), None);
    }

    #[test]
    fn no_proxy_rules_follow_go() {
        let p = Proxies::from_values(
            "proxy:3128",
            "proxy:3128",
            " corp.example, .internal ,*.svc.lan, 10.0.0.0/8, 192.168.1.7, reg.port:5000, [fd00::1]:443, fd00:1::/32",
        );
        let bypass = |url: &str| via(&p, url).is_none();
        // A name: itself and its subdomains, not look-alikes.
        assert!(bypass("https://corp.example/"));
        assert!(bypass("https://reg.CORP.example/"));
        assert!(!bypass("https://notcorp.example/"));
        // A leading dot or "*.": subdomains only.
        assert!(bypass("https://a.internal/"));
        assert!(!bypass("https://internal/"));
        assert!(bypass("https://x.svc.lan/"));
        assert!(!bypass("https://svc.lan/"));
        // Addresses and ranges.
        assert!(bypass("https://10.1.2.3:5000/"));
        assert!(!bypass("https://11.1.2.3/"));
        assert!(bypass("http://192.168.1.7:8080/"));
        assert!(!bypass("http://192.168.1.8/"));
        assert!(bypass("https://[fd00:1::9]/"));
        assert!(!bypass("https://[fd00:2::9]/"));
        // host:port: that port only (the scheme's default counts).
        assert!(bypass("http://reg.port:5000/"));
        assert!(!bypass("http://reg.port/"));
        assert!(bypass("https://[fd00::1]/"));
        assert!(!bypass("https://[fd00::1]:5000/"));
        // Names are not addresses: 10.0.0.0/8 does not cover a name.
        assert!(!bypass("https://ten.example/"));

        let all = Proxies::from_values("proxy:3128", "proxy:3128", "example.org,*");
        assert_eq!(via(&all, "https://ghcr.io/"), None);
    }

    #[test]
    fn unusable_proxy_urls_are_errors_naming_the_variable() {
        for bad in [
            "socks5://p:1080",
            "https://p:3128",
            "http://",
            "http://p:99999",
        ] {
            let p = Proxies::from_values("", bad, "");
            let e = p.for_url("https://ghcr.io/").unwrap().unwrap_err();
            assert!(e.contains("HTTPS_PROXY"), "{bad}: {e}");
        }
        // Plain http requests are not affected by HTTPS_PROXY.
        let p = Proxies::from_values("", "socks5://p", "");
        assert_eq!(via(&p, "http://reg.lan/"), None);
    }
}
