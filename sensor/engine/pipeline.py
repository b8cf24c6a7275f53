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

import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Protocol

from sensor.engine.flowtable import DEFAULT_MAX_FLOWS
from sensor.engine.l7engine import L7Engine
from sensor.engine.reassembly import DEFAULT_LIMITS, MemoryBudget, ReassemblyLimits
from sensor.engine.semantics import DEFAULT_TIMEOUTS, Timeouts
from sensor.enrich.community_id import DEFAULT as DEFAULT_CID
from sensor.enrich.community_id import CommunityId
from sensor.model import LostEvent, LostSource, Record, record_kind
from sensor.replay.meter import Meter
from sensor.replay.reader import Packet

__all__ = ["PacketSource", "RecordSink", "ExporterSink", "PipelineConfig", "Pipeline",
           "Summary"]


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


@dataclass(slots=True)
class Summary:
    """What a run did: for the CLI's closing line and for tests."""

    packets: int = 0
    flows: int = 0                                    # Flow records (incl. interim)
    l7_events: dict[str, int] = field(default_factory=dict)
    lost: dict[str, int] = field(default_factory=dict)   # LostSource value -> count
    errors: dict[str, int] = field(default_factory=dict)  # other counted trouble
    first_ns: int = 0
    last_ns: int = 0
    elapsed_s: float = 0.0

    @property
    def l7_total(self) -> int:
        return sum(self.l7_events.values())

    def line(self) -> str:
        """One human line: packets, flows, L7 events, loss and errors."""
        rate = self.packets / self.elapsed_s if self.elapsed_s > 0 else 0.0
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.l7_events.items()))
        text = (f"{self.packets} packets, {self.flows} flows, {self.l7_total} L7 events"
                f"{f' ({kinds})' if kinds else ''} in {self.elapsed_s:.1f} s "
                f"({rate:,.0f} packets/s)")
        trouble = {**self.lost, **self.errors}
        if trouble:
            text += "; lost/errors: " + ", ".join(
                f"{k} {v}" for k, v in sorted(trouble.items()))
        else:
            text += "; nothing lost"
        return text


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

        def emit(record: Record) -> None:
            kind = record_kind(record)
            kinds[kind] = kinds.get(kind, 0) + 1
            write(record)

        self._emit = emit
        self.l7: L7Engine | None = None
        if config.l7:
            self.l7 = L7Engine(
                emit=emit, sensor_id=config.sensor_id, community=config.community,
                budget=MemoryBudget(config.reassembly_budget_bytes),
                limits=config.reassembly_limits)
        self.meter = Meter(emit=emit, sink=self.l7, timeouts=config.timeouts,
                           max_flows=config.max_flows, sensor_id=config.sensor_id,
                           community=config.community)
        self.reader_stats: list = []
        self._first_ns = 0
        self._last_ns = 0

    def feed(self, source: Iterable[Packet]) -> None:
        """Run every packet of `source` through the engine (flows stay live across
        sources: several files of one capture session form one stream)."""
        feed = self.meter.feed
        ts = 0
        packets = iter(source)
        if not self._first_ns:
            for ts, ifx, link, frame, wire in packets:
                feed(ts, ifx, link, frame, wire)
                self._first_ns = ts
                break
        for ts, ifx, link, frame, wire in packets:
            feed(ts, ifx, link, frame, wire)
        if ts > self._last_ns:
            self._last_ns = ts
        stats = getattr(source, "stats", None)
        if stats is not None:
            self.reader_stats.append(stats)

    def close(self) -> Summary:
        """Final flush (FORCED_END for live flows, after their L7 state), LostEvents for
        every loss counter, then the sink's flush and close."""
        if self._closed:
            raise RuntimeError("pipeline already closed")
        self._closed = True
        meter = self.meter
        meter.flush()
        summary = self._summary()
        for source, count in summary.lost.items():
            self._emit(LostEvent(source=source, count=count,
                                 interval_start_ns=summary.first_ns,
                                 interval_end_ns=summary.last_ns,
                                 sensor_id=self.config.sensor_id))
        self.sink.flush()
        self.sink.close()
        summary.elapsed_s = self._clock() - self._started
        return summary

    def _summary(self) -> Summary:
        meter = self.meter
        ms = meter.stats
        ts = meter.table.stats
        lost: dict[str, int] = {}
        errors: dict[str, int] = {}

        def put(target: dict, name: str, value: int) -> None:
            if value:
                target[name] = target.get(name, 0) + value

        for rs in self.reader_stats:
            put(lost, LostSource.CAPTURE_ERROR.value,
                rs.corrupt_records + rs.truncated_records)
            put(errors, "reader_skipped_bytes", rs.skipped_bytes)
            put(errors, "reader_bad_interface", rs.bad_interface)
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
        return Summary(
            packets=ms.packets,
            flows=kinds.get("flow", 0),
            l7_events={k: v for k, v in kinds.items() if k not in ("flow", "lost")},
            lost=lost, errors=errors,
            first_ns=self._first_ns, last_ns=max(self._last_ns, self._first_ns),
        )
