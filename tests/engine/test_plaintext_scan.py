"""TLS plaintext's rescan (sensor/engine/plaintext_live.py) is bounded in time: it runs on
the main thread, which delivers every record, so a burst of new processes is looked at
over several steps, SCAN_BUDGET_S each, none skipped. A proc directory of its own here:
pid entries without maps or exe (as a process that is gone) cost nothing but the walk."""

from __future__ import annotations

import time

from sensor.engine import plaintext_live
from sensor.engine.plaintext_live import PlaintextConfig, PlaintextSensor


def test_a_rescan_past_its_budget_leaves_the_rest_to_the_next_step(tmp_path, monkeypatch):
    for pid in (11, 12, 13):
        (tmp_path / str(pid)).mkdir()
    (tmp_path / "self").mkdir()
    sensor = PlaintextSensor(PlaintextConfig(rescan_s=5.0), emit=lambda r: None,
                             origin=None, uid_of=lambda key: None, proc=tmp_path)
    monkeypatch.setattr(plaintext_live, "SCAN_BUDGET_S", 0.0)   # one process per rescan
    sensor.rescan()
    assert sensor._seen_pids == {11}
    assert sensor._next_scan == 0.0            # the rest at the very next step
    sensor.rescan()
    sensor.rescan()
    assert sensor._seen_pids == {11, 12, 13}
    assert sensor._next_scan > time.monotonic()   # done: the next one in rescan_s
    (tmp_path / "12").rmdir()                  # gone: forgotten; a new one is looked at
    (tmp_path / "14").mkdir()
    sensor.rescan()
    assert sensor._seen_pids == {11, 13, 14}


def test_within_its_budget_a_rescan_looks_at_every_new_process(tmp_path):
    for pid in range(100, 400):
        (tmp_path / str(pid)).mkdir()
    sensor = PlaintextSensor(PlaintextConfig(), emit=lambda r: None, origin=None,
                             uid_of=lambda key: None, proc=tmp_path)
    sensor.rescan()
    assert sensor._seen_pids == set(range(100, 400))
