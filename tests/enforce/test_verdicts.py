"""Block verdicts as enforcement sees them, without a kernel: the block_source_ttl option,
verdicts on a request before its response (which rules can decide early, and that the
whole transaction then enforces nothing twice), the Alert's enforced fields, the HTTP/1
parser's on_request, and the TCP reset's bytes."""

from __future__ import annotations

import socket
import struct

import pytest
from scapy.layers.inet import IP, TCP
from scapy.packet import raw as scapy_raw

from sensor.enforce import rst
from sensor.enforce.enforcer import Enforcement
from sensor.l7.base import Direction
from sensor.l7.http1 import Http1Parser
from sensor.rules import engine, loader
from tests.rules.helpers import event, request, rules

SQLI = "/items?id=1%27%20UNION%20SELECT%20username,password%20FROM%20users--"


class _Flow:
    """The FlowState fields the Analyzer reads for an early verdict."""

    init = 0
    uid = "Cflow"
    cid = "1:cid="
    src_text, dst_text = "198.18.5.1", "198.18.5.2"
    port = (40000, 80)
    protocol = 6


def test_block_source_ttl_option(tmp_path):
    rs = rules(tmp_path, '[[group]]\nname = "sqli"\nmode = "block"\nblock_source_ttl = "10m"\n'
                         '[[rule]]\nid = "adm"\naction = "block"\nfield = "path"\nop = "prefix"\n'
                         'value = "/admin"\nblock_source_ttl = "30s"\n')
    assert [r.block_source_ttl_ns for r in rs.rules] == [600 * 10**9, 30 * 10**9]
    for text, msg in (('mode = "alert"\nblock_source_ttl = "1m"', 'needs mode = "block"'),
                      ('mode = "block"\nblock_source_ttl = "2d"', "1s to 24h"),
                      ('mode = "block"\nblock_source_ttl = "soon"', "1s to 24h")):
        with pytest.raises(loader.RuleError, match=msg) as err:
            rules(tmp_path, f'[[group]]\nname = "sqli"\n{text}\n')
        assert str(err.value).startswith(f"{tmp_path / 'r.toml'}:4:")


def test_early_verdict_only_from_request_rules(tmp_path):
    rs = rules(tmp_path, '[[group]]\nname = "sqli"\nmode = "block"\nblock_source_ttl = "1m"\n')
    e = engine.Engine(rs)
    assert e.early_blocks
    v = e.early(event(path=SQLI, status=0), request(target=SQLI))
    assert (v.action, v.rule_id, v.source_ttl_ns) == ("block", "loupe-sqli", 60 * 10**9)
    assert e.early(event(path="/ok", status=0), request(target="/ok")) is None
    assert e.stats.events == 0 and e.stats.alerts == {}   # early() counts and alerts nothing
    # A terminal rule on the response comes first: the request alone cannot decide.
    rs = rules(tmp_path, '[[rule]]\nid = "ok-404"\npriority = 1\naction = "allow"\n'
                         'field = "status"\nop = "range"\nvalue = [404, 404]\n'
                         '[[group]]\nname = "sqli"\nmode = "block"\npriority = 2\n')
    assert engine.Engine(rs).early(event(path=SQLI, status=0), request(target=SQLI)) is None
    # Threshold rules count whole events: never early.
    rs = rules(tmp_path, '[[rule]]\nid = "many"\naction = "block"\nfield = "path"\n'
                         'op = "prefix"\nvalue = "/"\n[rule.threshold]\ncount = 1\n')
    assert not engine.Engine(rs).early_blocks


def test_analyzer_enforces_once_and_marks_the_alert(tmp_path):
    rs = rules(tmp_path, '[[group]]\nname = "sqli"\nmode = "block"\n'
                         '[[group]]\nname = "xss"\nmode = "count"\npriority = 1\n')
    out, verdicts = [], []

    def on_verdict(v):
        verdicts.append(v)
        return Enforcement(True, 123, 7)

    an = engine.Analyzer(rs, out.append, on_verdict=on_verdict, current_flow=lambda: _Flow())
    raw = request(target=SQLI + "%3Cscript%3Ealert(1)%3C/script%3E")

    class Txn:
        ts_ns = 5
        detail = event(path=SQLI).detail
        request = raw

    an.request_done(Txn())
    assert len(verdicts) == 1 and out == []          # enforced before the response
    assert verdicts[0].event.src_addr == "198.18.5.1"
    an(event(path=SQLI), raw)                         # the whole transaction
    assert len(verdicts) == 1                         # not enforced twice
    by_rule = {a.rule_id: a for a in out}
    assert (by_rule["loupe-sqli"].enforced, by_rule["loupe-sqli"].block_expires_ns) == (True, 123)
    assert by_rule["loupe-sqli"].held_ns == 7          # hold mode: held before the block
    assert not by_rule["loupe-xss"].enforced          # a count rule enforces nothing
    # Without the early call (another protocol, or the response first) it enforces then.
    an(event(2, path=SQLI), request(target=SQLI))
    assert len(verdicts) == 2
    # Replay: no callback, the same alerts, nothing enforced.
    out2 = []
    engine.Analyzer(rs, out2.append)(event(path=SQLI), raw)
    assert [a.rule_id for a in out2] == [a.rule_id for a in out[:2]]
    assert not any(a.enforced for a in out2)


def test_http1_on_request_fires_before_the_response():
    seen = []
    p = Http1Parser(inspect=lambda m, t, c: 0, on_request=seen.append)
    p.receive_data(Direction.TO_SERVER, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", 1)
    assert len(seen) == 1 and seen[0].detail.path == "/a" and seen[0].detail.status == 0
    assert seen[0].request[0].startswith(b"GET /a ")
    p.receive_data(Direction.TO_CLIENT, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 2)
    txn = p.next_event()
    assert txn.detail.status == 200 and txn.request[0] is seen[0].request[0]
    assert len(seen) == 1


def test_reset_bytes_checksum():
    tcp = rst.tcp_rst("198.18.5.2", 80, "198.18.5.1", 40000, 0xFFFFFFF0, 7)
    pkt = rst.ipv4_packet("198.18.5.2", "198.18.5.1", tcp)
    parsed = IP(pkt)
    assert parsed[TCP].flags == "RA" and parsed[TCP].seq == 0xFFFFFFF0 and parsed[TCP].ack == 7
    # scapy recomputes both checksums when they are deleted: ours must equal them.
    again = IP(pkt)
    del again.chksum
    del again[TCP].chksum
    assert scapy_raw(IP(scapy_raw(again))) == pkt
    assert struct.unpack("!H", pkt[2:4])[0] == 40 and pkt[9] == socket.IPPROTO_TCP


def test_analyzer_tells_on_pass_of_every_request_it_does_not_block(tmp_path):
    """Hold mode's release: every complete request but a blocked one reaches on_pass, with
    its flow, whether or not the rule set has early blocks."""
    for text in ('[[group]]\nname = "sqli"\nmode = "block"\n',
                 '[[group]]\nname = "sqli"\nmode = "count"\n'):
        rs = rules(tmp_path, text)
        passed, verdicts = [], []
        flow = _Flow()
        an = engine.Analyzer(rs, lambda a: None, on_verdict=verdicts.append,
                             current_flow=lambda: flow, on_pass=passed.append)
        for target in ("/ok", SQLI):
            raw = request(target=target)
            detail = event(path=target).detail

            class Txn:
                ts_ns = 5

            txn = Txn()
            txn.detail, txn.request = detail, raw
            an.request_done(txn)
        blocks = rs.rules[0].action == "block"
        assert passed == ([flow] if blocks else [flow, flow])
        assert len(verdicts) == (1 if blocks else 0)


def test_nudge_ack_bytes():
    tcp = rst.tcp_rst("198.18.5.1", 40000, "198.18.5.2", 80, 100, 200, flags=rst.TCP_ACK,
                      window=0xFFFF)
    pkt = rst.ipv4_packet("198.18.5.1", "198.18.5.2", tcp)
    parsed = IP(pkt)
    assert parsed[TCP].flags == "A" and parsed[TCP].window == 0xFFFF
    again = IP(pkt)
    del again[TCP].chksum
    assert scapy_raw(IP(scapy_raw(again))) == pkt
