//! Layer formats of lazily pulled images: eStargz, legacy stargz (CRFS) and
//! zstd:chunked, read and written.
//!
//! Reading a layer goes footer → TOC → tree → chunks:
//!
//! * [`footer`] recognises the five footers (eStargz 51 B, legacy 47 B,
//!   external TOC 46 B, zstd:chunked 40 B and 64 B) in the tail of a blob and
//!   says where the TOC is.
//! * [`reader`] decodes the TOC (a gzip member holding a tar entry, or a zstd
//!   skippable frame), hashes the raw JSON into the TOC digest and checks it
//!   against the layer's `toc.digest` annotation, or for zstd:chunked the
//!   compressed TOC against its `manifest-checksum` annotation.
//! * [`toc`] is the JSON wire model; [`tree`] turns it into a checked,
//!   normalised file tree ([`tree::Toc`]) with hardlinks resolved, implicit
//!   directories added and every chunk located and bounded.
//! * [`chunk`] decompresses a member and verifies a chunk's sha256 before
//!   its bytes are used.
//!
//! Writing goes the other way: [`tar`] parses the input with byte positions,
//! [`convert`] plans members, compresses them in parallel and writes the
//! blob, TOC and footer. [`digest`] holds the sha256 helpers both sides use
//! and [`Digest`], the digest type layers and blobs cross the other crates
//! and the services as (parsed where a string enters, malformed ones
//! refused with [`digest::DigestParseError`] naming them).
//!
//! Every public entry point returns an [`Error`] naming the layer.

pub mod chunk;
pub mod convert;
pub mod digest;
pub mod error;
pub mod footer;
pub mod reader;
pub mod tar;
pub mod toc;
pub mod tree;

pub use convert::{ConvertOptions, ConvertedLayer, TargetFormat, convert, convert_file};
pub use digest::Digest;
pub use error::{Error, ErrorKind, Result};
pub use footer::{Compression, Footer, LayerFormat, parse_footer};
pub use reader::{BlobRead, LayerToc, OpenOptions, open_blob, read_file};
pub use tree::{Chunk, Node, NodeId, NodeKind, Prefetch, Toc};

/// Layer annotation holding the TOC digest (also a snapshot label).
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Layer annotation with the uncompressed size of an eStargz layer.
pub const UNCOMPRESSED_SIZE_ANNOTATION: &str = "io.containers.estargz.uncompressed-size";
/// Annotation on the layers of an external TOC image: the eStargz layer it belongs to.
pub const TOC_LAYER_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/layer.digest";
/// Suffix of the tag of an external TOC image.
pub const EXTERNAL_TOC_REF_SUFFIX: &str = "-esgztoc";
/// zstd:chunked annotations as the stargz converter writes them.
pub const ZSTD_MANIFEST_CHECKSUM_ANNOTATION: &str = "io.containers.zstd-chunked.manifest-checksum";
pub const ZSTD_MANIFEST_POSITION_ANNOTATION: &str = "io.containers.zstd-chunked.manifest-position";
/// zstd:chunked annotations as current containers/storage writes them.
pub const ZSTD_V2_MANIFEST_CHECKSUM_ANNOTATION: &str =
    "io.github.containers.zstd-chunked.manifest-checksum";
pub const ZSTD_V2_MANIFEST_POSITION_ANNOTATION: &str =
    "io.github.containers.zstd-chunked.manifest-position";

/// The zstd:chunked `manifest-checksum` among a layer's annotations (either
/// dialect's key), unparsed.
pub fn manifest_checksum_annotation<S: std::hash::BuildHasher>(
    annotations: &std::collections::HashMap<String, String, S>,
) -> Option<&str> {
    annotations
        .get(ZSTD_V2_MANIFEST_CHECKSUM_ANNOTATION)
        .or_else(|| annotations.get(ZSTD_MANIFEST_CHECKSUM_ANNOTATION))
        .map(String::as_str)
}
