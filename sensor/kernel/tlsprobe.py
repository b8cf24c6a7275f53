"""The TLS plaintext probes (bpf/tls_probe.c): compiled and loaded in a short-lived child
(sensor/kernel/bccload.py, like every program), attached here.

Attaching. The child loads the uprobe programs and attaches the syscall tracepoints
(bcc does that for TRACEPOINT_PROBE); the uprobes are attached in this process with
perf_event_open(2) on the kernel's "uprobe" PMU (path and file offset), then
PERF_EVENT_IOC_SET_BPF. So a library found later (a container's own libssl) costs a
few syscalls, not a compile. A uprobe sits on the library's inode: every process that
maps it, including those started afterwards, runs the probe. Each inode is attached
once (`attach_library` keys on st_dev/st_ino).

A library without the functions (stripped of its dynamic symbols, a version that
renamed them, not a TLS library at all) is a one-line warning naming it, never an
error: the rest of the sensor does not depend on it.

Go binaries (kind "go") carry crypto/tls inside: sensor/kernel/gotls.py finds the entry
and RET offsets, each RET gets an entry-type uprobe running the return program.

Detaching. Closing a uprobe's perf event that holds a program waits in the kernel for
the uprobe to be unregistered, grace periods included: measured 0.10-0.15 s per event
on an idle 6.18 host, and closes from several threads still complete one after another
(a kernel-wide lock). The ~50 perf events of the two libraries and two Go binaries took
5-7 s of the stop, and a sensor on a busy host was seen still stopping 60 s after
SIGTERM (systemd's TimeoutStopSec). So where the kernel has uprobe_multi links (6.6+),
each program goes on all its offsets in a file with one link (BPF_LINK_CREATE,
BPF_TRACE_UPROBE_MULTI; the programs are loaded with that expected attach type): a link
unregisters all its uprobes and then waits once, and close() closes the links from
CLOSE_THREADS threads, whose waits overlap (21 links: 0.1 s). An older kernel keeps one
perf event per uprobe. Either way the probes are bounded: at most MAX_GO_BINARIES Go
binaries (a host that runs more, a build farm or a loop building a new client each time,
gets a one-line warning per binary past it) and MAX_GO_RETURNS return points per function.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sensor.errors import KernelError, PrivilegeError
from sensor.kernel import bccload, bpfsys, gotls
from sensor.kernel.counters import possible_cpus
from sensor.kernel.elfsyms import ElfError, function_offsets
from sensor.kernel.loader import (
    BPF_DIR, bcc_missing, check_headers, check_map_layout, check_ringbuf,
    check_ringbuf_pages, effective_caps, refused,
)
from sensor.kernel.ringbuf import RingBuffer

log = logging.getLogger(__name__)

SOURCE = BPF_DIR / "tls_probe.c"
KPROBE = 2   # BPF_PROG_TYPE_KPROBE: uprobes are kprobe programs, as bcc's BPF.KPROBE
BPF_TRACE_UPROBE_MULTI = 48            # enum bpf_attach_type (Linux 6.6)
BPF_F_UPROBE_MULTI_RETURN = 1
_NO_MULTI = (22, 95, 524)   # EINVAL, EOPNOTSUPP, ENOTSUPP: the kernel has no such link

# ---- ctypes mirrors of bpf/loupe.h (TLS plaintext section) -------------------------------


class TlsConnKey(ctypes.Structure):
    _fields_ = [("ssl", ctypes.c_uint64), ("tgid", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class TlsCtl(ctypes.Structure):
    _fields_ = [("grant", ctypes.c_uint64 * 2), ("skip_until", ctypes.c_uint64 * 2),
                ("flags", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class TlsConn(ctypes.Structure):
    _fields_ = [("offset", ctypes.c_uint64 * 2), ("copied", ctypes.c_uint64 * 2),
                ("truncated", ctypes.c_uint64 * 2), ("skipped", ctypes.c_uint64 * 2),
                ("fd", ctypes.c_int32), ("fd_src", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3)]


class TlsConfig(ctypes.Structure):
    _fields_ = [("enabled", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("budget", ctypes.c_uint32 * 2)]


class TlsFdKey(ctypes.Structure):
    _fields_ = [("tgid", ctypes.c_uint32), ("fd", ctypes.c_int32)]


class TlsSock(ctypes.Structure):
    _fields_ = [("saddr", ctypes.c_uint8 * 16), ("daddr", ctypes.c_uint8 * 16),
                ("sport", ctypes.c_uint16), ("dport", ctypes.c_uint16),
                ("family", ctypes.c_uint16), ("accepted", ctypes.c_uint16)]


class TlsEvent(ctypes.Structure):
    _fields_ = [("ts_ns", ctypes.c_uint64), ("ssl", ctypes.c_uint64),
                ("offset", ctypes.c_uint64), ("cgroup_id", ctypes.c_uint64),
                ("tgid", ctypes.c_uint32), ("tid", ctypes.c_uint32), ("fd", ctypes.c_int32),
                ("len", ctypes.c_uint32), ("cap_len", ctypes.c_uint16), ("dir", ctypes.c_uint8),
                ("lib", ctypes.c_uint8), ("fd_src", ctypes.c_uint8), ("flags", ctypes.c_uint8),
                ("pad", ctypes.c_uint8 * 2), ("comm", ctypes.c_char * 16), ("sock", TlsSock)]


assert ctypes.sizeof(TlsFdKey) == 8
assert ctypes.sizeof(TlsSock) == 40
assert ctypes.sizeof(TlsConnKey) == 16
assert ctypes.sizeof(TlsCtl) == 40
assert ctypes.sizeof(TlsConn) == 72
assert ctypes.sizeof(TlsConfig) == 16
assert ctypes.sizeof(TlsEvent) == 112
EVENT_SIZE = 112
EV_SOCK, EV_BIND, EV_PROGRESS = 0x01, 0x02, 0x04

READ, WRITE = 0, 1                       # LOUPE_TLS_READ / WRITE
FD_NONE, FD_SET_FD, FD_SYSCALL = 0, 1, 2
SEL_COMM, SEL_CGROUP, HAS_GO = 0x01, 0x02, 0x04
CTL_DONE = 0x01
LIBS = {1: "openssl", 2: "gnutls", 3: "go"}
# Go binaries probed at once: each costs ~20 uprobes (perf events) to attach and to close
# (see Detaching above). Every Go program of a host that links crypto/tls counts (the go
# tool itself does), each rebuild is a new inode.
MAX_GO_BINARIES = 64
# Return points of one crypto/tls function: Go 1.17-1.23's Read and Write have 5-10.
MAX_GO_RETURNS = 64
# Threads closing perf events at stop (concurrent unregisters share grace periods).
CLOSE_THREADS = 64
COUNTER_NAMES = ("calls", "events", "copied", "truncated", "skipped", "ringbuf_full",
                 "ringbuf_octets", "calls_full", "read_failed", "not_selected")


@dataclass(frozen=True, slots=True)
class Chunk:
    """One event: plaintext a process read (dir READ) or wrote (WRITE) through one object."""

    ts_ns: int          # kernel monotonic
    tgid: int
    tid: int
    ssl: int
    fd: int             # -1: unknown
    fd_src: int
    dir: int
    lib: str
    offset: int         # stream offset of data[0], per object and direction
    length: int         # octets of the call from offset on; more than len(data) if cut
    cgroup_id: int
    comm: str
    data: bytes
    # (local address, port, remote address, port) when the kernel saw the fd connect, or
    # saw it accepted (then `accepted`: the peer initiated)
    sock: tuple[bytes, int, bytes, int] | None = None
    flags: int = 0      # EV_BIND: SSL_set_fd, no data; EV_PROGRESS: the stream is at offset
    accepted: bool = False

    @classmethod
    def parse(cls, raw: bytes) -> Chunk:
        ev = TlsEvent.from_buffer_copy(raw[:EVENT_SIZE])
        sock, accepted = None, False
        if ev.flags & EV_SOCK:
            accepted = bool(ev.sock.accepted)
            s = ev.sock
            n = 4 if s.family == 2 else 16
            sock = (bytes(s.saddr[:n]), s.sport, bytes(s.daddr[:n]), s.dport)
        return cls(ts_ns=ev.ts_ns, tgid=ev.tgid, tid=ev.tid, ssl=ev.ssl, fd=ev.fd,
                   fd_src=ev.fd_src, dir=ev.dir & 1, lib=LIBS.get(ev.lib, "?"),
                   offset=ev.offset, length=ev.len, cgroup_id=ev.cgroup_id,
                   comm=ev.comm.decode(errors="replace"),
                   data=raw[EVENT_SIZE:EVENT_SIZE + ev.cap_len], sock=sock, flags=ev.flags,
                   accepted=accepted)


# ---- libraries ---------------------------------------------------------------------------

# function -> (entry program, return program or None). The read and write functions are
# what the plaintext needs; the others bind objects to sockets and end them.
FUNCTIONS = {
    "openssl": {
        "SSL_read": ("tls_enter_read", "tls_leave_int"),
        "SSL_write": ("tls_enter_write", "tls_leave_int"),
        "SSL_read_ex": ("tls_enter_read_ex", "tls_leave_ex"),
        "SSL_write_ex": ("tls_enter_write_ex", "tls_leave_ex"),
        "SSL_set_fd": ("tls_set_fd", None),
        "SSL_free": ("tls_free", None),
    },
    "gnutls": {
        "gnutls_record_recv": ("tls_enter_gnutls_recv", "tls_leave"),
        "gnutls_record_send": ("tls_enter_gnutls_send", "tls_leave"),
        "gnutls_deinit": ("tls_free", None),
        "gnutls_transport_set_int2": ("tls_set_fd", None),
    },
    # Go's crypto/tls: the return program goes on each RET (gotls.py), not a uretprobe.
    "go": {
        gotls.READ: ("tls_enter_go_read", "tls_leave_go"),
        gotls.WRITE: ("tls_enter_go_write", "tls_leave_go"),
        gotls.CLOSE: ("tls_free_go", None),
    },
}
NEEDED = {"openssl": ("SSL_read", "SSL_write"),
          "gnutls": ("gnutls_record_recv", "gnutls_record_send"),
          "go": (gotls.READ, gotls.WRITE)}
PROGRAMS = sorted({p for fns in FUNCTIONS.values() for pair in fns.values()
                   for p in pair if p})


def library_kind(path: str) -> str | None:
    """Which library a mapped file is, by its name (libssl.so.3, libgnutls.so.30)."""
    name = path.rsplit("/", 1)[-1]
    if name.startswith("libssl.so.3"):
        return "openssl"
    if name.startswith("libgnutls.so.30"):
        return "gnutls"
    return None


def _shown(path: str) -> str:
    """A /proc/PID/exe path as the program's file name (and the pid), for log lines."""
    if path.endswith("/exe"):
        try:
            return f"{os.readlink(path)} ({path})"
        except OSError:
            pass
    return path


# ---- perf_event_open on the uprobe PMU ----------------------------------------------------

_PERF_FLAG_FD_CLOEXEC = 1 << 3
_PERF_EVENT_IOC_ENABLE = 0x2400
_PERF_EVENT_IOC_SET_BPF = 0x40042408
_NR_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}
_PMU = Path("/sys/bus/event_source/devices/uprobe")


def _pmu() -> tuple[int, int]:
    """(PMU type, retprobe bit) of the kernel's uprobe PMU (CONFIG_UPROBE_EVENTS)."""
    try:
        ptype = int((_PMU / "type").read_text())
        fmt = (_PMU / "format" / "retprobe").read_text().strip()   # "config:0"
    except OSError:
        raise KernelError("this kernel has no uprobe PMU (/sys/bus/event_source/devices/"
                          "uprobe): TLS plaintext needs CONFIG_UPROBE_EVENTS") from None
    return ptype, int(fmt.split(":")[1])


def _perf_event_open(ptype: int, config: int, path: bytes, offset: int) -> int:
    attr = (ctypes.c_uint8 * 128)()
    cpath = ctypes.create_string_buffer(path)
    ctypes.c_uint32.from_buffer(attr, 0).value = ptype
    ctypes.c_uint32.from_buffer(attr, 4).value = 128
    ctypes.c_uint64.from_buffer(attr, 8).value = config
    ctypes.c_uint64.from_buffer(attr, 16).value = 1        # sample_period
    ctypes.c_uint64.from_buffer(attr, 56).value = ctypes.addressof(cpath)   # config1
    ctypes.c_uint64.from_buffer(attr, 64).value = offset   # config2
    libc = ctypes.CDLL(None, use_errno=True)
    nr = _NR_PERF_EVENT_OPEN.get(os.uname().machine)
    if nr is None:
        raise KernelError(f"TLS plaintext probes are not supported on {os.uname().machine}")
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(ctypes.c_long(nr), attr, ctypes.c_int(-1), ctypes.c_int(0),
                      ctypes.c_int(-1), ctypes.c_ulong(_PERF_FLAG_FD_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def attach_uprobe(prog_fd: int, path: str, offset: int, *, ret: bool) -> int:
    """A perf event descriptor holding the program on path+offset (closing it detaches)."""
    ptype, bit = _pmu()
    fd = _perf_event_open(ptype, (1 << bit) if ret else 0, os.fsencode(path), offset)
    try:
        fcntl.ioctl(fd, _PERF_EVENT_IOC_SET_BPF, prog_fd)
        fcntl.ioctl(fd, _PERF_EVENT_IOC_ENABLE, 0)
    except OSError:
        os.close(fd)
        raise
    return fd


class _UprobeMultiAttr(ctypes.Structure):
    """union bpf_attr's link_create, uprobe_multi member."""

    _fields_ = [("prog_fd", ctypes.c_uint32), ("target_fd", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("path", ctypes.c_uint64), ("offsets", ctypes.c_uint64),
                ("ref_ctr_offsets", ctypes.c_uint64), ("cookies", ctypes.c_uint64),
                ("cnt", ctypes.c_uint32), ("multi_flags", ctypes.c_uint32),
                ("pid", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


def attach_uprobe_multi(prog_fd: int, path: str, offsets: list[int], *, ret: bool) -> int:
    """A link holding the program on every offset of path (closing it detaches all)."""
    cpath = ctypes.create_string_buffer(os.fsencode(path))
    offs = (ctypes.c_uint64 * len(offsets))(*offsets)
    attr = _UprobeMultiAttr(prog_fd=prog_fd, attach_type=BPF_TRACE_UPROBE_MULTI,
                            path=ctypes.addressof(cpath), offsets=ctypes.addressof(offs),
                            cnt=len(offsets),
                            multi_flags=BPF_F_UPROBE_MULTI_RETURN if ret else 0)
    return bpfsys.bpf(bpfsys.BPF_LINK_CREATE, attr)


# ---- the loaded program ------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsProbeOptions:
    """Sizes passed to bpf/tls_probe.c as -D; bounds and their reasons are in loupe.h."""

    ringbuf_pages: int = 256
    conns: int = 65536

    def __post_init__(self) -> None:
        check_ringbuf_pages(self.ringbuf_pages)
        if not 1 <= self.conns <= 1 << 20:
            raise ValueError("conns must be within 1..1048576")

    def cflags(self) -> list[str]:
        return [f"-I{BPF_DIR}", f"-DLOUPE_TLS_RINGBUF_PAGES={self.ringbuf_pages}",
                f"-DLOUPE_TLS_CONNS={self.conns}"]


@dataclass(slots=True)
class Library:
    kind: str
    path: str
    functions: tuple[str, ...]   # attached
    links: list[int]


class TlsProbe:
    """Loaded programs and maps; attach_library() per library inode; close() undoes all."""

    def __init__(self, obj: bccload.BpfObject) -> None:
        self._obj = obj
        check_map_layout(obj, b"tls_ctl", 16, 40, mirror="sensor/kernel/tlsprobe.py",
                         header="bpf/loupe.h")
        check_map_layout(obj, b"tls_conns", 16, 72, mirror="sensor/kernel/tlsprobe.py",
                         header="bpf/loupe.h")
        check_map_layout(obj, b"tls_fd_sock", 8, 40, mirror="sensor/kernel/tlsprobe.py",
                         header="bpf/loupe.h")
        self._ctl = obj.map_fd("tls_ctl")
        self._conns = obj.map_fd("tls_conns")
        self._counters = obj.map_fd("tls_counters")
        self._ncpus = possible_cpus()
        self._ring: RingBuffer | None = None
        self.libraries: dict[tuple[int, int], Library] = {}
        self.refused: dict[tuple[int, int], str] = {}   # inode -> why (said once)
        self._config = TlsConfig()
        self._multi = True   # uprobe_multi links work (until the kernel says not)

    # -- configuration ---------------------------------------------------------------------

    def configure(self, *, budget: int, comms: tuple[str, ...] = (),
                  cgroup_ids: tuple[int, ...] = ()) -> None:
        """Selection lists first, then the config entry that switches the probes on."""
        one = ctypes.c_uint8(1)
        for comm in comms:
            bpfsys.update(self._obj.map_fd("tls_sel_comm"),
                          (ctypes.c_char * 16)(*comm.encode()[:15]), one)
        for cg in cgroup_ids:
            bpfsys.update(self._obj.map_fd("tls_sel_cgroup"), ctypes.c_uint64(cg), one)
        flags = (SEL_COMM if comms else 0) | (SEL_CGROUP if cgroup_ids else 0)
        cfg = TlsConfig(enabled=1, flags=flags | (self._config.flags & HAS_GO))
        cfg.budget[0] = cfg.budget[1] = budget
        bpfsys.update(self._obj.map_fd("tls_config"), ctypes.c_uint32(0), cfg)
        self._config = cfg

    # -- libraries -------------------------------------------------------------------------

    def attach_library(self, path: str, kind: str) -> Library | None:
        """Attaches the probes to the library at `path` once per inode; None (and a
        warning, once) when it has none of the functions or cannot be probed."""
        try:
            st = os.stat(path)
        except OSError as exc:
            log.debug("TLS library %s: %s", path, exc)
            return None
        inode = (st.st_dev, st.st_ino)
        if inode in self.libraries or inode in self.refused:
            return self.libraries.get(inode)
        if kind == "go":
            if sum(lib.kind == "go" for lib in self.libraries.values()) >= MAX_GO_BINARIES:
                why = (f"{MAX_GO_BINARIES} Go binaries are probed already (the bound: each "
                       "costs ~20 uprobes to attach and to detach); its plaintext is not seen")
                self.refused[inode] = why
                log.warning("TLS plaintext: go %s: %s", _shown(path), why)
                return None
            try:
                points = gotls.find(path)
            except gotls.GoTlsError as exc:
                points, why = None, str(exc)
            else:
                if points is None:
                    self.refused[inode] = ""   # Go without crypto/tls: nothing to say
                    return None
                why = self._attach_go(inode, path, points)
        else:
            why = self._attach(inode, path, kind)
        if why:
            self.refused[inode] = why
            log.warning("TLS plaintext: %s %s: %s", kind, _shown(path), why)
            return None
        return self.libraries[inode]

    def _attach(self, inode: tuple[int, int], path: str, kind: str) -> str:
        fns = FUNCTIONS[kind]
        try:
            offsets = function_offsets(path, set(fns))
        except (OSError, ElfError) as exc:
            return f"cannot read its symbols ({exc}); its plaintext is not seen"
        missing = [f for f in NEEDED[kind] if f not in offsets]
        if missing:
            return (f"no {' or '.join(missing)} symbol (stripped, or another version); "
                    "its plaintext is not seen")
        sites = []
        for name, off in sorted(offsets.items()):
            entry, ret = fns[name]
            sites.append((entry, off, False))
            if ret:
                sites.append((ret, off, True))
        try:
            links = self._link(path, sites)
        except OSError as exc:
            hint = " (needs CAP_PERFMON, or root)" if exc.errno in (1, 13) else ""
            return f"attaching uprobes failed: {exc.strerror}{hint}"
        self.libraries[inode] = Library(kind, path, tuple(sorted(offsets)), links)
        log.info("TLS plaintext: probes on %s %s (%s)", kind, path, ", ".join(sorted(offsets)))
        return ""

    def _attach_go(self, inode: tuple[int, int], path: str, points: gotls.GoTls) -> str:
        many = max(len(points.read.returns), len(points.write.returns))
        if many > MAX_GO_RETURNS:
            return (f"{many} return points in one crypto/tls function (at most "
                    f"{MAX_GO_RETURNS} are probed); its plaintext is not seen")
        sites = [("tls_enter_go_read", points.read.offset, False),
                 ("tls_enter_go_write", points.write.body, False)]   # past the stack check
        sites += [("tls_leave_go", off, False)
                  for off in (*points.read.returns, *points.write.returns)]
        if points.close is not None:
            sites.append(("tls_free_go", points.close, False))
        try:
            links = self._link(path, sites)
        except OSError as exc:
            hint = " (needs CAP_PERFMON, or root)" if exc.errno in (1, 13) else ""
            return f"attaching uprobes failed: {exc.strerror}{hint}"
        names = (gotls.READ, gotls.WRITE) + ((gotls.CLOSE,) if points.close is not None else ())
        self.libraries[inode] = Library("go", path, names, links)
        if not self._config.flags & HAS_GO:
            # The syscall tracepoints now also look for goroutines' calls (loupe.h).
            self._config.flags |= HAS_GO
            bpfsys.update(self._obj.map_fd("tls_config"), ctypes.c_uint32(0), self._config)
        log.info("TLS plaintext: probes on Go crypto/tls in %s (%d return points)",
                 _shown(path), len(points.read.returns) + len(points.write.returns))
        return ""

    def _link(self, path: str, sites: list[tuple[str, int, bool]]) -> list[int]:
        """Attaches (program, file offset, uretprobe?) sites of one file: one uprobe_multi
        link per program and kind where loaded for it, else a perf event per site; all
        or none (OSError)."""
        groups: dict[tuple[str, bool], list[int]] = {}
        for name, off, ret in sites:
            groups.setdefault((name, ret), []).append(off)
        links: list[int] = []
        try:
            for (name, ret), offs in groups.items():
                prog = self._obj.prog_fd(name)
                if self._multi and name in self._obj.attach_types:
                    try:
                        links.append(attach_uprobe_multi(prog, path, offs, ret=ret))
                        continue
                    except OSError as exc:
                        # A 5.18-6.5 kernel loads a kprobe program with any expected
                        # attach type but has no uprobe_multi link: perf events then.
                        if exc.errno not in _NO_MULTI:
                            raise
                        self._multi = False
                        log.info("TLS plaintext: no uprobe_multi links on this kernel (%s); "
                                 "one perf event per uprobe", exc.strerror)
                for off in offs:
                    links.append(attach_uprobe(prog, path, off, ret=ret))
        except OSError:
            close_links(links)
            raise
        return links

    # -- events and control ----------------------------------------------------------------

    @property
    def events_fd(self) -> int:
        """The ring buffer map, for a reader that polls it with others (loader.add_ring)."""
        return self._obj.map_fd("tls_events")

    def open_events(self, handler: Callable[[bytes], None]) -> None:
        if self._ring is None:
            self._ring = RingBuffer()
            self._ring.add(self._obj.map_fd("tls_events"), handler)

    def poll(self, timeout_ms: int) -> None:
        if self._ring is not None:
            self._ring.poll(timeout_ms)

    def ctl(self, tgid: int, ssl: int) -> TlsCtl:
        value = TlsCtl()
        bpfsys.lookup(self._ctl, TlsConnKey(ssl=ssl, tgid=tgid), value, lock=False)
        return value

    def write_ctl(self, tgid: int, ssl: int, value: TlsCtl) -> bool:
        """False when the map is full (the caller counts it)."""
        try:
            bpfsys.update(self._ctl, TlsConnKey(ssl=ssl, tgid=tgid), value)
        except bpfsys.BpfError:
            return False
        return True

    def conn(self, tgid: int, ssl: int) -> TlsConn | None:
        value = TlsConn()
        if not bpfsys.lookup(self._conns, TlsConnKey(ssl=ssl, tgid=tgid), value, lock=False):
            return None
        return value

    def counters(self) -> dict[str, int]:
        values = (ctypes.c_uint64 * self._ncpus)()
        out = {}
        for i, name in enumerate(COUNTER_NAMES):
            bpfsys.lookup(self._counters, ctypes.c_uint32(i), values, lock=False)
            out[name] = sum(values)
        return out

    def program_fds(self) -> list[int]:
        return list(self._obj.programs.values())

    def close(self) -> None:
        started = time.monotonic()
        links = [fd for lib in self.libraries.values() for fd in lib.links]
        self.libraries = {}
        close_links(links)
        if links:
            log.info("TLS plaintext: probes detached (%d links) in %.1f s", len(links),
                     time.monotonic() - started)
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        self._obj.close()


def close_links(fds: list[int]) -> None:
    """Closes uprobe perf events, CLOSE_THREADS at a time (each close waits for grace
    periods, which concurrent closes share: see Detaching above)."""
    n = min(CLOSE_THREADS, len(fds))
    if n <= 1:
        for fd in fds:
            os.close(fd)
        return

    def close_all(part: list[int]) -> None:
        for fd in part:
            os.close(fd)

    threads = [threading.Thread(target=close_all, args=(fds[i::n],), name="uprobe-close",
                                daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


_CAP_SYS_ADMIN = 21
_CAP_PERFMON = 38
_CAP_BPF = 39
# What TLS plaintext needs besides the flow meter's three, once the sensor runs as its
# own user (measured on this kernel with setpriv; docs/tls-plaintext.md): attaching a
# uprobe is perf_event_open on the uprobe PMU, which CAP_PERFMON allows; but the files
# it reads about other users' processes are ptrace-guarded: /proc/PID/maps (libraries to
# attach), /proc/PID/root/... (a container's library), /proc/PID/ns/net, and
# /proc/PID/fd/N (an accepted socket's inode), whose directory is also mode 0500 of the
# process's owner. CAP_SYS_PTRACE passes the ptrace check (read access only is used),
# CAP_DAC_READ_SEARCH the directory; neither alone reads an fd link.
_CAP_DAC_READ_SEARCH = 2
_CAP_SYS_PTRACE = 19
RUNTIME_CAPS = (("CAP_DAC_READ_SEARCH", _CAP_DAC_READ_SEARCH),
                ("CAP_SYS_PTRACE", _CAP_SYS_PTRACE))


def check_privileges() -> None:
    caps = effective_caps()
    if not caps & (1 << _CAP_SYS_ADMIN) and not (caps & (1 << _CAP_BPF)
                                                   and caps & (1 << _CAP_PERFMON)):
        raise PrivilegeError("TLS plaintext probes need root, or CAP_BPF and CAP_PERFMON: "
                             "run the sensor with sudo (or as loupe-sensor.service)")


def load(options: TlsProbeOptions | None = None) -> TlsProbe:
    """Compiles bpf/tls_probe.c in a child and loads it; nothing is attached to a
    library yet (attach_library), and the probes do nothing until configure()."""
    options = options or TlsProbeOptions()
    check_privileges()
    check_headers()
    check_ringbuf()
    _pmu()
    try:
        obj = bccload.load(SOURCE, options.cflags(), {p: KPROBE for p in PROGRAMS},
                           {p: BPF_TRACE_UPROBE_MULTI for p in PROGRAMS})
    except bccload.LoadError as exc:
        if exc.stage == "import":
            raise bcc_missing() from None
        if refused(exc):
            raise PrivilegeError(f"loading the TLS plaintext probes was refused: {exc}; "
                                 "run as root") from None
        raise KernelError(f"loading bpf/tls_probe.c failed: {exc}") from None
    try:
        return TlsProbe(obj)
    except BaseException:
        obj.close()
        raise
