"""The shared parser harness (STYLE.md 14): any L7 parser, any conversation, fed whole, one
byte at a time, split at every offset, with trailing junk, and as fuzz scripts.

A conversation is a list of Chunk (direction, bytes, packet time), as tests/l7/pcaputil.py
pulls them out of a capture: stream bytes for TCP, whole datagrams for UDP. Splitting a
chunk keeps its time on every piece, so a parser that is indifferent to how the stream is
cut (the contract: sensor/l7/base.py) gives equal transactions, times included.

The fuzz side drives a parser with a script of operations decoded from bytes (decode()):
data, datagram, gap, skip and end of stream, in either direction. The same decoding serves
hypothesis in the suite and the coverage-guided fuzz command (tests/fuzz.py), and encode()
turns a conversation into a script, so real captures seed both.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from sensor.l7.base import NEED_DATA, Direction, ParserState, Transaction
from sensor.l7.dns import DnsParser
from sensor.l7.http1 import Http1Parser
from sensor.l7.http2 import Http2Parser
from sensor.l7.kafka import KafkaParser
from sensor.l7.mongodb import MongodbParser
from sensor.l7.mysql import MysqlParser
from sensor.l7.pgsql import PgsqlParser
from sensor.l7.quic import QuicParser
from sensor.l7.redis import RedisParser
from sensor.l7.starttls import FtpParser, ImapParser, Pop3Parser, SmtpParser
from sensor.l7.tls import TlsParser
from tests.l7 import pcaputil
from tests.l7.pcaputil import Chunk

Factory = Callable[[], Any]

TS_END = 10**18  # the time of the ends of streams fed after a conversation

# Offsets split exhaustively, counted over the whole conversation; a conversation longer
# than this gets SAMPLE more offsets drawn after it. Every split replays the conversation,
# so all offsets of a 60 KB capture would cost 60 000 replays.
EXHAUSTIVE = 4096
SAMPLE = 256

JUNK = (b"\x00" * 7, b"\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n", bytes(range(256)), b"\xff" * 300)

STATES = frozenset(ParserState)


GOLDEN = Path(__file__).resolve().parent.parent / "golden"

# parser name -> (factory, the golden captures holding its conversations). Every TCP flow
# and every UDP flow to port 53 of each capture is one conversation.
PARSERS: dict[str, tuple[Callable[[], Any], tuple[str, ...]]] = {
    "http1": (Http1Parser, ("curl-http.pcap", "http-pipelined.pcap", "http-gap-garbage.pcap")),
    "dns": (DnsParser, ("dig-dnsmasq.pcap", "dns-udp-tcp.pcap")),
    "tls": (TlsParser, ("openssl-tls12.pcap", "openssl-tls13.pcap",
                        "tls13-split-hello-ipv6.pcap")),
    "mysql": (MysqlParser, ("mysql-parser/session.pcap",)),
    "pgsql": (PgsqlParser, ("pgsql-session.pcap.gz", "starttls-parser/pgsql.pcap")),
    "redis": (RedisParser, ("redis-session.pcap.gz",)),
    "quic": (QuicParser, ("quic-parser/session.pcap",)),
    "http2": (Http2Parser, ("http2-parser/session.pcap.gz",)),
    "kafka": (KafkaParser, ("kafka-parser/session.pcap.gz",)),
    "mongodb": (MongodbParser, ("mongodb-parser/session.pcap.gz",)),
    "smtp": (SmtpParser, ("starttls-parser/smtp.pcap",)),
    "imap": (ImapParser, ("starttls-parser/imap.pcap",)),
    "pop3": (Pop3Parser, ("starttls-parser/pop3.pcap",)),
    "ftp": (FtpParser, ("starttls-parser/ftp.pcap",)),
}


class Escaped(AssertionError):
    """The parser broke its contract (an exception other than this one escaping is too)."""


@dataclass(frozen=True, slots=True)
class Conversation:
    name: str
    chunks: tuple[Chunk, ...]
    datagrams: bool = False   # UDP: chunks are whole datagrams, never split

    @property
    def size(self) -> int:
        return sum(len(c.data) for c in self.chunks)


@cache
def conversations(name: str) -> tuple[Conversation, ...]:
    out = []
    for capture in PARSERS[name][1]:
        for flow in pcaputil.flows(GOLDEN / capture):
            # The captures' UDP "marker" datagrams (a port to itself) are neither DNS
            # nor QUIC.
            if flow.chunks and (flow.proto == 6 or flow.dport in (53, 443)):
                out.append(Conversation(
                    f"{capture}:{flow.sport}", tuple(flow.chunks), flow.proto == 17))
    return tuple(out)


def seeds(name: str) -> list[bytes]:
    """Fuzz scripts replaying each of the parser's conversations."""
    return [encode(c) for c in conversations(name)]


def _pull(parser, out: list) -> None:
    # Bounded: a parser handing out transactions forever is itself a bug.
    for _ in range(100_000):
        ev = parser.next_event()
        if ev is NEED_DATA:
            return
        if not isinstance(ev, Transaction):
            raise Escaped(f"next_event() returned {ev!r}")
        out.append(ev)
    raise Escaped("next_event() never returned NEED_DATA")


def _check(parser) -> None:
    if parser.state not in STATES:
        raise Escaped(f"state {parser.state!r} is not a ParserState")


def run(factory: Factory, chunks: Iterable[Chunk], *, datagrams: bool = False,
        junk: tuple[Direction, bytes] | None = None, eof: bool = True):
    """Feed `chunks` to a fresh parser the way the engine does; return (parser, the
    transactions before any junk, all transactions)."""
    parser = factory()
    out: list[Transaction] = []
    last = 0
    for c in chunks:
        if datagrams:
            parser.receive_datagram(c.direction, c.data, c.ts_ns)
        else:
            parser.receive_data(c.direction, c.data, c.ts_ns)
        _check(parser)
        _pull(parser, out)
        last = c.ts_ns
    before = list(out)
    if junk is not None:
        direction, data = junk
        if datagrams:
            parser.receive_datagram(direction, data, last)
        else:
            parser.receive_data(direction, data, last)
        _check(parser)
        _pull(parser, out)
    if eof:
        for direction in (Direction.TO_SERVER, Direction.TO_CLIENT):
            parser.receive_eof(direction, TS_END)
            _check(parser)
        _pull(parser, out)
    return parser, before, out


def bytewise(chunks: Iterable[Chunk]) -> list[Chunk]:
    return [Chunk(c.direction, c.data[i:i + 1], c.ts_ns)
            for c in chunks for i in range(len(c.data))]


def split_offsets(conv: Conversation, exhaustive: int = EXHAUSTIVE,
                  sample: int = SAMPLE) -> list[int]:
    """Offsets into the conversation's bytes: all below `exhaustive`, `sample` after."""
    size = conv.size
    offsets = list(range(1, min(size, exhaustive)))
    if size > exhaustive:
        rng = random.Random(conv.name)   # the same sample on every run
        offsets += sorted(rng.sample(range(exhaustive, size), min(sample, size - exhaustive)))
    return offsets


def split_at(chunks: tuple[Chunk, ...], offset: int) -> list[Chunk] | None:
    """The chunks with the one holding `offset` cut there; None on a chunk boundary."""
    pos = 0
    for i, c in enumerate(chunks):
        if pos < offset < pos + len(c.data):
            k = offset - pos
            return [*chunks[:i], Chunk(c.direction, c.data[:k], c.ts_ns),
                    Chunk(c.direction, c.data[k:], c.ts_ns), *chunks[i + 1:]]
        pos += len(c.data)
    return None


def check_conversation(factory: Factory, conv: Conversation, *, exhaustive: int = EXHAUSTIVE,
                       sample: int = SAMPLE) -> int:
    """Every way of feeding `conv` gives the transactions of feeding it whole; junk after
    it leaves those untouched. Returns how many transactions the conversation makes."""
    _, _, whole = run(factory, conv.chunks, datagrams=conv.datagrams)
    if not conv.datagrams:
        _, _, got = run(factory, bytewise(conv.chunks))
        assert got == whole, f"{conv.name}: one byte at a time differs"
        for offset in split_offsets(conv, exhaustive, sample):
            cut = split_at(conv.chunks, offset)
            if cut is not None:
                _, _, got = run(factory, cut)
                assert got == whole, f"{conv.name}: split at byte {offset} differs"
    _, plain, _ = run(factory, conv.chunks, datagrams=conv.datagrams, eof=False)
    for direction in Direction:
        for junk in JUNK:
            _, before, _ = run(factory, conv.chunks, datagrams=conv.datagrams,
                               junk=(direction, junk))
            assert before == plain, f"{conv.name}: junk changed earlier transactions"
    return len(whole)


# --- fuzz scripts -----------------------------------------------------------------------

# One operation: a header byte (bit 0 the direction, bits 1-3 the kind), a 16-bit length,
# then, for data and datagrams, that many bytes (fewer at the end of the script).
_DATA, _DATAGRAM, _GAP, _SKIP, _EOF = range(5)
_KINDS = 8            # kinds 5-7 are data too: bytes are what the parser mostly gets
_HEAD = struct.Struct(">BH")
MAX_OPS = 256         # operations per script: bounds one execution


def encode(conv: Conversation) -> bytes:
    """The script feeding `conv` (then both ends of stream)."""
    kind = _DATAGRAM if conv.datagrams else _DATA
    out = bytearray()
    for c in conv.chunks:
        for i in range(0, max(len(c.data), 1), 0xFFFF):
            piece = c.data[i:i + 0xFFFF]
            out += _HEAD.pack(kind << 1 | int(c.direction), len(piece)) + piece
    for direction in Direction:
        out += _HEAD.pack(_EOF << 1 | int(direction), 0)
    return bytes(out)


def decode(script: bytes) -> Iterator[tuple[Direction, int, int, bytes]]:
    """(direction, kind, length, bytes) for each operation of `script`."""
    pos = 0
    for _ in range(MAX_OPS):
        if pos + _HEAD.size > len(script):
            return
        head, length = _HEAD.unpack_from(script, pos)
        pos += _HEAD.size
        direction = Direction(head & 1)
        kind = (head >> 1) % _KINDS
        data = b""
        if kind not in (_GAP, _SKIP, _EOF):
            data = script[pos:pos + length]
            pos += len(data)
        yield direction, kind, length, data


def drive(factory: Factory, script: bytes) -> int:
    """One fuzz execution: the script's operations on a fresh parser. Raises if anything
    escapes or the contract breaks; returns the transactions made."""
    parser = factory()
    out: list[Transaction] = []
    ts = 0
    for direction, kind, length, data in decode(script):
        ts += 1_000
        if kind == _GAP:
            parser.receive_gap(direction, length, ts)
        elif kind == _SKIP:
            # Mostly what the parser asked to skip, as the engine would; else any length.
            hint = parser.skip_hint(direction)
            if not isinstance(hint, int) or hint < 0:
                raise Escaped(f"skip_hint() returned {hint!r}")
            parser.receive_skip(direction, hint or length, ts)
        elif kind == _EOF:
            parser.receive_eof(direction, ts)
        elif kind == _DATAGRAM:
            parser.receive_datagram(direction, data, ts)
        else:
            parser.receive_data(direction, data, ts)
        _check(parser)
        _pull(parser, out)
    for direction in Direction:
        parser.receive_eof(direction, ts + 1_000)
    _check(parser)
    _pull(parser, out)
    parser.summary()
    return len(out)


def mutate(rng: random.Random, data: bytes, max_len: int = 1 << 16) -> bytes:
    """A few byte-level mutations of `data`: flips, interesting values, inserts, deletes,
    duplicated or truncated ranges (the plain mutation loop of tests/fuzz.py)."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            pos = min(pos, len(buf) - 1)
            buf[pos] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            pos = min(pos, len(buf) - 1)
            buf[pos] = rng.choice((0, 1, 0x7F, 0x80, 0xFE, 0xFF))
        elif op == 2:
            buf[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 3 and buf:
            del buf[pos:pos + rng.randint(1, 16)]
        elif op == 4 and buf:
            start = rng.randrange(len(buf))
            buf[pos:pos] = buf[start:start + rng.randint(1, 64)]
        elif buf:
            del buf[rng.randrange(len(buf)):]
    return bytes(buf[:max_len])
