"""Enforcement: how fast a block verdict reaches the kernel, and what leaks before it.

    sudo .venv/bin/python -m tests.benchmarks.bench_enforce [--requests 40] [--modes ...]

A live sensor (in this process: LiveSensor with the sqli group in block mode) watches
nginx in a namespace, proxying to an app that answers after 0, 5 or 50 ms. A client in
another namespace sends --requests SQL injections per delay, one connection each, and
reads until the connection ends. Printed:
- verdict latency: the request's packet seen (its kernel timestamp) -> block_flow written,
  p50/p99/max over every blocked request;
- per server delay: response octets that reached the client per blocked request (mean,
  max, and how many requests got any), and how many connections ended by a reset.
Loupe is passive: the request has reached the server before the verdict. Whatever the
server sends before the map write passes; after it, nothing does.

The same runs again in hold mode ([enforce] hold names the server: the kernel drops its
responses while their request's verdict is pending), with and without the nudge (a
duplicate ACK to the server on release). Each mode also sends --requests benign requests
to the 0 ms server and prints their time to the whole response (p50/p99), and in hold
mode how long the verdict kept them pending (the request's last packet -> hold_ok
written): the extra delay an allowed response pays.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from tests.enforce.peers import web_server
from tests.live.rig import stop, wait_tcp
from tests.netns import VethPair

SQLI = "/items?id=1%27%20UNION%20SELECT%20username,password%20FROM%20users--"
RULES = '[[group]]\nname = "sqli"\nmode = "block"\n'

CLIENT = r"""
import json, socket, sys, time
host, n, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
out = []
for i in range(n):
    try:
        s = socket.create_connection((host, 80), timeout=3)
    except OSError:
        out.append((0, "no-connect", 0.0))
        continue
    t0 = time.monotonic()
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    got, how = 0, "eof"
    while True:
        try:
            b = s.recv(65536)
        except ConnectionResetError:
            how = "reset"; break
        except socket.timeout:
            how = "timeout"; break
        if not b:
            break
        got += len(b)
    out.append((got, how, time.monotonic() - t0))
    s.close()
    time.sleep(0.05)
print(json.dumps(out))
"""


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def micro(repeat: int = 200_000) -> None:
    """The program's cost per packet of a steady TCP flow (BPF_PROG_TEST_RUN, mean of
    `repeat` runs): no block in force, against a source ban and a flow block of other
    addresses in force (the packet then takes the full parse and both lookups)."""
    import ipaddress

    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether
    from scapy.packet import raw

    from sensor.enforce.hold import HoldMaps, parse_service
    from sensor.enforce.maps import BlockMaps
    from sensor.kernel import abi, loader, testrun

    prog = loader.load(loader.LoadOptions(flow_map_size=1024))
    try:
        m = BlockMaps(prog.block_cfg_fd, prog.block_flow_fd, prog.block_src_fd)
        m.clear()
        m.beat()
        frame = raw(Ether() / IP(src="198.18.9.1", dst="198.18.9.2")
                    / TCP(sport=40000, dport=5000, flags="A") / (b"x" * 100))
        syn = raw(Ether() / IP(src="198.18.9.1", dst="198.18.9.2")
                  / TCP(sport=40000, dport=5000, flags="S"))
        testrun.run_skb(prog.prog_fd, syn)
        for _ in range(3):
            testrun.run_skb(prog.prog_fd, frame)   # steady: the fast path from here on

        def cost() -> float:
            return min(testrun.run_skb(prog.prog_fd, frame, repeat=repeat).duration_ns
                       for _ in range(5))

        bare = cost()
        k = abi.FlowKey()
        k.ip_version, k.protocol, k.port_lo, k.port_hi = 4, 6, 1, 2
        m.block_flow(k, 60 * 10**9, abi.BLOCK_CLI)
        m.block_src(ipaddress.ip_network("198.19.0.0/16"), 60 * 10**9, abi.BLOCK_CLI)
        m.beat()
        active = cost()
        m.clear()
        m.beat()
        hold = HoldMaps(prog.hold_svc_fd, prog.hold_req_fd, prog.hold_ok_fd)
        hold.set_services([parse_service("198.19.0.2:80")], 10**9)
        m.set_bit(abi.BLOCK_ANY_HOLD, True)
        held = cost()
        hold.clear()
        m.clear()
        print(f"program cost per steady TCP packet: {bare:.0f} ns with no block, "
              f"{active:.0f} ns while blocks (of other flows and sources) are in force, "
              f"{held:.0f} ns while another service is held")
    finally:
        prog.close()


MODES = {"off": "no hold", "hold": "hold mode, nudge on release",
         "hold-no-nudge": "hold mode, no nudge (the server's own retransmission)"}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--modes", nargs="+", choices=tuple(MODES), default=list(MODES))
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_enforce: needs root (namespaces, the kernel program)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-enforce-", dir="/root" if
                                 Path("/root").is_dir() else None))
    latencies: list[int] = []
    with VethPair.create("be") as pair:
        pair.wait_ready()
        for mode in args.modes:
            print(f"-- {MODES[mode]}")
            latencies += run_mode(pair, work / mode, mode, args.requests)
    micro()
    if latencies:
        ms = [x / 1e6 for x in latencies]
        print(f"verdict latency (packet seen -> block_flow written), {len(ms)} verdicts: "
              f"p50 {pct(ms, 0.5):.2f} ms, p99 {pct(ms, 0.99):.2f} ms, max {max(ms):.2f} ms")
    return 0


def run_mode(pair, work: Path, mode: str, requests: int) -> list[int]:
    from sensor.enforce.hold import parse_service
    from sensor.engine.live import LiveConfig, LiveSensor
    from sensor.sensor_cli import FanOut

    work.mkdir(parents=True)
    rules = work / "block.toml"
    rules.write_text(RULES)
    client = work / "client.py"
    client.write_text(CLIENT)
    pin_dir = f"/sys/fs/bpf/loupe-bench-{uuid.uuid4().hex[:8]}"
    latencies: list[int] = []
    hold = (parse_service(f"{pair.b.ip4}:80"),) if mode != "off" else ()
    sensor = LiveSensor(LiveConfig(interfaces=(pair.b.iface,), netns=pair.b.netns,
                                   rules=str(rules), enforce_pin_dir=pin_dir,
                                   process_attribution=False, enforce_hold=hold,
                                   enforce_hold_nudge=mode == "hold"), FanOut([]))
    sensor.start()
    done = threading.Event()

    def loop():
        while not done.is_set():
            sensor.step(50)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        print(f"{requests} blocked requests per server delay; load "
              f"{os.getloadavg()[0]:.2f}")
        for delay_ms in (0, 5, 50):
            d = work / f"d{delay_ms}"
            d.mkdir()
            procs = web_server(pair.b, d, delay_s=delay_ms / 1000)
            try:
                wait_tcp(pair.a, pair.b.ip4, 80)
                time.sleep(0.3)
                before = len(sensor.enforcer.stats.latencies_ns)
                out = pair.a.run(sys.executable, str(client), pair.b.ip4,
                                 str(requests), SQLI, timeout=300)
                res = json.loads(out.stdout)
                time.sleep(0.2)
                lat = list(sensor.enforcer.stats.latencies_ns)[before:]
                latencies += lat
            finally:
                for p in procs:
                    stop(p)
            failed = sum(1 for _, how, _ in res if how == "no-connect")
            res = [r for r in res if r[1] != "no-connect"]
            leaked = [g for g, _, _ in res]
            resets = sum(1 for _, how, _ in res if how == "reset")
            print(f"server answers after {delay_ms:>2} ms: response octets at the client "
                  f"mean {statistics.mean(leaked):.0f}, max {max(leaked)}; "
                  f"{sum(1 for g in leaked if g)}/{len(res)} requests leaked any; "
                  f"{resets}/{len(res)} ended by a reset; "
                  f"{len(lat)} verdicts enforced"
                  + (f"; {failed} connections not established" if failed else ""))
        allowed(pair, work, sensor, client, requests)
    finally:
        done.set()
        t.join(5)
        stats = sensor.enforcer.stats
        sensor.stop()
    print(f"resets sent {stats.resets_sent}, skipped {stats.resets_skipped}; "
          f"held blocks {stats.held_blocks}, holds released {stats.holds_released}, "
          f"nudges {stats.nudges_sent}")
    return latencies


def allowed(pair, work: Path, sensor, client: Path, requests: int) -> None:
    """Benign requests to the 0 ms server: the time to the whole response, and in hold
    mode how long each was held pending (the enforcer's hold_ns)."""
    d = work / "allowed"
    d.mkdir()
    procs = web_server(pair.b, d, delay_s=0)
    stats = sensor.enforcer.stats
    try:
        wait_tcp(pair.a, pair.b.ip4, 80)
        time.sleep(0.3)
        before = len(stats.hold_ns)
        held_before = sensor.kernel_counters().get("held", 0)
        out = pair.a.run(sys.executable, str(client), pair.b.ip4, str(requests), "/hello",
                         timeout=300, check=False)
        if out.returncode:
            raise SystemExit(f"bench_enforce: the client failed: {out.stderr.strip()}")
        res = json.loads(out.stdout)
        time.sleep(0.2)
        held = [x / 1e6 for x in list(stats.hold_ns)[before:]]
        dropped = sensor.kernel_counters().get("held", 0) - held_before
    finally:
        for p in procs:
            stop(p)
    failed = sum(1 for _, how, _ in res if how == "no-connect")
    res = [r for r in res if r[1] != "no-connect"]
    whole = [sec * 1e3 for got, how, sec in res if how == "eof" and got > 1000]
    line = (f"allowed requests, 0 ms server: {len(whole)}/{len(res)} whole; time to the "
            f"whole response p50 {pct(whole, 0.5):.2f} ms, p99 {pct(whole, 0.99):.2f} ms, "
            f"max {max(whole):.2f} ms, {sum(1 for w in whole if w > 100)} over 100 ms"
            + (f"; {failed} connections not established" if failed else ""))
    if held:
        line += (f"; pending (request -> released) p50 {pct(held, 0.5):.2f} ms, "
                 f"p99 {pct(held, 0.99):.2f} ms; {dropped} response packets held")
    print(line)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
