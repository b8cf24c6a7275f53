"""QUIC Initial packets: the TLS ClientHello (and ServerHello) they carry, sans-I/O.

Strategy
- Datagrams in (UDP), per direction. One datagram may hold several coalesced packets
  (RFC 9000 §12.2): a long-header packet carries its Length, so each is cut out and the
  next one read; a short-header (1-RTT) packet runs to the end of the datagram.
- Initial packets are protected with keys anyone can derive (RFC 9001 §5.2): HKDF-Extract
  with the version's salt over the Destination Connection ID of the client's first
  Initial, then "client in" / "server in", then "quic key", "quic iv", "quic hp" (QUIC v2,
  RFC 9369 §3.3: "quicv2 key", "quicv2 iv", "quicv2 hp"). Header protection is removed
  (AES-ECB of a 16-byte sample, RFC 9001 §5.4), the packet number recovered (RFC 9000
  §A.3) and the payload opened with AES-128-GCM; `cryptography` does the AES.
- Versions: v1 (0x00000001), v2 (0x6b3343cf, its own salt, labels and long-header type
  bits, RFC 9369 §3.2) and drafts 29-34 (0xff00001d-0xff000022; drafts 29-32 use the
  draft-29 salt, 33 and 34 already the RFC 9001 one). Other versions (Google QUIC,
  greasing) are counted, not opened.
- Frames allowed in an Initial (RFC 9000 §12.4): PADDING, PING, ACK, CRYPTO and
  CONNECTION_CLOSE. CRYPTO data is reassembled per direction by offset, across packets
  and out of order (Chromium scatters its ClientHello over frames in random order), up
  to MAX_CRYPTO bytes. The client's handshake stream starts with the ClientHello, the
  server's with the ServerHello; both are parsed by sensor/l7/tls.py and fingerprinted by
  sensor/l7/fingerprints.py (JA4 in its QUIC form "q", JA3, JA3S).
- Keys follow the connection IDs: every Initial, in both directions, uses keys from the
  DCID of the client's first Initial (RFC 9001 §5.2), even after the client has switched
  to the server's connection ID. After a Retry (RFC 9000 §17.2.5) the client's next
  Initial goes to the Retry's SCID and the keys derive from that. A Version Negotiation
  packet (§17.2.1) is noted (the versions it offers) and the handshake starts over.
  Under compatible version negotiation (RFC 9368) the server's Initial may be of
  another version than the client's: keys are per version.
- One event per connection, at the ServerHello (or at the first 1-RTT packet, or at the
  end of the flow, with whatever is known). The parser is then DONE and the engine stops
  copying the flow. Handshake and 0-RTT packets are skipped by their Length (their keys
  are secret).

Bad input. A first datagram that is not QUIC at all is an ERROR; a short-header packet
before any Initial (a capture that starts mid-connection) ends the parser quietly (DONE,
no event). Packets that do not open (another connection's, a corrupted one) are counted.
A packet that opens is authentic, so a ClientHello in it that does not parse, or a
frame type an Initial may not carry, is an ERROR.
"""

from __future__ import annotations

import hmac
import re
from collections import OrderedDict, deque
from dataclasses import dataclass

from sensor.l7 import fingerprints as fp
from sensor.l7 import tls
from sensor.l7.base import NEED_DATA, Direction, ParserState, Transaction, _NeedData
from sensor.l7.registry import Filter, Protocol, ZeekLog

_OK, _DONE, _ERROR = ParserState.OK, ParserState.DONE, ParserState.ERROR
_TO_SERVER, _TO_CLIENT = Direction.TO_SERVER, Direction.TO_CLIENT

APP_PROTO = "quic"
PORTS = (443,)

V1 = 0x00000001
V2 = 0x6B3343CF
DRAFTS = tuple(range(0xFF00001D, 0xFF000023))   # draft-29 .. draft-34
VERSIONS = frozenset((V1, V2, *DRAFTS))

_SALT_V1 = bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a")        # RFC 9001 §5.2
_SALT_V2 = bytes.fromhex("0dede3def700a6db819381be6e269dcbf9bd2ed9")        # RFC 9369 §3.3.1
_SALT_DRAFT29 = bytes.fromhex("afbfec289993d24c9e9786f19c6111e04390a899")   # drafts 29-32

# Long-header packet types (RFC 9000 §17.2; v2 renumbers them, RFC 9369 §3.2).
INITIAL, ZERO_RTT, HANDSHAKE, RETRY = range(4)
_TYPES_V2 = (RETRY, INITIAL, ZERO_RTT, HANDSHAKE)   # v2 type bits -> packet type

# The client's and server's handshake streams in the Initial space hold one or two
# hellos (a HelloRetryRequest adds a second ClientHello). Real ClientHellos stay under
# 4 KiB even with post-quantum key shares; 64 KiB of stream bounds the reassembly buffer
# per direction, and data past it is dropped (the event is marked truncated).
MAX_CRYPTO = 64 * 1024
# Disjoint pieces of the stream held while waiting for the bytes between them. Chromium
# splits its hello into a dozen pieces; more than this is not a client but an attack on
# the reassembly, and the rest of the stream is dropped (truncated).
MAX_RANGES = 64
# Datagrams looked at before the parser gives up on seeing the hellos: a handshake takes
# a few; a flow that has not shown them by then is not going to (its Initials were lost).
MAX_DATAGRAMS = 64
# Keys derived per flow (per version and connection ID): the first Initial, a Retry, a
# version change; anything beyond is another connection's packets.
MAX_KEYS = 4
MAX_REASON = 256       # CONNECTION_CLOSE reason phrase kept
MAX_CID = 20           # RFC 9000 §17.2: v1 connection IDs are at most 20 bytes
MAX_VN_VERSIONS = 16   # versions kept from a Version Negotiation packet
# The smallest datagram a client may send an Initial in (RFC 9000 §14.1).
MIN_CLIENT_DATAGRAM = 1200

_U64 = (1 << 64) - 1
_CLIENT_HELLO, _SERVER_HELLO = 1, 2   # handshake message types (RFC 8446 §4)
_NONZERO = re.compile(rb"[^\x00]")   # the end of a run of PADDING frames


class _Malformed(Exception):
    """Bytes that are not what QUIC allows; never escapes this module."""


@dataclass(frozen=True, slots=True, kw_only=True)
class QuicEvent:
    """One QUIC connection's handshake, as far as its Initial packets show it."""

    version: int = 0                  # QUIC version of the client's Initial
    server_version: int = 0           # of the server's Initial (RFC 9368 may change it)
    sni: str = ""
    alpn: tuple[str, ...] = ()        # offered by the client
    ja4: str = ""                     # JA4 with transport "q"
    ja3: str = ""
    extensions: tuple[str, ...] = ()  # ClientHello extension types in wire order, decimal
    tls_version: int = 0              # chosen by the server (0x0304)
    cipher: int = 0                   # chosen by the server
    ja3s: str = ""
    dcid: str = ""                    # hex: the client's first Initial's DCID (the keys')
    client_scid: str = ""
    server_scid: str = ""
    retry: bool = False               # the server sent a Retry
    server_versions: tuple[str, ...] = ()   # hex versions a Version Negotiation offered
    close_code: int = 0               # CONNECTION_CLOSE in an Initial: its error code
    close_reason: str = ""
    closed_by: str = ""               # "", "client" or "server"
    initial_packets: int = 0          # Initial packets opened
    undecryptable: int = 0            # Initial packets that did not open
    truncated: bool = False           # handshake stream past MAX_CRYPTO or MAX_RANGES
    latency_ns: int = 0               # client's first Initial -> server's first Initial

    def __post_init__(self) -> None:
        for name, limit in (("version", 0xFFFFFFFF), ("server_version", 0xFFFFFFFF),
                            ("tls_version", 0xFFFF), ("cipher", 0xFFFF),
                            ("close_code", _U64), ("initial_packets", _U64),
                            ("undecryptable", _U64), ("latency_ns", _U64)):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= limit:
                raise ValueError(f"{name}={value!r} is not an integer in 0..{limit}")
        for name in ("alpn", "extensions", "server_versions"):
            if not isinstance(getattr(self, name), tuple):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.closed_by not in ("", "client", "server"):
            raise ValueError(f"closed_by={self.closed_by!r} is not '', client or server")
        if len(self.close_reason) > MAX_REASON * 4 or len(self.dcid) > 2 * MAX_CID \
                or len(self.client_scid) > 2 * MAX_CID or len(self.server_scid) > 2 * MAX_CID \
                or len(self.server_versions) > MAX_VN_VERSIONS:
            raise ValueError("a QuicEvent field is longer than its bound")


def version_name(version: int) -> str:
    if version == V1:
        return "v1"
    if version == V2:
        return "v2"
    if 0xFF000000 < version <= 0xFF0000FF:
        return f"draft-{version & 0xFF}"
    return f"0x{version:08x}"


# -- keys (RFC 9001 §5.1-5.2, RFC 5869) ------------------------------------------------------

def _expand_label(secret: bytes, label: bytes, length: int) -> bytes:
    """HKDF-Expand-Label with SHA-256 and an empty context (RFC 8446 §7.1); every length
    here fits one SHA-256 block."""
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes((len(full),)) + full + b"\x00"
    return hmac.digest(secret, info + b"\x01", "sha256")[:length]


class _Keys:
    """One direction's Initial keys: the AEAD, its IV and the header-protection cipher."""

    __slots__ = ("aead", "iv", "hp")

    def __init__(self, secret: bytes, version: int) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        prefix = b"quicv2 " if version == V2 else b"quic "
        self.aead = AESGCM(_expand_label(secret, prefix + b"key", 16))
        self.iv = int.from_bytes(_expand_label(secret, prefix + b"iv", 12), "big")
        # ECB over one block is stateless, so one encryptor serves every sample.
        self.hp = Cipher(algorithms.AES(_expand_label(secret, prefix + b"hp", 16)),
                         modes.ECB()).encryptor()


def initial_keys(version: int, dcid: bytes) -> tuple[_Keys, _Keys]:
    """(client, server) Initial keys of a connection whose client's first Initial went
    to `dcid`."""
    salt = _SALT_V2 if version == V2 else \
        _SALT_DRAFT29 if 0xFF00001D <= version <= 0xFF000020 else _SALT_V1
    prk = hmac.digest(salt, dcid, "sha256")
    return (_Keys(_expand_label(prk, b"client in", 32), version),
            _Keys(_expand_label(prk, b"server in", 32), version))


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """A QUIC variable-length integer (RFC 9000 §16) at pos: (value, next pos)."""
    if pos >= end:
        raise _Malformed("varint past the end")
    first = data[pos]
    size = 1 << (first >> 6)
    if pos + size > end:
        raise _Malformed("varint past the end")
    if size == 1:
        return first, pos + 1
    return int.from_bytes(data[pos:pos + size], "big") & ((1 << (8 * size - 2)) - 1), pos + size


def packet_type(first: int, version: int) -> int:
    bits = (first >> 4) & 3
    return _TYPES_V2[bits] if version == V2 else bits


# -- detection -------------------------------------------------------------------------------

def looks_like(first: bytes, direction: Direction) -> bool:
    """A datagram that starts with an Initial of a version Loupe opens: long header with
    the fixed bit (RFC 9000 §17.2), a known version, the Initial type, connection IDs of
    at most 20 bytes (the client's first DCID at least 8, §7.2), a token and Length that
    fit in the datagram, and from a client at least 1200 bytes (§14.1). DNS fails on the
    version alone (v1 would put 256 or more questions in its header)."""
    n = len(first)
    if n < 7 or first[0] & 0xC0 != 0xC0:
        return False
    version = int.from_bytes(first[1:5], "big")
    if version not in VERSIONS or packet_type(first[0], version) != INITIAL:
        return False
    client = direction == _TO_SERVER
    if client and n < MIN_CLIENT_DATAGRAM:
        return False
    dcil = first[5]
    if dcil > MAX_CID or (client and dcil < 8):
        return False
    pos = 6 + dcil
    if pos >= n or first[pos] > MAX_CID:
        return False
    pos += 1 + first[pos]
    try:
        token, pos = _varint(first, pos, n)
        pos += token
        length, pos = _varint(first, pos, n)
    except _Malformed:
        return False
    # Length covers the packet number (1-4 bytes), the payload and the 16-byte tag, and
    # header protection samples 16 bytes from 4 after the packet number's start.
    return 20 <= length <= n - pos


SIGNATURE = looks_like


# -- the handshake stream ------------------------------------------------------------------------

class _Crypto:
    """One direction's CRYPTO stream in the Initial space, reassembled by offset."""

    __slots__ = ("buf", "ranges", "truncated", "used")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.ranges: list[list[int]] = []   # sorted, disjoint [start, end) pieces held
        self.truncated = False
        self.used = 0                        # bytes of whole messages already parsed

    def add(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        if end > MAX_CRYPTO:
            self.truncated = True
            if offset >= MAX_CRYPTO:
                return
            data = data[:MAX_CRYPTO - offset]
            end = MAX_CRYPTO
        if end <= self.used or not data:
            return   # a retransmission of what was parsed already
        buf = self.buf
        if len(buf) < end:
            buf.extend(bytes(end - len(buf)))
        buf[offset:end] = data
        ranges = self.ranges
        i = 0
        while i < len(ranges) and ranges[i][1] < offset:
            i += 1
        j = i
        while j < len(ranges) and ranges[j][0] <= end:
            offset = min(offset, ranges[j][0])
            end = max(end, ranges[j][1])
            j += 1
        ranges[i:j] = [[offset, end]]
        if len(ranges) > MAX_RANGES:
            self.truncated = True
            del ranges[MAX_RANGES:]

    def message(self) -> tuple[int, bytes] | None:
        """The next whole handshake message (type, body), or None until it is all here."""
        ranges = self.ranges
        if not ranges or ranges[0][0] > self.used:
            return None
        have = ranges[0][1]
        pos = self.used
        if have - pos < 4:
            return None
        buf = self.buf
        length = int.from_bytes(buf[pos + 1:pos + 4], "big")
        if pos + 4 + length > MAX_CRYPTO:
            self.truncated = True
            return None
        if have < pos + 4 + length:
            return None
        self.used = pos + 4 + length
        return buf[pos], bytes(buf[pos + 4:self.used])

    def reset(self) -> None:
        self.buf.clear()
        self.ranges.clear()
        self.used = 0


# -- the parser ------------------------------------------------------------------------------

class QuicParser:
    """One UDP flow's QUIC handshake. See the module docstring for the strategy."""

    name = APP_PROTO

    def __init__(self) -> None:
        self.state = _OK
        self.error = ""
        self.datagrams = 0
        self.unknown_versions = 0     # long-header packets of versions not opened
        self.skipped_packets = 0      # Handshake, 0-RTT and 1-RTT packets (not opened)
        self.client_hello: fp.ClientHello | None = None
        self.server_hello: fp.ServerHello | None = None
        self.hello_retries = 0
        self._keys: OrderedDict[tuple[int, bytes], tuple[_Keys, _Keys]] = OrderedDict()
        self._odcid: bytes | None = None     # the DCID the Initial keys derive from
        self._largest = [-1, -1]             # largest Initial packet number per direction
        self._crypto = (_Crypto(), _Crypto())
        self._seen_initial = False
        self._events: deque[Transaction] = deque()
        self._emitted = False
        self._summary: dict[str, str] = {}
        self._f: dict = {}                   # QuicEvent fields known so far
        self._opened = 0
        self._undecryptable = 0
        self._client_ts = 0
        self._server_ts = 0
        self._ts = 0                         # time of the datagram being read

    # -- the L7Parser contract -------------------------------------------------------------

    def receive_data(self, direction: Direction, data: bytes, ts_ns: int) -> None:
        if self.state is _OK:
            self._fail("QUIC runs over UDP, not a byte stream")

    def receive_datagram(self, direction: Direction, data: bytes, ts_ns: int) -> None:
        if self.state is not _OK:
            return
        self.datagrams += 1
        try:
            self._datagram(direction, bytes(data), ts_ns)
        except _Malformed as exc:
            if not self._seen_initial:
                self._fail(f"not QUIC: {exc}")
            # Later, a broken packet among good ones is only not parsed (counted).
            else:
                self._undecryptable += 1
        if self.state is _OK and self.datagrams >= MAX_DATAGRAMS:
            self._finish()

    def receive_gap(self, direction: Direction, length: int, ts_ns: int) -> None:
        """Datagrams have no stream offsets; a lost one is simply never seen."""

    def receive_skip(self, direction: Direction, length: int, ts_ns: int) -> None:
        """skip_hint is always 0: nothing is skipped on request."""

    def receive_eof(self, direction: Direction, ts_ns: int) -> None:
        if self.state is _OK:
            self._finish()

    def skip_hint(self, direction: Direction) -> int:
        return 0

    def next_event(self) -> Transaction | _NeedData:
        return self._events.popleft() if self._events else NEED_DATA

    def summary(self) -> dict[str, str]:
        return dict(self._summary)

    # -- packets ---------------------------------------------------------------------------

    def _datagram(self, direction: Direction, data: bytes, ts_ns: int) -> None:
        pos, n = 0, len(data)
        self._ts = ts_ns
        while pos < n and self.state is _OK:
            first = data[pos]
            if not first & 0x80:
                if pos:
                    # After long-header packets: a coalesced 1-RTT packet, or the zero
                    # bytes some stacks (aioquic) pad a datagram with. Neither is read.
                    return
                # A datagram of a short header (1-RTT): the Initial exchange is over, or
                # this capture started after it.
                if not first & 0x40 and not self._seen_initial:
                    raise _Malformed(f"first byte 0x{first:02x} has neither the long-header "
                                     "nor the fixed bit")
                self.skipped_packets += 1
                if self._seen_initial:
                    self._finish()
                else:
                    self._done()
                return
            if n - pos < 7:
                raise _Malformed("long header cut short")
            version = int.from_bytes(data[pos + 1:pos + 5], "big")
            dcil = data[pos + 5]
            if version == 0:
                if direction != _TO_CLIENT:
                    raise _Malformed("Version Negotiation from the client")
                self._version_negotiation(data, pos, dcil)
                return
            if version not in VERSIONS:
                self.unknown_versions += 1
                if not self._seen_initial:
                    raise _Malformed(f"version 0x{version:08x} is not one Loupe opens")
                return
            # The fixed bit (0x40) is not checked: a peer may grease it (RFC 9287), as
            # the server of ndpi/quic-v2 does in its very first Initial.
            if dcil > MAX_CID:
                raise _Malformed(f"DCID of {dcil} bytes")
            p = pos + 6
            dcid = data[p:p + dcil]
            p += dcil
            if p >= n or data[p] > MAX_CID:
                raise _Malformed("SCID length past the end or over 20")
            scil = data[p]
            scid = data[p + 1:p + 1 + scil]
            p += 1 + scil
            if p > n:
                raise _Malformed("SCID past the end")
            kind = packet_type(first, version)
            if kind == RETRY:
                self._retry(direction, scid, data, p)
                return
            if kind == INITIAL:
                token, p = _varint(data, p, n)
                p += token
            length, p = _varint(data, p, n)
            end = p + length
            if end > n:
                raise _Malformed("packet Length past the end of the datagram")
            if kind == INITIAL:
                self._initial(direction, version, first, data, pos, p, end, dcid, scid, ts_ns)
            else:
                self.skipped_packets += 1
            pos = end

    def _version_negotiation(self, data: bytes, pos: int, dcil: int) -> None:
        p = pos + 6 + dcil
        if p >= len(data):
            raise _Malformed("Version Negotiation cut short")
        p += 1 + data[p]
        offered = [data[i:i + 4].hex() for i in range(p, len(data) - 3, 4)]
        if not offered:
            raise _Malformed("Version Negotiation without versions")
        self._f["server_versions"] = tuple(offered[:MAX_VN_VERSIONS])
        self._seen_initial = True
        # The client starts over, possibly with another version and ClientHello: what
        # the refused attempt showed is not the connection's handshake.
        self._odcid = None
        self._largest = [-1, -1]
        self._client_ts = 0
        for name in ("version", "dcid", "client_scid", "sni", "alpn", "ja4", "ja3",
                     "extensions"):
            self._f.pop(name, None)
        self.client_hello = None
        self._crypto[0].reset()
        self._summary.clear()

    def _retry(self, direction: Direction, scid: bytes, data: bytes, p: int) -> None:
        if direction != _TO_CLIENT or len(data) - p < 16:
            raise _Malformed("Retry from the client or without its integrity tag")
        self._f["retry"] = True
        self._f["server_scid"] = scid.hex()
        self._seen_initial = True
        if not self._server_ts:
            self._server_ts = self._ts
        # The client's next Initial goes to this SCID, and its keys derive from it.
        self._odcid = scid

    def _keys_for(self, version: int, dcid: bytes) -> tuple[_Keys, _Keys]:
        key = (version, dcid)
        keys = self._keys.get(key)
        if keys is None:
            keys = self._keys[key] = initial_keys(version, dcid)
            if len(self._keys) > MAX_KEYS:
                self._keys.popitem(last=False)
        return keys

    def _initial(self, direction: Direction, version: int, first: int, data: bytes, pos: int,
                 pn_off: int, end: int, dcid: bytes, scid: bytes, ts_ns: int) -> None:
        if end - pn_off < 20:
            raise _Malformed("Initial too short for its sample and tag")
        client = direction == _TO_SERVER
        candidates = []
        if self._odcid is not None:
            candidates.append(self._odcid)
        if client and dcid != self._odcid and (self._odcid is None or not self._opened):
            # The first Initial seen, or one that did not open with what came before (a
            # capture that missed the first Initial or a Retry).
            candidates.append(dcid)
        payload = None
        for cand in candidates:
            keys = self._keys_for(version, cand)[0 if client else 1]
            payload = self._open(keys, direction, first, data, pos, pn_off, end)
            if payload is not None:
                self._odcid = cand
                break
        if payload is None:
            self._undecryptable += 1
            return
        self._opened += 1
        self._seen_initial = True
        f = self._f
        if client:
            if not self._client_ts:
                self._client_ts = ts_ns
                f["version"] = version
                f["dcid"] = self._odcid.hex()
                f["client_scid"] = scid.hex()
        else:
            if not f.get("server_version"):
                f["server_version"] = version
                f["server_scid"] = scid.hex()
            if not self._server_ts:
                self._server_ts = ts_ns
        self._frames(direction, payload, ts_ns)

    def _open(self, keys: _Keys, direction: Direction, first: int, data: bytes, pos: int,
              pn_off: int, end: int) -> bytes | None:
        """Remove header protection and open the payload; None when it does not open."""
        mask = keys.hp.update(data[pn_off + 4:pn_off + 20])
        first ^= mask[0] & 0x0F
        pn_len = (first & 3) + 1
        truncated = int.from_bytes(data[pn_off:pn_off + pn_len], "big") ^ \
            int.from_bytes(mask[1:1 + pn_len], "big")
        # RFC 9000 §A.3: the full packet number nearest the next expected one.
        expected = self._largest[direction] + 1
        win = 1 << (8 * pn_len)
        pn = (expected & ~(win - 1)) | truncated
        if pn <= expected - win // 2 and pn < (1 << 62) - win:
            pn += win
        elif pn > expected + win // 2 and pn >= win:
            pn -= win
        header = bytes((first,)) + data[pos + 1:pn_off] + truncated.to_bytes(pn_len, "big")
        nonce = (keys.iv ^ pn).to_bytes(12, "big")
        from cryptography.exceptions import InvalidTag

        try:
            payload = keys.aead.decrypt(nonce, data[pn_off + pn_len:end], header)
        except InvalidTag:
            return None
        if pn > self._largest[direction]:
            self._largest[direction] = pn
        return payload

    def _frames(self, direction: Direction, p: bytes, ts_ns: int) -> None:
        i, n = 0, len(p)
        crypto = self._crypto[direction]
        got_crypto = False
        while i < n:
            t = p[i]
            if t == 0x00:   # PADDING, often hundreds of bytes of it
                m = _NONZERO.search(p, i)
                i = m.start() if m else n
            elif t == 0x01:  # PING
                i += 1
            elif t in (0x02, 0x03):   # ACK (RFC 9000 §19.3)
                _, i = _varint(p, i + 1, n)      # largest acknowledged
                _, i = _varint(p, i, n)          # delay
                count, i = _varint(p, i, n)
                if count > n:
                    raise _Malformed("ACK range count past the packet")
                _, i = _varint(p, i, n)          # first range
                for _ in range(2 * count + (3 if t == 0x03 else 0)):
                    _, i = _varint(p, i, n)
            elif t == 0x06:   # CRYPTO (§19.6)
                offset, i = _varint(p, i + 1, n)
                length, i = _varint(p, i, n)
                if i + length > n:
                    raise _Malformed("CRYPTO frame past the packet")
                crypto.add(offset, p[i:i + length])
                i += length
                got_crypto = True
            elif t in (0x1C, 0x1D):   # CONNECTION_CLOSE (§19.19)
                code, i = _varint(p, i + 1, n)
                if t == 0x1C:
                    _, i = _varint(p, i, n)      # the frame type that caused it
                length, i = _varint(p, i, n)
                if i + length > n:
                    raise _Malformed("CONNECTION_CLOSE reason past the packet")
                f = self._f
                f["close_code"] = code
                f["close_reason"] = p[i:i + min(length, MAX_REASON)].decode("utf-8", "replace")
                f["closed_by"] = "client" if direction == _TO_SERVER else "server"
                i += length
                self._finish()
                return
            else:
                self._fail(f"frame type 0x{t:02x} in an Initial packet")
                return
        if got_crypto:
            self._hellos(direction, crypto, ts_ns)

    def _hellos(self, direction: Direction, crypto: _Crypto, ts_ns: int) -> None:
        while self.state is _OK:
            msg = crypto.message()
            if msg is None:
                return
            msg_type, body = msg
            try:
                if direction == _TO_SERVER:
                    if msg_type != _CLIENT_HELLO:
                        self._fail(f"client's Initial starts with handshake type {msg_type}")
                        return
                    if self.client_hello is None:
                        self._client_hello(tls.parse_client_hello(body), ts_ns)
                    # A second ClientHello (after a HelloRetryRequest) is not fingerprinted.
                else:
                    if msg_type != _SERVER_HELLO:
                        self._fail(f"server's Initial starts with handshake type {msg_type}")
                        return
                    hello = tls.parse_server_hello(body)
                    if hello.hello_retry:
                        self.hello_retries += 1
                        continue
                    self.server_hello = hello
                    self._finish()
                    return
            except tls.Malformed as exc:
                self._fail(f"malformed hello in an Initial: {exc}")
                return

    def _client_hello(self, hello: fp.ClientHello, ts_ns: int) -> None:
        self.client_hello = hello
        ja4 = fp.ja4(hello, "q")
        if hello.sni:
            self._summary["tls_sni"] = hello.sni
        self._summary["tls_ja4"] = ja4
        self._f.update(sni=hello.sni, alpn=tuple(_text(a) for a in hello.alpn), ja4=ja4,
                       ja3=fp.ja3(hello), extensions=tuple(str(e) for e in hello.extensions))

    # -- outcome ---------------------------------------------------------------------------

    def _finish(self) -> None:
        self._emit()
        self._done()

    def _done(self) -> None:
        if self.state is _OK:
            self.state = _DONE
        self._release()

    def _fail(self, reason: str) -> None:
        self._emit()
        self.state = _ERROR
        self.error = reason
        self._release()

    def _release(self) -> None:
        for c in self._crypto:
            c.reset()
        self._keys.clear()

    def _emit(self) -> None:
        if self._emitted or not self._opened and "server_versions" not in self._f \
                and "retry" not in self._f:
            return
        self._emitted = True
        f = dict(self._f)
        sh = self.server_hello
        if sh is not None:
            f.update(tls_version=sh.version, cipher=sh.cipher, ja3s=fp.ja3s(sh))
        f["initial_packets"] = self._opened
        f["undecryptable"] = self._undecryptable
        f["truncated"] = self._crypto[0].truncated or self._crypto[1].truncated
        start = self._client_ts
        if start and self._server_ts >= start:
            f["latency_ns"] = self._server_ts - start
        ts = start or self._server_ts or self._ts
        self._events.append(Transaction(ts_ns=ts, detail=QuicEvent(**f)))


def _text(raw: bytes) -> str:
    return raw.decode("ascii", "backslashreplace")


# -- registration (sensor/l7/registry.py) ------------------------------------------------------

def table_line(d: QuicEvent) -> list[tuple[str, str | None]]:
    from sensor.export.table import duration  # rendering only; not needed to parse

    out: list[tuple[str, str | None]] = [(f"QUIC {version_name(d.version)}", None),
                                         (f"sni={d.sni or '-'}", None)]
    if d.alpn:
        out.append((f"alpn={','.join(d.alpn)}", None))
    if d.retry:
        out.append(("retry", "yellow"))
    if d.server_versions:
        out.append((f"vn={','.join(d.server_versions)}", "yellow"))
    if d.closed_by:
        out.append((f"closed by {d.closed_by} 0x{d.close_code:x} {d.close_reason}".rstrip(),
                    "red"))
    if d.latency_ns:
        out.append((duration(d.latency_ns), None))
    if d.ja4:
        out.append((f"ja4={d.ja4}", "dim"))
    return out


def eve(d: QuicEvent) -> dict:
    """Suricata's EVE quic object (version, sni, ja3, ja4, extensions by wire position)."""
    out: dict = {"version": f"{d.version:x}", "sni": d.sni or None, "ja4": d.ja4 or None}
    if d.ja3:
        out["ja3"] = {"hash": d.ja3}
    if d.ja3s:
        out["ja3s"] = {"hash": d.ja3s}
    exts = []
    for ext in d.extensions:
        entry: dict = {"type": int(ext)}
        if ext == "0":
            entry.update(name="server_name", values=[d.sni])
        elif ext == "16":
            entry.update(name="alpn", values=list(d.alpn))
        exts.append(entry)
    if exts:
        out["extensions"] = exts
    return {k: v for k, v in out.items() if v is not None}


def _zeek_version(version: int) -> str:
    # Zeek's quic.log names: "1" for v1, "quicv2", "draft-NN", else unknown-<hex>.
    if version == V1:
        return "1"
    if version == V2:
        return "quicv2"
    name = version_name(version)
    return name if name.startswith("draft-") else f"unknown-{version:x}"


def _zeek(e) -> list:
    d = e.detail
    return [_zeek_version(d.version) if d.version else None, d.dcid or None,
            d.client_scid or None, d.server_scid or None, d.sni or None,
            d.alpn[0] if d.alpn else None]


# Zeek's quic.log columns Loupe has values for, in Zeek's order (its history column is
# a per-packet letter string Loupe does not keep).
ZEEK = ZeekLog(path="quic", values=_zeek, columns=(
    ("version", "string"), ("client_initial_dcid", "string"), ("client_scid", "string"),
    ("server_scid", "string"), ("server_name", "string"), ("client_protocol", "string")))


def _kernel_words() -> tuple[tuple[int, int, int], ...]:
    """The kernel sniffer's share of looks_like: long header, fixed bit and the Initial
    type bits (v2: 01) in the first byte, then the version, in a client datagram of at
    least 1200 bytes; the connection ID lengths are left to userspace."""
    return tuple((0xF0FFFFFFFF000000, (0xD0 if v == V2 else 0xC0) << 56 | v << 24,
                  MIN_CLIENT_DATAGRAM) for v in sorted(VERSIONS))


PROTOCOL = Protocol(
    name=APP_PROTO, event=QuicEvent, parser=QuicParser, udp_ports=PORTS,
    datagram_signature=looks_like, kernel_datagram_words=_kernel_words(), priority=12,
    # QUIC carries TLS 1.3: its server name and JA4 fill the Flow's TLS summary fields.
    summary=("tls_sni", "tls_ja4"),
    column_types={"version": "u32", "server_version": "u32", "tls_version": "u16",
                  "cipher": "u16"},
    line=table_line, listing=4, style="green", eve=eve, zeek=ZEEK,
    # TLS's criteria, declared again: `tail --tls-sni` and `--ja4` match QUIC handshakes
    # as they match TLS ones (collector/filters.py joins protocols declaring one name).
    filters=(
        Filter(name="tls_sni", field="sni", match="glob", flow_field="tls_sni",
               help="server name glob"),
        Filter(name="tls_ja4", field="ja4", match="exact", flow_field="tls_ja4", flag="ja4",
               help="JA4 client fingerprint"),
    ),
)
