"""The statistics fed per distinct key (feed.groups + Stats.add_groups, what the
collector runs) hold exactly what the record-by-record path (feed.events +
Stats.add_many) holds: same series in the same order, same cells with byte-identical
sketches, same budgets. The batches are real: the golden captures' records and
generated traffic (errors, gRPC, DNS rcodes, TLS with and without SNI, many latency
bins, a sketch wide enough to collapse, several 10 s cells, a late event), through the
sensor's encoders and the collector's decoders, columnar and row alike."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest

from collector.ingest import decode_batch, decode_message
from collector.stats import feed
from collector.stats.model import BIN_LIMIT, Stats
from sensor import model
from sensor.export import columnar, jsonfmt, wire
from sensor.l7.http2 import Http2Event

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
T0 = 1_800_000_000 * 10**9


def golden() -> list:
    out = []
    for path in sorted(GOLDEN.glob("*.jsonl")):
        out += [replace(jsonfmt.from_dict(json.loads(line)), sensor_id="golden")
                for line in path.read_text().splitlines() if line.startswith("{")]
    return out


def traffic(seed: int, n: int, start: int = 0) -> list:
    """n events of many shapes (and a flow per 4) from 40 clients over ~40 s."""
    rng = random.Random(seed)
    out: list = []
    for i in range(start, start + n):
        ts = T0 + i * 40 * 10**9 // 4000 - (30 * 10**9 if i % 97 == 0 else 0)  # some late
        client = f"198.18.0.{1 + rng.randrange(40)}"
        common = dict(uid=f"E{i}", sensor_id=f"s{i % 3}", ts_ns=ts, src_addr=client,
                      src_port=40000 + i % 1000, protocol=6)
        latency = rng.choice((0, 1, 10**12, 2_000_000, 2_000_000,
                              round(rng.lognormvariate(15, 1.5))))
        kind = rng.randrange(5)
        if kind == 0:
            detail = model.HttpEvent(
                method=rng.choice(("GET", "POST", "")), host=rng.choice(("a.test", "b.test", "")),
                path=f"/v1/items/{rng.randrange(50)}?q=1", status=rng.choice((200, 404, 503, 0)),
                latency_ns=latency)
            out.append(model.L7Event(**common, dst_addr="198.19.0.1", dst_port=80, detail=detail))
        elif kind == 1:
            grpc = rng.random() < 0.5
            detail = Http2Event(
                method="POST", host="g.test", path="/pkg.Svc/Call" if grpc else "/h2/page",
                status=200, latency_ns=latency, grpc_service="pkg.Svc" if grpc else "",
                grpc_method="Call" if grpc else "", grpc_status=rng.choice((-1, 0, 5, 13)))
            out.append(model.L7Event(**common, dst_addr="fc00::9", dst_port=443, detail=detail))
        elif kind == 2:
            detail = model.DnsEvent(id=i % 65536, qname="x.test", qtype=1,
                                    rcode=rng.choice((0, 3, 2)), latency_ns=latency)
            out.append(model.L7Event(**{**common, "protocol": 17}, dst_addr="198.19.0.53",
                                     dst_port=53, detail=detail))
        else:
            detail = model.TlsEvent(version=0x0304, sni=rng.choice(("API.test", "")))
            out.append(model.L7Event(**common, dst_addr="198.19.0.2", dst_port=443,
                                     detail=detail))
        if i % 4 == 0:
            out.append(flow(i, ts, client, rng))
    return out


def flow(i: int, ts: int, client: str, rng: random.Random) -> model.Flow:
    return model.Flow(
        uid=f"E{i}", sensor_id=f"s{i % 3}", flow_start_ns=ts - 10**9, flow_end_ns=ts,
        src_addr=client, dst_addr="198.19.0.1", src_port=40000 + i % 1000, dst_port=80,
        protocol=6, ip_version=4, initiator_octets=rng.randrange(10**6),
        responder_octets=rng.randrange(10**9),
        flow_end_reason=rng.choice((model.FlowEndReason.END_OF_FLOW,
                                    model.FlowEndReason.ACTIVE_TIMEOUT)),
        app_proto="http", src_country=rng.choice(("", "DE", "FR", "JP")),
        src_city=rng.choice(("", "Paris")), src_asn=rng.choice((0, 64500)),
        l7_summary={"http_principal": f"p:{rng.randrange(20):016x}",
                    "http_auth": "bearer,cookie"} if rng.random() < 0.3 else {})


def batches(records: list, size: int) -> list:
    """DecodedBatches of `records`, alternately columnar and rows, as the writer hands
    them to the analytics."""
    out = []
    for n, k in enumerate(range(0, len(records), size)):
        part = records[k:k + size]
        if n % 2:
            out.append(decode_batch(wire.batch_to_proto(part, sensor_id="s", batch_id=n + 1,
                                                        created_ns=T0)))
        else:
            raw = columnar.encode(part, sensor_id="s", batch_id=n + 1, created_ns=T0)
            out.append(decode_message(raw.SerializeToString(), None).unpack())
    return out


def _stats(bs: list, grouped: bool, **kw) -> Stats:
    stats = Stats(**kw)
    for b in bs:
        tables = {n: t for n, t in b.tables.items() if n in feed.PROTOCOLS}
        if grouped:
            stats.add_groups(feed.groups(tables))
        else:
            stats.add_many(feed.events(tables))
    return stats


def _same(a: Stats, b: Stats) -> None:
    assert list(a.series) == list(b.series)
    assert {k: s.to_dict() for k, s in a.series.items()} == \
        {k: s.to_dict() for k, s in b.series.items()}
    assert (a.newest, a.cells, a.dropped, a.dirty) == (b.newest, b.cells, b.dropped, b.dirty)
    for res in ("10s", "1m", "1h"):
        wa, wb = (s.window(res, 3600 * 10**9, {"service", "edge", "endpoint", "rpc"})
                  for s in (a, b))
        assert {k: (c.to_list(), sec) for k, (c, sec) in wa[0].items()} == \
            {k: (c.to_list(), sec) for k, (c, sec) in wb[0].items()}


@pytest.mark.parametrize("size", [7, 500])
def test_grouped_statistics_equal_the_record_path(size):
    bs = batches(golden() + traffic(1, 1500), size)
    a, b = _stats(bs, grouped=False), _stats(bs, grouped=True)
    assert len(a.series) > 50 and any(k[0] == "rpc" for k in a.series)
    collapsed = [c for s in a.series.values() for c in s.rings[0].values()
                 if c._sketch is not None and c._sketch._store.is_collapsed]
    assert collapsed, "the traffic must make a sketch wider than BIN_LIMIT bins"
    _same(a, b)
    assert _live(a) == _live(b)


def _live(stats: Stats) -> dict:
    """What the stored form leaves out of a live sketch: its count, min and max."""
    return {(k, r, i): (c._sketch.count, c._sketch._min, c._sketch._max)
            for k, s in stats.series.items() for r, ring in enumerate(s.rings)
            for i, c in ring.items() if c._sketch is not None}


def test_grouped_statistics_keep_the_budgets_in_the_same_order():
    bs = batches(traffic(2, 800), 200)
    for kw in ({"max_series": 30}, {"max_cells": 100}):
        a, b = _stats(bs, False, **kw), _stats(bs, True, **kw)
        assert a.dropped > 0
        _same(a, b)


def test_sketch_keys_are_the_mappings_keys():
    import numpy as np

    from collector.stats.model import _MAPPING
    values = [1, 2, 3, 1000, 1010, 2**40, 10**12, 2**53 + 1] + \
        [round(1.0202 ** k) for k in range(0, 2000, 7)]
    keys = feed.sketch_keys(np.array(values, np.int64)).tolist()
    assert keys == [_MAPPING.key(v) for v in values]
    assert max(keys) - min(keys) > BIN_LIMIT


def test_odd_tables_group_as_events_name_them():
    """Nulls, an HTTP/1 table with gRPC columns (never gRPC), a series met in two tables."""
    import pyarrow as pa

    http = pa.table({"ts_ns": [T0, T0 + 1, T0 + 2], "src_addr": ["a", "b", None],
                     "dst_addr": ["c", "c", "c"], "dst_port": [80, 80, None],
                     "host": ["h", None, "h"], "method": ["GET", "GET", None],
                     "path": ["/x/1", None, "/y"], "status": [200, 503, None],
                     "grpc_service": ["S", "S", ""], "grpc_status": [0, 13, None],
                     "latency_ns": [5, None, 7]})
    # a second table whose server is the address: row 1's series again, counted after
    again = http.slice(0, 2)
    tables = {"http": http, "http_copy": again}
    a, b = Stats(), Stats()
    feed.PROTOCOLS["http_copy"] = "http"
    try:
        a.add_many(feed.events(tables))
        b.add_groups(feed.groups(tables))
    finally:
        del feed.PROTOCOLS["http_copy"]
    _same(a, b)
    assert not any(k[1] == "grpc" for k in b.series if k[0] == "service")
    assert b.series[("service", "http", "c:80")].total.requests == 3
