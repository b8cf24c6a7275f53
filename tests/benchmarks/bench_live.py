"""The live sensor's userspace cost and delivery latency, on real traffic between two
namespaces (`loupe sensor run` attached to the client's veth, as in tests/live).

1. CPU per 1,000 HTTP requests: one keep-alive connection (curl) doing --requests GETs
   of 1 KiB bodies, then the same number of 1 MiB bodies; the sensor process's CPU
   seconds (user + system, all threads, psutil) during each, per 1,000 requests, and
   their ratio (target <= 1.5: the kernel skips bodies, so userspace pays per request,
   not per byte).
2. Flow end to visible at the collector: short HTTP flows, one every 50 ms; for each,
   the time from the moment it became due for export (its last packet + the TCP
   linger) until a query at the collector (real, DuckDB) first returns it; p50/p99.
3. Selection off (flows only, --no-l7) at --rate new UDP flows per second for
   --seconds: the sensor's CPU seconds per second of traffic, and whether it kept up.

    sudo .venv/bin/python -m tests.benchmarks.bench_live [--requests 1000] [--rate 20000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from tests.export.collector_proc import CollectorProcess, query
from tests.live.rig import Sensor, http_requests, start_http, stop, wait_tcp
from tests.netns import VethPair

# A UDP flow generator for the namespace: `rate` new flows per second (distinct
# destination ports from several source sockets) for `seconds`, one datagram each.
FLOODER = r"""
import socket, sys, time
dst, rate, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(8)]
total = int(rate * seconds)
start = time.monotonic()
sent = 0
while sent < total:
    due = min(total, int((time.monotonic() - start) * rate) + 200)
    while sent < due:
        s = socks[(sent // 60000) % len(socks)]
        s.sendto(b"x", (dst, 1024 + sent % 60000))
        sent += 1
    time.sleep(0.005)
print(sent, time.monotonic() - start)
"""


# Requests per second of the paced client: a busy keep-alive connection that a
# userspace sharing two cores with client and server can follow. Unpaced on a veth, a
# request every ~0.25 ms outruns the L7 stage and heads are truncated (counted; see
# docs/sensor.md, "What is lost").
RATE = 100.0


def _cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def _base_args(pair, work: Path) -> list[str]:
    return ["--netns", pair.a.netns, "--iface", pair.a.iface, "--spool-dir",
            str(work / "spool"), "--sensor-id", "bench", "--no-process",
            "--set", "timeouts.tcp_linger=1s"]


def bench_requests(pair, work: Path, requests: int, extra: list[str]) -> dict[str, float]:
    http = start_http(pair.b, work)
    sensor = Sensor(_base_args(pair, work) + ["--collector", "", "--jsonl", "/dev/null",
                                              "--select", "port:8080", *extra], workdir=work)
    out: dict[str, float] = {}
    try:
        wait_tcp(pair.a, pair.b.ip4, 8080)
        time.sleep(1.5)
        sensor.start()
        for name, size in (("1KiB", 1024), ("1MiB", 1 << 20)):
            time.sleep(1.5)   # the previous connection's record is out
            before = _cpu(sensor.proc.pid)
            started = time.perf_counter()
            assert http_requests(pair.a, work, pair.b.ip4, size, requests, RATE) == requests
            time.sleep(2.5)   # the flow ends and is exported: its cost counts too
            out[f"{name} cpu_s_per_1000"] = (_cpu(sensor.proc.pid) - before) * 1000 / requests
            out[f"{name} wall_s"] = time.perf_counter() - started - 2.5
        sensor.stop()
        closing = sensor.closing()
        out["l7_events"] = closing["l7_events"]
        out["payload_octets_copied"] = closing["payload_octets"]
    finally:
        sensor.kill()
        stop(http)
    out["ratio 1MiB/1KiB"] = out["1MiB cpu_s_per_1000"] / out["1KiB cpu_s_per_1000"]
    return out


def bench_latency(pair, work: Path, flows: int) -> dict[str, float]:
    http = start_http(pair.b, work)
    collector = CollectorProcess(work / "data").start()
    linger_s = 1.0
    sensor = Sensor(_base_args(pair, work) + ["--collector", collector.address,
                                              "--select", "port:8080",
                                              "--set", "export.batch_delay=200ms"],
                    workdir=work)
    seen: dict[str, int] = {}
    try:
        wait_tcp(pair.a, pair.b.ip4, 8080)
        time.sleep(1.5)
        sensor.start()
        loop = pair.a.popen("bash", "-c", f"for i in $(seq 1 {flows}); do curl -s -o "
                            f"/dev/null http://{pair.b.ip4}:8080/size/10; sleep 0.05; done",
                            stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + flows * 0.2 + 30
        ends: dict[str, int] = {}
        while time.monotonic() < deadline:
            rows = query(collector.address,
                         "SELECT uid, flow_end_ns FROM flows WHERE dst_port = 8080")
            now = time.time_ns()
            for uid, end in rows:
                if uid not in seen:
                    seen[uid] = now
                    ends[uid] = end
            if loop.poll() is not None and len(seen) >= flows:
                break
            time.sleep(0.02)
        loop.wait(30)
    finally:
        sensor.kill()
        stop(http)
        collector.stop()
    lat = sorted((seen[u] - ends[u]) / 1e9 - linger_s for u in seen)
    return {"flows": len(lat), "p50_s": statistics.median(lat),
            "p99_s": lat[min(len(lat) - 1, int(len(lat) * 0.99))], "max_s": lat[-1]}


def bench_flows(pair, work: Path, rate: int, seconds: float) -> dict[str, float]:
    script = work / "flood.py"
    script.write_text(FLOODER)
    sensor = Sensor(_base_args(pair, work) + [
        "--collector", "", "--jsonl", "/dev/null", "--no-l7",
        "--set", "kernel.flow_map_size=262144", "--set", "timeouts.other_idle=2s"],
        workdir=work)
    try:
        sensor.start()
        time.sleep(1.0)
        before = _cpu(sensor.proc.pid)
        started = time.perf_counter()
        res = pair.a.run(sys.executable, str(script), pair.b.ip4, str(rate), str(seconds),
                         timeout=seconds * 10 + 60)
        sent, took = res.stdout.split()
        time.sleep(4.0)   # idle timeout (2 s) + reads: the flows are exported
        cpu = _cpu(sensor.proc.pid) - before
        wall = time.perf_counter() - started
        sensor.stop()
        closing = sensor.closing()
    finally:
        sensor.kill()
    return {"flows_sent": int(sent), "send_s": float(took),
            "achieved_rate": int(sent) / float(took),
            "sensor_cpu_s": cpu, "wall_s": wall, "cpu_per_wall_s": cpu / wall,
            "cpu_us_per_flow": cpu / int(sent) * 1e6,
            "flow_records": closing["flows"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--latency-flows", type=int, default=100)
    ap.add_argument("--rate", type=int, default=20000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--sensor-arg", action="append", default=[], metavar="ARG",
                    help="extra `loupe sensor run` argument for the requests run (repeatable)")
    ap.add_argument("--only", choices=("requests", "latency", "flows"), default=None)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_live needs root (namespaces, BPF)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="loupe-bench-live-") as tmp:
        work = Path(tmp)
        with VethPair.create("lbn") as pair:
            pair.wait_ready()
            if args.only in (None, "requests"):
                print("requests:", bench_requests(pair, work / "r", args.requests, args.sensor_arg)
                      if (work / "r").mkdir() is None else None, flush=True)
            if args.only in (None, "latency"):
                (work / "l").mkdir()
                print("latency:", bench_latency(pair, work / "l", args.latency_flows),
                      flush=True)
            if args.only in (None, "flows"):
                (work / "f").mkdir()
                print("selection off:", bench_flows(pair, work / "f", args.rate, args.seconds),
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
