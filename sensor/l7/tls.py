"""TLS handshake parser: ClientHello/ServerHello fields, JA3/JA3S/JA4, leaf certificate.

Strategy. Each direction has two buffers: record bytes until a whole TLSPlaintext record
(RFC 8446 5.1, RFC 5246 6.2) is there, and handshake bytes until a whole handshake
message is there, because one message may span records and one record may hold several
messages. Only handshake, change_cipher_spec, alert and application_data records matter,
change_cipher_spec and application_data only by their header (ciphertext is never
buffered):

- ClientHello (either direction, so mid-flow pickup with a swapped initiator still
  works): fields and fingerprints. A second ClientHello after a HelloRetryRequest does
  not replace the first (JA4 is defined on the first hello).
- ServerHello: negotiated version (supported_versions wins over legacy_version),
  cipher, ALPN when sent in the clear (TLS <= 1.2; in TLS 1.3 it moves into the
  encrypted EncryptedExtensions and is invisible). TLS 1.3: everything after is
  encrypted, so the event is emitted and the parser is DONE.
- TLS <= 1.2: the server's Certificate message is in the clear; the leaf's subject,
  issuer, SAN and validity go into the event, which is emitted at the Certificate (or
  at ServerHelloDone / the server's ChangeCipherSpec when no certificate is sent, as in
  session resumption). The rest of the chain is walked (counted in `chain_certs`) and,
  for callers that ask (`TlsParser(chain=True)`), parsed certificate by certificate.
- Client certificates (mutual TLS), TLS <= 1.2 only. The server's CertificateRequest
  (RFC 5246 7.4.4) and the client's Certificate (7.4.6) are in the clear, so the parse
  goes on after the event to ServerHelloDone (same flight as the server's Certificate,
  usually the same segment), and when a certificate was requested to the client's
  Certificate (its next flight, the only extra bytes copied). The flow's l7_summary gets
  `tls_client_cert`: "requested" (asked for, none sent: an empty certificate_list, or
  SSLv3's no_certificate alert) or "sent" (a non-empty certificate_list); absent when
  none was requested or the version hides it. client_auth() gives the fact and a salted
  hash of the leaf's subject (sensor/l7/principal.py) to the TLS plaintext stage, which
  marks every HTTP request of the connection `mtls`. TLS 1.3 sends both messages
  encrypted (RFC 8446 4.3.2, 4.4.2), and TLS 1.2 renegotiation asks for a client
  certificate inside the encrypted session: neither can be seen on the wire.
- An alert before the handshake completes, or EOF of both directions, emits whatever is
  known.
- Bytes lost inside the handshake (a gap, a skip, a stream ending inside a record)
  end that direction only: what did arrive of it is read as far as it goes (a hello cut
  short is read like one cut at MAX_HANDSHAKE, so a short snap length still gives the
  SNI), and the other direction is still parsed. The parse then ends in ERROR (the
  loss is counted) once the event is out.

Once the event is out the parser is DONE and ignores all later bytes: the engine then
stops feeding it, and the kernel stops copying the flow, which is what keeps TLS cheap.

Size bounds: a record over MAX_RECORD is not TLS (ERROR). A handshake message is kept
up to MAX_HANDSHAKE bytes; past that its first MAX_HANDSHAKE bytes are used as far as
they go (the SNI and ALPN of a cut ClientHello, the version and cipher of a cut
ServerHello, the certificates that fit whole), its fingerprints are left empty (they
need the whole hello), the rest of it is dropped as it arrives, never buffered, and
counted in `truncated`; the messages after it are parsed as usual.

Bad input: a record header that is not TLS, a record over its bound, or a hello that
does not parse moves the parser to ERROR (anything already known is still emitted). An
SSLv2-compatible ClientHello (RFC 5246 appendix E.2) is counted in `unsupported` and the
parser goes DONE without an event.
"""

from __future__ import annotations

import functools
import struct
from collections import deque
from typing import TYPE_CHECKING

from sensor.l7 import fingerprints as fp
from sensor.l7.base import NEED_DATA, Direction, ParserState, Transaction, _NeedData
from sensor.l7.registry import Filter, Protocol, ZeekLog
from sensor.model import TlsEvent

# JA3, JA3S and JA4 are pure functions of a hello (and the transport), and clients repeat
# their hellos (one browser or library, many connections): a fingerprint costs tens of µs
# (filtering, sorting, formatting, a hash), hashing a parsed hello about one. Remembered
# per process, bounded (a hello's fields are at most a few KiB).
_ja3 = functools.lru_cache(maxsize=1024)(fp.ja3)
_ja3s = functools.lru_cache(maxsize=1024)(fp.ja3s)
_ja4 = functools.lru_cache(maxsize=1024)(fp.ja4)

if TYPE_CHECKING:
    from sensor.l7 import x509

# Enum members bound once: a class attribute lookup on an Enum costs several times a
# global's, and these are read on every call of the hot paths.
_OK, _DONE, _ERROR = ParserState.OK, ParserState.DONE, ParserState.ERROR
_TO_SERVER, _TO_CLIENT = Direction.TO_SERVER, Direction.TO_CLIENT

# RFC 5246 6.2.3: a TLSCiphertext fragment is at most 2^14 + 2048 bytes; anything longer
# is not TLS, and refusing it keeps the record buffer under 18.5 KB per direction.
MAX_RECORD = (1 << 14) + 2048

# One handshake message may be up to 2^24 - 1 bytes on paper. Real ClientHellos stay
# under 4 KB even with post-quantum key shares (X25519MLKEM768 alone is 1216 bytes) and
# ECH, and certificate chains under 20 KB; 64 KiB is three times the largest chains seen
# in practice and bounds the handshake buffer per direction. Of a longer message the
# first MAX_HANDSHAKE bytes are used and the rest is dropped unbuffered (`truncated`).
MAX_HANDSHAKE = 64 * 1024

# Certificates of one Certificate message kept when the chain is asked for
# (TlsParser(chain=True)). Real chains have 2-5, misconfigured servers send 10 or so;
# entries past this are counted in `chain_certs` but not parsed.
MAX_CHAIN = 16

_CHANGE_CIPHER_SPEC = 20
_ALERT = 21
_HANDSHAKE = 22
_APPLICATION_DATA = 23
_HEARTBEAT = 24

_CLIENT_HELLO = 1
_SERVER_HELLO = 2
_CERTIFICATE = 11
_CERTIFICATE_REQUEST = 13
_SERVER_HELLO_DONE = 14

_EXT_SNI = 0
_EXT_GROUPS = 10
_EXT_POINT_FORMATS = 11
_EXT_SIG_ALGS = 13
_EXT_ALPN = 16
_EXT_SUPPORTED_VERSIONS = 43

# RFC 8446 4.1.3: a ServerHello with this random is a HelloRetryRequest.
_HRR_RANDOM = bytes.fromhex(
    "cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c"
)


class _Malformed(Exception):
    """A hello whose structure does not add up; caught inside this module, and by
    quic.py, which parses the hellos QUIC carries with parse_client_hello/server_hello."""


Malformed = _Malformed


class _Reader:
    """Bounds-checked big-endian reads over one message body."""

    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, n: int) -> bytes:
        pos = self.pos
        if n > self.end - pos:
            raise _Malformed(f"need {n} bytes, {self.end - pos} left")
        self.pos = pos + n
        return self.data[pos:pos + n]

    def u8(self) -> int:
        pos = self.pos
        if pos >= self.end:
            raise _Malformed(f"need 1 bytes, {self.end - pos} left")
        self.pos = pos + 1
        return self.data[pos]

    def u16(self) -> int:
        pos = self.pos
        if pos + 2 > self.end:
            raise _Malformed(f"need 2 bytes, {self.end - pos} left")
        self.pos = pos + 2
        data = self.data
        return (data[pos] << 8) | data[pos + 1]

    def prefix(self, length_bytes: int) -> "_Reader":
        """A vector of a message cut at MAX_HANDSHAKE: as much of it as is there."""
        pos, end, data = self.pos, self.end, self.data
        if length_bytes > end - pos:
            raise _Malformed(f"need {length_bytes} bytes, {end - pos} left")
        n = int.from_bytes(data[pos:pos + length_bytes], "big")
        pos += length_bytes
        stop = min(pos + n, end)
        self.pos = stop
        return _Reader(data, pos, stop)

    def vec(self, length_bytes: int) -> "_Reader":
        # Inline reads of the length prefix: a ClientHello has a dozen or more vectors.
        pos, end, data = self.pos, self.end, self.data
        if length_bytes > end - pos:
            raise _Malformed(f"need {length_bytes} bytes, {end - pos} left")
        if length_bytes == 1:
            n = data[pos]
        elif length_bytes == 2:
            n = (data[pos] << 8) | data[pos + 1]
        else:
            n = int.from_bytes(data[pos:pos + length_bytes], "big")
        pos += length_bytes
        if n > end - pos:
            self.pos = pos
            raise _Malformed(f"vector of {n} bytes, {end - pos} left")
        self.pos = pos + n
        return _Reader(data, pos, pos + n)

    def u16_list(self, length_bytes: int) -> tuple[int, ...]:
        sub = self.vec(length_bytes)
        if sub.remaining() % 2:
            raise _Malformed("odd length in a list of 16-bit values")
        raw = sub.take(sub.remaining())
        return struct.unpack(f">{len(raw) // 2}H", raw)


def _text(raw: bytes) -> str:
    return raw.decode("ascii", "backslashreplace")


def parse_client_hello(body: bytes, *, truncated: bool = False) -> fp.ClientHello:
    """`truncated`: body is the first MAX_HANDSHAKE bytes of a longer message; what
    fits is read (ciphers, whole extensions) and the hello is marked truncated."""
    r = _Reader(body)
    legacy_version = r.u16()
    r.take(32)  # random
    r.vec(1)    # legacy_session_id
    fields: dict = {}
    extensions: list[int] = []
    ext_block: _Reader | None = None
    if truncated:
        ciphers: tuple[int, ...] = ()
        try:
            ciphers_r = r.prefix(2)
            raw = ciphers_r.take(ciphers_r.remaining() & ~1)
            ciphers = struct.unpack(f">{len(raw) // 2}H", raw)
            r.vec(1)    # legacy_compression_methods
            if r.remaining():
                ext_block = r.prefix(2)
        except _Malformed:
            pass        # the cut falls in these few bytes: no extension is whole
    else:
        ciphers = r.u16_list(2)
        r.vec(1)    # legacy_compression_methods
        if r.remaining():  # extensions are optional before TLS 1.2 (RFC 5246 7.4.1.2)
            ext_block = r.vec(2)
    if ext_block is not None:
        while ext_block.remaining():
            if truncated and ext_block.remaining() < 4:
                break
            ext_type = ext_block.u16()
            if truncated:
                try:
                    data = ext_block.vec(2)
                except _Malformed:
                    break  # the cut runs through this extension
            else:
                data = ext_block.vec(2)
            extensions.append(ext_type)
            try:
                _client_extension(ext_type, data, fields)
            except _Malformed:
                # A broken extension body still counts as present (JA3/JA4 list it); its
                # content is just not used.
                pass
    return fp.ClientHello(
        legacy_version=legacy_version, ciphers=ciphers, extensions=tuple(extensions),
        truncated=truncated, **fields
    )


def _client_extension(ext_type: int, data: _Reader, fields: dict) -> None:
    if ext_type == _EXT_SNI:
        fields["has_sni"] = True
        names = data.vec(2)
        while names.remaining():
            name_type = names.u8()
            name = names.vec(2)
            if name_type == 0 and "sni" not in fields:
                fields["sni"] = _text(name.take(name.remaining()))
    elif ext_type == _EXT_ALPN:
        protos = data.vec(2)
        out = []
        while protos.remaining():
            p = protos.vec(1)
            out.append(p.take(p.remaining()))
        fields["alpn"] = tuple(out)
    elif ext_type == _EXT_SUPPORTED_VERSIONS:
        fields["supported_versions"] = data.u16_list(1)
    elif ext_type == _EXT_SIG_ALGS:
        fields["signature_algorithms"] = data.u16_list(2)
    elif ext_type == _EXT_GROUPS:
        fields["groups"] = data.u16_list(2)
    elif ext_type == _EXT_POINT_FORMATS:
        formats = data.vec(1)
        fields["point_formats"] = tuple(formats.take(formats.remaining()))


def parse_server_hello(body: bytes, *, truncated: bool = False) -> fp.ServerHello:
    """`truncated` as for parse_client_hello."""
    r = _Reader(body)
    legacy_version = r.u16()
    random = r.take(32)
    r.vec(1)  # legacy_session_id_echo
    cipher = r.u16()
    r.u8()    # legacy_compression_method
    extensions: list[int] = []
    selected_version = 0
    alpn: bytes | None = None
    if r.remaining() >= (2 if truncated else 1):
        ext_block = r.prefix(2) if truncated else r.vec(2)
        while ext_block.remaining():
            if truncated and ext_block.remaining() < 4:
                break
            ext_type = ext_block.u16()
            if truncated:
                try:
                    data = ext_block.vec(2)
                except _Malformed:
                    break
            else:
                data = ext_block.vec(2)
            extensions.append(ext_type)
            try:
                if ext_type == _EXT_SUPPORTED_VERSIONS and data.remaining() == 2:
                    selected_version = data.u16()
                elif ext_type == _EXT_ALPN:
                    protos = data.vec(2)
                    chosen = protos.vec(1)
                    alpn = chosen.take(chosen.remaining())
            except _Malformed:
                pass
    return fp.ServerHello(
        legacy_version=legacy_version, cipher=cipher, extensions=tuple(extensions),
        selected_version=selected_version, alpn=alpn, hello_retry=random == _HRR_RANDOM,
        truncated=truncated,
    )


def parse_certificate_leaf(body: bytes) -> bytes | None:
    """The first (leaf) DER certificate of a TLS <= 1.2 Certificate message."""
    r = _Reader(body)
    chain = r.vec(3)
    if not chain.remaining():
        return None
    leaf = chain.vec(3)
    return leaf.take(leaf.remaining())


def parse_certificate_chain(body: bytes, *, truncated: bool = False,
                            keep: int = MAX_CHAIN) -> tuple[list[bytes], int]:
    """The DER certificates of a TLS <= 1.2 Certificate message (RFC 5246 7.4.2), leaf
    first: at most `keep` of them, and how many entries the message holds. Of a message
    cut at MAX_HANDSHAKE, the entries that fit whole."""
    r = _Reader(body)
    chain = r.prefix(3) if truncated else r.vec(3)
    out: list[bytes] = []
    count = 0
    while chain.remaining():
        try:
            entry = chain.vec(3)
        except _Malformed:
            # The cut of a truncated message, or a broken entry after the leaf: the
            # certificates before it still count (the leaf is what the event needs).
            if truncated or out:
                break
            raise
        count += 1
        if len(out) < keep:
            out.append(entry.take(entry.remaining()))
    return out, count


class _Side:
    """Per-direction buffers and what this direction has shown."""

    __slots__ = ("records", "records_ts", "handshake", "handshake_ts", "started", "encrypted",
                 "drop", "over")

    def __init__(self) -> None:
        self.records = bytearray()
        self.records_ts = 0
        self.handshake = bytearray()
        self.handshake_ts = 0
        self.started = False     # first record header checked
        self.encrypted = False   # sent ChangeCipherSpec/application data: opaque from here
        self.drop = 0            # bytes of a message past MAX_HANDSHAKE still to come
        self.over = False        # ended, or bytes went missing: nothing more is read


class TlsParser:
    """One TLS connection's handshake. See the module docstring for the strategy."""

    name = "tls"

    def __init__(self, *, transport: str = "t", chain: bool = False) -> None:
        self.state = _OK
        self.error = ""
        self.unsupported = 0        # SSLv2-compatible hellos seen (not parsed)
        self.cert_errors = 0        # Certificate messages whose leaf did not parse
        self.hello_retries = 0
        self.truncated = 0          # handshake messages cut at MAX_HANDSHAKE
        self.chain_certs = 0        # certificates in the server's Certificate message
        self.client_hello: fp.ClientHello | None = None
        self.server_hello: fp.ServerHello | None = None
        self.cert: x509.CertFields | None = None
        # chain=True: every certificate of the chain (up to MAX_CHAIN), leaf first, each
        # CertFields or None when it does not parse. Off by default: the record carries
        # the leaf only, and each further certificate costs ~40 us to read.
        self.chain: tuple[x509.CertFields | None, ...] = ()
        self._want_chain = chain
        self._lost = ""             # why a direction was given up (see _lose)
        self._transport = transport
        self._client_dir: Direction | None = None
        self._client_ts = 0
        self._server_ts = 0
        self._sides = (_Side(), _Side())
        self._events: deque[Transaction] = deque()
        self._emitted = False
        self._ja4 = ""
        self._summary: dict[str, str] = {}
        # Client certificate (TLS <= 1.2): the server asked for one / ended its flight
        # (ServerHelloDone) / the client sent a non-empty certificate_list, and the
        # salted hash of that leaf's subject ("" when it does not parse).
        self.cert_requested = False
        self._server_done = False
        self.client_cert = False
        self.client_principal = ""

    # --- the L7Parser contract -------------------------------------------------------

    def receive_data(self, direction: Direction, data: bytes, ts_ns: int) -> None:
        if self.state is not _OK or not data:
            return
        side = self._sides[direction]
        if side.encrypted or side.over:
            return
        if not side.records:
            side.records_ts = ts_ns
        side.records += data
        self._drain_records(direction, side, ts_ns)

    def receive_datagram(self, direction: Direction, data: bytes, ts_ns: int) -> None:
        if self.state is _OK:
            self._fail("TLS over a datagram transport is not supported (DTLS/QUIC)")

    def receive_gap(self, direction: Direction, length: int, ts_ns: int) -> None:
        side = self._sides[direction]
        if self.state is _OK and not side.encrypted and not side.over:
            self._lose(direction, side, f"{length} bytes missing inside the handshake")

    def receive_skip(self, direction: Direction, length: int, ts_ns: int) -> None:
        # skip_hint is always 0, so a skip means the engine stopped copying on its own;
        # inside the handshake that is lost data like a gap.
        self.receive_gap(direction, length, ts_ns)

    def receive_eof(self, direction: Direction, ts_ns: int) -> None:
        if self.state is not _OK:
            return
        side = self._sides[direction]
        if side.encrypted or side.over:
            return
        if side.records or side.handshake:
            self._lose(direction, side, "stream ended inside a TLS record or handshake message")
            return
        # The other direction may still be sending its part of the handshake (a half
        # close); the parse ends when it is over too.
        side.over = True
        other = self._sides[1 - direction]
        if other.over or other.encrypted:
            self._finish()

    def skip_hint(self, direction: Direction) -> int:
        return 0

    def next_event(self) -> Transaction | _NeedData:
        return self._events.popleft() if self._events else NEED_DATA

    def summary(self) -> dict[str, str]:
        return dict(self._summary)

    def client_auth(self) -> tuple[bool, str] | None:
        """(a client certificate was sent, salted hash of its subject or "") once the
        handshake has shown whether one was; None while that is still open. (False, "")
        also when it cannot be seen (TLS 1.3, lost bytes): no claim either way."""
        if self.client_cert:
            return True, self.client_principal
        return None if self.state is _OK else (False, "")

    # --- records ---------------------------------------------------------------------

    def _drain_records(self, direction: Direction, side: _Side, ts_ns: int) -> None:
        buf = side.records
        while len(buf) >= 5 and self.state is _OK and not side.encrypted:
            if not side.started:
                if buf[0] & 0x80 and buf[2] == _CLIENT_HELLO:
                    # SSLv2 record header (2 bytes, high bit set) carrying a v2
                    # CLIENT-HELLO: a legacy format we do not fingerprint.
                    self.unsupported += 1
                    self._done()
                    return
                side.started = True
            ctype = buf[0]
            if not (_CHANGE_CIPHER_SPEC <= ctype <= _HEARTBEAT) or buf[1] != 3:
                self._fail(f"not a TLS record header: {bytes(buf[:5]).hex()}")
                return
            length = (buf[3] << 8) | buf[4]
            if length > MAX_RECORD:
                self._fail(f"TLS record of {length} bytes exceeds {MAX_RECORD}")
                return
            if ctype == _CHANGE_CIPHER_SPEC and self.hello_retries and \
                    self.server_hello is None:
                # RFC 8446 D.4: the compatibility CCS right after a HelloRetryRequest
                # (and the client's before its second hello); the handshake goes on in
                # the clear, the real ServerHello follows.
                if len(buf) < 5 + length:
                    return
                del buf[:5 + length]
                side.records_ts = ts_ns
                continue
            if ctype == _CHANGE_CIPHER_SPEC or ctype == _APPLICATION_DATA:
                # The header alone says this direction is encrypted from here: act on
                # it now rather than buffer up to 18 KB of ciphertext nobody reads.
                self._record(direction, side, ctype, b"", side.records_ts)
                return
            if len(buf) < 5 + length:
                return
            record_ts = side.records_ts
            fragment = bytes(buf[5:5 + length])
            del buf[:5 + length]
            # Whatever follows arrived in this call at the latest.
            side.records_ts = ts_ns
            self._record(direction, side, ctype, fragment, record_ts)

    def _record(self, direction: Direction, side: _Side, ctype: int, fragment: bytes,
                ts_ns: int) -> None:
        if ctype == _HANDSHAKE:
            if not side.handshake:
                side.handshake_ts = ts_ns
            side.handshake += fragment
            self._drain_handshake(direction, side)
        elif ctype in (_CHANGE_CIPHER_SPEC, _APPLICATION_DATA):
            # From here this direction is encrypted. The server going encrypted ends the
            # handshake (TLS <= 1.2 resumption); a client may go first (TLS 1.3 early
            # data, middlebox-compatibility CCS), so the server is still awaited.
            side.encrypted = True
            side.records.clear()
            side.handshake.clear()
            if direction != self._client_dir or self._server_done:
                # The client's encrypted Finished also ends a wait for its
                # Certificate (RFC 5246 7.4.6: it comes first in that flight).
                self._finish()
        elif ctype == _ALERT:
            # A cleartext alert before the event means the handshake failed or was cut.
            self._finish()

    # --- handshake messages ----------------------------------------------------------

    def _drain_handshake(self, direction: Direction, side: _Side) -> None:
        buf = side.handshake
        while self.state is _OK:
            if side.drop:
                # The tail of a message past MAX_HANDSHAKE: dropped as it comes.
                n = min(side.drop, len(buf))
                del buf[:n]
                side.drop -= n
                if side.drop:
                    return
            if len(buf) < 4:
                return
            msg_type = buf[0]
            length = (buf[1] << 16) | (buf[2] << 8) | buf[3]
            kept = min(length, MAX_HANDSHAKE)
            if len(buf) < 4 + kept:
                return
            body = bytes(buf[4:4 + kept])
            del buf[:4 + kept]
            cut = length > kept
            if cut:
                side.drop = length - kept
                self.truncated += 1
            msg_ts = side.handshake_ts
            try:
                self._message(direction, msg_type, body, msg_ts, cut)
            except _Malformed as exc:
                self._fail(f"malformed handshake message type {msg_type}: {exc}")
                return

    def _message(self, direction: Direction, msg_type: int, body: bytes, ts_ns: int,
                 cut: bool = False) -> None:
        if msg_type == _CLIENT_HELLO:
            if self.client_hello is None:
                self.client_hello = parse_client_hello(body, truncated=cut)
                self._client_dir = direction
                self._client_ts = ts_ns
                if self.client_hello.sni:
                    self._summary["tls_sni"] = self.client_hello.sni
                if not cut:  # a fingerprint of part of a hello would match nothing
                    self._ja4 = _ja4(self.client_hello, self._transport)
                    self._summary["tls_ja4"] = self._ja4
        elif msg_type == _SERVER_HELLO:
            hello = parse_server_hello(body, truncated=cut)
            if hello.hello_retry:
                self.hello_retries += 1
                return
            self.server_hello = hello
            self._server_ts = ts_ns
            if self._client_dir is None:
                self._client_dir = Direction(1 - direction)
            if 0x0304 <= hello.version < 0xFE00:
                # TLS 1.3 (0x0304, drafts 0x7fxx): the rest of the handshake, the
                # certificate included, is encrypted.
                self._finish()
        elif msg_type == _CERTIFICATE and self.server_hello is not None:
            if direction == self._client_dir:
                if self.cert_requested:
                    self._client_certificate(body, cut)
                return
            certs, self.chain_certs = parse_certificate_chain(
                body, truncated=cut, keep=MAX_CHAIN if self._want_chain else 1)
            if certs:
                # Imported on first certificate: `cryptography` is heavy, and every CLI
                # that lists record kinds imports this module through the registry.
                from sensor.l7 import x509

                self.cert = x509.parse_leaf(certs[0])
                if self.cert is None:
                    self.cert_errors += 1
                if self._want_chain:
                    self.chain = (self.cert,) + tuple(x509.parse_leaf(c) for c in certs[1:])
            # The event is out; the parse goes on to ServerHelloDone for a request.
            self._emit()
        elif msg_type == _CERTIFICATE_REQUEST and direction != self._client_dir:
            self.cert_requested = True
            self._summary["tls_client_cert"] = "requested"
        elif msg_type == _SERVER_HELLO_DONE:
            self._server_done = True
            if self.cert_requested:
                self._emit()   # the client's Certificate is awaited
            else:
                self._finish()

    def _client_certificate(self, body: bytes, cut: bool) -> None:
        """The client's Certificate message (RFC 5246 7.4.6): an empty list when it has
        none. Only the leaf's subject is read, and only hashed (never kept)."""
        certs, count = parse_certificate_chain(body, truncated=cut, keep=1)
        if count:
            self.client_cert = True
            self._summary["tls_client_cert"] = "sent"
            if certs:
                from sensor.l7 import principal, x509

                leaf = x509.parse_leaf(certs[0])
                if leaf is not None and leaf.subject:
                    self.client_principal = principal.hash_of("mtls", leaf.subject)
        self._finish()

    def _lose(self, direction: Direction, side: _Side, reason: str) -> None:
        """Bytes of this direction went missing inside the handshake: read what arrived,
        stop reading this side, and go on with the other one. The parse ends in ERROR
        (with this reason) whenever it ends; at once when the other side is over too."""
        if not self._lost:
            self._lost = reason   # first: the salvage below may end the parse
        self._salvage(direction, side)
        side.over = True
        side.records.clear()
        side.handshake.clear()
        side.drop = 0
        other = self._sides[1 - direction]
        if self.state is _OK and (other.over or other.encrypted):
            self._finish()

    def _salvage(self, direction: Direction, side: _Side) -> None:
        """Before failing on lost or missing bytes: the handshake bytes that did arrive,
        the unfinished record's included, read as far as they go. Whole messages are
        parsed as usual; a ClientHello, ServerHello or Certificate cut short is read like
        one cut at MAX_HANDSHAKE (so a capture with a short snap length, or one ending
        inside the hello, still gives the SNI). A record header that does not say
        handshake, or a message still being dropped, leaves nothing to read."""
        if side.drop:
            return
        data = bytes(side.handshake)
        ts = side.handshake_ts
        recs = side.records
        if len(recs) > 5 and recs[0] == _HANDSHAKE:
            if not data:
                ts = side.records_ts
            data += bytes(recs[5:5 + ((recs[3] << 8) | recs[4])])
        pos = 0
        try:
            while self.state is _OK and len(data) - pos >= 4:
                msg_type = data[pos]
                length = (data[pos + 1] << 16) | (data[pos + 2] << 8) | data[pos + 3]
                body = data[pos + 4:pos + 4 + min(length, MAX_HANDSHAKE)]
                if len(body) == length:
                    self._message(direction, msg_type, body, ts)
                    pos += 4 + length
                    continue
                if msg_type in (_CLIENT_HELLO, _SERVER_HELLO, _CERTIFICATE):
                    self._message(direction, msg_type, body, ts, True)
                return
        except _Malformed:
            return  # too little of it arrived to read anything

    # --- outcome ---------------------------------------------------------------------

    def _finish(self) -> None:
        """Emit the event (once, if anything is known) and stop."""
        self._emit()
        self._done()

    def _done(self) -> None:
        if self.state is _OK:
            if self._lost:
                self.state = _ERROR
                self.error = self._lost
            else:
                self.state = _DONE
        for side in self._sides:
            side.records.clear()
            side.handshake.clear()

    def _fail(self, reason: str) -> None:
        self._emit()
        self.state = _ERROR
        self.error = reason
        for side in self._sides:
            side.records.clear()
            side.handshake.clear()

    def _emit(self) -> None:
        if self._emitted:
            return
        ch, sh = self.client_hello, self.server_hello
        if ch is None and sh is None:
            return
        self._emitted = True
        fields: dict = {}
        if ch is not None:
            fields.update(
                client_version=ch.legacy_version, sni=ch.sni,
                alpn=tuple(_text(p) for p in ch.alpn),
                ja3="" if ch.truncated else _ja3(ch), ja4=self._ja4,
            )
        if sh is not None:
            fields.update(version=sh.version, cipher=sh.cipher,
                          ja3s="" if sh.truncated else _ja3s(sh))
            if sh.alpn is not None:
                fields["alpn_selected"] = _text(sh.alpn)
        if self.cert is not None:
            fields.update(
                cert_subject=self.cert.subject, cert_issuer=self.cert.issuer,
                cert_san=self.cert.san, cert_not_before_ns=self.cert.not_before_ns,
                cert_not_after_ns=self.cert.not_after_ns,
            )
        ts = self._client_ts if ch is not None else self._server_ts
        self._events.append(Transaction(ts_ns=ts, detail=TlsEvent(**fields)))


# -- registration (sensor/l7/registry.py) --------------------------------------------------

def looks_like(first: bytes, direction: Direction) -> bool:
    """A handshake record header (type 22, version 3.0-3.4, length <= 2^14 + 2048,
    RFC 8446 §5.1) whose first message is a ClientHello or ServerHello."""
    if len(first) < 6 or first[0] != 0x16 or first[1] != 3 or first[2] > 4:
        return False
    length = (first[3] << 8) | first[4]
    return 4 <= length <= (1 << 14) + 2048 and first[5] in (1, 2)


def table_line(d: TlsEvent) -> list[tuple[str, str | None]]:
    from sensor.export import formats  # rendering only; not needed to parse

    out = [(formats.tls_version_name(d.version) or "TLS ?", None),
           (f"sni={d.sni or '-'}", None)]
    if d.alpn_selected or d.alpn:
        out.append((f"alpn={d.alpn_selected or ','.join(d.alpn)}", None))
    if d.ja4:
        out.append((f"ja4={d.ja4}", "dim"))
    return out


def eve(d: TlsEvent) -> dict:
    """Suricata's EVE tls object."""
    from sensor.export.formats import eve_time, tls_version_name  # output only

    out: dict = {"subject": d.cert_subject or None, "issuerdn": d.cert_issuer or None,
                 "sni": d.sni or None, "version": tls_version_name(d.version) or None,
                 "notbefore": eve_time(d.cert_not_before_ns),
                 "notafter": eve_time(d.cert_not_after_ns)}
    if d.ja3:
        out["ja3"] = {"hash": d.ja3}
    if d.ja3s:
        out["ja3s"] = {"hash": d.ja3s}
    if d.ja4:
        out["ja4"] = d.ja4
    if d.alpn:
        out["client_alpns"] = list(d.alpn)
    if d.alpn_selected:
        out["server_alpns"] = [d.alpn_selected]
    out["cipher"] = d.cipher
    return {k: v for k, v in out.items() if v is not None}


_ZEEK_VERSIONS = {0x0300: "SSLv3", 0x0301: "TLSv10", 0x0302: "TLSv11", 0x0303: "TLSv12",
                  0x0304: "TLSv13"}


def _zeek(e) -> list:
    d = e.detail
    return [_ZEEK_VERSIONS.get(d.version, f"unknown-{d.version}") if d.version else None,
            f"0x{d.cipher:04x}" if d.cipher else None, d.sni or None,
            d.alpn_selected or None, d.cert_subject or None, d.cert_issuer or None,
            d.ja3 or None, d.ja3s or None, d.ja4 or None]


# Zeek's ssl.log columns that Loupe has a value for, in Zeek's order; JA4 last, as the
# Zeek package that adds it does.
ZEEK = ZeekLog(path="ssl", values=_zeek, columns=(
    ("version", "string"), ("cipher", "string"), ("server_name", "string"),
    ("next_protocol", "string"), ("subject", "string"), ("issuer", "string"),
    ("ja3", "string"), ("ja3s", "string"), ("ja4", "string")))


PROTOCOL = Protocol(
    name="tls", event=TlsEvent, parser=TlsParser,
    tcp_ports=(443, 8443, 853, 993, 995, 465), signature=looks_like, priority=10,
    summary=("tls_sni", "tls_ja4"), summary_keys=("tls_client_cert",),
    column_types={"version": "u16", "client_version": "u16", "cipher": "u16"},
    columns_checked=True,
    line=table_line, listing=3, style="green", eve=eve, zeek=ZEEK,
    filters=(
        Filter(name="tls_sni", field="sni", match="glob", flow_field="tls_sni",
               help="server name glob"),
        Filter(name="tls_ja4", field="ja4", match="exact", flow_field="tls_ja4", flag="ja4",
               help="JA4 client fingerprint"),
    ),
)
