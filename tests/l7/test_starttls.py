"""STARTTLS: SMTP, IMAP, POP3, FTP (sensor/l7/starttls.py) and the PostgreSQL and MySQL
SSLRequest hand-overs (sensor/l7/upgrade.py) give the TLS after the upgrade as TlsEvents.

Captures: tests/fixtures/gen_starttls.py (real clients against aiosmtpd, pyftpdlib,
PostgreSQL, and asyncio IMAP/POP3 servers using start_tls) and the MySQL parser's own
golden capture (PyMySQL with TLS against MariaDB). Oracles: what the client set (its SNI)
and saw (TLS version), and tshark's SNI and JA3 decoded with decode-as for the port.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from sensor.l7.base import NEED_DATA, Direction, ParserState
from sensor.l7.detect import PROTO_TCP, ParserRegistry, detect
from sensor.l7.mysql import MysqlEvent, MysqlParser
from sensor.l7.pgsql import PgsqlEvent, PgsqlParser
from sensor.l7.starttls import (MAX_COMMANDS, MAX_LINE, FtpParser, ImapParser, Pop3Parser,
                                SmtpParser)
from sensor.l7.tls import TlsEvent
from sensor.l7.upgrade import MAX_HELD
from tests.fixtures import gen_starttls
from tests.l7 import pcaputil
from tests.l7.harness import GOLDEN

DIR = GOLDEN / "starttls-parser"
EXPECTED = json.loads((DIR / "expected.json").read_text())
TEXT = {"smtp": SmtpParser, "imap": ImapParser, "pop3": Pop3Parser, "ftp": FtpParser}
TSHARK_DISSECTOR = {"smtp": "smtp", "imap": "imap", "pop3": "pop", "ftp": "ftp",
                    "pgsql": "pgsql"}
VERSIONS = {"TLSv1.3": 0x0304, "TLSv1.2": 0x0303}
C, S = Direction.TO_SERVER, Direction.TO_CLIENT


def tcp_flow(path: Path, port: int) -> pcaputil.L4Flow:
    (flow,) = [f for f in pcaputil.flows(path) if f.proto == 6 and f.dport == port]
    return flow


def details(parser, flow) -> list:
    return [t.detail for t in pcaputil.feed(parser, flow)]


def tshark_hellos(path: Path, port: int, dissector: str) -> list[tuple[str, str]]:
    out = subprocess.run(["tshark", "-r", str(path), "-d", f"tcp.port=={port},{dissector}",
                          "-Y", "tls.handshake.type == 1", "-T", "fields",
                          "-e", "tls.handshake.extensions_server_name",
                          "-e", "tls.handshake.ja3"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return [tuple(line.split("\t")) for line in out.splitlines()]


# --- the real captures ------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TEXT))
def test_text_protocols_give_the_tls_the_client_made(name):
    want = EXPECTED[name]
    parser = TEXT[name]()
    (tls,) = details(parser, tcp_flow(DIR / f"{name}.pcap", want["port"]))
    assert isinstance(tls, TlsEvent)
    assert tls.sni == want["sni"]                          # what the client library set
    assert tls.version == VERSIONS[want["tls_version"]]     # what its socket negotiated
    assert tls.ja4.startswith("t13d" if want["tls_version"] == "TLSv1.3" else "t12d")
    assert parser.upgraded and parser.state is ParserState.DONE
    assert parser.summary() == {"tls_sni": want["sni"], "tls_ja4": tls.ja4}
    if "cert_subject_cn" in want:   # FTP runs TLS 1.2: the certificate is in clear
        assert tls.cert_subject == f"CN={want['cert_subject_cn']}"


def test_pgsql_ssl_request_then_tls():
    # Also the regression for tls.py: PostgreSQL's server answers this ClientHello with a
    # HelloRetryRequest and its compatibility CCS; the real ServerHello follows in clear.
    want = EXPECTED["pgsql"]
    parser = PgsqlParser()
    got = details(parser, tcp_flow(DIR / "pgsql.pcap", want["port"]))
    assert got[0] == PgsqlEvent(kind="ssl_request", ssl_requested=True, accepted=True,
                                latency_ns=got[0].latency_ns)
    (tls,) = got[1:]
    assert (tls.sni, tls.version) == (want["sni"], VERSIONS[want["tls_version"]])
    assert tls.ja3s and tls.cipher and tls.ja4.startswith("t13d")
    assert parser.state is ParserState.DONE


def test_mysql_ssl_request_then_tls():
    spec = json.loads((GOLDEN / "mysql-parser" / "session.expected.json").read_text())
    flows = [f for f in pcaputil.flows(GOLDEN / "mysql-parser" / "session.pcap")
             if f.proto == 6 and f.dport == spec["server_port"]]
    found = 0
    for flow in flows:
        got = details(MysqlParser(), flow)
        if not any(isinstance(e, TlsEvent) for e in got):
            continue
        found += 1
        login, tls = got
        assert isinstance(login, MysqlEvent) and login.tls_requested
        assert tls.version == 0x0304 and tls.ja4.startswith("t13i") and tls.ja3s
        (hello,) = tshark_hellos(GOLDEN / "mysql-parser" / "session.pcap",
                                 spec["server_port"], "mysql")
        assert (tls.sni, tls.ja3) == hello
    assert found == 1   # tls_login() in tests/fixtures/gen_mysql.py


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sni_and_ja3_equal_tsharks(name):
    """tshark decodes the TLS after the upgrade when told the port's protocol. It lists
    every ClientHello: after a HelloRetryRequest (PostgreSQL here) the client's second
    hello, which we do not fingerprint (the first one names the client), equals the first
    in SNI and JA3 here, so every line must equal ours."""
    want = EXPECTED[name]
    path = DIR / f"{name}.pcap"
    parser = PgsqlParser() if name == "pgsql" else TEXT[name]()
    (tls,) = [e for e in details(parser, tcp_flow(path, want["port"]))
              if isinstance(e, TlsEvent)]
    hellos = tshark_hellos(path, want["port"], TSHARK_DISSECTOR[name])
    assert hellos and all(h == (tls.sni, tls.ja3) for h in hellos)


def replay_json(path: Path) -> list[dict]:
    out = subprocess.run([str(Path(".venv/bin/loupe").resolve()), "replay", str(path)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.parametrize("name", sorted(TEXT))
def test_loupe_replay_gives_the_tls_event_and_flow_fields(name):
    want = EXPECTED[name]
    records = replay_json(DIR / f"{name}.pcap")
    (tls,) = [r for r in records if r["type"] == "tls"]
    assert tls["detail"]["sni"] == want["sni"] and tls["dst_port"] == want["port"]
    (flow,) = [r for r in records if r["type"] == "flow" and r.get("app_proto")]
    assert flow["app_proto"] == name
    assert (flow["tls_sni"], flow["tls_ja4"]) == (want["sni"], tls["detail"]["ja4"])


# --- live: the real peers, now ----------------------------------------------------------------

@pytest.mark.skipif(gen_starttls.available() is not None,
                    reason=str(gen_starttls.available()))
@pytest.mark.parametrize("name", sorted(TEXT))
def test_live_upgrade(name, tmp_path):
    cert, key = gen_starttls.make_cert(tmp_path)
    pcap = tmp_path / f"{name}.pcap"
    run = getattr(gen_starttls, name)
    if name == "ftp":
        (tmp_path / "home").mkdir()
        want = run(cert, key, pcap, tmp_path / "home")
    else:
        want = run(cert, key, pcap)
    (tls,) = details(TEXT[name](), tcp_flow(pcap, want["port"]))
    assert (tls.sni, tls.version) == (want["sni"], VERSIONS[want["tls_version"]])


# --- the cleartext part, byte by byte -----------------------------------------------------------

def feed(parser, steps, eof=False) -> list:
    out = []
    for i, (d, data) in enumerate(steps):
        parser.receive_data(d, data, 1000 * (i + 1))
        while (t := parser.next_event()) is not NEED_DATA:
            out.append(t.detail)
    if eof:
        parser.receive_eof(C, 10**9)
        parser.receive_eof(S, 10**9)
        while (t := parser.next_event()) is not NEED_DATA:
            out.append(t.detail)
    return out


def client_hello() -> bytes:
    """The ClientHello of the SMTP capture (a real one, SNI mail.loupe.test)."""
    flow = tcp_flow(DIR / "smtp.pcap", EXPECTED["smtp"]["port"])
    stream = flow.stream(C)
    start = stream.index(b"STARTTLS\r\n") + len(b"STARTTLS\r\n")
    return stream[start:start + 5 + int.from_bytes(stream[start + 3:start + 5], "big")]


def test_refused_starttls_stays_cleartext_and_held_bytes_are_commands():
    p = SmtpParser()
    feed(p, [(S, b"220 mx ESMTP\r\n"), (C, b"EHLO me\r\n"), (S, b"250-mx\r\n250 STARTTLS\r\n"),
             (C, b"STARTTLS\r\nNOOP\r\n"), (S, b"454 TLS not available\r\n")])
    assert not p.upgraded and p.state is ParserState.OK
    feed(p, [(S, b"250 ok\r\n"), (C, b"MAIL FROM:<a@b>\r\n")])
    assert p.state is ParserState.DONE and p.note == "MAIL in cleartext"


def test_client_hello_fed_before_the_answer_is_held_then_parsed():
    # The engine hands over a batch direction by direction: the ClientHello may come in
    # right after STARTTLS, before the server's 220 is known.
    p = SmtpParser()
    feed(p, [(S, b"220 mx ESMTP\r\n"), (C, b"EHLO me\r\n"), (S, b"250 mx\r\n"),
             (C, b"STARTTLS\r\n" + client_hello())])
    assert p.state is ParserState.OK and not p.upgraded
    got = feed(p, [(S, b"220 go ahead\r\n")], eof=True)
    assert p.upgraded and [e.sni for e in got] == ["mail.loupe.test"]


def test_pipelined_replies_pair_in_order_and_multiline_replies_are_one():
    p = SmtpParser()
    feed(p, [(S, b"220-mx ESMTP\r\n220 more\r\n"), (C, b"EHLO a\r\nNOOP\r\nSTARTTLS\r\n"),
             (S, b"250-mx\r\n250-PIPELINING\r\n250 STARTTLS\r\n250 ok\r\n")])
    assert not p.upgraded
    got = feed(p, [(S, b"220 ready\r\n"), (C, client_hello())], eof=True)
    assert p.upgraded and got[0].sni == "mail.loupe.test"


def test_imap_literal_and_untagged_lines_and_tag_pairing():
    p = ImapParser()
    feed(p, [(S, b"* OK ready\r\n"), (C, b"a1 ID {5}\r\n"), (S, b"+ go\r\n"),
             (C, b"x y\r\n ()\r\na2 STARTTLS\r\n"),
             (S, b"* ID NIL\r\na1 OK done\r\n")])
    assert not p.upgraded
    got = feed(p, [(S, b"a2 OK Begin TLS\r\n"), (C, client_hello())], eof=True)
    assert p.upgraded and got[0].sni == "mail.loupe.test"


def test_pop3_multiline_capa_then_stls():
    p = Pop3Parser()
    feed(p, [(S, b"+OK hi\r\n"), (C, b"CAPA\r\n"), (S, b"+OK\r\nSTLS\r\n+OK not an answer\r\n"),
             (C, b"STLS\r\n"), (S, b".\r\n")])
    assert not p.upgraded
    feed(p, [(S, b"+OK go\r\n")])
    assert p.upgraded


def test_ftp_preliminary_and_multiline_replies():
    p = FtpParser()
    feed(p, [(S, b"120 soon\r\n220-welcome\r\nany text\r\n220 FTP ready\r\n"),
             (C, b"FEAT\r\n"), (S, b"211-Features:\r\n AUTH TLS\r\n211 End\r\n"),
             (C, b"AUTH TLS\r\n"), (S, b"234 AUTH TLS ok\r\n")])
    assert p.upgraded


def test_capture_started_after_the_greeting():
    p = SmtpParser()
    got = feed(p, [(C, b"STARTTLS\r\n"), (S, b"220 ready\r\n"), (C, client_hello())],
               eof=True)
    assert p.upgraded and got[0].sni == "mail.loupe.test"


@pytest.mark.parametrize("parser,steps", [
    (SmtpParser, [(S, b"220 mx\r\n"), (C, b"AUTH PLAIN AGxvdXBlAHB3LW11c3Qtbm90LWxlYWs=\r\n")]),
    (ImapParser, [(S, b"* OK hi\r\n"), (C, b"a1 LOGIN loupe pw-must-not-leak\r\n")]),
    (Pop3Parser, [(S, b"+OK hi\r\n"), (C, b"USER loupe\r\nPASS pw-must-not-leak\r\n")]),
    (FtpParser, [(S, b"220 FTP\r\n"), (C, b"USER loupe\r\nPASS pw-must-not-leak\r\n")]),
])
def test_credentials_in_cleartext_end_parsing_and_are_not_kept(parser, steps):
    p = parser()
    assert feed(p, steps) == []
    assert p.state is ParserState.DONE and "cleartext" in p.note
    held = repr([bytes(b) for b in p._buf]) + repr(bytes(p._held)) + repr(p.summary())
    assert "must-not-leak" not in held and "AGxvdXBl" not in held


def test_garbage_long_lines_and_too_many_commands():
    p = SmtpParser()
    feed(p, [(S, b"HTTP/1.1 200 OK\r\n")])
    assert p.state is ParserState.ERROR and "reply" in p.error
    p = ImapParser()
    feed(p, [(S, b"* OK " + b"x" * MAX_LINE)])
    assert p.state is ParserState.ERROR and "line over" in p.error
    p = Pop3Parser()
    feed(p, [(S, b"+OK hi\r\n"), (C, b"NOOP\r\n" * MAX_COMMANDS)])
    assert p.state is ParserState.DONE and "no upgrade" in p.note
    p = SmtpParser()
    feed(p, [(C, b"STARTTLS\r\n"), (C, b"\x16" * (MAX_HELD + 1))])
    assert p.state is ParserState.ERROR and "before the STARTTLS answer" in p.error


def test_gap_in_cleartext_is_an_error_and_tls_garbage_ends_in_error():
    p = Pop3Parser()
    feed(p, [(S, b"+OK hi\r\n")])
    p.receive_gap(C, 10, 5)
    assert p.state is ParserState.ERROR
    p = FtpParser()
    feed(p, [(S, b"220 FTP\r\n"), (C, b"AUTH TLS\r\n"), (S, b"234 ok\r\n"),
             (C, b"GET / HTTP/1.1\r\n")])
    assert p.state is ParserState.ERROR and p.error.startswith("TLS after AUTH TLS:")


def test_pgsql_client_bytes_before_the_answer_are_held():
    # Client stream first: SSLRequest then the ClientHello, before the server's 'S'.
    ssl = (8).to_bytes(4, "big") + (80877103).to_bytes(4, "big")
    p = PgsqlParser()
    feed(p, [(C, ssl + client_hello())])
    assert p.state is ParserState.OK
    got = feed(p, [(S, b"S")], eof=True)
    assert got[0].kind == "ssl_request" and got[0].accepted
    assert got[1].sni == "mail.loupe.test"


def test_pgsql_refused_ssl_then_cleartext_startup_held_meanwhile():
    ssl = (8).to_bytes(4, "big") + (80877103).to_bytes(4, "big")
    body = (3 << 16).to_bytes(4, "big") + b"user\x00bob\x00\x00"
    startup = (len(body) + 4).to_bytes(4, "big") + body
    p = PgsqlParser()
    feed(p, [(C, ssl + startup)])
    got = feed(p, [(S, b"N")], eof=True)
    assert [(e.kind, e.accepted) for e in got][:1] == [("ssl_request", False)]
    assert [e.user for e in got if e.kind == "startup"] == ["bob"]


# --- detection ---------------------------------------------------------------------------

@pytest.mark.parametrize("first,direction,port,want", [
    (b"220 mx.example ESMTP Postfix\r\n", S, 2525, "smtp"),
    (b"220 (vsFTPd 3.0.3) FTP\r\n", S, 2121, "ftp"),
    (b"* OK [CAPABILITY IMAP4rev1 STARTTLS] Dovecot ready.\r\n", S, 1143, "imap"),
    (b"+OK Dovecot ready.\r\n", S, 1110, "pop3"),
    (b"EHLO client.example\r\n", C, 2525, "smtp"),
    (b"220 hello\r\n", S, 25, "smtp"),       # no name in the greeting: the port says
    (b"220 hello\r\n", S, 21, "ftp"),
    (b"+OK\r\n", S, 6379, "redis"),           # a bare +OK is RESP, not a POP3 greeting
])
def test_detection(first, direction, port, want):
    kw = {"to_client": first} if direction == S else {"to_server": first}
    assert detect(protocol=PROTO_TCP, server_port=port, **kw) == want


def test_engine_creates_the_parsers_with_the_shared_options():
    reg = ParserRegistry()
    for name, cls in TEXT.items():
        assert type(reg.create(name, redact=False)) is cls


def test_registry_takes_parsers_that_make_another_kinds_events():
    from sensor.l7 import registry

    for name, cls in TEXT.items():
        spec = registry.get(name)
        assert spec.parser is cls and spec.event is None and spec.emits == (TlsEvent,)
        assert name not in registry.kind_names()   # no table or wire field of its own
    with pytest.raises(ValueError, match="event and parser come together"):
        registry.Protocol(name="x", parser=SmtpParser)
