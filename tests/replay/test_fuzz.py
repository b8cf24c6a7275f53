"""Random and mutated input to the reader and the meter: nothing escapes, memory stays
bounded (the flow table and fragment table never exceed their limits)."""

from __future__ import annotations

import tracemalloc

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sensor.engine.meter import MAX_FRAG_ENTRIES, Meter
from sensor.errors import CaptureFileError
from sensor.flow.packet import SUPPORTED_LINKTYPES
from sensor.replay.reader import CaptureReader
from tests.fixtures import capture_files as cf
from tests.fixtures import packets as pk

_SEED = cf.pcap([(1_700_000_000_000_000_000 + i, f) for i, f in enumerate([
    pk.tcp4("198.18.0.1", 1, "198.18.0.2", 80, pk.SYN),
    pk.udp4("198.18.0.1", 2, "198.18.0.2", 53, b"abc", vlans=(1, 2)),
    pk.ether(pk.ipv4("198.18.0.1", "198.18.0.2", 17, b"x" * 16, frag=0x2001)),
])])
_SEED_NG = (cf.shb() + cf.idb(1) + cf.idb(101, tsresol=9)
            + cf.epb(0, 5, pk.udp4("198.18.0.1", 2, "198.18.0.2", 53, b"abc"))
            + cf.epb(1, 6, pk.ipv4("198.18.0.1", "198.18.0.2", 6, pk.tcp(1, 2, 2))))

_SETTINGS = settings(max_examples=100, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])


def _mutate(seed: bytes, edits):
    data = bytearray(seed)
    for pos, val in edits:
        if data:
            data[pos % len(data)] = val
    return bytes(data)


def _read_and_meter(path):
    """Either the file is refused with CaptureFileError (a header that is not a
    capture's), or every packet is read and metered without an exception."""
    out = []
    meter = Meter(emit=out.append, max_flows=64)
    try:
        with CaptureReader(path) as reader:
            meter.run(reader)
    except CaptureFileError as exc:
        assert "\n" not in str(exc)
        return
    assert meter.stats.packets == reader.stats.packets


@_SETTINGS
@given(edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=12),
       cut=st.integers(0, 400), ng=st.booleans())
def test_mutated_captures_never_raise(tmp_path, edits, cut, ng):
    seed = _SEED_NG if ng else _SEED
    data = _mutate(seed, edits)[:max(4, len(seed) - cut)]
    path = tmp_path / "f"
    path.write_bytes(data)
    _read_and_meter(path)


@_SETTINGS
@given(frames=st.lists(st.binary(max_size=120), max_size=40),
       link=st.sampled_from(sorted(SUPPORTED_LINKTYPES) + [147]))
def test_random_frames_never_raise_in_meter(frames, link):
    out = []
    m = Meter(emit=out.append, max_flows=16)
    for i, f in enumerate(frames):
        m.feed(1_700_000_000_000_000_000 + i, 0, link, f, len(f))
        assert len(m.table) <= 16
    m.flush()
    assert m.stats.packets == len(frames)


def test_memory_is_bounded_under_a_flood_of_new_flows_and_fragments():
    out = []
    m = Meter(emit=lambda r: None, max_flows=1000)
    tracemalloc.start()
    for i in range(12_000):
        src = f"198.18.{i >> 8 & 0xFF}.{i & 0xFF}"
        f = pk.ether(pk.ipv4(src, "198.19.0.1", 17, pk.udp(1, 2), ident=i & 0xFFFF,
                             frag=0x2000))
        m.feed(1_700_000_000_000_000_000 + i, 0, 1, f, len(f))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(m.table) <= 1000 and len(m._frags) <= MAX_FRAG_ENTRIES
    assert m.table.stats.evicted == 11_000
    assert peak < 40 << 20
    del out
