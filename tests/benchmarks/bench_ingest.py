"""Collector ingest benchmark: sustained records/s and ack latency.

    python -m tests.benchmarks.bench_ingest [--clients 4] [--seconds 20] [--batch 1000]

A real collector process (`loupe collector run`, DuckDB file in a temporary directory)
and N client processes, each pushing batches of a realistic mix (half flows, the rest
HTTP, DNS and TLS events) on one Ingest.Push stream with a window of un-acked batches, as
the sensor's exporter does. Every batch has its own batch_id, so all of them are
validated, deduplicated and committed. Reports records/s over the measured interval,
ack latency percentiles (send -> ack), and checks the stored row count at the end.

Not part of the pytest suite: it loads the machine on purpose.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Un-acked batches per client: enough to keep the collector busy while an ack travels
# back, as the sensor's exporter window does.
WINDOW = 2


def _template(batch_size: int, client: int):
    sys.path.insert(0, str(REPO))
    from tests.collector.conftest import batch, mixed

    return batch(mixed(batch_size, client * 1_000_000), 0, sensor_id=f"bench-{client}")


def _client(address: str, client: int, batch_size: int, seconds: float, out) -> None:
    import grpc
    from loupe.v1 import ingest_pb2

    template = _template(batch_size, client)
    window = threading.Semaphore(WINDOW)
    sent_at: dict[int, float] = {}
    stop_at = time.monotonic() + seconds

    def requests():
        batch_id = 0
        while time.monotonic() < stop_at:
            window.acquire()
            batch_id += 1
            template.batch_id = batch_id
            data = template.SerializeToString()
            sent_at[batch_id] = time.monotonic()
            yield data

    # Requests go out pre-serialised (bytes), so the client spends no time in a serializer.
    push = grpc.insecure_channel(address).stream_stream(
        "/loupe.v1.Ingest/Push", request_serializer=None,
        response_deserializer=ingest_pb2.BatchAck.FromString,
    )
    latencies, records, statuses = [], 0, {}
    first = time.monotonic()
    for ack in push(requests(), timeout=seconds + 60):
        now = time.monotonic()
        latencies.append(now - sent_at.pop(ack.batch_id))
        records += ack.records
        statuses[ack.status] = statuses.get(ack.status, 0) + 1
        window.release()
    out.put({"client": client, "records": records, "latencies": latencies,
             "elapsed": time.monotonic() - first, "statuses": statuses})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--batch", type=int, default=1000)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="loupe-bench-") as tmp:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sensor.cli", "collector", "run", "--listen", "127.0.0.1:0",
             "--data-dir", tmp], cwd=REPO, stderr=subprocess.PIPE, text=True)
        try:
            address = None
            while address is None:
                line = proc.stderr.readline()
                if not line:
                    raise SystemExit("collector did not start")
                if "listening on" in line:
                    address = line.split("listening on ")[1].split()[0]
            ctx = mp.get_context("spawn")
            results = ctx.Queue()
            workers = [ctx.Process(target=_client, args=(address, i, args.batch, args.seconds, results))
                       for i in range(args.clients)]
            for w in workers:
                w.start()
            reports = [results.get(timeout=args.seconds + 120) for _ in workers]
            for w in workers:
                w.join()

            sys.path.insert(0, str(REPO))
            import grpc
            from loupe.v1 import observer_pb2, observer_pb2_grpc
            stub = observer_pb2_grpc.ObserverStub(grpc.insecure_channel(address))
            resp = stub.Query(observer_pb2.QueryRequest(sql=(
                "SELECT (SELECT count(*) FROM flows) + (SELECT count(*) FROM http) + "
                "(SELECT count(*) FROM dns) + (SELECT count(*) FROM tls)")), timeout=60)
            stored = json.loads(resp.rows_json[0])[0]
        finally:
            proc.terminate()
            proc.wait(30)

    records = sum(r["records"] for r in reports)
    elapsed = max(r["elapsed"] for r in reports)
    lat = sorted(x for r in reports for x in r["latencies"])
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000  # noqa: E731
    print(f"clients={args.clients} batch={args.batch} seconds={args.seconds:g}")
    print(f"acked records: {records} in {elapsed:.1f} s -> {records / elapsed:,.0f} records/s")
    print(f"ack latency ms: p50={p(0.50):.1f} p90={p(0.90):.1f} p99={p(0.99):.1f} "
          f"max={lat[-1] * 1000:.1f} mean={statistics.mean(lat) * 1000:.1f} (batches={len(lat)})")
    print(f"stored rows: {stored} ({'matches' if stored == records else 'MISMATCH'})")
    return 0 if stored == records else 1


if __name__ == "__main__":
    sys.exit(main())
