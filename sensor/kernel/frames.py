"""The kernel's frame walk (bpf/frames.h): its ABI mirrored in ctypes, and the protocol
table userspace writes at load time from the parsers' registrations (sensor/l7/registry.py,
FramingHints.kernel_walk). Nothing here names a protocol.
"""

from __future__ import annotations

import ctypes

from sensor.kernel import abi, bpfsys
from sensor.l7 import registry

FRAME_PROTOS = 4          # LOUPE_FRAME_PROTOS: frame_cfg entries
FRAME_HDR_MAX = 16        # LOUPE_FRAME_HDR_MAX
NOT_WALKED = 0xFFFF       # LOUPE_FRAME_NOT_WALKED
FRAME_CFG_SIZE = 88
WALK_STATE_SIZE = 80
TAIL_WALK = 0             # LOUPE_TAIL_WALK, the slot of walk_tails
PROGRAM = "loupe_walk"

WALK_OFF, WALK_FIRST, WALK_ON, WALK_CLIENT = 0, 1, 2, 3      # LOUPE_WALK_*
# WalkDir.stopped (LOUPE_WALK_STOP_*): why a direction's walk went off.
# 6 (ring_full) is retired: a full ring no longer stops a walk (LOST_BEFORE says so).
STOP_NAMES = {1: "cfg", 2: "opening", 3: "late", 4: "hole", 5: "tail_call", 6: "ring_full",
              7: "cut", 8: "frame", 9: "untaken"}

# PayloadEvent.flags (LOUPE_PLF_*)
PLF_SKIPPED_BEFORE = 0x01   # this direction's octets before seq not received were elided
PLF_PEER_WALKED = 0x02      # ... the other direction's below ack too
PLF_CUT = 0x04              # the packet's octets after this chunk were not copied
PLF_LOST_BEFORE = 0x08      # with SKIPPED_BEFORE: some of those octets were walked copies
                            # the ring buffer refused: a Gap, not a Skip


class FrameCfg(ctypes.Structure):
    """struct loupe_frame_cfg."""

    _fields_ = [
        ("match", ctypes.c_uint64),
        ("mask", ctypes.c_uint64),
        ("server_match", ctypes.c_uint64),
        ("server_mask", ctypes.c_uint64),
        ("elide", ctypes.c_uint64 * 4),
        ("len_adj", ctypes.c_int32),
        ("start", ctypes.c_uint16 * 2),
        ("hdr_len", ctypes.c_uint8),
        ("len_off", ctypes.c_uint8),
        ("len_size", ctypes.c_uint8),
        ("type_off", ctypes.c_uint8),
        ("flags_off", ctypes.c_uint8),
        ("keep_flags", ctypes.c_uint8),
        ("body_flags", ctypes.c_uint8),
        ("keep_type", ctypes.c_uint8),
        ("keep_octets", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 7),
    ]


class WalkDir(ctypes.Structure):
    """struct loupe_walk_dir."""

    _fields_ = [
        ("next", ctypes.c_uint32),
        ("frame_end", ctypes.c_uint32),
        ("state", ctypes.c_uint8),
        ("have", ctypes.c_uint8),
        ("elide_cur", ctypes.c_uint8),
        ("stopped", ctypes.c_uint8),
        ("keep_end", ctypes.c_uint32),
        ("hdr", ctypes.c_uint8 * FRAME_HDR_MAX),
        ("lost", ctypes.c_uint8),     # a refused walked event not yet told (LOST_BEFORE)
        ("pad", ctypes.c_uint8 * 3),
    ]


class WalkState(ctypes.Structure):
    """struct loupe_walk_state: a flow's walk, by abi.PL_TO_*."""

    _fields_ = [("proto", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("dir", WalkDir * 2)]


assert ctypes.sizeof(FrameCfg) == FRAME_CFG_SIZE
assert ctypes.sizeof(WalkState) == WALK_STATE_SIZE


def frame_cfg(walk: registry.KernelWalk) -> FrameCfg:
    """One registration as the kernel's table entry."""
    cfg = FrameCfg()
    cfg.match = int.from_bytes(walk.match, "big") & int.from_bytes(walk.mask, "big")
    cfg.mask = int.from_bytes(walk.mask, "big")
    if walk.server_mask:
        cfg.server_mask = int.from_bytes(walk.server_mask, "big")
        cfg.server_match = int.from_bytes(walk.server_match, "big") & cfg.server_mask
    for t in walk.elide:
        cfg.elide[t >> 6] |= 1 << (t & 63)
    cfg.len_adj = walk.length_adjust
    for side, start in enumerate(walk.start):   # Direction order = abi.PL_TO_* order
        cfg.start[side] = NOT_WALKED if start is None else start
    cfg.hdr_len = walk.header
    cfg.len_off = walk.length_at
    cfg.len_size = walk.length_size
    cfg.type_off = walk.type_at
    cfg.flags_off = walk.flags_at
    cfg.keep_flags = walk.keep_flags
    cfg.body_flags = walk.body_flags
    cfg.keep_type = walk.keep_type
    cfg.keep_octets = walk.keep_octets
    return cfg


def fill(map_fd: int, walks: tuple[registry.KernelWalk, ...] | None = None) -> int:
    """Writes the registered walks (or `walks`) into frame_cfg; returns how many. Slots
    past them are written empty (a zero mask matches nothing)."""
    walks = registry.kernel_walks() if walks is None else walks
    if len(walks) > FRAME_PROTOS:
        raise ValueError(f"{len(walks)} protocols declare a kernel walk; the kernel holds "
                         f"{FRAME_PROTOS}")
    for i in range(FRAME_PROTOS):
        cfg = frame_cfg(walks[i]) if i < len(walks) else FrameCfg()
        bpfsys.update(map_fd, ctypes.c_uint32(i), cfg)
    return len(walks)


def state(map_fd: int, key: abi.FlowKey) -> WalkState | None:
    """A flow's walk, or None (tests, diagnostics)."""
    value = WalkState()
    return value if bpfsys.lookup(map_fd, key, value, lock=False) else None
