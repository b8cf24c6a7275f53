"""`loupe collector run` as a service: collector.toml (every key reaches the collector;
flags and --set override the file), sd_notify (READY, STATUS, RELOADING, STOPPING),
SIGHUP reload, Prometheus /metrics parsed with prometheus_client's own parser, and
one-line errors. The collector is a real process talking real gRPC over mTLS."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from collector import certs
from collector.cli import collector_config
from loupe.v1 import ingest_pb2_grpc
from sensor import config, model
from sensor.cli import build_parser
from sensor.export import wire
from sensor.model import LostSource

REPO = Path(__file__).resolve().parents[2]
LOUPE = [sys.executable, "-m", "sensor.cli"]
STORED = wire.ingest_pb2.ACK_STATUS_STORED
BASE_NS = 1_700_000_000_000_000_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flows(n: int) -> list[model.Flow]:
    return [model.Flow(uid=f"ops{i}", sensor_id="", flow_start_ns=BASE_NS + i,
                       flow_end_ns=BASE_NS + i + 500, src_addr="198.18.0.1",
                       dst_addr="198.19.0.2", src_port=40000 + i % 20000, dst_port=443,
                       protocol=6, ip_version=4, initiator_octets=100, initiator_packets=2)
            for i in range(n)]


def _run_args(*argv: str):
    return build_parser().parse_args(["collector", "run", *argv])


def test_every_collector_key_reaches_the_collector(tmp_path):
    pki = certs.init(tmp_path / "pki", collector_name="localhost", sensors=[], analysts=[])
    cert, key = pki.collector
    path = tmp_path / "collector.toml"
    spec = tmp_path / "openapi.yaml"
    path.write_text(
        f'listen = "127.0.0.1:50999"\ninsecure = true\ndata_dir = "{tmp_path}/store"\n'
        'retention = "12h"\nmax_message_size = "64KiB"\nsubscriber_queue_size = 16\n'
        'max_columnar_size = "2MiB"\nui = "[::1]:8089"\n'
        f'[tls]\ncert_file = "{cert}"\nkey_file = "{key}"\nclient_ca_file = "{pki.ca_cert}"\n'
        '[metrics]\nlisten = "[::1]:9999"\n'
        '[storage]\nbackend = "clickhouse"\n[storage.clickhouse]\nhost = "ch1.example"\n'
        'port = 9001\ndatabase = "flows"\nuser = "loupe"\npassword = "pw"\ncluster = "two"\n'
        f'[cluster]\npeers = ["127.0.0.2:50999"]\ncert_file = "{cert}"\nkey_file = "{key}"\n'
        f'[api]\nspec = "{spec}"\nservices = ["api.test:*"]\nalert = ["shadow"]\n'
        'unused_after = "1d"\n'
        '[ipfix]\ntargets = ["127.0.0.1:4739", "tcp://[::1]:4740"]\npen = 65000\n'
        'uniflow = true\nqueue_size = 5000\n')
    # Every key of the schema is set above, to a value other than its default.
    assert config.schema_keys("collector") == {
        "listen", "insecure", "data_dir", "retention", "max_message_size", "max_columnar_size",
        "subscriber_queue_size", "ui", "tls.cert_file", "tls.key_file", "tls.client_ca_file",
        "metrics.listen", "storage.backend", "storage.clickhouse.host",
        "storage.clickhouse.port", "storage.clickhouse.database", "storage.clickhouse.user",
        "storage.clickhouse.password", "storage.clickhouse.cluster", "cluster.peers",
        "cluster.cert_file", "cluster.key_file", "api.spec", "api.services", "api.alert",
        "api.unused_after", "ipfix.targets", "ipfix.pen",
        "ipfix.uniflow", "ipfix.queue_size"}
    c = collector_config(_run_args("--config", str(path)))
    assert (c.listen, c.insecure, c.data_dir, c.retention_ns) == (
        "127.0.0.1:50999", True, tmp_path / "store", 12 * 3600 * 10**9)
    assert (c.max_message_bytes, c.subscriber_queue, c.metrics_listen) == (
        64 * 1024, 16, "[::1]:9999")
    assert c.max_columnar_bytes == 2 * 1024 * 1024
    assert (c.tls_cert, c.tls_key, c.tls_ca) == (cert, key, pki.ca_cert)
    assert c.ui_listen == "[::1]:8089"
    ch = c.storage.clickhouse
    assert (c.storage.backend, ch.host, ch.port, ch.database, ch.user, ch.password,
            ch.cluster) == ("clickhouse", "ch1.example", 9001, "flows", "loupe", "pw", "two")
    assert (c.peers, c.peer_cert, c.peer_key) == (("127.0.0.2:50999",), cert, key)
    assert (c.api.spec, c.api.services, c.api.alert, c.api.unused_after) == (
        str(spec), ("api.test:*",), ("shadow",), 86400 * 10**9)
    assert (c.ipfix_targets, c.ipfix_pen, c.ipfix_uniflow, c.ipfix_queue) == (
        ("127.0.0.1:4739", "tcp://[::1]:4740"), 65000, True, 5000)

    # Flags, then --set, win over the file; a relative --data-dir is taken from here.
    c = collector_config(_run_args("--config", str(path), "--listen", "127.0.0.1:0",
                                   "--retention", "2h", "--metrics", "",
                                   "--set", "subscriber_queue_size=32",
                                   "--data-dir", "rel"))
    assert (c.listen, c.retention_ns, c.metrics_listen, c.subscriber_queue) == (
        "127.0.0.1:0", 2 * 3600 * 10**9, "", 32)
    assert c.data_dir == Path.cwd() / "rel"
    assert c.max_message_bytes == 64 * 1024        # still the file's
    assert collector_config(_run_args("--config", str(path), "--ui", "")).ui_listen == ""
    c = collector_config(_run_args("--config", str(path), "--ipfix", "127.0.0.1:9995",
                                   "--ipfix", "tcp://127.0.0.1:9996", "--ipfix-pen", "7"))
    assert (c.ipfix_targets, c.ipfix_pen, c.ipfix_uniflow) == (
        ("127.0.0.1:9995", "tcp://127.0.0.1:9996"), 7, True)


def test_without_a_file_the_store_is_here_and_metrics_are_off(tmp_path, monkeypatch):
    if config.COLLECTOR_CONFIG_PATH.exists():
        pytest.skip(f"{config.COLLECTOR_CONFIG_PATH} exists on this host")
    monkeypatch.chdir(tmp_path)
    c = collector_config(_run_args())
    assert (c.data_dir, c.metrics_listen, c.listen) == (tmp_path / "data", "", "127.0.0.1:50051")
    assert collector_config(_run_args("--metrics", "127.0.0.1:9465")).metrics_listen == "127.0.0.1:9465"


class NotifySocket:
    """What systemd would receive: an abstract AF_UNIX datagram socket."""

    def __init__(self) -> None:
        self.name = f"loupe-ops-collector-{os.getpid()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.sock.settimeout(1.0)

    def wait_for(self, key: str, timeout_s: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.splitlines())
            if key in fields:
                return fields
        raise AssertionError(f"no {key} from the collector in {timeout_s}s")

    def close(self) -> None:
        self.sock.close()


def _scrape(address: str) -> dict:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def _values(family) -> dict:
    return {next(iter(s.labels.values()), ""): s.value for s in family.samples
            if not s.name.endswith("_created")}


@pytest.fixture
def notify():
    sock = NotifySocket()
    yield sock
    sock.close()


def test_collector_service_lifecycle_metrics_and_reload(tmp_path, notify):
    pki = certs.init(tmp_path / "pki", collector_name="localhost", sensors=["ops1"],
                     analysts=[])
    cert, key = pki.collector
    port, metrics_port = _free_port(), _free_port()
    listen, metrics = f"127.0.0.1:{port}", f"127.0.0.1:{metrics_port}"
    config = tmp_path / "collector.toml"

    def write(retention: str, listen_at: str) -> None:
        config.write_text(
            f'listen = "{listen_at}"\ndata_dir = "{tmp_path}/store"\n'
            f'retention = "{retention}"\nmax_message_size = "64KiB"\n'
            f'[tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n'
            f'client_ca_file = "{pki.ca_cert}"\n[metrics]\nlisten = "{metrics}"\n')

    write("1h", listen)
    env = {**os.environ, "NOTIFY_SOCKET": "@" + notify.name}
    proc = subprocess.Popen([*LOUPE, "collector", "run", "--config", str(config)], cwd=REPO,
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        ready = notify.wait_for("READY", 60)
        assert ready["STATUS"].startswith(f"serving on {listen} (mTLS); metrics on {metrics}; "
                                          "retention 1h;")
        sensor_cert, sensor_key = pki.clients["ops1"]
        creds = grpc.ssl_channel_credentials(
            root_certificates=pki.ca_cert.read_bytes(), private_key=sensor_key.read_bytes(),
            certificate_chain=sensor_cert.read_bytes())
        with grpc.secure_channel(listen, creds) as channel:
            push = ingest_pb2_grpc.IngestStub(channel).Push
            acks = list(push(iter([wire.batch_to_proto(_flows(3), sensor_id="x",
                                                      batch_id=1, created_ns=BASE_NS)]),
                             timeout=30))
            assert [a.status for a in acks] == [STORED]
            # max_message_size = 64KiB: a batch of 1000 flows (~100 KiB) is refused.
            with pytest.raises(grpc.RpcError) as refused:
                list(push(iter([wire.batch_to_proto(_flows(1000), sensor_id="x", batch_id=2,
                                                    created_ns=BASE_NS)]), timeout=30))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with grpc.insecure_channel(listen) as plain:   # mTLS is required
            with pytest.raises(grpc.RpcError):
                list(ingest_pb2_grpc.IngestStub(plain).Push(iter([]), timeout=5))

        families = _scrape(metrics)
        lost = families["loupe_lost"]
        assert lost.type == "counter"
        assert set(_values(lost)) == {source.value for source in LostSource}
        assert _values(families["loupe_batches"]) == {"stored": 1, "duplicate": 0, "rejected": 0}
        assert _values(families["loupe_records_stored"]) == {"": 3}
        from collector import schema   # noqa: PLC0415

        assert _values(families["loupe_stored_rows"]) == {   # one per table
            **{table: 0 for table in schema.TABLES}, "flows": 3}
        assert _values(families["loupe_queue_depth"]) == {"ingest_batches": 0,
                                                          "subscriber_records": 0}
        assert _values(families["loupe_subscribers"]) == {"": 0}
        assert _values(families["loupe_metrics_source_errors"]) == {"collector": 0}
        info = families["loupe_build_info"].samples[0]
        assert info.labels["daemon"] == "collector" and info.value == 1
        assert (tmp_path / "store" / "loupe.duckdb").is_file()

        # SIGHUP: the retention applies at once (the rows, stored over a second ago, are
        # swept); a new listen address waits for a restart.
        write("1s", "127.0.0.1:1")
        time.sleep(1.1)
        proc.send_signal(signal.SIGHUP)
        assert "MONOTONIC_USEC" in notify.wait_for("RELOADING", 10)
        assert "; retention 1s; 3 records in 1 batches stored;" in notify.wait_for(
            "READY", 10)["STATUS"]
        deadline = time.monotonic() + 10
        while _values(_scrape(metrics)["loupe_stored_rows"])["flows"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _values(_scrape(metrics)["loupe_stored_rows"])["flows"] == 0
        proc.send_signal(signal.SIGTERM)
        assert notify.wait_for("STOPPING", 30)["STATUS"] == "stopping: draining in-flight batches"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log = proc.stderr.read()
    assert "reload: listen changed; that takes effect at the next start" in log
    assert "reloaded: retention 1s" in log
    assert "retention: deleted 3 rows older than the retention" in log
    assert "stopped; storage closed" in log


@pytest.mark.parametrize("content, flags, message", [
    ('retention = "forever"\n', [],
     "loupe: error: {path}: retention: 'forever' is not a duration (a number and one of ms, "
     "s, m, h, d)"),
    ('listen = "198.18.0.1:50051"\n', [],
     "loupe: error: {path}: listen: 198.18.0.1:50051 is not a loopback address and no TLS is "
     "configured; set tls.cert_file/key_file/client_ca_file, or insecure = true"),
    ("", ["--set", "metrics.lissen=1"],
     "loupe: error: command line: metrics.lissen: unknown key (known here: listen)"),
])
def test_bad_configuration_is_one_line(tmp_path, content, flags, message):
    path = tmp_path / "collector.toml"
    path.write_text(f'data_dir = "{tmp_path}/store"\n' + content)
    result = subprocess.run([*LOUPE, "collector", "run", "--config", str(path), *flags],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [message.format(path=path)]


def test_metrics_port_in_use_is_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        result = subprocess.run(
            [*LOUPE, "collector", "run", "--listen", "127.0.0.1:0", "--data-dir",
             str(tmp_path / "store"), "--metrics", address],
            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"loupe: error: cannot serve metrics on {address}: ")
    assert not (tmp_path / "store").exists()    # failed before the store was opened
