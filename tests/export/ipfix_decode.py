"""A minimal IPFIX decoder written from RFC 7011 for the tests, independent of
sensor/export/ipfix.py: it knows no Loupe constant, only the message format, so a wrong
length, set id, enterprise bit or variable-length encoding in the exporter shows up as a
decoding failure or a wrong value here."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

# IANA IPFIX IE ids the tests read, by name (https://www.iana.org/assignments/ipfix).
IE = {
    "octetDeltaCount": 1, "packetDeltaCount": 2, "protocolIdentifier": 4,
    "tcpControlBits": 6, "sourceTransportPort": 7, "sourceIPv4Address": 8,
    "ingressInterface": 10, "destinationTransportPort": 11, "destinationIPv4Address": 12,
    "sourceIPv6Address": 27, "destinationIPv6Address": 28, "icmpTypeCodeIPv4": 32,
    "vlanId": 58, "flowEndReason": 136, "icmpTypeCodeIPv6": 139,
    "flowStartMilliseconds": 152, "flowEndMilliseconds": 153, "tcpSynTotalCount": 218,
    "tcpFinTotalCount": 219, "tcpRstTotalCount": 220, "biflowDirection": 239,
    "dot1qCustomerVlanId": 245, "layer2OctetDeltaCount": 352,
}
REVERSE_PEN = 29305   # RFC 5103


@dataclass
class Message:
    length: int
    export_time: int
    sequence: int
    domain: int
    templates: list[int] = field(default_factory=list)   # template ids defined here
    records: list[dict] = field(default_factory=list)    # (pen, ie) -> bytes


class Decoder:
    """Templates persist across messages, per observation domain, as in a collector."""

    def __init__(self) -> None:
        self.templates: dict[tuple[int, int], list[tuple[int, int, int]]] = {}

    def message(self, data: bytes) -> Message:
        version, length, export_time, seq, domain = struct.unpack_from("!HHIII", data)
        assert version == 10, version
        assert length == len(data), (length, len(data))
        msg = Message(length, export_time, seq, domain)
        pos = 16
        while pos < length:
            set_id, set_len = struct.unpack_from("!HH", data, pos)
            assert set_len >= 4 and pos + set_len <= length, (set_id, set_len)
            body = data[pos + 4:pos + set_len]
            if set_id == 2:
                self._templates(body, domain, msg)
            else:
                assert set_id >= 256, set_id
                self._data(body, self.templates[(domain, set_id)], msg)
            pos += set_len
        assert pos == length
        return msg

    def _templates(self, body: bytes, domain: int, msg: Message) -> None:
        pos = 0
        while len(body) - pos >= 4:
            tid, count = struct.unpack_from("!HH", body, pos)
            pos += 4
            specs = []
            for _ in range(count):
                ie, flen = struct.unpack_from("!HH", body, pos)
                pos += 4
                pen = 0
                if ie & 0x8000:
                    (pen,) = struct.unpack_from("!I", body, pos)
                    pos += 4
                specs.append((ie & 0x7FFF, flen, pen))
            self.templates[(domain, tid)] = specs
            msg.templates.append(tid)
        assert pos == len(body), "template set padding"

    @staticmethod
    def _data(body: bytes, specs, msg: Message) -> None:
        pos = 0
        min_len = sum(1 if n == 0xFFFF else n for _, n, _ in specs)
        while len(body) - pos >= min_len:
            record = {}
            for ie, flen, pen in specs:
                if flen == 0xFFFF:
                    flen = body[pos]
                    pos += 1
                    if flen == 255:
                        (flen,) = struct.unpack_from("!H", body, pos)
                        pos += 2
                record[(pen, ie)] = body[pos:pos + flen]
                pos += flen
            msg.records.append(record)
        assert pos == len(body), "data set padding"


def num(record: dict, name: str, pen: int = 0) -> int:
    return int.from_bytes(record[(pen, IE[name])], "big")


def addr(record: dict, name: str) -> str:
    raw = record[(0, IE[name])]
    return socket.inet_ntop(socket.AF_INET6 if len(raw) == 16 else socket.AF_INET, raw)


def text(record: dict, pen: int, ie: int) -> str:
    return record[(pen, ie)].decode("utf-8")
