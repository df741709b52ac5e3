//! An image pushed to a real registry for the fault tests that read
//! through the fetcher's layers: layers from in-memory tars, converted to
//! eStargz with small chunks, and each layer's regular files kept to check
//! every byte read against.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use stargaze_cache::Cache;
use stargaze_fetcher::registry::RegistryBlob;
use stargaze_fetcher::{FetchOptions, Layer, resolve_layer};
use stargaze_format::tar::{TarKind, TarReader};
use stargaze_format::tree::normalize_path;
use stargaze_format::{Digest, TOC_DIGEST_ANNOTATION};
use stargaze_oci::{ImageConvertOptions, OciLayout};
use stargaze_registry::{Client, Reference};
use stargaze_testkit::{image, run};

/// One pushed layer.
pub struct Source {
    pub digest: String,
    pub toc: Digest,
    /// The descriptor's annotations in the manifest.
    pub annotations: std::collections::HashMap<String, String>,
    /// (path, bytes) of its regular files.
    pub files: Vec<(String, Vec<u8>)>,
}

/// Convert `tars` into an eStargz image with `chunk_size` chunks and push
/// it as `reference` (`host/repo:tag`), working in `work`.
pub fn push(tars: &[Vec<u8>], chunk_size: u64, reference: &str, work: &Path) -> Vec<Source> {
    let src = work.join("src");
    image::write_layout(&src, "x", "src", tars);
    let out = work.join("out");
    let dst = OciLayout::open_or_create(&out).unwrap();
    let opts = ImageConvertOptions {
        layer: stargaze_format::ConvertOptions {
            chunk_size,
            ..Default::default()
        },
        tmp_dir: None,
    };
    stargaze_oci::convert_image(
        &OciLayout::open(&src).unwrap(),
        Some("src"),
        &dst,
        "esgz",
        &opts,
        &|_| {},
    )
    .unwrap();
    run(Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:esgz", out.display()))
        .arg(format!("docker://{reference}")));
    let m = dst
        .read_json(&dst.resolve(Some("esgz")).unwrap().digest)
        .unwrap();
    tars.iter()
        .enumerate()
        .map(|(i, tar)| {
            let desc = &m["layers"][i];
            let files = TarReader::new(tar)
                .map(|e| e.unwrap())
                .filter(|e| e.kind == TarKind::Regular && e.size > 0 && !e.name.contains(".wh."))
                .map(|e| {
                    (
                        normalize_path(&e.name).unwrap(),
                        tar[e.data_offset as usize..(e.data_offset + e.size) as usize].to_vec(),
                    )
                })
                .collect();
            Source {
                digest: desc["digest"].as_str().unwrap().into(),
                annotations: serde_json::from_value(desc["annotations"].clone()).unwrap(),
                toc: desc["annotations"][TOC_DIGEST_ANNOTATION]
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap(),
                files,
            }
        })
        .collect()
}

/// Resolve one layer of `reference` into `cache` (reads chunk by chunk:
/// no whole-file fetches, no chunks brought along after a miss, no sweep,
/// so a test knows exactly which chunks a read leaves in the cache).
pub async fn resolve(
    client: &Client,
    reference: &str,
    source: &Source,
    cache: &Arc<Cache>,
) -> Result<Layer, stargaze_fetcher::FetchError> {
    let opts = FetchOptions {
        whole_file_below: 0,
        read_amplify: 0,
        sweep_max_window: 0,
        ..Default::default()
    };
    let blob = Arc::new(RegistryBlob(
        client.blob(&Reference::parse(reference).unwrap(), &source.digest),
    ));
    resolve_layer(
        cache.clone(),
        blob,
        &source.digest,
        Some(source.toc),
        false,
        &opts,
    )
    .await
}

/// `n` bytes that do not compress (xorshift from `seed`).
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = (seed << 1) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A layer tar of `files` files of `size` incompressible bytes each.
pub fn noise_layer(seed: u64, files: usize, size: usize) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..files {
        let data = noise(size, seed.wrapping_mul(1000) + i as u64);
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, format!("noise/{seed}/file{i}"), &data[..])
            .unwrap();
    }
    b.into_inner().unwrap()
}
