"""HTTP/2 body PII in the parser, on the bytes of tests/pii/planted.py's h2c connection
(HPACK by the hpack library): the same counts fed whole and a byte at a time, the body's
octets read rather than skipped while a capture wants them, a hole ending a capture, the
response sampling, the per-connection bound, and nothing counted when PII is off."""

from __future__ import annotations

from sensor.l7 import http2, pii
from sensor.l7.base import NEED_DATA, Direction
from tests.pii.planted import h2_exchanges


C, S = Direction.TO_SERVER, Direction.TO_CLIENT


def _events(parser, chunks) -> dict:
    for direction, data in chunks:
        parser.receive_data(direction, data, 1)
    parser.receive_eof(C, 2)
    parser.receive_eof(S, 2)
    out = {}
    while (t := parser.next_event()) is not NEED_DATA:
        out[(t.detail.method, t.detail.path)] = t.detail
    return out


def _whole(client: bytes, server: bytes):
    # The server's SETTINGS first, then each side whole: streams close in order.
    return [(C, client), (S, server)]


def _bytewise(client: bytes, server: bytes):
    return [(C, client[i:i + 1]) for i in range(len(client))] + \
        [(S, server[i:i + 1]) for i in range(len(server))]


def test_body_counts_whole_and_a_byte_at_a_time():
    client, server, expected = h2_exchanges()
    for chunks in (_whole(client, server), _bytewise(client, server)):
        got = _events(http2.Http2Parser(pii=pii.Scanner()), chunks)
        assert {k: dict(v.pii) for k, v in got.items()} == dict(expected)
        grpc = got[("POST", "/planted.Profile/Get")]
        assert grpc.grpc_request_messages == 1 and grpc.grpc_response_messages == 1


def _frames(data: bytes, pos: int):
    """(offset, length, type, stream id) of each frame from pos on."""
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos:pos + 3], "big")
        yield pos, length, data[pos + 3], int.from_bytes(data[pos + 5:pos + 9], "big")
        pos += 9 + length


def h2_body() -> bytes:
    """Stream 1's request body: the DATA payloads of the JSON POST."""
    client, _, _ = h2_exchanges()
    return b"".join(client[at + 9:at + 9 + n] for at, n, t, sid in _frames(
        client, len(http2.PREFACE)) if t == 0 and sid == 1)


def test_a_capture_reads_the_body_and_a_hole_ends_it():
    client, server, _ = h2_exchanges()
    at, length, _, _ = next(f for f in _frames(client, len(http2.PREFACE))
                            if f[2] == 0 and f[3] == 1)   # stream 1's first DATA frame
    p = http2.Http2Parser(pii=pii.Scanner())
    p.receive_data(C, client[:at + 9], 1)
    assert p.skip_hint(C) == 0   # its payload is wanted: read, not skipped
    # ... and asked of the live budget (the scanner's body_bytes), none the other way yet.
    assert (p.wanted(C), p.wanted(S)) == (pii.Scanner().body_bytes, 0)
    off = http2.Http2Parser()    # without PII it is handed to the kernel
    off.receive_data(C, client[:at + 9], 1)
    assert off.skip_hint(C) == length
    # A hole in that payload: what follows is not the prefix's text, so the body's
    # values (in both DATA frames) are not counted; its length still is.
    p.receive_gap(C, length, 1)
    got = _events(p, [(C, client[at + 9 + length:]), (S, server)])
    assert (p.wanted(C), p.wanted(S)) == (0, 0)   # every stream ended
    profile = got[("POST", "/api/h2/profile")]
    assert not {k for k in dict(profile.pii) if k.endswith(".request")}
    assert profile.request_body_len == len(h2_body())


def test_response_sampling_and_the_connection_bound(monkeypatch):
    client, server, _ = h2_exchanges()
    # Every second response sampled: the JSON leak (the first) is, the gRPC reply not.
    got = _events(http2.Http2Parser(pii=pii.Scanner(response_every=2)),
                  _whole(client, server))
    assert dict(got[("POST", "/api/h2/profile")].pii)["ssn.response"] == 1
    assert "card.response" not in dict(got[("POST", "/planted.Profile/Get")].pii)
    # Past the connection's bound nothing more is held: the request head still counts.
    monkeypatch.setattr(http2, "MAX_PII_HELD", 10)
    parser = http2.Http2Parser(pii=pii.Scanner())
    got = _events(parser, _whole(client, server))
    assert dict(got[("POST", "/api/h2/profile")].pii) == {}
    assert parser._pii_held == 0   # released at the events
    assert _events(http2.Http2Parser(), _whole(client, server))[
        ("POST", "/api/h2/profile")].pii == {}
