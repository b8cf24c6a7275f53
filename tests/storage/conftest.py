"""The backends of the contract suite. Each `backend` fixture value opens stores over one
and the same underlying data: a DuckDB directory (one store at a time: its file lock), a
real clickhouse-server process, two of them as a cluster of two shards under Distributed
tables, or a chDB database (the modern DDL)."""

from __future__ import annotations

import itertools

import pytest

from collector.storage import open_storage
from sensor.config import ClickHouseConfig, StorageConfig

from .clickhouse_proc import ClickHouseServer, free_port, remote_servers

_databases = itertools.count(1)


@pytest.fixture(scope="session")
def clickhouse_server(tmp_path_factory):
    server = ClickHouseServer(tmp_path_factory.mktemp("clickhouse"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def clickhouse_cluster(tmp_path_factory):
    """Two servers, one shard each, both knowing the cluster `loupe` of the two."""
    ports = [free_port(), free_port()]
    extra = remote_servers("loupe", ports)
    base = tmp_path_factory.mktemp("cluster")
    servers = []
    try:
        for i, port in enumerate(ports):
            servers.append(ClickHouseServer(base / f"shard{i + 1}", extra, port))
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="session")
def chdb_session(tmp_path_factory):
    chdb = pytest.importorskip("chdb.session")
    session = chdb.Session(str(tmp_path_factory.mktemp("chdb")))
    yield session
    session.close()


class Backend:
    """Opens stores of one backend over the same data; closes them all at the end."""

    def __init__(self, name: str, opener) -> None:
        self.name = name
        self._opener = opener
        self.opened = []
        # Can two stores be open at once (two collectors)? DuckDB: one writer per file.
        self.shared = name != "duckdb"

    def open(self):
        store = self._opener()
        self.opened.append(store)
        return store

    def close_all(self) -> None:
        for store in self.opened:
            store.close()


@pytest.fixture(params=["duckdb", "clickhouse", "cluster", "chdb"])
def backend(request, tmp_path):
    name = request.param
    if name == "duckdb":
        opener = lambda: open_storage(StorageConfig(), tmp_path / "data", sandbox=True)  # noqa: E731
    elif name == "clickhouse":
        server = request.getfixturevalue("clickhouse_server")
        config = StorageConfig(backend="clickhouse", clickhouse=ClickHouseConfig(
            port=server.port, database=f"t{next(_databases)}"))
        opener = lambda: open_storage(config, tmp_path)  # noqa: E731
    elif name == "cluster":
        servers = request.getfixturevalue("clickhouse_cluster")
        database = f"t{next(_databases)}"
        stores = iter(range(10**6))
        # Each store (collector) connects to the next server in turn.
        opener = lambda: open_storage(StorageConfig(  # noqa: E731
            backend="clickhouse", clickhouse=ClickHouseConfig(
                port=servers[next(stores) % 2].port, database=database, cluster="loupe")),
            tmp_path)
    else:
        from collector.storage.clickhouse import ClickHouseStorage

        from .chdb_conn import ChdbConn

        session = request.getfixturevalue("chdb_session")
        database = f"t{next(_databases)}"
        opener = lambda: ClickHouseStorage(ChdbConn(session, database))  # noqa: E731
    b = Backend(name, opener)
    yield b
    b.close_all()
