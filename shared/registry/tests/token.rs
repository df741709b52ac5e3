//! The bearer-token flow end to end: Debian's docker-registry with `auth:
//! token` and a real token server (`tests/go/token-server`) that signs the
//! tokens the registry verifies.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use stargaze_registry::{
    Client, ClientOptions, DockerConfig, Hosts, Reference, RegistryError, UploadSource,
};
use stargaze_testkit::token::TokenRegistry;
use stargaze_testkit::{image, require, run};

fn client(creds: &Path) -> Client {
    Client::new(
        Hosts::new(),
        DockerConfig::in_dir(creds),
        ClientOptions {
            min_backoff: Duration::from_millis(1),
            ..Default::default()
        },
    )
}

fn write_creds(dir: &Path, host: &str, user_pass: &str) {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(user_pass);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#),
    )
    .unwrap();
}

/// Push a one-layer image with skopeo (which does the token flow itself);
/// the layer's digest and bytes.
fn push(dir: &Path, dest: &str) -> (String, Vec<u8>) {
    require("skopeo");
    let layout = dir.join("layout");
    let (tar, _) = image::data_layer(11);
    image::write_layout(&layout, "x", "v1", &[tar]);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let m = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(&m[7..])).unwrap())
            .unwrap();
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let bytes = std::fs::read(layout.join("blobs/sha256").join(&layer[7..])).unwrap();
    run(Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--dest-tls-verify=false"])
        .args(["--dest-creds", "alice:s3cret"])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker://{dest}")));
    (layer, bytes)
}

fn registry_401s(t: &TokenRegistry) -> usize {
    std::fs::read_to_string(t.registry.dir.path().join("registry.log"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("\" 401 "))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_scoped_refreshed_mid_pull_and_renewed_on_a_new_challenge() {
    // Tokens the registry accepts for 2 seconds: a pull of a few seconds
    // outlives several of them.
    let t = TokenRegistry::start("alice", "s3cret", 2);
    let host = t.registry.addr.clone();
    let work = tempfile::tempdir().unwrap();
    let dest = format!("{host}/team/app:v1");
    let (layer, data) = push(work.path(), &dest);
    let creds = work.path().join("docker");
    write_creds(&creds, &host, "alice:s3cret");
    let r = Reference::parse(&dest).unwrap();

    // A pull: the registry's challenge leads to the token server, with the
    // repository's pull scope and the registry's service.
    let c = client(&creds);
    let before = t.token_requests().len();
    let blob = c.blob(&r, &layer);
    assert_eq!(blob.size().await.unwrap(), data.len() as u64);
    let reqs = t.token_requests();
    let first = &reqs[before];
    assert_eq!(first["user"], "alice");
    assert_eq!(first["service"], "stargaze-test");
    assert_eq!(first["scopes"][0], "repository:team/app:pull");

    // A long pull: ranges read for 5 s while tokens expire every 2 s. The
    // registry answers 401 with a new challenge; the client fetches a new
    // token and the read goes on, never failing.
    let start = Instant::now();
    let tokens_before = t.token_requests().len();
    let denied_before = registry_401s(&t);
    let mut reads = 0;
    while start.elapsed() < Duration::from_secs(5) {
        let off = (reads * 997) % (data.len() as u64 - 100);
        let got = blob
            .read_ranges(std::slice::from_ref(&(off..off + 100)))
            .await
            .unwrap();
        assert_eq!(&got[0][..], &data[off as usize..off as usize + 100]);
        reads += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let renewed = t.token_requests().len() - tokens_before;
    assert!(
        renewed >= 2,
        "{reads} reads over 5 s with 2 s tokens: {renewed} new tokens"
    );
    assert!(
        registry_401s(&t) > denied_before,
        "the registry refused the expired tokens"
    );

    // A push asks for pull,push on the destination.
    let target = Reference::parse(&format!("{host}/team/pushed:v1")).unwrap();
    let bytes = Bytes::from_static(b"{\"hello\":\"token\"}");
    let digest = stargaze_format::Digest::of(&bytes).to_string();
    c.push_blob(
        &target,
        &digest,
        bytes.len() as u64,
        UploadSource::Bytes(bytes),
        &|_| {},
    )
    .await
    .unwrap();
    assert!(c.blob_exists(&target, &digest).await.unwrap());
    assert!(
        t.token_requests()
            .iter()
            .any(|q| q["scopes"][0] == "repository:team/pushed:pull,push"
                && q["granted"][0]["actions"] == serde_json::json!(["pull", "push"])),
        "{:?}",
        t.token_requests()
    );
    // A mount asks for push here and pull on the source repository.
    assert!(c.mount_blob(&target, &layer, "team/app").await.unwrap());
    assert!(t.token_requests().iter().any(|q| {
        let s = q["scopes"].to_string();
        s.contains("repository:team/pushed:pull,push") && s.contains("repository:team/app:pull")
    }));

    // Where the token server grants pull only, a push fails with the
    // registry's status, naming the repository and blob.
    let ro = Reference::parse(&format!("{host}/readonly/x:v1")).unwrap();
    let e = c
        .push_blob(
            &ro,
            &digest,
            17,
            UploadSource::Bytes(Bytes::from_static(b"{\"hello\":\"token\"}")),
            &|_| {},
        )
        .await
        .unwrap_err();
    match &e {
        RegistryError::Status {
            status, repository, ..
        } => {
            assert_eq!(*status, 401, "{e}");
            assert_eq!(repository, "readonly/x");
        }
        other => panic!("expected a status error, got {other}"),
    }

    // Wrong credentials: the token server refuses, and the error says
    // where the credentials come from.
    write_creds(&creds, &host, "alice:wrong");
    let e = client(&creds).blob(&r, &layer).size().await.unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, RegistryError::Unauthorized { .. })
            && msg.contains("docker config")
            && !msg.contains("wrong"),
        "{msg}"
    );
}

/// GET a token from the token server as a client outside stargaze would
/// (Basic credentials, one scope), over plain HTTP/1.0.
fn token_for(realm: &str, scope: &str, user_pass: &str) -> String {
    use base64::Engine as _;
    use std::io::{Read, Write};
    let rest = realm.strip_prefix("http://").unwrap();
    let (addr, path) = rest.split_once('/').unwrap();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let basic = base64::engine::general_purpose::STANDARD.encode(user_pass);
    write!(
        s,
        "GET /{path}?scope={scope}&service=stargaze-test HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Basic {basic}\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let body = answer.split_once("\r\n\r\n").unwrap().1;
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["token"].as_str().unwrap().to_string()
}

/// What the CRI keychain hands over: a registry token is sent to the
/// registry as it is (no token request of the client's own), an identity
/// token is exchanged at the realm with an OAuth2 refresh-token grant, and
/// neither is used for another repository.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_and_identity_tokens_from_the_keychain() {
    use stargaze_registry::auth::Credential;
    let t = TokenRegistry::start("alice", "s3cret", 300);
    let host = t.registry.addr.clone();
    let work = tempfile::tempdir().unwrap();
    let dest = format!("{host}/team/app:v1");
    let (layer, data) = push(work.path(), &dest);
    let r = Reference::parse(&dest).unwrap();
    let nobody = work.path().join("no-docker-config");

    let token = token_for(&t.realm, "repository:team/app:pull", "alice:s3cret");
    let c = client(&nobody);
    c.keychain().remembered().remember(
        &host,
        "team/app",
        Credential::RegistryToken(token),
        Duration::from_secs(60),
    );
    let before = t.token_requests().len();
    let blob = c.blob(&r, &layer);
    assert_eq!(blob.size().await.unwrap(), data.len() as u64);
    let whole = 0..data.len() as u64;
    let got = blob
        .read_ranges(std::slice::from_ref(&whole))
        .await
        .unwrap();
    assert_eq!(got[0].as_ref(), &data[..]);
    assert_eq!(
        t.token_requests().len(),
        before,
        "a registry token needs no token request"
    );

    let c = client(&nobody);
    c.keychain().remembered().remember(
        &host,
        "team/app",
        Credential::IdentityToken(t.refresh_token.clone()),
        Duration::from_secs(60),
    );
    let blob = c.blob(&r, &layer);
    assert_eq!(blob.size().await.unwrap(), data.len() as u64);
    let reqs = t.token_requests();
    let last = reqs.last().unwrap();
    assert_eq!(last["grant"], "refresh_token", "{last}");
    assert_eq!(last["authorized"], true, "{last}");

    // Another repository of the registry: nothing remembered for it.
    let other = Reference::parse(&format!("{host}/team/other:v1")).unwrap();
    let e = c.blob(&other, &layer).size().await.unwrap_err();
    assert!(
        matches!(e, RegistryError::Unauthorized { .. }),
        "no credentials for team/other: {e}"
    );
    assert!(e.to_string().contains("no credentials for"), "{e}");
}
