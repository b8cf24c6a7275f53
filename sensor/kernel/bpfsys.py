"""The bpf(2) system call through ctypes, for what bcc's Python API does not expose:
BPF_F_LOCK reads, lookup-and-delete, batched lookups, BPF_PROG_TEST_RUN and feature
probes. Only the commands Loupe uses, each with the UAPI layout of its bpf_attr part
(include/uapi/linux/bpf.h, union bpf_attr).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

# bpf(2) system call numbers per architecture (arch/*/include/uapi/asm/unistd*.h).
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351,
            "riscv64": 280, "i686": 357}

BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_TEST_RUN = 10
BPF_MAP_LOOKUP_AND_DELETE_ELEM = 21
BPF_MAP_LOOKUP_BATCH = 24

BPF_MAP_TYPE_RINGBUF = 27

BPF_ANY = 0
_ENOTSUPP = 524  # the kernel's internal 'not supported', seen by bpf(2) callers
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


def _syscall_number() -> int:
    machine = platform.machine()
    if machine not in _SYS_BPF:
        raise BpfError(errno.ENOSYS, f"bpf(2) number unknown for {machine}")
    return _SYS_BPF[machine]


def bpf(cmd: int, attr: ctypes.Structure) -> int:
    """Runs one bpf(2) command; returns its non-negative result or raises BpfError."""
    libc = ctypes.CDLL(None, use_errno=True)
    ret = libc.syscall(ctypes.c_long(_syscall_number()), ctypes.c_int(cmd),
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
