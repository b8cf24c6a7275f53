"""Client certificates (mutual TLS) on real handshakes: Python's ssl module (OpenSSL) on
both ends, joined by memory BIOs so every byte each side writes is what the other reads,
with certificates from the project's own tooling (collector/certs.py). TLS 1.2 shows the
server's CertificateRequest and the client's Certificate in the clear; TLS 1.3 encrypts
them, so it gives no claim either way. The `mtls` kind then reaches each HTTP request of
the TLS plaintext stage on that connection, and the collector's inventory counts it."""

from __future__ import annotations

import ssl
import time

import pytest

from collector import certs
from collector.ingest import decode_batch
from collector.inventory import store
from collector.inventory.model import Inventory
from sensor.engine.plaintext import PlaintextL7
from sensor.export import wire
from sensor.kernel.tlsprobe import READ, WRITE
from sensor.l7 import principal, x509
from sensor.l7.base import NEED_DATA, Direction, ParserState
from sensor.l7.tls import TlsParser
from sensor.model import L7Event
from sensor.replay import replay_records
from tests.fixtures.gen_golden import _tcp_conversation
from tests.live.test_tls_plaintext_engine import C_PID, Control, Process, Sockets

C2S, S2C = Direction.TO_SERVER, Direction.TO_CLIENT


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> certs.IssuedFiles:
    return certs.init(tmp_path_factory.mktemp("pki"), collector_name="api.test",
                      sensors=["client-a"], analysts=[])


def handshake(pki, *, version: ssl.TLSVersion, request: ssl.VerifyMode, send_cert: bool,
              requests: tuple[bytes, ...] = ()):
    """The bytes of one connection, each side's writes in the order they were made:
    [(from_client, bytes)] on the wire, and the plaintext each side wrote after the
    handshake (the client's `requests`, the server's answers) as [(from_client, bytes)].
    Also the client certificate's DER when one was sent."""
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(*pki.collector)
    sctx.load_verify_locations(pki.ca_cert)
    sctx.verify_mode = request
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.load_verify_locations(pki.ca_cert)
    if send_cert:
        cctx.load_cert_chain(*pki.clients["client-a"])
    for ctx in (sctx, cctx):
        ctx.minimum_version = ctx.maximum_version = version
    bios = [ssl.MemoryBIO() for _ in range(4)]   # client in/out, server in/out
    client = cctx.wrap_bio(bios[0], bios[1], server_hostname="api.test")
    server = sctx.wrap_bio(bios[2], bios[3], server_side=True)
    wire_log: list[tuple[bool, bytes]] = []

    def pump() -> None:
        for from_client, out, into in ((True, bios[1], bios[2]), (False, bios[3], bios[0])):
            data = out.read()
            if data:
                wire_log.append((from_client, data))
                into.write(data)

    done = [False, False]
    for _ in range(20):                           # a handshake is 2-3 round trips
        for i, end in enumerate((client, server)):
            if not done[i]:
                try:
                    end.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
        pump()
        if all(done):
            break
    assert all(done), "the handshake did not complete"
    plain: list[tuple[bool, bytes]] = []
    for req in requests:
        client.write(req)
        pump()
        assert server.read(65536) == req
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        server.write(answer)
        pump()
        # TLS 1.3 tickets arrive first on some reads: read until the answer is whole.
        got = b""
        for _ in range(5):
            try:
                got += client.read(65536)
            except ssl.SSLWantReadError:
                break
            if got.endswith(b"ok"):
                break
        assert got == answer
        plain += [(True, req), (False, answer)]
    der = server.getpeercert(binary_form=True)
    return wire_log, plain, der


def parse(steps, *, bytewise: bool = False) -> tuple[TlsParser, list]:
    parser, events = TlsParser(), []
    for i, (from_client, data) in enumerate(steps):
        pieces = [data[j:j + 1] for j in range(len(data))] if bytewise else [data]
        for piece in pieces:
            parser.receive_data(C2S if from_client else S2C, piece, 1000 + i)
        while (ev := parser.next_event()) is not NEED_DATA:
            events.append(ev)
    return parser, events


def test_tls12_client_certificate_is_seen_and_only_hashed(pki):
    steps, _, der = handshake(pki, version=ssl.TLSVersion.TLSv1_2,
                              request=ssl.CERT_REQUIRED, send_cert=True)
    assert der, "the server did not get the client's certificate"
    subject = x509.parse_leaf(der).subject
    assert "client-a" in subject
    for bytewise in (False, True):
        parser, events = parse(steps, bytewise=bytewise)
        (ev,) = events
        assert ev.detail.version == 0x0303 and "api.test" in ev.detail.cert_subject
        assert parser.summary()["tls_client_cert"] == "sent"
        assert parser.client_auth() == (True, principal.hash_of("mtls", subject))
        assert parser.state is ParserState.DONE
        assert "client-a" not in repr(parser.summary()) + repr(ev)
    # The event does not wait for the client: it is out with the server's first flight.
    first_flight = steps[:2]
    assert [c for c, _ in first_flight] == [True, False]
    parser, events = parse(first_flight)
    assert len(events) == 1 and parser.client_auth() is None
    assert parser.summary()["tls_client_cert"] == "requested"


def test_tls12_requested_but_not_sent_and_not_requested(pki):
    steps, _, der = handshake(pki, version=ssl.TLSVersion.TLSv1_2,
                              request=ssl.CERT_OPTIONAL, send_cert=False)
    assert der is None
    parser, events = parse(steps)
    assert len(events) == 1
    assert parser.summary()["tls_client_cert"] == "requested"
    assert parser.client_auth() == (False, "")
    # No request: the parse ends with the server's first flight, as before mTLS.
    steps, _, _ = handshake(pki, version=ssl.TLSVersion.TLSv1_2, request=ssl.CERT_NONE,
                            send_cert=True)
    parser, events = parse(steps[:2])
    assert len(events) == 1 and parser.state is ParserState.DONE
    assert "tls_client_cert" not in parser.summary()
    assert parser.client_auth() == (False, "")


def test_tls13_mutual_auth_gives_no_claim(pki):
    steps, _, der = handshake(pki, version=ssl.TLSVersion.TLSv1_3,
                              request=ssl.CERT_REQUIRED, send_cert=True)
    assert der, "the server did not get the client's certificate"
    parser, events = parse(steps)
    assert len(events) == 1 and events[0].detail.version == 0x0304
    assert "tls_client_cert" not in parser.summary()
    assert parser.client_auth() == (False, "")


def test_flow_summary_through_replay(pki, tmp_path):
    from scapy.utils import wrpcap

    steps, _, _ = handshake(pki, version=ssl.TLSVersion.TLSv1_2, request=ssl.CERT_REQUIRED,
                            send_cert=True)
    cap = tmp_path / "mtls.pcap"
    wrpcap(str(cap), _tcp_conversation("198.18.33.1", "198.18.33.2", 42100, 443,
                                       [(c, d) for c, d in steps], t0=1_700_000_200.0))
    flows = [r for r in replay_records(cap) if not isinstance(r, L7Event)
             and getattr(r, "app_proto", "") == "tls"]
    (flow,) = flows
    assert flow.l7_summary == {"tls_client_cert": "sent"}


def _plaintext_connection(stage: PlaintextL7, plain, pid: int, ssl_obj: int) -> None:
    """The client process's TLS calls (its writes, then its reads) as the probe sends
    them."""
    p = Process(pid, ssl=ssl_obj)
    for from_client, data in plain:
        stage.on_chunk(p.chunk(WRITE if from_client else READ, data), 0, 0)


def test_mtls_joins_every_request_of_the_connection_and_the_inventory_counts_it(pki):
    requests = (b"GET /api/orders HTTP/1.1\r\nHost: api.test\r\n\r\n",
                b"GET /api/orders HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer x\r\n\r\n")
    steps, plain, der = handshake(pki, version=ssl.TLSVersion.TLSv1_2,
                                  request=ssl.CERT_REQUIRED, send_cert=True,
                                  requests=requests)
    wire_parser, _ = parse(steps)
    records: list = []
    stage = PlaintextL7(emit=records.append, control=Control(), resolver=Sockets(),
                        client_auth_of=lambda key: wire_parser.client_auth())
    _plaintext_connection(stage, plain, C_PID, 0x5000)
    stage.flush_all()
    http = [r for r in records if isinstance(r, L7Event)]
    who = principal.hash_of("mtls", x509.parse_leaf(der).subject)
    assert who.startswith("p:")
    assert [[(c.kind, c.principal) for c in r.detail.auth] for r in http] == [
        [("mtls", who)], [("bearer", ""), ("mtls", who)]]

    # A connection whose handshake showed none: its requests carry no mtls.
    steps, plain, _ = handshake(pki, version=ssl.TLSVersion.TLSv1_2,
                                request=ssl.CERT_OPTIONAL, send_cert=False,
                                requests=requests[:1])
    plain_parser, _ = parse(steps)
    stage = PlaintextL7(emit=records.append, control=Control(), resolver=Sockets(),
                        client_auth_of=lambda key: plain_parser.client_auth())
    _plaintext_connection(stage, plain, C_PID, 0x6000)
    stage.flush_all()
    http = [r for r in records if isinstance(r, L7Event)]
    assert len(http) == 3 and http[2].detail.auth == ()

    # Through the wire format and the collector's decoding into the inventory.
    batch = wire.batch_to_proto(http, sensor_id="s1", batch_id=1, created_ns=time.time_ns())
    inv = Inventory()
    inv.add_many(store.transactions(decode_batch(batch)))
    (ep,) = inv.snapshot()
    assert ep["requests"] == 3
    assert ep["auth_counts"] == {"bearer": 1, "mtls": 2}
    assert (ep["authenticated"], ep["unauthenticated"]) == (2, 1)
    assert "client-a" not in repr(ep)


def test_with_mtls_keeps_kinds_order():
    assert [c.kind for c in principal.with_mtls((), "")] == ["mtls"]
    assert principal.KINDS[-1] == "mtls"
    once = principal.with_mtls((), "")
    assert principal.with_mtls(once, "") == once
