"""JSON lines, Parquet and CSV sinks: every record kind written and read back with the
standard readers (json, pyarrow, csv) equals what went in; the table columns are the
collector's, and the JSON shape round-trips through jsonfmt."""

from __future__ import annotations

import csv
import io
import json

import pyarrow.parquet as pq
import pytest

from collector import schema
from sensor import model
from sensor.errors import ConfigError, SchemaError
from sensor.export import jsonfmt
from sensor.export.exporter import ExportQueue, SinkExporter
from sensor.export.sinks import (
    CsvSink, JsonLinesSink, ParquetSink, flatten, open_sink, table_path, table_schema,
)
from tests.export.records import ALL_KINDS, numbered_flow


def by_table(records):
    out = {}
    for r in records:
        out.setdefault(schema.KIND_TABLE[model.record_kind(r)], []).append(r)
    return out


@pytest.mark.parametrize("record", ALL_KINDS, ids=model.record_kind)
def test_json_dict_round_trip_and_type_tag(record):
    d = jsonfmt.to_dict(record)
    assert d["type"] == model.record_kind(record)
    again = json.loads(json.dumps(d))
    assert jsonfmt.from_dict(again) == record


def test_json_field_names_are_model_field_names():
    d = jsonfmt.to_dict(ALL_KINDS[0])
    assert set(d) == {"type", "start", "end"} | {f for f in model.Flow.__dataclass_fields__}
    assert list(d)[-2:] == ["start", "end"] and d["end"].endswith("Z")
    assert d["flow_end_reason"] == 3 and d["l7_coverage"]["skipped_octets"] == 1000
    dns = jsonfmt.to_dict(ALL_KINDS[3])
    assert dns["detail"]["answers"][1] == {"name": "b.example.test", "rtype": 1, "ttl": 60,
                                           "data": "198.18.0.9"}


@pytest.mark.parametrize("bad,match", [
    ({"type": "nope"}, "type='nope'"),
    ({"type": "flow", "uid": "C1"}, "invalid flow"),
    ({"type": "lost", "source": "x", "count": -1}, "invalid lost"),
    ([1, 2], "must be an object"),
])
def test_json_bad_records_raise_schema_error(bad, match):
    with pytest.raises(SchemaError, match=match):
        jsonfmt.from_dict(bad)


def test_jsonl_file_round_trip(tmp_path):
    path = tmp_path / "out.jsonl"
    sink = open_sink(path)
    assert isinstance(sink, JsonLinesSink)
    for r in ALL_KINDS:
        sink.write(r)
    sink.close()
    lines = path.read_text().splitlines()
    assert [jsonfmt.from_dict(json.loads(line)) for line in lines] == ALL_KINDS


def test_flattened_columns_are_the_collector_columns():
    for table, records in by_table(ALL_KINDS).items():
        for r in records:
            assert list(flatten(r)) == table_schema(table).names


def test_parquet_round_trip_every_kind(tmp_path):
    path = tmp_path / "flows.parquet"
    sink = open_sink(path)
    assert isinstance(sink, ParquetSink)
    for r in ALL_KINDS:
        sink.write(r)
    sink.close()
    for table, records in by_table(ALL_KINDS).items():
        got = pq.read_table(table_path(path, table))
        assert got.schema == table_schema(table)
        expected = [flatten(r) for r in records]
        assert got.to_pylist() == expected
    assert (tmp_path / "flows.http.parquet").exists()
    # The process-less ICMPv6 flow stores zeros, as the collector does.
    icmp = pq.read_table(path).to_pylist()[1]
    assert (icmp["process_pid"], icmp["process_comm"], icmp["icmp_type"]) == (0, "", 128)


def test_parquet_writes_bounded_row_groups_and_empty_flows_file(tmp_path):
    path = tmp_path / "f.parquet"
    sink = ParquetSink(path, row_group_rows=100)
    for i in range(250):
        sink.write(numbered_flow(i))
    sink.close()
    meta = pq.ParquetFile(path).metadata
    assert (meta.num_rows, meta.num_row_groups) == (250, 3)
    only_lost = tmp_path / "l.parquet"
    sink = ParquetSink(only_lost)
    sink.write(ALL_KINDS[-1])
    sink.close()
    assert pq.read_table(only_lost).num_rows == 0
    assert pq.read_table(table_path(only_lost, "lost")).num_rows == 1


def _csv_text(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def test_csv_round_trip_every_kind(tmp_path):
    path = tmp_path / "flows.csv"
    sink = open_sink(path)
    assert isinstance(sink, CsvSink)
    for r in ALL_KINDS:
        sink.write(r)
    sink.close()
    for table, records in by_table(ALL_KINDS).items():
        with open(table_path(path, table), newline="") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == table_schema(table).names
        assert rows == [{k: _csv_text(v) for k, v in flatten(r).items()} for r in records]
    dns = list(csv.DictReader(open(table_path(path, "dns"), newline="")))[0]
    assert json.loads(dns["answers"])[0]["data"] == "b.example.test"


def test_open_sink_refuses_unknown_formats(tmp_path):
    with pytest.raises(ConfigError, match="suffix"):
        open_sink(tmp_path / "out.txt")
    with pytest.raises(ConfigError, match="stdout"):
        open_sink("-", "parquet")


def test_sink_exporter_writes_everything_and_reports_queue_overflow():
    out = io.StringIO()
    ex = SinkExporter(JsonLinesSink(stream=out), sensor_id="s9", queue_records=10_000)
    for i in range(3000):
        assert ex.submit(numbered_flow(i))
    ex.close(10)
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [x["uid"] for x in lines] == [f"F{i:08d}" for i in range(3000)]
    assert ex.counters()["records_written"] == 3000


def test_export_queue_bound_drops_newest_and_counts():
    q = ExportQueue(10, batch_records=4)
    accepted = [q.put(numbered_flow(i)) for i in range(15)]
    assert accepted == [True] * 10 + [False] * 5
    lost = q.take_lost("s1")
    assert (lost.source, lost.count, lost.sensor_id) == ("export_queue_full", 5, "s1")
    assert q.take_lost() is None
    got = q.get_batch(0.01, idle_s=0.01)
    assert [r.uid for _, r in got] == [f"F{i:08d}" for i in range(4)]
    assert q.counters() == {"records_queued": 10, "export_queue_full": 5,
                            "export_queue_depth": 6}
