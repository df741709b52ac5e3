//! The checked, normalised file tree of a layer, built from its TOC JSON.
//!
//! [`Toc::build`] applies the reader rules of the reference implementation
//! (names cleaned of `./` and `/` prefixes, user and group names carried
//! forward per id, implicit parent directories, hardlinks sharing one node
//! whose attributes the last header naming it sets, as containerd's unpack
//! does, chunk sizes filled in, link counts computed) and rejects everything that a
//! hostile TOC could use against us: names that climb out of the root,
//! parents that are not directories, chunks that overlap, leave gaps, lie
//! outside the blob or claim more bytes than their compressed size can hold,
//! data without a digest to verify it, unknown entry types. Legacy stargz
//! files of several chunks without `chunkDigest`s become one chunk verified
//! against the whole-file digest.
//!
//! [`Toc::parse`] does the same while the JSON is parsed, one entry at a
//! time, which is how readers of a registry's TOCs use it: a base layer's
//! TOC never exists as parsed entries and as a tree at once.
//!
//! The result is the input of the TOC index (`stargaze-index`) and of every
//! consumer that needs file attributes or chunk locations.

use std::collections::{BTreeMap, HashMap};

use base64::Engine as _;

use crate::digest::Digest;
use crate::error::ErrorKind;
use crate::footer::{Compression, LayerFormat};
use crate::toc::{JsonEntry, JsonToc, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK};

pub type NodeId = u32;

/// Upper bound on a single file's size (1 PiB): larger claims are hostile.
pub const MAX_FILE_SIZE: u64 = 1 << 50;
/// Most bytes one byte of deflate output can expand to (RFC 1951 limit ~1032).
const GZIP_MAX_RATIO: u64 = 1032;
/// Most bytes one byte of zstd output can expand to (RLE blocks).
const ZSTD_MAX_RATIO: u64 = 32768;

/// File type of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeKind {
    Dir,
    Reg,
    Symlink,
    Char,
    Block,
    Fifo,
}

/// One piece of a regular file's data and where it lives in the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// Offset of the chunk within the file.
    pub file_offset: u64,
    /// Uncompressed length.
    pub size: u64,
    /// Start of the gzip member / zstd frame holding the chunk.
    pub compressed_offset: u64,
    /// Where the next member starts (fetch `compressed_offset..compressed_end`).
    pub compressed_end: u64,
    /// Uncompressed offset of the chunk inside its member.
    pub inner_offset: u64,
    /// sha256 of the chunk's uncompressed bytes.
    pub digest: Digest,
    /// containers/storage hole: the chunk is all zeros.
    pub zeros: bool,
}

/// A file, directory or special file (hardlinked names share one node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The first path under which the node appears (`""` for the root).
    pub path: String,
    pub kind: NodeKind,
    /// Permission bits plus setuid, setgid and sticky (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub user_name: String,
    pub group_name: String,
    /// Seconds since the epoch (0 when the TOC has none).
    pub mtime: i64,
    /// Nanoseconds of the mtime (a TOC's RFC 3339 time may have them).
    pub mtime_nsec: u32,
    /// File size for regular files; 0 otherwise.
    pub size: u64,
    /// Symlink target.
    pub link_target: String,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Whole-file digest when the TOC gives one.
    pub digest: Option<Digest>,
    /// Regular files: chunks in file order, contiguous, covering `size`.
    pub chunks: Vec<Chunk>,
    /// Names pointing at the node (files), or 2 + child directories (dirs).
    pub nlink: u32,
    /// Directories: child name → node, sorted by name.
    pub children: BTreeMap<String, NodeId>,
    /// Parent directory (the root is its own parent).
    pub parent: NodeId,
    /// The directory was not in the TOC but implied by a child's path.
    pub implicit: bool,
}

/// An empty directory: what a node's slot holds while the node is moved
/// out (allocates nothing).
impl Default for Node {
    fn default() -> Node {
        Node::new(NodeKind::Dir, 0)
    }
}

impl Node {
    fn new(kind: NodeKind, parent: NodeId) -> Node {
        Node {
            path: String::new(),
            kind,
            mode: if kind == NodeKind::Dir { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            user_name: String::new(),
            group_name: String::new(),
            mtime: 0,
            mtime_nsec: 0,
            size: 0,
            link_target: String::new(),
            dev_major: 0,
            dev_minor: 0,
            xattrs: BTreeMap::new(),
            digest: None,
            chunks: Vec::new(),
            nlink: 1,
            children: BTreeMap::new(),
            parent,
            implicit: false,
        }
    }

    /// Index of the chunk holding byte `offset` of the file.
    pub fn chunk_at(&self, offset: u64) -> Option<usize> {
        if offset >= self.size {
            return None;
        }
        match self.chunks.binary_search_by(|c| c.file_offset.cmp(&offset)) {
            Ok(i) => Some(i),
            Err(i) => i.checked_sub(1),
        }
    }
}

/// What the layer asks for at mount time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefetch {
    /// `.no.prefetch.landmark`: fetch nothing ahead.
    Disabled,
    /// `.prefetch.landmark`: the compressed range `0..offset` holds the
    /// files the workload reads first.
    UpTo(u64),
    /// No landmark: the configured prefetch size applies.
    Unspecified,
}

/// The file tree of one layer.
#[derive(Debug, Clone)]
pub struct Toc {
    /// Node 0 is the root; the rest in depth-first order by name.
    pub nodes: Vec<Node>,
    pub format: LayerFormat,
    /// End of the compressed file data.
    pub payload_end: u64,
    pub prefetch: Prefetch,
}

/// A chunk as its TOC entry gives it, checked when the tree is finished.
struct RawChunk {
    /// The file it belongs to; a file's chunks are consecutive.
    node: NodeId,
    chunk_offset: i64,
    chunk_size: i64,
    offset: i64,
    inner_offset: i64,
    end_offset: i64,
    /// `chunkDigest`, parsed at once (a string per chunk would double the
    /// builder's size); a bad one is reported when its chunk is checked.
    digest: Option<Result<Digest, String>>,
    zeros: bool,
}

impl RawChunk {
    fn new(node: NodeId, e: &JsonEntry) -> RawChunk {
        RawChunk {
            node,
            chunk_offset: e.chunk_offset,
            chunk_size: e.chunk_size,
            offset: e.offset,
            inner_offset: e.inner_offset,
            end_offset: e.end_offset,
            digest: (!e.chunk_digest.is_empty())
                .then(|| e.chunk_digest.parse().map_err(|err| format!("{err}"))),
            zeros: e.chunk_type == "zeros",
        }
    }
}

/// The tree as entries arrive, one at a time ([`Builder::add`]), so that a
/// TOC can be checked while it is parsed without holding all its entries.
struct Builder {
    nodes: Vec<Node>,
    /// In TOC order, so each file's chunks are one run.
    raw_chunks: Vec<RawChunk>,
    file_digests: HashMap<NodeId, String>,
    user_names: HashMap<u32, String>,
    group_names: HashMap<u32, String>,
    /// The regular file that `chunk` entries continue.
    current_file: Option<NodeId>,
}

/// Clean a TOC or tar name into a root-relative path without `.`, `..`,
/// empty components or leading/trailing slashes. Fails when `..` would
/// climb above the root or the name holds a NUL byte.
pub fn normalize_path(name: &str) -> Result<String, String> {
    if name.contains('\0') {
        return Err("name contains a NUL byte".into());
    }
    let mut parts: Vec<&str> = Vec::new();
    for comp in name.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err("path escapes the layer root through \"..\"".into());
                }
            }
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

/// Seconds and nanoseconds since the epoch of a TOC's RFC 3339 time.
fn parse_modtime(s: &str) -> Result<(i64, u32), String> {
    if s.is_empty() {
        return Ok((0, 0));
    }
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| (t.unix_timestamp(), t.nanosecond()))
        .map_err(|e| format!("modtime {s:?} is not RFC 3339: {e}"))
}

/// Format a time like the Go writer: UTC, RFC 3339, empty for 0; a
/// fraction of a second only when there is one (Go's and containers/
/// storage's readers parse it).
pub fn format_modtime(secs: i64, nsec: u32) -> String {
    if secs == 0 && nsec == 0 {
        return String::new();
    }
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.replace_nanosecond(nsec).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn parse_digest(entry: &str, what: &str, s: &str) -> Result<Digest, ErrorKind> {
    s.parse()
        .map_err(|e| ErrorKind::entry(entry, format!("{what}: {e}")))
}

fn nonneg(entry: &str, what: &str, v: i64) -> Result<u64, ErrorKind> {
    u64::try_from(v).map_err(|_| ErrorKind::entry(entry, format!("{what} is negative ({v})")))
}

fn id32(entry: &str, what: &str, v: i64) -> Result<u32, ErrorKind> {
    u32::try_from(v).map_err(|_| ErrorKind::entry(entry, format!("{what} {v} is out of range")))
}

impl Builder {
    fn child(&self, dir: NodeId, name: &str) -> Option<NodeId> {
        self.nodes[dir as usize].children.get(name).copied()
    }

    fn lookup(&self, path: &str) -> Option<NodeId> {
        if path.is_empty() {
            return Some(0);
        }
        let mut cur = 0;
        for comp in path.split('/') {
            if self.nodes[cur as usize].kind != NodeKind::Dir {
                return None;
            }
            cur = self.child(cur, comp)?;
        }
        Some(cur)
    }

    /// Find or create (as implicit directories) the parents of `path`;
    /// returns the parent directory and the base name.
    fn parent_of<'p>(&mut self, path: &'p str) -> Result<(NodeId, &'p str), ErrorKind> {
        let (dir, base) = match path.rsplit_once('/') {
            Some((d, b)) => (d, b),
            None => ("", path),
        };
        let mut cur: NodeId = 0;
        if !dir.is_empty() {
            for comp in dir.split('/') {
                cur = match self.child(cur, comp) {
                    Some(id) if self.nodes[id as usize].kind == NodeKind::Dir => id,
                    Some(_) => {
                        return Err(ErrorKind::entry(
                            path,
                            format!("parent component {comp:?} is not a directory"),
                        ));
                    }
                    None => {
                        let id = self.nodes.len() as NodeId;
                        let mut n = Node::new(NodeKind::Dir, cur);
                        n.implicit = true;
                        n.path = match self.nodes[cur as usize].path.as_str() {
                            "" => comp.to_string(),
                            p => format!("{p}/{comp}"),
                        };
                        self.nodes.push(n);
                        self.nodes[cur as usize]
                            .children
                            .insert(comp.to_string(), id);
                        id
                    }
                };
            }
        }
        Ok((cur, base))
    }

    fn add_node(&mut self, parent: NodeId, base: &str, node: Node) -> NodeId {
        let id = self.nodes.len() as NodeId;
        self.nodes.push(node);
        // A later entry with the same name replaces the earlier one, as when
        // the tar is extracted; the old node becomes unreachable.
        self.nodes[parent as usize]
            .children
            .insert(base.to_string(), id);
        id
    }

    fn fill_common(&mut self, e: &JsonEntry, node: &mut Node) -> Result<(), ErrorKind> {
        let name = e.name.as_str();
        let mode = nonneg(name, "mode", e.mode)?;
        node.mode = (mode & 0o7777) as u32;
        node.uid = id32(name, "uid", e.uid)?;
        node.gid = id32(name, "gid", e.gid)?;
        // Go elides user/group names equal to the previous one for the id.
        node.user_name = if e.user_name.is_empty() {
            self.user_names.get(&node.uid).cloned().unwrap_or_default()
        } else {
            self.user_names.insert(node.uid, e.user_name.clone());
            e.user_name.clone()
        };
        node.group_name = if e.group_name.is_empty() {
            self.group_names.get(&node.gid).cloned().unwrap_or_default()
        } else {
            self.group_names.insert(node.gid, e.group_name.clone());
            e.group_name.clone()
        };
        (node.mtime, node.mtime_nsec) =
            parse_modtime(&e.modtime).map_err(|r| ErrorKind::entry(name, r))?;
        for (k, v) in &e.xattrs {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(v)
                .map_err(|err| {
                    ErrorKind::entry(name, format!("xattr {k:?} is not base64: {err}"))
                })?;
            node.xattrs.insert(k.clone(), bytes);
        }
        Ok(())
    }
}

impl crate::toc::TocSink for Builder {
    fn entry(&mut self, entry: JsonEntry) -> Result<(), ErrorKind> {
        self.add(entry)
    }
}

impl Builder {
    fn new() -> Builder {
        let mut root = Node::new(NodeKind::Dir, 0);
        root.implicit = true;
        Builder {
            nodes: vec![root],
            raw_chunks: Vec::new(),
            file_digests: HashMap::new(),
            user_names: HashMap::new(),
            group_names: HashMap::new(),
            current_file: None,
        }
    }

    /// Take one TOC entry, in TOC order.
    fn add(&mut self, e: JsonEntry) -> Result<(), ErrorKind> {
        let b = self;
        let name = e.name.as_str();
        if e.kind == "chunk" {
            let Some(file) = b.current_file else {
                return Err(ErrorKind::entry(
                    name,
                    "\"chunk\" entry does not follow a regular file",
                ));
            };
            b.raw_chunks.push(RawChunk::new(file, &e));
            return Ok(());
        }
        b.current_file = None;
        let path = normalize_path(name).map_err(|r| ErrorKind::entry(name, r))?;
        let kind = match e.kind.as_str() {
            "dir" => NodeKind::Dir,
            "reg" => NodeKind::Reg,
            "symlink" => NodeKind::Symlink,
            "char" => NodeKind::Char,
            "block" => NodeKind::Block,
            "fifo" => NodeKind::Fifo,
            "hardlink" => {
                if path.is_empty() {
                    return Err(ErrorKind::entry(name, "the root cannot be a hardlink"));
                }
                let target = normalize_path(&e.link_name)
                    .map_err(|r| ErrorKind::entry(name, format!("hardlink target: {r}")))?;
                let Some(target_id) = b.lookup(&target) else {
                    return Err(ErrorKind::entry(
                        name,
                        format!("hardlink target {target:?} is not in the TOC before it"),
                    ));
                };
                if b.nodes[target_id as usize].kind == NodeKind::Dir {
                    return Err(ErrorKind::entry(name, "hardlink to a directory"));
                }
                let (parent, base) = b.parent_of(&path)?;
                b.nodes[parent as usize]
                    .children
                    .insert(base.to_string(), target_id);
                // containerd's applier (as Docker's) sets a hard link's
                // own header on the inode it shares: owner, xattrs
                // (added to the target's), mode and mtime. The last
                // header naming the inode wins.
                let mut target = std::mem::take(&mut b.nodes[target_id as usize]);
                let filled = b.fill_common(&e, &mut target);
                b.nodes[target_id as usize] = target;
                return filled;
            }
            other => {
                return Err(ErrorKind::entry(
                    name,
                    format!("unknown entry type {other:?}"),
                ));
            }
        };
        if path.is_empty() {
            if kind != NodeKind::Dir {
                return Err(ErrorKind::entry(name, "the root must be a directory"));
            }
            let mut root = std::mem::take(&mut b.nodes[0]);
            let filled = b.fill_common(&e, &mut root);
            root.implicit = false;
            b.nodes[0] = root;
            return filled;
        }
        let (parent, base) = b.parent_of(&path)?;
        if kind == NodeKind::Dir
            && let Some(existing) = b.child(parent, base)
            && b.nodes[existing as usize].kind == NodeKind::Dir
        {
            // A directory seen again (or implied earlier): update it in place.
            let mut dir = std::mem::take(&mut b.nodes[existing as usize]);
            let filled = b.fill_common(&e, &mut dir);
            dir.implicit = false;
            b.nodes[existing as usize] = dir;
            return filled;
        }
        let mut node = Node::new(kind, parent);
        node.path = path.clone();
        b.fill_common(&e, &mut node)?;
        match kind {
            NodeKind::Reg => {
                node.size = nonneg(name, "size", e.size)?;
                if node.size > MAX_FILE_SIZE {
                    return Err(ErrorKind::entry(
                        name,
                        format!("absurd file size {}", node.size),
                    ));
                }
            }
            NodeKind::Symlink => {
                if e.link_name.is_empty() {
                    return Err(ErrorKind::entry(name, "symlink without a target"));
                }
                node.link_target = e.link_name.clone();
            }
            NodeKind::Char | NodeKind::Block => {
                node.dev_major = id32(name, "devMajor", e.dev_major)?;
                node.dev_minor = id32(name, "devMinor", e.dev_minor)?;
            }
            _ => {}
        }
        let id = b.add_node(parent, base, node);
        if kind == NodeKind::Reg {
            if e.size > 0 {
                b.raw_chunks.push(RawChunk::new(id, &e));
            }
            if !e.digest.is_empty() {
                b.file_digests.insert(id, e.digest);
            }
            b.current_file = Some(id);
        }
        Ok(())
    }

    /// Fill in chunk extents, check them against each other and the blob,
    /// and lay the reachable nodes out depth first.
    fn finish(self, format: LayerFormat, payload_end: u64) -> Result<Toc, ErrorKind> {
        let b = self;
        let compression = format.compression();
        let mut nodes = b.nodes;
        for (id, d) in &b.file_digests {
            let node = &mut nodes[*id as usize];
            node.digest = Some(parse_digest(&node.path, "digest", d)?);
        }
        // Chunks are filled in for every node, reachable or not, so that a
        // hostile unreachable entry cannot hide overlapping ranges either.
        let mut member_offsets: Vec<u64> = Vec::new();
        let legacy = format == LayerFormat::LegacyStargz;
        let files = || b.raw_chunks.chunk_by(|a, b| a.node == b.node);
        for raws in files() {
            let node = &mut nodes[raws[0].node as usize];
            node.chunks = chunks_of(node, raws, payload_end, legacy)?;
            member_offsets.extend(node.chunks.iter().map(|c| c.compressed_offset));
        }
        member_offsets.sort_unstable();
        member_offsets.dedup();
        let mut by_member: BTreeMap<u64, Vec<(u64, u64, NodeId)>> = BTreeMap::new();
        for raws in files() {
            let id = raws[0].node;
            let last = &raws[raws.len() - 1];
            let end_hint = (last.end_offset > 0).then_some(last.end_offset as u64);
            let node = &mut nodes[id as usize];
            let nchunks = node.chunks.len();
            for (i, c) in node.chunks.iter_mut().enumerate() {
                let next = match member_offsets.binary_search(&c.compressed_offset) {
                    Ok(i) => member_offsets.get(i + 1).copied().unwrap_or(payload_end),
                    Err(_) => unreachable!("every chunk offset is in the list"),
                };
                c.compressed_end = next;
                if i + 1 == nchunks
                    && let Some(end) = end_hint
                    && end > c.compressed_offset
                    && end <= next
                {
                    c.compressed_end = end;
                }
                by_member.entry(c.compressed_offset).or_default().push((
                    c.inner_offset,
                    c.size,
                    id,
                ));
            }
        }
        // Chunks sharing a member must not overlap, and a member cannot hold
        // more than its compressed size could expand to.
        let ratio = match compression {
            Compression::Gzip => GZIP_MAX_RATIO,
            Compression::Zstd => ZSTD_MAX_RATIO,
        };
        for (offset, mut list) in by_member {
            list.sort_unstable();
            for w in list.windows(2) {
                if w[0].0 + w[0].1 > w[1].0 {
                    let a = &nodes[w[0].2 as usize];
                    let b2 = &nodes[w[1].2 as usize];
                    return Err(ErrorKind::entry(
                        b2.path_hint(),
                        format!(
                            "its data overlaps that of {:?} in the member at offset {offset}",
                            a.path_hint()
                        ),
                    ));
                }
            }
            let (inner, size, id) = *list.last().expect("non-empty");
            let member_end = member_offsets
                .binary_search(&offset)
                .ok()
                .and_then(|i| member_offsets.get(i + 1).copied())
                .unwrap_or(payload_end);
            let compressed = member_end - offset;
            if inner + size > compressed.saturating_mul(ratio) + (1 << 20) {
                return Err(ErrorKind::entry(
                    nodes[id as usize].path_hint(),
                    format!(
                        "claims {} uncompressed bytes from a {compressed}-byte member at offset {offset} (decompression bomb or lying TOC)",
                        inner + size
                    ),
                ));
            }
        }
        if legacy {
            for raws in files() {
                if raws.len() > 1 && raws.iter().any(|r| r.digest.is_none()) {
                    merge_unverified_chunks(&mut nodes[raws[0].node as usize])?;
                }
            }
        }
        let toc = compact(nodes, format, payload_end);
        Ok(toc)
    }
}

impl Toc {
    /// Check and normalise a parsed TOC. `payload_end` is where file data
    /// ends in the blob (the TOC offset, or the footer for external TOCs).
    pub fn build(json: &JsonToc, format: LayerFormat, payload_end: u64) -> Result<Toc, ErrorKind> {
        Toc::build_entries(&json.entries, format, payload_end)
    }

    /// [`Toc::build`] of entries the caller keeps (each is copied as it is
    /// added, one at a time).
    pub fn build_entries(
        entries: &[JsonEntry],
        format: LayerFormat,
        payload_end: u64,
    ) -> Result<Toc, ErrorKind> {
        let mut b = Builder::new();
        for e in entries {
            b.add(e.clone())?;
        }
        b.finish(format, payload_end)
    }

    /// [`JsonToc::parse`] and [`Toc::build`] in one pass over the JSON:
    /// each entry is checked and added as it is parsed and then dropped, so
    /// the whole TOC never exists twice in memory (a base layer's TOC as
    /// parsed entries takes about twice its JSON).
    pub fn parse(json: &[u8], format: LayerFormat, payload_end: u64) -> Result<Toc, ErrorKind> {
        let b = crate::toc::parse_entries(json, Builder::new())?;
        b.finish(format, payload_end)
    }

    pub fn root(&self) -> &Node {
        &self.nodes[0]
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize]
    }

    /// Node at a path (normalised like TOC names).
    pub fn lookup(&self, path: &str) -> Option<NodeId> {
        let path = normalize_path(path).ok()?;
        if path.is_empty() {
            return Some(0);
        }
        let mut cur = 0u32;
        for comp in path.split('/') {
            cur = *self.nodes[cur as usize].children.get(comp)?;
        }
        Some(cur)
    }

    /// Every name in the tree (hardlinks appear once per name), depth first.
    pub fn walk(&self) -> Vec<(String, NodeId)> {
        let mut out = Vec::with_capacity(self.nodes.len());
        let mut stack: Vec<(String, NodeId)> = vec![(String::new(), 0)];
        while let Some((path, id)) = stack.pop() {
            let node = &self.nodes[id as usize];
            for (name, child) in node.children.iter().rev() {
                let p = if path.is_empty() {
                    name.clone()
                } else {
                    format!("{path}/{name}")
                };
                stack.push((p, *child));
            }
            out.push((path, id));
        }
        out
    }

    /// Sum of regular file sizes (each node once).
    pub fn total_file_bytes(&self) -> u64 {
        self.nodes
            .iter()
            .filter(|n| n.kind == NodeKind::Reg)
            .map(|n| n.size)
            .sum()
    }
}

impl Node {
    fn path_hint(&self) -> String {
        if self.path.is_empty() {
            format!("<{:?} node>", self.kind)
        } else {
            self.path.clone()
        }
    }
}

/// `whole_file_verified`: chunks without a `chunkDigest` are verified by the
/// file's digest (legacy stargz, see [`merge_unverified_chunks`]).
fn chunks_of(
    node: &Node,
    raws: &[RawChunk],
    payload_end: u64,
    whole_file_verified: bool,
) -> Result<Vec<Chunk>, ErrorKind> {
    let label = node.path_hint();
    let size = node.size;
    let mut out = Vec::with_capacity(raws.len());
    for (i, r) in raws.iter().enumerate() {
        let chunk_offset = nonneg(&label, "chunkOffset", r.chunk_offset)?;
        let expected = out
            .last()
            .map(|c: &Chunk| c.file_offset + c.size)
            .unwrap_or(0);
        if chunk_offset != expected {
            return Err(ErrorKind::chunk(
                &label,
                chunk_offset,
                if chunk_offset < expected {
                    format!("duplicate or overlapping chunk (previous chunk ends at {expected})")
                } else {
                    format!("gap in the file data (previous chunk ends at {expected})")
                },
            ));
        }
        let declared = nonneg(&label, "chunkSize", r.chunk_size)?;
        let chunk_size = if declared > 0 {
            declared
        } else {
            match raws.get(i + 1) {
                Some(next) => nonneg(&label, "chunkOffset", next.chunk_offset)?
                    .checked_sub(chunk_offset)
                    .ok_or_else(|| ErrorKind::chunk(&label, chunk_offset, "chunks out of order"))?,
                None => size.saturating_sub(chunk_offset),
            }
        };
        if chunk_size == 0 {
            return Err(ErrorKind::chunk(&label, chunk_offset, "empty chunk"));
        }
        if chunk_offset + chunk_size > size {
            return Err(ErrorKind::chunk(
                &label,
                chunk_offset,
                format!("chunk of {chunk_size} bytes runs past the file size {size}"),
            ));
        }
        let offset = nonneg(&label, "offset", r.offset)?;
        let inner = nonneg(&label, "innerOffset", r.inner_offset)?;
        if offset >= payload_end {
            return Err(ErrorKind::chunk(
                &label,
                chunk_offset,
                format!(
                    "compressed offset {offset} is outside the data area (ends at {payload_end})"
                ),
            ));
        }
        let digest = if let Some(parsed) = &r.digest {
            match parsed {
                Ok(d) => *d,
                Err(e) => return Err(ErrorKind::entry(&label, format!("chunkDigest: {e}"))),
            }
        } else if (raws.len() == 1 || whole_file_verified)
            && let Some(d) = node.digest
        {
            // The whole file's digest: for several chunks a placeholder
            // until `merge_unverified_chunks` makes them one.
            d
        } else {
            return Err(ErrorKind::chunk(
                &label,
                chunk_offset,
                "no chunkDigest (and no file digest for an unchunked file): the data cannot be verified",
            ));
        };
        out.push(Chunk {
            file_offset: chunk_offset,
            size: chunk_size,
            compressed_offset: offset,
            compressed_end: payload_end,
            inner_offset: inner,
            digest,
            zeros: r.zeros,
        });
    }
    let covered = out.last().map(|c| c.file_offset + c.size).unwrap_or(0);
    if covered != size {
        return Err(ErrorKind::chunk(
            &label,
            covered,
            format!("chunks cover {covered} bytes of a {size}-byte file"),
        ));
    }
    // One chunk is the whole file: its digest is the file's. A TOC that
    // says otherwise claims a file digest its bytes cannot have (the way to
    // pass another image's file off as this one's).
    if let ([only], Some(file_digest)) = (out.as_slice(), node.digest)
        && !only.zeros
        && only.digest != file_digest
    {
        return Err(ErrorKind::entry(
            &label,
            format!(
                "its one chunk hashes to {} but the TOC gives the file digest {file_digest}: the TOC contradicts itself",
                only.digest
            ),
        ));
    }
    Ok(out)
}

/// Legacy stargz (the CRFS writer) gives a file of several chunks a
/// whole-file `digest` but no `chunkDigest`s: no chunk can be verified on
/// its own, so the file becomes one chunk from its first member to the end
/// of its last, decoded as one multi-member stream and checked against the
/// file digest before any byte is used. Each chunk starts a new member and
/// a file's bytes are contiguous in the tar stream, so the members hold
/// exactly the file's bytes in order (a TOC that says otherwise fails
/// verification). Reads of such a file fetch all of it.
fn merge_unverified_chunks(node: &mut Node) -> Result<(), ErrorKind> {
    let label = node.path_hint();
    let digest = node.digest.ok_or_else(|| {
        ErrorKind::entry(
            &label,
            "no chunkDigest and no file digest: the data cannot be verified",
        )
    })?;
    let in_blob_order = node
        .chunks
        .windows(2)
        .all(|w| w[0].compressed_offset < w[1].compressed_offset);
    let (Some(first), Some(last)) = (node.chunks.first(), node.chunks.last()) else {
        return Ok(());
    };
    if !in_blob_order || last.compressed_end <= first.compressed_offset {
        return Err(ErrorKind::entry(
            &label,
            "its chunks (without chunkDigest) are not in blob order: the file cannot be verified whole",
        ));
    }
    node.chunks = vec![Chunk {
        file_offset: 0,
        size: node.size,
        compressed_offset: first.compressed_offset,
        compressed_end: last.compressed_end,
        inner_offset: first.inner_offset,
        digest,
        zeros: false,
    }];
    Ok(())
}

/// Drop unreachable nodes, renumber depth first, set paths and link counts.
fn compact(mut nodes: Vec<Node>, format: LayerFormat, payload_end: u64) -> Toc {
    let mut new_id: Vec<Option<NodeId>> = vec![None; nodes.len()];
    let mut order: Vec<(NodeId, String)> = Vec::new();
    let mut stack: Vec<(NodeId, String)> = vec![(0, String::new())];
    let mut names: Vec<u32> = vec![0; nodes.len()];
    while let Some((old, path)) = stack.pop() {
        names[old as usize] += 1;
        if new_id[old as usize].is_some() {
            continue; // another name of a hardlinked file
        }
        new_id[old as usize] = Some(order.len() as NodeId);
        let node = &nodes[old as usize];
        for (name, child) in node.children.iter().rev() {
            let p = if path.is_empty() {
                name.clone()
            } else {
                format!("{path}/{name}")
            };
            stack.push((*child, p));
        }
        order.push((old, path));
    }
    // Nodes are permuted into their new places in the same vector rather
    // than copied into a new one: a base layer's tree is megabytes.
    let reachable = order.len();
    let mut unreachable = reachable as NodeId;
    let mut place: Vec<NodeId> = new_id
        .iter()
        .map(|id| {
            id.unwrap_or_else(|| {
                unreachable += 1;
                unreachable - 1
            })
        })
        .collect();
    for (old, n) in nodes.iter_mut().enumerate() {
        n.nlink = names[old];
        n.parent = new_id[n.parent as usize].unwrap_or(0);
        if new_id[old].is_some() {
            for child in n.children.values_mut() {
                *child = new_id[*child as usize].expect("children are reachable");
            }
        }
    }
    for i in 0..nodes.len() {
        while place[i] as usize != i {
            let to = place[i] as usize;
            nodes.swap(i, to);
            place.swap(i, to);
        }
    }
    nodes.truncate(reachable);
    for (n, (_, path)) in nodes.iter_mut().zip(order) {
        n.path = path;
    }
    let mut out = nodes;
    // Directories: 2 (".", its name) plus one ".." per child directory.
    let subdirs: Vec<u32> = out
        .iter()
        .map(|n| {
            n.children
                .values()
                .filter(|&&c| out[c as usize].kind == NodeKind::Dir)
                .count() as u32
        })
        .collect();
    for (n, s) in out.iter_mut().zip(subdirs) {
        if n.kind == NodeKind::Dir {
            n.nlink = 2 + s;
        }
    }
    // The root is reached once without a name; parents of the root: itself.
    out[0].parent = 0;

    let prefetch = if out[0].children.contains_key(NO_PREFETCH_LANDMARK) {
        Prefetch::Disabled
    } else if let Some(&id) = out[0].children.get(PREFETCH_LANDMARK) {
        match out[id as usize].chunks.first() {
            Some(c) => Prefetch::UpTo(c.compressed_offset),
            None => Prefetch::Unspecified,
        }
    } else {
        Prefetch::Unspecified
    };
    Toc {
        nodes: out,
        format,
        payload_end,
        prefetch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, kind: &str) -> JsonEntry {
        JsonEntry {
            name: name.into(),
            kind: kind.into(),
            ..Default::default()
        }
    }

    fn reg(name: &str, size: i64, offset: i64) -> JsonEntry {
        JsonEntry {
            size,
            offset,
            digest: Digest::of(name.as_bytes()).to_string(),
            chunk_digest: Digest::of(name.as_bytes()).to_string(),
            ..entry(name, "reg")
        }
    }

    /// The tree by both paths, which must agree: parse then build, and the
    /// one-pass parse of the same TOC as JSON.
    fn build(entries: Vec<JsonEntry>) -> Result<Toc, ErrorKind> {
        let json = JsonToc {
            version: 1,
            entries,
            ..Default::default()
        };
        let built = Toc::build(&json, LayerFormat::Estargz, 1 << 20);
        let parsed = Toc::parse(&json.to_json(), LayerFormat::Estargz, 1 << 20);
        assert_eq!(format!("{built:?}"), format!("{parsed:?}"));
        built
    }

    fn parse_json(json: &str) -> Result<Toc, ErrorKind> {
        Toc::parse(json.as_bytes(), LayerFormat::Estargz, 1 << 20)
    }

    #[test]
    fn the_one_pass_parse_rejects_what_parse_then_build_rejects() {
        let ok = r#"{"version":1,"entries":[{"name":"a","type":"dir"}]}"#;
        assert!(parse_json(ok).is_ok());
        let key_order = r#"{"entries":[{"name":"a","type":"dir"}],"NumLink":3,"version":1}"#;
        assert!(parse_json(key_order).is_ok());
        for (bad, why) in [
            (r#"{"version":2,"entries":[]}"#, "version 2"),
            (r#"{"entries":[]}"#, "version 0"),
            (r#"{"version":1,"entries":[]} x"#, "trailing"),
            (
                r#"{"version":1,"entries":[],"entries":[]}"#,
                "duplicate field",
            ),
            (
                r#"{"version":1,"version":1,"entries":[]}"#,
                "duplicate field",
            ),
            (r#"{"version":1,"entries":null}"#, "null"),
            (r#"[1,[]]"#, "expected a TOC object"),
            (
                r#"{"version":1,"entries":[{"type":"reg"}]}"#,
                "missing field `name`",
            ),
            (
                r#"{"version":1,"tarSplitDigest":5,"entries":[]}"#,
                "invalid type",
            ),
            ("not json", "expected"),
        ] {
            let err = parse_json(bad).expect_err(bad);
            assert!(matches!(err, ErrorKind::TocJson(_)), "{bad}: {err:?}");
            assert!(err.to_string().contains(why), "{bad}: {err}");
            assert!(!err.to_string().contains("rejected"), "{bad}: {err}");
        }
        // An entry's own error is the one reported, as by `build`.
        let err = parse_json(r#"{"version":1,"entries":[{"name":"../x","type":"reg"}]}"#)
            .expect_err("escape");
        assert!(err.to_string().contains("escapes"), "{err}");
    }

    #[test]
    fn normalises_names_and_rejects_escapes() {
        assert_eq!(normalize_path("./a//b/").unwrap(), "a/b");
        assert_eq!(normalize_path("/a/./b/../c").unwrap(), "a/c");
        assert_eq!(normalize_path("./").unwrap(), "");
        assert!(normalize_path("../etc/passwd").is_err());
        assert!(normalize_path("a/../../b").is_err());
        assert!(normalize_path("a\0b").is_err());
    }

    #[test]
    fn link_counts_follow_the_reference_vector() {
        let toc = build(vec![
            entry("bar/", "dir"),
            entry("foo/", "dir"),
            entry("foo/bar/", "dir"),
        ])
        .unwrap();
        let n = |p: &str| toc.node(toc.lookup(p).unwrap()).nlink;
        assert_eq!((n("bar"), n("foo"), n("foo/bar")), (2, 3, 2));
    }

    #[test]
    fn implicit_parents_and_hardlinks_share_nodes() {
        let mut link = entry("x/link", "hardlink");
        link.link_name = "./a/b/file".into();
        let toc = build(vec![reg("a/b/file", 10, 100), link]).unwrap();
        let a = toc.lookup("a/b/file").unwrap();
        let b = toc.lookup("x/link").unwrap();
        assert_eq!(a, b);
        assert_eq!(toc.node(a).nlink, 2);
        assert!(toc.node(toc.lookup("a").unwrap()).implicit);
        assert_eq!(toc.node(toc.lookup("x").unwrap()).mode, 0o755);
    }

    #[test]
    fn a_hard_links_own_header_is_the_inodes_as_containerd_unpacks_it() {
        let mut file = reg("a/file", 10, 100);
        file.mode = 0o644;
        file.modtime = "2022-04-15T05:20:00Z".into();
        file.xattrs = [("user.a".to_string(), "YQ==".to_string())].into();
        let mut link = entry("b/link", "hardlink");
        link.link_name = "a/file".into();
        link.mode = 0o4750;
        (link.uid, link.gid) = (7, 8);
        link.modtime = "2017-07-14T02:40:00Z".into();
        link.xattrs = [
            ("user.a".to_string(), "QQ==".to_string()),
            ("user.b".to_string(), "Yg==".to_string()),
        ]
        .into();
        let toc = build(vec![file, link]).unwrap();
        let n = toc.node(toc.lookup("a/file").unwrap());
        assert_eq!(
            (n.mode, n.uid, n.gid, n.mtime),
            (0o4750, 7, 8, 1_500_000_000)
        );
        let xattrs: Vec<(&str, &[u8])> = n
            .xattrs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        assert_eq!(xattrs, [("user.a", &b"A"[..]), ("user.b", &b"b"[..])]);
        assert_eq!(toc.lookup("b/link"), toc.lookup("a/file"));
    }

    #[test]
    fn user_names_carry_forward() {
        let mut a = entry("a", "dir");
        a.uid = 5;
        a.user_name = "five".into();
        let mut b = entry("b", "dir");
        b.uid = 5;
        let toc = build(vec![a, b]).unwrap();
        assert_eq!(toc.node(toc.lookup("b").unwrap()).user_name, "five");
    }

    #[test]
    fn a_one_chunk_file_whose_chunk_digest_is_not_its_digest_is_refused() {
        let mut f = reg("etc/b.txt", 6, 100);
        f.digest = Digest::of(b"AAAAAA").to_string();
        f.chunk_digest = Digest::of(b"BBBBBB").to_string();
        let err = build(vec![f.clone()]).unwrap_err().to_string();
        assert!(
            err.contains("etc/b.txt") && err.contains("contradicts"),
            "{err}"
        );
        f.chunk_digest = f.digest.clone();
        assert!(build(vec![f]).is_ok());
    }

    #[test]
    fn chunk_rules() {
        let mut f = reg("f", 10, 100);
        f.chunk_size = 4;
        f.chunk_digest = Digest::of(b"1").to_string();
        let mut c2 = entry("f", "chunk");
        c2.offset = 200;
        c2.chunk_offset = 4;
        c2.chunk_digest = Digest::of(b"2").to_string();
        let toc = build(vec![f.clone(), c2.clone()]).unwrap();
        let node = toc.node(toc.lookup("f").unwrap());
        assert_eq!(node.chunks.len(), 2);
        assert_eq!(node.chunks[1].size, 6);
        assert_eq!(node.chunks[0].compressed_end, 200);
        assert_eq!(node.chunk_at(5), Some(1));

        // duplicate chunk offset
        let mut dup = c2.clone();
        dup.chunk_offset = 0;
        assert!(build(vec![f.clone(), dup]).is_err());
        // gap
        let mut gap = c2.clone();
        gap.chunk_offset = 6;
        assert!(build(vec![f.clone(), gap]).is_err());
        // offset outside the blob
        let mut far = c2.clone();
        far.offset = 1 << 30;
        assert!(build(vec![f.clone(), far]).is_err());
        // chunk without digest in a chunked file
        let mut nodig = c2;
        nodig.chunk_digest.clear();
        assert!(build(vec![f, nodig]).is_err());
    }

    #[test]
    fn legacy_files_without_chunk_digests_are_one_chunk_verified_whole() {
        // As the CRFS writer wrote them: a file digest, no chunkDigest.
        let mut f = reg("f", 10, 100);
        f.chunk_size = 4;
        f.chunk_digest.clear();
        let mut c2 = entry("f", "chunk");
        c2.offset = 200;
        c2.chunk_offset = 4;
        c2.chunk_size = 4;
        let mut c3 = entry("f", "chunk");
        c3.offset = 300;
        c3.chunk_offset = 8;
        let next = reg("g", 1, 400);
        let legacy = |entries: Vec<JsonEntry>| {
            Toc::build(
                &JsonToc {
                    version: 1,
                    entries,
                    ..Default::default()
                },
                LayerFormat::LegacyStargz,
                1 << 20,
            )
        };
        let toc = legacy(vec![f.clone(), c2.clone(), c3.clone(), next.clone()]).unwrap();
        let node = toc.node(toc.lookup("f").unwrap());
        assert_eq!(
            node.chunks,
            [Chunk {
                file_offset: 0,
                size: 10,
                compressed_offset: 100,
                compressed_end: 400,
                inner_offset: 0,
                digest: Digest::of(b"f"),
                zeros: false,
            }]
        );
        // eStargz requires chunk digests.
        assert!(build(vec![f.clone(), c2.clone(), c3.clone()]).is_err());
        // Without a file digest nothing verifies the data.
        let mut nodigest = f.clone();
        nodigest.digest.clear();
        assert!(legacy(vec![nodigest, c2.clone(), c3.clone()]).is_err());
        // Chunks that go backwards in the blob cannot be one stream.
        let mut back = c3.clone();
        back.offset = 50;
        assert!(legacy(vec![f, c2, back]).is_err());
    }

    #[test]
    fn hostile_entries_are_rejected() {
        assert!(build(vec![entry("../x", "dir")]).is_err());
        assert!(build(vec![entry("x", "socket")]).is_err());
        assert!(build(vec![entry("x", "chunk")]).is_err());
        let mut neg = reg("x", -5, 1);
        neg.size = -5;
        assert!(build(vec![neg]).is_err());
        // parent is a file
        assert!(build(vec![reg("f", 1, 100), entry("f/x", "dir")]).is_err());
        // overlapping files in one member
        let mut b = reg("b", 10, 100);
        b.inner_offset = 5;
        assert!(build(vec![reg("a", 10, 100), b]).is_err());
        // bomb: 1 GiB from a 10-byte member
        let mut bomb = reg("bomb", 1 << 30, 100);
        bomb.chunk_size = 0;
        let bad = Toc::build(
            &JsonToc {
                version: 1,
                entries: vec![bomb],
                ..Default::default()
            },
            LayerFormat::Estargz,
            110,
        );
        assert!(bad.is_err());
        // hardlink to a missing target
        let mut l = entry("l", "hardlink");
        l.link_name = "nope".into();
        assert!(build(vec![l]).is_err());
    }

    #[test]
    fn later_entries_replace_earlier_ones() {
        let toc = build(vec![
            reg("f", 3, 100),
            entry("f", "dir"),
            entry("f/x", "fifo"),
        ])
        .unwrap();
        let f = toc.node(toc.lookup("f").unwrap());
        assert_eq!(f.kind, NodeKind::Dir);
        assert_eq!(toc.nodes.len(), 3);
    }

    #[test]
    fn landmarks_set_prefetch() {
        let toc = build(vec![reg(PREFETCH_LANDMARK, 1, 500)]).unwrap();
        assert_eq!(toc.prefetch, Prefetch::UpTo(500));
        let toc = build(vec![reg(NO_PREFETCH_LANDMARK, 1, 500)]).unwrap();
        assert_eq!(toc.prefetch, Prefetch::Disabled);
    }

    #[test]
    fn modtime_round_trip() {
        for t in [
            (1_600_000_000, 0),
            (1_650_000_000, 123_456_789),
            (-86_400, 5),
            (0, 1),
        ] {
            assert_eq!(parse_modtime(&format_modtime(t.0, t.1)).unwrap(), t);
        }
        // Whole seconds look as the Go writer writes them.
        assert_eq!(format_modtime(1_600_000_000, 0), "2020-09-13T12:26:40Z");
        assert_eq!(
            format_modtime(1_650_000_000, 500_000_000),
            "2022-04-15T05:20:00.5Z"
        );
        assert_eq!(format_modtime(0, 0), "");
        assert!(parse_modtime("yesterday").is_err());
        // containers/storage writes nanoseconds.
        assert_eq!(
            parse_modtime("2022-04-15T05:20:00.25Z").unwrap(),
            (1_650_000_000, 250_000_000)
        );
    }
}
