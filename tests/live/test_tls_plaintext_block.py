"""TLS plaintext, enforced: with the sqli group in block mode, curl sends an SQL injection
over HTTPS to nginx (TLS, proxying to an app that answers after 50 ms) in a namespace.
The request is seen in the plaintext of curl's SSL_write; its verdict blocks the wire
flow it joins (the 5-tuple's entry in the kernel's block map) and resets both ends by
aborting the probed process's socket on this host (the plaintext's offsets are not TCP
sequence numbers). So:
- curl gets no byte of the response and an error, and nginx keeps no connection of it;
- the Alert is the block, enforced;
- a client on another address is untouched, before and after.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sensor.model import Alert, L7Event
from tests.enforce.peers import APP, BODY_LINE, pin_dir  # noqa: F401 - a fixture
from tests.live.rig import Sensor, stop, wait_tcp
from tests.live.tls_peers import certificate, nginx_conf
from tests.netns import VethPair

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(180)]

SQLI = "/items?id=1%27%20UNION%20SELECT%20username,password%20FROM%20users--"
RULES = """
[[group]]
name = "sqli"
mode = "block"
"""
OTHER = "198.18.0.3"   # a second client address in the client's namespace
APP_PORT = 8081


@pytest.fixture
def pair():
    with VethPair.create("tb") as p:
        p.a.run("ip", "addr", "add", f"{OTHER}/24", "dev", p.a.iface)
        p.wait_ready()
        yield p


def _https_proxy(host, workdir: Path) -> list[subprocess.Popen]:
    """nginx with TLS on 443 (tls_peers' configuration) proxying to the app."""
    certificate(workdir)
    (workdir / "www").mkdir(exist_ok=True)
    (workdir / "nginx.conf").write_text(nginx_conf(
        workdir, 443, f"location / {{ proxy_pass http://127.0.0.1:{APP_PORT}; }}"))
    (workdir / "app.py").write_text(APP)
    return [host.popen(sys.executable, str(workdir / "app.py"), str(APP_PORT), "0.05",
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
            host.popen("nginx", "-c", str(workdir / "nginx.conf"), "-e",
                       str(workdir / "error.log"), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)]


def _curl(pair, path: str, source: str | None = None):
    args = ["curl", "-sSk", "--http1.1", "--max-time", "5", "-o", "-"]
    if source:
        args += ["--interface", source]
    out = pair.a.run(*args, f"https://{pair.b.ip4}{path}", check=False, timeout=15)
    return out.returncode, out.stdout, out.stderr


def test_sqli_over_https_is_blocked_and_reset(pair, tmp_path, pin_dir):
    rules = tmp_path / "block.toml"
    rules.write_text(RULES)
    procs = _https_proxy(pair.b, tmp_path)
    sensor = Sensor(["--netns", pair.a.netns, "--iface", pair.a.iface, "--output", "jsonl",
                     "--spool-dir", str(tmp_path / "spool"), "--interval", "0.5",
                     "--sensor-id", "tlsblock", "--collector", "127.0.0.1:9",
                     "--tls-plaintext", "--set", "rules.enabled=true",
                     "--set", f"rules.path={rules}", "--set", f"enforce.pin_dir={pin_dir}"],
                    workdir=tmp_path)
    try:
        wait_tcp(pair.a, pair.b.ip4, 443)
        sensor.start()
        code, body, _ = _curl(pair, "/hello", source=OTHER)
        assert code == 0 and BODY_LINE.decode() in body      # the path works

        code, body, err = _curl(pair, SQLI)
        assert code != 0 and body == "", (code, body, err)  # no response byte
        assert "abort" in err.lower() or "reset" in err.lower(), err
        ss = pair.b.run("ss", "-Htn", "state", "established", "( sport = :443 )").stdout
        assert f"{pair.a.ip4}:" not in ss, ss

        code, body, _ = _curl(pair, "/hello", source=OTHER)   # untouched
        assert code == 0 and BODY_LINE.decode() in body
        enforcement = sensor.metrics()["loupe_enforcement"]
        assert enforcement["flows_blocked"] == 1 and enforcement["resets_sent"] == 2, enforcement
        assert sensor.stop() == 0
    finally:
        sensor.kill()
        for p in procs:
            stop(p)
    records = sensor.records()
    [alert] = [r for r in records if isinstance(r, Alert) and r.rule_id == "loupe-sqli"]
    assert alert.action == "block" and alert.enforced and alert.src_addr == pair.a.ip4
    events = [r for r in records if isinstance(r, L7Event) and r.kind == "http"]
    assert {e.source for e in events} == {"tls_plaintext"}
    assert alert.community_id in {e.community_id for e in events}
    assert "Traceback" not in sensor.stderr
