"""HTTP/2 (RFC 9113) with HPACK (RFC 7541) and gRPC, one event per stream, sans-I/O.

Strategy
- The client's side starts with the connection preface (h2c with prior knowledge, or h2
  once TLS plaintext is fed in after ALPN); then both sides are a sequence of frames: a
  9-byte header (length, type, flags, stream id) and a payload. Each direction runs its own
  frame state machine.
- HPACK state is per direction and changes with every header block, so every HEADERS,
  PUSH_PROMISE and CONTINUATION payload is buffered (bounded) and decoded, also for streams
  that are no longer tracked. A gap or skip inside a frame header or any of those payloads
  makes the rest of the connection undecodable: ERROR. SETTINGS_HEADER_TABLE_SIZE from one
  side bounds the other side's decoder table.
- DATA payloads are never buffered: their lengths are counted (padding excluded), and
  skip_hint hands the rest of the frame to the kernel, so a 10 MiB message costs what its
  frame headers cost. For gRPC (content-type application/grpc*) the 5-byte prefix of each
  length-prefixed message is read to count messages, and the skip ends at the next prefix.
  Gaps inside DATA payloads cost only the message count of that stream (marked lost).
- A stream is one event: request headers (method, :authority or Host, path, user agent,
  content type), the final response's status and content type (1xx interim responses are
  not it), body lengths, and for gRPC the service and method from the path and
  grpc-status/grpc-message from the trailers, or from the only HEADERS of a Trailers-Only
  response. Latency is from the first byte of the request's HEADERS frame to the first
  byte of the final response's HEADERS frame.
- An event is emitted when the stream closes (END_STREAM both ways, or RST_STREAM either
  way), or at the end of the server's stream with what was seen (ended=False). Events come
  in the order streams close. Server pushes (PUSH_PROMISE) are events marked pushed.
- Secrets: header values other than those named above are never copied (Authorization,
  Cookie, Set-Cookie ...); the path and authority are redacted as in HTTP/1
  (sensor/l7/redact.py).

Not handled: the h2c Upgrade from HTTP/1.1 (detection gives such a flow to the HTTP/1
parser, which stops at the 101 response), and a capture that starts mid-connection (HPACK
state is unknown: the client side must start with the preface).
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from dataclasses import dataclass
from urllib.parse import unquote

from hpack import Decoder
from hpack.exceptions import HPACKError

from sensor.l7 import principal
from sensor.l7.base import NEED_DATA, Direction, ParserState, Transaction, _NeedData
from sensor.l7.redact import redact_target, strip_userinfo
from sensor.l7.pii import REDACTED, Scanner, has_pii, scrub_target
from sensor.l7.registry import Counts, Filter, FramingHints, KernelWalk, Protocol
from sensor.model import HttpCredential

_OK, _DONE, _ERROR = ParserState.OK, ParserState.DONE, ParserState.ERROR

# hpack logs every decoded header field at DEBUG, Authorization and Cookie values included:
# a sensor run with debug logging must not write them out.
logging.getLogger("hpack").setLevel(logging.WARNING)

APP_PROTO = "http2"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Open streams tracked at once. Peers allow 100 concurrent streams by default (nghttp2,
# grpc, Go); 1024 leaves room for generous settings. Past it the oldest stream is reported
# early (ended=False, counted in `evicted`) and its later frames are ignored.
MAX_STREAMS = 1024
# One header block (HEADERS/PUSH_PROMISE plus CONTINUATIONs), compressed, and any other
# frame payload that is buffered (SETTINGS, RST_STREAM, GOAWAY). Peers default to 16 KiB
# frames and about 8-64 KiB header lists; 64 KiB is h11's and HTTP/1's head limit.
MAX_BLOCK = 64 * 1024
# The decoded header list (hpack counts name + value + 32 per field). Indexed fields make
# a small block expand a lot; past this the block is refused (ERROR), as hpack advises.
MAX_HEADER_LIST = 256 * 1024
# The largest HPACK dynamic table a peer may make us keep (its SETTINGS_HEADER_TABLE_SIZE
# is honoured up to this): 16 times the 4 KiB default, which browsers' 64 KiB fits.
MAX_TABLE = 64 * 1024
# Kept characters of the path, authority, user agent and content types; longer values
# are cut and the event is marked truncated.
MAX_VALUE = 2048
MAX_GRPC_MESSAGE = 512   # grpc-message is human-readable status text
# Body octets held for PII counting across the connection's open streams: each stream
# takes up to the scanner's body_bytes/response_bytes, and 1024 open streams would hold
# 12 MiB; past this a stream's body is not captured (its header fields still count).
MAX_PII_HELD = 256 * 1024

_DATA, _HEADERS, _PRIORITY, _RST, _SETTINGS, _PUSH, _PING, _GOAWAY, _WINDOW, _CONT = range(10)
_END_STREAM, _ACK, _END_HEADERS, _PADDED, _PRIO_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
# Frame types whose payload is buffered and read; the others' payloads are only counted.
_READ = frozenset((_HEADERS, _RST, _SETTINGS, _PUSH, _GOAWAY, _CONT))

# Reader modes of one direction.
_PREFACE = 0    # client: the 24-byte preface
_HEAD = 1       # a frame header
_PAYLOAD = 2    # a payload being buffered (_READ types)
_PADLEN = 3     # a padded DATA frame's pad-length byte
_BODY = 4       # a DATA payload: counted, never copied
_IGNORE = 5     # another payload: counted, never copied
_CLOSED = 6

ERROR_CODES = ("NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "FLOW_CONTROL_ERROR",
               "SETTINGS_TIMEOUT", "STREAM_CLOSED", "FRAME_SIZE_ERROR", "REFUSED_STREAM",
               "CANCEL", "COMPRESSION_ERROR", "CONNECT_ERROR", "ENHANCE_YOUR_CALM",
               "INADEQUATE_SECURITY", "HTTP_1_1_REQUIRED")
_U32 = (1 << 32) - 1
_MAX_INT = (1 << 63) - 1
_INT_ONLY = {int}


class _Malformed(Exception):
    """The peer sent something that is not HTTP/2. Never escapes the parser."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Http2Event:
    """One HTTP/2 stream: the HTTP/1 event's fields where they apply, plus gRPC."""

    stream_id: int = 0
    method: str = ""
    host: str = ""                  # :authority, else Host
    path: str = ""                  # redacted like HTTP/1 request targets
    status: int = 0                 # final response status; 0: none seen
    user_agent: str = ""
    request_content_type: str = ""  # media type, parameters dropped
    response_content_type: str = ""
    request_body_len: int = 0       # DATA payload octets, padding excluded
    response_body_len: int = 0
    latency_ns: int = 0
    grpc_service: str = ""          # "helloworld.Greeter" of /helloworld.Greeter/SayHello
    grpc_method: str = ""           # "SayHello"
    grpc_status: int = -1           # -1: no grpc-status seen
    grpc_message: str = ""          # percent-decoded, bounded
    grpc_request_messages: int = 0  # length-prefixed messages each way
    grpc_response_messages: int = 0
    reset: str = ""                 # RST_STREAM error name ("CANCEL"), "" if not reset
    pushed: bool = False            # a server push (PUSH_PROMISE)
    ended: bool = True              # closed by END_STREAM/RST_STREAM (False: cut short)
    truncated: bool = False         # a value was cut to its bound, or messages were lost
    pii: Counts = Counts()          # as HttpEvent.pii (sensor/l7/pii.py)
    auth: tuple[HttpCredential, ...] = ()   # as HttpEvent.auth (sensor/l7/principal.py)

    def __post_init__(self) -> None:
        if type(self.pii) is not Counts:
            object.__setattr__(self, "pii", Counts.of(self.pii))
        values = (self.request_body_len, self.response_body_len, self.latency_ns,
                  self.grpc_request_messages, self.grpc_response_messages)
        if set(map(type, values)) != _INT_ONLY or min(values) < 0 or max(values) > _MAX_INT:
            raise ValueError(f"lengths, latency and message counts must be integers in "
                             f"0..2**63-1, got {values!r}")
        if type(self.stream_id) is not int or not 0 <= self.stream_id <= _U32 >> 1:
            raise ValueError(f"stream_id={self.stream_id!r} is not a 31-bit stream id")
        if type(self.status) is not int or not 0 <= self.status <= 999:
            raise ValueError(f"status={self.status!r} is not in 0..999")
        if type(self.grpc_status) is not int or not -1 <= self.grpc_status <= 0x7FFFFFFF:
            raise ValueError(f"grpc_status={self.grpc_status!r} is not -1 or a status code")


def _text(raw: bytes, limit: int = MAX_VALUE) -> tuple[str, bool]:
    cut = len(raw) > limit
    if cut:
        raw = raw[:limit]
    try:
        return raw.decode("ascii"), cut
    except UnicodeDecodeError:
        return raw.decode("utf-8", "backslashreplace"), cut


_NO_PII = Counts()   # the event's pii when nothing was counted


def _as_head(headers) -> bytes:
    """HTTP/2 header fields as an HTTP/1 request head, for pii.Scanner.request: :path
    becomes the target; :authority, like Host, is the connection's own and left out."""
    path = next((v for n, v in headers if n == b":path"), b"/")
    return b"".join([b"GET ", path, b" HTTP/2\r\n", *(
        n + b": " + v + b"\r\n" for n, v in headers if n[:1] != b":")])


def _is_grpc(media_type: str) -> bool:
    """gRPC over HTTP/2 (application/grpc, application/grpc+proto ...); gRPC-Web frames
    its trailers inside the body and is not counted as gRPC here."""
    return media_type == "application/grpc" or media_type.startswith("application/grpc+")


def _media_type(raw: bytes) -> tuple[str, bool]:
    text, cut = _text(raw.split(b";", 1)[0].strip())
    return text.lower(), cut


class _Stream:
    """One stream being followed (mutable, private)."""

    __slots__ = ("sid", "method", "host", "path", "ua", "req_ctype", "resp_ctype", "status",
                 "body", "req_ts", "resp_ts", "service", "rpc", "grpc", "gstatus", "gmessage",
                 "msgs", "gleft", "ghead", "glost", "ended", "reset", "pushed", "truncated",
                 "final", "pii", "auth", "data", "want")

    def __init__(self, sid: int) -> None:
        self.sid = sid
        self.method = self.host = self.path = self.ua = ""
        self.req_ctype = self.resp_ctype = ""
        self.status = 0
        self.body = [0, 0]
        self.req_ts = -1
        self.resp_ts = -1
        self.service = self.rpc = ""
        self.grpc = [False, False]      # count gRPC messages in this direction
        self.gstatus = -1
        self.gmessage = ""
        self.msgs = [0, 0]
        self.gleft = [0, 0]             # bytes of the current gRPC message to go
        self.ghead = [b"", b""]         # a gRPC message prefix read so far (< 5 bytes)
        self.glost = False
        self.ended = [False, False]
        self.reset = ""
        self.pushed = False
        self.truncated = False
        self.final = False              # the final (non-1xx) response headers were seen
        self.pii: dict | None = None    # PII counts of the request's header fields
        self.auth: tuple = ()           # credentials: kinds and principal hashes
        # Body prefixes captured for PII counting, by direction, and octets still wanted.
        self.data: list[bytearray | None] = [None, None]
        self.want = [0, 0]

    def event(self, ended: bool, pii: Scanner | None = None) -> Transaction:
        latency = self.resp_ts - self.req_ts if self.req_ts >= 0 and self.resp_ts >= 0 else 0
        ts = self.req_ts if self.req_ts >= 0 else max(self.resp_ts, 0)
        counts = self.pii
        if pii is not None and (self.data[0] or self.data[1]):
            # The bodies are counted and dropped here: only the counts go on.
            counts = dict(counts or {})
            for d, direction, ctype in ((0, "request", self.req_ctype),
                                        (1, "response", self.resp_ctype)):
                if self.data[d]:
                    pii.body(bytes(self.data[d]), ctype, direction, counts,
                             grpc=self.grpc[d])
            self.data = [None, None]
        ua = self.ua
        if counts and ua and has_pii(ua, ip=False):
            ua = REDACTED
        return Transaction(ts, Http2Event(
            stream_id=self.sid, method=self.method, host=self.host,
            # What was counted must not stay in the path (sensor/l7/pii.py).
            path=scrub_target(self.path) if counts else self.path,
            status=self.status, user_agent=ua, request_content_type=self.req_ctype,
            response_content_type=self.resp_ctype, request_body_len=self.body[0],
            response_body_len=self.body[1], latency_ns=latency if latency > 0 else 0,
            grpc_service=self.service, grpc_method=self.rpc, grpc_status=self.gstatus,
            grpc_message=self.gmessage, grpc_request_messages=self.msgs[0],
            grpc_response_messages=self.msgs[1], reset=self.reset, pushed=self.pushed,
            ended=ended, truncated=self.truncated or self.glost,
            pii=counts or _NO_PII, auth=self.auth,
        ))


class Http2Parser:
    """HTTP/2 for one TCP connection. See the module docstring for the rules."""

    name = APP_PROTO

    def __init__(self, *, redact: bool = True, max_streams: int = MAX_STREAMS,
                 pii: Scanner | None = None) -> None:
        if max_streams < 1:
            raise ValueError("max_streams must be >= 1")
        # PII counting (sensor/l7/pii.py): the request's header fields and :path, as the
        # HTTP/1 parser counts a request head, and a prefix of each body as HTTP/1 does
        # (requests with bodies, sampled textual responses, gRPC messages both ways),
        # held at most MAX_PII_HELD octets per connection and dropped at the event.
        self.pii = pii
        self._responses = 0       # final responses seen (the scanner's sampling)
        self._pii_held = 0        # body octets held for PII counting
        self._pii_wanted = [0, 0]  # body octets the open streams still want, by direction
        self.state = _OK
        self.error = ""
        self.redact = redact
        self.max_streams = max_streams
        self.transactions = 0
        self.evicted = 0          # streams reported early because too many were open
        self.unknown_streams = 0  # frames for streams not followed (closed, evicted)
        self.goaway = ""          # the error name of a GOAWAY, once one was seen
        self.elided_bytes = [0, 0]   # whole frames the kernel left out, by direction
        self._mode = [_PREFACE, _HEAD]
        self._buf = (bytearray(), bytearray())
        self._left = [0, 0]       # payload bytes of the current frame to go
        self._pad = [0, 0]        # of which trailing padding (DATA)
        self._type = [0, 0]
        self._flags = [0, 0]
        self._sid = [0, 0]
        self._ts = [0, 0]         # time of the current frame's first byte
        self._body_stream: list[_Stream | None] = [None, None]
        # Header block being assembled: [stream id, first frame's flags, time, promised id].
        self._block: list[list | None] = [None, None]
        self._fragments = (bytearray(), bytearray())
        self._hpack = (self._decoder(), self._decoder())
        self._streams: OrderedDict[int, _Stream] = OrderedDict()
        self._last_sid = [0, 0]   # highest stream id opened by the client (odd) / pushes (even)
        self._out: deque[Transaction] = deque()
        self._host = ""
        self._auth: set[str] = set()    # credential kinds seen (principal.KINDS)
        self._principal = ""            # the first principal's salted hash
        self._grpc_service = self._grpc_method = ""

    @staticmethod
    def _decoder() -> Decoder:
        return Decoder(max_header_list_size=MAX_HEADER_LIST)

    # -- the L7Parser contract ---------------------------------------------------------------

    def receive_data(self, direction: Direction, data: bytes, ts_ns: int) -> None:
        if self.state is not _OK or not data:
            return
        d = int(direction)
        mode = self._mode[d]
        if mode == _CLOSED:
            return
        if (mode == _BODY or mode == _IGNORE) and len(data) < self._left[d] - self._pad[d]:
            # Inside a payload that is only counted (the common case for big bodies).
            self._count(d, data, 0, len(data))
            return
        try:
            self._run(d, data, ts_ns)
        except _Malformed as exc:
            self._fail(str(exc))

    def receive_datagram(self, direction: Direction, data: bytes, ts_ns: int) -> None:
        self._fail("HTTP/2 runs over a stream, got a datagram")

    def receive_gap(self, direction: Direction, length: int, ts_ns: int) -> None:
        self._lost(int(direction), length, "gap")

    def receive_skip(self, direction: Direction, length: int, ts_ns: int) -> None:
        self._lost(int(direction), length, "skip")

    def receive_eof(self, direction: Direction, ts_ns: int) -> None:
        d = int(direction)
        if self.state is not _OK or self._mode[d] == _CLOSED:
            return
        self._mode[d] = _CLOSED
        self._buf[d].clear()
        self._fragments[d].clear()
        if d == 1:
            self._flush()   # no response can come any more
        if self._mode[0] == _CLOSED and self._mode[1] == _CLOSED:
            self._flush()
            self.state = _DONE

    def skip_hint(self, direction: Direction) -> int:
        d = int(direction)
        if self.state is not _OK:
            return 0
        mode = self._mode[d]
        if mode == _IGNORE:
            return self._left[d]
        if mode != _BODY:
            return 0
        left = self._left[d]
        s = self._body_stream[d]
        if s is not None and s.want[d]:
            return 0   # a body prefix for PII counting: its octets are read
        if s is None or not s.grpc[d] or s.glost:
            return left
        content = left - self._pad[d]
        if s.ghead[d] or not s.gleft[d]:
            return 0 if content else left   # a message prefix is next
        return left if s.gleft[d] >= content else s.gleft[d]

    def next_event(self) -> Transaction | _NeedData:
        if self._out:
            return self._out.popleft()
        return NEED_DATA

    def summary(self) -> dict[str, str]:
        out = {"http_host": self._host} if self._host else {}
        if self._grpc_method:   # the first gRPC call's: what the connection was for
            out["grpc_service"], out["grpc_method"] = self._grpc_service, self._grpc_method
        if self._auth:
            out["http_auth"] = ",".join(k for k in principal.KINDS if k in self._auth)
        if self._principal:
            out["http_principal"] = self._principal
        return out

    # -- framing -------------------------------------------------------------------------------

    def _run(self, d: int, data: bytes, ts_ns: int) -> None:
        pos, end = 0, len(data)
        buf = self._buf[d]
        modes = self._mode
        while pos < end and self.state is _OK:
            mode = modes[d]
            if mode == _BODY or mode == _IGNORE:
                take = min(self._left[d], end - pos)
                self._count(d, data, pos, take)
                pos += take
            elif mode == _HEAD:
                if not buf:
                    self._ts[d] = ts_ns
                need = 9 - len(buf)
                if end - pos < need or buf:
                    buf += data[pos:pos + need]
                    pos += min(need, end - pos)
                    if len(buf) < 9:
                        break
                    head = bytes(buf)
                    buf.clear()
                else:
                    head = data[pos:pos + 9]
                    pos += 9
                self._frame(d, head)
            elif mode == _PAYLOAD:
                take = min(self._left[d] - len(buf), end - pos)
                buf += data[pos:pos + take]
                pos += take
                if len(buf) == self._left[d]:
                    payload = bytes(buf)
                    buf.clear()
                    self._left[d] = 0
                    modes[d] = _HEAD
                    self._payload(d, payload)
            elif mode == _PADLEN:
                pad = data[pos]
                pos += 1
                self._left[d] -= 1
                if pad > self._left[d]:
                    raise _Malformed("DATA padding longer than the frame")
                self._pad[d] = pad
                modes[d] = _BODY
                if not self._left[d]:
                    self._frame_done(d)
            elif mode == _PREFACE:
                need = len(PREFACE) - len(buf)
                buf += data[pos:pos + need]
                pos += min(need, end - pos)
                if not PREFACE.startswith(buf):
                    raise _Malformed("no HTTP/2 connection preface")
                if len(buf) == len(PREFACE):
                    buf.clear()
                    modes[d] = _HEAD
            else:  # _CLOSED
                break

    def _frame(self, d: int, head: bytes) -> None:
        length = int.from_bytes(head[:3], "big")
        ftype, flags = head[3], head[4]
        sid = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
        self._type[d], self._flags[d], self._sid[d] = ftype, flags, sid
        self._left[d] = length
        self._pad[d] = 0
        if self._block[d] is not None and ftype != _CONT:
            raise _Malformed("header block not continued by CONTINUATION")
        if ftype == _DATA:
            if sid == 0:
                raise _Malformed("DATA on stream 0")
            s = self._streams.get(sid)
            if s is None:
                self.unknown_streams += 1
            self._body_stream[d] = s
            if flags & _PADDED:
                if not length:
                    raise _Malformed("padded DATA frame without a pad length")
                self._mode[d] = _PADLEN
            elif length:
                self._mode[d] = _BODY
            else:
                self._frame_done(d)
        elif ftype in _READ:
            if length > MAX_BLOCK:
                raise _Malformed(f"frame of {length} bytes over {MAX_BLOCK} buffered")
            if length:
                self._mode[d] = _PAYLOAD
            else:
                self._payload(d, b"")
        elif length:
            self._mode[d] = _IGNORE
            self._body_stream[d] = None

    def _count(self, d: int, data: bytes, pos: int, n: int) -> None:
        """n payload bytes of the current DATA (or ignored) frame at data[pos:]."""
        left = self._left[d]
        if self._mode[d] == _BODY:
            s = self._body_stream[d]
            content = left - self._pad[d]
            c = n if n < content else content
            if s is not None and c > 0:
                s.body[d] += c
                if s.want[d]:
                    self._capture(s, d, data, pos, c)
                if s.grpc[d] and not s.glost:
                    self._messages(s, d, data, pos, c)
        self._left[d] = left - n
        if left == n:
            self._frame_done(d)

    def _capture(self, s: _Stream, d: int, data: bytes, pos: int, n: int) -> None:
        """Keep up to the stream's remaining want of n body octets at data[pos:]."""
        k = min(n, s.want[d], MAX_PII_HELD - self._pii_held)
        if k <= 0:
            self._unwant(s, d)
            return
        s.data[d] += data[pos:pos + k]
        s.want[d] -= k
        self._pii_wanted[d] -= k
        self._pii_held += k

    def _unwant(self, s: _Stream, d: int) -> None:
        self._pii_wanted[d] -= s.want[d]
        s.want[d] = 0

    def wanted(self, direction: Direction) -> int:
        """Body octets still to capture for PII counting: the live budget grants them
        (sensor/engine/live.py), as for HTTP/1. Flows the kernel walks (h2c with prior
        knowledge) have their DATA payloads left out in the kernel whatever this says."""
        if self.state is not _OK:
            return 0
        return min(self._pii_wanted[int(direction)], MAX_PII_HELD - self._pii_held)

    @staticmethod
    def _messages(s: _Stream, d: int, data: bytes | None, pos: int, n: int) -> None:
        """gRPC length-prefixed messages (1 byte compressed flag, 4 bytes length) in n
        content bytes; data None: the bytes were lost."""
        gleft = s.gleft
        while n > 0:
            if gleft[d] and not s.ghead[d]:
                k = n if n < gleft[d] else gleft[d]
                gleft[d] -= k
                pos += k
                n -= k
                continue
            if data is None:
                s.glost = True   # a lost message prefix: the count is no longer known
                return
            need = 5 - len(s.ghead[d])
            k = need if need < n else n
            s.ghead[d] += data[pos:pos + k]
            pos += k
            n -= k
            if len(s.ghead[d]) == 5:
                s.msgs[d] += 1
                gleft[d] = int.from_bytes(s.ghead[d][1:5], "big")
                s.ghead[d] = b""

    def _frame_done(self, d: int) -> None:
        self._mode[d] = _HEAD
        if self._type[d] == _DATA:
            s = self._body_stream[d]
            self._body_stream[d] = None
            if s is not None and self._flags[d] & _END_STREAM:
                self._end(s, d)

    def _lost(self, d: int, length: int, what: str) -> None:
        if self.state is not _OK or length <= 0 or self._mode[d] == _CLOSED:
            return
        while length > 0 and self.state is _OK:
            mode = self._mode[d]
            if mode == _HEAD and what == "skip" and not self._buf[d]:
                # Whole frames the kernel left out on purpose (FRAMING.kernel_walk: DATA
                # without END_STREAM, PING, WINDOW_UPDATE): a Skip comes only from a
                # deliberate skip, and this one starts on a frame boundary; none of those
                # frames changes HPACK or stream state. Their DATA octets are not in the
                # streams' body lengths.
                self.elided_bytes[d] += length
                return
            if mode != _BODY and mode != _IGNORE:
                part = "a header block" if mode == _PAYLOAD else \
                    "the preface" if mode == _PREFACE else "a frame header"
                self._fail(f"{what} in {part}")
                return
            left = self._left[d]
            take = length if length < left else left
            s = self._body_stream[d]
            if mode == _BODY and s is not None:
                c = min(take, left - self._pad[d])
                if c > 0:
                    s.body[d] += c
                    self._unwant(s, d)   # what follows a hole is not the prefix's text
                    if s.grpc[d] and not s.glost:
                        self._messages(s, d, None, 0, c)
            self._left[d] = left - take
            length -= take
            if left == take:
                self._frame_done(d)

    # -- frames ----------------------------------------------------------------------------------

    def _payload(self, d: int, payload: bytes) -> None:
        ftype, flags, sid = self._type[d], self._flags[d], self._sid[d]
        if ftype == _HEADERS or ftype == _PUSH:
            if sid == 0:
                raise _Malformed("header block on stream 0")
            start = 0
            end = len(payload)
            if flags & _PADDED:
                if not payload or payload[0] >= end:
                    raise _Malformed("header block padding longer than the frame")
                start, end = 1, end - payload[0]
            promised = 0
            if ftype == _PUSH:
                if end - start < 4:
                    raise _Malformed("PUSH_PROMISE without a promised stream id")
                promised = int.from_bytes(payload[start:start + 4], "big") & 0x7FFFFFFF
                start += 4
            elif flags & _PRIO_FLAG:
                start += 5
                if start > end:
                    raise _Malformed("HEADERS too short for its priority fields")
            self._block[d] = [sid, flags, self._ts[d], promised]
            frag = self._fragments[d]
            frag += payload[start:end]
            if flags & _END_HEADERS:
                self._header_block(d)
        elif ftype == _CONT:
            block = self._block[d]
            if block is None or block[0] != sid:
                raise _Malformed("CONTINUATION without a header block to continue")
            frag = self._fragments[d]
            if len(frag) + len(payload) > MAX_BLOCK:
                raise _Malformed(f"header block over {MAX_BLOCK} bytes")
            frag += payload
            if flags & _END_HEADERS:
                self._header_block(d)
        elif ftype == _SETTINGS:
            if flags & _ACK:
                return
            if len(payload) % 6 or sid:
                raise _Malformed("bad SETTINGS frame")
            for i in range(0, len(payload), 6):
                if payload[i:i + 2] == b"\x00\x01":   # SETTINGS_HEADER_TABLE_SIZE
                    size = int.from_bytes(payload[i + 2:i + 6], "big")
                    # Bounds the table of what the other side encodes. Taken at once
                    # rather than at its ACK, and never lowered: a passive reader
                    # accepts both sizes while the change is in flight.
                    dec = self._hpack[1 - d]
                    dec.max_allowed_table_size = min(max(dec.max_allowed_table_size, size),
                                                     MAX_TABLE)
        elif ftype == _RST:
            if len(payload) != 4 or sid == 0:
                raise _Malformed("bad RST_STREAM frame")
            s = self._streams.get(sid)
            if s is None:
                self.unknown_streams += 1
                return
            code = int.from_bytes(payload, "big")
            s.reset = ERROR_CODES[code] if code < len(ERROR_CODES) else f"0x{code:x}"
            self._close(s, True)
        elif ftype == _GOAWAY:
            if len(payload) < 8 or sid:
                raise _Malformed("bad GOAWAY frame")
            code = int.from_bytes(payload[4:8], "big")
            self.goaway = ERROR_CODES[code] if code < len(ERROR_CODES) else f"0x{code:x}"

    def _header_block(self, d: int) -> None:
        sid, flags, ts, promised = self._block[d]
        self._block[d] = None
        frag = self._fragments[d]
        block = bytes(frag)
        frag.clear()
        try:
            headers = self._hpack[d].decode(block, raw=True)
        except HPACKError as exc:
            raise _Malformed(f"HPACK: {exc}") from None
        except (IndexError, ValueError, TypeError, OverflowError, MemoryError) as exc:
            # hpack raises these on some malformed integers and strings.
            raise _Malformed(f"HPACK: {type(exc).__name__}") from None
        if promised:
            self._promise(d, sid, promised, headers, ts)
            return
        s = self._streams.get(sid)
        if d == 0:
            if s is None:
                if sid & 1 == 0 or sid <= self._last_sid[0]:
                    self.unknown_streams += 1   # closed or evicted earlier
                    return
                self._last_sid[0] = sid
                s = self._open(sid)
                s.req_ts = ts
                self._request(s, headers)
            if flags & _END_STREAM:
                self._end(s, 0)
            return
        if s is None:
            self.unknown_streams += 1
            return
        self._response(s, headers, ts)
        if flags & _END_STREAM:
            self._end(s, 1)

    def _promise(self, d: int, sid: int, promised: int, headers, ts: int) -> None:
        if d != 1:
            raise _Malformed("PUSH_PROMISE from the client")
        if promised & 1 or promised <= self._last_sid[1]:
            self.unknown_streams += 1
            return
        self._last_sid[1] = promised
        s = self._open(promised)
        s.pushed = True
        s.req_ts = ts
        self._request(s, headers)
        s.ended[0] = True   # a promised request has no body

    def _open(self, sid: int) -> _Stream:
        streams = self._streams
        if len(streams) >= self.max_streams:
            _, old = streams.popitem(last=False)
            self.evicted += 1
            self._emit(old, False)
        s = streams[sid] = _Stream(sid)
        return s

    def _request(self, s: _Stream, headers) -> None:
        authority = host = b""
        creds: dict[bytes, list[bytes]] | None = None
        for name, value in headers:
            if name in principal.HEADERS:
                # kinds and a salted hash of the principal only (sensor/l7/principal.py)
                if creds is None:
                    creds = {}
                creds.setdefault(name, []).append(value)
                continue
            if name[:1] == b":":
                if name == b":method":
                    s.method, cut = _text(value, 64)
                elif name == b":path":
                    path, cut = _text(value)
                    s.path = redact_target(path) if self.redact else path
                    if path[:1] == "/" and path.count("/") == 2:
                        service, _, rpc = path[1:].partition("/")
                        s.service, s.rpc = service, rpc.split("?", 1)[0]
                elif name == b":authority":
                    authority = value
                    continue
                else:
                    continue
            elif name == b"content-type":
                s.req_ctype, cut = _media_type(value)
            elif name == b"user-agent":
                s.ua, cut = _text(value)
            elif name == b"host":
                host = value
                continue
            else:
                continue   # never copied: Authorization, Cookie and everything else
            s.truncated |= cut
        if authority or host:
            s.host, cut = _text(authority or host)
            s.truncated |= cut
            if self.redact and "@" in s.host:
                s.host = strip_userinfo(s.host)
            if not self._host:
                self._host = s.host
        if creds is not None:
            # Per stream (the event's auth) and per connection (the flow's summary).
            s.auth = principal.credentials(creds)
            for cred in s.auth:
                self._auth.add(cred.kind)
                if cred.principal and not self._principal:
                    self._principal = cred.principal
        if _is_grpc(s.req_ctype):
            s.grpc[0] = s.grpc[1] = True
            if not self._grpc_method and s.rpc:
                self._grpc_service, self._grpc_method = s.service, s.rpc
        else:
            s.service = s.rpc = ""
        if self.pii is not None:
            s.pii = self.pii.request(_as_head(headers), b"", s.req_ctype)
            if not s.pushed:
                self._want(s, 0, self.pii.request_body(s.method, s.req_ctype,
                                                       grpc=s.grpc[0]))

    def _response(self, s: _Stream, headers, ts: int) -> None:
        status = None
        for name, value in headers:
            if name == b":status":
                if len(value) != 3 or not value.isdigit():
                    raise _Malformed("bad :status")
                status = int(value)
            elif name == b"content-type":
                s.resp_ctype, cut = _media_type(value)
                s.truncated |= cut
            elif name == b"grpc-status":
                if value.isdigit() and len(value) <= 9:
                    s.gstatus = int(value)
            elif name == b"grpc-message":
                text, cut = _text(value, MAX_GRPC_MESSAGE * 3)
                text = unquote(text, errors="backslashreplace")
                s.gmessage = text[:MAX_GRPC_MESSAGE]
                s.truncated |= cut or len(text) > MAX_GRPC_MESSAGE
        if status is not None and not s.final:
            if 100 <= status < 200:
                return   # interim: the final response is what counts
            s.final = True
            s.status = status
            s.resp_ts = ts
            if _is_grpc(s.resp_ctype):
                s.grpc[1] = True
            if self.pii is not None:
                self._want(s, 1, self.pii.response_body(s.resp_ctype, self._responses,
                                                        grpc=s.grpc[1]))
                self._responses += 1

    def _end(self, s: _Stream, d: int) -> None:
        s.ended[d] = True
        self._unwant(s, d)   # no more body this way: its room is not asked for
        if s.ended[0] and s.ended[1]:
            self._close(s, True)

    def _close(self, s: _Stream, ended: bool) -> None:
        if self._streams.pop(s.sid, None) is not None:
            self._emit(s, ended)
        for i in (0, 1):
            if self._body_stream[i] is s:
                self._body_stream[i] = None

    def _want(self, s: _Stream, d: int, want: int) -> None:
        if want > 0:
            s.data[d] = bytearray()
            s.want[d] = want
            self._pii_wanted[d] += want

    def _emit(self, s: _Stream, ended: bool) -> None:
        for d in (0, 1):
            if s.data[d] is not None:
                self._pii_held -= len(s.data[d])
            self._unwant(s, d)
        self._out.append(s.event(ended, self.pii))
        self.transactions += 1

    def _flush(self) -> None:
        """Report every stream still open, with what was seen of it."""
        streams = self._streams
        while streams:
            _, s = streams.popitem(last=False)
            self._emit(s, False)
        self._body_stream = [None, None]

    def _fail(self, reason: str) -> None:
        if self.state is not _OK:
            return
        self._flush()
        self.state = _ERROR
        self.error = reason
        for d in (0, 1):
            self._buf[d].clear()
            self._fragments[d].clear()


# -- registration (sensor/l7/registry.py) --------------------------------------------------

# SETTINGS parameters a server's first frame may carry: six are defined (RFC 9113 §6.5.2)
# plus a few extensions (RFC 8441, RFC 9218); each is 6 bytes.
_MAX_FIRST_SETTINGS = 16
_SETTINGS_IDS = frozenset(i.to_bytes(2, "big") for i in (1, 2, 3, 4, 5, 6, 8, 9))


def looks_like(first: bytes, direction: Direction) -> bool:
    """The client connection preface (RFC 9113 §3.4); 14 bytes ("PRI * HTTP/2.0") already
    rule out an HTTP/1 request line. A server may speak first (nghttpd does, before the
    client's preface reaches it): its preface is a SETTINGS frame on stream 0, flags 0,
    whose length is a multiple of 6."""
    if len(first) >= 14 and first.startswith(PREFACE[:len(first)]):
        return True
    if direction != Direction.TO_CLIENT or len(first) < 9:
        return False
    length = int.from_bytes(first[:3], "big")
    if first[3:9] != b"\x04\x00\x00\x00\x00\x00" or length % 6 or \
            length > 6 * _MAX_FIRST_SETTINGS:
        return False
    # Its first parameter, when there is one and it is here, must be a known one: the
    # frame shape alone is only 9 bytes of mostly zeros.
    return not length or len(first) < 11 or first[9:11] in _SETTINGS_IDS


def table_line(d: Http2Event) -> list[tuple[str, str | None]]:
    from sensor.export.table import duration  # rendering only; not needed to parse

    out = [(f"{d.method or '-'} {d.host}{d.path}", None), ("->", "dim"),
           (str(d.status or "-"), "red" if d.status >= 500 else
            "yellow" if d.status >= 400 else None)]
    if d.grpc_status >= 0:
        out.append((f"grpc {d.grpc_status}" + (f" {d.grpc_message}" if d.grpc_message else ""),
                    "red" if d.grpc_status else None))
    if d.reset:
        out.append((f"reset {d.reset}", "yellow"))
    if d.latency_ns:
        out.append((duration(d.latency_ns), None))
    return out


# The kernel follows the frames of h2c with prior knowledge (bpf/frames.h): the client's
# side after the 24-octet preface, the server's from its first octet. Of a DATA frame only
# the header and the first five payload octets are copied (a gRPC message's prefix, so
# message counts and body lengths stay exact), and all of it when padded (the pad length
# is in the payload); PING and WINDOW_UPDATE, which the parser only counts, are left out
# whole. HEADERS, CONTINUATION, SETTINGS, RST_STREAM, GOAWAY and PUSH_PROMISE always reach
# the parser: HPACK needs every header block, and gRPC's status is in the trailers.
FRAMING = FramingHints(kernel_walk=KernelWalk(
    match=PREFACE[:8], start=(len(PREFACE), 0),
    # A server's first frame is SETTINGS (type 4, no flags, stream 0), often sent before
    # the client's preface arrives.
    server_match=bytes((0, 0, 0, _SETTINGS, 0, 0, 0, 0)), server_mask=bytes(3) + b"\xff" * 5,
    header=9, length_at=0, length_size=3, type_at=3, flags_at=4,
    elide=bytes((_DATA, _PING, _WINDOW)), keep_flags=_PADDED, keep_type=_DATA,
    keep_octets=5))

PROTOCOL = Protocol(
    name=APP_PROTO, event=Http2Event, parser=Http2Parser, options=("redact", "pii"),
    framing=FRAMING,
    signature=looks_like, priority=0,
    summary=("http_host",), summary_keys=("grpc_service", "grpc_method", "http_auth",
                                          "http_principal"),
    column_types={"stream_id": "u32", "status": "u16", "grpc_status": "i32"},
    line=table_line, style="cyan",
    filters=(Filter(name="grpc_method", field="grpc_method", match="glob_case",
                    flow_field="grpc_method",
                    help="gRPC method glob: 'SayHello', 'Get*'"),),
)
