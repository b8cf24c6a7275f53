"""/metrics over real HTTP, parsed with prometheus_client's own text parser."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sensor.errors import MetricsError
from sensor.metrics import MetricsRegistry, self_usage
from sensor.model import LostSource

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def served():
    registry = MetricsRegistry("sensor")
    server = registry.serve("127.0.0.1:0")
    yield registry, server
    server.close()


def _scrape(server) -> dict:
    host, port = server.address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def _samples(family) -> dict:
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples
            if s.name.endswith("_total") or family.type != "counter"}


def test_every_loss_point_is_exported_from_the_start(served):
    registry, server = served
    families = _scrape(server)
    lost = families["loupe_lost"]
    assert lost.type == "counter"
    values = {s.labels["reason"]: s.value for s in lost.samples if s.name == "loupe_lost_total"}
    assert values == {source.value: 0 for source in LostSource}
    for name in ("loupe_queue_depth", "loupe_spool_bytes", "loupe_flows_active",
                 "loupe_records_exported", "loupe_build_info",
                 "loupe_process_resident_memory_bytes", "loupe_process_cpu_seconds"):
        assert name in families, name
    (info,) = families["loupe_build_info"].samples
    assert info.labels["daemon"] == "sensor" and info.value == 1


def test_sources_are_summed_and_bounded(served):
    registry, server = served
    counts = {"parser": 0}
    registry.add_source("http", lambda: {"lost": {"parser_error": counts["parser"]},
                                         "flows_active": 7,
                                         "records_exported": {"flow": 10, "l7": 4}})
    registry.add_source("dns", lambda: {"lost": {"parser_error": 2, "reassembly_gap": 1},
                                        "queue_depth": {"export": 3}})
    counts["parser"] = 5    # read at scrape time, not at registration
    families = _scrape(server)
    lost = {s.labels["reason"]: s.value for s in families["loupe_lost"].samples
            if s.name == "loupe_lost_total"}
    assert lost["parser_error"] == 7 and lost["reassembly_gap"] == 1
    assert families["loupe_flows_active"].samples[0].value == 7
    exported = {s.labels["kind"]: s.value for s in families["loupe_records_exported"].samples
                if s.name == "loupe_records_exported_total"}
    assert exported == {"flow": 10, "l7": 4}
    assert families["loupe_queue_depth"].samples[0].labels == {"queue": "export"}
    with pytest.raises(ValueError, match="already registered"):
        registry.add_source("dns", dict)


@pytest.mark.parametrize("snapshot", [
    {"lost": {"disk_on_fire": 1}},          # not a LostSource: the label set stays bounded
    {"droped": 1},                          # unknown family
    {"lost": 3},                            # labelled family without labels
    {"flows_active": "many"},               # not a number
    [("lost", 1)],                          # not a dict
])
def test_a_bad_source_is_counted_and_the_rest_still_served(served, snapshot):
    registry, server = served
    registry.add_source("bad", lambda: snapshot)
    registry.add_source("good", lambda: {"lost": {"spool_full": 9}})
    for scrape in (1, 2):
        families = _scrape(server)
        lost = {s.labels["reason"]: s.value for s in families["loupe_lost"].samples
                if s.name == "loupe_lost_total"}
        assert set(lost) == {source.value for source in LostSource}
        assert lost["spool_full"] == 9
        errors = {s.labels["source"]: s.value
                  for s in families["loupe_metrics_source_errors"].samples
                  if s.name == "loupe_metrics_source_errors_total"}
        assert errors == {"bad": scrape, "good": 0}


def test_a_raising_source_is_counted(served):
    registry, server = served

    def broken():
        raise RuntimeError("component bug")

    registry.add_source("broken", broken)
    families = _scrape(server)
    assert families["loupe_metrics_source_errors"].samples[0].value == 1
    registry.remove_source("broken")
    _scrape(server)
    assert registry.source_errors() == {"broken": 1}


def test_self_usage_is_this_process():
    usage = self_usage()
    assert usage.rss_bytes > 1_000_000
    assert usage.threads >= 1 and usage.open_fds >= 3
    assert usage.cpu_user_seconds > 0


def test_address_in_use_is_a_clear_error(served):
    _, server = served
    host, port = server.address
    with pytest.raises(MetricsError, match=rf"cannot serve metrics on 127.0.0.1:{port}: .*metrics.listen"):
        MetricsRegistry("collector").serve(f"127.0.0.1:{port}")


def test_ipv6_loopback():
    registry = MetricsRegistry("collector")
    try:
        server = registry.serve("[::1]:0")
    except MetricsError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    try:
        host, port = server.address
        with urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=10) as response:
            assert b'daemon="collector"' in response.read()
    finally:
        server.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a mount namespace)")
def test_self_usage_without_proc_stat():
    # loupe-collector.service has ProcSubset=pid, which hides /proc/stat, where psutil
    # reads the boot time for a process's start time: a scrape there failed with HTTP 500.
    script = ("import psutil, time\nfrom sensor.metrics import MetricsRegistry, self_usage\n"
              "print(self_usage().start_time - time.time())\n"
              "print(MetricsRegistry('collector').render().decode())\n")
    result = subprocess.run(
        ["unshare", "--mount", "sh", "-c", 'mount --bind /dev/null /proc/stat && '
         'cat /proc/stat && exec "$0" -c "$1"', sys.executable, script],
        capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    age, text = result.stdout.split("\n", 1)
    assert -30 < float(age) < 0      # this process started moments ago
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["loupe_process_start_time_seconds"].samples[0].value > 1.6e9
    assert families["loupe_metrics_source_errors"].samples == []
