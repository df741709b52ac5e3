//! `stargaze convert`: between OCI layouts, registries and archives.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use stargaze_format::convert::{ConvertOptions, DEFAULT_CHUNK_SIZE, TargetFormat};
use stargaze_oci::{ImageConvertOptions, ImageLocation, LayerOutcome, PlatformFilter};

use crate::convert_progress::Progress;
use crate::image_store::{RegistryAccess, open_dest, open_source};

#[derive(clap::Args)]
pub struct Args {
    /// Source image: oci:DIR[:TAG], docker://REF, oci-archive:PATH[:REF] or
    /// docker-archive:PATH[:REF|:@N] (skopeo's names).
    pub src: String,
    /// Destination image, in the same forms (an oci: layout may be the
    /// source's; default tag: the source's).
    pub dst: String,
    /// Output format.
    #[arg(long, value_parser = ["estargz", "zstdchunked"], default_value = "estargz")]
    pub format: String,
    /// Same as --format estargz (ctr-remote's flag).
    #[arg(long, conflicts_with_all = ["zstdchunked"])]
    pub estargz: bool,
    /// Same as --format zstdchunked (ctr-remote's flag).
    #[arg(long)]
    pub zstdchunked: bool,
    /// Accepted for ctr-remote compatibility: the output is always OCI.
    #[arg(long, hide = true)]
    pub oci: bool,
    /// Largest uncompressed chunk of a file (4194304, 4MiB, 64KiB; K/M/G
    /// and KiB/MiB/GiB are powers of 1024, KB/MB/GB of 1000).
    #[arg(long, value_parser = crate::parse_size, default_value_t = DEFAULT_CHUNK_SIZE)]
    pub chunk_size: u64,
    /// Let small files share a compressed member until it holds this many
    /// bytes (units as for --chunk-size).
    #[arg(long, value_parser = crate::parse_size, default_value_t = 0)]
    pub min_chunk_size: u64,
    /// Files the workload reads first, one path per line ('#' comments):
    /// they go first and the layer gets a prefetch landmark.
    #[arg(long, value_name = "FILE")]
    pub prioritized_files: Option<PathBuf>,
    /// Put each layer's TOC into a separate image tagged <DST tag>-esgztoc.
    #[arg(long)]
    pub external_toc: bool,
    /// Keep the layers' uncompressed bytes, and so their diffIDs (needs --external-toc).
    #[arg(long, requires = "external_toc")]
    pub keep_diff_id: bool,
    /// gzip: libdeflate level 1-12 (default 6); zstd: 1-22 (default 3).
    #[arg(long)]
    pub compression_level: Option<i32>,
    /// Compression threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Where compressed input layers are decompressed (default: beside the output blobs).
    #[arg(long)]
    pub tmp_dir: Option<PathBuf>,
    /// Convert only these platforms of an index (os/arch[/variant];
    /// repeat or separate with commas). Default: all of them.
    #[arg(long, value_delimiter = ',')]
    pub platform: Vec<String>,
    /// Accepted for nerdctl compatibility: every platform is converted
    /// unless --platform says otherwise.
    #[arg(long, hide = true)]
    pub all_platforms: bool,
    /// Talk plain HTTP to the registries (source and destination).
    #[arg(long)]
    pub plain_http: bool,
    /// Talk HTTPS to the registries without verifying their certificates.
    #[arg(long, conflicts_with = "plain_http")]
    pub insecure: bool,
    /// Directory of containerd `hosts.toml` files (mirrors, CAs, headers).
    #[arg(long, default_value = "/etc/containerd/certs.d")]
    pub hosts_dir: PathBuf,
    /// Where layers from and to registries are kept while converted: one
    /// layer at a time (its download, its tar and its converted form).
    #[arg(long, env = "TMPDIR", default_value = "/var/tmp")]
    pub spill_dir: PathBuf,
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

pub fn run(a: Args) -> Result<ExitCode> {
    run_with(a, None)
}

/// [`run`], with the prioritized files given as a list (nerdctl's record
/// files) instead of `--prioritized-files`.
pub fn run_with(a: Args, prioritized: Option<Vec<String>>) -> Result<ExitCode> {
    let format = if a.zstdchunked || a.format == "zstdchunked" && !a.estargz {
        TargetFormat::ZstdChunked
    } else {
        TargetFormat::Estargz
    };
    if a.keep_diff_id && format == TargetFormat::ZstdChunked {
        bail!("--keep-diff-id and --external-toc are only defined for eStargz");
    }
    let platforms: Vec<PlatformFilter> = a
        .platform
        .iter()
        .filter(|p| !p.trim().is_empty())
        .map(|p| PlatformFilter::parse(p))
        .collect::<Result<_, _>>()?;
    let src_loc = ImageLocation::parse(&a.src)?;
    let dst_loc = ImageLocation::parse(&a.dst)?;
    std::fs::create_dir_all(&a.spill_dir)
        .with_context(|| format!("creating the spill directory {}", a.spill_dir.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let access = RegistryAccess {
        hosts_dir: a.hosts_dir.clone(),
        plain_http: a.plain_http,
        insecure: a.insecure,
        spill_dir: a.spill_dir.clone(),
        rt: Arc::new(rt),
    };
    let src = open_source(&src_loc, &access)?;
    let dst = open_dest(&dst_loc, &access)?;
    let Some(dst_tag) = dst.tag.clone().or_else(|| src.default_tag.clone()) else {
        bail!("{}: name the destination tag (oci:DIR:TAG)", a.dst);
    };
    let prioritized = match prioritized {
        Some(p) => Some(p),
        None => a
            .prioritized_files
            .as_ref()
            .map(read_prioritized)
            .transpose()?,
    };
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

    let progress = Progress::new();
    let on_event = |ev: stargaze_oci::LayerEvent<'_>| progress.event(ev);
    let start = Instant::now();
    let report = stargaze_oci::convert_between(
        &a.src,
        src.image.as_ref(),
        src.tag.as_deref(),
        dst.image(),
        &dst_tag,
        &opts,
        &platforms,
        &on_event,
    )
    .with_context(|| format!("converting {} to {}", a.src, a.dst))?;
    dst.finish(&dst_tag, &platforms)?;
    let converted = report
        .layers
        .iter()
        .filter(|(_, o)| matches!(o, LayerOutcome::Converted { .. }))
        .count();
    println!(
        "{}: {} layers converted, {} kept, in {:.1} s; {} -> {}",
        a.src,
        converted,
        report.layers.len() - converted,
        start.elapsed().as_secs_f64(),
        report.image.digest,
        a.dst
    );
    if let Some(r) = &dst.registry {
        let s = &r.stats;
        println!(
            "pushed {} blobs ({:.1} MB), {} already there, {} mounted, {} manifests",
            s.uploaded.load(Ordering::Relaxed),
            crate::convert_progress::mb(s.uploaded_bytes.load(Ordering::Relaxed)),
            s.existing.load(Ordering::Relaxed),
            s.mounted.load(Ordering::Relaxed),
            s.manifests.load(Ordering::Relaxed),
        );
    }
    if let Some((tag, desc)) = &report.toc_image {
        println!("external TOC image: {tag} ({})", desc.digest);
    }
    Ok(ExitCode::SUCCESS)
}
