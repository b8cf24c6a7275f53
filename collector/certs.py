"""`loupe certs init`: a private CA and the certificates of a small deployment.

One CA signs a server certificate for the collector and one client certificate per
sensor (and per analyst and admin). The collector takes a sensor's identity from its
certificate's common name, so each sensor gets its own certificate named after it. Keys
are ECDSA P-256 (small, fast handshakes, supported by every gRPC TLS stack) and written
0600.

Roles. Every client certificate carries its role as the subject's organizational unit
(OU=sensor, OU=analyst or OU=admin): a sensor may only send records (Ingest), an analyst
may only read them (Observer), an admin may do both. The subject was chosen over a URI
SAN or a private extendedKeyUsage because `openssl x509 -noout -subject` shows it, and
any CA tooling can set it. The collector reads the role from the peer certificate on
every RPC (collector/roles.py). A certificate without a role (issued before roles
existed) is refused, with a message saying to re-issue it: it would otherwise be
allowed everything.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sensor.errors import ConfigError

# Lifetimes: the CA outlives the leaves so leaves can be re-issued without redeploying it.
CA_DAYS = 3650
LEAF_DAYS = 825  # the longest lifetime browsers ever accepted for a leaf; a sane ceiling


@dataclass(frozen=True, slots=True)
class IssuedFiles:
    ca_cert: Path
    ca_key: Path
    collector: tuple[Path, Path]
    clients: dict[str, tuple[Path, Path]]
    roles: dict[str, str]     # client name -> its role


# Client roles, in the subject's OU; what each may call is in collector/roles.py.
SENSOR, ANALYST, ADMIN = "sensor", "analyst", "admin"
ROLES = (SENSOR, ANALYST, ADMIN)


def _name(cn: str, role: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Loupe")]
    if role is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def role_of(cert: x509.Certificate) -> str | None:
    """The Loupe role a client certificate carries (its subject's OU), or None."""
    for attr in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME):
        if attr.value in ROLES:
            return attr.value
    return None


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # O_CREAT's mode is filtered by the umask


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _sans(names: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def _issue(ca_key, ca_cert, cn: str, *, role: str | None, sans: list[str], now: dt.datetime):
    """A leaf: the collector's server certificate (role None) or a client's."""
    key = _key()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if role is None else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn, role)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_sans(sans)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    return key, builder.sign(ca_key, hashes.SHA256())


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"{name!r} cannot name a certificate file: use letters, digits, - and .")


def init(directory: Path, *, collector_name: str, sensors: list[str], analysts: list[str],
         admins: list[str] = (), extra_sans: list[str] = ()) -> IssuedFiles:
    directory = Path(directory)
    clients = ([(n, SENSOR) for n in sensors] + [(n, ANALYST) for n in analysts]
               + [(n, ADMIN) for n in admins])
    for name in [collector_name, *(n for n, _ in clients)]:
        _check_name(name)
    if len({n for n, _ in clients}) != len(clients):
        raise ConfigError("sensor, analyst and admin names must be distinct: each one is an identity")
    directory.mkdir(parents=True, exist_ok=True)
    taken = [p.name for p in directory.glob("*.pem")] + [p.name for p in directory.glob("*.key")]
    if taken:
        raise ConfigError(
            f"{directory} already holds certificates ({', '.join(sorted(taken)[:3])}...): "
            "choose an empty --dir, or remove them to start over"
        )
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = _key()
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("Loupe CA")).issuer_name(_name("Loupe CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = IssuedFiles(directory / "ca.pem", directory / "ca.key",
                        (directory / "collector.pem", directory / "collector.key"), {},
                        {name: role for name, role in clients})
    _write(files.ca_key, _pem_key(ca_key), 0o600)
    _write(files.ca_cert, _pem_cert(ca_cert), 0o644)
    sans = list(dict.fromkeys([collector_name, "localhost", "127.0.0.1", "::1", *extra_sans]))
    key, cert = _issue(ca_key, ca_cert, collector_name, role=None, sans=sans, now=now)
    _write(files.collector[1], _pem_key(key), 0o600)
    _write(files.collector[0], _pem_cert(cert), 0o644)
    for name, role in clients:
        key, cert = _issue(ca_key, ca_cert, name, role=role, sans=[name], now=now)
        pair = (directory / f"{name}.pem", directory / f"{name}.key")
        _write(pair[1], _pem_key(key), 0o600)
        _write(pair[0], _pem_cert(cert), 0o644)
        files.clients[name] = pair
    return files
