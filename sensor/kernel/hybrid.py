"""The hybrid half of the kernel side: which flows userspace sees (selection), how much
of their payload (budgets and the l7_ctl map), and the payload events themselves.

    sensor = KernelSensor(prog, SystemClock())        # default selection applied
    sensor.poll(100)                                   # ring buffer -> reader and queue
    for ev in sensor.payload_events():                 # PayloadEvent, never blocks
        ...
    sensor.skip_until(ev.key, ev.direction, seq)       # l7_ctl, per flow and direction
    sensor.grant(ev.key, ev.direction, 4096); sensor.stop(ev.key)
    sensor.select_flow(key); sensor.unselect_flow(key) # explicit keys, at run time
    sensor.reload_selection(SelectionConfig(...))      # atomic, flows keep theirs
    sensor.reader.collect()                            # Flow records (flowmap.py)

Selection is decided by the kernel once per flow, at its first packet (rules, explicit
keys, sampling) or at its first payload (content sniffing); see bpf/flow.c. Two
selection sets live in the maps side by side; a reload fills the inactive one and then
flips `active_set` in one write, so no new flow ever sees half a configuration, and no
live flow is touched.

Keys are the raw bytes of struct loupe_flow_key, as PayloadEvent.key carries them.
Directions are relative to the initiator (abi.PL_TO_RESPONDER: bytes the initiator
sent). l7_ctl values are written whole from a userspace shadow; their fields are
cumulative (grants) or generation-numbered (skips), so a write never needs to know what
the kernel did meanwhile.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from sensor.clock import Clock
from sensor.errors import ConfigError
from sensor.flow.semantics import DEFAULT_TIMEOUTS, Timeouts
from sensor.kernel import abi, bpfsys, exclude
from sensor.kernel.events import EventDecoder, PayloadEvent
from sensor.kernel.flowmap import FlowMapReader

# Selection defaults (DESIGN.md): HTTP, DNS and TLS ports, and content sniffing.
DEFAULT_PORTS = frozenset({80, 8080, 8000, 53, 443, 8443})
# Payload octets copied per direction before userspace grants more: a request line and
# headers, a TLS ClientHello/ServerHello, a DNS message fit.
DEFAULT_BUDGET = 4096

# Per set, as the kernel maps are sized (bpf/loupe.h LOUPE_SEL_RULES_ENTRIES).
MAX_RULES = 1024
# Flows with an l7_ctl entry at once (LOUPE_L7_CTL_ENTRIES) and explicit keys
# (LOUPE_SEL_KEYS_ENTRIES): the shadows here have the same bound.
MAX_CTL = 16384
MAX_SEL_KEYS = 16384
# Payload events waiting for the consumer. Each holds at most abi.PAYLOAD_CHUNK bytes,
# so the queue holds at most 32 MiB; when it is full, new events are dropped and
# counted (queue_full, queue_full_octets), never blocking the ring buffer poll.
DEFAULT_QUEUE_EVENTS = 16384

_U32 = 0xFFFFFFFF


@dataclass(frozen=True, slots=True, kw_only=True)
class SelectionConfig:
    """Which new flows get their payload copied, and how much of it per direction."""

    ports: frozenset[int] = DEFAULT_PORTS
    cidrs: tuple[str, ...] = ()          # e.g. "198.18.0.0/15", "fc00::/7"
    protocols: frozenset[int] = frozenset()
    sample_n: int = 0                    # also select 1 flow in sample_n; 0: none
    sniff: bool = True                   # sniff unselected TCP/UDP flows' first payload
    budget: tuple[int, int] = (DEFAULT_BUDGET, DEFAULT_BUDGET)  # from initiator, responder
    # A capture filter (sensor/capfilter.py): flows whose first packet it matches are
    # never selected, whatever else would select them; "" excludes nothing.
    exclude: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ports", frozenset(self.ports))
        object.__setattr__(self, "protocols", frozenset(self.protocols))
        object.__setattr__(self, "cidrs", tuple(self.cidrs))
        if any(not 0 <= p <= 0xFFFF for p in self.ports):
            raise ConfigError("selection ports must be within 0..65535")
        if any(not 0 <= p <= 255 for p in self.protocols):
            raise ConfigError("selection protocols must be IP protocol numbers 0..255")
        if len(self.ports) > MAX_RULES or len(self.cidrs) > MAX_RULES:
            raise ConfigError(f"at most {MAX_RULES} selection ports and {MAX_RULES} CIDRs")
        for text in self.cidrs:
            try:
                ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise ConfigError(f"selection CIDR {text!r} is not an address prefix "
                                  "(e.g. 198.18.0.0/15 or fc00::/7)") from None
        if not 0 <= self.sample_n <= _U32:
            raise ConfigError("sample_n must be within 0..4294967295")
        if len(self.budget) != 2 or any(not 0 <= b <= _U32 for b in self.budget):
            raise ConfigError("budget must be two octet counts within 0..4294967295")
        exclude.program(self.exclude)   # ConfigError if it does not parse or fit


DEFAULT_SELECTION = SelectionConfig()
NO_SELECTION = SelectionConfig(ports=frozenset(), sniff=False, budget=(0, 0))


@dataclass(slots=True)
class HybridStats:
    payload_events: int = 0
    queue_full: int = 0             # payload events dropped: the consumer fell behind
    queue_full_octets: int = 0
    ctl_full: int = 0               # l7_ctl writes refused: LOUPE_L7_CTL_ENTRIES flows
    sel_keys_full: int = 0          # explicit selections refused: map full
    reloads: int = 0


def _key(key: bytes | abi.FlowKey) -> abi.FlowKey:
    raw = bytes(key)
    if len(raw) != abi.FLOW_KEY_SIZE:
        raise ValueError(f"a flow key has {abi.FLOW_KEY_SIZE} bytes, not {len(raw)}")
    return abi.FlowKey.from_buffer_copy(raw)


def _direction(direction: int) -> int:
    if direction not in (abi.PL_TO_RESPONDER, abi.PL_TO_INITIATOR):
        raise ValueError("direction is 0 (from the initiator) or 1 (from the responder)")
    return direction


class KernelSensor:
    """Selection, payload control and event routing for one loaded flow meter."""

    def __init__(self, prog, clock: Clock, *,
                 selection: SelectionConfig = DEFAULT_SELECTION,
                 timeouts: Timeouts = DEFAULT_TIMEOUTS, sensor_id: str = "",
                 queue_events: int = DEFAULT_QUEUE_EVENTS) -> None:
        self._prog = prog
        self.reader = FlowMapReader(prog.flows_fd, clock, timeouts=timeouts,
                                    sensor_id=sensor_id, on_retire=self.forget)
        self.decoder = EventDecoder()
        self.stats = HybridStats()
        self._queue: deque[PayloadEvent] = deque()
        self._queue_max = queue_events
        self._ctl: dict[bytes, abi.L7Ctl] = {}
        self._sel_keys: set[bytes] = set()
        self._active = 0
        self._written: list[tuple[list, list, list, list]] = [([], [], [], []), ([], [], [], [])]
        self._config = abi.Config()
        self.selection = NO_SELECTION
        self.reload_selection(selection)
        prog.open_events(self._on_raw)

    # ---- events -------------------------------------------------------------------

    def _on_raw(self, raw: bytes) -> None:
        event = self.decoder.decode(raw)
        if isinstance(event, PayloadEvent):
            self.stats.payload_events += 1
            if len(self._queue) >= self._queue_max:
                self.stats.queue_full += 1
                self.stats.queue_full_octets += len(event.data)
                return
            self._queue.append(event)
        else:
            self.reader.on_event(event)

    def poll(self, timeout_ms: int) -> None:
        """Drains the ring buffer (waiting at most timeout_ms for the first event)."""
        self._prog.poll_events(timeout_ms)

    def payload_events(self, limit: int | None = None) -> Iterator[PayloadEvent]:
        """The queued payload events, oldest first, without waiting for more."""
        n = len(self._queue) if limit is None else min(limit, len(self._queue))
        for _ in range(n):
            yield self._queue.popleft()

    # ---- selection ----------------------------------------------------------------

    def reload_selection(self, cfg: SelectionConfig) -> None:
        """Makes cfg the selection for new flows, atomically (see the module text)."""
        new = 1 - self._active if self.stats.reloads else 0
        self._clear_set(new)
        ports, c4, c6, protos = self._written[new]
        one = ctypes.c_uint8(1)
        for port in sorted(cfg.ports):
            k = abi.PortKey(set=new, port=port)
            bpfsys.update(self._prog.sel_ports_fd, k, one)
            ports.append(k)
        for text in cfg.cidrs:
            net = ipaddress.ip_network(text, strict=False)
            if net.version == 4:
                k4 = abi.Cidr4Key(prefixlen=8 + net.prefixlen, set=new)
                k4.addr[:] = net.network_address.packed
                bpfsys.update(self._prog.sel_cidr4_fd, k4, one)
                c4.append(k4)
            else:
                k6 = abi.Cidr6Key(prefixlen=8 + net.prefixlen, set=new)
                k6.addr[:] = net.network_address.packed
                bpfsys.update(self._prog.sel_cidr6_fd, k6, one)
                c6.append(k6)
        for proto in sorted(cfg.protocols):
            idx = ctypes.c_uint32(new * 256 + proto)
            bpfsys.update(self._prog.sel_protos_fd, idx, one)
            protos.append(idx)
        bpfsys.update(self._prog.exclude_fd, ctypes.c_uint32(new), exclude.program(cfg.exclude))
        if cfg.exclude:
            # Before the flip: new flows of the new set go through the program.
            bpfsys.update(self._prog.tails_fd, ctypes.c_uint32(abi.TAIL_NEW_FLOW),
                          ctypes.c_uint32(self._prog.new_flow_prog_fd))
        sc = self._config.set[new]
        sc.flags = abi.CFG_SNIFF if cfg.sniff else 0
        sc.sample_n = cfg.sample_n
        sc.budget[0], sc.budget[1] = cfg.budget
        zero = ctypes.c_uint32(0)
        # Two writes: the new set's settings while the old set is still active, then
        # the flip, which changes only the aligned active_set word.
        bpfsys.update(self._prog.config_fd, zero, self._config)
        self._config.active_set = new
        bpfsys.update(self._prog.config_fd, zero, self._config)
        old, self._active = self._active, new
        if not cfg.exclude:
            # After the flip: no new flow needs it (one still on its way through it
            # finds the new set's empty program).
            bpfsys.delete(self._prog.tails_fd, ctypes.c_uint32(abi.TAIL_NEW_FLOW))
        if old != new:
            self._clear_set(old)
        self.selection = cfg
        self.stats.reloads += 1

    @property
    def active_set(self) -> int:
        """Which of the two selection sets new flows are checked against."""
        return self._active

    def _clear_set(self, which: int) -> None:
        ports, c4, c6, protos = self._written[which]
        for k in ports:
            bpfsys.delete(self._prog.sel_ports_fd, k)
        for k in c4:
            bpfsys.delete(self._prog.sel_cidr4_fd, k)
        for k in c6:
            bpfsys.delete(self._prog.sel_cidr6_fd, k)
        for idx in protos:
            bpfsys.update(self._prog.sel_protos_fd, idx, ctypes.c_uint8(0))
        for lst in (ports, c4, c6, protos):
            lst.clear()

    def select_flow(self, key: bytes | abi.FlowKey) -> bool:
        """Selects the flow with this key when it starts (on any interface). False if
        the explicit-key map is full (counted)."""
        k = _key(key)
        k.ifindex = 0
        if bytes(k) not in self._sel_keys and len(self._sel_keys) >= MAX_SEL_KEYS:
            self.stats.sel_keys_full += 1
            return False
        try:
            bpfsys.update(self._prog.sel_keys_fd, k, ctypes.c_uint8(1))
        except bpfsys.BpfError as exc:
            if exc.errno in (errno.E2BIG, errno.ENOMEM):
                self.stats.sel_keys_full += 1
                return False
            raise
        self._sel_keys.add(bytes(k))
        return True

    def unselect_flow(self, key: bytes | abi.FlowKey) -> None:
        k = _key(key)
        k.ifindex = 0
        bpfsys.delete(self._prog.sel_keys_fd, k)
        self._sel_keys.discard(bytes(k))

    # ---- l7_ctl -------------------------------------------------------------------

    def grant(self, key: bytes | abi.FlowKey, direction: int, octets: int) -> bool:
        """Lets the flow copy octets more in direction, beyond its budget. False if
        the l7_ctl map is full (counted)."""
        if octets < 0:
            raise ValueError("a grant is a positive number of octets")
        d = _direction(direction)
        ctl = self._shadow(key)
        if ctl is None:
            return False
        ctl.grant[d] += octets
        return self._write(key, ctl)

    def skip_until(self, key: bytes | abi.FlowKey, direction: int, seq: int) -> bool:
        """Payload of direction below TCP sequence number seq is not copied (counted as
        skipped); copying resumes at seq, within the budget. False if the l7_ctl map
        is full (counted)."""
        d = _direction(direction)
        ctl = self._shadow(key)
        if ctl is None:
            return False
        ctl.skip_until[d] = seq & _U32
        ctl.skip_gen[d] = (ctl.skip_gen[d] + 1) & _U32   # a new skip, not the old one
        return self._write(key, ctl)

    def hold(self, key: bytes | abi.FlowKey, direction: int, peer_octets: int) -> bool:
        """Copy nothing of direction (counted as skipped) until the other direction sends
        payload beyond peer_octets (its payload octets since selection that userspace has
        seen). One direction at a time: a hold replaces the other's. False if the l7_ctl
        map is full (counted)."""
        d = _direction(direction)
        ctl = self._shadow(key)
        if ctl is None:
            return False
        ctl.flags = (ctl.flags & ~(abi.CTL_HOLD << (d ^ 1))) | (abi.CTL_HOLD << d)
        ctl.hold_peer = peer_octets & _U32
        return self._write(key, ctl)

    def release(self, key: bytes | abi.FlowKey, direction: int) -> bool:
        """End a hold of direction (the kernel ends it by itself when the peer sends;
        this keeps a stale one from waking up when the peer's count wraps)."""
        d = _direction(direction)
        ctl = self._shadow(key)
        if ctl is None:
            return False
        ctl.flags &= ~(abi.CTL_HOLD << d)
        return self._write(key, ctl)

    def stop(self, key: bytes | abi.FlowKey) -> bool:
        """Copy nothing more of this flow (its payload is counted as skipped)."""
        ctl = self._shadow(key)
        if ctl is None:
            return False
        ctl.flags |= abi.CTL_DONE
        return self._write(key, ctl)

    def forget(self, key: bytes | abi.FlowKey) -> None:
        """Drops the flow's l7_ctl entry (the flow was retired)."""
        raw = bytes(key)
        if self._ctl.pop(raw, None) is not None:
            bpfsys.delete(self._prog.l7_ctl_fd, _key(raw))

    def _shadow(self, key: bytes | abi.FlowKey) -> abi.L7Ctl | None:
        """A copy of the flow's l7_ctl value to change (the shadow is only replaced
        once the kernel took the write), or None when MAX_CTL flows have one."""
        current = self._ctl.get(bytes(key))
        if current is None:
            if len(self._ctl) >= MAX_CTL:
                self.stats.ctl_full += 1
                return None
            return abi.L7Ctl()
        return abi.L7Ctl.from_buffer_copy(current)

    def _write(self, key: bytes | abi.FlowKey, ctl: abi.L7Ctl) -> bool:
        raw = bytes(key)
        try:
            bpfsys.update(self._prog.l7_ctl_fd, _key(raw), ctl)
        except bpfsys.BpfError as exc:
            if exc.errno in (errno.E2BIG, errno.ENOMEM):
                self.stats.ctl_full += 1
                return False
            raise
        self._ctl[raw] = ctl
        return True

def flow_key(*, src: str, dst: str, sport: int, dport: int, protocol: int,
             vlan_id: int = 0, inner_vlan_id: int = 0, ifindex: int = 0) -> abi.FlowKey:
    """The canonical kernel key of a TCP/UDP flow (the lower (address, port) end
    first), e.g. for select_flow()."""
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if a.version != b.version:
        raise ValueError("both ends of a flow have the same IP version")
    ends = sorted([(int(a), a.packed, sport), (int(b), b.packed, dport)],
                  key=lambda e: (e[0], e[2]))
    k = abi.FlowKey(port_lo=ends[0][2], port_hi=ends[1][2], ifindex=ifindex,
                    vlan_id=vlan_id, inner_vlan_id=inner_vlan_id, protocol=protocol,
                    ip_version=a.version)
    ctypes.memmove(k.addr_lo, ends[0][1], len(ends[0][1]))
    ctypes.memmove(k.addr_hi, ends[1][1], len(ends[1][1]))
    return k

