"""Service statistics: per series (an endpoint, a service or a service-map edge) request
and error counts and a latency sketch, in time cells at three resolutions.

The latency sketch is DDSketch (PyPI `ddsketch`, DataDog's): relative accuracy ALPHA, so
any quantile it returns is within ALPHA (1 %) of the value of that rank among the values
added. Two sketches with the same mapping merge by adding their bins, so the merge of the
sketches of two sensors (or of six 10 s cells) holds exactly the bins of one sketch that
saw all those values: merged quantiles equal the single sketch's, bin for bin (and so
are within ALPHA of the true ones). Every other statistic is a sum. Order never matters.

Bounds (docs/stats.md): MAX_SERIES series and MAX_CELLS cells in all; past either, the
event's share that would need a new one is counted in `dropped`, never kept.
"""

from __future__ import annotations

import base64
import threading
import zlib
from dataclasses import dataclass

from ddsketch.ddsketch import BaseDDSketch
from ddsketch.mapping import LogarithmicMapping
from ddsketch.pb.ddsketch_pb2 import DDSketch as SketchProto
from ddsketch.pb.proto import DDSketchProto, KeyMappingProto, StoreProto
from ddsketch.store import CollapsingLowestDenseStore, DenseStore

# 1 %: p50 of a 10 ms endpoint is read as 9.9-10.1 ms; finer costs bins (memory) for a
# precision no latency question needs.
ALPHA = 0.01
# Bins per sketch: 1024 at 1 % span a factor e^20 (1 us .. 8 min in ns); values below
# the lowest bin fold into it (a collapse only ever merges the fastest requests).
BIN_LIMIT = 1024
_MAPPING = LogarithmicMapping(ALPHA)

# (name, width ns, cells kept): 10 s for 1 h, 1 min for 1 day, 1 h for 30 days.
RESOLUTIONS = (("10s", 10 * 10**9, 360), ("1m", 60 * 10**9, 1440), ("1h", 3600 * 10**9, 720))
RES_INDEX = {name: i for i, (name, _, _) in enumerate(RESOLUTIONS)}
# Series: endpoints, services and edges together. A series costs ~0.5 KiB plus its cells;
# its current cells (one per resolution) are live sketches, ~3 KiB each at worst.
MAX_SERIES = 10_000
# Cells. Past the current one a cell is frozen (compressed protobuf): ~0.4-0.6 KiB
# measured (bench_stats). A series busy for all its retention holds 2,520 cells; the
# budget fits ~80 of those or many more sparse ones. Worst case, all budgets full:
# ~90 MiB of live cells + ~120 MiB frozen. Past it, an event's share in a new cell is
# dropped and counted.
MAX_CELLS = 200_000
# A group of at most this many latencies (one key, one 10 s cell, one batch) is added
# value by value; a larger one is sketched once and merged into each resolution's cell.
SMALL_GROUP = 8


def new_sketch() -> BaseDDSketch:
    return BaseDDSketch(mapping=_MAPPING, store=CollapsingLowestDenseStore(BIN_LIMIT, 16),
                        negative_store=CollapsingLowestDenseStore(BIN_LIMIT, 16), zero_count=0.0)


def sketch_bytes(sketch: BaseDDSketch) -> bytes:
    """DDSketch's own protobuf, zlib-compressed: the dense stores hold runs of empty bins
    (a one-value sketch is ~1 KiB raw, ~40 B compressed)."""
    return zlib.compress(DDSketchProto.to_proto(sketch).SerializeToString(), 1)


def sketch_from(raw: bytes) -> BaseDDSketch:
    """A stored sketch, with the bounded stores new_sketch() makes (DDSketchProto gives
    unbounded ones; min, max and sum are not in the protobuf and quantiles need none)."""
    msg = SketchProto()
    msg.ParseFromString(zlib.decompress(raw))
    if KeyMappingProto.from_proto(msg.mapping).gamma != _MAPPING.gamma:
        raise ValueError("a stored sketch of another relative accuracy")

    def bounded(values) -> CollapsingLowestDenseStore:
        out = CollapsingLowestDenseStore(BIN_LIMIT, 16)
        dense = StoreProto.from_proto(values)
        if dense.count:
            DenseStore.copy(out, dense)   # the bins as stored; the limit holds from here on
        return out

    return BaseDDSketch(mapping=_MAPPING, store=bounded(msg.positiveValues),
                        negative_store=bounded(msg.negativeValues), zero_count=msg.zeroCount)


class Cell:
    """One series in one time cell: counts, and a latency sketch of the events that had
    a latency. A cell no longer current is frozen (its sketch kept as protobuf bytes,
    ~10x smaller than the live object); a late event thaws it."""

    __slots__ = ("requests", "errors_4xx", "errors_5xx", "_sketch", "_frozen")

    def __init__(self, requests: int = 0, errors_4xx: int = 0, errors_5xx: int = 0,
                 sketch: BaseDDSketch | None = None, frozen: bytes | None = None) -> None:
        self.requests = requests
        self.errors_4xx = errors_4xx
        self.errors_5xx = errors_5xx
        self._sketch = sketch     # live; None until a latency comes (or while frozen)
        self._frozen = frozen

    @property
    def latency(self) -> BaseDDSketch:
        """The live sketch, made or thawed on first use (for adding to it)."""
        if self._sketch is None:
            self._sketch = sketch_from(self._frozen) if self._frozen else new_sketch()
            self._frozen = None
        return self._sketch

    def read(self) -> BaseDDSketch | None:
        """The sketch for merging elsewhere, without thawing this cell; None if empty."""
        if self._frozen:
            return sketch_from(self._frozen)
        return self._sketch if self._sketch is not None and self._sketch.count else None

    def freeze(self) -> None:
        if self._sketch is not None:
            self._frozen = sketch_bytes(self._sketch) if self._sketch.count else None
            self._sketch = None

    def count(self, requests: int, errors_4xx: int, errors_5xx: int) -> None:
        self.requests += requests
        self.errors_4xx += errors_4xx
        self.errors_5xx += errors_5xx

    def merge(self, other: "Cell") -> None:
        self.count(other.requests, other.errors_4xx, other.errors_5xx)
        sketch = other.read()
        if sketch is not None:
            self.latency.merge(sketch)

    def to_list(self) -> list:
        raw = self._frozen or (sketch_bytes(self._sketch) if self.read() is not None else b"")
        return [self.requests, self.errors_4xx, self.errors_5xx, base64.b64encode(raw).decode()]

    @classmethod
    def from_list(cls, v: list) -> "Cell":
        return cls(v[0], v[1], v[2], frozen=base64.b64decode(v[3]) or None)


def summary(cell: Cell, seconds: float) -> dict:
    """What a caller reads of a (merged) cell over `seconds`."""
    sketch = cell.read()
    q = lambda p: round(sketch.get_quantile_value(p)) if sketch is not None else 0  # noqa: E731
    n = cell.requests
    return {"requests": n, "rate": round(n / seconds, 6) if seconds else 0.0,
            "errors_4xx": cell.errors_4xx, "errors_5xx": cell.errors_5xx,
            "error_rate_4xx": round(cell.errors_4xx / n, 6) if n else 0.0,
            "error_rate_5xx": round(cell.errors_5xx / n, 6) if n else 0.0,
            "latency_count": int(sketch.count) if sketch is not None else 0,
            "p50_ns": q(0.5), "p90_ns": q(0.9), "p99_ns": q(0.99)}


class Series:
    """A key's cells per resolution ({cell index: Cell}, sparse) and its totals."""

    __slots__ = ("rings", "total")

    def __init__(self) -> None:
        self.rings: list[dict[int, Cell]] = [{} for _ in RESOLUTIONS]
        self.total = Cell()   # counts since the series began (Prometheus counters, top-N)

    def to_dict(self) -> dict:
        return {"total": self.total.to_list(),
                "rings": [{str(i): c.to_list() for i, c in ring.items()} for ring in self.rings]}

    @classmethod
    def from_dict(cls, d: dict) -> "Series":
        s = cls()
        s.total = Cell.from_list(d["total"])
        s.rings = [{int(i): Cell.from_list(v) for i, v in ring.items()} for ring in d["rings"]]
        return s


class Bins:
    """A group's latencies (more than SMALL_GROUP of them: the group is sketched once, then
    merged) as DDSketch bin keys with their counts, keys in the order the group's values
    first reached them, and the values themselves in record order.

    Adding key k with weight w leaves a sketch exactly as w adds of a value of key k, and
    adding the keys in first-seen order grows a dense store through the same sequence of
    ranges as adding the values one by one (only a key outside the current range grows
    it, and that is always the key's first value): same bins, same layout, same counts.
    That holds while the store cannot collapse (its range past BIN_LIMIT), when the
    order of values decides which fold into the lowest bin; then the values are added
    one by one, as before. The sketch's sum (in no stored form, read by no view) may
    differ in its last bits."""

    __slots__ = ("keys", "counts", "values")

    def __init__(self, keys: list[int], counts: list[int], values: list[int]) -> None:
        self.keys = keys
        self.counts = counts
        self.values = values

    def __len__(self) -> int:
        return len(self.values)

    def add_to(self, sketch: BaseDDSketch) -> None:
        store = sketch._store
        lo, hi = min(self.keys), max(self.keys)
        if store.length():
            lo, hi = min(lo, store.min_key), max(hi, store.max_key)
        if store.is_collapsed or hi - lo + 1 > BIN_LIMIT:
            for v in self.values:
                sketch.add(v)
            return
        for k, w in zip(self.keys, self.counts):
            store.add(k, float(w))
        values = self.values
        sketch._count += float(len(values))
        sketch._sum += float(sum(values))
        low, high = min(values), max(values)
        if low < sketch._min:
            sketch._min = low
        if high > sketch._max:
            sketch._max = high


def _add_latencies(sketch: BaseDDSketch, latencies) -> None:
    if isinstance(latencies, Bins):
        latencies.add_to(sketch)
    else:
        for v in latencies:
            sketch.add(v)


@dataclass(frozen=True, slots=True)
class Event:
    """One L7 transaction's share of the statistics, for each series key it counts in."""

    keys: tuple
    ts_ns: int
    latency_ns: int        # 0: none measured (no response seen, or a kind without one)
    error: str = ""        # "", "4xx" or "5xx"


class Stats:
    """All series, by key. Thread-safe: the feed thread adds, readers merge copies."""

    def __init__(self, *, max_series: int = MAX_SERIES, max_cells: int = MAX_CELLS) -> None:
        self.max_series = max_series
        self.max_cells = max_cells
        self.series: dict[tuple, Series] = {}
        self.cells = 0
        self.dropped = 0        # event shares not kept: series or cell budget full
        self.newest = [0] * len(RESOLUTIONS)   # newest cell index seen, per resolution
        self.dirty: set[tuple] = set()
        self.lock = threading.Lock()

    def add_many(self, events) -> None:
        """Group a batch's events by (key, 10 s cell) and add each group to its cells at
        every resolution: value by value when small, else sketched once and merged (a
        merge costs bins, not values)."""
        groups: dict[tuple, list] = {}
        width0 = RESOLUTIONS[0][1]
        for ev in events:
            index0 = ev.ts_ns // width0
            for key in ev.keys:
                g = groups.get((key, index0))
                if g is None:
                    g = groups[(key, index0)] = [0, 0, 0, []]
                g[0] += 1
                if ev.error:
                    g[1 if ev.error == "4xx" else 2] += 1
                if ev.latency_ns > 0:
                    g[3].append(ev.latency_ns)
        with self.lock:
            for (key, index0), group in groups.items():
                self._add(key, index0 * width0, *group)

    def add_groups(self, groups) -> None:
        """add_many's groups made elsewhere (feed.groups, per distinct key): (key, 10 s
        cell index, requests, 4xx, 5xx, Bins or None), in the order add_many would meet
        them (the budgets and the retention horizon depend on it)."""
        width0 = RESOLUTIONS[0][1]
        with self.lock:
            for key, index0, requests, e4, e5, bins in groups:
                self._add(key, index0 * width0, requests, e4, e5, bins or [])

    def _add(self, key: tuple, start_ns: int, requests: int, e4: int, e5: int,
             latencies: list[int]) -> None:
        series = self.series.get(key)
        if series is None:
            if len(self.series) >= self.max_series:
                self.dropped += requests
                return
            series = self.series[key] = Series()
        series.total.count(requests, e4, e5)
        group = None
        if len(latencies) > SMALL_GROUP:
            group = new_sketch()
            _add_latencies(group, latencies)
        for r, (_, width, keep) in enumerate(RESOLUTIONS):
            index = start_ns // width
            self.newest[r] = max(self.newest[r], index)
            if index <= self.newest[r] - keep:
                continue   # older than this resolution keeps
            cell = series.rings[r].get(index)
            if cell is None:
                if self.cells >= self.max_cells:
                    self.dropped += requests
                    continue
                cell = series.rings[r][index] = Cell()
                self.cells += 1
            cell.count(requests, e4, e5)
            if group is not None:
                cell.latency.merge(group)
            elif latencies:
                _add_latencies(cell.latency, latencies)
        self.dirty.add(key)

    def prune(self) -> int:
        """Drop cells past their resolution's retention (counted from the newest cell
        seen, so replayed old traffic keeps its own hour) and freeze the cells before
        the newest; returns how many were dropped."""
        gone = 0
        with self.lock:
            for key, series in self.series.items():
                for r, (_, _, keep) in enumerate(RESOLUTIONS):
                    ring = series.rings[r]
                    for i, cell in ring.items():
                        if i < self.newest[r]:
                            cell.freeze()
                    old = [i for i in ring if i <= self.newest[r] - keep]
                    for i in old:
                        del ring[i]
                    if old:
                        gone += len(old)
                        self.dirty.add(key)
            self.cells -= gone
        return gone

    def merge_series(self, key: tuple, other: Series) -> None:
        """Merge a series from elsewhere (the store at start, a key a learned template
        covers) into `key`."""
        with self.lock:
            self._merge(key, other)

    def _merge(self, key: tuple, other: Series) -> None:
        have = self.series.get(key)
        if have is None:
            if len(self.series) >= self.max_series:
                self.dropped += other.total.requests
                return
            self.series[key] = other
            self.cells += sum(len(r) for r in other.rings)
        else:
            have.total.merge(other.total)
            for r, ring in enumerate(other.rings):
                for i, cell in ring.items():
                    if i in have.rings[r]:
                        have.rings[r][i].merge(cell)
                    else:
                        have.rings[r][i] = cell
                        self.cells += 1
        for r, ring in enumerate(other.rings):
            if ring:
                self.newest[r] = max(self.newest[r], max(ring))
        self.dirty.add(key)

    def rekey(self, mapping: dict[tuple, tuple]) -> list[tuple]:
        """Move series to new keys (merging those that meet); returns the old keys gone."""
        gone = []
        with self.lock:
            for old, new in mapping.items():
                if old == new or old not in self.series:
                    continue
                series = self.series.pop(old)
                self.cells -= sum(len(r) for r in series.rings)
                self.dirty.add(old)   # take_dirty reports it gone: its row goes
                self._merge(new, series)
                gone.append(old)
        return gone

    def window(self, resolution: str, last_ns: int, kinds: set[str]) -> tuple[dict, int, int]:
        """Each series of the kinds asked, merged over the cells of `resolution` in the
        last `last_ns` up to the newest cell: ({key: (Cell, seconds)}, start_ns, end_ns).
        `seconds` spans the series' first to last cell there: its rate is per second of
        that span, so a burst replayed into a day-long window still reads as a rate."""
        r = RES_INDEX[resolution]
        width = RESOLUTIONS[r][1]
        end = (self.newest[r] + 1) * width
        first = (end - last_ns) // width
        out: dict[tuple, tuple[Cell, float]] = {}
        with self.lock:
            for key, series in self.series.items():
                if key[0] not in kinds:
                    continue
                cells = [i for i in series.rings[r] if i >= first]
                if not cells:
                    continue
                merged = Cell()
                for i in cells:
                    merged.merge(series.rings[r][i])
                out[key] = (merged, (max(cells) - min(cells) + 1) * width / 1e9)
        return out, first * width, end

    def take_dirty(self) -> tuple[dict[tuple, dict], list[tuple]]:
        """(series changed, as dicts; keys gone) since the last call, for the store."""
        with self.lock:
            changed = {k: self.series[k].to_dict() for k in self.dirty if k in self.series}
            gone = [k for k in self.dirty if k not in self.series]
            self.dirty = set()
        return changed, gone
