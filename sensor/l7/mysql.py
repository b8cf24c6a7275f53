"""MySQL / MariaDB classic protocol from a reassembled TCP stream, sans-I/O.

Strategy
- Every message is a packet: a 3-byte little-endian payload length, a 1-byte sequence id,
  the payload. A payload of exactly 0xFFFFFF bytes continues in the next packet (a message
  of 16 MiB or more); continuation packets carry no new meaning and are only skipped.
- Each direction walks packet headers. For each packet the parser decides how many payload
  bytes it needs (`_need`), handles that prefix, and drops the rest without buffering it;
  what it drops is what skip_hint offers the kernel. So a 1 GiB INSERT costs its first
  4 KiB, a BLOB row its first 64 bytes, a column definition nothing but its header.
- Phases: the server greeting (HandshakeV10), the client's HandshakeResponse41 (or an
  SSLRequest: the stream turns into TLS, noted as `tls_requested`; every later byte goes
  to the TLS parser, sensor/l7/upgrade.py, whose TlsEvents follow the login's event, and
  the parser ends with the handshake), the authentication exchange (auth switch,
  more-data rounds) until the server's OK or ERR, then commands. CLIENT_COMPRESS on both
  sides wraps every later packet in the compressed framing: the login is reported with
  `compressed` and the parser is DONE rather than parse compressed bytes as garbage.
- The protocol is half-duplex: a client sends its next command after reading the whole
  response. Commands are queued (bounded) and each response pairs with the oldest one
  waiting; commands that get no response (COM_QUIT, COM_STMT_CLOSE,
  COM_STMT_SEND_LONG_DATA) are complete at once. One event per command, in command order.
- Sequence ids are checked loosely: a client packet with id 0 starts a command, any other
  id continues the current exchange (an auth switch answer, LOCAL INFILE data).
- Responses: OK (affected rows, last insert id), ERR (code, SQL state, message), EOF, and
  result sets: column count, column definitions (counted, not read), an EOF unless
  CLIENT_DEPRECATE_EOF, rows (counted, never kept) up to an EOF or OK terminator. A row
  is told from a terminator by its first byte and length: 0xFF is ERR; 0xFE with a length
  below 0xFFFFFF is the terminator (a row starting with 0xFE holds an 8-byte length, so it
  is at least 16 MiB long). After the column definitions, a 0xFE packet shorter than 7
  bytes is the classic EOF (an OK terminator has at least 7), so mid-stream pickup works
  without knowing the capability flags. SERVER_MORE_RESULTS_EXISTS in a terminator's
  status (multi-statement COM_QUERY, CALL) means another result follows for the same
  command: rows and result sets add up in its one event.
- COM_STMT_PREPARE's PREPARE_OK gives the statement id; COM_STMT_EXECUTE and
  COM_STMT_CLOSE get the statement text through it (a bounded table, see MAX_PREPARED).
- Latency: first byte of the command to the first byte of its response.

The budget for large result sets (why rows do not cost the kernel copy). Counting rows
needs each row packet's 4-byte header, so per-packet skips only help for rows larger than
a TCP segment. Instead, a server direction that loses bytes (a gap or skip that reaches
past the packet being dropped) while a command is answered does not go to ERROR: the
command is reported with the rows counted so far and `rows_truncated` ("at least N
rows"), and the direction resynchronises at the client's next command, which the
half-duplex protocol guarantees comes after the whole response. idle_until_request()
tells the engine when this direction needs nothing more until then: after ROW_WALK_LIMIT
rows of one result set. The engine may then stop copying that direction and resume at the
client's next packet; the rows it did not copy arrive as a gap and cost nothing. A
100,000-row SELECT then copies about what a 300-row one does, and every command is still
parsed. If the engine copies everything anyway, rows are counted exactly. The one
assumption: after such a pause the engine delivers the next response from its first
byte (a gap reported after the next command, before any server data, is taken to be the
old response's tail).

Bounds (why): statement text is kept up to MAX_STATEMENT bytes (4 KiB: enough to group and
search statements; longer ones are marked `truncated`); a server packet's prefix up to
MAX_SERVER_PREFIX (1 KiB: ERR messages are at most 512 bytes, greetings and OK packets
far less); a row's prefix up to ROW_PREFIX (64 bytes: an OK terminator's status flags sit
within its first 21 bytes); at most MAX_PENDING commands waiting for responses and
MAX_PREPARED statement texts per connection (64 each: real clients keep a handful).
A stream therefore never makes the parser hold more than one prefix per direction.

Redaction (on by default, MysqlParser(redact=False) for lab use): the auth response and
any later auth data (auth switch answers, cleartext passwords over TLS) are never copied;
in statement text, the string literal after IDENTIFIED BY / AS / USING, inside
PASSWORD(...) and OLD_PASSWORD(...), after SET PASSWORD ... = and after
MASTER_PASSWORD = becomes 'REDACTED' (also when the literal is cut by the 4 KiB bound).
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

from sensor.l7.base import NEED_DATA, Direction, ParserState, Transaction, _NeedData
from sensor.l7.registry import Filter, Protocol
from sensor.l7.redact import REDACTED
from sensor.l7.upgrade import Handover

APP_PROTO = "mysql"
PORTS = (3306,)
SUMMARY_FIELDS = ("mysql_user", "mysql_database", "mysql_server_version")

_OK, _DONE, _ERROR = ParserState.OK, ParserState.DONE, ParserState.ERROR
_TO_SERVER, _TO_CLIENT = Direction.TO_SERVER, Direction.TO_CLIENT

MAX_STATEMENT = 4096
MAX_SERVER_PREFIX = 1024
ROW_PREFIX = 64
MAX_PENDING = 64
MAX_PREPARED = 64
MAX_NAME = 256          # user, schema, plugin and version strings: real ones are short
ROW_WALK_LIMIT = 256    # rows counted exactly before the server direction may pause
_CLIENT_PREFIX = MAX_STATEMENT + 64  # the command byte, a statement id, a little slack
_MAX_PAYLOAD = 0xFFFFFF

U64 = (1 << 64) - 1

# Capability flags (MySQL include/mysql_com.h).
CLIENT_CONNECT_WITH_DB = 0x8
CLIENT_COMPRESS = 0x20
CLIENT_PROTOCOL_41 = 0x200
CLIENT_SSL = 0x800
CLIENT_SECURE_CONNECTION = 0x8000
CLIENT_PLUGIN_AUTH = 0x80000
CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA = 0x200000
CLIENT_DEPRECATE_EOF = 0x1000000
SERVER_MORE_RESULTS_EXISTS = 0x8

COMMANDS = {
    0x00: "sleep", 0x01: "quit", 0x02: "init_db", 0x03: "query", 0x04: "field_list",
    0x05: "create_db", 0x06: "drop_db", 0x07: "refresh", 0x08: "shutdown",
    0x09: "statistics", 0x0A: "process_info", 0x0B: "connect", 0x0C: "process_kill",
    0x0D: "debug", 0x0E: "ping", 0x0F: "time", 0x10: "delayed_insert",
    0x11: "change_user", 0x12: "binlog_dump", 0x13: "table_dump", 0x14: "connect_out",
    0x15: "register_slave", 0x16: "stmt_prepare", 0x17: "stmt_execute",
    0x18: "stmt_send_long_data", 0x19: "stmt_close", 0x1A: "stmt_reset",
    0x1B: "set_option", 0x1C: "stmt_fetch", 0x1D: "daemon", 0x1E: "binlog_dump_gtid",
    0x1F: "reset_connection", 0xFA: "stmt_bulk_execute",
}
_NO_RESPONSE = frozenset((0x01, 0x18, 0x19))
_RESULT_SET = frozenset((0x03, 0x0A, 0x17, 0xFA))
_UNTIL_EOF = frozenset((0x04, 0x1C))      # field list, cursor fetch: packets until EOF/ERR
_TEXT_ARG = frozenset((0x02, 0x03, 0x04, 0x05, 0x06, 0x16))
_STREAMS = frozenset((0x12, 0x1E))        # replication streams: not parsed
_STATUSES = ("", "ok", "error", "eof", "result", "text")

# Server response modes.
_R_FIRST = 0     # the first packet of a response (or of the next result)
_R_COLS = 1      # column definitions: counted, not read
_R_AFTER_COLS = 2  # the EOF after column definitions, or the first row
_R_ROWS = 3      # rows until a terminator
_R_DEFS = 4      # PREPARE_OK's parameter and column definitions
_R_UNTIL_EOF = 5  # packets until EOF or ERR
_R_AUTH = 6      # COM_CHANGE_USER's exchange until OK or ERR
_R_INFILE = 7    # after a LOCAL INFILE request: the final OK or ERR
_R_DEFS_EOF = 8  # the EOF after a section of PREPARE_OK's definitions

# Connection phases.
_P_START, _P_LOGIN, _P_AUTH, _P_COMMAND = range(4)

_LITERAL = r"""(?:'(?:[^'\\]|\\.|'')*(?:'|\Z)|"(?:[^"\\]|\\.|"")*(?:"|\Z))"""
_SECRET = re.compile(
    r"(\bIDENTIFIED\s+(?:(?:WITH|VIA)\s+[\w`'\"]+\s+)?(?:BY|AS|USING)\s+(?:PASSWORD\s*\(?\s*)?"
    r"|\b(?:OLD_)?PASSWORD\s*\(\s*"
    r"|\bSET\s+PASSWORD\b[^=;]{0,300}=\s*(?:(?:OLD_)?PASSWORD\s*\(\s*)?"
    r"|\bMASTER_PASSWORD\s*=\s*)" + _LITERAL,
    re.IGNORECASE | re.DOTALL,
)
_SECRET_HINT = re.compile(r"password|identified", re.IGNORECASE)


@dataclass(frozen=True, slots=True, kw_only=True)
class MysqlEvent:
    """One command and its response (or the login, command "connect")."""

    command: str                 # COMMANDS name, "connect", or "unknown_0xNN"
    statement: str = ""          # SQL (redacted) or the command's text argument
    truncated: bool = False      # statement cut at MAX_STATEMENT bytes
    statement_id: int = 0        # COM_STMT_* statement id
    user: str = ""               # connect: the login user
    schema: str = ""             # connect: the database asked for; init_db: its target
    server_version: str = ""     # connect
    auth_plugin: str = ""        # connect: the plugin the login ended with
    tls_requested: bool = False  # connect: SSLRequest, the stream turned into TLS
    compressed: bool = False     # connect: CLIENT_COMPRESS negotiated
    status: str = ""             # "" no response, ok, error, eof, result, text
    affected_rows: int = 0
    last_insert_id: int = 0
    warnings: int = 0
    error_code: int = 0
    sql_state: str = ""
    error_message: str = ""
    results: int = 0
    columns: int = 0             # of the first result set
    rows: int = 0                # over all result sets; a lower bound if rows_truncated
    rows_truncated: bool = False
    latency_ns: int = 0

    def __post_init__(self) -> None:
        if not self.command:
            raise ValueError("command must not be empty")
        if self.status not in _STATUSES:
            raise ValueError(f"status={self.status!r} is not one of {_STATUSES}")
        for name, limit in (("statement_id", 0xFFFFFFFF), ("affected_rows", U64),
                            ("last_insert_id", U64), ("warnings", 0xFFFF),
                            ("error_code", 0xFFFF), ("results", U64), ("columns", U64),
                            ("rows", U64), ("latency_ns", U64)):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= limit:
                raise ValueError(f"{name}={value!r} is outside 0..{limit}")
        if len(self.sql_state) not in (0, 5):
            raise ValueError(f"sql_state={self.sql_state!r} is not 5 characters")


def looks_like(first: bytes, direction: Direction) -> bool:
    """Whether the first bytes of a direction are MySQL. Checks one packet header:
    - from the server: sequence id 0 and either a HandshakeV10 greeting (protocol byte 10,
      a length of 40..1024 bytes, a server version starting with a digit and ended by NUL
      within 64 bytes) or an ERR greeting (0xFF, an error code 1000..1999 or 2000..9999,
      a length under 1 KiB: "Host ... is not allowed", "Too many connections");
    - from the client (a capture that starts after the login): sequence id 0 and a known
      command byte; commands without an argument need a length of exactly 1, commands
      with a text argument need printable text in the bytes seen.
    HTTP, TLS and DNS fail on the sequence id or the length: "GET " reads as a 5 MiB
    packet with id 0x20, a TLS record as id 0x01..0x03 after a 0x16 0x03 length."""
    if len(first) < 5 or first[3] != 0:
        return False
    length = first[0] | first[1] << 8 | first[2] << 16
    body = first[4:]
    if direction == _TO_CLIENT:
        if body[0] == 0x0A:
            if not 40 <= length <= 1024 or len(body) < 3 or not 0x30 <= body[1] <= 0x39:
                return False
            nul = body.find(b"\x00", 1, 66)
            if nul < 0:
                return len(body) < 66 and all(0x20 <= b < 0x7F for b in body[1:])
            return all(0x20 <= b < 0x7F for b in body[1:nul])
        if body[0] == 0xFF:
            if not 3 <= length < 1024 or len(body) < 3:
                return False
            return 1000 <= (body[1] | body[2] << 8) <= 9999
        return False
    cmd = body[0]
    if cmd not in COMMANDS or cmd == 0x00 or length == 0 or length > _MAX_PAYLOAD:
        return False
    if cmd in (0x01, 0x09, 0x0A, 0x0E, 0x0F, 0x1F, 0x08, 0x0D):
        return length == 1 or (cmd == 0x08 and length == 2)
    if cmd in _TEXT_ARG:
        text = body[1:17]
        if length < 2 or not text:
            return length >= 2
        return all(b >= 0x20 or b in (0x09, 0x0A, 0x0D) for b in text) and text[0] != 0x7F
    if cmd in (0x19, 0x1A):   # COM_STMT_CLOSE, COM_STMT_RESET: exactly a statement id
        return length == 5
    if cmd == 0x1C:           # COM_STMT_FETCH: statement id, row count
        return length == 9
    if cmd == 0x17:           # COM_STMT_EXECUTE: id, flags, an iteration count of 1
        return length >= 10 and (len(body) < 10 or body[6:10] == b"\x01\x00\x00\x00")
    return False


SIGNATURE = looks_like


class _Malformed(Exception):
    """Internal: the peer sent something that is not MySQL. Never escapes the parser."""


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8", "backslashreplace")


def _cstr(raw: bytes, pos: int, limit: int = MAX_NAME) -> tuple[str, int]:
    """A NUL-terminated string at pos (bounded); (text, position after the NUL). A string
    cut by the prefix bound is returned as far as it goes."""
    nul = raw.find(b"\x00", pos)
    end = nul if nul >= 0 else len(raw)
    return _text(raw[pos:min(end, pos + limit)]), end + 1


def _lenenc(raw: bytes, pos: int) -> tuple[int, int]:
    """A length-encoded integer at pos: (value, next position)."""
    if pos >= len(raw):
        raise _Malformed("packet ends inside a length-encoded integer")
    first = raw[pos]
    if first < 0xFB:
        return first, pos + 1
    size = {0xFC: 2, 0xFD: 3, 0xFE: 8}.get(first)
    if size is None or pos + 1 + size > len(raw):
        raise _Malformed("bad length-encoded integer")
    return int.from_bytes(raw[pos + 1:pos + 1 + size], "little"), pos + 1 + size


def redact_sql(sql: str) -> str:
    """Statement text with password literals replaced by 'REDACTED'."""
    if not _SECRET_HINT.search(sql):
        return sql  # the common case: one scan, no allocation
    return _SECRET.sub(lambda m: f"{m.group(1)}'{REDACTED}'", sql)


class _Cmd:
    """One command being answered (mutable, private)."""

    __slots__ = (
        "code", "command", "statement", "truncated", "statement_id", "schema", "req_ts",
        "resp_ts", "done", "status", "affected", "insert_id", "warnings", "error_code",
        "sql_state", "error_message", "results", "columns", "rows", "rows_truncated",
        "user", "server_version", "auth_plugin", "tls", "compressed",
    )

    def __init__(self, code: int, command: str, req_ts: int) -> None:
        self.code = code
        self.command = command
        self.statement = ""
        self.truncated = False
        self.statement_id = 0
        self.schema = ""
        self.req_ts = req_ts
        self.resp_ts = -1
        self.done = False
        self.status = ""
        self.affected = 0
        self.insert_id = 0
        self.warnings = 0
        self.error_code = 0
        self.sql_state = ""
        self.error_message = ""
        self.results = 0
        self.columns = 0
        self.rows = 0
        self.rows_truncated = False
        self.user = ""
        self.server_version = ""
        self.auth_plugin = ""
        self.tls = False
        self.compressed = False

    def transaction(self) -> Transaction:
        latency = self.resp_ts - self.req_ts if self.req_ts >= 0 and self.resp_ts >= 0 else 0
        event = MysqlEvent(
            command=self.command, statement=self.statement, truncated=self.truncated,
            statement_id=self.statement_id, user=self.user, schema=self.schema,
            server_version=self.server_version, auth_plugin=self.auth_plugin,
            tls_requested=self.tls, compressed=self.compressed, status=self.status,
            affected_rows=min(self.affected, U64), last_insert_id=min(self.insert_id, U64),
            warnings=self.warnings, error_code=self.error_code, sql_state=self.sql_state,
            error_message=self.error_message, results=self.results,
            columns=min(self.columns, U64), rows=self.rows,
            rows_truncated=self.rows_truncated, latency_ns=latency if latency > 0 else 0,
        )
        ts = self.req_ts if self.req_ts >= 0 else max(self.resp_ts, 0)
        return Transaction(ts, event)  # type: ignore[arg-type]  # base's Union predates it


class MysqlParser:
    """MySQL classic protocol for one TCP connection. See the module docstring."""

    name = APP_PROTO

    def __init__(self, *, redact: bool = True) -> None:
        self.state = _OK
        self.error = ""
        self.note = ""           # why the parser went DONE (TLS, compression, replication)
        self.redact = redact
        self.transactions = 0
        self.resyncs = 0         # server responses cut by a gap or skip, then resynced
        self._buf = (bytearray(), bytearray())
        self._ts = [0, 0]        # time of the first buffered byte
        self._drop = [0, 0]      # payload bytes of the current packet not needed
        self._cont = [False, False]  # the next packet continues a 16 MiB message
        self._eof = [False, False]
        self._wait = False       # server direction: discard until the client's next command
        self._armed = False      # resumed after a wait; no server bytes seen yet
        self._phase = _P_START
        self._rmode = _R_FIRST
        self._left = 0           # definitions still to count
        self._defs: list[int] = []
        self._client_caps = 0
        self._server_caps = 0
        self._deprecate_eof: bool | None = None
        self._login: _Cmd | None = None
        self._txns: deque[_Cmd] = deque()       # not yet emitted, in command order
        self._awaiting: deque[_Cmd] = deque()   # sent, response not complete
        self._stmts: dict[int, str] = {}
        self._out: deque[Transaction] = deque()
        self._infile = False     # client direction: LOCAL INFILE data until an empty packet
        self._tls: Handover | None = None   # TLS after an SSLRequest
        self.user = ""
        self.database = ""
        self.server_version = ""

    # -- the L7Parser contract -------------------------------------------------------------

    def receive_data(self, direction: Direction, data: bytes, ts_ns: int) -> None:
        if self.state is not _OK or not data:
            return
        if self._tls is not None:
            self._tls.data(self, direction, data, ts_ns)
            return
        d = int(direction)
        if self._eof[d] or (d and self._wait):
            return
        if d:
            self._armed = False
        drop = self._drop[d]
        if drop:
            n = len(data)
            if n <= drop:
                self._drop[d] = drop - n
                return
            data = data[drop:]
            self._drop[d] = 0
        buf = self._buf[d]
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
        if self._tls is not None:
            # The SSLRequest was the last cleartext packet: the rest is the ClientHello.
            rest = bytes(view[pos:])
            for b in self._buf:
                b.clear()
            self._tls.data(self, direction, rest, ts_ns)
            return
        if self.state is not _OK:
            return
        if d and self._wait:
            buf.clear()
            self._drop[1] = 0
            return
        if view is buf:
            del buf[:pos]
        elif pos < len(data):
            buf += data[pos:] if pos else data
        if pos:
            self._ts[d] = ts_ns

    def receive_datagram(self, direction: Direction, data: bytes, ts_ns: int) -> None:
        self._fail("MySQL runs over a stream, got a datagram")

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
        self._buf[d].clear()
        if d == 1:
            self._flush_all()  # no response can come any more
        if self._eof[0] and self._eof[1]:
            self._flush_all()
            self.state = _DONE

    def skip_hint(self, direction: Direction) -> int:
        d = int(direction)
        if self.state is not _OK or self._buf[d] or self._tls is not None:
            return 0
        return self._drop[d]

    def idle_until_request(self, direction: Direction) -> bool:
        """True when this direction's bytes are not needed until the client's next command:
        the engine may stop copying it then (see the module docstring, "the budget")."""
        if self.state is not _OK or direction != _TO_CLIENT or self._tls is not None:
            return False
        # Once the client sent its next command, the response to it must be copied.
        return self._wait or (self._rmode == _R_ROWS and len(self._awaiting) == 1
                              and self._awaiting[0].rows >= ROW_WALK_LIMIT)

    def next_event(self) -> Transaction | _NeedData:
        if self._out:
            return self._out.popleft()
        return self._tls.next_event() if self._tls is not None else NEED_DATA

    def summary(self) -> dict[str, str]:
        out = {}
        if self.user:
            out["mysql_user"] = self.user
        if self.database:
            out["mysql_database"] = self.database
        if self.server_version:
            out["mysql_server_version"] = self.server_version
        if self._tls is not None:
            out.update(self._tls.summary())
        return out

    # -- framing -----------------------------------------------------------------------------

    def _run(self, d: int, view: bytes | bytearray, ts_ns: int) -> int:
        """Handle every packet whose needed prefix is in view; return bytes consumed."""
        pos = 0
        end = len(view)
        first_ts = self._ts[d]
        while end - pos >= 4:
            length = view[pos] | view[pos + 1] << 8 | view[pos + 2] << 16
            seq = view[pos + 3]
            if self._cont[d]:
                need = 0
            elif d:
                mode = self._rmode
                if mode == _R_ROWS or mode == _R_AFTER_COLS or mode == _R_DEFS_EOF:
                    need = length if length < ROW_PREFIX else ROW_PREFIX
                elif (mode == _R_COLS or mode == _R_DEFS) and self._phase == _P_COMMAND:
                    need = 0
                else:
                    need = length if length < MAX_SERVER_PREFIX else MAX_SERVER_PREFIX
            else:
                need = length if length < _CLIENT_PREFIX else _CLIENT_PREFIX
            if end - pos - 4 < need:
                break
            total = 4 + length
            cont = self._cont[d]
            self._cont[d] = length == _MAX_PAYLOAD
            if not cont:
                payload = bytes(view[pos + 4:pos + 4 + need])
                ts = first_ts if pos == 0 else ts_ns
                if d:
                    self._server_packet(length, seq, payload, ts)
                else:
                    self._client_packet(length, seq, payload, ts)
                if self._tls is not None:
                    return pos + total   # the SSLRequest: what follows is TLS
                if self.state is not _OK or (d and self._wait):
                    return end
            if end - pos >= total:
                pos += total
            else:
                self._drop[d] = total - (end - pos)
                return end
        return pos

    def _lost(self, d: int, length: int, what: str) -> None:
        if self.state is not _OK or length <= 0 or self._eof[d]:
            return
        if d and (self._wait or self._armed):
            return  # the tail of a response already given up on
        drop = self._drop[d]
        if not self._buf[d] and length <= drop:
            self._drop[d] = drop - length
            return
        if d and self._phase == _P_COMMAND:
            self._resync()
            return
        self._fail(f"{what} in a packet header")

    def _resync(self) -> None:
        """Server bytes were lost mid-response: report the command with what was seen and
        wait for the client's next command (see the module docstring)."""
        self.resyncs += 1
        if self._awaiting:
            cmd = self._awaiting.popleft()
            if self._rmode in (_R_ROWS, _R_AFTER_COLS, _R_COLS):
                cmd.rows_truncated = True
            self._finish(cmd)
        # If the client already sent its next command, the loss was the old response's
        # tail (reported late, when later server bytes came) and the next server byte
        # starts the new response; otherwise wait for that command.
        self._wait = not self._awaiting
        self._armed = not self._wait
        self._buf[1].clear()
        self._drop[1] = 0
        self._cont[1] = False
        self._rmode = _R_FIRST

    # -- client packets --------------------------------------------------------------------

    def _client_packet(self, length: int, seq: int, p: bytes, ts: int) -> None:
        phase = self._phase
        if phase == _P_COMMAND:
            if self._infile:
                self._infile = length != 0  # an empty packet ends the file
                return
            if seq != 0:
                return  # continues the current exchange (auth switch answer, ...)
            self._command(length, p, ts)
            return
        if phase == _P_START:
            if seq == 0 and length and p and p[0] in COMMANDS:
                self._phase = _P_COMMAND  # picked up after the login
                self._command(length, p, ts)
                return
            # 1: the greeting was not seen. 2: the plaintext of a TLS connection (TLS
            # plaintext probes): the greeting and the SSLRequest (1) went before the
            # handshake, so this stream starts at the HandshakeResponse.
            if seq not in (1, 2):
                raise _Malformed("not a MySQL client packet")
            self._login = _Cmd(0x0B, "connect", ts)  # greeting not seen
            self._login.tls = seq == 2
            self._txns.append(self._login)
            phase = _P_LOGIN
        if phase == _P_LOGIN:
            self._handshake_response(length, p, ts)
        # _P_AUTH: auth data (switch answers, cleartext passwords): never copied.

    def _handshake_response(self, length: int, p: bytes, ts: int) -> None:
        login = self._login
        assert login is not None
        login.req_ts = ts
        if len(p) < 4:
            raise _Malformed("handshake response too short")
        caps = int.from_bytes(p[:4], "little") if len(p) >= 4 else 0
        if not caps & CLIENT_PROTOCOL_41:
            # HandshakeResponse320: 2-byte caps, 3-byte max packet, user, auth.
            caps &= 0xFFFF
            self._client_caps = caps
            login.user, _ = _cstr(p, 5)
            self.user = self.user or login.user
            self._phase = _P_AUTH
            return
        self._client_caps = caps
        if length == 32 and caps & CLIENT_SSL:
            login.tls = True  # SSLRequest: what follows is a TLS ClientHello
            login.done = True
            self._flush_all()
            self.note = "TLS requested (SSLRequest)"
            self._tls = Handover("SSLRequest")
            return
        if len(p) < 33:
            raise _Malformed("handshake response too short")
        user, pos = _cstr(p, 32)
        login.user = user
        self.user = user
        # The auth response is skipped over, never copied.
        if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
            try:
                n, pos = _lenenc(p, pos)
            except _Malformed:
                n, pos = 0, len(p)
            pos += n
        elif caps & CLIENT_SECURE_CONNECTION:
            n = p[pos] if pos < len(p) else 0
            pos += 1 + n
        else:
            pos = p.find(b"\x00", pos) + 1 or len(p)
        if caps & CLIENT_CONNECT_WITH_DB and pos < len(p):
            login.schema, pos = _cstr(p, pos)
            if login.schema:
                self.database = login.schema
        if caps & CLIENT_PLUGIN_AUTH and pos < len(p):
            plugin, pos = _cstr(p, pos)
            login.auth_plugin = plugin or login.auth_plugin
        self._phase = _P_AUTH

    def _command(self, length: int, p: bytes, ts: int) -> None:
        if length == 0:
            raise _Malformed("empty command packet")
        code = p[0]
        if len(self._txns) >= MAX_PENDING:
            raise _Malformed(f"more than {MAX_PENDING} commands awaiting responses")
        if self._wait:
            # The response we gave up on is over: the client only speaks after reading it.
            self._wait = False
            self._armed = True
            self._buf[1].clear()
            self._drop[1] = 0
            self._cont[1] = False
            self._rmode = _R_FIRST
        cmd = _Cmd(code, COMMANDS.get(code) or f"unknown_0x{code:02x}", ts)
        if code in _TEXT_ARG:
            raw = p[1:]
            cmd.truncated = length - 1 > MAX_STATEMENT
            if cmd.truncated:
                raw = raw[:MAX_STATEMENT]
            if code == 0x04:
                raw = raw.split(b"\x00", 1)[0]  # COM_FIELD_LIST: table NUL wildcard
            text = _text(raw)
            if code == 0x02:
                cmd.schema = text
                self.database = text
            else:
                cmd.statement = redact_sql(text) if self.redact else text
        elif code in (0x17, 0x18, 0x19, 0x1A, 0x1C, 0xFA) and len(p) >= 5:
            cmd.statement_id = int.from_bytes(p[1:5], "little")
            cmd.statement = self._stmts.get(cmd.statement_id, "")
            if code == 0x19:
                self._stmts.pop(cmd.statement_id, None)
        elif code == 0x11 and len(p) > 1:
            cmd.user, _ = _cstr(p, 1)  # COM_CHANGE_USER: user; the auth data is skipped
        self._txns.append(cmd)
        if code in _NO_RESPONSE:
            cmd.done = True
            self._emit_ready()
            return
        if code in _STREAMS:
            cmd.done = True
            self._stop("replication stream (COM_BINLOG_DUMP) is not parsed")
            return
        self._awaiting.append(cmd)
        if len(self._awaiting) == 1:
            self._rmode = _R_FIRST

    # -- server packets --------------------------------------------------------------------

    def _server_packet(self, length: int, seq: int, p: bytes, ts: int) -> None:
        phase = self._phase
        if phase == _P_COMMAND:
            if not self._awaiting:
                # Nothing asked: a capture that starts mid-response, or an unsolicited
                # ERR before the server closes. Wait for the next command to resync.
                self._wait = True
                return
            self._response(length, p, ts)
            return
        if not p:
            raise _Malformed("empty server packet during the login")
        if phase == _P_START:
            if seq != 0:
                # Mid-response pickup: nothing to pair it with; resync at a command.
                self._phase = _P_COMMAND
                self._wait = True
                return
            self._greeting(p, ts)
            return
        login = self._login
        if login is None:
            raise _Malformed("server spoke out of turn during the login")
        if phase == _P_LOGIN:
            raise _Malformed("server spoke before the handshake response")
        # _P_AUTH
        if login.resp_ts < 0:
            login.resp_ts = ts
        kind = p[0]
        if kind == 0x00:
            self._ok(login, p)
            login.status = "ok"
            login.done = True
            self._phase = _P_COMMAND
            self._deprecate_eof = bool(self._client_caps & self._server_caps
                                       & CLIENT_DEPRECATE_EOF)
            if self._client_caps & self._server_caps & CLIENT_COMPRESS:
                login.compressed = True
                self._stop("compressed protocol negotiated (CLIENT_COMPRESS)")
                return
            self._emit_ready()
        elif kind == 0xFF:
            self._err(login, p)
            login.done = True
            self._stop("login refused")
        elif kind == 0xFE:
            # Auth switch request: the plugin the login continues with.
            plugin, _ = _cstr(p, 1)
            if plugin:
                login.auth_plugin = plugin
        # 0x01: more auth data (caching_sha2 fast/full auth): nothing to keep.

    def _greeting(self, p: bytes, ts: int) -> None:
        login = _Cmd(0x0B, "connect", -1)
        self._login = login
        self._txns.append(login)
        self._phase = _P_LOGIN
        if p[0] == 0xFF:
            login.resp_ts = ts
            self._err(login, p)
            login.done = True
            self._stop("server refused the connection")
            return
        if p[0] != 0x0A:
            raise _Malformed("not a MySQL greeting")
        version, pos = _cstr(p, 1, 64)
        login.server_version = version
        self.server_version = version
        pos += 4 + 8 + 1  # connection id, auth data part 1, filler
        if pos + 2 > len(p):
            return
        caps = int.from_bytes(p[pos:pos + 2], "little")
        pos += 2
        if pos + 5 <= len(p):
            caps |= int.from_bytes(p[pos + 3:pos + 5], "little") << 16
            auth_len = p[pos + 5] if pos + 5 < len(p) else 0
            pos += 6 + 10
            if caps & CLIENT_SECURE_CONNECTION:
                pos += max(13, auth_len - 8)
            if caps & CLIENT_PLUGIN_AUTH and pos < len(p):
                login.auth_plugin, _ = _cstr(p, pos)
        self._server_caps = caps

    def _response(self, length: int, p: bytes, ts: int) -> None:
        cmd = self._awaiting[0]
        if cmd.resp_ts < 0:
            cmd.resp_ts = ts
        mode = self._rmode
        if mode == _R_ROWS or mode == _R_AFTER_COLS:
            kind = p[0] if p else -1
            if kind == 0xFE and length < _MAX_PAYLOAD:
                if mode == _R_AFTER_COLS and length < 7:
                    self._deprecate_eof = False
                    self._rmode = _R_ROWS  # the classic EOF after the definitions
                    return
                if mode == _R_AFTER_COLS:
                    self._deprecate_eof = True
                self._end_of_rows(cmd, p)
            elif kind == 0xFF:
                self._err(cmd, p)
                self._complete(cmd)
            else:
                if mode == _R_AFTER_COLS:
                    self._deprecate_eof = True
                    self._rmode = _R_ROWS
                cmd.rows += 1
            return
        if mode == _R_COLS:
            self._left -= 1
            if self._left <= 0:
                self._rmode = _R_AFTER_COLS
            return
        if mode == _R_DEFS:
            self._left -= 1
            if self._left <= 0:
                if self._deprecate_eof:
                    self._next_section(cmd)
                else:
                    self._rmode = _R_DEFS_EOF
            return
        if mode == _R_DEFS_EOF:
            if p[:1] == b"\xfe" and length < 7:
                self._deprecate_eof = False
                self._next_section(cmd)
                return
            # No EOF after the definitions: CLIENT_DEPRECATE_EOF after all (a capture
            # that missed the login); this packet belongs to what comes next.
            self._deprecate_eof = True
            self._next_section(cmd)
            if self._awaiting:
                self._response(length, p, ts)
            else:
                self._wait = True
            return
        if not p:
            raise _Malformed("empty response packet")
        kind = p[0]
        if mode == _R_UNTIL_EOF:
            if kind == 0xFF:
                self._err(cmd, p)
                self._complete(cmd)
            elif kind == 0xFE and length < 9:
                self._eof_packet(cmd, p)
                cmd.status = "result" if cmd.columns or cmd.rows else "eof"
                self._complete(cmd)
            elif cmd.code == 0x04:
                cmd.columns += 1
            else:
                cmd.rows += 1
            return
        if mode == _R_AUTH or mode == _R_INFILE:
            if kind == 0x00:
                self._ok(cmd, p)
                cmd.status = "ok"
                self._complete(cmd)
            elif kind == 0xFF:
                self._err(cmd, p)
                self._complete(cmd)
            return
        # _R_FIRST
        code = cmd.code
        if kind == 0xFF:
            self._err(cmd, p)
            self._complete(cmd)
        elif code == 0x09:
            cmd.status = "text"  # COM_STATISTICS answers with a bare string
            self._complete(cmd)
        elif code == 0x11:
            if kind == 0x00:
                self._ok(cmd, p)
                cmd.status = "ok"
                self._complete(cmd)
            else:
                self._rmode = _R_AUTH  # auth switch or more data; the client answers
        elif code in _UNTIL_EOF:
            self._rmode = _R_UNTIL_EOF
            self._response(length, p, ts)
        elif kind == 0x00 and code == 0x16:
            if len(p) < 9:
                raise _Malformed("short PREPARE_OK")
            cmd.status = "ok"
            cmd.statement_id = int.from_bytes(p[1:5], "little")
            cmd.columns = int.from_bytes(p[5:7], "little")
            params = int.from_bytes(p[7:9], "little")
            cmd.warnings = int.from_bytes(p[10:12], "little") if len(p) >= 12 else 0
            if len(self._stmts) >= MAX_PREPARED:
                del self._stmts[next(iter(self._stmts))]  # the oldest goes first
            self._stmts[cmd.statement_id] = cmd.statement
            self._defs = [n for n in (params, cmd.columns) if n]
            self._next_section(cmd)
        elif kind == 0x00 and length >= 7:
            self._ok(cmd, p)
            if cmd.status != "result":
                cmd.status = "ok"
            cmd.results += code in _RESULT_SET
            self._more_or_complete(cmd, self._status_of_ok(p))
        elif kind == 0xFE and length < 9:
            st = self._eof_packet(cmd, p)
            if cmd.status == "":
                cmd.status = "eof"
            self._more_or_complete(cmd, st)
        elif kind == 0xFB and code in _RESULT_SET:
            self._rmode = _R_INFILE  # LOAD DATA LOCAL INFILE: the client sends the file
            self._infile = True
        elif code in _RESULT_SET:
            count, _ = _lenenc(p, 0)
            if count == 0:
                raise _Malformed("result set with no columns")
            cmd.status = "result"
            cmd.results += 1
            if cmd.results == 1:
                cmd.columns = count
            self._left = count
            self._rmode = _R_COLS
        elif kind == 0x00:
            self._ok(cmd, p)
            cmd.status = "ok"
            self._complete(cmd)
        else:
            raise _Malformed(f"unexpected response 0x{kind:02x} to {cmd.command}")

    def _next_section(self, cmd: _Cmd) -> None:
        """PREPARE_OK: count the next section of definitions (parameters, then columns);
        complete the command when none is left."""
        if not self._defs:
            self._complete(cmd)
            return
        self._left = self._defs.pop(0)
        self._rmode = _R_DEFS

    def _end_of_rows(self, cmd: _Cmd, p: bytes) -> None:
        if len(p) < 7:
            status = self._eof_packet(cmd, p)
        else:
            self._ok(cmd, p, count=False)
            status = self._status_of_ok(p)
        self._more_or_complete(cmd, status)

    def _more_or_complete(self, cmd: _Cmd, status: int) -> None:
        if status & SERVER_MORE_RESULTS_EXISTS:
            self._rmode = _R_FIRST
        else:
            self._complete(cmd)

    @staticmethod
    def _status_of_ok(p: bytes) -> int:
        try:
            _, pos = _lenenc(p, 1)
            _, pos = _lenenc(p, pos)
        except _Malformed:
            return 0
        return int.from_bytes(p[pos:pos + 2], "little") if pos + 2 <= len(p) else 0

    def _ok(self, cmd: _Cmd, p: bytes, count: bool = True) -> None:
        """OK packet: 0x00 (or 0xFE), affected rows, last insert id, status, warnings."""
        affected, pos = _lenenc(p, 1)
        insert_id, pos = _lenenc(p, pos)
        if count:
            cmd.affected += affected
            if insert_id:
                cmd.insert_id = insert_id
        if pos + 4 <= len(p):
            cmd.warnings = int.from_bytes(p[pos + 2:pos + 4], "little")

    def _eof_packet(self, cmd: _Cmd, p: bytes) -> int:
        """EOF packet: 0xFE, warnings, status; returns the status flags."""
        if len(p) >= 5:
            cmd.warnings = int.from_bytes(p[1:3], "little")
            return int.from_bytes(p[3:5], "little")
        return 0

    def _err(self, cmd: _Cmd, p: bytes) -> None:
        """ERR packet: 0xFF, code, ['#' + 5-character SQL state], message."""
        if len(p) < 3:
            raise _Malformed("short ERR packet")
        cmd.status = "error"
        cmd.error_code = int.from_bytes(p[1:3], "little")
        if p[3:4] == b"#" and len(p) >= 9:
            cmd.sql_state = p[4:9].decode("ascii", "replace")
            if len(cmd.sql_state) != 5 or not cmd.sql_state.isprintable():
                cmd.sql_state = ""
            cmd.error_message = _text(p[9:])
        else:
            cmd.error_message = _text(p[3:])

    # -- transactions --------------------------------------------------------------------

    def _complete(self, cmd: _Cmd) -> None:
        self._awaiting.popleft()
        self._finish(cmd)
        self._rmode = _R_FIRST

    def _finish(self, cmd: _Cmd) -> None:
        cmd.done = True
        self._emit_ready()

    def _emit_ready(self) -> None:
        txns = self._txns
        while txns and txns[0].done:
            self._out.append(txns.popleft().transaction())
            self.transactions += 1

    def _flush_all(self) -> None:
        while self._txns:
            self._out.append(self._txns.popleft().transaction())
            self.transactions += 1
        self._awaiting.clear()

    def _stop(self, note: str) -> None:
        """Nothing more to parse in plaintext: report what is open and go DONE."""
        self._flush_all()
        self.note = note
        self.state = _DONE
        self._buf[0].clear()
        self._buf[1].clear()

    def _fail(self, reason: str) -> None:
        if self.state is not _OK:
            return
        self._flush_all()
        self.state = _ERROR
        self.error = reason
        self._buf[0].clear()
        self._buf[1].clear()


def fuzz_one(data: bytes) -> None:
    """One fuzz execution: `data` is a script of operations on a fresh parser (direction,
    kind and length from a 2-byte header, then the bytes). Anything escaping is a bug."""
    parser = MysqlParser()
    pos = 0
    ts = 0
    while pos + 2 <= len(data) and parser.state is _OK:
        op, n = data[pos], data[pos + 1]
        pos += 2
        direction = _TO_CLIENT if op & 1 else _TO_SERVER
        kind = (op >> 1) % 8
        ts += 1000
        if kind == 0:
            parser.receive_gap(direction, n, ts)
        elif kind == 1:
            parser.receive_skip(direction, parser.skip_hint(direction) or n, ts)
        elif kind == 2:
            parser.receive_eof(direction, ts)
        else:
            parser.receive_data(direction, data[pos:pos + n], ts)
            pos += n
        parser.skip_hint(direction)
        parser.idle_until_request(direction)
        while parser.next_event() is not NEED_DATA:
            pass
    parser.summary()


# -- registration (sensor/l7/registry.py) --------------------------------------------------

def table_line(d: MysqlEvent) -> list[tuple[str, str | None]]:
    from sensor.export.table import duration  # rendering only; not needed to parse

    what = d.statement or d.schema or d.user or d.server_version
    out = [(f"{d.command} {what}".rstrip(), None), ("->", "dim")]
    if d.status == "error":
        out.append((f"ERR {d.error_code} {d.sql_state} {d.error_message}".rstrip(), "red"))
    elif d.status == "result":
        out.append((f"{d.rows} rows", None))
    elif d.status == "ok":
        out.append((f"OK {d.affected_rows} affected", None))
    else:
        out.append((d.status or "-", None))
    if d.latency_ns:
        out.append((duration(d.latency_ns), None))
    return out


# SUMMARY_FIELDS are the parser's summary() keys: the Flow's l7_summary map. After an SSL
# hand-over the TLS parser's SNI and JA4 fill the Flow's TLS fields (app_proto stays mysql).
PROTOCOL = Protocol(
    name=APP_PROTO, event=MysqlEvent, parser=MysqlParser, options=("redact",),
    tcp_ports=PORTS, signature=looks_like, priority=33,
    summary=("tls_sni", "tls_ja4"), summary_keys=SUMMARY_FIELDS,
    column_types={"statement_id": "u32", "warnings": "u16", "error_code": "u16"},
    line=table_line, style="yellow",
    filters=(Filter(name="sql_query_contains", field="statement", match="contains",
                    help="text the SQL statement contains (MySQL, PostgreSQL; any case)"),),
)
