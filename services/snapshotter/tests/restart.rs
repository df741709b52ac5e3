//! Crash safety with the real components: each service is killed with
//! SIGKILL while a lazily pulled container runs, and started again as
//! systemd would restart it.
//!
//! * fetcher: a read of a file that is not cached yet, issued while the
//!   fetcher is down, waits and succeeds once it is back (fs retries; the
//!   restarted fetcher recovers the layer from the cache without asking
//!   the registry), and later cold reads work.
//! * snapshotter: the running container keeps reading (the snapshotter is
//!   not on the read path), and new containers run after its restart.
//! * fs: the `/dev/fuse` descriptor waits in the (emulated) systemd
//!   descriptor store; the restarted fs takes the connection over, so the
//!   running container keeps reading — a read fs held when it died is
//!   resent by the kernel, one issued meanwhile waits — and new containers
//!   run; a clean restart (SIGTERM) hands the connection over too. When fs
//!   and the snapshotter restart together without the store
//!   (a reboot-like start), the snapshotter restores every remote layer by
//!   itself.

use std::time::{Duration, Instant};

use stargaze_format::Digest;
mod common;

use common::{Node, Setup, needs, stargaze_rpull, work_dir};
use stargaze_testkit::image;
use stargaze_testkit::stack::{Service, Stack};

fn sha_line(files: &[(String, Vec<u8>)], name: &str) -> String {
    let data = &files
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{name} is not in the test layer"))
        .1;
    format!("{}  /{name}", Digest::of(data).hex())
}

/// Whether a process with this command line runs (in any container).
fn running(cmdline: &str) -> bool {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " ").trim_end() == cmdline)
                .unwrap_or(false)
        })
}

#[test]
fn each_service_survives_a_kill_9() {
    let setup = Setup::new("sg-rst-", &["runc", "skopeo"]);
    let w = setup.dir();
    let (data, mut files) = image::data_layer(31);
    // Files nothing reads before fs is killed: large enough that no
    // sibling prefetch or read-ahead brings them in.
    let mut x = 0x5eed_u32;
    let cold: Vec<(String, Vec<u8>)> = ["cold/a", "cold/b"]
        .iter()
        .map(|n| (n.to_string(), image::file_bytes(600_000, &mut x)))
        .collect();
    let mut b = tar::Builder::new(Vec::new());
    for (name, bytes) in &cold {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(bytes.len() as u64);
        b.append_data(&mut h, name, &bytes[..]).unwrap();
    }
    let cold_layer = b.into_inner().unwrap();
    files.extend(cold);
    let reference = setup.push_esgz_image("restart", &[image::busybox_layer(), data, cold_layer]);
    let out = w.join("out");

    // No prefetch and no background fetch: every read below is cold.
    let Node { ctd, mut stack } = Node::on(Stack::start_with_args(
        w,
        &[("fetcher", "prefetch_size = 0")],
        &[(Service::Fetcher, "--no-background-fetch")],
    ));
    stargaze_rpull(&ctd, &reference);
    let long = format!("sg-rst-{}", std::process::id());
    ctd.ctr(&[
        "run",
        "-d",
        "--snapshotter",
        "stargaze",
        &reference,
        &long,
        "/bin/busybox",
        "sleep",
        "600",
    ]);
    let mut execs = 0;
    let mut read_in_long = |name: &str| -> std::process::Output {
        execs += 1;
        ctd.cmd("ctr")
            .args([
                "task",
                "exec",
                "--exec-id",
                &format!("read{execs}"),
                &long,
                "/bin/sha256sum",
                &format!("/{name}"),
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let ok = |o: &std::process::Output, name: &str, when: &str| {
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && text.contains(&sha_line(&files, name)),
            "{when}: reading /{name} failed ({}): {text}{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
    };
    ok(
        &read_in_long("data/file1"),
        "data/file1",
        "before any restart",
    );

    // 1. The fetcher dies; a cold read waits for it and then succeeds.
    stack.kill(Service::Fetcher);
    let started = Instant::now();
    let pending = std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            ctd.cmd("ctr")
                .args([
                    "task",
                    "exec",
                    "--exec-id",
                    "while-fetcher-down",
                    &long,
                    "/bin/sha256sum",
                    "/data/file7",
                ])
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap()
        });
        std::thread::sleep(Duration::from_secs(2));
        assert!(
            !reader.is_finished(),
            "the read did not wait for the fetcher"
        );
        stack.spawn(Service::Fetcher);
        reader.join().unwrap()
    });
    ok(
        &pending,
        "data/file7",
        "a read issued while the fetcher was down",
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(
        stack
            .log(Service::Fetcher)
            .contains("layer recovered from its saved source"),
        "{}",
        stack.log(Service::Fetcher)
    );
    ok(
        &read_in_long("data/file6"),
        "data/file6",
        "after the fetcher restarted",
    );

    // 2. The snapshotter dies: running containers do not notice; new ones
    // run once it is back.
    stack.kill(Service::Snapshotter);
    ok(
        &read_in_long("data/file5"),
        "data/file5",
        "while the snapshotter is down",
    );
    stack.spawn(Service::Snapshotter);
    let check = "sha256sum /data/file3 /data/file4 /data/hardlink";
    let logs = [Service::Snapshotter, Service::Fs, Service::Fetcher].map(|s| stack.log_path(s));
    let stack_log = || -> String {
        logs.iter()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    // containerd redials a proxy plugin with gRPC backoff (at most 3 s in
    // 1.6) and fails calls meanwhile with "unavailable", as a kubelet sees
    // it; retry like one would.
    let new_container = |id: &str| -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let o = ctd
                .cmd("ctr")
                .args([
                    "run",
                    "--rm",
                    "--snapshotter",
                    "stargaze",
                    &reference,
                    &format!("{long}-{id}"),
                    "/bin/sh",
                    "-c",
                    check,
                ])
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&o.stderr).to_string();
            if o.status.success() {
                return String::from_utf8_lossy(&o.stdout).to_string();
            }
            assert!(
                err.contains("unavailable") && Instant::now() < deadline,
                "{id}: ctr run failed: {err}\n{}",
                stack_log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let expect_new = |text: &str, when: &str| {
        for f in ["data/file3", "data/file4", "data/file6"] {
            assert!(
                text.contains(&sha_line(&files, f)[..64]),
                "{when}: {f} in {text}"
            );
        }
    };
    expect_new(
        &new_container("after-snap"),
        "after the snapshotter restarted",
    );

    // 3. fs dies while it serves a read (which waits for the fetcher,
    // killed first so the read is held by fs when it dies), and another
    // read arrives while fs is down. The FUSE connection lives on in the
    // descriptor store: both reads wait, and the restarted fs takes the
    // connection over and answers them (the held one resent by the
    // kernel); the running container never notices.
    let exec_in_long = |id: &str, name: &str| {
        ctd.cmd("ctr")
            .args([
                "task",
                "exec",
                "--exec-id",
                id,
                &long,
                // Bounded: a request lost with fs would hang the read.
                "/bin/busybox",
                "timeout",
                "-s",
                "KILL",
                "60",
                "/bin/sha256sum",
                &format!("/{name}"),
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    stack.kill(Service::Fetcher);
    let (held, queued) = std::thread::scope(|scope| {
        let held = scope.spawn(|| exec_in_long("held-by-fs", "cold/a"));
        // The reader runs (runc took its time) and has asked fs by now.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !running("/bin/sha256sum /cold/a") {
            assert!(Instant::now() < deadline, "the reader did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(1500));
        stack.kill(Service::Fs);
        let queued = scope.spawn(|| exec_in_long("while-fs-down", "cold/b"));
        std::thread::sleep(Duration::from_secs(2));
        assert!(
            !held.is_finished() && !queued.is_finished(),
            "reads failed at once while fs was down:\n{}",
            stack_log()
        );
        stack.spawn(Service::Fetcher);
        stack.spawn(Service::Fs);
        (held.join().unwrap(), queued.join().unwrap())
    });
    ok(&held, "cold/a", "a read fs held when it was killed");
    ok(&queued, "cold/b", "a read issued while fs was down");
    assert!(
        stack
            .log(Service::Fs)
            .contains("took over the FUSE connection"),
        "{}",
        stack.log(Service::Fs)
    );
    ok(
        &exec_in_long("after-fs", "data/file2"),
        "data/file2",
        "a read in the running container after fs restarted",
    );
    ok(
        &exec_in_long("after-fs-again", "data/file1"),
        "data/file1",
        "a cached file in the running container after fs restarted",
    );
    // New containers run too, on the same (taken over) layers: inodes that
    // the running container holds open keep their I/O mode.
    expect_new(&new_container("after-fs"), "after fs restarted");
    // A clean restart (`systemctl restart`: SIGTERM, then a new start with
    // the store kept) hands the connection over the same way.
    stack.stop(Service::Fs);
    stack.spawn(Service::Fs);
    ok(
        &exec_in_long("after-fs-restart", "data/file3"),
        "data/file3",
        "in the running container after a clean restart of fs",
    );
    assert_eq!(
        stack
            .log(Service::Fs)
            .matches("took over the FUSE connection")
            .count(),
        2,
        "{}",
        stack.log(Service::Fs)
    );
    ctd.cmd("ctr")
        .args(["task", "kill", "--signal", "SIGKILL", &long])
        .status()
        .unwrap();

    // 4. fs is stopped (its unit's descriptor store closes, the connection
    // ends) and started again on a new mount without layers: new containers
    // run, Prepare re-attaches the layers fs lost.
    stack.kill(Service::Fs);
    stack.fs_store.clear();
    stack.spawn(Service::Fs);
    expect_new(&new_container("after-fs-stop"), "after fs was stopped");
    assert!(
        stack
            .log(Service::Snapshotter)
            .contains("remote layer re-attached"),
        "{}",
        stack.log(Service::Snapshotter)
    );

    // 5. fs (stopped again) and then the snapshotter restart: the
    // snapshotter restores every remote layer at start, before anyone asks.
    stack.kill(Service::Snapshotter);
    stack.kill(Service::Fs);
    stack.fs_store.clear();
    stack.spawn(Service::Fs);
    stack.spawn(Service::Snapshotter);
    let layers: Vec<String> = std::fs::read_dir(out.join("blobs/sha256"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|hex| {
            let p = stack.cache_dir.join("layers").join(format!("sha256:{hex}"));
            p.exists() || stack.cache_dir.join("layers").join(hex).exists()
        })
        .collect();
    assert_eq!(layers.len(), 3, "three layers were resolved: {layers:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !layers.iter().all(|h| stack.mountpoint.join(h).is_dir()) {
        assert!(
            Instant::now() < deadline,
            "the snapshotter did not restore the layers:\n{}",
            stack.log(Service::Snapshotter)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    expect_new(&new_container("after-restore"), "after restore");
    drop(ctd);
    drop(stack);
}

/// A lazy pull while the fetcher and fs are down (crashed, restarted by
/// systemd a moment later) waits for them: every layer becomes a remote
/// snapshot, none is unpacked instead (which would download what was to
/// be fetched lazily).
#[test]
fn a_pull_while_the_fetcher_and_fs_restart_waits_for_them() {
    let setup = Setup::new("sg-rst-pull-", &["runc", "skopeo"]);
    let (data, files) = image::data_layer(32);
    let reference = setup.push_esgz_image("restart-pull", &[image::busybox_layer(), data]);
    let Node { ctd, mut stack } = Node::start(setup.dir());

    stack.kill(Service::Fetcher);
    stack.kill(Service::Fs);
    std::thread::scope(|scope| {
        let pull = scope.spawn(|| stargaze_rpull(&ctd, &reference));
        std::thread::sleep(Duration::from_millis(1500));
        assert!(
            !pull.is_finished(),
            "the pull did not wait for the fetcher:\n{}",
            stack.log(Service::Snapshotter)
        );
        stack.spawn(Service::Fetcher);
        stack.spawn(Service::Fs);
        pull.join().unwrap();
    });
    let log = stack.log(Service::Snapshotter);
    assert!(
        !log.contains("remote_snapshot_prepared=false"),
        "a layer was unpacked instead of waiting for the services:\n{log}"
    );
    assert_eq!(
        log.matches("remote_snapshot_prepared=true").count(),
        2,
        "{log}"
    );
    let o = ctd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "stargaze",
        &reference,
        &format!("sg-rst-pull-{}", std::process::id()),
        "/bin/sha256sum",
        "/data/file7",
    ]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains(&sha_line(&files, "data/file7")), "{text}");
    drop(ctd);
    drop(stack);
}

/// containerd's calls to the snapshotter while it restarts (a crash,
/// systemd starting it again a second later) wait for it: its listening
/// socket stays in the unit's descriptor store, so containerd connects to
/// it meanwhile and its calls queue instead of failing with "connection
/// refused: unavailable" (containerd 1.6 does not retry them).
#[test]
fn containerd_calls_wait_while_the_snapshotter_restarts() {
    needs(&[]);
    let work = work_dir("sg-rst-snap-");
    let Node { ctd, mut stack } = Node::start(work.path());
    let snapshots = |args: &[&str]| {
        ctd.cmd("ctr")
            .args(["snapshots", "--snapshotter", "stargaze"])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    // containerd is connected to it.
    assert!(snapshots(&["ls"]).status.success());
    stack.kill(Service::Snapshotter);
    let started = Instant::now();
    std::thread::scope(|scope| {
        let prepare = scope.spawn(|| snapshots(&["prepare", "while-down"]));
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !prepare.is_finished(),
            "containerd's call failed at once: {:?}",
            prepare
                .join()
                .map(|o| String::from_utf8_lossy(&o.stderr).to_string())
        );
        stack.spawn(Service::Snapshotter);
        let o = prepare.join().unwrap();
        assert!(
            o.status.success(),
            "a Prepare while the snapshotter restarted: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            stack.log(Service::Snapshotter)
        );
    });
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(
        stack
            .log(Service::Snapshotter)
            .contains("took the listening socket over"),
        "{}",
        stack.log(Service::Snapshotter)
    );
    // And removing works as usual afterwards.
    let o = snapshots(&["rm", "while-down"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    drop(ctd);
    drop(stack);
}
