"""PostgreSQL parser throughput: µs per transaction, single core.

Three workloads, each fed as the engine would (one receive_data per direction per
exchange, connections of 10 exchanges after a trust start-up):
  simple    Query -> RowDescription, 10 DataRows, CommandComplete, ReadyForQuery
  extended  Parse/Bind/Describe/Execute/Sync -> the same 10 rows (psycopg's shape)
  skipped   Query -> one 1 MiB DataRow whose body the engine skips (skip_hint)
Run: python -m tests.benchmarks.bench_pgsql [seconds per workload]
Each workload runs in rounds of 0.25 s and the best round is reported, as timeit does.
"""

from __future__ import annotations

import struct
import sys
import time

from sensor.l7.base import NEED_DATA, Direction
from sensor.l7.pgsql import PgsqlParser

C = Direction.TO_SERVER
S = Direction.TO_CLIENT


def _msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack(">I", len(body) + 4) + body


_PARAMS = b"user\0app\0database\0shop\0application_name\0bench\0\0"
STARTUP = struct.pack(">II", len(_PARAMS) + 8, 196608) + _PARAMS
READY = _msg(b"Z", b"I")
LOGIN = (_msg(b"R", b"\0\0\0\0") + _msg(b"S", b"server_version\x0015.18\0") +
         _msg(b"K", b"\0\0\x10\x92\x12\x34\x56\x78") + READY)
SQL = b"SELECT id, name, price FROM items WHERE category = 'books' ORDER BY id LIMIT 10"
ROWS = (_msg(b"T", b"\0\x03" + b"".join(n + b"\0" + b"\0" * 18 for n in (b"id", b"name", b"price")))
        + b"".join(_msg(b"D", b"\0\x03" + struct.pack(">I", 2) + b"%02d" % i + struct.pack(">I", 12)
                        + b"book title %d" % (i % 10) + struct.pack(">I", 5) + b"12.50")
                   for i in range(10)))
SIMPLE_Q = _msg(b"Q", SQL + b"\0")
SIMPLE_R = ROWS + _msg(b"C", b"SELECT 10\0") + READY
EXT_Q = (_msg(b"P", b"\0" + SQL.replace(b"'books'", b"$1") + b"\0\0\0") +
         _msg(b"B", b"\0\0\0\0\0\x01\0\0\0\x05books\0\0") + _msg(b"D", b"P\0") +
         _msg(b"E", b"\0\0\0\0\0") + _msg(b"S", b""))
EXT_R = b"1\0\0\0\x04" b"2\0\0\0\x04" + SIMPLE_R
BIG_HEAD = (_msg(b"T", b"\0\x01blob\0" + b"\0" * 18) + b"D" + struct.pack(">I", 4 + 6 + (1 << 20))
            + b"\0\x01" + struct.pack(">I", 1 << 20))
BIG_TAIL = _msg(b"C", b"SELECT 1\0") + READY


def run(kind: str, seconds: float) -> float:
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    ts = 0
    while time.perf_counter() < deadline:
        p = PgsqlParser()
        p.receive_data(C, STARTUP, ts)
        p.receive_data(S, LOGIN, ts + 100)
        p.next_event()
        for _ in range(10):
            ts += 1000
            if kind == "simple":
                p.receive_data(C, SIMPLE_Q, ts)
                p.receive_data(S, SIMPLE_R, ts + 500)
            elif kind == "extended":
                p.receive_data(C, EXT_Q, ts)
                p.receive_data(S, EXT_R, ts + 500)
            else:
                p.receive_data(C, SIMPLE_Q, ts)
                p.receive_data(S, BIG_HEAD, ts + 500)
                p.receive_skip(S, p.skip_hint(S), ts + 600)
                p.receive_data(S, BIG_TAIL, ts + 700)
            while p.next_event() is not NEED_DATA:
                done += 1
    return done / (time.perf_counter() - start)


def main(argv: list[str]) -> int:
    seconds = float(argv[0]) if argv else 2.0
    rounds = max(1, int(seconds / 0.25))
    for kind in ("simple", "extended", "skipped"):
        rates = sorted(run(kind, 0.25) for _ in range(rounds))
        print(f"pgsql {kind:8s} best {1e6 / rates[-1]:7.2f} µs  median "
              f"{1e6 / rates[len(rates) // 2]:7.2f} µs per transaction")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
