//! The image's layer stack as the entrypoint prefetch sees it while the
//! image is still resolving: the program can be fetched as soon as the
//! layers that decide which file it is are known.

use std::sync::Arc;

use stargaze_cache::Cache;
use stargaze_fetcher::entrypoint::{Command, Stack, prefetch};
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
    let mut out = Vec::new();
    let res =
        stargaze_format::convert(name, &tar, &mut out, &ConvertOptions::default(), None).unwrap();
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
        &FetchOptions::default(),
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
    let config = serde_json::json!({"config": {"Cmd": [program]}});
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
        .program_known(&python)
        .expect("decided without the base");
    assert_eq!(l.digest, middle.digest);
    assert_eq!(l.index.path_of(ino), "/usr/bin/python3.11");

    // A layer above it missing: it might hide or replace the file.
    let stack = Stack::partial(vec![None, Some(middle.clone()), Some(base.clone())]);
    assert!(stack.program_known(&python).is_none());

    // A program the known layers do not have: it may be in the missing
    // base, so nothing is decided yet; with the base it is found there.
    let sh = command("sh");
    let stack = Stack::partial(vec![Some(top.clone()), Some(middle.clone()), None]);
    assert!(stack.program_known(&sh).is_none());
    let stack = Stack::new(vec![top.clone(), middle.clone(), base.clone()]);
    let (l, ino) = stack.program_known(&sh).unwrap();
    assert_eq!(
        (l.digest.as_str(), l.index.path_of(ino).as_str()),
        (base.digest.as_str(), "/usr/bin/sh")
    );
    // Complete stack, absent program: decided, nothing to fetch.
    assert!(stack.program_known(&command("ruby")).is_none());
    assert_eq!(stack.resolve_known("/usr/bin/ruby"), Ok(None));
}

/// CPython in an image with glibc is a dynamically linked glibc program:
/// its loader, libc and glibc's start-up files are fetched with it, before
/// its bytes are parsed (here they cannot be: it is no real ELF file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpython_in_a_glibc_image_fetches_loader_and_libc_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::open_writer(&dir.path().join("cache")).unwrap());
    let base = layer(
        dir.path(),
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
            E::File("usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", b"loader"),
            E::File("usr/lib/x86_64-linux-gnu/libc.so.6", b"libc"),
            E::File(
                "usr/lib/x86_64-linux-gnu/libm.so.6",
                b"libm, needed by nobody here",
            ),
            E::Dir("etc/"),
            E::File("etc/ld.so.cache", b"cache"),
            E::File("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
            E::Dir("usr/bin/"),
            E::File("usr/bin/sh", b"#!not a shell\n"),
        ]),
    )
    .await;
    let python = python_layer(dir.path(), &cache, "python").await;
    let stack = Stack::new(vec![python.clone(), base.clone()]);
    let with_arch = |program: &str, arch: &str| {
        let config = serde_json::json!({"architecture": arch, "config": {"Cmd": [program]}});
        Command::from_config(&config).unwrap()
    };

    let done = prefetch(&stack, &with_arch("python3", "amd64")).await;
    for f in [
        "/usr/bin/python3",
        "/lib64/ld-linux-x86-64.so.2",
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/etc/ld.so.cache",
        "/etc/passwd",
    ] {
        assert!(
            done.files.iter().any(|p| p == f),
            "{f} not in {:?}",
            done.files
        );
    }
    assert!(
        !done.files.iter().any(|p| p.contains("libm")),
        "{:?}",
        done.files
    );
    let libc = base
        .index
        .lookup_path("/usr/lib/x86_64-linux-gnu/libc.so.6")
        .unwrap();
    let node = base.index.inode(libc).unwrap();
    assert!(
        node.chunks().all(|c| base.presence.is_present(c.global)),
        "libc was fetched"
    );

    // Another architecture's glibc is not this image's: nothing guessed.
    let done = prefetch(&stack, &with_arch("python3", "arm64")).await;
    assert!(
        !done.files.iter().any(|p| p.contains("libc")),
        "{:?}",
        done.files
    );
    // Nor for a program not known to be a glibc program (a script).
    let done = prefetch(&stack, &with_arch("sh", "amd64")).await;
    assert!(
        !done.files.iter().any(|p| p.contains("libc")),
        "{:?}",
        done.files
    );
}
