"""DNS and TLS parser throughput, single core.

Workloads, each fed as the engine would (one call per datagram or TCP segment):
  dns-udp   a query and its response (CNAME + 2 A, EDNS OPT), one flow per pair
  dns-tcp   the same pair over TCP with length prefixes
  tls12     ClientHello (browser-like: GREASE, 16 extensions) / ServerHello with ALPN /
            Certificate (one real self-signed leaf, parsed with cryptography) / ServerHelloDone
  tls13     ClientHello / ServerHello (the certificate is encrypted: nothing more to parse)
Figures: DNS messages/s (a pair counts 2) and TLS handshakes/s, JA3/JA3S/JA4 included.
Run: python -m tests.benchmarks.bench_dns_tls [seconds per workload]
Each workload runs in rounds of 0.25 s and the best round is reported, as timeit does:
the cores are shared, and the best round is the one least disturbed by other work.
"""

from __future__ import annotations

import datetime
import struct
import sys
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from sensor.l7.base import NEED_DATA, Direction
from sensor.l7.dns import DnsParser
from sensor.l7.tls import TlsParser

C = Direction.TO_SERVER
S = Direction.TO_CLIENT


def _name(text: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in text.split(".")) + b"\x00"


QUERY = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 1) + _name("www.example.com") + \
    b"\x00\x01\x00\x01" + b"\x00" + struct.pack(">HHIH", 41, 1232, 0, 0)
RESPONSE = (struct.pack(">HHHHHH", 0x1234, 0x8180, 1, 3, 0, 1) + _name("www.example.com")
            + b"\x00\x01\x00\x01"
            + b"\xc0\x0c" + struct.pack(">HHIH", 5, 1, 300, 17) + _name("cdn.example.net")
            + b"\xc0\x2d" + struct.pack(">HHIH", 1, 1, 60, 4) + bytes([198, 18, 0, 1])
            + b"\xc0\x2d" + struct.pack(">HHIH", 1, 1, 60, 4) + bytes([198, 18, 0, 2])
            + b"\x00" + struct.pack(">HHIH", 41, 1232, 0, 0))


def _vec(data: bytes, n: int) -> bytes:
    return len(data).to_bytes(n, "big") + data


def _ext(t: int, body: bytes) -> bytes:
    return t.to_bytes(2, "big") + _vec(body, 2)


def _record(payload: bytes) -> bytes:
    return b"\x16\x03\x03" + _vec(payload, 2)


def _client_hello() -> bytes:
    ciphers = [0x2A2A, 0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8,
               0xC013, 0xC014, 0x009C, 0x009D, 0x002F, 0x0035]
    exts = (_ext(0x0A0A, b"") + _ext(0, _vec(b"\x00" + _vec(b"www.example.com", 2), 2))
            + _ext(23, b"") + _ext(0xFF01, b"\x00") + _ext(10, _vec(bytes.fromhex("3a3a001d00170018"), 2))
            + _ext(11, _vec(b"\x00", 1)) + _ext(35, b"")
            + _ext(16, _vec(_vec(b"h2", 1) + _vec(b"http/1.1", 1), 2)) + _ext(5, bytes.fromhex("0100000000"))
            + _ext(13, _vec(bytes.fromhex("0403080404010503080505010806060102 01".replace(" ", ""))[:16], 2))
            + _ext(18, b"") + _ext(51, _vec(bytes.fromhex("001d0020") + bytes(32), 2))
            + _ext(45, _vec(b"\x01", 1)) + _ext(43, _vec(bytes.fromhex("5a5a03040303"), 1))
            + _ext(27, _vec(b"\x00\x02", 1)) + _ext(17513, bytes.fromhex("0003026832"))
            + _ext(0x1A1A, b"\x00") + _ext(21, bytes(200)))
    body = (b"\x03\x03" + bytes(32) + _vec(bytes(32), 1)
            + _vec(b"".join(c.to_bytes(2, "big") for c in ciphers), 2) + _vec(b"\x00", 1) + _vec(exts, 2))
    return b"\x01" + _vec(body, 3)


def _server_hello(tls13: bool) -> bytes:
    exts = _ext(0xFF01, b"\x00") + _ext(11, _vec(b"\x00", 1))
    exts += _ext(43, b"\x03\x04") if tls13 else _ext(16, _vec(_vec(b"h2", 1), 2))
    body = (b"\x03\x03" + b"\x22" * 32 + _vec(bytes(32), 1) + (b"\x13\x01" if tls13 else b"\xc0\x2f")
            + b"\x00" + _vec(exts, 2))
    return b"\x02" + _vec(body, 3)


def _certificate() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Inc"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "www.example.com")])
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(12345)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=90))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("www.example.com"), x509.DNSName("example.com")]), critical=False)
            .sign(key, hashes.SHA256()))
    der = cert.public_bytes(Encoding.DER)
    return b"\x0b" + _vec(_vec(_vec(der, 3), 3), 3)


CLIENT = _record(_client_hello())
SERVER12 = _record(_server_hello(False) + _certificate() + b"\x0e\x00\x00\x00")
SERVER13 = _record(_server_hello(True)) + b"\x14\x03\x03\x00\x01\x01" + b"\x17\x03\x03\x00\x20" + bytes(32)


def _drain(parser) -> int:
    n = 0
    while parser.next_event() is not NEED_DATA:
        n += 1
    return n


def one_round(kind: str, seconds: float) -> float:
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(50):
            if kind == "dns-udp":
                p = DnsParser()
                p.receive_datagram(C, QUERY, 1)
                p.receive_datagram(S, RESPONSE, 2)
                done += 2 * _drain(p)
            elif kind == "dns-tcp":
                p = DnsParser()
                p.receive_data(C, _vec(QUERY, 2), 1)
                p.receive_data(S, _vec(RESPONSE, 2), 2)
                done += 2 * _drain(p)
            else:
                p = TlsParser()
                p.receive_data(C, CLIENT, 1)
                p.receive_data(S, SERVER12 if kind == "tls12" else SERVER13, 2)
                done += _drain(p)
    return done / (time.perf_counter() - start)


def main(argv: list[str]) -> int:
    seconds = float(argv[0]) if argv else 2.0
    units = {"dns-udp": "DNS messages/s", "dns-tcp": "DNS messages/s",
             "tls12": "TLS handshakes/s", "tls13": "TLS handshakes/s"}
    for kind, unit in units.items():
        rounds = max(1, int(seconds / 0.25))
        best = max(one_round(kind, 0.25) for _ in range(rounds))
        print(f"{kind:8s} {best:12,.0f} {unit}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
