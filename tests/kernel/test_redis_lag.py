"""Redis bulk replies when userspace lags: the real kernel program, driven by
BPF_PROG_TEST_RUN, and the live L7 half (LiveL7 writing l7_ctl through KernelControl), with
userspace reading the ring buffer only at chosen points.

The exact sequence that ended the parse of the live budget test's 10 MiB GETs on a loaded
machine (tests/live/test_db_budget.py; docs/sensor.md, "Budgets"): the reply's head and the
first body packets are copied while the allowance lasts, the rest of the body is truncated,
and userspace gets to the head (and writes the body's skip-until-seq and its grant) only
after the reply's last packet went by. That packet ends with the CRLF closing the bulk
string, and it was truncated too: the parser saw the body as a Skip, then a 2-byte Gap where
the CRLF was. The parser once took that gap for lost framing (ERROR, the flow stopped: no
reply for that GET and no event after it). The CRLF's bytes are fixed, so the framing holds.
"""

from __future__ import annotations

import random

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Raw, raw

from sensor.clock import SystemClock
from sensor.engine.live import KernelControl, LiveL7
from sensor.kernel import abi, bpfsys, testrun
from sensor.kernel.hybrid import KernelSensor, SelectionConfig
from sensor.model import L7Event

pytestmark = pytest.mark.bpf

MAC = dict(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
SERVER = ("198.18.3.2", 6379)
SEGMENT = 1400        # a test run takes about a page of data per packet
BUDGET = (4096, 4096)  # the sensor's default per-direction budget


def _frame(frm, to, flags: str, seq: int, ack: int, data: bytes = b"") -> bytes:
    return raw(Ether(**MAC) / IP(src=frm[0], dst=to[0])
               / TCP(sport=frm[1], dport=to[1], flags=flags, seq=seq & 0xFFFFFFFF,
                     ack=ack & 0xFFFFFFFF) / Raw(data))


def _get(key: str) -> bytes:
    return b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key.encode())


class Conn:
    """One Redis connection through the real program, with the live L7 half reading the
    ring buffer only when told (process())."""

    def __init__(self, prog, sensor: KernelSensor, port: int, cseq: int, sseq: int) -> None:
        self.prog, self.sensor = prog, sensor
        self.client = ("198.18.3.1", port)
        self.records: list = []
        self.l7 = LiveL7(emit=self.records.append, control=KernelControl(sensor, prog.flows_fd),
                         budget=BUDGET)
        self.cseq, self.sseq = cseq, sseq
        self.run(self.client, SERVER, "S", cseq - 1, 0)
        self.run(SERVER, self.client, "SA", sseq - 1, cseq)
        self.run(self.client, SERVER, "A", cseq, sseq)

    def run(self, frm, to, flags, seq, ack, data=b"") -> None:
        assert testrun.run_skb(self.prog.prog_fd, _frame(frm, to, flags, seq, ack, data)).retval == -1

    def process(self) -> None:
        self.sensor.poll(0)
        for ev in self.sensor.payload_events():
            self.l7.on_payload(ev, 0, 0)

    def request(self, data: bytes) -> None:
        self.run(self.client, SERVER, "PA", self.cseq, self.sseq, data)
        self.cseq += len(data)

    def reply(self, data: bytes, sizes=None, after_packet=None) -> None:
        """The server's reply in packets of `sizes` (default SEGMENT); after_packet(i) runs
        after packet i."""
        off = i = 0
        while off < len(data):
            n = min(sizes(i) if sizes else SEGMENT, len(data) - off)
            self.run(SERVER, self.client, "PA", self.sseq, self.cseq, data[off:off + n])
            self.sseq += n
            off += n
            if after_packet is not None:
                after_packet(i)
            i += 1

    def close(self) -> list:
        """FIN both ways (the client's ACK declares what the kernel never copied lost),
        then the flow's end as the reader reports it; the Redis events."""
        self.run(self.client, SERVER, "FA", self.cseq, self.sseq)
        self.run(SERVER, self.client, "FA", self.sseq, self.cseq + 1)
        self.run(self.client, SERVER, "A", self.cseq + 1, self.sseq + 1)
        self.process()
        for lf in list(self.l7._flows.values()):
            self.l7.engine.flow_ending(lf.state)
        return [r.detail for r in self.records if isinstance(r, L7Event)]

    def server_side(self):
        """The kernel's payload accounting of the server's direction (the client's
        address is the lower one, so the server is the flow key's "hi" end)."""
        [val] = [v for k, v in bpfsys.lookup_batch(self.prog.flows_fd, abi.FlowKey,
                                                  abi.FlowValue, batch=256, lock=True)
                 if k.port_lo == self.client[1]]
        return val.l7[abi.DIR_HI_LO]


@pytest.fixture(scope="module")
def loaded():
    from sensor.kernel import loader

    prog = loader.load(loader.LoadOptions(flow_map_size=4096))
    sensor = KernelSensor(prog, SystemClock())
    sensor.reload_selection(SelectionConfig(ports={6379}, sniff=False, budget=BUDGET))
    yield prog, sensor
    prog.close()


def test_a_skip_that_lands_after_the_reply_keeps_the_parse(loaded):
    prog, sensor = loaded
    body = 30_000
    c = Conn(prog, sensor, 41301, 1000, 50_000)
    reply = b"$%d\r\n" % body + b"V" * body + b"\r\n"
    for i in range(4):
        c.request(_get(f"k{i}"))
        if i == 1:
            # Userspace is a whole reply behind: it reads the head only now.
            start = c.server_side()
            c.reply(reply)
            sent = c.server_side()
            c.process()
            # The kernel copied what the allowance held and truncated the rest, the last
            # packet (the CRLF) included; the skip and its grant came too late for it.
            copied = sent.captured - start.captured
            assert copied < len(reply) - SEGMENT and sent.skipped == start.skipped
            assert copied + sent.truncated - start.truncated == len(reply)
            assert c.l7.stats.skips == 2 and c.server_side().truncated == sent.truncated
        else:
            c.reply(reply, after_packet=lambda _: c.process())
    assert c.l7.stats.stops == 0     # the flow was never stopped in the kernel
    events = c.close()
    assert [(e.command, e.key, e.reply_type, e.reply_len) for e in events] == [
        ("GET", f"k{i}", "bulk", body) for i in range(4)]
    assert all(e.reply_bytes == len(reply) for e in events)
    # The CRLF is the one gap; nothing was taken for lost framing.
    stats = c.l7.engine.stats
    assert (stats.gaps, stats.gap_bytes, stats.parser_errors) == (1, 2, 0)
    assert c.l7._flows and all(lf.state.l7.parser.resyncs == 0 for lf in c.l7._flows.values())


def test_random_lag_never_loses_a_reply(loaded):
    # Userspace reads the ring buffer at random points (after every packet, or only at
    # the end: then no grant is ever written and each reply gets just its turn's 512
    # octets), replies of 10 B to 30 KB in packets of random sizes: every GET is parsed
    # with its reply, whatever the kernel copied, truncated or skipped. A reply's first
    # packet carries its whole head line, as servers write it (the turn rule copies the
    # first packet of a turn; a head split over packets while userspace lags loses that
    # reply, and the parser resynchronises: tests/l7/test_redis.py).
    prog, sensor = loaded
    for seed in range(8):
        rnd = random.Random(seed)
        p = (0.0, 0.05, 0.3, 1.0)[seed % 4]
        c = Conn(prog, sensor, 41400 + seed, rnd.randrange(1 << 32), rnd.randrange(1 << 32))
        lengths = [rnd.choice((10, 3000, 30_000)) for _ in range(rnd.randint(3, 7))]
        for i, n in enumerate(lengths):
            c.request(_get(f"key:{i}"))
            if rnd.random() < p:
                c.process()
            c.reply(b"$%d\r\n" % n + b"V" * n + b"\r\n",
                    sizes=lambda k: rnd.choice((SEGMENT, SEGMENT, rnd.randint(1, SEGMENT)))
                    if k else SEGMENT,
                    after_packet=lambda _: c.process() if rnd.random() < p else None)
        events = c.close()
        assert [(e.key, e.reply_type, e.reply_len) for e in events] == [
            (f"key:{i}", "bulk", n) for i, n in enumerate(lengths)], (seed, lengths)
        assert c.l7.engine.stats.parser_errors == 0, seed
