# Sourced by bench/startup.sh and bench/fetch-link.sh: a registry's network
# namespace joined to the host by a veth pair, which link_shape limits with
# tc tbf (both directions). Latency comes from the NFQUEUE delayer
# (../shared/tools/nfdelay.c; this kernel has no netem): packets entering
# the namespace wait in queue $QNUM while a delayer runs, and pass at once
# when none does (--queue-bypass).
#
# The caller sets NS, VH, VN, HOST_IP, REG_IP (a /30) and QNUM.

link_create() {
    ip link del "$VH" 2>/dev/null || true
    ip netns del "$NS" 2>/dev/null || true
    ip netns add "$NS"
    ip link add "$VH" type veth peer name "$VN"
    ip link set "$VN" netns "$NS"
    ip addr add "$HOST_IP/30" dev "$VH"
    ip link set "$VH" up
    ip netns exec "$NS" ip addr add "$REG_IP/30" dev "$VN"
    ip netns exec "$NS" ip link set "$VN" up
    ip netns exec "$NS" ip link set lo up
    ip netns exec "$NS" iptables -A INPUT -i "$VN" -j NFQUEUE --queue-num "$QNUM" --queue-bypass
}

link_shape() { # rate burst limit
    tc qdisc replace dev "$VH" root tbf rate "$1" burst "$2" limit "$3"
    ip netns exec "$NS" tc qdisc replace dev "$VN" root tbf rate "$1" burst "$2" limit "$3"
}

link_unshape() {
    tc qdisc del dev "$VH" root 2>/dev/null || true
    ip netns exec "$NS" tc qdisc del dev "$VN" root 2>/dev/null || true
}

link_destroy() {
    ip link del "$VH" 2>/dev/null
    ip netns del "$NS" 2>/dev/null
}
