//! Building the index from a checked TOC tree, with the overlayfs view.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use stargaze_format::toc::{NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME};
use stargaze_format::{Digest, LayerFormat, NodeId, NodeKind, Prefetch, Toc};

use crate::model::{self, ChunkRec, DirentRec, Index, InodeRec, Span, Str, XattrRec};
use crate::times::unpacked_mtime;
use crate::xattrs::kept_by_unpack;
use crate::{IndexError, MAGIC, OPAQUE_XATTR, VERSION};

/// What the index records about the layer besides its tree.
#[derive(Debug, Clone)]
pub struct IndexMeta {
    pub layer_digest: String,
    pub toc_digest: Digest,
    pub blob_size: u64,
}

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// What a visible directory entry points at.
#[derive(Clone, Copy)]
enum Target {
    Node(NodeId),
    /// A whiteout: a 0/0 character device (permission bits, mtime of the tar entry).
    Whiteout {
        mode: u32,
        mtime: i64,
    },
}

struct Strings {
    blob: Vec<u8>,
    layer: String,
}

impl Strings {
    fn push(&mut self, bytes: &[u8]) -> Result<Str, IndexError> {
        let off = u32::try_from(self.blob.len()).ok();
        let len = u32::try_from(bytes.len()).ok();
        match (off, len) {
            (Some(off), Some(len)) if off.checked_add(len).is_some() => {
                self.blob.extend_from_slice(bytes);
                Ok(Str { off, len })
            }
            _ => Err(IndexError::Build {
                layer: self.layer.clone(),
                reason: "names, link targets and xattrs exceed 4 GiB".into(),
            }),
        }
    }
}

fn too_many(layer: &str, what: &str) -> IndexError {
    IndexError::Build {
        layer: layer.to_string(),
        reason: format!("more than 2^32 {what}"),
    }
}

fn span(start: usize, len: usize, layer: &str, what: &str) -> Result<Span, IndexError> {
    Ok(Span {
        start: u32::try_from(start).map_err(|_| too_many(layer, what))?,
        len: u32::try_from(len).map_err(|_| too_many(layer, what))?,
    })
}

/// The entries of directory `dir` as overlayfs must see them, sorted by
/// name bytes, and whether the directory is opaque.
fn visible_children(toc: &Toc, dir: NodeId) -> (Vec<(&str, Target)>, bool) {
    let node = toc.node(dir);
    let is_root = dir == 0;
    let mut opaque = false;
    let mut out: Vec<(&str, Target)> = Vec::with_capacity(node.children.len());
    let mut whiteouts: Vec<(&str, Target)> = Vec::new();
    for (name, &child) in &node.children {
        let name = name.as_str();
        if is_root
            && (name == PREFETCH_LANDMARK || name == NO_PREFETCH_LANDMARK || name == TOC_TAR_NAME)
        {
            continue;
        }
        if name == OPAQUE_MARKER {
            opaque = true;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if !hidden.is_empty() {
                let n = toc.node(child);
                whiteouts.push((
                    hidden,
                    Target::Whiteout {
                        mode: n.mode,
                        mtime: n.mtime,
                    },
                ));
            }
            continue;
        }
        out.push((name, Target::Node(child)));
    }
    // A whiteout next to a real entry of the same name says nothing useful
    // (the entry wins, as when the tar is extracted onto a directory).
    for (name, t) in whiteouts {
        if !node.children.contains_key(name) {
            out.push((name, t));
        }
    }
    out.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    (out, opaque)
}

fn kind_code(k: NodeKind) -> u8 {
    match k {
        NodeKind::Dir => model::kind::DIR,
        NodeKind::Reg => model::kind::REG,
        NodeKind::Symlink => model::kind::SYMLINK,
        NodeKind::Char => model::kind::CHAR,
        NodeKind::Block => model::kind::BLOCK,
        NodeKind::Fifo => model::kind::FIFO,
    }
}

/// Build the index of a checked TOC.
pub fn build(toc: &Toc, meta: &IndexMeta) -> Result<rkyv::util::AlignedVec, IndexError> {
    let layer = meta.layer_digest.as_str();
    // Pass 1: number the visible inodes depth first and lay out each
    // directory's dirents contiguously.
    let mut ino_of: Vec<u32> = vec![0; toc.nodes.len()];
    let mut slots: Vec<(Target, u32)> = vec![(Target::Node(0), 1)]; // (what, parent ino)
    ino_of[0] = 1;
    let mut opaque_dirs: Vec<u32> = Vec::new(); // inode numbers
    let mut dir_entries: Vec<(u32, Vec<(String, u32)>)> = Vec::new();
    let mut stack: Vec<NodeId> = vec![0];
    while let Some(dir) = stack.pop() {
        let dir_ino = ino_of[dir as usize];
        let (children, opaque) = visible_children(toc, dir);
        if opaque {
            opaque_dirs.push(dir_ino);
        }
        let mut ents = Vec::with_capacity(children.len());
        let mut subdirs = Vec::new();
        for (name, target) in children {
            let ino = match target {
                Target::Node(id) => {
                    if ino_of[id as usize] == 0 {
                        slots.push((target, dir_ino));
                        ino_of[id as usize] =
                            u32::try_from(slots.len()).map_err(|_| too_many(layer, "inodes"))?;
                        if toc.node(id).kind == NodeKind::Dir {
                            subdirs.push(id);
                        }
                    }
                    ino_of[id as usize]
                }
                Target::Whiteout { .. } => {
                    slots.push((target, dir_ino));
                    u32::try_from(slots.len()).map_err(|_| too_many(layer, "inodes"))?
                }
            };
            ents.push((name.to_string(), ino));
        }
        // Depth first, in name order.
        stack.extend(subdirs.into_iter().rev());
        dir_entries.push((dir_ino, ents));
    }

    // Link counts as overlayfs will see them.
    let mut names_of = vec![0u32; slots.len() + 1];
    let mut subdirs_of = vec![0u32; slots.len() + 1];
    let is_dir = |ino: u32| match slots[ino as usize - 1].0 {
        Target::Node(id) => toc.node(id).kind == NodeKind::Dir,
        Target::Whiteout { .. } => false,
    };
    for (dir_ino, ents) in &dir_entries {
        for (_, ino) in ents {
            names_of[*ino as usize] += 1;
            if is_dir(*ino) {
                subdirs_of[*dir_ino as usize] += 1;
            }
        }
    }

    let mut opaque = vec![false; slots.len() + 1];
    for ino in opaque_dirs {
        opaque[ino as usize] = true;
    }

    // Pass 2: the tables.
    let mut strings = Strings {
        blob: Vec::new(),
        layer: layer.to_string(),
    };
    let mut inodes: Vec<InodeRec> = Vec::with_capacity(slots.len());
    let mut chunks: Vec<ChunkRec> = Vec::new();
    let mut xattrs: Vec<XattrRec> = Vec::new();
    for (i, (target, parent)) in slots.iter().enumerate() {
        let ino = i as u32 + 1;
        let mut rec = InodeRec {
            parent: *parent,
            ..Default::default()
        };
        match *target {
            Target::Whiteout { mode, mtime } => {
                rec.kind = model::kind::CHAR;
                rec.mode = (mode & 0o7777) as u16;
                (rec.mtime, rec.mtime_nsec) = unpacked_mtime(mtime, 0);
                rec.nlink = 1;
            }
            Target::Node(id) => {
                let n = toc.node(id);
                rec.kind = kind_code(n.kind);
                // Linux symlinks are always 0777 (tar's mode field is ignored
                // when they are created): the view shows what lstat would.
                rec.mode = match n.kind {
                    NodeKind::Symlink => 0o777,
                    _ => (n.mode & 0o7777) as u16,
                };
                rec.uid = n.uid;
                rec.gid = n.gid;
                (rec.mtime, rec.mtime_nsec) = unpacked_mtime(n.mtime, n.mtime_nsec);
                rec.size = match n.kind {
                    NodeKind::Reg => n.size,
                    NodeKind::Symlink => n.link_target.len() as u64,
                    _ => 0,
                };
                rec.rdev_major = n.dev_major;
                rec.rdev_minor = n.dev_minor;
                rec.nlink = if n.kind == NodeKind::Dir {
                    2 + subdirs_of[ino as usize]
                } else {
                    names_of[ino as usize].max(1)
                };
                if let Some(d) = n.digest {
                    rec.flags |= model::flags::HAS_DIGEST;
                    rec.digest = d.0;
                }
                if n.kind == NodeKind::Symlink {
                    rec.link = strings.push(n.link_target.as_bytes())?;
                }
                rec.chunks = span(chunks.len(), n.chunks.len(), layer, "chunks")?;
                chunks.extend(n.chunks.iter().map(|c| ChunkRec {
                    file_offset: c.file_offset,
                    size: c.size,
                    compressed_offset: c.compressed_offset,
                    compressed_end: c.compressed_end,
                    inner_offset: c.inner_offset,
                    digest: c.digest.0,
                    zeros: c.zeros,
                }));
                // Only what containerd's unpack would leave (no
                // `trusted.*`: a layer must not steer overlayfs); the opaque
                // marker made from `.wh..wh..opq` is ours, added after.
                let mut attrs: BTreeMap<&str, &[u8]> = n
                    .xattrs
                    .iter()
                    .filter(|(k, _)| kept_by_unpack(k, n.kind))
                    .map(|(k, v)| (k.as_str(), v.as_slice()))
                    .collect();
                if opaque[ino as usize] {
                    attrs.insert(OPAQUE_XATTR, b"y");
                }
                rec.xattrs = span(xattrs.len(), attrs.len(), layer, "xattrs")?;
                for (k, v) in attrs {
                    let name = strings.push(k.as_bytes())?;
                    let value = strings.push(v)?;
                    xattrs.push(XattrRec { name, value });
                }
            }
        }
        inodes.push(rec);
    }
    let mut dirents: Vec<DirentRec> = Vec::new();
    for (dir_ino, ents) in dir_entries {
        inodes[dir_ino as usize - 1].dirents = span(dirents.len(), ents.len(), layer, "dirents")?;
        for (name, ino) in ents {
            let name = strings.push(name.as_bytes())?;
            dirents.push(DirentRec { name, ino });
        }
    }

    let (prefetch_kind, prefetch_offset) = match toc.prefetch {
        Prefetch::Unspecified => (model::prefetch::UNSPECIFIED, 0),
        Prefetch::Disabled => (model::prefetch::DISABLED, 0),
        Prefetch::UpTo(off) => (model::prefetch::UP_TO, off),
    };
    let index = Index {
        magic: MAGIC,
        version: VERSION,
        format: match toc.format {
            LayerFormat::Estargz => model::format::ESTARGZ,
            LayerFormat::LegacyStargz => model::format::LEGACY_STARGZ,
            LayerFormat::ZstdChunked => model::format::ZSTD_CHUNKED,
        },
        prefetch_kind,
        prefetch_offset,
        blob_size: meta.blob_size,
        payload_end: toc.payload_end,
        toc_digest: meta.toc_digest.0,
        layer_digest: meta.layer_digest.clone(),
        inodes,
        dirents,
        chunks,
        xattrs,
        strings: strings.blob,
    };
    rkyv::to_bytes::<rkyv::rancor::Error>(&index).map_err(|e| IndexError::Build {
        layer: layer.to_string(),
        reason: e.to_string(),
    })
}

/// Write an index so that readers see either nothing or the whole file:
/// a temporary file in the same directory, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), IndexError> {
    let io = |source| IndexError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".index.tmp")
        .tempfile_in(dir)
        .map_err(io)?;
    tmp.write_all(bytes).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(())
}
