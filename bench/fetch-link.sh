#!/usr/bin/env bash
# The fetcher's whole-layer throughput against curl over real links (issue 3's
# target: >= 0.9x curl "over the same link"), and the fetcher service's RSS
# while it fetches a 1 GiB layer (target < 64 MiB).
#
# The registry (Debian's docker-registry) runs in a network namespace behind
# a veth pair shaped with tc tbf (both directions) and, for added latency, the
# NFQUEUE delayer from ../shared/tools (this kernel has no netem), as
# bench/startup.sh does. For each link in LINKS ("rate:rtt_ms", default
# "100mbit:20 1gbit:0") the fetch benchmark (bench/src/bin/fetch.rs) runs its
# registry section against it: curl of the blob and a whole-layer fetch into
# the cache, interleaved, medians of 3. Then, over the unshaped veth, the RSS
# section with a synthetic 1 GiB layer (SYNTHETIC_MB).
#
# Writes bench/results/fetch-link.md. Needs root. Everything it creates (the
# namespace, veth, its daemons, WORK) is removed at exit.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
SHARED=$(cd "$ROOT/.." && pwd)/shared
W=${WORK:-/tmp/stargaze-fetch-link}
LINKS=${LINKS:-100mbit:20 1gbit:0}
SYNTHETIC_MB=${SYNTHETIC_MB:-1024}
NS=sgfl VH=sgfl0 VN=sgfl1 HOST_IP=10.213.42.1 REG_IP=10.213.42.2 PORT=5302 QNUM=7714
REG=$REG_IP:$PORT

# shellcheck source=bench/link.sh
source "$ROOT/bench/link.sh"
log() { echo "[$(date +%T)] $*" >&2; }
die() { log "FATAL: $*"; exit 1; }
[[ $(id -u) -eq 0 ]] || die "needs root (network namespaces, tc)"
rm -rf "$W"
mkdir -p "$W"/{logs,bin,registry}

PIDS=()
teardown() {
    set +e
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    link_destroy
    mountpoint -q "$W/cache" && umount "$W/cache"
    rm -rf "$W"
}
trap teardown EXIT

log "tools"
bash scripts/deps.sh >/dev/null
for p in iptables gcc libc6-dev; do
    [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == "install ok installed" ]] ||
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$p" </dev/null >"$W/logs/apt.log" 2>&1 ||
        die "apt-get install $p failed"
done
[[ -f $SHARED/tools/nfdelay.c ]] || die "$SHARED/tools/nfdelay.c is missing (the team's tools live in ../shared beside the checkout)"
gcc -O2 -o "$W/bin/nfdelay" "$SHARED/tools/nfdelay.c" -lnetfilter_queue -lnfnetlink || die "building nfdelay"
cargo build --release -q -p stargaze-bench -p stargaze-fetcher

# The fetcher's caches go on a journaled ext4 of their own (a loop device),
# as on a node, unless CACHE_FS_DIR names a directory to use instead. An
# ext4 without a journal (this VM's root) checks `recently_deleted` for
# every inode it allocates: after a few runs have created and deleted their
# caches, the same fetch took 1.0-1.4 s there against 0.34-0.46 s here,
# two thirds of its CPU in inode allocation.
if [[ -n ${CACHE_FS_DIR:-} ]]; then
    CACHE_TMP=$CACHE_FS_DIR
else
    mkdir -p "$W/cache"
    truncate -s "${CACHE_FS_SIZE:-16G}" "$W/cache.img"
    mkfs.ext4 -q -F "$W/cache.img"
    mount -o loop "$W/cache.img" "$W/cache"
    CACHE_TMP=$W/cache
fi

log "network: namespace $NS, veth $VH/$VN"
link_create

cat >"$W/registry.yml" <<EOF
version: 0.1
log: {level: warn, formatter: text}
storage:
  filesystem: {rootdirectory: $W/registry}
http:
  addr: $REG
EOF
ip netns exec "$NS" docker-registry serve "$W/registry.yml" >"$W/logs/registry.log" 2>&1 </dev/null &
PIDS+=($!)
for _ in $(seq 100); do curl -sf "http://$REG/v2/" >/dev/null && break; sleep 0.1; done
curl -sf "http://$REG/v2/" >/dev/null || die "the registry did not start: $(cat "$W/logs/registry.log")"

DELAY_PID=
shape() { # rate rtt_ms
    # A larger bucket than startup.sh's: 64 KiB cannot carry 1 Gbit/s.
    link_shape "$1" 256kb 4mb
    if [[ -n $DELAY_PID ]]; then kill "$DELAY_PID"; wait "$DELAY_PID" 2>/dev/null || true; DELAY_PID=; fi
    if (($2 > 0)); then
        ip netns exec "$NS" "$W/bin/nfdelay" "$QNUM" $(($2 * 1000)) >"$W/logs/nfdelay.log" 2>&1 </dev/null &
        DELAY_PID=$!
        PIDS+=("$DELAY_PID")
        sleep 0.3
    fi
}
unshape() {
    if [[ -n $DELAY_PID ]]; then kill "$DELAY_PID"; wait "$DELAY_PID" 2>/dev/null || true; DELAY_PID=; fi
    link_unshape
}

OUT=$ROOT/bench/results/fetch-link.md
{
    echo "## Fetcher over real links ($(nproc) CPUs, $(uname -r))"
    echo
    echo "\`sudo bash bench/fetch-link.sh\`: the registry in a network namespace behind tc tbf (both directions) and an NFQUEUE delayer; curl and the fetcher (resolve, then every chunk fetched, decompressed, verified and written to the cache) run interleaved, ${BENCH_ROUNDS:-3} rounds each (\`BENCH_ROUNDS\`), medians. Target: the fetcher at >= 0.9x curl's throughput on the same link."
    echo
} >"$OUT"
for link in $LINKS; do
    rate=${link%%:*} rtt=${link##*:}
    log "link $rate, +$rtt ms RTT"
    shape "$rate" "$rtt"
    TMPDIR=$CACHE_TMP BENCH_REGISTRY=$REG BENCH_LINK="$rate, +$rtt ms RTT" BENCH_ONLY=registry \
        ./target/release/fetch >>"$OUT" 2>"$W/logs/fetch-$rate.log" || die "fetch bench failed: $(grep -A3 -m1 panicked "$W/logs/fetch-$rate.log")"
    echo >>"$OUT"
done
unshape
log "fetcher RSS with a ${SYNTHETIC_MB} MiB layer (unshaped veth)"
TMPDIR=$CACHE_TMP BENCH_REGISTRY=$REG BENCH_LINK="unshaped veth, ${SYNTHETIC_MB} MiB synthetic layer" BENCH_ONLY=registry,rss BENCH_SYNTHETIC_MB=$SYNTHETIC_MB \
    ./target/release/fetch >>"$OUT" 2>"$W/logs/fetch-rss.log" || die "fetch bench failed: $(grep -A3 -m1 panicked "$W/logs/fetch-rss.log")"
cat "$OUT"
