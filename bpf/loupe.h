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
 * >= 5.14 (hash lookup-and-delete; ring buffer 5.8, coarse clock 5.11).
 */
#ifndef LOUPE_H
#define LOUPE_H

#include <linux/types.h>

/* ---- limits; each may be overridden with -D by sensor/kernel/loader.py ---------- */

/* Flows tracked at once. 65536 entries of key+value (~48+264 B plus ~64 B of hash
 * overhead) preallocate ~24 MiB, and the reader's snapshot buffers take ~20 MiB:
 * enough for a busy host between two reads (the reader drains ended and idle flows
 * every second); when full, new flows are counted in LOUPE_CNT_FLOW_MAP_FULL and
 * reach analysts as a LostEvent. */
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

/* Ring buffer size in pages (power of two). It carries flow-end and late-update
 * events (~100 B) and payload chunks of selected flows (~100 B + payload, bounded by
 * the per-direction budget, 4 KiB by default); the reader drains it continuously.
 * 1024 pages (4 MiB) hold the budgets of ~500 new selected flows at once. When full,
 * the event is counted in LOUPE_CNT_RINGBUF_FULL (and, for payload, in the flow's gap
 * octets). */
#ifndef LOUPE_RINGBUF_PAGES
#define LOUPE_RINGBUF_PAGES 1024
#endif

/* Whether a TCP client's first four payload bytes (big-endian) are a prefix some
 * registered protocol declares; sensor/kernel/loader.py defines it from the protocol
 * registry, so the kernel and userspace share one list. Without it, the sniffer selects
 * by TLS ClientHello only. */
#ifndef LOUPE_SNIFF_PREFIX
#define LOUPE_SNIFF_PREFIX(m) 0
#endif

/* A flow whose packets resume after an idle gap of this long may be being retired by
 * userspace at that moment; for the next LOUPE_RETIRE_GUARD_NS such a flow's packets
 * double-check that their entry is still in the map (flow.c, "Reading without
 * losing"). Userspace never retires a flow idle for less than twice this, nor acts on a
 * snapshot older than half of it (sensor/kernel/flowmap.py). */
#ifndef LOUPE_RETIRE_GUARD_NS
#define LOUPE_RETIRE_GUARD_NS 500000000ULL
#endif

/* Payload bytes per ring buffer event. One MTU-sized segment fits one event; a larger
 * packet (GSO/GRO) becomes up to LOUPE_MAX_CHUNKS events, each with its own seq. */
/* Octets of a payload packet that starts a turn (the other direction sent the latest
 * payload before it) copied even when the direction's allowance is spent: in a
 * request/response exchange such a packet begins a message, and its head must reach the
 * parser even when userspace lags more than one exchange behind (its grants then come too
 * late, and a lost head ends the parse of a protocol that cannot resynchronise). Bounded by
 * one per turn, so a turn-taking flow copies at most this much beyond its allowance per
 * message, and a one-way transfer never. */
#ifndef LOUPE_TURN_OCTETS
#define LOUPE_TURN_OCTETS 512
#endif

#ifndef LOUPE_PAYLOAD_CHUNK
#define LOUPE_PAYLOAD_CHUNK 2048
#endif

/* Payload events per packet. 8 x 2048 = 16 KiB of one 64 KiB GSO buffer: a budget is
 * a few KiB per direction, so only a large grant meets this bound; octets past it are
 * counted as truncated. Bounds the program's work per packet. */
#ifndef LOUPE_MAX_CHUNKS
#define LOUPE_MAX_CHUNKS 8
#endif

/* Explicitly selected flow keys at once (sel_keys), and flows with an l7_ctl entry.
 * Userspace adds these for flows it follows closely (subscriptions, parsers that need
 * more budget or a skip); 16384 is far above the flows a parser stage keeps at once;
 * a full map makes the userspace write fail, which is counted there. */
#ifndef LOUPE_SEL_KEYS_ENTRIES
#define LOUPE_SEL_KEYS_ENTRIES 16384
#endif
#ifndef LOUPE_L7_CTL_ENTRIES
#define LOUPE_L7_CTL_ENTRIES 16384
#endif

/* Selection rules per set: ports and CIDR prefixes. Configuration lists, not traffic:
 * 1024 of each is generous. */
#ifndef LOUPE_SEL_RULES_ENTRIES
#define LOUPE_SEL_RULES_ENTRIES 1024
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

/* Payload accounting of one direction of a selected flow. Every payload octet the
 * direction sent after the flow was selected lands in exactly one of these (userspace
 * turns them into the record's l7_coverage). */
struct loupe_l7_dir {
	__u64 captured;        /* copied into the ring buffer */
	__u64 truncated;       /* not copied: budget exhausted, or past LOUPE_MAX_CHUNKS */
	__u64 skipped;         /* not copied: userspace said skip-until or done */
	__u64 gap;             /* not copied: the ring buffer was full */
	__u32 skip_gen_done;   /* the l7_ctl skip generation this direction has passed */
	__u32 spoke_last;      /* 1: this direction sent the flow's latest payload packet */
};

/* flags */
#define LOUPE_FLOW_INITIATOR_BY_SYN 0x01  /* initiator fixed by a pure SYN */
#define LOUPE_FLOW_ENDED            0x02  /* TCP: RST seen, or FIN in both directions */
#define LOUPE_FLOW_SNIFF_PENDING    0x04  /* unselected: the sniffer looks at its first payload */
#define LOUPE_FLOW_EXCLUDED         0x08  /* the exclusion filter matched its first packet */

/* end_reason, set with LOUPE_FLOW_ENDED */
#define LOUPE_END_RST 1
#define LOUPE_END_FIN 2

/* l7_select: why a flow's payload is copied to userspace (0: it is not). Decided once:
 * the rule bits and SAMPLED/EXPLICIT at the flow's first packet, SNIFFED at its first
 * payload packet (only for flows nothing else selected). */
#define LOUPE_SEL_PORT     0x01   /* rule: either end's port is in sel_ports */
#define LOUPE_SEL_CIDR     0x02   /* rule: either end's address is in sel_cidr4/6 */
#define LOUPE_SEL_PROTO    0x04   /* rule: the IP protocol is in sel_protos */
#define LOUPE_SEL_SAMPLED  0x08   /* 1-in-N sampling by the hash of the canonical key */
#define LOUPE_SEL_EXPLICIT 0x10   /* the key is in sel_keys (userspace, at run time) */
#define LOUPE_SEL_SNIFFED  0x20   /* the first payload looked like TLS, HTTP or DNS */

/* The value is updated under its spin lock, and userspace reads it with BPF_F_LOCK,
 * so a read never sees half of a locked update (sensor/kernel/flowmap.py). Outside the
 * lock, atomically: the fast path's packet and byte counts of steady flows, and the
 * l7[].captured/gap moves after a failed ring buffer write (flow.c). */
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
	__u64 resumed_ns;      /* last packet that came after an idle gap (flow.c, reading) */
	__u64 fast_until;      /* the lock-free fast path is open until then (flow.c) */
	struct loupe_dir_counters dir[2];  /* indexed by LOUPE_DIR_* */
	__u32 syn_count;       /* segments with SYN, both directions */
	__u32 fin_count;
	__u32 rst_count;
	__u8  initiator;       /* LOUPE_DIR_* of the initiator */
	__u8  flags;           /* LOUPE_FLOW_* */
	__u8  end_reason;      /* LOUPE_END_* */
	__u8  icmp_type;       /* type and code of the flow's first ICMP message */
	__u8  icmp_code;
	__u8  l7_select;       /* LOUPE_SEL_* */
	__u8  pad0[2];
	__u32 l7_budget[2];    /* payload octets the flow may copy per direction, before
	                          l7_ctl grants; indexed by LOUPE_L7_TO_* (from the config
	                          at selection time) */
	__u32 pad1;
	struct loupe_l7_dir l7[2];  /* indexed by LOUPE_DIR_* */
};
#define LOUPE_FLOW_VALUE_SIZE 264

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
 * do not know. */
#define LOUPE_EV_FLOW_END    1   /* struct loupe_flow_end_event */
#define LOUPE_EV_LATE_UPDATE 2   /* struct loupe_late_update_event */
#define LOUPE_EV_PAYLOAD     3   /* struct loupe_payload_event + payload bytes */

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

/* Payload of a selected flow: one chunk of one packet, followed by cap_len bytes
 * (hdr.size = LOUPE_PAYLOAD_EVENT_SIZE + cap_len). seq is the TCP sequence number of
 * the chunk's first byte: the packet's seq + offset, which holds for a GSO/GRO buffer
 * too because its payload is contiguous in sequence space. A SYN, FIN or RST of a
 * selected flow without payload comes as an event with cap_len 0, so userspace learns
 * the initial sequence numbers and the ends of the streams. */
#define LOUPE_PL_TO_RESPONDER 0  /* direction: sent by the initiator */
#define LOUPE_PL_TO_INITIATOR 1  /* sent by the responder */

struct loupe_payload_event {
	struct loupe_event_hdr hdr;
	struct loupe_flow_key key;
	__u64 incarnation;
	__u32 seq;             /* TCP only; 0 for UDP */
	__u32 ack;
	__u32 payload_len;     /* payload octets of the whole packet (all GSO segments) */
	__u32 offset;          /* where this chunk starts in that payload */
	__u16 cap_len;         /* bytes that follow this header */
	__u16 tcp_flags;
	__u8  dir;             /* LOUPE_PL_TO_*: relative to the initiator */
	__u8  l7_select;       /* the flow's LOUPE_SEL_* */
	__u16 flags;           /* LOUPE_PLF_* (frames.h: the frame walk's) */
};
#define LOUPE_PAYLOAD_EVENT_SIZE 96

/* ---- selection (maps in maps.h; userspace fills them from its configuration) ------- */

/* Two selection sets exist side by side (index 0 and 1 in every selection key);
 * loupe_config.active_set says which one new flows are checked against. Userspace
 * fills the inactive set, then flips active_set with one array write, so a reload is
 * atomic for every flow and live flows keep what they were decided. */
struct loupe_port_key {
	__u16 set;
	__u16 port;            /* host order */
};

/* LPM trie keys: the prefix covers the set byte too (prefixlen = 8 + address bits). */
struct loupe_cidr4_key {
	__u32 prefixlen;
	__u8  set;
	__u8  addr[4];
	__u8  pad[3];
};
struct loupe_cidr6_key {
	__u32 prefixlen;
	__u8  set;
	__u8  addr[16];
	__u8  pad[3];
};

#define LOUPE_CFG_SNIFF 0x01     /* content sniffing of unselected TCP/UDP flows */

struct loupe_set_config {
	__u32 flags;           /* LOUPE_CFG_* */
	__u32 sample_n;        /* select 1 flow in sample_n by key hash; 0: no sampling */
	__u32 budget[2];       /* payload octets per direction, LOUPE_PL_TO_* */
};

/* The one entry of the config array. */
struct loupe_config {
	__u32 active_set;      /* 0 or 1 */
	__u32 pad;
	struct loupe_set_config set[2];
};
#define LOUPE_CONFIG_SIZE 40

/* Exclusion: a filter expression (sensor/capfilter.py, tcpdump's host/net/port/proto
 * subset) compiled by userspace into a flat postfix program, one per selection set. A new
 * flow whose first packet it matches is never selected: no rule, explicit key, sampling
 * or sniffing applies, so it costs userspace nothing beyond its counters (it is still
 * counted like every flow). It runs once per flow, at its creation; steady packets never
 * see it. Each leaf pushes one bit on a 64-bit stack, AND/OR pop two and push one, NOT
 * flips the top; the flow is excluded when the final top bit is 1. A program of at most
 * LOUPE_FILTER_MAX_INSNS leaves and operators (at most 32 leaves) never holds more
 * than 32 bits. */
#define LOUPE_FILTER_MAX_INSNS 64   /* = capfilter.MAX_NODES: one instruction per node */

#define LOUPE_FOP_IP    1   /* the flow's IP version is `version` */
#define LOUPE_FOP_PROTO 2   /* its IP protocol is `protocol` (and version, if not 0) */
#define LOUPE_FOP_ADDR  3   /* address(es) of `dir`, masked with mask, equal addr */
#define LOUPE_FOP_PORT  4   /* port(s) of `dir` within port_lo..port_hi, for TCP, UDP
                               or SCTP (protocol 0) or for `protocol` only */
#define LOUPE_FOP_AND   5
#define LOUPE_FOP_OR    6
#define LOUPE_FOP_NOT   7

/* dir: which end, as the flow's first packet was sent. */
#define LOUPE_FDIR_EITHER 0
#define LOUPE_FDIR_SRC    1
#define LOUPE_FDIR_DST    2
#define LOUPE_FDIR_BOTH   3

struct loupe_filter_insn {
	__u8  op;              /* LOUPE_FOP_* */
	__u8  dir;             /* LOUPE_FDIR_* */
	__u8  version;         /* 4, 6, or 0 for either */
	__u8  protocol;
	__u16 port_lo;         /* host order */
	__u16 port_hi;
	__u8  addr[16];        /* network order; IPv4 in the first 4 bytes, rest zero */
	__u8  mask[16];
};
#define LOUPE_FILTER_INSN_SIZE 40

struct loupe_filter {
	__u32 len;             /* instructions in use; 0: nothing is excluded */
	__u32 pad;
	struct loupe_filter_insn insn[LOUPE_FILTER_MAX_INSNS];
};
#define LOUPE_FILTER_SIZE 2568

/* Slots of the tails program array (maps.h): userspace puts loupe_tc in the meter's
 * slot at load time, and loupe_new_flow in the other while the active set has an
 * exclusion program. */
#define LOUPE_TAIL_NEW_FLOW 0
#define LOUPE_TAIL_METER    1

/* l7_ctl: what userspace wants from a selected flow. Key: the flow's loupe_flow_key.
 * Only userspace writes it (whole values); the kernel reads it for every payload packet
 * of a selected flow. Fields are cumulative or generation-numbered so a write never
 * has to know what the kernel did in between. Indexed by LOUPE_PL_TO_*. */
#define LOUPE_CTL_DONE 0x01      /* copy nothing more; payload is counted as skipped */
/* Hold a direction (bit LOUPE_CTL_HOLD << LOUPE_PL_TO_*): its payload is skipped while
 * the other direction has sent no payload beyond hold_peer octets. A request/response
 * protocol's parser that needs nothing more of a response (MySQL after enough rows)
 * asks for it; the client's next request ends the hold in the kernel, before userspace
 * sees the request, so the next response is copied from its first byte. */
#define LOUPE_CTL_HOLD 0x02

struct loupe_l7_ctl {
	__u64 grant[2];        /* total octets granted beyond the flow's budget, so far */
	__u32 skip_until[2];   /* TCP seq: payload below it is skipped ... */
	__u32 skip_gen[2];     /* ... while skip_gen differs from the flow's skip_gen_done;
	                          userspace bumps it with every new skip_until */
	__u32 flags;           /* LOUPE_CTL_* */
	__u32 hold_peer;       /* LOUPE_CTL_HOLD: the other direction's payload octets since
	                          selection (captured + truncated + skipped + gap, modulo
	                          2^32) that userspace had seen when it asked for the hold */
};
#define LOUPE_L7_CTL_SIZE 40

/* ---- enforcement (maps.h: block_flow, block_src, block_cfg; docs/kernel.md) -------- */

/* Verdicts from userspace's rules: a blocked flow's packets are dropped both ways, and
 * every packet from a blocked source prefix (a new flow at its first packet). Both fail
 * open: the kernel honours them only while block_cfg.heartbeat_ns, which the sensor
 * rewrites every second, is younger than LOUPE_BLOCK_STALE_NS, so a dead sensor's
 * blocks stop within that time even where its program stays attached (a clsact filter
 * outlives its process; a tcx link does not). Every expiry is CLOCK_MONOTONIC ns, the
 * clock of bpf_ktime_get_ns(); an expired entry is ignored here and deleted by
 * userspace. */
#ifndef LOUPE_BLOCK_STALE_NS
#define LOUPE_BLOCK_STALE_NS 3000000000ULL
#endif

/* Blocked flows and source prefixes at once. A verdict per blocked request, each
 * living for its TTL: 16384 covers a sustained attack of hundreds of blocks a second for
 * a minute's TTL; a full map refuses the write, which userspace counts (the alert then
 * says not enforced). */
#ifndef LOUPE_BLOCK_FLOW_ENTRIES
#define LOUPE_BLOCK_FLOW_ENTRIES 16384
#endif
#ifndef LOUPE_BLOCK_SRC_ENTRIES
#define LOUPE_BLOCK_SRC_ENTRIES 16384
#endif

/* Why an entry is there (block_value.reason). */
#define LOUPE_BLOCK_RULE 1       /* a rule's block verdict */
#define LOUPE_BLOCK_CLI  2       /* `loupe block add` */
#define LOUPE_BLOCK_DDOS 3       /* the DDoS detector's mitigation */

/* block_cfg.active: which maps hold entries, so an unblocked host pays one array
 * lookup per packet and no hash or trie lookup. */
#define LOUPE_BLOCK_ANY_FLOW 0x01
#define LOUPE_BLOCK_ANY_SRC  0x02

struct loupe_block_cfg {
	__u64 heartbeat_ns;    /* bpf_ktime_get_ns() clock; written by userspace each second */
	__u32 active;          /* LOUPE_BLOCK_ANY_* */
	__u32 pad;
};
#define LOUPE_BLOCK_CFG_SIZE 16

/* The value of both block maps. */
struct loupe_block_value {
	__u64 expires_ns;      /* CLOCK_MONOTONIC ns; the entry is void from then on */
	__u64 added_ns;        /* CLOCK_MONOTONIC ns */
	__u32 reason;          /* LOUPE_BLOCK_* */
	__u32 pad;
	char  note[32];        /* the rule id or the operator's note, NUL-padded */
};
#define LOUPE_BLOCK_VALUE_SIZE 56

/* block_src key: the version byte is part of the prefix (prefixlen = 8 + address bits),
 * so IPv4 and IPv6 prefixes share one trie without colliding. */
struct loupe_block_src_key {
	__u32 prefixlen;
	__u8  ip_version;      /* 4 or 6 */
	__u8  addr[16];        /* network order; IPv4 in the first 4 bytes */
	__u8  pad[3];
};
#define LOUPE_BLOCK_SRC_KEY_SIZE 24

/* Per-source rate limits (maps.h: rate_src), the DDoS detector's "ratelimit" mitigation
 * (sensor/rules/ddos.py, docs/rules.md "DDoS"): a token bucket per source address. Each
 * packet from the source that opens a connection (a TCP SYN) or carries payload takes a
 * token; the bucket refills at `rate` tokens a second up to `burst`; a packet that finds
 * it empty is dropped (TCP sends it again later, so a limited client slows down rather
 * than breaks). Bare ACKs, FINs and RSTs always pass: connections can still close.
 * Tokens are kept in thousandths. The update is not atomic: two CPUs taking the last
 * token at once both pass, so the limit can be exceeded by one packet per CPU per refill
 * (a rate limit, not an accounting). Same TTL and fail-open rules as the block maps:
 * block_cfg.active has LOUPE_BLOCK_ANY_RATE while the map holds entries. */
#ifndef LOUPE_RATE_SRC_ENTRIES
#define LOUPE_RATE_SRC_ENTRIES 16384
#endif
#define LOUPE_BLOCK_ANY_RATE 0x04
#define LOUPE_RATE_MAX 1000000           /* tokens a second: keeps the refill in 64 bits */
#define LOUPE_RATE_MAX_REFILL_NS 10000000000ULL   /* 10 s of refill at most per packet */

struct loupe_rate_key {
	__u8  ip_version;      /* 4 or 6 */
	__u8  pad[3];
	__u8  addr[16];        /* network order; IPv4 in the first 4 bytes */
};
#define LOUPE_RATE_KEY_SIZE 20

struct loupe_rate_value {
	__u64 expires_ns;      /* CLOCK_MONOTONIC ns; the limit is void from then on */
	__u64 added_ns;
	__u64 last_ns;         /* the last refill; 0: a new entry, its bucket full */
	__u64 tokens_milli;    /* tokens x 1000 */
	__u64 passed;          /* packets that took a token */
	__u64 dropped;         /* packets dropped on an empty bucket */
	__u32 rate;            /* tokens a second, 1..LOUPE_RATE_MAX */
	__u32 burst;           /* bucket size in tokens, >= 1 */
};
#define LOUPE_RATE_VALUE_SIZE 56

/* Hold mode (maps.h: hold_svc, hold_req, hold_ok; docs/rules.md, "Hold mode"). For the
 * services the configuration names, a response waits for the verdict on its request:
 * a client payload packet toward a held service marks its flow pending (hold_req, written
 * here, in the kernel, because userspace learns of the request too late to stop a server
 * that answers at once), and the server's payload and FIN packets of a pending flow are
 * dropped, so that its TCP sends them again later. Userspace ends the wait by writing how
 * far it has judged the client's stream (hold_ok) on a non-block outcome, or blocks the
 * flow. Two maps, one writer each: the kernel re-arms hold_req per request (keep-alive)
 * while userspace writes hold_ok, and neither overwrites what the other wrote.
 * Bounded: a response waits at most the service's max_hold_ns after its request's last
 * packet, then passes (fail open), and the heartbeat's staleness ends every hold. */
#define LOUPE_BLOCK_ANY_HOLD 0x08    /* hold_svc holds entries (block_cfg.active) */

/* Held services (address:port): a handful a host names; 256 is generous. */
#ifndef LOUPE_HOLD_SVC_ENTRIES
#define LOUPE_HOLD_SVC_ENTRIES 256
#endif
/* Flows to held services with a request seen, at once: LRU, so a flow evicted under a
 * flood of new ones is released (fail open), never held for good. */
#ifndef LOUPE_HOLD_FLOW_ENTRIES
#define LOUPE_HOLD_FLOW_ENTRIES 16384
#endif

struct loupe_hold_svc_key {
	__u8  ip_version;      /* 4 or 6 */
	__u8  pad;
	__u16 port;            /* host order */
	__u8  addr[16];        /* network order; IPv4 in the first 4 bytes */
};
#define LOUPE_HOLD_SVC_KEY_SIZE 20

struct loupe_hold_svc {
	__u64 max_hold_ns;     /* the longest a response waits after its request's last packet */
};
#define LOUPE_HOLD_SVC_SIZE 8

/* hold_req value: written by the kernel only. */
struct loupe_hold_req {
	__u64 armed_ns;        /* bpf_ktime_get_ns() at the latest request payload packet */
	__u64 max_hold_ns;     /* the service's, copied when the flow's first request came */
	__u32 req_end;         /* the client's next sequence number after that packet */
	__u8  req_dir;         /* LOUPE_DIR_*: the client's direction */
	__u8  pad[3];
};
#define LOUPE_HOLD_REQ_SIZE 24

/* hold_ok value: written by userspace only. The flow's responses flow while
 * done_end is at or past hold_req.req_end (sequence-number order, modulo 2^32). */
struct loupe_hold_ok {
	__u32 done_end;        /* the client's stream is judged up to this sequence number */
	__u32 pad;
	__u64 released_ns;     /* CLOCK_MONOTONIC ns of the write (for `loupe block list`) */
};
#define LOUPE_HOLD_OK_SIZE 16

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
	LOUPE_CNT_HEADER_PULLS,       /* headers outside the linear part, pulled into it */
	LOUPE_CNT_PAYLOAD_EVENTS,     /* payload events sent */
	LOUPE_CNT_PAYLOAD_OCTETS,     /* payload octets copied into them */
	LOUPE_CNT_PAYLOAD_GAP_OCTETS, /* payload octets lost to a full ring buffer */
	LOUPE_CNT_SELECTED_FLOWS,     /* flows selected at their first packet */
	LOUPE_CNT_SNIFFED_FLOWS,      /* flows selected by the content sniffer */
	LOUPE_CNT_TRUNCATED_L4,       /* counted in a flow with ports 0: transport header cut */
	LOUPE_CNT_EXCLUDED_FLOWS,     /* flows the exclusion filter kept from selection */
	LOUPE_CNT_TAIL_CALL_FAILED,   /* a new flow's packet could not re-enter the meter */
	LOUPE_CNT_BLOCKED_FLOW,       /* dropped: its flow is in block_flow (enforcement) */
	LOUPE_CNT_BLOCKED_SRC,        /* dropped: its source is in block_src (enforcement) */
	LOUPE_CNT_HELD,               /* dropped: a response waiting for its verdict (hold) */
	LOUPE_CNT_HOLD_EXPIRED,       /* passed: its verdict took longer than max_hold_ns */
	LOUPE_CNT_MAX
};

/* ---- TLS plaintext (bpf/tls_probe.c: uprobes on the TLS libraries) ----------------- */

/* Plaintext octets per event. One call's bytes go in one event, from its start: an HTTP
 * head (what the parsers need) is at the start of the call that carries it; the rest of a
 * larger call is counted as truncated. Power of two, for the verifier's bound. */
#ifndef LOUPE_TLS_CHUNK
#define LOUPE_TLS_CHUNK 4096
#endif

/* Ring buffer pages (power of two). 256 pages (1 MiB) hold ~250 full chunks: a burst of
 * 250 new connections' first calls between two drains. Full: counted, the chunk lost. */
#ifndef LOUPE_TLS_RINGBUF_PAGES
#define LOUPE_TLS_RINGBUF_PAGES 256
#endif

/* TLS objects (SSL *, gnutls_session_t) tracked at once, per process. LRU: an object
 * freed without SSL_free being seen (a library not probed for it) must not pin an
 * entry; an evicted live one restarts its offsets, which userspace sees. */
#ifndef LOUPE_TLS_CONNS
#define LOUPE_TLS_CONNS 65536
#endif

/* Threads inside a probed call at once (entry saved until its return). */
#ifndef LOUPE_TLS_CALLS
#define LOUPE_TLS_CALLS 16384
#endif

/* Entries of each selection list (process names, cgroup ids). */
#ifndef LOUPE_TLS_SEL_ENTRIES
#define LOUPE_TLS_SEL_ENTRIES 1024
#endif

#define LOUPE_TLS_READ  0   /* dir: the process received these octets */
#define LOUPE_TLS_WRITE 1   /* the process sent them */

#define LOUPE_TLS_LIB_OPENSSL 1
#define LOUPE_TLS_LIB_GNUTLS  2
#define LOUPE_TLS_LIB_GO      3   /* Go's crypto/tls: ssl is the *tls.Conn */

/* fd_src: where the event's fd comes from. */
#define LOUPE_TLS_FD_NONE    0   /* unknown: no SSL_set_fd, no syscall in any call yet */
#define LOUPE_TLS_FD_SET_FD  1   /* SSL_set_fd(ssl, fd) */
#define LOUPE_TLS_FD_SYSCALL 2   /* a read/write-family syscall inside a call on it */

/* Selection flags of loupe_tls_config. */
#define LOUPE_TLS_SEL_COMM   0x01   /* only processes whose comm is in tls_sel_comm */
#define LOUPE_TLS_SEL_CGROUP 0x02   /* only tasks whose cgroup id is in tls_sel_cgroup */
/* Not a selection: a Go binary is probed, so the syscall tracepoints also look for a
 * goroutine's call on the thread (one more lookup per syscall only once one is). */
#define LOUPE_TLS_HAS_GO     0x04

/* One TLS object of one process. */
struct loupe_tls_conn_key {
	__u64 ssl;             /* the object's address in the process: an opaque id */
	__u32 tgid;
	__u32 pad;
};
#define LOUPE_TLS_CONN_KEY_SIZE 16

/* A call between its entry and its return, per thread id. */
struct loupe_tls_call {
	__u64 ssl;
	__u64 buf;             /* the caller's buffer */
	__u64 len_ptr;         /* SSL_*_ex: where the length is written; 0 otherwise */
	__s32 fd;              /* the first read/write syscall's fd inside the call, or -1 */
	__u8  dir;             /* LOUPE_TLS_READ / WRITE */
	__u8  lib;             /* LOUPE_TLS_LIB_* */
	__u16 pad;
};
#define LOUPE_TLS_CALL_SIZE 32

/* The kernel's state of one TLS object. Octets of a direction land in exactly one of
 * copied, truncated (budget) or skipped (userspace's skip or stop). */
struct loupe_tls_conn {
	__u64 offset[2];       /* stream octets so far, by LOUPE_TLS_READ / WRITE */
	__u64 copied[2];
	__u64 truncated[2];
	__u64 skipped[2];
	__s32 fd;
	__u8  fd_src;          /* LOUPE_TLS_FD_* */
	__u8  pad[3];
};
#define LOUPE_TLS_CONN_SIZE 72

/* tls_ctl: what userspace wants from one object (the wire's loupe_l7_ctl, with stream
 * offsets instead of TCP seqs: they never wrap, so no generation is needed). Only
 * userspace writes it; the return probes read it. */
struct loupe_tls_ctl {
	__u64 grant[2];        /* octets granted beyond the budget, so far */
	__u64 skip_until[2];   /* stream offset: octets below it are skipped */
	__u32 flags;           /* LOUPE_CTL_DONE */
	__u32 pad;
};
#define LOUPE_TLS_CTL_SIZE 40

/* The one entry of tls_config. enabled 0 leaves every probe a lookup and a return. */
struct loupe_tls_config {
	__u32 enabled;
	__u32 flags;           /* LOUPE_TLS_SEL_* */
	__u32 budget[2];       /* octets per direction copied before any grant */
};
#define LOUPE_TLS_CONFIG_SIZE 16

/* The socket of a process's fd, learnt in the kernel as connect() runs, for userspace
 * to fall back on when /proc no longer has the fd (a short connection, closed before its
 * chunks were read). sys_enter_connect names the fd, sock:inet_sock_set_state to
 * SYN_SENT (in the same thread) its socket, and the socket leaving SYN_SENT the final
 * 4-tuple: tracepoint arguments only. Accepted sockets are not covered (their state
 * changes run in softirq, with no task to tie an fd to). An entry outlives close() on
 * purpose (the event may be read after it); the next connect() on the fd replaces it. */
struct loupe_tls_fd_key {
	__u32 tgid;
	__s32 fd;
};
#define LOUPE_TLS_FD_KEY_SIZE 8

struct loupe_tls_sock {
	__u8  saddr[16];       /* local, network order; IPv4 in the first 4 bytes */
	__u8  daddr[16];       /* remote */
	__u16 sport;           /* host order */
	__u16 dport;
	__u16 family;          /* AF_INET (2) or AF_INET6 (10) */
	__u16 accepted;        /* 1: accept()ed (the peer initiated), 0: connect()ed */
};
#define LOUPE_TLS_SOCK_SIZE 40

/* A chunk of plaintext: this header, then cap_len octets. len counts from offset (after
 * a skip), so len - cap_len octets of the call were not copied (budget or chunk size).
 * Without data: LOUPE_TLS_EV_BIND, the object was just bound to fd (SSL_set_fd);
 * LOUPE_TLS_EV_PROGRESS, a call ended a skip range, the stream is at offset now (so a
 * body skipped in the kernel ends its transaction without waiting for more). sock is the fd's
 * 4-tuple when the kernel saw it connect (flags LOUPE_TLS_EV_SOCK): taken at the call,
 * so it names this connection even if the fd is closed and reused before userspace
 * reads the event (for other sockets userspace asks /proc). */
#define LOUPE_TLS_EV_SOCK     0x01
#define LOUPE_TLS_EV_BIND     0x02
#define LOUPE_TLS_EV_PROGRESS 0x04
struct loupe_tls_event {
	__u64 ts_ns;           /* bpf_ktime_get_ns() at the call's return */
	__u64 ssl;
	__u64 offset;          /* stream offset of the first octet */
	__u64 cgroup_id;
	__u32 tgid;
	__u32 tid;
	__s32 fd;              /* -1 when fd_src is LOUPE_TLS_FD_NONE */
	__u32 len;
	__u16 cap_len;
	__u8  dir;             /* LOUPE_TLS_READ / WRITE */
	__u8  lib;
	__u8  fd_src;
	__u8  flags;           /* LOUPE_TLS_EV_* */
	__u8  pad[2];
	char  comm[16];
	struct loupe_tls_sock sock;
};
#define LOUPE_TLS_EVENT_SIZE 112

/* Indices of the TLS program's per-CPU counter array (sensor/kernel/tlsprobe.py names
 * them in this order). */
enum loupe_tls_counter {
	LOUPE_TLS_CNT_CALLS = 0,       /* probed calls that returned data */
	LOUPE_TLS_CNT_EVENTS,          /* chunks sent */
	LOUPE_TLS_CNT_COPIED,          /* octets copied into them */
	LOUPE_TLS_CNT_TRUNCATED,       /* octets not copied: budget or chunk size */
	LOUPE_TLS_CNT_SKIPPED,         /* octets not copied: userspace skip or stop */
	LOUPE_TLS_CNT_RINGBUF_FULL,    /* chunks lost to a full ring buffer */
	LOUPE_TLS_CNT_RINGBUF_OCTETS,  /* their octets */
	LOUPE_TLS_CNT_CALLS_FULL,      /* an entry found tls_calls full: the call is lost */
	LOUPE_TLS_CNT_READ_FAILED,     /* the caller's buffer could not be read */
	LOUPE_TLS_CNT_NOT_SELECTED,    /* calls of processes outside the selection */
	LOUPE_TLS_CNT_MAX
};

#endif /* LOUPE_H */
