"""PostgreSQL v3 parser: the real psql/psycopg capture against what the clients saw, the
shared corpus against tshark and Suricata's expected output, crafted cases for the
extended protocol, bounds, skipping and redaction, every fixture fed whole, byte by byte,
split at every offset and with trailing junk, a fuzz test, and a live server."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sensor.l7 import pgsql
from sensor.l7.base import NEED_DATA, Direction, ParserState, Transaction
from sensor.l7.pgsql import FRAMING, MAX_PREPARED, MAX_STATEMENT, PgsqlEvent, PgsqlParser
from tests.l7.pcaputil import L4Flow, capture_lo, flows

C = Direction.TO_SERVER
S = Direction.TO_CLIENT
GOLDEN = Path(__file__).resolve().parent.parent / "golden"
SESSION = GOLDEN / "pgsql-session.pcap.gz"
NDPI = "ndpi/pgsql/pgsql.pcap"
SV = "sv/pgsql-simple-query-rollback/input.pcap"
SECRETS = ("hunter2-secret", "s3cret-pw", "p=")   # "p=": a SCRAM client proof


# --- message builders -----------------------------------------------------------------------

def msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack(">I", len(body) + 4) + body


def cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def startup(**params: str) -> bytes:
    body = struct.pack(">I", 196608) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\0"
    return struct.pack(">I", len(body) + 4) + body


def auth(code: int, extra: bytes = b"") -> bytes:
    return msg(b"R", struct.pack(">I", code) + extra)


READY = msg(b"Z", b"I")
LOGIN = (auth(0) + msg(b"S", cstr("server_version") + cstr("15.18")) +
         msg(b"K", struct.pack(">II", 4242, 0xDEADBEEF)) + READY)


def query(text: str) -> bytes:
    return msg(b"Q", cstr(text))


def parse(text: str, name: str = "") -> bytes:
    return msg(b"P", cstr(name) + cstr(text) + b"\0\0")


def bind(stmt: str = "", portal: str = "") -> bytes:
    return msg(b"B", cstr(portal) + cstr(stmt) + b"\0\0\0\0\0\0")


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return msg(b"E", cstr(portal) + struct.pack(">I", max_rows))


SYNC = msg(b"S", b"")
DESCRIBE = msg(b"D", b"P\0")


def row_desc(n: int) -> bytes:
    return msg(b"T", struct.pack(">H", n) + b"".join(
        cstr(f"c{i}") + b"\0" * 18 for i in range(n)))


def data_row(*values: bytes) -> bytes:
    return msg(b"D", struct.pack(">H", len(values)) + b"".join(
        struct.pack(">I", len(v)) + v for v in values))


def complete(tag: str) -> bytes:
    return msg(b"C", cstr(tag))


def error(state: str, text: str, severity: str = "ERROR") -> bytes:
    return msg(b"E", b"S" + cstr(severity) + b"V" + cstr(severity) + b"C" + cstr(state) +
               b"M" + cstr(text) + b"\0")


# --- driving --------------------------------------------------------------------------------

def run(steps, parser: PgsqlParser | None = None, eof: bool = True) -> tuple[list, PgsqlParser]:
    """steps: (direction, bytes) at increasing times; then the end of both directions."""
    p = parser or PgsqlParser()
    out = []
    for i, (direction, data) in enumerate(steps):
        p.receive_data(direction, data, 1000 * (i + 1))
        while (ev := p.next_event()) is not NEED_DATA:
            out.append(ev)
    if eof:
        for direction in (C, S):
            p.receive_eof(direction, 10**9)
        while (ev := p.next_event()) is not NEED_DATA:
            out.append(ev)
    return out, p


def details(events) -> list[PgsqlEvent]:
    return [e.detail for e in events]


def feed_flow(flow: L4Flow, mode: str = "whole", junk: bytes = b"", at: int = 0):
    """One corpus/golden flow through a fresh parser. mode: whole (as captured), bytes
    (one byte per call), split (each chunk cut in two at `at`)."""
    p = PgsqlParser()
    out = []
    chunks = list(flow.chunks)
    for i, ch in enumerate(chunks):
        data = ch.data
        if junk and i == len(chunks) - 1:
            data = data + junk
        if mode == "bytes":
            pieces = [data[j:j + 1] for j in range(len(data))]
        elif mode == "split":
            pieces = [data[:at], data[at:]]
        else:
            pieces = [data]
        for piece in pieces:
            p.receive_data(ch.direction, piece, ch.ts_ns)
            while (ev := p.next_event()) is not NEED_DATA:
                out.append(ev)
    last = chunks[-1].ts_ns if chunks else 0
    for direction in (C, S):
        p.receive_eof(direction, last)
    while (ev := p.next_event()) is not NEED_DATA:
        out.append(ev)
    return out, p


def pg_flows(path: Path, port: int = 5432) -> list[L4Flow]:
    return [f for f in flows(path) if f.proto == 6 and port in (f.sport, f.dport)]


# --- the real psql/psycopg capture ----------------------------------------------------------

def _expected() -> dict:
    return json.loads((GOLDEN / "pgsql-session.expect.json").read_text())


def _check_against_clients(events, expected: list[dict]) -> None:
    got = details(events)
    assert len(got) == len(expected), [(g.kind, g.statement) for g in got]
    for g, want in zip(got, expected):
        have = dataclasses.asdict(g)
        assert {k: have[k] for k in want} == want, (g, want)
        assert not any(s in repr(g) for s in SECRETS), g


def test_golden_session_equals_what_the_clients_saw():
    exp = _expected()
    out = []
    for flow in pg_flows(SESSION, exp["port"]):
        events, p = feed_flow(flow)
        assert p.state is ParserState.DONE and p.unmatched == 0, p.error
        out += events
    _check_against_clients(out, exp["transactions"])
    # Latency: each transaction's first server byte comes after its first client byte.
    assert all(e.detail.latency_ns > 0 for e in out if e.detail.kind != "startup"
               or e.detail.sqlstate == "")


@pytest.mark.parametrize("mode", ["bytes", "junk"])
def test_golden_session_fed_byte_by_byte_and_with_trailing_junk(mode):
    exp = _expected()
    for flow in pg_flows(SESSION, exp["port"]):
        whole, _ = feed_flow(flow)
        if mode == "bytes":
            got, p = feed_flow(flow, "bytes")
            assert got == whole and p.state is ParserState.DONE
        else:
            got, p = feed_flow(flow, junk=b"\x7f\x00\x00\x00\x09 junk!")
            # The junk follows the flow's last message (from the server or the client's
            # Terminate): everything before it is reported the same; the junk is an error.
            assert got == whole
            assert p.state is ParserState.ERROR and "0x7f" in p.error


def test_small_flow_split_at_every_offset(corpus):
    (flow,) = pg_flows(corpus / SV)
    whole, _ = feed_flow(flow)
    longest = max(len(c.data) for c in flow.chunks)
    for at in range(longest + 1):
        got, p = feed_flow(flow, "split", at=at)
        assert got == whole and p.state is ParserState.DONE, at


# --- shared corpus: tshark and Suricata as the oracles --------------------------------------

_SEP = "\x1f"


def tshark(pcap: Path, *fields: str) -> list[dict[str, list[str]]]:
    """One dict per frame tshark decodes as pgsql: field -> every occurrence, in order."""
    cmd = ["tshark", "-r", str(pcap), "-Y", "pgsql", "-T", "fields", "-E", "occurrence=a",
           "-E", f"aggregator={_SEP}", "-e", "tcp.stream", *[a for f in fields for a in ("-e", f)]]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60).stdout
    rows = []
    for line in out.splitlines():
        cols = line.split("\t")
        rows.append({name: (cols[i].split(_SEP) if i < len(cols) and cols[i] else [])
                     for i, name in enumerate(("tcp.stream",) + fields)})
    return rows


@pytest.mark.skipif(not shutil.which("tshark"), reason="needs tshark (make install)")
@pytest.mark.parametrize("case", [NDPI, SV])
def test_corpus_against_tshark(corpus, case):
    pcap = corpus / case
    frames = tshark(pcap, "pgsql.type", "pgsql.query", "pgsql.tag", "pgsql.code",
                    "pgsql.message", "pgsql.parameter_name", "pgsql.parameter_value",
                    "pgsql.statement", "pgsql.portal")
    streams = pg_flows(pcap)
    assert len(streams) == len({f["tcp.stream"][0] for f in frames})
    for index, flow in enumerate(streams):
        events, p = feed_flow(flow)
        assert p.state is ParserState.DONE, p.error
        got = details(events)
        mine = [f for f in frames if f["tcp.stream"] == [str(index)]]
        want_queries = [q for f in mine for q in f["pgsql.query"]]
        # tshark shows each Parse's and Query's text; Loupe reports the text per Execute,
        # joined through Bind to its Parse. A named statement executed again without a new
        # Parse (ndpi stream 0, statement "4") is one text in tshark and two executes here.
        seen_named: set[str] = set()
        texts = []
        for g in got:
            if g.kind in ("query", "execute") and g.statement:
                if g.statement_name and g.statement_name in seen_named:
                    continue
                seen_named.add(g.statement_name)
                texts.append(g.statement)
        # Within one pipelined packet tshark lists the Parses in wire order, as Loupe does.
        assert texts == want_queries
        assert [g.command_tag for g in got if g.command_tag] == \
            [t for f in mine for t in f["pgsql.tag"]]
        assert all(g.commands <= 1 for g in got)   # no multi-statement Query here
        assert [(g.sqlstate, g.message) for g in got if g.sqlstate] == \
            [(c, m) for f in mine for c, m in zip(f["pgsql.code"], f["pgsql.message"])]
        # Start-up parameters (client) and ParameterStatus (server) come in name/value pairs.
        client, server = {}, {}
        for f in mine:
            pairs = dict(zip(f["pgsql.parameter_name"], f["pgsql.parameter_value"]))
            (client if "Startup message" in f["pgsql.type"] else server).update(pairs)
        starts = [g for g in got if g.kind == "startup"]
        if client:
            (s,) = starts
            assert (s.user, s.database, s.application_name) == (
                client["user"], client.get("database", client["user"]),
                client.get("application_name", ""))
            assert s.server_version == server.get("server_version", "")
        types = [t for f in mine for t in f["pgsql.type"]]
        assert sum(g.kind == "ssl_request" for g in got) == types.count("SSL request")
        assert sum(g.kind == "gssenc_request" for g in got) == types.count("GSS encrypt request")
        assert sum(g.data_rows for g in got) == types.count("Data row")


def test_suricata_verify_simple_query_rollback(corpus):
    """Suricata's expected eve records (test.yaml) for the same capture."""
    checks = yaml.safe_load((corpus / "sv/pgsql-simple-query-rollback/test.yaml").read_text())
    matches = [c["filter"]["match"] for c in checks["checks"]]
    (flow,) = pg_flows(corpus / SV)
    got = details(feed_flow(flow)[0])
    ssl, start = got[0], got[1]
    m_ssl, m_start, m_sasl = matches[0], matches[1], matches[2]
    assert m_ssl["pgsql.request.message"] == "SSL Request"
    assert ssl.kind == "ssl_request" and ssl.accepted is m_ssl["pgsql.response.ssl_accepted"]
    p = "pgsql.request.startup_parameters."
    assert (start.user, start.database, start.application_name) == (
        m_start[p + "user"], m_start[p + "optional_parameters[0].database"],
        m_start[p + "optional_parameters[1].application_name"])
    assert m_sasl["pgsql.request.sasl_authentication_mechanism"] == "scram_SHA256"
    assert start.auth == "SCRAM-SHA-256" and start.ssl_requested
    m_ok = matches[3]
    assert start.server_version == m_ok["pgsql.response.parameter_status[7].server_version"]
    assert start.backend_pid == m_ok["pgsql.response.process_id"]
    queries = [m for m in matches if "pgsql.request.simple_query" in m]
    mine = [g for g in got if g.kind == "query"]
    assert len(mine) == len(queries) == 22
    for g, m in zip(mine, queries):
        assert g.statement == m["pgsql.request.simple_query"]
        if "pgsql.response.code" in m:
            assert (g.sqlstate, g.message, g.severity) == (
                m["pgsql.response.code"], m["pgsql.response.message"],
                m["pgsql.response.severity_non_localizable"])
        else:
            assert g.command_tag == m["pgsql.response.command_completed"]
        if "pgsql.response.data_rows" in m:
            assert g.data_rows == g.rows == m["pgsql.response.data_rows"]
            assert g.columns == m["pgsql.response.field_count"]
    # Suricata logs the SASL payloads (sasl_param, sasl_response); Loupe never copies them.
    assert not any(m_sasl["pgsql.request.sasl_param"][4:] in repr(g) for g in got)


# --- crafted cases ------------------------------------------------------------------------

def test_startup_trust_fields_and_latency():
    out, p = run([(C, startup(user="alice", database="shop", application_name="app")),
                  (S, LOGIN)])
    assert details(out) == [PgsqlEvent(
        kind="startup", user="alice", database="shop", application_name="app", auth="trust",
        server_version="15.18", backend_pid=4242, latency_ns=1000)]
    assert p.summary() == {"pgsql_user": "alice", "pgsql_database": "shop"}
    assert "DEADBEEF" not in repr(out).upper() and str(0xDEADBEEF) not in repr(out)


def test_startup_refused_is_an_event_with_the_error():
    out, _ = run([(C, startup(user="bob")), (S, auth(5, b"salt")),
                  (C, msg(b"p", cstr("md5deadbeefdeadbeef"))),
                  (S, error("28P01", 'password authentication failed for user "bob"', "FATAL"))])
    (ev,) = details(out)
    assert (ev.kind, ev.user, ev.database, ev.auth, ev.severity, ev.sqlstate) == (
        "startup", "bob", "", "md5", "FATAL", "28P01")
    assert "md5deadbeef" not in repr(ev)


def test_ssl_accepted_hands_the_stream_to_tls():
    # After 'S' the bytes are TLS (tests/l7/test_starttls.py follows them to TlsEvents):
    # a record header is awaited, not read as PostgreSQL.
    ssl = struct.pack(">II", 8, 80877103)
    out, p = run([(C, ssl), (S, b"S"), (C, b"\x16\x03\x01\x00\x05hel")], eof=False)
    assert details(out) == [PgsqlEvent(kind="ssl_request", ssl_requested=True, accepted=True,
                                       latency_ns=1000)]
    assert p.state is ParserState.OK and p.skip_hint(C) == 0


def test_cancel_request_keeps_the_pid_not_the_key():
    out, _ = run([(C, struct.pack(">IIII", 16, 80877102, 777, 123456789))])
    assert details(out) == [PgsqlEvent(kind="cancel", backend_pid=777)]


def test_simple_query_rows_columns_and_empty_query():
    rows = b"".join(data_row(b"%d" % i, b"x") for i in range(10))
    out, _ = run([(C, startup(user="u")), (S, LOGIN),
                  (C, query("SELECT a, b FROM t")), (S, row_desc(2) + rows + complete("SELECT 10") + READY),
                  (C, query("")), (S, msg(b"I", b"") + READY)])
    q, e = details(out)[1:]
    assert (q.statement, q.command_tag, q.rows, q.data_rows, q.columns, q.commands) == (
        "SELECT a, b FROM t", "SELECT 10", 10, 10, 2, 1)
    assert e.empty and e.kind == "query" and e.statement == ""


def test_pipelined_extended_queries_join_text_by_name_and_portal():
    client = (parse("SELECT $1::int", "s1") + bind("s1", "p1") + DESCRIBE + execute("p1") +
              parse("UPDATE t SET a = 1") + bind() + execute() +
              bind("s1") + execute() + SYNC)
    server = (b"1\0\0\0\x04" b"2\0\0\0\x04" + row_desc(1) + data_row(b"7") + complete("SELECT 1") +
              b"1\0\0\0\x04" b"2\0\0\0\x04" + complete("UPDATE 3") +
              b"2\0\0\0\x04" + data_row(b"8") + complete("SELECT 1") + READY)
    out, p = run([(C, client), (S, server)])
    got = [(d.kind, d.statement, d.statement_name, d.command_tag, d.rows, d.columns)
           for d in details(out)]
    assert got == [("execute", "SELECT $1::int", "s1", "SELECT 1", 1, 1),
                   ("execute", "UPDATE t SET a = 1", "", "UPDATE 3", 3, 0),
                   ("execute", "SELECT $1::int", "s1", "SELECT 1", 1, 0)]
    assert p.unmatched == 0


def test_error_in_extended_group_discards_to_sync_and_marks_each_execute():
    client = (parse("SELECT 1/0") + bind() + execute() + parse("SELECT 2") + bind() + execute()
              + SYNC + parse("SELECT 3") + bind() + execute() + SYNC)
    server = (b"1\0\0\0\x04" b"2\0\0\0\x04" + error("22012", "division by zero") + READY +
              b"1\0\0\0\x04" b"2\0\0\0\x04" + data_row(b"3") + complete("SELECT 1") + READY)
    got = [(d.statement, d.sqlstate, d.command_tag) for d in details(run([(C, client), (S, server)])[0])]
    assert got == [("SELECT 1/0", "22012", ""), ("SELECT 2", "22012", ""),
                   ("SELECT 3", "", "SELECT 1")]


def test_failing_parse_without_execute_is_a_parse_event():
    out, _ = run([(C, parse("SELEC 1", "bad") + SYNC),
                  (S, error("42601", 'syntax error at or near "SELEC"') + READY)])
    assert [(d.kind, d.statement, d.statement_name, d.sqlstate) for d in details(out)] == [
        ("parse", "SELEC 1", "bad", "42601")]


def test_portal_suspended_and_copy_in_out():
    out, _ = run([(C, parse("SELECT g FROM big") + bind() + execute(max_rows=2) + SYNC),
                  (S, b"1\0\0\0\x04" b"2\0\0\0\x04" + data_row(b"1") + data_row(b"2") +
                   msg(b"s", b"") + READY),
                  (C, query("COPY t FROM STDIN")), (S, msg(b"G", b"\0\0\0")),
                  (C, msg(b"d", b"1\tone\n") + msg(b"d", b"2\ttwo\n") + msg(b"c", b"")),
                  (S, complete("COPY 2") + READY),
                  (C, query("COPY t TO STDOUT")),
                  (S, msg(b"H", b"\0\0\0") + msg(b"d", b"x" * 100) + msg(b"c", b"") +
                   complete("COPY 1") + READY)])
    susp, cin, cout = details(out)
    assert susp.suspended and susp.data_rows == 2 and susp.command_tag == ""
    assert (cin.copy, cin.copy_bytes, cin.rows) == ("in", 12, 2)
    assert (cout.copy, cout.copy_bytes, cout.rows) == ("out", 100, 1)


def test_prepared_statement_map_is_bounded_and_evictions_counted():
    client = b"".join(parse(f"SELECT {i}", f"s{i}") for i in range(MAX_PREPARED + 1))
    client += bind("s0") + execute() + bind(f"s{MAX_PREPARED}") + execute() + SYNC
    server = (b"1\0\0\0\x04" * (MAX_PREPARED + 1) + (b"2\0\0\0\x04" + complete("SELECT 1")) * 2
              + READY)
    out, p = run([(C, client), (S, server)])
    assert p.evicted_statements == 1
    assert [(d.statement_name, d.statement) for d in details(out)] == [
        ("s0", ""), (f"s{MAX_PREPARED}", f"SELECT {MAX_PREPARED}")]


def test_long_statement_is_cut_and_its_tail_skipped_not_buffered():
    text = "SELECT '" + "a" * 100_000 + "'"
    raw = query(text)
    p = PgsqlParser()
    p.receive_data(C, startup(user="u"), 1)
    p.receive_data(S, LOGIN, 2)
    head = raw[:pgsql.MAX_KEPT + 5]
    p.receive_data(C, head, 3)
    assert p.skip_hint(C) == len(raw) - len(head)
    p.receive_skip(C, p.skip_hint(C), 4)   # the engine did not deliver the rest
    p.receive_data(S, error("42601", "x") + READY, 5)
    out, _ = run([], parser=p)
    q = details(out)[-1]
    assert q.truncated and len(q.statement) == MAX_STATEMENT and q.statement == text[:MAX_STATEMENT]
    assert p.state is ParserState.DONE


def test_datarow_bodies_are_skippable_and_gaps_inside_them_cost_nothing():
    p = PgsqlParser()
    run([(C, startup(user="u")), (S, LOGIN), (C, query("SELECT blob FROM t")),
         (S, row_desc(1))], parser=p, eof=False)
    big = data_row(b"z" * 50_000)
    p.receive_data(S, big[:20], 1)
    assert p.skip_hint(S) == len(big) - 20
    p.receive_gap(S, 30_000, 2)                       # lost inside the body: fine
    p.receive_skip(S, p.skip_hint(S), 3)              # the rest skipped on request
    assert p.skip_hint(S) == 0 and p.state is ParserState.OK
    p.receive_data(S, complete("SELECT 1") + READY, 4)
    q = details(run([], parser=p)[0])[-1]
    assert (q.rows, q.data_rows) == (1, 1)
    assert max(len(b) for b in p._buf) == 0


def test_gap_in_a_header_is_an_error():
    p = PgsqlParser()
    run([(C, startup(user="u")), (S, LOGIN), (C, query("SELECT 1"))], parser=p, eof=False)
    p.receive_data(S, b"T\0\0", 1)
    p.receive_gap(S, 10, 2)
    assert p.state is ParserState.ERROR and "gap" in p.error
    # What was pending when the framing broke is reported with what was seen.
    assert [(d.statement, d.command_tag) for d in details(run([], parser=p)[0])] == [
        ("SELECT 1", "")]


def elide_rows(server: bytes, start: int) -> list[tuple[str, object]]:
    """What a framing-aware kernel hands userspace: from `start` (after the start-up), it
    walks FRAMING and leaves out whole messages of the elidable types, as skips."""
    out: list[tuple[str, object]] = [("data", server[:start])]
    pos = start
    while pos < len(server):
        length = int.from_bytes(server[pos + FRAMING.length_at:
                                       pos + FRAMING.length_at + FRAMING.length_size], "big")
        end = pos + 1 + length
        if server[pos] in FRAMING.elidable:
            if out[-1][0] == "skip":
                out[-1] = ("skip", out[-1][1] + end - pos)
            else:
                out.append(("skip", end - pos))
        else:
            out.append(("data", server[pos:end]))
        pos = end
    return out


def test_whole_datarows_elided_by_framing_keep_the_exact_row_count():
    results = {}
    for n in (10, 100_000):
        server_body = row_desc(1) + b"".join(data_row(b"%d" % i) for i in range(n)) + \
            complete(f"SELECT {n}") + READY
        p = PgsqlParser()
        run([(C, startup(user="u")), (S, LOGIN), (C, query("SELECT g FROM generate_series(1, n) g"))],
            parser=p, eof=False)
        assert p.typed_from_server()
        delivered = 0
        for kind, value in elide_rows(server_body, 0):
            if kind == "data":
                p.receive_data(S, value, 5)
                delivered += len(value)
            else:
                p.receive_skip(S, value, 5)
        q = details(run([], parser=p)[0])[-1]
        assert (q.rows, q.command_tag, q.columns) == (n, f"SELECT {n}", 1)
        assert p.state is ParserState.DONE
        results[n] = delivered
    # Flat: only T, C and Z reach the parser; the tag is 4 characters longer.
    assert results[100_000] - results[10] == len("100000") - len("10")


def test_a_skip_over_the_rest_of_a_body_and_whole_rows_after_it():
    p = PgsqlParser()
    run([(C, startup(user="u")), (S, LOGIN), (C, query("SELECT g FROM t"))], parser=p, eof=False)
    rows = [data_row(b"x" * 100) for _ in range(5)]
    p.receive_data(S, row_desc(1) + rows[0][:30], 1)
    assert p.skip_hint(S) == len(rows[0]) - 30
    p.receive_skip(S, len(rows[0]) - 30 + sum(map(len, rows[1:])), 2)
    p.receive_data(S, complete("SELECT 5") + READY, 3)
    q = details(run([], parser=p)[0])[-1]
    assert (q.rows, q.data_rows, p.elided_bytes) == (5, 1, sum(map(len, rows[1:])))
    assert p.summary()["pgsql_statement"] == "SELECT g FROM t"


def test_a_skip_outside_rows_is_still_an_error():
    p = PgsqlParser()
    run([(C, startup(user="u")), (S, LOGIN)], parser=p, eof=False)
    p.receive_skip(S, 5, 1)
    assert p.state is ParserState.ERROR


@pytest.mark.parametrize("sql, want", [
    ("ALTER ROLE a PASSWORD 'x''y'", "ALTER ROLE a PASSWORD 'REDACTED'"),
    ("create user b with encrypted password E'p\\'w' login",
     "create user b with encrypted password 'REDACTED' login"),
    ("CREATE ROLE c PASSWORD $tag$se'cret$tag$ VALID UNTIL 'infinity'",
     "CREATE ROLE c PASSWORD 'REDACTED' VALID UNTIL 'infinity'"),
    ("ALTER USER MAPPING FOR d SERVER s OPTIONS (SET password 'pw')",
     "ALTER USER MAPPING FOR d SERVER s OPTIONS (SET password 'REDACTED')"),
    ("SELECT dblink_connect('host=h user=u password=topsecret dbname=x')",
     "SELECT dblink_connect('host=h user=u password=REDACTED dbname=x')"),
    ("ALTER ROLE e PASSWORD 'cut short", "ALTER ROLE e PASSWORD 'REDACTED'"),
    ("SELECT password FROM users", "SELECT password FROM users"),
])
def test_password_literals_are_redacted(sql, want):
    out, _ = run([(C, query(sql)), (S, complete("ALTER ROLE") + READY)])
    assert details(out)[0].statement == want
    out, _ = run([(C, parse(sql) + bind() + execute() + SYNC),
                  (S, b"1\0\0\0\x04" b"2\0\0\0\x04" + complete("ALTER ROLE") + READY)])
    assert details(out)[0].statement == want
    out, _ = run([(C, query(sql)), (S, READY)], parser=PgsqlParser(redact=False))
    assert details(out)[0].statement == sql


def test_sasl_payloads_are_never_copied():
    mech = cstr("SCRAM-SHA-256") + struct.pack(">I", 32) + b"n,,n=,r=CLIENTNONCEclientnonce"
    out, _ = run([(C, startup(user="u")), (S, auth(10, cstr("SCRAM-SHA-256") + b"\0")),
                  (C, msg(b"p", mech)), (S, auth(11, b"r=CLIENTNONCEserver,s=salt,i=4096")),
                  (C, msg(b"p", b"c=biws,r=CLIENTNONCEserver,p=PROOFPROOF")),
                  (S, auth(12, b"v=SIGNATURE") + LOGIN)])
    (ev,) = details(out)
    assert ev.auth == "SCRAM-SHA-256"
    assert not any(s in repr(out) for s in ("CLIENTNONCE", "PROOF", "SIGNATURE", "salt"))


def test_signature():
    assert pgsql.looks_like(startup(user="postgres", database="x"), C)
    assert pgsql.looks_like(struct.pack(">II", 8, 80877103), C)
    assert pgsql.looks_like(struct.pack(">II", 8, 80877104), C)
    assert pgsql.looks_like(query("SELECT 1"), C)
    assert pgsql.looks_like(auth(10, cstr("SCRAM-SHA-256") + b"\0"), S)
    assert pgsql.looks_like(error("28000", "no pg_hba.conf entry", "FATAL"), S)
    rng = random.Random(12)
    others = [b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
              b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03www", b"S", b"N",
              b"SSH-2.0-OpenSSH_9.2\r\n", b"*1\r\n$4\r\nPING\r\n",
              b"\x4a\x00\x00\x00\x0a5.5.5-10.11"]
    others += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))) for _ in range(2000)]
    for junk in others:
        for d in (C, S):
            assert not pgsql.looks_like(junk, d) or junk[:1] in (b"Q", b"R", b"E"), junk
    hits = sum(pgsql.looks_like(j, d) for j in others for d in (C, S))
    assert hits <= 2   # random bytes almost never pass


def test_event_validates_its_fields():
    with pytest.raises(ValueError):
        PgsqlEvent(kind="select")
    with pytest.raises(ValueError):
        PgsqlEvent(kind="query", sqlstate="123")
    with pytest.raises(TypeError):
        PgsqlEvent(kind="query", rows=True)
    with pytest.raises(ValueError):
        PgsqlEvent(kind="query", statement="x" * (MAX_STATEMENT + 1))


def test_datagram_and_bad_startup_are_errors():
    p = PgsqlParser()
    p.receive_datagram(C, b"x", 1)
    assert p.state is ParserState.ERROR
    _, p = run([(C, struct.pack(">II", 8, 0x00020000))], eof=False)
    assert p.state is ParserState.ERROR and "not 3.x" in p.error
    _, p = run([(C, struct.pack(">II", 100_000, 196608))], eof=False)
    assert p.state is ParserState.ERROR


# --- fuzzing ------------------------------------------------------------------------------

def _golden_streams() -> list[tuple[Direction, bytes]]:
    exp = _expected()
    (flow, *_) = pg_flows(SESSION, exp["port"])
    return [(c.direction, c.data) for c in flow.chunks]


def fuzz_one(data: bytes) -> None:
    """One fuzz execution (the fuzz command drives this with 10^6 inputs): the input is
    cut into steps; each step's first byte picks direction and kind (data, gap, skip,
    eof). Nothing may escape; the state is one of three; buffers stay bounded."""
    p = PgsqlParser()
    pos = 0
    t = 0
    while pos < len(data):
        op = data[pos]
        n = data[pos + 1] if pos + 1 < len(data) else 0
        chunk = data[pos + 2:pos + 2 + n]
        pos += 2 + n
        d = C if op & 1 else S
        t += 1
        kind = (op >> 1) % 16
        if kind == 0:
            p.receive_gap(d, n, t)
        elif kind == 1:
            p.receive_skip(d, max(n, p.skip_hint(d)), t)
        elif kind == 2:
            p.receive_eof(d, t)
        else:
            p.receive_data(d, chunk, t)
        while p.next_event() is not NEED_DATA:
            pass
        p.skip_hint(d)
        assert p.state in (ParserState.OK, ParserState.DONE, ParserState.ERROR)
        assert all(len(b) <= pgsql.MAX_STARTUP + pgsql.MAX_KEPT + 5 + 255 for b in p._buf)
        assert len(p._pending) <= pgsql.MAX_PENDING
    p.summary()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_fuzz_random_steps(data):
    fuzz_one(data)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutated_real_conversation(data):
    steps = _golden_streams()
    i = data.draw(st.integers(0, len(steps) - 1))
    d, payload = steps[i]
    at = data.draw(st.integers(0, len(payload) - 1))
    new = bytearray(payload)
    new[at] = data.draw(st.integers(0, 255))
    steps[i] = (d, bytes(new))
    events, p = run(steps)
    assert p.state in (ParserState.DONE, ParserState.ERROR)
    assert all(isinstance(e, Transaction) for e in events)


# --- live: a real PostgreSQL 15 and psycopg -------------------------------------------------

def _live_tools() -> bool:
    from tests.fixtures.gen_pgsql import BIN
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return False
    return (BIN / "initdb").exists() and bool(shutil.which("tcpdump")) and bool(shutil.which("runuser"))


@pytest.mark.skipif(not _live_tools(), reason="needs postgresql 15, psycopg and tcpdump (make install)")
def test_live_psycopg_queries_and_errors(tmp_path):
    import psycopg

    from tests.fixtures.gen_pgsql import PgServer

    statements = [f"SELECT {i} AS n, 'row {i}' AS label" for i in range(100)]
    bad = [("SELECT * FROM nowhere", "42P01"), ("SELECT 1/0", "22012"), ("SELEC 1", "42601")]
    big = "SELECT g, repeat('x', 20) FROM generate_series(1, 100000) g"
    pcap = tmp_path / "live.pcap"
    with PgServer() as server:
        with capture_lo(pcap, server.port):
            with psycopg.connect(server.dsn(sslmode="disable", gssencmode="disable"),
                                 autocommit=True) as conn:
                cur = conn.cursor()
                for i, sql in enumerate(statements):
                    cur.execute(sql if i % 2 else sql + " WHERE %s", None if i % 2 else (True,))
                    assert cur.fetchall() == [(i, f"row {i}")]
                for sql, state in bad:
                    with pytest.raises(psycopg.Error) as exc:
                        cur.execute(sql)
                    assert exc.value.sqlstate == state
                cur.execute(big)
                assert cur.rowcount == 100_000
                cur.fetchall()
        (flow,) = pg_flows(pcap, server.port)
    # Engine-like: after each delivered chunk, bytes the parser hints at are not delivered.
    p = PgsqlParser()
    out = []
    skipped = delivered = 0
    owed = [0, 0]
    for ch in flow.chunks:
        data = ch.data
        if owed[ch.direction]:
            n = min(owed[ch.direction], len(data))
            p.receive_skip(ch.direction, n, ch.ts_ns)
            owed[ch.direction] -= n
            skipped += n
            data = data[n:]
        if data:
            p.receive_data(ch.direction, data, ch.ts_ns)
            delivered += len(data)
        owed[ch.direction] = p.skip_hint(ch.direction)
        while (ev := p.next_event()) is not NEED_DATA:
            out.append(ev.detail)
    for d in (C, S):
        p.receive_eof(d, flow.chunks[-1].ts_ns)
    out += [e.detail for e in iter(p.next_event, NEED_DATA)]
    assert p.state is ParserState.DONE, p.error
    assert out[0].kind == "startup" and out[0].auth == "SCRAM-SHA-256"
    queries = out[1:]
    expected = [s if i % 2 else s + " WHERE $1" for i, s in enumerate(statements)]
    assert [q.statement for q in queries[:100]] == expected
    assert all((q.command_tag, q.rows, q.data_rows, q.columns) == ("SELECT 1", 1, 1, 2)
               for q in queries[:100])
    assert [q.kind for q in queries[:100]] == ["execute" if i % 2 == 0 else "query"
                                               for i in range(100)]
    assert [(q.statement, q.sqlstate) for q in queries[100:103]] == bad
    last = queries[103]
    assert (last.statement, last.rows, last.command_tag) == (big, 100_000, "SELECT 100000")
    assert last.data_rows == 100_000   # every header seen: only row bodies were skipped
    assert len(queries) == 104
    assert skipped > 0 and max(len(b) for b in p._buf) == 0
