"""sensor/kernel/exclude.py without a kernel: the instructions a filter becomes (what
bpf/flow.c's loop reads), the own-traffic filter, and how `sensor run` combines them
(sensor_cli.kernel_selection). The kernel's reading of them: tests/kernel/test_exclude.py."""

from __future__ import annotations

import ipaddress

import pytest

from sensor import config as cfg
from sensor import sensor_cli
from sensor.capfilter import BOTH, DST, EITHER, SRC
from sensor.errors import ConfigError
from sensor.kernel import abi, exclude


def _insns(text: str) -> list[tuple]:
    prog = exclude.program(text)
    return [(i.op, i.dir, i.version, i.protocol, i.port_lo, i.port_hi, bytes(i.addr),
             bytes(i.mask)) for i in prog.insn[:prog.len]]


def test_instructions_in_postfix_order_with_addresses_in_network_order():
    z = bytes(16)
    a4 = ipaddress.ip_address("198.18.0.1").packed + bytes(12)
    m4 = b"\xff" * 4 + bytes(12)
    n6 = ipaddress.ip_address("fc00::").packed
    m6 = b"\xfe" + bytes(15)
    assert _insns("not src host 198.18.0.1 and (tcp dst portrange 80-90 or net fc00::/7)") == [
        (abi.FOP_ADDR, SRC, 4, 0, 0, 0, a4, m4),
        (abi.FOP_NOT, 0, 0, 0, 0, 0, z, z),
        (abi.FOP_PORT, DST, 0, 6, 80, 90, z, z),
        (abi.FOP_ADDR, EITHER, 6, 0, 0, 0, n6, m6),
        (abi.FOP_OR, 0, 0, 0, 0, 0, z, z),
        (abi.FOP_AND, 0, 0, 0, 0, 0, z, z),
    ]
    assert _insns("src and dst port 53 or ip6 or proto 47") == [
        (abi.FOP_PORT, BOTH, 0, 0, 53, 53, z, z),   # protocol 0: TCP, UDP or SCTP
        (abi.FOP_IP, 0, 6, 0, 0, 0, z, z),
        (abi.FOP_OR, 0, 0, 0, 0, 0, z, z),
        (abi.FOP_PROTO, 0, 0, 47, 0, 0, z, z),
        (abi.FOP_OR, 0, 0, 0, 0, 0, z, z),
    ]
    assert exclude.program("").len == 0


def test_own_traffic_names_collector_and_metrics():
    names = {"collector.example": ["192.0.2.7", "2001:db8::7"], "127.0.0.1": ["127.0.0.1"]}
    own = exclude.own_traffic("collector.example:50051", "127.0.0.1:9464",
                              resolver=names.__getitem__)
    assert own == ("(tcp port 50051 and host (192.0.2.7 or 2001:db8::7)) or "
                   "(tcp port 9464 and host 127.0.0.1)")
    # Listening on every address: the port alone. No collector, no metrics: nothing.
    assert exclude.own_traffic("", "[::]:9464") == "tcp port 9464"
    assert exclude.own_traffic("", "") == ""
    # A name that does not resolve leaves the collector out rather than failing.
    assert exclude.own_traffic("nowhere.invalid:1", "", resolver=lambda h: []) == ""
    assert exclude.combined("udp", own).startswith("(udp) or (tcp port 50051")


def _selection(table: dict):
    return sensor_cli.kernel_selection(cfg.parse_config("sensor", table, source="test"))


def test_sensor_run_adds_its_own_traffic_unless_told_not_to():
    on = _selection({"selection": {"exclude": "net 10.0.0.0/8"}})
    assert on.exclude == ("(net 10.0.0.0/8) or (tcp port 50051 and host 127.0.0.1) or "
                          "(tcp port 9464 and host 127.0.0.1)")
    off = _selection({"selection": {"exclude": "net 10.0.0.0/8",
                                    "exclude_own_traffic": False}})
    assert off.exclude == "net 10.0.0.0/8"
    assert _selection({"collector": {"address": ""}, "metrics": {"listen": ""}}).exclude == ""


def test_a_filter_too_long_with_the_own_traffic_says_so():
    long = " or ".join(["tcp"] * 30)   # fits alone (59 nodes), not with the own traffic
    with pytest.raises(ConfigError, match="exclude_own_traffic = false leaves it out"):
        _selection({"selection": {"exclude": long}})
    assert _selection({"selection": {"exclude": long, "exclude_own_traffic": False}})


def test_config_check_names_a_bad_filter():
    with pytest.raises(ConfigError) as err:
        cfg.parse_config("sensor", {"selection": {"exclude": "port 80 and hots 1.2.3.4"}},
                         source="sensor.toml")
    assert "sensor.toml: selection.exclude: " in str(err.value)
    assert "'hots' (column 13)" in str(err.value)
