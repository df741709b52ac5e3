#!/usr/bin/env bash
# make test-systemd: stargaze's units on a real systemd, as an operator runs
# them, with containers reading lazily while every service is restarted and
# killed.
#
#  1. a Debian bookworm root (tests/systemd/root.sh: debootstrap from this
#     machine's apt mirror, cached in $WORK/root), copied for this run;
#  2. `make install` into it (DESTDIR, PREFIX=/usr/local, the release
#     binaries), deploy/containerd.toml merged into its containerd config,
#     the units enabled, a registry (Debian's docker-registry) on the node;
#  3. booted with `systemd-nspawn -b` (its own network namespace, /dev/fuse
#     bound in) and driven with nsenter (machinectl needs systemd-machined,
#     which needs systemd as the host's init);
#  4. a test image converted to eStargz in the node and pulled lazily
#     (`stargaze rpull`); containers read its files one after another, each
#     checked against its sha256; then `systemctl restart` and
#     `systemctl kill -s KILL` of each unit and containerd, and `systemctl
#     stop` / `start` of all three: after each, every container must still
#     be RUNNING and reading correct bytes;
#  5. an upgrade as an operator does one (step 6): `make install` of a new
#     build over the running one (the binary files replaced, new inodes,
#     while the old processes still run from the old ones: their
#     /proc/PID/exe shows "(deleted)"), then `systemctl restart` of each
#     unit in dependency order (fetcher, fs, snapshotter); after each
#     restart every container must still be RUNNING and reading correct
#     bytes, and the unit must run the newly installed file. By default the
#     "new build" is this run's own binaries copied to a fresh directory
#     (with a marker appended after the ELF image, so that install, which
#     leaves identical files alone, writes them): the same code, so this
#     proves the mechanism (files replaced under running services, units
#     restarted one by one), not that two different versions work together;
#     STARGAZE_UPGRADE_BINARIES=DIR installs a different build from DIR for
#     a real version-to-version check;
#  6. PASS/FAIL per step; everything (the node, its processes and mounts,
#     cgroups) is removed on exit. A missing prerequisite fails the run.
#
# Environment: STARGAZE_BINARIES=DIR installs binaries from DIR instead of
# building release ones; STARGAZE_UPGRADE_BINARIES=DIR is the build step 6
# upgrades to (default: STARGAZE_BINARIES' files, marked); STARGAZE_SYSTEMD=
# backports boots a node whose systemd comes from bookworm-backports (254:
# the descriptor store survives a stop; bookworm's 252 empties it, and
# step 7 fails there);
# STARGAZE_SYSTEMD_WORK (/var/tmp/stargaze-systemd) holds the cached roots
# and this run's node; KEEP=1 keeps the run's files.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
here=$repo/tests/systemd
WORK=${STARGAZE_SYSTEMD_WORK:-/var/tmp/stargaze-systemd}
KEEP=${KEEP:-0}
IMAGE=127.0.0.1:5000/stargaze/reader:esgz
READERS=(r1 r2 r3)
UNITS=(stargaze-fetcher stargaze-fs stargaze-snapshotter)
# Enough files that the readers still meet unread ones at the end of the run
# (10 reads a second each): every read of a new file is a lazy fetch through
# fs and the fetcher, not a page-cache hit.
FILES=6000
FILE_SIZE=4096

started=$(date +%s)
failures=0
steps=0
bold() { printf '\033[1m%s\033[0m\n' "$*"; }
step() { bold "== $*"; }
pass() {
    steps=$((steps + 1))
    printf '\033[32mPASS\033[0m %s\n' "$*"
}
fail() {
    steps=$((steps + 1))
    failures=$((failures + 1))
    printf '\033[31mFAIL\033[0m %s\n' "$*"
}
# A prerequisite or a step the rest depends on: fail the whole run now.
die() {
    printf '\033[31mFAIL\033[0m %s\n' "$*" >&2
    exit 1
}
check() { # description, command...: PASS or FAIL by the command's status
    local what=$1
    shift
    if "$@"; then pass "$what"; else fail "$what"; fi
}

# ---------------------------------------------------------------- prerequisites
step "prerequisites"
[[ $(id -u) -eq 0 ]] || die "make test-systemd needs root (debootstrap, systemd-nspawn, FUSE)"
[[ -c /dev/fuse ]] || die "/dev/fuse is missing: load the fuse module"
for tool in debootstrap systemd-nspawn nsenter python3 busybox make cp; do
    command -v "$tool" >/dev/null ||
        die "$tool is missing (apt-get install debootstrap systemd-container util-linux python3 busybox-static)"
done
[[ -d /sys/fs/cgroup/unified || $(stat -f -c %T /sys/fs/cgroup) == cgroup2fs ]] ||
    die "no cgroup2 hierarchy on this machine: the node's systemd and runc need one"
if [[ -z ${STARGAZE_BINARIES:-} ]]; then
    bold "building release binaries (cargo build --release --workspace --bins)"
    (cd "$repo" && cargo build --release --workspace --bins --quiet)
    STARGAZE_BINARIES=${CARGO_TARGET_DIR:-$repo/target}/release
fi
for b in stargaze stargaze-fetcher stargaze-fs stargaze-snapshotter; do
    [[ -x $STARGAZE_BINARIES/$b ]] || die "$STARGAZE_BINARIES/$b is missing"
    [[ -z ${STARGAZE_UPGRADE_BINARIES:-} || -x $STARGAZE_UPGRADE_BINARIES/$b ]] ||
        die "STARGAZE_UPGRADE_BINARIES: $STARGAZE_UPGRADE_BINARIES/$b is missing"
done
pass "root, /dev/fuse, debootstrap, systemd-nspawn, binaries in $STARGAZE_BINARIES"

mkdir -p "$WORK"
RUN=$(mktemp -d "$WORK/run.XXXXXX")
NODE=$RUN/node
MACHINE=stargaze-node-$$
# The node's cgroup on the host: a group of its own, so that nspawn's
# payload/supervisor groups do not land in the host's root and two runs do
# not share them.
CGROUP=stargaze-systemd-$$
NSPAWN_PID=
LEADER=

# -------------------------------------------------------------------- cleanup
cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    step "cleanup"
    if [[ -n $LEADER ]] && kill -0 "$LEADER" 2>/dev/null; then
        for r in "${READERS[@]}" late; do
            in_node ctr task kill -s SIGKILL "$r" >/dev/null 2>&1
        done
        sleep 1
        for r in "${READERS[@]}" late; do
            in_node ctr task delete -f "$r" >/dev/null 2>&1
            in_node ctr container delete "$r" >/dev/null 2>&1
        done
    fi
    if [[ -n $NSPAWN_PID ]] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
        # SIGTERM makes nspawn ask the node's systemd to power off.
        kill -TERM "$NSPAWN_PID"
        for _ in $(seq 120); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$NSPAWN_PID" 2>/dev/null; then
            echo "cleanup: the node did not power off in 60 s; killing it"
            kill -KILL "$NSPAWN_PID"
        fi
    fi
    # Whatever is left in the node's cgroups (nothing, normally) is killed,
    # then the groups go.
    local h g
    for h in unified systemd; do
        g=/sys/fs/cgroup/$h/$CGROUP
        [[ -d $g ]] || continue
        for _ in $(seq 20); do
            local left
            left=$(find "$g" -name cgroup.procs -exec cat {} + 2>/dev/null)
            [[ -z $left ]] && break
            # shellcheck disable=SC2086
            kill -KILL $left 2>/dev/null
            sleep 0.5
        done
        find "$g" -depth -type d -exec rmdir {} \; 2>/dev/null
        [[ -d $g ]] && echo "cleanup: could not remove the cgroup $g"
    done
    rmdir "/run/systemd/nspawn/propagate/$MACHINE" 2>/dev/null
    grep -o " $RUN[^ ]*" /proc/self/mounts | sort -r | while read -r m; do umount -l "$m"; done
    if [[ $KEEP == 1 ]]; then
        echo "cleanup: kept $RUN"
    else
        rm -rf "$RUN"
    fi
    local took=$(($(date +%s) - started))
    if ((rc != 0 && failures == 0)); then failures=1; fi
    if ((failures == 0)); then
        bold "test-systemd: PASS ($steps steps, ${took}s)"
    else
        bold "test-systemd: FAIL ($failures of $steps steps failed, ${took}s)"
        rc=1
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

in_node() {
    nsenter --target "$LEADER" --all --root --wd -- \
        env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"
}

# ---------------------------------------------------------------------- 1. root
step "1. a Debian bookworm root"
# STARGAZE_SYSTEMD=backports: the node's systemd from bookworm-backports.
flavour=${STARGAZE_SYSTEMD:-}
rootfs=$WORK/root${flavour:+-$flavour}
bash "$here/root.sh" "$rootfs" $flavour || die "could not make the Debian root (see above)"
cp -a --reflink=auto "$rootfs" "$NODE"
pass "Debian bookworm root with systemd, dbus, containerd, runc, fuse3 (cached in $rootfs)"

# ------------------------------------------------------------------- 2. install
step "2. make install into the node, containerd configured as an operator does"
DESTDIR="$NODE" PREFIX=/usr/local STARGAZE_BINARIES="$STARGAZE_BINARIES" make -s -C "$repo" install |
    sed 's/^/   /' || die "make install into $NODE failed"
python3 "$here/merge_containerd.py" "$NODE/usr/local/share/stargaze/containerd.toml" \
    "$NODE/etc/containerd/config.toml" || die "merging deploy/containerd.toml into the node's containerd config failed"
# The operator's edit: no background fetch, so the readers' reads of files
# not yet read are lazy fetches from the registry all through the run.
sed -i 's/^background_fetch = true$/background_fetch = false/' "$NODE/etc/stargaze/config.toml"
grep -q '^background_fetch = false$' "$NODE/etc/stargaze/config.toml" ||
    die "could not turn off background_fetch in the node's /etc/stargaze/config.toml"
cat >"$NODE/etc/docker/registry/config.yml" <<'EOF'
version: 0.1
log: { level: warn }
storage:
  filesystem: { rootdirectory: /var/lib/docker-registry }
http:
  addr: 127.0.0.1:5000
EOF
systemctl --root="$NODE" enable "${UNITS[@]}" containerd.service docker-registry.service >/dev/null 2>&1 ||
    die "systemctl --root enable of the units failed"
pass "make install (DESTDIR, PREFIX=/usr/local), containerd.toml merged, units enabled"

# The test image: busybox and the reader in one layer, $FILES data files and
# their sha256 sums in another; converted to eStargz inside the node.
img=$RUN/layers
mkdir -p "$img/base/bin" "$img/base/out" "$img/base/etc" "$img/base"/{proc,sys,dev,tmp} "$img/data/data"
cp /bin/busybox "$img/base/bin/busybox"
for a in sh sed wc sha256sum sleep echo cat; do ln -s busybox "$img/base/bin/$a"; done
install -m 0755 "$here/reader.sh" "$img/base/bin/reader"
echo 'root:x:0:0:root:/:/bin/sh' >"$img/base/etc/passwd"
python3 - "$img/data/data" "$FILES" "$FILE_SIZE" <<'EOF'
import hashlib, os, random, sys
out, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(20)
with open(os.path.join(out, "SUMS"), "w") as sums:
    for i in range(n):
        data = rng.randbytes(size)
        name = f"f{i:05d}"
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
        sums.write(f"{hashlib.sha256(data).hexdigest()}  /data/{name}\n")
EOF
python3 "$repo/bench/mkimage.py" "$NODE/srv/image" plain "$img/base" "$img/data" >/dev/null
rm -rf "$img"

# ---------------------------------------------------------------------- 3. boot
step "3. boot the node (systemd-nspawn -b)"
mkdir -p "$NODE/srv/out"
(
    for h in systemd unified; do
        if [[ -d /sys/fs/cgroup/$h ]]; then
            mkdir -p "/sys/fs/cgroup/$h/$CGROUP"
            echo $BASHPID >"/sys/fs/cgroup/$h/$CGROUP/cgroup.procs"
        fi
    done
    # A unified cgroup hierarchy in the node: on a host with the legacy
    # controllers, nspawn mounts them read-only, and runc in the node could
    # not make the containers' cgroups.
    export SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1
    # --register=no/--keep-unit: no systemd-machined on a host whose init is
    # not systemd. The default capability set has what the units use
    # (CAP_SYS_ADMIN for the FUSE and overlay mounts, CAP_DAC_*, CAP_CHOWN,
    # CAP_FOWNER, CAP_FSETID); --private-network adds CAP_NET_ADMIN, which
    # runc needs to bring up a container's loopback. runc gives every
    # container a session keyring and a BPF device filter (its cgroup v2
    # device rules), and systemd the same for DeviceAllow=: the keyring
    # calls and bpf() are outside nspawn's default system call filter.
    exec systemd-nspawn --boot --directory="$NODE" --machine="$MACHINE" \
        --register=no --keep-unit --private-network --bind=/dev/fuse \
        --system-call-filter="@keyring bpf" \
        --console=pipe </dev/null >"$RUN/console.log" 2>&1
) &
NSPAWN_PID=$!
# The node's PID 1: nspawn's child that runs systemd (an intermediate child
# sets the node up first and exits).
for _ in $(seq 150); do
    LEADER=
    for p in $(pgrep -P "$NSPAWN_PID" || true); do
        [[ $(cat "/proc/$p/comm" 2>/dev/null) == systemd ]] && LEADER=$p
    done
    [[ -n $LEADER ]] && break
    sleep 0.2
done
[[ -n $LEADER ]] || die "systemd-nspawn did not start the node; console: $(tail -5 "$RUN/console.log")"
# systemctl fails until PID 1 listens on its private socket; then --wait
# returns when start-up is over.
state=
for _ in $(seq 120); do
    state=$(timeout 120 nsenter --target "$LEADER" --all --root --wd -- systemctl is-system-running --wait 2>/dev/null || true)
    [[ -n $state ]] && break
    sleep 0.5
done
[[ $state == running || $state == degraded ]] || die "the node did not boot (systemd says '$state')"
if [[ $state == degraded ]]; then
    echo "   the node is degraded:"
    in_node systemctl --failed --no-pager --no-legend | sed 's/^/   /'
fi
check "the node booted (systemd $state)" true

active_all() {
    local u
    for u in "$@"; do
        [[ $(in_node systemctl is-active "$u" 2>/dev/null) == active ]] || {
            echo "   $u is $(in_node systemctl is-active "$u" 2>/dev/null)"
            in_node journalctl -u "$u" --no-pager -n 15 | sed 's/^/   /'
            return 1
        }
    done
}
check "stargaze-fetcher, stargaze-fs, stargaze-snapshotter, containerd and the registry are active after boot" \
    active_all "${UNITS[@]}" containerd docker-registry
started_at() { in_node systemctl show -p ExecMainStartTimestampMonotonic --value "$1"; }
boot_order() {
    local prev=0 t u
    for u in "${UNITS[@]}" containerd; do
        t=$(started_at "$u")
        echo "   $u started at ${t} us"
        ((t >= prev)) || return 1
        prev=$t
    done
}
check "boot order: fetcher, fs, snapshotter, then containerd" boot_order

# ------------------------------------------------------- 4. image and readers
step "4. a lazily pulled image and containers reading it"
in_node stargaze convert --plain-http oci:/srv/image:plain "docker://$IMAGE" >"$RUN/convert.log" 2>&1 ||
    die "stargaze convert of the test image to $IMAGE failed"
in_node stargaze rpull --plain-http --quiet "$IMAGE" || die "stargaze rpull $IMAGE failed"
lazy_layers() {
    in_node findmnt -n -t fuse.stargaze /run/stargaze/mnt >/dev/null &&
        [[ -n $(in_node ls /run/stargaze/mnt) ]]
}
check "stargaze rpull attached the image's layers lazily (fuse.stargaze at /run/stargaze/mnt)" lazy_layers

# --cpu-shares 0: ctr asks for cpu.weight by default, and the node's cgroup2
# has no controllers on a host whose controllers are bound to cgroup v1.
ctr_run() { in_node ctr run --cpu-shares 0 --snapshotter stargaze "$@"; }
for i in "${!READERS[@]}"; do
    r=${READERS[i]}
    ctr_run -d \
        --mount type=bind,src=/srv/out,dst=/out,options=rbind:rw \
        "$IMAGE" "$r" /bin/reader "$r" $((i * FILES / ${#READERS[@]})) >/dev/null ||
        die "ctr run of container $r failed"
done

count() { # reader, first word of its log lines
    local f=$NODE/srv/out/$1.log
    if [[ -f $f ]]; then awk -v w="$2" '$1 == w {n++} END {print n + 0}' "$f"; else echo 0; fi
}
oks() { count "$1" ok; }
fails() { count "$1" FAIL; }
all_running() {
    local r status
    for r in "$@"; do
        status=$(in_node ctr task ls 2>/dev/null | awk -v r="$r" '$1 == r {print $3}')
        [[ $status == RUNNING ]] || {
            echo "   container $r is ${status:-gone}"
            return 1
        }
    done
}
# Every reader reads `more` more files correctly within `secs` seconds, and
# none reports a wrong or failed read.
declare -A base_ok base_fail
mark() {
    local r
    for r in "${READERS[@]}"; do
        base_ok[$r]=$(oks "$r")
        base_fail[$r]=$(fails "$r")
    done
}
progress() { # more secs
    local more=$1 secs=$2 r deadline=$((SECONDS + $2)) done
    while :; do
        done=1
        for r in "${READERS[@]}"; do
            (($(oks "$r") >= base_ok[$r] + more)) || done=0
        done
        ((done)) && break
        if ((SECONDS >= deadline)); then
            for r in "${READERS[@]}"; do
                echo "   $r read $(($(oks "$r") - base_ok[$r])) files in ${secs}s (wanted $more)"
            done
            return 1
        fi
        sleep 0.5
    done
    for r in "${READERS[@]}"; do
        if (($(fails "$r") > base_fail[$r])); then
            echo "   $r: $(($(fails "$r") - base_fail[$r])) failed reads, the last: $(grep '^FAIL' "$NODE/srv/out/$r.log" | tail -1)"
            return 1
        fi
    done
    all_running "${READERS[@]}"
}
mark
check "${#READERS[@]} containers run and read correct bytes lazily" progress 20 60

# -------------------------------------------- 5. restarts and kills under load
step "5. restart and kill each service while the containers read"
main_pid() { in_node systemctl show -p MainPID --value "$1"; }
fdstore() { in_node systemctl show -p NFileDescriptorStore --value stargaze-fs; }
wait_active() { # unit, old main pid: active again with a new process
    local u=$1 old=$2
    for _ in $(seq 120); do
        if [[ $(in_node systemctl is-active "$u" 2>/dev/null) == active ]]; then
            local now
            now=$(main_pid "$u")
            [[ $now != 0 && $now != "$old" ]] && return 0
        fi
        sleep 0.5
    done
    echo "   $u did not come back: $(in_node systemctl is-active "$u" 2>/dev/null)"
    in_node journalctl -u "$u" --no-pager -n 20 | sed 's/^/   /'
    return 1
}
took_over_since() { # cursor: fs logged the take-over after it
    in_node journalctl -u stargaze-fs --no-pager -o cat --after-cursor="$1" |
        grep -q 'took over the FUSE connection'
}
cursor() { in_node journalctl -u stargaze-fs -n 0 --show-cursor --no-pager | sed -n 's/^-- cursor: //p'; }

[[ $(fdstore) == 1 ]] && pass "stargaze-fs stored its /dev/fuse descriptor with systemd (NFileDescriptorStore=1)" ||
    fail "stargaze-fs stored its /dev/fuse descriptor with systemd (NFileDescriptorStore=$(fdstore))"

back_ms= # disrupt: from systemctl to the unit active again with a new process
disrupt() { # how (restart|kill), unit
    local how=$1 u=$2 old c ok=1
    back_ms=
    old=$(main_pid "$u")
    c=$(cursor)
    mark
    local t0=${EPOCHREALTIME/./}
    case $how in
    restart) in_node systemctl restart "$u" || ok=0 ;;
    # The main process, as a crash would: containerd's shims live in its
    # cgroup (KillMode=process) and `--kill-who=all` would kill them too.
    kill) in_node systemctl kill --kill-who=main -s KILL "$u" || ok=0 ;;
    esac
    local what="$how $u"
    [[ $how == kill ]] && what="kill -9 $u (systemctl kill -s KILL)"
    if ((ok)) && wait_active "$u" "$old" && back_ms=$(((${EPOCHREALTIME/./} - t0) / 1000)) &&
        progress 20 90; then
        if [[ $u == stargaze-fs ]]; then
            if ! took_over_since "$c"; then
                fail "$what: the new stargaze-fs did not take the FUSE connection over from the descriptor store"
                return
            fi
            if [[ $(fdstore) != 1 ]]; then
                fail "$what: NFileDescriptorStore=$(fdstore) after the restart"
                return
            fi
            what="$what (fs took /dev/fuse back from systemd's descriptor store)"
        fi
        pass "$what: back in $back_ms ms, every container RUNNING and reading correct bytes"
    else
        fail "$what"
    fi
}
for u in "${UNITS[@]}" containerd; do disrupt restart "$u"; done
for u in "${UNITS[@]}" containerd; do disrupt kill "$u"; done

# ------------------------------------------------------------ 6. upgrade
step "6. upgrade: make install of a new build over the running one, then restart each unit"
# What an operator does: install the new build (it replaces the files; the
# running processes keep their old, now deleted, ones), reload systemd as
# install does on a live machine, then restart the units one at a time,
# those the others depend on first (After=/Wants= in deploy/systemd): the
# fetcher (fs and the snapshotter call it), fs, then the snapshotter.
new_build=${STARGAZE_UPGRADE_BINARIES:-}
if [[ -z $new_build ]]; then
    # The same binaries as a "new build": install's put() leaves a file
    # with the same content alone, so each copy gets a marker after its ELF
    # image (the loader maps only what the program headers name) and is a
    # different file that install writes, as it would a new version.
    new_build=$RUN/upgrade-bin
    mkdir -p "$new_build"
    for b in stargaze stargaze-fetcher stargaze-fs stargaze-snapshotter; do
        cp "$STARGAZE_BINARIES/$b" "$new_build/$b"
        printf '\nstargaze test-systemd upgrade %s\n' "$RUN" >>"$new_build/$b"
    done
    echo "   the new build: $STARGAZE_BINARIES copied to $new_build, marked (the same code)"
else
    echo "   the new build: $new_build"
fi
bin_of() { echo "/usr/local/bin/$1"; }
exe_link() { in_node readlink "/proc/$1/exe"; }
exe_ino() { in_node stat -L -c %i "/proc/$1/exe"; }
file_ino() { in_node stat -c %i "$(bin_of "$1")"; }
total_oks() {
    local r n=0
    for r in "${READERS[@]}"; do n=$((n + $(oks "$r"))); done
    echo "$n"
}
total_fails() {
    local r n=0
    for r in "${READERS[@]}"; do n=$((n + $(fails "$r"))); done
    echo "$n"
}
declare -A up_pid up_exe up_file
for u in "${UNITS[@]}"; do
    up_pid[$u]=$(main_pid "$u")
    up_exe[$u]=$(exe_ino "${up_pid[$u]}")
    up_file[$u]=$(file_ino "$u")
done
up_oks=$(total_oks)
up_fails=$(total_fails)
up_t0=$SECONDS
mark
replaced() { # every unit's process still the old one, on the old file, now deleted
    local u pid link ok=0
    for u in "${UNITS[@]}"; do
        pid=$(main_pid "$u")
        link=$(exe_link "$pid")
        echo "   $u: pid ${up_pid[$u]} -> $pid, runs $link (inode ${up_exe[$u]} -> $(exe_ino "$pid")), $(bin_of "$u") inode ${up_file[$u]} -> $(file_ino "$u")"
        [[ $pid == "${up_pid[$u]}" && $link == "$(bin_of "$u") (deleted)" &&
            $(exe_ino "$pid") == "${up_exe[$u]}" && $(file_ino "$u") != "${up_file[$u]}" ]] || ok=1
        [[ $(file_ino "$u") != "${up_file[$u]}" ]] ||
            echo "   $(bin_of "$u") was not replaced: $new_build/$u has the content installed already? (install leaves identical files alone)"
    done
    return $ok
}
if DESTDIR="$NODE" PREFIX=/usr/local STARGAZE_BINARIES="$new_build" make -s -C "$repo" install |
    sed 's/^/   /' && in_node systemctl daemon-reload; then
    check "make install of the new build replaced the three binaries (new inodes) under the running units, which still run the old, deleted files" replaced
else
    fail "make install of the new build into the running node (and systemctl daemon-reload)"
fi
check "after the install, every container RUNNING and reading correct bytes" progress 20 90
runs_new() { # unit: its main process runs the file now installed
    local pid link
    pid=$(main_pid "$1")
    link=$(exe_link "$pid")
    echo "   $1: pid $pid runs $link (inode $(exe_ino "$pid")), $(bin_of "$1") inode $(file_ino "$1")"
    [[ $link == "$(bin_of "$1")" && $(exe_ino "$pid") == "$(file_ino "$1")" ]]
}
up_ms=
for u in "${UNITS[@]}"; do
    disrupt restart "$u"
    up_ms+="$u ${back_ms:-?} ms, "
    check "upgrade: $u runs the newly installed $(bin_of "$u")" runs_new "$u"
done
status_up() { in_node stargaze status >"$RUN/status.log" 2>&1 || { sed 's/^/   /' "$RUN/status.log"; return 1; }; }
check "upgrade: the new stargaze CLI finds all three new services up (stargaze status)" status_up
bold "   upgrade: $(($(total_oks) - up_oks)) files read correctly, $(($(total_fails) - up_fails)) failed reads during it ($((SECONDS - up_t0)) s); back after restart: ${up_ms%, }"

# ------------------------------------------------------- 7. stop and start
step "7. systemctl stop of all three, then start"
mark
c=$(cursor)
in_node systemctl stop "${UNITS[@]}" || fail "systemctl stop ${UNITS[*]}"
sleep 3
# systemd < 254 empties a service's descriptor store when it stops (254's
# FileDescriptorStorePreserve=yes keeps it): then nothing holds the FUSE
# connection and the kernel ends it.
kept=$(fdstore)
echo "   stopped: NFileDescriptorStore=$kept (systemd $(in_node systemctl --version | awk 'NR == 1 {print $2}'), FileDescriptorStorePreserve=$(in_node systemctl show -p FileDescriptorStorePreserve --value stargaze-fs))"
if [[ $kept == 1 ]]; then
    pass "stargaze-fs stopped: systemd keeps its /dev/fuse descriptor"
else
    fail "stargaze-fs stopped: systemd closed its /dev/fuse descriptor (NFileDescriptorStore=$kept), so the kernel ended the FUSE connection of the running containers"
fi
in_node systemctl start "${UNITS[@]}" || fail "systemctl start ${UNITS[*]}"
if active_all "${UNITS[@]}" && progress 20 90 && took_over_since "$c"; then
    pass "stop and start of all three: containers started before keep running and reading correct bytes"
else
    fail "stop and start of all three: containers started before keep running and reading correct bytes"
    in_node journalctl -u stargaze-fs --no-pager -o cat --after-cursor="$c" | tail -n 10 | sed 's/^/   /'
fi

# ------------------------------------------------------- 8. a new container
step "8. a new container after all of it"
if ctr_run --rm "$IMAGE" late sh -c \
    'sed -n "1p;\$p" /data/SUMS | sha256sum -c -s' >/dev/null; then
    pass "a new container of the image runs and reads correct bytes"
else
    fail "a new container of the image runs and reads correct bytes"
fi
total=0
for r in "${READERS[@]}"; do total=$((total + $(oks "$r"))); done
bold "   the containers read $total files correctly, $(($(date +%s) - started)) s so far"
