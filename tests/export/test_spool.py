"""The on-disk spool: batches survive reopening, ids are never reused, the byte bound
drops the oldest segments and counts them, and a damaged file is skipped and counted."""

from __future__ import annotations

import json
import os

import pytest

from sensor import model
from sensor.errors import ConfigError
from sensor.export.spool import FRAME_HEADER, MAGIC, FsyncPolicy, Spool


def payload(i: int, size: int = 100) -> bytes:
    return (f"batch-{i:06d}-".encode() * size)[:size]


def fill(spool: Spool, n: int, size: int = 100) -> list[int]:
    ids = []
    for _ in range(n):
        bid = spool.next_batch_id()
        assert spool.append(bid, payload(bid, size), records=3)
        ids.append(bid)
    return ids


def drain(spool: Spool) -> list[tuple[int, bytes]]:
    out, after = [], 0
    while (b := spool.next_unacked(after)) is not None:
        out.append((b.batch_id, b.payload))
        after = b.batch_id
    return out


def segments(path) -> list[str]:
    return sorted(p.name for p in path.glob("seg-*.lsp"))


def test_batches_survive_reopen_in_order(tmp_path):
    spool = Spool(tmp_path, fsync=FsyncPolicy.BATCH)
    ids = fill(spool, 5)
    spool.ack(ids[1])
    spool.close()
    again = Spool(tmp_path)
    got = drain(again)
    # The ack of ids[1] was not persisted (its segment was still active): it comes back,
    # and the collector answers DUPLICATE. Nothing is missing and order is kept.
    assert [b for b, _ in got] == ids
    assert all(p == payload(b) for b, p in got)
    assert again.counters()["spool_recovered_batches"] == 5


def test_batch_ids_are_never_reused_across_restarts(tmp_path):
    seen = set()
    for _ in range(3):
        spool = Spool(tmp_path)
        ids = fill(spool, 4)
        for bid in ids:
            spool.ack(bid)
        spool.close()
        assert not seen & set(ids)
        assert ids == sorted(ids) and ids[0] > max(seen, default=0)
        seen |= set(ids)


def test_ids_skip_past_disk_contents_even_without_state_file(tmp_path):
    spool = Spool(tmp_path)
    ids = fill(spool, 3)
    spool.close()
    (tmp_path / "state.json").unlink()
    again = Spool(tmp_path)
    assert again.next_batch_id() > max(ids)


def test_acked_closed_segments_are_deleted(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=4 * (FRAME_HEADER + 100))
    ids = fill(spool, 12)  # 3 segments of 4 batches
    assert len(segments(tmp_path)) == 3
    for bid in ids[:8]:
        spool.ack(bid)
    assert len(segments(tmp_path)) == 1
    assert spool.counters()["spool_batches_unacked"] == 4
    assert [b for b, _ in drain(spool)] == ids[8:]


def test_full_spool_drops_oldest_and_reports_spool_full(tmp_path):
    frame = FRAME_HEADER + 1000
    spool = Spool(tmp_path, max_bytes=8 * frame, segment_bytes=2 * frame)
    ids = fill(spool, 12, size=1000)
    c = spool.counters()
    assert c["spool_bytes"] <= 8 * frame
    # 12 batches of which only 8 fit: the oldest two segments (4 batches) went.
    assert c["spool_batches_dropped"] == 4
    assert [b for b, _ in drain(spool)] == ids[4:]
    (lost,) = spool.take_losses()
    assert lost.source == model.LostSource.SPOOL_FULL.value
    assert lost.count == 4 * 3  # records, not batches
    assert lost.interval_start_ns <= lost.interval_end_ns
    # The loss stays pending until a batch carrying it is spooled, and survives a restart.
    spool.close()
    again = Spool(tmp_path, max_bytes=8 * frame, segment_bytes=2 * frame)
    (lost2,) = again.take_losses()
    assert lost2.count == 12
    for bid, _ in drain(again):   # delivered, so the carrier below drops nothing
        again.ack(bid)
    assert again.counters()["spool_bytes"] == 0
    bid = again.next_batch_id()
    again.append(bid, b"carrier", records=1, carried_loss=lost2.count)
    assert again.take_losses() == []


def test_dropping_a_batch_that_carried_loss_reports_that_loss_again(tmp_path):
    frame = FRAME_HEADER + 1000
    spool = Spool(tmp_path, max_bytes=4 * frame, segment_bytes=frame)
    first = spool.next_batch_id()
    # A batch of 5 records, one of which is a LostEvent(spool_full, count=40).
    spool.append(first, payload(first, 1000), records=5, carried_loss=40)
    fill(spool, 4, size=1000)  # pushes `first` out
    (lost,) = spool.take_losses()
    assert lost.count == 40 + 4


def test_batch_bigger_than_the_spool_is_refused_and_counted(tmp_path):
    spool = Spool(tmp_path, max_bytes=4096)
    bid = spool.next_batch_id()
    assert not spool.append(bid, b"x" * 5000, records=7)
    assert spool.take_losses()[0].count == 7
    assert spool.next_unacked(0) is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage_tail", "flip_middle"])
def test_corrupt_frames_are_skipped_counted_and_not_recounted(tmp_path, damage):
    spool = Spool(tmp_path, fsync=FsyncPolicy.BATCH)
    ids = fill(spool, 5)
    spool.close()
    (seg,) = tmp_path.glob("seg-*.lsp")
    data = bytearray(seg.read_bytes())
    frame = FRAME_HEADER + 100
    if damage == "truncate":       # torn last write
        data = data[:-37]
        survivors = ids[:4]
    elif damage == "flip":         # bit rot in the last payload
        data[-5] ^= 0xFF
        survivors = ids[:4]
    elif damage == "garbage_tail":
        data += b"\x00garbage" * 9 + MAGIC + b"\xff" * 40
        survivors = ids
    else:                          # the middle frame's payload, frames after it survive
        data[2 * frame + FRAME_HEADER + 10] ^= 0x01
        survivors = ids[:2] + ids[3:]
    seg.write_bytes(bytes(data))

    again = Spool(tmp_path)
    assert [b for b, _ in drain(again)] == survivors
    assert all(p == payload(b) for b, p in drain(again))
    assert again.counters()["spool_corrupt_regions"] == 1
    losses = {e.source: e.count for e in again.take_losses()}
    assert losses == {model.LostSource.SPOOL_CORRUPT.value: 1}
    assert again.take_losses() == []  # reported once
    again.close()
    third = Spool(tmp_path)
    assert third.counters()["spool_corrupt_regions"] == 0
    assert [b for b, _ in drain(third)] == survivors


def test_junk_only_segment_and_bad_state_file_do_not_crash(tmp_path):
    (tmp_path / "seg-00000000000000000001.lsp").write_bytes(os.urandom(300))
    (tmp_path / "state.json").write_text("{not json")
    spool = Spool(tmp_path)
    assert spool.next_unacked(0) is None
    assert spool.counters()["spool_corrupt_regions"] == 1
    assert not (tmp_path / "seg-00000000000000000001.lsp").exists()
    assert json.loads((tmp_path / "state.json").read_text())["reserved"] >= 1


def test_tiny_limit_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="too small"):
        Spool(tmp_path, max_bytes=10)
