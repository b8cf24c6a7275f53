"""Two `loupe replay --collector` runs with the same sensor id each deliver their own
records. Each run opens a new temporary spool; batch ids that restarted at 1 in every new
spool made the collector drop the second run's batches as duplicates of the first's
(it deduplicates on (sensor_id, batch_id)), while the run still said they were delivered."""

from __future__ import annotations

import subprocess

from tests.conftest import REPO
from tests.export.collector_proc import CollectorProcess, query

LOUPE = str(REPO / ".venv" / "bin" / "loupe")
GOLDEN = REPO / "tests" / "golden"


def _replay(capture, address):
    return subprocess.run([LOUPE, "replay", "--no-progress", str(capture), "--collector",
                           address, "--sensor-id", "lab"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def test_second_run_with_the_same_sensor_id_is_stored(tmp_path):
    collector = CollectorProcess(tmp_path / "data").start()
    try:
        for capture in ("curl-http.pcap", "dig-dnsmasq.pcap"):
            res = _replay(GOLDEN / capture, collector.address)
            assert res.returncode == 0, res.stderr
        rows = query(collector.address,
                     "SELECT (SELECT count(*) FROM http), (SELECT count(*) FROM dns)")
        assert rows[0][0] > 0 and rows[0][1] > 0, rows
    finally:
        collector.stop()


def test_a_new_spool_starts_above_every_earlier_spools_ids(tmp_path):
    from sensor.export.spool import Spool

    first = Spool(tmp_path / "a")
    ids = [first.next_batch_id() for _ in range(3)]
    first.close()
    second = Spool(tmp_path / "b")
    assert second.next_batch_id() > max(ids)
    second.close()
