"""Capture filters: the host/net/port/proto subset of tcpdump's language (pcap-filter(7)).

    match = compile_packet_filter("tcp port 80 or 443")   # replay: (link, frame) -> bool
    tree = parse("not (host 198.18.0.1 or net fc00::/7)")  # live: postfix(tree) -> kernel

Sans-I/O: no sockets, no name lookups, no clock. A host name or a service name is refused
with a message asking for the address or the number, because resolving it would make a
filter mean different things on different machines and at different times.

Grammar, as libpcap's (grammar.y), for this subset:

    expr      := term { ("and" | "&&" | "or" | "||") term }   equal precedence, left first
    term      := ("not" | "!") term | "(" expr ")" | primitive
    primitive := [proto] [dir] [type] value | proto | value
    proto     := ip | ip6 | tcp | udp | sctp | icmp | icmp6
    dir       := src | dst | src or dst | src and dst
    type      := host | net | port | portrange | proto

`and` and `or` bind equally and group from the left, so `a or b and c` is `(a or b) and
c`, exactly as tcpdump reads it (pcap-filter(7), "Alternation and concatenation have
equal precedence"); `not` binds tightest. A value without qualifiers takes the previous
primitive's (`host A or B`, `tcp port 80 or 443`; `not` is not carried over: `not host A
and B` is `not host A and host B`).

Meaning per packet, as tcpdump's compiled code tests it (checked against tcpdump -r in
tests/unit/test_capfilter_tcpdump.py):
- `host`/`net` with an IPv4 address also match ARP and RARP sender/target addresses
  unless `ip` qualifies them; IPv6 addresses match IPv6 only.
- `port`/`portrange` mean TCP, UDP or SCTP ports; an IPv4 fragment other than the first
  has none. IPv6 ports are read only right after the fixed header, as tcpdump does.
- `proto N`, `tcp`, `udp`, ...: IPv4's protocol field; IPv6's next header, or the one
  after a fragment header.
One deliberate difference: 802.1Q/802.1ad tags and PPPoE sessions are looked through, as
the meter does (tcpdump -r needs `vlan and ...` for those; on a live Linux interface the
kernel has already removed the tag, so tcpdump matches them there too).

Per packet (replay), the expression is compiled once into one Python function over the
fields it reads (_source: built from the parser's integers, never from the user's text),
with untagged Ethernet/IPv4 decoded by one struct unpack inline: no tree walk.

Bounds (why: a filter is configuration, not a program; the kernel interprets it with a
bounded loop): MAX_EXPR_CHARS characters, MAX_NODES primitives and operators (each is one
kernel instruction, LOUPE_FILTER_MAX_INSNS in bpf/loupe.h), MAX_DEPTH nested parentheses
or `not`s.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass
from typing import Callable, Union

from sensor.errors import ConfigError
from sensor.flow.packet import (
    LINKTYPE_C_HDLC,
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_LOOP,
    LINKTYPE_NULL,
    LINKTYPE_RAW,
    LINKTYPE_RAW_12,
    LINKTYPE_RAW_14,
)

__all__ = ["FilterError", "Match", "And", "Or", "Not", "parse", "postfix",
           "compile_packet_filter", "MAX_EXPR_CHARS", "MAX_NODES", "MAX_DEPTH"]

MAX_EXPR_CHARS = 1024
MAX_NODES = 64
MAX_DEPTH = 16

TCP, UDP, SCTP, ICMP, ICMPV6, FRAGMENT = 6, 17, 132, 1, 58, 44
PORT_PROTOCOLS = (TCP, UDP, SCTP)

# Direction qualifiers; the numbers are the kernel's (bpf/loupe.h LOUPE_FDIR_*).
EITHER, SRC, DST, BOTH = 0, 1, 2, 3

_PROTO_QUALS = {"ip": (4, ()), "ip6": (6, ()), "tcp": (0, (TCP,)), "udp": (0, (UDP,)),
                "sctp": (0, (SCTP,)), "icmp": (4, (ICMP,)), "icmp6": (6, (ICMPV6,))}
_TYPES = ("host", "net", "port", "portrange", "proto")
_PROTO_NAMES = {"tcp": TCP, "udp": UDP, "sctp": SCTP, "icmp": ICMP, "icmp6": ICMPV6}
_AND, _OR, _NOT = ("and", "&&"), ("or", "||"), ("not", "!")
_KEYWORDS = frozenset((*_PROTO_QUALS, *_TYPES, "src", "dst", "mask", *_AND, *_OR, *_NOT))
# Words of pcap-filter(7) outside this subset: named so the error says "not supported"
# rather than "syntax error".
_UNSUPPORTED = frozenset((
    "ether", "arp", "rarp", "vlan", "mpls", "pppoed", "pppoes", "gateway", "less", "greater",
    "broadcast", "multicast", "inbound", "outbound", "ifname", "on", "rnr", "rulenum",
    "reason", "rset", "srnr", "subrulenum", "action", "wlan", "type", "subtype", "dir",
    "atalk", "aarp", "decnet", "iso", "stp", "ipx", "netbeui", "lat", "sca", "moprc",
    "mopdl", "igmp", "igrp", "pim", "vrrp", "carp", "ah", "esp", "protochain", "len",
    "geneve", "llc", "fddi", "tr", "host6", "ra", "ta", "addr1", "addr2", "addr3", "addr4"))
_WHAT = ("Loupe filters take host, net, port, portrange, proto, src, dst, ip, ip6, tcp, "
         "udp, sctp, icmp, icmp6, and, or, not and parentheses (pcap-filter(7) syntax)")
_TOKEN = re.compile(r"\s*(?:(\(|\)|&&|\|\||!)|([A-Za-z0-9_.:/\\-]+))")


class FilterError(ConfigError):
    """A filter expression that cannot be used; the message is one line naming the
    column (1-based) where the trouble starts."""


@dataclass(frozen=True, slots=True)
class Match:
    """One primitive. kind: "ip" (the IP version), "proto", "addr" (host or net) or
    "port" (port or portrange). version: 4, 6 or 0 for either. protocols: for "proto" the
    one protocol; for "port" the transports whose ports count. arp: an IPv4 host/net that
    also matches ARP/RARP addresses (tcpdump's `host A` without `ip`)."""

    kind: str
    version: int = 0
    direction: int = EITHER
    protocols: tuple[int, ...] = ()
    addr: int = 0
    mask: int = 0
    lo: int = 0
    hi: int = 0
    arp: bool = False


@dataclass(frozen=True, slots=True)
class And:
    left: "Node"
    right: "Node"


@dataclass(frozen=True, slots=True)
class Or:
    left: "Node"
    right: "Node"


@dataclass(frozen=True, slots=True)
class Not:
    term: "Node"


Node = Union[Match, And, Or, Not]


# ---- parsing -----------------------------------------------------------------------------


def _tokens(text: str) -> list[tuple[str, int]]:
    out = []
    pos = 0
    n = len(text)
    while pos < n:
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            rest = text[pos:].lstrip()
            if not rest:
                break
            col = n - len(rest) + 1
            raise FilterError(f"syntax error at {rest[0]!r} (column {col}): not a character "
                              f"of a filter; {_WHAT}")
        tok = m.group(1) or m.group(2)
        out.append((tok, m.start(1 if m.group(1) else 2) + 1))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokens(text)
        self.i = 0
        self.nodes = 0
        # The qualifiers a bare value takes: the last primitive's (proto, dir, type).
        self.last: tuple[str | None, int | None, str] | None = None

    # -- tokens
    def peek(self, ahead: int = 0) -> str | None:
        j = self.i + ahead
        return self.toks[j][0].lower() if j < len(self.toks) else None

    def col(self) -> int:
        return self.toks[self.i][1] if self.i < len(self.toks) else len(self.text) + 1

    def fail(self, why: str, col: int | None = None, *, syntax: bool = True) -> FilterError:
        """One line: what is wrong, the token and its column (1-based)."""
        col = self.col() if col is None else col
        m = _TOKEN.match(self.text, col - 1) if col <= len(self.text) else None
        tok = repr(m.group(1) or m.group(2)) if m else "the end"
        if syntax:
            head = f"syntax error at {tok}" if m else "syntax error at the end"
        else:
            head = tok
        return FilterError(f"{head} (column {col}): {why}")

    def take(self) -> tuple[str, int]:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def count(self) -> None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise self.fail(f"more than {MAX_NODES} primitives and operators; shorten the "
                            "filter with net prefixes and port ranges", syntax=False)

    # -- grammar
    def parse(self) -> Node:
        if len(self.text) > MAX_EXPR_CHARS:
            raise FilterError(f"expression of {len(self.text)} characters is longer than "
                              f"{MAX_EXPR_CHARS}")
        if not self.toks:
            raise FilterError("empty expression; give e.g. \"host 198.18.0.1 and port 80\"")
        node = self.expr(0)
        if self.i < len(self.toks):
            raise self.fail("expected and, or, or the end")
        return node

    def expr(self, depth: int) -> Node:
        left = self.term(depth)
        while self.peek() in (*_AND, *_OR):
            op = self.take()[0].lower()
            if self.peek() is None:
                raise self.fail(f"{op!r} needs a right-hand side")
            right = self.term(depth)
            self.count()
            left = And(left, right) if op in _AND else Or(left, right)
        return left

    def term(self, depth: int) -> Node:
        if depth > MAX_DEPTH:
            raise self.fail(f"nested deeper than {MAX_DEPTH} levels", syntax=False)
        tok = self.peek()
        if tok in _NOT:
            self.take()
            inner = self.term(depth + 1)
            self.count()
            return Not(inner)
        if tok == "(":
            self.take()
            node = self.expr(depth + 1)
            if self.peek() != ")":
                raise self.fail("expected ')'")
            self.take()
            return node
        if tok is None:
            raise self.fail("the expression ends early")
        if tok in (")", *_AND, *_OR):
            raise self.fail("expected a primitive (host, net, port, proto, ...), 'not' or '('")
        return self.primitive(depth)

    def primitive(self, depth: int) -> Node:
        start = self.col()
        pq = dq = tq = None
        if self.peek() in _UNSUPPORTED:
            raise self.fail(f"not supported; {_WHAT}", syntax=False)
        if self.peek() in _PROTO_QUALS:
            pq = self.take()[0].lower()
        if self.peek() in ("src", "dst"):
            dq = SRC if self.take()[0].lower() == "src" else DST
            if dq == SRC and self.peek() in (*_AND, *_OR) and self.peek(1) == "dst":
                dq = BOTH if self.take()[0].lower() in _AND else EITHER
                self.take()
        if self.peek() in _TYPES:
            tq = self.take()[0].lower()
        if pq is None and dq is None and tq is None:
            # A bare value: the previous primitive's qualifiers, or a host address.
            if self.last is None:
                pq, dq, tq = None, None, "host"
                if not _looks_like_address(self.peek() or ""):
                    raise self.fail(f"a value needs a qualifier (host, net, port, ...); "
                                    f"{_WHAT}")
            else:
                pq, dq, tq = self.last
        elif dq is None and tq is None:
            self.last = None
            self.count()
            version, protos = _PROTO_QUALS[pq]
            if not protos:
                return Match("ip", version=version)
            return Match("proto", version=version, protocols=protos)
        tq = tq or "host"
        self.last = (pq, dq, tq)
        if self.peek() == "(":
            # `host (A or B)`: values in parentheses take these qualifiers.
            return self.term(depth)
        tok = self.peek()
        # `proto tcp` needs no backslash here (tcpdump wants `proto \tcp`).
        if tok is None or (tok in _KEYWORDS and not (tq == "proto" and tok in _PROTO_NAMES)) \
                or tok in ("(", ")"):
            raise self.fail(f"{tq} needs a value")
        value, col = self.take()
        mask = None
        if tq == "net" and self.peek() == "mask":
            self.take()
            if self.peek() is None:
                raise self.fail("mask needs a value")
            mask = self.take()
        self.count()
        try:
            return _build(pq, dq if dq is not None else EITHER, tq, value, mask)
        except _Bad as exc:
            # col -1: the qualifiers are wrong, so point at the primitive's start.
            at = start if exc.col == -1 else exc.col or col
            raise self.fail(str(exc), at, syntax=False) from None


class _Bad(Exception):
    def __init__(self, why: str, col: int = 0) -> None:
        super().__init__(why)
        self.col = col


def _looks_like_address(text: str) -> bool:
    """A bare value that can only be an address (`198.18.0.1`, `fc00::1`)."""
    return bool(re.fullmatch(r"\d+(\.\d+){3}|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*", text))


def _address_like(text: str) -> bool:
    """Digits, dots and colons: a mistyped address rather than a host name."""
    return bool(re.fullmatch(r"[0-9A-Fa-f:.]+", text)) and not text.isalpha()


def _ipv4_partial(text: str) -> tuple[int, int] | None:
    """tcpdump's `net 10`, `net 10.1`, `net 10.1.2`: (address, prefix length)."""
    parts = text.split(".")
    if not 1 <= len(parts) <= 4 or not all(p.isdigit() and int(p) <= 255 for p in parts):
        return None
    value = 0
    for p in parts:
        value = (value << 8) | int(p)
    return value << (8 * (4 - len(parts))), 8 * len(parts)


def _build(pq: str | None, dq: int, tq: str, value: str,
           mask: tuple[str, int] | None) -> Match:
    if tq in ("host", "net"):
        return _address(pq, dq, tq, value, mask)
    if tq in ("port", "portrange"):
        if pq not in (None, "tcp", "udp", "sctp"):
            raise _Bad(f"'{pq}' does not qualify {tq} (tcp, udp or sctp do)", -1)
        protos = PORT_PROTOCOLS if pq is None else _PROTO_QUALS[pq][1]
        lo_text, sep, hi_text = value.partition("-") if tq == "portrange" else (value, "", value)
        if tq == "portrange" and not sep:
            hi_text = lo_text
        lo, hi = _port(lo_text), _port(hi_text)
        return Match("port", direction=dq, protocols=protos, lo=min(lo, hi), hi=max(lo, hi))
    # proto
    if dq != EITHER:
        raise _Bad("src/dst do not qualify proto", -1)
    if pq not in (None, "ip", "ip6"):
        raise _Bad(f"'{pq}' does not qualify proto (ip or ip6 do)", -1)
    name = value.lstrip("\\").lower()
    if name in _PROTO_NAMES:
        number = _PROTO_NAMES[name]
    elif value.isdigit() and int(value) <= 255:
        number = int(value)
    else:
        raise _Bad(f"not an IP protocol (0..255 or {', '.join(_PROTO_NAMES)})")
    return Match("proto", version=_PROTO_QUALS[pq][0] if pq else 0, protocols=(number,))


def _port(text: str) -> int:
    if not text.isdigit():
        raise _Bad("not a port number (service names are not looked up; give the "
                   "number, e.g. 443)")
    if int(text) > 65535:
        raise _Bad("not a port (0..65535)")
    return int(text)


def _address(pq: str | None, dq: int, tq: str, value: str,
             mask: tuple[str, int] | None) -> Match:
    if pq not in (None, "ip", "ip6"):
        raise _Bad(f"'{pq}' does not qualify {tq} (ip or ip6 do; {pq} qualifies port)", -1)
    if tq == "host" and "/" in value:
        raise _Bad("host takes one address; use net for a prefix")
    addr_text, _, plen_text = value.partition("/")
    v4 = _ipv4_partial(addr_text) if tq == "net" and "/" not in value else None
    try:
        if v4 is not None and mask is None:
            net = ipaddress.ip_network((v4[0], v4[1]))
        elif mask is not None:
            net = ipaddress.ip_network(addr_text, strict=False)
            if net.version != 4:
                raise _Bad("mask is for IPv4 networks; give IPv6 as prefix/length")
            try:
                m = int(ipaddress.IPv4Address(mask[0]))
            except ValueError:
                raise _Bad("not an IPv4 mask", mask[1]) from None
            a = int(net.network_address)
            if a & ~m & 0xFFFFFFFF:
                raise _Bad("non-network bits set (address and mask disagree)")
            return _addr_match(pq, dq, 4, a, m)
        elif tq == "net":
            net = ipaddress.ip_network(value, strict=True)
        else:
            net = ipaddress.ip_network(ipaddress.ip_address(value))
    except ValueError as exc:
        if "host bits set" in str(exc):
            raise _Bad("non-network bits set in the prefix") from None
        if not _address_like(addr_text):
            raise _Bad("not an IP address (host names are not resolved; give the "
                       "address)") from None
        raise _Bad(f"not an IP {'prefix' if tq == 'net' else 'address'}") from None
    width = 32 if net.version == 4 else 128
    m = ((1 << width) - 1) ^ ((1 << (width - net.prefixlen)) - 1)
    return _addr_match(pq, dq, net.version, int(net.network_address), m)


def _addr_match(pq: str | None, dq: int, version: int, addr: int, mask: int) -> Match:
    if (pq == "ip" and version == 6) or (pq == "ip6" and version == 4):
        raise _Bad(f"'{pq}' qualifies an IPv{version} address", -1)
    return Match("addr", version=version, direction=dq, addr=addr, mask=mask,
                 arp=version == 4 and pq is None)


def parse(text: str) -> Node:
    """The expression's tree; FilterError (a ConfigError) with the column if it is not
    one this module can evaluate."""
    return _Parser(text).parse()


def postfix(node: Node) -> list[Match | str]:
    """The tree as a flat program in postfix order: Match entries push their truth,
    "and"/"or" pop two and push one, "not" flips the top. The kernel's form."""
    out: list[Match | str] = []

    def walk(n: Node) -> None:
        if isinstance(n, Match):
            out.append(n)
        elif isinstance(n, Not):
            walk(n.term)
            out.append("not")
        else:
            walk(n.left)
            walk(n.right)
            out.append("and" if isinstance(n, And) else "or")

    walk(node)
    return out


# ---- per-packet evaluation (replay) -----------------------------------------------------

# What a primitive reads of a packet: (l3, proto, proto2, src, dst, sport, dport).
# l3: 4, 6, 1 (ARP/RARP: src/dst are its sender/target IPv4 addresses) or 0 (other).
# proto: IPv4's protocol, IPv6's fixed header's next header; proto2: IPv6's next header
# after a fragment header, else -1. Addresses as integers; ports -1 when the packet has
# none that tcpdump would read.
_View = tuple
_NOTHING = (0, -1, -1, 0, 0, -1, -1)
_ARP = 1
_VLAN = (0x8100, 0x88A8, 0x9100)
_RAW = (LINKTYPE_RAW, LINKTYPE_RAW_12, LINKTYPE_RAW_14, LINKTYPE_IPV4, LINKTYPE_IPV6)
_AF_INET6 = frozenset({24, 28, 30, 10})
_ip4 = struct.Struct("!B5xHxB2xII").unpack_from
_eth_ip4 = struct.Struct("!12xHB5xHxB2xII").unpack_from
_ports = struct.Struct("!HH").unpack_from
_u32 = struct.Struct("!I").unpack_from


def _l3(link: int, frame: bytes) -> tuple[int, int]:
    """(ethertype-like kind, offset of the network header): 0x0800, 0x86DD, 0x0806 or 0."""
    n = len(frame)
    if link == LINKTYPE_ETHERNET:
        if n < 14:
            return 0, 0
        et = (frame[12] << 8) | frame[13]
        off = 14
        while et in _VLAN and off + 4 <= n and off < 22:
            et = (frame[off + 2] << 8) | frame[off + 3]
            off += 4
        if et == 0x8864 and n >= off + 8:
            ppp = (frame[off + 6] << 8) | frame[off + 7]
            off += 8
            et = 0x0800 if ppp == 0x0021 else 0x86DD if ppp == 0x0057 else 0
        return (0x0806 if et == 0x8035 else et), off
    if link in _RAW:
        if not n:
            return 0, 0
        v = frame[0] >> 4
        return (0x0800 if v == 4 else 0x86DD if v == 6 else 0), 0
    if link == LINKTYPE_NULL or link == LINKTYPE_LOOP:
        if n < 4:
            return 0, 0
        af = frame[0] or frame[3]
        return (0x0800 if af == 2 else 0x86DD if af in _AF_INET6 else 0), 4
    if link == LINKTYPE_LINUX_SLL or link == LINKTYPE_LINUX_SLL2:
        off = 16 if link == LINKTYPE_LINUX_SLL else 20
        if n < off:
            return 0, 0
        at = 14 if link == LINKTYPE_LINUX_SLL else 0
        et = (frame[at] << 8) | frame[at + 1]
        if et == 0x8100 and n >= off + 4:
            et = (frame[off + 2] << 8) | frame[off + 3]
            off += 4
        return (0x0806 if et == 0x8035 else et), off
    if link == LINKTYPE_C_HDLC:
        # Cisco HDLC's EtherType; its 0x8035 is SLARP, not RARP: no protocol tcpdump's
        # filter names.
        if n < 4:
            return 0, 0
        et = (frame[2] << 8) | frame[3]
        return (et if et in (0x0800, 0x86DD) else 0), 4
    return 0, 0


def view(link: int, frame: bytes) -> _View | None:
    """What the primitives read of one frame; None when a field they need was not
    captured (tcpdump's filter then rejects the packet, as a load past the end does)."""
    n = len(frame)
    if link == LINKTYPE_ETHERNET and n >= 34:
        # Untagged IPv4, most frames of most captures: one unpack.
        et, vihl, frag, proto, src, dst = _eth_ip4(frame, 0)
        if et == 0x0800:
            if proto in PORT_PROTOCOLS and not frag & 0x1FFF:
                l4 = 14 + ((vihl & 15) << 2)
                if n < l4 + 4:
                    return None
                sport, dport = _ports(frame, l4)
                return (4, proto, -1, src, dst, sport, dport)
            return (4, proto, -1, src, dst, -1, -1)
    kind, off = _l3(link, frame)
    if kind == 0x0800:
        if n < off + 20:
            return None
        vihl, frag, proto, src, dst = _ip4(frame, off)
        l4 = off + ((vihl & 15) << 2)
        sport = dport = -1
        if proto in PORT_PROTOCOLS and not frag & 0x1FFF:
            if n < l4 + 4:
                return None
            sport, dport = _ports(frame, l4)
        return (4, proto, -1, src, dst, sport, dport)
    if kind == 0x86DD:
        if n < off + 40:
            return None
        nh = frame[off + 6]
        src = int.from_bytes(frame[off + 8:off + 24], "big")
        dst = int.from_bytes(frame[off + 24:off + 40], "big")
        sport = dport = -1
        proto2 = -1
        if nh in PORT_PROTOCOLS:
            if n < off + 44:
                return None
            sport, dport = _ports(frame, off + 40)
        elif nh == FRAGMENT:
            if n < off + 41:
                return None
            proto2 = frame[off + 40]
        return (6, nh, proto2, src, dst, sport, dport)
    if kind == 0x0806:
        if n < off + 28:
            return None
        return (_ARP, -1, -1, _u32(frame, off + 14)[0], _u32(frame, off + 24)[0], -1, -1)
    return _NOTHING


def _addr_test(direction: int, addr: int, mask: int) -> str:
    src, dst = f"s & {mask} == {addr}", f"d & {mask} == {addr}"
    if direction == SRC:
        return src
    if direction == DST:
        return dst
    if direction == BOTH:
        return f"{src} and {dst}"
    return f"({src} or {dst})"


def _port_test(direction: int, lo: int, hi: int) -> str:
    src, dst = f"{lo} <= sp <= {hi}", f"{lo} <= dp <= {hi}"
    return {SRC: src, DST: dst, BOTH: f"{src} and {dst}"}.get(direction, f"({src} or {dst})")


def _source(node: Node) -> str:
    """The tree as one Python expression over the view's fields (l3, p, p2, s, d, sp,
    dp). Built from the parser's integers and fixed operators only, never from the
    user's text, then compiled once: one function call per packet instead of one per
    node."""
    if isinstance(node, And):
        return f"({_source(node.left)} and {_source(node.right)})"
    if isinstance(node, Or):
        return f"({_source(node.left)} or {_source(node.right)})"
    if isinstance(node, Not):
        return f"(not {_source(node.term)})"
    m = node
    if m.kind == "ip":
        return f"l3 == {int(m.version)}"
    if m.kind == "proto":
        n = int(m.protocols[0])
        if m.version == 4:
            return f"(l3 == 4 and p == {n})"
        if m.version == 6:
            return f"(l3 == 6 and (p == {n} or p2 == {n}))"
        return f"(p == {n} or p2 == {n})"   # p, p2 are -1 where there is no IP
    if m.kind == "addr":
        test = _addr_test(m.direction, int(m.addr), int(m.mask))
        which = f"(l3 == 4 or l3 == {_ARP})" if m.arp else f"l3 == {int(m.version)}"
        return f"({which} and {test})"
    protos = tuple(int(x) for x in m.protocols)
    return f"(sp >= 0 and p in {protos!r} and {_port_test(m.direction, int(m.lo), int(m.hi))})"


def compile_packet_filter(text: str) -> Callable[[int, bytes], bool]:
    """match(link_type, frame) -> True for the packets `tcpdump -r FILE text` keeps."""
    body = _source(parse(text))
    # view()'s untagged-IPv4 case inline (one call less per packet), then the expression.
    code = f"""def match(link, frame):
    n = len(frame)
    if link == {LINKTYPE_ETHERNET} and n >= 34:
        et, vihl, frag, p, s, d = eth_ip4(frame, 0)
        if et == 0x0800:
            l3 = 4
            p2 = sp = dp = -1
            if p in {PORT_PROTOCOLS!r} and not frag & 0x1FFF:
                l4 = 14 + ((vihl & 15) << 2)
                if n < l4 + 4:
                    return False
                sp, dp = ports(frame, l4)
            return bool({body})
    v = view(link, frame)
    if v is None:
        return False
    l3, p, p2, s, d, sp, dp = v
    return bool({body})
"""
    scope: dict = {"view": view, "eth_ip4": _eth_ip4, "ports": _ports}
    exec(compile(code, "<capture filter>", "exec"), scope)  # noqa: S102 (ints only)
    return scope["match"]
