#!/usr/bin/env bash
# Converter throughput: `stargaze convert` against `ctr-remote image convert`
# (the Go Stargz Snapshotter's converter, Debian 0.12) on the same image,
# same machine, same run. Prints a Markdown table and writes it to
# bench/results/convert.md.
#
#   ROUNDS=3            runs per tool (median reported)
#   BENCH_LAYER_PATHS   host paths (relative to /) packed into the layers
#
# The image is built from this machine's own files (Python stdlib, Perl,
# ICU, sbin: text, bytecode and ELF binaries, ~180 MB uncompressed) as two
# gzip layers, like a `docker build` output.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ROUNDS=${ROUNDS:-3}
BENCH_LAYER_PATHS=${BENCH_LAYER_PATHS:-"usr/lib/python3.11 usr/share/perl5 usr/lib/x86_64-linux-gnu/perl | usr/sbin usr/lib/x86_64-linux-gnu/libicu*"}
STARGAZE=${STARGAZE:-$ROOT/target/release/stargaze}
[ -x "$STARGAZE" ] || cargo build --release -q -p stargaze-cli
for t in containerd ctr ctr-remote; do
    command -v $t >/dev/null || { echo "$t is missing: run 'make deps'" >&2; exit 1; }
done

W=$(mktemp -d /tmp/sg-bench-convert.XXXXXX)
CTD_PID=
cleanup() {
    [ -n "$CTD_PID" ] && kill "$CTD_PID" 2>/dev/null && wait "$CTD_PID" 2>/dev/null || true
    grep -o " $W[^ ]*" /proc/mounts 2>/dev/null | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT

now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

echo "== building the input image in $W"
mkdir -p "$W/img/blobs/sha256"
echo '{"imageLayoutVersion":"1.0.0"}' > "$W/img/oci-layout"
diff_ids=""; layers=""; raw_total=0
IFS='|' read -ra groups <<< "$BENCH_LAYER_PATHS"
i=0
for g in "${groups[@]}"; do
    i=$((i+1))
    # shellcheck disable=SC2086
    (cd / && tar --sort=name --mtime=@0 --numeric-owner -cf "$W/layer$i.tar" $g 2>/dev/null) || true
    raw_total=$((raw_total + $(stat -c %s "$W/layer$i.tar")))
    did=$(sha256sum "$W/layer$i.tar" | cut -d' ' -f1)
    gzip -n -6 -c "$W/layer$i.tar" > "$W/layer$i.tar.gz"
    lid=$(sha256sum "$W/layer$i.tar.gz" | cut -d' ' -f1); lsz=$(stat -c %s "$W/layer$i.tar.gz")
    mv "$W/layer$i.tar.gz" "$W/img/blobs/sha256/$lid"; rm "$W/layer$i.tar"
    diff_ids="$diff_ids${diff_ids:+,}\"sha256:$did\""
    layers="$layers${layers:+,}{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"sha256:$lid\",\"size\":$lsz}"
done
printf '{"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":[%s]}}' "$diff_ids" > "$W/config.json"
cid=$(sha256sum "$W/config.json" | cut -d' ' -f1); csz=$(stat -c %s "$W/config.json"); mv "$W/config.json" "$W/img/blobs/sha256/$cid"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[%s]}' "$cid" "$csz" "$layers" > "$W/m.json"
mid=$(sha256sum "$W/m.json" | cut -d' ' -f1); msz=$(stat -c %s "$W/m.json"); mv "$W/m.json" "$W/img/blobs/sha256/$mid"
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"io.containerd.image.name":"bench.local/convert:src","org.opencontainers.image.ref.name":"src"}}]}' "$mid" "$msz" > "$W/img/index.json"
(cd "$W/img" && tar -cf "$W/img.tar" oci-layout index.json blobs)
echo "   $((raw_total / 1000000)) MB uncompressed in ${#groups[@]} layers"

echo "== starting a private containerd"
mkdir -p "$W/ctd"
cat > "$W/ctd/config.toml" <<EOF
version = 2
root = "$W/ctd/root"
state = "$W/ctd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$W/ctd/c.sock"
[ttrpc]
  address = "$W/ctd/c.sock.ttrpc"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$W/ctd/opt"
EOF
containerd --config "$W/ctd/config.toml" > "$W/ctd/log" 2>&1 &
CTD_PID=$!
CTR="ctr --address $W/ctd/c.sock -n bench"
CTRR="ctr-remote --address $W/ctd/c.sock -n bench"
for _ in $(seq 200); do $CTR version >/dev/null 2>&1 && break; sleep 0.05; done
$CTR image import --no-unpack "$W/img.tar" >/dev/null

layer_bytes_ctd() {  # total size of the layers of image $1 in containerd
    local m
    m=$($CTR image ls | awk -v r="$1" '$1==r {print $3}')
    $CTR content get "$m" | python3 -c 'import json,sys; print(sum(l["size"] for l in json.load(sys.stdin)["layers"]))'
}
layer_bytes_oci() {  # total size of the layers of oci:$1:$2
    python3 - "$1" "$2" <<'PY'
import json, sys, os
d, tag = sys.argv[1], sys.argv[2]
idx = json.load(open(os.path.join(d, "index.json")))
m = [x for x in idx["manifests"] if x.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag][0]
man = json.load(open(os.path.join(d, "blobs", *m["digest"].split(":"))))
print(sum(l["size"] for l in man["layers"]))
PY
}

run_go() {  # $1 = flags
    local times=() size=0
    for r in $(seq "$ROUNDS"); do
        $CTR image rm bench.local/convert:out >/dev/null 2>&1 || true
        local t0; t0=$(now)
        # shellcheck disable=SC2086
        $CTRR image convert $1 --oci bench.local/convert:src bench.local/convert:out >/dev/null
        times+=("$(awk -v a="$(now)" -v b="$t0" "BEGIN{print a-b}")")
        size=$(layer_bytes_ctd bench.local/convert:out)
    done
    echo "$(printf '%s\n' "${times[@]}" | median) $size"
}
run_ours() {  # $1 = flags
    local times=() size=0
    for r in $(seq "$ROUNDS"); do
        rm -rf "$W/out"
        local t0; t0=$(now)
        # shellcheck disable=SC2086
        "$STARGAZE" convert $1 "oci:$W/img:src" "oci:$W/out:out" >/dev/null 2>&1
        times+=("$(awk -v a="$(now)" -v b="$t0" "BEGIN{print a-b}")")
        size=$(layer_bytes_oci "$W/out" out)
    done
    echo "$(printf '%s\n' "${times[@]}" | median) $size"
}

results=()
row() {  # label go_flags our_flags
    echo "== $1: ctr-remote ($ROUNDS rounds)"
    read -r gt gs < <(run_go "$2")
    echo "== $1: stargaze ($ROUNDS rounds)"
    read -r st ss < <(run_ours "$3")
    results+=("$(python3 - "$1" "$raw_total" "$gt" "$gs" "$st" "$ss" <<'PY'
import sys
label, raw, gt, gs, st, ss = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
print(f"| {label} | {gt:.2f} s, {raw/gt/1e6:.1f} MB/s, {gs/1e6:.1f} MB | {st:.2f} s, {raw/st/1e6:.1f} MB/s, {ss/1e6:.1f} MB | **{gt/st:.1f}×** | {100*(ss-gs)/gs:+.1f} % |")
PY
)")
}
row "eStargz (gzip)" "--estargz" "--format estargz"
row "zstd:chunked" "--zstdchunked" "--format zstdchunked"

mkdir -p bench/results
{
    echo "### Converter throughput ($(date -u +%Y-%m-%d), $(nproc) cores, $(uname -r))"
    echo
    echo "Input: $((raw_total / 1000000)) MB uncompressed in ${#groups[@]} gzip layers (host files: $BENCH_LAYER_PATHS)."
    echo "Median of $ROUNDS rounds; MB/s of uncompressed input; sizes are the converted layers' total."
    echo "ctr-remote: $(ctr-remote --version 2>/dev/null | head -1) (Go gzip level 9, zstd default); stargaze: defaults (libdeflate level 6, zstd level 3), all cores."
    echo
    echo "| format | ctr-remote image convert | stargaze convert | speed-up | size vs ctr-remote |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${results[@]}"
} | tee bench/results/convert.md
