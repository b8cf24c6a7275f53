"""`loupe sensor run`: the live hybrid sensor as a daemon (loupe-sensor.service runs
`loupe sensor run --config /etc/loupe/sensor.toml`).

The pipeline itself is sensor/engine/live.py; this module adds what a daemon needs
around it, in this order (docs/ops.md, "Lifecycle contract"):

    config (file, --set, flags) -> metrics server -> load + attach -> exporter up
      -> READY=1 + STATUS=; main loop with WATCHDOG=1 while it turns
    SIGHUP:  RELOADING=1, re-read the config, new selection and budgets for new flows
             (live flows keep theirs, nothing is dropped), READY=1
    SIGTERM: STOPPING=1, detach, drain, every flow out (FORCED_END), exporter flushed
             into its spool, exit 0

A collector that cannot be reached is not an error: records wait in the spool and go out
when it is back. Flags override the file: each maps to a dotted config key and is
validated like the file (sensor.config).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from sensor import config as cfg
from sensor.engine.live import DEFAULT_REFILL_OCTETS, LiveConfig, LiveSensor, default_interfaces
from sensor.errors import ConfigError, LoupeError, StorageError
from sensor.flow.semantics import NS
from sensor.kernel import exclude as kexclude
from sensor.kernel.hybrid import SelectionConfig as KernelSelection
from sensor.metrics import MetricsRegistry
from sensor.notify import Notifier

log = logging.getLogger("loupe.sensor")

# How often STATUS= is refreshed while running: systemctl status stays current without
# a datagram per loop iteration.
STATUS_EVERY_S = 5.0
# At SIGTERM, how long the exporter may spend getting spooled batches acked before the
# rest is left in the spool for the next start (systemd's stop timeout is 90 s).
EXPORT_CLOSE_S = 10.0


def register(tree) -> None:
    p = tree.command(
        "sensor run", help="run the live sensor: kernel flows, L7 metadata, export",
        description=__doc__.split("\n\n")[0] + "\n\nSee docs/sensor.md.")
    cfg.add_config_arguments(p, "sensor")
    p.add_argument("--iface", action="append", default=None, metavar="IF",
                   help="interface to attach to (repeatable; default: sensor.toml's "
                        "interfaces, or every interface that is up except loopback)")
    p.add_argument("--netns", default="", metavar="NAME",
                   help="attach to interfaces of this network namespace (ip netns name or "
                        "path); the sensor itself stays in its own")
    p.add_argument("--collector", default=None, metavar="HOST:PORT[,HOST:PORT...]",
                   help=f"collector address (collector.address; default "
                        f"{cfg.CollectorClientConfig().address}; \"\" for none), or several "
                        "comma-separated (collector.addresses: spread, failover); unreachable "
                        "is not fatal: records are spooled and sent when it is back")
    p.add_argument("--tls-ca", default=None, metavar="FILE")
    p.add_argument("--tls-cert", default=None, metavar="FILE")
    p.add_argument("--tls-key", default=None, metavar="FILE")
    p.add_argument("--tls-server-name", default=None, metavar="NAME")
    p.add_argument("--select", action="append", default=None, metavar="RULES",
                   help="which flows get L7 inspection, replacing the file's selection: "
                        "comma-separated port:N, cidr:PREFIX, proto:NAME|N, sample:N, sniff, "
                        "or off (e.g. --select port:443,cidr:198.18.0.0/15,proto:udp); "
                        f"default: {_describe_rules(cfg.SelectionConfig())}")
    p.add_argument("--exclude", default=None, metavar="EXPR",
                   help="flows matching this tcpdump-style filter (host, net, port, "
                        "portrange, proto, ip, ip6, tcp, udp, icmp, and, or, not) are "
                        "counted but never inspected, decided in the kernel "
                        "(selection.exclude; the sensor's own export and metrics traffic "
                        "is excluded too unless selection.exclude_own_traffic = false)")
    p.add_argument("--budget", default=None, metavar="SIZE",
                   help="payload bytes copied per flow and direction before the L7 stage "
                        "asks for more (budget.per_direction_bytes; default "
                        f"{cfg.format_size(cfg.BudgetConfig().per_direction_bytes)}), e.g. 4KiB")
    p.add_argument("--refill", type=int, default=DEFAULT_REFILL_OCTETS, metavar="OCTETS",
                   help="allowance a live flow is topped up to while its parser wants more "
                        f"(default {DEFAULT_REFILL_OCTETS}; 0: never grant)")
    p.add_argument("-o", "--output", default=None, metavar="FILE",
                   help="also write every record as a JSON line to FILE (export.jsonl); "
                        "- = stdout")
    p.add_argument("--format", type=str.lower, default=None, metavar="FMT",
                   help="json: the record shape of docs/export.md (the one a live sensor writes)")
    # Old spellings: --jsonl PATH is -o PATH; --output jsonl|none is stdout or nothing.
    p.add_argument("--jsonl", default=None, metavar="PATH", help=argparse.SUPPRESS)
    p.add_argument("--ipfix", default=None, metavar="TARGET",
                   help="also send every flow as IPFIX to HOST:PORT (UDP) or tcp://HOST:PORT "
                        "(export.ipfix; docs/export.md)")
    p.add_argument("--ipfix-domain", type=int, default=None, metavar="N",
                   help="IPFIX observation domain id (export.ipfix_domain; default 0)")
    p.add_argument("--ipfix-pen", type=int, default=None, metavar="N",
                   help="enterprise number of Loupe's own IPFIX IEs (export.ipfix_pen; "
                        "default 32473)")
    p.add_argument("--ipfix-uniflow", action="store_const", const=True, default=None,
                   help="two one-way IPFIX records per flow, for collectors that ignore "
                        "RFC 5103 reverse IEs (export.ipfix_uniflow)")
    p.add_argument("--sensor-id", default=None, metavar="ID",
                   help="names this sensor in records and at the collector (default: host name)")
    p.add_argument("--spool-dir", default=None, metavar="DIR",
                   help=f"un-acked batches wait here (spool.dir; default {cfg.SpoolConfig().dir})")
    p.add_argument("--metrics", default=None, metavar="HOST:PORT",
                   help="Prometheus /metrics address (metrics.listen; default "
                        f"{cfg.MetricsConfig().listen}; \"\" turns it off)")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                   help="how often the flow map is read")
    p.add_argument("--drain-timeout", type=float, default=EXPORT_CLOSE_S, metavar="SECONDS",
                   help="at SIGTERM, how long to try to get spooled records acked before "
                        f"leaving them in the spool for the next start (default {EXPORT_CLOSE_S:g})")
    p.add_argument("--heartbeat", type=float, default=0.0, metavar="SECONDS",
                   help="until the first L7 record, log every SECONDS how many packets "
                        "and flows were seen (default 0: off; `make run` uses 5)")
    p.add_argument("--no-l7", action="store_true",
                   help="flows only: no payload copy, no L7 parsing")
    p.add_argument("--no-process", action="store_true",
                   help="no process attribution (process.attribution = false)")
    p.add_argument("--tls-plaintext", action="store_true",
                   help="also parse TLS plaintext at the TLS libraries' calls, by uprobes "
                        "(tls_plaintext.enabled = true; docs/tls-plaintext.md)")
    p.add_argument("--user", default="", metavar="USER",
                   help="started as root: load and attach as root, then run as USER with "
                        "CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN only (loupe-sensor.service "
                        "runs --user loupe)")
    p.set_defaults(func=run)


# ---- flags -> config ---------------------------------------------------------------------


def _describe_rules(sel: cfg.SelectionConfig) -> str:
    """A [selection] table in --select's syntax: how --help states the default."""
    rules = [f"port:{p}" for p in sel.ports] + [f"cidr:{c}" for c in sel.cidrs]
    rules += [f"proto:{p}" for p in sel.protocols]
    rules += [f"sample:{sel.sample_one_in}"] if sel.sample_one_in > 1 else []
    rules += ["sniff"] if sel.sniff else []
    return ",".join(rules) or "off"


def parse_select(items: list[str]) -> dict[str, object]:
    """--select rules -> selection.* overrides. Given at all, it replaces the file's
    selection (an unnamed list is empty)."""
    ports: list[int] = []
    cidrs: list[str] = []
    protos: list[str] = []
    sample = 1
    sniff = False
    for item in items:
        for rule in (r.strip() for r in item.split(",")):
            if not rule:
                continue
            kind, _, value = rule.partition(":")
            kind = kind.lower()
            if kind in ("off", "none") and not value:
                continue
            if kind == "sniff" and not value:
                sniff = True
            elif kind == "port" and value.isdigit():
                ports.append(int(value))
            elif kind == "cidr" and value:
                cidrs.append(value)
            elif kind in ("proto", "protocol") and value:
                protos.append(value)
            elif kind == "sample" and value.isdigit() and int(value) >= 1:
                sample = int(value)
            else:
                raise ConfigError(
                    f"--select {rule!r}: expected port:N, cidr:PREFIX, proto:NAME, sample:N, "
                    "sniff or off (e.g. --select port:443,cidr:198.18.0.0/15)")
    return {"selection.ports": ports, "selection.cidrs": cidrs,
            "selection.protocols": [int(p) if p.isdigit() else p for p in protos],
            "selection.sample_one_in": sample, "selection.sniff": sniff}


def _absolute(path: str | None) -> str | None:
    return None if path is None or path == "" else str(Path(path).resolve())


def overrides_from(args: argparse.Namespace) -> dict[str, object]:
    out: dict[str, object] = {
        "interfaces": args.iface,
        # One address replaces the file's address (and its list); a comma list, its list.
        "collector.address": (None if args.collector is None or "," in args.collector
                              else args.collector),
        "collector.addresses": (None if args.collector is None
                                else args.collector if "," in args.collector else ""),
        "collector.ca_file": _absolute(args.tls_ca),
        "collector.cert_file": _absolute(args.tls_cert),
        "collector.key_file": _absolute(args.tls_key),
        "collector.server_name": args.tls_server_name,
        "sensor_id": args.sensor_id,
        "spool.dir": _absolute(args.spool_dir),
        "export.jsonl": _absolute(args.jsonl),
        "export.ipfix": args.ipfix,
        "export.ipfix_domain": args.ipfix_domain,
        "export.ipfix_pen": args.ipfix_pen,
        "export.ipfix_uniflow": args.ipfix_uniflow,
        "metrics.listen": args.metrics,
        "budget.per_direction_bytes": args.budget,
        "selection.exclude": args.exclude,
    }
    if args.no_process:
        out["process.attribution"] = False
    if getattr(args, "tls_plaintext", False):
        out["tls_plaintext.enabled"] = True
    if args.select:
        out.update(parse_select(args.select))
    return out


def load(args: argparse.Namespace) -> cfg.SensorConfig:
    return cfg.config_from_args(args, "sensor", overrides_from(args))


def kernel_selection(config: cfg.SensorConfig, l7: bool = True) -> KernelSelection:
    sel = config.selection
    if not l7:
        return KernelSelection(ports=frozenset(), sniff=False, budget=(0, 0))
    budget = config.budget.per_direction_bytes
    own = (" or ".join(filter(None, [
        kexclude.own_traffic(t, "") for t in config.collector.targets()]
        + [kexclude.own_traffic("", config.metrics.listen)]))
           if sel.exclude_own_traffic else "")
    exclude = kexclude.combined(sel.exclude, own)
    try:
        kexclude.program(exclude)
    except ConfigError as exc:
        hint = ("; with the sensor's own traffic added (selection.exclude_own_traffic = "
                "false leaves it out)") if own else ""
        raise ConfigError(f"selection.exclude: {exc}{hint}") from None
    return KernelSelection(
        ports=frozenset(sel.ports), cidrs=tuple(sel.cidrs), protocols=frozenset(sel.protocols),
        # sample_one_in = N > 1: the kernel also selects one flow in N of the rest
        # (per flow, by key hash, so a sampled flow is seen whole); 1: no sampling.
        sample_n=sel.sample_one_in if sel.sample_one_in > 1 else 0,
        sniff=sel.sniff, budget=(budget, budget), exclude=exclude)


def live_config(config: cfg.SensorConfig, args: argparse.Namespace) -> LiveConfig:
    interfaces = tuple(config.interfaces)
    if not interfaces and not args.netns:
        interfaces = default_interfaces()
    if args.interval <= 0:
        raise ConfigError("--interval must be positive seconds")
    if args.refill < 0:
        raise ConfigError("--refill must be 0 or a number of octets")
    if args.heartbeat < 0:
        raise ConfigError("--heartbeat must be 0 (off) or positive seconds")
    page = os.sysconf("SC_PAGE_SIZE")
    return LiveConfig(
        interfaces=interfaces, netns=args.netns,
        selection=kernel_selection(config, not args.no_l7),
        timeouts=config.timeouts.to_timeouts(), sensor_id=config.effective_sensor_id(),
        flow_map_size=config.kernel.flow_map_size,
        ringbuf_pages=max(1, config.kernel.ringbuf_size // page),
        l7=not args.no_l7, refill_octets=args.refill,
        reassembly_budget_bytes=config.budget.max_in_flight_bytes,
        interval_s=args.interval, process_attribution=config.process.attribution,
        redact=config.redaction.enabled, tls_plaintext=plaintext_config(config, args),
        rules=rules_path(config, args), pii=pii_scanner(config, args), geo=geo_enricher(config),
        enforce_pin_dir=config.enforce.pin_dir if config.enforce.enabled else None,
        enforce_hold=held_services(config), enforce_hold_max_ns=config.enforce.hold_max,
        enforce_hold_nudge=config.enforce.hold_nudge, ddos=ddos_settings(config))


def ddos_settings(config: cfg.SensorConfig):
    """[ddos] as sensor.rules.ddos.Settings, or None when off; an inconsistent section
    (history shorter than the window) refused in one line."""
    d = config.ddos
    if not d.enabled:
        return None
    from sensor.rules.ddos import Settings  # noqa: PLC0415

    try:
        return Settings(window_ns=d.window, learn_ns=d.learn, history_ns=d.history,
                        factor=d.factor, source_rps=d.source_rps, service_rps=d.service_rps,
                        source_floor_rps=d.source_floor_rps, flows_ps=d.flows_ps,
                        slow_heads=d.slow_heads, slow_head_ns=d.slow_head_age, top=d.top,
                        mitigation=d.mitigation, ttl_ns=d.ttl, rate=d.rate, burst=d.burst)
    except ValueError as exc:
        raise ConfigError(f"ddos: {exc}") from None


def held_services(config: cfg.SensorConfig) -> tuple:
    """[enforce] hold as sensor.enforce.hold.HeldService; port 0 refused in one line."""
    if not config.enforce.enabled:
        return ()
    from sensor.enforce.hold import parse_service  # noqa: PLC0415

    try:
        return tuple(parse_service(s) for s in config.enforce.hold)
    except ValueError as exc:
        raise ConfigError(f"enforce.hold: {exc}") from None


def geo_enricher(config: cfg.SensorConfig):
    """[geoip] opened (a bad database refused in one line before anything attaches), or
    None when off."""
    if not config.geoip.enabled:
        return None
    from sensor.enrich.geo import GeoEnricher  # noqa: PLC0415

    return GeoEnricher.open(config.geoip.database, config.geoip.asn_database)


def pii_scanner(config: cfg.SensorConfig, args: argparse.Namespace):
    """[pii] as the HTTP parsers' option (sensor/l7/pii.py), or None when off."""
    if not config.pii.enabled or args.no_l7:
        return None
    from sensor.l7.pii import Scanner  # noqa: PLC0415

    p = config.pii
    return Scanner(body_bytes=p.body_bytes, response_bytes=p.response_bytes,
                   response_every=p.response_every)


def rules_path(config: cfg.SensorConfig, args: argparse.Namespace) -> str:
    """[rules] path when enabled (and L7 is on), checked now: a bad rule file stops the
    start with its file:line, before anything is attached."""
    if not config.rules.enabled or args.no_l7:
        return ""
    from sensor.rules import loader  # noqa: PLC0415

    loader.load(config.rules.path)
    return config.rules.path


def plaintext_config(config: cfg.SensorConfig, args: argparse.Namespace):
    """[tls_plaintext] as the live sensor takes it, or None when off (or with --no-l7)."""
    tls = config.tls_plaintext
    if not tls.enabled or args.no_l7:
        return None
    from sensor.engine.plaintext_live import PlaintextConfig  # noqa: PLC0415

    return PlaintextConfig(budget_octets=tls.budget_bytes, processes=tls.processes,
                           cgroups=tls.cgroups, ports=tls.ports,
                           rescan_s=tls.rescan / 1e9)


# ---- exporters -------------------------------------------------------------------------------


class FanOut:
    """One Exporter over several (collector and JSON lines): each keeps its own bounded
    queue, so a slow one drops and counts only its own records."""

    def __init__(self, exporters: list) -> None:
        self.exporters = exporters

    def start(self) -> None:
        for e in self.exporters:
            start = getattr(e, "start", None)
            if start is not None:
                start()

    def submit(self, record) -> bool:
        ok = True
        for e in self.exporters:
            ok = e.submit(record) and ok
        return ok

    def close(self, timeout_s: float = 5.0) -> None:
        for e in self.exporters:
            e.close(timeout_s)

    def counters(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.exporters:
            for k, v in e.counters().items():
                out[k] = out.get(k, 0) + v
        return out


def build_exporters(config: cfg.SensorConfig, output: str) -> FanOut:
    from sensor.export.exporter import SinkExporter  # noqa: PLC0415
    from sensor.export.jsonlines import JsonLinesSink  # noqa: PLC0415 (no Arrow here)

    exporters = []
    sensor_id = config.effective_sensor_id()
    if config.collector.targets():
        from sensor.export.grpc_client import (  # noqa: PLC0415
            GrpcExportConfig, GrpcExporter, TlsFiles)

        client = config.collector
        tls = None
        if client.ca_file:
            tls = TlsFiles(ca_cert=Path(client.ca_file), client_cert=Path(client.cert_file),
                           client_key=Path(client.key_file), server_name=client.server_name)
        spool = Path(config.spool.dir)
        try:
            spool.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the spool directory {spool}: {exc.strerror}; "
                               "set spool.dir (--spool-dir) to a writable directory") from None
        if not os.access(spool, os.W_OK | os.X_OK):
            raise StorageError(f"the spool directory {spool} is not writable; set spool.dir "
                               "(--spool-dir) to a writable directory")
        exporters.append(GrpcExporter(GrpcExportConfig(
            target=",".join(client.targets()), sensor_id=sensor_id, spool_dir=spool, tls=tls,
            queue_records=config.export.queue_size, batch_records=config.export.batch_size,
            batch_delay_s=config.export.batch_delay / NS,
            spool_max_bytes=config.spool.max_bytes)))
    if config.export.ipfix:
        from sensor.export.ipfix import IpfixExporter, IpfixSink  # noqa: PLC0415

        ipfix = config.export
        exporters.append(IpfixExporter(
            IpfixSink(ipfix.ipfix, domain=ipfix.ipfix_domain, pen=ipfix.ipfix_pen,
                      uniflow=ipfix.ipfix_uniflow),
            sensor_id=sensor_id, queue_records=config.export.queue_size))
    if config.export.jsonl:
        exporters.append(SinkExporter(JsonLinesSink(config.export.jsonl), sensor_id=sensor_id,
                                      queue_records=config.export.queue_size))
    if output == "jsonl":
        exporters.append(SinkExporter(JsonLinesSink("-"), sensor_id=sensor_id,
                                      queue_records=config.export.queue_size))
    if not exporters:
        log.warning("no collector, no JSON lines: records are counted and dropped "
                    "(set --collector, or -o FILE / -o - for JSON lines)")
    return FanOut(exporters)


# ---- the daemon ---------------------------------------------------------------------------------


class _Signals:
    def __init__(self) -> None:
        self.stop = False
        self.reload = False

    def install(self) -> dict:
        def on_stop(signum, frame) -> None:
            self.stop = True

        def on_hup(signum, frame) -> None:
            self.reload = True

        return {s: signal.signal(s, h) for s, h in ((signal.SIGTERM, on_stop),
                                                     (signal.SIGINT, on_stop),
                                                     (signal.SIGHUP, on_hup))}


def closing_line(sensor: LiveSensor, spool_dir: str = "") -> str:
    t = sensor.totals
    kinds = {k: v for k, v in sorted(t.records.items()) if k not in ("flow", "lost")}
    kc = t.kernel
    l7 = sensor.l7.stats if sensor.l7 is not None else None
    text = (f"loupe sensor: {t.records.get('flow', 0)} flows, {sum(kinds.values())} L7 events"
            + (f" ({', '.join(f'{k} {v}' for k, v in kinds.items())})" if kinds else "")
            + f"; kernel: {kc.get('packets', 0)} packets, {kc.get('payload_events', 0)} "
            f"payload events, payload {kc.get('payload_octets', 0)} octets copied")
    if l7 is not None:
        text += (f"; l7: {l7.flows} flows, {l7.grants} grants, {l7.skips} skips, "
                 f"{l7.stops} stops")
    lost = {k: v for k, v in sorted(t.lost.items()) if v}
    if t.submit_refused:
        lost["export_queue_full"] = lost.get("export_queue_full", 0) + t.submit_refused
    if sensor.exporter.counters().get("ipfix_records_dropped", 0):
        lost["ipfix_send_error"] = sensor.exporter.counters()["ipfix_records_dropped"]
    text += ("; lost: " + ", ".join(f"{k} {v}" for k, v in lost.items())) if lost \
        else "; nothing lost"
    return text + _spooled(sensor.exporter.counters(), spool_dir)


def _spooled(counters: dict, spool_dir: str) -> str:
    """What a stop left undelivered (the collector was down): kept for the next start."""
    batches = counters.get("spool_batches_unacked", 0)
    if not batches:
        return ""
    return (f"; {batches} batches ({counters.get('spool_bytes', 0)} bytes) not delivered, "
            f"kept in the spool {spool_dir or '(spool.dir)'} for the next start")


def heartbeat_line(sensor: LiveSensor) -> str:
    """"N packets, M flows so far, no L7 yet", or "" once an L7 record went out: someone
    watching a quiet terminal learns the sensor is alive and what it has seen."""
    t = sensor.totals
    if any(k not in ("flow", "lost") for k in t.records):
        return ""
    packets = sensor.kernel_counters().get("packets", 0)
    # Flows count once exported (when they end): what the collector has been sent.
    return f"{packets} packets, {t.records.get('flow', 0)} flows so far, no L7 yet"


def output_flags(args: argparse.Namespace) -> None:
    """-o/--format (sensor/output.py's vocabulary) -> args.output "jsonl" (stdout) or
    "none", and args.jsonl (a file)."""
    out, fmt = args.output, (args.format or "json")
    if fmt not in ("json", "jsonl"):
        raise ConfigError(f"--format {fmt}: a live sensor writes json (use `loupe tail "
                          "--format eve|zeek` on the collector's stream)")
    if out is None or out == "none":
        args.output = "none"
    elif out in ("-", "json", "jsonl"):
        args.output = "jsonl"
    else:
        if args.jsonl is not None and args.jsonl != out:
            raise ConfigError("-o and --jsonl both name a file: give -o only")
        args.jsonl, args.output = out, "none"


def _writable(path: Path, user: str) -> bool:
    """Whether the process (no user) or `user`, which the sensor drops to before it
    writes the spool, may create files in directory `path`. For a user, read from the
    mode bits: os.access asks as the current root, which under the hardened unit lacks
    CAP_DAC_OVERRIDE and so cannot write the loupe-owned spool it hands over."""
    if not user:
        return os.access(path, os.W_OK | os.X_OK)
    import grp  # noqa: PLC0415
    import pwd  # noqa: PLC0415

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return True   # --user itself is refused with its own line when it is dropped to
    st = path.stat()
    if entry.pw_uid == 0:
        return True
    if st.st_uid == entry.pw_uid:
        return st.st_mode & 0o300 == 0o300
    groups = {entry.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    if st.st_gid in groups:
        return st.st_mode & 0o030 == 0o030
    return st.st_mode & 0o003 == 0o003


def _check_spool_dir(config: cfg.SensorConfig, user: str = "") -> None:
    """Refuse a spool directory that could not be made or written, without making it."""
    if not config.collector.targets():
        return
    path = Path(config.spool.dir)
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    if not existing.is_dir() or not _writable(existing, user):
        what = "is not a writable directory" if existing == path else (
            f"cannot be made: {existing} is not a writable directory")
        raise StorageError(f"the spool directory {path} {what}; set spool.dir (--spool-dir) "
                           "to a writable directory")


def _check_interfaces(live_cfg: LiveConfig) -> None:
    from sensor.engine.live import in_netns  # noqa: PLC0415
    from sensor.kernel import attach  # noqa: PLC0415

    with in_netns(live_cfg.netns):
        for iface in live_cfg.interfaces:
            attach.meterable_interface(iface)


def run(args: argparse.Namespace) -> int:
    from sensor.kernel import loader  # noqa: PLC0415

    output_flags(args)
    config = load(args)
    live_cfg = live_config(config, args)
    if args.user and args.netns:
        # Detaching inside another namespace needs CAP_SYS_ADMIN (setns), which the
        # dropped user does not keep: the filters would be left behind at exit.
        raise ConfigError("--user and --netns cannot be combined: run the sensor inside the "
                          "namespace instead (nsenter --net=... loupe sensor run --user ...)")
    if args.user:
        loader.check_user(args.user)
    loader.check_privileges()
    # A missing interface fails here, before the spool directory is made or the exporter
    # tries the collector: a failed start leaves nothing behind and prints one line.
    _check_interfaces(live_cfg)
    # A spool directory that cannot be made is found now, before the seconds of compiling
    # (it is made once the meter is attached, below).
    _check_spool_dir(config, args.user)
    notifier = Notifier.from_environ()
    signals = _Signals()
    previous = signals.install()
    metrics = MetricsRegistry("sensor")
    server = metrics.serve(config.metrics.listen) if config.metrics.listen else None
    # The exporters (the spool directory, the first attempt to reach the collector) are
    # set up once the meter is attached, after the drop to --user (the service's
    # StateDirectory gives the spool to that user): a start that fails before leaves no
    # directory behind and no delivery warning in its output, only its one error line.
    sensor = LiveSensor(live_cfg, FanOut([]))

    def after_attach() -> None:
        if args.user:
            extra = ()
            if live_cfg.tls_plaintext is not None:
                from sensor.kernel.tlsprobe import RUNTIME_CAPS  # noqa: PLC0415
                extra = tuple(bit for _, bit in RUNTIME_CAPS)
            loader.drop_privileges(args.user, extra)
        sensor.exporter = build_exporters(config, args.output)

    metrics.add_source("sensor", sensor.metrics)
    metrics.add_source("export", lambda: _export_snapshot(sensor.exporter))
    # What `loupe status` lists as this sensor's interfaces (not every meter on the host).
    metrics.add_info("attached", "Interface hooks this sensor's flow meter runs on",
                     ("interface", "hook", "mode"),
                     lambda: [(a.iface, hook, a.mode) for a in list(sensor.attachments)
                              for hook in a.attached])
    try:
        try:
            sensor.start(after_attach)
        except BaseException:
            sensor.exporter.close(0.5)
            raise
        where = ",".join(f"{a.iface} ({a.mode})" for a in sensor.attachments)
        log.info("attached to %s%s; selection %s; metrics on %s", where,
                 f" (netns {args.netns})" if args.netns else "",
                 _describe(live_cfg.selection), config.metrics.listen or "off")
        notifier.ready(sensor.status())
        next_status = time.monotonic() + STATUS_EVERY_S
        next_beat = time.monotonic() + args.heartbeat if args.heartbeat else float("inf")
        while not signals.stop:
            sensor.step()
            notifier.keepalive(time.monotonic_ns())
            if signals.reload:
                signals.reload = False
                _reload(args, sensor, notifier)
            now = time.monotonic()
            if now >= next_status:
                notifier.status(sensor.status())
                next_status = now + STATUS_EVERY_S
            if now >= next_beat:
                beat = heartbeat_line(sensor)
                if beat:
                    log.info("%s", beat)
                # Once L7 records flow, they are the sign of life: the heartbeat ends.
                next_beat = now + args.heartbeat if beat else float("inf")
        notifier.stopping("stopping: detaching, flushing every flow")
        log.info("stopping: detaching, flushing every flow")
    finally:
        sensor.stop(max(0.0, args.drain_timeout))
        for s, handler in previous.items():
            signal.signal(s, handler)
        if server is not None:
            server.close()
        notifier.close()
    print(closing_line(sensor, config.spool.dir if config.collector.targets() else ""),
          file=sys.stderr, flush=True)
    return 0


def _reload(args: argparse.Namespace, sensor: LiveSensor, notifier: Notifier) -> None:
    notifier.reloading()
    try:
        config = load(args)
        selection = kernel_selection(config, not args.no_l7)
        sensor.reload(selection)
        log.info("reloaded: selection %s", _describe(selection))
        if sensor.l7 is not None and sensor.l7.rules is not None:
            log.info("reloaded: %d rules from %s", sensor.reload_rules(), sensor.config.rules)
    except LoupeError as exc:
        # A bad file keeps the running configuration (as nginx -s reload does).
        log.error("reload refused, keeping the running configuration: %s", exc)
    notifier.ready(sensor.status())


def _describe(sel: KernelSelection) -> str:
    parts = [f"port:{p}" for p in sorted(sel.ports)] + [f"cidr:{c}" for c in sel.cidrs]
    parts += [f"proto:{p}" for p in sorted(sel.protocols)]
    if sel.sample_n:
        parts.append(f"sample:{sel.sample_n}")
    if sel.sniff:
        parts.append("sniff")
    text = (",".join(parts) or "off") + f" budget {sel.budget[0]}"
    return text + (f"; excluded: {sel.exclude}" if sel.exclude else "")


def _export_snapshot(exporter: FanOut) -> dict:
    c = exporter.counters()
    return {"lost": {"export_queue_full": c.get("export_queue_full", 0),
                     "spool_full": c.get("spool_records_dropped", 0),
                     "ipfix_send_error": c.get("ipfix_records_dropped", 0)},
            # Batches spooled and not yet acked by the collector: 0 = all delivered.
            "queue_depth": {"export": c.get("export_queue_depth", 0),
                            "spool": c.get("spool_batches_unacked", 0)},
            "spool_bytes": c.get("spool_bytes", 0)}
