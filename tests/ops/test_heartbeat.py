"""`sensor run --heartbeat`: the line a quiet terminal gets until the first L7 record
(`make run` turns it on; the live test in tests/live/test_make_run.py sees it for real)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sensor.cli import build_parser
from sensor.engine.live import LiveTotals
from sensor.errors import ConfigError
from sensor.sensor_cli import heartbeat_line, live_config, load


def _sensor(records: dict[str, int], packets: int):
    return SimpleNamespace(totals=LiveTotals(records=records),
                           kernel_counters=lambda: {"packets": packets})


def test_counts_until_the_first_l7_record():
    assert heartbeat_line(_sensor({}, 0)) == "0 packets, 0 flows so far, no L7 yet"
    assert heartbeat_line(_sensor({"flow": 14, "lost": 2}, 1520)) == \
        "1520 packets, 14 flows so far, no L7 yet"
    assert heartbeat_line(_sensor({"flow": 14, "http": 1}, 1520)) == ""


def test_negative_heartbeat_is_refused():
    args = build_parser().parse_args(["sensor", "run", "--config", "/dev/null", "--iface", "lo",
                                      "--heartbeat", "-1"])
    with pytest.raises(ConfigError, match="--heartbeat"):
        live_config(load(args), args)
