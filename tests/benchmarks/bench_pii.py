"""Cost of PII counting (sensor/l7/pii.py).

1. µs of CPU per HTTP event for the counting alone (Scanner.request over the raw head
   and body, as the HTTP/1 parser hands them over, then Scanner.response over a 1 KiB
   JSON response sample), on the WAF corpus's benign requests (ordinary API traffic:
   bearer JWTs, login, contact and sign-up forms) and on all of them.
2. `loupe replay` of the corpus's benign capture with `--pii` and without: CPU seconds
   per 1000 HTTP events, so the figure includes the head and body captures.
3. The HTTP/2 parser on tests/pii/planted.py's h2c connection (a JSON POST with a
   leaking JSON response, a unary gRPC call) with PII counting and without: µs of CPU
   per stream; against header fields only, the difference is the body captures and
   their counting.

    python -m tests.benchmarks.bench_pii [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from sensor.l7.pii import Scanner
from tests.benchmarks.bench_replay import measure
from tests.rules.corpus import CORPUS, raw_request, samples

RESPONSE = json.dumps({"id": 42, "name": "Zoë Nowak", "items": [
    {"sku": f"SKU-{i:05d}", "qty": i, "price": 9.99 + i} for i in range(20)]}).encode()[:1024]


def per_event(rounds: int) -> None:
    scanner = Scanner()
    items = []
    for s in samples():
        head, body = raw_request(s)
        ctype = next((v for n, v in s["headers"] if n.lower() == "content-type"), "")
        items.append((s["class"], head, body, ctype))
    for name, chosen in (("benign requests", [x for x in items if x[0] == "benign"]),
                         ("all corpus requests", items)):
        for with_response in (False, True):
            best = float("inf")
            for _ in range(rounds):
                t0 = time.process_time()
                for _, head, body, ctype in chosen:
                    counts = scanner.request(head, body, ctype)
                    if with_response:
                        scanner.response(RESPONSE, "application/json", counts)
                best = min(best, time.process_time() - t0)
            what = "request + 1 KiB JSON response" if with_response else "request"
            print(f"PII counting, {name}, {what}: {len(chosen)} events, "
                  f"{best / len(chosen) * 1e6:.1f} µs CPU per event (best of {rounds})")


def replay_cost(rounds: int) -> None:
    pcap = CORPUS / "benign.pcap"
    base = [sys.executable, "-m", "sensor.cli", "replay", str(pcap), "-o", "/dev/null",
            "--format", "jsonl", "--no-progress", "--jobs", "1"]
    best = {}
    for _ in range(rounds):
        for name, argv in (("pii off", base), ("pii on", [*base, "--pii"])):
            _, cpu, _, _ = measure(argv)
            best[name] = min(best.get(name, float("inf")), cpu)
    events = 605
    for name, cpu in best.items():
        print(f"loupe replay benign.pcap ({events} HTTP events), {name}: "
              f"{cpu / events * 1000:.3f} CPU s per 1000 events (best of {rounds}, "
              f"process start included)")
    print(f"PII counting in replay: +{(best['pii on'] - best['pii off']) / events * 1e6:.0f} "
          f"µs CPU per HTTP event")


def http2_streams(rounds: int) -> None:
    from sensor.l7.base import NEED_DATA, Direction
    from sensor.l7.http2 import Http2Parser
    from tests.pii.planted import h2_exchanges

    client, server, expected = h2_exchanges()
    n = 200
    best = {}
    for _ in range(rounds):
        for name, scanner in (("pii off", None),
                              ("pii on, header fields only",
                               Scanner(body_bytes=0, response_bytes=0)),
                              ("pii on", Scanner())):
            t0 = time.process_time()
            for _ in range(n):
                p = Http2Parser(pii=scanner)
                p.receive_data(Direction.TO_SERVER, client, 1)
                p.receive_data(Direction.TO_CLIENT, server, 2)
                while p.next_event() is not NEED_DATA:
                    pass
            best[name] = min(best.get(name, float("inf")), time.process_time() - t0)
    streams = n * len(expected)
    for name, cpu in best.items():
        print(f"HTTP/2 parser, planted h2c connection, {name}: "
              f"{cpu / streams * 1e6:.1f} µs CPU per stream (best of {rounds})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if not CORPUS.is_dir():
        print(f"{CORPUS}: not present; nothing to measure")
        return 1
    per_event(args.rounds)
    http2_streams(args.rounds)
    replay_cost(args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
