"""Fixtures for the flow meter tests: a compiled program (once per module, compiling
takes a second or two) and a way to attach it inside a test namespace."""

from __future__ import annotations

import contextlib
import ctypes
import os

import pytest

_CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def in_netns(name: str):
    """Runs the block with this thread in network namespace name (netlink sockets
    opened inside belong to it), then returns to the original namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    original = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        yield
    finally:
        libc.setns(original, _CLONE_NEWNET)
        os.close(original)
        os.close(target)


@pytest.fixture
def load_program():
    """load_program(**LoadOptions) -> LoadedProgram, closed after the test."""
    from sensor.kernel import loader

    loaded = []

    def _load(**options):
        prog = loader.load(loader.LoadOptions(**options))
        loaded.append(prog)
        return prog

    yield _load
    for prog in loaded:
        prog.close()
