//! The index of a layer covering every entry type, the overlayfs view, and
//! corrupt files.

use base64::Engine as _;
use stargaze_format::toc::{JsonEntry, JsonToc};
use stargaze_format::{Digest, LayerFormat, Prefetch, Toc};
use stargaze_index::model::kind;
use stargaze_index::{IndexError, IndexMeta, LayerIndex, OPAQUE_XATTR, build, write_atomic};

fn e(name: &str, kind: &str) -> JsonEntry {
    JsonEntry {
        name: name.into(),
        kind: kind.into(),
        mode: 0o755,
        ..Default::default()
    }
}

fn reg(name: &str, size: i64, offset: i64) -> JsonEntry {
    JsonEntry {
        size,
        offset,
        mode: 0o644,
        digest: Digest::of(name.as_bytes()).to_string(),
        chunk_digest: Digest::of(name.as_bytes()).to_string(),
        ..e(name, "reg")
    }
}

fn chunk(name: &str, chunk_offset: i64, chunk_size: i64, offset: i64) -> JsonEntry {
    JsonEntry {
        chunk_offset,
        chunk_size,
        offset,
        chunk_digest: Digest::of(format!("{name}{chunk_offset}").as_bytes()).to_string(),
        ..e(name, "chunk")
    }
}

fn sample_toc() -> Toc {
    let mut big = reg("usr/bin/big", 10_000, 1000);
    big.chunk_size = 4096;
    big.chunk_digest = Digest::of(b"usr/bin/big0").to_string();
    let mut sym = e("usr/bin/sh", "symlink");
    sym.link_name = "big".into();
    let mut hard = e("usr/bin/big-link", "hardlink");
    hard.link_name = "usr/bin/big".into();
    // The link's header says what its target's says, as builders write it
    // (a link's own header sets the inode's attributes).
    hard.mode = 0o644;
    let mut dev = e("dev/null", "char");
    dev.dev_major = 1;
    dev.dev_minor = 3;
    let mut blk = e("dev/sda", "block");
    blk.dev_major = 8;
    let mut x = reg("etc/xattr", 3, 9000);
    x.xattrs.insert(
        "user.bin".into(),
        base64::engine::general_purpose::STANDARD.encode(b"\xff\xfe"),
    );
    let mut setuid = reg("usr/bin/su", 5, 9500);
    setuid.mode = 0o4755;
    setuid.uid = 0;
    setuid.gid = 42;
    let entries = vec![
        reg(".prefetch.landmark", 1, 500),
        e("etc/", "dir"),
        reg("etc/hosts", 20, 800),
        x,
        e("usr/", "dir"),
        e("usr/bin/", "dir"),
        big,
        chunk("usr/bin/big", 4096, 4096, 3000),
        chunk("usr/bin/big", 8192, 0, 6000),
        sym,
        hard,
        setuid,
        e("dev/", "dir"),
        dev,
        blk,
        e("run/fifo", "fifo"),
        // Whiteouts: one hides a lower file, one names a file that exists
        // here too (dropped), one marks an opaque directory.
        reg(".wh.gone", 0, 0),
        reg("etc/.wh.hosts", 0, 0),
        e("opaque/", "dir"),
        reg("opaque/.wh..wh..opq", 0, 0),
        reg("opaque/kept", 0, 0),
        reg("stargz.index.json", 0, 0),
    ];
    Toc::build(
        &JsonToc {
            version: 1,
            entries,
            ..Default::default()
        },
        LayerFormat::Estargz,
        20_000,
    )
    .unwrap()
}

fn meta() -> IndexMeta {
    IndexMeta {
        layer_digest: Digest::of(b"layer").to_string(),
        toc_digest: Digest::of(b"toc"),
        blob_size: 21_000,
    }
}

fn open(toc: &Toc) -> LayerIndex {
    LayerIndex::from_bytes(&build(toc, &meta()).unwrap()).unwrap()
}

fn names(idx: &LayerIndex, dir: &str) -> Vec<String> {
    let ino = idx.lookup_path(dir).unwrap();
    idx.readdir(ino, 0)
        .map(|d| String::from_utf8(d.name.to_vec()).unwrap())
        .collect()
}

#[test]
fn header_and_root() {
    let idx = open(&sample_toc());
    assert_eq!(idx.layer_digest(), meta().layer_digest);
    assert_eq!(idx.toc_digest(), meta().toc_digest);
    assert_eq!(idx.blob_size(), 21_000);
    assert_eq!(idx.payload_end(), 20_000);
    assert_eq!(idx.format(), Some(LayerFormat::Estargz));
    assert_eq!(idx.prefetch(), Prefetch::UpTo(500));
    let root = idx.root();
    assert_eq!(root.ino(), 1);
    assert!(root.is_dir());
    assert_eq!(root.parent(), 1);
}

#[test]
fn overlay_view_of_landmarks_and_whiteouts() {
    let idx = open(&sample_toc());
    // Landmark and TOC hidden; `.wh.gone` became a device named `gone`.
    assert_eq!(
        names(&idx, ""),
        ["dev", "etc", "gone", "opaque", "run", "usr"]
    );
    assert!(idx.lookup_path(".prefetch.landmark").is_none());
    assert!(idx.lookup_path("stargz.index.json").is_none());
    let gone = idx.inode(idx.lookup_path("gone").unwrap()).unwrap();
    assert_eq!(gone.kind(), kind::CHAR);
    assert_eq!(gone.rdev(), (0, 0));
    assert_eq!(gone.st_mode() & 0o170000, 0o020000);
    assert_eq!((gone.uid(), gone.gid()), (0, 0));
    // A whiteout beside a real entry of the same name is dropped.
    assert_eq!(names(&idx, "etc"), ["hosts", "xattr"]);
    assert_eq!(
        idx.inode(idx.lookup_path("etc/hosts").unwrap())
            .unwrap()
            .kind(),
        kind::REG
    );
    // Opaque marker hidden, directory flagged.
    assert_eq!(names(&idx, "opaque"), ["kept"]);
    let opaque = idx.inode(idx.lookup_path("opaque").unwrap()).unwrap();
    assert_eq!(opaque.xattr(OPAQUE_XATTR.as_bytes()), Some(&b"y"[..]));
    assert!(
        idx.inode(idx.lookup_path("etc").unwrap())
            .unwrap()
            .xattr(OPAQUE_XATTR.as_bytes())
            .is_none()
    );
}

#[test]
fn attributes_links_and_devices() {
    let idx = open(&sample_toc());
    let get = |p: &str| idx.inode(idx.lookup_path(p).unwrap()).unwrap();
    let big = get("usr/bin/big");
    assert_eq!(
        big.ino(),
        get("/usr/bin/big-link").ino(),
        "hardlinks share an inode"
    );
    assert_eq!(big.nlink(), 2);
    assert_eq!(big.size(), 10_000);
    assert_eq!(big.blocks(), 24);
    assert_eq!(big.st_mode(), 0o100644);
    assert_eq!(big.digest(), Some(Digest::of(b"usr/bin/big")));
    let sh = get("usr/bin/sh");
    assert_eq!(sh.symlink(), Some(&b"big"[..]));
    assert_eq!(sh.size(), 3);
    assert_eq!(sh.st_mode() & 0o170000, 0o120000);
    let su = get("usr/bin/su");
    assert_eq!(su.perm(), 0o4755);
    assert_eq!(su.gid(), 42);
    assert_eq!(get("dev/null").rdev(), (1, 3));
    assert_eq!(get("dev/sda").st_mode() & 0o170000, 0o060000);
    assert_eq!(get("run/fifo").st_mode() & 0o170000, 0o010000);
    assert_eq!(get("etc/xattr").xattr(b"user.bin"), Some(&b"\xff\xfe"[..]));
    assert_eq!(get("etc/xattr").xattrs().count(), 1);
    // Directory link counts: 2 + visible subdirectories.
    assert_eq!(get("usr").nlink(), 3);
    assert_eq!(get("usr/bin").nlink(), 2);
    assert_eq!(idx.root().nlink(), 2 + 5); // dev etc opaque run usr
    assert_eq!(get("usr/bin").parent(), get("usr").ino());
    assert!(idx.lookup_path("usr/bin/nope").is_none());
    assert_eq!(idx.path_of(get("usr/bin/sh").ino()), "/usr/bin/sh");
    assert_eq!(idx.path_of(1), "/");
    assert!(idx.lookup_path("usr/bin/big/x").is_none());
    assert!(idx.inode(0).is_none());
    assert!(idx.inode(idx.inode_count() + 1).is_none());
}

#[test]
fn chunks_by_offset() {
    let idx = open(&sample_toc());
    let big = idx.inode(idx.lookup_path("usr/bin/big").unwrap()).unwrap();
    assert_eq!(big.chunk_count(), 3);
    let c: Vec<_> = big.chunks().collect();
    assert_eq!(
        c.iter()
            .map(|c| (c.file_offset, c.size))
            .collect::<Vec<_>>(),
        [(0, 4096), (4096, 4096), (8192, 1808)]
    );
    assert_eq!(c[0].compressed_end, 3000);
    // Global positions are consecutive and inside the layer's chunk table.
    assert_eq!(c[1].global, c[0].global + 1);
    assert!(c[2].global < idx.chunk_count());
    for (off, want) in [
        (0, 0),
        (4095, 0),
        (4096, 1),
        (8191, 1),
        (8192, 2),
        (9999, 2),
    ] {
        assert_eq!(big.chunk_at(off).unwrap().index, want, "offset {off}");
    }
    assert!(big.chunk_at(10_000).is_none());
    let dir = idx.root();
    assert_eq!(dir.chunk_count(), 0);
    assert!(dir.chunk_at(0).is_none());
    // The chunks a byte range covers.
    let idx_of = |o: u64, e: u64| big.chunks_in(o, e).map(|c| c.index).collect::<Vec<_>>();
    assert_eq!(idx_of(0, 1), [0]);
    assert_eq!(idx_of(4095, 4097), [0, 1]);
    assert_eq!(idx_of(4096, 10_000), [1, 2]);
    assert_eq!(idx_of(0, u64::MAX), [0, 1, 2]);
    assert!(idx_of(5000, 5000).is_empty());
    assert!(idx_of(10_000, 20_000).is_empty());
    assert!(dir.chunks_in(0, 10).next().is_none());
}

#[test]
fn readdir_resumes_at_an_offset() {
    let idx = open(&sample_toc());
    let all: Vec<_> = idx.readdir(1, 0).collect();
    for (i, d) in all.iter().enumerate() {
        assert_eq!(d.offset, i);
        let rest: Vec<_> = idx.readdir(1, i).collect();
        assert_eq!(rest, all[i..]);
    }
    assert_eq!(idx.readdir(1, 100).count(), 0);
    let big = idx.lookup_path("usr/bin/big").unwrap();
    assert_eq!(idx.readdir(big, 0).count(), 0, "a file has no entries");
}

#[test]
fn written_atomically_and_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("layers/sha256:abc/index");
    write_atomic(&path, &build(&sample_toc(), &meta()).unwrap()).unwrap();
    let idx = LayerIndex::open(&path).unwrap();
    assert_eq!(idx.path(), path);
    assert_eq!(names(&idx, "usr/bin"), ["big", "big-link", "sh", "su"]);
    // No temporary files left behind.
    assert_eq!(
        std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
        1
    );
}

#[test]
fn corrupt_indexes_are_errors_not_panics() {
    let bytes = build(&sample_toc(), &meta()).unwrap().to_vec();
    for cut in (0..bytes.len()).step_by(7) {
        let _ = LayerIndex::from_bytes(&bytes[..cut]).map(|i| {
            let _ = i.lookup_path("usr/bin/big");
        });
    }
    let mut flipped = 0;
    for at in (0..bytes.len()).step_by(3) {
        let mut b = bytes.clone();
        b[at] ^= 0xa5;
        if let Ok(idx) = LayerIndex::from_bytes(&b) {
            // Whatever validated must still answer without panicking.
            for p in ["usr/bin/big", "etc/xattr", "dev/null", "gone", "x"] {
                // A damaged dirent may name an inode that does not exist.
                if let Some(ino) = idx.lookup_path(p) {
                    if let Some(n) = idx.inode(ino) {
                        let _ = (n.symlink(), n.xattrs().count(), n.chunk_at(5), n.st_mode());
                    }
                    let _ = idx.readdir(ino, 0).count();
                }
            }
        } else {
            flipped += 1;
        }
    }
    assert!(flipped > 0);
    assert!(matches!(
        LayerIndex::from_bytes(b"not an index at all, not even close"),
        Err(IndexError::Corrupt { .. })
    ));
    let dir = tempfile::tempdir().unwrap();
    let err = LayerIndex::open(&dir.path().join("missing")).err().unwrap();
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn wrong_version_is_reported() {
    use stargaze_index::model::Index;
    let idx = Index {
        magic: stargaze_index::MAGIC,
        version: 999,
        ..Default::default()
    };
    let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&idx).unwrap();
    assert!(matches!(
        LayerIndex::from_bytes(&bytes),
        Err(IndexError::Version { found: 999, .. })
    ));
}

/// The mount shows the xattrs containerd's unpack sets, nothing more: no
/// `trusted.*` from the TOC (overlayfs would obey them in a lower layer),
/// no `user.*` where the kernel refuses it. The opaque marker made from
/// `.wh..wh..opq` stays.
#[test]
fn only_xattrs_containerd_unpacks_are_shown() {
    let b64 = |v: &[u8]| base64::engine::general_purpose::STANDARD.encode(v);
    let with = |mut entry: JsonEntry, attrs: &[(&str, &[u8])]| {
        for (k, v) in attrs {
            entry.xattrs.insert(k.to_string(), b64(v));
        }
        entry
    };
    let trusted: &[(&str, &[u8])] = &[
        ("trusted.overlay.redirect", b"/elsewhere"),
        ("trusted.overlay.opaque", b"y"),
        ("trusted.overlay.metacopy", b""),
        ("trusted.overlay.whiteout", b"y"),
        ("trusted.overlay.whiteouts", b"y"),
    ];
    // In name order, as the index keeps them.
    let kept: &[(&str, &[u8])] = &[
        ("security.capability", b"\x01\x00\x00\x02\x00\x20\x00\x00"),
        ("user.x", b"\xff\x00u"),
    ];
    let all = [trusted, kept].concat();
    let mut link = e("link", "symlink");
    link.link_name = "file".into();
    let entries = vec![
        with(e("dir/", "dir"), &all),
        with(reg("dir/file", 1, 100), &all),
        with(reg("dir/metacopy", 1, 200), &all),
        with(link, &all),
        with(e("fifo", "fifo"), &all),
        // Opaque in the tar's own way, and claiming another value as xattr.
        with(e("opq/", "dir"), &[("trusted.overlay.opaque", b"x")]),
        reg("opq/.wh..wh..opq", 0, 0),
        with(
            reg("odd", 1, 300),
            &[("foo", b"bar"), ("system.nfs4_acl", b"x")],
        ),
    ];
    let toc = Toc::build(
        &JsonToc {
            version: 1,
            entries,
            ..Default::default()
        },
        LayerFormat::Estargz,
        1000,
    )
    .unwrap();
    let idx = open(&toc);
    let attrs = |p: &str| -> Vec<(String, Vec<u8>)> {
        idx.inode(idx.lookup_path(p).unwrap())
            .unwrap()
            .xattrs()
            .map(|x| {
                (
                    String::from_utf8(x.name.to_vec()).unwrap(),
                    x.value.to_vec(),
                )
            })
            .collect()
    };
    let owned = |list: &[(&str, &[u8])]| -> Vec<(String, Vec<u8>)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect()
    };
    for p in ["dir", "dir/file", "dir/metacopy"] {
        assert_eq!(attrs(p), owned(kept), "{p}");
    }
    // `user.*` exists on regular files and directories only.
    for p in ["link", "fifo"] {
        assert_eq!(attrs(p), owned(&kept[..1]), "{p}");
    }
    assert_eq!(attrs("opq"), owned(&[(OPAQUE_XATTR, b"y")]));
    assert_eq!(attrs("odd"), owned(&[]));
    // The same TOC would have shown them all before: nothing else hides them.
    assert_eq!(toc.nodes.iter().map(|n| n.xattrs.len()).max(), Some(7));
}

/// containerd's unpack sets a time before 1970 or after 2262 to the epoch;
/// the index shows what it sets.
#[test]
fn mtimes_containerd_cannot_set_are_the_epoch() {
    let at = |name: &str, modtime: &str| JsonEntry {
        modtime: modtime.into(),
        ..reg(name, 0, 0)
    };
    let toc = Toc::build(
        &JsonToc {
            version: 1,
            entries: vec![
                at("before-1970", "1969-12-31T00:00:00Z"),
                at("y2100", "2100-01-01T00:00:00Z"),
                at("y2262", "2262-04-11T23:47:16Z"),
                at("y2263", "2263-01-01T00:00:00Z"),
                at("y5138", "5138-11-16T09:46:39Z"),
                JsonEntry {
                    modtime: "1900-01-01T00:00:00Z".into(),
                    ..e("old-dir/", "dir")
                },
            ],
            ..Default::default()
        },
        LayerFormat::Estargz,
        1000,
    )
    .unwrap();
    let idx = open(&toc);
    let mtime = |p: &str| idx.inode(idx.lookup_path(p).unwrap()).unwrap().mtime();
    assert_eq!(mtime("before-1970"), 0);
    assert_eq!(mtime("y2100"), 4_102_444_800);
    assert_eq!(mtime("y2262"), 9_223_372_036);
    assert_eq!(mtime("y2263"), 0);
    assert_eq!(mtime("y5138"), 0);
    assert_eq!(mtime("old-dir"), 0);
}

/// Nanoseconds of an mtime are kept, as containerd's unpack keeps them.
#[test]
fn mtimes_keep_their_nanoseconds() {
    let toc = Toc::build(
        &JsonToc {
            version: 1,
            entries: vec![JsonEntry {
                modtime: "2022-04-15T05:20:00.123456789Z".into(),
                ..reg("f", 0, 0)
            }],
            ..Default::default()
        },
        LayerFormat::ZstdChunked,
        1000,
    )
    .unwrap();
    let idx = open(&toc);
    let f = idx.inode(idx.lookup_path("f").unwrap()).unwrap();
    assert_eq!((f.mtime(), f.mtime_nsec()), (1_650_000_000, 123_456_789));
}
