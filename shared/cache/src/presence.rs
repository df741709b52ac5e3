//! Presence maps: one bit per chunk of a layer, in a file mapped shared by
//! the fetcher (read-write) and the fs service (read-only).
//!
//! Layout: a 4 KiB header (magic, version, chunk count, layer digest), then
//! the bitmap as little-endian 64-bit words. Bits are set with `fetch_or`
//! and release ordering after the chunk's data write returned; readers load
//! with acquire ordering, so a set bit always means the bytes are readable.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use stargaze_format::Digest;

use crate::CacheError;

/// Bytes before the bitmap (keeps the words page-aligned).
pub const PRESENCE_HEADER: usize = 4096;
const MAGIC: &[u8; 8] = b"SGPRES01";
const VERSION: u32 = 1;

enum Map {
    Rw(memmap2::MmapMut),
    Ro(memmap2::Mmap),
}

/// A layer's presence map.
pub struct PresenceMap {
    map: Map,
    chunks: u32,
    path: PathBuf,
}

fn words_for(chunks: u32) -> usize {
    (chunks as usize).div_ceil(64)
}

fn file_len(chunks: u32) -> u64 {
    (PRESENCE_HEADER + words_for(chunks) * 8) as u64
}

impl PresenceMap {
    /// Open a layer's map for writing, creating it (all bits clear) if it
    /// does not exist. A map whose header does not match `chunks` or
    /// `layer_digest` is recreated empty: its bits would mean nothing.
    pub fn open_rw(
        path: &Path,
        chunks: u32,
        layer_digest: &Digest,
    ) -> Result<PresenceMap, CacheError> {
        // The header holds the digest's 64 hex digits (as it always has:
        // maps written by earlier releases keep their bits).
        let layer_digest = layer_digest.hex();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| CacheError::io(dir, e))?;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| CacheError::io(path, e))?;
        let want = file_len(chunks);
        let len = file.metadata().map_err(|e| CacheError::io(path, e))?.len();
        let fresh = len != want || {
            let mut header = [0u8; 96];
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut header, 0)
                .map_err(|e| CacheError::io(path, e))?;
            parse_header(&header)
                .map(|(c, d)| c != chunks || d != layer_digest)
                .unwrap_or(true)
        };
        if fresh {
            file.set_len(0).map_err(|e| CacheError::io(path, e))?;
            // Written out, not a sparse `set_len`: the bits are set through
            // the mapping, and a store into a hole on a full filesystem
            // would kill the fetcher with SIGBUS instead of failing here.
            let mut bytes = vec![0u8; want as usize];
            bytes[..8].copy_from_slice(MAGIC);
            bytes[8..12].copy_from_slice(&VERSION.to_le_bytes());
            bytes[16..20].copy_from_slice(&chunks.to_le_bytes());
            let d = layer_digest.as_bytes();
            bytes[32..32 + d.len().min(64)].copy_from_slice(&d[..d.len().min(64)]);
            std::os::unix::fs::FileExt::write_all_at(&file, &bytes, 0)
                .map_err(|e| CacheError::io(path, e))?;
        }
        // SAFETY: the map is shared with readers in other processes; all
        // accesses to the bitmap go through atomics, the header is written
        // before any reader can see a matching chunk count.
        let map =
            unsafe { memmap2::MmapMut::map_mut(&file) }.map_err(|e| CacheError::io(path, e))?;
        Ok(PresenceMap {
            map: Map::Rw(map),
            chunks,
            path: path.to_path_buf(),
        })
    }

    /// Open a map read-only (the fs service).
    pub fn open_ro(path: &Path) -> Result<PresenceMap, CacheError> {
        let file = std::fs::File::open(path).map_err(|e| CacheError::io(path, e))?;
        // SAFETY: read-only shared map; bitmap words are read atomically.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| CacheError::io(path, e))?;
        let corrupt = |reason: &str| CacheError::Corrupt {
            path: path.to_path_buf(),
            reason: reason.into(),
        };
        let (chunks, _) = parse_header(
            map.get(..96)
                .ok_or_else(|| corrupt("shorter than its header"))?,
        )
        .ok_or_else(|| corrupt("bad magic or version"))?;
        if map.len() as u64 != file_len(chunks) {
            return Err(corrupt("size does not match its chunk count"));
        }
        Ok(PresenceMap {
            map: Map::Ro(map),
            chunks,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn chunk_count(&self) -> u32 {
        self.chunks
    }

    fn word(&self, i: u32) -> Option<&AtomicU64> {
        if i >= self.chunks {
            return None;
        }
        let base = match &self.map {
            Map::Rw(m) => m.as_ptr(),
            Map::Ro(m) => m.as_ptr(),
        };
        let off = PRESENCE_HEADER + (i as usize / 64) * 8;
        // SAFETY: `off + 8 <= len` because the file length was checked
        // against the chunk count; the mapping is page-aligned and the header
        // is 4096 bytes, so the word is 8-byte aligned; the mapping lives as
        // long as `self`.
        Some(unsafe { &*(base.add(off) as *const AtomicU64) })
    }

    /// Is chunk `i` present? (acquire: its bytes are readable if so)
    pub fn is_present(&self, i: u32) -> bool {
        self.word(i)
            .map(|w| w.load(Ordering::Acquire) & (1 << (i % 64)) != 0)
            .unwrap_or(false)
    }

    /// Mark chunk `i` present. Call only after its data write returned.
    pub fn set_present(&self, i: u32) {
        debug_assert!(matches!(self.map, Map::Rw(_)), "readers never set bits");
        if let (Map::Rw(_), Some(w)) = (&self.map, self.word(i)) {
            w.fetch_or(1 << (i % 64), Ordering::Release);
        }
    }

    /// Clear chunk `i` (its data failed re-verification).
    pub fn clear(&self, i: u32) {
        if let (Map::Rw(_), Some(w)) = (&self.map, self.word(i)) {
            w.fetch_and(!(1 << (i % 64)), Ordering::AcqRel);
        }
    }

    /// Are chunks `range` all present?
    pub fn all_present(&self, range: std::ops::Range<u32>) -> bool {
        range.into_iter().all(|i| self.is_present(i))
    }

    /// Number of present chunks.
    pub fn count_present(&self) -> u32 {
        (0..words_for(self.chunks) as u32)
            .filter_map(|w| self.word(w * 64))
            .map(|w| w.load(Ordering::Acquire).count_ones())
            .sum()
    }
}

fn parse_header(h: &[u8]) -> Option<(u32, String)> {
    if &h[..8] != MAGIC || u32::from_le_bytes(h[8..12].try_into().ok()?) != VERSION {
        return None;
    }
    let chunks = u32::from_le_bytes(h[16..20].try_into().ok()?);
    let digest = &h[32..96];
    let end = digest.iter().position(|&b| b == 0).unwrap_or(digest.len());
    Some((chunks, String::from_utf8_lossy(&digest[..end]).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bits are stored through a shared mapping: every page of a new
    /// map must be allocated on disk, or a store on a full filesystem
    /// would be a SIGBUS rather than an error.
    #[test]
    fn a_new_map_has_no_holes() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("presence");
        let chunks = 200_000;
        let map = PresenceMap::open_rw(&path, chunks, &Digest([0xab; 32])).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), file_len(chunks));
        assert!(
            meta.blocks() * 512 >= meta.len(),
            "{} bytes allocated for a map of {}",
            meta.blocks() * 512,
            meta.len()
        );
        map.set_present(chunks - 1);
        assert!(map.is_present(chunks - 1));
    }
}
