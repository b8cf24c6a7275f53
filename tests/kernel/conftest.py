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


@contextlib.contextmanager
def attached(netns: str, iface: str, prog_fd: int, **options):
    """Runs the block with prog_fd attached to iface in netns (attach.attach's options);
    yields the Attachment. Detaches inside netns too: a clsact filter is removed over
    netlink, which works in the caller's namespace."""
    from sensor.kernel import attach

    with in_netns(netns):
        att = attach.attach(iface, prog_fd, **options)
    try:
        yield att
    finally:
        with in_netns(netns):
            attach.detach(att)


def meter_hooks(netns: str, iface: str) -> list[str]:
    """The hooks of iface in netns that run the flow meter (tcx or clsact)."""
    from sensor.kernel import attach

    with in_netns(netns):
        return attach.attached_hooks(iface)


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
