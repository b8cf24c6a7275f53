"""Cost of the rules engine.

1. µs of CPU per L7 event for Engine.evaluate with the default rules (every managed
   group, the behaviour rules), on the WAF corpus's requests: the benign ones (what
   production traffic mostly is) and all of them (attacks make detectors go further).
   The raw request (head and body) is what the HTTP/1 parser hands over, so this is the
   whole per-event cost of the stage: parsing the request view, decoding, detectors.
2. `loupe replay` packets per CPU second with `--rules default` and without, in the same
   run, on bench_replay's mixed capture (HTTP keep-alive, DNS, TLS, bulk); the ratio
   rules-on / rules-off has a target of >= 0.8.

    python -m tests.benchmarks.bench_rules [--packets 200000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import re
import sys
import time

from sensor.model import HttpEvent, L7Event
from sensor.rules import engine, loader, managed
from tests.benchmarks.bench_replay import capture, measure
from tests.rules.corpus import CORPUS, label, raw_request, samples

TARGET_RATIO = 0.8


def per_event(rounds: int) -> None:
    items = []
    for i, s in enumerate(samples()):
        ev = L7Event(uid=f"C{i}", ts_ns=1_717_200_000_000_000_000 + i * 10**6,
                     src_addr="198.18.20.1", dst_addr="198.18.20.2", src_port=20000 + i,
                     dst_port=80, protocol=6,
                     detail=HttpEvent(method=s["method"], host="localhost",
                                      path=s["uri"], status=200))
        items.append((label(s), ev, raw_request(s)))
    rules = loader.load("default")
    for name, chosen in (("benign requests", [x for x in items if x[0] == "benign"]),
                         ("all corpus requests", items)):
        for cache in ("cold", "warm"):
            best = float("inf")
            for _ in range(rounds):
                if cache == "cold":
                    # Every value judged afresh: the corpus repeats user agents and
                    # such, which the value cache would otherwise answer.
                    managed._judge_cached.cache_clear()
                    managed._scanner_agent.cache_clear()
                e = engine.Engine(rules)
                t0 = time.process_time()
                for _, ev, raw in chosen:
                    e.evaluate(ev, raw)
                best = min(best, time.process_time() - t0)
            print(f"rules engine, default rules, {name}, value cache {cache}: "
                  f"{len(chosen)} events, {best / len(chosen) * 1e6:.1f} µs CPU per event "
                  f"(best of {rounds})")


def replay_ratio(packets: int, rounds: int) -> float:
    pcap = capture(packets)
    base = [sys.executable, "-m", "sensor.cli", "replay", str(pcap), "-o", "/dev/null",
            "--format", "jsonl", "--no-progress", "--jobs", "1"]
    best = {"rules off": 0.0, "rules on": 0.0}
    for rnd in range(rounds):
        for name, argv in (("rules off", base), ("rules on", [*base, "--rules", "default"])):
            wall, cpu, _, err = measure(argv)
            counted = re.search(r"(\d+) packets", err)
            n = int(counted.group(1)) if counted else packets
            alerts = re.search(r"(\d+) alerts", err)
            rate = n / cpu
            best[name] = max(best[name], rate)
            print(f"round {rnd + 1} replay {name}: {n} packets, CPU {cpu:.1f} s, "
                  f"{rate:,.0f} pkt/CPU-s"
                  f"{f', {alerts.group(1)} alerts' if alerts else ''}", flush=True)
    ratio = best["rules on"] / best["rules off"]
    print(f"replay pkt/CPU-s, rules on / off (best of {rounds} each): {ratio:.2f} "
          f"(target >= {TARGET_RATIO})")
    return ratio


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if CORPUS.is_dir():
        per_event(args.rounds)
    else:
        print(f"{CORPUS}: not present, per-event figures left out")
    ratio = replay_ratio(args.packets, args.rounds)
    return 0 if ratio >= TARGET_RATIO else 1


if __name__ == "__main__":
    raise SystemExit(main())
