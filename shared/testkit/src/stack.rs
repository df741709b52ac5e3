//! The three stargaze services as real processes (the binaries of this
//! workspace) with one private config: sockets, cache, FUSE mountpoint and
//! snapshot root all in a temporary directory. Each service can be killed
//! with SIGKILL and started again, as systemd would restart it; fs and the
//! snapshotter get a file descriptor store as their units have
//! (`FileDescriptorStoreMax=1`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One of the three services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Fetcher,
    Fs,
    Snapshotter,
}

impl Service {
    pub const ALL: [Service; 3] = [Service::Fetcher, Service::Fs, Service::Snapshotter];

    pub fn binary(self) -> &'static str {
        match self {
            Service::Fetcher => "stargaze-fetcher",
            Service::Fs => "stargaze-fs",
            Service::Snapshotter => "stargaze-snapshotter",
        }
    }
}

/// A workspace binary next to the running test's target directory, built
/// with cargo first if this test run did not build it.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let bin = profile_dir.join(name);
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--bin", name])
            .current_dir(crate::repo_root());
        if profile_dir.file_name().is_some_and(|p| p == "release") {
            cmd.arg("--release");
        }
        crate::run(&mut cmd);
    }
    bin
}

/// The running services.
pub struct Stack {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub fetcher_socket: PathBuf,
    pub fs_socket: PathBuf,
    pub snapshotter_socket: PathBuf,
    pub mountpoint: PathBuf,
    pub cache_dir: PathBuf,
    pub root: PathBuf,
    children: [Option<Child>; 3],
    args: [Vec<String>; 3],
    /// systemd's descriptor store of the fs unit.
    pub fs_store: crate::fdstore::FdStore,
    /// The snapshotter unit's (its listening socket).
    pub snapshotter_store: crate::fdstore::FdStore,
}

impl Stack {
    /// Start the three services under `dir` (which must outlive the stack).
    /// `extra` is appended to each section: e.g. `[("fetcher", "prefetch_size = 0")]`;
    /// other sections (`[cri_keychain]`) are written after them.
    pub fn start(dir: &Path, extra: &[(&str, &str)]) -> Stack {
        Stack::start_with_args(dir, extra, &[])
    }

    /// [`Stack::start`] with extra command-line arguments for some services
    /// (kept for restarts), e.g. `[(Service::Fetcher, "--no-background-fetch")]`.
    pub fn start_with_args(dir: &Path, extra: &[(&str, &str)], args: &[(Service, &str)]) -> Stack {
        let section = |name: &str| -> String {
            extra
                .iter()
                .filter(|(s, _)| *s == name)
                .map(|(_, v)| format!("{v}\n"))
                .collect()
        };
        let mut s = Stack {
            dir: dir.to_path_buf(),
            config: dir.join("stargaze.toml"),
            fetcher_socket: dir.join("fetcher.sock"),
            fs_socket: dir.join("fs.sock"),
            snapshotter_socket: dir.join("snapshotter.sock"),
            mountpoint: dir.join("mnt"),
            cache_dir: dir.join("cache"),
            root: dir.join("root"),
            children: [None, None, None],
            args: Default::default(),
            fs_store: crate::fdstore::FdStore::bind(&dir.join("fs-notify.sock")),
            snapshotter_store: crate::fdstore::FdStore::bind(&dir.join("snapshotter-notify.sock")),
        };
        for (svc, a) in args {
            s.args[Self::index(*svc)].push(a.to_string());
        }
        let config = format!(
            "[fetcher]\nsocket = \"{}\"\ncache_dir = \"{}\"\n\
             hosts_dir = \"{}\"\nstargz_config = \"\"\n{}\n\
             [fs]\nsocket = \"{}\"\nmountpoint = \"{}\"\n{}\n\
             [snapshotter]\nsocket = \"{}\"\nroot = \"{}\"\n{}\n\
             [log]\nlevel = \"info,stargaze_snapshotter=debug\"\n{}",
            s.fetcher_socket.display(),
            s.cache_dir.display(),
            // Private: never the machine's registry configuration.
            dir.join("certs.d").display(),
            section("fetcher"),
            s.fs_socket.display(),
            s.mountpoint.display(),
            section("fs"),
            s.snapshotter_socket.display(),
            s.root.display(),
            section("snapshotter"),
            other_sections(extra),
        );
        std::fs::write(&s.config, config).expect("write stack config");
        for svc in Service::ALL {
            s.spawn(svc);
        }
        s
    }

    fn index(svc: Service) -> usize {
        svc as usize
    }

    pub fn log_path(&self, svc: Service) -> PathBuf {
        self.dir.join(format!("{}.log", svc.binary()))
    }

    pub fn log(&self, svc: Service) -> String {
        std::fs::read_to_string(self.log_path(svc)).unwrap_or_default()
    }

    pub fn socket(&self, svc: Service) -> &Path {
        match svc {
            Service::Fetcher => &self.fetcher_socket,
            Service::Fs => &self.fs_socket,
            Service::Snapshotter => &self.snapshotter_socket,
        }
    }

    /// Start one service (appending to its log) and wait for its socket.
    pub fn spawn(&mut self, svc: Service) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(svc))
            .expect("service log");
        let mut cmd = match svc {
            Service::Fs => self.fs_store.command(&workspace_bin(svc.binary())),
            Service::Snapshotter => self.snapshotter_store.command(&workspace_bin(svc.binary())),
            _ => Command::new(workspace_bin(svc.binary())),
        };
        // Ready once it says it serves (a listener kept in the descriptor
        // store accepts connections before the process does).
        let serving = format!("{} serving", svc.binary());
        let served_before = self.log(svc).matches(&serving).count();
        let child = cmd
            .arg("--config")
            .arg(&self.config)
            .args(&self.args[Self::index(svc)])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", svc.binary()));
        self.children[Self::index(svc)] = Some(child);
        let start = Instant::now();
        loop {
            if std::os::unix::net::UnixStream::connect(self.socket(svc)).is_ok()
                && self.log(svc).matches(&serving).count() > served_before
            {
                break;
            }
            if let Some(c) = self.children[Self::index(svc)].as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!(
                    "{} exited at start ({status}):\n{}",
                    svc.binary(),
                    self.log(svc)
                );
            }
            if start.elapsed() > Duration::from_secs(30) {
                panic!(
                    "{} did not listen within 30 s:\n{}",
                    svc.binary(),
                    self.log(svc)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM one service and wait for it, as `systemctl stop` would
    /// (without releasing its descriptor store: `systemctl restart`).
    pub fn stop(&mut self, svc: Service) {
        if let Some(mut c) = self.children[Self::index(svc)].take() {
            crate::stop(&mut c);
        }
    }

    /// SIGKILL one service, as a crash would.
    pub fn kill(&mut self, svc: Service) {
        if let Some(mut c) = self.children[Self::index(svc)].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `[proxy_plugins]` table for containerd's config, named `name`.
    pub fn proxy_config(&self, name: &str) -> String {
        format!(
            "[proxy_plugins]\n  [proxy_plugins.{name}]\n    type = \"snapshot\"\n    address = \"{}\"\n",
            self.snapshotter_socket.display()
        )
    }
}

/// The `extra` entries for sections other than the three services' (e.g.
/// `[cri_keychain]`), each written as a section of its own.
fn other_sections(extra: &[(&str, &str)]) -> String {
    let mut names: Vec<&str> = extra
        .iter()
        .map(|(s, _)| *s)
        .filter(|s| !["fetcher", "fs", "snapshotter", "log"].contains(s))
        .collect();
    names.sort_unstable();
    names.dedup();
    names
        .into_iter()
        .map(|name| {
            let keys: String = extra
                .iter()
                .filter(|(s, _)| *s == name)
                .map(|(_, v)| format!("{v}\n"))
                .collect();
            format!("[{name}]\n{keys}")
        })
        .collect()
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Snapshotter first (it calls the others), fs last but one: its
        // mount is torn down on SIGTERM; whatever is left is unmounted.
        for svc in [Service::Snapshotter, Service::Fs, Service::Fetcher] {
            if let Some(mut c) = self.children[Self::index(svc)].take() {
                crate::stop(&mut c);
            }
        }
        // The unit is stopped: systemd closes its store, ending the FUSE
        // connection, before anything below could wait on it.
        self.fs_store.clear();
        self.snapshotter_store.clear();
        crate::unmount_below(&self.dir);
    }
}
