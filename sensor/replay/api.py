"""Replay from Python: capture files in, Loupe records (or pandas DataFrames) out.

    from sensor.replay import replay, replay_records, to_dataframe
    for record in replay("capture.pcapng"):           # streams: memory stays flat
        ...
    frames = to_dataframe("capture.pcap")             # {"flow": DataFrame, "http": ...}

The records are the same the CLI writes and the live sensor sends (sensor/model.py);
DataFrame columns are the collector's and the Parquet files' (sensor/export/sinks.py), so
a notebook, a Parquet export and a collector query agree column for column.
"""

from __future__ import annotations

import os
from collections import deque
from itertools import islice
from typing import Iterable, Iterator, Sequence, Union

from sensor.engine.pipeline import Pipeline, PipelineConfig, Summary
from sensor.l7 import registry
from sensor.model import Record, record_kind
from sensor.errors import ConfigError
from sensor.replay.reader import STDIN, CaptureReader, is_stream

__all__ = ["replay", "replay_records", "to_dataframe", "RECORD_KINDS"]

PathLike = Union[str, "os.PathLike[str]"]
# Flows, every registered L7 kind (sensor/l7/registry.py), loss.
RECORD_KINDS = ("flow", *registry.kind_names(), "lost")

# Packets fed between hand-outs of records: small enough that a consumer sees records
# early and the buffer of made-but-not-yet-yielded records stays small, large enough that
# the generator's overhead vanishes against the per-packet work.
_SLICE = 8192


class _Buffer:
    """RecordSink collecting records for the generator to hand out."""

    def __init__(self) -> None:
        self.records: deque[Record] = deque()

    def write(self, record: Record) -> None:
        self.records.append(record)

    def flush(self) -> None:
        """Records are handed out by the generator; nothing to flush."""

    def close(self) -> None:
        """Nothing held outside the deque."""


def _paths(paths: PathLike | Sequence[PathLike]) -> list[PathLike]:
    if isinstance(paths, (str, os.PathLike)):
        return [paths]
    return list(paths)


def replay(paths: PathLike | Sequence[PathLike], *, l7: bool = True, sensor_id: str = "",
           config: PipelineConfig | None = None,
           summary: list[Summary] | None = None) -> Iterator[Record]:
    """Every record of the capture files (one stream, in order), as a generator.

    Flow, L7Event and, at the end, LostEvent records (sensor/model.py). `config`
    overrides `l7` and `sensor_id` when given. Pass a list as `summary` to receive the
    run's Summary when the generator is exhausted. Raises CaptureFileError (before any
    record) for a file that is not a readable capture.
    """
    files = _paths(paths)
    # Every input is checked before anything runs. Stdin ("-"), pipes and FIFOs can be read
    # only once: those readers stay open for the run instead of being opened anew.
    if [os.fspath(p) for p in files].count(STDIN) > 1:
        raise ConfigError("'-' (stdin) can be given only once")
    kept: dict[int, CaptureReader] = {}
    try:
        for index, path in enumerate(files):
            reader = CaptureReader(path)
            if is_stream(path):
                kept[index] = reader
            else:
                reader.close()
    except BaseException:
        for reader in kept.values():
            reader.close()
        raise
    try:
        yield from _run(files, kept, config if config is not None
                        else PipelineConfig(l7=l7, sensor_id=sensor_id), summary)
    finally:
        for reader in kept.values():
            reader.close()


def _run(files, kept: dict[int, CaptureReader], cfg: PipelineConfig,
         summary: list[Summary] | None) -> Iterator[Record]:
    buffer = _Buffer()
    pipeline = Pipeline(buffer, cfg)
    out = buffer.records
    for index, path in enumerate(files):
        reader = kept.pop(index) if index in kept else CaptureReader(path)
        with reader:
            packets = iter(reader)
            while True:
                chunk = list(islice(packets, _SLICE))
                if not chunk:
                    break
                pipeline.feed(chunk)
                while out:
                    yield out.popleft()
            pipeline.reader_stats.append(reader.stats)
    result = pipeline.close()
    while out:
        yield out.popleft()
    if summary is not None:
        summary.append(result)


def replay_records(paths: PathLike | Sequence[PathLike], **options) -> list[Record]:
    """All records of replay(...) as a list."""
    return list(replay(paths, **options))


def to_dataframe(source: PathLike | Sequence[PathLike] | Iterable[Record], **options):
    """pandas DataFrames per record kind (RECORD_KINDS: "flow", "http", ..., "lost") ->
    DataFrame with the collector's columns (nested values flattened as in Parquet).
    `source` is capture file path(s), or records already made (e.g. replay_records)."""
    import pandas as pd

    from sensor.export.sinks import flatten, table_schema
    from sensor.export.tables import kind_tables

    if isinstance(source, (str, os.PathLike)) or (
            isinstance(source, Sequence) and source
            and isinstance(source[0], (str, os.PathLike))):
        records: Iterable[Record] = replay(source, **options)
    else:
        records = source
    rows: dict[str, list[dict]] = {kind: [] for kind in RECORD_KINDS}
    for record in records:
        rows[record_kind(record)].append(flatten(record))
    frames = {}
    table_of = kind_tables()
    for kind, kind_rows in rows.items():
        columns = table_schema(table_of[kind]).names
        frames[kind] = pd.DataFrame(kind_rows, columns=columns)
    return frames
