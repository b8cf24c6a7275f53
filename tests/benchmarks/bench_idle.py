"""What an idle live sensor costs: `loupe sensor run` with its defaults (L7 selection,
process attribution, metrics server, export to a real collector on 127.0.0.1),
attached to a veth in a test namespace that carries no traffic.

After READY=1 and --settle seconds (past the exporter's idle_close_s, 10 s, after which
an idle sensor holds no gRPC channel), it samples the process for --seconds and prints:
- memory: RSS, PSS and USS (Private_*) from /proc/PID/smaps_rollup, and the largest
  contributors by resident size from /proc/PID/smaps (anonymous memory, which holds the
  Python heap, counted as one line);
- CPU: user + system time from /proc/PID/stat over the window, in % of one core;
- threads: how many, and per thread (by name) its CPU and its context switches per
  second from /proc/PID/task/*/status. Voluntary switches are the thread blocking, so
  each is a wakeup to come: their sum is the process's wakeups per second.

    sudo .venv/bin/python -m tests.benchmarks idle
    sudo .venv/bin/python -m tests.benchmarks.bench_idle [--seconds 60] [--no-process]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from tests.export.collector_proc import CollectorProcess
from tests.live.rig import Sensor
from tests.netns import VethPair

MIB = 1 << 20
TICK = os.sysconf("SC_CLK_TCK")


def memory(pid: int) -> dict[str, float]:
    """RSS, PSS and USS in MiB (smaps_rollup)."""
    kb: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        kb[name] = int(rest.split()[0])
    uss = kb["Private_Clean"] + kb["Private_Dirty"]
    return {"rss_mib": kb["Rss"] / 1024, "pss_mib": kb["Pss"] / 1024, "uss_mib": uss / 1024}


def mappings(pid: int, top: int) -> list[tuple[str, float]]:
    """(mapping, resident MiB), the `top` largest, file mappings grouped by file."""
    rss: dict[str, int] = defaultdict(int)
    name = "?"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(None, 5)
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            path = head[5].strip() if len(head) > 5 else ""
            name = Path(path).name if path.startswith("/") else (path or "[anon]")
        elif head[0] == "Rss:":
            rss[name] += int(head[1])
    return [(n, kb / 1024) for n, kb in sorted(rss.items(), key=lambda x: -x[1])[:top]]


def cpu_ticks(pid: int) -> int:
    # utime and stime are fields 14 and 15, counted after the command name, which may
    # itself hold spaces and parentheses.
    fields = Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()
    return int(fields[11]) + int(fields[12])


def tasks(pid: int) -> dict[int, tuple[str, int, int, int]]:
    """tid -> (name, CPU ns, voluntary switches, involuntary switches)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            run_ns = int((task / "schedstat").read_text().split()[0])
            status = (task / "status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue   # the thread ended meanwhile
        vol = int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1))
        invol = int(re.search(r"^nonvoluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1))
        out[int(task.name)] = (name, run_ns, vol, invol)
    return out


def sample(pid: int, seconds: float) -> dict:
    before_t, before_cpu, started = tasks(pid), cpu_ticks(pid), time.monotonic()
    time.sleep(seconds)
    after_t, after_cpu = tasks(pid), cpu_ticks(pid)
    wall = time.monotonic() - started
    threads = []
    for tid, (name, run_ns, vol, invol) in sorted(after_t.items()):
        _, run0, vol0, invol0 = before_t.get(tid, (name, 0, 0, 0))
        threads.append({"tid": tid, "name": name,
                        "cpu_pct": (run_ns - run0) / wall / 1e7,
                        "vol_per_s": (vol - vol0) / wall, "invol_per_s": (invol - invol0) / wall})
    return {
        "seconds": wall,
        "cpu_pct": (after_cpu - before_cpu) / TICK / wall * 100,
        "threads": len(after_t),
        "wakeups_per_s": sum(t["vol_per_s"] for t in threads),
        "involuntary_per_s": sum(t["invol_per_s"] for t in threads),
        "per_thread": threads,
    }


def listen(sensor: Sensor, done: threading.Event) -> threading.Thread:
    """Reads the sensor's sd_notify datagrams (STATUS= every few seconds) while it idles,
    as systemd does: a notify socket nobody reads fills up, and the sensor's next send
    would block its main loop."""
    def run() -> None:
        while not done.is_set() and sensor.proc.poll() is None:
            try:
                sensor.wait_note("READY=1", 0.5)
            except AssertionError:
                pass   # nothing arrived within 0.5 s: look again

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="sampling window")
    ap.add_argument("--settle", type=float, default=15.0,
                    help="seconds after READY=1 before sampling (start-up is not idle)")
    ap.add_argument("--top", type=int, default=12, help="largest mappings to list")
    ap.add_argument("--no-process", action="store_true",
                    help="without process attribution (its own BPF program and thread)")
    ap.add_argument("--sensor-arg", action="append", default=[], metavar="ARG",
                    help="extra `loupe sensor run` argument (repeatable)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_idle needs root (namespaces, BPF)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="loupe-bench-idle-") as tmp, \
            VethPair.create("lbi") as pair:
        work = Path(tmp)
        collector = CollectorProcess(work / "data").start()
        sensor = Sensor(["--netns", pair.a.netns, "--iface", pair.a.iface,
                         "--collector", collector.address, "--spool-dir", str(work / "spool"),
                         "--sensor-id", "bench-idle",
                         *(["--no-process"] if args.no_process else []), *args.sensor_arg],
                        workdir=work)
        try:
            started = time.monotonic()
            sensor.start()
            ready_s = time.monotonic() - started
            done = threading.Event()
            reader = listen(sensor, done)
            try:
                time.sleep(args.settle)
                pid = sensor.proc.pid
                s = sample(pid, args.seconds)
                mem = memory(pid)
                maps = mappings(pid, args.top)
            finally:
                done.set()
                reader.join()
            code = sensor.stop()
        finally:
            sensor.kill()
            collector.stop()
    print(f"start to READY=1: {ready_s:.1f} s; idle for {s['seconds']:.0f} s "
          f"(load average {' '.join(f'{x:.2f}' for x in os.getloadavg())})")
    print("memory: " + ", ".join(f"{k[:-4].upper()} {v:.1f} MiB" for k, v in mem.items()))
    print(f"cpu: {s['cpu_pct']:.2f} % of a core; threads: {s['threads']}; "
          f"wakeups: {s['wakeups_per_s']:.1f}/s (involuntary switches "
          f"{s['involuntary_per_s']:.1f}/s)")
    print("per thread:            cpu %   wakeups/s")
    for t in s["per_thread"]:
        print(f"  {t['tid']:>7} {t['name']:<15} {t['cpu_pct']:6.2f}  {t['vol_per_s']:9.1f}")
    print("largest resident mappings (MiB):")
    for name, mib in maps:
        print(f"  {mib:7.1f}  {name}")
    print(f"sensor exit status {code}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
