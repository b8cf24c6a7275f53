"""MongoDB: detected, not parsed yet (flows carry app_proto "mongodb")."""

from __future__ import annotations

import struct

from sensor.l7.base import Direction
from sensor.l7.registry import Protocol


def looks_like(first: bytes, direction: Direction) -> bool:
    """A client's first message: a standard header (length, request id, responseTo 0)
    with opcode OP_MSG (2013) or the legacy OP_QUERY (2004)."""
    if direction != Direction.TO_SERVER or len(first) < 16:
        return False
    length, _, response_to, opcode = struct.unpack_from("<iiii", first)
    return 16 <= length <= 48_000_000 and response_to == 0 and opcode in (2013, 2004)


PROTOCOL = Protocol(name="mongodb", tcp_ports=(27017,), signature=looks_like, priority=32)
