"""Planted PII for the tests: real-format values (test card numbers, the IBAN registry's
examples, reserved-range SSN-shaped numbers, example.com mail, a signed JWT), the near
misses that must not count, and a capture that carries them through HTTP/1 requests and
responses to three endpoints (scapy-built, so the bytes are exactly these)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from urllib.parse import quote, quote_plus

from tests.fixtures.gen_golden import _tcp_conversation


def _b64(doc: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()


JWT = f"{_b64({'alg': 'HS256', 'typ': 'JWT'})}.{_b64({'sub': 'planted-user-7731'})}." \
      "Qm9ndXNTaWduYXR1cmVGb3JUZXN0cw"

# type -> values (each counted once where it is planted)
VALUES = {
    "email": ["alice.planted@example.com", "bob.planted+x@example.org"],
    "card": ["4111111111111111", "5500 0055 5555 5559", "378282246310005"],
    "iban": ["GB82WEST12345698765432", "DE89370400440532013000"],
    "ssn": ["219-09-9999", "078-05-1120"],
    "phone": ["+44 20 7946 0958", "(212) 555-0187"],
    "ip": ["203.0.113.77", "2001:db8::7:77"],
    "jwt": [JWT],
    "secret": ["sk_live_4eC39HqLyjWDarjtT1zdp7dc", "AKIAIOSFODNN7PLANTED"],
    "password": ["Planted-Passw0rd!"],
}
# Must not be counted: a Luhn-invalid card, a bad IBAN check, SSNs outside the ranges.
NEAR_MISSES = ["4111111111111112", "GB82WEST12345698765433", "000-12-3456", "666-12-3456",
               "123-00-4567", "912-34-5678"]
SERVER, CLIENT = "198.18.30.2", "198.18.30.1"


def _request(method: str, target: str, headers: dict, body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {SERVER}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _response(body: bytes = b"ok\n", ctype: str = "text/plain") -> bytes:
    return (f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}"
            f"\r\n\r\n").encode() + body


def exchanges():
    """(request, response, endpoint, expected counts) for each planted exchange."""
    v = VALUES
    out = []
    # 1. A JSON signup body: email, card, IBAN, SSN, phone, password; near misses beside.
    body = json.dumps({
        "email": v["email"][0], "card": v["card"][0], "iban": v["iban"][0],
        "ssn": v["ssn"][0], "phone": v["phone"][0], "password": v["password"][0],
        "bad_card": NEAR_MISSES[0], "bad_iban": NEAR_MISSES[1],
        "bad_ssn": [NEAR_MISSES[2], NEAR_MISSES[3], NEAR_MISSES[4], NEAR_MISSES[5]],
    }).encode()
    out.append((_request("POST", "/api/signup", {"Content-Type": "application/json"}, body),
                _response(b'{"id": 1}', "application/json"), ("POST", "/api/signup"),
                {"email.request": 1, "card.request": 1, "iban.request": 1, "ssn.request": 1,
                 "phone.request": 1, "password.request": 1}))
    # 2. A form body and a query string (URL-encoded), an address in X-Forwarded-For,
    #    a JWT bearer and an API key header.
    form = "&".join(f"{k}={quote_plus(x)}" for k, x in (
        ("email", v["email"][1]), ("card", v["card"][1]), ("phone", v["phone"][1]),
        ("iban", v["iban"][1])))
    query = "&".join(f"{k}={quote(x, safe='')}" for k, x in (
        ("ssn", v["ssn"][1]), ("card", v["card"][2]), ("ip", v["ip"][1])))
    out.append((_request("POST", f"/api/pay?{query}", {
        "Content-Type": "application/x-www-form-urlencoded",
        "Authorization": f"Bearer {v['jwt'][0]}", "X-Api-Key": v["secret"][0],
        "X-Forwarded-For": v["ip"][0]}, form.encode()),
        _response(), ("POST", "/api/pay"),
        {"email.request": 1, "card.request": 2, "phone.request": 1, "iban.request": 1,
         "ssn.request": 1, "ip.request": 2, "jwt.request": 1, "secret.request": 1}))
    # 3. A response that leaks: a JSON body with an email, a card and an AWS key id.
    leak = json.dumps({"owner": v["email"][0], "pan": v["card"][0],
                       "aws": v["secret"][1]}).encode()
    out.append((_request("GET", "/api/account/42", {"Accept": "application/json"}),
                _response(leak, "application/json"), ("GET", "/api/account/42"),
                {"email.response": 1, "card.response": 1, "secret.response": 1}))
    return out


def planted_strings() -> list[str]:
    """Every planted value and near miss, also URL-encoded (both encodings), for the
    absence checks."""
    out = set()
    for values in list(VALUES.values()) + [NEAR_MISSES]:
        for x in values:
            out.update((x, quote(x, safe=""), quote_plus(x)))
    # Separator-free forms of the spaced values too (a sink that normalises).
    out.update(x.replace(" ", "") for x in list(out) if " " in x)
    return sorted(out)


def write_capture(path: Path) -> list:
    """A pcap of the exchanges, one TCP connection each; returns exchanges()."""
    from scapy.utils import wrpcap

    pkts = []
    ex = exchanges()
    for i, (req, resp, _, _) in enumerate(ex):
        pkts += _tcp_conversation(CLIENT, SERVER, 41000 + i, 80,
                                  [(True, req), (False, resp)], t0=1_700_000_000.0 + i)
    wrpcap(str(path), pkts)
    return ex
