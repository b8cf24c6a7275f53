"""Replay throughput: `loupe replay` (L7 on) against NFStream on the same capture, in the
same run.

The capture is made by tests/fixtures/gen_mixed.py (HTTP keep-alive, DNS, TLS, bulk TCP
over many flows; at least 1M packets) and cached in tests/benchmarks/out/ (git-ignored).
Each tool runs as its own process from start to exit, so start-up, reading and output
are all inside the figure:

- Loupe: `loupe replay FILE -o /dev/null --format jsonl` (every record is made and
  serialized) as a researcher runs it (--jobs automatic: one metering process per CPU,
  up to 4, for a capture this size), and once more with --jobs 1;
- NFStream: NFStreamer(source=FILE, n_dissections=20, statistical_analysis=False),
  iterating every flow (its default meter processes: cores - 1).

Printed per run: wall seconds, packets/s, peak RSS of the whole process tree (psutil,
sampled every 50 ms: NFStream meters in child processes) and the load average, then the
ratio of each Loupe run to NFStream. The machine is shared; the load average says how
much.

    python -m tests.benchmarks.bench_replay [--packets 1000000] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent / "out"

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


def measure(argv: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes of the process tree, stderr) of one child run."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
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
    err = proc.stderr.read()
    if proc.returncode:
        raise SystemExit(f"{argv[:4]} failed ({proc.returncode}):\n{err}")
    return wall, peak, err


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    pcap = capture(args.packets)
    size = pcap.stat().st_size
    print(f"capture: {pcap} ({size / 2**20:.0f} MiB, {args.packets} packets); "
          f"{os.cpu_count()} CPUs")
    runs = {
        "nfstream": [sys.executable, "-c", _NFSTREAM, str(pcap)],
        "loupe": [sys.executable, "-m", "sensor.cli", "replay", str(pcap), "-o",
                  "/dev/null", "--format", "jsonl", "--no-progress"],
        "loupe --jobs 1": [sys.executable, "-m", "sensor.cli", "replay", str(pcap), "-o",
                           "/dev/null", "--format", "jsonl", "--no-progress",
                           "--jobs", "1"],
    }
    best: dict[str, tuple[float, int]] = {}
    for rnd in range(args.rounds):
        for name, argv in runs.items():
            load = os.getloadavg()[0]
            wall, peak, err = measure(argv)
            rate = args.packets / wall
            last = err.strip().splitlines()[-1] if err.strip() else ""
            print(f"round {rnd + 1} {name:15s} {wall:7.1f} s {rate:10,.0f} packets/s "
                  f"peak RSS {peak / 2**20:6.0f} MiB  load {load:.2f}  | {last[:110]}",
                  flush=True)
            if name not in best or wall < best[name][0]:
                best[name] = (wall, peak)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    nf_rate = args.packets / best["nfstream"][0]
    for name in ("loupe", "loupe --jobs 1"):
        wall, peak = best[name]
        rate = args.packets / wall
        ok = "meets" if rate >= nf_rate and peak < 2**30 else "misses"
        print(f"{name}: {rate:,.0f} packets/s = {rate / nf_rate:.2f}x NFStream "
              f"({nf_rate:,.0f} packets/s); peak RSS {peak / 2**20:.0f} MiB vs NFStream "
              f"{best['nfstream'][1] / 2**20:.0f} MiB; {ok} the target "
              "(>= 1.0x, < 1 GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
