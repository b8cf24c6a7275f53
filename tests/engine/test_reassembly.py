"""TCP reassembly: ordering, overlaps (first wins), wraparound, gaps, skip, FIN/RST, bounds."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sensor.engine.reassembly import (
    Data,
    Eof,
    FlowReassembler,
    Gap,
    GapCause,
    MemoryBudget,
    ReassemblyLimits,
    Skip,
    StreamReassembler,
)
from sensor.flow.semantics import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN

ISN = 1000


def stream_bytes(events) -> bytes:
    return b"".join(e.data for e in events if type(e) is Data)


def feed(stream: StreamReassembler, segs, ts: int = 1):
    out = []
    for seq, payload in segs:
        out += stream.segment(seq, TCP_ACK, payload, ts)
    return out


def chop(data: bytes, base: int, sizes) -> list[tuple[int, bytes]]:
    segs, pos = [], 0
    for size in sizes:
        if pos >= len(data):
            break
        segs.append(((base + pos) % (1 << 32), data[pos:pos + size]))
        pos += size
    if pos < len(data):
        segs.append(((base + pos) % (1 << 32), data[pos:]))
    return segs


def test_in_order_delivers_each_segment_as_data():
    s = StreamReassembler()
    assert s.segment(ISN, TCP_SYN, b"", 1) == []
    out = feed(s, [(ISN + 1, b"GET / HTTP/1.1\r\n"), (ISN + 17, b"\r\n")], ts=5)
    assert out == [Data(b"GET / HTTP/1.1\r\n", 5), Data(b"\r\n", 5)]
    assert s.counters.data_bytes == 18 and s.counters.gaps == 0


def test_out_of_order_is_held_until_the_hole_fills():
    s = StreamReassembler()
    s.segment(ISN, TCP_SYN, b"", 1)
    assert s.segment(ISN + 6, TCP_ACK, b"world", 2) == []
    assert s.buffered_bytes == 5
    out = s.segment(ISN + 1, TCP_ACK, b"hello", 3)
    assert out == [Data(b"hello", 3), Data(b"world", 2)]
    assert s.buffered_bytes == 0 and s.budget.used <= s.limits.history_bytes


def test_duplicates_are_dropped_and_counted_without_conflict():
    s = StreamReassembler()
    out = feed(s, [(5, b"abcd"), (5, b"abcd"), (9, b"efgh"), (7, b"cdef")])
    assert stream_bytes(out) == b"abcdefgh"
    assert s.counters.overlaps == 2
    assert s.counters.overlap_bytes == 8
    assert s.counters.overlap_conflicts == 0


def test_overlap_first_wins_and_conflicts_are_counted_in_buffer():
    s = StreamReassembler()
    feed(s, [(0, b"AA")])
    assert feed(s, [(4, b"XXXX")]) == []          # buffered: offsets 4..8
    assert feed(s, [(6, b"YYZZ")]) == []          # overlaps 6..8 with different bytes
    out = feed(s, [(2, b"BB")])
    assert stream_bytes(out) == b"BBXXXXZZ"       # first copy of 6..8 won
    assert s.counters.overlap_conflicts == 1
    assert s.counters.overlap_bytes == 2


def test_overlap_conflict_against_already_delivered_bytes():
    s = StreamReassembler()
    feed(s, [(0, b"hello world")])
    assert feed(s, [(6, b"WORLD")]) == []
    assert s.counters.overlaps == 1 and s.counters.overlap_conflicts == 1
    feed(s, [(0, b"hello")])
    assert s.counters.overlaps == 2 and s.counters.overlap_conflicts == 1


def test_wraparound_near_2_32():
    data = bytes(range(256)) * 4
    isn = (1 << 32) - 300
    s = StreamReassembler()
    s.segment(isn, TCP_SYN, b"", 1)
    segs = chop(data, isn + 1, [100] * 20)
    random.Random(7).shuffle(segs)
    out = feed(s, segs)
    assert stream_bytes(out) == data
    assert s.counters.gaps == 0
    assert s.next_seq == (isn + 1 + len(data)) % (1 << 32)


def test_mid_stream_pickup_starts_at_first_segment():
    s = StreamReassembler()
    out = feed(s, [(777_000, b"HTTP/1.1 200 OK\r\n"), (777_017, b"\r\n")])
    assert stream_bytes(out) == b"HTTP/1.1 200 OK\r\n\r\n"
    # An earlier segment arriving later is before the pickup point: never delivered.
    assert feed(s, [(776_990, b"0123456789")]) == []
    assert s.counters.overlaps == 1


def test_ack_past_a_hole_reports_a_gap():
    flow = FlowReassembler()
    flow.segment(0, ISN, 0, TCP_SYN, b"", 1)
    flow.segment(0, ISN + 1, 0, TCP_ACK, b"abc", 2)
    flow.segment(0, ISN + 10, 0, TCP_ACK, b"xyz", 3)     # 6 bytes missing before it
    events = flow.segment(1, 5000, ISN + 13, TCP_ACK, b"", 4)
    assert events == [(0, Gap(6, 4, GapCause.LOST)), (0, Data(b"xyz", 3))]
    assert flow.streams[0].counters.gap_bytes == 6


def test_ack_past_the_end_reports_missing_tail():
    flow = FlowReassembler()
    flow.segment(0, ISN, 0, TCP_ACK, b"abc", 1)
    events = flow.segment(1, 1, ISN + 10, TCP_ACK, b"", 2)
    assert events == [(0, Gap(7, 2, GapCause.LOST))]


def test_fin_ends_stream_and_data_after_fin_is_counted():
    s = StreamReassembler()
    s.segment(ISN, TCP_SYN, b"", 1)
    out = s.segment(ISN + 1, TCP_ACK | TCP_FIN, b"bye", 2)
    assert out == [Data(b"bye", 2), Eof(2, False)]
    assert s.segment(ISN + 4, TCP_ACK, b"late", 3) == []
    assert s.counters.after_fin_bytes == 4


def test_out_of_order_fin_waits_for_the_data():
    s = StreamReassembler()
    s.segment(0, TCP_SYN, b"", 1)
    assert s.segment(4, TCP_ACK | TCP_FIN, b"de", 2) == []
    assert s.segment(6, TCP_ACK, b"junk", 2) == []          # past the FIN
    out = s.segment(1, TCP_ACK, b"abc", 3)
    assert stream_bytes(out) == b"abcde" and out[-1] == Eof(3, False)
    assert s.counters.after_fin_bytes == 4


def test_rst_ends_both_directions_and_flushes_holes():
    flow = FlowReassembler()
    flow.segment(0, 0, 0, TCP_SYN, b"", 1)
    flow.segment(1, 500, 1, TCP_SYN | TCP_ACK, b"", 1)
    flow.segment(0, 1, 501, TCP_ACK, b"req", 2)
    flow.segment(1, 501, 4, TCP_ACK, b"ab", 3)
    flow.segment(1, 505, 4, TCP_ACK, b"ef", 3)               # hole 503..505
    events = flow.segment(0, 4, 503, TCP_RST, b"", 4)
    assert (0, Eof(4, True)) in events
    assert (1, Gap(2, 4, GapCause.LOST)) in events
    assert (1, Data(b"ef", 3)) in events
    assert (1, Eof(4, True)) in events
    assert flow.streams[0].eof and flow.streams[1].eof


def test_flush_at_flow_end_reports_holes_then_eof():
    s = StreamReassembler()
    feed(s, [(0, b"ab"), (5, b"fg")])
    assert s.flush(9) == [Gap(3, 9, GapCause.LOST), Data(b"fg", 1), Eof(9, False)]
    assert s.budget.used == 0


def test_skip_until_reports_skip_not_data_and_not_gap():
    s = StreamReassembler()
    s.segment(0, TCP_SYN, b"", 1)
    feed(s, [(1, b"head")])
    end_seq = s.skip(10)
    assert end_seq == 15
    out = feed(s, [(5, b"0123")])
    assert out == [Skip(4, 1)]
    # The kernel never sent 9..15; the next segment starts after the skipped range.
    out = feed(s, [(15, b"tail")])
    assert out == [Skip(6, 1), Data(b"tail", 1)]
    c = s.counters
    assert (c.skipped_bytes, c.gap_bytes, c.data_bytes) == (10, 0, 8)


def test_skip_to_seq_and_a_segment_straddling_its_end():
    s = StreamReassembler()
    feed(s, [(100, b"ab")])
    s.skip_to_seq(105)
    assert feed(s, [(102, b"cdefgh")]) == [Skip(3, 1), Data(b"fgh", 1)]


def test_lose_to_seq_is_a_gap_now_and_keeps_a_skip_set_before_the_loss():
    # The kernel's frame walk: what it elided before the loss is a Skip, the rest of
    # the missing range a Gap at once (the ring refused a copy), then data goes on.
    s = StreamReassembler()
    feed(s, [(100, b"ab")])
    s.skip_to_seq(104)
    assert feed(s, [(110, b"late")]) == [Skip(2, 1)]   # the rest waits: a hole
    assert s.lose_to_seq(112, 2) == [Gap(6, 2, GapCause.LOST), Data(b"late", 1)]
    assert feed(s, [(114, b"z")]) == [Data(b"z", 1)]
    assert s.lose_to_seq(110, 3) == []          # nothing missing below it
    c = s.counters
    assert (c.skipped_bytes, c.gap_bytes, c.data_bytes) == (2, 6, 7)


def test_truncation_is_accounted_as_a_truncated_gap():
    s = StreamReassembler()
    out = s.segment(0, TCP_ACK, b"abcd", 1, wire_len=10)
    assert out == [Data(b"abcd", 1), Gap(6, 1, GapCause.TRUNCATED)]
    assert s.truncated(10, 5, 2) == [Gap(5, 2, GapCause.TRUNCATED)]
    out = feed(s, [(15, b"z")])
    assert out == [Data(b"z", 1)]
    c = s.counters
    assert (c.truncated_bytes, c.gap_bytes, c.data_bytes) == (11, 0, 5)


def test_per_stream_byte_bound_gives_up_oldest_hole():
    limits = ReassemblyLimits(max_buffered_bytes=100, history_bytes=0)
    s = StreamReassembler(limits=limits)
    feed(s, [(0, b"a")])
    out = []
    for i in range(3):
        out += feed(s, [(10 + i * 40, bytes([65 + i]) * 40)])
    # The third 40-byte segment would exceed 100 buffered bytes: the hole 1..10 goes.
    assert out[0] == Gap(9, 1, GapCause.MEMORY)
    assert stream_bytes(out) == b"A" * 40 + b"B" * 40 + b"C" * 40
    assert s.counters.memory_drops == 1 and s.counters.memory_drop_bytes == 9
    assert s.buffered_bytes == 0


def test_per_stream_segment_bound():
    s = StreamReassembler(limits=ReassemblyLimits(max_buffered_segments=2, history_bytes=0))
    feed(s, [(0, b"a")])
    out = feed(s, [(3, b"c"), (5, b"e"), (7, b"g")])
    assert out[:2] == [Gap(2, 1, GapCause.MEMORY), Data(b"c", 1)]
    assert s.counters.memory_drops == 1
    assert len(s._segs) == 2


def test_global_budget_is_shared_between_streams():
    budget = MemoryBudget(limit=64)
    limits = ReassemblyLimits(history_bytes=0)
    a, b = StreamReassembler(budget, limits), StreamReassembler(budget, limits)
    feed(a, [(0, b"x"), (10, b"A" * 60)])
    assert budget.used == 60
    out = feed(b, [(0, b"y"), (10, b"B" * 10)])
    # b could not reserve: it gave up its own hole rather than waiting.
    assert out == [Data(b"y", 1), Gap(9, 1, GapCause.MEMORY), Data(b"B" * 10, 1)]
    assert budget.used == 60 and budget.refusals >= 1
    a.flush(2)
    assert budget.used == 0


def test_segment_too_far_ahead_is_out_of_window():
    s = StreamReassembler(limits=ReassemblyLimits(max_window=1000))
    feed(s, [(0, b"a"), (5000, b"far")])
    assert s.counters.out_of_window == 1 and s.buffered_bytes == 0


def test_syn_data_tcp_fast_open():
    s = StreamReassembler()
    assert s.segment(ISN, TCP_SYN, b"hi", 1) == [Data(b"hi", 1)]
    assert s.segment(ISN + 3, TCP_ACK, b"!", 2) == [Data(b"!", 2)]


# -- properties ------------------------------------------------------------------------

segment_plan = st.tuples(
    st.binary(min_size=1, max_size=400),
    st.integers(min_value=0, max_value=(1 << 32) - 1),
    st.lists(st.integers(min_value=1, max_value=60), min_size=1, max_size=40),
    st.randoms(use_true_random=False),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segment_plan, st.lists(st.integers(0, 40), max_size=10))
def test_any_permutation_with_duplicates_yields_the_original_bytes(plan, dup_idx):
    data, isn, sizes, rnd = plan
    segs = chop(data, isn, sizes)
    segs += [segs[i % len(segs)] for i in dup_idx]
    # Overlapping copies with identical bytes, as a retransmission with resegmentation.
    if len(data) > 4:
        segs.append(((isn + 2) % (1 << 32), data[2:len(data) // 2 + 3]))
    first = segs[0]
    rest = segs[1:]
    rnd.shuffle(rest)
    s = StreamReassembler()
    # The first segment seen defines the start (mid-stream pickup), so start there.
    out = feed(s, [first] + rest)
    assert stream_bytes(out) == data
    assert s.counters.gaps == 0 and s.counters.overlap_conflicts == 0
    assert s.flush(2) == [Eof(2, False)]
    # With the SYN seen first, any order at all works, the first segment included.
    rnd.shuffle(segs)
    s = StreamReassembler()
    s.segment((isn - 1) % (1 << 32), TCP_SYN, b"", 1)
    out = feed(s, segs)
    assert stream_bytes(out) == data
    assert s.counters.gaps == 0 and s.counters.overlap_conflicts == 0
    assert s.buffered_bytes == 0


@settings(max_examples=200, deadline=None)
@given(segment_plan, st.lists(st.booleans(), min_size=1, max_size=60))
def test_dropped_segments_become_gaps_that_add_up(plan, keep_mask):
    data, isn, sizes, rnd = plan
    segs = chop(data, isn, sizes)
    kept = [seg for i, seg in enumerate(segs) if i == 0 or keep_mask[i % len(keep_mask)]]
    rest = kept[1:]
    rnd.shuffle(rest)
    s = StreamReassembler()
    out = feed(s, [kept[0]] + rest)
    # The sender's FIN tells where the stream ends; at flow end every hole is a gap.
    out += s.segment((isn + len(data)) % (1 << 32), TCP_FIN | TCP_ACK, b"", 3)
    out += s.flush(3)
    missing = sum(len(seg[1]) for seg in segs if seg not in kept)
    gaps = [e for e in out if type(e) is Gap]
    assert sum(g.length for g in gaps) == len(data) - sum(
        len(e.data) for e in out if type(e) is Data)
    assert sum(g.length for g in gaps) == missing
    assert out[-1] == Eof(3, False)
    # Data that did arrive is delivered at the right place.
    pos = 0
    for e in out:
        if type(e) is Data:
            assert data[pos:pos + len(e.data)] == e.data
            pos += len(e.data)
        elif type(e) is Gap:
            pos += e.length
    assert pos == len(data)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(
    st.integers(0, 1), st.integers(0, (1 << 32) - 1), st.integers(0, (1 << 32) - 1),
    st.sampled_from([0, TCP_ACK, TCP_SYN, TCP_FIN | TCP_ACK, TCP_RST, TCP_SYN | TCP_ACK,
                     TCP_ACK | 0x08]),
    st.binary(max_size=300), st.one_of(st.none(), st.integers(0, 2000)),
), max_size=60), st.integers(0, 3000))
def test_fuzz_no_exception_and_memory_bounded(segments, skip):
    budget = MemoryBudget(limit=2048)
    limits = ReassemblyLimits(max_buffered_bytes=1024, max_buffered_segments=8,
                              history_bytes=256, max_window=1 << 20)
    flow = FlowReassembler(budget, limits)
    accounted = [0, 0]
    for i, (d, seq, ack, flags, payload, wire_len) in enumerate(segments):
        if i == 3:
            flow.streams[0].skip(skip)
        for direction, ev in flow.segment(d, seq, ack, flags, payload, 1, wire_len):
            if type(ev) is Data:
                accounted[direction] += len(ev.data)
            elif type(ev) in (Gap, Skip):
                assert ev.length > 0
                accounted[direction] += ev.length
        assert budget.used <= budget.limit
        for stream in flow.streams:
            assert stream.buffered_bytes <= limits.max_buffered_bytes
            assert len(stream._segs) <= limits.max_buffered_segments
    for direction, ev in flow.flush(2):
        if type(ev) in (Data,):
            accounted[direction] += len(ev.data)
        elif type(ev) in (Gap, Skip):
            accounted[direction] += ev.length
    for d, stream in enumerate(flow.streams):
        assert stream.offset == accounted[d]
        assert stream.eof
        c = stream.counters
        assert c.data_bytes + c.gap_bytes + c.truncated_bytes + c.skipped_bytes == accounted[d]
    cov = flow.coverage()
    assert cov.captured_octets + cov.gap_octets + cov.truncated_octets + cov.skipped_octets \
        == sum(accounted)
    assert budget.used == 0


def test_events_are_immutable():
    with pytest.raises(AttributeError):
        Data(b"x", 1).data = b"y"  # type: ignore[misc]


def test_ack_gaps_can_be_turned_off():
    flow = FlowReassembler(limits=ReassemblyLimits(ack_gaps=False))
    flow.segment(0, ISN, 0, TCP_ACK, b"abc", 1)
    assert flow.segment(1, 1, ISN + 10, TCP_ACK, b"", 2) == []
    assert flow.streams[0].counters.gap_bytes == 0


def test_skip_end_seq_wraps():
    s = StreamReassembler()
    feed(s, [((1 << 32) - 4, b"ab")])
    assert s.skip(10) == 8
    assert feed(s, [(8, b"z")]) == [Skip(10, 1), Data(b"z", 1)]


def test_bad_limits_are_refused():
    with pytest.raises(ValueError):
        ReassemblyLimits(max_window=1 << 31)
    with pytest.raises(ValueError):
        ReassemblyLimits(max_buffered_bytes=0)
    with pytest.raises(ValueError):
        MemoryBudget(0)
    with pytest.raises(ValueError):
        StreamReassembler().skip(-1)


def test_coverage_adds_up_both_directions():
    flow = FlowReassembler()
    flow.segment(0, 0, 0, TCP_SYN, b"", 1)
    flow.segment(1, 100, 1, TCP_SYN | TCP_ACK, b"", 1)
    flow.segment(0, 1, 101, TCP_ACK, b"hello", 2, wire_len=8)
    flow.segment(1, 101, 9, TCP_ACK, b"abc", 3)
    flow.streams[1].skip(4)
    flow.segment(1, 108, 9, TCP_ACK, b"xy", 4)
    flow.segment(1, 112, 9, TCP_ACK | TCP_FIN, b"!", 5)     # 110..112 lost
    flow.flush(6)
    cov = flow.coverage()
    assert (cov.captured_octets, cov.truncated_octets, cov.skipped_octets, cov.gap_octets) == \
        (5 + 3 + 2 + 1, 3, 4, 2)
