"""Inputs the fuzz command (python -m tests.fuzz) found escaping a parser as an
exception. Each must end as data: ParserState.ERROR, or a certificate not parsed."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from sensor.l7 import x509 as loupe_x509
from sensor.l7.base import Direction, ParserState
from sensor.l7.http1 import Http1Parser


def test_more_empty_lines_than_are_skipped_before_a_message_is_an_error():
    # 32 empty lines are skipped before a message (RFC 9112 2.2); the rest made an empty
    # head block whose first line did not exist (IndexError).
    for count in (33, 40, 100):
        for direction, message in ((Direction.TO_SERVER, b"GET / HTTP/1.1\r\n\r\n"),
                                   (Direction.TO_CLIENT, b"HTTP/1.1 200 OK\r\n\r\n")):
            parser = Http1Parser()
            parser.receive_data(direction, b"\n" * count + message, 0)
            assert parser.state is ParserState.ERROR


def _certificate_der(*extensions) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz.loupe.test")])
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1)))
    for extension in extensions:
        cert = cert.add_extension(extension, critical=False)
    cert = cert.sign(key, hashes.SHA256())
    return cert.public_bytes(Encoding.DER)


def test_a_certificate_with_an_unknown_version_is_not_parsed():
    der = _certificate_der()
    assert loupe_x509.parse_leaf(der) is not None
    # The version field is [0] EXPLICIT INTEGER: a0 03 02 01 02 for v3. Version value 3
    # (a v4 that does not exist) made cryptography raise InvalidVersion, not ValueError.
    v3 = bytes.fromhex("a003020102")
    assert der.count(v3) == 1
    assert loupe_x509.parse_leaf(der.replace(v3, bytes.fromhex("a003020103"))) is None


def test_a_certificate_with_an_extension_given_twice_is_not_parsed():
    # cryptography reads the extensions lazily, when the SANs are looked up, and raises
    # DuplicateExtension (no ValueError) for a type given twice. The builder refuses
    # duplicates, so the SubjectKeyIdentifier's OID is rewritten to BasicConstraints'.
    der = _certificate_der(x509.BasicConstraints(ca=False, path_length=None),
                           x509.SubjectKeyIdentifier(b"\x01" * 20))
    assert loupe_x509.parse_leaf(der) is not None
    ski_oid, basic_constraints_oid = bytes.fromhex("0603551d0e"), bytes.fromhex("0603551d13")
    assert der.count(ski_oid) == 1
    assert loupe_x509.parse_leaf(der.replace(ski_oid, basic_constraints_oid)) is None
