"""The kernel's verdict maps (bpf/loupe.h "enforcement"; maps.h block_cfg, block_flow,
block_src) as userspace reads and writes them, by descriptor.

The same class serves the sensor (descriptors from its loaded program) and `loupe block`
(descriptors opened from the pins the sensor left under its pin directory: pins.py). Times
are CLOCK_MONOTONIC ns, the clock of the kernel's bpf_ktime_get_ns(), so an expiry means
the same thing to both sides; wall time appears only when a person reads it.

Every entry has a TTL (STYLE 16): the kernel ignores an expired entry, and expire() deletes
them. block_cfg.active tells the kernel which maps hold entries, so a host with no block
pays one array lookup per packet; it is recomputed after every change. The heartbeat is
what makes a dead sensor's blocks stop (fail open): beat() every second.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import time
from dataclasses import dataclass

from sensor.kernel import abi, bpfsys

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

REASONS = {abi.BLOCK_RULE: "rule", abi.BLOCK_CLI: "cli", abi.BLOCK_DDOS: "ddos"}
MAX_TTL_NS = 7 * 24 * 3600 * 10**9   # a week: a ban is a mitigation, not a firewall rule


class MapFull(Exception):
    """A block map refused an entry: it holds its maximum (abi.BLOCK_*_ENTRIES)."""


@dataclass(frozen=True, slots=True)
class Block:
    """One active entry, as `loupe block list` shows it."""

    kind: str              # "src" (a prefix) or "flow"
    target: str            # "198.18.0.0/24", or "tcp 198.18.0.1:40000 <-> 198.18.0.2:80"
    reason: str            # rule, cli, ddos
    note: str              # the rule id or the operator's note
    expires_mono_ns: int
    added_mono_ns: int


def src_key(net: Network) -> abi.BlockSrcKey:
    k = abi.BlockSrcKey()
    k.ip_version = net.version
    k.prefixlen = 8 + net.prefixlen
    raw = net.network_address.packed
    ctypes.memmove(k.addr, raw, len(raw))
    return k


def key_network(k: abi.BlockSrcKey) -> Network:
    n = 4 if k.ip_version == 4 else 16
    addr = ipaddress.ip_address(bytes(k.addr)[:n])
    return ipaddress.ip_network(f"{addr}/{k.prefixlen - 8}")


def _value(ttl_ns: int, reason: int, note: str, now_ns: int) -> abi.BlockValue:
    v = abi.BlockValue()
    v.added_ns = now_ns
    v.expires_ns = now_ns + ttl_ns
    v.reason = reason
    v.note = note.encode("utf-8", "replace")[:31]
    return v


def _flow_text(k: abi.FlowKey) -> str:
    n = 4 if k.ip_version == 4 else 16
    a = ipaddress.ip_address(bytes(k.addr_lo)[:n])
    b = ipaddress.ip_address(bytes(k.addr_hi)[:n])
    proto = {6: "tcp", 17: "udp"}.get(k.protocol, str(k.protocol))
    fmt = "{}:{}" if k.ip_version == 4 else "[{}]:{}"
    return f"{proto} {fmt.format(a, k.port_lo)} <-> {fmt.format(b, k.port_hi)}"


class BlockMaps:
    def __init__(self, cfg_fd: int, flow_fd: int, src_fd: int,
                 clock=time.monotonic_ns) -> None:
        self.cfg_fd = cfg_fd
        self.flow_fd = flow_fd
        self.src_fd = src_fd
        self.clock = clock

    # -- the config entry --------------------------------------------------------------

    def config(self) -> abi.BlockCfg:
        c = abi.BlockCfg()
        bpfsys.lookup(self.cfg_fd, ctypes.c_uint32(0), c, lock=False)
        return c

    def _write_config(self, active: int | None = None, heartbeat_ns: int | None = None) -> None:
        c = self.config()
        if active is not None:
            c.active = active
        if heartbeat_ns is not None:
            c.heartbeat_ns = heartbeat_ns
        bpfsys.update(self.cfg_fd, ctypes.c_uint32(0), c)

    def beat(self) -> None:
        """The sensor is alive: the kernel honours the blocks for LOUPE_BLOCK_STALE_NS."""
        self._write_config(heartbeat_ns=self.clock())

    def heartbeat_age_ns(self) -> int:
        hb = self.config().heartbeat_ns
        return self.clock() - hb if hb else -1

    def _refresh_active(self) -> None:
        # Bits of other maps (BLOCK_ANY_RATE: sensor/enforce/ratelimit.py) are theirs.
        other = self.config().active & ~(abi.BLOCK_ANY_FLOW | abi.BLOCK_ANY_SRC)
        active = (abi.BLOCK_ANY_FLOW if self._keys(self.flow_fd, abi.FlowKey) else 0) \
            | (abi.BLOCK_ANY_SRC if self._keys(self.src_fd, abi.BlockSrcKey) else 0)
        self._write_config(active=active | other)

    def set_bit(self, bit: int, on: bool) -> None:
        """Turns one block_cfg.active bit of a map owned elsewhere (BLOCK_ANY_HOLD:
        hold.py) on or off, leaving the others as they are."""
        c = self.config()
        self._write_config(active=(c.active | bit) if on else (c.active & ~bit))

    # -- writes --------------------------------------------------------------------------

    def _put(self, fd: int, key, value, any_bit: int) -> None:
        # The active bit goes on before the entry exists: the kernel must never skip a
        # map that holds a live entry (the other order is harmless, just not needed).
        c = self.config()
        if not c.active & any_bit:
            self._write_config(active=c.active | any_bit)
        try:
            bpfsys.update(fd, key, value)
        except bpfsys.BpfError as exc:
            if exc.errno in (errno.E2BIG, errno.ENOSPC, errno.ENOMEM):
                raise MapFull(str(exc)) from None
            raise

    def block_flow(self, key: abi.FlowKey, ttl_ns: int, reason: int, note: str = "") -> int:
        """Drops the flow both ways for ttl_ns; key is canonical (its ifindex is cleared
        here). Returns the expiry (monotonic ns)."""
        k = abi.FlowKey.from_buffer_copy(bytes(key))
        k.ifindex = 0
        v = _value(min(ttl_ns, MAX_TTL_NS), reason, note, self.clock())
        self._put(self.flow_fd, k, v, abi.BLOCK_ANY_FLOW)
        return v.expires_ns

    def block_src(self, net: Network, ttl_ns: int, reason: int, note: str = "") -> int:
        """Drops every packet from net for ttl_ns (an existing entry for the same prefix
        is replaced: the newer TTL wins). Returns the expiry (monotonic ns)."""
        v = _value(min(ttl_ns, MAX_TTL_NS), reason, note, self.clock())
        self._put(self.src_fd, src_key(net), v, abi.BLOCK_ANY_SRC)
        return v.expires_ns

    def unblock_src(self, net: Network) -> bool:
        gone = bpfsys.delete(self.src_fd, src_key(net))
        self._refresh_active()
        return gone

    def unblock_flow(self, key: abi.FlowKey) -> bool:
        k = abi.FlowKey.from_buffer_copy(bytes(key))
        k.ifindex = 0
        gone = bpfsys.delete(self.flow_fd, k)
        self._refresh_active()
        return gone

    def expire(self) -> int:
        """Deletes every expired entry; returns how many."""
        now = self.clock()
        n = 0
        for fd, ktype in ((self.flow_fd, abi.FlowKey), (self.src_fd, abi.BlockSrcKey)):
            for k in self._keys(fd, ktype):
                v = abi.BlockValue()
                if bpfsys.lookup(fd, k, v, lock=False) and v.expires_ns <= now:
                    n += bpfsys.delete(fd, k)
        if n:
            self._refresh_active()
        return n

    def clear(self) -> None:
        for fd, ktype in ((self.flow_fd, abi.FlowKey), (self.src_fd, abi.BlockSrcKey)):
            for k in self._keys(fd, ktype):
                bpfsys.delete(fd, k)
        self._write_config(active=0)

    # -- reads ---------------------------------------------------------------------------

    def _keys(self, fd: int, ktype) -> list:
        """Every key of one block map (bpfsys.keys, capped at twice the larger map)."""
        return bpfsys.keys(fd, ktype, 2 * max(abi.BLOCK_FLOW_ENTRIES, abi.BLOCK_SRC_ENTRIES))

    def entries(self, *, include_expired: bool = False) -> list[Block]:
        now = self.clock()
        out: list[Block] = []
        for fd, ktype, kind in ((self.src_fd, abi.BlockSrcKey, "src"),
                                (self.flow_fd, abi.FlowKey, "flow")):
            for k in self._keys(fd, ktype):
                v = abi.BlockValue()
                if not bpfsys.lookup(fd, k, v, lock=False):
                    continue
                if v.expires_ns <= now and not include_expired:
                    continue
                target = str(key_network(k)) if kind == "src" else _flow_text(k)
                out.append(Block(kind, target, REASONS.get(v.reason, str(v.reason)),
                                 v.note.decode("utf-8", "replace"), v.expires_ns,
                                 v.added_ns))
        return out
