//! An eStargz image in a test registry: `layers` written to an OCI layout,
//! converted by `stargaze-oci` and pushed with skopeo.

use std::path::Path;

use stargaze_oci::{ImageConvertOptions, OciLayout};
use stargaze_testkit::{Registry, image, skopeo_copy};

/// Push `layers` as `<registry>/<repository>:esgz`; returns the image
/// reference and the converted manifest.
pub fn push(
    reg: &Registry,
    work: &Path,
    layers: &[Vec<u8>],
    repository: &str,
) -> (String, serde_json::Value) {
    let src = work.join("src");
    image::write_layout(&src, "x", "src", layers);
    let out = work.join("out");
    let dst = OciLayout::open_or_create(&out).unwrap();
    stargaze_oci::convert_image(
        &OciLayout::open(&src).unwrap(),
        Some("src"),
        &dst,
        "esgz",
        &ImageConvertOptions::default(),
        &|_| {},
    )
    .unwrap();
    let image_ref = format!("{}/{repository}:esgz", reg.addr);
    skopeo_copy(
        &format!("oci:{}:esgz", out.display()),
        &format!("docker://{image_ref}"),
    );
    let manifest = dst
        .read_json(&dst.resolve(Some("esgz")).unwrap().digest)
        .unwrap();
    (image_ref, manifest)
}
