"""`loupe status`: the sensor and the collector at a glance.

Sensor: two scrapes of its Prometheus endpoint (default 127.0.0.1:9464) one interval
apart give records exported by kind and their rates, losses by reason, queue depths,
un-acked spool batches, CPU and memory; the interfaces running its flow meter (tcx
programs named loupe_tc, which takes root to see, or clsact filters named
loupe_flow:<hook>). Collector: Observer.Status
(stored rows, sensors, counters). Either may be down: that is reported, not an error,
unless both are.
"""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from sensor.errors import LoupeError

DEFAULT_SENSOR_METRICS = "127.0.0.1:9464"
DEFAULT_COLLECTOR = "127.0.0.1:50051"
# A scrape larger than this is not ours; stop reading.
MAX_SCRAPE_BYTES = 4 << 20


def register(tree) -> None:
    p = tree.command("status", help="health of the local sensor and of the collector")
    p.add_argument("--sensor-metrics", default=DEFAULT_SENSOR_METRICS, metavar="HOST:PORT",
                   help=f"the sensor's metrics.listen (default {DEFAULT_SENSOR_METRICS}; "
                        "\"\" skips the sensor)")
    p.add_argument("--collector", default=DEFAULT_COLLECTOR, metavar="HOST:PORT",
                   help=f"collector address (default {DEFAULT_COLLECTOR}; \"\" skips it)")
    p.add_argument("--tls-ca", type=Path, help="CA certificate: turns TLS on")
    p.add_argument("--tls-cert", type=Path, help="client certificate (mTLS)")
    p.add_argument("--tls-key", type=Path, help="client key (mTLS)")
    p.add_argument("--tls-server-name", help="name to verify in the collector's certificate")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                   help="time between the two scrapes the rates come from")
    p.set_defaults(func=run)


def scrape(address: str) -> dict[str, dict[str, float]]:
    """family -> {label value ("" without a label): value}."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
        text = resp.read(MAX_SCRAPE_BYTES).decode("utf-8", "replace")
    out: dict[str, dict[str, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            label = next(iter(s.labels.values()), "") if s.labels else ""
            out.setdefault(fam.name, {})[label] = s.value
    return out


def attachments() -> list[str]:
    """Interfaces (of this network namespace) that run the flow meter, with its hooks."""
    from sensor.kernel import attach  # noqa: PLC0415 (only this part of status needs it)

    found = []
    for dev in sorted(Path("/sys/class/net").iterdir()):
        try:
            hooks = attach.attached_hooks(dev.name)
        except (LoupeError, OSError):
            continue   # gone meanwhile
        if hooks:
            found.append(f"{dev.name} ({'+'.join(hooks)})")
    return found


def sensor_lines(address: str, interval_s: float) -> list[str]:
    first = scrape(address)
    t0 = time.monotonic()
    time.sleep(max(0.0, interval_s))
    second = scrape(address)
    dt = max(time.monotonic() - t0, 1e-9)
    exported = second.get("loupe_records_exported", {})
    before = first.get("loupe_records_exported", {})
    kinds = ", ".join(f"{k} {int(v)} ({(v - before.get(k, 0)) / dt:.1f}/s)"
                      for k, v in sorted(exported.items())) or "none yet"
    lost = {k: int(v) for k, v in second.get("loupe_lost", {}).items() if v}
    queues = second.get("loupe_queue_depth", {})
    cpu = second.get("loupe_process_cpu_seconds", {})
    cpu_before = first.get("loupe_process_cpu_seconds", {})
    cpu_rate = (sum(cpu.values()) - sum(cpu_before.values())) / dt
    rss = second.get("loupe_process_resident_memory_bytes", {}).get("", 0)
    lines = [f"sensor at {address}: up",
             f"  attached: {', '.join(attachments()) or 'no loupe filter in this namespace'}",
             f"  exported: {kinds}",
             "  lost: " + (", ".join(f"{k} {v}" for k, v in sorted(lost.items()))
                           or "nothing"),
             "  queues: " + (", ".join(f"{k} {int(v)}" for k, v in sorted(queues.items()))
                             or "-")
             + f"; spool {int(second.get('loupe_spool_bytes', {}).get('', 0))} bytes",
             f"  L7 flows in progress: {int(second.get('loupe_flows_active', {}).get('', 0))}",
             f"  cpu {cpu_rate * 100:.0f}% of a core, rss {rss / 2**20:.0f} MiB"]
    return lines


def collector_lines(args) -> list[str]:
    import grpc  # noqa: PLC0415

    from collector.client import ClientTLS, open_channel  # noqa: PLC0415
    from loupe.v1 import observer_pb2_grpc  # noqa: PLC0415
    from sensor.export import wire  # noqa: PLC0415

    tls = ClientTLS(args.tls_cert, args.tls_key, args.tls_ca, args.tls_server_name)
    stub = observer_pb2_grpc.ObserverStub(open_channel(args.collector, tls))
    try:
        status = stub.Status(wire.observer_pb2.StatusRequest(), timeout=5)
    except grpc.RpcError as exc:
        return [f"collector at {args.collector}: unreachable ({exc.code().name})"]
    lines = [f"collector at {args.collector}: up, {status.version}, {status.storage}",
             "  stored: " + ", ".join(f"{k} {v}" for k, v in sorted(status.stored.items())),
             f"  subscribers: {status.subscribers}"]
    now = time.time_ns()
    for s in status.sensors:
        ago = (now - s.last_seen_ns) / 1e9 if s.last_seen_ns else float("nan")
        lines.append(f"  sensor {s.sensor_id}: {s.records} records, last batch "
                     f"{s.last_batch_id}, last seen {ago:.0f} s ago")
    return lines


def run(args) -> int:
    if not args.sensor_metrics and not args.collector:
        raise LoupeError("nothing to ask: give --sensor-metrics or --collector")
    ok = 0
    if args.sensor_metrics:
        try:
            lines = sensor_lines(args.sensor_metrics, args.interval)
            ok += 1
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            lines = [f"sensor at {args.sensor_metrics}: not answering ({reason}); is "
                     "`loupe sensor run` running with metrics.listen there?"]
        print("\n".join(lines))
    if args.collector:
        lines = collector_lines(args)
        ok += "unreachable" not in lines[0]
        print("\n".join(lines))
    sys.stdout.flush()
    return 0 if ok else 1
