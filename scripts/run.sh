#!/usr/bin/env bash
# `make run`: a collector on the embedded default (./data/loupe.duckdb) printing every
# record it receives to this terminal, and a live sensor feeding it.
#
#   scripts/run.sh            sensor on the default-route interface (lo if there is none,
#                             or if it is a tunnel without Ethernet frames)
#   scripts/run.sh --demo     (or `make run DEMO=1`) two network namespaces joined by a
#                             veth (198.18.0.1 <-> 198.18.0.2, fc00::1 <-> fc00::2), with
#                             an HTTP server, openssl s_server and dnsmasq on one side and
#                             bounded loops of curl, openssl s_client and dig on the other;
#                             the sensor watches the client's veth
#
# Ctrl-C stops everything and removes what the script created (trap below). Needs root
# (the sensor loads BPF programs; the demo creates namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."

DEMO="${DEMO:-}"
if [[ "${1:-}" == "--demo" ]]; then
    DEMO=1
fi
LOUPE=.venv/bin/loupe
COLLECTOR=127.0.0.1:50051
TAG="lrun$$"
WORK="$(mktemp -d /tmp/loupe-run.XXXXXX)"
PIDS=()

cleanup() {
    # A second Ctrl-C must not cut the cleanup short.
    trap - EXIT
    trap '' INT TERM
    # The sensor first, alone (SIGTERM: it exports every flow to the collector, which is
    # still up, and detaches), then the rest.
    if [[ -n "${SENSOR_PID:-}" ]]; then
        kill -TERM "$SENSOR_PID" 2>/dev/null || true
        wait "$SENSOR_PID" 2>/dev/null || true
    fi
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n "$DEMO" ]]; then
        ip netns del "${TAG}a" 2>/dev/null || true
        ip netns del "${TAG}b" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

if [[ $EUID -ne 0 ]]; then
    echo "run.sh: the sensor loads BPF programs: run as root (sudo make run)" >&2
    exit 1
fi

mkdir -p ./data
# Its own session: Ctrl-C reaches the whole foreground process group, and the collector
# must outlive the sensor's last flush; cleanup() stops it after the sensor.
setsid "$LOUPE" collector run --data-dir ./data --listen "$COLLECTOR" --print &
COLLECTOR_PID=$!
PIDS+=("$COLLECTOR_PID")

SENSOR_PID=""
SENSOR_ARGS=(--collector "$COLLECTOR" --spool-dir "$PWD/data/spool" --metrics 127.0.0.1:9464)
if [[ -z "$DEMO" ]]; then
    IFACE="$(ip route show default | awk '/ dev / {for (i = 1; i < NF; i++) if ($i == "dev") {print $(i + 1); exit}}')"
    # The meter parses Ethernet frames (link type 1) or loopback (772); a default route
    # over a tunnel (WireGuard, tun) is left for lo, with a word about it.
    if [[ -n "$IFACE" ]] && ! [[ "$(cat "/sys/class/net/$IFACE/type" 2>/dev/null)" =~ ^(1|772)$ ]]; then
        echo "run.sh: the default route goes over $IFACE, which carries no Ethernet frames (a tunnel?); watching lo" >&2
        IFACE=""
    fi
    IFACE="${IFACE:-lo}"
    echo "run.sh: sensor on $IFACE; records follow (Ctrl-C stops)" >&2
    SENSOR_ARGS+=(--iface "$IFACE")
else
    A="${TAG}a" B="${TAG}b"
    ip netns add "$A"
    ip netns add "$B"
    ip link add "${TAG}x" netns "$A" type veth peer name "${TAG}y" netns "$B"
    ip -n "$A" link set "${TAG}x" name veth0
    ip -n "$B" link set "${TAG}y" name veth0
    for ns in "$A" "$B"; do
        ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.accept_dad=0
        ip -n "$ns" link set lo up
    done
    ip -n "$A" addr add 198.18.0.1/24 dev veth0
    ip -n "$B" addr add 198.18.0.2/24 dev veth0
    ip -n "$A" -6 addr add fc00::1/64 dev veth0 nodad
    ip -n "$B" -6 addr add fc00::2/64 dev veth0 nodad
    ip -n "$A" link set veth0 up
    ip -n "$B" link set veth0 up
    # Servers in B.
    mkdir -p "$WORK/www"
    echo "hello from the Loupe demo" > "$WORK/www/index.html"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -keyout "$WORK/key.pem" -out "$WORK/cert.pem" -subj "/CN=demo.loupe.test" 2>/dev/null
    (cd "$WORK/www" && exec ip netns exec "$B" python3 -m http.server --bind 198.18.0.2 8080 \
        >/dev/null 2>&1) &
    PIDS+=($!)
    ip netns exec "$B" openssl s_server -accept 443 -cert "$WORK/cert.pem" \
        -key "$WORK/key.pem" -www -alpn h2,http/1.1 </dev/null >/dev/null 2>&1 &
    PIDS+=($!)
    ip netns exec "$B" dnsmasq --no-daemon --no-resolv --no-hosts --bind-interfaces \
        --listen-address=198.18.0.2 --port=53 --pid-file= --conf-file=/dev/null \
        --address=/demo.loupe.test/198.18.0.2 >/dev/null 2>&1 &
    PIDS+=($!)
    # Clients in A: bounded loops (at most 20 minutes), one round every 2 s.
    ip netns exec "$A" bash -c '
        for i in $(seq 1 600); do
            curl -s -o /dev/null http://198.18.0.2:8080/index.html
            dig @198.18.0.2 +tries=1 +time=1 demo.loupe.test A >/dev/null
            openssl s_client -connect 198.18.0.2:443 -servername demo.loupe.test \
                -alpn h2,http/1.1 </dev/null >/dev/null 2>&1
            sleep 2
        done' &
    PIDS+=($!)
    echo "run.sh: demo traffic in $A -> $B; sensor on $A veth0 (Ctrl-C stops)" >&2
    SENSOR_ARGS+=(--netns "$A" --iface veth0 --select port:8080,port:443,port:53)
fi

"$LOUPE" sensor run "${SENSOR_ARGS[@]}" &
SENSOR_PID=$!
# Stopped first by cleanup(): the sensor's last records still reach the collector.
wait "$SENSOR_PID"
