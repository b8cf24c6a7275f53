"""Parse ndpiReader's text output (tests/do.sh: -v 2) into per-flow expectations."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

_LINE = re.compile(
    r"^\s+\d+\s+(?P<proto>\S+) (?P<a>\S+) <?-> (?P<b>\S+) "
    r"(?:\[VLAN: (?P<vlan>\d+)\])?.*?"
    r"\[(?P<ap>\d+) pkts/(?P<ab>\d+) bytes <?-> (?P<bp>\d+) pkts/(?P<bb>\d+) bytes\]"
)
_PROTOS = {"TCP": 6, "UDP": 17, "ICMP": 1, "ICMPV6": 58}


@dataclass(frozen=True)
class NdpiFlow:
    protocol: int
    a: tuple[str, int]          # as printed first (nDPI's "src")
    b: tuple[str, int]
    vlan: int
    a_packets: int
    a_bytes: int
    b_packets: int
    b_bytes: int


def _endpoint(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, _, port = text[1:].rpartition("]:")
    else:
        host, _, port = text.rpartition(":")
    return str(ipaddress.ip_address(host)), int(port)


def parse(path: Path) -> list[NdpiFlow]:
    flows = []
    for line in path.read_text(errors="replace").splitlines():
        m = _LINE.match(line)
        if not m or m["proto"] not in _PROTOS:
            continue
        flows.append(NdpiFlow(
            protocol=_PROTOS[m["proto"]], a=_endpoint(m["a"]), b=_endpoint(m["b"]),
            vlan=int(m["vlan"] or 0), a_packets=int(m["ap"]), a_bytes=int(m["ab"]),
            b_packets=int(m["bp"]), b_bytes=int(m["bb"])))
    return flows
