"""A bounded on-disk spool of serialized RecordBatch messages.

Strategy. Every batch is written here before it is sent, and stays until the collector
acks it, so neither a dead collector nor a sensor restart loses data. The spool is a
directory of append-only segment files plus one small state file:

    seg-<first batch id, 20 digits>.lsp   frames, one per batch, in batch id order
    state.json                            reserved batch ids and loss not yet reported

Frame (little-endian), FRAME_HEADER bytes then the payload:

    magic b"LSB1" | u32 payload length | u32 CRC32 | u64 batch id | u32 records |
    u64 carried loss | payload (a serialized loupe.v1.RecordBatch)

The CRC covers everything after the CRC field (the rest of the header and the payload), so
a torn write or a flipped bit anywhere past the length is caught. A frame that fails any
check (bad magic, length past the end of the file, bad CRC) starts a corrupt region; the
scanner resynchronises on the next magic whose frame checks out. Each corrupt region is
counted once, reported as a LostEvent with source "spool_corrupt" (its count is regions:
the records inside cannot be trusted, so they cannot be counted), and the segment is
rewritten without it so that it is never counted twice. Nothing in a spool file can crash
the sensor.

Segments. Appends go to one active segment; it is closed when it would grow past
segment_bytes, and a new one is started on every open, so a possibly torn tail is never
appended to. A closed segment is deleted once all its batches are acked (or rejected). The
active segment's acked batches are kept until it rotates: after a restart they are sent
again and the collector answers DUPLICATE (it deduplicates on (sensor_id, batch_id)).

Limits. max_bytes bounds the bytes on disk. An append that would pass it drops whole
segments, oldest first, so the newest data survives an outage longer than the spool can
hold; the records of every un-acked batch dropped are counted and reported later as a
LostEvent with source "spool_full". A batch bigger than max_bytes is refused and counted
the same way.

Batch ids. Ids increase and are never reused, even across restarts and crashes: state.json
holds the end of a reserved block of ids (written atomically: temp file, fsync, rename,
fsync of the directory) and a new block is reserved before any id of it is handed out. A
restart skips the rest of the old block; gaps are fine, reuse is not. Ids also never fall
below the wall clock in ns at open: a new spool directory (a replay's temporary spool, a
sensor whose spool was deleted) must not hand out ids an earlier spool of the same sensor
id already gave the collector, which would drop the new batches as duplicates. Two spools
opened a millisecond apart are a million ids apart, far more batches than one run sends.

Durability (fsync policy). Every append is one write(2) straight to the file (no Python
buffer), so a crash of the sensor process loses nothing: the page cache survives it. An
fsync protects against power loss and kernel crashes:
- FsyncPolicy.BATCH: fsync after every batch. The strongest, and one fsync per batch.
- FsyncPolicy.INTERVAL (default): fsync when interval_s has passed since the last one,
  checked on every append and by sync_due(); at most interval_s of batches can be lost on
  power loss.
- FsyncPolicy.NEVER: leave it to the kernel's writeback (about 30 s).
Segment creation and deletion fsync the directory under BATCH and INTERVAL.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import struct
import threading
import time
import zlib
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sensor import model
from sensor.errors import ConfigError, StorageError

__all__ = ["FsyncPolicy", "Spool", "SpooledBatch", "FRAME_HEADER", "MAGIC"]

log = logging.getLogger(__name__)

MAGIC = b"LSB1"
_HEADER = struct.Struct("<4sIIQIQ")
FRAME_HEADER = _HEADER.size  # 32 bytes
# The part of the header after the CRC field, which the CRC covers with the payload.
_CRC_TAIL = struct.Struct("<QIQ")
_STATE = "state.json"
_SEG_PREFIX, _SEG_SUFFIX = "seg-", ".lsp"
# Ids reserved per state-file write: one atomic write per 4096 batches instead of one per
# batch; a restart skips at most this many ids.
ID_BLOCK = 4096
# A frame longer than this is treated as corrupt by the scanner: no batch the exporter
# builds comes near it (grpc's default message limit is 4 MiB), so a bigger length field
# is garbage, and trusting it would skip good frames.
MAX_FRAME_PAYLOAD = 64 << 20


class FsyncPolicy(str, enum.Enum):
    BATCH = "batch"
    INTERVAL = "interval"
    NEVER = "never"


@dataclass(frozen=True, slots=True)
class SpooledBatch:
    batch_id: int
    records: int
    payload: bytes


@dataclass(slots=True)
class _Entry:
    batch_id: int
    offset: int
    length: int  # payload length
    records: int
    carried_loss: int
    segment: "_Segment"


@dataclass(slots=True)
class _Segment:
    path: Path
    first_id: int
    size: int = 0
    entries: list[_Entry] = field(default_factory=list)
    unacked: int = 0


@dataclass(slots=True)
class _Loss:
    count: int = 0
    start_ns: int = 0
    end_ns: int = 0

    def add(self, count: int, now_ns: int) -> None:
        if count <= 0:
            return
        if self.count == 0:
            self.start_ns = now_ns
        self.count += count
        self.end_ns = now_ns


def _encode_frame(batch_id: int, payload: bytes, records: int, carried_loss: int) -> bytes:
    tail = _CRC_TAIL.pack(batch_id, records, carried_loss)
    crc = zlib.crc32(payload, zlib.crc32(tail))
    return _HEADER.pack(MAGIC, len(payload), crc, batch_id, records, carried_loss) + payload


def _scan(data: bytes) -> tuple[list[tuple[int, int, int, int, int]], int, list[tuple[int, int]]]:
    """Parse one segment's bytes. Returns (frames as (batch_id, offset, length, records,
    carried_loss), corrupt regions, good frame spans as (start, end))."""
    frames, spans = [], []
    regions = 0
    in_bad = False
    pos, end = 0, len(data)
    while pos < end:
        ok = False
        if end - pos >= FRAME_HEADER:
            magic, length, crc, batch_id, records, carried = _HEADER.unpack_from(data, pos)
            body = pos + FRAME_HEADER
            if magic == MAGIC and length <= MAX_FRAME_PAYLOAD and body + length <= end:
                payload = memoryview(data)[body:body + length]
                tail = _CRC_TAIL.pack(batch_id, records, carried)
                ok = zlib.crc32(payload, zlib.crc32(tail)) == crc
        if ok:
            frames.append((batch_id, body, length, records, carried))
            spans.append((pos, body + length))
            pos = body + length
            in_bad = False
            continue
        if not in_bad:
            regions += 1
            in_bad = True
        nxt = data.find(MAGIC, pos + 1)
        if nxt < 0:
            break
        pos = nxt
    return frames, regions, spans


class Spool:
    """Thread-safe: the exporter's batcher appends while its sender reads and acks."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_bytes: int = 256 << 20,
        segment_bytes: int = 8 << 20,
        fsync: FsyncPolicy = FsyncPolicy.INTERVAL,
        fsync_interval_s: float = 0.2,
        clock_ns: Callable[[], int] = time.time_ns,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes < 4 * FRAME_HEADER:
            raise ConfigError(f"spool max_bytes={max_bytes} is too small; use at least 1 MiB")
        self._dir = Path(directory)
        self._max_bytes = max_bytes
        # At least 4 segments fit in the spool, so dropping the oldest one when full loses
        # at most a quarter of it, not everything.
        self._segment_bytes = max(FRAME_HEADER, min(segment_bytes, max_bytes // 4))
        self._fsync = FsyncPolicy(fsync)
        self._fsync_interval = fsync_interval_s
        self._clock_ns = clock_ns
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._ids: list[int] = []           # every batch id on disk, increasing
        self._entries: dict[int, _Entry] = {}
        self._acked: set[int] = set()
        # Bytes (frames) of the batches not acked yet: what is still to deliver. The
        # files also hold acked batches until their segment goes (see Segments above),
        # so this is less than the bytes on disk, and 0 once everything is delivered.
        self._unacked_bytes = 0
        self._active: _Segment | None = None
        self._active_fd: int | None = None
        self._dirty = False
        self._last_sync = monotonic()
        self._next_id = 1
        self._reserved = 0
        self._full_loss = _Loss()
        self._corrupt_loss = _Loss()
        self._closed = False
        self._counters = {
            "spool_batches_appended": 0,
            "spool_batches_acked": 0,
            "spool_batches_dropped": 0,
            "spool_records_dropped": 0,
            "spool_corrupt_regions": 0,
            "spool_segments_deleted": 0,
            "spool_fsyncs": 0,
            "spool_fsync_ns": 0,
            "spool_recovered_batches": 0,
        }
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            self._recover()
        except OSError as exc:
            raise StorageError(
                f"cannot open the spool directory {self._dir}: {exc.strerror or exc}; "
                "check that it exists and is writable by the sensor"
            ) from None

    # ---- start-up -------------------------------------------------------------------

    def _recover(self) -> None:
        state = self._read_state()
        max_seen = 0
        for path in sorted(self._dir.glob(f"{_SEG_PREFIX}*{_SEG_SUFFIX}")):
            data = path.read_bytes()
            frames, regions, spans = _scan(data)
            if regions:
                self._counters["spool_corrupt_regions"] += regions
                self._corrupt_loss.add(regions, self._clock_ns())
                log.warning("spool segment %s: %d corrupt region(s) skipped", path.name, regions)
            kept = [f for f in frames if f[0] not in self._entries]
            if not kept:
                path.unlink()
                continue
            if regions or len(kept) != len(frames):
                # Rewrite without the bad bytes, so the next start does not count them again.
                keep_ids = {f[0] for f in kept}
                good = b"".join(
                    data[s:e] for (s, e), f in zip(spans, frames) if f[0] in keep_ids
                )
                self._atomic_write(path, good)
                frames, _, _ = _scan(good)
                data = good
            seg = _Segment(path=path, first_id=frames[0][0], size=len(data))
            for batch_id, offset, length, records, carried in frames:
                entry = _Entry(batch_id, offset, length, records, carried, seg)
                seg.entries.append(entry)
                self._entries[batch_id] = entry
                self._unacked_bytes += FRAME_HEADER + length
                max_seen = max(max_seen, batch_id)
            seg.unacked = len(seg.entries)
            self._segments.append(seg)
            self._counters["spool_recovered_batches"] += len(seg.entries)
        self._segments.sort(key=lambda s: s.first_id)
        self._ids = sorted(self._entries)
        self._next_id = max(int(state.get("reserved", 0)), max_seen, self._clock_ns()) + 1
        pending = state.get("pending_full_loss") or [0, 0, 0]
        if pending[0]:
            self._full_loss = _Loss(*pending)
        self._reserve_block()

    def _read_state(self) -> dict:
        path = self._dir / _STATE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (ValueError, UnicodeDecodeError):
            # A torn state file cannot happen with the rename, but a hand-edited one can:
            # ids then restart after the highest id still on disk, which is all we know.
            log.warning("spool state file %s is unreadable; ignoring it", path)
            return {}
        return state if isinstance(state, dict) else {}

    def _atomic_write(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self._sync_dir(force=True)

    def _sync_dir(self, force: bool = False) -> None:
        if self._fsync is FsyncPolicy.NEVER and not force:
            return
        fd = os.open(self._dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_state(self) -> None:
        loss = self._full_loss
        state = {
            "reserved": self._reserved,
            "pending_full_loss": [loss.count, loss.start_ns, loss.end_ns],
        }
        self._atomic_write(self._dir / _STATE, json.dumps(state).encode())

    def _reserve_block(self) -> None:
        self._reserved = self._next_id + ID_BLOCK - 1
        self._write_state()

    # ---- writing --------------------------------------------------------------------

    def next_batch_id(self) -> int:
        """A fresh batch id: larger than every id this spool directory ever gave out."""
        with self._lock:
            if self._next_id > self._reserved:
                self._reserve_block()
            batch_id = self._next_id
            self._next_id += 1
            return batch_id

    def append(
        self, batch_id: int, payload: bytes, *, records: int, carried_loss: int = 0
    ) -> bool:
        """Store one serialized batch. carried_loss is the spool_full count reported by a
        LostEvent inside this batch (taken from take_losses), so that dropping this batch
        later reports that loss again instead of losing it. False when the batch is
        bigger than the whole spool (then it is counted as dropped)."""
        frame = _encode_frame(batch_id, payload, records, carried_loss)
        with self._lock:
            self._check_open()
            now = self._clock_ns()
            if len(frame) > self._max_bytes:
                self._count_drop(records, carried_loss, now)
                self._write_state()
                log.warning("batch %d (%d bytes) is bigger than the spool; dropped",
                            batch_id, len(frame))
                return False
            dropped_any = False
            while self._bytes() + len(frame) > self._max_bytes and self._segments:
                oldest = self._segments[0]
                if oldest is self._active:
                    self._close_active()
                self._drop_segment(oldest, now)
                dropped_any = True
            if dropped_any:
                self._write_state()
            if self._active is not None and self._active.size + len(frame) > self._segment_bytes \
                    and self._active.entries:
                self._close_active()
            if self._active is None:
                self._open_active(batch_id)
            seg = self._active
            os.write(self._active_fd, frame)
            entry = _Entry(batch_id, seg.size + FRAME_HEADER, len(payload), records,
                           carried_loss, seg)
            seg.size += len(frame)
            seg.entries.append(entry)
            seg.unacked += 1
            self._entries[batch_id] = entry
            self._unacked_bytes += len(frame)
            self._ids.append(batch_id)
            if carried_loss:
                # Subtract rather than reset: this very append may have dropped segments.
                loss = self._full_loss
                loss.count = max(0, loss.count - carried_loss)
                if loss.count == 0:
                    self._full_loss = _Loss()
                self._write_state()
            self._counters["spool_batches_appended"] += 1
            self._dirty = True
            if self._fsync is FsyncPolicy.BATCH or (
                self._fsync is FsyncPolicy.INTERVAL
                and self._monotonic() - self._last_sync >= self._fsync_interval
            ):
                self._sync_active()
            return True

    def work_pending(self) -> bool:
        """Whether the exporter's periodic calls still have work here: appended data
        waiting for an INTERVAL fsync (sync_due), or loss not yet taken (take_losses).
        When not, the exporter can wait for records without waking."""
        with self._lock:
            return (self._fsync is FsyncPolicy.INTERVAL and self._dirty) or bool(
                self._full_loss.count or self._corrupt_loss.count)

    def sync_due(self) -> None:
        """Called periodically by the exporter: fsync if the INTERVAL policy says so."""
        with self._lock:
            if (self._fsync is FsyncPolicy.INTERVAL and self._dirty
                    and self._monotonic() - self._last_sync >= self._fsync_interval):
                self._sync_active()

    def _sync_active(self) -> None:
        if self._active_fd is not None and self._dirty:
            t0 = time.perf_counter_ns()
            os.fsync(self._active_fd)
            self._counters["spool_fsyncs"] += 1
            self._counters["spool_fsync_ns"] += time.perf_counter_ns() - t0
        self._dirty = False
        self._last_sync = self._monotonic()

    def _open_active(self, first_id: int) -> None:
        path = self._dir / f"{_SEG_PREFIX}{first_id:020d}{_SEG_SUFFIX}"
        self._active_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._active = _Segment(path=path, first_id=first_id)
        self._segments.append(self._active)
        self._sync_dir()

    def _close_active(self) -> None:
        seg = self._active
        if seg is None:
            return
        if self._fsync is not FsyncPolicy.NEVER:
            self._sync_active()
        os.close(self._active_fd)
        self._active, self._active_fd = None, None
        if seg.unacked == 0:
            self._delete_segment(seg)

    def _count_drop(self, records: int, carried_loss: int, now: int) -> None:
        # The batch's own spool_full LostEvent is one of its records; the loss it reported
        # is lost with it, so it is added back.
        lost = records - (1 if carried_loss else 0) + carried_loss
        self._counters["spool_batches_dropped"] += 1
        self._counters["spool_records_dropped"] += records
        self._full_loss.add(lost, now)

    def _drop_segment(self, seg: _Segment, now: int) -> None:
        for entry in seg.entries:
            if entry.batch_id not in self._acked:
                self._count_drop(entry.records, entry.carried_loss, now)
        log.warning("spool full (%d bytes): dropped %s", self._max_bytes, seg.path.name)
        self._delete_segment(seg)

    def _delete_segment(self, seg: _Segment) -> None:
        self._segments.remove(seg)
        for entry in seg.entries:
            if entry.batch_id not in self._acked:
                self._unacked_bytes -= FRAME_HEADER + entry.length
            self._entries.pop(entry.batch_id, None)
            self._acked.discard(entry.batch_id)
        if seg.entries:
            # Segments go oldest first almost always; rebuild otherwise (rare, bounded).
            if self._ids and self._ids[0] == seg.entries[0].batch_id:
                del self._ids[:len(seg.entries)]
            else:
                self._ids = sorted(self._entries)
        try:
            seg.path.unlink()
        except FileNotFoundError:
            pass
        self._counters["spool_segments_deleted"] += 1
        self._sync_dir()

    def _bytes(self) -> int:
        return sum(s.size for s in self._segments)

    # ---- reading and acking ---------------------------------------------------------

    def next_unacked(self, after: int) -> SpooledBatch | None:
        """The first un-acked batch with an id greater than `after`, read from disk."""
        with self._lock:
            self._check_open()
            i = bisect_right(self._ids, after)
            while i < len(self._ids):
                batch_id = self._ids[i]
                if batch_id not in self._acked:
                    entry = self._entries[batch_id]
                    fd = os.open(entry.segment.path, os.O_RDONLY)
                    try:
                        payload = os.pread(fd, entry.length, entry.offset)
                    finally:
                        os.close(fd)
                    return SpooledBatch(batch_id, entry.records, payload)
                i += 1
            return None

    def read(self, batch_id: int) -> SpooledBatch | None:
        """That batch if it is still in the spool and un-acked (a resend after the stream
        it went out on broke), else None."""
        with self._lock:
            self._check_open()
            entry = self._entries.get(batch_id)
            if entry is None or batch_id in self._acked:
                return None
            fd = os.open(entry.segment.path, os.O_RDONLY)
            try:
                payload = os.pread(fd, entry.length, entry.offset)
            finally:
                os.close(fd)
            return SpooledBatch(batch_id, entry.records, payload)

    def ack(self, batch_id: int) -> bool:
        """Mark a batch delivered (stored, duplicate or rejected). False if it is not in
        the spool any more (dropped when full, or acked before)."""
        with self._lock:
            entry = self._entries.get(batch_id)
            if entry is None or batch_id in self._acked:
                return False
            self._acked.add(batch_id)
            self._unacked_bytes -= FRAME_HEADER + entry.length
            self._counters["spool_batches_acked"] += 1
            seg = entry.segment
            seg.unacked -= 1
            if seg.unacked == 0 and seg is not self._active:
                self._delete_segment(seg)
            return True

    def unacked_count(self) -> int:
        with self._lock:
            return len(self._entries) - len(self._acked)

    def take_losses(self) -> list[model.LostEvent]:
        """Loss not reported yet, as LostEvents (sensor_id left empty for the caller).
        The spool_full count stays pending (and persisted) until a batch carrying it is
        appended with carried_loss set; corrupt regions are reported once."""
        with self._lock:
            out = []
            if self._full_loss.count:
                loss = self._full_loss
                out.append(model.LostEvent(
                    source=model.LostSource.SPOOL_FULL.value, count=loss.count,
                    interval_start_ns=loss.start_ns, interval_end_ns=loss.end_ns))
            if self._corrupt_loss.count:
                loss = self._corrupt_loss
                out.append(model.LostEvent(
                    source=model.LostSource.SPOOL_CORRUPT.value, count=loss.count,
                    interval_start_ns=loss.start_ns, interval_end_ns=loss.end_ns))
                self._corrupt_loss = _Loss()
            return out

    def counters(self) -> dict[str, int]:
        with self._lock:
            out = dict(self._counters)
            # Still to deliver; spool_disk_bytes is what the files take (the max_bytes bound).
            out["spool_bytes"] = self._unacked_bytes
            out["spool_disk_bytes"] = self._bytes()
            out["spool_segments"] = len(self._segments)
            out["spool_batches_unacked"] = len(self._entries) - len(self._acked)
            out["spool_pending_loss"] = self._full_loss.count
            return out

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(f"the spool in {self._dir} is closed")

    def close(self) -> None:
        """fsync and close the active segment. Un-acked batches stay for the next start."""
        with self._lock:
            if self._closed:
                return
            self._close_active()
            self._closed = True
