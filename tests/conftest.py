"""Shared test plumbing.

Tests that need root and a BPF-capable kernel carry the `bpf` marker. Without those they
skip with the reason; with LOUPE_REQUIRE_BPF=1 (set by .ci/run) the skip becomes a failure,
so CI cannot go green without running them.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "corpus"


@functools.cache
def bpf_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (CAP_BPF, CAP_NET_ADMIN)"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc is not importable: install python3-bpfcc (make install)"
    build = Path("/lib/modules") / platform.release() / "build" / "include"
    if not build.exists():
        return f"kernel headers missing at {build.parent}: run make install"
    return None


def pytest_runtest_setup(item):
    if item.get_closest_marker("bpf") is None:
        return
    reason = bpf_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("LOUPE_REQUIRE_BPF") == "1":
        pytest.fail(f"LOUPE_REQUIRE_BPF=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def corpus() -> Path:
    """The shared third-party corpus (../shared/corpus), read in place, never copied."""
    if not CORPUS.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"shared corpus not found at {CORPUS}", pytrace=False)
        pytest.skip(f"shared corpus not found at {CORPUS}")
    return CORPUS
