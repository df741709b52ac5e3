//! `kill -9` of `stargaze-fs` serving through FUSE over io_uring while
//! readers read: the restarted process takes the connection over from the
//! descriptor store, maps the dead process's ring entries at their address,
//! answers the requests it held, registers its own entries, and every read
//! returns the right bytes (none fails, none hangs). Needs root, /dev/fuse,
//! skopeo and the fuse module's `enable_uring`.

#[path = "support/estargz.rs"]
mod estargz;
#[path = "support/fs_process.rs"]
mod fs_process;

use fs_process::{resolve_and_attach, serve_fetcher, spawn_fs, write_config};

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use stargaze_proto::v1::fetcher_client::FetcherClient;
use stargaze_proto::v1::fs_client::FsClient;
use stargaze_proto::v1::*;
use stargaze_testkit::fdstore::FdStore;
use stargaze_testkit::{Registry, image, unmount_below};

/// The fs process and its mount, gone with the test.
struct Fs {
    child: Option<Child>,
    dir: PathBuf,
}

impl Drop for Fs {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        unmount_below(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_under_io_uring_loses_no_read() {
    stargaze_testkit::require_root_fuse();
    stargaze_testkit::require_that(
        stargaze_fs::uring::module_enabled() == Some(true),
        "FUSE over io_uring (Linux >= 6.14, the fuse module's enable_uring = Y)",
        "echo Y > /sys/module/fuse/parameters/enable_uring, as CI does",
    );
    stargaze_testkit::require("skopeo");
    let reg = Registry::start();
    let work = tempfile::Builder::new()
        .prefix("sg-ring-")
        .tempdir_in("/tmp")
        .unwrap();
    let w = work.path();

    let (data, files) = image::data_layer(11);
    let (image_ref, manifest) = estargz::push(&reg, w, &[data], "stargaze/ring");

    // The fetcher, served from this process (only fs is killed).
    let fetcher_sock = serve_fetcher(w, &w.join("cache")).await;

    // fs with io_uring and without passthrough: every read is a request.
    let fs_sock = w.join("fs.sock");
    let mnt = w.join("mnt");
    let config = write_config(
        w,
        &fetcher_sock,
        &w.join("cache"),
        &fs_sock,
        &mnt,
        &["transport = \"io_uring\"", "passthrough = false"],
    );
    let log = w.join("fs.log");
    let mut store = FdStore::bind(&w.join("fs-notify.sock"));
    let mut fs = Fs {
        child: Some(spawn_fs(&mut store, &config, &log, &fs_sock, &[])),
        dir: w.to_path_buf(),
    };
    let mut fetch = FetcherClient::new(stargaze_proto::connect_unix(&fetcher_sock).unwrap());
    let mut fsc = FsClient::new(stargaze_proto::connect_unix(&fs_sock).unwrap());
    let (_, dir) =
        resolve_and_attach(&mut fetch, &mut fsc, &image_ref, &manifest["layers"][0]).await;
    let st = fsc.status(FsStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(
        st.transport,
        "io_uring",
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );

    // Readers: processes (a reader thread of this process would hold files
    // of the mount open across the fork of the new fs, whose exec then
    // waits on their FLUSH for the server it is about to become), each
    // reading every file again and again with O_DIRECT (so every read
    // reaches fs) and comparing it with its bytes, counting in a file.
    let expect = w.join("expect");
    for (name, bytes) in files.iter() {
        let p = expect.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
    let names: Vec<&str> = files
        .iter()
        .filter(|(_, b)| !b.is_empty())
        .map(|(n, _)| n.as_str())
        .collect();
    // A read the kernel had just handed to the dying process's ring is
    // ended with ECANCELED by the kernel itself (it cannot give requests of
    // a dead ring to another one): counted, retried, never wrong bytes.
    let script = format!(
        "n=0; c=0; while [ ! -e {stop} ]; do for f in {names}; do \
           if dd if={dir}/$f iflag=direct bs=1M status=none 2>{w}/err.$$ >{w}/out.$$; then \
             cmp -s {w}/out.$$ {expect}/$f || {{ echo \"$f: other bytes\"; exit 1; }}; \
             n=$((n+1)); echo $n > {w}/count.$$; \
           elif grep -q 'Operation canceled' {w}/err.$$; then c=$((c+1)); echo $c > {w}/canceled.$$; \
           else echo \"$f: $(cat {w}/err.$$)\"; exit 1; fi; \
         done; done",
        stop = w.join("stop").display(),
        names = names.join(" "),
        dir = dir.display(),
        expect = expect.display(),
        w = w.display(),
    );
    let mut readers: Vec<Child> = (0..4)
        .map(|_| {
            std::process::Command::new("sh")
                .arg("-c")
                .arg(&script)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let sum = |prefix: &str| -> u64 {
        std::fs::read_dir(w)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .filter_map(|t| t.trim().parse::<u64>().ok())
            .sum()
    };
    let reads = || sum("count.");

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = reads();
    assert!(before > 0, "no read finished before the kill");
    // kill -9 while the readers read; they wait in the kernel meanwhile.
    let mut child = fs.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    fs.child = Some(spawn_fs(&mut store, &config, &log, &fs_sock, &[]));
    let restarted = reads();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    std::fs::write(w.join("stop"), b"").unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    for r in &mut readers {
        loop {
            if let Some(status) = r.try_wait().unwrap() {
                let mut out = String::new();
                std::io::Read::read_to_string(r.stdout.as_mut().unwrap(), &mut out).unwrap();
                assert!(
                    status.success(),
                    "a read returned other bytes or failed across the kill -9: {out}\n{}",
                    std::fs::read_to_string(&log).unwrap()
                );
                break;
            }
            if Instant::now() > deadline {
                for r in &mut readers {
                    let _ = r.kill();
                }
                panic!(
                    "a reader hangs after the restart: a request the dead process held was never answered\n{}",
                    std::fs::read_to_string(&log).unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let after = reads();
    assert!(
        after > restarted,
        "no read after the restart ({before}, {restarted}, {after})"
    );
    eprintln!(
        "reads: {before} before the kill, {after} in all; {} ended ECANCELED by the kernel",
        sum("canceled.")
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("took over the FUSE connection"), "{text}");

    let mut fsc = FsClient::new(stargaze_proto::connect_unix(&fs_sock).unwrap());
    let st = fsc.status(FsStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.transport, "io_uring");
    assert!(st.ring_requests > 0, "{st:?}");
}
