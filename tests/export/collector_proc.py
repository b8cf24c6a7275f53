"""A real collector in a child process, for delivery tests that must kill it (SIGKILL)
and start it again over the same DuckDB file, and a Query helper over Observer."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc

from sensor.export import wire
from tests.conftest import REPO

_CHILD = """
import asyncio, logging, sys
from pathlib import Path
from collector.server import CollectorConfig, serve
logging.basicConfig(level=logging.WARNING, format="collector %(levelname)s %(name)s: %(message)s")
listen, data_dir, cert, key, ca = sys.argv[1:6]
tls = dict(tls_cert=Path(cert), tls_key=Path(key), tls_ca=Path(ca)) if cert else {}
asyncio.run(serve(CollectorConfig(listen=listen, data_dir=Path(data_dir), grace_s=1.0, **tls)))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CollectorProcess:
    """`python -c` running collector.server.serve on a fixed port (so a restart comes
    back at the same address), storing to data_dir."""

    def __init__(self, data_dir: Path, *, port: int | None = None, tls: tuple = ()) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.tls = tls  # (server cert, server key, client CA) paths, or ()
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 20.0) -> "CollectorProcess":
        cert, key, ca = (str(p) for p in self.tls) if self.tls else ("", "", "")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, self.address, str(self.data_dir), cert, key, ca],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"collector exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("collector did not start listening")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


def query(address: str, sql: str, *, credentials=None, server_name: str = "") -> list[list]:
    """Rows of a read-only SQL statement, through Observer.Query."""
    from loupe.v1 import observer_pb2_grpc

    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    channel = (grpc.secure_channel(address, credentials, options=options) if credentials
               else grpc.insecure_channel(address))
    with channel:
        stub = observer_pb2_grpc.ObserverStub(channel)
        resp = stub.Query(wire.observer_pb2.QueryRequest(sql=sql, max_rows=1_000_000),
                          timeout=20)
    return [json.loads(r) for r in resp.rows_json]


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
