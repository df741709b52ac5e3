//! `stargaze convert` with registries and archives at either end, against
//! Debian's docker-registry on 127.0.0.1 (plain, and TLS + htpasswd).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};
use stargaze_format::Digest;
use stargaze_testkit::{Registry, image, require, run, skopeo_copy};

fn stargaze_env(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_stargaze"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run stargaze")
}

fn ok_env(args: &[&str], env: &[(&str, &Path)]) -> String {
    let out = stargaze_env(args, env);
    assert!(
        out.status.success(),
        "stargaze {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn ok(args: &[&str]) -> String {
    ok_env(args, &[])
}

fn blob(dir: &Path, digest: &str) -> Vec<u8> {
    std::fs::read(dir.join("blobs/sha256").join(&digest[7..])).unwrap()
}

fn json_blob(dir: &Path, digest: &str) -> Value {
    serde_json::from_slice(&blob(dir, digest)).unwrap()
}

fn tagged(dir: &Path, tag: &str) -> Value {
    let index: Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no tag {tag} in {}", dir.display()))
        .clone()
}

fn put_blob(dir: &Path, bytes: &[u8]) -> String {
    let d = Digest::of(bytes).to_string();
    std::fs::write(dir.join("blobs/sha256").join(&d[7..]), bytes).unwrap();
    d
}

/// An index of two platforms (amd64, arm64/v8) sharing two gzip layers,
/// plus a third layer of the arm64 image only; tagged `multi`.
fn multi_platform_layout(dir: &Path) {
    let layers = vec![image::busybox_layer(), image::data_layer(3).0];
    image::write_layout(dir, "x", "amd64", &layers);
    let m = tagged(dir, "amd64");
    let manifest = json_blob(dir, m["digest"].as_str().unwrap());
    let mut config = json_blob(dir, manifest["config"]["digest"].as_str().unwrap());
    config["architecture"] = "arm64".into();
    let extra = image::gzip(&image::data_layer(4).0);
    let extra_raw = image::data_layer(4).0;
    config["rootfs"]["diff_ids"]
        .as_array_mut()
        .unwrap()
        .push(Digest::of(&extra_raw).to_string().into());
    let cbytes = serde_json::to_vec(&config).unwrap();
    let cdig = put_blob(dir, &cbytes);
    let edig = put_blob(dir, &extra);
    let mut arm = manifest.clone();
    arm["config"]["digest"] = cdig.into();
    arm["config"]["size"] = cbytes.len().into();
    arm["layers"].as_array_mut().unwrap().push(json!({
        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
        "digest": edig, "size": extra.len()}));
    let abytes = serde_json::to_vec(&arm).unwrap();
    let adig = put_blob(dir, &abytes);
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": m["mediaType"], "digest": m["digest"], "size": m["size"],
             "platform": {"architecture": "amd64", "os": "linux"}},
            {"mediaType": m["mediaType"], "digest": adig, "size": abytes.len(),
             "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}},
        ],
    });
    let ibytes = serde_json::to_vec(&index).unwrap();
    let idig = put_blob(dir, &ibytes);
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": idig,
             "size": ibytes.len(),
             "annotations": {"org.opencontainers.image.ref.name": "multi"}}]}))
        .unwrap(),
    )
    .unwrap();
}

/// The digest `stargaze convert` reports for the new image.
fn reported_digest(stdout: &str) -> String {
    stdout
        .split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .unwrap_or_else(|| panic!("no digest in {stdout}"))
        .to_string()
}

/// Every layer blob of every manifest under `tag` of a layout.
fn layer_blobs(dir: &Path, tag: &str) -> Vec<(String, Vec<u8>)> {
    let top = tagged(dir, tag);
    let mut out = Vec::new();
    let mut todo = vec![top];
    while let Some(d) = todo.pop() {
        let v = json_blob(dir, d["digest"].as_str().unwrap());
        if let Some(list) = v["manifests"].as_array() {
            todo.extend(list.iter().cloned());
            continue;
        }
        for l in v["layers"].as_array().unwrap() {
            let dg = l["digest"].as_str().unwrap().to_string();
            let b = blob(dir, &dg);
            out.push((dg, b));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Requests in the registry's log whose method and path match.
fn requests(reg: &Registry, method: &str, path_part: &str) -> usize {
    let log = std::fs::read_to_string(reg.dir.path().join("registry.log")).unwrap();
    log.lines()
        .filter(|l| {
            l.contains(&format!("http.request.method={method}"))
                && l.contains("http.response.status")
                && l.contains(path_part)
        })
        .count()
}

/// The Go reference reader opens every eStargz layer and checks every chunk.
fn go_reader_verifies(dir: &Path, tag: &str) {
    let verify = stargaze_testkit::go_build("esgz-verify");
    let mut todo = vec![tagged(dir, tag)];
    let mut n = 0;
    while let Some(d) = todo.pop() {
        let v = json_blob(dir, d["digest"].as_str().unwrap());
        if let Some(list) = v["manifests"].as_array() {
            todo.extend(list.iter().cloned());
            continue;
        }
        for l in v["layers"].as_array().unwrap() {
            let dg = l["digest"].as_str().unwrap();
            let toc = l["annotations"]["containerd.io/snapshot/stargz/toc.digest"]
                .as_str()
                .unwrap();
            run(Command::new(&verify)
                .arg(dir.join("blobs/sha256").join(&dg[7..]))
                .arg(toc));
            n += 1;
        }
    }
    assert!(n > 0);
}

#[test]
fn registry_to_registry_matches_the_oci_path_byte_for_byte() {
    require("skopeo");
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    multi_platform_layout(&src);
    let reg = Registry::start();
    // skopeo copies one platform unless told --all: push the index whole.
    run(Command::new("skopeo").args([
        "--insecure-policy",
        "copy",
        "--all",
        "--dest-tls-verify=false",
        &format!("oci:{}:multi", src.display()),
        &format!("docker://{}/app/src:multi", reg.addr),
    ]));

    let spill = work.path().join("spill");
    let spill_env = [("TMPDIR", spill.as_path())];
    let out = ok_env(
        &[
            "convert",
            &format!("docker://{}/app/src:multi", reg.addr),
            &format!("docker://{}/app/esgz:multi", reg.addr),
        ],
        &spill_env,
    );
    let via_registry = reported_digest(&out);
    let layout_out = work.path().join("out");
    let out = ok(&[
        "convert",
        &format!("oci:{}:multi", src.display()),
        &format!("oci:{}:multi", layout_out.display()),
    ]);
    let via_layout = reported_digest(&out);
    assert_eq!(
        via_registry, via_layout,
        "the index (and so every manifest, config and layer) is the same"
    );
    // Nothing is left in the spill directory.
    assert_eq!(std::fs::read_dir(&spill).unwrap().count(), 0);

    // What the registry serves, byte for byte.
    let back = work.path().join("back");
    run(Command::new("skopeo").args([
        "--insecure-policy",
        "copy",
        "--all",
        "--preserve-digests",
        "--src-tls-verify=false",
        &format!("docker://{}/app/esgz:multi", reg.addr),
        &format!("oci:{}:multi", back.display()),
    ]));
    let a = layer_blobs(&back, "multi");
    let b = layer_blobs(&layout_out, "multi");
    assert_eq!(a.len(), 3, "three distinct layers");
    assert!(a == b, "registry and oci: layers differ");
    assert_eq!(tagged(&back, "multi")["digest"], via_layout.as_str());
    go_reader_verifies(&back, "multi");

    // --platform keeps one platform of the index.
    let out = ok(&[
        "convert",
        "--platform",
        "linux/arm64",
        &format!("docker://{}/app/src:multi", reg.addr),
        &format!("docker://{}/app/esgz:arm", reg.addr),
    ]);
    assert!(out.contains("layers converted"), "{out}");
    let inspect = run(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{}/app/esgz:arm", reg.addr),
    ]));
    let idx: Value = serde_json::from_slice(&inspect.stdout).unwrap();
    let entries = idx["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["platform"]["architecture"], "arm64");
}

#[test]
fn a_second_convert_uploads_nothing_and_other_repositories_mount() {
    require("skopeo");
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    image::write_layout(
        &src,
        "x",
        "v1",
        &[image::busybox_layer(), image::data_layer(5).0],
    );
    let reg = Registry::start();
    skopeo_copy(
        &format!("oci:{}:v1", src.display()),
        &format!("docker://{}/a/src:v1", reg.addr),
    );
    let from = format!("docker://{}/a/src:v1", reg.addr);
    let to = format!("docker://{}/a/esgz:v1", reg.addr);
    let first = ok(&["convert", &from, &to]);
    assert!(
        first.contains("pushed 3 blobs"),
        "two layers, a config: {first}"
    );
    let uploads = requests(&reg, "POST", "/blobs/uploads/");
    let patches = requests(&reg, "PATCH", "/blobs/uploads/");
    let puts = requests(&reg, "PUT", "/blobs/uploads/");

    let second = ok(&["convert", &from, &to]);
    assert!(second.contains("pushed 0 blobs"), "{second}");
    assert!(second.contains("3 already there"), "{second}");
    assert_eq!(requests(&reg, "POST", "/blobs/uploads/"), uploads);
    assert_eq!(requests(&reg, "PATCH", "/blobs/uploads/"), patches);
    assert_eq!(requests(&reg, "PUT", "/blobs/uploads/"), puts);

    // The converted image into another repository: its lazy layers are
    // mounted, not uploaded (only the config, a different blob, is).
    let other = format!("docker://{}/b/copy:v1", reg.addr);
    let third = ok(&["convert", &to, &other]);
    assert!(third.contains("2 mounted"), "{third}");
    assert!(requests(&reg, "POST", "mount=sha256") >= 2);
    assert_eq!(
        requests(&reg, "PATCH", "/blobs/uploads/"),
        patches,
        "no layer bytes sent again"
    );
}

#[test]
fn tls_and_htpasswd_through_docker_config_and_hosts_toml() {
    require("skopeo");
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    image::write_layout(&src, "x", "v1", &[image::data_layer(6).0]);
    let (reg, ca) = Registry::start_tls_auth("alice", "s3cret");
    let certs = work.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(&ca, certs.join("ca.crt")).unwrap();
    run(Command::new("skopeo").args([
        "--insecure-policy",
        "copy",
        "--dest-creds",
        "alice:s3cret",
        "--dest-cert-dir",
        certs.to_str().unwrap(),
        &format!("oci:{}:v1", src.display()),
        &format!("docker://{}/p/src:v1", reg.addr),
    ]));
    let hosts = work.path().join("hosts");
    let hd = hosts.join(&reg.addr);
    std::fs::create_dir_all(&hd).unwrap();
    std::fs::write(
        hd.join("hosts.toml"),
        format!(
            "server = \"https://{}\"\nca = \"{}\"\n",
            reg.addr,
            ca.display()
        ),
    )
    .unwrap();
    let from = format!("docker://{}/p/src:v1", reg.addr);
    let to = format!("docker://{}/p/esgz:v1", reg.addr);
    let args = |h: &Path| -> Vec<String> {
        vec![
            "convert".into(),
            "--hosts-dir".into(),
            h.display().to_string(),
            from.clone(),
            to.clone(),
        ]
    };
    let a = args(&hosts);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();

    // No credentials: the error names the registry and what to configure.
    let empty = work.path().join("nodocker");
    std::fs::create_dir_all(&empty).unwrap();
    let o = stargaze_env(&a, &[("DOCKER_CONFIG", empty.as_path())]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{e}");
    assert!(
        e.contains(&reg.addr) && e.contains("docker config"),
        "the error says where credentials go: {e}"
    );

    let docker = work.path().join("docker");
    std::fs::create_dir_all(&docker).unwrap();
    std::fs::write(
        docker.join("config.json"),
        format!(
            "{{\"auths\":{{\"{}\":{{\"auth\":\"YWxpY2U6czNjcmV0\"}}}}}}",
            reg.addr
        ),
    )
    .unwrap();
    let out = ok_env(&a, &[("DOCKER_CONFIG", docker.as_path())]);
    assert!(out.contains("1 layers converted"), "{out}");
    let back = work.path().join("back");
    run(Command::new("skopeo").args([
        "--insecure-policy",
        "copy",
        "--src-creds",
        "alice:s3cret",
        "--src-cert-dir",
        certs.to_str().unwrap(),
        &to,
        &format!("oci:{}:v1", back.display()),
    ]));
    go_reader_verifies(&back, "v1");

    // Without the CA, the certificate is refused, and --insecure skips it.
    let noca = work.path().join("noca");
    std::fs::create_dir_all(noca.join(&reg.addr)).unwrap();
    std::fs::write(
        noca.join(&reg.addr).join("hosts.toml"),
        format!("server = \"https://{}\"\n", reg.addr),
    )
    .unwrap();
    let a = args(&noca);
    let mut a: Vec<&str> = a.iter().map(String::as_str).collect();
    let o = stargaze_env(&a, &[("DOCKER_CONFIG", docker.as_path())]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("certificate"), "{e}");
    a.insert(1, "--insecure");
    ok_env(&a, &[("DOCKER_CONFIG", docker.as_path())]);
}

#[test]
fn archives_as_source_and_destination() {
    require("skopeo");
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    image::write_layout(
        &src,
        "x",
        "v1",
        &[image::busybox_layer(), image::data_layer(7).0],
    );
    let reference = work.path().join("ref");
    ok(&[
        "convert",
        &format!("oci:{}:v1", src.display()),
        &format!("oci:{}:v1", reference.display()),
    ]);
    let want = layer_blobs(&reference, "v1");

    // docker-archive (docker save) in, oci-archive out.
    let docker_tar = work.path().join("in-docker.tar");
    run(Command::new("skopeo").args([
        "--insecure-policy",
        "copy",
        &format!("oci:{}:v1", src.display()),
        &format!("docker-archive:{}:stargaze.test/x:v1", docker_tar.display()),
    ]));
    let oci_tar = work.path().join("out-oci.tar");
    ok(&[
        "convert",
        &format!("docker-archive:{}", docker_tar.display()),
        &format!("oci-archive:{}:esgz", oci_tar.display()),
    ]);
    let unpacked = work.path().join("unpacked");
    run(Command::new("skopeo").args([
        "--insecure-policy",
        "copy",
        "--preserve-digests",
        &format!("oci-archive:{}:esgz", oci_tar.display()),
        &format!("oci:{}:esgz", unpacked.display()),
    ]));
    // docker save keeps the tars uncompressed: the same files, the same
    // conversion.
    assert!(layer_blobs(&unpacked, "esgz") == want, "oci-archive layers");

    // oci-archive in, docker-archive out, and skopeo reads it back.
    let src_tar = work.path().join("in-oci.tar");
    image::layout_tar(&src, &src_tar);
    let out_docker = work.path().join("out-docker.tar");
    ok(&[
        "convert",
        &format!("oci-archive:{}:v1", src_tar.display()),
        &format!(
            "docker-archive:{}:stargaze.test/x:esgz",
            out_docker.display()
        ),
    ]);
    let inspect = run(Command::new("skopeo").args([
        "inspect",
        &format!("docker-archive:{}", out_docker.display()),
    ]));
    let v: Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(v["Layers"].as_array().unwrap().len(), 2, "{v}");
    let back = work.path().join("back");
    run(Command::new("skopeo").args([
        "--insecure-policy",
        "copy",
        &format!("docker-archive:{}", out_docker.display()),
        &format!("oci:{}:esgz", back.display()),
    ]));
    // The archive holds the converted layers as they are.
    let mut names: Vec<PathBuf> = Vec::new();
    let mut t = tar::Archive::new(std::fs::File::open(&out_docker).unwrap());
    for e in t.entries().unwrap() {
        names.push(e.unwrap().path().unwrap().into_owned());
    }
    let mut t = tar::Archive::new(std::fs::File::open(&out_docker).unwrap());
    let manifest: Value = t
        .entries()
        .unwrap()
        .map(|e| e.unwrap())
        .find(|e| e.path().unwrap().to_str() == Some("manifest.json"))
        .map(|e| serde_json::from_reader(e).unwrap())
        .expect("manifest.json");
    assert_eq!(manifest[0]["RepoTags"], json!(["stargaze.test/x:esgz"]));
    for (d, _) in &want {
        assert!(
            names.contains(&PathBuf::from(format!("blobs/sha256/{}", &d[7..]))),
            "{d} in {names:?}"
        );
    }
}

/// `stargaze convert` takes its proxies from the environment like
/// containerd: `HTTP_PROXY` carries a plain-HTTP registry's pulls and
/// pushes (tinyproxy's log has them), the log names the proxy once;
/// the lower-case forms work too, and `no_proxy` with the registry's
/// address sends everything straight to it. The registry listens on a
/// non-loopback address (loopback is never proxied).
#[test]
fn convert_goes_through_the_proxy_of_its_environment() {
    use stargaze_testkit::proxy::{LocalAddr, TinyProxy};
    require("skopeo");
    let net = LocalAddr::create();
    let reg = Registry::start_on(&net.ip);
    let proxy = TinyProxy::start(&[], None);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    image::write_layout(&src, "x", "v1", &[image::data_layer(6).0]);
    skopeo_copy(
        &format!("oci:{}:v1", src.display()),
        &format!("docker://{}/a/src:v1", reg.addr),
    );
    let from = format!("docker://{}/a/src:v1", reg.addr);
    let convert = |to: &str, env: &[(&str, &str)]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_stargaze"));
        c.args(["convert", "--plain-http", "--log-level", "info", &from, to]);
        for var in [
            "HTTP_PROXY",
            "http_proxy",
            "HTTPS_PROXY",
            "https_proxy",
            "NO_PROXY",
            "no_proxy",
        ] {
            c.env_remove(var);
        }
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().expect("run stargaze");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "stargaze convert {from} {to} with {env:?} failed:\n{stderr}"
        );
        stderr
    };
    let seen = || proxy.requests(&format!("http://{}/v2/a/", reg.addr));

    let to = format!("docker://{}/a/esgz:v1", reg.addr);
    let log = convert(&to, &[("HTTP_PROXY", &proxy.url())]);
    assert!(
        proxy.requests(&format!("GET http://{}/v2/a/src/", reg.addr)) >= 1
            && proxy.requests(&format!("PUT http://{}/v2/a/esgz/manifests/v1", reg.addr)) == 1,
        "the pull and the push went through the proxy; its log:\n{}",
        proxy.log()
    );
    let named = log
        .lines()
        .filter(|l| l.contains("registry reached through a proxy") && l.contains(&proxy.url()))
        .count();
    assert_eq!(
        named, 1,
        "the proxy is logged once for the registry:\n{log}"
    );

    let through = seen();
    convert(
        &format!("docker://{}/a/esgz:v2", reg.addr),
        &[("http_proxy", &proxy.url())],
    );
    assert!(seen() > through, "http_proxy is honoured too");
    let through = seen();
    convert(
        &format!("docker://{}/a/esgz:v3", reg.addr),
        &[("http_proxy", &proxy.url()), ("no_proxy", &net.ip)],
    );
    assert_eq!(seen(), through, "no_proxy bypasses the proxy");
}
