"""Kernel enforcement of the rules engine's `block` verdicts (live only).

A block verdict (sensor/rules/engine.Verdict) arrives on the sensor's loop thread while
the L7 engine is inside the flow whose event decided it. The enforcer then
1. writes the flow into block_flow (the kernel drops its packets both ways from now on),
2. with the rule's block_source_ttl, writes the source address into block_src (new
   flows from it are dropped at their first packet),
3. resets both ends with a TCP RST each (rst.py), at the sequence numbers the flow's
   reassembly last saw,
and returns what it enforced, which the Alert carries (enforced, block_expires_ns).
Writes are a few bpf(2) calls: the loop thread is not held up.

tick(), once a second from the loop: the heartbeat that keeps the blocks honoured
(fail open otherwise, loupe.h) and the deletion of expired entries.

Hold mode (hold.py): for the services [enforce] hold names, the kernel holds a response
until its request is judged; on_pass() is the verdict for every request that is not
blocked, and releases the flow.

Replay builds no enforcer: its verdicts are the same, nothing is enforced.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from sensor.enforce.maps import BlockMaps, MapFull
from sensor.kernel import abi

log = logging.getLogger("loupe.enforce")

# How long a blocked flow's entry lives. Both ends are reset, so the connection is gone;
# the entry only has to outlast stray packets and retransmissions, and a client that
# reuses the same port (after TIME_WAIT, 60 s on Linux) should not meet it.
FLOW_TTL_NS = 60 * 10**9
TICK_NS = 10**9
# Verdict latencies kept for the metrics and the benchmark (a bounded window).
LATENCY_WINDOW = 4096


@dataclass(frozen=True, slots=True)
class Enforcement:
    enforced: bool
    expires_wall_ns: int = 0    # of the flow block, or of the source ban when longer
    held_ns: int = 0            # hold mode: how long the response was held before the block


@dataclass(slots=True)
class EnforceStats:
    flows_blocked: int = 0
    sources_blocked: int = 0
    resets_sent: int = 0
    resets_skipped: int = 0      # a side whose next sequence number was unknown
    map_full: int = 0
    no_flow: int = 0             # a verdict outside any live flow (nothing to block)
    write_errors: int = 0        # a map write the kernel refused otherwise
    expired: int = 0
    holds_released: int = 0      # held flows let go by a non-block verdict
    held_blocks: int = 0         # blocks that found their response still held (no leak)
    nudges_sent: int = 0         # ACKs that asked a server to send its held response now
    latencies_ns: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    # Hold mode: the request's last packet (the kernel's armed_ns) -> the release or block
    # written, i.e. how long the verdict kept the response pending.
    hold_ns: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))


class Enforcer:
    def __init__(self, maps: BlockMaps, *, current_flow: Callable[[], object | None],
                 resets=None, clock_wall: Callable[[], int] = time.time_ns,
                 clock_mono: Callable[[], int] = time.monotonic_ns,
                 hold=None, hold_services=(), hold_max_ns: int = 0,
                 nudge: bool = True) -> None:
        self.maps = maps
        self.hold = hold                   # hold.HoldMaps, or None (no hold mode)
        self.nudge = nudge
        # (server address bytes, port) of the held services: only their flows cost a
        # bpf(2) call per request.
        self._held = frozenset((s.addr.packed, s.port) for s in hold_services)
        self.current_flow = current_flow   # -> sensor.engine.flowtable.FlowState or None
        self.resets = resets               # rst.ResetSender, or None (no resets)
        self.wall = clock_wall
        self.mono = clock_mono
        self.stats = EnforceStats()
        self._next_tick = 0
        self.maps.clear()
        self.maps.beat()
        if hold is not None:
            hold.clear()
            if hold_services:
                hold.set_services(hold_services, hold_max_ns)
                self.maps.set_bit(abi.BLOCK_ANY_HOLD, True)

    def _to_wall(self, mono_ns: int) -> int:
        return mono_ns - self.mono() + self.wall()

    def on_verdict(self, verdict, flow=None) -> Enforcement:
        """flow: the verdict's flow when the caller knows it (the TLS plaintext stage,
        sensor/engine/plaintext.py); else current_flow()."""
        stats = self.stats
        st = flow if flow is not None else self.current_flow()
        ev = verdict.event
        if st is None:
            stats.no_flow += 1
            return Enforcement(False)
        key = abi.FlowKey.from_buffer_copy(st.key)
        note = verdict.rule_id or "default"
        expires = 0
        try:
            expires = self.maps.block_flow(key, FLOW_TTL_NS, abi.BLOCK_RULE, note)
            stats.flows_blocked += 1
            ttl = getattr(verdict, "source_ttl_ns", 0)
            if ttl and ev.src_addr:
                net = ipaddress.ip_network(ev.src_addr)
                expires = max(expires, self.maps.block_src(net, ttl, abi.BLOCK_RULE, note))
                stats.sources_blocked += 1
        except MapFull:
            stats.map_full += 1
            log.warning("block map full: %s not enforced (rule %s)", ev.src_addr, note)
            if not expires:
                return Enforcement(False)
        except OSError as exc:   # a bpf(2) write refused: never take the loop down
            stats.write_errors += 1
            log.warning("block not enforced (rule %s): %s", note, exc)
            if not expires:
                return Enforcement(False)
        # Packet seen (the event's time) -> kernel map written.
        stats.latencies_ns.append(max(0, self.wall() - ev.ts_ns))
        held_ns = 0
        if self._is_held(st):
            pending = self.hold.pending(key)
            if pending is not None:
                stats.held_blocks += 1
                held_ns = max(1, self.mono() - pending.armed_ns)
                stats.hold_ns.append(held_ns)
        self._reset(st)
        return Enforcement(True, self._to_wall(expires), held_ns)

    def _is_held(self, st) -> bool:
        if not self._held or st.protocol != 6:
            return False
        server = 1 - st.init
        return (bytes(st.addr[server]), st.port[server]) in self._held

    def on_pass(self, st) -> None:
        """A request of flow st is complete and not blocked: a held response may go. The
        client's stream is judged up to where the reassembly has read it (the request
        just parsed, and anything pipelined behind it, which the next request's verdict
        would judge; docs/rules.md, "Hold mode")."""
        if not self._is_held(st):
            return
        l7 = st.l7
        reasm = l7.reasm if l7 is not None else None
        if reasm is None or not reasm.streams[0].started:
            return
        key = abi.FlowKey.from_buffer_copy(st.key)
        client, server = reasm.streams
        try:
            armed = self.hold.release(key, client.next_seq)
        except OSError as exc:   # never take the loop down; the kernel's bound releases
            self.stats.write_errors += 1
            log.warning("hold not released: %s", exc)
            return
        if armed is None:
            return
        self.stats.holds_released += 1
        self.stats.hold_ns.append(max(0, self.mono() - armed.armed_ns))
        if self.nudge and self.resets is not None and server.started:
            # The held segments were dropped, so the server's TCP sends them again only
            # at its next timer (200 ms at least on Linux); an ACK from the client makes
            # it look at its send queue now.
            init = st.init
            c = str(ipaddress.ip_address(st.addr[init]))
            s = str(ipaddress.ip_address(st.addr[1 - init]))
            if self.resets.ack(c, st.port[init], s, st.port[1 - init], client.next_seq,
                               server.next_seq):
                self.stats.nudges_sent += 1

    def _reset(self, st) -> None:
        """RST to each end, as if from the other, at the other's next sequence number."""
        local = getattr(st, "reset_local", None)
        if local is not None:
            # A flow seen in TLS plaintext (sensor/engine/plaintext.py): its offsets are
            # not TCP sequence numbers. The probed process's socket is aborted on this
            # host instead, and its kernel resets the peer: both ends are told.
            if local():
                self.stats.resets_sent += 2
            else:
                self.stats.resets_skipped += 2
            return
        if self.resets is None or st.protocol != 6:
            return
        l7 = st.l7
        reasm = l7.reasm if l7 is not None else None
        if reasm is None:
            self.stats.resets_skipped += 2
            return
        init = st.init
        ends = [(str(ipaddress.ip_address(st.addr[init])), st.port[init]),
                (str(ipaddress.ip_address(st.addr[1 - init])), st.port[1 - init])]
        streams = reasm.streams   # 0: the initiator's bytes, 1: the responder's
        for d in (0, 1):
            sender, receiver = ends[d], ends[1 - d]
            own, other = streams[d], streams[1 - d]
            if not own.started:
                self.stats.resets_skipped += 1
                continue
            ack = other.next_seq if other.started else 0
            if self.resets.reset(sender[0], sender[1], receiver[0], receiver[1],
                                 own.next_seq, ack):
                self.stats.resets_sent += 1

    def tick(self, now_mono_ns: int | None = None) -> None:
        now = self.mono() if now_mono_ns is None else now_mono_ns
        if now < self._next_tick:
            return
        self._next_tick = now + TICK_NS
        self.maps.beat()
        self.stats.expired += self.maps.expire()

    def close(self) -> None:
        """A clean stop lifts every block and hold (the program detaches too)."""
        self.maps.clear()
        if self.hold is not None:
            self.hold.clear()
        if self.resets is not None:
            self.resets.close()
