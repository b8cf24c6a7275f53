"""Reading an Arrow IPC stream from a peer, with its size known before anything is made.

Why. Arrow IPC can carry LZ4- or ZSTD-compressed buffers, so a stream of a few kilobytes
can declare buffers of gigabytes: pyarrow allocates each buffer at the size the stream
declares and only then decompresses into it. A peer's stream is therefore measured first,
from its message metadata alone (the flatbuffer headers: record batch length, the body's
buffer offsets and lengths, and for a compressed buffer the uncompressed length its first
8 bytes declare, Arrow format "Compression"), and refused if the total is over the
caller's bound. Only then are the record batches made, from the messages already read.

What is accepted: one Schema message, then RecordBatch messages only. Dictionary batches
(no Loupe column is dictionary-encoded), tensors and anything else are refused, and so are
schemas with dictionary-encoded fields; a buffer outside its message body, a negative
length or a codec Arrow does not define are refused too.

The flatbuffer reading is the minimum of the format the checks need (Message.fbs,
Schema.fbs in apache/arrow format/): a table's vtable, scalars, a union's table, vectors
of structs. Every offset is checked against the metadata's length, so malformed metadata
is a refusal, never an out-of-range read.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

import pyarrow as pa

__all__ = ["IpcRefused", "IpcTooLarge", "Measured", "measure", "read"]

# Message.header_type (MessageHeader union in Message.fbs).
_SCHEMA, _DICTIONARY_BATCH, _RECORD_BATCH = 1, 2, 3
# BodyCompression.codec: LZ4_FRAME, ZSTD.
_CODECS = (0, 1)
# Record batches in one stream, at most. A sensor writes one per table; each costs a few
# microseconds of Python here, so a stream of a hundred thousand tiny ones would buy a
# peer a second of a decoder's CPU per message.
MAX_BATCHES = 1024
# A compressed buffer's first 8 bytes: its uncompressed length, or -1 when the writer
# left it uncompressed (it would not shrink).
_UNCOMPRESSED = -1


class IpcRefused(ValueError):
    """The stream is malformed, of a kind not accepted, or over its bound: one line."""


class IpcTooLarge(IpcRefused):
    """The stream declares more buffer bytes than its bound (nbytes: as far as counted)."""

    def __init__(self, nbytes: int, max_bytes: int) -> None:
        self.nbytes = nbytes
        super().__init__(f"declares at least {nbytes:,} bytes once decompressed, over the "
                         f"limit of {max_bytes:,}")


class _Fb:
    """Checked reads of one flatbuffer (little-endian)."""

    __slots__ = ("buf",)

    def __init__(self, buf: bytes) -> None:
        self.buf = buf

    def _at(self, fmt: str, pos: int):
        if pos < 0 or pos + struct.calcsize(fmt) > len(self.buf):
            raise IpcRefused("message metadata points outside itself")
        return struct.unpack_from(fmt, self.buf, pos)[0]

    def root(self) -> int:
        return self._at("<I", 0)

    def field(self, table: int, index: int) -> int:
        """Position of field `index` of the table at `table`, or 0 if absent."""
        vtable = table - self._at("<i", table)
        vsize = self._at("<H", vtable)
        slot = 4 + 2 * index
        if slot + 2 > vsize:
            return 0
        off = self._at("<H", vtable + slot)
        return table + off if off else 0

    def scalar(self, table: int, index: int, fmt: str, default: int = 0) -> int:
        pos = self.field(table, index)
        return self._at(fmt, pos) if pos else default

    def table(self, table: int, index: int) -> int:
        pos = self.field(table, index)
        return pos + self._at("<I", pos) if pos else 0

    def structs(self, table: int, index: int, fmt: str) -> list[tuple]:
        """A vector of fixed-size structs: their unpacked fields."""
        pos = self.field(table, index)
        if not pos:
            return []
        vec = pos + self._at("<I", pos)
        count = self._at("<I", vec)
        size = struct.calcsize(fmt)
        if vec + 4 + count * size > len(self.buf):
            raise IpcRefused("message metadata points outside itself")
        return list(struct.iter_unpack(fmt, self.buf[vec + 4:vec + 4 + count * size]))


@dataclass(frozen=True, slots=True)
class Measured:
    """A stream read as far as its messages, nothing decompressed or allocated yet."""

    schema: pa.Schema
    messages: list          # its RecordBatch messages (pa.ipc.Message)
    rows: int               # the record batches' lengths, summed
    nbytes: int             # its buffers' sizes once decompressed, summed


def _has_dictionary(type_: pa.DataType) -> bool:
    if pa.types.is_dictionary(type_):
        return True
    return any(_has_dictionary(type_.field(i).type) for i in range(type_.num_fields))


# A sensor sends the same schema message with every batch of a table: parsed and checked
# once per distinct message. Bounded: a few tables times the sensor versions in a fleet.
@functools.lru_cache(maxsize=64)
def _schema(metadata: bytes) -> pa.Schema:
    # The message framed again (continuation marker, length; the metadata is padded to 8).
    framed = b"\xff\xff\xff\xff" + len(metadata).to_bytes(4, "little") + metadata
    schema = pa.ipc.read_schema(pa.ipc.read_message(pa.py_buffer(framed)))
    if any(_has_dictionary(f.type) for f in schema):
        raise IpcRefused("a column is dictionary-encoded; no Loupe column is")
    return schema


def _batch_bytes(meta: _Fb, header: int, body) -> int:
    body_len = body.size if body is not None else 0
    buffers = meta.structs(header, 2, "<qq")     # Buffer {offset: long, length: long}
    compression = meta.table(header, 3)
    if compression:
        codec = meta.scalar(compression, 0, "<b")
        if codec not in _CODECS:
            raise IpcRefused(f"record batch compressed with codec {codec}, which Arrow does "
                             "not define")
    total = 0
    for offset, length in buffers:
        if offset < 0 or length < 0 or offset + length > body_len:
            raise IpcRefused("a buffer lies outside its message body")
        if not compression or length == 0:
            total += length
            continue
        if length < 8:
            raise IpcRefused("a compressed buffer is shorter than its length prefix")
        declared = struct.unpack("<q", body[offset:offset + 8].to_pybytes())[0]
        if declared == _UNCOMPRESSED:
            total += length - 8
        elif declared < 0:
            raise IpcRefused(f"a compressed buffer declares length {declared}")
        else:
            total += declared
    return total


def measure(data: bytes, max_bytes: int) -> Measured:
    """The schema, record batch messages, row count and decompressed size of the Arrow
    IPC stream `data`; IpcRefused if it is malformed, of a kind not accepted, or declares
    more than `max_bytes` of buffers (IpcTooLarge; checked as each message is read, so
    the count stops at the first message over)."""
    try:
        reader = pa.ipc.MessageReader.open_stream(pa.py_buffer(data))
        schema = None
        messages = []
        rows = nbytes = 0
        while True:
            try:
                message = reader.read_next_message()
            except StopIteration:
                break
            meta = _Fb(message.metadata.to_pybytes())
            root = meta.root()
            kind = meta.scalar(root, 1, "<B")
            if schema is None:
                if kind != _SCHEMA:
                    raise IpcRefused("the stream does not start with a schema")
                schema = _schema(meta.buf)
                continue
            if kind != _RECORD_BATCH:
                what = {_SCHEMA: "a second schema", _DICTIONARY_BATCH: "a dictionary batch"}
                raise IpcRefused(f"the stream holds {what.get(kind, f'message type {kind}')}"
                                 "; only one schema and record batches are accepted")
            if len(messages) == MAX_BATCHES:
                raise IpcRefused(f"the stream holds more than {MAX_BATCHES} record batches")
            header = meta.table(root, 2)
            if not header:
                raise IpcRefused("a record batch message has no header")
            length = meta.scalar(header, 0, "<q")
            if length < 0:
                raise IpcRefused(f"a record batch declares {length} rows")
            rows += length
            nbytes += _batch_bytes(meta, header, message.body)
            if nbytes > max_bytes:
                raise IpcTooLarge(nbytes, max_bytes)
            messages.append(message)
    except (pa.ArrowException, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise IpcRefused(first) from None
    if schema is None:
        raise IpcRefused("the stream is empty (no schema)")
    return Measured(schema, messages, rows, nbytes)


def read(measured: Measured) -> pa.Table:
    """The table of a measured stream, fully validated (offsets inside their buffers,
    UTF-8 strings): the IPC reader checks the framing only, and a bad offset would make
    the store read outside a buffer. IpcRefused if it is not well formed."""
    try:
        batches = [pa.ipc.read_record_batch(m, measured.schema) for m in measured.messages]
        table = pa.Table.from_batches(batches, measured.schema)
        table.validate(full=True)
    except (pa.ArrowException, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise IpcRefused(first) from None
    return table
