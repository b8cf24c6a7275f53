"""Decoding the flow meter's ring buffer events (bpf/loupe.h, struct loupe_event_hdr
and what follows). Sans-I/O: bytes in, a frozen event out; the loader delivers the
bytes and sensor/kernel/flowmap.py acts on them.

Unknown event types (a newer program, payload chunks this reader does not handle) and
short events are counted and skipped, never fatal.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

from sensor.kernel import abi


@dataclass(frozen=True, slots=True, kw_only=True)
class FlowEnd:
    key: bytes            # the raw struct loupe_flow_key
    incarnation: int
    end_reason: int       # abi.END_RST or abi.END_FIN
    ts_ns: int            # kernel monotonic ns


@dataclass(frozen=True, slots=True, kw_only=True)
class LateUpdate:
    key: bytes
    incarnation: int
    ordinal: int
    dir: int
    tcp_flags: int
    packets: int
    ip_bytes: int
    l2_bytes: int
    ts_ns: int


Event = FlowEnd | LateUpdate


@dataclass(slots=True)
class EventDecoder:
    """Turns raw events into FlowEnd / LateUpdate, counting what it cannot."""

    unknown: int = 0
    malformed: int = 0
    decoded: dict[str, int] = field(default_factory=lambda: {"flow_end": 0, "late_update": 0})

    def decode(self, raw: bytes) -> Event | None:
        if len(raw) < abi.EVENT_HDR_SIZE:
            self.malformed += 1
            return None
        hdr = abi.EventHdr.from_buffer_copy(raw[:abi.EVENT_HDR_SIZE])
        if hdr.type == abi.EventType.FLOW_END:
            if len(raw) < ctypes.sizeof(abi.FlowEndEvent):
                self.malformed += 1
                return None
            ev = abi.FlowEndEvent.from_buffer_copy(raw[:ctypes.sizeof(abi.FlowEndEvent)])
            self.decoded["flow_end"] += 1
            return FlowEnd(key=bytes(ev.key), incarnation=ev.incarnation,
                           end_reason=ev.end_reason, ts_ns=hdr.ts_ns)
        if hdr.type == abi.EventType.LATE_UPDATE:
            if len(raw) < ctypes.sizeof(abi.LateUpdateEvent):
                self.malformed += 1
                return None
            lu = abi.LateUpdateEvent.from_buffer_copy(raw[:ctypes.sizeof(abi.LateUpdateEvent)])
            self.decoded["late_update"] += 1
            return LateUpdate(key=bytes(lu.key), incarnation=lu.incarnation, ordinal=lu.ordinal,
                              dir=lu.dir, tcp_flags=lu.tcp_flags, packets=lu.packets,
                              ip_bytes=lu.ip_bytes, l2_bytes=lu.l2_bytes, ts_ns=hdr.ts_ns)
        self.unknown += 1
        return None
