"""DNS parser (RFC 1035, 3596, 2782, 6891, 3597): queries paired with responses.

Strategy. A message is a datagram (UDP) or a frame behind a 2-byte length prefix
(TCP, RFC 1035 4.2.2, several frames per stream in both directions). Each message is
parsed whole; queries (QR=0) wait in a bounded table keyed by (id, qname, qtype,
qclass), the name compared case-insensitively (RFC 4343) but kept as on the wire. A
response (QR=1) completes its query and becomes one DnsEvent with the latency; a
response with no query on record is still reported (latency 0). Queries never answered
come out at EOF with rcode -1. The direction a message came from does not matter: QR
does, so a flow whose initiator was misjudged still pairs.

Names: compression pointers must point strictly before the run of labels that contains
them (the rule BIND and Knot apply), which makes loops impossible; the number of jumps
and the wire length (255, RFC 1035 3.1) are bounded as well. Labels are presented as
RFC 1035 5.1 master-file text: '.' and '\\' escaped with a backslash, bytes outside
0x21-0x7e as \\DDD. Case is kept as on the wire.

Answers in presentation form: A, AAAA, CNAME, NS, PTR, DNAME as the address or name,
MX "preference exchange", TXT as quoted strings, SOA and SRV as their master-file
fields, everything else RFC 3597 "\\# length hex". The OPT pseudo-record (EDNS) is never
an answer; its extended-rcode bits extend the header rcode.

Bad input: a message whose header or question does not parse cannot be paired and is
dropped; one cut short after the question is still used with what was read. Both are
counted in `malformed` and the parser carries on, because UDP datagrams and TCP frames
keep their boundaries. Only losing the TCP framing (a gap, or a stream ending inside a
frame) moves the parser to ERROR.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass

from sensor.l7.base import NEED_DATA, Direction, ParserState, Transaction, _NeedData
from sensor.l7.registry import Filter, FramingHints, Protocol, ZeekLog
from sensor.model import DnsAnswer, DnsEvent, trusted

# Enum members bound once: a class attribute lookup on an Enum costs several times a
# global's, and these are read on every call of the hot paths.
_OK, _DONE, _ERROR = ParserState.OK, ParserState.DONE, ParserState.ERROR
_TO_SERVER, _TO_CLIENT = Direction.TO_SERVER, Direction.TO_CLIENT

# Queries awaiting a response, per flow. A stub resolver has one or two in flight per
# socket; a forwarder that reuses one source port can have hundreds. 512 covers that
# with room to spare, at about 300 bytes an entry (150 KB worst case per flow). Past it
# the oldest query is reported unanswered (rcode -1) and counted in `evicted`.
MAX_OUTSTANDING = 512

# Pointers must go backwards, so a name can jump at most once per label it has; 127
# labels fit in 255 bytes, and no real name needs more than a handful of jumps.
MAX_POINTER_JUMPS = 127
MAX_NAME_WIRE = 255  # RFC 1035 3.1

# One event is one record downstream. Real responses carry a few dozen records at most
# (round-robin sets, DNSSEC signatures); the rest are counted in `answers_dropped`.
MAX_ANSWERS = 64

# A TXT or unknown record can be 64 KB; its text in a record is cut at 4096 characters
# (counted in `rdata_cut`) so one response cannot make an event of hundreds of KB.
MAX_RDATA_TEXT = 4096

_OPT = 41
# Records made from values this parser decoded (16/32-bit header fields, a 12-bit rcode)
# and bounded itself: built without re-validation (model.trusted).
_ANSWER = trusted(DnsAnswer)
_EVENT = trusted(DnsEvent)
_HEADER = 12


class _Malformed(Exception):
    """Bytes that do not form the structure the RFC describes; stays inside this module."""


# Label bytes that stand for themselves in presentation form; a label made only of
# these (nearly all of them) skips the per-byte escaping loop.
_PLAIN_BYTES = bytes(b for b in range(0x21, 0x7F) if b not in (0x2E, 0x5C))


def _escape_label(label: bytes) -> str:
    if not label.translate(None, _PLAIN_BYTES):
        return label.decode("ascii")
    out = []
    for b in label:
        if b in (0x2E, 0x5C):  # '.' and '\' would change how the name reads
            out.append("\\" + chr(b))
        elif 0x21 <= b <= 0x7E:
            out.append(chr(b))
        else:
            out.append(f"\\{b:03d}")
    return "".join(out)


def read_name(msg: bytes, pos: int) -> tuple[str, int]:
    """(presentation name, offset after the name in the original position)."""
    labels: list[str] = []
    end = -1
    run_start = pos
    jumps = 0
    wire = 1  # the root label's length byte
    size = len(msg)
    while True:
        if pos >= size:
            raise _Malformed("name runs past the end of the message")
        n = msg[pos]
        if n >= 0xC0:
            if pos + 1 >= size:
                raise _Malformed("compression pointer cut short")
            target = ((n & 0x3F) << 8) | msg[pos + 1]
            if target >= run_start:
                raise _Malformed(f"compression pointer at {pos} to {target} does not go back")
            jumps += 1
            if jumps > MAX_POINTER_JUMPS:
                raise _Malformed("too many compression pointers")
            if end < 0:
                end = pos + 2
            pos = run_start = target
            continue
        if n & 0xC0:
            raise _Malformed(f"label type 0x{n & 0xC0:02x} is not in use (RFC 6891 5)")
        if n == 0:
            pos += 1
            break
        wire += n + 1
        if wire > MAX_NAME_WIRE:
            raise _Malformed("name longer than 255 bytes")
        if pos + 1 + n > size:
            raise _Malformed("label runs past the end of the message")
        labels.append(_escape_label(msg[pos + 1:pos + 1 + n]))
        pos += 1 + n
    return (".".join(labels) if labels else "."), (end if end >= 0 else pos)


def _u16(msg: bytes, pos: int) -> int:
    if pos + 2 > len(msg):
        raise _Malformed("message cut short")
    return (msg[pos] << 8) | msg[pos + 1]


def _u32(msg: bytes, pos: int) -> int:
    if pos + 4 > len(msg):
        raise _Malformed("message cut short")
    return int.from_bytes(msg[pos:pos + 4], "big")


def _generic(rdata: bytes) -> str:
    # RFC 3597 5: "\# 0" for empty data, else "\# <len> <hex>".
    return f"\\# {len(rdata)} {rdata.hex()}" if rdata else "\\# 0"


def _txt(rdata: bytes) -> str:
    parts = []
    pos = 0
    while pos < len(rdata):
        n = rdata[pos]
        if pos + 1 + n > len(rdata):
            raise _Malformed("TXT string runs past the record")
        chars = []
        for b in rdata[pos + 1:pos + 1 + n]:
            if b in (0x22, 0x5C):
                chars.append("\\" + chr(b))
            elif 0x20 <= b <= 0x7E:
                chars.append(chr(b))
            else:
                chars.append(f"\\{b:03d}")
        parts.append('"' + "".join(chars) + '"')
        pos += 1 + n
    return " ".join(parts)


def _name_exact(msg: bytes, start: int, end: int) -> str:
    name, after = read_name(msg, start)
    if after != end:
        raise _Malformed("name does not fill the record data")
    return name


def rdata_text(msg: bytes, rtype: int, start: int, length: int) -> str:
    """Presentation form of one record's data; raises _Malformed when it does not fit
    its type (the caller falls back to the RFC 3597 form)."""
    end = start + length
    rdata = msg[start:end]
    if rtype == 1:
        if length != 4:
            raise _Malformed("A record data is not 4 bytes")
        return "%d.%d.%d.%d" % (rdata[0], rdata[1], rdata[2], rdata[3])
    if rtype == 28:
        if length != 16:
            raise _Malformed("AAAA record data is not 16 bytes")
        return ipaddress.IPv6Address(rdata).compressed
    if rtype in (2, 5, 12, 39):  # NS, CNAME, PTR, DNAME
        return _name_exact(msg, start, end)
    if rtype == 15:
        if length < 3:
            raise _Malformed("MX record too short")
        return f"{_u16(msg, start)} {_name_exact(msg, start + 2, end)}"
    if rtype == 16:
        return _txt(rdata)
    if rtype == 6:
        mname, pos = read_name(msg, start)
        rname, pos = read_name(msg, pos)
        if pos + 20 != end:
            raise _Malformed("SOA record has the wrong length")
        nums = " ".join(str(_u32(msg, pos + 4 * i)) for i in range(5))
        return f"{mname} {rname} {nums}"
    if rtype == 33:
        if length < 7:
            raise _Malformed("SRV record too short")
        prio, weight, port = _u16(msg, start), _u16(msg, start + 2), _u16(msg, start + 4)
        return f"{prio} {weight} {port} {_name_exact(msg, start + 6, end)}"
    return _generic(rdata)


@dataclass(slots=True)
class Message:
    """One parsed DNS message; `problem` is set when it was cut short after the question.
    Not frozen: one is made per message and never leaves the parser, and a frozen
    dataclass sets each of its fields through object.__setattr__."""

    id: int
    qr: bool
    opcode: int
    rcode: int          # with the EDNS extended bits when an OPT record was present
    truncated: bool     # TC bit
    qname: str
    qtype: int
    qclass: int
    has_question: bool
    answers: tuple[DnsAnswer, ...]
    answers_dropped: int
    rdata_errors: int
    rdata_cut: int
    problem: str


def parse_message(msg: bytes) -> Message:
    """Parse one message. Raises _Malformed when even the header or question is bad."""
    if len(msg) < _HEADER:
        raise _Malformed(f"{len(msg)} bytes is shorter than a DNS header")
    ident, flags, qdcount, ancount, nscount, arcount = struct.unpack_from(">6H", msg)
    pos = _HEADER
    qname, qtype, qclass = "", 0, 0
    for i in range(qdcount):
        name, pos = read_name(msg, pos)
        t, c = _u16(msg, pos), _u16(msg, pos + 2)
        pos += 4
        if i == 0:
            qname, qtype, qclass = name, t, c
    rcode = flags & 0xF
    answers: list[DnsAnswer] = []
    dropped = rdata_errors = rdata_cut = 0
    problem = ""
    try:
        for index in range(ancount + nscount + arcount):
            name, pos = read_name(msg, pos)
            if pos + 10 > len(msg):
                raise _Malformed("record header runs past the end of the message")
            rtype, _rclass, ttl, rdlen = struct.unpack_from(">HHIH", msg, pos)
            start = pos + 10
            if start + rdlen > len(msg):
                raise _Malformed("record data runs past the end of the message")
            pos = start + rdlen
            if rtype == _OPT:
                # RFC 6891 6.1.3: the upper 8 bits of the 12-bit rcode live in the TTL.
                rcode |= (ttl >> 24) << 4
                continue
            if index >= ancount:
                continue  # authority and additional records are not answers
            if len(answers) >= MAX_ANSWERS:
                dropped += 1
                continue
            try:
                data = rdata_text(msg, rtype, start, rdlen)
            except _Malformed:
                rdata_errors += 1
                data = _generic(msg[start:start + rdlen])
            if len(data) > MAX_RDATA_TEXT:
                rdata_cut += 1
                data = data[:MAX_RDATA_TEXT - 3] + "..."
            answers.append(_ANSWER(name=name, rtype=rtype, ttl=ttl, data=data))
    except _Malformed as exc:
        problem = str(exc)
    return Message(
        id=ident, qr=bool(flags & 0x8000), opcode=(flags >> 11) & 0xF, rcode=rcode,
        truncated=bool(flags & 0x0200), qname=qname, qtype=qtype, qclass=qclass,
        has_question=qdcount > 0, answers=tuple(answers), answers_dropped=dropped,
        rdata_errors=rdata_errors, rdata_cut=rdata_cut, problem=problem,
    )


@dataclass(slots=True)
class _Pending:   # not frozen, as Message
    ts_ns: int
    query: Message


class DnsParser:
    """DNS over UDP or TCP for one flow. See the module docstring for the strategy."""

    name = "dns"

    def __init__(self) -> None:
        self.state = _OK
        self.error = ""
        # Counters the engine reads into its loss accounting.
        self.messages = 0
        self.malformed = 0         # messages dropped or cut short
        self.last_problem = ""     # why the last malformed message was
        self.evicted = 0           # queries pushed out of the outstanding table
        self.duplicate_queries = 0
        self.unmatched_responses = 0
        self.answers_dropped = 0
        self.rdata_errors = 0
        self.rdata_cut = 0
        self._transport = "udp"
        self._pending: OrderedDict[tuple, _Pending] = OrderedDict()
        self._buffers = (bytearray(), bytearray())
        self._buffer_ts = [0, 0]
        self._events: deque[Transaction] = deque()
        self._qname = ""

    # --- the L7Parser contract -------------------------------------------------------

    def receive_datagram(self, direction: Direction, data: bytes, ts_ns: int) -> None:
        if self.state is _OK:
            self._message(bytes(data), ts_ns)

    def receive_data(self, direction: Direction, data: bytes, ts_ns: int) -> None:
        if self.state is not _OK or not data:
            return
        self._transport = "tcp"
        buf = self._buffers[direction]
        if not buf:
            self._buffer_ts[direction] = ts_ns
        buf += data
        # Each frame is at most 2 + 65535 bytes by construction, so the buffer left
        # behind after this loop is bounded by one frame per direction.
        while len(buf) >= 2:
            length = (buf[0] << 8) | buf[1]
            if len(buf) < 2 + length:
                break
            frame = bytes(buf[2:2 + length])
            del buf[:2 + length]
            frame_ts = self._buffer_ts[direction]
            self._buffer_ts[direction] = ts_ns
            self._message(frame, frame_ts)

    def receive_gap(self, direction: Direction, length: int, ts_ns: int) -> None:
        if self.state is _OK and self._transport == "tcp":
            self._fail(f"{length} bytes missing: DNS/TCP framing lost")

    def receive_skip(self, direction: Direction, length: int, ts_ns: int) -> None:
        # skip_hint is always 0; a skip is therefore lost framing like a gap.
        self.receive_gap(direction, length, ts_ns)

    def receive_eof(self, direction: Direction, ts_ns: int) -> None:
        if self.state is not _OK:
            return
        if self._buffers[direction]:
            self._fail("stream ended inside a DNS/TCP frame")
            return
        if direction is _TO_CLIENT:
            # The responder can send nothing more: what is still waiting is unanswered.
            self._flush()

    def skip_hint(self, direction: Direction) -> int:
        return 0

    def next_event(self) -> Transaction | _NeedData:
        return self._events.popleft() if self._events else NEED_DATA

    def summary(self) -> dict[str, str]:
        return {"dns_qname": self._qname} if self._qname else {}

    # --- messages --------------------------------------------------------------------

    def _message(self, raw: bytes, ts_ns: int) -> None:
        self.messages += 1
        try:
            msg = parse_message(raw)
        except _Malformed as exc:
            self._bad(str(exc))
            return
        if msg.problem:
            self._bad(msg.problem)
        self.answers_dropped += msg.answers_dropped
        self.rdata_errors += msg.rdata_errors
        self.rdata_cut += msg.rdata_cut
        if not self._qname and msg.has_question:
            self._qname = msg.qname
        key = (msg.id, msg.qname.lower(), msg.qtype, msg.qclass)
        if not msg.qr:
            if key in self._pending:
                self.duplicate_queries += 1  # a retransmission: latency counts from the first
                return
            if len(self._pending) >= MAX_OUTSTANDING:
                _, oldest = self._pending.popitem(last=False)
                self.evicted += 1
                self._emit_unanswered(oldest)
            self._pending[key] = _Pending(ts_ns, msg)
            return
        pending = self._pending.pop(key, None)
        if pending is None and not msg.has_question:
            # Some error responses (FORMERR, NOTIMP) drop the question: pair on id alone.
            for k, p in self._pending.items():
                if k[0] == msg.id:
                    pending = self._pending.pop(k)
                    break
        if pending is None:
            self.unmatched_responses += 1
            query, q_ts, latency = msg, ts_ns, 0
        else:
            query, q_ts, latency = pending.query, pending.ts_ns, max(0, ts_ns - pending.ts_ns)
        self._events.append(Transaction(ts_ns=q_ts, detail=_EVENT(
            id=msg.id, qname=query.qname, qtype=query.qtype, qclass=query.qclass,
            rcode=msg.rcode, answers=msg.answers, latency_ns=latency,
            transport=self._transport, truncated=msg.truncated,
        )))

    def _emit_unanswered(self, pending: _Pending) -> None:
        q = pending.query
        self._events.append(Transaction(ts_ns=pending.ts_ns, detail=_EVENT(
            id=q.id, qname=q.qname, qtype=q.qtype, qclass=q.qclass, rcode=-1,
            transport=self._transport,
        )))

    def _flush(self) -> None:
        while self._pending:
            _, pending = self._pending.popitem(last=False)
            self._emit_unanswered(pending)

    def _bad(self, reason: str) -> None:
        self.malformed += 1
        self.last_problem = reason

    def _fail(self, reason: str) -> None:
        self._flush()  # queries seen before the framing broke are still reported
        self.state = _ERROR
        self.error = reason
        for buf in self._buffers:
            buf.clear()


# -- registration (sensor/l7/registry.py) --------------------------------------------------

def _name_end(msg: bytes, pos: int) -> int:
    """Offset after an uncompressed question name, or -1 (RFC 1035 §3.1 limits)."""
    total = 0
    while pos < len(msg):
        n = msg[pos]
        if n == 0:
            return pos + 1
        if n > 63:
            return -1  # a pointer cannot start the first question; 0x40/0x80 are unused
        total += n + 1
        if total > 255:
            return -1
        pos += n + 1
    return -1


def is_dns_message(msg: bytes) -> bool:
    """A DNS header that is sane plus one well-formed first question (RFC 1035 §4.1),
    without looking at ports."""
    if len(msg) < 17:
        return False
    _, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", msg)
    opcode = (flags >> 11) & 0xF
    if opcode not in (0, 1, 2, 4, 5, 6) or flags & 0x0040:  # Z bit must be zero
        return False
    if not 1 <= qd <= 4 or ns > 64 or ar > 64 or an > 256:
        return False
    if not flags & 0x8000 and (an > 16 or flags & 0x000F):  # a query carries no rcode
        return False
    end = _name_end(msg, 12)
    if end < 0 or end + 4 > len(msg):
        return False
    qclass = struct.unpack_from("!H", msg, end + 2)[0] & 0x7FFF  # mDNS unicast bit
    return qclass in (1, 3, 4, 254, 255)


def _looks_like_datagram(first: bytes, direction: Direction) -> bool:
    return is_dns_message(first)


def _looks_like_stream(first: bytes, direction: Direction) -> bool:
    # The same message behind the two-byte length prefix (RFC 1035 §4.2.2).
    if len(first) < 2:
        return False
    length = (first[0] << 8) | first[1]
    return length >= 17 and is_dns_message(first[2:2 + length])


def table_line(d: DnsEvent) -> list[tuple[str, str | None]]:
    from sensor.export import formats  # rendering only; not needed to parse
    from sensor.export.table import duration

    rcode = "no-response" if d.rcode < 0 else formats.rcode_name(d.rcode)
    out = [(f"{d.qname} {formats.qtype_name(d.qtype)}", None), ("->", "dim"),
           (rcode, None if d.rcode == 0 else "red"),
           (",".join(a.data for a in d.answers) or "-", None)]
    if d.latency_ns:
        out.append((duration(d.latency_ns), None))
    return out


_RCODES = {"NOERROR": 0, "FORMERR": 1, "SERVFAIL": 2, "NXDOMAIN": 3, "NOTIMP": 4, "REFUSED": 5}


def parse_rcode(text: str) -> int:
    """An rcode as tail takes it: a name (NXDOMAIN) or a number."""
    if text.upper() in _RCODES:
        return _RCODES[text.upper()]
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a DNS rcode: use NOERROR, NXDOMAIN, ... or a number") from None


def eve(d: DnsEvent) -> dict:
    """Suricata's EVE dns object: its version 2 answer record, one per transaction,
    rrtype/rcode as names."""
    from sensor.export.formats import qtype_name, rcode_name  # output only

    out: dict = {"version": 2, "type": "answer" if d.rcode >= 0 else "query",
                 "id": d.id, "rrname": d.qname, "rrtype": qtype_name(d.qtype), "tx_id": 0}
    if d.rcode >= 0:
        out["rcode"] = rcode_name(d.rcode)
        out["answers"] = [{"rrname": a.name, "rrtype": qtype_name(a.rtype), "ttl": a.ttl,
                           "rdata": a.data} for a in d.answers]
    if d.truncated:
        out["flags"] = "tc"
    out["latency_ns"] = d.latency_ns
    return out


def _zeek(e) -> list:
    from sensor.export.formats import PROTO_NAMES, qtype_name, rcode_name  # output only

    d = e.detail
    answered = d.rcode >= 0
    return [PROTO_NAMES.get(e.protocol, str(e.protocol)), d.id,
            f"{d.latency_ns / 1e9:.6f}" if d.latency_ns else None, d.qname or None,
            d.qclass, "C_INTERNET" if d.qclass == 1 else None,
            d.qtype, qtype_name(d.qtype),
            d.rcode if answered else None,
            rcode_name(d.rcode) if answered else None,
            "T" if d.truncated else "F",
            [a.data for a in d.answers] if answered else None,
            [f"{a.ttl}.000000" for a in d.answers] if answered else None]


# Zeek's dns.log columns that Loupe has a value for, in Zeek's order.
ZEEK = ZeekLog(path="dns", values=_zeek, columns=(
    ("proto", "enum"), ("trans_id", "count"), ("rtt", "interval"), ("query", "string"),
    ("qclass", "count"), ("qclass_name", "string"), ("qtype", "count"),
    ("qtype_name", "string"), ("rcode", "count"), ("rcode_name", "string"),
    ("TC", "bool"), ("answers", "vector[string]"), ("TTLs", "vector[interval]")))


def _answered(event: DnsEvent) -> bool:
    """An answer came back (a query alone has rcode -1)."""
    return event.rcode >= 0


PROTOCOL = Protocol(
    name="dns", event=DnsEvent, parser=DnsParser,
    # RFC 7766: a DNS-over-TCP connection usually carries one query; once it is answered,
    # the live sensor copies nothing more of the flow.
    framing=FramingHints(done_after=_answered),
    tcp_ports=(53,), udp_ports=(53, 5353),
    # Over TCP the shape alone is too weak a signal (two length bytes and a header), so
    # it is trusted on port 53 only; over UDP the whole message is there to check.
    signature=_looks_like_stream, signature_ports=(53,),
    datagram_signature=_looks_like_datagram, priority=90,
    summary=("dns_qname",),
    column_types={"id": "u16", "qtype": "u16", "qclass": "u16", "rcode": "i32",
                  "answers.rtype": "u16", "answers.ttl": "u32"},
    column_ranges=(("rcode", -1, 0xFFF),),
    column_values=(("transport", frozenset(("udp", "tcp"))),), columns_checked=True,
    line=table_line, listing=2, style="magenta", eve=eve, zeek=ZEEK,
    filters=(
        Filter(name="dns_qname", field="qname", match="glob", flow_field="dns_qname",
               help="query name glob: '*.example.com'"),
        Filter(name="dns_rcode", field="rcode", match="exact", parse=parse_rcode,
               help="NOERROR, NXDOMAIN, ... or a number"),
    ),
)
