"""The kernel's exclusion program: a capture filter (sensor/capfilter.py) as the flat
postfix instructions bpf/flow.c interprets once per new flow (bpf/loupe.h, "Exclusion"),
and the filter that keeps the sensor's own export and metrics traffic out.

In the kernel a filter decides per flow, at its first packet, on the flow's key: `src`
and `dst` are the ends as that packet went (the initiator's, normally), and the protocol
is the transport after IPv6 extension headers. ARP is not a flow, so `host`/`net` only
ever match IP there.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
from typing import Callable

from sensor.capfilter import Match, parse, postfix
from sensor.config import split_host_port
from sensor.errors import ConfigError
from sensor.kernel import abi

_OPS = {"and": abi.FOP_AND, "or": abi.FOP_OR, "not": abi.FOP_NOT}
_LEAVES = {"ip": abi.FOP_IP, "proto": abi.FOP_PROTO, "addr": abi.FOP_ADDR,
           "port": abi.FOP_PORT}


def program(text: str) -> abi.Filter:
    """The instructions for `text` ("" excludes nothing); ConfigError if it does not
    parse or does not fit abi.FILTER_MAX_INSNS."""
    out = abi.Filter()
    if not text:
        return out
    steps = postfix(parse(text))
    if len(steps) > abi.FILTER_MAX_INSNS:
        raise ConfigError(f"exclusion filter of {len(steps)} primitives and operators is "
                          f"longer than the kernel's {abi.FILTER_MAX_INSNS}; shorten it")
    depth = 0
    for i, step in enumerate(steps):
        insn = out.insn[i]
        if isinstance(step, str):
            insn.op = _OPS[step]
            depth -= 0 if step == "not" else 1
            continue
        depth += 1
        _leaf(insn, step)
    # The parser only builds well-formed trees; this guards the kernel's stack.
    assert depth == 1
    out.len = len(steps)
    return out


def _leaf(insn: abi.FilterInsn, m: Match) -> None:
    insn.op = _LEAVES[m.kind]
    insn.dir = m.direction
    insn.version = m.version
    if m.kind == "proto":
        insn.protocol = m.protocols[0]
    elif m.kind == "port":
        # All three transports that have ports: protocol 0 (the kernel's "any of them").
        insn.protocol = 0 if len(m.protocols) > 1 else m.protocols[0]
        insn.port_lo, insn.port_hi = m.lo, m.hi
    elif m.kind == "addr":
        size = 4 if m.version == 4 else 16
        ctypes.memmove(insn.addr, m.addr.to_bytes(size, "big"), size)
        ctypes.memmove(insn.mask, m.mask.to_bytes(size, "big"), size)


Resolver = Callable[[str], list[str]]


def resolve(host: str) -> list[str]:
    """The addresses of a collector's host name (its literal, if it is an address)."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return []
    return sorted({str(ipaddress.ip_address(info[4][0].split("%")[0])) for info in infos})


def own_traffic(collector: str, metrics: str, *, resolver: Resolver = resolve) -> str:
    """A filter for the sensor's own TCP flows: to its collector (host:port; every
    address the name resolves to) and to its metrics listener (an unspecified listen
    address means any of this host's: the port alone). "" when there is neither."""
    parts = []
    if collector:
        host, port = split_host_port(collector)
        addrs = resolver(host)
        if addrs:
            hosts = addrs[0] if len(addrs) == 1 else "(" + " or ".join(addrs) + ")"
            parts.append(f"(tcp port {port} and host {hosts})")
    if metrics:
        host, port = split_host_port(metrics)
        if ipaddress.ip_address(host).is_unspecified:
            parts.append(f"tcp port {port}")
        else:
            parts.append(f"(tcp port {port} and host {host})")
    return " or ".join(parts)


def combined(user: str, own: str) -> str:
    """The user's exclusion and the own-traffic one, as one filter."""
    if user and own:
        return f"({user}) or {own}"
    return user or own
