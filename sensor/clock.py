"""The injectable clock, and the one place kernel time becomes wall time.

The kernel stamps packets with bpf_ktime_get_ns(), CLOCK_MONOTONIC: it does not jump
with NTP or settimeofday, but it is not a date. Records carry Unix epoch ns, so every
kernel timestamp goes through kernel_to_wall_ns(), with one offset sampled per read
cycle (wall_offset_ns), so the start and end of one record share the same offset and
end >= start always holds. Replay never uses these: it uses packet time.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def wall_ns(self) -> int:
        """Unix epoch nanoseconds (CLOCK_REALTIME)."""

    def monotonic_ns(self) -> int:
        """CLOCK_MONOTONIC nanoseconds: the kernel program's bpf_ktime_get_ns()."""


class SystemClock:
    """The host's clocks."""

    def wall_ns(self) -> int:
        return time.time_ns()

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()


def wall_offset_ns(clock: Clock) -> int:
    """Wall time minus monotonic time, now. Sampled between two monotonic reads and
    centred, so the error is half the time between them (sub-microsecond)."""
    before = clock.monotonic_ns()
    wall = clock.wall_ns()
    after = clock.monotonic_ns()
    return wall - (before + after) // 2


def kernel_to_wall_ns(kernel_ns: int, offset_ns: int) -> int:
    """A kernel CLOCK_MONOTONIC timestamp as Unix epoch ns, given wall_offset_ns()."""
    return max(0, kernel_ns + offset_ns)
