//! The archived layout. Every record is fixed-size; strings live in one
//! byte blob (`Index::strings`) addressed by offset and length, which keeps
//! the file small and the validation a flat pass over plain integers.

use rkyv::{Archive, Deserialize, Serialize};

/// File types, as stored.
pub mod kind {
    pub const DIR: u8 = 1;
    pub const REG: u8 = 2;
    pub const SYMLINK: u8 = 3;
    pub const CHAR: u8 = 4;
    pub const BLOCK: u8 = 5;
    pub const FIFO: u8 = 6;
}

/// Inode flags.
pub mod flags {
    /// `digest` holds the file's sha256.
    pub const HAS_DIGEST: u8 = 1;
}

/// Prefetch kinds.
pub mod prefetch {
    pub const UNSPECIFIED: u8 = 0;
    pub const DISABLED: u8 = 1;
    pub const UP_TO: u8 = 2;
}

/// Layer formats.
pub mod format {
    pub const ESTARGZ: u8 = 1;
    pub const LEGACY_STARGZ: u8 = 2;
    pub const ZSTD_CHUNKED: u8 = 3;
}

/// A byte range of `Index::strings`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Str {
    pub off: u32,
    pub len: u32,
}

/// A range of one of the tables.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Span {
    pub start: u32,
    pub len: u32,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct InodeRec {
    pub kind: u8,
    pub flags: u8,
    /// Permission bits with setuid/setgid/sticky (no file type bits).
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub mtime: i64,
    /// Nanoseconds of the mtime.
    pub mtime_nsec: u32,
    pub rdev_major: u32,
    pub rdev_minor: u32,
    /// Inode number of the parent directory (the root's is itself).
    pub parent: u32,
    pub dirents: Span,
    pub chunks: Span,
    pub xattrs: Span,
    /// Symlink target.
    pub link: Str,
    pub digest: [u8; 32],
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirentRec {
    pub name: Str,
    pub ino: u32,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChunkRec {
    pub file_offset: u64,
    pub size: u64,
    pub compressed_offset: u64,
    pub compressed_end: u64,
    pub inner_offset: u64,
    pub digest: [u8; 32],
    pub zeros: bool,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XattrRec {
    pub name: Str,
    pub value: Str,
}

/// The whole index file.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct Index {
    pub magic: u32,
    pub version: u32,
    pub format: u8,
    pub prefetch_kind: u8,
    pub prefetch_offset: u64,
    pub blob_size: u64,
    pub payload_end: u64,
    pub toc_digest: [u8; 32],
    pub layer_digest: String,
    pub inodes: Vec<InodeRec>,
    pub dirents: Vec<DirentRec>,
    pub chunks: Vec<ChunkRec>,
    pub xattrs: Vec<XattrRec>,
    pub strings: Vec<u8>,
}
