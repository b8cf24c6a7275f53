"""Certificate roles over real mTLS: a sensor certificate may only send, an analyst's only
read, an admin's both; a certificate without a role is refused and told to re-issue."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from collector import certs
from sensor.export import wire
from loupe.v1 import ingest_pb2_grpc, observer_pb2_grpc

from .conftest import REPO, batch, flow

STORED = wire.ingest_pb2.ACK_STATUS_STORED
DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture
def pki(tmp_path):
    files = certs.init(tmp_path / "pki", collector_name="collector.test", sensors=["s1"],
                       analysts=["ana"], admins=["root1"])
    _roleless(files, "old")
    return files


def _roleless(files, name: str) -> None:
    """A client certificate as `loupe certs init` made them before roles: no OU."""
    ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    key = certs._key()
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(certs._name(name))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .sign(ca_key, hashes.SHA256()))
    pair = (files.ca_cert.parent / f"{name}.pem", files.ca_cert.parent / f"{name}.key")
    pair[0].write_bytes(certs._pem_cert(cert))
    pair[1].write_bytes(certs._pem_key(key))
    files.clients[name] = pair


@pytest.fixture
def running(start_collector, pki):
    return start_collector(tls_cert=pki.collector[0], tls_key=pki.collector[1],
                           tls_ca=pki.ca_cert)


def _channel(address, pki, client):
    cert, key = pki.clients[client]
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(
        root_certificates=pki.ca_cert.read_bytes(), certificate_chain=cert.read_bytes(),
        private_key=key.read_bytes()))


def _push(address, pki, client, batch_id):
    stub = ingest_pb2_grpc.IngestStub(_channel(address, pki, client))
    return list(stub.Push(iter([batch([flow(batch_id)], batch_id)]), timeout=10))


def _read(address, pki, client):
    """Query, Subscribe, Status and Export: the error codes, or None for each that worked."""
    stub = observer_pb2_grpc.ObserverStub(_channel(address, pki, client))
    codes = []
    for call in (lambda: stub.Query(wire.observer_pb2.QueryRequest(sql="SELECT 1"), timeout=10),
                 lambda: list(stub.Subscribe(wire.observer_pb2.SubscribeRequest(since_ns=1),
                                             timeout=10)),
                 lambda: stub.Status(wire.observer_pb2.StatusRequest(), timeout=10),
                 lambda: list(stub.Export(wire.observer_pb2.ExportRequest(), timeout=10))):
        try:
            call()
            codes.append(None)
        except grpc.RpcError as exc:
            codes.append(exc.code())
    return codes


def test_certificates_carry_their_role(pki):
    roles = {name: certs.role_of(x509.load_pem_x509_certificate(cert.read_bytes()))
             for name, (cert, _) in pki.clients.items()}
    assert roles == {"s1": "sensor", "ana": "analyst", "root1": "admin", "old": None}


def test_sensor_may_only_send(running, pki):
    assert [a.status for a in _push(running.address, pki, "s1", 1)] == [STORED]
    assert _read(running.address, pki, "s1") == [DENIED] * 4


def test_analyst_may_only_read(running, pki):
    with pytest.raises(grpc.RpcError) as info:
        _push(running.address, pki, "ana", 1)
    assert info.value.code() == DENIED
    assert "role analyst" in info.value.details() and "send records" in info.value.details()
    assert _read(running.address, pki, "ana") == [None] * 4
    # Nothing of the refused stream was stored.
    stub = observer_pb2_grpc.ObserverStub(_channel(running.address, pki, "ana"))
    resp = stub.Query(wire.observer_pb2.QueryRequest(sql="SELECT count(*) FROM flows"), timeout=10)
    assert list(resp.rows_json) == ["[0]"]


def test_admin_may_do_both_and_a_roleless_certificate_nothing(running, pki):
    assert [a.status for a in _push(running.address, pki, "root1", 1)] == [STORED]
    assert _read(running.address, pki, "root1") == [None] * 4
    with pytest.raises(grpc.RpcError) as info:
        _push(running.address, pki, "old", 2)
    assert info.value.code() == DENIED and "re-issue" in info.value.details()
    assert _read(running.address, pki, "old") == [DENIED] * 4


def test_health_stays_open_to_every_certificate(running, pki):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    stub = health_pb2_grpc.HealthStub(_channel(running.address, pki, "s1"))
    resp = stub.Check(health_pb2.HealthCheckRequest(service="loupe.v1.Observer"), timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_cli_with_a_sensor_certificate_gets_one_line(running, pki):
    cert, key = pki.clients["s1"]
    out = subprocess.run(
        [sys.executable, "-m", "sensor.cli", "query", "--collector", running.address,
         "--tls-ca", str(pki.ca_cert), "--tls-cert", str(cert), "--tls-key", str(key),
         "--tls-server-name", "collector.test", "SELECT 1"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.startswith(f"loupe: error: the collector at {running.address} refused "
                                 "this certificate: certificate 's1' has role sensor")
    assert len(out.stderr.splitlines()) == 1


def test_certs_init_cli_names_each_role(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "sensor.cli", "certs", "init", "--dir", str(tmp_path / "pki"),
         "--sensor", "web1", "--admin", "ops"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[2:] == [f"sensor web1: {tmp_path}/pki/web1.pem {tmp_path}/pki/web1.key",
                         f"admin ops: {tmp_path}/pki/ops.pem {tmp_path}/pki/ops.key"]
    cert = x509.load_pem_x509_certificate((tmp_path / "pki" / "ops.pem").read_bytes())
    assert certs.role_of(cert) == "admin"
