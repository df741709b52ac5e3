//! `stargaze image convert`: `stargaze convert` under nerdctl's name and
//! flags (`nerdctl image convert`, `ctr-remote image convert`), so their
//! scripts work by changing the command. Plain references are registry
//! images (`docker://` is implied); transports are accepted too.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use stargaze_format::convert::DEFAULT_CHUNK_SIZE;

use crate::convert;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Convert an image (nerdctl's flags): SOURCE_REF TARGET_REF.
    Convert(Args),
}

#[derive(clap::Args)]
pub struct Args {
    /// The image to convert (registry reference, or a transport:location).
    source_ref: String,
    /// Where the converted image goes.
    target_ref: String,
    /// Convert to eStargz.
    #[arg(long)]
    estargz: bool,
    /// Convert to zstd:chunked.
    #[arg(long, conflicts_with = "estargz")]
    zstdchunked: bool,
    /// Accepted: the output is always an OCI image.
    #[arg(long)]
    oci: bool,
    /// Read files to prioritize from a record file (`ctr-remote optimize
    /// --record-out`: JSON lines with a "path").
    #[arg(long, value_name = "FILE")]
    estargz_record_in: Option<PathBuf>,
    /// Same as --estargz-record-in, for zstd:chunked.
    #[arg(long, value_name = "FILE")]
    zstdchunked_record_in: Option<PathBuf>,
    /// eStargz compression level (gzip 1-9; libdeflate takes up to 12).
    #[arg(long)]
    estargz_compression_level: Option<i32>,
    /// eStargz chunk size (bytes; 0 = default).
    #[arg(long, default_value_t = 0)]
    estargz_chunk_size: u64,
    /// Let small files share a gzip member until it holds this many bytes.
    #[arg(long, default_value_t = 0)]
    estargz_min_chunk_size: u64,
    /// Put the TOCs into a separate image tagged <TARGET>-esgztoc.
    #[arg(long)]
    estargz_external_toc: bool,
    /// Keep the layers' diffIDs (needs --estargz-external-toc).
    #[arg(long, requires = "estargz_external_toc")]
    estargz_keep_diff_id: bool,
    /// zstd:chunked compression level.
    #[arg(long)]
    zstdchunked_compression_level: Option<i32>,
    /// zstd:chunked chunk size (bytes; 0 = default).
    #[arg(long, default_value_t = 0)]
    zstdchunked_chunk_size: u64,
    /// Convert only these platforms (repeat or separate with commas).
    #[arg(long, value_delimiter = ',')]
    platform: Vec<String>,
    /// Convert every platform (the default here).
    #[arg(long)]
    all_platforms: bool,
    /// Not supported: stargaze writes lazily pullable layers only.
    #[arg(long)]
    uncompress: bool,
    /// Talk plain HTTP to the registries.
    #[arg(long)]
    plain_http: bool,
    /// Skip TLS verification (nerdctl's --insecure-registry).
    #[arg(long, alias = "insecure-registry", conflicts_with = "plain_http")]
    insecure: bool,
    /// Directory of containerd `hosts.toml` files.
    #[arg(long, default_value = "/etc/containerd/certs.d")]
    hosts_dir: PathBuf,
    /// Where layers from and to registries are kept while converted.
    #[arg(long, env = "TMPDIR", default_value = "/var/tmp")]
    spill_dir: PathBuf,
}

/// A nerdctl reference as a `stargaze convert` location.
fn location(r: &str) -> String {
    let transports = ["docker://", "oci:", "oci-archive:", "docker-archive:"];
    if transports.iter().any(|t| r.starts_with(t)) {
        r.to_string()
    } else {
        format!("docker://{r}")
    }
}

/// The paths of a `ctr-remote optimize --record-out` file, in order, once each.
fn record_paths(path: &PathBuf) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the record file {}", path.display()))?;
    let mut out: Vec<String> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| {
            format!(
                "{} line {}: not a JSON record (expected ctr-remote optimize --record-out's format)",
                path.display(),
                i + 1
            )
        })?;
        if let Some(p) = v["path"].as_str()
            && !out.iter().any(|o| o == p)
        {
            out.push(p.to_string());
        }
    }
    Ok(out)
}

pub fn run(c: Command) -> Result<ExitCode> {
    let Command::Convert(a) = c;
    if a.uncompress {
        bail!("--uncompress is not supported: stargaze converts to eStargz or zstd:chunked only");
    }
    if !a.estargz && !a.zstdchunked {
        bail!("choose the target format: --estargz or --zstdchunked");
    }
    let (format, level, chunk, record) = if a.zstdchunked {
        (
            "zstdchunked",
            a.zstdchunked_compression_level,
            a.zstdchunked_chunk_size,
            a.zstdchunked_record_in.as_ref(),
        )
    } else {
        (
            "estargz",
            a.estargz_compression_level,
            a.estargz_chunk_size,
            a.estargz_record_in.as_ref(),
        )
    };
    let prioritized = record.map(record_paths).transpose()?;
    let args = convert::Args {
        src: location(&a.source_ref),
        dst: location(&a.target_ref),
        format: format.into(),
        estargz: a.estargz,
        zstdchunked: a.zstdchunked,
        oci: a.oci,
        chunk_size: if chunk == 0 {
            DEFAULT_CHUNK_SIZE
        } else {
            chunk
        },
        min_chunk_size: a.estargz_min_chunk_size,
        prioritized_files: None,
        external_toc: a.estargz_external_toc,
        keep_diff_id: a.estargz_keep_diff_id,
        compression_level: level,
        threads: 0,
        tmp_dir: None,
        platform: a.platform,
        all_platforms: a.all_platforms,
        plain_http: a.plain_http,
        insecure: a.insecure,
        hosts_dir: a.hosts_dir,
        spill_dir: a.spill_dir,
    };
    convert::run_with(args, prioritized)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_references_are_registry_images() {
        assert_eq!(location("r.example/a:1"), "docker://r.example/a:1");
        assert_eq!(location("oci:/tmp/x:1"), "oci:/tmp/x:1");
        assert_eq!(location("docker://a/b"), "docker://a/b");
    }

    #[test]
    fn record_files_give_paths_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rec");
        std::fs::write(
            &p,
            "{\"path\":\"bin/sh\",\"manifestDigest\":\"sha256:00\",\"layerIndex\":0}\n\n{\"path\":\"etc/passwd\",\"layerIndex\":1}\n{\"path\":\"bin/sh\",\"layerIndex\":0}\n",
        )
        .unwrap();
        assert_eq!(record_paths(&p).unwrap(), ["bin/sh", "etc/passwd"]);
        std::fs::write(&p, "not json\n").unwrap();
        assert!(record_paths(&p).is_err());
    }
}
