//! The stargaze configuration file.
//!
//! One TOML file, `/etc/stargaze/config.toml` ([`DEFAULT_PATH`]), holds a
//! section per service (`[fetcher]`, `[fs]`, `[snapshotter]`) and a `[log]`
//! section read by all three. Every key has a default that works on a single
//! node, so the file may be absent or hold only the keys an operator changes.
//! `deploy/config.toml` lists every key with its default and what it means; a
//! test checks that it parses to exactly [`Config::default()`].
//!
//! Value formats:
//!
//! * **Durations** are strings with a unit, as humantime parses them: `"30s"`,
//!   `"500ms"`, `"1m 30s"`, `"2h"`. A bare integer is rejected (it would be
//!   ambiguous between seconds and milliseconds). [`Config::to_toml`] writes
//!   them back the same way.
//! * **Sizes** are integers in bytes, or strings with a unit: `"512KiB"`,
//!   `"20GiB"`, `"1.5G"` (K/M/G/T are powers of 1024 as in containerd's
//!   and systemd's settings, `KB`/`MB`/... powers of 1000).
//! * **Paths** must be absolute. Unix socket paths must fit in `sun_path`
//!   (at most 107 bytes).
//! * **Listen addresses** (`metrics_address`) are `host:port`; empty means off.
//!
//! Loading rules ([`Config::load`]):
//!
//! * an explicit path (`--config PATH`) that does not exist is an error naming
//!   the path;
//! * the default path may be absent, and then the defaults apply;
//! * unknown sections and keys are errors naming the file, line, section and
//!   key (with a suggestion for near misses), so a typo never passes silently;
//! * every error names the file.
//!
//! The Go Stargz Snapshotter's keys are not accepted yet; where one means the
//! same as ours it will become an accepted alias, never a silently ignored key.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where the services look for their configuration when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/stargaze/config.toml";

/// Longest unix socket path the kernel accepts (`sun_path` is 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// The whole configuration file. Every section and key is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub fetcher: FetcherConfig,
    pub fs: FsConfig,
    pub snapshotter: SnapshotterConfig,
    pub cri_keychain: CriKeychainConfig,
    pub log: LogConfig,
}

/// `[fetcher]`: registry access, the chunk cache, range coalescing, prefetch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FetcherConfig {
    /// gRPC socket (`stargaze.v1.Fetcher`).
    pub socket: PathBuf,
    /// Root of the node's chunk cache (layer indexes, file content, presence maps).
    pub cache_dir: PathBuf,
    /// Upper bound on concurrent HTTP connections to one registry host.
    pub max_connections_per_host: u32,
    /// Time limit for one registry request, connection to last byte.
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    /// How many times a failed registry request is retried (after the first try).
    pub retries: u32,
    /// How long a registry endpoint (a mirror, or the origin) that failed
    /// a blob read after the retries is set aside: reads go on from the
    /// next endpoint and come back to it once this has passed.
    #[serde(with = "duration")]
    pub endpoint_backoff: Duration,
    /// Missing ranges closer than this many bytes are fetched with one request.
    #[serde(with = "size")]
    pub merge_gap: u64,
    /// Upper bound in bytes on one merged range request.
    #[serde(with = "size")]
    pub max_merged_range: u64,
    /// Bytes fetched at mount time from the start of a layer that has no
    /// prefetch landmark and no prefetch label. 0 = off.
    #[serde(with = "size")]
    pub prefetch_size: u64,
    /// Fetch the rest of every layer in the background after its prefetch.
    pub background_fetch: bool,
    /// While an image is pulled, fetch the program its config runs
    /// (entrypoint, else command), that program's interpreter and the
    /// shared libraries it loads: files every container of the image reads
    /// first, otherwise found one registry round trip at a time.
    pub prefetch_entrypoint: bool,
    /// When a container executes a program or `#!` script (fs sees
    /// execve's open), fetch its interpreter and the libraries it loads (resolved
    /// as the dynamic loader does, through the container's layers), at
    /// once and in parallel: for every exec, not only the image's command.
    pub prefetch_loads: bool,
    /// Programs and shared libraries (mapped files, read by page faults in
    /// any order) up to this size are fetched whole when first read; larger
    /// ones chunk by chunk as they are read. 0 = never whole.
    /// Files up to this size are fetched whole on their first read (a
    /// small file is usually read whole, and one request beats several).
    #[serde(with = "size")]
    pub whole_file_below: u64,
    /// A read that misses also fetches the chunks that follow it in the
    /// layer's blob, up to this many compressed bytes, in the same request
    /// (files installed together are read together); 0 = off.
    #[serde(with = "size")]
    pub read_amplify: u64,
    /// The largest window read ahead in blob order when on-demand reads
    /// sweep through a layer's files one after another; 0 = off.
    #[serde(with = "size")]
    pub sweep_max_window: u64,
    #[serde(with = "size")]
    pub whole_mapped_file_below: u64,
    /// Record what each image's first containers read (files and ranges,
    /// in order, for `trace_window` after a pull or a container start) in
    /// the cache's `traces/`, and on the image's next cold pull fetch that
    /// first, as each layer resolves.
    pub learn_traces: bool,
    /// How long reads are recorded after an image is pulled or a container
    /// of it starts.
    #[serde(with = "duration")]
    pub trace_window: Duration,
    /// When the cache has no trace of an image being pulled, use the one
    /// published in its repository (tag `sha256-<manifest hex>.stargaze-trace`),
    /// if any: one more request alongside the pull's first ones.
    pub fetch_published_traces: bool,
    /// Push a trace that learned something new to the image's repository
    /// (needs push access there), for other nodes' first pulls.
    pub publish_traces: bool,
    /// Background fetches run only after on-demand reads and layer
    /// resolution have been quiet this long, one small batch at a time, so
    /// that they never hold up a starting container on a slow link.
    #[serde(with = "duration")]
    pub background_silence: Duration,
    /// ... but only for this long after a layer's prefetch; then they run
    /// alongside on-demand reads, so a workload that never pauses still gets
    /// the layer in large requests.
    #[serde(with = "duration")]
    pub background_max_wait: Duration,
    /// Upper bound on background fetching, compressed bytes per second
    /// across all layers; 0 = none.
    #[serde(with = "size")]
    pub background_bandwidth: u64,
    /// `host:port` serving Prometheus `/metrics`; empty = off.
    pub metrics_address: String,
    /// Directory of containerd `hosts.toml` files (mirrors, CAs, client
    /// certificates, headers), one subdirectory per registry host. Read if
    /// it exists.
    pub hosts_dir: PathBuf,
    /// A Go Stargz Snapshotter config file whose `[resolver]` mirrors are
    /// used as they are (the rest of it is ignored), so a node switching
    /// keeps its mirrors. Read if it exists; empty = none.
    pub stargz_config: PathBuf,
    /// How content files are written: `pwrite`, or `io_uring` (a ring per
    /// decode thread, a member's writes batched; falls back to pwrite where
    /// io_uring is refused).
    pub cache_io: CacheIo,
    /// Upper bound on the cache's disk use; when it is exceeded, layers no
    /// snapshot uses are evicted with their files, least recently used
    /// first. 0 = no limit.
    #[serde(with = "size")]
    pub cache_size_limit: u64,
    /// A layer must have been unused this long before eviction may take it
    /// (and nothing is evicted this long after the fetcher starts, while
    /// the snapshotter re-attaches its layers).
    #[serde(with = "duration")]
    pub cache_keep_unused: Duration,
}

/// `[fs]`: the node's FUSE mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FsConfig {
    /// gRPC socket (`stargaze.v1.Fs`).
    pub socket: PathBuf,
    /// Where the one FUSE mount lives; each attached layer is a directory in it.
    pub mountpoint: PathBuf,
    /// Threads serving FUSE requests.
    pub n_threads: u32,
    /// Open files complete in the cache with FUSE passthrough (kernel >=
    /// 6.9, root, cache on a non-stacked filesystem); falls back to serving
    /// reads itself, logged once, where that is not possible.
    pub passthrough: bool,
    /// How FUSE requests travel: `io_uring` (FUSE over io_uring, Linux >=
    /// 6.14 with the fuse module's `enable_uring` on), `classic` (read and
    /// write on `/dev/fuse`), or `auto`: io_uring where the kernel offers
    /// it, classic otherwise (logged). The environment variable
    /// `STARGAZE_FS_TRANSPORT` overrides it.
    pub transport: FsTransport,
    /// When a read that missed continues through a large file, fetch this
    /// many bytes after it too. 0 = off.
    #[serde(with = "size")]
    pub readahead: u64,
    /// How long the kernel may cache a name lookup.
    #[serde(with = "duration")]
    pub entry_timeout: Duration,
    /// How long the kernel may cache file attributes.
    #[serde(with = "duration")]
    pub attr_timeout: Duration,
    /// `host:port` serving Prometheus `/metrics`; empty = off.
    pub metrics_address: String,
}

/// `[snapshotter]`: the containerd proxy snapshotter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnapshotterConfig {
    /// gRPC socket containerd's `[proxy_plugins]` entry points at.
    pub socket: PathBuf,
    /// Snapshot metadata and upper/work directories.
    pub root: PathBuf,
    /// `host:port` serving Prometheus `/metrics`; empty = off.
    pub metrics_address: String,
    /// Mount layers lazily through the fetcher and fs services. `false` makes
    /// this a plain overlay snapshotter (containerd unpacks every layer).
    pub lazy_pull: bool,
    /// Mount layers without a `containerd.io/snapshot/stargz/toc.digest`
    /// annotation when they carry `containerd.io/snapshot/remote/stargz.skipverify`
    /// (the Go snapshotter's `allow_no_verification`). Their TOC is then
    /// trusted as the registry serves it.
    pub allow_no_verification: bool,
}

/// `[cri_keychain]`: Kubernetes pull secrets. The snapshotter serves CRI's
/// `runtime.v1.ImageService` on `image_service_path` for the kubelet
/// (`--image-service-endpoint`), passes every call on to containerd's, and
/// hands the credentials of each `PullImage` to the fetcher, which keeps
/// them in memory for `credential_ttl` and uses them for that image's
/// repository (the Go snapshotter's `[cri_keychain]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CriKeychainConfig {
    /// Serve the proxy (off by default: only nodes whose kubelet points at
    /// it need it).
    pub enable: bool,
    /// The socket the kubelet's `--image-service-endpoint` names.
    pub image_service_path: PathBuf,
    /// containerd's socket, whose CRI plugin answers the calls.
    pub containerd_image_service: PathBuf,
    /// How long the credentials of a pull are used for its image's layers.
    #[serde(with = "duration")]
    pub credential_ttl: Duration,
}

/// `[log]`: logging of all three services (to stderr, which systemd collects).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A level (`error`, `warn`, `info`, `debug`, `trace`, `off`) or a
    /// comma-separated list of `target=level` directives with an optional
    /// plain default level, e.g. `"info,stargaze_fetcher=debug"`. The Go
    /// (logrus) names `warning`, `fatal` and `panic` are accepted too.
    pub level: String,
    /// `text` (human readable) or `json` (one object per line).
    pub format: LogFormat,
}

/// How the fetcher writes the cache's content files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheIo {
    #[serde(rename = "pwrite")]
    Pwrite,
    #[serde(rename = "io_uring")]
    IoUring,
}

/// `[fs] transport`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FsTransport {
    #[serde(rename = "auto")]
    Auto,
    #[serde(rename = "io_uring")]
    IoUring,
    #[serde(rename = "classic")]
    Classic,
}

impl FsTransport {
    pub fn as_str(self) -> &'static str {
        match self {
            FsTransport::Auto => "auto",
            FsTransport::IoUring => "io_uring",
            FsTransport::Classic => "classic",
        }
    }

    pub fn parse(s: &str) -> Option<FsTransport> {
        match s {
            "auto" => Some(FsTransport::Auto),
            "io_uring" => Some(FsTransport::IoUring),
            "classic" => Some(FsTransport::Classic),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for FetcherConfig {
    fn default() -> Self {
        FetcherConfig {
            socket: "/run/stargaze/fetcher.sock".into(),
            cache_dir: "/var/lib/stargaze/cache".into(),
            max_connections_per_host: 8,
            request_timeout: Duration::from_secs(30),
            retries: 5,
            endpoint_backoff: Duration::from_secs(30),
            merge_gap: 256 * 1024,
            max_merged_range: 16 * 1024 * 1024,
            prefetch_size: 0,
            background_fetch: true,
            prefetch_entrypoint: true,
            prefetch_loads: true,
            whole_file_below: 256 << 10,
            read_amplify: 128 << 10,
            sweep_max_window: 32 << 20,
            whole_mapped_file_below: 64 << 20,
            learn_traces: true,
            trace_window: Duration::from_secs(30),
            fetch_published_traces: true,
            publish_traces: false,
            background_silence: Duration::from_secs(2),
            background_max_wait: Duration::from_secs(10),
            background_bandwidth: 0,
            metrics_address: String::new(),
            hosts_dir: "/etc/containerd/certs.d".into(),
            stargz_config: "/etc/containerd-stargz-grpc/config.toml".into(),
            cache_io: CacheIo::Pwrite,
            cache_size_limit: 0,
            cache_keep_unused: Duration::from_secs(600),
        }
    }
}

impl Default for FsConfig {
    fn default() -> Self {
        FsConfig {
            socket: "/run/stargaze/fs.sock".into(),
            mountpoint: "/run/stargaze/mnt".into(),
            n_threads: 4,
            passthrough: true,
            transport: FsTransport::Classic,
            readahead: 1 << 20,
            entry_timeout: Duration::from_secs(3600),
            attr_timeout: Duration::from_secs(3600),
            metrics_address: String::new(),
        }
    }
}

impl Default for SnapshotterConfig {
    fn default() -> Self {
        SnapshotterConfig {
            socket: "/run/stargaze/snapshotter.sock".into(),
            root: "/var/lib/stargaze/snapshotter".into(),
            metrics_address: String::new(),
            lazy_pull: true,
            allow_no_verification: false,
        }
    }
}

impl Default for CriKeychainConfig {
    fn default() -> Self {
        CriKeychainConfig {
            enable: false,
            image_service_path: "/run/stargaze/cri.sock".into(),
            containerd_image_service: "/run/containerd/containerd.sock".into(),
            credential_ttl: Duration::from_secs(3600),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// Why a configuration could not be loaded. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {} does not exist", .path.display())]
    NotFound { path: PathBuf },

    // The cause is part of the message rather than `source()`, so printing the
    // error chain (anyhow's `{:#}`) does not repeat it.
    #[error("cannot read config file {}: {error}", .path.display())]
    Read { path: PathBuf, error: io::Error },

    /// Not TOML, or a value of the wrong type (the message shows the line).
    #[error("config file {} is invalid: {}", .path.display(), .error.to_string().trim_end())]
    Parse {
        path: PathBuf,
        error: Box<toml::de::Error>,
    },

    #[error("config file {}, line {line}: unknown section [{section}]{hint}", .path.display())]
    UnknownSection {
        path: PathBuf,
        line: usize,
        section: String,
        /// Empty, or a sentence starting with "; " that suggests a fix.
        hint: String,
    },

    #[error("config file {}, line {line}: unknown key `{key}` in section [{section}]{hint}", .path.display())]
    UnknownKey {
        path: PathBuf,
        line: usize,
        section: String,
        key: String,
        /// Empty, or a sentence starting with "; " that suggests a fix.
        hint: String,
    },

    #[error("config file {}{}: {}", .path.display(), line_suffix(*.line), .problem)]
    Invalid {
        path: PathBuf,
        /// The line of the key, when the file sets it.
        line: Option<usize>,
        problem: InvalidValue,
    },
}

fn line_suffix(line: Option<usize>) -> String {
    line.map(|l| format!(", line {l}")).unwrap_or_default()
}

/// A value that has the right type but is not usable, found by [`Config::validate`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("[{section}] {key} = {value}: {message}")]
pub struct InvalidValue {
    pub section: &'static str,
    pub key: &'static str,
    /// The offending value as TOML would show it.
    pub value: String,
    pub message: String,
}

impl Config {
    /// Load the configuration.
    ///
    /// `Some(path)`: that file, which must exist. `None`: [`DEFAULT_PATH`] if
    /// it exists, otherwise the defaults.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_origin(path).map(|(config, _)| config)
    }

    /// Like [`Config::load`], and also says which file was read (`None` when
    /// the default path is absent and only the defaults apply).
    pub fn load_with_origin(path: Option<&Path>) -> Result<(Config, Option<PathBuf>), ConfigError> {
        match path {
            Some(path) => Self::load_file(path).map(|c| (c, Some(path.to_path_buf()))),
            None => Self::load_optional(Path::new(DEFAULT_PATH)),
        }
    }

    /// Load `path` if it exists, otherwise return the defaults.
    pub fn load_optional(path: &Path) -> Result<(Config, Option<PathBuf>), ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::from_toml_str(&text, path).map(|c| (c, Some(path.to_path_buf()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok((Config::default(), None)),
            Err(error) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                error,
            }),
        }
    }

    /// Load `path`, which must exist.
    pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::from_toml_str(&text, path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ConfigError::NotFound {
                path: path.to_path_buf(),
            }),
            Err(error) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                error,
            }),
        }
    }

    /// Parse and validate configuration text; `path` is only used in errors.
    pub fn from_toml_str(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let parse_error = |e: toml::de::Error| ConfigError::Parse {
            path: path.to_path_buf(),
            error: Box::new(e),
        };
        // First pass: syntax, and unknown sections/keys with their lines (the
        // serde pass below would reject them too, but could not name the section).
        let doc = toml::de::DeTable::parse(text).map_err(parse_error)?;
        check_known_keys(doc.get_ref(), text, path)?;
        // Second pass: types.
        let config: Config = toml::from_str(text).map_err(parse_error)?;
        config.validate().map_err(|problem| ConfigError::Invalid {
            path: path.to_path_buf(),
            line: key_line(doc.get_ref(), text, problem.section, problem.key),
            problem,
        })?;
        Ok(config)
    }

    /// The effective configuration as TOML, every key written out. Loading
    /// this text gives back an equal `Config`.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a Config always serializes to TOML")
    }

    /// Check the values that have the right type but cannot work. [`Config::load`]
    /// calls this; call it again after changing a loaded config (e.g. from flags).
    pub fn validate(&self) -> Result<(), InvalidValue> {
        let f = &self.fetcher;
        check_socket("fetcher", "socket", &f.socket)?;
        check_absolute("fetcher", "cache_dir", &f.cache_dir)?;
        check_positive(
            "fetcher",
            "max_connections_per_host",
            f.max_connections_per_host.into(),
        )?;
        check_nonzero_duration("fetcher", "request_timeout", f.request_timeout)?;
        check_nonzero_duration("fetcher", "endpoint_backoff", f.endpoint_backoff)?;
        check_positive("fetcher", "max_merged_range", f.max_merged_range)?;
        if f.merge_gap > f.max_merged_range {
            return Err(invalid(
                "fetcher",
                "merge_gap",
                f.merge_gap,
                format!("must not exceed max_merged_range ({})", f.max_merged_range),
            ));
        }
        check_listen("fetcher", "metrics_address", &f.metrics_address)?;
        check_absolute("fetcher", "hosts_dir", &f.hosts_dir)?;
        if !f.stargz_config.as_os_str().is_empty() {
            check_absolute("fetcher", "stargz_config", &f.stargz_config)?;
        }

        let s = &self.fs;
        check_socket("fs", "socket", &s.socket)?;
        check_absolute("fs", "mountpoint", &s.mountpoint)?;
        check_positive("fs", "n_threads", s.n_threads.into())?;
        check_listen("fs", "metrics_address", &s.metrics_address)?;

        let n = &self.snapshotter;
        check_socket("snapshotter", "socket", &n.socket)?;
        check_absolute("snapshotter", "root", &n.root)?;
        check_listen("snapshotter", "metrics_address", &n.metrics_address)?;

        let k = &self.cri_keychain;
        check_socket("cri_keychain", "image_service_path", &k.image_service_path)?;
        check_socket(
            "cri_keychain",
            "containerd_image_service",
            &k.containerd_image_service,
        )?;
        if k.enable && k.image_service_path == k.containerd_image_service {
            return Err(invalid(
                "cri_keychain",
                "image_service_path",
                k.image_service_path.display(),
                "is containerd's own socket; the kubelet must call the proxy, which calls containerd",
            ));
        }
        check_nonzero_duration("cri_keychain", "credential_ttl", k.credential_ttl)?;

        let sockets = [
            ("fetcher", &f.socket),
            ("fs", &s.socket),
            ("snapshotter", &n.socket),
            ("cri_keychain", &k.image_service_path),
        ];
        for (i, (sec_a, a)) in sockets.iter().enumerate() {
            for (sec_b, b) in &sockets[i + 1..] {
                if a == b {
                    return Err(invalid(
                        sec_b,
                        "socket",
                        a.display(),
                        format!("is also [{sec_a}] socket; each service needs its own"),
                    ));
                }
            }
        }

        if let Err(message) = log_filter(&self.log.level) {
            return Err(invalid(
                "log",
                "level",
                format!("{:?}", self.log.level),
                message,
            ));
        }
        Ok(())
    }
}

impl LogConfig {
    /// The level as `tracing_subscriber::EnvFilter` directives (Go level
    /// names translated).
    pub fn filter_directives(&self) -> String {
        log_filter(&self.level).unwrap_or_else(|_| "info".into())
    }
}

const LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];

/// Validate a log level string and translate it to `EnvFilter` directives.
pub fn log_filter(level: &str) -> Result<String, String> {
    let translate = |l: &str| -> Option<&'static str> {
        let l = l.trim().to_ascii_lowercase();
        match l.as_str() {
            "warning" => Some("warn"),
            "fatal" | "panic" => Some("error"),
            _ => LEVELS.iter().copied().find(|x| *x == l),
        }
    };
    let mut out = Vec::new();
    for directive in level.split(',') {
        let directive = directive.trim();
        if directive.is_empty() {
            return Err(format!(
                "empty log directive; expected a level ({}) or target=level",
                LEVELS.join(", ")
            ));
        }
        match directive.split_once('=') {
            None => match translate(directive) {
                Some(l) => out.push(l.to_string()),
                None => {
                    return Err(format!(
                        "unknown log level `{directive}`; expected one of {} or target=level",
                        LEVELS.join(", ")
                    ));
                }
            },
            Some((target, l)) => {
                let target = target.trim();
                let valid_target = !target.is_empty()
                    && target
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '-');
                if !valid_target {
                    return Err(format!(
                        "bad log target `{target}` in `{directive}`; expected a module path such as stargaze_fetcher"
                    ));
                }
                match translate(l) {
                    Some(l) => out.push(format!("{target}={l}")),
                    None => {
                        return Err(format!(
                            "unknown log level `{}` in `{directive}`; expected one of {}",
                            l.trim(),
                            LEVELS.join(", ")
                        ));
                    }
                }
            }
        }
    }
    Ok(out.join(","))
}

fn invalid(
    section: &'static str,
    key: &'static str,
    value: impl fmt::Display,
    message: impl Into<String>,
) -> InvalidValue {
    InvalidValue {
        section,
        key,
        value: value.to_string(),
        message: message.into(),
    }
}

fn check_absolute(
    section: &'static str,
    key: &'static str,
    path: &Path,
) -> Result<(), InvalidValue> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(invalid(
            section,
            key,
            format!("{:?}", path.display().to_string()),
            "must be an absolute path",
        ))
    }
}

fn check_socket(section: &'static str, key: &'static str, path: &Path) -> Result<(), InvalidValue> {
    check_absolute(section, key, path)?;
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(invalid(
            section,
            key,
            format!("{:?}", path.display().to_string()),
            format!(
                "a unix socket path may be at most {MAX_SOCKET_PATH} bytes, this one has {len}"
            ),
        ));
    }
    Ok(())
}

fn check_positive(section: &'static str, key: &'static str, v: u64) -> Result<(), InvalidValue> {
    if v == 0 {
        Err(invalid(section, key, v, "must be at least 1"))
    } else {
        Ok(())
    }
}

fn check_nonzero_duration(
    section: &'static str,
    key: &'static str,
    d: Duration,
) -> Result<(), InvalidValue> {
    if d.is_zero() {
        Err(invalid(section, key, "\"0s\"", "must be longer than zero"))
    } else {
        Ok(())
    }
}

/// Empty (off), or `host:port` with a numeric port: `127.0.0.1:9100`,
/// `[::1]:9100`, `localhost:9100`, `:9100` (all addresses).
fn check_listen(section: &'static str, key: &'static str, addr: &str) -> Result<(), InvalidValue> {
    if addr.is_empty() || addr.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let ok = match addr.rsplit_once(':') {
        Some((host, port)) => {
            port.parse::<u16>().is_ok()
                && !host.contains(':')
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        }
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(invalid(
            section,
            key,
            format!("{addr:?}"),
            "expected host:port (e.g. \"127.0.0.1:9100\"), or \"\" for off",
        ))
    }
}

/// Reject sections and keys that the defaults do not have. The set of known
/// keys comes from serializing `Config::default()`, so it cannot drift from
/// the structs. (A future section whose keys are free-form, such as per-host
/// registry tables, will need to be skipped here.)
fn check_known_keys(
    doc: &toml::de::DeTable<'_>,
    text: &str,
    path: &Path,
) -> Result<(), ConfigError> {
    let known = default_table();
    let section_names: Vec<&str> = known.keys().map(String::as_str).collect();
    for (key, value) in doc.iter() {
        let name = key.get_ref().as_ref();
        let line = line_of(text, key.span().start);
        let Some(known_section) = known.get(name).and_then(toml::Value::as_table) else {
            // A key that belongs in a section, written at the top level?
            let mut owners: Vec<&str> = known
                .iter()
                .filter(|(_, t)| t.as_table().is_some_and(|t| t.contains_key(name)))
                .map(|(s, _)| s.as_str())
                .collect();
            owners.sort_unstable();
            let hint =
                if !owners.is_empty() && !matches!(value.get_ref(), toml::de::DeValue::Table(_)) {
                    format!(
                        "; `{name}` is a key of {}; put it under that section header",
                        owners
                            .iter()
                            .map(|s| format!("[{s}]"))
                            .collect::<Vec<_>>()
                            .join(" and ")
                    )
                } else {
                    suggestion(name, &section_names, "[", "]", "sections")
                };
            return Err(ConfigError::UnknownSection {
                path: path.to_path_buf(),
                line,
                section: name.to_string(),
                hint,
            });
        };
        // A section written as something other than a table is a type error,
        // which the serde pass reports with its line.
        let toml::de::DeValue::Table(entries) = value.get_ref() else {
            continue;
        };
        let keys: Vec<&str> = known_section.keys().map(String::as_str).collect();
        for (k, _) in entries.iter() {
            let k_name = k.get_ref().as_ref();
            if !known_section.contains_key(k_name) {
                let mut hint = suggestion(k_name, &keys, "`", "`", "keys");
                if let Some(other) = known
                    .iter()
                    .find(|(s, t)| {
                        s.as_str() != name && t.as_table().is_some_and(|t| t.contains_key(k_name))
                    })
                    .map(|(s, _)| s)
                {
                    hint = format!("; `{k_name}` belongs in section [{other}]");
                }
                return Err(ConfigError::UnknownKey {
                    path: path.to_path_buf(),
                    line: line_of(text, k.span().start),
                    section: name.to_string(),
                    key: k_name.to_string(),
                    hint,
                });
            }
        }
    }
    Ok(())
}

fn default_table() -> toml::Table {
    toml::Table::try_from(Config::default()).expect("defaults serialize to a table")
}

/// "; did you mean X?" for a near miss, otherwise the list of valid names.
fn suggestion(name: &str, candidates: &[&str], open: &str, close: &str, what: &str) -> String {
    let best = candidates
        .iter()
        .map(|c| (edit_distance(name, c), *c))
        .min()
        .filter(|(d, c)| *d <= 2.max(c.len() / 3));
    match best {
        Some((_, c)) => format!("; did you mean {open}{c}{close}?"),
        None => format!(
            "; valid {what}: {}",
            {
                // Sorted, whatever order the TOML table keeps.
                let mut sorted = candidates.to_vec();
                sorted.sort_unstable();
                sorted
            }
            .iter()
            .map(|c| format!("{open}{c}{close}"))
            .collect::<Vec<_>>()
            .join(", ")
        ),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn key_line(doc: &toml::de::DeTable<'_>, text: &str, section: &str, key: &str) -> Option<usize> {
    let (_, value) = doc.iter().find(|(k, _)| k.get_ref().as_ref() == section)?;
    let toml::de::DeValue::Table(entries) = value.get_ref() else {
        return None;
    };
    let (k, _) = entries.iter().find(|(k, _)| k.get_ref().as_ref() == key)?;
    Some(line_of(text, k.span().start))
}

/// Parse a size, the one parser of config files and the CLI: a number
/// of bytes (`4194304`), or a number (decimals allowed: `1.5G`) with a
/// unit, case-insensitive, spaces allowed before it:
///
/// * `KiB`, `MiB`, `GiB`, `TiB` (and Kubernetes' `Ki`, `Mi`, `Gi`, `Ti`):
///   powers of 1024;
/// * `KB`, `MB`, `GB`, `TB`: powers of 1000 (SI), as containerd and the Go
///   snapshotter print sizes (go-units `HumanSize`) and as `FromHumanSize`
///   reads them;
/// * bare `K`, `M`, `G`, `T`: powers of 1024, as docker's `--memory` and
///   `--shm-size` (go-units `RAMInBytes`) read them, and as config files
///   have always read them here;
/// * `B`: bytes.
///
/// Written here rather than taken from `bytesize` or `byte-unit`: both read
/// a bare `M` as 10^6 (and `byte-unit` rejects `Mi`), which would change
/// what existing config files mean.
pub fn parse_size(v: &str) -> Result<u64, String> {
    let v = v.trim();
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "ki" | "kib" => 1 << 10,
        "m" | "mi" | "mib" => 1 << 20,
        "g" | "gi" | "gib" => 1 << 30,
        "t" | "ti" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {v:?} (use B, KiB/MiB/GiB/TiB = 1024^n, KB/MB/GB/TB = 1000^n, or K/M/G/T = 1024^n)"
            ));
        }
    };
    let not_a_size = || format!("{v:?} is not a size (e.g. 4194304, 4MiB, 64KiB, 100MB)");
    if num.is_empty() {
        return Err(not_a_size());
    }
    let too_large = || format!("{v:?} is too large");
    if !num.contains('.') {
        let n: u64 = num.parse().map_err(|_| not_a_size())?;
        return n.checked_mul(mult).ok_or_else(too_large);
    }
    let n: f64 = num.parse().map_err(|_| not_a_size())?;
    let bytes = (n * mult as f64).round();
    if !(0.0..u64::MAX as f64).contains(&bytes) {
        return Err(too_large());
    }
    Ok(bytes as u64)
}

/// Sizes: integers in bytes, or strings with a unit ("20GiB", "512K"),
/// read by [`parse_size`].
mod size {
    use std::fmt;

    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        d.deserialize_any(SizeVisitor)
    }

    const EXPECTED: &str =
        "a size in bytes, or a string such as \"512KiB\", \"20GiB\" or \"100MB\"";

    struct SizeVisitor;

    impl Visitor<'_> for SizeVisitor {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(EXPECTED)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            super::parse_size(v)
                .map_err(|e| E::custom(format!("invalid size {v:?}: {e}; expected {EXPECTED}")))
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v)
                .map_err(|_| E::custom(format!("invalid size {v}: sizes cannot be negative")))
        }
    }
}

/// Durations as humantime strings ("30s", "500ms", "1m 30s").
mod duration {
    use std::fmt;
    use std::time::Duration;

    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(DurationVisitor)
    }

    struct DurationVisitor;

    const EXPECTED: &str =
        "a duration string with a unit, such as \"30s\", \"500ms\" or \"1m 30s\"";

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(EXPECTED)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            humantime::parse_duration(v.trim()).map_err(|e| {
                E::custom(format!("invalid duration {v:?} ({e}); expected {EXPECTED}"))
            })
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
            Err(E::custom(format!(
                "durations need a unit: write \"{v}s\" for {v} seconds (or \"{v}ms\" for milliseconds)"
            )))
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
            self.visit_i64(v as i64)
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
            Err(E::custom(format!(
                "durations need a unit: write e.g. \"{v}s\"; expected {EXPECTED}"
            )))
        }
    }
}

#[cfg(test)]
mod tests;
