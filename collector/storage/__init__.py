"""The storage factory: the collector opens its store here, never through a backend class.

`[storage] backend` picks the engine: "duckdb" (the embedded default, one file in
data_dir) or "clickhouse" (a server or cluster several collectors share). Each backend
owns its table definitions, made from the registry-derived columns in collector/schema.py,
and implements collector/storage/base.py's Storage.
"""

from __future__ import annotations

from pathlib import Path

from collector.storage.base import Storage
from sensor.config import StorageConfig
from sensor.errors import StorageError


def open_storage(config: StorageConfig, data_dir: Path, *, read_only: bool = False,
                 sandbox: bool = False) -> Storage:
    """The configured store. read_only opens an existing DuckDB file without writing
    (`loupe export --data-dir`); sandbox turns off SQL's access to the host's files
    (DuckDB) for a store that answers analysts' queries. With ClickHouse the records
    live on the server, and analysts' SQL always runs there with readonly=1; data_dir is
    still made, for the collector's local state."""
    if config.backend == "clickhouse":
        from collector.storage.clickhouse import ClickHouseStorage, native

        if not read_only:
            _make_dir(data_dir)   # the collector's local state (inventory) lives there
        return ClickHouseStorage(native(config.clickhouse), cluster=config.clickhouse.cluster)
    from collector.storage.duckdb import DuckDBStorage

    return DuckDBStorage(data_dir, read_only=read_only, sandbox=sandbox)


def _make_dir(data_dir: Path) -> None:
    try:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create the data directory {data_dir}: {exc.strerror}; "
                           "pick another with --data-dir") from None
