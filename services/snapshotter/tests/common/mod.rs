//! Steps the snapshotter's end-to-end tests share: putting an eStargz image
//! in the registry and pulling it lazily with `stargaze rpull`.
#![allow(dead_code)] // each test binary uses a part

use std::path::Path;
use std::process::Command;

use stargaze_oci::{ImageConvertOptions, OciLayout};
pub use stargaze_testkit::skopeo_copy;
use stargaze_testkit::stack::workspace_bin;
use stargaze_testkit::{Containerd, run};

/// Convert the image tagged `src` in the layout `src` to eStargz with our
/// converter (into the layout `out`, tag `esgz`) and push it as `reference`.
pub fn push_esgz(src: &Path, out: &Path, reference: &str) {
    stargaze_oci::convert_image(
        &OciLayout::open(src).unwrap(),
        Some("src"),
        &OciLayout::open_or_create(out).unwrap(),
        "esgz",
        &ImageConvertOptions::default(),
        &|_| {},
    )
    .unwrap();
    skopeo_copy(
        &format!("oci:{}:esgz", out.display()),
        &format!("docker://{reference}"),
    );
}

/// `stargaze rpull` of `reference` into `ctd`'s namespace (plain HTTP).
pub fn stargaze_rpull(ctd: &Containerd, reference: &str) {
    run(Command::new(workspace_bin("stargaze"))
        .args([
            "rpull",
            "--plain-http",
            "--quiet",
            "--snapshotter",
            "stargaze",
        ])
        .arg("--address")
        .arg(&ctd.socket)
        .args(["--namespace", &ctd.namespace, reference]));
}

/// Digests of the layers of a manifest in containerd's content store.
pub fn layer_digests(ctd: &Containerd, reference: &str) -> Vec<String> {
    let manifest_digest = String::from_utf8(
        ctd.ctr(&["image", "ls", &format!("name=={reference}")])
            .stdout,
    )
    .unwrap()
    .lines()
    .nth(1)
    .and_then(|l| l.split_whitespace().nth(2).map(String::from))
    .unwrap_or_else(|| panic!("image {reference} is not in containerd"));
    let manifest: serde_json::Value =
        serde_json::from_slice(&ctd.ctr(&["content", "get", &manifest_digest]).stdout).unwrap();
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}
