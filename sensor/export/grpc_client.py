"""The sensor's gRPC exporter: records -> batches -> spool -> Ingest.Push -> acks.

Strategy. Two threads behind a non-blocking queue, so the pipeline never waits on the
network or the disk:

- the batcher takes records from the ExportQueue, cuts a batch at batch_records or
  batch_delay_s after its first record, adds LostEvents for any export-queue or spool
  loss since the last batch, gives it a fresh batch id, and writes it to the spool
  (sensor/export/spool.py) before anything is sent;
- the sender keeps one bidirectional Ingest.Push stream open and feeds it from the spool,
  in batch id order, never more than window_batches un-acked at a time. Acks arrive in
  order; STORED and DUPLICATE mean delivered and the batch leaves the spool; REJECTED is
  logged with the collector's reason, counted, and the batch leaves the spool too (the
  collector will never store it, resending would only repeat the refusal).

When the stream breaks (collector killed, network gone, ack_timeout_s without an ack for
the oldest batch in flight) the sender reconnects with a fresh channel after a jittered
exponential backoff: initial_backoff_s, times 2 per failed attempt, capped at
max_backoff_s, each delay multiplied by a random factor in [1 - jitter, 1 + jitter] so a
fleet of sensors does not reconnect in step; it resets after an ack. The new stream starts
again from the oldest un-acked batch in the spool: the collector deduplicates on
(sensor_id, batch_id), so a batch that was stored but whose ack was lost comes back as
DUPLICATE, and nothing is stored twice.

A fresh channel per attempt (rather than grpc's own reconnect) keeps the retry timing
ours: grpc's internal channel backoff grows to two minutes.

Several collectors (target "a:7400,b:7400"; collectors in front of one shared ClickHouse,
docs/scaling.md). Each collector has its own sender thread, stream, window and backoff;
the spool, the batch ids and the acks stay one. A batch is claimed by one stream when it
is sent. Spreading is least-outstanding: of the streams asking for a batch at that moment,
the one with the fewest un-acked batches takes it, ties going to the one served least
recently (so equal collectors alternate, round robin). Least-outstanding rather than plain
round robin because a collector whose store commits slowly keeps its window full and is
given less, and one that is down or in backoff has no stream and is given nothing, without
a separate health check. When a stream breaks, its in-flight batches are released and go
first to whichever stream asks next (another collector's, or its own after reconnecting):
at least once, and the shared store's dedup on (sensor_id, batch_id) makes a batch the
dead collector stored but never acked come back DUPLICATE, so it is stored once. A dead
collector is retried with the same jittered backoff and takes its share again as soon as
its stream is up. Order across collectors is not kept (it never mattered: the collector
deduplicates by pair, not by the highest id seen).

Columnar batches (sensor/export/columnar.py, docs/scaling.md). Before each Push stream
the sender asks the collector's Ingest.Options; one from before columnar batches answers
UNIMPLEMENTED. The batcher spools columns once every collector that answered lists them,
and rows otherwise (no answer yet, or a mixed fleet mid-upgrade). A spooled columnar batch
bound for a stream whose collector takes rows only is turned back into rows as it is sent
(an old collector would find no records in it and store an empty batch).

A stream with nothing in flight and nothing to send for idle_close_s is half-closed; the
collector acks what it has and ends it, and the channel is closed with it. The sender
then waits for the next spooled batch and opens a new channel and stream for it (not a
reconnect: no backoff, not counted). An open channel keeps grpc's threads waking about
25 times a second with no traffic at all (docs/sensor.md, "Idle cost"); a new one costs
one handshake.

Shutdown (close): the queue is closed and drained into the spool, then the sender tries
for at most timeout_s to get every spooled batch acked; what is left stays in the spool
for the next start.
"""

from __future__ import annotations

import heapq
import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import grpc

from sensor import model
from sensor.errors import ConfigError
from sensor.export import wire
from sensor.export.exporter import ExportQueue
from sensor.export.spool import FsyncPolicy, Spool

__all__ = ["TlsFiles", "GrpcExportConfig", "GrpcExporter", "backoff_delay"]

log = logging.getLogger(__name__)


def _columnar():
    """sensor/export/columnar.py, imported at its first use: it brings pyarrow (tens of MiB
    resident), which a sensor that has sent nothing yet, or exports with columnar batches
    off, never needs (docs/sensor.md, "Idle cost")."""
    from sensor.export import columnar  # noqa: PLC0415 - deferred on purpose

    return columnar


_ACK = wire.ingest_pb2.AckStatus
_UNDERSTOOD = (_ACK.ACK_STATUS_STORED, _ACK.ACK_STATUS_DUPLICATE, _ACK.ACK_STATUS_REJECTED)
# Latency samples kept for metrics and the benchmark: enough for a stable p99, bounded.
_LATENCY_SAMPLES = 100_000
# Batches whose per-record enqueue times are remembered for latency; older ones (spooled
# while the collector was down) simply give no sample.
_TIMED_BATCHES = 4096
# Collectors one sensor spreads over: each costs a thread, a channel and a window of
# in-flight batches; a handful in front of a shared store is the use.
MAX_COLLECTORS = 16


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsFiles:
    """mTLS material as written by `loupe certs init`: the CA that signed the collector's
    certificate, and this sensor's client certificate and key."""

    ca_cert: Path
    client_cert: Path
    client_key: Path
    server_name: str = ""  # override the name checked in the collector's certificate

    def credentials(self) -> grpc.ChannelCredentials:
        def read(what: str, path: Path) -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise ConfigError(
                    f"cannot read the {what} {path}: {exc.strerror or exc}; "
                    "create the certificates with `loupe certs init`"
                ) from None

        return grpc.ssl_channel_credentials(
            root_certificates=read("CA certificate", self.ca_cert),
            private_key=read("client key", self.client_key),
            certificate_chain=read("client certificate", self.client_cert),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class GrpcExportConfig:
    # host:port of the collector, or several comma-separated (spread and failover, see the
    # module docstring)
    target: str
    sensor_id: str
    spool_dir: Path
    tls: TlsFiles | None = None
    # About a second of a busy sensor's records; beyond that the batcher is stuck on the
    # disk and memory must not grow with it.
    queue_records: int = 65536
    batch_records: int = 1000         # ~100-300 KiB per batch, well under grpc's 4 MiB
    batch_delay_s: float = 0.2        # a record waits at most this long for its batch
    # Un-acked batches on the wire: enough to keep a LAN link busy while the collector
    # commits, small enough that a reconnect resends little.
    window_batches: int = 16
    ack_timeout_s: float = 30.0       # oldest in-flight batch without an ack -> reconnect
    idle_close_s: float = 10.0        # nothing to send or ack this long -> close the stream
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 10.0
    backoff_jitter: float = 0.2
    spool_max_bytes: int = 256 << 20
    spool_segment_bytes: int = 8 << 20
    spool_fsync: FsyncPolicy = FsyncPolicy.INTERVAL
    spool_fsync_interval_s: float = 0.2
    # Columnar batches (Arrow IPC per table, sensor/export/columnar.py) once every
    # collector that answered lists them in Ingest.Options; False: rows only.
    columnar: bool = True

    def __post_init__(self) -> None:
        targets = self.targets
        if not targets or any(not t or ":" not in t for t in targets):
            raise ConfigError(f"collector address {self.target!r} must be host:port, or "
                              "several host:port separated by commas")
        if len(set(targets)) != len(targets):
            raise ConfigError(f"collector address {self.target!r} names a collector twice")
        if len(targets) > MAX_COLLECTORS:
            raise ConfigError(f"at most {MAX_COLLECTORS} collectors, not {len(targets)}")
        if not self.sensor_id:
            raise ConfigError("sensor_id must not be empty")
        for name in ("queue_records", "batch_records", "window_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if not 0 <= self.backoff_jitter < 1:
            raise ConfigError("backoff_jitter must be in [0, 1)")
        if self.idle_close_s <= 0:
            raise ConfigError("idle_close_s must be positive")

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.target.split(","))


# The spool holds each RecordBatch already serialized. The generated stub
# (loupe.v1.ingest_pb2_grpc.IngestStub) would serialize request messages again, so the
# Push method is bound here with the same method path and ack decoder as the stub's but
# an identity request serializer: spooled bytes go on the wire as they are, without a
# parse and a re-serialization per batch.
_PUSH_METHOD = "/{}/{}".format(
    wire.ingest_pb2.DESCRIPTOR.services_by_name["Ingest"].full_name, "Push")


def _push(channel: grpc.Channel):
    return channel.stream_stream(
        _PUSH_METHOD,
        request_serializer=bytes,
        response_deserializer=wire.ingest_pb2.BatchAck.FromString,
    )


def _options(channel: grpc.Channel):
    return channel.unary_unary(
        _PUSH_METHOD.rpartition("/")[0] + "/Options",
        request_serializer=wire.ingest_pb2.IngestOptionsRequest.SerializeToString,
        response_deserializer=wire.ingest_pb2.IngestOptions.FromString,
    )


def backoff_delay(cfg: GrpcExportConfig, attempt: int, rng: random.Random) -> float:
    """Seconds to wait before reconnect attempt `attempt` (0 after a stream that got
    acks): exponential from initial_backoff_s, capped at max_backoff_s, jittered."""
    # min() before the power would overflow a float after ~1000 attempts of a long outage.
    base = min(cfg.max_backoff_s, cfg.initial_backoff_s * 2 ** min(attempt, 64))
    return base * (1 + rng.uniform(-cfg.backoff_jitter, cfg.backoff_jitter))


class _Stream:
    """One Push stream's send side: what was sent and not acked yet."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.inflight: deque[tuple[int, int, float]] = deque()  # (batch id, records, sent)
        # Acked with a status we do not understand: kept claimed, resent once this stream
        # has ended (as a reconnect did with one collector).
        self.held: list[int] = []
        self.stopped = False
        self.idle_closed = False              # ended for want of work (idle_close_s)
        self.asking = False                   # its request iterator waits for a batch
        self.served = 0                       # the pick that last gave it a batch
        self.last_active = time.monotonic()   # last send or ack
        self.call = None
        self.columnar = False                 # its collector takes columnar batches


class GrpcExporter:
    """Exporter (sensor/export/exporter.py) to a Loupe collector. start() before use."""

    def __init__(
        self,
        config: GrpcExportConfig,
        *,
        clock_ns: Callable[[], int] = time.time_ns,
        rng: random.Random | None = None,
    ) -> None:
        self._cfg = config
        self._clock_ns = clock_ns
        self._rng = rng or random.Random()
        self._creds = config.tls.credentials() if config.tls else None
        self._spool = Spool(
            config.spool_dir, max_bytes=config.spool_max_bytes,
            segment_bytes=config.spool_segment_bytes, fsync=config.spool_fsync,
            fsync_interval_s=config.spool_fsync_interval_s, clock_ns=clock_ns,
        )
        self._queue = ExportQueue(config.queue_records, batch_records=config.batch_records,
                                  clock_ns=clock_ns)
        self._cond = threading.Condition(threading.Lock())
        self._targets = config.targets
        self._streams: dict[str, _Stream] = {}   # open streams by collector
        # Shared by the streams, under _cond: batch ids in flight on some stream; ids
        # released by a broken stream, sent again first; the highest id taken from the
        # spool in order; the pick counter (round robin among equals).
        self._claimed: set[int] = set()
        self._retry: list[int] = []
        self._cursor = 0
        self._picks = 0
        self._released_at: dict[int, float] = {}   # released batch id -> when (monotonic)
        # Collector -> whether its last Ingest.Options listed columnar batches.
        self._accepts: dict[str, bool] = {}
        self._stop = threading.Event()        # sender: stop now
        self._drain_deadline: float | None = None
        self._enqueued: dict[int, list[int]] = {}  # batch id -> enqueue times (ns)
        self._latencies: deque[int] = deque(maxlen=_LATENCY_SAMPLES)
        # Why the last stream ended ("" before any failure), for one-shot callers such
        # as replay to name the cause in their closing line.
        self.last_error = ""
        self._c = dict.fromkeys((
            "batches_spooled", "batches_sent", "batches_acked", "batches_duplicate",
            "batches_rejected", "records_rejected", "records_acked", "acks_unexpected",
            "reconnects", "stream_errors", "ack_timeouts", "lost_events_sent", "idle_closes",
            "batches_released", "batches_resent", "failover_ms_max",
            "batches_columnar", "batches_transcoded",
        ), 0)
        self._batcher = threading.Thread(target=self._run_batcher, name="loupe-batcher",
                                         daemon=True)
        self._senders = [
            threading.Thread(target=self._run_sender, args=(t,), daemon=True,
                             name="loupe-sender" + (f"-{i}" if i else ""))
            for i, t in enumerate(self._targets)]

    # ---- the Exporter seam -----------------------------------------------------------

    def start(self) -> "GrpcExporter":
        self._batcher.start()
        for sender in self._senders:
            sender.start()
        return self

    def submit(self, record: model.Record) -> bool:
        return self._queue.put(record)

    def close(self, timeout_s: float = 5.0) -> None:
        """Drain the queue into the spool, try to deliver for up to timeout_s, leave the
        rest spooled. Safe to call twice."""
        if self._batcher.ident is None:
            self.start()  # never started: the queued records must still reach the spool
        self._queue.close()
        if self._batcher.is_alive():
            self._batcher.join()
        with self._cond:
            self._drain_deadline = time.monotonic() + timeout_s
            self._cond.notify_all()
        end = time.monotonic() + timeout_s + 2.0
        for sender in self._senders:
            if sender.is_alive():
                sender.join(max(0.0, end - time.monotonic()))
        self._stop.set()
        with self._cond:
            for stream in self._streams.values():
                if stream.call is not None:
                    stream.call.cancel()  # a collector that stopped answering
            self._cond.notify_all()
        for sender in self._senders:
            sender.join(5.0)
        self._spool.close()

    def counters(self) -> dict[str, int]:
        out = self._queue.counters()
        out.update(self._c)
        with self._cond:
            out["collectors"] = len(self._targets)
            out["collectors_connected"] = len(self._streams)
        out.update(self._spool.counters())
        return out

    def latencies_ns(self) -> list[int]:
        """Record enqueued -> batch acked, in ns, for recent records (bounded sample)."""
        return list(self._latencies)

    # ---- batcher ---------------------------------------------------------------------

    def _run_batcher(self) -> None:
        cfg = self._cfg
        while True:
            # With no spool work pending, wait for a record without waking (idle cost).
            idle_s = cfg.batch_delay_s if self._spool.work_pending() else None
            items = self._queue.get_batch(cfg.batch_delay_s, idle_s=idle_s)
            losses = []
            queue_lost = self._queue.take_lost(cfg.sensor_id)
            if queue_lost is not None:
                losses.append(queue_lost)
            losses += [replace(e, sensor_id=cfg.sensor_id) for e in self._spool.take_losses()]
            if items or losses:
                self._spool_batch(items, losses)
            else:
                self._spool.sync_due()
                if self._queue.closed and not len(self._queue):
                    return

    def _spool_batch(self, items, losses: list[model.LostEvent]) -> None:
        records = [r for _, r in items] + losses
        carried = sum(e.count for e in losses if e.source == model.LostSource.SPOOL_FULL.value)
        batch_id = self._spool.next_batch_id()
        payload = None
        if self._columnar_now():
            try:
                payload = _columnar().encode(
                    records, sensor_id=self._cfg.sensor_id, batch_id=batch_id,
                    created_ns=self._clock_ns()).SerializeToString()
                self._c["batches_columnar"] += 1
            except Exception as exc:  # noqa: BLE001 - the batcher thread must go on
                # A value the model let through and its column cannot hold: a bug, but
                # the row encoding carries it, and the collector's checks decide.
                log.error("cannot encode batch %d as columns (%s: %s); sending rows",
                          batch_id, type(exc).__name__, exc)
        if payload is None:
            payload = wire.batch_to_proto(
                records, sensor_id=self._cfg.sensor_id, batch_id=batch_id,
                created_ns=self._clock_ns(),
            ).SerializeToString()
        if items:
            with self._cond:
                self._enqueued[batch_id] = [t for t, _ in items]
                while len(self._enqueued) > _TIMED_BATCHES:
                    del self._enqueued[next(iter(self._enqueued))]
        self._spool.append(batch_id, payload, records=len(records), carried_loss=carried)
        self._c["batches_spooled"] += 1
        self._c["lost_events_sent"] += len(losses)
        self._wake()

    def _columnar_now(self) -> bool:
        """Spool the next batch as columns? Only when every collector that answered
        Ingest.Options takes them: a mixed fleet (a rolling upgrade) gets rows, which all
        collectors store, rather than transcoding on every send to the old ones."""
        with self._cond:
            return self._cfg.columnar and bool(self._accepts) and all(self._accepts.values())

    def _options(self, channel: grpc.Channel, target: str) -> bool:
        """Ask a collector, before a Push stream, whether it takes columnar batches.
        UNIMPLEMENTED: a collector from before them. Other errors end the attempt as a
        failed Push would."""
        if not self._cfg.columnar:
            return False
        try:
            reply = _options(channel)(wire.ingest_pb2.IngestOptionsRequest(),
                                      timeout=self._cfg.ack_timeout_s)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            accepts = False
        else:
            accepts = wire.ingest_pb2.BATCH_ENCODING_ARROW in reply.encodings
        with self._cond:
            self._accepts[target] = accepts
        return accepts

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ---- sender ----------------------------------------------------------------------

    def _draining_done(self) -> bool:
        """Under close(): everything delivered, or out of time."""
        if self._drain_deadline is None:
            return False
        return self._spool.unacked_count() == 0 or time.monotonic() >= self._drain_deadline

    def _run_sender(self, target: str) -> None:
        attempt = 0
        first = True
        while not self._stop.is_set() and not self._draining_done():
            if not first:
                self._c["reconnects"] += 1
            first = False
            acked, idle = self._run_stream(target)
            if self._stop.is_set() or self._draining_done():
                return
            if idle:
                self._c["idle_closes"] += 1
                self._wait_for_work()
                first, attempt = True, 0
                continue
            attempt = 0 if acked else attempt + 1
            delay = backoff_delay(self._cfg, attempt, self._rng)
            with self._cond:
                end = time.monotonic() + delay
                while not self._stop.is_set() and time.monotonic() < end:
                    if self._drain_deadline is not None:
                        end = min(end, self._drain_deadline)
                    self._cond.wait(max(0.0, end - time.monotonic()))

    def _wait_for_work(self) -> None:
        """After an idle close: until a batch no other stream has is spooled, or close()
        or stop."""
        with self._cond:
            while (not self._stop.is_set() and self._drain_deadline is None
                   and self._spool.unacked_count() <= len(self._claimed)):
                self._cond.wait()

    def _channel(self, target: str) -> grpc.Channel:
        options = [
            # Our own backoff decides when to retry; keep grpc's from adding to it.
            ("grpc.initial_reconnect_backoff_ms", int(self._cfg.initial_backoff_s * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(self._cfg.max_backoff_s * 1000)),
        ]
        if self._creds is not None:
            if self._cfg.tls.server_name:
                options.append(("grpc.ssl_target_name_override", self._cfg.tls.server_name))
            return grpc.secure_channel(target, self._creds, options=options)
        return grpc.insecure_channel(target, options=options)

    def _run_stream(self, target: str) -> tuple[bool, bool]:
        """One Push stream until it breaks, idles (idle_close_s) or we stop: whether any
        ack arrived, and whether it ended idle."""
        stream = _Stream(target)
        acked = False
        channel = self._channel(target)
        with self._cond:
            self._streams[target] = stream   # before grpc first pulls its requests
            self._cond.notify_all()
        try:
            stream.columnar = self._options(channel, target)
            call = _push(channel)(self._requests(stream))
            stream.call = call
            for ack in call:
                acked = True
                self._on_ack(stream, ack)
                if self._draining_done():
                    break
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if not stream.stopped:
                self._c["stream_errors"] += 1
                detail = exc.details() if hasattr(exc, "details") else str(exc)
                if not self._stop.is_set():   # not our own cancel at close
                    where = f"{target}: " if len(self._targets) > 1 else ""
                    self.last_error = f"{where}{getattr(code, 'name', code)}: {detail}"
                log.warning("collector %s: stream ended (%s: %s); %d batches un-acked",
                            target, getattr(code, "name", code), detail,
                            self._spool.unacked_count())
        finally:
            with self._cond:
                stream.stopped = True
                stream.asking = False
                if self._streams.get(target) is stream:
                    del self._streams[target]
                self._release(stream)
                self._cond.notify_all()
            if stream.call is not None:
                stream.call.cancel()
            channel.close()
        return acked, stream.idle_closed

    def _release(self, stream: _Stream) -> None:
        """A stream ended (under _cond): what it had in flight or held goes to the next
        stream that asks, this collector's after a reconnect or another's."""
        ids = [b for b, _, _ in stream.inflight] + stream.held
        stream.inflight.clear()
        stream.held = []
        now = time.monotonic()
        for batch_id in ids:
            self._claimed.discard(batch_id)
            heapq.heappush(self._retry, batch_id)
            self._released_at[batch_id] = now
        while len(self._released_at) > _TIMED_BATCHES:  # ones dropped from a full spool
            del self._released_at[next(iter(self._released_at))]
        self._c["batches_released"] += len(ids)

    def _my_turn(self, stream: _Stream) -> bool:
        """Least-outstanding (under _cond): of the streams asking now with room in their
        window, the one with the fewest un-acked batches, then the one served longest ago."""
        window = self._cfg.window_batches
        best = min((s for s in self._streams.values()
                    if s.asking and not s.stopped and len(s.inflight) < window),
                   key=lambda s: (len(s.inflight), s.served), default=None)
        return best is None or best is stream

    def _take(self):
        """The next batch to send (under _cond): released ones first, then the spool in
        batch id order."""
        while self._retry:
            batch_id = heapq.heappop(self._retry)
            if batch_id in self._claimed:
                continue
            batch = self._spool.read(batch_id)
            if batch is not None:
                self._c["batches_resent"] += 1
                return batch
            self._released_at.pop(batch_id, None)   # acked meanwhile, or dropped
        batch = self._spool.next_unacked(self._cursor)
        while batch is not None and batch.batch_id in self._claimed:
            batch = self._spool.next_unacked(batch.batch_id)
        if batch is not None:
            self._cursor = batch.batch_id
        return batch

    def _requests(self, stream: _Stream):
        """The request iterator grpc pulls from (on its own thread): spooled batches, at
        most window_batches un-acked, when this stream's turn comes (_my_turn)."""
        try:
            yield from self._request_loop(stream)
        finally:
            with self._cond:
                stream.asking = False
                self._cond.notify_all()

    def _request_loop(self, stream: _Stream):
        while True:
            with self._cond:
                while True:
                    if stream.stopped or self._stop.is_set():
                        return
                    if self._drain_deadline is not None and not stream.inflight and (
                        self._draining_done()
                    ):
                        return  # half-close: the collector then ends the stream
                    nxt = None
                    stream.asking = len(stream.inflight) < self._cfg.window_batches
                    if stream.asking and self._my_turn(stream):
                        nxt = self._take()
                    if nxt is not None:
                        break
                    if stream.inflight and (
                        time.monotonic() - stream.inflight[0][2] > self._cfg.ack_timeout_s
                    ):
                        self._c["ack_timeouts"] += 1
                        log.warning("collector %s: no ack for batch %d in %.0f s; reconnecting",
                                    stream.target, stream.inflight[0][0],
                                    self._cfg.ack_timeout_s)
                        stream.stopped = True
                        if stream.call is not None:
                            stream.call.cancel()
                        return
                    if stream.inflight:
                        self._cond.wait(min(1.0, self._cfg.ack_timeout_s / 4))
                        continue
                    # Nothing in flight, nothing to send: wake only to close when idle.
                    idle_s = time.monotonic() - stream.last_active
                    if idle_s >= self._cfg.idle_close_s:
                        stream.idle_closed = True
                        return   # half-close: the collector then ends the stream
                    self._cond.wait(self._cfg.idle_close_s - idle_s)
                stream.asking = False
                self._picks += 1
                stream.served = self._picks
                self._claimed.add(nxt.batch_id)
                stream.inflight.append((nxt.batch_id, nxt.records, time.monotonic()))
                stream.last_active = time.monotonic()
                self._cond.notify_all()   # the other streams' turn may have come
            self._c["batches_sent"] += 1
            payload = nxt.payload
            if not stream.columnar and self._cfg.columnar and _columnar().is_columnar(payload):
                # Spooled as columns, bound for a collector that takes rows only (one
                # that was replaced by an older version, or a newly added old one).
                payload = _columnar().to_rows(payload)
                self._c["batches_transcoded"] += 1
            yield payload

    def _on_ack(self, stream: _Stream, ack) -> None:
        with self._cond:
            entry = None
            for i, item in enumerate(stream.inflight):
                if item[0] == ack.batch_id:
                    entry = item
                    del stream.inflight[i]
                    break
            stream.last_active = time.monotonic()
            times = self._enqueued.pop(ack.batch_id, None)
            released = self._released_at.pop(ack.batch_id, None)
            if entry is not None:
                if ack.status in _UNDERSTOOD:
                    self._claimed.discard(ack.batch_id)
                else:
                    stream.held.append(ack.batch_id)
            self._cond.notify_all()
        if entry is None:
            self._c["acks_unexpected"] += 1
            log.warning("collector %s acked batch %d, which was not in flight", stream.target,
                        ack.batch_id)
            return
        if released is not None:
            # From its stream breaking to its ack over another (or the same, reconnected).
            ms = int((time.monotonic() - released) * 1000)
            self._c["failover_ms_max"] = max(self._c["failover_ms_max"], ms)
        status = ack.status
        if status in (_ACK.ACK_STATUS_STORED, _ACK.ACK_STATUS_DUPLICATE):
            key = "batches_acked" if status == _ACK.ACK_STATUS_STORED else "batches_duplicate"
            self._c[key] += 1
            self._c["records_acked"] += entry[1]
            if times:
                now = time.monotonic_ns()
                self._latencies.extend(now - t for t in times)
        elif status == _ACK.ACK_STATUS_REJECTED:
            self._c["batches_rejected"] += 1
            self._c["records_rejected"] += entry[1]
            log.error("collector %s rejected batch %d (%d records): %s", stream.target,
                      ack.batch_id, entry[1], ack.message or "no reason given")
        else:
            # Not an answer we understand: keep the batch; it goes again after a reconnect.
            self._c["acks_unexpected"] += 1
            log.warning("collector %s sent ack status %d for batch %d", stream.target, status,
                        ack.batch_id)
            return
        self._spool.ack(ack.batch_id)
