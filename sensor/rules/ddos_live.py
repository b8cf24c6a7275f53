"""The DDoS detector in the live sensor (sensor/rules/ddos.py): where its inputs come from
and where its mitigations go. sensor/engine/live.py owns one DdosLive and calls it:
- observe(record) for every record the sensor submits (HTTP and HTTP/2 events count);
- on_snapshot(keys, values), as FlowMapReader.on_snapshot, at every read of the kernel's
  flow map: entries that began since the last read are the new flows, selected or not;
- step(), every loop iteration: once a second it scans the L7 flows for incomplete
  request heads (the HTTP/1 parsers' pending_head), ticks the detector and expires rate
  limits.
Mitigations go to the kernel through the enforcer's block maps and the rate_src map
(sensor/enforce/ratelimit.py), under the enforcer's heartbeat: a dead sensor's bans and
limits stop like its blocks (fail open).
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Callable, Iterable

import numpy as np

from sensor.kernel import abi
from sensor.l7.base import Direction
from sensor.model import L7Event
from sensor.rules.ddos import NS, Detector, Settings

log = logging.getLogger("loupe.ddos")

PROTO_TCP = 6
# New flows taken from one snapshot: a flood of more new flows a second than this is a
# flood all the same; the rest are counted (stats.new_flows_capped), not looked at.
MAX_NEW_PER_SNAPSHOT = 65536


def _addr(raw, version: int) -> str:
    return str(ipaddress.ip_address(bytes(raw[:4] if version == 4 else raw[:16])))


class NewFlows:
    """FlowMapReader.on_snapshot: the entries whose first packet is newer than the newest
    one of the previous snapshot. The first snapshot only sets that mark (what was in the
    map when the sensor started is not new). An entry inserted on another CPU with an
    older first_ns while the walk ran is missed: a few microseconds' worth, a rate that
    does not change a flood's order of magnitude."""

    def __init__(self, detector: Detector, wall: Callable[[], int]) -> None:
        self.detector = detector
        self.wall = wall
        self._mark = -1
        self.capped = 0

    def __call__(self, keys: np.ndarray, values: np.ndarray) -> None:
        first = values["first_ns"]
        if self._mark < 0:
            self._mark = int(first.max()) if len(first) else 0
            return
        new = np.flatnonzero(first > self._mark)
        if not len(new):
            self.detector.tick(self.wall())
            return
        self._mark = int(first[new].max())
        if len(new) > MAX_NEW_PER_SNAPSHOT:
            self.capped += len(new) - MAX_NEW_PER_SNAPSHOT
            new = new[:MAX_NEW_PER_SNAPSHOT]
        self.detector.observe_new_flows(self.wall(), self._flows(keys, values, new))

    @staticmethod
    def _flows(keys, values, idx) -> Iterable[tuple[str, str, int, bool]]:
        for i in idx.tolist():
            k, v = keys[i], values[i]
            version = int(k["ip_version"])
            lo, hi = _addr(k["addr_lo"], version), _addr(k["addr_hi"], version)
            if int(v["initiator"]) == abi.DIR_LO_HI:
                src, dst, port = lo, hi, int(k["port_hi"])
            else:
                src, dst, port = hi, lo, int(k["port_lo"])
            # Half open: a SYN and no completing ACK from the initiator yet.
            half = int(k["protocol"]) == PROTO_TCP and v["syn_ns"] != 0 and v["ack_ns"] == 0
            yield src, dst, port, bool(half)


def incomplete_heads(states: Iterable, now_ns: int) -> list[tuple[str, str, int, int]]:
    """(source, server address, server port, age ns) of every request head begun and not
    completed, from the L7 flows' parsers (engine.flowtable.FlowState objects)."""
    out = []
    for st in states:
        l7 = st.l7
        parser = l7.parser if l7 is not None else None
        pending = getattr(parser, "pending_head", None)
        if pending is None:
            continue
        since = pending(Direction.TO_SERVER)
        if not since:
            continue
        init = st.init
        out.append((str(ipaddress.ip_address(st.addr[init])),
                    str(ipaddress.ip_address(st.addr[1 - init])), st.port[1 - init],
                    max(0, now_ns - since)))
    return out


class KernelMitigator:
    """ddos.Mitigator onto the kernel maps: source bans into block_src (reason
    BLOCK_DDOS), rate limits into rate_src. Expiries come back as Unix ns."""

    def __init__(self, blocks, limits, wall: Callable[[], int]) -> None:
        self.blocks = blocks          # sensor.enforce.maps.BlockMaps
        self.limits = limits          # sensor.enforce.ratelimit.RateLimits
        self.wall = wall

    def _to_wall(self, mono_ns: int) -> int:
        return mono_ns - self.blocks.clock() + self.wall()

    def block(self, source: str, ttl_ns: int, note: str) -> int:
        from sensor.enforce.maps import MapFull  # noqa: PLC0415

        try:
            net = ipaddress.ip_network(source)
            return self._to_wall(self.blocks.block_src(net, ttl_ns, abi.BLOCK_DDOS, note))
        except MapFull as exc:
            raise OSError(f"block_src full: {exc}") from None

    def limit(self, source: str, rate: int, burst: int, ttl_ns: int, note: str) -> int:
        return self._to_wall(self.limits.limit(source, rate, burst, ttl_ns))


class DdosLive:
    def __init__(self, settings: Settings, submit: Callable, *, wall: Callable[[], int],
                 l7=None, enforcer=None, rate_fd: int | None = None,
                 sensor_id: str = "") -> None:
        self.l7 = l7                  # sensor.engine.live.LiveL7, or None
        self.wall = wall
        self.limits = None
        mitigator = None
        if settings.mitigation != "count":
            if enforcer is None or rate_fd is None:
                log.warning("ddos: mitigation %r needs [enforce] enabled; detections are "
                            "counted only", settings.mitigation)
            else:
                from sensor.enforce.ratelimit import RateLimits  # noqa: PLC0415

                self.limits = RateLimits(enforcer.maps, rate_fd)
                self.limits.clear()
                mitigator = KernelMitigator(enforcer.maps, self.limits, wall)
        self.detector = Detector(settings, submit, mitigator=mitigator, sensor_id=sensor_id)
        self.new_flows = NewFlows(self.detector, wall)
        self._next_ns = 0
        self.errors = 0
        self.limited: dict[str, int] = {}   # source -> packets its bucket dropped
        self.drops = 0                        # the sum over time, for the metrics

    def observe(self, record) -> None:
        if isinstance(record, L7Event):
            self.detector.observe(record)

    def on_snapshot(self, keys, values) -> None:
        try:
            self.new_flows(keys, values)
        except (ValueError, IndexError) as exc:   # never take the flow reader down
            self.errors += 1
            log.warning("ddos: new flows not counted: %s", exc)

    def step(self) -> None:
        now = self.wall()
        if now < self._next_ns:
            return
        self._next_ns = now + NS
        flows = self.l7._flows.values() if self.l7 is not None else ()
        self.detector.observe_slow_heads(now, incomplete_heads(
            (lf.state for lf in flows), now))
        if self.limits is not None:
            try:
                self.limits.expire()
                # For metrics(), which runs on another thread and reads no map itself.
                now_limited = {e.source: e.dropped for e in self.limits.entries()}
                for src, n in now_limited.items():
                    self.drops += max(0, n - self.limited.get(src, 0))
                self.limited = now_limited
            except OSError as exc:
                self.errors += 1
                log.warning("ddos: rate limits not expired: %s", exc)

    def close(self) -> None:
        if self.limits is not None:
            try:
                self.limits.clear()
            except OSError as exc:
                log.warning("ddos: rate limits not cleared: %s", exc)

    def metrics(self) -> dict[str, int]:
        """Flat counters for the metrics family "ddos" (sensor/metrics.py)."""
        st = self.detector.stats
        return {"events": st.events, "new_flows": st.new_flows,
                "new_flows_capped": self.new_flows.capped, "keys_overflow": st.keys_overflow,
                "alerts": sum(st.alerts.values()),
                "sources_blocked": st.mitigated.get("block", 0),
                "sources_rate_limited": st.mitigated.get("ratelimit", 0),
                "rate_limited_drops": self.drops,
                "mitigation_errors": st.mitigation_errors,
                "baseline_samples": st.baseline_samples, "errors": self.errors}
