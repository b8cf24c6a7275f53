"""Compiling and loading the flow meter (bpf/flow.c) with bcc. The only module that
imports bcc: everything else reaches the kernel through the file descriptors and the
event callback this module hands out, so bcc's exceptions are translated here.

Options reach the C code as -D cflags (LOUPE_FLOW_MAP_SIZE etc., defaults in loupe.h);
the C text is never edited. After compiling, the layouts bcc derived for the maps are
checked against sensor/kernel/abi.py.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sensor.errors import KernelError, PrivilegeError
from sensor.kernel import abi, bpfsys

log = logging.getLogger(__name__)

BPF_DIR = Path(__file__).resolve().parent.parent.parent / "bpf"
PROGRAM = "loupe_tc"

_CAP_NET_ADMIN = 12
_CAP_SYS_ADMIN = 21
_CAP_BPF = 39


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadOptions:
    """Sizes passed to the C code as -D; bounds and their reasons are in bpf/loupe.h."""

    flow_map_size: int = 65536
    frag_map_size: int = 4096
    max_ipv6_ext: int = 6
    ringbuf_pages: int = 1024

    def __post_init__(self) -> None:
        if not 1 <= self.flow_map_size <= 1 << 24:
            raise ValueError("flow_map_size must be within 1..16777216")
        if not 1 <= self.frag_map_size <= 1 << 20:
            raise ValueError("frag_map_size must be within 1..1048576")
        if not 1 <= self.max_ipv6_ext <= 16:
            raise ValueError("max_ipv6_ext must be within 1..16")
        pages = self.ringbuf_pages
        if pages < 1 or pages & (pages - 1):
            raise ValueError("ringbuf_pages must be a power of two")

    def cflags(self) -> list[str]:
        return [
            f"-I{BPF_DIR}",
            f"-DLOUPE_FLOW_MAP_SIZE={self.flow_map_size}",
            f"-DLOUPE_FRAG_MAP_SIZE={self.frag_map_size}",
            f"-DLOUPE_MAX_IPV6_EXT={self.max_ipv6_ext}",
            f"-DLOUPE_RINGBUF_PAGES={self.ringbuf_pages}",
        ]


def _effective_caps() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def check_privileges() -> None:
    caps = _effective_caps()
    has_bpf = bool(caps & (1 << _CAP_BPF)) or bool(caps & (1 << _CAP_SYS_ADMIN))
    if not has_bpf or not caps & (1 << _CAP_NET_ADMIN):
        raise PrivilegeError(
            "loading the flow meter needs root, or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN: "
            "run it with sudo (or grant those capabilities to the service)"
        )


MODULES_DIR = Path("/lib/modules")


def check_headers(modules_dir: Path = MODULES_DIR) -> None:
    """bcc compiles against <modules_dir>/<release>/build; tests point modules_dir
    elsewhere to see the message."""
    build = modules_dir / platform.release() / "build"
    if not (build / "include").is_dir():
        raise KernelError(
            f"kernel headers not found at {build}: install linux-headers-{platform.release()} "
            "(apt-get install linux-headers-$(uname -r)); on a custom kernel without a matching "
            "package, `make install` links linux-headers-amd64 there instead (see README: the "
            "flow meter uses UAPI headers only)"
        )


def check_ringbuf() -> None:
    if not bpfsys.ringbuf_supported():
        raise KernelError(
            f"this kernel ({platform.release()}) cannot create BPF ring buffers, which the "
            "flow meter needs: upgrade to Linux 5.8 or later"
        )


class LoadedProgram:
    """The compiled program and its maps. close() releases them (filters that still
    reference the program keep it alive in the kernel; detach those first)."""

    def __init__(self, bpf, options: LoadOptions) -> None:
        self._bpf = bpf
        self.options = options
        self._ring_open = False
        try:
            self.prog_fd: int = bpf.load_func(PROGRAM.encode(), bpf.SCHED_CLS).fd
        except Exception as exc:  # bcc raises bare Exception with the verifier log
            raise KernelError(f"the kernel refused the flow meter program: {exc}") from None
        self.flows_fd: int = bpf[b"flows"].map_fd
        self.frags_fd: int = bpf[b"frags"].map_fd
        self.counters_fd: int = bpf[b"counters"].map_fd
        # Selection and payload control (sensor/kernel/hybrid.py fills them; with all
        # of them empty, as after loading, no flow is selected and nothing is copied).
        self.config_fd: int = bpf[b"config"].map_fd
        self.sel_ports_fd: int = bpf[b"sel_ports"].map_fd
        self.sel_cidr4_fd: int = bpf[b"sel_cidr4"].map_fd
        self.sel_cidr6_fd: int = bpf[b"sel_cidr6"].map_fd
        self.sel_protos_fd: int = bpf[b"sel_protos"].map_fd
        self.sel_keys_fd: int = bpf[b"sel_keys"].map_fd
        self.l7_ctl_fd: int = bpf[b"l7_ctl"].map_fd
        for table, key, value in ((b"flows", abi.FlowKey, abi.FlowValue),
                                  (b"frags", abi.FragKey, abi.FragValue)):
            t = bpf[table]
            if (ctypes.sizeof(t.Key), ctypes.sizeof(t.Leaf)) != (ctypes.sizeof(key),
                                                                  ctypes.sizeof(value)):
                raise KernelError(
                    f"map {table.decode()} has key/value sizes {ctypes.sizeof(t.Key)}/"
                    f"{ctypes.sizeof(t.Leaf)} but sensor/kernel/abi.py expects "
                    f"{ctypes.sizeof(key)}/{ctypes.sizeof(value)}: bpf/loupe.h and abi.py differ"
                )

    def open_events(self, handler: Callable[[bytes], None]) -> None:
        """Delivers every ring buffer event to handler as bytes, during poll_events()."""

        def _callback(_ctx, data, size):
            handler(ctypes.string_at(data, size))
            return 0

        self._bpf[b"events"].open_ring_buffer(_callback)
        self._ring_open = True

    def poll_events(self, timeout_ms: int) -> None:
        if self._ring_open:
            self._bpf.ring_buffer_poll(timeout_ms)

    def close(self) -> None:
        self._bpf.cleanup()


def load(options: LoadOptions | None = None) -> LoadedProgram:
    """Checks privileges, headers and kernel features, then compiles and loads."""
    options = options or LoadOptions()
    check_privileges()
    check_headers()
    check_ringbuf()
    try:
        from bcc import BPF  # noqa: PLC0415 (imported here so the rest runs without bcc)
    except ImportError:
        raise KernelError(
            "bcc is not importable: install python3-bpfcc (make install); the PyPI package "
            "named bcc is an unrelated project"
        ) from None
    log.debug("compiling %s with %s", BPF_DIR / "flow.c", options.cflags())
    try:
        bpf = BPF(src_file=str(BPF_DIR / "flow.c").encode(), cflags=options.cflags())
    except Exception as exc:  # bcc raises bare Exception for compile and load failures
        if os.geteuid() != 0 and "Operation not permitted" in str(exc):
            raise PrivilegeError(f"loading BPF maps was refused: {exc}; run as root") from None
        raise KernelError(f"compiling bpf/flow.c failed: {exc}") from None
    return LoadedProgram(bpf, options)
