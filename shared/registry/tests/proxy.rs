//! Registries reached through a real HTTP proxy (Debian's tinyproxy, on
//! 127.0.0.1 with a private config): plain HTTP in absolute form, TLS
//! through CONNECT, NO_PROXY bypasses, proxy credentials, and a proxy
//! that is not there. Loopback is never proxied (as in Go), so the
//! registries listen on an address of a address the test adds to `lo` (not 127.0.0.0/8).

use std::path::Path;
use std::time::Duration;

use stargaze_registry::{
    Client, ClientOptions, DockerConfig, Hosts, Platform, Proxies, Reference, RegistryError,
    UploadSource,
};
use stargaze_testkit::proxy::{LocalAddr, TinyProxy};
use stargaze_testkit::{Registry, free_port};

fn client(hosts: Hosts, work: &Path, proxies: Proxies) -> Client {
    Client::new(
        hosts,
        DockerConfig::in_dir(work),
        ClientOptions {
            min_backoff: Duration::from_millis(1),
            retries: 1,
            proxies,
            ..Default::default()
        },
    )
}

/// A hosts directory whose hosts.toml sends `addr` to `server`.
fn hosts_for(work: &Path, addr: &str, toml: &str) -> Hosts {
    let dir = work.join("certs.d");
    std::fs::create_dir_all(dir.join(addr)).unwrap();
    std::fs::write(dir.join(addr).join("hosts.toml"), toml).unwrap();
    Hosts::new().with_hosts_dir(&dir)
}

/// Push a one-layer image with `c`; returns (layer digest, layer bytes).
async fn push(c: &Client, r: &Reference) -> (String, Vec<u8>) {
    let data: Vec<u8> = (0..100_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let layer = stargaze_format::Digest::of(&data).to_string();
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = stargaze_format::Digest::of(config).to_string();
    for (digest, bytes) in [(&layer, data.clone()), (&config_digest, config.to_vec())] {
        let len = bytes.len() as u64;
        c.push_blob(r, digest, len, UploadSource::Bytes(bytes.into()), &|_| {})
            .await
            .unwrap();
    }
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":{}}}]}}"#,
        config.len(),
        data.len()
    );
    c.push_manifest(
        r,
        "v1",
        "application/vnd.oci.image.manifest.v1+json",
        manifest.into(),
    )
    .await
    .unwrap();
    (layer, data)
}

/// Read the manifest and two ranges of the layer with `c`.
async fn pull(c: &Client, r: &Reference, layer: &str, data: &[u8]) -> Result<(), RegistryError> {
    c.resolve_manifest(r, &Platform::host()).await?;
    let got = c
        .blob(r, layer)
        .read_ranges(&[0..10, 50_000..60_000])
        .await?;
    assert_eq!(
        got,
        vec![data[0..10].to_vec(), data[50_000..60_000].to_vec()]
    );
    Ok(())
}

/// A plain-HTTP registry: pushes and pulls go to the proxy as
/// absolute-form requests (the proxy's log lists them); with the
/// registry in NO_PROXY (a CIDR, the address, the address with its port)
/// they go straight to it; a proxy that is not listening gives an error
/// naming the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_registry_through_the_proxy_and_no_proxy_bypasses_it() {
    let net = LocalAddr::create();
    let reg = Registry::start_on(&net.ip);
    let proxy = TinyProxy::start(&[], None);
    let work = tempfile::tempdir().unwrap();
    let hosts = || {
        hosts_for(
            work.path(),
            &reg.addr,
            &format!("server = \"http://{}\"\n", reg.addr),
        )
    };
    let r = Reference::parse(&format!("{}/proxied/app:v1", reg.addr)).unwrap();
    let through = || Proxies::from_values(&proxy.url(), "", "");

    let c = client(hosts(), work.path(), through());
    let (layer, data) = push(&c, &r).await;
    pull(&c, &r, &layer, &data).await.unwrap();
    let via_proxy = proxy.requests(&format!("http://{}/v2/proxied/app/", reg.addr));
    assert!(
        proxy.requests(&format!(
            "GET http://{}/v2/proxied/app/blobs/{layer}",
            reg.addr
        )) >= 1
            && proxy.requests(&format!(
                "PUT http://{}/v2/proxied/app/manifests/v1",
                reg.addr
            )) == 1,
        "the proxy saw no pull or push; its log:\n{}",
        proxy.log()
    );

    for no_proxy in [
        "10.250.0.0/16".to_string(),
        net.ip.clone(),
        reg.addr.clone(),
        format!("example.org, {}", net.ip),
    ] {
        let c = client(
            hosts(),
            work.path(),
            Proxies::from_values(&proxy.url(), "", &no_proxy),
        );
        pull(&c, &r, &layer, &data).await.unwrap();
        assert_eq!(
            proxy.requests(&format!("http://{}/v2/proxied/app/", reg.addr)),
            via_proxy,
            "NO_PROXY={no_proxy} did not bypass the proxy"
        );
    }
    // Another port of the same address is not covered by addr:port.
    let c = client(
        hosts(),
        work.path(),
        Proxies::from_values(&proxy.url(), "", &format!("{}:1", net.ip)),
    );
    pull(&c, &r, &layer, &data).await.unwrap();
    assert!(proxy.requests(&format!("http://{}/v2/proxied/app/", reg.addr)) > via_proxy);

    // A proxy that is not there: the error names it and the registry.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let c = client(hosts(), work.path(), Proxies::from_values(&dead, "", ""));
    let e = c.resolve_manifest(&r, &Platform::host()).await.unwrap_err();
    assert!(matches!(e, RegistryError::Proxy { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains(&dead) && msg.contains(&reg.addr) && msg.contains("HTTP_PROXY"),
        "{msg}"
    );
}

/// A TLS registry: the TLS connection runs through a CONNECT tunnel (the
/// proxy's log has the CONNECTs, the certificate is checked against the
/// registry's address), and NO_PROXY bypasses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_registry_through_a_connect_tunnel() {
    let net = LocalAddr::create();
    let (reg, pki) = Registry::start_tls_on(&net.ip);
    let port: u16 = reg.addr.rsplit_once(':').unwrap().1.parse().unwrap();
    let proxy = TinyProxy::start(&[port], None);
    let work = tempfile::tempdir().unwrap();
    let hosts = || {
        hosts_for(
            work.path(),
            &reg.addr,
            &format!(
                "server = \"https://{}\"\nca = \"{}\"\n",
                reg.addr,
                pki.ca.display()
            ),
        )
    };
    let r = Reference::parse(&format!("{}/tunneled/app:v1", reg.addr)).unwrap();

    let c = client(
        hosts(),
        work.path(),
        Proxies::from_values("", &proxy.url(), ""),
    );
    let (layer, data) = push(&c, &r).await;
    pull(&c, &r, &layer, &data).await.unwrap();
    let connects = proxy.requests(&format!("CONNECT {}", reg.addr));
    assert!(
        connects >= 1,
        "no CONNECT in the proxy's log:\n{}",
        proxy.log()
    );
    assert_eq!(
        proxy.requests("GET "),
        0,
        "TLS requests must not reach the proxy in the clear"
    );

    let c = client(
        hosts(),
        work.path(),
        Proxies::from_values("", &proxy.url(), &format!("{}:{port}", net.ip)),
    );
    pull(&c, &r, &layer, &data).await.unwrap();
    assert_eq!(proxy.requests(&format!("CONNECT {}", reg.addr)), connects);

    // HTTP_PROXY alone does not apply to https registries.
    let c = client(
        hosts(),
        work.path(),
        Proxies::from_values(&proxy.url(), "", ""),
    );
    pull(&c, &r, &layer, &data).await.unwrap();
    assert_eq!(proxy.requests(&format!("CONNECT {}", reg.addr)), connects);
}

/// A proxy that wants Basic credentials: given in the proxy URL they are
/// sent (CONNECT and plain HTTP alike); missing, the error names the proxy
/// and says where credentials go, and never shows a password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_credentials_from_the_proxy_url() {
    let net = LocalAddr::create();
    let plain = Registry::start_on(&net.ip);
    let (tls, pki) = Registry::start_tls_on(&net.ip);
    let tls_port: u16 = tls.addr.rsplit_once(':').unwrap().1.parse().unwrap();
    let proxy = TinyProxy::start(&[tls_port], Some(("proxyuser", "pr0xy-pass")));
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("certs.d");
    for (addr, toml) in [
        (&plain.addr, format!("server = \"http://{}\"\n", plain.addr)),
        (
            &tls.addr,
            format!(
                "server = \"https://{}\"\nca = \"{}\"\n",
                tls.addr,
                pki.ca.display()
            ),
        ),
    ] {
        std::fs::create_dir_all(dir.join(addr)).unwrap();
        std::fs::write(dir.join(addr).join("hosts.toml"), toml).unwrap();
    }
    let hosts = || Hosts::new().with_hosts_dir(&dir);
    let with_creds = proxy
        .url()
        .replace("http://", "http://proxyuser:pr0xy-pass@");
    let good = || Proxies::from_values(&with_creds, &with_creds, "");
    for reg in [&plain, &tls] {
        let r = Reference::parse(&format!("{}/auth/app:v1", reg.addr)).unwrap();
        let c = client(hosts(), work.path(), good());
        let (layer, data) = push(&c, &r).await;
        pull(&c, &r, &layer, &data).await.unwrap();

        for (url, var) in [
            (proxy.url(), "no credentials"),
            (
                proxy
                    .url()
                    .replace("http://", "http://proxyuser:wrong-pass@"),
                "wrong credentials",
            ),
        ] {
            let c = client(hosts(), work.path(), Proxies::from_values(&url, &url, ""));
            let e = c.resolve_manifest(&r, &Platform::host()).await.unwrap_err();
            let msg = e.to_string();
            // tinyproxy answers wrong credentials to a plain request with
            // a 401 of its own, which reads as the registry's: the error
            // still names the proxy as a suspect.
            let proxy_401 = reg.addr == plain.addr && var == "wrong credentials";
            assert!(
                matches!(e, RegistryError::Proxy { .. })
                    || (proxy_401 && matches!(e, RegistryError::Unauthorized { .. })),
                "{var}: {e:?}"
            );
            assert!(
                msg.contains(&proxy.url()) && msg.contains("credentials"),
                "{var}: {msg}"
            );
            assert!(
                !msg.contains("pr0xy-pass") && !msg.contains("wrong-pass"),
                "{var}: a password in {msg}"
            );
        }
    }
    assert!(proxy.requests(&format!("CONNECT {}", tls.addr)) >= 1);
    assert!(proxy.requests(&format!("http://{}/v2/auth/app/", plain.addr)) >= 1);
}
