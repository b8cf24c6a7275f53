"""TLS hello fingerprints: JA3, JA3S (Salesforce) and JA4 (FoxIO, the BSD-3 client method).

Each function takes the parsed hello (ClientHello / ServerHello below, filled in by
sensor/l7/tls.py) and returns text; nothing here touches bytes on the wire, so the
definitions can be read and tested on their own.

JA3 (github.com/salesforce/ja3, README): the ClientHello as
    legacy_version,ciphers,extensions,supported_groups,ec_point_formats
each list decimal and '-'-joined in wire order, GREASE values (RFC 8701) removed from
ciphers, extensions and groups; an absent list is empty. JA3 is the MD5 of that string.
JA3S: legacy_version,cipher,extensions of the ServerHello, MD5 likewise.

JA4 (FoxIO technical_details/JA4.md): a_b_c where
    a = transport (t TCP, q QUIC, d DTLS) + version + d|i (SNI present or not)
        + 2-digit cipher count + 2-digit extension count + ALPN first/last character
    b = sha256[:12] of the sorted 4-hex cipher list
    c = sha256[:12] of the sorted 4-hex extension list without SNI (0000) and ALPN
        (0010), then '_' and the signature algorithms in wire order
GREASE is ignored everywhere. Only the client method is implemented: the other JA4+
methods (JA4S, JA4X, ...) are under a non-commercial licence and are not part of Loupe.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from types import MappingProxyType

# RFC 8701 reserves 0x0a0a, 0x1a1a, ... 0xfafa; clients sprinkle them to keep servers
# tolerant of unknown values, so they vary per connection and must not reach a hash.
GREASE = frozenset(0x0A0A + 0x1010 * i for i in range(16))


def is_grease(value: int) -> bool:
    return value in GREASE


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientHello:
    """The ClientHello fields the fingerprints and TlsEvent need, in wire order, GREASE
    still present (each consumer decides what to drop)."""

    legacy_version: int
    ciphers: tuple[int, ...] = ()
    extensions: tuple[int, ...] = ()
    sni: str = ""
    has_sni: bool = False
    alpn: tuple[bytes, ...] = ()
    supported_versions: tuple[int, ...] = ()
    signature_algorithms: tuple[int, ...] = ()
    groups: tuple[int, ...] = ()
    point_formats: tuple[int, ...] = ()
    # Parsed from the first MAX_HANDSHAKE bytes of a longer message (sensor/l7/tls.py):
    # the lists may be incomplete, so no fingerprint is taken of it.
    truncated: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerHello:
    legacy_version: int
    cipher: int
    extensions: tuple[int, ...] = ()
    selected_version: int = 0  # from supported_versions (TLS 1.3), 0 when absent
    alpn: bytes | None = None   # the server's choice, when sent in the clear
    hello_retry: bool = False   # RFC 8446 4.1.3: the HelloRetryRequest random value
    truncated: bool = False     # as ClientHello.truncated

    @property
    def version(self) -> int:
        """The negotiated version: supported_versions wins over legacy_version."""
        return self.selected_version or self.legacy_version


def _dashed(values: tuple[int, ...]) -> str:
    return "-".join([str(v) for v in values if v not in GREASE])


def ja3_string(hello: ClientHello) -> str:
    # Point formats are one byte and can never be GREASE; filtering them is harmless.
    return ",".join((
        str(hello.legacy_version),
        _dashed(hello.ciphers),
        _dashed(hello.extensions),
        _dashed(hello.groups),
        _dashed(hello.point_formats),
    ))


def ja3(hello: ClientHello) -> str:
    return hashlib.md5(ja3_string(hello).encode(), usedforsecurity=False).hexdigest()


def ja3s_string(hello: ServerHello) -> str:
    return ",".join((str(hello.legacy_version), str(hello.cipher), _dashed(hello.extensions)))


def ja3s(hello: ServerHello) -> str:
    return hashlib.md5(ja3s_string(hello).encode(), usedforsecurity=False).hexdigest()


_JA4_VERSIONS = MappingProxyType({
    0x0304: "13", 0x0303: "12", 0x0302: "11", 0x0301: "10", 0x0300: "s3", 0x0002: "s2",
    0xFEFF: "d1", 0xFEFD: "d2", 0xFEFC: "d3",
})
_SNI = 0x0000
_ALPN = 0x0010


def _ja4_version(hello: ClientHello) -> str:
    offered = [v for v in hello.supported_versions if v not in GREASE]
    # The spec takes the highest supported_versions value when the extension exists and
    # ignores the record-layer version. An extension holding only GREASE falls back to
    # legacy_version, as if it were absent.
    version = max(offered) if offered else hello.legacy_version
    return _JA4_VERSIONS.get(version, "00")


def _alnum(byte: int) -> bool:
    return 0x30 <= byte <= 0x39 or 0x41 <= byte <= 0x5A or 0x61 <= byte <= 0x7A


def _ja4_alpn(hello: ClientHello) -> str:
    if not hello.alpn or not hello.alpn[0]:
        return "00"
    first = hello.alpn[0]
    if _alnum(first[0]) and _alnum(first[-1]):
        return chr(first[0]) + chr(first[-1])
    # Non-alphanumeric at either end: first and last character of the value's hex form.
    text = first.hex()
    return text[0] + text[-1]


def _count(n: int) -> str:
    return f"{min(n, 99):02d}"


def _hash12(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _ja4_parts(hello: ClientHello, transport: str) -> tuple[str, str, str]:
    ciphers = sorted([f"{c:04x}" for c in hello.ciphers if c not in GREASE])
    extensions = [e for e in hello.extensions if e not in GREASE]
    a = (
        transport + _ja4_version(hello) + ("d" if hello.has_sni else "i")
        + _count(len(ciphers)) + _count(len(extensions)) + _ja4_alpn(hello)
    )
    b = ",".join(ciphers)
    c = ",".join(sorted([f"{e:04x}" for e in extensions if e != _SNI and e != _ALPN]))
    sigs = [f"{s:04x}" for s in hello.signature_algorithms if s not in GREASE]
    if sigs:
        c = c + "_" + ",".join(sigs)
    return a, b, c


def ja4(hello: ClientHello, transport: str = "t") -> str:
    """JA4 of a ClientHello; transport is "t" (TCP), "q" (QUIC) or "d" (DTLS)."""
    a, b, c = _ja4_parts(hello, transport)
    # Empty lists hash to twelve zeros rather than sha256(""), so "nothing offered" is
    # visible at a glance. The c list counts as empty when no extension remains after
    # removing SNI/ALPN, whatever the signature algorithms.
    b_hash = _hash12(b) if b else "0" * 12
    no_extensions = c == "" or c.startswith("_")
    c_hash = "0" * 12 if no_extensions else _hash12(c)
    return f"{a}_{b_hash}_{c_hash}"


def ja4_r(hello: ClientHello, transport: str = "t") -> str:
    """The raw (sorted, unhashed) form, for checking a fingerprint by eye."""
    return "_".join(_ja4_parts(hello, transport))
