"""The DDoS detector in replay (sensor/rules/ddos.py; `loupe replay --ddos`): the same
Detector as the live sensor (sensor/rules/ddos_live.py), fed from the replay's own stages
on packet time, so replaying one capture twice gives the same alerts.

Where each input comes from, beside live's:
- requests: every record the pipeline emits (HTTP and HTTP/2 events count), as live;
- new flows: the flows of the replay's flow table that began since the previous second
  (live: the entries of the kernel's flow map that began since its previous read),
  counted in the second they began in; half open is judged at the end of that second (a
  SYN, and no ACK of the initiator after the SYN-ACK: FlowState.rtt_ns unset, the
  kernel's ack_ns), as a live read of the map judges it. Every flow of the capture is new
  (live, the first read only sets the mark);
- incomplete request heads: once a second of packet time, from the HTTP/1 parsers of the
  flow table's TCP flows (live: of the L7 flows), through ddos_live.incomplete_heads.
Nothing is mitigated: a replay has no kernel to enforce in, so the settings' mitigation
is replaced with "count" and every alert says mitigation "count", enforced false.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Callable

from sensor.model import Alert, L7Event
from sensor.rules.ddos import NS, Detector, Settings
from sensor.rules.ddos_live import MAX_NEW_PER_SNAPSHOT, PROTO_TCP, incomplete_heads


class DdosReplay:
    def __init__(self, settings: Settings, emit: Callable[[Alert], None], table, *,
                 sensor_id: str = "") -> None:
        self.detector = Detector(dataclasses.replace(settings, mitigation="count"), emit,
                                 sensor_id=sensor_id)
        self.table = table            # sensor.engine.flowtable.FlowTable
        self.capped = 0               # new flows beyond MAX_NEW_PER_SNAPSHOT in a second
        self._mark_ns = 0             # flows that began at or after this are new
        self._next_ns = 0             # the start of the next second of packet time

    def observe(self, record) -> None:
        if isinstance(record, L7Event):
            self.detector.observe(record)

    def feeding(self, feed: Callable) -> Callable:
        """`feed` (Meter.feed) with a step at the first packet of every second."""
        def feed_stepped(ts, ifx, link, frame, wire) -> None:
            if ts >= self._next_ns:
                self.step(ts)
            feed(ts, ifx, link, frame, wire)
        return feed_stepped

    def step(self, now_ns: int) -> None:
        """The second before now_ns's is over: its new flows, then the heads still
        incomplete at now_ns (which closes and evaluates that second)."""
        if not self._next_ns:
            self._next_ns = (now_ns // NS + 1) * NS
            return
        self._flush_new(self._next_ns - 1)
        self._next_ns = (now_ns // NS + 1) * NS
        self.detector.observe_slow_heads(now_ns, incomplete_heads(
            (st for st in self.table.tcp.values() if st.l7 is not None), now_ns))

    def count_new_flows(self) -> None:
        """After the last packet, before the final flush empties the flow table."""
        if self._next_ns:
            self._flush_new(self._next_ns - 1)

    def close(self, last_ns: int) -> None:
        """After the final flush (its L7 events observed): close the capture's last
        second, as a live sensor would a second later."""
        if self._next_ns:
            self.detector.tick(max(self._next_ns, last_ns + 1))

    def _flush_new(self, ts_ns: int) -> None:
        """The flows that began since the mark. The tables keep flows in order of their
        last packet (the meter moves a flow to the end on each), so the walk from the end
        stops at the first flow idle since before the mark. Ended TCP flows linger in the
        table for seconds (Timeouts.tcp_end_linger_ns), so a flow that began and ended
        within the second is still there; a flow evicted from a full table is not (that
        loss is counted as flow_table_full)."""
        mark = self._mark_ns
        self._mark_ns = ts_ns + 1
        flows = []
        for table in (self.table.tcp, self.table.other):
            for st in reversed(table.values()):
                if st.last_ns < mark:
                    break
                if st.first_ns < mark:
                    continue
                if len(flows) >= MAX_NEW_PER_SNAPSHOT:
                    self.capped += 1
                    continue
                init = st.init
                half = st.protocol == PROTO_TCP and bool(st.syn_ns) and not st.rtt_ns
                flows.append((_text(st.addr[init]), _text(st.addr[1 - init]),
                              st.port[1 - init], half))
        if flows:
            self.detector.observe_new_flows(ts_ns, flows)


def _text(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw))
