"""Fixtures the live tests share."""

from __future__ import annotations

import pytest

from tests.export.collector_proc import CollectorProcess


@pytest.fixture
def collector(tmp_path):
    """A real collector process on a free port, storing under tmp_path/data."""
    proc = CollectorProcess(tmp_path / "data").start()
    try:
        yield proc
    finally:
        proc.stop()
