"""The service map covers every L7 kind: the golden capture of each protocol, replayed into
a real collector under a sensor id of its own, gives an edge of that protocol from the
capture's client to its server, and a service with the same counts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

LOUPE = str(Path(sys.executable).with_name("loupe"))
GOLDEN = Path(__file__).resolve().parents[1] / "golden"
# capture -> the protocol its edges carry
CAPTURES = {
    "curl-http.pcap": "http",
    "dig-dnsmasq.pcap": "dns",
    "openssl-tls13.pcap": "tls",
    "quic-parser/session.pcap": "quic",
    "http2-parser/session.pcap.gz": "grpc",
    "kafka-parser/session.pcap.gz": "kafka",
    "mongodb-parser/session.pcap.gz": "mongodb",
    "mysql-parser/session.pcap": "mysql",
    "pgsql-session.pcap.gz": "pgsql",
    "redis-session.pcap.gz": "redis",
}


def loupe(*args) -> str:
    out = subprocess.run([LOUPE, *map(str, args)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (args, out.stderr)
    return out.stdout


def rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def first_ts(capture: Path) -> float:
    import gzip

    import dpkt

    with (gzip.open(capture) if capture.suffix == ".gz" else open(capture, "rb")) as f:
        try:
            reader = dpkt.pcap.Reader(f)
        except ValueError:
            f.seek(0)
            reader = dpkt.pcapng.Reader(f)
        return next(iter(reader))[0]


def groups() -> list[list[str]]:
    """The captures, oldest first, in runs that fit the 1 h resolution's 30 days."""
    out: list[list[str]] = []
    last = None
    for capture in sorted(CAPTURES, key=lambda c: first_ts(GOLDEN / c)):
        ts = first_ts(GOLDEN / capture)
        if last is None or ts - last > 20 * 86400:
            out.append([])
        out[-1].append(capture)
        last = ts
    return out


def test_every_l7_kind_makes_edges(collector):
    from tests.collector.conftest import observer_stub
    from sensor.export import wire

    stub = observer_stub(collector.address)
    # Windows end at the newest cell and the captures span three years, so each run of
    # captures within a month is replayed (one stream) and checked before the next.
    for i, run in enumerate(groups()):
        loupe("replay", *(GOLDEN / c for c in run), "--collector", collector.address,
              "--sensor-id", f"s{i}", "--no-progress")
        edges = rows(loupe("services", "--edges", "--collector", collector.address,
                           "--resolution", "1h", "--format", "json"))
        assert {e["protocol"] for e in edges} == {CAPTURES[c] for c in run} | (
            {"http2"} if "http2-parser/session.pcap.gz" in run else set())
        assert all(e["client"] and e["service"] and e["requests"] > 0 for e in edges), edges
        services = stub.Stats(wire.observer_pb2.StatsRequest(
            kind="services", resolution="1h"), timeout=30).stats
        # A service's requests are the sum of its edges'.
        assert {(s.protocol, s.service): s.requests for s in services} == {
            (e["protocol"], e["service"]): sum(x["requests"] for x in edges
                                               if (x["protocol"], x["service"]) ==
                                               (e["protocol"], e["service"]))
            for e in edges}
    print("\n" + loupe("services", "--edges", "--collector", collector.address,
                       "--resolution", "1h", "--format", "table"))
