"""Hold mode (bpf/loupe.h "Hold mode"; maps hold_svc, hold_req, hold_ok; docs/rules.md):
the responses of a named service wait in the kernel for the verdict on their request.

Why the kernel arms it: Loupe is passive, so a request has reached the server before
userspace has parsed it, and a server that answers at once (0 ms) has its response on the
wire before any verdict (bench_enforce: 7 of 40 blocked requests leaked bytes). The TC
program therefore marks a flow pending itself, at each request packet toward a service in
hold_svc (hold_req: the client's sequence number after the request), and drops the
server's payload and FIN packets while the flow is pending. Dropping is all a passive
sensor can do with them: it cannot queue or re-inject the server's bytes, so the server's
TCP sends them again on its own timer. Userspace ends the wait:
- allow (any outcome but block: no rule matched, an allow or count rule, a request the
  rules cannot judge alone) -> release(): hold_ok.done_end = the client's stream end as
  the reassembly has read it, i.e. up to and including the judged request;
- block -> the enforcer writes block_flow and resets both ends (enforcer.py); the flow
  stays pending, so nothing of the response leaks.
Then, with `nudge`, userspace sends the server a duplicate ACK as from the client, which
makes its TCP try to send at once instead of at its next retransmission timeout
(docs/rules.md, "Hold mode": what the delay is with and without it).

Bounds (STYLE 16): each service's max hold (the kernel lets a response pass that long
after its request's last packet: fail open), LRU maps for the flows, and the heartbeat's
staleness, after which the kernel holds nothing.
"""

from __future__ import annotations

import ctypes
import ipaddress
import time
from dataclasses import dataclass

from sensor.kernel import abi, bpfsys

# The most a configuration may hold a response: past a few seconds a client gives up or
# a user notices, and a hold is a guard for a verdict that takes about a millisecond.
MAX_HOLD_NS = 10 * 10**9


@dataclass(frozen=True, slots=True)
class HeldService:
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int

    def __str__(self) -> str:
        return f"[{self.addr}]:{self.port}" if self.addr.version == 6 \
            else f"{self.addr}:{self.port}"


def parse_service(text: str) -> HeldService:
    """'198.18.0.2:80' or '[fc00::2]:80' -> HeldService; ValueError names what is wrong."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: expected ADDRESS:PORT (IPv6 as [ADDRESS]:PORT)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    return HeldService(addr, int(port))


def svc_key(svc: HeldService) -> abi.HoldSvcKey:
    k = abi.HoldSvcKey()
    k.ip_version = svc.addr.version
    k.port = svc.port
    raw = svc.addr.packed
    ctypes.memmove(k.addr, raw, len(raw))
    return k


class HoldMaps:
    """hold_svc (userspace, at start), hold_req (the kernel's; read here for tests and
    stats), hold_ok (userspace, per verdict)."""

    def __init__(self, svc_fd: int, req_fd: int, ok_fd: int,
                 clock=time.monotonic_ns) -> None:
        self.svc_fd = svc_fd
        self.req_fd = req_fd
        self.ok_fd = ok_fd
        self.clock = clock

    def set_services(self, services, max_hold_ns: int) -> None:
        """Replaces the held services. The caller sets block_cfg's HOLD bit."""
        if len(services) > abi.HOLD_SVC_ENTRIES:
            raise ValueError(f"at most {abi.HOLD_SVC_ENTRIES} held services")
        self.clear_services()
        v = abi.HoldSvc(max_hold_ns=min(max_hold_ns, MAX_HOLD_NS))
        for svc in services:
            bpfsys.update(self.svc_fd, svc_key(svc), v)

    def clear_services(self) -> None:
        for k in bpfsys.keys(self.svc_fd, abi.HoldSvcKey, 2 * abi.HOLD_SVC_ENTRIES):
            bpfsys.delete(self.svc_fd, k)

    def armed(self, key: abi.FlowKey) -> abi.HoldReq | None:
        """The flow's latest request as the kernel armed it, or None."""
        r = abi.HoldReq()
        return r if bpfsys.lookup(self.req_fd, _canonical(key), r, lock=False) else None

    def pending(self, key: abi.FlowKey) -> abi.HoldReq | None:
        """The flow's latest request while it waits for its verdict (its responses are
        dropped, max hold allowing), or None."""
        k = _canonical(key)
        r = abi.HoldReq()
        if not bpfsys.lookup(self.req_fd, k, r, lock=False):
            return None
        ok = abi.HoldOk()
        if bpfsys.lookup(self.ok_fd, k, ok, lock=False):
            ahead = (r.req_end - ok.done_end) & 0xFFFFFFFF   # flow.c: (__s32) > 0
            if ahead == 0 or ahead >= 0x80000000:
                return None
        return r

    def release(self, key: abi.FlowKey, done_end: int) -> abi.HoldReq | None:
        """The flow's client stream is judged up to done_end (a sequence number): its
        responses pass. Returns the request the kernel had armed, or None when it never
        armed the flow (nothing held, nothing written)."""
        k = _canonical(key)
        r = abi.HoldReq()
        if not bpfsys.lookup(self.req_fd, k, r, lock=False):
            return None
        ok = abi.HoldOk(done_end=done_end & 0xFFFFFFFF, released_ns=self.clock())
        bpfsys.update(self.ok_fd, k, ok)   # LRU: a full map evicts, it never refuses
        return r

    def clear(self) -> None:
        self.clear_services()
        for fd in (self.req_fd, self.ok_fd):
            for k in bpfsys.keys(fd, abi.FlowKey, 2 * abi.HOLD_FLOW_ENTRIES):
                bpfsys.delete(fd, k)


def _canonical(key: abi.FlowKey) -> abi.FlowKey:
    k = abi.FlowKey.from_buffer_copy(bytes(key))
    k.ifindex = 0
    return k

