"""Attaching the flow meter to interfaces: tcx links, or TC clsact filters over rtnetlink.

tcx (kernel >= 6.6) is preferred. A tcx link runs the program straight from the stack's
TC hook, without the clsact qdisc's classifier walk (on 64-byte UDP across a veth, an
empty program attached with clsact cost ~5% of the packet rate, with tcx ~2.5%). The
program goes first among the hook's programs and returns TC_ACT_UNSPEC, which tcx
reads as "next": the others run after it, then any clsact filters. A link lives as long
as its file descriptor, so the program detaches when the sensor exits, crash included.

Older kernels refuse tcx (EINVAL) and get a clsact filter. Ours is recognised by its
priority (PRIORITY), handle (HANDLE) and name (a TCA_BPF_NAME starting with
NAME_PREFIX), on chain 0 of the clsact ingress and egress hooks. That is how we find and
remove our own stale filters after a crash (a TC filter keeps its program alive after
the process that attached it died), and how we avoid clobbering anyone else's: a
foreign filter at our priority makes us refuse with a clear message; foreign filters at
other priorities are left alone and keep running, before or after ours (the program
returns TC_ACT_UNSPEC, so the chain continues).

A loopback device is attached on ingress only: a packet sent on lo passes its egress
and then its ingress hook, and would be counted twice.

The messages are plain rtnetlink (include/uapi/linux/rtnetlink.h, pkt_sched.h,
pkt_cls.h); no library is needed for four message types.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path

from sensor.errors import InterfaceError, KernelError, PrivilegeError
from sensor.kernel import bpfsys
from sensor.kernel.loader import PROGRAM

PRIORITY = 7          # low number: we run before filters added with tc's default (49152)
HANDLE = 0x4C55       # "LU"
NAME_PREFIX = "loupe_flow"

_TCX_TYPES = {"ingress": bpfsys.BPF_TCX_INGRESS, "egress": bpfsys.BPF_TCX_EGRESS}
# What a kernel without tcx (< 6.6) answers a tcx link request with.
_NO_TCX = (errno.EINVAL, errno.EOPNOTSUPP, 524)  # 524: the kernel's ENOTSUPP

_RTM_GETLINK = 18
_RTM_NEWQDISC, _RTM_DELQDISC = 36, 37
_RTM_NEWTFILTER, _RTM_DELTFILTER, _RTM_GETTFILTER = 44, 45, 46
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_EXCL, _NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
_NLM_F_DUMP = 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_TCA_KIND, _TCA_OPTIONS = 1, 2
_TCA_BPF_FD, _TCA_BPF_NAME, _TCA_BPF_FLAGS = 6, 7, 8
_TCA_BPF_FLAG_ACT_DIRECT = 1
_TC_H_CLSACT = 0xFFFFFFF1
_CLSACT_HANDLE = 0xFFFF0000
_PARENT = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}
_ETH_P_ALL_BE = 0x0300  # htons(ETH_P_ALL)
_IFF_LOOPBACK = 0x8

# A netlink reply larger than this would be a dump of thousands of filters; we read in
# chunks of it until NLMSG_DONE.
_RECV_BYTES = 65536


@dataclass(frozen=True, slots=True)
class FilterInfo:
    hook: str
    priority: int
    handle: int
    name: str


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * ((4 - length % 4) % 4)


def _attrs(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    off = 0
    while off + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, off)
        if length < 4:
            break
        out[kind & 0x3FFF] = data[off + 4:off + length]
        off += (length + 3) & ~3
    return out


def _tcmsg(ifindex: int, handle: int, parent: int, info: int) -> bytes:
    return struct.pack("=BxxxiIII", socket.AF_UNSPEC, ifindex, handle, parent, info)


class _Netlink:
    """One NETLINK_ROUTE socket; each request waits for its acknowledgement."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self._sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def request(self, msg_type: int, flags: int, body: bytes) -> list[bytes]:
        """Sends one message; returns the payloads of the replies (a dump's entries)."""
        self._seq += 1
        seq = self._seq
        header = struct.pack("=IHHII", 16 + len(body), msg_type,
                             flags | _NLM_F_REQUEST | _NLM_F_ACK, seq, 0)
        self._sock.send(header + body)
        replies: list[bytes] = []
        while True:
            data = self._sock.recv(_RECV_BYTES)
            off = 0
            while off + 16 <= len(data):
                length, kind, _flags, rseq, _pid = struct.unpack_from("=IHHII", data, off)
                payload = data[off + 16:off + length]
                off += (length + 3) & ~3
                if rseq != seq:
                    continue
                if kind == _NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        raise OSError(code, os.strerror(code))
                    return replies
                if kind == _NLMSG_DONE:
                    return replies
                replies.append(payload)


def interface_index(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise InterfaceError(
            f"no network interface named {name!r}: pick one from `ip link` "
            "(inside its network namespace if it lives in one)"
        ) from None


# Link types (ARPHRD_*) whose frames start with an Ethernet header at TC, which is what
# bpf/flow.c parses: Ethernet (veth, bridges, bonds, VLAN, macvlan, VXLAN, Geneve...) and
# loopback. Others, with the names `ip link` shows for the common ones.
_ETHERNET_LINKS = {1, 772}
_LINK_NAMES = {65534: "none: tun, WireGuard", 768: "ipip", 769: "ip6tnl", 776: "sit",
               778: "gre", 823: "ip6gre", 32: "infiniband", 512: "ppp"}


def link_type(ifindex: int) -> int:
    """The interface's link type (ARPHRD_*), asked over netlink: right inside a network
    namespace entered with setns, where /sys still shows the original one."""
    nl = _Netlink()
    try:
        replies = nl.request(_RTM_GETLINK, 0,
                             struct.pack("=BxHiII", socket.AF_UNSPEC, 0, ifindex, 0, 0))
    except OSError as exc:
        raise _translate(exc, f"asking for interface {ifindex}") from None
    finally:
        nl.close()
    return struct.unpack_from("=H", replies[0], 2)[0]


def meterable_interface(name: str) -> int:
    """The index of interface name, if the flow meter can watch it: it must exist and
    carry Ethernet frames (or be loopback). Anything else is an InterfaceError."""
    ifindex = interface_index(name)
    kind = link_type(ifindex)
    if kind not in _ETHERNET_LINKS:
        what = _LINK_NAMES.get(kind, "not Ethernet")
        raise InterfaceError(
            f"interface {name!r} has no Ethernet header (link type {kind}, {what}), and the "
            "flow meter parses Ethernet frames: watch the interface its traffic is carried "
            "over instead (a tunnel's underlay, e.g. eth0)"
        )
    return ifindex


def is_loopback(name: str) -> bool:
    flags = Path("/sys/class/net", name, "flags")
    try:
        return bool(int(flags.read_text(), 16) & _IFF_LOOPBACK)
    except OSError:
        return name == "lo"


def hooks_for(name: str) -> tuple[str, ...]:
    return ("ingress",) if is_loopback(name) else ("ingress", "egress")


def _translate(exc: OSError, what: str) -> Exception:
    if exc.errno in (errno.EPERM, errno.EACCES):
        return PrivilegeError(f"{what}: permission denied; run as root or grant CAP_NET_ADMIN "
                              "and CAP_BPF")
    if exc.errno == errno.ENODEV:
        return InterfaceError(f"{what}: the interface went away")
    return KernelError(f"{what}: the kernel refused ({exc.strerror}); check `tc filter show "
                       "dev IFACE ingress` for conflicting filters")


@dataclass
class Attachment:
    """Our links or filters on one interface; detach() removes exactly those."""

    iface: str
    ifindex: int
    hooks: tuple[str, ...]
    created_qdisc: bool
    attached: list[str] = field(default_factory=list)
    links: dict[str, int] = field(default_factory=dict)   # hook -> tcx link fd

    @property
    def mode(self) -> str:
        return "tcx" if self.links else "clsact"


def list_filters(nl: _Netlink, ifindex: int, hook: str) -> list[FilterInfo]:
    found = []
    for payload in nl.request(_RTM_GETTFILTER, _NLM_F_DUMP,
                              _tcmsg(ifindex, 0, _PARENT[hook], 0)):
        _fam, _ifi, handle, _parent, info = struct.unpack_from("=BxxxiIII", payload)
        attrs = _attrs(payload[20:])
        if handle == 0:
            continue  # the per-priority head entry the dump lists before the filters
        options = _attrs(attrs.get(_TCA_OPTIONS, b""))
        name = options.get(_TCA_BPF_NAME, b"").rstrip(b"\0").decode(errors="replace")
        found.append(FilterInfo(hook=hook, priority=info >> 16, handle=handle, name=name))
    return found


def _delete_filter(nl: _Netlink, ifindex: int, hook: str, handle: int) -> None:
    nl.request(_RTM_DELTFILTER, 0,
               _tcmsg(ifindex, handle, _PARENT[hook], (PRIORITY << 16) | _ETH_P_ALL_BE)
               + _attr(_TCA_KIND, b"bpf\0"))


def _ensure_clsact(nl: _Netlink, ifindex: int) -> bool:
    """Adds the clsact qdisc; True if we created it, False if it was there."""
    try:
        nl.request(_RTM_NEWQDISC, _NLM_F_CREATE | _NLM_F_EXCL,
                   _tcmsg(ifindex, _CLSACT_HANDLE, _TC_H_CLSACT, 0)
                   + _attr(_TCA_KIND, b"clsact\0"))
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            return False
        raise
    return True


def attach(iface: str, prog_fd: int, *, tcx: bool = True) -> Attachment:
    """Attaches prog_fd to iface: with tcx links when the kernel has them (and tcx is
    True), else with clsact filters. Our own stale clsact filters go first either way."""
    if tcx:
        att = _attach_tcx(iface, prog_fd)
        if att is not None:
            return att
    return _attach_clsact(iface, prog_fd)


def _attach_tcx(iface: str, prog_fd: int) -> Attachment | None:
    """tcx links on iface's hooks; None if the kernel has no tcx."""
    ifindex = meterable_interface(iface)
    cleanup_stale(iface)   # a clsact filter of ours would count every packet twice
    att = Attachment(iface=iface, ifindex=ifindex, hooks=hooks_for(iface), created_qdisc=False)
    for hook in att.hooks:
        try:
            att.links[hook] = bpfsys.tcx_attach(prog_fd, ifindex, _TCX_TYPES[hook])
        except bpfsys.BpfError as exc:
            detach(att)
            if exc.errno in _NO_TCX:
                return None
            raise _translate(exc, f"attaching to {iface} {hook}") from None
        att.attached.append(hook)
    return att


def _attach_clsact(iface: str, prog_fd: int) -> Attachment:
    """clsact filters on iface's hooks, after removing our own stale ones. Refuses if
    another program holds our priority."""
    ifindex = meterable_interface(iface)
    nl = _Netlink()
    try:
        try:
            created = _ensure_clsact(nl, ifindex)
        except OSError as exc:
            raise _translate(exc, f"adding the clsact qdisc to {iface}") from None
        att = Attachment(iface=iface, ifindex=ifindex, hooks=hooks_for(iface),
                         created_qdisc=created)
        for hook in ("ingress", "egress"):
            try:
                existing = list_filters(nl, ifindex, hook)
            except OSError as exc:
                raise _translate(exc, f"listing the TC filters of {iface}") from None
            for f in existing:
                if f.priority != PRIORITY:
                    continue
                if f.handle == HANDLE and f.name.startswith(NAME_PREFIX):
                    _delete_filter(nl, ifindex, hook, f.handle)  # ours, left by a crash
                    continue
                raise KernelError(
                    f"{iface} {hook}: TC priority {PRIORITY} is taken by another filter "
                    f"({f.name or 'unnamed'}, handle {f.handle:#x}); Loupe does not replace "
                    f"other programs. Move that filter to another priority or detach it."
                )
        for hook in att.hooks:
            options = (_attr(_TCA_BPF_FD, struct.pack("=I", prog_fd))
                       + _attr(_TCA_BPF_NAME, f"{NAME_PREFIX}:{hook}".encode() + b"\0")
                       + _attr(_TCA_BPF_FLAGS, struct.pack("=I", _TCA_BPF_FLAG_ACT_DIRECT)))
            try:
                nl.request(_RTM_NEWTFILTER, _NLM_F_CREATE | _NLM_F_EXCL,
                           _tcmsg(ifindex, HANDLE, _PARENT[hook],
                                  (PRIORITY << 16) | _ETH_P_ALL_BE)
                           + _attr(_TCA_KIND, b"bpf\0") + _attr(_TCA_OPTIONS, options))
            except OSError as exc:
                detach(att)
                raise _translate(exc, f"attaching to {iface} {hook}") from None
            att.attached.append(hook)
        return att
    finally:
        nl.close()


def detach(att: Attachment) -> None:
    """Removes our links or filters; removes the clsact qdisc too if we added it and it
    is empty. Tolerates an interface that is already gone (its filters went with it)."""
    if att.links:
        for hook, fd in list(att.links.items()):
            os.close(fd)   # the last reference to a tcx link: the kernel detaches it
            del att.links[hook]
            att.attached.remove(hook)
        return
    nl = _Netlink()
    try:
        for hook in list(att.attached):
            try:
                _delete_filter(nl, att.ifindex, hook, HANDLE)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                    raise _translate(exc, f"detaching from {att.iface} {hook}") from None
            att.attached.remove(hook)
        if att.created_qdisc:
            try:
                others = [f for hook in ("ingress", "egress")
                          for f in list_filters(nl, att.ifindex, hook)]
                if not others:
                    nl.request(_RTM_DELQDISC, 0,
                               _tcmsg(att.ifindex, _CLSACT_HANDLE, _TC_H_CLSACT, 0)
                               + _attr(_TCA_KIND, b"clsact\0"))
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                    raise _translate(exc, f"removing the clsact qdisc of {att.iface}") from None
            att.created_qdisc = False
    finally:
        nl.close()


def cleanup_stale(iface: str) -> int:
    """Removes filters we left on iface (a crash); returns how many. Used at start."""
    ifindex = interface_index(iface)
    nl = _Netlink()
    removed = 0
    try:
        for hook in ("ingress", "egress"):
            try:
                existing = list_filters(nl, ifindex, hook)
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    return removed  # no clsact qdisc: nothing of ours can be there
                raise _translate(exc, f"listing the TC filters of {iface}") from None
            for f in existing:
                if f.priority == PRIORITY and f.handle == HANDLE \
                        and f.name.startswith(NAME_PREFIX):
                    _delete_filter(nl, ifindex, hook, f.handle)
                    removed += 1
        return removed
    finally:
        nl.close()


def attached_hooks(iface: str) -> list[str]:
    """The hooks of iface (in this network namespace) that run the flow meter: a tcx
    program named loader.PROGRAM (its function name) or one of our clsact filters. Needs CAP_SYS_ADMIN to name
    tcx programs; without it only clsact filters are seen."""
    ifindex = interface_index(iface)
    found = []
    nl = _Netlink()
    try:
        for hook in ("ingress", "egress"):
            try:
                ids = bpfsys.tcx_query(ifindex, _TCX_TYPES[hook])
                if any(bpfsys.prog_name(i) == PROGRAM for i in ids):
                    found.append(hook)
                    continue
            except bpfsys.BpfError:
                pass   # no tcx on this kernel, or not allowed to name programs
            try:
                filters = list_filters(nl, ifindex, hook)
            except OSError:
                continue   # no clsact qdisc
            if any(f.name.startswith(NAME_PREFIX) for f in filters):
                found.append(hook)
    finally:
        nl.close()
    return found
