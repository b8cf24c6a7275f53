"""MySQL parser cost: µs per transaction, single core, and fuzz executions per second.

Workloads, each fed as the engine would (one receive_data per direction per command, on
connections of 10 commands after a login):
  ok        INSERT answered by OK
  select10  SELECT answered by a 3-column, 10-row result set
  rows1000  SELECT answered by 1,000 rows, every row header walked (nothing skipped)
  error     a bad statement answered by ERR
  execute   COM_STMT_EXECUTE of a prepared statement, 1-row binary result set
Run: python -m tests.benchmarks.bench_mysql [seconds per workload]
Rounds of 0.25 s; the best round is reported, as timeit does (the cores are shared).
The last line runs sensor.l7.mysql.fuzz_one on random scripts (the fuzz command's
per-execution cost: 10^6 executions take 10^6 / that rate seconds).
"""

from __future__ import annotations

import random
import struct
import sys
import time

from sensor.l7.base import NEED_DATA, Direction
from sensor.l7.mysql import MysqlParser, fuzz_one

C = Direction.TO_SERVER
S = Direction.TO_CLIENT


def pkt(payload: bytes, seq: int = 0) -> bytes:
    return struct.pack("<I", len(payload))[:3] + bytes([seq]) + payload


EOF = b"\xfe\x00\x00\x02\x00"
OK = b"\x00\x01\x05\x02\x00\x00\x00"
GREETING = pkt(b"\x0a10.11.19-MariaDB\x00" + struct.pack("<I", 7) + b"12345678\x00"
               + b"\xff\xf7\x21\x02\x00\xff\x81\x15" + b"\x00" * 10 + b"abcdefghijkl\x00"
               + b"mysql_native_password\x00")
LOGIN = pkt(struct.pack("<IIB", 0x000A8A0D, 1 << 24, 33) + b"\x00" * 23 + b"app\x00\x14"
            + b"a" * 20 + b"shop\x00mysql_native_password\x00", 1)


def _result(rows: int, cols: int = 3, binary: bool = False) -> bytes:
    out = pkt(bytes([cols]), 1)
    seq = 2
    for i in range(cols):
        out += pkt(b"\x03def\x04shop\x01t\x01t" + bytes([4 + i]) + b"col" + bytes([48 + i])
                   + b"\x00\x0c\x21\x00\x0b\x00\x00\x00\x03\x00\x00\x00\x00\x00", seq)
        seq += 1
    out += pkt(EOF, seq)
    seq += 1
    row = (b"\x00\x00" + b"\x07" * 8) if binary else b"\x0512345\x05hello\x0aworld-wide"
    for _ in range(rows):
        out += pkt(row, seq & 0xFF)
        seq += 1
    return out + pkt(EOF, seq & 0xFF)


WORK = {
    "ok": (pkt(b"\x03INSERT INTO orders (customer, total) VALUES (42, 19.99)"), pkt(OK, 1)),
    "select10": (pkt(b"\x03SELECT id, name, city FROM customers WHERE region = 'north' LIMIT 10"),
                 _result(10)),
    "rows1000": (pkt(b"\x03SELECT id, name, city FROM customers"), _result(1000)),
    "error": (pkt(b"\x03SELEC broken"),
              pkt(b"\xff\x28\x04#42000You have an error in your SQL syntax", 1)),
    "execute": (pkt(b"\x17\x01\x00\x00\x00\x00\x01\x00\x00\x00\x00\x01\x08\x00"
                    + struct.pack("<q", 7)), _result(1, binary=True)),
}
PREPARE = (pkt(b"\x16SELECT id, name, city FROM customers WHERE id = ?"),
           pkt(b"\x00\x01\x00\x00\x00\x03\x00\x01\x00\x00\x00\x00", 1)
           + pkt(b"\x03def", 2) + pkt(EOF, 3) + b"".join(pkt(b"\x03def", 4 + i) for i in range(3))
           + pkt(EOF, 7))


def run(kind: str, seconds: float) -> float:
    req, resp = WORK[kind]
    done = 0
    ts = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        p = MysqlParser()
        p.receive_data(S, GREETING, ts)
        p.receive_data(C, LOGIN, ts + 1)
        p.receive_data(S, pkt(OK, 2), ts + 2)
        if kind == "execute":
            p.receive_data(C, PREPARE[0], ts + 3)
            p.receive_data(S, PREPARE[1], ts + 4)
        while p.next_event() is not NEED_DATA:
            pass
        for _ in range(10):
            ts += 1000
            p.receive_data(C, req, ts)
            p.receive_data(S, resp, ts + 500)
            while p.next_event() is not NEED_DATA:
                done += 1
    return done / (time.perf_counter() - start)


def fuzz_rate(seconds: float) -> float:
    rnd = random.Random(1)
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        fuzz_one(rnd.randbytes(rnd.randrange(0, 600)))
        n += 1
    return n / (time.perf_counter() - start)


def main(argv: list[str]) -> int:
    seconds = float(argv[0]) if argv else 2.0
    rounds = max(1, int(seconds / 0.25))
    for kind in WORK:
        rates = sorted(run(kind, 0.25) for _ in range(rounds))
        print(f"mysql {kind:9s} best {1e6 / rates[-1]:7.2f} µs  median "
              f"{1e6 / rates[len(rates) // 2]:7.2f} µs per transaction")
    print(f"mysql fuzz_one {fuzz_rate(seconds):,.0f} executions/s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
