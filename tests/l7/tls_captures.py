"""Real TLS captures for the TLS edge-case tests, made on loopback at test time.

Peers: `openssl s_server` (OpenSSL 3.0 from Debian) answers; the client is either
`openssl s_client` or a raw socket that sends a browser-shaped ClientHello written here
byte by byte (OpenSSL 3.0 has no post-quantum group, so a Chrome-like hello with an
X25519MLKEM768 key share is built by hand). The server answering it with a ServerHello
is what shows the hand-made bytes are TLS; tshark's decode of the capture is the oracle
for every field the tests compare.

Certificates are made with `cryptography` (a chain of any depth, each certificate with
its own serial and validity, padded with SAN entries to the size wanted).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.l7 import pcaputil

# Cipher suites, groups and extension order of a Chrome 131 ClientHello (GREASE included,
# fixed here instead of random so the hello is the same on every run).
GREASE_A, GREASE_B, GREASE_C = 0x0A0A, 0x4A4A, 0xDADA
CHROME_CIPHERS = (GREASE_A, 0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030,
                  0xCCA9, 0xCCA8, 0xC013, 0xC014, 0x009C, 0x009D, 0x002F, 0x0035)
X25519MLKEM768 = 0x11EC
X25519 = 0x001D
MLKEM768_SHARE = 1184 + 32   # ML-KEM-768 encapsulation key + X25519 public key
SIG_ALGS = (0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601)


def available() -> str | None:
    """Why these captures cannot be made here, or None."""
    if os.geteuid() != 0:
        return "capturing on lo with tcpdump needs root"
    for tool in ("openssl", "tcpdump", "tshark", "editcap"):
        if shutil.which(tool) is None:
            return f"{tool} not found (make install)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- building a ClientHello (RFC 8446 4.1.2) ----------------------------------------------

def _vec(data: bytes, n: int) -> bytes:
    return len(data).to_bytes(n, "big") + data


def _ext(ext_type: int, body: bytes) -> bytes:
    return ext_type.to_bytes(2, "big") + _vec(body, 2)


def _u16s(values) -> bytes:
    return b"".join(v.to_bytes(2, "big") for v in values)


def chrome_hello(sni: str, *, padding: int = 0, extra_ciphers: int = 0,
                 seed: int = 1) -> bytes:
    """A whole handshake message (type 1) shaped like Chrome's: GREASE, an
    X25519MLKEM768 key share beside X25519, ECH GREASE, ALPS. `padding` adds a padding
    extension (RFC 7685) of that many bytes last; `extra_ciphers` puts that many unknown
    cipher suites (0x0100 up) before the real ones."""
    rnd = _Bytes(seed)
    ciphers = tuple(0x0100 + i for i in range(extra_ciphers)) + CHROME_CIPHERS
    exts = [
        _ext(GREASE_B, b""),
        _ext(0, _vec(b"\x00" + _vec(sni.encode(), 2), 2)),
        _ext(23, b""),                                   # extended_master_secret
        _ext(0xFF01, b"\x00"),                           # renegotiation_info
        _ext(10, _vec(_u16s((GREASE_C, X25519MLKEM768, X25519, 0x0017, 0x0018)), 2)),
        _ext(11, _vec(b"\x00", 1)),                      # ec_point_formats
        _ext(35, b""),                                   # session_ticket
        _ext(16, _vec(_vec(b"h2", 1) + _vec(b"http/1.1", 1), 2)),
        _ext(5, b"\x01\x00\x00\x00\x00"),                # status_request
        _ext(13, _vec(_u16s(SIG_ALGS), 2)),
        _ext(18, b""),                                   # signed_certificate_timestamp
        _ext(51, _vec((GREASE_C.to_bytes(2, "big") + _vec(b"\x00", 2)
                       + X25519MLKEM768.to_bytes(2, "big") + _vec(rnd(MLKEM768_SHARE), 2)
                       + X25519.to_bytes(2, "big") + _vec(rnd(32), 2)), 2)),
        _ext(45, _vec(b"\x01", 1)),                      # psk_key_exchange_modes
        _ext(43, _vec(_u16s((GREASE_A, 0x0304, 0x0303)), 1)),
        _ext(27, _vec(b"\x00\x02", 1)),                  # compress_certificate: brotli
        _ext(17513, _vec(_vec(b"h2", 1), 2)),            # application_settings
        _ext(0xFE0D, b"\x00\x00\x01\x00\x01" + rnd(1) + _vec(rnd(32), 2)
             + _vec(rnd(144), 2)),                       # ECH GREASE
        _ext(GREASE_A, b"\x00"),
    ]
    if padding:
        exts.append(_ext(21, bytes(padding)))
    body = (b"\x03\x03" + rnd(32) + _vec(rnd(32), 1) + _vec(_u16s(ciphers), 2)
            + _vec(b"\x00", 1) + _vec(b"".join(exts), 2))
    return b"\x01" + _vec(body, 3)


class _Bytes:
    """Deterministic filler for randoms and key shares (values a server only stores)."""

    def __init__(self, seed: int) -> None:
        import random

        self._rng = random.Random(seed)

    def __call__(self, n: int) -> bytes:
        return self._rng.randbytes(n)


def records(message: bytes, size: int, legacy_version: int = 0x0301) -> bytes:
    """One handshake message as handshake records of at most `size` bytes each."""
    return b"".join(bytes([22]) + legacy_version.to_bytes(2, "big")
                    + _vec(message[i:i + size], 2) for i in range(0, len(message), size))


# --- certificates ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Chain:
    leaf_cert: Path
    leaf_key: Path
    rest: Path                    # the intermediates and the root, issuer of the leaf first
    certs: tuple                  # cryptography Certificates, leaf first


def make_chain(directory: Path, depth: int, sans: int = 30) -> Chain:
    """A root, depth - 2 intermediates and a leaf for x.test; each certificate has its own
    serial, validity and `sans` SAN entries (to give the chain its size)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(depth)]
    names = []
    for i in range(depth):
        cn = "x.test" if i == 0 else f"Loupe Edge CA {depth - i}"
        names.append(x509.Name([
            x509.NameAttribute(NameOID.COUNTRY_NAME, "FR"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Loupe tests"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"level {i}"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    certs = []
    for i in range(depth):
        issuer = min(i + 1, depth - 1)
        alt = [x509.DNSName("x.test")] + [
            x509.DNSName(f"host-{j:03d}.level-{i}.edge.loupe.test") for j in range(sans)]
        builder = (x509.CertificateBuilder()
                   .subject_name(names[i]).issuer_name(names[issuer])
                   .public_key(keys[i].public_key())
                   .serial_number(0x1000_0000_0000 * (i + 1) + 0xABCD + i)
                   .not_valid_before(start + datetime.timedelta(days=i))
                   .not_valid_after(start + datetime.timedelta(days=400 + 30 * i))
                   .add_extension(x509.BasicConstraints(ca=i > 0, path_length=None), True)
                   .add_extension(x509.SubjectAlternativeName(alt), False))
        certs.append(builder.sign(keys[issuer], hashes.SHA256()))
    pem = [c.public_bytes(serialization.Encoding.PEM) for c in certs]
    chain = Chain(directory / "leaf.pem", directory / "leaf.key", directory / "rest.pem",
                  tuple(certs))
    chain.leaf_cert.write_bytes(pem[0])
    chain.rest.write_bytes(b"".join(pem[1:]))
    chain.leaf_key.write_bytes(keys[0].private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return chain


# --- servers and clients ---------------------------------------------------------------------

@contextlib.contextmanager
def s_server(port: int, chain: Chain, *extra: str):
    """openssl s_server on 127.0.0.1:port for one connection."""
    proc = subprocess.Popen(
        ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(chain.leaf_cert),
         "-key", str(chain.leaf_key), "-cert_chain", str(chain.rest), "-alpn", "h2",
         "-naccept", "1", "-quiet", *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        pcaputil.wait_for_port(port)
        yield proc
    finally:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def s_client(port: int, *args: str) -> str:
    done = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "x.test",
         "-alpn", "h2,http/1.1", *args],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    return done.stdout


def raw_client(port: int, data: bytes, *, segment: int = 0, timeout_s: float = 10.0) -> bytes:
    """Send `data` (TLS records) and return what the server sent back up to and including
    its first complete record. `segment`: send that many bytes per write, Nagle off and a
    pause between writes, so each write leaves as its own TCP segment (loopback does not
    cut a write by the MSS: it hands the stack's large segments over as they are)."""
    import time

    with socket.socket() as s:
        s.settimeout(timeout_s)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.connect(("127.0.0.1", port))
        step = segment or len(data)
        for i in range(0, len(data), step):
            s.sendall(data[i:i + step])
            if segment:
                time.sleep(0.005)
        got = b""
        while len(got) < 5 or len(got) < 5 + int.from_bytes(got[3:5], "big"):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


# --- tshark ------------------------------------------------------------------------------------

def tshark_fields(pcap: Path, port: int, display_filter: str, fields: list[str],
                  *extra: str) -> list[dict[str, list[str]]]:
    """One dict per matching packet: field -> values ('|'-separated occurrences split)."""
    cmd = ["tshark", "-r", str(pcap), "-d", f"tcp.port=={port},tls", *extra,
           "-Y", display_filter, "-T", "fields", "-E", "separator=\t", "-E", "aggregator=|",
           "-E", "occurrence=a"]
    for f in fields:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    rows = []
    for line in out.splitlines():
        values = line.split("\t")
        rows.append({f: v.split("|") if v else [] for f, v in zip(fields, values)})
    return rows


def one_direction(pcap: Path, out: Path, bpf_filter: str) -> Path:
    """The packets of `pcap` that match a tcpdump filter, as a capture of their own."""
    subprocess.run(["tcpdump", "-r", str(pcap), "-w", str(out), bpf_filter],
                   capture_output=True, check=True, timeout=30)
    return out
