/* maps.h: every map of Loupe's flow meter, declared in one place.
 *
 * bcc syntax (BPF_TABLE and friends): sensor/kernel/loader.py compiles flow.c with bcc
 * and looks the maps up by these names. Sizes come from loupe.h, overridable with -D.
 */
#ifndef LOUPE_MAPS_H
#define LOUPE_MAPS_H

#include "loupe.h"

/* flows: one entry per bidirectional flow.
 * Key: struct loupe_flow_key. Value: struct loupe_flow_value (spin-locked).
 * Size: LOUPE_FLOW_MAP_SIZE (why: see loupe.h). A plain hash, not an LRU: an LRU would
 * evict live flows silently when full; a full hash refuses the insert, which the
 * program counts (LOUPE_CNT_FLOW_MAP_FULL). Userspace deletes ended and idle entries. */
BPF_TABLE("hash", struct loupe_flow_key, struct loupe_flow_value, flows, LOUPE_FLOW_MAP_SIZE);

/* frags: the flow of a fragmented datagram, left by its first fragment.
 * Key: struct loupe_frag_key (src, dst, id, protocol). Value: struct loupe_frag_value.
 * Size: LOUPE_FRAG_MAP_SIZE (why: see loupe.h). LRU: abandoned datagrams age out. */
BPF_TABLE("lru_hash", struct loupe_frag_key, struct loupe_frag_value, frags, LOUPE_FRAG_MAP_SIZE);

/* counters: failure and drop counters, one slot per enum loupe_counter.
 * Key: __u32 index. Value: __u64 per CPU (no atomics on the hot path).
 * Size: LOUPE_CNT_MAX, fixed by the enum. */
BPF_PERCPU_ARRAY(counters, __u64, LOUPE_CNT_MAX);

/* events: flow-end, late-update and payload events to userspace (loupe_event_hdr +
 * body). Size: LOUPE_RINGBUF_PAGES pages (why: see loupe.h). A ring buffer, not a perf
 * buffer: one buffer for all CPUs, events in order, a write fails visibly when full. */
BPF_RINGBUF_OUTPUT(events, LOUPE_RINGBUF_PAGES);

/* payload_scratch: where a payload event is assembled before bpf_ringbuf_output, which
 * copies exactly hdr.size bytes (a ring buffer reservation must have a constant size,
 * and a fixed 2 KiB slot for a 40-byte DNS query would waste the ring).
 * Key: __u32 0. Value: struct loupe_payload_scratch, per CPU (a program run never
 * migrates, and runs on one CPU do not nest for TC). Size: 1. */
struct loupe_payload_scratch {
	struct loupe_payload_event ev;
	__u8 data[LOUPE_PAYLOAD_CHUNK];
};
BPF_PERCPU_ARRAY(payload_scratch, struct loupe_payload_scratch, 1);

/* What one packet contributes, and to which flow: flow.c's parse result (not ABI). */
struct loupe_pkt {
	struct loupe_flow_key key;   /* canonical */
	__u8  src[16];               /* addresses as sent; IPv4 in the first 4 bytes */
	__u8  dst[16];
	__u64 packets;
	__u64 ip_bytes;
	__u64 l2_bytes;
	__u32 l3_off;                /* bytes before the IP header in the buffer */
	__u32 l3_hdr_len;            /* IP header incl. IPv6 extension headers */
	__u32 l4_hdr_len;
	__u32 ip_len;                /* IP length of this buffer (non-GSO: the header's) */
	__u32 payload_off;           /* first transport payload byte in the buffer */
	__u32 payload_len;           /* transport payload octets in the buffer */
	__u32 seq;
	__u32 ack;
	__u32 frag_id;
	__u16 tcp_flags;
	__u8  dir;
	__u8  icmp_type;
	__u8  icmp_code;
	__u8  is_first_frag;         /* offset 0 and more fragments follow */
	__u8  is_frag;               /* any fragment: its payload is not a whole datagram */
	__u8  l4_cut;                /* counted in LOUPE_CNT_TRUNCATED_L4 */
};

/* pkt_scratch: the packet being metered (flow.c, loupe_tc: in a map value rather than
 * on the stack so the verifier merges the parse paths). Key: __u32 0. Value: struct
 * loupe_pkt, per CPU (TC runs one program at a time per CPU). Size: 1. */
BPF_PERCPU_ARRAY(pkt_scratch, struct loupe_pkt, 1);

/* new_flow: where a new flow's first value is built before it is inserted (it is too
 * large for the 512-byte BPF stack next to the packet's state). Key: __u32 0.
 * Value: the bytes of a struct loupe_flow_value, per CPU (a per-CPU map may not hold
 * a spin lock, hence bytes). Size: 1. */
struct loupe_flow_bytes {
	__u64 b[LOUPE_FLOW_VALUE_SIZE / 8];
};
BPF_PERCPU_ARRAY(new_flow, struct loupe_flow_bytes, 1);

/* config: the selection sets' settings and which set is active (loupe.h).
 * Key: __u32 0. Value: struct loupe_config. Size: 1. Read for new flows only. */
BPF_ARRAY(config, struct loupe_config, 1);

/* sel_ports: ports that select a flow when either end uses them.
 * Key: struct loupe_port_key (set, port). Value: __u8 (unused).
 * Size: 2 sets x LOUPE_SEL_RULES_ENTRIES. */
BPF_HASH(sel_ports, struct loupe_port_key, __u8, 2 * LOUPE_SEL_RULES_ENTRIES);

/* sel_cidr4 / sel_cidr6: address prefixes that select a flow when either end is in one.
 * Key: set byte + address, longest-prefix match. Value: __u8 (unused).
 * Size: 2 sets x LOUPE_SEL_RULES_ENTRIES each. LPM tries must not be preallocated. */
BPF_LPM_TRIE(sel_cidr4, struct loupe_cidr4_key, __u8, 2 * LOUPE_SEL_RULES_ENTRIES);
BPF_LPM_TRIE(sel_cidr6, struct loupe_cidr6_key, __u8, 2 * LOUPE_SEL_RULES_ENTRIES);

/* sel_protos: IP protocols that select a flow. Key: __u32 set * 256 + protocol.
 * Value: __u8, non-zero = selected. Size: 2 x 256, fixed by the key space. */
BPF_ARRAY(sel_protos, __u8, 512);

/* exclude: the exclusion program of each selection set (loupe.h, "Exclusion"), flipped
 * with the rest of the set by config.active_set. Key: __u32 set (0 or 1). Value: struct
 * loupe_filter (2.5 KiB: LOUPE_FILTER_MAX_INSNS instructions, what the longest
 * expression userspace accepts compiles to). Size: 2, one per set. Read for new flows
 * only, with one lookup. */
BPF_ARRAY(exclude, struct loupe_filter, 2);

/* tails: the programs a new flow goes through while an exclusion program is installed
 * (flow.c, loupe_new_flow). Key: __u32 LOUPE_TAIL_*. Value: a program fd (userspace).
 * Size: 2, one per slot. */
BPF_PROG_ARRAY(tails, 2);

/* tail_state: the flow loupe_new_flow created last on this CPU, so that the run of
 * loupe_tc it starts does not call it again. Key: __u32 0. Value: struct loupe_tail,
 * per CPU (a tail call stays on its CPU). Size: 1. */
struct loupe_tail {
	__u64 fp;                    /* key fingerprint (flow.c key_hash) */
	__u64 created_ns;
};
BPF_PERCPU_ARRAY(tail_state, struct loupe_tail, 1);

/* sel_keys: flows userspace selected explicitly, by canonical key with ifindex 0 (a
 * flow is the same flow on every interface). Checked at a flow's first packet; not
 * part of the double-buffered sets, userspace adds and removes keys at run time.
 * Key: struct loupe_flow_key. Value: __u8 (unused). Size: LOUPE_SEL_KEYS_ENTRIES. */
BPF_HASH(sel_keys, struct loupe_flow_key, __u8, LOUPE_SEL_KEYS_ENTRIES);

/* l7_ctl: userspace's budget grants, skip-until and done per selected flow (loupe.h).
 * Key: struct loupe_flow_key (as in flows, ifindex included). Value: struct
 * loupe_l7_ctl. Size: LOUPE_L7_CTL_ENTRIES. Userspace deletes an entry when it retires
 * the flow. */
BPF_HASH(l7_ctl, struct loupe_flow_key, struct loupe_l7_ctl, LOUPE_L7_CTL_ENTRIES);

/* block_cfg: whether any block is in force, and the sensor's heartbeat (loupe.h,
 * "enforcement"). Key: __u32 0. Value: struct loupe_block_cfg. Size: 1. Its own map,
 * not a field of config: userspace rewrites config whole on a selection reload, and the
 * heartbeat is written every second from another place. Read once per packet. */
BPF_ARRAY(block_cfg, struct loupe_block_cfg, 1);

/* block_flow: flows under a block verdict, dropped both ways. Key: struct
 * loupe_flow_key, canonical, with ifindex 0 (a flow is the same flow on every
 * interface). Value: struct loupe_block_value. Size: LOUPE_BLOCK_FLOW_ENTRIES. A plain
 * hash: userspace writes and deletes (expired entries); a full map refuses the write,
 * counted there. Looked up only while block_cfg says it holds entries. */
BPF_HASH(block_flow, struct loupe_flow_key, struct loupe_block_value, LOUPE_BLOCK_FLOW_ENTRIES);

/* block_src: source prefixes under a ban, every packet from them dropped. Key: struct
 * loupe_block_src_key (version byte + address, longest-prefix match). Value: struct
 * loupe_block_value, with its TTL. Size: LOUPE_BLOCK_SRC_ENTRIES. LPM tries must not be
 * preallocated. Looked up only while block_cfg says it holds entries. */
BPF_LPM_TRIE(block_src, struct loupe_block_src_key, struct loupe_block_value, LOUPE_BLOCK_SRC_ENTRIES);

/* hold_svc: the services whose responses wait for their request's verdict (loupe.h,
 * "Hold mode"; [enforce] hold). Key: struct loupe_hold_svc_key (server address and
 * port). Value: struct loupe_hold_svc. Size: LOUPE_HOLD_SVC_ENTRIES. Written by
 * userspace at start; looked up per packet only while block_cfg says HOLD. */
BPF_HASH(hold_svc, struct loupe_hold_svc_key, struct loupe_hold_svc, LOUPE_HOLD_SVC_ENTRIES);

/* hold_req: the latest request of each flow to a held service. Key: struct
 * loupe_flow_key, canonical, ifindex 0. Value: struct loupe_hold_req, written by the
 * kernel only. Size: LOUPE_HOLD_FLOW_ENTRIES; LRU: an evicted flow is no longer held. */
BPF_TABLE("lru_hash", struct loupe_flow_key, struct loupe_hold_req, hold_req, LOUPE_HOLD_FLOW_ENTRIES);

/* hold_ok: how far userspace has judged each held flow's client stream. Key: as
 * hold_req. Value: struct loupe_hold_ok, written by userspace only (the kernel deletes
 * it when a flow's first request arms hold_req, so a reused 4-tuple starts pending).
 * Size: LOUPE_HOLD_FLOW_ENTRIES; LRU: old verdicts age out. */
BPF_TABLE("lru_hash", struct loupe_flow_key, struct loupe_hold_ok, hold_ok, LOUPE_HOLD_FLOW_ENTRIES);

/* rate_src: per-source token buckets, the DDoS detector's rate limits (loupe.h, "rate
 * limits"). Key: struct loupe_rate_key (version + address; exact sources, not prefixes:
 * a flood's sources are named one by one). Value: struct loupe_rate_value, with its TTL.
 * Size: LOUPE_RATE_SRC_ENTRIES (16384: a flood's named sources, at most `top` per alert
 * and a few alerts a second, for a TTL of minutes). An LRU hash: under a flood from more
 * sources than that, the oldest limit goes rather than the newest being refused, and the
 * bound holds either way. Looked up only while block_cfg has LOUPE_BLOCK_ANY_RATE. */
BPF_TABLE("lru_hash", struct loupe_rate_key, struct loupe_rate_value, rate_src, LOUPE_RATE_SRC_ENTRIES);

#endif /* LOUPE_MAPS_H */
