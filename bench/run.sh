#!/usr/bin/env bash
# make bench: every benchmark, side by side with the reference tools, in one
# run. Results (Markdown) go to bench/results/ and are printed.
#
#   convert.sh    stargaze convert vs ctr-remote image convert (MB/s, size)
#   index         TOC index of a 100k-entry layer: size, open, lookups
#   fetch         fetcher: whole layer vs curl, decode vs a single-core loop,
#                 merge ratio of random reads, service RSS
#
# The cold-start benchmark (full pull vs Go Stargz Snapshotter vs stargaze)
# joins when the snapshotter exists.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== building release binaries"
cargo build --release -q -p stargaze-cli -p stargaze-bench -p stargaze-fetcher
mkdir -p bench/results
bash bench/convert.sh
echo
echo "== TOC index, 100k-entry layer"
./target/release/index | tee bench/results/index.md
echo
echo "== fetcher"
./target/release/fetch | tee bench/results/fetch.md
echo
echo "results written to bench/results/"
