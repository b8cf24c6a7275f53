"""Process attribution: which local process started or accepted a flow.

Sources, from exact to best-effort:
- connect(): bpf/process.c sees the socket enter TCP_SYN_SENT inside connect(), in the
  owner's context, and sends pid, tid, comm, uid, gid and cgroup id with the final
  4-tuple when the handshake ends. Exact, and it survives the process: those fields come
  from the kernel. exe and the cgroup path (hence the container id) are read from /proc
  the moment the event arrives; a process that is already gone by then still has
  everything but exe (the cgroup path falls back to the cgroup id, see CgroupIndex).
- accept(): the handshake completes in softirq context, so the kernel event carries the
  4-tuple only, and the flow is attributed to the owner of the listening socket: the
  task that called listen() (a LISTEN event, exact) if one listener matches, else the
  socket tables in /proc (SocketTable). With a pre-forking server the listener's owner
  is the parent or whichever process the kernel saw call listen(), not the worker that
  accept()ed.
- UDP: no tracepoint in this design sees UDP sockets, so UDP flows are looked up in the
  socket tables by local address and port when the flow is enriched. It works while the
  socket is open; a sender that exited before that is not attributed.

Namespaces: /proc/net/* shows only the reader's network namespace, so SocketTable reads
/proc/PID/net/* of one process per namespace and maps socket inodes to pids through
/proc/PID/fd. This is why psutil.net_connections() (root namespace only) is not used.

Everything is bounded (limits in ProcessLimits, reason for each there) and every entry
that falls out of a cache or event that cannot be used is counted in stats().
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
import logging
import os
import pwd
import re
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Generic, Protocol, TypeVar

import psutil

from sensor.model import Flow, ProcessInfo

log = logging.getLogger(__name__)

PROTO_TCP = 6
PROTO_UDP = 17
AF_INET = 2
AF_INET6 = 10

# struct loupe_proc_event kinds (bpf/process.h)
KIND_CONNECT = 1
KIND_ACCEPT = 2
KIND_LISTEN = 3
KIND_LISTEN_CLOSE = 4
HAS_TASK = 0x01

PROC_EVENT_SIZE = 112


class ProcEvent(ctypes.Structure):
    """Mirror of struct loupe_proc_event (bpf/process.h)."""

    _fields_ = [
        ("ts_ns", ctypes.c_uint64),
        ("task_ts_ns", ctypes.c_uint64),
        ("sock_cookie", ctypes.c_uint64),
        ("cgroup_id", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("gid", ctypes.c_uint32),
        ("saddr", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("family", ctypes.c_uint16),
        ("protocol", ctypes.c_uint8),
        ("kind", ctypes.c_uint8),
        ("oldstate", ctypes.c_uint8),
        ("newstate", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 5),
        ("comm", ctypes.c_char * 16),
    ]


assert ctypes.sizeof(ProcEvent) == PROC_EVENT_SIZE, "bpf/process.h and ProcEvent differ"


class Side(enum.Enum):
    """Which end of a flow a process owns: the initiator (src) or the responder (dst)."""

    INITIATOR = "initiator"
    RESPONDER = "responder"


# (protocol, src_addr, src_port, dst_addr, dst_port), initiator first, canonical addresses.
FlowKey = tuple[int, str, int, str, int]


def canonical_addr(addr: str | bytes | ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """One spelling per address; an IPv4-mapped IPv6 address (a dual-stack socket talking
    IPv4) becomes the IPv4 address the packets carry."""
    if isinstance(addr, str) and ":" not in addr:
        # Dotted quads that parse at all (model.Flow validates them; Python refuses
        # leading zeros) have one spelling: skip the ~4 us ipaddress round trip.
        return addr
    ip = ipaddress.ip_address(addr)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def flow_key(flow: Flow | FlowKey) -> FlowKey:
    if isinstance(flow, tuple):
        proto, src, sport, dst, dport = flow
    else:
        proto, src, sport = flow.protocol, flow.src_addr, flow.src_port
        dst, dport = flow.dst_addr, flow.dst_port
    return (proto, canonical_addr(src), sport, canonical_addr(dst), dport)


# ---- kernel events (sans-I/O) -------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SocketEvent:
    """One decoded struct loupe_proc_event. local/remote are (canonical address, port)."""

    kind: int
    ts_ns: int
    cookie: int
    family: int
    local: tuple[str, int]
    remote: tuple[str, int]
    has_task: bool
    pid: int = 0
    tid: int = 0
    uid: int = 0
    gid: int = 0
    cgroup_id: int = 0
    comm: str = ""
    oldstate: int = 0
    newstate: int = 0


def _addr(raw: ctypes.Array, family: int) -> str:
    data = bytes(raw)
    if family == AF_INET:
        return str(ipaddress.IPv4Address(data[:4]))
    return canonical_addr(ipaddress.IPv6Address(data))


@dataclass(slots=True)
class EventDecoder:
    """Bytes in, SocketEvent out; what cannot be decoded is counted, never raised."""

    malformed: int = 0
    unknown: int = 0

    def decode(self, raw: bytes) -> SocketEvent | None:
        if len(raw) < PROC_EVENT_SIZE:
            self.malformed += 1
            return None
        ev = ProcEvent.from_buffer_copy(raw[:PROC_EVENT_SIZE])
        if ev.kind not in (KIND_CONNECT, KIND_ACCEPT, KIND_LISTEN, KIND_LISTEN_CLOSE):
            self.unknown += 1
            return None
        if ev.family not in (AF_INET, AF_INET6):
            self.malformed += 1
            return None
        has_task = bool(ev.flags & HAS_TASK)
        return SocketEvent(
            kind=ev.kind, ts_ns=ev.ts_ns, cookie=ev.sock_cookie, family=ev.family,
            local=(_addr(ev.saddr, ev.family), ev.sport),
            remote=(_addr(ev.daddr, ev.family), ev.dport),
            has_task=has_task, pid=ev.pid, tid=ev.tid, uid=ev.uid, gid=ev.gid,
            cgroup_id=ev.cgroup_id,
            comm=ev.comm.decode("utf-8", "replace") if has_task else "",
            oldstate=ev.oldstate, newstate=ev.newstate,
        )


# ---- cgroups and containers (sans-I/O parsers) ---------------------------------------------

# Container runtimes name a container's cgroup after its 64-hex id:
#   docker (systemd driver)      .../docker-<id>.scope
#   docker (cgroupfs driver)     /docker/<id>
#   containerd / CRI             .../cri-containerd-<id>.scope, /kubepods/.../pod<uid>/<id>
#   CRI-O                        .../crio-<id>.scope
#   podman / libpod              .../libpod-<id>.scope, /machine.slice/libpod-<id>.scope/container
# The runtime's monitor process lives in *-conmon-<id>.scope: it is not the container.
_CONTAINER_COMPONENT = re.compile(
    r"^(?:(?:docker|cri-containerd|crio|libpod|containerd)-)?([0-9a-f]{64})(?:\.scope)?$"
)


def container_id_from_path(path: str) -> str:
    """The container id in a cgroup path, innermost match first, or "" outside a container."""
    for component in reversed(path.split("/")):
        if "conmon" in component:
            return ""
        m = _CONTAINER_COMPONENT.match(component)
        if m:
            return m.group(1)
    return ""


def cgroup_path_from_proc(text: str) -> str:
    """The process's cgroup path from /proc/PID/cgroup: the cgroup v2 line ("0::/path")
    when there is one, else the v1 line that names a container, else systemd's."""
    v1_systemd = ""
    v1_container = ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and controllers == "":
            return path
        if not v1_container and container_id_from_path(path):
            v1_container = path
        if controllers == "name=systemd":
            v1_systemd = path
    return v1_container or v1_systemd


def container_id_from_proc(text: str) -> str:
    """Container id from the whole of /proc/PID/cgroup: any hierarchy may name it (on a
    hybrid v1/v2 host the runtime may place the task only in v1 hierarchies)."""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            cid = container_id_from_path(parts[2])
            if cid:
                return cid
    return ""


# ---- a bounded TTL cache ---------------------------------------------------------------------

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedTtlCache(Generic[K, V]):
    """Least-recently-used mapping with a size bound and a time-to-live. Reads refresh
    recency but not age (an entry lives ttl_ns from its last put). Evictions (room for a
    new entry) and expirations are counted separately: the first is a loss, the second
    is the policy working."""

    __slots__ = ("_data", "_max", "_ttl", "_clock", "evicted", "expired")

    def __init__(self, max_entries: int, ttl_ns: int, clock: Callable[[], int]) -> None:
        if max_entries < 1 or ttl_ns < 1:
            raise ValueError("max_entries and ttl_ns must be positive")
        self._data: OrderedDict[K, tuple[int, V]] = OrderedDict()
        self._max = max_entries
        self._ttl = ttl_ns
        self._clock = clock
        self.evicted = 0
        self.expired = 0

    def get(self, key: K) -> V | None:
        item = self._data.get(key)
        if item is None:
            return None
        born, value = item
        if self._clock() - born > self._ttl:
            del self._data[key]
            self.expired += 1
            return None
        self._data.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        if key in self._data:
            del self._data[key]
        elif len(self._data) >= self._max:
            self._data.popitem(last=False)
            self.evicted += 1
        self._data[key] = (self._clock(), value)

    def pop(self, key: K) -> V | None:
        item = self._data.pop(key, None)
        return None if item is None else item[1]

    def __len__(self) -> int:
        return len(self._data)

    def values(self) -> Iterator[V]:
        return (v for _, v in self._data.values())


# ---- /proc readers -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessLimits:
    """Every bound of the attributor, with its reason."""

    # Attributions kept (flow key and side -> ProcessInfo). One per locally owned flow
    # end; the flow meter tracks 65536 flows by default and most hosts own far fewer.
    max_flows: int = 65536
    # A flow is exported at the latest after its idle timeout (300 s TCP) or at every
    # active timeout (1800 s): an attribution must outlive both.
    flow_ttl_ns: int = 3600 * 10**9
    # pid -> /proc details. Avoids re-reading /proc for a process opening many
    # connections; short so a reused pid is not mistaken for its predecessor (a comm
    # mismatch also forces a re-read).
    max_pids: int = 4096
    pid_ttl_ns: int = 5 * 10**9
    # Listening sockets remembered from LISTEN events (a host rarely has more than a few
    # hundred); a listener older than this program is found in the socket tables instead.
    max_listeners: int = 16384
    # Socket tables are rebuilt at most this often: a rebuild walks /proc/*/fd, which costs
    # milliseconds on a busy host, and a flow the tables do not know (not local) would
    # otherwise trigger one per lookup.
    socket_table_max_age_ns: int = 10**9
    # Processes and sockets walked per rebuild: pid_max is 4194304 on 64-bit, far above any
    # real process count; the socket bound caps the memory of one snapshot (~100 B each).
    max_scan_pids: int = 65536
    max_scan_sockets: int = 1 << 20
    # cgroup directories indexed to turn a cgroup id into a path (systemd hosts have a few
    # hundred; Kubernetes nodes a few thousand). Rebuilt at most once per max age.
    max_cgroups: int = 65536
    cgroup_index_max_age_ns: int = 10**9


def _username(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return ""


class CgroupIndex:
    """cgroup v2 id -> path. bpf_get_current_cgroup_id() is the inode number of the
    task's cgroup directory in the cgroup2 mount, so a walk of that mount maps ids to
    paths, even after every process in the cgroup has exited."""

    def __init__(self, limits: ProcessLimits, clock: Callable[[], int],
                 mountinfo: Path = Path("/proc/self/mountinfo")) -> None:
        self._limits = limits
        self._clock = clock
        self._mountinfo = mountinfo
        self._paths: dict[int, str] = {}
        self._built_ns: int | None = None
        self.truncated = 0

    def mount(self) -> Path | None:
        try:
            text = self._mountinfo.read_text()
        except OSError:
            return None
        for line in text.splitlines():
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == "cgroup2":
                return Path(left.split(" ")[4])
        return None

    def _rebuild(self) -> None:
        self._built_ns = self._clock()
        self._paths = {}
        root = self.mount()
        if root is None:
            return
        stack = [root]
        while stack:
            d = stack.pop()
            try:
                ino = d.stat().st_ino
                subdirs = [e for e in os.scandir(d) if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
            self._paths[ino] = "/" + str(d.relative_to(root)).removeprefix(".")
            if len(self._paths) >= self._limits.max_cgroups:
                self.truncated += 1
                return
            stack.extend(Path(e.path) for e in subdirs)

    def path(self, cgroup_id: int) -> str:
        if cgroup_id == 0:
            return ""
        hit = self._paths.get(cgroup_id)
        if hit is not None:
            return hit
        if (self._built_ns is None
                or self._clock() - self._built_ns > self._limits.cgroup_index_max_age_ns):
            self._rebuild()
        return self._paths.get(cgroup_id, "")

    def cgroup_id(self, path: str) -> int:
        root = self.mount()
        if root is None or not path:
            return 0
        try:
            return (root / path.lstrip("/")).stat().st_ino
        except OSError:
            return 0


@dataclass(frozen=True, slots=True)
class ProcDetails:
    """What only /proc knows about a process, read while it is alive."""

    comm: str
    exe: str
    uid: int
    cgroup_path: str
    container_id: str


def read_proc_details(pid: int, proc_root: Path) -> ProcDetails | None:
    """exe, comm, uid and cgroup of a live process, or None if it is gone. Fields the
    process hides from us (AccessDenied, a kernel thread's exe) are left empty."""
    try:
        p = psutil.Process(pid)
        comm = p.name()
        uid = p.uids().real
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        return ProcDetails("", "", 0, "", "")
    try:
        exe = p.exe()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        exe = ""
    try:
        cgroup_text = (proc_root / str(pid) / "cgroup").read_text()
    except OSError:
        cgroup_text = ""
    return ProcDetails(comm, exe, uid, cgroup_path_from_proc(cgroup_text),
                       container_id_from_proc(cgroup_text))


# ---- socket tables -----------------------------------------------------------------------------

_TCP_LISTEN = 0x0A
# Sockets without a file still worth keeping: ESTABLISHED and SYN_RECV ones waiting in a
# listener's accept queue tell which namespace a connection is in.
_KEEP_WITHOUT_FILE = frozenset({0x01, 0x03})
_WILDCARDS = frozenset({"0.0.0.0", "::"})


def parse_proc_net_addr(text: str) -> tuple[str, int]:
    """"0100007F:1F90" -> ("127.0.0.1", 8080). /proc/net/{tcp,udp}{,6} print each 32-bit
    word of the address as the kernel stores it (network order) read as a host integer,
    so on a little-endian host the bytes of every word appear reversed."""
    hexaddr, _, hexport = text.partition(":")
    raw = bytes.fromhex(hexaddr)
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return canonical_addr(ipaddress.ip_address(raw)), int(hexport, 16)


@dataclass(frozen=True, slots=True)
class _Sock:
    netns: int
    local: tuple[str, int]
    remote: tuple[str, int]
    state: int
    inode: int


@dataclass(slots=True)
class SocketSnapshot:
    by_tuple: dict[tuple[int, str, int, str, int], _Sock] = field(default_factory=dict)
    by_port: dict[tuple[int, int], list[_Sock]] = field(default_factory=dict)
    owner: dict[int, int] = field(default_factory=dict)  # socket inode -> pid


class SocketTable:
    """Every TCP/UDP socket of every network namespace and its owning pid, rebuilt at most
    once per socket_table_max_age_ns. Best-effort by nature: a socket closed before the
    rebuild is not there, and a socket shared by several processes (fork) is owned by
    the lowest pid that holds it."""

    def __init__(self, limits: ProcessLimits, clock: Callable[[], int],
                 proc_root: Path = Path("/proc")) -> None:
        self._limits = limits
        self._clock = clock
        self._proc = proc_root
        self._snap = SocketSnapshot()
        self._built_ns: int | None = None
        self.rebuilds = 0
        self.truncated = 0

    def _walk_processes(self) -> tuple[dict[int, int], dict[int, int]]:
        owner: dict[int, int] = {}
        netns_rep: dict[int, int] = {}
        pids = sorted(int(n) for n in os.listdir(self._proc) if n.isdigit())
        if len(pids) > self._limits.max_scan_pids:
            self.truncated += 1
            pids = pids[:self._limits.max_scan_pids]
        for pid in pids:
            base = f"{self._proc}/{pid}"
            try:
                ns = os.readlink(f"{base}/ns/net")
                fds = os.listdir(f"{base}/fd")
            except OSError:
                continue  # gone, or a kernel thread we may not look into
            netns_rep.setdefault(int(ns[5:-1]), pid)  # "net:[4026531840]"
            for fd in fds:
                try:
                    target = os.readlink(f"{base}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    owner.setdefault(int(target[8:-1]), pid)
            if len(owner) >= self._limits.max_scan_sockets:
                self.truncated += 1
                break
        return owner, netns_rep

    def _rebuild(self) -> None:
        self.rebuilds += 1
        self._built_ns = self._clock()
        owner, netns_rep = self._walk_processes()
        snap = SocketSnapshot(owner=owner)
        count = 0
        for netns, pid in netns_rep.items():
            for name, proto in (("tcp", PROTO_TCP), ("tcp6", PROTO_TCP),
                                ("udp", PROTO_UDP), ("udp6", PROTO_UDP)):
                try:
                    lines = Path(f"{self._proc}/{pid}/net/{name}").read_text().splitlines()
                except OSError:
                    continue
                for line in lines[1:]:
                    cols = line.split()
                    if len(cols) < 10:
                        continue
                    state, inode = int(cols[3], 16), int(cols[9])
                    if not inode and state not in _KEEP_WITHOUT_FILE:
                        # TIME_WAIT and other orphans: no owner to find, and a busy
                        # host has thousands of them; skipped before the costly parse.
                        continue
                    sock = _Sock(netns, parse_proc_net_addr(cols[1]),
                                 parse_proc_net_addr(cols[2]), state, inode)
                    snap.by_tuple.setdefault((proto, *sock.local, *sock.remote), sock)
                    snap.by_port.setdefault((proto, sock.local[1]), []).append(sock)
                    count += 1
                    if count >= self._limits.max_scan_sockets:
                        self.truncated += 1
                        self._snap = snap
                        return
        self._snap = snap

    def _fresh(self) -> SocketSnapshot:
        if (self._built_ns is None
                or self._clock() - self._built_ns > self._limits.socket_table_max_age_ns):
            self._rebuild()
        return self._snap

    def owner(self, proto: int, local: tuple[str, int], remote: tuple[str, int]) -> int | None:
        """The pid owning the local end of (local, remote), or None.

        TCP: the connected socket itself; if it has no file yet (still in the accept
        queue, inode 0) or is not found, a listener on the local port in the same
        namespace. UDP: a socket bound to the local port (address or wildcard),
        connected to remote or not connected at all."""
        snap = self._fresh()
        exact = snap.by_tuple.get((proto, *local, *remote))
        if exact is not None and exact.inode and exact.inode in snap.owner:
            return snap.owner[exact.inode]
        for sock in snap.by_port.get((proto, local[1]), ()):
            if exact is not None and sock.netns != exact.netns:
                continue
            if sock.local[0] != local[0] and sock.local[0] not in _WILDCARDS:
                continue
            if proto == PROTO_TCP and sock.state != _TCP_LISTEN:
                continue
            if proto == PROTO_UDP and sock.remote[1] not in (0, remote[1]):
                continue
            if sock.inode in snap.owner:
                return snap.owner[sock.inode]
        return None


# ---- the attributor ---------------------------------------------------------------------------


class EventSource(Protocol):
    """What the attributor needs from the kernel side (sensor.kernel.tracepoints
    .ProcessTracepoint; tests may drive handle_event() directly)."""

    def open_events(self, handler: Callable[[bytes], None]) -> None: ...
    def poll(self, timeout_ms: int) -> None: ...
    def wake(self) -> None:
        """Ends a poll() waiting in another thread (close() of a started attributor)."""
    def counters(self) -> dict[str, int]: ...
    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class _Listener:
    family: int
    addr: str
    port: int
    info: ProcessInfo


class ProcessAttributor:
    """Keeps who-owns-which-flow from kernel events and /proc, and answers lookups.

    handle_event() is the ring buffer callback; poll() or start() drive it. lookup() and
    enrich() may be called from another thread: state is guarded by one lock, held only
    for dictionary work (never across a /proc read)."""

    def __init__(self, source: EventSource | None = None, *,
                 limits: ProcessLimits | None = None,
                 clock: Callable[[], int] = time.monotonic_ns,
                 proc_root: Path = Path("/proc")) -> None:
        self.limits = limits or ProcessLimits()
        lim = self.limits
        self._source = source
        self._clock = clock
        self._proc = proc_root
        self._lock = threading.Lock()
        self._decoder = EventDecoder()
        self._flows: BoundedTtlCache[tuple[FlowKey, Side], ProcessInfo] = BoundedTtlCache(
            lim.max_flows, lim.flow_ttl_ns, clock)
        self._pids: BoundedTtlCache[int, ProcDetails] = BoundedTtlCache(
            lim.max_pids, lim.pid_ttl_ns, clock)
        # cookie -> listener; a listener lives until its LISTEN_CLOSE, so the TTL is only
        # a backstop for a close event lost to a full ring buffer.
        self._listeners: BoundedTtlCache[int, _Listener] = BoundedTtlCache(
            lim.max_listeners, lim.flow_ttl_ns, clock)
        # uid -> user name; few distinct uids run networked processes. The TTL lets a
        # renamed or new account show up.
        self._users: BoundedTtlCache[int, str] = BoundedTtlCache(1024, 60 * 10**9, clock)
        self._sockets = SocketTable(lim, clock, proc_root)
        self._cgroups = CgroupIndex(lim, clock)
        self._stats = dict.fromkeys(
            ("events", "connect", "accept", "listen", "listen_close", "accept_unresolved",
             "exited_before_read", "lookups", "hits", "socket_table_hits"), 0)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        if source is not None:
            source.open_events(self.handle_event)

    @classmethod
    def open(cls, *, limits: ProcessLimits | None = None) -> "ProcessAttributor":
        """Loads and attaches bpf/process.c (root, or CAP_BPF + CAP_PERFMON)."""
        from sensor.kernel.tracepoints import load_process_tracepoint  # noqa: PLC0415

        return cls(load_process_tracepoint(), limits=limits)

    # -- kernel side ------------------------------------------------------------------

    def poll(self, timeout_ms: int = 100) -> None:
        if self._source is not None:
            self._source.poll(timeout_ms)

    def start(self) -> None:
        """Drains events on a thread of its own, so /proc is read as soon as an event
        arrives, whatever the rest of the sensor is doing."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="loupe-process", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # No timeout: an idle thread would only wake to look at _stop, and close() wakes
        # it for that (docs/sensor.md, "Idle cost").
        while not self._stop.is_set():
            self.poll(-1)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            if self._source is not None:
                self._source.wake()
            self._thread.join()
            self._thread = None
        if self._source is not None:
            self._source.close()
            self._source = None

    def handle_event(self, raw: bytes) -> None:
        ev = self._decoder.decode(raw)
        if ev is None:
            return
        with self._lock:
            self._stats["events"] += 1
        if ev.kind == KIND_CONNECT:
            self._on_connect(ev)
        elif ev.kind == KIND_ACCEPT:
            self._on_accept(ev)
        elif ev.kind == KIND_LISTEN:
            info = self._task_info(ev)
            with self._lock:
                self._stats["listen"] += 1
                self._listeners.put(ev.cookie, _Listener(ev.family, ev.local[0], ev.local[1], info))
        else:
            with self._lock:
                self._stats["listen_close"] += 1
                self._listeners.pop(ev.cookie)

    def _user(self, uid: int) -> str:
        # getpwuid reads /etc/passwd (or asks NSS) each call: ~10 us, per event.
        name = self._users.get(uid)
        if name is None:
            name = _username(uid)
            self._users.put(uid, name)
        return name

    def _details(self, pid: int, comm: str) -> ProcDetails | None:
        with self._lock:
            cached = self._pids.get(pid)
        if cached is not None and (not comm or cached.comm == comm):
            return cached
        details = read_proc_details(pid, self._proc)
        if details is not None:
            with self._lock:
                self._pids.put(pid, details)
        return details

    def _task_info(self, ev: SocketEvent) -> ProcessInfo:
        """ProcessInfo from the kernel's task fields plus /proc, read now."""
        details = self._details(ev.pid, ev.comm)
        exe = details.exe if details is not None else ""
        if not exe:
            # Gone, or exiting (its memory, and with it /proc/PID/exe, already released).
            with self._lock:
                self._stats["exited_before_read"] += 1
        if details is not None and details.cgroup_path:
            container = details.container_id
        else:
            container = container_id_from_path(self._cgroups.path(ev.cgroup_id))
        return ProcessInfo(pid=ev.pid, comm=ev.comm, exe=exe, uid=ev.uid,
                           user=self._user(ev.uid), cgroup_id=ev.cgroup_id,
                           container_id=container)

    def _pid_info(self, pid: int) -> ProcessInfo | None:
        """ProcessInfo of a live process found through the socket tables."""
        details = self._details(pid, "")
        if details is None:
            return None
        return ProcessInfo(pid=pid, comm=details.comm, exe=details.exe, uid=details.uid,
                           user=self._user(details.uid),
                           cgroup_id=self._cgroups.cgroup_id(details.cgroup_path),
                           container_id=details.container_id)

    def _on_connect(self, ev: SocketEvent) -> None:
        info = self._task_info(ev)
        key: FlowKey = (PROTO_TCP, *ev.local, *ev.remote)
        with self._lock:
            self._stats["connect"] += 1
            self._flows.put((key, Side.INITIATOR), info)

    def _on_accept(self, ev: SocketEvent) -> None:
        key: FlowKey = (PROTO_TCP, *ev.remote, *ev.local)
        with self._lock:
            self._stats["accept"] += 1
            candidates = [lst for lst in self._listeners.values()
                          if lst.family == ev.family
                          and (lst.addr == ev.local[0] or lst.addr in _WILDCARDS)
                          and lst.port == ev.local[1]]
        owners = {c.info.pid for c in candidates}
        info = candidates[0].info if len(owners) == 1 else None
        if info is None:
            # No listen() seen (the listener is older than us), or the same address and
            # port listen in several network namespaces: ask the socket tables, which
            # know the namespace of the connection.
            pid = self._sockets.owner(PROTO_TCP, ev.local, ev.remote)
            info = self._pid_info(pid) if pid is not None else None
        with self._lock:
            if info is None:
                self._stats["accept_unresolved"] += 1
            else:
                self._flows.put((key, Side.RESPONDER), info)

    # -- lookups ------------------------------------------------------------------------

    def lookup_side(self, flow: Flow | FlowKey, side: Side) -> ProcessInfo | None:
        """The process owning one end of the flow, from events, else the socket tables."""
        key = flow_key(flow)
        with self._lock:
            self._stats["lookups"] += 1
            info = self._flows.get((key, side))
            if info is not None:
                self._stats["hits"] += 1
                return info
        proto, src, sport, dst, dport = key
        if proto not in (PROTO_TCP, PROTO_UDP):
            return None
        local, remote = ((src, sport), (dst, dport)) if side is Side.INITIATOR \
            else ((dst, dport), (src, sport))
        pid = self._sockets.owner(proto, local, remote)
        info = self._pid_info(pid) if pid is not None else None
        if info is not None:
            with self._lock:
                self._stats["socket_table_hits"] += 1
                self._flows.put((key, side), info)
        return info

    def lookup(self, flow: Flow | FlowKey) -> ProcessInfo | None:
        """The initiator's process if the initiator is local, else the responder's."""
        return self.lookup_side(flow, Side.INITIATOR) or self.lookup_side(flow, Side.RESPONDER)

    def enrich(self, flow: Flow) -> Flow:
        info = self.lookup(flow)
        return flow if info is None else replace(flow, process=info)

    def stats(self) -> dict[str, int]:
        """Counters for metrics: kernel losses (ringbuf_full, pending_full) first."""
        with self._lock:
            out = dict(self._stats)
            out.update(
                flows_cached=len(self._flows), flows_evicted=self._flows.evicted,
                flows_expired=self._flows.expired, pids_cached=len(self._pids),
                pids_evicted=self._pids.evicted, listeners=len(self._listeners),
                listeners_evicted=self._listeners.evicted,
                events_malformed=self._decoder.malformed,
                events_unknown=self._decoder.unknown,
                socket_table_rebuilds=self._sockets.rebuilds,
                socket_table_truncated=self._sockets.truncated,
                cgroup_index_truncated=self._cgroups.truncated,
            )
        if self._source is not None:
            out.update({f"kernel_{k}": v for k, v in self._source.counters().items()})
        return out
