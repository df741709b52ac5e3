#!/usr/bin/env bash
# bench/startup.sh: cold-start time of a container, side by side in one run:
#   overlayfs  ctr image pull + ctr run (containerd's own snapshotter)
#   go-stargz  ctr-remote image rpull + ctr run, the Go Stargz Snapshotter
#              (built from Debian's Go sources by ../shared/peer-stargz) on
#              the image converted by ctr-remote
#   stargaze   stargaze rpull + ctr run on our three services, on the image
#              converted by stargaze convert
#   stargaze-trace  the same, a second cold pull that has the access trace
#              the fetcher learned in the stargaze round just before (the
#              cache emptied but for traces/; nothing else carried over)
# Images (bench/images/*.sh, one recipe each; built offline from Debian
# packages: debootstrap minbase bookworm, then apt-get install in further
# layers, cached in $WORK/img between runs):
#   py    python3 + python3-pip, config Cmd ["python3"]: hello, imports,
#         warm (a second container on a warm node), readall (reads /usr)
#   pyb   the same layers with Cmd ["bash"]: hello-bash
#   cc    gcc + libc6-dev + a C file: cc (compile, link and run it)
#   perl  perl + a #! script: perl (the script loads 13 modules)
#   java  openjdk-17-jre-headless + a jar: java (java -jar)
#   pipe  file + xz-utils: pipe (a sh script of pipelines over small files)
# Every workload's command is given at `ctr run`; only hello's image names
# its program in the config. NAME-opt runs NAME's command on optimized images
# (the image's profile workload's files, from strace, first behind a prefetch
# landmark: for the Go snapshotter converted by ctr-remote
# --estargz-record-in, for stargaze by stargaze convert --prioritized-files,
# from the same list). Workloads with a lower bound (all but warm and
# readall): the compressed bytes of what they read (bench/needed.py, from an
# strace of the command in a chroot of the image) at the link's rate, 4
# round trips and the command's run time on a warm overlayfs node; a second
# bound counts only the chunks holding the pages it touched
# (bench/pagecache.py), for programs that map large files sparsely (a JVM).
# The registry (Debian's docker-registry) runs in a network namespace behind
# a veth pair shaped with tc tbf (RATE, both directions) and delayed with an
# NFQUEUE delayer (RTT_MS; this kernel has no netem), as
# ../shared/reference/anchor-python.md measured the first two columns.
#
# Every round is cold: images removed, snapshotter daemons restarted with
# empty roots and caches, the registry's files in the page cache (it stands
# for a remote server). Per round: pull time, run time (to the workload's
# exit), total, registry requests and bytes (from its access log), and the
# peak RSS of the snapshotter processes; the output's last line must match
# the workload's pattern. Results: bench/results/startup.md (a summary
# table, then one table per workload) and a bar chart of it,
# bench/results/startup.png (bench/chart.py).
#
# Runtime of a full run (every image and workload, images cached, on the
# 2-core build machine): 33 min with ROUNDS=3 (measured on 2026-12-07: 11 min
# before the first round, mostly ctr-remote's 12 conversions, and 22 min of
# rounds), so about 48 min with the default ROUNDS=5. The first run also
# builds the images: 5 min from deb.debian.org.
#
# Environment: ROUNDS [5] rounds per method and workload (READALL_ROUNDS [1]
# for readall), RATE [100mbit], RTT_MS [20], WORK [/tmp/stargaze-startup],
# IMAGES [py pyb cc perl java pipe] (runs these images' workloads),
# WORKLOADS [every workload of IMAGES: hello imports warm readall hello-opt
# hello-bash hello-bash-opt cc cc-opt perl perl-opt java java-opt pipe
# pipe-opt], METHODS [overlayfs go-stargz stargaze stargaze-trace; also
# stargaze-b: stargaze with SG_B_FETCHER's lines added to [fetcher], SG_B_FS's
# to [fs], and the
# daemons of SG_B_BIN [SG_BIN], an A/B of a setting or of two builds in one
# run; stargaze-b-trace: stargaze-trace of the variant, after a
# stargaze-b round], LOOPBACK_WORKLOADS
# [hello readall, if chosen] (one more round of each with the link unshaped;
# "" = none), KEEP [0] (1 keeps the daemons and network for a look), SG_BIN
# [target/release] (where our binaries are: for A/B runs of two builds),
# RESULTS_MD [bench/results/startup.md] (the chart goes beside it, .png).
# Needs root. Touches nothing outside $WORK but one network namespace, one
# veth pair and its own processes, all removed at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SHARED=$(cd "$ROOT/.." && pwd)/shared
W=${WORK:-/tmp/stargaze-startup}
I=$W/img
ROUNDS=${ROUNDS:-5}
RATE=${RATE:-100mbit}
RTT_MS=${RTT_MS:-20}
ALL_WORKLOADS="hello imports warm readall hello-opt hello-bash hello-bash-opt cc cc-opt perl perl-opt java java-opt pipe pipe-opt"
IMAGES=${IMAGES:-py pyb cc perl java pipe}
KEEP=${KEEP:-0}
RESULTS_MD=${RESULTS_MD:-$ROOT/bench/results/startup.md}
FETCHER_METRICS_PORT=${FETCHER_METRICS_PORT:-9771}
PURPOSES=$W/purposes.tsv
NS=sgbench VH=sgb0 VN=sgb1 HOST_IP=10.213.41.1 REG_IP=10.213.41.2 PORT=5301 QNUM=7713
REG=$REG_IP:$PORT
CSOCK=$W/ctd/c.sock
PEER_SOCK=$W/peer/peer.sock
RLOG=$W/logs/registry.log
RESULTS=$W/results.tsv

# shellcheck source=bench/link.sh
source "$ROOT/bench/link.sh"
# shellcheck source=bench/startup/images.sh
source "$ROOT/bench/startup/images.sh"
for recipe_file in "$ROOT"/bench/images/*.sh; do
    # shellcheck disable=SC1090
    source "$recipe_file"
done
log() { echo "[$(date +%T)] $*" >&2; }
die() { log "FATAL: $*"; exit 1; }
now() { echo "$EPOCHREALTIME"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.3f", b - a}'; }

[[ $(id -u) -eq 0 ]] || die "needs root (containerd, FUSE, network namespaces)"
RUN_START=$(now)
mkdir -p "$W"/{logs,pids,etc,bin,img,ctd,peer,sg}
rm -f "$W"/needed-*.txt "$W"/prioritized-*.txt "$W"/record-*.json

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

# ------------------------------------------------------------------ images
# What runs: WORKLOADS, or every workload of IMAGES; the loopback rounds of
# those chosen; the images all of them need.
if [[ -z ${WORKLOADS:-} ]]; then
    WORKLOADS=
    for wl in $ALL_WORKLOADS; do
        workload "$wl"
        [[ " $IMAGES " == *" $image "* ]] && WORKLOADS+="$wl "
    done
fi
if [[ -z ${LOOPBACK_WORKLOADS+set} ]]; then
    LOOPBACK_WORKLOADS=
    for wl in hello readall; do [[ " $WORKLOADS " == *" $wl "* ]] && LOOPBACK_WORKLOADS+="$wl "; done
fi
images=()
: >"$W/workloads.tsv"
for wl in $WORKLOADS $LOOPBACK_WORKLOADS; do
    workload "$wl"
    [[ " ${images[*]} " == *" $image "* ]] || images+=("$image")
    printf '%s\t%s\t%s\n' "$wl" "$image" "$what" >>"$W/workloads.tsv"
done
log "workloads: $WORKLOADS; unshaped: ${LOOPBACK_WORKLOADS:-none}; images: ${images[*]}"
: >"$W/images.tsv"
: >"$W/convert-times.tsv"
for img in "${images[@]}"; do
    build_image "$img"
    convert_image "$img"
done
# The lower bounds of the workloads that are not an image's profile.
for wl in $WORKLOADS; do
    workload "$wl"
    [[ $wl == *-opt || $bound != 1 || -s $W/needed-$wl.txt ]] || measure_needed "$wl"
done

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
for img in "${images[@]}"; do
    log "pushing image $img and our eStargz conversions"
    skopeo --insecure-policy copy -q --dest-tls-verify=false "oci:$I/$img/oci:latest" "docker://$REG/$img:latest"
    skopeo --insecure-policy copy -q --dest-tls-verify=false "oci:$I/$img/esgz:esgz" "docker://$REG/$img:esgz"
    skopeo --insecure-policy copy -q --dest-tls-verify=false "oci:$I/$img/esgz-opt:esgz-opt" "docker://$REG/$img:esgz-opt"
done

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
metrics_address = "127.0.0.1:$FETCHER_METRICS_PORT"
[fs]
socket = "$W/sg/fs.sock"
mountpoint = "$W/sg/mnt"
[snapshotter]
socket = "$W/sg/snapshotter.sock"
root = "$W/sg/root"
[log]
level = "${SG_LOG_LEVEL:-info}"
EOF
# An A/B variant (method stargaze-b): the same config with SG_B_FETCHER's
# lines added to [fetcher] and SG_B_FS's to [fs], e.g.
# SG_B_FETCHER='read_amplify = 0', SG_B_FS='transport = "io_uring"'.
awk -v extra="${SG_B_FETCHER:-}" -v fs="${SG_B_FS:-}" '{print}
    /^\[fetcher\]$/ && extra != "" {print extra}
    /^\[fs\]$/ && fs != "" {print fs}' \
    "$W/etc/stargaze.toml" >"$W/etc/stargaze-b.toml"
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
reset_stargaze() { # [keep-traces]
    for d in snapshotter fs fetcher; do stop_daemon $d; done
    unmount_below "$W/sg/"
    rm -rf "$W/sg/traces"
    [[ ${1:-} == keep-traces && -d $W/sg/cache/traces ]] && mv "$W/sg/cache/traces" "$W/sg/traces"
    rm -rf "$W/sg/cache" "$W/sg/root"
    if [[ -d $W/sg/traces ]]; then
        mkdir -p "$W/sg/cache"
        mv "$W/sg/traces" "$W/sg/cache/traces"
    fi
    for d in fetcher fs snapshotter; do
        local extra=()
        [[ $d == fetcher ]] && extra=(--hosts-dir "$W/etc/certs.d")
        start_daemon $d "${SG_DAEMON_BIN:-$BIN}/stargaze-$d" --config "$W/etc/stargaze${SG_VARIANT:-}.toml" "${extra[@]}"
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
cold() { # [keep-traces]
    remove_images
    reset_peer
    reset_stargaze "${1:-}"
    # The registry stands for a remote server: its blobs come from memory.
    find "$W/registry" -type f -name data -exec cat {} + >/dev/null
    sync
    sleep 1
}

: >"$W/convert-times-go.tsv"
# Go Stargz's images only when its column is measured.
if [[ -n $PEER_BIN && " ${METHODS:-go-stargz} " == *" go-stargz "* ]]; then
    for img in "${images[@]}"; do
        log "image $img: ctr-remote image convert --estargz --oci (for the Go Stargz Snapshotter)"
        ctr_ image pull --plain-http "$REG/$img:latest" >"$W/logs/ctr-remote-$img.log" 2>&1
        t0=$(now)
        ctr_remote image convert --estargz --oci "$REG/$img:latest" "$REG/$img:esgz-go" >>"$W/logs/ctr-remote-$img.log" 2>&1 ||
            die "ctr-remote convert: $W/logs/ctr-remote-$img.log"
        printf '%s\tctr-remote image convert --estargz\t%s\n' "$img" "$(since "$t0")" >>"$W/convert-times-go.tsv"
        ctr_ image push --plain-http "$REG/$img:esgz-go" >>"$W/logs/ctr-remote-$img.log" 2>&1 || die "push: $W/logs/ctr-remote-$img.log"
        ctr_remote image convert --estargz --oci --estargz-record-in "$W/record-$img.json" "$REG/$img:latest" "$REG/$img:esgz-go-opt" >>"$W/logs/ctr-remote-$img.log" 2>&1 ||
            die "ctr-remote convert (record-in): $W/logs/ctr-remote-$img.log"
        ctr_ image push --plain-http "$REG/$img:esgz-go-opt" >>"$W/logs/ctr-remote-$img.log" 2>&1 || die "push: $W/logs/ctr-remote-$img.log"
        remove_images
    done
fi

# ------------------------------------------------------------------ rounds
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
    local wl=$1 method=$2 label=${3:-$1} ref pull sn daemons opt=
    # Optimized images exist for the lazy pullers only; a learned trace
    # is measured on plain images.
    [[ $wl == *-opt && $method == overlayfs ]] && return 0
    [[ $wl == *-opt && $method == stargaze*-trace ]] && return 0
    [[ $wl == *-opt ]] && opt=-opt
    local image argv expect what bound
    workload "$wl"
    case $method in
    overlayfs) ref=$REG/$image:latest sn=overlayfs daemons="" pull=(ctr_ image pull --plain-http "$ref") ;;
    go-stargz) ref=$REG/$image:esgz-go$opt sn=stargz daemons="peer" pull=(ctr_remote image rpull --plain-http --snapshotter stargz "$ref") ;;
    stargaze | stargaze-trace | stargaze-b | stargaze-b-trace) ref=$REG/$image:esgz$opt sn=stargaze daemons="fetcher fs snapshotter" pull=(env STARGAZE_LOG=stargaze=debug,stargaze_registry=debug "$BIN/stargaze" rpull --quiet --address "$CSOCK" --namespace bench --plain-http --snapshotter stargaze "$ref") ;;
    *) die "unknown method $method (METHODS: overlayfs go-stargz stargaze stargaze-trace stargaze-b stargaze-b-trace)" ;;
    esac
    SG_VARIANT= SG_DAEMON_BIN=
    [[ $method == stargaze-b* ]] && SG_VARIANT=-b SG_DAEMON_BIN=${SG_B_BIN:-}
    if [[ $method == stargaze*-trace ]]; then
        cold keep-traces
        [[ -n $(ls "$W/sg/cache/traces" 2>/dev/null) ]] || die "stargaze-trace $wl: no trace was learned in the stargaze round before it"
    else
        cold
    fi
    local m t0 t1 out
    m=$(regmark)
    t0=$(now)
    "${pull[@]}" >"$W/logs/pull-$method.out" 2>&1 || die "$method pull of $ref failed: $(tail -3 "$W/logs/pull-$method.out")"
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
    if ! [[ $out =~ $expect ]]; then
        # Under heavy load ctr has lost a container's output; such a round
        # measures nothing. Run it again once; a second miss is a failure.
        [[ ${ROUND_RETRY:-0} == 0 ]] || die "$method $wl on $ref: the output's last line '$out' does not match /$expect/ (twice)"
        log "WARNING: $method $wl on $ref: the output's last line '$out' does not match /$expect/; running the round again"
        ROUND_RETRY=1 round "$@"
        return
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$method" "$tt" "$tp" "$tr" "$reg" "$(rss_kb $daemons)" "$out" | tee -a "$RESULTS" >&2
    if [[ $method == stargaze* ]]; then
        # What our registry bytes were for (the fetcher's counters, to the
        # workload's exit): one line per purpose.
        curl -sf "http://127.0.0.1:$FETCHER_METRICS_PORT/metrics" |
            awk -v l="$label" -v m="$method" -F'[{}"= ]+' '/^stargaze_fetcher_fetched_bytes_total\{/ {printf "%s\t%s\t%s\t%s\n", l, m, $3, $4}' >>"$PURPOSES" || true
    fi
    if [[ $method == overlayfs && $bound == 1 && $label == "$wl" ]]; then
        # The lower bound's local run: the same command again, image on disk.
        t1=$(now)
        out=$(run_container "$sn" "$ref" "l$RANDOM" "${argv[@]}" 2>&1 | tail -1) || die "$method $wl local run failed: $out"
        tr=$(since "$t1")
        printf '%s\tlocal\t%s\t0\t%s\t0\t0\t0\t%s\n' "$label" "$tr" "$tr" "$out" >>"$RESULTS"
    fi
}

log "link check"
shape_on
{
    echo "tc: $(tc qdisc show dev "$VH" | head -1)"
    for _ in 1 2 3; do curl -s -o /dev/null -w "GET /v2/: connect %{time_connect} s, first byte %{time_starttransfer} s\n" "http://$REG/v2/"; done
} | tee "$W/link.txt" >&2

: >"$RESULTS"
: >"$PURPOSES"
methods=(overlayfs stargaze stargaze-trace)
[[ -n $PEER_BIN ]] && methods=(overlayfs go-stargz stargaze stargaze-trace)
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
awk -v s="$(since "$RUN_START")" 'BEGIN {printf "%.0f min\n", s / 60}' >"$W/runtime.txt"
python3 bench/startup/report.py "$RESULTS" "$W" "$RATE" "$RTT_MS" "$ROUNDS" >"$RESULTS_MD"
cat "$RESULTS_MD"
# Debian's python3 (with python3-matplotlib), whatever python3 is first on PATH.
/usr/bin/python3 "$ROOT/bench/chart.py" "$RESULTS_MD" "${RESULTS_MD%.md}.png"
