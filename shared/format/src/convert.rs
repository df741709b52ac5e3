//! Converting a tar layer into eStargz or zstd:chunked.
//!
//! The work happens in three stages:
//!
//! 1. **Plan** (sequential, cheap): parse the tar ([`crate::tar`]), choose the
//!    entry order (landmark, prioritized files first, duplicates dropped) and
//!    cut the output into members: a new gzip member / zstd frame starts at
//!    every payload chunk (or, with `min_chunk_size`, once the current member
//!    holds that many bytes). Tar headers and padding are copied verbatim
//!    into the member that is open, exactly as the Go writer places them.
//!    The TOC entries are built here, with member numbers in place of offsets.
//! 2. **Compress** (parallel): members are compressed independently on a
//!    rayon pool in windows, with libdeflate or zstd. Member boundaries never
//!    depend on the thread count, so the output is byte-for-byte the same on
//!    any machine for the same input and options.
//! 3. **Write** (one thread): compressed members are written in order while
//!    the uncompressed bytes are hashed into the diffID; then the TOC (a gzip
//!    member with a tar entry, a zstd skippable frame, or a separate TOC blob)
//!    and the footer.
//!
//! `keep_diff_id` (only with `external_toc`) copies the input tar byte for
//! byte, in order, with its end-of-archive blocks, so the uncompressed blob is
//! the input and the diffID does not change.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::ops::Range;
use std::path::Path;

use base64::Engine as _;

use crate::digest::{Digest, Hasher, HashingWriter};
use crate::error::{Error, ErrorKind, Result};
use crate::footer::{Footer, SKIPPABLE_HEADER_SIZE, skippable_header};
use crate::tar::{BLOCK, TarEntry, TarKind, TarReader, ustar_header};
use crate::toc::{
    JsonEntry, JsonToc, LANDMARK_CONTENTS, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME,
};
use crate::tree::{format_modtime, normalize_path};

pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;
/// libdeflate level used for eStargz when none is given. Level 6 output is
/// within about 1 % of Go's `gzip.BestCompression` (what ctr-remote uses) at
/// three times the speed of level 9; `bench/convert.sh` measures both.
pub const DEFAULT_GZIP_LEVEL: i32 = 6;
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;
/// Uncompressed bytes compressed per parallel window. What the converter
/// holds is about two windows of mapped input (one compressed, one being
/// hashed by the writer) and up to three of compressed output.
const WINDOW_BYTES: usize = 32 << 20;

/// Output format of a conversion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetFormat {
    Estargz,
    ZstdChunked,
}

/// Options of [`convert`], named after `nerdctl image convert` flags.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    pub format: TargetFormat,
    /// Largest uncompressed chunk of a file (`--estargz-chunk-size`).
    pub chunk_size: u64,
    /// Do not start a new member before the current one holds this many
    /// uncompressed bytes (`--estargz-min-chunk-size`; 0 = one member per
    /// chunk). The Go writer counts compressed bytes; we count uncompressed
    /// ones so that compression can run in parallel deterministically.
    pub min_chunk_size: u64,
    /// Files the workload reads first (`--estargz-record-in`). `None` or
    /// empty: the layer gets `.no.prefetch.landmark`.
    pub prioritized_files: Option<Vec<String>>,
    /// Put the TOC into a separate blob (`--estargz-external-toc`).
    pub external_toc: bool,
    /// Keep the input tar byte for byte (`--estargz-keep-diff-id`).
    pub keep_diff_id: bool,
    /// gzip: libdeflate level 1..=12; zstd: 1..=22.
    pub level: Option<i32>,
    /// Compression threads; 0 = all cores.
    pub threads: usize,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            format: TargetFormat::Estargz,
            chunk_size: DEFAULT_CHUNK_SIZE,
            min_chunk_size: 0,
            prioritized_files: None,
            external_toc: false,
            keep_diff_id: false,
            level: None,
            threads: 0,
        }
    }
}

/// The TOC blob of an external-TOC layer (a layer of the `-esgztoc` image).
#[derive(Debug, Clone)]
pub struct ExternalTocBlob {
    pub bytes: Vec<u8>,
    pub digest: Digest,
    pub diff_id: Digest,
}

/// What a conversion produced.
#[derive(Debug, Clone)]
pub struct ConvertedLayer {
    /// Digest and size of the written blob.
    pub digest: Digest,
    pub size: u64,
    /// sha256 of the uncompressed blob, and its length
    /// (`io.containers.estargz.uncompressed-size`).
    pub diff_id: Digest,
    pub uncompressed_size: u64,
    pub toc_digest: Digest,
    pub external_toc: Option<ExternalTocBlob>,
    /// zstd:chunked: (`manifest-checksum`, `manifest-position`) annotation values.
    pub zstd_manifest: Option<(Digest, String)>,
    /// Number of TOC entries written.
    pub toc_entries: usize,
    /// Prioritized files that were not in the layer.
    pub missing_prioritized: Vec<String>,
}

/// A member's uncompressed bytes (hashed into the diffID) and its compressed form.
/// A window's members compressed, in order; the index range of the members.
type CompressedWindow = (Range<usize>, Vec<Vec<u8>>);

/// Progress while compressing: (uncompressed input bytes done, total).
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

enum Piece {
    Input(Range<usize>),
    Owned(Vec<u8>),
}

#[derive(Default)]
struct MemberPlan {
    pieces: Vec<Piece>,
    len: u64,
}

impl MemberPlan {
    fn push_input(&mut self, r: Range<usize>) {
        if r.is_empty() {
            return;
        }
        self.len += r.len() as u64;
        if let Some(Piece::Input(last)) = self.pieces.last_mut()
            && last.end == r.start
        {
            last.end = r.end;
            return;
        }
        self.pieces.push(Piece::Input(r));
    }

    fn push_owned(&mut self, b: Vec<u8>) {
        self.len += b.len() as u64;
        self.pieces.push(Piece::Owned(b));
    }

    fn gather(&self, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len as usize);
        for p in &self.pieces {
            match p {
                Piece::Input(r) => out.extend_from_slice(&input[r.clone()]),
                Piece::Owned(b) => out.extend_from_slice(b),
            }
        }
        out
    }
}

/// An entry of the output stream.
enum Item<'a> {
    Tar(&'a TarEntry),
    Landmark(&'static str),
}

/// Called when the input read so far may leave memory (see
/// [`convert_file`]); a no-op for input that is memory anyway.
type Release<'a> = &'a (dyn Fn() + Sync);

struct Planner<'a> {
    input: &'a [u8],
    opts: &'a ConvertOptions,
    release: Release<'a>,
    /// Input bytes hashed since `release` was last called.
    hashed: usize,
    members: Vec<MemberPlan>,
    current: MemberPlan,
    entries: Vec<JsonEntry>,
    /// (TOC entry index, member index) whose `offset` is filled in later.
    offsets: Vec<(usize, usize)>,
    uids: HashMap<u64, String>,
    gids: HashMap<u64, String>,
}

impl<'a> Planner<'a> {
    fn cut(&mut self) {
        if self.current.len > 0 {
            self.members.push(std::mem::take(&mut self.current));
        }
    }

    fn name_if_changed(map: &mut HashMap<u64, String>, id: u64, name: &str) -> String {
        if name.is_empty() || map.get(&id).map(String::as_str) == Some(name) {
            return String::new();
        }
        map.insert(id, name.to_string());
        name.to_string()
    }

    fn toc_entry(&mut self, e: &TarEntry) -> JsonEntry {
        let xattrs: BTreeMap<String, String> = e
            .xattrs
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    base64::engine::general_purpose::STANDARD.encode(v),
                )
            })
            .collect();
        JsonEntry {
            name: e.name.clone(),
            kind: e.kind.toc_type().to_string(),
            size: if e.kind == TarKind::Regular {
                e.size as i64
            } else {
                0
            },
            modtime: format_modtime(e.mtime, e.mtime_nsec),
            link_name: if matches!(e.kind, TarKind::Symlink | TarKind::HardLink) {
                e.link_name.clone()
            } else {
                String::new()
            },
            mode: e.mode as i64,
            uid: e.uid as i64,
            gid: e.gid as i64,
            user_name: Self::name_if_changed(&mut self.uids, e.uid, &e.user_name),
            group_name: Self::name_if_changed(&mut self.gids, e.gid, &e.group_name),
            dev_major: e.dev_major as i64,
            dev_minor: e.dev_minor as i64,
            xattrs,
            ..Default::default()
        }
    }

    /// Add a regular file's payload: `header` goes into the open member,
    /// each chunk may start a new one.
    fn add_payload(
        &mut self,
        mut entry: JsonEntry,
        payload: &[u8],
        payload_pieces: impl Fn(&mut MemberPlan, Range<usize>),
        force_new_member: bool,
    ) {
        let size = payload.len();
        if size == 0 {
            entry.digest = Digest::of(payload).to_string();
        }
        // The file's digest is hashed a chunk at a time, with the chunks':
        // a file larger than memory is then read once, a window at a time.
        let mut file_hash = Hasher::new();
        let mut first_entry = None;
        let chunk_size = self.opts.chunk_size.max(1) as usize;
        let mut start = 0usize;
        let mut first = true;
        let single = size <= chunk_size;
        let mut entry = Some(entry);
        while start < size {
            let end = (start + chunk_size).min(size);
            let new_member = force_new_member
                || self.opts.min_chunk_size == 0
                || self.current.len >= self.opts.min_chunk_size;
            if new_member {
                self.cut();
            }
            let inner = self.current.len;
            let chunk = &payload[start..end];
            let mut je = if first {
                entry.take().expect("first chunk")
            } else {
                JsonEntry {
                    name: self
                        .entries
                        .last()
                        .map(|e| e.name.clone())
                        .unwrap_or_default(),
                    kind: "chunk".into(),
                    ..Default::default()
                }
            };
            je.inner_offset = inner as i64;
            je.chunk_offset = start as i64;
            if !single {
                je.chunk_size = (end - start) as i64;
            }
            je.chunk_digest = Digest::of(chunk).to_string();
            file_hash.update(chunk);
            if first {
                first_entry = Some(self.entries.len());
            }
            self.offsets.push((self.entries.len(), self.members.len()));
            self.entries.push(je);
            payload_pieces(&mut self.current, start..end);
            self.hashed += end - start;
            if self.hashed >= WINDOW_BYTES {
                (self.release)();
                self.hashed = 0;
            }
            start = end;
            first = false;
        }
        if let Some(i) = first_entry {
            self.entries[i].digest = file_hash.finish().to_string();
        }
        if let Some(e) = entry {
            // Empty file: metadata only.
            self.entries.push(e);
        }
    }

    fn add_tar_entry(&mut self, e: &TarEntry) {
        let je = self.toc_entry(e);
        let h = e.header_offset as usize..e.data_offset as usize;
        self.current.push_input(h);
        if e.kind == TarKind::Regular && e.size > 0 {
            let data = e.data_offset as usize;
            let payload = &self.input[data..data + e.size as usize];
            self.add_payload(
                je,
                payload,
                |m, r| m.push_input(data + r.start..data + r.end),
                false,
            );
        } else {
            if e.kind == TarKind::Regular {
                let mut je = je;
                je.digest = Digest::empty().to_string();
                self.entries.push(je);
            } else {
                self.entries.push(je);
            }
        }
        let pad = (e.data_offset + e.size) as usize..e.end_offset as usize;
        self.current.push_input(pad);
    }

    fn add_landmark(&mut self, name: &'static str) {
        let header = ustar_header(name, b'0', 0o644, 1, 0);
        self.current.push_owned(header.to_vec());
        let je = JsonEntry {
            name: name.to_string(),
            kind: "reg".into(),
            size: 1,
            mode: 0o644,
            ..Default::default()
        };
        let payload = [LANDMARK_CONTENTS];
        self.add_payload(
            je,
            &payload,
            |m, _| {
                let mut b = vec![LANDMARK_CONTENTS];
                b.resize(BLOCK, 0);
                m.push_owned(b)
            },
            true,
        );
    }
}

/// Choose the order of entries: prioritized files (with their parent
/// directories and hardlink targets) first, then the landmark, then the rest.
fn order_entries<'a>(
    entries: &'a [TarEntry],
    prioritized: Option<&[String]>,
    missing: &mut Vec<String>,
) -> Vec<Item<'a>> {
    // Drop what a previous conversion added, and earlier duplicates.
    let mut last_index: HashMap<String, usize> = HashMap::new();
    let names: Vec<Option<String>> = entries
        .iter()
        .map(|e| normalize_path(&e.name).ok())
        .collect();
    for (i, n) in names.iter().enumerate() {
        if let Some(n) = n {
            last_index.insert(n.clone(), i);
        }
    }
    let keep: Vec<usize> = (0..entries.len())
        .filter(|&i| match &names[i] {
            Some(n) => {
                last_index.get(n) == Some(&i)
                    && n != TOC_TAR_NAME
                    && n != PREFETCH_LANDMARK
                    && n != NO_PREFETCH_LANDMARK
            }
            None => true, // rejected later with a clear error
        })
        .collect();

    let prioritized = prioritized.filter(|p| !p.is_empty());
    let Some(prioritized) = prioritized else {
        let mut out = vec![Item::Landmark(NO_PREFETCH_LANDMARK)];
        out.extend(keep.iter().map(|&i| Item::Tar(&entries[i])));
        return out;
    };
    let mut moved: HashSet<usize> = HashSet::new();
    let mut out: Vec<Item> = Vec::new();
    fn move_rec<'a>(
        path: &str,
        entries: &'a [TarEntry],
        last_index: &HashMap<String, usize>,
        moved: &mut HashSet<usize>,
        out: &mut Vec<Item<'a>>,
        depth: usize,
    ) -> bool {
        if depth > 256 {
            return false;
        }
        // Parents first (up to the root), when the tar has entries for them.
        if !path.is_empty() {
            let parent = path.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
            move_rec(parent, entries, last_index, moved, out, depth + 1);
        }
        let Some(&i) = last_index.get(path) else {
            return false;
        };
        if moved.contains(&i) {
            return true;
        }
        let e = &entries[i];
        if e.kind == TarKind::HardLink
            && let Ok(target) = normalize_path(&e.link_name)
        {
            move_rec(&target, entries, last_index, moved, out, depth + 1);
        }
        moved.insert(i);
        out.push(Item::Tar(e));
        true
    }
    for p in prioritized {
        let found = match normalize_path(p) {
            Ok(path) if !path.is_empty() => {
                move_rec(&path, entries, &last_index, &mut moved, &mut out, 0)
            }
            _ => false,
        };
        if !found {
            missing.push(p.clone());
        }
    }
    out.push(Item::Landmark(PREFETCH_LANDMARK));
    out.extend(
        keep.iter()
            .filter(|i| !moved.contains(i))
            .map(|&i| Item::Tar(&entries[i])),
    );
    out
}

fn compress_member(
    format: TargetFormat,
    level: i32,
    data: &[u8],
) -> std::result::Result<Vec<u8>, String> {
    match format {
        TargetFormat::Estargz => {
            thread_local! {
                static GZ: std::cell::RefCell<Option<(i32, libdeflater::Compressor)>> =
                    const { std::cell::RefCell::new(None) };
            }
            GZ.with(|cell| {
                let mut slot = cell.borrow_mut();
                if slot.as_ref().map(|(l, _)| *l) != Some(level) {
                    let lvl = libdeflater::CompressionLvl::new(level)
                        .map_err(|_| format!("gzip level {level} is not in 1..=12"))?;
                    *slot = Some((level, libdeflater::Compressor::new(lvl)));
                }
                let c = &mut slot.as_mut().expect("just set").1;
                let mut out = vec![0u8; c.gzip_compress_bound(data.len())];
                let n = c
                    .gzip_compress(data, &mut out)
                    .map_err(|e| format!("gzip: {e}"))?;
                out.truncate(n);
                Ok(out)
            })
        }
        TargetFormat::ZstdChunked => {
            zstd::bulk::compress(data, level).map_err(|e| format!("zstd: {e}"))
        }
    }
}

/// Convert an uncompressed tar held in memory (usually an mmap).
pub fn convert<W: Write + Send>(
    layer: &str,
    input: &[u8],
    out: W,
    opts: &ConvertOptions,
    progress: Option<Progress<'_>>,
) -> Result<ConvertedLayer> {
    convert_releasing(layer, input, out, opts, progress, &|| {})
}

/// [`convert`], calling `release` each time about a window of the input has
/// been read (hashed while planning, compressed after).
fn convert_releasing<W: Write + Send>(
    layer: &str,
    input: &[u8],
    out: W,
    opts: &ConvertOptions,
    progress: Option<Progress<'_>>,
    release: Release<'_>,
) -> Result<ConvertedLayer> {
    let wrap = |k: ErrorKind| Error::new(layer, k);
    if opts.keep_diff_id && !opts.external_toc {
        return Err(wrap(ErrorKind::Unsupported(
            "--keep-diff-id needs --external-toc (the TOC cannot be inside a blob whose bytes must not change)".into(),
        )));
    }
    if opts.external_toc && opts.format == TargetFormat::ZstdChunked {
        return Err(wrap(ErrorKind::Unsupported(
            "an external TOC is only defined for eStargz (gzip)".into(),
        )));
    }
    if opts.chunk_size == 0 {
        return Err(wrap(ErrorKind::Unsupported(
            "chunk size must be at least 1 byte".into(),
        )));
    }
    let level = opts.level.unwrap_or(match opts.format {
        TargetFormat::Estargz => DEFAULT_GZIP_LEVEL,
        TargetFormat::ZstdChunked => DEFAULT_ZSTD_LEVEL,
    });

    // Stage 1: plan.
    let mut reader = TarReader::new(input);
    let mut tar_entries = Vec::new();
    for e in &mut reader {
        let e = e.map_err(wrap)?;
        normalize_path(&e.name).map_err(|r| wrap(ErrorKind::entry(&e.name, r)))?;
        tar_entries.push(e);
    }
    let trailer = reader.trailer_offset().unwrap_or(input.len() as u64) as usize;
    // Every header was read: for a layer of small files, most of its pages.
    release();
    let mut planner = Planner {
        input,
        opts,
        release,
        hashed: 0,
        members: Vec::new(),
        current: MemberPlan::default(),
        entries: Vec::new(),
        offsets: Vec::new(),
        uids: HashMap::new(),
        gids: HashMap::new(),
    };
    let mut missing = Vec::new();
    if opts.keep_diff_id {
        for e in &tar_entries {
            planner.add_tar_entry(e);
        }
        planner.current.push_input(trailer..input.len());
    } else {
        for item in order_entries(
            &tar_entries,
            opts.prioritized_files.as_deref(),
            &mut missing,
        ) {
            match item {
                Item::Tar(e) => planner.add_tar_entry(e),
                Item::Landmark(name) => planner.add_landmark(name),
            }
        }
        // zstd:chunked and external TOCs end the tar here; an embedded gzip
        // TOC member carries the end-of-archive marker instead.
        if opts.external_toc || opts.format == TargetFormat::ZstdChunked {
            planner.current.push_owned(vec![0u8; 2 * BLOCK]);
        }
    }
    planner.cut();
    let Planner {
        members,
        mut entries,
        offsets,
        ..
    } = planner;
    check_plan(&mut entries, &offsets, &members, opts).map_err(wrap)?;

    // Stages 2 and 3: compress in parallel windows, write in order.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads)
        .build()
        .map_err(|e| wrap(ErrorKind::Unsupported(format!("thread pool: {e}"))))?;
    let mut writer = HashingWriter::new(out);
    let mut diff = Hasher::new();
    let mut member_offsets: Vec<u64> = Vec::with_capacity(members.len());
    {
        let (tx, rx) = crossbeam_channel::bounded::<CompressedWindow>(1);
        let format = opts.format;
        let members = &members;
        let write_result = std::thread::scope(|scope| {
            let writer_ref = &mut writer;
            let diff_ref = &mut diff;
            let offsets_ref = &mut member_offsets;
            // The uncompressed stream is hashed from the input where it
            // lies, not from copies kept with the compressed window: a
            // window's raw bytes (64 MiB) would be held two or three times
            // over while windows queue.
            let handle = scope.spawn(move || -> std::io::Result<()> {
                for (range, window) in rx {
                    for (m, compressed) in members[range].iter().zip(window) {
                        offsets_ref.push(writer_ref.written());
                        for piece in &m.pieces {
                            diff_ref.update(match piece {
                                Piece::Input(r) => &input[r.clone()],
                                Piece::Owned(b) => b,
                            });
                        }
                        writer_ref.write_all(&compressed)?;
                    }
                }
                Ok(())
            });
            let mut done_input = 0u64;
            let mut i = 0;
            let mut result: Result<(), ErrorKind> = Ok(());
            while i < members.len() {
                let mut j = i;
                let mut bytes = 0usize;
                while j < members.len() && (bytes < WINDOW_BYTES || j == i) {
                    bytes += members[j].len as usize;
                    j += 1;
                }
                let window: std::result::Result<Vec<Vec<u8>>, String> = pool.install(|| {
                    use rayon::prelude::*;
                    members[i..j]
                        .par_iter()
                        .map(|m| compress_member(format, level, &m.gather(input)))
                        .collect()
                });
                match window {
                    Ok(w) => {
                        if tx.send((i..j, w)).is_err() {
                            break; // the writer failed; its error is reported below
                        }
                    }
                    Err(e) => {
                        result = Err(ErrorKind::Unsupported(format!("compression failed: {e}")));
                        break;
                    }
                }
                done_input += bytes as u64;
                release();
                if let Some(p) = progress {
                    p(done_input.min(input.len() as u64), input.len() as u64);
                }
                i = j;
            }
            drop(tx);
            let written = handle.join().expect("writer thread panicked");
            result.and(written.map_err(|e| ErrorKind::io("writing the blob", e)))
        });
        write_result.map_err(wrap)?;
    }

    for (entry, member) in offsets {
        entries[entry].offset = member_offsets[member] as i64;
    }
    let toc_entries = entries.len();
    let toc = JsonToc {
        version: 1,
        entries,
        ..Default::default()
    };
    let toc_json = toc.to_json();
    let toc_digest = Digest::of(&toc_json);
    let io = |e: std::io::Error| wrap(ErrorKind::io("writing the blob", e));

    let mut external_toc = None;
    let mut zstd_manifest = None;
    match opts.format {
        TargetFormat::Estargz => {
            let toc_member_raw = toc_tar(&toc_json);
            let toc_member = compress_member(TargetFormat::Estargz, level, &toc_member_raw)
                .map_err(|e| wrap(ErrorKind::Unsupported(e)))?;
            if opts.external_toc {
                external_toc = Some(ExternalTocBlob {
                    digest: Digest::of(&toc_member),
                    diff_id: Digest::of(&toc_member_raw),
                    bytes: toc_member,
                });
                writer
                    .write_all(&Footer::ExternalToc.encode())
                    .map_err(io)?;
            } else {
                let toc_offset = writer.written();
                diff.update(&toc_member_raw);
                writer.write_all(&toc_member).map_err(io)?;
                writer
                    .write_all(&Footer::Estargz { toc_offset }.encode())
                    .map_err(io)?;
            }
        }
        TargetFormat::ZstdChunked => {
            let compressed = zstd::bulk::compress(&toc_json, level)
                .map_err(|e| wrap(ErrorKind::Unsupported(format!("zstd: {e}"))))?;
            let toc_offset = writer.written() + SKIPPABLE_HEADER_SIZE as u64;
            writer
                .write_all(&skippable_header(compressed.len()))
                .map_err(io)?;
            writer.write_all(&compressed).map_err(io)?;
            let footer = Footer::ZstdChunked {
                toc_offset,
                toc_compressed_len: compressed.len() as u64,
                toc_uncompressed_len: toc_json.len() as u64,
            };
            writer.write_all(&footer.encode()).map_err(io)?;
            zstd_manifest = Some((
                Digest::of(&compressed),
                format!("{toc_offset}:{}:{}:1", compressed.len(), toc_json.len()),
            ));
        }
    }
    writer.flush().map_err(io)?;
    let uncompressed_size = diff.len();
    let (_, digest, size) = writer.finish();
    Ok(ConvertedLayer {
        digest,
        size,
        diff_id: diff.finish(),
        uncompressed_size,
        toc_digest,
        external_toc,
        zstd_manifest,
        toc_entries,
        missing_prioritized: missing,
    })
}

/// Check the planned TOC with the reader's rules before compressing anything,
/// so input that no reader would accept (a hardlink to a missing file, a
/// path below a regular file, ...) fails early with the reader's message.
/// Offsets are placeholders here: uncompressed member starts, which keep
/// every ordering and size relation the real offsets will have.
fn check_plan(
    entries: &mut [JsonEntry],
    offsets: &[(usize, usize)],
    members: &[MemberPlan],
    opts: &ConvertOptions,
) -> Result<(), ErrorKind> {
    let mut starts = Vec::with_capacity(members.len());
    let mut at = 1u64; // 0 would read as "no offset"
    for m in members {
        starts.push(at);
        at += m.len;
    }
    for &(entry, member) in offsets {
        entries[entry].offset = starts[member] as i64;
    }
    let format = match opts.format {
        TargetFormat::Estargz => crate::footer::LayerFormat::Estargz,
        TargetFormat::ZstdChunked => crate::footer::LayerFormat::ZstdChunked,
    };
    crate::tree::Toc::build_entries(entries, format, at + 1)
        .map(|_| ())
        .map_err(|e| match e {
            ErrorKind::InvalidEntry { entry, reason } => ErrorKind::InvalidEntry {
                entry,
                reason: format!("{reason}; the input layer cannot be converted"),
            },
            other => other,
        })
}

/// An eStargz blob with its TOC edited: the payload in front of the TOC
/// stays byte for byte, `edit` changes the TOC, and a new TOC member and
/// footer follow. Returns the blob and the new TOC's digest (what its
/// `toc.digest` annotation must say). Tests craft hostile layers with it.
pub fn with_edited_toc(
    blob: &[u8],
    edit: impl FnOnce(&mut JsonToc),
) -> std::result::Result<(Vec<u8>, Digest), ErrorKind> {
    let size = blob.len() as u64;
    let tail = &blob[blob.len().saturating_sub(crate::footer::MAX_FOOTER_SIZE)..];
    let footer = crate::footer::parse_footer(tail, size)?;
    let (Footer::Estargz { toc_offset }, Some(range)) = (footer, footer.toc_range(size)) else {
        return Err(ErrorKind::Unsupported(format!(
            "only an eStargz TOC can be edited, not a {} one",
            footer.format().name()
        )));
    };
    let json = crate::reader::decode_toc(
        &footer,
        &blob[range.start as usize..range.end as usize],
        crate::reader::DEFAULT_MAX_TOC_SIZE,
    )?;
    let mut toc = JsonToc::parse(&json)?;
    edit(&mut toc);
    let json = toc.to_json();
    let member = compress_member(TargetFormat::Estargz, DEFAULT_GZIP_LEVEL, &toc_tar(&json))
        .map_err(ErrorKind::Unsupported)?;
    let mut out = blob[..toc_offset as usize].to_vec();
    out.extend_from_slice(&member);
    out.extend_from_slice(&Footer::Estargz { toc_offset }.encode());
    Ok((out, Digest::of(&json)))
}

/// The uncompressed TOC member: a tar with `stargz.index.json` and the
/// end-of-archive marker.
fn toc_tar(json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len() + 4 * BLOCK);
    out.extend_from_slice(&ustar_header(
        TOC_TAR_NAME,
        b'0',
        0o644,
        json.len() as u64,
        0,
    ));
    out.extend_from_slice(json);
    out.resize(out.len().div_ceil(BLOCK) * BLOCK, 0);
    out.resize(out.len() + 2 * BLOCK, 0);
    out
}

/// Compression of a layer blob, sniffed from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputCompression {
    None,
    Gzip,
    Zstd,
}

pub fn sniff_compression(head: &[u8]) -> InputCompression {
    if head.starts_with(&[0x1f, 0x8b]) {
        InputCompression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        InputCompression::Zstd
    } else {
        InputCompression::None
    }
}

/// Convert a layer blob file (tar, tar.gz or tar.zst). Compressed input is
/// decompressed into a temporary file in `tmp_dir` and mapped.
pub fn convert_file<W: Write + Send>(
    layer: &str,
    input: &Path,
    tmp_dir: &Path,
    out: W,
    opts: &ConvertOptions,
    progress: Option<Progress<'_>>,
) -> Result<ConvertedLayer> {
    let wrap = |k: ErrorKind| Error::new(layer, k);
    let io = |what: &str, e: std::io::Error| {
        wrap(ErrorKind::io(format!("{what} {}", input.display()), e))
    };
    let file = std::fs::File::open(input).map_err(|e| io("opening", e))?;
    let mut head = [0u8; 4];
    let n = std::io::Read::read(&mut &file, &mut head).map_err(|e| io("reading", e))?;
    let compression = sniff_compression(&head[..n]);
    let tar_file = match compression {
        InputCompression::None => file,
        c => {
            let mut tmp = tempfile::tempfile_in(tmp_dir)
                .map_err(|e| io("creating a temporary file for", e))?;
            let src = std::io::BufReader::with_capacity(
                1 << 20,
                std::fs::File::open(input).map_err(|e| io("opening", e))?,
            );
            let copied = match c {
                InputCompression::Gzip => {
                    std::io::copy(&mut flate2::read::MultiGzDecoder::new(src), &mut tmp)
                }
                _ => zstd::stream::read::Decoder::new(src)
                    .and_then(|mut d| std::io::copy(&mut d, &mut tmp)),
            };
            copied.map_err(|e| io("decompressing", e))?;
            tmp
        }
    };
    let len = tar_file.metadata().map_err(|e| io("reading", e))?.len();
    if len == 0 {
        return convert(layer, &[], out, opts, progress);
    }
    // SAFETY: the file is private (a temporary file) or an input blob that the
    // caller does not modify while converting.
    let map = unsafe { memmap2::Mmap::map(&tar_file) }.map_err(|e| io("mapping", e))?;
    // The pages read leave the process's mapping after the headers are
    // read and after each window of data is hashed or compressed (they
    // stay in the page cache; a later read maps them again): otherwise
    // every page of the layer read so far counts in the converter's RSS,
    // which would grow with the layer.
    let release = || {
        // SAFETY: a read-only shared mapping of a file nothing truncates
        // while it is converted: dropped pages read back the same bytes.
        let _ = unsafe { map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
    };
    convert_releasing(layer, &map, out, opts, progress, &release)
}
