#!/usr/bin/env bash
# tests/systemd/root.sh DIR [backports]: make DIR a Debian bookworm root that boots under
# systemd-nspawn -b with what the stargaze units need (systemd, dbus,
# containerd, runc, fuse3) and a registry to serve the test images
# (docker-registry). Built with debootstrap from this machine's own apt
# mirror; kept between runs and rebuilt only when missing or when the package
# list below changes (DIR/.stargaze-packages records it). With "backports",
# systemd comes from bookworm-backports (254 and later: the descriptor store
# can outlive a stop, FileDescriptorStorePreserve=).
set -euo pipefail

dir=${1:?usage: root.sh DIR [backports]}
flavour=${2:-}
packages=systemd,systemd-sysv,dbus,containerd,runc,fuse3,docker-registry,ca-certificates,procps,iproute2
stamp=$dir/.stargaze-packages
want="$packages $flavour"

if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
    echo "root: $dir is ready (cached)"
    exit 0
fi

# The mirror this machine installs from: the first URI of a deb822 source or
# of a "deb" line that serves bookworm.
mirror=$(
    {
        awk '/^URIs:/ {print $2}' /etc/apt/sources.list.d/*.sources 2>/dev/null
        awk '$1 == "deb" && $3 == "bookworm" {print $2}' /etc/apt/sources.list 2>/dev/null
    } | grep -v -- -security | head -n1 || true
)
[[ -n $mirror ]] || {
    echo "root: no Debian mirror found in /etc/apt/sources.list*" >&2
    exit 1
}

tmp=$dir.tmp
rm -rf "$tmp" "$dir"
mkdir -p "$(dirname "$dir")"
echo "root: debootstrap bookworm from $mirror into $dir (a few minutes, once)"
debootstrap --variant=minbase --include="$packages" bookworm "$tmp" "$mirror" >"$dir.debootstrap.log" 2>&1 || {
    echo "root: debootstrap failed; the end of $dir.debootstrap.log:" >&2
    tail -n 20 "$dir.debootstrap.log" >&2
    exit 1
}
if [[ $flavour == backports ]]; then
    echo "deb $mirror bookworm-backports main" >"$tmp/etc/apt/sources.list.d/backports.list"
    {
        chroot "$tmp" apt-get -q update &&
            DEBIAN_FRONTEND=noninteractive chroot "$tmp" apt-get -q -y --no-install-recommends \
                -t bookworm-backports install systemd systemd-sysv libsystemd0 libsystemd-shared libpam-systemd
    } >>"$dir.debootstrap.log" 2>&1 </dev/null || {
        echo "root: installing systemd from bookworm-backports failed; the end of $dir.debootstrap.log:" >&2
        tail -n 20 "$dir.debootstrap.log" >&2
        exit 1
    }
    echo "root: systemd $(chroot "$tmp" dpkg-query -W -f='${Version}' systemd) from bookworm-backports"
fi
chroot "$tmp" apt-get clean

# A node, not a workstation: no getty or resolver fights on the console, and
# the services the test starts itself are not started at boot.
echo stargaze-node >"$tmp/etc/hostname"
echo "127.0.0.1 localhost stargaze-node" >"$tmp/etc/hosts"
: >"$tmp/etc/machine-id"
for u in docker-registry.service containerd.service console-getty.service getty@.service apt-daily.timer apt-daily-upgrade.timer; do
    chroot "$tmp" systemctl disable "$u" >/dev/null 2>&1 || true
done
chroot "$tmp" systemctl mask console-getty.service systemd-networkd-wait-online.service >/dev/null 2>&1 || true
echo "$want" >"$tmp/.stargaze-packages"
mv "$tmp" "$dir"
echo "root: $dir is ready"
