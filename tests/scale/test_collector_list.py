"""The collector list in the sensor's configuration: [collector] addresses, and
`--collector a,b` on the command line, which replaces the file's address or list."""

from __future__ import annotations

import pytest

from sensor import cli, config as cfg, sensor_cli
from sensor.errors import ConfigError
from sensor.export.grpc_client import GrpcExportConfig


def _config(tmp_path, toml: str, *argv: str) -> cfg.SensorConfig:
    path = tmp_path / "sensor.toml"
    path.write_text(toml)
    args = cli.parse(cli.build_parser(), ["sensor", "run", "--config", str(path), *argv])
    return sensor_cli.load(args)


def test_addresses_replace_address_and_the_flag_replaces_both(tmp_path):
    listed = '[collector]\naddresses = ["127.0.0.1:7401", "127.0.0.1:7402"]\n'
    assert _config(tmp_path, listed).collector.targets() == ("127.0.0.1:7401",
                                                              "127.0.0.1:7402")
    assert _config(tmp_path, "").collector.targets() == ("127.0.0.1:50051",)
    assert _config(tmp_path, listed, "--collector", "127.0.0.1:9").collector.targets() == (
        "127.0.0.1:9",)
    assert _config(tmp_path, "", "--collector", "127.0.0.1:8,127.0.0.1:9"
                   ).collector.targets() == ("127.0.0.1:8", "127.0.0.1:9")
    assert _config(tmp_path, listed, "--collector", "").collector.targets() == ()


def test_a_plaintext_non_loopback_member_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"collector.addresses: 10.0.0.6:50051 is not a "
                                          r"loopback address"):
        _config(tmp_path, '[collector]\naddresses = ["127.0.0.1:1", "10.0.0.6:50051"]\n')


def test_exporter_target_list_is_checked():
    ok = GrpcExportConfig(target="a:1, b:2", sensor_id="s", spool_dir="/nonexistent")
    assert ok.targets == ("a:1", "b:2")
    for bad, what in (("a:1,a:1", "twice"), ("a:1,", "host:port"), ("a", "host:port")):
        with pytest.raises(ConfigError, match=what):
            GrpcExportConfig(target=bad, sensor_id="s", spool_dir="/nonexistent")
