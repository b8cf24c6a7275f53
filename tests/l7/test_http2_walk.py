"""The HTTP/2 parser fed what the kernel's frame walk (bpf/frames.h) delivers: DATA frames
as their header and five payload octets then a Skip, PING and WINDOW_UPDATE frames as a
Skip on a frame boundary. Every call is still one event with exact counts and lengths; a
Skip that is not on a frame boundary still ends the parse."""

from __future__ import annotations

from sensor.l7.base import NEED_DATA, ParserState
from sensor.l7.http2 import FRAMING, PREFACE, Http2Parser
from tests.l7.test_http2 import (C, DATA, END_HEADERS, END_STREAM, PING, S, WINDOW, Peer,
                                 frame, grpc_msg, settings_frame)


def grpc_call(cli: Peer, srv: Peer, sid: int, body: bytes):
    """(client frames, server frames) of one unary call, as lists of frames."""
    req = [cli.headers(sid, [(":method", "POST"), (":scheme", "http"),
                             (":authority", "svc"), (":path", "/pkg.Svc/Call"),
                             ("content-type", "application/grpc"), ("te", "trailers")]),
           frame(DATA, END_STREAM, sid, grpc_msg(body))]
    resp = [srv.headers(sid, [(":status", "200"), ("content-type", "application/grpc")]),
            frame(DATA, 0, sid, grpc_msg(body)),
            frame(WINDOW, 0, 0, b"\0\0\1\0"), frame(PING, 0, 0, b"p" * 8),
            srv.headers(sid, [("grpc-status", "0")], END_HEADERS | END_STREAM)]
    return req, resp


def walked(p: Http2Parser, d, frames: list[bytes]) -> None:
    """Feeds frames as the walk copies them (FRAMING.kernel_walk)."""
    walk = FRAMING.kernel_walk
    for f in frames:
        ftype = f[3]
        if ftype not in walk.elide:
            p.receive_data(d, f, 1)
        elif ftype == walk.keep_type:
            keep = 9 + walk.keep_octets
            p.receive_data(d, f[:keep], 1)
            if len(f) > keep:
                p.receive_skip(d, len(f) - keep, 1)
        else:
            p.receive_skip(d, len(f), 1)   # left out whole


def test_calls_walked_by_the_kernel_are_parsed_exactly():
    p, cli, srv = Http2Parser(), Peer(), Peer()
    p.receive_data(C, PREFACE + settings_frame((3, 100)), 0)
    p.receive_data(S, settings_frame(), 0)
    for i, size in enumerate((10, 1024, 100_000)):
        req, resp = grpc_call(cli, srv, 1 + 2 * i, b"x" * size)
        walked(p, C, req)
        walked(p, S, resp)
    got = []
    while (ev := p.next_event()) is not NEED_DATA:
        got.append(ev.detail)
    assert [(e.grpc_method, e.grpc_status, e.grpc_request_messages, e.grpc_response_messages,
             e.request_body_len, e.response_body_len) for e in got] == [
        ("Call", 0, 1, 1, n + 5, n + 5) for n in (10, 1024, 100_000)]
    assert p.state is ParserState.OK
    assert p.elided_bytes == [0, 3 * (13 + 17)]   # WINDOW_UPDATE and PING, whole


def test_a_skip_inside_a_frame_header_still_ends_the_parse():
    p, cli = Http2Parser(), Peer()
    p.receive_data(C, PREFACE + cli.headers(1, [(":method", "GET"), (":path", "/")])[:4], 0)
    p.receive_skip(C, 20, 1)
    assert p.state is ParserState.ERROR
