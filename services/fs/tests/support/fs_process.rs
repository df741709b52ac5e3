//! The `stargaze-fs` binary started under an emulated descriptor store, as
//! the restart tests run it.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use stargaze_testkit::fdstore::FdStore;

/// Start `stargaze-fs` with `config` under `store`, its output appended to
/// `log`, and wait until it listens on `sock`. The transport is the
/// config's, whatever the suite runs with (these tests are about one).
pub fn spawn_fs(store: &mut FdStore, config: &Path, log: &Path, sock: &Path) -> Child {
    let _ = std::fs::remove_file(sock);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut child = store
        .command(Path::new(env!("CARGO_BIN_EXE_stargaze-fs")))
        .arg("--config")
        .arg(config)
        .env_remove(stargaze_fs::transport::ENV)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        if let Ok(Some(s)) = child.try_wait() {
            panic!("stargaze-fs exited at start: {s}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "fs did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}
