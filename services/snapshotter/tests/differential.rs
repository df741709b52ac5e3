//! A lazily pulled rootfs equals containerd's own unpack of the same
//! layers, field by field, for a corpus of images: a busybox image with a
//! data layer and a pair of crafted layers of unusual entries
//! (`stargaze_testkit::crafted`), each converted by our converter, by
//! `ctr-remote image convert --estargz` (the Go estargz library) and by
//! skopeo as zstd:chunked.
//!
//! The lazy side is what containerd gets from stargaze: the image pulled
//! with `ctr-remote image rpull` through the real snapshotter (every layer
//! a remote snapshot), then a view of its top snapshot mounted as the
//! snapshotter's mounts say (overlayfs over the layers' directories in the
//! fs mount). The reference is containerd's applier (`tests/go/ctd-apply`,
//! containerd 1.6's `archive.Apply` with overlay whiteouts) applying each
//! of the image's own layer blobs, as the registry holds them, in order,
//! stacked with overlayfs as containerd's overlay snapshotter stacks them;
//! the eStargz TOC and landmark files, which every lazy snapshotter hides,
//! are left out of it. Every path is compared for type, mode, owner, size,
//! mtime (with nanoseconds), nlink, device number, xattrs, symlink target,
//! bytes and which paths are the same inode; every difference is printed by
//! image, path and field. Our converter's images are also compared with
//! the unpack of the tars they were converted from.
//!
//! Needs root, /dev/fuse, Go and the Debian packages `make deps` installs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use stargaze_format::Digest;
use stargaze_format::toc::{NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME};
use stargaze_oci::OciLayout;
use stargaze_testkit::stack::Service;
use stargaze_testkit::tree;
use stargaze_testkit::{Containerd, crafted, go_build, image, run};

mod common;

use common::{Node, Setup, content_blobs, ctr_remote_rpull, layer_digests, manifest, push_esgz};

/// An overlay or bind mount, detached when dropped (before the FUSE mount
/// under it goes).
struct Mounted(PathBuf);

impl Mounted {
    fn new(kind: &str, source: &str, options: &[String], at: PathBuf) -> Mounted {
        std::fs::create_dir_all(&at).unwrap();
        let mut cmd = Command::new("mount");
        cmd.args(["-t", kind]);
        if !options.is_empty() {
            cmd.arg("-o").arg(options.join(","));
        }
        run(cmd.arg(source).arg(&at));
        Mounted(at)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// The layers of one image before conversion, as uncompressed tars.
struct TarSet {
    name: &'static str,
    tars: Vec<Vec<u8>>,
}

/// The layer blobs of `reference` as the registry holds them, copied into
/// a layout of their own by skopeo (digests kept).
fn layer_blobs(w: &Path, reference: &str, name: &str) -> Vec<PathBuf> {
    let dir = w.join("pulled").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    run(Command::new("skopeo").args([
        "--insecure-policy",
        "copy",
        "--preserve-digests",
        "--src-tls-verify=false",
        &format!("docker://{reference}"),
        &format!("oci:{}:image", dir.display()),
    ]));
    let layout = OciLayout::open(&dir).unwrap();
    let manifest = layout
        .read_json(&layout.resolve(Some("image")).unwrap().digest)
        .unwrap();
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| layout.blob_path(l["digest"].as_str().unwrap()).unwrap())
        .collect()
}

/// Files of an eStargz layer that are the format's, not the image's: every
/// lazy snapshotter hides them, containerd's unpack shows them.
const ESTARGZ_METADATA: [&str; 3] = [TOC_TAR_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK];

/// containerd's unpack of `layers` (blobs or tars) under `dir`: each
/// applied by containerd's applier onto a directory of its own with the
/// ones below as parents, stacked read-only with overlayfs (a single layer
/// is the directory itself).
fn unpack(ctd_apply: &Path, dir: &Path, layers: &[PathBuf]) -> (PathBuf, Option<Mounted>) {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        let into = dir.join(i.to_string());
        // Parents topmost first, as containerd's overlay applier passes them.
        run(Command::new(ctd_apply)
            .arg(layer)
            .arg(&into)
            .args(dirs.iter().rev()));
        dirs.push(into);
    }
    if dirs.len() == 1 {
        return (dirs.pop().unwrap(), None);
    }
    let lowers: Vec<String> = dirs.iter().rev().map(|d| d.display().to_string()).collect();
    let merged = dir.join("merged");
    let m = Mounted::new(
        "overlay",
        "overlay",
        &[format!("lowerdir={}", lowers.join(":"))],
        merged.clone(),
    );
    (merged, Some(m))
}

/// The image config containerd holds for `reference`.
fn image_config(ctd: &Containerd, reference: &str) -> serde_json::Value {
    let manifest = manifest(ctd, reference);
    let config = manifest["config"]["digest"].as_str().unwrap();
    serde_json::from_slice(&ctd.ctr(&["content", "get", config]).stdout).unwrap()
}

/// The chain ID of an image's layers: the name of its top snapshot.
fn chain_id(config: &serde_json::Value) -> String {
    let diff_ids: Vec<&str> = config["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    diff_ids[1..]
        .iter()
        .fold(diff_ids[0].to_string(), |chain, d| {
            Digest::of(format!("{chain} {d}").as_bytes()).to_string()
        })
}

/// A read-only view of the image's top snapshot from the stargaze
/// snapshotter, mounted as its mounts say.
fn lazy_view(ctd: &Containerd, reference: &str, key: &str, at: PathBuf) -> Mounted {
    let parent = chain_id(&image_config(ctd, reference));
    let out = ctd.ctr(&[
        "snapshots",
        "--snapshotter",
        "stargaze",
        "view",
        "--mounts",
        key,
        &parent,
    ]);
    let mounts: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("view mounts of {reference}: {e}: {out:?}"));
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    // containerd's mount.Mount has no JSON tags: Type, Source, Options.
    let field = |k: &str| &mounts[0][k];
    let options: Vec<String> = field("Options")
        .as_array()
        .map(|o| o.iter().map(|v| v.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    let kind = field("Type").as_str().unwrap();
    let kind = if kind == "bind" { "none" } else { kind };
    Mounted::new(kind, field("Source").as_str().unwrap(), &options, at)
}

/// Convert the images tagged `src` in `layouts` with `ctr-remote image
/// convert --estargz` in a containerd of its own (so that the test's
/// containerd never holds their blobs) and push them as `repo:ctr-remote-<name>`.
fn push_converted_by_ctr_remote(w: &Path, layouts: &[(&str, PathBuf)], repo: &str) {
    let converter = Containerd::start("");
    for (name, layout) in layouts {
        let archive = w.join(format!("{name}-layout.tar"));
        image::layout_tar(layout, &archive);
        converter.ctr(&["image", "import", "--no-unpack", archive.to_str().unwrap()]);
        let target = format!("{repo}:ctr-remote-{name}");
        run(converter.cmd("ctr-remote").args([
            "image",
            "convert",
            "--estargz",
            "--oci",
            &format!("stargaze.test/{name}:src"),
            &target,
        ]));
        converter.ctr(&["image", "push", "--plain-http", &target]);
    }
}

fn push_zstd_chunked_by_skopeo(layout: &Path, reference: &str) {
    run(Command::new("skopeo").args([
        "--insecure-policy",
        "copy",
        "--dest-tls-verify=false",
        "--dest-compress-format",
        "zstd:chunked",
        &format!("oci:{}:src", layout.display()),
        &format!("docker://{reference}"),
    ]));
}

/// A difference no lazy reader can avoid, because the image's TOC does not
/// carry what its tar headers do: containers/storage's zstd:chunked writer
/// (Debian's skopeo 1.9) leaves xattrs with empty values out of its TOC, so
/// `x/user`'s `user.empty` is in containerd's unpack only.
fn is_writer_loss(
    image: &str,
    d: &tree::Difference,
    want: &BTreeMap<PathBuf, tree::Node>,
    got: &BTreeMap<PathBuf, tree::Node>,
) -> bool {
    if !(image.starts_with("skopeo-") && d.field == "xattrs") {
        return false;
    }
    let mut without_empty = want[&d.path].xattrs.clone();
    without_empty.retain(|_, v| !v.is_empty());
    without_empty != want[&d.path].xattrs && without_empty == got[&d.path].xattrs
}

#[test]
fn a_lazily_mounted_rootfs_equals_containerds_unpack_for_every_image_of_the_corpus() {
    let setup = Setup::new("sg-diff-", &["ctr-remote", "skopeo"]);
    let ctd_apply = go_build("ctd-apply");
    let w = setup.dir();
    let repo = format!("{}/stargaze/corpus", setup.registry.addr);
    let sets = [
        TarSet {
            name: "busybox",
            tars: vec![image::busybox_layer(), image::data_layer(51).0],
        },
        TarSet {
            name: "crafted",
            tars: vec![crafted::lower_layer(), crafted::upper_layer()],
        },
    ];
    let mut layouts = Vec::new();
    let mut images: Vec<(String, &TarSet)> = Vec::new();
    for set in &sets {
        let layout = w.join("src").join(set.name);
        image::write_layout(
            &layout,
            &format!("stargaze.test/{}:src", set.name),
            "src",
            &set.tars,
        );
        let ours = format!("ours-{}", set.name);
        push_esgz(&layout, &w.join(&ours), &format!("{repo}:{ours}"));
        let skopeo = format!("skopeo-{}", set.name);
        push_zstd_chunked_by_skopeo(&layout, &format!("{repo}:{skopeo}"));
        images.extend([
            (ours, set),
            (format!("ctr-remote-{}", set.name), set),
            (skopeo, set),
        ]);
        layouts.push((set.name, layout));
    }
    push_converted_by_ctr_remote(w, &layouts, &repo);

    let Node { ctd, stack } = Node::start(w);
    let mut mounts = Vec::new();
    // containerd's unpack of the source images (before conversion).
    let mut sources = BTreeMap::new();
    for set in &sets {
        let dir = w.join("unpacked").join(format!("src-{}", set.name));
        let tars: Vec<PathBuf> = set
            .tars
            .iter()
            .enumerate()
            .map(|(i, tar)| {
                let path = w.join(format!("{}-{i}.tar", set.name));
                std::fs::write(&path, tar).unwrap();
                path
            })
            .collect();
        let (root, m) = unpack(&ctd_apply, &dir, &tars);
        sources.insert(set.name, tree::walk(&root));
        mounts.extend(m);
    }
    // Not vacuous: the unpack holds what the corpus is about.
    let crafted_src = &sources["crafted"];
    assert!(crafted_src.len() > 100, "{}", crafted_src.len());
    assert_eq!(
        crafted_src[Path::new("x/user")].xattrs.len(),
        3,
        "{:?}",
        crafted_src[Path::new("x/user")]
    );
    assert!(!crafted_src.contains_key(Path::new("wh/gone")));

    let mut report = Vec::new();
    let mut writer_losses_seen = Vec::new();
    for (name, set) in &images {
        let reference = format!("{repo}:{name}");
        // containerd's unpack of this image's own layer blobs.
        let blobs = layer_blobs(w, &reference, name);
        let (root, m) = unpack(&ctd_apply, &w.join("unpacked").join(name), &blobs);
        let mut want = tree::walk(&root);
        mounts.extend(m);
        for meta in ESTARGZ_METADATA {
            want.remove(Path::new(meta));
        }
        if name.starts_with("ours-") {
            // Our converter keeps everything of the image.
            let diffs = tree::differences(&sources[set.name], &want);
            report.extend(
                diffs
                    .iter()
                    .map(|d| format!("{name}, converted vs its source: {d}")),
            );
        }

        ctr_remote_rpull(&ctd, &reference);
        let blobs = content_blobs(&ctd);
        for d in layer_digests(&ctd, &reference) {
            assert!(
                !blobs.contains(&d),
                "{name}: layer {d} was not mounted lazily:\n{}",
                stack.log(Service::Snapshotter)
            );
        }
        let view = lazy_view(
            &ctd,
            &reference,
            &format!("view-{name}"),
            w.join("lazy").join(name),
        );
        let got = tree::walk(&view.0);
        for d in tree::differences(&want, &got) {
            if is_writer_loss(name, &d, &want, &got) {
                writer_losses_seen.push(name.clone());
            } else {
                report.push(format!("{name}: {d}"));
            }
        }
        mounts.push(view);
    }
    assert!(
        report.is_empty(),
        "{} differences between the lazily mounted rootfs and containerd's unpack:\n{}",
        report.len(),
        report.join("\n")
    );
    assert_eq!(
        writer_losses_seen,
        ["skopeo-crafted"],
        "the one difference no lazy reader can avoid shows (if not, skopeo's writer changed: drop is_writer_loss)"
    );
    drop(mounts);
    drop(ctd);
    drop(stack);
}
