"""TLS plaintext meets the rules: with [rules] on (the built-in set), an SQL injection sent
over HTTPS (curl -> nginx, two namespaces) is an HTTP event from the plaintext path, and
the rules engine the wire uses evaluates it: an Alert record of the sqli group, on the
event's flow (Community ID and uid), as it would be for the same request in clear text."""

from __future__ import annotations

import pytest

from tests.export.collector_proc import query, wait_for
from tests.live.rig import Sensor, stop, wait_tcp
from tests.live.test_tls_plaintext import _args, _curl_keepalive, _http_rows, pair  # noqa: F401
from tests.live.tls_peers import nginx

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(240)]

SQLI = "/items?id=1%27%20UNION%20SELECT%20username,password%20FROM%20users--"
ALERT_COLS = ("rule_id", "action", "community_id", "uid", "src_addr", "dst_port")


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
        out = _curl_keepalive(pair, [("GET", "/a.txt"), ("GET", SQLI)])
        assert out.stdout.split()[0::2] == ["200", "404"]
        wait_for(lambda: len(_http_rows(collector)) >= 2, 20, "2 plaintext HTTP events")
        wait_for(lambda: _alerts(collector), 20, "the Alert")
        assert sensor.stop() == 0
    finally:
        sensor.kill()
        stop(srv)
    rows = _http_rows(collector, ours=True)
    assert [r["path"] for r in rows] == ["/a.txt", SQLI]
    ours = [a for a in _alerts(collector) if a["community_id"] == rows[1]["community_id"]]
    assert {a["rule_id"] for a in ours} == {"loupe-sqli"}, _alerts(collector)
    assert {(a["uid"], a["src_addr"], a["dst_port"]) for a in ours} == {
        (rows[1]["uid"], pair.a.ip4, 443)}
