"""The bpf(2) system call through ctypes, for what bcc's Python API does not expose:
BPF_F_LOCK reads, lookup-and-delete, batched lookups, BPF_PROG_TEST_RUN and feature
probes. Only the commands Loupe uses, each with the UAPI layout of its bpf_attr part
(include/uapi/linux/bpf.h, union bpf_attr).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass

# bpf(2) system call numbers per architecture (arch/*/include/uapi/asm/unistd*.h).
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351,
            "riscv64": 280, "i686": 357}

BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_MAP_LOOKUP_AND_DELETE_ELEM = 21
BPF_MAP_LOOKUP_BATCH = 24
BPF_LINK_CREATE = 28
BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0

# tcx: the TC hooks as BPF links (kernel >= 6.6), attach types of enum bpf_attach_type.
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
BPF_F_BEFORE = 1 << 3   # with no relative program: first in the hook's list

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_RINGBUF = 27

BPF_ANY = 0
_ENOTSUPP = 524
_LITTLE = sys.byteorder == "little"  # the kernel's internal 'not supported', seen by bpf(2) callers
BPF_F_LOCK = 4


class BpfError(OSError):
    """A bpf(2) call failed; errno and the command are kept for the caller to translate."""


class _MapElemAttr(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),  # or next_key
        ("flags", ctypes.c_uint64),
    ]


class _MapBatchAttr(ctypes.Structure):
    _fields_ = [
        ("in_batch", ctypes.c_uint64),
        ("out_batch", ctypes.c_uint64),
        ("keys", ctypes.c_uint64),
        ("values", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("map_fd", ctypes.c_uint32),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _MapCreateAttr(ctypes.Structure):
    _fields_ = [
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
    ]


class TestRunAttr(ctypes.Structure):
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


class _EnableStatsAttr(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32)]


class _LinkCreateTcxAttr(ctypes.Structure):
    """bpf_attr.link_create with its tcx part."""
    _fields_ = [("prog_fd", ctypes.c_uint32), ("target_ifindex", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("relative_fd", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
                ("expected_revision", ctypes.c_uint64)]


class _ProgQueryAttr(ctypes.Structure):
    """bpf_attr.query."""
    _fields_ = [("target_ifindex", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("query_flags", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("prog_ids", ctypes.c_uint64), ("prog_cnt", ctypes.c_uint32),
                ("_pad", ctypes.c_uint32), ("prog_attach_flags", ctypes.c_uint64),
                ("link_ids", ctypes.c_uint64), ("link_attach_flags", ctypes.c_uint64),
                ("revision", ctypes.c_uint64)]


class _GetFdByIdAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32),
                ("open_flags", ctypes.c_uint32)]


# struct bpf_prog_info: the offsets of the fields read here (include/uapi/linux/bpf.h;
# the struct only ever grows at its end, and the kernel fills what fits in info_len).
_PROG_INFO_LEN = 232
_OFF_JITED_LEN, _OFF_XLATED_LEN = 16, 20
_OFF_RUN_TIME_NS, _OFF_RUN_CNT, _OFF_VERIFIED_INSNS = 192, 200, 216


@dataclass(frozen=True, slots=True)
class ProgInfo:
    run_time_ns: int      # total time spent in the program while stats were enabled
    run_cnt: int          # runs while stats were enabled
    xlated_len: int       # bytes of verified (translated) instructions
    jited_len: int
    verified_insns: int   # instructions the verifier walked (its work, not the size)


def _syscall_number() -> int:
    machine = platform.machine()
    if machine not in _SYS_BPF:
        raise BpfError(errno.ENOSYS, f"bpf(2) number unknown for {machine}")
    return _SYS_BPF[machine]


@functools.cache
def _syscall() -> tuple[Callable[..., int], ctypes.c_long]:
    """libc's syscall() and bpf's number, looked up once: a CDLL per call made every map
    read cost about 0.1 ms, most of the idle sensor's once-a-second cycle."""
    return ctypes.CDLL(None, use_errno=True).syscall, ctypes.c_long(_syscall_number())


def bpf(cmd: int, attr: ctypes.Structure) -> int:
    """Runs one bpf(2) command; returns its non-negative result or raises BpfError."""
    syscall, number = _syscall()
    ret = syscall(number, ctypes.c_int(cmd),
                       ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"bpf(cmd={cmd}): {os.strerror(err)}")
    return ret


def _addr(obj: ctypes.Structure | ctypes.Array) -> int:
    return ctypes.addressof(obj)


def lookup(map_fd: int, key: ctypes.Structure, value: ctypes.Structure, *, lock: bool) -> bool:
    """Copies the value of key into value (under its spin lock when lock); False if absent."""
    attr = _MapElemAttr(map_fd=map_fd, key=_addr(key), value=_addr(value),
                        flags=BPF_F_LOCK if lock else BPF_ANY)
    try:
        bpf(BPF_MAP_LOOKUP_ELEM, attr)
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def update(map_fd: int, key: ctypes.Structure | ctypes._SimpleCData,
           value: ctypes.Structure | ctypes._SimpleCData | ctypes.Array, *,
           flags: int = BPF_ANY) -> None:
    """Writes key's value (BPF_ANY: create or replace)."""
    attr = _MapElemAttr(map_fd=map_fd, key=_addr(key), value=_addr(value), flags=flags)
    bpf(BPF_MAP_UPDATE_ELEM, attr)


def delete(map_fd: int, key: ctypes.Structure) -> bool:
    """Removes key; False if it was absent."""
    attr = _MapElemAttr(map_fd=map_fd, key=_addr(key))
    try:
        bpf(BPF_MAP_DELETE_ELEM, attr)
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def keys(map_fd: int, key_type: type[ctypes.Structure], limit: int) -> list:
    """Every key, by BPF_MAP_GET_NEXT_KEY (an LPM trie has no batch walk), at most limit.
    When the key a walk stands on vanishes (deleted, or dropped by an LRU), the kernel
    restarts it from the top: pass about twice the map's size, so the walk is capped
    rather than trusted to end."""
    out = []
    cur = None
    while len(out) < limit:
        nxt = key_type()
        attr = _MapElemAttr(map_fd=map_fd, key=_addr(cur) if cur is not None else 0,
                            value=_addr(nxt))
        try:
            bpf(BPF_MAP_GET_NEXT_KEY, attr)
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                break
            raise
        out.append(nxt)
        cur = nxt
    return out

def lookup_and_delete(map_fd: int, key: ctypes.Structure, value: ctypes.Structure, *,
                      lock: bool) -> bool:
    """Copies the value out and unlinks the entry in one step; False if it was absent."""
    attr = _MapElemAttr(map_fd=map_fd, key=_addr(key), value=_addr(value),
                        flags=BPF_F_LOCK if lock else BPF_ANY)
    try:
        bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, attr)
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def lookup_batch(map_fd: int, key_type: type[ctypes.Structure],
                 value_type: type[ctypes.Structure], *, batch: int, lock: bool,
                 ) -> list[tuple[ctypes.Structure, ctypes.Structure]]:
    """Every (key, value) of a hash map, read batch entries per call with
    BPF_MAP_LOOKUP_BATCH. Entries added or removed during the walk may be missed or
    seen; callers treat the result as a snapshot of each entry, not of the map."""
    keys = (key_type * batch)()
    values = (value_type * batch)()
    token = (ctypes.c_uint8 * 8)()  # hash maps use a 4-byte bucket cursor
    out: list[tuple[ctypes.Structure, ctypes.Structure]] = []
    first = True
    while True:
        attr = _MapBatchAttr(in_batch=0 if first else _addr(token), out_batch=_addr(token),
                             keys=_addr(keys), values=_addr(values), count=batch,
                             map_fd=map_fd, elem_flags=BPF_F_LOCK if lock else 0)
        done = False
        try:
            bpf(BPF_MAP_LOOKUP_BATCH, attr)
        except BpfError as exc:
            if exc.errno != errno.ENOENT:
                raise
            done = True  # ENOENT: the walk reached the end; count says what came back
        for i in range(attr.count):
            out.append((key_type.from_buffer_copy(keys[i]),
                        value_type.from_buffer_copy(values[i])))
        if done:
            return out
        first = False


def lookup_batch_into(map_fd: int, keys: ctypes.Array, values: ctypes.Array, *, batch: int,
                      lock: bool) -> int:
    """Fills keys[] and values[] (arrays of the map's key and value types, as long as
    the map's max_entries) with every entry, batch entries per BPF_MAP_LOOKUP_BATCH
    call, and returns how many. No per-entry Python object is made: callers view the
    arrays with numpy and touch only the entries they need."""
    key_size = ctypes.sizeof(keys._type_)
    value_size = ctypes.sizeof(values._type_)
    capacity = len(keys)
    token = (ctypes.c_uint8 * 8)()
    n = 0
    first = True
    while n < capacity:
        want = min(batch, capacity - n)
        attr = _MapBatchAttr(in_batch=0 if first else _addr(token), out_batch=_addr(token),
                             keys=_addr(keys) + n * key_size,
                             values=_addr(values) + n * value_size, count=want,
                             map_fd=map_fd, elem_flags=BPF_F_LOCK if lock else 0)
        done = False
        try:
            bpf(BPF_MAP_LOOKUP_BATCH, attr)
        except BpfError as exc:
            if exc.errno != errno.ENOENT:
                raise
            done = True
        n += attr.count
        if done:
            break
        first = False
    return n


def ringbuf_supported() -> bool:
    """True if the kernel can create a BPF ring buffer (Linux >= 5.8)."""
    attr = _MapCreateAttr(map_type=BPF_MAP_TYPE_RINGBUF, key_size=0, value_size=0,
                          max_entries=4096)
    try:
        fd = bpf(BPF_MAP_CREATE, attr)
    except BpfError as exc:
        if exc.errno in (errno.EINVAL, _ENOTSUPP):
            return False
        raise
    os.close(fd)
    return True


def hash_lookup_and_delete_supported() -> bool:
    """True if BPF_MAP_LOOKUP_AND_DELETE_ELEM works on a hash map (Linux >= 5.14), the
    newest kernel feature the flow meter uses: asking a tiny map for an absent key
    says ENOENT where it does."""
    fd = bpf(BPF_MAP_CREATE, _MapCreateAttr(map_type=BPF_MAP_TYPE_HASH, key_size=4,
                                            value_size=4, max_entries=1))
    try:
        key, value = ctypes.c_uint32(0), ctypes.c_uint32(0)
        lookup_and_delete(fd, key, value, lock=False)
    except BpfError as exc:
        if exc.errno in (errno.EINVAL, _ENOTSUPP):
            return False
        raise
    finally:
        os.close(fd)
    return True


def tcx_attach(prog_fd: int, ifindex: int, attach_type: int) -> int:
    """Attaches a SCHED_CLS program first on an interface's tcx hook; the link's file
    descriptor. The program stays attached while that descriptor (or a copy) is open:
    closing it, or the process ending for any reason, detaches it."""
    return bpf(BPF_LINK_CREATE, _LinkCreateTcxAttr(
        prog_fd=prog_fd, target_ifindex=ifindex, attach_type=attach_type,
        flags=BPF_F_BEFORE))


# Programs listed per tcx hook by tcx_query; the kernel caps a hook at 64 (tcx's
# bpf_mprog entries).
_TCX_QUERY_MAX = 64


def tcx_query(ifindex: int, attach_type: int) -> list[int]:
    """Ids of the programs on an interface's tcx hook, in the order they run."""
    ids = (ctypes.c_uint32 * _TCX_QUERY_MAX)()
    attr = _ProgQueryAttr(target_ifindex=ifindex, attach_type=attach_type,
                          prog_ids=_addr(ids), prog_cnt=_TCX_QUERY_MAX)
    bpf(BPF_PROG_QUERY, attr)
    return list(ids[:attr.prog_cnt])


# struct bpf_prog_info: name[BPF_OBJ_NAME_LEN] at this offset.
_OFF_NAME, _NAME_LEN = 64, 16


def prog_name(prog_id: int) -> str:
    """The name a loaded program was given (its function name, at most 15 bytes).
    Opening a program by id needs CAP_SYS_ADMIN."""
    fd = bpf(BPF_PROG_GET_FD_BY_ID, _GetFdByIdAttr(id=prog_id))
    try:
        buf = (ctypes.c_uint8 * _PROG_INFO_LEN)()
        bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=_PROG_INFO_LEN,
                                              info=_addr(buf)))
    finally:
        os.close(fd)
    return bytes(buf[_OFF_NAME:_OFF_NAME + _NAME_LEN]).split(b"\0", 1)[0].decode(
        errors="replace")


def prog_info(prog_fd: int) -> ProgInfo:
    """Run-time statistics and sizes of a loaded program (BPF_OBJ_GET_INFO_BY_FD)."""
    buf = (ctypes.c_uint8 * _PROG_INFO_LEN)()
    attr = _InfoAttr(bpf_fd=prog_fd, info_len=_PROG_INFO_LEN, info=_addr(buf))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    raw = bytes(buf)

    def u32(off: int) -> int:
        return int.from_bytes(raw[off:off + 4], "little" if _LITTLE else "big")

    def u64(off: int) -> int:
        return int.from_bytes(raw[off:off + 8], "little" if _LITTLE else "big")

    return ProgInfo(run_time_ns=u64(_OFF_RUN_TIME_NS), run_cnt=u64(_OFF_RUN_CNT),
                    xlated_len=u32(_OFF_XLATED_LEN), jited_len=u32(_OFF_JITED_LEN),
                    verified_insns=u32(_OFF_VERIFIED_INSNS))


def map_max_entries(map_fd: int) -> int:
    """max_entries of a map (struct bpf_map_info: type, id, key_size, value_size,
    max_entries, ...)."""
    buf = (ctypes.c_uint32 * 20)()
    bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=map_fd, info_len=ctypes.sizeof(buf),
                                          info=_addr(buf)))
    return buf[4]


def enable_run_time_stats() -> int:
    """BPF_ENABLE_STATS: the kernel times every BPF program while the returned file
    descriptor is open (the same as sysctl kernel.bpf_stats_enabled=1, but undone by
    closing it, even if the process dies)."""
    return bpf(BPF_ENABLE_STATS, _EnableStatsAttr(type=BPF_STATS_RUN_TIME))
