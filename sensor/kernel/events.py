"""Decoding the flow meter's ring buffer events (bpf/loupe.h, struct loupe_event_hdr
and what follows). Sans-I/O: bytes in, a frozen event out; the loader delivers the
bytes and sensor/kernel/flowmap.py acts on them.

Unknown event types (a newer program) and short events are counted and skipped, never
fatal.
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


@dataclass(frozen=True, slots=True, kw_only=True)
class PayloadEvent:
    """One chunk of payload of a selected flow (bpf/loupe.h struct loupe_payload_event).
    An event with empty data and SYN, FIN or RST in tcp_flags marks a stream's start or
    end."""

    key: bytes            # the raw struct loupe_flow_key (ifindex included)
    incarnation: int
    direction: int        # abi.PL_TO_RESPONDER (sent by the initiator) or PL_TO_INITIATOR
    seq: int              # TCP sequence number of data[0] (0 for UDP)
    ack: int
    tcp_flags: int
    payload_len: int      # payload octets of the whole packet
    offset: int           # where data starts within that payload
    data: bytes
    l7_select: int        # the flow's abi.SEL_* bits
    ts_ns: int            # kernel monotonic ns
    flags: int = 0        # frames.PLF_*: the kernel's frame walk (bpf/frames.h)


Event = FlowEnd | LateUpdate | PayloadEvent


@dataclass(slots=True)
class EventDecoder:
    """Turns raw events into FlowEnd / LateUpdate, counting what it cannot."""

    unknown: int = 0
    malformed: int = 0
    decoded: dict[str, int] = field(default_factory=lambda: {"flow_end": 0, "late_update": 0,
                                                             "payload": 0})

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
        if hdr.type == abi.EventType.PAYLOAD:
            size = abi.PAYLOAD_EVENT_SIZE
            if len(raw) < size:
                self.malformed += 1
                return None
            pe = abi.PayloadEvent.from_buffer_copy(raw[:size])
            if len(raw) < size + pe.cap_len:
                self.malformed += 1
                return None
            self.decoded["payload"] += 1
            return PayloadEvent(key=bytes(pe.key), incarnation=pe.incarnation,
                                direction=pe.dir, seq=pe.seq, ack=pe.ack,
                                tcp_flags=pe.tcp_flags, payload_len=pe.payload_len,
                                offset=pe.offset, data=bytes(raw[size:size + pe.cap_len]),
                                l7_select=pe.l7_select, ts_ns=hdr.ts_ns, flags=pe.flags)
        self.unknown += 1
        return None
