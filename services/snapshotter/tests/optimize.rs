//! `stargaze optimize` with the real components: an eStargz image in the
//! registry is pulled lazily into containerd 1.6 through our three
//! services, a workload given on the command line runs in a container of
//! it, and the image written has the files that workload read first in
//! their layer, in the order it read them, before the prefetch landmark;
//! the Go reference reader (the estargz package ctr-remote is built on)
//! opens and verifies every layer of it, and the Go Stargz Snapshotter
//! pulls it lazily with `ctr-remote image rpull` and runs a container of it.
//!
//! Needs root, /dev/fuse and the Debian packages `make deps` installs.

use std::path::Path;
use std::process::Command;

mod common;

use common::{Node, Setup, content_blobs};
use stargaze_format::Digest;
use stargaze_format::reader::{OpenOptions, open_blob};
use stargaze_format::toc::PREFETCH_LANDMARK;
use stargaze_testkit::stack::{Stack, workspace_bin};
use stargaze_testkit::{Containerd, PeerStargz, image, run};

/// The layers (digest, TOC digest annotation) of the image tagged `tag` in
/// the OCI layout `dir`.
fn layers(dir: &Path, tag: &str) -> Vec<(String, String)> {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let desc = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no {tag} in {index}"));
    let blob = |d: &str| dir.join("blobs/sha256").join(&d[7..]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(desc["digest"].as_str().unwrap())).unwrap())
            .unwrap();
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["digest"].as_str().unwrap().to_string(),
                l["annotations"]["containerd.io/snapshot/stargz/toc.digest"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect()
}

#[test]
fn optimize_puts_what_a_workload_read_first_for_any_reader() {
    let setup = Setup::new("sg-optimize-", &["runc", "skopeo", "ctr", "ctr-remote"]);
    let w = setup.dir();
    let (data, files) = image::data_layer(11);
    let src_ref = setup.push_esgz_image("opt", &[image::busybox_layer(), data]);
    let dst_ref = format!("{}/stargaze/opt:optimized", setup.registry.addr);

    // Nothing is fetched but what the workload reads.
    let Node { ctd, stack } = Node::on(Stack::start(
        w,
        &[(
            "fetcher",
            "background_fetch = false\nprefetch_entrypoint = false",
        )],
    ));
    let o = run(Command::new(workspace_bin("stargaze"))
        .args(["optimize", "--plain-http", "--period", "60s"])
        .arg("--address")
        .arg(&ctd.socket)
        .args(["--namespace", &ctd.namespace, "--snapshotter", "stargaze"])
        .arg("--config")
        .arg(&stack.config)
        .arg(format!("docker://{src_ref}"))
        .arg(format!("docker://{dst_ref}"))
        .args([
            "--",
            "/bin/sh",
            "-c",
            "cat /data/file6 /data/file3 > /dev/null; echo read",
        ]));
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(said.contains("the workload read"), "{said}");

    let opt = w.join("opt");
    run(Command::new("skopeo").args([
        "--insecure-policy",
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{dst_ref}"),
        &format!("oci:{}:opt", opt.display()),
    ]));
    let verify = stargaze_testkit::go_build("esgz-verify");
    let mut data_order = None;
    for (digest, toc) in layers(&opt, "opt") {
        let path = opt.join("blobs/sha256").join(&digest[7..]);
        // The Go reader opens it and verifies every chunk.
        run(Command::new(&verify).arg(&path).arg(&toc));
        let blob = std::fs::read(&path).unwrap();
        let layer = open_blob(&digest, &blob[..], &OpenOptions::default()).unwrap();
        let toc: serde_json::Value = serde_json::from_slice(&layer.toc_json).unwrap();
        let mut names: Vec<String> = toc["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_string())
            .collect();
        names.dedup();
        if names.iter().any(|n| n == "data/file6") {
            data_order = Some(names);
        }
    }
    let names = data_order.expect("the data layer");
    let at = |n: &str| {
        names
            .iter()
            .position(|x| x == n)
            .unwrap_or_else(|| panic!("{n} not in {names:?}"))
    };
    let landmark = at(PREFETCH_LANDMARK);
    assert!(
        at("data/file6") < at("data/file3"),
        "in read order: {names:?}"
    );
    assert!(
        at("data/file3") < landmark,
        "read files before the landmark: {names:?}"
    );
    assert!(
        at("data/file5") > landmark,
        "files not read after it: {names:?}"
    );
    drop(ctd);

    // The Go Stargz Snapshotter mounts the optimized image lazily (no
    // layer blob in containerd's content store) and a container reads it.
    let peer = PeerStargz::start();
    let ctd = Containerd::start(&peer.proxy_config("stargz"));
    run(ctd.cmd("ctr-remote").args([
        "image",
        "rpull",
        "--plain-http",
        "--snapshotter",
        "stargz",
        &dst_ref,
    ]));
    let content = content_blobs(&ctd);
    for (digest, _) in layers(&opt, "opt") {
        assert!(
            !content.contains(&digest),
            "layer {digest} was downloaded, not mounted lazily"
        );
    }
    let o = ctd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "stargz",
        &dst_ref,
        &format!("sg-opt-peer-{}", std::process::id()),
        "/bin/sh",
        "-c",
        "sha256sum /data/file6 /data/file5; sleep 0.2",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for (name, bytes) in files
        .iter()
        .filter(|(n, _)| n == "data/file6" || n == "data/file5")
    {
        let line = format!("{}  /{name}", Digest::of(bytes).hex());
        assert!(out.contains(&line), "missing {line:?} in {out}");
    }
}
