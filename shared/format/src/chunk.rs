//! Decompressing members and verifying chunks.
//!
//! A chunk is read by fetching its member's compressed bytes
//! (`compressed_offset..compressed_end`), decompressing the start of the
//! member up to `inner_offset + size`, and checking the sha256 of the chunk's
//! bytes against the TOC before anything else sees them.
//!
//! gzip members go through libdeflate when the member's recorded size (ISIZE)
//! is plausible, which is about twice as fast as a streaming inflater;
//! otherwise (the fetched range spans several members, or the member is far
//! larger than what we need) a streaming decoder stops after the bytes we
//! need. zstd frames are decoded in one call when their header records the
//! content size, else streamed.

use std::io::Read;

use crate::digest::Digest;
use crate::error::ErrorKind;
use crate::footer::Compression;
use crate::tree::Chunk;

/// Largest amount of extra output the one-shot decoders may produce beyond
/// what a caller needs before we prefer a streaming decoder that stops early.
const ONE_SHOT_SLACK: u64 = 16 << 20;

/// Decompress the first `needed` bytes of the member at the start of
/// `compressed`. Fails if the member holds fewer bytes.
pub fn decompress_prefix(
    compression: Compression,
    compressed: &[u8],
    needed: u64,
) -> Result<Vec<u8>, String> {
    let needed_usize =
        usize::try_from(needed).map_err(|_| format!("chunk of {needed} bytes is too large"))?;
    let mut out = match compression {
        Compression::Gzip => gzip_prefix(compressed, needed, needed_usize)?,
        Compression::Zstd => zstd_prefix(compressed, needed, needed_usize)?,
    };
    if out.len() < needed_usize {
        return Err(format!(
            "member decompresses to {} bytes, fewer than the {needed} the TOC promises",
            out.len()
        ));
    }
    out.truncate(needed_usize);
    Ok(out)
}

fn gzip_prefix(compressed: &[u8], needed: u64, needed_usize: usize) -> Result<Vec<u8>, String> {
    if compressed.len() >= 18 {
        let isize =
            u32::from_le_bytes(compressed[compressed.len() - 4..].try_into().unwrap()) as u64;
        if isize >= needed && isize <= needed + ONE_SHOT_SLACK {
            let mut out = vec![0u8; isize as usize];
            let mut d = libdeflater::Decompressor::new();
            if let Ok(n) = d.gzip_decompress(compressed, &mut out) {
                out.truncate(n);
                return Ok(out);
            }
            // The range held more than one member or ISIZE wrapped: stream.
        }
    }
    let mut out = Vec::with_capacity(needed_usize);
    flate2::read::GzDecoder::new(compressed)
        .take(needed)
        .read_to_end(&mut out)
        .map_err(|e| format!("gzip member is corrupt: {e}"))?;
    Ok(out)
}

fn zstd_prefix(compressed: &[u8], needed: u64, needed_usize: usize) -> Result<Vec<u8>, String> {
    let content_size = zstd::zstd_safe::get_frame_content_size(compressed)
        .ok()
        .flatten();
    if let Some(n) = content_size
        && n >= needed
        && n <= needed + ONE_SHOT_SLACK
    {
        let frame_len = zstd::zstd_safe::find_frame_compressed_size(compressed).map_err(|c| {
            format!(
                "zstd frame is corrupt: {}",
                zstd::zstd_safe::get_error_name(c)
            )
        })?;
        return zstd::bulk::decompress(&compressed[..frame_len], n as usize)
            .map_err(|e| format!("zstd frame is corrupt: {e}"));
    }
    let mut out = Vec::with_capacity(needed_usize);
    let mut dec = zstd::stream::read::Decoder::with_buffer(compressed)
        .map_err(|e| format!("zstd decoder: {e}"))?
        .single_frame();
    (&mut dec)
        .take(needed)
        .read_to_end(&mut out)
        .map_err(|e| format!("zstd frame is corrupt: {e}"))?;
    Ok(out)
}

/// Check a chunk's bytes against its digest.
pub fn verify_chunk(file: &str, chunk: &Chunk, data: &[u8]) -> Result<(), ErrorKind> {
    if data.len() as u64 != chunk.size {
        return Err(ErrorKind::chunk(
            file,
            chunk.file_offset,
            format!("got {} bytes, expected {}", data.len(), chunk.size),
        ));
    }
    let actual = Digest::of(data);
    if actual != chunk.digest {
        return Err(ErrorKind::ChunkDigestMismatch {
            file: file.to_string(),
            offset: chunk.file_offset,
            expected: chunk.digest,
            actual,
        });
    }
    Ok(())
}

/// Decode and verify one chunk from its member's compressed bytes
/// (`chunk.compressed_offset..chunk.compressed_end` of the blob).
pub fn decode_chunk(
    compression: Compression,
    file: &str,
    chunk: &Chunk,
    member: &[u8],
) -> Result<Vec<u8>, ErrorKind> {
    let needed = chunk.inner_offset + chunk.size;
    let mut data = decompress_prefix(compression, member, needed)
        .map_err(|r| ErrorKind::chunk(file, chunk.file_offset, r))?;
    if chunk.inner_offset > 0 {
        data.drain(..chunk.inner_offset as usize);
    }
    verify_chunk(file, chunk, &data)?;
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut c = libdeflater::Compressor::new(libdeflater::CompressionLvl::default());
        let mut out = vec![0u8; c.gzip_compress_bound(data.len())];
        let n = c.gzip_compress(data, &mut out).unwrap();
        out.truncate(n);
        out
    }

    #[test]
    fn gzip_prefix_with_trailing_member_and_large_member() {
        let a: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut two = gz(&a);
        two.extend(gz(b"second member"));
        let got = decompress_prefix(Compression::Gzip, &two, 1000).unwrap();
        assert_eq!(got, a[..1000]);
        let got = decompress_prefix(Compression::Gzip, &gz(&a), 100_000).unwrap();
        assert_eq!(got, a);
        assert!(decompress_prefix(Compression::Gzip, &gz(&a), 100_001).is_err());
    }

    #[test]
    fn zstd_prefix_both_paths() {
        let a: Vec<u8> = (0..300_000u32).map(|i| (i % 13) as u8).collect();
        let mut frame = zstd::bulk::compress(&a, 3).unwrap();
        frame.extend(zstd::bulk::compress(b"next", 3).unwrap());
        assert_eq!(
            decompress_prefix(Compression::Zstd, &frame, 300_000).unwrap(),
            a
        );
        assert_eq!(
            decompress_prefix(Compression::Zstd, &frame, 10).unwrap(),
            a[..10]
        );
    }

    #[test]
    fn garbage_members_error() {
        for junk in [&b""[..], b"\x1f\x8b\x08\x00garbage", &[0u8; 64]] {
            assert!(decompress_prefix(Compression::Gzip, junk, 10).is_err());
            assert!(decompress_prefix(Compression::Zstd, junk, 10).is_err());
        }
    }
}
