//! Image-level conversion: index → manifests → config + layers.
//!
//! Each distinct layer is converted once (an image index often shares layers
//! between platforms), already lazily pullable layers of the target format are
//! verified and left alone, foreign layers are never touched. Descriptors keep
//! every field and annotation except the ones describing the old compression;
//! configs keep everything but `rootfs.diff_ids`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Instant;

use serde_json::{Value, json};
use stargaze_format::convert::{ConvertOptions, TargetFormat, convert_file};
use stargaze_format::{
    EXTERNAL_TOC_REF_SUFFIX, LayerFormat, OpenOptions, TOC_DIGEST_ANNOTATION,
    TOC_LAYER_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION, ZSTD_MANIFEST_CHECKSUM_ANNOTATION,
    ZSTD_MANIFEST_POSITION_ANNOTATION, ZSTD_V2_MANIFEST_CHECKSUM_ANNOTATION,
    ZSTD_V2_MANIFEST_POSITION_ANNOTATION, open_blob,
};

use crate::layout::{Descriptor, OciLayout};
use crate::platform::PlatformFilter;
use crate::store::{ImageDest, ImageSource, LocalBlob, parse_json};
use crate::{OciError, media};

/// How to convert an image.
#[derive(Debug, Clone, Default)]
pub struct ImageConvertOptions {
    pub layer: ConvertOptions,
    /// Where compressed input layers are decompressed (default: the
    /// destination's blob directory, which has room for the output anyway).
    pub tmp_dir: Option<PathBuf>,
}

/// What happened to one layer.
#[derive(Debug, Clone)]
pub enum LayerOutcome {
    Converted {
        old_size: u64,
        new: Descriptor,
        toc_digest: String,
        uncompressed_size: u64,
        seconds: f64,
        missing_prioritized: Vec<String>,
    },
    /// Already in the target format, with a TOC matching its annotation.
    AlreadyLazy { toc_digest: String },
    /// Not an image layer we convert (foreign or unknown media type).
    Kept { reason: String },
}

/// Progress of a conversion, for a terminal or a log.
#[derive(Debug)]
pub enum LayerEvent<'a> {
    Started {
        layer: &'a str,
        size: u64,
    },
    Progress {
        layer: &'a str,
        done: u64,
        total: u64,
    },
    /// Bytes of a layer moved from the source or to the destination.
    Transfer {
        layer: &'a str,
        direction: Direction,
        done: u64,
        total: u64,
    },
    Finished {
        layer: &'a str,
        outcome: &'a LayerOutcome,
    },
}

/// Which way a [`LayerEvent::Transfer`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Pull,
    Push,
}

/// The result of [`convert_image`].
#[derive(Debug, Clone)]
pub struct ConvertReport {
    /// What the destination tag now points at.
    pub image: Descriptor,
    /// Per source layer digest, in the order met.
    pub layers: Vec<(String, LayerOutcome)>,
    /// The external TOC image (`<tag>-esgztoc`), when one was written.
    pub toc_image: Option<(String, Descriptor)>,
}

struct LayerResult {
    desc: Descriptor,
    diff_id: Option<String>,
    toc: Option<(Descriptor, String)>, // external TOC layer and its diff_id
}

struct Converter<'a> {
    src: &'a dyn ImageSource,
    dst: &'a dyn ImageDest,
    image: String,
    opts: &'a ImageConvertOptions,
    platforms: &'a [PlatformFilter],
    on_event: &'a (dyn Fn(LayerEvent<'_>) + Sync),
    done: HashMap<String, LayerResult>,
    report: Vec<(String, LayerOutcome)>,
    /// External TOC layers per converted manifest, with its platform.
    toc_manifests: Vec<(Value, Vec<(Descriptor, String)>)>,
}

fn target_media_type(f: TargetFormat) -> &'static str {
    match f {
        TargetFormat::Estargz => media::OCI_LAYER_GZIP,
        TargetFormat::ZstdChunked => media::OCI_LAYER_ZSTD,
    }
}

/// Annotations that describe a layer's old compression or TOC.
const STALE_ANNOTATIONS: &[&str] = &[
    TOC_DIGEST_ANNOTATION,
    UNCOMPRESSED_SIZE_ANNOTATION,
    ZSTD_MANIFEST_CHECKSUM_ANNOTATION,
    ZSTD_MANIFEST_POSITION_ANNOTATION,
    ZSTD_V2_MANIFEST_CHECKSUM_ANNOTATION,
    ZSTD_V2_MANIFEST_POSITION_ANNOTATION,
    "io.github.containers.zstd-chunked.tarsplit-position",
    "containerd.io/uncompressed",
];

impl Converter<'_> {
    fn transfer(&self, layer: &str, direction: Direction, done: u64, total: u64) {
        (self.on_event)(LayerEvent::Transfer {
            layer,
            direction,
            done,
            total,
        })
    }

    /// Carry a blob over unchanged.
    fn copy(&self, d: &Descriptor, local: Option<&LocalBlob>) -> Result<(), OciError> {
        let progress = |done, total| self.transfer(&d.digest, Direction::Push, done, total);
        self.dst.copy_blob(self.src, d, local, &progress)?;
        Ok(())
    }

    fn local_blob(&self, d: &Descriptor) -> Result<LocalBlob, OciError> {
        let progress = |done, total| self.transfer(&d.digest, Direction::Pull, done, total);
        self.src.local_blob(d, &progress)
    }

    fn layer_error(&self, layer: &str, source: stargaze_format::Error) -> OciError {
        OciError::Layer {
            image: self.image.clone(),
            layer: layer.to_string(),
            source: Box::new(source),
        }
    }

    /// Could the layer already be lazily pullable in the target format?
    /// (Its descriptor says so; [`Converter::already_lazy`] checks.)
    /// Not when files are prioritized: the entries must be reordered.
    fn maybe_lazy(&self, d: &Descriptor) -> bool {
        let reorder = self
            .opts
            .layer
            .prioritized_files
            .as_ref()
            .is_some_and(|p| !p.is_empty());
        !reorder
            && d.annotations.contains_key(TOC_DIGEST_ANNOTATION)
            && (d.media_type == target_media_type(self.opts.layer.format)
                || (self.opts.layer.format == TargetFormat::Estargz
                    && d.media_type == media::DOCKER_LAYER_GZIP))
    }

    /// Is the layer (its bytes at `local`) already lazily pullable in the
    /// target format, with a TOC matching its annotation?
    fn already_lazy(&self, d: &Descriptor, local: &LocalBlob) -> Option<String> {
        let want = match self.opts.layer.format {
            TargetFormat::Estargz => LayerFormat::Estargz,
            TargetFormat::ZstdChunked => LayerFormat::ZstdChunked,
        };
        let toc: stargaze_format::Digest =
            d.annotations.get(TOC_DIGEST_ANNOTATION)?.parse().ok()?;
        let file = std::fs::File::open(local.path()).ok()?;
        let opts = OpenOptions {
            expected_toc_digest: Some(toc),
            ..Default::default()
        };
        // An external-TOC layer cannot be checked here; convert it again.
        let layer = open_blob(&d.digest, &file, &opts).ok()?;
        (layer.format() == want).then(|| toc.to_string())
    }

    fn read_manifest(&self, d: &Descriptor) -> Result<Value, OciError> {
        let bytes = self.src.read_manifest(d)?;
        parse_json(
            &bytes,
            &format!("{}, {} {}", self.image, d.media_type, d.digest),
        )
    }

    fn write_json(&self, v: &Value) -> Result<(String, u64), OciError> {
        self.dst
            .put_blob(&serde_json::to_vec(v).expect("JSON values serialise"))
    }

    fn write_manifest(&self, v: &Value, media_type: &str) -> Result<(String, u64), OciError> {
        self.dst.put_manifest(
            &serde_json::to_vec(v).expect("JSON values serialise"),
            media_type,
        )
    }

    fn convert_layer(&mut self, d: &Descriptor) -> Result<&LayerResult, OciError> {
        if self.done.contains_key(&d.digest) {
            return Ok(&self.done[&d.digest]);
        }
        // The source's bytes on disk when the layer may be lazy already:
        // checked, then carried over or converted without a second read.
        let mut local = if media::is_layer(&d.media_type) && self.maybe_lazy(d) {
            Some(self.local_blob(d)?)
        } else {
            None
        };
        let lazy = local.as_ref().and_then(|l| self.already_lazy(d, l));
        let (result, outcome) = if !media::is_layer(&d.media_type) {
            self.copy(d, None)?;
            let reason = if media::is_foreign_layer(&d.media_type) {
                "foreign layer".to_string()
            } else {
                format!("media type {} is not an image layer", d.media_type)
            };
            (
                LayerResult {
                    desc: d.clone(),
                    diff_id: None,
                    toc: None,
                },
                LayerOutcome::Kept { reason },
            )
        } else if let Some(toc_digest) = lazy {
            self.copy(d, local.as_ref())?;
            let mut desc = d.clone();
            if desc.media_type == media::DOCKER_LAYER_GZIP {
                // The manifest becomes an OCI manifest; say so for its layers too.
                desc.media_type = media::OCI_LAYER_GZIP.to_string();
            }
            (
                LayerResult {
                    desc,
                    diff_id: None,
                    toc: None,
                },
                LayerOutcome::AlreadyLazy { toc_digest },
            )
        } else {
            (self.on_event)(LayerEvent::Started {
                layer: &d.digest,
                size: d.size,
            });
            let start = Instant::now();
            let input = match local.take() {
                Some(l) => l,
                None => self.local_blob(d)?,
            };
            let tmp = self.dst.temp_file()?;
            let tmp_dir = self
                .opts
                .tmp_dir
                .clone()
                .unwrap_or_else(|| self.dst.scratch_dir());
            let layer_name = d.digest.clone();
            let on_event = self.on_event;
            let progress = |done: u64, total: u64| {
                on_event(LayerEvent::Progress {
                    layer: &layer_name,
                    done,
                    total,
                })
            };
            let out = std::io::BufWriter::with_capacity(1 << 20, tmp.as_file());
            let res = convert_file(
                &d.digest,
                input.path(),
                &tmp_dir,
                out,
                &self.opts.layer,
                Some(&progress),
            )
            .map_err(|e| self.layer_error(&d.digest, e))?;
            // The input is not needed any more: keep the spill small.
            drop(input);
            let new_digest = res.digest.to_string();
            let push = |done, total| self.transfer(&d.digest, Direction::Push, done, total);
            self.dst.put_layer(tmp, &new_digest, res.size, &push)?;
            let mut annotations = d.annotations.clone();
            for k in STALE_ANNOTATIONS {
                annotations.remove(*k);
            }
            annotations.insert(TOC_DIGEST_ANNOTATION.into(), res.toc_digest.to_string());
            annotations.insert(
                UNCOMPRESSED_SIZE_ANNOTATION.into(),
                res.uncompressed_size.to_string(),
            );
            if let Some((checksum, position)) = &res.zstd_manifest {
                annotations.insert(
                    ZSTD_MANIFEST_CHECKSUM_ANNOTATION.into(),
                    checksum.to_string(),
                );
                annotations.insert(ZSTD_MANIFEST_POSITION_ANNOTATION.into(), position.clone());
            }
            let desc = Descriptor {
                media_type: target_media_type(self.opts.layer.format).to_string(),
                digest: new_digest.clone(),
                size: res.size,
                annotations,
                extra: d.extra.clone(),
            };
            let toc = match &res.external_toc {
                Some(ext) => {
                    let (digest, size) = self.dst.put_blob(&ext.bytes)?;
                    let mut annotations = BTreeMap::new();
                    annotations.insert(TOC_LAYER_DIGEST_ANNOTATION.to_string(), new_digest.clone());
                    Some((
                        Descriptor {
                            media_type: media::OCI_LAYER_GZIP.to_string(),
                            digest,
                            size,
                            annotations,
                            extra: Default::default(),
                        },
                        ext.diff_id.to_string(),
                    ))
                }
                None => None,
            };
            (
                LayerResult {
                    desc: desc.clone(),
                    diff_id: Some(res.diff_id.to_string()),
                    toc,
                },
                LayerOutcome::Converted {
                    old_size: d.size,
                    new: desc,
                    toc_digest: res.toc_digest.to_string(),
                    uncompressed_size: res.uncompressed_size,
                    seconds: start.elapsed().as_secs_f64(),
                    missing_prioritized: res.missing_prioritized,
                },
            )
        };
        (self.on_event)(LayerEvent::Finished {
            layer: &d.digest,
            outcome: &outcome,
        });
        self.report.push((d.digest.clone(), outcome));
        self.done.insert(d.digest.clone(), result);
        Ok(&self.done[&d.digest])
    }

    fn convert_manifest(&mut self, desc: &Descriptor) -> Result<Descriptor, OciError> {
        let mut manifest = self.read_manifest(desc)?;
        let what = format!("{}, manifest {}", self.image, desc.digest);
        let config_desc = Descriptor::from_value(&manifest["config"], &what)?;
        let mut config = parse_json(
            &self.src.read_blob(&config_desc.digest)?,
            &format!("{what}, config {}", config_desc.digest),
        )?;
        let layers: Vec<Descriptor> = manifest["layers"]
            .as_array()
            .ok_or_else(|| OciError::Invalid(format!("{what}: no layers list")))?
            .iter()
            .map(|l| Descriptor::from_value(l, &what))
            .collect::<Result<_, _>>()?;
        let mut diff_ids: Vec<Value> = config["rootfs"]["diff_ids"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if diff_ids.len() != layers.len() {
            return Err(OciError::Invalid(format!(
                "{what}: {} layers but {} diff_ids in config {}",
                layers.len(),
                diff_ids.len(),
                config_desc.digest
            )));
        }
        let mut new_layers = Vec::with_capacity(layers.len());
        let mut tocs = Vec::new();
        for (i, l) in layers.iter().enumerate() {
            let r = self.convert_layer(l)?;
            new_layers.push(r.desc.to_value());
            if let Some(d) = &r.diff_id {
                diff_ids[i] = Value::String(d.clone());
            }
            if let Some(t) = &r.toc {
                tocs.push(t.clone());
            }
        }
        config["rootfs"]["diff_ids"] = Value::Array(diff_ids);
        let (config_digest, config_size) = self.write_json(&config)?;
        let mut new_config = config_desc.clone();
        new_config.media_type = media::OCI_CONFIG.to_string();
        new_config.digest = config_digest;
        new_config.size = config_size;
        manifest["config"] = new_config.to_value();
        manifest["layers"] = Value::Array(new_layers);
        manifest["mediaType"] = Value::String(media::OCI_MANIFEST.into());
        manifest["schemaVersion"] = json!(2);
        let (digest, size) = self.write_manifest(&manifest, media::OCI_MANIFEST)?;
        if !tocs.is_empty() {
            let platform = json!({
                "architecture": config["architecture"].clone(),
                "os": config["os"].clone(),
            });
            self.toc_manifests.push((platform, tocs));
        }
        let mut out = desc.clone();
        out.media_type = media::OCI_MANIFEST.to_string();
        out.digest = digest;
        out.size = size;
        Ok(out)
    }

    fn convert_node(&mut self, desc: &Descriptor, depth: usize) -> Result<Descriptor, OciError> {
        if depth > 8 {
            return Err(OciError::Invalid(format!(
                "{}: indexes nested too deeply",
                self.image
            )));
        }
        if media::is_manifest(&desc.media_type) {
            return self.convert_manifest(desc);
        }
        if !media::is_index(&desc.media_type) {
            // Signatures, artifacts: carried over unchanged.
            self.copy_artifact(desc)?;
            return Ok(desc.clone());
        }
        let mut index = self.read_manifest(desc)?;
        let what = format!("{}, index {}", self.image, desc.digest);
        let all: Vec<Descriptor> = index["manifests"]
            .as_array()
            .ok_or_else(|| OciError::Invalid(format!("{what}: no manifests list")))?
            .iter()
            .map(|m| Descriptor::from_value(m, &what))
            .collect::<Result<_, _>>()?;
        let entries: Vec<Descriptor> = all
            .iter()
            .filter(|e| PlatformFilter::keep(self.platforms, e.extra.get("platform")))
            .cloned()
            .collect();
        if entries.is_empty() && !all.is_empty() {
            return Err(OciError::Invalid(format!(
                "{what}: no manifest for platform {} (the index has {})",
                PlatformFilter::list(self.platforms),
                PlatformFilter::describe(&all)
            )));
        }
        let mut new_entries = Vec::with_capacity(entries.len());
        for e in &entries {
            new_entries.push(self.convert_node(e, depth + 1)?.to_value());
        }
        index["manifests"] = Value::Array(new_entries);
        index["mediaType"] = Value::String(media::OCI_INDEX.into());
        let (digest, size) = self.write_manifest(&index, media::OCI_INDEX)?;
        let mut out = desc.clone();
        out.media_type = media::OCI_INDEX.to_string();
        out.digest = digest;
        out.size = size;
        Ok(out)
    }

    /// A manifest that is not an image: its blobs, then itself, unchanged.
    fn copy_artifact(&mut self, desc: &Descriptor) -> Result<(), OciError> {
        let what = format!("{}, {} {}", self.image, desc.media_type, desc.digest);
        if let Ok(v) = parse_json(&self.src.read_manifest(desc)?, &what) {
            let blobs = v["config"]
                .as_object()
                .map(|_| &v["config"])
                .into_iter()
                .chain(v["layers"].as_array().into_iter().flatten())
                .chain(v["blobs"].as_array().into_iter().flatten());
            for b in blobs {
                self.copy(&Descriptor::from_value(b, &what)?, None)?;
            }
        }
        self.dst.copy_manifest(self.src, desc)
    }

    /// The `<tag>-esgztoc` image: per platform, a manifest whose layers are
    /// the TOC blobs, each annotated with the eStargz layer it belongs to.
    fn write_toc_image(&self) -> Result<Option<Descriptor>, OciError> {
        let mut manifests = Vec::new();
        for (platform, tocs) in &self.toc_manifests {
            let config = json!({
                "architecture": platform["architecture"],
                "os": platform["os"],
                "rootfs": {
                    "type": "layers",
                    "diff_ids": tocs.iter().map(|(_, d)| d.clone()).collect::<Vec<_>>(),
                },
            });
            let (cd, cs) = self.write_json(&config)?;
            let manifest = json!({
                "schemaVersion": 2,
                "mediaType": media::OCI_MANIFEST,
                "config": { "mediaType": media::OCI_CONFIG, "digest": cd, "size": cs },
                "layers": tocs.iter().map(|(d, _)| d.to_value()).collect::<Vec<_>>(),
            });
            let (md, ms) = self.write_manifest(&manifest, media::OCI_MANIFEST)?;
            let mut extra = serde_json::Map::new();
            extra.insert("platform".into(), platform.clone());
            manifests.push(Descriptor {
                media_type: media::OCI_MANIFEST.into(),
                digest: md,
                size: ms,
                annotations: BTreeMap::new(),
                extra,
            });
        }
        match manifests.len() {
            0 => Ok(None),
            1 => Ok(manifests.pop()),
            _ => {
                let index = json!({
                    "schemaVersion": 2,
                    "mediaType": media::OCI_INDEX,
                    "manifests": manifests.iter().map(Descriptor::to_value).collect::<Vec<_>>(),
                });
                let (d, s) = self.write_manifest(&index, media::OCI_INDEX)?;
                Ok(Some(Descriptor {
                    media_type: media::OCI_INDEX.into(),
                    digest: d,
                    size: s,
                    annotations: BTreeMap::new(),
                    extra: Default::default(),
                }))
            }
        }
    }
}

/// Convert the image `src_tag` of `src` into `dst` under `dst_tag`.
pub fn convert_image(
    src: &OciLayout,
    src_tag: Option<&str>,
    dst: &OciLayout,
    dst_tag: &str,
    opts: &ImageConvertOptions,
    on_event: &(dyn Fn(LayerEvent<'_>) + Sync),
) -> Result<ConvertReport, OciError> {
    let image = match src_tag {
        Some(t) => format!("oci:{}:{t}", src.root().display()),
        None => format!("oci:{}", src.root().display()),
    };
    convert_between(&image, src, src_tag, dst, dst_tag, opts, &[], on_event)
}

/// Convert the image `src_tag` of any source (`image`: its name for
/// messages) into any destination under `dst_tag`, keeping only the
/// index entries of `platforms` (all when empty).
#[allow(clippy::too_many_arguments)]
pub fn convert_between(
    image: &str,
    src: &dyn ImageSource,
    src_tag: Option<&str>,
    dst: &dyn ImageDest,
    dst_tag: &str,
    opts: &ImageConvertOptions,
    platforms: &[PlatformFilter],
    on_event: &(dyn Fn(LayerEvent<'_>) + Sync),
) -> Result<ConvertReport, OciError> {
    let top = src.resolve(src_tag)?;
    let mut c = Converter {
        src,
        dst,
        image: image.to_string(),
        opts,
        platforms,
        on_event,
        done: HashMap::new(),
        report: Vec::new(),
        toc_manifests: Vec::new(),
    };
    let mut new_top = c.convert_node(&top, 0)?;
    let toc_image = match c.write_toc_image()? {
        Some(desc) => {
            let tag = format!("{dst_tag}{EXTERNAL_TOC_REF_SUFFIX}");
            dst.set_tag(&tag, &desc)?;
            Some((tag, desc))
        }
        None => None,
    };
    // The source's tag annotations do not belong to the new image.
    new_top.annotations.remove(crate::layout::REF_NAME);
    new_top
        .annotations
        .remove(crate::layout::CONTAINERD_IMAGE_NAME);
    dst.set_tag(dst_tag, &new_top)?;
    Ok(ConvertReport {
        image: new_top,
        layers: c.report,
        toc_image,
    })
}
