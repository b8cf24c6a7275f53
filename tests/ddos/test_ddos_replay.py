"""The DDoS detector in `loupe replay --ddos` (sensor/rules/ddos_replay.py), on a capture
written by tests/fixtures/gen_ddos.py: an HTTP flood, a SYN flood and a slow-request
attack beside benign pollers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sensor.cli import main
from sensor.engine.pipeline import Pipeline, PipelineConfig, run_sharded
from sensor.model import Alert
from sensor.replay.reader import CaptureReader
from sensor.rules import ddos
from tests.fixtures import gen_ddos

LOUPE = [sys.executable, "-m", "sensor.cli"]


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddos") / "attacks.pcap"
    gen_ddos.generate(str(path))
    return path


def replay_alerts(capture, out) -> list[dict]:
    run = subprocess.run([*LOUPE, "replay", "--ddos", "--no-progress", str(capture),
                          "-o", str(out)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "3 alerts" in run.stderr
    return [r for r in map(json.loads, out.read_text().splitlines()) if r["type"] == "alert"]


def test_replay_names_the_attackers_not_the_pollers_and_repeats(capture, tmp_path):
    alerts = replay_alerts(capture, tmp_path / "a.jsonl")
    by_rule = {a["rule_id"]: a for a in alerts}
    assert sorted(by_rule) == [ddos.RULE_FLOWS, ddos.RULE_HTTP, ddos.RULE_SLOW]
    http = by_rule[ddos.RULE_HTTP]
    assert (http["category"], http["dst_addr"], http["dst_port"]) == (
        "http-flood", gen_ddos.SERVER, 80)
    assert sorted(http["top_sources"].split()) == list(gen_ddos.FLOODERS)
    # The flood began at 1 s; the 5 s window's average passes 50 req/s a source after
    # its third second, evaluated when that second closes (packet time, not wall time).
    assert http["ts_ns"] == gen_ddos.T0 + 4 * gen_ddos.NS
    syn = by_rule[ddos.RULE_FLOWS]
    assert (syn["category"], syn["dst_port"], syn["count"]) == ("syn-flood", 8080, 1200)
    assert set(syn["top_sources"].split()) <= set(gen_ddos.SYN_SOURCES)
    assert len(syn["top_sources"].split()) == 10          # Settings.top
    slow = by_rule[ddos.RULE_SLOW]
    assert (slow["category"], slow["dst_port"], slow["count"]) == ("slow-request", 80, 60)
    assert sorted(slow["top_sources"].split()) == list(gen_ddos.SLOW_SOURCES)
    for a in alerts:
        assert not set(a["top_sources"].split()) & set(gen_ddos.POLLERS)
        assert (a["mitigation"], a["action"], a["enforced"], a["block_expires_ns"]) == (
            "count", "count", False, 0)
    assert replay_alerts(capture, tmp_path / "b.jsonl") == alerts


class ListSink:
    def __init__(self) -> None:
        self.records: list = []

    def write(self, record) -> None:
        self.records.append(record)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_settings_apply_and_nothing_is_mitigated(capture):
    """Thresholds come from the settings; a block mitigation is reported as count, since
    a replay enforces nothing."""
    sink = ListSink()
    settings = ddos.Settings(mitigation="block", flows_ps=10_000, slow_heads=1_000)
    pipeline = Pipeline(sink, PipelineConfig(ddos=settings))
    with CaptureReader(capture) as reader:
        pipeline.feed(reader)
    pipeline.close()
    alerts = [r for r in sink.records if isinstance(r, Alert)]
    assert [(a.rule_id, a.mitigation, a.enforced) for a in alerts] == [
        (ddos.RULE_HTTP, "count", False)]
    # Off unless asked for.
    sink = ListSink()
    pipeline = Pipeline(sink, PipelineConfig())
    with CaptureReader(capture) as reader:
        pipeline.feed(reader)
    pipeline.close()
    assert not [r for r in sink.records if isinstance(r, Alert)]


def test_ddos_config_file_and_jobs_refusal(capture, tmp_path, capsys):
    toml = tmp_path / "sensor.toml"
    toml.write_text("[ddos]\nsource_rps = 1000\nservice_rps = 100000\n")
    out = tmp_path / "c.jsonl"
    assert main(["replay", "--ddos-config", str(toml), "--no-progress", str(capture),
                 "-o", str(out)]) == 0
    rules = sorted(json.loads(line)["rule_id"] for line in out.read_text().splitlines()
                   if '"type":"alert"' in line)
    assert rules == [ddos.RULE_FLOWS, ddos.RULE_SLOW]     # no HTTP flood at 1000 req/s
    capsys.readouterr()
    assert main(["replay", "--ddos", "--jobs", "2", str(capture), "-o",
                 str(tmp_path / "d.jsonl")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["loupe: error: --ddos needs every flow in one process: drop --jobs"]
    with pytest.raises(ValueError, match="one job"):
        run_sharded(lambda: [], ListSink(), PipelineConfig(ddos=ddos.Settings()), jobs=2)
