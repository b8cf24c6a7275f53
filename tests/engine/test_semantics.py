"""The shared flow semantics: conn_state for every Zeek state reachable from what each
side sent, TCP end detection, timeouts validation."""

from __future__ import annotations

import pytest

from sensor.flow.semantics import (
    TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, SideFlags, Timeouts, conn_state,
    conn_state_other, tcp_ended,
)

SYN = SideFlags(flags=TCP_SYN, syn=True, packets=1)
SYNACK = SideFlags(flags=TCP_SYN | TCP_ACK, synack=True, packets=1)
NONE = SideFlags()


def _with(side: SideFlags, extra: int) -> SideFlags:
    return SideFlags(flags=side.flags | extra, syn=side.syn, synack=side.synack,
                     packets=side.packets + 1)


@pytest.mark.parametrize(("orig", "resp", "state"), [
    (SYN, NONE, "S0"),
    (SYN, SideFlags(flags=TCP_RST | TCP_ACK, packets=1), "REJ"),
    (_with(SYN, TCP_RST), NONE, "RSTOS0"),
    (_with(SYN, TCP_FIN), NONE, "SH"),
    (SYN, SYNACK, "S1"),
    (_with(SYN, TCP_FIN), _with(SYNACK, TCP_FIN), "SF"),
    (_with(SYN, TCP_FIN), SYNACK, "S2"),
    (SYN, _with(SYNACK, TCP_FIN), "S3"),
    (_with(SYN, TCP_RST), SYNACK, "RSTO"),
    (SYN, _with(SYNACK, TCP_RST), "RSTR"),
    (NONE, _with(SYNACK, TCP_RST), "RSTRH"),
    (NONE, _with(SYNACK, TCP_FIN), "SHR"),
    (SideFlags(flags=TCP_ACK, packets=2), SideFlags(flags=TCP_ACK, packets=1), "OTH"),
])
def test_conn_state(orig, resp, state):
    assert conn_state(orig, resp) == state


def test_conn_state_other():
    assert conn_state_other(1, 1) == "SF"
    assert conn_state_other(3, 0) == "S0"
    assert conn_state_other(0, 2) == "SHR"
    assert conn_state_other(0, 0) == "OTH"


def test_tcp_ended():
    assert not tcp_ended(_with(SYN, TCP_FIN), SYNACK)
    assert tcp_ended(_with(SYN, TCP_FIN), _with(SYNACK, TCP_FIN))
    assert tcp_ended(SYN, _with(SYNACK, TCP_RST))


def test_timeouts_defaults_and_validation():
    t = Timeouts()
    assert t.idle_ns(6) == 300 * 10**9 and t.idle_ns(17) == 60 * 10**9
    assert t.active_ns == 1800 * 10**9 and t.tcp_end_linger_ns == 5 * 10**9
    with pytest.raises(ValueError):
        Timeouts(tcp_idle_ns=0)
    with pytest.raises(ValueError):
        Timeouts(tcp_end_linger_ns=-1)
