"""The meter run straight over one capture file, without the pipeline's L7 stage: what
the conformance and reader tests compare against other tools' flow records."""

from __future__ import annotations

from sensor.engine.flowtable import DEFAULT_MAX_FLOWS
from sensor.engine.meter import Meter, PayloadSink
from sensor.flow.community_id import DEFAULT as DEFAULT_CID
from sensor.flow.community_id import CommunityId
from sensor.flow.semantics import DEFAULT_TIMEOUTS, Timeouts
from sensor.model import Flow
from sensor.replay.reader import CaptureReader


def meter_file(path, *, timeouts: Timeouts = DEFAULT_TIMEOUTS,
               max_flows: int = DEFAULT_MAX_FLOWS, sink: PayloadSink | None = None,
               community: CommunityId = DEFAULT_CID) -> tuple[list[Flow], Meter]:
    """All Flow records of one capture file, and the meter (for its counters)."""
    records: list[Flow] = []
    meter = Meter(emit=records.append, sink=sink, timeouts=timeouts, max_flows=max_flows,
                  community=community)
    with CaptureReader(path) as reader:
        meter.run(reader)
    return records, meter
