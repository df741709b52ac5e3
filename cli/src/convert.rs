//! `stargaze convert`.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use stargaze_format::convert::{ConvertOptions, DEFAULT_CHUNK_SIZE, TargetFormat};
use stargaze_oci::{
    ImageConvertOptions, ImageLocation, LayerEvent, LayerOutcome, OciError, OciLayout,
};

#[derive(clap::Args)]
pub struct Args {
    /// Source image: oci:DIR[:TAG] (docker://REF once the registry client exists).
    src: String,
    /// Destination image: oci:DIR[:TAG] (may be the source layout; default tag: the source's).
    dst: String,
    /// Output format.
    #[arg(long, value_parser = ["estargz", "zstdchunked"], default_value = "estargz")]
    format: String,
    /// Same as --format estargz (ctr-remote's flag).
    #[arg(long, conflicts_with_all = ["zstdchunked"])]
    estargz: bool,
    /// Same as --format zstdchunked (ctr-remote's flag).
    #[arg(long)]
    zstdchunked: bool,
    /// Accepted for ctr-remote compatibility: the output is always OCI.
    #[arg(long, hide = true)]
    oci: bool,
    /// Largest uncompressed chunk of a file (4194304, 4MiB, 64KiB).
    #[arg(long, value_parser = crate::parse_size, default_value_t = DEFAULT_CHUNK_SIZE)]
    chunk_size: u64,
    /// Let small files share a compressed member until it holds this many bytes.
    #[arg(long, value_parser = crate::parse_size, default_value_t = 0)]
    min_chunk_size: u64,
    /// Files the workload reads first, one path per line ('#' comments):
    /// they go first and the layer gets a prefetch landmark.
    #[arg(long, value_name = "FILE")]
    prioritized_files: Option<PathBuf>,
    /// Put each layer's TOC into a separate image tagged <DST tag>-esgztoc.
    #[arg(long)]
    external_toc: bool,
    /// Keep the layers' uncompressed bytes, and so their diffIDs (needs --external-toc).
    #[arg(long, requires = "external_toc")]
    keep_diff_id: bool,
    /// gzip: libdeflate level 1-12 (default 6); zstd: 1-22 (default 3).
    #[arg(long)]
    compression_level: Option<i32>,
    /// Compression threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Where compressed input layers are decompressed (default: beside the output blobs).
    #[arg(long)]
    tmp_dir: Option<PathBuf>,
}

fn read_prioritized(path: &PathBuf) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the prioritized files list {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect())
}

fn layout_of(loc: &ImageLocation, create: bool) -> Result<(OciLayout, Option<String>)> {
    match loc {
        ImageLocation::Oci { dir, tag } => {
            let layout = if create {
                OciLayout::open_or_create(dir)
            } else {
                OciLayout::open(dir)
            }
            .with_context(|| format!("opening {loc}"))?;
            Ok((layout, tag.clone()))
        }
        ImageLocation::Docker { reference } => {
            Err(OciError::RegistryUnsupported(format!("docker://{reference}")).into())
        }
    }
}

fn short(d: &str) -> &str {
    &d[..d.len().min(19)]
}

fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

pub fn run(a: Args) -> Result<ExitCode> {
    let format = if a.zstdchunked || a.format == "zstdchunked" && !a.estargz {
        TargetFormat::ZstdChunked
    } else {
        TargetFormat::Estargz
    };
    if a.keep_diff_id && format == TargetFormat::ZstdChunked {
        bail!("--keep-diff-id and --external-toc are only defined for eStargz");
    }
    let src_loc = ImageLocation::parse(&a.src)?;
    let dst_loc = ImageLocation::parse(&a.dst)?;
    let (src, src_tag) = layout_of(&src_loc, false)?;
    let (dst, dst_tag) = layout_of(&dst_loc, true)?;
    let Some(dst_tag) = dst_tag.or_else(|| src_tag.clone()) else {
        bail!("{}: name the destination tag (oci:DIR:TAG)", a.dst);
    };
    let prioritized = a
        .prioritized_files
        .as_ref()
        .map(read_prioritized)
        .transpose()?;
    let opts = ImageConvertOptions {
        layer: ConvertOptions {
            format,
            chunk_size: a.chunk_size,
            min_chunk_size: a.min_chunk_size,
            prioritized_files: prioritized,
            external_toc: a.external_toc,
            keep_diff_id: a.keep_diff_id,
            level: a.compression_level,
            threads: a.threads,
        },
        tmp_dir: a.tmp_dir.clone(),
    };

    // A bar per layer on a terminal, plain lines otherwise.
    let tty = std::io::stderr().is_terminal();
    let multi = MultiProgress::new();
    let bars: Mutex<HashMap<String, ProgressBar>> = Mutex::new(HashMap::new());
    let style = ProgressStyle::with_template(
        "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
    )
    .expect("valid template")
    .progress_chars("=> ");
    let on_event = |ev: LayerEvent<'_>| match ev {
        LayerEvent::Started { layer, size } => {
            if tty {
                let bar = multi.add(ProgressBar::new(0));
                bar.set_style(style.clone());
                bar.set_prefix(short(layer).to_string());
                bars.lock().expect("bars").insert(layer.to_string(), bar);
            } else {
                eprintln!("converting {} ({:.1} MB)", short(layer), mb(size));
            }
        }
        LayerEvent::Progress { layer, done, total } => {
            if let Some(bar) = bars.lock().expect("bars").get(layer) {
                bar.set_length(total);
                bar.set_position(done);
            }
        }
        LayerEvent::Finished { layer, outcome } => {
            if let Some(bar) = bars.lock().expect("bars").remove(layer) {
                bar.finish_and_clear();
            }
            let line = match outcome {
                LayerOutcome::Converted {
                    old_size,
                    new,
                    toc_digest,
                    uncompressed_size,
                    seconds,
                    missing_prioritized,
                } => {
                    for m in missing_prioritized {
                        eprintln!(
                            "warning: layer {}: prioritized file {m:?} is not in the layer",
                            short(layer)
                        );
                    }
                    format!(
                        "{} {:.1} MB -> {} {:.1} MB, TOC {}, {:.1} s, {:.0} MB/s",
                        short(layer),
                        mb(*old_size),
                        short(&new.digest),
                        mb(new.size),
                        short(toc_digest),
                        seconds,
                        mb(*uncompressed_size) / seconds.max(1e-6)
                    )
                }
                LayerOutcome::AlreadyLazy { toc_digest } => {
                    format!(
                        "{} already lazily pullable (TOC {}), kept",
                        short(layer),
                        short(toc_digest)
                    )
                }
                LayerOutcome::Kept { reason } => format!("{} kept: {reason}", short(layer)),
            };
            if tty {
                let _ = multi.println(line);
            } else {
                eprintln!("{line}");
            }
        }
    };
    let start = Instant::now();
    let report =
        stargaze_oci::convert_image(&src, src_tag.as_deref(), &dst, &dst_tag, &opts, &on_event)
            .with_context(|| format!("converting {} to {}", a.src, a.dst))?;
    let converted = report
        .layers
        .iter()
        .filter(|(_, o)| matches!(o, LayerOutcome::Converted { .. }))
        .count();
    println!(
        "{}: {} layers converted, {} kept, in {:.1} s; {} -> oci:{}:{dst_tag}",
        a.src,
        converted,
        report.layers.len() - converted,
        start.elapsed().as_secs_f64(),
        report.image.digest,
        dst.root().display()
    );
    if let Some((tag, desc)) = &report.toc_image {
        println!(
            "external TOC image: oci:{}:{tag} ({})",
            dst.root().display(),
            desc.digest
        );
    }
    Ok(ExitCode::SUCCESS)
}
