"""STARTTLS: SMTP, IMAP, POP3 and FTP followed in cleartext up to their upgrade to TLS.

What for. These protocols carry mail and files, and today mostly as TLS after an upgrade
command: SMTP `STARTTLS` answered 220 (RFC 3207), IMAP `<tag> STARTTLS` answered
`<tag> OK` (RFC 9051 §6.2.1), POP3 `STLS` answered `+OK` (RFC 2595 §4), FTP `AUTH TLS`
answered 234 (RFC 4217 §4). The parser reads the cleartext commands and replies only to
find that upgrade; from the first byte after it, every byte goes to the TLS parser
(sensor/l7/upgrade.py), whose TlsEvents (SNI, ALPN, JA3/JA4, certificate) are this flow's
events, kind "tls". The Flow keeps its app_proto (smtp, ...) and gets tls_sni/tls_ja4.

Framing. Lines end in LF (CRLF as sent); a line longer than MAX_LINE is not one of these
protocols: ERROR. Replies are paired with commands by order (IMAP: by tag): SMTP and FTP
multi-line replies (`250-...` .. `250 ...`), FTP 1xx preliminary replies, POP3 multi-line
answers (CAPA, LIST, UIDL, RETR, TOP: up to the "." line) and IMAP untagged lines and
literals (`{n}`: n bytes passed over) are followed so the upgrade's answer is found.
Pipelined client bytes sent after the upgrade command (the ClientHello, when a capture is
fed one direction first) are held, up to MAX_HELD, until the server answers: on success
they are TLS, on refusal cleartext again.

When it stops (DONE; the engine then stops copying the flow): at the end of the TLS
handshake; when the client authenticates in cleartext or starts a mail transaction or
file session (SMTP AUTH/MAIL/DATA/BDAT, IMAP LOGIN/AUTHENTICATE, POP3 USER/PASS/APOP/AUTH,
FTP USER/PASS or an AUTH other than TLS/SSL): no upgrade follows those in practice; after
MAX_COMMANDS commands; at the end of both streams. A gap or skip in the cleartext part
loses the line framing: ERROR.

Redaction. Command arguments are never kept, only verbs, and the parser stops before any
credential (AUTH, LOGIN, USER, PASS) is read: nothing secret is held or reported. The
`redact` option is accepted for the shared parser settings and changes nothing.

No event of the cleartext part itself: a per-protocol command summary would need record
kinds (wire fields) of its own.
"""

from __future__ import annotations

import re
from collections import deque

from sensor.l7.base import NEED_DATA, Direction, ParserState, Transaction, _NeedData
from sensor.l7.registry import Protocol
from sensor.l7.tls import TlsEvent
from sensor.l7.upgrade import MAX_HELD, Handover

_OK, _DONE, _ERROR = ParserState.OK, ParserState.DONE, ParserState.ERROR
_TO_SERVER, _TO_CLIENT = Direction.TO_SERVER, Direction.TO_CLIENT

# Longest cleartext line kept: RFC 5321 §4.5.3.1 caps SMTP command and reply lines at 512
# bytes, IMAP capability and FTP FEAT lines run to a few hundred; 8 KiB leaves room for
# chatty greetings and says "not this protocol" well before memory matters.
MAX_LINE = 8192
# Commands read before giving up on an upgrade: real clients send EHLO/CAPA/FEAT and the
# upgrade within a handful; a long cleartext session will not upgrade any more.
MAX_COMMANDS = 64
# IMAP literal announced in a cleartext line: larger is not a pre-login exchange.
MAX_LITERAL = 64 * 1024

_LITERAL = re.compile(rb"\{(\d{1,9})\+?\}$")


def _verb(line: bytes) -> bytes:
    return line.split(b" ", 1)[0].upper()


class _Text:
    """The shared line machinery; subclasses read their protocol's lines."""

    name = ""
    what = "STARTTLS"   # the upgrade's name in an error message

    def __init__(self, *, redact: bool = True) -> None:
        self.state = _OK
        self.error = ""
        self.redact = redact      # nothing secret is ever kept (module docstring)
        self.commands = 0
        self.upgraded = False
        self.note = ""            # why the parser went DONE without an upgrade
        self._buf = (bytearray(), bytearray())
        self._lit = [0, 0]        # IMAP literal bytes still to pass over, per direction
        self._cont = [False, False]  # the next line continues a line with a literal
        self._eof = [False, False]
        self._greeted = False
        self._asked = False       # upgrade command sent, its answer awaited
        self._held = bytearray()  # client bytes after the upgrade command
        self._held_ts = 0
        self._tls: Handover | None = None

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
        if d == 0 and self._asked:
            self._hold(data, ts_ns)
            return
        self._buf[d].extend(data)
        self._lines(d, ts_ns)

    def receive_datagram(self, direction: Direction, data: bytes, ts_ns: int) -> None:
        self._fail(f"{self.name.upper()} runs over a stream, got a datagram")

    def receive_gap(self, direction: Direction, length: int, ts_ns: int) -> None:
        if self.state is not _OK:
            return
        if self._tls is not None:
            self._tls.gap(self, direction, length, ts_ns)
        elif not self._eof[int(direction)]:
            self._fail(f"{length} bytes missing in the cleartext part")

    def receive_skip(self, direction: Direction, length: int, ts_ns: int) -> None:
        # skip_hint is always 0: a skip is the engine's own loss, like a gap.
        self.receive_gap(direction, length, ts_ns)

    def receive_eof(self, direction: Direction, ts_ns: int) -> None:
        if self.state is not _OK:
            return
        if self._tls is not None:
            self._tls.eof(self, direction, ts_ns)
            return
        d = int(direction)
        self._eof[d] = True
        self._buf[d].clear()
        if self._eof[0] and self._eof[1] or d == 1:
            # Nothing can answer the upgrade any more.
            self._done("stream ended in cleartext")

    def skip_hint(self, direction: Direction) -> int:
        return 0

    def next_event(self) -> Transaction | _NeedData:
        return self._tls.next_event() if self._tls is not None else NEED_DATA

    def summary(self) -> dict[str, str]:
        return self._tls.summary() if self._tls is not None else {}

    # -- lines -------------------------------------------------------------------------------

    def _lines(self, d: int, ts_ns: int) -> None:
        buf = self._buf[d]
        while self.state is _OK and self._tls is None:
            lit = self._lit[d]
            if lit:
                n = min(lit, len(buf))
                del buf[:n]
                self._lit[d] = lit - n
                if lit > n:
                    return
            nl = buf.find(b"\n", 0, MAX_LINE + 1)
            if nl < 0:
                if len(buf) > MAX_LINE:
                    self._fail(f"line over {MAX_LINE} bytes")
                return
            line = bytes(buf[:nl]).rstrip(b"\r")
            del buf[:nl + 1]
            cont = self._cont[d]
            self._cont[d] = False
            m = _LITERAL.search(line) if self.literals else None
            if m is not None:
                size = int(m.group(1))
                if size > MAX_LITERAL:
                    self._fail(f"literal of {size} bytes before TLS")
                    return
                self._lit[d] = size
                self._cont[d] = True
            if cont:
                continue   # the rest of a command or response after a literal
            if d == 0:
                self.commands += 1
                self._client(line)
                if self._asked and self.state is _OK:
                    # Whatever follows the upgrade command waits for the answer.
                    rest = bytes(buf)
                    buf.clear()
                    if rest:
                        self._hold(rest, ts_ns)
                    return
                if self.commands >= MAX_COMMANDS and self.state is _OK:
                    self._done(f"no upgrade within {MAX_COMMANDS} commands")
            else:
                self._server(line, ts_ns)

    def _hold(self, data: bytes, ts_ns: int) -> None:
        if not self._held:
            self._held_ts = ts_ns
        self._held += data
        if len(self._held) > MAX_HELD:
            self._fail(f"over {MAX_HELD} client bytes before the {self.what} answer")

    def _answered(self, ok: bool, ts_ns: int) -> None:
        """The server answered the upgrade command."""
        self._asked = False
        held, held_ts = bytes(self._held), self._held_ts
        self._held.clear()
        if not ok:
            # Refused: the session goes on in cleartext; held bytes are commands.
            if held:
                self._buf[0].extend(held)
                self._lines(0, held_ts)
            return
        self.upgraded = True
        rest = bytes(self._buf[1])
        for buf in self._buf:
            buf.clear()
        tls = self._tls = Handover(self.what)
        tls.data(self, _TO_SERVER, held, held_ts)
        tls.data(self, _TO_CLIENT, rest, ts_ns)

    def _done(self, note: str) -> None:
        if self.state is _OK:
            self.state = _DONE
            self.note = note
        self._clear()

    def _fail(self, reason: str) -> None:
        if self.state is _OK:
            self.state = _ERROR
            self.error = reason
        self._clear()

    def _clear(self) -> None:
        for buf in self._buf:
            buf.clear()
        self._held.clear()

    # -- per protocol ------------------------------------------------------------------------

    literals = False   # IMAP only

    def _client(self, line: bytes) -> None:
        raise NotImplementedError

    def _server(self, line: bytes, ts_ns: int) -> None:
        raise NotImplementedError


_REPLY = re.compile(rb"([1-5]\d\d)([ -]|$)")


class _Coded(_Text):
    """SMTP and FTP: three-digit replies, multi-line as `NNN-` .. `NNN `, paired in order."""

    upgrade_ok = 0           # the reply code that starts TLS
    stop_verbs: frozenset[bytes] = frozenset()

    def __init__(self, *, redact: bool = True) -> None:
        super().__init__(redact=redact)
        self._pending: deque[bool] = deque()   # per command awaiting a reply: is the upgrade
        self._multi = b""    # code of the multi-line reply being read

    def _is_upgrade(self, verb: bytes, line: bytes) -> bool:
        raise NotImplementedError

    def _client(self, line: bytes) -> None:
        self._greeted = True   # a command before any reply: the capture began later
        verb = _verb(line)
        if self._is_upgrade(verb, line):
            self._asked = True
            self._pending.append(True)
            return
        if verb in self.stop_verbs:
            self._done(f"{verb.decode('ascii', 'replace')} in cleartext")
            return
        if len(self._pending) < MAX_COMMANDS:
            self._pending.append(False)

    def _server(self, line: bytes, ts_ns: int) -> None:
        if self._multi:
            if not (line[:3] == self._multi and line[3:4] in (b" ", b"")):
                return   # FTP lets a multi-line reply's inner lines be any text
            code = self._multi
            self._multi = b""
        else:
            m = _REPLY.match(line)
            if m is None:
                self._fail(f"not a {self.name.upper()} reply line")
                return
            code = m.group(1)
            if m.group(2) == b"-":
                self._multi = code
                return
        if code[:1] == b"1":
            return   # preliminary (FTP 1xx): the final reply follows
        if not self._greeted:
            self._greeted = True
            return
        if not self._pending:
            return   # an answer to nothing on record (a capture cut at its start)
        if self._pending.popleft():
            self._answered(int(code) == self.upgrade_ok, ts_ns)


class SmtpParser(_Coded):
    """SMTP (RFC 5321) up to STARTTLS (RFC 3207)."""

    name = "smtp"
    upgrade_ok = 220
    stop_verbs = frozenset((b"AUTH", b"MAIL", b"DATA", b"BDAT"))

    def _is_upgrade(self, verb: bytes, line: bytes) -> bool:
        return verb == b"STARTTLS"


class FtpParser(_Coded):
    """FTP (RFC 959) up to AUTH TLS (RFC 4217)."""

    name = "ftp"
    what = "AUTH TLS"
    upgrade_ok = 234
    stop_verbs = frozenset((b"AUTH", b"USER", b"PASS"))

    def _is_upgrade(self, verb: bytes, line: bytes) -> bool:
        return verb == b"AUTH" and line[5:].strip().upper() in (b"TLS", b"SSL", b"TLS-C",
                                                                 b"TLS-P")


# POP3 commands whose +OK answer is multi-line (RFC 1939, RFC 2449 CAPA) without an argument
# (LIST, UIDL) or always (RETR, TOP, CAPA).
_POP_MULTI = frozenset((b"CAPA", b"RETR", b"TOP"))
_POP_MULTI_BARE = frozenset((b"LIST", b"UIDL"))


class Pop3Parser(_Text):
    """POP3 (RFC 1939) up to STLS (RFC 2595)."""

    name = "pop3"
    what = "STLS"
    stop_verbs = frozenset((b"USER", b"PASS", b"APOP", b"AUTH"))

    def __init__(self, *, redact: bool = True) -> None:
        super().__init__(redact=redact)
        self._pending: deque[tuple[bool, bool]] = deque()   # (is the upgrade, multi-line)
        self._in_multi = False

    def _client(self, line: bytes) -> None:
        self._greeted = True   # a command before any reply: the capture began later
        verb = _verb(line)
        if verb == b"STLS":
            self._asked = True
            self._pending.append((True, False))
            return
        if verb in self.stop_verbs:
            self._done(f"{verb.decode('ascii', 'replace')} in cleartext")
            return
        multi = verb in _POP_MULTI or (verb in _POP_MULTI_BARE and b" " not in line.strip())
        if len(self._pending) < MAX_COMMANDS:
            self._pending.append((False, multi))

    def _server(self, line: bytes, ts_ns: int) -> None:
        if self._in_multi:
            if line == b".":
                self._in_multi = False
            return
        if line.startswith(b"+OK"):
            ok = True
        elif line.startswith(b"-ERR"):
            ok = False
        else:
            self._fail("not a POP3 status line")
            return
        if not self._greeted:
            self._greeted = True
            return
        if not self._pending:
            return
        upgrade, multi = self._pending.popleft()
        if upgrade:
            self._answered(ok, ts_ns)
        elif multi and ok:
            self._in_multi = True


class ImapParser(_Text):
    """IMAP (RFC 9051, RFC 3501) up to STARTTLS: tagged commands, answers by tag."""

    name = "imap"
    literals = True
    stop_verbs = frozenset((b"LOGIN", b"AUTHENTICATE"))

    def __init__(self, *, redact: bool = True) -> None:
        super().__init__(redact=redact)
        self._tag = b""    # the STARTTLS command's tag

    def _client(self, line: bytes) -> None:
        parts = line.split(b" ", 2)
        if len(parts) < 2:
            return   # a SASL line or an empty one: not a command
        verb = parts[1].upper()
        if verb == b"STARTTLS":
            self._asked = True
            self._tag = parts[0]
        elif verb in self.stop_verbs:
            self._done(f"{verb.decode('ascii', 'replace')} in cleartext")

    def _server(self, line: bytes, ts_ns: int) -> None:
        if line[:2] == b"* " or line[:1] == b"+":
            if not self._greeted and line[:2] == b"* ":
                self._greeted = True
            return
        parts = line.split(b" ", 2)
        if len(parts) < 2 or parts[1].upper() not in (b"OK", b"NO", b"BAD"):
            self._fail("not an IMAP response line")
            return
        if self._tag and parts[0] == self._tag:
            self._tag = b""
            self._answered(parts[1].upper() == b"OK", ts_ns)


# -- detection (sensor/l7/registry.py) -----------------------------------------------------

def _first_line(first: bytes) -> bytes:
    return first.split(b"\n", 1)[0][:MAX_LINE].upper()


def smtp_like(first: bytes, direction: Direction) -> bool:
    """Server: a 220 greeting naming (E)SMTP. Client: EHLO/HELO, or STARTTLS (a capture
    that began after the greeting)."""
    line = _first_line(first)
    if direction == _TO_CLIENT:
        return line[:3] == b"220" and line[3:4] in (b" ", b"-") and b"SMTP" in line
    return line[:5] in (b"EHLO ", b"HELO ") or line == b"STARTTLS\r"


def ftp_like(first: bytes, direction: Direction) -> bool:
    """Server: a 220 greeting naming FTP. Client: AUTH TLS/SSL."""
    line = _first_line(first)
    if direction == _TO_CLIENT:
        return line[:3] == b"220" and line[3:4] in (b" ", b"-") and b"FTP" in line
    return line.rstrip(b"\r") in (b"AUTH TLS", b"AUTH SSL")


def imap_like(first: bytes, direction: Direction) -> bool:
    """Server: the untagged greeting `* OK` or `* PREAUTH`."""
    line = _first_line(first)
    return direction == _TO_CLIENT and (line[:5] == b"* OK " or line[:11] == b"* PREAUTH ")


def pop3_like(first: bytes, direction: Direction) -> bool:
    """Server: a `+OK ` greeting with text (a bare "+OK" is also a RESP reply). Client:
    STLS (a capture that began after the greeting)."""
    if direction == _TO_SERVER:
        return _first_line(first) == b"STLS\r"
    return first[:4] == b"+OK " and b"\n" in first


def _spec(name: str, parser, ports, signature, priority: int) -> Protocol:
    # No event of its own: the parser's transactions are TlsEvents (emits).
    return Protocol(name=name, parser=parser, emits=(TlsEvent,), options=("redact",),
                    tcp_ports=ports, signature=signature, priority=priority,
                    summary=("tls_sni", "tls_ja4"), listing=120)


PROTOCOLS = (
    _spec("smtp", SmtpParser, (25, 587), smtp_like, 61),
    _spec("ftp", FtpParser, (21,), ftp_like, 62),
    _spec("imap", ImapParser, (143,), imap_like, 63),
    # Before Redis (31), whose server signature takes any "+text" line.
    _spec("pop3", Pop3Parser, (110,), pop3_like, 29),
)
