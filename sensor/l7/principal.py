"""Who a request claims to be, without keeping any secret: the kinds of credentials it
carries and a salted hash of its principal.

- kinds: `bearer`, `basic` (Authorization), `cookie` (Cookie), `api_key` (X-API-Key,
  Api-Key, X-Auth-Token). Only the kind is kept, never a value. `mtls` is not a header:
  the connection's TLS <= 1.2 handshake showed a client certificate (sensor/l7/tls.py),
  joined to the requests of TLS plaintext (sensor/engine/plaintext.py) by with_mtls().
- principal: the JWT `sub` of a bearer token (the payload segment decoded WITHOUT verifying
  the signature: this names a caller for statistics, it authenticates nothing), the user
  of a basic credential, or the subject of an mTLS client certificate; kept only as `p:`
  + the first 16 hex digits of SHA-256(SALT, kind, value). The same principal gives the
  same hash on every sensor, so the collector merges them; the value itself never leaves
  this function. The salt is public, so a guessable user name can be confirmed by hashing
  guesses: the hash keeps the value out of every output, it does not make a weak name
  secret.

Sans-I/O and bounded: a header value over MAX_VALUE octets is not decoded.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json

from sensor.model import HttpCredential

SALT = b"loupe-principal-v1\0"
# A credential longer than this is not decoded (a JWT with many claims is ~1-2 KiB).
MAX_VALUE = 8192
API_KEY_HEADERS = (b"x-api-key", b"api-key", b"x-auth-token")
KINDS = ("bearer", "basic", "cookie", "api_key", "mtls")   # the order they are listed in
HEADERS = (b"authorization", b"cookie") + API_KEY_HEADERS


def _hash(kind: str, value: str) -> str:
    digest = hashlib.sha256(SALT + kind.encode() + b"\0" + value.encode("utf-8", "replace"))
    return "p:" + digest.hexdigest()[:16]


hash_of = _hash   # for the parsers that name a principal outside headers (tls.py)


def with_mtls(auth: tuple[HttpCredential, ...], who: str) -> tuple[HttpCredential, ...]:
    """A request's credentials plus `mtls` (principal `who`: a hash or ""), in KINDS
    order: mtls is last, so it is appended unless already there."""
    if any(c.kind == "mtls" for c in auth):
        return auth
    return auth + (HttpCredential(kind="mtls", principal=who),)


def _b64(text: bytes, urlsafe: bool) -> bytes | None:
    text = text.strip()
    try:
        if urlsafe:
            return base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _jwt_sub(token: bytes) -> str:
    parts = token.split(b".")
    if len(parts) != 3:
        return ""
    payload = _b64(parts[1], urlsafe=True)
    if payload is None:
        return ""
    try:
        claims = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return ""
    sub = claims.get("sub") if isinstance(claims, dict) else None
    return sub if isinstance(sub, str) and sub else ""


def credentials(headers: dict[bytes, list[bytes]]) -> tuple[HttpCredential, ...]:
    """The credentials of a request's headers (lower-cased names -> values), one per kind
    in KINDS order, each with the salted hash of its principal or "" (the first one
    found: a request with two bearer tokens names the caller of the first that has one)."""
    found: dict[str, str] = {}
    for value in headers.get(b"authorization", ()):
        scheme, _, cred = value.partition(b" ")
        scheme = scheme.lower()
        who = ""
        if scheme == b"bearer":
            if len(cred) <= MAX_VALUE:
                sub = _jwt_sub(cred.strip())
                who = _hash("jwt", sub) if sub else ""
        elif scheme == b"basic":
            if len(cred) <= MAX_VALUE:
                raw = _b64(cred, urlsafe=False)
                if raw is not None and b":" in raw:
                    user = raw.partition(b":")[0].decode("utf-8", "replace")
                    who = _hash("basic", user) if user else ""
        else:
            continue
        kind = scheme.decode()
        if not found.get(kind):
            found[kind] = who
    if headers.get(b"cookie"):
        found["cookie"] = ""
    if any(headers.get(h) for h in API_KEY_HEADERS):
        found["api_key"] = ""
    return tuple(HttpCredential(kind=k, principal=found[k]) for k in KINDS if k in found)


def of_headers(headers: dict[bytes, list[bytes]]) -> tuple[tuple[str, ...], str]:
    """(credential kinds present, in a fixed order; principal hash or "") of a request's
    headers (lower-cased names -> values)."""
    creds = credentials(headers)
    return (tuple(c.kind for c in creds),
            next((c.principal for c in creds if c.principal), ""))
