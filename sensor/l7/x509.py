"""The leaf certificate fields a TlsEvent carries, read with the `cryptography` library.

Only TLS <= 1.2 shows certificates in the clear. Names are written the way OpenSSL's
one-line form and Suricata's eve `tls.subject` do (RDNs in certificate order, short
attribute names, ", " between them, values unescaped), because that is what analysts
grep for and what the conformance references assert. A certificate that does not parse
yields None: the peer's garbage, counted by the caller, never an exception.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from types import MappingProxyType

from cryptography import x509
from cryptography.x509.oid import NameOID

_SHORT = MappingProxyType({
    NameOID.COUNTRY_NAME: "C",
    NameOID.STATE_OR_PROVINCE_NAME: "ST",
    NameOID.LOCALITY_NAME: "L",
    NameOID.ORGANIZATION_NAME: "O",
    NameOID.ORGANIZATIONAL_UNIT_NAME: "OU",
    NameOID.COMMON_NAME: "CN",
    NameOID.STREET_ADDRESS: "street",
    NameOID.DOMAIN_COMPONENT: "DC",
    NameOID.USER_ID: "UID",
    NameOID.EMAIL_ADDRESS: "emailAddress",
    NameOID.SERIAL_NUMBER: "serialNumber",
    NameOID.BUSINESS_CATEGORY: "businessCategory",
    NameOID.JURISDICTION_COUNTRY_NAME: "jurisdictionC",
    NameOID.JURISDICTION_STATE_OR_PROVINCE_NAME: "jurisdictionST",
    NameOID.JURISDICTION_LOCALITY_NAME: "jurisdictionL",
    NameOID.POSTAL_CODE: "postalCode",
    NameOID.GIVEN_NAME: "GN",
    NameOID.SURNAME: "SN",
    NameOID.TITLE: "title",
})

# A SAN list is attacker-sized; 100 entries covers real multi-domain certificates
# (CAs cap SAN lists at 100-250) and keeps one record from growing without limit.
MAX_SAN = 100


@dataclass(frozen=True, slots=True, kw_only=True)
class CertFields:
    subject: str
    issuer: str
    san: tuple[str, ...]
    not_before_ns: int
    not_after_ns: int
    # Lower-case hex without leading zeros, as Suricata's tls.serial and tshark show it
    # (colon-free); "" when absent. Not a record field: for chain callers.
    serial: str = ""


def _attr_value(attr: x509.NameAttribute) -> str:
    value = attr.value
    return value if isinstance(value, str) else value.hex()


def format_name(name: x509.Name) -> str:
    rdns = []
    for rdn in name.rdns:
        parts = [
            f"{_SHORT.get(a.oid, a.oid.dotted_string)}={_attr_value(a)}" for a in rdn
        ]
        rdns.append("+".join(parts))
    return ", ".join(rdns)


def _epoch_ns(when: datetime.datetime) -> int:
    # UInt64 in the record: a validity before 1970 (seen in test certificates) clamps to 0.
    seconds = int(when.timestamp())
    return max(0, seconds) * 1_000_000_000


# What cryptography raises for bytes that are no usable certificate, some of it lazily when
# a field is read: ValueError for malformed DER and undecodable extensions, and its own
# exceptions, which are no ValueError, for a version other than v1/v3 (InvalidVersion), an
# extension given twice (DuplicateExtension) and an unknown general name type.
_NOT_A_CERTIFICATE = (ValueError, TypeError, OverflowError, x509.InvalidVersion,
                      x509.DuplicateExtension, x509.UnsupportedGeneralNameType)


def _san(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    out: list[str] = []
    for entry in ext.value:
        if isinstance(entry, (x509.DNSName, x509.RFC822Name, x509.UniformResourceIdentifier)):
            out.append(entry.value)
        elif isinstance(entry, x509.IPAddress) and isinstance(
            entry.value, (ipaddress.IPv4Address, ipaddress.IPv6Address)
        ):
            out.append(str(entry.value))
        if len(out) >= MAX_SAN:
            break
    return tuple(out)


def parse_leaf(der: bytes) -> CertFields | None:
    """Fields of one DER certificate, or None when the bytes are not a certificate."""
    try:
        cert = x509.load_der_x509_certificate(der)
        return CertFields(
            subject=format_name(cert.subject),
            issuer=format_name(cert.issuer),
            san=_san(cert),
            not_before_ns=_epoch_ns(cert.not_valid_before_utc),
            not_after_ns=_epoch_ns(cert.not_valid_after_utc),
            serial=format(cert.serial_number, "x"),
        )
    except _NOT_A_CERTIFICATE:
        # A hostile certificate is data to count, not a crash.
        return None
