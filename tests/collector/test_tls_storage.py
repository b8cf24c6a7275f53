"""mTLS identity, certificate files, retention, and the column checks' parity with the model."""

from __future__ import annotations

import stat
import time

import grpc
import pytest

from collector import certs, schema
from collector.ingest import decode_batch
from collector.storage.duckdb import DuckDBStorage
from sensor.errors import SchemaError
from sensor.export import wire
from loupe.v1 import ingest_pb2_grpc, observer_pb2_grpc

from .conftest import batch, flow, http, dns, tls, mixed


@pytest.fixture
def pki(tmp_path):
    return certs.init(tmp_path / "pki", collector_name="collector.test", sensors=["sensor-a"],
                      analysts=["analyst"])


def _channel(address, pki, client=None):
    kwargs = {"root_certificates": pki.ca_cert.read_bytes()}
    if client:
        cert, key = pki.clients[client]
        kwargs.update(certificate_chain=cert.read_bytes(), private_key=key.read_bytes())
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(**kwargs))


def test_certs_files_and_modes(pki):
    for path in [pki.ca_key, pki.collector[1], *(k for _, k in pki.clients.values())]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(Exception, match="already holds certificates"):
        certs.init(pki.ca_cert.parent, collector_name="c", sensors=["x"], analysts=[])


def test_mtls_refuses_a_client_without_certificate_and_names_sensors_by_cert(start_collector, pki):
    running = start_collector(tls_cert=pki.collector[0], tls_key=pki.collector[1],
                              tls_ca=pki.ca_cert)
    anonymous = ingest_pb2_grpc.IngestStub(_channel(running.address, pki))
    with pytest.raises(grpc.RpcError) as info:
        list(anonymous.Push(iter([batch([flow(1)], 1)]), timeout=10))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    plaintext = ingest_pb2_grpc.IngestStub(grpc.insecure_channel(running.address))
    with pytest.raises(grpc.RpcError):
        list(plaintext.Push(iter([batch([flow(1)], 1)]), timeout=10))

    sensor = ingest_pb2_grpc.IngestStub(_channel(running.address, pki, "sensor-a"))
    records = [flow(1, sensor_id="spoofed"), http(2)]
    acks = list(sensor.Push(iter([batch(records, 1, sensor_id="spoofed")]), timeout=10))
    assert acks[0].status == wire.ingest_pb2.ACK_STATUS_STORED

    analyst = observer_pb2_grpc.ObserverStub(_channel(running.address, pki, "analyst"))
    resp = analyst.Query(wire.observer_pb2.QueryRequest(
        sql="SELECT sensor_id FROM flows UNION ALL SELECT sensor_id FROM http"), timeout=10)
    assert resp.rows_json == ['["sensor-a"]', '["sensor-a"]']
    status = analyst.Status(wire.observer_pb2.StatusRequest(), timeout=10)
    assert [s.sensor_id for s in status.sensors] == ["sensor-a"]


def test_retention_deletes_old_rows(tmp_path):
    store = DuckDBStorage(tmp_path)
    now = time.time_ns()
    old = decode_batch(batch(mixed(20), 1))
    new = decode_batch(batch(mixed(20, 100), 2))
    store.store_many([old], now - 8 * 86_400 * 10**9)
    store.store_many([new], now)
    assert store.counts()["flows"] == 20
    deleted = store.delete_older_than(now - 7 * 86_400 * 10**9)
    assert deleted == 20
    # Every table is counted; only the kinds the batches held have rows left.
    assert store.counts() == {**{t: 0 for t in schema.TABLES},
                              "flows": 10, "http": 4, "dns": 4, "tls": 2}
    assert [s.sensor_id for s in store.sensors()] == ["s1"]
    store.close()


def _mutations():
    """(description, mutate(Record)) pairs; each breaks one rule of sensor/model.py."""
    def setf(path, value):
        def mutate(rec):
            obj = rec
            *parents, last = path.split(".")
            for p in parents:
                obj = getattr(obj, p)
            setattr(obj, last, value)
        return mutate
    return [
        ("flow uid", "flow", setf("flow.uid", "")),
        ("flow src", "flow", setf("flow.src_addr", "10.0.0")),
        ("flow dst", "flow", setf("flow.dst_addr", "")),
        ("flow port", "flow", setf("flow.src_port", 65536)),
        ("flow proto", "flow", setf("flow.protocol", 256)),
        ("flow ipver", "flow", setf("flow.ip_version", 5)),
        ("flow vlan", "flow", setf("flow.vlan_id", 4096)),
        ("flow inner vlan", "flow", setf("flow.inner_vlan_id", 5000)),
        ("flow flags", "flow", setf("flow.initiator_tcp_flags", 0x10000)),
        ("flow icmp", "flow", setf("flow.icmp_type", 300)),
        ("flow reason", "flow", setf("flow.flow_end_reason", 9)),
        ("flow time", "flow", setf("flow.flow_end_ns", 1)),
        ("http status", "http", setf("l7.http.status", 1000)),
        ("http uid", "http", setf("l7.uid", "")),
        ("http src", "http", setf("l7.src_addr", "x")),
        ("dns id", "dns", setf("l7.dns.id", 70000)),
        ("dns qtype", "dns", setf("l7.dns.qtype", 70000)),
        ("dns rcode", "dns", setf("l7.dns.rcode", 4096)),
        ("dns rcode low", "dns", setf("l7.dns.rcode", -2)),
        ("dns transport", "dns", setf("l7.dns.transport", "quic")),
        ("tls version", "tls", setf("l7.tls.version", 0x10000)),
        ("tls cipher", "tls", setf("l7.tls.cipher", 0x10000)),
        ("lost source", "lost", setf("lost.source", "")),
    ]


@pytest.mark.parametrize("what, kind, mutate", _mutations(), ids=lambda x: x if isinstance(x, str) else "")
def test_column_checks_reject_what_the_model_rejects(what, kind, mutate):
    from sensor import model
    base = {"flow": flow(3), "http": http(3), "dns": dns(3), "tls": tls(3),
            "lost": model.LostEvent(source="spool_full", count=1)}[kind]
    b = batch(mixed(10) + [base], 1)
    mutate(b.records[10])
    with pytest.raises(SchemaError) as model_error:
        wire.batch_from_proto(b)
    with pytest.raises(SchemaError) as column_error:
        decode_batch(b)
    # The ack's reason is the model's own wording.
    assert str(column_error.value) == str(model_error.value)


def test_column_decode_matches_the_model_on_valid_records():
    b = batch(mixed(200), 1)
    decoded = decode_batch(b)
    assert sum(t.num_rows for t in decoded.tables.values()) == 200
    flows = decoded.tables["flows"].to_pylist()
    assert flows[0]["uid"] == "F0" and flows[0]["l7_coverage_captured_octets"] == 517
    assert flows[0]["sensor_id"] == "s1"
