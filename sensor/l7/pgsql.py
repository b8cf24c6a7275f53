"""PostgreSQL frontend/backend protocol v3 from a reassembled TCP stream, sans-I/O.

Framing. After the start-up packets (untyped: Int32 length, Int32 code), every message
is one type byte and an Int32 length that counts itself (protocol docs, "Message
Formats"). Each direction is framed on its own. A message's body is buffered only up to
MAX_KEPT bytes, the prefix the fields Loupe reads need; the rest is counted and skipped.
DataRow and CopyData bodies are never buffered at all: skip_hint() hands their length to
the engine, so the kernel need not copy them, and a gap or skip inside one costs nothing.
A gap that reaches into a header or a kept prefix loses the framing: ERROR.

Transactions (one PgsqlEvent each), paired by order, as the server answers in order:
- "startup": StartupMessage .. ReadyForQuery (or the ErrorResponse that refuses it):
  user, database, application_name, the authentication method the server asked for,
  server_version (ParameterStatus), the backend pid (never the cancel key).
- "ssl_request" / "gssenc_request": the one-byte answer. 'S' means TLS follows: every
  later byte goes to the TLS parser (sensor/l7/upgrade.py), whose TlsEvents (kind "tls")
  follow; client bytes sent before the answer are held until it comes. 'G' means GSSAPI
  encryption: the parser is DONE.
- "cancel": a CancelRequest (no answer exists; emitted at once).
- "query": one simple-query cycle, Query .. ReadyForQuery. A query string may hold several
  statements: command_tag is the last CommandComplete tag, rows the sum of their row
  counts, commands how many completed.
- "execute": one extended-protocol Execute, with the statement text joined through the
  portal (Bind) to the prepared statement (Parse), the unnamed one included. Messages
  from the first one after the previous Execute/Sync up to the Execute form its group;
  latency runs from the group's first client byte to the first server byte answering it.
  An ErrorResponse discards the rest of the group up to Sync (the server does the same):
  every Execute discarded carries the error. A failing group without an Execute (a
  Parse that does not compile) is reported as kind "parse".
- "error": an ErrorResponse that answers nothing pending (e.g. FATAL on shutdown).
Errors are data: severity (the non-localized V field when sent), SQLSTATE and message.

Rows. `rows` is the count from the CommandComplete tag ("SELECT 10" -> 10, "INSERT 0 5"
-> 5), exact even when the bodies were skipped. `data_rows` counts DataRow headers seen;
it equals `rows` unless whole DataRow messages were left out on purpose (see Framing:
a kernel that follows the framing keeps the budget flat for a 100,000-row result) or the
capture lost framing. Row values are never kept.

Prepared statements live in a map bounded by MAX_PREPARED (least recently defined
evicted first, counted in `evicted_statements`); an Execute of an evicted or unseen
statement has an empty statement text.

Redaction (on by default): PasswordMessage, SASLInitialResponse/SASLResponse and GSS
payloads are never copied (only the SASL mechanism name is kept); in statement text,
the literal after PASSWORD (CREATE/ALTER ROLE/USER ... PASSWORD '...') and password=
values in connection strings are replaced with REDACTED.
"""

from __future__ import annotations

import re
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass

from sensor.l7.base import NEED_DATA, Direction, ParserState, Transaction, _NeedData
from sensor.l7.registry import Filter, FramingHints, KernelWalk, Protocol
from sensor.l7.redact import REDACTED
from sensor.l7.upgrade import MAX_HELD, Handover

APP_PROTO = "pgsql"
PORTS = (5432,)
# Flow-summary fields this protocol contributes (see PgsqlParser.summary).
SUMMARY_FIELDS = ("pgsql_user", "pgsql_database", "pgsql_statement")

_OK, _DONE, _ERROR = ParserState.OK, ParserState.DONE, ParserState.ERROR
_TO_SERVER, _TO_CLIENT = Direction.TO_SERVER, Direction.TO_CLIENT

# A statement in a record is cut at 4096 characters (flagged `truncated`): long enough
# for any hand-written query, short enough that a bulk INSERT does not make a 1 MB record.
MAX_STATEMENT = 4096
# The prefix of a message body kept for parsing: a statement name (NAMEDATALEN is 64),
# the statement text up to MAX_STATEMENT in up to 4-byte UTF-8, and slack for the other
# fields. Error and parameter messages are far shorter; longer ones are cut here.
MAX_KEPT = 4 * MAX_STATEMENT + 512
# The server refuses start-up packets above 10000 bytes (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP = 10000
# Prepared statements remembered per connection. ORMs and drivers that prepare every
# distinct query keep a few hundred at most; each entry holds up to MAX_STATEMENT
# characters, so 256 bounds a flow at about 1 MB.
MAX_PREPARED = 256
# Portals are short-lived (usually only the unnamed one); the same reasoning.
MAX_PORTALS = 64
# Client messages awaiting their answer. psycopg's pipeline mode and JDBC batches send
# a few hundred before reading; past this the oldest is reported unanswered.
MAX_PENDING = 4096
# Message texts from the server (error message, tag, parameter values) in a record.
MAX_TEXT = 1024

_PROTOCOL_3 = 196608       # 3.0
_CANCEL = 80877102
_SSL = 80877103
_GSSENC = 80877104

KINDS = ("startup", "ssl_request", "gssenc_request", "cancel", "query", "execute",
         "parse", "error")
_AUTH_NAMES = {0: "trust", 2: "kerberos5", 3: "cleartext", 5: "md5", 7: "gss", 9: "sspi",
               10: "sasl"}
_ROW_COMMANDS = frozenset(("SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "FETCH",
                           "MOVE", "COPY"))
_FRONTEND = frozenset(b"QPBDESHCXdcfpF")
_BACKEND = frozenset(b"R S K Z E N A v 1 2 3 n t T D C s I G H W d c V".replace(b" ", b""))
# Bodies never needed: counted and skipped.
_SKIPPED = frozenset(b"Dd")
_HEAD = struct.Struct(">BI")   # type byte, length (counting itself)
_U32 = (1 << 32) - 1

# PASSWORD 'literal' (CREATE/ALTER ROLE/USER, user mappings' OPTIONS (password '...')),
# with an optional E prefix (backslash escapes inside), doubled quotes inside, or a dollar-quoted literal; an
# unterminated literal (text cut at MAX_STATEMENT) is hidden to its end.
_PASSWORD_LITERAL = re.compile(
    r"(\bpassword\s*(?:=\s*)?)(?:(?:[Ee]'(?:[^'\\]|\\.|'')*|'(?:[^']|'')*)(?:'|\Z)"
    r"|\$([A-Za-z_]*)\$.*?(?:\$\2\$|\Z))",
    re.IGNORECASE | re.DOTALL)
# password=secret inside a libpq connection string (dblink, postgres_fdw).
_CONNSTR_PASSWORD = re.compile(r"(\bpassword\s*=\s*)(?!')[^\s']+", re.IGNORECASE)


def redact_sql(text: str) -> str:
    """Statement text with password literals replaced by REDACTED."""
    if "assword" not in text and "ASSWORD" not in text and "Assword" not in text:
        return text  # the common case: one scan per spelling, no regex
    text = _PASSWORD_LITERAL.sub(lambda m: f"{m.group(1)}'{REDACTED}'", text)
    return _CONNSTR_PASSWORD.sub(lambda m: m.group(1) + REDACTED, text)


def looks_like(first: bytes, direction: Direction) -> bool:
    """Does a flow's first payload look like PostgreSQL v3?

    From the client: a start-up packet (length 8 for SSLRequest/GSSENCRequest, 16 for
    CancelRequest, 9..10000 for a 3.x StartupMessage whose body begins with a NUL-
    terminated parameter name), or a whole Query message of printable text. From the
    server: an Authentication request with a known code, or an ErrorResponse starting
    with a severity field. A lone 'S'/'N' byte is never enough.
    """
    if len(first) < 8:
        return False
    length, code = struct.unpack_from(">II", first)
    if direction == _TO_SERVER:
        if code in (_SSL, _GSSENC):
            return length == 8
        if code == _CANCEL:
            return length == 16
        if code >> 16 == 3 and 9 <= length <= MAX_STARTUP:
            body = first[8:length]
            nul = body.find(b"\0")
            return nul > 0 and body[:nul].replace(b"_", b"").isalnum() or body == b"\0"
        if first[0] == 0x51:  # 'Q': a capture that starts mid-connection
            n = int.from_bytes(first[1:5], "big")
            text = first[5:1 + n]
            return 6 <= n <= len(first) - 1 and text.endswith(b"\0") \
                and all(32 <= b < 127 or b in (9, 10, 13) for b in text[:-1])
        return False
    if first[0] == 0x52:  # 'R'
        n = int.from_bytes(first[1:5], "big")
        auth = int.from_bytes(first[5:9], "big") if len(first) >= 9 else -1
        return 8 <= n <= 2048 and (auth in _AUTH_NAMES or auth in (11, 12))
    if first[0] == 0x45:  # 'E'
        n = int.from_bytes(first[1:5], "big")
        return 8 <= n <= MAX_KEPT and first[5:6] in (b"S", b"V")
    return False


SIGNATURE = looks_like


@dataclass(frozen=True, slots=True)
class Framing:
    """How the server's byte stream is framed, for a budget that follows messages in the
    kernel: each message is `header` bytes, the big-endian length field at `length_at`
    (of `length_size` bytes) counting itself, then the body. Messages whose type byte is
    in `elidable` may be left out whole (header and body) by a deliberate skip that
    starts and ends on message boundaries: the parser accepts such a skip right after a
    RowDescription, DataRow or CopyData, and `rows` still comes exact from the
    CommandComplete tag. It holds for the server direction after the parser's
    `typed_from_server()` is true (the one-byte SSL/GSS answer is not framed)."""

    header: int = 5
    length_at: int = 1
    length_size: int = 4
    elidable: bytes = b"Dd"


FRAMING = Framing()


def _check_uint(name: str, value: int, limit: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value <= limit:
        raise ValueError(f"{name}={value} is outside 0..{limit}")


@dataclass(frozen=True, slots=True, kw_only=True)
class PgsqlEvent:
    kind: str                   # one of KINDS
    statement: str = ""         # query text (redacted, at most MAX_STATEMENT characters)
    statement_name: str = ""    # prepared statement an Execute ran ("" = unnamed)
    truncated: bool = False     # statement was cut at MAX_STATEMENT
    command_tag: str = ""       # last CommandComplete tag, e.g. "SELECT 10"
    commands: int = 0           # CommandComplete messages in this transaction
    rows: int = 0               # from the tag(s)
    data_rows: int = 0          # DataRow messages seen
    columns: int = 0            # RowDescription column count
    copy: str = ""              # "in", "out" or "both" when a COPY ran
    copy_bytes: int = 0         # CopyData payload bytes (skipped, never kept)
    suspended: bool = False     # Execute stopped at its row limit (PortalSuspended)
    empty: bool = False         # EmptyQueryResponse
    severity: str = ""          # ErrorResponse V (or S) field
    sqlstate: str = ""          # ErrorResponse C field
    message: str = ""           # ErrorResponse M field
    user: str = ""
    database: str = ""
    application_name: str = ""
    auth: str = ""              # trust, md5, cleartext, SCRAM-SHA-256, gss, ...
    server_version: str = ""
    backend_pid: int = 0
    ssl_requested: bool = False  # the client asked for TLS first (and was refused)
    accepted: bool = False       # ssl_request/gssenc_request: the server said yes
    latency_ns: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is not one of {', '.join(KINDS)}")
        if self.copy not in ("", "in", "out", "both"):
            raise ValueError(f"copy={self.copy!r} is not '', 'in', 'out' or 'both'")
        if len(self.statement) > MAX_STATEMENT:
            raise ValueError(f"statement longer than {MAX_STATEMENT} characters")
        if self.sqlstate and len(self.sqlstate) != 5:
            raise ValueError(f"sqlstate={self.sqlstate!r} is not 5 characters")
        for name in ("commands", "rows", "data_rows", "copy_bytes", "latency_ns"):
            _check_uint(name, getattr(self, name), (1 << 64) - 1)
        _check_uint("columns", self.columns, 0xFFFF)
        _check_uint("backend_pid", self.backend_pid, _U32)


class _Txn:
    """One transaction being assembled (mutable, private)."""

    __slots__ = ("kind", "statement", "statement_name", "truncated", "tag", "commands",
                 "rows", "data_rows", "columns", "copy", "copy_bytes", "suspended", "empty",
                 "severity", "sqlstate", "message", "req_ts", "resp_ts", "has_parse",
                 "parse_text", "parse_truncated")

    def __init__(self, kind: str, req_ts: int) -> None:
        self.kind = kind
        self.statement = ""
        self.statement_name = ""
        self.truncated = False
        self.tag = ""
        self.commands = self.rows = self.data_rows = self.columns = self.copy_bytes = 0
        self.copy = ""
        self.suspended = self.empty = False
        self.severity = self.sqlstate = self.message = ""
        self.req_ts = req_ts
        self.resp_ts = -1
        self.has_parse = False
        self.parse_text = ""
        self.parse_truncated = False

    def transaction(self) -> Transaction:
        latency = self.resp_ts - self.req_ts if self.req_ts >= 0 and self.resp_ts >= 0 else 0
        return Transaction(self.req_ts if self.req_ts >= 0 else max(self.resp_ts, 0), PgsqlEvent(
            kind=self.kind, statement=self.statement, statement_name=self.statement_name,
            truncated=self.truncated, command_tag=self.tag, commands=self.commands,
            rows=self.rows, data_rows=self.data_rows, columns=self.columns, copy=self.copy,
            copy_bytes=self.copy_bytes, suspended=self.suspended, empty=self.empty,
            severity=self.severity, sqlstate=self.sqlstate, message=self.message,
            latency_ns=latency if latency > 0 else 0))


class _Startup:
    __slots__ = ("user", "database", "app", "auth", "version", "pid", "ssl", "req_ts",
                 "resp_ts", "error")

    def __init__(self, req_ts: int, ssl: bool) -> None:
        self.user = self.database = self.app = self.auth = self.version = ""
        self.pid = 0
        self.ssl = ssl
        self.req_ts = req_ts
        self.resp_ts = -1
        self.error: tuple[str, str, str] = ("", "", "")


class _Malformed(Exception):
    """Internal: the peer sent something that is not PostgreSQL v3. Never escapes."""


def _text(raw: bytes, limit: int = MAX_TEXT) -> str:
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError:
        s = raw.decode("utf-8", "backslashreplace")
    return s[:limit]


def _cstr(body: bytes, pos: int) -> tuple[bytes, int]:
    """A NUL-terminated string at pos, and the position after it; a string cut by
    MAX_KEPT (no NUL) runs to the end of what was kept."""
    nul = body.find(b"\0", pos)
    if nul < 0:
        return body[pos:], len(body)
    return body[pos:nul], nul + 1


def _tag_rows(tag: str) -> int:
    word, _, rest = tag.partition(" ")
    if word in _ROW_COMMANDS:
        last = rest.rpartition(" ")[2]
        if last.isdigit() and len(last) <= 19:
            return int(last)
    return 0


def _error_fields(body: bytes) -> tuple[str, str, str]:
    fields: dict[int, bytes] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:
        code = body[pos]
        value, pos = _cstr(body, pos + 1)
        fields.setdefault(code, value)
    severity = _text(fields.get(0x56) or fields.get(0x53) or b"", 16)   # V, S
    state = _text(fields.get(0x43, b""), 5)                              # C
    if len(state) != 5:
        state = ""
    return severity, state, _text(fields.get(0x4D, b""))                  # M


class PgsqlParser:
    """PostgreSQL v3 for one TCP connection. See the module docstring for the rules."""

    name = APP_PROTO

    def __init__(self, *, redact: bool = True) -> None:
        self.state = _OK
        self.error = ""
        self.redact = redact
        # Counters the engine may read.
        self.messages = 0
        self.evicted_statements = 0
        self.evicted_pending = 0
        self.unmatched = 0          # server messages that answered nothing on record
        self.elided_bytes = 0       # whole DataRow/CopyData messages skipped (Framing)
        self._in_rows = False       # the last server message began or continued rows
        self._buf = (bytearray(), bytearray())
        self._skip = [0, 0]         # body bytes of the current message still to discard
        self._msg_ts = [0, 0]       # time of the current message's first byte
        self._eof = [False, False]
        self._untyped = True        # the client is in the start-up phase
        self._await_byte = 0        # 0, or _SSL/_GSSENC: the server answers with one byte
        self._ssl_refused = False
        self._tls: Handover | None = None   # TLS after an SSLRequest answered 'S'
        self._startup: _Startup | None = None
        self._sasl = False
        self._prepared: OrderedDict[bytes, tuple[str, bool]] = OrderedDict()
        self._portals: OrderedDict[bytes, bytes] = OrderedDict()
        self._pending: deque[tuple[int, _Txn | None]] = deque()
        self._group: _Txn | None = None   # the extended-protocol group being sent
        self._out: deque[Transaction] = deque()
        self._user = self._database = self._first = ""

    # -- the L7Parser contract -------------------------------------------------------------

    def receive_data(self, direction: Direction, data: bytes, ts_ns: int) -> None:
        if self.state is not _OK or not data:
            return
        if self._tls is not None:
            self._tls.data(self, direction, data, ts_ns)
            return
        d = int(direction)
        if self._eof[d]:
            return
        skip = self._skip[d]
        if skip:
            if len(data) <= skip:
                self._skip[d] = skip - len(data)
                return
            self._skip[d] = 0
            data = data[skip:]
        buf = self._buf[d]
        if not buf:
            self._msg_ts[d] = ts_ns
        buf += data
        try:
            self._run(d, buf, ts_ns)
            held = self._buf[0]
            if d == 1 and held and not self._await_byte and self._tls is None \
                    and self.state is _OK:
                self._run(0, held, ts_ns)   # client bytes held while the answer was awaited
        except _Malformed as exc:
            self._fail(str(exc))
            return
        if self._tls is not None:
            self._hand_over(ts_ns)
        elif self._await_byte and len(self._buf[0]) > MAX_HELD:
            self._fail(f"over {MAX_HELD} client bytes before the SSLRequest answer")

    def receive_datagram(self, direction: Direction, data: bytes, ts_ns: int) -> None:
        self._fail("PostgreSQL runs over a stream, got a datagram")

    def receive_gap(self, direction: Direction, length: int, ts_ns: int) -> None:
        if self._tls is not None:
            if self.state is _OK:
                self._tls.gap(self, direction, length, ts_ns)
            return
        self._lost(int(direction), length, "gap")

    def receive_skip(self, direction: Direction, length: int, ts_ns: int) -> None:
        if self._tls is not None:
            self.receive_gap(direction, length, ts_ns)   # TLS never asks for skips
            return
        self._lost(int(direction), length, "skip")

    def receive_eof(self, direction: Direction, ts_ns: int) -> None:
        d = int(direction)
        if self._tls is not None:
            if self.state is _OK:
                self._tls.eof(self, direction, ts_ns)
            return
        if self.state is not _OK or self._eof[d]:
            return
        self._eof[d] = True
        self._buf[d].clear()   # a message cut by the end of the stream carries nothing
        self._skip[d] = 0
        if d == _TO_CLIENT:
            self._flush()      # no answer can come any more
        if self._eof[0] and self._eof[1]:
            self._flush()
            self.state = _DONE

    def skip_hint(self, direction: Direction) -> int:
        if self.state is not _OK or self._tls is not None:
            return 0
        return self._skip[int(direction)]

    def next_event(self) -> Transaction | _NeedData:
        if self._out:
            return self._out.popleft()
        return self._tls.next_event() if self._tls is not None else NEED_DATA

    def summary(self) -> dict[str, str]:
        out = {}
        if self._user:
            out["pgsql_user"] = self._user
        if self._database:
            out["pgsql_database"] = self._database
        if self._first:
            out["pgsql_statement"] = self._first
        if self._tls is not None:
            out.update(self._tls.summary())
        return out

    # -- framing -----------------------------------------------------------------------------

    def _run(self, d: int, buf: bytearray, ts_ns: int) -> None:
        pos = 0
        end = len(buf)
        msg_ts = self._msg_ts
        known = _FRONTEND if d == 0 else _BACKEND
        handle = self._frontend if d == 0 else self._backend
        while pos < end and self.state is _OK and self._tls is None:
            if d == 0 and self._await_byte:
                break   # sent before the one-byte answer: held until it comes (TLS?)
            if d == 0 and self._untyped:
                if buf[pos] != 0:
                    # A start-up packet's length (< 10000) begins with a zero byte, a
                    # typed message with its letter: the capture began mid-connection.
                    self._untyped = False
                    continue
                if end - pos < 8:
                    break
                length = int.from_bytes(buf[pos:pos + 4], "big")
                if not 8 <= length <= MAX_STARTUP:
                    raise _Malformed(f"start-up packet length {length} out of range")
                if end - pos < length:
                    break
                self._startup_packet(bytes(buf[pos + 4:pos + length]), msg_ts[d])
                pos += length
            elif d == 1 and self._await_byte:
                self._answer_byte(buf[pos], msg_ts[d])
                if buf[pos] in (0x53, 0x4E, 0x47):  # S, N, G (E: a typed message)
                    pos += 1
            else:
                if end - pos < 5:
                    break
                kind, length = _HEAD.unpack_from(buf, pos)
                if kind not in known:
                    side = "frontend" if d == 0 else "backend"
                    raise _Malformed(f"unknown {side} message type 0x{kind:02x}")
                if length < 4:
                    raise _Malformed(f"message {chr(kind)!r} has length {length} < 4")
                body_len = length - 4
                self.messages += 1
                if kind in _SKIPPED:
                    # DataRow/CopyData: counted from the header alone, body never kept.
                    if d == 1 and kind == 0x44:
                        self._in_rows = True
                        self._result_txn(msg_ts[d]).data_rows += 1
                    else:
                        handle(kind, b"", body_len, msg_ts[d])
                    pos += 5
                else:
                    keep = body_len if body_len < MAX_KEPT else MAX_KEPT
                    if end - pos - 5 < keep:
                        break
                    pos += 5
                    handle(kind, bytes(buf[pos:pos + keep]), body_len, msg_ts[d])
                    pos += keep
                    body_len -= keep
                if body_len:   # bytes not needed: discarded as they stream by
                    avail = end - pos
                    if body_len > avail:
                        self._skip[d] = body_len - avail
                        pos = end
                        break
                    pos += body_len
            msg_ts[d] = ts_ns
        del buf[:pos]

    def _hand_over(self, ts_ns: int) -> None:
        """The server said 'S': what both directions hold past it is TLS."""
        client, server = bytes(self._buf[0]), bytes(self._buf[1])
        for buf in self._buf:
            buf.clear()
        self._skip = [0, 0]
        self._tls.data(self, _TO_SERVER, client, self._msg_ts[0])
        self._tls.data(self, _TO_CLIENT, server, ts_ns)

    def _lost(self, d: int, length: int, what: str) -> None:
        if self.state is not _OK or self._eof[d]:
            return
        skip = self._skip[d]
        if length <= skip and not self._buf[d]:
            self._skip[d] = skip - length   # inside a body nobody needs: costs nothing
            return
        if what == "skip" and d == _TO_CLIENT and self._in_rows and not self._buf[d]:
            # The rest of this body, then whole DataRow/CopyData messages left out on
            # purpose (see Framing).
            self._skip[d] = 0
            self.elided_bytes += length - skip
            return
        self._fail(f"{length} bytes missing ({what}) inside a PostgreSQL message header")

    def _fail(self, reason: str) -> None:
        self._flush()   # what was seen before the framing broke is still reported
        self.state = _ERROR
        self.error = reason
        for buf in self._buf:
            buf.clear()

    # -- start-up ----------------------------------------------------------------------------

    def _startup_packet(self, body: bytes, ts_ns: int) -> None:
        code = int.from_bytes(body[:4], "big")
        if code in (_SSL, _GSSENC):
            if len(body) != 4:
                raise _Malformed("SSLRequest/GSSENCRequest with a body")
            self._await_byte = code
            self._startup = _Startup(ts_ns, False)
            return
        if code == _CANCEL:
            if len(body) != 12:
                raise _Malformed("CancelRequest of the wrong length")
            pid = int.from_bytes(body[4:8], "big")   # the secret key after it is not kept
            self._out.append(Transaction(ts_ns, PgsqlEvent(kind="cancel", backend_pid=pid)))
            return
        if code >> 16 != 3:
            raise _Malformed(f"protocol version {code >> 16}.{code & 0xFFFF} is not 3.x")
        st = _Startup(ts_ns, self._ssl_refused)
        pos = 4
        while pos < len(body) and body[pos] != 0:
            name, pos = _cstr(body, pos)
            value, pos = _cstr(body, pos)
            if name == b"user":
                st.user = _text(value, 64)
            elif name == b"database":
                st.database = _text(value, 64)
            elif name == b"application_name":
                st.app = _text(value, 64)
        self._user = st.user
        self._database = st.database or st.user   # the server's default
        self._startup = st
        self._untyped = False

    def _answer_byte(self, byte: int, ts_ns: int) -> None:
        code = self._await_byte
        self._await_byte = 0
        if byte == 0x45:   # 'E': an old server answers with an ErrorResponse
            return
        st = self._startup
        kind = "ssl_request" if code == _SSL else "gssenc_request"
        accepted = byte == (0x53 if code == _SSL else 0x47)
        if not accepted and byte != 0x4E:
            raise _Malformed(f"answer 0x{byte:02x} to {kind}")
        req_ts = st.req_ts if st else ts_ns
        self._startup = None
        self._out.append(Transaction(req_ts, PgsqlEvent(
            kind=kind, accepted=accepted, ssl_requested=code == _SSL,
            latency_ns=max(0, ts_ns - req_ts))))
        if code == _SSL and not accepted:
            self._ssl_refused = True
        if accepted:
            self._flush()
            if code == _SSL:
                # TLS from the next byte on, parsed like any TLS (sensor/l7/upgrade.py).
                self._tls = Handover("SSLRequest")
            else:
                self.state = _DONE   # GSSAPI encryption: nothing more is readable

    def _emit_startup(self) -> None:
        st = self._startup
        self._startup = None
        if st is None:
            return
        severity, state, message = st.error
        latency = st.resp_ts - st.req_ts if st.resp_ts >= 0 else 0
        self._out.append(Transaction(st.req_ts, PgsqlEvent(
            kind="startup", user=st.user, database=st.database, application_name=st.app,
            auth=st.auth, server_version=st.version, backend_pid=st.pid,
            ssl_requested=st.ssl, severity=severity, sqlstate=state, message=message,
            latency_ns=max(0, latency))))

    # -- client messages ---------------------------------------------------------------------

    def _statement(self, raw: bytes) -> tuple[str, bool]:
        text = _text(raw, 4 * MAX_STATEMENT)
        if self.redact:
            text = redact_sql(text)
        if len(text) > MAX_STATEMENT:
            return text[:MAX_STATEMENT], True
        return text, False

    def _queue(self, code: int, txn: _Txn | None) -> None:
        if len(self._pending) >= MAX_PENDING:
            _, old = self._pending.popleft()
            self.evicted_pending += 1
            if old is not None and old.kind != "parse":
                self._emit(old)
        self._pending.append((code, txn))

    def _group_txn(self, ts_ns: int) -> _Txn:
        if self._group is None:
            self._group = _Txn("parse", ts_ns)
        return self._group

    def _frontend(self, kind: int, body: bytes, body_len: int, ts_ns: int) -> None:
        if kind == 0x51:      # Q: Query
            raw, _ = _cstr(body, 0)
            txn = _Txn("query", ts_ns)
            txn.statement, txn.truncated = self._statement(raw)
            txn.truncated = txn.truncated or body_len > len(body)
            if not self._first:
                self._first = txn.statement
            self._queue(0x51, txn)
        elif kind == 0x50:    # P: Parse
            name, pos = _cstr(body, 0)
            raw, _ = _cstr(body, pos)
            text, cut = self._statement(raw)
            cut = cut or body_len > len(body)
            if name in self._prepared:
                del self._prepared[name]
            elif len(self._prepared) >= MAX_PREPARED:
                self._prepared.popitem(last=False)
                self.evicted_statements += 1
            self._prepared[name] = (text, cut)
            txn = self._group_txn(ts_ns)
            txn.has_parse = True
            txn.parse_text, txn.parse_truncated = text, cut
            txn.statement_name = _text(name, 64)
            self._queue(0x31, txn)
        elif kind == 0x42:    # B: Bind (parameter values are never read)
            portal, pos = _cstr(body, 0)
            stmt, _ = _cstr(body, pos)
            if portal in self._portals:
                del self._portals[portal]
            elif len(self._portals) >= MAX_PORTALS:
                self._portals.popitem(last=False)
            self._portals[portal] = stmt
            self._queue(0x32, self._group_txn(ts_ns))
        elif kind == 0x44:    # D: Describe
            self._queue(0x44, self._group_txn(ts_ns))
        elif kind == 0x45:    # E: Execute
            portal, _ = _cstr(body, 0)
            txn = self._group_txn(ts_ns)
            self._group = None
            txn.kind = "execute"
            stmt = self._portals.get(portal)
            if stmt is not None:
                txn.statement_name = _text(stmt, 64)
                txn.statement, txn.truncated = self._prepared.get(stmt, ("", False))
            if not self._first and txn.statement:
                self._first = txn.statement
            self._queue(0x45, txn)
        elif kind == 0x53:    # S: Sync
            self._group = None
            self._queue(0x53, None)
        elif kind == 0x43:    # C: Close
            what = body[:1]
            name, _ = _cstr(body, 1)
            (self._prepared if what == b"S" else self._portals).pop(name, None)
            self._queue(0x33, self._group_txn(ts_ns))
        elif kind == 0x46:    # F: FunctionCall
            self._queue(0x56, None)
        elif kind == 0x70:    # p: password, SASL or GSS response: never copied
            st = self._startup
            if st is not None and self._sasl and st.auth == "sasl":
                mech, _ = _cstr(body, 0)   # SASLInitialResponse: only the mechanism name
                st.auth = _text(mech, 32) or "sasl"
        elif kind == 0x64:    # d: CopyData (COPY FROM STDIN), counted
            head = self._head_txn()
            if head is not None:
                head.copy_bytes += body_len
        # H Flush, X Terminate, c CopyDone, f CopyFail: nothing to record.

    # -- server messages ---------------------------------------------------------------------

    def _head_txn(self) -> _Txn | None:
        """The query or Execute the server is answering now, after dropping group items
        whose own answers were not sent (the server skips nothing, but a capture that
        started mid-connection or a misread can)."""
        pending = self._pending
        while pending:
            code, txn = pending[0]
            if code == 0x51 or code == 0x45:
                return txn
            if code == 0x53:
                return None
            pending.popleft()
            self.unmatched += 1
        return None

    def _result_txn(self, ts_ns: int) -> _Txn:
        txn = self._head_txn()
        if txn is None:
            # A result nobody on record asked for: reported without its statement.
            txn = _Txn("execute", -1)
            self._pending.appendleft((0x45, txn))
            self.unmatched += 1
        if txn.resp_ts < 0:
            txn.resp_ts = ts_ns
        return txn

    def _answered(self, code: int, ts_ns: int) -> _Txn | None:
        pending = self._pending
        if pending and pending[0][0] == code:
            _, txn = pending.popleft()
            if txn is not None and txn.resp_ts < 0:
                txn.resp_ts = ts_ns
            return txn
        self.unmatched += 1
        return None

    def _emit(self, txn: _Txn) -> None:
        self._out.append(txn.transaction())

    def typed_from_server(self) -> bool:
        """True once every further server byte is a typed message (FRAMING applies)."""
        return self.state is _OK and not self._await_byte and self._startup is None \
            and not self._untyped

    def _backend(self, kind: int, body: bytes, body_len: int, ts_ns: int) -> None:
        self._in_rows = kind in (0x54, 0x44, 0x64, 0x48, 0x57)   # T, D, d, H, W
        st = self._startup
        if kind == 0x43:      # C: CommandComplete (DataRow is counted in _run)
            raw, _ = _cstr(body, 0)
            tag = _text(raw, 64)
            txn = self._result_txn(ts_ns)
            txn.tag = tag
            txn.commands += 1
            txn.rows += _tag_rows(tag)
            if txn.kind != "query":
                self._pending.popleft()
                self._emit(txn)
        elif kind == 0x5A:    # Z: ReadyForQuery
            if st is not None:
                self._emit_startup()
                return
            pending = self._pending
            while pending:
                code, txn = pending.popleft()
                if txn is not None and code in (0x51, 0x45):
                    self._emit(txn)
                if code in (0x51, 0x53):
                    break
        elif kind == 0x45:    # E: ErrorResponse
            fields = _error_fields(body)
            if st is not None:
                if st.resp_ts < 0:
                    st.resp_ts = ts_ns
                st.error = fields
                self._emit_startup()   # the server closes the connection after it
                return
            self._error(fields, ts_ns)
        elif kind == 0x54:    # T: RowDescription
            columns = int.from_bytes(body[:2], "big")
            pending = self._pending
            if pending and pending[0][0] == 0x44:   # answers a Describe
                txn = self._answered(0x44, ts_ns)
            else:
                txn = self._result_txn(ts_ns)
            if txn is not None:
                txn.columns = columns
        elif kind in (0x31, 0x32, 0x33):   # ParseComplete, BindComplete, CloseComplete
            self._answered(kind, ts_ns)
        elif kind == 0x6E:    # n: NoData
            self._answered(0x44, ts_ns)
        elif kind == 0x73:    # s: PortalSuspended
            txn = self._result_txn(ts_ns)
            txn.suspended = True
            self._pending.popleft()
            self._emit(txn)
        elif kind == 0x49:    # I: EmptyQueryResponse
            txn = self._result_txn(ts_ns)
            txn.empty = True
            if txn.kind != "query":
                self._pending.popleft()
                self._emit(txn)
        elif kind in (0x47, 0x48, 0x57):   # CopyIn/CopyOut/CopyBoth
            self._result_txn(ts_ns).copy = {0x47: "in", 0x48: "out", 0x57: "both"}[kind]
        elif kind == 0x64:    # d: CopyData (COPY TO STDOUT), counted
            self._result_txn(ts_ns).copy_bytes += body_len
        elif kind == 0x52:    # R: Authentication
            if st is not None and len(body) >= 4:
                code = int.from_bytes(body[:4], "big")
                if st.resp_ts < 0:
                    st.resp_ts = ts_ns
                if not st.auth and code in _AUTH_NAMES:
                    st.auth = _AUTH_NAMES[code]
                    self._sasl = code == 10
        elif kind == 0x53:    # S: ParameterStatus
            name, pos = _cstr(body, 0)
            if name == b"server_version" and st is not None:
                value, _ = _cstr(body, pos)
                st.version = _text(value, 64)
        elif kind == 0x4B:    # K: BackendKeyData (the secret key is not kept)
            if st is not None and len(body) >= 4:
                st.pid = int.from_bytes(body[:4], "big")
        elif kind == 0x56:    # V: FunctionCallResponse
            self._answered(0x56, ts_ns)
        # N Notice, A Notification, t ParameterDescription, v NegotiateProtocolVersion,
        # c CopyDone: nothing to record.

    def _error(self, fields: tuple[str, str, str], ts_ns: int) -> None:
        pending = self._pending
        if pending and pending[0][0] == 0x51:
            txn = pending[0][1]
            if txn.resp_ts < 0:
                txn.resp_ts = ts_ns
            if not txn.sqlstate:   # the first error is the cause; the rest never ran
                txn.severity, txn.sqlstate, txn.message = fields
            return
        # Extended protocol: the server discards messages up to Sync.
        failed: list[_Txn] = []
        while pending and pending[0][0] != 0x53:
            _, txn = pending.popleft()
            if txn is not None and (not failed or failed[-1] is not txn):
                failed.append(txn)
        if not failed and self._group is not None:
            failed.append(self._group)   # its Sync has not been sent yet
            self._group = None
        if not failed:
            txn = _Txn("error", -1)
            failed.append(txn)
        for txn in failed:
            if txn.kind == "parse" and not txn.has_parse and len(failed) > 1:
                continue   # a Bind/Describe without its own Execute: the Execute carries it
            if txn.kind == "parse":
                txn.statement, txn.truncated = txn.parse_text, txn.parse_truncated
            if txn.resp_ts < 0:
                txn.resp_ts = ts_ns
            txn.severity, txn.sqlstate, txn.message = fields
            self._emit(txn)

    def _flush(self) -> None:
        """The end: everything still waiting is reported with what was seen."""
        if self._startup is not None and self._startup.user:
            self._emit_startup()
        self._startup = None
        while self._pending:
            code, txn = self._pending.popleft()
            if txn is not None and code in (0x51, 0x45):
                self._emit(txn)


# -- registration (sensor/l7/registry.py) --------------------------------------------------

def table_line(d: PgsqlEvent) -> list[tuple[str, str | None]]:
    from sensor.export.table import duration  # rendering only; not needed to parse

    what = d.statement or d.statement_name or d.database or d.user
    out = [(f"{d.kind} {what}".rstrip(), None), ("->", "dim")]
    if d.sqlstate:
        out.append((f"{d.severity or 'ERROR'} {d.sqlstate} {d.message}".rstrip(), "red"))
    else:
        out.append((d.command_tag or ("accepted" if d.accepted else "-"), None))
    if d.latency_ns:
        out.append((duration(d.latency_ns), None))
    return out


# SUMMARY_FIELDS are the parser's summary() keys: the Flow's l7_summary map (the first
# statement, redacted, cut to 256 characters there). After an SSLRequest the TLS parser's
# SNI and JA4 fill the Flow's TLS fields (app_proto stays pgsql).
# The kernel follows the server's messages (bpf/frames.h) when the client opens with a
# v3.0 StartupMessage (Int32 length, then 00 03 00 00): no SSL/GSS answer byte can come
# first. DataRow and CopyData messages are left out whole (see Framing); the client's side
# is not walked (it carries no bulk but COPY FROM).
KERNEL_WALK = KernelWalk(
    match=bytes(4) + (3 << 16).to_bytes(4, "big"), mask=bytes(4) + b"\xff" * 4,
    start=(None, 0), header=FRAMING.header, length_at=FRAMING.length_at,
    length_size=FRAMING.length_size, length_adjust=FRAMING.length_at - FRAMING.header,
    type_at=0, elide=FRAMING.elidable)

PROTOCOL = Protocol(
    name=APP_PROTO, event=PgsqlEvent, parser=PgsqlParser, options=("redact",),
    tcp_ports=PORTS, signature=looks_like, priority=30,
    framing=FramingHints(kernel_walk=KERNEL_WALK),
    summary=("tls_sni", "tls_ja4"), summary_keys=SUMMARY_FIELDS,
    column_types={"columns": "u16", "backend_pid": "u32"},
    line=table_line, style="yellow",
    filters=(Filter(name="sql_query_contains", field="statement", match="contains",
                    help="text the SQL statement contains (MySQL, PostgreSQL; any case)"),),
)
