"""The live sensor, wired in one place: kernel flow records and payload events in,
enriched Flow / L7Event / LostEvent records out to an exporter.

    kernel (bpf/flow.c) ─► flow map ─► FlowMapReader.collect() ─► join ─► enrich ─► exporter
         │                                                         ▲
         └─► ring buffer ─► KernelSensor queue ─► LiveL7 ─► L7Engine ┘ (L7Event records)
                                                     │
         l7_ctl (grant / skip-until / stop) ◄────────┘

Stages know only their input and output (STYLE.md 10). `LiveL7` turns payload events into
the L7 engine's PayloadSink calls (the same `L7Engine` replay uses, fed from the kernel
instead of the replay meter) and writes the engine's wishes back to the kernel through a
`FlowControl` seam; `LiveSensor` owns the kernel program, the order of start-up and
shutdown, and the main loop's one iteration (`step`). The command (sensor/sensor_cli.py)
adds signals, sd_notify, metrics and the exporters around it.

Threads. One thread does everything that touches the kernel and the L7 state: it polls
the ring buffer, runs the L7 engine on the queued payload events, reads the flow map
once per interval and hands records to the exporter, whose submit() never blocks (its
bounded queue drops and counts). So a slow or absent collector can never stall the ring
buffer poll; a slow L7 stage can only make the kernel drop payload events, which it
counts (kernel_ringbuf_full) while flow counters stay exact (they live in the flow map,
not in the ring). Process attribution drains its own tracepoint on its own thread.

Joining flows and L7. A flow's payload events are processed before its Flow record
leaves the reader: the reader emits a retired flow one cycle after retiring it, and
every payload event the kernel sent before the retire is already in the ring buffer,
which this loop drains before each read. So when a selected flow's record comes out,
its L7 stage is flushed (holes become gaps, the parser reports what it holds) and the
record gets app_proto, http_host, dns_qname, tls_sni, tls_ja4; the wait is bounded by
one read interval. Flows without L7 go out as soon as the reader retires them.

uids. L7 events are emitted while the flow is live, so their uid is computed here when
the flow's first payload event arrives (flowkey.flow_uid over the key and the flow's
first kernel timestamp); the Flow records of that flow are given the same uid on their
way out (the reader's own uid uses another wall-clock offset sample and may differ by a
few ns in its start time).

The budget policy (what is written to l7_ctl, see docs/sensor.md). No protocol is named
here: the parsers give their hints (skip_hint, DONE), and each protocol's registration
(sensor/l7/registry.py, FramingHints) says where its messages start, where a head ends,
whether a failed parser may resynchronise, and which event ends a TCP flow's use:
- skip: the parser's skip_hint (an HTTP body of known length) becomes skip-until-seq, so
  the kernel does not copy the body at all;
- stop: the parser is DONE (TLS after the handshake, HTTP after an Upgrade) or in ERROR
  (unless its protocol resynchronises, below), the protocol has no parser, or an event
  its hints' done_after accepts was seen (a DNS-over-TCP answer);
- resync: after a parser error in a protocol with `resync` (HTTP/1), the flow waits for
  the next segment that starts a message and gets a fresh parser there (MAX_RESYNCS);
- grant: whenever a live flow's payload arrives, each direction whose remaining
  allowance fell below half of its target is topped up to the target. The target is
  `refill_octets`, except in a direction whose message heads have been seen (a protocol
  with message_starts and head_end, HTTP/1): there it is HEAD_ROOM_FACTOR times the
  largest head seen (at least MIN_HEAD_ROOM, at most `refill_octets`). The allowance therefore covers the next message head, while a body
  in flight before its skip reached the kernel (it follows its head at once, in the
  same burst) can consume at most the target: copied bytes grow with the number of
  messages, not with their size, and a 10 MiB body costs about what a 1 KiB one does.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from sensor.clock import Clock, SystemClock, wall_offset_ns
from sensor.engine.flowtable import FlowState, identify
from sensor.engine.l7engine import L7Engine
from sensor.l7.base import Direction
from sensor.engine.reassembly import MemoryBudget
from sensor.errors import InterfaceError, KernelError, LoupeError
from sensor.flow.semantics import DEFAULT_TIMEOUTS, PROTO_TCP, PROTO_UDP, Timeouts
from sensor.kernel import abi, attach, bpfsys, frames
from sensor.kernel.counters import CounterWatcher
from sensor.kernel.events import PayloadEvent
from sensor.kernel.hybrid import MAX_CTL, KernelSensor, SelectionConfig, flow_key
from sensor.l7 import registry as l7_registry
from sensor.l7.detect import ParserRegistry
from sensor.model import Flow, FlowEndReason, L7Event, LostEvent, LostSource, Record, record_kind

log = logging.getLogger(__name__)

# The longest one ring buffer poll waits for the first event. The poll also ends at once
# for an event (a flow end, payload) or a signal (EINTR), and when the next flow map read
# is due; what else the command's loop does (STATUS=, the watchdog, the heartbeat) is
# due at most this late. So an idle sensor's loop wakes once per read interval, not ten
# times a second as with a fixed 100 ms (docs/sensor.md, "Idle cost").
POLL_MS = 1000
# Flow map reads per second by default: a retired flow is visible within about this long
# plus the reader's one-cycle delay.
DEFAULT_INTERVAL_S = 1.0
# After a read that retired flows, the next read comes this soon instead of a whole
# interval later: the reader emits retired flows one read after retiring them (late
# packets racing the retire reach the ring buffer within microseconds), so a flow is
# exported about this long after it is due rather than a second later.
RETIRE_SETTLE_S = 0.05
# After detaching, program runs that began before it may still be finishing (the filter
# is freed after an RCU grace period); the final drain waits this long for them.
DETACH_SETTLE_S = 0.05
# Allowance a live flow's direction is topped up to (see the module text): a typical
# HTTP/1 request or response head fits, and a body in flight before its skip lands costs
# at most this much. Heads larger than this arriving in one burst are truncated (counted
# in l7_coverage.truncated_octets).
DEFAULT_REFILL_OCTETS = 2048
# The allowance kept for an HTTP direction's next heads, once heads were seen there: four
# times the largest seen, never less than MIN_HEAD_ROOM (about two request or response
# heads without cookies) nor more than the refill. Topped up when it falls below half,
# so at least two of the largest heads seen always fit: userspace may lag one message
# behind on a busy host, and a head larger than any before it still has room. A head
# that does not fit is truncated, counted (parser_error), and parsing resynchronises at
# the next message. What a body copies before its skip lands is at most this, instead
# of the whole refill.
HEAD_ROOM_FACTOR = 4
MIN_HEAD_ROOM = 512
# Flows with L7 state at once: as many as the kernel's l7_ctl map can steer
# (LOUPE_L7_CTL_ENTRIES); a new flow beyond it is stopped in the kernel and counted.
MAX_L7_FLOWS = MAX_CTL
# Reader uid -> our uid for flows already finished: a late packet's own small record
# (flowmap.py "late_after_emit") must carry the same uid as its flow's record. Late
# packets arrive within a cycle; the bound only stops a storm from growing it.
RECENT_UIDS = 65536
# Resynchronisations in a row per flow, for a protocol whose FramingHints allow them
# (HTTP/1): after a head was lost (truncated while userspace lagged behind a fast
# connection, or a full ring buffer), the parser is restarted at the next segment that
# starts a message instead of giving up on the connection. Bounded so a connection that
# keeps losing heads is eventually stopped (and counted).
MAX_RESYNCS = 16
# Payload events handled per loop iteration before the flow map gets its turn, so a
# flood of payload cannot starve the reader (the rest waits in the bounded queue).
EVENTS_PER_STEP = 20000


# ---- the kernel seam -------------------------------------------------------------------


class FlowControl(Protocol):
    """What the L7 half needs from the kernel: l7_ctl writes and a flow's origin.
    KernelControl is the real one; tests can drive LiveL7 with a fake."""

    def grant(self, key: bytes, direction: int, octets: int) -> bool: ...

    def skip_until(self, key: bytes, direction: int, seq: int) -> bool: ...

    def stop(self, key: bytes) -> bool: ...

    def hold(self, key: bytes, direction: int, peer_octets: int) -> bool: ...

    def release(self, key: bytes, direction: int) -> bool: ...

    def flow_origin(self, key: bytes, incarnation: int) -> tuple[int, int] | None:
        """(canonical side of the initiator, first packet's kernel ns), or None when the
        flow (this incarnation) is no longer in the map."""


class KernelControl:
    """FlowControl over a loaded program and its KernelSensor."""

    def __init__(self, sensor: KernelSensor, flows_fd: int) -> None:
        self._sensor = sensor
        self._fd = flows_fd

    def grant(self, key: bytes, direction: int, octets: int) -> bool:
        return self._sensor.grant(key, direction, octets)

    def skip_until(self, key: bytes, direction: int, seq: int) -> bool:
        return self._sensor.skip_until(key, direction, seq)

    def stop(self, key: bytes) -> bool:
        return self._sensor.stop(key)

    def hold(self, key: bytes, direction: int, peer_octets: int) -> bool:
        return self._sensor.hold(key, direction, peer_octets)

    def release(self, key: bytes, direction: int) -> bool:
        return self._sensor.release(key, direction)

    def flow_origin(self, key: bytes, incarnation: int) -> tuple[int, int] | None:
        value = abi.FlowValue()
        if not bpfsys.lookup(self._fd, abi.FlowKey.from_buffer_copy(key), value, lock=True):
            return None
        if value.incarnation != incarnation:
            return None
        return value.initiator & 1, value.first_ns


# ---- the L7 half ---------------------------------------------------------------------------


class _Parsers(ParserRegistry):
    """The default parsers, with sensor.toml's [redaction] enabled switch handed to the
    parsers that registered a "redact" option (they redact credentials at parse time;
    off only for lab use)."""

    def __init__(self, redact: bool) -> None:
        super().__init__()
        self.redact = redact

    def create(self, name: str, **options):
        options.setdefault("redact", self.redact)
        return super().create(name, **options)


@dataclass(slots=True)
class LiveL7Stats:
    payload_events: int = 0
    payload_octets: int = 0          # copied payload handed to the L7 engine
    flows: int = 0                   # flows given L7 state
    flows_refused: int = 0           # MAX_L7_FLOWS reached: stopped in the kernel
    no_origin: int = 0               # the flow left the map before its first event
    not_tcp_udp: int = 0             # payload of other protocols (protocol selection)
    grants: int = 0
    granted_octets: int = 0
    skips: int = 0
    holds: int = 0                   # directions held until the other one sends
    stops: int = 0
    ctl_refused: int = 0             # l7_ctl writes the kernel map refused (full)
    resyncs: int = 0                 # HTTP parsers restarted after a lost head
    resync_skipped_events: int = 0   # payload events passed over while resyncing
    joined: int = 0                  # Flow records that got L7 fields
    expired: int = 0                 # L7 states whose Flow record never came


class _LiveFlow:
    __slots__ = ("key", "incarnation", "state", "received", "allowance", "skip_sent",
                 "stopped", "last_mono", "resyncs", "waiting", "head_max", "seen",
                 "hold", "held", "peer_moved")

    def __init__(self, key: bytes, incarnation: int, state: FlowState,
                 budget: tuple[int, int], now: int) -> None:
        self.key = key
        self.incarnation = incarnation
        self.state = state
        self.received = [0, 0]                 # by direction from the initiator
        self.allowance = [budget[0], budget[1]]
        self.skip_sent: list[int | None] = [None, None]   # by canonical side
        self.stopped = False
        self.last_mono = now
        self.resyncs = 0
        # A parser failed: the message starts to wait for (its FramingHints), else ().
        self.waiting: tuple[bytes, ...] = ()
        # Largest message head seen by direction from the initiator (0: none yet; a head
        # that does not end in its first chunk counts as unbounded).
        self.head_max = [0, 0]
        # Payload octets of the packets seen, by direction from the initiator (whole
        # packets, copied or not): a hold's measure of "the other direction sent more".
        self.seen = [0, 0]
        self.hold: int | None = None   # the direction the kernel holds (LOUPE_CTL_HOLD)
        # The direction last held, from the hold until its first data after the other
        # one moved (the bytes the kernel left out before that data are a Skip); or None.
        self.held: int | None = None
        self.peer_moved = False


@dataclass(frozen=True, slots=True)
class _Framing:
    """The registered protocols' FramingHints (sensor/l7/registry.py), as this engine
    looks them up per segment and per event."""

    heads: dict[str, tuple[bytes, tuple[bytes, ...]]]   # app_proto -> (head_end, starts)
    resync: dict[str, tuple[bytes, ...]]                 # app_proto -> message_starts
    done_after: dict[str, Callable[[object], bool]]      # record kind -> done_after

    def head_length(self, data: bytes, app_proto: str) -> int:
        """The length of the message head `data` starts with, by the hints of the flow's
        protocol; 1 << 32 when it does not end in this segment; 0 when none applies."""
        hints = self.heads.get(app_proto)
        if hints is None or not hints[0] or not data.startswith(hints[1]):
            return 0
        i = data.find(hints[0])
        return i + len(hints[0]) if i >= 0 else 1 << 32


def _framing_hints() -> _Framing:
    heads, resync, done_after = {}, {}, {}
    for spec in l7_registry.protocols():
        hints = spec.framing
        if hints is None:
            continue
        if hints.message_starts:
            heads[spec.name] = (hints.head_end, hints.message_starts)
        if hints.resync:
            resync[spec.name] = hints.message_starts
        if hints.done_after is not None:
            done_after[spec.name] = hints.done_after
    return _Framing(heads, resync, done_after)


def _addr_bytes(raw: bytes, version: int) -> bytes:
    return raw[:4] if version == 4 else raw[:16]


class LiveL7:
    """Payload events -> L7Engine -> L7Event records (to `emit`), l7_ctl writes (to
    `control`), and the L7 fields of Flow records (join())."""

    def __init__(self, *, emit: Callable[[Record], None], control: FlowControl,
                 sensor_id: str = "", budget: tuple[int, int] = (4096, 4096),
                 refill_octets: int = DEFAULT_REFILL_OCTETS,
                 reassembly_budget_bytes: int = 64 << 20,
                 max_flows: int = MAX_L7_FLOWS, expire_ns: int = 0,
                 redact: bool = True, rules: str = "",
                 on_verdict: Callable | None = None, pii=None,
                 on_pass: Callable | None = None) -> None:
        self._emit = emit
        self._control = control
        self.sensor_id = sensor_id
        self.budget = budget
        self.refill_octets = refill_octets
        self.max_flows = max_flows
        # Default: longer than any flow can stay in the map without a record.
        self.expire_ns = expire_ns or (DEFAULT_TIMEOUTS.tcp_idle_ns
                                       + DEFAULT_TIMEOUTS.tcp_end_linger_ns + 60 * 10**9)
        registry = _Parsers(redact)
        # PII counting (sensor/l7/pii.py): a pii.Scanner the HTTP parsers are given.
        self.pii = pii
        if pii is not None:
            from sensor.l7.pii import ScanningRegistry  # noqa: PLC0415

            registry = ScanningRegistry(registry, pii)
        self._framing = _framing_hints()
        # Every protocol's message starts in one tuple: one startswith() per segment.
        self._starts = tuple(s for _, starts in self._framing.heads.values() for s in starts)
        # Rules (sensor/rules/): alerts go out with the records; verdicts to on_verdict.
        self.rules = None
        if rules:
            from sensor.rules import stage  # noqa: PLC0415 (only sensors with rules)

            self.rules, registry = stage.build(
                rules, emit, registry=registry, on_verdict=on_verdict,
                current_flow=self.current_flow if on_verdict is not None else None,
                on_pass=on_pass)
        self.engine = L7Engine(emit=self._on_record, sensor_id=sensor_id,
                               registry=registry,
                               budget=MemoryBudget(reassembly_budget_bytes),
                               analyze=self.rules)
        self.stats = LiveL7Stats()
        self._flows: dict[tuple[bytes, int], _LiveFlow] = {}
        self._by_key: dict[bytes, _LiveFlow] = {}
        self._uids: OrderedDict[str, str] = OrderedDict()
        self._current: _LiveFlow | None = None

    def __len__(self) -> int:
        return len(self._flows)

    def current_flow(self):
        """The FlowState whose payload the L7 engine is processing (during a rule's
        verdict, the flow that decided it), or None."""
        return self._current.state if self._current is not None else None

    # -- payload ---------------------------------------------------------------------------

    def on_payload(self, ev: PayloadEvent, offset_ns: int, now_mono: int) -> None:
        stats = self.stats
        stats.payload_events += 1
        stats.payload_octets += len(ev.data)
        lf = self._flows.get((ev.key, ev.incarnation))
        if lf is None:
            lf = self._new_flow(ev, offset_ns, now_mono)
            if lf is None:
                return
        lf.last_mono = now_mono
        if lf.stopped:
            return   # the kernel was told; what it sent meanwhile is counted there
        d = ev.direction & 1
        lf.received[d] += len(ev.data)
        if ev.offset == 0:
            lf.seen[d] += ev.payload_len
        st = lf.state
        if lf.held is not None and ev.data:
            if d != lf.held:
                lf.peer_moved = True
            elif lf.peer_moved:
                # The first data of the held direction since the other one sent: what the
                # kernel held back before it was not wanted (a Skip, not a loss).
                lf.held = None
                self.engine.skip_to(st, d, ev.seq)
        if lf.waiting:
            if not ev.data.startswith(lf.waiting):
                stats.resync_skipped_events += 1
                self._write_back(lf, ev)      # keep the allowance for the next head
                return
            # A new message starts here: a fresh reassembler and parser from this
            # segment on (the reassembler picks the stream up mid-way).
            lf.waiting = ()
            st.l7 = None
            st.l7_off = False
            st.l7_skip = None
            lf.skip_sent = [None, None]
        ts = ev.ts_ns + offset_ns
        errors = self.engine.stats.parser_errors
        self._current = lf
        try:
            if st.protocol == PROTO_TCP:
                n = len(ev.data)
                wire = None
                # The kernel's frame walk (bpf/frames.h): what the other direction sent
                # below this ack and did not reach us was left out on purpose when it is
                # walked; so was what this direction sent before this chunk when it is.
                # A walked packet's chunks may be apart; only a cut one ends early.
                if ev.flags & frames.PLF_PEER_WALKED:
                    self.engine.skip_to(st, d ^ 1, ev.ack)
                if ev.flags & frames.PLF_SKIPPED_BEFORE:
                    if ev.flags & frames.PLF_LOST_BEFORE:
                        # Some were walked copies the ring refused: a Gap (a counted
                        # loss the parser resyncs after or ends on), never a Skip.
                        self.engine.lose_to(st, d, ev.seq, ts)
                    else:
                        self.engine.skip_to(st, d, ev.seq)
                    if ev.flags & frames.PLF_CUT:
                        wire = ev.payload_len - ev.offset
                # A chunk shorter than a full one that ends before the packet's payload
                # does is the last copied chunk: the rest was not copied (budget).
                elif ev.offset + n < ev.payload_len and n < abi.PAYLOAD_CHUNK:
                    wire = ev.payload_len - ev.offset
                self.engine.tcp_segment(st, ev.direction & 1, ev.seq, ev.ack, ev.tcp_flags,
                                        ev.data, ts, wire)
            elif ev.data:
                self.engine.udp_datagram(st, ev.direction & 1, ev.data, ts)
        finally:
            self._current = None
        if (st.l7_off and self.engine.stats.parser_errors > errors
                and st.protocol == PROTO_TCP and st.l7 is not None
                and lf.resyncs < MAX_RESYNCS
                and st.l7.app_proto in self._framing.resync):
            lf.resyncs += 1
            stats.resyncs += 1
            lf.waiting = self._framing.resync[st.l7.app_proto]
            st.l7_off = False
            st.l7_skip = None
        elif (st.protocol == PROTO_TCP and st.l7 is not None and self._starts
                and ev.data.startswith(self._starts)):
            # A segment that starts a message of the flow's protocol: its head's length
            # sizes the room kept for the next one (a head normally ends in its first
            # chunk). Measured once the engine named the protocol (on a first segment too).
            head = self._framing.head_length(ev.data, st.l7.app_proto)
            if head > lf.head_max[d]:
                lf.head_max[d] = head
        self._write_back(lf, ev)

    def _new_flow(self, ev: PayloadEvent, offset_ns: int, now_mono: int) -> _LiveFlow | None:
        stats = self.stats
        k = abi.FlowKey.from_buffer_copy(ev.key)
        if k.protocol not in (PROTO_TCP, PROTO_UDP):
            stats.not_tcp_udp += 1
            return None
        if len(self._flows) >= self.max_flows:
            stats.flows_refused += 1
            self._ctl(self._control.stop, ev.key)
            return None
        origin = self._control.flow_origin(ev.key, ev.incarnation)
        if origin is None:
            stats.no_origin += 1
            return None
        init, first_ns = origin
        a = _addr_bytes(bytes(k.addr_lo), k.ip_version)
        b = _addr_bytes(bytes(k.addr_hi), k.ip_version)
        first_wall = first_ns + offset_ns
        st = FlowState(ev.key, a, k.port_lo, b, k.port_hi, k.protocol, k.vlan_id,
                       k.inner_vlan_id, k.ifindex, init, first_wall)
        identify(st, self.sensor_id, self.engine.community)
        lf = _LiveFlow(ev.key, ev.incarnation, st, self.budget, now_mono)
        self._flows[(ev.key, ev.incarnation)] = lf
        self._by_key[ev.key] = lf   # the newest incarnation; older ones expire if orphaned
        stats.flows += 1
        return lf

    def _on_record(self, record: Record) -> None:
        lf = self._current
        if lf is not None:
            lf.resyncs = 0   # parsing works again: MAX_RESYNCS counts failures in a row
        # A protocol whose FramingHints say an event ends what a TCP flow is needed for
        # (DNS over TCP, after its answer).
        if (lf is not None and isinstance(record, L7Event)
                and lf.state.protocol == PROTO_TCP):
            done = self._framing.done_after.get(record.kind)
            if done is not None and done(record.detail):
                lf.state.l7_off = True   # _write_back() stops it in the kernel
        self._emit(record)

    def _ctl(self, write, *args) -> bool:
        ok = write(*args)
        if not ok:
            self.stats.ctl_refused += 1
        return ok

    def _write_back(self, lf: _LiveFlow, ev: PayloadEvent) -> None:
        st = lf.state
        stats = self.stats
        if st.l7_off:
            lf.stopped = True
            stats.stops += 1
            self._ctl(self._control.stop, lf.key)
            return
        if st.l7_hold != lf.hold:
            self._hold(lf, st.l7_hold)
        refill = self.refill_octets
        targets = [self._room_target(lf, 0), self._room_target(lf, 1)]
        skip = st.l7_skip
        if skip is not None:
            for side in (0, 1):
                until = skip[side]
                if until is None or until == lf.skip_sent[side]:
                    continue
                lf.skip_sent[side] = until
                stats.skips += 1
                d = side ^ st.init
                self._ctl(self._control.skip_until, lf.key, d, until)
                if refill > 0:
                    # Until the skip reaches the kernel, the body in flight uses up the
                    # allowance (as much as `length` of it). Granted now, right behind
                    # the skip, the next head finds room however late userspace gets
                    # to the body's own events.
                    length = (until - (ev.seq + len(ev.data))) & 0xFFFFFFFF \
                        if ev.direction == d else 1 << 32
                    room = max(lf.allowance[d] - lf.received[d], 0)
                    after = room - min(length, room)
                    if after < targets[d]:
                        self._grant(lf, d, targets[d] - after)
        if refill <= 0:
            return
        for d in (0, 1):
            room = lf.allowance[d] - lf.received[d]
            if room < targets[d] // 2:
                self._grant(lf, d, targets[d] - max(room, 0))

    def _hold(self, lf: _LiveFlow, want: int | None) -> None:
        """The parser's idle_until_request changed: hold that direction in the kernel
        until the other one sends past what was seen of it, or release the old hold."""
        if lf.hold is not None:
            self._ctl(self._control.release, lf.key, lf.hold)
        lf.hold = want
        if want is not None and self._ctl(self._control.hold, lf.key, want, lf.seen[want ^ 1]):
            lf.held = want
            lf.peer_moved = False
            self.stats.holds += 1

    def _room_target(self, lf: _LiveFlow, d: int) -> int:
        """What direction d's allowance is kept topped up to (see the module text), plus
        the request body prefix the rules asked for: the one place where the budget
        grants body bytes on purpose (docs/rules.md)."""
        head = lf.head_max[d]
        target = self.refill_octets if not head else min(
            self.refill_octets, max(MIN_HEAD_ROOM, HEAD_ROOM_FACTOR * head))
        if self.rules is not None or self.pii is not None:
            st = lf.state.l7
            wanted = getattr(st.parser, "wanted", None) if st is not None else None
            if wanted is not None:
                target += wanted(Direction(d))
        return target

    def _grant(self, lf: _LiveFlow, direction: int, octets: int) -> None:
        if self._ctl(self._control.grant, lf.key, direction, octets):
            lf.allowance[direction] += octets
            self.stats.grants += 1
            self.stats.granted_octets += octets

    # -- flow records ------------------------------------------------------------------------

    def join(self, record: Flow) -> Flow:
        """The record with its flow's uid and L7 fields; a final record also ends the
        flow's L7 state (flushed first, so its last transactions come out before it)."""
        if not record.l7_coverage.inspected:
            return record
        try:
            key = bytes(flow_key(src=record.src_addr, dst=record.dst_addr,
                                 sport=record.src_port, dport=record.dst_port,
                                 protocol=record.protocol, vlan_id=record.vlan_id,
                                 inner_vlan_id=record.inner_vlan_id, ifindex=record.ifindex))
        except ValueError:
            return record
        lf = self._by_key.get(key)
        if lf is None:
            uid = self._uids.get(record.uid)
            return dataclasses.replace(record, uid=uid) if uid else record
        st = lf.state
        final = record.flow_end_reason != FlowEndReason.ACTIVE_TIMEOUT
        if final:
            self._current = lf
            try:
                self.engine.flow_ending(st)
            finally:
                self._current = None
            self._forget(lf)
            self._uids[record.uid] = st.uid
            while len(self._uids) > RECENT_UIDS:
                self._uids.popitem(last=False)
        fields = {}
        if st.l7 is not None:
            fields = self.engine.flow_fields(st)
            # The kernel's accounting is per wire octet and complete (captured,
            # truncated by the budget, skipped on request, gap when the ring was full);
            # the record keeps it. Userspace losses are LostEvents (reassembly_*).
            fields.pop("l7_coverage", None)
        self.stats.joined += 1
        return dataclasses.replace(record, uid=st.uid, **fields)

    def _forget(self, lf: _LiveFlow) -> None:
        self._flows.pop((lf.key, lf.incarnation), None)
        if self._by_key.get(lf.key) is lf:
            del self._by_key[lf.key]

    def expire(self, now_mono: int) -> None:
        """Drops L7 states whose flow record never came (their flow left the map in a way
        the reader did not report, e.g. a sensor restart race): bounded memory."""
        stale = [lf for lf in self._flows.values() if now_mono - lf.last_mono > self.expire_ns]
        for lf in stale:
            self._current = lf
            try:
                self.engine.flow_ending(lf.state)
            finally:
                self._current = None
            self._forget(lf)
            self.stats.expired += 1

    def flush_all(self) -> None:
        """At shutdown, for flows whose record will not come: their last transactions."""
        self.expire(now_mono=1 << 62)


# ---- the sensor ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class LiveConfig:
    interfaces: tuple[str, ...]
    netns: str = ""                          # attach inside this network namespace
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    timeouts: Timeouts = DEFAULT_TIMEOUTS
    sensor_id: str = ""
    flow_map_size: int = 65536
    ringbuf_pages: int = 1024                # 4 MiB: ~2000 full payload chunks
    l7: bool = True
    refill_octets: int = DEFAULT_REFILL_OCTETS
    reassembly_budget_bytes: int = 64 << 20
    interval_s: float = DEFAULT_INTERVAL_S
    process_attribution: bool = True
    redact: bool = True                      # [redaction] enabled: HTTP credentials
    # [tls_plaintext]: a sensor.engine.plaintext_live.PlaintextConfig, or None (off)
    tls_plaintext: object | None = None
    # [rules]: a rule directory or file, or "default" (sensor/rules/); "" is off
    rules: str = ""
    # [pii]: a sensor.l7.pii.Scanner, or None (off)
    pii: object | None = None
    # [geoip]: an open sensor.enrich.geo.GeoEnricher, or None (off); closed with the sensor
    geo: object | None = None
    # [enforce]: the bpffs directory for the verdict maps' pins (sensor/enforce/), or
    # None: block verdicts are not enforced
    enforce_pin_dir: str | None = None
    # [enforce] hold, hold_max, hold_nudge: held services (sensor.enforce.hold.HeldService)
    enforce_hold: tuple = ()
    enforce_hold_max_ns: int = 10**9
    enforce_hold_nudge: bool = True
    # [ddos]: a sensor.rules.ddos.Settings, or None (off)
    ddos: object | None = None

    def __post_init__(self) -> None:
        if not self.interfaces:
            raise InterfaceError("no interface to attach to: name one with --iface, or set "
                                 "interfaces in sensor.toml")
        if self.interval_s <= 0:
            raise ValueError("interval_s must be positive")


_CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Runs the block with this thread inside network namespace `name` (a name under
    /var/run/netns or a path), then returns to the original one. Netlink sockets opened
    inside (the TC attach) belong to that namespace; BPF maps and the ring buffer do
    not belong to any, so the sensor keeps running in its own."""
    if not name:
        yield
        return
    path = name if "/" in name else f"/var/run/netns/{name}"
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        target = os.open(path, os.O_RDONLY)
    except OSError:
        raise InterfaceError(f"no network namespace {name!r} ({path}): see `ip netns list`") \
            from None
    original = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        if libc.setns(target, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise KernelError(f"cannot enter network namespace {name!r}: {os.strerror(err)}; "
                              "that needs root (CAP_SYS_ADMIN)")
        try:
            yield
        finally:
            libc.setns(original, _CLONE_NEWNET)
    finally:
        os.close(original)
        os.close(target)


def default_interfaces() -> tuple[str, ...]:
    """Every interface that is up, except loopback (sensor.toml's interfaces = [])."""
    out = []
    for entry in sorted(Path("/sys/class/net").iterdir()):
        try:
            flags = int((entry / "flags").read_text(), 16)
        except (OSError, ValueError):
            continue
        if flags & 0x1 and not flags & 0x8:   # IFF_UP, not IFF_LOOPBACK
            out.append(entry.name)
    return tuple(out)


@dataclass(slots=True)
class LiveTotals:
    """Cumulative counts for metrics and the closing line."""

    records: dict[str, int] = field(default_factory=dict)     # handed to the exporter
    submit_refused: int = 0                                    # exporter queue full
    lost: dict[str, int] = field(default_factory=dict)        # LostSource value -> count
    kernel: dict[str, int] = field(default_factory=dict)      # kernel counters by name
    cycles: int = 0
    reloads: int = 0


class Enricher(Protocol):
    """Process attribution (sensor.enrich.process.ProcessAttributor), or a test's fake."""

    def enrich(self, flow: Flow) -> Flow: ...

    def close(self) -> None: ...


class LiveSensor:
    """Build, start(), then step() until told to stop, then stop() exactly once."""

    def __init__(self, config: LiveConfig, exporter, *, clock: Clock | None = None,
                 on_verdict: Callable | None = None) -> None:
        self.config = config
        self.exporter = exporter
        # Where rule verdicts go (sensor/rules/engine.Verdict, `block` only): kernel
        # enforcement plugs in here; it is called on the loop thread, so it must not block.
        self.on_verdict = on_verdict
        self.clock = clock or SystemClock()
        self.totals = LiveTotals()
        self.prog = None
        self.kernel: KernelSensor | None = None
        self.l7: LiveL7 | None = None
        self.watcher: CounterWatcher | None = None
        self.attachments: list[attach.Attachment] = []
        self.attributor: Enricher | None = None
        self.plaintext = None   # sensor.engine.plaintext_live.PlaintextSensor when enabled
        self.enforcer = None    # sensor.enforce.enforcer.Enforcer when enforcing
        self.ddos = None        # sensor.rules.ddos_live.DdosLive when [ddos] is on
        self._pinned = False
        self._next_read = 0.0
        self._backlog = False
        self._last = dict(queue_full=0, parser_errors=0, gaps=0, memory_drops=0)
        self._stopped = False
        self._last_wall = 0
        self._started_mono = time.monotonic()

    # -- start-up ----------------------------------------------------------------------------

    def start(self, after_attach: Callable[[], None] | None = None) -> None:
        """Load, attach, then `after_attach` (the daemon drops its privileges there: what
        follows needs only CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN), then the exporter
        (the caller says READY after this). On failure everything started is undone."""
        from sensor.kernel import loader  # noqa: PLC0415 (bcc only when running live)

        cfg = self.config
        with in_netns(cfg.netns):
            for iface in cfg.interfaces:
                attach.meterable_interface(iface)   # fail before the seconds of compiling
        self.prog = loader.load(loader.LoadOptions(flow_map_size=cfg.flow_map_size,
                                                   ringbuf_pages=cfg.ringbuf_pages))
        try:
            self.kernel = KernelSensor(self.prog, self.clock, selection=cfg.selection,
                                       timeouts=cfg.timeouts, sensor_id=cfg.sensor_id)
            self.watcher = CounterWatcher(self.prog.counters_fd, sensor_id=cfg.sensor_id)
            if cfg.enforce_pin_dir is not None:
                self._open_enforcer()
            if cfg.l7:
                self.l7 = LiveL7(emit=self._submit, control=KernelControl(
                    self.kernel, self.prog.flows_fd), sensor_id=cfg.sensor_id,
                    budget=cfg.selection.budget, refill_octets=cfg.refill_octets,
                    reassembly_budget_bytes=cfg.reassembly_budget_bytes,
                    expire_ns=cfg.timeouts.tcp_idle_ns + cfg.timeouts.tcp_end_linger_ns
                    + 60 * 10**9, redact=cfg.redact, rules=cfg.rules, pii=cfg.pii,
                    on_verdict=self.on_verdict or (self.enforcer.on_verdict
                                                   if self.enforcer is not None else None),
                    on_pass=self.enforcer.on_pass if self.enforcer is not None else None)
            if cfg.ddos is not None:
                self._open_ddos()
            if cfg.process_attribution:
                self._open_attribution()
            if cfg.tls_plaintext is not None:
                self._open_plaintext()
            with in_netns(cfg.netns):
                for iface in cfg.interfaces:
                    self.attachments.append(attach.attach(iface, self.prog.prog_fd))
            if after_attach is not None:
                after_attach()
            if self.enforcer is not None:
                # Compiling, attaching and the rest took seconds since the enforcer's
                # first heartbeat: beat now, so verdicts and holds are honoured from the
                # first packet after start (the loop's first step may come later).
                self.enforcer.tick()
        except BaseException:
            self._detach()
            self._close_attribution()
            self._close_plaintext()
            self._close_enforcer()
            self._close_kernel()
            raise
        start = getattr(self.exporter, "start", None)
        if start is not None:
            start()
        self._next_read = time.monotonic() + cfg.interval_s

    def _open_attribution(self) -> None:
        from sensor.enrich.process import ProcessAttributor  # noqa: PLC0415

        attributor = None
        try:
            attributor = ProcessAttributor.open()
            attributor.start()
        except LoupeError as exc:
            # Flows are worth having without their processes: go on, say why (one line).
            log.warning("process attribution off: %s", exc)
            if attributor is not None:
                attributor.close()
            return
        self.attributor = attributor

    def _open_plaintext(self) -> None:
        from sensor.engine.plaintext_live import PlaintextSensor  # noqa: PLC0415

        cfg = self.config
        self.plaintext = PlaintextSensor(
            cfg.tls_plaintext, emit=self._submit, origin=self._flow_origin,
            uid_of=self._wire_uid, sensor_id=cfg.sensor_id, redact=cfg.redact,
            refill_octets=cfg.refill_octets, client_auth_of=self._wire_client_auth,
            rules=self.l7.rules if self.l7 is not None else None)
        self.plaintext.start(self.prog.add_ring)

    def _flow_origin(self, key: bytes) -> tuple[int, int] | None:
        """(initiator side, first packet's kernel ns) of the kernel flow with this key
        (ifindex 0) on any attached interface, for plaintext chunks to join it."""
        for att in self.attachments:
            k = abi.FlowKey.from_buffer_copy(key)
            k.ifindex = att.ifindex
            value = abi.FlowValue()
            if bpfsys.lookup(self.prog.flows_fd, k, value, lock=True):
                return value.initiator & 1, value.first_ns
        return None

    def _wire_flows(self, key: bytes):
        """The wire L7 stage's flows for this key (ifindex 0), one per attached interface
        that has it."""
        if self.l7 is None:
            return
        for att in self.attachments:
            k = abi.FlowKey.from_buffer_copy(key)
            k.ifindex = att.ifindex
            lf = self.l7._by_key.get(bytes(k))
            if lf is not None:
                yield lf

    def _wire_uid(self, key: bytes) -> str | None:
        """The uid the wire L7 stage gave this flow (key with ifindex 0), if it has it."""
        return next((lf.state.uid for lf in self._wire_flows(key)), None)

    def _wire_client_auth(self, key: bytes) -> tuple[bool, str] | None:
        """Whether the wire's TLS handshake of this flow (key with ifindex 0) showed a
        client certificate (TlsParser.client_auth), None while not known: the wire stage
        must have parsed the handshake, so mTLS is seen only on attached interfaces."""
        for lf in self._wire_flows(key):
            st = lf.state.l7
            client_auth = getattr(st.parser, "client_auth", None) if st is not None else None
            if client_auth is not None:
                return client_auth()
        return None

    def _close_plaintext(self) -> None:
        if self.plaintext is not None:
            self.plaintext.close()
            self.plaintext = None

    def _close_attribution(self) -> None:
        if self.attributor is not None:
            self.attributor.close()
            self.attributor = None
        if self.config.geo is not None:
            self.config.geo.close()

    def attached(self) -> list[str]:
        return [a.iface for a in self.attachments]

    # -- the loop ----------------------------------------------------------------------------

    def step(self, poll_ms: int = POLL_MS) -> None:
        """One iteration: poll the ring buffer (until an event, the next read, or poll_ms),
        run L7 on the queued payload, read the flow map when due (every interval, or at
        once after a flow-end event)."""
        kernel = self.kernel
        if self._backlog:
            poll_ms = 0   # payload queued beyond the last step's share: no waiting
        else:
            poll_ms = max(0, min(poll_ms, math.ceil((self._next_read - time.monotonic()) * 1000)))
        kernel.poll(poll_ms)
        self._backlog = self._payload() >= EVENTS_PER_STEP
        if self.enforcer is not None:
            self.enforcer.tick()   # heartbeat and expiry, once a second
        if self.ddos is not None:
            self.ddos.step()       # slow heads, the detector's clock, rate-limit expiry
        if self.plaintext is not None:
            # After the wire's payload: a flow's handshake reaches the wire L7 stage (and
            # gets its uid) before its plaintext does.
            self.plaintext.step(wall_offset_ns(self.clock), self.clock.monotonic_ns())
            self._backlog = self._backlog or self.plaintext.backlog
        now = time.monotonic()
        if now >= self._next_read or kernel.reader.end_seen:
            retired = kernel.reader.stats.retired
            self._cycle()
            self._next_read = now + (RETIRE_SETTLE_S if kernel.reader.stats.retired > retired
                                     else self.config.interval_s)

    def _payload(self, limit: int = EVENTS_PER_STEP) -> int:
        """Runs L7 on at most `limit` queued payload events; how many there were."""
        l7 = self.l7
        kernel = self.kernel
        n = 0
        if l7 is None:
            for _ in kernel.payload_events():
                n += 1   # selection is off in the kernel; nothing should come, none kept
            return n
        offset = wall_offset_ns(self.clock)
        mono = self.clock.monotonic_ns()
        for ev in kernel.payload_events(limit):
            l7.on_payload(ev, offset, mono)
            n += 1
        return n

    def _cycle(self) -> None:
        self.totals.cycles += 1
        self._export_flows(self.kernel.reader.collect())
        self._report_losses()
        if self.l7 is not None:
            self.l7.expire(self.clock.monotonic_ns())
        if self.plaintext is not None:
            self.plaintext.expire(self.clock.monotonic_ns())

    def _export_flows(self, flows: list[Flow]) -> None:
        l7 = self.l7
        att = self.attributor
        geo = self.config.geo
        for flow in flows:
            if l7 is not None:
                flow = l7.join(flow)
            if self.plaintext is not None:
                flow = self.plaintext.join(flow)
            if att is not None:
                flow = att.enrich(flow)
            if geo is not None:
                flow = geo.enrich(flow)
            self._submit(flow)

    def _submit(self, record: Record) -> None:
        if self.ddos is not None:
            self.ddos.observe(record)
        kind = record_kind(record)
        recs = self.totals.records
        recs[kind] = recs.get(kind, 0) + 1
        if not self.exporter.submit(record):
            self.totals.submit_refused += 1

    def _report_losses(self) -> None:
        wall = self.clock.wall_ns()
        losses = list(self.watcher.poll(wall))
        start = self._last_wall or wall
        self._last_wall = wall
        extra: dict[str, int] = {}
        ks = self.kernel.stats
        # Payload events the kernel sent but the userspace queue had no room for: to
        # an analyst the same loss as a full ring buffer (payload not seen).
        extra[LostSource.KERNEL_RINGBUF_FULL.value] = ks.queue_full - self._last["queue_full"]
        self._last["queue_full"] = ks.queue_full
        if self.l7 is not None:
            ls = self.l7.engine.stats
            for attr, source in (("parser_errors", LostSource.PARSER_ERROR),
                                 ("gaps", LostSource.REASSEMBLY_GAP),
                                 ("memory_drops", LostSource.REASSEMBLY_MEMORY)):
                value = getattr(ls, attr)
                extra[source.value] = value - self._last[attr]
                self._last[attr] = value
        if self.plaintext is not None:
            for source, count in self.plaintext.losses().items():
                extra[source] = extra.get(source, 0) + count
        for source, count in extra.items():
            if count > 0:
                losses.append(LostEvent(source=source, count=count, interval_start_ns=start,
                                        interval_end_ns=wall, sensor_id=self.config.sensor_id))
        lost = self.totals.lost
        for event in losses:
            lost[event.source] = lost.get(event.source, 0) + event.count
            self._submit(event)

    # -- reload ------------------------------------------------------------------------------

    def reload_rules(self) -> int:
        """Re-read the rule files (SIGHUP): the new set applies from the next L7 event on;
        flows, their L7 state and threshold windows are untouched, so nothing is lost.
        A bad file raises (the caller keeps the running set). Returns the rule count."""
        if self.l7 is None or self.l7.rules is None:
            return 0
        from sensor.rules import loader  # noqa: PLC0415

        rules = loader.load(self.config.rules)
        self.l7.rules.reload(rules)
        return len(rules.rules)

    def reload(self, selection: SelectionConfig, refill_octets: int | None = None) -> None:
        """New selection and budgets for new flows; live flows keep theirs."""
        self.kernel.reload_selection(selection)
        if self.l7 is not None:
            self.l7.budget = selection.budget
            if refill_octets is not None:
                self.l7.refill_octets = refill_octets
        self.totals.reloads += 1

    # -- shutdown ------------------------------------------------------------------------------

    def stop(self, export_timeout_s: float = 10.0) -> None:
        """Stop capture (detach), drain the ring buffer and the payload queue, retire every
        flow (FORCED_END, or END_OF_FLOW for TCP flows that had ended), join and export
        them, report the last losses, close the exporter (what is not acked stays in
        its spool), release the kernel program."""
        if self._stopped:
            return
        self._stopped = True
        try:
            # A start that failed half-way has closed the kernel program already
            # (prog None): there is nothing left to drain.
            if self.kernel is not None and self.prog is not None:
                self._detach()
                time.sleep(DETACH_SETTLE_S)
                self.kernel.poll(0)
                while self._drain_payload():
                    self.kernel.poll(0)
                self.kernel.reader.drain()
                self.kernel.poll(0)
                while self._drain_payload():
                    self.kernel.poll(0)
                if self.plaintext is not None:
                    self.plaintext.step(wall_offset_ns(self.clock), self.clock.monotonic_ns())
                self._export_flows(self.kernel.reader.flush())
                if self.l7 is not None:
                    self.l7.flush_all()
                if self.plaintext is not None:
                    self.plaintext.flush_all()
                self._report_losses()
                self.totals.kernel = {c.name.lower(): v for c, v in self.watcher.totals().items()}
        finally:
            self._close_attribution()
            self._close_plaintext()
            self._close_enforcer()
            self.exporter.close(export_timeout_s)
            self._close_kernel()

    def _drain_payload(self) -> bool:
        before = self.l7.stats.payload_events if self.l7 is not None else 0
        self._payload(limit=1 << 30)
        return self.l7 is not None and self.l7.stats.payload_events != before

    def _detach(self) -> None:
        with in_netns(self.config.netns):
            for att in self.attachments:
                try:
                    attach.detach(att)
                except LoupeError as exc:
                    log.error("detaching from %s: %s", att.iface, exc)
        self.attachments = []

    def _open_enforcer(self) -> None:
        """Block verdicts into the kernel (sensor/enforce/): the maps pinned for `loupe
        block`, raw sockets for the resets opened in the sensor's namespace."""
        from sensor.enforce import enforcer, hold, maps, pins, rst  # noqa: PLC0415

        m = maps.BlockMaps(self.prog.block_cfg_fd, self.prog.block_flow_fd,
                           self.prog.block_src_fd)
        held = hold.HoldMaps(self.prog.hold_svc_fd, self.prog.hold_req_fd,
                             self.prog.hold_ok_fd)
        resets = None
        try:
            with in_netns(self.config.netns):
                resets = rst.ResetSender()
        except PermissionError as exc:
            log.warning("enforcement: no TCP resets (raw sockets need CAP_NET_RAW: %s); "
                        "blocked flows are dropped, their ends are not told", exc)
        hold_services = self.config.enforce_hold
        if hold_services and not (self.config.l7 and self.config.rules):
            # Only the rules' verdicts release a held response: without them every
            # response of a held service would wait hold_max.
            log.warning("enforcement: [enforce] hold needs L7 parsing and [rules]; "
                        "nothing is held")
            hold_services = ()
        self.enforcer = enforcer.Enforcer(
            m, current_flow=lambda: self.l7.current_flow() if self.l7 is not None else None,
            resets=resets, hold=held, hold_services=hold_services,
            hold_max_ns=self.config.enforce_hold_max_ns,
            nudge=self.config.enforce_hold_nudge)
        pin_dir = self.config.enforce_pin_dir
        try:
            pins.ensure_bpffs(pin_dir)
            self._pinned = pins.pin_maps(m, pin_dir)
        except (LoupeError, OSError) as exc:
            log.warning("enforcement: not pinned under %s (%s); `loupe block` cannot reach "
                        "this sensor", pin_dir, exc)
        else:
            if not self._pinned:   # one sensor per namespace is a normal setup
                log.info("enforcement: %s belongs to another running sensor; `loupe "
                            "block` reaches that one, not this", pin_dir)

    def _open_ddos(self) -> None:
        """The DDoS detector (sensor/rules/ddos_live.py): fed by _submit, the flow map's
        snapshots and step(); mitigates through the enforcer's maps."""
        from sensor.rules.ddos_live import DdosLive  # noqa: PLC0415

        self.ddos = DdosLive(self.config.ddos, self._submit, wall=self.clock.wall_ns,
                             l7=self.l7, enforcer=self.enforcer,
                             rate_fd=self.prog.rate_src_fd, sensor_id=self.config.sensor_id)
        self.kernel.reader.on_snapshot = self.ddos.on_snapshot

    def _close_enforcer(self) -> None:
        if self.ddos is not None:
            self.ddos.close()
        if self.enforcer is None:
            return
        if self._pinned:
            from sensor.enforce import pins  # noqa: PLC0415

            try:
                pins.unpin(self.config.enforce_pin_dir)
            except OSError as exc:   # privileges dropped: the next sensor replaces them
                log.warning("enforcement: pins under %s stay (%s)",
                            self.config.enforce_pin_dir, exc)
            self._pinned = False
        self.enforcer.close()
        self.enforcer = None

    def _close_kernel(self) -> None:
        if self.prog is not None:
            self.prog.close()
            self.prog = None
        # Its ring buffer is gone with it: nothing may poll it again.
        self.kernel = None

    # -- observability -------------------------------------------------------------------------

    def kernel_counters(self) -> dict[str, int]:
        if self.watcher is None or self.prog is None:
            return dict(self.totals.kernel)
        return {c.name.lower(): v for c, v in self.watcher.totals().items()}

    def metrics(self) -> dict:
        """A snapshot for sensor.metrics (read on the metrics thread: plain reads only)."""
        t = self.totals
        lost = {k: v for k, v in t.lost.items()}
        out = {"lost": lost, "records_exported": dict(t.records),
               "flows_active": len(self.l7) if self.l7 is not None else 0}
        enforcer = self.enforcer
        if enforcer is not None:
            e = enforcer.stats
            out["enforcement"] = {
                "flows_blocked": e.flows_blocked, "sources_blocked": e.sources_blocked,
                "resets_sent": e.resets_sent, "resets_skipped": e.resets_skipped,
                "map_full": e.map_full, "write_errors": e.write_errors, "expired": e.expired,
                "holds_released": e.holds_released, "held_blocks": e.held_blocks,
                "nudges_sent": e.nudges_sent}
        if self.ddos is not None:
            out["ddos"] = self.ddos.metrics()
        return out

    def status(self) -> str:
        t = self.totals
        l7 = self.l7.stats if self.l7 is not None else None
        flows = t.records.get("flow", 0)
        events = sum(v for k, v in t.records.items() if k not in ("flow", "lost"))
        text = (f"running; attached {','.join(self.attached()) or 'nothing'}; "
                f"{flows} flows, {events} L7 events")
        if l7 is not None:
            text += f", payload {l7.payload_octets} octets"
        if self.plaintext is not None:
            text += f", TLS plaintext {self.plaintext.l7.stats.octets} octets"
        lost = sum(t.lost.values())
        return text + (f"; lost {lost}" if lost else "; nothing lost")
