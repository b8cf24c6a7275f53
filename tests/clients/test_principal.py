"""Per-client facts without a collector: the notice rules on the model, and the principal
and credential kinds from real header bytes (sensor/l7/principal.py, HTTP/1 and HTTP/2)."""

from __future__ import annotations

import base64
import json

from collector.clients.model import MINUTE_NS, Clients, endpoint_of
from sensor.l7 import principal

SUB, USER, PASSWORD = "alice-4242", "bob-planted", "hunter2-planted"
TOKEN = ".".join(base64.urlsafe_b64encode(json.dumps(p).encode()).rstrip(b"=").decode()
                 for p in ({"alg": "HS256", "typ": "JWT"}, {"sub": SUB, "name": "Alice"})
                 ) + ".c2lnbmF0dXJlLXBsYW50ZWQ"
BASIC = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


def test_new_country_and_unusual_volume_notices():
    c = Clients()
    ep = endpoint_of("api.test:443", "GET", "/users/42?x=1")
    assert ep == "GET api.test:443 /users/{id}"
    c.add_flow(address="203.0.113.9", ts_ns=1, sensor="s", final=True, sent=1, received=2,
               country="SE", city="Stockholm", asn=1)
    c.add_flow(address="203.0.113.9", ts_ns=2, sensor="s", final=True, sent=1, received=2,
               country="SE")
    c.add_flow(address="203.0.113.9", ts_ns=3, sensor="s", final=True, sent=1, received=2,
               country="DE")
    # five ordinary minutes of 10 requests, then a minute of 150: one notice at 101
    for minute in range(5):
        for i in range(10):
            c.add_request(address="203.0.113.9", ts_ns=minute * MINUTE_NS + i, sensor="s",
                          endpoint=ep, status=200)
    for i in range(150):
        c.add_request(address="203.0.113.9", ts_ns=6 * MINUTE_NS + i, sensor="s",
                      endpoint=ep, status=200)
    kinds = [(n.kind, n.detail) for n in c.notices]
    assert kinds == [("new_client", "first seen"), ("new_country", "DE (before: SE)"),
                     ("unusual_volume", "101 requests this minute, usually 10.0")]
    snap = c.snapshot()[0]
    assert snap["countries"] == ["DE", "SE"] and snap["country"] == "DE"
    assert snap["requests"] == 200 and snap["flows"] == 3


def test_principal_kinds_and_hashes_from_real_header_values():
    def of(**headers):
        return principal.of_headers({k.replace("_", "-").encode(): [v.encode()]
                                     for k, v in headers.items()})

    jwt = of(authorization=f"Bearer {TOKEN}")
    assert jwt == (("bearer",), principal._hash("jwt", SUB))
    assert jwt[1].startswith("p:") and len(jwt[1]) == 18 and SUB not in jwt[1]
    assert of(authorization=f"basic {BASIC}", cookie="a=b") == (
        ("basic", "cookie"), principal._hash("basic", USER))
    assert of(x_api_key="k") == (("api_key",), "")
    # not a JWT, no sub, bad base64, no colon, too long: the kind only
    no_sub = TOKEN.split(".")
    no_sub[1] = base64.urlsafe_b64encode(b'{"iss":"x"}').decode().rstrip("=")
    for value in ("Bearer opaque-token", "Bearer " + ".".join(no_sub), "Basic !!!",
                  "Basic " + base64.b64encode(b"nocolon").decode(),
                  "Bearer " + "a." * 5000 + "b"):
        kinds, who = of(authorization=value)
        assert len(kinds) == 1 and who == "", value
    assert of(authorization="Digest x") == ((), "")


def test_http2_reports_kinds_and_the_principal_hash_per_flow():
    from tests.l7.test_http2 import C, S, Peer, drive, request, settings_frame
    from sensor.l7.http2 import PREFACE

    c, s = Peer(), Peer()
    req = PREFACE + settings_frame() + c.headers(1, request(extra=[
        ("authorization", f"Bearer {TOKEN}"), ("x-api-key", "planted-key")]), flags=0x5)
    resp = settings_frame() + s.headers(1, [(":status", "200")], flags=0x5)
    p, out = drive([(C, req, 1000), (S, resp, 2000), (C, None, 3000), (S, None, 3000)])
    assert len(out) == 1
    summary = p.summary()
    assert summary["http_auth"] == "bearer,api_key"
    assert summary["http_principal"] == principal._hash("jwt", SUB)
    assert "planted-key" not in json.dumps(summary) and TOKEN not in repr(out)
