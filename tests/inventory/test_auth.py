"""Authentication per request, from real bytes to the inventory: an HTTP/1 keep-alive
connection that mixes public and authenticated requests marks only the authenticated
ones; `loupe replay` from two sensors into a real collector, kept across a restart, gives
each endpoint its kinds with request counts, and `loupe api spec` its security; HTTP/2
streams of real nghttp traffic carry their own credentials; no credential value is in
any output."""

from __future__ import annotations

import base64
import gzip
import json
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from openapi_spec_validator import validate

from sensor import model
from sensor.export.jsonfmt import to_dict
from sensor.l7 import principal
from sensor.replay import replay_records
from tests.fixtures.gen_golden import _tcp_conversation

LOUPE = str(Path(sys.executable).with_name("loupe"))
SERVER, CLIENT = "198.18.31.2", "198.18.31.1"
SUB, USER, PASSWORD = "planted-sub-4410", "planted-login-9120", "planted-pw-5173"
COOKIE, API_KEY = "sess=planted-cookie-2291", "planted-api-key-77412"


def _b64url(doc: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()


JWT = f"{_b64url({'alg': 'HS256', 'typ': 'JWT'})}.{_b64url({'sub': SUB})}.c2lnbmF0dXJl"
BASIC = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
SECRETS = (SUB, USER, PASSWORD, COOKIE, "planted-cookie-2291", API_KEY, JWT, BASIC)

# (method, path, credential headers) on ONE keep-alive connection, in order.
REQUESTS = [
    ("GET", "/news", {}),
    ("GET", "/api/me", {"Authorization": f"Bearer {JWT}"}),
    ("POST", "/api/login", {"Authorization": f"Basic {BASIC}"}),
    ("GET", "/news", {}),
    ("GET", "/api/cart", {"Cookie": COOKIE}),
    ("GET", "/api/cart", {}),
    ("GET", "/api/me", {"Authorization": f"Bearer {JWT}", "X-Api-Key": API_KEY}),
]


def write_capture(path: Path) -> None:
    from scapy.utils import wrpcap

    steps = []
    for method, target, creds in REQUESTS:
        head = [f"{method} {target} HTTP/1.1", f"Host: {SERVER}", *(
            f"{k}: {v}" for k, v in creds.items())]
        if method == "POST":
            head.append("Content-Length: 0")
        steps.append((True, ("\r\n".join(head) + "\r\n\r\n").encode()))
        steps.append((False, b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                             b"Content-Length: 3\r\n\r\nok\n"))
    wrpcap(str(path), _tcp_conversation(CLIENT, SERVER, 42000, 80, steps,
                                        t0=1_700_000_100.0))


def _absent(name: str, blob: bytes | str) -> None:
    data = blob.encode() if isinstance(blob, str) else blob
    found = [s for s in SECRETS if s.encode() in data]
    assert not found, f"{name} holds credential values {found}"


def test_per_request_auth_from_a_keep_alive_connection(tmp_path):
    cap = tmp_path / "auth.pcap"
    write_capture(cap)
    records = [to_dict(r) for r in replay_records(cap)]
    http = [r["detail"] for r in records if r["type"] == "http"]
    assert [(h["method"], h["path"], [c["kind"] for c in h["auth"]]) for h in http] == [
        ("GET", "/news", []), ("GET", "/api/me", ["bearer"]), ("POST", "/api/login", ["basic"]),
        ("GET", "/news", []), ("GET", "/api/cart", ["cookie"]), ("GET", "/api/cart", []),
        ("GET", "/api/me", ["bearer", "api_key"])]
    # The JWT sub and the basic user as salted hashes: the same sub, the same hash.
    me, login = http[1]["auth"][0]["principal"], http[2]["auth"][0]["principal"]
    assert me.startswith("p:") and login.startswith("p:") and me != login
    assert http[6]["auth"][0]["principal"] == me and http[6]["auth"][1]["principal"] == ""
    # The connection's summary is the union (what the flow alone could say).
    (flow,) = [r for r in records if r["type"] == "flow"]
    assert flow["l7_summary"]["http_auth"] == "bearer,basic,cookie,api_key"
    _absent("replay records", json.dumps(records))


def test_replay_into_a_collector_from_two_sensors_and_the_spec(tmp_path, start_collector):
    cap = tmp_path / "auth.pcap"
    write_capture(cap)
    first = start_collector()
    procs = [subprocess.Popen([LOUPE, "replay", "--no-progress", str(cap), "--collector",
                               first.address, "--sensor-id", sid], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for sid in ("a", "b")]
    logs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        logs.append(out + err)
    first.stop()
    second = start_collector()   # the inventory's file is read back

    # The three commands at once (each is seconds of imports on a busy machine).
    calls = [subprocess.Popen([LOUPE, *args, "--collector", second.address],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for args in (("endpoints", "-o", "json"), ("endpoints", "--format", "table"),
                          ("api", "spec", "--format", "json"),
                          ("clients", "--output", "json"))]
    outputs = []
    for proc in calls:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outputs.append(out)
    endpoints_json, table, spec_text, clients_json = outputs
    # The client's principals from its requests: both, where the connection's summary
    # names only the first (the JWT sub).
    (client,) = [json.loads(x) for x in clients_json.splitlines()]
    assert client["address"] == CLIENT and client["principals"] == sorted(
        [principal._hash("jwt", SUB), principal._hash("basic", USER)])
    assert client["auth"] == ["api_key", "basic", "bearer", "cookie"]
    rows = {(r["method"], r["path_template"]): r for r in map(
        json.loads, endpoints_json.splitlines())}
    got = {k: (r["requests"], r["auth_counts"], r["authenticated"], r["unauthenticated"])
           for k, r in rows.items()}
    assert got == {("GET", "/news"): (4, {}, 0, 4),
                   ("GET", "/api/me"): (4, {"api_key": 2, "bearer": 4}, 4, 0),
                   ("POST", "/api/login"): (2, {"basic": 2}, 2, 0),
                   ("GET", "/api/cart"): (4, {"cookie": 2}, 2, 2)}
    assert rows[("GET", "/api/me")]["auth"] == ["api_key", "bearer"]
    assert "api_key:2,bearer:4" in table
    doc = json.loads(spec_text)
    validate(doc)
    assert doc["components"]["securitySchemes"] == {
        "apiKeyAuth": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        "basicAuth": {"type": "http", "scheme": "basic"},
        "bearerAuth": {"type": "http", "scheme": "bearer"},
        "cookieAuth": {"type": "apiKey", "in": "cookie", "name": "session"}}
    ops = {(m, p): op for p, item in doc["paths"].items() for m, op in item.items()}
    assert ops[("get", "/api/me")]["security"] == [{"apiKeyAuth": []}, {"bearerAuth": []}]
    assert ops[("post", "/api/login")]["security"] == [{"basicAuth": []}]
    # Served without a credential at least once: no security requirement.
    assert "security" not in ops[("get", "/api/cart")] and "security" not in ops[("get", "/news")]
    second.stop()
    for p in (tmp_path / "data").rglob("*"):
        if p.is_file():
            _absent(f"collector file {p.name}", p.read_bytes())
    duck = next((tmp_path / "data").glob("*.duckdb"))
    with duckdb.connect(str(duck), read_only=True) as db:
        stored = db.execute("SELECT auth FROM http ORDER BY ts_ns").fetchall()
    assert sorted(",".join(c["kind"] for c in row[0]) for row in stored) == sorted(
        ["", "bearer", "basic", "", "cookie", "", "bearer,api_key"] * 2)
    _absent("DuckDB http.auth", json.dumps(stored, default=str))
    _absent("loupe output and logs", spec_text + table + clients_json + "\n".join(logs))


def test_http2_streams_carry_their_own_credentials(tmp_path):
    """nghttp's three requests carried a planted Authorization and Cookie; its other
    connections (a POST, h2load, grpcio) none (tests/fixtures/gen_http2.py)."""
    from tests.fixtures.gen_http2 import SECRETS as H2_SECRETS

    golden = Path(__file__).resolve().parent.parent / "golden" / "http2-parser"
    cap = tmp_path / "session.pcap"
    cap.write_bytes(gzip.decompress((golden / "session.pcap.gz").read_bytes()))
    records = [to_dict(r) for r in replay_records(cap)]
    streams = [r["detail"] for r in records if r["type"] == "http2"]
    authed = [(s["path"], [c["kind"] for c in s["auth"]]) for s in streams if s["auth"]]
    assert [kinds for _, kinds in authed] == [["bearer", "cookie"]] * 3
    assert [p.split("?")[0] for p, _ in authed] == ["/index.html", "/missing", "/blob.bin"]
    # Its push was promised by the server: no credential of its own.
    assert any(s["pushed"] and not s["auth"] for s in streams)
    assert len(streams) - len(authed) >= 20
    blob = json.dumps(records)
    assert not [s for s in H2_SECRETS if s in blob]


def test_a_credential_value_is_refused_by_the_record():
    model.HttpCredential(kind="bearer", principal="p:0123456789abcdef")
    for bad in ("alice", "p:alice", "p:0123456789ABCDEF", "p:0123456789abcdef0"):
        with pytest.raises(ValueError):
            model.HttpCredential(kind="basic", principal=bad)
