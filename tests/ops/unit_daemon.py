"""A daemon with the lifecycle loupe-sensor.service expects, built from the real service
pieces: sensor.config (file + --set), sensor.logs, sensor.notify, sensor.metrics and the
real gRPC exporter with its on-disk spool. tests/ops/test_units.py runs it under the real
unit file (ExecStart replaced by a drop-in) while `loupe sensor run` does not exist, so the
unit's mechanics are proven with the code the sensor will use; once the command exists
the test runs it instead and this file is only the reference for the lifecycle:

    start:   load config -> metrics server -> exporter -> READY=1 + STATUS
    loop:    keepalive() every iteration (WATCHDOG=1 at half of WatchdogSec)
    SIGHUP:  RELOADING=1 -> re-read config -> READY=1 + STATUS (same pid)
    SIGTERM: STOPPING=1 -> flush the exporter -> exit 0
    SIGUSR1: stop pinging the watchdog (a wedged main loop, for the watchdog test)

With --kernel it also compiles and loads the real flow meter (sensor.kernel.loader, bcc)
and attaches it to the configured interfaces before READY=1, and opens the ring buffer
(a ctypes callback, i.e. a libffi closure), so the unit's sandbox and capabilities are
proven against what the sensor really does at start-up.

It exports `--records N` synthetic Flow records at start, so the test can see records
reach the collector through the real exporter, spool and collector units.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from sensor import config as cfg
from sensor import model
from sensor.errors import LoupeError
from sensor.export.grpc_client import GrpcExportConfig, GrpcExporter
from sensor.logs import setup_logging
from sensor.metrics import MetricsRegistry
from sensor.notify import Notifier

log = logging.getLogger("loupe.unit_daemon")

# Main-loop tick: short enough to react to signals promptly, long enough to be idle.
TICK_S = 0.2


def _flows(sensor_id: str, count: int) -> list[model.Flow]:
    now = time.time_ns()
    return [
        model.Flow(uid=f"unitdaemon-{now}-{i}", sensor_id=sensor_id,
                   flow_start_ns=now - 1_000_000, flow_end_ns=now,
                   src_addr="198.18.0.1", dst_addr="198.18.0.2", src_port=40000 + i,
                   dst_port=80, protocol=6, ip_version=4, initiator_packets=1,
                   initiator_octets=60)
        for i in range(count)
    ]


def _attach(config: cfg.SensorConfig, seen: dict[str, int]):
    # Imported here: without --kernel the daemon needs neither bcc nor privileges.
    from sensor.kernel import attach, loader

    program = loader.load(loader.LoadOptions(flow_map_size=config.kernel.flow_map_size))
    program.open_events(lambda _event: seen.__setitem__("events", seen["events"] + 1))
    attachments = []
    try:
        for iface in config.interfaces:
            attachments.append(attach.attach(iface, program.prog_fd))
    except Exception:
        _detach(program, attachments)
        raise
    return program, attachments


def _detach(program, attachments) -> None:
    if program is None:
        return
    from sensor.kernel import attach

    for att in attachments:
        attach.detach(att)
    program.close()


def run(args: argparse.Namespace) -> int:
    setup_logging()
    notifier = Notifier.from_environ()
    config = cfg.config_from_args(args, "sensor")
    events: dict[str, threading.Event] = {
        name: threading.Event() for name in ("hup", "term", "wedge")}
    signal.signal(signal.SIGHUP, lambda *_: events["hup"].set())
    signal.signal(signal.SIGTERM, lambda *_: events["term"].set())
    signal.signal(signal.SIGUSR1, lambda *_: events["wedge"].set())

    metrics = MetricsRegistry("sensor")
    server = metrics.serve(config.metrics.listen) if config.metrics.listen else None
    exporter = GrpcExporter(GrpcExportConfig(
        target=config.collector.address, sensor_id=config.effective_sensor_id(),
        spool_dir=Path(config.spool.dir), spool_max_bytes=config.spool.max_bytes,
        queue_records=config.export.queue_size, batch_records=config.export.batch_size,
        batch_delay_s=config.export.batch_delay / 1e9,
    )).start()

    def snapshot() -> dict:
        c = exporter.counters()
        return {"lost": {"export_queue_full": c["export_queue_full"]},
                "records_exported": {"flow": c["records_acked"]},
                "queue_depth": {"export": c["export_queue_depth"]},
                "spool_bytes": c["spool_bytes"]}

    metrics.add_source("export", snapshot)
    seen = {"events": 0}    # ring buffer events delivered through the ctypes callback
    program, attachments = (_attach(config, seen) if args.kernel else (None, []))
    for flow in _flows(config.effective_sensor_id(), args.records):
        exporter.submit(flow)
    attached = ",".join(a.iface for a in attachments) or "nothing"
    reloads = reported = 0

    def status() -> str:
        return f"running; attached {attached}; reloads {reloads}; events {seen['events']}"

    notifier.ready(status())
    log.info("ready (metrics on %s)", config.metrics.listen or "off")
    try:
        while not events["term"].is_set():
            if not events["wedge"].is_set():
                notifier.keepalive(time.monotonic_ns())
            if program is not None:
                program.poll_events(0)
                if seen["events"] != reported:
                    reported = seen["events"]
                    notifier.status(status())
            if events["hup"].is_set():
                events["hup"].clear()
                notifier.reloading()
                try:
                    config = cfg.config_from_args(args, "sensor")
                    reloads += 1
                    log.info("reloaded configuration (%d)", reloads)
                except LoupeError as exc:
                    # A bad file on reload keeps the running config, like nginx -s reload.
                    log.error("reload refused, keeping the running configuration: %s", exc)
                notifier.ready(status())
            events["term"].wait(TICK_S)
        notifier.stopping("stopping: flushing the exporter")
        log.info("stopping")
        exporter.close(timeout_s=5.0)
    finally:
        _detach(program, attachments)
        if server is not None:
            server.close()
        notifier.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cfg.add_config_arguments(parser, "sensor")
    parser.add_argument("--kernel", action="store_true",
                        help="load the flow meter and attach it to config interfaces")
    parser.add_argument("--records", type=int, default=3, help="Flow records to export at start")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except LoupeError as exc:
        print(f"loupe: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
