"""Selection by process name and by cgroup, decided in the kernel at the call's entry:
two curl clients against nginx, one of them in a cgroup of its own (or under another
name); only the selected one's calls are copied (the kernel's not_selected counter
grows for the other, and its requests never come out)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from sensor.engine.plaintext_live import PlaintextConfig, PlaintextSensor, cgroup2_root
from sensor.kernel.ringbuf import RingBuffer
from sensor.model import L7Event
from tests.live.rig import stop, wait_tcp
from tests.live.tls_peers import nginx
from tests.netns import VethPair

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(180)]



def _serve(sensor, ring, clients) -> None:
    deadline = time.monotonic() + 60
    while any(c.poll() is None for c in clients) and time.monotonic() < deadline:
        ring.poll(50)
        sensor.step(0, time.monotonic_ns())
    for c in clients:
        assert c.wait(5) == 0
    for _ in range(4):
        ring.poll(50)
        sensor.step(0, time.monotonic_ns())


def _paths(records) -> list[str]:
    return sorted(r.detail.path for r in records if isinstance(r, L7Event))


@pytest.fixture
def peer(tmp_path):
    with VethPair.create("ts") as pair:
        pair.wait_ready()
        srv = nginx(pair.b, tmp_path)
        try:
            wait_tcp(pair.a, pair.b.ip4, 443)
            yield pair
        finally:
            stop(srv)


def _curl(pair, path: str, *, name: str = "curl", cgroup: Path | None = None):
    """curl in pair.a's namespace; run as `name` (a copy of curl) or inside `cgroup`.
    nsenter, not `ip netns exec`: that mounts a fresh /sys, without the cgroup tree."""
    enter = f"echo $$ > {cgroup}/cgroup.procs && " if cgroup else ""
    return subprocess.Popen(["nsenter", f"--net=/run/netns/{pair.a.netns}", "sh", "-c",
                             f"{enter}exec {name} -sk -o /dev/null "
                             f"https://{pair.b.ip4}{path}"])


def test_selection_by_process_name(peer, tmp_path):
    other = tmp_path / "othercurl"
    shutil.copy(shutil.which("curl"), other)
    records: list = []
    sensor = PlaintextSensor(PlaintextConfig(processes=("curl",)), emit=records.append,
                             origin=lambda key: None, uid_of=lambda key: None)
    ring = RingBuffer()
    sensor.start(ring.add)
    try:
        _serve(sensor, ring, [_curl(peer, "/a.txt?picked"),
                              _curl(peer, "/a.txt?passed-over", name=str(other))])
        counters = sensor.counters()
    finally:
        sensor.close()
        ring.close()
    assert _paths(records) == ["/a.txt?picked"]
    assert counters["not_selected"] >= 2   # othercurl's write and read, at least


def test_selection_by_cgroup(peer):
    root = cgroup2_root()
    if not (root / "cgroup.procs").exists():
        pytest.skip("no cgroup v2 hierarchy mounted")
    group = root / f"loupe-tls-{os.getpid()}"
    group.mkdir()
    records: list = []
    try:
        sensor = PlaintextSensor(PlaintextConfig(cgroups=(str(group),)),
                                 emit=records.append, origin=lambda key: None,
                                 uid_of=lambda key: None)
        ring = RingBuffer()
        sensor.start(ring.add)
        try:
            _serve(sensor, ring, [_curl(peer, "/a.txt?inside", cgroup=group),
                                  _curl(peer, "/a.txt?outside")])
        finally:
            sensor.close()
            ring.close()
    finally:
        subprocess.run(["rmdir", str(group)], check=False)
    # Only curl's side: nginx (outside the cgroup) is not selected either.
    assert _paths(records) == ["/a.txt?inside"]
