"""Per-source rate limits in the kernel (bpf/loupe.h "rate limits"; maps.h rate_src): the
DDoS detector's "ratelimit" mitigation (sensor/rules/ddos.py).

An entry is a token bucket for one source address: `rate` packets a second that open a
connection or carry payload, up to `burst` at once, until its TTL. The kernel refills and
takes tokens; userspace only writes, reads and deletes entries. Like the block maps, the
limits are honoured only while block_cfg's heartbeat is fresh (fail open), and only while
block_cfg.active has BLOCK_ANY_RATE, which is set before the first entry is written and
cleared when expire() leaves the map empty. Times are CLOCK_MONOTONIC ns (the kernel's
bpf_ktime_get_ns()).
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
from dataclasses import dataclass

from sensor.enforce.maps import MAX_TTL_NS, BlockMaps
from sensor.kernel import abi, bpfsys

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Limit:
    """One entry, as metrics and `loupe block list` show it."""

    source: str
    rate: int
    burst: int
    passed: int
    dropped: int
    expires_mono_ns: int


def rate_key(addr: Address) -> abi.RateKey:
    k = abi.RateKey()
    k.ip_version = addr.version
    raw = addr.packed
    ctypes.memmove(k.addr, raw, len(raw))
    return k


def key_address(k: abi.RateKey) -> Address:
    return ipaddress.ip_address(bytes(k.addr)[:4 if k.ip_version == 4 else 16])


class RateLimits:
    """The rate_src map by descriptor; the block maps' config entry (block_cfg) is shared
    with BlockMaps, whose clock this uses."""

    def __init__(self, blocks: BlockMaps, rate_fd: int) -> None:
        self.blocks = blocks
        self.fd = rate_fd

    def limit(self, source: str, rate: int, burst: int, ttl_ns: int) -> int:
        """Limits `source` to `rate` packets a second (burst `burst`) for ttl_ns. A source
        already limited gets the new TTL and keeps its bucket's state. Returns the expiry
        (monotonic ns). Raises ValueError for a bad rate or burst, maps.MapFull never (the
        map is an LRU: the oldest entry gives way)."""
        if not 1 <= rate <= abi.RATE_MAX or burst < 1:
            raise ValueError(f"rate must be 1..{abi.RATE_MAX} and burst at least 1")
        now = self.blocks.clock()
        key = rate_key(ipaddress.ip_address(source))
        v = abi.RateValue()
        if not bpfsys.lookup(self.fd, key, v, lock=False):
            v = abi.RateValue()
            v.added_ns = now
        v.expires_ns = now + min(ttl_ns, MAX_TTL_NS)
        v.rate = rate
        v.burst = burst
        # The bit goes on before the entry exists (BlockMaps._put says why).
        c = self.blocks.config()
        if not c.active & abi.BLOCK_ANY_RATE:
            self.blocks._write_config(active=c.active | abi.BLOCK_ANY_RATE)
        try:
            bpfsys.update(self.fd, key, v)
        except bpfsys.BpfError as exc:
            if exc.errno in (errno.E2BIG, errno.ENOSPC, errno.ENOMEM):
                raise OSError(exc.errno, f"rate limit not written: {exc}") from None
            raise
        return v.expires_ns

    def unlimit(self, source: str) -> bool:
        gone = bpfsys.delete(self.fd, rate_key(ipaddress.ip_address(source)))
        if not self._keys():
            self._clear_bit()
        return gone

    def _clear_bit(self) -> None:
        c = self.blocks.config()
        if c.active & abi.BLOCK_ANY_RATE:
            self.blocks._write_config(active=c.active & ~abi.BLOCK_ANY_RATE)

    def _keys(self) -> list[abi.RateKey]:
        """Every key (an LRU may drop the key a walk stands on: bpfsys.keys)."""
        return bpfsys.keys(self.fd, abi.RateKey, 2 * abi.RATE_SRC_ENTRIES)

    def entries(self, *, include_expired: bool = False) -> list[Limit]:
        now = self.blocks.clock()
        out = []
        for k in self._keys():
            v = abi.RateValue()
            if not bpfsys.lookup(self.fd, k, v, lock=False):
                continue
            if v.expires_ns <= now and not include_expired:
                continue
            out.append(Limit(str(key_address(k)), v.rate, v.burst, v.passed, v.dropped,
                             v.expires_ns))
        return out

    def expire(self) -> int:
        """Deletes every expired entry (and clears BLOCK_ANY_RATE once none is left);
        returns how many went."""
        now = self.blocks.clock()
        n = 0
        keys = self._keys()
        for k in keys:
            v = abi.RateValue()
            if bpfsys.lookup(self.fd, k, v, lock=False) and v.expires_ns <= now:
                n += bpfsys.delete(self.fd, k)
        if n == len(keys):
            self._clear_bit()
        return n

    def clear(self) -> None:
        for k in self._keys():
            bpfsys.delete(self.fd, k)
        self._clear_bit()
