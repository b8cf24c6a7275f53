"""Block works, live: `loupe sensor run` with the sqli group in block mode (and a source
ban) watches a web server (nginx proxying to an app that answers after 50 ms) in a
namespace; curl in another namespace sends an SQL injection.

- the client gets no byte of the response and a reset (curl: connection reset), and the
  server's socket is reset too (no connection of that client left in the server);
- the next connection from the same source within the TTL is dropped at its first packet
  (the server's listener never takes it: PassiveOpens unchanged);
- a client on another address is untouched;
- `loupe block list` shows the source, `loupe block del` lifts it;
- the Alert says enforced, with the block's expiry;
- hold mode, with a server that answers at once (0 ms): the same, the benign response
  arrives whole, and the blocked one leaks nothing because the kernel held it;
- SIGKILL the sensor while a ban is active: traffic flows again (fail open).
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from sensor.model import Alert
from tests.enforce.peers import (BODY_LINE, passive_opens, pin_dir,  # noqa: F401 - a fixture
                                  web_server)
from tests.live.rig import Sensor, stop, wait_tcp
from tests.netns import VethPair

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(180)]

SQLI = "/items?id=1%27%20UNION%20SELECT%20username,password%20FROM%20users--"
RULES = """
[[group]]
name = "sqli"
mode = "block"
block_source_ttl = "60s"
"""
OTHER = "198.18.0.3"   # a second client address in the client's namespace


@pytest.fixture
def pair():
    with VethPair.create("eb") as p:
        p.a.run("ip", "addr", "add", f"{OTHER}/24", "dev", p.a.iface)
        p.wait_ready()
        yield p


def _sensor(pair, tmp_path, pin_dir, *extra: str) -> Sensor:
    rules = tmp_path / "block.toml"
    rules.write_text(RULES)
    return Sensor(["--netns", pair.b.netns, "--iface", pair.b.iface, "--output", "jsonl",
                   "--spool-dir", str(tmp_path / "spool"), "--interval", "0.5",
                   "--sensor-id", "enforcetest", "--collector", "127.0.0.1:9",
                   "--set", "rules.enabled=true", "--set", f"rules.path={rules}",
                   "--set", f"enforce.pin_dir={pin_dir}", *extra], workdir=tmp_path)


def curl(pair, path: str, *, source: str | None = None, max_time: float = 5):
    """(exit status, body, stderr) of one GET to the server over IPv4."""
    args = ["curl", "-sS", "--max-time", str(max_time), "-o", "-"]
    if source:
        args += ["--interface", source]
    out = pair.a.run(*args, f"http://{pair.b.ip4}{path}", check=False, timeout=max_time + 10)
    return out.returncode, out.stdout, out.stderr


def block_cli(pin_dir, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sensor.cli", "block", *args,
                           "--pin-dir", str(pin_dir)], capture_output=True, text=True,
                          timeout=30)


def server_connections(pair, client: str) -> list[str]:
    out = pair.b.run("ss", "-Htn", "state", "all", "( sport = :80 )").stdout
    return [ln for ln in out.splitlines() if f"{client}:" in ln and "LISTEN" not in ln
            and "TIME-WAIT" not in ln]


def test_block_flow_and_source(pair, tmp_path, pin_dir):
    procs = web_server(pair.b, tmp_path, delay_s=0.05)
    sensor = _sensor(pair, tmp_path, pin_dir)
    try:
        wait_tcp(pair.a, pair.b.ip4, 80)
        sensor.start()
        code, body, _ = curl(pair, "/hello")
        assert code == 0 and BODY_LINE.decode() in body     # the path works

        code, body, err = curl(pair, SQLI)
        assert code == 56 and "reset" in err.lower(), (code, err)   # told, by a RST
        assert body == ""                                           # no response byte
        time.sleep(0.3)   # the app answers after 50 ms; nginx then writes to a dead socket
        assert server_connections(pair, pair.a.ip4) == [], pair.b.run("ss", "-tan").stdout
        opens = passive_opens(pair.b)   # nginx's and the app's listeners, in the server

        # The same source within the TTL: dropped at its first packet (the SYN).
        code, _, err = curl(pair, "/hello", max_time=1.5)
        assert code == 28, (code, err)
        assert passive_opens(pair.b) == opens
        # Another address is untouched.
        code, body, _ = curl(pair, "/hello", source=OTHER)
        assert code == 0 and BODY_LINE.decode() in body

        listed = block_cli(pin_dir, "list")
        assert listed.returncode == 0, listed
        [row] = [ln for ln in listed.stdout.splitlines() if ln.startswith(f"{pair.a.ip4}/32")]
        assert "rule" in row and "loupe-sqli" in row and "in 5" in row, listed.stdout
        assert any(ln.startswith("tcp ") for ln in listed.stdout.splitlines())   # the flow

        lifted = block_cli(pin_dir, "del", pair.a.ip4)
        assert lifted.returncode == 0 and "unblocked" in lifted.stdout, lifted
        code, body, _ = curl(pair, "/hello")
        assert code == 0 and BODY_LINE.decode() in body
        assert block_cli(pin_dir, "del", pair.a.ip4).returncode == 1
        enforcement = sensor.metrics()["loupe_enforcement"]
        assert enforcement["flows_blocked"] == 1 and enforcement["sources_blocked"] == 1
        assert enforcement["resets_sent"] == 2, enforcement
        # IPv6: the same block and resets (raw IPv6 socket).
        out = pair.a.run("curl", "-sS", "-g", "--max-time", "5", "-o", "-",
                         f"http://[{pair.b.ip6}]{SQLI}", check=False, timeout=15)
        assert out.returncode == 56 and "reset" in out.stderr.lower(), out
        assert out.stdout == ""
        assert sensor.stop() == 0
    finally:
        sensor.kill()
        for p in procs:
            stop(p)
    alerts = [r for r in sensor.records() if isinstance(r, Alert)]
    sqli = {a.src_addr: a for a in alerts if a.rule_id == "loupe-sqli"}
    assert set(sqli) == {pair.a.ip4, pair.a.ip6}
    a = sqli[pair.a.ip4]
    assert a.action == "block" and a.enforced and a.held_ns == 0   # no hold configured
    assert 50 * 10**9 < a.block_expires_ns - a.ts_ns < 70 * 10**9   # the 60 s source ban
    # A clean stop lifts everything and takes the pins away.
    assert not (pin_dir / "block_src").exists()


def test_hold_mode_with_a_0ms_server_then_sigkill_fails_open(pair, tmp_path, pin_dir):
    """Hold mode: the server answers at once, before any verdict (without hold,
    bench_enforce sees bytes of blocked responses leak); held, nothing leaks. Then, on the
    same sensor (one start, for the suite's time), SIGKILL while a ban is active."""
    procs = web_server(pair.b, tmp_path, delay_s=0)
    sensor = _sensor(pair, tmp_path, pin_dir, "--set",
                     f"enforce.hold={pair.b.ip4}:80,[{pair.b.ip6}]:80")
    try:
        wait_tcp(pair.a, pair.b.ip4, 80)
        sensor.start()
        code, body, _ = curl(pair, "/hello")   # allowed: released, whole
        assert code == 0 and body == BODY_LINE.decode() * 40
        code, body, err = curl(pair, SQLI)
        assert code == 56 and "reset" in err.lower(), (code, err)
        assert body == ""
        opens = passive_opens(pair.b)
        code, _, err = curl(pair, "/hello", max_time=1.5)
        assert code == 28, (code, err)               # the source is banned: SYN dropped
        assert passive_opens(pair.b) == opens
        code, body, _ = curl(pair, "/hello", source=OTHER)
        assert code == 0 and body == BODY_LINE.decode() * 40
        out = pair.a.run("curl", "-sS", "-g", "--max-time", "5", "-o", "-",
                         f"http://[{pair.b.ip6}]{SQLI}", check=False, timeout=15)
        assert out.returncode == 56 and out.stdout == "", out
        enforcement = sensor.metrics()["loupe_enforcement"]
        # Both blocks found their response still held in the kernel: nothing leaked.
        assert enforcement["flows_blocked"] == 2 and enforcement["held_blocks"] == 2, \
            enforcement
        assert enforcement["holds_released"] == 2 and enforcement["resets_sent"] == 4, \
            enforcement

        # Fail open, with a ban and holds in force.
        added = block_cli(pin_dir, "add", pair.a.ip4, "--ttl", "10m", "--note", "test")
        assert added.returncode == 0, added
        code, _, _ = curl(pair, "/hello", max_time=1)
        assert code == 28
        sensor.proc.kill()
        sensor.proc.wait(10)
        killed = time.monotonic()
        # Fail open: traffic flows again, bounded by the heartbeat's staleness (3 s), and
        # the held service's responses are no longer held.
        deadline = killed + 10
        while time.monotonic() < deadline:
            code, body, _ = curl(pair, "/hello", max_time=0.5)
            if code == 0:
                break
        flowing = time.monotonic() - killed
        assert code == 0 and BODY_LINE.decode() in body
        assert flowing < 4.5, flowing
        # The pins a killed sensor left are no sensor to the CLI once its heartbeat is
        # stale (the kernel ignores their entries from then on, attached or not).
        time.sleep(max(0.0, killed + 3.2 - time.monotonic()))
        gone = block_cli(pin_dir, "list")
        assert gone.returncode == 3 and "not running" in gone.stdout, gone
    finally:
        sensor.kill()
        for p in procs:
            stop(p)

