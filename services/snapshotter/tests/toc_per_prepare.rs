//! The `toc.digest` label of every `Prepare` is checked, not only that of
//! the first `Prepare` that resolved a layer: with the real components
//! (Debian's containerd 1.6 and runc, docker-registry, our three services),
//! image A is pulled lazily and runs; then manifest B names A's data layer
//! blob with another `toc.digest` (the TOC digest of A's other layer).
//! B's `Prepare` of that layer falls back to containerd's unpack with the
//! reason logged, as on a node that never saw the layer, and containers of
//! A keep reading A's bytes.
//!
//! Needs root, /dev/fuse and the Debian packages `make deps` installs.

use stargaze_format::{Digest, TOC_DIGEST_ANNOTATION};
use stargaze_oci::{Descriptor, OciLayout};
use stargaze_testkit::image;
use stargaze_testkit::stack::Service;

mod common;

use common::{
    Node, Setup, content_blobs, ctr_remote_rpull, layer_digests, sh_in_container, skopeo_copy,
};

/// Write manifest B into `layout` under `tag`: only the data layer of the
/// image tagged `from`, its `toc.digest` annotation replaced by `toc`.
fn retag_with_other_toc(layout: &OciLayout, from: &str, tag: &str, toc: &str) {
    let a = layout
        .read_json(&layout.resolve(Some(from)).unwrap().digest)
        .unwrap();
    let a_config = layout
        .read_json(a["config"]["digest"].as_str().unwrap())
        .unwrap();
    let mut config = a_config.clone();
    config["rootfs"]["diff_ids"] = serde_json::json!([a_config["rootfs"]["diff_ids"][1]]);
    let (config_digest, config_size) = layout.write_json(&config).unwrap();
    let mut layer = a["layers"][1].clone();
    layer["annotations"][TOC_DIGEST_ANNOTATION] = toc.into();
    let mut b = a.clone();
    b["config"]["digest"] = config_digest.into();
    b["config"]["size"] = config_size.into();
    b["layers"] = serde_json::json!([layer]);
    let (digest, size) = layout.write_json(&b).unwrap();
    layout
        .set_tag(
            tag,
            Descriptor {
                media_type: b["mediaType"].as_str().unwrap().into(),
                digest,
                size,
                annotations: Default::default(),
                extra: Default::default(),
            },
        )
        .unwrap();
}

#[test]
fn a_manifest_naming_a_resolved_layer_with_another_toc_digest_falls_back() {
    let setup = Setup::new("sg-tocs-", &["runc", "ctr-remote", "skopeo"]);
    let (data, files) = image::data_layer(33);
    let image_a = setup.push_esgz_image("tocs", &[image::busybox_layer(), data]);
    let out = setup.dir().join("out");
    let layout = OciLayout::open(&out).unwrap();
    let a = layout
        .read_json(&layout.resolve(Some("esgz")).unwrap().digest)
        .unwrap();
    let toc_of = |i: usize| {
        a["layers"][i]["annotations"][TOC_DIGEST_ANNOTATION]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (base_toc, data_toc) = (toc_of(0), toc_of(1));
    let data_layer = a["layers"][1]["digest"].as_str().unwrap().to_string();
    retag_with_other_toc(&layout, "esgz", "b", &base_toc);
    let image_b = format!("{}/stargaze/tocs:b", setup.registry.addr);
    skopeo_copy(
        &format!("oci:{}:b", out.display()),
        &format!("docker://{image_b}"),
    );

    let Node { ctd, stack } = Node::start(setup.dir());
    let (name, bytes) = files
        .iter()
        .find(|(_, b)| b.len() > 100_000)
        .expect("a large file");
    let want = format!("{}  /{name}", Digest::of(bytes).hex());
    let read_in_a = |id: &str| {
        let o = sh_in_container(
            &ctd,
            &image_a,
            &format!("sg-tocs-{id}"),
            &format!("busybox sha256sum /{name}"),
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };

    // Image A: both layers lazily mounted, its container reads A's bytes.
    ctr_remote_rpull(&ctd, &image_a);
    for d in layer_digests(&ctd, &image_a) {
        assert!(
            !content_blobs(&ctd).contains(&d),
            "layer {d} of A was not mounted lazily"
        );
    }
    assert_eq!(read_in_a("before"), want);

    // Image B names the same blob with another TOC digest: its Prepare
    // falls back, so containerd downloads and unpacks the layer.
    ctr_remote_rpull(&ctd, &image_b);
    assert_eq!(
        layer_digests(&ctd, &image_b),
        std::slice::from_ref(&data_layer)
    );
    let log = stack.log(Service::Snapshotter);
    assert!(
        content_blobs(&ctd).contains(&data_layer),
        "B's layer {data_layer} was mounted lazily although B's toc.digest ({base_toc}) is not its TOC ({data_toc}):\n{log}"
    );
    let reason = log
        .lines()
        .find(|l| l.contains("remote_snapshot_prepared=false") && l.contains(&data_layer))
        .unwrap_or_else(|| panic!("no fallback logged for {data_layer}:\n{log}"));
    for part in [&base_toc, &data_toc] {
        assert!(reason.contains(part.as_str()), "{part} not in: {reason}");
    }
    assert_eq!(
        log.matches("remote_snapshot_prepared=true").count(),
        2,
        "only A's two layers are remote snapshots:\n{log}"
    );

    // A keeps working on the same lazily mounted layer.
    assert!(stack.mountpoint.join(&data_layer[7..]).is_dir());
    assert_eq!(read_in_a("after"), want);
    drop(ctd);
    drop(stack);
}
