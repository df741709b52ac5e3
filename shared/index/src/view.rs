//! Reading a mapped index. Accessors return native values or borrowed
//! slices of the mapping; nothing is copied onto the heap per entry.

use std::path::{Path, PathBuf};

use stargaze_format::{Digest, LayerFormat, Prefetch};

use crate::model::{self, ArchivedChunkRec, ArchivedIndex, ArchivedInodeRec, ArchivedStr};
use crate::{IndexError, MAGIC, ROOT_INO, VERSION};

enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(rkyv::util::AlignedVec),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// An open, validated index.
pub struct LayerIndex {
    bytes: Bytes,
    path: PathBuf,
}

/// One chunk of a regular file, in native integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkInfo {
    /// Position of the chunk among the file's chunks.
    pub index: usize,
    /// Position in the layer's chunk table: the chunk's bit in the layer's
    /// presence map.
    pub global: u32,
    pub file_offset: u64,
    pub size: u64,
    pub compressed_offset: u64,
    pub compressed_end: u64,
    pub inner_offset: u64,
    pub digest: [u8; 32],
    pub zeros: bool,
}

/// An entry of a directory listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirEntry<'a> {
    /// Position in the directory; resume a listing at `offset + 1`.
    pub offset: usize,
    pub name: &'a [u8],
    pub ino: u64,
    /// `model::kind::*`
    pub kind: u8,
}

/// An extended attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Xattr<'a> {
    pub name: &'a [u8],
    pub value: &'a [u8],
}

/// A view of one inode.
#[derive(Clone, Copy)]
pub struct Inode<'a> {
    index: &'a LayerIndex,
    rec: &'a ArchivedInodeRec,
    ino: u64,
}

fn corrupt(path: &Path, reason: impl Into<String>) -> IndexError {
    IndexError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl LayerIndex {
    /// Map an index file read-only and validate it once.
    pub fn open(path: &Path) -> Result<LayerIndex, IndexError> {
        let file = std::fs::File::open(path).map_err(|source| IndexError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: index files are written once to a temporary name and
        // renamed into place (write_atomic); nobody modifies them afterwards.
        // A file changed behind our back can only produce wrong answers, as
        // every range is checked again on use.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| IndexError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::validate(Bytes::Mapped(map), path.to_path_buf())
    }

    /// An index held in memory (tests, tools).
    pub fn from_bytes(bytes: &[u8]) -> Result<LayerIndex, IndexError> {
        let mut v = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
        v.extend_from_slice(bytes);
        Self::validate(Bytes::Owned(v), PathBuf::from("<memory>"))
    }

    fn validate(bytes: Bytes, path: PathBuf) -> Result<LayerIndex, IndexError> {
        let archived = rkyv::access::<ArchivedIndex, rkyv::rancor::Error>(bytes.as_slice())
            .map_err(|e| corrupt(&path, e.to_string()))?;
        if archived.magic.to_native() != MAGIC {
            return Err(corrupt(&path, "not a stargaze index (bad magic)"));
        }
        let version = archived.version.to_native();
        if version != VERSION {
            return Err(IndexError::Version {
                path,
                found: version,
                expected: VERSION,
            });
        }
        if archived.inodes.is_empty() || archived.inodes[0].kind != model::kind::DIR {
            return Err(corrupt(&path, "no root directory"));
        }
        Ok(LayerIndex { bytes, path })
    }

    fn archived(&self) -> &ArchivedIndex {
        // SAFETY: validated by `rkyv::access` when the index was opened and
        // the bytes are immutable since.
        unsafe { rkyv::access_unchecked::<ArchivedIndex>(self.bytes.as_slice()) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the index in bytes.
    pub fn len(&self) -> usize {
        self.bytes.as_slice().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn layer_digest(&self) -> &str {
        self.archived().layer_digest.as_str()
    }

    pub fn toc_digest(&self) -> Digest {
        Digest(self.archived().toc_digest)
    }

    pub fn format(&self) -> Option<LayerFormat> {
        match self.archived().format {
            model::format::ESTARGZ => Some(LayerFormat::Estargz),
            model::format::LEGACY_STARGZ => Some(LayerFormat::LegacyStargz),
            model::format::ZSTD_CHUNKED => Some(LayerFormat::ZstdChunked),
            _ => None,
        }
    }

    pub fn blob_size(&self) -> u64 {
        self.archived().blob_size.to_native()
    }

    pub fn payload_end(&self) -> u64 {
        self.archived().payload_end.to_native()
    }

    pub fn prefetch(&self) -> Prefetch {
        let a = self.archived();
        match a.prefetch_kind {
            model::prefetch::DISABLED => Prefetch::Disabled,
            model::prefetch::UP_TO => Prefetch::UpTo(a.prefetch_offset.to_native()),
            _ => Prefetch::Unspecified,
        }
    }

    /// Number of inodes (the largest inode number).
    pub fn inode_count(&self) -> u64 {
        self.archived().inodes.len() as u64
    }

    /// Number of chunks in the layer (the size of its presence map).
    pub fn chunk_count(&self) -> u32 {
        self.archived().chunks.len() as u32
    }

    pub fn root(&self) -> Inode<'_> {
        self.inode(ROOT_INO)
            .expect("validated at open: the root exists")
    }

    /// O(1).
    pub fn inode(&self, ino: u64) -> Option<Inode<'_>> {
        let i = usize::try_from(ino.checked_sub(1)?).ok()?;
        let rec = self.archived().inodes.get(i)?;
        Some(Inode {
            index: self,
            rec,
            ino,
        })
    }

    fn str(&self, s: &ArchivedStr) -> Option<&[u8]> {
        let off = s.off.to_native() as usize;
        let len = s.len.to_native() as usize;
        self.archived().strings.get(off..off.checked_add(len)?)
    }

    /// The child `name` of directory `dir`: a binary search of its dirents.
    pub fn lookup(&self, dir: u64, name: &[u8]) -> Option<u64> {
        let d = self.inode(dir)?;
        let ents = d.dirent_slice()?;
        let i = ents
            .binary_search_by(|e| self.str(&e.name).unwrap_or(&[]).cmp(name))
            .ok()?;
        Some(ents[i].ino.to_native() as u64)
    }

    /// Resolve a path relative to the root (`a/b/c`, leading `/` allowed).
    pub fn lookup_path(&self, path: &str) -> Option<u64> {
        let mut ino = ROOT_INO;
        for comp in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
            ino = self.lookup(ino, comp.as_bytes())?;
        }
        Some(ino)
    }

    /// The path of an inode, for messages (walks up through the parents;
    /// a hardlinked file gets one of its names).
    pub fn path_of(&self, ino: u64) -> String {
        let mut parts: Vec<String> = Vec::new();
        let mut cur = ino;
        for _ in 0..4096 {
            let Some(node) = self.inode(cur) else { break };
            let parent = node.parent();
            if cur == ROOT_INO || parent == cur {
                break;
            }
            match self.readdir(parent, 0).find(|d| d.ino == cur) {
                Some(d) => parts.push(String::from_utf8_lossy(d.name).into_owned()),
                None => break,
            }
            cur = parent;
        }
        parts.reverse();
        format!("/{}", parts.join("/"))
    }

    /// Entries of directory `dir` from position `from` on, in name order.
    pub fn readdir(&self, dir: u64, from: usize) -> impl Iterator<Item = DirEntry<'_>> + '_ {
        let ents = self
            .inode(dir)
            .and_then(|d| d.dirent_slice())
            .unwrap_or(&[]);
        ents.iter()
            .enumerate()
            .skip(from)
            .filter_map(move |(offset, e)| {
                let ino = e.ino.to_native() as u64;
                Some(DirEntry {
                    offset,
                    name: self.str(&e.name)?,
                    ino,
                    kind: self.inode(ino)?.rec.kind,
                })
            })
    }
}

impl<'a> Inode<'a> {
    pub fn ino(&self) -> u64 {
        self.ino
    }

    /// `model::kind::*`
    pub fn kind(&self) -> u8 {
        self.rec.kind
    }

    pub fn is_dir(&self) -> bool {
        self.rec.kind == model::kind::DIR
    }

    pub fn is_reg(&self) -> bool {
        self.rec.kind == model::kind::REG
    }

    /// Permission bits with setuid, setgid and sticky.
    pub fn perm(&self) -> u32 {
        self.rec.mode.to_native() as u32 & 0o7777
    }

    /// `st_mode`: file type bits and permissions.
    pub fn st_mode(&self) -> u32 {
        let fmt = match self.rec.kind {
            model::kind::DIR => 0o040000,
            model::kind::REG => 0o100000,
            model::kind::SYMLINK => 0o120000,
            model::kind::CHAR => 0o020000,
            model::kind::BLOCK => 0o060000,
            model::kind::FIFO => 0o010000,
            _ => 0,
        };
        fmt | self.perm()
    }

    pub fn uid(&self) -> u32 {
        self.rec.uid.to_native()
    }

    pub fn gid(&self) -> u32 {
        self.rec.gid.to_native()
    }

    pub fn nlink(&self) -> u32 {
        self.rec.nlink.to_native()
    }

    /// File size; symlinks report the target's length.
    pub fn size(&self) -> u64 {
        self.rec.size.to_native()
    }

    /// 512-byte blocks, rounded up to whole 4 KiB pages like the Go fs.
    pub fn blocks(&self) -> u64 {
        self.size().div_ceil(4096) * 8
    }

    pub fn mtime(&self) -> i64 {
        self.rec.mtime.to_native()
    }

    /// Nanoseconds of [`Inode::mtime`] (below 1e9).
    pub fn mtime_nsec(&self) -> u32 {
        self.rec.mtime_nsec.to_native()
    }

    pub fn rdev(&self) -> (u32, u32) {
        (
            self.rec.rdev_major.to_native(),
            self.rec.rdev_minor.to_native(),
        )
    }

    pub fn parent(&self) -> u64 {
        self.rec.parent.to_native() as u64
    }

    pub fn symlink(&self) -> Option<&'a [u8]> {
        (self.rec.kind == model::kind::SYMLINK)
            .then(|| self.index.str(&self.rec.link))
            .flatten()
    }

    /// The file's sha256 when the TOC gives it (the cache key).
    pub fn digest(&self) -> Option<Digest> {
        (self.rec.flags & model::flags::HAS_DIGEST != 0).then_some(Digest(self.rec.digest))
    }

    fn dirent_slice(&self) -> Option<&'a [model::ArchivedDirentRec]> {
        let s = &self.rec.dirents;
        let start = s.start.to_native() as usize;
        self.index
            .archived()
            .dirents
            .get(start..start.checked_add(s.len.to_native() as usize)?)
    }

    fn chunk_slice(&self) -> &'a [ArchivedChunkRec] {
        let s = &self.rec.chunks;
        let start = s.start.to_native() as usize;
        start
            .checked_add(s.len.to_native() as usize)
            .and_then(|end| self.index.archived().chunks.get(start..end))
            .unwrap_or(&[])
    }

    /// Number of directory entries (directories only).
    pub fn dirent_count(&self) -> usize {
        self.dirent_slice().map(|s| s.len()).unwrap_or(0)
    }

    pub fn chunk_count(&self) -> usize {
        self.chunk_slice().len()
    }

    pub fn chunk(&self, i: usize) -> Option<ChunkInfo> {
        let c = self.chunk_slice().get(i)?;
        Some(ChunkInfo {
            index: i,
            global: self
                .rec
                .chunks
                .start
                .to_native()
                .checked_add(u32::try_from(i).ok()?)?,
            file_offset: c.file_offset.to_native(),
            size: c.size.to_native(),
            compressed_offset: c.compressed_offset.to_native(),
            compressed_end: c.compressed_end.to_native(),
            inner_offset: c.inner_offset.to_native(),
            digest: c.digest,
            zeros: c.zeros,
        })
    }

    pub fn chunks(&self) -> impl Iterator<Item = ChunkInfo> + 'a {
        let me = *self;
        (0..self.chunk_count()).filter_map(move |i| me.chunk(i))
    }

    /// The chunk holding byte `offset` of the file (binary search).
    pub fn chunk_at(&self, offset: u64) -> Option<ChunkInfo> {
        if offset >= self.size() {
            return None;
        }
        let chunks = self.chunk_slice();
        let i = match chunks.binary_search_by(|c| c.file_offset.to_native().cmp(&offset)) {
            Ok(i) => i,
            Err(i) => i.checked_sub(1)?,
        };
        let c = self.chunk(i)?;
        (offset < c.file_offset + c.size).then_some(c)
    }

    /// The chunks holding bytes `[offset, end)` of the file, in file order
    /// (none when the range is empty or past the end).
    pub fn chunks_in(&self, offset: u64, end: u64) -> impl Iterator<Item = ChunkInfo> + 'a {
        let me = *self;
        let first = if offset < end {
            self.chunk_at(offset).map(|c| c.index)
        } else {
            None
        };
        let from = first.unwrap_or(usize::MAX);
        let to = if first.is_some() {
            self.chunk_count()
        } else {
            0
        };
        (from.min(to)..to)
            .map_while(move |i| me.chunk(i))
            .take_while(move |c| c.file_offset < end)
    }

    pub fn xattrs(&self) -> impl Iterator<Item = Xattr<'a>> + 'a {
        let s = &self.rec.xattrs;
        let start = s.start.to_native() as usize;
        let recs = start
            .checked_add(s.len.to_native() as usize)
            .and_then(|end| self.index.archived().xattrs.get(start..end))
            .unwrap_or(&[]);
        let index = self.index;
        recs.iter().filter_map(move |x| {
            Some(Xattr {
                name: index.str(&x.name)?,
                value: index.str(&x.value)?,
            })
        })
    }

    pub fn xattr(&self, name: &[u8]) -> Option<&'a [u8]> {
        self.xattrs().find(|x| x.name == name).map(|x| x.value)
    }
}
