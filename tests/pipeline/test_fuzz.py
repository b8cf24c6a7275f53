"""Mutated captures through the whole pipeline, L7 on: a file is either refused with
one line (CaptureFileError) or replayed to the end; no exception escapes any stage, and
the reassembly budget is back to zero after the final flush."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sensor.engine.pipeline import Pipeline
from sensor.errors import CaptureFileError
from sensor.replay.reader import CaptureReader
from tests.conftest import REPO

GOLDEN = REPO / "tests" / "golden"
SEEDS = [(GOLDEN / f"{name}.pcap").read_bytes() for name in (
    "http-pipelined", "dns-udp-tcp", "tls13-split-hello-ipv6", "dns-ipv4-fragments-vlan",
    "openssl-tls12")]


class _Count:
    def __init__(self):
        self.n = 0

    def write(self, record):
        self.n += 1

    def flush(self):
        pass

    def close(self):
        pass


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, len(SEEDS) - 1),
       edits=st.lists(st.tuples(st.integers(24, 10_000), st.integers(0, 255)), max_size=16),
       cut=st.integers(0, 300))
def test_mutated_captures_replay_without_exceptions(tmp_path, seed, edits, cut):
    data = bytearray(SEEDS[seed])
    for pos, val in edits:
        data[pos % len(data)] = val
    path = tmp_path / "m.pcap"
    path.write_bytes(bytes(data[:max(24, len(data) - cut)]))
    pipeline = Pipeline(_Count())
    try:
        reader = CaptureReader(path)
    except CaptureFileError as exc:
        assert "\n" not in str(exc)
        return
    with reader:
        pipeline.feed(reader)
    summary = pipeline.close()
    assert summary.packets == reader.stats.packets
    assert pipeline.l7.budget.used == 0
