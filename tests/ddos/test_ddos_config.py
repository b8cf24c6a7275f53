"""[ddos] from a sensor.toml table to the detector's settings (sensor_cli.ddos_settings),
and the one-line errors a user can meet there."""

from __future__ import annotations

import pytest

from sensor import config
from sensor.errors import ConfigError
from sensor.rules import ddos
from sensor.sensor_cli import ddos_settings

NS = 10**9


def parse(table: dict) -> config.SensorConfig:
    return config.parse_config("sensor", {"ddos": table}, source="test")


def test_off_by_default_and_every_key_reaches_the_settings():
    assert ddos_settings(parse({})) is None
    s = ddos_settings(parse({
        "enabled": True, "window": "2s", "learn": "1m", "history": "30m", "factor": 3,
        "source_rps": 40, "service_rps": 400, "source_floor_rps": 4, "flows_ps": 150,
        "slow_heads": 20, "slow_head_age": "4s", "top": 5, "mitigation": "ratelimit",
        "ttl": "90s", "rate": 15, "burst": 30}))
    assert s == ddos.Settings(window_ns=2 * NS, learn_ns=60 * NS, history_ns=1800 * NS,
                              factor=3, source_rps=40, service_rps=400, source_floor_rps=4,
                              flows_ps=150, slow_heads=20, slow_head_ns=4 * NS, top=5,
                              mitigation="ratelimit", ttl_ns=90 * NS, rate=15, burst=30)
    assert ddos_settings(parse({"enabled": True})) == ddos.Settings()


def test_bad_values_are_one_line():
    with pytest.raises(ConfigError, match="ddos.mitigation: 'drop' is not count, block or"):
        parse({"mitigation": "drop"})
    with pytest.raises(ConfigError, match="^ddos: window must be at least 1 s and history"):
        ddos_settings(parse({"enabled": True, "window": "10s", "history": "5s"}))
