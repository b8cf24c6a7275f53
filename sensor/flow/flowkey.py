"""Flow identity shared by the kernel reader and replay: one uid function, so the same
flow gets the same uid whether it was metered live or replayed from a pcap.

A uid is "C" followed by 17 base-62 characters of a keyed BLAKE2b digest of the flow's
canonical key and start time: stable across the interim records of a flow (the key and
start do not change), different for a later flow on the same 5-tuple, and reproducible.
"""

from __future__ import annotations

import hashlib
import ipaddress
import struct

import cython

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


# Two base-62 digits per table entry, least significant first (the order _base62 writes):
# a 17-digit uid takes 8 divisions by 62**2 and one lookup instead of 17 divisions.
_PAIRS = tuple(_ALPHABET[r % 62] + _ALPHABET[r // 62] for r in range(62 * 62))
_UID_MOD = 62**17


def _base62(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 62)
        out.append(_ALPHABET[r])
    return "".join(out)


def _base62_17(n: int) -> str:
    """_base62(n, 17), twice as fast: the uid's digits come in pairs (a test holds the
    two equal on random and edge values)."""
    p = _PAIRS
    n %= _UID_MOD
    n, a = divmod(n, 3844)
    n, b = divmod(n, 3844)
    n, c = divmod(n, 3844)
    n, d = divmod(n, 3844)
    n, e = divmod(n, 3844)
    n, f = divmod(n, 3844)
    n, g = divmod(n, 3844)
    n, h = divmod(n, 3844)
    return p[a] + p[b] + p[c] + p[d] + p[e] + p[f] + p[g] + p[h] + _ALPHABET[n]


def addr_bytes(addr: str | bytes) -> bytes:
    """4 or 16 packed bytes for an address given as text or already packed."""
    if isinstance(addr, bytes):
        return addr
    return ipaddress.ip_address(addr).packed


def flow_uid(
    *,
    src: str | bytes,
    dst: str | bytes,
    src_port: int,
    dst_port: int,
    protocol: int,
    vlan_id: int,
    inner_vlan_id: int,
    start_ns: int,
    sensor_id: str = "",
) -> str:
    """The uid of a flow. Symmetric: swapping the two ends gives the same uid."""
    # Computed once per flow, at replay rates tens of thousands a second: the digest's
    # input is packed in two calls and hashed in one (the same bytes as _flow_uid_plain
    # hashes, which a test holds equal); values out of range take that path, which
    # raises what it always raised.
    try:
        a = (src if src.__class__ is bytes else addr_bytes(src)) + _PORT(src_port)
        b = (dst if dst.__class__ is bytes else addr_bytes(dst)) + _PORT(dst_port)
        tail = _TAIL(protocol, vlan_id, inner_vlan_id, start_ns)
    except struct.error:
        return _flow_uid_plain(src, dst, src_port, dst_port, protocol, vlan_id,
                               inner_vlan_id, start_ns, sensor_id)
    data = a + b + tail if a <= b else b + a + tail
    digest = _blake2b(data, digest_size=13, key=sensor_id.encode()[:64] if sensor_id else b"")
    return _uid_text(digest.digest())


def flow_uid_packed(a: bytes, a_port: int, b: bytes, b_port: int, protocol: int,
                    vlan_id: int, inner_vlan_id: int, start_ns: int, sensor_id: str) -> str:
    """flow_uid for packed addresses, with positional arguments: the flow table's call,
    once per flow."""
    try:
        a = a + _PORT(a_port)
        b = b + _PORT(b_port)
        tail = _TAIL(protocol, vlan_id, inner_vlan_id, start_ns)
    except struct.error:
        return _flow_uid_plain(a, b, a_port, b_port, protocol, vlan_id, inner_vlan_id,
                               start_ns, sensor_id)
    data = a + b + tail if a <= b else b + a + tail
    return _uid_text(_blake2b(data, digest_size=13,
                              key=sensor_id.encode()[:64] if sensor_id else b"").digest())


def _uid_text(digest: bytes) -> str:
    """The uid for a 13-byte digest: "C" + _base62_17 of it. Compiled (flowkey.pxd), the digits come
    from C arithmetic on four 32-bit limbs of the digest instead of eight big-integer
    divisions (7x faster); the digits are the same: _base62_17 reduces modulo 62**17,
    which only drops what lies above the 17th digit. A test holds the two paths equal."""
    if not cython.compiled:
        return "C" + _base62_17(int.from_bytes(digest, "big"))
    d = digest
    alpha = _ALPHABET_B
    l0 = d[0]    # the most significant limb holds the digest's first byte only
    l1 = d[1]
    l1 = (l1 << 24) | (d[2] << 16) | (d[3] << 8) | d[4]
    l2 = d[5]
    l2 = (l2 << 24) | (d[6] << 16) | (d[7] << 8) | d[8]
    l3 = d[9]
    l3 = (l3 << 24) | (d[10] << 16) | (d[11] << 8) | d[12]
    out[0] = 67  # "C"
    for i in range(17):
        # (l0, l1, l2, l3) //= 62, long division; x % 62 is the next digit.
        r = l0 % 62
        l0 //= 62
        x = (r << 32) | l1
        l1 = x // 62
        x = ((x % 62) << 32) | l2
        l2 = x // 62
        x = ((x % 62) << 32) | l3
        l3 = x // 62
        out[i + 1] = alpha[x % 62]
    return out[:18].decode("ascii")


_ALPHABET_B = _ALPHABET.encode()
_PORT = struct.Struct("!H").pack
_TAIL = struct.Struct("!BHHQ").pack   # protocol, VLAN ids, start: after the two ends
_blake2b = hashlib.blake2b


def _flow_uid_plain(src: str | bytes, dst: str | bytes, src_port: int, dst_port: int,
                    protocol: int, vlan_id: int, inner_vlan_id: int, start_ns: int,
                    sensor_id: str) -> str:
    """flow_uid, step by step: the definition the fast path must match."""
    a = addr_bytes(src) + src_port.to_bytes(2, "big")
    b = addr_bytes(dst) + dst_port.to_bytes(2, "big")
    lo, hi = (a, b) if a <= b else (b, a)
    h = hashlib.blake2b(digest_size=13, key=sensor_id.encode()[:64])
    h.update(lo + hi + bytes((protocol,)))
    h.update(vlan_id.to_bytes(2, "big") + inner_vlan_id.to_bytes(2, "big"))
    h.update(start_ns.to_bytes(8, "big"))
    return "C" + _base62(int.from_bytes(h.digest(), "big"), 17)
