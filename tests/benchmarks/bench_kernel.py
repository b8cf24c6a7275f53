"""Flow meter overhead: iperf3 across a veth pair with the program attached and
without, alternating rounds in one run (so drift in the machine's load hits both
alike). Prints the TCP throughput ratio and the 64-byte UDP packet-rate ratio
(attached / bare; target >= 0.95) and the kernel's drop counters, which must stay 0.

    sudo .venv/bin/python -m tests.benchmarks.bench_kernel [--rounds 3] [--seconds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from sensor.kernel import abi, attach, loader
from sensor.kernel.counters import possible_cpus, read_counters
from tests.kernel.conftest import in_netns
from tests.netns import VethPair

DROP_COUNTERS = (abi.Counter.FLOW_MAP_FULL, abi.Counter.RINGBUF_FULL,
                 abi.Counter.TRUNCATED, abi.Counter.BAD_HEADER,
                 abi.Counter.UNSUPPORTED_ENCAP, abi.Counter.FRAG_NO_FIRST,
                 abi.Counter.IPV6_EXT_TOO_LONG, abi.Counter.RECYCLED_ENTRY)


def _iperf(pair: VethPair, seconds: float, *args: str) -> dict:
    srv = pair.b.popen("iperf3", "-s", "-1", stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    time.sleep(0.3)  # let the server listen before the first try
    try:
        for _ in range(50):
            r = pair.a.run("iperf3", "-c", pair.b.ip4, "-J", "-t", str(int(seconds)), *args,
                           check=False, timeout=seconds + 30)
            if r.returncode == 0:
                return json.loads(r.stdout)
            time.sleep(0.1)  # the server is not listening yet
        srv.kill()
        raise RuntimeError(f"iperf3 failed: {r.stdout[-500:]} {r.stderr[-500:]}")
    finally:
        try:
            srv.wait(timeout=5)
        except subprocess.TimeoutExpired:
            srv.kill()  # a one-off server that missed its client's last message
            srv.wait()


def tcp_bps(pair, seconds) -> float:
    return _iperf(pair, seconds)["end"]["sum_received"]["bits_per_second"]


def udp_pps(pair, seconds) -> float:
    s = _iperf(pair, seconds, "-u", "-l", "64", "-b", "0")["end"]["sum"]
    return (s["packets"] - s["lost_packets"]) / s["seconds"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args(argv)
    prog = loader.load()
    results: dict[str, dict[bool, list[float]]] = {"tcp": {True: [], False: []},
                                                    "udp": {True: [], False: []}}
    with VethPair.create("kb") as pair:
        pair.wait_ready()
        for rnd in range(args.rounds):
            for attached in (rnd % 2 == 0, rnd % 2 != 0):
                att = None
                if attached:
                    with in_netns(pair.b.netns):
                        att = attach.attach(pair.b.iface, prog.prog_fd)
                try:
                    results["tcp"][attached].append(tcp_bps(pair, args.seconds))
                    results["udp"][attached].append(udp_pps(pair, args.seconds))
                finally:
                    if att is not None:
                        with in_netns(pair.b.netns):
                            attach.detach(att)
                print(f"round {rnd + 1} {'attached' if attached else 'bare    '}: "
                      f"tcp {results['tcp'][attached][-1] / 1e9:.2f} Gbit/s, "
                      f"udp64 {results['udp'][attached][-1] / 1e3:.0f} kpps", flush=True)
    counters = read_counters(prog.counters_fd, possible_cpus())
    prog.close()
    tcp = statistics.median(results["tcp"][True]) / statistics.median(results["tcp"][False])
    udp = statistics.median(results["udp"][True]) / statistics.median(results["udp"][False])
    drops = {c.name.lower(): counters[c] for c in DROP_COUNTERS if counters[c]}
    print(f"tcp throughput ratio (attached/bare, medians): {tcp:.3f}")
    print(f"udp 64-byte packet-rate ratio (attached/bare, medians): {udp:.3f}")
    print(f"packets metered: {counters[abi.Counter.PACKETS]}; kernel drop counters: "
          f"{drops or 'none raised'}")
    return 0 if not drops else 1


if __name__ == "__main__":
    sys.exit(main())
