"""The kernel's frame walk (bpf/frames.h) driven with crafted packets through
BPF_PROG_TEST_RUN: which octets of an HTTP/2 or PostgreSQL stream are copied and which are
left out, the flags that tell userspace so, and the walk's fail-safe stops, each with the
flow's payload accounting checked octet by octet."""

from __future__ import annotations

import struct

import pytest

from sensor.clock import SystemClock
from sensor.kernel import abi, frames
from sensor.kernel.hybrid import KernelSensor, SelectionConfig
from sensor.l7 import http2
from tests.kernel.test_hybrid import A4, B4, Rig, seg

pytestmark = pytest.mark.bpf

PREFACE = http2.PREFACE
# Small on purpose: a walked direction is not bounded by it, an unwalked one is.
BUDGET = 200
SEL = SelectionConfig(ports={80, 5432}, sniff=False, budget=(BUDGET, BUDGET))
DATA, HEADERS, SETTINGS, PING, WINDOW = 0, 1, 4, 6, 8
END_STREAM, PADDED = 0x1, 0x8


def h2(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((ftype, flags)) + sid.to_bytes(4, "big") \
        + payload


def pg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


STARTUP = struct.pack("!II", 8 + 9, 3 << 16) + b"user\x00\x00"   # 17 octets


@pytest.fixture(scope="module")
def loaded():
    from sensor.kernel import loader

    prog = loader.load(loader.LoadOptions(flow_map_size=4096))
    sensor = KernelSensor(prog, SystemClock())
    yield prog, sensor
    prog.close()


@pytest.fixture
def rig(loaded):
    r = Rig(*loaded)
    r.reset(SEL)
    return r


def handshake(rig, c, s, cseq=1000, sseq=5000):
    rig.run(seg(c, s, "S", seq=cseq - 1))
    rig.run(seg(s, c, "SA", seq=sseq - 1, ack=cseq))
    rig.events()


def data_events(rig):
    return [e for e in rig.events() if e.data]


def l7(rig, sport, d):
    v = rig.flow(sport)[1].l7[d]
    return v.captured, v.skipped, v.truncated, v.gap


def walk(rig, sport):
    return frames.state(rig.prog.frame_walk_fd, rig.flow(sport)[0])


def test_many_frames_in_one_packet_copy_headers_and_leave_bulk_out(rig):
    c, s = (A4, 43001), (B4, 80)
    handshake(rig, c, s)
    head = PREFACE + h2(SETTINGS, 0, 0, b"\x00\x03\x00\x00\x00\x64") + \
        h2(HEADERS, 0x4, 1, b"\x83\x86" + b"h" * 40)
    bulk = h2(DATA, 0, 1, b"d" * 1000) + h2(WINDOW, 0, 0, b"\x00\x00\x10\x00") + \
        h2(PING, 0, 0, b"p" * 8)
    last = h2(DATA, END_STREAM, 1, b"e" * 1500)
    payload = head + bulk + last
    rig.run(seg(c, s, "PA", seq=1000, ack=5000, data=payload))
    evs = data_events(rig)
    # Preface and control frames, and each DATA frame's header with the five octets of a
    # gRPC message prefix; PING and WINDOW_UPDATE left out whole, the allowance
    # notwithstanding.
    assert [(e.offset, e.data) for e in evs] == [
        (0, head + bulk[:14]), (len(head) + len(bulk), last[:14])]
    assert all(e.flags & frames.PLF_SKIPPED_BEFORE for e in evs)
    assert not evs[0].flags & frames.PLF_PEER_WALKED   # the server has not spoken yet
    d = abi.DIR_LO_HI if c < s else abi.DIR_HI_LO
    assert l7(rig, 43001, d) == (len(head) + 28, len(bulk) - 14 + 1495, 0, 0)

    # The server's side is walked from its first octet; a padded DATA is copied whole
    # (its pad length is in the payload), a plain one keeps its header and prefix.
    padded = h2(DATA, PADDED, 1, b"\x02" + b"x" * 20 + b"\x00\x00")
    reply = h2(SETTINGS, 0, 0, b"") + h2(HEADERS, 0x4, 1, b"\x88") + padded + \
        h2(DATA, 0, 1, b"y" * 500)
    rig.run(seg(s, c, "PA", seq=5000, ack=1000 + len(payload), data=reply))
    evs = data_events(rig)
    assert [(e.offset, e.data) for e in evs] == [(0, reply[:-495])]
    assert evs[0].flags == frames.PLF_SKIPPED_BEFORE | frames.PLF_PEER_WALKED
    st = walk(rig, 43001)
    assert [st.dir[i].state for i in (0, 1)] == [frames.WALK_ON, frames.WALK_ON]


def test_a_header_split_across_packets_is_copied_and_its_payload_left_out(rig):
    c, s = (A4, 43002), (B4, 80)
    handshake(rig, c, s)
    frame = h2(DATA, 0, 1, b"z" * 700)
    after = h2(HEADERS, 0x5, 3, b"\x82")
    first = PREFACE + frame[:4]
    second = frame[4:] + after
    rig.run(seg(c, s, "PA", seq=1000, ack=5000, data=first))
    rig.run(seg(c, s, "PA", seq=1000 + len(first), ack=5000, data=second))
    evs = data_events(rig)
    # The header's first four octets went with the first packet, the rest and the
    # payload's first five with the second; the rest of the payload is left out.
    assert [(e.seq, e.data) for e in evs] == [
        (1000, first), (1000 + len(first), frame[4:14]),
        (1000 + len(first) + 5 + 700, after)]
    d = abi.DIR_LO_HI if c < s else abi.DIR_HI_LO
    assert l7(rig, 43002, d) == (len(first) + 10 + len(after), 695, 0, 0)
    assert walk(rig, 43002).dir[abi.PL_TO_RESPONDER].state == frames.WALK_ON


def test_hundreds_of_datarows_in_one_packet(rig):
    c, s = (A4, 43003), (B4, 5432)
    handshake(rig, c, s)
    rig.run(seg(c, s, "PA", seq=1000, ack=5000, data=STARTUP))
    hello = pg(b"R", b"\x00" * 4) + pg(b"Z", b"I")
    rig.run(seg(s, c, "PA", seq=5000, ack=1000 + len(STARTUP), data=hello))
    desc = pg(b"T", b"\x00\x01" + b"n\x00" + b"\x00" * 18)
    # 400 messages (a test run takes one page): six tail calls of the walk.
    rows = pg(b"D", b"\x00\x00") * 400
    tail = pg(b"C", b"SELECT 400\x00") + pg(b"Z", b"I")
    result = desc + rows + tail
    seq = 5000 + len(hello)
    rig.run(seg(s, c, "PA", seq=seq, ack=1000 + len(STARTUP), data=result))
    evs = data_events(rig)
    assert [e.data for e in evs] == [STARTUP, hello, desc, tail]
    assert evs[3].offset == len(desc) + len(rows)
    d = abi.DIR_HI_LO if c < s else abi.DIR_LO_HI
    assert l7(rig, 43003, d) == (len(hello) + len(desc) + len(tail), len(rows), 0, 0)
    # The client's side is not walked (PostgreSQL's walk is the server's only).
    st = walk(rig, 43003)
    assert (st.dir[0].state, st.dir[1].state) == (frames.WALK_OFF, frames.WALK_ON)


def test_a_hole_stops_the_walk_and_a_retransmission_is_not_copied_again(rig):
    c, s = (A4, 43004), (B4, 80)
    handshake(rig, c, s)
    one = PREFACE + h2(DATA, 0, 1, b"a" * 100)
    rig.run(seg(c, s, "PA", seq=1000, ack=5000, data=one))
    # Wholly before where the direction stands: walked already, skipped.
    rig.run(seg(c, s, "PA", seq=1000, ack=5000, data=one))
    assert [e.data for e in data_events(rig)] == [one[:38]]
    d = abi.DIR_LO_HI if c < s else abi.DIR_HI_LO
    assert l7(rig, 43004, d) == (38, 95 + len(one), 0, 0)
    # 50 octets never seen: the frames in them are unknown, so the walk stops and the
    # direction is copied as without one (within the allowance, no flags).
    later = b"q" * 300
    rig.run(seg(c, s, "PA", seq=1000 + len(one) + 50, ack=5000, data=later))
    evs = data_events(rig)
    assert [(e.data, e.flags) for e in evs] == [(later[:BUDGET - 38], 0)]
    assert walk(rig, 43004).dir[abi.PL_TO_RESPONDER].state == frames.WALK_OFF


def test_no_walk_when_the_state_is_unknown(rig):
    # No SYN seen: where frames start is unknown, so nothing is walked.
    c, s = (A4, 43005), (B4, 80)
    payload = PREFACE + h2(DATA, 0, 1, b"b" * 400)
    rig.run(seg(c, s, "PA", seq=1000, ack=5000, data=payload))
    evs = data_events(rig)
    assert [(e.data, e.flags) for e in evs] == [(payload[:BUDGET], 0)]
    assert walk(rig, 43005) is None
    # The server spoke before the client's preface, and not as HTTP/2 servers open:
    # its side is not walked.
    c, s = (A4, 43006), (B4, 80)
    handshake(rig, c, s)
    early = b"220 hello there\r\n"
    rig.run(seg(s, c, "PA", seq=5000, ack=1000, data=early))
    rig.run(seg(c, s, "PA", seq=1000, ack=5000 + len(early), data=payload))
    st = walk(rig, 43006)
    assert (st.dir[0].state, st.dir[1].state) == (frames.WALK_ON, frames.WALK_OFF)
    # A server opening as HTTP/2 does, then a client that is not HTTP/2: neither side.
    c, s = (A4, 43008), (B4, 80)
    handshake(rig, c, s)
    settings = h2(SETTINGS, 0, 0, b"\x00\x03\x00\x00\x00\x64")
    rig.run(seg(s, c, "PA", seq=5000, ack=1000, data=settings))
    rig.run(seg(c, s, "PA", seq=1000, ack=5000 + 15, data=b"GET / HTTP/1.1\r\n\r\n"))
    st = walk(rig, 43008)
    assert [(d.state, frames.STOP_NAMES[d.stopped]) for d in st.dir] == \
        [(frames.WALK_OFF, "opening")] * 2
    # Another protocol's opening arms nothing.
    c, s = (A4, 43007), (B4, 80)
    handshake(rig, c, s)
    rig.run(seg(c, s, "PA", seq=1000, ack=5000, data=b"GET / HTTP/1.1\r\n\r\n"))
    assert walk(rig, 43007) is None


def test_a_server_speaking_first_is_walked_from_its_first_octet(rig):
    c, s = (A4, 43009), (B4, 80)
    handshake(rig, c, s)
    settings = h2(SETTINGS, 0, 0, b"\x00\x03\x00\x00\x00\x64")
    rig.run(seg(s, c, "PA", seq=5000, ack=1000, data=settings + h2(WINDOW, 0, 0, b"\0\0\1\0")))
    rig.run(seg(c, s, "PA", seq=1000, ack=5000 + 28, data=PREFACE + h2(PING, 0, 0, b"p" * 8)))
    evs = data_events(rig)
    assert [(e.direction, e.data) for e in evs] == [
        (abi.PL_TO_INITIATOR, settings), (abi.PL_TO_RESPONDER, PREFACE)]
    # The client's event says the server's octets below its ack were elided (the
    # WINDOW_UPDATE), the server's first did not yet (the client had not opened).
    assert evs[0].flags == frames.PLF_SKIPPED_BEFORE
    assert evs[1].flags == frames.PLF_SKIPPED_BEFORE | frames.PLF_PEER_WALKED
    st = walk(rig, 43009)
    assert (st.dir[0].state, st.dir[1].state) == (frames.WALK_ON, frames.WALK_ON)


def test_reordered_packets_inside_an_elided_frame_keep_the_walk(rig):
    c, s = (A4, 43010), (B4, 80)
    handshake(rig, c, s)
    frame = h2(DATA, 0, 1, b"r" * 3000)
    after = h2(HEADERS, 0x5, 3, b"\x82")
    stream = PREFACE + frame + after
    cut1, cut2 = 1000, 2000            # both inside the DATA payload
    parts = [(0, stream[:cut1]), (cut2, stream[cut2:]), (cut1, stream[cut1:cut2])]
    for off, part in parts:            # the middle packet comes last
        rig.run(seg(c, s, "PA", seq=1000 + off, ack=5000, data=part))
    evs = data_events(rig)
    assert [(e.seq, e.data) for e in evs] == [
        (1000, stream[:38]), (1000 + len(PREFACE) + len(frame), after)]
    d = abi.DIR_LO_HI if c < s else abi.DIR_HI_LO
    assert l7(rig, 43010, d) == (38 + len(after), len(frame) - 14, 0, 0)
    assert walk(rig, 43010).dir[abi.PL_TO_RESPONDER].state == frames.WALK_ON
    # A hole at a frame boundary holds an unknown header: the walk stops.
    rig.run(seg(c, s, "PA", seq=1000 + len(stream) + 9, ack=5000, data=b"x" * 50))
    st = walk(rig, 43010).dir[abi.PL_TO_RESPONDER]
    assert (st.state, frames.STOP_NAMES[st.stopped]) == (frames.WALK_OFF, "hole")


def test_a_packet_without_payload_past_the_walk_keeps_it(rig):
    # A FIN takes a sequence number: the client's last ACK starts one past where the walk
    # stands. A packet without payload has no frames to walk; it must not stop the walk
    # (nor move it: a pure ACK may overtake reordered data).
    c, s = (A4, 43011), (B4, 80)
    handshake(rig, c, s)
    one = PREFACE + h2(HEADERS, 0x5, 1, b"\x82")
    rig.run(seg(c, s, "FA", seq=1000, ack=5000, data=one))
    rig.run(seg(c, s, "A", seq=1000 + len(one) + 1, ack=5001))
    st = walk(rig, 43011).dir[abi.PL_TO_RESPONDER]
    assert (st.state, st.stopped, st.next) == (frames.WALK_ON, 0, 1000 + len(one))


def test_a_flow_userspace_stopped_ends_its_walk_as_untaken_not_as_a_hole(rig):
    # After a stop the kernel counts the side's packets as skipped and never walks them, so
    # the walk's place stands still. The next packet must not read as a hole (a network
    # fault, in diagnostics and in tests/live/test_grpc_budget.py); the walk goes off at the
    # first packet it could not follow, saying why.
    c, s = (A4, 43013), (B4, 80)
    handshake(rig, c, s)
    one = PREFACE + h2(DATA, 0, 1, b"a" * 100)
    rig.run(seg(c, s, "PA", seq=1000, ack=5000, data=one))
    key = rig.flow(43013)[0]
    assert rig.sensor.stop(key)
    rig.run(seg(c, s, "PA", seq=1000 + len(one), ack=5000, data=h2(DATA, 0, 1, b"b" * 50)))
    rig.run(seg(c, s, "PA", seq=1000 + len(one) + 59, ack=5000, data=h2(DATA, 0, 1, b"c")))
    st = walk(rig, 43013).dir[abi.PL_TO_RESPONDER]
    assert (st.state, frames.STOP_NAMES[st.stopped], st.next) == (
        frames.WALK_OFF, "untaken", 1000 + len(one))
    assert [e.data for e in data_events(rig)] == [one[:38]]


def test_a_full_ring_buffer_does_not_stop_the_walk_and_the_next_event_says_lost(rig):
    # Walked HEADERS frames (copied whole) until the ring buffer (4 MiB, never read
    # meanwhile) refuses one: the walk goes on, the refused octets are the flow's gap,
    # and the first event the ring takes again carries LOST_BEFORE, once.
    c, s = (A4, 43012), (B4, 80)
    handshake(rig, c, s)
    rig.run(seg(c, s, "PA", seq=1000, ack=5000, data=PREFACE))
    block = h2(HEADERS, 0x4, 1, b"h" * 2900)
    template = bytearray(seg(c, s, "PA", seq=0, ack=5000, data=block))
    seq_at = len(template) - len(block) - 20 + 4      # the TCP header's seq field
    d = abi.DIR_LO_HI if c < s else abi.DIR_HI_LO
    seq, sent = 1000 + len(PREFACE), 0
    while l7(rig, 43012, d)[3] == 0:
        assert sent < 3000, "the ring buffer took everything"
        template[seq_at:seq_at + 4] = seq.to_bytes(4, "big")
        rig.run(bytes(template))
        seq += len(block)
        sent += 1
    st = walk(rig, 43012).dir[abi.PL_TO_RESPONDER]
    assert (st.state, st.stopped, st.lost) == (frames.WALK_ON, 0, 1)
    captured, skipped, truncated, gap = l7(rig, 43012, d)
    assert captured + gap == len(PREFACE) + sent * len(block) and gap > 0
    # While the client's loss is untold, the server's events do not claim that what the
    # client sent below their ack and userspace lacks was elided.
    settings = h2(SETTINGS, 0, 0, b"")
    got = rig.events()
    assert len(got) > 1000 and not any(e.flags & frames.PLF_LOST_BEFORE for e in got)
    rig.run(seg(s, c, "PA", seq=5000, ack=seq, data=settings))
    rig.run(seg(c, s, "PA", seq=seq, ack=5000 + 9, data=block))
    rig.run(seg(c, s, "PA", seq=seq + len(block), ack=5000 + 9, data=block))
    evs = data_events(rig)
    assert [(e.direction, e.seq, e.flags) for e in evs] == [
        (abi.PL_TO_INITIATOR, 5000, frames.PLF_SKIPPED_BEFORE),
        (abi.PL_TO_RESPONDER, seq,
         frames.PLF_SKIPPED_BEFORE | frames.PLF_PEER_WALKED | frames.PLF_LOST_BEFORE),
        (abi.PL_TO_RESPONDER, seq + 2048,
         frames.PLF_SKIPPED_BEFORE | frames.PLF_PEER_WALKED),
        (abi.PL_TO_RESPONDER, seq + len(block),
         frames.PLF_SKIPPED_BEFORE | frames.PLF_PEER_WALKED)] + [
        (abi.PL_TO_RESPONDER, seq + len(block) + 2048,
         frames.PLF_SKIPPED_BEFORE | frames.PLF_PEER_WALKED)]
    assert walk(rig, 43012).dir[abi.PL_TO_RESPONDER].lost == 0
