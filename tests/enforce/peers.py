"""The web server the enforcement tests and benchmark block requests to: nginx (Debian's)
on port 80 in a namespace, proxying to a small Python application on 127.0.0.1 that
answers after a fixed delay (the time a real application takes, during which the
verdict races the response)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests import nginx as nginx_peer

# Every answer is BODY_LINE * 40 (1 KiB), so a test can tell any leaked byte of it.
BODY_LINE = b"secret-response-body-0123456\n"

APP = r"""
import sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
DELAY = float(sys.argv[2])
BODY = %r * 40
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def do_GET(self):
        if DELAY:
            time.sleep(DELAY)
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""" % BODY_LINE

def web_server(host, workdir: Path, *, delay_s: float = 0.05, port: int = 80,
               app_port: int = 8081) -> list[subprocess.Popen]:
    """nginx on host:port proxying to the app (answers after delay_s); skips the test
    when nginx is not installed. Returns the processes (stop them with tests.live.rig.stop)."""
    binary = nginx_peer.binary()
    app = workdir / "app.py"
    app.write_text(APP)
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_peer.config(workdir, f"listen {port}; listen [::]:{port}; "
                                 f"location / {{ proxy_pass http://127.0.0.1:{app_port}; }}"))
    procs = [host.popen(sys.executable, str(app), str(app_port), str(delay_s),
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    procs.append(host.popen(binary, "-c", str(conf), "-e", str(workdir / "error.log"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def passive_opens(host) -> int:
    """The namespace's TCP PassiveOpens (/proc/net/snmp): connections its listeners took,
    which a SYN dropped at the TC hook never becomes."""
    lines = [ln.split() for ln in host.run("cat", "/proc/net/snmp").stdout.splitlines()
             if ln.startswith("Tcp:")]
    return int(lines[1][lines[0].index("PassiveOpens")])


@pytest.fixture
def pin_dir():
    """A pin directory of the test's own under /sys/fs/bpf, removed with what it holds."""
    d = Path(f"/sys/fs/bpf/loupe-test-{uuid.uuid4().hex[:8]}")
    yield d
    for f in d.glob("*"):
        f.unlink()
    if d.exists():
        d.rmdir()
