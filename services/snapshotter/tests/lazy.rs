//! Lazy pulling end to end with the real components: Debian's containerd 1.6
//! and runc with stargaze as `[proxy_plugins.stargaze]`, Debian's
//! docker-registry, and our three service binaries (fetcher, fs,
//! snapshotter) on private sockets. Images converted by our converter and by
//! `ctr-remote` are pulled with `ctr-remote image rpull` without any layer
//! blob reaching containerd's content store, and so are they with
//! `stargaze rpull`; the root filesystem a
//! container sees is the same, file by file, as the one containerd builds
//! from the unconverted image with its own overlayfs snapshotter. A plain
//! gzip image goes through the fallback (containerd unpacks it).
//!
//! Needs root, /dev/fuse and the Debian packages `make deps` installs.

use std::process::Command;

use stargaze_format::Digest;
mod common;

use common::{
    Node, Setup, content_blobs, cri_pull_request, ctr_remote_rpull, layer_digests, push_esgz,
    sh_in_container, skopeo_copy, stargaze_rpull,
};
use stargaze_testkit::stack::Service;
use stargaze_testkit::{Containerd, image, run};

/// Lists every file of the root filesystem with its metadata and the
/// sha256 of every regular file; the mount points containerd and runc fill
/// (/proc, /sys, /dev, /run) and the root directory itself are left out.
const WALK: &str = "cd / && \
    find . -xdev -mindepth 1 ! -type d ! -path './proc/*' ! -path './sys/*' ! -path './dev/*' \
      -exec stat -c 'E %N|%a|%u|%g|%s|%h|%F|%Y' {} + && \
    find . -xdev -mindepth 1 -type d ! -path './proc*' ! -path './sys*' ! -path './dev*' ! -path './run*' \
      -exec stat -c 'D %n|%a|%u|%g|%Y' {} + && \
    find . -xdev -type f ! -path './proc/*' ! -path './sys/*' ! -path './dev/*' \
      -exec sha256sum {} +";

fn sorted_lines(out: &[u8]) -> Vec<String> {
    let mut l: Vec<String> = String::from_utf8_lossy(out)
        .lines()
        .map(String::from)
        .collect();
    l.sort();
    l
}

#[test]
fn containers_run_from_lazily_pulled_images_with_the_same_rootfs() {
    let setup = Setup::new("sg-lazy-", &["runc", "ctr-remote", "skopeo"]);
    let w = setup.dir();
    let repo = format!("{}/stargaze/lazy", setup.registry.addr);

    // The source image (gzip layers) and our eStargz conversion of it.
    let src = w.join("src");
    let (data, files) = image::data_layer(21);
    image::write_layout(
        &src,
        "stargaze.test/lazy:src",
        "src",
        &[image::busybox_layer(), data],
    );
    skopeo_copy(
        &format!("oci:{}:src", src.display()),
        &format!("docker://{repo}:plain"),
    );
    let ours = w.join("ours");
    push_esgz(&src, &ours, &format!("{repo}:ours"));
    // ctr-remote's conversion, made in a containerd of its own so that the
    // test's containerd never holds these layer blobs.
    {
        let converter = Containerd::start("");
        let archive = w.join("src.tar");
        image::layout_tar(&src, &archive);
        converter.ctr(&["image", "import", "--no-unpack", archive.to_str().unwrap()]);
        run(converter.cmd("ctr-remote").args([
            "image",
            "convert",
            "--estargz",
            "--oci",
            "stargaze.test/lazy:src",
            &format!("{repo}:ctr-remote"),
        ]));
        converter.ctr(&[
            "image",
            "push",
            "--plain-http",
            &format!("{repo}:ctr-remote"),
        ]);
    }

    let Node { ctd, stack } = Node::start(w);

    // The reference: containerd's own pull and overlayfs snapshotter.
    ctd.ctr(&["image", "pull", "--plain-http", &format!("{repo}:plain")]);
    let rootfs = |reference: &str, snapshotter: &str, id: &str| -> Vec<String> {
        let o = ctd.ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            snapshotter,
            reference,
            &format!("sg-lazy-{id}-{}", std::process::id()),
            "/bin/sh",
            "-c",
            WALK,
        ]);
        sorted_lines(&o.stdout)
    };
    let expected = rootfs(&format!("{repo}:plain"), "overlayfs", "ref");
    // The walk is not vacuous: it saw both layers' files and the whiteout.
    let text = expected.join("\n");
    for (name, bytes) in &files {
        let line = format!("{}  ./{name}", Digest::of(bytes).hex());
        assert!(text.contains(&line), "{line} missing from\n{text}");
    }
    assert!(text.contains("./bin/busybox"), "{text}");
    assert!(!text.contains("./bin/wc"), "{text}");

    let pull = |puller: &str, reference: &str| match puller {
        "ctr-remote" => ctr_remote_rpull(&ctd, reference),
        _ => stargaze_rpull(&ctd, reference),
    };
    for tag in ["ours", "ctr-remote"] {
        let reference = format!("{repo}:{tag}");
        for puller in ["ctr-remote", "stargaze"] {
            pull(puller, &reference);
            let layers = layer_digests(&ctd, &reference);
            assert_eq!(layers.len(), 2, "{tag}");
            let blobs = content_blobs(&ctd);
            for d in &layers {
                assert!(
                    !blobs.contains(d.as_str()),
                    "{tag} pulled by {puller}: layer {d} was downloaded into the content store, not mounted lazily\n{}",
                    stack.log(Service::Snapshotter)
                );
                assert!(
                    stack.mountpoint.join(&d[7..]).is_dir(),
                    "{tag} pulled by {puller}: layer {d} is not attached in the fs mount"
                );
            }
            let got = rootfs(&reference, "stargaze", &format!("{tag}-{puller}"));
            assert_eq!(
                got, expected,
                "{tag} pulled by {puller}: the lazily mounted rootfs differs from containerd's own"
            );
            // Garbage collection removes the snapshots; the next pull
            // prepares them again.
            ctd.ctr(&["image", "rm", "--sync", &reference]);
        }
    }
    let log = stack.log(Service::Snapshotter);
    // 2 images × 2 pull commands × 2 layers, each pull after the image
    // and its snapshots were removed.
    assert_eq!(
        log.matches("remote_snapshot_prepared=true").count(),
        8,
        "every layer of every pull is a remote snapshot:\n{log}"
    );
    assert!(
        !log.contains("remote_snapshot_prepared=false"),
        "an eStargz layer fell back to unpacking:\n{log}"
    );

    // A plain gzip image falls back: containerd unpacks it into ordinary
    // snapshots, each layer's reason logged once. `stargaze rpull` then
    // downloads and applies the layers itself (the image was removed, so
    // its blobs are gone from the content store).
    let plain = format!("{repo}:plain");
    let plain_layers = layer_digests(&ctd, &plain);
    for puller in ["ctr-remote", "stargaze"] {
        pull(puller, &plain);
        let got = rootfs(&plain, "stargaze", &format!("plain-{puller}"));
        assert_eq!(
            got, expected,
            "plain image pulled by {puller} through the fallback"
        );
        let blobs = content_blobs(&ctd);
        for d in &plain_layers {
            assert!(
                blobs.contains(d.as_str()),
                "{puller}: layer {d} was not downloaded"
            );
        }
        ctd.ctr(&["image", "rm", "--sync", &plain]);
    }
    let log = stack.log(Service::Snapshotter);
    for d in &plain_layers {
        let warned = log
            .lines()
            .filter(|l| l.contains("cannot be pulled lazily") && l.contains(d.as_str()))
            .count();
        assert_eq!(warned, 1, "layer {d} fallback logged once:\n{log}");
    }
    drop(ctd);
    drop(stack);
}

/// The Kubernetes path: the kubelet's `PullImage` through containerd's CRI
/// plugin, configured with `snapshotter = "stargaze"` and
/// `disable_snapshot_annotations = false`, passes the `cri.*` labels; the
/// layers are mounted lazily and readable.
#[test]
fn cri_pull_image_mounts_layers_lazily() {
    use stargaze_proto::cri::image_service_client::ImageServiceClient;
    use stargaze_proto::cri::runtime_service_client::RuntimeServiceClient;
    use stargaze_proto::cri::*;

    let setup = Setup::new("sg-cri-", &["skopeo"]);
    let (data, files) = image::data_layer(41);
    let reference = setup.push_esgz_image("cri", &[image::busybox_layer(), data]);

    let Node { ctd, stack } = Node::start_cri(setup.dir());
    ctd.trust_plain_http(&setup.registry.addr);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pulled = runtime.block_on(async {
        let channel = stargaze_proto::connect_unix(&ctd.socket).unwrap();
        let version = RuntimeServiceClient::new(channel.clone())
            .version(VersionRequest {
                version: "v1".into(),
            })
            .await
            .expect("containerd serves CRI v1")
            .into_inner();
        assert_eq!(version.runtime_api_version, "v1");
        ImageServiceClient::new(channel)
            .pull_image(cri_pull_request(&reference, None))
            .await
            .unwrap_or_else(|s| {
                panic!(
                    "PullImage: {s}\n{}\n{}",
                    ctd.log(),
                    stack.log(Service::Snapshotter)
                )
            })
            .into_inner()
    });
    assert!(pulled.image_ref.starts_with("sha256:"), "{pulled:?}");

    // CRI keeps its images in the k8s.io namespace.
    let k8s = |args: &[&str]| {
        run(Command::new("ctr")
            .arg("--address")
            .arg(&ctd.socket)
            .args(["--namespace", "k8s.io"])
            .args(args))
    };
    let blobs = String::from_utf8(k8s(&["content", "ls", "-q"]).stdout).unwrap();
    let log = stack.log(Service::Snapshotter);
    assert_eq!(
        log.matches("remote_snapshot_prepared=true").count(),
        2,
        "both layers are remote snapshots:\n{log}"
    );
    let manifest_digest = String::from_utf8(k8s(&["image", "ls"]).stdout)
        .unwrap()
        .lines()
        .find(|l| l.starts_with(&reference))
        .and_then(|l| l.split_whitespace().nth(2).map(String::from))
        .unwrap_or_else(|| panic!("{reference} is not among CRI's images"));
    let manifest: serde_json::Value =
        serde_json::from_slice(&k8s(&["content", "get", &manifest_digest]).stdout).unwrap();
    let layers: Vec<&str> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap())
        .collect();
    for d in &layers {
        assert!(
            !blobs.contains(d),
            "layer {d} was downloaded, not mounted lazily"
        );
    }
    // The data layer's files read through the fs mount, verified.
    let data_dir = stack.mountpoint.join(&layers[1][7..]);
    for (name, bytes) in &files {
        let got = std::fs::read(data_dir.join(name)).unwrap();
        assert!(got == *bytes, "{name} read through the fs mount differs");
    }
    drop(ctd);
    drop(stack);
}

/// An image with more layers than an overlay mount option can name with
/// the fs mount's long paths (70 × ~90 bytes > one page): the lowerdirs
/// are `<root>/snapshots/<id>/fs` links, so containerd shortens the list as
/// it does for its own overlay snapshotter, and the container sees every
/// layer.
#[test]
fn an_image_with_70_lazy_layers_runs() {
    let setup = Setup::new("sg-many-", &["runc", "skopeo"]);
    let mut layers = vec![image::busybox_layer()];
    for i in 1..70 {
        let mut b = tar::Builder::new(Vec::new());
        let body = format!("layer {i}\n");
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(body.len() as u64);
        h.set_mtime(1_600_000_000);
        b.append_data(&mut h, format!("layers/f{i:02}"), body.as_bytes())
            .unwrap();
        layers.push(b.into_inner().unwrap());
    }
    let reference = setup.push_esgz_image("many", &layers);
    let Node { ctd, stack } = Node::start(setup.dir());
    stargaze_rpull(&ctd, &reference);
    let o = sh_in_container(&ctd, &reference, "sg-many", "cat /layers/*");
    let text = String::from_utf8_lossy(&o.stdout);
    let expected: String = (1..70).map(|i| format!("layer {i}\n")).collect();
    assert_eq!(text, expected);
    let log = stack.log(Service::Snapshotter);
    assert_eq!(
        log.matches("remote_snapshot_prepared=true").count(),
        70,
        "every layer is a remote snapshot:\n{log}"
    );
    drop(ctd);
    drop(stack);
}

/// Plain gzip images sharing a layer, pulled at once with `stargaze
/// rpull`: the shared layer falls back to a download in each pull, under
/// one content ref that containerd lends to one writer at a time ("ref
/// ... locked"). The other pulls wait for it, as containerd's own client
/// does, instead of failing; every image runs.
#[test]
fn concurrent_pulls_of_images_sharing_a_plain_layer_wait_for_each_other() {
    let setup = Setup::new("sg-lazy-conc-", &["runc", "skopeo"]);
    let w = setup.dir();
    // A shared layer large enough that the downloads overlap.
    let mut x = 77;
    let big = image::file_bytes(24 << 20, &mut x);
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_mode(0o644);
    h.set_size(big.len() as u64);
    b.append_data(&mut h, "shared/big", &big[..]).unwrap();
    let shared = b.into_inner().unwrap();
    let mut images = Vec::new();
    for i in 0..4 {
        let src = w.join(format!("src{i}"));
        let (data, files) = image::data_layer(50 + i);
        image::write_layout(
            &src,
            &format!("stargaze.test/conc{i}:src"),
            "src",
            &[image::busybox_layer(), shared.clone(), data],
        );
        let reference = format!("{}/stargaze/conc{i}:plain", setup.registry.addr);
        skopeo_copy(
            &format!("oci:{}:src", src.display()),
            &format!("docker://{reference}"),
        );
        images.push((reference, files));
    }
    let Node { ctd, stack } = Node::start(w);
    std::thread::scope(|scope| {
        for (reference, _) in &images {
            let ctd = &ctd;
            scope.spawn(move || stargaze_rpull(ctd, reference));
        }
    });
    // `sha256sum -c` in the container: its exit status says whether both
    // files are the image's (ctr run may lose the output of a task that
    // writes it as it exits, on a loaded machine).
    for (i, (reference, files)) in images.iter().enumerate() {
        let (name, bytes) = &files[7];
        let check = format!(
            "sha256sum -c <<'END'\n{}  /shared/big\n{}  /{name}\nEND\n",
            Digest::of(&big).hex(),
            Digest::of(bytes).hex()
        );
        // `ctr` fails the test unless the container exits 0.
        sh_in_container(&ctd, reference, &format!("sg-lazy-conc-{i}"), &check);
    }
    drop(ctd);
    drop(stack);
}
