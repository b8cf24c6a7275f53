"""The PII detectors on known values: each type found in the places it is looked for,
near misses (bad check digits, SSNs outside the ranges) not counted, the name rules, the
scrubbing of the record's path, the HTTP/1 parser's captures fed a byte at a time, the
Counts value through wire, JSON and storage, and the rules field."""

from __future__ import annotations

import json

import pytest

from collector import schema
from sensor import model
from sensor.export import jsonfmt, wire
from sensor.export.sinks import flatten
from sensor.l7 import pii
from sensor.l7.base import NEED_DATA, Direction
from sensor.l7.http1 import Http1Parser
from sensor.l7.registry import Counts
from sensor.rules import loader
from sensor.rules.engine import Engine
from tests.pii.planted import JWT, NEAR_MISSES, VALUES, exchanges


def _text(text: str, ip: bool = True) -> dict:
    counts: dict = {}
    pii.count_text(text, counts, "request", ip=ip)
    return counts


@pytest.mark.parametrize("kind", sorted(set(VALUES) - {"password"}))
def test_every_planted_value_is_found_as_its_type_only(kind):
    for value in VALUES[kind]:
        assert _text(f"x {value} y") == {f"{kind}.request": 1}, value


@pytest.mark.parametrize("value", NEAR_MISSES)
def test_near_misses_are_not_counted(value):
    assert _text(value) == {}


@pytest.mark.parametrize("text", [
    "logo@2x.png", "user@localhost", "v1.2.3.4.5", "Chrome/120.0.0.0 Safari/537.36",
    "2024-05-01", "12:30:45", "order 1234567890123", "id=4111111111111111111111",
    "0000000000000000", "tel 555-0100", "2024-05-01T12:30:45Z", "std::vector<int>",
    "eyJub3QiOiJqd3QifQ.eyJ4IjoxfQ.sig",   # a header without "alg"
    "GB00WEST12345698765432", "XX82WEST12345698765432", "sk_live_short",
])
def test_ordinary_text_counts_nothing(text):
    assert _text(text) == {}, text


def test_checks():
    assert pii.luhn("4111111111111111") and not pii.luhn("4111111111111112")
    assert pii.card_ok("4111-1111-1111-1111") and not pii.card_ok("9111111111111111")
    assert pii.iban_ok("GB82 WEST 1234 5698 7654 32") and not pii.iban_ok("GB82WEST1234569876543")
    assert pii.ssn_ok("219", "09", "9999")
    assert not any(pii.ssn_ok(*p) for p in (("000", "12", "3456"), ("666", "12", "3456"),
                                            ("900", "12", "3456"), ("123", "00", "4567"),
                                            ("123", "45", "0000")))
    assert pii.jwt_ok(JWT.split(".")[0])
    assert pii.key_like("a8F3kL9zQ2xW7vB1nM4pR6tY") and not pii.key_like("aaaaaaaaaaaaaaaaaaaaaaaa")


def test_name_rules_passwords_and_key_named_secrets():
    counts: dict = {}
    left = pii.count_fields([("user.password", "x"), ("pwd", "y"), ("passwd", ""),
                             ("api_key", "a8F3kL9zQ2xW7vB1nM4pR6tY"),
                             ("csrf_token", "a8F3kL9zQ2xW7vB1nM4pR6tY"),
                             ("token", "short"), ("name", "bob")], counts, "request")
    assert counts == {"password.request": 2, "secret.request": 1}
    assert left == ["", "a8F3kL9zQ2xW7vB1nM4pR6tY", "short", "bob"]


def test_request_sources_and_what_is_left_out():
    scanner = pii.Scanner()
    head = (b"GET /u/alice.planted@example.com?ip=203.0.113.77 HTTP/1.1\r\n"
            b"Host: 198.51.100.7\r\nUser-Agent: Mozilla/5.0 Chrome/120.0.0.0\r\n"
            b"Cookie: sid=" + JWT.encode() + b"\r\n\r\n")
    assert scanner.request(head, b"", "") == {"email.request": 1, "ip.request": 1,
                                              "jwt.request": 1}
    # A JSON number is a value too; a body cut at the capture bound is read as text.
    assert scanner.request(b"POST / HTTP/1.1\r\n\r\n", b'{"n": 4111111111111111}',
                           "application/json") == {"card.request": 1}
    assert scanner.request(b"POST / HTTP/1.1\r\n\r\n", b'{"e": "bob.planted+x@example.or',
                           "application/json") == {"email.request": 1}
    assert scanner.response(b'{"pan": "378282246310005"}', "application/json") == {
        "card.response": 1}


def test_bounds_hold_for_huge_inputs():
    scanner = pii.Scanner()
    body = "&".join(f"e{i}=alice.planted@example.com" for i in range(10_000)).encode()
    counts = scanner.request(b"POST / HTTP/1.1\r\n\r\n", body,
                             "application/x-www-form-urlencoded")
    assert counts["email.request"] <= pii.MAX_ARGS
    assert _text("4" * 100_000) == {}


def test_scrub_target():
    assert pii.scrub_target("/users/alice.planted%40example.com/orders?card=4111111111111111"
                            "&page=2&password=x#frag") == \
        "/users/REDACTED/orders?card=REDACTED&page=2&password=REDACTED#frag"
    assert pii.scrub_target("/a/42?q=shoes") == "/a/42?q=shoes"


def _run(parser, chunks):
    events = []
    for d, data in chunks:
        parser.receive_data(d, data, 1)
        while (t := parser.next_event()) is not NEED_DATA:
            events.append(t.detail)
    return events


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_http1_parser_counts_each_exchange(bytewise):
    chunks = []
    for req, resp, _, _ in exchanges():
        chunks += [(Direction.TO_SERVER, req), (Direction.TO_CLIENT, resp)]
    if bytewise:
        chunks = [(d, data[i:i + 1]) for d, data in chunks for i in range(len(data))]
    events = _run(Http1Parser(pii=pii.Scanner()), chunks)
    assert [dict(e.pii) for e in events] == [expected for *_, expected in exchanges()]
    assert "4111111111111111" not in repr(events) and "378282246310005" not in repr(events)
    # Off by default: no counts, the query as sent.
    plain = _run(Http1Parser(), chunks)
    assert [e.pii for e in plain] == [{}] * 3 and "378282246310005" in plain[1].path


def test_chunked_and_close_delimited_responses_are_sampled_within_the_budget():
    resp = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked"
            b"\r\n\r\n10\r\n{\"e\": \"bob.plan\r\n18\r\nted+x@example.org\", \"x\":1}\r\n0\r\n\r\n")
    events = _run(Http1Parser(pii=pii.Scanner()), [
        (Direction.TO_SERVER, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), (Direction.TO_CLIENT, resp)])
    assert dict(events[0].pii) == {"email.response": 1}
    p = Http1Parser(pii=pii.Scanner(response_bytes=8))
    p.receive_data(Direction.TO_SERVER, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 1)
    p.receive_data(Direction.TO_CLIENT, b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n"
                   b"mail bob.planted+x@example.org", 2)
    p.receive_eof(Direction.TO_CLIENT, 3)
    p.receive_eof(Direction.TO_SERVER, 3)
    assert p.next_event().detail.pii == {}   # the address lies past the 8-byte sample


def test_counts_through_wire_json_storage_and_rules():
    ev = model.L7Event(uid="C1", ts_ns=1, src_addr="198.18.0.1", dst_addr="198.18.0.2",
                       src_port=1, dst_port=80, protocol=6,
                       detail=model.HttpEvent(method="GET", path="/", pii={"card.response": 2,
                                                                           "email.request": 1}))
    assert ev.detail.pii == {"card.response": 2, "email.request": 1}
    assert type(ev.detail.pii) is Counts and hash(ev)
    assert wire.from_proto(wire.to_proto(ev)) == ev
    assert dict(wire.to_proto(ev).l7.http.pii) == {"card.response": 2, "email.request": 1}
    d = jsonfmt.to_dict(ev)
    assert d["detail"]["pii"] == {"card.response": 2, "email.request": 1}
    assert jsonfmt.from_dict(json.loads(json.dumps(d))) == ev
    row = flatten(ev)
    assert row["pii"] == '{"card.response":2,"email.request":1}'
    assert schema.record_from_row("http", {**row, "received_ns": 0, "batch_seq": 1}) == ev
    with pytest.raises(ValueError):
        model.HttpEvent(pii={f"k{i}": 1 for i in range(100)})
    with pytest.raises(ValueError):
        model.HttpEvent(pii={"card.request": -1})


def test_rules_match_on_pii_counts(tmp_path):
    rule = tmp_path / "pii.toml"
    rule.write_text('''
[[rule]]
id = "card-in-response-without-auth"
action = "alert"
match = [ { field = "pii.card.response", op = "range", value = [1, 1000] },
          { field = "header:authorization", op = "exists", negate = true } ]
''')
    engine = Engine(loader.load(rule))

    def event(counts):
        return model.L7Event(uid="C1", ts_ns=1, src_addr="198.18.0.1", dst_addr="198.18.0.2",
                             src_port=1, dst_port=80, protocol=6,
                             detail=model.HttpEvent(method="GET", path="/", pii=counts))
    head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    authed = b"GET / HTTP/1.1\r\nHost: a\r\nAuthorization: Basic eDp5\r\n\r\n"
    _, alerts = engine.evaluate(event({"card.response": 2}), (head, b""))
    assert [(a.field, a.excerpt) for a in alerts] == [("pii.card.response", "2")]
    assert engine.evaluate(event({"card.response": 2}), (authed, b""))[1] == []
    assert engine.evaluate(event({"card.request": 2}), (head, b""))[1] == []
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\nid = "x"\naction = "alert"\nfield = "pii.crad.response"\n'
                   'op = "exists"\n')
    with pytest.raises(Exception, match="pii.crad.response"):
        loader.load(bad)


def test_http2_request_header_fields_are_counted():
    from sensor.l7.http2 import PREFACE, Http2Parser
    from tests.l7.test_http2 import C, S, Peer, drive, request, settings_frame

    c, s = Peer(), Peer()
    req = PREFACE + settings_frame() + c.headers(1, request(
        path="/users/alice.planted%40example.com?card=4111111111111111", extra=[
            ("authorization", f"Bearer {JWT}"), ("x-forwarded-for", "203.0.113.77")]),
        flags=0x5)
    resp = settings_frame() + s.headers(1, [(":status", "200")], flags=0x5)
    steps = [(C, req, 1), (S, resp, 2), (C, None, 3), (S, None, 3)]
    [(_, e)] = drive(steps, Http2Parser(pii=pii.Scanner()))[1]
    assert dict(e.pii) == {"email.request": 1, "card.request": 1, "jwt.request": 1,
                           "ip.request": 1}
    assert e.path == "/users/REDACTED?card=REDACTED"
    [(_, plain)] = drive(steps, Http2Parser())[1]
    assert plain.pii == {} and "4111111111111111" in plain.path
