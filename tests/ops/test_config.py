"""Configuration: the example files document exactly the schema's keys, with its
defaults; bad values are refused naming the key and why; `loupe config check` exit codes;
command-line overrides."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from sensor import config
from sensor.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = {"sensor": REPO / "systemd" / "sensor.toml",
            "collector": REPO / "systemd" / "collector.toml"}


def _dotted(table: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in table.items():
        if isinstance(value, dict):
            keys |= _dotted(value, f"{prefix}{key}.")
        else:
            keys.add(prefix + key)
    return keys


@pytest.mark.parametrize("kind", ["sensor", "collector"])
def test_example_documents_every_key_and_nothing_else(kind):
    table = tomllib.loads(EXAMPLES[kind].read_text())
    assert _dotted(table) == config.schema_keys(kind)


@pytest.mark.parametrize("kind", ["sensor", "collector"])
def test_example_values_are_the_defaults(kind):
    # The example file claims to list every key at its default: hold it to that.
    assert config.load_config(kind, EXAMPLES[kind]) == config.CONFIG_KINDS[kind]()


@pytest.mark.parametrize("kind", ["sensor", "collector"])
def test_every_key_comes_with_a_comment(kind):
    lines = EXAMPLES[kind].read_text().splitlines()
    for number, line in enumerate(lines):
        if "=" in line and not line.lstrip().startswith("#"):
            above = lines[number - 1].lstrip()
            assert above.startswith("#") or "=" in above, f"{kind}.toml: {line!r} has no comment"


@pytest.mark.parametrize("kind", ["sensor", "collector"])
def test_show_output_round_trips(kind, tmp_path):
    effective = config.load_config(kind, EXAMPLES[kind],
                                    overrides={"metrics.listen": "[::1]:9999"})
    path = tmp_path / f"{kind}.toml"
    path.write_text(config.config_to_toml(effective))
    assert config.load_config(kind, path) == effective


def test_values_are_converted():
    c = config.parse_config("sensor", {
        "sensor_id": "edge-1", "interfaces": ["eth0", "eth1"],
        "selection": {"ports": [80], "cidrs": ["198.18.0.0/15", "fc00::/7"],
                      "protocols": ["tcp", 17], "sample_one_in": 10, "sniff": True},
        "budget": {"per_direction_bytes": 4096, "max_in_flight_bytes": "1GiB"},
        "timeouts": {"tcp_idle": "2m", "other_idle": "30s", "active": "1h", "tcp_linger": "2s"},
        "export": {"batch_delay": "250ms"},
        "kernel": {"ringbuf_size": "16MiB"},
    }, source="t")
    assert c.interfaces == ("eth0", "eth1")
    assert c.selection.protocols == (6, 17)
    assert c.selection.cidrs == ("198.18.0.0/15", "fc00::/7")
    assert c.budget.max_in_flight_bytes == 1 << 30
    assert c.timeouts.to_timeouts().tcp_idle_ns == 120 * 10**9
    assert c.timeouts.tcp_linger == 2 * 10**9
    assert c.export.batch_delay == 250 * 10**6
    assert c.kernel.ringbuf_size == 16 << 20
    assert c.effective_sensor_id() == "edge-1"


BAD_SENSOR = [
    ({"selection": {"ports": [80, 70000]}}, "selection.ports[1]: 70000 is outside 1..65535"),
    ({"selection": {"ports": "80"}}, "selection.ports: expected a list, got a string"),
    ({"selection": {"ports": [80, 80]}}, "selection.ports: 80 is listed twice"),
    ({"selection": {"portz": [80]}}, "selection.portz: unknown key"),
    ({"selection": {"cidrs": ["10.0.0.1/8"]}}, "did you mean '10.0.0.0/8'"),
    ({"selection": {"protocols": ["quic"]}}, "selection.protocols[0]: 'quic' is not one of"),
    ({"selection": {"sample_one_in": 0}}, "selection.sample_one_in: 0 is outside 1..1000000"),
    ({"selection": {"sniff": "yes"}}, "selection.sniff: expected true or false, got a string"),
    ({"selection": 5}, "selection: expected a [selection] table"),
    ({"timeouts": {"tcp_idle": 300}}, 'timeouts.tcp_idle: expected a duration string such as "300s"'),
    ({"timeouts": {"tcp_idle": "5 minutes"}}, "timeouts.tcp_idle: '5 minutes' is not a duration"),
    ({"timeouts": {"active": "0s"}}, "timeouts.active: 0s is outside 1s..7d"),
    ({"kernel": {"ringbuf_size": "3MiB"}}, "kernel.ringbuf_size: 3MiB is not a power of two"),
    ({"kernel": {"flow_map_size": True}}, "kernel.flow_map_size: expected an integer, got a boolean"),
    ({"budget": {"max_in_flight_bytes": "lots"}}, "budget.max_in_flight_bytes: 'lots' is not a size"),
    ({"interfaces": ["a-very-long-interface-name"]}, "interfaces[0]: 26 characters is longer than 15"),
    ({"interfaces": ["eth0/1"]}, "interfaces[0]: 'eth0/1' is not an interface name"),
    ({"sensor_id": "my sensor"}, "sensor_id: 'my sensor' is not letters, digits"),
    ({"spool": {"dir": "spool"}}, "spool.dir: 'spool' is not an absolute path"),
    ({"metrics": {"listen": "localhost:9464"}}, "metrics.listen: 'localhost' in 'localhost:9464' is not an IP address"),
    ({"metrics": {"listen": "127.0.0.1"}}, "metrics.listen: '127.0.0.1' is not host:port"),
    ({"collector": {"address": "198.18.0.9:50051"}}, "collector.address: 198.18.0.9:50051 is not a loopback address and no TLS"),
    ({"collector": {"ca_file": "/etc/loupe/ca.pem"}}, "collector.cert_file, collector.key_file: mutual TLS needs"),
    ({"export": {"queue_size": 100, "batch_size": 500}}, "export.batch_size: 500 is larger than export.queue_size"),
    ({"redaction": {"extra_headers": ["X Api"]}}, "redaction.extra_headers[0]: 'X Api' is not an HTTP header name"),
    ({"process": {"cache_ttl": "2h"}}, "process.cache_ttl: 2h is outside 1s..1h"),
    ({"budget": {"per_direction_bytes": 0}}, "budget.per_direction_bytes: 0 is outside 512B..16MiB"),
    ({"timeouts": {"tcp_linger": "0s"}}, "timeouts.tcp_linger: 0s is outside 1s..5m"),
]


@pytest.mark.parametrize("table,message", BAD_SENSOR)
def test_bad_sensor_values_name_the_key_and_why(table, message):
    with pytest.raises(ConfigError) as err:
        config.parse_config("sensor", table, source="sensor.toml")
    assert str(err.value).startswith("sensor.toml: ")
    assert message in str(err.value)


BAD_COLLECTOR = [
    ({"listen": "198.18.0.1:50051"}, "listen: 198.18.0.1:50051 is not a loopback address"),
    ({"listen": "[::1]:99999"}, "listen: port 99999"),
    ({"retention": "0s"}, "retention: 0s is outside 1s..3650d"),
    ({"tls": {"cert_file": "/c.pem", "key_file": "/k.pem"}}, "tls.client_ca_file: mutual TLS needs"),
    ({"max_message_size": "1KiB"}, "max_message_size: 1KiB is outside 64KiB..1GiB"),
    ({"data_dir": ""}, "data_dir: must not be empty"),
]


@pytest.mark.parametrize("table,message", BAD_COLLECTOR)
def test_bad_collector_values_name_the_key_and_why(table, message):
    with pytest.raises(ConfigError, match="^collector.toml: ") as err:
        config.parse_config("collector", table, source="collector.toml")
    assert message in str(err.value)


def test_plaintext_to_remote_is_allowed_when_insecure_or_tls():
    config.parse_config("sensor", {"collector": {"address": "198.18.0.9:50051",
                                                  "insecure": True}}, source="t")
    config.parse_config("sensor", {"collector": {
        "address": "collector.example:50051", "ca_file": "/a", "cert_file": "/b",
        "key_file": "/c"}}, source="t")
    config.parse_config("collector", {"listen": "0.0.0.0:50051", "insecure": True}, source="t")


def test_overrides_win_over_the_file_and_are_validated(tmp_path):
    path = tmp_path / "sensor.toml"
    path.write_text('interfaces = ["eth0"]\n[selection]\nports = [80]\nsniff = true\n')
    c = config.load_sensor_config(path, overrides={
        "selection.ports": "443, 8443", "interfaces": ("eth1",), "timeouts.active": "10m",
        "selection.sniff": "false", "kernel.flow_map_size": "4096"})
    assert c.selection.ports == (443, 8443)
    assert c.interfaces == ("eth1",)
    assert c.timeouts.active == 600 * 10**9
    assert c.selection.sniff is False
    assert c.kernel.flow_map_size == 4096
    with pytest.raises(ConfigError, match=r"\(with command-line overrides\): selection.ports\[0\]: 0 is outside"):
        config.load_sensor_config(path, overrides={"selection.ports": "0"})
    with pytest.raises(ConfigError, match="command line: selection.portz: unknown key"):
        config.load_sensor_config(path, overrides={"selection.portz": "1"})
    with pytest.raises(ConfigError, match="command line: selection: is a section"):
        config.load_sensor_config(path, overrides={"selection": "1"})
    with pytest.raises(ConfigError, match="'many' is not an integer"):
        config.load_sensor_config(path, overrides={"kernel.flow_map_size": "many"})


def test_daemon_arguments(tmp_path):
    import argparse

    path = tmp_path / "collector.toml"
    path.write_text('retention = "1d"\n')
    parser = argparse.ArgumentParser()
    config.add_config_arguments(parser, "collector")
    args = parser.parse_args(["--config", str(path), "--set", "retention=2d",
                              "--set", "metrics.listen="])
    c = config.config_from_args(args, "collector", {"listen": "127.0.0.2:1", "insecure": None})
    assert c.retention == 2 * 86400 * 10**9
    assert c.metrics.listen == ""
    assert c.listen == "127.0.0.2:1"
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        config.parse_set_arguments(["retention"])


def test_file_errors(tmp_path):
    bad = tmp_path / "sensor.toml"
    bad.write_text("[selection\nports = [80]\n")
    with pytest.raises(ConfigError, match=r"sensor.toml: not valid TOML: .*line 1"):
        config.load_sensor_config(bad)
    bad.write_bytes(b"sensor_id = \"\xff\"\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load_sensor_config(bad)
    with pytest.raises(ConfigError, match="cannot read: No such file"):
        config.load_sensor_config(tmp_path / "absent.toml")
    big = tmp_path / "big.toml"
    big.write_text("# x\n" * 300_000)
    with pytest.raises(ConfigError, match="larger than 1MiB"):
        config.load_sensor_config(big)


def _loupe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sensor.cli", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=60)


def test_config_check_exit_codes(tmp_path):
    ok = _loupe("config", "check", str(EXAMPLES["sensor"]))
    assert (ok.returncode, ok.stdout.strip()) == (0, f"{EXAMPLES['sensor']}: ok (sensor configuration)")
    assert _loupe("config", "check", str(EXAMPLES["collector"])).stdout.endswith("(collector configuration)\n")

    bad = tmp_path / "sensor.toml"
    bad.write_text("[timeouts]\ntcp_idle = \"forever\"\n")
    result = _loupe("config", "check", str(bad))
    assert result.returncode == 2
    assert result.stderr == (f"loupe: error: {bad}: timeouts.tcp_idle: 'forever' is not a "
                             "duration (a number and one of ms, s, m, h, d)\n")
    # The name picks the schema; --kind overrides it.
    other = tmp_path / "edge.toml"
    other.write_text('listen = "127.0.0.1:50051"\n')
    assert _loupe("config", "check", str(other)).returncode == 2
    assert _loupe("config", "check", "--kind", "collector", str(other)).returncode == 0
    assert _loupe("config", "check", str(tmp_path / "none.toml")).returncode == 2


def test_config_show_prints_effective_toml():
    result = _loupe("config", "show", str(EXAMPLES["sensor"]), "--set", "selection.ports=443")
    assert result.returncode == 0
    shown = tomllib.loads(result.stdout)
    assert shown["selection"]["ports"] == [443]
    assert shown["timeouts"]["tcp_idle"] == "5m"
    assert _dotted(shown) == config.schema_keys("sensor")


def test_config_check_reports_every_bad_key_one_line_each(tmp_path):
    bad = tmp_path / "sensor.toml"
    bad.write_text('interfaces = ["eth0/1"]\n[budget]\nper_direction_bytes = 0\n'
                   '[timeouts]\ntcp_linger = "0s"\ntcp_idle = "forever"\n'
                   '[export]\nqueue_size = 100\nbatch_size = 500\n[nonsense]\n')
    result = _loupe("config", "check", str(bad))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert [line.split(": ")[3] for line in lines] == [
        "nonsense", "interfaces[0]", "budget.per_direction_bytes", "timeouts.tcp_idle",
        "timeouts.tcp_linger", "export.batch_size"], lines
    assert all(line.startswith(f"loupe: error: {bad}: ") for line in lines)


def test_a_cross_key_check_is_skipped_when_its_key_is_bad_itself():
    with pytest.raises(config.ConfigProblems) as err:
        config.parse_config("sensor", {"export": {"queue_size": 5, "batch_size": 500}},
                            source="t")
    assert err.value.problems == ["t: export.queue_size: 5 is outside 100..10000000"]


@pytest.mark.parametrize("kind", sorted(config.CONFIG_KINDS))
def test_the_set_example_in_each_daemons_help_is_accepted(kind):
    words = {"sensor": ("sensor", "run"), "collector": ("collector", "run")}[kind]
    text = " ".join(_loupe(*words, "--help").stdout.split())
    example = re.search(r"e\.g\. --set (\S+)", text).group(1)
    config.parse_config(kind, {}, source="t", overrides=config.parse_set_arguments([example]))


def test_config_show_hides_a_password_unless_asked(tmp_path):
    conf = tmp_path / "collector.toml"
    conf.write_text('[storage.clickhouse]\npassword = "s3cr3t-ch"\n')
    shown = _loupe("config", "show", str(conf), "--kind", "collector")
    assert shown.returncode == 0, shown.stderr
    assert "s3cr3t-ch" not in shown.stdout and config.HIDDEN in shown.stdout
    plain = _loupe("config", "show", str(conf), "--kind", "collector", "--show-secrets")
    assert 'password = "s3cr3t-ch"' in plain.stdout
