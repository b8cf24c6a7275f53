"""The collector process: wires storage, ingest, the subscriber hub and the gRPC server,
and owns start-up and the shutdown order.

Start-up (serve): metrics server, store and gRPC port, then READY=1 to systemd (sd_notify
through sensor.notify) once sensors can connect.

SIGHUP re-reads the configuration: the retention takes effect at once (a sweep runs with
it); the other keys (addresses, TLS, store, sizes) are fixed by sockets and objects made
at start-up, so a change to them is logged as needing a restart and otherwise ignored.

Shutdown (SIGTERM/SIGINT): STOPPING=1; health goes NOT_SERVING; the server stops
accepting RPCs and gives open streams `grace` seconds; every batch already received is
committed (a batch whose ack could not be sent any more is resent by its sensor and acked
DUPLICATE); then DuckDB checkpoints and closes, releasing its file lock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from collector import render
from collector.fanout import PeerFeed, PeerTls
from collector.ingest import IngestCounters, IngestService, Writer
from collector.clients import alerts as client_alerts
from collector.clients.store import ClientStore
from collector.inventory import api_alerts
from collector.inventory.store import InventoryStore
from collector.ipfix import IpfixExport
from collector.stats.store import StatsStore
from collector.observer import SUBSCRIBER_QUEUE, Hub, ObserverService
from collector.roles import RoleInterceptor
from collector.storage import open_storage
from sensor.config import ApiConfig, StorageConfig
from sensor.errors import CollectorError, ConfigError, LoupeError
from sensor.export import wire
from sensor.metrics import MetricsRegistry
from sensor.model import LostSource
from sensor.notify import Notifier

log = logging.getLogger(__name__)

VERSION = "0.1.0"
DEFAULT_LISTEN = "127.0.0.1:50051"

# Largest gRPC message accepted. A sensor batch of 1000 records is ~100 KiB; 16 MiB leaves
# room for batches of large L7 events while bounding what one message can make us hold.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

DAY_NS = 86_400 * 10**9

# A scrape reads the counters on the event loop (they are touched only there); when the
# loop cannot answer within this, the scrape reports the source as failed instead of
# hanging the metrics thread.
METRICS_LOOP_TIMEOUT_S = 5.0
# How often STATUS= (what `systemctl status` shows) is refreshed with the counters: often
# enough to be current when someone looks, rarely enough to cost nothing.
STATUS_EVERY_S = 10.0
# How often the endpoint inventory writes its changed endpoints (and at stop).
INVENTORY_SAVE_S = 10.0


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
    # A columnar batch's Arrow buffers once decompressed, at most (max_columnar_size).
    max_columnar_bytes: int = 64 * 1024 * 1024
    subscriber_queue: int = SUBSCRIBER_QUEUE
    grace_s: float = 5.0
    # Prometheus /metrics ("127.0.0.1:9465"); "" is off, the default for embedded use.
    metrics_listen: str = ""
    # The web console (collector/ui), "HOST:PORT"; "" is off.
    ui_listen: str = ""
    # [storage]: DuckDB in data_dir (the default) or a ClickHouse server.
    storage: StorageConfig = StorageConfig()
    # [cluster]: the other collectors in front of the same store, whose records live
    # streams here also carry (collector/fanout.py); under mTLS the client certificate
    # and key this collector presents to them (CA: tls_ca).
    peers: tuple[str, ...] = ()
    peer_cert: Path | None = None
    peer_key: Path | None = None
    # Columnar batches (docs/scaling.md): advertised in Ingest.Options and stored. False
    # makes a collector that answers as one from before them (tests, benchmarks).
    columnar: bool = True
    # [api]: a reference OpenAPI spec whose new findings become Alerts
    # (collector/inventory/api_alerts.py); spec "" is off.
    api: ApiConfig = ApiConfig()
    # [ipfix]: every stored flow also goes out as IPFIX to these targets
    # (collector/ipfix.py); () is off.
    ipfix_targets: tuple[str, ...] = ()
    ipfix_pen: int = 32473
    ipfix_uniflow: bool = False
    ipfix_queue: int = 65536

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
        if self.ui_listen:
            ui_host, _ = split_address(self.ui_listen)
            if not self.mtls and not self.insecure and not is_loopback(ui_host):
                raise ConfigError(
                    f"refusing to serve the console in plaintext on {self.ui_listen}, which "
                    "is not loopback: give --tls-cert/--tls-key/--tls-ca (it then needs an "
                    "analyst or admin client certificate), or --insecure")
        if self.retention_ns <= 0:
            raise ConfigError("--retention must be positive, e.g. 7d or 12h")
        if self.peers and self.mtls and not (self.peer_cert and self.peer_key):
            raise ConfigError(
                "cluster.peers under mTLS needs cluster.cert_file and cluster.key_file: an "
                "analyst certificate this collector presents to its peers (`loupe certs init`)")


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
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second collector on the same port must fail
        ]
        # Under mTLS the certificate's role decides what a peer may call (roles.py).
        interceptors = [RoleInterceptor()] if config.mtls else []
        self.server = grpc.aio.server(options=options, interceptors=interceptors)
        # Everything that can fail (TLS files, the port, IPFIX targets) before the store's
        # directory is made: a failed start leaves nothing behind.
        self.port = self._bind()
        self.ipfix = None
        if config.ipfix_targets:
            try:
                # Targets checked and resolved here; sockets and thread only at start().
                self.ipfix = IpfixExport(config.ipfix_targets, pen=config.ipfix_pen,
                                         uniflow=config.ipfix_uniflow,
                                         queue_records=config.ipfix_queue)
            except BaseException:
                self.server = None
                raise
        try:
            self.storage = open_storage(config.storage, config.data_dir, sandbox=True)
        except BaseException:
            # Not started: dropping the server releases the port.
            self.server = None
            raise
        try:
            self.inventory = InventoryStore(config.data_dir)
        except BaseException:
            self.storage.close()
            self.server = None
            raise
        try:
            self.stats = StatsStore(config.data_dir, self.inventory)
        except BaseException:
            self.inventory.close()
            self.storage.close()
            self.server = None
            raise
        try:
            self.clients = ClientStore(config.data_dir)
        except BaseException:
            self.stats.close()
            self.inventory.close()
            self.storage.close()
            self.server = None
            raise
        self.api_watch = None
        self._api_publisher = api_alerts.Publisher()
        if config.api.spec:
            try:
                api = config.api
                self.api_watch = api_alerts.ApiWatch(
                    Path(api.spec), config.data_dir, services=api.services, kinds=api.alert,
                    unused_after_ns=api.unused_after)
            except BaseException:
                self.clients.close()
                self.stats.close()
                self.inventory.close()
                self.storage.close()
                self.server = None
                raise
        self.counters = IngestCounters()
        self.hub = Hub(queue_size=config.subscriber_queue, last_seq=self.storage.last_seq())
        self.writer = _CountingWriter(self.storage)
        self.writer.on_stored = self._on_stored
        self.writer.columnar = config.columnar
        # Never below the message limit: a batch that size uncompressed is already in
        # memory, and refusing it would only refuse what max_message_size lets in.
        self.writer.max_columnar_bytes = max(config.max_columnar_bytes,
                                             config.max_message_bytes)
        self.observer = ObserverService(
            self.storage, self.hub, self._status_counters,
            version=VERSION, started_ns=time.time_ns(), inventory=self.inventory,
            stats=self.stats, clients=self.clients,
        )
        self.health = health.aio.HealthServicer()
        ingest = IngestService(self.writer, self.hub, self.counters, mtls=config.mtls)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "loupe.v1.Ingest",
            {"Push": grpc.stream_stream_rpc_method_handler(
                ingest.Push,
                request_deserializer=None,  # raw bytes: decoded in IngestService.Push
                response_serializer=wire.ingest_pb2.BatchAck.SerializeToString,
            ), **({"Options": grpc.unary_unary_rpc_method_handler(
                ingest.Options,
                request_deserializer=wire.ingest_pb2.IngestOptionsRequest.FromString,
                response_serializer=wire.ingest_pb2.IngestOptions.SerializeToString,
            )} if config.columnar else {})},
        ),))
        from loupe.v1 import observer_pb2_grpc
        observer_pb2_grpc.add_ObserverServicer_to_server(self.observer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((
            "loupe.v1.Ingest", "loupe.v1.Observer",
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ), self.server)
        self.peer_feed = None
        if config.peers:
            tls = None
            if config.mtls:
                tls = PeerTls(ca_cert=config.tls_ca, client_cert=config.peer_cert,
                              client_key=config.peer_key)
            self.peer_feed = PeerFeed(config.peers, self.hub, tls=tls)
            self.observer.peers = self.peer_feed   # merged views (fanout.py)
        self.ui = None
        if config.ui_listen:
            from collector.ui.app import Console

            self.ui = Console(self)
        self._tasks: list[asyncio.Task] = []
        self._stopped = False
        self._sweep_now = asyncio.Event()

    def _status_counters(self) -> dict[str, int]:
        out = self.counters.as_dict()
        if self.peer_feed is not None:   # records forwarded from peers, feeds up, reconnects
            out.update(self.peer_feed.counters)
        if self.ipfix is not None:
            out.update(self.ipfix.counters())
        return out

    def _on_stored(self, batch) -> None:
        # Each only queues the batch for its own thread: none holds up the ack.
        self.inventory.on_stored(batch)
        self.stats.on_stored(batch)
        self.clients.on_stored(batch)
        if self.ipfix is not None:
            self.ipfix.on_stored(batch)

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
            raise CollectorError(
                f"cannot listen on {config.listen}: the port is in use or the address is not "
                "on this host; stop the other process or choose another --listen HOST:PORT"
            )
        return port

    async def start(self) -> None:
        # The console's port first: taken, it fails the start before anything runs (the
        # store is closed in order).
        if self.ui is not None:
            try:
                await self.ui.start()
            except BaseException:
                await self.stop(grace=0)
                raise
        if self.ipfix is not None:
            self.ipfix.start()
        # Decoders first: a sensor connecting the moment the port answers gets its first
        # acks at full speed.
        await self.writer.start()
        await self.server.start()
        for service in ("", "loupe.v1.Ingest", "loupe.v1.Observer"):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._tasks.append(asyncio.create_task(self._retention_loop()))
        self._tasks.append(asyncio.create_task(self._inventory_loop()))
        if self.api_watch is not None:
            self._tasks.append(asyncio.create_task(self._api_loop()))
        if self.peer_feed is not None:
            self._tasks.append(asyncio.create_task(self.peer_feed.run()))
        if self.config.print_records:
            self._tasks.append(asyncio.create_task(render.print_live(self.hub, sys.stdout)))

    async def _retention_loop(self) -> None:
        while True:
            # Often enough that the store overshoots the retention by at most a tenth of
            # it, rarely enough (at most once a minute) that deleting costs nothing
            # noticeable. Read each time: a reload may have changed the retention.
            interval = max(1.0, min(self.config.retention_ns / 10 / 1e9, 60.0))
            # Cleared before the sweep: a reload during it asks for another one.
            self._sweep_now.clear()
            cutoff = time.time_ns() - self.config.retention_ns
            try:
                await self.writer.run(self.storage.set_retention, self.config.retention_ns)
                deleted = await self.writer.run(self.storage.delete_older_than, cutoff)
            except Exception:  # noqa: BLE001 - a failed sweep is retried; keep ingesting
                log.exception("retention sweep failed; retrying in %.0f s", interval)
            else:
                if deleted:
                    log.info("retention: deleted %d rows older than the retention", deleted)
            try:
                await asyncio.wait_for(self._sweep_now.wait(), interval)
            except asyncio.TimeoutError:
                pass

    async def _inventory_loop(self) -> None:
        # Saved on the writer thread, between commits: a crash loses at most this much
        # of the inventory's updates (the records themselves are in the store).
        while True:
            await asyncio.sleep(INVENTORY_SAVE_S)
            try:
                await self.writer.run(self.inventory.save)
                await self.writer.run(self.clients.save)
                # The client notices as Alert records (collector/clients/alerts.py).
                await client_alerts.publish(self.writer, self.hub,
                                            self.clients.clients.take_alerts())
            except Exception:  # noqa: BLE001 - retried at the next tick; keep ingesting
                log.exception("saving the endpoint inventory failed; retrying")

    async def check_api(self) -> int:
        """One check of the inventory against [api] spec: its new findings stored as
        Alerts (collector/inventory/api_alerts.py); returns how many."""
        watch = self.api_watch
        endpoints = await asyncio.to_thread(self.inventory.snapshot)
        check = await asyncio.to_thread(watch.check, endpoints)
        now = time.time_ns()
        stored = await self._api_publisher.publish(
            self.writer, self.hub, [api_alerts.alert_of(f, now) for f in check.new])
        # Only what was stored counts as alerted: the rest is found again next time.
        check.new = check.new[:stored]
        await asyncio.to_thread(watch.commit, check)
        return stored

    async def _api_loop(self) -> None:
        while True:
            await asyncio.sleep(api_alerts.CHECK_S)
            try:
                n = await self.check_api()
            except Exception:  # noqa: BLE001 - retried at the next check; keep ingesting
                log.exception("checking the inventory against [api] spec failed; retrying")
            else:
                if n:
                    log.info("[api] spec: %d new findings stored as alerts", n)

    def reload(self, new: CollectorConfig) -> str:
        """Apply a re-read configuration: the retention at once (with a sweep), the rest
        only at the next start. Returns a one-line summary for the log and STATUS."""
        new.check()
        fixed = [f.name for f in dataclasses.fields(CollectorConfig)
                 if f.name != "retention_ns" and getattr(new, f.name) != getattr(self.config, f.name)]
        if fixed:
            log.warning("reload: %s changed; that takes effect at the next start "
                        "(systemctl restart loupe-collector)", ", ".join(fixed))
        changed = new.retention_ns != self.config.retention_ns
        self.config = dataclasses.replace(self.config, retention_ns=new.retention_ns)
        if changed:
            self._sweep_now.set()
        return f"retention {_duration(self.config.retention_ns)}"

    def metrics_snapshot(self, loop: asyncio.AbstractEventLoop) -> dict:
        """The collector's numbers for /metrics; called on the metrics server's thread."""
        future = asyncio.run_coroutine_threadsafe(self._loop_snapshot(), loop)
        try:
            snapshot = future.result(timeout=METRICS_LOOP_TIMEOUT_S)
        except TimeoutError:
            future.cancel()
            raise
        # DuckDB counts rows from its own metadata; a cursor of its own is thread-safe.
        snapshot["stored_rows"] = self.storage.counts()
        return snapshot

    async def _loop_snapshot(self) -> dict:
        counters, hub = self.counters, self.hub
        lost = {LostSource.SUBSCRIBER_SLOW.value: hub.counters()["subscriber_dropped"]}
        exported, depth = {}, {}
        if self.ipfix is not None:
            ipfix = self.ipfix.counters()
            # Flows the export queue had no room for; IPFIX records a target did not take.
            lost[LostSource.EXPORT_QUEUE_FULL.value] = ipfix["ipfix_queue_full"]
            lost[LostSource.IPFIX_SEND_ERROR.value] = ipfix["ipfix_records_dropped"]
            exported = {"records_exported": {"ipfix": ipfix["ipfix_records_sent"]}}
            depth = {"ipfix_flows": ipfix["ipfix_queue_depth"]}
        return {
            "lost": lost,
            **exported,
            "records_stored": counters.records_stored,
            "batches": {"stored": counters.batches_stored,
                        "duplicate": counters.batches_duplicate,
                        "rejected": counters.batches_rejected},
            "undecodable_messages": counters.undecodable_messages,
            "subscribers": len(hub.subscribers),
            "queue_depth": {
                # Batches received and not yet acked: decoding, or waiting for a commit.
                "ingest_batches": self.writer.in_flight,
                # Records waiting for live subscribers (each queue is bounded).
                "subscriber_records": sum(s.queue.qsize() for s in hub.subscribers),
                **depth,
            },
        }

    async def stop(self, grace: float | None = None) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        if self.ui is not None:   # its live streams are hub subscribers: closed first
            await self.ui.stop()
        await self.server.stop(self.config.grace_s if grace is None else grace)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.writer.drain()
        self.writer.close()
        if self.ipfix is not None:      # after the drain: every stored flow is queued
            await asyncio.get_running_loop().run_in_executor(None, self.ipfix.close)
        self.inventory.close()
        self.stats.close()
        self.clients.close()
        if self.api_watch is not None:
            self.api_watch.close()
        self.observer.close()
        self.storage.close()

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


class _CountingWriter(Writer):
    """The writer, counting the batches it holds (for the ingest queue depth metric)."""

    def __init__(self, storage) -> None:
        super().__init__(storage)
        self.in_flight = 0      # touched on the event loop only

    async def store(self, batch, raw: bytes, identity: str | None):
        self.in_flight += 1
        try:
            return await super().store(batch, raw, identity)
        finally:
            self.in_flight -= 1


def _duration(ns: int) -> str:
    for unit, size in (("d", DAY_NS), ("h", 3600 * 10**9), ("m", 60 * 10**9)):
        if ns % size == 0:
            return f"{ns // size}{unit}"
    return f"{ns / 1e9:g}s"


def create_server(config: CollectorConfig) -> tuple[Collector, int]:
    """A bound, not yet started collector and its port (useful with port 0)."""
    collector = Collector(config)
    return collector, collector.port


async def serve(config: CollectorConfig,
                reload: Callable[[], CollectorConfig] | None = None) -> None:
    """Run until SIGTERM/SIGINT, then shut down in order. `reload` re-reads the
    configuration on SIGHUP (None: SIGHUP is logged and ignored)."""
    notifier = Notifier.from_environ()
    metrics = MetricsRegistry("collector")
    # Metrics first: a port in use fails here, before the store is opened.
    metrics_server = metrics.serve(config.metrics_listen) if config.metrics_listen else None
    try:
        await _serve(config, reload, notifier, metrics)
    finally:
        if metrics_server is not None:
            metrics_server.close()
        notifier.close()


async def _serve(config: CollectorConfig, reload, notifier: Notifier,
                 metrics: MetricsRegistry) -> None:
    collector, port = create_server(config)
    await collector.start()
    loop = asyncio.get_running_loop()
    metrics.add_source("collector", lambda: collector.metrics_snapshot(loop))
    # Service statistics: labelled families of their own, top-N services plus "other".
    from collector.stats.prom import StatsMetrics
    stats_metrics = StatsMetrics(collector.stats)
    metrics.registry.register(stats_metrics)
    host, _ = split_address(config.listen)
    shown = f"[{host}]" if ":" in host else host
    log.info("listening on %s:%d (%s, %s)", shown, port, collector.storage.description,
             "mTLS" if config.mtls else "plaintext")
    serving = (f"serving on {shown}:{port} ({'mTLS' if config.mtls else 'plaintext'}); "
               f"metrics on {config.metrics_listen or 'off'}")
    if collector.ui is not None:
        log.info("console on %s", collector.ui.url)
        serving += f"; console on {collector.ui.url}"
    notifier.ready(_status(collector, serving))
    stop = asyncio.Event()
    hup = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, hup.set)
    try:
        while not stop.is_set():
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(hup.wait())]
            await asyncio.wait(waiters, timeout=STATUS_EVERY_S,
                               return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
            if hup.is_set() and not stop.is_set():
                hup.clear()
                _reload(collector, reload, notifier)
                notifier.ready(_status(collector, serving))
            else:
                notifier.status(_status(collector, serving))
        log.info("stopping: draining in-flight batches")
        notifier.stopping("stopping: draining in-flight batches")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        metrics.remove_source("collector")
        metrics.registry.unregister(stats_metrics)
        await collector.stop()
    log.info("stopped; storage closed")


def _status(collector: Collector, serving: str) -> str:
    """The STATUS= line `systemctl status loupe-collector` shows."""
    c = collector.counters
    return (f"{serving}; retention {_duration(collector.config.retention_ns)}; "
            f"{c.records_stored} records in {c.batches_stored} batches stored; "
            f"{len(collector.hub.subscribers)} subscribers")


def _reload(collector: Collector, reload, notifier: Notifier) -> None:
    if reload is None:
        log.warning("SIGHUP: started without a configuration file, nothing to re-read")
        return
    notifier.reloading()
    try:
        summary = collector.reload(reload())
    except LoupeError as exc:
        # A bad file keeps the running configuration, as the sensor does.
        log.error("reload refused, keeping the running configuration: %s", exc)
    else:
        log.info("reloaded: %s", summary)
