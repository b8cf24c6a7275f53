"""The TLS plaintext budget on real traffic: curl fetches the same number of 1 KiB and of
10 MiB bodies over one keep-alive HTTPS connection to nginx (two namespaces), with the
probes and the plaintext L7 stage running in this process (selection by process name:
only curl). Every response is parsed in both runs, and the plaintext octets copied by
the kernel (its own counter) stay nearly the same although 10000 times more crossed:
the skip of each body of known length is decided in the kernel (tls_ctl.skip_until)."""

from __future__ import annotations

import subprocess
import time

import pytest

from sensor.engine.plaintext import ROOM_TARGET
from sensor.engine.plaintext_live import PlaintextConfig, PlaintextSensor
from sensor.kernel.ringbuf import RingBuffer
from sensor.model import L7Event
from tests.live.rig import stop, wait_tcp
from tests.live.tls_peers import nginx
from tests.netns import VethPair

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(240)]

REQUESTS = 20
BUDGET = 32 << 10


def _run(pair, size_name: str) -> tuple[list, dict]:
    records: list = []
    # A budget the 20 small responses fit in (heads and 1 KiB bodies come in one call
    # each): the small run then never waits for a grant, however loaded the machine.
    sensor = PlaintextSensor(PlaintextConfig(processes=("curl",), budget_octets=BUDGET),
                             emit=records.append,
                             origin=lambda key: None, uid_of=lambda key: None)
    ring = RingBuffer()
    sensor.start(ring.add)
    try:
        argv = ["curl", "-sk", "--http1.1"]
        for i in range(REQUESTS):
            if i:
                argv += ["--next", "-sk", "--http1.1"]
            argv += ["-o", "/dev/null", "-w", "%{http_code}\\n",
                     f"https://{pair.b.ip4}/{size_name}"]
        client = pair.a.popen(*argv, stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while client.poll() is None and time.monotonic() < deadline:
            ring.poll(50)
            sensor.step(0, time.monotonic_ns())
        assert client.wait(5) == 0
        assert client.stdout.read().split() == ["200"] * REQUESTS
        for _ in range(4):
            ring.poll(50)
            sensor.step(0, time.monotonic_ns())
        sensor.flush_all()
        return [r for r in records if isinstance(r, L7Event)], sensor.counters()
    finally:
        sensor.close()
        ring.close()


def test_large_bodies_cost_what_small_ones_do(tmp_path):
    with VethPair.create("tb") as pair:
        pair.wait_ready()
        srv = nginx(pair.b, tmp_path, files={"small": 1 << 10, "large": 10 << 20})
        try:
            wait_tcp(pair.a, pair.b.ip4, 443)
            small_events, small = _run(pair, "small")
            large_events, large = _run(pair, "large")
        finally:
            stop(srv)
    for events, size, counters in ((small_events, 1 << 10, small),
                                   (large_events, 10 << 20, large)):
        assert [(e.detail.method, e.detail.status) for e in events] == \
            [("GET", 200)] * REQUESTS, (size, counters)
        assert {e.detail.response_body_len for e in events} == {size}
        assert {e.source for e in events} == {"tls_plaintext"}
    # Both runs copy heads and a little body; the 10 MiB bodies are skipped in the kernel.
    # A body in flight before its skip lands copies at most the room kept for the next
    # head (ROOM_TARGET); the first one at most the budget.
    assert large["copied"] < 3 * small["copied"] + REQUESTS * ROOM_TARGET, (small, large)
    assert large["copied"] < REQUESTS * (10 << 20) // 1000
    # Most of each body is skipped in the kernel; what a lagging userspace let pass
    # before a skip landed is counted as truncated, not copied.
    assert large["skipped"] > REQUESTS * (5 << 20)
    assert large["skipped"] + large["truncated"] + large["copied"] >= REQUESTS * (10 << 20)
    assert large["ringbuf_full"] == 0 and small["ringbuf_full"] == 0
