"""The output flags every record-writing command shares (docs/export.md, "Flags"):

  -o/--output FILE   where records go; "-" is stdout (the default)
  --format FMT       table | json | eve | zeek | csv | parquet, the subset a command writes
  --fields a,b,c     column selection, as zeek-cut does (table, csv, json, eve)

Without --format, a file's suffix decides (.jsonl/.json json, .parquet, .csv, .log zeek),
and stdout gets the table on a terminal and JSON lines otherwise (so a pipe gets the
machine format). A suffix that contradicts --format is refused, in one line.

Old spellings stay as hidden aliases: a format name given to -o (`-o json`, `--output
jsonl`, `--output table`) means --format, and `jsonl` means `json`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from sensor.errors import ConfigError

ALL_FORMATS = ("table", "json", "eve", "zeek", "csv", "parquet")
ALIASES = {"jsonl": "json", "ndjson": "json"}
# suffix -> the formats a file of that name can hold (the first is the default).
SUFFIXES = {".jsonl": ("json", "eve"), ".json": ("json", "eve"), ".ndjson": ("json", "eve"),
            ".parquet": ("parquet",), ".csv": ("csv",), ".log": ("zeek",), ".tsv": ("zeek",),
            ".txt": ("table",)}


@dataclass(frozen=True)
class Output:
    path: str              # "-" is stdout
    fmt: str
    fields: list[str] | None = None

    @property
    def to_stdout(self) -> bool:
        return self.path == "-"


def add_output_arguments(p: argparse.ArgumentParser, formats: tuple[str, ...], *,
                         fields: bool = True, output_help: str | None = None) -> None:
    p.add_argument("-o", "--output", metavar="FILE",
                   help=output_help or "write records to FILE (- = stdout, the default); "
                        "its suffix picks the format")
    default = ("table on a terminal, else json" if "table" in formats else "json")
    p.add_argument("--format", metavar="FMT", type=str.lower,
                   help=f"{' | '.join(formats)} (default: {default}, or FILE's suffix)")
    if fields:
        p.add_argument("--fields", metavar="A,B,C",
                       help="only these fields, in this order (as zeek-cut; dotted names "
                            "reach into detail: detail.status)")


def _canonical(name: str) -> str:
    return ALIASES.get(name, name)


def resolve(args, formats: tuple[str, ...], *, stdout: TextIO | None = None) -> Output:
    """The Output these flags ask for, or ConfigError naming what to change."""
    stdout = stdout or sys.stdout
    path = getattr(args, "output", None)
    fmt = getattr(args, "format", None)
    fmt = _canonical(fmt) if fmt else None
    if fmt is not None and fmt not in formats:
        raise ConfigError(f"--format {fmt} is not one this command writes: use one of "
                          f"{', '.join(formats)}")
    if path is not None and _canonical(path.lower()) in ALL_FORMATS and not Path(path).suffix:
        # The old spelling, `-o json`: a format name where a file is meant.
        old = _canonical(path.lower())
        if fmt is not None and fmt != old:
            raise ConfigError(f"-o {path} and --format {fmt} disagree; give one of them")
        fmt, path = old, None
    if path in (None, "-"):
        path = "-"
        if fmt is None:
            fmt = "table" if "table" in formats and _isatty(stdout) else "json"
    else:
        suffix = Path(path).suffix.lower()
        fits = SUFFIXES.get(suffix)
        if fmt is None:
            if fits is None:
                raise ConfigError(f"cannot tell the format of {path!r} from its suffix: name "
                                  "it .jsonl, .parquet, .csv or .log, or give --format")
            fmt = fits[0]
        elif fits is not None and fmt not in fits:
            raise ConfigError(f"--format {fmt} does not fit the file name {path!r} (a "
                              f"{suffix} file holds {' or '.join(fits)}); rename the file "
                              "or change --format")
    if fmt not in formats:
        raise ConfigError(f"this command cannot write {fmt} ({path}): use one of "
                          f"{', '.join(formats)}")
    if fmt == "parquet" and path == "-":
        raise ConfigError("parquet cannot go to stdout: give -o FILE.parquet")
    fields = None
    if getattr(args, "fields", None):
        fields = [f.strip() for f in args.fields.split(",") if f.strip()]
        if fmt in ("zeek", "parquet"):
            raise ConfigError(f"--fields does not apply to {fmt}: "
                              + ("pipe it to zeek-cut" if fmt == "zeek" else "select in SQL"))
    return Output(path, fmt, fields)


def _isatty(stream: TextIO) -> bool:
    return hasattr(stream, "isatty") and stream.isatty()


def open_text(out: Output, stdout: TextIO | None = None):
    """(stream, owned): the text stream to write to."""
    if out.to_stdout:
        return (stdout or sys.stdout), False
    try:
        return open(out.path, "w", encoding="utf-8"), True
    except OSError as exc:
        raise ConfigError(f"cannot write {out.path}: {exc.strerror or exc}") from None


class RecordOut:
    """A record sink (write/flush/close) for table, json, eve or zeek to a stream."""

    def __init__(self, out: Output, stdout: TextIO | None = None) -> None:
        from sensor.export.formats import RecordWriter
        from sensor.export.table import TableWriter

        self.stream, self._owned = open_text(out, stdout)
        if out.fmt == "table":
            self.writer = TableWriter(self.stream, fields=out.fields)
        else:
            self.writer = RecordWriter(self.stream, out.fmt, out.fields)

    @property
    def written(self) -> int:
        return self.writer.written

    def prime(self, records) -> None:
        """Let the table size its columns for records known in advance (no-op otherwise)."""
        if hasattr(self.writer, "prime"):
            self.writer.prime(records)

    def write(self, record) -> None:
        self.writer.write(record)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
        if self._owned:
            self.stream.close()
