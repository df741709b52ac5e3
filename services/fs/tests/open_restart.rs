//! `kill -9` of `stargaze-fs` while opens and releases are inside it, with
//! FUSE passthrough: the kernel resends those requests to the process that
//! takes the connection over; they (and every later open) must succeed, and
//! the open-file table must end up with the records of open files only.
//!
//! The kernel refuses (EIO) an open in cached mode of an inode it has open
//! with passthrough, and the reverse. The open-file table tells a new
//! process which mode each inode is in, so a record of an open the kernel
//! never saw answered must not claim a mode the inode is not in. Here one
//! open waits for its backing file (the cache file is a FIFO for a moment),
//! a second open of that file waits for its turn behind it, and an open of
//! a file already open with passthrough goes on meanwhile; the two waiting
//! are unanswered when fs is killed. The other tests kill fs at a point armed with
//! `STARGAZE_FS_TEST_KILL`. Needs root, /dev/fuse, FUSE passthrough
//! (Linux >= 6.9) and skopeo.

#[path = "support/estargz.rs"]
mod estargz;
#[path = "support/fs_process.rs"]
mod fs_process;

use fs_process::{resolve_and_attach, serve_fetcher, spawn_fs, write_config};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stargaze_fs::opens::{Mode, OpenHandle, OpenTable};
use stargaze_proto::v1::fetcher_client::FetcherClient;
use stargaze_proto::v1::fs_client::FsClient;
use stargaze_testkit::fdstore::FdStore;
use stargaze_testkit::{Registry, image, unmount_below};

/// The fs process, the processes holding or opening files of the mount,
/// and the mount, gone with the test.
struct Fs {
    child: Option<Child>,
    others: Vec<Child>,
    dir: PathBuf,
}

impl Drop for Fs {
    fn drop(&mut self) {
        for c in self.others.iter_mut().chain(self.child.as_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
        unmount_below(&self.dir);
    }
}

/// The records of the open-file table (read only: nothing is written).
fn records(table: &Path) -> Vec<OpenHandle> {
    OpenTable::open(table, true).unwrap().1
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether a thread of `pid` waits in the kernel for a FIFO's writer.
fn waits_on_a_fifo(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.filter_map(|t| t.ok()).any(|t| {
        std::fs::read_to_string(t.path().join("stack")).is_ok_and(|s| s.contains("fifo_open"))
    })
}

/// `cat` of `file` in a child process (a file of the mount open in this
/// process would be inherited by the new fs at its fork, and its exec
/// would wait on the FLUSH for the server it is about to become).
fn cat(file: &Path, out: &Path) -> Child {
    Command::new("cat")
        .arg(file)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(out).unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A layer's files served by an fs process under an emulated descriptor
/// store, with the fetcher served from this process.
/// Fields drop in order: the processes and the mount go before the
/// connection's stored descriptor and the directory holding them all.
struct Setup {
    fs: Fs,
    store: FdStore,
    _reg: Registry,
    work: tempfile::TempDir,
    config: PathBuf,
    log: PathBuf,
    fs_sock: PathBuf,
    cache_dir: PathBuf,
    table: PathBuf,
    /// The layer's directory in the mount.
    dir: PathBuf,
    files: Vec<(String, Vec<u8>)>,
}

impl Setup {
    /// fs started with `env`, a layer of small files attached.
    async fn start(env: &[(&str, &str)]) -> Setup {
        let reg = Registry::start();
        let work = tempfile::Builder::new()
            .prefix("sg-open-")
            .tempdir_in("/tmp")
            .unwrap();
        let w = work.path();

        let (data, files) = image::data_layer(12);
        let (image_ref, manifest) = estargz::push(&reg, w, &[data], "stargaze/open");

        // The fetcher, served from this process (only fs is killed).
        let cache_dir = w.join("cache");
        let fetcher_sock = serve_fetcher(w, &cache_dir).await;

        let fs_sock = w.join("fs.sock");
        let mnt = w.join("mnt");
        let config = write_config(
            w,
            &fetcher_sock,
            &cache_dir,
            &fs_sock,
            &mnt,
            &[
                "transport = \"classic\"",
                "passthrough = true",
                "n_threads = 4",
            ],
        );
        let log = w.join("fs.log");
        let mut store = FdStore::bind(&w.join("fs-notify.sock"));
        let fs = Fs {
            child: Some(spawn_fs(&mut store, &config, &log, &fs_sock, env)),
            others: Vec::new(),
            dir: w.to_path_buf(),
        };
        let mut fetch = FetcherClient::new(stargaze_proto::connect_unix(&fetcher_sock).unwrap());
        let mut fsc = FsClient::new(stargaze_proto::connect_unix(&fs_sock).unwrap());
        let (_, dir) =
            resolve_and_attach(&mut fetch, &mut fsc, &image_ref, &manifest["layers"][0]).await;
        Setup {
            _reg: reg,
            fs,
            store,
            config,
            log,
            fs_sock,
            cache_dir,
            table: OpenTable::beside(&mnt),
            dir,
            files,
            work,
        }
    }

    fn bytes_of(&self, name: &str) -> &[u8] {
        &self.files.iter().find(|(n, _)| n == name).unwrap().1
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Start the next fs process, taking the connection over.
    fn take_over(&mut self) {
        let child = spawn_fs(&mut self.store, &self.config, &self.log, &self.fs_sock, &[]);
        self.fs.child = Some(child);
    }

    /// Wait until fs, armed to kill itself, is dead.
    fn wait_killed(&mut self) {
        let child = self.fs.child.as_mut().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                panic!("fs did not reach its kill point\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.fs.child = None;
    }

    /// `path` held open by a process (as a running program holds its
    /// binary) until killed: its index in `fs.others`.
    fn hold(&mut self, path: &Path) -> usize {
        let mut holder = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "exec 3<{}; echo open; exec sleep 600",
                path.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = holder.stdout.take().unwrap();
        self.fs.others.push(holder);
        // Read aside: an open fs never answers (it died) must fail the test,
        // whose clean-up then kills the holder, not hang it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(30));
        assert_eq!(
            line.as_deref().map(str::trim),
            Ok("open"),
            "the holder's open of {}\n{}",
            path.display(),
            self.log()
        );
        self.fs.others.len() - 1
    }

    /// Close the file the holder `i` holds.
    fn let_go(&mut self, i: usize) {
        let c = &mut self.fs.others[i];
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// `cat` of the file `name` of the layer; its output must be the file.
    fn cat_ok(&self, name: &str, out: &str) {
        let out = self.work.path().join(out);
        let mut c = cat(&self.dir.join(name), &out);
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(st) = c.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("an open of {name} is never answered\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(c.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert!(
            status.success(),
            "an open of {name} failed: {err}\n{}",
            self.log()
        );
        assert_eq!(std::fs::read(&out).unwrap(), self.bytes_of(name), "{name}");
    }

    /// Wait until every handle is released: the table holds no records.
    fn wait_no_records(&self, what: &str) {
        let start = Instant::now();
        loop {
            let left = records(&self.table);
            if left.is_empty() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{what}: records left with every file closed: {left:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opens_resent_after_a_kill_9_get_their_inodes_mode() {
    stargaze_testkit::require_root_fuse();
    stargaze_testkit::require_fuse_passthrough();
    stargaze_testkit::require("skopeo");
    let mut s = Setup::start(&[]).await;
    let (w, table, log, cache_dir, dir) = (
        s.work.path().to_path_buf(),
        s.table.clone(),
        s.log.clone(),
        s.cache_dir.clone(),
        s.dir.clone(),
    );
    let w = w.as_path();
    let files = s.files.clone();
    let bytes_of = |name: &str| &files.iter().find(|(n, _)| n == name).unwrap().1;
    // `x` stays open with passthrough; `y`'s backing file is what the
    // first waiting open waits for.
    let (x, y) = ("data/file5", "data/file4");
    let (x_path, y_path) = (dir.join(x), dir.join(y));
    // Read whole, so both are complete in the cache (and opened with
    // passthrough from now on).
    for (name, p) in [(x, &x_path), (y, &y_path)] {
        assert_eq!(&std::fs::read(p).unwrap(), bytes_of(name), "{name}");
    }
    let x_ino = std::fs::metadata(&x_path).map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.ino()
    });
    let x_ino = x_ino.unwrap();
    wait_until(
        "the reads' handles are released",
        Duration::from_secs(10),
        || records(&table).is_empty(),
    );

    // `x` held open by a process, as a running program holds its binary.
    s.hold(&x_path);
    let held = records(&table);
    assert!(
        matches!(held.as_slice(), [OpenHandle { ino, mode: Mode::Passthrough(_), .. }] if *ino == x_ino),
        "the holder's open of {x} is not the one passthrough record: {held:?}\n{}",
        std::fs::read_to_string(&log).unwrap()
    );

    // `y`'s cache file becomes a FIFO: the next open of `y` waits in fs for
    // its backing file, holding `y`'s turn to be opened.
    // (the layer's `files/INO`, perhaps a link to a shared copy).
    let y_cache = walkdir(&cache_dir)
        .into_iter()
        .filter(|p| p.parent().is_some_and(|d| d.ends_with("files")))
        .find(|p| std::fs::read(p).is_ok_and(|b| &b == bytes_of(y)))
        .expect("y's cache file");
    let y_aside = y_cache.with_extension("aside");
    std::fs::rename(&y_cache, &y_aside).unwrap();
    nix::unistd::mkfifo(&y_cache, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let fs_pid = s.fs.child.as_ref().unwrap().id();
    s.fs.others.push(cat(&y_path, &w.join("file4.out")));
    wait_until(
        "an fs thread waits for y's backing file",
        Duration::from_secs(10),
        || waits_on_a_fifo(fs_pid),
    );
    // A second open of `y` waits behind it. Nothing tells from outside that
    // it reached fs; a build that records opens before choosing their mode
    // shows it in the table. An open of `x` is answered meanwhile.
    s.fs.others.push(cat(&y_path, &w.join("file4.second")));
    s.fs.others.push(cat(&x_path, &w.join("file5.out")));
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) && records(&table).len() < 3 {
        std::thread::sleep(Duration::from_millis(20));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // kill -9 with both opens of `y` unanswered.
    let mut child = s.fs.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let left = records(&table);
    std::fs::rename(&y_aside, &y_cache).unwrap();
    s.take_over();

    // The resent opens are answered, in the inodes' modes.
    // fs.others: the holder, the two opens of `y`, the open of `x`.
    for (i, name, out) in [
        (3, x, "file5.out"),
        (1, y, "file4.out"),
        (2, y, "file4.second"),
    ] {
        let c = &mut s.fs.others[i];
        let out = w.join(out);
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = c.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!(
                    "the open of {name} resent after the take-over is never answered\n{}",
                    std::fs::read_to_string(&log).unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(c.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert!(
            status.success(),
            "the open of {name} waiting across the kill -9 failed: {err}\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
        assert_eq!(&std::fs::read(&out).unwrap(), bytes_of(name), "{name}");
    }
    // And so are new ones, while the holder keeps `x` open.
    for name in [x, y] {
        let out = w.join(format!("{}.again", name.replace('/', "_")));
        let mut c = cat(&dir.join(name), &out);
        assert!(c.wait().unwrap().success(), "a new open of {name} failed");
        assert_eq!(&std::fs::read(&out).unwrap(), bytes_of(name), "{name}");
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("took over the FUSE connection"), "{text}");
    // The dead process left records of the answered open only: one
    // recorded before its mode was chosen would claim a mode the kernel's
    // inode is not in.
    assert_eq!(left, held, "records of opens never answered");
}

/// fs set to die at kill point `point` in a release of `x`: `x` read
/// whole first (complete in the cache, so opened with passthrough from then
/// on; its cached handles close no backing id), then held open. Returns
/// the setup, the holder, and the backing id of its open, the one record.
async fn holding_passthrough(point: &str, x: &str) -> (Setup, usize, u32) {
    stargaze_testkit::require_root_fuse();
    stargaze_testkit::require_fuse_passthrough();
    stargaze_testkit::require("skopeo");
    let kill = format!("{point}:{x}");
    let mut s = Setup::start(&[(stargaze_fs::kill_point::ENV, &kill)]).await;
    s.cat_ok(x, "x.first");
    s.wait_no_records("the first read's handle is released");
    let holder = s.hold(&s.dir.join(x));
    let held = records(&s.table);
    let [
        OpenHandle {
            mode: Mode::Passthrough(raw),
            ..
        },
    ] = held.as_slice()
    else {
        panic!(
            "the holder's open of {x} is not the one passthrough record: {held:?}\n{}",
            s.log()
        );
    };
    let raw = *raw;
    (s, holder, raw)
}

/// fs killed in the release of a file's last passthrough handle, once it
/// closed the inode's backing id and before the release is answered: the
/// next process must not take over a record naming that id (it would give
/// the closed id to the next opens of the file, and the kernel fails those
/// with EIO), and the release resent to it must close nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_killed_after_closing_its_backing_id_leaves_no_record_naming_it() {
    let x = "data/file5";
    let (mut s, holder, _) = holding_passthrough("release-closed-backing", x).await;

    // Its release closes the inode's backing id, and fs dies there.
    s.let_go(holder);
    s.wait_killed();
    let left = records(&s.table);
    assert!(
        s.log().contains("killed at release-closed-backing"),
        "{}",
        s.log()
    );
    s.take_over();

    // The file opens and reads the same.
    s.cat_ok(x, "x.after");
    s.cat_ok(x, "x.again");
    s.wait_no_records("after the take-over");
    assert!(
        left.is_empty(),
        "the killed process left records naming the backing id it had closed: {left:?}"
    );
    let text = s.log();
    assert!(
        !text.contains("closing a FUSE backing id failed"),
        "a record taken over named a closed backing id\n{text}"
    );
}

/// fs killed after recording an open and before answering it: the kernel
/// never got that handle, so it never releases it; the open resent to the
/// next process must not leave its record behind (a slot taken for as long
/// as the connection lives, and an inode counted open in cached mode, so
/// never opened with passthrough again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_recorded_by_a_killed_process_and_never_answered_leaves_no_record() {
    stargaze_testkit::require_root_fuse();
    stargaze_testkit::require_fuse_passthrough();
    stargaze_testkit::require("skopeo");
    let z = "data/file3";
    let kill = format!("open-recorded:{z}");
    let mut s = Setup::start(&[(stargaze_fs::kill_point::ENV, &kill)]).await;
    let out = s.work.path().join("z.out");
    s.fs.others.push(cat(&s.dir.join(z), &out));
    s.wait_killed();
    let left = records(&s.table);
    assert!(
        matches!(
            left.as_slice(),
            [OpenHandle {
                mode: Mode::Cached,
                ..
            }]
        ),
        "the killed process did not record its open of {z}: {left:?}\n{}",
        s.log()
    );
    s.take_over();

    // The resent open is answered.
    let c = s.fs.others.last_mut().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = c.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the open of {z} resent after the take-over is never answered"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{}", s.log());
    assert_eq!(std::fs::read(&out).unwrap(), s.bytes_of(z));
    // Every file closed: nothing recorded.
    s.wait_no_records("the resent open's handle released");
    // Complete in the cache now and open in cached mode nowhere: opened
    // with passthrough.
    s.hold(&s.dir.join(z));
    let held = records(&s.table);
    assert!(
        matches!(
            held.as_slice(),
            [OpenHandle {
                mode: Mode::Passthrough(_),
                ..
            }]
        ),
        "{z} is not opened with passthrough: {held:?}\n{}",
        s.log()
    );
}

/// fs killed in the release of a file's last passthrough handle once it
/// cleared the handle's record, before it closed the backing id: no record
/// names the id, and the next process must close it (the kernel keeps an
/// id, and its cache file open, until closed or the connection ends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backing_id_a_killed_release_left_open_is_closed_by_the_next_process() {
    let x = "data/file5";
    let (mut s, holder, raw) = holding_passthrough("release-unrecorded", x).await;

    s.let_go(holder);
    s.wait_killed();
    let left = records(&s.table);
    assert!(left.is_empty(), "{left:?}");
    s.take_over();

    // FUSE_DEV_IOC_BACKING_CLOSE: _IOW(229, 2, uint32_t).
    const BACKING_CLOSE: libc::c_ulong = (1 << 30) | (4 << 16) | (229 << 8) | 2;
    let fd = s
        .store
        .fd(stargaze_fs::handover::FDNAME)
        .expect("the stored connection");
    // SAFETY: an ioctl on the connection's descriptor with a local u32.
    let r = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            BACKING_CLOSE as _,
            &raw,
        )
    };
    let e = std::io::Error::last_os_error();
    assert!(
        r < 0 && e.raw_os_error() == Some(libc::ENOENT),
        "backing id {raw} is still open after the take-over (closing it: {r}, {e})\n{}",
        s.log()
    );
    s.cat_ok(x, "x.after");
    s.wait_no_records("after the take-over");
}

fn walkdir(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().filter_map(|e| e.ok()) {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => out.extend(walkdir(&p)),
            Ok(t) if t.is_file() => out.push(p),
            _ => {}
        }
    }
    out
}
