//! `stargaze convert` and `stargaze inspect` end to end on OCI layouts.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use stargaze_format::{
    Digest, OpenOptions, TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION, open_blob,
};
use stargaze_testkit::image;

fn stargaze(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stargaze"))
        .args(args)
        .output()
        .expect("run stargaze")
}

fn ok(args: &[&str]) -> String {
    let out = stargaze(args);
    assert!(
        out.status.success(),
        "stargaze {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(dir: &Path, digest: &str) -> Value {
    serde_json::from_slice(&blob(dir, digest)).unwrap()
}

fn blob(dir: &Path, digest: &str) -> Vec<u8> {
    std::fs::read(dir.join("blobs/sha256").join(&digest[7..])).unwrap()
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

fn decompress(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    if b.starts_with(&[0x1f, 0x8b]) {
        flate2::read::MultiGzDecoder::new(b)
            .read_to_end(&mut out)
            .unwrap();
    } else {
        zstd_decode(b, &mut out);
    }
    out
}

fn zstd_decode(b: &[u8], out: &mut Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("b.zst");
    std::fs::write(&p, b).unwrap();
    let o = Command::new("zstd")
        .arg("-dc")
        .arg(&p)
        .output()
        .expect("zstd is installed by make deps");
    assert!(o.status.success());
    out.extend(o.stdout);
}

fn source_image(dir: &Path) -> Vec<Vec<u8>> {
    let layers = vec![image::busybox_layer(), image::data_layer(1).0];
    image::write_layout(dir, "stargaze.test/cli:src", "src", &layers);
    layers
}

/// Structure checks every converted single-platform image must pass.
fn check_image(
    dir: &Path,
    tag: &str,
    sources: &[Vec<u8>],
    media_type: &str,
    keep_diff_ids: bool,
) -> Value {
    let desc = tagged(dir, tag);
    assert_eq!(
        desc["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let manifest = json(dir, desc["digest"].as_str().unwrap());
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let config = json(dir, manifest["config"]["digest"].as_str().unwrap());
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), sources.len());
    for (i, (l, src)) in layers.iter().zip(sources).enumerate() {
        let d = l["digest"].as_str().unwrap();
        let b = blob(dir, d);
        assert_eq!(l["mediaType"], media_type);
        assert_eq!(Digest::of(&b).to_string(), d, "layer digest");
        assert_eq!(l["size"], b.len() as u64);
        let raw = decompress(&b);
        assert_eq!(
            config["rootfs"]["diff_ids"][i].as_str().unwrap(),
            Digest::of(&raw).to_string(),
            "diff_id {i}"
        );
        if keep_diff_ids {
            assert_eq!(
                raw, *src,
                "layer {i}: --keep-diff-id must keep the tar bytes"
            );
        }
        assert_eq!(
            l["annotations"][UNCOMPRESSED_SIZE_ANNOTATION]
                .as_str()
                .unwrap(),
            raw.len().to_string()
        );
        let toc: Digest = l["annotations"][TOC_DIGEST_ANNOTATION]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        if !keep_diff_ids {
            let layer = open_blob(d, &b[..], &OpenOptions::default()).unwrap();
            assert_eq!(layer.toc_digest, toc);
        }
    }
    manifest
}

#[test]
fn converts_to_estargz_and_inspect_verifies() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let sources = source_image(&src);
    let out = work.path().join("out");
    let src_ref = format!("oci:{}:src", src.display());
    let dst_ref = format!("oci:{}:esgz", out.display());
    ok(&[
        "convert",
        "--format",
        "estargz",
        "--chunk-size",
        "64KiB",
        &src_ref,
        &dst_ref,
    ]);
    let manifest = check_image(
        &out,
        "esgz",
        &sources,
        "application/vnd.oci.image.layer.v1.tar+gzip",
        false,
    );

    // inspect verifies every chunk of every layer.
    let report: Value = serde_json::from_str(&ok(&["inspect", "--json", &dst_ref])).unwrap();
    let report = report.as_array().unwrap();
    assert_eq!(report.len(), 2);
    for r in report {
        assert_eq!(r["lazy"], true);
        assert_eq!(r["annotation_matches"], true);
        assert_eq!(r["errors"].as_array().unwrap().len(), 0);
        assert!(r["verified_files"].as_u64().unwrap() >= 1);
    }
    // A single blob too.
    let layer = manifest["layers"][1]["digest"].as_str().unwrap();
    let text = ok(&[
        "inspect",
        "--list",
        out.join("blobs/sha256").join(&layer[7..]).to_str().unwrap(),
    ]);
    assert!(
        text.contains("data/file7") && text.contains("verified"),
        "{text}"
    );

    // Converting the converted image again keeps every layer.
    let again = format!("oci:{}:again", out.display());
    ok(&["convert", &dst_ref, &again]);
    let m2 = json(&out, tagged(&out, "again")["digest"].as_str().unwrap());
    assert_eq!(m2["layers"], manifest["layers"]);
    assert_eq!(m2["config"], manifest["config"]);
}

#[test]
fn converts_to_zstd_chunked() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let sources = source_image(&src);
    let dst = format!("oci:{}:zc", src.display()); // same layout as the source
    ok(&[
        "convert",
        "--zstdchunked",
        "--oci",
        &format!("oci:{}:src", src.display()),
        &dst,
    ]);
    let m = check_image(
        &src,
        "zc",
        &sources,
        "application/vnd.oci.image.layer.v1.tar+zstd",
        false,
    );
    for l in m["layers"].as_array().unwrap() {
        let a = &l["annotations"];
        assert!(a["io.containers.zstd-chunked.manifest-checksum"].is_string());
        assert!(a["io.containers.zstd-chunked.manifest-position"].is_string());
    }
    assert!(
        tagged(&src, "src")["digest"].is_string(),
        "the source tag is kept"
    );
    ok(&["inspect", &dst]);
}

#[test]
fn external_toc_keeps_diff_ids_and_writes_the_toc_image() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let sources = source_image(&src);
    let src_manifest = json(&src, tagged(&src, "src")["digest"].as_str().unwrap());
    let src_config = json(&src, src_manifest["config"]["digest"].as_str().unwrap());
    let out = work.path().join("out");
    let dst_ref = format!("oci:{}:ext", out.display());
    ok(&[
        "convert",
        "--external-toc",
        "--keep-diff-id",
        &format!("oci:{}:src", src.display()),
        &dst_ref,
    ]);
    let m = check_image(
        &out,
        "ext",
        &sources,
        "application/vnd.oci.image.layer.v1.tar+gzip",
        true,
    );
    let config = json(&out, m["config"]["digest"].as_str().unwrap());
    assert_eq!(config["rootfs"], src_config["rootfs"], "diffIDs unchanged");

    let toc_image = json(
        &out,
        tagged(&out, "ext-esgztoc")["digest"].as_str().unwrap(),
    );
    let toc_layers = toc_image["layers"].as_array().unwrap();
    assert_eq!(toc_layers.len(), 2);
    for (toc_layer, layer) in toc_layers.iter().zip(m["layers"].as_array().unwrap()) {
        assert_eq!(
            toc_layer["annotations"]["containerd.io/snapshot/stargz/layer.digest"],
            layer["digest"]
        );
        // The TOC blob is what the layer's toc.digest verifies.
        let toc_blob = blob(&out, toc_layer["digest"].as_str().unwrap());
        let d = layer["digest"].as_str().unwrap();
        let opened = open_blob(
            d,
            &blob(&out, d)[..],
            &OpenOptions {
                external_toc: Some(toc_blob),
                expected_toc_digest: Some(
                    layer["annotations"][TOC_DIGEST_ANNOTATION]
                        .as_str()
                        .unwrap()
                        .parse()
                        .unwrap(),
                ),
                ..Default::default()
            },
        );
        assert!(opened.is_ok(), "{:?}", opened.err());
    }
    // inspect finds the TOCs in the -esgztoc image.
    ok(&["inspect", &dst_ref]);
}

#[test]
fn multi_platform_indexes_are_kept_and_shared_layers_converted_once() {
    let work = tempfile::tempdir().unwrap();
    let one = work.path().join("one");
    let layers = vec![image::busybox_layer(), image::data_layer(3).0];
    image::write_layout(&one, "x", "amd64", &layers);
    // Build an index of two platform manifests sharing the layers.
    let m = tagged(&one, "amd64");
    let manifest = json(&one, m["digest"].as_str().unwrap());
    let mut config = json(&one, manifest["config"]["digest"].as_str().unwrap());
    config["architecture"] = "arm64".into();
    let cbytes = serde_json::to_vec(&config).unwrap();
    let cdig = Digest::of(&cbytes).to_string();
    std::fs::write(one.join("blobs/sha256").join(&cdig[7..]), &cbytes).unwrap();
    let mut arm = manifest.clone();
    arm["config"]["digest"] = cdig.clone().into();
    arm["config"]["size"] = cbytes.len().into();
    let abytes = serde_json::to_vec(&arm).unwrap();
    let adig = Digest::of(&abytes).to_string();
    std::fs::write(one.join("blobs/sha256").join(&adig[7..]), &abytes).unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "annotations": {"keep": "me"},
        "manifests": [
            {"mediaType": m["mediaType"], "digest": m["digest"], "size": m["size"],
             "platform": {"architecture": "amd64", "os": "linux"}},
            {"mediaType": m["mediaType"], "digest": adig, "size": abytes.len(),
             "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}},
        ],
    });
    let ibytes = serde_json::to_vec(&index).unwrap();
    let idig = Digest::of(&ibytes).to_string();
    std::fs::write(one.join("blobs/sha256").join(&idig[7..]), &ibytes).unwrap();
    std::fs::write(
        one.join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": idig, "size": ibytes.len(),
             "annotations": {"org.opencontainers.image.ref.name": "multi"}}]}))
        .unwrap(),
    )
    .unwrap();

    let out = work.path().join("out");
    let o = stargaze(&[
        "convert",
        &format!("oci:{}:multi", one.display()),
        &format!("oci:{}:multi", out.display()),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        stderr.matches("converting ").count(),
        2,
        "each distinct layer once:\n{stderr}"
    );
    let top = tagged(&out, "multi");
    assert_eq!(top["mediaType"], "application/vnd.oci.image.index.v1+json");
    let idx = json(&out, top["digest"].as_str().unwrap());
    assert_eq!(idx["annotations"]["keep"], "me");
    let entries = idx["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[1]["platform"]["variant"], "v8");
    let a = json(&out, entries[0]["digest"].as_str().unwrap());
    let b = json(&out, entries[1]["digest"].as_str().unwrap());
    assert_eq!(a["layers"], b["layers"]);
    assert_ne!(a["config"]["digest"], b["config"]["digest"]);
    ok(&["inspect", &format!("oci:{}:multi", out.display())]);
}

#[test]
fn errors_name_the_image_layer_and_what_to_do() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    source_image(&src);
    let out = work.path().join("out");
    let o = stargaze(&[
        "convert",
        &format!("oci:{}:nope", src.display()),
        &format!("oci:{}:x", out.display()),
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(e.contains("nope") && e.contains("src"), "missing tag: {e}");

    // A registry image that is not there: the image, the registry's answer.
    let reg = stargaze_testkit::Registry::start();
    let missing = format!("docker://{}/app:1", reg.addr);
    let o = stargaze(&["convert", &missing, &format!("oci:{}:x", out.display())]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains(&missing) && e.contains("HTTP 404"),
        "{e}"
    );

    // Corrupt a layer blob: the error names it.
    let m = json(&src, tagged(&src, "src")["digest"].as_str().unwrap());
    let layer = m["layers"][1]["digest"].as_str().unwrap().to_string();
    let p = src.join("blobs/sha256").join(&layer[7..]);
    let mut b = std::fs::read(&p).unwrap();
    let n = b.len();
    b[n / 2] ^= 0xff;
    std::fs::write(&p, b).unwrap();
    let o = stargaze(&[
        "convert",
        &format!("oci:{}:src", src.display()),
        &format!("oci:{}:x", out.display()),
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains(&layer),
        "corrupt layer: {e}"
    );

    // inspect of something that is not lazily pullable says so.
    let plain = work.path().join("plain.tar.gz");
    std::fs::write(&plain, image::gzip(&image::data_layer(2).0)).unwrap();
    let o = stargaze(&["inspect", plain.to_str().unwrap()]);
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(t.contains("not lazily pullable"), "{t}");
}

#[test]
fn prioritized_files_get_a_prefetch_landmark() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    source_image(&src);
    let list = work.path().join("prio.txt");
    std::fs::write(
        &list,
        "# read at start\n/bin/busybox\n/etc/passwd\n/not/there\n",
    )
    .unwrap();
    let out = work.path().join("out");
    let o = stargaze(&[
        "convert",
        "--prioritized-files",
        list.to_str().unwrap(),
        &format!("oci:{}:src", src.display()),
        &format!("oci:{}:opt", out.display()),
    ]);
    assert!(o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("/not/there"),
        "missing prioritized files are reported: {e}"
    );
    let report: Value = serde_json::from_str(&ok(&[
        "inspect",
        "--json",
        &format!("oci:{}:opt", out.display()),
    ]))
    .unwrap();
    assert!(
        report[0]["prefetch"]
            .as_str()
            .unwrap()
            .contains(".prefetch.landmark")
    );
}

#[test]
fn skopeo_accepts_the_output() {
    stargaze_testkit::require("skopeo");
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    source_image(&src);
    let out = work.path().join("out");
    ok(&[
        "convert",
        &format!("oci:{}:src", src.display()),
        &format!("oci:{}:esgz", out.display()),
    ]);
    let copy = work.path().join("copy");
    stargaze_testkit::run(Command::new("skopeo").args([
        "--insecure-policy",
        "copy",
        &format!("oci:{}:esgz", out.display()),
        &format!("oci:{}:esgz", copy.display()),
    ]));
    // skopeo keeps eStargz layers and their annotations byte for byte.
    let a = json(&out, tagged(&out, "esgz")["digest"].as_str().unwrap());
    let b = json(&copy, tagged(&copy, "esgz")["digest"].as_str().unwrap());
    assert_eq!(a["layers"], b["layers"]);
    ok(&["inspect", &format!("oci:{}:esgz", copy.display())]);
}
