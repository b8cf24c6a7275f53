"""ctypes mirrors of bpf/loupe.h, the kernel <-> userspace ABI.

Each struct's size is asserted here against the LOUPE_*_SIZE constant that loupe.h
declares (and flow.c _Static_asserts); the loader also checks them against the layouts
bcc derived from the compiled C. A change on one side only fails loudly at import or
load time instead of reading shifted fields.
"""

from __future__ import annotations

import ctypes
import enum
import sys

FLOW_KEY_SIZE = 48
FLOW_VALUE_SIZE = 264
FRAG_KEY_SIZE = 40
FRAG_VALUE_SIZE = 56
EVENT_HDR_SIZE = 16
FLOW_END_EVENT_SIZE = 80
LATE_UPDATE_EVENT_SIZE = 104
PAYLOAD_EVENT_SIZE = 96
CONFIG_SIZE = 40
L7_CTL_SIZE = 40
FILTER_INSN_SIZE = 40
FILTER_SIZE = 2568

# Defaults of the -D limits in loupe.h that userspace needs to know.
PAYLOAD_CHUNK = 2048
MAX_CHUNKS = 8
RETIRE_GUARD_NS = 500_000_000

DIR_LO_HI = 0
DIR_HI_LO = 1

SIDE_SYN = 0x01
SIDE_SYNACK = 0x02

FLOW_INITIATOR_BY_SYN = 0x01
FLOW_ENDED = 0x02
FLOW_SNIFF_PENDING = 0x04
FLOW_EXCLUDED = 0x08

# The exclusion program (LOUPE_FILTER_*, LOUPE_FOP_*; directions LOUPE_FDIR_* are
# sensor.capfilter's EITHER, SRC, DST, BOTH).
FILTER_MAX_INSNS = 64
FOP_IP = 1
FOP_PROTO = 2
FOP_ADDR = 3
FOP_PORT = 4
FOP_AND = 5
FOP_OR = 6
FOP_NOT = 7
# Slots of the tails program array (LOUPE_TAIL_*).
TAIL_NEW_FLOW = 0
TAIL_METER = 1

# l7_select bits (LOUPE_SEL_*)
SEL_PORT = 0x01
SEL_CIDR = 0x02
SEL_PROTO = 0x04
SEL_SAMPLED = 0x08
SEL_EXPLICIT = 0x10
SEL_SNIFFED = 0x20
SEL_RULE = SEL_PORT | SEL_CIDR | SEL_PROTO

# Payload directions (LOUPE_PL_TO_*), relative to the initiator; the values of
# sensor.l7.base.Direction.
PL_TO_RESPONDER = 0
PL_TO_INITIATOR = 1

CFG_SNIFF = 0x01
CTL_DONE = 0x01
CTL_HOLD = 0x02   # << direction: hold it while the other sends nothing new (loupe.h)

END_RST = 1
END_FIN = 2


class EventType(enum.IntEnum):
    FLOW_END = 1
    LATE_UPDATE = 2
    PAYLOAD = 3


class Counter(enum.IntEnum):
    """enum loupe_counter, in the same order."""

    PACKETS = 0
    NON_IP = 1
    FLOW_MAP_FULL = 2
    TRUNCATED = 3
    BAD_HEADER = 4
    UNSUPPORTED_ENCAP = 5
    FRAG_NO_FIRST = 6
    IPV6_EXT_TOO_LONG = 7
    RINGBUF_FULL = 8
    LATE_UPDATE = 9
    RECYCLED_ENTRY = 10
    FLOW_END_EVENTS = 11
    HEADER_PULLS = 12
    PAYLOAD_EVENTS = 13
    PAYLOAD_OCTETS = 14
    PAYLOAD_GAP_OCTETS = 15
    SELECTED_FLOWS = 16
    SNIFFED_FLOWS = 17
    TRUNCATED_L4 = 18
    EXCLUDED_FLOWS = 19
    TAIL_CALL_FAILED = 20
    BLOCKED_FLOW = 21
    BLOCKED_SRC = 22
    HELD = 23
    HOLD_EXPIRED = 24


COUNTER_MAX = len(Counter)


class FlowKey(ctypes.Structure):
    _fields_ = [
        ("addr_lo", ctypes.c_uint8 * 16),
        ("addr_hi", ctypes.c_uint8 * 16),
        ("port_lo", ctypes.c_uint16),
        ("port_hi", ctypes.c_uint16),
        ("ifindex", ctypes.c_uint32),
        ("vlan_id", ctypes.c_uint16),
        ("inner_vlan_id", ctypes.c_uint16),
        ("protocol", ctypes.c_uint8),
        ("ip_version", ctypes.c_uint8),
        ("pad", ctypes.c_uint16),
    ]


class DirCounters(ctypes.Structure):
    _fields_ = [
        ("packets", ctypes.c_uint64),
        ("ip_bytes", ctypes.c_uint64),
        ("l2_bytes", ctypes.c_uint64),
        ("tcp_flags", ctypes.c_uint16),
        ("side_flags", ctypes.c_uint8),
        ("pad0", ctypes.c_uint8),
        ("pad1", ctypes.c_uint32),
    ]


class L7Dir(ctypes.Structure):
    _fields_ = [
        ("captured", ctypes.c_uint64),
        ("truncated", ctypes.c_uint64),
        ("skipped", ctypes.c_uint64),
        ("gap", ctypes.c_uint64),
        ("skip_gen_done", ctypes.c_uint32),
        ("spoke_last", ctypes.c_uint32),
    ]


class FlowValue(ctypes.Structure):
    _fields_ = [
        ("lock", ctypes.c_uint32),  # struct bpf_spin_lock; the kernel zeroes it on reads
        ("updates", ctypes.c_uint32),
        ("incarnation", ctypes.c_uint64),
        ("key_fp", ctypes.c_uint64),
        ("first_ns", ctypes.c_uint64),
        ("last_ns", ctypes.c_uint64),
        ("syn_ns", ctypes.c_uint64),
        ("synack_ns", ctypes.c_uint64),
        ("ack_ns", ctypes.c_uint64),
        ("end_ns", ctypes.c_uint64),
        ("resumed_ns", ctypes.c_uint64),
        ("fast_until", ctypes.c_uint64),
        ("dir", DirCounters * 2),
        ("syn_count", ctypes.c_uint32),
        ("fin_count", ctypes.c_uint32),
        ("rst_count", ctypes.c_uint32),
        ("initiator", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("end_reason", ctypes.c_uint8),
        ("icmp_type", ctypes.c_uint8),
        ("icmp_code", ctypes.c_uint8),
        ("l7_select", ctypes.c_uint8),
        ("pad0", ctypes.c_uint8 * 2),
        ("l7_budget", ctypes.c_uint32 * 2),
        ("pad1", ctypes.c_uint32),
        ("l7", L7Dir * 2),
    ]


class FragKey(ctypes.Structure):
    _fields_ = [
        ("src", ctypes.c_uint8 * 16),
        ("dst", ctypes.c_uint8 * 16),
        ("id", ctypes.c_uint32),
        ("protocol", ctypes.c_uint8),
        ("ip_version", ctypes.c_uint8),
        ("pad", ctypes.c_uint16),
    ]


class FragValue(ctypes.Structure):
    _fields_ = [("flow", FlowKey), ("dir", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 7)]


class EventHdr(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint16),
        ("size", ctypes.c_uint16),
        ("cpu", ctypes.c_uint32),
        ("ts_ns", ctypes.c_uint64),
    ]


class FlowEndEvent(ctypes.Structure):
    _fields_ = [
        ("hdr", EventHdr),
        ("key", FlowKey),
        ("incarnation", ctypes.c_uint64),
        ("end_reason", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 7),
    ]


class LateUpdateEvent(ctypes.Structure):
    _fields_ = [
        ("hdr", EventHdr),
        ("key", FlowKey),
        ("incarnation", ctypes.c_uint64),
        ("ordinal", ctypes.c_uint32),
        ("dir", ctypes.c_uint8),
        ("pad0", ctypes.c_uint8),
        ("tcp_flags", ctypes.c_uint16),
        ("packets", ctypes.c_uint64),
        ("ip_bytes", ctypes.c_uint64),
        ("l2_bytes", ctypes.c_uint64),
    ]


class PayloadEvent(ctypes.Structure):
    _fields_ = [
        ("hdr", EventHdr),
        ("key", FlowKey),
        ("incarnation", ctypes.c_uint64),
        ("seq", ctypes.c_uint32),
        ("ack", ctypes.c_uint32),
        ("payload_len", ctypes.c_uint32),
        ("offset", ctypes.c_uint32),
        ("cap_len", ctypes.c_uint16),
        ("tcp_flags", ctypes.c_uint16),
        ("dir", ctypes.c_uint8),
        ("l7_select", ctypes.c_uint8),
        ("flags", ctypes.c_uint16),   # LOUPE_PLF_* (bpf/frames.h)
    ]


class SetConfig(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint32),
        ("sample_n", ctypes.c_uint32),
        ("budget", ctypes.c_uint32 * 2),
    ]


class Config(ctypes.Structure):
    _fields_ = [
        ("active_set", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("set", SetConfig * 2),
    ]


class PortKey(ctypes.Structure):
    _fields_ = [("set", ctypes.c_uint16), ("port", ctypes.c_uint16)]


class Cidr4Key(ctypes.Structure):
    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("set", ctypes.c_uint8),
        ("addr", ctypes.c_uint8 * 4),
        ("pad", ctypes.c_uint8 * 3),
    ]


class Cidr6Key(ctypes.Structure):
    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("set", ctypes.c_uint8),
        ("addr", ctypes.c_uint8 * 16),
        ("pad", ctypes.c_uint8 * 3),
    ]


class L7Ctl(ctypes.Structure):
    _fields_ = [
        ("grant", ctypes.c_uint64 * 2),
        ("skip_until", ctypes.c_uint32 * 2),
        ("skip_gen", ctypes.c_uint32 * 2),
        ("flags", ctypes.c_uint32),
        ("hold_peer", ctypes.c_uint32),
    ]


class FilterInsn(ctypes.Structure):
    _fields_ = [
        ("op", ctypes.c_uint8),
        ("dir", ctypes.c_uint8),
        ("version", ctypes.c_uint8),
        ("protocol", ctypes.c_uint8),
        ("port_lo", ctypes.c_uint16),
        ("port_hi", ctypes.c_uint16),
        ("addr", ctypes.c_uint8 * 16),
        ("mask", ctypes.c_uint8 * 16),
    ]


class Filter(ctypes.Structure):
    _fields_ = [
        ("len", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("insn", FilterInsn * FILTER_MAX_INSNS),
    ]


# Enforcement (loupe.h, "enforcement"): block_cfg, block_flow, block_src.
BLOCK_CFG_SIZE = 16
BLOCK_VALUE_SIZE = 56
BLOCK_SRC_KEY_SIZE = 24
BLOCK_STALE_NS = 3_000_000_000       # LOUPE_BLOCK_STALE_NS
BLOCK_FLOW_ENTRIES = 16384
BLOCK_SRC_ENTRIES = 16384
BLOCK_RULE = 1
BLOCK_CLI = 2
BLOCK_DDOS = 3
BLOCK_ANY_FLOW = 0x01
BLOCK_ANY_SRC = 0x02
# Per-source rate limits (loupe.h, "rate limits"; maps.h rate_src).
BLOCK_ANY_RATE = 0x04
RATE_KEY_SIZE = 20
RATE_VALUE_SIZE = 56
RATE_SRC_ENTRIES = 16384
RATE_MAX = 1_000_000


class BlockCfg(ctypes.Structure):
    _fields_ = [
        ("heartbeat_ns", ctypes.c_uint64),
        ("active", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class BlockValue(ctypes.Structure):
    _fields_ = [
        ("expires_ns", ctypes.c_uint64),
        ("added_ns", ctypes.c_uint64),
        ("reason", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("note", ctypes.c_char * 32),
    ]


class BlockSrcKey(ctypes.Structure):
    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("ip_version", ctypes.c_uint8),
        ("addr", ctypes.c_uint8 * 16),
        ("pad", ctypes.c_uint8 * 3),
    ]


# Hold mode (loupe.h, "Hold mode"): hold_svc, hold_req (kernel-written), hold_ok.
BLOCK_ANY_HOLD = 0x08
HOLD_SVC_KEY_SIZE = 20
HOLD_SVC_SIZE = 8
HOLD_REQ_SIZE = 24
HOLD_OK_SIZE = 16
HOLD_SVC_ENTRIES = 256
HOLD_FLOW_ENTRIES = 16384


class HoldSvcKey(ctypes.Structure):
    _fields_ = [
        ("ip_version", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("port", ctypes.c_uint16),
        ("addr", ctypes.c_uint8 * 16),
    ]


class HoldSvc(ctypes.Structure):
    _fields_ = [("max_hold_ns", ctypes.c_uint64)]


class HoldReq(ctypes.Structure):
    _fields_ = [
        ("armed_ns", ctypes.c_uint64),
        ("max_hold_ns", ctypes.c_uint64),
        ("req_end", ctypes.c_uint32),
        ("req_dir", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    ]


class HoldOk(ctypes.Structure):
    _fields_ = [
        ("done_end", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("released_ns", ctypes.c_uint64),
    ]


class RateKey(ctypes.Structure):
    _fields_ = [
        ("ip_version", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
        ("addr", ctypes.c_uint8 * 16),
    ]


class RateValue(ctypes.Structure):
    _fields_ = [
        ("expires_ns", ctypes.c_uint64),
        ("added_ns", ctypes.c_uint64),
        ("last_ns", ctypes.c_uint64),
        ("tokens_milli", ctypes.c_uint64),
        ("passed", ctypes.c_uint64),
        ("dropped", ctypes.c_uint64),
        ("rate", ctypes.c_uint32),
        ("burst", ctypes.c_uint32),
    ]


SIZES: dict[type[ctypes.Structure], int] = {
    RateKey: RATE_KEY_SIZE,
    RateValue: RATE_VALUE_SIZE,
    BlockCfg: BLOCK_CFG_SIZE,
    BlockValue: BLOCK_VALUE_SIZE,
    BlockSrcKey: BLOCK_SRC_KEY_SIZE,
    HoldSvcKey: HOLD_SVC_KEY_SIZE,
    HoldSvc: HOLD_SVC_SIZE,
    HoldReq: HOLD_REQ_SIZE,
    HoldOk: HOLD_OK_SIZE,
    FlowKey: FLOW_KEY_SIZE,
    FlowValue: FLOW_VALUE_SIZE,
    FragKey: FRAG_KEY_SIZE,
    FragValue: FRAG_VALUE_SIZE,
    EventHdr: EVENT_HDR_SIZE,
    FlowEndEvent: FLOW_END_EVENT_SIZE,
    LateUpdateEvent: LATE_UPDATE_EVENT_SIZE,
    PayloadEvent: PAYLOAD_EVENT_SIZE,
    Config: CONFIG_SIZE,
    L7Ctl: L7_CTL_SIZE,
    FilterInsn: FILTER_INSN_SIZE,
    Filter: FILTER_SIZE,
    PortKey: 4,
    Cidr4Key: 12,
    Cidr6Key: 24,
    L7Dir: 40,
}

for _struct, _size in SIZES.items():
    assert ctypes.sizeof(_struct) == _size, (
        f"{_struct.__name__} is {ctypes.sizeof(_struct)} bytes, loupe.h says {_size}"
    )
del _struct, _size
assert ctypes.sizeof(DirCounters) == 32


def key_bytes(key: FlowKey) -> bytes:
    """The key as the hashable bytes userspace indexes its own state by."""
    return bytes(key)


def sample_hash(key: FlowKey) -> int:
    """The kernel's sampling hash of a flow (flow.c key_hash over the canonical key with
    ifindex 0, upper 32 bits): a flow is sampled when this is divisible by sample_n."""
    k = FlowKey.from_buffer_copy(bytes(key))
    k.ifindex = 0
    data = bytes(k)
    h = 0xCBF29CE484222325
    for i in range(0, FLOW_KEY_SIZE, 4):
        h = ((h ^ int.from_bytes(data[i:i + 4], sys.byteorder)) * 0x100000001B3) & (2**64 - 1)
    return h >> 32
