"""HTTP/2 parser throughput: µs per stream and streams per second, single core.

Workloads, each a connection of 10 streams fed as the engine would (one receive_data per
direction per batch), header blocks HPACK-encoded once by the hpack encoder with its
dynamic table carried across the streams, as real peers do:
  h2       GETs with browser-like headers, 200 responses with small bodies
  grpc     unary gRPC calls, 100-byte messages each way, trailers with grpc-status
  skipped  unary gRPC calls of 1 MiB messages whose bodies the engine skips
           (skip_hint -> receive_skip), as live and replay do
And the executions per second of the harness's fuzz driver on random 256-byte scripts.
Run: python -m tests.benchmarks.bench_http2 [seconds per workload]
Each workload runs in rounds of 0.25 s and the best round is reported (shared cores).
"""

from __future__ import annotations

import random
import sys
import time

from hpack import Encoder

from sensor.l7.base import NEED_DATA, Direction
from sensor.l7.http2 import PREFACE, Http2Parser

C = Direction.TO_SERVER
S = Direction.TO_CLIENT
STREAMS = 10
BIG = 1 << 20


def _frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") \
        + payload


def _conn(kind: str) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
    """(client bytes, server bytes) of one connection; for `skipped`, per stream pieces."""
    c, s = Encoder(), Encoder()
    settings = _frame(4, 0, 0, b"\x00\x03\x00\x00\x00\x64")
    req, resp = bytearray(PREFACE + settings), bytearray(settings)
    pieces = []
    for i in range(STREAMS):
        sid = 2 * i + 1
        if kind == "h2":
            req += _frame(1, 5, sid, c.encode([
                (":method", "GET"), (":scheme", "https"), (":authority", "www.example.test"),
                (":path", f"/static/app-{i}.js"), ("user-agent", "Mozilla/5.0 (X11; Linux)"),
                ("accept", "*/*"), ("accept-language", "en-US,en;q=0.9"),
                ("cookie", "session=abcdef0123456789")]))
            resp += _frame(1, 4, sid, s.encode([(":status", "200"),
                                                ("content-type", "application/javascript"),
                                                ("content-length", "512")]))
            resp += _frame(0, 1, sid, b"j" * 512)
            continue
        size = 100 if kind == "grpc" else BIG
        head = _frame(1, 4, sid, c.encode([
            (":method", "POST"), (":scheme", "http"), (":authority", "svc:50051"),
            (":path", "/pkg.Orders/Get"), ("content-type", "application/grpc"),
            ("te", "trailers"), ("user-agent", "grpc-go/1.60")]))
        msg_head = b"\x00" + size.to_bytes(4, "big")
        data_head = _frame(0, 1, sid)[:9]
        data_head = (size + 5).to_bytes(3, "big") + data_head[3:]
        rhead = _frame(1, 4, sid, s.encode([(":status", "200"),
                                            ("content-type", "application/grpc")]))
        rdata = (size + 5).to_bytes(3, "big") + b"\x00\x00" + sid.to_bytes(4, "big")
        trailers = _frame(1, 5, sid, s.encode([("grpc-status", "0"), ("grpc-message", "")]))
        if kind == "grpc":
            req += head + data_head + msg_head + b"q" * size
            resp += rhead + rdata + msg_head + b"r" * size + trailers
        else:
            pieces.append((head + data_head + msg_head, rhead + rdata + msg_head, trailers))
    return bytes(req), bytes(resp), pieces


WORK = {kind: _conn(kind) for kind in ("h2", "grpc", "skipped")}


def run(kind: str, seconds: float) -> float:
    req, resp, pieces = WORK[kind]
    done = 0
    ts = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        p = Http2Parser()
        ts += 1000
        if kind != "skipped":
            p.receive_data(C, req, ts)
            p.receive_data(S, resp, ts + 500)
        else:
            p.receive_data(C, req, ts)
            p.receive_data(S, resp, ts)
            for head, rhead, trailers in pieces:
                p.receive_data(C, head, ts)
                p.receive_skip(C, p.skip_hint(C), ts + 100)
                p.receive_data(S, rhead, ts + 500)
                p.receive_skip(S, p.skip_hint(S), ts + 600)
                p.receive_data(S, trailers, ts + 700)
        while p.next_event() is not NEED_DATA:
            done += 1
    return done / (time.perf_counter() - start)


def fuzz_rate(seconds: float) -> float:
    from tests.l7 import harness

    rnd = random.Random(1)
    inputs = [rnd.randbytes(256) for _ in range(500)]
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for blob in inputs:
            harness.drive(Http2Parser, blob)
        n += len(inputs)
    return n / (time.perf_counter() - start)


def main(argv: list[str]) -> int:
    seconds = float(argv[0]) if argv else 2.0
    rounds = max(1, int(seconds / 0.25))
    for kind in ("h2", "grpc", "skipped"):
        rates = sorted(run(kind, 0.25) for _ in range(rounds))
        best = rates[-1]
        print(f"http2 {kind:8s} best {best:10,.0f}  median {rates[len(rates) // 2]:10,.0f}"
              f" streams/s  ({1e6 / best:.2f} µs/stream)")
    print(f"http2 fuzz driver {fuzz_rate(seconds):10,.0f} executions/s (256-byte random scripts)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
