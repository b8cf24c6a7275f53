"""A test app of known latency and its driver.

    python latency_app.py serve HOST PORT
    python latency_app.py drive HOST PORT CLIENT_IP      -> JSON counts on stdout

The server answers GET /fast/<n> after 10 ms, GET /slow after 100 ms, and GET /flaky at
once with a planted 500 on every FLAKY_EVERY-th request (its own counter), 200 otherwise.
The driver sends FAST, SLOW and FLAKY requests, interleaved, alternating between two
sides whose keep-alive connections come from source ports PORT_A.. and PORT_B.., so a
capture splits into two halves by port range (one per sensor in the test). A connection
carries PER_CONN requests: the sensor inspects a flow up to its byte budget (16 KiB is
~78 of these exchanges), and these must all be seen. It prints how many of each it sent
and how many 500s it got.
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAST, SLOW, FLAKY = 60, 30, 80
FLAKY_EVERY = 4
PORT_A, PORT_B = 40000, 41000   # first source port of each side; 999 each
PER_CONN = 20


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"      # keep-alive: one connection per driver port
    flaky = 0
    lock = threading.Lock()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        status = 200
        if self.path.startswith("/fast/"):
            time.sleep(0.010)
        elif self.path == "/slow":
            time.sleep(0.100)
        elif self.path == "/flaky":
            with Handler.lock:
                Handler.flaky += 1
                if Handler.flaky % FLAKY_EVERY == 0:
                    status = 500
        else:
            status = 404
        body = b"ok\n" if status == 200 else b"no\n"
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def drive(host: str, port: int, client_ip: str) -> dict:
    def connect(side: int, n: int) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(host, port, timeout=10, source_address=(
            client_ip, (PORT_A, PORT_B)[side] + n))

    conns = [connect(0, 0), connect(1, 0)]
    paths = ([f"/fast/{i}" for i in range(FAST)] + ["/slow"] * SLOW + ["/flaky"] * FLAKY)
    # Interleaved so both halves see every endpoint; deterministic.
    paths = [paths[(i * 7) % len(paths)] for i in range(len(paths))]
    assert len(set(paths)) == FAST + 2
    errors = 0
    for i, path in enumerate(paths):
        side, n = i % 2, i // 2
        if n and n % PER_CONN == 0:
            conns[side].close()
            conns[side] = connect(side, n // PER_CONN)
        conn = conns[side]
        conn.request("GET", path, headers={"Host": f"app.test:{port}"})
        resp = conn.getresponse()
        resp.read()
        errors += resp.status == 500
    for conn in conns:
        conn.close()
    return {"fast": FAST, "slow": SLOW, "flaky": FLAKY, "flaky_500": errors}


if __name__ == "__main__":
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "serve":
        ThreadingHTTPServer((host, port), Handler).serve_forever()
    else:
        print(json.dumps(drive(host, port, sys.argv[4])))
