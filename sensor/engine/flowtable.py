"""The flow table: per-flow state, timeouts and the records they produce.

Semantics are sensor/flow/semantics.py's; this module owns when a flow's record is
written:

- idle timeout (TCP 300 s, others 60 s) after the flow's last packet: IDLE_TIMEOUT;
- active timeout (1800 s) after the record's start: an interim ACTIVE_TIMEOUT record with
  the same uid and the counters since the previous record, and the flow goes on;
- TCP end (RST, or FIN from both sides) followed by a 5 s linger that still counts the
  last ACKs: END_OF_FLOW;
- the table is full: the flow idle for longest is evicted with LACK_OF_RESOURCES, and
  counted;
- end of input (flush): FORCED_END.

Time is whatever the caller says it is (packet time in replay), never the wall clock.

Cheap expiry: flows live in two insertion-ordered dicts, one per idle timeout (TCP and the
rest), and each packet moves its flow to the end; the oldest idle flow is therefore always
at the front, and an expiry pass stops at the first flow that has not timed out. A third
ordered dict holds flows by record start for the active timeout, and a deque the TCP flows
that ended and wait out their linger. The caller runs expire() every CHECK_INTERVAL_NS of
packet time, so the per-packet cost is one comparison.
"""

from __future__ import annotations

import socket
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable, Hashable

from sensor.flow.community_id import DEFAULT as DEFAULT_CID
from sensor.flow.community_id import CommunityId
from sensor.flow.flowkey import flow_uid_packed
from sensor.flow.semantics import (
    DEFAULT_TIMEOUTS,
    PROTO_TCP,
    TCP_FIN,
    TCP_RST,
    SideFlags,
    Timeouts,
    conn_state,
    conn_state_other,
)
from sensor.model import Flow, FlowEndReason, trusted

# How often (in packet time) expiry runs. Timeouts are tens of seconds, so expiring up to
# one second late changes no record's counters, and the per-packet cost stays one compare.
CHECK_INTERVAL_NS = 1_000_000_000

# Default bound on live flows. A flow costs about 1.5 KiB here; 500k flows keep the table
# well under 1 GiB, and a capture with more concurrent flows than that is shedding (counted).
DEFAULT_MAX_FLOWS = 500_000


_ZERO_PAIR = (0, 0)
_FALSE_PAIR = (False, False)
_MINUS_ONE_PAIR = (-1, -1)
_ONE_PAIR = (1, 1)


class FlowState:
    """One live flow. Mutable on purpose: the meter updates it on every packet.

    Sides are canonical: side 0 is the lower (address, port) end of the key, side 1 the
    higher. `init` names the initiator's side. Counters are cumulative since the flow
    began; `base` holds their values at the previous record, so an interim record reports
    the difference.
    """

    __slots__ = (
        "key", "addr", "port", "protocol", "ip_version", "vlan_id", "inner_vlan_id",
        "ifindex", "init", "init_by_syn", "first_ns", "start_ns", "last_ns", "active_ns",
        "pkts", "octs", "l2", "flags", "pure_syn", "synack", "syn_count", "fin_count",
        "rst_count", "syn_ns", "synack_ns", "rtt_ns", "hist", "hist_seen", "last_seq",
        "last_syn", "last_fin", "last_rst", "rxmit", "rxmit_next", "ended_ns",
        "icmp_type", "icmp_code", "base", "uid", "cid", "src_text", "dst_text", "l7",
        "l7_off", "l7_skip", "l7_skipped", "l7_hold",
    )

    def __init__(self, key: Hashable, a_addr: bytes, a_port: int, b_addr: bytes,
                 b_port: int, protocol: int, vlan_id: int, inner_vlan_id: int,
                 ifindex: int, init: int, ts_ns: int) -> None:
        self.key = key
        self.addr = (a_addr, b_addr)
        self.port = (a_port, b_port)
        self.protocol = protocol
        self.ip_version = 4 if len(a_addr) == 4 else 6
        self.vlan_id = vlan_id
        self.inner_vlan_id = inner_vlan_id
        self.ifindex = ifindex
        self.init = init
        self.init_by_syn = False
        self.first_ns = ts_ns
        self.start_ns = ts_ns
        self.last_ns = ts_ns
        self.active_ns = ts_ns       # when the current record's active timer started
        self.pkts = [0, 0]
        self.octs = [0, 0]
        self.l2 = [0, 0]
        if protocol == PROTO_TCP:
            self.flags = [0, 0]
            self.pure_syn = [False, False]
            self.synack = [False, False]
            # Highest sequence number seen from each side, -1 before the first.
            self.last_seq: list[int] | tuple = [-1, -1]
            self.last_syn: list[int] | tuple = [-1, -1]
            self.last_fin: list[int] | tuple = [-1, -1]
            self.last_rst: list[int] | tuple = [-1, -1]
            self.rxmit: list[int] | tuple = [0, 0]
            # Zeek's scaled history: 1st, 10th, 100th ... event
            self.rxmit_next: list[int] | tuple = [1, 1]
        else:
            # Only the meter's TCP block writes these. Other flows (UDP: most of the live
            # flows, as they wait out a 60 s idle timeout) share immutable pairs with the
            # same values: eight lists fewer to allocate and for the garbage collector
            # to traverse, and a write by mistake would raise instead of going unseen.
            self.flags = self.rxmit = _ZERO_PAIR
            self.pure_syn = self.synack = _FALSE_PAIR
            self.last_seq = self.last_syn = self.last_fin = self.last_rst = _MINUS_ONE_PAIR
            self.rxmit_next = _ONE_PAIR
        self.syn_count = 0
        self.fin_count = 0
        self.rst_count = 0
        self.syn_ns = 0
        self.synack_ns = 0
        self.rtt_ns = 0
        self.hist: list[str] = []    # letters, upper case = sent by side 0
        self.hist_seen = 0
        self.ended_ns = 0
        self.icmp_type = 0
        self.icmp_code = 0
        self.base = (0, 0, 0, 0, 0, 0, 0, 0, 0)
        self.uid = ""
        self.cid = ""                # Community ID, computed once (the key never changes)
        self.src_text = ""           # initiator / responder addresses as text, once
        self.dst_text = ""
        self.l7: object = None       # the L7 stage's per-flow state (reassembler, parser)
        # Written by the L7 stage, read by the meter: the replay twin of the kernel's
        # l7_ctl map. l7_off: hand over no more payload (the parser is done, broken or
        # absent); the meter only counts the payload bytes in l7_skipped. l7_skip: per
        # canonical side, the wire seq up to which payload is not wanted (an HTTP body
        # of known length), or None; segments wholly below it are not handed over (the
        # reassembler accounts for them as skipped when later bytes arrive).
        self.l7_off = False
        self.l7_skip: list | None = None
        self.l7_skipped = 0
        # The direction from the initiator (0 or 1) whose bytes the parser needs no more
        # until the other direction sends (idle_until_request), or None. Live only: the
        # kernel holds it (LOUPE_CTL_HOLD); replay hands over everything anyway.
        self.l7_hold: int | None = None

    def history(self) -> str:
        """Zeek-style history, upper case for the initiator."""
        text = "".join(self.hist)
        return text.swapcase() if self.init else text

    def conn_state(self) -> str:
        i, r = self.init, 1 - self.init
        if self.protocol != PROTO_TCP:
            return conn_state_other(self.pkts[i], self.pkts[r])
        return conn_state(
            SideFlags(flags=self.flags[i], syn=self.pure_syn[i], synack=self.synack[i],
                      packets=self.pkts[i]),
            SideFlags(flags=self.flags[r], syn=self.pure_syn[r], synack=self.synack[r],
                      packets=self.pkts[r]),
        )


@dataclass(slots=True)
class TableStats:
    flows_created: int = 0
    records: int = 0
    idle_expired: int = 0
    active_records: int = 0
    ended: int = 0
    evicted: int = 0          # LACK_OF_RESOURCES: the table was full
    forced: int = 0


class FlowTable:
    """Live flows keyed by the meter's canonical key; records go to `emit`.

    `on_end(state, record)` (optional) runs when a flow leaves the table, after its final
    record is emitted. `before_final(state)` (optional) runs just before the final record
    is written, so the L7 stage can flush per-flow state (its last transactions) first;
    `describe(state)` (optional) is asked, for every record of a flow whose `l7` slot is
    set, for the L7 fields of the record (app_proto, l7_coverage, http_host, ...).
    """

    def __init__(
        self,
        *,
        emit: Callable[[Flow], None],
        on_end: Callable[[FlowState, Flow], None] | None = None,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        max_flows: int = DEFAULT_MAX_FLOWS,
        sensor_id: str = "",
        community: CommunityId = DEFAULT_CID,
        before_final: Callable[[FlowState], None] | None = None,
        describe: Callable[[FlowState], dict] | None = None,
    ) -> None:
        if max_flows < 1:
            raise ValueError("max_flows must be at least 1")
        self.emit = emit
        self.on_end = on_end
        self.before_final = before_final
        self.describe = describe
        self.timeouts = timeouts
        self.max_flows = max_flows
        self.sensor_id = sensor_id
        self.community = community
        self.tcp: OrderedDict[Hashable, FlowState] = OrderedDict()
        self.other: OrderedDict[Hashable, FlowState] = OrderedDict()
        self._by_active: OrderedDict[Hashable, FlowState] = OrderedDict()
        self._lingering: deque[tuple[int, FlowState]] = deque()
        self.stats = TableStats()
        self.now_ns = 0
        self.next_check_ns = 0
        # conn_state of a TCP flow by what it depends on (each side's FIN and RST bits,
        # pure SYN, SYN-ACK): at most 256 entries, so semantics.conn_state runs (and
        # builds its SideFlags) once per combination instead of once per record.
        self._tcp_states: dict[tuple, str] = {}

    def __len__(self) -> int:
        return len(self.tcp) + len(self.other)

    # ---------------------------------------------------------------- per packet

    def create(self, key: Hashable, a_addr: bytes, a_port: int, b_addr: bytes, b_port: int,
               protocol: int, vlan_id: int, inner_vlan_id: int, ifindex: int, init: int,
               ts_ns: int) -> FlowState:
        """A new flow; evicts the longest-idle flow first when the table is full."""
        if len(self.tcp) + len(self.other) >= self.max_flows:
            self._evict_one()
        st = FlowState(key, a_addr, a_port, b_addr, b_port, protocol, vlan_id,
                       inner_vlan_id, ifindex, init, ts_ns)
        (self.tcp if protocol == PROTO_TCP else self.other)[key] = st
        self._by_active[key] = st
        self.stats.flows_created += 1
        return st

    def mark_ended(self, st: FlowState, ts_ns: int) -> None:
        """The TCP flow ended (RST, or FIN both ways); its record follows after the linger."""
        if not st.ended_ns:
            st.ended_ns = ts_ns
            self._lingering.append((ts_ns + self.timeouts.tcp_end_linger_ns, st))

    def finish(self, st: FlowState, reason: FlowEndReason) -> None:
        """Write the flow's final record now and drop it (e.g. a new SYN reuses its key)."""
        self._remove(st)
        self._final(st, reason)

    # ---------------------------------------------------------------- time

    def expire(self, now_ns: int) -> None:
        """Run every timeout due at packet time now_ns."""
        if now_ns > self.now_ns:
            self.now_ns = now_ns
        now = self.now_ns
        self.next_check_ns = now + CHECK_INTERVAL_NS
        t = self.timeouts
        linger = self._lingering
        while linger and linger[0][0] <= now:
            _, st = linger.popleft()
            if self._live(st):
                self._remove(st)
                self.stats.ended += 1
                self._final(st, FlowEndReason.END_OF_FLOW)
        for table, idle in ((self.tcp, t.tcp_idle_ns), (self.other, t.other_idle_ns)):
            while table:
                st = next(iter(table.values()))
                if st.last_ns + idle > now:
                    break
                self._remove(st)
                if st.ended_ns:
                    self.stats.ended += 1
                    self._final(st, FlowEndReason.END_OF_FLOW)
                else:
                    self.stats.idle_expired += 1
                    self._final(st, FlowEndReason.IDLE_TIMEOUT)
        act = self._by_active
        while act:
            st = next(iter(act.values()))
            if st.active_ns + t.active_ns > now:
                break
            del act[st.key]
            if self._delta_packets(st):
                self.stats.active_records += 1
                self._write(st, FlowEndReason.ACTIVE_TIMEOUT)
            # The next record starts with the next packet; its timer with this one.
            st.start_ns = 0
            st.active_ns = now
            act[st.key] = st

    def flush(self) -> None:
        """End of input: run what is due, then write every remaining flow."""
        self.expire(self.now_ns)
        for table in (self.tcp, self.other):
            while table:
                _, st = table.popitem(last=False)
                self._by_active.pop(st.key, None)
                if st.ended_ns:
                    self.stats.ended += 1
                    self._final(st, FlowEndReason.END_OF_FLOW)
                else:
                    self.stats.forced += 1
                    self._final(st, FlowEndReason.FORCED_END)
        self._lingering.clear()

    # ---------------------------------------------------------------- internals

    def _live(self, st: FlowState) -> bool:
        return (self.tcp if st.protocol == PROTO_TCP else self.other).get(st.key) is st

    def _remove(self, st: FlowState) -> None:
        table = self.tcp if st.protocol == PROTO_TCP else self.other
        if table.get(st.key) is st:
            del table[st.key]
        if self._by_active.get(st.key) is st:
            del self._by_active[st.key]

    def _evict_one(self) -> None:
        heads = [next(iter(t.values())) for t in (self.tcp, self.other) if t]
        st = min(heads, key=lambda s: s.last_ns)
        self._remove(st)
        self.stats.evicted += 1
        self._final(st, FlowEndReason.LACK_OF_RESOURCES)

    @staticmethod
    def _delta_packets(st: FlowState) -> int:
        return st.pkts[0] + st.pkts[1] - st.base[0] - st.base[1]

    def _final(self, st: FlowState, reason: FlowEndReason) -> None:
        if self.before_final is not None and st.l7 is not None:
            self.before_final(st)
        record = None
        if self._delta_packets(st) or not st.base[0] + st.base[1]:
            record = self._write(st, reason)
        if self.on_end is not None and record is not None:
            self.on_end(st, record)

    def identify(self, st: FlowState) -> None:
        """Fill the flow's uid, Community ID and address texts (once per flow: the key and
        the first packet's time never change)."""
        identify(st, self.sensor_id, self.community)

    def _conn_state(self, st: FlowState) -> str:
        if st.protocol != PROTO_TCP:
            return st.conn_state()
        i, r = st.init, 1 - st.init
        key = (st.flags[i] & _FIN_RST, st.pure_syn[i], st.synack[i],
               st.flags[r] & _FIN_RST, st.pure_syn[r], st.synack[r])
        state = self._tcp_states.get(key)
        if state is None:
            state = self._tcp_states[key] = st.conn_state()
        return state

    def _write(self, st: FlowState, reason: FlowEndReason) -> Flow:
        i, r = st.init, 1 - st.init
        b = st.base
        if not st.uid:
            identify(st, self.sensor_id, self.community)
        start = st.start_ns or st.last_ns
        extra = self.describe(st) if self.describe is not None and st.l7 is not None \
            else _NO_FIELDS
        record = _build_flow(
            uid=st.uid,
            sensor_id=self.sensor_id,
            flow_start_ns=start,
            flow_end_ns=max(st.last_ns, start),
            src_addr=st.src_text,
            dst_addr=st.dst_text,
            src_port=st.port[i],
            dst_port=st.port[r],
            protocol=st.protocol,
            ip_version=st.ip_version,
            vlan_id=st.vlan_id,
            inner_vlan_id=st.inner_vlan_id,
            ifindex=st.ifindex,
            initiator_packets=st.pkts[i] - b[i],
            responder_packets=st.pkts[r] - b[r],
            initiator_octets=st.octs[i] - b[2 + i],
            responder_octets=st.octs[r] - b[2 + r],
            initiator_l2_octets=st.l2[i] - b[4 + i],
            responder_l2_octets=st.l2[r] - b[4 + r],
            initiator_tcp_flags=st.flags[i],
            responder_tcp_flags=st.flags[r],
            tcp_syn_count=st.syn_count - b[6],
            tcp_fin_count=st.fin_count - b[7],
            tcp_rst_count=st.rst_count - b[8],
            flow_end_reason=reason,
            conn_state=self._conn_state(st),
            history=st.history(),
            handshake_rtt_ns=st.rtt_ns,
            community_id=st.cid,
            icmp_type=st.icmp_type,
            icmp_code=st.icmp_code,
            **extra,
        )
        st.base = (st.pkts[0], st.pkts[1], st.octs[0], st.octs[1], st.l2[0], st.l2[1],
                   st.syn_count, st.fin_count, st.rst_count)
        self.stats.records += 1
        self.emit(record)
        return record


_NO_FIELDS: dict = {}
# Every value of a record _write makes is the table's own (counter differences, ports and
# texts of a parsed header, max(last, start)) or the L7 stage's (flow_fields): bounded where
# it was made, so the record skips Flow's re-checks (model.trusted): 6.8 against 18.8 µs a
# record by timeit (load 8).
# tests/replay/test_trusted_records.py re-validates every Flow of the golden and corpus runs.
_build_flow = trusted(Flow)
_FIN_RST = TCP_FIN | TCP_RST   # the only flag bits semantics.conn_state reads
_ntoa = socket.inet_ntoa   # the same text as inet_ntop(AF_INET, ...), one lookup less


def identify(st: FlowState, sensor_id: str, community: CommunityId) -> None:
    """Compute a flow's uid, Community ID and address texts into its state."""
    i = st.init
    src, dst = st.addr[i], st.addr[1 - i]
    sport, dport = st.port[i], st.port[1 - i]
    protocol = st.protocol
    st.uid = flow_uid_packed(src, sport, dst, dport, protocol, st.vlan_id,
                             st.inner_vlan_id, st.first_ns, sensor_id)
    if st.ip_version == 4:
        st.src_text = _ntoa(src)
        st.dst_text = _ntoa(dst)
    else:
        st.src_text = socket.inet_ntop(socket.AF_INET6, src)
        st.dst_text = socket.inet_ntop(socket.AF_INET6, dst)
    if protocol == 1 or protocol == 58:
        st.cid = community.packed(src, dst, protocol, sport, dport, st.icmp_type,
                                  st.icmp_code)
    else:
        st.cid = community.packed(src, dst, protocol, sport, dport)
