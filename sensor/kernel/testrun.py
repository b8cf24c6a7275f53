"""Driving the real kernel program with packets from userspace: BPF_PROG_TEST_RUN
(bpf(2) command 10) on a loaded SCHED_CLS program.

The kernel builds a socket buffer from data_in (an Ethernet frame), runs the program on
it once and returns its verdict; maps are updated exactly as for a live packet. ctx_in
may carry a struct __sk_buff, of which this kernel honours mark, priority,
ingress_ifindex, ifindex, cb, tstamp, wire_len, gso_segs, gso_size and hwtstamp (the
rest must be zero): tests use ifindex and gso_segs/gso_size to exercise the segment
arithmetic without a NIC.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from sensor.kernel import bpfsys


class SkBuff(ctypes.Structure):
    """struct __sk_buff (include/uapi/linux/bpf.h)."""

    _fields_ = [
        ("len", ctypes.c_uint32),
        ("pkt_type", ctypes.c_uint32),
        ("mark", ctypes.c_uint32),
        ("queue_mapping", ctypes.c_uint32),
        ("protocol", ctypes.c_uint32),
        ("vlan_present", ctypes.c_uint32),
        ("vlan_tci", ctypes.c_uint32),
        ("vlan_proto", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("tc_index", ctypes.c_uint32),
        ("cb", ctypes.c_uint32 * 5),
        ("hash", ctypes.c_uint32),
        ("tc_classid", ctypes.c_uint32),
        ("data", ctypes.c_uint32),
        ("data_end", ctypes.c_uint32),
        ("napi_id", ctypes.c_uint32),
        ("family", ctypes.c_uint32),
        ("remote_ip4", ctypes.c_uint32),
        ("local_ip4", ctypes.c_uint32),
        ("remote_ip6", ctypes.c_uint32 * 4),
        ("local_ip6", ctypes.c_uint32 * 4),
        ("remote_port", ctypes.c_uint32),
        ("local_port", ctypes.c_uint32),
        ("data_meta", ctypes.c_uint32),
        ("flow_keys", ctypes.c_uint64),
        ("tstamp", ctypes.c_uint64),
        ("wire_len", ctypes.c_uint32),
        ("gso_segs", ctypes.c_uint32),
        ("sk", ctypes.c_uint64),
        ("gso_size", ctypes.c_uint32),
        ("tstamp_type", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
        ("hwtstamp", ctypes.c_uint64),
    ]


assert ctypes.sizeof(SkBuff) == 192

# Bound on one test packet: the largest frame a test run accepts without a page
# allocation game; jumbo frames are far below it.
MAX_FRAME = 65535


@dataclass(frozen=True, slots=True)
class TestRunResult:
    retval: int        # the program's verdict, as a signed int (TC_ACT_UNSPEC is -1)
    duration_ns: int   # the kernel's mean run time per repetition


def run_skb(prog_fd: int, frame: bytes, *, ifindex: int = 0, gso_segs: int = 0,
            gso_size: int = 0, repeat: int = 1) -> TestRunResult:
    """Runs the TC program on one Ethernet frame, repeat times."""
    if not 14 <= len(frame) <= MAX_FRAME:
        raise ValueError(f"frame of {len(frame)} bytes is outside 14..{MAX_FRAME}")
    data = ctypes.create_string_buffer(frame, len(frame))
    out = ctypes.create_string_buffer(len(frame) + 256)
    ctx = SkBuff(ifindex=ifindex, gso_segs=gso_segs, gso_size=gso_size)
    attr = bpfsys.TestRunAttr(
        prog_fd=prog_fd,
        data_size_in=len(frame), data_in=ctypes.addressof(data),
        data_size_out=ctypes.sizeof(out), data_out=ctypes.addressof(out),
        repeat=repeat,
        ctx_size_in=ctypes.sizeof(ctx), ctx_in=ctypes.addressof(ctx),
    )
    bpfsys.bpf(bpfsys.BPF_PROG_TEST_RUN, attr)
    return TestRunResult(retval=ctypes.c_int32(attr.retval).value, duration_ns=attr.duration)
