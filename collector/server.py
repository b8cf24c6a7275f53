"""The collector process: wires storage, ingest, the subscriber hub and the gRPC server,
and owns start-up and the shutdown order.

Shutdown (SIGTERM/SIGINT): health goes NOT_SERVING; the server stops accepting RPCs and
gives open streams `grace` seconds; every batch already received is committed (a batch
whose ack could not be sent any more is resent by its sensor and acked DUPLICATE); then
DuckDB checkpoints and closes, releasing its file lock.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from collector import render
from collector.ingest import IngestCounters, IngestService, Writer
from collector.observer import SUBSCRIBER_QUEUE, Hub, ObserverService
from collector.storage.duckdb import DuckDBStorage
from sensor.errors import CollectorError, ConfigError
from sensor.export import wire

log = logging.getLogger(__name__)

VERSION = "0.1.0"
DEFAULT_LISTEN = "127.0.0.1:50051"

# Largest gRPC message accepted. A sensor batch of 1000 records is ~100 KiB; 16 MiB leaves
# room for batches of large L7 events while bounding what one message can make us hold.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

DAY_NS = 86_400 * 10**9


@dataclass(frozen=True, slots=True, kw_only=True)
class CollectorConfig:
    listen: str = DEFAULT_LISTEN
    data_dir: Path = Path("data")
    retention_ns: int = 7 * DAY_NS
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    insecure: bool = False
    print_records: bool = False
    max_message_bytes: int = MAX_MESSAGE_BYTES
    subscriber_queue: int = SUBSCRIBER_QUEUE
    grace_s: float = 5.0

    @property
    def mtls(self) -> bool:
        return self.tls_cert is not None

    def check(self) -> None:
        tls = (self.tls_cert, self.tls_key, self.tls_ca)
        if any(tls) and not all(tls):
            raise ConfigError(
                "mTLS needs all of --tls-cert, --tls-key and --tls-ca (make them with "
                "`loupe certs init`)"
            )
        host, _ = split_address(self.listen)
        if not self.mtls and not self.insecure and not is_loopback(host):
            raise ConfigError(
                f"refusing to listen in plaintext on {self.listen}, which is not loopback: "
                "give --tls-cert/--tls-key/--tls-ca for mTLS, or --insecure"
            )
        if self.retention_ns <= 0:
            raise ConfigError("--retention must be positive, e.g. 7d or 12h")


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host or int(port) > 65535:
        raise ConfigError(f"{address!r} is not HOST:PORT (e.g. 127.0.0.1:50051, [::1]:50051)")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}") from None


class Collector:
    """A configured, bound collector. start() / stop() / wait_for_termination() as grpc's
    aio server, plus storage and writer cleanup in the right order."""

    def __init__(self, config: CollectorConfig) -> None:
        config.check()
        self.config = config
        self.storage = DuckDBStorage(config.data_dir, sandbox=True)
        self.counters = IngestCounters()
        self.hub = Hub(queue_size=config.subscriber_queue, last_seq=self.storage.last_seq())
        self.writer = Writer(self.storage)
        self.observer = ObserverService(
            self.storage, self.hub, self.counters.as_dict,
            version=VERSION, started_ns=time.time_ns(),
        )
        self.health = health.aio.HealthServicer()
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second collector on the same port must fail
        ]
        self.server = grpc.aio.server(options=options)
        ingest = IngestService(self.writer, self.hub, self.counters, mtls=config.mtls)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "loupe.v1.Ingest",
            {"Push": grpc.stream_stream_rpc_method_handler(
                ingest.Push,
                request_deserializer=None,  # raw bytes: decoded in IngestService.Push
                response_serializer=wire.ingest_pb2.BatchAck.SerializeToString,
            )},
        ),))
        from loupe.v1 import observer_pb2_grpc
        observer_pb2_grpc.add_ObserverServicer_to_server(self.observer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((
            "loupe.v1.Ingest", "loupe.v1.Observer",
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ), self.server)
        self.port = self._bind()
        self._tasks: list[asyncio.Task] = []
        self._stopped = False

    def _bind(self) -> int:
        config = self.config
        try:
            if config.mtls:
                creds = grpc.ssl_server_credentials(
                    [(_read(config.tls_key, "TLS key"), _read(config.tls_cert, "TLS certificate"))],
                    root_certificates=_read(config.tls_ca, "CA certificate"),
                    require_client_auth=True,
                )
                port = self.server.add_secure_port(config.listen, creds)
            else:
                port = self.server.add_insecure_port(config.listen)
        except RuntimeError:
            port = 0
        if port == 0:
            self.storage.close()
            raise CollectorError(
                f"cannot listen on {config.listen}: the port is in use or the address is not "
                "on this host; stop the other process or choose another --listen HOST:PORT"
            )
        return port

    async def start(self) -> None:
        await self.server.start()
        for service in ("", "loupe.v1.Ingest", "loupe.v1.Observer"):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._tasks.append(asyncio.create_task(self._retention_loop()))
        if self.config.print_records:
            self._tasks.append(asyncio.create_task(render.print_live(self.hub, sys.stdout)))

    async def _retention_loop(self) -> None:
        # Often enough that the store overshoots the retention by at most a tenth of it,
        # rarely enough (at most once a minute) that deleting costs nothing noticeable.
        interval = max(1.0, min(self.config.retention_ns / 10 / 1e9, 60.0))
        while True:
            cutoff = time.time_ns() - self.config.retention_ns
            try:
                deleted = await self.writer.run(self.storage.delete_older_than, cutoff)
            except Exception:  # noqa: BLE001 - a failed sweep is retried; keep ingesting
                log.exception("retention sweep failed; retrying in %.0f s", interval)
            else:
                if deleted:
                    log.info("retention: deleted %d rows older than the retention", deleted)
            await asyncio.sleep(interval)

    async def stop(self, grace: float | None = None) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.config.grace_s if grace is None else grace)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.writer.drain()
        self.writer.close()
        self.observer.close()
        self.storage.close()

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


def create_server(config: CollectorConfig) -> tuple[Collector, int]:
    """A bound, not yet started collector and its port (useful with port 0)."""
    collector = Collector(config)
    return collector, collector.port


def _notify_systemd(state: str) -> None:
    """sd_notify without libsystemd: one datagram to $NOTIFY_SOCKET (Type=notify units)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(state.encode(), path)
        except OSError as exc:
            log.warning("cannot notify systemd at %s: %s", path, exc.strerror)


async def serve(config: CollectorConfig) -> None:
    """Run until SIGTERM/SIGINT, then shut down in order."""
    collector, port = create_server(config)
    await collector.start()
    host, _ = split_address(config.listen)
    shown = f"[{host}]" if ":" in host else host
    log.info("listening on %s:%d (%s, %s)", shown, port, collector.storage.description,
             "mTLS" if config.mtls else "plaintext")
    _notify_systemd("READY=1")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: draining in-flight batches")
    _notify_systemd("STOPPING=1")
    await collector.stop()
    log.info("stopped; storage closed")
