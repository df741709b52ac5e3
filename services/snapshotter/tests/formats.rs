//! Layer formats other than our eStargz, end to end with the real
//! components (Debian's containerd 1.6 and runc, docker-registry, our three
//! services): legacy stargz as the CRFS writer wrote it (no `toc.digest`,
//! files of several chunks without `chunkDigest`), mounted lazily only where
//! the operator allowed unverified layers.
//!
//! Needs root, /dev/fuse, Go and the Debian packages `make deps` installs.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use stargaze_format::tar::{TarKind, TarReader};
use stargaze_format::tree::normalize_path;
use stargaze_testkit::stack::{Service, Stack};
use stargaze_testkit::{Containerd, Registry, go_build, image, require, run};

mod common;

use common::{layer_digests, skopeo_copy};

fn sha256(bytes: &[u8]) -> String {
    stargaze_format::Digest::of(bytes).to_string()
}

/// An OCI layout at `dir` (tag `tag`) of the given layer blobs, each with
/// its media type, diffID and annotations.
fn write_layout(dir: &Path, tag: &str, layers: &[(Vec<u8>, &str, String, serde_json::Value)]) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let put = |bytes: &[u8]| {
        let d = sha256(bytes);
        std::fs::write(blobs.join(&d[7..]), bytes).unwrap();
        d
    };
    let descs: Vec<serde_json::Value> = layers
        .iter()
        .map(|(blob, media_type, _, annotations)| {
            serde_json::json!({
                "mediaType": media_type,
                "digest": put(blob),
                "size": blob.len(),
                "annotations": annotations,
            })
        })
        .collect();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Env": ["PATH=/bin"], "Cmd": ["/bin/sh"] },
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|l| l.2.clone()).collect::<Vec<_>>(),
        },
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": put(&config),
            "size": config.len(),
        },
        "layers": descs,
    }))
    .unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": put(&manifest),
            "size": manifest.len(),
            "annotations": { "org.opencontainers.image.ref.name": tag },
        }],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

/// Every regular file of a tar, by normalised path (the last entry of a
/// name wins, as in an unpack).
fn regular_files(tar: &[u8]) -> BTreeMap<String, Vec<u8>> {
    TarReader::new(tar)
        .map(|e| e.unwrap())
        .filter(|e| e.kind == TarKind::Regular && !e.name.contains(".wh."))
        .map(|e| {
            (
                normalize_path(&e.name).unwrap(),
                tar[e.data_offset as usize..(e.data_offset + e.size) as usize].to_vec(),
            )
        })
        .collect()
}

/// Every regular file of `tar` read through the layer's directory in the
/// fs mount equals the tar's bytes; returns how many were compared.
fn assert_layer_reads_like_the_tar(stack: &Stack, layer: &str, tar: &[u8]) -> usize {
    let dir = stack.mountpoint.join(&layer[7..]);
    assert!(
        dir.is_dir(),
        "layer {layer} is not attached in the fs mount"
    );
    let files = regular_files(tar);
    for (path, bytes) in &files {
        let got = std::fs::read(dir.join(path))
            .unwrap_or_else(|e| panic!("{path} of layer {layer} through the fs mount: {e}"));
        assert!(
            got == *bytes,
            "{path} of layer {layer}: the lazily read bytes differ from the tar's"
        );
    }
    files.len()
}

fn pull(ctd: &Containerd, reference: &str, extra: &[&str]) {
    run(ctd
        .cmd("ctr-remote")
        .args([
            "image",
            "rpull",
            "--plain-http",
            "--snapshotter",
            "stargaze",
        ])
        .args(extra)
        .arg(reference));
}

fn content(ctd: &Containerd) -> String {
    String::from_utf8(ctd.ctr(&["content", "ls", "-q"]).stdout).unwrap()
}

/// Legacy stargz layers written as the CRFS writer wrote them
/// (`tests/go/crfs-build`: the stargz writer with CRFS's TOC and 47-byte
/// footer), 256 KiB chunks so that busybox and the data layer's large files
/// span many members without a `chunkDigest`. With `allow_no_verification`
/// but without the skipverify label the layers are refused with a reason
/// and unpacked; with the label (`ctr-remote image rpull
/// --skip-content-verify`) they are mounted lazily, and every file read
/// through the mount equals the tar's.
#[test]
fn legacy_stargz_mounts_lazily_only_where_unverified_layers_are_allowed() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: lazy pulling needs FUSE (run the tests as root on a host with fuse)"
    );
    for tool in ["runc", "ctr-remote", "skopeo"] {
        require(tool);
    }
    let crfs_build = go_build("crfs-build");
    let work = tempfile::Builder::new()
        .prefix("sg-legacy-")
        .tempdir_in("/tmp")
        .unwrap();
    let w = work.path();
    let registry = Registry::start();
    let reference = format!("{}/stargaze/legacy:sgz", registry.addr);
    let tars = [image::busybox_layer(), image::data_layer(61).0];
    let mut layers = Vec::new();
    for (i, tar) in tars.iter().enumerate() {
        let (tar_path, blob_path) = (w.join(format!("{i}.tar")), w.join(format!("{i}.sgz")));
        std::fs::write(&tar_path, tar).unwrap();
        let out = run(Command::new(&crfs_build)
            .arg(&tar_path)
            .arg(&blob_path)
            .arg("262144"));
        let printed = String::from_utf8(out.stdout).unwrap();
        let diff_id = printed.lines().nth(1).expect("diffID").to_string();
        let blob = std::fs::read(&blob_path).unwrap();
        // What CRFS wrote: the 47-byte footer, a TOC without chunk digests.
        let size = blob.len() as u64;
        let footer = stargaze_format::parse_footer(&blob[blob.len() - 47..], size).unwrap();
        assert_eq!(footer.format(), stargaze_format::LayerFormat::LegacyStargz);
        let range = footer.toc_range(size).unwrap();
        let json = stargaze_format::reader::decode_toc(
            &footer,
            &blob[range.start as usize..range.end as usize],
            1 << 30,
        )
        .unwrap();
        let json = String::from_utf8_lossy(&json);
        assert!(json.contains("\"chunk\"") && !json.contains("chunkDigest"));
        layers.push((
            blob,
            "application/vnd.oci.image.layer.v1.tar+gzip",
            diff_id,
            serde_json::json!({}),
        ));
    }
    let layout = w.join("layout");
    write_layout(&layout, "sgz", &layers);
    skopeo_copy(
        &format!("oci:{}:sgz", layout.display()),
        &format!("docker://{reference}"),
    );

    let stack = Stack::start(w, &[("snapshotter", "allow_no_verification = true")]);
    let ctd = Containerd::start(&stack.proxy_config("stargaze"));

    // No skipverify label: refused with the reason, unpacked by containerd.
    pull(&ctd, &reference, &[]);
    let digests = layer_digests(&ctd, &reference);
    assert_eq!(digests.len(), 2);
    let log = stack.log(Service::Snapshotter);
    for d in &digests {
        assert!(content(&ctd).contains(d.as_str()), "{d} was not downloaded");
        let reason = log
            .lines()
            .find(|l| l.contains("cannot be pulled lazily") && l.contains(d.as_str()))
            .unwrap_or_else(|| panic!("no fallback reason logged for {d}:\n{log}"));
        for part in ["toc.digest", "allow_no_verification", "skipverify"] {
            assert!(reason.contains(part), "{part} not in: {reason}");
        }
    }
    assert!(!log.contains("remote_snapshot_prepared=true"), "{log}");
    ctd.ctr(&["image", "rm", "--sync", &reference]);

    // With the label: both layers mounted lazily, every file as in the tar.
    pull(&ctd, &reference, &["--skip-content-verify"]);
    let log = stack.log(Service::Snapshotter);
    assert_eq!(
        log.matches("remote_snapshot_prepared=true").count(),
        2,
        "both legacy layers are remote snapshots:\n{log}\n{}",
        stack.log(Service::Fetcher)
    );
    let blobs = content(&ctd);
    let mut compared = 0;
    for (d, tar) in digests.iter().zip(&tars) {
        assert!(!blobs.contains(d.as_str()), "{d} was downloaded");
        compared += assert_layer_reads_like_the_tar(&stack, d, tar);
    }
    assert!(compared > 8, "only {compared} files compared");
    // And a container runs on them: busybox itself spans many members.
    let (name, bytes) = image::data_layer(61)
        .1
        .into_iter()
        .max_by_key(|(_, b)| b.len())
        .unwrap();
    let o = ctd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "stargaze",
        &reference,
        &format!("sg-legacy-{}", std::process::id()),
        "/bin/sh",
        "-c",
        &format!("busybox sha256sum /{name}"),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("{}  /{name}", &sha256(&bytes)[7..])
    );
    drop(ctd);
    drop(stack);
}
