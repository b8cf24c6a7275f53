"""Request bodies for the rules: the HTTP/1 parser keeps the raw head and a bounded body
prefix when asked (its `inspect` option), skips the rest, never keeps response bodies;
the live budget grants the wanted prefix; replay and live give the same alerts."""

from __future__ import annotations

import pytest

from sensor.l7.base import NEED_DATA, Direction, Transaction
from sensor.l7.http1 import Http1Parser, HttpTransaction
from sensor.model import Alert, L7Event
from tests.live.test_live_l7 import PSH, ACK, SYN, FIN, Conn, Control, _key, _run
from sensor.engine.live import LiveL7

FORM = b"user=alice&comment=1%27+or+%271%27%3D%271&pad=" + b"x" * 200
REQ = (b"POST /api/comment HTTP/1.1\r\nHost: h\r\nContent-Type: application/x-www-form-"
       b"urlencoded\r\nContent-Length: %d\r\n\r\n" % len(FORM)) + FORM
RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


def _feed(parser: Http1Parser, chunks_req, chunks_resp) -> list[Transaction]:
    for c in chunks_req:
        parser.receive_data(Direction.TO_SERVER, c, 1)
    for c in chunks_resp:
        parser.receive_data(Direction.TO_CLIENT, c, 2)
    out = []
    while (t := parser.next_event()) is not NEED_DATA:
        out.append(t)
    return out


@pytest.mark.parametrize("split", ["whole", "bytes"])
def test_body_prefix_is_captured_and_bounded(split):
    asked = []

    def inspect(method, target, ctype):
        asked.append((method, target, ctype))
        return 64

    p = Http1Parser(inspect=inspect)
    chunks = [REQ] if split == "whole" else [REQ[i:i + 1] for i in range(len(REQ))]
    [t] = _feed(p, chunks, [RESP])
    assert isinstance(t, HttpTransaction)
    head, body = t.request
    assert head.startswith(b"POST /api/comment HTTP/1.1\r\nHost: h")
    assert body == FORM[:64]                      # bounded to what inspect asked for
    assert t.detail.request_body_len == len(FORM)  # the record still counts it all
    assert asked == [("POST", "/api/comment", "application/x-www-form-urlencoded")]


def test_skip_hint_waits_for_the_prefix_then_skips_the_rest():
    p = Http1Parser(inspect=lambda m, t, c: 16)
    head = REQ[:len(REQ) - len(FORM)]
    p.receive_data(Direction.TO_SERVER, head, 1)
    # The regression: a skip hint here would make the engine skip the body the rules
    # asked for (the kernel would not even copy it).
    assert p.skip_hint(Direction.TO_SERVER) == 0
    assert p.wanted(Direction.TO_SERVER) == 16
    p.receive_data(Direction.TO_SERVER, FORM[:16], 1)
    assert p.wanted(Direction.TO_SERVER) == 0
    assert p.skip_hint(Direction.TO_SERVER) == len(FORM) - 16
    p.receive_skip(Direction.TO_SERVER, len(FORM) - 16, 1)
    [t] = _feed(p, [], [RESP])
    assert t.request[1] == FORM[:16]


def test_chunked_request_body_and_no_response_body():
    body = b"a=1%20union%20select%201"
    req = (b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Type: "
           b"application/x-www-form-urlencoded\r\n\r\n" + b"%x\r\n" % len(body) + body
           + b"\r\n0\r\n\r\n")
    p = Http1Parser(inspect=lambda m, t, c: 8192)
    [t] = _feed(p, [req], [RESP])
    assert t.request[1] == body
    # Responses are never captured: the parser skips their bodies as before.
    p = Http1Parser(inspect=lambda m, t, c: 8192)
    p.receive_data(Direction.TO_SERVER, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", 1)
    p.receive_data(Direction.TO_CLIENT, RESP[:-5], 2)
    assert p.skip_hint(Direction.TO_CLIENT) == 5 and p.wanted(Direction.TO_CLIENT) == 0


def test_without_inspect_nothing_is_kept():
    p = Http1Parser()
    [t] = _feed(p, [REQ], [RESP])
    assert type(t) is Transaction
    p = Http1Parser(inspect=lambda m, t, c: 0)    # asked, but not this request's body
    [t] = _feed(p, [REQ], [RESP])
    assert t.request[1] == b"" and t.request[0].startswith(b"POST")


def test_live_budget_grants_the_body_prefix_and_alerts(tmp_path):
    rules = tmp_path / "r.toml"
    rules.write_text('[body]\nmax_bytes = 6000\npaths = ["/api/"]\n'
                     '[[group]]\nname = "sqli"\nmode = "block"\n')
    records, verdicts, ctl = [], [], Control()
    l7 = LiveL7(emit=records.append, control=ctl, budget=(1024, 1024), refill_octets=1024,
                rules=str(rules), on_verdict=verdicts.append)
    c = Conn(_key())
    body = b"note=" + b"y" * 3000 + b"&id=1%20union%20select%20password%20from%20users"
    head = (b"POST /api/notes HTTP/1.1\r\nHost: h\r\nContent-Type: application/x-www-form-"
            b"urlencoded\r\nContent-Length: %d\r\n\r\n" % len(body))
    _run(l7, [c.event(0, b"", SYN), c.event(1, b"", SYN | ACK), c.event(0, head)])
    # The parser wants the body: the allowance toward the server grows to cover it.
    granted = sum(call[2] for call in ctl.calls if call[0] == "grant" and call[1] == 0)
    assert 1024 + granted >= len(head) + len(body)
    assert not [call for call in ctl.calls if call[0] == "skip" and call[1] == 0]
    _run(l7, [c.event(0, body[i:i + 1448]) for i in range(0, len(body), 1448)])
    _run(l7, [c.event(1, RESP), c.event(0, b"", FIN | ACK), c.event(1, b"", FIN | ACK)])
    alerts = [r for r in records if isinstance(r, Alert)]
    http = [r for r in records if isinstance(r, L7Event)]
    assert [(a.rule_id, a.action, a.field) for a in alerts] == [("loupe-sqli", "block", "body:id")]
    assert alerts[0].uid == http[0].uid and alerts[0].community_id == http[0].community_id
    assert [v.rule_id for v in verdicts] == ["loupe-sqli"]


def test_reload_between_events_loses_no_flow(tmp_path):
    """What SIGHUP does (LiveSensor.reload_rules): a new rule set from the next event on,
    with a request in flight on a live flow; the flow and its events carry on."""
    from sensor.rules import loader

    old, new = tmp_path / "old.toml", tmp_path / "new.toml"
    old.write_text('[[rule]]\nid = "old"\naction = "alert"\nfield = "path"\nvalue = "/a"\n')
    new.write_text('[[rule]]\nid = "new"\naction = "alert"\nfield = "path"\nvalue = "/a"\n')
    records = []
    l7 = LiveL7(emit=records.append, control=Control(), rules=str(old))
    c = Conn(_key())
    _run(l7, [c.event(0, b"", SYN), c.event(1, b"", SYN | ACK),
              c.event(0, b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n"), c.event(1, RESP)])
    _run(l7, [c.event(0, b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")])   # in flight
    l7.rules.reload(loader.load(new))
    _run(l7, [c.event(1, RESP), c.event(0, b"", FIN | ACK), c.event(1, b"", FIN | ACK)])
    kinds = [(type(r).__name__, getattr(r, "rule_id", "")) for r in records]
    assert kinds == [("L7Event", ""), ("Alert", "old"), ("L7Event", ""), ("Alert", "new")]
    assert len({r.uid for r in records}) == 1
