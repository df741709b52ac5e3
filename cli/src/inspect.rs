//! `stargaze inspect`: a layer's format, TOC summary and full verification.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use serde::Serialize;
use stargaze_format::footer::Footer;
use stargaze_format::{
    BlobRead, Digest, LayerToc, NodeKind, OpenOptions, Prefetch, TOC_DIGEST_ANNOTATION,
    TOC_LAYER_DIGEST_ANNOTATION, open_blob, read_file,
};
use stargaze_oci::{Descriptor, ImageLocation, OciLayout, media};

#[derive(clap::Args)]
pub struct Args {
    /// A layer blob file, or an image as oci:DIR[:TAG].
    target: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// List every path with its mode and size.
    #[arg(long)]
    list: bool,
    /// Only read the footer and TOC; do not read and verify the file data.
    #[arg(long)]
    no_verify: bool,
    /// Expected TOC digest of a blob (the layer's toc.digest annotation).
    #[arg(long)]
    toc_digest: Option<String>,
    /// For an external-TOC blob: the TOC layer blob from its -esgztoc image.
    #[arg(long)]
    external_toc: Option<PathBuf>,
}

#[derive(Serialize, Default)]
struct Entry {
    path: String,
    kind: &'static str,
    mode: String,
    uid: u32,
    gid: u32,
    size: u64,
    chunks: usize,
    #[serde(skip_serializing_if = "String::is_empty")]
    link: String,
}

#[derive(Serialize, Default)]
struct LayerReport {
    layer: String,
    lazy: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    not_lazy_reason: Option<String>,
    format: String,
    footer: String,
    blob_size: u64,
    toc_digest: String,
    toc_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    annotation_matches: Option<bool>,
    names: usize,
    files: usize,
    dirs: usize,
    symlinks: usize,
    hardlink_names: usize,
    others: usize,
    file_bytes: u64,
    chunks: usize,
    prefetch: String,
    verified_files: usize,
    verified_bytes: u64,
    errors: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    entries: Vec<Entry>,
}

fn kind_name(k: NodeKind) -> &'static str {
    match k {
        NodeKind::Dir => "dir",
        NodeKind::Reg => "reg",
        NodeKind::Symlink => "symlink",
        NodeKind::Char => "char",
        NodeKind::Block => "block",
        NodeKind::Fifo => "fifo",
    }
}

fn footer_text(f: &Footer) -> String {
    match f {
        Footer::Estargz { toc_offset } => format!("eStargz (51 bytes), TOC at {toc_offset}"),
        Footer::LegacyStargz { toc_offset } => {
            format!("legacy stargz (47 bytes), TOC at {toc_offset}")
        }
        Footer::ExternalToc => "eStargz with external TOC (46 bytes)".into(),
        Footer::ZstdChunked { toc_offset, .. } => {
            format!("zstd:chunked (40 bytes, GnUlInUx), TOC at {toc_offset}")
        }
        Footer::ZstdChunkedV2 { toc_offset, .. } => {
            format!("zstd:chunked (64 bytes, GNUlInUx), TOC at {toc_offset}")
        }
    }
}

fn summarize<B: BlobRead + ?Sized>(
    name: &str,
    blob: &B,
    layer: &LayerToc,
    verify: bool,
    list: bool,
) -> LayerReport {
    let toc = &layer.toc;
    let mut r = LayerReport {
        layer: name.to_string(),
        lazy: true,
        format: layer.format().to_string(),
        footer: footer_text(&layer.footer),
        blob_size: layer.blob_size,
        toc_digest: layer.toc_digest.to_string(),
        toc_bytes: layer.toc_json.len() as u64,
        prefetch: match toc.prefetch {
            Prefetch::Disabled => "disabled (.no.prefetch.landmark)".into(),
            Prefetch::UpTo(o) => format!("first {o} compressed bytes (.prefetch.landmark)"),
            Prefetch::Unspecified => "unspecified (the configured prefetch size applies)".into(),
        },
        ..Default::default()
    };
    for n in &toc.nodes {
        match n.kind {
            NodeKind::Reg => {
                r.files += 1;
                r.file_bytes += n.size;
                r.chunks += n.chunks.len();
                r.hardlink_names += (n.nlink as usize).saturating_sub(1);
            }
            NodeKind::Dir => r.dirs += 1,
            NodeKind::Symlink => r.symlinks += 1,
            _ => r.others += 1,
        }
    }
    let walk = toc.walk();
    r.names = walk.len();
    if list {
        for (path, id) in &walk {
            let n = toc.node(*id);
            r.entries.push(Entry {
                path: if path.is_empty() {
                    "/".into()
                } else {
                    path.clone()
                },
                kind: kind_name(n.kind),
                mode: format!("{:04o}", n.mode),
                uid: n.uid,
                gid: n.gid,
                size: n.size,
                chunks: n.chunks.len(),
                link: n.link_target.clone(),
            });
        }
    }
    if verify {
        for n in toc.nodes.iter().filter(|n| n.kind == NodeKind::Reg) {
            match read_file(name, blob, layer, n) {
                Ok(data) => {
                    r.verified_files += 1;
                    r.verified_bytes += data.len() as u64;
                }
                Err(e) => r.errors.push(e.to_string()),
            }
        }
    }
    r
}

fn inspect_blob(
    name: &str,
    path: &Path,
    expected: Option<Digest>,
    external: Option<Vec<u8>>,
    a: &Args,
) -> Result<LayerReport> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let opts = OpenOptions {
        expected_toc_digest: expected,
        external_toc: external,
        ..Default::default()
    };
    match open_blob(name, &file, &opts) {
        Ok(layer) => {
            let mut r = summarize(name, &file, &layer, !a.no_verify, a.list);
            if expected.is_some() {
                r.annotation_matches = Some(true);
            }
            Ok(r)
        }
        Err(e) => match e.kind {
            stargaze_format::ErrorKind::NotLazy(reason) => Ok(LayerReport {
                layer: name.to_string(),
                lazy: false,
                not_lazy_reason: Some(reason),
                blob_size: file.size(),
                ..Default::default()
            }),
            _ => Err(e.into()),
        },
    }
}

fn print_text(r: &LayerReport) {
    println!("layer {}", r.layer);
    if !r.lazy {
        println!(
            "  not lazily pullable: {}",
            r.not_lazy_reason.as_deref().unwrap_or("")
        );
        return;
    }
    println!("  format      {} — {}", r.format, r.footer);
    println!("  blob        {} bytes", r.blob_size);
    println!(
        "  TOC         {} ({} bytes of JSON){}",
        r.toc_digest,
        r.toc_bytes,
        match r.annotation_matches {
            Some(true) => ", matches the annotation",
            Some(false) => ", DOES NOT match the annotation",
            None => "",
        }
    );
    println!(
        "  entries     {} names: {} files ({} bytes, {} chunks), {} dirs, {} symlinks, {} extra hardlink names, {} other",
        r.names, r.files, r.file_bytes, r.chunks, r.dirs, r.symlinks, r.hardlink_names, r.others
    );
    println!("  prefetch    {}", r.prefetch);
    for e in &r.entries {
        let link = if e.link.is_empty() {
            String::new()
        } else {
            format!(" -> {}", e.link)
        };
        println!(
            "    {:7} {} {:>5}:{:<5} {:>12} {}{link}",
            e.kind, e.mode, e.uid, e.gid, e.size, e.path
        );
    }
    if r.verified_files > 0 || !r.errors.is_empty() {
        println!(
            "  verified    {} files, {} bytes, every chunk digest checked",
            r.verified_files, r.verified_bytes
        );
    }
    for e in &r.errors {
        println!("  ERROR       {e}");
    }
}

/// Layers of an image (all platforms), with their manifests' annotations.
fn image_layers(
    layout: &OciLayout,
    top: &Descriptor,
    out: &mut Vec<Descriptor>,
    depth: usize,
) -> Result<()> {
    if depth > 8 {
        anyhow::bail!("indexes nested too deeply");
    }
    if media::is_index(&top.media_type) {
        let index = layout.read_json(&top.digest)?;
        for m in index["manifests"].as_array().into_iter().flatten() {
            image_layers(layout, &Descriptor::from_value(m, "index")?, out, depth + 1)?;
        }
    } else if media::is_manifest(&top.media_type) {
        let manifest = layout.read_json(&top.digest)?;
        for l in manifest["layers"].as_array().into_iter().flatten() {
            let d = Descriptor::from_value(l, "manifest")?;
            if !out.iter().any(|x| x.digest == d.digest) {
                out.push(d);
            }
        }
    }
    Ok(())
}

/// TOC blobs of the `<tag>-esgztoc` image, by the eStargz layer they belong to.
fn external_tocs(layout: &OciLayout, tag: Option<&str>) -> Vec<(String, String)> {
    let Some(tag) = tag else { return Vec::new() };
    let Ok(top) = layout.resolve(Some(&format!(
        "{tag}{}",
        stargaze_format::EXTERNAL_TOC_REF_SUFFIX
    ))) else {
        return Vec::new();
    };
    let mut layers = Vec::new();
    if image_layers(layout, &top, &mut layers, 0).is_err() {
        return Vec::new();
    }
    layers
        .into_iter()
        .filter_map(|d| {
            Some((
                d.annotations.get(TOC_LAYER_DIGEST_ANNOTATION)?.clone(),
                d.digest,
            ))
        })
        .collect()
}

pub fn run(a: Args) -> Result<ExitCode> {
    let mut reports = Vec::new();
    if a.target.starts_with("oci:") || a.target.starts_with("docker://") {
        let loc = ImageLocation::parse(&a.target)?;
        let ImageLocation::Oci { dir, tag } = &loc else {
            return Err(stargaze_oci::OciError::RegistryUnsupported(a.target.clone()).into());
        };
        let layout = OciLayout::open(dir)?;
        let top = layout.resolve(tag.as_deref())?;
        let mut layers = Vec::new();
        image_layers(&layout, &top, &mut layers, 0).with_context(|| format!("reading {loc}"))?;
        let tocs = external_tocs(&layout, tag.as_deref());
        for d in layers {
            if !media::is_layer(&d.media_type) {
                continue;
            }
            let expected: Option<Digest> =
                match d.annotations.get(TOC_DIGEST_ANNOTATION) {
                    Some(v) => Some(v.parse().with_context(|| {
                        format!("layer {}: bad {TOC_DIGEST_ANNOTATION}", d.digest)
                    })?),
                    None => None,
                };
            let external = match tocs.iter().find(|(layer, _)| *layer == d.digest) {
                Some((_, toc_blob)) => Some(layout.read_blob(toc_blob)?),
                None => None,
            };
            let path = layout.blob_path(&d.digest)?;
            let mut r = match inspect_blob(&d.digest, &path, expected, external, &a) {
                Ok(r) => r,
                Err(e) => LayerReport {
                    layer: d.digest.clone(),
                    lazy: false,
                    errors: vec![format!("{e:#}")],
                    annotation_matches: expected.map(|_| false),
                    ..Default::default()
                },
            };
            if expected.is_none() && r.lazy {
                r.errors.push(format!(
                    "the manifest has no {TOC_DIGEST_ANNOTATION} annotation: snapshotters refuse to mount it lazily without one"
                ));
            }
            reports.push(r);
        }
    } else {
        let path = PathBuf::from(&a.target);
        let expected = a
            .toc_digest
            .as_deref()
            .map(str::parse::<Digest>)
            .transpose()
            .context("--toc-digest")?;
        let external = a
            .external_toc
            .as_ref()
            .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
            .transpose()?;
        reports.push(inspect_blob(&a.target, &path, expected, external, &a)?);
    }
    let failed = reports.iter().any(|r| !r.errors.is_empty());
    if a.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        for r in &reports {
            print_text(r);
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
