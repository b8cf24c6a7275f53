"""The bound on a columnar batch's size once decompressed (sensor/export/arrow_ipc.py):
real Arrow IPC bytes made with pyarrow (a compressed "zip bomb", truncated streams, schemas
and message kinds the collector does not take) refused whole with one line, from the
streams' metadata, before anything is decompressed or allocated. The live refusal over
gRPC (REJECTED ack, nothing stored) is in test_columnar.py, on its shared collector."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pyarrow as pa
import pytest

from collector import columnar as collector_columnar
from collector.ingest import decode_message
from sensor.errors import SchemaError
from sensor.export import arrow_ipc, columnar, wire

from .conftest import REPO, flow

pb = wire.ingest_pb2
MIB = 1024 * 1024


def _flows(n: int = 1) -> pa.Table:
    return columnar._plans()["flows"].table([flow(i) for i in range(n)], "s1")


def _ipc(table: pa.Table, compression: str | None = "zstd", dictionary=None) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(
            compression=compression)) as out:
        out.write_table(table)
    return sink.getvalue().to_pybytes()


def _batch(parts, order: bytes) -> pb.RecordBatch:
    return pb.RecordBatch(sensor_id="s1", batch_id=1, order=order,
                          tables=[pb.ColumnTable(name=n, arrow=a) for n, a in parts])


def bomb(uid_bytes: int) -> bytes:
    """A one-flow table whose uid is `uid_bytes` of NULs, ZSTD-compressed by pyarrow: a
    few kilobytes on the wire."""
    t = _flows(1)
    uid = pa.Array.from_buffers(pa.string(), 1, [
        None, pa.py_buffer(struct.pack("<ii", 0, uid_bytes)), pa.py_buffer(bytes(uid_bytes))])
    return _ipc(t.set_column(0, "uid", uid))


def _declaring(data: bytes, declared: int) -> bytes:
    """`data` (a compressed stream) with its record batch's first non-empty buffer
    claiming `declared` bytes once decompressed: what only the length prefix says."""
    reader = pa.ipc.MessageReader.open_stream(pa.py_buffer(data))
    reader.read_next_message()                   # the schema
    message = reader.read_next_message()
    meta = arrow_ipc._Fb(message.metadata.to_pybytes())
    header = meta.table(meta.root(), 2)
    offset = next(o for o, n in meta.structs(header, 2, "<qq") if n)
    body = message.body.to_pybytes()
    start = bytes(data).index(body)
    out = bytearray(data)
    out[start + offset:start + offset + 8] = struct.pack("<q", declared)
    return bytes(out)


def _refusal(parts, order: bytes, max_bytes: int | None = None) -> str:
    with pytest.raises(SchemaError) as err:
        collector_columnar.decode_columnar(_batch(parts, order), max_bytes=max_bytes)
    # In the decoder process: the same refusal, as the REJECTED ack's one line.
    answer = decode_message(_batch(parts, order).SerializeToString(), None, False, max_bytes)
    assert answer == str(err.value) and "\n" not in answer
    return answer


def test_a_compressed_bomb_is_refused_naming_the_limit():
    data = bomb(8 * MIB)
    assert len(data) < 64 * 1024
    reason = _refusal([("flows", data)], b"\0", max_bytes=4 * MIB)
    assert "declare at least 8,389,015 bytes" in reason
    assert "max_columnar_size of 4,194,304" in reason
    # Under a limit it fits, the same stream is read: the bound, not the stream, made the
    # refusal above.
    got = collector_columnar.decode_columnar(_batch([("flows", data)], b"\0"),
                                             max_bytes=16 * MIB)
    assert len(got.tables["flows"]["uid"][0].as_py()) == 8 * MIB


def test_the_limit_is_for_the_whole_batch():
    flows = _ipc(_flows(1000), None)
    one = arrow_ipc.measure(flows, 1 << 40).nbytes
    lost = _ipc(columnar._plans()["lost"].table([], "s1"), None)
    ok = collector_columnar.decode_columnar(
        _batch([("flows", flows), ("lost", lost)], b"\0" * 1000), max_bytes=one)
    assert ok.tables["flows"].num_rows == 1000
    reason = _refusal([("flows", flows), ("http", _ipc(_flows(1), None))],
                      b"\0" * 1000 + b"\1", max_bytes=one + 10)
    assert "table 1, 'http'" in reason and f"max_columnar_size of {one + 10:,}" in reason


# Peak RSS and Arrow's own peak allocation of a fresh process deciding on one batch,
# before and after. The child imports and warms up everything first (a valid batch
# through the same path) so that the growth is the batch's alone.
_CHILD = r"""
import json, resource, sys
import pyarrow as pa
from collector.ingest import decode_message
from sensor.export import columnar
from tests.collector.conftest import flow
warm = columnar.encode([flow(i) for i in range(50)], sensor_id="w", batch_id=1, created_ns=1,
                       compression="zstd").SerializeToString()
assert not isinstance(decode_message(warm, None), str)
raw = sys.stdin.buffer.read()
limit = int(sys.argv[1])
pool = pa.default_memory_pool()
before, pool_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, pool.max_memory()
answer = decode_message(raw, None, False, limit)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_kib": after - before, "pool_kib": (pool.max_memory() - pool_before)
                  // 1024, "answer": answer if isinstance(answer, str) else "decoded"}))
"""


def _in_child(raw: bytes, limit: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(limit)], input=raw, cwd=REPO,
                         capture_output=True, timeout=120, check=True)
    return json.loads(out.stdout)


def test_a_bomb_is_refused_before_anything_is_allocated():
    uid = 96 * MIB
    raw = _batch([("flows", bomb(uid))], b"\0").SerializeToString()
    refused = _in_child(raw, 64 * MIB)
    assert "max_columnar_size of 67,108,864" in refused["answer"]
    assert refused["growth_kib"] < 8 * 1024 and refused["pool_kib"] < 1024, refused
    # A stream only claiming a terabyte in its length prefix: refused as cheaply.
    claim = _batch([("flows", _declaring(bomb(1024), 1 << 40))], b"\0").SerializeToString()
    assert "max_columnar_size" in _in_child(claim, 64 * MIB)["answer"]
    # The measurement sees an allocation: with room for it, the same batch is
    # decompressed and read.
    read = _in_child(raw, 256 * MIB)
    assert "max_columnar_size" not in read["answer"]
    # Arrow's own peak is the exact witness: RSS may not show pages of zeros (the kernel
    # maps untouched anonymous pages to its zero page).
    assert read["pool_kib"] > uid // 1024 * 9 // 10, read


def _truncated_body() -> bytes:
    data = _ipc(_flows(50))
    return data[:len(data) - 200]


def _dictionary_stream() -> bytes:
    t = _flows(2)
    i = t.schema.get_field_index("app_proto")
    return _ipc(t.set_column(i, "app_proto", t["app_proto"].dictionary_encode()))


def _two_schemas() -> bytes:
    data = _ipc(_flows(1))
    schema = pa.ipc.MessageReader.open_stream(pa.py_buffer(data)).read_next_message()
    return data[:8 + len(schema.metadata)] * 2 + data[8 + len(schema.metadata):]


def _many_batches() -> bytes:
    t = _flows(1)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as out:
        for _ in range(arrow_ipc.MAX_BATCHES + 1):
            out.write_table(t)
    return sink.getvalue().to_pybytes()


def _wrong_type() -> bytes:
    t = _flows(1)
    i = t.schema.get_field_index("src_port")
    return _ipc(t.set_column(i, pa.field("src_port", pa.list_(pa.string())),
                             pa.array([["80"]], pa.list_(pa.string()))))


REFUSED = {
    "truncated-body": ([("flows", _truncated_body())], b"\0" * 50,
                       "is not a valid Arrow IPC stream: Expected to be able to read"),
    "truncated-metadata": ([("flows", _ipc(_flows(1))[:12])], b"\0",
                           "is not a valid Arrow IPC stream"),
    "schema-only": ([("flows", _ipc(_flows(0)))], b"\0",
                    "table 'flows' has 0 rows, but order names 1"),
    "rows-declared": ([("flows", _ipc(_flows(3)))], b"\0" * 2,
                      "table 'flows' has 3 rows, but order names 2"),
    "dictionary": ([("flows", _dictionary_stream())], b"\0\0", "is dictionary-encoded"),
    "two-schemas": ([("flows", _two_schemas())], b"\0", "a second schema"),
    "many-batches": ([("flows", _many_batches())], b"\0" * (arrow_ipc.MAX_BATCHES + 1),
                     "more than 1024 record batches"),
    "wrong-type": ([("flows", _wrong_type())], b"\0",
                   "column src_port is list<item: string>, which does not convert to uint16"),
    "unknown-table": ([("flows", _ipc(_flows(1))), ("smtp", bomb(1024))], b"\0\1",
                      "table 'smtp' holds no record kind"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_stream_not_taken_is_refused_with_the_reason(case):
    parts, order, reason = REFUSED[case]
    assert reason in _refusal(parts, order)


def test_compressed_batches_store_what_uncompressed_ones_do():
    records = [flow(i) for i in range(200)]
    plain = collector_columnar.decode_columnar(columnar.encode(
        records, sensor_id="s1", batch_id=1, created_ns=1))
    for codec in ("lz4", "zstd"):
        packed = columnar.encode(records, sensor_id="s1", batch_id=1, created_ns=1,
                                 compression=codec)
        got = collector_columnar.decode_columnar(packed)
        assert got.tables["flows"].equals(plain.tables["flows"])
