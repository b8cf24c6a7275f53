"""The aggregation behind `loupe top`, fed the golden captures' real records and a
made-up arrival clock."""

from __future__ import annotations

import dataclasses
import json

import pytest

from collector import top_model as tm
from sensor import model
from sensor.export import jsonfmt
from tests.collector.conftest import REPO

T0 = 1_800_000_000 * tm.NS  # arrival clock: any origin will do


def golden() -> list[model.Record]:
    out = []
    for path in sorted((REPO / "tests" / "golden").glob("*.jsonl")):
        out += [jsonfmt.from_dict(json.loads(line)) for line in path.read_text().splitlines()]
    return out


def fed(records, now_ns: int = T0, **kw) -> tm.TopModel:
    m = tm.TopModel(**kw)
    for r in records:
        m.add(r, now_ns)
    return m


def rows(m: tm.TopModel, panel: str, now_ns: int = T0, **kw) -> dict:
    return {r[0]: r for r in m.panel(panel, now_ns, **kw).rows}


def col(panel: str, name: str) -> int:
    return [c.name for c in tm.COLUMNS[panel]].index(name)


def test_services_from_golden_records():
    m = fed(golden())
    s = {(r[0], r[1]): r for r in m.panel("services", T0).rows}
    # service, proto, req, req/s 10s, req/s 60s, 4xx, 5xx, p50, p95, flows
    assert s[("golden.test", "http")][2] == 2 and s[("golden.test", "http")][9] == 1
    assert s[("198.18.7.2", "http")][2:3] + s[("198.18.7.2", "http")][9:] == (2, 2)
    assert s[("tls.golden.test", "tls")][2] == 2 and s[("tls.golden.test", "tls")][9] == 2
    assert s[("split.golden.test", "tls")][2] == 1
    # big, golden x2 and missing (NXDOMAIN) asked of 198.18.0.2: 1 of 4 is a client error.
    dns = s[("198.18.0.2:53", "dns")]
    assert dns[2:] == (4, 0.4, 4 / 60, 25.0, 0.0, 2_000_000, 13_000_000, 3)
    # An HTTP server seen without a Host header is keyed by its address, as its flows.
    assert s[("198.18.0.2:8080", "http")][9] == 1
    # ICMPv6 router solicitations are traffic, not a service.
    assert not any(k[0].startswith("[ff02::2]") for k in s)


def test_talkers_by_pair_and_address_and_sort():
    recs = golden()
    m = fed(recs)
    flows = [r for r in recs if isinstance(r, model.Flow)]
    pair = [f for f in flows if (f.src_addr, f.dst_addr) == ("198.18.7.1", "198.18.7.2")]
    t = rows(m, "talkers")
    assert t["198.18.7.1 → 198.18.7.2"][1:4] == (
        len(pair), sum(f.initiator_packets + f.responder_packets for f in pair),
        sum(f.initiator_octets + f.responder_octets for f in pair))
    by_bytes = [r[0] for r in m.panel("talkers", T0).rows]
    by_name = [r[0] for r in m.panel("talkers", T0, sort=col("talkers", "hosts")).rows]
    assert by_bytes[:2] == ["198.18.7.1 → 198.18.7.2", "198.18.0.1 → 198.18.0.2"]
    assert by_name[:2] == ["198.18.0.1 → 198.18.0.2", "198.18.7.1 → 198.18.7.2"]
    # Reversed: smallest first.
    assert [r[0] for r in m.panel("talkers", T0, reverse=True).rows] == by_bytes[::-1]
    m.by_pair = False
    a = rows(m, "talkers")
    assert a["198.18.7.2"][1] == len([f for f in flows if "198.18.7.2" in (f.src_addr, f.dst_addr)])
    assert m.panel("talkers", T0).title == "Top talkers by address"


def test_endpoints_dns_errors_and_lost_from_golden_records():
    m = fed(golden())
    e = m.panel("endpoints", T0)
    assert e.rows[0][0] == "GET 198.18.7.2/index.html"  # slowest p95 first
    ep = {r[0]: r for r in e.rows}
    # The query string (with its redacted token) is not part of the endpoint.
    assert ep["POST golden.test/b"][1:] == (1, 1 / 60, 3_999_000, 3_999_000, 3_999_000, 201)
    assert rows(m, "dns") == {"missing.golden.test": ("missing.golden.test", "NXDOMAIN", 1, 1)}
    assert rows(m, "lost") == {"parser_error": ("parser_error", "-", 2, 2, 1),
                               "reassembly_gap": ("reassembly_gap", "-", 1, 1, 1)}


def test_loss_of_the_view_itself_is_counted_apart():
    m = fed(golden())
    assert m.view_lost == 0  # the sensors' loss is theirs, not the view's
    m.add(model.LostEvent(source=model.LostSource.SUBSCRIBER_SLOW.value, count=39,
                          interval_start_ns=1, interval_end_ns=2), T0)
    assert m.view_lost == 39
    assert rows(m, "lost")["subscriber_slow"][2] == 39


def _http(status: int, latency_ms: int, path: str = "/a", host: str = "golden.test"):
    base = next(r for r in golden() if isinstance(r, model.L7Event) and r.kind == "http")
    return dataclasses.replace(base, detail=dataclasses.replace(
        base.detail, status=status, latency_ns=latency_ms * 1_000_000, path=path, host=host))


def test_error_shares_and_windows_follow_arrival_time():
    m = tm.TopModel()
    for i, status in enumerate((200, 200, 404, 503, 500, 200, 200, 200, 200, 200)):
        m.add(_http(status, 10 + i), T0)
    svc = rows(m, "services")["golden.test"]
    assert svc[2:9] == (10, 1.0, 10 / 60, 10.0, 20.0, 14_000_000, 19_000_000)
    # 30 s later: out of the 10 s window, still in the 60 s one.
    svc = rows(m, "services", T0 + 30 * tm.NS)["golden.test"]
    assert svc[3:7] == (0.0, 10 / 60, 10.0, 20.0)
    # 61 s later: rates and shares have nothing to go on; totals stay.
    m.add(_http(200, 1), T0 + 61 * tm.NS)
    svc = rows(m, "services", T0 + 61 * tm.NS)["golden.test"]
    assert svc[2:7] == (11, 0.1, 1 / 60, 0.0, 0.0)
    assert m.records == 11 and m.records_per_s(T0 + 61 * tm.NS) == 0.1


def test_unknown_values_sort_last():
    m = tm.TopModel()
    m.add(_http(200, 5, host="a.test"), T0)
    m.add(dataclasses.replace(_http(200, 0, host="b.test")), T0)  # no latency measured
    names = [r[0] for r in m.panel("services", T0, sort=col("services", "p95")).rows]
    assert names == ["a.test", "b.test"]
    names = [r[0] for r in m.panel("services", T0, sort=col("services", "p95"), reverse=True).rows]
    assert names == ["a.test", "b.test"]


def test_eviction_keeps_heavy_keys_and_counts_what_it_drops():
    heavy = max((r for r in golden() if isinstance(r, model.Flow)),
                key=lambda f: f.initiator_octets + f.responder_octets)
    m = tm.TopModel(max_keys=200)
    m.add(heavy, T0)
    # A scan: 2000 one-off host pairs, each newer than the heavy pair's last flow.
    for i in range(2000):
        m.add(dataclasses.replace(heavy, src_addr=f"198.18.{i // 250}.{i % 250 + 1}",
                                  dst_addr="198.19.0.1", initiator_octets=1,
                                  responder_octets=1), T0 + i)
    p = m.panel("talkers", T0 + 2000)
    assert p.keys <= 200 and p.evicted == 2001 - p.keys
    assert p.rows[0][0] == f"{heavy.src_addr} → {heavy.dst_addr}"
    assert all(len(t.entries) <= 200 for t in m.tables.values())


def test_endpoint_paths_are_templated_and_bounded_per_host():
    assert tm.path_template("/item/8812?x=1") == "/item/:id"
    assert tm.path_template("/u/3f2c1a9e-0b7d-4c1e-9a2b-5d6e7f8a9b0c/x") == "/u/:id/x"
    assert tm.path_template("/static/app.js#top") == "/static/app.js"
    assert tm.path_template("") == "/"
    assert len(tm.path_template("/" + "a/" * 100)) == tm.PATH_CHARS
    m = tm.TopModel()
    for i in range(tm.PATHS_PER_HOST + 50):
        m.add(_http(200, 1, path=f"/p{i}/{i}"), T0)
    m.add(_http(200, 1, path="/p0/77", host="other.test"), T0)
    e = rows(m, "endpoints", limit=1000)
    assert e["GET golden.test/p0/:id"][1] == 1
    assert e["GET golden.test (other paths)"][1] == 50
    assert len([k for k in e if "golden.test" in k]) == tm.PATHS_PER_HOST + 1
    assert "GET other.test/p0/:id" in e


def test_percentile_and_cells():
    assert tm.percentile([], 50) is None
    assert tm.percentile([1, 2, 3, 4], 50) == 2 and tm.percentile([1, 2, 3, 4], 95) == 4
    assert tm.percentile(list(range(1, 101)), 95) == 95
    assert tm.format_cell(None, "ns") == "-"
    assert tm.format_cell(6_636_000, "ns") == "6.6 ms"
    assert tm.format_cell(575_000, "ns") == "575 µs"
    assert tm.format_cell(1536, "bytes") == "1.5 KiB"
    assert tm.format_cell(512, "bytes_rate") == "512 B/s"
    assert tm.format_cell(25.0, "pct") == "25.0%"
    assert tm.format_cell(12345, "int") == "12,345"
    assert tm.format_cell(1 / 60, "rate") == "0.02/s" and tm.format_cell(2.5, "rate") == "2.5/s"
    assert tm.format_cell(0.0, "rate") == "0/s"
    with pytest.raises(ValueError):
        tm.format_cell(1, "nope")
