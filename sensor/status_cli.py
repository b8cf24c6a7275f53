"""`loupe status`: the sensor and the collector at a glance.

Sensor: two scrapes of its Prometheus endpoint (default 127.0.0.1:9464) one interval
apart give records exported by kind and their rates, losses by reason, queue depths,
un-acked spool batches, CPU and memory, and the interfaces and hooks that sensor attached
to (its loupe_attached_info metric: only that sensor's, whatever other meters run on the
host, in whatever namespace). Collector: Observer.Status (stored rows, sensors, counters).

Exit status: 0 when everything asked about is up; NOT_RUNNING (3, as `systemctl status`
and LSB init scripts answer for a stopped service) when the sensor or the collector asked
about is down, after printing what could be learnt. Skip one with "" to check the other.
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
NOT_RUNNING = 3


def register(tree) -> None:
    p = tree.command("status", help="health of the local sensor and of the collector",
                     description="Health of the local sensor and of the collector. Exit "
                                 f"status 0 when both are up, {NOT_RUNNING} when either "
                                 "one asked about is down (skip one with \"\").")
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


def _fetch(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
        return resp.read(MAX_SCRAPE_BYTES).decode("utf-8", "replace")


def _samples(text: str):
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if not s.name.endswith("_created"):
                yield fam.name, s


def families(text: str) -> dict[str, dict[str, float]]:
    """family -> {label value ("" without a label): value}."""
    out: dict[str, dict[str, float]] = {}
    for name, s in _samples(text):
        label = next(iter(s.labels.values()), "") if s.labels else ""
        out.setdefault(name, {})[label] = s.value
    return out


def scrape(address: str) -> dict[str, dict[str, float]]:
    """A sensor's /metrics as families()."""
    return families(_fetch(address))


def attachments(text: str) -> list[str]:
    """The interfaces the scraped sensor attached to, with their hooks ("eth0
    (ingress+egress)"), from its loupe_attached_info metric."""
    hooks: dict[str, list[str]] = {}
    for name, s in _samples(text):
        if name == "loupe_attached_info" and s.value:
            hooks.setdefault(s.labels.get("interface", "?"), []).append(s.labels.get("hook", "?"))
    order = {"ingress": 0, "egress": 1}
    return [f"{iface} ({'+'.join(sorted(h, key=lambda x: order.get(x, 2)))})"
            for iface, h in sorted(hooks.items())]


def sensor_lines(address: str, interval_s: float) -> list[str]:
    first = scrape(address)
    t0 = time.monotonic()
    time.sleep(max(0.0, interval_s))
    text = _fetch(address)
    second = families(text)
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
             f"  attached: {', '.join(attachments(text)) or 'nothing'}",
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
        if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
            return [f"collector at {args.collector}: unreachable: it refused this "
                    f"certificate ({exc.details()})"]
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
    down = 0
    if args.sensor_metrics:
        try:
            lines = sensor_lines(args.sensor_metrics, args.interval)
        except (urllib.error.URLError, OSError) as exc:
            down += 1
            reason = getattr(exc, "reason", exc)
            lines = [f"sensor at {args.sensor_metrics}: not answering ({reason}); is "
                     "`loupe sensor run` running with metrics.listen there?"]
        print("\n".join(lines))
    if args.collector:
        lines = collector_lines(args)
        down += "unreachable" in lines[0]
        print("\n".join(lines))
    sys.stdout.flush()
    return NOT_RUNNING if down else 0
