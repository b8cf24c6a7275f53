"""The spool's byte accounting: spool_bytes (loupe_spool_bytes, `loupe status`) counts
what is still to deliver, so it is 0 once every batch is acked, while the files may still
hold acked batches until their segment goes."""

from __future__ import annotations

from sensor.export.spool import FRAME_HEADER, Spool


def _append(spool: Spool, n: int, size: int) -> list[int]:
    ids = []
    for _ in range(n):
        bid = spool.next_batch_id()
        assert spool.append(bid, b"x" * size, records=1)
        ids.append(bid)
    return ids


def test_spool_bytes_count_only_unacked_batches(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=64 << 10)
    ids = _append(spool, 5, 1000)
    frame = FRAME_HEADER + 1000
    assert spool.counters()["spool_bytes"] == 5 * frame
    spool.ack(ids[0])
    spool.ack(ids[1])
    assert spool.counters()["spool_bytes"] == 3 * frame
    for bid in ids[2:]:
        spool.ack(bid)
    c = spool.counters()
    assert c["spool_bytes"] == 0 and c["spool_batches_unacked"] == 0
    # The active segment keeps its acked frames on disk until it rotates.
    assert c["spool_disk_bytes"] == 5 * frame


def test_spool_bytes_after_reopen_and_after_dropping_when_full(tmp_path):
    frame = FRAME_HEADER + 1000
    spool = Spool(tmp_path, max_bytes=8 * frame, segment_bytes=2 * frame)
    ids = _append(spool, 3, 1000)
    spool.ack(ids[0])
    spool.close()
    # A restart sends acked batches of the last segment again: they count as un-acked.
    again = Spool(tmp_path, max_bytes=8 * frame, segment_bytes=2 * frame)
    before = again.counters()
    assert before["spool_batches_unacked"] == 3
    assert before["spool_bytes"] == 3 * frame
    _append(again, 12, 1000)   # past max_bytes: oldest segments dropped
    c = again.counters()
    assert c["spool_bytes"] == c["spool_batches_unacked"] * frame
