"""Collector ingest benchmark: row against columnar batches, DuckDB and ClickHouse.

    python -m tests.benchmarks.bench_ingest [--clients 4] [--seconds 20] [--batch 1000]
        [--window 8] [--encoding rows,columnar] [--backend duckdb,clickhouse] [--ipfix]

For every backend and encoding, in one run: a real collector process (`loupe collector
run`; DuckDB file in a temporary directory, or a real clickhouse-server started here as
tests/storage/clickhouse_proc.py does) and N client processes, each pushing batches of a
realistic mix (half flows, the rest HTTP, DNS and TLS events) on one Ingest.Push stream
with a window of un-acked batches, as the sensor's exporter does. Every batch has its
own batch_id, so all of them are validated, deduplicated and committed. Reports records/s
over the measured interval, ack latency percentiles (send -> ack), the CPU each side
used (the ClickHouse server's too), the load average, and checks the stored row count.

Then CPU per 1000 records for each stage (rows, columnar, and columnar with lz4-compressed
buffers), measured in this process on one thread
(process time, lower quartile of repeated runs): encode at the sensor (records -> the
serialized batch), decode at the collector (ingest.decode_message: bytes -> validated
Arrow tables, as a decoder process does it) and store (Storage.store_many of a group of
16 batches, as the writer commits them under load, into DuckDB or ClickHouse;
ClickHouse's own server CPU is not in it), and what the collector does with each stored
batch besides storing it (the endpoint inventory, statistics and clients).

The clients are cheap on purpose: each builds a pool of distinct batches once and sends
them pre-serialised, only the batch_id changing (prepended as its protobuf field, which
a parser reads like any other field order). A real sensor fleet does not run on the
collector's cores; here the clients share them, so their CPU share is printed to show
how little of the machine they take.

--ipfix turns the collector's IPFIX export on (collector/ipfix.py, to a socket that never
reads), to show what exporting every stored flow costs ingest.

Not part of the pytest suite: it loads the machine on purpose.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Distinct batches per client: enough that the collector does not see the same records
# back to back, few enough to build in a fraction of a second.
POOL = 8


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _encode(records, encoding: str, sensor_id: str, batch_id: int = 0):
    """One batch of `records` in `encoding`, as the sensor's exporter builds it."""
    from sensor.export import columnar, wire

    if encoding.startswith("columnar"):
        # "columnar-lz4": Arrow buffers lz4-compressed, measured for the stages only (the
        # sensor sends uncompressed; docs/scaling.md says why).
        return columnar.encode(records, sensor_id=sensor_id, batch_id=batch_id, created_ns=1,
                               compression=encoding.partition("-")[2] or None)
    return wire.batch_to_proto(records, sensor_id=sensor_id, batch_id=batch_id, created_ns=1)


def _pool(batch_size: int, client: int, encoding: str) -> list[bytes]:
    """POOL serialized batches without a batch_id (proto3 leaves a 0 out)."""
    sys.path.insert(0, str(REPO))
    from tests.collector.conftest import mixed

    start = client * 10_000_000
    return [_encode(mixed(batch_size, start + i * batch_size), encoding, f"bench-{client}")
            .SerializeToString() for i in range(POOL)]


def _client(address: str, client: int, batch_size: int, seconds: float, window_size: int,
            encoding: str, start, out) -> None:
    import grpc
    from loupe.v1 import ingest_pb2

    pool = _pool(batch_size, client, encoding)
    window = threading.Semaphore(window_size)
    sent_at: dict[int, float] = {}
    channel = grpc.insecure_channel(address)
    grpc.channel_ready_future(channel).result(timeout=60)
    # Every client builds its pool and connects first: building one takes about a core
    # for a second, which would otherwise land on the first acks of the clients already
    # pushing.
    start.wait()
    stop_at = time.monotonic() + seconds

    def requests():
        batch_id = 0
        while time.monotonic() < stop_at:
            window.acquire()
            batch_id += 1
            # RecordBatch.batch_id is field 2, a varint: tag byte 0x10.
            data = b"\x10" + _varint(batch_id) + pool[batch_id % POOL]
            sent_at[batch_id] = time.monotonic()
            yield data

    push = channel.stream_stream(
        "/loupe.v1.Ingest/Push", request_serializer=None,
        response_deserializer=ingest_pb2.BatchAck.FromString,
    )
    latencies, records, statuses = [], 0, {}
    first = time.monotonic()
    cpu0 = time.process_time()
    for ack in push(requests(), timeout=seconds + 60):
        now = time.monotonic()
        latencies.append(now - sent_at.pop(ack.batch_id))
        records += ack.records
        statuses[ack.status] = statuses.get(ack.status, 0) + 1
        window.release()
    out.put({"client": client, "records": records, "latencies": latencies,
             "elapsed": time.monotonic() - first, "statuses": statuses,
             "cpu": time.process_time() - cpu0})


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its reaped children (the decoder processes)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def _tree_cpu(pid: int) -> float:
    total = _cpu_seconds(pid)
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for child in children.read_text().split() if children.exists() else ():
        try:
            total += _tree_cpu(int(child))
        except (FileNotFoundError, ProcessLookupError):
            pass  # exited meanwhile; its time is in the parent's cutime
    return total


def _lower_quartile_ms(fn, runs: int = 15) -> float:
    times = []
    for _ in range(runs):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    times.sort()
    return times[len(times) // 4] * 1000


# Batches per store_many in the store stage: the writer's group commit under load
# (ingest.Writer.MAX_GROUP). A commit's fixed cost (DuckDB: ~15 ms of CPU, its WAL)
# dominates a lone batch's store.
GROUP = 16


def _stages(batch_size: int, backends: list[str], ch_port: int | None, tmp: str) -> dict:
    """CPU ms per 1000 records for encode, decode and store, per encoding (and backend)."""
    sys.path.insert(0, str(REPO))
    from collector.ingest import decode_message
    from collector.storage import open_storage
    from sensor.config import ClickHouseConfig, StorageConfig
    from tests.collector.conftest import mixed

    records = mixed(batch_size, 77_000_000)
    scale = 1000 / batch_size
    out: dict = {}
    ids = iter(range(1, 10**9))
    for encoding in ("rows", "columnar", "columnar-lz4"):
        raw = _encode(records, encoding, "stage").SerializeToString()
        row = out[encoding] = {
            "bytes": len(raw),
            "encode": _lower_quartile_ms(
                lambda: _encode(records, encoding, "stage").SerializeToString()) * scale,
            # As the writer asks its decoders: a table stored as sent comes back as its
            # place in the batch (collector/columnar.py arrow_spans).
            "decode": _lower_quartile_ms(
                lambda: decode_message(raw, None, spans=True)) * scale,
        }
        for backend in backends:
            if backend == "duckdb":
                store = open_storage(StorageConfig(), Path(tmp) / f"stage-{encoding}")
            else:
                store = open_storage(StorageConfig(backend="clickhouse", clickhouse=ClickHouseConfig(
                    port=ch_port, database=f"stage_{encoding}")), Path(tmp) / "ch-local")
            try:
                def store_group():
                    group = []
                    for _ in range(GROUP):
                        data = _encode(records, encoding, "stage", next(ids)).SerializeToString()
                        group.append(decode_message(data, None, spans=True).unpack(data))
                    t0 = time.process_time()
                    store.store_many(group, time.time_ns())
                    return (time.process_time() - t0) / GROUP
                store_group()   # tables made, caches warm
                samples = sorted(store_group() for _ in range(6))
                row[f"store {backend}"] = samples[len(samples) // 4] * 1000 * scale
            finally:
                store.close()
    return out


def _hooks(batch_size: int, tmp: str) -> dict[str, float]:
    """CPU ms per 1000 records of what the collector does with each stored batch besides
    storing it (collector/server.py _on_stored: the endpoint inventory, the endpoint
    statistics, the clients), each fed GROUP decoded batches and drained; process time, so
    their own threads' CPU is in it. Lower quartile of 3 runs."""
    sys.path.insert(0, str(REPO))
    from collector.clients.store import ClientStore
    from collector.ingest import decode_message
    from collector.inventory.store import InventoryStore
    from collector.stats.store import StatsStore
    from tests.collector.conftest import mixed

    batches = [decode_message(_encode(mixed(batch_size, 88_000_000 + i * batch_size),
                                      "columnar", "hooks", i + 1).SerializeToString(),
                              None).unpack() for i in range(GROUP)]
    inventory = InventoryStore(Path(tmp) / "hooks-inventory")
    stores = {"inventory": inventory, "stats": StatsStore(Path(tmp) / "hooks-stats", inventory),
              "clients": ClientStore(Path(tmp) / "hooks-clients")}
    out = {}
    try:
        for name, store in stores.items():
            def feed():
                for b in batches:
                    store.on_stored(b)
                store.flush()
            out[name] = _lower_quartile_ms(feed, runs=3) * 1000 / (batch_size * GROUP)
    finally:
        for store in reversed(stores.values()):
            store.close()
    return out


def _run(args, encoding: str, backend: str, ch, tmp: str) -> dict:
    """One collector, N clients pushing `encoding` batches; the measured figures."""
    data_dir = Path(tmp) / f"{backend}-{encoding}"
    cmd = [sys.executable, "-m", "sensor.cli", "collector", "run", "--listen", "127.0.0.1:0",
           "--data-dir", str(data_dir)]
    if args.ipfix:
        # The collector's IPFIX export on (collector/ipfix.py), to a socket that never
        # reads: every flow is encoded and sent, the kernel drops the datagrams.
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind(("127.0.0.1", 0))
        cmd += ["--ipfix", f"127.0.0.1:{sink.getsockname()[1]}"]
    if backend == "clickhouse":
        cmd += ["--set", "storage.backend=clickhouse", "--set", f"storage.clickhouse.port={ch.port}",
                "--set", f"storage.clickhouse.database=bench_{encoding}"]
    load_before = os.getloadavg()
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        address = None
        while address is None:
            line = proc.stderr.readline()
            if not line:
                raise SystemExit("collector did not start")
            if "listening on" in line:
                address = line.split("listening on ")[1].split()[0].rstrip(";")
        # Keep reading its log: a full pipe would block the collector mid-run.
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        start = ctx.Barrier(args.clients + 1)
        workers = [ctx.Process(target=_client, args=(
            address, i, args.batch, args.seconds, args.window, encoding, start, results))
            for i in range(args.clients)]
        for w in workers:
            w.start()
        start.wait(timeout=180)
        server_pid = ch.proc.pid if backend == "clickhouse" else None
        cpu0, wall0 = _tree_cpu(proc.pid), time.monotonic()
        server0 = _cpu_seconds(server_pid) if server_pid else 0.0
        reports = [results.get(timeout=args.seconds + 180) for _ in workers]
        collector_cpu, wall = _tree_cpu(proc.pid) - cpu0, time.monotonic() - wall0
        server_cpu = (_cpu_seconds(server_pid) - server0) if server_pid else 0.0
        load_after = os.getloadavg()
        for w in workers:
            w.join()

        import grpc
        from loupe.v1 import observer_pb2, observer_pb2_grpc
        stub = observer_pb2_grpc.ObserverStub(grpc.insecure_channel(address))
        resp = stub.Query(observer_pb2.QueryRequest(sql=(
            "SELECT (SELECT count(*) FROM flows) + (SELECT count(*) FROM http) + "
            "(SELECT count(*) FROM dns) + (SELECT count(*) FROM tls)")), timeout=120)
        stored = json.loads(resp.rows_json[0])[0]
    finally:
        proc.terminate()
        proc.wait(60)
    records = sum(r["records"] for r in reports)
    elapsed = max(r["elapsed"] for r in reports)
    lat = sorted(x for r in reports for x in r["latencies"])
    return {
        "records": records, "elapsed": elapsed, "rate": records / elapsed, "lat": lat,
        "collector_cpu": collector_cpu, "server_cpu": server_cpu,
        "client_cpu": sum(r["cpu"] for r in reports), "wall": wall, "stored": stored,
        "load": (load_before[0], load_after[0]),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--batch", type=int, default=1000)
    # Un-acked batches per client. The sensor's exporter allows 16. The collector works on
    # at most IngestService.PIPELINE + 1 batches of a stream at once; 8 keeps a few more
    # waiting in the transport, so the collector never idles between an ack and the
    # client's next batch (measured on 2 cores with row batches: window 4 left ~12% of the
    # cores idle, 91-108k records/s; window 8 114-120k). Beyond that, extra batches only
    # wait in line: window 16 gives the same rate at twice the ack latency.
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--encoding", default="rows,columnar")
    ap.add_argument("--backend", default="duckdb,clickhouse")
    ap.add_argument("--ipfix", action="store_true",
                    help="with the collector's IPFIX export of every stored flow on")
    args = ap.parse_args(argv)
    encodings = args.encoding.split(",")
    backends = args.backend.split(",")

    sys.path.insert(0, str(REPO))
    ch = None
    ok = True
    with tempfile.TemporaryDirectory(prefix="loupe-bench-") as tmp:
        try:
            if "clickhouse" in backends:
                from tests.storage.clickhouse_proc import ClickHouseServer
                # The tests' ClickHouseServer reports a missing binary as a pytest skip.
                ch = ClickHouseServer(Path(tmp) / "clickhouse")
            print(f"clients={args.clients} batch={args.batch} window={args.window} "
                  f"seconds={args.seconds:g} cores={os.cpu_count()}")
            for backend in backends:
                for encoding in encodings:
                    r = _run(args, encoding, backend, ch, tmp)
                    lat = r["lat"]
                    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000  # noqa: E731
                    total = r["collector_cpu"] + r["server_cpu"]
                    print(f"\n[{backend} {encoding}] load average {r['load'][0]:.2f} -> "
                          f"{r['load'][1]:.2f} (1 min)")
                    print(f"  acked records: {r['records']} in {r['elapsed']:.1f} s -> "
                          f"{r['rate']:,.0f} records/s")
                    print(f"  ack latency ms: p50={p(0.50):.1f} p90={p(0.90):.1f} "
                          f"p99={p(0.99):.1f} max={lat[-1] * 1000:.1f} "
                          f"mean={statistics.mean(lat) * 1000:.1f} (batches={len(lat)})")
                    print(f"  CPU: collector {r['collector_cpu'] / r['wall']:.2f} cores"
                          + (f", clickhouse-server {r['server_cpu'] / r['wall']:.2f} cores"
                             if backend == "clickhouse" else "")
                          + f", clients {r['client_cpu'] / r['wall']:.2f} cores; "
                          f"{r['collector_cpu'] / max(r['records'], 1) * 1e6:.1f} ms of "
                          "collector CPU per 1000 records"
                          + (f" ({total / max(r['records'], 1) * 1e6:.1f} with the server)"
                             if backend == "clickhouse" else ""))
                    match = r["stored"] == r["records"]
                    ok &= match
                    print(f"  stored rows: {r['stored']} ({'matches' if match else 'MISMATCH'})")
            stages = _stages(args.batch, backends, ch.port if ch else None, tmp)
            hooks = _hooks(args.batch, tmp)
        finally:
            if ch is not None:
                ch.stop()
    print(f"\nCPU ms per 1000 records by stage (lower quartile; store: groups of {GROUP} "
          f"batches, as the writer commits under load; load average {os.getloadavg()[0]:.2f}):")
    names = [k for k in stages["rows"] if k != "bytes"]
    print("  " + "encoding".ljust(13) + "".join(n.rjust(18) for n in names) + "bytes/1000".rjust(14))
    for encoding, row in stages.items():
        print("  " + encoding.ljust(13) + "".join(f"{row[n]:18.2f}" for n in names)
              + f"{row['bytes'] * 1000 // args.batch:14,d}")
    print("  after each stored batch (collector/server.py _on_stored), CPU ms per 1000 records: "
          + ", ".join(f"{name} {ms:.2f}" for name, ms in hooks.items())
          + f" (total {sum(hooks.values()):.2f})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
