"""HTTP/1.0 and HTTP/1.1 transactions from a reassembled TCP stream (RFC 9112), sans-I/O.

Strategy
- Each direction has its own framing state machine: a message head, then a body framed by
  Transfer-Encoding: chunked, Content-Length, or the end of the stream (responses only),
  following the precedence of RFC 9112 §6.3. Bytes are parsed eagerly as they arrive, so a
  message head is scanned once and a body of known length is only counted, never copied.
- Requests are queued in order; each final response pairs with the oldest request still
  waiting (pipelining and keep-alive, RFC 9112 §9.3.2). A transaction is emitted when both
  its request and its response are complete, in request order.
- 1xx interim responses (100 Continue, 102, 103) are not paired; the final response is.
  101 Switching Protocols, and a 2xx answer to CONNECT, end HTTP on this connection: the
  transaction is emitted and the parser goes to DONE (the rest is websocket, h2c, TLS...).
  While such a request waits for its answer, further request bytes are held (bounded), and
  parsed as HTTP only if the server declines.
- A response with no request waiting (the capture started mid-connection, or the request
  was lost) becomes a transaction of its own with an empty method and no latency; its
  body is framed as for a GET, because the method is unknown.
- At the end of the server's direction, requests still waiting are emitted with status 0.
- Latency is from the first byte of the request to the first byte of the final response;
  an interim 100 Continue measures nothing about the server's work, so it is not used.
- Gaps and skipped bytes inside a body are counted as body bytes and cost nothing; a gap
  that reaches into a message head, a chunk-size line or a trailer makes the stream
  unparseable and the parser goes to ERROR.
- Secrets are redacted at parse time (sensor/l7/redact.py); header values other than
  Host, User-Agent and Content-Type are never copied at all.

Bounds (why): a message head may be at most `max_header_bytes` (64 KiB, h11's
DEFAULT_MAX_INCOMPLETE_EVENT_SIZE; real heads are a few hundred bytes, and the limit caps
what one stream can make us buffer); at most `max_outstanding` requests may wait for
responses (pipelining depth beyond 64 is not seen from real clients and each waiting
request holds memory); a chunk-size line may be at most 4 KiB (chunk extensions are
tiny). Exceeding a bound is an ERROR with the reason.
"""

from __future__ import annotations

import dataclasses
import re
from collections import deque
from dataclasses import dataclass
from typing import Callable

from sensor.l7 import principal
from sensor.l7.base import NEED_DATA, Direction, ParserState, Transaction, _NeedData
from sensor.l7.pii import REDACTED, Scanner, has_pii, scrub_target
from sensor.l7.redact import redact_target, strip_userinfo
from sensor.l7.registry import Counts, Filter, FramingHints, Protocol, ZeekLog
from sensor.model import HttpEvent, trusted

# Enum members bound once: a class attribute lookup on an Enum costs several times a
# global's, and these are read on every call of the hot paths.
_OK, _DONE, _ERROR = ParserState.OK, ParserState.DONE, ParserState.ERROR
_TO_SERVER, _TO_CLIENT = Direction.TO_SERVER, Direction.TO_CLIENT

DEFAULT_MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_OUTSTANDING = 64
_MAX_CHUNK_LINE = 4096
_MAX_LEADING_EMPTY_LINES = 16  # RFC 9112 §2.2 asks to ignore "at least one"

# Framing modes of one direction.
_HEAD = 0          # reading a message head
_LENGTH = 1        # Content-Length body: _remaining bytes to go
_CHUNK_SIZE = 2    # reading a chunk-size line
_CHUNK_DATA = 3    # inside a chunk: _remaining bytes to go
_CHUNK_CRLF = 4    # the CRLF after chunk data
_TRAILER = 5       # trailer section after the last chunk
_UNTIL_CLOSE = 6   # response body delimited by the end of the stream
_PAUSED = 7        # request side waiting for the answer to CONNECT / Upgrade
_IDLE = 8          # nothing more expected (after the end of the stream)

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_TCHAR_FIRST = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz\r\n")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}\Z")
_VERSION = re.compile(rb"HTTP/1\.[0-9]\Z")
_DIGITS = re.compile(rb"[0-9]{1,19}\Z")
# The usual spellings, which _TOKEN and _VERSION match: a set lookup answers for them
# before the regular expressions are tried (a request line is checked per request).
_COMMON_METHODS = frozenset((b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS",
                             b"PATCH", b"CONNECT"))
_COMMON_VERSIONS = frozenset((b"HTTP/1.1", b"HTTP/1.0"))
_INTERESTING = frozenset((
    b"host", b"user-agent", b"content-type", b"content-length", b"transfer-encoding",
    b"connection", b"upgrade",
    # credentials: only their kinds and a salted hash of the principal are kept
    # (sensor/l7/principal.py), in the event's auth and the flow's summary
    *principal.HEADERS,
))
# First letters (lower case) of those names: most other lines are passed over on one test.
_INTERESTING_FIRST = frozenset(name[0] for name in _INTERESTING)
_HTTP_EVENT = trusted(HttpEvent)
_NO_PII = Counts()   # the event's pii when counting is off: no conversion per event


class _Txn:
    """One request/response exchange being assembled (mutable, private)."""

    __slots__ = (
        "method", "host", "path", "version", "user_agent", "req_ctype", "req_body",
        "req_ts", "req_done", "status", "reason", "resp_ctype", "resp_body", "resp_ts",
        "resp_done", "is_head", "is_connect", "wants_upgrade", "head", "req_data", "want",
        "resp_data", "resp_want", "auth",
    )

    def __init__(self) -> None:
        self.method = ""
        self.host = ""
        self.path = ""
        self.version = ""
        self.user_agent = ""
        self.req_ctype = ""
        self.req_body = 0
        self.req_ts = -1
        self.req_done = False
        self.status = 0
        self.reason = ""
        self.resp_ctype = ""
        self.resp_body = 0
        self.resp_ts = -1
        self.resp_done = False
        self.is_head = False
        self.is_connect = False
        self.wants_upgrade = False
        self.head: bytes | None = None        # raw request head, kept for inspection only
        self.req_data: bytearray | None = None  # request body prefix captured for rules
        self.want = 0                         # body bytes still to capture
        self.resp_data: bytearray | None = None  # response body sample for PII counts
        self.resp_want = 0
        self.auth: tuple = ()                 # credentials: kinds and principal hashes

    def transaction(self, pii: Scanner | None = None) -> Transaction:
        latency = self.resp_ts - self.req_ts if self.req_ts >= 0 and self.resp_ts >= 0 else 0
        # Trusted (model.trusted): every value is this parser's own, bounded (a 3-digit
        # status, byte counts, a non-negative latency).
        event = _HTTP_EVENT(
            method=self.method, host=self.host, path=self.path, version=self.version,
            status=self.status, reason=self.reason, user_agent=self.user_agent,
            request_content_type=self.req_ctype, response_content_type=self.resp_ctype,
            request_body_len=self.req_body, response_body_len=self.resp_body,
            latency_ns=latency if latency > 0 else 0,
            pii=self._pii(pii) if pii is not None else _NO_PII, auth=self.auth,
        )
        if event.pii and pii is not None:
            # What was counted must not stay in the record's own text fields.
            event = dataclasses.replace(event, path=scrub_target(event.path),
                                        user_agent=REDACTED if has_pii(event.user_agent,
                                                                       ip=False)
                                        else event.user_agent)
        ts = self.req_ts if self.req_ts >= 0 else max(self.resp_ts, 0)
        if self.head is not None:
            body = bytes(self.req_data) if self.req_data is not None else b""
            return HttpTransaction(ts, event, request=(self.head, body))
        return Transaction(ts, event)

    def _pii(self, pii: Scanner) -> dict[str, int]:
        """PII counts of the kept request head and body prefix and the response sample;
        the bytes are dropped with this transaction, only the counts go on."""
        counts: dict[str, int] = {}
        if self.head is not None:
            pii.request(self.head, bytes(self.req_data or b""), self.req_ctype, counts)
        if self.resp_data:
            pii.response(bytes(self.resp_data), self.resp_ctype, counts)
        return counts


@dataclass(frozen=True, slots=True)
class HttpTransaction(Transaction):
    """A transaction with its raw request head and captured body prefix, for the rules
    stage (sensor/rules/) only: never copied into a record, so redaction is unaffected."""

    request: tuple[bytes, bytes] | None = None


class _Malformed(Exception):
    """Internal: the peer sent something that is not HTTP/1.x. Never escapes the parser."""


def _text(raw: bytes) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        return raw.decode("utf-8", "backslashreplace")


def _media_type(raw: bytes) -> str:
    """`text/html; charset=utf-8` -> `text/html`: parameters can carry boundaries and
    other per-message noise that makes the field useless for grouping."""
    return _text(raw.split(b";", 1)[0].strip()).lower()


def _parse_head(block: bytes) -> tuple[list[bytes], dict[bytes, list[bytes]]]:
    """The head's lines (start line first) and the values of the headers Loupe uses.
    Every field line is checked; only the interesting ones are lower-cased and kept."""
    lines = block.splitlines()
    headers: dict[bytes, list[bytes]] = {}
    last: list[bytes] | None = None   # values of the previous field, if kept
    started = False
    for line in lines[1:]:
        if not line:
            continue
        first = line[0]
        if first == 0x20 or first == 0x09:
            # obs-fold (RFC 9112 §5.2): a continuation of the previous field's value.
            if not started:
                raise _Malformed("continuation line before any header")
            if last is not None:
                last[-1] = last[-1] + b" " + line.strip(b" \t")
            continue
        started = True
        colon = line.find(b":")
        if colon <= 0 or line[colon - 1] in (0x20, 0x09):
            # RFC 9112 §5.1: no whitespace between field name and colon.
            raise _Malformed("bad header line")
        if (first | 0x20) in _INTERESTING_FIRST:
            name = line[:colon].lower()
            if name in _INTERESTING:
                values = headers.get(name)
                if values is None:
                    values = headers[name] = []
                values.append(line[colon + 1:].strip(b" \t"))
                last = values
                continue
        last = None
    return lines, headers


def _content_length(values: list[bytes]) -> int:
    if len(values) == 1:
        value = values[0]
        if value.isdigit() and len(value) <= 19:
            return int(value)   # the usual single plain number: what the rules below give
    found: set[bytes] = set()
    for value in values:
        for item in value.split(b","):
            item = item.strip(b" \t")
            if not _DIGITS.match(item):
                raise _Malformed("bad Content-Length")
            found.add(item.lstrip(b"0") or b"0")
    if len(found) != 1:
        raise _Malformed("conflicting Content-Length values")  # RFC 9112 §6.3 item 5
    return int(found.pop())


def _codings(values: list[bytes]) -> list[bytes]:
    return [c.strip(b" \t").lower() for v in values for c in v.split(b",") if c.strip(b" \t")]


class Http1Parser:
    """HTTP/1.x for one TCP connection. See the module docstring for the rules."""

    name = "http"

    def __init__(self, *, redact: bool = True,
                 max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
                 max_outstanding: int = DEFAULT_MAX_OUTSTANDING,
                 inspect: Callable[[str, str, str], int] | None = None,
                 pii: Scanner | None = None,
                 on_request: Callable[[Transaction], None] | None = None) -> None:
        if max_header_bytes < 64 or max_outstanding < 1:
            raise ValueError("max_header_bytes must be >= 64 and max_outstanding >= 1")
        self.state = _OK
        self.error = ""
        self.redact = redact
        self.max_header_bytes = max_header_bytes
        self.max_outstanding = max_outstanding
        self.transactions = 0
        self._buf = (bytearray(), bytearray())
        self._scan = [0, 0]          # where to resume looking for the end of a head
        self._mode = [_HEAD, _HEAD]
        self._remaining = [0, 0]
        self._head_ts = [0, 0]        # time of the first byte of the current message
        self._eof = [False, False]
        self._txns: deque[_Txn] = deque()      # not yet emitted, in request order
        self._awaiting: deque[_Txn] = deque()  # request head seen, final response not
        self._req: _Txn | None = None          # whose request body is being read
        self._resp: _Txn | None = None         # whose response body is being read
        self._out: deque[Transaction] = deque()
        self._host = ""
        self._auth: set[str] = set()    # credential kinds seen (principal.KINDS)
        self._principal = ""            # the first principal's salted hash
        # Rules inspection (sensor/rules/capture.py): given a request's method, raw target
        # and media type, how many body bytes to capture (0: none). With it, request heads
        # are kept raw; without it (the default) nothing changes.
        self.inspect = inspect
        # PII counting (sensor/l7/pii.py): request heads are kept, request body prefixes
        # and sampled response body prefixes captured, and counted when the transaction
        # is emitted. None (the default): nothing changes.
        self.pii = pii
        # Early verdicts (sensor/rules/stage.py): called with the request alone (status 0)
        # as soon as a request is complete, before its response; the transaction is still
        # emitted whole later. None (the default): nothing changes.
        self.on_request = on_request
        self._responses = 0   # final responses seen: the response sampling sequence

    # -- the L7Parser contract -------------------------------------------------------------

    def receive_data(self, direction: Direction, data: bytes, ts_ns: int) -> None:
        if self.state is not _OK or not data:
            return
        d = int(direction)
        if self._eof[d]:
            return
        buf = self._buf[d]
        mode = self._mode[d]
        if mode == _LENGTH or mode == _CHUNK_DATA:
            if not buf:
                # A body of known length: count it, copy nothing.
                n = len(data)
                take = n if n < self._remaining[d] else self._remaining[d]
                if d == 0 and self._req is not None and self._req.want:
                    self._capture(data, 0, take)
                elif d == 1 and self._resp is not None and self._resp.resp_want:
                    self._capture_response(data, 0, take)
                self._body(d, take)
                if take == n:
                    return
                data = data[take:]
                mode = self._mode[d]
        elif mode == _UNTIL_CLOSE:
            if d == 1 and self._resp is not None and self._resp.resp_want:
                self._capture_response(data, 0, len(data))
            self._body(d, len(data))
            return
        elif mode == _IDLE:
            return
        if mode == _HEAD and not buf:
            self._head_ts[d] = ts_ns
        if buf:
            buf += data
            view: bytes | bytearray = buf
        else:
            view = data
        try:
            pos = self._run(d, view, ts_ns)
        except _Malformed as exc:
            self._fail(str(exc))
            return
        if self.state is not _OK:
            return
        if view is buf:
            del buf[:pos]
        elif pos < len(data):
            buf += data[pos:] if pos else data
        self._scan[d] = self._scan[d] - pos if self._scan[d] > pos else 0

    def receive_datagram(self, direction: Direction, data: bytes, ts_ns: int) -> None:
        self._fail("HTTP/1 runs over a stream, got a datagram")

    def receive_gap(self, direction: Direction, length: int, ts_ns: int) -> None:
        self._lost(int(direction), length, "gap")

    def receive_skip(self, direction: Direction, length: int, ts_ns: int) -> None:
        self._lost(int(direction), length, "skip")

    def receive_eof(self, direction: Direction, ts_ns: int) -> None:
        d = int(direction)
        if self.state is not _OK or self._eof[d]:
            return
        self._eof[d] = True
        mode = self._mode[d]
        if mode in (_LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER, _UNTIL_CLOSE):
            # The body ends with the stream: a close-delimited body is complete, any other
            # is cut short; either way the transaction is reported with what was seen.
            self._complete(d)
        elif mode == _HEAD and self._buf[d].strip(b"\r\n"):
            self._fail("incomplete message head at end of stream")
            return
        self._mode[d] = _IDLE
        self._buf[d].clear()
        if d == _TO_CLIENT:
            # No response can come any more: report every request still waiting.
            self._flush_all()
        if self._eof[0] and self._eof[1] and self.state is _OK:
            self._flush_all()
            self.state = _DONE

    def pending_head(self, direction: Direction) -> int:
        """The time (ts_ns) of the first byte of a message head begun in `direction` and
        not yet complete, or 0: slow-request detection (sensor/rules/ddos.py) reads it."""
        d = int(direction)
        if self.state is not _OK or self._mode[d] != _HEAD or not self._buf[d]:
            return 0
        return self._head_ts[d]

    def skip_hint(self, direction: Direction) -> int:
        d = int(direction)
        if self.state is not _OK or self._buf[d]:
            return 0
        mode = self._mode[d]
        if mode == _LENGTH or mode == _CHUNK_DATA:
            if d == 0 and self._req is not None and self._req.want:
                return 0   # a body prefix the rules asked for: deliver it
            if d == 1 and self._resp is not None and self._resp.resp_want:
                return 0   # a response sample for the PII counts
            return self._remaining[d]
        return 0

    def wanted(self, direction: Direction) -> int:
        """Request body bytes still to capture for the rules (0 in every other case): the
        live budget grants them (sensor/engine/live.py, docs/rules.md)."""
        if self.state is not _OK:
            return 0
        if int(direction) == 1:
            return self._resp.resp_want if self._resp is not None else 0
        txn = self._req
        return txn.want if txn is not None else 0

    def _capture(self, view, pos: int, n: int) -> None:
        txn = self._req
        take = n if n < txn.want else txn.want
        txn.req_data += view[pos:pos + take]
        txn.want -= take

    def _capture_response(self, view, pos: int, n: int) -> None:
        txn = self._resp
        take = n if n < txn.resp_want else txn.resp_want
        txn.resp_data += view[pos:pos + take]
        txn.resp_want -= take

    def next_event(self) -> Transaction | _NeedData:
        if self._out:
            return self._out.popleft()
        return NEED_DATA

    def summary(self) -> dict[str, str]:
        out = {"http_host": self._host} if self._host else {}
        if self._auth:
            out["http_auth"] = ",".join(k for k in principal.KINDS if k in self._auth)
        if self._principal:
            out["http_principal"] = self._principal
        return out

    # -- framing -----------------------------------------------------------------------------

    def _run(self, d: int, view: bytes | bytearray, ts_ns: int) -> int:
        """Parse as much of view as possible; return how many bytes were consumed."""
        pos = 0
        end = len(view)
        modes = self._mode
        remaining = self._remaining
        while pos < end:
            mode = modes[d]
            if mode == _HEAD:
                if view[pos] in (0x0D, 0x0A):
                    # Empty lines before a message (RFC 9112 §2.2) are skipped.
                    skipped = 0
                    while pos < end and view[pos] in (0x0D, 0x0A) \
                            and skipped < 2 * _MAX_LEADING_EMPTY_LINES:
                        pos += 1
                        skipped += 1
                    if pos >= end:
                        break
                self._check_start(d, view, pos)
                head_end, next_pos = self._find_head_end(d, view, pos)
                if head_end < 0:
                    if end - pos > self.max_header_bytes:
                        raise _Malformed(f"message head exceeds {self.max_header_bytes} bytes")
                    break
                if head_end - pos > self.max_header_bytes:
                    raise _Malformed(f"message head exceeds {self.max_header_bytes} bytes")
                block = bytes(view[pos:head_end])
                pos = next_pos
                self._scan[d] = pos
                if d == 0:
                    self._request_head(block)
                else:
                    self._response_head(block)
                    if self.state is not _OK:
                        break  # the connection switched protocols
                if modes[d] == _HEAD:
                    self._head_ts[d] = ts_ns
            elif mode == _CHUNK_DATA:
                left = remaining[d]
                avail = end - pos
                take = avail if avail < left else left
                txn = self._req if d == 0 else self._resp
                if txn is not None:
                    if d == 0:
                        if txn.want:
                            self._capture(view, pos, take)
                        txn.req_body += take
                    else:
                        if txn.resp_want:
                            self._capture_response(view, pos, take)
                        txn.resp_body += take
                pos += take
                if take < left:
                    remaining[d] = left - take
                    break
                remaining[d] = 0
                if view[pos:pos + 2] == b"\r\n":
                    pos += 2  # the usual CRLF after chunk data, without another turn
                    modes[d] = _CHUNK_SIZE
                else:
                    modes[d] = _CHUNK_CRLF
            elif mode == _LENGTH:
                avail = end - pos
                take = avail if avail < remaining[d] else remaining[d]
                if d == 0 and self._req is not None and self._req.want:
                    self._capture(view, pos, take)
                elif d == 1 and self._resp is not None and self._resp.resp_want:
                    self._capture_response(view, pos, take)
                pos += take
                self._body(d, take)
                if modes[d] == _HEAD:
                    self._head_ts[d] = ts_ns
            elif mode == _CHUNK_SIZE:
                nl = view.find(b"\n", pos)
                if nl < 0:
                    if end - pos > _MAX_CHUNK_LINE:
                        raise _Malformed("chunk-size line too long")
                    break
                if nl - pos > _MAX_CHUNK_LINE:
                    raise _Malformed("chunk-size line too long")
                line = bytes(view[pos:nl])
                semi = line.find(b";")
                size = (line[:semi] if semi >= 0 else line).strip(b" \t\r")
                if not _HEX.match(size):
                    raise _Malformed("bad chunk size")
                pos = nl + 1
                n = int(size, 16)
                if n:
                    modes[d] = _CHUNK_DATA
                    remaining[d] = n
                else:
                    modes[d] = _TRAILER
                    self._scan[d] = pos
            elif mode == _CHUNK_CRLF:
                if view[pos] == 0x0A:
                    pos += 1
                elif view[pos] == 0x0D:
                    if pos + 1 >= end:
                        break
                    if view[pos + 1] != 0x0A:
                        raise _Malformed("no CRLF after chunk data")
                    pos += 2
                else:
                    raise _Malformed("no CRLF after chunk data")
                modes[d] = _CHUNK_SIZE
            elif mode == _TRAILER:
                if view[pos] == 0x0A or view[pos:pos + 2] == b"\r\n":
                    pos += 1 if view[pos] == 0x0A else 2
                    self._complete(d)
                    self._head_ts[d] = ts_ns
                    continue
                if view[pos] == 0x0D and pos + 1 >= end:
                    break
                head_end, next_pos = self._find_head_end(d, view, pos)
                if head_end < 0:
                    if end - pos > self.max_header_bytes:
                        raise _Malformed(f"trailer section exceeds {self.max_header_bytes} bytes")
                    break
                pos = next_pos
                self._complete(d)
                self._head_ts[d] = ts_ns
            elif mode == _UNTIL_CLOSE:
                if d == 1 and self._resp is not None and self._resp.resp_want:
                    self._capture_response(view, pos, end - pos)
                self._body(d, end - pos)
                pos = end
            elif mode == _PAUSED:
                # Hold request bytes until the server accepts or declines the switch.
                if end - pos > self.max_header_bytes:
                    raise _Malformed("too many bytes sent before the protocol switch was answered")
                break
            else:  # _IDLE
                pos = end
        return pos

    def _find_head_end(self, d: int, view: bytes | bytearray, pos: int) -> tuple[int, int]:
        """(end of the head, start of what follows), or (-1, -1). RFC 9112 §2.2 lets a
        recipient accept a bare LF as a line terminator, so both forms end a head."""
        scan = self._scan[d]
        start = scan - 3 if scan - 3 > pos else pos
        crlf = view.find(b"\n\r\n", start)
        lf = view.find(b"\n\n", start, crlf + 2 if crlf >= 0 else len(view))
        if lf >= 0 and (crlf < 0 or lf < crlf):
            return lf, lf + 2
        if crlf >= 0:
            return crlf, crlf + 3
        self._scan[d] = len(view)
        return -1, -1

    def _check_start(self, d: int, view: bytes | bytearray, pos: int) -> None:
        """Fail early on bytes that cannot start a message, so junk is not buffered up
        to the head limit before it is recognised."""
        if d == 0:
            if view[pos] not in _TCHAR_FIRST:
                raise _Malformed("not an HTTP request")
        else:
            prefix = bytes(view[pos:pos + 7])
            if not b"HTTP/1.".startswith(prefix):
                raise _Malformed("not an HTTP response")

    def _request_head(self, block: bytes) -> None:
        lines, headers = _parse_head(block)
        if not lines:
            # Only empty lines, past the number skipped before a message.
            raise _Malformed("bad request line")
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            raise _Malformed("bad request line")
        method, target, version = parts
        if (method not in _COMMON_METHODS and not _TOKEN.match(method)) or not target \
                or (version not in _COMMON_VERSIONS and not _VERSION.match(version)):
            raise _Malformed("bad request line")
        if len(self._txns) >= self.max_outstanding:
            raise _Malformed(f"more than {self.max_outstanding} requests awaiting responses")
        txn = _Txn()
        txn.method = _text(method)
        txn.is_head = method == b"HEAD"
        txn.is_connect = method == b"CONNECT"
        txn.version = _text(version)
        path = _text(target)
        txn.path = redact_target(path) if self.redact else path
        host = headers.get(b"host")
        if host:
            txn.host = _text(host[0])
        elif txn.is_connect:
            txn.host = path
        elif "://" in path:
            authority = path.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0]
            txn.host = authority
        if self.redact and "@" in txn.host:
            txn.host = strip_userinfo(txn.host)
        if txn.host and not self._host:
            self._host = txn.host
        if not headers.keys().isdisjoint(principal.HEADERS):
            # Per request (the event's auth) and per connection (the flow's summary).
            txn.auth = creds = principal.credentials(headers)
            for cred in creds:
                self._auth.add(cred.kind)
                if cred.principal and not self._principal:
                    self._principal = cred.principal
        ua = headers.get(b"user-agent")
        if ua:
            txn.user_agent = _text(ua[0])
        ctype = headers.get(b"content-type")
        if ctype:
            txn.req_ctype = _media_type(ctype[0])
        upgrade = headers.get(b"upgrade")
        if upgrade:
            connection = b",".join(headers.get(b"connection", ())).lower()
            txn.wants_upgrade = b"upgrade" in connection
        txn.req_ts = self._head_ts[0]
        if self.inspect is not None or self.pii is not None:
            txn.head = block
            want = self.inspect(txn.method, path, txn.req_ctype) if self.inspect else 0
            if self.pii is not None:
                want = max(want, self.pii.request_body(txn.method, txn.req_ctype))
            if want > 0:
                txn.req_data = bytearray()
                txn.want = want
        self._txns.append(txn)
        self._awaiting.append(txn)
        self._req = txn
        te = headers.get(b"transfer-encoding")
        if te:
            codings = _codings(te)
            if not codings or codings[-1] != b"chunked":
                # RFC 9112 §6.3 item 4: a request body cannot be close-delimited.
                raise _Malformed("request Transfer-Encoding does not end in chunked")
            self._mode[0] = _CHUNK_SIZE
            return
        cl = headers.get(b"content-length")
        n = _content_length(cl) if cl else 0
        if n:
            self._mode[0] = _LENGTH
            self._remaining[0] = n
        else:
            self._complete(0)

    def _response_head(self, block: bytes) -> None:
        lines, headers = _parse_head(block)
        if not lines:
            raise _Malformed("bad status line")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or (parts[0] not in _COMMON_VERSIONS
                              and not _VERSION.match(parts[0])):
            raise _Malformed("bad status line")
        code = parts[1]
        if len(code) != 3 or not code.isdigit():
            raise _Malformed("bad status code")
        status = int(code)
        if status < 100:
            raise _Malformed("bad status code")
        if 100 <= status < 200 and status != 101:
            return  # interim (RFC 9110 §15.2): the final response is what pairs
        if self._awaiting:
            txn = self._awaiting.popleft()
        else:
            # Mid-stream pickup or a lost request: a response-only transaction.
            if len(self._txns) >= self.max_outstanding:
                raise _Malformed(f"more than {self.max_outstanding} responses without requests")
            txn = _Txn()
            txn.version = _text(parts[0])
            txn.req_done = True
            self._txns.append(txn)
        txn.status = status
        txn.reason = _text(parts[2]) if len(parts) == 3 else ""
        txn.resp_ts = self._head_ts[1]
        ctype = headers.get(b"content-type")
        if ctype:
            txn.resp_ctype = _media_type(ctype[0])
        if self.pii is not None:
            want = self.pii.response_body(txn.resp_ctype, self._responses)
            self._responses += 1
            if want > 0:
                txn.resp_data = bytearray()
                txn.resp_want = want
        self._resp = txn
        if status == 101 or (txn.is_connect and 200 <= status < 300):
            # The connection now carries another protocol (RFC 9110 §15.2.2, §9.3.6).
            txn.resp_done = True
            txn.req_done = True
            self._switch()
            return
        if txn.wants_upgrade or txn.is_connect:
            self._resume_requests()
        if txn.is_head or status == 204 or status == 304:
            self._complete(1)  # RFC 9112 §6.3 item 1: never a body
            return
        te = headers.get(b"transfer-encoding")
        if te:
            codings = _codings(te)
            self._mode[1] = _CHUNK_SIZE if codings and codings[-1] == b"chunked" else _UNTIL_CLOSE
            return
        cl = headers.get(b"content-length")
        if cl:
            n = _content_length(cl)
            if n:
                self._mode[1] = _LENGTH
                self._remaining[1] = n
            else:
                self._complete(1)
            return
        self._mode[1] = _UNTIL_CLOSE

    def _body(self, d: int, n: int) -> None:
        txn = self._req if d == 0 else self._resp
        if txn is not None:
            if d == 0:
                txn.req_body += n
            else:
                txn.resp_body += n
        mode = self._mode[d]
        if mode == _UNTIL_CLOSE:
            return
        left = self._remaining[d] - n
        self._remaining[d] = left
        if left == 0:
            if mode == _LENGTH:
                self._complete(d)
            else:
                self._mode[d] = _CHUNK_CRLF

    def _lost(self, d: int, length: int, what: str) -> None:
        if self.state is not _OK or length <= 0 or self._eof[d]:
            return
        mode = self._mode[d]
        if mode == _UNTIL_CLOSE:
            self._body(d, length)
            return
        if mode == _PAUSED or mode == _IDLE:
            return
        if (mode == _LENGTH or mode == _CHUNK_DATA) and not self._buf[d]:
            take = length if length < self._remaining[d] else self._remaining[d]
            self._body(d, take)
            length -= take
            if not length:
                return
            mode = self._mode[d]
            if mode == _UNTIL_CLOSE:
                self._body(d, length)
                return
        if mode == _CHUNK_SIZE or mode == _CHUNK_CRLF or mode == _TRAILER:
            self._fail(f"{what} in chunked framing")
        else:
            self._fail(f"{what} in headers")

    # -- transactions --------------------------------------------------------------------------

    def _complete(self, d: int) -> None:
        """The current message of direction d is complete."""
        if d == 0:
            txn = self._req
            self._req = None
            if txn is not None:
                txn.req_done = True
                self._mode[0] = _PAUSED if (txn.is_connect or txn.wants_upgrade) \
                    and not txn.resp_done else _HEAD
                if self.on_request is not None and not txn.resp_done:
                    self.on_request(txn.transaction())
            else:
                self._mode[0] = _HEAD
        else:
            txn = self._resp
            self._resp = None
            if txn is not None:
                txn.resp_done = True
            self._mode[1] = _HEAD
        self._emit_ready()

    def _emit_ready(self) -> None:
        txns = self._txns
        while txns and txns[0].req_done and txns[0].resp_done:
            self._out.append(txns.popleft().transaction(self.pii))
            self.transactions += 1

    def _flush_all(self) -> None:
        """Report every transaction still open, with what is known of it."""
        while self._txns:
            self._out.append(self._txns.popleft().transaction(self.pii))
            self.transactions += 1
        self._awaiting.clear()
        self._req = self._resp = None

    def _resume_requests(self) -> None:
        """The server declined the switch: held request bytes are HTTP after all."""
        if self._mode[0] != _PAUSED:
            return
        self._mode[0] = _HEAD
        held = self._buf[0]
        self._scan[0] = 0
        if held:
            pos = self._run(0, held, self._head_ts[0])
            del held[:pos]
            self._scan[0] = self._scan[0] - pos if self._scan[0] > pos else 0

    def _switch(self) -> None:
        self._flush_all()
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


# -- registration (sensor/l7/registry.py) --------------------------------------------------

# Request methods (RFC 9110 §9, plus WebDAV and friends) that open an HTTP/1 request line.
METHODS = frozenset((
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
    b"PROPFIND", b"PROPPATCH", b"MKCOL", b"COPY", b"MOVE", b"LOCK", b"UNLOCK", b"REPORT",
    b"SEARCH", b"MKCALENDAR", b"ACL", b"BIND", b"UNBIND", b"REBIND", b"LINK", b"UNLINK",
))
# The methods the kernel's content sniffer (bpf/flow.c, sniff()) recognises by their first
# four bytes: the common ones only, each costs the verifier a compare. A flow opened by
# another method is still found by its port or by a selection rule.
KERNEL_METHODS = (b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH",
                  b"CONNECT")
# What a segment starting an HTTP/1 message begins with (RFC 9112 3, 4), for the live
# budget (FramingHints): the common methods and a status line.
MESSAGE_STARTS = (*(m + b" " for m in (*KERNEL_METHODS, b"TRACE")), b"HTTP/1.")


def looks_like(first: bytes, direction: Direction) -> bool:
    """A request line's method and a space, or (a capture that starts mid-connection) a
    response starting "HTTP/1."."""
    if direction == Direction.TO_SERVER:
        space = first.find(b" ", 0, 12)
        return space > 0 and first[:space] in METHODS
    return first.startswith(b"HTTP/1.")


def _status_style(status: int) -> str | None:
    return "red" if status >= 500 else "yellow" if status >= 400 else None


def table_line(d: HttpEvent) -> list[tuple[str, str | None]]:
    from sensor.export.table import duration  # rendering only; not needed to parse

    out = [(f"{d.method or '-'} {d.host}{d.path}", None), ("->", "dim"),
           (str(d.status or "-") + (f" {d.reason}" if d.reason else ""),
            _status_style(d.status))]
    if d.latency_ns:
        out.append((duration(d.latency_ns), None))
    return out


def eve(d: HttpEvent) -> dict:
    """Suricata's EVE http object (and Loupe's pii counts, when there are any)."""
    out = {"hostname": d.host, "url": d.path, "http_user_agent": d.user_agent,
           "http_content_type": d.response_content_type, "http_method": d.method,
           "protocol": d.version, "status": d.status or None, "length": d.response_body_len,
           "request_body_len": d.request_body_len, "latency_ns": d.latency_ns}
    if d.pii:
        out["pii"] = dict(d.pii)
    return out


def _mime(content_type: str) -> list[str]:
    base = content_type.split(";", 1)[0].strip()
    return [base] if base else []


def _zeek(e) -> list:
    d = e.detail
    return [d.method or None, d.host or None, d.path or None,
            d.version.removeprefix("HTTP/") or None, d.user_agent or None,
            d.request_body_len, d.response_body_len, d.status or None,
            d.reason or None, _mime(d.request_content_type), _mime(d.response_content_type)]


# Zeek's http.log columns that Loupe has a value for, in Zeek's order.
ZEEK = ZeekLog(path="http", values=_zeek, columns=(
    ("method", "string"), ("host", "string"), ("uri", "string"), ("version", "string"),
    ("user_agent", "string"), ("request_body_len", "count"), ("response_body_len", "count"),
    ("status_code", "count"), ("status_msg", "string"), ("orig_mime_types", "set[string]"),
    ("resp_mime_types", "set[string]")))


PROTOCOL = Protocol(
    name="http", event=HttpEvent, parser=Http1Parser,
    options=("redact", "inspect", "pii", "on_request"),
    # Live budget: room for the next head of each direction, sized by the heads seen;
    # after a lost head, a fresh parser at the next message (sensor/engine/live.py).
    framing=FramingHints(message_starts=MESSAGE_STARTS, head_end=b"\r\n\r\n", resync=True),
    tcp_ports=(80, 8080, 8000, 3128), signature=looks_like, priority=20,
    kernel_prefixes=tuple((m + b" ")[:4] for m in KERNEL_METHODS),
    summary=("http_host",), summary_keys=("http_auth", "http_principal"),
    column_types={"status": "u16"},
    column_ranges=(("status", 0, 999),), columns_checked=True,
    line=table_line, listing=1, style="cyan", eve=eve, zeek=ZEEK,
    filters=(
        Filter(name="http_method", field="method", match="upper", help="GET, POST, ..."),
        Filter(name="http_status", field="status", match="status",
               help="404, 500+, 4xx or 200-299"),
        Filter(name="http_host", field="host", match="glob", flow_field="http_host",
               help="Host glob: '*.example.com'"),
        Filter(name="http_path", field="path", match="glob_case", help="path glob: '/api/*'"),
    ),
)
