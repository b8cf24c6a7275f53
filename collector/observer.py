"""Observer: live subscriptions (Subscribe), SQL over the store (Query), Status.

Fan-out. After a batch commits, the ingest path hands it to the Hub, which offers each
record to every subscriber whose filter passes it, with put_nowait into that subscriber's
bounded queue. A full queue never blocks: the record is dropped *for that subscriber
only* and counted, and the subscriber's stream carries a LostEvent (source
"subscriber_slow", count = records dropped for it) before its next record. So a slow
analyst terminal can neither stall ingest nor other subscribers.

History then live, without a gap or a duplicate. Every committed batch has a sequence
number (batch_seq). A subscription notes the newest committed number when it registers
(start_seq), replays stored rows with batch_seq <= start_seq, and takes from the live
feed only batches with batch_seq > start_seq. A batch committed but not yet published at
registration is therefore read from the store, and skipped when it is published.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import grpc

from collector import fanout, filters, history, schema
from collector.client import QUERY_TIMEOUT_S
from collector.storage.base import Cancel, Storage
from sensor import model
from sensor.errors import ConfigError, QueryError, StorageError
from sensor.export import wire

log = logging.getLogger(__name__)

observer_pb2 = wire.observer_pb2
records_pb2 = wire.records_pb2

# Records queued per subscriber. 4096 is about four sensor batches: it absorbs the burst
# of a few batches committed together while a terminal renders lines, and at ~1 KiB per
# record costs at most ~4 MiB per subscriber. Past it, records are dropped and counted.
SUBSCRIBER_QUEUE = 4096

# Concurrent subscriptions: each holds a queue (above) and a task; 64 analysts on one
# collector is far past the expected use and keeps the worst case near 256 MiB.
MAX_SUBSCRIBERS = 64

# Default and ceiling of Query rows: a result travels in one gRPC message (16 MiB limit)
# and is rendered by a terminal; for bulk data use `loupe export`.
DEFAULT_MAX_ROWS = 1000
MAX_ROWS = 100_000

# QUERY_TIMEOUT_S (collector/client.py): a query longer than this holds a reader thread;
# it is interrupted. A query whose client gives up sooner (its deadline, Ctrl-C) is
# interrupted then. `loupe query --timeout` defaults to this same cap, so by default the
# client never waits on a query the server has already stopped.

# Records converted per trip to a reader thread when reading history (a replay, an
# export): amortises the hop, and ~500 KiB per Export message, far under the 16 MiB limit.
REPLAY_CHUNK = 500

# Reader threads for queries and history replays: the machine has few cores and DuckDB
# parallelises each query itself, so more threads would only queue inside DuckDB.
READER_THREADS = 2


@dataclass(eq=False, slots=True)
class Subscriber:
    match: Callable[[object], bool]
    start_seq: int
    queue: asyncio.Queue
    dropped: int = 0          # records dropped since the last LostEvent sent
    dropped_total: int = 0
    first_drop_ns: int = 0
    # A peer collector's feed (collector/fanout.py): only records ingested here, never
    # ones forwarded from peers, so a mesh of collectors does not loop.
    local_only: bool = False

    def offer(self, rec) -> None:
        try:
            self.queue.put_nowait(rec)
        except asyncio.QueueFull:
            if not self.dropped:
                self.first_drop_ns = time.time_ns()
            self.dropped += 1
            self.dropped_total += 1

    def take_lost(self):
        """A LostEvent record for the drops since the last one, or None."""
        if not self.dropped:
            return None
        lost = records_pb2.Record(lost=records_pb2.LostEvent(
            source=model.LostSource.SUBSCRIBER_SLOW.value, count=self.dropped,
            interval_start_ns=self.first_drop_ns, interval_end_ns=time.time_ns(),
        ))
        self.dropped = 0
        return lost

    async def next(self):
        lost = self.take_lost()
        if lost is not None:
            return lost
        return await self.queue.get()


def _set_sensor(rec, sensor_id: str, force: bool) -> None:
    kind = rec.WhichOneof("kind")
    if kind is None:
        return
    msg = getattr(rec, kind)
    if force or not msg.sensor_id:
        msg.sensor_id = sensor_id


@dataclass
class Hub:
    """The live subscribers of one collector. Used on the event loop only."""

    queue_size: int = SUBSCRIBER_QUEUE
    max_subscribers: int = MAX_SUBSCRIBERS
    last_seq: int = 0
    subscribers: list[Subscriber] = field(default_factory=list)
    dropped_total: int = 0

    def add(self, match, *, local_only: bool = False) -> Subscriber:
        if len(self.subscribers) >= self.max_subscribers:
            raise ConfigError(
                f"too many subscribers ({self.max_subscribers}): close another `loupe tail`"
            )
        sub = Subscriber(match, self.last_seq, asyncio.Queue(maxsize=self.queue_size),
                         local_only=local_only)
        self.subscribers.append(sub)
        return sub

    def remove(self, sub: Subscriber) -> None:
        self.dropped_total += sub.dropped_total
        self.subscribers.remove(sub)

    def publish(self, seq: int, batch, identity: str | None) -> None:
        """Offer a committed batch's records to every subscriber (never blocks)."""
        self.last_seq = max(self.last_seq, seq)
        subs = [s for s in self.subscribers if seq > s.start_seq]
        if not subs:
            return
        sensor_id = identity or batch.sensor_id
        for rec in batch.records:
            # As stored: under mTLS the certificate names the sensor.
            _set_sensor(rec, sensor_id, force=identity is not None)
            for sub in subs:
                if sub.match(rec):
                    sub.offer(rec)

    def publish_forwarded(self, records) -> None:
        """Offer records a peer collector ingested (collector/fanout.py) to the live
        subscribers here, peer feeds excepted. They carry no commit number of ours: every
        current subscriber gets them (live only; history comes from the shared store)."""
        subs = [s for s in self.subscribers if not s.local_only]
        for rec in records:
            for sub in subs:
                if sub.match(rec):
                    sub.offer(rec)

    def counters(self) -> dict[str, int]:
        return {"subscriber_dropped": self.dropped_total + sum(
            s.dropped_total for s in self.subscribers)}


async def _abort_for(context, exc: Exception) -> None:
    if isinstance(exc, (ConfigError, QueryError)):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))


class ObserverService:
    """loupe.v1.Observer."""

    def __init__(self, storage: Storage, hub: Hub, counters: Callable[[], dict], *,
                 version: str, started_ns: int, inventory=None, stats=None,
                 clients=None) -> None:
        self._storage = storage
        self._inventory = inventory  # collector.inventory.store.InventoryStore
        self._stats = stats          # collector.stats.store.StatsStore
        self._clients = clients      # collector.clients.store.ClientStore
        self._hub = hub
        self._counters = counters
        # collector.fanout.PeerFeed when [cluster] peers are set: views merge theirs.
        self.peers = None
        self._version = version
        self._started_ns = started_ns
        self._readers = ThreadPoolExecutor(READER_THREADS, thread_name_prefix="loupe-reader")
        # Queries stopped because their client went away or its deadline passed, and
        # queries stopped at QUERY_TIMEOUT_S (shown by Status). Event loop only.
        self.queries_cancelled = 0
        self.queries_timed_out = 0

    async def _chunks(self, since_ns: int, upto_seq: int, **kw):
        """Stored records as protobuf, in lists of up to REPLAY_CHUNK read on a reader
        thread (storage.records_since's keywords pass through)."""
        loop = asyncio.get_running_loop()
        records = self._storage.records_since(since_ns, upto_seq, **kw)

        def chunk():
            out = []
            for rec in records:
                out.append(wire.to_proto(rec))
                if len(out) >= REPLAY_CHUNK:
                    break
            return out

        try:
            while batch := await loop.run_in_executor(self._readers, chunk):
                yield batch
        finally:
            await loop.run_in_executor(self._readers, records.close)

    async def replay(self, since_ns: int, upto_seq: int):
        """Stored records as protobuf, one at a time: those committed at or before
        upto_seq (a live subscriber's start_seq) and from since_ns on."""
        async for batch in self._chunks(since_ns, upto_seq):
            for rec in batch:
                yield rec

    def stored(self, match, upto_seq: int, *, since_ns: int = 0, until_ns: int = 0,
               first: int = 0, last: int = 0):
        """The stored records a subscription starts with, as Subscribe sends them
        (collector/history.py): those that pass `match`, committed at or before upto_seq
        (the live subscriber's start_seq, so history then live has no gap and no
        duplicate), bounded by since/until and first/last."""
        return history.stored(lambda since: self.replay(since, upto_seq), match,
                              since_ns=since_ns, until_ns=until_ns, first=first, last=last)

    async def Export(self, request, context):
        tables = tuple(dict.fromkeys(request.tables))
        unknown = [t for t in tables if t not in schema.TABLES]
        if unknown:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"no table {', '.join(unknown)}: use {', '.join(schema.TABLES)}")
        # A snapshot of what is committed now; later batches are not waited for. The
        # store's newest commit includes other collectors' on a shared store (ClickHouse).
        loop = asyncio.get_running_loop()
        upto = max(self._hub.last_seq,
                   await loop.run_in_executor(self._readers, self._storage.last_seq))
        async for batch in self._chunks(request.since_ns, upto,
                                        until_ns=request.until_ns, tables=tables):
            yield observer_pb2.ExportChunk(records=batch)

    async def Subscribe(self, request, context):
        try:
            match = filters.compile_lists(request.allow, request.deny)
            sub = self._hub.add(match, local_only=fanout.is_peer_feed(context))
        except ConfigError as exc:
            code = (grpc.StatusCode.RESOURCE_EXHAUSTED if "too many" in str(exc)
                    else grpc.StatusCode.INVALID_ARGUMENT)
            await context.abort(code, str(exc))
        limit = request.number or None
        sent = 0
        try:
            if request.last > history.MAX_LAST or (request.until_ns and request.follow):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"last is at most {history.MAX_LAST} (use loupe export)"
                                    if request.last > history.MAX_LAST
                                    else "until and follow exclude each other")
            stored = self.stored(match, sub.start_seq, since_ns=request.since_ns,
                                 until_ns=request.until_ns, first=request.first,
                                 last=request.last)
            async with contextlib.aclosing(stored):
                async for rec in stored:
                    yield observer_pb2.SubscribeResponse(record=rec)
                    sent += 1
                    if limit and sent >= limit:
                        return
            if not request.follow:
                return
            while True:
                rec = await sub.next()
                yield observer_pb2.SubscribeResponse(record=rec)
                sent += 1
                if limit and sent >= limit:
                    return
        finally:
            self._hub.remove(sub)

    async def Query(self, request, context):
        max_rows = min(request.max_rows or DEFAULT_MAX_ROWS, MAX_ROWS)
        loop = asyncio.get_running_loop()
        remaining = context.time_remaining()
        # Past the client's deadline nobody reads the result: stop there.
        timeout = QUERY_TIMEOUT_S if remaining is None else max(0.0, min(QUERY_TIMEOUT_S, remaining))
        capped = timeout == QUERY_TIMEOUT_S
        cancel = Cancel()
        started = time.monotonic()
        try:
            result = await loop.run_in_executor(
                self._readers, self._storage.query, request.sql, max_rows, timeout, cancel
            )
        except asyncio.CancelledError:
            # The client went away (cancelled, or its deadline passed): the reader thread
            # would otherwise run the query on to the cap.
            cancel()
            self.queries_cancelled += 1
            log.info("query cancelled by its client after %.1f s; stopped",
                     time.monotonic() - started)
            raise
        except (QueryError, StorageError) as exc:
            if "ran longer than" in str(exc):
                if capped:
                    self.queries_timed_out += 1
                else:
                    self.queries_cancelled += 1
                    log.info("query stopped at its client's deadline after %.1f s",
                             time.monotonic() - started)
            await _abort_for(context, exc)
        return observer_pb2.QueryResponse(
            columns=result.columns, column_types=result.column_types,
            rows_json=[json.dumps(list(row), default=str) for row in result.rows],
            truncated=result.truncated,
        )

    async def Status(self, request, context):
        loop = asyncio.get_running_loop()
        counts = await loop.run_in_executor(self._readers, self._storage.counts)
        sensors = await loop.run_in_executor(self._readers, self._storage.sensors)
        counters = dict(self._counters())
        counters.update(self._hub.counters())
        counters.update(queries_cancelled=self.queries_cancelled,
                        queries_timed_out=self.queries_timed_out)
        return observer_pb2.StatusResponse(
            version=self._version, started_ns=self._started_ns,
            storage=self._storage.description, stored=counts, counters=counters,
            sensors=[observer_pb2.SensorStatus(
                sensor_id=s.sensor_id, last_batch_id=s.last_batch_id,
                last_seen_ns=s.last_seen_ns, records=s.records) for s in sensors],
            subscribers=len(self._hub.subscribers),
        )

    async def Endpoints(self, request, context):
        from collector.inventory import store

        if self._inventory is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this collector keeps no inventory")
        loop = asyncio.get_running_loop()
        if self.peers is None or fanout.is_peer_feed(context):
            chosen = await loop.run_in_executor(
                self._readers, lambda: store.select(self._inventory.snapshot(), request))
            return observer_pb2.EndpointsResponse(
                endpoints=[store.to_proto(d, observer_pb2) for d in chosen],
                dropped=self._inventory.dropped)
        # The whole estate (collector/fanout.py, merged views): every peer's whole local
        # inventory merged with ours, then the request's filters, so a filter on merged
        # facts (sensors, first/last seen) sees them all.
        answers, unreachable = await self.peers.ask(
            "Endpoints", observer_pb2.EndpointsRequest())
        chosen = await loop.run_in_executor(
            self._readers, lambda: store.select(store.merged(
                self._inventory.snapshot(),
                [[store.from_proto(e) for e in a.endpoints] for a in answers]), request))
        return observer_pb2.EndpointsResponse(
            endpoints=[store.to_proto(d, observer_pb2) for d in chosen],
            dropped=self._inventory.dropped + sum(a.dropped for a in answers),
            unreachable_peers=unreachable)

    async def Pii(self, request, context):
        from collector.inventory import pii, store

        if self._inventory is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this collector keeps no inventory")
        loop = asyncio.get_running_loop()
        rows = await loop.run_in_executor(
            self._readers, lambda: pii.rows(store.select(self._inventory.snapshot(), request)))
        return observer_pb2.QueryResponse(
            columns=pii.COLUMNS, column_types=pii.COLUMN_TYPES,
            rows_json=[json.dumps([r[c] for c in pii.COLUMNS]) for r in rows])

    async def Clients(self, request, context):
        from collector.clients import store

        if self._clients is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this collector keeps no clients")
        loop = asyncio.get_running_loop()
        peer_call = fanout.is_peer_feed(context)
        # Merged views (collector/fanout.py): each peer's whole local state, every field
        # of its clients (a peer call is answered so), merged here, then filtered.
        others, unreachable = [], []
        if self.peers is not None and not peer_call:
            answers, unreachable = await self.peers.ask(
                "Clients", observer_pb2.ClientsRequest(notices=request.notices))
            others = [[dict(zip(a.columns, json.loads(r))) for r in a.rows_json]
                      for a in answers]
        if request.notices:
            columns, types = store.NOTICE_COLUMNS, store.NOTICE_TYPES
            rows = await loop.run_in_executor(
                self._readers, lambda: store.select_notices(sorted(
                    [*self._clients.notices(), *(n for o in others for n in o)],
                    key=lambda n: n["ts_ns"]), request))
        elif peer_call:
            rows = await loop.run_in_executor(self._readers, self._clients.snapshot)
            columns, types = list(rows[0]) if rows else [], []
        else:
            columns, types = store.COLUMNS, store.COLUMN_TYPES
            rows = await loop.run_in_executor(
                self._readers, lambda: store.select(
                    store.merged(self._clients.snapshot(), others) if others
                    else self._clients.snapshot(), request))
        return observer_pb2.QueryResponse(
            columns=columns, column_types=types,
            rows_json=[json.dumps([r[c] for c in columns]) for r in rows],
            unreachable_peers=unreachable)

    async def Stats(self, request, context):
        from collector.stats import store
        from collector.stats.model import ALPHA, RES_INDEX

        if self._stats is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this collector keeps no statistics")
        kind, resolution = request.kind or "services", request.resolution or "1m"
        if kind not in store.KINDS or resolution not in RES_INDEX:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"kind {kind!r} / resolution {resolution!r}: kinds are "
                                f"{', '.join(store.KINDS)}, resolutions {', '.join(RES_INDEX)}")
        loop = asyncio.get_running_loop()
        rows, start, end = await loop.run_in_executor(
            self._readers, lambda: self._stats.query(kind, resolution, request.last_ns))
        return observer_pb2.StatsResponse(
            stats=[store.to_proto(r, observer_pb2) for r in store.select(rows, request)],
            start_ns=start, end_ns=end, dropped=self._stats.dropped, relative_accuracy=ALPHA)

    def close(self) -> None:
        self._readers.shutdown(wait=True, cancel_futures=True)
