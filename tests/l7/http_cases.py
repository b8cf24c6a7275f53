"""Helpers for the HTTP/1 parser tests: drive a parser through a conversation whole, one
byte at a time, and with trailing junk, and compare what comes out (STYLE.md rule 14)."""

from __future__ import annotations

from dataclasses import dataclass

from sensor.l7.base import NEED_DATA, Direction, ParserState
from sensor.l7.http1 import Http1Parser

C = Direction.TO_SERVER
S = Direction.TO_CLIENT
JUNK = b"\x00\x17 junk that is not HTTP\r\n\r\n"


@dataclass(frozen=True)
class Step:
    """One call on the parser: data, gap, skip or eof in a direction at a time."""

    direction: Direction
    data: bytes = b""
    ts: int = 0
    kind: str = "data"   # data | gap | skip | eof
    length: int = 0


def data(direction: Direction, payload: bytes, ts: int) -> Step:
    return Step(direction, payload, ts)


def eof(direction: Direction, ts: int) -> Step:
    return Step(direction, ts=ts, kind="eof")


def gap(direction: Direction, length: int, ts: int) -> Step:
    return Step(direction, ts=ts, kind="gap", length=length)


def skip(direction: Direction, length: int, ts: int) -> Step:
    return Step(direction, ts=ts, kind="skip", length=length)


@dataclass(frozen=True)
class Outcome:
    events: tuple
    state: ParserState
    error: str


def drive(steps, *, bytewise: bool = False, parser: Http1Parser | None = None) -> Outcome:
    p = parser if parser is not None else Http1Parser()
    events = []
    for step in steps:
        if step.kind == "data":
            if bytewise:
                for i in range(len(step.data)):
                    p.receive_data(step.direction, step.data[i:i + 1], step.ts)
            else:
                p.receive_data(step.direction, step.data, step.ts)
        elif step.kind == "gap":
            p.receive_gap(step.direction, step.length, step.ts)
        elif step.kind == "skip":
            p.receive_skip(step.direction, step.length, step.ts)
        else:
            p.receive_eof(step.direction, step.ts)
        while (ev := p.next_event()) is not NEED_DATA:
            events.append(ev)
    return Outcome(tuple(events), p.state, p.error)


def _split_at_eof(steps) -> tuple[list[Step], list[Step]]:
    steps = list(steps)
    at = len(steps)
    while at and steps[at - 1].kind == "eof":
        at -= 1
    return steps[:at], steps[at:]


def with_junk(steps, junk_direction: Direction = C) -> list[Step]:
    """The junk goes after the last data step, before any end of stream."""
    head, tail = _split_at_eof(steps)
    return head + [data(junk_direction, JUNK, 10**12)] + tail


def run_all_ways(steps, *, junk_direction: Direction = C, **parser_kw) -> Outcome:
    """Whole, byte-at-a-time and with junk; asserts they agree; returns the whole run."""
    whole = drive(steps, parser=Http1Parser(**parser_kw))
    bytewise = drive(steps, bytewise=True, parser=Http1Parser(**parser_kw))
    assert bytewise == whole
    junk = drive(with_junk(steps, junk_direction), parser=Http1Parser(**parser_kw))
    before = drive(_split_at_eof(steps)[0], parser=Http1Parser(**parser_kw))
    if before.state is ParserState.DONE:
        assert junk == whole  # after a protocol switch nothing more is parsed
    else:
        assert junk.state is ParserState.ERROR, junk
        # Everything finished before the junk is reported unchanged, then the error.
        assert junk.events[:len(before.events)] == before.events
    return whole


def details(outcome: Outcome):
    return [e.detail for e in outcome.events]
