//! Test support shared by the integration tests of every crate.
//!
//! * [`Containerd`] and [`Registry`] start private instances of the real
//!   Debian components (containerd 1.6, docker-registry) in a temporary
//!   directory with their own sockets and ports, and stop them — processes,
//!   mounts and files — when dropped, even when a test fails.
//! * [`go_build`] compiles one of our own Go helper programs (in `tests/go/`)
//!   against Debian's packaged Go sources, offline, and caches the binary
//!   ([`go_build_with_aliases`] when a dependency imports a module by a
//!   major-version path Debian does not have).
//! * [`image`] writes OCI image layouts from in-memory tars for tests;
//!   [`crafted`] writes two layers of unusual entries (hard links,
//!   whiteouts, xattrs of every namespace, devices, odd modes, names,
//!   mtimes and owners).
//! * [`loopfs`] mounts a small ext4 on a loop device (for full-disk
//!   tests) and unmounts and detaches it when dropped.
//! * [`require`] fails a test with the command that installs a missing tool;
//!   [`require_root_fuse`], [`require_fuse_passthrough`] and
//!   [`require_that`] fail it when root, FUSE or another prerequisite CI has
//!   is missing (no test passes by skipping itself).
//! * [`service_cli`] is the command-line contract of the service binaries.
//! * [`stack`] runs the three stargaze services as processes with a private
//!   config, and kills and restarts them one at a time.
//! * [`tree`] records a directory tree as `lstat`, `readlink`, the xattr
//!   calls and `read` see it, and lists how another tree differs from it,
//!   path by path and field by field.
//!
//! Nothing here touches the system containerd, `/run/containerd` sockets or
//! ports other than the ones it picked.

pub mod crafted;
pub mod fdstore;
pub mod image;
pub mod loopfs;
pub mod proxy;
pub mod service_cli;
pub mod stack;
pub mod token;
pub mod tree;

pub use loopfs::LoopFs;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `skopeo copy FROM TO` without a policy file, pushing over plain HTTP
/// (`oci:DIR:TAG`, `docker://HOST/REPO:TAG`).
pub fn skopeo_copy(from: &str, to: &str) {
    run(Command::new("skopeo").args([
        "--insecure-policy",
        "copy",
        "--dest-tls-verify=false",
        from,
        to,
    ]));
}

/// Fail unless `tool` is on PATH; says how to install it.
pub fn require(tool: &str) -> PathBuf {
    which(tool).unwrap_or_else(|| {
        panic!(
            "`{tool}` is not installed: run `make deps` (as root) to install the test dependencies"
        )
    })
}

/// Fail the test unless `present`: CI runs every test as root on a kernel
/// with FUSE, passthrough and io_uring, so a missing prerequisite is an
/// error to fix on this machine (`how`), never a test to skip: a test that
/// returned early would pass without testing anything.
pub fn require_that(present: bool, what: &str, how: &str) {
    if !present {
        panic!("this test needs {what}, which this machine lacks: {how}");
    }
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Fail unless this process is root and `/dev/fuse` exists: the FUSE tests
/// mount the filesystem (and overlays on it) for real.
pub fn require_root_fuse() {
    require_that(
        is_root(),
        "root (it mounts FUSE and overlayfs)",
        "run the tests as root, as `make test` and CI do",
    );
    require_that(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse",
        "load the fuse module (`modprobe fuse`) or run on a host with FUSE",
    );
}

/// Fail unless the kernel offers FUSE passthrough (Linux 6.9 or later,
/// `CONFIG_FUSE_PASSTHROUGH`).
pub fn require_fuse_passthrough() {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    require_that(
        version >= (6, 9),
        &format!("FUSE passthrough (Linux >= 6.9; this is {release:?})"),
        "run the tests on a newer kernel, as CI does",
    );
}

/// Fail unless `path` exists (a file from the host a test builds on).
pub fn require_file(path: &str, how: &str) {
    require_that(Path::new(path).exists(), path, how);
}

pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// The repository root (tests run with the crate dir as cwd).
pub fn repo_root() -> PathBuf {
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    while !dir.join("Cargo.lock").exists() && !dir.join(".git").exists() {
        if !dir.pop() {
            break;
        }
    }
    dir
}

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on 127.0.0.1")
}

/// Run a command, panicking with its output if it fails.
/// A free TCP port on the local address `ip`.
pub fn free_port_on(ip: &str) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port on {ip}: {e}"))
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

pub(crate) fn wait_until(
    what: &str,
    timeout: Duration,
    log: &Path,
    mut ready: impl FnMut() -> bool,
) {
    let start = Instant::now();
    while !ready() {
        if start.elapsed() > timeout {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            panic!(
                "{what} did not become ready within {timeout:?}; last log lines:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stop a child politely (SIGTERM), then firmly.
pub(crate) fn stop(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Unmount everything mounted at or below `dir`, deepest first (not what
/// is mounted on a sibling whose name starts with `dir`'s).
pub fn unmount_below(dir: &Path) {
    use stargaze_service::mountinfo;
    for p in mountinfo::mount_points_under(&mountinfo::read(), dir) {
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A private containerd 1.6 with its own root, state, sockets and namespace.
pub struct Containerd {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub namespace: String,
    child: Child,
}

impl Containerd {
    /// Start containerd; `extra_config` is appended to its config.toml
    /// (e.g. a `[proxy_plugins]` table).
    pub fn start(extra_config: &str) -> Containerd {
        Containerd::start_inner(extra_config, None)
    }

    /// Start containerd with its CRI plugin (API v1 on the same socket),
    /// using `snapshotter` with snapshot annotations passed to it, as a
    /// Kubernetes node with a lazy-pulling snapshotter is configured. Plain
    /// HTTP registries need a `hosts.toml` in `<dir>/certs.d/<host>/`
    /// ([`Containerd::trust_plain_http`]).
    pub fn start_cri(snapshotter: &str, extra_config: &str) -> Containerd {
        Containerd::start_inner(extra_config, Some(snapshotter))
    }

    /// Let the CRI plugin pull from `host` over plain HTTP.
    pub fn trust_plain_http(&self, host: &str) {
        let dir = self.dir.path().join("certs.d").join(host);
        std::fs::create_dir_all(&dir).expect("certs.d");
        std::fs::write(
            dir.join("hosts.toml"),
            format!(
                "server = \"http://{host}\"\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )
        .expect("hosts.toml");
    }

    fn start_inner(extra_config: &str, cri_snapshotter: Option<&str>) -> Containerd {
        require("containerd");
        require("ctr");
        // Short paths: unix socket names are limited to 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("sg-ctd-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let d = dir.path();
        let socket = d.join("c.sock");
        let cri = match cri_snapshotter {
            None => "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]".to_string(),
            Some(sn) => format!(
                r#"[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{sn}"
    disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{}/certs.d""#,
                d.display()
            ),
        };
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
{cri}
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  level = "info"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
{extra_config}
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = socket.display(),
            d = d.display(),
        );
        let config_path = d.join("config.toml");
        std::fs::write(&config_path, config).expect("write containerd config");
        let log = std::fs::File::create(d.join("containerd.log")).expect("log file");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let namespace = format!("sgtest{}", std::process::id());
        let mut c = Containerd {
            dir,
            socket,
            namespace,
            child,
        };
        let log_path = c.dir.path().join("containerd.log");
        let sock = c.socket.clone();
        wait_until("containerd", Duration::from_secs(30), &log_path, || {
            Command::new("ctr")
                .arg("--address")
                .arg(&sock)
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        });
        if let Ok(Some(status)) = c.child.try_wait() {
            panic!("containerd exited at start: {status}");
        }
        c
    }

    /// `ctr` (or `ctr-remote`) against this instance and namespace.
    pub fn cmd(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg(&self.namespace);
        cmd
    }

    pub fn ctr(&self, args: &[&str]) -> Output {
        run(self.cmd("ctr").args(args))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }
}

impl Containerd {
    /// Kill and delete every task and container of our namespace, so that no
    /// shim or container outlives the test.
    fn remove_containers(&self) {
        let list = |what: &str| -> Vec<String> {
            self.cmd("ctr")
                .args([what, "ls", "-q"])
                .stdin(Stdio::null())
                .output()
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default()
        };
        for task in list("tasks") {
            self.ctr_quiet(&["tasks", "kill", "--signal", "SIGKILL", &task]);
            self.ctr_quiet(&["tasks", "delete", "--force", &task]);
        }
        for c in list("containers") {
            self.ctr_quiet(&["containers", "delete", &c]);
        }
    }

    /// `ctr` with its output and failure ignored (cleaning up what may or
    /// may not be there).
    fn ctr_quiet(&self, args: &[&str]) {
        let _ = self
            .cmd("ctr")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// Remove container `id` and its task, whatever state they are in (as
    /// a kubelet removes a failed container before it retries).
    pub fn remove_container(&self, id: &str) {
        self.ctr_quiet(&["tasks", "kill", "--signal", "SIGKILL", id]);
        self.ctr_quiet(&["tasks", "delete", "--force", id]);
        self.ctr_quiet(&["containers", "delete", id]);
    }
}

/// Remove a directory tree of empty directories (cgroups cannot be removed
/// with their files; rmdir works bottom up).
fn rmdir_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                rmdir_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.remove_containers();
        }
        stop(&mut self.child);
        unmount_below(self.dir.path());
        // containerd 1.6 keeps runc state and cgroups per namespace in global
        // places; our namespace is ours alone.
        let _ = std::fs::remove_dir_all(Path::new("/run/containerd/runc").join(&self.namespace));
        if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
            for h in hierarchies.flatten() {
                rmdir_tree(&h.path().join(&self.namespace));
            }
        }
        rmdir_tree(&Path::new("/sys/fs/cgroup").join(&self.namespace));
    }
}

/// A test CA with a server certificate for 127.0.0.1 and a client
/// certificate, all signed by it (openssl; PEM files, keys unencrypted).
pub struct TestPki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TestPki {
    /// Made in a new private directory, returned with it (the files live as
    /// long as it does).
    pub fn new() -> (tempfile::TempDir, TestPki) {
        Self::for_ips(&[])
    }

    /// [`TestPki::new`] with a server certificate valid for these
    /// addresses too (besides 127.0.0.1).
    pub fn for_ips(ips: &[&str]) -> (tempfile::TempDir, TestPki) {
        require("openssl");
        let keys = tempfile::Builder::new()
            .prefix("sg-tls-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let k = keys.path();
        let (ca, ca_key) = (k.join("ca.pem"), k.join("ca-key.pem"));
        run(Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=stargaze test CA",
                "-keyout",
            ])
            .arg(&ca_key)
            .arg("-out")
            .arg(&ca));
        let sign = |name: &str, subject: &str, ext: &str| -> (PathBuf, PathBuf) {
            let (cert, key, csr) = (
                k.join(format!("{name}.pem")),
                k.join(format!("{name}-key.pem")),
                k.join(format!("{name}.csr")),
            );
            run(Command::new("openssl")
                .args([
                    "req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout",
                ])
                .arg(&key)
                .arg("-out")
                .arg(&csr));
            let ext_file = k.join(format!("{name}.cnf"));
            std::fs::write(&ext_file, ext).expect("ext");
            run(Command::new("openssl")
                .args(["x509", "-req", "-days", "2", "-CAcreateserial", "-in"])
                .arg(&csr)
                .arg("-CA")
                .arg(&ca)
                .arg("-CAkey")
                .arg(&ca_key)
                .arg("-out")
                .arg(&cert)
                .arg("-extfile")
                .arg(&ext_file));
            (cert, key)
        };
        let (server_cert, server_key) = sign(
            "server",
            "/CN=127.0.0.1",
            &format!(
                "subjectAltName=IP:127.0.0.1{}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
                ips.iter().map(|ip| format!(",IP:{ip}")).collect::<String>()
            ),
        );
        let (client_cert, client_key) = sign(
            "client",
            "/CN=stargaze test client",
            "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
        );
        let pki = TestPki {
            ca,
            server_cert,
            server_key,
            client_cert,
            client_key,
        };
        (keys, pki)
    }
}

/// A private docker-registry (distribution 2.8) on 127.0.0.1.
pub struct Registry {
    pub dir: tempfile::TempDir,
    pub addr: String,
    child: Child,
    _keys: Option<tempfile::TempDir>,
}

impl Registry {
    pub fn start() -> Registry {
        Self::start_with("", None)
    }

    /// A registry with TLS (a test CA and a certificate for 127.0.0.1 made
    /// with openssl; returns the CA's PEM to trust) and htpasswd Basic auth for
    /// `user`/`password` (bcrypt line made with Python's crypt).
    pub fn start_tls_auth(user: &str, password: &str) -> (Registry, PathBuf) {
        let (keys, tls) = TestPki::new();
        let hash = run(Command::new("python3").args([
            "-c",
            "import crypt,sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))",
            password,
        ]));
        let htpasswd = keys.path().join("htpasswd");
        std::fs::write(
            &htpasswd,
            format!("{user}:{}", String::from_utf8_lossy(&hash.stdout).trim()),
        )
        .expect("htpasswd");
        let extra = format!(
            "  tls:\n    certificate: {}\n    key: {}\nauth:\n  htpasswd:\n    realm: stargaze-test\n    path: {}\n",
            tls.server_cert.display(),
            tls.server_key.display(),
            htpasswd.display()
        );
        let r = Self::start_with(&extra, Some(keys));
        (r, tls.ca)
    }

    /// A registry with mutual TLS: it serves a certificate for 127.0.0.1
    /// and accepts only clients whose certificate its test CA signed
    /// (distribution's `http.tls.clientcas`). Returns the CA and a client
    /// certificate and key signed by it (PEM files).
    pub fn start_mtls() -> (Registry, TestPki) {
        let (keys, tls) = TestPki::new();
        let extra = format!(
            "  tls:\n    certificate: {}\n    key: {}\n    clientcas:\n      - {}\n",
            tls.server_cert.display(),
            tls.server_key.display(),
            tls.ca.display()
        );
        let r = Self::start_with(&extra, Some(keys));
        (r, tls)
    }

    /// A plain registry listening on IPv6's loopback only (`[::1]:port`).
    pub fn start_ipv6() -> Registry {
        let port = std::net::TcpListener::bind("[::1]:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("no free port on [::1] (is IPv6 loopback up?)");
        Self::start_at(format!("[::1]:{port}"), "", None)
    }

    /// A plain registry listening on `ip` (a free port of it), e.g. a
    /// [`proxy::LocalAddr`]: a local address that is not loopback.
    pub fn start_on(ip: &str) -> Registry {
        Self::start_at(format!("{ip}:{}", free_port_on(ip)), "", None)
    }

    /// A TLS registry listening on `ip`, its certificate valid for `ip`;
    /// returns the test PKI (trust its `ca`).
    pub fn start_tls_on(ip: &str) -> (Registry, TestPki) {
        let (keys, tls) = TestPki::for_ips(&[ip]);
        let extra = format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            tls.server_cert.display(),
            tls.server_key.display(),
        );
        let r = Self::start_at(format!("{ip}:{}", free_port_on(ip)), &extra, Some(keys));
        (r, tls)
    }

    fn start_with(extra: &str, keys: Option<tempfile::TempDir>) -> Registry {
        Self::start_at(format!("127.0.0.1:{}", free_port()), extra, keys)
    }

    fn start_at(addr: String, extra: &str, keys: Option<tempfile::TempDir>) -> Registry {
        require("docker-registry");
        let dir = tempfile::Builder::new()
            .prefix("sg-reg-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let config = format!(
            "version: 0.1\nlog: {{ level: info }}\nstorage:\n  filesystem: {{ rootdirectory: {}/data }}\n  delete: {{ enabled: true }}\n  redirect: {{ disable: true }}\nhttp:\n  addr: \"{addr}\"\n{extra}",
            dir.path().display()
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).expect("registry config");
        let child = Self::spawn(dir.path());
        let r = Registry {
            dir,
            addr,
            child,
            _keys: keys,
        };
        r.wait_ready();
        r
    }

    /// docker-registry on `dir`'s config.yml, logging (appending) to
    /// `dir/registry.log`.
    fn spawn(dir: &Path) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("registry.log"))
            .expect("log");
        Command::new("docker-registry")
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry")
    }

    fn wait_ready(&self) {
        let a = self.addr.clone();
        wait_until(
            "docker-registry",
            Duration::from_secs(20),
            &self.dir.path().join("registry.log"),
            || std::net::TcpStream::connect(&a).is_ok(),
        );
    }

    /// A pull-through cache of `origin` (distribution's `proxy.remoteurl`):
    /// what it has not stored yet it fetches from the origin, serves and
    /// keeps. It refuses pushes.
    pub fn start_mirror_of(origin: &Registry) -> Registry {
        Self::start_with(
            &format!("proxy:\n  remoteurl: http://{}\n", origin.addr),
            None,
        )
    }

    /// SIGKILL: a crash, open connections reset, nothing flushed.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start again after [`Registry::kill`], on the same address, storage
    /// and config (the log goes on in the same file).
    pub fn restart(&mut self) {
        self.kill();
        self.child = Self::spawn(self.dir.path());
        self.wait_ready();
    }

    /// The registry's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Requests the registry answered (its access log's "response
    /// completed" lines) for a URI containing `needle`, e.g. a blob digest.
    pub fn answered(&self, needle: &str) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("response completed") && l.contains(needle))
            .count()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// Build our Go helper `tests/go/<name>` against Debian's Go sources
/// (GOPATH mode, no network) and return the binary path. Binaries are
/// cached under the cargo target dir by source content.
pub fn go_build(name: &str) -> PathBuf {
    go_build_with_aliases(name, &[])
}

/// [`go_build`] for helpers whose dependencies import a Go module by its
/// major-version path while Debian packages it without the suffix (e.g.
/// containerd's snapshotter test suite imports `gotest.tools/v3/assert`,
/// packaged as `/usr/share/gocode/src/gotest.tools`). Each
/// `(import_path, packaged)` pair makes `import_path` resolve to
/// `/usr/share/gocode/src/<packaged>` in the build's private GOPATH.
pub fn go_build_with_aliases(name: &str, aliases: &[(&str, &str)]) -> PathBuf {
    require("go");
    let src_dir = repo_root().join("tests/go").join(name);
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&src_dir)
        .unwrap_or_else(|e| panic!("{}: {e}", src_dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "go"))
        .collect();
    files.sort();
    for f in &files {
        sha2::Digest::update(&mut hasher, std::fs::read(f).expect("read go source"));
    }
    for (import_path, packaged) in aliases {
        sha2::Digest::update(&mut hasher, format!("alias {import_path} {packaged}\n"));
    }
    let key = hex::encode(&sha2::Digest::finalize(hasher)[..8]);
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    let out_dir = target.join("go-tools");
    let bin = out_dir.join(format!("{name}-{key}"));
    if bin.is_file() {
        return bin;
    }
    std::fs::create_dir_all(&out_dir).expect("go-tools dir");
    let gopath = tempfile::tempdir_in(&out_dir).expect("gopath");
    let pkg = gopath.path().join("src").join(name);
    std::fs::create_dir_all(&pkg).expect("gopath src");
    for f in &files {
        std::fs::copy(f, pkg.join(f.file_name().expect("name"))).expect("copy go source");
    }
    for (import_path, packaged) in aliases {
        let packaged = Path::new("/usr/share/gocode/src").join(packaged);
        assert!(
            packaged.is_dir(),
            "{} is missing: run `make deps` (as root) to install the Go packages the tests build against",
            packaged.display()
        );
        let link = gopath.path().join("src").join(import_path);
        std::fs::create_dir_all(link.parent().expect("alias parent")).expect("gopath alias dir");
        std::os::unix::fs::symlink(&packaged, &link).expect("gopath alias");
    }
    let tmp_bin = out_dir.join(format!(".{name}-{key}.{}", std::process::id()));
    run(Command::new("go")
        .current_dir(&pkg)
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "")
        .env(
            "GOPATH",
            format!("{}:/usr/share/gocode", gopath.path().display()),
        )
        .env("GOCACHE", out_dir.join("gocache"))
        .env("CGO_ENABLED", "0")
        .args(["build", "-trimpath", "-o"])
        .arg(&tmp_bin)
        .arg("."));
    std::fs::rename(&tmp_bin, &bin).expect("install go tool");
    bin
}

/// The team's notes beside the checkout (`../shared`), which hold the
/// builder for the Go Stargz Snapshotter used as the reference peer.
pub fn team_shared_dir() -> PathBuf {
    repo_root().join("../shared")
}

/// Build the reference Go Stargz Snapshotter daemon
/// (`../shared/peer-stargz/build.sh`, Debian's packaged Go sources, offline)
/// and return the binary. Cached under the target dir by the builder's content.
pub fn build_peer_stargz() -> PathBuf {
    require("go");
    let src = team_shared_dir().join("peer-stargz");
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    for f in ["main.go", "build.sh"] {
        let bytes = std::fs::read(src.join(f)).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (the peer builder lives in ../shared beside the checkout)",
                src.join(f).display()
            )
        });
        sha2::Digest::update(&mut hasher, bytes);
    }
    let key = hex::encode(&sha2::Digest::finalize(hasher)[..8]);
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    let build_dir = target.join("go-tools").join(format!("peer-stargz-{key}"));
    let bin = build_dir.join("containerd-stargz-grpc-peer");
    if bin.is_file() {
        return bin;
    }
    // Built in a private directory, then renamed into place: tests in
    // several binaries may build it at the same time (build.sh empties its
    // BUILD_DIR first).
    let tools = target.join("go-tools");
    std::fs::create_dir_all(&tools).expect("go-tools dir");
    let scratch = tempfile::tempdir_in(&tools).expect("peer build dir");
    run(Command::new("sh")
        .arg(src.join("build.sh"))
        .env("BUILD_DIR", scratch.path())
        .env("GOCACHE", tools.join("gocache")));
    let built = scratch.path().join("containerd-stargz-grpc-peer");
    assert!(
        built.is_file(),
        "peer build did not produce {}",
        built.display()
    );
    std::fs::create_dir_all(&build_dir).expect("peer build dir");
    std::fs::rename(&built, &bin).expect("peer binary into place");
    bin
}

/// A running reference Go Stargz Snapshotter (proxy snapshotter plugin).
pub struct PeerStargz {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    child: Child,
}

impl PeerStargz {
    /// Start the peer daemon with an empty config (upstream defaults) and a
    /// private root. Register it in containerd with [`PeerStargz::proxy_config`].
    pub fn start() -> PeerStargz {
        let bin = build_peer_stargz();
        let dir = tempfile::Builder::new()
            .prefix("sg-peer-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let socket = dir.path().join("peer.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(&config, "").expect("peer config");
        let log_path = dir.path().join("peer.log");
        let log = std::fs::File::create(&log_path).expect("log");
        let child = Command::new(bin)
            .arg("-address")
            .arg(&socket)
            .arg("-config")
            .arg(&config)
            .arg("-root")
            .arg(dir.path().join("root"))
            .arg("-log-level")
            .arg("debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start the peer snapshotter");
        let p = PeerStargz { dir, socket, child };
        let sock = p.socket.clone();
        wait_until(
            "the peer snapshotter",
            Duration::from_secs(30),
            &log_path,
            || sock.exists(),
        );
        p
    }

    /// `[proxy_plugins]` table for containerd's config.
    pub fn proxy_config(&self, name: &str) -> String {
        format!(
            "[proxy_plugins]\n  [proxy_plugins.{name}]\n    type = \"snapshot\"\n    address = \"{}\"\n",
            self.socket.display()
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("peer.log")).unwrap_or_default()
    }
}

impl Drop for PeerStargz {
    fn drop(&mut self) {
        // SIGINT: upstream's Close() unmounts every layer and removes its dirs.
        if let Ok(None) = self.child.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        stop(&mut self.child);
        unmount_below(self.dir.path());
    }
}
