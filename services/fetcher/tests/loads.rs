//! What a program loads, found through the layer stack: the stack as the
//! entrypoint prefetch sees it while the image is still resolving (the
//! program can be fetched as soon as the layers that decide which file it
//! is are known), and the runtime dependency prefetch on real ELF files
//! built here with gcc and the host's glibc: a program and its libraries
//! in different layers, found through RUNPATH and the image's own
//! ld.so.cache (written by ldconfig), a `#!` script, a static binary.

use std::path::Path;
use std::sync::Arc;

use stargaze_cache::Cache;
use stargaze_fetcher::entrypoint::{Command, prefetch};
use stargaze_fetcher::loads::Loads;
use stargaze_fetcher::stack::Stack;
use stargaze_fetcher::{FetchOptions, FileBlob, Layer, resolve_layer};
use stargaze_format::convert::ConvertOptions;

enum E<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8]),
    Link(&'a str, &'a str),
}

fn tar_of(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_ustar();
        match e {
            E::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
            E::File(p, data) => {
                h.set_mode(0o755);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, *data).unwrap();
            }
            E::Link(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, p, target).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

async fn layer(dir: &std::path::Path, cache: &Arc<Cache>, name: &str, tar: Vec<u8>) -> Arc<Layer> {
    layer_chunked(dir, cache, name, tar, ConvertOptions::default()).await
}

async fn layer_chunked(
    dir: &std::path::Path,
    cache: &Arc<Cache>,
    name: &str,
    tar: Vec<u8>,
    opts: ConvertOptions,
) -> Arc<Layer> {
    let mut out = Vec::new();
    let res = stargaze_format::convert(name, &tar, &mut out, &opts, None).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, &out).unwrap();
    let cache = cache.clone();
    let blob = Arc::new(FileBlob::open(&path).unwrap());
    let l = resolve_layer(
        cache,
        blob,
        &res.digest.to_string(),
        Some(res.toc_digest),
        false,
        // What loads fetches, alone (no read amplification).
        &FetchOptions {
            read_amplify: 0,
            ..FetchOptions::default()
        },
    )
    .await
    .unwrap();
    Arc::new(l)
}

/// A layer with a CPython interpreter (no real ELF file) and the usual
/// `python3` link to it.
async fn python_layer(dir: &std::path::Path, cache: &Arc<Cache>, name: &str) -> Arc<Layer> {
    let tar = tar_of(&[
        E::Dir("usr/"),
        E::Dir("usr/bin/"),
        E::File("usr/bin/python3.11", b"\x7fELF not really"),
        E::Link("usr/bin/python3", "python3.11"),
    ]);
    layer(dir, cache, name, tar).await
}

fn command(program: &str) -> Command {
    let config = serde_json::from_value(serde_json::json!({"Cmd": [program]})).unwrap();
    Command::from_config(&config).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_program_is_known_once_the_layers_above_it_are() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::open_writer(&dir.path().join("cache")).unwrap());
    // Base: merged /usr (bin -> usr/bin), a shell nobody runs here.
    let base = layer(
        dir.path(),
        &cache,
        "base",
        tar_of(&[
            E::Link("bin", "usr/bin"),
            E::Dir("usr/"),
            E::Dir("usr/bin/"),
            E::File("usr/bin/sh", b"#!base shell\n"),
        ]),
    )
    .await;
    // The interpreter, reached through a relative link.
    let middle = python_layer(dir.path(), &cache, "middle").await;
    let top = layer(
        dir.path(),
        &cache,
        "top",
        tar_of(&[E::Dir("srv/"), E::File("srv/app.py", b"print('hi')\n")]),
    )
    .await;
    let python = command("python3");

    // Only the base missing: the program's file is decided by the layers
    // above it, and found in the middle one through its link.
    let stack = Stack::partial(vec![Some(top.clone()), Some(middle.clone()), None]);
    let (l, ino) = stack
        .program_known(&python.candidates())
        .expect("decided without the base");
    assert_eq!(l.digest, middle.digest);
    assert_eq!(l.index.path_of(ino), "/usr/bin/python3.11");

    // A layer above it missing: it might hide or replace the file.
    let stack = Stack::partial(vec![None, Some(middle.clone()), Some(base.clone())]);
    assert!(stack.program_known(&python.candidates()).is_none());

    // A program the known layers do not have: it may be in the missing
    // base, so nothing is decided yet; with the base it is found there.
    let sh = command("sh");
    let stack = Stack::partial(vec![Some(top.clone()), Some(middle.clone()), None]);
    assert!(stack.program_known(&sh.candidates()).is_none());
    let stack = Stack::new(vec![top.clone(), middle.clone(), base.clone()]);
    let (l, ino) = stack.program_known(&sh.candidates()).unwrap();
    assert_eq!(
        (l.digest, l.index.path_of(ino).as_str()),
        (base.digest, "/usr/bin/sh")
    );
    // Complete stack, absent program: decided, nothing to fetch.
    assert!(stack.program_known(&command("ruby").candidates()).is_none());
    assert_eq!(stack.resolve_known("/usr/bin/ruby"), Ok(None));
}

/// Run a build command; its failure fails the test.
fn sh(dir: &Path, script: &str) {
    stargaze_testkit::require("gcc");
    stargaze_testkit::require("ldconfig");
    let out = std::process::Command::new("sh")
        .args(["-ec", script])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The host's file behind `path` (through its links).
fn host(path: &str) -> Vec<u8> {
    std::fs::read(std::fs::canonicalize(path).unwrap()).unwrap()
}

/// An image of three layers, top first: `app` (a program needing libbar
/// through its RUNPATH, libbar in that directory, a `#!` script running the
/// program, a static busybox), `libs` (libfoo, which libbar needs, in a
/// directory only the image's ld.so.cache names, and that cache) and `base`
/// (the host's loader and libc, and a library nothing needs). The program
/// is padded to 1 MiB and the app layer cut in 64 KiB chunks, so that its
/// dynamic segment lies chunks away from its head.
struct Image {
    _dir: tempfile::TempDir,
    app: Arc<Layer>,
    libs: Arc<Layer>,
    base: Arc<Layer>,
}

impl Image {
    async fn build() -> Image {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let busybox = stargaze_testkit::require("busybox");
        sh(
            d,
            r#"
            printf 'int foo(void) { return 42; }\n' > foo.c
            printf 'int foo(void);\nint bar(void) { return foo() + 1; }\n' > bar.c
            printf 'static const char pad[1 << 20] = {1};\nint bar(void);\nint main(int c, char **v) { (void)v; return bar() + pad[c]; }\n' > main.c
            gcc -shared -fPIC -o libfoo.so.1 -Wl,-soname,libfoo.so.1 foo.c
            gcc -shared -fPIC -o libbar.so.1 -Wl,-soname,libbar.so.1 bar.c -L. -l:libfoo.so.1
            gcc -o prog main.c -L. -l:libbar.so.1 -Wl,--enable-new-dtags,-rpath,/opt/app/lib -Wl,--allow-shlib-undefined
            mkdir -p root/etc root/usr/local/lib/foo
            cp libfoo.so.1 root/usr/local/lib/foo/
            echo /usr/local/lib/foo > root/etc/ld.so.conf
            ldconfig -r root
            "#,
        );
        let file = |p: &str| std::fs::read(d.join(p)).unwrap();
        let cache = Arc::new(Cache::open_writer(&d.join("cache")).unwrap());
        let ld = "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2";
        let base = layer(
            d,
            &cache,
            "base",
            tar_of(&[
                E::Link("lib64", "usr/lib64"),
                E::Link("lib", "usr/lib"),
                E::Dir("usr/"),
                E::Dir("usr/lib64/"),
                E::Link(
                    "usr/lib64/ld-linux-x86-64.so.2",
                    "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                ),
                E::Dir("usr/lib/"),
                E::Dir("usr/lib/x86_64-linux-gnu/"),
                E::File(ld, &host("/lib64/ld-linux-x86-64.so.2")),
                E::File(
                    "usr/lib/x86_64-linux-gnu/libc.so.6",
                    &host("/lib/x86_64-linux-gnu/libc.so.6"),
                ),
                E::File(
                    "usr/lib/x86_64-linux-gnu/libunused.so.1",
                    &file("libfoo.so.1"),
                ),
            ]),
        )
        .await;
        let libs = layer(
            d,
            &cache,
            "libs",
            tar_of(&[
                E::Dir("etc/"),
                E::File("etc/ld.so.cache", &file("root/etc/ld.so.cache")),
                E::Dir("usr/"),
                E::Dir("usr/local/"),
                E::Dir("usr/local/lib/"),
                E::Dir("usr/local/lib/foo/"),
                E::File("usr/local/lib/foo/libfoo.so.1", &file("libfoo.so.1")),
            ]),
        )
        .await;
        let app = layer_chunked(
            d,
            &cache,
            "app",
            tar_of(&[
                E::Dir("opt/"),
                E::Dir("opt/app/"),
                E::Dir("opt/app/bin/"),
                E::File("opt/app/bin/prog", &file("prog")),
                E::File("opt/app/bin/static", &std::fs::read(&busybox).unwrap()),
                E::File("opt/app/run.sh", b"#!/opt/app/bin/prog\n"),
                E::Dir("opt/app/lib/"),
                E::File("opt/app/lib/libbar.so.1", &file("libbar.so.1")),
            ]),
            ConvertOptions {
                chunk_size: 64 << 10,
                ..ConvertOptions::default()
            },
        )
        .await;
        Image {
            _dir: dir,
            app,
            libs,
            base,
        }
    }

    fn loads(&self, whole_mapped_below: u64) -> Loads {
        let loads = Loads::new(whole_mapped_below);
        loads.stacks.note(
            [&self.app, &self.libs, &self.base]
                .iter()
                .map(|l| l.digest.to_string())
                .collect(),
        );
        loads
    }

    fn layer_of(&self, digest: &str) -> Option<Arc<Layer>> {
        [&self.app, &self.libs, &self.base]
            .into_iter()
            .find(|l| l.digest.to_string() == digest)
            .cloned()
    }

    /// How many of the file's chunks are present, of how many.
    fn present(&self, layer: &Arc<Layer>, path: &str) -> (usize, usize) {
        let ino = layer.index.lookup_path(path).expect(path);
        let node = layer.index.inode(ino).unwrap();
        let all = node.chunks().count();
        let present = node
            .chunks()
            .filter(|c| layer.presence.is_present(c.global))
            .count();
        (present, all)
    }

    fn whole(&self, layer: &Arc<Layer>, path: &str) -> bool {
        let (p, n) = self.present(layer, path);
        p == n
    }

    fn untouched(&self, layer: &Arc<Layer>, path: &str) -> bool {
        self.present(layer, path).0 == 0
    }

    /// A read reached the start of `path` in the app layer.
    async fn first_read(&self, loads: &Loads, path: &str) {
        let ino = self.app.index.lookup_path(path).expect(path);
        self.app.fetch(&[(ino, 0, 4096)]).await.unwrap();
        loads.first_read(&self.app, ino, |d| self.layer_of(d)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_programs_first_read_fetches_its_loader_and_libraries_across_layers() {
    let image = Image::build().await;
    let loads = image.loads(64 << 20);
    image.first_read(&loads, "/opt/app/bin/prog").await;
    // Wait for the program's own whole fetch, which nobody awaits.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !image.whole(&image.app, "/opt/app/bin/prog") {
        assert!(
            std::time::Instant::now() < deadline,
            "the program was not fetched whole"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        image.present(&image.app, "/opt/app/bin/prog").1 > 10,
        "the program spans many chunks"
    );
    // RUNPATH, then transitively the image's ld.so.cache, then the
    // default directories; the loader itself from PT_INTERP.
    for (layer, path) in [
        (&image.app, "/opt/app/lib/libbar.so.1"),
        (&image.libs, "/usr/local/lib/foo/libfoo.so.1"),
        (&image.libs, "/etc/ld.so.cache"),
        (&image.base, "/usr/lib/x86_64-linux-gnu/libc.so.6"),
        (
            &image.base,
            "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        ),
    ] {
        assert!(image.whole(layer, path), "{path} was not fetched");
    }
    assert!(image.untouched(&image.base, "/usr/lib/x86_64-linux-gnu/libunused.so.1"));
    assert!(image.untouched(&image.app, "/opt/app/bin/static"));
    assert_eq!(
        loads.files.load(std::sync::atomic::Ordering::Relaxed),
        4,
        "libbar, libfoo, libc, the loader"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_libraries_come_from_a_few_ranges_of_the_program_not_all_of_it() {
    let image = Image::build().await;
    // Mapped files never whole: only the head, the dynamic segment and
    // the string table of the program are read to find its libraries.
    let loads = image.loads(0);
    image.first_read(&loads, "/opt/app/bin/prog").await;
    assert!(
        image.whole(&image.app, "/opt/app/lib/libbar.so.1")
            || image.present(&image.app, "/opt/app/lib/libbar.so.1").0 > 0
    );
    assert!(
        image
            .present(&image.libs, "/usr/local/lib/foo/libfoo.so.1")
            .0
            > 0,
        "libfoo found through libbar and ld.so.cache"
    );
    assert!(
        image
            .present(&image.base, "/usr/lib/x86_64-linux-gnu/libc.so.6")
            .0
            > 0
    );
    let (present, all) = image.present(&image.app, "/opt/app/bin/prog");
    assert!(
        present < all / 2,
        "{present} of {all} chunks of the program read"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_leads_to_its_interpreter_and_what_that_loads() {
    let image = Image::build().await;
    let loads = image.loads(64 << 20);
    image.first_read(&loads, "/opt/app/run.sh").await;
    assert!(image.present(&image.app, "/opt/app/bin/prog").0 > 0);
    assert!(image.whole(&image.app, "/opt/app/lib/libbar.so.1"));
    assert!(image.whole(&image.libs, "/usr/local/lib/foo/libfoo.so.1"));
    assert!(image.whole(&image.base, "/usr/lib/x86_64-linux-gnu/libc.so.6"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_binary_loads_nothing_else() {
    let image = Image::build().await;
    let loads = image.loads(64 << 20);
    image.first_read(&loads, "/opt/app/bin/static").await;
    assert_eq!(
        loads.files.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "nothing but the binary itself"
    );
    for (layer, path) in [
        (&image.app, "/opt/app/bin/prog"),
        (&image.libs, "/etc/ld.so.cache"),
        (&image.base, "/usr/lib/x86_64-linux-gnu/libc.so.6"),
        (
            &image.base,
            "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        ),
    ] {
        assert!(image.untouched(layer, path), "{path} was fetched");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_entrypoint_prefetch_follows_the_configs_program_the_same_way() {
    let image = Image::build().await;
    let loads = image.loads(64 << 20);
    let stack = Stack::new(vec![
        image.app.clone(),
        image.libs.clone(),
        image.base.clone(),
    ]);
    let config =
        serde_json::from_value(serde_json::json!({"Entrypoint": ["/opt/app/run.sh"]})).unwrap();
    let done = prefetch(&loads, &stack, &Command::from_config(&config).unwrap()).await;
    for f in [
        "/opt/app/run.sh",
        "/opt/app/bin/prog",
        "/opt/app/lib/libbar.so.1",
        "/usr/local/lib/foo/libfoo.so.1",
        "/lib/x86_64-linux-gnu/libc.so.6",
    ] {
        assert!(
            done.files.iter().any(|p| p == f),
            "{f} not in {:?}",
            done.files
        );
    }
    assert!(
        !done
            .files
            .iter()
            .any(|p| p.contains("unused") || p.contains("static")),
        "{:?}",
        done.files
    );
}
