"""Redis parser (sensor/l7/redis.py): crafted RESP2/RESP3 cases, the golden capture of real
redis-server/redis-cli/redis-py traffic against what the clients saw, the shared corpus
against tshark's RESP dissector and Zeek's redis.log, a live run, the skip budget with a
10 MiB value, redaction, bounds and fuzzing. Every fixture is fed whole, one byte at a time,
split at every offset (a small flow) and with trailing junk.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import selectors
import shutil
import socket
import subprocess
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sensor.l7 import redis as R
from sensor.l7.base import NEED_DATA, Direction, ParserState
from sensor.l7.redis import RedisEvent, RedisParser, looks_like, split_inline
from tests.l7 import pcaputil

C, S = Direction.TO_SERVER, Direction.TO_CLIENT
HERE = Path(__file__).resolve().parent
GOLDEN = HERE.parent / "golden"
CORPUS = HERE.parent.parent.parent / "shared" / "corpus"


def cmd(*args: bytes | str) -> bytes:
    parts = [a.encode() if isinstance(a, str) else a for a in args]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def drive(steps, parser=None):
    """steps: (direction, bytes, ts) or (direction, None, ts) for EOF. Returns (parser,
    [(ts_ns, event)])."""
    p = parser or RedisParser()
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


# -- crafted cases ------------------------------------------------------------------------------

def test_pipelined_commands_pair_in_order_with_latency():
    req = cmd("SET", "foo", "bar") + cmd("GET", "foo") + cmd("INCR", "n") + cmd("GET", "nope")
    steps = [(C, req, 1000), (S, b"+OK\r\n$3\r\nbar\r\n:7\r\n$-1\r\n", 5000),
             (C, None, 6000), (S, None, 6000)]
    for variant in (steps, bytewise(steps)):
        p, out = drive(variant)
        assert [(e.command, e.key, e.argc, e.reply_type, e.reply, e.reply_len)
                for _, e in out] == [
            ("SET", "foo", 3, "string", "OK", 0), ("GET", "foo", 2, "bulk", "", 3),
            ("INCR", "n", 2, "integer", "7", 0), ("GET", "nope", 2, "null", "", 0)]
        assert all(ts == 1000 and e.latency_ns == 4000 for ts, e in out)
        assert [e.request_bytes for _, e in out] == [31, 22, 21, 23]
        assert [e.reply_bytes for _, e in out] == [5, 9, 4, 5]
        assert p.state is ParserState.DONE


def test_errors_are_data():
    got = events((C, cmd("LPUSH", "k", "v") + cmd("NOPE"), 1),
                 (S, b"-WRONGTYPE Operation against a key\r\n-ERR unknown command 'NOPE'\r\n", 2))
    assert [(e.reply_type, e.error) for e in got] == [
        ("error", "WRONGTYPE Operation against a key"), ("error", "ERR unknown command 'NOPE'")]


def test_inline_commands_with_redis_quoting():
    assert split_inline(b'SET "a b" \'c\\\'d\' "\\x41\\n"') == [b"SET", b"a b", b"c'd", b"A\n"]
    assert split_inline(b"  PING   \t") == [b"PING"]
    got = events((C, b'PING\r\n\r\nSET "my key" v\nEXISTS k1 k2 k3\r\n', 1),
                 (S, b"+PONG\r\n+OK\r\n:2\r\n", 2))
    assert [(e.command, e.key, e.argc, e.inline) for e in got] == [
        ("PING", "", 1, True), ("SET", "my key", 3, True), ("EXISTS", "k1", 4, True)]


def test_unbalanced_quotes_in_inline_request_is_an_error():
    p, _ = drive([(C, b'SET "open\r\n', 1)])
    assert p.state is ParserState.ERROR and "quotes" in p.error


def test_two_word_commands_and_key_positions():
    cases = [
        (cmd("config", "get", "maxmemory"), "CONFIG GET", ""),
        (cmd("CLIENT", "SETNAME", "x"), "CLIENT SETNAME", ""),
        (cmd("OBJECT", "ENCODING", "mykey"), "OBJECT ENCODING", "mykey"),
        (cmd("EVAL", "return 1", "2", "k1", "k2", "a"), "EVAL", "k1"),
        (cmd("EVAL", "return 1", "0"), "EVAL", ""),
        (cmd("XREAD", "COUNT", "2", "STREAMS", "s1", "s2", "0", "0"), "XREAD", "s1"),
        (cmd("ZUNION", "2", "z1", "z2"), "ZUNION", "z1"),
        (cmd("BLMPOP", "0", "1", "l1", "LEFT"), "BLMPOP", "l1"),
        (cmd("MIGRATE", "h", "1", "", "0", "5", "KEYS", "a", "b"), "MIGRATE", "a"),
        (cmd("PUBLISH", "chan", "msg"), "PUBLISH", "chan"),
        (cmd("FLUSHALL"), "FLUSHALL", ""),
    ]
    got = events((C, b"".join(c for c, _, _ in cases), 1))
    assert [(e.command, e.key) for e in got] == [(c, k) for _, c, k in cases]


def test_resp3_types_attribute_and_streamed_values():
    replies = (b"%2\r\n+server\r\n+redis\r\n+proto\r\n:3\r\n"     # HELLO 3
               b"~2\r\n+a\r\n+b\r\n"                             # set
               b",3.25\r\n#t\r\n(3492890328409238509324850943850943825024385\r\n_\r\n"
               b"=15\r\ntxt:Some string\r\n"                     # verbatim
               b"!21\r\nSYNTAX invalid syntax\r\n"               # blob error
               b"|1\r\n+key-popularity\r\n%1\r\n$1\r\na\r\n,0.1923\r\n:9\r\n"  # attribute
               b"$?\r\n;4\r\nHell\r\n;5\r\no wor\r\n;0\r\n"     # streamed string
               b"*?\r\n:1\r\n*2\r\n:2\r\n:3\r\n.\r\n"          # streamed array
               b"%?\r\n+a\r\n:1\r\n.\r\n")                      # streamed map
    names = ["HELLO", "SMEMBERS", "ZSCORE", "EXISTS", "BIG", "GET", "INFO", "X", "INCR",
             "GET", "LRANGE", "HGETALL"]
    req = b"".join(cmd(n, "k") if n != "HELLO" else cmd("HELLO", "3") for n in names)
    steps = [(C, req, 1), (S, replies, 2), (C, None, 3), (S, None, 3)]
    for variant in (steps, bytewise(steps)):
        p, out = drive(variant)
        got = [(e.command, e.reply_type, e.reply, e.error, e.reply_len, e.resp) for _, e in out]
        assert got == [
            ("HELLO", "map", "", "", 2, 3), ("SMEMBERS", "set", "", "", 2, 3),
            ("ZSCORE", "double", "3.25", "", 0, 3), ("EXISTS", "boolean", "t", "", 0, 3),
            ("BIG", "big_number", "3492890328409238509324850943850943825024385", "", 0, 3),
            ("GET", "null", "", "", 0, 3), ("INFO", "verbatim", "", "", 15, 3),
            ("X", "error", "", "SYNTAX invalid syntax", 0, 3),
            ("INCR", "integer", "9", "", 0, 3),
            ("GET", "bulk", "", "", 9, 3), ("LRANGE", "array", "", "", 2, 3),
            ("HGETALL", "map", "", "", 1, 3)], got
        # The attribute belongs to the reply after it: counted in its bytes.
        incr = out[8][1]
        assert incr.reply_bytes == len(b"|1\r\n+key-popularity\r\n%1\r\n$1\r\na\r\n,0.1923\r\n:9\r\n")
        assert p.summary() == {"redis_command": "SMEMBERS", "redis_resp": "3"}


def test_attribute_inside_an_aggregate_is_not_an_element():
    got = events((C, cmd("LRANGE", "k", "0", "-1"), 1),
                 (S, b"*2\r\n:1\r\n|1\r\n+ttl\r\n:5\r\n:2\r\n", 2))
    assert [(e.reply_type, e.reply_len, e.reply_bytes) for e in got] == [("array", 2, 26)]


def test_resp3_push_messages_do_not_break_pairing():
    steps = [(C, cmd("HELLO", "3"), 1), (S, b"%1\r\n+proto\r\n:3\r\n", 2),
             (C, cmd("SUBSCRIBE", "a", "b"), 3),
             (S, b">3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n", 4),
             (S, b">3\r\n$7\r\nmessage\r\n$1\r\na\r\n$2\r\nhi\r\n", 5),   # before b's confirmation
             (S, b">3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n", 6),
             (C, cmd("PING"), 7),
             (S, b">4\r\n$8\r\npmessage\r\n$2\r\np*\r\n$2\r\npx\r\n$1\r\nz\r\n", 8),
             (S, b"+PONG\r\n", 9)]
    got = events(*steps)
    assert [(e.command, e.push, e.reply_type, e.reply, e.key, e.replies) for e in got] == [
        ("HELLO", False, "map", "", "", 1),
        ("", True, "push", "message", "a", 1),
        ("SUBSCRIBE", False, "push", "", "a", 2),
        ("", True, "push", "pmessage", "p*", 1),
        ("PING", False, "string", "PONG", "", 1)]
    assert got[2].latency_ns == 1


def test_resp2_subscribe_mode_messages_and_unsubscribe_all():
    sub = b"*3\r\n$9\r\nsubscribe\r\n$1\r\n%s\r\n:%d\r\n"
    unsub = b"*3\r\n$11\r\nunsubscribe\r\n$1\r\n%s\r\n:%d\r\n"
    got = events(
        (C, cmd("SUBSCRIBE", "x", "y"), 1), (S, sub % (b"x", 1) + sub % (b"y", 2), 2),
        (S, b"*3\r\n$7\r\nmessage\r\n$1\r\nx\r\n$3\r\nabc\r\n", 3),
        (C, cmd("UNSUBSCRIBE") + cmd("PING"), 4),
        (S, unsub % (b"x", 1) + unsub % (b"y", 0) + b"*2\r\n$4\r\npong\r\n$0\r\n\r\n", 5))
    assert [(e.command, e.push, e.reply_type, e.replies, e.reply_len) for e in got] == [
        ("SUBSCRIBE", False, "array", 2, 3), ("", True, "push", 1, 3),
        ("UNSUBSCRIBE", False, "array", 2, 3), ("PING", False, "array", 1, 2)]


def test_unsubscribe_all_ends_at_a_reply_that_is_not_its_own():
    # One confirmation with count 1 (a pattern subscription is left), then PING's reply.
    got = events((C, cmd("UNSUBSCRIBE") + cmd("PING"), 1),
                 (S, b"*3\r\n$11\r\nunsubscribe\r\n$1\r\nx\r\n:1\r\n+PONG\r\n", 2))
    assert [(e.command, e.replies, e.reply) for e in got] == [("UNSUBSCRIBE", 1, ""),
                                                             ("PING", 1, "PONG")]


def test_client_reply_off_and_skip_expect_no_reply():
    req = (cmd("CLIENT", "REPLY", "OFF") + cmd("SET", "a", "1") + cmd("CLIENT", "REPLY", "ON")
           + cmd("CLIENT", "REPLY", "SKIP") + cmd("SET", "b", "2") + cmd("GET", "b"))
    got = events((C, req, 1), (S, b"+OK\r\n$1\r\n2\r\n", 2))
    assert [(e.command, e.replies, e.reply_type) for e in got] == [
        ("CLIENT REPLY", 0, ""), ("SET", 0, ""), ("CLIENT REPLY", 1, "string"),
        ("CLIENT REPLY", 0, ""), ("SET", 0, ""), ("GET", 1, "bulk")]


def test_monitor_lines_are_counted_not_paired():
    p = RedisParser()
    got = events((C, cmd("MONITOR"), 1),
                 (S, b"+OK\r\n+1700000000.1 [0 127.0.0.1:1] \"GET\" \"k\"\r\n" * 1, 2),
                 (S, b"+1700000000.2 [0 127.0.0.1:1] \"PING\"\r\n", 3), parser=p)
    assert [(e.command, e.reply) for e in got] == [("MONITOR", "OK")]
    assert p.monitor_lines == 2 and p.unmatched_replies == 0


def test_reply_without_request_and_request_without_reply():
    p = RedisParser()
    got = events((S, b"+OK\r\n", 1), (C, cmd("GET", "k"), 2), parser=p)
    assert [(e.command, e.reply_type) for e in got] == [("", "string"), ("GET", "")]
    assert p.unmatched_replies == 1


def test_pending_limit_reports_the_oldest_and_keeps_pairing():
    p = RedisParser(max_pending=2)
    got = events((C, cmd("GET", "a") + cmd("GET", "b") + cmd("GET", "c"), 1),
                 (S, b"$1\r\nA\r\n$1\r\nB\r\n$1\r\nC\r\n", 2), parser=p)
    assert [(e.key, e.replies, e.reply_len) for e in got] == [("a", 0, 0), ("b", 1, 1),
                                                               ("c", 1, 1)]
    assert p.evicted == 1


def test_hello_that_fails_keeps_resp2():
    p = RedisParser()
    got = events((C, cmd("HELLO", "3") + cmd("PING"), 1),
                 (S, b"-NOPROTO unsupported protocol version\r\n+PONG\r\n", 2), parser=p)
    assert [e.resp for e in got] == [2, 2] and got[0].error.startswith("NOPROTO")


# -- redaction ------------------------------------------------------------------------------------

REDACT_CASES = [
    (cmd("AUTH", "s3cret-one"), "AUTH", ("[redacted]",)),
    (cmd("AUTH", "bob", "s3cret-two"), "AUTH", ("bob", "[redacted]")),
    (b"AUTH s3cret-inline\r\n", "AUTH", ("[redacted]",)),
    (cmd("HELLO", "3", "AUTH", "bob", "s3cret-three", "SETNAME", "app"), "HELLO",
     ("3", "AUTH", "bob", "[redacted]", "SETNAME", "app")),
    (cmd("MIGRATE", "10.0.0.9", "6379", "k", "0", "5000", "AUTH", "s3cret-four"), "MIGRATE",
     ("10.0.0.9", "6379", "k", "0", "5000", "AUTH", "[redacted]")),
    (cmd("MIGRATE", "h", "1", "k", "0", "5", "COPY", "AUTH2", "u", "s3cret-five"), "MIGRATE",
     ("h", "1", "k", "0", "5", "COPY", "AUTH2", "u", "[redacted]")),
    (cmd("CONFIG", "SET", "requirepass", "s3cret-six", "maxmemory", "1gb", "masterauth",
         "s3cret-seven"), "CONFIG SET",
     ("requirepass", "[redacted]", "maxmemory", "1gb", "masterauth", "[redacted]")),
    (cmd("ACL", "SETUSER", "alice", "on", ">s3cret-eight", "<s3cret-nine", "#" + "ab" * 32,
         "~*", "+@all"), "ACL SETUSER",
     ("alice", "on", ">[redacted]", "<[redacted]", "#[redacted]", "~*", "+@all")),
]


@pytest.mark.parametrize("raw,command,args", REDACT_CASES)
def test_secrets_are_redacted(raw, command, args):
    (ev,) = events((C, raw, 1), (S, b"+OK\r\n", 2))
    assert (ev.command, ev.args, ev.key if command != "MIGRATE" else "") == (command, args, "")
    assert "s3cret" not in repr(ev) and "abab" not in repr(ev)


def test_redaction_can_be_turned_off_for_lab_use():
    (ev,) = events((C, cmd("AUTH", "bob", "s3cret"), 1), parser=RedisParser(redact=False))
    assert ev.args == ("bob", "s3cret")


def test_values_of_data_commands_are_never_kept():
    (ev,) = events((C, cmd("SET", "k", "private-value", "EX", "10"), 1), (S, b"+OK\r\n", 2))
    assert ev.args == () and "private-value" not in repr(ev)


def test_summary_user_and_first_command():
    p = RedisParser()
    events((C, cmd("HELLO", "3", "AUTH", "bob", "pw") + cmd("SELECT", "1") + cmd("GET", "k"), 1),
           (S, b"%1\r\n+proto\r\n:3\r\n+OK\r\n_\r\n", 2), parser=p)
    assert p.summary() == {"redis_command": "GET", "redis_user": "bob", "redis_resp": "3"}


# -- bulk bodies: skip, gap, bounds -----------------------------------------------------------------

def test_big_bulk_values_are_skipped_after_their_kept_prefix():
    big = 10 * 1024 * 1024
    p = RedisParser()
    head = b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$%d\r\n" % big
    p.receive_data(C, head + b"x" * 1000, 1)
    # The value's first 256 bytes were kept (an argument prefix), the rest is skippable.
    assert p.skip_hint(C) == big - 1000
    p.receive_skip(C, big - 1000, 2)
    p.receive_data(C, b"\r\n" + cmd("GET", "big"), 3)
    p.receive_data(S, b"+OK\r\n$%d\r\n" % big + b"y" * 10, 4)
    assert p.skip_hint(S) == big - 10      # a reply value is never kept
    p.receive_gap(S, 5000, 5)              # lost bytes inside the body cost nothing either
    p.receive_skip(S, p.skip_hint(S), 6)
    p.receive_data(S, b"\r\n", 7)
    got = [p.next_event().detail, p.next_event().detail]
    assert [(e.command, e.key, e.request_bytes, e.reply_len, e.reply_bytes) for e in got] == [
        ("SET", "big", len(head) + big + 2, 0, 5),
        ("GET", "big", 22, big, len(b"$%d\r\n" % big) + big + 2)]
    assert p.state is ParserState.OK


def _drain(p):
    out = []
    while (ev := p.next_event()) is not NEED_DATA:
        out.append(ev.detail)
    return out


@pytest.mark.parametrize("tail", [0, 1, 2])
def test_a_loss_that_ends_in_the_crlf_after_a_body_keeps_the_framing(tail):
    # Live, the skip of a 10 MiB reply reaches the kernel after its last packet went by
    # with the allowance spent: the body is a Skip and its closing CRLF a 2-byte Gap
    # (tests/kernel/test_redis_lag.py). Those two bytes are fixed, so nothing is lost.
    big = 10 * 1024 * 1024
    p = RedisParser()
    p.receive_data(C, cmd("GET", "big"), 1)
    p.receive_data(S, b"$%d\r\n" % big + b"V" * 1000, 2)
    p.receive_skip(S, p.skip_hint(S), 3)
    if tail:
        p.receive_gap(S, tail, 4)
    if tail < 2:
        p.receive_data(S, b"\r\n"[tail:], 5)
    p.receive_data(C, cmd("GET", "k2"), 6)
    p.receive_data(S, b"$2\r\nv2\r\n", 7)
    got = _drain(p)
    assert [(e.command, e.key, e.reply_type, e.reply_len) for e in got] == [
        ("GET", "big", "bulk", big), ("GET", "k2", "bulk", 2)]
    assert got[0].reply_bytes == len(b"$%d\r\n" % big) + big + 2
    assert (p.state, p.resyncs) == (ParserState.OK, 0)
    # The whole rest of the body and its CRLF in one gap; a request's big argument too;
    # and a gap of the LF alone after the CR arrived.
    p = RedisParser()
    p.receive_data(C, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5000\r\n" + b"x" * 10, 1)
    p.receive_gap(C, 4990 + 2, 2)
    p.receive_data(S, b"+OK\r\n", 3)
    p.receive_data(C, cmd("GET", "k"), 4)
    p.receive_data(S, b"$5000\r\n" + b"x" * 100, 5)
    p.receive_gap(S, 4900 + 2, 6)
    p.receive_data(C, cmd("GET", "k"), 7)
    p.receive_data(S, b"$3\r\nabc\r", 8)
    p.receive_gap(S, 1, 9)
    got = _drain(p)
    assert [(e.command, e.reply_type, e.reply_len) for e in got] == [
        ("SET", "string", 0), ("GET", "bulk", 5000), ("GET", "bulk", 3)]
    assert got[0].request_bytes == len(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5000\r\n") + 5002
    assert (p.state, p.resyncs) == (ParserState.OK, 0)


def test_a_loss_into_a_header_resynchronises_at_the_next_message():
    # Client side: the request being read is dropped; the next segment that starts a
    # request is parsed, and its reply pairs with it.
    p = RedisParser()
    p.receive_data(C, b"*2\r\n$3\r\nGET\r\n", 1)
    p.receive_gap(C, 7, 2)
    p.receive_data(C, b"k1\r\n", 3)             # the rest of the lost request
    p.receive_data(S, b"$1\r\nx\r\n", 4)       # its reply: no request waits for it
    p.receive_data(C, cmd("GET", "k2"), 5)
    p.receive_data(S, b"$2\r\nv2\r\n", 6)
    got = _drain(p)
    assert [(e.command, e.key, e.reply_type, e.reply_len) for e in got] == [
        ("", "", "bulk", 1), ("GET", "k2", "bulk", 2)]
    assert (p.state, p.resyncs, p.unmatched_replies) == (ParserState.OK, 1, 1)
    # Server side: a skip past a body's end, into the next header. The commands waiting
    # are reported without a reply; data that does not start a message is passed over
    # (a body's middle, a reply's tail), and the next reply pairs with the next command.
    p = RedisParser()
    p.receive_data(C, cmd("GET", "a") + cmd("GET", "b"), 1)
    p.receive_data(S, b"$5\r\nab", 2)
    p.receive_skip(S, 10, 3)
    p.receive_data(S, b"VVVVVVVV", 4)
    p.receive_data(S, b"\r\n+O", 5)
    p.receive_gap(S, 100, 6)
    p.receive_data(C, cmd("GET", "c"), 7)
    p.receive_data(S, b":42\r\n", 8)
    got = _drain(p)
    assert [(e.command, e.key, e.reply_type, e.reply) for e in got] == [
        ("GET", "a", "", ""), ("GET", "b", "", ""), ("GET", "c", "integer", "42")]
    assert (p.state, p.resyncs) == (ParserState.OK, 1)
    # Garbage is still an error: only a loss resynchronises.
    p = RedisParser()
    p.receive_data(S, b"$5\r\nab", 1)
    p.receive_skip(S, 10, 2)
    p.receive_data(S, b"+OK\r\n?garbage\r\n", 3)
    assert p.state is ParserState.ERROR and "unknown RESP type" in p.error


def test_binary_command_names_fit_the_event_bounds():
    # Found by random fuzzing: 64 non-UTF-8 bytes show as 256 characters (\xNN each).
    (ev,) = events((C, cmd(b"\xff" * 300, "k"), 1))
    assert ev.command == "\\xff" * R.MAX_COMMAND and ev.truncated


def test_long_key_is_cut_and_marked():
    key = "k" * 1000
    (ev,) = events((C, cmd("GET", key), 1))
    assert ev.key == key[:R.MAX_ARG_KEPT] and ev.truncated


@pytest.mark.parametrize("raw,side,reason", [
    (b"*2\r\n:1\r\n", C, "expected '$'"),
    (b"*2\r\n$-5\r\n", C, "invalid bulk length"),
    (b"*99999999999\r\n", C, "invalid multibulk length"),
    (b"*1\r\n$3\r\nGETxx", C, "CRLF"),
    (b"@what\r\n", S, "unknown RESP type"),
    (b"$3\r\nabcde\r\n", S, "CRLF"),
    (b".\r\n", S, "stream end marker"),
    (b";3\r\nabc\r\n", S, "chunk outside"),
    (b"#x\r\n", S, "bad boolean"),
    (b":12a\r\n", S, "bad integer"),
    (b"+OK\n", S, "CRLF"),
    (b"\r\n", S, "empty reply line"),   # found by the fuzzer: was an IndexError
    (b"*1\r\n" * 40, S, "nested deeper"),
])
def test_malformed_input_is_an_error_with_a_reason(raw, side, reason):
    p, _ = drive([(side, raw, 1)])
    assert p.state is ParserState.ERROR and reason in p.error, p.error


def test_line_length_is_bounded():
    p = RedisParser()
    for _ in range(70):
        p.receive_data(S, b"+" + b"a" * 1023, 1)
        assert len(p._buf[1]) <= R.MAX_LINE + 2
    assert p.state is ParserState.ERROR and "longer than" in p.error


def test_a_line_in_tiny_segments_is_not_rescanned():
    p = RedisParser()
    calls = []
    run = p._run_server
    p._run_server = lambda view, ts: calls.append(len(view)) or run(view, ts)
    for b in b"+" + b"a" * 5000:
        p.receive_data(S, bytes([b]), 1)
    assert calls == [1]   # the buffer is scanned again only when a newline arrives
    p.receive_data(S, b"\r\n", 2)
    assert calls == [1, 5003] and p.state is ParserState.OK


def test_attributes_do_not_grow_the_reply_head():
    p = RedisParser()
    p.receive_data(S, b"*2\r\n" + b"|0\r\n" * 1000, 1)
    assert len(p._msg.head) <= 3 and p.state is ParserState.OK
    p.receive_data(S, b"$7\r\nmessage\r\n:1\r\n", 2)
    (ev,) = events(parser=p)
    assert (ev.reply_type, ev.reply_len) == ("array", 2)


def test_datagram_is_an_error():
    p = RedisParser()
    p.receive_datagram(C, cmd("PING"), 1)
    assert p.state is ParserState.ERROR


def test_event_validation():
    with pytest.raises(ValueError):
        RedisEvent(reply_type="nonsense")
    with pytest.raises(ValueError):
        RedisEvent(argc=-1)
    with pytest.raises(ValueError):
        RedisEvent(resp=4)


# -- detection --------------------------------------------------------------------------------------

def test_signature_accepts_resp_and_refuses_other_protocols():
    yes = [(cmd("PING"), C), (cmd("SET", "a", "b"), C), (b"PING\r\n", C), (b"AUTH pw\r\n", C),
           (b"+PONG\r\n", S), (b"-NOAUTH Authentication required.\r\n", S), (b":1\r\n", S),
           (b"$3\r\nbar\r\n", S), (b"*-1\r\n", S), (b"%7\r\n$6\r\nserver\r\n", S), (b"_\r\n", S)]
    no = [(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", C), (b"HTTP/1.1 200 OK\r\n", S),
          (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", C), (b"\x00\x1d\xab\xcd\x01\x00", C),
          (b"\x00\x1d\xab\xcd\x81\x80", S), (b"SSH-2.0-OpenSSH_9.2\r\n", C),
          (b"*\r\n", C), (b"*3\r\n:1\r\n", C), (b"+\x00\x01\r\n", S), (b"-ERR", S),
          (b"PING", C), (b"INFO HTTP/1.0\r\n", C)]
    assert all(looks_like(f, d) for f, d in yes)
    assert not any(looks_like(f, d) for f, d in no)
    rnd = random.Random(7)
    hits = sum(looks_like(bytes(rnd.getrandbits(8) for _ in range(32)), d)
               for _ in range(5000) for d in (C, S))
    assert hits == 0
    assert R.SIGNATURE is looks_like and R.APP_PROTO == "redis" and 6379 in R.PORTS
    assert set(RedisParser().summary()) <= set(R.SUMMARY_FIELDS)


# -- golden capture: real peers ----------------------------------------------------------------------

def _golden():
    expect = json.loads((GOLDEN / "redis-session.expect.json").read_text())
    flows = [f for f in pcaputil.flows(GOLDEN / "redis-session.pcap.gz")
             if f.proto == 6 and f.dport == expect["port"]]
    return expect, flows


def _fields(ev: RedisEvent) -> dict:
    return {"command": ev.command, "key": ev.key, "argc": ev.argc, "reply_type": ev.reply_type,
            "reply": ev.reply, "error": ev.error}


def _feed_steps(flow, split=None):
    steps = []
    for c in flow.chunks:
        if split is None or split >= len(c.data):
            steps.append((c.direction, c.data, c.ts_ns))
        else:
            steps += [(c.direction, c.data[:split], c.ts_ns), (c.direction, c.data[split:], c.ts_ns)]
    last = flow.chunks[-1].ts_ns
    return steps + [(C, None, last), (S, None, last)]


def test_golden_capture_matches_what_the_clients_saw():
    expect, flows = _golden()
    assert len(flows) == len(expect["connections"]) == 21
    pushes = 0
    for flow, conn in zip(flows, expect["connections"]):
        p, out = drive(_feed_steps(flow))
        assert p.state is ParserState.DONE, p.error
        got = [_fields(e) for _, e in out if not e.push]
        pushes += sum(e.push for _, e in out)
        assert len(got) == len(conn), (flow.sport, got, conn)
        for g, x in zip(got, conn):
            # redis-py drops the "ERR " code from the messages of plain ERR errors (its
            # ResponseError carries the rest); every other code stays in its text.
            if g["error"].startswith("ERR ") and x["error"] == g["error"][4:]:
                x = {**x, "error": g["error"]}
            assert g == x, flow.sport
        assert all(e.latency_ns > 0 for _, e in out if e.replies and not e.push)
        for _, e in out:
            assert not any(s in repr(e) for s in __import__(
                "tests.fixtures.gen_redis", fromlist=["SECRETS"]).SECRETS)
    assert pushes == expect["pushes"] == 3


def test_golden_fed_byte_by_byte_split_everywhere_and_with_junk():
    _, flows = _golden()
    for flow in flows:
        whole = drive(_feed_steps(flow))[1]
        assert drive(bytewise(_feed_steps(flow)))[1] == whole
        # Trailing junk after the conversation: what was parsed stays the same.
        steps = _feed_steps(flow)[:-2] + [(S, b"\x00\xff\x16\x03junk\r\n", 1)]
        p, out = drive(steps + [(C, b"\x16\x03\x01\x00", 2), (C, None, 3), (S, None, 3)])
        assert out == whole and p.state is ParserState.ERROR
    # Split at every offset: the pipelined flow (every chunk cut in two at each offset).
    small = next(f for f in flows if len(f.chunks) > 4 and sum(len(c.data) for c in f.chunks) < 3000)
    whole = drive(_feed_steps(small))[1]
    for k in range(1, max(len(c.data) for c in small.chunks)):
        assert drive(_feed_steps(small, split=k))[1] == whole, k


# -- the shared corpus, with tshark and Zeek as oracles ----------------------------------------------

_TSHARK = ("tcp.srcport", "tcp.dstport", "resp.array.length", "resp.bulk_string.value",
           "resp.string", "resp.error", "resp.integer", "resp.bulk_string.length")
CORPUS_FILES = ("ndpi/redis-resp/resp.pcap", "zeek/redis-pipelined/pipelining-example.pcap",
                "tcpdump/resp/resp_1_benchmark.pcap", "tcpdump/resp/resp_3_malicious.pcap")


def _tshark(path: Path) -> dict:
    """Per client port: the commands (first bulk string, array length) of each request array
    and the error strings, as tshark's RESP dissector decodes them."""
    args = ["tshark", "-r", str(path), "-Y", "resp", "-T", "fields", "-E", "occurrence=a",
            "-E", "aggregator=\x1f"]
    for f in _TSHARK:
        args += ["-e", f]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=60).stdout
    by: dict = defaultdict(lambda: {"cmds": [], "second": [], "errors": [], "strings": [],
                                    "ints": []})
    for line in out.splitlines():
        row = {k: (v.split("\x1f") if v else []) for k, v in zip(_TSHARK, line.split("\t"))}
        sport, dport = int(row["tcp.srcport"][0]), int(row["tcp.dstport"][0])
        if dport == 6379:
            values = [bytes.fromhex(v) for v in row["resp.bulk_string.value"]]
            i = 0
            for n in map(int, row["resp.array.length"]):
                if n > 0:
                    name = values[i].upper().decode() if i < len(values) else None
                    by[sport]["cmds"].append((name, n))
                    by[sport]["second"].append(values[i + 1] if n > 1 and i + 1 < len(values)
                                               else None)
                    i += n
        else:
            o = by[dport]
            o["errors"] += row["resp.error"]
            o["strings"] += row["resp.string"]
            o["ints"] += row["resp.integer"]
    return by


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
@pytest.mark.parametrize("rel", CORPUS_FILES)
def test_corpus_against_tshark(rel):
    path = CORPUS / rel
    oracle = _tshark(path)
    flows = [f for f in pcaputil.flows(path) if f.proto == 6 and 6379 in (f.sport, f.dport)]
    assert flows
    compared = 0
    for flow in flows:
        p = RedisParser()
        got = [e.detail for e in pcaputil.feed(p, flow)]
        o = oracle[flow.sport]
        if rel.endswith("malicious.pcap") and flow.sport == 52767:
            # `*100000000000000000000000`: tshark reads a length of 2**63-1 and then the
            # server's "invalid multibulk length" error. redis-server refuses the request
            # and closes; the parser refuses it too (ERROR), so there is no event to compare.
            assert p.state is ParserState.ERROR and "multibulk length" in p.error
            assert o["errors"] == ["ERR Protocol error: invalid multibulk length"]
            continue
        assert p.state is ParserState.DONE, (flow.sport, p.error)
        # Commands sent as RESP arrays: tshark does not decode inline commands at all (the
        # pipelined case and some malicious ones, where `$0` or `:0` alone on a line is an
        # inline command to redis-server, which answers "unknown command '$0'", while
        # tshark shows a bulk string or integer): those are compared with Zeek and the
        # server's own error text below.
        arrays = [e for e in got if e.command and not e.inline]
        assert [(e.command.split(" ")[0], e.argc) for e in arrays] == o["cmds"], flow.sport
        # The key, where the command has one at the first argument: tshark's second string.
        for e, second in zip(arrays, o["second"]):
            if e.key:
                assert e.key.encode() == second
        assert [e.error for e in got if e.error] == o["errors"], flow.sport
        if all(e.reply_type in ("string", "integer", "error", "") for e in got):
            # Flat replies only: tshark's lists then hold top-level values alone.
            assert [e.reply for e in got if e.reply_type == "string"] == o["strings"]
            assert [e.reply for e in got if e.reply_type == "integer"] == o["ints"]
        compared += len(got)
    assert compared > 0


_TCPDUMP_LINE = re.compile(r"IP 127\.0\.0\.1\.(\d+) > 127\.0\.0\.1\.(\d+): .*length \d+: RESP (.*)$")


def test_benchmark_capture_against_tcpdump_output():
    """tcpdump -v's RESP printer (resp_1.out) lists each request's strings, inline PING
    included, and each flat reply's value: command and key, and status and integer replies,
    must equal the parser's. (Its LRANGE replies, many "xxx", are bulk values we never keep.)"""
    base = CORPUS / "tcpdump/resp"
    sent, answered = defaultdict(list), defaultdict(list)
    for line in (base / "resp_1.out").read_text().splitlines():
        m = _TCPDUMP_LINE.search(line)
        if not m:
            continue
        words = re.findall(r'"((?:[^"\\]|\\.)*)"', m.group(3))
        if m.group(2) == "6379":
            sent[int(m.group(1))].append(words)
        else:
            answered[int(m.group(2))].append(words)
    flows = [f for f in pcaputil.flows(base / "resp_1_benchmark.pcap") if f.proto == 6]
    assert len(flows) == len(sent) == 15
    for flow in flows:
        got = [t.detail for t in pcaputil.feed(RedisParser(), flow)]
        assert [(e.command, e.key) for e in got] == [
            (w[0].upper(), w[1] if len(w) > 1 and w[0] not in ("PING",) else "")
            for w in sent[flow.sport]]
        for e, words in zip(got, answered[flow.sport]):
            if e.reply_type in ("string", "integer"):
                assert [e.reply] == words


def test_malicious_inline_commands_match_the_servers_answers():
    """The server's error names the inline command it saw: `unknown command '<name>'` must
    name the command the parser reports (Redis lower-cases nothing here)."""
    path = CORPUS / "tcpdump/resp/resp_3_malicious.pcap"
    seen = 0
    for flow in pcaputil.flows(path):
        p = RedisParser()
        for e in (t.detail for t in pcaputil.feed(p, flow)):
            if e.error.startswith("ERR unknown command '"):
                name = e.error.split("'")[1].upper()
                assert e.inline and e.command == name[:R.MAX_COMMAND]
                assert e.truncated == (len(name) > R.MAX_COMMAND)
                seen += 1
    assert seen >= 6


def test_zeek_pipelined_inline_pings():
    """Zeek's redis.log for the inline pipelining example: three PING, each answered PONG."""
    base = CORPUS / "zeek/redis-pipelined"
    rows = [line.split("\t") for line in (base / "redis.log").read_text().splitlines()
            if not line.startswith("#")]
    zeek = [(r[6], r[10]) for r in rows]   # cmd.name, reply.value
    (flow,) = pcaputil.flows(base / "pipelining-example.pcap")
    got = [t.detail for t in pcaputil.feed(RedisParser(), flow)]
    assert [(e.command, e.reply) for e in got] == zeek == [("PING", "PONG")] * 3
    assert all(e.inline for e in got)


def test_ndpi_flow_is_one_command_with_a_large_array():
    # nDPI's case: redis-cli's COMMAND DOCS-style introspection (one request, a 90 KB
    # nested reply over many segments); ndpiReader only names the protocol (RESP).
    assert "[proto: 182/RESP]" in (CORPUS / "ndpi/redis-resp/resp.pcap.out").read_text()
    (flow,) = [f for f in pcaputil.flows(CORPUS / "ndpi/redis-resp/resp.pcap") if f.proto == 6]
    got = [t.detail for t in pcaputil.feed(RedisParser(), flow)]
    assert got[0].command == "COMMAND" and got[0].reply_type == "array"
    assert got[0].reply_len > 100 and got[0].reply_bytes > 50_000


# -- live: real server and clients --------------------------------------------------------------------

needs_live = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("redis-server", "redis-cli", "tcpdump")),
    reason="needs root, redis-server, redis-cli and tcpdump")


@needs_live
def test_live_redis_py_and_redis_cli(tmp_path):
    from tests.fixtures import gen_redis as G

    pcap = tmp_path / "live.pcap"
    with G.RedisServer() as server:
        with pcaputil.capture_lo(pcap, server.port):
            expected = G.run_pipeline(server, n=100, bad_every=33, big=0) \
                + G.run_cli(server, G.CLI_COMMANDS[:2] + G.CLI_COMMANDS[6:9])
    flows = [f for f in pcaputil.flows(pcap) if f.proto == 6 and f.dport == server.port]
    assert len(flows) == len(expected)
    bad = 0
    for flow, conn in zip(flows, expected):
        p = RedisParser()
        got = [_fields(t.detail) for t in pcaputil.feed(p, flow)]
        assert p.state is ParserState.DONE
        assert len(got) == len(conn)
        for g, x in zip(got, conn):
            if g["error"].startswith("ERR ") and x["error"] == g["error"][4:]:
                x = {**x, "error": g["error"]}   # redis-py drops the "ERR " code
            assert g == x
            bad += g["command"] == "HGET"
    assert bad == 3   # the three planted bad commands, each with its error text
    assert len(expected[0]) >= 100


class _Relay:
    """A TCP relay on loopback recording each direction's bytes: the real client and server
    talk through it, and the test gets their exact streams without a capture's drops."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[list[tuple[Direction, bytes, int]]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            client, _ = self.sock.accept()
        except OSError:
            return
        server = socket.create_connection(("127.0.0.1", self.target))
        record: list = []
        self.conns.append(record)
        sel = selectors.DefaultSelector()
        sel.register(client, selectors.EVENT_READ, (client, server, C))
        sel.register(server, selectors.EVENT_READ, (server, client, S))
        open_ = 2
        while open_:
            for key, _ in sel.select(timeout=10):
                src, dst, d = key.data
                blob = src.recv(1 << 20)
                if not blob:
                    sel.unregister(src)
                    open_ -= 1
                    record.append((d, None, time.monotonic_ns()))
                    dst.shutdown(socket.SHUT_WR)
                    continue
                record.append((d, blob, time.monotonic_ns()))
                dst.sendall(blob)
        client.close()
        server.close()

    def close(self) -> None:
        self.thread.join(timeout=20)
        self.sock.close()


CHUNK = 2048  # LOUPE_PAYLOAD_CHUNK: the kernel copies payload in events of this size


def budget_feed(record) -> tuple[list[RedisEvent], int]:
    """Feed a recorded conversation the way the hybrid contract works: before each chunk
    the kernel would copy, the parser's skip_hint is honoured (those bytes arrive as
    receive_skip and are not copied). Returns the events and the bytes copied."""
    p = RedisParser()
    copied = 0
    out = []
    for d, blob, ts in record:
        if blob is None:
            p.receive_eof(d, ts)
            continue
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
        while (ev := p.next_event()) is not NEED_DATA:
            out.append(ev.detail)
    while (ev := p.next_event()) is not NEED_DATA:
        out.append(ev.detail)
    assert p.state is ParserState.DONE, p.error
    return out, copied


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_budget_get_and_set_of_10_bytes_and_10_mib_copy_the_same():
    from tests.fixtures import gen_redis as G

    results = {}
    with G.RedisServer() as server:
        for size in (10, 10 * 1024 * 1024):
            relay = _Relay(server.port)
            import redis

            r = redis.Redis(host="127.0.0.1", port=relay.port, username="default",
                            password=server.password)
            value = os.urandom(size)
            assert r.set("v", value) is True
            assert r.get("v") == value
            r.close()
            relay.close()
            (record,) = relay.conns
            results[size] = budget_feed(record)
    for size, (got, copied) in results.items():
        # Every request is still parsed, and the reply size is noted.
        tail = [(e.command, e.key, e.argc, e.reply_type, e.reply_len) for e in got][-2:]
        assert tail == [("SET", "v", 3, "string", 0), ("GET", "v", 2, "bulk", size)]
        assert got[-1].reply_bytes == len(b"$%d\r\n" % size) + size + 2
        assert got[-2].request_bytes > size
    small, big = results[10][1], results[10 * 1024 * 1024][1]
    # Each 10 MiB body costs at most the chunk its header came in (the kernel cannot skip
    # before userspace has seen the length) and the kept 256-byte argument prefix.
    assert big - small <= 2 * CHUNK, (small, big)


# -- fuzzing -------------------------------------------------------------------------------------------

def fuzz_one(data: bytes) -> None:
    """One fuzz execution (the fuzz command drives this 10**6 times): the input is cut into
    pieces by its own bytes and fed to both directions, with skips, gaps and EOFs; nothing
    may escape, buffers stay bounded, and every event is a valid RedisEvent."""
    p = RedisParser(max_pending=8)
    pos = 0
    n = len(data)
    while pos < n:
        ctl = data[pos]
        size = (ctl >> 3) + 1
        piece = data[pos + 1:pos + 1 + size]
        pos += 1 + size
        d = C if ctl & 1 else S
        op = (ctl >> 1) & 3
        if op == 3 and ctl & 0x80:
            p.receive_eof(d, pos)
        elif op == 3:
            hint = p.skip_hint(d)
            if ctl & 0x40:
                p.receive_gap(d, hint or size, pos)
            else:
                p.receive_skip(d, hint or size, pos)
        else:
            p.receive_data(d, piece, pos)
        assert len(p._buf[0]) <= R.MAX_LINE + 2 and len(p._buf[1]) <= R.MAX_LINE + 2
        assert len(p._txns) <= 9 and len(p._stack) <= R.MAX_DEPTH
        while (ev := p.next_event()) is not NEED_DATA:
            assert isinstance(ev.detail, RedisEvent)
        assert (p.state is ParserState.ERROR) == bool(p.error)
    p.receive_eof(C, n)
    p.receive_eof(S, n)
    while (ev := p.next_event()) is not NEED_DATA:
        assert isinstance(ev.detail, RedisEvent)


_TOKENS = st.sampled_from([
    b"*2\r\n", b"*1\r\n", b"*?\r\n", b"*-1\r\n", b"$3\r\n", b"$-1\r\n", b"$?\r\n", b"$0\r\n\r\n",
    b"GET\r\n", b"SUBSCRIBE\r\n", b"subscribe\r\n", b"message\r\n", b"abc\r\n", b"+OK\r\n",
    b"-ERR x\r\n", b":1\r\n", b":0\r\n", b">3\r\n", b"|1\r\n", b"%1\r\n", b"~2\r\n", b"_\r\n",
    b",1.5\r\n", b"#t\r\n", b"(12\r\n", b"!3\r\nERR\r\n", b"=7\r\ntxt:abc\r\n", b";2\r\nab\r\n",
    b";0\r\n", b".\r\n", b"PING\r\n", b'"q x"\r\n', b"\r\n", b"\n", b"*3\r\n$5\r\nHELLO\r\n",
])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=24), st.lists(_TOKENS, max_size=12).map(b"".join)),
                max_size=12).map(lambda parts: b"".join(
                    bytes([((len(x) - 1) << 3 | i & 7) & 0xFF if x else 0]) + x[:32]
                    for i, x in enumerate(parts))))
def test_fuzz_no_exception_and_bounded(blob):
    fuzz_one(blob)


@settings(max_examples=150, deadline=None)
@given(st.lists(_TOKENS, max_size=25).map(b"".join), st.lists(_TOKENS, max_size=25).map(b"".join),
       st.integers(1, 9))
def test_fuzz_split_points_do_not_change_results(req, resp, step):
    steps = [(C, req, 1), (S, resp, 2), (C, None, 3), (S, None, 3)]
    whole = drive(steps)
    pieces = [(d, blob[i:i + step], ts) for d, blob, ts in steps[:2]
              for i in range(0, len(blob), step)]
    split = drive(pieces + steps[2:])
    assert split[1] == whole[1] and split[0].state == whole[0].state


def test_leaving_subscribe_mode_and_unsubscribing_unknown_channels():
    unsub = b"*3\r\n$11\r\nunsubscribe\r\n$1\r\n%s\r\n:0\r\n"
    got = events((C, cmd("SUBSCRIBE", "a"), 1), (S, b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n", 2),
                 (C, cmd("UNSUBSCRIBE", "a", "b") + cmd("LRANGE", "l", "0", "-1"), 3),
                 (S, unsub % b"a" + unsub % b"b"
                  + b"*3\r\n$7\r\nmessage\r\n$1\r\nx\r\n$1\r\ny\r\n", 4))
    # Out of subscribe mode, an array that starts with "message" is LRANGE's reply.
    assert [(e.command, e.replies, e.push) for e in got] == [
        ("SUBSCRIBE", 1, False), ("UNSUBSCRIBE", 2, False), ("LRANGE", 1, False)]
