//! One image can never change what another reads on the same node, end to
//! end with the real components (Debian's containerd 1.6 and runc,
//! docker-registry, our three services sharing one cache).
//!
//! Image A holds a 6-byte file and a file of four 64 KiB chunks. Image B's
//! TOCs give its own 6-byte and multi-chunk files A's file digests, while
//! every chunk digest is true to B's bytes and each `toc.digest` annotation
//! is the real TOC digest. B's multi-chunk file (its own layer) verifies and
//! is mounted lazily; it begins with A's first chunk, so a file made of A's
//! and B's chunks would pass either TOC's check of that chunk. B's 6-byte
//! file (another layer) has one chunk whose digest is not the file digest
//! its TOC claims: that layer is refused as self-contradicting and unpacked
//! by containerd. Whichever image is pulled and read first, containers of A
//! read A's bytes and containers of B read B's (or get EIO): never A's
//! silently, never a mix.
//!
//! Needs root, /dev/fuse and the Debian packages `make deps` installs.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use stargaze_format::toc::JsonToc;
use stargaze_format::{ConvertOptions, Digest, TOC_DIGEST_ANNOTATION};
use stargaze_testkit::Containerd;
use stargaze_testkit::image::{self, LayerBlob};
use stargaze_testkit::stack::{Service, Stack};

mod common;

use common::{Setup, content_blobs, ctr_remote_rpull, layer_digests, sh_in_container, skopeo_copy};

const SMALL: &str = "etc/small";
const LARGE: &str = "etc/large";

fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    h.set_mtime(1_700_000_000);
    b.append_data(&mut h, "etc/", &[][..]).unwrap();
    for (name, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// An eStargz layer of `tar` (64 KiB chunks) whose TOC `edit` rewrites: the
/// blob gets the edited TOC and a footer pointing at it, and the manifest
/// annotation the edited TOC's digest, so the layer verifies.
fn esgz(name: &str, tar: &[u8], edit: impl FnOnce(&mut JsonToc)) -> LayerBlob {
    let opts = ConvertOptions {
        chunk_size: 64 << 10,
        ..Default::default()
    };
    let mut blob = Vec::new();
    stargaze_format::convert(name, tar, &mut blob, &opts, None).unwrap();
    let (blob, toc) = stargaze_format::convert::with_edited_toc(&blob, edit).unwrap();
    LayerBlob {
        diff_id: Digest::of(&image::gunzip(&blob)).to_string(),
        blob,
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        annotations: serde_json::json!({ TOC_DIGEST_ANNOTATION: toc.to_string() }),
    }
}

/// Give `path` the file digest `digest` in the TOC (its chunk digests stay).
fn claim(toc: &mut JsonToc, path: &str, digest: &Digest) {
    let e = toc
        .entries
        .iter_mut()
        .find(|e| e.name == path && e.kind == "reg")
        .unwrap_or_else(|| panic!("{path} not in the TOC"));
    e.digest = digest.to_string();
}

fn patterned(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

/// What a container read of one file gave: the sha256 of its bytes, or the
/// error busybox printed.
#[derive(Debug, PartialEq)]
enum Read {
    Bytes(String),
    Failed(String),
}

/// The two images in a registry, the stack and containerd they run on
/// (dropped in this order: containers, services, registry and files).
struct Node {
    ctd: Containerd,
    stack: Stack,
    _setup: Setup,
    image_a: String,
    image_b: String,
    /// B's layer with the self-contradicting one-chunk claim: unpacked.
    refused: String,
    /// Per file: A's bytes, B's bytes.
    files: [(&'static str, Vec<u8>, Vec<u8>); 2],
    runs: std::cell::Cell<u32>,
}

impl Node {
    fn start(prefix: &str) -> Node {
        let setup = Setup::new(prefix, &["runc", "ctr-remote", "skopeo"]);
        let w = setup.dir();
        let repo = format!("{}/stargaze/trust", setup.registry.addr);
        let small = (b"AAAAAA".to_vec(), b"BBBBBB".to_vec());
        let large_a = patterned(1, 256 << 10);
        let mut large_b = large_a.clone();
        let tail = large_b.len() - (64 << 10);
        large_b[64 << 10..].copy_from_slice(&patterned(9, tail));
        let files = [(SMALL, small.0, small.1), (LARGE, large_a, large_b)];
        let base = esgz("base", &image::busybox_layer(), |_| {});
        let a_tar = tar_of(&[(SMALL, &files[0].1), (LARGE, &files[1].1)]);
        let data_a = esgz("a", &a_tar, |_| {});
        let claimed = |path: &str, a: &[u8], b: &[u8]| {
            esgz(path, &tar_of(&[(path, b)]), |toc| {
                claim(toc, path, &Digest::of(a))
            })
        };
        let b_large = claimed(LARGE, &files[1].1, &files[1].2);
        let b_small = claimed(SMALL, &files[0].1, &files[0].2);
        let refused = Digest::of(&b_small.blob).to_string();
        let push = |tag: &str, data: Vec<LayerBlob>| {
            let layout = w.join(tag);
            let mut layers = vec![base.clone()];
            layers.extend(data);
            image::write_layout_of_blobs(&layout, tag, &layers);
            let reference = format!("{repo}:{tag}");
            skopeo_copy(
                &format!("oci:{}:{tag}", layout.display()),
                &format!("docker://{reference}"),
            );
            reference
        };
        let image_a = push("a", vec![data_a]);
        let image_b = push("b", vec![b_large, b_small]);
        let common::Node { ctd, stack } = common::Node::start(w);
        Node {
            _setup: setup,
            stack,
            ctd,
            image_a,
            image_b,
            refused,
            files,
            runs: Default::default(),
        }
    }

    /// Pull lazily; every layer but the refused one must be a remote
    /// snapshot (no blob in containerd's content store), or nothing is
    /// tested; the refused one is unpacked, for the reason expected.
    fn pull(&self, reference: &str) {
        ctr_remote_rpull(&self.ctd, reference);
        let blobs = content_blobs(&self.ctd);
        for d in layer_digests(&self.ctd, reference) {
            if d == self.refused {
                assert!(blobs.contains(&d), "{d} was not unpacked");
                continue;
            }
            assert!(
                !blobs.contains(&d),
                "layer {d} of {reference} was not mounted lazily:\n{}",
                self.stack.log(Service::Snapshotter)
            );
        }
    }

    /// Read both files in a new container of `reference`.
    fn read(&self, reference: &str) -> Vec<Read> {
        self.runs.set(self.runs.get() + 1);
        let script = self
            .files
            .iter()
            .map(|(p, ..)| format!("busybox sha256sum /{p} 2>&1 || echo FAILED"))
            .collect::<Vec<_>>()
            .join("; ");
        let o = sh_in_container(
            &self.ctd,
            reference,
            &format!("sg-trust-{}", self.runs.get()),
            &script,
        );
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        let lines: Vec<&str> = out.lines().collect();
        let mut reads = Vec::new();
        let mut i = 0;
        for (path, ..) in &self.files {
            let line = lines
                .get(i)
                .unwrap_or_else(|| panic!("no output for {path}: {out}"));
            i += 1;
            if let Some(hex) = line.strip_suffix(&format!("  /{path}")) {
                reads.push(Read::Bytes(hex.to_string()));
            } else {
                // The error line, then FAILED.
                assert_eq!(lines.get(i), Some(&"FAILED"), "{out}");
                i += 1;
                reads.push(Read::Failed(line.to_string()));
            }
        }
        reads
    }

    /// Containers of A read exactly A's bytes.
    fn assert_a_reads_its_own(&self, when: &str) {
        for ((path, a, b), got) in self.files.iter().zip(self.read(&self.image_a)) {
            let want = Read::Bytes(Digest::of(a).hex());
            assert!(
                got == want,
                "{when}: /{path} in a container of A: {}",
                self.describe(&got, a, b)
            );
        }
    }

    /// Containers of B read B's bytes or get EIO.
    fn assert_b_reads_its_own_or_eio(&self, when: &str) {
        for ((path, a, b), got) in self.files.iter().zip(self.read(&self.image_b)) {
            let ok = match &got {
                Read::Bytes(hex) => *hex == Digest::of(b).hex(),
                Read::Failed(e) => e.contains("I/O error"),
            };
            assert!(
                ok,
                "{when}: /{path} in a container of B: {}",
                self.describe(&got, a, b)
            );
        }
    }

    fn describe(&self, got: &Read, a: &[u8], b: &[u8]) -> String {
        match got {
            Read::Bytes(h) if *h == Digest::of(a).hex() => "A's bytes".into(),
            Read::Bytes(h) if *h == Digest::of(b).hex() => "B's bytes".into(),
            Read::Bytes(h) => format!("bytes of neither image (a mix?), sha256 {h}"),
            Read::Failed(e) => format!("failed: {e}"),
        }
    }

    /// Where the cache stores shared content of `bytes`' digest.
    fn shared_content(&self, bytes: &[u8]) -> PathBuf {
        let hex = Digest::of(bytes).hex();
        self.stack
            .cache_dir
            .join("content")
            .join(&hex[..2])
            .join(&hex)
    }

    /// Wait until A's honest files are shared content in the cache, so that
    /// B's layer, resolved next, could be steered by them.
    fn wait_until_a_is_shared(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        for (path, a, _) in &self.files {
            let shared = self.shared_content(a);
            while !shared.exists() {
                assert!(
                    Instant::now() < deadline,
                    "A's /{path} was never shared as {}",
                    shared.display()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Nothing that does not hash to A's digests is stored under them.
    fn assert_shared_content_is_a(&self) {
        for (path, a, _) in &self.files {
            let shared = self.shared_content(a);
            if let Ok(bytes) = std::fs::read(&shared) {
                assert!(
                    bytes == *a,
                    "the cache's shared content for A's /{path} ({}) holds other bytes",
                    shared.display()
                );
            }
        }
    }

    /// Only the self-contradicting layer fell back, and for that reason.
    fn assert_only_the_refused_layer_fell_back(&self) {
        let log = self.stack.log(Service::Snapshotter);
        for line in log
            .lines()
            .filter(|l| l.contains("remote_snapshot_prepared=false"))
        {
            assert!(
                line.contains(&format!("layer={}", self.refused))
                    && line.contains(SMALL)
                    && line.contains("contradicts itself"),
                "a layer fell back to unpacking: {line}"
            );
        }
        assert!(log.contains("contradicts itself"), "{log}");
    }
}

#[test]
fn an_image_claiming_another_images_file_digests_changes_nothing_it_reads_a_first() {
    let n = Node::start("sg-trust-a-");
    n.pull(&n.image_a);
    n.assert_a_reads_its_own("A alone");
    n.wait_until_a_is_shared();
    n.pull(&n.image_b);
    n.assert_b_reads_its_own_or_eio("B after A");
    n.assert_a_reads_its_own("A after B");
    n.assert_b_reads_its_own_or_eio("B again");
    n.assert_shared_content_is_a();
    n.assert_only_the_refused_layer_fell_back();
}

#[test]
fn an_image_claiming_another_images_file_digests_changes_nothing_it_reads_b_first() {
    let n = Node::start("sg-trust-b-");
    n.pull(&n.image_b);
    n.assert_b_reads_its_own_or_eio("B alone");
    // Give background sharing of B's files time to happen, if it would.
    std::thread::sleep(Duration::from_millis(500));
    n.pull(&n.image_a);
    n.assert_a_reads_its_own("A after B");
    n.assert_b_reads_its_own_or_eio("B after A");
    n.assert_a_reads_its_own("A again");
    n.assert_shared_content_is_a();
    n.assert_only_the_refused_layer_fell_back();
}
