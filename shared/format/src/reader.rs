//! Opening a layer blob: footer → TOC → verified tree, and reading files.
//!
//! The steps are separate functions so that the fetcher can run them over
//! HTTP range requests ([`parse_footer`](crate::footer::parse_footer),
//! [`decode_toc`], [`LayerToc::from_json`]); [`open_blob`] runs them all
//! against anything that implements [`BlobRead`] (a file, bytes in memory).

use std::io::Read;
use std::os::unix::fs::FileExt;

use crate::chunk::decode_chunk;
use crate::digest::Digest;
use crate::error::{Error, ErrorKind, Result};
use crate::footer::{Footer, LayerFormat, MAX_FOOTER_SIZE, parse_footer};
use crate::tar::TarReader;
use crate::toc::TOC_TAR_NAME;
use crate::tree::{Node, NodeKind, Toc};

/// Default limit for the uncompressed TOC JSON (a 100k-file layer has ~30 MB).
pub const DEFAULT_MAX_TOC_SIZE: u64 = 256 << 20;

/// Random access to a blob.
pub trait BlobRead {
    fn size(&self) -> u64;
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;

    fn read_range(&self, range: std::ops::Range<u64>) -> std::io::Result<Vec<u8>> {
        let len = usize::try_from(range.end.saturating_sub(range.start))
            .map_err(|_| std::io::Error::other("range too large"))?;
        let mut buf = vec![0u8; len];
        self.read_exact_at(range.start, &mut buf)?;
        Ok(buf)
    }
}

impl BlobRead for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| std::io::ErrorKind::UnexpectedEof)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl BlobRead for Vec<u8> {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.as_slice().read_exact_at(offset, buf)
    }
}

impl BlobRead for std::fs::File {
    fn size(&self) -> u64 {
        self.metadata().map(|m| m.len()).unwrap_or(0)
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

/// How to open a layer.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// The `containerd.io/snapshot/stargz/toc.digest` annotation, if any.
    pub expected_toc_digest: Option<Digest>,
    /// Refuse TOCs larger than this (uncompressed).
    pub max_toc_size: u64,
    /// For external-TOC layers: the TOC layer blob from the `-esgztoc` image.
    pub external_toc: Option<Vec<u8>>,
    /// For zstd:chunked layers: the `manifest-checksum` annotation, the
    /// digest of the compressed TOC (checked before it is decompressed).
    pub expected_manifest_checksum: Option<Digest>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            expected_toc_digest: None,
            max_toc_size: DEFAULT_MAX_TOC_SIZE,
            external_toc: None,
            expected_manifest_checksum: None,
        }
    }
}

/// A layer whose TOC has been read, hashed and checked.
#[derive(Debug, Clone)]
pub struct LayerToc {
    pub footer: Footer,
    pub blob_size: u64,
    /// The TOC JSON bytes exactly as stored.
    pub toc_json: Vec<u8>,
    /// sha256 of `toc_json`: what `toc.digest` annotations refer to.
    pub toc_digest: Digest,
    pub toc: Toc,
}

impl LayerToc {
    pub fn format(&self) -> LayerFormat {
        self.footer.format()
    }

    /// Parse and check the TOC JSON of a blob. Verifies the digest against
    /// `expected` when given.
    pub fn from_json(
        footer: Footer,
        blob_size: u64,
        toc_json: Vec<u8>,
        expected: Option<Digest>,
    ) -> Result<LayerToc, ErrorKind> {
        let toc_digest = Digest::of(&toc_json);
        if let Some(expected) = expected
            && expected != toc_digest
        {
            return Err(ErrorKind::TocDigestMismatch {
                expected,
                actual: toc_digest,
            });
        }
        let toc = Toc::parse(&toc_json, footer.format(), footer.payload_end(blob_size))?;
        Ok(LayerToc {
            footer,
            blob_size,
            toc_json,
            toc_digest,
            toc,
        })
    }
}

/// Check the compressed TOC of a zstd:chunked layer against its
/// `manifest-checksum` annotation (containers/storage and the stargz
/// converter annotate the sha256 of these bytes, not of the JSON). Done
/// before the TOC is decompressed.
pub fn verify_manifest_checksum(
    footer: &Footer,
    compressed: &[u8],
    expected: Digest,
) -> Result<(), ErrorKind> {
    if footer.format() != LayerFormat::ZstdChunked {
        return Err(ErrorKind::ManifestChecksumWrongFormat {
            format: footer.format(),
        });
    }
    let actual = Digest::of(compressed);
    if actual != expected {
        return Err(ErrorKind::ManifestChecksumMismatch { expected, actual });
    }
    Ok(())
}

/// Decode the TOC JSON from its compressed bytes (the footer's `toc_range`,
/// or for external TOCs the TOC layer blob).
pub fn decode_toc(footer: &Footer, compressed: &[u8], max_size: u64) -> Result<Vec<u8>, ErrorKind> {
    match footer {
        Footer::Estargz { .. } | Footer::LegacyStargz { .. } | Footer::ExternalToc => {
            decode_toc_member(compressed, max_size)
        }
        Footer::ZstdChunked { .. } | Footer::ZstdChunkedV2 { .. } => {
            let len = footer.toc_uncompressed_len().unwrap_or(0);
            if len > max_size {
                return Err(ErrorKind::TocTooLarge {
                    size: len,
                    limit: max_size,
                });
            }
            let mut out = Vec::with_capacity(len as usize);
            zstd::stream::read::Decoder::with_buffer(compressed)
                .map_err(|e| ErrorKind::TocDecode(format!("zstd: {e}")))?
                .take(max_size + 1)
                .read_to_end(&mut out)
                .map_err(|e| ErrorKind::TocDecode(format!("zstd TOC frame is corrupt: {e}")))?;
            if out.len() as u64 > max_size {
                return Err(ErrorKind::TocTooLarge {
                    size: out.len() as u64,
                    limit: max_size,
                });
            }
            if out.len() as u64 != len {
                return Err(ErrorKind::TocDecode(format!(
                    "TOC decompresses to {} bytes but the footer says {len}",
                    out.len()
                )));
            }
            Ok(out)
        }
    }
}

/// A gzip member holding `tar(stargz.index.json)`: the TOC of eStargz and
/// stargz blobs, and the layers of an external TOC image.
pub fn decode_toc_member(gz: &[u8], max_size: u64) -> Result<Vec<u8>, ErrorKind> {
    // Header block, JSON, padding and the end-of-archive marker.
    let limit = max_size + 4 * 512;
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .take(limit + 1)
        .read_to_end(&mut tar)
        .map_err(|e| ErrorKind::TocDecode(format!("gzip: {e}")))?;
    let mut entries = TarReader::new(&tar);
    let first = match entries.next() {
        Some(Ok(e)) => e,
        Some(Err(e)) => {
            if tar.len() as u64 > limit {
                return Err(ErrorKind::TocTooLarge {
                    size: tar.len() as u64,
                    limit: max_size,
                });
            }
            return Err(ErrorKind::TocDecode(format!("TOC tar: {e}")));
        }
        None => return Err(ErrorKind::TocDecode("TOC member holds no tar entry".into())),
    };
    if first.name != TOC_TAR_NAME {
        return Err(ErrorKind::TocDecode(format!(
            "first entry of the TOC member is {:?}, not {TOC_TAR_NAME}",
            first.name
        )));
    }
    if first.size > max_size {
        return Err(ErrorKind::TocTooLarge {
            size: first.size,
            limit: max_size,
        });
    }
    Ok(tar[first.data_offset as usize..(first.data_offset + first.size) as usize].to_vec())
}

/// Read the footer and TOC of a blob and check them.
pub fn open_blob<B: BlobRead + ?Sized>(
    layer: &str,
    blob: &B,
    opts: &OpenOptions,
) -> Result<LayerToc> {
    let wrap = |k: ErrorKind| Error::new(layer, k);
    let size = blob.size();
    let tail_len = size.min(MAX_FOOTER_SIZE as u64);
    let tail = blob
        .read_range(size - tail_len..size)
        .map_err(|e| wrap(ErrorKind::io("reading the footer", e)))?;
    let footer = parse_footer(&tail, size).map_err(wrap)?;
    let json = match footer.toc_range(size) {
        Some(range) => {
            let compressed = blob
                .read_range(range)
                .map_err(|e| wrap(ErrorKind::io("reading the TOC", e)))?;
            if let Some(expected) = opts.expected_manifest_checksum {
                verify_manifest_checksum(&footer, &compressed, expected).map_err(wrap)?;
            }
            decode_toc(&footer, &compressed, opts.max_toc_size).map_err(wrap)?
        }
        None => {
            if opts.expected_manifest_checksum.is_some() {
                return Err(wrap(ErrorKind::ManifestChecksumWrongFormat {
                    format: footer.format(),
                }));
            }
            let ext = opts
                .external_toc
                .as_deref()
                .ok_or_else(|| wrap(ErrorKind::ExternalTocRequired))?;
            decode_toc_member(ext, opts.max_toc_size).map_err(wrap)?
        }
    };
    LayerToc::from_json(footer, size, json, opts.expected_toc_digest).map_err(wrap)
}

/// Read and verify a whole regular file.
pub fn read_file<B: BlobRead + ?Sized>(
    layer: &str,
    blob: &B,
    toc: &LayerToc,
    node: &Node,
) -> Result<Vec<u8>> {
    let wrap = |k: ErrorKind| Error::new(layer, k);
    if node.kind != NodeKind::Reg {
        return Err(wrap(ErrorKind::entry(&node.path, "not a regular file")));
    }
    let compression = toc.format().compression();
    let mut out = Vec::with_capacity(node.size as usize);
    for chunk in &node.chunks {
        let member = blob
            .read_range(chunk.compressed_offset..chunk.compressed_end)
            .map_err(|e| wrap(ErrorKind::io(format!("reading {}", node.path), e)))?;
        out.extend(decode_chunk(compression, &node.path, chunk, &member).map_err(wrap)?);
    }
    if let Some(d) = node.digest
        && node.chunks.len() > 1
        && Digest::of(&out) != d
    {
        return Err(wrap(ErrorKind::entry(
            &node.path,
            "file digest does not match its verified chunks",
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_checksum_checks_only_zstd_chunked_tocs() {
        let zstd = Footer::ZstdChunked {
            toc_offset: 8,
            toc_compressed_len: 3,
            toc_uncompressed_len: 3,
        };
        verify_manifest_checksum(&zstd, b"toc", Digest::of(b"toc")).unwrap();
        assert!(matches!(
            verify_manifest_checksum(&zstd, b"toc", Digest::of(b"other")),
            Err(ErrorKind::ManifestChecksumMismatch { .. })
        ));
        let gzip = Footer::Estargz { toc_offset: 8 };
        assert!(matches!(
            verify_manifest_checksum(&gzip, b"toc", Digest::of(b"toc")),
            Err(ErrorKind::ManifestChecksumWrongFormat { .. })
        ));
    }
}
