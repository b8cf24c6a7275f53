"""Every L7 parser through the shared harness (tests/l7/harness.py): its real captures fed
whole, one byte at a time, split at every offset, with trailing junk, and to hypothesis.
The long fuzz run is `python -m tests.fuzz` (tests/fuzz.py); this is its short version."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sensor.l7 import registry
from sensor.l7.http1 import Http1Parser
from tests.conftest import REPO
from tests.fuzz import PARSER_NAMES
from tests.l7 import harness
from tests.l7.harness import PARSERS, conversations, seeds

BIG = 4 << 10


def test_every_registered_parser_is_here():
    registered = {p.name: p.parser for p in registry.protocols() if p.parser is not None}
    mine = {factory for factory, _ in PARSERS.values()}
    missing = sorted(name for name, parser in registered.items() if parser not in mine)
    assert not missing, f"add {missing} to PARSERS in tests/l7/harness.py, with captures"
    assert len(registered) == len(PARSERS)


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_fed_whole_bytewise_split_and_with_junk_alike(name):
    factory = PARSERS[name][0]
    convs = conversations(name)
    assert convs, f"{name}: no conversations in its captures"
    made = 0
    for conv in convs:
        # Each split replays the conversation: a large one (over 4 KiB) gets its
        # first 256 offsets and 32 drawn after, to keep this test to seconds.
        big = conv.size > BIG
        made += harness.check_conversation(factory, conv, exhaustive=256 if big else
                                           harness.EXHAUSTIVE, sample=32 if big else
                                           harness.SAMPLE)
    # Captures that make no transactions would make every comparison above vacuous.
    assert made > 0


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_fuzz_scripts_seeded_by_the_captures_replay_them(name):
    # encode() is faithful: the script of a capture gives the capture's transactions.
    factory = PARSERS[name][0]
    for conv in conversations(name):
        _, _, whole = harness.run(factory, conv.chunks, datagrams=conv.datagrams)
        assert harness.drive(factory, harness.encode(conv)) == len(whole), conv.name


@st.composite
def scripts(draw, name: str) -> bytes:
    """Random scripts, and capture scripts with a few byte-level mutations."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=2048))
    base = draw(st.sampled_from(seeds(name)))
    buf = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        if not buf:
            break
        pos = draw(st.integers(0, len(buf) - 1))
        how = draw(st.sampled_from(("set", "insert", "delete", "truncate")))
        if how == "set":
            buf[pos] = draw(st.integers(0, 255))
        elif how == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif how == "delete":
            del buf[pos:pos + draw(st.integers(1, 16))]
        else:
            del buf[pos:]
    return bytes(buf)


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_fuzz_nothing_escapes(name):
    factory = PARSERS[name][0]

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(scripts(name))
    def one(script):
        harness.drive(factory, script)

    one()


def test_the_harness_catches_a_parser_that_depends_on_segmentation():
    # A parser that emits one transaction per receive_data call: feeding it whole and one
    # byte at a time differ, and the harness must say so.
    class PerCall:
        def __init__(self):
            real = Http1Parser()
            self.state, self._out = real.state, []

        def receive_data(self, direction, data, ts_ns):
            from sensor.l7.base import Transaction
            self._out.append(Transaction(ts_ns, len(data)))

        def receive_eof(self, direction, ts_ns):
            pass

        def next_event(self):
            from sensor.l7.base import NEED_DATA
            return self._out.pop(0) if self._out else NEED_DATA

    conv = conversations("http1")[0]
    with pytest.raises(AssertionError, match="one byte at a time"):
        harness.check_conversation(PerCall, conv)


def test_the_fuzz_command_knows_every_parser():
    assert set(PARSER_NAMES) == set(PARSERS)


# atheris instruments the sensor modules in each parser's child (seconds apiece): one
# parser is enough to show the command works.
@pytest.mark.parametrize(("engine", "target", "names"), [
    ("mutate", "all", PARSER_NAMES), ("atheris", "dns", ("dns",))])
def test_fuzz_command_short_run(engine, target, names, tmp_path):
    if engine == "atheris":
        pytest.importorskip("atheris")
    res = subprocess.run([sys.executable, "-m", "tests.fuzz", target, "--execs", "300",
                          "--engine", engine, "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == list(names)
    assert all(" 300 executions in " in line and "nothing escaped" in line
               for line in lines), lines
