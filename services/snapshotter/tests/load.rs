//! Load (issue 20, item 2): many containers from many lazily pulled images
//! started at once on one node, each reading all of its files, with the
//! real components (Debian's containerd 1.6, runc and docker-registry, our
//! three services as processes).
//!
//! `LOAD_IMAGES` images (default 10) share a base (static busybox and a
//! layer of files every container reads) and each has a layer of its own:
//! files of many sizes, several beyond one 4 MiB chunk, so that every image
//! is a lazy pull of its own. They are pulled at once (`stargaze rpull`)
//! and `LOAD_CONTAINERS` containers (default 50) start at once, spread over
//! the images, each reading every file of its image in an order of its
//! own and checking it against its sha256 in the image (`sha256sum -c`);
//! every container must exit 0.
//!
//! 1. The load alone, on a cold node.
//! 2. The same on a fresh node (new services, cache and containerd), with
//!    the fetcher, then fs (`LOAD_FS_KILLS` times, default once), then the
//!    snapshotter killed with SIGKILL while
//!    the images are pulled and the containers start and read, each
//!    started again as systemd would (fs taking its FUSE connection over
//!    from the descriptor store). No operator step: a `ctr` command that
//!    failed because the snapshotter was down when containerd called it is
//!    tried again, as a kubelet retries (counted and reported), nothing
//!    else is.
//!
//! After each phase every container and image is removed, and then no
//! mount is left under the test's directories (but the fs mount itself),
//! no container process or shim is left, no layer is attached, no snapshot
//! is left, and `stargaze status` reports nothing wrong.
//!
//! Needs root, /dev/fuse and the Debian packages `make deps` installs.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use stargaze_format::Digest;
mod common;

use common::{Node, Setup, push_esgz, work_dir};
use stargaze_service::mountinfo;
use stargaze_testkit::stack::{Service, Stack, workspace_bin};
use stargaze_testkit::{Containerd, Registry, image};

/// A container that has not finished by then hangs.
const CONTAINER_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a command may be retried while the snapshotter restarts.
const RETRY_WINDOW: Duration = Duration::from_secs(60);

fn env_count(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .unwrap_or_else(|| panic!("{name}={v:?} is not a positive count")),
        Err(_) => default,
    }
}

/// A tar of regular files (with their directories), mode 0644.
fn tar_of(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dirs = BTreeSet::new();
    for (name, _) in files {
        let mut p = Path::new(name).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(format!("{}/", d.display()));
            p = d.parent();
        }
    }
    for d in &dirs {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(1_600_000_000);
        b.append_data(&mut h, d, &[][..]).unwrap();
    }
    for (name, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(1_600_000_000);
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

/// The files of image `i`'s own layer: sizes around the page, the
/// fetcher's whole-file threshold (256 KiB) and the chunk (4 MiB), one of
/// several chunks, and a directory of small files (fs prefetches small
/// siblings).
fn own_files(i: usize) -> Vec<(String, Vec<u8>)> {
    let mut x = (i as u32 + 1).wrapping_mul(2_654_435_761) | 1;
    let mut files = Vec::new();
    let sizes = [
        0,
        1,
        4095,
        4096 + i,
        65_537,
        262_144 + 1,
        1_000_000 + 7 * i,
        (4 << 20) + 1 + i,
        (9 << 20) + 1000 * i,
    ];
    for (k, size) in sizes.iter().enumerate() {
        files.push((format!("img{i}/f{k}"), image::file_bytes(*size, &mut x)));
    }
    for k in 0..24 {
        let size = 100 + (k * 7919 + i * 131) % 40_000;
        files.push((
            format!("img{i}/small/s{k:02}"),
            image::file_bytes(size, &mut x),
        ));
    }
    files
}

/// The layer all images share above busybox: every container reads it, so
/// its chunks are asked for by all of them at once.
fn shared_files() -> Vec<(String, Vec<u8>)> {
    let mut x = 0x10ad_u32;
    [3000, 300_000, (5 << 20) + 3]
        .iter()
        .enumerate()
        .map(|(k, size)| (format!("shared/s{k}"), image::file_bytes(*size, &mut x)))
        .collect()
}

struct Img {
    reference: String,
    /// `sha256  /path` of every file a container reads, in the image.
    expected: Vec<String>,
}

fn sha_lines(files: &[(String, Vec<u8>)]) -> Vec<String> {
    files
        .iter()
        .map(|(n, b)| format!("{}  /{n}", Digest::of(b).hex()))
        .collect()
}

/// Build, convert to eStargz and push the test images.
fn build_images(w: &Path, registry: &Registry, n: usize) -> Vec<Img> {
    let busybox = image::busybox_layer();
    let shared = shared_files();
    let shared_layer = tar_of(&shared);
    let busybox_bytes = std::fs::read("/bin/busybox").unwrap();
    (0..n)
        .map(|i| {
            let own = own_files(i);
            let src = w.join(format!("src{i}"));
            image::write_layout(
                &src,
                &format!("stargaze.test/load{i}:src"),
                "src",
                &[busybox.clone(), shared_layer.clone(), tar_of(&own)],
            );
            let reference = format!("{}/stargaze/load{i}:esgz", registry.addr);
            push_esgz(&src, &w.join(format!("esgz{i}")), &reference);
            let _ = std::fs::remove_dir_all(&src);
            let mut expected = sha_lines(&shared);
            expected.extend(sha_lines(&own));
            expected.push(format!(
                "{}  /bin/busybox",
                Digest::of(&busybox_bytes).hex()
            ));
            expected.sort();
            Img {
                reference,
                expected,
            }
        })
        .collect()
}

/// Run `cmd`, killing it after `timeout`; `None` when it hung.
fn output_within(cmd: &mut Command, timeout: Duration) -> Option<Output> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => {
            waiter.join().unwrap();
            Some(out.unwrap())
        }
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            waiter.join().unwrap();
            None
        }
    }
}

/// What a kubelet would retry: containerd could not reach the snapshotter
/// (its proxy connection fails calls with "unavailable" while it is down
/// or the call it was in died with it).
fn snapshotter_unavailable(stderr: &str, stack_dir: &Path) -> bool {
    let socket = stack_dir.join("snapshotter.sock");
    stderr.contains(&format!(
        "dial unix {}: connect: connection refused",
        socket.display()
    )) || stderr.contains("transport is closing")
        || stderr.contains("error reading from server: EOF")
}

#[derive(Default)]
struct Tally {
    /// Commands retried because the snapshotter was unavailable.
    retries: AtomicUsize,
    /// Containers finished (successfully or not).
    done: AtomicUsize,
    /// Containers whose output `ctr run` lost (their exit status counts).
    lost_output: AtomicUsize,
    failures: Mutex<Vec<String>>,
    /// When each image was pulled and each container finished, from the
    /// start of the load.
    pulled: Mutex<Vec<Duration>>,
    finished: Mutex<Vec<Duration>>,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failures.lock().unwrap().push(what);
    }
}

/// `stargaze rpull`, retried while the snapshotter of the node in `retry`
/// is unavailable.
fn rpull(ctd: &Containerd, reference: &str, retry: Option<&Path>, tally: &Tally) -> bool {
    let deadline = Instant::now() + RETRY_WINDOW;
    loop {
        let o = output_within(
            &mut common::rpull_command(ctd, reference),
            CONTAINER_TIMEOUT,
        );
        let Some(o) = o else {
            tally.fail(format!("rpull {reference} hung"));
            return false;
        };
        if o.status.success() {
            return true;
        }
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        if retry.is_some_and(|d| snapshotter_unavailable(&err, d)) && Instant::now() < deadline {
            tally.retries.fetch_add(1, Ordering::Relaxed);
            eprintln!("retrying rpull {reference}: {}", err.trim());
            std::thread::sleep(Duration::from_millis(500));
            continue;
        }
        tally.fail(format!("rpull {reference} failed ({}): {err}", o.status));
        return false;
    }
}

/// One container of `img` (the `k`th): reads every file of the image in
/// an order of its own and checks it against its sha256 in the image
/// (`sha256sum -c`: exit 0 only if every file was read whole and matched).
/// Its `path: OK` lines are checked too when they arrive: `ctr run` now
/// and then loses the output of a task that writes it all as it exits
/// (busybox buffers it), so the exit status is what decides, and lost
/// outputs are counted.
fn container(ctd: &Containerd, img: &Img, id: &str, k: usize, retry: Option<&Path>, tally: &Tally) {
    let mut list: Vec<&str> = img.expected.iter().map(String::as_str).collect();
    let len = list.len();
    list.rotate_left((k * 7) % len);
    if k % 2 == 1 {
        list.reverse();
    }
    // On a mismatch, what was read instead: its size, sha256 and first
    // bytes, read again.
    let script = format!(
        "sha256sum -c <<'END' && exit 0\n{}\nEND\nrc=$?; for f in {}; do echo \"again $f $(wc -c < $f) $(sha256sum < $f) $(od -An -tx1 -N16 $f | tr -d ' ')\"; done; exit $rc\n",
        list.join("\n"),
        list.iter()
            .map(|l| l.split_once("  ").unwrap().1)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut ok_lines: Vec<String> = list
        .iter()
        .map(|l| format!("{}: OK", l.split_once("  ").unwrap().1))
        .collect();
    ok_lines.sort();
    let deadline = Instant::now() + RETRY_WINDOW;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let name = format!("{id}-{attempt}");
        let o = output_within(
            ctd.cmd("ctr").args([
                "run",
                "--rm",
                "--snapshotter",
                "stargaze",
                &img.reference,
                &name,
                "/bin/sh",
                "-c",
                &script,
            ]),
            CONTAINER_TIMEOUT,
        );
        let Some(o) = o else {
            tally.fail(format!("{name} hung (more than {CONTAINER_TIMEOUT:?})"));
            ctd.remove_container(&name);
            return;
        };
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        if !o.status.success() {
            ctd.remove_container(&name);
            if retry.is_some_and(|d| snapshotter_unavailable(&err, d)) && Instant::now() < deadline
            {
                tally.retries.fetch_add(1, Ordering::Relaxed);
                eprintln!("retrying {name}: {}", err.trim());
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
            let wrong: Vec<String> = out
                .lines()
                .filter(|l| l.ends_with(": FAILED"))
                .map(|l| {
                    let path = l.trim_end_matches(": FAILED");
                    let again = out
                        .lines()
                        .find(|a| a.starts_with(&format!("again {path} ")))
                        .unwrap_or("");
                    let want = img
                        .expected
                        .iter()
                        .find(|e| e.ends_with(&format!("  {path}")))
                        .map(|e| &e[..64])
                        .unwrap_or("");
                    format!("{path} (the image's sha256 {want}; read again: {again})")
                })
                .collect();
            tally.fail(format!(
                "{name} of {} failed ({}): {err}; files not matching the image: {wrong:?}",
                img.reference, o.status,
            ));
            return;
        }
        let mut got: Vec<String> = out.lines().map(String::from).collect();
        got.sort();
        if got.is_empty() {
            tally.lost_output.fetch_add(1, Ordering::Relaxed);
        } else if got != ok_lines {
            tally.fail(format!(
                "{name} of {} exited 0 but printed {got:?}; stderr: {err}",
                img.reference
            ));
        }
        return;
    }
}

/// Pull every image and start `n` containers spread over them, all at
/// once (each image's containers start as soon as it is pulled). Returns
/// when all are done; `during` runs beside them (the kills).
fn run_load(
    ctd: &Containerd,
    images: &[Img],
    n: usize,
    retry: Option<&Path>,
    tally: &Tally,
    during: impl FnOnce(),
) -> Duration {
    let started = Instant::now();
    std::thread::scope(|scope| {
        for (i, img) in images.iter().enumerate() {
            scope.spawn(move || {
                let pulled = rpull(ctd, &img.reference, retry, tally);
                tally.pulled.lock().unwrap().push(started.elapsed());
                if !pulled {
                    tally
                        .done
                        .fetch_add(n.div_ceil(images.len()), Ordering::Relaxed);
                    return;
                }
                std::thread::scope(|inner| {
                    for c in (i..n).step_by(images.len()) {
                        let id = format!("load-{}-{c}", std::process::id());
                        inner.spawn(move || {
                            container(ctd, img, &id, c / images.len(), retry, tally);
                            tally.finished.lock().unwrap().push(started.elapsed());
                            tally.done.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                });
            });
        }
        during();
    });
    started.elapsed()
}

fn stargaze_status(stack: &Stack) -> (bool, serde_json::Value) {
    let out = Command::new(workspace_bin("stargaze"))
        .arg("status")
        .arg("--json")
        .arg("--config")
        .arg(&stack.config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("stargaze status --json: {e}: {text}"));
    (out.status.success(), v)
}

fn lines(o: &Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(String::from)
        .collect()
}

/// Processes whose command line contains `needle`, as `pid: cmdline`.
fn processes_with(needle: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| {
            let c = std::fs::read(e.path().join("cmdline")).ok()?;
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            c.contains(needle)
                .then(|| format!("{}: {}", e.file_name().to_string_lossy(), c.trim_end()))
        })
        .collect()
}

/// Mounts at or under `dir`, or whose options name a path under it (an
/// overlay on our layers mounted elsewhere).
fn mounts_of(dir: &Path) -> Vec<String> {
    let d = dir.display().to_string();
    mountinfo::read()
        .into_iter()
        .filter(|m| mountinfo::is_under(&m.mount_point, dir) || m.super_options.contains(&d))
        .map(|m| format!("{} {} {}", m.mount_point.display(), m.fstype, m.source))
        .collect()
}

/// After every container and image of a phase is gone: nothing is left.
fn assert_clean(
    ctd: &Containerd,
    stack: &Stack,
    images: &[Img],
    phase: &str,
    gc_failures_allowed: bool,
) {
    let tasks = lines(&ctd.ctr(&["tasks", "ls", "-q"]));
    let containers = lines(&ctd.ctr(&["containers", "ls", "-q"]));
    assert!(
        tasks.is_empty() && containers.is_empty(),
        "{phase}: tasks {tasks:?} and containers {containers:?} are left"
    );
    for img in images {
        ctd.ctr(&["image", "rm", "--sync", &img.reference]);
    }
    // containerd's garbage collection removes the snapshots (with --sync
    // before it answers); the snapshotter detaches the layers no snapshot
    // uses when it cleans up.
    let left_over = |wait: Duration| -> Result<serde_json::Value, serde_json::Value> {
        let deadline = Instant::now() + wait;
        loop {
            let (ok, s) = stargaze_status(stack);
            if ok && s["snapshotter"]["snapshots"] == 0 && s["fs"]["layers"] == 0 {
                return Ok(s);
            }
            if Instant::now() > deadline {
                return Err(s);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let status = match left_over(Duration::from_secs(10)) {
        Ok(s) => s,
        // containerd 1.6 forgets a failed garbage collection of a
        // snapshotter: what it removed from its metadata while the
        // snapshotter was down stays in the snapshotter until containerd
        // collects the snapshotter's garbage again, at the next removal of
        // one of its snapshots. Do what the node's next container removal
        // would: one snapshot made and removed.
        Err(s)
            if gc_failures_allowed && ctd.log().contains("snapshot garbage collection failed") =>
        {
            eprintln!(
                "{phase}: {} snapshots were left after containerd's garbage collection failed while the snapshotter was down; collecting again",
                s["snapshotter"]["snapshots"]
            );
            ctd.ctr(&[
                "snapshots",
                "--snapshotter",
                "stargaze",
                "prepare",
                "gc-probe",
            ]);
            ctd.ctr(&["snapshots", "--snapshotter", "stargaze", "rm", "gc-probe"]);
            left_over(Duration::from_secs(30)).unwrap_or_else(|s| {
                panic!(
                    "{phase}: after removing every image and a second collection, snapshots or layers are left; status:\n{s:#}\n{}",
                    diagnostics(stack, ctd)
                )
            })
        }
        Err(s) => panic!(
            "{phase}: after removing every image, snapshots or layers are left; status:\n{s:#}\n{}",
            diagnostics(stack, ctd)
        ),
    };
    let snapshots = lines(&ctd.ctr(&["snapshots", "--snapshotter", "stargaze", "ls"]));
    assert!(
        snapshots.len() <= 1,
        "{phase}: containerd lists {snapshots:?}"
    );
    let ctd_dir = ctd.dir.path();
    let left: Vec<String> = mounts_of(ctd_dir)
        .into_iter()
        .chain(
            mounts_of(&stack.dir)
                .into_iter()
                .filter(|m| !m.starts_with(&format!("{} ", stack.mountpoint.display()))),
        )
        .collect();
    assert!(left.is_empty(), "{phase}: mounts are left: {left:#?}");
    let fuse: Vec<_> = mounts_of(&stack.mountpoint);
    assert_eq!(fuse.len(), 1, "{phase}: the fs mount, once: {fuse:?}");
    let shims = processes_with(&format!("-namespace {}", ctd.namespace));
    assert!(shims.is_empty(), "{phase}: shims are left: {shims:#?}");
    // Readers of this test only: containerd puts its containers' processes
    // under a cgroup named after its namespace (unique per test process),
    // and a reader orphaned by a dead shim stays there; another test's
    // readers on the same machine do not count.
    let cgroup = format!("/{}/", ctd.namespace);
    let readers: Vec<String> = processes_with("sha256sum -c")
        .into_iter()
        .filter(|p| {
            let pid = p.split_once(':').map_or("", |(pid, _)| pid);
            std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .is_ok_and(|c| c.contains(&cgroup))
        })
        .collect();
    assert!(
        readers.is_empty(),
        "{phase}: readers are left: {readers:#?}"
    );
    let services = processes_with(&stack.config.display().to_string());
    assert_eq!(
        services.len(),
        3,
        "{phase}: exactly the three services run: {services:#?}"
    );
    for s in status["services"].as_array().unwrap() {
        assert_eq!(s["up"], true, "{phase}: {s}");
    }
    let sn = &status["snapshotter"];
    assert_eq!(sn["snapshots"], 0, "{phase}: {status:#}");
    assert_eq!(sn["remote_snapshots"], 0, "{phase}: {status:#}");
    // Every layer was mounted lazily: none was unpacked instead, not even
    // while the fetcher or fs restarted.
    assert_eq!(sn["fallbacks"], 0, "{phase}: {status:#}");
    let errors = status["recent_errors"].as_array().unwrap();
    if !errors.is_empty() {
        eprintln!("{phase}: recent errors in status: {errors:#?}");
    }
    assert_eq!(status["fs"]["read_errors"], 0, "{phase}: {status:#}");
    assert_eq!(
        status["cache"]["verification_failures"], 0,
        "{phase}: {status:#}"
    );
    assert!(
        status["images"].as_array().unwrap().is_empty(),
        "{phase}: images are left in status: {status:#}"
    );
}

fn report(phase: &str, n: usize, images: usize, took: Duration, tally: &Tally) {
    let span = |v: &Mutex<Vec<Duration>>| {
        let v = v.lock().unwrap();
        let min = v.iter().min().copied().unwrap_or_default();
        let max = v.iter().max().copied().unwrap_or_default();
        format!("{:.1}-{:.1} s", min.as_secs_f64(), max.as_secs_f64())
    };
    eprintln!(
        "load {phase}: {n} containers from {images} images in {:.1} s (pulls done at {}, containers at {}), {} commands retried, {} outputs lost by ctr, {} failed",
        took.as_secs_f64(),
        span(&tally.pulled),
        span(&tally.finished),
        tally.retries.load(Ordering::Relaxed),
        tally.lost_output.load(Ordering::Relaxed),
        tally.failures.lock().unwrap().len()
    );
}

/// The last lines of every log of the node, and its warnings and errors.
fn diagnostics(stack: &Stack, ctd: &Containerd) -> String {
    let tail = |name: &str, log: String, n: usize| -> String {
        let last: Vec<&str> = log.lines().rev().take(n).collect();
        let problems: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("WARN")
                    || l.contains("ERROR")
                    || l.contains("level=error")
                    || l.contains("level=warning")
            })
            .collect();
        format!(
            "--- {name}: warnings and errors\n{}\n--- {name}: last lines\n{}\n",
            problems.join("\n"),
            last.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    };
    let mut out: String = Service::ALL
        .iter()
        .map(|s| tail(s.binary(), stack.log(*s), 30))
        .collect();
    out.push_str(&tail("containerd", ctd.log(), 30));
    keep_logs(stack, ctd, "failed");
    out
}

/// With `LOAD_KEEP_LOGS=DIR`, the node's logs are copied to `DIR/<phase>/`.
fn keep_logs(stack: &Stack, ctd: &Containerd, phase: &str) {
    if let Ok(dir) = std::env::var("LOAD_KEEP_LOGS") {
        let dir = Path::new(&dir).join(phase.replace(' ', "-"));
        let _ = std::fs::create_dir_all(&dir);
        for s in Service::ALL {
            let _ = std::fs::copy(stack.log_path(s), dir.join(format!("{}.log", s.binary())));
        }
        let _ = std::fs::write(dir.join("containerd.log"), ctd.log());
    }
}

fn assert_no_failures(phase: &str, tally: &Tally, stack: &Stack, ctd: &Containerd) {
    let failures = tally.failures.lock().unwrap();
    if !failures.is_empty() {
        panic!(
            "{phase}: {} of the containers failed:\n{}\n{}",
            failures.len(),
            failures.join("\n"),
            diagnostics(stack, ctd)
        );
    }
}

#[test]
fn many_containers_from_many_lazy_images_at_once_and_through_kills() {
    let setup = Setup::new("sg-load-", &["runc", "skopeo"]);
    let n = env_count("LOAD_CONTAINERS", 50);
    let n_images = env_count("LOAD_IMAGES", 10).min(n);
    let total = Instant::now();
    let images = build_images(setup.dir(), &setup.registry, n_images);
    eprintln!(
        "load: {n_images} images built and pushed in {:.1} s",
        total.elapsed().as_secs_f64()
    );

    // 1. The load alone.
    let (quiet, first_pull);
    {
        let node = work_dir("sg-load1-");
        let Node { ctd, stack } = Node::start(node.path());
        let tally = Tally::default();
        quiet = run_load(&ctd, &images, n, None, &tally, || {});
        first_pull = *tally.pulled.lock().unwrap().iter().min().unwrap();
        report("without kills", n, n_images, quiet, &tally);
        assert_no_failures("without kills", &tally, &stack, &ctd);
        assert_clean(&ctd, &stack, &images, "without kills", false);
        keep_logs(&stack, &ctd, "without kills");
        let (_, status) = stargaze_status(&stack);
        assert!(
            status["recent_errors"].as_array().unwrap().is_empty(),
            "errors without any kill: {status:#}"
        );
        drop(ctd);
        drop(stack);
        assert_eq!(mounts_of(node.path()), Vec::<String>::new());
    }

    // 2. The same on a fresh node, each service killed in turn: the
    // fetcher while the images are pulled (half the time the first pull
    // took alone), fs while the containers start and read (at 35 % of the
    // time the load took alone), the snapshotter while containers start,
    // read, finish and are removed (at 60 %).
    {
        let node = work_dir("sg-load2-");
        let Node { ctd, stack } = Node::start(node.path());
        // Killed and started again from the thread that drives the load.
        let stack = Mutex::new(stack);
        let tally = Tally::default();
        // LOAD_FS_KILLS (default 1) kills of fs, 2 s apart.
        let fs_kills = env_count("LOAD_FS_KILLS", 1);
        let mut schedule = vec![(Service::Fetcher, first_pull / 2)];
        for k in 0..fs_kills {
            schedule.push((
                Service::Fs,
                quiet.mul_f64(0.35) + Duration::from_secs(2) * k as u32,
            ));
        }
        let last_fs = schedule.last().unwrap().1;
        schedule.push((
            Service::Snapshotter,
            quiet.mul_f64(0.6).max(last_fs + Duration::from_secs(2)),
        ));
        let mut killed_at = Vec::new();
        let start = Instant::now();
        let took = run_load(&ctd, &images, n, Some(node.path()), &tally, || {
            for (svc, at) in schedule {
                std::thread::sleep(at.saturating_sub(start.elapsed()));
                let done = tally.done.load(Ordering::Relaxed);
                stack.lock().unwrap().kill(svc);
                killed_at.push((svc, done, start.elapsed()));
                // The units' RestartSec: 1 s, 100 ms for the snapshotter.
                std::thread::sleep(match svc {
                    Service::Snapshotter => Duration::from_millis(100),
                    _ => Duration::from_secs(1),
                });
                stack.lock().unwrap().spawn(svc);
            }
        });
        let stack = stack.into_inner().unwrap();
        report("with kills", n, n_images, took, &tally);
        for (svc, done, at) in &killed_at {
            eprintln!(
                "  {} killed at {:.1} s with {done} of {n} containers done",
                svc.binary(),
                at.as_secs_f64()
            );
        }
        assert_no_failures("with kills", &tally, &stack, &ctd);
        assert!(
            stack
                .log(Service::Fs)
                .contains("took over the FUSE connection"),
            "fs did not take its connection over:\n{}",
            stack.log(Service::Fs)
        );
        let (svc, done, _) = killed_at.last().unwrap();
        assert!(
            *done < n,
            "the load was over before {} was killed: nothing was tested under load",
            svc.binary()
        );
        assert_clean(&ctd, &stack, &images, "with kills", true);
        keep_logs(&stack, &ctd, "with kills");
        drop(ctd);
        drop(stack);
        assert_eq!(mounts_of(node.path()), Vec::<String>::new());
    }
    eprintln!(
        "load: {n} containers from {n_images} images, both phases, {:.1} s in all",
        total.elapsed().as_secs_f64()
    );
}
