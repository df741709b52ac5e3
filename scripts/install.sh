#!/usr/bin/env bash
# make install / make uninstall: put stargaze on a node (binaries, systemd
# units, the default configuration, the containerd snippet) or take it off.
#
#   scripts/install.sh install | uninstall
#
# Settings (environment, all optional):
#   DESTDIR            staging root prepended to every path (packaging, tests)
#   PREFIX             /usr/local
#   BINDIR             $PREFIX/bin
#   UNITDIR            $PREFIX/lib/systemd/system (on systemd's search path)
#   SHAREDIR           $PREFIX/share/stargaze
#   SYSCONFDIR         /etc
#   STARGAZE_BINARIES  where the built binaries are (target/release)
#   SYSTEMD_VERSION    the target's systemd major version (found: this
#                      machine's, or the dpkg database in DESTDIR; 0 = unknown)
#
# Both directions are idempotent. An operator's edited
# $SYSCONFDIR/stargaze/config.toml is never overwritten or removed: install
# puts the current defaults beside it as config.toml.default instead, and
# uninstall leaves it. The cache and snapshot state under /var/lib/stargaze
# are never touched.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
action=${1:-}
DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/usr/local}
BINDIR=${BINDIR:-$PREFIX/bin}
UNITDIR=${UNITDIR:-$PREFIX/lib/systemd/system}
SHAREDIR=${SHAREDIR:-$PREFIX/share/stargaze}
SYSCONFDIR=${SYSCONFDIR:-/etc}
STARGAZE_BINARIES=${STARGAZE_BINARIES:-$root/target/release}

binaries=(stargaze stargaze-fetcher stargaze-fs stargaze-snapshotter)
units=(stargaze-fetcher.service stargaze-fs.service stargaze-snapshotter.service)
# Drop-ins for systemd versions that know their keys: version file.
dropins=("254 stargaze-fs.service.d/keep-fuse-on-stop.conf")
# Installed as an example beside the defaults, never into /etc/modprobe.d.
modprobe_example=fuse-io-uring.conf
config=$DESTDIR$SYSCONFDIR/stargaze/config.toml
default_config=$root/deploy/config.toml

say() { echo "install: $*"; }
die() {
    echo "install: error: $*" >&2
    exit 1
}

# Only touch the running systemd when installing onto this machine itself.
live_systemd() { [[ -z $DESTDIR && -d /run/systemd/system ]]; }

# The major version of the systemd the units will run under, 0 if unknown.
systemd_version() {
    local v=${SYSTEMD_VERSION:-}
    if [[ -z $v && -z $DESTDIR ]]; then
        v=$(systemctl --version 2>/dev/null | awk 'NR == 1 {print $2}')
    elif [[ -z $v && -d $DESTDIR/var/lib/dpkg ]]; then
        v=$(dpkg-query --admindir="$DESTDIR/var/lib/dpkg" -W -f='${Version}' systemd 2>/dev/null || true)
    fi
    v=${v%%[!0-9]*}
    echo "${v:-0}"
}

# Copy $1 to $2 with mode $3 unless $2 already has exactly that content.
put() {
    local src=$1 dst=$2 mode=$3
    if [[ -f $dst ]] && cmp -s "$src" "$dst"; then
        chmod "$mode" "$dst"
        return 0
    fi
    install -D -m "$mode" "$src" "$dst"
    say "wrote $dst"
}

do_install() {
    for b in "${binaries[@]}"; do
        [[ -x $STARGAZE_BINARIES/$b ]] ||
            die "$STARGAZE_BINARIES/$b is missing: build first ('make install' does; or 'cargo build --release --bins')"
    done
    for b in "${binaries[@]}"; do
        put "$STARGAZE_BINARIES/$b" "$DESTDIR$BINDIR/$b" 0755
    done

    local tmp
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' RETURN
    for u in "${units[@]}"; do
        sed "s|@BINDIR@|$BINDIR|g" "$root/deploy/systemd/$u" >"$tmp/$u"
        put "$tmp/$u" "$DESTDIR$UNITDIR/$u" 0644
    done
    local version d min file
    version=$(systemd_version)
    for d in "${dropins[@]}"; do
        read -r min file <<<"$d"
        if ((version >= min)); then
            put "$root/deploy/systemd/$file" "$DESTDIR$UNITDIR/$file" 0644
        elif ((version > 0)) && [[ -e $DESTDIR$UNITDIR/$file ]]; then
            rm -f "$DESTDIR$UNITDIR/$file"
            say "removed $DESTDIR$UNITDIR/$file (needs systemd >= $min, this is $version)"
        elif [[ ! -e $DESTDIR$UNITDIR/$file ]]; then
            say "skipped $file: it needs systemd >= $min (this is ${version/#0/unknown}), so 'systemctl stop stargaze-fs' ends the FUSE connection of running containers"
        fi
    done

    put "$root/deploy/containerd.toml" "$DESTDIR$SHAREDIR/containerd.toml" 0644
    put "$default_config" "$DESTDIR$SHAREDIR/config.toml" 0644
    # An example only: the fuse module's parameter is the operator's call.
    put "$root/deploy/modprobe.d/$modprobe_example" "$DESTDIR$SHAREDIR/modprobe.d/$modprobe_example" 0644

    if [[ ! -e $config ]]; then
        put "$default_config" "$config" 0644
    elif cmp -s "$default_config" "$config"; then
        say "$config is current"
    else
        # The operator changed it: keep theirs, show the new defaults beside it.
        put "$default_config" "$config.default" 0644
        say "kept your edited $config; the defaults are in $config.default"
    fi

    if live_systemd; then
        systemctl daemon-reload
        say "systemd reloaded"
    fi
    local cfg=${DESTDIR}/etc/containerd/config.toml
    if [[ ! -f $cfg ]] || ! grep -q 'proxy_plugins.stargaze' "$cfg"; then
        say "containerd does not know stargaze yet: merge $SHAREDIR/containerd.toml into /etc/containerd/config.toml"
    fi
    local uring=/sys/module/fuse/parameters/enable_uring
    if [[ -z $DESTDIR && -r $uring && $(cat "$uring") != Y ]]; then
        say "FUSE over io_uring is off in this kernel (enable_uring=N), so [fs] transport = \"io_uring\" cannot mount and \"auto\" uses classic; to turn it on: see $SHAREDIR/modprobe.d/$modprobe_example (install leaves it off)"
    fi
    say "done. Start with: systemctl enable --now ${units[*]}; then restart containerd"
}

do_uninstall() {
    if live_systemd; then
        local active=()
        for u in "${units[@]}"; do
            if systemctl is-active --quiet "$u"; then active+=("$u"); fi
        done
        if ((${#active[@]} > 0)); then
            die "${active[*]} still running; containers using lazily pulled layers would lose their files. Stop them first: systemctl disable --now ${units[*]}"
        fi
    fi
    # The config goes when it holds the defaults this version or the installed
    # one shipped; anything else is the operator's.
    if [[ -f $config ]]; then
        if cmp -s "$default_config" "$config" || cmp -s "$DESTDIR$SHAREDIR/config.toml" "$config"; then
            rm -f "$config"
            say "removed $config (it held only the defaults)"
        else
            say "kept your edited $config"
        fi
    fi
    local f d
    for d in "${dropins[@]}"; do
        f=$DESTDIR$UNITDIR/${d#* }
        if [[ -e $f ]]; then
            rm -f "$f"
            say "removed $f"
        fi
        rmdir "$(dirname "$f")" 2>/dev/null || true
    done
    for f in "${binaries[@]/#/$DESTDIR$BINDIR/}" "${units[@]/#/$DESTDIR$UNITDIR/}" \
        "$DESTDIR$SHAREDIR/containerd.toml" "$DESTDIR$SHAREDIR/config.toml" \
        "$DESTDIR$SHAREDIR/modprobe.d/$modprobe_example" "$config.default"; do
        if [[ -e $f ]]; then
            rm -f "$f"
            say "removed $f"
        fi
    done
    rmdir "$DESTDIR$SHAREDIR/modprobe.d" 2>/dev/null || true
    rmdir "$DESTDIR$SHAREDIR" 2>/dev/null || true
    rmdir "$DESTDIR$SYSCONFDIR/stargaze" 2>/dev/null || true
    if live_systemd; then
        systemctl daemon-reload
    fi
    say "done. The cache and snapshots under /var/lib/stargaze are left in place; remove them when nothing uses them."
}

case $action in
install) do_install ;;
uninstall) do_uninstall ;;
*) die "usage: $0 install|uninstall" ;;
esac
