"""FlowReassembler.in_order, the engine's shortcut for the common segment, leaves the
reassembler exactly as FlowReassembler.segment does and stands for the same events: two
reassemblers are driven through the same conversations (SYNs, in-order data, reordering,
drops, retransmissions, skip ranges, ACKs past holes, FIN, RST, seq wraparound), one by
`segment` alone, one as the L7 engine drives it (in_order first, segment when it declines),
and after every segment their events, counters and positions must agree."""

from __future__ import annotations

import random

from sensor.engine.reassembly import Data, FlowReassembler, Skip
from sensor.flow.semantics import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN


def _state(r: FlowReassembler) -> list:
    return [(s.counters.as_dict(), s.started, s.eof, s._base, s._next, s._fin,
             s._skip_until, list(s._segs), s._buffered, list(s._hist or ()), s._hist_bytes)
            for s in r.streams]


def _as_engine(r: FlowReassembler, d, seq, ack, flags, payload, ts, wire_len):
    how = r.in_order(d, seq, ack, flags, payload, wire_len)
    if how == 1:
        return [(d, Data(payload, ts))], how
    if how == 2:
        return [(d, Skip(len(payload), ts))], how
    if how == 3:
        return [], how
    return r.segment(d, seq, ack, flags, payload, ts, wire_len), how


def _conversation(rng: random.Random):
    """(direction, seq, ack, flags, payload, wire_len, skip) tuples of one connection."""
    isn = [rng.choice((1000, (1 << 32) - 40, rng.randrange(1 << 32))) for _ in (0, 1)]
    sent = [0, 0]   # bytes sent per direction (offsets after the SYN)
    out = [(0, isn[0], 0, TCP_SYN, b"", None, 0),
           (1, isn[1], isn[0] + 1, TCP_SYN | TCP_ACK, b"", None, 0)]
    for _ in range(rng.randrange(5, 40)):
        d = rng.randrange(2)
        n = rng.randrange(1, 300)
        off = sent[d]
        if rng.random() < 0.15 and off > 10:
            off = rng.randrange(max(0, off - 400), off)   # a retransmission
        else:
            sent[d] += n
        payload = bytes((off + i) % 251 for i in range(n))
        seq = (isn[d] + 1 + off) & 0xFFFFFFFF
        ack = (isn[1 - d] + 1 + rng.choice((sent[1 - d], sent[1 - d],
                                           sent[1 - d] + rng.randrange(1, 500)))) & 0xFFFFFFFF
        wire_len = n + rng.randrange(1, 50) if rng.random() < 0.05 else None
        skip = rng.randrange(1, 600) if rng.random() < 0.1 else 0
        if rng.random() < 0.1:
            continue   # dropped by the capture
        out.append((d, seq, ack, TCP_ACK | (TCP_SYN if rng.random() < 0.02 else 0),
                    payload, wire_len, skip))
        if rng.random() < 0.1 and len(out) > 3:
            i = rng.randrange(2, len(out))
            out[i], out[-1] = out[-1], out[i]   # reordered
    d = rng.randrange(2)
    end = rng.choice((TCP_FIN | TCP_ACK, TCP_RST))
    out.append((d, (isn[d] + 1 + sent[d]) & 0xFFFFFFFF, (isn[1 - d] + 1 + sent[1 - d]) & 0xFFFFFFFF,
                end, b"", None, 0))
    return out


def test_in_order_agrees_with_segment():
    taken = {0: 0, 1: 0, 2: 0, 3: 0}
    for seed in range(300):
        rng = random.Random(seed)
        plain, engine = FlowReassembler(), FlowReassembler()
        for ts, (d, seq, ack, flags, payload, wire_len, skip) in enumerate(_conversation(rng)):
            want = plain.segment(d, seq, ack, flags, payload, ts, wire_len)
            got, how = _as_engine(engine, d, seq, ack, flags, payload, ts, wire_len)
            taken[how] += 1
            assert got == want, (seed, ts)
            assert _state(engine) == _state(plain), (seed, ts)
            if skip and plain.streams[d].started and not plain.streams[d].eof:
                assert plain.streams[d].skip(skip, ts) == engine.streams[d].skip(skip, ts)
    # Every answer of in_order was exercised, and the general path too.
    assert all(taken.values()), taken
