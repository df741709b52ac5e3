//! Steps the snapshotter's end-to-end tests share: the set-up of a node
//! ([`Setup`]: prerequisites, a work directory and a registry; [`Node`]:
//! the three stargaze services and a containerd that uses them), putting
//! an eStargz image in the registry and pulling it lazily with `stargaze
//! rpull`.
#![allow(dead_code)] // each test binary uses a part

use std::path::Path;
use std::process::{Command, Output};

use stargaze_oci::{ImageConvertOptions, OciLayout};
use stargaze_proto::cri::{
    AuthConfig, ImageSpec, PodSandboxConfig, PodSandboxMetadata, PullImageRequest,
};
pub use stargaze_testkit::skopeo_copy;
use stargaze_testkit::stack::{Stack, workspace_bin};
use stargaze_testkit::{Containerd, Registry, image, require, require_root_fuse, run};

/// Fail unless this machine can run a node (root, /dev/fuse) and has
/// `tools`.
pub fn needs(tools: &[&str]) {
    require_root_fuse();
    for tool in tools {
        require(tool);
    }
}

/// A fresh directory `/tmp/<prefix>…`, removed when dropped (under /tmp
/// whatever `TMPDIR` says: the services' sockets go in it, and a unix
/// socket's path is limited to 108 bytes).
pub fn work_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .unwrap()
}

/// What a containerd test starts from: its prerequisites checked, a work
/// directory and a registry of its own. Dropped after the [`Node`] that
/// uses them (declare it first).
pub struct Setup {
    pub registry: Registry,
    pub work: tempfile::TempDir,
}

impl Setup {
    pub fn new(prefix: &str, tools: &[&str]) -> Setup {
        needs(tools);
        let work = work_dir(prefix);
        Setup {
            registry: Registry::start(),
            work,
        }
    }

    pub fn dir(&self) -> &Path {
        self.work.path()
    }

    /// Write `layers` as the image `stargaze.test/<name>:src` in the layout
    /// `src` of the work directory, convert it to eStargz (the layout
    /// `out`) and push it; returns its reference,
    /// `<registry>/stargaze/<name>:esgz`.
    pub fn push_esgz_image(&self, name: &str, layers: &[Vec<u8>]) -> String {
        let w = self.dir();
        let src = w.join("src");
        image::write_layout(&src, &format!("stargaze.test/{name}:src"), "src", layers);
        let reference = format!("{}/stargaze/{name}:esgz", self.registry.addr);
        push_esgz(&src, &w.join("out"), &reference);
        reference
    }
}

/// The three stargaze services on private sockets and a containerd that
/// uses them as its `stargaze` proxy plugin. The fields drop in order:
/// containerd stops before the services it calls.
pub struct Node {
    pub ctd: Containerd,
    pub stack: Stack,
}

impl Node {
    /// The services with their default configuration in `dir`.
    pub fn start(dir: &Path) -> Node {
        Node::on(Stack::start(dir, &[]))
    }

    /// A containerd in front of `stack`.
    pub fn on(stack: Stack) -> Node {
        Node {
            ctd: Containerd::start(&stack.proxy_config("stargaze")),
            stack,
        }
    }

    /// The services in `dir` and a containerd whose CRI plugin pulls with
    /// the stargaze snapshotter.
    pub fn start_cri(dir: &Path) -> Node {
        Node::cri_on(Stack::start(dir, &[]))
    }

    /// A containerd whose CRI plugin pulls with the stargaze snapshotter,
    /// in front of `stack`.
    pub fn cri_on(stack: Stack) -> Node {
        Node {
            ctd: Containerd::start_cri("stargaze", &stack.proxy_config("stargaze")),
            stack,
        }
    }
}

/// Convert the image tagged `src` in the layout `src` to eStargz with our
/// converter (into the layout `out`, tag `esgz`) and push it as `reference`.
pub fn push_esgz(src: &Path, out: &Path, reference: &str) {
    convert_to_esgz(src, out);
    skopeo_copy(
        &format!("oci:{}:esgz", out.display()),
        &format!("docker://{reference}"),
    );
}

/// Convert the image tagged `src` in the layout `src` to eStargz with our
/// converter, into the layout `out` under the tag `esgz`.
pub fn convert_to_esgz(src: &Path, out: &Path) {
    stargaze_oci::convert_image(
        &OciLayout::open(src).unwrap(),
        Some("src"),
        &OciLayout::open_or_create(out).unwrap(),
        "esgz",
        &ImageConvertOptions::default(),
        &|_| {},
    )
    .unwrap();
}

/// `stargaze rpull` of `reference` into `ctd`'s namespace (plain HTTP).
pub fn stargaze_rpull(ctd: &Containerd, reference: &str) {
    run(&mut rpull_command(ctd, reference));
}

/// The `stargaze rpull` command [`stargaze_rpull`] runs.
pub fn rpull_command(ctd: &Containerd, reference: &str) -> Command {
    let mut cmd = Command::new(workspace_bin("stargaze"));
    cmd.args([
        "rpull",
        "--plain-http",
        "--quiet",
        "--snapshotter",
        "stargaze",
    ])
    .arg("--address")
    .arg(&ctd.socket)
    .args(["--namespace", &ctd.namespace, reference]);
    cmd
}

/// The manifest of `reference` in containerd's content store.
pub fn manifest(ctd: &Containerd, reference: &str) -> serde_json::Value {
    let manifest_digest = String::from_utf8(
        ctd.ctr(&["image", "ls", &format!("name=={reference}")])
            .stdout,
    )
    .unwrap()
    .lines()
    .nth(1)
    .and_then(|l| l.split_whitespace().nth(2).map(String::from))
    .unwrap_or_else(|| panic!("image {reference} is not in containerd"));
    serde_json::from_slice(&ctd.ctr(&["content", "get", &manifest_digest]).stdout).unwrap()
}

/// Digests of the layers of a manifest in containerd's content store.
pub fn layer_digests(ctd: &Containerd, reference: &str) -> Vec<String> {
    manifest(ctd, reference)["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

/// `ctr-remote image rpull` of `reference` into `ctd` with the stargaze
/// snapshotter (plain HTTP).
pub fn ctr_remote_rpull(ctd: &Containerd, reference: &str) {
    ctr_remote_rpull_with(ctd, &[], reference);
}

/// [`ctr_remote_rpull`] with `flags` (such as `--skip-content-verify`).
pub fn ctr_remote_rpull_with(ctd: &Containerd, flags: &[&str], reference: &str) {
    run(ctd
        .cmd("ctr-remote")
        .args([
            "image",
            "rpull",
            "--plain-http",
            "--snapshotter",
            "stargaze",
        ])
        .args(flags)
        .arg(reference));
}

/// The digests of the blobs in containerd's content store (`ctr content
/// ls -q`): a layer mounted lazily is not among them.
pub fn content_blobs(ctd: &Containerd) -> String {
    String::from_utf8(ctd.ctr(&["content", "ls", "-q"]).stdout).unwrap()
}

/// `ctr run --rm` of `reference` on the stargaze snapshotter, as the
/// container `<name>-<pid>`, running `/bin/sh -c script`.
pub fn sh_in_container(ctd: &Containerd, reference: &str, name: &str, script: &str) -> Output {
    ctd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "stargaze",
        reference,
        &format!("{name}-{}", std::process::id()),
        "/bin/sh",
        "-c",
        script,
    ])
}

/// A kubelet's `PullImage` of `image` for a pod, with `auth` (its pull
/// secret) if any.
pub fn cri_pull_request(image: &str, auth: Option<AuthConfig>) -> PullImageRequest {
    PullImageRequest {
        image: Some(ImageSpec {
            image: image.to_string(),
            ..Default::default()
        }),
        auth,
        sandbox_config: Some(PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: "pod".into(),
                uid: "uid-1".into(),
                namespace: "default".into(),
                attempt: 0,
            }),
            ..Default::default()
        }),
    }
}
