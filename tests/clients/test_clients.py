"""Per-client behaviour (collector/clients): pcaps built with scapy, replayed into a real
collector (DuckDB and sqlite files in tmp_path) by two sensors, read back with
`loupe clients`, and again after a restart; the notices as Alerts; no planted credential
in any output."""

from __future__ import annotations

import contextlib
import io
import json

from collector.clients import alerts as client_alerts
from sensor import cli
from sensor.l7 import principal
from tests.clients.test_principal import BASIC, PASSWORD, SUB, TOKEN, USER
from tests.collector.conftest import start_collector  # noqa: F401 - fixture
from tests.fixtures.gen_golden import _tcp_conversation

T0 = 1_700_000_000


def _get(path: str, auth: str = "") -> bytes:
    extra = f"Authorization: {auth}\r\nCookie: sid=planted-cookie\r\n" if auth else ""
    return f"GET {path} HTTP/1.1\r\nHost: shop.test\r\n{extra}\r\n".encode()


def _resp(status: int, body: bytes = b"ok") -> bytes:
    return (f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def _capture(path, conversations) -> None:
    from scapy.utils import wrpcap

    pkts = []
    for i, (client, steps) in enumerate(conversations):
        pkts += _tcp_conversation(client, "198.18.0.20", 42000 + i, 80, steps,
                                  t0=T0 + i * 10.0)
    wrpcap(str(path), pkts)


def _clients(col, *extra) -> list[dict]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(["clients", "--collector", col.address, "--output", "json",
                         *extra]) == 0
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_clients_merge_across_sensors_and_survive_a_restart(tmp_path, start_collector):  # noqa: F811
    a, b = tmp_path / "a.pcap", tmp_path / "b.pcap"
    _capture(a, [("198.18.0.10", [(True, _get("/items/1", f"Bearer {TOKEN}")),
                                  (False, _resp(200)),
                                  (True, _get("/items/2")), (False, _resp(404)),
                                  (True, _get("/cart")), (False, _resp(500))]),
                 ("1.1.1.1", [(True, _get("/items/7")), (False, _resp(200))])])
    _capture(b, [("198.18.0.10", [(True, _get("/items/3", f"Basic {BASIC}")),
                                  (False, _resp(200))])])
    data = tmp_path / "data"
    col = start_collector(data_dir=data)
    for cap, sensor in ((a, "s1"), (b, "s2")):
        assert cli.main(["replay", "--no-progress", str(cap), "--geoip", "default",
                         "--sensor-id", sensor, "--collector", col.address]) == 0
    rows = {r["address"]: r for r in _clients(col)}
    local, public = rows["198.18.0.10"], rows["1.1.1.1"]
    assert (local["requests"], local["errors_4xx"], local["errors_5xx"]) == (4, 1, 1)
    assert local["error_rate"] == 0.5
    assert local["flows"] == 2 and local["sensors"] == ["s1", "s2"]
    assert local["endpoints"] == ["GET shop.test:80 /cart", "GET shop.test:80 /items/{id}"]
    assert local["octets_sent"] > 0 and local["octets_received"] > 0
    assert (local["country"], local["asn"]) == ("", 0)   # a namespace address: no geo
    # principals as salted hashes, credential kinds only
    assert local["principals"] == sorted([principal._hash("jwt", SUB),
                                          principal._hash("basic", USER)])
    assert local["auth"] == ["basic", "bearer", "cookie"] and public["principals"] == []
    assert (public["country"], public["city"], public["requests"]) == ("AU", "Research", 1)
    # filters: CIDR, country, the endpoints filter
    assert [r["address"] for r in _clients(col, "--address", "198.18.0.0/15")] == ["198.18.0.10"]
    assert [r["address"] for r in _clients(col, "--country", "au")] == ["1.1.1.1"]
    assert [r["address"] for r in _clients(col, "--http-path", "/cart")] == ["198.18.0.10"]
    notices = _clients(col, "--notices")
    assert sorted((n["kind"], n["address"]) for n in notices) == [
        ("new_client", "1.1.1.1"), ("new_client", "198.18.0.10")]
    # As Alert records through the collector's own ingest (every 10 s, or now)
    server = col.collector
    col.call(client_alerts.publish(server.writer, server.hub,
                                   server.clients.clients.take_alerts()))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(["tail", "--collector", col.address, "--format", "json",
                         "--alert-rule", "loupe-client-*"]) == 0
    alerts = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert sorted((a["rule_id"], a["src_addr"], a["sensor_id"], a["severity"])
                  for a in alerts) == [
        ("loupe-client-new", "1.1.1.1", "collector", "low"),
        ("loupe-client-new", "198.18.0.10", "collector", "low")]
    col.stop()

    col = start_collector(data_dir=data)
    again = {r["address"]: r for r in _clients(col)}
    assert again == rows
    assert len(_clients(col, "--notices")) == 2
    assert cli.main(["clients", "--collector", col.address, "--output", "csv"]) == 0
    col.stop()
    # no planted value in any output: the CLI's rows, the client store, the record store
    planted = [SUB, USER, PASSWORD, TOKEN, BASIC, "planted-cookie", "c2lnbmF0dXJlLXBsYW50ZWQ"]
    blobs = {"loupe clients": json.dumps(rows), "notices": json.dumps(notices)}
    blobs.update({p.name: p.read_bytes().decode("latin-1") for p in data.iterdir()
                  if p.is_file()})
    for name, blob in blobs.items():
        found = [v for v in planted if v in blob]
        assert not found, f"{name} holds {found}"
