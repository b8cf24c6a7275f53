"""Community ID v1 (corelight/community-id-spec): one flow hash that Zeek, Suricata,
Arkime and Loupe agree on, so analysts can pivot between tools.

The hash is SHA-1 over: seed (2 bytes, network order), the two addresses, the IP
protocol, one zero pad byte, and, for TCP, UDP, SCTP, ICMP and ICMPv6, the two ports (2
bytes each). The endpoints are ordered so that both directions of a flow hash alike: the
lower address first, the lower port breaking a tie.

ICMP has no ports. The spec uses the type as the source port and, as the destination
port, the counterpart type of a request/reply pair (echo <-> echo reply, ...), so a
request and its reply map to the same flow; a type without a counterpart uses its code
and is "one-way": its endpoints are never reordered.
"""

from __future__ import annotations

import binascii
import hashlib
import struct

from sensor.flow.flowkey import addr_bytes

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
PROTO_SCTP = 132

_WITH_PORTS = frozenset({PROTO_TCP, PROTO_UDP, PROTO_SCTP, PROTO_ICMP, PROTO_ICMPV6})

# Request/reply pairs, both ways (spec, "ICMP and ICMPv6").
_ICMP4_PAIRS = {
    8: 0, 0: 8,      # echo / echo reply
    13: 14, 14: 13,  # timestamp / reply
    15: 16, 16: 15,  # information request / reply
    10: 9, 9: 10,    # router solicitation / advertisement
    17: 18, 18: 17,  # address mask request / reply
}
_ICMP6_PAIRS = {
    128: 129, 129: 128,  # echo request / reply
    133: 134, 134: 133,  # router solicitation / advertisement
    135: 136, 136: 135,  # neighbor solicitation / advertisement
    130: 131, 131: 130,  # multicast listener query / report
    139: 140, 140: 139,  # node information query / response
    144: 145, 145: 144,  # home agent address discovery request / reply
}


def icmp_ports(protocol: int, icmp_type: int, icmp_code: int) -> tuple[int, int, bool]:
    """(source port, destination port, one_way) standing in for an ICMP message."""
    pairs = _ICMP6_PAIRS if protocol == PROTO_ICMPV6 else _ICMP4_PAIRS
    other = pairs.get(icmp_type)
    if other is None:
        return icmp_type, icmp_code, True
    return icmp_type, other, False


class CommunityId:
    """A Community ID v1 computer with a fixed seed and output encoding."""

    __slots__ = ("_seed", "_b64")

    def __init__(self, seed: int = 0, *, base64_output: bool = True) -> None:
        if not 0 <= seed <= 0xFFFF:
            raise ValueError(f"community id seed {seed} is outside 0..65535")
        self._seed = struct.pack("!H", seed)
        self._b64 = base64_output

    def compute(
        self,
        *,
        src: str | bytes,
        dst: str | bytes,
        protocol: int,
        src_port: int = 0,
        dst_port: int = 0,
        icmp_type: int | None = None,
        icmp_code: int | None = None,
    ) -> str:
        """The id of a flow seen from its initiator (src). For ICMP/ICMPv6, give
        icmp_type/icmp_code (the ports are then ignored)."""
        return self.packed(src if src.__class__ is bytes else addr_bytes(src),
                           dst if dst.__class__ is bytes else addr_bytes(dst),
                           protocol, src_port, dst_port, icmp_type, icmp_code)

    def packed(self, saddr: bytes, daddr: bytes, protocol: int, sport: int, dport: int,
               icmp_type: int | None = None, icmp_code: int | None = None) -> str:
        """compute() for packed addresses, with positional arguments: the flow table's
        call, once per flow."""
        one_way = False
        if (protocol == PROTO_ICMP or protocol == PROTO_ICMPV6) and icmp_type is not None:
            sport, dport, one_way = icmp_ports(protocol, icmp_type, icmp_code or 0)
        if not one_way and (saddr > daddr or (saddr == daddr and sport > dport)):
            saddr, daddr, sport, dport = daddr, saddr, dport, sport
        if protocol in _WITH_PORTS:
            data = self._seed + saddr + daddr + _PROTO_PORTS(protocol, 0, sport, dport)
        else:
            data = self._seed + saddr + daddr + bytes((protocol, 0))
        digest = _sha1(data).digest()
        if self._b64:
            # binascii directly: base64.b64encode is a Python wrapper around it.
            return "1:" + _b2a_base64(digest, newline=False).decode("ascii")
        return "1:" + digest.hex()


_PROTO_PORTS = struct.Struct("!BBHH").pack
_sha1 = hashlib.sha1
_b2a_base64 = binascii.b2a_base64

DEFAULT = CommunityId()


def community_id(
    *,
    src: str | bytes,
    dst: str | bytes,
    protocol: int,
    src_port: int = 0,
    dst_port: int = 0,
    icmp_type: int | None = None,
    icmp_code: int | None = None,
) -> str:
    """Community ID v1 with seed 0, base64: the default every tool emits."""
    return DEFAULT.compute(src=src, dst=dst, protocol=protocol, src_port=src_port,
                           dst_port=dst_port, icmp_type=icmp_type, icmp_code=icmp_code)
