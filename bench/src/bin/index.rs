//! TOC index of a 100k-entry layer: build time, file size, open+validate
//! time (fresh mmap each time), path and inode lookups, readdir, and the heap
//! bytes allocated while opening (a counting global allocator).
//!
//! Targets (issue 2): open+validate <= 10 ms, path lookup <= 2 us, no heap
//! allocation proportional to the entry count on open.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use stargaze_format::toc::{JsonEntry, JsonToc};
use stargaze_format::{Digest, LayerFormat, Toc};
use stargaze_index::{IndexMeta, LayerIndex, build, write_atomic};

struct Counting;
static ALLOCATED: AtomicU64 = AtomicU64::new(0);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size() as u64, Ordering::Relaxed);
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// A realistic tree: 10k directories of 9 files each, a few big chunked
/// files, xattrs and symlinks sprinkled in.
fn synthetic_toc(dirs: usize, files_per_dir: usize) -> Toc {
    let mut entries = Vec::with_capacity(dirs * (files_per_dir + 2));
    let mut offset = 100i64;
    for d in 0..dirs {
        let dir = format!("usr/lib/pkg{:03}/module{d:05}", d % 500);
        entries.push(JsonEntry {
            name: format!("{dir}/"),
            kind: "dir".into(),
            mode: 0o755,
            ..Default::default()
        });
        for f in 0..files_per_dir {
            let name = format!("{dir}/file_{f:02}.py");
            let size = 200 + ((d * 31 + f * 17) % 5000) as i64;
            let digest = Digest::of(name.as_bytes()).to_string();
            let mut e = JsonEntry {
                name: name.clone(),
                kind: "reg".into(),
                mode: 0o644,
                size,
                offset,
                digest: digest.clone(),
                chunk_digest: digest,
                modtime: "2024-01-01T00:00:00Z".into(),
                ..Default::default()
            };
            if f == 0 && d % 100 == 0 {
                e.xattrs.insert(
                    "security.capability".into(),
                    "AQAAAgAgAAAAAAAAAAAAAAAAAAA=".into(),
                );
            }
            offset += size / 3 + 30;
            entries.push(e);
        }
        if d % 50 == 0 {
            entries.push(JsonEntry {
                name: format!("{dir}/link"),
                kind: "symlink".into(),
                link_name: "file_00.py".into(),
                ..Default::default()
            });
        }
    }
    // A few large files in 4 MiB chunks.
    for b in 0..20 {
        let name = format!("opt/big/blob{b}");
        let chunk = 4i64 << 20;
        for c in 0..8i64 {
            let d = Digest::of(format!("{name}{c}").as_bytes()).to_string();
            entries.push(JsonEntry {
                name: name.clone(),
                kind: if c == 0 { "reg" } else { "chunk" }.into(),
                size: if c == 0 { 8 * chunk } else { 0 },
                chunk_offset: c * chunk,
                chunk_size: chunk,
                offset,
                chunk_digest: d.clone(),
                digest: if c == 0 { d } else { String::new() },
                ..Default::default()
            });
            offset += chunk / 2;
        }
    }
    let json = JsonToc {
        version: 1,
        entries,
        ..Default::default()
    };
    Toc::build(&json, LayerFormat::Estargz, offset as u64 + 1).expect("synthetic TOC is valid")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let toc = synthetic_toc(10_000, 9);
    let entries = toc.walk().len();
    let meta = IndexMeta {
        layer_digest: Digest::of(b"bench").to_string(),
        toc_digest: Digest::of(b"toc"),
        blob_size: toc.payload_end + 1000,
    };
    let t = Instant::now();
    let bytes = build(&toc, &meta).expect("build");
    let build_ms = t.elapsed().as_secs_f64() * 1e3;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("index");
    write_atomic(&path, &bytes).expect("write");
    let size = bytes.len();

    // Open + validate, fresh mmap each time (page cache warm, as on a node
    // where the fetcher just wrote the file).
    let mut opens = Vec::new();
    let mut open_heap = 0;
    let mut open_allocs = 0;
    for _ in 0..21 {
        let a0 = ALLOCATED.load(Ordering::Relaxed);
        let n0 = ALLOCATIONS.load(Ordering::Relaxed);
        let t = Instant::now();
        let idx = LayerIndex::open(&path).expect("open");
        opens.push(t.elapsed().as_secs_f64() * 1e3);
        open_heap = ALLOCATED.load(Ordering::Relaxed) - a0;
        open_allocs = ALLOCATIONS.load(Ordering::Relaxed) - n0;
        drop(idx);
    }
    let idx = LayerIndex::open(&path).expect("open");

    // Path lookups of existing files, in a scrambled order.
    let paths: Vec<String> = toc
        .walk()
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| p.ends_with(".py"))
        .collect();
    let n = 1_000_000;
    let mut found = 0u64;
    let t = Instant::now();
    for i in 0..n {
        let p = &paths[(i * 7919) % paths.len()];
        found += idx.lookup_path(p).is_some() as u64;
    }
    let lookup_ns = t.elapsed().as_secs_f64() * 1e9 / n as f64;
    assert_eq!(found, n as u64);

    let count = idx.inode_count();
    let t = Instant::now();
    let mut sum = 0u64;
    for i in 0..n as u64 {
        sum = sum.wrapping_add(
            idx.inode(1 + (i * 7919) % count)
                .map(|x| x.size())
                .unwrap_or(0),
        );
    }
    let inode_ns = t.elapsed().as_secs_f64() * 1e9 / n as f64;
    std::hint::black_box(sum);

    let big_dir = idx.lookup_path("usr/lib/pkg000").expect("dir");
    let t = Instant::now();
    let listed = idx.readdir(big_dir, 0).count();
    let readdir_us = t.elapsed().as_secs_f64() * 1e6;

    println!("### TOC index, {entries} names, {count} inodes\n");
    println!("| measure | value | target |");
    println!("|---|---|---|");
    println!("| build (from the checked TOC) | {build_ms:.1} ms | |");
    println!(
        "| index file size | {:.1} MB ({:.0} B per name) | |",
        size as f64 / 1e6,
        size as f64 / entries as f64
    );
    println!(
        "| open + validate (median of 21, fresh mmap) | {:.2} ms | ≤ 10 ms |",
        median(opens)
    );
    println!(
        "| heap allocated by open | {open_heap} B in {open_allocs} allocations | not proportional to entries |"
    );
    println!("| path lookup (depth 5, 1M random existing paths) | {lookup_ns:.0} ns | ≤ 2 µs |");
    println!("| inode lookup | {inode_ns:.1} ns | |");
    println!("| readdir of a {listed}-entry directory | {readdir_us:.0} µs | |");
}
