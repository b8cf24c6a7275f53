"""Reading flows out of the kernel's flow map and turning them into Flow records.

Every cycle (collect()) the reader takes a locked snapshot of the map
(BPF_MAP_LOOKUP_BATCH with BPF_F_LOCK: each entry is copied under its spin lock, so no
entry is seen half-way through a locked update) and decides per entry:
- ended (RST, or FIN both ways) and lingered for Timeouts.tcp_end_linger_ns: retire,
  flow_end_reason END_OF_FLOW;
- idle for longer than its idle timeout: retire, IDLE_TIMEOUT;
- open for longer than the active timeout since its last record: an interim record,
  ACTIVE_TIMEOUT, same uid, counters since the previous record. The entry stays in
  the map; its kernel counters are cumulative and the reader keeps what it already
  reported (a cursor), so interim records lose and repeat nothing. (A packet on the
  kernel's lock-free path may be half in one snapshot: then the two records of the
  flow on either side of it share that packet's fields; their sums are exact.)

Never losing nor double-counting across a read
  A retire is BPF_MAP_LOOKUP_AND_DELETE_ELEM with BPF_F_LOCK: the kernel copies the
  value under the entry's spin lock and unlinks it in the same step. Per-direction
  counters live in that one value (not per CPU), so the copy is one consistent sum
  (the lock-free path never races a retire: bpf/flow.c).
  A packet whose program had already looked the entry up may still add itself after
  the copy; the program notices (its second lookup finds no entry, or another
  incarnation) and sends a LATE_UPDATE event with the ordinal of its update. The
  copied value says how many updates it holds (`updates`), so the reader adds exactly
  the late packets with a higher ordinal. Retired records are therefore emitted one
  cycle later, after the ring buffer has been drained. A late packet arriving after its
  record was emitted becomes a small record of its own with the same uid.

When a retire may race a packet
  The program double-checks only updates that could race an unlink (bpf/flow.c,
  "Reading without losing"), which holds because this reader retires an entry only if
  its snapshot shows it ENDED (for at least its linger and RETIRE_GUARD_NS) or idle for
  at least 2 * abi.RETIRE_GUARD_NS (idle timeouts below that are refused), and only
  within RETIRE_GUARD_NS / 2 of taking the snapshot; a retire that would come later
  waits for the next cycle (stats.deferred).
  The time is read before the snapshot, so "idle" is never overstated.

Records: the initiator is src (first pure SYN, else first packet). conn_state follows
sensor.flow.semantics.conn_state for TCP and conn_state_other for the rest; SYN/FIN/
RST counts are those since the previous record of the flow (semantics.py). history
(Zeek's per-packet letter string) is left empty live: the kernel keeps OR-ed flags per
direction, not the packet order history needs, and storing it would cost an unbounded
string per flow in the kernel; replay, which sees every packet, fills it. l7_coverage
comes from the kernel's per-direction payload accounting (coverage()).
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import mmap
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from sensor.clock import Clock, kernel_to_wall_ns, wall_offset_ns
from sensor.flow.community_id import DEFAULT as DEFAULT_CID
from sensor.flow.community_id import CommunityId, icmp_ports
from sensor.flow.flowkey import flow_uid
from sensor.flow.semantics import (
    DEFAULT_TIMEOUTS, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, SideFlags, Timeouts, conn_state,
    conn_state_other,
)
from sensor.kernel import abi, bpfsys
from sensor.kernel.events import Event, FlowEnd, LateUpdate
from sensor.model import Flow, FlowEndReason, L7Coverage

log = logging.getLogger(__name__)

# Entries per BPF_MAP_LOOKUP_BATCH call: 1024 * (48 + 168) B = 216 KiB of buffers, few
# enough syscalls for a full 65536-entry map (64 calls).
BATCH = 1024

# Retired entries remembered after their record was emitted, to match late packets.
# Late events arrive within microseconds of the retire; this only needs to cover one
# cycle's retirements, and is bounded so a storm of retirements cannot grow it.
RECENT_RETIRED = 65536


@dataclass(slots=True)
class _Counts:
    packets: int = 0
    ip_bytes: int = 0
    l2_bytes: int = 0
    tcp_flags: int = 0


@dataclass(slots=True)
class _Cursor:
    """What was already reported of one flow entry (one incarnation)."""

    uid: str
    period_start_ns: int                 # kernel ns where the next record starts
    community_id: str = ""
    sent: list[_Counts] = field(default_factory=lambda: [_Counts(), _Counts()])
    sent_flags: tuple[int, int, int] = (0, 0, 0)   # SYN, FIN, RST counts reported


@dataclass(slots=True)
class _Retired:
    key: abi.FlowKey
    value: abi.FlowValue
    reason: FlowEndReason
    cursor: _Cursor
    late: list[_Counts] = field(default_factory=lambda: [_Counts(), _Counts()])
    late_last_ns: int = 0


@dataclass(slots=True)
class ReaderStats:
    snapshots: int = 0
    retired: int = 0
    interim: int = 0
    late_merged: int = 0
    late_after_emit: int = 0
    late_unmatched: int = 0
    flow_end_events: int = 0
    deferred: int = 0       # retires put off to the next cycle: the snapshot was too old
    empty_final: int = 0    # final records not written: nothing new since the interim one


_KEY_DTYPE = np.dtype(abi.FlowKey)
_VALUE_DTYPE = np.dtype(abi.FlowValue)


class _Snapshot:
    """Buffers for one whole-map snapshot, allocated once: the map's max_entries keys
    and values (65536 entries: 20 MiB). They lie in an anonymous mmap, whose pages become
    resident only when written: the kernel fills the first n entries, so a sensor holds
    what its flows have needed, not the whole 20 MiB (a ctypes array zeroes, and so
    touches, all of itself)."""

    def __init__(self, entries: int) -> None:
        key_bytes = ctypes.sizeof(abi.FlowKey) * entries
        self._memory = mmap.mmap(-1, key_bytes + ctypes.sizeof(abi.FlowValue) * entries)
        self.keys = (abi.FlowKey * entries).from_buffer(self._memory)
        self.values = (abi.FlowValue * entries).from_buffer(self._memory, key_bytes)


def _addr(raw, version: int) -> str:
    data = bytes(raw)
    return str(ipaddress.ip_address(data[:4] if version == 4 else data[:16]))


class FlowMapReader:
    """Reads, retires and reports the flows of one loaded flow meter."""

    def __init__(self, flows_fd: int, clock: Clock, *, timeouts: Timeouts = DEFAULT_TIMEOUTS,
                 sensor_id: str = "",
                 on_retire: Callable[[bytes], None] | None = None,
                 community: CommunityId = DEFAULT_CID) -> None:
        floor = 2 * abi.RETIRE_GUARD_NS
        if min(timeouts.tcp_idle_ns, timeouts.other_idle_ns) < floor:
            raise ValueError(f"idle timeouts must be at least {floor / 1e9:g} s: the kernel "
                             "program double-checks only flows idle for half of that")
        self._fd = flows_fd
        self._on_retire = on_retire   # told the key of every retired selected flow
        self._community = community
        self._clock = clock
        self._timeouts = timeouts
        self._sensor_id = sensor_id
        self._cursors: dict[tuple[bytes, int], _Cursor] = {}
        self._pending: dict[tuple[bytes, int], _Retired] = {}
        self._recent: OrderedDict[tuple[bytes, int], _Retired] = OrderedDict()
        self._leftovers: list[Flow] = []
        self._snapshot = _Snapshot(bpfsys.map_max_entries(flows_fd))
        self.stats = ReaderStats()
        self.end_seen = False   # a flow-end event arrived: the caller may collect early
        # Told each whole-map snapshot (keys, values: numpy views, valid during the call):
        # the DDoS detector counts new flows there (sensor/rules/ddos_live.py).
        self.on_snapshot: Callable | None = None

    # ---- events -------------------------------------------------------------------

    def on_event(self, event: Event | None) -> None:
        if isinstance(event, FlowEnd):
            self.stats.flow_end_events += 1
            self.end_seen = True
        elif isinstance(event, LateUpdate):
            self._on_late(event)

    def _on_late(self, ev: LateUpdate) -> None:
        ident = (ev.key, ev.incarnation)
        entry = self._pending.get(ident)
        after_emit = False
        if entry is None:
            entry = self._recent.get(ident)
            after_emit = entry is not None
        if entry is None:
            # Not retired by this reader (another reader on the same map, or more than
            # RECENT_RETIRED retirements ago): without the copied ordinal we cannot
            # tell whether the packet is already reported, so it is counted here
            # (stats.late_unmatched, shown on exit) rather than guessed at.
            self.stats.late_unmatched += 1
            return
        if ev.ordinal <= entry.value.updates:
            return  # the copy already holds this packet
        if after_emit:
            self.stats.late_after_emit += 1
            late = [_Counts(), _Counts()]
            self._add(late[ev.dir & 1], ev)
            self._leftovers.append(self._build(entry.key, entry.value, entry.cursor,
                                               entry.reason, late=late, counters=None,
                                               last_ns=ev.ts_ns, offset=wall_offset_ns(self._clock)))
            return
        self.stats.late_merged += 1
        self._add(entry.late[ev.dir & 1], ev)
        entry.late_last_ns = max(entry.late_last_ns, ev.ts_ns)

    @staticmethod
    def _add(c: _Counts, ev: LateUpdate) -> None:
        c.packets += ev.packets
        c.ip_bytes += ev.ip_bytes
        c.l2_bytes += ev.l2_bytes
        c.tcp_flags |= ev.tcp_flags

    # ---- cycles -------------------------------------------------------------------

    def collect(self) -> list[Flow]:
        """One cycle: emit the records retired last cycle (their late packets have been
        delivered by now), then retire and report what is due in the map."""
        offset = wall_offset_ns(self._clock)
        out = self._emit_pending(offset)
        self.end_seen = False
        now = self._clock.monotonic_ns()
        t = self._timeouts
        fresh_until = now + abi.RETIRE_GUARD_NS // 2
        # ENDED closes the kernel's lock-free path; a packet that took it just before
        # has finished long before RETIRE_GUARD_NS (bpf/flow.c).
        ended_wait = max(t.tcp_end_linger_ns, abi.RETIRE_GUARD_NS)
        # Decide for all entries at once (numpy over the snapshot's raw arrays); only
        # the entries that are due become Python objects.
        keys, values = self._snapshot.keys, self._snapshot.values
        n = bpfsys.lookup_batch_into(self._fd, keys, values, batch=BATCH, lock=True)
        self.stats.snapshots += 1
        v = np.frombuffer(values, dtype=_VALUE_DTYPE, count=n)
        kv = np.frombuffer(keys, dtype=_KEY_DTYPE, count=n)
        proto = kv["protocol"]
        if self.on_snapshot is not None:
            self.on_snapshot(kv, v)
        ended = ((v["flags"] & abi.FLOW_ENDED) != 0) & \
            (now - v["end_ns"].astype(np.int64) >= ended_wait)
        idle_for = np.where(proto == PROTO_TCP, t.tcp_idle_ns, t.other_idle_ns)
        idle = ~ended & (now - v["last_ns"].astype(np.int64) >= idle_for)
        # A superset of the active timeouts: the record period starts at or after the
        # flow's first packet; the cursor decides.
        active = ~ended & ~idle & (now - v["first_ns"].astype(np.int64) >= t.active_ns)
        for i in np.flatnonzero(ended | idle | active).tolist():
            key = abi.FlowKey.from_buffer_copy(keys[i])
            value = abi.FlowValue.from_buffer_copy(values[i])
            if ended[i] or idle[i]:
                reason = FlowEndReason.END_OF_FLOW if ended[i] else FlowEndReason.IDLE_TIMEOUT
                if self._clock.monotonic_ns() < fresh_until:
                    self._retire(key, reason)
                else:
                    self.stats.deferred += 1
                continue
            cursor = self._cursor((bytes(key), value.incarnation), key, value, offset)
            if now - cursor.period_start_ns >= t.active_ns:
                out.append(self._interim(key, value, cursor, offset))
        return out

    def drain(self) -> None:
        """Retire every entry (shutdown, after detaching: ended TCP flows as END_OF_FLOW,
        the rest as FORCED_END). Call flush() after the ring buffer has been drained
        once more."""
        offset = wall_offset_ns(self._clock)
        for key, value in bpfsys.lookup_batch(self._fd, abi.FlowKey, abi.FlowValue,
                                              batch=BATCH, lock=True):
            self._cursor((bytes(key), value.incarnation), key, value, offset)
            self._retire(key, FlowEndReason.END_OF_FLOW if value.flags & abi.FLOW_ENDED
                         else FlowEndReason.FORCED_END)

    def flush(self) -> list[Flow]:
        """Records of everything retired so far, without waiting for the next cycle."""
        return self._emit_pending(wall_offset_ns(self._clock))

    # ---- internals ----------------------------------------------------------------

    def _cursor(self, ident, key: abi.FlowKey, value: abi.FlowValue, offset: int) -> _Cursor:
        cursor = self._cursors.get(ident)
        if cursor is None:
            # uid and Community ID wait for the first record (_identify): most entries
            # of a full map are read many times before they produce one.
            cursor = _Cursor(uid="", period_start_ns=value.first_ns)
            self._cursors[ident] = cursor
        return cursor

    def _identify(self, cursor: _Cursor, key: abi.FlowKey, value: abi.FlowValue,
                  offset: int) -> None:
        src, dst, sport, dport = self._ends(key, value)
        cursor.uid = flow_uid(src=src, dst=dst, src_port=sport, dst_port=dport,
                              protocol=key.protocol, vlan_id=key.vlan_id,
                              inner_vlan_id=key.inner_vlan_id,
                              start_ns=kernel_to_wall_ns(value.first_ns, offset),
                              sensor_id=self._sensor_id)
        icmp = key.protocol in (PROTO_ICMP, PROTO_ICMPV6)
        cursor.community_id = self._community.compute(
            src=src, dst=dst, protocol=key.protocol, src_port=sport, dst_port=dport,
            icmp_type=value.icmp_type if icmp else None,
            icmp_code=value.icmp_code if icmp else None)

    def _retire(self, key: abi.FlowKey, reason: FlowEndReason) -> None:
        value = abi.FlowValue()
        if not bpfsys.lookup_and_delete(self._fd, key, value, lock=True):
            return
        ident = (bytes(key), value.incarnation)
        cursor = self._cursors.pop(ident, None)
        if cursor is None:
            cursor = self._cursor(ident, key, value, wall_offset_ns(self._clock))
            self._cursors.pop(ident)
        self._pending[ident] = _Retired(key=key, value=value, reason=reason, cursor=cursor)
        self.stats.retired += 1
        if self._on_retire is not None and value.l7_select:
            self._on_retire(bytes(key))  # e.g. drop the flow's l7_ctl entry

    def _emit_pending(self, offset: int) -> list[Flow]:
        out = self._leftovers
        self._leftovers = []
        for ident, entry in self._pending.items():
            last = max(entry.value.last_ns, entry.late_last_ns)
            record = self._build(entry.key, entry.value, entry.cursor, entry.reason,
                                 late=entry.late, counters=entry.value, last_ns=last,
                                 offset=offset)
            # As replay's flow table: after an interim record, a final record with no
            # new packet is not written.
            reported = entry.cursor.sent[0].packets + entry.cursor.sent[1].packets
            if record.initiator_packets or record.responder_packets or not reported:
                out.append(record)
            else:
                self.stats.empty_final += 1
            self._recent[ident] = entry
            while len(self._recent) > RECENT_RETIRED:
                self._recent.popitem(last=False)
        self._pending.clear()
        return out

    def _interim(self, key, value, cursor: _Cursor, offset: int) -> Flow:
        record = self._build(key, value, cursor, FlowEndReason.ACTIVE_TIMEOUT,
                             late=None, counters=value, last_ns=value.last_ns, offset=offset)
        for i in (0, 1):
            d = value.dir[i]
            cursor.sent[i] = _Counts(d.packets, d.ip_bytes, d.l2_bytes, d.tcp_flags)
        cursor.sent_flags = (value.syn_count, value.fin_count, value.rst_count)
        cursor.period_start_ns = value.last_ns
        self.stats.interim += 1
        return record

    @staticmethod
    def _ends(key: abi.FlowKey, value: abi.FlowValue) -> tuple[str, str, int, int]:
        lo = _addr(key.addr_lo, key.ip_version)
        hi = _addr(key.addr_hi, key.ip_version)
        if key.protocol in (PROTO_ICMP, PROTO_ICMPV6):
            # Community ID's stand-ins, as replay's records carry them: the type, and
            # the counterpart type of a request/reply pair, else the code.
            sport, dport, _ = icmp_ports(key.protocol, value.icmp_type, value.icmp_code)
            if key.port_lo == 0 and key.port_hi == 0:
                # The ICMP header was cut short: ports 0, as replay records it (no
                # real message keys as 0/0: an echo reply keys as its request, 8).
                sport = dport = 0
            return (lo, hi, sport, dport) if value.initiator == abi.DIR_LO_HI \
                else (hi, lo, sport, dport)
        if value.initiator == abi.DIR_LO_HI:
            return lo, hi, key.port_lo, key.port_hi
        return hi, lo, key.port_hi, key.port_lo

    def _build(self, key: abi.FlowKey, value: abi.FlowValue, cursor: _Cursor,
               reason: FlowEndReason, *, late: list[_Counts] | None,
               counters: abi.FlowValue | None, last_ns: int, offset: int) -> Flow:
        """A record of what happened since cursor: counters (the kernel's cumulative
        value, minus what cursor already reported) plus late packets."""
        if not cursor.uid:
            self._identify(cursor, key, value, offset)
        per_dir = [_Counts(), _Counts()]
        for i in (0, 1):
            c = per_dir[i]
            if counters is not None:
                d, s = counters.dir[i], cursor.sent[i]
                c.packets = d.packets - s.packets
                c.ip_bytes = d.ip_bytes - s.ip_bytes
                c.l2_bytes = d.l2_bytes - s.l2_bytes
                c.tcp_flags = d.tcp_flags
            if late is not None:
                c.packets += late[i].packets
                c.ip_bytes += late[i].ip_bytes
                c.l2_bytes += late[i].l2_bytes
                c.tcp_flags |= late[i].tcp_flags
        o = value.initiator & 1
        orig, resp = per_dir[o], per_dir[1 - o]
        src, dst, sport, dport = self._ends(key, value)
        state = ""
        rtt = 0
        if key.protocol == PROTO_TCP:
            state = conn_state(
                SideFlags(flags=orig.tcp_flags, syn=bool(value.dir[o].side_flags & abi.SIDE_SYN),
                          synack=bool(value.dir[o].side_flags & abi.SIDE_SYNACK),
                          packets=orig.packets),
                SideFlags(flags=resp.tcp_flags,
                          syn=bool(value.dir[1 - o].side_flags & abi.SIDE_SYN),
                          synack=bool(value.dir[1 - o].side_flags & abi.SIDE_SYNACK),
                          packets=resp.packets),
            )
            if value.syn_ns and value.synack_ns and value.ack_ns >= value.syn_ns:
                rtt = value.ack_ns - value.syn_ns
        else:
            # Cumulative packets, as replay's: an interim record's state is the flow's.
            state = conn_state_other(value.dir[o].packets, value.dir[1 - o].packets)
        syn, fin, rst = (value.syn_count, value.fin_count, value.rst_count)
        if counters is not None:
            syn, fin, rst = (syn - cursor.sent_flags[0], fin - cursor.sent_flags[1],
                             rst - cursor.sent_flags[2])
        else:
            syn = fin = rst = 0   # a record of late packets only: their flags are in tcp_flags
        start = max(cursor.period_start_ns, value.first_ns)
        icmp = key.protocol in (PROTO_ICMP, PROTO_ICMPV6)
        return Flow(
            uid=cursor.uid, sensor_id=self._sensor_id,
            flow_start_ns=kernel_to_wall_ns(start, offset),
            flow_end_ns=kernel_to_wall_ns(max(last_ns, start), offset),
            src_addr=src, dst_addr=dst, src_port=sport, dst_port=dport,
            protocol=key.protocol, ip_version=key.ip_version,
            vlan_id=key.vlan_id, inner_vlan_id=key.inner_vlan_id, ifindex=key.ifindex,
            initiator_octets=orig.ip_bytes, responder_octets=resp.ip_bytes,
            initiator_packets=orig.packets, responder_packets=resp.packets,
            initiator_l2_octets=orig.l2_bytes, responder_l2_octets=resp.l2_bytes,
            initiator_tcp_flags=orig.tcp_flags, responder_tcp_flags=resp.tcp_flags,
            tcp_syn_count=syn, tcp_fin_count=fin, tcp_rst_count=rst,
            flow_end_reason=reason, conn_state=state, handshake_rtt_ns=rtt,
            community_id=cursor.community_id,
            l7_coverage=coverage(value),
            icmp_type=value.icmp_type if icmp else 0,
            icmp_code=value.icmp_code if icmp else 0,
        )


def coverage(value: abi.FlowValue) -> L7Coverage:
    """The flow's payload accounting as the record's l7_coverage (cumulative, both
    directions): inspected when anything selected it, sampled when only sampling did."""
    if not value.l7_select:
        return L7Coverage()
    l7 = value.l7
    return L7Coverage(
        inspected=True, sampled=value.l7_select == abi.SEL_SAMPLED,
        captured_octets=l7[0].captured + l7[1].captured,
        truncated_octets=l7[0].truncated + l7[1].truncated,
        gap_octets=l7[0].gap + l7[1].gap,
        skipped_octets=l7[0].skipped + l7[1].skipped)
