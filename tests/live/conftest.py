"""Fixtures the live tests share."""

from __future__ import annotations

import pytest

from tests.export.collector_proc import CollectorProcess
from tests.live.rig import SharedTlsSensor


@pytest.fixture
def collector(tmp_path):
    """A real collector process on a free port, storing under tmp_path/data."""
    proc = CollectorProcess(tmp_path / "data").start()
    try:
        yield proc
    finally:
        proc.stop()


_TLS = "tls_shared"
_tls_holder: list[SharedTlsSensor] = []


@pytest.fixture(scope="session")
def _tls_shared_holder(tmp_path_factory):
    holder = SharedTlsSensor(tmp_path_factory.mktemp("tlsshared"))
    _tls_holder.append(holder)
    try:
        yield holder
    finally:
        _tls_holder.remove(holder)
        holder.close()


@pytest.fixture
def tls_shared(_tls_shared_holder) -> SharedTlsSensor:
    """The TLS plaintext sensor shared across modules (rig.SharedTlsSensor), running."""
    return _tls_shared_holder.get()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """Stops the shared TLS plaintext sensor after the last test that uses it, not at the
    end of the session (its probes see every process on the host); a bad exit is this
    test's teardown error."""
    if _TLS not in item.fixturenames or not _tls_holder:
        return
    items = item.session.items
    later = items[items.index(item) + 1:] if item in items else []
    if not any(_TLS in it.fixturenames for it in later):
        _tls_holder[0].close()


def pytest_collection_modifyitems(session, config, items):
    """The tests on the shared TLS plaintext sensor run one after another, from where the
    first of them is: the sensor then lives only as long as they need it, and no other
    test's processes (a Go toolchain building, other sensors) run under its probes."""
    users = [it for it in items if _TLS in it.fixturenames]
    if len(users) < 2:
        return
    first = items.index(users[0])
    rest = [it for it in items if _TLS not in it.fixturenames]
    items[:] = rest[:first] + users + rest[first:]
