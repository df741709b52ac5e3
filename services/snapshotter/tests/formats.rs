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
use stargaze_testkit::{Containerd, go_build, image, run};

mod common;

use common::{
    Node, Setup, content_blobs, ctr_remote_rpull, ctr_remote_rpull_with, layer_digests,
    sh_in_container, skopeo_copy,
};

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

/// No layer of `digests` was downloaded, and each reads through the fs
/// mount like its tar of `tars` (more than 8 files compared in all).
fn assert_layers_lazy_and_read_like_the_tars(
    ctd: &Containerd,
    stack: &Stack,
    digests: &[String],
    tars: &[Vec<u8>],
) {
    let blobs = content_blobs(ctd);
    let mut compared = 0;
    for (d, tar) in digests.iter().zip(tars) {
        assert!(!blobs.contains(d.as_str()), "{d} was downloaded");
        compared += assert_layer_reads_like_the_tar(stack, d, tar);
    }
    assert!(compared > 8, "only {compared} files compared");
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
    let setup = Setup::new("sg-legacy-", &["runc", "ctr-remote", "skopeo"]);
    let crfs_build = go_build("crfs-build");
    let w = setup.dir();
    let reference = format!("{}/stargaze/legacy:sgz", setup.registry.addr);
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

    let Node { ctd, stack } = Node::on(Stack::start(
        w,
        &[("snapshotter", "allow_no_verification = true")],
    ));

    // No skipverify label: refused with the reason, unpacked by containerd.
    ctr_remote_rpull(&ctd, &reference);
    let digests = layer_digests(&ctd, &reference);
    assert_eq!(digests.len(), 2);
    let log = stack.log(Service::Snapshotter);
    for d in &digests {
        assert!(
            content_blobs(&ctd).contains(d.as_str()),
            "{d} was not downloaded"
        );
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
    ctr_remote_rpull_with(&ctd, &["--skip-content-verify"], &reference);
    let log = stack.log(Service::Snapshotter);
    assert_eq!(
        log.matches("remote_snapshot_prepared=true").count(),
        2,
        "both legacy layers are remote snapshots:\n{log}\n{}",
        stack.log(Service::Fetcher)
    );
    assert_layers_lazy_and_read_like_the_tars(&ctd, &stack, &digests, &tars);
    // And a container runs on them: busybox itself spans many members.
    let (name, bytes) = image::data_layer(61)
        .1
        .into_iter()
        .max_by_key(|(_, b)| b.len())
        .unwrap();
    let o = sh_in_container(
        &ctd,
        &reference,
        "sg-legacy",
        &format!("busybox sha256sum /{name}"),
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("{}  /{name}", &sha256(&bytes)[7..])
    );
    drop(ctd);
    drop(stack);
}

/// zstd:chunked as skopeo writes it (containers/storage's writer; Debian's
/// skopeo 1.9 writes the 40-byte `GnUlInUx` footer and the
/// `io.containers.zstd-chunked.*` annotations), with no `toc.digest`: the
/// layers are checked against the manifest's `manifest-checksum` (which
/// containerd does not pass as a label, so the fetcher reads the manifest)
/// and mounted lazily; every file read through the mount equals the tar's.
/// A manifest whose checksum for the data layer is wrong falls back, on a
/// cold node and with the layer already resolved for the right manifest.
#[test]
fn zstd_chunked_written_by_skopeo_mounts_lazily_checked_by_its_manifest_checksum() {
    let setup = Setup::new("sg-zstd-", &["runc", "ctr-remote", "skopeo"]);
    let w = setup.dir();
    let repo = format!("{}/stargaze/zstd", setup.registry.addr);
    let (data, files) = image::data_layer(71);
    let tars = [image::busybox_layer(), data];
    let src = w.join("src");
    image::write_layout(&src, "stargaze.test/zstd:src", "src", &tars);
    let zc = w.join("zc");
    run(Command::new("skopeo")
        .args([
            "--insecure-policy",
            "copy",
            "--dest-compress-format",
            "zstd:chunked",
        ])
        .arg(format!("oci:{}:src", src.display()))
        .arg(format!("oci:{}:good", zc.display())));
    // The bad manifest: the data layer's checksum is the base layer's.
    let layout = stargaze_oci::OciLayout::open(&zc).unwrap();
    let good = layout
        .read_json(&layout.resolve(Some("good")).unwrap().digest)
        .unwrap();
    let checksum_key = [
        "io.github.containers.zstd-chunked.manifest-checksum",
        "io.containers.zstd-chunked.manifest-checksum",
    ]
    .into_iter()
    .find(|k| good["layers"][1]["annotations"][k].is_string())
    .expect("skopeo annotates the manifest checksum");
    let checksum = |i: usize| {
        good["layers"][i]["annotations"][checksum_key]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(
        good["layers"][1]["annotations"][stargaze_format::TOC_DIGEST_ANNOTATION].is_null(),
        "skopeo's layers carry no toc.digest"
    );
    let mut bad = good.clone();
    bad["layers"][1]["annotations"][checksum_key] = checksum(0).into();
    let (digest, size) = layout.write_json(&bad).unwrap();
    layout
        .set_tag(
            "bad",
            stargaze_oci::Descriptor {
                media_type: bad["mediaType"].as_str().unwrap().into(),
                digest,
                size,
                annotations: Default::default(),
                extra: Default::default(),
            },
        )
        .unwrap();
    for tag in ["good", "bad"] {
        skopeo_copy(
            &format!("oci:{}:{tag}", zc.display()),
            &format!("docker://{repo}:{tag}"),
        );
    }
    let (image_good, image_bad) = (format!("{repo}:good"), format!("{repo}:bad"));
    let data_layer = good["layers"][1]["digest"].as_str().unwrap().to_string();

    let Node { ctd, stack } = Node::start(w);
    let fallbacks = |stack: &Stack| {
        stack
            .log(Service::Snapshotter)
            .lines()
            .filter(|l| l.contains("remote_snapshot_prepared=false") && l.contains(&data_layer))
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let lazy_count = |stack: &Stack| {
        stack
            .log(Service::Snapshotter)
            .matches("remote_snapshot_prepared=true")
            .count()
    };

    // The bad manifest on a cold node: the data layer falls back, naming
    // the annotated and the real checksum.
    ctr_remote_rpull(&ctd, &image_bad);
    assert!(
        content_blobs(&ctd).contains(&data_layer),
        "the bad manifest's data layer was mounted lazily"
    );
    let reasons = fallbacks(&stack);
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    for part in [checksum(0), checksum(1)] {
        assert!(reasons[0].contains(&part), "{part} not in: {}", reasons[0]);
    }
    ctd.ctr(&["image", "rm", "--sync", &image_bad]);

    // The right manifest: both layers lazily, every file as in the tar.
    let before = lazy_count(&stack);
    ctr_remote_rpull(&ctd, &image_good);
    assert_eq!(
        lazy_count(&stack) - before,
        2,
        "both zstd:chunked layers are remote snapshots:\n{}\n{}",
        stack.log(Service::Snapshotter),
        stack.log(Service::Fetcher)
    );
    let digests = layer_digests(&ctd, &image_good);
    assert_layers_lazy_and_read_like_the_tars(&ctd, &stack, &digests, &tars);
    let (name, bytes) = files.iter().max_by_key(|(_, b)| b.len()).unwrap();
    let o = sh_in_container(
        &ctd,
        &image_good,
        "sg-zstd",
        &format!("busybox sha256sum /{name}"),
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("{}  /{name}", &sha256(bytes)[7..])
    );

    // The bad manifest again, now that the layer is resolved for the good
    // one (whose snapshots are removed, so containerd prepares them anew).
    ctd.ctr(&["image", "rm", "--sync", &image_good]);
    let before = lazy_count(&stack);
    ctr_remote_rpull(&ctd, &image_bad);
    assert!(
        content_blobs(&ctd).contains(&data_layer),
        "the bad manifest's data layer was mounted lazily once resolved for the good one"
    );
    assert_eq!(fallbacks(&stack).len(), 2, "{:?}", fallbacks(&stack));
    assert_eq!(
        lazy_count(&stack) - before,
        1,
        "only the base layer is lazy"
    );
    ctd.ctr(&["image", "rm", "--sync", &image_bad]);

    // The same data layer with the 64-byte footer and `io.github.*`
    // annotations of current containers/storage (which Debian's skopeo
    // does not write yet): mounted lazily, checked by its checksum.
    let image_v2 = format!("{repo}:v2");
    let v2_layer = push_with_64_byte_footer(&layout, &good, &zc, &image_v2);
    let before = lazy_count(&stack);
    ctr_remote_rpull(&ctd, &image_v2);
    assert_eq!(
        lazy_count(&stack) - before,
        2,
        "the 64-byte footer layer is a remote snapshot:\n{}",
        stack.log(Service::Snapshotter)
    );
    assert!(
        !content_blobs(&ctd).contains(&v2_layer),
        "{v2_layer} was downloaded"
    );
    assert!(assert_layer_reads_like_the_tar(&stack, &v2_layer, &tars[1]) > 4);
    drop(ctd);
    drop(stack);
}

/// Push `good` with its data layer rewritten as current containers/storage
/// writes zstd:chunked: the payload and TOC frame unchanged, then a
/// skippable frame for the tar-split data and the 64-byte `GNUlInUx`
/// footer, annotated with `io.github.containers.zstd-chunked.*`. Returns
/// the new layer's digest.
fn push_with_64_byte_footer(
    layout: &stargaze_oci::OciLayout,
    good: &serde_json::Value,
    dir: &Path,
    reference: &str,
) -> String {
    use stargaze_format::Footer;
    use stargaze_format::footer::skippable_header;
    let blob = layout
        .read_blob(good["layers"][1]["digest"].as_str().unwrap())
        .unwrap();
    let size = blob.len() as u64;
    let footer = stargaze_format::parse_footer(&blob[blob.len() - 72..], size).unwrap();
    let Footer::ZstdChunked {
        toc_offset,
        toc_compressed_len,
        toc_uncompressed_len,
    } = footer
    else {
        panic!("skopeo wrote {footer:?}, not the 40-byte footer");
    };
    let mut v2 = blob[..(size - footer.size()) as usize].to_vec();
    // The tar-split frame's content is opaque to a lazy reader.
    let tar_split = b"tar-split data".to_vec();
    v2.extend(skippable_header(tar_split.len()));
    let tar_split_offset = v2.len() as u64;
    v2.extend(&tar_split);
    v2.extend(
        Footer::ZstdChunkedV2 {
            toc_offset,
            toc_compressed_len,
            toc_uncompressed_len,
            tar_split_offset,
            tar_split_compressed_len: tar_split.len() as u64,
            tar_split_uncompressed_len: tar_split.len() as u64,
        }
        .encode(),
    );
    let (digest, blob_size) = layout.write_blob(&v2).unwrap();
    let old = &good["layers"][1]["annotations"];
    let checksum = old["io.github.containers.zstd-chunked.manifest-checksum"]
        .as_str()
        .or(old["io.containers.zstd-chunked.manifest-checksum"].as_str())
        .unwrap();
    let mut manifest = good.clone();
    manifest["layers"][1]["digest"] = digest.clone().into();
    manifest["layers"][1]["size"] = blob_size.into();
    manifest["layers"][1]["annotations"] = serde_json::json!({
        "io.github.containers.zstd-chunked.manifest-checksum": checksum,
        "io.github.containers.zstd-chunked.manifest-position":
            format!("{toc_offset}:{toc_compressed_len}:{toc_uncompressed_len}:1"),
    });
    let (m, n) = layout.write_json(&manifest).unwrap();
    layout
        .set_tag(
            "v2",
            stargaze_oci::Descriptor {
                media_type: manifest["mediaType"].as_str().unwrap().into(),
                digest: m,
                size: n,
                annotations: Default::default(),
                extra: Default::default(),
            },
        )
        .unwrap();
    skopeo_copy(
        &format!("oci:{}:v2", dir.display()),
        &format!("docker://{reference}"),
    );
    digest
}
