//! The footers that make a layer blob lazily readable.
//!
//! | format | size | what it is |
//! |---|---|---|
//! | eStargz | 51 | empty gzip member whose Extra field holds subfield `SG` with `%016xSTARGZ` (TOC offset) |
//! | legacy stargz (CRFS) | 47 | same, but the Extra field is the raw 22 bytes without a subfield header |
//! | external TOC | 46 | empty gzip member, subfield `SG` with `STARGZEXTERNALTOC`; the TOC lives in a TOC image |
//! | zstd:chunked (stargz / old containers-storage) | 40 | skippable frame payload: TOC offset, compressed and uncompressed length, type, magic `GnUlInUx` |
//! | zstd:chunked (current containers-storage) | 64 | adds the tar-split offset and lengths, magic `GNUlInUx` |
//!
//! A reader fetches the last [`MAX_FOOTER_SIZE`] bytes of a blob (more if it
//! wants the TOC in the same request) and calls [`parse_footer`].

use crate::error::ErrorKind;

pub const ESTARGZ_FOOTER_SIZE: usize = 51;
pub const LEGACY_FOOTER_SIZE: usize = 47;
pub const EXTERNAL_TOC_FOOTER_SIZE: usize = 46;
/// Size of the footer payload of the stargz zstd:chunked dialect (the
/// skippable-frame header before it is not counted, as upstream does).
pub const ZSTD_CHUNKED_FOOTER_SIZE: usize = 40;
/// Size of the footer payload written by current containers/storage.
pub const ZSTD_CHUNKED_V2_FOOTER_SIZE: usize = 64;
/// Enough tail bytes to recognise every footer, including the skippable
/// frame header in front of a 64-byte zstd:chunked footer.
pub const MAX_FOOTER_SIZE: usize = ZSTD_CHUNKED_V2_FOOTER_SIZE + SKIPPABLE_HEADER_SIZE;

/// Magic of the stargz zstd:chunked footer.
pub const ZSTD_CHUNKED_MAGIC: [u8; 8] = *b"GnUlInUx";
/// Magic of the containers/storage 64-byte zstd:chunked footer.
pub const ZSTD_CHUNKED_V2_MAGIC: [u8; 8] = *b"GNUlInUx";
/// First four bytes of a zstd skippable frame (0x184D2A50, little endian).
pub const SKIPPABLE_FRAME_MAGIC: [u8; 4] = [0x50, 0x2a, 0x4d, 0x18];
pub const SKIPPABLE_HEADER_SIZE: usize = 8;
/// Manifest type 1: a CRFS-compatible TOC.
pub const MANIFEST_TYPE_CRFS: u64 = 1;

const GZIP_ID: [u8; 3] = [0x1f, 0x8b, 0x08];
const FLAG_EXTRA: u8 = 0x04;
/// Stored final deflate block of length 0, then CRC32 = 0 and ISIZE = 0.
const EMPTY_DEFLATE_AND_TRAILER: [u8; 13] = [0x01, 0x00, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0];
const EXTERNAL_TOC_MAGIC: &[u8] = b"STARGZEXTERNALTOC";

/// A recognised footer and what it says about the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Footer {
    /// eStargz: the TOC member starts at `toc_offset` and ends at the footer.
    Estargz { toc_offset: u64 },
    /// CRFS stargz: same layout with the older footer.
    LegacyStargz { toc_offset: u64 },
    /// eStargz whose TOC was moved into a separate TOC image.
    ExternalToc,
    /// zstd:chunked as written by the Go stargz converter and old containers/storage.
    ZstdChunked {
        toc_offset: u64,
        toc_compressed_len: u64,
        toc_uncompressed_len: u64,
    },
    /// zstd:chunked as written by current containers/storage (tar-split frame after the TOC).
    ZstdChunkedV2 {
        toc_offset: u64,
        toc_compressed_len: u64,
        toc_uncompressed_len: u64,
        tar_split_offset: u64,
        tar_split_compressed_len: u64,
        tar_split_uncompressed_len: u64,
    },
}

/// Layer formats we can read lazily.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerFormat {
    Estargz,
    LegacyStargz,
    ZstdChunked,
}

impl LayerFormat {
    /// Compression of the data members.
    pub fn compression(self) -> Compression {
        match self {
            LayerFormat::Estargz | LayerFormat::LegacyStargz => Compression::Gzip,
            LayerFormat::ZstdChunked => Compression::Zstd,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            LayerFormat::Estargz => "estargz",
            LayerFormat::LegacyStargz => "stargz",
            LayerFormat::ZstdChunked => "zstd:chunked",
        }
    }
}

impl std::fmt::Display for LayerFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How data members are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    Gzip,
    Zstd,
}

impl Footer {
    /// Bytes the footer occupies at the end of the blob (including the
    /// skippable-frame header for zstd:chunked).
    pub fn size(&self) -> u64 {
        (match self {
            Footer::Estargz { .. } => ESTARGZ_FOOTER_SIZE,
            Footer::LegacyStargz { .. } => LEGACY_FOOTER_SIZE,
            Footer::ExternalToc => EXTERNAL_TOC_FOOTER_SIZE,
            Footer::ZstdChunked { .. } => ZSTD_CHUNKED_FOOTER_SIZE + SKIPPABLE_HEADER_SIZE,
            Footer::ZstdChunkedV2 { .. } => ZSTD_CHUNKED_V2_FOOTER_SIZE + SKIPPABLE_HEADER_SIZE,
        }) as u64
    }

    pub fn format(&self) -> LayerFormat {
        match self {
            Footer::Estargz { .. } | Footer::ExternalToc => LayerFormat::Estargz,
            Footer::LegacyStargz { .. } => LayerFormat::LegacyStargz,
            Footer::ZstdChunked { .. } | Footer::ZstdChunkedV2 { .. } => LayerFormat::ZstdChunked,
        }
    }

    /// Compressed byte range of the TOC inside a blob of `blob_size` bytes,
    /// or `None` when the TOC is external.
    pub fn toc_range(&self, blob_size: u64) -> Option<std::ops::Range<u64>> {
        match *self {
            Footer::Estargz { toc_offset } | Footer::LegacyStargz { toc_offset } => {
                Some(toc_offset..blob_size - self.size())
            }
            Footer::ExternalToc => None,
            Footer::ZstdChunked {
                toc_offset,
                toc_compressed_len,
                ..
            }
            | Footer::ZstdChunkedV2 {
                toc_offset,
                toc_compressed_len,
                ..
            } => Some(toc_offset..toc_offset + toc_compressed_len),
        }
    }

    /// End of the file data: chunk offsets must lie below it.
    pub fn payload_end(&self, blob_size: u64) -> u64 {
        match *self {
            Footer::Estargz { toc_offset } | Footer::LegacyStargz { toc_offset } => toc_offset,
            Footer::ExternalToc => blob_size - self.size(),
            // The TOC offset points past the skippable-frame header.
            Footer::ZstdChunked { toc_offset, .. } | Footer::ZstdChunkedV2 { toc_offset, .. } => {
                toc_offset - SKIPPABLE_HEADER_SIZE as u64
            }
        }
    }

    /// Uncompressed TOC length when the footer records it.
    pub fn toc_uncompressed_len(&self) -> Option<u64> {
        match *self {
            Footer::ZstdChunked {
                toc_uncompressed_len,
                ..
            }
            | Footer::ZstdChunkedV2 {
                toc_uncompressed_len,
                ..
            } => Some(toc_uncompressed_len),
            _ => None,
        }
    }

    /// The footer's bytes (for zstd:chunked including the skippable-frame header).
    pub fn encode(&self) -> Vec<u8> {
        match *self {
            Footer::Estargz { toc_offset } => {
                let mut extra = Vec::with_capacity(26);
                extra.extend_from_slice(b"SG");
                extra.extend_from_slice(&22u16.to_le_bytes());
                extra.extend_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
                empty_gzip_with_extra(&extra)
            }
            Footer::LegacyStargz { toc_offset } => {
                empty_gzip_with_extra(format!("{toc_offset:016x}STARGZ").as_bytes())
            }
            Footer::ExternalToc => {
                let mut extra = Vec::with_capacity(21);
                extra.extend_from_slice(b"SG");
                extra.extend_from_slice(&(EXTERNAL_TOC_MAGIC.len() as u16).to_le_bytes());
                extra.extend_from_slice(EXTERNAL_TOC_MAGIC);
                empty_gzip_with_extra(&extra)
            }
            Footer::ZstdChunked {
                toc_offset,
                toc_compressed_len,
                toc_uncompressed_len,
            } => {
                let mut out = skippable_header(ZSTD_CHUNKED_FOOTER_SIZE);
                for v in [
                    toc_offset,
                    toc_compressed_len,
                    toc_uncompressed_len,
                    MANIFEST_TYPE_CRFS,
                ] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                out.extend_from_slice(&ZSTD_CHUNKED_MAGIC);
                out
            }
            Footer::ZstdChunkedV2 {
                toc_offset,
                toc_compressed_len,
                toc_uncompressed_len,
                tar_split_offset,
                tar_split_compressed_len,
                tar_split_uncompressed_len,
            } => {
                let mut out = skippable_header(ZSTD_CHUNKED_V2_FOOTER_SIZE);
                for v in [
                    toc_offset,
                    toc_compressed_len,
                    toc_uncompressed_len,
                    MANIFEST_TYPE_CRFS,
                    tar_split_offset,
                    tar_split_compressed_len,
                    tar_split_uncompressed_len,
                ] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                out.extend_from_slice(&ZSTD_CHUNKED_V2_MAGIC);
                out
            }
        }
    }
}

/// Header of a zstd skippable frame holding `len` bytes.
pub fn skippable_header(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(SKIPPABLE_HEADER_SIZE + len);
    out.extend_from_slice(&SKIPPABLE_FRAME_MAGIC);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out
}

fn empty_gzip_with_extra(extra: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + extra.len() + EMPTY_DEFLATE_AND_TRAILER.len());
    // ID1 ID2 CM FLG=FEXTRA MTIME=0 XFL=0 OS=255 (unknown), as Go writes it.
    out.extend_from_slice(&GZIP_ID);
    out.push(FLAG_EXTRA);
    out.extend_from_slice(&[0, 0, 0, 0, 0, 0xff]);
    out.extend_from_slice(&(extra.len() as u16).to_le_bytes());
    out.extend_from_slice(extra);
    out.extend_from_slice(&EMPTY_DEFLATE_AND_TRAILER);
    out
}

/// Recognise the footer at the end of `tail`, the last bytes of a blob of
/// `blob_size` bytes (`tail.len() <= blob_size`). Pass at least
/// [`MAX_FOOTER_SIZE`] bytes when the blob is that large.
///
/// Tries the zstd:chunked dialects (distinct magic numbers), then eStargz,
/// legacy stargz and external-TOC footers, and reports every reason when
/// none matches, like the Go reader does.
pub fn parse_footer(tail: &[u8], blob_size: u64) -> Result<Footer, ErrorKind> {
    if (tail.len() as u64) > blob_size {
        return Err(ErrorKind::BadFooter(format!(
            "{} tail bytes given for a blob of {blob_size} bytes",
            tail.len()
        )));
    }
    let mut reasons = Vec::new();

    if tail.len() >= 8 {
        let magic = &tail[tail.len() - 8..];
        if magic == ZSTD_CHUNKED_V2_MAGIC || magic == ZSTD_CHUNKED_MAGIC {
            return parse_zstd_footer(tail, blob_size);
        }
    }
    reasons.push("zstd:chunked: no GnUlInUx/GNUlInUx magic".to_string());

    for (name, size) in [
        ("eStargz", ESTARGZ_FOOTER_SIZE),
        ("legacy stargz", LEGACY_FOOTER_SIZE),
        ("external TOC", EXTERNAL_TOC_FOOTER_SIZE),
    ] {
        if tail.len() < size {
            reasons.push(format!("{name}: blob shorter than {size} bytes"));
            continue;
        }
        match parse_gzip_footer(&tail[tail.len() - size..], size) {
            Ok(footer) => {
                if let Footer::Estargz { toc_offset } | Footer::LegacyStargz { toc_offset } = footer
                    && toc_offset >= blob_size - size as u64
                {
                    return Err(ErrorKind::BadFooter(format!(
                        "{name} footer points at TOC offset {toc_offset}, outside the blob of {blob_size} bytes"
                    )));
                }
                return Ok(footer);
            }
            Err(reason) => reasons.push(format!("{name}: {reason}")),
        }
    }
    Err(ErrorKind::NotLazy(reasons.join("; ")))
}

fn parse_gzip_footer(b: &[u8], size: usize) -> Result<Footer, String> {
    if b[..3] != GZIP_ID {
        return Err("no gzip header".into());
    }
    if b[3] & FLAG_EXTRA == 0 {
        return Err("gzip header has no Extra field".into());
    }
    let xlen = u16::from_le_bytes([b[10], b[11]]) as usize;
    if 12 + xlen + EMPTY_DEFLATE_AND_TRAILER.len() != size {
        return Err(format!(
            "Extra field length {xlen} does not fit a {size}-byte footer"
        ));
    }
    let extra = &b[12..12 + xlen];
    // The remaining 13 bytes must be an empty deflate stream and a zero
    // trailer; anything else is not a footer written by a stargz tool.
    let body = &b[12 + xlen..];
    if body[5..] != [0u8; 8] || body[0] & 0x01 == 0 {
        return Err("footer member is not empty".into());
    }
    match size {
        LEGACY_FOOTER_SIZE => {
            let offset = parse_offset_field(extra)?;
            Ok(Footer::LegacyStargz { toc_offset: offset })
        }
        ESTARGZ_FOOTER_SIZE | EXTERNAL_TOC_FOOTER_SIZE => {
            if extra.len() < 4 {
                return Err("Extra field too short".into());
            }
            if &extra[..2] != b"SG" {
                return Err(format!("Extra subfield id {:?} is not \"SG\"", &extra[..2]));
            }
            let len = u16::from_le_bytes([extra[2], extra[3]]) as usize;
            let field = &extra[4..];
            if len != field.len() {
                return Err(format!(
                    "Extra subfield length {len} does not match {}",
                    field.len()
                ));
            }
            if size == EXTERNAL_TOC_FOOTER_SIZE {
                if field != EXTERNAL_TOC_MAGIC {
                    return Err("subfield is not STARGZEXTERNALTOC".into());
                }
                Ok(Footer::ExternalToc)
            } else {
                Ok(Footer::Estargz {
                    toc_offset: parse_offset_field(field)?,
                })
            }
        }
        _ => Err(format!("no gzip footer has size {size}")),
    }
}

/// `%016xSTARGZ`
fn parse_offset_field(field: &[u8]) -> Result<u64, String> {
    if field.len() != 22 || &field[16..] != b"STARGZ" {
        return Err("Extra field is not <16 hex digits>STARGZ".into());
    }
    let hex = std::str::from_utf8(&field[..16]).map_err(|_| "TOC offset is not hex")?;
    u64::from_str_radix(hex, 16).map_err(|_| format!("TOC offset {hex:?} is not hex"))
}

fn parse_zstd_footer(tail: &[u8], blob_size: u64) -> Result<Footer, ErrorKind> {
    let u64_at = |b: &[u8], i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
    let has_frame_header = |payload: usize| {
        tail.len() >= payload + SKIPPABLE_HEADER_SIZE && {
            let h = &tail[tail.len() - payload - SKIPPABLE_HEADER_SIZE..tail.len() - payload];
            h[..4] == SKIPPABLE_FRAME_MAGIC
                && u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize == payload
        }
    };
    let footer = if has_frame_header(ZSTD_CHUNKED_V2_FOOTER_SIZE) {
        let b = &tail[tail.len() - ZSTD_CHUNKED_V2_FOOTER_SIZE..];
        Footer::ZstdChunkedV2 {
            toc_offset: u64_at(b, 0),
            toc_compressed_len: u64_at(b, 1),
            toc_uncompressed_len: u64_at(b, 2),
            tar_split_offset: u64_at(b, 4),
            tar_split_compressed_len: u64_at(b, 5),
            tar_split_uncompressed_len: u64_at(b, 6),
        }
        .check_type(u64_at(b, 3))?
    } else if has_frame_header(ZSTD_CHUNKED_FOOTER_SIZE) {
        let b = &tail[tail.len() - ZSTD_CHUNKED_FOOTER_SIZE..];
        Footer::ZstdChunked {
            toc_offset: u64_at(b, 0),
            toc_compressed_len: u64_at(b, 1),
            toc_uncompressed_len: u64_at(b, 2),
        }
        .check_type(u64_at(b, 3))?
    } else {
        return Err(ErrorKind::BadFooter(
            "zstd:chunked magic found but no skippable frame of 40 or 64 bytes holds it".into(),
        ));
    };
    let (Footer::ZstdChunked {
        toc_offset,
        toc_compressed_len,
        ..
    }
    | Footer::ZstdChunkedV2 {
        toc_offset,
        toc_compressed_len,
        ..
    }) = footer
    else {
        unreachable!()
    };
    let footer_start = blob_size.checked_sub(footer.size());
    let toc_end = toc_offset.checked_add(toc_compressed_len);
    match (footer_start, toc_end) {
        (Some(start), Some(end)) if toc_offset >= SKIPPABLE_HEADER_SIZE as u64 && end <= start => {
            Ok(footer)
        }
        _ => Err(ErrorKind::BadFooter(format!(
            "zstd:chunked TOC range {toc_offset}+{toc_compressed_len} lies outside the blob of {blob_size} bytes"
        ))),
    }
}

impl Footer {
    fn check_type(self, manifest_type: u64) -> Result<Footer, ErrorKind> {
        if manifest_type != MANIFEST_TYPE_CRFS {
            return Err(ErrorKind::Unsupported(format!(
                "zstd:chunked manifest type {manifest_type} (only type 1, CRFS, is known)"
            )));
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn encodings_match_the_reference_vectors() {
        assert_eq!(
            hex(&Footer::Estargz { toc_offset: 0x1234 }.encode()),
            "1f8b08040000000000ff1a00534716003030303030303030303030303132333453544152475a010000ffff0000000000000000"
        );
        assert_eq!(
            hex(&Footer::LegacyStargz { toc_offset: 0x1234 }.encode()),
            "1f8b08040000000000ff16003030303030303030303030303132333453544152475a010000ffff0000000000000000"
        );
        assert_eq!(
            hex(&Footer::ExternalToc.encode()),
            "1f8b08040000000000ff15005347110053544152475a45585445524e414c544f43010000ffff0000000000000000"
        );
    }

    #[test]
    fn round_trip_many_offsets() {
        for off in (0..200_000u64).step_by(1023) {
            for footer in [
                Footer::Estargz { toc_offset: off },
                Footer::LegacyStargz { toc_offset: off },
            ] {
                let mut blob = vec![0u8; off as usize + 10];
                blob.extend_from_slice(&footer.encode());
                let size = blob.len() as u64;
                let tail = &blob[blob.len().saturating_sub(MAX_FOOTER_SIZE)..];
                assert_eq!(parse_footer(tail, size).unwrap(), footer);
            }
        }
    }

    #[test]
    fn zstd_dialects_round_trip() {
        let v1 = Footer::ZstdChunked {
            toc_offset: 108,
            toc_compressed_len: 20,
            toc_uncompressed_len: 50,
        };
        let v2 = Footer::ZstdChunkedV2 {
            toc_offset: 108,
            toc_compressed_len: 20,
            toc_uncompressed_len: 50,
            tar_split_offset: 136,
            tar_split_compressed_len: 4,
            tar_split_uncompressed_len: 9,
        };
        for f in [v1, v2] {
            let mut blob = vec![0u8; 200];
            blob.extend_from_slice(&f.encode());
            let size = blob.len() as u64;
            let tail = &blob[blob.len() - MAX_FOOTER_SIZE..];
            let parsed = parse_footer(tail, size).unwrap();
            assert_eq!(parsed, f);
            assert_eq!(parsed.payload_end(size), 100);
            assert_eq!(parsed.toc_range(size), Some(108..128));
        }
    }

    #[test]
    fn garbage_is_reported_not_panicking() {
        for len in 0..80 {
            let junk = vec![0x1fu8; len];
            assert!(parse_footer(&junk, len as u64).is_err());
        }
        let err = parse_footer(&[0u8; 64], 1000).unwrap_err().to_string();
        assert!(err.contains("eStargz") && err.contains("legacy"), "{err}");
    }

    #[test]
    fn toc_offset_outside_blob_is_rejected() {
        let f = Footer::Estargz {
            toc_offset: 1 << 40,
        }
        .encode();
        assert!(matches!(
            parse_footer(&f, f.len() as u64 + 10),
            Err(ErrorKind::BadFooter(_))
        ));
    }
}
