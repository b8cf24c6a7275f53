"""Compiling, loading and attaching the process attribution program (bpf/process.c) with
bcc, in a short-lived child process (sensor/kernel/bccload.py). Like
sensor/kernel/loader.py for the flow meter, this is where that program's errors are
translated: sensor/enrich/process.py only sees raw event bytes and counter values
through ProcessTracepoint.

bcc attaches TRACEPOINT_PROBE functions itself when it loads the object, reading the
tracepoint's format from tracefs; that is why tracefs must be mounted. The attachment is
a perf event descriptor the child hands over with the maps: it lasts while we hold it.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sensor.errors import KernelError, PrivilegeError
from sensor.kernel import bccload, bpfsys
from sensor.kernel.counters import possible_cpus
from sensor.kernel.loader import (
    BPF_DIR, bcc_missing, check_headers, check_map_layout, check_ringbuf,
    check_ringbuf_pages, effective_caps, refused,
)
from sensor.kernel.ringbuf import RingBuffer

log = logging.getLogger(__name__)

SOURCE = BPF_DIR / "process.c"
TRACEPOINT = "sock/inet_sock_set_state"
TRACEFS_DIRS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))

# Mirrors of bpf/process.h sizes, checked against bcc's view of the maps at load.
PROC_TASK_SIZE = 48
COUNTER_NAMES = ("calls", "events", "ringbuf_full", "pending_full", "connect_unseen")

_CAP_SYS_ADMIN = 21
_CAP_PERFMON = 38
_CAP_BPF = 39


@dataclass(frozen=True, slots=True, kw_only=True)
class TracepointOptions:
    """Sizes passed to bpf/process.c as -D; bounds and their reasons are in process.h."""

    pending_size: int = 16384
    ringbuf_pages: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.pending_size <= 1 << 20:
            raise ValueError("pending_size must be within 1..1048576")
        check_ringbuf_pages(self.ringbuf_pages)

    def cflags(self) -> list[str]:
        return [
            f"-I{BPF_DIR}",
            f"-DLOUPE_PROC_PENDING_SIZE={self.pending_size}",
            f"-DLOUPE_PROC_RINGBUF_PAGES={self.ringbuf_pages}",
        ]


def check_tracepoint_privileges() -> None:
    caps = effective_caps()
    admin = bool(caps & (1 << _CAP_SYS_ADMIN))
    if not admin and not (caps & (1 << _CAP_BPF) and caps & (1 << _CAP_PERFMON)):
        raise PrivilegeError(
            "attaching the process attribution tracepoint needs root, or CAP_BPF and "
            "CAP_PERFMON: run it with sudo (or grant those capabilities to the service)"
        )


def tracefs_dir() -> Path:
    """The mounted tracefs that has our tracepoint, or a LoupeError saying how to get it.
    tracefs is mode 0700 root on current kernels: a non-root process, whatever its
    capabilities, cannot read the tracepoint's id and format there."""
    denied: Path | None = None
    for root in TRACEFS_DIRS:
        try:
            if (root / "events" / TRACEPOINT / "format").is_file():
                return root
        except PermissionError:
            denied = root
    if denied is not None:
        raise PrivilegeError(
            f"tracefs ({denied}) is readable by root only, and the sock:inet_sock_set_state "
            f"tracepoint is attached through it: start the sensor as root with --user "
            "USER (it attaches, then runs as USER with CAP_BPF, CAP_PERFMON and "
            "CAP_NET_ADMIN only, as loupe-sensor.service does), or set "
            "process.attribution = false"
        )
    raise KernelError(
        f"tracepoint {TRACEPOINT} not found under {TRACEFS_DIRS[0]}: mount tracefs "
        "(mount -t tracefs nodev /sys/kernel/tracing; make install does it) on a kernel "
        ">= 4.16"
    )


class ProcessTracepoint:
    """The loaded and attached program. Events reach the handler given to open_events()
    as raw bytes during poll(); close() detaches and frees everything."""

    def __init__(self, obj: bccload.BpfObject, options: TracepointOptions) -> None:
        self._obj = obj
        self.options = options
        self._ring: RingBuffer | None = None
        check_map_layout(obj, b"proc_pending", 8, PROC_TASK_SIZE,
                         mirror="sensor/kernel/tracepoints.py", header="bpf/process.h")
        self._counters_fd = obj.map_fd("proc_counters")
        self._ncpus = possible_cpus()

    def open_events(self, handler: Callable[[bytes], None]) -> None:
        if self._ring is None:
            self._ring = RingBuffer()
        self._ring.add(self._obj.map_fd("proc_events"), handler)

    def poll(self, timeout_ms: int) -> None:
        """Delivers events, waiting up to timeout_ms (-1: until wake()) for the first."""
        if self._ring is not None:
            self._ring.block(timeout_ms)

    def wake(self) -> None:
        """Ends a poll() waiting in another thread."""
        if self._ring is not None:
            self._ring.wake()

    def counters(self) -> dict[str, int]:
        """Kernel counters (process.h, enum loupe_proc_counter), summed over CPUs."""
        values = (ctypes.c_uint64 * self._ncpus)()
        out = {}
        for i, name in enumerate(COUNTER_NAMES):
            bpfsys.lookup(self._counters_fd, ctypes.c_uint32(i), values, lock=False)
            out[name] = sum(values)
        return out

    def program_fds(self) -> list[int]:
        """File descriptors of the loaded programs: /proc/self/fdinfo/FD shows their
        run_cnt and run_time_ns while the kernel.bpf_stats_enabled sysctl is 1."""
        return list(self._obj.programs.values())

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        self._obj.close()


def load_process_tracepoint(options: TracepointOptions | None = None) -> ProcessTracepoint:
    """Checks privileges, headers, tracefs and ring buffer support, then compiles
    bpf/process.c and attaches it to sock:inet_sock_set_state."""
    options = options or TracepointOptions()
    check_tracepoint_privileges()
    check_headers()
    tracefs_dir()
    check_ringbuf()
    log.debug("compiling %s with %s", SOURCE, options.cflags())
    try:
        obj = bccload.load(SOURCE, options.cflags(), {})
    except bccload.LoadError as exc:  # compile, load and attach
        if exc.stage == "import":
            raise bcc_missing() from None
        if refused(exc):
            raise PrivilegeError(f"loading the tracepoint program was refused: {exc}; "
                                 "run as root") from None
        raise KernelError(f"loading bpf/process.c failed: {exc}") from None
    try:
        return ProcessTracepoint(obj, options)
    except BaseException:
        obj.close()
        raise
