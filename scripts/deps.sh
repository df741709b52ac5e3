#!/usr/bin/env bash
# make deps: install what building and testing stargaze needs, if missing.
# Idempotent and non-interactive; runs as root (CI does). When everything is
# present it changes nothing and does not touch apt.
set -euo pipefail

# Debian bookworm packages: the real containerd/runc/registry the integration
# tests start, FUSE, skopeo and ctr-remote (stargz-snapshotter) for interop,
# Go and the Go sources of containerd/stargz for the Go helpers in tests/go,
# busybox for test images, iproute2 + libnetfilter-queue-dev for the shaped
# benchmark network, curl and zstd for scripts, systemd (systemd-analyze)
# for the unit checks, gcc and libc6-dev for the ELF programs and libraries
# the dependency-prefetch tests build, tinyproxy for the registry client's
# proxy tests (they start their own; the package's service must not run).
packages=(
    containerd runc docker-registry fuse3 skopeo stargz-snapshotter iproute2 curl zstd
    golang-go golang-github-containerd-stargz-snapshotter-dev
    golang-github-containerd-containerd-dev busybox-static libnetfilter-queue-dev systemd
    gcc libc6-dev tinyproxy
)

missing=()
for p in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    if [[ $status != "install ok installed" ]]; then
        missing+=("$p")
    fi
done

if ((${#missing[@]} == 0)); then
    echo "deps: all ${#packages[@]} Debian packages are installed"
else
    echo "deps: installing ${missing[*]}"
    if [[ $(id -u) -ne 0 ]]; then
        echo "deps: installing packages needs root; run 'make deps' as root" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    # Packages must not start services (tinyproxy's would listen on 8888):
    # a policy-rc.d refusing every start while we install, unless the
    # machine has its own (then it decides; ours is removed afterwards).
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\n# deps.sh: no service starts while installing test dependencies\nexit 101\n' \
            >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get update </dev/null
    # Retry once: a concurrent install on the same machine has been seen to
    # remove dpkg's temporary files under us.
    installed=0
    for attempt in 1 2; do
        if apt-get install -y --no-install-recommends "${missing[@]}" </dev/null; then
            installed=1
            break
        fi
        if ((attempt == 1)); then
            echo "deps: apt-get install failed; retrying in 2 s" >&2
            sleep 2
        fi
    done
    if ((installed == 0)); then
        echo "deps: apt-get install failed twice: ${missing[*]}" >&2
        exit 1
    fi
fi
# The tests start tinyproxy themselves; the packaged service stays off.
if [[ -e /lib/systemd/system/tinyproxy.service ]] && command -v systemctl >/dev/null 2>&1; then
    systemctl disable tinyproxy >/dev/null 2>&1 || true
    if systemctl is-active --quiet tinyproxy 2>/dev/null; then
        systemctl stop tinyproxy || true
    fi
fi

# Rust tools used by 'make test'.
for component in rustfmt clippy; do
    cmd=${component/rustfmt/fmt}
    if ! cargo "$cmd" --version >/dev/null 2>&1; then
        if command -v rustup >/dev/null 2>&1; then
            echo "deps: installing the $component component"
            rustup component add "$component"
        else
            echo "deps: cargo $cmd is missing and there is no rustup to install it" >&2
            exit 1
        fi
    fi
done
if cargo nextest --version >/dev/null 2>&1; then
    echo "deps: $(cargo nextest --version 2>/dev/null | head -n1) is available"
else
    echo "deps: installing cargo-nextest"
    cargo install cargo-nextest --locked
fi
