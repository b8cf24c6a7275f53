"""Logging: one line per event, syslog priority prefixes for journald, detection of the
journal stream by device and inode as systemd.exec(5) describes."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

import pytest

from sensor.logs import OneLineFormatter, journal_stream_matches, setup_logging, syslog_priority


@pytest.fixture
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def test_priorities():
    assert [syslog_priority(level) for level in
            (logging.DEBUG, logging.INFO, 25, logging.WARNING, logging.ERROR, logging.CRITICAL)
            ] == [7, 6, 6, 4, 3, 2]


def test_journal_lines_carry_priority_and_stay_one_line(restore_root_logger):
    out = io.StringIO()
    setup_logging(journal=True, verbose=True, stream=out)
    log = logging.getLogger("loupe.test")
    log.debug("d")
    log.info("attached to %s", "lo")
    log.warning("two\nlines")
    log.error("e")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    lines = out.getvalue().splitlines()
    assert lines[:4] == ["<7>loupe.test: d", "<6>loupe.test: attached to lo",
                         "<4>loupe.test: two\\nlines", "<3>loupe.test: e"]
    assert len(lines) == 5
    assert lines[4].startswith("<3>loupe.test: failed\\nTraceback (most recent call last):")
    assert lines[4].endswith("ValueError: boom")


def test_plain_format_and_level(restore_root_logger):
    out = io.StringIO()
    setup_logging(journal=False, stream=out)
    logging.getLogger("x").debug("hidden")
    logging.getLogger("x").info("shown")
    assert out.getvalue() == "INFO x: shown\n"


def test_journal_detection_by_device_and_inode(tmp_path):
    path = tmp_path / "stream"
    with path.open("w") as stream:
        st = os.fstat(stream.fileno())
        assert journal_stream_matches(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        # Inherited by a process whose stderr was redirected elsewhere: not the journal.
        assert not journal_stream_matches(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not journal_stream_matches(stream, {"JOURNAL_STREAM": "garbage"})
        assert not journal_stream_matches(stream, {})
    assert not journal_stream_matches(io.StringIO(), {"JOURNAL_STREAM": "1:2"})


def test_auto_detection_in_a_real_process(tmp_path):
    # A child whose stderr is a file, and JOURNAL_STREAM naming that file: prefixed lines.
    path = tmp_path / "stderr"
    code = ("import logging; from sensor.logs import setup_logging; setup_logging(); "
            "logging.getLogger('loupe.child').warning('hello')")
    with path.open("w") as err:
        st = os.fstat(err.fileno())
        for env_value, expected in ((f"{st.st_dev}:{st.st_ino}", "<4>loupe.child: hello\n"),
                                    ("", "WARNING loupe.child: hello\n")):
            err.seek(0)
            err.truncate()
            env = {**os.environ, "JOURNAL_STREAM": env_value}
            subprocess.run([sys.executable, "-c", code], stderr=err, env=env, check=True,
                           timeout=30)
            assert path.read_text() == expected


def test_formatter_escapes_carriage_returns():
    record = logging.LogRecord("n", logging.INFO, __file__, 1, "a\r\nb", None, None)
    assert OneLineFormatter(journal=True).format(record) == "<6>n: a\\r\\nb"
