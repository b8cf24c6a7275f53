"""nginx (Debian's) as a test peer: one configuration shape for every test that runs it.
It runs in the foreground as root, with its pid, logs and temp paths under the test's own
directory, so instances never touch /var or each other."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def binary() -> str:
    """The nginx executable; skips the test when nginx is not installed."""
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(found).exists():
        pytest.skip("nginx is not installed (scripts/apt-packages.txt: nginx-light)")
    return found


def config(workdir: Path, server: str, *, http: str = "", connections: int = 256) -> str:
    """A whole nginx.conf with one server block: `server` holds its directives, `http`
    any more directives of the http block."""
    return f"""
daemon off;
user root;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections {connections}; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    {http}
    server {{
        {server}
    }}
}}
"""
