#!/usr/bin/env bash
# `make run`: a collector on the embedded default (DuckDB under ./data) printing every
# record it receives to this terminal, and a live sensor feeding it. Both run on the
# configuration schema's defaults (`--config /dev/null`: /etc/loupe is the services').
#
#   scripts/run.sh            sensor on the default-route interface and lo (a tunnel
#                             without Ethernet frames as default route is left out)
#   IFACE=eth1 scripts/run.sh (or `make run IFACE=eth1`; "eth1,lo" for several) those only
#   scripts/run.sh --demo     (or `make run DEMO=1`) two network namespaces joined by a
#                             veth (198.18.0.1 <-> 198.18.0.2, fc00::1 <-> fc00::2), with
#                             an HTTP server, openssl s_server and dnsmasq on one side and
#                             bounded loops of curl, openssl s_client and dig on the other;
#                             the sensor watches the client's veth
#
# Until the first L7 record the sensor logs a heartbeat every 5 s ("N packets, M flows so
# far, no L7 yet"), so a quiet interface is told apart from a dead sensor.
#
# Environment, so that a test (or a second run) does not collide with a running one:
#   LOUPE_DATA_DIR  store and spool directory (default ./data)
#   COLLECTOR       collector address (default 127.0.0.1:50051)
#   METRICS         the sensor's Prometheus address (default 127.0.0.1:9464; "" off)
#   UI              the collector's web console (default 127.0.0.1:8081; "" off); its URL
#                   is printed once the collector is up (docs/console.md)
#
# The collector must be listening before the sensor starts: if it cannot start (port in
# use, store locked), this script says so in one line and exits 1, rather than letting
# the sensor export to whatever else listens there. Ctrl-C (or SIGTERM) stops the sensor
# first, so its last flows reach the collector, then everything else, removes what the
# script created, and exits 0. Needs root (the sensor loads BPF programs; the demo
# creates namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."

DEMO="${DEMO:-}"
if [[ "${1:-}" == "--demo" ]]; then
    DEMO=1
fi
LOUPE=.venv/bin/loupe
DATA="${LOUPE_DATA_DIR:-./data}"
COLLECTOR="${COLLECTOR:-127.0.0.1:50051}"
METRICS="${METRICS-127.0.0.1:9464}"
UI="${UI-127.0.0.1:8081}"
IFACE="${IFACE:-}"
# How long the collector may take to listen (DuckDB open, gRPC up: about 1 s here).
COLLECTOR_START_S=30
TAG="lrun$$"
WORK="$(mktemp -d /tmp/loupe-run.XXXXXX)"
PIDS=()
SENSOR_PID=""
TAIL_PID=""

cleanup() {
    # A second Ctrl-C must not cut the cleanup short.
    trap - EXIT
    trap '' INT TERM
    # The sensor first, alone (SIGTERM: it exports every flow to the collector, which is
    # still up, and detaches), then the rest.
    if [[ -n "$SENSOR_PID" ]]; then
        kill -TERM "$SENSOR_PID" 2>/dev/null || true
        wait "$SENSOR_PID" 2>/dev/null || true
    fi
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    # After the collector: it passes on the collector's last lines, then ends (--pid).
    if [[ -n "$TAIL_PID" ]]; then
        wait "$TAIL_PID" 2>/dev/null || true
    fi
    if [[ -n "$DEMO" ]]; then
        ip netns del "${TAG}a" 2>/dev/null || true
        ip netns del "${TAG}b" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
# Ctrl-C and SIGTERM are how this script is meant to end: after a clean cleanup that is
# success (exit 0), so `make run` prints no "Error 130". Any other exit keeps its status.
trap 'cleanup; exit 0' INT TERM
trap cleanup EXIT

if [[ $EUID -ne 0 ]]; then
    echo "run.sh: the sensor loads BPF programs: run as root (sudo make run)" >&2
    exit 1
fi

# Waits until the collector serves on $COLLECTOR itself: the port is bound by its pid (not
# merely by someone: another process there would take the sensor's records), and a status
# call through that port is answered (it binds before opening its store, which can still
# fail). If it exits first, its one-line reason is repeated as this script's one line.
wait_for_collector() {
    local port="${COLLECTOR##*:}" deadline=$((SECONDS + COLLECTOR_START_S)) why
    while ((SECONDS < deadline)); do
        if ! kill -0 "$COLLECTOR_PID" 2>/dev/null; then
            why="$(grep -v '^\s*$' "$WORK/collector.err" | tail -n 1 | sed 's/^loupe: error: //')"
            case "$why" in
                *"console"*) why+=" (make run UI=HOST:PORT picks another, UI= turns it off)" ;;
                *"cannot listen"*) why+=" (make run COLLECTOR=HOST:PORT picks another address)" ;;
                *locked*) why+=" (make run LOUPE_DATA_DIR=DIR picks another store)" ;;
            esac
            echo "run.sh: the collector did not start: ${why:-it exited}" >&2
            exit 1
        fi
        if ss -Hltnp "sport = :$port" 2>/dev/null | grep -q "pid=$COLLECTOR_PID," &&
           timeout 5 "$LOUPE" collector status --collector "$COLLECTOR" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    why="$(grep -v '^\s*$' "$WORK/collector.err" | tail -n 1)"
    echo "run.sh: the collector does not answer on $COLLECTOR after ${COLLECTOR_START_S} s" \
         "(its last log line: ${why:-none}); stopped it, try again" >&2
    exit 1
}

mkdir -p "$DATA"
# Its own session: Ctrl-C reaches the whole foreground process group, and the collector
# must outlive the sensor's last flush; cleanup() stops it after the sensor. (setsid
# execs in place here: a script's background child never leads a process group, so
# $! is the collector itself, which wait_for_collector relies on.) Its log goes to a
# file first, so that a failed start can be reported in one line.
setsid "$LOUPE" collector run --config /dev/null --data-dir "$DATA" --listen "$COLLECTOR" \
    --metrics "" --ui "$UI" --print 2>"$WORK/collector.err" &
COLLECTOR_PID=$!
PIDS+=("$COLLECTOR_PID")
wait_for_collector
if [[ -n "$UI" ]]; then
    echo "run.sh: web console on http://$UI/" >&2
fi
# From now on its log reaches the terminal as it is written.
tail -n +1 -s 0.2 -f --pid="$COLLECTOR_PID" "$WORK/collector.err" >&2 &
TAIL_PID=$!

SENSOR_ARGS=(--config /dev/null --collector "$COLLECTOR" --spool-dir "$DATA/spool"
             --metrics "$METRICS" --heartbeat 5)
if [[ -z "$DEMO" ]]; then
    IFACES=()
    if [[ -n "$IFACE" ]]; then
        read -r -a IFACES <<< "${IFACE//,/ }"
    else
        dev="$(ip route show default | awk '/ dev / {for (i = 1; i < NF; i++) if ($i == "dev") {print $(i + 1); exit}}')"
        # The meter parses Ethernet frames (link type 1) or loopback (772); a default
        # route over a tunnel (WireGuard, tun) is left out, with a word about it.
        if [[ -n "$dev" ]] && ! [[ "$(cat "/sys/class/net/$dev/type" 2>/dev/null)" =~ ^(1|772)$ ]]; then
            echo "run.sh: the default route goes over $dev, which carries no Ethernet frames (a tunnel?); leaving it out" >&2
            dev=""
        fi
        # lo as well: local traffic (a test server on 127.0.0.1) is what a first try makes.
        if [[ -n "$dev" && "$dev" != lo ]]; then
            IFACES+=("$dev")
        fi
        IFACES+=(lo)
    fi
    echo "run.sh: sensor on ${IFACES[*]}; records follow (Ctrl-C stops)" >&2
    for dev in "${IFACES[@]}"; do
        SENSOR_ARGS+=(--iface "$dev")
    done
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
    SENSOR_ARGS+=(--netns "$A" --iface veth0)
fi

"$LOUPE" sensor run "${SENSOR_ARGS[@]}" &
SENSOR_PID=$!
# Stopped first by cleanup(): the sensor's last records still reach the collector. The
# sensor ending on its own (a start that failed, one line from it) ends the run with its
# status; Ctrl-C and SIGTERM end it in the trap above.
status=0
wait "$SENSOR_PID" || status=$?
SENSOR_PID=""
exit "$status"
