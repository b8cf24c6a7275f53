"""QUIC parser cost: µs per handshake (one QuicEvent), single core.

Workloads, each a whole connection from the golden capture of aioquic's client and server
(tests/golden/quic-parser/session.pcap), its datagrams fed as the engine would until the
parser is DONE:
  v1       QUIC v1: the client's Initial and the server's Initial (ServerHello)
  v2       QUIC v2 (its own salt and labels)
  retry    Initial, Retry, Initial to the new connection ID, the server's Initial
  big      a ClientHello in two Initial datagrams (41 ALPN names)
Most of the cost is the per-connection key derivation (HKDF, two AES key schedules) and
opening two or three packets with AES-128-GCM; the hello parsing and JA3/JA4 are the rest.
Run: python -m tests.benchmarks.bench_quic [seconds per workload]
Each workload runs in rounds of 0.25 s of this process's CPU time (process_time, so other
work on shared cores does not count) and the best round is reported.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from sensor.l7.base import NEED_DATA, ParserState
from sensor.l7.quic import QuicParser
from tests.l7 import pcaputil

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "quic-parser"


def conversations() -> dict[str, list]:
    exp = json.loads((GOLDEN / "session.expect.json").read_text())
    flows = {f.sport: f for f in pcaputil.flows(GOLDEN / "session.pcap") if f.proto == 17}
    out = {}
    for conn in exp["connections"]:
        if conn["case"] in ("v1", "v2", "retry", "big"):
            out[conn["case"]] = [(c.direction, c.data, c.ts_ns)
                                 for c in flows[conn["client_port"]].chunks]
    return out


def run(datagrams: list, seconds: float) -> float:
    done = 0
    start = time.process_time()
    deadline = start + seconds
    while time.process_time() < deadline:
        p = QuicParser()
        for d, blob, ts in datagrams:
            p.receive_datagram(d, blob, ts)
            if p.state is not ParserState.OK:
                break
        ev = p.next_event()
        assert ev is not NEED_DATA and p.state is ParserState.DONE, p.error
        done += 1
    return (time.process_time() - start) / done


def main(argv: list[str]) -> int:
    seconds = float(argv[0]) if argv else 2.0
    rounds = max(1, int(seconds / 0.25))
    for name, datagrams in conversations().items():
        best = min(run(datagrams, 0.25) for _ in range(rounds))
        print(f"quic {name:6s} {best * 1e6:8.1f} us per handshake  "
              f"{1 / best:10.0f} handshakes/s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
