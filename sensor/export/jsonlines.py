"""The JSON lines sink: one record per line in the shape of sensor/export/jsonfmt.py,
every kind in one stream. Apart from the table sinks (sensor/export/sinks.py, which
re-exports it) because those need Arrow: the live sensor writes JSON lines only, and
importing pyarrow would cost it tens of MiB of memory for nothing (docs/sensor.md,
"Idle cost").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

from sensor import model
from sensor.errors import StorageError
from sensor.export import jsonfmt

__all__ = ["JsonLinesSink", "storage_error"]


def storage_error(path: Path, exc: OSError) -> StorageError:
    return StorageError(f"cannot write {path}: {exc.strerror or exc}; check the directory "
                        "exists and has free space")


class JsonLinesSink:
    """JSON lines to a file, or to stdout when path is "-"."""

    def __init__(self, path: str | Path = "-", *, stream: TextIO | None = None) -> None:
        self.path = str(path)
        self.written = 0
        if stream is not None:
            self._out, self._owned = stream, False
        elif self.path == "-":
            self._out, self._owned = sys.stdout, False
        else:
            try:
                self._out, self._owned = open(self.path, "w", encoding="utf-8"), True
            except OSError as exc:
                raise storage_error(Path(self.path), exc) from None

    def write(self, record: model.Record) -> None:
        self._out.write(json.dumps(jsonfmt.to_dict(record), separators=(",", ":")) + "\n")
        self.written += 1

    def flush(self) -> None:
        self._out.flush()

    def close(self) -> None:
        self.flush()
        if self._owned:
            self._out.close()
