//! `stargaze trace show IMAGE`: an image's learned access trace, as the
//! fetcher recorded it in the cache (`[fetcher] cache_dir`, `traces/`):
//! the files and ranges its first containers read, in order, which the
//! image's next cold pull fetches first.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use stargaze_cache::{Cache, Trace};
use stargaze_format::Digest;
use stargaze_format::digest::DigestParseError;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Print the reads an image's trace lists, in the order they are
    /// fetched (IMAGE: a reference or a manifest digest).
    Show(ShowArgs),
}

#[derive(clap::Args)]
pub struct ShowArgs {
    /// Image reference (as pulled) or manifest digest (sha256:<hex>, or
    /// the bare hex).
    image: Subject,
    /// Configuration file naming the cache directory (default
    /// /etc/stargaze/config.toml when it exists, else the built-in defaults).
    #[arg(long, value_name = "PATH", env = "STARGAZE_CONFIG")]
    config: Option<PathBuf>,
    /// Print the trace file's JSON instead of the table.
    #[arg(long)]
    json: bool,
}

pub fn run(c: Command) -> anyhow::Result<std::process::ExitCode> {
    match c {
        Command::Show(a) => show(a).map(|()| std::process::ExitCode::SUCCESS),
    }
}

/// What the user named, parsed from the argument once: a manifest digest
/// (`sha256:<hex>` or the bare hex) or an image reference. An argument
/// that says `sha256:` but is no digest is refused, naming it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Subject {
    Manifest(Digest),
    Image(String),
}

impl std::str::FromStr for Subject {
    type Err = DigestParseError;

    fn from_str(s: &str) -> Result<Subject, DigestParseError> {
        if s.starts_with("sha256:") {
            return s.parse().map(Subject::Manifest);
        }
        Ok(match format!("sha256:{s}").parse() {
            Ok(d) => Subject::Manifest(d),
            Err(_) => Subject::Image(s.to_string()),
        })
    }
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subject::Manifest(d) => d.fmt(f),
            Subject::Image(r) => f.write_str(r),
        }
    }
}

/// Does `trace` belong to what the user named?
fn names(trace: &Trace, subject: &Subject) -> bool {
    let normal = |r: &str| {
        stargaze_registry::Reference::parse(r)
            .map(|r| r.to_string())
            .unwrap_or_else(|_| r.to_string())
    };
    match subject {
        // The trace file's manifest is text: it matches when it is this
        // very digest.
        Subject::Manifest(d) => trace.manifest.parse::<Digest>().is_ok_and(|m| m == *d),
        Subject::Image(image) => trace.image == *image || normal(&trace.image) == normal(image),
    }
}

/// The traces in `dir` that name `image` (unreadable files are skipped
/// with a warning).
fn find(dir: &Path, image: &Subject) -> anyhow::Result<Vec<(PathBuf, Trace)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let parsed = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| Trace::parse(&b, &path).map_err(|e| e.to_string()));
        match parsed {
            Ok(t) if names(&t, image) => out.push((path, t)),
            Ok(_) => {}
            Err(e) => tracing::warn!("{e}"),
        }
    }
    Ok(out)
}

fn show(a: ShowArgs) -> anyhow::Result<()> {
    let (config, _) = stargaze_config::Config::load_with_origin(a.config.as_deref())?;
    let cache = Cache::open_reader(&config.fetcher.cache_dir);
    let dir = cache.traces_dir();
    let found = find(&dir, &a.image)?;
    if found.is_empty() {
        bail!(
            "no trace of {} in {}: one is recorded when the image is pulled lazily and its containers start ([fetcher] learn_traces)",
            a.image,
            dir.display()
        );
    }
    for (path, t) in found {
        if a.json {
            println!("{}", serde_json::to_string_pretty(&t)?);
            continue;
        }
        println!("image     {}", t.image);
        println!("manifest  {}", t.manifest);
        println!("file      {}", path.display());
        println!(
            "reads     {} ({:.1} MiB)",
            t.reads.len(),
            t.bytes() as f64 / (1 << 20) as f64
        );
        println!(
            "spans     {} ({:.1} MiB of layer blobs, read before the TOCs on a cold pull)",
            t.spans.len(),
            t.spans.iter().map(|s| s.end - s.start).sum::<u64>() as f64 / (1 << 20) as f64
        );
        println!(
            "{:>5}  {:<14} {:>12} {:>10}  path",
            "#", "layer", "offset", "length"
        );
        for (i, r) in t.reads.iter().enumerate() {
            let layer = t
                .layers
                .get(r.layer as usize)
                .map_or("?".into(), |d| crate::status::short(d));
            println!(
                "{:>5}  {:<14} {:>12} {:>10}  {}",
                i + 1,
                layer,
                r.offset,
                r.length,
                r.path
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_argument_is_a_digest_or_a_reference_and_a_bad_digest_is_named() {
        let hex = "ab".repeat(32);
        let d: Digest = format!("sha256:{hex}").parse().unwrap();
        assert_eq!(
            format!("sha256:{hex}").parse::<Subject>(),
            Ok(Subject::Manifest(d))
        );
        assert_eq!(hex.parse::<Subject>(), Ok(Subject::Manifest(d)));
        assert_eq!(
            "registry.example/app:1".parse::<Subject>(),
            Ok(Subject::Image("registry.example/app:1".into()))
        );
        for bad in [
            "sha256:../../x".to_string(),
            format!("sha256:{}", &hex[2..]),
            format!("sha256:{}", hex.to_uppercase()),
        ] {
            let e = bad.parse::<Subject>().unwrap_err();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn a_manifest_digest_matches_only_its_own_trace() {
        let hex = "cd".repeat(32);
        let t = Trace::new("r/app:1", &format!("sha256:{hex}"), Vec::new());
        assert!(names(&t, &hex.parse().unwrap()));
        assert!(names(&t, &"r/app:1".parse().unwrap()));
        assert!(!names(&t, &"ef".repeat(32).parse().unwrap()));
        let odd = Trace::new("r/app:1", &hex, Vec::new());
        assert!(
            !names(&odd, &hex.parse().unwrap()),
            "a manifest that is no digest"
        );
    }
}
