"""MongoDB wire protocol from a reassembled TCP stream, sans-I/O: one event per command.

Strategy
- Every message starts with the standard header (messageLength, requestID, responseTo,
  opCode; little-endian int32s). Each direction walks messages by their length, so a
  message the parser does not need in full is skipped, never buffered: skip_hint hands the
  rest of it to the kernel.
- Inside a message a small program of stages runs per opcode (PROGRAMS): OP_MSG flags and
  sections (kind 0 body, kind 1 document sequences: counted, each document skipped by its
  length), OP_QUERY flags, namespace and query document, OP_REPLY's header and first
  document, the legacy write opcodes' namespace, OP_COMMAND/OP_COMMANDREPLY (3.2-era),
  and OP_COMPRESSED: its header, then the inner message. With noop the inner message is
  the rest of the stream; zlib and zstd are decompressed from a bounded prefix of the
  compressed bytes into a bounded output (MAX_COMPRESSED_IN, MAX_INFLATE) and walked there;
  snappy is noted only (no decoder in the standard library; the command stays unknown).
- Documents are walked by a minimal BSON walker that never keeps values. It reads element
  headers (type, name, length) of the few documents that matter and skips every value by
  its length; only the names Loupe reports are read as text: the command (the body's first
  key), `$db`, the collection (the command's string value for commands that name one,
  `collection` for getMore, the namespace for legacy opcodes), and from replies `ok`,
  `errmsg`/`$err`, `code`, `codeName`, `n` of writes, the first write error, and the number
  of documents in cursor batches. A value longer than what is buffered is skipped through
  the kernel, and the walk goes on after it (a reply's `ok` after a 10 MiB firstBatch).
- Pairing by responseTo (MongoDB allows several requests in flight). A request with
  moreToCome expects no reply and is reported at once, as are the legacy write opcodes.
  A reply with moreToCome (exhaust cursors, streaming hello) is followed by more replies
  whose responseTo is the previous reply's requestID: each is its own event, marked
  `exhaust`, with the command of the request that started the stream. Legacy OP_QUERY
  with the Exhaust flag continues the same way while its cursor id is not 0.
- Latency: first byte of the request to the first byte of its reply.
- A gap or skip that stays inside a message whose length is known costs that message only
  (its event is marked truncated); one that crosses a message boundary loses the framing:
  ERROR.

Never stored: field values of documents (filters, inserted documents, results), and so no
SASL payload (saslStart, saslContinue, speculativeAuthenticate) and no `authenticate`
key or nonce: those are values. With `redact` (on by default), the server's rendering of a
document inside an error message (`dup key: { email: "..." }` of E11000) is replaced too.
OP_MSG checksums (CRC-32C) are skipped, not verified.
"""

from __future__ import annotations

import functools
import re
import struct
import zlib
from dataclasses import dataclass

from sensor.l7.base import NEED_DATA, Direction, ParserState, Transaction, _NeedData
from sensor.l7.redact import REDACTED
from sensor.l7.registry import Filter, Protocol

APP_PROTO = "mongodb"
PORTS = (27017,)

_OK, _DONE, _ERROR = ParserState.OK, ParserState.DONE, ParserState.ERROR
_TO_SERVER = Direction.TO_SERVER

# mongod refuses messages above maxMessageSizeBytes (48,000,000): a longer length is garbage.
MAX_MESSAGE = 48_000_000
# Element names of the documents walked are command option names (find, filter, $db, ...);
# a name longer than this is not a command document.
MAX_KEY = 1024
# Database names are at most 64 bytes, namespaces 255 (MongoDB limits); command names are
# shorter. Longer text is cut and the event marked truncated.
MAX_NAME = 256
MAX_ERRMSG = 512     # error messages are one sentence; longer ones (stack-like) are cut
MAX_CODE_NAME = 128  # codeName is an identifier (NamespaceNotFound)
# Documents nest at most: reply -> cursor -> firstBatch, reply -> writeErrors -> one error,
# $query wrapper -> command -> documents. Deeper is skipped, never walked.
MAX_DEPTH = 4
# Requests waiting for replies per connection. Drivers keep one in flight per connection;
# past this many the oldest is reported without its reply.
MAX_PENDING = 1024
# OP_COMPRESSED (zlib, zstd): at most this many compressed bytes are buffered, and at most
# MAX_INFLATE bytes are produced from them (a decompression bomb stops there). The command
# document comes first in the inner message, so a prefix names the command; a reply whose
# `ok` lies beyond the output bound is marked truncated.
MAX_COMPRESSED_IN = 64 * 1024
MAX_INFLATE = 256 * 1024
# What one direction may hold: the largest single need is the compressed prefix above.
MAX_BUFFER = MAX_COMPRESSED_IN + 64 * 1024

U64 = (1 << 64) - 1
_I32 = struct.Struct("<i")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")
_HEAD = struct.Struct("<iiii")
_INT_ONLY = {int}

OP_REPLY, OP_UPDATE, OP_INSERT, OP_QUERY, OP_GET_MORE, OP_DELETE, OP_KILL_CURSORS = (
    1, 2001, 2002, 2004, 2005, 2006, 2007)
OP_COMMAND, OP_COMMANDREPLY, OP_COMPRESSED, OP_MSG = 2010, 2011, 2012, 2013
OPCODES = {
    OP_REPLY: "OP_REPLY", OP_UPDATE: "OP_UPDATE", OP_INSERT: "OP_INSERT",
    OP_QUERY: "OP_QUERY", OP_GET_MORE: "OP_GET_MORE", OP_DELETE: "OP_DELETE",
    OP_KILL_CURSORS: "OP_KILL_CURSORS", OP_COMMAND: "OP_COMMAND",
    OP_COMMANDREPLY: "OP_COMMANDREPLY", OP_COMPRESSED: "OP_COMPRESSED", OP_MSG: "OP_MSG",
}
_OPCODE_NAMES = frozenset(OPCODES.values()) | {""}
REQUEST_OPS = frozenset((OP_UPDATE, OP_INSERT, OP_QUERY, OP_GET_MORE, OP_DELETE,
                         OP_KILL_CURSORS, OP_COMMAND, OP_COMPRESSED, OP_MSG))
REPLY_OPS = frozenset((OP_REPLY, OP_COMMANDREPLY, OP_COMPRESSED, OP_MSG))
_NO_REPLY_OPS = frozenset((OP_UPDATE, OP_INSERT, OP_DELETE, OP_KILL_CURSORS))
_LEGACY_COMMANDS = {OP_QUERY: "find", OP_GET_MORE: "getMore", OP_INSERT: "insert",
                    OP_UPDATE: "update", OP_DELETE: "delete", OP_KILL_CURSORS: "killCursors"}
COMPRESSORS = {0: "noop", 1: "snappy", 2: "zlib", 3: "zstd"}
_COMPRESSOR_NAMES = frozenset(COMPRESSORS.values()) | {"", "unknown"}
STATUSES = ("", "ok", "error")

# OP_MSG flag bits (MongoDB wire protocol, OP_MSG): bits 0-15 must be understood.
CHECKSUM_PRESENT = 1
MORE_TO_COME = 2
EXHAUST_ALLOWED = 1 << 16
_MSG_REQUIRED_UNKNOWN = 0xFFFC
# OP_QUERY flags: bit 6 Exhaust; bit 0 is reserved and bits above 7 are unused.
QUERY_EXHAUST = 1 << 6
# OP_REPLY responseFlags.
CURSOR_NOT_FOUND, QUERY_FAILURE = 1, 2

# Commands whose value is the collection they act on (compared in lower case: legacy
# drivers send findandmodify, mapreduce).
COLLECTION_COMMANDS = frozenset((
    "find", "insert", "update", "delete", "aggregate", "count", "distinct", "findandmodify",
    "mapreduce", "create", "drop", "listindexes", "createindexes", "dropindexes", "collmod",
    "validate", "collstats", "compact", "killcursors", "geonear", "geosearch", "reindex",
    "converttocapped", "clonecollectionascapped", "listsearchindexes",
    "createsearchindexes", "updatesearchindex", "dropsearchindex",
))
# Commands whose value is a full namespace "db.collection": the collection is its tail.
NAMESPACE_COMMANDS = frozenset((
    "renamecollection", "shardcollection", "reshardcollection", "datasize",
    "analyzeshardkey", "cleanuporphaned",
))
# The inline arrays of write commands whose elements are the documents sent (when a driver
# does not use a kind 1 document sequence for them).
_WRITE_ARRAYS = {"insert": b"documents", "update": b"updates", "delete": b"deletes"}
_WRITES = frozenset(_WRITE_ARRAYS)

# BSON element types (bsonspec.org): value sizes of the fixed ones.
_FIXED = {0x01: 8, 0x06: 0, 0x07: 12, 0x08: 1, 0x09: 8, 0x0A: 0, 0x10: 4, 0x11: 8,
          0x12: 8, 0x13: 16, 0xFF: 0, 0x7F: 0}
# The same, indexed by type byte (-1: not fixed), for the element walk's hot loop.
_FIXED_SIZE = tuple(_FIXED.get(t, -1) for t in range(256))
_STRINGS = frozenset((0x02, 0x0D, 0x0E))
_NUMBERS = frozenset((0x01, 0x08, 0x10, 0x12))
_STR_WANT = 4 + MAX_ERRMSG + 1    # the longest string prefix kept, with length and NUL

# Stages of a message's program.
(S_FLAGS, S_ZERO, S_NS, S_SKIP8, S_DOC, S_SECTIONS, S_DOCS, S_REST, S_RHEAD, S_CHEAD,
 S_CBODY, S_DB, S_CMDNAME) = range(13)
PROGRAMS = {
    OP_MSG: (S_FLAGS, S_SECTIONS, S_REST),
    OP_QUERY: (S_FLAGS, S_NS, S_SKIP8, S_DOC, S_REST),
    OP_GET_MORE: (S_ZERO, S_NS, S_REST),
    OP_INSERT: (S_FLAGS, S_NS, S_DOCS, S_REST),
    OP_UPDATE: (S_ZERO, S_NS, S_REST),
    OP_DELETE: (S_ZERO, S_NS, S_REST),
    OP_KILL_CURSORS: (S_REST,),
    OP_REPLY: (S_RHEAD, S_DOC, S_REST),
    OP_COMMAND: (S_DB, S_CMDNAME, S_DOC, S_DOC, S_REST),
    OP_COMMANDREPLY: (S_DOC, S_REST),
    OP_COMPRESSED: (S_CHEAD, S_CBODY, S_REST),
}

# What a walked document is (its role decides which elements are read).
(R_CMD, R_EXPLAIN, R_COUNT, R_REPLY, R_CURSOR, R_BATCH, R_WERRS, R_WERR) = range(1, 9)
# String targets.
T_COMMAND_COLL, T_DB, T_GETMORE_COLL, T_NS_COLL, T_ERRMSG, T_CODE_NAME = range(6)

_DOC_TEXT = re.compile(r"\{.*\}", re.DOTALL)


class _Malformed(Exception):
    """Internal: the peer sent something that is not the MongoDB wire protocol."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MongodbEvent:
    """One command and its reply (or one reply of an exhaust stream). Names only, never
    values: see the module docstring."""

    opcode: str = ""             # the request's opcode (the inner one of OP_COMPRESSED)
    command: str = ""            # first key of the command document, or the legacy op
    database: str = ""
    collection: str = ""
    request_id: int = 0
    compressor: str = ""         # OP_COMPRESSED request: noop, snappy, zlib, zstd, unknown
    documents: int = 0           # documents sent: kind 1 sequences, inline write arrays
    sequences: int = 0           # kind 1 sections of the request
    more_to_come: bool = False   # the request asked for no reply
    exhaust: bool = False        # a reply the server streamed (moreToCome / Exhaust)
    truncated: bool = False      # a name cut, bytes lost or not decompressed past a bound
    request_bytes: int = 0
    status: str = ""             # "" no reply seen, ok, error
    code: int = 0
    code_name: str = ""
    errmsg: str = ""
    write_errors: int = 0
    returned: int = 0            # documents in the reply's batch (numberReturned)
    affected: int = 0            # n of insert, update, delete
    replies: int = 0
    reply_bytes: int = 0
    reply_compressor: str = ""
    latency_ns: int = 0

    def __post_init__(self) -> None:
        values = (self.documents, self.sequences, self.request_bytes, self.write_errors,
                  self.returned, self.affected, self.replies, self.reply_bytes,
                  self.latency_ns)
        if set(map(type, values)) != _INT_ONLY or min(values) < 0 or max(values) > U64:
            raise ValueError("a MongodbEvent count is not an integer in 0..2**64-1")
        if type(self.request_id) is not int or not 0 <= self.request_id <= 0xFFFFFFFF:
            raise ValueError(f"request_id={self.request_id!r} is not a uint32")
        if type(self.code) is not int or not -(1 << 31) <= self.code < (1 << 31):
            raise ValueError(f"code={self.code!r} is not an int32")
        if self.status not in STATUSES:
            raise ValueError(f"status={self.status!r} is not one of {STATUSES}")
        if self.opcode not in _OPCODE_NAMES:
            raise ValueError(f"opcode={self.opcode!r} is not a MongoDB opcode")
        if self.compressor not in _COMPRESSOR_NAMES \
                or self.reply_compressor not in _COMPRESSOR_NAMES:
            raise ValueError("compressor is not one of noop, snappy, zlib, zstd, unknown")
        # Bytes that are not UTF-8 are shown as \xNN: up to 4 characters per byte kept.
        if max(len(self.command), len(self.database), len(self.collection)) > MAX_NAME * 4 \
                or len(self.errmsg) > MAX_ERRMSG * 4 \
                or len(self.code_name) > MAX_CODE_NAME * 4:
            raise ValueError("a MongodbEvent name is longer than its bound")


# -- detection -----------------------------------------------------------------------------

def _doc_len_ok(first: bytes, at: int, room: int) -> bool:
    """A BSON document length at `at` (when it is there) fits in `room` bytes."""
    if len(first) < at + 4:
        return True
    n = _I32.unpack_from(first, at)[0]
    return 5 <= n <= room


def looks_like(first: bytes, direction: Direction) -> bool:
    """Whether the first bytes of a direction are a MongoDB message: a standard header with
    a plausible length (up to mongod's 48 MB), and then per opcode:
    - from the client, responseTo 0 (or -1, which old drivers sent) and a request opcode:
      OP_MSG with no unknown required flag bit, a section kind 0 or 1 and a body that fits;
      OP_QUERY with sane flags and a printable "db.collection" namespace; OP_COMPRESSED of a
      request opcode; the legacy OP_COMMAND/OP_GET_MORE/OP_INSERT/OP_UPDATE/OP_DELETE/
      OP_KILL_CURSORS;
    - from the server (a capture that starts after the request), responseTo not 0: OP_MSG
      whose one body section is the whole message, or OP_REPLY with sane flags whose first
      document fits.
    HTTP, TLS, DNS and RESP fail on the length or the opcode word."""
    if len(first) < 16:
        return False
    length, _, response_to, opcode = _HEAD.unpack_from(first)
    if not 16 < length <= MAX_MESSAGE:
        return False
    if direction == _TO_SERVER:
        if opcode not in REQUEST_OPS or response_to not in (0, -1):
            return False
        if opcode == OP_MSG:
            if length < 26:
                return False
            if len(first) >= 20 and _I32.unpack_from(first, 16)[0] & _MSG_REQUIRED_UNKNOWN:
                return False
            if len(first) >= 21 and first[20] not in (0, 1):
                return False
            return first[20:21] != b"\x00" or _doc_len_ok(first, 21, length - 21)
        if opcode == OP_QUERY:
            if length < 16 + 4 + 2 + 8 + 5:
                return False
            if len(first) >= 20 and _I32.unpack_from(first, 16)[0] & ~0xFE:
                return False
            ns = first[20:20 + 128]
            nul = ns.find(b"\x00")
            name = ns if nul < 0 else ns[:nul]
            if nul == 0 or not all(0x20 < b < 0x7F for b in name):
                return False
            return nul < 0 or b"." in name
        if opcode == OP_COMPRESSED:
            return length > 25 and (len(first) < 20 or
                                    _I32.unpack_from(first, 16)[0] in REQUEST_OPS - {OP_COMPRESSED})
        return length >= 24
    if opcode == OP_MSG:
        if len(first) < 21 or response_to == 0:
            return False
        flags = _I32.unpack_from(first, 16)[0]
        tail = 4 if flags & CHECKSUM_PRESENT else 0
        return not flags & _MSG_REQUIRED_UNKNOWN and first[20] == 0 and (
            len(first) < 25 or _I32.unpack_from(first, 21)[0] == length - 21 - tail)
    if opcode == OP_REPLY:
        if len(first) < 36 or response_to == 0 or length < 36:
            return False
        flags = _I32.unpack_from(first, 16)[0]
        returned = _I32.unpack_from(first, 32)[0]
        if flags & ~0xF or returned < 0 or (returned == 0) != (length == 36):
            return False
        return returned == 0 or _doc_len_ok(first, 36, length - 36)
    return False


# -- helpers -------------------------------------------------------------------------------

def _text(raw: bytes | bytearray, limit: int) -> tuple[str, bool]:
    """Bounded text; (text, cut). Bytes that are not UTF-8 are shown escaped."""
    cut = len(raw) > limit
    if cut:
        raw = raw[:limit]
    try:
        return bytes(raw).decode("utf-8"), cut
    except UnicodeDecodeError:
        return bytes(raw).decode("utf-8", "backslashreplace"), cut


def redact_errmsg(text: str) -> str:
    """An error message without the server's rendering of a document in it (E11000's
    `dup key: { email: "a@b" }` quotes the duplicate value)."""
    if "{" not in text:
        return text
    return _DOC_TEXT.sub("{ " + REDACTED + " }", text)


@functools.cache
def _zstd():
    """The zstd module (stdlib compression.zstd from Python 3.14, backports.zstd before)."""
    try:
        from compression import zstd  # type: ignore[import-not-found]
    except ImportError:
        from backports import zstd  # type: ignore[import-not-found,no-redef]
    return zstd


def inflate(compressor: int, data: bytes, limit: int = MAX_INFLATE) -> bytes:
    """At most `limit` bytes decompressed from `data` (which may be a prefix of the
    compressed stream). Raises _Malformed when the bytes are not of that format."""
    if compressor == 2:
        try:
            return zlib.decompressobj().decompress(data, limit)
        except zlib.error as exc:
            raise _Malformed(f"zlib data corrupt: {exc}") from None
    zstd = _zstd()
    try:
        return zstd.ZstdDecompressor().decompress(data, max_length=limit)
    except zstd.ZstdError as exc:
        raise _Malformed(f"zstd data corrupt: {exc}") from None


class _Txn:
    """One command being answered (mutable, private)."""

    __slots__ = ("rid", "opcode", "command", "database", "collection", "compressor",
                 "documents", "sequences", "more_to_come", "exhaust", "truncated",
                 "req_bytes", "req_ts", "ok", "failed", "errmsg", "code", "code_name",
                 "write_errors", "returned", "affected", "replies", "reply_bytes",
                 "reply_compressor", "resp_ts", "is_cmd", "query_exhaust")

    def __init__(self, rid: int, req_ts: int) -> None:
        self.rid = rid & 0xFFFFFFFF
        self.opcode = ""
        self.command = ""
        self.database = ""
        self.collection = ""
        self.compressor = ""
        self.documents = 0
        self.sequences = 0
        self.more_to_come = False
        self.exhaust = False
        self.truncated = False
        self.req_bytes = 0
        self.req_ts = req_ts          # -1: no request seen (unmatched reply, exhaust)
        self.ok: bool | None = None
        self.failed = False           # OP_REPLY QueryFailure / CursorNotFound
        self.errmsg = ""
        self.code = 0
        self.code_name = ""
        self.write_errors = 0
        self.returned = 0
        self.affected = 0
        self.replies = 0
        self.reply_bytes = 0
        self.reply_compressor = ""
        self.resp_ts = -1
        self.is_cmd = False           # the command is a document ($cmd, OP_MSG, OP_COMMAND)
        self.query_exhaust = False

    def follow_on(self) -> "_Txn":
        """The next reply of an exhaust stream: the same command, no request of its own."""
        t = _Txn(self.rid, -1)
        for name in ("opcode", "command", "database", "collection", "is_cmd",
                     "query_exhaust"):
            setattr(t, name, getattr(self, name))
        t.exhaust = True
        return t

    def status(self) -> str:
        if not self.replies:
            return ""
        if self.failed or self.ok is False or (self.ok is None and self.errmsg):
            return "error"
        return "ok"

    def transaction(self) -> Transaction:
        latency = self.resp_ts - self.req_ts if self.req_ts >= 0 and self.resp_ts >= 0 else 0
        code = self.code if -(1 << 31) <= self.code < (1 << 31) else 0
        event = MongodbEvent(
            opcode=self.opcode, command=self.command, database=self.database,
            collection=self.collection, request_id=self.rid, compressor=self.compressor,
            documents=self.documents, sequences=self.sequences,
            more_to_come=self.more_to_come, exhaust=self.exhaust, truncated=self.truncated,
            request_bytes=self.req_bytes, status=self.status(), code=code,
            code_name=self.code_name, errmsg=self.errmsg, write_errors=self.write_errors,
            returned=min(self.returned, U64), affected=min(self.affected, U64),
            replies=self.replies, reply_bytes=self.reply_bytes,
            reply_compressor=self.reply_compressor, latency_ns=latency if latency > 0 else 0,
        )
        ts = self.req_ts if self.req_ts >= 0 else max(self.resp_ts, 0)
        return Transaction(ts, event)  # type: ignore[arg-type]


class _Msg:
    """One message being walked (mutable, private). Offsets count from its first byte."""

    __slots__ = ("d", "op", "length", "off", "rid", "txn", "prog", "pc", "skip", "stack",
                 "flags", "sect_end", "seq_end", "cursor", "walk", "docs_seen", "ts",
                 "inner_op", "inner_size", "cid", "named")

    def __init__(self, d: int, op: int, length: int, rid: int, txn: _Txn, ts: int) -> None:
        self.d = d
        self.op = op                  # effective opcode (the inner one once decompressed)
        self.length = length
        self.off = 16
        self.rid = rid
        self.txn = txn
        self.prog = PROGRAMS[op]
        self.pc = 0
        self.skip = 0                 # bytes of this message to pass over before going on
        self.stack: list[list[int]] = []  # documents being walked: [end NUL offset, role, index]
        self.flags = 0
        self.sect_end = length
        self.seq_end = 0              # inside a kind 1 section: where it ends
        self.cursor = 0
        self.walk = False             # OP_REPLY: its first document is a command reply
        self.docs_seen = 0
        self.ts = ts
        self.inner_op = 0             # OP_COMPRESSED: the inner opcode, size, compressor
        self.inner_size = 0
        self.cid = 0
        self.named = False            # the command document's first key was read

    @property
    def done(self) -> bool:
        return self.pc >= len(self.prog) and not self.skip and not self.stack


class MongodbParser:
    """The MongoDB wire protocol for one TCP connection. See the module docstring."""

    name = APP_PROTO

    def __init__(self, *, redact: bool = True, max_pending: int = MAX_PENDING) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        self.state = _OK
        self.error = ""
        self.redact = redact
        self.max_pending = max_pending
        self.transactions = 0
        self.unmatched_replies = 0    # replies with no request waiting (capture began late)
        self.evicted = 0              # requests reported early: too many waiting
        self.lost_messages = 0        # messages cut by a gap or skip inside them
        self._buf = (bytearray(), bytearray())
        self._ts = [0, 0]             # time of the first buffered byte
        self._cur: list[_Msg | None] = [None, None]
        self._eof = [False, False]
        self._pending: dict[int, _Txn] = {}   # requestID (or exhaust reply id) -> command
        self._out: list[Transaction] = []
        self._first_db = ""
        self._first_command = ""
        self._first_collection = ""

    # -- the L7Parser contract -------------------------------------------------------------

    def receive_data(self, direction: Direction, data: bytes, ts_ns: int) -> None:
        if self.state is not _OK or not data:
            return
        d = int(direction)
        if self._eof[d]:
            return
        buf = self._buf[d]
        m = self._cur[d]
        if m is not None and m.skip > len(data) and not buf:
            # Inside a value or message body not needed: count it, copy nothing.
            m.skip -= len(data)
            m.off += len(data)
            return
        if buf:
            buf += data
            view: bytes | bytearray = buf
        else:
            view = data
            self._ts[d] = ts_ns
        try:
            pos = self._run(d, view, ts_ns)
        except _Malformed as exc:
            self._fail(str(exc))
            return
        if self.state is not _OK:
            return
        if view is buf:
            del buf[:pos]
            if pos:
                self._ts[d] = ts_ns
        elif pos < len(data):
            buf += data[pos:]
        if len(buf) > MAX_BUFFER:
            self._fail(f"more than {MAX_BUFFER} bytes buffered")

    def receive_datagram(self, direction: Direction, data: bytes, ts_ns: int) -> None:
        self._fail("the MongoDB wire protocol runs over a stream, got a datagram")

    def receive_gap(self, direction: Direction, length: int, ts_ns: int) -> None:
        self._lost(int(direction), length, "gap")

    def receive_skip(self, direction: Direction, length: int, ts_ns: int) -> None:
        self._lost(int(direction), length, "skip")

    def receive_eof(self, direction: Direction, ts_ns: int) -> None:
        d = int(direction)
        if self.state is not _OK or self._eof[d]:
            return
        self._eof[d] = True
        self._buf[d].clear()
        m = self._cur[d]
        self._cur[d] = None
        if m is not None:
            m.txn.truncated = True    # cut by the end of the stream
            if d == 1 or not self._waiting(m):
                self._emit(m.txn)     # cut short, and no reply will report it: what was seen
        if d == 1:
            self._flush()             # no reply can come any more
        if self._eof[0] and self._eof[1]:
            self._flush()
            self.state = _DONE

    def skip_hint(self, direction: Direction) -> int:
        d = int(direction)
        m = self._cur[d]
        if self.state is not _OK or m is None or self._buf[d]:
            return 0
        return m.skip

    def next_event(self) -> Transaction | _NeedData:
        if self._out:
            return self._out.pop(0)
        return NEED_DATA

    def summary(self) -> dict[str, str]:
        out = {}
        if self._first_db:
            out["mongodb_database"] = self._first_db
        if self._first_command:
            out["mongodb_command"] = self._first_command
        if self._first_collection:
            out["mongodb_collection"] = self._first_collection
        return out

    # -- messages ----------------------------------------------------------------------------

    def _run(self, d: int, view: bytes | bytearray, ts_ns: int) -> int:
        """Walk every message as far as view goes; return the bytes consumed."""
        pos, end = 0, len(view)
        first_ts = self._ts[d]
        while True:
            m = self._cur[d]
            if m is None:
                if end - pos < 16:
                    return pos
                m = self._header(d, view, pos, first_ts if pos == 0 else ts_ns)
                pos += 16
                self._cur[d] = m
            pos = self._advance(m, view, pos, end)
            if not m.done:
                return pos
            self._cur[d] = None
            self._complete(m)

    def _header(self, d: int, view: bytes | bytearray, pos: int, ts: int) -> _Msg:
        length, rid, response_to, op = _HEAD.unpack_from(view, pos)
        if not 16 <= length <= MAX_MESSAGE:
            raise _Malformed(f"message length {length} outside 16..{MAX_MESSAGE}")
        if op not in (REQUEST_OPS if d == 0 else REPLY_OPS):
            side = "client" if d == 0 else "server"
            raise _Malformed(f"opcode {op} is not a {side} opcode")
        if d == 0:
            txn = _Txn(rid, ts)
            txn.opcode = OPCODES[op]
            txn.req_bytes = length
            txn.command = _LEGACY_COMMANDS.get(op, "")
            txn.is_cmd = op in (OP_MSG, OP_COMMAND)
            if op not in _NO_REPLY_OPS:
                self._register(rid & 0xFFFFFFFF, txn)
        else:
            txn = self._pending.pop(response_to & 0xFFFFFFFF, None)
            if txn is None:
                self.unmatched_replies += 1
                txn = _Txn(0, -1)
            if txn.resp_ts < 0:
                txn.resp_ts = ts
            txn.replies += 1
            txn.reply_bytes += length
        return _Msg(d, op, length, rid, txn, ts)

    def _register(self, rid: int, txn: _Txn) -> None:
        old = self._pending.pop(rid, None)
        if old is not None and old.req_ts >= 0:
            self._emit(old)           # a request id used again: the old one got no reply
        if len(self._pending) >= self.max_pending:
            oldest = self._pending.pop(next(iter(self._pending)))
            self.evicted += 1
            if oldest.req_ts >= 0:    # an exhaust stream's next reply has no request
                self._emit(oldest)
        self._pending[rid] = txn

    def _complete(self, m: _Msg) -> None:
        txn = m.txn
        if m.d == 0:
            if not self._first_command and txn.command:
                self._first_command = txn.command
            if not self._first_db and txn.database:
                self._first_db = txn.database
            if not self._first_collection and txn.collection:
                self._first_collection = txn.collection
            no_reply = m.op in _NO_REPLY_OPS or (m.op == OP_MSG and m.flags & MORE_TO_COME)
            if no_reply:
                txn.more_to_come = m.op == OP_MSG
                if self._pending.get(m.rid & 0xFFFFFFFF) is txn:
                    del self._pending[m.rid & 0xFFFFFFFF]
                self._emit(txn)
            return
        more = (m.op == OP_MSG and m.flags & MORE_TO_COME) or (
            m.op == OP_REPLY and txn.query_exhaust and m.cursor != 0)
        if more:
            txn.exhaust = True
            self._register(m.rid & 0xFFFFFFFF, txn.follow_on())
        self._emit(txn)

    def _waiting(self, m: _Msg) -> bool:
        """Whether m's command waits for a reply (so a flush reports it)."""
        return self._pending.get(m.rid & 0xFFFFFFFF) is m.txn

    def _emit(self, txn: _Txn) -> None:
        self._out.append(txn.transaction())
        self.transactions += 1

    def _flush(self) -> None:
        pending = list(self._pending.values())
        self._pending.clear()
        for txn in pending:
            if txn.req_ts >= 0:       # an exhaust stream that ended has no request of its own
                self._emit(txn)

    def _lost(self, d: int, length: int, what: str) -> None:
        if self.state is not _OK or length <= 0 or self._eof[d]:
            return
        m = self._cur[d]
        buf = self._buf[d]
        if m is not None and not buf and length <= m.skip:
            m.skip -= length          # what skip_hint offered (or a loss inside a value)
            m.off += length
            if m.done:
                self._cur[d] = None
                self._complete(m)
            return
        if m is not None and m.off + len(buf) + length <= m.length:
            # Lost inside a message of known length: that message is cut, the next one is
            # where its length says.
            self.lost_messages += 1
            m.txn.truncated = True
            left = m.length - (m.off + len(buf) + length)
            buf.clear()
            m.stack.clear()
            m.prog = (S_REST,)
            m.pc = 1
            m.off = m.length - left
            m.skip = left
            if m.done:
                self._cur[d] = None
                self._complete(m)
            return
        self._fail(f"{what} of {length} bytes across a message boundary")

    def _fail(self, reason: str) -> None:
        if self.state is not _OK:
            return
        for d in (1, 0):
            m = self._cur[d]
            if m is not None and (d == 1 or not self._waiting(m)):
                self._emit(m.txn)
        self._flush()
        self._cur = [None, None]
        self.state = _ERROR
        self.error = reason
        self._buf[0].clear()
        self._buf[1].clear()

    # -- the walk ----------------------------------------------------------------------------

    def _advance(self, m: _Msg, view: bytes | bytearray, pos: int, end: int) -> int:
        """Run m's program over view[pos:end]; return where it stopped (it needs more, or
        the message is done)."""
        while True:
            if m.skip:
                k = end - pos
                if k < m.skip:
                    m.skip -= k
                    m.off += k
                    return end
                pos += m.skip
                m.off += m.skip
                m.skip = 0
            if m.stack:
                got = self._element(m, view, pos, end)
                if got < 0:
                    return pos
                pos = got
                continue
            if m.pc >= len(m.prog):
                return pos
            stage = m.prog[m.pc]
            left = m.length - m.off
            avail = end - pos
            if stage == S_REST:
                m.skip = left
                m.pc += 1
            elif stage == S_SECTIONS:
                got = self._section(m, view, pos, end)
                if got < 0:
                    return pos
                pos = got
            elif stage == S_FLAGS or stage == S_ZERO:
                if left < 4:
                    raise _Malformed(f"{OPCODES[m.op]} too short")
                if avail < 4:
                    return pos
                flags = _I32.unpack_from(view, pos)[0]
                pos += 4
                m.off += 4
                m.pc += 1
                if stage == S_FLAGS:
                    self._flags(m, flags)
            elif stage == S_NS or stage == S_DB or stage == S_CMDNAME:
                got = _cstring(view, pos, end, min(left, MAX_KEY + 1))
                if got is None:
                    return pos
                raw, nxt = got
                m.off += nxt - pos
                pos = nxt
                m.pc += 1
                if m.d == 0:
                    self._names(m, stage, raw)
            elif stage == S_SKIP8:
                if left < 8:
                    raise _Malformed("OP_QUERY too short")
                m.skip = 8
                m.pc += 1
            elif stage == S_DOC:
                if left == 0 and m.op == OP_REPLY:
                    m.pc += 1                 # a reply with no documents (numberReturned 0)
                    continue
                if left < 5:
                    raise _Malformed(f"{OPCODES[m.op]} without its document")
                if avail < 4:
                    return pos
                n = _I32.unpack_from(view, pos)[0]
                if n < 5 or n > left:
                    raise _Malformed(f"document length {n} outside 5..{left}")
                m.pc += 1
                role = self._doc_role(m)
                m.docs_seen += 1
                if role:
                    m.stack.append([m.off + n - 1, role, 0])
                    pos += 4
                    m.off += 4
                else:
                    m.skip = n
            elif stage == S_DOCS:
                if left == 0:
                    m.pc += 1
                    continue
                if avail < 4:
                    return pos
                n = _I32.unpack_from(view, pos)[0]
                if n < 5 or n > left:
                    raise _Malformed(f"document length {n} outside 5..{left}")
                m.txn.documents += 1
                m.skip = n
            elif stage == S_RHEAD:
                if left < 20:
                    raise _Malformed("OP_REPLY too short")
                if avail < 20:
                    return pos
                self._reply_head(m, view, pos)
                pos += 20
                m.off += 20
                m.pc += 1
            elif stage == S_CHEAD:
                if left < 9:
                    raise _Malformed("OP_COMPRESSED too short")
                if avail < 9:
                    return pos
                self._compressed_head(m, view, pos)
                pos += 9
                m.off += 9
            elif stage == S_CBODY:
                take = left if left < MAX_COMPRESSED_IN else MAX_COMPRESSED_IN
                if avail < take:
                    return pos
                self._inflate(m, bytes(view[pos:pos + take]), take < left)
                pos += take
                m.off += take
                m.pc += 1

    def _flags(self, m: _Msg, flags: int) -> None:
        m.flags = flags
        if m.op == OP_MSG:
            if flags & _MSG_REQUIRED_UNKNOWN:
                raise _Malformed(f"OP_MSG flags 0x{flags & 0xFFFFFFFF:x} set an unknown "
                                 "required bit")
            if flags & CHECKSUM_PRESENT:
                m.sect_end = m.length - 4
                if m.sect_end < m.off:
                    raise _Malformed("OP_MSG too short for its checksum")
        elif m.op == OP_QUERY and m.d == 0:
            m.txn.query_exhaust = bool(flags & QUERY_EXHAUST)

    def _names(self, m: _Msg, stage: int, raw: bytes) -> None:
        txn = m.txn
        if stage == S_DB:
            txn.database, cut = _text(raw, MAX_NAME)
        elif stage == S_CMDNAME:
            txn.command, cut = _text(raw, MAX_NAME)
        else:
            db, dot, coll = raw.partition(b".")
            txn.database, cut = _text(db, MAX_NAME)
            if m.op == OP_QUERY and coll == b"$cmd":
                txn.is_cmd = True
                txn.command = ""
            elif m.op == OP_QUERY and coll.startswith(b"$cmd.sys."):
                txn.command, cut2 = _text(coll[5:], MAX_NAME)   # legacy $cmd.sys.inprog
                cut = cut or cut2
            else:
                txn.collection, cut2 = _text(coll, MAX_NAME)
                cut = cut or cut2
        txn.truncated = txn.truncated or cut

    def _doc_role(self, m: _Msg) -> int:
        if m.op == OP_QUERY:
            return R_CMD if m.txn.is_cmd else 0
        if m.op == OP_REPLY:
            return R_REPLY if m.walk else 0
        if m.op == OP_COMMAND:
            return R_CMD if m.docs_seen == 1 else 0   # metadata first, then the arguments
        return R_REPLY                                 # OP_COMMANDREPLY: the reply first

    def _reply_head(self, m: _Msg, view: bytes | bytearray, pos: int) -> None:
        flags = _I32.unpack_from(view, pos)[0]
        m.cursor = _I64.unpack_from(view, pos + 4)[0]
        returned = _I32.unpack_from(view, pos + 16)[0]
        txn = m.txn
        if returned > 0:
            txn.returned += returned
        if flags & QUERY_FAILURE:
            txn.failed = True
        if flags & CURSOR_NOT_FOUND:
            txn.failed = True
            txn.code_name = txn.code_name or "CursorNotFound"
        # The first document is a command reply, or the $err document of a failed query;
        # otherwise it is a user's document and nothing of it is read.
        m.walk = txn.is_cmd or bool(flags & QUERY_FAILURE)

    def _compressed_head(self, m: _Msg, view: bytes | bytearray, pos: int) -> None:
        inner, size, cid = struct.unpack_from("<iiB", view, pos)
        allowed = REQUEST_OPS if m.d == 0 else REPLY_OPS
        if inner not in allowed or inner == OP_COMPRESSED:
            raise _Malformed(f"OP_COMPRESSED of opcode {inner}")
        if not 0 <= size <= MAX_MESSAGE:
            raise _Malformed(f"OP_COMPRESSED uncompressed size {size}")
        name = COMPRESSORS.get(cid, "unknown")
        m.inner_op, m.inner_size, m.cid = inner, size, cid
        txn = m.txn
        if m.d == 0:
            txn.compressor = name
            txn.opcode = OPCODES[inner]
            txn.command = _LEGACY_COMMANDS.get(inner, "")
            txn.is_cmd = inner in (OP_MSG, OP_COMMAND)
        else:
            txn.reply_compressor = name
        if cid == 0:
            # noop: the inner message's body follows as it is.
            if size != m.length - 25:
                raise _Malformed("OP_COMPRESSED noop size differs from the message's")
            m.op = inner
            m.prog = PROGRAMS[inner]
            m.pc = 0
            m.off -= 9                # the inner program counts from its own header
            m.length -= 9
            m.sect_end = m.length
            return
        m.pc += 1
        if cid not in (2, 3):
            m.pc += 1                 # snappy or unknown: noted, the body is skipped

    def _inflate(self, m: _Msg, data: bytes, cut: bool) -> None:
        """Walk the inner message of a zlib or zstd OP_COMPRESSED from a bounded prefix of
        its compressed bytes (`cut`: there were more) into a bounded output."""
        out = inflate(m.cid, data)
        inner = _Msg(m.d, m.inner_op, 16 + m.inner_size, m.rid, m.txn, m.ts)
        self._advance(inner, out, 0, len(out))
        if not inner.done:
            m.txn.truncated = True    # past MAX_COMPRESSED_IN or MAX_INFLATE, or lying size
        m.op = inner.op
        m.flags = inner.flags
        m.cursor = inner.cursor

    # -- sections and elements -----------------------------------------------------------

    def _section(self, m: _Msg, view: bytes | bytearray, pos: int, end: int) -> int:
        """One step of OP_MSG's sections; -1 when more bytes are needed."""
        if m.seq_end:
            # Documents are counted by their lengths, never read: a run of them in view is
            # passed over here at once; one that goes past the view is skipped.
            start = pos
            count = 0
            while True:
                if m.off == m.seq_end:
                    m.seq_end = 0
                    break
                if end - pos < 4:
                    break
                n = _I32.unpack_from(view, pos)[0]
                if n < 5 or m.off + n > m.seq_end:
                    raise _Malformed("document sequence element does not fit its section")
                count += 1
                if end - pos < n:
                    m.skip = n
                    break
                pos += n
                m.off += n
            if m.d == 0:
                m.txn.documents += count
            else:
                m.txn.returned += count
            return pos if (pos > start or count or not m.seq_end) else -1
        if m.off == m.sect_end:
            m.pc += 1
            return pos
        if m.off > m.sect_end:
            raise _Malformed("OP_MSG sections overrun the message")
        if end - pos < 5:
            return -1
        kind = view[pos]
        n = _I32.unpack_from(view, pos + 1)[0]
        room = m.sect_end - m.off - 1
        if kind == 0:
            if n < 5 or n > room:
                raise _Malformed(f"OP_MSG body length {n} outside 5..{room}")
            m.stack.append([m.off + n, R_CMD if m.d == 0 else R_REPLY, 0])
            m.off += 5
            return pos + 5
        if kind == 1:
            if n < 5 or n > room:
                raise _Malformed(f"OP_MSG sequence length {n} outside 5..{room}")
            got = _cstring(view, pos + 5, end, min(n - 4, MAX_KEY + 1))
            if got is None:
                return -1
            nxt = got[1]
            m.seq_end = m.off + 1 + n
            m.off += nxt - pos
            if m.d == 0:
                m.txn.sequences += 1
            return nxt
        raise _Malformed(f"OP_MSG section kind {kind}")

    def _element(self, m: _Msg, view: bytes | bytearray, pos: int, end: int) -> int:
        """The elements (and ends) of the documents walked, as many as view holds; where it
        stopped, or -1 when not even the first one is whole yet.

        One call walks a whole document when its bytes are there: the elements passed over
        (most of them) are stepped across here instead of through _advance's skip, and the
        ones no role reads (a batch's documents, a write's array) are only counted, their
        keys never copied. The hot loop of the parser (benchmarks: bench_mongodb)."""
        stack = m.stack
        start = pos
        off = m.off
        while stack:
            top = stack[-1]
            doc_end = top[0]
            if off >= doc_end:
                if off > doc_end:
                    raise _Malformed("element runs past the end of its document")
                if pos >= end:
                    break
                if view[pos] != 0:
                    raise _Malformed("document not ended by a NUL")
                stack.pop()
                off += 1
                pos += 1
                continue
            if end - pos < 2:
                break
            t = view[pos]
            # The key, a C string bounded by MAX_KEY and the document (_cstring, inline).
            kpos = pos + 1
            limit = doc_end - off - 1
            stop = kpos + (limit if limit < MAX_KEY + 1 else MAX_KEY + 1)
            nul = view.find(b"\x00", kpos, stop if stop < end else end)
            if nul < 0:
                if end >= stop:
                    raise _Malformed("C string longer than its bound")
                break
            vpos = nul + 1
            hdr = vpos - pos
            size = _FIXED_SIZE[t]
            if size >= 0:
                if end - vpos < size:
                    break
            elif t == 0x0B:              # regex: two C strings
                room = doc_end - off - hdr
                a = _cstring(view, vpos, end, min(room, MAX_KEY + 1))
                if a is None:
                    break
                b = _cstring(view, a[1], end, min(room - (a[1] - vpos), MAX_KEY + 1))
                if b is None:
                    break
                size = b[1] - vpos
            else:
                if end - vpos < 4:
                    break
                n = _I32.unpack_from(view, vpos)[0]
                if t in _STRINGS:
                    if n < 1:
                        raise _Malformed("bad BSON string length")
                    size = 4 + n
                elif t == 0x03 or t == 0x04:
                    if n < 5:
                        raise _Malformed("bad BSON document length")
                    size = n
                elif t == 0x05:
                    if n < 0:
                        raise _Malformed("bad BSON binary length")
                    size = 5 + n
                elif t == 0x0F:
                    if n < 14:
                        raise _Malformed("bad BSON code-with-scope length")
                    size = n
                elif t == 0x0C:
                    if n < 1:
                        raise _Malformed("bad BSON DBPointer length")
                    size = 4 + n + 12
                else:
                    raise _Malformed(f"unknown BSON type 0x{t:02x}")
            if off + hdr + size > doc_end:
                raise _Malformed("element runs past the end of its document")
            # A string is read only once the part that may be kept is here: deciding what to
            # do with an element changes state (the command name), so it must happen once.
            if t == 0x02 and end - vpos < (size if size < _STR_WANT else _STR_WANT):
                break
            index = top[2]
            top[2] = index + 1
            role = top[1]
            if role == R_BATCH:
                m.txn.returned += 1
                act = None
            elif role == R_COUNT:
                m.txn.documents += 1
                act = None
            else:
                act = self._act(m, role, index, bytes(view[kpos:nul]), t)
            if act is not None:
                kind, arg = act
                if kind == "doc" and (t == 0x03 or t == 0x04) and len(stack) < MAX_DEPTH:
                    stack.append([off + hdr + size - 1, arg, 0])
                    off += hdr + 4
                    pos = vpos + 4
                    continue
                if kind == "num" and t in _NUMBERS:
                    if t == 0x01:
                        value = _F64.unpack_from(view, vpos)[0]
                        num = int(value) if value == value and abs(value) < 2 ** 63 else 0
                        truthy = value != 0
                    elif t == 0x08:
                        num = view[vpos]
                        truthy = num != 0
                    elif t == 0x10:
                        num = _I32.unpack_from(view, vpos)[0]
                        truthy = num != 0
                    else:
                        num = _I64.unpack_from(view, vpos)[0]
                        truthy = num != 0
                    self._number(m.txn, arg, num, truthy)
                elif kind == "str" and t == 0x02:
                    n = size - 4              # with its NUL
                    cap = MAX_ERRMSG if arg == T_ERRMSG else \
                        MAX_CODE_NAME if arg == T_CODE_NAME else MAX_NAME
                    keep = n - 1 if n - 1 <= cap else cap
                    full = keep == n - 1
                    need = 4 + keep + (1 if full else 0)
                    if end - vpos < need:
                        break
                    raw = view[vpos + 4:vpos + 4 + keep]
                    if full and view[vpos + 4 + keep] != 0:
                        raise _Malformed("BSON string not ended by a NUL")
                    self._string(m, arg, raw, not full)
            # Passed over: at once when its bytes are here, else by _advance's skip.
            skip = hdr + size
            if end - pos >= skip:
                pos += skip
                off += skip
                continue
            m.skip = skip
            break
        m.off = off
        return pos if pos > start or m.skip else -1

    def _act(self, m: _Msg, role: int, index: int, key: bytes, t: int):
        """What to do with an element: None (skip it), or (kind, target)."""
        txn = m.txn
        if role == R_CMD:
            if m.d != 0:
                return None
            if index == 0 and not m.named:
                if t == 0x03 and m.op == OP_QUERY and key in (b"$query", b"query"):
                    return ("doc", R_CMD)     # the legacy {$query: {...}} wrapper
                m.named = True
                txn.command, cut = _text(key, MAX_NAME)
                txn.truncated = txn.truncated or cut
                low = txn.command.lower()
                if low == "explain":
                    return ("doc", R_EXPLAIN)
                if low in COLLECTION_COMMANDS:
                    return ("str", T_COMMAND_COLL)
                if low in NAMESPACE_COMMANDS:
                    return ("str", T_NS_COLL)
                return None
            if key == b"$db":
                return ("str", T_DB)
            if key == b"collection" and txn.command == "getMore":
                return ("str", T_GETMORE_COLL)
            if t == 0x04 and _WRITE_ARRAYS.get(txn.command) == key:
                return ("doc", R_COUNT)
            return None
        if role == R_EXPLAIN:
            if index == 0 and key.lower().decode("latin-1") in COLLECTION_COMMANDS:
                return ("str", T_COMMAND_COLL)
            return None
        if role == R_COUNT:
            txn.documents += 1
            return None
        if role == R_REPLY or role == R_WERR:
            first = role == R_REPLY
            if key == b"ok" and first:
                return ("num", "ok")
            if key == b"errmsg" or key == b"$err":
                return ("str", T_ERRMSG)
            if key == b"code":
                return ("num", "code")
            if key == b"codeName":
                return ("str", T_CODE_NAME)
            if not first:
                return None
            if key == b"n" and txn.command in _WRITES:
                return ("num", "n")
            if key == b"cursor":
                return ("doc", R_CURSOR)
            if key == b"writeErrors":
                return ("doc", R_WERRS)
            if key == b"writeConcernError":
                return ("doc", R_WERR)
            return None
        if role == R_CURSOR:
            if key == b"firstBatch" or key == b"nextBatch":
                return ("doc", R_BATCH)
            return None
        if role == R_BATCH:
            txn.returned += 1
            return None
        if role == R_WERRS:
            txn.write_errors += 1
            return ("doc", R_WERR) if index == 0 else None
        return None

    def _number(self, txn: _Txn, what: str, num: int, truthy: bool) -> None:
        if what == "ok":
            txn.ok = truthy
        elif what == "code":
            if not txn.code:
                txn.code = num
        elif what == "n":
            txn.affected = num if num > 0 else 0

    def _string(self, m: _Msg, target: int, raw: bytes | bytearray, cut: bool) -> None:
        txn = m.txn
        text, cut2 = _text(raw, MAX_ERRMSG)
        cut = cut or cut2
        if target == T_ERRMSG:
            if not txn.errmsg:
                txn.errmsg = redact_errmsg(text) if self.redact else text
            return
        if target == T_CODE_NAME:
            if not txn.code_name:
                txn.code_name = text
            return
        txn.truncated = txn.truncated or cut
        if target == T_DB:
            txn.database = text
        elif target == T_NS_COLL:
            txn.collection = text.partition(".")[2]
        else:
            txn.collection = text


def _cstring(view: bytes | bytearray, pos: int, end: int, limit: int):
    """A C string at pos: (its bytes, the position after its NUL); None while its NUL is not
    there yet. `limit` bounds where the NUL may be (MAX_KEY, or what is left of the
    enclosing document or message)."""
    stop = pos + limit
    nul = view.find(b"\x00", pos, stop if stop < end else end)
    if nul < 0:
        if end >= stop:
            raise _Malformed("C string longer than its bound")
        return None
    return bytes(view[pos:nul]), nul + 1


# -- registration (sensor/l7/registry.py) --------------------------------------------------

def table_line(d: MongodbEvent) -> list[tuple[str, str | None]]:
    from sensor.export.table import duration  # rendering only; not needed to parse

    where = ".".join(x for x in (d.database, d.collection) if x)
    out = [(f"{d.command or d.opcode or 'reply'} {where}".rstrip(), None), ("->", "dim")]
    if d.status == "error":
        out.append((f"error {d.code_name or d.code or ''} {d.errmsg}".strip(), "red"))
    else:
        out.append((d.status or "-", None))
    if d.write_errors:
        out.append((f"write_errors={d.write_errors}", "red"))
    if d.latency_ns:
        out.append((duration(d.latency_ns), None))
    return out


# The parser's summary() keys (the first database, command and collection) are the Flow's
# l7_summary map, where --mongo-collection matches a flow by its first collection.
PROTOCOL = Protocol(
    name=APP_PROTO, event=MongodbEvent, parser=MongodbParser, options=("redact",),
    tcp_ports=PORTS, signature=looks_like, priority=32,
    summary_keys=("mongodb_database", "mongodb_command", "mongodb_collection"),
    column_types={"request_id": "u32", "code": "i32"}, line=table_line, style="green",
    filters=(
        Filter(name="mongo_collection", field="collection", match="glob_case",
               flow_field="mongodb_collection",
               help="collection glob: 'users*'"),
    ),
)
