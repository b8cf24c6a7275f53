"""Which stored records a subscription replays before (or instead of) the live feed, with
hubble observe's meaning of since/until/first/last:

- since/until: the stored records whose own time (flow end, L7 event time, loss interval
  end) lies in [since, until);
- first N: the oldest N of those that match the filter;
- last N: the newest N that match, whatever their age (a capture replayed from last year
  included), sent oldest first.

Storage reads records oldest first from a lower time bound. For `last`, the bound starts
an hour before `until` (or now) and moves back four times further each round until N
records matched or the bound reached `since` (or the start of the store). Each round
re-reads what the previous one read, so a search reads at most 4/3 of the final window;
the rounds before data begins read empty ranges, which DuckDB skips by its min/max
indexes. Memory is bounded by N (MAX_LAST).
"""

from __future__ import annotations

import collections
import contextlib
import time
from typing import AsyncIterator, Callable

# --last above this would hold that many records in the collector's memory (~1 KiB each);
# bulk history is `loupe export`'s job.
MAX_LAST = 100_000

FIRST_WINDOW_NS = 3600 * 10**9
WIDEN = 4


def record_time(rec) -> int:
    """The time storage orders a loupe.v1.Record by (collector/schema.py time_column)."""
    kind = rec.WhichOneof("kind")
    if kind == "flow":
        return rec.flow.flow_end_ns
    if kind == "l7":
        return rec.l7.ts_ns
    if kind == "lost":
        return rec.lost.interval_end_ns
    return 0


Replay = Callable[[int], AsyncIterator]   # lower time bound -> records, oldest first


async def stored(replay: Replay, match, *, since_ns: int, until_ns: int, first: int,
                 last: int, now_ns: int | None = None) -> AsyncIterator:
    """The stored records a request asks for, oldest first (nothing when it asks for no
    history: neither since, first nor last)."""
    if last:
        for rec in await _newest(replay, match, last, since_ns, until_ns, now_ns):
            yield rec
        return
    if not since_ns and not first:
        return
    sent = 0
    async with contextlib.aclosing(replay(max(since_ns, 1))) as records:
        async for rec in records:
            if until_ns and record_time(rec) >= until_ns:
                return   # records come in time order
            if match(rec):
                yield rec
                sent += 1
                if first and sent >= first:
                    return


async def _newest(replay: Replay, match, n: int, since_ns: int, until_ns: int,
                  now_ns: int | None) -> list:
    end = until_ns or (now_ns or time.time_ns())
    span = FIRST_WINDOW_NS
    while True:
        lower = max(end - span, since_ns, 1)
        window: collections.deque = collections.deque(maxlen=n)
        async with contextlib.aclosing(replay(lower)) as records:
            async for rec in records:
                if until_ns and record_time(rec) >= until_ns:
                    break
                if match(rec):
                    window.append(rec)
        if len(window) >= n or lower <= max(since_ns, 1):
            return list(window)
        span *= WIDEN
