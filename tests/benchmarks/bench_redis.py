"""Redis parser throughput: µs per transaction and transactions per second, single core.

Workloads, each a connection of 10 pipelined commands fed as the engine would (one
receive_data per direction per batch):
  small    SET/GET/INCR of short values, RESP2 replies (+OK, $len, :n)
  resp3    HGETALL with a 10-field map reply, ZSCORE with a double (RESP3)
  skipped  GET of a 1 MiB value whose body the engine skips (skip_hint -> receive_skip)
And the executions per second of the fuzz target (tests/l7/test_redis.py fuzz_one) on
random 256-byte inputs, for sizing a 10**6-execution fuzz run.
Run: python -m tests.benchmarks.bench_redis [seconds per workload]
Each workload runs in rounds of 0.25 s and the best round is reported (shared cores).
"""

from __future__ import annotations

import random
import sys
import time

from sensor.l7.base import NEED_DATA, Direction
from sensor.l7.redis import RedisParser

C = Direction.TO_SERVER
S = Direction.TO_CLIENT


def _cmd(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


SMALL_REQ = b"".join(
    _cmd(b"SET", b"session:%d" % i, b"v" * 32) if i % 3 == 0 else
    _cmd(b"GET", b"session:%d" % i) if i % 3 == 1 else _cmd(b"INCR", b"hits:%d" % i)
    for i in range(10))
SMALL_RESP = b"".join(
    b"+OK\r\n" if i % 3 == 0 else b"$32\r\n" + b"v" * 32 + b"\r\n" if i % 3 == 1 else b":%d\r\n" % i
    for i in range(10))
_MAP = b"%10\r\n" + b"".join(b"$6\r\nfield%d\r\n$8\r\nvalue-%02d\r\n" % (i, i) for i in range(10))
RESP3_REQ = b"".join(_cmd(b"HGETALL", b"h%d" % i) if i % 2 else _cmd(b"ZSCORE", b"z", b"m")
                     for i in range(10))
RESP3_RESP = b"".join(_MAP if i % 2 else b",3.1415\r\n" for i in range(10))
BIG = 1 << 20
BIG_REQ = _cmd(b"GET", b"blob")
BIG_HEAD = b"$%d\r\n" % BIG


def run(kind: str, seconds: float) -> float:
    done = 0
    ts = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        p = RedisParser()
        ts += 1000
        if kind == "small":
            p.receive_data(C, SMALL_REQ, ts)
            p.receive_data(S, SMALL_RESP, ts + 500)
        elif kind == "resp3":
            p.receive_data(C, RESP3_REQ, ts)
            p.receive_data(S, RESP3_RESP, ts + 500)
        else:
            for _ in range(10):
                p.receive_data(C, BIG_REQ, ts)
                p.receive_data(S, BIG_HEAD, ts + 500)
                p.receive_skip(S, p.skip_hint(S), ts + 600)
                p.receive_data(S, b"\r\n", ts + 700)
        while p.next_event() is not NEED_DATA:
            done += 1
    return done / (time.perf_counter() - start)


def fuzz_rate(seconds: float) -> float:
    from tests.l7.test_redis import fuzz_one

    rnd = random.Random(1)
    inputs = [bytes(rnd.getrandbits(8) for _ in range(256)) for _ in range(500)]
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for blob in inputs:
            fuzz_one(blob)
        n += len(inputs)
    return n / (time.perf_counter() - start)


def main(argv: list[str]) -> int:
    seconds = float(argv[0]) if argv else 2.0
    rounds = max(1, int(seconds / 0.25))
    for kind in ("small", "resp3", "skipped"):
        rates = sorted(run(kind, 0.25) for _ in range(rounds))
        best = rates[-1]
        print(f"redis {kind:8s} best {best:10,.0f}  median {rates[len(rates) // 2]:10,.0f}"
              f" transactions/s  ({1e6 / best:.2f} µs/transaction)")
    print(f"redis fuzz_one {fuzz_rate(seconds):10,.0f} executions/s (256-byte random inputs)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
