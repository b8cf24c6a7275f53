"""The one module that wires the userspace engine's stages together and owns their order.

    packet source -> meter (L2-L4, flows) -> flow table -> L7 engine -> record sink

Stages know only their input and output (STYLE.md 10); this module builds them, runs
packets through, and owns shutdown: stop the source, let the meter drain (its last
packets), flush the flow table (every live flow gets its final record, FORCED_END, after
its L7 state was flushed), report the loss counters as LostEvent records, then flush and
close the sink.

Two seams are typing.Protocols so the live sensor can plug in later and tests need no
root: a PacketSource yields packets in the reader's tuple shape (a capture file now, the
kernel's flow/payload events later), and a RecordSink takes records (the file sinks of
sensor/export/sinks.py, or any Exporter through ExporterSink).

Replay runs in one thread: records go to the sink as they are made, in order. The sink
is the slowest stage on purpose-built output (Parquet buffers a row group), and the
whole run is CPU-bound, so a writer thread would only add GIL hand-offs.
"""

from __future__ import annotations

import multiprocessing
import pickle
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing import connection as mp_connection
from typing import Callable, Iterable, Iterator, Protocol

from sensor.capfilter import compile_packet_filter
from sensor.capfilter import parse as parse_filter
from sensor.engine.flowtable import DEFAULT_MAX_FLOWS
from sensor.engine.l7engine import L7Engine
from sensor.engine.meter import Meter, shard_of
from sensor.engine.reassembly import DEFAULT_LIMITS, MemoryBudget, ReassemblyLimits
from sensor.flow.community_id import DEFAULT as DEFAULT_CID
from sensor.flow.community_id import CommunityId
from sensor.flow.packet import Packet
from sensor.flow.semantics import DEFAULT_TIMEOUTS, Timeouts
from sensor.model import LostEvent, LostSource, Record, record_kind

__all__ = ["PacketSource", "RecordSink", "ExporterSink", "PipelineConfig", "Pipeline",
           "Summary", "loss_events", "merge", "run_sharded"]


class PacketSource(Protocol):
    """Packets as (ts_ns, interface, link_type, frame, wire_len), in capture order."""

    def __iter__(self) -> Iterator[Packet]: ...


class RecordSink(Protocol):
    """Where records go. write() is called in the pipeline's thread, in order."""

    def write(self, record: Record) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class ExporterSink:
    """A RecordSink over an Exporter (sensor/export/exporter.py), e.g. the gRPC client:
    records are submitted without blocking; close() waits up to `close_timeout_s` for
    delivery (what is left stays in the exporter's spool)."""

    def __init__(self, exporter, *, close_timeout_s: float = 30.0) -> None:
        self.exporter = exporter
        self.close_timeout_s = close_timeout_s
        self.dropped = 0

    def write(self, record: Record) -> None:
        if not self.exporter.submit(record):
            self.dropped += 1   # counted by the exporter too, and sent as a LostEvent

    def flush(self) -> None:
        """Delivery is the exporter's business; nothing to do between records."""

    def close(self) -> None:
        self.exporter.close(self.close_timeout_s)


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineConfig:
    l7: bool = True
    sensor_id: str = ""
    timeouts: Timeouts = DEFAULT_TIMEOUTS
    max_flows: int = DEFAULT_MAX_FLOWS
    community: CommunityId = DEFAULT_CID
    # Out-of-order TCP bytes held by all flows together (reassembly.MemoryBudget): 64 MiB
    # keeps a replay well under 1 GiB RSS while covering many simultaneous holes.
    reassembly_budget_bytes: int = 64 << 20
    reassembly_limits: ReassemblyLimits = DEFAULT_LIMITS
    # A tcpdump-style expression (sensor/capfilter.py); only the packets it matches reach
    # the meter, as if the capture had been through `tcpdump -r FILE EXPR -w ...`.
    packet_filter: str = ""
    # Rules (sensor/rules/): a rule file or directory, or "default"; "" is off. Alerts
    # come out as records beside the L7 events they are about.
    rules: str = ""
    # PII counts on HTTP events (sensor/l7/pii.py, docs/pii.md): counts, never values.
    pii: bool = False
    # Geo and ASN on Flow records (sensor/enrich/geo.py): (database, asn_database), ""
    # for the packaged database / none; None is off.
    geoip: tuple[str, str] | None = None
    # The DDoS detector (sensor/rules/ddos_replay.py): a sensor.rules.ddos.Settings, or
    # None (off). One pipeline only: a shard would see a share of each service's sources.
    ddos: object | None = None

    def __post_init__(self) -> None:
        if self.packet_filter:
            parse_filter(self.packet_filter)   # FilterError (one line) before any work


@dataclass(slots=True)
class Summary:
    """What a run did: for the CLI's closing line and for tests."""

    packets: int = 0
    flows: int = 0                                    # Flow records (incl. interim)
    l7_events: dict[str, int] = field(default_factory=dict)
    alerts: int = 0
    lost: dict[str, int] = field(default_factory=dict)   # LostSource value -> count
    errors: dict[str, int] = field(default_factory=dict)  # other counted trouble
    first_ns: int = 0
    last_ns: int = 0
    elapsed_s: float = 0.0
    # One line per input that ended before its capture did (ReaderStats.truncation()).
    truncated: list[str] = field(default_factory=list)

    @property
    def l7_total(self) -> int:
        return sum(self.l7_events.values())

    def line(self) -> str:
        """One human line: packets, flows, L7 events, loss and errors."""
        rate = self.packets / self.elapsed_s if self.elapsed_s > 0 else 0.0
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.l7_events.items()))
        text = (f"{self.packets} packets, {self.flows} flows, {self.l7_total} L7 events"
                f"{f' ({kinds})' if kinds else ''}"
                f"{f', {self.alerts} alerts' if self.alerts else ''} in {self.elapsed_s:.1f} s "
                f"({rate:,.0f} packets/s)")
        trouble = {**self.lost, **self.errors}
        if trouble:
            text += "; lost/errors: " + ", ".join(
                f"{k} {v}" for k, v in sorted(trouble.items()))
        elif not self.truncated:
            text += "; nothing lost"
        if self.truncated:
            # The capture goes on past the cut: what is missing there is not counted.
            n = len(self.truncated)
            text += f"; input truncated ({n} file{'s' if n > 1 else ''})"
        return text


def loss_events(summary: Summary, sensor_id: str = "") -> list[LostEvent]:
    """One LostEvent per loss source counted in a run, over the run's packet time."""
    return [LostEvent(source=source, count=count, interval_start_ns=summary.first_ns,
                      interval_end_ns=summary.last_ns, sensor_id=sensor_id)
            for source, count in sorted(summary.lost.items())]


def merge(summaries: list[Summary]) -> Summary:
    """The Summary of parallel pipelines that shared one capture between them."""
    out = Summary()
    for s in summaries:
        out.packets += s.packets
        out.flows += s.flows
        out.alerts += s.alerts
        for target, part in ((out.l7_events, s.l7_events), (out.lost, s.lost),
                             (out.errors, s.errors)):
            for k, v in part.items():
                target[k] = target.get(k, 0) + v
        if s.first_ns and (not out.first_ns or s.first_ns < out.first_ns):
            out.first_ns = s.first_ns
        out.last_ns = max(out.last_ns, s.last_ns)
        out.truncated += s.truncated
    return out


class Pipeline:
    """Build once per run: feed() packet sources, then close() exactly once."""

    def __init__(self, sink: RecordSink, config: PipelineConfig = PipelineConfig(),
                 *, clock=time.perf_counter) -> None:
        self.sink = sink
        self.config = config
        self._clock = clock
        self._started = clock()
        self._kinds: dict[str, int] = {}
        self._closed = False
        write = sink.write
        kinds = self._kinds
        self.geo = None
        if config.geoip is not None:
            from sensor.enrich.geo import GeoEnricher

            self.geo = GeoEnricher.open(*config.geoip)
        geo = self.geo
        ddos = None

        def emit(record: Record) -> None:
            if ddos is not None:
                ddos.observe(record)
            kind = record_kind(record)
            kinds[kind] = kinds.get(kind, 0) + 1
            if geo is not None and kind == "flow":
                record = geo.enrich(record)
            write(record)

        self._emit = emit
        self.l7: L7Engine | None = None
        self.rules = None
        if config.l7:
            registry = analyze = None
            if config.rules:
                from sensor.rules import stage  # only runs with rules pay for the import

                self.rules, registry = stage.build(config.rules, emit)
                analyze = self.rules
            if config.pii:
                from sensor.l7 import pii
                from sensor.l7.detect import ParserRegistry

                registry = pii.ScanningRegistry(registry or ParserRegistry(), pii.Scanner())
            self.l7 = L7Engine(
                emit=emit, sensor_id=config.sensor_id, community=config.community,
                budget=MemoryBudget(config.reassembly_budget_bytes),
                limits=config.reassembly_limits, registry=registry, analyze=analyze)
        self.meter = Meter(emit=emit, sink=self.l7, timeouts=config.timeouts,
                           max_flows=config.max_flows, sensor_id=config.sensor_id,
                           community=config.community)
        self.ddos = None
        if config.ddos is not None:
            from sensor.rules.ddos_replay import DdosReplay

            self.ddos = ddos = DdosReplay(config.ddos, emit, self.meter.table,
                                          sensor_id=config.sensor_id)
        self.reader_stats: list = []
        self._first_ns = 0
        self._last_ns = 0
        self._match = (compile_packet_filter(config.packet_filter)
                       if config.packet_filter else None)

    def feed(self, source: Iterable[Packet]) -> None:
        """Run every packet of `source` through the engine (flows stay live across
        sources: several files of one capture session form one stream)."""
        feed = self.meter.feed
        if self.ddos is not None:
            feed = self.ddos.feeding(feed)
        ts = 0
        match = self._match
        packets = iter(source) if match is None else (
            p for p in source if match(p[2], p[3]))
        if not self._first_ns:
            for ts, ifx, link, frame, wire in packets:
                feed(ts, ifx, link, frame, wire)
                self._first_ns = ts
                break
        if self.ddos is None:
            # The meter's own loop: compiled, no Python call per packet.
            last = self.meter.feed_from(packets)
            if last != -1:
                ts = last
        else:
            for ts, ifx, link, frame, wire in packets:
                feed(ts, ifx, link, frame, wire)
        if ts > self._last_ns:
            self._last_ns = ts
        stats = getattr(source, "stats", None)
        if stats is not None:
            self.reader_stats.append(stats)

    def feed_shard(self, source: Iterable[Packet], index: int, jobs: int) -> None:
        """feed(), for the packets whose shard_of() falls to `index` of `jobs` parallel
        pipelines (every flow, and every fragment of it, lands in exactly one)."""
        feed = self.meter.feed
        match = self._match
        ts = 0
        for ts, ifx, link, frame, wire in source:
            # Ethernet + IPv4 inline (shard_of's first case), the rest through shard_of.
            if link == 1 and frame[12] == 8 and frame[13] == 0 and len(frame) >= 34:
                h = ((frame[28] << 8) | frame[29]) ^ ((frame[32] << 8) | frame[33])
            else:
                h = shard_of(link, frame)
            if h % jobs == index and (match is None or match(link, frame)):
                if not self._first_ns:
                    self._first_ns = ts
                feed(ts, ifx, link, frame, wire)
        if ts > self._last_ns:
            self._last_ns = ts
        stats = getattr(source, "stats", None)
        if stats is not None and index == 0:
            self.reader_stats.append(stats)   # every shard read the same file

    def close(self, *, report_loss: bool = True) -> Summary:
        """Final flush (FORCED_END for live flows, after their L7 state), LostEvents for
        every loss counter (unless the caller merges several pipelines' and reports them
        itself), then the sink's flush and close."""
        if self._closed:
            raise RuntimeError("pipeline already closed")
        self._closed = True
        meter = self.meter
        if self.ddos is not None:
            self.ddos.count_new_flows()   # before the flush empties the flow table
        meter.flush()
        if self.ddos is not None:
            self.ddos.close(self._last_ns)
        summary = self._summary()
        if report_loss:
            for event in loss_events(summary, self.config.sensor_id):
                self._emit(event)
        self.sink.flush()
        self.sink.close()
        if self.geo is not None:
            self.geo.close()
        summary.elapsed_s = self._clock() - self._started
        return summary

    def _summary(self) -> Summary:
        meter = self.meter
        ms = meter.stats
        ts = meter.table.stats
        lost: dict[str, int] = {}
        errors: dict[str, int] = {}
        truncated: list[str] = []

        def put(target: dict, name: str, value: int) -> None:
            if value:
                target[name] = target.get(name, 0) + value

        for rs in self.reader_stats:
            put(lost, LostSource.CAPTURE_ERROR.value,
                rs.corrupt_records + rs.truncated_records)
            put(errors, "reader_skipped_bytes", rs.skipped_bytes)
            put(errors, "reader_bad_interface", rs.bad_interface)
            if getattr(rs, "cut_short", ""):
                truncated.append(rs.truncation())
        put(lost, LostSource.FLOW_TABLE_FULL.value, ts.evicted)
        for name in ("unsupported_link", "truncated_l2", "too_many_vlan_tags", "bad_ip",
                     "truncated_ip", "truncated_l4", "ipv6_ext_limit",
                     "fragments_orphaned", "frag_table_evicted",
                     "fragmented_payload_not_passed"):
            put(errors, name, getattr(ms, name))
        if self.l7 is not None:
            ls = self.l7.stats
            put(lost, LostSource.PARSER_ERROR.value, ls.parser_errors)
            put(lost, LostSource.REASSEMBLY_GAP.value, ls.gaps)
            put(lost, LostSource.REASSEMBLY_MEMORY.value, ls.memory_drops)
        kinds = self._kinds
        l7_events = {k: v for k, v in kinds.items() if k not in ("flow", "lost", "alert")}
        return Summary(
            packets=ms.packets,
            flows=kinds.get("flow", 0),
            l7_events=l7_events, alerts=kinds.get("alert", 0),
            lost=lost, errors=errors, truncated=truncated,
            first_ns=self._first_ns, last_ns=max(self._last_ns, self._first_ns),
        )


# Records per message from a shard to the parent: large enough that pickling and the
# pipe cost little per record, small enough that the parent's memory stays flat.
_BATCH_RECORDS = 2048


class _ShardSender:
    """RecordSink of a shard process: records go to the parent in batches, pickled, or
    already encoded by `encode` (then the parent only writes bytes)."""

    def __init__(self, conn, encode: Callable[[Record], bytes] | None = None) -> None:
        self.conn = conn
        self.encode = encode
        self.batch: list = []

    def write(self, record: Record) -> None:
        self.batch.append(record if self.encode is None else self.encode(record))
        if len(self.batch) >= _BATCH_RECORDS:
            self.flush()

    def flush(self) -> None:
        if not self.batch:
            return
        if self.encode is None:
            self.conn.send_bytes(pickle.dumps(("records", self.batch), protocol=5))
        else:
            self.batch.append(b"")
            self.conn.send_bytes(pickle.dumps(("encoded", b"\n".join(self.batch)),
                                              protocol=5))
        self.batch = []

    def close(self) -> None:
        self.flush()


class EncodedSink(RecordSink, Protocol):
    """A RecordSink that can also take records already encoded (by its `encode`) in
    other processes: run_sharded's fast path for JSON lines."""

    def encode(self, record: Record) -> bytes: ...

    def write_encoded(self, block: bytes) -> None: ...


def _shard_main(index: int, jobs: int, make_sources, config: PipelineConfig, conn,
                progress: bool, encode) -> None:
    try:
        pipeline = Pipeline(_ShardSender(conn, encode), config)
        for source in make_sources():
            if progress and index == 0 and hasattr(source, "on_read"):
                def report(pos: int, size: int) -> None:
                    conn.send_bytes(pickle.dumps(
                        ("progress", (pos, size, pipeline.meter.stats.packets))))
                source.on_read = report
            try:
                pipeline.feed_shard(source, index, jobs)
            finally:
                close = getattr(source, "close", None)
                if close is not None:
                    close()
            if progress and index == 0:
                conn.send_bytes(pickle.dumps(("file-done", None)))
        summary = pipeline.close(report_loss=False)
        conn.send_bytes(pickle.dumps(("done", summary)))
    except BaseException:  # noqa: BLE001 -- reported to the parent, which re-raises
        conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))
    finally:
        conn.close()


def run_sharded(make_sources: Callable[[], Iterable[PacketSource]], sink: RecordSink,
                config: PipelineConfig = PipelineConfig(), *, jobs: int = 2,
                on_progress: Callable[[int, int, int], None] | None = None,
                on_file_done: Callable[[], None] | None = None,
                encoded: bool = False, clock=time.perf_counter) -> Summary:
    """Run `jobs` pipelines in parallel processes, each over every packet source that
    make_sources() opens (in the child) but metering only its shard of the flows
    (shard_of: both directions of a host pair, and all fragments, go to one shard).
    Records come back to this process in batches and go to `sink` here, so one sink
    gets everything (record order across shards is by arrival, not by time).

    With `encoded`, `sink` is an EncodedSink: the shards encode records with its
    encode() and the parent only writes the bytes (pickling records costs ~25 µs each
    across the pipe; encoding JSON lines in the shards, ~3 µs).

    Same records as one Pipeline over the same packets, except that the flow table
    bound (config.max_flows) applies per shard. The children are forked before this
    process starts any thread (the caller must not have started an exporter yet)."""
    if config.ddos is not None:
        raise ValueError("the DDoS detector needs every flow in one pipeline: run one job")
    started = clock()
    ctx = multiprocessing.get_context("fork")
    conns = []
    procs = []
    for index in range(jobs):
        parent_end, child_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_shard_main, name=f"loupe-shard-{index}",
                           args=(index, jobs, make_sources, config, child_end,
                                 on_progress is not None,
                                 sink.encode if encoded else None), daemon=True)
        proc.start()
        child_end.close()
        conns.append(parent_end)
        procs.append(proc)
    summaries: list[Summary] = []
    failure = ""
    try:
        waiting = list(conns)
        while waiting:
            for conn in mp_connection.wait(waiting):
                try:
                    kind, body = pickle.loads(conn.recv_bytes())
                except EOFError:
                    waiting.remove(conn)
                    continue
                if kind == "encoded":
                    sink.write_encoded(body)
                elif kind == "records":
                    for record in body:
                        sink.write(record)
                elif kind == "progress":
                    if on_progress is not None:
                        on_progress(*body)
                elif kind == "file-done":
                    if on_file_done is not None:
                        on_file_done()
                elif kind == "done":
                    summaries.append(body)
                elif kind == "error":
                    failure = body
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join()
    if not failure and len(summaries) < jobs:
        failure = "a replay shard process exited without a result"
    if failure:
        raise RuntimeError(f"replay shard failed:\n{failure}")
    summary = merge(summaries)
    for event in loss_events(summary, config.sensor_id):
        sink.write(event)
    sink.flush()
    sink.close()
    summary.elapsed_s = clock() - started
    return summary
