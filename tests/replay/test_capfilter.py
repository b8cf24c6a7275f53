"""sensor/capfilter.py: what the parser accepts and how it groups, the one-line errors
with their columns, the bounds, IPv6, and the evaluator on crafted frames (tcpdump
itself is the oracle in test_capfilter_tcpdump.py)."""

from __future__ import annotations

import ipaddress

import pytest

from sensor.capfilter import (
    BOTH,
    DST,
    EITHER,
    MAX_DEPTH,
    MAX_EXPR_CHARS,
    MAX_NODES,
    SRC,
    And,
    FilterError,
    Match,
    Not,
    Or,
    compile_packet_filter,
    parse,
    postfix,
)
from sensor.errors import ConfigError
from tests.fixtures.packets import ether, ipv4, ipv6, tcp, tcp4, udp, udp4


def host(addr: str, direction: int = EITHER, *, ip_only: bool = False) -> Match:
    a = ipaddress.ip_address(addr)
    width = 32 if a.version == 4 else 128
    return Match("addr", version=a.version, direction=direction, addr=int(a),
                 mask=(1 << width) - 1, arp=a.version == 4 and not ip_only)


def port(n: int, direction: int = EITHER, protocols=(6, 17, 132)) -> Match:
    return Match("port", direction=direction, protocols=protocols, lo=n, hi=n)


TCP = Match("proto", protocols=(6,))
UDP = Match("proto", protocols=(17,))
ICMP = Match("proto", version=4, protocols=(1,))


@pytest.mark.parametrize("text, tree", [
    ("host 198.18.0.1", host("198.18.0.1")),
    ("src host 198.18.0.1", host("198.18.0.1", SRC)),
    ("dst 198.18.0.1", host("198.18.0.1", DST)),
    ("src and dst host 198.18.0.1", host("198.18.0.1", BOTH)),
    ("src or dst port 80", port(80)),
    ("ip host 198.18.0.1", host("198.18.0.1", ip_only=True)),
    ("198.18.0.1", host("198.18.0.1")),
    ("tcp dst port 443", port(443, DST, (6,))),
    ("udp", UDP),
    ("ip", Match("ip", version=4)),
    ("ip6", Match("ip", version=6)),
    ("icmp6", Match("proto", version=6, protocols=(58,))),
    ("proto 47", Match("proto", protocols=(47,))),
    ("ip proto \\udp", Match("proto", version=4, protocols=(17,))),
    ("ip6 proto tcp", Match("proto", version=6, protocols=(6,))),
    ("portrange 1024-1000", Match("port", protocols=(6, 17, 132), lo=1000, hi=1024)),
    ("net 10", Match("addr", version=4, addr=10 << 24, mask=0xFF000000, arp=True)),
    ("net 192.168", Match("addr", version=4, addr=0xC0A80000, mask=0xFFFF0000, arp=True)),
    ("net 10.1.0.0 mask 255.255.0.0",
     Match("addr", version=4, addr=0x0A010000, mask=0xFFFF0000, arp=True)),
    ("net 198.18.0.0/15", Match("addr", version=4, addr=0xC6120000, mask=0xFFFE0000, arp=True)),
])
def test_primitives(text, tree):
    assert parse(text) == tree


def test_ipv6_addresses_and_prefixes():
    assert parse("host fc00::1") == host("fc00::1")
    assert parse("ip6 src host 2001:db8::5") == host("2001:db8::5", SRC)
    m = parse("net fc00::/7")
    assert (m.version, m.addr, m.mask) == (6, 0xFC << 120, 0xFE << 120)
    assert parse("host ::ffff:198.18.0.1").version == 6


def test_not_binds_tightest_and_or_bind_equally_from_the_left():
    # pcap-filter(7): "Alternation and concatenation have equal precedence and associate
    # left to right" -- tcpdump -d shows `icmp or udp and port 53` as (icmp or udp) and ...
    assert parse("icmp or udp and port 53") == And(Or(ICMP, UDP), port(53))
    assert parse("tcp and udp or icmp") == Or(And(TCP, UDP), ICMP)
    assert parse("not tcp and udp") == And(Not(TCP), UDP)
    assert parse("! tcp || udp") == Or(Not(TCP), UDP)
    assert parse("not (tcp && udp)") == Not(And(TCP, UDP))
    assert parse("icmp or (udp and port 53)") == Or(ICMP, And(UDP, port(53)))


def test_omitted_qualifiers_repeat_the_previous_ones():
    assert parse("host 198.18.0.1 or 198.18.0.2") == Or(host("198.18.0.1"), host("198.18.0.2"))
    assert parse("tcp port 80 or 443") == Or(port(80, protocols=(6,)), port(443, protocols=(6,)))
    assert parse("src port 53 and 5353") == And(port(53, SRC), port(5353, SRC))
    # `not` is not carried over (pcap-filter(7)'s `not host vs and ace`).
    assert parse("not host 198.18.0.1 and 198.18.0.2") == And(
        Not(host("198.18.0.1")), host("198.18.0.2"))
    assert parse("port (80 or 443)") == Or(port(80), port(443))


@pytest.mark.parametrize("text, message", [
    ("xyz", "syntax error at 'xyz' (column 1)"),
    ("host 198.18.0.1 and xyz", "'xyz' (column 21): not an IP address"),
    ("tcp port 80 or", "syntax error at the end (column 15): 'or' needs a right-hand side"),
    ("(tcp or udp", "syntax error at the end (column 12): expected ')'"),
    ("tcp udp", "syntax error at 'udp' (column 5)"),
    ("port 80 )", "syntax error at ')' (column 9)"),
    ("host 198.18.0.1 @ port 80", "syntax error at '@' (column 17)"),
    ("host", "syntax error at the end (column 5): host needs a value"),
    ("and tcp", "syntax error at 'and' (column 1)"),
    ("port 70000", "'70000' (column 6): not a port (0..65535)"),
    ("port http", "'http' (column 6): not a port number (service names are not looked up"),
    ("host example.com", "'example.com' (column 6): not an IP address (host names are not"),
    ("host 198.18.0.0/15", "'198.18.0.0/15' (column 6): host takes one address"),
    ("net 198.18.0.1/15", "'198.18.0.1/15' (column 5): non-network bits set"),
    ("tcp host 198.18.0.1", "'tcp' (column 1): 'tcp' does not qualify host"),
    ("host 1.2.3.4 or ip port 80", "'ip' (column 17): 'ip' does not qualify port"),
    ("ip6 host 198.18.0.1", "'ip6' (column 1): 'ip6' qualifies an IPv4 address"),
    ("src proto 6", "'src' (column 1): src/dst do not qualify proto"),
    ("proto 300", "'300' (column 7): not an IP protocol"),
    ("vlan 5 and port 80", "'vlan' (column 1): not supported"),
    ("ip and 80", "syntax error at '80' (column 8): a value needs a qualifier"),
    ("net fc00:: mask ffff::", "'fc00::' (column 5): mask is for IPv4 networks"),
    ("", "empty expression"),
])
def test_errors_are_one_line_with_the_column(text, message):
    with pytest.raises(FilterError) as err:
        parse(text)
    assert isinstance(err.value, ConfigError)   # the CLI prints it in one line, exit 2
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_bounds():
    assert parse(" or ".join(["tcp"] * 32))   # 32 primitives + 31 operators = 63 nodes
    with pytest.raises(FilterError, match=f"more than {MAX_NODES} primitives"):
        parse(" or ".join(["tcp"] * 33))
    with pytest.raises(FilterError, match=f"longer than {MAX_EXPR_CHARS}"):
        parse("tcp" + " " * MAX_EXPR_CHARS)
    assert parse("(" * MAX_DEPTH + "tcp" + ")" * MAX_DEPTH) == TCP
    with pytest.raises(FilterError, match=f"nested deeper than {MAX_DEPTH}"):
        parse("(" * (MAX_DEPTH + 1) + "tcp" + ")" * (MAX_DEPTH + 1))
    with pytest.raises(FilterError, match=f"nested deeper than {MAX_DEPTH}"):
        parse("not " * (MAX_DEPTH + 1) + "tcp")


def test_postfix_is_the_kernel_order():
    tree = parse("not host 198.18.0.1 and (tcp or udp)")
    assert postfix(tree) == [host("198.18.0.1"), "not", TCP, UDP, "or", "and"]


def test_evaluation_on_frames():
    http = tcp4("198.18.0.1", 40000, "198.18.0.2", 80, 0x18)
    reply = tcp4("198.18.0.2", 80, "198.18.0.1", 40000, 0x18)
    dns = udp4("198.18.0.3", 5353, "198.18.0.2", 53)
    v6 = ether(ipv6("fc00::1", "fc00::2", 6, tcp(443, 50000, 0x10)))

    def keeps(expr):
        match = compile_packet_filter(expr)
        return [match(1, f) for f in (http, reply, dns, v6)]

    assert keeps("port 80") == [True, True, False, False]
    assert keeps("dst port 80") == [True, False, False, False]
    assert keeps("src host 198.18.0.1") == [True, False, False, False]
    assert keeps("net 198.18.0.0/15 and not udp") == [True, True, False, False]
    assert keeps("ip6 and src port 443") == [False, False, False, True]
    assert keeps("tcp or udp and port 53") == [False, False, True, False]
    assert keeps("not ip6") == [True, True, True, False]


def test_vlan_and_pppoe_frames_are_looked_through():
    """Unlike tcpdump -r (which needs `vlan and ...`), as the meter does."""
    tagged = tcp4("198.18.0.1", 40000, "198.18.0.2", 80, 0x18, vlans=(7,))
    qinq = udp4("198.18.0.1", 53, "198.18.0.2", 53, vlans=(7, 8))
    pppoe = ether(b"\x11\x00\x00\x01\x00\x00\x00\x21"
                  + ipv4("198.18.0.1", "198.18.0.2", 17, udp(53, 53)), ethertype=0x8864)
    match = compile_packet_filter("host 198.18.0.2 and port 80 or udp port 53")
    assert [match(1, f) for f in (tagged, qinq, pppoe)] == [True, True, True]


def test_cut_short_headers_never_match():
    """A frame cut inside its IP header: the fields are not there, so nothing matches,
    `not` included (tcpdump's filter rejects a packet whose load runs past the end)."""
    frame = tcp4("198.18.0.1", 40000, "198.18.0.2", 80, 0x18)[:30]
    assert not compile_packet_filter("not port 80")(1, frame)
    assert not compile_packet_filter("ip")(1, b"")
