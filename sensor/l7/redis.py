"""Redis (RESP2 and RESP3) commands paired with their replies, from a TCP stream, sans-I/O.

Strategy
- The client side carries requests: an array of bulk strings (`*N` then N `$len` items), or
  an inline command (one line, split on blanks with Redis's own quoting rules,
  sdssplitargs). As redis-server does, a request that does not start with `*` is inline,
  an empty line is ignored, and `*0`/`*-1` carry no command.
- The server side carries RESP values, parsed with an explicit stack (never recursion):
  RESP2 `+ - : $ *` and RESP3 `_ , # ( ! = % ~ > |`, streamed strings (`$?` then `;len`
  chunks up to `;0`) and streamed aggregates (`*?`, `%?`, `~?` closed by `.`). An attribute
  (`|`) annotates the value after it and is neither a reply nor an element of an aggregate.
- Replies pair with requests in order (pipelining). Exceptions, all handled:
  - pub/sub: SUBSCRIBE/PSUBSCRIBE/SSUBSCRIBE with k channels get k confirmations; an
    UNSUBSCRIBE family command without arguments gets one per subscription, so it stays
    open until a reply that is not its confirmation, or a count of 0, arrives. Messages
    (RESP3 `>` pushes, or RESP2 `message`/`pmessage`/`smessage` arrays once the client has
    subscribed) are not replies: each becomes a push event and the pairing is untouched.
  - CLIENT REPLY OFF/SKIP: the commands the server will not answer expect no reply.
  - MONITOR: the lines that follow its +OK are counted in `monitor_lines`, not paired.
  - HELLO switches the protocol version (2 or 3) once the server accepts it.
- One event per command: emitted in request order once its replies are in (or at the end of
  the server's stream, without a reply). Latency is from the request's first byte to the first
  byte of its first reply.
- Bulk strings are counted, not copied: only a bounded prefix of the arguments that name
  things is kept (command, key, administrative arguments), and skip_hint hands the rest of a
  bulk body (a 10 MiB SET or GET) to the kernel to skip. Gaps and skips inside a bulk body
  cost nothing, and neither do ones that end in the CRLF closing it: those two bytes are
  fixed, so the framing holds (live, a body whose skip reached the kernel after its last
  packet went by leaves exactly that: a skip, then a 2-byte gap, docs/sensor.md "Budgets").
- Resynchronisation, as a passive sensor must (Zeek's analyzers do the same): a gap or skip
  that reaches into a header line loses that direction's framing, not the connection. The
  request or reply being read is dropped; after a server-side loss the commands still
  waiting are reported without a reply (theirs may have been in the gap: reply_type "").
  That direction then passes over data until a segment that starts like a RESP message
  (`looks_like`, the detection signature: a whole, valid first line) and parses on from
  there. Counted in `resyncs`. Bytes that are not RESP at all are still an ERROR.
- Values are never stored: not bulk replies, not the values of SET and friends. The
  arguments of administrative commands (AUTH, HELLO, CONFIG, ACL, CLIENT, MIGRATE, ...) are
  kept because they say what was done to the server; their secrets are redacted at parse time
  (see _redact).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from sensor.l7.base import NEED_DATA, Direction, ParserState, Transaction, _NeedData
from sensor.l7.registry import FramingHints, Protocol

_OK, _DONE, _ERROR = ParserState.OK, ParserState.DONE, ParserState.ERROR
_TO_SERVER, _TO_CLIENT = Direction.TO_SERVER, Direction.TO_CLIENT

APP_PROTO = "redis"
PORTS = (6379,)
SUMMARY_FIELDS = ("redis_command", "redis_user", "redis_resp")
REDACTED = "[redacted]"

# redis-server refuses an inline request or a header line longer than 64 KiB
# (PROTO_INLINE_MAX_SIZE); nothing legitimate is longer, so neither buffers more.
MAX_LINE = 64 * 1024
# Bytes kept of one argument (command words, the key, administrative arguments). Keys are
# short in practice; a longer one is cut and the event marked truncated. The rest of the
# argument is skipped, so a 10 MiB value costs nothing.
MAX_ARG_KEPT = 256
# Arguments kept per request: enough for any administrative command and for finding the key
# of XREAD ... STREAMS; an MSET of 10,000 pairs keeps 32 prefixes and counts the rest.
MAX_ARGS_KEPT = 32
# Administrative arguments shown in an event, each cut at MAX_ARG_TEXT characters.
MAX_ARGS_SHOWN = 16
MAX_ARG_TEXT = 128
MAX_COMMAND = 64      # the longest real command name is about 30 characters
MAX_ERROR = 512       # error replies are one line of text; stack traces from scripts are cut
MAX_REPLY_TEXT = 256  # status lines, integers, doubles, big numbers
MAX_HEAD_ITEM = 64    # the first items of a top-level aggregate: pub/sub kind and channel
# Real replies nest a few levels (EXEC of a command returning maps of arrays); the stack
# that tracks them is the only per-value memory, and 32 levels bounds it.
MAX_DEPTH = 32
# Requests waiting for replies. Pipelines (redis-cli --pipe) send thousands before reading;
# past this many, the oldest is reported without its reply (counted in `evicted`) and the
# reply that belongs to it is dropped when it comes, which keeps the pairing right.
MAX_PENDING = 4096
# RESP integers are signed 64-bit; redis-server refuses a multibulk count above INT_MAX.
_MAX_INT = (1 << 63) - 1
_MAX_MULTIBULK = (1 << 31) - 1
_INT_ONLY = {int}

REPLY_TYPES = {
    0x2B: "string", 0x2D: "error", 0x3A: "integer", 0x24: "bulk", 0x2A: "array",
    0x5F: "null", 0x2C: "double", 0x23: "boolean", 0x28: "big_number", 0x21: "error",
    0x3D: "verbatim", 0x25: "map", 0x7E: "set", 0x3E: "push",
}
_REPLY_TYPE_NAMES = frozenset(REPLY_TYPES.values()) | {""}

# Commands whose second word names the operation (CONFIG GET, CLIENT SETNAME, ACL SETUSER).
CONTAINERS = frozenset((
    "ACL", "CLIENT", "CLUSTER", "COMMAND", "CONFIG", "DEBUG", "FUNCTION", "LATENCY", "MEMORY",
    "MODULE", "OBJECT", "PUBSUB", "SCRIPT", "SLOWLOG", "XGROUP", "XINFO",
))
# Container operations whose third argument is a key.
_SUB_KEY_AT_2 = frozenset((
    "OBJECT ENCODING", "OBJECT FREQ", "OBJECT IDLETIME", "OBJECT REFCOUNT", "MEMORY USAGE",
    "XINFO STREAM", "XINFO GROUPS", "XINFO CONSUMERS", "XGROUP CREATE", "XGROUP SETID",
    "XGROUP DESTROY", "XGROUP CREATECONSUMER", "XGROUP DELCONSUMER", "DEBUG OBJECT",
))
# Commands without keys; every other command's key is its first argument (for pub/sub
# commands that is the first channel, which is what a reader wants there).
_NO_KEY = frozenset((
    "PING", "ECHO", "AUTH", "HELLO", "SELECT", "QUIT", "RESET", "INFO", "DBSIZE", "FLUSHALL",
    "FLUSHDB", "MULTI", "EXEC", "DISCARD", "UNWATCH", "SAVE", "BGSAVE", "BGREWRITEAOF",
    "LASTSAVE", "TIME", "ROLE", "MONITOR", "SHUTDOWN", "SLAVEOF", "REPLICAOF", "SWAPDB",
    "WAIT", "WAITAOF", "KEYS", "SCAN", "RANDOMKEY", "READONLY", "READWRITE", "ASKING",
    "FAILOVER", "SYNC", "PSYNC", "REPLCONF", "LOLWUT", "FCALL", "FCALL_RO",
) + tuple(CONTAINERS))
# Commands with a numkeys argument at this index, the first key right after it.
_NUMKEYS_AT = {
    "EVAL": 2, "EVALSHA": 2, "EVAL_RO": 2, "EVALSHA_RO": 2, "FCALL": 2, "FCALL_RO": 2,
    "ZUNION": 1, "ZINTER": 1, "ZDIFF": 1, "SINTERCARD": 1, "ZINTERCARD": 1, "LMPOP": 1,
    "ZMPOP": 1, "BLMPOP": 2, "BZMPOP": 2,
}
# Commands whose arguments describe what was done to the server, not user data: kept
# (bounded, redacted). Data commands keep only their key.
ADMIN = frozenset((
    "AUTH", "HELLO", "SELECT", "CLIENT", "CONFIG", "ACL", "MIGRATE", "SLAVEOF", "REPLICAOF",
    "MODULE", "DEBUG", "CLUSTER", "FAILOVER", "SHUTDOWN", "SCRIPT", "COMMAND", "INFO",
))
_SUBSCRIBE = frozenset(("SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE"))
_UNSUBSCRIBE = frozenset(("UNSUBSCRIBE", "PUNSUBSCRIBE", "SUNSUBSCRIBE"))
_MESSAGE_KINDS = frozenset((b"message", b"pmessage", b"smessage"))
# Commands that set up the connection; the flow summary names the first other command.
_SETUP = frozenset(("AUTH", "HELLO", "SELECT", "CLIENT SETINFO", "CLIENT SETNAME", "PING"))

# Reader modes.
_TOP = 0        # at the start of a top-level value (request or reply)
_ITEM = 1       # client: at a `$len` header of a multibulk argument; server: inside a value
_BODY = 2       # inside a bulk body: _left bytes to go
_CRLF = 3       # the CRLF after a bulk body
_CLOSED = 4     # after the end of the stream

_SPACE = b" \t\n\r\x0b\x0c"


class _Malformed(Exception):
    """The peer sent something that is not RESP. Never escapes the parser."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisEvent:
    """One command and its reply, or one push message (push=True, command empty)."""

    command: str = ""             # upper case; CONFIG GET, CLIENT SETNAME as one name
    key: str = ""                 # first key (first channel for pub/sub), bounded
    args: tuple[str, ...] = ()    # arguments of administrative commands only, redacted
    argc: int = 0                 # elements of the request, the command name included
    inline: bool = False          # sent as an inline command rather than a RESP array
    truncated: bool = False       # command, key or an argument was cut to its bound
    request_bytes: int = 0
    reply_type: str = ""          # "" when no reply was seen; see REPLY_TYPES
    reply: str = ""               # status text, integer, double, boolean, big number; a push's kind
    error: str = ""               # error reply text (simple or blob error), bounded
    reply_len: int = 0            # bulk length, or elements of an aggregate (pairs for a map)
    reply_bytes: int = 0          # every reply of this command, on the wire
    replies: int = 0              # replies paired (several for SUBSCRIBE a b c)
    push: bool = False
    resp: int = 2                 # protocol version of the reply (HELLO 3's own reply is 3)
    latency_ns: int = 0

    def __post_init__(self) -> None:
        # One event per command: the all-valid case is checked in one pass, without a loop.
        values = (self.argc, self.request_bytes, self.reply_len, self.reply_bytes,
                  self.replies, self.latency_ns)
        if set(map(type, values)) != _INT_ONLY or min(values) < 0 or max(values) > _MAX_INT:
            names = ("argc", "request_bytes", "reply_len", "reply_bytes", "replies", "latency_ns")
            for name, value in zip(names, values):
                if type(value) is not int or not 0 <= value <= _MAX_INT:
                    raise ValueError(f"{name}={value!r} is not an integer in 0..2**63-1")
        if self.reply_type not in _REPLY_TYPE_NAMES:
            raise ValueError(f"reply_type={self.reply_type!r} is not a RESP reply type")
        if self.resp not in (2, 3):
            raise ValueError(f"resp={self.resp!r} is neither 2 nor 3")
        if not isinstance(self.args, tuple):
            object.__setattr__(self, "args", tuple(self.args))
        # Bytes that are not UTF-8 are shown as \xNN: up to 4 characters per byte kept.
        if len(self.command) > MAX_COMMAND * 8 + 1 or len(self.key) > MAX_ARG_KEPT * 4 \
                or len(self.error) > MAX_ERROR * 4 or len(self.args) > MAX_ARGS_SHOWN:
            raise ValueError("a RedisEvent field is longer than its bound")


# -- detection ---------------------------------------------------------------------------------

_INLINE_FIRST = frozenset((b"PING", b"AUTH", b"HELLO", b"INFO", b"ECHO", b"SELECT", b"QUIT",
                           b"MONITOR", b"CONFIG", b"CLIENT", b"DBSIZE", b"FLUSHALL", b"KEYS"))


def _digits(raw: bytes, allow_minus: bool = False) -> bool:
    if allow_minus and raw[:1] == b"-":
        raw = raw[1:]
    return 0 < len(raw) <= 19 and raw.isdigit()


def looks_like(first: bytes, direction: Direction) -> bool:
    """Whether the first bytes of a direction look like RESP. The whole first line must be
    there, with CRLF. Client: `*N` (1..2**31-1) followed by `$`, or an inline command from a
    short list of connection commands (PING, AUTH, HELLO, INFO, ...) not carrying `HTTP/`.
    Server: `+`/`-` with printable text, `:` integer, `$`/`*`/`%`/`~`/`>` count, `_`, or `#t`/`#f`.
    HTTP, TLS (0x16) and DNS-over-TCP (a binary length) fail the first-byte or line tests."""
    nl = first.find(b"\r\n")
    if nl <= 0:
        return False
    line, rest = first[:nl], first[nl + 2:]
    if direction == _TO_SERVER:
        if line[:1] == b"*":
            return _digits(line[1:]) and int(line[1:]) >= 1 and (not rest or rest[:1] == b"$")
        if b"HTTP/" in line:
            return False
        word = line.split(b" ", 1)[0].upper()
        return word in _INLINE_FIRST and all(0x20 <= b < 0x7F for b in line)
    kind, body = line[:1], line[1:]
    if kind in (b"+", b"-"):
        return bool(body) and all(0x20 <= b < 0x7F for b in body) and \
            (kind == b"+" or body[:1].isalpha())
    if kind == b":":
        return _digits(body, allow_minus=True)
    if kind in (b"$", b"*"):
        return body == b"-1" or _digits(body)
    if kind in (b"%", b"~", b">"):
        return _digits(body)
    if kind == b"#":
        return body in (b"t", b"f")
    return line == b"_"


SIGNATURE = looks_like


# -- helpers -----------------------------------------------------------------------------------

def _text(raw: bytes | bytearray, limit: int) -> tuple[str, bool]:
    """Bounded text of a byte string; (text, cut). Non-UTF-8 bytes are shown escaped."""
    cut = len(raw) > limit
    if cut:
        raw = raw[:limit]
    try:
        return bytes(raw).decode("utf-8"), cut
    except UnicodeDecodeError:
        return bytes(raw).decode("utf-8", "backslashreplace"), cut


def _int(raw: bytes | bytearray, what: str) -> int:
    """A RESP length or integer: optional '-', 1..19 digits."""
    if 0 < len(raw) < 19 and raw.isdigit():
        return int(raw)  # the usual short non-negative length
    body = raw[1:] if raw[:1] == b"-" else raw
    if not body or len(body) > 19 or not body.isdigit():
        raise _Malformed(f"bad {what} {bytes(raw[:24])!r}")
    return int(raw)


def split_inline(line: bytes) -> list[bytes]:
    """An inline request split as redis-server's sdssplitargs does: blanks separate, "..."
    takes \\xHH and \\n-style escapes, '...' takes \\' only; a closing quote must be followed
    by a blank. Unbalanced quotes raise _Malformed (the server refuses them too)."""
    if b'"' not in line and b"'" not in line:
        return line.split()
    out: list[bytes] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in _SPACE:
            i += 1
        if i >= n:
            return out
        cur = bytearray()
        quote = 0
        while True:
            if quote == 0x22:
                if i >= n:
                    raise _Malformed("unbalanced quotes in inline request")
                c = line[i]
                if c == 0x5C and i + 3 < n and line[i + 1] == 0x78 \
                        and all(ch in b"0123456789abcdefABCDEF" for ch in line[i + 2:i + 4]):
                    cur.append(int(line[i + 2:i + 4], 16))
                    i += 3
                elif c == 0x5C and i + 1 < n:
                    i += 1
                    cur.append({0x6E: 10, 0x72: 13, 0x74: 9, 0x62: 8, 0x61: 7}.get(line[i], line[i]))
                elif c == 0x22:
                    if i + 1 < n and line[i + 1] not in _SPACE:
                        raise _Malformed("closing quote must be followed by a space")
                    i += 1
                    break
                else:
                    cur.append(c)
            elif quote == 0x27:
                if i >= n:
                    raise _Malformed("unbalanced quotes in inline request")
                c = line[i]
                if c == 0x5C and i + 1 < n and line[i + 1] == 0x27:
                    cur.append(0x27)
                    i += 1
                elif c == 0x27:
                    if i + 1 < n and line[i + 1] not in _SPACE:
                        raise _Malformed("closing quote must be followed by a space")
                    i += 1
                    break
                else:
                    cur.append(c)
            else:
                if i >= n or line[i] in _SPACE:
                    break
                c = line[i]
                if c == 0x22 or c == 0x27:
                    quote = c
                else:
                    cur.append(c)
            i += 1
        out.append(bytes(cur))


def _redact(command: str, rest: list[str]) -> list[str]:
    """Secrets in the arguments (after the command words) of administrative commands."""
    r = REDACTED
    if command == "AUTH":
        # AUTH password | AUTH username password: the username stays.
        return [r] if len(rest) <= 1 else [rest[0]] + [r] * (len(rest) - 1)
    out = list(rest)
    upper = [a.upper() for a in rest]
    if command == "HELLO":
        for i, word in enumerate(upper):
            if word == "AUTH" and i + 2 < len(out):
                out[i + 2] = r  # HELLO protover AUTH username password
    elif command == "MIGRATE":
        for i, word in enumerate(upper):
            if word == "AUTH" and i + 1 < len(out):
                out[i + 1] = r
            elif word == "AUTH2" and i + 2 < len(out):
                out[i + 2] = r
    elif command == "CONFIG SET":
        for i in range(0, len(out) - 1, 2):
            name = out[i].lower()
            if name in ("requirepass", "masterauth") or "pass" in name or "secret" in name:
                out[i + 1] = r
    elif command == "ACL SETUSER":
        # >pw and <pw add or remove a password, #hash and !hash the same by SHA-256.
        for i in range(1, len(out)):
            if out[i][:1] in (">", "<", "#", "!"):
                out[i] = out[i][0] + r
    return out


def _key_index(name: str, command: str, args: list[bytes], argc: int) -> int | None:
    """Where the first key of a request is, by Redis's key positions; None: no key."""
    if command in _SUB_KEY_AT_2:
        return 2 if len(args) > 2 else None
    if name in _NO_KEY and name not in _NUMKEYS_AT:
        return None
    at = _NUMKEYS_AT.get(name)
    if at is not None:
        if len(args) > at + 1 and args[at].isdigit() and int(args[at]) > 0:
            return at + 1
        return None
    if name in ("XREAD", "XREADGROUP"):
        for i, arg in enumerate(args):
            if arg.upper() == b"STREAMS" and i + 1 < len(args):
                return i + 1
        return None
    if name == "MIGRATE":
        if len(args) > 3 and args[3]:
            return 3
        for i, arg in enumerate(args):
            if arg.upper() == b"KEYS" and i + 1 < len(args):
                return i + 1
        return None
    return 1 if len(args) > 1 else None


# -- transactions ------------------------------------------------------------------------------

class _Txn:
    """One command being paired (mutable, private)."""

    __slots__ = ("command", "key", "args", "argc", "inline", "truncated", "req_bytes", "req_ts",
                 "expect", "got", "reply_type", "reply", "error", "reply_len", "reply_bytes",
                 "resp_ts", "resp", "protover")

    def __init__(self) -> None:
        self.command = ""
        self.key = ""
        self.args: tuple[str, ...] = ()
        self.argc = 0
        self.inline = False
        self.truncated = False
        self.req_bytes = 0
        self.req_ts = 0
        self.expect = 1      # replies still expected; -1: until one that is not ours
        self.got = 0
        self.reply_type = ""
        self.reply = ""
        self.error = ""
        self.reply_len = 0
        self.reply_bytes = 0
        self.resp_ts = -1
        self.resp = 2
        self.protover = 0    # HELLO's requested version

    def transaction(self) -> Transaction:
        latency = self.resp_ts - self.req_ts if self.resp_ts >= 0 else 0
        return Transaction(self.req_ts, RedisEvent(
            command=self.command, key=self.key, args=self.args, argc=self.argc,
            inline=self.inline, truncated=self.truncated, request_bytes=self.req_bytes,
            reply_type=self.reply_type, reply=self.reply, error=self.error,
            reply_len=self.reply_len, reply_bytes=self.reply_bytes, replies=self.got,
            resp=self.resp, latency_ns=latency if latency > 0 else 0,
        ))


class _Reply:
    """One top-level reply being read (mutable, private)."""

    __slots__ = ("kind", "ts", "start", "text", "count", "children", "head", "attr")

    def __init__(self, ts: int, start: int) -> None:
        self.kind = 0          # type byte
        self.ts = ts
        self.start = start     # stream offset of its first byte (of its attribute, if any)
        self.text = b""        # line text of a scalar, or the kept prefix of a blob error
        self.count = 0         # declared length or element count
        self.children = 0      # elements read so far at depth 1
        self.head: list[bytes | None] = []  # first elements at depth 1 (None: not a scalar)
        self.attr = False      # an attribute came first


class RedisParser:
    """RESP2/RESP3 for one TCP connection. See the module docstring for the rules."""

    name = APP_PROTO

    def __init__(self, *, redact: bool = True, max_pending: int = MAX_PENDING) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        self.state = _OK
        self.error = ""
        self.redact = redact
        self.max_pending = max_pending
        self.transactions = 0
        self.pushes = 0
        self.unmatched_replies = 0   # replies with no request waiting (capture began mid-way)
        self.evicted = 0             # requests reported early because too many were waiting
        self.monitor_lines = 0
        self.cut = 0                 # requests cut short by the end of the stream
        self.resyncs = 0             # framing lost to a gap or skip, then picked up again
        self._resync = [False, False]  # by direction: waiting for a message start
        self._buf = (bytearray(), bytearray())
        self._off = [0, 0]           # stream offset of the first byte not yet consumed
        self._head_ts = [0, 0]       # time of the first byte of the next top-level value
        self._mode = [_TOP, _TOP]
        self._left = [0, 0]          # bulk body bytes to go
        self._keep = [0, 0]          # of which still to be kept
        self._kept = (bytearray(), bytearray())
        # client side: the request being read
        self._req_ts = 0
        self._req_start = 0
        self._req_left = 0           # multibulk items to go
        self._req_argc = 0
        self._req_args: list[bytes] = []   # kept prefixes of the first MAX_ARGS_KEPT
        self._req_lens: list[int] = []     # and their full lengths
        # server side: the reply being read
        self._stack: list[list[int]] = []   # [items left (-1 streamed), type byte]
        self._msg: _Reply | None = None
        self._body_kind = 0          # type byte of the bulk being read (0x3B for a chunk)
        self._body_head = -1         # index in _msg.head the bulk fills, or -1
        # pairing
        self._txns: deque[_Txn] = deque()      # not yet emitted, in request order
        self._awaiting: deque[_Txn] = deque()  # still expecting replies
        self._drop = 0               # replies owed to evicted requests
        self._out: deque[Transaction] = deque()
        self._resp = 2
        self._subscribed = False
        self._monitor = False
        self._reply_mode = "on"      # CLIENT REPLY on/off/skip
        self._first_command = ""
        self._setup_command = ""
        self._user = ""

    # -- the L7Parser contract -------------------------------------------------------------

    def receive_data(self, direction: Direction, data: bytes, ts_ns: int) -> None:
        if self.state is not _OK or not data:
            return
        d = int(direction)
        mode = self._mode[d]
        if mode == _CLOSED:
            return
        buf = self._buf[d]
        if self._resync[d]:
            if not looks_like(data, direction):
                self._off[d] += len(data)
                return
            self._resync[d] = False   # a message starts here: parse on (buf is empty)
        if mode == _BODY and not buf:
            # Inside a bulk body: keep what is wanted, count the rest, copy nothing more.
            n = len(data)
            left = self._left[d]
            if n < left and not self._keep[d]:
                self._left[d] = left - n
                self._off[d] += n
                return
        if not buf:
            self._head_ts[d] = ts_ns
            view: bytes | bytearray = data
        else:
            buf += data
            if (mode == _TOP or mode == _ITEM) and b"\n" not in data:
                # Still inside the same line: do not scan the buffer again (a line sent in
                # 1-byte segments would otherwise cost quadratic time).
                if len(buf) > MAX_LINE + 2:
                    self._fail(f"line longer than {MAX_LINE} bytes")
                return
            view = buf
        try:
            pos = self._run_client(view, ts_ns) if d == 0 else self._run_server(view, ts_ns)
        except _Malformed as exc:
            self._fail(str(exc))
            return
        if self.state is not _OK:
            return
        self._off[d] += pos
        if view is buf:
            del buf[:pos]
        elif pos < len(data):
            buf += data[pos:]
        if len(buf) > MAX_LINE + 2:
            self._fail(f"line longer than {MAX_LINE} bytes")

    def receive_datagram(self, direction: Direction, data: bytes, ts_ns: int) -> None:
        self._fail("RESP runs over a stream, got a datagram")

    def receive_gap(self, direction: Direction, length: int, ts_ns: int) -> None:
        self._lost(direction, length, ts_ns)

    def receive_skip(self, direction: Direction, length: int, ts_ns: int) -> None:
        self._lost(direction, length, ts_ns)

    def receive_eof(self, direction: Direction, ts_ns: int) -> None:
        d = int(direction)
        if self.state is not _OK or self._mode[d] == _CLOSED:
            return
        if d == 0:
            if self._mode[0] != _TOP or self._buf[0].strip(b"\r\n"):
                self.cut += 1  # a request cut short is not a command the server ran
        else:
            msg = self._msg
            if msg is not None and (self._mode[1] != _TOP or self._stack):
                # A reply cut short: report what was seen.
                self._reply_done(msg, self._off[1] + len(self._buf[1]) - msg.start)
            self._finish_all()
        self._mode[d] = _CLOSED
        self._buf[d].clear()
        if self._mode[0] == _CLOSED and self._mode[1] == _CLOSED:
            self._finish_all()
            self.state = _DONE

    def skip_hint(self, direction: Direction) -> int:
        d = int(direction)
        if self.state is not _OK or self._buf[d] or self._mode[d] != _BODY or self._keep[d]:
            return 0
        return self._left[d]

    def next_event(self) -> Transaction | _NeedData:
        if self._out:
            return self._out.popleft()
        return NEED_DATA

    def summary(self) -> dict[str, str]:
        out = {}
        command = self._first_command or self._setup_command
        if command:
            out["redis_command"] = command
        if self._user:
            out["redis_user"] = self._user
        if command or self._resp == 3:
            out["redis_resp"] = str(self._resp)
        return out

    # -- bulk bodies (both sides) ----------------------------------------------------------

    def _begin_body(self, d: int, length: int, keep: int) -> None:
        self._mode[d] = _BODY
        self._left[d] = length
        self._keep[d] = keep if keep < length else length
        self._kept[d].clear()

    def _eat_body(self, d: int, view: bytes | bytearray, pos: int, end: int) -> int:
        """Consume body bytes from view[pos:end]; return the new pos."""
        left = self._left[d]
        take = end - pos if end - pos < left else left
        keep = self._keep[d]
        if keep:
            k = take if take < keep else keep
            self._kept[d].extend(view[pos:pos + k])
            self._keep[d] = keep - k
        self._left[d] = left - take
        if left == take:
            self._mode[d] = _CRLF
        return pos + take

    def _lost(self, direction: Direction, length: int, ts_ns: int) -> None:
        """`length` bytes of a direction will not be seen (a gap, or a skip)."""
        d = int(direction)
        mode = self._mode[d]
        if self.state is not _OK or length <= 0 or mode == _CLOSED:
            return
        if self._resync[d]:
            self._off[d] += length
            return
        buf = self._buf[d]
        if mode == _BODY and not buf:
            left = self._left[d]
            self._keep[d] = 0  # the kept prefix is all there will be
            if length <= left:
                self._left[d] = left - length
                self._off[d] += length
                if length == left:
                    self._mode[d] = _CRLF
                return
            if length <= left + 2:
                # The loss ends in the CRLF that closes the body: its bytes are known.
                self._left[d] = 0
                self._off[d] += left
                self._mode[d] = _CRLF
                self.receive_data(direction, b"\r\n"[:length - left], ts_ns)
                return
        elif mode == _CRLF and len(buf) + length <= 2 and bytes(buf) in (b"", b"\r"):
            self.receive_data(direction, b"\r\n"[len(buf):len(buf) + length], ts_ns)
            return
        self._lose_framing(d, length)

    def _lose_framing(self, d: int, length: int) -> None:
        """A loss reached into a header: drop what was being read in direction d and wait
        for the next segment that starts a message (module text, "Resynchronisation")."""
        self.resyncs += 1
        self._resync[d] = True
        self._off[d] += len(self._buf[d]) + length
        self._buf[d].clear()
        self._mode[d] = _TOP
        self._left[d] = self._keep[d] = 0
        if d == 0:
            self._req_left = 0
            self._req_args = []
            self._req_lens = []
            return
        self._stack.clear()
        self._msg = None
        self._drop = 0
        self._finish_all()

    # -- client side: requests --------------------------------------------------------------

    def _run_client(self, view: bytes | bytearray, ts_ns: int) -> int:
        pos, end = 0, len(view)
        modes = self._mode
        while pos < end:
            mode = modes[0]
            if mode == _BODY:
                pos = self._eat_body(0, view, pos, end)
                continue
            nl = view.find(b"\n", pos)
            if mode == _CRLF:
                if end - pos < 2:
                    break
                if view[pos] != 0x0D or view[pos + 1] != 0x0A:
                    raise _Malformed("bulk argument not followed by CRLF")
                pos += 2
                if len(self._req_args) < MAX_ARGS_KEPT:
                    self._req_args.append(bytes(self._kept[0]))
                self._arg_done(pos, ts_ns)
                continue
            if nl < 0:
                if end - pos > MAX_LINE:
                    raise _Malformed(f"request line longer than {MAX_LINE} bytes")
                break
            line = view[pos:nl]
            if line[-1:] == b"\r":
                line = line[:-1]
            elif mode == _ITEM:
                raise _Malformed("bulk length line not ended by CRLF")
            if mode == _TOP:
                start = self._off[0] + pos
                pos = nl + 1
                if line[:1] == b"*":
                    n = _int(line[1:], "multibulk length")
                    if n > _MAX_MULTIBULK:
                        raise _Malformed("invalid multibulk length")
                    if n <= 0:
                        continue  # redis-server runs nothing for *0 or *-1
                    self._req_ts = self._head_ts[0]
                    self._req_start = start
                    self._req_left = self._req_argc = n
                    self._req_args = []
                    self._req_lens = []
                    modes[0] = _ITEM
                    continue
                if len(line) > MAX_LINE:
                    raise _Malformed(f"inline request longer than {MAX_LINE} bytes")
                words = split_inline(bytes(line))
                if words:
                    kept = words[:MAX_ARGS_KEPT]
                    self._request([w[:MAX_ARG_KEPT] for w in kept], [len(w) for w in kept],
                                  len(words), True, self._head_ts[0], self._off[0] + pos - start)
                self._head_ts[0] = ts_ns
                continue
            # _ITEM: `$len` of the next argument
            if line[:1] != b"$":
                raise _Malformed(f"expected '$' in a multibulk request, got {bytes(line[:1])!r}")
            n = _int(line[1:], "bulk length")
            if n < 0:
                raise _Malformed("invalid bulk length")
            pos = nl + 1
            want = 0
            if len(self._req_lens) < MAX_ARGS_KEPT:
                want = MAX_ARG_KEPT
                self._req_lens.append(n)
            stop = pos + n
            if stop + 2 <= end:
                # The whole argument is here (the common case): no body state at all.
                if view[stop] != 0x0D or view[stop + 1] != 0x0A:
                    raise _Malformed("bulk argument not followed by CRLF")
                if want:
                    self._req_args.append(bytes(view[pos:pos + (n if n < want else want)]))
                pos = stop + 2
                self._arg_done(pos, ts_ns)
                continue
            self._begin_body(0, n, want)
            if n == 0:
                modes[0] = _CRLF
        return pos

    def _arg_done(self, pos: int, ts_ns: int) -> None:
        self._req_left -= 1
        if self._req_left:
            self._mode[0] = _ITEM
            return
        self._mode[0] = _TOP
        self._request(self._req_args, self._req_lens, self._req_argc, False, self._req_ts,
                      self._off[0] + pos - self._req_start)
        self._head_ts[0] = ts_ns

    def _request(self, args: list[bytes], lens: list[int], argc: int, inline: bool, ts: int,
                 nbytes: int) -> None:
        txn = _Txn()
        name, c1 = _text(args[0].upper(), MAX_COMMAND)
        command = name
        words = 1
        if name in CONTAINERS and len(args) > 1:
            sub, c2 = _text(args[1].upper(), MAX_COMMAND)
            command = f"{name} {sub}"
            c1 = c1 or c2
            words = 2
        txn.command = command
        txn.argc = argc
        txn.inline = inline
        txn.req_ts = ts
        txn.req_bytes = nbytes
        txn.resp = self._resp
        truncated = c1 or lens[0] > MAX_ARG_KEPT
        at = _key_index(name, command, args, argc)
        if at is not None:
            txn.key = _text(args[at], MAX_ARG_KEPT)[0]
            truncated = truncated or lens[at] > MAX_ARG_KEPT
        if name in ADMIN:
            rest = []
            for i in range(words, min(len(args), words + MAX_ARGS_SHOWN)):
                text, c = _text(args[i], MAX_ARG_TEXT)
                rest.append(text)
                truncated = truncated or c or lens[i] > MAX_ARG_TEXT
            if self.redact:
                rest = _redact(command, rest)
            txn.args = tuple(rest)
            truncated = truncated or argc - words > MAX_ARGS_SHOWN
        txn.truncated = bool(truncated)
        # Replies the server will send for it.
        if name in _SUBSCRIBE:
            txn.expect = argc - 1 if argc > 1 else 1
            self._subscribed = True
        elif name in _UNSUBSCRIBE:
            txn.expect = argc - 1 if argc > 1 else -1
        if command == "CLIENT REPLY":
            mode = args[2].upper() if len(args) > 2 else b""
            if mode == b"ON":
                self._reply_mode = "on"
            elif mode in (b"OFF", b"SKIP"):
                self._reply_mode = mode.decode().lower()
                txn.expect = 0
        elif self._reply_mode == "off":
            txn.expect = 0
        elif self._reply_mode == "skip":
            txn.expect = 0
            self._reply_mode = "on"
        if name == "HELLO" and len(args) > 1 and args[1] in (b"2", b"3"):
            txn.protover = int(args[1])
        if name == "MONITOR":
            self._monitor = True
        # Who logged in: AUTH user pass, HELLO n AUTH user pass.
        if name == "AUTH" and argc == 3 and len(args) > 1:
            self._user = _text(args[1], MAX_ARG_TEXT)[0]
        elif name == "HELLO":
            for i, arg in enumerate(args[:-2]):
                if arg.upper() == b"AUTH":
                    self._user = _text(args[i + 1], MAX_ARG_TEXT)[0]
        if command in _SETUP:
            self._setup_command = self._setup_command or command
        elif not self._first_command:
            self._first_command = command
        if len(self._txns) >= self.max_pending:
            old = self._txns.popleft()
            if old.expect:
                self._awaiting.popleft()  # the oldest command is the oldest one awaiting
                self._drop += max(old.expect, 1)
            self._out.append(old.transaction())
            self.transactions += 1
            self.evicted += 1
        self._txns.append(txn)
        if txn.expect:
            self._awaiting.append(txn)
        else:
            self._emit_ready()

    # -- server side: replies ----------------------------------------------------------------

    def _run_server(self, view: bytes | bytearray, ts_ns: int) -> int:
        pos, end = 0, len(view)
        modes = self._mode
        stack = self._stack
        while pos < end:
            mode = modes[1]
            if mode == _BODY:
                pos = self._eat_body(1, view, pos, end)
                continue
            if mode == _CRLF:
                if end - pos < 2:
                    break
                if view[pos] != 0x0D or view[pos + 1] != 0x0A:
                    raise _Malformed("bulk string not followed by CRLF")
                pos += 2
                modes[1] = _ITEM
                msg = self._msg
                kind = self._body_kind
                if kind == 0x3B:
                    continue  # a chunk of a streamed string; `;0` ends the string
                kept = bytes(self._kept[1])
                if not stack:
                    msg.text = kept
                elif self._body_head >= 0:
                    msg.head[self._body_head] = kept
                pos = self._value_done(pos, ts_ns)
                continue
            nl = view.find(b"\n", pos)
            if nl < 0:
                if end - pos > MAX_LINE:
                    raise _Malformed(f"reply line longer than {MAX_LINE} bytes")
                break
            if nl == pos or view[nl - 1] != 0x0D:
                raise _Malformed("reply line not ended by CRLF")
            if nl - 1 == pos:
                raise _Malformed("empty reply line")
            line = bytes(view[pos:nl - 1])
            start = self._off[1] + pos
            pos = nl + 1
            kind = line[0]
            msg = self._msg
            if not stack:
                if msg is None:
                    msg = self._msg = _Reply(self._head_ts[1], start)
                if kind != 0x7C:
                    msg.kind = kind
            head = -1
            if len(stack) == 1 and stack[0][1] != 0x3B:
                head = msg.children
                if head >= 3:
                    head = -1
                elif len(msg.head) == head:
                    msg.head.append(None)  # an attribute before it may have made the slot
                else:
                    msg.head[head] = None
            if kind in (0x2B, 0x2D, 0x3A, 0x2C, 0x23, 0x28, 0x5F):
                body = line[1:]
                if kind == 0x3A or kind == 0x28:
                    if kind == 0x3A:
                        _int(body, "integer")
                    elif not body.lstrip(b"+-").isdigit():
                        raise _Malformed("bad big number")
                elif kind == 0x23 and body not in (b"t", b"f"):
                    raise _Malformed("bad boolean")
                elif kind == 0x5F and body:
                    raise _Malformed("bad null")
                if not stack:
                    msg.text = body[:MAX_ERROR]
                elif head >= 0:
                    msg.head[head] = body[:MAX_HEAD_ITEM]
                pos = self._value_done(pos, ts_ns)
            elif kind in (0x24, 0x21, 0x3D):
                if line == b"$?":
                    self._push_frame(-1, 0x3B)
                    if not stack[:-1]:
                        msg.count = 0
                    continue
                n = _int(line[1:], "bulk length")
                if n < 0:
                    if n != -1 or kind != 0x24:
                        raise _Malformed("bad bulk length")
                    if not stack:
                        msg.kind = 0x5F  # RESP2 null bulk
                    pos = self._value_done(pos, ts_ns)
                    continue
                if not stack:
                    msg.count = n
                    keep = MAX_ERROR if kind == 0x21 else 0
                else:
                    keep = MAX_HEAD_ITEM if head >= 0 else 0
                stop = pos + n
                if stop + 2 <= end:
                    # The whole body is here (the common case): no body state at all.
                    if view[stop] != 0x0D or view[stop + 1] != 0x0A:
                        raise _Malformed("bulk string not followed by CRLF")
                    if keep:
                        kept = bytes(view[pos:pos + (keep if keep < n else n)])
                        if not stack:
                            msg.text = kept
                        else:
                            msg.head[head] = kept
                    pos = self._value_done(stop + 2, ts_ns)
                    continue
                self._body_kind = kind
                self._body_head = head
                self._begin_body(1, n, keep)
                if n == 0:
                    modes[1] = _CRLF
            elif kind in (0x2A, 0x25, 0x7E, 0x3E, 0x7C):
                body = line[1:]
                if body == b"?":
                    if not stack:
                        msg.count = 0
                    self._push_frame(-1, kind)
                    continue
                n = _int(body, "aggregate length")
                if n < 0:
                    if n != -1 or kind != 0x2A:
                        raise _Malformed("bad aggregate length")
                    if not stack:
                        msg.kind = 0x5F  # RESP2 null array
                    pos = self._value_done(pos, ts_ns)
                    continue
                if not stack and kind != 0x7C:
                    msg.count = n
                items = 2 * n if kind in (0x25, 0x7C) else n
                if items == 0:
                    pos = self._value_done(pos, ts_ns, kind == 0x7C)
                    continue
                self._push_frame(items, kind)
            elif kind == 0x2E:  # `.`: end of a streamed aggregate
                if not stack or stack[-1][0] != -1 or stack[-1][1] == 0x3B or len(line) != 1:
                    raise _Malformed("stream end marker outside a streamed aggregate")
                if msg.head and head >= 0:
                    msg.head.pop()
                frame = stack.pop()
                if not stack and frame[1] != 0x25:
                    msg.count = msg.children
                elif not stack:
                    msg.count = msg.children // 2
                pos = self._value_done(pos, ts_ns, frame[1] == 0x7C)
            elif kind == 0x3B:  # `;len`: a chunk of a streamed string
                if not stack or stack[-1][1] != 0x3B:
                    raise _Malformed("string chunk outside a streamed string")
                n = _int(line[1:], "chunk length")
                if n < 0:
                    raise _Malformed("bad chunk length")
                if n == 0:
                    stack.pop()
                    pos = self._value_done(pos, ts_ns)
                    continue
                if len(stack) == 1:
                    msg.count += n
                self._body_kind = 0x3B
                self._begin_body(1, n, 0)
            else:
                raise _Malformed(f"unknown RESP type byte 0x{kind:02x}")
        return pos

    def _push_frame(self, items: int, kind: int) -> None:
        if len(self._stack) >= MAX_DEPTH:
            raise _Malformed(f"reply nested deeper than {MAX_DEPTH}")
        self._stack.append([items, kind])
        self._mode[1] = _ITEM

    def _value_done(self, pos: int, ts_ns: int, was_attr: bool = False) -> int:
        """A value ended at pos: count it in its parent, and close every aggregate it
        completes. An attribute does not count as an element (RESP3 spec, Attribute type)."""
        stack = self._stack
        self._mode[1] = _ITEM
        while stack:
            if was_attr:
                return pos
            top = stack[-1]
            if len(stack) == 1:
                self._msg.children += 1
            if top[0] < 0:
                return pos
            top[0] -= 1
            if top[0]:
                return pos
            stack.pop()
            was_attr = top[1] == 0x7C
        msg = self._msg
        self._mode[1] = _TOP
        if was_attr:
            # The reply proper follows; it keeps the attribute's start and time.
            msg.attr = True
            msg.children = 0
            msg.head = []
            msg.count = 0
            return pos
        size = self._off[1] + pos - msg.start
        self._msg = None
        self._reply_done(msg, size)
        self._head_ts[1] = ts_ns
        return pos

    def _reply_done(self, msg: _Reply | None, size: int = 0) -> None:
        if msg is None:
            return
        self._stack.clear()
        self._msg = None
        kind = msg.kind
        first = msg.head[0].lower() if msg.head and msg.head[0] is not None else b""
        awaiting = self._awaiting
        confirms = kind in (0x2A, 0x3E) and bool(awaiting) and self._confirms(awaiting[0], first)
        if not confirms and (kind == 0x3E or (
                kind == 0x2A and self._subscribed and first in _MESSAGE_KINDS)):
            self._push(msg, size, first)
            return
        if self._drop:
            self._drop -= 1  # the reply of a command reported early (MAX_PENDING)
            return
        # An UNSUBSCRIBE without arguments ends at the first reply that is not its own.
        if awaiting and awaiting[0].expect == -1 and not confirms:
            self._complete(awaiting.popleft())
        if confirms:
            txn = awaiting[0]
            self._add_reply(txn, msg, size)
            count = msg.head[2] if len(msg.head) > 2 else None
            if txn.expect > 0:
                txn.expect -= 1
            if count == b"0" and txn.command in _UNSUBSCRIBE:
                self._subscribed = False  # out of subscribe mode: arrays are replies again
            if txn.expect == 0 or (txn.expect == -1 and count == b"0"):
                self._complete(awaiting.popleft())
            return
        if not awaiting:
            if self._monitor and kind == 0x2B:
                self.monitor_lines += 1
                return
            self.unmatched_replies += 1
            txn = _Txn()
            txn.req_ts = msg.ts
            txn.resp = self._resp
            txn.expect = 0
            self._add_reply(txn, msg, size)
            self._txns.append(txn)
            self._emit_ready()
            return
        txn = awaiting[0]
        self._add_reply(txn, msg, size)
        if kind == 0x2D or kind == 0x21 or txn.expect <= 1:
            # An error ends a SUBSCRIBE too: the server sends nothing more for it.
            self._complete(awaiting.popleft())
        else:
            txn.expect -= 1

    @staticmethod
    def _confirms(txn: _Txn, first: bytes) -> bool:
        """Whether a reply is a pub/sub confirmation for txn (`subscribe` for SUBSCRIBE)."""
        name = txn.command
        return (name in _SUBSCRIBE or name in _UNSUBSCRIBE) and first == name.lower().encode()

    def _add_reply(self, txn: _Txn, msg: _Reply, size: int) -> None:
        txn.got += 1
        txn.reply_bytes += size
        if txn.got > 1:
            return
        txn.resp_ts = msg.ts
        kind = msg.kind
        txn.reply_type = REPLY_TYPES.get(kind, "")
        if kind == 0x2D or kind == 0x21:
            txn.error = _text(msg.text, MAX_ERROR)[0]
        elif kind in (0x2B, 0x3A, 0x2C, 0x23, 0x28):
            txn.reply = _text(msg.text, MAX_REPLY_TEXT)[0]
        elif kind != 0x5F:
            txn.reply_len = msg.count

    def _push(self, msg: _Reply, size: int, first: bytes) -> None:
        self.pushes += 1
        channel = msg.head[1] if len(msg.head) > 1 and msg.head[1] is not None else b""
        self._out.append(Transaction(msg.ts, RedisEvent(
            key=_text(channel, MAX_HEAD_ITEM)[0], reply_type="push",
            reply=_text(first, MAX_HEAD_ITEM)[0], reply_len=msg.count, reply_bytes=size,
            replies=1, push=True, resp=self._resp,
        )))

    def _complete(self, txn: _Txn) -> None:
        if txn.protover and txn.reply_type and txn.reply_type != "error":
            self._resp = txn.protover
        if txn.got:
            txn.resp = self._resp  # the version its reply came in
        txn.expect = 0
        self._emit_ready()

    def _emit_ready(self) -> None:
        txns = self._txns
        while txns and txns[0].expect == 0:
            self._out.append(txns.popleft().transaction())
            self.transactions += 1

    def _finish_all(self) -> None:
        """No reply can come any more: report every command still waiting."""
        self._awaiting.clear()
        while self._txns:
            self._out.append(self._txns.popleft().transaction())
            self.transactions += 1

    def _fail(self, reason: str) -> None:
        if self.state is not _OK:
            return
        self._finish_all()
        self.state = _ERROR
        self.error = reason
        self._buf[0].clear()
        self._buf[1].clear()
        self._stack.clear()


# -- registration (sensor/l7/registry.py) --------------------------------------------------

def table_line(d: RedisEvent) -> list[tuple[str, str | None]]:
    from sensor.export.table import duration  # rendering only; not needed to parse

    what = f"{d.command or 'push'} {d.key}".rstrip()
    out = [(what, None), ("->", "dim")]
    if d.error:
        out.append((d.error, "red"))
    else:
        out.append((f"{d.reply_type or '-'} {d.reply}".rstrip(), None))
    if d.latency_ns:
        out.append((duration(d.latency_ns), None))
    return out


# SUMMARY_FIELDS are the parser's summary() keys: the Flow's l7_summary map.
PROTOCOL = Protocol(
    name=APP_PROTO, event=RedisEvent, parser=RedisParser, options=("redact",),
    tcp_ports=PORTS, signature=looks_like, priority=31, summary_keys=SUMMARY_FIELDS,
    column_types={"resp": "u8"}, line=table_line, style="yellow",
    # Live budget: a segment that starts with a RESP type byte starts a message whose
    # head is its first line ("$10485760\r\n"): the room kept per direction follows the
    # heads seen (a few hundred octets), so what a big bulk string copies before its
    # skip reaches the kernel stays small.
    framing=FramingHints(message_starts=tuple(bytes([b]) for b in (*REPLY_TYPES, 0x7C)),
                         head_end=b"\r\n"),
)
