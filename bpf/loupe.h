/* loupe.h: the kernel <-> userspace ABI of Loupe's flow meter.
 *
 * Everything userspace reads from or writes to the kernel program is declared here:
 * the flow key and value, the ring buffer events, the counter indices and the limits.
 * sensor/kernel/abi.py mirrors these structs with ctypes; the LOUPE_*_SIZE constants
 * below are asserted on both sides (_Static_assert here, ctypes.sizeof there), so a
 * layout change that is not made in both places fails the build, not the data.
 *
 * Layout rules: fixed-width types only, every padding byte spelled out, multi-byte
 * fields in host byte order unless the name says otherwise (addresses stay in network
 * order, as on the wire). Only UAPI headers are used, so one build runs on any kernel
 * >= 5.8 (ring buffer).
 */
#ifndef LOUPE_H
#define LOUPE_H

#include <linux/types.h>

/* ---- limits; each may be overridden with -D by sensor/kernel/loader.py ---------- */

/* Flows tracked at once. 65536 entries of key+value (~48+168 B plus ~64 B of hash
 * overhead) preallocate ~18 MiB: enough for a busy host between two reads (the reader
 * drains ended and idle flows every second); when full, new flows are counted in
 * LOUPE_CNT_FLOW_MAP_FULL and reach analysts as a LostEvent. */
#ifndef LOUPE_FLOW_MAP_SIZE
#define LOUPE_FLOW_MAP_SIZE 65536
#endif

/* IPv4/IPv6 datagrams being fragmented at once. A first fragment leaves its flow here
 * for the later fragments; LRU because a datagram whose last fragment never comes must
 * not pin an entry. 4096 covers far more concurrent reassemblies than Linux itself
 * keeps by default (ipfrag_high_thresh 4 MiB / ~1.5 KiB per fragment). */
#ifndef LOUPE_FRAG_MAP_SIZE
#define LOUPE_FRAG_MAP_SIZE 4096
#endif

/* IPv6 extension headers walked before giving up. Real traffic carries at most 2-3
 * (hop-by-hop, routing, fragment, destination options); the bound keeps the program
 * verifiable and a crafted chain cheap. Past it the packet is counted in
 * LOUPE_CNT_IPV6_EXT_TOO_LONG and not attributed. */
#ifndef LOUPE_MAX_IPV6_EXT
#define LOUPE_MAX_IPV6_EXT 6
#endif

/* Ring buffer size in pages (power of two). Flow-end and late-update events are tens
 * of bytes and the reader drains them every 100 ms; 64 pages (256 KiB) hold ~3000 of
 * them. When full, the event is counted in LOUPE_CNT_RINGBUF_FULL. */
#ifndef LOUPE_RINGBUF_PAGES
#define LOUPE_RINGBUF_PAGES 64
#endif

/* ---- flow key --------------------------------------------------------------------- */

/* One key per bidirectional flow. The two ends are put in canonical order: the end
 * with the lower (address, port) is "lo", the other "hi"; a packet from lo to hi
 * travels in direction LOUPE_DIR_LO_HI. For ICMP/ICMPv6 the ports are not per-end:
 * port_lo carries the request form of the message type (an echo reply counts with
 * its echo request) and port_hi the code, and the ends are ordered by address only. */
struct loupe_flow_key {
	__u8  addr_lo[16];     /* network order; IPv4 in the first 4 bytes, rest zero */
	__u8  addr_hi[16];
	__u16 port_lo;         /* host order */
	__u16 port_hi;
	__u32 ifindex;         /* interface the packet was seen on */
	__u16 vlan_id;         /* outer 802.1Q/802.1ad VID, 0 when untagged */
	__u16 inner_vlan_id;   /* inner VID of a QinQ frame, 0 otherwise */
	__u8  protocol;        /* IP protocol of the transport header */
	__u8  ip_version;      /* 4 or 6 */
	__u16 pad;
};
#define LOUPE_FLOW_KEY_SIZE 48

#define LOUPE_DIR_LO_HI 0
#define LOUPE_DIR_HI_LO 1

/* ---- flow value ------------------------------------------------------------------- */

/* side_flags: what one direction sent, for Zeek's conn_state (sensor/engine/semantics.py
 * SideFlags). */
#define LOUPE_SIDE_SYN    0x01   /* a SYN without ACK */
#define LOUPE_SIDE_SYNACK 0x02   /* a SYN with ACK */

/* Counters of one direction. Wire packets, not socket buffers: a GSO/GRO buffer of n
 * segments counts n packets and the bytes of n headers (see flow.c). */
struct loupe_dir_counters {
	__u64 packets;
	__u64 ip_bytes;        /* IP total length, IPFIX IE 1 semantics */
	__u64 l2_bytes;        /* frame length incl. Ethernet and VLAN headers, IE 352 */
	__u16 tcp_flags;       /* OR of every TCP flags field this direction sent */
	__u8  side_flags;      /* LOUPE_SIDE_* */
	__u8  pad0;
	__u32 pad1;
};

/* flags */
#define LOUPE_FLOW_INITIATOR_BY_SYN 0x01  /* initiator fixed by a pure SYN */
#define LOUPE_FLOW_ENDED            0x02  /* TCP: RST seen, or FIN in both directions */

/* end_reason, set with LOUPE_FLOW_ENDED */
#define LOUPE_END_RST 1
#define LOUPE_END_FIN 2

/* l7_select: why a flow's payload is copied to userspace. Zero while nothing selects
 * it; the selection stage (ports, CIDR trie, protocol, 1-in-N sampling, explicit keys
 * through an l7_ctl map) will set these bits and spend l7_budget. */
#define LOUPE_SEL_NONE     0x00
#define LOUPE_SEL_PORT     0x01
#define LOUPE_SEL_CIDR     0x02
#define LOUPE_SEL_PROTO    0x04
#define LOUPE_SEL_SAMPLED  0x08
#define LOUPE_SEL_EXPLICIT 0x10
#define LOUPE_SEL_DONE     0x80   /* userspace needs nothing more from this flow */

/* The value is updated under its spin lock, and userspace reads it with BPF_F_LOCK,
 * so a read never sees half of an update (sensor/kernel/flowmap.py). */
struct loupe_flow_value {
	struct bpf_spin_lock lock;
	__u32 updates;         /* updates applied so far: the ordinal of late-update events */
	__u64 incarnation;     /* random id of this entry; a reused entry has another */
	__u64 key_fp;          /* fingerprint of the key, detects a recycled entry */
	__u64 first_ns;        /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u64 last_ns;
	__u64 syn_ns;          /* first pure SYN of the initiator */
	__u64 synack_ns;       /* first SYN-ACK of the responder after it */
	__u64 ack_ns;          /* first ACK of the initiator after the SYN-ACK */
	__u64 end_ns;          /* when LOUPE_FLOW_ENDED was set */
	struct loupe_dir_counters dir[2];  /* indexed by LOUPE_DIR_* */
	__u32 syn_count;       /* segments with SYN, both directions */
	__u32 fin_count;
	__u32 rst_count;
	__u8  initiator;       /* LOUPE_DIR_* of the initiator */
	__u8  flags;           /* LOUPE_FLOW_* */
	__u8  end_reason;      /* LOUPE_END_* */
	__u8  icmp_type;       /* type and code of the flow's first ICMP message */
	__u8  icmp_code;
	__u8  pad0[3];
	__u32 l7_select;       /* LOUPE_SEL_* */
	__u32 l7_budget[2];    /* payload bytes still to copy, per direction */
};
#define LOUPE_FLOW_VALUE_SIZE 168

/* ---- IP fragments ----------------------------------------------------------------- */

/* A datagram being fragmented, as RFC 791 / RFC 8200 identify it. */
struct loupe_frag_key {
	__u8  src[16];
	__u8  dst[16];
	__u32 id;              /* IPv4: 16-bit identification; IPv6: the fragment header's */
	__u8  protocol;
	__u8  ip_version;
	__u16 pad;
};
#define LOUPE_FRAG_KEY_SIZE 40

struct loupe_frag_value {
	struct loupe_flow_key flow;
	__u8  dir;             /* LOUPE_DIR_* of the datagram */
	__u8  pad[7];
};
#define LOUPE_FRAG_VALUE_SIZE 56

/* ---- ring buffer events ----------------------------------------------------------- */

/* Every event starts with this header; type says what follows. Readers skip types they
 * do not know, so new types (payload chunks) need no change to the existing ones. */
#define LOUPE_EV_FLOW_END    1   /* struct loupe_flow_end_event */
#define LOUPE_EV_LATE_UPDATE 2   /* struct loupe_late_update_event */
#define LOUPE_EV_PAYLOAD     3   /* reserved: payload chunk of a selected flow */

struct loupe_event_hdr {
	__u16 type;            /* LOUPE_EV_* */
	__u16 size;            /* bytes of the whole event, header included */
	__u32 cpu;
	__u64 ts_ns;           /* bpf_ktime_get_ns() */
};
#define LOUPE_EVENT_HDR_SIZE 16

/* A TCP flow ended (RST, or FIN both ways): userspace exports it after the linger
 * instead of waiting for the idle timeout. */
struct loupe_flow_end_event {
	struct loupe_event_hdr hdr;
	struct loupe_flow_key key;
	__u64 incarnation;
	__u8  end_reason;      /* LOUPE_END_* */
	__u8  pad[7];
};
#define LOUPE_FLOW_END_EVENT_SIZE 80

/* A packet that was added to an entry userspace had just taken out of the map (see
 * flow.c, "Reading without losing"). ordinal is the entry's `updates` after this
 * packet: if it is above the `updates` userspace read, the packet is not in that read
 * and userspace adds it. */
struct loupe_late_update_event {
	struct loupe_event_hdr hdr;
	struct loupe_flow_key key;
	__u64 incarnation;
	__u32 ordinal;
	__u8  dir;
	__u8  pad0;
	__u16 tcp_flags;
	__u64 packets;
	__u64 ip_bytes;
	__u64 l2_bytes;
};
#define LOUPE_LATE_UPDATE_EVENT_SIZE 104

/* ---- counters --------------------------------------------------------------------- */

/* Indices of the per-CPU counter array. Never reset; userspace sums the CPUs and
 * reports increases. The names in sensor/kernel/counters.py follow this order. */
enum loupe_counter {
	LOUPE_CNT_PACKETS = 0,        /* socket buffers the program ran on */
	LOUPE_CNT_NON_IP,             /* ARP, LLDP, ...: not a flow, not a loss */
	LOUPE_CNT_FLOW_MAP_FULL,      /* a new flow found no room: its packet is not counted */
	LOUPE_CNT_TRUNCATED,          /* a header ended before its fixed part */
	LOUPE_CNT_BAD_HEADER,         /* IHL or TCP data offset < 5, lengths that do not fit */
	LOUPE_CNT_UNSUPPORTED_ENCAP,  /* MPLS, PPPoE, a third VLAN tag, ... */
	LOUPE_CNT_FRAG_NO_FIRST,      /* a later fragment whose first fragment was not seen */
	LOUPE_CNT_IPV6_EXT_TOO_LONG,  /* more than LOUPE_MAX_IPV6_EXT extension headers */
	LOUPE_CNT_RINGBUF_FULL,       /* an event found the ring buffer full */
	LOUPE_CNT_LATE_UPDATE,        /* packets raced a read-and-delete (sent as events) */
	LOUPE_CNT_RECYCLED_ENTRY,     /* an entry was recycled under us twice in a row */
	LOUPE_CNT_FLOW_END_EVENTS,    /* flow-end events sent */
	LOUPE_CNT_MAX
};

#endif /* LOUPE_H */
