//! What proxy tests need: a local address that is not loopback (proxies
//! never carry loopback traffic) and a real HTTP proxy, Debian's tinyproxy.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{free_port, require, require_that, stop, wait_until};

/// A /32 address outside 127.0.0.0/8 added to `lo` for the life of this
/// value: servers can listen on it, but it is no loopback address, so
/// proxies apply to it. (A `dummy` link would do too, but not every
/// kernel has the module; `lo` is always there.)
pub struct LocalAddr {
    pub ip: String,
}

impl LocalAddr {
    /// Needs root and `ip` (iproute2).
    pub fn create() -> LocalAddr {
        require("ip");
        require_that(
            crate::is_root(),
            "root (it adds an address to lo)",
            "run the tests as root, as `make test` and CI do",
        );
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
            ^ std::process::id().rotate_left(16);
        let mut last = String::new();
        for attempt in 0..20u32 {
            let n = seed.wrapping_add(attempt).wrapping_mul(2654435761);
            // 10.250.0.0/16, off the private ranges machines usually use.
            let ip = format!("10.250.{}.{}", (n >> 8) & 0xff, (n & 0xff).clamp(1, 254));
            let out = Command::new("ip")
                .args(["addr", "add", &format!("{ip}/32"), "dev", "lo"])
                .stdin(Stdio::null())
                .output()
                .expect("run ip");
            if out.status.success() {
                return LocalAddr { ip };
            }
            // Another test holds this one: pick again.
            last = String::from_utf8_lossy(&out.stderr).into_owned();
        }
        panic!("could not add an address to lo: {last}");
    }
}

impl Drop for LocalAddr {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["addr", "del", &format!("{}/32", self.ip), "dev", "lo"])
            .stdin(Stdio::null())
            .output();
    }
}

/// tinyproxy on 127.0.0.1 (a free port), in the foreground with a private
/// config and log; stopped when dropped.
pub struct TinyProxy {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Child,
}

impl TinyProxy {
    /// A proxy that allows CONNECT to `connect_ports` and, given
    /// `basic_auth`, wants those credentials.
    pub fn start(connect_ports: &[u16], basic_auth: Option<(&str, &str)>) -> TinyProxy {
        require("tinyproxy");
        let dir = tempfile::Builder::new()
            .prefix("sg-proxy-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let port = free_port();
        let log = dir.path().join("tinyproxy.log");
        let mut conf = format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 30\nLogFile \"{}\"\nLogLevel Info\nMaxClients 50\nAllow 127.0.0.1\nDisableViaHeader Yes\n",
            log.display()
        );
        for p in connect_ports {
            conf.push_str(&format!("ConnectPort {p}\n"));
        }
        if let Some((u, p)) = basic_auth {
            conf.push_str(&format!("BasicAuth {u} {p}\n"));
        }
        let conf_path = dir.path().join("tinyproxy.conf");
        std::fs::write(&conf_path, conf).expect("tinyproxy config");
        let child = Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(dir.path().join("stderr"))
                    .map(Stdio::from)
                    .unwrap_or(Stdio::null()),
            )
            .spawn()
            .expect("start tinyproxy");
        let mut t = TinyProxy { dir, port, child };
        let addr = format!("127.0.0.1:{port}");
        if let Ok(Some(status)) = t.child.try_wait() {
            panic!("tinyproxy exited at once ({status}): {}", t.log());
        }
        wait_until("tinyproxy", Duration::from_secs(10), &log, || {
            std::net::TcpStream::connect(&addr).is_ok()
        });
        t
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("tinyproxy.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Requests the proxy received whose request line contains `needle`
    /// (`GET http://…` for plain HTTP, `CONNECT host:port` for tunnels).
    pub fn requests(&self, needle: &str) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("Request (file descriptor") && l.contains(needle))
            .count()
    }
}

impl Drop for TinyProxy {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}
