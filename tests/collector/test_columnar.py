"""Columnar batches (Arrow IPC per table): the same rows in storage as the row batch of the
same records, on DuckDB and a real ClickHouse server; a malformed columnar batch refused
whole, with the reason, and nothing of it stored. Negotiation: test_columnar_negotiation.py."""

from __future__ import annotations

import dataclasses
import time

import pyarrow as pa
import pytest

from collector import columnar as collector_columnar
from collector.ingest import decode_batch, decode_message
from collector.server import CollectorConfig
from collector.storage import open_storage
from sensor import model
from sensor.config import ClickHouseConfig, StorageConfig
from sensor.errors import SchemaError
from sensor.export import columnar, wire
from sensor.l7 import registry
from tests.export.records import ALL_KINDS
from tests.storage.conftest import clickhouse_server  # noqa: F401  (a real server)

from .conftest import BASE_NS, RunningCollector, flow, push, query

pb = wire.ingest_pb2


def _value(col: registry.Column, i: int):
    if col.type == "str":
        return f"{col.name}-{i}"
    if col.type == "bool":
        return True
    if col.type == "list<str>":
        return (f"a{i}", "b")
    if col.type == "counts":
        return registry.Counts.of({"card.request": i + 1})
    if col.type == "list<struct>":
        return (col.of(**{m.name: _value(m, i) for m in col.members}),)
    return 1 + i % 3


def _detail(spec, i: int):
    """An event of a registered kind with as many fields set as its checks allow."""
    cols = registry.columns(spec.event, spec.column_types)
    fields = {f.name: f for f in dataclasses.fields(spec.event)}
    kwargs = {}
    for c in cols:
        f = fields[c.name]
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            for candidate in (_value(c, i), "query"):
                try:
                    spec.event(**{**kwargs, c.name: candidate})
                except (ValueError, TypeError) as exc:
                    if "missing" not in str(exc):
                        continue
                kwargs[c.name] = candidate
                break
    for c in cols:
        if c.name not in kwargs:
            try:
                spec.event(**kwargs, **{c.name: _value(c, i)})
                kwargs[c.name] = _value(c, i)
            except (ValueError, TypeError):
                pass
    return spec.event(**kwargs)


def every_kind(i: int = 0) -> list:
    """Flows (with and without process and summary), one event of every registered kind,
    a loss and an alert, in a mixed order."""
    out = [flow(i, l7_summary={"kafka_topic": "t", "kafka_client_id": "c"},
                process=model.ProcessInfo(pid=7, comm="curl", uid=3)), *ALL_KINDS]
    for n, spec in enumerate(registry.kinds()):
        out.append(model.L7Event(uid=f"E{i}-{n}", ts_ns=BASE_NS + n, src_addr="198.18.0.3",
                                 dst_addr="fc00::9" if n % 2 else "198.19.0.4",
                                 src_port=1000 + n, dst_port=2000 + n, protocol=6,
                                 source=model.L7_SOURCES[n % 2], detail=_detail(spec, n)))
        out.append(flow(i * 100 + n + 1))
    out.append(model.Alert(rule_id="r1", action="block", field="http.path",
                           excerpt="/etc/passwd", severity="high", uid="H1", ts_ns=BASE_NS,
                           src_addr="198.18.0.5", dst_addr="198.19.0.80", src_port=5,
                           dst_port=80, count=2, enforced=True, block_expires_ns=BASE_NS + 9))
    return out


def _both(records, batch_id: int = 1, sensor_id: str = "s1"):
    row = wire.batch_to_proto(records, sensor_id=sensor_id, batch_id=batch_id, created_ns=5)
    col = columnar.encode(records, sensor_id=sensor_id, batch_id=batch_id, created_ns=5)
    return row, col


def _rows(table: pa.Table) -> list:
    """A table's rows with map entries sorted: a protobuf map has no order."""
    out = []
    for row in table.to_pylist():
        out.append({k: sorted(v) if k == "l7_summary" else v for k, v in row.items()})
    return out


@pytest.mark.parametrize("identity", [None, "cert-sensor"])
def test_columnar_decodes_to_the_tables_of_the_row_batch(identity):
    records = every_kind()
    row, col = _both(records)
    want = decode_batch(row, identity)
    got = collector_columnar.decode_columnar(col, identity)
    assert (got.sensor_id, got.batch_id, got.records) == (want.sensor_id, 1, len(records))
    assert set(got.tables) == set(want.tables) == set(columnar._plans())
    for name, table in want.tables.items():
        assert got.tables[name].schema.equals(table.schema), name
        assert _rows(got.tables[name]) == _rows(table), name


def test_spooled_columns_go_back_to_the_same_rows():
    records = every_kind()
    row, col = _both(records)
    assert columnar.is_columnar(col.SerializeToString())
    assert not columnar.is_columnar(row.SerializeToString())
    back = pb.RecordBatch.FromString(columnar.to_rows(col.SerializeToString()))
    assert (back.sensor_id, back.batch_id, back.created_ns) == ("s1", 1, 5)
    # In the sensor's order, each record as sent (an empty sensor id takes the batch's).
    assert wire.batch_from_proto(back) == [
        r if r.sensor_id else dataclasses.replace(r, sensor_id="s1") for r in records]


def _comparable(result) -> list[tuple]:
    """Rows without the collector's own columns (when and in which commit a row was
    stored), map entries in key order: a protobuf map (the row batch's) has none. A map
    is a dict from DuckDB and two arrays (l7_summary.key, l7_summary.value) from
    ClickHouse."""
    cols = result.columns
    out = []
    for row in result.rows:
        values = dict(zip(cols, row))
        for name in ("received_ns", "batch_seq"):
            values.pop(name)
        for name in [c for c in cols if c.endswith(".key")]:
            base = name[:-len(".key")]
            values[base] = dict(zip(values.pop(name), values.pop(base + ".value")))
        out.append(tuple(sorted(v.items()) if isinstance(v, dict) else v
                         for v in values.values()))
    return out


@pytest.mark.parametrize("engine", ["duckdb", "clickhouse"])
def test_a_columnar_batch_stores_the_rows_of_its_row_batch(engine, request, tmp_path):
    records = every_kind(1) + every_kind(2)
    row, col = _both(records, batch_id=7)
    if engine == "duckdb":
        stores = [open_storage(StorageConfig(), tmp_path / d, sandbox=True) for d in ("r", "c")]
    else:
        server = request.getfixturevalue("clickhouse_server")
        tag = time.time_ns()
        stores = [open_storage(StorageConfig(backend="clickhouse", clickhouse=ClickHouseConfig(
            port=server.port, database=f"columnar_{d}_{tag}")), tmp_path / d)
            for d in ("r", "c")]
    try:
        raw = [decode_message(b.SerializeToString(), None) for b in (row, col)]
        for store, shipped in zip(stores, raw):
            [result] = store.store_many([shipped.unpack()], 1_000)
            assert result.status.value == "stored"
        assert stores[0].counts() == stores[1].counts()
        assert sum(stores[1].counts().values()) == len(records)
        for name in columnar._plans():
            cols = [f.name for f in columnar._plans()[name].schema]
            sql = (f"SELECT * FROM {name} ORDER BY " +
                   ", ".join(c for c in ("uid", "rule_id", "source", "ts_ns") if c in cols))
            got = [s.query(sql, 1000, 30) for s in stores]
            assert got[0].columns == got[1].columns, name
            norm = [sorted(map(repr, _comparable(g))) for g in got]
            assert norm[0] == norm[1], name
            assert len(got[0].rows) == sum(
                1 for r in records if columnar.tables.kind_tables()[model.record_kind(r)]
                == name), name
        # Stored records read back as the records sent (the model's own equality).
        back = sorted(stores[1].records_since(0, stores[1].last_seq()), key=repr)
        assert back == sorted(stores[0].records_since(0, stores[0].last_seq()), key=repr)
    finally:
        for store in stores:
            store.close()


# -- malformed batches ----------------------------------------------------------------------


def _flows_ipc(table: pa.Table) -> bytes:
    return columnar._ipc(table, None)


def _flows(n: int = 2) -> pa.Table:
    return columnar._plans()["flows"].table([flow(i) for i in range(n)], "s1")


def _set(table: pa.Table, name: str, values, type_=None) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, pa.field(name, type_ or table.schema.field(i).type),
                            pa.array(values, type_ or table.schema.field(i).type))


def _bad_utf8() -> pa.Table:
    t = _flows(1)
    uid = pa.Array.from_buffers(pa.string(), 1, [None, pa.py_buffer(b"\0\0\0\0\2\0\0\0"),
                                                 pa.py_buffer(b"\xff\xfe")])
    return t.set_column(0, "uid", uid)


MALFORMED = {
    "not-arrow": ([("flows", b"not an arrow stream")], b"\0", "not a valid Arrow IPC stream"),
    "truncated": ([("flows", _flows_ipc(_flows())[:300])], b"\0\0",
                  "not a valid Arrow IPC stream"),
    "bad-utf8": ([("flows", _flows_ipc(_bad_utf8()))], b"\0", "not a valid Arrow IPC stream"),
    "unknown-table": ([("smtp", _flows_ipc(_flows(1)))], b"\0",
                      "table 'smtp' holds no record kind"),
    "twice": ([("flows", _flows_ipc(_flows(1))), ("flows", _flows_ipc(_flows(1)))], b"\0\1",
              "table 'flows' appears twice"),
    "order-count": ([("flows", _flows_ipc(_flows(2)))], b"\0",
                    "table 'flows' has 2 rows, but order names 1"),
    "order-table": ([("flows", _flows_ipc(_flows(1)))], b"\0\1", "order names table 1"),
    "type": ([("flows", _flows_ipc(_set(_flows(1), "src_port", ["http"], pa.string())))], b"\0",
             "column src_port is string, which does not convert to uint16"),
    "overflow": ([("flows", _flows_ipc(_set(_flows(1), "src_port", [70000], pa.uint32())))],
                 b"\0", "column src_port is uint32, which does not convert to uint16"),
    "null": ([("flows", _flows_ipc(_set(_flows(2), "uid", ["a", None])))], b"\0\0",
             "column uid has null values"),
    "address": ([("flows", _flows_ipc(_set(_flows(2), "dst_addr", ["198.19.0.1", "nope"])))],
                b"\0\0", "record 1: invalid flow record: dst_addr='nope' is not an IP address"),
    "time": ([("flows", _flows_ipc(_set(_flows(1), "flow_end_ns", [1])))], b"\0",
             "record 0: invalid flow record"),
}


def _columnar(parts, order: bytes, sensor_id: str = "s1", batch_id: int = 1, **kw):
    return pb.RecordBatch(sensor_id=sensor_id, batch_id=batch_id, order=order,
                          tables=[pb.ColumnTable(name=n, arrow=a) for n, a in parts], **kw)


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_columnar_batch_is_refused_with_the_reason(case):
    parts, order, reason = MALFORMED[case]
    with pytest.raises(SchemaError, match=reason.replace("(", r"\(").replace("?", r"\?")):
        collector_columnar.decode_columnar(_columnar(parts, order))
    # In the decoder process: the REJECTED reason, one line.
    answer = decode_message(_columnar(parts, order).SerializeToString(), None)
    assert isinstance(answer, str) and reason.split("(")[0] in answer and "\n" not in answer


def test_rows_and_columns_in_one_batch_are_refused():
    b = _columnar([("flows", _flows_ipc(_flows(1)))], b"\0",
                  records=[wire.to_proto(flow(9))])
    with pytest.raises(SchemaError, match="both records and tables"):
        collector_columnar.decode_columnar(b)


@pytest.fixture(scope="module")
def shared_collector(tmp_path_factory):
    """One collector for the tests below (each its own sensor id): starting one costs
    seconds on a loaded machine."""
    running = RunningCollector(CollectorConfig(
        listen="127.0.0.1:0", data_dir=tmp_path_factory.mktemp("columnar")))
    yield running
    running.stop()


def test_a_bad_batch_among_good_ones_is_rejected_whole_and_stores_nothing(shared_collector):
    c = shared_collector
    good1 = columnar.encode(every_kind(1), sensor_id="bad", batch_id=1, created_ns=1)
    # Every table well-formed but the loss table's bad row.
    bad = columnar.encode(every_kind(2), sensor_id="bad", batch_id=2, created_ns=1)
    lost = [i for i, p in enumerate(bad.tables) if p.name == "lost"][0]
    t = pa.ipc.open_stream(bad.tables[lost].arrow).read_all()
    bad.tables[lost].arrow = _flows_ipc(_set(t, "source", [""] * t.num_rows))
    good3 = columnar.encode(every_kind(3), sensor_id="bad", batch_id=3, created_ns=1)
    acks = push(c.address, [good1, bad, good3])
    assert [a.status for a in acks] == [pb.ACK_STATUS_STORED, pb.ACK_STATUS_REJECTED,
                                        pb.ACK_STATUS_STORED]
    assert "source must not be empty" in acks[1].message
    n = len(every_kind(1))
    assert [a.records for a in acks] == [n, 0, n]
    total = query(c.address, "SELECT (SELECT count(*) FROM flows WHERE sensor_id = 'bad') + "
                             "(SELECT count(*) FROM lost WHERE sensor_id = 'bad')")
    assert total[0][0] == 2 * sum(1 for r in every_kind(1) if not r.sensor_id and
                                  isinstance(r, (model.Flow, model.LostEvent)))
    # A resent stored batch is a duplicate, as for rows.
    [again] = push(c.address, [good1])
    assert again.status == pb.ACK_STATUS_DUPLICATE


def test_columns_from_an_older_or_newer_sensor_take_the_stored_shape():
    # An older sensor lacks a column (it takes its zero value, as an absent protobuf field
    # does); a newer one sends a column this collector does not know (ignored) and a wider
    # type whose values fit (cast).
    t = _flows(2)
    t = t.drop_columns(["process_comm", "l7_summary"]).append_column("future", pa.array([1, 2]))
    t = _set(t, "src_port", [40000, 40001], pa.uint32())
    got = collector_columnar.decode_columnar(_columnar([("flows", _flows_ipc(t))], b"\0\0"))
    rows = got.tables["flows"].to_pylist()
    assert got.tables["flows"].schema.equals(columnar._plans()["flows"].schema)
    assert [(r["process_comm"], r["l7_summary"], r["src_port"]) for r in rows] == [
        ("", [], 40000), ("", [], 40001)]


def test_a_subscriber_that_came_mid_decode_gets_the_records_from_the_event_loop():
    from collector.ingest import Received, StreamState

    records = every_kind()
    raw = columnar.encode(records, sensor_id="s1", batch_id=3, created_ns=5).SerializeToString()
    received = Received.parse(raw, StreamState())
    assert received.columnar and received.rows is None
    assert [wire.from_proto(r) for r in received.records] == [
        r if r.sensor_id else dataclasses.replace(r, sensor_id="s1") for r in records]


def test_a_batch_over_the_decompressed_bound_is_rejected_and_stores_nothing(shared_collector):
    # A compressed flows table whose length prefix claims a terabyte once decompressed
    # (tests/collector/test_columnar_bound.py makes real bombs and checks the memory).
    from tests.collector.test_columnar_bound import _declaring

    c = shared_collector
    bomb = columnar.encode(every_kind(4), sensor_id="bomb", batch_id=1, created_ns=1,
                           compression="lz4")
    flows = [i for i, p in enumerate(bomb.tables) if p.name == "flows"][0]
    bomb.tables[flows].arrow = _declaring(bomb.tables[flows].arrow, 1 << 40)
    good = columnar.encode(every_kind(5), sensor_id="bomb", batch_id=2, created_ns=1,
                           compression="lz4")
    acks = push(c.address, [bomb, good])
    assert [a.status for a in acks] == [pb.ACK_STATUS_REJECTED, pb.ACK_STATUS_STORED]
    assert "over the collector's max_columnar_size of 67,108,864 bytes" in acks[0].message
    assert query(c.address, "SELECT count(*) FROM flows WHERE sensor_id = 'bomb'")[0][0] == \
        sum(1 for r in every_kind(5) if isinstance(r, model.Flow) and not r.sensor_id)
