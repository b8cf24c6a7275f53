"""The console's SQL pages (alerts and geo, collector/ui/data.py) on ClickHouse: the same
captures replayed into a collector on DuckDB and into one on a real clickhouse-server
give the same rows, and the rows are the ones the captures hold."""

from __future__ import annotations

from pathlib import Path

from collector.ui import data
from sensor import cli
from sensor.config import ClickHouseConfig, StorageConfig
from tests.collector.conftest import start_collector  # noqa: F401 - fixture
from tests.geo.test_geo import CLOUDFLARE, GOOGLE, asn_db  # noqa: F401 - fixture
from tests.storage.conftest import clickhouse_server  # noqa: F401 - fixture

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
RULES = ('[[rule]]\nid = "console-curl"\naction = "alert"\nfield = "header:user-agent"\n'
         'op = "contains"\nvalue = "golden-curl"\n')


def _pages(col, geo_pcap: Path, rules: Path, asn: Path) -> dict:
    before = data.geo(col.collector)
    for args in (["--rules", str(rules), str(GOLDEN / "curl-http.pcap")],
                 ["--geoip", "default", "--geoip-asn", str(asn), str(geo_pcap)]):
        assert cli.main(["replay", "--no-progress", "--collector", col.address, *args]) == 0
    return {"before": before, "alerts": data.alerts(col.collector),
            "one_rule": data.alerts(col.collector, "console-curl"),
            "no_rule": data.alerts(col.collector, "nothing-such"),
            "bad_rule": data.alerts(col.collector, "x' OR 1=1 --"),
            "geo": data.geo(col.collector)}


def test_alerts_and_geo_pages_answer_the_same_on_clickhouse(
        tmp_path, start_collector, clickhouse_server, asn_db):  # noqa: F811
    from tests.geo.test_geo import _capture as geo_capture

    geo_pcap, rules = tmp_path / "geo.pcap", tmp_path / "rules.toml"
    geo_capture(geo_pcap)
    rules.write_text(RULES)
    pages = {}
    for name, storage in (
            ("duckdb", StorageConfig()),
            ("clickhouse", StorageConfig(backend="clickhouse", clickhouse=ClickHouseConfig(
                port=clickhouse_server.port, database="console")))):
        col = start_collector(data_dir=tmp_path / name, storage=storage)
        pages[name] = _pages(col, geo_pcap, rules, asn_db)
        col.stop()
    duck, click = pages["duckdb"], pages["clickhouse"]

    assert click["before"] == {"missing": data.NO_GEO}
    assert [(r["rule_id"], r["action"], r["n"]) for r in click["alerts"]["rules"]] == [
        ("console-curl", "alert", 2)]
    assert len(click["one_rule"]["alerts"]) == 2
    assert {a["rule_id"] for a in click["one_rule"]["alerts"]} == {"console-curl"}
    assert click["no_rule"]["alerts"] == []
    assert click["bad_rule"] == {"alerts": [], "rules": []}   # never reaches the SQL
    countries = {r["key"]: r["flows"] for r in click["geo"]["countries"]}
    assert (countries["US"], countries["AU"]) == (2, 1)
    cities = {(r["country"], r["city"]): r["flows"] for r in click["geo"]["cities"]}
    assert cities[("US", "Mountain View")] == 1 and cities[("AU", "Research")] == 1
    assert [(a["key"], a["flows"]) for a in click["geo"]["asns"]] == [(GOOGLE, 2), (CLOUDFLARE, 1)]
    # enforced is a bool, as from DuckDB (a ClickHouse before 22.3 stores UInt8).
    assert {type(a["enforced"]) for a in click["alerts"]["alerts"]} == {bool}
    # Row for row what DuckDB answers, types included.
    for page in ("before", "alerts", "one_rule", "no_rule", "bad_rule", "geo"):
        assert click[page] == duck[page], page
        assert _types(click[page]) == _types(duck[page]), page


def _types(value):
    if isinstance(value, dict):
        return {k: _types(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_types(v) for v in value]
    return type(value).__name__
