"""The verdict maps pinned in bpffs, so `loupe block` reaches a running sensor's kernel maps
without a control channel of its own (the sensor's only other channel, /metrics, is
read-only).

Layout: <pin_dir>/block_cfg, block_flow, block_src (default pin_dir /sys/fs/bpf/loupe).
The sensor pins them after loading and unpins them when it stops. A pin left by a sensor
that was killed stays, but its heartbeat goes stale, so the kernel ignores its entries and
`loupe block` says no sensor runs; the next sensor replaces it. A directory whose pins
belong to another live sensor (fresh heartbeat) is left alone: that sensor keeps the CLI.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

from sensor.enforce.maps import BlockMaps
from sensor.errors import LoupeError
from sensor.kernel import abi, bpfsys

DEFAULT_PIN_DIR = "/sys/fs/bpf/loupe"
NAMES = ("block_cfg", "block_flow", "block_src")
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7


class NoSensor(LoupeError):
    """No running sensor's maps under the pin directory."""


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32),
                ("file_flags", ctypes.c_uint32), ("path_fd", ctypes.c_int32)]


def pin(fd: int, path: Path) -> None:
    name = ctypes.create_string_buffer(os.fsencode(str(path)))
    bpfsys.bpf(BPF_OBJ_PIN, _ObjAttr(pathname=ctypes.addressof(name), bpf_fd=fd))


def get(path: Path) -> int:
    name = ctypes.create_string_buffer(os.fsencode(str(path)))
    return bpfsys.bpf(BPF_OBJ_GET, _ObjAttr(pathname=ctypes.addressof(name)))


def _fresh(pin_dir: Path) -> bool:
    """Whether the pins in pin_dir belong to a sensor that is alive now."""
    try:
        maps = open_pinned(pin_dir)
    except NoSensor:
        return False
    try:
        age = maps.heartbeat_age_ns()
        return 0 <= age < abi.BLOCK_STALE_NS
    finally:
        close(maps)


def pin_maps(maps: BlockMaps, pin_dir: str | Path) -> bool:
    """Pins the sensor's three maps under pin_dir, replacing a dead sensor's; False (and
    nothing pinned) when a live sensor holds the directory."""
    d = Path(pin_dir)
    if _fresh(d):
        return False
    d.mkdir(parents=True, exist_ok=True)
    for name, fd in zip(NAMES, (maps.cfg_fd, maps.flow_fd, maps.src_fd)):
        p = d / name
        p.unlink(missing_ok=True)
        pin(fd, p)
    return True


def unpin(pin_dir: str | Path) -> None:
    d = Path(pin_dir)
    for name in NAMES:
        (d / name).unlink(missing_ok=True)
    try:
        d.rmdir()
    except OSError:
        pass   # not empty (someone else's files) or already gone


def open_pinned(pin_dir: str | Path) -> BlockMaps:
    d = Path(pin_dir)
    fds: list[int] = []
    try:
        for name in NAMES:
            fds.append(get(d / name))
    except bpfsys.BpfError as exc:
        for fd in fds:
            os.close(fd)
        if exc.errno == errno.ENOENT:
            raise NoSensor(f"no sensor's block maps under {d}: is `loupe sensor run` running "
                           "(with [enforce] enabled and this pin_dir)?") from None
        if exc.errno in (errno.EPERM, errno.EACCES):
            raise NoSensor(f"{d}: permission denied; run as root") from None
        raise
    return BlockMaps(*fds)


def close(maps: BlockMaps) -> None:
    for fd in (maps.cfg_fd, maps.flow_fd, maps.src_fd):
        os.close(fd)


BPF_FS_MAGIC = 0xCAFE4A11


def ensure_bpffs(pin_dir: str | Path) -> None:
    """Mounts bpffs at /sys/fs/bpf when pin_dir lies under it and nothing is mounted
    there yet (systemd mounts it at boot; minimal hosts and containers may not)."""
    d = Path(pin_dir)
    root = Path("/sys/fs/bpf")
    if root not in (d, *d.parents) or _fs_type(root) == BPF_FS_MAGIC:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", b"/sys/fs/bpf", b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise LoupeError(f"/sys/fs/bpf is not a bpf filesystem and mounting one failed "
                         f"({os.strerror(err)}): mount -t bpf bpf /sys/fs/bpf, or set "
                         "[enforce] pin_dir to a directory on one")


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]


def _fs_type(path: Path) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    buf = _Statfs()
    if libc.statfs(os.fsencode(str(path)), ctypes.byref(buf)) != 0:
        return 0
    return buf.f_type & 0xFFFFFFFF
