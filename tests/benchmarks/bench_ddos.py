"""Cost of the DDoS detector (sensor/rules/ddos.py).

1. µs of CPU per L7 event for Detector.observe, with the once-a-second evaluation that the
   events' own clock drives included: HTTP events (as the live L7 stage makes them) from
   N sources toward one service, 1000 events a second of event time; N = 10, 1000 and
   20000 (the window's (service, source) table grows with N, and so does the evaluation).
2. µs of CPU per new flow for observe_new_flows (what each kernel flow map read hands
   over), and for the slow-head scan per L7 flow (incomplete_heads over LiveL7's flows).
3. (root, --kernel) The TC program's cost per steady TCP payload packet
   (BPF_PROG_TEST_RUN, best of 5 means of `repeat` runs): with no limit in force, while
   other sources are rate limited (rate_src: one hash lookup), and for a limited source
   whose bucket never empties (the refill arithmetic and the token taken).

    python -m tests.benchmarks.bench_ddos [--events 200000] [--rounds 3] [--kernel]
"""

from __future__ import annotations

import argparse
import time

from sensor.model import HttpEvent, L7Event
from sensor.rules import ddos
from sensor.rules.ddos_live import incomplete_heads
from tests.ddos.traffic import SERVER, T0, Client, live_l7

NS = 10**9


def _events(n: int, sources: int) -> list[L7Event]:
    out = []
    for i in range(n):
        out.append(L7Event(uid=f"C{i % 997}", ts_ns=T0 + i * (NS // 1000),
                           src_addr=f"198.18.{100 + (i % sources) // 250}.{(i % sources) % 250}",
                           dst_addr=SERVER, src_port=30000 + i % 30000, dst_port=80,
                           protocol=6, detail=HttpEvent(method="GET", path="/", status=200)))
    return out


def per_event(n: int, rounds: int) -> None:
    for sources in (10, 1000, 20000):
        events = _events(n, sources)
        best = float("inf")
        for _ in range(rounds):
            det = ddos.Detector(ddos.Settings(), lambda a: None)
            t0 = time.process_time()
            for ev in events:
                det.observe(ev)
            best = min(best, time.process_time() - t0)
        print(f"ddos detector, HTTP events from {sources} sources, 1000 events/s: "
              f"{n} events, {best / n * 1e6:.2f} µs CPU per event (best of {rounds})")


def per_flow(n: int, rounds: int) -> None:
    batches = [[(f"198.18.{100 + j // 250}.{j % 250}", SERVER, 443, j % 2 == 0)
                for j in range(1000)] for _ in range(n // 1000)]
    best = float("inf")
    for _ in range(rounds):
        det = ddos.Detector(ddos.Settings(), lambda a: None)
        t0 = time.process_time()
        for i, batch in enumerate(batches):
            det.observe_new_flows(T0 + i * NS, batch)
        best = min(best, time.process_time() - t0)
    print(f"ddos detector, new flows (1000 a second from 1000 sources): "
          f"{best / n * 1e6:.2f} µs CPU per flow (best of {rounds})")


def per_scan(rounds: int) -> None:
    l7 = live_l7(lambda rec: None)
    clients = [Client(l7, f"198.18.{1 + i // 250}.{i % 250}", 40000 + i) for i in range(2000)]
    for i, c in enumerate(clients):
        if i % 2:
            c.partial_head(T0)
        else:
            c.request(T0)
    states = [lf.state for lf in l7._flows.values()]
    best = float("inf")
    for _ in range(rounds):
        t0 = time.process_time()
        heads = incomplete_heads(states, T0 + 10 * NS)
        best = min(best, time.process_time() - t0)
    assert len(heads) == 1000
    print(f"ddos slow-head scan: {len(states)} L7 flows, {best * 1e3:.2f} ms CPU a scan "
          f"(once a second), {best / len(states) * 1e6:.2f} µs per flow (best of {rounds})")


def kernel(repeat: int = 200_000) -> None:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether
    from scapy.packet import raw

    from sensor.enforce.maps import BlockMaps
    from sensor.enforce.ratelimit import RateLimits
    from sensor.kernel import abi, loader, testrun

    prog = loader.load(loader.LoadOptions(flow_map_size=1024))
    try:
        blocks = BlockMaps(prog.block_cfg_fd, prog.block_flow_fd, prog.block_src_fd)
        limits = RateLimits(blocks, prog.rate_src_fd)
        blocks.clear()
        limits.clear()
        blocks.beat()
        src, dst = "198.18.9.1", "198.18.9.2"
        frame = raw(Ether() / IP(src=src, dst=dst) / TCP(sport=40000, dport=80, flags="PA")
                    / (b"x" * 100))
        testrun.run_skb(prog.prog_fd, raw(Ether() / IP(src=src, dst=dst)
                                          / TCP(sport=40000, dport=80, flags="S")))
        for _ in range(3):
            testrun.run_skb(prog.prog_fd, frame)

        def cost() -> float:
            blocks.beat()
            return min(testrun.run_skb(prog.prog_fd, frame, repeat=repeat).duration_ns
                       for _ in range(5))

        bare = cost()
        limits.limit("198.19.0.1", 10, 10, 600 * NS)
        others = cost()
        limits.limit(src, abi.RATE_MAX, 10_000_000, 600 * NS)
        limited = cost()
        limits.clear()
        blocks.clear()
        print(f"program cost per steady TCP payload packet: {bare:.0f} ns with no limit, "
              f"{others:.0f} ns while other sources are limited, {limited:.0f} ns for a "
              f"limited source (bucket never empty)")
    finally:
        prog.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kernel", action="store_true", help="also the TC program's cost (root)")
    args = ap.parse_args()
    per_event(args.events, args.rounds)
    per_flow(args.events, args.rounds)
    per_scan(args.rounds)
    if args.kernel:
        kernel()


if __name__ == "__main__":
    main()
