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
//! need. A chunk may span several gzip members (a legacy stargz file
//! without chunk digests is one chunk verified whole): the streaming
//! decoder reads on across member boundaries. zstd frames are decoded in one call when their header records the
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

/// Decompress the first `needed` bytes of the member at the start of
/// `compressed` and hand them to `f`, without allocating: the one-shot
/// decoders and their output buffer are kept per thread (a fetcher's
/// decoder threads decode thousands of small members a second, and a fresh
/// zeroed buffer plus a fresh libdeflate state for each was a tenth of their
/// CPU time). Falls back to [`decompress_prefix`] where that streams.
pub fn with_decompressed_prefix<R>(
    compression: Compression,
    compressed: &[u8],
    needed: u64,
    f: impl FnOnce(&[u8]) -> R,
) -> Result<R, String> {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
    }
    let needed_usize =
        usize::try_from(needed).map_err(|_| format!("chunk of {needed} bytes is too large"))?;
    let one_shot = match compression {
        Compression::Gzip if compressed.len() >= 18 => {
            let tail: [u8; 4] = compressed[compressed.len() - 4..]
                .try_into()
                .map_err(|_| "gzip member is truncated".to_string())?;
            let isize = u32::from_le_bytes(tail) as u64;
            (isize >= needed && isize <= needed + ONE_SHOT_SLACK).then_some(isize)
        }
        Compression::Gzip => None,
        Compression::Zstd => zstd::zstd_safe::get_frame_content_size(compressed)
            .ok()
            .flatten()
            .filter(|&n| n >= needed && n <= needed + ONE_SHOT_SLACK),
    };
    let Some(full) = one_shot else {
        return decompress_prefix(compression, compressed, needed).map(|d| f(&d));
    };
    // The scratch is taken out for the call, so `f` may decompress too.
    let mut scratch = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let full = full as usize;
    if scratch.buf.len() < full {
        // Zeroed once per thread and size, not once per member.
        scratch.buf.resize(full, 0);
    }
    let out = &mut scratch.buf[..full];
    let produced = match compression {
        Compression::Gzip => {
            let d = scratch
                .gzip
                .get_or_insert_with(libdeflater::Decompressor::new);
            d.gzip_decompress(compressed, out).ok()
        }
        Compression::Zstd => {
            let frame_len =
                zstd::zstd_safe::find_frame_compressed_size(compressed).map_err(|c| {
                    format!(
                        "zstd frame is corrupt: {}",
                        zstd::zstd_safe::get_error_name(c)
                    )
                })?;
            let d = match &mut scratch.zstd {
                Some(d) => d,
                None => scratch.zstd.insert(
                    zstd::bulk::Decompressor::new().map_err(|e| format!("zstd decoder: {e}"))?,
                ),
            };
            Some(
                d.decompress_to_buffer(&compressed[..frame_len], out)
                    .map_err(|e| format!("zstd frame is corrupt: {e}"))?,
            )
        }
    };
    let result = match produced {
        Some(n) if n >= needed_usize => Ok(f(&scratch.buf[..needed_usize])),
        // More than one member in the range (a short first member, or a
        // chunk spanning members), or ISIZE wrapped: stream.
        _ => decompress_prefix(compression, compressed, needed).map(|d| f(&d)),
    };
    // Keep at most a few MiB per thread between calls.
    if scratch.buf.len() > SCRATCH_KEEP {
        scratch.buf = Vec::new();
    }
    SCRATCH.with(|s| *s.borrow_mut() = scratch);
    result
}

/// Largest output buffer a thread keeps between members.
const SCRATCH_KEEP: usize = 8 << 20;

/// A thread's one-shot decoders and output buffer.
#[derive(Default)]
struct Scratch {
    buf: Vec<u8>,
    gzip: Option<libdeflater::Decompressor>,
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

fn gzip_prefix(compressed: &[u8], needed: u64, needed_usize: usize) -> Result<Vec<u8>, String> {
    if compressed.len() >= 18 {
        let isize =
            u32::from_le_bytes(compressed[compressed.len() - 4..].try_into().unwrap()) as u64;
        if isize >= needed && isize <= needed + ONE_SHOT_SLACK {
            let mut out = vec![0u8; isize as usize];
            let mut d = libdeflater::Decompressor::new();
            if let Ok(n) = d.gzip_decompress(compressed, &mut out)
                && n >= needed_usize
            {
                out.truncate(n);
                return Ok(out);
            }
            // The range held more than one member or ISIZE wrapped: stream.
        }
    }
    // Several members when a chunk spans them (a legacy stargz file
    // verified whole); the decoder stops after the bytes needed.
    let mut out = Vec::with_capacity(needed_usize);
    flate2::read::MultiGzDecoder::new(compressed)
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
    fn a_chunk_spanning_gzip_members_decodes_on_every_path() {
        let parts: Vec<Vec<u8>> = (0..3u32)
            .map(|p| (0..70_000u32).map(|i| ((i * 7 + p) % 253) as u8).collect())
            .collect();
        let whole = parts.concat();
        let members: Vec<u8> = parts.iter().flat_map(|p| gz(p)).collect();
        let need = whole.len() as u64;
        assert_eq!(
            decompress_prefix(Compression::Gzip, &members, need).unwrap(),
            whole
        );
        let got = with_decompressed_prefix(Compression::Gzip, &members, need, |d| d.to_vec());
        assert_eq!(got.unwrap(), whole);
        // The last member records more bytes than the whole chunk (tar
        // headers after the file): the one-shot decoder stops after the
        // first member, and the stream takes over.
        let mut tail = parts[2].clone();
        tail.extend(vec![0u8; 300_000]);
        let mut members: Vec<u8> = parts[..2].iter().flat_map(|p| gz(p)).collect();
        members.extend(gz(&tail));
        let got = with_decompressed_prefix(Compression::Gzip, &members, need, |d| d.to_vec());
        assert_eq!(got.unwrap(), whole);
        assert_eq!(
            decompress_prefix(Compression::Gzip, &members, need).unwrap(),
            whole
        );
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
    fn scratch_decoding_equals_owned_decoding() {
        let a: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
        let b: Vec<u8> = (0..5_000u32).map(|i| (i % 7) as u8).collect();
        let mut two = gz(&a);
        two.extend(gz(b"second member"));
        let zframe = zstd::bulk::compress(&a, 3).unwrap();
        // Large then small then large again: the kept buffer is reused.
        for (c, member, needed, want) in [
            (Compression::Gzip, gz(&a), 200_000u64, &a[..]),
            (Compression::Gzip, gz(&b), 5_000, &b[..]),
            (Compression::Gzip, gz(&a), 1_000, &a[..1_000]),
            (Compression::Gzip, two.clone(), 1_000, &a[..1_000]),
            (Compression::Zstd, zframe.clone(), 200_000, &a[..]),
            (Compression::Zstd, zframe.clone(), 10, &a[..10]),
        ] {
            let got = with_decompressed_prefix(c, &member, needed, |d| d.to_vec()).unwrap();
            assert_eq!(got, want);
            assert_eq!(got, decompress_prefix(c, &member, needed).unwrap());
        }
        assert!(with_decompressed_prefix(Compression::Gzip, &gz(&b), 5_001, |_| ()).is_err());
        assert!(
            with_decompressed_prefix(
                Compression::Gzip,
                b"\x1f\x8b\x08\x00garbage-garbage-x",
                10,
                |_| ()
            )
            .is_err()
        );
        assert!(with_decompressed_prefix(Compression::Zstd, &[0u8; 64], 10, |_| ()).is_err());
    }

    #[test]
    fn garbage_members_error() {
        for junk in [&b""[..], b"\x1f\x8b\x08\x00garbage", &[0u8; 64]] {
            assert!(decompress_prefix(Compression::Gzip, junk, 10).is_err());
            assert!(decompress_prefix(Compression::Zstd, junk, 10).is_err());
        }
    }
}
