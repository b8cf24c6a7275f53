"""The ClickHouse servers of the scale-out tests are the storage tests' own (two real
clickhouse-server processes as a cluster of two shards)."""

from tests.storage.conftest import clickhouse_cluster  # noqa: F401 (a fixture)
