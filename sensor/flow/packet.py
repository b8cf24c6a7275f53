"""The packet shape every packet source (the capture reader, tests' generators) hands the
meter, and the link types the meter decodes. Here, below both, so the engine never
imports sensor.replay.
"""

from __future__ import annotations

# (ts_ns, interface, link_type, frame, wire_len): a plain tuple, not a dataclass,
# because one is made per packet on the replay hot path.
Packet = tuple[int, int, int, bytes, int]

# Link types (tcpdump.org/linktypes.html) the meter decodes.
LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW_12 = 12   # DLT_RAW on most BSDs
LINKTYPE_RAW_14 = 14   # DLT_RAW on OpenBSD
LINKTYPE_RAW = 101
LINKTYPE_C_HDLC = 104  # Cisco HDLC: 4-byte header, the last two an EtherType
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

SUPPORTED_LINKTYPES = frozenset({
    LINKTYPE_NULL, LINKTYPE_ETHERNET, LINKTYPE_RAW_12, LINKTYPE_RAW_14, LINKTYPE_RAW,
    LINKTYPE_C_HDLC, LINKTYPE_LOOP, LINKTYPE_LINUX_SLL, LINKTYPE_IPV4, LINKTYPE_IPV6,
    LINKTYPE_LINUX_SLL2,
})
