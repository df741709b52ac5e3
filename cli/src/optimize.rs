//! `stargaze optimize SRC DST -- CMD...`: an image whose layers hold what a
//! workload reads first, in the order it reads it, behind a prefetch
//! landmark (what `ctr-remote image optimize` makes, without strace or a
//! second runtime).
//!
//! SRC (an eStargz image in a registry) is pulled lazily into containerd
//! through the stargaze snapshotter, the workload runs in a container of
//! it (`ctr run`, for at most `--period`), and the fetcher's learned access
//! trace of the image — every file the container read, and what the
//! programs it exec'd load, in first-read order — becomes the prioritized
//! files list of `stargaze convert` from SRC to DST.

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use stargaze_proto::v1::ImageTraceRequest;
use stargaze_proto::v1::fetcher_client::FetcherClient;
use stargaze_registry::Reference;

use crate::{convert, rpull};

#[derive(clap::Args)]
#[group(id = "optimize")]
pub struct Args {
    #[command(flatten)]
    pub convert: convert::Args,
    /// containerd's gRPC socket.
    #[arg(
        long,
        short = 'a',
        default_value = "/run/containerd/containerd.sock",
        env = "CONTAINERD_ADDRESS"
    )]
    pub address: PathBuf,
    /// containerd namespace.
    #[arg(
        long,
        short = 'n',
        default_value = "default",
        env = "CONTAINERD_NAMESPACE"
    )]
    pub namespace: String,
    /// The snapshotter (containerd's name for the stargaze proxy plugin).
    #[arg(long, default_value = "stargaze")]
    pub snapshotter: String,
    /// How long the workload may run: it is stopped then, and what it read
    /// until then is what goes first.
    #[arg(long, default_value = "10s", value_parser = parse_seconds)]
    pub period: Duration,
    /// containerd's `ctr` (runs the workload's container).
    #[arg(long, default_value = "ctr")]
    pub ctr: PathBuf,
    /// Configuration file naming the fetcher's socket (default
    /// /etc/stargaze/config.toml when it exists, else the built-in defaults).
    #[arg(long, value_name = "PATH", env = "STARGAZE_CONFIG")]
    pub config: Option<PathBuf>,
    /// The workload: a command and its arguments, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// `10s`, `2m`, `500ms` (humantime's forms, as the config file's
/// durations) or plain seconds.
fn parse_seconds(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let parsed = match s.parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(s),
    };
    match parsed {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(format!("{s:?} is not a positive duration")),
        Err(e) => Err(format!("{s:?} is not a duration (10s, 2m, 500ms): {e}")),
    }
}

pub fn run(a: Args) -> Result<ExitCode> {
    let Some(src) = a.convert.src.strip_prefix("docker://") else {
        bail!(
            "stargaze optimize runs the workload on a lazily pulled image: SRC must be docker://REF of an eStargz image, not {:?} (push it, converted with stargaze convert, first)",
            a.convert.src
        );
    };
    let reference = Reference::parse(src).map_err(|e| anyhow!("{e}"))?;
    let name = reference.to_string();
    let (config, _) = stargaze_config::Config::load_with_origin(a.config.as_deref())?;

    eprintln!("optimize: pulling {name} lazily");
    rpull::run(rpull::Args::lazy(
        &name,
        &a.address,
        &a.namespace,
        &a.snapshotter,
        a.convert.plain_http,
        &a.convert.hosts_dir,
    ))
    .with_context(|| format!("pulling {name} lazily through {}", a.snapshotter))?;

    let id = format!("stargaze-optimize-{}", std::process::id());
    eprintln!(
        "optimize: running {:?} in container {id} (at most {:?})",
        a.command, a.period
    );
    run_workload(&a, &name, &id)?;

    let files = read_files(&config.fetcher.socket, &name)?;
    eprintln!(
        "optimize: the workload read {} files; converting {} to {} with them first",
        files.len(),
        a.convert.src,
        a.convert.dst
    );
    convert::run_with(a.convert, Some(files))
}

/// Run the workload in a container of `image`; stop it after the period.
fn run_workload(a: &Args, image: &str, id: &str) -> Result<()> {
    let ctr = |args: &[&str]| {
        let mut c = Command::new(&a.ctr);
        c.arg("--address")
            .arg(&a.address)
            .arg("--namespace")
            .arg(&a.namespace)
            .args(args);
        c
    };
    let mut run = ctr(&["run", "--rm", "--snapshotter", &a.snapshotter, image, id]);
    run.args(&a.command).stdin(Stdio::null());
    let mut child = run
        .spawn()
        .with_context(|| format!("starting {} (containerd's ctr)", a.ctr.display()))?;
    let deadline = Instant::now() + a.period;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    match status {
        Some(s) if s.success() => {}
        Some(s) => eprintln!("optimize: the workload exited with {s}; what it read is used anyway"),
        None => {
            eprintln!("optimize: stopping the workload after {:?}", a.period);
            let _ = ctr(&["task", "kill", "--signal", "SIGKILL", id])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = child.wait();
        }
    }
    // `--rm` removes the container when ctr saw the task exit; after a
    // kill it may not have.
    let _ = ctr(&["container", "rm", id])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    Ok(())
}

/// The files of the image's trace, in first-read order (each once).
fn read_files(socket: &std::path::Path, image: &str) -> Result<Vec<String>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let trace = runtime.block_on(async {
        let channel = stargaze_proto::connect_unix(socket)
            .with_context(|| format!("the fetcher's socket {}", socket.display()))?;
        FetcherClient::new(channel)
            .image_trace(ImageTraceRequest {
                image_ref: image.to_string(),
            })
            .await
            .map(|r| r.into_inner())
            .map_err(|s| anyhow!("fetcher ({}): {}", socket.display(), s.message()))
    })?;
    let mut seen = std::collections::HashSet::new();
    let files: Vec<String> = trace
        .reads
        .into_iter()
        .filter(|r| seen.insert(r.path.clone()))
        .map(|r| r.path)
        .collect();
    if files.is_empty() {
        bail!("the workload read nothing from {image}: nothing to put first");
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_are_read_as_people_write_them() {
        assert_eq!(parse_seconds("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_seconds("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_seconds("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_seconds("3").unwrap(), Duration::from_secs(3));
        assert!(parse_seconds("0s").is_err());
        assert!(parse_seconds("soon").is_err());
    }
}
