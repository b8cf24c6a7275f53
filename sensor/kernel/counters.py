"""The flow meter's per-CPU failure and drop counters (bpf/loupe.h, enum loupe_counter),
summed over CPUs, and turned into LostEvent records when a loss counter rises.

The kernel never resets them: we keep the previous sums and report differences, so
reading is race-free (a packet counted during a read shows up in the next difference).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from pathlib import Path

from sensor.kernel import abi, bpfsys
from sensor.model import LostEvent, LostSource

# Which counters are losses, and under which LostEvent source analysts see them.
LOSS_SOURCES: dict[abi.Counter, LostSource] = {
    abi.Counter.FLOW_MAP_FULL: LostSource.KERNEL_FLOW_MAP_FULL,
    abi.Counter.RINGBUF_FULL: LostSource.KERNEL_RINGBUF_FULL,
    abi.Counter.TRUNCATED: LostSource.KERNEL_PARSE_ERROR,
    abi.Counter.BAD_HEADER: LostSource.KERNEL_PARSE_ERROR,
    abi.Counter.UNSUPPORTED_ENCAP: LostSource.KERNEL_PARSE_ERROR,
    abi.Counter.FRAG_NO_FIRST: LostSource.KERNEL_PARSE_ERROR,
    abi.Counter.IPV6_EXT_TOO_LONG: LostSource.KERNEL_PARSE_ERROR,
    abi.Counter.RECYCLED_ENTRY: LostSource.KERNEL_FLOW_MAP_FULL,
    # A new flow's packet that could not re-enter the meter (flow.c, loupe_new_flow):
    # not counted, like a packet that found the map full.
    abi.Counter.TAIL_CALL_FAILED: LostSource.KERNEL_FLOW_MAP_FULL,
}


def possible_cpus() -> int:
    """Per-CPU map values hold one slot per possible CPU (not online): parse
    /sys/devices/system/cpu/possible, e.g. "0-3" or "0,2-5"."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    highest = 0
    for part in text.split(","):
        highest = max(highest, int(part.split("-")[-1]))
    return highest + 1


def read_counters(counters_fd: int, ncpus: int) -> dict[abi.Counter, int]:
    """The current sum over CPUs of every counter."""
    values = (ctypes.c_uint64 * ncpus)()
    out: dict[abi.Counter, int] = {}
    for counter in abi.Counter:
        key = ctypes.c_uint32(counter)
        bpfsys.lookup(counters_fd, key, values, lock=False)
        out[counter] = sum(values)
    return out


@dataclass(slots=True)
class CounterWatcher:
    """Reads the counters and reports increases of the loss counters as LostEvents."""

    counters_fd: int
    sensor_id: str = ""
    ncpus: int = field(default_factory=possible_cpus)
    _last: dict[abi.Counter, int] = field(default_factory=dict)
    _last_wall_ns: int = 0

    def totals(self) -> dict[abi.Counter, int]:
        return read_counters(self.counters_fd, self.ncpus)

    def poll(self, wall_ns: int) -> list[LostEvent]:
        now = self.totals()
        lost: dict[LostSource, int] = {}
        for counter, source in LOSS_SOURCES.items():
            delta = now[counter] - self._last.get(counter, 0)
            if delta > 0:
                lost[source] = lost.get(source, 0) + delta
        start = self._last_wall_ns or wall_ns
        self._last = now
        self._last_wall_ns = wall_ns
        return [LostEvent(source=source.value, count=count, interval_start_ns=start,
                          interval_end_ns=wall_ns, sensor_id=self.sensor_id)
                for source, count in sorted(lost.items(), key=lambda kv: kv[0].value)]
