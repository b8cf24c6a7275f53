"""Compiling and loading the flow meter (bpf/flow.c) with bcc, in a short-lived child
process (sensor/kernel/bccload.py: the sensor itself never maps LLVM). Everything else
reaches the kernel through the file descriptors and the event callback this module hands
out, so bcc's errors are translated here.

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
from sensor.kernel import abi, bccload, bpfsys, frames
from sensor.kernel.ringbuf import RingBuffer

log = logging.getLogger(__name__)

BPF_DIR = Path(__file__).resolve().parent.parent.parent / "bpf"
PROGRAM = "loupe_tc"
# Tail-called by PROGRAM for new flows while an exclusion filter is in force.
NEW_FLOW_PROGRAM = "loupe_new_flow"
SCHED_CLS = 3   # BPF_PROG_TYPE_SCHED_CLS, as bcc's BPF.SCHED_CLS

_CAP_NET_ADMIN = 12
_CAP_SYS_ADMIN = 21
_CAP_PERFMON = 38
_CAP_BPF = 39
# What the flow meter needs, by name: CAP_BPF (programs, maps), CAP_PERFMON (the pointer
# arithmetic and reads the verifier allows only to it; without it the kernel refuses the
# program with a bare "Permission denied"), CAP_NET_ADMIN (TC attach and detach).
# CAP_SYS_ADMIN stands in for the first two, as the kernel lets it.
REQUIRED_CAPS = (("CAP_BPF", _CAP_BPF), ("CAP_PERFMON", _CAP_PERFMON),
                 ("CAP_NET_ADMIN", _CAP_NET_ADMIN))


def check_ringbuf_pages(pages: int) -> None:
    """A ring buffer's size in pages must be a power of two (BPF_MAP_TYPE_RINGBUF)."""
    if pages < 1 or pages & (pages - 1):
        raise ValueError("ringbuf_pages must be a power of two")


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadOptions:
    """Sizes passed to the C code as -D; bounds and their reasons are in bpf/loupe.h."""

    flow_map_size: int = 65536
    frag_map_size: int = 4096
    max_ipv6_ext: int = 6
    ringbuf_pages: int = 1024
    # Whether the registered protocols' frame walks (bpf/frames.h) are written into the
    # kernel; off, no flow is walked (tests compare the budget with and without).
    frame_walk: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.flow_map_size <= 1 << 24:
            raise ValueError("flow_map_size must be within 1..16777216")
        if not 1 <= self.frag_map_size <= 1 << 20:
            raise ValueError("frag_map_size must be within 1..1048576")
        if not 1 <= self.max_ipv6_ext <= 16:
            raise ValueError("max_ipv6_ext must be within 1..16")
        check_ringbuf_pages(self.ringbuf_pages)

    def cflags(self) -> list[str]:
        return [
            f"-I{BPF_DIR}",
            f"-DLOUPE_FLOW_MAP_SIZE={self.flow_map_size}",
            f"-DLOUPE_FRAG_MAP_SIZE={self.frag_map_size}",
            f"-DLOUPE_MAX_IPV6_EXT={self.max_ipv6_ext}",
            f"-DLOUPE_RINGBUF_PAGES={self.ringbuf_pages}",
            sniff_prefix_cflag(),
            sniff_datagram_cflag(),
        ]


def sniff_prefix_cflag() -> str:
    """-DLOUPE_SNIFF_PREFIX(m)=...: the kernel sniffer's first-bytes list, from the protocol
    registry (Protocol.kernel_prefixes), so the kernel and userspace share one definition."""
    from sensor.l7 import registry  # the protocol modules: only needed to compile

    words = registry.kernel_sniff_prefixes()
    test = " || ".join(f"(m) == {w:#010x}" for w in words) or "0"
    return f"-DLOUPE_SNIFF_PREFIX(m)=({test})"


def sniff_datagram_cflag() -> str:
    """-DLOUPE_SNIFF_DATAGRAM(w,len)=...: the sniffer's UDP openings (masked compares of the
    first eight bytes, a least length), from the registry (Protocol.kernel_datagram_words)."""
    from sensor.l7 import registry  # the protocol modules: only needed to compile

    tests = [f"(((w) & {m:#018x}ULL) == {v:#018x}ULL && (len) >= {n})"
             for m, v, n in registry.kernel_datagram_words()]
    return f"-DLOUPE_SNIFF_DATAGRAM(w,len)=({' || '.join(tests) or '0'})"


def effective_caps() -> int:
    """This process's effective capability set, as the bit mask /proc shows."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def missing_capabilities(caps: int) -> list[str]:
    """Names of the REQUIRED_CAPS missing from the effective set `caps`."""
    admin = bool(caps & (1 << _CAP_SYS_ADMIN))
    return [name for name, bit in REQUIRED_CAPS
            if not caps & (1 << bit) and not (admin and bit != _CAP_NET_ADMIN)]


def check_privileges() -> None:
    """Before anything is compiled: one line naming what is missing, instead of a
    verifier log that ends in "Permission denied"."""
    missing = missing_capabilities(effective_caps())
    if missing:
        raise PrivilegeError(
            f"loading the flow meter needs root, or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN; "
            f"missing: {', '.join(missing)}: run it with sudo (or grant those capabilities "
            "to the service)"
        )


# prctl(2) and capset(2) constants (linux/prctl.h, linux/capability.h).
_PR_SET_KEEPCAPS = 8
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAP_SETPCAP = 8
_CAP_LAST = 63
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _thread_status() -> dict[str, str]:
    # thread-self: capabilities are per thread, and the drop runs on this one.
    out = {}
    for line in Path("/proc/thread-self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        out[name] = value.strip()
    return out


def check_user(user: str) -> tuple[int, int]:
    """(uid, primary gid) of `user`, if the sensor can become it: before compiling, so
    that a wrong --user costs no seconds of start-up."""
    import pwd  # noqa: PLC0415 (the only callers are the daemon's start-up)

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"--user {user}: no such user; create it (the installer makes "
                             "the system user loupe) or name another") from None
    if os.geteuid() not in (0, entry.pw_uid):
        raise PrivilegeError(f"--user {user} needs the sensor started as root: it attaches "
                             "as root, then becomes that user")
    return entry.pw_uid, entry.pw_gid


# Names of the capabilities a sensor may keep besides REQUIRED_CAPS (linux/capability.h),
# for the log line that says what was kept.
_CAP_NAMES = {2: "CAP_DAC_READ_SEARCH", 19: "CAP_SYS_PTRACE"}


def drop_privileges(user: str, extra: tuple[int, ...] = ()) -> None:
    """Becomes `user` (its uid, primary gid and no other groups) keeping exactly
    CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN, plus `extra` (capability numbers: TLS
    plaintext's RUNTIME_CAPS), in the effective and permitted sets, with empty
    inheritable and ambient sets, then checks /proc/thread-self/status.

    Called after the programs are loaded and attached as root: the tracepoint's tracefs
    is readable by root only, and everything the sensor does afterwards (ring buffer and
    map reads on open descriptors, TC detach, exporting) needs no more than this. Other
    threads started before (metrics server, process attribution) lose every capability
    with the uid change, since only this thread keeps them across it."""
    uid, gid = check_user(user)
    if os.geteuid() == uid:
        return   # already that user: nothing to drop
    keep = 0
    kept = (*REQUIRED_CAPS,
            *((_CAP_NAMES.get(bit, f"capability {bit}"), bit) for bit in extra))
    for _, bit in kept:
        keep |= 1 << bit
    libc = ctypes.CDLL(None, use_errno=True)

    def check(rc: int, what: str) -> None:
        if rc != 0:
            err = ctypes.get_errno()
            raise PrivilegeError(f"dropping privileges to {user}: {what} failed: "
                                 f"{os.strerror(err)}; the service's capability bounding set "
                                 "must hold CAP_SETUID and CAP_SETGID")

    # The bounding set too, where allowed (CAP_SETPCAP): then not even an execve of a
    # setuid program could bring another capability back. The unit's own bounding set
    # already does this under systemd.
    if effective_caps() & (1 << _CAP_SETPCAP):
        for bit in range(_CAP_LAST + 1):
            if not keep & (1 << bit):
                # EINVAL past the kernel's last capability: nothing left to drop.
                if libc.prctl(_PR_CAPBSET_DROP, bit, 0, 0, 0) != 0:
                    break
    check(libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    try:
        os.setgroups([gid])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise PrivilegeError(f"dropping privileges to {user}: {exc.strerror}; the service's "
                             "capability bounding set must hold CAP_SETUID and CAP_SETGID") \
            from None
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        word = (keep >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = word
        data[i].inheritable = 0
    check(libc.capset(ctypes.byref(header), data), "capset")
    check(libc.prctl(_PR_SET_KEEPCAPS, 0, 0, 0, 0), "prctl(PR_SET_KEEPCAPS, 0)")
    check(libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0),
          "prctl(PR_CAP_AMBIENT_CLEAR_ALL)")
    status = _thread_status()
    uids = {int(x) for x in status["Uid"].split()}
    gids = {int(x) for x in status["Gid"].split()}
    got = {name: int(status[name], 16) for name in ("CapEff", "CapPrm", "CapInh", "CapAmb")}
    if uids != {uid} or gids != {gid} or got != {"CapEff": keep, "CapPrm": keep,
                                                  "CapInh": 0, "CapAmb": 0}:
        raise PrivilegeError(
            f"after dropping privileges to {user}: uids {sorted(uids)}, gids {sorted(gids)}, "
            + ", ".join(f"{k} {v:#x}" for k, v in got.items())
            + f"; expected uid {uid}, gid {gid}, CapEff and CapPrm {keep:#x}: refusing to run")
    names = [name for name, _ in kept]
    log.info("running as %s (uid %d) with %s and %s only", user, uid,
             ", ".join(names[:-1]), names[-1])


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


def check_flow_meter_kernel() -> None:
    """The flow meter's reader takes entries out with lookup-and-delete (Linux 5.14),
    and the program reads the coarse clock (5.11): one probe covers both, so an old
    kernel gets this message rather than a verifier log."""
    if not bpfsys.hash_lookup_and_delete_supported():
        raise KernelError(
            f"this kernel ({platform.release()}) cannot look up and delete BPF hash map "
            "entries in one step, which the flow meter's reader needs: upgrade to Linux "
            "5.14 or later"
        )


class LoadedProgram:
    """The loaded program and its maps, as descriptors (sensor/kernel/bccload.py compiled
    and loaded them in a child). close() releases them (filters that still reference the
    program keep it alive in the kernel; detach those first)."""

    def __init__(self, obj: bccload.BpfObject, options: LoadOptions) -> None:
        self._obj = obj
        self.options = options
        self._ring: RingBuffer | None = None
        try:
            self.prog_fd: int = obj.prog_fd(PROGRAM)
            self.flows_fd: int = obj.map_fd("flows")
            self.frags_fd: int = obj.map_fd("frags")
            self.counters_fd: int = obj.map_fd("counters")
            self.events_fd: int = obj.map_fd("events")
            # Selection and payload control (sensor/kernel/hybrid.py fills them; with all
            # of them empty, as after loading, no flow is selected and nothing is copied).
            self.config_fd: int = obj.map_fd("config")
            self.sel_ports_fd: int = obj.map_fd("sel_ports")
            self.sel_cidr4_fd: int = obj.map_fd("sel_cidr4")
            self.sel_cidr6_fd: int = obj.map_fd("sel_cidr6")
            self.sel_protos_fd: int = obj.map_fd("sel_protos")
            self.sel_keys_fd: int = obj.map_fd("sel_keys")
            self.l7_ctl_fd: int = obj.map_fd("l7_ctl")
            self.exclude_fd: int = obj.map_fd("exclude")
            self.new_flow_prog_fd: int = obj.prog_fd(NEW_FLOW_PROGRAM)
            self.tails_fd: int = obj.map_fd("tails")
            # The frame walk (bpf/frames.h, sensor/kernel/frames.py).
            self.walk_prog_fd: int = obj.prog_fd(frames.PROGRAM)
            self.frame_cfg_fd: int = obj.map_fd("frame_cfg")
            self.frame_walk_fd: int = obj.map_fd("frame_walk")
            self.walk_tails_fd: int = obj.map_fd("walk_tails")
            # Enforcement (sensor/enforce/): empty, and block_cfg's heartbeat 0, after
            # loading, so nothing is dropped until the sensor enforces.
            self.block_cfg_fd: int = obj.map_fd("block_cfg")
            self.block_flow_fd: int = obj.map_fd("block_flow")
            self.block_src_fd: int = obj.map_fd("block_src")
            self.rate_src_fd: int = obj.map_fd("rate_src")   # DDoS rate limits
            self.hold_svc_fd: int = obj.map_fd("hold_svc")   # hold mode
            self.hold_req_fd: int = obj.map_fd("hold_req")
            self.hold_ok_fd: int = obj.map_fd("hold_ok")
        except KeyError as exc:
            obj.close()
            raise KernelError(f"bpf/flow.c has no {exc.args[0]}: bpf/ and "
                              "sensor/kernel/loader.py differ") from None
        try:
            for table, key, value in ((b"flows", abi.FlowKey, abi.FlowValue),
                                      (b"frags", abi.FragKey, abi.FragValue)):
                check_map_layout(obj, table, ctypes.sizeof(key), ctypes.sizeof(value),
                                 mirror="sensor/kernel/abi.py", header="bpf/loupe.h")
            check_map_layout(obj, b"exclude", 4, ctypes.sizeof(abi.Filter),
                             mirror="sensor/kernel/abi.py", header="bpf/loupe.h")
            for table, key, value in ((b"block_cfg", ctypes.c_uint32, abi.BlockCfg),
                                      (b"block_flow", abi.FlowKey, abi.BlockValue),
                                      (b"block_src", abi.BlockSrcKey, abi.BlockValue),
                                      (b"rate_src", abi.RateKey, abi.RateValue),
                                      (b"hold_svc", abi.HoldSvcKey, abi.HoldSvc),
                                      (b"hold_req", abi.FlowKey, abi.HoldReq),
                                      (b"hold_ok", abi.FlowKey, abi.HoldOk)):
                check_map_layout(obj, table, ctypes.sizeof(key), ctypes.sizeof(value),
                                 mirror="sensor/kernel/abi.py", header="bpf/loupe.h")
            # The meter's own slot, for loupe_new_flow to return to (hybrid.py fills
            # the new-flow slot while a filter is in force).
            bpfsys.update(self.tails_fd, ctypes.c_uint32(abi.TAIL_METER),
                          ctypes.c_uint32(self.prog_fd))
            check_map_layout(obj, b"frame_cfg", 4, ctypes.sizeof(frames.FrameCfg),
                             mirror="sensor/kernel/frames.py", header="bpf/frames.h")
            check_map_layout(obj, b"frame_walk", ctypes.sizeof(abi.FlowKey),
                             ctypes.sizeof(frames.WalkState),
                             mirror="sensor/kernel/frames.py", header="bpf/frames.h")
            bpfsys.update(self.walk_tails_fd, ctypes.c_uint32(frames.TAIL_WALK),
                          ctypes.c_uint32(self.walk_prog_fd))
            if options.frame_walk:
                frames.fill(self.frame_cfg_fd)
        except BaseException:
            obj.close()
            raise

    def open_events(self, handler: Callable[[bytes], None]) -> None:
        """Delivers every ring buffer event to handler as bytes, during poll_events()."""
        if self._ring is None:
            self._ring = RingBuffer()
        self._ring.add(self.events_fd, handler)

    def poll_events(self, timeout_ms: int) -> None:
        if self._ring is not None:
            self._ring.poll(timeout_ms)

    def add_ring(self, map_fd: int, handler: Callable[[bytes], None]) -> None:
        """Another program's ring buffer (the TLS plaintext probes'), read in the same
        poll_events(): one wait wakes for either, so neither waits for the other's
        timeout. Call after open_events()."""
        self._ring.add(map_fd, handler)

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        self._obj.close()


def check_map_layout(obj: bccload.BpfObject, table: bytes, key_size: int, value_size: int,
                     *, mirror: str, header: str) -> None:
    """Refuse to run when a map's key/value sizes differ from the Python mirror's: the C
    header and its ctypes mirror were changed apart, and every read would be garbage."""
    t = obj.map(table.decode())
    got = (t.key_size, t.value_size)
    if got != (key_size, value_size):
        raise KernelError(
            f"map {table.decode()} has key/value sizes {got[0]}/{got[1]} but {mirror} "
            f"expects {key_size}/{value_size}: {header} and {mirror} differ"
        )


def bcc_missing() -> KernelError:
    return KernelError(
        "bcc is not importable: install python3-bpfcc (make install); the PyPI package "
        "named bcc is an unrelated project")


def refused(exc: Exception) -> bool:
    """A load refused for want of privileges (bcc says so only in its message)."""
    return os.geteuid() != 0 and "Operation not permitted" in str(exc)


def load(options: LoadOptions | None = None) -> LoadedProgram:
    """Checks privileges, headers and kernel features, then compiles and loads (in a
    child process: sensor/kernel/bccload.py says why)."""
    options = options or LoadOptions()
    check_privileges()
    check_headers()
    check_ringbuf()
    check_flow_meter_kernel()
    log.debug("compiling %s with %s", BPF_DIR / "flow.c", options.cflags())
    try:
        obj = bccload.load(BPF_DIR / "flow.c", options.cflags(),
                           {PROGRAM: SCHED_CLS, NEW_FLOW_PROGRAM: SCHED_CLS,
                            frames.PROGRAM: SCHED_CLS})
    except bccload.LoadError as exc:
        if exc.stage == "import":
            raise bcc_missing() from None
        if exc.stage == "load":
            raise KernelError(f"the kernel refused the flow meter program: {exc}") from None
        if refused(exc):
            raise PrivilegeError(f"loading BPF maps was refused: {exc}; run as root") from None
        raise KernelError(f"compiling bpf/flow.c failed: {exc}") from None
    return LoadedProgram(obj, options)
