//! Images converted by `stargaze convert` in real containerd 1.6:
//!
//! * containerd's ordinary pull path (unpack into overlayfs) gets the same
//!   files from our eStargz and zstd:chunked layers as from the originals:
//!   the blobs are plain tar.gz / tar.zst for any reader;
//! * the reference Go Stargz Snapshotter (built from Debian's sources by
//!   `../shared/peer-stargz/build.sh`) mounts our layers lazily through
//!   FUSE — `ctr-remote image rpull` fetches no layer blob — and a container
//!   reads the same bytes.
//!
//! Every daemon runs privately in a temporary directory and is stopped, with
//! its mounts, when the test ends (testkit guards).

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use stargaze_format::Digest;
use stargaze_testkit::{Containerd, PeerStargz, Registry, image, require, run};

fn convert(src: &Path, dst: &Path, tag: &str, format: &str) {
    let o = Command::new(env!("CARGO_BIN_EXE_stargaze"))
        .args(["convert", "--format", format, "--chunk-size", "256KiB"])
        .arg(format!("oci:{}:src", src.display()))
        .arg(format!("oci:{}:{tag}", dst.display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `sha256sum` lines the container must print for the data layer.
fn expected_sums(files: &[(String, Vec<u8>)]) -> Vec<String> {
    files
        .iter()
        .map(|(name, data)| format!("{}  /{name}", Digest::of(data).hex()))
        .collect()
}

// busybox sh runs applets without exec, so test the path, not the command.
// The final sleep: ctr can lose the last lines of a task that exits at once
// (seen once in CI: the output stopped before the symlink's checksum).
const CHECK: &str = "sha256sum /data/file*; [ -e /bin/wc ] && echo has-wc || echo no-wc; ls /data/hardlink; cat /data/symlink | sha256sum; sleep 0.2";

fn check_output(out: &[u8], files: &[(String, Vec<u8>)]) {
    let text = String::from_utf8_lossy(out);
    for line in expected_sums(files) {
        assert!(text.contains(&line), "missing {line:?} in:\n{text}");
    }
    // /bin/wc was deleted by a whiteout in the data layer.
    assert!(
        text.contains("no-wc"),
        "the whiteout must hide /bin/wc:\n{text}"
    );
    assert!(text.contains("/data/hardlink"), "{text}");
    // The symlink points at file5.
    let file5 = Digest::of(&files.iter().find(|(n, _)| n == "data/file5").unwrap().1).hex();
    assert!(
        text.contains(&format!("{file5}  -")),
        "symlink content:\n{text}"
    );
}

/// Tag the image for `ctr image import` (it reads io.containerd.image.name).
fn name_for_import(layout: &Path, tag: &str, name: &str) {
    let path = layout.join("index.json");
    let mut index: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for m in index["manifests"].as_array_mut().unwrap() {
        if m["annotations"]["org.opencontainers.image.ref.name"] == tag {
            m["annotations"]["io.containerd.image.name"] = name.into();
        }
    }
    std::fs::write(&path, serde_json::to_vec(&index).unwrap()).unwrap();
}

#[test]
fn containerd_unpacks_converted_layers_like_any_other() {
    require("runc");
    let ctd = Containerd::start("");
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let (data, files) = image::data_layer(7);
    image::write_layout(
        &src,
        "stargaze.test/unpack:src",
        "src",
        &[image::busybox_layer(), data],
    );
    for format in ["estargz", "zstdchunked"] {
        let out = work.path().join(format);
        convert(&src, &out, "t", format);
        let name = format!("stargaze.test/unpack:{format}");
        name_for_import(&out, "t", &name);
        // Only this image in the archive.
        let single = work.path().join(format!("{format}-single"));
        std::fs::create_dir_all(&single).unwrap();
        let archive = work.path().join(format!("{format}.tar"));
        image::layout_tar(&out, &archive);
        ctd.ctr(&["image", "import", archive.to_str().unwrap()]);
        let id = format!("sg-unpack-{format}-{}", std::process::id());
        let o = ctd.ctr(&["run", "--rm", &name, &id, "/bin/sh", "-c", CHECK]);
        check_output(&o.stdout, &files);
    }
}

#[test]
fn go_stargz_snapshotter_mounts_our_layers_lazily() {
    require("ctr-remote");
    require("skopeo");
    require("runc");
    let registry = Registry::start();
    let peer = PeerStargz::start();
    let ctd = Containerd::start(&peer.proxy_config("stargz"));
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let (data, files) = image::data_layer(11);
    image::write_layout(
        &src,
        "stargaze.test/peer:src",
        "src",
        &[image::busybox_layer(), data],
    );

    for format in ["estargz", "zstdchunked"] {
        let out = work.path().join(format);
        convert(&src, &out, "t", format);
        let reference = format!("{}/stargaze/peer:{format}", registry.addr);
        run(Command::new("skopeo").args([
            "--insecure-policy",
            "copy",
            "--dest-tls-verify=false",
            &format!("oci:{}:t", out.display()),
            &format!("docker://{reference}"),
        ]));
        run(ctd.cmd("ctr-remote").args([
            "image",
            "rpull",
            "--plain-http",
            "--snapshotter",
            "stargz",
            &reference,
        ]));

        // Lazy: the content store holds the manifest and config, no layer.
        let manifest: Value = {
            let index: Value =
                serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
            let d = index["manifests"][0]["digest"]
                .as_str()
                .unwrap()
                .to_string();
            serde_json::from_slice(&std::fs::read(out.join("blobs/sha256").join(&d[7..])).unwrap())
                .unwrap()
        };
        let content = String::from_utf8(ctd.ctr(&["content", "ls", "-q"]).stdout).unwrap();
        for l in manifest["layers"].as_array().unwrap() {
            let d = l["digest"].as_str().unwrap();
            assert!(
                !content.contains(d),
                "{format}: layer {d} was downloaded, not mounted lazily"
            );
        }
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let lazy = mounts
            .lines()
            .filter(|l| l.contains(peer.dir.path().to_str().unwrap()) && l.contains("fuse"))
            .count();
        assert!(
            lazy >= 2,
            "{format}: expected FUSE mounts of both layers:\n{mounts}"
        );

        let id = format!("sg-peer-{format}-{}", std::process::id());
        let o = ctd.ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "stargz",
            &reference,
            &id,
            "/bin/sh",
            "-c",
            CHECK,
        ]);
        check_output(&o.stdout, &files);
        assert!(
            !peer.log().contains("failed to verify"),
            "{format}: the Go snapshotter reported verification failures:\n{}",
            peer.log()
        );
    }
}
