"""Geo and ASN enrichment (sensor/enrich/geo.py) on real database reads.

The City database is the one maxminddb-geolite2 ships (GeoLite2 City, build of
2018-07-03: the build is pinned below, so the answers are that file's). The addresses are
public ones whose country the registries publish: 8.8.8.8 and 2001:4860:4860::8888
(Google, ARIN, US) and 1.1.1.1 (APNIC's research prefix, AU). No PyPI package ships a
MaxMind-format ASN database, so the ASN file is written here in the GeoLite2-ASN layout
with mmdb-writer and read back by the same maxminddb reader. Traffic to these addresses
exists only inside a pcap that is replayed: nothing is sent.
"""

from __future__ import annotations

import json

import duckdb
import pyarrow.parquet as pq
import pytest

from sensor import cli
from sensor.enrich.geo import NOWHERE, GeoEnricher, Place
from sensor.errors import ConfigError
from tests.collector.conftest import start_collector  # noqa: F401 - fixture
from tests.fixtures.gen_golden import _tcp_conversation

BUILD_EPOCH = 1530653216   # GeoLite2-City in maxminddb-geolite2 2018.703
GOOGLE = 15169
CLOUDFLARE = 13335


@pytest.fixture(scope="module")
def asn_db(tmp_path_factory):
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    w = MMDBWriter(ip_version=6, database_type="GeoLite2-ASN", languages=["en"],
                   description={"en": "Loupe test ASN database"}, ipv4_compatible=True)
    w.insert_network(IPSet(["8.8.8.0/24", "2001:4860::/32"]),
                     {"autonomous_system_number": GOOGLE,
                      "autonomous_system_organization": "GOOGLE"})
    w.insert_network(IPSet(["1.1.1.0/24"]), {"autonomous_system_number": CLOUDFLARE,
                                             "autonomous_system_organization": "CLOUDFLARENET"})
    path = tmp_path_factory.mktemp("asn") / "asn.mmdb"
    w.to_db_file(str(path))
    return path


@pytest.fixture
def geo(asn_db):
    enricher = GeoEnricher.open("", str(asn_db))
    assert enricher._main.metadata().build_epoch == BUILD_EPOCH
    yield enricher
    enricher.close()


def test_packaged_city_database_and_asn_file(geo):
    assert geo.lookup("8.8.8.8") == Place("US", "", GOOGLE)
    assert geo.lookup("1.1.1.1") == Place("AU", "Research", CLOUDFLARE)
    assert geo.lookup("2001:4860:4860::8888") == Place("US", "Mountain View", GOOGLE)
    assert geo.lookup("::ffff:8.8.8.8") == Place("US", "", GOOGLE)
    assert geo.lookups == 4
    assert geo.lookup("8.8.8.8") == Place("US", "", GOOGLE)
    assert (geo.lookups, geo.cached) == (4, 1)


def test_addresses_that_are_not_global_get_no_geo(geo):
    for addr in ("198.18.0.1", "198.19.255.1", "10.1.2.3", "192.168.1.1", "127.0.0.1",
                 "100.64.0.1", "169.254.1.1", "fc00::1", "fd12::1", "::1", "fe80::1",
                 "192.0.2.1", "224.0.0.251"):
        assert geo.lookup(addr) is NOWHERE, addr
    assert geo.lookups == 0 and geo.not_global == 13


def test_a_bad_database_is_one_line(tmp_path):
    junk = tmp_path / "junk.mmdb"
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(ConfigError) as exc:
        GeoEnricher.open(str(junk))
    assert "not a readable MaxMind DB file" in str(exc.value)
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="no such file"):
        GeoEnricher.open("", str(tmp_path / "missing.mmdb"))


def _capture(path):
    from scapy.utils import wrpcap

    get = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    pkts = []
    # a client in the namespace range to a public server; a public client to a local
    # server (v4 and v6); two private ends
    for i, (cli_addr, srv, v6) in enumerate([
            ("198.18.0.10", "8.8.8.8", False), ("1.1.1.1", "198.18.0.20", False),
            ("fc00::10", "2001:4860:4860::8888", True), ("198.18.0.1", "198.18.0.2", False)]):
        pkts += _tcp_conversation(cli_addr, srv, 41000 + i, 80, [(True, get), (False, ok)],
                                  t0=1_700_000_000.0 + i, v6=v6)
    wrpcap(str(path), pkts)


def test_replay_enriches_flows_and_the_collector_stores_them(tmp_path, asn_db, capsys,
                                                             start_collector):  # noqa: F811
    cap = tmp_path / "geo.pcap"
    _capture(cap)
    out = tmp_path / "flows.parquet"
    assert cli.main(["replay", "--no-progress", str(cap), "--geoip", "default",
                     "--geoip-asn", str(asn_db), "-o", str(out)]) == 0
    want = {
        "8.8.8.8": ("", "", 0, "US", "", GOOGLE),
        "198.18.0.20": ("AU", "Research", CLOUDFLARE, "", "", 0),
        "2001:4860:4860::8888": ("", "", 0, "US", "Mountain View", GOOGLE),
        "198.18.0.2": ("", "", 0, "", "", 0),
    }
    cols = ("src_country", "src_city", "src_asn", "dst_country", "dst_city", "dst_asn")
    rows = [r for r in pq.read_table(out).to_pylist() if "dst_addr" in r]
    assert {r["dst_addr"]: tuple(r[c] for c in cols) for r in rows} == want

    col = start_collector()
    assert cli.main(["replay", "--no-progress", str(cap), "--geoip", "default",
                     "--geoip-asn", str(asn_db), "--collector", col.address]) == 0
    capsys.readouterr()
    for flags, dst in ((("--country", "us"), {"8.8.8.8", "2001:4860:4860::8888"}),
                       (("--asn", "AS13335"), {"198.18.0.20"}),
                       (("--not-country", "US", "--type", "flow"), {"198.18.0.20",
                                                                    "198.18.0.2"})):
        assert cli.main(["tail", "--collector", col.address, "--format", "json",
                         *flags]) == 0
        got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert {r["dst_addr"] for r in got} == dst, flags
    assert cli.main(["tail", "--collector", col.address, "--country", "USA"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    col.stop()
    db = duckdb.connect(str(col.config.data_dir / "loupe.duckdb"), read_only=True)
    stored = db.execute(f"SELECT dst_addr, {', '.join(cols)} FROM flows").fetchall()
    assert {r[0]: tuple(r[1:]) for r in stored} == want


def test_replay_refuses_a_bad_database_in_one_line(tmp_path, capsys):
    cap = tmp_path / "geo.pcap"
    _capture(cap)
    assert cli.main(["replay", "--no-progress", str(cap), "--geoip",
                     str(tmp_path / "none.mmdb")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file" in err[0], err


def test_sensor_config_opens_the_databases_or_refuses_in_one_line(tmp_path, asn_db):
    from sensor import config as cfg
    from sensor.sensor_cli import geo_enricher

    off = cfg.parse_config("sensor", {}, source="test")
    assert geo_enricher(off) is None
    on = cfg.parse_config("sensor", {"geoip": {"enabled": True, "asn_database": str(asn_db)}},
                          source="test")
    geo = geo_enricher(on)
    try:
        assert geo.lookup("8.8.8.8") == Place("US", "", GOOGLE)
    finally:
        geo.close()
    bad = cfg.parse_config("sensor", {"geoip": {"enabled": True,
                                                "database": str(tmp_path / "no.mmdb")}},
                           source="test")
    with pytest.raises(ConfigError, match=r"\[geoip\] database .*no such file"):
        geo_enricher(bad)
    with pytest.raises(cfg.ConfigError, match="absolute path"):
        cfg.parse_config("sensor", {"geoip": {"database": "rel.mmdb"}}, source="test")
