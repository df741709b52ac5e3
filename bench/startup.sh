#!/usr/bin/env bash
# bench/startup.sh: cold-start time of a container, side by side in one run:
#   overlayfs  ctr image pull + ctr run (containerd's own snapshotter)
#   go-stargz  ctr-remote image rpull + ctr run, the Go Stargz Snapshotter
#              (built from Debian's Go sources by ../shared/peer-stargz) on
#              the image converted by ctr-remote
#   stargaze   stargaze rpull + ctr run on our three services, on the image
#              converted by stargaze convert
# The workload hello-opt runs hello on optimized images: the files hello
# reads (from strace) prioritized, with a prefetch landmark; for the Go
# snapshotter converted by ctr-remote --estargz-record-in, for stargaze by
# stargaze convert --prioritized-files, from the same list.
# The registry (Debian's docker-registry) runs in a network namespace behind
# a veth pair shaped with tc tbf (RATE, both directions) and delayed with an
# NFQUEUE delayer (RTT_MS; this kernel has no netem), as
# ../shared/reference/anchor-python.md measured the first two columns.
#
# The image is built offline from Debian packages: debootstrap minbase
# bookworm, then `apt-get install python3` in an overlay (a Dockerfile RUN),
# 3 layers with python3-pip. It is cached in $WORK/img between runs.
#
# Every round is cold: images removed, snapshotter daemons restarted with
# empty roots and caches, the registry's files in the page cache (it stands
# for a remote server). Per round: pull time, run time (to the workload's
# exit), total, registry requests and bytes (from its access log), and the
# peak RSS of the snapshotter processes. Results: bench/results/startup.md
# and a bar chart of it, bench/results/startup.png (bench/chart.py).
#
# Environment: ROUNDS [5] rounds per method and workload (READALL_ROUNDS [1]
# for readall), RATE [100mbit],
# RTT_MS [20], WORK [/tmp/stargaze-startup], WORKLOADS [hello imports warm
# readall hello-opt], METHODS [overlayfs go-stargz stargaze], LOOPBACK_WORKLOADS [hello
# readall] (one more round of each with the link unshaped; "" = none), KEEP
# [0] (1 keeps the daemons and network for a look), SG_BIN [target/release]
# (where our binaries are: for A/B runs of two builds).
# Needs root. Touches nothing outside $WORK but one network namespace, one
# veth pair and its own processes, all removed at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SHARED=$(cd "$ROOT/.." && pwd)/shared
W=${WORK:-/tmp/stargaze-startup}
ROUNDS=${ROUNDS:-5}
RATE=${RATE:-100mbit}
RTT_MS=${RTT_MS:-20}
LOOPBACK_WORKLOADS=${LOOPBACK_WORKLOADS-hello readall}
WORKLOADS=${WORKLOADS:-hello imports warm readall hello-opt}
KEEP=${KEEP:-0}
NS=sgbench VH=sgb0 VN=sgb1 HOST_IP=10.213.41.1 REG_IP=10.213.41.2 PORT=5301 QNUM=7713
REG=$REG_IP:$PORT
REPO=py
CSOCK=$W/ctd/c.sock
PEER_SOCK=$W/peer/peer.sock
RLOG=$W/logs/registry.log
RESULTS=$W/results.tsv

# shellcheck source=bench/link.sh
source "$ROOT/bench/link.sh"
log() { echo "[$(date +%T)] $*" >&2; }
die() { log "FATAL: $*"; exit 1; }
now() { echo "$EPOCHREALTIME"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.3f", b - a}'; }

[[ $(id -u) -eq 0 ]] || die "needs root (containerd, FUSE, network namespaces)"
mkdir -p "$W"/{logs,pids,etc,bin,img,ctd,peer,sg}

# ------------------------------------------------------------------ daemons
start_daemon() { # name cmd...
    local name=$1
    shift
    nohup "$@" >>"$W/logs/$name.log" 2>&1 </dev/null &
    echo $! >"$W/pids/$name"
}
stop_daemon() { # name [signal]
    local f=$W/pids/$1 pid
    [[ -f $f ]] || return 0
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
        kill -"${2:-TERM}" "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    fi
    rm -f "$f"
}
pid_of() { cat "$W/pids/$1" 2>/dev/null || true; }
unmount_below() {
    awk -v p="$1" 'index($2, p) == 1 {print $2}' /proc/self/mounts | sort -r |
        while read -r m; do umount "$m" 2>/dev/null || umount -l "$m"; done
}
ctr_() { ctr --address "$CSOCK" --namespace bench "$@"; }
ctr_remote() { ctr-remote --address "$CSOCK" --namespace bench "$@"; }

teardown() {
    set +e
    if [[ $KEEP == 1 ]]; then
        log "KEEP=1: daemons and network left running (WORK=$W)"
        return
    fi
    if [[ -S $CSOCK ]]; then
        for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s SIGKILL "$t"; ctr_ tasks rm -f "$t"; done >/dev/null 2>&1
        for c in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers rm "$c"; done >/dev/null 2>&1
    fi
    for d in snapshotter fs fetcher peer containerd registry nfdelay; do stop_daemon $d; done
    unmount_below "$W/"
    link_destroy
    rm -rf /run/containerd/runc/bench
    find /sys/fs/cgroup -depth -type d -name bench -exec rmdir {} + 2>/dev/null
}
trap teardown EXIT

# ------------------------------------------------------------------ tools
need_packages() {
    local missing=()
    for p in "$@"; do
        [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == "install ok installed" ]] || missing+=("$p")
    done
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" </dev/null >"$W/logs/apt.log" 2>&1 ||
            { apt-get update </dev/null >>"$W/logs/apt.log" 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" </dev/null >>"$W/logs/apt.log" 2>&1; } ||
            die "apt-get install ${missing[*]} failed: $W/logs/apt.log"
    fi
}
log "tools"
bash scripts/deps.sh >/dev/null
need_packages debootstrap iptables gcc libc6-dev python3-matplotlib
cargo build --release -q -p stargaze-cli -p stargaze-fetcher -p stargaze-fs -p stargaze-snapshotter
BIN=${SG_BIN:-$ROOT/target/release}
[[ -f $SHARED/tools/nfdelay.c ]] || die "$SHARED/tools/nfdelay.c is missing (the team's tools live in ../shared beside the checkout)"
gcc -O2 -o "$W/bin/nfdelay" "$SHARED/tools/nfdelay.c" -lnetfilter_queue -lnfnetlink || die "building nfdelay"
PEER_BIN=
if [[ -f $SHARED/peer-stargz/build.sh ]]; then
    PEER_DIR=$ROOT/target/go-tools/peer-bench
    if [[ -x $PEER_DIR/containerd-stargz-grpc-peer ]] ||
        BUILD_DIR=$PEER_DIR GOCACHE=$ROOT/target/go-tools/gocache sh "$SHARED/peer-stargz/build.sh" >"$W/logs/peer-build.log" 2>&1; then
        PEER_BIN=$PEER_DIR/containerd-stargz-grpc-peer
    fi
fi
[[ -n $PEER_BIN ]] || log "the Go Stargz Snapshotter could not be built ($W/logs/peer-build.log): its column is skipped"

# ------------------------------------------------------------------ image
mirror() {
    local m
    m=$(grep -rhoE '^deb \[?[^]]*\]? ?https?://[^ ]+ bookworm ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
        grep -oE 'https?://[^ ]+' | grep -v security | head -1)
    [[ -n $m ]] || m=$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null |
        grep -oE 'https?://[^ ]+/debian/?$' | head -1)
    echo "${m:-http://deb.debian.org/debian}"
}
chroot_step() { # upper lowerdirs command
    local upper=$1 lower=$2 cmd=$3 m=$W/img/merged work=$W/img/work
    rm -rf "$upper" "$work"
    mkdir -p "$upper" "$work" "$m"
    mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work" "$m"
    mount --bind /etc/resolv.conf "$m/etc/resolv.conf"
    mount -t proc proc "$m/proc"
    local rc=0
    chroot "$m" /bin/sh -c "export DEBIAN_FRONTEND=noninteractive; apt-get update && $cmd && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb" || rc=$?
    umount "$m/proc" "$m/etc/resolv.conf" "$m"
    rm -rf "$work"
    return $rc
}
I=$W/img
if [[ ! -f $I/oci/index.json ]]; then
    if [[ ! -f $I/l1.done ]]; then
        log "image layer 1: debootstrap --variant=minbase bookworm ($(mirror))"
        rm -rf "$I/l1"
        debootstrap --variant=minbase bookworm "$I/l1" "$(mirror)" >"$W/logs/debootstrap.log" 2>&1 || die "debootstrap: $W/logs/debootstrap.log"
        rm -rf "$I/l1"/var/lib/apt/lists/* "$I/l1"/var/cache/apt/*.bin "$I/l1"/var/cache/apt/archives/*.deb
        mkdir -p "$I/l1/var/lib/apt/lists/partial"
        : >"$I/l1/etc/resolv.conf"
        touch "$I/l1.done"
    fi
    if [[ ! -f $I/l2.done ]]; then
        log "image layer 2: apt-get install python3"
        chroot_step "$I/l2" "$I/l1" "apt-get install -y --no-install-recommends python3" >"$W/logs/layer2.log" 2>&1 || die "layer 2: $W/logs/layer2.log"
        touch "$I/l2.done"
    fi
    if [[ ! -f $I/l3.done ]]; then
        log "image layer 3: apt-get install python3-pip"
        chroot_step "$I/l3" "$I/l2:$I/l1" "apt-get install -y --no-install-recommends python3-pip" >"$W/logs/layer3.log" 2>&1 || die "layer 3: $W/logs/layer3.log"
        touch "$I/l3.done"
    fi
    log "writing the OCI layout"
    rm -rf "$I/oci"
    python3 bench/mkimage.py "$I/oci" latest "$I/l1" "$I/l2" "$I/l3" | tee "$W/image.txt"
fi
# Converted on every run, by the converter being measured (its output may
# change: annotations, chunking); it takes seconds.
log "stargaze convert --format estargz"
rm -rf "$I/esgz" "$I/esgz-opt"
t0=$(now)
"$BIN/stargaze" convert --format estargz "oci:$I/oci:latest" "oci:$I/esgz:esgz" >"$W/logs/convert.log" 2>&1 || die "convert: $W/logs/convert.log"
echo "stargaze convert: $(since "$t0") s" >"$W/convert-times.txt"

# What `python3 -c 'print("hi")'` reads, for the lower bound: its opens under
# strace in a read-only overlay of the layer directories, then each file's
# compressed bytes in our eStargz layers (from their TOCs).
ro=$I/ro
mkdir -p "$ro"
mount -t overlay overlay -o "lowerdir=$I/l3:$I/l2:$I/l1" "$ro"
if [[ ! -s $W/strace-hello.txt ]]; then
    log "measuring what the hello workload reads (strace)"
    need_packages strace
    strace -f -qq -e trace=execve,openat,open -o "$W/strace-hello.txt" \
        env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
        chroot "$ro" python3 -c 'print("hi")' >/dev/null
fi
python3 bench/needed.py --list "$W/prioritized-hello.txt" "$W/strace-hello.txt" "$ro" "$I/esgz" "$I/l1" "$I/l2" "$I/l3" >"$W/needed-hello.txt" ||
    { umount "$ro"; die "bench/needed.py failed"; }
umount "$ro"
cat "$W/needed-hello.txt" >&2
# The optimized image: hello's files first, behind a prefetch landmark.
log "stargaze convert --prioritized-files (hello's $(wc -l <"$W/prioritized-hello.txt") files)"
"$BIN/stargaze" convert --format estargz --prioritized-files "$W/prioritized-hello.txt" \
    "oci:$I/oci:latest" "oci:$I/esgz-opt:esgz-opt" >"$W/logs/convert-opt.log" 2>&1 || die "convert: $W/logs/convert-opt.log"
# ctr-remote reads the same list as `ctr-remote image optimize` records it.
python3 -c 'import json, sys; [print(json.dumps({"path": l.strip()})) for l in open(sys.argv[1]) if l.strip()]' \
    "$W/prioritized-hello.txt" >"$W/record-hello.json"

# ------------------------------------------------------------------ network
log "network: namespace $NS, veth $VH/$VN, $RATE, +${RTT_MS} ms RTT"
# Packets into the namespace wait in NFQUEUE for nfdelay (bypassed when it is not running).
link_create
shape_on() {
    link_shape "$RATE" 64kb 2mb
    if [[ -z $(pid_of nfdelay) ]]; then
        start_daemon nfdelay ip netns exec "$NS" "$W/bin/nfdelay" "$QNUM" $((RTT_MS * 1000))
        sleep 0.3
    fi
}
shape_off() {
    stop_daemon nfdelay
    link_unshape
}

# ------------------------------------------------------------------ registry
rm -rf "$W/registry"
cat >"$W/etc/registry.yml" <<EOF
version: 0.1
log: {level: info, formatter: text}
storage:
  filesystem: {rootdirectory: $W/registry}
  delete: {enabled: true}
http:
  addr: $REG
EOF
: >"$RLOG"
start_daemon registry ip netns exec "$NS" docker-registry serve "$W/etc/registry.yml"
for _ in $(seq 100); do curl -sf "http://$REG/v2/" >/dev/null && break; sleep 0.1; done
curl -sf "http://$REG/v2/" >/dev/null || die "the registry did not start"
log "pushing the image and our eStargz conversion"
skopeo --insecure-policy copy -q --dest-tls-verify=false "oci:$I/oci:latest" "docker://$REG/$REPO:latest"
skopeo --insecure-policy copy -q --dest-tls-verify=false "oci:$I/esgz:esgz" "docker://$REG/$REPO:esgz"
skopeo --insecure-policy copy -q --dest-tls-verify=false "oci:$I/esgz-opt:esgz-opt" "docker://$REG/$REPO:esgz-opt"

# ------------------------------------------------------------------ containerd and snapshotters
cat >"$W/etc/containerd.toml" <<EOF
version = 2
root = "$W/ctd/root"
state = "$W/ctd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$CSOCK"
[ttrpc]
  address = "$CSOCK.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$W/ctd/opt"
[proxy_plugins]
  [proxy_plugins.stargz]
    type = "snapshot"
    address = "$PEER_SOCK"
  [proxy_plugins.stargaze]
    type = "snapshot"
    address = "$W/sg/snapshotter.sock"
EOF
cat >"$W/etc/peer.toml" <<EOF
[[resolver.host."$REG".mirrors]]
  host = "$REG"
  insecure = true
EOF
cat >"$W/etc/stargaze.toml" <<EOF
[fetcher]
socket = "$W/sg/fetcher.sock"
cache_dir = "$W/sg/cache"
[fs]
socket = "$W/sg/fs.sock"
mountpoint = "$W/sg/mnt"
[snapshotter]
socket = "$W/sg/snapshotter.sock"
root = "$W/sg/root"
[log]
level = "${SG_LOG_LEVEL:-info}"
EOF
# Our fetcher reads containerd's hosts.toml for plain HTTP, as containerd would.
mkdir -p "$W/etc/certs.d/$REG"
cat >"$W/etc/certs.d/$REG/hosts.toml" <<EOF
server = "http://$REG"
[host."http://$REG"]
  capabilities = ["pull", "resolve"]
EOF
start_daemon containerd containerd --config "$W/etc/containerd.toml"
for _ in $(seq 100); do ctr --address "$CSOCK" version >/dev/null 2>&1 && break; sleep 0.1; done
ctr --address "$CSOCK" version >/dev/null 2>&1 || die "containerd did not start: $W/logs/containerd.log"

# containerd redials a restarted proxy plugin with backoff: wait until a
# snapshot call reaches it.
wait_plugin() { # snapshotter name
    for _ in $(seq 100); do
        if ctr_ snapshots --snapshotter "$1" prepare probe >/dev/null 2>&1; then
            ctr_ snapshots --snapshotter "$1" rm probe >/dev/null 2>&1
            return 0
        fi
        sleep 0.1
    done
    die "containerd cannot reach snapshotter $1"
}
reset_peer() {
    [[ -n $PEER_BIN ]] || return 0
    stop_daemon peer INT
    unmount_below "$W/peer/"
    rm -rf "$W/peer/root"
    start_daemon peer "$PEER_BIN" -address "$PEER_SOCK" -config "$W/etc/peer.toml" -root "$W/peer/root" -log-level info
    for _ in $(seq 100); do [[ -S $PEER_SOCK ]] && break; sleep 0.05; done
    wait_plugin stargz
}
reset_stargaze() {
    for d in snapshotter fs fetcher; do stop_daemon $d; done
    unmount_below "$W/sg/"
    rm -rf "$W/sg/cache" "$W/sg/root"
    for d in fetcher fs snapshotter; do
        local extra=()
        [[ $d == fetcher ]] && extra=(--hosts-dir "$W/etc/certs.d")
        start_daemon $d "$BIN/stargaze-$d" --config "$W/etc/stargaze.toml" "${extra[@]}"
        for _ in $(seq 200); do [[ -S $W/sg/$d.sock ]] && break; sleep 0.02; done
    done
    wait_plugin stargaze
}
remove_images() {
    local images
    images=$(ctr_ images ls -q 2>/dev/null)
    [[ -z $images ]] || ctr_ images rm --sync $images >/dev/null 2>&1 || true
}
# A cold node: no images, every snapshotter restarted empty (a daemon left
# running would keep fetching in the background over the same link).
cold() {
    remove_images
    reset_peer
    reset_stargaze
    # The registry stands for a remote server: its blobs come from memory.
    find "$W/registry" -type f -name data -exec cat {} + >/dev/null
    sync
    sleep 1
}

if [[ -n $PEER_BIN ]]; then
    log "ctr-remote image convert --estargz --oci (for the Go Stargz Snapshotter)"
    ctr_ image pull --plain-http "$REG/$REPO:latest" >"$W/logs/ctr-remote.log" 2>&1
    t0=$(now)
    ctr_remote image convert --estargz --oci "$REG/$REPO:latest" "$REG/$REPO:esgz-go" >>"$W/logs/ctr-remote.log" 2>&1 || die "ctr-remote convert: $W/logs/ctr-remote.log"
    echo "ctr-remote image convert --estargz: $(since "$t0") s" >"$W/convert-times-go.txt"
    ctr_ image push --plain-http "$REG/$REPO:esgz-go" >>"$W/logs/ctr-remote.log" 2>&1 || die "push: $W/logs/ctr-remote.log"
    ctr_remote image convert --estargz --oci --estargz-record-in "$W/record-hello.json" "$REG/$REPO:latest" "$REG/$REPO:esgz-go-opt" >>"$W/logs/ctr-remote.log" 2>&1 || die "ctr-remote convert (record-in): $W/logs/ctr-remote.log"
    ctr_ image push --plain-http "$REG/$REPO:esgz-go-opt" >>"$W/logs/ctr-remote.log" 2>&1 || die "push: $W/logs/ctr-remote.log"
    remove_images
fi

# ------------------------------------------------------------------ rounds
workload() { # name -> argv
    case $1 in
    hello | warm | hello-opt) argv=(python3 -c 'print("hi")') ;;
    imports) argv=(python3 -c 'import json, email, http.server, sqlite3, unittest, asyncio, xml.dom.minidom; print("imported")') ;;
    readall) argv=(sh -c 'find /usr -xdev -type f -exec cat {} + | wc -c') ;;
    *) die "unknown workload $1" ;;
    esac
}
regmark() { wc -l <"$RLOG"; }
# requests, bytes since line $1 of the registry's access log
regsum() {
    tail -n +$(($1 + 1)) "$RLOG" | { grep -oE '"(GET|HEAD) /v2/[^ ]* HTTP/[0-9.]+" [0-9]{3} [0-9-]+' || true; } |
        awk '{n++; if ($NF ~ /^[0-9]+$/) b += $NF} END {printf "%d\t%d", n, b}'
}
rss_kb() { # peak RSS (VmHWM) of the named daemons, summed
    local sum=0 p v
    for d in "$@"; do
        p=$(pid_of "$d")
        [[ -n $p ]] || continue
        v=$(awk '/VmHWM/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
        sum=$((sum + ${v:-0}))
    done
    echo $sum
}
run_container() { # snapshotter ref id argv...
    local sn=$1 ref=$2 id=$3
    shift 3
    ctr_ run --rm --snapshotter "$sn" "$ref" "$id" "$@"
}
round() { # workload method [label]
    local wl=$1 method=$2 label=${3:-$1} ref pull sn daemons
    # Optimized images exist for the lazy pullers only.
    [[ $wl == *-opt && $method == overlayfs ]] && return 0
    local opt=
    [[ $wl == *-opt ]] && opt=-opt
    case $method in
    overlayfs) ref=$REG/$REPO:latest sn=overlayfs daemons="" pull=(ctr_ image pull --plain-http "$ref") ;;
    go-stargz) ref=$REG/$REPO:esgz-go$opt sn=stargz daemons="peer" pull=(ctr_remote image rpull --plain-http --snapshotter stargz "$ref") ;;
    stargaze) ref=$REG/$REPO:esgz$opt sn=stargaze daemons="fetcher fs snapshotter" pull=(env STARGAZE_LOG=stargaze=debug,stargaze_registry=debug "$BIN/stargaze" rpull --quiet --address "$CSOCK" --namespace bench --plain-http --snapshotter stargaze "$ref") ;;
    esac
    local argv
    workload "$wl"
    cold
    local m t0 t1 out
    m=$(regmark)
    t0=$(now)
    "${pull[@]}" >"$W/logs/pull-$method.out" 2>&1 || die "$method pull failed: $(tail -3 "$W/logs/pull-$method.out")"
    local tp
    tp=$(since "$t0")
    if [[ $wl == warm ]]; then
        # the first container warms the node; the second is measured
        run_container "$sn" "$ref" "first$RANDOM" "${argv[@]}" >"$W/logs/first.out" 2>&1 ||
            die "$method $wl: the first container failed: $(tail -3 "$W/logs/first.out")"
        sleep 2
        m=$(regmark)
        t0=$(now)
        tp=0
    fi
    t1=$(now)
    out=$(run_container "$sn" "$ref" "b$RANDOM" "${argv[@]}" 2>&1 | tail -1) || die "$method $wl run failed: $out"
    local tr tt reg
    tr=$(since "$t1")
    tt=$(since "$t0")
    reg=$(regsum "$m")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$method" "$tt" "$tp" "$tr" "$reg" "$(rss_kb $daemons)" "$out" | tee -a "$RESULTS" >&2
}

log "link check"
shape_on
{
    echo "tc: $(tc qdisc show dev "$VH" | head -1)"
    for _ in 1 2 3; do curl -s -o /dev/null -w "GET /v2/: connect %{time_connect} s, first byte %{time_starttransfer} s\n" "http://$REG/v2/"; done
} | tee "$W/link.txt" >&2

: >"$RESULTS"
methods=(overlayfs stargaze)
[[ -n $PEER_BIN ]] && methods=(overlayfs go-stargz stargaze)
# METHODS limits the columns (the report needs overlayfs for the bound).
if [[ -n ${METHODS:-} ]]; then read -ra methods <<<"$METHODS"; fi
for wl in $WORKLOADS; do
    n=$ROUNDS
    # Reading most of the image is slow by nature; fewer rounds.
    [[ $wl == readall ]] && n=${READALL_ROUNDS:-1}
    for i in $(seq "$n"); do
        for method in "${methods[@]}"; do
            log "$wl round $i: $method"
            round "$wl" "$method"
        done
    done
done
shape_off
# The same workloads without shaping or delay (the veth alone): what is left
# when the link is not the bottleneck.
for wl in $LOOPBACK_WORKLOADS; do
    for method in "${methods[@]}"; do
        log "$wl unshaped: $method"
        round "$wl" "$method" "$wl@unshaped"
    done
done
remove_images

# ------------------------------------------------------------------ report
python3 - "$RESULTS" "$W" "$RATE" "$RTT_MS" "$ROUNDS" >"$ROOT/bench/results/startup.md" <<'PY'
import os, platform, re, statistics, subprocess, sys
results, work, rate, rtt, rounds = sys.argv[1:6]
rows = [l.rstrip("\n").split("\t") for l in open(results) if l.strip()]
def version(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
    except Exception:
        return "?"
print("# Cold start: full pull vs Go Stargz Snapshotter vs stargaze\n")
print(f"`make bench` (bench/startup.sh), {rounds} cold rounds per cell, median [min-max].")
print(f"Link: registry in a network namespace, tc tbf {rate} both ways, +{rtt} ms RTT (NFQUEUE delayer).")
print(f"Machine: {os.cpu_count()} CPUs, kernel {platform.release()}; {version(['containerd', '--version'])}.")
image = open(os.path.join(work, "image.txt")).read().strip().replace("\n", "; ") if os.path.exists(os.path.join(work, "image.txt")) else "?"
print(f"Image: Debian bookworm minbase + python3 + python3-pip ({image}).\n")
workloads = []
for r in rows:
    if r[0] not in workloads:
        workloads.append(r[0])
base_desc = {"hello": "`python3 -c 'print(\"hi\")'`", "imports": "python3 importing json, email, http.server, sqlite3, unittest, asyncio, xml.dom.minidom",
        "readall": "`find /usr -type f -exec cat {} +` (reads most of the image)",
        "hello-opt": "hello on optimized images: the files it reads prioritized behind a prefetch landmark (ctr-remote --estargz-record-in for Go, stargaze convert --prioritized-files, one list)", "warm": "a second container of the same image (node already warm); pull column = 0"}
def desc(wl):
    base, _, link = wl.partition("@")
    d = base_desc.get(base, base)
    return d + (", unshaped link (no tbf, no added delay), 1 round" if link else "")
for wl in workloads:
    print(f"## {wl}: {desc(wl)}\n")
    print("| method | total s | pull s | run s | registry requests | MB from registry | peak RSS of snapshotter processes MB | output |")
    print("|---|---|---|---|---|---|---|---|")
    med = {}
    for method in ["overlayfs", "go-stargz", "stargaze"]:
        rs = [r for r in rows if r[0] == wl and r[1] == method]
        if not rs:
            continue
        def cell(i, scale=1.0, fmt="{:.2f}"):
            v = [float(r[i]) / scale for r in rs]
            return fmt.format(statistics.median(v)) + " [" + fmt.format(min(v)) + "-" + fmt.format(max(v)) + "]"
        med[method] = statistics.median(float(r[2]) for r in rs)
        print(f"| {method} | {cell(2)} | {cell(3)} | {cell(4)} | {cell(5, fmt='{:.0f}')} | {cell(6, 1e6, '{:.1f}')} | {cell(7, 1024, '{:.0f}')} | {rs[-1][8]} |")
    if "stargaze" in med:
        ratios = [f"{med['stargaze'] / med[m]:.2f}x {m}" for m in ("overlayfs", "go-stargz") if m in med]
        print(f"\nstargaze total time = {', '.join(ratios)} (median vs median; lower is better).\n")
    needed_path = os.path.join(work, "needed-hello.txt")
    if wl in ("hello", "hello-opt") and "stargaze" in med and os.path.exists(needed_path):
        needed = dict(l.split() for l in open(needed_path) if l.strip())
        comp = int(needed["compressed_bytes"]) + int(needed.get("toc_bytes", 0))
        m = re.match(r"([0-9.]+)\s*([kmg]?)bit", rate.lower())
        bps = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)] if m else 100e6
        local = [float(r[4]) for r in rows if r[0] == "warm" and r[1] == "overlayfs"] or \
                [float(r[4]) for r in rows if r[0] == "hello" and r[1] == "overlayfs"]
        if not local:
            continue  # no overlayfs column (METHODS): no local run time for the bound
        local = statistics.median(local)
        # manifest, config, the layers' TOCs (in parallel), the data (in parallel)
        trips = 4
        bound = comp * 8 / bps + trips * float(rtt) / 1000 + local
        fetched = statistics.median(float(r[6]) for r in rows if r[0] == wl and r[1] == "stargaze")
        if "go-stargz" in med:
            go_fetched = statistics.median(float(r[6]) for r in rows if r[0] == wl and r[1] == "go-stargz")
            go_bytes = f" (Go Stargz: {go_fetched / comp:.2f}x)"
        else:
            go_bytes = ""
        print(f"Lower bound: {bound:.2f} s = {comp / 1e6:.2f} MB needed (the compressed chunks of the "
              f"{needed['files']} files the workload reads, {int(needed['bytes']) / 1e6:.2f} MB uncompressed, "
              f"and the layers' TOCs) at {rate}, "
              f"+ {trips} round trips of {rtt} ms, + {local:.2f} s local run (overlayfs, image on disk). "
              f"stargaze = {med['stargaze'] / bound:.2f}x the bound; it read {fetched / comp:.2f}x the needed bytes{go_bytes}.\n")
times = [open(os.path.join(work, f)).read().strip() for f in ("convert-times.txt", "convert-times-go.txt") if os.path.exists(os.path.join(work, f))]
print("Conversion of the image: " + "; ".join(times) + ".")
PY
cat "$ROOT/bench/results/startup.md"
# Debian's python3 (with python3-matplotlib), whatever python3 is first on PATH.
/usr/bin/python3 "$ROOT/bench/chart.py" "$ROOT/bench/results/startup.md" "$ROOT/bench/results/startup.png"
