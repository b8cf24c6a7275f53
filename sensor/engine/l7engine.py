"""The per-flow L7 stage: meter payload in, L7Event records and Flow L7 fields out.

Strategy. The stage implements the meter's PayloadSink (and FlowAnnotator) seam, so the
same object serves replay now and the kernel's payload ring buffer later. Per flow it
keeps one small `FlowL7` in `flow.l7`:

- TCP: a FlowReassembler (sensor/engine/reassembly.py) turns capture-order segments into
  in-order Data/Gap/Skip/Eof events per direction. The first Data of either direction
  decides the protocol (sensor/l7/detect.py: content first, port hints second); the
  registry's parser for it then gets every later event. UDP: each datagram goes to the
  parser whole; the first one decides the protocol.
- After each batch of events the parser's finished transactions become L7Event records
  (uid, Community ID and 5-tuple of the flow, initiator as src), and its skip_hint is
  passed to the reassembler, so body bytes of known length are accounted as Skip and
  never reach the parser (the kernel will not even copy them, live).
- A parser that is DONE (TLS after the handshake, HTTP after an Upgrade) or in ERROR
  (garbage from the peer: counted as LostSource.PARSER_ERROR, the stream stays in ERROR),
  and a flow whose protocol has no parser, stop the flow's reassembly at once: its
  reassembler is closed (its memory goes back to the budget) and later payload bytes are
  only counted as skipped. That is where most of the CPU is saved: bulk transfers and
  encrypted TLS cost one comparison per segment.
- At flow end the reassembler is flushed (holes become gaps, then Eof both ways), the
  parser reports what it still holds, and the Flow record gets app_proto, the parser's
  summary (http_host, dns_qname, tls_sni, tls_ja4, and the protocol's own keys in
  l7_summary) and l7_coverage.

Bounds: every stream's out-of-order bytes are charged to one MemoryBudget shared by the
engine (global) and limited per stream by ReassemblyLimits; parsers bound their own
buffers (see each module). Per-flow state exists only for flows in the flow table, which
is bounded itself.

Coverage. The reassembler counts every stream byte up to the stop as captured,
truncated, gap or skipped; after a stop, the payload bytes of later segments are added
to skipped as they come (a retransmission after the stop is therefore counted again:
exact accounting would need the reassembler we just gave up to save CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from sensor.engine.flowtable import FlowState, identify
from sensor.engine.reassembly import (
    DEFAULT_LIMITS,
    Data,
    Eof,
    FlowReassembler,
    Gap,
    MemoryBudget,
    ReassemblyLimits,
    Skip,
)
from sensor.flow.community_id import DEFAULT as DEFAULT_CID
from sensor.flow.community_id import CommunityId
from sensor.l7 import registry
from sensor.l7.base import NEED_DATA, Direction, ParserState
from sensor.l7.detect import PROTO_TCP, PROTO_UDP, ParserRegistry, detect
from sensor.model import L7_SOURCES, L7Coverage, L7Event, Record, trusted

# The stage's own records, made without re-validation (model.trusted).
_L7EVENT = trusted(L7Event)
_COVERAGE = trusted(L7Coverage)

_DETECT = 0   # no payload seen yet: the protocol is not known
_PARSE = 1    # a parser gets the flow's bytes
_STOPPED = 2  # nothing more to do for this flow (done, error, no parser)

_DIRS = (Direction.TO_SERVER, Direction.TO_CLIENT)
# Module constants, not ParserState.OK: an Enum class attribute costs several times a
# global, and the state is checked after every segment.
_OK, _ERROR = ParserState.OK, ParserState.ERROR


@dataclass(slots=True)
class L7Stats:
    """The stage's counters; `lost_*` are the ones reported as LostEvents."""

    flows_inspected: int = 0
    events: dict[str, int] = field(default_factory=dict)   # by kind: http, dns, tls
    detected: dict[str, int] = field(default_factory=dict)  # flows by app_proto
    undetected: int = 0            # flows with payload but no recognised protocol
    no_parser: int = 0             # recognised (e.g. postgres) but no parser installed
    parsers_done: int = 0          # stopped early because the parser needed no more
    parser_errors: int = 0         # LostSource.PARSER_ERROR
    parser_errors_by_proto: dict[str, int] = field(default_factory=dict)
    skipped_after_stop: int = 0    # payload bytes not reassembled after a stop
    gaps: int = 0                  # LostSource.REASSEMBLY_GAP (holes declared lost)
    gap_bytes: int = 0
    memory_drops: int = 0          # LostSource.REASSEMBLY_MEMORY (holes given up)
    memory_drop_bytes: int = 0
    overlap_conflicts: int = 0


class FlowL7:
    """One flow's L7 state (in FlowState.l7)."""

    __slots__ = ("phase", "reasm", "parser", "app_proto", "udp_octets", "coverage", "idle")

    def __init__(self) -> None:
        self.phase = _DETECT
        self.reasm: FlowReassembler | None = None
        self.parser = None
        # The parser's idle_until_request(direction), for parsers that have one.
        self.idle: Callable | None = None
        self.app_proto = ""
        self.udp_octets = 0
        self.coverage: L7Coverage | None = None   # frozen at the stop


class L7Engine:
    """PayloadSink + FlowAnnotator for sensor/engine/meter.py (and, later, the kernel's
    payload events). Records go to `emit`."""

    def __init__(
        self,
        *,
        emit: Callable[[Record], None],
        sensor_id: str = "",
        community: CommunityId = DEFAULT_CID,
        registry: ParserRegistry | None = None,
        budget: MemoryBudget | None = None,
        limits: ReassemblyLimits = DEFAULT_LIMITS,
        analyze: Callable[[L7Event, object], None] | None = None,
        source: str = "wire",
    ) -> None:
        if source not in L7_SOURCES:
            # Checked once here: the stage's records are made without per-record checks.
            raise ValueError(f"source must be one of {', '.join(L7_SOURCES)}, got {source!r}")
        self.emit = emit
        self.source = source   # L7Event.source of every event: "wire" or "tls_plaintext"
        # The analyzer stage (sensor/rules/): sees each L7Event right after it is emitted,
        # with the raw request an HTTP parser kept for it (or None); may emit Alerts.
        self.analyze = analyze
        self.sensor_id = sensor_id
        self.community = community
        self.registry = registry if registry is not None else ParserRegistry()
        self.budget = budget if budget is not None else MemoryBudget()
        self.limits = limits
        self.stats = L7Stats()
        self._kinds: dict = {}   # detail class -> its registered kind, for stats.events

    # -- PayloadSink ----------------------------------------------------------------------

    def tcp_segment(self, flow: FlowState, direction: int, seq: int, ack: int, flags: int,
                    payload: bytes, ts_ns: int, wire_len: int | None = None) -> None:
        """wire_len: the segment's payload length from `seq` on when only a prefix was
        copied (the kernel's budget, live); the rest is accounted as truncated."""
        st = flow.l7
        if st is None:
            st = flow.l7 = FlowL7()
            self.stats.flows_inspected += 1
        elif st.phase == _STOPPED:
            flow.l7_skipped += len(payload)
            return
        reasm = st.reasm
        if reasm is None:
            reasm = st.reasm = FlowReassembler(self.budget, self.limits)
        # Most segments are the next bytes of their stream: accounted by the reassembler
        # and handed to the parser here, with no event objects in between (in_order).
        how = reasm.in_order(direction, seq, ack, flags, payload, wire_len)
        if how:
            if how == 3:
                return   # a bare SYN: it started its stream, there is nothing to parse
            parser = st.parser
            if st.phase == _DETECT:
                if how == 2:
                    return   # skipped bytes before any data: nothing to detect on
                parser = self._detect(flow, st, PROTO_TCP, direction, payload)
                if parser is None:
                    return
            if how == 1:
                parser.receive_data(_DIRS[direction], payload, ts_ns)
            else:
                parser.receive_skip(_DIRS[direction], len(payload), ts_ns)
            self._after_stream(flow, st, parser)
            return
        events = reasm.segment(direction, seq, ack, flags, payload, ts_ns, wire_len)
        if events:
            self._stream_events(flow, st, events)

    def udp_datagram(self, flow: FlowState, direction: int, payload: bytes,
                     ts_ns: int) -> None:
        st = flow.l7
        if st is None:
            st = flow.l7 = FlowL7()
            self.stats.flows_inspected += 1
        if st.phase == _STOPPED:
            flow.l7_skipped += len(payload)
            return
        st.udp_octets += len(payload)
        parser = st.parser
        if st.phase == _DETECT:
            parser = self._detect(flow, st, PROTO_UDP, direction, payload)
            if parser is None:
                return
        parser.receive_datagram(_DIRS[direction], payload, ts_ns)
        self._after(flow, st, parser)

    def skip_to(self, flow: FlowState, direction: int, seq: int) -> None:
        """Bytes of `direction` before wire seq `seq` were left out on purpose (a kernel
        hold that ended): they become a Skip, not a Gap, when the stream reaches them."""
        st = flow.l7
        if st is not None and st.reasm is not None:
            stream = st.reasm.streams[direction]
            if stream.started:
                stream.skip_to_seq(seq)

    def lose_to(self, flow: FlowState, direction: int, seq: int, ts_ns: int) -> None:
        """Bytes of `direction` before wire seq `seq` that have not arrived were lost (the
        kernel's frame walk could not deliver them): the parser gets a Gap now, not the
        Skip an elision would be."""
        st = flow.l7
        if st is None or st.reasm is None or st.phase == _STOPPED:
            return
        events = st.reasm.streams[direction].lose_to_seq(seq, ts_ns)
        if events:
            self._stream_events(flow, st, [(direction, ev) for ev in events])

    def flow_ended(self, flow: FlowState, record) -> None:
        """Nothing left to do: flow_ending() flushed the flow before its record."""

    # -- FlowAnnotator ----------------------------------------------------------------------

    def flow_ending(self, flow: FlowState) -> None:
        st = flow.l7
        if st is None:
            return
        if st.reasm is not None and st.phase != _STOPPED:
            events = st.reasm.flush(flow.last_ns)
            if events:
                self._stream_events(flow, st, events)
        if st.phase == _PARSE:
            parser = st.parser
            if st.reasm is None:
                # UDP: the responder can send nothing more; unanswered queries come out.
                parser.receive_eof(Direction.TO_CLIENT, flow.last_ns)
                parser.receive_eof(Direction.TO_SERVER, flow.last_ns)
            self._drain(flow, parser)
            if parser.state is _ERROR:
                self._parser_error(st)
        if st.reasm is not None:
            self._close_stream(st)

    def flow_fields(self, flow: FlowState) -> dict:
        st: FlowL7 = flow.l7
        fields: dict = {"app_proto": st.app_proto,
                        "l7_coverage": self._coverage(st, flow.l7_skipped)}
        if st.parser is not None:
            summary = st.parser.summary()
            if summary:
                # Only what its protocol registered reaches the Flow record: its Flow fields,
                # and its own keys into l7_summary, each value cut to the declared bound.
                # Which value a key holds (the first statement, the first topic) is the
                # parser's choice; summary() is asked again for each interim record.
                spec = registry.get(st.app_proto)
                if spec is not None:
                    fields.update((k, v) for k, v in summary.items() if k in spec.summary)
                    own = {k: v[:registry.SUMMARY_VALUE_MAX] for k, v in summary.items()
                           if k in spec.summary_keys and v}
                    if own:
                        fields["l7_summary"] = own
        return fields

    # -- internals ---------------------------------------------------------------------------

    def _stream_events(self, flow: FlowState, st: FlowL7, events: list) -> None:
        parser = st.parser
        for d, ev in events:
            kind = type(ev)
            if st.phase == _DETECT:
                if kind is not Data:
                    continue   # gaps or an Eof before any data: nothing to detect on yet
                parser = self._detect(flow, st, PROTO_TCP, d, ev.data)
                if parser is None:
                    return
            if kind is Data:
                parser.receive_data(_DIRS[d], ev.data, ev.ts_ns)
            elif kind is Skip:
                parser.receive_skip(_DIRS[d], ev.length, ev.ts_ns)
            elif kind is Gap:
                parser.receive_gap(_DIRS[d], ev.length, ev.ts_ns)
            elif kind is Eof:
                parser.receive_eof(_DIRS[d], ev.ts_ns)
            if parser.state is not _OK:
                break
        if parser is None:
            return
        self._after_stream(flow, st, parser)

    def _after_stream(self, flow: FlowState, st: FlowL7, parser) -> None:
        """After a stream's bytes reached the parser: records out, then its skip hints to
        the reassembler (and, live, the kernel) and its idle state to the flow."""
        self._after(flow, st, parser)
        if st.phase == _PARSE:
            streams = st.reasm.streams
            skip = flow.l7_skip
            for d in (0, 1):
                hint = parser.skip_hint(_DIRS[d])
                if hint > 0:
                    until = streams[d].skip(hint)
                    if skip is None:
                        skip = flow.l7_skip = [None, None]
                    skip[d ^ flow.init] = until
                elif skip is not None:
                    skip[d ^ flow.init] = None
            idle = st.idle
            if idle is not None:
                flow.l7_hold = 1 if idle(_DIRS[1]) else 0 if idle(_DIRS[0]) else None

    def _detect(self, flow: FlowState, st: FlowL7, protocol: int, direction: int,
                data: bytes):
        """Name the flow's protocol from its first payload; the parser, or None (the flow
        is stopped: nothing to parse)."""
        i = flow.init
        server_port, client_port = flow.port[1 - i], flow.port[i]
        if direction == 0:
            name = detect(protocol=protocol, server_port=server_port,
                          client_port=client_port, to_server=data)
        else:
            name = detect(protocol=protocol, server_port=server_port,
                          client_port=client_port, to_client=data)
        st.app_proto = name
        stats = self.stats
        if not name:
            stats.undetected += 1
            self._stop(flow, st)
            return None
        stats.detected[name] = stats.detected.get(name, 0) + 1
        parser = self.registry.create(name)
        if parser is None:
            stats.no_parser += 1
            self._stop(flow, st)
            return None
        st.parser = parser
        st.idle = getattr(parser, "idle_until_request", None)
        st.phase = _PARSE
        return parser

    def _after(self, flow: FlowState, st: FlowL7, parser) -> None:
        """Turn finished transactions into records; stop the flow when the parser is
        done or broken."""
        self._drain(flow, parser)
        state = parser.state
        if state is _OK:
            return
        if state is _ERROR:
            self._parser_error(st)
        else:
            self.stats.parsers_done += 1
        self._stop(flow, st)

    def _drain(self, flow: FlowState, parser) -> None:
        txn = parser.next_event()
        if txn is NEED_DATA:
            return
        if not flow.uid:
            identify(flow, self.sensor_id, self.community)
        i = flow.init
        events = self.stats.events
        kinds = self._kinds
        while txn is not NEED_DATA:
            # Trusted (model.trusted): every value comes from the flow table and the
            # registered parser, not from outside input.
            record = _L7EVENT(
                uid=flow.uid, sensor_id=self.sensor_id, community_id=flow.cid,
                ts_ns=txn.ts_ns, src_addr=flow.src_text, dst_addr=flow.dst_text,
                src_port=flow.port[i], dst_port=flow.port[1 - i], protocol=flow.protocol,
                detail=txn.detail, source=self.source)
            kind = kinds.get(type(txn.detail))
            if kind is None:
                kind = kinds[type(txn.detail)] = record.kind
            events[kind] = events.get(kind, 0) + 1
            self.emit(record)
            if self.analyze is not None:
                self.analyze(record, getattr(txn, "request", None))
            txn = parser.next_event()

    def _parser_error(self, st: FlowL7) -> None:
        stats = self.stats
        stats.parser_errors += 1
        by = stats.parser_errors_by_proto
        by[st.app_proto] = by.get(st.app_proto, 0) + 1

    def _stop(self, flow: FlowState, st: FlowL7) -> None:
        if st.phase == _STOPPED:
            return
        st.phase = _STOPPED
        flow.l7_off = True   # the meter (live: the kernel) hands over no more payload
        flow.l7_skip = None
        flow.l7_hold = None
        if st.reasm is not None:
            self._close_stream(st)

    def _close_stream(self, st: FlowL7) -> None:
        reasm = st.reasm
        st.coverage = reasm.coverage()
        stats = self.stats
        for stream in reasm.streams:
            c = stream.counters
            stats.gaps += c.gaps - c.memory_drops
            stats.gap_bytes += c.gap_bytes - c.memory_drop_bytes
            stats.memory_drops += c.memory_drops
            stats.memory_drop_bytes += c.memory_drop_bytes
            stats.overlap_conflicts += c.overlap_conflicts
        reasm.close()
        st.reasm = None

    def _coverage(self, st: FlowL7, after_stop: int) -> L7Coverage:
        if st.reasm is not None:
            cov = st.reasm.coverage()
        elif st.coverage is not None:
            cov = st.coverage
        else:
            return _COVERAGE(inspected=True, captured_octets=st.udp_octets,
                             skipped_octets=after_stop)
        if after_stop:
            return _COVERAGE(
                inspected=True, captured_octets=cov.captured_octets,
                truncated_octets=cov.truncated_octets, gap_octets=cov.gap_octets,
                skipped_octets=cov.skipped_octets + after_stop)
        return cov
