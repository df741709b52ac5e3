#!/usr/bin/env bash
# make bench: every benchmark, side by side with the reference tools, in one
# run. Results (Markdown) go to bench/results/ and are printed.
#
#   convert.sh    stargaze convert vs ctr-remote image convert (MB/s, size)
#   index         TOC index of a 100k-entry layer: size, open, lookups
#   fetch         fetcher: whole layer vs curl, decode vs a single-core loop,
#                 merge ratio of random reads, service RSS
#   fetch-link.sh the whole layer vs curl over shaped links (100 Mbit/s +
#                 20 ms, 1 Gbit/s), service RSS with a 1 GiB layer (needs root)
#   fs            fs service: cached reads through FUSE (with and without
#                 passthrough) vs the local disk, stat of a 100k-file layer,
#                 service RSS and threads with 1 and 500 layers, the FUSE
#                 transports classic vs io_uring (needs root and enable_uring;
#                 BENCH_ONLY=transports runs that section alone)
#   startup.sh    cold start of a container: full pull vs the Go Stargz
#                 Snapshotter vs stargaze over a shaped link, on six images
#                 (bench/images/: python, a C toolchain, perl, a JVM, a shell
#                 pipeline) with their commands given at ctr run (needs root;
#                 IMAGES or WORKLOADS choose what runs)
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== building release binaries"
cargo build --release -q -p stargaze-cli -p stargaze-bench -p stargaze-fetcher -p stargaze-fs
mkdir -p bench/results
bash bench/convert.sh
echo
echo "== TOC index, 100k-entry layer"
./target/release/index | tee bench/results/index.md
echo
echo "== fetcher"
# As root, the caches go on a journaled ext4 of their own (a loop device),
# as on a node: an ext4 without a journal that recently deleted many files
# allocates inodes several times slower (see bench/fetch-link.sh).
if [[ $(id -u) -eq 0 ]]; then
    FETCH_FS=$(mktemp -d)
    trap 'mountpoint -q "$FETCH_FS/cache" && umount "$FETCH_FS/cache"; rm -rf "$FETCH_FS"' EXIT
    truncate -s 8G "$FETCH_FS/cache.img"
    mkfs.ext4 -q -F "$FETCH_FS/cache.img"
    mkdir "$FETCH_FS/cache"
    mount -o loop "$FETCH_FS/cache.img" "$FETCH_FS/cache"
    TMPDIR=$FETCH_FS/cache ./target/release/fetch | tee bench/results/fetch.md
    umount "$FETCH_FS/cache"
else
    ./target/release/fetch | tee bench/results/fetch.md
fi
echo
echo "== fetcher over shaped links (bench/fetch-link.sh)"
bash bench/fetch-link.sh
echo
echo "== fs service"
./target/release/fs | tee bench/results/fs.md
echo
echo "== cold start (bench/startup.sh)"
bash bench/startup.sh
echo
echo "results written to bench/results/"
