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
# An HTTP/2 Basic credential's user and password: neither may reach an output (the
# event keeps only the kind and the user's salted hash).
H2_USER, H2_PASSWORD = "planted-h2-user-5521", "planted-h2-pw-8830"


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
    out.update((H2_USER, H2_PASSWORD, _basic()))
    # Separator-free forms of the spaced values too (a sink that normalises).
    out.update(x.replace(" ", "") for x in list(out) if " " in x)
    return sorted(out)


def _basic() -> str:
    return base64.b64encode(f"{H2_USER}:{H2_PASSWORD}".encode()).decode()


def _h2_frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((ftype, flags)) + \
        sid.to_bytes(4, "big") + payload


def _pb_string(field: int, text: str) -> bytes:
    """A protobuf string field (wire type 2): tag, varint length (< 128 here), UTF-8."""
    raw = text.encode()
    assert len(raw) < 128
    return bytes((field << 3 | 2, len(raw))) + raw


def _grpc_message(*fields: bytes) -> bytes:
    msg = b"".join(fields)
    return b"\0" + len(msg).to_bytes(4, "big") + msg


def h2_exchanges():
    """(client bytes, server bytes, [(endpoint, expected counts), ...]) of one h2c
    connection (prior knowledge; HPACK by the hpack library): a JSON POST whose body is
    split over two DATA frames inside a card number, with a Basic credential, answered
    with a JSON body that leaks; and a unary gRPC call whose protobuf messages carry
    values both ways."""
    from hpack import Encoder

    from sensor.l7.http2 import PREFACE

    v = VALUES
    enc_c, enc_s = Encoder(), Encoder()
    body = json.dumps({"email": v["email"][1], "card": v["card"][2],
                       "iban": v["iban"][1]}).encode()
    cut = body.index(v["card"][2].encode()) + 6
    leak = json.dumps({"ssn": v["ssn"][0], "ip": v["ip"][0]}).encode()
    grpc_req = _grpc_message(_pb_string(1, v["email"][0]), _pb_string(2, v["phone"][1]))
    grpc_resp = _grpc_message(_pb_string(1, v["card"][0]))
    client = PREFACE + _h2_frame(4, 0, 0, b"") + _h2_frame(1, 0x4, 1, enc_c.encode([
        (":method", "POST"), (":scheme", "http"), (":authority", SERVER),
        (":path", "/api/h2/profile"), ("content-type", "application/json"),
        ("authorization", f"Basic {_basic()}")])) + \
        _h2_frame(0, 0, 1, body[:cut]) + _h2_frame(0, 0x1, 1, body[cut:]) + \
        _h2_frame(1, 0x4, 3, enc_c.encode([
            (":method", "POST"), (":scheme", "http"), (":authority", SERVER),
            (":path", "/planted.Profile/Get"), ("content-type", "application/grpc"),
            ("te", "trailers")])) + _h2_frame(0, 0x1, 3, grpc_req)
    server = _h2_frame(4, 0, 0, b"") + _h2_frame(4, 0x1, 0, b"") + \
        _h2_frame(1, 0x4, 1, enc_s.encode([(":status", "200"),
                                           ("content-type", "application/json")])) + \
        _h2_frame(0, 0x1, 1, leak) + \
        _h2_frame(1, 0x4, 3, enc_s.encode([(":status", "200"),
                                           ("content-type", "application/grpc")])) + \
        _h2_frame(0, 0, 3, grpc_resp) + \
        _h2_frame(1, 0x5, 3, enc_s.encode([("grpc-status", "0")]))
    expected = [
        (("POST", "/api/h2/profile"),
         {"email.request": 1, "card.request": 1, "iban.request": 1, "ssn.response": 1,
          "ip.response": 1}),
        (("POST", "/planted.Profile/Get"),
         {"email.request": 1, "phone.request": 1, "card.response": 1}),
    ]
    return client, server, expected


def write_capture(path: Path, *, h2: bool = False) -> list:
    """A pcap of the exchanges, one TCP connection each; returns exchanges(). h2: and
    the HTTP/2 connection of h2_exchanges() after them (its expectations are not in the
    list returned)."""
    from scapy.utils import wrpcap

    pkts = []
    ex = exchanges()
    for i, (req, resp, _, _) in enumerate(ex):
        pkts += _tcp_conversation(CLIENT, SERVER, 41000 + i, 80,
                                  [(True, req), (False, resp)], t0=1_700_000_000.0 + i)
    if h2:
        client, server, _ = h2_exchanges()
        pkts += _tcp_conversation(CLIENT, SERVER, 41100, 80, [(True, client), (False, server)],
                                  t0=1_700_000_010.0)
    wrpcap(str(path), pkts)
    return ex
