//! Convert one layer file and print throughput, for quick experiments
//! (levels, chunk sizes, threads). The user-facing command is `stargaze convert`.
//!
//! Usage: cargo run --release -p stargaze-format --example convert_tar -- \
//!          INPUT(.tar|.tar.gz|.tar.zst) OUTPUT [estargz|zstd] [LEVEL] [THREADS]

use std::time::Instant;

use stargaze_format::convert::{ConvertOptions, TargetFormat, convert_file};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: convert_tar INPUT OUTPUT [estargz|zstd] [LEVEL] [THREADS]");
        std::process::exit(2);
    }
    let format = match args.get(3).map(String::as_str) {
        Some("zstd") => TargetFormat::ZstdChunked,
        _ => TargetFormat::Estargz,
    };
    let opts = ConvertOptions {
        format,
        level: args.get(4).and_then(|l| l.parse().ok()),
        threads: args.get(5).and_then(|t| t.parse().ok()).unwrap_or(0),
        ..Default::default()
    };
    let out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&args[2]).unwrap());
    let tmp = std::env::temp_dir();
    let start = Instant::now();
    let res = convert_file("input", args[1].as_ref(), &tmp, out, &opts, None).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(1)
    });
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{:?} level {:?}: {} -> {} bytes in {:.2}s = {:.1} MB/s (uncompressed), ratio {:.3}",
        format,
        opts.level,
        res.uncompressed_size,
        res.size,
        secs,
        res.uncompressed_size as f64 / secs / 1e6,
        res.size as f64 / res.uncompressed_size as f64
    );
}
