"""Rule evaluation: AWS WAF rule-group semantics, conditions and operators, thresholds
(credential stuffing, enumeration, scanner 404s), verdicts and reloading."""

from __future__ import annotations

import pytest

from sensor.rules import engine
from tests.rules.helpers import BASE, event, request, rules

SEMANTICS = """
default_action = "block"

[[rule]]
id = "count-api"
priority = 1
action = "count"
field = "path"
op = "prefix"
value = "/api/"

[[rule]]
id = "alert-admin"
priority = 2
action = "alert"
field = "path"
op = "contains"
value = "admin"

[[rule]]
id = "allow-internal"
priority = 3
action = "allow"
field = "src"
op = "cidr"
value = "198.18.7.0/24"

[[rule]]
id = "block-delete"
priority = 4
action = "block"
field = "method"
op = "equals"
value = "DELETE"

[[rule]]
id = "allow-api"
priority = 5
action = "allow"
log = true
field = "path"
op = "prefix"
value = "/api/"
"""


def test_priority_count_and_first_terminal_action(tmp_path):
    e = engine.Engine(rules(tmp_path, SEMANTICS))
    # count and alert go on; block at priority 4 decides before the allow at 5.
    verdict, alerts = e.evaluate(event(1, method="DELETE", path="/api/admin/x"))
    assert (verdict.action, verdict.rule_id) == ("block", "block-delete")
    assert [(a.rule_id, a.action) for a in alerts] == [
        ("count-api", "count"), ("alert-admin", "alert"), ("block-delete", "block")]
    # An allow decides silently unless the rule sets log = true (as allow-api does).
    verdict, alerts = e.evaluate(event(2, method="GET", path="/api/x", src="198.18.7.9"))
    assert (verdict.action, verdict.rule_id) == ("allow", "allow-internal")
    assert [a.rule_id for a in alerts] == ["count-api"]
    verdict, alerts = e.evaluate(event(3, method="GET", path="/api/x"))
    assert (verdict.action, verdict.rule_id) == ("allow", "allow-api")
    assert [a.rule_id for a in alerts] == ["count-api", "allow-api"]
    # Nothing terminal matched: the default action.
    verdict, alerts = e.evaluate(event(4, path="/home"))
    assert (verdict.action, verdict.rule_id, alerts) == ("block", "", [])


def test_file_order_breaks_priority_ties_and_priority_beats_file_order(tmp_path):
    rs = rules(tmp_path, """
[[rule]]
id = "late"
priority = 9
action = "block"
field = "path"
op = "equals"
value = "/x"
[[rule]]
id = "early"
priority = 1
action = "allow"
field = "path"
op = "equals"
value = "/x"
[[rule]]
id = "tie"
priority = 1
action = "block"
field = "path"
op = "equals"
value = "/x"
""")
    verdict, _ = engine.Engine(rs).evaluate(event(1, path="/x"))
    assert verdict.rule_id == "early"


def test_operators_over_request_fields(tmp_path):
    rs = rules(tmp_path, """
[[rule]]
id = "ua-regex"
action = "alert"
field = "header:user-agent"
op = "regex"
value = "(?i)^curl/[0-9.]+$"
[[rule]]
id = "arg-range"
action = "alert"
match = [ { field = "arg:page", op = "equals", value = ["9999"] },
          { field = "method", op = "equals", value = "GET" } ]
[[rule]]
id = "cookie-sqli"
action = "alert"
field = "cookies"
op = "sqli"
[[rule]]
id = "json-body"
action = "alert"
field = "body:user.role"
op = "equals"
value = "admin"
nocase = true
[[rule]]
id = "status-5xx"
action = "alert"
field = "status"
op = "range"
value = [500, 599]
[[rule]]
id = "not-internal"
action = "alert"
match = [ { field = "src", op = "cidr", value = ["10.0.0.0/8"], negate = true },
          { field = "path", op = "prefix", value = "/internal" } ]
""")
    e = engine.Engine(rs)
    raw = request("POST", "/internal/x?page=9999", {"User-Agent": "curl/8.5.0",
                  "Cookie": "sid=1' or '1'='1", "Content-Type": "application/json"},
                  b'{"user": {"role": "ADMIN"}}')
    _, alerts = e.evaluate(event(1, method="POST", path="/internal/x", status=503), raw)
    fired = {a.rule_id: a for a in alerts}
    assert set(fired) == {"ua-regex", "cookie-sqli", "json-body", "status-5xx", "not-internal"}
    assert fired["cookie-sqli"].field == "cookie:sid"
    assert fired["cookie-sqli"].excerpt == "REDACTED"       # cookie values never copied
    assert fired["json-body"].excerpt == "ADMIN"
    _, alerts = e.evaluate(event(2, path="/internal/x?page=9999"),
                           request("GET", "/internal/x?page=9999"))
    assert "arg-range" in {a.rule_id for a in alerts}


def test_fields_of_other_kinds(tmp_path):
    from sensor.model import DnsEvent, L7Event, TlsEvent

    rs = rules(tmp_path, """
[[rule]]
id = "dns"
action = "alert"
field = "dns.qname"
op = "suffix"
value = ".evil.test"
[[rule]]
id = "sni"
action = "alert"
field = "tls.sni"
op = "regex"
value = "^[a-z0-9]{30,}\\\\."
""")
    e = engine.Engine(rs)
    dns = L7Event(uid="D1", ts_ns=BASE, src_addr="198.18.5.1", dst_addr="198.18.5.53",
                  protocol=17, detail=DnsEvent(qname="x.evil.test", qtype=1))
    tls = L7Event(uid="T1", ts_ns=BASE, src_addr="198.18.5.1", dst_addr="198.18.5.2",
                  protocol=6, detail=TlsEvent(sni="a" * 40 + ".example.test"))
    assert [a.rule_id for a in e.evaluate(dns)[1]] == ["dns"]
    assert [a.rule_id for a in e.evaluate(tls)[1]] == ["sni"]
    # HTTP rules on a DNS event: no value, no match, no error.
    assert engine.Engine(rules(tmp_path, '[[rule]]\nid="m"\naction="alert"\nfield="method"\n'
                               'value="GET"\n', "m.toml")).evaluate(dns)[1] == []


def test_managed_group_modes(tmp_path):
    rs = rules(tmp_path, """
[[group]]
name = "sqli"
mode = "block"
priority = 10
[[group]]
name = "xss"
mode = "count"
priority = 5
""")
    e = engine.Engine(rs)
    raw = request("GET", "/search?q=%3Cscript%3Ealert(1)%3C/script%3E&id=1%20union%20select%201,2")
    verdict, alerts = e.evaluate(event(1), raw)
    assert [(a.rule_id, a.action, a.category) for a in alerts] == [
        ("loupe-xss", "count", "cross-site-scripting"),
        ("loupe-sqli", "block", "sql-injection")]
    assert verdict.action == "block"
    assert alerts[1].field == "arg:id" and alerts[1].excerpt == "1 union select 1,2"
    verdict, alerts = e.evaluate(event(2), request("GET", "/search?q=union+of+workers"))
    assert (verdict.action, alerts) == ("allow", [])
    # Without the raw request (inspection off) a group cannot judge: no alert.
    assert e.evaluate(event(3))[1] == []


THRESHOLDS = """
[[rule]]
id = "stuffing"
action = "block"
match = [ { field = "path", op = "prefix", value = "/login" },
          { field = "status", op = "range", value = [401, 403] } ]
[rule.threshold]
count = 5
window = "60s"
by = "src+endpoint"

[[rule]]
id = "stuffing-many"
action = "alert"
match = [ { field = "path", op = "prefix", value = "/login" },
          { field = "status", op = "range", value = [401, 403] } ]
[rule.threshold]
count = 8
window = "60s"
by = "endpoint"

[[rule]]
id = "enum"
action = "alert"
field = "method"
value = "GET"
[rule.threshold]
count = 10
window = "60s"
by = "src+template"
distinct = "id"
"""


def test_credential_stuffing_one_source_and_many(tmp_path):
    e = engine.Engine(rules(tmp_path, THRESHOLDS))
    fired, verdicts = [], []
    for i in range(7):   # one source, 7 failures: alert at the 5th, block from then on
        v, alerts = e.evaluate(event(i, method="POST", path="/login", status=401,
                                     ts_ns=BASE + i * 10**9))
        fired += [(i, a.rule_id, a.count) for a in alerts]
        verdicts.append(v.action)
    assert fired == [(4, "stuffing", 5)]
    assert verdicts == ["allow"] * 4 + ["block"] * 3
    # Many sources, one or two failures each: only the endpoint-wide rule sees it.
    for i in range(8):
        _, alerts = e.evaluate(event(100 + i, method="POST", path="/login", status=403,
                                     src=f"198.18.6.{i + 1}", ts_ns=BASE + i * 10**9))
        fired += [(i, a.rule_id, a.count) for a in alerts]
    # The endpoint rule comes after the blocking one: it saw the first source's first 4
    # failures (the 5th on was blocked, which ends evaluation), then 4 of these.
    assert [f for f in fired if f[1] == "stuffing-many"] == [(3, "stuffing-many", 8)]
    # Successful logins and other paths are not counted; a new window starts over.
    v, alerts = e.evaluate(event(200, method="POST", path="/login", status=200,
                                 ts_ns=BASE + 10 * 10**9))
    assert (v.action, alerts) == ("allow", [])
    v, _ = e.evaluate(event(201, method="POST", path="/login", status=401,
                            ts_ns=BASE + 120 * 10**9))
    assert v.action == "allow"


def test_enumeration_counts_distinct_ids_on_one_template(tmp_path):
    e = engine.Engine(rules(tmp_path, THRESHOLDS))
    fired = []
    # The same id again and again is not enumeration.
    for i in range(30):
        fired += e.evaluate(event(i, path="/api/v1/users/7/orders", ts_ns=BASE + i))[1]
    assert fired == []
    for i in range(12):
        fired += e.evaluate(event(i, path=f"/api/v1/users/{1000 + i}/orders", ts_ns=BASE + i))[1]
    assert [(a.rule_id, a.field, a.excerpt, a.count) for a in fired] == [
        ("enum", "path", "/api/v1/users/{id}/orders", 10)]
    # Another client walking the same template has its own count.
    other = [a for i in range(9) for a in e.evaluate(event(
        i, path=f"/api/v1/users/{i}/orders", src="198.18.5.77", ts_ns=BASE + i))[1]]
    assert other == []


def test_template():
    assert engine.template("/api/v1/users/42/orders/7") == ("/api/v1/users/{id}/orders/{id}", "42/7")
    assert engine.template("/files/3f2c1a9e-1111-2222-3333-444455556666") == \
        ("/files/{id}", "3f2c1a9e-1111-2222-3333-444455556666")
    assert engine.template("/static/app.v2.js") == ("/static/app.v2.js", "")


def test_threshold_state_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "MAX_KEYS", 10)
    e = engine.Engine(rules(tmp_path, THRESHOLDS))
    for i in range(50):
        e.evaluate(event(i, method="POST", path="/login", status=401, src=f"198.18.8.{i + 1}"))
    assert len(e._windows) <= 10
    assert e.stats.threshold_keys_evicted > 0


def test_analyzer_verdicts_capture_and_reload(tmp_path):
    emitted, verdicts = [], []
    rs = rules(tmp_path, """
[body]
max_bytes = 100
paths = ["/api/"]
[[rule]]
id = "b"
action = "block"
field = "path"
op = "prefix"
value = "/admin"
""")
    a = engine.Analyzer(rs, emitted.append, on_verdict=verdicts.append)
    a(event(1, path="/admin/x"), None)
    a(event(2, path="/home"), None)
    assert [x.rule_id for x in emitted] == ["b"]
    assert [(v.action, v.rule_id, v.event.uid) for v in verdicts] == [("block", "b", "C1")]
    # Bodies: only on the selected paths, only form/JSON/XML/text, never for GET.
    assert a.capture("POST", "/api/login", "application/json") == 100
    assert a.capture("POST", "/api/upload", "application/octet-stream") == 0
    assert a.capture("POST", "/other", "application/x-www-form-urlencoded") == 0
    assert a.capture("GET", "/api/x", "") == 0
    a.reload(rules(tmp_path, '[[rule]]\nid="c"\naction="alert"\nfield="path"\nop="prefix"\n'
                   'value="/home"\n', "other.toml"))
    a(event(3, path="/home"), None)
    assert [x.rule_id for x in emitted] == ["b", "c"] and a.reloads == 1
    assert a.engine.stats.events == 3   # counters carry over a reload


@pytest.mark.parametrize("name,value,expected", [
    ("arg:password", "x' or 1=1--", "REDACTED"),
    ("cookie:sid", "abc", "REDACTED"),
    ("header:authorization", "Basic abc", "REDACTED"),
    ("uri", "/login?token=s3cret&q=1", "/login?token=REDACTED&q=1"),
    ("arg:q", "a\r\nb", "a\\r\\nb"),
    ("arg:q", "x" * 1000, "x" * 253 + "..."),
])
def test_excerpts_are_bounded_and_redacted(name, value, expected):
    assert engine.excerpt(name, value) == expected
