"""The default selection, as a user meets it: `loupe sensor run` with an empty config file
(every key at the schema's default) sees HTTP on a port no rule lists (18080), because
content sniffing is on by default (issue 11, bug 7: the docs said so, the code did not)."""

from __future__ import annotations

import pytest

from sensor.config import SelectionConfig
from sensor.model import HttpEvent, L7Event
from tests.live.rig import Sensor, start_http, stop, wait_tcp
from tests.netns import VethPair

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(120)]

PORT = 18080


def test_default_config_sees_http_on_an_unlisted_port(tmp_path):
    assert PORT not in SelectionConfig().ports   # so only sniffing can select it
    empty = tmp_path / "sensor.toml"
    empty.write_text("")
    with VethPair.create("lds") as pair:
        server = start_http(pair.b, tmp_path, PORT)
        sensor = Sensor(["--config", str(empty), "--netns", pair.a.netns, "--iface",
                         pair.a.iface, "--collector", "", "--output", "jsonl",
                         "--set", "timeouts.tcp_linger=1s"], workdir=tmp_path)
        try:
            wait_tcp(pair.a, pair.b.ip4, PORT)
            sensor.start()
            for n in range(3):
                pair.a.run("curl", "-s", "-o", "/dev/null", "--max-time", "5",
                           f"http://{pair.b.ip4}:{PORT}/size/{n + 10}")
        finally:
            code = sensor.stop() if sensor.proc is not None else None
            stop(server)
    assert code == 0, sensor.stderr
    assert "sniff" in sensor.stderr   # the selection it logged at start
    http = [r for r in sensor.records() if isinstance(r, L7Event) and isinstance(r.detail, HttpEvent)]
    assert sorted(r.detail.path for r in http) == ["/size/10", "/size/11", "/size/12"]
    assert {r.dst_port for r in http} == {PORT}
