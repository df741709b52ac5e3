# Sourced by bench/startup.sh: the images of bench/images/*.sh built from
# Debian packages (cached in $I between runs), and what their workloads read.
# Uses $W, $I, log, die and need_packages from startup.sh.

# The Debian mirror apt is configured with (deb.debian.org otherwise).
mirror() {
    local m
    m=$(grep -rhoE '^deb \[?[^]]*\]? ?https?://[^ ]+ bookworm ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
        grep -oE 'https?://[^ ]+' | grep -v security | head -1)
    [[ -n $m ]] || m=$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null |
        grep -oE 'https?://[^ ]+/debian/?$' | head -1)
    echo "${m:-http://deb.debian.org/debian}"
}

# One build step (a Dockerfile RUN): `command` in a chroot of `lowerdirs`,
# its changes left in the overlayfs upper directory `upper`.
chroot_step() { # upper lowerdirs command
    local upper=$1 lower=$2 cmd=$3 m=$I/merged work=$I/work
    rm -rf "$upper" "$work"
    mkdir -p "$upper" "$work" "$m"
    [[ $cmd == *"apt-get install"* ]] &&
        cmd="apt-get update && $cmd && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb"
    mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work" "$m"
    mount --bind /etc/resolv.conf "$m/etc/resolv.conf"
    mount -t proc proc "$m/proc"
    local rc=0
    chroot "$m" /bin/sh -c "export DEBIAN_FRONTEND=noninteractive; $cmd" || rc=$?
    umount "$m/proc" "$m/etc/resolv.conf" "$m"
    rm -rf "$work"
    return $rc
}

# image NAME: its recipe's variables (bench/images/NAME.sh).
recipe() {
    declare -F "image_$1" >/dev/null || die "no image recipe $1 (bench/images/$1.sh)"
    desc= cmd= layers=() same_layers= profile=
    "image_$1"
}
# workload NAME (or NAME-opt, NAME@link): its recipe's variables.
workload() {
    local base=${1%@*}
    base=${base%-opt}
    declare -F "workload_${base//-/_}" >/dev/null || die "unknown workload $1 (see bench/images/*.sh)"
    image= argv=() expect= what= bound=0
    "workload_${base//-/_}"
}
# The layer directories of an image, bottom first, one per line.
layer_dirs() { # image
    recipe "$1"
    local dir=$I/${same_layers:-$1} k
    echo "$I/base"
    for k in "${!layers[@]}"; do echo "$dir/l$((k + 2))"; done
}
# overlayfs lowerdir= of the given directories (bottom first).
lowerdirs() { tac | paste -sd:; }

build_base() {
    [[ -f $I/base.done ]] && return 0
    log "image base layer: debootstrap --variant=minbase bookworm ($(mirror))"
    rm -rf "$I/base"
    debootstrap --variant=minbase bookworm "$I/base" "$(mirror)" >"$W/logs/debootstrap.log" 2>&1 || die "debootstrap: $W/logs/debootstrap.log"
    rm -rf "$I/base"/var/lib/apt/lists/* "$I/base"/var/cache/apt/*.bin "$I/base"/var/cache/apt/archives/*.deb
    mkdir -p "$I/base/var/lib/apt/lists/partial"
    : >"$I/base/etc/resolv.conf"
    touch "$I/base.done"
}

# The image's layers (rebuilt from the first step whose recipe changed) and
# its OCI layout $I/NAME/oci:latest.
build_image() { # name
    local name=$1 k step stamp dir below=$I/base rebuilt=0
    build_base
    recipe "$name"
    [[ -z $same_layers ]] || build_image "$same_layers"
    recipe "$name"
    dir=$I/${same_layers:-$name}
    mkdir -p "$dir" "$I/$name"
    for k in "${!layers[@]}"; do
        local n=$((k + 2))
        step=${layers[k]}
        stamp=$step
        [[ $step == host:* ]] && stamp=$(declare -f "${step#host:}")
        stamp=$(printf '%s' "$stamp" | sha256sum | cut -c1-16)
        if ((rebuilt)) || [[ $(cat "$dir/l$n.done" 2>/dev/null) != "$stamp" ]]; then
            rebuilt=1
            rm -f "$dir/l$n.done"
            log "image $name layer $n: ${step:0:100}"
            if [[ $step == host:* ]]; then
                rm -rf "${dir:?}/l$n"
                mkdir -p "$dir/l$n"
                "${step#host:}" "$dir/l$n" "$dir" "$below" >"$W/logs/$name-layer$n.log" 2>&1 || die "image $name layer $n: $W/logs/$name-layer$n.log"
            else
                chroot_step "$dir/l$n" "$below" "$step" >"$W/logs/$name-layer$n.log" 2>&1 || die "image $name layer $n: $W/logs/$name-layer$n.log"
            fi
            echo "$stamp" >"$dir/l$n.done"
        fi
        below=$dir/l$n:$below
    done
    # the layout: the layers' stamps, the config's Cmd and the writer
    stamp=$({ cat "$dir"/l*.done 2>/dev/null; echo "$cmd"; cat bench/mkimage.py; } | sha256sum | cut -c1-16)
    if [[ ! -f $I/$name/oci/index.json || $(cat "$I/$name/oci.done" 2>/dev/null) != "$stamp" ]]; then
        log "image $name: writing the OCI layout"
        rm -rf "$I/$name/oci" "$I/$name"/strace-*.txt
        # shellcheck disable=SC2046
        python3 bench/mkimage.py --cmd "$cmd" "$I/$name/oci" latest $(layer_dirs "$name") >"$I/$name/layers.txt" ||
            die "mkimage $name"
        echo "$stamp" >"$I/$name/oci.done"
    fi
    grep -q "^$name	" "$W/images.tsv" 2>/dev/null ||
        printf '%s\t%s (%s)\n' "$name" "$desc" "$(paste -sd';' "$I/$name/layers.txt" | sed 's/;/; /g')" >>"$W/images.tsv"
}

# What a workload reads, for its lower bound and for the optimized images'
# prioritized files: its opens and execs under strace in a chroot of the
# image's layers (with a scratch upper directory, /dev, /proc and /sys, as a
# container has), and the pages of the layers' files it brought into the
# page cache (evicted before); then each file's compressed bytes in our
# eStargz layers. Writes $W/needed-WL.txt and $W/prioritized-WL.txt.
measure_needed() { # workload
    local wl=$1 trace pages lower m=$I/run scratch=$I/scratch rc=0 out
    workload "$wl"
    trace=$I/$image/strace-$wl.txt
    pages=$I/$image/pages-$wl.txt
    lower=$(layer_dirs "$image" | lowerdirs)
    if [[ ! -s $trace || ! -s $pages ]]; then
        log "measuring what $wl reads (strace in a chroot of image $image)"
        need_packages strace
        rm -rf "$scratch"
        mkdir -p "$scratch/upper" "$scratch/work" "$m"
        mount -t overlay overlay -o "lowerdir=$lower,upperdir=$scratch/upper,workdir=$scratch/work" "$m"
        mount --bind /dev "$m/dev"
        mount -t proc proc "$m/proc"
        mount --bind /sys "$m/sys"
        # shellcheck disable=SC2046
        sync -f "$I" && python3 bench/pagecache.py evict $(layer_dirs "$image")
        strace -f -qq -e trace=execve,openat,open -o "$trace.part" \
            env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 HOME=/root \
            chroot "$m" "${argv[@]}" >"$W/logs/strace-$wl.out" 2>&1 || rc=$?
        # shellcheck disable=SC2046
        python3 bench/pagecache.py resident "$pages" $(layer_dirs "$image")
        umount "$m/sys" "$m/proc" "$m/dev" "$m"
        rm -rf "$scratch"
        out=$(tail -1 "$W/logs/strace-$wl.out")
        ((rc == 0)) && [[ $out =~ $expect ]] ||
            die "$wl under strace in a chroot of image $image: exit $rc, output '$out' (expected /$expect/): $W/logs/strace-$wl.out"
        mv "$trace.part" "$trace"
    fi
    mkdir -p "$I/ro"
    mount -t overlay overlay -o "lowerdir=$lower" "$I/ro"
    # shellcheck disable=SC2046
    python3 bench/needed.py --exec "$(basename "${argv[0]}")" --list "$W/prioritized-$wl.txt" --pages "$pages" \
        "$trace" "$I/ro" "$I/$image/esgz" $(layer_dirs "$image") >"$W/needed-$wl.txt" || rc=$?
    umount "$I/ro"
    ((rc == 0)) || die "bench/needed.py $wl failed"
    log "$wl needs: $(paste -sd' ' "$W/needed-$wl.txt")"
}

# Our conversions of an image, on every run (the converter is measured: its
# output may change): esgz, and esgz-opt with its profile workload's files
# first behind a prefetch landmark.
convert_image() { # name
    local name=$1 t0
    recipe "$name"
    rm -rf "$I/$name/esgz" "$I/$name/esgz-opt"
    log "image $name: stargaze convert --format estargz"
    t0=$(now)
    "$BIN/stargaze" convert --format estargz "oci:$I/$name/oci:latest" "oci:$I/$name/esgz:esgz" >"$W/logs/convert-$name.log" 2>&1 ||
        die "convert: $W/logs/convert-$name.log"
    printf '%s\tstargaze convert\t%s\n' "$name" "$(since "$t0")" >>"$W/convert-times.tsv"
    measure_needed "$profile"
    log "image $name: stargaze convert --prioritized-files ($profile's $(wc -l <"$W/prioritized-$profile.txt") files)"
    "$BIN/stargaze" convert --format estargz --prioritized-files "$W/prioritized-$profile.txt" \
        "oci:$I/$name/oci:latest" "oci:$I/$name/esgz-opt:esgz-opt" >"$W/logs/convert-opt-$name.log" 2>&1 ||
        die "convert: $W/logs/convert-opt-$name.log"
    # ctr-remote reads the same list as `ctr-remote image optimize` records it.
    python3 -c 'import json, sys; [print(json.dumps({"path": l.strip()})) for l in open(sys.argv[1]) if l.strip()]' \
        "$W/prioritized-$profile.txt" >"$W/record-$name.json"
}
