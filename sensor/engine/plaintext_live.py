"""The TLS plaintext half of the live sensor: the probes (sensor/kernel/tlsprobe.py), the
libraries they sit on, and the L7 stage (sensor/engine/plaintext.py), for LiveSensor
to start, step and stop (sensor/engine/live.py wires it; [tls_plaintext] in sensor.toml).

Libraries. At start the host's libssl.so.3 and libgnutls.so.30 are attached (every
process that maps them, now or later, is covered: the uprobe is on the inode). Every
`rescan_s` the maps of processes not seen before are read (/proc/PID/maps): a library
file of another inode (a container's own, a vendored copy) is attached through
/proc/PID/root, once per inode. A library without the functions is a one-line warning.
The executable of each new process is looked at once per inode too: a Go binary that
links crypto/tls is probed through /proc/PID/exe (sensor/kernel/gotls.py); a Go binary
without it, or any other executable, costs one read of its section headers. A rescan
takes at most SCAN_BUDGET_S of the main thread (which delivers every record); the
processes it did not reach are looked at on the next step.

Threads. Chunks are read by the wire's ring buffer poll (one wait for both rings, see
loader.add_ring) into a bounded queue, and handled in step() on the main thread, which
owns all L7 state.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sensor.engine.plaintext import PlaintextL7
from sensor.errors import ConfigError
from sensor.kernel import gotls, tlsprobe
from sensor.model import LostSource, Record

log = logging.getLogger(__name__)

# Chunks queued between the ring buffer poll and step(); a full queue drops and counts
# (as the wire's payload queue): the poll must never wait for the L7 stage.
QUEUE_CHUNKS = 16384
# Chunks handled per step before the flow map gets its turn.
CHUNKS_PER_STEP = 20000
# Executable inodes already looked at (Go or not), before the set starts again: every
# distinct program a host runs is far fewer; past it, one re-read each is the cost.
MAX_EXES = 65536
# Time one rescan may take on the main thread, which also delivers every record: past it,
# the processes not looked at yet wait for the next step (a burst of new processes, each
# a read of its maps and its executable's headers, or a Go binary's ~0.1 s of symbols).
SCAN_BUDGET_S = 0.2
# Where distributions put the libraries (multiarch and not).
HOST_LIBRARIES = ("/usr/lib/*/libssl.so.3", "/lib/*/libssl.so.3", "/usr/lib64/libssl.so.3",
                  "/usr/lib/libssl.so.3", "/usr/lib/*/libgnutls.so.30",
                  "/lib/*/libgnutls.so.30", "/usr/lib64/libgnutls.so.30",
                  "/usr/lib/libgnutls.so.30")


@dataclass(frozen=True, slots=True, kw_only=True)
class PlaintextConfig:
    """[tls_plaintext] of sensor.toml (sensor/config.py holds the defaults)."""

    budget_octets: int = 16384          # per connection and direction before grants
    processes: tuple[str, ...] = ()     # comm names; empty: every process
    cgroups: tuple[str, ...] = ()       # cgroup v2 directories; empty: every cgroup
    ports: tuple[int, ...] = ()         # either end; empty: every port
    rescan_s: float = 5.0
    ringbuf_pages: int = 256


def cgroup2_root() -> Path:
    """Where the cgroup v2 hierarchy is mounted: /sys/fs/cgroup, or .../unified on a
    hybrid (v1 + v2) host."""
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 2 and fields[2] == "cgroup2":
                return Path(fields[1])
    except OSError:
        pass
    return Path("/sys/fs/cgroup")


def cgroup_id(path: str) -> int:
    """A cgroup v2 directory's id, as bpf_get_current_cgroup_id returns it: the 8-byte
    file handle name_to_handle_at(2) gives (kernfs's 64-bit node id; st_ino can lack its
    generation bits). A relative path is under the v2 mount."""
    p = Path(path)
    if not p.is_absolute():
        p = cgroup2_root() / path

    class Handle(ctypes.Structure):
        _fields_ = [("bytes", ctypes.c_uint), ("type", ctypes.c_int),
                    ("id", ctypes.c_uint64)]

    libc = ctypes.CDLL(None, use_errno=True)
    handle, mount_id = Handle(bytes=8), ctypes.c_int()
    if libc.name_to_handle_at(-100, os.fsencode(p), ctypes.byref(handle),
                              ctypes.byref(mount_id), 0) != 0:   # AT_FDCWD
        err = ctypes.get_errno()
        raise ConfigError(f"tls_plaintext.cgroups: {p}: {os.strerror(err)}; name a cgroup v2 "
                          f"directory (under {cgroup2_root()})")
    return handle.id


@dataclass(slots=True)
class _Last:
    queue_full: int = 0
    ringbuf_full: int = 0
    no_socket: int = 0


class PlaintextSensor:
    def __init__(self, config: PlaintextConfig, *, emit: Callable[[Record], None],
                 origin, uid_of, sensor_id: str = "", redact: bool = True,
                 refill_octets: int = 2048, proc: Path = Path("/proc"),
                 rules=None, client_auth_of=lambda key: None) -> None:
        """rules: the wire's rules Analyzer (LiveL7.rules), or None; client_auth_of:
        as PlaintextL7's."""
        self.config = config
        self.probe: tlsprobe.TlsProbe | None = None
        self.l7 = PlaintextL7(emit=emit, control=self, origin=origin, uid_of=uid_of,
                              client_auth_of=client_auth_of, sensor_id=sensor_id,
                              budget=config.budget_octets, refill_octets=refill_octets,
                              ports=config.ports, redact=redact, rules=rules)
        self._queue: deque[tuple[tlsprobe.Chunk, tuple]] = deque()
        self.queue_full = 0
        self._proc = proc
        self._seen_pids: set[int] = set()
        self._exes: set[tuple[int, int]] = set()
        self._next_scan = 0.0
        self._last = _Last()

    # -- start-up --------------------------------------------------------------------------

    def start(self, add_ring: Callable[[int, Callable[[bytes], None]], None]) -> None:
        cfg = self.config
        cgroups = tuple(cgroup_id(c) for c in cfg.cgroups)
        self.probe = tlsprobe.load(tlsprobe.TlsProbeOptions(ringbuf_pages=cfg.ringbuf_pages))
        try:
            self.probe.configure(budget=cfg.budget_octets, comms=cfg.processes,
                                 cgroup_ids=cgroups)
            add_ring(self.probe.events_fd, self._on_event)
            for pattern in HOST_LIBRARIES:
                for path in sorted(glob.glob(pattern)):
                    self.probe.attach_library(path, tlsprobe.library_kind(path))
            self.rescan()
        except BaseException:
            self.close()
            raise

    def _on_event(self, raw: bytes) -> None:
        if len(self._queue) >= QUEUE_CHUNKS:
            self.queue_full += 1
            return
        chunk = tlsprobe.Chunk.parse(raw)
        if chunk.flags & tlsprobe.EV_BIND:
            self.l7.bind(chunk)   # SSL_set_fd: no data, the socket to look up
            return
        self._queue.append((chunk, self.l7.locate(chunk)))

    # -- libraries -------------------------------------------------------------------------

    def rescan(self) -> None:
        """Reads the maps of processes not seen before; attaches new library inodes."""
        now = time.monotonic()
        self._next_scan = now + self.config.rescan_s
        deadline = now + SCAN_BUDGET_S
        pids = set()
        for entry in os.scandir(self._proc):
            if entry.name.isdigit():
                pids.add(int(entry.name))
        seen = self._seen_pids & pids
        for pid in sorted(pids - seen):
            for path, kind in _tls_libraries(self._proc, pid):
                self.probe.attach_library(f"{self._proc}/{pid}/root{path}", kind)
            self._go_binary(pid)
            seen.add(pid)
            if time.monotonic() >= deadline and len(seen) < len(pids):
                self._next_scan = 0.0   # the rest at the next step (SCAN_BUDGET_S)
                break
        self._seen_pids = seen

    def _go_binary(self, pid: int) -> None:
        exe = f"{self._proc}/{pid}/exe"
        try:
            st = os.stat(exe)
        except OSError:
            return   # a kernel thread, gone, or not ours to read
        inode = (st.st_dev, st.st_ino)
        if inode in self._exes:
            return
        if len(self._exes) >= MAX_EXES:
            self._exes.clear()
        self._exes.add(inode)
        if gotls.is_go(exe):
            self.probe.attach_library(exe, "go")

    # -- the loop --------------------------------------------------------------------------

    def step(self, offset_ns: int, now_mono: int) -> int:
        """Handles queued chunks; rescans when due. Returns how many were handled."""
        q = self._queue
        n = 0
        on_chunk = self.l7.on_chunk
        while q and n < CHUNKS_PER_STEP:
            chunk, located = q.popleft()
            on_chunk(chunk, offset_ns, now_mono, located)
            n += 1
        if time.monotonic() >= self._next_scan:
            self.rescan()
        return n

    @property
    def backlog(self) -> bool:
        return bool(self._queue)

    def join(self, record):
        return self.l7.join(record)

    def expire(self, now_mono: int) -> None:
        self.l7.expire(now_mono)

    def flush_all(self) -> None:
        self.l7.flush_all()

    def write_ctl(self, tgid: int, ssl: int, value: tlsprobe.TlsCtl) -> bool:
        return self.probe.write_ctl(tgid, ssl, value)

    def losses(self) -> dict[str, int]:
        """LostEvent counts since the last call, by source."""
        last = self._last
        kc = self.probe.counters() if self.probe is not None else {}
        ring = kc.get("ringbuf_full", 0)
        now = _Last(queue_full=self.queue_full, ringbuf_full=ring,
                    no_socket=self.l7.stats.no_socket)
        out = {LostSource.TLS_RINGBUF_FULL.value: (now.ringbuf_full - last.ringbuf_full)
               + (now.queue_full - last.queue_full),
               LostSource.TLS_NO_SOCKET.value: now.no_socket - last.no_socket}
        self._last = now
        return {k: v for k, v in out.items() if v > 0}

    def counters(self) -> dict[str, int]:
        return self.probe.counters() if self.probe is not None else {}

    def close(self) -> None:
        if self.probe is not None:
            self.probe.close()
            self.probe = None


def _tls_libraries(proc: Path, pid: int) -> list[tuple[str, str]]:
    """(path in the process's root, kind) of the TLS libraries a process maps."""
    try:
        text = (proc / str(pid) / "maps").read_text()
    except OSError:
        return []   # gone, or not ours to read
    if "libssl.so.3" not in text and "libgnutls.so.30" not in text:
        return []
    out = {}
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6 or not parts[5].startswith("/"):
            continue
        path = parts[5]
        if path.endswith(" (deleted)"):
            continue
        kind = tlsprobe.library_kind(path)
        if kind:
            out[path] = kind
    return sorted(out.items())
