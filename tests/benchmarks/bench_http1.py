"""HTTP/1 parser throughput: transactions parsed per second, single core.

Three workloads, each a realistic curl/browser-like exchange fed as the engine would
(one receive_data per direction per exchange, keep-alive connections of 10 exchanges):
  small    GET with a 512-byte Content-Length response
  chunked  GET with a 3-chunk response
  skipped  GET with a 1 MiB body the engine skips (skip_hint -> receive_skip)
Run: python -m tests.benchmarks.bench_http1 [seconds per workload]
Each workload runs in rounds of 0.25 s and the best round is reported, as timeit does:
the cores are shared, and the best round is the one least disturbed by other work.
"""

from __future__ import annotations

import sys
import time

from sensor.l7.base import NEED_DATA, Direction
from sensor.l7.http1 import Http1Parser

C = Direction.TO_SERVER
S = Direction.TO_CLIENT

REQUEST = (b"GET /api/v1/items?page=3&token=abcdef HTTP/1.1\r\nHost: shop.example.com\r\n"
           b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
           b"Accept: application/json\r\nAccept-Language: en-US,en;q=0.5\r\n"
           b"Accept-Encoding: gzip, deflate, br\r\nCookie: session=0123456789abcdef\r\n"
           b"Connection: keep-alive\r\n\r\n")
SMALL = (b"HTTP/1.1 200 OK\r\nDate: Sat, 21 Nov 2026 06:00:00 GMT\r\nServer: nginx/1.24.0\r\n"
         b"Content-Type: application/json; charset=utf-8\r\nContent-Length: 512\r\n"
         b"Cache-Control: no-store\r\nConnection: keep-alive\r\n\r\n" + b"x" * 512)
CHUNKED = (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"100\r\n" + b"a" * 256 + b"\r\n80\r\n" + b"b" * 128 + b"\r\n10\r\n" + b"c" * 16
           + b"\r\n0\r\n\r\n")
BIG_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 1048576\r\n\r\n"


def run(kind: str, seconds: float) -> float:
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    ts = 0
    while time.perf_counter() < deadline:
        p = Http1Parser()
        for _ in range(10):
            ts += 1000
            p.receive_data(C, REQUEST, ts)
            if kind == "small":
                p.receive_data(S, SMALL, ts + 500)
            elif kind == "chunked":
                p.receive_data(S, CHUNKED, ts + 500)
            else:
                p.receive_data(S, BIG_HEAD, ts + 500)
                p.receive_skip(S, p.skip_hint(S), ts + 600)
            while p.next_event() is not NEED_DATA:
                done += 1
    return done / (time.perf_counter() - start)


def main(argv: list[str]) -> int:
    seconds = float(argv[0]) if argv else 2.0
    rounds = max(1, int(seconds / 0.25))
    for kind in ("small", "chunked", "skipped"):
        rates = sorted(run(kind, 0.25) for _ in range(rounds))
        print(f"http1 {kind:8s} best {rates[-1]:10,.0f}  median {rates[len(rates) // 2]:10,.0f}"
              " transactions/s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
