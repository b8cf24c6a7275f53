"""TLS plaintext chunks (bpf/tls_probe.c) -> the same L7 engine as wire payload.

Seam. A chunk is what one process read or wrote through one TLS object (OpenSSL's SSL *,
GnuTLS's session), with a stream offset the kernel counts per object and direction.
That is a TCP segment in all but name: the offset is its sequence number (mod 2^32, as
the reassembler keeps it), the object's socket gives the 5-tuple, and whether the
process accepted or connected it gives the direction from the initiator. So each chunk
goes into `L7Engine.tcp_segment` of an engine whose events say source "tls_plaintext",
and the same reassembly, parsers, skip hints and records come out.

Joining the wire. The socket's 5-tuple is the kernel flow's: its Community ID is the
same by construction. The uid is the wire L7 stage's when it has the flow (LiveL7 saw
the handshake), else it is computed from the kernel flow's first packet time as LiveL7
computes it, and `join` gives the Flow record that uid on its way out. A connection
whose flow the meter does not see (an interface not attached) keeps the uid of its
first chunk's time.

One view per connection. Client and server on one host both call the library for the
same connection: the first object seen on a flow feeds the engine, a second one is
stopped in the kernel (counted as duplicate_views), so each transaction comes out once.

Budget (the wire contract, module text of sensor/engine/live.py): the kernel copies at
most budget + grants per direction; skip hints become tls_ctl.skip_until (an offset,
which never wraps); a DONE or broken parser, a port outside the selection, or a
duplicate view becomes LOUPE_CTL_DONE. Copied bytes therefore grow with the number of
messages, not their size.

Order. The engine takes each connection's chunks in ring buffer order, which must be the
order of cause and effect: a request before its response. The kernel sends a call's
octets where that holds even when a process reads and writes a connection on two
threads (Go's net/http): a Write at its entry, before the request reaches the socket, a
Read at its return (bpf/tls_probe.c).

Loss. A chunk whose object has no socket yet is held (a Go Conn's first Write is sent
before its syscall shows the fd; the RET's mark brings it) and fed, in order, ahead of
the chunk that finds the socket; after MAX_NO_SOCKET such chunks the object is stopped
and counted as a LostEvent (tls_no_socket). Octets the
kernel did not copy (budget) show as a jump in the offsets and are accounted as
truncated by the reassembler; chunks the ring buffer had no room for are the kernel's
counter (tls_ringbuf_full).
"""

from __future__ import annotations

import ctypes
import dataclasses
import inspect
import logging
import socket
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sensor.engine.flowtable import FlowState, identify
from sensor.engine.l7engine import L7Engine
from sensor.engine.plaintext_socket import Endpoint, SocketResolver, connected
from sensor.engine.reassembly import MemoryBudget
from sensor.flow.semantics import PROTO_TCP
from sensor.kernel import abi
from sensor.kernel.tlsprobe import CTL_DONE, Chunk, TlsCtl
from sensor.l7 import http1, principal
from sensor.l7.http2 import Http2Event
from sensor.l7.base import Direction
from sensor.l7.detect import ParserRegistry
from sensor.model import Flow, FlowEndReason, HttpEvent, L7Event, Record

log = logging.getLogger(__name__)

# How long an object's chunks may wait for its socket before it counts as lost.
PENDING_NS = 10 * 10**9
# LOUPE_TLS_CHUNK (bpf/loupe.h): octets one event carries at most.
CHUNK = 4096
# Chunks of an object without a socket before it is given up (its first calls may come
# before a syscall shows the fd: data buffered by an earlier, unprobed read).
MAX_NO_SOCKET = 8
# Octets of chunks held for their socket, over all objects; past it a chunk is not held
# (its object then starts at a later offset: a gap, as the budget's).
MAX_HELD_OCTETS = 4 << 20
# Connections with plaintext state at once; beyond it new ones are stopped and counted.
MAX_CONNS = 16384
# HTTP resynchronisations in a row per connection (as live.py's MAX_RESYNCS): after a
# head was truncated (userspace lagged behind a fast connection and the budget ran out
# before its grant landed), parsing restarts at the next request instead of giving up.
MAX_RESYNCS = 16
# HTTP/1's message starts (its registration's FramingHints): requests only, and any.
_HTTP_STARTS = http1.MESSAGE_STARTS
_REQUEST_STARTS = tuple(start for start in _HTTP_STARTS if not start.startswith(b"HTTP/"))
# A direction's allowance is kept topped up to this (as live.py's policy, with a larger
# floor): one call carries a whole response head and, for small bodies, the body too,
# so 4 KiB keeps a few responses of room ahead of a userspace that lags behind a fast
# keep-alive connection; a body in flight before its skip lands copies at most this.
ROOM_TARGET = 4096
HEAD_ROOM_FACTOR = 4
_M32 = 0xFFFFFFFF


class PlaintextControl(Protocol):
    """tls_ctl writes (sensor.kernel.tlsprobe.TlsProbe; tests may fake it)."""

    def write_ctl(self, tgid: int, ssl: int, value: TlsCtl) -> bool: ...


@dataclass(slots=True)
class PlaintextStats:
    chunks: int = 0
    octets: int = 0
    conns: int = 0
    no_socket_chunks: int = 0   # chunks that came before their object's socket
    held_dropped: int = 0       # of those, not held (MAX_HELD_OCTETS) or given up
    no_socket: int = 0          # objects given up: LostSource.TLS_NO_SOCKET
    duplicate_views: int = 0    # the other end's process on the same host
    not_selected: int = 0       # outside the port selection
    refused: int = 0            # MAX_CONNS reached
    restarted: int = 0          # an object reused for a new connection
    resyncs: int = 0            # HTTP parsers restarted after a lost head
    skips: int = 0
    grants: int = 0
    stops: int = 0
    ctl_refused: int = 0
    joined: int = 0


class _Conn:
    __slots__ = ("id", "fd", "flow", "state", "flip", "next_off", "received", "allowance",
                 "ctl", "head_max", "stopped", "last_mono", "skip_sent", "waiting",
                 "resyncs", "mtls")

    def __init__(self, cid: tuple[int, int], fd: int, flow: bytes, state: FlowState,
                 flip: int, budget: int, now: int) -> None:
        self.id = cid
        self.fd = fd
        self.flow = flow
        self.state = state
        self.flip = flip              # engine direction = kernel dir ^ flip
        self.next_off: list[int | None] = [None, None]   # by kernel dir
        self.received = [0, 0]
        self.allowance = [budget, budget]
        self.ctl = TlsCtl()
        self.head_max = [0, 0]
        self.stopped = False
        self.last_mono = now
        self.skip_sent = [0, 0]
        self.waiting = False          # an HTTP parser failed: wait for a request start
        self.resyncs = 0
        # The wire's handshake showed a client certificate: its principal hash (or "");
        # False: it did not; None: not known yet (asked again at the next request).
        self.mtls: str | bool | None = None


class PlaintextL7:
    """Chunks -> L7Engine(source="tls_plaintext") -> L7Event records (to `emit`), tls_ctl
    writes (to `control`), and the uid of Flow records (join())."""

    def __init__(self, *, emit: Callable[[Record], None], control: PlaintextControl,
                 origin: Callable[[bytes], tuple[int, int] | None] = lambda key: None,
                 uid_of: Callable[[bytes], str | None] = lambda key: None,
                 client_auth_of: Callable[[bytes], tuple[bool, str] | None] = lambda key: None,
                 resolver: SocketResolver | None = None, sensor_id: str = "",
                 budget: int = 4096, refill_octets: int = 2048, ports: tuple[int, ...] = (),
                 reassembly_budget_bytes: int = 16 << 20, redact: bool = True,
                 expire_ns: int = 420 * 10**9, rules=None) -> None:
        """rules: the wire L7 stage's rules Analyzer (sensor/rules/stage.build), shared so
        plaintext events meet the same rule set, thresholds and reloads as wire ones.
        client_auth_of: flow key -> (the wire's TLS handshake showed a client
        certificate, its principal hash) or None while not known (the wire stage's
        TlsParser.client_auth); a yes marks every HTTP request of the connection `mtls`."""
        self._emit = emit
        self._client_auth_of = client_auth_of
        self._control = control
        self._origin = origin
        self._uid_of = uid_of
        self.resolver = resolver or SocketResolver()
        self.sensor_id = sensor_id
        self.budget = budget
        self.refill_octets = refill_octets
        self.ports = frozenset(ports)
        self.expire_ns = expire_ns
        registry = _Parsers(redact)
        self.rules = rules
        self._current: _Conn | None = None
        if rules is not None:
            from sensor.rules.stage import InspectingRegistry  # noqa: PLC0415

            rules = _plaintext_rules(rules, self.current_flow)
            self.rules = rules
            # Through a lambda, as stage.build: a reload swaps the analyzer's engine.
            early = rules.request_done if rules.current_flow is not None else None
            registry = InspectingRegistry(registry, lambda m, t, c: rules.capture(m, t, c),
                                          early)
        self.engine = L7Engine(emit=self._out, sensor_id=sensor_id, registry=registry,
                               budget=MemoryBudget(reassembly_budget_bytes),
                               source="tls_plaintext", analyze=rules)
        self.stats = PlaintextStats()
        self._conns: dict[tuple[int, int], _Conn] = {}
        self._by_flow: dict[bytes, _Conn] = {}
        # No socket yet: object -> [chunks seen, first seen (monotonic ns)], and the
        # chunks held meanwhile (their octets in all: _held_octets).
        self._pending: dict[tuple[int, int], list[int]] = {}
        self._held: dict[tuple[int, int], list[Chunk]] = {}
        self._held_octets = 0
        self._done: dict[tuple[int, int], int] = {}      # stopped objects -> their fd
        # Per object, as chunks are read: [fd, next offset READ, next offset WRITE].
        self._seen: dict[tuple[int, int], list[int]] = {}
        self._bound: dict[tuple[int, int], tuple[int, Endpoint]] = {}   # bind()

    def __len__(self) -> int:
        return len(self._conns)

    def _out(self, record: Record) -> None:
        """The engine's records to `emit`, each HTTP request of a connection whose
        handshake showed a client certificate with the `mtls` credential: a property of
        the connection, so every request on it carries it (unlike a header credential)."""
        conn = self._current
        if conn is not None and type(record) is L7Event and \
                type(record.detail) in (HttpEvent, Http2Event):
            if conn.mtls is None:
                fact = self._client_auth_of(conn.flow)
                if fact is not None:
                    conn.mtls = fact[1] if fact[0] else False
            if conn.mtls is not None and conn.mtls is not False:
                detail = record.detail
                record = dataclasses.replace(record, detail=dataclasses.replace(
                    detail, auth=principal.with_mtls(detail.auth, conn.mtls)))
        self._emit(record)

    def current_flow(self) -> FlowState | None:
        """The flow whose plaintext the engine is parsing (during a rule's verdict, the
        flow that decided it), or None: what the rules and the enforcer are handed for
        a plaintext event's verdict (_plaintext_rules)."""
        return self._current.state if self._current is not None else None

    # -- chunks ----------------------------------------------------------------------------

    def locate(self, ch: Chunk) -> tuple[bool, Endpoint | None]:
        """(whether the chunk starts a new connection of its object, its socket when it
        may need one). Called as the chunk is read from the ring buffer, before it is
        queued: a short connection's fd (or its process) may be gone by the time step()
        gets to it. New: an object not seen before, a new fd, or offsets that start
        again (the object was freed and its address reused, or set to a new fd)."""
        cid = (ch.tgid, ch.ssl)
        seen = self._seen.get(cid)
        d = ch.dir
        new = (seen is None or (ch.fd >= 0 and seen[0] >= 0 and ch.fd != seen[0])
               or ch.offset < seen[1 + d])
        if not new and seen[0] < 0 <= ch.fd:
            seen[0] = ch.fd   # the fd of an object whose first chunks came without one
        if new:
            seen = self._seen[cid] = [ch.fd, 0, 0]
            while len(self._seen) > 2 * MAX_CONNS:
                self._seen.pop(next(iter(self._seen)))
        seen[1 + d] = ch.offset + ch.length
        if new or (cid not in self._conns and self._done.get(cid) != ch.fd):
            return new, self._socket(ch)
        return False, None

    def _socket(self, ch: Chunk) -> Endpoint | None:
        """The kernel's 4-tuple of a connect()ed or accept()ed fd, taken at the call
        (exact even if the fd was closed and reused since); else what SSL_set_fd found;
        else /proc (too late for a short connection closed before its chunks are read)."""
        if ch.sock is not None:
            return connected(ch.sock, ch.accepted)
        bound = self._bound.get((ch.tgid, ch.ssl))
        if bound is not None and bound[0] == ch.fd:
            return bound[1]
        return self.resolver.resolve(ch.tgid, ch.fd)

    def bind(self, ch: Chunk) -> None:
        """The object was just given its fd (SSL_set_fd, before the handshake): find the
        socket now, while the connection surely exists."""
        cid = (ch.tgid, ch.ssl)
        self._bound.pop(cid, None)
        ep = self._socket(ch)
        if ep is not None:
            self._bound[cid] = (ch.fd, ep)
            while len(self._bound) > MAX_CONNS:
                self._bound.pop(next(iter(self._bound)))

    def on_chunk(self, ch: Chunk, offset_ns: int, now_mono: int,
                 located: tuple[bool, Endpoint | None] | None = None) -> None:
        """located: what locate() said when the chunk was read (None: ask it now)."""
        new, ep = located if located is not None else self.locate(ch)
        stats = self.stats
        stats.chunks += 1
        stats.octets += len(ch.data)
        cid = (ch.tgid, ch.ssl)
        conn = self._conns.get(cid)
        if new:
            self._done.pop(cid, None)
            stats.held_dropped += len(self._unhold(cid))   # an earlier stream's
            if conn is not None:
                # The object now serves another connection: the old one ends here.
                stats.restarted += 1
                self._end(conn)
                conn = None
        if conn is None:
            if self._done.get(cid) == ch.fd:
                return   # stopped; a chunk written before the stop reached the kernel
            conn = self._new_conn(ch, cid, offset_ns, now_mono, ep)
            if conn is None:
                return
            for held in self._unhold(cid):
                self._feed(conn, held, offset_ns, now_mono)
        self._feed(conn, ch, offset_ns, now_mono)

    def _feed(self, conn: _Conn, ch: Chunk, offset_ns: int, now_mono: int) -> None:
        self._current = conn
        try:
            self._feed_one(conn, ch, offset_ns, now_mono)
        finally:
            self._current = None

    def _feed_one(self, conn: _Conn, ch: Chunk, offset_ns: int, now_mono: int) -> None:
        stats = self.stats
        conn.last_mono = now_mono
        if conn.stopped:
            return
        d = ch.dir
        expected = conn.next_off[d]
        st = conn.state
        ts = ch.ts_ns + offset_ns
        ed = d ^ conn.flip
        if expected is not None and ch.offset > expected:
            # Octets the kernel did not copy: skipped on our request (they become Skip,
            # a body's end), or truncated by the budget or a lost chunk (the parser
            # resynchronises or skips past them).
            self.engine.tcp_segment(st, ed, expected & _M32, 0, 0, b"", ts,
                                    ch.offset - expected)
        if not ch.length:
            conn.next_off[d] = max(ch.offset, expected or 0)
            self._write_back(conn)   # a progress mark: nothing more to parse
            return
        n = len(ch.data)
        conn.received[d] += n
        if ch.length > n and n < CHUNK and conn.skip_sent[d] <= ch.offset:
            # Cut short by the budget outside a body being skipped: the kernel's room is
            # 0, whatever we counted (chunks we could not place before the connection
            # was known used it). Inside a skip range the cut is the body in flight
            # before our skip landed: granting there would only copy more of it.
            conn.received[d] = max(conn.received[d], conn.allowance[d])
        if ch.data.startswith(_HTTP_STARTS):
            end = ch.data.find(b"\r\n\r\n")
            head = end + 4 if end >= 0 else 1 << 32
            if head > conn.head_max[d]:
                conn.head_max[d] = head
        conn.next_off[d] = ch.offset + ch.length
        if conn.waiting:
            if ed != 0 or not ch.data.startswith(_REQUEST_STARTS):
                self._write_back(conn)    # keeps the allowance for the next head
                return
            # A request starts here: a fresh reassembler and parser from this chunk on.
            conn.waiting = False
            st.l7 = None
            st.l7_off = False
            st.l7_skip = None
        wire = ch.length if ch.length > n else None
        engine = self.engine
        errors = engine.stats.parser_errors
        events = sum(engine.stats.events.values())
        engine.tcp_segment(st, ed, ch.offset & _M32, 0, 0, ch.data, ts, wire)
        if sum(engine.stats.events.values()) > events:
            conn.resyncs = 0   # parsing works again: MAX_RESYNCS counts failures in a row
        if (st.l7_off and engine.stats.parser_errors > errors and st.l7 is not None
                and st.l7.app_proto == "http" and conn.resyncs < MAX_RESYNCS):
            conn.resyncs += 1
            stats.resyncs += 1
            conn.waiting = True
            st.l7_off = False
            st.l7_skip = None
        self._write_back(conn)

    def _new_conn(self, ch: Chunk, cid: tuple[int, int], offset_ns: int,
                  now_mono: int, ep: Endpoint | None) -> _Conn | None:
        stats = self.stats
        if ep is None:
            ep = self._socket(ch)
        if ep is None:
            stats.no_socket_chunks += 1
            pending = self._pending.setdefault(cid, [0, now_mono])
            pending[0] += 1
            if pending[0] >= MAX_NO_SOCKET:
                stats.no_socket += 1
                self._pending.pop(cid, None)
                stats.held_dropped += 1
                self._stop_id(cid, ch.fd)
            elif len(self._pending) > MAX_CONNS:
                # Bounded: the oldest is given up (and counted) to make room.
                oldest = next(iter(self._pending))
                self._pending.pop(oldest)
                stats.held_dropped += len(self._unhold(oldest))
                stats.no_socket += 1
                self._hold(cid, ch)
            else:
                self._hold(cid, ch)
            return None
        self._pending.pop(cid, None)
        if self.ports and ep.local_port not in self.ports and ep.remote_port not in self.ports:
            stats.not_selected += 1
            self._stop_id(cid, ch.fd)
            return None
        if len(self._conns) >= MAX_CONNS:
            stats.refused += 1
            self._stop_id(cid, ch.fd)
            return None
        key = _key(ep.local, ep.local_port, ep.remote, ep.remote_port)
        if key in self._by_flow:
            stats.duplicate_views += 1
            self._stop_id(cid, ch.fd)
            return None
        lo_is_local = (ep.local, ep.local_port) <= (ep.remote, ep.remote_port)
        a, pa, b, pb = ((ep.local, ep.local_port, ep.remote, ep.remote_port) if lo_is_local
                        else (ep.remote, ep.remote_port, ep.local, ep.local_port))
        origin = self._origin(key)
        if origin is not None:
            init, first_ns = origin
        else:
            # No kernel flow: the initiator is the side that did not accept.
            local_side = 0 if lo_is_local else 1
            init = 1 - local_side if ep.server else local_side
            first_ns = ch.ts_ns
        st = _PlainFlow(key, a, pa, b, pb, PROTO_TCP, 0, 0, 0, init, first_ns + offset_ns)
        identify(st, self.sensor_id, self.engine.community)
        uid = self._uid_of(key)
        if uid:
            st.uid = uid
        # Engine direction 0 is the initiator's: its writes are the kernel's WRITE (1).
        flip = 1 if init == (0 if lo_is_local else 1) else 0
        conn = _Conn(cid, ch.fd, key, st, flip, self.budget, now_mono)
        st.reset_local = lambda: self._reset_local(cid[0], ep)
        self._conns[cid] = conn
        self._by_flow[key] = conn
        self._done.pop(cid, None)
        stats.conns += 1
        return conn

    def _hold(self, cid: tuple[int, int], ch: Chunk) -> None:
        if self._held_octets + len(ch.data) > MAX_HELD_OCTETS:
            self.stats.held_dropped += 1
            return
        self._held.setdefault(cid, []).append(ch)
        self._held_octets += len(ch.data)

    def _unhold(self, cid: tuple[int, int]) -> list[Chunk]:
        held = self._held.pop(cid, [])
        self._held_octets -= sum(len(c.data) for c in held)
        return held

    # -- the kernel's budget -----------------------------------------------------------------

    def _stop_id(self, cid: tuple[int, int], fd: int) -> None:
        ctl = TlsCtl(flags=CTL_DONE)
        self.stats.stops += 1
        self.stats.held_dropped += len(self._unhold(cid))
        if not self._control.write_ctl(cid[0], cid[1], ctl):
            self.stats.ctl_refused += 1
        self._done[cid] = fd
        while len(self._done) > MAX_CONNS:
            self._done.pop(next(iter(self._done)))

    def _write_ctl(self, conn: _Conn) -> None:
        if not self._control.write_ctl(conn.id[0], conn.id[1], conn.ctl):
            self.stats.ctl_refused += 1

    def _write_back(self, conn: _Conn) -> None:
        st = conn.state
        if st.l7_off:
            conn.stopped = True
            self._stop_id(conn.id, conn.fd)
            return
        changed = False
        skip = st.l7_skip
        if skip is not None:
            for side in (0, 1):
                until = skip[side]
                if until is None:
                    continue
                d = (side ^ st.init) ^ conn.flip    # canonical side -> engine -> kernel dir
                base = conn.next_off[d] or 0
                off = base + ((until - base) & _M32)
                if off > conn.skip_sent[d]:
                    conn.skip_sent[d] = off
                    conn.ctl.skip_until[d] = off
                    self.stats.skips += 1
                    changed = True
                    # Until the skip reaches the kernel, the body in flight uses up the
                    # allowance (as live.py's policy): granted right behind the skip,
                    # the next head finds room however late we get to the body's chunks.
                    room = max(conn.allowance[d] - conn.received[d], 0)
                    after = room - min(off - base, room)
                    target = self._room_target(conn, d)
                    if after < target:
                        self._grant(conn, d, target - after)
        for d in (0, 1):
            target = self._room_target(conn, d)
            room = conn.allowance[d] - conn.received[d]
            if room < target // 2:
                self._grant(conn, d, target - max(room, 0))
                changed = True
        if changed:
            self._write_ctl(conn)

    def _grant(self, conn: _Conn, d: int, octets: int) -> None:
        conn.ctl.grant[d] += octets
        conn.allowance[d] += octets
        self.stats.grants += 1

    def _room_target(self, conn: _Conn, d: int) -> int:
        floor = max(self.refill_octets, ROOM_TARGET)
        # Four of the largest heads seen, never more than the initial budget.
        target = max(floor, min(HEAD_ROOM_FACTOR * conn.head_max[d], self.budget))
        if self.rules is not None:
            # Plus the request body prefix the rules asked for (as live.py's policy).
            parser = conn.state.l7.parser if conn.state.l7 is not None else None
            wanted = getattr(parser, "wanted", None)
            if wanted is not None:
                target += wanted(Direction(d ^ conn.flip))
        return target

    # -- flow records ---------------------------------------------------------------------------

    def join(self, record: Flow) -> Flow:
        """The record with the uid its plaintext events carry; a final record ends the
        plaintext state of its connection (its last transactions come out first)."""
        if record.protocol != PROTO_TCP or not self._by_flow:
            return record
        key = _key(_pack(record.src_addr), record.src_port, _pack(record.dst_addr),
                   record.dst_port)
        conn = self._by_flow.get(key)
        if conn is None:
            return record
        if record.flow_end_reason != FlowEndReason.ACTIVE_TIMEOUT:
            self._end(conn)
        self.stats.joined += 1
        return dataclasses.replace(record, uid=conn.state.uid)

    def _reset_local(self, pid: int, ep: Endpoint) -> bool:
        why = self.resolver.destroy(pid, ep)
        if why:
            log.warning("TLS plaintext: a blocked connection of process %d was not reset: %s",
                        pid, why)
        return not why

    def _end(self, conn: _Conn) -> None:
        self._current = conn   # a verdict on its last transaction names this flow
        try:
            self.engine.flow_ending(conn.state)
        finally:
            self._current = None
        self._conns.pop(conn.id, None)
        if self._by_flow.get(conn.flow) is conn:
            del self._by_flow[conn.flow]

    def expire(self, now_mono: int) -> None:
        for conn in [c for c in self._conns.values() if now_mono - c.last_mono > self.expire_ns]:
            self._end(conn)
        # An object that sent fewer than MAX_NO_SOCKET chunks without a socket is lost
        # all the same: counted once it waited PENDING_NS (or at shutdown).
        stale = [cid for cid, (_, first) in self._pending.items()
                 if now_mono - first > PENDING_NS]
        for cid in stale:
            del self._pending[cid]
            self.stats.held_dropped += len(self._unhold(cid))
        self.stats.no_socket += len(stale)

    def flush_all(self) -> None:
        self.expire(now_mono=1 << 62)


class _PlainFlow(FlowState):
    """A flow seen in plaintext. reset_local() resets both ends of a blocked one
    (sensor/enforce/enforcer.py): its stream offsets are not TCP sequence numbers, so the
    probed process's socket is aborted on this host (plaintext_socket.destroy)."""

    __slots__ = ("reset_local",)


def _plaintext_rules(base, current_flow: Callable[[], FlowState | None]):
    """The wire's rules Analyzer as the plaintext stage uses it: the same engine (a
    reload swaps it for both), alerts and verdict sink, with the flow being parsed taken
    from this stage, so a request's block is enforced the moment the request is complete
    (Analyzer.request_done), before its response, as on the wire. No on_pass: hold mode
    releases a flow at a TCP sequence number, which plaintext offsets are not."""
    from sensor.rules.engine import Analyzer  # noqa: PLC0415

    sink = base.on_verdict
    if sink is not None and "flow" in inspect.signature(sink).parameters:
        # The enforcer (Enforcer.on_verdict) is handed the plaintext flow: its own
        # current_flow is the wire stage's.
        def on_verdict(verdict, _sink=sink):
            return _sink(verdict, flow=current_flow())
    else:
        on_verdict = sink

    class PlaintextRules(Analyzer):
        def __init__(self) -> None:   # not Analyzer's: the engine is the wire's
            self.emit = base.emit
            self.on_verdict = on_verdict
            self.on_pass = None
            self.current_flow = current_flow if base.current_flow is not None else None
            self._early = OrderedDict()
            self.reloads = 0

        @property
        def engine(self):
            return base.engine

    return PlaintextRules()


def _pack(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)


def _key(a: bytes, pa: int, b: bytes, pb: int) -> bytes:
    """The kernel's canonical flow key of a TCP connection, without interface or VLAN
    (those are the wire's; the caller's origin() tries the attached interfaces)."""
    (la, lp), (ha, hp) = sorted([(a, pa), (b, pb)])
    k = abi.FlowKey(port_lo=lp, port_hi=hp, protocol=PROTO_TCP, ip_version=4 if len(a) == 4 else 6)
    ctypes.memmove(k.addr_lo, la, len(la))
    ctypes.memmove(k.addr_hi, ha, len(ha))
    return bytes(k)


class _Parsers(ParserRegistry):
    """The default parsers with [redaction] enabled handed to those that take it (as the
    wire's, sensor/engine/live.py)."""

    def __init__(self, redact: bool) -> None:
        super().__init__()
        self.redact = redact

    def create(self, name: str, **options):
        options.setdefault("redact", self.redact)
        return super().create(name, **options)
