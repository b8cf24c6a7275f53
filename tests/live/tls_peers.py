"""TLS peers for the TLS plaintext tests: a certificate, nginx (Debian's) with its own
configuration, and `openssl s_server -WWW`, each in a test namespace; a Go HTTPS client
built from source."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import nginx as nginx_peer

GO_CLIENT = Path(__file__).parent / "go" / "tlsclient.go"



def nginx_conf(workdir: Path, port: int, locations: str = "") -> str:
    """nginx.conf serving workdir/www with TLS (workdir's certificate) on port, plus any
    `locations` of the caller's."""
    return nginx_peer.config(workdir, f"""listen {port} ssl;
        listen [::]:{port} ssl;
        ssl_certificate {workdir}/cert.pem;
        ssl_certificate_key {workdir}/key.pem;
        {locations}
        root {workdir}/www;
        location = /post {{ return 200 "posted\\n"; }}""", http="keepalive_requests 10000;")


def certificate(workdir: Path) -> tuple[Path, Path]:
    key, cert = workdir / "key.pem", workdir / "cert.pem"
    if not cert.exists():
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-days", "2", "-subj", "/CN=tls.plaintext.test"],
                       check=True, capture_output=True, timeout=30)
    return key, cert


def nginx(host, workdir: Path, port: int = 443, files: dict[str, int] | None = None
          ) -> subprocess.Popen:
    """nginx serving workdir/www (files: name -> size) with TLS on port, in host's
    namespace; skips the test when nginx is not installed."""
    binary = nginx_peer.binary()
    certificate(workdir)
    www = workdir / "www"
    www.mkdir(exist_ok=True)
    for name, size in (files or {"index.html": 612, "a.txt": 100}).items():
        (www / name).write_bytes(b"x" * size)
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_conf(workdir, port))
    return host.popen(binary, "-c", str(conf), "-e", str(workdir / "error.log"),
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def s_server(host, workdir: Path, port: int = 4433) -> subprocess.Popen:
    """openssl s_server -WWW: files relative to workdir/www."""
    key, cert = certificate(workdir)
    www = workdir / "www"
    www.mkdir(exist_ok=True)
    return host.popen("openssl", "s_server", "-WWW", "-accept", str(port), "-cert", str(cert),
                      "-key", str(key), "-quiet", cwd=www, stdin=subprocess.DEVNULL,
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def go_client(workdir: Path) -> Path:
    """tests/live/go/tlsclient.go built with `go build` (offline: the standard library
    only; cgo on, the default, so the distribution's prebuilt standard library is used
    and the build takes seconds); skips the test when Go is not installed."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed (scripts/apt-packages.txt: golang-go)")
    src = workdir / "gosrc"
    src.mkdir()
    shutil.copy(GO_CLIENT, src / "main.go")
    (src / "go.mod").write_text("module loupetest/tlsclient\n\ngo 1.17\n")
    env = {**os.environ, "HOME": str(workdir), "GOCACHE": str(workdir / "gocache"),
           "GOPATH": str(workdir / "gopath"), "GOPROXY": "off", "GOFLAGS": "-mod=mod"}
    out = workdir / "tlsclient"
    subprocess.run([go, "build", "-o", str(out), "."], cwd=src, env=env, check=True,
                   capture_output=True, timeout=180)
    return out
