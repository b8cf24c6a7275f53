"""Compiling, loading and attaching the process attribution program (bpf/process.c) with
bcc. Like sensor/kernel/loader.py for the flow meter, this is where bcc is touched for
that program: sensor/enrich/process.py only sees raw event bytes and counter values
through ProcessTracepoint, and bcc's exceptions are translated here.

bcc attaches TRACEPOINT_PROBE functions itself when it loads the object, reading the
tracepoint's format from tracefs; that is why tracefs must be mounted.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sensor.errors import KernelError, PrivilegeError
from sensor.kernel.loader import (
    BPF_DIR, check_headers, check_map_layout, check_ringbuf, check_ringbuf_pages,
    effective_caps, open_ring_buffer,
)

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

    def __init__(self, bpf, options: TracepointOptions) -> None:
        self._bpf = bpf
        self.options = options
        self._ring_open = False
        check_map_layout(bpf, b"proc_pending", 8, PROC_TASK_SIZE,
                         mirror="sensor/kernel/tracepoints.py", header="bpf/process.h")
        self._counters = bpf[b"proc_counters"]

    def open_events(self, handler: Callable[[bytes], None]) -> None:
        open_ring_buffer(self._bpf, b"proc_events", handler)
        self._ring_open = True

    def poll(self, timeout_ms: int) -> None:
        if self._ring_open:
            self._bpf.ring_buffer_poll(timeout_ms)

    def counters(self) -> dict[str, int]:
        """Kernel counters (process.h, enum loupe_proc_counter), summed over CPUs."""
        return {name: int(self._counters.sum(ctypes.c_int(i)).value)
                for i, name in enumerate(COUNTER_NAMES)}

    def program_fds(self) -> list[int]:
        """File descriptors of the loaded programs: /proc/self/fdinfo/FD shows their
        run_cnt and run_time_ns while the kernel.bpf_stats_enabled sysctl is 1."""
        return [fn.fd for fn in self._bpf.funcs.values()]

    def close(self) -> None:
        self._bpf.cleanup()


def load_process_tracepoint(options: TracepointOptions | None = None) -> ProcessTracepoint:
    """Checks privileges, headers, tracefs and ring buffer support, then compiles
    bpf/process.c and attaches it to sock:inet_sock_set_state."""
    options = options or TracepointOptions()
    check_tracepoint_privileges()
    check_headers()
    tracefs_dir()
    check_ringbuf()
    try:
        from bcc import BPF  # noqa: PLC0415 (imported here so the rest runs without bcc)
    except ImportError:
        raise KernelError(
            "bcc is not importable: install python3-bpfcc (make install); the PyPI package "
            "named bcc is an unrelated project"
        ) from None
    log.debug("compiling %s with %s", SOURCE, options.cflags())
    try:
        bpf = BPF(src_file=str(SOURCE).encode(), cflags=options.cflags())
    except Exception as exc:  # bcc raises bare Exception for compile, load and attach
        if os.geteuid() != 0 and "Operation not permitted" in str(exc):
            raise PrivilegeError(f"loading the tracepoint program was refused: {exc}; "
                                 "run as root") from None
        raise KernelError(f"loading bpf/process.c failed: {exc}") from None
    try:
        return ProcessTracepoint(bpf, options)
    except BaseException:
        bpf.cleanup()
        raise
