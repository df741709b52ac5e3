#!/usr/bin/env bash
# make fuzz: run every cargo-fuzz target of fuzz/ for a bounded time.
#   FUZZ_SECONDS=60 (per target)   FUZZ_TARGETS="footer toc tar blob convert"
# Not part of CI. Crashes land in fuzz/artifacts/<target>/ and make this fail.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-60}
targets=${FUZZ_TARGETS:-"footer toc tar blob convert"}

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
# cargo-fuzz passes nightly-only -Z flags; this machine has only a stable
# toolchain, whose compiler accepts them when bootstrapping is allowed.
if ! rustc --version | grep -q nightly; then
    export RUSTC_BOOTSTRAP=1
fi

echo "== writing seed corpora"
cargo run -q -p stargaze-format --example fuzz_seeds -- fuzz/seeds

failed=()
for t in $targets; do
    echo "== fuzzing $t for ${seconds}s"
    mkdir -p "fuzz/corpus/$t"
    if ! cargo fuzz run --fuzz-dir fuzz "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
            -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=262144 -print_final_stats=1; then
        failed+=("$t")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzzing found crashes in: ${failed[*]} (see fuzz/artifacts/)" >&2
    exit 1
fi
echo "== all fuzz targets ran ${seconds}s without a crash"
