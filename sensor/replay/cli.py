"""`loupe replay FILE...`: capture files through the engine into records.

JSON lines to stdout by default; `-o` writes JSON lines, Parquet or CSV (by suffix or
--format); `--collector HOST:PORT` (old spelling `--to`) sends the records to a collector over gRPC (mTLS with the
--tls-* flags), through the same exporter and spool the live sensor uses; `--ipfix TARGET`
sends the flows as IPFIX (sensor/export/ipfix.py). A progress bar
goes to stderr only when stderr is a terminal; a one-line summary always ends the run
on stderr, so stdout carries nothing but records.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from sensor import model
from sensor.capfilter import FilterError
from sensor.capfilter import parse as parse_filter
from sensor.engine.pipeline import ExporterSink, Pipeline, PipelineConfig, run_sharded
from sensor.errors import CollectorError, ConfigError, StorageError
from sensor.export.formats import json_line
from sensor.replay.reader import STDIN, CaptureReader, is_stream

_FORMATS = ("json", "eve", "zeek", "parquet", "csv")
# Redraw the bar at most this often: a terminal redraw costs more than a chunk of packets.
_REDRAW_S = 0.1


def register(tree) -> None:
    p = tree.command(
        "replay", help="replay pcap/pcapng files into flow and L7 records",
        description=(
            "Replay capture files (pcap, pcapng, gzip-compressed either) through the\n"
            "userspace engine: flows, HTTP/DNS/TLS events and loss records. Several\n"
            "files form one stream, in the order given.\n\n"
            "  loupe replay capture.pcapng                  JSON lines on stdout\n"
            "  loupe replay a.pcap b.pcap -o flows.parquet  flows.parquet, flows.http.parquet, ...\n"
            "  loupe replay capture.pcap --collector 127.0.0.1:50051\n"
            "  zcat capture.pcap.gz | loupe replay -         stdin (also pipes, FIFOs)\n\n"
            "Exit status: 0 done; 1 an error, or records the collector did not\n"
            "acknowledge within --delivery-timeout; 2 bad usage; 3 every record was\n"
            "written but an input is truncated (a cut-off capture: its complete packets\n"
            "were replayed, one line names the file); 130 interrupted (Ctrl-C)."),
    )
    p.add_argument("files", nargs="+", metavar="FILE",
                   help="capture file(s); '-' reads stdin, and pipes, FIFOs and <(...) "
                        "work too")
    p.add_argument("-o", "--output", default=None, metavar="FILE",
                   help="output file (.jsonl, .parquet, .csv, .log for zeek; - = stdout); "
                        "default: JSON lines on stdout, or nothing when --collector or "
                        "--ipfix is given")
    p.add_argument("--format", type=str.lower, default=None, metavar="FMT",
                   help=f"{' | '.join(_FORMATS)}, when the suffix does not say "
                        "(docs/export.md)")
    p.add_argument("--collector", dest="to", metavar="HOST:PORT[,HOST:PORT...]",
                   help="send the records to a collector, or spread them over several "
                        "(comma-separated; failover, docs/scaling.md)")
    p.add_argument("--to", dest="to", help=argparse.SUPPRESS)   # the old spelling
    p.add_argument("--ipfix", default=None, metavar="TARGET",
                   help="send the flows as IPFIX (RFC 7011 biflows) to HOST:PORT "
                        "(UDP) or tcp://HOST:PORT; see docs/export.md")
    p.add_argument("--ipfix-domain", type=int, default=0, metavar="N",
                   help="IPFIX observation domain id (default 0)")
    p.add_argument("--ipfix-pen", type=int, default=None, metavar="N",
                   help="enterprise number of Loupe's own IPFIX IEs (default 32473)")
    p.add_argument("--ipfix-uniflow", action="store_true",
                   help="two one-way IPFIX records per flow, for collectors that ignore "
                        "RFC 5103 reverse IEs (pmacct)")
    p.add_argument("--tls-ca", type=Path, help="CA certificate: turns TLS on")
    p.add_argument("--tls-cert", type=Path, help="client certificate (mTLS)")
    p.add_argument("--tls-key", type=Path, help="client key (mTLS)")
    p.add_argument("--tls-server-name", default="",
                   help="name to verify in the collector's certificate")
    p.add_argument("--spool-dir", type=Path, default=None,
                   help="spool for --collector (default: a temporary directory, removed when "
                        "the run ends); a given directory keeps what was not delivered "
                        "for the next run")
    p.add_argument("--delivery-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="with --collector: after the last record, wait at most this long for "
                        "the collector to acknowledge everything, then give up with one "
                        "line and exit status 1 (default: 30)")
    p.add_argument("--no-l7", action="store_true", help="flows only: no reassembly, no L7")
    p.add_argument("--rules", default="", metavar="PATH",
                   help="evaluate rules on every L7 event and write Alert records: a rule "
                        "file, a directory of them, or 'default' (docs/rules.md)")
    p.add_argument("--ddos", action="store_true",
                   help="run the DDoS detector (HTTP floods, flow/SYN floods, slow requests) "
                        "on packet time and write its Alert records; nothing is mitigated "
                        "(docs/rules.md, DDoS). Runs in one process")
    p.add_argument("--ddos-config", default=None, metavar="SENSOR_TOML",
                   help="with the [ddos] thresholds of this sensor configuration (implies "
                        "--ddos; its mitigation is reported as count)")
    p.add_argument("--pii", action="store_true",
                   help="count PII in HTTP requests and sampled responses (emails, card "
                        "numbers, IBANs, ...): counts only, never values (docs/pii.md)")
    p.add_argument("--geoip", default=None, metavar="MMDB",
                   help="geo and ASN of each flow end from this MaxMind-format database, or "
                        "'default' for the packaged GeoLite2 City (2018) (docs/geo.md)")
    p.add_argument("--geoip-asn", default="", metavar="MMDB",
                   help="with --geoip: a second database with the ASN (GeoLite2 ASN)")
    p.add_argument("--filter", default="", metavar="EXPR",
                   help="only packets matching this tcpdump-style expression (host, net, "
                        "port, portrange, proto, ip, ip6, tcp, udp, icmp, and, or, not), "
                        "as tcpdump -r FILE EXPR would keep; see docs/replay.md")
    p.add_argument("--sensor-id", default="", help="sensor id put on every record "
                   "(default: none; 'replay' with --collector)")
    p.add_argument("--no-progress", action="store_true", help="never draw a progress bar")
    p.add_argument("--jobs", type=int, default=0, metavar="N",
                   help="meter in N processes, each taking a share of the host pairs' "
                        "flows (records then come in arrival order across processes); "
                        "default 0: one per idle CPU (up to 4) for inputs of 64 MiB or "
                        "more, else one. Stdin and pipes can be read only once, so they "
                        "are always read by one process")
    p.set_defaults(func=run)


class _Progress:
    """A one-line bar on stderr: file i/n, percent of its bytes, packets so far."""

    def __init__(self, stream, total_files: int, packets) -> None:
        self.stream = stream
        self.total_files = total_files
        self.packets = packets   # () -> packets so far
        self.index = 0
        self.name = ""
        self._last = 0.0

    def file(self, index: int, name: str) -> None:
        self.index, self.name = index, name
        self._last = 0.0

    def update(self, pos: int, size: int) -> None:
        now = time.monotonic()
        if now - self._last < _REDRAW_S:
            return
        self._last = now
        if not size:
            # A pipe or stdin: its size is unknown, so no bar, only the packets.
            self.stream.write(f"\rfile {self.index}/{self.total_files} "
                              f"{self.packets():,} packets ")
            self.stream.flush()
            return
        frac = min(pos / size, 1.0)
        width = 30
        filled = int(frac * width)
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(f"\r[{bar}] {frac * 100:5.1f}% file {self.index}/"
                          f"{self.total_files} {self.packets():,} packets ")
        self.stream.flush()

    def clear(self) -> None:
        self.stream.write("\r" + " " * 79 + "\r")
        self.stream.flush()


class JsonLinesOut:
    """JSON lines in sensor/export/jsonfmt.py's shape ("type" first, then the record's
    fields in order, nested values nested, enums as their values; a test holds the two
    equal), encoded by orjson, which serializes slotted dataclasses natively: about
    3 µs a record against jsonfmt's 30 µs generic walk, which at replay rates was a fifth
    of the run. Non-ASCII text is written as UTF-8 rather than \\u escapes (same JSON).
    """

    # Lines buffered before a write: some hundred KiB, so a crash loses little and the
    # number of write calls stays low.
    BLOCK_LINES = 1024

    def __init__(self, path: str) -> None:
        self.path = path
        self.written = 0
        self._lines: list[bytes] = []
        if path == "-":
            self._out, self._owned = sys.stdout.buffer, False
        else:
            try:
                self._out, self._owned = open(path, "wb"), True
            except OSError as exc:
                raise StorageError(f"cannot write {path}: {exc.strerror or exc}; check "
                                   "the directory exists and has free space") from None

    def encode(self, record: model.Record) -> bytes:
        """One record's line, without the newline."""
        return json_line(record)

    def write(self, record: model.Record) -> None:
        self._lines.append(json_line(record))
        self.written += 1
        if len(self._lines) >= self.BLOCK_LINES:
            self.flush()

    def write_encoded(self, block: bytes) -> None:
        """Lines made by encode() elsewhere, each ending in a newline."""
        self.flush()
        self._out.write(block)
        self.written += block.count(b"\n")

    def flush(self) -> None:
        if self._lines:
            self._lines.append(b"")
            self._out.write(b"\n".join(self._lines))
            self._lines.clear()
        self._out.flush()

    def close(self) -> None:
        self.flush()
        if self._owned:
            self._out.close()


def open_output(path: str, fmt: str | None):
    """The record sink for -o/--format (sensor/output.py decides the format): JsonLinesOut
    for JSON lines, EVE and Zeek writers, else the export sinks (Parquet, CSV)."""
    from sensor.output import RecordOut, resolve

    target = resolve(argparse.Namespace(output=path, format=fmt), _FORMATS)
    if target.fmt == "json":
        # Decided here so that JSON lines runs never import the export sinks, which
        # load pyarrow (about 50 ms of start-up) for Parquet and CSV.
        return JsonLinesOut(target.path)
    if target.fmt in ("eve", "zeek"):
        return RecordOut(target)
    from sensor.export.sinks import open_sink

    return open_sink(target.path, target.fmt)


class _Deferred:
    """A RecordSink made on its first record: lets the gRPC exporter (threads) start
    after the shard processes were forked."""

    def __init__(self, factory) -> None:
        self.factory = factory
        self.sink = None

    def write(self, record) -> None:
        if self.sink is None:
            self.sink = self.factory()
        self.sink.write(record)

    def flush(self) -> None:
        if self.sink is not None:
            self.sink.flush()

    def close(self) -> None:
        if self.sink is None:
            self.sink = self.factory()
        self.sink.close()


class _Tee:
    """Several RecordSinks as one (a file and a collector)."""

    def __init__(self, sinks: list) -> None:
        self.sinks = sinks

    def write(self, record) -> None:
        for sink in self.sinks:
            sink.write(record)

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


# Below this much input a second process costs more (fork, shipping records back) than
# it saves; above, sharding pays when a core is free.
_AUTO_JOBS_BYTES = 64 << 20
# More shards than this read the capture that many times over for little gain, and each
# holds its own flow table.
_MAX_AUTO_JOBS = 4


def auto_jobs(files) -> int:
    """--jobs 0: how many metering processes for these inputs on this machine."""
    total = 0
    for path in files:
        try:
            total += os.stat(path).st_size
        except OSError:
            pass   # checked before; a file that vanished fails when it is read
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else (os.cpu_count() or 1)
    # Only idle cores help: on a busy machine the shards fight for the same CPU and each
    # still reads the whole capture, so the run gets slower, not faster.
    idle = cpus - math.ceil(os.getloadavg()[0])
    if total < _AUTO_JOBS_BYTES or idle < 2:
        return 1
    return min(idle, _MAX_AUTO_JOBS)


def _grpc_sink(args, spool_dir: Path):
    from sensor.export.grpc_client import GrpcExportConfig, GrpcExporter, TlsFiles

    tls_parts = (args.tls_ca, args.tls_cert, args.tls_key)
    tls = None
    if any(tls_parts):
        if not all(tls_parts):
            raise ConfigError("--tls-ca, --tls-cert and --tls-key go together (mTLS); "
                              "give all three or none")
        tls = TlsFiles(ca_cert=args.tls_ca, client_cert=args.tls_cert,
                       client_key=args.tls_key, server_name=args.tls_server_name)
    exporter = GrpcExporter(GrpcExportConfig(
        target=args.to, sensor_id=args.sensor_id or "replay", spool_dir=spool_dir,
        tls=tls))
    return exporter.start()


def _tune_gc() -> None:
    """A replay keeps tens of thousands of long-lived flow objects. With the default
    thresholds the cyclic collector rescans them every few hundred allocations (about 1 s
    of CPU per million packets); freezing what start-up made and collecting less often
    cuts that tenfold. Memory stays bounded by the flow table and reassembly bounds,
    which do not depend on the collector."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


# Exit status when every record was written but an input capture was truncated (a
# cut-off download or copy): the records stand, but the capture they describe is not
# whole. Distinct from 1 (an error, nothing or not everything delivered) so scripts can
# tell the two apart. Documented in --help and docs/replay.md.
EXIT_TRUNCATED = 3


def _open_inputs(files, jobs: int) -> dict[int, CaptureReader]:
    """Open every input once before anything is written, so an unreadable one fails
    first. Regular files are closed again (the run opens them anew, in every --jobs
    process); stdin, pipes and FIFOs stay open, by position in `files`: their first
    bytes are read, and they can be read only once."""
    if list(files).count(STDIN) > 1:
        raise ConfigError("'-' (stdin) can be given only once")
    streams = [path for path in files if is_stream(path)]
    if streams and jobs > 1:
        name = "'-' (stdin)" if streams[0] == STDIN else streams[0]
        raise ConfigError(f"--jobs {jobs} reads every input once per process, and {name} "
                          "can be read only once; use --jobs 1, or save it to a file")
    kept: dict[int, CaptureReader] = {}
    try:
        for index, path in enumerate(files):
            reader = CaptureReader(path)
            if path in streams:
                kept[index] = reader
            else:
                reader.close()
    except BaseException:
        for reader in kept.values():
            reader.close()
        raise
    return kept


class _Delivery:
    """--to: the spool, the exporter, and how the run ends for them.

    A spool the run made itself (no --spool-dir) is removed however the run ends:
    delivered, given up after --delivery-timeout, failed or interrupted; nobody would
    know to hand it to a later run. A --spool-dir given by the user keeps what was not
    delivered, and the closing line says how many batches and where.
    """

    def __init__(self, args) -> None:
        self.args = args
        self.target = args.to
        self.timeout = args.delivery_timeout
        self.temp = args.spool_dir is None
        self.spool_dir = (Path(tempfile.mkdtemp(prefix="loupe-replay-spool-"))
                          if self.temp else args.spool_dir)
        self.exporter = None
        if not getattr(args, "verbose", False):
            # The exporter warns on every failed reconnect (right for the daemon); a
            # one-shot replay says what became of delivery in its closing line instead.
            logging.getLogger("sensor.export.grpc_client").setLevel(logging.ERROR)

    def sink(self) -> ExporterSink:
        self.exporter = _grpc_sink(self.args, self.spool_dir)
        return ExporterSink(self.exporter, close_timeout_s=self.timeout)

    def _counts(self) -> tuple[int, int]:
        """(records acknowledged, batches still in the spool)."""
        if self.exporter is None:
            return 0, 0
        counters = self.exporter.counters()
        return counters.get("records_acked", 0), counters.get("spool_batches_unacked", 0)

    def _remove_temp(self) -> None:
        if self.temp:
            shutil.rmtree(self.spool_dir, ignore_errors=True)

    def finish(self) -> None:
        """After the sink's close (delivery tried for up to the timeout): one line;
        CollectorError when batches were not acknowledged."""
        acked, left = self._counts()
        self._remove_temp()
        if not left:
            print(f"loupe replay: {acked} records delivered to {self.target}",
                  file=sys.stderr)
            return
        last = self.exporter.last_error
        head = (f"the collector at {self.target} did not acknowledge {left} batches within "
                f"--delivery-timeout {self.timeout:g} s"
                f" ({f'last error: {last}' if last else 'no answer in time'}); {acked} "
                "records were delivered")
        if self.temp:
            raise CollectorError(
                f"{head}, the rest is dropped; check that the collector runs there, or "
                "give --spool-dir DIR to keep undelivered batches for a later run")
        raise CollectorError(
            f"{head}; the {left} batches stay in {self.spool_dir} and go out with the "
            f"next run given --spool-dir {self.spool_dir}")

    def abort(self) -> None:
        """The run failed or was interrupted: stop the exporter at once, remove a
        temporary spool, say what a --spool-dir keeps."""
        # A second Ctrl-C here must not leave the spool half removed.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if self.exporter is not None:
                self.exporter.close(0)
            _, left = self._counts()
            self._remove_temp()
            if left and not self.temp:
                print(f"loupe replay: {left} batches not delivered to {self.target} stay "
                      f"in {self.spool_dir} and go out with the next run given "
                      f"--spool-dir {self.spool_dir}", file=sys.stderr)
        finally:
            signal.signal(signal.SIGINT, previous)


def _ipfix_sink(args):
    from sensor.export.ipfix import DEFAULT_PEN, IpfixSink

    return IpfixSink(args.ipfix, domain=args.ipfix_domain, pen=args.ipfix_pen or DEFAULT_PEN,
                     uniflow=args.ipfix_uniflow)


def _ipfix_finish(sink) -> None:
    """After close: one line; CollectorError when records could not be sent."""
    sent, dropped = sink.records_sent, sink.records_dropped
    if not dropped:
        print(f"loupe replay: {sent} IPFIX records sent to {sink.target}", file=sys.stderr)
        return
    raise CollectorError(
        f"{dropped} of {sent + dropped} IPFIX records could not be sent to {sink.target} "
        f"(last error: {sink.last_error}); check that an IPFIX collector listens there")


def run(args) -> int:
    if args.filter:
        try:
            parse_filter(args.filter)   # fails before anything is read or written
        except FilterError as exc:
            raise ConfigError(f"--filter: {exc}") from None
    if args.jobs < 0:
        raise ConfigError("--jobs must be 0 (automatic) or a number of processes")
    if args.rules:
        if args.no_l7:
            raise ConfigError("--rules needs L7 events: drop --no-l7")
        from sensor.rules import loader

        loader.load(args.rules)   # a bad rule fails here, naming file:line
    args.ddos_settings = _ddos(args)
    if args.ddos_settings is not None:
        if args.jobs > 1:
            raise ConfigError("--ddos needs every flow in one process: drop --jobs")
        args.jobs = 1
    if args.format is not None and args.output is None and (args.to or args.ipfix):
        raise ConfigError("--format needs -o/--output")
    if args.to is not None and not args.delivery_timeout > 0:
        raise ConfigError("--delivery-timeout must be a number of seconds above 0")
    ipfix = _ipfix_sink(args) if args.ipfix else None   # a bad target fails first
    kept = _open_inputs(args.files, args.jobs)
    delivery = _Delivery(args) if args.to is not None else None
    sinks: list = [ipfix] if ipfix is not None else []
    try:
        summary = _replay(args, kept, delivery, sinks)
    except BaseException:
        # Failed or interrupted (Ctrl-C: sensor/cli.py exits 130): nothing may be left
        # behind that nobody will use, a temporary spool above all.
        for reader in kept.values():
            reader.close()
        for sink in sinks:
            if hasattr(sink, "abort"):
                sink.abort()
        if delivery is not None:
            delivery.abort()
        raise
    err = sys.stderr
    print(f"loupe replay: {summary.line()}", file=err)
    for line in summary.truncated:
        print(f"loupe replay: {line}", file=err)
    if ipfix is not None:
        _ipfix_finish(ipfix)
    if delivery is not None:
        delivery.finish()
    return EXIT_TRUNCATED if summary.truncated else 0


def _ddos(args):
    """--ddos/--ddos-config as PipelineConfig.ddos (a sensor.rules.ddos.Settings), or None;
    a bad configuration refused in one line before any packet is read."""
    path = getattr(args, "ddos_config", None)
    if not getattr(args, "ddos", False) and not path:
        return None
    import dataclasses

    from sensor import config as cfg
    from sensor.sensor_cli import ddos_settings

    base = cfg.load_sensor_config(Path(path)) if path else cfg.SensorConfig()
    return ddos_settings(dataclasses.replace(
        base, ddos=dataclasses.replace(base.ddos, enabled=True)))


def _geoip(args) -> tuple[str, str] | None:
    """--geoip/--geoip-asn as PipelineConfig.geoip; the databases are opened (and a bad
    one refused in one line) before any packet is read."""
    db = getattr(args, "geoip", None)
    if db is None:
        if getattr(args, "geoip_asn", ""):
            raise ConfigError("--geoip-asn needs --geoip (a database, or 'default')")
        return None
    from sensor.enrich.geo import GeoEnricher

    paths = ("" if db == "default" else os.path.abspath(db),
             os.path.abspath(args.geoip_asn) if args.geoip_asn else "")
    GeoEnricher.open(*paths).close()
    return paths


def _replay(args, kept: dict[int, CaptureReader], delivery: _Delivery | None,
            sinks: list):
    """The run itself: inputs through the pipeline into the sinks (appended to `sinks`
    as they open, for the caller to abort); the Summary."""
    _tune_gc()
    if args.output is not None or (delivery is None and not args.ipfix):
        sinks.append(open_output(args.output or "-", args.format))
    if args.jobs == 0:
        args.jobs = 1 if kept else auto_jobs(args.files)
    if delivery is not None:
        # With shards, the exporter (threads) starts after the processes were forked.
        sinks.append(_Deferred(delivery.sink) if args.jobs > 1 else delivery.sink())
    sink = sinks[0] if len(sinks) == 1 else _Tee(sinks)
    sensor_id = args.sensor_id or ("replay" if args.to else "")
    config = PipelineConfig(l7=not args.no_l7, sensor_id=sensor_id,
                            packet_filter=args.filter, rules=args.rules,
                            pii=getattr(args, "pii", False), geoip=_geoip(args),
                            ddos=getattr(args, "ddos_settings", None))
    err = sys.stderr
    draw = not args.no_progress and err.isatty()
    if args.jobs > 1:
        progress = _Progress(err, len(args.files), lambda: 0) if draw else None
        state = {"index": 1}

        def on_progress(pos: int, size: int, packets: int) -> None:
            progress.packets = lambda: packets
            progress.index = state["index"]
            progress.update(pos, size)

        def on_file_done() -> None:
            state["index"] += 1

        try:
            summary = run_sharded(
                lambda: (CaptureReader(path) for path in args.files), sink, config,
                jobs=args.jobs, on_progress=on_progress if progress else None,
                on_file_done=on_file_done, encoded=isinstance(sink, JsonLinesOut))
        finally:
            if progress is not None:
                progress.clear()
    else:
        pipeline = Pipeline(sink, config)
        progress = None
        if draw:
            progress = _Progress(err, len(args.files),
                                 lambda: pipeline.meter.stats.packets)
        try:
            for index, path in enumerate(args.files, 1):
                with kept.pop(index - 1, None) or CaptureReader(path) as reader:
                    if progress is not None:
                        progress.file(index, str(path))
                        reader.on_read = progress.update
                    pipeline.feed(reader)
        finally:
            if progress is not None:
                progress.clear()
        summary = pipeline.close()
    return summary
