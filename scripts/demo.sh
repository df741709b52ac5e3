#!/usr/bin/env bash
# make demo: a container that starts before its image has been downloaded.
#
# Everything runs in a private directory with its own registry, containerd and
# stargaze services (never the system containerd): build a sample image from
# this machine's files (busybox, the C library, Python 3.11 and a bulky data
# layer), push it, convert it to eStargz with `stargaze convert`, then run
# `python3 -c 'print("hi")'` twice from a cold node:
#   1. full pull: `ctr image pull` + `ctr run` on containerd's overlayfs;
#   2. lazy pull: `stargaze rpull` + `ctr run --snapshotter stargaze`;
# and print both times and how many bytes each read from the registry, then
# what `stargaze status` reports about the node.
# Needs root (containerd, FUSE). Leaves nothing running or mounted.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
KEEP=${KEEP:-0}

say() { printf '\033[1m== %s\033[0m\n' "$*"; }

if [[ $(id -u) -ne 0 ]]; then
    echo "demo: needs root (it starts containerd and a FUSE mount); run 'sudo make demo'" >&2
    exit 1
fi
[[ -e /dev/fuse ]] || { echo "demo: /dev/fuse is missing: load the fuse module" >&2; exit 1; }

say "installing what is missing"
bash scripts/deps.sh
say "building (release)"
cargo build --release --bins --quiet
BIN=$ROOT/target/release

W=$(mktemp -d /tmp/stargaze-demo.XXXXXX)
PIDS=()
NS=demo
cleanup() {
    set +e
    if [[ -S $W/c.sock ]]; then
        for t in $(ctr -a "$W/c.sock" -n $NS tasks ls -q 2>/dev/null); do
            ctr -a "$W/c.sock" -n $NS tasks kill -s SIGKILL "$t" >/dev/null 2>&1
            ctr -a "$W/c.sock" -n $NS tasks delete -f "$t" >/dev/null 2>&1
        done
        for c in $(ctr -a "$W/c.sock" -n $NS containers ls -q 2>/dev/null); do
            ctr -a "$W/c.sock" -n $NS containers delete "$c" >/dev/null 2>&1
        done
    fi
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do kill "${PIDS[i]}" 2>/dev/null; done
    for p in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null
    done
    grep -o " $W[^ ]*" /proc/self/mounts | sort -r | while read -r m; do umount -l "$m"; done
    rm -rf "/run/containerd/runc/$NS"
    find /sys/fs/cgroup -depth -type d -name $NS -exec rmdir {} + 2>/dev/null
    if [[ $KEEP == 1 ]]; then echo "demo: kept $W"; else rm -rf "$W"; fi
}
trap cleanup EXIT

wait_for() { # what, test command...
    local what=$1; shift
    for _ in $(seq 300); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "demo: $what did not start; its log:" >&2
    tail -20 "$W/$what.log" >&2
    exit 1
}

say "building a sample image from this machine's files"
python=/usr/bin/python3.11
layer_dir() { mkdir -p "$W/rootfs/$1"; echo "$W/rootfs/$1"; }
L1=$(layer_dir base)
mkdir -p "$L1"/{bin,etc,lib/x86_64-linux-gnu,lib64,tmp,proc,sys,dev,usr/bin}
cp /bin/busybox "$L1/bin/busybox"
for a in sh ls cat echo; do ln -s busybox "$L1/bin/$a"; done
for lib in libc.so.6 libm.so.6 libz.so.1 libexpat.so.1; do
    cp -L "/lib/x86_64-linux-gnu/$lib" "$L1/lib/x86_64-linux-gnu/$lib"
done
cp -L /lib64/ld-linux-x86-64.so.2 "$L1/lib64/"
cp -r /usr/share/zoneinfo "$L1/usr/share-zoneinfo" 2>/dev/null && mkdir -p "$L1/usr/share" &&
    mv "$L1/usr/share-zoneinfo" "$L1/usr/share/zoneinfo"
echo 'root:x:0:0:root:/root:/bin/sh' >"$L1/etc/passwd"
L2=$(layer_dir python)
mkdir -p "$L2/usr/bin" "$L2/usr/lib" "$L2/etc"
cp "$python" "$L2/usr/bin/python3.11"
ln -s python3.11 "$L2/usr/bin/python3"
cp -a /usr/lib/python3.11 "$L2/usr/lib/"
cp -a /etc/python3.11 "$L2/etc/" 2>/dev/null || true
L3=$(layer_dir data)
mkdir -p "$L3/usr/share"
cp -a /usr/share/locale "$L3/usr/share/"

# The OCI layout (gzip layers, config, manifest) as the benchmark writes it.
LAYOUT=$W/image
python3 bench/mkimage.py "$LAYOUT" plain "$L1" "$L2" "$L3" >/dev/null
rm -rf "$W/rootfs"
echo "   $(du -sh "$LAYOUT" | cut -f1) compressed in 3 layers (busybox + libc, Python 3.11, locale data)"

say "converting it to eStargz with stargaze convert"
"$BIN/stargaze" convert --format estargz "oci:$LAYOUT:plain" "oci:$W/esgz:esgz"

say "starting a registry and pushing both images"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
REG=127.0.0.1:$PORT
cat >"$W/registry.yml" <<EOF
version: 0.1
log: { level: error }
storage:
  filesystem: { rootdirectory: $W/registry }
http:
  addr: $REG
EOF
docker-registry serve "$W/registry.yml" >"$W/registry.log" 2>&1 &
PIDS+=($!)
wait_for registry curl -sf "http://$REG/v2/"
skopeo --insecure-policy copy -q --dest-tls-verify=false "oci:$LAYOUT:plain" "docker://$REG/demo/python:plain"
skopeo --insecure-policy copy -q --dest-tls-verify=false "oci:$W/esgz:esgz" "docker://$REG/demo/python:esgz"

say "starting stargaze-fetcher, stargaze-fs, stargaze-snapshotter and containerd"
MPORT=$(free_port)
cat >"$W/stargaze.toml" <<EOF
[fetcher]
socket = "$W/fetcher.sock"
cache_dir = "$W/cache"
metrics_address = "127.0.0.1:$MPORT"
[fs]
socket = "$W/fs.sock"
mountpoint = "$W/mnt"
[snapshotter]
socket = "$W/snapshotter.sock"
root = "$W/snapshots"
[log]
level = "warn"
EOF
# The fetcher runs without background fetch here so that the bytes it reads
# are the ones the container needed; on a node it fills the cache after the
# prefetch.
declare -A extra=([fetcher]=--no-background-fetch [fs]= [snapshotter]=)
for svc in fetcher fs snapshotter; do
    # shellcheck disable=SC2086
    "$BIN/stargaze-$svc" --config "$W/stargaze.toml" ${extra[$svc]} >"$W/$svc.log" 2>&1 &
    PIDS+=($!)
    wait_for "$svc" test -S "$W/$svc.sock"
done
cat >"$W/containerd.toml" <<EOF
version = 2
root = "$W/containerd"
state = "$W/containerd-state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$W/c.sock"
[ttrpc]
  address = "$W/c.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$W/opt"
[proxy_plugins]
  [proxy_plugins.stargaze]
    type = "snapshot"
    address = "$W/snapshotter.sock"
EOF
containerd --config "$W/containerd.toml" >"$W/containerd.log" 2>&1 &
PIDS+=($!)
wait_for containerd ctr -a "$W/c.sock" version
ctr_() { ctr -a "$W/c.sock" -n $NS "$@"; }

now() { date +%s.%N; }
metric() { curl -s "http://127.0.0.1:$MPORT/metrics" | awk -v m="$1" '$1 ~ "^"m {s += $NF} END {printf "%d", s}'; }

say "full pull: ctr image pull + ctr run (overlayfs)"
t0=$(now)
ctr_ image pull --plain-http "$REG/demo/python:plain" >/dev/null
t1=$(now)
ctr_ run --rm "$REG/demo/python:plain" full python3 -c 'print("hi from a fully pulled image")'
t2=$(now)
full_bytes=$(du -sb "$W/registry/docker/registry/v2/blobs" | cut -f1)

say "lazy pull: stargaze rpull + ctr run --snapshotter stargaze"
t3=$(now)
"$BIN/stargaze" rpull --address "$W/c.sock" --namespace $NS --plain-http --snapshotter stargaze --quiet "$REG/demo/python:esgz"
t4=$(now)
rpull_requests=$(metric stargaze_fetcher_registry_requests_total)
ctr_ run --rm --snapshotter stargaze "$REG/demo/python:esgz" lazy python3 -c 'print("hi from a lazily pulled image")'
t5=$(now)
lazy_bytes=$(metric stargaze_fetcher_registry_bytes_total)
lazy_requests=$(metric stargaze_fetcher_registry_requests_total)

plain_size=$(du -sb "$LAYOUT/blobs" | cut -f1)
esgz_size=$(du -sb "$W/esgz/blobs" | cut -f1)
say "result"
awk -v t0="$t0" -v t1="$t1" -v t2="$t2" -v t3="$t3" -v t4="$t4" -v t5="$t5" \
    -v pb="$plain_size" -v eb="$esgz_size" -v lb="$lazy_bytes" 'BEGIN {
    full = t2 - t0; lazy = t5 - t3
    printf "   full pull:  %5.2f s (pull %.2f s + run %.2f s), %6.1f MB read from the registry\n", full, t1 - t0, t2 - t1, pb / 1e6
    printf "   lazy pull:  %5.2f s (rpull %.2f s + run %.2f s), %6.1f MB read from the registry (of %.1f MB)\n", lazy, t4 - t3, t5 - t4, lb / 1e6, eb / 1e6
    printf "   the container started %.1fx sooner\n", full / lazy
}'
echo "   stargaze-fetcher: $rpull_requests registry requests to mount 3 layers, $lazy_requests by the end of the run"
echo "   (loopback registry, no network delay; 'make bench' measures a shaped link)"

say "stargaze status: what the services report about this node"
"$BIN/stargaze" status --config "$W/stargaze.toml" | sed 's/^/   /' || true
