//! OCI image layouts built from in-memory tars, for tests.

use std::io::Write;
use std::path::Path;

use sha2::Digest as _;

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

fn put_blob(dir: &Path, bytes: &[u8]) -> String {
    let d = sha(bytes);
    let path = dir.join("blobs/sha256").join(&d[7..]);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("blobs dir");
    std::fs::write(path, bytes).expect("write blob");
    d
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    e.write_all(bytes).expect("gzip");
    e.finish().expect("gzip")
}

/// Write a single-platform OCI image layout at `dir` whose layers are the
/// given uncompressed tars (stored gzip-compressed, as `docker build` does).
/// The image is tagged `tag` (skopeo's `oci:DIR:TAG`) and named `name`
/// (containerd's `ctr image import`). Returns the manifest digest.
pub fn write_layout(dir: &Path, name: &str, tag: &str, layers: &[Vec<u8>]) -> String {
    write_layout_with_config(
        dir,
        name,
        tag,
        layers,
        serde_json::json!({
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
        }),
    )
}

/// [`write_layout`] with the image config's `config` object (Env, Cmd,
/// Entrypoint, WorkingDir) given.
pub fn write_layout_with_config(
    dir: &Path,
    name: &str,
    tag: &str,
    layers: &[Vec<u8>],
    run_config: serde_json::Value,
) -> String {
    std::fs::create_dir_all(dir.join("blobs/sha256")).expect("layout dir");
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
        .expect("oci-layout");
    let mut diff_ids = Vec::new();
    let mut descs = Vec::new();
    for tar in layers {
        diff_ids.push(sha(tar));
        let gz = gzip(tar);
        let d = put_blob(dir, &gz);
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": d,
            "size": gz.len(),
        }));
    }
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": run_config,
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    });
    let config_bytes = serde_json::to_vec(&config).expect("config json");
    let config_digest = put_blob(dir, &config_bytes);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_bytes.len(),
        },
        "layers": descs,
    });
    let manifest_bytes = serde_json::to_vec(&manifest).expect("manifest json");
    let manifest_digest = put_blob(dir, &manifest_bytes);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_bytes.len(),
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    });
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&index).expect("index json"),
    )
    .expect("index.json");
    manifest_digest
}

/// Pack a layout directory into a tar (what `ctr image import` reads).
pub fn layout_tar(dir: &Path, out: &Path) {
    let f = std::fs::File::create(out).expect("layout tar");
    let mut b = tar::Builder::new(f);
    b.append_dir_all(".", dir).expect("pack layout");
    b.finish().expect("pack layout");
}

/// A tar of real files from this machine (`paths` relative to `/`), kept in
/// the given order, without following symlinks: realistic layer content.
pub fn tar_of_host_paths(paths: &[&str]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    for p in paths {
        let src = Path::new("/").join(p);
        if src.is_dir() {
            b.append_dir_all(p, &src)
                .unwrap_or_else(|e| panic!("{}: {e}", src.display()));
        } else {
            b.append_path_with_name(&src, p)
                .unwrap_or_else(|e| panic!("{}: {e}", src.display()));
        }
    }
    b.into_inner().expect("tar")
}

/// mtime of the test images' entries (GNU tar does not restore an mtime of
/// 0 on directories, so real-looking times keep comparisons exact).
const MTIME: u64 = 1_600_000_000;

/// A runnable root filesystem layer: static busybox (Debian's
/// busybox-static) with a few applet links, `/etc/passwd` and empty mount
/// points. Needs `/bin/busybox`.
pub fn busybox_layer() -> Vec<u8> {
    let busybox = std::fs::read("/bin/busybox")
        .expect("/bin/busybox is missing: run `make deps` (package busybox-static)");
    let mut b = tar::Builder::new(Vec::new());
    let dir = |b: &mut tar::Builder<Vec<u8>>, name: &str| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(MTIME);
        b.append_data(&mut h, name, &[][..]).expect("tar");
    };
    for d in ["bin/", "etc/", "proc/", "sys/", "dev/", "tmp/", "data/"] {
        dir(&mut b, d);
    }
    let mut h = tar::Header::new_ustar();
    h.set_mode(0o755);
    h.set_size(busybox.len() as u64);
    h.set_mtime(MTIME);
    b.append_data(&mut h, "bin/busybox", &busybox[..])
        .expect("tar");
    for applet in ["sh", "cat", "ls", "echo", "sha256sum", "stat", "find", "wc"] {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        h.set_mtime(MTIME);
        b.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .expect("tar");
    }
    let passwd = b"root:x:0:0:root:/root:/bin/sh\n";
    let mut h = tar::Header::new_ustar();
    h.set_mode(0o644);
    h.set_size(passwd.len() as u64);
    h.set_mtime(MTIME);
    b.append_data(&mut h, "etc/passwd", &passwd[..])
        .expect("tar");
    b.into_inner().expect("tar")
}

/// `size` bytes of file content: every third byte pseudo-random (xorshift
/// state `x`, carried on between files), the rest text, so that gzip gets
/// it to about 40 % like binaries and libraries.
pub fn file_bytes(size: usize, x: &mut u32) -> Vec<u8> {
    (0..size)
        .map(|j| {
            if j % 3 == 0 {
                *x ^= *x << 13;
                *x ^= *x >> 17;
                *x ^= *x << 5;
                *x as u8
            } else {
                b'a' + (j % 26) as u8
            }
        })
        .collect()
}

/// A data layer: files of many sizes (several spanning chunks), a hardlink,
/// a symlink, and a file deleted from the layer below by a whiteout.
pub fn data_layer(seed: u32) -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    let mut files = Vec::new();
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    for (i, size) in [0usize, 1, 511, 512, 4096, 65_537, 300_000, 5_000_000]
        .iter()
        .enumerate()
    {
        files.push((format!("data/file{i}"), file_bytes(*size, &mut x)));
    }
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    b.append_data(&mut h, "data/", &[][..]).expect("tar");
    for (name, data) in &files {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, &data[..]).expect("tar");
    }
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Link);
    h.set_mode(0o644);
    h.set_size(0);
    b.append_link(&mut h, "data/hardlink", "data/file6")
        .expect("tar");
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_mode(0o777);
    h.set_size(0);
    b.append_link(&mut h, "data/symlink", "file5").expect("tar");
    // The whiteout's directory has its own entry, as image builders write it.
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    h.set_mtime(MTIME);
    b.append_data(&mut h, "bin/", &[][..]).expect("tar");
    let mut h = tar::Header::new_ustar();
    h.set_mode(0o644);
    h.set_size(0);
    b.append_data(&mut h, "bin/.wh.wc", &[][..]).expect("tar");
    (b.into_inner().expect("tar"), files)
}

/// The decompressed bytes of a gzip stream of one or more members (an
/// eStargz blob's diffID is the sha256 of these).
pub fn gunzip(gz: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(gz), &mut out)
        .expect("gunzip");
    out
}

/// A layer blob as it goes into a manifest: its bytes, media type, diffID
/// (`sha256:…` of the uncompressed tar) and annotations.
#[derive(Clone)]
pub struct LayerBlob {
    pub blob: Vec<u8>,
    pub media_type: String,
    pub diff_id: String,
    pub annotations: serde_json::Value,
}

/// A single-platform OCI image layout at `dir` (tag `tag`) of the given
/// layer blobs, which are stored as they are (already compressed or
/// converted). Returns the manifest digest.
pub fn write_layout_of_blobs(dir: &Path, tag: &str, layers: &[LayerBlob]) -> String {
    std::fs::create_dir_all(dir.join("blobs/sha256")).expect("layout dir");
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
        .expect("oci-layout");
    let descs: Vec<serde_json::Value> = layers
        .iter()
        .map(|l| {
            serde_json::json!({
                "mediaType": l.media_type,
                "digest": put_blob(dir, &l.blob),
                "size": l.blob.len(),
                "annotations": l.annotations,
            })
        })
        .collect();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Env": ["PATH=/bin"], "Cmd": ["/bin/sh"] },
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
        },
    }))
    .expect("config json");
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": put_blob(dir, &config),
            "size": config.len(),
        },
        "layers": descs,
    }))
    .expect("manifest json");
    let manifest_digest = put_blob(dir, &manifest);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": { "org.opencontainers.image.ref.name": tag },
        }],
    });
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&index).expect("index json"),
    )
    .expect("index.json");
    manifest_digest
}
