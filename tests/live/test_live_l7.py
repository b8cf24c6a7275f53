"""The live L7 half without a kernel: payload events as the kernel sends them (real
HTTP and DNS bytes, sequence numbers, chunking) into LiveL7, a recording FlowControl in
place of the l7_ctl map, and the records and writes that come out. Plus the --select
syntax and its mapping onto the kernel's selection."""

from __future__ import annotations

import pytest
from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.packet import raw

from sensor.cli import build_parser
from sensor.engine.live import LiveL7
from sensor.errors import ConfigError
from sensor.kernel import abi
from sensor.kernel.events import PayloadEvent
from sensor.kernel.hybrid import flow_key
from sensor.model import Flow, FlowEndReason, L7Coverage, L7Event
from sensor.sensor_cli import kernel_selection, live_config, load, parse_select

CLIENT, SERVER = ("198.18.9.1", 40000), ("198.18.9.2", 80)
SYN, ACK, PSH, FIN = 0x02, 0x10, 0x08, 0x01


class Control:
    """Records what LiveL7 writes to l7_ctl."""

    def __init__(self, initiator_side: int = 0) -> None:
        self.calls: list[tuple] = []
        self.initiator_side = initiator_side

    def grant(self, key, direction, octets):
        self.calls.append(("grant", direction, octets))
        return True

    def skip_until(self, key, direction, seq):
        self.calls.append(("skip", direction, seq))
        return True

    def stop(self, key):
        self.calls.append(("stop",))
        return True

    def hold(self, key, direction, peer_octets):
        self.calls.append(("hold", direction, peer_octets))
        return True

    def release(self, key, direction):
        self.calls.append(("release", direction))
        return True

    def flow_origin(self, key, incarnation):
        return self.initiator_side, 1_000_000


def _key(port: int = 80, protocol: int = 6) -> bytes:
    return bytes(flow_key(src=CLIENT[0], dst=SERVER[0], sport=CLIENT[1], dport=port,
                          protocol=protocol, ifindex=3))


class Conn:
    """Builds the payload events of one TCP connection, as the kernel would send them."""

    def __init__(self, key: bytes, budget: int = 1 << 20) -> None:
        self.key = key
        self.seq = [1000, 90000]
        self.budget = budget
        self.ts = 2_000_000

    def event(self, direction: int, data: bytes, flags: int = PSH | ACK, *,
              wire_len: int | None = None, copy: bool = True) -> PayloadEvent | None:
        """data: the segment's payload; copy=False: the kernel copied none of it
        (no event, but the sequence space advances)."""
        seq = self.seq[direction]
        length = len(data) if wire_len is None else wire_len
        self.seq[direction] = (seq + length + (1 if flags & (SYN | FIN) else 0)) & 0xFFFFFFFF
        self.ts += 1000
        if not copy:
            return None
        return PayloadEvent(key=self.key, incarnation=1, direction=direction, seq=seq,
                            ack=self.seq[1 - direction], tcp_flags=flags, payload_len=length,
                            offset=0, data=data, l7_select=abi.SEL_PORT, ts_ns=self.ts)


def _run(l7: LiveL7, events) -> None:
    for ev in events:
        if ev is not None:
            l7.on_payload(ev, 0, 0)


def _flow(reason=FlowEndReason.END_OF_FLOW, port: int = 80, protocol: int = 6) -> Flow:
    return Flow(uid="Creaderuid0000000", flow_start_ns=1, flow_end_ns=2, src_addr=CLIENT[0],
                dst_addr=SERVER[0], src_port=CLIENT[1], dst_port=port, protocol=protocol,
                ip_version=4, ifindex=3, initiator_packets=10, responder_packets=10,
                flow_end_reason=reason, l7_coverage=L7Coverage(inspected=True,
                                                               captured_octets=5))


def test_body_skip_grant_and_joined_record():
    records = []
    ctl = Control()
    l7 = LiveL7(emit=records.append, control=ctl, budget=(4096, 4096), refill_octets=2048)
    c = Conn(_key())
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
    events = [c.event(0, b"", SYN), c.event(1, b"", SYN | ACK),
              c.event(0, b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n")]
    events.append(c.event(1, head + b"x" * (1448 - len(head))))
    _run(l7, events)
    body_end = (events[-1].seq + len(head) + 100000) & 0xFFFFFFFF
    # The body's skip goes to the kernel, and right behind it a grant, so the next
    # head has room whatever the body in flight used up.
    assert ("skip", 1, body_end) in ctl.calls
    assert ctl.calls.index(("skip", 1, body_end)) < max(
        i for i, call in enumerate(ctl.calls) if call[0] == "grant" and call[1] == 1)
    # What the kernel copied before the skip landed, then truncation (budget), then the
    # skipped rest: none of it reaches the parser; the next exchange does.
    _run(l7, [c.event(1, b"x" * 1448), c.event(1, b"x" * 600, wire_len=1448),
              c.event(1, b"", copy=False, wire_len=100000 - 3 * 1448 + len(head))])
    assert c.seq[1] == (body_end) & 0xFFFFFFFF
    _run(l7, [c.event(0, b"GET /small HTTP/1.1\r\nHost: h\r\n\r\n"),
              c.event(1, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")])
    assert ("stop",) not in ctl.calls        # keep-alive: the parser wants what follows
    _run(l7, [c.event(0, b"", FIN | ACK), c.event(1, b"", FIN | ACK)])
    http = [r for r in records if isinstance(r, L7Event)]
    assert [(e.detail.path, e.detail.status, e.detail.response_body_len) for e in http] == \
        [("/big", 200, 100000), ("/small", 404, 0)]
    joined = l7.join(_flow())
    assert joined.uid == http[0].uid != "Creaderuid0000000"
    assert (joined.app_proto, joined.http_host) == ("http", "h")
    assert joined.l7_coverage == _flow().l7_coverage     # the kernel's accounting stays
    assert len(l7) == 0                                  # a final record ends the state
    # A late packet's own record, from the reader with its uid, gets the same uid too.
    assert l7.join(_flow()).uid == http[0].uid


def test_lost_head_is_resynchronised_at_the_next_request():
    records = []
    ctl = Control()
    l7 = LiveL7(emit=records.append, control=ctl)
    c = Conn(_key())
    _run(l7, [c.event(0, b"", SYN), c.event(1, b"", SYN | ACK),
              c.event(0, b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n"),
              c.event(1, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
              c.event(0, b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n"),
              # The second response's head is lost (truncated in the kernel) ...
              c.event(1, b"", copy=False, wire_len=40),
              c.event(0, b"GET /3 HTTP/1.1\r\nHost: h\r\n\r\n"),
              c.event(1, b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")])
    # ... the parser fails once (counted), the flow is not stopped in the kernel, and
    # parsing resumes at the next message start.
    _run(l7, [c.event(0, b"GET /4 HTTP/1.1\r\nHost: h\r\n\r\n"),
              c.event(1, b"HTTP/1.1 204 No Content\r\n\r\n")])
    l7.join(_flow())
    paths = [(e.detail.path, e.detail.status) for e in records if isinstance(e, L7Event)]
    assert paths[0] == ("/1", 200) and paths[-1] == ("/4", 204)
    assert l7.engine.stats.parser_errors >= 1 and l7.stats.resyncs >= 1
    assert ("stop",) not in ctl.calls


def test_dns_over_tcp_stops_after_the_answer():
    records = []
    ctl = Control()
    l7 = LiveL7(emit=records.append, control=ctl)
    c = Conn(_key(53))
    query = raw(DNS(id=9, rd=1, qd=DNSQR(qname="a.live.test")))
    answer = raw(DNS(id=9, qr=1, rd=1, ra=1, qd=DNSQR(qname="a.live.test"),
                     an=DNSRR(rrname="a.live.test", rdata="198.18.0.53")))
    _run(l7, [c.event(0, b"", SYN), c.event(1, b"", SYN | ACK),
              c.event(0, len(query).to_bytes(2, "big") + query),
              c.event(1, len(answer).to_bytes(2, "big") + answer)])
    [event] = [r for r in records if isinstance(r, L7Event)]
    assert (event.detail.qname, event.detail.rcode, event.detail.transport) == \
        ("a.live.test", 0, "tcp")
    assert ctl.calls[-1] == ("stop",)
    assert l7.join(_flow(port=53)).dns_qname == "a.live.test"


def test_bounded_flows_and_unselected_records_pass_through():
    ctl = Control()
    l7 = LiveL7(emit=lambda r: None, control=ctl, max_flows=1)
    _run(l7, [Conn(_key(80)).event(0, b"GET / HTTP/1.1\r\n\r\n")])
    _run(l7, [Conn(_key(8080)).event(0, b"GET / HTTP/1.1\r\n\r\n")])
    assert l7.stats.flows == 1 and l7.stats.flows_refused == 1
    assert ctl.calls[-1] == ("stop",)        # the refused flow copies nothing more
    plain = Flow(uid="Cplain00000000000", flow_start_ns=1, flow_end_ns=2,
                 src_addr="198.18.9.1", dst_addr="198.18.9.2", protocol=17, ip_version=4)
    assert l7.join(plain) is plain


def test_select_syntax_and_kernel_selection():
    assert parse_select(["port:443,cidr:198.18.0.0/15", "proto:udp,sample:100,sniff"]) == {
        "selection.ports": [443], "selection.cidrs": ["198.18.0.0/15"],
        "selection.protocols": ["udp"], "selection.sample_one_in": 100,
        "selection.sniff": True}
    assert parse_select(["off"])["selection.ports"] == []
    for bad in ("port:x", "host:1", "sample:0", "cidr:"):
        with pytest.raises(ConfigError, match="--select"):
            parse_select([bad])
    args = build_parser().parse_args(
        ["sensor", "run", "--config", "/dev/null", "--iface", "lo", "--budget", "4KiB",
         "--select", "port:443,cidr:198.18.0.0/15,proto:udp,sample:100"])
    sel = kernel_selection(load(args))
    assert (sel.ports, sel.cidrs, sel.protocols, sel.sample_n, sel.sniff, sel.budget) == (
        frozenset({443}), ("198.18.0.0/15",), frozenset({17}), 100, False, (4096, 4096))
    args = build_parser().parse_args(["sensor", "run", "--config", "/dev/null",
                                      "--select", "cidr:198.18.0.1/15"])
    with pytest.raises(ConfigError, match="host bits"):
        load(args)


@pytest.mark.parametrize(("setting", "path"), [
    ([], "/x?token=REDACTED&a=1"),
    (["--set", "redaction.enabled=false"], "/x?token=s3cret&a=1"),
])
def test_redaction_setting_reaches_the_http_parser(setting, path):
    args = build_parser().parse_args(["sensor", "run", "--config", "/dev/null", "--iface",
                                      "lo", *setting])
    cfg = live_config(load(args), args)
    records = []
    l7 = LiveL7(emit=records.append, control=Control(), redact=cfg.redact)
    c = Conn(_key())
    _run(l7, [c.event(0, b"GET /x?token=s3cret&a=1 HTTP/1.1\r\nHost: h\r\n\r\n"),
              c.event(1, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")])
    assert [e.detail.path for e in records if isinstance(e, L7Event)] == [path]


def test_a_walked_copy_the_ring_refused_is_a_counted_gap_never_a_wrong_call():
    # The kernel's frame walk (bpf/frames.h) went on through a full ring buffer: call 2's
    # HEADERS never arrived, and the next event it could deliver says so (LOST_BEFORE).
    # The octets before it are a Gap, not an elision: HPACK's state is unknown, so the
    # connection's decoding ends (a counted parser error) and call 1 stands alone.
    from dataclasses import replace

    from sensor.kernel import frames
    from sensor.l7.http2 import PREFACE
    from tests.l7.test_http2_walk import grpc_call
    from tests.l7.test_http2 import Peer, settings_frame

    records = []
    ctl = Control()
    l7 = LiveL7(emit=records.append, control=ctl)
    c = Conn(_key())
    walked = frames.PLF_SKIPPED_BEFORE

    def ev(direction, data, flags=walked, **kw):
        e = c.event(direction, data, **kw)
        return e if e is None else replace(e, flags=flags)

    cli, srv = Peer(), Peer()
    req1, resp1 = grpc_call(cli, srv, 1, b"")
    req2, resp2 = grpc_call(cli, srv, 3, b"")
    resp1 = [f for f in resp1 if f[3] in (0, 1)]            # the walk elided the rest
    _run(l7, [c.event(0, b"", SYN), c.event(1, b"", SYN | ACK),
              ev(0, PREFACE + settings_frame() + b"".join(req1)),
              ev(1, settings_frame() + b"".join(resp1)),
              ev(0, req2[0], copy=False),                  # refused by the ring
              ev(0, req2[1], walked | frames.PLF_LOST_BEFORE)])
    got = [r.detail for r in records if isinstance(r, L7Event)]
    assert [(e.grpc_method, e.grpc_status) for e in got] == [("Call", 0)]
    assert l7.engine.stats.parser_errors == 1
