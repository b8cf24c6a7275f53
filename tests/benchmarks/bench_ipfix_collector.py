"""The collector's IPFIX export (collector/ipfix.py): stored flows per second from the
writer's hook to a UDP socket on loopback, and what the hook itself costs the writer
thread per batch (it only queues the batch's flows table).

Batches are 1000 IPv4 flows with an SNI, Community ID and app_proto, decoded as the
collector decodes a row batch; a thread drains the receiving socket.

    python -m tests.benchmarks.bench_ipfix_collector [--flows 50000]
"""

from __future__ import annotations

import argparse
import os
import socket
import threading
import time

from collector.ingest import decode_batch
from collector.ipfix import IpfixExport
from loupe.v1 import ingest_pb2
from sensor import model
from sensor.export import wire

BATCH = 1000


def _batches(n: int) -> list:
    flows = [model.Flow(uid=f"u{i}", sensor_id="bench", flow_start_ns=10**18 + i,
                        flow_end_ns=10**18 + i + 5_000_000, src_addr="198.18.0.1",
                        dst_addr="198.19.0.2", src_port=1024 + i % 60000, dst_port=443,
                        protocol=6, ip_version=4, initiator_octets=700, initiator_packets=6,
                        responder_octets=4200, responder_packets=5, app_proto="tls",
                        tls_sni="api.example.test", community_id="1:abcdefghijklmnopqrstuvwxyz0=")
             for i in range(n)]
    return [decode_batch(ingest_pb2.RecordBatch(
        sensor_id="bench", batch_id=b,
        records=[wire.to_proto(f) for f in flows[b * BATCH:(b + 1) * BATCH]]))
        for b in range(n // BATCH)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flows", type=int, default=50_000)
    args = ap.parse_args()
    batches = _batches(args.flows)
    flows = len(batches) * BATCH
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    rx.settimeout(2)
    received = [0]

    def drain() -> None:
        try:
            while True:
                rx.recv(65535)
                received[0] += 1
        except socket.timeout:
            pass

    reader = threading.Thread(target=drain)
    reader.start()
    export = IpfixExport((f"127.0.0.1:{rx.getsockname()[1]}",), queue_records=flows)
    export.start()
    time.sleep(0.3)                       # the sink's socket opens on the export thread
    hook = []
    start = time.perf_counter()
    for b in batches:
        t = time.perf_counter()
        export.on_stored(b)
        hook.append(time.perf_counter() - t)
    while export.counters()["ipfix_flows_exported"] < flows:
        time.sleep(0.005)
    took = time.perf_counter() - start
    export.close()
    reader.join()
    rx.close()
    hook.sort()
    c = export.counters()
    print(f"load {os.getloadavg()[0]:.1f}: {flows / took:,.0f} flows/s exported "
          f"({took / flows * 1e6:.1f} µs a flow); on_stored per {BATCH}-flow batch: median "
          f"{hook[len(hook) // 2] * 1e6:.0f} µs, max {hook[-1] * 1e6:.0f} µs; "
          f"{c['ipfix_records_sent']} records sent, {c['ipfix_records_dropped']} not sent, "
          f"{received[0]} datagrams received")


if __name__ == "__main__":
    main()
