"""MongoDB parser throughput: µs per transaction and transactions per second, single core.

Workloads, each a connection of 10 commands and their replies, fed as the engine would (one
receive_data per message per direction); requests are pymongo's own encoding:
  find       find with a filter, reply with a 3-document firstBatch (OP_MSG)
  insert     insert of 20 documents in a kind 1 sequence, reply {n, ok}
  zstd       find and reply, both OP_COMPRESSED with pymongo's zstd context
  skipped    find whose reply holds a 1 MiB batch the engine skips (skip_hint ->
             receive_skip), `ok` read after it
Run: python -m tests.benchmarks.bench_mongodb [seconds per workload]
Each workload runs in rounds of 0.25 s and the best round is reported (shared cores).
"""

from __future__ import annotations

import sys
import time

import bson

from sensor.l7.base import NEED_DATA, Direction
from sensor.l7.mongodb import MongodbParser
from tests.fixtures import gen_mongodb as G

C = Direction.TO_SERVER
S = Direction.TO_CLIENT


def _pairs(kind: str) -> list[tuple[bytes, list[bytes]]]:
    """(request, [reply pieces]) for 10 commands."""
    from pymongo.compression_support import ZstdContext

    out = []
    for i in range(10):
        if kind == "insert":
            rid, req = G.op_msg({"insert": "events", "documents": [
                {"_id": i * 100 + j, "kind": "login", "user": f"u{j}"} for j in range(20)]}, "db")
            out.append((req, [G.reply_msg(rid, {"n": 20, "ok": 1.0})[1]]))
            continue
        ctx = ZstdContext() if kind == "zstd" else None
        rid, req = G.op_msg({"find": "users", "filter": {"email": f"u{i}@example.com"},
                             "limit": 3}, "shop", ctx=ctx)
        if kind == "skipped":
            batch = [{"_id": 1, "blob": bson.Binary(b"z" * (1 << 20))}]
        else:
            batch = [{"_id": j, "email": f"u{j}@example.com", "n": j} for j in range(3)]
        rep = G.reply_msg(rid, {"cursor": {"firstBatch": batch, "id": bson.Int64(0),
                                           "ns": "shop.users"}, "ok": 1.0}, ctx=ctx)[1]
        out.append((req, [rep[:200], rep] if kind == "skipped" else [rep]))
    return out


def run(pairs, seconds: float) -> float:
    done = 0
    ts = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        p = MongodbParser()
        for req, pieces in pairs:
            ts += 1000
            p.receive_data(C, req, ts)
            head, *whole = pieces
            p.receive_data(S, head, ts + 500)
            if whole:
                # The engine skips what the parser does not need, then delivers the tail.
                n = p.skip_hint(S)
                p.receive_skip(S, n, ts + 600)
                p.receive_data(S, whole[0][len(head) + n:], ts + 700)
        while p.next_event() is not NEED_DATA:
            done += 1
    return done / (time.perf_counter() - start)


def main(argv: list[str]) -> int:
    seconds = float(argv[0]) if argv else 2.0
    rounds = max(1, int(seconds / 0.25))
    for kind in ("find", "insert", "zstd", "skipped"):
        pairs = _pairs(kind)
        rates = sorted(run(pairs, 0.25) for _ in range(rounds))
        best = rates[-1]
        print(f"mongodb {kind:8s} best {best:10,.0f}  median {rates[len(rates) // 2]:10,.0f}"
              f" transactions/s  ({1e6 / best:.2f} µs/transaction)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
