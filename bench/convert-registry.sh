#!/usr/bin/env bash
# Registry-to-registry conversion: `stargaze convert docker://SRC docker://DST`
# against ctr-remote's pull + `image convert --estargz --oci` + push, on the
# same image, same machine, same local docker-registry (issue 22's target:
# >= 5x faster, RSS <= 256 MiB). Not run by `make test`.
#
#   BENCH_LAYER_PATHS   paths (relative to BENCH_ROOT) packed into the
#                       layers, '|' between layers (default: a small image)
#   BENCH_ROOT          the tree they are taken from (default: /)
#   BENCH_OCI           instead of both: an OCI layout DIR:TAG to convert,
#                       e.g. the python image bench/startup.sh builds
#                       (199 MB, 3 layers): $WORK/img/py/oci:latest
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BENCH_LAYER_PATHS=${BENCH_LAYER_PATHS:-"usr/lib/python3.11 | usr/sbin"}
BENCH_ROOT=${BENCH_ROOT:-/}
STARGAZE=${STARGAZE:-$ROOT/target/release/stargaze}
[ -x "$STARGAZE" ] || cargo build --release -q -p stargaze-cli
for t in containerd ctr ctr-remote docker-registry skopeo /usr/bin/time; do
    command -v $t >/dev/null || { echo "$t is missing: run 'make deps'" >&2; exit 1; }
done

W=$(mktemp -d /tmp/sg-bench-r2r.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null || true; done
    rm -rf "$W"
}
trap cleanup EXIT
now() { date +%s.%N; }

echo "== the input image"
if [[ -n ${BENCH_OCI:-} ]]; then
    skopeo --insecure-policy copy -q "oci:$BENCH_OCI" "oci:$W/img:src"
    BENCH_LAYER_PATHS=""
else
    mkdir -p "$W/img/blobs/sha256"
    echo '{"imageLayoutVersion":"1.0.0"}' > "$W/img/oci-layout"
fi
diff_ids=""; layers=""
groups=()
[[ -n $BENCH_LAYER_PATHS ]] && IFS='|' read -ra groups <<< "$BENCH_LAYER_PATHS"
i=0
for g in "${groups[@]}"; do
    i=$((i+1))
    # shellcheck disable=SC2086
    (cd "$BENCH_ROOT" && tar --sort=name --mtime=@0 --numeric-owner -cf "$W/l$i.tar" $g 2>/dev/null) || true
    did=$(sha256sum "$W/l$i.tar" | cut -d' ' -f1)
    gzip -n -6 -c "$W/l$i.tar" > "$W/l$i.tgz"; rm "$W/l$i.tar"
    lid=$(sha256sum "$W/l$i.tgz" | cut -d' ' -f1); lsz=$(stat -c %s "$W/l$i.tgz")
    mv "$W/l$i.tgz" "$W/img/blobs/sha256/$lid"
    diff_ids+="${diff_ids:+,}\"sha256:$did\""
    layers+="${layers:+,}{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"sha256:$lid\",\"size\":$lsz}"
done
if ((${#groups[@]})); then
    printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[%s]}}' "$diff_ids" > "$W/cfg"
    cid=$(sha256sum "$W/cfg" | cut -d' ' -f1); csz=$(stat -c %s "$W/cfg"); mv "$W/cfg" "$W/img/blobs/sha256/$cid"
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[%s]}' "$cid" "$csz" "$layers" > "$W/man"
    mid=$(sha256sum "$W/man" | cut -d' ' -f1); msz=$(stat -c %s "$W/man"); mv "$W/man" "$W/img/blobs/sha256/$mid"
    printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"src"}}]}' "$mid" "$msz" > "$W/img/index.json"
fi
SIZE=$(du -sb "$W/img/blobs" | cut -f1)
echo "   $((SIZE / 1000000)) MB of blobs"

echo "== starting a registry and a private containerd"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
R=127.0.0.1:$PORT
printf 'version: 0.1\nlog: { level: error }\nstorage:\n  filesystem: { rootdirectory: %s/reg }\nhttp:\n  addr: %s\n' "$W" "$R" > "$W/reg.yml"
docker-registry serve "$W/reg.yml" > "$W/reg.log" 2>&1 & PIDS+=($!)
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
containerd --config "$W/ctd/config.toml" > "$W/ctd/log" 2>&1 & PIDS+=($!)
CTRR="ctr-remote --address $W/ctd/c.sock -n bench"
for _ in $(seq 200); do $CTRR version >/dev/null 2>&1 && (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.05; done
skopeo --insecure-policy copy -q --dest-tls-verify=false "oci:$W/img:src" "docker://$R/bench/src:1"

echo "== stargaze convert docker:// -> docker://"
t0=$(now)
/usr/bin/time -f '%M' -o "$W/rss" "$STARGAZE" convert --spill-dir "$W/spill" \
    "docker://$R/bench/src:1" "docker://$R/bench/sg:1" > "$W/sg.out"
T_SG=$(awk -v a="$(now)" -v b="$t0" 'BEGIN{printf "%.2f", a-b}')
RSS_SG=$(( $(cat "$W/rss") / 1024 ))

echo "== ctr-remote pull + image convert --estargz --oci + push"
t0=$(now)
$CTRR image pull --plain-http "$R/bench/src:1" >/dev/null
$CTRR image convert --estargz --oci "$R/bench/src:1" "$R/bench/go:1" >/dev/null
$CTRR image push --plain-http "$R/bench/go:1" >/dev/null
T_GO=$(awk -v a="$(now)" -v b="$t0" 'BEGIN{printf "%.2f", a-b}')

echo
echo "| image | stargaze convert (r2r) | ctr-remote pull+convert+push | speed-up | stargaze peak RSS |"
echo "|---|---|---|---|---|"
echo "| ${BENCH_OCI:-$BENCH_LAYER_PATHS}, $((SIZE / 1000000)) MB of blobs | ${T_SG} s | ${T_GO} s | $(awk -v a="$T_GO" -v b="$T_SG" 'BEGIN{printf "%.1fx", a/b}') | ${RSS_SG} MiB |"
