"""Schema migration: a store made by an older Loupe gets the columns added since.

When the collector opens a store, each engine lists the columns its tables have and hands
them here with the columns collector/schema.py wants (in the engine's own type names).
`plan` compares the two:
- a wanted column the table lacks is added (ALTER TABLE ... ADD COLUMN, with the default
  of `default_value`), and the engine logs one line for it; the rows already stored keep
  every value and read the default in the new column;
- a column present under another type is refused with one line naming the table, the
  column and what to do: Loupe never rewrites or drops stored data to make it fit;
- a column Loupe does not know (a newer Loupe's store, or one an operator added) is
  refused the same way: inserts would have no value for it.

Columns are added at the end of a table, so an old table's column order differs from a
new one's; every engine inserts by column name (DuckDB reorders the Arrow columns to the
table's order), never by position.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow as pa

from sensor.errors import StorageError

log = logging.getLogger("collector.storage")


@dataclass(frozen=True, slots=True)
class Added:
    table: str
    column: str
    type: str


def plan(where: str, table: str, have: dict[str, str], want: list[tuple[str, str]]) -> list[Added]:
    """The columns of `want` (name, engine type) that `have` (name -> engine type) lacks,
    in `want`'s order; StorageError for a column of another type or one Loupe lacks."""
    wanted = dict(want)
    for name, kind in have.items():
        members = [f"{n} {t}" for n, t in want if n.startswith(name + ".")]
        if name not in wanted and members:
            # ClickHouse: a Nested column is its member arrays (l7_summary.key, ...).
            wanted[name] = f"Nested: {', '.join(members)}"
        if name not in wanted:
            raise StorageError(
                f"{where}: table {table} has a column {name} ({kind}) that this Loupe does "
                "not know (made by a newer version?): run that version, or point "
                "--data-dir / [storage] at another store")
        if _norm(kind) != _norm(wanted[name]):
            raise StorageError(
                f"{where}: table {table} column {name} is {kind}, this Loupe stores "
                f"{wanted[name]}: export the table (loupe export) and move the store "
                "aside, or ALTER the column yourself; Loupe does not rewrite stored data")
    return [Added(table, name, kind) for name, kind in want if name not in have]


def _norm(type_text: str) -> str:
    return type_text.replace(" ", "").lower()


def logged(where: str, added: Added) -> None:
    log.info("%s: added column %s.%s (%s) to the store", where, added.table, added.column,
             added.type)


def default_value(table: str, column: str, arrow_type: pa.DataType):
    """What rows stored before a column existed read in it: the value a record without
    the field has (0, "", false, empty), except an L7 event's `source`, which older
    senders left empty and which means "wire" (sensor/export/wire.py)."""
    if column == "source" and table not in ("lost", "alerts"):
        return "wire"
    if pa.types.is_string(arrow_type):
        return ""
    if pa.types.is_boolean(arrow_type):
        return False
    if pa.types.is_integer(arrow_type):
        return 0
    return None   # lists and maps: the engine's empty value
