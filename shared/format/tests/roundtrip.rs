//! Round trip: tar → eStargz / zstd:chunked → reader gives the same tree,
//! metadata and bytes, and the blob stays an ordinary tar.gz / tar.zst.
//!
//! The input covers every entry type and the header dialects converters meet
//! in real layers (ustar, GNU long names, PAX records, base-256 numbers).

use std::collections::BTreeMap;
use std::io::Read;
use std::process::{Command, Stdio};

use stargaze_format::convert::{ConvertOptions, TargetFormat};
use stargaze_format::tar::TarReader;
use stargaze_format::{Digest, LayerFormat, NodeKind, OpenOptions, Prefetch, open_blob, read_file};

#[derive(Clone, Debug)]
enum Kind {
    Dir,
    File(Vec<u8>),
    Symlink(&'static str),
    HardLink(&'static str),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

#[derive(Clone, Debug)]
struct Spec {
    name: String,
    kind: Kind,
    mode: u32,
    uid: u64,
    gid: u64,
    user: &'static str,
    mtime: u64,
    xattrs: Vec<(&'static str, &'static [u8])>,
    gnu: bool,
}

fn spec(name: impl Into<String>, kind: Kind) -> Spec {
    Spec {
        name: name.into(),
        mode: match kind {
            Kind::Dir => 0o755,
            _ => 0o644,
        },
        kind,
        uid: 0,
        gid: 0,
        user: "",
        mtime: 1_600_000_000,
        xattrs: vec![],
        gnu: false,
    }
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|i| {
            // Half compressible text, half noise, like real binaries.
            if (i / 4096) % 2 == 0 {
                b"the quick brown fox jumps over the lazy dog "[i % 44]
            } else {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            }
        })
        .collect()
}

const CHUNK: u64 = 64 * 1024;

fn specs() -> Vec<Spec> {
    let long_dir = "very-long-directory-name-".repeat(5);
    let mut v = vec![
        spec("./", Kind::Dir),
        spec("./etc/", Kind::Dir),
        Spec {
            mode: 0o2755,
            ..spec("./etc/setgid-dir/", Kind::Dir)
        },
        Spec {
            mode: 0o1777,
            ..spec("./tmp/", Kind::Dir)
        },
        spec("./etc/empty", Kind::File(vec![])),
        Spec {
            uid: 1000,
            gid: 1000,
            user: "builder",
            ..spec("./etc/hosts", Kind::File(b"127.0.0.1 localhost\n".to_vec()))
        },
        Spec {
            uid: 1000,
            gid: 1000,
            user: "builder",
            ..spec(
                "./etc/second-owned",
                Kind::File(b"same user again".to_vec()),
            )
        },
        spec(
            "./big.bin",
            Kind::File(pattern(3 * CHUNK as usize + 12345, 7)),
        ),
        spec("./exact.bin", Kind::File(pattern(CHUNK as usize, 9))),
        Spec {
            mode: 0o4755,
            ..spec(
                "./usr/bin/setuid-tool",
                Kind::File(b"#!/bin/sh\necho hi\n".to_vec()),
            )
        },
        spec("./usr/bin/link-to-hosts", Kind::Symlink("../../etc/hosts")),
        spec("./usr/bin/hard-to-big", Kind::HardLink("./big.bin")),
        spec("./dev/null", Kind::Char(1, 3)),
        spec("./dev/sda", Kind::Block(8, 0)),
        spec("./run/fifo", Kind::Fifo),
        Spec {
            xattrs: vec![
                ("user.bin", b"\xff\xfe\xfd"),
                ("security.capability", b"\x01\x00\x00\x02\x00\x20"),
            ],
            ..spec("./usr/bin/with-xattrs", Kind::File(b"caps".to_vec()))
        },
        spec(
            "./usr/share/ünïcödé-文件.txt",
            Kind::File("ünïcödé content".as_bytes().to_vec()),
        ),
        Spec {
            gnu: true,
            ..spec(
                format!("./usr/share/{long_dir}/{long_dir}/gnu-long-name.txt"),
                Kind::File(b"gnu long".to_vec()),
            )
        },
        spec(
            format!(
                "./usr/share/{long_dir}/pax-long-name-{}.txt",
                "x".repeat(120)
            ),
            Kind::File(b"pax long".to_vec()),
        ),
        Spec {
            gnu: true,
            ..spec(
                "./usr/share/long-link",
                Kind::Symlink(
                    "../../a/very/long/link/target/that/is/longer/than/one/hundred/bytes/so/it/needs/an/extension/header/target",
                ),
            )
        },
        spec("./.wh.removed", Kind::File(vec![])),
        spec("./etc/.wh..wh..opq", Kind::File(vec![])),
        Spec {
            mtime: 10_000_000_000, // year 2286: needs base-256 in a GNU header
            gnu: true,
            ..spec("./future", Kind::File(b"from the future".to_vec()))
        },
    ];
    // Many small files, as in a real /usr.
    for i in 0..40 {
        v.push(spec(
            format!("./usr/lib/python/mod{i}.py"),
            Kind::File(pattern(100 + i * 37, i as u32)),
        ));
    }
    v
}

fn build_tar(specs: &[Spec]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for s in specs {
        if !s.xattrs.is_empty() {
            let recs: Vec<(String, &[u8])> = s
                .xattrs
                .iter()
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
                .collect();
            b.append_pax_extensions(recs.iter().map(|(k, v)| (k.as_str(), *v)))
                .unwrap();
        }
        let mut h = if s.gnu {
            tar::Header::new_gnu()
        } else {
            tar::Header::new_ustar()
        };
        h.set_mode(s.mode);
        h.set_uid(s.uid);
        h.set_gid(s.gid);
        h.set_mtime(s.mtime);
        if !s.user.is_empty() {
            h.set_username(s.user).unwrap();
            h.set_groupname(s.user).unwrap();
        }
        let name_fits = s.name.len() < 100;
        let pax_path = |b: &mut tar::Builder<Vec<u8>>| {
            if !s.gnu && !name_fits {
                b.append_pax_extensions([("path", s.name.as_bytes())])
                    .unwrap();
            }
        };
        let short = if !s.gnu && !name_fits {
            "placeholder".to_string()
        } else {
            s.name.clone()
        };
        match &s.kind {
            Kind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                pax_path(&mut b);
                b.append_data(&mut h, &short, &[][..]).unwrap();
            }
            Kind::File(data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                pax_path(&mut b);
                b.append_data(&mut h, &short, &data[..]).unwrap();
            }
            Kind::Symlink(t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, &s.name, t).unwrap();
            }
            Kind::HardLink(t) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_size(0);
                b.append_link(&mut h, &s.name, t).unwrap();
            }
            Kind::Char(ma, mi) | Kind::Block(ma, mi) => {
                h.set_entry_type(if matches!(s.kind, Kind::Char(..)) {
                    tar::EntryType::Char
                } else {
                    tar::EntryType::Block
                });
                h.set_device_major(*ma).unwrap();
                h.set_device_minor(*mi).unwrap();
                h.set_size(0);
                b.append_data(&mut h, &short, &[][..]).unwrap();
            }
            Kind::Fifo => {
                h.set_entry_type(tar::EntryType::Fifo);
                h.set_size(0);
                b.append_data(&mut h, &short, &[][..]).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

fn clean(name: &str) -> String {
    stargaze_format::tree::normalize_path(name).unwrap()
}

fn convert(tar: &[u8], opts: &ConvertOptions) -> (Vec<u8>, stargaze_format::ConvertedLayer) {
    let mut out = Vec::new();
    let res = stargaze_format::convert("test-layer", tar, &mut out, opts, None).unwrap();
    (out, res)
}

/// The reader sees exactly the tree the specs describe.
fn check_tree(
    specs: &[Spec],
    blob: &[u8],
    res: &stargaze_format::ConvertedLayer,
    opts: &OpenOptions,
) {
    let layer = open_blob("test-layer", blob, opts).unwrap();
    assert_eq!(layer.toc_digest, res.toc_digest);
    let toc = &layer.toc;
    for s in specs {
        let path = clean(&s.name);
        let id = toc
            .lookup(&path)
            .unwrap_or_else(|| panic!("{path} missing from the TOC"));
        let node = toc.node(id);
        let (kind, nlink_min) = match &s.kind {
            Kind::Dir => (NodeKind::Dir, 2),
            Kind::File(_) | Kind::HardLink(_) => (NodeKind::Reg, 1),
            Kind::Symlink(_) => (NodeKind::Symlink, 1),
            Kind::Char(..) => (NodeKind::Char, 1),
            Kind::Block(..) => (NodeKind::Block, 1),
            Kind::Fifo => (NodeKind::Fifo, 1),
        };
        assert_eq!(node.kind, kind, "{path}");
        assert!(node.nlink >= nlink_min, "{path}");
        if matches!(s.kind, Kind::HardLink(_)) {
            assert_eq!(node.nlink, 2, "{path}: hardlinked file has two names");
            continue; // attributes are the target's
        }
        assert_eq!(node.mode, s.mode & 0o7777, "{path}: mode");
        assert_eq!(node.uid as u64, s.uid, "{path}: uid");
        assert_eq!(node.gid as u64, s.gid, "{path}: gid");
        assert_eq!(node.user_name, s.user, "{path}: user name");
        assert_eq!(node.mtime as u64, s.mtime, "{path}: mtime");
        let xattrs: BTreeMap<String, Vec<u8>> = s
            .xattrs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect();
        assert_eq!(node.xattrs, xattrs, "{path}: xattrs");
        match &s.kind {
            Kind::File(data) => {
                assert_eq!(node.size, data.len() as u64);
                assert_eq!(node.digest, Some(Digest::of(data)));
                let got = read_file("test-layer", blob, &layer, node).unwrap();
                assert!(got == *data, "{path}: content differs");
            }
            Kind::Symlink(t) => assert_eq!(node.link_target, *t),
            Kind::Char(ma, mi) | Kind::Block(ma, mi) => {
                assert_eq!((node.dev_major, node.dev_minor), (*ma, *mi))
            }
            _ => {}
        }
    }
}

/// Decompress the whole blob with an ordinary multi-member decoder.
fn decompress_all(format: TargetFormat, blob: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match format {
        TargetFormat::Estargz => {
            flate2::read::MultiGzDecoder::new(blob)
                .read_to_end(&mut out)
                .unwrap();
        }
        TargetFormat::ZstdChunked => {
            zstd::stream::read::Decoder::new(blob)
                .unwrap()
                .read_to_end(&mut out)
                .unwrap();
        }
    }
    out
}

/// `gzip -dc` / `zstd -dc` of the blob is a tar that GNU tar lists.
fn system_tools_accept(format: TargetFormat, blob: &[u8]) -> Option<Vec<String>> {
    let tool = match format {
        TargetFormat::Estargz => "gzip",
        TargetFormat::ZstdChunked => "zstd",
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blob");
    std::fs::write(&path, blob).ok()?;
    let dec = Command::new(tool).arg("-dc").arg(&path).output().ok()?;
    assert!(
        dec.status.success(),
        "{tool} -dc failed: {}",
        String::from_utf8_lossy(&dec.stderr)
    );
    let mut child = Command::new("tar")
        .args(["-tf", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&dec.stdout).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "tar -t failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.to_string())
            .collect(),
    )
}

fn opts(format: TargetFormat) -> ConvertOptions {
    ConvertOptions {
        format,
        chunk_size: CHUNK,
        threads: 2,
        ..Default::default()
    }
}

#[test]
fn estargz_round_trip_every_entry_type() {
    let specs = specs();
    let tar = build_tar(&specs);
    let (blob, res) = convert(&tar, &opts(TargetFormat::Estargz));
    check_tree(&specs, &blob, &res, &OpenOptions::default());

    let layer = open_blob("l", &blob[..], &OpenOptions::default()).unwrap();
    assert_eq!(layer.format(), LayerFormat::Estargz);
    assert_eq!(layer.toc.prefetch, Prefetch::Disabled);
    assert_eq!(res.digest, Digest::of(&blob));
    assert_eq!(res.size, blob.len() as u64);

    // An ordinary gzip reader sees one tar with the same entries, the
    // landmark first and the TOC last.
    let raw = decompress_all(TargetFormat::Estargz, &blob);
    assert_eq!(res.diff_id, Digest::of(&raw));
    assert_eq!(res.uncompressed_size, raw.len() as u64);
    let names: Vec<String> = TarReader::new(&raw)
        .map(|e| clean(&e.unwrap().name))
        .collect();
    assert_eq!(
        names.first().map(String::as_str),
        Some(".no.prefetch.landmark")
    );
    assert_eq!(names.last().map(String::as_str), Some("stargz.index.json"));
    let expected: Vec<String> = specs.iter().map(|s| clean(&s.name)).collect();
    assert_eq!(&names[1..names.len() - 1], &expected[..]);
    // Every file's bytes are identical in the plain tar view.
    for e in TarReader::new(&raw) {
        let e = e.unwrap();
        if let Some(Kind::File(data)) = specs
            .iter()
            .find(|s| clean(&s.name) == clean(&e.name))
            .map(|s| &s.kind)
        {
            assert_eq!(&raw[e.data_offset as usize..][..data.len()], &data[..]);
        }
    }
    if let Some(listed) = system_tools_accept(TargetFormat::Estargz, &blob) {
        assert_eq!(listed.len(), names.len());
    }
}

#[test]
fn zstd_chunked_round_trip_every_entry_type() {
    let specs = specs();
    let tar = build_tar(&specs);
    let (blob, res) = convert(&tar, &opts(TargetFormat::ZstdChunked));
    check_tree(&specs, &blob, &res, &OpenOptions::default());
    let layer = open_blob("l", &blob[..], &OpenOptions::default()).unwrap();
    assert_eq!(layer.format(), LayerFormat::ZstdChunked);
    let (checksum, position) = res.zstd_manifest.clone().unwrap();
    let fields: Vec<u64> = position.split(':').map(|f| f.parse().unwrap()).collect();
    let toc_bytes = &blob[fields[0] as usize..(fields[0] + fields[1]) as usize];
    assert_eq!(Digest::of(toc_bytes), checksum);
    assert_eq!(fields[2], layer.toc_json.len() as u64);
    assert_eq!(fields[3], 1);

    let raw = decompress_all(TargetFormat::ZstdChunked, &blob);
    assert_eq!(res.diff_id, Digest::of(&raw));
    let n = TarReader::new(&raw).count();
    assert_eq!(n, specs.len() + 1); // + landmark; the TOC is not in the tar
    if let Some(listed) = system_tools_accept(TargetFormat::ZstdChunked, &blob) {
        assert_eq!(listed.len(), n);
    }
}

#[test]
fn min_chunk_size_shares_members_with_inner_offsets() {
    let specs = specs();
    let tar = build_tar(&specs);
    for format in [TargetFormat::Estargz, TargetFormat::ZstdChunked] {
        let o = ConvertOptions {
            min_chunk_size: 16 * 1024,
            ..opts(format)
        };
        let (blob, res) = convert(&tar, &o);
        check_tree(&specs, &blob, &res, &OpenOptions::default());
        let layer = open_blob("l", &blob[..], &OpenOptions::default()).unwrap();
        let shared = layer
            .toc
            .nodes
            .iter()
            .flat_map(|n| n.chunks.iter())
            .filter(|c| c.inner_offset > 0)
            .count();
        assert!(shared > 10, "{format:?}: small files should share members");
        let plain = convert(&tar, &opts(format)).0;
        assert!(
            blob.len() < plain.len(),
            "{format:?}: fewer members compress better"
        );
    }
}

#[test]
fn prioritized_files_come_first_with_parents_and_link_targets() {
    let specs = specs();
    let tar = build_tar(&specs);
    let o = ConvertOptions {
        prioritized_files: Some(vec![
            "/usr/bin/hard-to-big".into(),
            "etc/hosts".into(),
            "/does/not/exist".into(),
        ]),
        ..opts(TargetFormat::Estargz)
    };
    let (blob, res) = convert(&tar, &o);
    assert_eq!(res.missing_prioritized, vec!["/does/not/exist".to_string()]);
    check_tree(&specs, &blob, &res, &OpenOptions::default());
    let raw = decompress_all(TargetFormat::Estargz, &blob);
    let names: Vec<String> = TarReader::new(&raw)
        .map(|e| clean(&e.unwrap().name))
        .collect();
    let landmark = names
        .iter()
        .position(|n| n == ".prefetch.landmark")
        .unwrap();
    let before: Vec<&str> = names[..landmark].iter().map(String::as_str).collect();
    assert_eq!(
        before,
        ["", "big.bin", "usr/bin/hard-to-big", "etc", "etc/hosts"]
    );
    let layer = open_blob("l", &blob[..], &OpenOptions::default()).unwrap();
    let Prefetch::UpTo(end) = layer.toc.prefetch else {
        panic!("expected a prefetch landmark")
    };
    // Everything before the landmark lies inside the prefetch range.
    for p in ["big.bin", "etc/hosts"] {
        let n = layer.toc.node(layer.toc.lookup(p).unwrap());
        assert!(n.chunks.iter().all(|c| c.compressed_end <= end), "{p}");
    }
}

#[test]
fn external_toc_with_keep_diff_id_keeps_the_tar_bytes() {
    let specs = specs();
    let mut tar = build_tar(&specs);
    // Real layers often carry record padding after the end marker.
    tar.resize(tar.len() + 10 * 512, 0);
    let o = ConvertOptions {
        external_toc: true,
        keep_diff_id: true,
        ..opts(TargetFormat::Estargz)
    };
    let (blob, res) = convert(&tar, &o);
    let ext = res.external_toc.clone().unwrap();
    assert_eq!(res.diff_id, Digest::of(&tar), "diffID must not change");
    assert_eq!(decompress_all(TargetFormat::Estargz, &blob), tar);
    assert_eq!(ext.digest, Digest::of(&ext.bytes));

    // Without the TOC blob the reader says what it needs.
    let err = open_blob("l", &blob[..], &OpenOptions::default()).unwrap_err();
    assert!(err.to_string().contains("-esgztoc"), "{err}");
    let with_toc = OpenOptions {
        external_toc: Some(ext.bytes.clone()),
        expected_toc_digest: Some(res.toc_digest),
        ..Default::default()
    };
    check_tree(&specs, &blob, &res, &with_toc);

    // keep-diff-id alone is refused.
    let bad = ConvertOptions {
        keep_diff_id: true,
        ..opts(TargetFormat::Estargz)
    };
    assert!(stargaze_format::convert("l", &tar, Vec::new(), &bad, None).is_err());
}

#[test]
fn output_is_deterministic_across_thread_counts() {
    let tar = build_tar(&specs());
    for format in [TargetFormat::Estargz, TargetFormat::ZstdChunked] {
        let one = convert(
            &tar,
            &ConvertOptions {
                threads: 1,
                ..opts(format)
            },
        )
        .0;
        let four = convert(
            &tar,
            &ConvertOptions {
                threads: 4,
                ..opts(format)
            },
        )
        .0;
        assert!(one == four, "{format:?} output depends on the thread count");
    }
}

#[test]
fn converting_an_estargz_again_drops_the_old_toc_and_landmark() {
    let specs = specs();
    let tar = build_tar(&specs);
    let (blob, _) = convert(&tar, &opts(TargetFormat::Estargz));
    let raw = decompress_all(TargetFormat::Estargz, &blob);
    let (blob2, res2) = convert(&raw, &opts(TargetFormat::Estargz));
    check_tree(&specs, &blob2, &res2, &OpenOptions::default());
    let layer = open_blob("l", &blob2[..], &OpenOptions::default()).unwrap();
    let root = layer.toc.root();
    assert!(root.children.contains_key(".no.prefetch.landmark"));
    assert!(!root.children.contains_key("stargz.index.json"));
}

#[test]
fn toc_digest_mismatch_is_refused() {
    let tar = build_tar(&specs());
    let (blob, _) = convert(&tar, &opts(TargetFormat::Estargz));
    let err = open_blob(
        "sha256:abc",
        &blob[..],
        &OpenOptions {
            expected_toc_digest: Some(Digest::of(b"other")),
            ..Default::default()
        },
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("sha256:abc") && msg.contains("TOC digest mismatch"),
        "{msg}"
    );
}

#[test]
fn corrupted_chunk_bytes_are_detected() {
    let specs = specs();
    let tar = build_tar(&specs);
    let (mut blob, _) = convert(&tar, &opts(TargetFormat::Estargz));
    let layer = open_blob("l", &blob[..], &OpenOptions::default()).unwrap();
    let node = layer.toc.node(layer.toc.lookup("big.bin").unwrap()).clone();
    let c = node.chunks[1];
    // Flip a byte in the middle of the compressed member.
    let at = ((c.compressed_offset + c.compressed_end) / 2) as usize;
    blob[at] ^= 0x55;
    let err = read_file("l", &blob[..], &layer, &node).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("big.bin"), "{msg}");
}

#[test]
fn empty_layer_round_trips() {
    let tar = vec![0u8; 1024];
    for format in [TargetFormat::Estargz, TargetFormat::ZstdChunked] {
        let (blob, _) = convert(&tar, &opts(format));
        let layer = open_blob("l", &blob[..], &OpenOptions::default()).unwrap();
        assert_eq!(layer.toc.root().children.len(), 1); // just the landmark
    }
}

#[test]
fn input_no_reader_would_accept_is_refused_before_compressing() {
    // Found by the `convert` fuzz target: a hardlink to a missing file.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Link);
    h.set_size(0);
    b.append_link(&mut h, "d/hard", "d/missing").unwrap();
    let tar = b.into_inner().unwrap();
    let err = stargaze_format::convert(
        "sha256:feed",
        &tar,
        Vec::new(),
        &opts(TargetFormat::Estargz),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("sha256:feed")
            && err.contains("d/hard")
            && err.contains("cannot be converted"),
        "{err}"
    );

    // A path below a regular file.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(1);
    b.append_data(&mut h, "f", &b"x"[..]).unwrap();
    b.append_data(&mut h, "f/g", &b"y"[..]).unwrap();
    let tar = b.into_inner().unwrap();
    assert!(
        stargaze_format::convert(
            "l",
            &tar,
            Vec::new(),
            &opts(TargetFormat::ZstdChunked),
            None
        )
        .is_err()
    );
}

#[test]
fn zstd_chunked_with_the_64_byte_containers_storage_footer_reads() {
    // Current containers/storage appends a tar-split frame after the TOC
    // and a 64-byte footer (magic GNUlInUx). Rebuild one of our blobs in
    // that layout and read it.
    use stargaze_format::footer::{Footer, skippable_header};
    let specs = specs();
    let tar = build_tar(&specs);
    let (blob, res) = convert(&tar, &opts(TargetFormat::ZstdChunked));
    let Footer::ZstdChunked {
        toc_offset,
        toc_compressed_len,
        toc_uncompressed_len,
    } = open_blob("l", &blob[..], &OpenOptions::default())
        .unwrap()
        .footer
    else {
        panic!("expected the 40-byte dialect")
    };
    let mut v2 = blob[..(toc_offset + toc_compressed_len) as usize].to_vec();
    let tar_split = zstd::bulk::compress(br#"{"type":1,"payload":"x"}"#, 3).unwrap();
    let tar_split_offset = v2.len() as u64 + 8;
    v2.extend(skippable_header(tar_split.len()));
    v2.extend(&tar_split);
    v2.extend(
        Footer::ZstdChunkedV2 {
            toc_offset,
            toc_compressed_len,
            toc_uncompressed_len,
            tar_split_offset,
            tar_split_compressed_len: tar_split.len() as u64,
            tar_split_uncompressed_len: 24,
        }
        .encode(),
    );
    let layer = open_blob("l", &v2[..], &OpenOptions::default()).unwrap();
    assert!(matches!(layer.footer, Footer::ZstdChunkedV2 { .. }));
    check_tree(&specs, &v2, &res, &OpenOptions::default());
    // Still a plain zstd stream for ordinary readers.
    assert_eq!(
        decompress_all(TargetFormat::ZstdChunked, &v2),
        decompress_all(TargetFormat::ZstdChunked, &blob)
    );
}

/// A PAX mtime with a fraction of a second keeps its nanoseconds through
/// conversion, as containerd's unpack of the tar keeps them.
#[test]
fn sub_second_mtimes_keep_their_nanoseconds() {
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([("mtime", &b"1650000000.123456789"[..])])
        .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_size(1);
    b.append_data(&mut h, "f", &b"x"[..]).unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_size(1);
    h.set_mtime(1_600_000_000);
    b.append_data(&mut h, "g", &b"y"[..]).unwrap();
    let tar = b.into_inner().unwrap();
    for format in [TargetFormat::Estargz, TargetFormat::ZstdChunked] {
        let (blob, _) = convert(&tar, &opts(format));
        let layer = open_blob("l", &blob[..], &OpenOptions::default()).unwrap();
        let mtime = |p: &str| {
            let n = layer.toc.node(layer.toc.lookup(p).unwrap());
            (n.mtime, n.mtime_nsec)
        };
        assert_eq!(mtime("f"), (1_650_000_000, 123_456_789), "{format:?}");
        assert_eq!(mtime("g"), (1_600_000_000, 0), "{format:?}");
    }
}
