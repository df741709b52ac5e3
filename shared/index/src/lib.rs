//! The TOC index: a layer's file tree as an rkyv archive that the fs service
//! maps and reads in place.
//!
//! The fetcher verifies a layer's TOC (`stargaze-format`), then [`build`]s
//! the index from the checked [`Toc`] and [`write_atomic`]s it to
//! `<cache>/layers/<layer-digest>/index`; it never changes afterwards. The fs
//! service [`LayerIndex::open`]s it: one mmap and one bytecheck validation,
//! no deserialisation, no per-entry heap copies, so mounting a layer costs
//! the same whether it has ten files or a hundred thousand.
//!
//! Layout ([`model`]): a header (magic, version, layer and TOC digests,
//! format, prefetch boundary), then flat tables: inodes (inode number =
//! position + 1, the root is 1), dirents grouped per directory and sorted by
//! name bytes, chunks grouped per file and sorted by file offset, xattrs
//! grouped per inode, and one byte blob holding every name, link target and
//! xattr. Lookups are binary searches within a directory's dirent range or a
//! file's chunk range; inode access is O(1). Every range read from the file
//! is bounds-checked again on use ([`view`]), so a file altered after
//! validation yields `None`, never an out-of-range read.
//!
//! The index holds the layer as overlayfs must see it ([`build`]): tar
//! whiteouts `.wh.NAME` become 0/0 character devices, `.wh..wh..opq` becomes
//! the `trusted.overlay.opaque` xattr, the landmark files and
//! `stargz.index.json` are hidden, and only the xattrs containerd's own
//! unpack would set are kept (no `trusted.*` from the TOC, no `user.*` on
//! symlinks or devices; see `xattrs.rs`), with the mtimes it would set
//! (none before 1970 or after 2262; see `times.rs`).

mod build;
pub mod model;
mod times;
mod view;
mod xattrs;

pub use build::{IndexMeta, build, write_atomic};
pub use view::{ChunkInfo, DirEntry, Inode, LayerIndex, Xattr};

use std::path::PathBuf;

/// Magic number at the start of the header ("SGIX").
pub const MAGIC: u32 = u32::from_le_bytes(*b"SGIX");
/// Bumped whenever the archived layout or what it holds changes (which
/// xattrs are kept, the overlayfs view); older files are rebuilt.
pub const VERSION: u32 = 5;
/// Inode number of the root directory.
pub const ROOT_INO: u64 = 1;
/// The xattr overlayfs reads to treat a directory as opaque.
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Why an index could not be used.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("index {path} is corrupt ({reason}); delete it so that the fetcher rebuilds it")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "index {path} has layout version {found}, this build reads version {expected}; it will be rebuilt"
    )]
    Version {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("cannot index layer {layer}: {reason}")]
    Build { layer: String, reason: String },
}

impl IndexError {
    /// Did writing the index find its filesystem full (ENOSPC) or the
    /// user's quota spent (EDQUOT)?
    pub fn is_out_of_space(&self) -> bool {
        match self {
            IndexError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            ),
            _ => false,
        }
    }
}
