"""TLS plaintext meets the rules: with [rules] on (the built-in set), SQL injections sent
over HTTPS (curl -> nginx, two namespaces), in a query argument and in a form body, are
HTTP events from the plaintext path, and the rules engine the wire uses evaluates them:
an Alert of the sqli group for each, on the event's flow (Community ID and uid), as for
the same requests in clear text; the clean request beside them raises nothing."""

from __future__ import annotations

import pytest

from tests.export.collector_proc import query, wait_for
from tests.live.rig import Sensor, stop, wait_tcp
from tests.live.test_tls_plaintext import _args, _http_rows, pair  # noqa: F401
from tests.live.tls_peers import nginx

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(240)]

SQLI = "/items?id=1%27%20UNION%20SELECT%20username,password%20FROM%20users--"
BODY = "id=1%27+OR+%271%27%3D%271%27+UNION+SELECT+password+FROM+users--"
ALERT_COLS = ("rule_id", "field", "community_id", "uid", "src_addr", "dst_port")


def _alerts(collector) -> list[dict]:
    rows = query(collector.address, f"SELECT {', '.join(ALERT_COLS)} FROM alerts "
                                    f"ORDER BY ts_ns")
    return [dict(zip(ALERT_COLS, r)) for r in rows]


def test_sqli_over_https_alerts(pair, collector, tmp_path):
    srv = nginx(pair.b, tmp_path)
    sensor = Sensor(_args(pair, collector, tmp_path, "--set", "rules.enabled=true",
                          "--set", "rules.path=default"), workdir=tmp_path)
    try:
        wait_tcp(pair.a, pair.b.ip4, 443)
        sensor.start()
        url = f"https://{pair.b.ip4}"
        out = pair.a.run("curl", "-sk", "--http1.1", "-o", "/dev/null", "-w", "%{http_code}\\n",
                         f"{url}/a.txt", "--next", "-sk", "--http1.1", "-o", "/dev/null",
                         "-w", "%{http_code}\\n", f"{url}{SQLI}", "--next", "-sk", "--http1.1",
                         "-o", "/dev/null", "-w", "%{http_code}\\n", "--data", BODY,
                         f"{url}/post", timeout=60)
        assert out.stdout.split() == ["200", "404", "200"]
        wait_for(lambda: len(_http_rows(collector)) >= 3, 20, "3 plaintext HTTP events")
        wait_for(lambda: len(_alerts(collector)) >= 2, 20, "the Alerts")
        assert sensor.stop() == 0
    finally:
        sensor.kill()
        stop(srv)
    rows = _http_rows(collector, ours=True)
    assert [r["path"] for r in rows] == ["/a.txt", SQLI, "/post"]
    ours = [a for a in _alerts(collector) if a["community_id"] == rows[1]["community_id"]]
    # One for the query argument, one for the form body (the request body prefix the
    # rules ask the HTTP/1 parser to keep); none for the clean request.
    assert sorted((a["rule_id"], a["field"]) for a in ours) == [
        ("loupe-sqli", "arg:id"), ("loupe-sqli", "body:id")], _alerts(collector)
    assert {(a["uid"], a["src_addr"], a["dst_port"]) for a in ours} == {
        (rows[1]["uid"], pair.a.ip4, 443)}
