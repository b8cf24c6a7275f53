"""Prometheus metrics for both daemons, and the only module that imports prometheus_client.

Components do not import Prometheus. Each registers a callback that returns a snapshot of
its counters as plain ints, keyed by the families below:

    registry.add_source("export", lambda: {
        "lost": {"export_queue_full": self.dropped},
        "records_exported": {"flow": self.flows_sent, "l7": self.l7_sent},
        "queue_depth": {"export": len(self.queue)},
    })

Snapshots are read at scrape time, on the metrics server's thread: a callback must only
read (ints and len() are safe under the GIL) and return a fresh dict. Values for the same
family and label from several sources are summed, so every parser can report its own
parser_error count.

Label values are bounded: `lost` takes only sensor.model.LostSource values (all of them
are exported from the start, at 0, so dashboards and alerts see every loss point before
it first fires), and the other labels come from code, never from traffic. A source that
raises or reports an unknown family or reason is skipped for that scrape and counted in
loupe_metrics_source_errors_total; the other sources are still exported.

Self-monitoring (CPU seconds, RSS, threads, open fds) comes from psutil.
"""

from __future__ import annotations

import logging
import os
import platform
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Callable, Iterator, Mapping, Union
from wsgiref.simple_server import WSGIRequestHandler, make_server

import psutil
from prometheus_client import CollectorRegistry, exposition
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from sensor.config import split_host_port
from sensor.errors import MetricsError
from sensor.model import LostSource

log = logging.getLogger(__name__)

PREFIX = "loupe"

Snapshot = Mapping[str, Union[int, float, Mapping[str, Union[int, float]]]]
SnapshotSource = Callable[[], Snapshot]


@dataclass(frozen=True, slots=True)
class Family:
    name: str               # snapshot key; exported as loupe_<name>[_total]
    kind: str               # "counter" or "gauge"
    label: str | None       # the one label, or None for a plain number
    help: str


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("lost", "counter", "reason",
           "Data dropped, by where it was dropped (LostSource); the unit is the source's own "
           "(flows, packets, bytes, records or events, see docs/ops.md)"),
    Family("records_exported", "counter", "kind",
           "Records handed on (sensor: to the collector or a file; collector: to storage), by kind"),
    Family("records_stored", "counter", None, "Records committed to storage (collector)"),
    Family("batches", "counter", "result",
           "Record batches from sensors, by result: stored, duplicate (stored before, acked "
           "again) or rejected (an invalid record; nothing of it stored) (collector)"),
    Family("undecodable_messages", "counter", None,
           "Ingest messages that were not a RecordBatch; each closed its stream (collector)"),
    Family("stored_rows", "gauge", "table", "Rows in the store now, by table (collector)"),
    Family("queue_depth", "gauge", "queue", "Items waiting in a bounded queue, by queue"),
    Family("spool_bytes", "gauge", None, "Bytes of unacknowledged batches in the on-disk spool"),
    Family("flows_active", "gauge", None, "Flows currently tracked"),
    Family("subscribers", "gauge", None, "Live subscribers connected"),
    Family("enforcement", "counter", "action",
           "Kernel enforcement of block verdicts (sensor/enforce/), by action: flows_blocked, "
           "sources_blocked, resets_sent, resets_skipped, map_full, write_errors, expired; "
           "hold mode: holds_released, held_blocks, nudges_sent"),
    Family("ddos", "counter", "what",
           "The DDoS detector (sensor/rules/ddos.py), by what: events, new_flows, "
           "new_flows_capped, keys_overflow, alerts, sources_blocked, sources_rate_limited, "
           "rate_limited_drops, mitigation_errors, baseline_samples, errors"),
)}

LOST_REASONS: tuple[str, ...] = tuple(source.value for source in LostSource)


class _InvalidSnapshot(Exception):
    pass


@dataclass(frozen=True, slots=True)
class SelfUsage:
    cpu_user_seconds: float
    cpu_system_seconds: float
    rss_bytes: int
    threads: int
    open_fds: int
    start_time: float       # Unix epoch seconds


def self_usage(process: psutil.Process | None = None) -> SelfUsage:
    """This process's CPU and memory, for /metrics and `loupe status`."""
    proc = process or psutil.Process()
    with proc.oneshot():
        cpu = proc.cpu_times()
        return SelfUsage(
            cpu_user_seconds=cpu.user,
            cpu_system_seconds=cpu.system,
            rss_bytes=proc.memory_info().rss,
            threads=proc.num_threads(),
            open_fds=proc.num_fds(),
            start_time=_start_time(proc),
        )


def _start_time(proc: psutil.Process) -> float:
    try:
        return proc.create_time()
    except (psutil.Error, RuntimeError, OSError):
        # psutil adds the boot time from /proc/stat, which ProcSubset=pid (the collector's
        # unit) hides. The boot time is also "now" minus CLOCK_BOOTTIME; the process's
        # start, in clock ticks since boot, is field 22 of /proc/PID/stat (counted after
        # the command name, which may itself hold spaces and parentheses).
        with open(f"/proc/{proc.pid}/stat", "rb") as handle:
            fields = handle.read().rpartition(b")")[2].split()
        boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def build_version() -> str:
    try:
        return metadata.version("loupe")
    except metadata.PackageNotFoundError:
        return "unknown"


class MetricsRegistry:
    """One per daemon: snapshot sources, build info and self-monitoring, rendered in the
    Prometheus text format and served over HTTP by serve()."""

    def __init__(self, daemon: str) -> None:
        self.daemon = daemon
        self._sources: dict[str, SnapshotSource] = {}
        self._infos: dict[str, tuple[str, tuple[str, ...], Callable[[], list]]] = {}
        self._source_errors: dict[str, int] = {}
        self._lock = threading.Lock()
        self._process = psutil.Process()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Exporter(self))

    def add_source(self, name: str, callback: SnapshotSource) -> None:
        with self._lock:
            if name in self._sources:
                raise ValueError(f"metrics source {name!r} is already registered")
            self._sources[name] = callback
            self._source_errors.setdefault(name, 0)

    def remove_source(self, name: str) -> None:
        with self._lock:
            self._sources.pop(name, None)

    def add_info(self, name: str, help: str, labels: tuple[str, ...],
                 callback: Callable[[], list[tuple[str, ...]]]) -> None:
        """An info metric, loupe_<name>_info{labels...} 1, one sample per tuple the
        callback returns (read at scrape time): what a number cannot say, such as the
        interfaces the sensor attached to. A failing callback is counted like a source."""
        with self._lock:
            self._infos[name] = (help, labels, callback)

    def totals(self) -> dict[str, dict[str, float]]:
        """Every family summed over the sources: {"lost": {"spool_full": 0, ...},
        "flows_active": {"": 12}, ...}. What /metrics exports, as plain numbers."""
        totals: dict[str, dict[str, float]] = {name: {} for name in FAMILIES}
        totals["lost"] = {reason: 0 for reason in LOST_REASONS}
        with self._lock:
            sources = list(self._sources.items())
        for name, callback in sources:
            try:
                snapshot = callback()
                checked = _check_snapshot(snapshot)
            except _InvalidSnapshot as exc:
                self._count_error(name, f"reported {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - one bad source must not hide the rest
                self._count_error(name, f"raised {type(exc).__name__}: {exc}")
                continue
            for family, values in checked:
                for label, value in values.items():
                    totals[family][label] = totals[family].get(label, 0) + value
        return totals

    def source_errors(self) -> dict[str, int]:
        with self._lock:
            return dict(self._source_errors)

    def _count_error(self, name: str, what: str) -> None:
        with self._lock:
            self._source_errors[name] = self._source_errors.get(name, 0) + 1
            first = self._source_errors[name] == 1
        if first:
            log.error("metrics source %r %s; skipping it at each scrape until fixed", name, what)

    def render(self) -> bytes:
        """The Prometheus text exposition, as served on /metrics."""
        return exposition.generate_latest(self.registry)

    def serve(self, listen: str) -> "MetricsServer":
        """Serve /metrics on `listen` ("127.0.0.1:9464"; port 0 picks a free port)."""
        host, port = split_host_port(listen)
        try:
            return MetricsServer(host, port, exposition.make_wsgi_app(self.registry))
        except OSError as exc:
            raise MetricsError(
                f"cannot serve metrics on {listen}: {exc.strerror or exc}; set metrics.listen "
                "to a free address, or to \"\" to turn metrics off") from None


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass   # a line per scrape on stderr is noise (prometheus_client's server is quiet too)


class MetricsServer:
    """/metrics over HTTP, as prometheus_client's own server (a thread per scrape), on a
    thread that waits for a connection or close() with no timeout: socketserver's
    serve_forever() wakes twice a second to look for a shutdown (docs/sensor.md,
    "Idle cost")."""

    def __init__(self, host: str, port: int, app) -> None:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
        server_class = type("MetricsHTTPServer", (exposition.ThreadingWSGIServer,),
                            {"address_family": family})
        self._httpd = make_server(host, port, app, server_class=server_class,
                                  handler_class=_QuietHandler)
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, name="loupe-metrics", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._httpd, selectors.EVENT_READ)
            sel.register(self._stop_r, selectors.EVENT_READ)
            while True:
                if any(key.fileobj == self._stop_r for key, _ in sel.select()):
                    return
                self._httpd.handle_request()   # readable: accepts without waiting

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return host, port

    def close(self) -> None:
        if self._stop_w < 0:
            return
        os.write(self._stop_w, b"x")
        self._thread.join(timeout=5)
        self._httpd.server_close()
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)
        self._stop_r = self._stop_w = -1


def _check_snapshot(snapshot: Snapshot) -> list[tuple[str, dict[str, float]]]:
    if not isinstance(snapshot, Mapping):
        raise _InvalidSnapshot(f"a {type(snapshot).__name__} instead of a dict")
    checked = []
    for key, value in snapshot.items():
        family = FAMILIES.get(key)
        if family is None:
            raise _InvalidSnapshot(f"unknown family {key!r} (known: {', '.join(FAMILIES)})")
        if family.label is None:
            values = {"": value}
        elif isinstance(value, Mapping):
            values = dict(value)
        else:
            raise _InvalidSnapshot(f"{key!r} without {family.label} labels")
        for label, number in values.items():
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                raise _InvalidSnapshot(f"{key}[{label!r}] = {number!r}, not a number")
            if key == "lost" and label not in LOST_REASONS:
                raise _InvalidSnapshot(f"lost reason {label!r}, not a LostSource value")
        checked.append((key, values))
    return checked


class _Exporter:
    """The prometheus_client collector: builds the metric families at each scrape."""

    def __init__(self, owner: MetricsRegistry) -> None:
        self._owner = owner

    def collect(self) -> Iterator[Metric]:
        owner = self._owner
        for name, values in owner.totals().items():
            family = FAMILIES[name]
            full = f"{PREFIX}_{name}"
            labels = [family.label] if family.label else []
            metric: Metric
            if family.kind == "counter":
                metric = CounterMetricFamily(full, family.help, labels=labels)
            else:
                metric = GaugeMetricFamily(full, family.help, labels=labels)
            if not labels and not values:
                values = {"": 0}
            for label, value in sorted(values.items()):
                metric.add_metric([label] if labels else [], value)
            yield metric

        # Self-monitoring must not take the rest of the scrape down with it: a failure is
        # counted like a failing source, under the name "process".
        try:
            usage: SelfUsage | None = self_usage(owner._process)
        except (psutil.Error, OSError) as exc:
            owner._count_error("process", f"raised {type(exc).__name__}: {exc}")
            usage = None

        errors = CounterMetricFamily(f"{PREFIX}_metrics_source_errors",
                                     "Scrapes at which a metrics source failed", labels=["source"])
        for source, count in sorted(owner.source_errors().items()):
            errors.add_metric([source], count)
        yield errors

        info = GaugeMetricFamily(f"{PREFIX}_build_info", "Loupe build, always 1",
                                 labels=["daemon", "version", "python"])
        info.add_metric([owner.daemon, build_version(), platform.python_version()], 1)
        yield info

        with owner._lock:
            infos = list(owner._infos.items())
        for name, (help, labels, callback) in infos:
            try:
                rows = [tuple(str(v) for v in row) for row in callback()]
            except Exception as exc:  # noqa: BLE001 - one bad source must not hide the rest
                owner._count_error(name, f"raised {type(exc).__name__}: {exc}")
                continue
            metric = GaugeMetricFamily(f"{PREFIX}_{name}_info", help, labels=list(labels))
            for row in rows:
                metric.add_metric(list(row), 1)
            yield metric

        if usage is None:
            return
        cpu = CounterMetricFamily(f"{PREFIX}_process_cpu_seconds",
                                  "CPU time used by this daemon", labels=["mode"])
        cpu.add_metric(["user"], usage.cpu_user_seconds)
        cpu.add_metric(["system"], usage.cpu_system_seconds)
        yield cpu
        yield GaugeMetricFamily(f"{PREFIX}_process_resident_memory_bytes",
                                "Resident set size of this daemon", value=usage.rss_bytes)
        yield GaugeMetricFamily(f"{PREFIX}_process_threads", "Threads", value=usage.threads)
        yield GaugeMetricFamily(f"{PREFIX}_process_open_fds", "Open file descriptors",
                                value=usage.open_fds)
        yield GaugeMetricFamily(f"{PREFIX}_process_start_time_seconds",
                                "Start time, Unix epoch seconds", value=usage.start_time)
