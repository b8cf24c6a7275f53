"""ClickHouseStorage's connection over chDB, the ClickHouse engine in-process (a current
release), so the modern DDL (LowCardinality, IPv6, Bool, codecs, TTL) runs in tests
without a modern server. Same SQL as over the native protocol; rows travel as JSON."""

from __future__ import annotations

import json

VERSION_SQL = "SELECT version()"


class ChdbConn:
    def __init__(self, session, database: str) -> None:
        self._s = session
        self.database = database
        self.where = f"chdb:{database}"
        self._raw(f"CREATE DATABASE IF NOT EXISTS {database}")
        self._raw("SET output_format_json_quote_64bit_integers = 0")
        major, minor = self._raw(VERSION_SQL, "JSONCompact")["data"][0][0].split(".")[:2]
        self.version = (int(major), int(minor))

    def _raw(self, sql: str, fmt: str = "CSV"):
        out = self._s.query(sql, fmt)
        return json.loads(out.bytes()) if fmt.startswith("JSON") and out.bytes() else out

    def _use(self) -> None:
        # One session for every test and every store: each statement names its database.
        self._raw(f"USE {self.database}")

    def clone(self) -> "ChdbConn":
        return self

    def execute(self, sql: str, settings: dict | None = None) -> list[tuple]:
        return list(self.stream(sql, settings))

    def stream(self, sql: str, settings: dict | None = None, with_types: bool = False):
        self._use()
        if settings:
            sql = sql.rstrip().rstrip(";") + " SETTINGS " + ", ".join(
                f"{k} = {v}" for k, v in settings.items())
        result = self._raw(sql, "JSONCompact")
        if not result:
            return iter([])
        rows = [tuple(r) for r in result["data"]]
        if with_types:
            return iter([[(m["name"], m["type"]) for m in result["meta"]], *rows])
        return iter(rows)

    def insert(self, table: str, columns: list[str], data: list[list],
               settings: dict | None = None) -> None:
        self._use()
        lines = "\n".join(json.dumps(dict(zip(columns, values))) for values in zip(*data))
        self._raw(f"INSERT INTO {table} FORMAT JSONEachRow\n{lines}")

    def interrupt(self) -> None:
        pass   # queries run on the caller's thread, to the end

    def close(self) -> None:
        pass   # the session outlives every store on it
