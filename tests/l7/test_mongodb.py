"""MongoDB parser (sensor/l7/mongodb.py): requests encoded by pymongo's own code (OP_MSG,
OP_COMPRESSED with pymongo's zlib and zstd contexts) and replies from bson.encode; the golden
capture (tests/fixtures/gen_mongodb.py) against what its generator sent and against tshark's
MongoDB dissector; the shared corpus (nDPI, Arkime) against tshark; the skip budget with a
10 MiB batch; bounded decompression; redaction; malformed input; `loupe replay` and a real
collector process end to end. No MongoDB server exists in Debian or PyPI, so no live test.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import bson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymongo.compression_support import ZlibContext, ZstdContext

from sensor import model
from sensor.export import jsonfmt
from sensor.l7 import mongodb as M
from sensor.l7.base import NEED_DATA, Direction, ParserState
from sensor.l7.detect import PROTO_TCP, detect
from sensor.l7.mongodb import MongodbEvent, MongodbParser, looks_like
from tests.fixtures import gen_mongodb as G
from tests.l7 import harness, pcaputil

C, S = Direction.TO_SERVER, Direction.TO_CLIENT
HERE = Path(__file__).resolve().parent
GOLDEN = HERE.parent / "golden" / "mongodb-parser"
CAPTURE = GOLDEN / "session.pcap.gz"
CORPUS = HERE.parent.parent.parent / "shared" / "corpus"
CORPUS_CASES = ("ndpi/mongodb-vlan/mongodb.pcap", "arkime/mongo/mongo.pcap")
REPO = HERE.parent.parent
LOUPE = [sys.executable, "-m", "sensor.cli"]


def msg(cmd: dict, db: str = "shop", *, flags: int = 0, ctx=None) -> tuple[int, bytes]:
    return G.op_msg(cmd, db, flags=flags, ctx=ctx)


def reply(rid: int, doc: dict, **kw) -> bytes:
    return G.reply_msg(rid, doc, **kw)[1]


def drive(steps, parser=None, close=True):
    """steps: (direction, bytes, ts). Returns (parser, [(ts_ns, event)])."""
    p = parser or MongodbParser()
    out = []
    for d, blob, ts in steps:
        p.receive_data(d, blob, ts)
        while (ev := p.next_event()) is not NEED_DATA:
            out.append((ev.ts_ns, ev.detail))
    if close:
        for d in (C, S):
            p.receive_eof(d, 10**9)
        while (ev := p.next_event()) is not NEED_DATA:
            out.append((ev.ts_ns, ev.detail))
    return p, out


def events(*steps, **kw) -> list[MongodbEvent]:
    return [e for _, e in drive(list(steps), **kw)[1]]


def bytewise(steps):
    return [(d, blob[i:i + 1], ts) for d, blob, ts in steps for i in range(len(blob))]


def cursor(batch, ns="shop.users", key="firstBatch", cid=0) -> dict:
    return {"cursor": {key: batch, "id": bson.Int64(cid), "ns": ns}, "ok": 1.0}


# -- crafted cases (pymongo's encoders) -------------------------------------------------------

def test_find_paired_with_its_reply_names_only_and_latency():
    rid, req = msg({"find": "users", "filter": {"email": "alice@example.com"}, "limit": 1})
    steps = [(C, req, 1000), (S, reply(rid, cursor([{"email": "alice@example.com"}])), 4000)]
    for variant in (steps, bytewise(steps)):
        p, out = drive(variant)
        assert [(ts, e.opcode, e.command, e.database, e.collection, e.status, e.returned,
                 e.latency_ns, e.request_id) for ts, e in out] == [
            (1000, "OP_MSG", "find", "shop", "users", "ok", 1, 3000, rid & 0xFFFFFFFF)]
        assert out[0][1].request_bytes == len(req) and out[0][1].reply_bytes > 0
        assert "alice" not in repr(out[0][1])
        assert p.state is ParserState.DONE


def test_document_sequences_are_counted_and_their_values_never_kept():
    docs = [{"_id": i, "ssn": f"123-45-{i:04d}"} for i in range(5)]
    rid, req = msg({"insert": "people", "documents": docs})
    assert req.count(b"documents\x00") == 1   # pymongo moved them to a kind 1 section
    (e,) = events((C, req, 1), (S, reply(rid, {"n": 5, "ok": 1.0}), 2))
    assert (e.command, e.collection, e.documents, e.sequences, e.affected) == (
        "insert", "people", 5, 1, 5)
    assert "123-45" not in repr(e)


def test_inline_write_arrays_are_counted_like_sequences():
    body = struct.pack("<IB", 0, 0) + bson.encode(
        {"update": "c", "updates": [{"q": {}, "u": {"$set": {"a": 1}}}] * 3, "$db": "d"})
    req = G._header(16 + len(body), 5, 0, 2013) + body
    (e,) = events((C, req, 1), (S, reply(5, {"n": 3, "ok": 1.0}), 2))
    assert (e.command, e.database, e.collection, e.documents, e.sequences) == (
        "update", "d", "c", 3, 0)


def test_more_to_come_request_is_reported_without_waiting():
    _, req = msg({"delete": "logs", "deletes": [{"q": {}, "limit": 0}],
                  "writeConcern": {"w": 0}}, flags=2)
    p, out = drive([(C, req, 7)], close=False)
    assert [(e.command, e.more_to_come, e.status, e.replies) for _, e in out] == [
        ("delete", True, "", 0)]
    assert p.state is ParserState.OK and not p._pending


def test_errors_and_write_errors_are_data():
    r1, q1 = msg({"drop": "nope"})
    r2, q2 = msg({"insert": "u", "documents": [{"_id": 1}]})
    r3, q3 = msg({"insert": "u", "documents": [{"_id": 2}],
                  "writeConcern": {"w": "majority"}})
    got = events(
        (C, q1 + q2 + q3, 1),
        (S, reply(r1, {"ok": 0.0, "errmsg": "ns not found", "code": 26,
                       "codeName": "NamespaceNotFound"}), 2),
        (S, reply(r2, {"n": 0, "writeErrors": [
            {"index": 0, "code": 11000, "errmsg": "E11000 dup key: { _id: 1 }"},
            {"index": 1, "code": 11000, "errmsg": "E11000 dup key: { _id: 1 }"}], "ok": 1.0}), 3),
        (S, reply(r3, {"n": 1, "writeConcernError": {"code": 64, "codeName":
                       "WriteConcernFailed", "errmsg": "waiting for replication timed out"},
                       "ok": 1.0}), 4))
    assert [(e.status, e.code, e.code_name, e.errmsg, e.write_errors) for e in got] == [
        ("error", 26, "NamespaceNotFound", "ns not found", 0),
        ("ok", 11000, "", "E11000 dup key: { REDACTED }", 2),
        ("ok", 64, "WriteConcernFailed", "waiting for replication timed out", 0)]


def test_redaction_of_documents_in_error_messages_can_be_turned_off():
    rid, req = msg({"insert": "u", "documents": [{"email": "x@y"}]})
    text = 'E11000 duplicate key error index: email_1 dup key: { email: "x@y" }'
    rep = reply(rid, {"ok": 0.0, "errmsg": text, "code": 11000})
    assert events((C, req, 1), (S, rep, 2))[0].errmsg.endswith("dup key: { REDACTED }")
    assert events((C, req, 1), (S, rep, 2), parser=MongodbParser(redact=False))[0].errmsg == text


def test_sasl_payloads_are_never_kept():
    first, server_first, final, verifier = G._scram("loupe", G.PASSWORD)
    r1, q1 = msg({"saslStart": 1, "mechanism": "SCRAM-SHA-256",
                  "payload": bson.Binary(first)}, "admin")
    r2, q2 = msg({"saslContinue": 1, "conversationId": 1, "payload": bson.Binary(final)},
                 "admin")
    got = events((C, q1, 1), (S, reply(r1, {"conversationId": 1, "done": False,
                                            "payload": bson.Binary(server_first), "ok": 1.0}), 2),
                 (C, q2, 3), (S, reply(r2, {"conversationId": 1, "done": True,
                                            "payload": bson.Binary(verifier), "ok": 1.0}), 4))
    assert [(e.command, e.database, e.collection) for e in got] == [
        ("saslStart", "admin", ""), ("saslContinue", "admin", "")]
    text = repr(got)
    for secret in (b"r=fyko", final.split(b"p=")[1][:12], verifier[2:14], b"SCRAM"):
        assert secret.decode() not in text


def test_exhaust_stream_gives_one_event_per_reply():
    rid, req = msg({"getMore": bson.Int64(9), "collection": "ticks"}, "m", flags=1 << 16)
    r1, a = G.reply_msg(rid, cursor([{"i": 1}], "m.ticks", "nextBatch", 9), flags=2)
    r2, b = G.reply_msg(r1, cursor([{"i": 2}, {"i": 3}], "m.ticks", "nextBatch", 9), flags=2)
    _, c = G.reply_msg(r2, cursor([], "m.ticks", "nextBatch", 0))
    p, out = drive([(C, req, 10), (S, a, 20), (S, b, 30), (S, c, 40)])
    assert [(ts, e.command, e.collection, e.exhaust, e.returned, e.latency_ns, e.request_bytes)
            for ts, e in out] == [
        (10, "getMore", "ticks", True, 1, 10, len(req)), (30, "getMore", "ticks", True, 2, 0, 0),
        (40, "getMore", "ticks", True, 0, 0, 0)]
    assert p.unmatched_replies == 0


@pytest.mark.parametrize("ctx, name", [(ZlibContext(6), "zlib"), (ZstdContext(), "zstd"),
                                       (G.NoopContext(), "noop")])
def test_compressed_requests_and_replies(ctx, name):
    rid, req = msg({"aggregate": "orders", "pipeline": [{"$match": {"card": "4111"}}],
                    "cursor": {}}, ctx=ctx)
    assert struct.unpack_from("<i", req, 12)[0] == 2012 and req[24] == ctx.compressor_id
    rep = reply(rid, cursor([{"card": "4111"}] * 4, "shop.orders"), ctx=ctx)
    for variant in ([(C, req, 1), (S, rep, 2)], bytewise([(C, req, 1), (S, rep, 2)])):
        (e,) = events(*variant)
        assert (e.opcode, e.command, e.collection, e.compressor, e.reply_compressor, e.status,
                e.returned, e.truncated) == (
            "OP_MSG", "aggregate", "orders", name, name, "ok", 4, False)
        assert "4111" not in repr(e)


def test_snappy_is_noted_not_decoded():
    rid, req = msg({"find": "users"}, ctx=G.SnappyLiterals())
    (e,) = events((C, req, 1), (S, reply(rid, cursor([])), 2))
    assert (e.opcode, e.compressor, e.command, e.status) == ("OP_MSG", "snappy", "", "ok")


def _bomb(size: int) -> bytes:
    """An OP_COMPRESSED insert whose one document holds `size` zero bytes: a few KB of zlib
    that claims (and holds) `size` bytes once decompressed."""
    doc = bson.encode({"b": bson.Binary(b"\x00" * size)})
    body = struct.pack("<IB", 0, 0) + bson.encode({"insert": "blobs", "$db": "files"}) \
        + b"\x01" + struct.pack("<i", 4 + 10 + len(doc)) + b"documents\x00" + doc
    data = zlib.compress(body, 9)
    head = struct.pack("<iiiiiiB", 25 + len(data), 3, 0, 2012, 2013, len(body), 2)
    return head + data


def test_decompression_output_is_bounded():
    big = _bomb(40 << 20)                     # 40 MiB of zeros in about 40 KB of zlib
    assert len(big) < M.MAX_COMPRESSED_IN
    p = MongodbParser()
    p.receive_data(C, big, 1)
    p.receive_eof(C, 2)
    p.receive_eof(S, 2)
    assert p.state is ParserState.DONE, p.error
    (e,) = [t.detail for t in iter(p.next_event, NEED_DATA)]
    # The command and names come from the bounded prefix; the sequence runs past it.
    assert (e.command, e.database, e.collection, e.sequences, e.truncated) == (
        "insert", "files", "blobs", 1, True)
    small = _bomb(1000)
    (e,) = events((C, small, 1))
    assert (e.documents, e.truncated) == (1, False)


def test_compressed_message_larger_than_the_input_bound_is_cut_not_buffered():
    rng = __import__("random").Random(3)
    docs = [{"_id": i, "r": rng.randbytes(200)} for i in range(2000)]   # incompressible
    rid, req = msg({"insert": "noise", "documents": docs}, ctx=ZlibContext(1))
    assert len(req) > 4 * M.MAX_COMPRESSED_IN
    p = MongodbParser()
    fed = 0
    for i in range(0, len(req), 1448):
        p.receive_data(C, req[i:i + 1448], 1)
        fed = max(fed, len(p._buf[0]))
    assert fed <= M.MAX_COMPRESSED_IN + 1448
    assert p.skip_hint(C) > 0 or p._cur[0] is None
    p.receive_data(S, reply(rid, {"n": 2000, "ok": 1.0}), 2)
    (e,) = [t.detail for t in iter(p.next_event, NEED_DATA)]
    assert (e.command, e.collection, e.truncated, e.affected, e.status) == (
        "insert", "noise", True, 2000, "ok")
    assert 0 < e.documents < 2000


def _copied(p: MongodbParser, steps, mss: int = 1448) -> int:
    """Feed as the engine does with the kernel honouring skip hints: segments wholly inside a
    skip are not copied (receive_skip). Returns the bytes copied to userspace."""
    copied = 0
    for d, blob, ts in steps:
        pos = 0
        while pos < len(blob):
            hint = p.skip_hint(d)
            if hint:
                n = min(hint, len(blob) - pos)
                p.receive_skip(d, n, ts)
                pos += n
                continue
            seg = blob[pos:pos + mss]
            p.receive_data(d, seg, ts)
            copied += len(seg)
            pos += len(seg)
    return copied


def test_budget_small_and_10_mib_batches_copy_about_the_same():
    results = {}
    for name, pad in (("small", 10), ("big", 10 << 20)):
        rid, req = msg({"find": "blobs", "filter": {}})
        rep = reply(rid, {"cursor": {"firstBatch": [{"_id": 1, "b": bson.Binary(b"z" * pad)}],
                                     "id": bson.Int64(0), "ns": "shop.blobs"},
                          "ok": 0.0, "errmsg": "after the batch", "code": 50})
        p = MongodbParser()
        copied = _copied(p, [(C, req, 1), (S, rep, 2)])
        (e,) = [t.detail for t in iter(p.next_event, NEED_DATA)]
        # ok, errmsg and code come after the batch: the walk went on after the skip.
        assert (e.command, e.returned, e.status, e.code, e.errmsg) == (
            "find", 1, "error", 50, "after the batch")
        results[name] = copied
    assert results["big"] - results["small"] < 3 * 1448, results


def test_gap_inside_a_message_costs_that_message_only():
    r1, q1 = msg({"find": "a", "filter": {"x": "y" * 5000}})
    r2, q2 = msg({"count": "b"})
    # A gap inside the filter's value is what skip_hint offered: nothing is lost.
    p = MongodbParser()
    p.receive_data(C, q1[:100], 1)
    assert p.skip_hint(C) > 3000
    p.receive_gap(C, 3000, 2)
    p.receive_data(C, q1[3100:] + q2, 3)
    p.receive_data(S, reply(r1, {"ok": 1.0}) + reply(r2, {"n": 1, "ok": 1.0}), 4)
    got = [t.detail for t in iter(p.next_event, NEED_DATA)]
    assert [(e.command, e.database, e.collection, e.truncated) for e in got] == [
        ("find", "shop", "a", False), ("count", "shop", "b", False)]
    # One that swallows $db too cuts that message; the next is found by the length.
    p = MongodbParser()
    p.receive_data(C, q1[:100], 1)
    p.receive_gap(C, len(q1) - 105, 2)
    p.receive_data(C, q1[-5:] + q2, 3)
    p.receive_data(S, reply(r1, {"ok": 1.0}) + reply(r2, {"n": 1, "ok": 1.0}), 4)
    got = [t.detail for t in iter(p.next_event, NEED_DATA)]
    assert [(e.command, e.database, e.collection, e.truncated, e.status) for e in got] == [
        ("find", "", "a", True, "ok"), ("count", "shop", "b", False, "ok")]
    assert p.lost_messages == 1 and p.state is ParserState.OK


def test_gap_across_a_message_boundary_is_an_error():
    _, q1 = msg({"count": "a"})
    p = MongodbParser()
    p.receive_data(C, q1[:40], 1)
    p.receive_gap(C, len(q1), 2)
    assert p.state is ParserState.ERROR and "boundary" in p.error
    (e,) = [t.detail for t in iter(p.next_event, NEED_DATA)]
    assert (e.command, e.collection) == ("count", "a")   # what was seen of it is reported


def test_legacy_query_reply_documents_are_user_data_not_status():
    q = G.op_query(5, "shop.users", {"name": "x"})
    rid, r = G.op_reply(5, [{"ok": 0, "errmsg": "mine", "code": 3}], cursor=0)
    (e,) = events((C, q, 1), (S, r, 2))
    assert (e.command, e.database, e.collection, e.status, e.code, e.errmsg, e.returned) == (
        "find", "shop", "users", "ok", 0, "", 1)


def test_legacy_cmd_query_and_failure_flags():
    q1 = G.op_query(1, "admin.$cmd", {"$query": {"listDatabases": 1}, "$readPreference": {}})
    q2 = G.op_query(2, "db.$cmd.sys.inprog", {})
    q3 = G.op_query(3, "db.coll", {})
    p, out = drive([(C, q1 + q2 + q3, 1), (S, G.op_reply(1, [{"ok": 1.0}])[1], 2),
                    (S, G.op_reply(2, [{"inprog": []}])[1], 3),
                    (S, G.op_reply(3, [], flags=1)[1], 4)])   # a reply without documents
    assert p.state is ParserState.DONE, p.error
    got = [e for _, e in out]
    assert [(e.command, e.database, e.collection, e.status, e.code_name) for e in got] == [
        ("listDatabases", "admin", "", "ok", ""), ("sys.inprog", "db", "", "ok", ""),
        ("find", "db", "coll", "error", "CursorNotFound")]


def test_legacy_op_command_and_reply():
    body = b"shop\x00find\x00" + bson.encode({}) + bson.encode({"find": "users", "filter": {}})
    req = G._header(16 + len(body), 11, 0, 2010) + body
    rb = bson.encode({"ok": 0.0, "errmsg": "bad", "code": 2}) + bson.encode({})
    rep = G._header(16 + len(rb), 12, 11, 2011) + rb
    (e,) = events((C, req, 1), (S, rep, 2))
    assert (e.opcode, e.command, e.database, e.collection, e.status, e.code) == (
        "OP_COMMAND", "find", "shop", "users", "error", 2)


def test_explain_getmore_and_namespace_commands_name_their_collection():
    cases = [({"explain": {"find": "users"}, "verbosity": "queryPlanner"}, "explain", "users"),
             ({"getMore": bson.Int64(5), "collection": "logs"}, "getMore", "logs"),
             ({"renameCollection": "shop.old", "to": "shop.new"}, "renameCollection", "old"),
             ({"createUser": "bob", "pwd": "s3cret", "roles": []}, "createUser", ""),
             ({"getLog": "global"}, "getLog", ""),
             ({"findAndModify": "jobs", "query": {}}, "findAndModify", "jobs")]
    for cmd, command, coll in cases:
        rid, req = msg(cmd, "admin")
        (e,) = events((C, req, 1), (S, reply(rid, {"ok": 1.0}), 2))
        assert (e.command, e.collection) == (command, coll)
        assert "s3cret" not in repr(e) and "bob" not in repr(e)


def test_write_without_reply_cut_by_the_end_is_still_reported():
    import bson as b
    ins = G.legacy(9, 2002, "shop.users", b.encode({"_id": 1}) + b.encode({"_id": 2}))
    for cut in (32, len(ins) - 3):
        p, out = drive([(C, ins[:cut], 1)])
        assert [(e.command, e.collection, e.truncated) for _, e in out] == [
            ("insert", "users", True)], cut
    p, out = drive([(C, ins[:32] + b"\xff" * 40, 1)])    # garbage where documents go
    assert [(e.command, e.collection) for _, e in out] == [("insert", "users")]


def test_reply_without_request_and_request_without_reply():
    rid, req = msg({"ping": 1}, "admin")
    p, out = drive([(S, reply(12345, {"ok": 1.0}), 1), (C, req, 2)])
    assert [(e.command, e.status, e.replies) for _, e in out] == [("", "ok", 1), ("ping", "", 0)]
    assert p.unmatched_replies == 1


def test_pending_requests_are_bounded():
    p = MongodbParser(max_pending=4)
    for i in range(10):
        p.receive_data(C, msg({"count": f"c{i}"})[1], i)
    assert len(p._pending) == 4 and p.evicted == 6
    assert [t.detail.collection for t in iter(p.next_event, NEED_DATA)] == [
        f"c{i}" for i in range(6)]


def test_long_names_are_cut_and_marked():
    rid, req = msg({"find": "c" * 1000}, "d" * 300)
    (e,) = events((C, req, 1), (S, reply(rid, {"ok": 1.0, "errmsg": "e" * 2000}), 2))
    assert (len(e.collection), len(e.database), len(e.errmsg), e.truncated) == (
        M.MAX_NAME, M.MAX_NAME, M.MAX_ERRMSG, True)


def _raw(op: int, body: bytes, rto: int = 0) -> bytes:
    return G._header(16 + len(body), 1, rto, op) + body


@pytest.mark.parametrize("side, raw, reason", [
    (C, _raw(1, b"\x00" * 20), "not a client opcode"),
    (C, _raw(4242, b""), "not a client opcode"),
    (C, struct.pack("<iiii", 10, 1, 0, 2013), "message length"),
    (C, struct.pack("<iiii", 60_000_000, 1, 0, 2013), "message length"),
    (C, _raw(2013, struct.pack("<IB", 4, 0) + bson.encode({"a": 1})), "unknown required bit"),
    (C, _raw(2013, struct.pack("<IB", 0, 7) + bson.encode({"a": 1})), "section kind 7"),
    (C, _raw(2013, struct.pack("<IBi", 0, 0, 900) + b"\x00"), "body length"),
    (C, _raw(2013, struct.pack("<IB", 0, 0) + b"\x0b\x00\x00\x00\x42a\x00\x00\x00\x00\x00"),
     "unknown BSON type"),
    (C, _raw(2013, struct.pack("<IB", 0, 0) + b"\x0c\x00\x00\x00\x10a\x00\x01\x00\x00\x00\x01"),
     "not ended by a NUL"),
    (C, _raw(2013, struct.pack("<IB", 0, 0) + struct.pack("<i", 1200) + b"\x10"
             + b"k" * 1190 + b"\x00" * 5), "C string longer"),
    (S, _raw(2004, b"\x00" * 30, 1), "not a server opcode"),
    (C, _raw(2012, struct.pack("<iiB", 2012, 10, 2) + b"x" * 10), "OP_COMPRESSED of opcode"),
    (C, _raw(2012, struct.pack("<iiB", 2013, 30, 2) + b"not zlib at all"), "zlib data corrupt"),
    (C, _raw(2012, struct.pack("<iiB", 2013, 30, 3) + b"not zstd at all"), "zstd data corrupt"),
])
def test_malformed_input_is_an_error_with_a_reason(side, raw, reason):
    p = MongodbParser()
    p.receive_data(side, raw, 1)
    assert p.state is ParserState.ERROR and reason in p.error, p.error
    p.receive_data(side, raw, 2)    # ignored after ERROR
    assert p.state is ParserState.ERROR


def test_datagram_is_an_error():
    p = MongodbParser()
    p.receive_datagram(C, msg({"ping": 1})[1], 1)
    assert p.state is ParserState.ERROR


def test_event_validation():
    MongodbEvent(command="find", code=-1, request_id=0xFFFFFFFF)
    for bad in ({"status": "maybe"}, {"code": 1 << 31}, {"request_id": -1}, {"documents": -1},
                {"opcode": "OP_NOPE"}, {"compressor": "lz4"}, {"command": "x" * 5000}):
        with pytest.raises(ValueError):
            MongodbEvent(**bad)


# -- detection ----------------------------------------------------------------------------------

def test_signature_accepts_mongodb_and_refuses_other_protocols():
    for flow in pcaputil.flows(CORPUS / CORPUS_CASES[0]):
        first = flow.stream(C)
        if first:
            assert looks_like(first[:64], C), flow.sport   # responseTo -1 included (port 30000)
    rid, req = msg({"hello": 1}, "admin")
    assert looks_like(req, C) and looks_like(req[:16], C)
    assert looks_like(msg({"find": "x"}, ctx=ZstdContext())[1], C)
    assert looks_like(reply(rid, {"ok": 1.0}), S)
    assert looks_like(G.op_reply(7, [{"ok": 1.0}])[1], S)
    assert not looks_like(req, S) and not looks_like(reply(rid, {"ok": 1.0}), C)
    for other in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc"
                  + b"\x03\x03" + b"\x00" * 32, b"*1\r\n$4\r\nPING\r\n", b"\x00" * 40,
                  b"\xff" * 40, struct.pack("<iiii", 40, 1, 5, 2013) + b"\x00" * 24,
                  struct.pack("<iiii", 40, 1, 0, 2013) + struct.pack("<I", 4) + b"\x00" * 20):
        assert not looks_like(other, C) and not looks_like(other, S), other[:16]
    assert detect(protocol=PROTO_TCP, server_port=40000, to_server=req) == "mongodb"
    assert detect(protocol=PROTO_TCP, server_port=40000, to_client=reply(rid, {"ok": 1})) \
        == "mongodb"


# -- the golden capture --------------------------------------------------------------------------

FIELDS = ("command", "database", "collection", "documents", "sequences", "more_to_come",
          "exhaust", "truncated", "status", "code", "code_name", "errmsg", "write_errors",
          "returned", "affected", "compressor", "reply_compressor")


def golden_flows():
    spec = json.loads((GOLDEN / "session.expected.json").read_text())
    flows = [f for f in pcaputil.flows(CAPTURE) if f.proto == 6]
    return spec, flows


def fields(e: MongodbEvent) -> dict:
    return {k: getattr(e, k) for k in FIELDS}


def expected_fields(x: dict) -> dict:
    defaults = {f.name: f.default for f in dataclasses.fields(MongodbEvent)}
    return {k: x.get(k, defaults[k]) for k in FIELDS}


def check_flow(got: list[MongodbEvent], want: list[dict]) -> None:
    assert [fields(e) for e in got] == [expected_fields(x) for x in want]


def test_golden_capture_matches_what_the_generator_sent():
    spec, flows = golden_flows()
    assert [str(f.sport) for f in flows] == list(spec["flows"])
    for f in flows:
        p = MongodbParser()
        got = [t.detail for t in pcaputil.feed(p, f)]
        check_flow(got, spec["flows"][str(f.sport)])
        assert p.state is ParserState.DONE and not p.unmatched_replies
        text = repr(got)
        for secret in (spec["password"], "user1@example.com", "sleep(1)", "4111", "fyko+"):
            assert secret not in text


def test_golden_fed_byte_by_byte_split_everywhere_and_with_junk():
    # A light pass here (the shared harness, tests/l7/test_harness.py, does every offset).
    for conv in harness.conversations("mongodb"):
        assert harness.check_conversation(MongodbParser, conv, exhaustive=600, sample=64)


def tshark(path: Path, *fields: str, ports=(27017, 30000, 37017)) -> list[list[str]]:
    """One row per MongoDB message, tshark's first occurrence of each field. Port 27017 is
    tshark's TLS port for MongoDB (mongo over TLS), so the plain ports are decoded as mongo
    with -d, as an analyst would."""
    args = ["tshark", "-r", str(path), "-Y", "mongo", "-T", "fields", "-E", "occurrence=f"]
    for port in ports:
        args += ["-d", f"tcp.port=={port},mongo"]
    for f in fields:
        args += ["-e", f]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=120).stdout
    return [line.split("\t") for line in out.splitlines()]


needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")


@needs_tshark
def test_golden_against_tshark():
    """tshark decodes each message's opcode, ids, the compression header (and zlib and
    snappy payloads; not zstd in 4.0), the legacy namespace and the element names. Per client
    port: each request tshark sees is one event with the same request id and opcode (the
    inner one for OP_COMPRESSED) and compressor; the command is tshark's first element name,
    except (explained): legacy queries on a collection (tshark: the first filter field; Loupe:
    find), the {$query: ...} wrapper (tshark: $query; Loupe: the command inside), snappy (tshark
    decodes it; Loupe notes it only), zstd (tshark does not decode it), OP_KILL_CURSORS (no
    document; Loupe: killCursors). Each reply answers the
    request id its responseTo names, or an earlier reply of the same exhaust stream."""
    rows = tshark(CAPTURE, "tcp.srcport", "tcp.dstport", "mongo.opcode", "mongo.request_id",
                  "mongo.response_to", "mongo.compression.original_opcode",
                  "mongo.compression.compressor", "mongo.full_collection_name",
                  "mongo.element.name")
    names = {1: "OP_REPLY", 2002: "OP_INSERT", 2004: "OP_QUERY", 2005: "OP_GET_MORE",
             2007: "OP_KILL_CURSORS", 2012: "OP_COMPRESSED", 2013: "OP_MSG"}
    spec, flows = golden_flows()
    for f in flows:
        got = [t.detail for t in pcaputil.feed(MongodbParser(), f)]
        requests = [r[:1] + r[2:] for r in rows if r[0] == str(f.sport)]
        replies = [r[:1] + r[2:] for r in rows if r[1] == str(f.sport)]
        by_id = {e.request_id: e for e in got if e.request_bytes}
        assert len(by_id) == len(requests)
        for _, op, rid, _, inner, comp, ns, first in requests:
            e = by_id[int(rid, 16)]
            assert e.opcode == names[int(inner or op)]
            assert e.compressor == (M.COMPRESSORS[int(comp)] if comp else "")
            if ns:
                db, _, coll = ns.partition(".")
                assert e.database == db
                if not coll.startswith("$cmd"):   # $cmd: the command names its own
                    assert e.collection == coll
            if e.compressor in ("snappy", "zstd") or (ns and not ns.endswith(".$cmd")) \
                    or first == "$query" or op == "2007":   # OP_KILL_CURSORS: no document
                continue
            assert e.command == first
        seen = {int(r[2], 16) for r in requests}
        for _, _, rid, rto, *_ in replies:
            assert int(rto, 16) in seen
            seen.add(int(rid, 16))
        assert sum(e.replies for e in got) == len(replies)


@needs_tshark
@pytest.mark.parametrize("rel", CORPUS_CASES)
def test_corpus_against_tshark(rel):
    """Every message tshark decodes in the corpus (legacy OP_QUERY handshakes of PyMongo 3.4
    and the mongo shell, one with responseTo -1, on 27017 and 30000; no replies were
    captured): the same request id, opcode, database, and the command is tshark's first
    element name. tshark's collection is "$cmd", the legacy command namespace; Loupe reports
    the command's own collection, none for these handshakes."""
    path = CORPUS / rel
    rows = tshark(path, "tcp.srcport", "mongo.opcode", "mongo.request_id",
                  "mongo.database_name", "mongo.collection_name", "mongo.element.name")
    assert len(rows) == 5
    got = {}
    for f in pcaputil.flows(path):
        if f.proto == 6 and f.stream(C):
            p = MongodbParser()
            for t in pcaputil.feed(p, f):
                got[(f.sport, t.detail.request_id)] = t.detail
            assert p.state is ParserState.DONE
    assert len(got) == len(rows)
    for sport, op, rid, db, coll, first in rows:
        e = got[(int(sport), int(rid, 16))]
        assert (e.opcode, e.database, e.command, e.collection, coll) == (
            "OP_QUERY", db, first, "", "$cmd")
        assert e.status == "" and e.replies == 0


def test_arkime_sessions_are_detected_as_mongodb():
    """Arkime's expected sessions tag five connections "mongo" (VLANs merged, as in
    pcaputil); Loupe's signature says mongodb for each from its first client bytes, the
    one on port 30000 (responseTo -1, which the first stub refused) included."""
    sessions = json.loads((CORPUS / "arkime/mongo/mongo.test").read_text())["sessions3"]
    tagged = {(s["body"]["source"]["port"], s["body"]["destination"]["port"])
              for s in sessions if "mongo" in s["body"]["protocol"]}
    assert len(tagged) == 5
    flows = {(f.sport, f.dport): f for f in pcaputil.flows(CORPUS / CORPUS_CASES[1])}
    for key in tagged:
        first = flows[key].stream(C)
        assert detect(protocol=PROTO_TCP, server_port=key[1] + 1, to_server=first) == "mongodb"


# -- end to end ----------------------------------------------------------------------------------

def _replay(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LOUPE, "replay", "--no-progress", str(CAPTURE), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_replay_gives_the_parser_events_json_and_table(tmp_path):
    out = tmp_path / "out.jsonl"
    done = _replay(tmp_path, "-o", str(out))
    assert done.returncode == 0, done.stderr
    records = [jsonfmt.from_dict(json.loads(line)) for line in out.read_text().splitlines()]
    spec, flows = golden_flows()
    for f in flows:
        got = [r.detail for r in records
               if isinstance(r, model.L7Event) and r.kind == "mongodb" and r.src_port == f.sport]
        check_flow(got, spec["flows"][str(f.sport)])
        want = [t.detail for t in pcaputil.feed(MongodbParser(), f)]
        # pcaputil reads times through a float: latencies compare to the microsecond.
        us = lambda evs: [dataclasses.replace(e, latency_ns=round(e.latency_ns / 1000))  # noqa
                          for e in evs]
        assert us(got) == us(want)
    apps = {r.dst_port: r.app_proto for r in records if isinstance(r, model.Flow)}
    assert apps == {27017: "mongodb", 37017: "mongodb"}   # 37017: by signature alone
    from sensor.export.table import TableWriter
    line = TableWriter(None, color=False, width=None).line(
        next(r for r in records if isinstance(r, model.L7Event) and r.detail.command == "drop"))
    assert " mongodb " in line and "drop shop.nope" in line and "NamespaceNotFound" in line


def _start_collector(data: Path):
    proc = subprocess.Popen([*LOUPE, "collector", "run", "--listen", "127.0.0.1:0",
                             "--data-dir", str(data)], cwd=REPO, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if "listening on" in line:
            return proc, line.split("listening on ")[1].split()[0]
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"collector did not start: {proc.stderr.read()}")


def test_a_real_collector_stores_and_filters_mongodb_events(tmp_path):
    proc, address = _start_collector(tmp_path / "data")
    try:
        done = _replay(tmp_path, "--collector", address)
        assert done.returncode == 0, done.stderr
        spec, _ = golden_flows()
        total = sum(len(v) for v in spec["flows"].values())
        q = subprocess.run([*LOUPE, "query", "--collector", address, "--format", "json",
                            "SELECT command, collection, status, code FROM mongodb "
                            "ORDER BY ts_ns, request_id"],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
        assert q.returncode == 0, q.stderr
        rows = [json.loads(line) for line in q.stdout.splitlines() if line.strip()]
        assert len(rows) == total
        assert {"command": "drop", "collection": "nope", "status": "error", "code": 26} in rows
        # The events (--mongo-collection also matches flows by their first collection).
        tail = subprocess.run([*LOUPE, "tail", "--collector", address, "--since",
                               "2020-01-01T00:00:00Z", "--mongo-collection", "user*",
                               "--type", "mongodb", "--format", "json"],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
        assert tail.returncode == 0, tail.stderr
        got = [json.loads(line) for line in tail.stdout.splitlines() if line.strip()]
        want = sum(x.get("collection", "").startswith("user")
                   for v in spec["flows"].values() for x in v)
        assert want > 5 and len(got) == want
        assert {g["detail"]["collection"] for g in got} == {"users"}
        table = subprocess.run([*LOUPE, "tail", "--collector", address, "--since",
                                "2020-01-01T00:00:00Z", "--mongo-collection", "nope",
                                "--format", "table"],
                               cwd=REPO, capture_output=True, text=True, timeout=60)
        assert table.returncode == 0, table.stderr
        (line,) = [x for x in table.stdout.splitlines() if "mongodb" in x]
        assert "drop shop.nope" in line and "NamespaceNotFound" in line
    finally:
        proc.terminate()
        proc.wait(30)


# -- fuzzing ---------------------------------------------------------------------------------------

def fuzz_one(blob: bytes) -> None:
    """Split blob into two directions and feed it as several segments; nothing escapes."""
    p = MongodbParser()
    half = len(blob) // 2
    for i in range(0, len(blob), 7):
        d = C if i < half else S
        p.receive_data(d, blob[i:i + 7], i)
        if p.skip_hint(d) and i % 2:
            p.receive_skip(d, p.skip_hint(d), i)
        while p.next_event() is not NEED_DATA:
            pass
    p.receive_eof(C, 1)
    p.receive_eof(S, 1)
    while p.next_event() is not NEED_DATA:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(blob):
    fuzz_one(blob)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_fuzz_mutated_golden_requests(data):
    _, req = msg({"insert": "u", "documents": [{"a": 1}, {"b": "x"}]}, ctx=ZlibContext(6))
    raw = bytearray(req + reply(0, cursor([{"a": 1}])))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    p = MongodbParser()
    p.receive_data(C, bytes(raw[:len(req)]), 1)
    p.receive_data(S, bytes(raw[len(req):]), 2)
    p.receive_eof(C, 3)
    p.receive_eof(S, 3)
    list(iter(p.next_event, NEED_DATA))
    assert p.state in (ParserState.DONE, ParserState.ERROR)
