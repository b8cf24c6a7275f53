"""The contract every L7 parser keeps. Parsers are sans-I/O: bytes in, transactions out.

A parser instance belongs to one flow. The engine feeds it reassembled stream bytes (TCP)
or whole datagrams (UDP), each tagged with the direction and the packet time, and pulls
finished transactions with next_event() until it returns NEED_DATA.

Direction is relative to the flow's initiator (the Flow record's src): TO_SERVER is what the
initiator sent, TO_CLIENT what the responder sent.

The hybrid contract: a parser says which upcoming bytes it does not need (skip_hint), so
the engine can tell the kernel to stop copying them (an HTTP body of known length), and
when it needs nothing more at all (done, e.g. a TLS stream after the handshake). Bytes the
engine did not deliver on purpose arrive as receive_skip(); bytes that were lost (ring
buffer full, missing segments) arrive as receive_gap(). A parser in the middle of a body
treats both alike; a parser in the middle of a header cannot, and goes to ERROR.

Garbage from the peer is not an exception: the parser moves to ParserState.ERROR, sets
`error` to a short reason, and ignores everything after. The engine counts it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol


class Direction(enum.IntEnum):
    TO_SERVER = 0  # initiator -> responder
    TO_CLIENT = 1  # responder -> initiator


class ParserState(enum.Enum):
    OK = "ok"
    DONE = "done"    # needs nothing more from this flow; the engine stops feeding it
    ERROR = "error"  # the peer sent something it cannot parse; counted, then ignored


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


@dataclass(frozen=True, slots=True)
class Transaction:
    """One finished L7 transaction: the detail record and the time of its first byte."""

    ts_ns: int
    detail: Any  # the event dataclass its protocol registered (sensor/l7/registry.py)


class L7Parser(Protocol):
    """What the engine calls. Protocol modules implement it; see http1.py for the model."""

    name: str            # app_proto value: its protocol's registered name
    state: ParserState
    error: str           # why, once state is ERROR

    def receive_data(self, direction: Direction, data: bytes, ts_ns: int) -> None:
        """Stream bytes in order (TCP, after reassembly)."""

    def receive_datagram(self, direction: Direction, data: bytes, ts_ns: int) -> None:
        """One whole datagram (UDP). Stream-only parsers go to ERROR."""

    def receive_gap(self, direction: Direction, length: int, ts_ns: int) -> None:
        """`length` stream bytes were lost and will never arrive."""

    def receive_skip(self, direction: Direction, length: int, ts_ns: int) -> None:
        """`length` stream bytes were not delivered because skip_hint asked for it."""

    def receive_eof(self, direction: Direction, ts_ns: int) -> None:
        """That direction ended (FIN/RST, or the flow ended)."""

    def skip_hint(self, direction: Direction) -> int:
        """How many upcoming bytes of `direction` this parser does not need (0: it needs
        the next byte). The engine may deliver them anyway; the parser must cope."""

    def next_event(self) -> Transaction | _NeedData:
        """The next finished transaction, or NEED_DATA."""

    # Optional: a parser of a request/response protocol may also define
    #     def idle_until_request(self, direction: Direction) -> bool
    # True when no byte of `direction` is needed until the other direction sends again
    # (MySQL after enough rows of a result set). The live engine then has the kernel
    # hold that direction (LOUPE_CTL_HOLD); the bytes left out arrive as a Skip just
    # before the next data of that direction, which the parser must take as the end
    # of what it no longer needed. Replay delivers everything; the parser must cope.

    def summary(self) -> dict[str, str]:
        """Flow-level L7 summary fields, as far as they are known. Only the Flow fields its
        protocol's registration lists in `summary` reach the Flow record."""
