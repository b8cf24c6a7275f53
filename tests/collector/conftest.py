"""Collector test plumbing: a real collector (grpc.aio, DuckDB file in tmp_path) on its own
event-loop thread, real grpc clients, and realistic records."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path

import grpc
import pytest

from collector.server import CollectorConfig, create_server
from sensor import model
from sensor.export import wire
from loupe.v1 import ingest_pb2_grpc, observer_pb2_grpc

BASE_NS = 1_700_000_000_000_000_000


class RunningCollector:
    """A collector serving on 127.0.0.1:<port 0> from a background event loop."""

    def __init__(self, config: CollectorConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.collector, self.port = self.call(self._start())
        self.address = f"127.0.0.1:{self.port}"

    async def _start(self):
        collector, port = create_server(self.config)
        await collector.start()
        return collector, port

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.call(self.collector.stop(grace=0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def start_collector(tmp_path):
    started = []

    def start(**overrides) -> RunningCollector:
        fields = {"listen": "127.0.0.1:0", "data_dir": tmp_path / "data", **overrides}
        running = RunningCollector(CollectorConfig(**fields))
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def collector(start_collector) -> RunningCollector:
    return start_collector()


def ingest_stub(address: str, **kw):
    return ingest_pb2_grpc.IngestStub(grpc.insecure_channel(address, **kw))


def observer_stub(address: str, **kw):
    return observer_pb2_grpc.ObserverStub(grpc.insecure_channel(address, **kw))


def flow(i: int, **kw) -> model.Flow:
    base = dict(
        uid=f"F{i}", sensor_id="", flow_start_ns=BASE_NS + i * 1000,
        flow_end_ns=BASE_NS + i * 1000 + 500, src_addr=f"198.18.{i % 200}.{1 + i % 250}",
        dst_addr="198.19.0.10", src_port=40000 + i % 20000, dst_port=443, protocol=6,
        ip_version=4, initiator_octets=500 + i, responder_octets=4000, initiator_packets=6,
        responder_packets=5, initiator_tcp_flags=0x1B, responder_tcp_flags=0x1B,
        tcp_syn_count=2, tcp_fin_count=2, flow_end_reason=model.FlowEndReason.END_OF_FLOW,
        conn_state="SF", history="ShADadFf", community_id="1:x=", app_proto="tls",
        l7_coverage=model.L7Coverage(inspected=True, captured_octets=517),
        tls_sni="api.example.test",
    )
    base.update(kw)
    return model.Flow(**base)


def http(i: int, status: int = 200, host: str = "www.example.test", path: str = "/index.html",
         method: str = "GET", **kw) -> model.L7Event:
    base = dict(uid=f"H{i}", ts_ns=BASE_NS + i * 1000, src_addr="198.18.0.5",
                dst_addr="198.19.0.80", src_port=50000 + i % 10000, dst_port=80, protocol=6)
    base.update(kw)
    return model.L7Event(**base, detail=model.HttpEvent(
        method=method, host=host, path=path, version="1.1", status=status,
        reason="OK", user_agent="curl/8.0", response_body_len=1234, latency_ns=2_000_000))


def dns(i: int, qname: str = "a.example.test", rcode: int = 0, **kw) -> model.L7Event:
    base = dict(uid=f"D{i}", ts_ns=BASE_NS + i * 1000, src_addr="fc00::5",
                dst_addr="fc00::53", src_port=33000 + i % 10000, dst_port=53, protocol=17)
    base.update(kw)
    return model.L7Event(**base, detail=model.DnsEvent(
        id=i % 65536, qname=qname, qtype=1, rcode=rcode,
        answers=(model.DnsAnswer(name=qname, rtype=1, ttl=30, data="198.19.0.9"),) if rcode == 0 else (),
        latency_ns=800_000))


def tls(i: int, sni: str = "api.example.test", **kw) -> model.L7Event:
    base = dict(uid=f"T{i}", ts_ns=BASE_NS + i * 1000, src_addr="198.18.0.7",
                dst_addr="198.19.0.10", src_port=41000 + i % 10000, dst_port=443, protocol=6)
    base.update(kw)
    return model.L7Event(**base, detail=model.TlsEvent(
        version=0x0304, client_version=0x0303, sni=sni, alpn=("h2", "http/1.1"),
        cipher=0x1301, ja4="t13d1516h2_8daaf6152771_b0da82dd1658"))


def mixed(n: int, start: int = 0) -> list:
    """A realistic mix: mostly flows, then HTTP, DNS and TLS events."""
    out = []
    for i in range(start, start + n):
        r = i % 10
        if r < 5:
            out.append(flow(i))
        elif r < 7:
            out.append(http(i, status=(200, 404, 503)[i % 3]))
        elif r < 9:
            out.append(dns(i, rcode=(0, 3)[i % 2]))
        else:
            out.append(tls(i))
    return out


def batch(records, batch_id: int, sensor_id: str = "s1"):
    return wire.batch_to_proto(records, sensor_id=sensor_id, batch_id=batch_id, created_ns=BASE_NS)


def push(address: str, batches, **kw) -> list:
    """Push batches on one stream; return the acks."""
    return list(ingest_stub(address, **kw).Push(iter(batches), timeout=30))


def query(address: str, sql: str, **kw):
    import json
    resp = observer_stub(address).Query(wire.observer_pb2.QueryRequest(sql=sql, **kw), timeout=30)
    return [tuple(json.loads(r)) for r in resp.rows_json]


def subscribe(address: str, timeout: float = 30, **kw) -> list:
    req = wire.observer_pb2.SubscribeRequest(**kw)
    return [wire.from_proto(r.record) for r in observer_stub(address).Subscribe(req, timeout=timeout)]


def with_sensor(records, sensor_id):
    return [dataclasses.replace(r, sensor_id=sensor_id) for r in records]


REPO = Path(__file__).resolve().parents[2]
