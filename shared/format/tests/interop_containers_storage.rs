//! zstd:chunked as containers/storage writes it (through Debian's skopeo):
//! content-defined chunks, `endOffset`, `chunkType: "zeros"` holes, empty
//! digests for empty files, and no `toc.digest` annotation (the compressed
//! TOC's checksum is annotated instead). Our reader must open it and verify
//! every chunk.

use std::collections::BTreeMap;
use std::process::Command;

use stargaze_format::tar::{TarKind, TarReader};
use stargaze_format::{
    Digest, ErrorKind, LayerFormat, NodeKind, OpenOptions, open_blob, read_file,
};
use stargaze_testkit::{image, require, run};

fn source_layer() -> Vec<u8> {
    let host = image::tar_of_host_paths(&["usr/lib/python3.11/json", "usr/share/zoneinfo/Asia"]);
    let end = TarReader::new(&host)
        .last()
        .map(|e| e.unwrap().end_offset)
        .unwrap_or(0);
    let mut b = tar::Builder::new(host[..end as usize].to_vec());
    // A file with a long hole (becomes a "zeros" chunk) and an empty file.
    let mut holey = vec![7u8; 100_000];
    holey.extend(vec![0u8; 300_000]);
    holey.extend(vec![9u8; 50_000]);
    for (name, data) in [("data/holey.bin", holey), ("data/empty", Vec::new())] {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

#[test]
fn we_read_zstd_chunked_written_by_skopeo() {
    require("skopeo");
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let tar = source_layer();
    image::write_layout(
        &src,
        "stargaze.test/zc:v1",
        "v1",
        std::slice::from_ref(&tar),
    );
    let dst = work.path().join("dst");
    run(Command::new("skopeo")
        .args([
            "--insecure-policy",
            "copy",
            "--dest-compress-format",
            "zstd:chunked",
        ])
        .arg(format!("oci:{}:v1", src.display()))
        .arg(format!("oci:{}:v1", dst.display())));
    let blob_path = |d: &str| dst.join("blobs/sha256").join(&d[7..]);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dst.join("index.json")).unwrap()).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(blob_path(index["manifests"][0]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    let desc = &manifest["layers"][0];
    let digest = desc["digest"].as_str().unwrap();
    let ann = &desc["annotations"];
    let checksum = ann["io.containers.zstd-chunked.manifest-checksum"]
        .as_str()
        .or(ann["io.github.containers.zstd-chunked.manifest-checksum"].as_str())
        .expect("skopeo annotates the TOC checksum");
    let blob = std::fs::read(blob_path(digest)).unwrap();
    let layer = open_blob(digest, &blob[..], &OpenOptions::default()).unwrap();
    assert_eq!(layer.format(), LayerFormat::ZstdChunked);
    // The annotation is the digest of the compressed TOC bytes.
    let range = layer.footer.toc_range(blob.len() as u64).unwrap();
    assert_eq!(
        Digest::of(&blob[range.start as usize..range.end as usize]).to_string(),
        checksum
    );
    // The reader checks the TOC against that annotation.
    let with = |sum: Digest| OpenOptions {
        expected_manifest_checksum: Some(sum),
        ..Default::default()
    };
    open_blob(digest, &blob[..], &with(checksum.parse().unwrap())).unwrap();
    let err = open_blob(digest, &blob[..], &with(Digest::of(b"other"))).unwrap_err();
    assert!(
        matches!(err.kind, ErrorKind::ManifestChecksumMismatch { .. }),
        "{err}"
    );
    assert!(err.to_string().contains(digest), "{err}");

    let sources: BTreeMap<String, (TarKind, Vec<u8>)> = TarReader::new(&tar)
        .map(|e| e.unwrap())
        .map(|e| {
            let data = tar[e.data_offset as usize..(e.data_offset + e.size) as usize].to_vec();
            (
                stargaze_format::tree::normalize_path(&e.name).unwrap(),
                (e.kind, data),
            )
        })
        .collect();
    let mut verified = 0;
    let mut zero_chunks = 0;
    for (path, (kind, data)) in &sources {
        let id = layer
            .toc
            .lookup(path)
            .unwrap_or_else(|| panic!("{path} missing"));
        let node = layer.toc.node(id);
        if *kind != TarKind::Regular {
            continue;
        }
        assert_eq!(node.kind, NodeKind::Reg, "{path}");
        assert_eq!(node.size, data.len() as u64, "{path}");
        zero_chunks += node.chunks.iter().filter(|c| c.zeros).count();
        let got = read_file(digest, &blob[..], &layer, node).unwrap_or_else(|e| panic!("{e}"));
        assert!(got == *data, "{path}: content differs");
        verified += 1;
    }
    assert!(verified > 20, "only {verified} files verified");
    assert!(zero_chunks > 0, "the hole should be a zeros chunk");
}
