"""Kafka parser throughput: µs per transaction and transactions per second, single core.

Workloads, each a connection of 10 requests and their responses encoded by kafka-python
(tests/fixtures/gen_kafka.py), fed as the engine would (one receive_data per direction per
batch):
  produce   Produce v9 (flexible) of one topic, one partition, a batch of 5 small records
  fetch     Fetch v11 answered with two batches of 10 records each
  metadata  Metadata v1 for all topics, answered with 3 topics of 4 partitions
  skipped   Produce v9 of one 1 MiB record whose payload the engine skips (skip_hint)
Run: python -m tests.benchmarks.bench_kafka [seconds per workload]
Each workload runs in rounds of 0.25 s and the best round is reported (shared cores).
"""

from __future__ import annotations

import sys
import time

from sensor.l7.base import NEED_DATA, Direction
from sensor.l7.kafka import KafkaParser
from tests.fixtures.gen_kafka import batch

C = Direction.TO_SERVER
S = Direction.TO_CLIENT


def _encode(msg, corr: int, client: str | None = "bench") -> bytes:
    if client is None:
        msg.with_header(correlation_id=corr)
    else:
        msg.with_header(correlation_id=corr, client_id=client)
    return bytes(msg.encode(header=True, framed=True))


def workloads() -> dict[str, tuple[bytes, bytes]]:
    from kafka.protocol.consumer.fetch import FetchRequest, FetchResponse
    from kafka.protocol.metadata.metadata import MetadataRequest, MetadataResponse
    from kafka.protocol.producer import ProduceRequest, ProduceResponse

    TD = ProduceRequest.TopicProduceData
    RT = ProduceResponse.TopicProduceResponse
    FT = FetchRequest.FetchTopic
    FR = FetchResponse.FetchableTopicResponse
    MT = MetadataResponse.MetadataResponseTopic
    small, two = batch(5), batch(10) + batch(10)

    def produce(corr: int, records: bytes) -> tuple[bytes, bytes]:
        req = ProduceRequest[9](acks=1, timeout_ms=1000, topic_data=[TD(
            name="events", partition_data=[TD.PartitionProduceData(index=0, records=records)])])
        resp = ProduceResponse[9](responses=[RT(name="events", partition_responses=[
            RT.PartitionProduceResponse(index=0, base_offset=corr)])])
        return _encode(req, corr), _encode(resp, corr, None)

    def fetch(corr: int) -> tuple[bytes, bytes]:
        req = FetchRequest[11](max_wait_ms=500, min_bytes=1, topics=[FT(topic="events", partitions=[
            FT.FetchPartition(partition=0, fetch_offset=corr, partition_max_bytes=1 << 20)])])
        resp = FetchResponse[11](responses=[FR(topic="events", partitions=[
            FR.PartitionData(partition_index=0, high_watermark=99, records=two)])])
        return _encode(req, corr), _encode(resp, corr, None)

    def metadata(corr: int) -> tuple[bytes, bytes]:
        P = MT.MetadataResponsePartition
        req = MetadataRequest[1](topics=None)
        resp = MetadataResponse[1](brokers=[], controller_id=1, topics=[
            MT(name=f"t{i}", partitions=[P(partition_index=k) for k in range(4)])
            for i in range(3)])
        return _encode(req, corr), _encode(resp, corr, None)

    big = batch(1, value=b"x" * (1 << 20))
    out = {}
    for name, make in (("produce", lambda c: produce(c, small)), ("fetch", fetch),
                       ("metadata", metadata), ("skipped", lambda c: produce(c, big))):
        pairs = [make(c) for c in range(10)]
        out[name] = (b"".join(p[0] for p in pairs), b"".join(p[1] for p in pairs))
    return out


def run(req: bytes, resp: bytes, skipped: bool, seconds: float) -> float:
    done = 0
    ts = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        p = KafkaParser()
        ts += 1000
        if skipped:
            # As the engine does: bytes up to each skip, the skip, then the rest.
            pos = 0
            while pos < len(req):
                hint = p.skip_hint(C)
                if hint:
                    p.receive_skip(C, hint, ts)
                    pos += hint
                else:
                    p.receive_data(C, req[pos:pos + 1448], ts)
                    pos += 1448
        else:
            p.receive_data(C, req, ts)
        p.receive_data(S, resp, ts + 500)
        while p.next_event() is not NEED_DATA:
            done += 1
    return done / (time.perf_counter() - start)


def main(argv: list[str]) -> int:
    seconds = float(argv[0]) if argv else 2.0
    rounds = max(1, int(seconds / 0.25))
    for kind, (req, resp) in workloads().items():
        rates = sorted(run(req, resp, kind == "skipped", 0.25) for _ in range(rounds))
        best = rates[-1]
        print(f"kafka {kind:8s} best {best:10,.0f}  median {rates[len(rates) // 2]:10,.0f}"
              f" transactions/s  ({1e6 / best:.2f} µs/transaction)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
