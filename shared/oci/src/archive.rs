//! `oci-archive:` and `docker-archive:` images, as skopeo names them: tars
//! unpacked into (or packed from) an OCI layout in a scratch directory, so
//! that the converter only ever walks layouts and registries.
//!
//! A docker archive (`docker save`) is `manifest.json` (`Config`,
//! `RepoTags`, `Layers` paths) beside its files; ours are written the way
//! Docker 25 writes them: the files under `blobs/sha256/`, with an OCI
//! `index.json` too, so the tar reads both as a docker and an OCI archive.
//! Docker archives hold one platform's image.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path};

use serde_json::{Value, json};
use stargaze_format::digest::Hasher;

use crate::layout::{Descriptor, OciLayout};
use crate::platform::PlatformFilter;
use crate::store::parse_json;
use crate::{OciError, media};

fn invalid(archive: &Path, why: impl std::fmt::Display) -> OciError {
    OciError::Invalid(format!("archive {}: {why}", archive.display()))
}

/// Unpack a tar into `into` (no entries outside it).
fn untar(archive: &Path, into: &Path) -> Result<(), OciError> {
    let f = std::fs::File::open(archive).map_err(|e| OciError::io(archive, e))?;
    let mut t = tar::Archive::new(std::io::BufReader::with_capacity(1 << 20, f));
    t.set_preserve_permissions(false);
    for entry in t.entries().map_err(|e| OciError::io(archive, e))? {
        let mut entry = entry.map_err(|e| OciError::io(archive, e))?;
        let path = entry.path().map_err(|e| OciError::io(archive, e))?;
        if path
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::RootDir))
        {
            return Err(invalid(
                archive,
                format!("entry {} leaves the archive", path.display()),
            ));
        }
        entry
            .unpack_in(into)
            .map_err(|e| OciError::io(archive, e))?;
    }
    Ok(())
}

/// Unpack an `oci-archive:` into the empty directory `into`.
pub fn open_oci_archive(archive: &Path, into: &Path) -> Result<OciLayout, OciError> {
    untar(archive, into)?;
    OciLayout::open(into).map_err(|e| invalid(archive, e))
}

/// Pack the layout at `dir` as an `oci-archive:` at `archive` (atomically).
pub fn write_oci_archive(dir: &Path, archive: &Path) -> Result<(), OciError> {
    let parent = archive.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-archive-")
        .tempfile_in(parent)
        .map_err(|e| OciError::io(parent, e))?;
    let mut b = tar::Builder::new(std::io::BufWriter::with_capacity(1 << 20, tmp.as_file()));
    b.follow_symlinks(false);
    for name in ["oci-layout", "index.json"] {
        b.append_path_with_name(dir.join(name), name)
            .map_err(|e| OciError::io(dir.join(name), e))?;
    }
    b.append_dir_all("blobs", dir.join("blobs"))
        .map_err(|e| OciError::io(dir.join("blobs"), e))?;
    b.into_inner()
        .and_then(|mut w| std::io::Write::flush(&mut w))
        .map_err(|e| OciError::io(archive, e))?;
    tmp.persist(archive)
        .map_err(|e| OciError::io(archive, e.error))?;
    Ok(())
}

fn sha256_file(path: &Path) -> Result<(String, u64), OciError> {
    let mut f = std::fs::File::open(path).map_err(|e| OciError::io(path, e))?;
    let mut h = Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| OciError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let n = h.len();
    Ok((h.finish().to_string(), n))
}

fn layer_media_type(path: &Path) -> Result<&'static str, OciError> {
    let mut head = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(|e| OciError::io(path, e))?;
    let n = f.read(&mut head).map_err(|e| OciError::io(path, e))?;
    Ok(match &head[..n] {
        [0x1f, 0x8b, ..] => media::OCI_LAYER_GZIP,
        [0x28, 0xb5, 0x2f, 0xfd] => media::OCI_LAYER_ZSTD,
        _ => media::OCI_LAYER,
    })
}

/// Move (or link) `file` into `layout` as a blob; its digest and size.
fn adopt(layout: &OciLayout, file: &Path) -> Result<(String, u64), OciError> {
    let (digest, size) = sha256_file(file)?;
    let to = layout.blob_path(&digest)?;
    if !to.exists() {
        std::fs::rename(file, &to)
            .or_else(|_| std::fs::copy(file, &to).map(|_| ()))
            .map_err(|e| OciError::io(file, e))?;
    }
    Ok((digest, size))
}

/// Unpack a `docker-archive:` into `scratch` and make it an OCI layout in
/// `scratch/layout`, tagged `image`. `reference`: a `RepoTags` entry or
/// `@N` (the N-th image); the only image when `None`.
pub fn open_docker_archive(
    archive: &Path,
    reference: Option<&str>,
    scratch: &Path,
) -> Result<(OciLayout, String), OciError> {
    let raw = scratch.join("raw");
    std::fs::create_dir_all(&raw).map_err(|e| OciError::io(&raw, e))?;
    untar(archive, &raw)?;
    let list = parse_json(
        &std::fs::read(raw.join("manifest.json")).map_err(|e| {
            invalid(
                archive,
                format!("no manifest.json ({e}): is it a `docker save` tar?"),
            )
        })?,
        &format!("{}: manifest.json", archive.display()),
    )?;
    let images = list
        .as_array()
        .ok_or_else(|| invalid(archive, "manifest.json is not a list"))?;
    let tags = |m: &Value| -> Vec<String> {
        m["RepoTags"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_str().map(String::from))
            .collect()
    };
    let all_tags = || images.iter().flat_map(tags).collect::<Vec<_>>().join(", ");
    let image = match reference {
        None if images.len() == 1 => &images[0],
        None => {
            return Err(invalid(
                archive,
                format!(
                    "it holds {} images; name one as docker-archive:PATH:REF or :@N (tags: {})",
                    images.len(),
                    all_tags()
                ),
            ));
        }
        Some(r) => match r.strip_prefix('@') {
            Some(n) => n
                .parse::<usize>()
                .ok()
                .and_then(|n| images.get(n))
                .ok_or_else(|| {
                    invalid(archive, format!("no image {r} (it holds {})", images.len()))
                })?,
            None => images
                .iter()
                .find(|m| {
                    tags(m)
                        .iter()
                        .any(|t| t == r || t.ends_with(&format!("/{r}")))
                })
                .ok_or_else(|| {
                    invalid(
                        archive,
                        format!("no image tagged {r} (tags: {})", all_tags()),
                    )
                })?,
        },
    };
    let file_of = |v: &Value, what: &str| -> Result<std::path::PathBuf, OciError> {
        let p = v
            .as_str()
            .ok_or_else(|| invalid(archive, format!("manifest.json: no {what}")))?;
        if Path::new(p)
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::RootDir))
        {
            return Err(invalid(archive, format!("{what} {p} leaves the archive")));
        }
        Ok(raw.join(p))
    };
    let dir = scratch.join("layout");
    let layout = OciLayout::open_or_create(&dir)?;
    let config_path = file_of(&image["Config"], "Config")?;
    let mut config = parse_json(
        &std::fs::read(&config_path).map_err(|e| OciError::io(&config_path, e))?,
        &format!("{}: image config", archive.display()),
    )?;
    let mut layers = Vec::new();
    for l in image["Layers"].as_array().into_iter().flatten() {
        let p = file_of(l, "layer")?;
        let media_type = layer_media_type(&p)?;
        let (digest, size) = adopt(&layout, &p)?;
        layers.push(json!({"mediaType": media_type, "digest": digest, "size": size}));
    }
    let diff_ids = config["rootfs"]["diff_ids"]
        .as_array()
        .map(Vec::len)
        .unwrap_or(0);
    if diff_ids != layers.len() {
        return Err(invalid(
            archive,
            format!(
                "{} layers but {diff_ids} diff_ids in its config",
                layers.len()
            ),
        ));
    }
    // Docker's config is an OCI config; the history and rest stay as they are.
    if config.get("rootfs").is_none() {
        config["rootfs"] = json!({"type": "layers", "diff_ids": []});
    }
    let (cd, cs) = layout.write_json(&config)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "config": {"mediaType": media::OCI_CONFIG, "digest": cd, "size": cs},
        "layers": layers,
    });
    let (md, ms) = layout.write_json(&manifest)?;
    let tag = "image".to_string();
    layout.set_tag(
        &tag,
        Descriptor {
            media_type: media::OCI_MANIFEST.into(),
            digest: md,
            size: ms,
            annotations: BTreeMap::new(),
            extra: Default::default(),
        },
    )?;
    let _ = std::fs::remove_dir_all(&raw);
    Ok((layout, tag))
}

/// The image manifest `desc` names in `layout`, through an index by
/// platform (`platforms`, else this machine's).
fn pick_manifest(
    layout: &OciLayout,
    desc: &Descriptor,
    platforms: &[PlatformFilter],
) -> Result<(Descriptor, Value), OciError> {
    let mut desc = desc.clone();
    for _ in 0..8 {
        let v = layout.read_json(&desc.digest)?;
        if !media::is_index(&desc.media_type) && v.get("manifests").is_none() {
            return Ok((desc, v));
        }
        let entries: Vec<Descriptor> = v["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| Descriptor::from_value(m, "index"))
            .collect::<Result<_, _>>()?;
        let want = if platforms.is_empty() {
            vec![host_platform()]
        } else {
            platforms.to_vec()
        };
        desc = entries
            .iter()
            .find(|e| {
                e.extra
                    .get("platform")
                    .is_some_and(|p| want.iter().any(|f| f.matches(p)))
            })
            .cloned()
            .ok_or_else(|| {
                OciError::Invalid(format!(
                    "a docker archive holds one platform's image: none for {} (the index has {}); choose one with --platform",
                    PlatformFilter::list(&want),
                    PlatformFilter::describe(&entries)
                ))
            })?;
    }
    Err(OciError::Invalid("indexes nested too deeply".into()))
}

fn host_platform() -> PlatformFilter {
    let architecture = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    };
    PlatformFilter {
        os: "linux".into(),
        architecture: architecture.into(),
        variant: None,
    }
}

/// Write the image `tag` of `layout` as a `docker-archive:` at `archive`,
/// tagged `repo_tag` (as `docker load` names it).
pub fn write_docker_archive(
    layout: &OciLayout,
    tag: &str,
    archive: &Path,
    repo_tag: Option<&str>,
    platforms: &[PlatformFilter],
) -> Result<(), OciError> {
    let top = layout.resolve(Some(tag))?;
    let (desc, manifest) = pick_manifest(layout, &top, platforms)?;
    let what = format!("manifest {}", desc.digest);
    let config = Descriptor::from_value(&manifest["config"], &what)?;
    let layers: Vec<Descriptor> = manifest["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| Descriptor::from_value(l, &what))
        .collect::<Result<_, _>>()?;
    // The archive names blobs as the layout does; a descriptor's digest
    // is parsed before it becomes a path in the archive.
    let blob_name = |d: &str| -> Result<String, OciError> {
        let d: stargaze_format::Digest = d.parse()?;
        Ok(format!("blobs/sha256/{}", d.hex()))
    };
    let entry = json!([{
        "Config": blob_name(&config.digest)?,
        "RepoTags": repo_tag.map(|t| vec![t.to_string()]).unwrap_or_default(),
        "Layers": layers.iter().map(|l| blob_name(&l.digest)).collect::<Result<Vec<_>, _>>()?,
    }]);
    let mut index_desc = desc.clone();
    index_desc.extra.remove("platform");
    if let Some(t) = repo_tag {
        index_desc
            .annotations
            .insert(crate::layout::CONTAINERD_IMAGE_NAME.into(), t.into());
    }
    let index = json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_INDEX,
        "manifests": [index_desc.to_value()],
    });
    let parent = archive.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-archive-")
        .tempfile_in(parent)
        .map_err(|e| OciError::io(parent, e))?;
    let mut b = tar::Builder::new(std::io::BufWriter::with_capacity(1 << 20, tmp.as_file()));
    let mut add_bytes = |name: &str, bytes: &[u8]| -> Result<(), OciError> {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, bytes)
            .map_err(|e| OciError::io(archive, e))
    };
    add_bytes("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add_bytes("index.json", &serde_json::to_vec(&index).expect("JSON"))?;
    add_bytes("manifest.json", &serde_json::to_vec(&entry).expect("JSON"))?;
    let mut seen = std::collections::HashSet::new();
    for d in std::iter::once(&desc)
        .chain(std::iter::once(&config))
        .chain(layers.iter())
    {
        if !seen.insert(d.digest.clone()) {
            continue;
        }
        let path = layout.blob_path(&d.digest)?;
        b.append_path_with_name(&path, blob_name(&d.digest)?)
            .map_err(|e| OciError::io(&path, e))?;
    }
    b.into_inner()
        .and_then(|mut w| std::io::Write::flush(&mut w))
        .map_err(|e| OciError::io(archive, e))?;
    tmp.persist(archive)
        .map_err(|e| OciError::io(archive, e.error))?;
    Ok(())
}
