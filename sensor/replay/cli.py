"""`loupe replay FILE...`: capture files through the engine into records.

JSON lines to stdout by default; `-o` writes JSON lines, Parquet or CSV (by suffix or
--format); `--to HOST:PORT` sends the records to a collector over gRPC (mTLS with the
--tls-* flags), through the same exporter and spool the live sensor uses. A progress bar
goes to stderr only when stderr is a terminal; a one-line summary always ends the run
on stderr, so stdout carries nothing but records.
"""

from __future__ import annotations

import gc
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from sensor import model
from sensor.engine.pipeline import ExporterSink, Pipeline, PipelineConfig, run_sharded
from sensor.errors import ConfigError, StorageError
from sensor.export.formats import json_line
from sensor.replay.reader import CaptureReader

_FORMATS = ("jsonl", "parquet", "csv")
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
            "  loupe replay capture.pcap --to 127.0.0.1:50051"),
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="capture file(s)")
    p.add_argument("-o", "--output", default=None, metavar="PATH",
                   help="output file (.jsonl, .parquet, .csv); default: JSON lines on "
                        "stdout, or nothing when --to is given")
    p.add_argument("--format", choices=_FORMATS, default=None,
                   help="output format when the suffix does not say")
    p.add_argument("--to", metavar="HOST:PORT", help="send the records to a collector")
    p.add_argument("--tls-ca", type=Path, help="CA certificate: turns TLS on")
    p.add_argument("--tls-cert", type=Path, help="client certificate (mTLS)")
    p.add_argument("--tls-key", type=Path, help="client key (mTLS)")
    p.add_argument("--tls-server-name", default="",
                   help="name to verify in the collector's certificate")
    p.add_argument("--spool-dir", type=Path, default=None,
                   help="spool for --to (default: a temporary directory, removed when "
                        "everything was delivered)")
    p.add_argument("--no-l7", action="store_true", help="flows only: no reassembly, no L7")
    p.add_argument("--sensor-id", default="", help="sensor id put on every record "
                   "(default: none; 'replay' with --to)")
    p.add_argument("--no-progress", action="store_true", help="never draw a progress bar")
    p.add_argument("--jobs", type=int, default=0, metavar="N",
                   help="meter in N processes, each taking a share of the host pairs' "
                        "flows (records then come in arrival order across processes); "
                        "default 0: one per idle CPU (up to 4) for inputs of 64 MiB or "
                        "more, else one")
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
        frac = min(pos / size, 1.0) if size else 0.0
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
    """The record sink for -o/--format: JsonLinesOut for JSON lines, else the export
    sinks (Parquet, CSV)."""
    if fmt == "jsonl" or (fmt is None and (
            path == "-" or Path(path).suffix.lower() in (".jsonl", ".ndjson", ".json"))):
        # Decided here so that JSON lines runs never import the export sinks, which
        # load pyarrow (about 50 ms of start-up) for Parquet and CSV.
        return JsonLinesOut(path)
    from sensor.export.sinks import JsonLinesSink, open_sink

    sink = open_sink(path, fmt) if path != "-" or fmt not in (None, "jsonl") else None
    if sink is None or isinstance(sink, JsonLinesSink):
        if sink is not None:
            sink.close()
        return JsonLinesOut(path)
    return sink


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


def run(args) -> int:
    for path in args.files:
        CaptureReader(path).close()   # an unreadable file fails before anything is written
    _tune_gc()
    sinks = []
    spool_dir = None
    temp_spool = False
    if args.output is not None or args.to is None:
        sinks.append(open_output(args.output or "-", args.format))
    elif args.format is not None:
        raise ConfigError("--format needs -o/--output")
    if args.jobs < 0:
        raise ConfigError("--jobs must be 0 (automatic) or a number of processes")
    if args.jobs == 0:
        args.jobs = auto_jobs(args.files)
    exporters = []
    if args.to is not None:
        spool_dir = args.spool_dir
        if spool_dir is None:
            spool_dir = Path(tempfile.mkdtemp(prefix="loupe-replay-spool-"))
            temp_spool = True

        def make_exporter_sink():
            exporters.append(_grpc_sink(args, spool_dir))
            return ExporterSink(exporters[0])

        if args.jobs > 1:
            sinks.append(_Deferred(make_exporter_sink))
        else:
            sinks.append(make_exporter_sink())
    sink = sinks[0] if len(sinks) == 1 else _Tee(sinks)
    sensor_id = args.sensor_id or ("replay" if args.to else "")
    config = PipelineConfig(l7=not args.no_l7, sensor_id=sensor_id)
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
                with CaptureReader(path) as reader:
                    if progress is not None:
                        progress.file(index, str(path))
                        reader.on_read = progress.update
                    pipeline.feed(reader)
        finally:
            if progress is not None:
                progress.clear()
        summary = pipeline.close()
    print(f"loupe replay: {summary.line()}", file=err)
    exporter = exporters[0] if exporters else None
    if exporter is not None:
        counters = exporter.counters()
        pending = counters.get("batches_spooled", 0) - counters.get("batches_acked", 0) \
            - counters.get("batches_duplicate", 0) - counters.get("batches_rejected", 0)
        acked = counters.get("records_acked", 0)
        if pending > 0:
            print(f"loupe replay: {acked} records delivered to {args.to}; {pending} "
                  f"batches not acknowledged yet stay in the spool {spool_dir} and are "
                  "sent by the next run with the same --spool-dir", file=err)
            return 1
        print(f"loupe replay: {acked} records delivered to {args.to}", file=err)
        if temp_spool:
            shutil.rmtree(spool_dir, ignore_errors=True)
    return 0
