"""Terminal output of the collector's own commands: `collector run --print` lines and the
times `collector status` shows. The line itself is sensor/export/table.py's, the same for
`loupe tail`, `loupe sensor flows` and here.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from sensor import model
from sensor.export import wire
from sensor.export.table import TableWriter, time_ms

# Records a --print consumer writes per terminal write: large enough to amortise the
# write call at ingest rates, small enough that lines appear promptly.
_PRINT_CHUNK = 500


def _time(ns: int) -> str:
    return time_ms(ns)


def line(record: model.Record) -> str:
    """One record as a table line, without colour or width limit (for logs and tests)."""
    return TableWriter(None, color=False, width=None).line(record)


async def print_live(hub, out) -> None:
    """`collector run --print`: every stored record, one line each, until cancelled.

    An ordinary hub subscriber, so a slow terminal loses lines (and says so with a
    LostEvent line) instead of stalling ingest. Writes happen on a thread: a blocked
    terminal must not block the event loop.
    """
    sub = hub.add(lambda rec: True)
    table = TableWriter(out)
    loop = asyncio.get_running_loop()
    writer = ThreadPoolExecutor(1, thread_name_prefix="loupe-print")
    try:
        while True:
            recs = [await sub.next()]
            while len(recs) < _PRINT_CHUNK and not sub.queue.empty():
                recs.append(sub.queue.get_nowait())
            text = "".join(table.line(wire.from_proto(r)) + "\n" for r in recs)
            await loop.run_in_executor(writer, _write, out, text)
    finally:
        hub.remove(sub)
        writer.shutdown(wait=False)


def _write(out, text: str) -> None:
    out.write(text)
    out.flush()
