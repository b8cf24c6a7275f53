"""A decoder answers a columnar table stored as sent with its place in the serialized batch
(collector/columnar.py arrow_spans), and the writer reads it from its own copy: the same
tables as shipping the bytes, and the bytes still shipped whenever the place is not sure."""

from __future__ import annotations

import pytest

from collector import columnar as collector_columnar
from collector.ingest import decode_message
from sensor.export import columnar, wire

from .conftest import mixed

pb = wire.ingest_pb2


def _raw(sensor_id: str = "s1") -> bytes:
    return columnar.encode(mixed(200, 5_000), sensor_id=sensor_id, batch_id=7,
                           created_ns=1).SerializeToString()


def _same(a, b) -> None:
    assert list(a.tables) == list(b.tables)
    for name in a.tables:
        assert a.tables[name].equals(b.tables[name]), name


def test_tables_as_sent_come_back_as_spans_and_read_the_same():
    raw = _raw()
    shipped = decode_message(raw, None, spans=True)
    assert shipped.tables and all(isinstance(v, tuple) for v in shipped.tables.values())
    _same(decode_message(raw, None).unpack(), shipped.unpack(raw))
    with pytest.raises(ValueError, match="pass the serialized batch"):
        shipped.unpack()


def test_changed_tables_are_shipped_as_bytes():
    # Under mTLS every record's sensor_id becomes the identity: no table is as sent.
    raw = _raw()
    shipped = decode_message(raw, "node-a", spans=True)
    assert all(isinstance(v, bytes) for v in shipped.tables.values())
    _same(decode_message(raw, "node-a").unpack(), shipped.unpack(raw))


def test_a_repeated_arrow_field_takes_the_last_as_a_parse_does():
    batch = pb.RecordBatch.FromString(_raw())
    first, second = batch.tables[0], batch.tables[1]
    # Table 0 framed with table 1's stream first, then its own: a parse keeps the last.
    decoy = pb.ColumnTable(name=first.name, arrow=second.arrow).SerializeToString()
    own = pb.ColumnTable(arrow=first.arrow).SerializeToString()
    head = pb.RecordBatch(sensor_id=batch.sensor_id, batch_id=batch.batch_id,
                          order=batch.order).SerializeToString()
    body = decoy + own
    framed = bytes([(5 << 3) | 2]) + _len(len(body)) + body
    rest = b"".join(bytes([(5 << 3) | 2]) + _len(len(p)) + p
                    for p in (t.SerializeToString() for t in batch.tables[1:]))
    raw = head + framed + rest
    parsed = pb.RecordBatch.FromString(raw)
    assert parsed.tables[0].arrow == first.arrow
    spans = collector_columnar.arrow_spans(raw, parsed)
    assert spans is not None
    assert [raw[o:o + n] for o, n in spans] == [t.arrow for t in parsed.tables]
    _same(decode_message(raw, None).unpack(), decode_message(raw, None, spans=True).unpack(raw))


def test_framing_it_cannot_follow_gives_no_spans():
    batch = pb.RecordBatch.FromString(_raw())
    raw = batch.SerializeToString()
    # Cut short: the walk runs off the end (a parse would have refused it before).
    assert collector_columnar.arrow_spans(raw[:-3], batch) is None
    # Bytes that differ from the parsed batch inside a stream: the check catches it.
    offset, length = collector_columnar.arrow_spans(raw, batch)[0]
    changed = bytearray(raw)
    changed[offset + length // 2] ^= 0xFF
    assert collector_columnar.arrow_spans(bytes(changed), batch) is None


def _len(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)
