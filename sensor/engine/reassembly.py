"""TCP stream reassembly, sans-I/O: segments in, ordered stream events out.

Strategy
- One `StreamReassembler` per direction of a TCP flow; `FlowReassembler` pairs the two,
  routes ACKs to the opposite direction and makes an RST end both.
- Sequence numbers are 32-bit and wrap (RFC 9293 §3.4). Internally every byte has an
  unbounded stream offset: a segment's offset is found by unwrapping its seq relative to
  the next expected byte (serial arithmetic, RFC 1982), so a stream may cross 2^32 any
  number of times.
- Output is `Data` (in order, never joined across a hole), `Gap` (bytes that will never
  arrive: lost, truncated by the capture layer, or given up for memory), `Skip` (bytes the
  engine chose not to receive, see `skip`) and `Eof` (FIN reached, or RST). Every byte of
  the stream between the first byte and the FIN is reported exactly once as Data, Gap or
  Skip, which is what `L7Coverage` counts.
- Overlaps are resolved first-wins, like Linux's receive path and Suricata's default
  ("first" policy) on most targets: bytes already accepted for an offset are kept, later
  copies are dropped. When a later copy carries different bytes, that is a classic IDS
  evasion signal (Ptacek & Newsham 1998), counted as an overlap conflict. Buffered
  out-of-order bytes are always compared; already-delivered bytes are compared against a
  small window of recently delivered segments (`history_bytes`), the range where real
  retransmissions land.
- Mid-stream pickup: without a SYN, the stream starts at the first segment seen. Bytes
  that arrive later for an earlier offset are treated as retransmissions of data before
  the pickup point (counted as overlaps, never delivered).
- Holes are declared lost when (a) the other side ACKs past them (the host got the bytes,
  the capture did not; Zeek's "ack above hole"), (b) a memory bound forces the stream to
  give up its oldest hole, or (c) the stream is flushed at FIN, RST or flow end.
- FIN: data past the FIN's sequence number is ignored and counted. RST: both directions
  end at once (RFC 9293 §3.10.7.4); pending holes become gaps, buffered data is delivered.
  An RST is not checked against the window: a sensor cannot know the receiver's window
  exactly, and missing a real reset would leave the stream open until the idle timeout.

Bounds (why): an out-of-order buffer holds bytes the L7 parser cannot use until a hole
fills, so it is bounded per stream (segments and bytes) and globally by one
`MemoryBudget` shared by every stream of the engine; whichever bound is hit, the stream
gives up its oldest hole (a counted `Gap`) and carries on.
"""

from __future__ import annotations

import bisect
import enum
from collections import deque
from dataclasses import dataclass

from sensor.flow.semantics import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN
from sensor.model import L7Coverage, trusted

# Made from this module's own counters, all non-negative ints (model.trusted).
_COVERAGE = trusted(L7Coverage)

SEQ_MOD = 1 << 32
_SEQ_MASK = SEQ_MOD - 1
_HALF = 1 << 31


class GapCause(str, enum.Enum):
    LOST = "lost"            # never seen: capture loss, ring buffer full, missed segment
    TRUNCATED = "truncated"  # seen on the wire but not copied (snaplen, kernel budget)
    MEMORY = "memory"        # seen, but given up because a buffer bound was hit


@dataclass(frozen=True, slots=True)
class Data:
    data: bytes
    ts_ns: int


@dataclass(frozen=True, slots=True)
class Gap:
    length: int
    ts_ns: int
    cause: GapCause = GapCause.LOST


@dataclass(frozen=True, slots=True)
class Skip:
    length: int
    ts_ns: int


@dataclass(frozen=True, slots=True)
class Eof:
    ts_ns: int
    reset: bool = False


StreamEvent = Data | Gap | Skip | Eof


@dataclass(frozen=True, slots=True, kw_only=True)
class ReassemblyLimits:
    # 1 MiB: roughly one receive window of a fast LAN path; a hole that is still open
    # after that much later data has almost certainly been lost by the capture.
    max_buffered_bytes: int = 1 << 20
    # Inserting into the sorted buffer is O(segments); 1024 keeps that cheap and still
    # covers ~1.4 MiB of full-size segments.
    max_buffered_segments: int = 1024
    # RFC 7323 §2.3: the largest window is 2^30 bytes, so a segment further ahead than
    # that cannot be in flight and is dropped (counted as out of window).
    max_window: int = 1 << 30
    # Retransmissions land on recently delivered bytes; 8 KiB of history lets conflicts
    # there be seen without holding much per stream (charged to the global budget).
    history_bytes: int = 8192
    # Infer loss when the peer ACKs past a hole. Turn off when the capture may deliver a
    # direction's segments later than the other direction's ACKs.
    ack_gaps: bool = True

    def __post_init__(self) -> None:
        for name in ("max_buffered_bytes", "max_buffered_segments", "max_window"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_window >= _HALF:
            raise ValueError("max_window must be below 2^31 (sequence space ambiguity)")
        if self.history_bytes < 0:
            raise ValueError("history_bytes must not be negative")


DEFAULT_LIMITS = ReassemblyLimits()
_NOTHING: tuple = ()


class MemoryBudget:
    """Bytes of out-of-order data (and delivery history) held by all streams together.

    One instance is shared by every stream of an engine. A stream that cannot reserve
    gives up its oldest hole instead of growing."""

    __slots__ = ("limit", "used", "refusals")

    def __init__(self, limit: int = 64 << 20) -> None:
        # 64 MiB default: well inside DESIGN.md's 1 GiB peak RSS target while covering
        # ~64 streams each with a full 1 MiB hole at once.
        if limit <= 0:
            raise ValueError("memory budget must be positive")
        self.limit = limit
        self.used = 0
        self.refusals = 0

    def try_reserve(self, n: int) -> bool:
        if self.used + n > self.limit:
            self.refusals += 1
            return False
        self.used += n
        return True

    def release(self, n: int) -> None:
        self.used -= n


class StreamCounters:
    """Per-direction counters. Every stream byte is in exactly one of data_bytes,
    gap_bytes (lost or given up for memory; memory_drop_bytes is the part given up),
    truncated_bytes and skipped_bytes, as L7Coverage wants them."""

    __slots__ = (
        "segments", "data_bytes", "gaps", "gap_bytes", "truncated_bytes", "skipped_bytes",
        "overlaps", "overlap_bytes", "overlap_conflicts", "out_of_window",
        "memory_drops", "memory_drop_bytes", "after_fin_segments", "after_fin_bytes",
    )

    def __init__(self) -> None:
        # Spelled out rather than a setattr loop over __slots__: two of these are made
        # for every inspected TCP flow.
        self.segments = self.data_bytes = self.gaps = self.gap_bytes = 0
        self.truncated_bytes = self.skipped_bytes = 0
        self.overlaps = self.overlap_bytes = self.overlap_conflicts = 0
        self.out_of_window = self.memory_drops = self.memory_drop_bytes = 0
        self.after_fin_segments = self.after_fin_bytes = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class StreamReassembler:
    """One direction of a TCP connection. Feed it with `segment`; it returns events."""

    __slots__ = (
        "limits", "budget", "counters", "started", "eof",
        "_base", "_next", "_fin", "_skip_until",
        "_starts", "_segs", "_buffered",
        "_hist", "_hist_bytes",
    )

    def __init__(self, budget: MemoryBudget | None = None,
                 limits: ReassemblyLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self.budget = budget if budget is not None else MemoryBudget()
        self.counters = StreamCounters()
        self.started = False
        self.eof = False
        self._base = 0          # seq of stream offset 0
        self._next = 0          # offset of the next byte to deliver
        self._fin: int | None = None   # offset of the FIN (the byte after the last one)
        self._skip_until = 0    # offsets below this are reported as Skip, not Data
        # Out-of-order buffer: non-overlapping pieces sorted by start offset.
        # Each piece is (start, end, data or None for truncated bytes, ts_ns). Both
        # start as the shared empty tuple and become lists when a piece is first held:
        # most streams never hold one, and two streams are made for every TCP flow.
        self._starts: list[int] | tuple = _NOTHING
        self._segs: list[tuple[int, int, bytes | None, int]] | tuple = _NOTHING
        self._buffered = 0
        self._hist: deque[tuple[int, bytes]] | None = None   # made on first delivery
        self._hist_bytes = 0

    # -- sequence arithmetic ---------------------------------------------------------

    def _offset(self, seq: int) -> int:
        """The stream offset of `seq`: the one nearest the next expected byte."""
        rel = (seq - self._base) & _SEQ_MASK
        delta = ((rel - self._next + _HALF) & _SEQ_MASK) - _HALF
        return self._next + delta

    def seq_at(self, offset: int) -> int:
        """The wire sequence number of a stream offset (for the kernel's skip map)."""
        return (self._base + offset) & _SEQ_MASK

    @property
    def next_seq(self) -> int:
        return self.seq_at(self._next)

    @property
    def offset(self) -> int:
        """Stream bytes accounted so far (delivered, gapped or skipped)."""
        return self._next

    @property
    def buffered_bytes(self) -> int:
        return self._buffered

    # -- input -----------------------------------------------------------------------

    def segment(self, seq: int, flags: int, payload: bytes, ts_ns: int,
                wire_len: int | None = None) -> list[StreamEvent]:
        """One TCP segment of this direction. `wire_len` is the payload length on the
        wire when the capture layer copied only `payload` (a prefix); the rest is
        reported as a truncation Gap when the stream reaches it."""
        out: list[StreamEvent] = []
        if self.eof:
            if payload or (wire_len or 0):
                self.counters.after_fin_segments += 1
                self.counters.after_fin_bytes += max(len(payload), wire_len or 0)
            return out
        self.counters.segments += 1
        seq &= _SEQ_MASK
        if not self.started:
            self.started = True
            # A SYN consumes one sequence number (RFC 9293 §3.4); data starts after it.
            self._base = (seq + 1) & _SEQ_MASK if flags & TCP_SYN else seq
            self._next = 0
        if flags & TCP_RST:
            self._finish(out, ts_ns, reset=True)
            return out
        off = self._offset(seq)
        if flags & TCP_SYN:
            off += 1  # a SYN's data (TCP Fast Open) starts after the SYN's own number
        n = len(payload)
        total = n if wire_len is None or wire_len < n else wire_len
        end = off + total
        if off - self._next > self.limits.max_window:
            self.counters.out_of_window += 1
            return out
        if flags & TCP_FIN:
            self._set_fin(end)
        if self._fin is not None and end > self._fin:
            dropped = end - max(off, self._fin)
            self.counters.after_fin_segments += 1
            self.counters.after_fin_bytes += dropped
            if off >= self._fin:
                self._check_fin(out, ts_ns)
                return out
            total -= dropped
            end = self._fin
            if n > total:
                payload = payload[:total]
                n = total
        if total:
            if off == self._next and not self._segs:
                # The common case, kept short: in order with nothing buffered.
                if n:
                    if self._skip_until > off:
                        self._deliver(out, payload, n, ts_ns)
                    else:
                        self.counters.data_bytes += n
                        out.append(Data(payload, ts_ns))
                        self._next = off + n
                        if self.limits.history_bytes:
                            self._remember(off, payload)
                if total > n:
                    self._deliver(out, None, total - n, ts_ns)
            else:
                self._insert(out, off, payload, n, total, ts_ns)
        self._check_fin(out, ts_ns)
        return out

    def ack(self, ack: int, ts_ns: int) -> list[StreamEvent]:
        """The peer acknowledged everything before `ack`: bytes below it that have not
        arrived were lost by the capture, not by the network."""
        out: list[StreamEvent] = []
        if not self.started or self.eof or not self.limits.ack_gaps:
            return out
        upto = self._offset(ack & _SEQ_MASK)
        if self._fin is not None and upto > self._fin:
            upto = self._fin  # the ACK of a FIN covers its sequence number, not a byte
        if upto <= self._next or upto - self._next > self.limits.max_window:
            return out
        self._give_up_until(out, upto, ts_ns, GapCause.LOST)
        self._check_fin(out, ts_ns)
        return out

    def skip(self, length: int, ts_ns: int = 0) -> int:
        """Do not deliver the next `length` bytes: they become Skip events when they
        arrive, or when later bytes, an ACK past them or the end of the stream show that
        they were sent. `length` counts from the end of the last event returned, so call
        it after a whole batch of events went to the parser (whose skip_hint is then
        relative to the same place). Returns the wire seq where skipping ends, for the
        kernel's skip map."""
        if length < 0:
            raise ValueError("skip length must not be negative")
        until = self._next + length
        if until > self._skip_until:
            self._skip_until = until
        return self.seq_at(self._skip_until)

    def skip_to_seq(self, seq: int) -> None:
        """Do not deliver bytes before wire sequence number `seq`."""
        off = self._offset(seq & _SEQ_MASK)
        if off > self._skip_until:
            self._skip_until = off

    def lose_to_seq(self, seq: int, ts_ns: int) -> list[StreamEvent]:
        """Bytes before wire sequence number `seq` that have not arrived never will (the
        kernel's ring buffer refused them): a Gap now, with buffered data between holes
        delivered; a skip range set over them still turns its part into a Skip."""
        out: list[StreamEvent] = []
        if not self.started or self.eof:
            return out
        upto = self._offset(seq & _SEQ_MASK)
        if upto <= self._next or upto - self._next > self.limits.max_window:
            return out
        self._give_up_until(out, upto, ts_ns, GapCause.LOST)
        self._check_fin(out, ts_ns)
        return out

    def truncated(self, seq: int, length: int, ts_ns: int) -> list[StreamEvent]:
        """`length` bytes at `seq` existed on the wire but were not copied to us."""
        if length <= 0:
            return []
        return self.segment(seq, 0, b"", ts_ns, wire_len=length)

    def flush(self, ts_ns: int) -> list[StreamEvent]:
        """Flow end without FIN/RST: every hole becomes a Gap and buffered data is
        delivered, then Eof."""
        out: list[StreamEvent] = []
        if not self.eof:
            self._finish(out, ts_ns, reset=False)
        return out

    def close(self) -> None:
        """Give back everything charged to the budget (the flow is being dropped)."""
        self.budget.release(self._buffered + self._hist_bytes)
        self._buffered = 0
        self._hist_bytes = 0
        self._segs = self._starts = _NOTHING
        self._hist = None

    # -- internals ---------------------------------------------------------------------

    def _set_fin(self, end: int) -> None:
        if self._fin is None or end < self._fin:
            self._fin = end
            # Buffered bytes beyond the FIN can never be delivered.
            while self._segs and self._segs[-1][1] > self._fin:
                start, stop, data, ts = self._segs.pop()
                self._starts.pop()
                self._release(stop - start if data is not None else 0)
                keep = self._fin - start
                self.counters.after_fin_bytes += stop - max(start, self._fin)
                if keep > 0:
                    piece = data[:keep] if data is not None else None
                    self._segs.append((start, self._fin, piece, ts))
                    self._starts.append(start)
                    if piece is not None:
                        self._buffered += keep
                        self.budget.used += keep  # re-charge the kept prefix
                    break

    def _check_fin(self, out: list[StreamEvent], ts_ns: int) -> None:
        if self._fin is not None and self._next >= self._fin and not self.eof:
            self.eof = True
            out.append(Eof(ts_ns, False))
            self.close()

    def _finish(self, out: list[StreamEvent], ts_ns: int, reset: bool) -> None:
        if self._segs:
            self._give_up_until(out, self._segs[-1][1], ts_ns, GapCause.LOST)
        if self._fin is not None and self._fin > self._next:
            self._lose(out, self._fin - self._next, ts_ns, GapCause.LOST)
        self.eof = True
        out.append(Eof(ts_ns, reset))
        self.close()

    def _release(self, n: int) -> None:
        self._buffered -= n
        self.budget.release(n)

    def _remember(self, off: int, data: bytes) -> None:
        """Keep a reference to delivered bytes for comparing retransmissions: at least
        the latest segment, older ones while the total stays within history_bytes."""
        n = len(data)
        budget = self.budget
        if budget.used + n > budget.limit:
            return  # history is a nicety; never let it take reassembly memory
        budget.used += n
        hist = self._hist
        if hist is None:
            hist = self._hist = deque()
        hist.append((off, data))
        total = self._hist_bytes + n
        limit = self.limits.history_bytes
        while total > limit and len(hist) > 1:
            old = len(hist.popleft()[1])
            total -= old
            budget.used -= old
        self._hist_bytes = total

    def _deliver(self, out: list[StreamEvent], data: bytes | None, n: int,
                 ts_ns: int) -> None:
        """Account `n` bytes at the next offset: Skip inside a skip range, else Data (or
        a truncation Gap when data is None)."""
        if self._skip_until > self._next:
            k = min(n, self._skip_until - self._next)
            self._skipped(out, k, ts_ns)
            if k == n:
                return
            n -= k
            if data is not None:
                data = data[k:]
        if data is None:
            self.counters.truncated_bytes += n
            out.append(Gap(n, ts_ns, GapCause.TRUNCATED))
        else:
            self.counters.data_bytes += n
            out.append(Data(data, ts_ns))
        self._next += n

    def _skipped(self, out: list[StreamEvent], n: int, ts_ns: int) -> None:
        self.counters.skipped_bytes += n
        self._next += n
        if out and type(out[-1]) is Skip:
            out[-1] = Skip(out[-1].length + n, ts_ns)
        else:
            out.append(Skip(n, ts_ns))

    def _lose(self, out: list[StreamEvent], n: int, ts_ns: int, cause: GapCause) -> None:
        """`n` bytes at the next offset will never arrive."""
        if self._skip_until > self._next:
            k = min(n, self._skip_until - self._next)
            self._skipped(out, k, ts_ns)
            n -= k
            if not n:
                return
        c = self.counters
        c.gaps += 1
        c.gap_bytes += n
        if cause is GapCause.MEMORY:
            c.memory_drops += 1
            c.memory_drop_bytes += n
        out.append(Gap(n, ts_ns, cause))
        self._next += n

    def _drain(self, out: list[StreamEvent]) -> None:
        """Deliver buffered pieces that are now in order."""
        segs, starts = self._segs, self._starts
        while segs:
            if starts[0] > self._next:
                if self._skip_until > self._next:
                    # A hole inside a skip range: those bytes were not wanted anyway.
                    self._skipped(out, min(starts[0], self._skip_until) - self._next,
                                  segs[0][3])
                    continue
                break
            start, stop, data, ts = segs.pop(0)
            starts.pop(0)
            if data is not None:
                self._release(stop - start)
            if stop <= self._next:
                continue  # covered meanwhile by a gap or skip
            if start < self._next:
                cut = self._next - start
                data = data[cut:] if data is not None else None
                start = self._next
            if data is not None and self.limits.history_bytes:
                self._remember(start, data)
            self._deliver(out, data, stop - start, ts)

    def _give_up_until(self, out: list[StreamEvent], upto: int, ts_ns: int,
                       cause: GapCause) -> None:
        """Declare every hole below `upto` lost, delivering buffered data between them."""
        while self._next < upto:
            if self._segs and self._starts[0] <= self._next:
                self._drain(out)
                continue
            hole_end = self._starts[0] if self._segs else upto
            self._lose(out, min(hole_end, upto) - self._next, ts_ns, cause)
            self._drain(out)

    def _give_up_oldest_hole(self, out: list[StreamEvent], ts_ns: int) -> None:
        self._lose(out, self._starts[0] - self._next, ts_ns, GapCause.MEMORY)
        self._drain(out)

    def _compare_history(self, off: int, end: int, payload: bytes, seg_off: int) -> bool:
        """True when delivered bytes in [off, end) that we still remember differ."""
        for h_off, h_data in self._hist:
            h_end = h_off + len(h_data)
            lo, hi = max(off, h_off), min(end, h_end)
            if lo < hi and payload[lo - seg_off:hi - seg_off] != h_data[lo - h_off:hi - h_off]:
                return True
        return False

    def _insert(self, out: list[StreamEvent], off: int, payload: bytes, n: int,
                total: int, ts_ns: int) -> None:
        end = off + total
        c = self.counters
        conflict = False
        overlap = 0
        cur = off
        if cur < self._next:
            # Retransmission of bytes already delivered, gapped or skipped.
            upto = min(end, self._next)
            overlap += upto - cur
            if n and self._hist:
                conflict = self._compare_history(cur, min(upto, off + n), payload, off)
            cur = upto
        if cur < self._skip_until:
            # Bytes inside a skip range are not wanted: no need to buffer them.
            cur = min(end, self._skip_until) if cur >= self._next else cur
        pieces: list[tuple[int, int, bytes | None, int]] = []
        segs, starts = self._segs, self._starts
        i = bisect.bisect_right(starts, cur) - 1
        if i < 0 or segs[i][1] <= cur:
            i += 1
        while cur < end:
            if i < len(segs) and segs[i][0] <= cur:
                s_start, s_end, s_data, _ = segs[i]
                hi = min(end, s_end)
                overlap += hi - cur
                if s_data is not None and cur < off + n:
                    top = min(hi, off + n)
                    if payload[cur - off:top - off] != s_data[cur - s_start:top - s_start]:
                        conflict = True
                cur = hi
                i += 1
            else:
                nxt = segs[i][0] if i < len(segs) else end
                hi = min(end, nxt)
                if cur < off + n:
                    top = min(hi, off + n)
                    pieces.append((cur, top, payload[cur - off:top - off] if (cur, top) != (off, off + n) else payload, ts_ns))
                    if top < hi:
                        pieces.append((top, hi, None, ts_ns))
                else:
                    pieces.append((cur, hi, None, ts_ns))
                cur = hi
        if overlap:
            c.overlaps += 1
            c.overlap_bytes += overlap
            if conflict:
                c.overlap_conflicts += 1
        for piece in pieces:
            self._store(out, piece, ts_ns)
        self._drain(out)

    def _store(self, out: list[StreamEvent], piece: tuple[int, int, bytes | None, int],
               ts_ns: int) -> None:
        start, stop, data, _ = piece
        if stop <= self._next:
            return  # a give-up meanwhile moved past it; it was counted in that gap
        if start < self._next:
            data = data[self._next - start:] if data is not None else None
            start = self._next
            piece = (start, stop, data, piece[3])
        size = stop - start if data is not None else 0
        limits = self.limits
        while True:
            if start == self._next:
                # In order now (a give-up reached it): deliver without buffering.
                if data is not None and limits.history_bytes:
                    self._remember(start, data)
                self._deliver(out, data, stop - start, piece[3])
                return
            fits = (self._buffered + size <= limits.max_buffered_bytes
                    and len(self._segs) < limits.max_buffered_segments)
            if fits and self.budget.try_reserve(size):
                break
            if self._segs and self._starts[0] < start:
                self._give_up_oldest_hole(out, ts_ns)
            else:
                # Nothing older to give up: the hole before this piece goes.
                self._lose(out, start - self._next, ts_ns, GapCause.MEMORY)
        self._buffered += size
        if not self._segs:
            self._segs, self._starts = [], []
        i = bisect.bisect_left(self._starts, start)
        self._starts.insert(i, start)
        self._segs.insert(i, piece)


class FlowReassembler:
    """Both directions of one TCP connection. Direction 0 is the initiator's."""

    __slots__ = ("streams",)

    def __init__(self, budget: MemoryBudget | None = None,
                 limits: ReassemblyLimits = DEFAULT_LIMITS) -> None:
        budget = budget if budget is not None else MemoryBudget()
        self.streams = (StreamReassembler(budget, limits), StreamReassembler(budget, limits))

    def segment(self, direction: int, seq: int, ack: int, flags: int, payload: bytes,
                ts_ns: int, wire_len: int | None = None) -> list[tuple[int, StreamEvent]]:
        """One segment sent in `direction`; returns (direction, event) pairs."""
        result: list[tuple[int, StreamEvent]] = []
        streams = self.streams
        if not flags & (TCP_RST | TCP_SYN | TCP_FIN) and payload \
                and (wire_len is None or wire_len <= len(payload)):
            # The common case, decided here without a call per direction: an ACK that
            # acknowledges nothing unseen, carrying the next in-order bytes of a stream
            # with nothing buffered, no FIN and no skip range. Same effects as the
            # general path below.
            other = streams[1 - direction]
            if flags & TCP_ACK and other.started and not other.eof \
                    and (ack - other._base - other._next + _HALF) & _SEQ_MASK > _HALF:
                for ev in other.ack(ack, ts_ns):
                    result.append((1 - direction, ev))
            s = streams[direction]
            if s.started and not s.eof and not s._segs and s._fin is None \
                    and (seq - s._base - s._next) & _SEQ_MASK == 0 \
                    and s._skip_until <= s._next:
                n = len(payload)
                off = s._next
                c = s.counters
                c.segments += 1
                c.data_bytes += n
                s._next = off + n
                if s.limits.history_bytes:
                    s._remember(off, payload)
                result.append((direction, Data(payload, ts_ns)))
                return result
            for ev in s.segment(seq, flags, payload, ts_ns, wire_len):
                result.append((direction, ev))
            return result
        if flags & TCP_RST:
            # RFC 9293 §3.10.7.4: a reset ends the connection, both directions at once.
            for ev in self.streams[direction].segment(seq, TCP_RST, b"", ts_ns):
                result.append((direction, ev))
            other = 1 - direction
            for ev in self.streams[other].flush(ts_ns):
                result.append((other, Eof(ev.ts_ns, True) if type(ev) is Eof else ev))
            return result
        if flags & TCP_ACK:
            other = 1 - direction
            for ev in self.streams[other].ack(ack, ts_ns):
                result.append((other, ev))
        for ev in self.streams[direction].segment(seq, flags, payload, ts_ns, wire_len):
            result.append((direction, ev))
        return result

    def in_order(self, direction: int, seq: int, ack: int, flags: int, payload: bytes,
                 wire_len: int | None = None) -> int:
        """The common case of `segment`, accounted without making events: 1 when the
        segment carried the next in-order bytes of its stream and they are to be handed to
        the parser as they are (a Data of `payload`), 2 when they fell wholly inside the
        stream's skip range (a Skip of len(payload)), 0 when `segment` must run (nothing
        was changed), 3 for the bare SYN that starts its stream (nothing to hand on).
        The caller passes the bytes on itself, so the per-segment Data or Skip, its
        (direction, event) pair and the list holding it are never built; the counters and
        history end as `segment` leaves them."""
        if not payload:
            if flags & (TCP_RST | TCP_FIN) or not flags & TCP_SYN or wire_len:
                return 0
        elif flags & (TCP_RST | TCP_SYN | TCP_FIN) \
                or (wire_len is not None and wire_len > len(payload)):
            return 0
        streams = self.streams
        if flags & TCP_ACK:
            other = streams[1 - direction]
            if other.started and not other.eof \
                    and (ack - other._base - other._next + _HALF) & _SEQ_MASK > _HALF:
                return 0   # an ACK past the other side's next byte may declare a hole lost
        s = streams[direction]
        if not payload:
            # A SYN or SYN-ACK without data, the first of its stream: its number is the
            # stream's base (a SYN consumes one). A repeated one takes `segment`.
            if s.started or s.eof:
                return 0
            s.counters.segments += 1
            s.started = True
            s._base = (seq + 1) & _SEQ_MASK
            s._next = 0
            return 3
        if not s.started or s.eof or s._segs or s._fin is not None \
                or (seq - s._base - s._next) & _SEQ_MASK:
            return 0
        n = len(payload)
        off = s._next
        c = s.counters
        if s._skip_until <= off:
            c.segments += 1
            c.data_bytes += n
            s._next = off + n
            if s.limits.history_bytes:
                s._remember(off, payload)
            return 1
        if s._skip_until >= off + n:
            c.segments += 1
            c.skipped_bytes += n
            s._next = off + n
            return 2
        return 0   # a skip range ends inside this segment: Skip then Data, the long way

    def flush(self, ts_ns: int) -> list[tuple[int, StreamEvent]]:
        """The flow ended (timeout, eviction): close both directions."""
        return [(d, ev) for d in (0, 1) for ev in self.streams[d].flush(ts_ns)]

    def close(self) -> None:
        for stream in self.streams:
            stream.close()

    def coverage(self, *, sampled: bool = False) -> L7Coverage:
        """Both directions' byte accounting, for the Flow record."""
        a, b = self.streams[0].counters, self.streams[1].counters
        return _COVERAGE(
            inspected=True, sampled=sampled,
            captured_octets=a.data_bytes + b.data_bytes,
            truncated_octets=a.truncated_bytes + b.truncated_bytes,
            gap_octets=a.gap_bytes + b.gap_bytes,
            skipped_octets=a.skipped_bytes + b.skipped_bytes,
        )
