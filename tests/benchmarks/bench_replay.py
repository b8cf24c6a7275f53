"""Replay throughput: `loupe replay` (L7 on) against Suricata, NFStream and nDPI on the same
capture, in the same run.

The capture is made by tests/fixtures/gen_mixed.py (HTTP keep-alive, DNS, TLS, bulk TCP
over many flows; at least 1M packets) and cached in tests/benchmarks/out/ (git-ignored).
Each tool runs as its own process from start to exit, so start-up, reading and output
are all inside the figure:

- Loupe: `loupe replay FILE -o /dev/null --format jsonl` (every record is made and
  serialized) with one process (--jobs 1, the default on a busy machine) and with two
  (--jobs 2, the default when two cores are idle);
- NFStream: NFStreamer(source=FILE, n_dissections=20, statistical_analysis=False),
  iterating every flow (its default meter processes: cores - 1);
- Suricata 7: `suricata -r FILE -S /dev/null --runmode single -k none -l DIR`, no rules,
  its default eve.json (flows, HTTP, DNS, TLS) written to DIR;
- nDPI: `ndpiReader -i FILE -q` (flow metering and protocol detection, no records out).
The peers come with `make bench` (scripts/apt-bench-packages.txt); one that is missing is
left out with a line saying so.

Printed per run: wall seconds, packets/s, CPU seconds of the whole process tree (user +
system, children included), packets per CPU second, peak RSS of the whole tree (psutil,
sampled every 50 ms: NFStream meters run in child processes) and the load average; then
the ratio of each Loupe run to each peer, by wall time and by CPU time, and Loupe's
targets: --jobs 1 at >= 1.0x Suricata (--runmode single) by CPU time, and >= 2.0x the
figure replay had before its per-packet path was compiled (BASELINE_PKT_PER_CPU_S). The
machine is shared: wall-time figures move with other people's load, CPU-time figures
much less.

    python -m tests.benchmarks.bench_replay [--packets 1000000] [--rounds 1]
    python -m tests.benchmarks.bench_replay --breakdown     # CPU per stage, in-process
    python -m tests.benchmarks.bench_replay --rounds 3 --tools 'loupe --jobs 1,loupe pure,suricata'
                                          # compiled against pure, paired, with Suricata
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import shutil
import tempfile

import psutil

REPO = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent / "out"

# `loupe replay --jobs 1` on the 1M-packet capture before the per-packet path was
# compiled (12.8 CPU s for 1,000,200 packets on this kind of machine): the reference the
# 2x target is measured against.
BASELINE_PKT_PER_CPU_S = 78_000

_NFSTREAM = """
import sys
from nfstream import NFStreamer
flows = packets = 0
for flow in NFStreamer(source=sys.argv[1], n_dissections=20, statistical_analysis=False):
    flows += 1
    packets += flow.bidirectional_packets
print(f"nfstream: {flows} flows, {packets} packets", file=sys.stderr)
"""


def capture(packets: int, seed: int = 1) -> Path:
    OUT.mkdir(exist_ok=True)
    path = OUT / f"mixed-{packets}-seed{seed}.pcap"
    if not path.exists():
        from tests.fixtures.gen_mixed import generate

        tmp = path.with_suffix(".tmp")
        generate(str(tmp), packets, seed)
        tmp.rename(path)
    return path


def _cpu_children() -> float:
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def measure(argv: list[str], env: dict | None = None) -> tuple[float, float, int, str]:
    """(wall s, CPU s, peak RSS bytes of the process tree, stderr) of one child run.
    CPU time comes from RUSAGE_CHILDREN, which counts every descendant that was waited
    for (NFStream's meters, Loupe's shards)."""
    cpu0 = _cpu_children()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env} if env else None)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass   # a process left between listing and reading
        time.sleep(0.05)
    wall = time.perf_counter() - start
    cpu = _cpu_children() - cpu0
    err = proc.stderr.read()
    if proc.returncode:
        raise SystemExit(f"{argv[:4]} failed ({proc.returncode}):\n{err}")
    return wall, cpu, peak, err


# What the first release registered: every protocol added since must cost the replay of
# the mixed capture (HTTP, DNS, TLS and bulk TCP) at most 5% (their signatures are tried
# on every flow's first bytes).
FIRST_PROTOCOLS = ("http", "dns", "tls")


def _with_registered(names: tuple[str, ...], fn):
    """fn() while the registry holds only the named protocols (detection included)."""
    from sensor.l7 import detect, registry

    everything = registry.registry()
    subset = registry.Registry.of([p for p in everything.protocols if p.name in names])
    registry._found[:] = [subset]
    detect._HINTS.clear()
    try:
        return fn()
    finally:
        registry._found[:] = [everything]
        detect._HINTS.clear()


def breakdown(pcap: Path, limit: int = 150_000) -> None:
    """CPU µs per packet of each stage: the reader, the meter alone, the meter with the
    L7 stage but no parser, with one parser at a time, and with all of them; then the
    JSON lines encoding of that last run's records."""
    from sensor.engine.l7engine import L7Engine
    from sensor.l7.detect import ParserRegistry, default_parsers
    from sensor.engine.meter import Meter
    from sensor.replay.reader import CaptureReader

    start = time.process_time()
    with CaptureReader(pcap) as reader:
        packets = []
        for packet in reader:
            packets.append(packet)
            if len(packets) == limit:
                break
    read_us = (time.process_time() - start) / len(packets) * 1e6
    # The slice is held in memory only for this measurement (a real run streams it):
    # keep its 150k tuples out of the garbage collector's full passes, which would
    # otherwise charge every stage for traversing them.
    gc.freeze()

    last: list = []   # the records of the latest run, for the encoding figure

    def run(make_sink) -> float:
        best = float("inf")
        for _ in range(3):
            out: list = []
            last[:] = [out]
            meter = Meter(emit=out.append, sink=make_sink(out))
            feed = meter.feed
            t = time.process_time()
            for ts, ifx, link, frame, wire in packets:
                feed(ts, ifx, link, frame, wire)
            meter.flush()
            best = min(best, time.process_time() - t)
        return best / len(packets) * 1e6

    print(f"reader (first {len(packets)} packets): {read_us:.2f} µs/packet CPU")
    base = run(lambda out: None)
    print(f"meter: {base:.2f}")
    glue = run(lambda out: L7Engine(emit=out.append, registry=ParserRegistry({})))
    print(f"meter + L7 stage, no parser: {glue:.2f} (+{glue - base:.2f})")
    parsers = default_parsers()   # every registered protocol's parser
    for name in parsers:
        spec = {name: parsers[name]}
        cost = run(lambda out: L7Engine(emit=out.append, registry=ParserRegistry(spec)))
        print(f"meter + L7 stage, {name} parser only: {cost:.2f} (+{cost - glue:.2f})")
    full = run(lambda out: L7Engine(emit=out.append))
    print(f"meter + L7 stage, all parsers: {full:.2f}")
    first = _with_registered(FIRST_PROTOCOLS, lambda: run(lambda out: L7Engine(emit=out.append)))
    again = run(lambda out: L7Engine(emit=out.append))
    every = min(full, again)
    print(f"meter + L7 stage with only {', '.join(FIRST_PROTOCOLS)} registered (the first "
          f"release): {first:.2f}; with every protocol registered: {every:.2f} "
          f"({first / every:.3f}x packets per CPU second; target >= 0.95x)")
    from sensor.replay.cli import JsonLinesOut

    records = last[0]
    encoder = JsonLinesOut(os.devnull)
    encode = encoder.encode
    best = float("inf")
    for _ in range(3):
        t = time.process_time()
        for record in records:
            encode(record)
        best = min(best, time.process_time() - t)
    encoder.close()
    flows = sum(1 for record in records if type(record).__name__ == "Flow")
    print(f"JSON lines encoding: {best / len(records) * 1e6:.2f} µs a record, "
          f"{best / len(packets) * 1e6:.2f} µs a packet ({flows} Flow records, "
          f"{len(records) - flows} others)")
    gc.unfreeze()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--breakdown", action="store_true",
                    help="CPU per stage on a 150k-packet slice instead of the comparison")
    ap.add_argument("--tools", default="",
                    help="comma-separated subset of the runs (e.g. 'loupe --jobs 1,loupe "
                         "pure,suricata'); 'loupe pure' (--jobs 1 with LOUPE_PURE=1, the "
                         "uncompiled modules) runs only when named here")
    args = ap.parse_args()
    pcap = capture(args.packets)
    if args.breakdown:
        breakdown(pcap)
        return 0
    size = pcap.stat().st_size
    print(f"capture: {pcap} ({size / 2**20:.0f} MiB, {args.packets} packets); "
          f"{os.cpu_count()} CPUs")
    suricata_dir = tempfile.mkdtemp(prefix="bench-suricata-")
    runs = {
        "nfstream": [sys.executable, "-c", _NFSTREAM, str(pcap)],
        "suricata": ["suricata", "-r", str(pcap), "-S", "/dev/null", "--runmode", "single",
                     "-k", "none", "-l", suricata_dir],
        "ndpiReader": ["ndpiReader", "-i", str(pcap), "-q"],
        "loupe --jobs 1": [sys.executable, "-m", "sensor.cli", "replay", str(pcap), "-o",
                           "/dev/null", "--format", "jsonl", "--no-progress",
                           "--jobs", "1"],
        "loupe --jobs 2": [sys.executable, "-m", "sensor.cli", "replay", str(pcap), "-o",
                           "/dev/null", "--format", "jsonl", "--no-progress",
                           "--jobs", "2"],
    }
    # The same --jobs 1 run on the pure-Python modules: what compiling gains, paired.
    runs["loupe pure"] = runs["loupe --jobs 1"]
    envs = {"loupe pure": {"LOUPE_PURE": "1"}}
    if args.tools:
        wanted = [t.strip() for t in args.tools.split(",")]
        unknown = [t for t in wanted if t not in runs]
        if unknown or "loupe --jobs 1" not in wanted:
            raise SystemExit(f"--tools: {', '.join(unknown) or 'loupe --jobs 1 is required'}"
                             f" (runs: {', '.join(runs)})")
        runs = {name: runs[name] for name in wanted}
    else:
        del runs["loupe pure"]
    for name in ("suricata", "ndpiReader"):
        if name in runs and shutil.which(runs[name][0]) is None:
            print(f"{name}: not installed (make bench installs it), left out")
            del runs[name]
    try:
        import nfstream  # noqa: F401, PLC0415
    except ImportError:
        if "nfstream" in runs:
            print("nfstream: not installed (make bench installs it), left out")
            del runs["nfstream"]
    best: dict[str, tuple[float, float, int]] = {}
    packets = args.packets
    for rnd in range(args.rounds):
        for name, argv in runs.items():
            load = os.getloadavg()[0]
            wall, cpu, peak, err = measure(argv, envs.get(name))
            last = err.strip().splitlines()[-1] if err.strip() else ""
            counted = re.search(r"(\d+) packets", last)
            if counted:
                packets = int(counted.group(1))   # what the tool itself counted
            print(f"round {rnd + 1} {name:15s} {wall:6.1f} s {packets / wall:9,.0f} pkt/s"
                  f"  CPU {cpu:6.1f} s {packets / cpu:9,.0f} pkt/CPU-s  peak RSS "
                  f"{peak / 2**20:5.0f} MiB  load {load:.2f}", flush=True)
            if last:
                print(f"    {last[:150]}")
            if name not in best or wall < best[name][0]:
                best[name] = (wall, cpu, peak)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    shutil.rmtree(suricata_dir, ignore_errors=True)
    peers = [name for name in ("suricata", "nfstream", "ndpiReader") if name in best]
    for name in ("loupe --jobs 1", "loupe --jobs 2", "loupe pure"):
        if name not in best:
            continue
        wall, cpu, peak = best[name]
        print(f"{name}: {packets / wall:,.0f} packets/s, {packets / cpu:,.0f} packets per "
              f"CPU second, peak RSS {peak / 2**20:.0f} MiB")
        for peer in peers:
            p_wall, p_cpu, p_peak = best[peer]
            print(f"    against {peer}: {p_wall / wall:.2f}x by wall time, {p_cpu / cpu:.2f}x "
                  f"by CPU time ({packets / p_cpu:,.0f} packets per CPU second, peak RSS "
                  f"{p_peak / 2**20:.0f} MiB)")
    wall, cpu, peak = best["loupe --jobs 1"]
    if "suricata" in best:
        ratio = best["suricata"][1] / cpu
        print(f"target --jobs 1 >= 1.0x Suricata --runmode single by CPU time: {ratio:.2f}x, "
              f"{'met' if ratio >= 1.0 else 'missed'}")
    gain = packets / cpu / BASELINE_PKT_PER_CPU_S
    print(f"target --jobs 1 >= 2.0x the uncompiled replay ({BASELINE_PKT_PER_CPU_S:,} packets "
          f"per CPU second): {gain:.2f}x, {'met' if gain >= 2.0 else 'missed'}; peak RSS "
          f"{'under' if peak < 2**30 else 'OVER'} 1 GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
