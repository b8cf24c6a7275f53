"""HTTP/2 + gRPC parser (sensor/l7/http2.py): crafted frames (HPACK from the hpack encoder),
the golden capture of nghttpd/nghttp/h2load and grpcio traffic against what the clients
logged and against tshark's HTTP/2 dissector, the skip budget with 1 KiB and 10 MiB gRPC
messages through real grpcio peers, redaction, bounds, and fuzzing. `loupe replay` and the
collector on the golden capture, and a live sensor run, are at the end.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from hpack import Encoder
from hypothesis import given, settings
from hypothesis import strategies as st

from sensor.l7 import http2 as H
from sensor.l7.base import NEED_DATA, Direction, ParserState
from sensor.l7.http2 import PREFACE, Http2Event, Http2Parser, looks_like
from tests.l7 import pcaputil

C, S = Direction.TO_SERVER, Direction.TO_CLIENT
GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "http2-parser"
CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus"

DATA, HEADERS, RST, SETTINGS, PUSH, PING, GOAWAY, WINDOW, CONT = 0, 1, 3, 4, 5, 6, 7, 8, 9
END_STREAM, END_HEADERS, PADDED, PRIO = 0x1, 0x4, 0x8, 0x20


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") \
        + payload


def grpc_msg(body: bytes) -> bytes:
    return b"\x00" + len(body).to_bytes(4, "big") + body


class Peer:
    """One side's HPACK encoder (its state spans the connection, as on the wire)."""

    def __init__(self) -> None:
        self.enc = Encoder()

    def headers(self, sid: int, fields, flags: int = END_HEADERS) -> bytes:
        return frame(HEADERS, flags, sid, self.enc.encode(fields))


def request(sid: int = 1, path: str = "/", method: str = "GET", extra=()) -> list:
    return [(":method", method), (":scheme", "http"), (":authority", "example.test"),
            (":path", path), *extra]


def drive(steps, parser=None):
    """steps: (direction, bytes, ts) or (direction, None, ts) for EOF."""
    p = parser or Http2Parser()
    out = []
    for d, blob, ts in steps:
        if blob is None:
            p.receive_eof(d, ts)
        else:
            p.receive_data(d, blob, ts)
        while (ev := p.next_event()) is not NEED_DATA:
            out.append((ev.ts_ns, ev.detail))
    return p, out


def events(*steps, parser=None, close=True):
    steps = list(steps)
    if close:
        steps += [(C, None, 10**9), (S, None, 10**9)]
    return [e for _, e in drive(steps, parser)[1]]


def bytewise(steps):
    return [(d, blob[i:i + 1], ts) for d, blob, ts in steps if blob is not None
            for i in range(len(blob))] + [s for s in steps if s[1] is None]


def settings_frame(*pairs) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(k.to_bytes(2, "big") + v.to_bytes(4, "big")
                                          for k, v in pairs))


# -- crafted cases --------------------------------------------------------------------------------

def test_get_and_response_with_fields_latency_and_bodies():
    c, s = Peer(), Peer()
    req = PREFACE + settings_frame((3, 100)) + c.headers(1, request(path="/a", extra=[
        ("user-agent", "probe/1"), ("content-type", "text/plain; charset=utf-8")]))
    req += frame(DATA, 0, 1, b"x" * 10) + frame(DATA, END_STREAM, 1, b"y" * 5)
    resp = settings_frame() + s.headers(1, [(":status", "200"), ("content-type", "text/html")])
    resp += frame(DATA, 0, 1, b"<html>") + frame(DATA, END_STREAM, 1, b"</html>")
    steps = [(C, req, 1000), (S, resp, 4000), (C, None, 5000), (S, None, 5000)]
    for variant in (steps, bytewise(steps)):
        p, out = drive(variant)
        assert p.state is ParserState.DONE
        [(ts, e)] = out
        assert ts == 1000 and e.latency_ns == 3000
        assert (e.stream_id, e.method, e.host, e.path, e.status, e.user_agent) == \
            (1, "GET", "example.test", "/a", 200, "probe/1")
        assert (e.request_content_type, e.response_content_type) == ("text/plain", "text/html")
        assert (e.request_body_len, e.response_body_len, e.ended) == (15, 13, True)
        assert e.grpc_status == -1 and not e.grpc_service
        assert p.summary() == {"http_host": "example.test"}


def test_streams_interleave_and_close_in_their_own_order():
    c, s = Peer(), Peer()
    req = PREFACE + c.headers(1, request(path="/slow"), END_HEADERS | END_STREAM) \
        + c.headers(3, request(path="/fast"), END_HEADERS | END_STREAM)
    resp = s.headers(3, [(":status", "404")], END_HEADERS | END_STREAM) \
        + s.headers(1, [(":status", "200")]) + frame(DATA, END_STREAM, 1, b"ok")
    got = events((C, req, 1), (S, resp, 2))
    assert [(e.stream_id, e.path, e.status) for e in got] == [(3, "/fast", 404), (1, "/slow", 200)]


def test_hpack_dynamic_table_carries_across_streams():
    # The second request's fields are all indexed from the table the first one filled:
    # decoding it needs the first block to have been decoded too.
    c, s = Peer(), Peer()
    fields = request(path="/same", extra=[("user-agent", "x" * 40)])
    first = c.headers(1, fields, END_HEADERS | END_STREAM)
    second = c.headers(3, fields, END_HEADERS | END_STREAM)
    assert len(second) < len(first) - 40
    resp = s.headers(1, [(":status", "200")], END_HEADERS | END_STREAM) \
        + s.headers(3, [(":status", "200")], END_HEADERS | END_STREAM)
    got = events((C, PREFACE + first + second, 1), (S, resp, 2))
    assert [(e.stream_id, e.path, e.user_agent) for e in got] == [
        (1, "/same", "x" * 40), (3, "/same", "x" * 40)]


def test_header_table_size_setting_bounds_the_other_sides_table():
    # The client allows 8 KiB tables; the server's encoder then says so in its block.
    c, s = Peer(), Peer()
    s.enc.header_table_size = 8192
    req = PREFACE + settings_frame((1, 8192)) + c.headers(1, request(), END_HEADERS | END_STREAM)
    resp = s.headers(1, [(":status", "200"), ("x-big", "v" * 5000)], END_HEADERS | END_STREAM)
    p = Http2Parser()
    got = events((C, req, 1), (S, resp, 2), parser=p)
    assert p.state is ParserState.DONE, p.error
    assert [e.status for e in got] == [200]
    # Without the client's setting the same block breaks the HPACK contract.
    p = Http2Parser()
    events((C, req.replace(settings_frame((1, 8192)), b""), 1), (S, resp, 2), parser=p)
    assert p.state is ParserState.ERROR and "HPACK" in p.error


def test_continuation_padding_and_priority_fields():
    c, s = Peer(), Peer()
    block = c.enc.encode(request(path="/cont", extra=[("user-agent", "u" * 100)]))
    pad = 7
    first = bytes([pad]) + b"\x00\x00\x00\x00\x10" + block[:20] + b"\x00" * pad
    req = PREFACE + frame(HEADERS, PADDED | PRIO | END_STREAM, 1, first) \
        + frame(CONT, 0, 1, block[20:50]) + frame(CONT, END_HEADERS, 1, block[50:])
    body = b"z" * 30
    resp = s.headers(1, [(":status", "200")]) \
        + frame(DATA, PADDED | END_STREAM, 1, bytes([10]) + body + b"\x00" * 10)
    for variant in ([(C, req, 1), (S, resp, 2)], bytewise([(C, req, 1), (S, resp, 2)])):
        (e,) = events(*variant)
        assert (e.path, e.user_agent, e.response_body_len) == ("/cont", "u" * 100, 30)


def test_other_frame_inside_a_header_block_is_an_error():
    c = Peer()
    block = c.enc.encode(request())
    p, _ = drive([(C, PREFACE + frame(HEADERS, 0, 1, block[:5]) + frame(PING, 0, 0, b"\0" * 8),
                   1)])
    assert p.state is ParserState.ERROR and "CONTINUATION" in p.error


def test_interim_responses_reset_and_end_of_stream_without_close():
    c, s = Peer(), Peer()
    req = PREFACE + c.headers(1, request(method="POST", extra=[("expect", "100-continue")])) \
        + c.headers(3, request(path="/cancelled"), END_HEADERS | END_STREAM) \
        + c.headers(5, request(path="/never"), END_HEADERS | END_STREAM)
    resp = s.headers(1, [(":status", "100")]) + frame(RST, 0, 3, (8).to_bytes(4, "big"))
    got = events((C, req, 1), (C, frame(DATA, END_STREAM, 1, b"abc"), 2), (S, resp, 3),
                 (S, s.headers(1, [(":status", "201")], END_HEADERS | END_STREAM), 7))
    by = {e.stream_id: e for e in got}
    assert (by[3].reset, by[3].ended, by[3].status) == ("CANCEL", True, 0)
    # The 100 Continue is not the response: the 201 is, and the latency is to it.
    assert (by[1].status, by[1].latency_ns, by[1].request_body_len) == (201, 6, 3)
    assert (by[5].ended, by[5].status) == (False, 0)
    assert [e.stream_id for e in got] == [3, 1, 5]


def test_grpc_messages_across_frames_trailers_and_status():
    c, s = Peer(), Peer()
    grpc = [("content-type", "application/grpc"), ("te", "trailers")]
    msgs = grpc_msg(b"a" * 100) + grpc_msg(b"") + grpc_msg(b"b" * 7)
    req = PREFACE + c.headers(1, request(path="/pkg.Svc/Do", method="POST", extra=grpc))
    # The messages cut across DATA frames at awkward places (inside a prefix too).
    req += frame(DATA, 0, 1, msgs[:3]) + frame(DATA, 0, 1, msgs[3:107]) \
        + frame(DATA, END_STREAM, 1, msgs[107:])
    resp = s.headers(1, [(":status", "200"), ("content-type", "application/grpc+proto")]) \
        + frame(DATA, 0, 1, grpc_msg(b"r" * 50) * 2) \
        + s.headers(1, [("grpc-status", "5"), ("grpc-message", "not%20found%3A%20%C3%BC")],
                    END_HEADERS | END_STREAM)
    steps = [(C, req, 1), (S, resp, 2)]
    for variant in (steps, bytewise(steps)):
        (e,) = events(*variant)
        assert (e.grpc_service, e.grpc_method, e.grpc_status, e.grpc_message) == \
            ("pkg.Svc", "Do", 5, "not found: ü")
        assert (e.grpc_request_messages, e.grpc_response_messages) == (3, 2)
        assert (e.request_body_len, e.response_body_len) == (len(msgs), 110)


def test_grpc_trailers_only_response():
    c, s = Peer(), Peer()
    req = PREFACE + c.headers(1, request(path="/pkg.Svc/Bad", method="POST", extra=[
        ("content-type", "application/grpc")])) + frame(DATA, END_STREAM, 1, grpc_msg(b"q"))
    resp = s.headers(1, [(":status", "200"), ("content-type", "application/grpc"),
                         ("grpc-status", "3"), ("grpc-message", "bad")], END_HEADERS | END_STREAM)
    (e,) = events((C, req, 1), (S, resp, 2))
    assert (e.status, e.grpc_status, e.grpc_message, e.grpc_response_messages) == (200, 3, "bad", 0)


def test_not_grpc_when_the_content_type_says_otherwise():
    c, s = Peer(), Peer()
    req = PREFACE + c.headers(1, request(path="/pkg.Svc/Do", method="POST", extra=[
        ("content-type", "application/grpc-web")])) + frame(DATA, END_STREAM, 1, grpc_msg(b"x"))
    (e,) = events((C, req, 1), (S, s.headers(1, [(":status", "200")], END_HEADERS | END_STREAM), 2))
    assert (e.grpc_service, e.grpc_request_messages, e.path) == ("", 0, "/pkg.Svc/Do")


def test_server_push_is_an_event_of_its_own():
    c, s = Peer(), Peer()
    req = PREFACE + c.headers(1, request(path="/"), END_HEADERS | END_STREAM)
    promise = frame(PUSH, END_HEADERS, 1, (2).to_bytes(4, "big") + s.enc.encode(
        request(path="/style.css")))
    resp = promise + s.headers(1, [(":status", "200")], END_HEADERS | END_STREAM) \
        + s.headers(2, [(":status", "200"), ("content-type", "text/css")]) \
        + frame(DATA, END_STREAM, 2, b"p{}")
    got = events((C, req, 1), (S, resp, 2))
    assert [(e.stream_id, e.path, e.pushed, e.response_body_len) for e in got] == [
        (1, "/", False, 0), (2, "/style.css", True, 3)]


def test_stream_limit_reports_the_oldest_early():
    c, s = Peer(), Peer()
    req = PREFACE + b"".join(c.headers(sid, request(path=f"/{sid}"), END_HEADERS | END_STREAM)
                             for sid in (1, 3, 5))
    resp = b"".join(s.headers(sid, [(":status", "200")], END_HEADERS | END_STREAM)
                    for sid in (1, 3, 5))
    p = Http2Parser(max_streams=2)
    got = events((C, req, 1), (S, resp, 2), parser=p)
    assert [(e.stream_id, e.ended, e.status) for e in got] == [(1, False, 0), (3, True, 200),
                                                               (5, True, 200)]
    assert p.evicted == 1 and p.unknown_streams == 1


# -- redaction ----------------------------------------------------------------------------------

def test_secret_headers_are_never_kept_and_paths_are_redacted():
    c, s = Peer(), Peer()
    fields = request(path="/api?access_token=s3cret-q&page=2", extra=[
        ("authorization", "Bearer s3cret-a"), ("cookie", "sid=s3cret-c"),
        ("proxy-authorization", "Basic s3cret-p")])
    fields[2] = (":authority", "user:s3cret-u@example.test")
    req = PREFACE + c.headers(1, fields, END_HEADERS | END_STREAM)
    resp = s.headers(1, [(":status", "200"), ("set-cookie", "sid=s3cret-s")],
                     END_HEADERS | END_STREAM)
    (e,) = events((C, req, 1), (S, resp, 2))
    assert e.path == "/api?access_token=REDACTED&page=2" and e.host == "example.test"
    assert "s3cret" not in repr(e)
    (e,) = events((C, req, 1), (S, resp, 2), parser=Http2Parser(redact=False))
    assert e.path == "/api?access_token=s3cret-q&page=2"
    assert "s3cret-a" not in repr(e) and "s3cret-c" not in repr(e)


def test_debug_logging_does_not_write_header_values(caplog):
    c, s = Peer(), Peer()
    req = PREFACE + c.headers(1, request(extra=[("authorization", "Bearer s3cret-log")]),
                              END_HEADERS | END_STREAM)
    with caplog.at_level("DEBUG"):
        events((C, req, 1), (S, s.headers(1, [(":status", "200")], END_HEADERS | END_STREAM), 2))
    assert "s3cret-log" not in caplog.text


# -- DATA: skip hints, gaps, bounds --------------------------------------------------------------

def test_data_payloads_are_skipped_and_grpc_skips_stop_at_each_prefix():
    c = Peer()
    p = Http2Parser()
    head = PREFACE + c.headers(1, request(path="/a/B", method="POST", extra=[
        ("content-type", "application/grpc")]))
    big = 10 << 20
    # One DATA frame carrying a 10 MiB message and, after it, a 3-byte one.
    p.receive_data(C, head, 1)
    p.receive_data(C, (big + 13).to_bytes(3, "big") + bytes([DATA, END_STREAM]) + b"\0\0\0\1", 2)
    assert p.skip_hint(C) == 0          # the message prefix is needed
    p.receive_data(C, b"\x00" + big.to_bytes(4, "big") + b"m" * 100, 3)
    assert p.skip_hint(C) == big - 100  # up to the next prefix, not to the frame's end
    p.receive_skip(C, big - 100, 4)
    assert p.skip_hint(C) == 0
    p.receive_data(C, grpc_msg(b"end"), 5)
    assert p.skip_hint(C) == 0 and p._mode[0] == H._HEAD
    s = p._streams[1]
    assert (s.msgs[0], s.body[0], s.ended[0]) == (2, big + 13, True)
    # A plain DATA frame is skipped whole, padding included.
    p = Http2Parser()
    p.receive_data(C, PREFACE + Peer().headers(3, request())
                   + frame(DATA, PADDED, 3, bytes([4]) + b"d" * 60 + b"\0" * 4)[:20], 1)
    assert p.skip_hint(C) == 65 - 11 and p.state is ParserState.OK


def test_gap_in_data_is_counted_and_in_a_header_block_is_an_error():
    c, s = Peer(), Peer()
    req = PREFACE + c.headers(1, request(method="POST", path="/p.S/M", extra=[
        ("content-type", "application/grpc")]))
    p = Http2Parser()
    p.receive_data(C, req + frame(DATA, END_STREAM, 1, grpc_msg(b"x" * 100))[:20], 1)
    p.receive_gap(C, 100 + 5 + 9 - 20, 2)     # the rest of the frame: lost, not fatal
    assert p.state is ParserState.OK
    p.receive_data(S, s.headers(1, [(":status", "200")], END_HEADERS | END_STREAM), 3)
    (e,) = [ev.detail for ev in iter(p.next_event, NEED_DATA)]
    assert (e.request_body_len, e.grpc_request_messages, e.truncated) == (105, 1, False)
    # A gap over a message prefix loses the count, which the event says.
    p = Http2Parser()
    p.receive_data(C, req + frame(DATA, 0, 1, grpc_msg(b"a") * 2)[:9], 1)
    p.receive_gap(C, 12, 2)
    p.receive_data(C, frame(DATA, END_STREAM, 1, b""), 3)
    p.receive_data(S, s.headers(1, [(":status", "200")], END_HEADERS | END_STREAM), 4)
    (e,) = [ev.detail for ev in iter(p.next_event, NEED_DATA)]
    assert e.truncated and e.request_body_len == 12
    # A gap in a HEADERS payload: HPACK state is lost, so is the connection.
    p = Http2Parser()
    p.receive_data(C, req[:len(PREFACE) + 12], 1)
    p.receive_gap(C, 5, 2)
    assert p.state is ParserState.ERROR and p.error == "gap in a header block"
    p = Http2Parser()
    p.receive_data(C, PREFACE + b"\0\0", 1)
    p.receive_skip(C, 3, 2)
    assert p.state is ParserState.ERROR and p.error == "skip in a frame header"


@pytest.mark.parametrize("raw,reason", [
    (b"GET / HTTP/1.1\r\n\r\n", "no HTTP/2 connection preface"),
    (PREFACE + frame(HEADERS, END_HEADERS, 1, b"\xff" * 8), "HPACK"),
    (PREFACE + (H.MAX_BLOCK + 1).to_bytes(3, "big") + b"\x01\x04\0\0\0\1", "buffered"),
    (PREFACE + frame(SETTINGS, 0, 0, b"\0" * 5), "bad SETTINGS"),
    (PREFACE + frame(DATA, 0, 0, b"x"), "DATA on stream 0"),
    (PREFACE + frame(DATA, PADDED, 1, b"\x05ab"), "padding"),
    (PREFACE + frame(CONT, END_HEADERS, 1, b"\x82"), "CONTINUATION without"),
    (PREFACE + frame(PUSH, END_HEADERS, 1, b"\0\0\0\2\x82"), "PUSH_PROMISE from the client"),
])
def test_malformed_input_is_an_error_with_a_reason(raw, reason):
    p, _ = drive([(C, raw, 1)])
    assert p.state is ParserState.ERROR and reason in p.error, p.error


def test_header_list_size_is_bounded():
    c = Peer()
    c.enc.header_table_size = 4096
    # 64 KiB of indexed references to one 3 KiB entry: a tiny block, a huge list.
    block = c.enc.encode(request(extra=[("x-a", "v" * 3000)]))
    again = c.enc.encode([("x-a", "v" * 3000)]) * 200
    p, _ = drive([(C, PREFACE + frame(HEADERS, END_HEADERS | END_STREAM, 1, block)
                   + frame(HEADERS, END_HEADERS, 3, again), 1)])
    assert len(again) < 1000
    assert p.state is ParserState.ERROR and "header list larger" in p.error


def test_long_values_are_cut_and_marked():
    c, s = Peer(), Peer()
    (e,) = events((C, PREFACE + c.headers(1, request(path="/" + "p" * 5000),
                                          END_HEADERS | END_STREAM), 1),
                  (S, s.headers(1, [(":status", "200")], END_HEADERS | END_STREAM), 2))
    assert len(e.path) == H.MAX_VALUE and e.truncated


def test_datagram_is_an_error():
    p = Http2Parser()
    p.receive_datagram(C, PREFACE, 1)
    assert p.state is ParserState.ERROR


def test_event_validation():
    with pytest.raises(ValueError):
        Http2Event(status=1000)
    with pytest.raises(ValueError):
        Http2Event(grpc_status=-2)
    with pytest.raises(ValueError):
        Http2Event(stream_id=1 << 31)
    with pytest.raises(ValueError):
        Http2Event(request_body_len=-1)


def _conversation(n: int):
    """A small connection with n gRPC calls and one plain GET, as (client, server) bytes."""
    c, s = Peer(), Peer()
    req, resp = bytearray(PREFACE + settings_frame((1, 4096))), bytearray(settings_frame())
    for i in range(n):
        sid = 2 * i + 1
        req += c.headers(sid, request(path=f"/p.S/M{i}", method="POST", extra=[
            ("content-type", "application/grpc")]))
        req += frame(DATA, PADDED | END_STREAM, sid, bytes([3]) + grpc_msg(b"q" * i) * 2 + b"\0" * 3)
        resp += s.headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
        resp += frame(DATA, 0, sid, grpc_msg(b"r" * (i + 1)))
        resp += s.headers(sid, [("grpc-status", str(i % 3)), ("grpc-message", f"m%20{i}")],
                          END_HEADERS | END_STREAM)
    sid = 2 * n + 1
    req += c.headers(sid, request(path="/x"), END_HEADERS | END_STREAM)
    resp += s.headers(sid, [(":status", "404")], END_HEADERS | END_STREAM)
    return bytes(req), bytes(resp)


@settings(max_examples=120, deadline=None)
@given(st.integers(0, 4), st.lists(st.integers(1, 64), min_size=1, max_size=40))
def test_fuzz_split_points_do_not_change_results(n, cuts):
    req, resp = _conversation(n)
    whole = drive([(C, req, 1), (S, resp, 2), (C, None, 3), (S, None, 3)])
    assert whole[0].state is ParserState.DONE and len(whole[1]) == n + 1
    steps = []
    for d, blob, ts in ((C, req, 1), (S, resp, 2)):
        pos, i = 0, 0
        while pos < len(blob):
            k = cuts[i % len(cuts)]
            steps.append((d, blob[pos:pos + k], ts))
            pos, i = pos + k, i + 1
    split = drive(steps + [(C, None, 3), (S, None, 3)])
    assert split[1] == whole[1] and split[0].state is ParserState.DONE


def test_signature_is_the_client_or_server_preface():
    assert looks_like(PREFACE, C) and looks_like(PREFACE[:14], C)
    assert not looks_like(PREFACE[:13], C) and not looks_like(b"PRI * HTTP/1.1\r\n", C)
    assert not looks_like(b"GET / HTTP/1.1\r\n\r\n", C)
    # A server that speaks first (nghttpd): its SETTINGS frame, 6 bytes per parameter.
    assert looks_like(settings_frame((3, 100)), S) and looks_like(settings_frame(), S)
    assert not looks_like(settings_frame((3, 100)), C)
    assert not looks_like(frame(SETTINGS, 1, 0), S)                 # an ACK is no preface
    assert not looks_like(frame(SETTINGS, 0, 0, b"\0" * 5), S)
    assert not looks_like(frame(HEADERS, 0, 0, b"\0" * 6), S)
    assert not looks_like(b"\x4a\x00\x00\x00\x0a5.5.5-10.11", S)   # a MySQL greeting
    # A Kafka response of 1540 bytes to correlation id 0 has the frame's shape; its next
    # bytes (an error code, then an array length) are no SETTINGS parameter.
    assert not looks_like(b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x00\x00\x3c", S)


# -- the golden capture: real clients' own accounts ----------------------------------------------

def _golden():
    expect = json.loads((GOLDEN / "session.expect.json").read_text())
    flows = [f for f in pcaputil.flows(GOLDEN / "session.pcap.gz")
             if f.proto == 6 and f.dport == expect["port"]]
    return expect, flows


def _fed(flow) -> tuple[Http2Parser, list[Http2Event]]:
    p = Http2Parser()
    return p, [t.detail for t in pcaputil.feed(p, flow)]


NGHTTP_FIELDS = ("stream_id", "method", "host", "user_agent", "status", "response_content_type",
                 "request_body_len", "response_body_len", "pushed")


def check_nghttp(got: list[Http2Event], streams: list[dict]) -> None:
    got = sorted(got, key=lambda e: e.stream_id)
    assert len(got) == len(streams)
    for e, x in zip(got, streams):
        assert {k: getattr(e, k) for k in NGHTTP_FIELDS} == {k: x[k] for k in NGHTTP_FIELDS}
        from sensor.l7.redact import redact_target
        assert e.path == redact_target(x["path"]) and e.ended and e.latency_ns >= 0


GRPC_FIELDS = ("grpc_service", "grpc_method", "path", "grpc_status", "grpc_message",
               "grpc_request_messages", "reset")


def check_grpc(got: list[Http2Event], calls: list[dict]) -> None:
    assert len(got) == len(calls)
    for e, x in zip(got, calls):
        assert {k: getattr(e, k) for k in GRPC_FIELDS} == {k: x[k] for k in GRPC_FIELDS}
        assert e.status == 200 and e.request_content_type == "application/grpc"
        if x["reset"]:
            # Cancelled mid-stream: at least the messages the client read came.
            assert e.grpc_response_messages >= x["grpc_response_messages"]
        else:
            assert e.grpc_response_messages == x["grpc_response_messages"]


def test_golden_capture_matches_what_the_clients_saw():
    expect, flows = _golden()
    conns = expect["connections"]
    assert len(flows) == len(conns) == 4
    for flow, conn in zip(flows, conns):
        p, got = _fed(flow)
        assert p.state is ParserState.DONE, p.error
        assert all(s not in repr(got) for s in __import__(
            "tests.fixtures.gen_http2", fromlist=["SECRETS"]).SECRETS)
        if conn["client"] == "nghttp":
            check_nghttp(got, conn["streams"])
        elif conn["client"] == "h2load":
            assert len(got) == conn["requests"]
            classes = Counter(f"{e.status // 100}xx" for e in got)
            assert {k: classes.get(k, 0) for k in conn["statuses"]} == conn["statuses"]
            assert {e.path for e in got} == {"/index.html", "/nope"}
            assert all(e.user_agent.startswith("h2load") for e in got)
        else:
            check_grpc(got, conn["calls"])
            assert [e.stream_id for e in got] == [1, 3, 5, 7, 9, 11]


def test_golden_fed_byte_by_byte_split_and_with_junk():
    _, flows = _golden()
    for flow in flows:
        whole = _fed(flow)[1]
        cut = pcaputil.L4Flow(flow.proto, flow.src, flow.sport, flow.dst, flow.dport,
                              [pcaputil.Chunk(c.direction, c.data[i:i + 1], c.ts_ns)
                               for c in flow.chunks for i in range(len(c.data))])
        assert _fed(cut)[1] == whole
        junk = pcaputil.L4Flow(flow.proto, flow.src, flow.sport, flow.dst, flow.dport,
                               [*flow.chunks, pcaputil.Chunk(C, b"\x00\x00\x05\x01junk", 1)])
        assert _fed(junk)[1][:len(whole)] == whole


# -- tshark's HTTP/2 and gRPC dissectors as the oracle --------------------------------------------

_TSHARK = ("tcp.srcport", "tcp.dstport", "http2.streamid", "http2.type", "http2.header.count",
           "http2.header.name", "http2.header.value", "http2.push_promise.promised_stream_id",
           "grpc.message_length")


def tshark_streams(path: Path, port: int) -> tuple[dict, Counter]:
    """(client port, stream id) -> the header fields tshark decoded, request and response
    blocks merged; and the gRPC messages tshark found per (client port, direction)."""
    args = ["tshark", "-r", str(path), "-d", f"tcp.port=={port},http2", "-Y", "http2",
            "-T", "fields", "-E", "occurrence=a", "-E", "aggregator=\x1f"]
    for f in _TSHARK:
        args += ["-e", f]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=60).stdout
    streams: dict = defaultdict(lambda: defaultdict(list))
    messages: Counter = Counter()
    for line in out.splitlines():
        row = {k: (v.split("\x1f") if v else []) for k, v in zip(_TSHARK, line.split("\t"))}
        sport, dport = int(row["tcp.srcport"][0]), int(row["tcp.dstport"][0])
        client, to_server = (sport, True) if dport == port else (dport, False)
        messages[(client, to_server)] += len(row["grpc.message_length"])
        counts = iter(map(int, row["http2.header.count"]))
        promised = iter(map(int, row["http2.push_promise.promised_stream_id"]))
        names, values = iter(row["http2.header.name"]), iter(row["http2.header.value"])
        for sid, ftype in zip(map(int, row["http2.streamid"]), map(int, row["http2.type"])):
            if ftype not in (HEADERS, PUSH):
                continue
            if ftype == PUSH:
                sid = next(promised)
            for _ in range(next(counts)):
                streams[(client, sid)][next(names)].append(next(values))
    return streams, messages


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_golden_against_tshark():
    expect, flows = _golden()
    import gzip
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".pcap") as tmp:
        tmp.write(gzip.decompress((GOLDEN / "session.pcap.gz").read_bytes()))
        tmp.flush()
        oracle, messages = tshark_streams(Path(tmp.name), expect["port"])
    compared = 0
    for flow in flows:
        _, got = _fed(flow)
        for e in got:
            h = oracle[(flow.sport, e.stream_id)]
            assert [e.method] == h[":method"] and [e.host] == h[":authority"]
            from sensor.l7.redact import redact_target
            assert [e.path] == [redact_target(v) for v in h[":path"]]
            # tshark lists every :status, interim ones included; ours is the final one.
            assert e.status == int(h[":status"][-1])
            assert e.user_agent == (h["user-agent"] or [""])[0]
            if e.grpc_status >= 0:
                assert [str(e.grpc_status)] == h["grpc-status"]
                # tshark shows grpc-message as sent (percent-encoded); ours is decoded.
                from urllib.parse import unquote
                assert [e.grpc_message] == [unquote(v) for v in h["grpc-message"]]
            compared += 1
        # gRPC messages each way (tshark reassembles them; the cancelled call's last
        # in-flight message may be cut at the end of the capture in either count).
        if any(e.grpc_service for e in got):
            assert sum(e.grpc_request_messages for e in got) == messages[(flow.sport, True)]
            assert abs(sum(e.grpc_response_messages for e in got)
                       - messages[(flow.sport, False)]) <= 1
    assert compared == 4 + 1 + 12 + 6


def test_shared_corpus_has_no_cleartext_http2():
    """The shared corpus's one HTTP/2 case (arkime/tls-alpn-h2) is h2 inside TLS: the flow
    is TLS with ALPN h2 (the TLS parser's, tests/l7/test_tls.py), nothing for this parser
    until TLS plaintext is fed in. No corpus file holds a cleartext connection preface; one
    added later should be compared here."""
    from sensor.l7.detect import detect

    manifest = json.loads((CORPUS / "MANIFEST.json").read_text())
    files = [f["file"] for case in manifest for f in case["files"] if f["kind"] == "pcap"]
    assert "arkime/tls-alpn-h2/tls-alpn-h2.pcap" in files
    assert not [f for f in files if PREFACE[:14] in (CORPUS / f).read_bytes()]
    (flow,) = [f for f in pcaputil.flows(CORPUS / "arkime/tls-alpn-h2/tls-alpn-h2.pcap")
               if f.proto == 6]
    first = flow.stream(C)
    assert detect(protocol=6, server_port=flow.dport, to_server=first) == "tls"
    assert b"h2" in first and not looks_like(first, C)


# -- the budget: 1 KiB against 10 MiB gRPC messages through real grpcio peers ------------------------

CHUNK = 2048  # LOUPE_PAYLOAD_CHUNK: the kernel copies payload in events of this size


def budget_feed(record) -> tuple[list[Http2Event], int, int]:
    """Feed a recorded conversation as the hybrid contract does: before each chunk the
    kernel would copy, the parser's skip_hint is honoured (those bytes arrive as
    receive_skip and are not copied). Returns the events, the bytes copied and the bytes
    on the wire."""
    p = Http2Parser()
    copied = wire = 0
    out = []
    for d, blob, ts in record:
        if blob is None:
            p.receive_eof(d, ts)
            continue
        wire += len(blob)
        pos = 0
        while pos < len(blob):
            hint = p.skip_hint(d)
            if hint:
                n = min(hint, len(blob) - pos)
                p.receive_skip(d, n, ts)
                pos += n
                continue
            piece = blob[pos:pos + CHUNK]
            copied += len(piece)
            p.receive_data(d, piece, ts)
            pos += len(piece)
        out += [ev.detail for ev in iter(p.next_event, NEED_DATA)]
    out += [ev.detail for ev in iter(p.next_event, NEED_DATA)]
    assert p.state is ParserState.DONE, p.error
    return out, copied, wire


CALLS = 5


class Relay:
    """A TCP relay on loopback recording each direction's bytes of one connection: the real
    client and server talk through it, and the test gets their exact streams."""

    def __init__(self, port: int) -> None:
        import socket
        import threading

        self.target = port
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.record: list[tuple[Direction, bytes | None, int]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import selectors
        import socket

        client, _ = self.sock.accept()
        server = socket.create_connection(("127.0.0.1", self.target))
        sel = selectors.DefaultSelector()
        sel.register(client, selectors.EVENT_READ, (client, server, C))
        sel.register(server, selectors.EVENT_READ, (server, client, S))
        open_ = 2
        while open_:
            for key, _ in sel.select(timeout=10):
                src, dst, d = key.data
                try:
                    blob = src.recv(1 << 20)
                except ConnectionResetError:
                    blob = b""
                if not blob:
                    sel.unregister(src)
                    open_ -= 1
                    self.record.append((d, None, time.monotonic_ns()))
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass   # that side is gone already: nothing more to pass on
                    continue
                self.record.append((d, blob, time.monotonic_ns()))
                dst.sendall(blob)
        client.close()
        server.close()

    def close(self) -> None:
        self.thread.join(timeout=20)
        self.sock.close()


def frames(record) -> tuple[int, int]:
    """(frames, DATA frames) in a recorded conversation, counted by walking its frames."""
    n = data = 0
    for d in (C, S):
        stream = b"".join(blob for dd, blob, _ in record if dd == d and blob)
        pos = len(PREFACE) if d == C else 0
        while pos + 9 <= len(stream):
            n += 1
            data += stream[pos + 3] == DATA
            pos += 9 + int.from_bytes(stream[pos:pos + 3], "big")
    return n, data


def test_budget_1_kib_and_10_mib_grpc_messages_copy_about_the_same():
    from tests.fixtures import gen_http2 as G

    server, port = G.grpc_server("127.0.0.1", 0)
    results = {}
    try:
        for size in (1024, 10 << 20):
            relay = Relay(port)
            G.grpc_sized("127.0.0.1", relay.port, size, CALLS)
            relay.close()
            record = relay.record
            results[size] = (*budget_feed(record), *frames(record))
    finally:
        server.stop(0)
    for size, (got, copied, wire, count, data) in results.items():
        # Every call is still parsed: its method, status, message counts and sizes.
        assert [(e.grpc_method, e.grpc_status, e.grpc_request_messages,
                 e.grpc_response_messages, e.request_body_len, e.response_body_len)
                for e in got] == [("Unary", 0, 1, 1, size + 5, size + 5)] * CALLS
        print(f"{CALLS} calls of {size} B messages: {wire} bytes on the wire, {count} frames "
              f"({data} DATA), {copied} bytes copied")
    (_, small, _, small_frames, _), (_, big, wire, big_frames, _) = \
        results[1024], results[10 << 20]
    # Traffic grows 10,000-fold; what is copied grows only by at most the chunk each further
    # frame's header arrives in (grpc sends a 10 MiB message in a handful of DATA frames
    # once its flow-control windows have grown, with WINDOW_UPDATEs and PINGs between),
    # never with the message bytes.
    assert big - small <= (big_frames - small_frames) * CHUNK, (small, big)
    assert big < wire / 500, (big, wire)


# -- end to end: replay, the collector, the tail filter ----------------------------------------------

def test_replay_gives_the_parser_events_and_what_the_clients_did(tmp_path):
    from sensor import model
    from tests.replay.test_l7_kinds import _us, by_client_port, parser_events, replay

    expect, flows = _golden()
    records = replay(GOLDEN / "session.pcap.gz", tmp_path)
    got = by_client_port(records, "http2")
    assert _us(got) == _us(parser_events(GOLDEN / "session.pcap.gz", Http2Parser,
                                         expect["port"]))
    # nghttpd speaks first: the flows it answered are found by its SETTINGS preface.
    assert {f.app_proto for f in records if isinstance(f, model.Flow)
            and f.dst_port == expect["port"]} == {"http2"}
    nghttp = [c for c in expect["connections"] if c["client"] == "nghttp"]
    check_nghttp(got[flows[0].sport], nghttp[0]["streams"])
    check_grpc(got[flows[3].sport], expect["connections"][3]["calls"])
    hosts = {f.http_host for f in records if isinstance(f, model.Flow) and f.app_proto == "http2"}
    assert hosts == {f"127.0.0.1:{expect['port']}"}


def test_collector_stores_them_and_the_grpc_method_filter_picks_them(tmp_path):
    from collector.filters import compile_filter
    from collector.ingest import decode_batch
    from collector.storage.duckdb import DuckDBStorage
    from loupe.v1 import observer_pb2
    from sensor import model
    from sensor.export import wire
    from sensor.export.table import TableWriter
    from tests.replay.test_l7_kinds import replay

    records = [r for r in replay(GOLDEN / "session.pcap.gz", tmp_path)
               if not isinstance(r, model.LostEvent)]
    batch = wire.batch_to_proto(records, sensor_id="s1", batch_id=1, created_ns=1)
    store = DuckDBStorage(tmp_path / "db")
    store.store_many([decode_batch(batch)], 1)
    l7 = [dataclasses.replace(r, sensor_id="s1") for r in records
          if isinstance(r, model.L7Event)]
    assert store.counts()["http2"] == len(l7) == 23
    stored = list(store.records_since(0, 1 << 62, tables=("http2",)))
    key = lambda r: (r.ts_ns, r.uid, repr(r.detail))  # noqa: E731
    assert sorted(stored, key=key) == sorted(l7, key=key)
    store.close()
    match = compile_filter(observer_pb2.RecordFilter(grpc_method=["F*", "Invalid"]))
    picked = [r for r in batch.records if match(r)]
    assert [r.l7.http2.grpc_status for r in picked] == [5, 3]
    fail = next(r for r in l7 if r.detail.grpc_method == "Fail")
    line = TableWriter(None, color=False, width=None).line(fail)
    assert " http2 " in line and "/loupe.test.Echo/Fail -> 200 grpc 5 no such thing" in line


# -- live: a real sensor watching nghttp, h2load and grpcio traffic between namespaces -------------

H2_PORT, GRPC_PORT = 8080, 50051


@pytest.mark.bpf
@pytest.mark.timeout(240)
@pytest.mark.skipif(shutil.which("nghttpd") is None, reason="nghttp2-server is not installed")
def test_live_sensor_sees_what_the_clients_did(tmp_path):
    """`loupe sensor run` on the client's veth, a real collector: the http2 rows stored
    equal what nghttp logged, h2load counted and the grpcio client got, planted errors
    (404s, NOT_FOUND, a Trailers-Only INVALID_ARGUMENT, a cancelled stream) included."""
    import sys

    from tests.conftest import REPO
    from tests.export.collector_proc import CollectorProcess, query, wait_for
    from tests.fixtures import gen_http2 as G
    from tests.live.rig import Sensor, stop, wait_tcp
    from tests.netns import VethPair

    env = ("env", f"PYTHONPATH={REPO}")
    with VethPair.create("h2") as pair:
        pair.wait_ready()
        collector = CollectorProcess(tmp_path / "data").start()
        root = G.docroot(tmp_path / "www")
        peers = [pair.b.popen(*G.nghttpd_argv(root, pair.b.ip4, H2_PORT),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
                 pair.b.popen(*env, sys.executable, "-m", "tests.fixtures.gen_http2",
                              "grpc-server", pair.b.ip4, str(GRPC_PORT),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
        sensor = Sensor(["--netns", pair.a.netns, "--iface", pair.a.iface,
                         "--collector", collector.address, "--spool-dir", str(tmp_path / "spool"),
                         "--sensor-id", "liveh2", "--output", "jsonl", "--interval", "0.5",
                         "--set", "timeouts.tcp_linger=1s", "--set", "export.batch_delay=100ms",
                         "--select", f"port:{H2_PORT},port:{GRPC_PORT}"], workdir=tmp_path)
        try:
            for port in (H2_PORT, GRPC_PORT):
                wait_tcp(pair.a, pair.b.ip4, port)
            time.sleep(1.5)   # the probes' flows end before the sensor starts
            sensor.start()
            log = pair.a.run(*G.nghttp_argv(pair.b.ip4, H2_PORT)).stdout
            streams = G.nghttp_streams(log)
            out = pair.a.run(*G.h2load_argv(pair.b.ip4, H2_PORT, n=40)).stdout
            statuses = G.h2load_statuses(out)
            calls = json.loads(pair.a.run(*env, sys.executable, "-m", "tests.fixtures.gen_http2",
                                          "grpc-client", pair.b.ip4, str(GRPC_PORT),
                                          timeout=60).stdout)
            time.sleep(2.5)   # past the 1 s linger and a read: ended flows are exported
            assert sensor.stop() == 0
            cols = ("src_port", "dst_port", "stream_id", "method", "host", "path", "status",
                    "user_agent", "request_content_type", "response_content_type",
                    "request_body_len",
                    "response_body_len", "pushed", "grpc_service", "grpc_method", "grpc_status",
                    "grpc_message", "grpc_request_messages", "grpc_response_messages", "reset",
                    "ended")
            total = len(streams) + 40 + len(calls)
            wait_for(lambda: len(query(collector.address, "SELECT uid FROM http2")) >= total,
                     20, "the http2 events at the collector")
            rows = [dict(zip(cols, r)) for r in query(
                collector.address, f"SELECT {', '.join(cols)} FROM http2 ORDER BY ts_ns")]
            # `loupe tail --grpc-method` against the collector: the planted failures only.
            tail = subprocess.run([sys.executable, "-m", "sensor.cli", "tail", "--collector",
                                   collector.address, "--grpc-method", "Fail",
                                   "--grpc-method", "Inv*", "--first", "100", "--format",
                                   "json"], capture_output=True, text=True, timeout=60,
                                  cwd=REPO)
            assert tail.returncode == 0, tail.stderr
            tailed = [json.loads(line) for line in tail.stdout.splitlines()]
        finally:
            sensor.kill()
            for p in peers:
                stop(p)
            collector.stop()
    assert len(rows) == total
    by_port: dict = defaultdict(list)
    for r in rows:
        by_port[(r["dst_port"], r["src_port"])].append(r)
    conns = [by_port[k] for k in sorted(by_port) if k[0] == H2_PORT]
    [nghttp] = [c for c in conns if len(c) == len(streams)]
    [load] = [c for c in conns if len(c) == 40]
    # nghttp: each stream as the client logged it (secrets never stored).
    got = [Http2Event(**{k: v for k, v in r.items() if k not in ("src_port", "dst_port")})
           for r in nghttp]
    check_nghttp(got, streams)
    assert not any(s in repr(rows) for s in G.SECRETS)
    # h2load: its status classes, every request.
    classes = Counter(f"{r['status'] // 100}xx" for r in load)
    assert {k: classes.get(k, 0) for k in statuses} == statuses and statuses["4xx"] == 20
    # grpcio: each call's method, status code and message, planted errors included.
    [grpc_rows] = [by_port[k] for k in by_port if k[0] == GRPC_PORT]
    got = [Http2Event(**{k: v for k, v in r.items() if k not in ("src_port", "dst_port")})
           for r in sorted(grpc_rows, key=lambda r: r["stream_id"])]
    check_grpc(got, calls)
    assert [e.grpc_status for e in got] == [0, 5, 3, 0, 0, -1]
    assert sorted((t["type"], t["detail"]["grpc_method"], t["detail"]["grpc_status"])
                  for t in tailed) == [("http2", "Fail", 5), ("http2", "Invalid", 3)]
