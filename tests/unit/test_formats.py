"""The record encoders: the one JSON shape (dict and fast bytes agree, ISO companions,
exact integers), EVE's field names, and Zeek TSV read back the way zeek-cut reads it."""

from __future__ import annotations

import datetime as dt
import io
import json

import pytest

from sensor import model
from sensor.errors import ConfigError
from sensor.export import formats, jsonfmt
from tests.export.records import ALL_KINDS


@pytest.mark.parametrize("record", ALL_KINDS, ids=model.record_kind)
def test_fast_json_line_equals_to_dict_and_round_trips(record):
    d = jsonfmt.to_dict(record)
    assert json.loads(formats.json_line(record)) == d
    assert list(json.loads(formats.json_line(record))) == list(d)
    assert jsonfmt.from_dict(json.loads(formats.json_line(record))) == record


def test_iso_companions_match_the_exact_integers():
    for record in ALL_KINDS:
        d = jsonfmt.to_dict(record)
        for key, field in formats.COMPANIONS[d["type"]]:
            if d[field]:
                parsed = dt.datetime.fromisoformat(d[key])
                assert int(parsed.timestamp()) == d[field] // 10**9
                assert parsed.microsecond == d[field] % 10**9 // 1000
            else:
                assert d[key] is None
    assert formats.iso(1_700_000_000_123_456_789) == "2023-11-14T22:13:20.123456Z"


def test_eve_uses_suricata_names():
    flow, http, dns, tls = (next(r for r in ALL_KINDS if model.record_kind(r) == k)
                            for k in ("flow", "http", "dns", "tls"))
    f = formats.eve(flow)
    assert f["event_type"] == "flow" and f["proto"] == "TCP"
    assert {"src_ip", "src_port", "dest_ip", "dest_port", "community_id", "flow_id"} <= set(f)
    assert f["flow"]["pkts_toserver"] == flow.initiator_packets
    assert f["timestamp"].endswith("+0000")
    h = formats.eve(http)
    assert h["http"]["http_method"] == http.detail.method and h["http"]["url"] == http.detail.path
    assert h["flow_id"] == formats.flow_id(http.uid)
    d = formats.eve(dns)["dns"]
    assert d["rrname"] == dns.detail.qname and d["rcode"] == formats.rcode_name(dns.detail.rcode)
    t = formats.eve(tls)["tls"]
    assert t["sni"] == tls.detail.sni and t["version"].startswith("TLS 1.")


def _read_zeek(text: str) -> list[dict]:
    """What zeek-cut does: every #fields line sets the columns of the lines after it."""
    rows, fields, path = [], None, None
    for line in text.splitlines():
        if line.startswith("#fields\t"):
            fields = line.split("\t")[1:]
        elif line.startswith("#path\t"):
            path = line.split("\t")[1]
        elif not line.startswith("#"):
            rows.append({"_path": path, **dict(zip(fields, line.split("\t"), strict=True))})
    return rows


def test_zeek_stream_of_mixed_kinds_reads_back_per_log():
    out = io.StringIO()
    w = formats.ZeekWriter(out)
    for record in ALL_KINDS + ALL_KINDS[:1]:
        w.write(record)
    w.close()
    text = out.getvalue()
    assert text.startswith("#separator \\x09\n")
    rows = _read_zeek(text)
    assert [r["_path"] for r in rows] == ["conn", "conn", "http", "dns", "ssl", "conn"]
    assert w.skipped == 1   # the LostEvent: Zeek has no log for it
    conn = rows[0]
    flow = ALL_KINDS[0]
    assert conn["uid"] == flow.uid and conn["id.orig_h"] == flow.src_addr
    assert conn["orig_pkts"] == str(flow.initiator_packets) and conn["orig_bytes"] == "-"
    assert float(conn["ts"]) == pytest.approx(flow.flow_start_ns / 1e9)
    assert rows[2]["status_code"] == str(ALL_KINDS[2].detail.status)
    assert rows[3]["rcode_name"] == formats.rcode_name(ALL_KINDS[3].detail.rcode)
    assert rows[4]["version"] == "TLSv13" and rows[4]["server_name"] == "x.test"
    assert text.rstrip().splitlines()[-1].startswith("#close\t")


def test_fields_select_like_zeek_cut_and_reach_into_detail():
    out = io.StringIO()
    w = formats.RecordWriter(out, "json", ["type", "detail.status", "nope"])
    w.write(ALL_KINDS[2])
    assert json.loads(out.getvalue()) == {"type": "http", "detail.status": ALL_KINDS[2].detail.status,
                                          "nope": None}
    with pytest.raises(ConfigError, match="zeek-cut"):
        formats.RecordWriter(out, "zeek", ["uid"])
