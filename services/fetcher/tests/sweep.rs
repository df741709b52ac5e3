//! Read-ahead in blob order: reads that go through a layer's files one
//! after another get the next files fetched ahead, in a window that grows;
//! reads that jump around get nothing extra.

use std::sync::Arc;

use stargaze_cache::Cache;
use stargaze_fetcher::sweep::{FIRST_WINDOW, SEQUENTIAL_AFTER};
use stargaze_fetcher::{FetchOptions, FileBlob, Layer, resolve_layer};
use stargaze_format::convert::ConvertOptions;
use stargaze_testkit::crafted::{dir, reg, tar_of};

const FILES: usize = 400;

/// A layer of `FILES` files of 48 KiB of incompressible bytes, in one
/// directory, and its files' inodes in blob order.
async fn layer(d: &std::path::Path) -> (Arc<Layer>, Vec<u64>) {
    layer_of(d, &[("data", FILES)]).await
}

/// A layer with `n` such files in each directory `dir` (stored in this
/// order), and its files' inodes in blob order.
async fn layer_of(d: &std::path::Path, dirs: &[(&str, usize)]) -> (Arc<Layer>, Vec<u64>) {
    let mut x = 7u32;
    let mut entries = Vec::new();
    let mut names = Vec::new();
    let mut made = std::collections::HashSet::new();
    for &(name, n) in dirs {
        let mut path = String::new();
        for part in name.split('/') {
            path = format!("{path}{part}/");
            if made.insert(path.clone()) {
                entries.push(dir(&path));
            }
        }
        for i in 0..n {
            let file = format!("{name}/f{i:04}");
            entries.push(reg(
                &file,
                &stargaze_testkit::image::file_bytes(48 << 10, &mut x),
            ));
            names.push(file);
        }
    }
    let mut out = Vec::new();
    let res = stargaze_format::convert(
        "sweep",
        &tar_of(&entries),
        &mut out,
        &ConvertOptions::default(),
        None,
    )
    .unwrap();
    let path = d.join("blob");
    std::fs::write(&path, &out).unwrap();
    let cache = Arc::new(Cache::open_writer(&d.join("cache")).unwrap());
    let layer = Arc::new(
        resolve_layer(
            cache,
            Arc::new(FileBlob::open(&path).unwrap()),
            &res.digest.to_string(),
            Some(res.toc_digest),
            false,
            &FetchOptions::default(),
        )
        .await
        .unwrap(),
    );
    let inos = names
        .iter()
        .map(|n| layer.index.lookup_path(&format!("/{n}")).unwrap())
        .collect();
    (layer, inos)
}

#[tokio::test]
async fn a_sweep_through_the_files_is_read_ahead_in_a_growing_window() {
    let d = tempfile::tempdir().unwrap();
    let (layer, inos) = layer(d.path()).await;
    let whole = |ino: u64| (ino, 0u64, 48u64 << 10);
    let mut ahead_sizes = Vec::new();
    for (i, &ino) in inos.iter().take(12).enumerate() {
        let ahead = layer.sweep_ahead(&[whole(ino)]);
        if i < SEQUENTIAL_AFTER as usize {
            assert!(ahead.is_empty(), "read {i}: nothing ahead yet");
            continue;
        }
        let bytes: u64 = ahead.iter().map(|r| r.2).sum();
        ahead_sizes.push(bytes);
        // Ahead means the files after this one, never this one or before.
        for r in &ahead {
            let pos = inos.iter().position(|&x| x == r.0).unwrap();
            assert!(pos > i, "read {i} fetched file {pos} ahead");
        }
    }
    assert!(ahead_sizes[0] >= FIRST_WINDOW / 2, "{ahead_sizes:?}");
    // The window doubles: the fifth step reads well past the first.
    let reach: u64 = ahead_sizes.iter().sum();
    assert!(reach > 8 * FIRST_WINDOW, "{ahead_sizes:?}");
}

#[tokio::test]
async fn reads_that_jump_around_get_nothing_ahead() {
    let d = tempfile::tempdir().unwrap();
    let (layer, inos) = layer(d.path()).await;
    let mut i = 17usize;
    for _ in 0..60 {
        i = (i * 97 + 13) % FILES;
        let ahead = layer.sweep_ahead(&[(inos[i], 0, 4096)]);
        assert!(ahead.is_empty(), "file {i}");
    }
    // Backwards one by one is no sweep either.
    for &ino in inos.iter().rev().take(20) {
        assert!(layer.sweep_ahead(&[(ino, 0, 4096)]).is_empty());
    }
}

#[tokio::test]
async fn reading_only_the_head_of_each_file_in_turn_is_no_sweep() {
    // `file` over a directory: the first bytes of every file, in order.
    let d = tempfile::tempdir().unwrap();
    let (layer, inos) = layer(d.path()).await;
    for (i, &ino) in inos.iter().take(40).enumerate() {
        let ahead = layer.sweep_ahead(&[(ino, 0, 4096)]);
        assert!(ahead.is_empty(), "head of file {i}");
    }
}

#[tokio::test]
async fn the_read_ahead_stays_in_the_directory_being_swept() {
    // find /srv/docs -name x | xargs cat: the sweep reads ahead to the end
    // of the directory and not into the one stored after it, until the
    // reads themselves go on there.
    let d = tempfile::tempdir().unwrap();
    let (layer, inos) = layer_of(
        d.path(),
        &[("srv/docs/a", 30), ("srv/docs/b", 200), ("srv/other", 200)],
    )
    .await;
    // Read files `files` whole in turn: the positions of the files fetched
    // ahead meanwhile.
    let sweep = |files: &[u64]| -> Vec<usize> {
        let pos = |ino: u64| inos.iter().position(|&x| x == ino).unwrap();
        files
            .iter()
            .flat_map(|&ino| layer.sweep_ahead(&[(ino, 0, 48 << 10)]))
            .map(|r| pos(r.0))
            .collect()
    };
    let fetched = sweep(&inos[..30]);
    assert!(
        !fetched.is_empty(),
        "a sweep through srv/docs/a read nothing ahead"
    );
    assert!(
        fetched.iter().all(|&p| p < 30),
        "read ahead past srv/docs/a: {fetched:?}"
    );
    // On into srv/docs/b: the sweep widens to srv/docs and goes on, but
    // not into srv/other.
    let fetched = sweep(&inos[30..60]);
    assert!(
        fetched.iter().any(|&p| p >= 60),
        "nothing ahead in srv/docs/b"
    );
    assert!(
        fetched.iter().all(|&p| p < 230),
        "read ahead into srv/other: {:?}",
        fetched.iter().filter(|&&p| p >= 230).collect::<Vec<_>>()
    );
}

/// While a learned trace is replayed into the layer, a sweep gets nothing
/// ahead (the trace knows what comes next); once it is over, sweeps are
/// read ahead again.
#[tokio::test]
async fn no_read_ahead_while_a_trace_is_replayed() {
    let d = tempfile::tempdir().unwrap();
    let (layer, inos) = layer(d.path()).await;
    let whole = |ino: u64| (ino, 0u64, 48u64 << 10);
    layer.set_replaying(true);
    for (i, &ino) in inos.iter().take(12).enumerate() {
        assert!(layer.sweep_ahead(&[whole(ino)]).is_empty(), "read {i}");
    }
    layer.set_replaying(false);
    let ahead: usize = inos
        .iter()
        .skip(12)
        .take(SEQUENTIAL_AFTER as usize + 2)
        .map(|&ino| layer.sweep_ahead(&[whole(ino)]).len())
        .sum();
    assert!(ahead > 0, "no read-ahead after the replay");
}
