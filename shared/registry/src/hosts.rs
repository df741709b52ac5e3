//! Where to send requests for a registry host: mirrors first, then the
//! origin, with per-host TLS and headers.
//!
//! Two configuration sources operators already have are read:
//! containerd's `hosts.toml` directories (`<dir>/<host[:port]>/hosts.toml`,
//! then `<dir>/_default/hosts.toml`) and the Go Stargz Snapshotter's
//! `[[resolver.host."HOST".mirrors]]` tables, so its config file works
//! unchanged.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::{Reference, RegistryError};

/// One place to send requests to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `scheme://host[:port]`
    pub origin: String,
    /// API path prefix, normally `/v2`.
    pub path: String,
    /// A mirror of the reference's host: requests carry `?ns=<host>`.
    pub mirror: bool,
    pub skip_verify: bool,
    /// Extra CA certificates (PEM files) trusted for this endpoint.
    pub ca: Vec<PathBuf>,
    /// Client certificates for mutual TLS (`hosts.toml` `client`): PEM
    /// certificate chain and its key; no key file = the key is in the
    /// certificate's file, as containerd reads it.
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
    pub headers: Vec<(String, String)>,
    pub timeout: Option<Duration>,
}

impl Endpoint {
    pub fn host(&self) -> &str {
        self.origin
            .split_once("://")
            .map(|(_, h)| h)
            .unwrap_or(&self.origin)
    }

    pub fn is_https(&self) -> bool {
        self.origin.starts_with("https://")
    }

    /// URL of `/v2/<repo>/<kind>/<object>` on this endpoint for reference `r`.
    pub fn url(&self, r: &Reference, kind: &str, object: &str) -> String {
        let mut u = format!(
            "{}{}/{}/{kind}/{object}",
            self.origin, self.path, r.repository
        );
        if self.mirror {
            u.push_str("?ns=");
            u.push_str(&r.host);
        }
        u
    }
}

#[derive(Debug, Deserialize, Default)]
struct HostsToml {
    server: Option<String>,
    #[serde(default)]
    capabilities: Option<Vec<String>>,
    #[serde(default)]
    skip_verify: Option<bool>,
    #[serde(default)]
    ca: Option<OneOrMany>,
    #[serde(default)]
    client: Option<ClientCerts>,
    #[serde(default)]
    header: HashMap<String, OneOrMany>,
    #[serde(default)]
    override_path: bool,
    #[serde(default)]
    host: indexmap_like::OrderedHosts,
}

/// `client` in hosts.toml, in containerd's forms: `"cert.pem"` (key in
/// the same file), or a list of such paths and `["cert", "key"]` pairs.
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
enum ClientCerts {
    One(String),
    Many(Vec<ClientCert>),
}

#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
enum ClientCert {
    Combined(String),
    Pair(Vec<String>),
}

impl ClientCerts {
    /// (certificate, key) paths; `None`: the key is in the certificate's
    /// file. A pair of more than two paths is refused, as containerd does.
    fn pairs(&self) -> Result<Vec<(String, Option<String>)>, String> {
        let one = |c: &String| (c.clone(), None);
        match self {
            ClientCerts::One(c) => Ok(vec![one(c)]),
            ClientCerts::Many(list) => list
                .iter()
                .map(|c| match c {
                    ClientCert::Combined(c) => Ok(one(c)),
                    ClientCert::Pair(p) => match p.as_slice() {
                        [c] => Ok(one(c)),
                        [c, k] if k.is_empty() => Ok(one(c)),
                        [c, k] => Ok((c.clone(), Some(k.clone()))),
                        _ => Err(format!("client pair {p:?} is not [certificate, key]")),
                    },
                })
                .collect(),
        }
    }
}

#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn list(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Deserialize, Default, Clone)]
struct HostEntry {
    capabilities: Option<Vec<String>>,
    skip_verify: Option<bool>,
    ca: Option<OneOrMany>,
    client: Option<ClientCerts>,
    #[serde(default)]
    header: HashMap<String, OneOrMany>,
    #[serde(default)]
    override_path: bool,
}

/// `[host."URL"]` tables in file order (TOML tables are maps; containerd
/// tries them in the order written, so keep it).
mod indexmap_like {
    use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};

    #[derive(Debug, Default)]
    pub struct OrderedHosts(pub Vec<(String, super::HostEntry)>);

    impl<'de> Deserialize<'de> for OrderedHosts {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = OrderedHosts;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a table of host tables")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<OrderedHosts, A::Error> {
                    let mut out = Vec::new();
                    while let Some((k, v)) = m.next_entry()? {
                        out.push((k, v));
                    }
                    Ok(OrderedHosts(out))
                }
            }
            d.deserialize_map(V)
        }
    }
}

/// A mirror entry of the Go Stargz Snapshotter's `[resolver]` section.
#[derive(Debug, Deserialize, Clone, Default)]
pub struct StargzMirror {
    pub host: String,
    #[serde(default)]
    pub insecure: bool,
    #[serde(default)]
    pub request_timeout_sec: i64,
    #[serde(default)]
    header: HashMap<String, OneOrMany>,
}

#[derive(Debug, Deserialize, Default)]
struct StargzHost {
    #[serde(default)]
    mirrors: Vec<StargzMirror>,
}

/// `[resolver]` of the Go snapshotter's config.
#[derive(Debug, Deserialize, Default)]
pub struct StargzResolver {
    #[serde(default)]
    host: HashMap<String, StargzHost>,
}

/// Registry host configuration.
#[derive(Debug, Default)]
pub struct Hosts {
    dir: Option<PathBuf>,
    stargz: HashMap<String, Vec<StargzMirror>>,
}

fn headers(h: &HashMap<String, OneOrMany>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = h
        .iter()
        .flat_map(|(k, v)| v.list().into_iter().map(move |v| (k.clone(), v)))
        .collect();
    out.sort();
    out
}

fn split_url(url: &str, override_path: bool) -> (String, String) {
    let (scheme, rest) = url.split_once("://").unwrap_or(("https", url));
    let (host, path) = match rest.split_once('/') {
        Some((h, p)) => (h, format!("/{}", p.trim_end_matches('/'))),
        None => (rest, String::new()),
    };
    let path = if override_path || path.ends_with("/v2") {
        path
    } else {
        format!("{path}/v2")
    };
    (format!("{scheme}://{host}"), path)
}

impl Hosts {
    /// No configuration: every host is its own only endpoint.
    pub fn new() -> Hosts {
        Hosts::default()
    }

    /// Read containerd `hosts.toml` files from `dir` (e.g. /etc/containerd/certs.d).
    pub fn with_hosts_dir(mut self, dir: &Path) -> Hosts {
        self.dir = Some(dir.to_path_buf());
        self
    }

    /// Add the Go snapshotter's `[resolver]` table (parsed from its config file).
    pub fn with_stargz_resolver(mut self, r: StargzResolver) -> Hosts {
        for (host, h) in r.host {
            self.stargz.entry(host).or_default().extend(h.mirrors);
        }
        self
    }

    /// Talk plain HTTP to `host` (`--plain-http` of ctr and ctr-remote).
    pub fn with_plain_http(mut self, host: &str) -> Hosts {
        self.stargz
            .entry(host.to_string())
            .or_default()
            .push(StargzMirror {
                host: format!("http://{host}"),
                insecure: true,
                ..Default::default()
            });
        self
    }

    /// Talk HTTPS to `host` without verifying its certificate (`--insecure`
    /// of skopeo and nerdctl's `--insecure-registry`).
    pub fn with_skip_verify(mut self, host: &str) -> Hosts {
        self.stargz
            .entry(host.to_string())
            .or_default()
            .push(StargzMirror {
                host: format!("https://{host}"),
                insecure: true,
                ..Default::default()
            });
        self
    }

    /// Parse a Go snapshotter config file's text and take its `[resolver]`.
    pub fn with_stargz_config_text(self, text: &str) -> Result<Hosts, RegistryError> {
        #[derive(Deserialize)]
        struct Top {
            #[serde(default)]
            resolver: StargzResolver,
        }
        let top: Top =
            toml::from_str(text).map_err(|e| RegistryError::Config(format!("[resolver]: {e}")))?;
        Ok(self.with_stargz_resolver(top.resolver))
    }

    fn hosts_toml(&self, host: &str) -> Result<Option<(PathBuf, HostsToml)>, RegistryError> {
        let Some(dir) = &self.dir else {
            return Ok(None);
        };
        for name in [
            host.to_string(),
            host.replace(':', "_"),
            "_default".to_string(),
        ] {
            let p = dir.join(&name).join("hosts.toml");
            if let Ok(text) = std::fs::read_to_string(&p) {
                let t: HostsToml = toml::from_str(&text)
                    .map_err(|e| RegistryError::Config(format!("{}: {e}", p.display())))?;
                return Ok(Some((p, t)));
            }
        }
        Ok(None)
    }

    /// Endpoints to try for reference `r`, in order.
    pub fn endpoints(&self, r: &Reference) -> Result<Vec<Endpoint>, RegistryError> {
        self.endpoints_for(r, "pull")
    }

    /// Endpoints to push `r` to, in order: hosts.toml hosts with the `push`
    /// capability and the server (mirrors serve pulls only).
    pub fn push_endpoints(&self, r: &Reference) -> Result<Vec<Endpoint>, RegistryError> {
        self.endpoints_for(r, "push")
    }

    fn endpoints_for(
        &self,
        r: &Reference,
        capability: &str,
    ) -> Result<Vec<Endpoint>, RegistryError> {
        let default_scheme = if r.is_localhost() { "http" } else { "https" };
        let mut out = Vec::new();
        // The Go snapshotter's mirrors for this host.
        for m in self.stargz.get(&r.host).into_iter().flatten() {
            let scheme = if m.insecure { "http" } else { "https" };
            let url = if m.host.contains("://") {
                m.host.clone()
            } else {
                format!("{scheme}://{}", m.host)
            };
            let (origin, path) = split_url(&url, false);
            let host_only = origin.split_once("://").map(|(_, h)| h).unwrap_or("");
            let mirror = host_only != r.host && host_only != r.api_host();
            if mirror && capability != "pull" {
                continue;
            }
            out.push(Endpoint {
                mirror,
                origin,
                path,
                skip_verify: m.insecure,
                ca: Vec::new(),
                client: Vec::new(),
                headers: headers(&m.header),
                timeout: (m.request_timeout_sec > 0)
                    .then(|| Duration::from_secs(m.request_timeout_sec as u64)),
            });
        }
        let origin_default = Endpoint {
            origin: format!("{default_scheme}://{}", r.api_host()),
            path: "/v2".into(),
            mirror: false,
            skip_verify: false,
            ca: Vec::new(),
            client: Vec::new(),
            headers: Vec::new(),
            timeout: None,
        };
        match self.hosts_toml(&r.host)? {
            None => out.push(origin_default),
            Some((file, t)) => {
                let base = file.parent().unwrap_or(Path::new("/"));
                let ca = |c: &Option<OneOrMany>| -> Vec<PathBuf> {
                    c.iter()
                        .flat_map(|c| c.list())
                        .map(|p| base.join(p))
                        .collect()
                };
                let client = |c: &Option<ClientCerts>| {
                    let pairs =
                        c.as_ref().map(|c| c.pairs()).transpose().map_err(|e| {
                            RegistryError::Config(format!("{}: {e}", file.display()))
                        })?;
                    Ok::<_, RegistryError>(
                        pairs
                            .into_iter()
                            .flatten()
                            .map(|(c, k)| (base.join(c), k.map(|k| base.join(k))))
                            .collect::<Vec<_>>(),
                    )
                };
                for (url, e) in &t.host.0 {
                    // containerd's default for a `[host]` is pull and resolve.
                    let capable = match &e.capabilities {
                        Some(c) => c.iter().any(|c| c == capability),
                        None => capability == "pull",
                    };
                    if !capable {
                        continue;
                    }
                    let (origin, path) = split_url(url, e.override_path);
                    let host_only = origin.split_once("://").map(|(_, h)| h).unwrap_or("");
                    out.push(Endpoint {
                        mirror: host_only != r.host && host_only != r.api_host(),
                        origin,
                        path,
                        skip_verify: e.skip_verify.unwrap_or(false),
                        ca: ca(&e.ca),
                        client: client(&e.client)?,
                        headers: headers(&e.header),
                        timeout: None,
                    });
                }
                match &t.server {
                    Some(server)
                        if t.capabilities
                            .as_ref()
                            .is_none_or(|c| c.iter().any(|c| c == capability)) =>
                    {
                        let (origin, path) = split_url(server, t.override_path);
                        out.push(Endpoint {
                            origin,
                            path,
                            mirror: false,
                            skip_verify: t.skip_verify.unwrap_or(false),
                            ca: ca(&t.ca),
                            client: client(&t.client)?,
                            headers: headers(&t.header),
                            timeout: None,
                        });
                    }
                    Some(_) => {}
                    None => out.push(origin_default),
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_localhost_and_docker_io() {
        let h = Hosts::new();
        let e = h
            .endpoints(&Reference::parse("127.0.0.1:5000/a:1").unwrap())
            .unwrap();
        assert_eq!(e[0].origin, "http://127.0.0.1:5000");
        let e = h.endpoints(&Reference::parse("python").unwrap()).unwrap();
        assert_eq!(e[0].origin, "https://registry-1.docker.io");
        assert_eq!(
            e[0].url(&Reference::parse("python").unwrap(), "manifests", "latest"),
            "https://registry-1.docker.io/v2/library/python/manifests/latest"
        );
    }

    #[test]
    fn hosts_toml_mirrors_in_order_then_server() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("registry.example:5000");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("hosts.toml"),
            r#"server = "https://registry.example:5000"
ca = "ca.pem"
[host."https://mirror-b.example"]
  capabilities = ["pull", "resolve"]
  header = { X-Test = "1" }
[host."http://mirror-a.example:8080/base"]
  capabilities = ["pull"]
  skip_verify = true
[host."https://push-only.example"]
  capabilities = ["push"]
"#,
        )
        .unwrap();
        let h = Hosts::new().with_hosts_dir(dir.path());
        let r = Reference::parse("registry.example:5000/app:1").unwrap();
        let e = h.endpoints(&r).unwrap();
        let origins: Vec<_> = e.iter().map(|e| e.origin.as_str()).collect();
        assert_eq!(
            origins,
            [
                "https://mirror-b.example",
                "http://mirror-a.example:8080",
                "https://registry.example:5000"
            ]
        );
        assert_eq!(e[0].headers, [("X-Test".to_string(), "1".to_string())]);
        assert!(e[1].skip_verify && e[1].mirror);
        assert_eq!(
            e[1].url(&r, "blobs", "d"),
            "http://mirror-a.example:8080/base/v2/app/blobs/d?ns=registry.example:5000"
        );
        assert!(!e[2].mirror);
        assert_eq!(e[2].ca, [d.join("ca.pem")]);
        let push: Vec<_> = h
            .push_endpoints(&r)
            .unwrap()
            .into_iter()
            .map(|e| e.origin)
            .collect();
        assert_eq!(
            push,
            ["https://push-only.example", "https://registry.example:5000"]
        );
    }

    #[test]
    fn client_certificates_in_containerds_forms() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("reg.example");
        std::fs::create_dir_all(&d).unwrap();
        let r = Reference::parse("reg.example/app:1").unwrap();
        let h = Hosts::new().with_hosts_dir(dir.path());
        let clients = |text: &str| {
            std::fs::write(d.join("hosts.toml"), text).unwrap();
            h.endpoints(&r)
                .map(|e| e.into_iter().map(|e| e.client).collect::<Vec<_>>())
        };
        let c = clients(
            "server = \"https://reg.example\"\nclient = \"both.pem\"\n[host.\"https://m.example\"]\nclient = [\"one.pem\", [\"c.pem\", \"k.pem\"], [\"/abs/c.pem\", \"\"]]\n",
        )
        .unwrap();
        assert_eq!(
            c,
            [
                vec![
                    (d.join("one.pem"), None),
                    (d.join("c.pem"), Some(d.join("k.pem"))),
                    (PathBuf::from("/abs/c.pem"), None),
                ],
                vec![(d.join("both.pem"), None)],
            ]
        );
        let e = clients("[host.\"https://m.example\"]\nclient = [[\"a\", \"b\", \"c\"]]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("hosts.toml") && e.contains("[certificate, key]"),
            "{e}"
        );
    }

    #[test]
    fn stargz_resolver_mirrors() {
        let h = Hosts::new()
            .with_stargz_config_text(
                r#"
[[resolver.host."exampleregistry.io".mirrors]]
host = "examplemirror.io"
[[resolver.host."exampleregistry.io".mirrors]]
host = "10.0.0.1:5000"
insecure = true
request_timeout_sec = 5
"#,
            )
            .unwrap();
        let r = Reference::parse("exampleregistry.io/x/y:1").unwrap();
        let e = h.endpoints(&r).unwrap();
        let origins: Vec<_> = e.iter().map(|e| e.origin.as_str()).collect();
        assert_eq!(
            origins,
            [
                "https://examplemirror.io",
                "http://10.0.0.1:5000",
                "https://exampleregistry.io"
            ]
        );
        assert_eq!(e[1].timeout, Some(Duration::from_secs(5)));
        assert!(e[0].mirror && !e[2].mirror);
    }
}
