//! Compatibility with the Go implementation, both ways.
//!
//! * Layers we write are opened by the reference Go reader
//!   (`stargaze-snapshotter/estargz` 0.12 from Debian, driven by our
//!   `tests/go/esgz-verify`): TOC digest and every chunk digest verify, and
//!   the tree it sees (types, modes, owners, sizes, links, devices, xattrs,
//!   link counts, content hashes) is the tree our reader sees.
//! * Layers `ctr-remote image convert --estargz|--zstdchunked --oci`
//!   writes (through a private containerd) are opened and fully verified by
//!   our reader, and hold the same files as the source image.
//!
//! Needs the Debian packages `make deps` installs (containerd, ctr-remote,
//! golang and the stargz Go sources) and root, as CI runs.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::Command;

use stargaze_format::convert::{ConvertOptions, TargetFormat};
use stargaze_format::tar::{TarKind, TarReader};
use stargaze_format::{Digest, NodeKind, OpenOptions, open_blob, read_file};
use stargaze_testkit::{Containerd, go_build, image, require, run};

/// Realistic content (a static binary several chunks long, zoneinfo with
/// symlinks, Python sources) plus the special entries real layers carry.
fn sample_layer() -> Vec<u8> {
    let mut host = vec!["usr/share/zoneinfo/Europe", "usr/lib/python3.11/json"];
    if Path::new("/bin/busybox").exists() {
        host.push("bin/busybox");
    }
    let host_tar = image::tar_of_host_paths(&host);
    // Drop the end-of-archive marker and append special entries.
    let end = TarReader::new(&host_tar)
        .last()
        .map(|e| e.unwrap().end_offset)
        .unwrap_or(0);
    let mut b = tar::Builder::new(host_tar[..end as usize].to_vec());
    let add = |b: &mut tar::Builder<Vec<u8>>,
               kind: tar::EntryType,
               name: &str,
               mode: u32,
               data: &[u8],
               f: &dyn Fn(&mut tar::Header)| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        h.set_uid(1000);
        h.set_gid(1000);
        f(&mut h);
        b.append_data(&mut h, name, data).unwrap();
    };
    let none = |_: &mut tar::Header| {};
    add(
        &mut b,
        tar::EntryType::Directory,
        "data/",
        0o2775,
        b"",
        &none,
    );
    add(
        &mut b,
        tar::EntryType::Regular,
        "data/empty",
        0o600,
        b"",
        &none,
    );
    add(
        &mut b,
        tar::EntryType::Regular,
        "data/tool",
        0o4755,
        b"#!/bin/sh\n",
        &none,
    );
    add(
        &mut b,
        tar::EntryType::Directory,
        "data/sticky/",
        0o1777,
        b"",
        &none,
    );
    add(&mut b, tar::EntryType::Fifo, "data/fifo", 0o644, b"", &none);
    add(
        &mut b,
        tar::EntryType::Char,
        "data/null",
        0o666,
        b"",
        &|h| {
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
        },
    );
    add(
        &mut b,
        tar::EntryType::Block,
        "data/disk",
        0o660,
        b"",
        &|h| {
            h.set_device_major(8).unwrap();
            h.set_device_minor(16).unwrap();
        },
    );
    add(
        &mut b,
        tar::EntryType::Regular,
        "data/.wh.deleted",
        0o644,
        b"",
        &none,
    );
    add(
        &mut b,
        tar::EntryType::Regular,
        "data/sticky/.wh..wh..opq",
        0o644,
        b"",
        &none,
    );
    b.append_pax_extensions([("SCHILY.xattr.user.bin", &b"\xff\xfe\xfd"[..])])
        .unwrap();
    add(
        &mut b,
        tar::EntryType::Regular,
        "data/xattr-file",
        0o644,
        b"x",
        &none,
    );
    // The link's header says what its target's says, as builders write it:
    // where they differ, the Go reader keeps the target's attributes while
    // containerd's unpack (and our tree) takes the link's.
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Link);
    h.set_mode(0o4755);
    h.set_mtime(1_700_000_000);
    h.set_uid(1000);
    h.set_gid(1000);
    h.set_size(0);
    b.append_link(&mut h, "data/tool-hardlink", "data/tool")
        .unwrap();
    b.into_inner().unwrap()
}

#[derive(Debug, serde::Deserialize)]
struct GoRecord {
    path: String,
    #[serde(rename = "type")]
    kind: String,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    #[serde(default)]
    link: String,
    #[serde(rename = "devMajor")]
    dev_major: u32,
    #[serde(rename = "devMinor")]
    dev_minor: u32,
    nlink: u32,
    #[serde(default)]
    xattrs: BTreeMap<String, String>,
    #[serde(default)]
    sha256: String,
}

fn go_view(tool: &Path, blob: &Path, toc_digest: &Digest) -> Vec<GoRecord> {
    let out = run(Command::new(tool).arg(blob).arg(toc_digest.to_string()));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr).trim());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

fn kind_name(k: NodeKind) -> &'static str {
    match k {
        NodeKind::Dir => "dir",
        NodeKind::Reg => "reg",
        NodeKind::Symlink => "symlink",
        NodeKind::Char => "char",
        NodeKind::Block => "block",
        NodeKind::Fifo => "fifo",
    }
}

#[test]
fn go_reader_accepts_what_we_write() {
    let tool = go_build("esgz-verify");
    let tar = sample_layer();
    let dir = tempfile::tempdir().unwrap();
    for (label, opts) in [
        ("estargz, 4 MiB chunks", ConvertOptions::default()),
        (
            "estargz, 64 KiB chunks, prioritized files",
            ConvertOptions {
                chunk_size: 64 << 10,
                prioritized_files: Some(vec![
                    "data/tool-hardlink".into(),
                    "usr/lib/python3.11/json/decoder.py".into(),
                ]),
                ..Default::default()
            },
        ),
        (
            "zstd:chunked, 64 KiB chunks",
            ConvertOptions {
                format: TargetFormat::ZstdChunked,
                chunk_size: 64 << 10,
                ..Default::default()
            },
        ),
    ] {
        let path = dir.path().join("blob");
        let mut out = std::fs::File::create(&path).unwrap();
        let res = stargaze_format::convert("sample", &tar, &mut out, &opts, None).unwrap();
        drop(out);
        let blob = std::fs::read(&path).unwrap();
        let ours = open_blob("sample", &blob[..], &OpenOptions::default()).unwrap();
        let go = go_view(&tool, &path, &res.toc_digest);
        assert_eq!(go.len(), ours.toc.walk().len(), "{label}: number of names");
        for rec in &go {
            let id = ours
                .toc
                .lookup(&rec.path)
                .unwrap_or_else(|| panic!("{label}: {} missing in our view", rec.path));
            let n = ours.toc.node(id);
            let ctx = format!("{label}: {}", rec.path);
            assert_eq!(rec.kind, kind_name(n.kind), "{ctx}: type");
            assert_eq!(rec.mode, n.mode, "{ctx}: mode");
            assert_eq!((rec.uid, rec.gid), (n.uid, n.gid), "{ctx}: owner");
            assert_eq!(rec.size, n.size, "{ctx}: size");
            assert_eq!(rec.link, n.link_target, "{ctx}: link");
            assert_eq!(
                (rec.dev_major, rec.dev_minor),
                (n.dev_major, n.dev_minor),
                "{ctx}: dev"
            );
            if !rec.path.is_empty() && n.kind != NodeKind::Dir {
                assert_eq!(rec.nlink.max(1), n.nlink, "{ctx}: nlink");
            }
            let xattrs: BTreeMap<String, String> = n
                .xattrs
                .iter()
                .map(|(k, v)| {
                    use base64::Engine as _;
                    (
                        k.clone(),
                        base64::engine::general_purpose::STANDARD.encode(v),
                    )
                })
                .collect();
            assert_eq!(rec.xattrs, xattrs, "{ctx}: xattrs");
            if n.kind == NodeKind::Reg {
                assert_eq!(rec.sha256, n.digest.unwrap().to_string(), "{ctx}: content");
            }
        }
    }
}

/// Files of a tar by normalised path: (kind, size, sha256 of content).
fn tar_files(tar: &[u8]) -> BTreeMap<String, (TarKind, u64, Option<Digest>)> {
    TarReader::new(tar)
        .map(|e| e.unwrap())
        .map(|e| {
            let data = (e.kind == TarKind::Regular).then(|| {
                Digest::of(&tar[e.data_offset as usize..(e.data_offset + e.size) as usize])
            });
            (
                stargaze_format::tree::normalize_path(&e.name).unwrap(),
                (e.kind, e.size, data),
            )
        })
        .collect()
}

fn gunzip(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(b)
        .read_to_end(&mut out)
        .unwrap();
    out
}

#[test]
fn we_read_what_ctr_remote_writes() {
    require("ctr-remote");
    let ctd = Containerd::start("");
    let work = tempfile::tempdir().unwrap();
    let layers = vec![
        image::tar_of_host_paths(&["usr/share/zoneinfo/America"]),
        sample_layer(),
    ];
    let layout = work.path().join("src");
    image::write_layout(&layout, "stargaze.test/interop:src", "src", &layers);
    let archive = work.path().join("src.tar");
    image::layout_tar(&layout, &archive);
    ctd.ctr(&["image", "import", "--no-unpack", archive.to_str().unwrap()]);

    let variants: &[(&str, &[&str])] = &[
        ("esgz", &["--estargz", "--oci"]),
        (
            "esgz-64k",
            &["--estargz", "--oci", "--estargz-chunk-size", "65536"],
        ),
        ("zstdchunked", &["--zstdchunked", "--oci"]),
    ];
    for (tag, flags) in variants {
        let dst = format!("stargaze.test/interop:{tag}");
        run(ctd
            .cmd("ctr-remote")
            .args(["image", "convert"])
            .args(*flags)
            .args(["stargaze.test/interop:src", &dst]));
        let exported = work.path().join(format!("{tag}.tar"));
        ctd.ctr(&["image", "export", exported.to_str().unwrap(), &dst]);
        let out_dir = work.path().join(tag);
        tar::Archive::new(std::fs::File::open(&exported).unwrap())
            .unpack(&out_dir)
            .unwrap();
        let blob_path = |d: &str| out_dir.join("blobs/sha256").join(&d[7..]);
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out_dir.join("index.json")).unwrap()).unwrap();
        let mdigest = index["manifests"][0]["digest"].as_str().unwrap();
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(blob_path(mdigest)).unwrap()).unwrap();
        let descs = manifest["layers"].as_array().unwrap();
        assert_eq!(descs.len(), layers.len(), "{tag}");
        for (desc, src_tar) in descs.iter().zip(&layers) {
            let digest = desc["digest"].as_str().unwrap();
            let toc_digest: Digest = desc["annotations"][stargaze_format::TOC_DIGEST_ANNOTATION]
                .as_str()
                .unwrap_or_else(|| panic!("{tag}: layer {digest} has no toc.digest annotation"))
                .parse()
                .unwrap();
            let blob = std::fs::read(blob_path(digest)).unwrap();
            let layer = open_blob(
                digest,
                &blob[..],
                &OpenOptions {
                    expected_toc_digest: Some(toc_digest),
                    ..Default::default()
                },
            )
            .unwrap_or_else(|e| panic!("{tag}: {e}"));
            // Every file of the source is there with the same bytes, each
            // chunk verified against its chunkDigest by read_file.
            let mut files = 0;
            for (path, (kind, size, content)) in tar_files(src_tar) {
                let id = layer
                    .toc
                    .lookup(&path)
                    .unwrap_or_else(|| panic!("{tag}: {path} missing"));
                let node = layer.toc.node(id);
                if kind == TarKind::Regular || kind == TarKind::HardLink {
                    assert_eq!(node.kind, NodeKind::Reg, "{tag}: {path}");
                }
                if let Some(content) = content {
                    assert_eq!(node.size, size, "{tag}: {path}");
                    let data = read_file(digest, &blob[..], &layer, node)
                        .unwrap_or_else(|e| panic!("{tag}: {e}"));
                    assert_eq!(Digest::of(&data), content, "{tag}: {path}");
                    files += 1;
                }
            }
            assert!(files > 10, "{tag}: only {files} files checked");
            if *tag != "zstdchunked" {
                // And the blob is still an ordinary tar.gz.
                assert!(TarReader::new(&gunzip(&blob)).all(|e| e.is_ok()));
            }
        }
    }
}
