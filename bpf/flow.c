/* flow.c: Loupe's flow meter, a TC clsact program for ingress and egress.
 *
 * Strategy
 * - Observe only: every path returns TC_ACT_UNSPEC, which passes the packet exactly as
 *   TC_ACT_OK does when we are the only filter, and lets a filter chained after ours
 *   (another tool's program) still run, so attaching Loupe never changes a verdict.
 *   The one exception is enforcement (blocked(), near loupe_tc): a packet of a flow or
 *   source that userspace's rules blocked returns TC_ACT_SHOT, and only while the
 *   sensor's heartbeat is fresh.
 * - Only packet bytes and __sk_buff fields are read; no kernel struct, so one build
 *   runs on any kernel >= 5.14 (the newest feature used: hash lookup-and-delete, by
 *   the reader). Only UAPI headers are included.
 * - Headers are read straight from the buffer's linear part (direct packet access),
 *   where the stack and drivers put them; a header outside it (a driver that left
 *   everything in page fragments) is pulled into it first and counted
 *   (LOUPE_CNT_HEADER_PULLS). No byte of the packet is ever changed.
 * - Wire packets, not socket buffers: with TSO/GSO on egress and GRO on ingress one
 *   buffer carries gso_segs segments, each of which had its own L2/L3/L4 headers on the
 *   wire. We count gso_segs packets and add the per-segment header length for every
 *   segment but the first (whose headers are in the buffer).
 * - A VLAN tag the NIC or stack moved out of the frame (skb->vlan_present) still was on
 *   the wire: it is the outer tag, and its 4 bytes count in the layer-2 length.
 * - Every packet that is not attributed to a flow is counted in one of the per-CPU
 *   counters (loupe.h, enum loupe_counter); none is misattributed.
 * - A packet of a steady flow (known, handshake done, no new flag, not selected)
 *   costs a header read in place, one hash lookup, the coarse clock and three atomic
 *   adds: the quick path (quick_path) for TCP/UDP over IPv4 without options or IPv6
 *   without extension headers, else the full parse and the same lock-free add
 *   (fast_path). Every other packet takes the entry's spin lock (account).
 *
 * Reading without losing
 *   Userspace takes finished flows out with BPF_MAP_LOOKUP_AND_DELETE_ELEM(BPF_F_LOCK),
 *   which copies the value under its spin lock and unlinks it in one step. A program
 *   that looked the entry up before the unlink may still add its packet after the copy,
 *   into an entry nobody will read again; and a preallocated entry may already have
 *   been reused for another flow (key_fp, checked under the lock, catches that and the
 *   program looks the key up again). A packet that may have raced an unlink looks its
 *   key up once more after its update: if the entry is gone or is another incarnation,
 *   it sends itself as a LOUPE_EV_LATE_UPDATE event with the update's ordinal. The lock
 *   serialises updates and the copy, so userspace knows exactly whether the packet is
 *   in its copy (ordinal <= copied `updates`) or must be added.
 *
 *   Userspace retires an entry only if its snapshot shows it ENDED at least
 *   LOUPE_RETIRE_GUARD_NS ago (and after its linger), or idle for at least 2 * GUARD,
 *   and only within GUARD / 2 of the snapshot (sensor/kernel/flowmap.py). So the first
 *   update after such a snapshot either sees ENDED (sticky), or comes after a gap of at
 *   least GUARD since the snapshot's last_ns and stamps resumed_ns; every later update
 *   within GUARD of resumed_ns is therefore racing a possible unlink and double-checks.
 *   Every other update cannot race one, and skips the second lookup. (A program run is
 *   not preempted between reading the clock and taking the lock: TC runs with bottom
 *   halves disabled.)
 *
 *   The fast path goes further: a locked update of a steady flow (not ENDED, no
 *   double-check due, handshake complete, not being sniffed) sets fast_until = now +
 *   GUARD, and until then packets that change nothing but counters skip the lock and
 *   add atomically. No unlink can race them: an unlink needs a snapshot showing the
 *   flow idle for 2 * GUARD, i.e. taken after fast_until, after which the first packet
 *   takes the locked path (its gap is at least GUARD); or ENDED, which clears
 *   fast_until, GUARD before the unlink. A fast-path packet would have to stall GUARD
 *   (0.5 s) between its check and its adds, which a program run does not. The check
 *   reads the coarse clock, at most a tick (4 ms at HZ=250) behind the exact one that
 *   set fast_until, so the stall would still have to be GUARD minus a tick; and a
 *   fast-path last_ns up to a tick early only makes a flow look idle that much sooner,
 *   which the first locked packet after it sees as a gap (resumed_ns). What the lock
 *   no longer gives: a snapshot taken while a fast-path packet is between its three
 *   adds shows part of it; interim records (which never delete) may then split one
 *   packet's fields across two consecutive records of the flow. Their sums stay exact,
 *   and retirement (the final record) never races a fast-path add.
 *
 * Selection and payload (loupe.h, "selection"; docs/kernel.md)
 *   A new flow is checked once against the active selection set: its exclusion
 *   program first (an excluded flow is counted and never selected), then protocols,
 *   ports, CIDR tries, the explicit keys and 1-in-N sampling, and keeps the outcome in
 *   l7_select with its per-direction budget. An unselected TCP/UDP flow gets one look
 *   at its first payload (content sniffing: TLS ClientHello, HTTP method, DNS shape).
 *   For a selected flow the payload goes to the ring buffer in chunks, minus what
 *   userspace's l7_ctl entry says to skip, up to the budget plus grants; every octet
 *   not copied is counted in the flow's l7[] (truncated, skipped, gap).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>

#include "loupe.h"
#include "maps.h"
#include "frames.h"

_Static_assert(sizeof(struct loupe_flow_key) == LOUPE_FLOW_KEY_SIZE, "flow key size");
_Static_assert(sizeof(struct loupe_flow_value) == LOUPE_FLOW_VALUE_SIZE, "flow value size");
_Static_assert(sizeof(struct loupe_frag_key) == LOUPE_FRAG_KEY_SIZE, "frag key size");
_Static_assert(sizeof(struct loupe_frag_value) == LOUPE_FRAG_VALUE_SIZE, "frag value size");
_Static_assert(sizeof(struct loupe_event_hdr) == LOUPE_EVENT_HDR_SIZE, "event header size");
_Static_assert(sizeof(struct loupe_flow_end_event) == LOUPE_FLOW_END_EVENT_SIZE, "end event size");
_Static_assert(sizeof(struct loupe_late_update_event) == LOUPE_LATE_UPDATE_EVENT_SIZE,
	       "late event size");
_Static_assert(sizeof(struct loupe_payload_event) == LOUPE_PAYLOAD_EVENT_SIZE,
	       "payload event size");
_Static_assert(sizeof(struct loupe_config) == LOUPE_CONFIG_SIZE, "config size");
_Static_assert(sizeof(struct loupe_l7_ctl) == LOUPE_L7_CTL_SIZE, "l7_ctl size");
_Static_assert(sizeof(struct loupe_filter_insn) == LOUPE_FILTER_INSN_SIZE, "filter insn size");
_Static_assert(sizeof(struct loupe_filter) == LOUPE_FILTER_SIZE, "filter size");
_Static_assert(LOUPE_PAYLOAD_CHUNK >= 64 && LOUPE_PAYLOAD_CHUNK <= 16384,
	       "payload chunk within 64..16384");

#define ETH_HLEN_ 14
#define VLAN_HLEN_ 4
#define ETH_P_8021Q_ 0x8100
#define ETH_P_8021AD_ 0x88A8
#define ETH_P_IP_ 0x0800
#define ETH_P_IPV6_ 0x86DD
#define ETH_P_MPLS_UC_ 0x8847
#define ETH_P_MPLS_MC_ 0x8848
#define ETH_P_PPP_DISC_ 0x8863
#define ETH_P_PPP_SES_ 0x8864

#define PROTO_ICMP 1
#define PROTO_TCP 6
#define PROTO_UDP 17
#define PROTO_ICMPV6 58
#define PROTO_SCTP 132
#define NH_HOPOPTS 0
#define NH_ROUTING 43
#define NH_FRAGMENT 44
#define NH_AH 51
#define NH_DSTOPTS 60

#define TCPF_FIN 0x01
#define TCPF_SYN 0x02
#define TCPF_RST 0x04
#define TCPF_ACK 0x10

/* Offsets beyond this are not headers; the bound also lets the verifier prove packet
 * pointer arithmetic. */
#define MAX_HDR_OFF 0x3fff

#define barrier_var(v) asm volatile("" : "+r"(v))

/* Bytes of the first payload the content sniffer looks at. */
#define SNIFF_LEN 16


static __always_inline void count(__u32 idx)
{
	__u64 *c = counters.lookup(&idx);
	if (c)
		*c += 1;
}

static __always_inline void count_n(__u32 idx, __u64 n)
{
	__u64 *c = counters.lookup(&idx);
	if (c)
		*c += n;
}

/* Copies len bytes at off into buf, from the buffer's linear part. Headers are there
 * unless a driver left the whole frame in page fragments; then they are pulled into
 * the linear part first (bpf_skb_pull_data moves bytes, it changes none) and counted.
 * One way of reading keeps the verifier's view of the copy the same on both paths. */
static __always_inline int load_hdr(struct __sk_buff *skb, __u32 off, void *buf, __u32 len)
{
	if (off > MAX_HDR_OFF)
		return -1;
	/* The context may only be read at constant offsets from skb itself; the barrier
	 * keeps the compiler from reusing a hoisted &skb->data_end. */
	barrier_var(skb);
	void *at = (void *)(long)skb->data + off;
	void *end = (void *)(long)skb->data_end;
	/* One register holds the pointer that is both checked and read through. */
	barrier_var(at);
	if (at + len > end) {
		if (off + len > skb->len)
			return -1;
		count(LOUPE_CNT_HEADER_PULLS);
		if (bpf_skb_pull_data(skb, off + len) < 0)
			return -1;
		barrier_var(skb);
		at = (void *)(long)skb->data + off;
		end = (void *)(long)skb->data_end;
		barrier_var(at);
		if (at + len > end)
			return -1;
	}
	__builtin_memcpy(buf, at, len);
	return 0;
}

/* FNV-1a over the key's 32-bit words: entry fingerprint and sampling hash. */
static __always_inline __u64 key_hash(const struct loupe_flow_key *k)
{
	const __u32 *w = (const __u32 *)k;
	__u64 h = 0xcbf29ce484222325ULL;
#pragma unroll
	for (int i = 0; i < LOUPE_FLOW_KEY_SIZE / 4; i++)
		h = (h ^ w[i]) * 0x100000001b3ULL;
	return h;
}

/* ICMP query/response pairs count as one flow: the key carries the request type. */
static __always_inline __u8 icmp_request_type(__u8 version, __u8 type, __u8 *is_reply)
{
	*is_reply = 1;
	if (version == 4) {
		switch (type) {
		case 0: return 8;    /* echo reply -> echo request */
		case 14: return 13;  /* timestamp */
		case 16: return 15;  /* information */
		case 18: return 17;  /* address mask */
		case 9: return 10;   /* router advertisement -> solicitation */
		}
	} else {
		switch (type) {
		case 129: return 128;  /* echo */
		case 134: return 133;  /* router advertisement -> solicitation */
		case 136: return 135;  /* neighbour advertisement -> solicitation */
		}
	}
	*is_reply = 0;
	return type;
}

/* Orders the ends into k: lo gets the lower (address, port). Returns which end sent
 * (LOUPE_DIR_*). */
static __always_inline __u8 canonicalize(struct loupe_flow_key *k, const __u8 *src,
					 const __u8 *dst, __u16 sport, __u16 dport,
					 int ports_ordered, __u8 reply_hint)
{
	const __u32 *s = (const __u32 *)src;
	const __u32 *d = (const __u32 *)dst;
	int cmp = 0;
#pragma unroll
	for (int i = 0; i < 4; i++) {
		if (cmp == 0) {
			__u32 a = bpf_ntohl(s[i]), b = bpf_ntohl(d[i]);
			if (a < b)
				cmp = -1;
			else if (a > b)
				cmp = 1;
		}
	}
	if (cmp == 0 && ports_ordered)
		cmp = sport < dport ? -1 : (sport > dport ? 1 : 0);
	if (cmp == 0)
		cmp = reply_hint ? 1 : -1;   /* same end both ways: ICMP reply goes hi->lo */
	if (cmp < 0) {
		__builtin_memcpy(k->addr_lo, src, 16);
		__builtin_memcpy(k->addr_hi, dst, 16);
	} else {
		__builtin_memcpy(k->addr_lo, dst, 16);
		__builtin_memcpy(k->addr_hi, src, 16);
	}
	if (ports_ordered && cmp >= 0) {
		k->port_lo = dport;
		k->port_hi = sport;
	} else {
		k->port_lo = sport;
		k->port_hi = dport;
	}
	return cmp < 0 ? LOUPE_DIR_LO_HI : LOUPE_DIR_HI_LO;
}

/* Parses the transport header at off (within the IP datagram ending at end) and fills
 * the canonical key. Returns 0, or the counter explaining why it could not. A datagram
 * that ends inside its transport header still counts, in a flow with ports 0, as the
 * replay meter, nDPI and NFStream count it (LOUPE_CNT_TRUNCATED_L4, not a loss). */
static __always_inline int parse_l4(struct __sk_buff *skb, struct loupe_pkt *p, __u32 off, __u32 end)
{
	__u8 proto = p->key.protocol;
	__u16 sport = 0, dport = 0;
	int ports_ordered = 1;
	__u8 reply = 0;
	int icmp = (proto == PROTO_ICMP && p->key.ip_version == 4) ||
		   (proto == PROTO_ICMPV6 && p->key.ip_version == 6);
	__u32 need = proto == PROTO_TCP ? 20 : (proto == PROTO_UDP || proto == PROTO_SCTP) ? 8 :
		     icmp ? 2 : 0;

	if (off + need > end) {
		count(LOUPE_CNT_TRUNCATED_L4);
		p->l4_cut = 1;
		if (icmp)
			ports_ordered = 0;
	} else if (proto == PROTO_TCP) {
		__u8 h[16];
		if (load_hdr(skb, off, h, sizeof(h)) < 0)
			return LOUPE_CNT_TRUNCATED;
		__u32 doff = (h[12] >> 4) * 4;
		if (doff < 20 || off + doff > end)
			return LOUPE_CNT_BAD_HEADER;
		sport = ((__u16)h[0] << 8) | h[1];
		dport = ((__u16)h[2] << 8) | h[3];
		p->seq = ((__u32)h[4] << 24) | ((__u32)h[5] << 16) | ((__u32)h[6] << 8) | h[7];
		p->ack = ((__u32)h[8] << 24) | ((__u32)h[9] << 16) | ((__u32)h[10] << 8) | h[11];
		p->tcp_flags = ((__u16)(h[12] & 1) << 8) | h[13];
		p->l4_hdr_len = doff;
		p->payload_off = off + doff;
		p->payload_len = end - p->payload_off;
	} else if (proto == PROTO_UDP || proto == PROTO_SCTP) {
		__u8 h[4];
		if (load_hdr(skb, off, h, sizeof(h)) < 0)
			return LOUPE_CNT_TRUNCATED;
		sport = ((__u16)h[0] << 8) | h[1];
		dport = ((__u16)h[2] << 8) | h[3];
		/* RFC 9260 3.1: SCTP's common header is 12 bytes; its payload is chunks,
		 * never copied. */
		p->l4_hdr_len = proto == PROTO_UDP ? 8 : 12;
		if (proto == PROTO_UDP) {
			p->payload_off = off + 8;
			p->payload_len = end - p->payload_off;
		}
	} else if (icmp) {
		__u8 h[2];
		if (load_hdr(skb, off, h, sizeof(h)) < 0)
			return LOUPE_CNT_TRUNCATED;
		p->icmp_type = h[0];
		p->icmp_code = h[1];
		sport = icmp_request_type(p->key.ip_version, h[0], &reply);
		dport = h[1];
		ports_ordered = 0;
		p->l4_hdr_len = 0;   /* ICMP is never segmented */
	}
	p->dir = canonicalize(&p->key, p->src, p->dst, sport, dport, ports_ordered, reply);
	return 0;
}

/* A later fragment: the flow is whatever its first fragment left in frags. */
static __always_inline int attribute_fragment(struct loupe_pkt *p)
{
	struct loupe_frag_key fk = {};
	__builtin_memcpy(fk.src, p->src, 16);
	__builtin_memcpy(fk.dst, p->dst, 16);
	fk.id = p->frag_id;
	fk.protocol = p->key.protocol;
	fk.ip_version = p->key.ip_version;
	struct loupe_frag_value *fv = frags.lookup(&fk);
	if (!fv)
		return LOUPE_CNT_FRAG_NO_FIRST;
	__builtin_memcpy(&p->key, &fv->flow, sizeof(p->key));
	p->dir = fv->dir;
	p->l4_hdr_len = 0;
	p->is_frag = 1;
	return 0;
}

static __always_inline void remember_first_fragment(struct loupe_pkt *p)
{
	struct loupe_frag_key fk = {};
	__builtin_memcpy(fk.src, p->src, 16);
	__builtin_memcpy(fk.dst, p->dst, 16);
	fk.id = p->frag_id;
	fk.protocol = p->key.protocol;
	fk.ip_version = p->key.ip_version;
	struct loupe_frag_value fv = {};
	__builtin_memcpy(&fv.flow, &p->key, sizeof(fv.flow));
	fv.dir = p->dir;
	frags.update(&fk, &fv);
	p->is_frag = 1;
}

static __always_inline int parse_ipv4(struct __sk_buff *skb, struct loupe_pkt *p, int gso)
{
	__u8 h[20];
	__u32 off = p->l3_off;
	if (load_hdr(skb, off, h, sizeof(h)) < 0)
		return LOUPE_CNT_TRUNCATED;
	__u32 ihl = (h[0] & 0x0f) * 4;
	__u32 tot = ((__u32)h[2] << 8) | h[3];
	__u32 avail = skb->len - off;
	if ((h[0] >> 4) != 4 || ihl < 20 || ihl > avail)
		return LOUPE_CNT_BAD_HEADER;
	if (gso) {
		tot = avail;  /* a GSO buffer's own length; its header may say 0 (BIG TCP) */
	} else if (tot < ihl || tot > avail) {
		return LOUPE_CNT_BAD_HEADER;
	}
	__builtin_memcpy(p->src, &h[12], 4);
	__builtin_memcpy(p->dst, &h[16], 4);
	p->key.ip_version = 4;
	p->key.protocol = h[9];
	p->l3_hdr_len = ihl;
	p->ip_len = tot;
	__u16 frag = ((__u16)h[6] << 8) | h[7];
	p->frag_id = ((__u32)h[4] << 8) | h[5];
	if (frag & 0x1fff)
		return attribute_fragment(p);
	p->is_first_frag = (frag & 0x2000) != 0;
	int err = parse_l4(skb, p, off + ihl, off + tot);
	if (err == 0 && p->is_first_frag)
		remember_first_fragment(p);
	return err;
}

static __always_inline int parse_ipv6(struct __sk_buff *skb, struct loupe_pkt *p, int gso)
{
	__u8 h[40];
	__u32 off = p->l3_off;
	if (load_hdr(skb, off, h, sizeof(h)) < 0)
		return LOUPE_CNT_TRUNCATED;
	__u32 avail = skb->len - off;
	__u32 tot = 40 + (((__u32)h[4] << 8) | h[5]);
	if ((h[0] >> 4) != 6)
		return LOUPE_CNT_BAD_HEADER;
	if (gso)
		tot = avail;
	else if (tot > avail)
		return LOUPE_CNT_BAD_HEADER;
	__builtin_memcpy(p->src, &h[8], 16);
	__builtin_memcpy(p->dst, &h[24], 16);
	p->key.ip_version = 6;
	p->ip_len = tot;

	__u8 nh = h[6];
	__u32 l4 = off + 40;
	int frag_later = 0;
	int done = 0;
	/* Extension headers are rare; they are read with bpf_skb_load_bytes, which needs
	 * no bound on their (up to 2 KiB) lengths. */
#pragma unroll
	for (int i = 0; i < LOUPE_MAX_IPV6_EXT; i++) {
		if (!done) {
			if (nh == NH_HOPOPTS || nh == NH_ROUTING || nh == NH_DSTOPTS || nh == NH_AH) {
				__u8 e[2];
				if (l4 + 8 > off + tot || bpf_skb_load_bytes(skb, l4, e, 2) < 0)
					return LOUPE_CNT_TRUNCATED;
				/* RFC 8200 4.3: length in 8-octet units beyond the first 8;
				 * RFC 4302 2.2: AH's in 4-octet units, minus 2. */
				l4 += nh == NH_AH ? ((__u32)e[1] + 2) * 4 : ((__u32)e[1] + 1) * 8;
				nh = e[0];
			} else if (nh == NH_FRAGMENT) {
				__u8 e[8];
				if (l4 + 8 > off + tot || bpf_skb_load_bytes(skb, l4, e, 8) < 0)
					return LOUPE_CNT_TRUNCATED;
				nh = e[0];
				__u16 fo = ((__u16)e[2] << 8) | e[3];
				p->frag_id = ((__u32)e[4] << 24) | ((__u32)e[5] << 16) |
					     ((__u32)e[6] << 8) | e[7];
				l4 += 8;
				if (fo & 0xfff8)
					frag_later = 1;
				else
					p->is_first_frag = (fo & 1) != 0;
				/* a later fragment holds no further headers to walk */
				if (frag_later)
					done = 1;
			} else {
				done = 1;
			}
		}
	}
	if (!done && (nh == NH_HOPOPTS || nh == NH_ROUTING || nh == NH_DSTOPTS ||
		      nh == NH_AH || nh == NH_FRAGMENT))
		return LOUPE_CNT_IPV6_EXT_TOO_LONG;
	if (l4 > off + tot)
		return LOUPE_CNT_TRUNCATED;
	p->key.protocol = nh;
	p->l3_hdr_len = l4 - off;
	if (frag_later)
		return attribute_fragment(p);
	int err = parse_l4(skb, p, l4, off + tot);
	if (err == 0 && p->is_first_frag)
		remember_first_fragment(p);
	return err;
}

/* ---- exclusion ------------------------------------------------------------------- */

/* Branchless helpers: the verifier walks the exclusion loop once per distinct state that
 * reaches it, so its body is straight-line code (no branch to fork the walk). */
#define EQ(a, b) ((((__u64)((a) ^ (b))) - 1) >> 63)             /* 1 if a == b (< 2^63) */
#define WITHIN(x, lo, hi) ((~(((__u64)((__s64)(x) - (__s64)(lo))) | \
			    ((__u64)((__s64)(hi) - (__s64)(x))))) >> 63)  /* lo <= x <= hi */

/* 1 if the address a (16 bytes, IPv4 in the first 4) is in the instruction's prefix. */
static __always_inline __u64 addr_in(const __u8 *a, const struct loupe_filter_insn *in)
{
	const __u32 *w = (const __u32 *)a;
	const __u32 *v = (const __u32 *)in->addr;
	const __u32 *m = (const __u32 *)in->mask;
	__u64 diff = ((w[0] ^ v[0]) & m[0]) | ((w[1] ^ v[1]) & m[1]) |
		     ((w[2] ^ v[2]) & m[2]) | ((w[3] ^ v[3]) & m[3]);
	return EQ(diff, 0);
}

/* Combines the src and dst outcomes (0/1) as LOUPE_FDIR_* dir says. */
static __always_inline __u64 by_dir(__u64 src, __u64 dst, __u8 dir)
{
	return (EQ(dir, LOUPE_FDIR_SRC) & src) | (EQ(dir, LOUPE_FDIR_DST) & dst) |
	       (EQ(dir, LOUPE_FDIR_BOTH) & src & dst) | (EQ(dir, LOUPE_FDIR_EITHER) & (src | dst));
}

/* Runs selection set `set`'s exclusion program (loupe.h, "Exclusion") on a new flow's
 * first packet: 1 if the flow is excluded. Only loupe_new_flow runs it, so packets of
 * known flows never pay for it; a new flow pays one lookup and len straight-line steps
 * (an unknown op leaves the stack as it is). src/dst are the ends as the first packet
 * went. */
static __always_inline int excluded(struct loupe_pkt *p, __u32 set)
{
	struct loupe_filter *f = exclude.lookup(&set);
	if (!f || !f->len)
		return 0;
	__u32 len = f->len;
	__u64 proto = p->key.protocol;
	__u64 version = p->key.ip_version;
	__u64 ports = EQ(proto, PROTO_TCP) | EQ(proto, PROTO_UDP) | EQ(proto, PROTO_SCTP);
	__u64 lohi = EQ(p->dir, LOUPE_DIR_LO_HI);
	__u64 sport = (lohi * p->key.port_lo) | ((lohi ^ 1) * p->key.port_hi);
	__u64 dport = (lohi * p->key.port_hi) | ((lohi ^ 1) * p->key.port_lo);
	__u64 stack = 0;
#pragma clang loop unroll(disable)
	for (__u32 i = 0; i < LOUPE_FILTER_MAX_INSNS; i++) {
		if (i >= len)
			break;
		/* The index the verifier checks is the one used (no strength reduction). */
		__u32 k = i;
		barrier_var(k);
		if (k >= LOUPE_FILTER_MAX_INSNS)
			break;
		const struct loupe_filter_insn *in = &f->insn[k];
		__u64 op = in->op;
		__u64 iv = in->version, ip = in->protocol;
		__u64 any_v = EQ(iv, 0) | EQ(iv, version);
		__u64 r = (EQ(op, LOUPE_FOP_IP) & EQ(iv, version)) |
			  (EQ(op, LOUPE_FOP_PROTO) & EQ(ip, proto) & any_v) |
			  (EQ(op, LOUPE_FOP_ADDR) & EQ(iv, version) &
			   by_dir(addr_in(p->src, in), addr_in(p->dst, in), in->dir)) |
			  (EQ(op, LOUPE_FOP_PORT) & ports & (EQ(ip, 0) | EQ(ip, proto)) &
			   by_dir(WITHIN(sport, in->port_lo, in->port_hi),
				  WITHIN(dport, in->port_lo, in->port_hi), in->dir));
		__u64 leaf = EQ(op, LOUPE_FOP_IP) | EQ(op, LOUPE_FOP_PROTO) |
			     EQ(op, LOUPE_FOP_ADDR) | EQ(op, LOUPE_FOP_PORT);
		/* A mask of all ones for the op that applies, zeros for the others. */
		__u64 m_leaf = -leaf, m_and = -EQ(op, LOUPE_FOP_AND);
		__u64 m_or = -EQ(op, LOUPE_FOP_OR), m_not = -EQ(op, LOUPE_FOP_NOT);
		__u64 m_keep = ~(m_leaf | m_and | m_or | m_not);
		stack = (m_leaf & ((stack << 1) | r)) |
			(m_and & ((stack >> 1) & (~1ULL | (stack & 1)))) |
			(m_or & ((stack >> 1) | (stack & 1))) |
			(m_not & (stack ^ 1)) | (m_keep & stack);
	}
	return stack & 1;
}

/* ---- selection ------------------------------------------------------------------- */

/* Decides a new flow's selection from the active set; fills the flow's budgets and
 * whether the content sniffer gets a look at it. */
static __always_inline __u8 select_new_flow(struct loupe_pkt *p, struct loupe_flow_value *v,
					    int with_exclusion)
{
	__u32 zero = 0;
	struct loupe_config *cfg = config.lookup(&zero);
	if (!cfg)
		return 0;
	__u32 set = cfg->active_set & 1;
	struct loupe_set_config *sc = &cfg->set[set];
	__u8 proto = p->key.protocol;
	__u8 sel = 0;

	if (with_exclusion && excluded(p, set)) {
		/* Before every other way in: no rule, key, sample or sniff selects it. */
		v->flags |= LOUPE_FLOW_EXCLUDED;
		return 0;
	}
	__u32 pi = set * 256 + proto;
	__u8 *on = sel_protos.lookup(&pi);
	if (on && *on)
		sel |= LOUPE_SEL_PROTO;
	if (proto == PROTO_TCP || proto == PROTO_UDP) {
		struct loupe_port_key pk = { .set = set, .port = p->key.port_lo };
		if (sel_ports.lookup(&pk)) {
			sel |= LOUPE_SEL_PORT;
		} else {
			pk.port = p->key.port_hi;
			if (sel_ports.lookup(&pk))
				sel |= LOUPE_SEL_PORT;
		}
	}
	if (p->key.ip_version == 4) {
		struct loupe_cidr4_key k4 = { .prefixlen = 8 + 32, .set = set };
		__builtin_memcpy(k4.addr, p->key.addr_lo, 4);
		if (sel_cidr4.lookup(&k4)) {
			sel |= LOUPE_SEL_CIDR;
		} else {
			__builtin_memcpy(k4.addr, p->key.addr_hi, 4);
			if (sel_cidr4.lookup(&k4))
				sel |= LOUPE_SEL_CIDR;
		}
	} else {
		struct loupe_cidr6_key k6 = { .prefixlen = 8 + 128, .set = set };
		__builtin_memcpy(k6.addr, p->key.addr_lo, 16);
		if (sel_cidr6.lookup(&k6)) {
			sel |= LOUPE_SEL_CIDR;
		} else {
			__builtin_memcpy(k6.addr, p->key.addr_hi, 16);
			if (sel_cidr6.lookup(&k6))
				sel |= LOUPE_SEL_CIDR;
		}
	}
	/* Explicit keys and sampling ignore the interface: the same flow seen on two
	 * interfaces (or by two sensors) is selected on both. */
	__u32 ifindex = p->key.ifindex;
	p->key.ifindex = 0;   /* restored below; saves a 48-byte copy on the stack */
	if (sel_keys.lookup(&p->key))
		sel |= LOUPE_SEL_EXPLICIT;
	__u32 n = sc->sample_n;
	if (!sel && n) {
		__u32 h = key_hash(&p->key) >> 32;
		if (h % n == 0)
			sel |= LOUPE_SEL_SAMPLED;
	}
	p->key.ifindex = ifindex;
	v->l7_budget[0] = sc->budget[0];
	v->l7_budget[1] = sc->budget[1];
	if (!sel && (sc->flags & LOUPE_CFG_SNIFF) && !p->is_frag &&
	    (proto == PROTO_TCP || proto == PROTO_UDP))
		v->flags |= LOUPE_FLOW_SNIFF_PENDING;
	return sel;
}

/* The content sniffer: does this first payload (len bytes, b its first SNIFF_LEN) look
 * like a protocol we parse? */
static __always_inline int sniff(const __u8 *b, __u8 proto, __u32 len)
{
	if (proto == PROTO_TCP) {
		/* TLS record header of a handshake (22), version 3.x, then a ClientHello
		 * (handshake type 1) at byte 5 (RFC 8446 5.1, 4). */
		if (b[0] == 0x16 && b[1] == 0x03 && b[2] <= 0x04 && b[5] == 0x01)
			return 1;
		/* The first four bytes of a client's payload that the registered protocols
		 * declare (sensor/l7/registry.py, Protocol.kernel_prefixes: HTTP/1 request
		 * methods, RFC 9110 9.3), compiled in by the loader as
		 * LOUPE_SNIFF_PREFIX(word), a chain of compares. */
		__u32 m = ((__u32)b[0] << 24) | ((__u32)b[1] << 16) | ((__u32)b[2] << 8) | b[3];
		return LOUPE_SNIFF_PREFIX(m);
	}
	/* The first eight bytes of a client's first datagram that the registered protocols
	 * declare (Protocol.kernel_datagram_words: QUIC Initials of the versions
	 * sensor/l7/quic.py opens, in datagrams of at least 1200 bytes, RFC 9000 14.1),
	 * compiled in by the loader as LOUPE_SNIFF_DATAGRAM(w, len), masked compares. */
	__u64 w = ((__u64)b[0] << 56) | ((__u64)b[1] << 48) | ((__u64)b[2] << 40) |
		  ((__u64)b[3] << 32) | ((__u64)b[4] << 24) | ((__u64)b[5] << 16) |
		  ((__u64)b[6] << 8) | b[7];
	if (LOUPE_SNIFF_DATAGRAM(w, len))
		return 1;
	/* A DNS message (RFC 1035 4.1.1): opcode QUERY (0), Z zero, one question, few
	 * records, and a first label of 1..63 bytes or the root. */
	__u16 flags = ((__u16)b[2] << 8) | b[3];
	__u16 qd = ((__u16)b[4] << 8) | b[5];
	__u16 an = ((__u16)b[6] << 8) | b[7];
	__u16 ns = ((__u16)b[8] << 8) | b[9];
	__u16 ar = ((__u16)b[10] << 8) | b[11];
	return ((flags >> 11) & 0xf) == 0 && !(flags & 0x0040) && qd == 1 &&
	       an <= 256 && ns <= 256 && ar <= 256 && b[12] <= 63;
}

/* ---- events ---------------------------------------------------------------------- */

static __always_inline void send_late(struct loupe_pkt *p, __u64 inc, __u32 ordinal, __u64 now)
{
	struct loupe_late_update_event *ev = events.ringbuf_reserve(sizeof(*ev));
	if (!ev) {
		count(LOUPE_CNT_RINGBUF_FULL);
		return;
	}
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->hdr.type = LOUPE_EV_LATE_UPDATE;
	ev->hdr.size = sizeof(*ev);
	ev->hdr.cpu = bpf_get_smp_processor_id();
	ev->hdr.ts_ns = now;
	__builtin_memcpy(&ev->key, &p->key, sizeof(ev->key));
	ev->incarnation = inc;
	ev->ordinal = ordinal;
	ev->dir = p->dir;
	ev->tcp_flags = p->tcp_flags;
	ev->packets = p->packets;
	ev->ip_bytes = p->ip_bytes;
	ev->l2_bytes = p->l2_bytes;
	events.ringbuf_submit(ev, 0);
	count(LOUPE_CNT_LATE_UPDATE);
}

static __always_inline void send_end(struct loupe_pkt *p, __u64 inc, __u8 reason, __u64 now)
{
	struct loupe_flow_end_event *ev = events.ringbuf_reserve(sizeof(*ev));
	if (!ev) {
		count(LOUPE_CNT_RINGBUF_FULL);
		return;
	}
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->hdr.type = LOUPE_EV_FLOW_END;
	ev->hdr.size = sizeof(*ev);
	ev->hdr.cpu = bpf_get_smp_processor_id();
	ev->hdr.ts_ns = now;
	__builtin_memcpy(&ev->key, &p->key, sizeof(ev->key));
	ev->incarnation = inc;
	ev->end_reason = reason;
	events.ringbuf_submit(ev, 0);
	count(LOUPE_CNT_FLOW_END_EVENTS);
}

/* What the locked update decided to copy of this packet's payload. */
struct copy_plan {
	__u32 start;      /* first payload octet to copy (after a skip) */
	__u32 len;        /* octets to copy */
	__u8  to;         /* LOUPE_PL_TO_* */
	__u8  sel;        /* the flow's l7_select */
	__u8  control;    /* send a zero-length event for SYN/FIN/RST */
	__u8  pad;
};

/* LOUPE_PLF_PEER_WALKED when this packet's other direction is walked (frames.h; set by
 * walk_prepare for this very packet). */
static __always_inline __u16 walk_peer_flags(void)
{
	__u32 zero = 0;
	struct loupe_walk *w = walk_scratch.lookup(&zero);
	return w ? w->peer_flags : 0;
}

/* Sends payload[at, at + n) of the packet at payload_off as one event: s->ev's other
 * fields are the caller's. Returns 0 when sent, 1 for an n outside 1..CHUNK (the
 * caller stops), -1 when the ring buffer refused it (or the copy failed): then its n
 * octets move from the flow's captured to its gap octets. Shared by send_payload and
 * the frame walk's walk_send. */
static __always_inline int send_chunk(struct __sk_buff *skb, struct loupe_payload_scratch *s,
				      struct loupe_flow_value *v, __u8 d, __u32 payload_off,
				      __u32 at, __u32 seq, __u64 n)
{
	s->ev.offset = at;
	s->ev.seq = seq;
	s->ev.cap_len = n;
	s->ev.hdr.size = LOUPE_PAYLOAD_EVENT_SIZE + n;
	/* The verifier needs n in 1..CHUNK on the register the helpers get: the barrier
	 * makes the compiler check that register, not an older copy. */
	barrier_var(n);
	if (n < 1 || n > LOUPE_PAYLOAD_CHUNK)
		return 1;
	if (bpf_skb_load_bytes(skb, payload_off + at, s->data, n) == 0 &&
	    events.ringbuf_output(s, LOUPE_PAYLOAD_EVENT_SIZE + n, 0) == 0) {
		count(LOUPE_CNT_PAYLOAD_EVENTS);
		count_n(LOUPE_CNT_PAYLOAD_OCTETS, n);
		return 0;
	}
	__sync_fetch_and_add(&v->l7[d & 1].captured, -(__u64)n);
	__sync_fetch_and_add(&v->l7[d & 1].gap, (__u64)n);
	count(LOUPE_CNT_RINGBUF_FULL);
	count_n(LOUPE_CNT_PAYLOAD_GAP_OCTETS, n);
	return -1;
}

/* Sends the planned payload in chunks of at most LOUPE_PAYLOAD_CHUNK. A chunk the ring
 * buffer refuses moves from the flow's captured to its gap octets (send_chunk). */
static __always_inline void send_payload(struct __sk_buff *skb, struct loupe_pkt *p,
					 struct loupe_flow_value *v, __u64 inc,
					 struct copy_plan *plan, __u64 now)
{
	__u32 zero = 0;
	struct loupe_payload_scratch *s = payload_scratch.lookup(&zero);
	if (!s)
		return;
	struct loupe_payload_event *ev = &s->ev;
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->hdr.type = LOUPE_EV_PAYLOAD;
	ev->hdr.cpu = bpf_get_smp_processor_id();
	ev->hdr.ts_ns = now;
	__builtin_memcpy(&ev->key, &p->key, sizeof(ev->key));
	ev->incarnation = inc;
	ev->ack = p->ack;
	ev->payload_len = p->payload_len;
	ev->tcp_flags = p->tcp_flags;
	ev->dir = plan->to;
	ev->l7_select = plan->sel;
	ev->flags = walk_peer_flags();   /* frames.h: the other side's walk */
	int tcp = p->key.protocol == PROTO_TCP;
	__u8 d = p->dir & 1;

	if (plan->len == 0) {
		if (!plan->control)
			return;
		ev->hdr.size = LOUPE_PAYLOAD_EVENT_SIZE;
		ev->seq = p->seq;
		if (events.ringbuf_output(ev, LOUPE_PAYLOAD_EVENT_SIZE, 0) < 0)
			count(LOUPE_CNT_RINGBUF_FULL);
		else
			count(LOUPE_CNT_PAYLOAD_EVENTS);
		return;
	}
	for (int i = 0; i < LOUPE_MAX_CHUNKS; i++) {
		__u32 done = (__u32)i * LOUPE_PAYLOAD_CHUNK;
		if (done >= plan->len)
			break;
		__u64 n = plan->len - done;
		if (n > LOUPE_PAYLOAD_CHUNK)
			n = LOUPE_PAYLOAD_CHUNK;
		__u32 at = plan->start + done;
		if (send_chunk(skb, s, v, d, p->payload_off, at, tcp ? p->seq + at : 0, n) > 0)
			break;
	}
}

/* ---- frame walk (bpf/frames.h: the strategy, ABI and maps) -------------------------- */

/* Adds payload[off, off + n) to the copied ranges, joined to the last when adjacent;
 * past WALK_RANGES the last range grows to cover it. */
static __always_inline void walk_range(struct loupe_walk *w, __u32 off, __u32 n)
{
	__u32 k = w->ranges;
	if (k > WALK_RANGES)
		return;
	if (k > 0) {
		__u32 j = (k - 1) & (WALK_RANGES - 1);
		if (w->off[j] + w->len[j] == off || k == WALK_RANGES) {
			w->len[j] = off + n - w->off[j];
			return;
		}
	}
	w->off[k & (WALK_RANGES - 1)] = off;
	w->len[k & (WALK_RANGES - 1)] = n;
	w->ranges = k + 1;
}

static __always_inline void walk_bad(struct loupe_walk *w, __u32 at)
{
	w->bad = 1;
	w->bad_at = at;
}

/* One step: the rest of the current frame's payload in this packet, or (part of) the
 * next header and, for a frame elided whole, its payload in this packet. Returns 1 when
 * the packet is done. */
static __always_inline int walk_step(struct __sk_buff *skb, struct loupe_walk *w)
{
	__u32 pos = w->pos, pl = w->pl;
	if (pos >= pl || w->bad)
		return 1;
	__s32 body = (__s32)(w->frame_end - (w->seq + pos));
	if (body > 0) {
		__u32 n = pl - pos;
		if (n > (__u32)body)
			n = body;
		__s32 kept = (__s32)(w->keep_end - (w->seq + pos));
		if (!w->elide_cur)
			walk_range(w, pos, n);
		else if (kept > 0)
			walk_range(w, pos, (__u32)kept < n ? (__u32)kept : n);
		w->pos = pos + n;
		return 0;
	}
	__u32 have = w->have, hl = w->hdr_len;
	if (body != -(__s32)have || have >= hl) {
		walk_bad(w, pos);
		return 1;
	}
	__u32 n = hl - have;
	if (n > pl - pos)
		n = pl - pos;
	if (n < 1 || n > LOUPE_FRAME_HDR_MAX || have >= LOUPE_FRAME_HDR_MAX) {
		walk_bad(w, pos);
		return 1;
	}
	/* n is 1..16 here; the mask and +1 show the verifier so on the very register the
	 * helper gets (the compiler's copy of the checks may be another). */
	__u64 m = n - 1;
	barrier_var(m);
	m &= LOUPE_FRAME_HDR_MAX - 1;
	__u64 h = have & (LOUPE_FRAME_HDR_MAX - 1);
	if (bpf_skb_load_bytes(skb, w->payload_off + pos, &w->hb[h], m + 1) < 0) {
		walk_bad(w, pos);
		return 1;
	}
	if (have + n < hl) {
		walk_range(w, pos, n);
		w->have = have + n;   /* the header goes on in the next packet */
		w->pos = pos + n;
		return 1;
	}
	__u32 lo = w->len_off & (LOUPE_FRAME_HDR_MAX - 1);
	__u32 len = ((__u32)w->hb[lo] << 24) | ((__u32)w->hb[lo + 1] << 16) |
		    ((__u32)w->hb[lo + 2] << 8) | w->hb[lo + 3];
	len >>= (8 * (4 - w->len_size)) & 31;
	__u8 type = w->hb[w->type_off & (LOUPE_FRAME_HDR_MAX - 1)];
	__u8 fl = w->hb[w->flags_off & (LOUPE_FRAME_HDR_MAX - 1)];
	__s64 total = (__s64)hl + len + w->len_adj;
	if (total < hl || total > 0x7fffffff) {
		walk_bad(w, pos);
		return 1;
	}
	__u8 elide = (w->elide[(type >> 6) & 3] >> (type & 63)) & 1;
	if (fl & w->keep_flags)
		elide = 0;
	__u32 start = w->seq + pos - have;
	w->frame_end = start + (__u32)total;
	w->elide_cur = elide;
	w->have = 0;
	w->keep_end = start + hl;
	if (elide && type == w->keep_type && w->keep_octets)
		w->keep_end = start + hl + (len < w->keep_octets ? len : w->keep_octets);
	else if (elide && !(fl & w->body_flags) && have == 0) {
		/* Whole: header and the payload in this packet, in this step. */
		__u32 rest = pl - pos;
		if (rest > (__u32)total)
			rest = total;
		w->pos = pos + rest;
		return 0;
	}
	walk_range(w, pos, n);
	w->pos = pos + n;
	return 0;
}

static __always_inline int walk_quiet(const struct loupe_l7_dir *l)
{
	return !(l->captured | l->truncated | l->skipped | l->gap);
}

/* The first eight payload octets, big-endian, in *out; -1 when the packet has fewer. */
static __always_inline int walk_first8(struct __sk_buff *skb, struct loupe_pkt *p,
				       struct loupe_walk *w, __u64 *out)
{
	if (p->payload_len < 8 || bpf_skb_load_bytes(skb, p->payload_off, w->hb, 8) < 0)
		return -1;
	__u64 first = 0;
#pragma unroll
	for (int i = 0; i < 8; i++)
		first = (first << 8) | w->hb[i];
	*out = first;
	return 0;
}

/* Arms a flow's walk at its first payload (see the strategy): the client's, or the
 * server's when it speaks first. Returns the new state, or NULL. */
static __always_inline struct loupe_walk_state *
walk_arm(struct __sk_buff *skb, struct loupe_pkt *p, struct loupe_flow_value *v, __u8 d,
	 struct loupe_walk *w)
{
	__u64 first;
	if (!(v->flags & LOUPE_FLOW_INITIATOR_BY_SYN) || !walk_quiet(&v->l7[d]) ||
	    walk_first8(skb, p, w, &first) < 0)
		return 0;
	__u8 s = (d ^ 1) & 1;
	int client = d == v->initiator;
	/* A server speaking first is armed only when its every octet was counted (the flow
	 * was selected at its SYN). The other side has sent no payload: counted for a
	 * selected flow; for one still being sniffed, nothing but its SYN-ACK. */
	if (!client && !v->l7_select)
		return 0;
	int quiet = v->l7_select ? walk_quiet(&v->l7[s]) : v->dir[s].packets <= 1;
#pragma unroll
	for (__u32 i = 0; i < LOUPE_FRAME_PROTOS; i++) {
		__u32 idx = i;
		struct loupe_frame_cfg *cfg = frame_cfg.lookup(&idx);
		if (!cfg)
			continue;
		__u64 mask = client ? cfg->mask : cfg->server_mask;
		__u64 match = client ? cfg->match : cfg->server_match;
		if (!mask || (first & mask) != match)
			continue;
		struct loupe_walk_state *st = &w->arm;
		__builtin_memset(st, 0, sizeof(*st));
		st->proto = i;
		__u8 me = client ? LOUPE_PL_TO_RESPONDER : LOUPE_PL_TO_INITIATOR;
		__u8 peer = me ^ 1;
		if (cfg->start[me] != LOUPE_FRAME_NOT_WALKED) {
			st->dir[me].state = LOUPE_WALK_ON;
			st->dir[me].next = p->seq;
			st->dir[me].frame_end = p->seq + cfg->start[me];
		}
		if (cfg->start[peer] != LOUPE_FRAME_NOT_WALKED && quiet)
			st->dir[peer].state = client ? LOUPE_WALK_FIRST : LOUPE_WALK_CLIENT;
		/* Both sides' first payloads may race on two CPUs: the first entry stays, and
		 * the other side's packet goes on with it (walk_prepare). */
		frame_walk.insert(&p->key, st);
		return frame_walk.lookup(&p->key);
	}
	return 0;
}

/* In loupe_tc, before account(): arms the walk, checks the packet's place in its
 * direction and sets walk_scratch up for loupe_walk. Leaves w->planned 0 when the
 * direction is not walked (the packet is then copied as without a walk). */
static __always_inline void walk_prepare(struct __sk_buff *skb, struct loupe_pkt *p,
					 struct loupe_flow_value *v)
{
	__u32 zero = 0;
	struct loupe_walk *w = walk_scratch.lookup(&zero);
	if (!w)
		return;
	w->planned = 0;
	w->send = 0;
	w->peer_flags = 0;
	if (p->key.protocol != PROTO_TCP || p->is_frag)
		return;
	if (!v)
		v = flows.lookup(&p->key);
	if (!v || !(v->l7_select || (v->flags & LOUPE_FLOW_SNIFF_PENDING)))
		return;
	__u8 d = p->dir & 1;
	__u8 to = (d ^ v->initiator) & 1;
	struct loupe_walk_state *st = frame_walk.lookup(&p->key);
	if (!st && p->payload_len)
		st = walk_arm(skb, p, v, d, w);
	if (!st)
		return;
	struct loupe_walk_dir *wd = &st->dir[to];
	__u32 seq = p->seq, pl = p->payload_len;
	/* For this packet's events however it is copied (send_payload too): the other
	 * direction's octets below its ack that userspace lacks were elided. */
	w->peer_flags = st->dir[(to ^ 1) & 1].state == LOUPE_WALK_ON &&
			!st->dir[(to ^ 1) & 1].lost ? LOUPE_PLF_PEER_WALKED : 0;
	__u32 idx = st->proto;
	struct loupe_frame_cfg *cfg = frame_cfg.lookup(&idx);
	if (!cfg || cfg->hdr_len < 1 || cfg->hdr_len > LOUPE_FRAME_HDR_MAX ||
	    cfg->len_size < 1 || cfg->len_size > 4 || cfg->len_off + cfg->len_size > cfg->hdr_len) {
		wd->state = LOUPE_WALK_OFF;
		wd->state = LOUPE_WALK_OFF;
		wd->stopped = LOUPE_WALK_STOP_CFG;
		return;
	}
	if (wd->state == LOUPE_WALK_CLIENT && pl) {
		/* The server spoke first: its walk stands only if the client opens as the
		 * protocol does, else neither side is walked. */
		__u64 first;
		if (!walk_quiet(&v->l7[d]) || walk_first8(skb, p, w, &first) < 0 ||
		    !cfg->mask || (first & cfg->mask) != cfg->match) {
			st->dir[0].state = LOUPE_WALK_OFF;
			st->dir[0].stopped = LOUPE_WALK_STOP_OPENING;
			st->dir[1].state = LOUPE_WALK_OFF;
			st->dir[1].stopped = LOUPE_WALK_STOP_OPENING;
			w->peer_flags = 0;
			return;
		}
		wd->state = LOUPE_WALK_FIRST;
	}
	if (wd->state == LOUPE_WALK_FIRST && pl) {
		if (!walk_quiet(&v->l7[d])) {
			wd->state = LOUPE_WALK_OFF;
			wd->state = LOUPE_WALK_OFF;
			wd->stopped = LOUPE_WALK_STOP_LATE;
			return;
		}
		wd->state = LOUPE_WALK_ON;
		wd->next = seq;
		wd->frame_end = seq + cfg->start[to & 1];
		wd->have = 0;
		wd->elide_cur = 0;
	}
	if (wd->state != LOUPE_WALK_ON)
		return;
	__s32 rel = (__s32)(seq - wd->next);
	if (rel > 0 && !pl)
		return;   /* no payload: sent as without a walk, the place kept (frames.h) */
	if (rel > 0) {
		/* A hole: the packets before this one come later (reordered: lo's ingress
		 * takes each CPU's backlog in turn) or never. When all of it lies in the
		 * payload of an elided frame (past what it keeps), it is elided whatever it
		 * holds, and the walk
		 * goes on from here (the late packets are then wholly before its place:
		 * skipped). Else the frames in it are unknown: the walk stops. */
		if (!wd->elide_cur || wd->have || (__s32)(wd->frame_end - seq) < 0 ||
		    (__s32)(wd->keep_end - wd->next) > 0) {
			wd->state = LOUPE_WALK_OFF;
			wd->stopped = LOUPE_WALK_STOP_HOLE;
			return;
		}
		rel = 0;
	}
	w->evflags = LOUPE_PLF_SKIPPED_BEFORE | w->peer_flags;
	w->fp = v->key_fp;
	w->to = to;
	w->seq = seq;
	w->pl = pl;
	w->ranges = 0;
	w->cut = 0;
	w->bad = 0;
	w->hops = 0;
	w->copied = w->truncated = 0;
	w->skipped = pl;
	/* A packet wholly before the direction's place was walked already: skipped. */
	w->pos = (__u32)(-rel) < pl ? (__u32)(-rel) : pl;
	__builtin_memcpy(w->elide, cfg->elide, sizeof(w->elide));
	w->len_adj = cfg->len_adj;
	w->hdr_len = cfg->hdr_len;
	w->len_off = cfg->len_off;
	w->len_size = cfg->len_size;
	w->type_off = cfg->type_off;
	w->flags_off = cfg->flags_off;
	w->keep_flags = cfg->keep_flags;
	w->body_flags = cfg->body_flags;
	w->keep_type = cfg->keep_type;
	w->keep_octets = cfg->keep_octets;
	w->keep_end = wd->keep_end;
	w->payload_off = p->payload_off;
	w->frame_end = wd->frame_end;
	w->have = wd->have;
	w->elide_cur = wd->elide_cur;
	__builtin_memcpy(w->hb, wd->hdr, LOUPE_FRAME_HDR_MAX);
	w->planned = 1;
}

/* The plan of this packet, looked up before account() takes the lock; NULL when there
 * is none for this flow entry (fp). */
static __always_inline struct loupe_walk *walk_plan(__u64 fp)
{
	__u32 zero = 0;
	struct loupe_walk *w = walk_scratch.lookup(&zero);
	if (!w || !w->planned || w->fp != fp)
		return 0;
	return w;
}

/* account(), under the lock: the packet goes to loupe_walk, which counts its octets. */
static __always_inline void walk_take(struct loupe_walk *w, struct loupe_l7_dir *l,
				      struct loupe_l7_dir *peer, __u64 inc, __u8 sel, __u16 tf)
{
	if (w->pl) {
		peer->spoke_last = 0;
		l->spoke_last = 1;
	}
	w->inc = inc;
	w->sel = sel;
	w->control = (tf & (TCPF_SYN | TCPF_FIN | TCPF_RST)) != 0;
	w->send = 1;
}

/* In loupe_tc, last: a packet account() gave to the walk goes to loupe_walk. The call
 * returns only when it failed (no program in the slot, or the kernel's tail-call limit):
 * the payload is then counted as truncated and the walk stops. */
static __always_inline void walk_run(struct __sk_buff *skb, struct loupe_pkt *p)
{
	__u32 zero = 0;
	struct loupe_walk *w = walk_scratch.lookup(&zero);
	if (!w)
		return;
	if (!w->send) {
		/* Planned with payload, not taken because userspace stopped the flow: the
		 * walk's place no longer follows its side, so the walk goes off now, for that
		 * reason, not as a "hole" at the side's next packet. (A hold that skips packets
		 * inside an elided payload may let the walk go on: that stays a hole check.) */
		struct loupe_l7_ctl *ctl = w->planned && w->pl ? l7_ctl.lookup(&p->key) : 0;
		struct loupe_walk_state *st = ctl && (ctl->flags & LOUPE_CTL_DONE) ?
					      frame_walk.lookup(&p->key) : 0;
		if (st) {
			st->dir[w->to & 1].state = LOUPE_WALK_OFF;
			st->dir[w->to & 1].stopped = LOUPE_WALK_STOP_UNTAKEN;
		}
		return;
	}
	walk_tails.call(skb, LOUPE_TAIL_WALK);
	w->send = 0;
	count(LOUPE_CNT_TAIL_CALL_FAILED);
	struct loupe_walk_state *st = frame_walk.lookup(&p->key);
	if (st) {
		st->dir[w->to & 1].state = LOUPE_WALK_OFF;
		st->dir[w->to & 1].stopped = LOUPE_WALK_STOP_TAIL;
	}
	struct loupe_flow_value *v = flows.lookup(&p->key);
	if (v)
		__sync_fetch_and_add(&v->l7[p->dir & 1].truncated, (__u64)w->pl);
}

/* loupe_walk's end: bounds the plan (WALK_EVENTS), stores the direction's place. */
static __always_inline void walk_finish(struct loupe_pkt *p, struct loupe_walk *w)
{
	__u32 pl = w->pl;
	if (!w->bad && w->pos < pl)
		walk_bad(w, w->pos);   /* more frames than WALK_STEPS * (WALK_HOPS + 1) */
	if (w->bad) {
		/* The rest is copied as it is: the parser sees what the walk could not. */
		__u32 at = w->bad_at < pl ? w->bad_at : pl;
		if (at < pl)
			walk_range(w, at, pl - at);
	}
	/* The running sums live in w, not in registers, so the loop's states converge. */
	w->events = 0;
	w->end = pl;
	w->copied = 0;
#pragma clang loop unroll(disable)
	for (int k = 0; k < WALK_RANGES; k++) {
		if (k >= w->ranges || w->cut)
			break;
		__u32 len = w->len[k & (WALK_RANGES - 1)];
		__u32 ev = (len + LOUPE_PAYLOAD_CHUNK - 1) / LOUPE_PAYLOAD_CHUNK;
		__u32 used = w->events;
		if (used + ev > WALK_EVENTS) {
			__u32 room = used < WALK_EVENTS ? (WALK_EVENTS - used) * LOUPE_PAYLOAD_CHUNK : 0;
			w->len[k & (WALK_RANGES - 1)] = room;
			w->ranges = room ? k + 1 : k;
			w->end = w->off[k & (WALK_RANGES - 1)] + room;
			w->copied += room;
			w->cut = 1;
		} else {
			w->events = used + ev;
			w->copied += len;
		}
	}
	w->truncated = pl - w->end;
	w->skipped = w->end - w->copied;
	struct loupe_walk_state *st = frame_walk.lookup(&p->key);
	if (!st)
		return;
	struct loupe_walk_dir *wd = &st->dir[w->to & 1];
	if (w->bad || w->cut) {
		wd->state = LOUPE_WALK_OFF;
		wd->stopped = w->cut ? LOUPE_WALK_STOP_CUT : LOUPE_WALK_STOP_FRAME;
	} else if (wd->state == LOUPE_WALK_ON && (__s32)(w->seq + pl - wd->next) > 0) {
		wd->next = w->seq + pl;
		wd->frame_end = w->frame_end;
		wd->have = w->have;
		wd->elide_cur = w->elide_cur;
		wd->keep_end = w->keep_end;
		__builtin_memcpy(wd->hdr, w->hb, LOUPE_FRAME_HDR_MAX);
	}
}

/* loupe_walk's accounting, under the flow's lock. */
static __always_inline void walk_count(struct loupe_pkt *p, struct loupe_walk *w)
{
	struct loupe_flow_value *v = flows.lookup(&p->key);
	if (!v)
		return;
	struct loupe_l7_dir *l = &v->l7[p->dir & 1];
	bpf_spin_lock(&v->lock);
	if (v->key_fp == w->fp) {
		l->captured += w->copied;
		l->skipped += w->skipped;
		l->truncated += w->truncated;
	}
	bpf_spin_unlock(&v->lock);
}

/* Sends the plan's ranges. A chunk the ring buffer refuses moves from captured to gap
 * (send_chunk) and marks the direction lost; the walk goes on, and the next event the
 * ring takes tells userspace (LOUPE_PLF_LOST_BEFORE; frames.h). */
static __always_inline void walk_send(struct __sk_buff *skb, struct loupe_pkt *p,
				      struct loupe_walk *w)
{
	__u32 zero = 0;
	struct loupe_payload_scratch *s = payload_scratch.lookup(&zero);
	if (!s)
		return;
	struct loupe_payload_event *ev = &s->ev;
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->hdr.type = LOUPE_EV_PAYLOAD;
	ev->hdr.cpu = bpf_get_smp_processor_id();
	ev->hdr.ts_ns = bpf_ktime_get_ns();
	__builtin_memcpy(&ev->key, &p->key, sizeof(ev->key));
	ev->incarnation = w->inc;
	ev->ack = p->ack;
	ev->payload_len = w->pl;
	ev->tcp_flags = p->tcp_flags;
	ev->dir = w->to;
	ev->l7_select = w->sel;
	struct loupe_walk_state *st = frame_walk.lookup(&p->key);
	__u8 lost = st ? st->dir[w->to & 1].lost : 0;
	__u16 evflags = w->evflags;
	if (!w->ranges) {
		if (!w->control)
			return;
		/* At the end of the payload: everything before it was elided. */
		ev->hdr.size = LOUPE_PAYLOAD_EVENT_SIZE;
		ev->seq = w->seq + w->pl;
		ev->offset = w->pl;
		ev->flags = evflags | (lost ? LOUPE_PLF_LOST_BEFORE : 0);
		if (events.ringbuf_output(ev, LOUPE_PAYLOAD_EVENT_SIZE, 0) < 0) {
			count(LOUPE_CNT_RINGBUF_FULL);
		} else {
			count(LOUPE_CNT_PAYLOAD_EVENTS);
			if (lost && st)
				st->dir[w->to & 1].lost = 0;
		}
		return;
	}
	struct loupe_flow_value *v = flows.lookup(&p->key);
	if (!v)
		return;   /* retired meanwhile: its events would name no flow */
	__u8 d = p->dir & 1;
	/* The place (range, octets of it sent) lives in w, so the loop's states converge. */
	w->at_r = 0;
	w->at_done = 0;
	w->lost = lost;
#pragma clang loop unroll(disable)
	for (int i = 0; i < WALK_EVENTS; i++) {
		__u32 r = w->at_r;
		if (r >= w->ranges || r >= WALK_RANGES)
			break;
		__u32 len = w->len[r & (WALK_RANGES - 1)];
		__u32 done = w->at_done;
		__u32 at = w->off[r & (WALK_RANGES - 1)] + done;
		__u64 n = len > done ? len - done : 0;
		if (n > LOUPE_PAYLOAD_CHUNK)
			n = LOUPE_PAYLOAD_CHUNK;
		if (done + n >= len) {
			w->at_r = r + 1;
			w->at_done = 0;
		} else {
			w->at_done = done + n;
		}
		ev->flags = evflags | (w->lost ? LOUPE_PLF_LOST_BEFORE : 0) |
			    (w->cut && w->at_r >= w->ranges ? LOUPE_PLF_CUT : 0);
		int rc = send_chunk(skb, s, v, d, w->payload_off, at, w->seq + at, n);
		if (rc > 0)
			break;
		w->lost = rc < 0;   /* told by this one, or one more to tell */
	}
	if (st && st->dir[w->to & 1].lost != w->lost)
		st->dir[w->to & 1].lost = w->lost;
}

/* The walk of one packet that account() gave it (see the strategy); tail-called by
 * loupe_tc, and by itself for the next WALK_STEPS headers. The parse result is still in
 * pkt_scratch (same CPU, same packet). */
int loupe_walk(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct loupe_walk *w = walk_scratch.lookup(&zero);
	struct loupe_pkt *p = pkt_scratch.lookup(&zero);
	if (!w || !p || !w->send)
		return TC_ACT_UNSPEC;
	/* Every step starts from memory alone (w looked up again, nothing kept in
	 * registers), so the verifier's states at the loop's head are all alike whatever
	 * path the step took, and it checks the body about once per step, not once per path
	 * through all the steps before. */
#pragma clang loop unroll(disable)
	for (int i = 0; i < WALK_STEPS; i++) {
		struct loupe_walk *ws = walk_scratch.lookup(&zero);
		if (!ws || walk_step(skb, ws))
			break;
	}
	if (!w->bad && w->pos < w->pl && w->hops < WALK_HOPS) {
		w->hops += 1;
		walk_tails.call(skb, LOUPE_TAIL_WALK);
	}
	w->send = 0;
	walk_finish(p, w);
	walk_count(p, w);
	walk_send(skb, p, w);
	return TC_ACT_UNSPEC;
}

/* ---- end of frame walk ---------------------------------------------------------------- */

/* ---- accounting ------------------------------------------------------------------ */

/* What a buffer of segs wire packets adds, given one copy of the headers: ip_len is
 * the buffer's IP length, seg_hdr the L3+L4 header length and l2_hdr the frame's own
 * header (Ethernet and in-frame tags) that every further segment carried again;
 * vlan_extra is a tag held beside the frame (skb->vlan_present), on every segment. */
static __always_inline void wire_bytes(struct __sk_buff *skb, __u32 segs, __u32 ip_len,
				       __u32 seg_hdr, __u32 l2_hdr, __u32 vlan_extra,
				       __u64 *ip_bytes, __u64 *l2_bytes)
{
	*ip_bytes = ip_len + (__u64)(segs - 1) * seg_hdr;
	*l2_bytes = skb->len + (__u64)vlan_extra * segs + (__u64)(segs - 1) * (l2_hdr + seg_hdr);
}

/* The lock-free add: a packet that changes nothing but a steady flow's counters (no
 * SYN/FIN/RST, no new flag bit, no payload to account for a selected flow) is added
 * with atomic adds, without the lock, while the flow's fast_until (set by its last
 * locked update) has not passed. Returns 1 when done, 0 when the packet needs the
 * locked path. Why this loses and double-counts nothing: see "Reading without losing"
 * at the top.
 *
 * now is the coarse clock (bpf_ktime_get_coarse_ns: the time at the last tick, 4 ms
 * apart at HZ=250), not bpf_ktime_get_ns: reading the exact clock costs ~25-40 ns on
 * real traffic, a sixth of the whole program. The coarse clock runs up to a tick
 * behind the exact one, so a flow's last_ns from steady packets is up to a tick early;
 * first_ns, handshake and end times come from locked updates and are exact. The
 * window stays safe: a coarse check passes at most a tick later than an exact one
 * would, against the GUARD (0.5 s) margin the argument needs. */
static __always_inline int add_if_steady(struct loupe_flow_value *v, __u8 dir, __u16 tf,
					 __u32 payload_len, __u64 packets, __u64 ip_bytes,
					 __u64 l2_bytes, __u64 now)
{
	struct loupe_dir_counters *c = &v->dir[dir & 1];
	if ((__s64)(now - v->fast_until) >= 0 || (tf & (TCPF_SYN | TCPF_FIN | TCPF_RST)) ||
	    (c->tcp_flags | tf) != c->tcp_flags || (payload_len && v->l7_select))
		return 0;
	__sync_fetch_and_add(&c->packets, packets);
	__sync_fetch_and_add(&c->ip_bytes, ip_bytes);
	__sync_fetch_and_add(&c->l2_bytes, l2_bytes);
	if ((__s64)(now - v->last_ns) > 0)
		v->last_ns = now;   /* a racing store may keep a value some ns older: harmless */
	return 1;
}

/* The fast path after the full parse. Returns 1 when done; else 0, with the entry (or
 * NULL) in *found for the locked path. */
static __always_inline int fast_path(struct loupe_pkt *p, struct loupe_flow_value **found)
{
	struct loupe_flow_value *v = flows.lookup(&p->key);
	*found = v;
	if (!v)
		return 0;
	return add_if_steady(v, p->dir, p->tcp_flags, p->payload_len, p->packets,
			     p->ip_bytes, p->l2_bytes, bpf_ktime_get_coarse_ns());
}

#define QUICK_NOT_MINE 0   /* not a packet the quick path parses: the full parse decides */
#define QUICK_DONE 1       /* counted */
#define QUICK_LOCKED 2     /* parsed into p, the entry (or NULL) in *found: a new flow,
			    * or a packet that needs the locked path */

/* The quick path: most packets are TCP or UDP over IPv4 without options or IPv6
 * without extension headers, unfragmented, in an untagged frame (or one whose tag the
 * stack holds beside it), of a steady flow. For exactly those this reads the headers
 * in place, builds the canonical key on the stack and adds lock-free, without the full
 * parse's scratch state: ~73 ns instead of ~108 per steady packet in a test run
 * (docs/kernel.md, "Cost per packet"). A packet of such a flow that needs the lock is
 * handed over parsed (QUICK_LOCKED). Anything else, or headers outside the linear part, returns QUICK_NOT_MINE and the
 * full parse counts the packet, to the same key. The checks are the full parse's:
 * a packet it would count as malformed is never the quick path's. */
static __always_inline int quick_path(struct __sk_buff *skb, struct loupe_pkt *p,
				       struct loupe_flow_value **found)
{
	__u8 *data = (__u8 *)(long)skb->data;
	__u8 *data_end = (__u8 *)(long)skb->data_end;
	__u8 *ip = data + ETH_HLEN_;
	struct loupe_flow_key k = {};
	__u8 src[16] = {}, dst[16] = {};
	__u32 gso = skb->gso_segs > 1;
	__u32 tot, l3_hdr, l4_hdr;
	__u8 *l4;

	if (ip + 20 > data_end)
		return QUICK_NOT_MINE;
	__u32 avail = skb->len - ETH_HLEN_;
	__u16 eth_proto = ((__u16)data[12] << 8) | data[13];
	if (eth_proto == ETH_P_IP_) {
		/* Version 4, no options; not a fragment (MF clear, offset 0). */
		if (ip[0] != 0x45 || (ip[6] & 0x3f) || ip[7])
			return QUICK_NOT_MINE;
		tot = ((__u32)ip[2] << 8) | ip[3];
		k.protocol = ip[9];
		__builtin_memcpy(src, ip + 12, 4);
		__builtin_memcpy(dst, ip + 16, 4);
		l3_hdr = 20;
	} else if (eth_proto == ETH_P_IPV6_) {
		if (ip + 40 > data_end || (ip[0] >> 4) != 6)
			return QUICK_NOT_MINE;
		tot = 40 + (((__u32)ip[4] << 8) | ip[5]);
		k.protocol = ip[6];
		__builtin_memcpy(src, ip + 8, 16);
		__builtin_memcpy(dst, ip + 24, 16);
		l3_hdr = 40;
	} else {
		return QUICK_NOT_MINE;
	}
	k.ip_version = l3_hdr == 20 ? 4 : 6;
	if (gso)
		tot = avail;  /* a GSO buffer's own length; its header may say 0 (BIG TCP) */
	else if (tot < l3_hdr || tot > avail)
		return QUICK_NOT_MINE;
	l4 = ip + l3_hdr;

	__u16 tf = 0;
	__u32 seq = 0, ack = 0;
	if (k.protocol == PROTO_TCP) {
		if (l4 + 20 > data_end)
			return QUICK_NOT_MINE;
		l4_hdr = (l4[12] >> 4) * 4;
		if (l4_hdr < 20 || l3_hdr + l4_hdr > tot)
			return QUICK_NOT_MINE;
		tf = ((__u16)(l4[12] & 1) << 8) | l4[13];
		seq = ((__u32)l4[4] << 24) | ((__u32)l4[5] << 16) | ((__u32)l4[6] << 8) | l4[7];
		ack = ((__u32)l4[8] << 24) | ((__u32)l4[9] << 16) | ((__u32)l4[10] << 8) | l4[11];
	} else if (k.protocol == PROTO_UDP) {
		if (l4 + 8 > data_end || l3_hdr + 8 > tot)
			return QUICK_NOT_MINE;
		l4_hdr = 8;
	} else {
		return QUICK_NOT_MINE;
	}
	__u16 sport = ((__u16)l4[0] << 8) | l4[1];
	__u16 dport = ((__u16)l4[2] << 8) | l4[3];
	__u32 vlan_extra = 0;
	if (skb->vlan_present) {
		k.vlan_id = skb->vlan_tci & 0x0fff;
		vlan_extra = VLAN_HLEN_;
	}
	k.ifindex = skb->ifindex;
	__u8 dir = canonicalize(&k, src, dst, sport, dport, 1, 0);

	__u32 segs = gso ? skb->gso_segs : 1;
	__u32 payload_len = tot - l3_hdr - l4_hdr;
	__u64 ip_bytes, l2_bytes;
	wire_bytes(skb, segs, tot, l3_hdr + l4_hdr, ETH_HLEN_, vlan_extra, &ip_bytes, &l2_bytes);

	struct loupe_flow_value *v = 0;
	if (!(tf & (TCPF_SYN | TCPF_FIN | TCPF_RST))) {
		v = flows.lookup(&k);
		if (v && add_if_steady(v, dir, tf, payload_len, segs, ip_bytes, l2_bytes,
				       bpf_ktime_get_coarse_ns()))
			return QUICK_DONE;
	}
	/* For the locked path: the packet as the full parse would have left it. */
	__builtin_memset(p, 0, sizeof(*p));
	__builtin_memcpy(&p->key, &k, sizeof(k));
	__builtin_memcpy(p->src, src, 16);
	__builtin_memcpy(p->dst, dst, 16);
	p->dir = dir;
	p->tcp_flags = tf;
	p->seq = seq;
	p->ack = ack;
	p->l3_off = ETH_HLEN_;
	p->l3_hdr_len = l3_hdr;
	p->l4_hdr_len = l4_hdr;
	p->ip_len = tot;
	p->payload_off = ETH_HLEN_ + l3_hdr + l4_hdr;
	p->payload_len = payload_len;
	p->packets = segs;
	p->ip_bytes = ip_bytes;
	p->l2_bytes = l2_bytes;
	*found = v;
	return QUICK_LOCKED;
}

/* Inserts a new flow's first value, its selection decided (with the exclusion program
 * only in loupe_new_flow). Returns 0 when the key is in the map (inserted here or by
 * another CPU), -1 when the map is full (counted: the packet is not). */
static __always_inline int create_flow(struct loupe_pkt *p, __u64 fp, __u64 now,
				       int with_exclusion)
{
	__u32 zero = 0;
	struct loupe_flow_value *init = (struct loupe_flow_value *)new_flow.lookup(&zero);
	if (!init)
		return -1;
	__builtin_memset(init, 0, sizeof(*init));
	init->incarnation = ((__u64)bpf_get_prandom_u32() << 32) | bpf_get_prandom_u32();
	init->key_fp = fp;
	init->first_ns = now;
	init->last_ns = now;
	init->initiator = p->dir;
	init->icmp_type = p->icmp_type;
	init->icmp_code = p->icmp_code;
	init->l7_select = select_new_flow(p, init, with_exclusion);
	int err = flows.insert(&p->key, init);
	if (err && err != -17 /* EEXIST: another CPU inserted it first */) {
		count(LOUPE_CNT_FLOW_MAP_FULL);
		return -1;
	}
	if (!err && init->l7_select)
		count(LOUPE_CNT_SELECTED_FLOWS);
	if (!err && (init->flags & LOUPE_FLOW_EXCLUDED))
		count(LOUPE_CNT_EXCLUDED_FLOWS);
	return 0;
}

/* Adds the packet to its flow under the entry's lock (v: the entry found by the fast
 * path, or NULL to look it up). Returns 0 when done, 1 when the entry was recycled
 * under us and the caller should try once more. */
/* A LOUPE_CTL_HOLD lasts while the other direction (peer) has sent no payload beyond
 * what userspace had seen when it asked (loupe.h). Compared modulo 2^32: a hold is asked
 * for right after userspace saw the peer's bytes, far less than 2 GiB behind. */
static __always_inline int hold_on(const struct loupe_l7_dir *peer, __u32 seen)
{
	__u32 total = (__u32)(peer->captured + peer->truncated + peer->skipped + peer->gap);
	return (__s32)(total - seen) <= 0;
}

static __always_inline int account(struct __sk_buff *skb, struct loupe_pkt *p, __u64 fp, __u64 now,
				   struct loupe_flow_value *v)
{
	if (!v)
		v = flows.lookup(&p->key);
	if (!v) {
		/* A new flow. With an exclusion program installed, loupe_new_flow creates
		 * it and runs this program on the packet again (the call returns only when
		 * the slot is empty): the program's loop is verified there, once, instead of
		 * here for every parse path that reaches a new flow. The run it starts is
		 * told apart by the key it just created: no flow is created twice within
		 * LOUPE_RETIRE_GUARD_NS, since userspace retires none sooner. */
		__u32 zero = 0;
		struct loupe_tail *t = tail_state.lookup(&zero);
		if (t && !(t->fp == fp && (__s64)(now - t->created_ns) < (__s64)LOUPE_RETIRE_GUARD_NS))
			tails.call(skb, LOUPE_TAIL_NEW_FLOW);
		if (create_flow(p, fp, now, 0) < 0)
			return 0;
		v = flows.lookup(&p->key);
		if (!v)
			return 1;   /* taken out by userspace in between */
	}

	/* Userspace's wishes for a selected flow; read before the lock (no helper may run
	 * under it). Unselected flows never look. */
	struct loupe_l7_ctl *ctl = 0;
	int want_l7 = (v->l7_select || (v->flags & LOUPE_FLOW_SNIFF_PENDING)) &&
		      (p->payload_len || (p->tcp_flags & (TCPF_SYN | TCPF_FIN | TCPF_RST)));
	if (want_l7 && v->l7_select)
		ctl = l7_ctl.lookup(&p->key);
	/* The sniffer's bytes, read only for a flow still waiting for its first payload
	 * (re-checked under the lock: another CPU may have sniffed it meanwhile). */
	int sniffed = 0;
	if ((v->flags & LOUPE_FLOW_SNIFF_PENDING) && p->payload_len >= SNIFF_LEN) {
		__u8 b[SNIFF_LEN];
		if (load_hdr(skb, p->payload_off, b, SNIFF_LEN) == 0)
			sniffed = sniff(b, p->key.protocol, p->payload_len);
	}
	int sniffed_now = 0;
	/* This packet's frame walk (frames.h), if walk_prepare planned one. */
	struct loupe_walk *walk = want_l7 ? walk_plan(fp) : 0;
	int walked = 0;

	__u8 d = p->dir & 1;
	__u16 tf = p->tcp_flags;
	int tcp = p->key.protocol == PROTO_TCP;
	__u8 ended = 0;
	struct copy_plan plan = {};

	bpf_spin_lock(&v->lock);
	if (v->key_fp != fp) {
		bpf_spin_unlock(&v->lock);
		return 1;
	}
	__u64 inc = v->incarnation;
	struct loupe_dir_counters *c = &v->dir[d];
	c->packets += p->packets;
	c->ip_bytes += p->ip_bytes;
	c->l2_bytes += p->l2_bytes;
	c->tcp_flags |= tf;
	if ((__s64)(now - v->last_ns) >= (__s64)LOUPE_RETIRE_GUARD_NS)
		v->resumed_ns = now;
	if ((__s64)(now - v->last_ns) > 0)
		v->last_ns = now;
	if (tcp) {
		if (tf & TCPF_SYN) {
			v->syn_count += 1;
			if (tf & TCPF_ACK) {
				c->side_flags |= LOUPE_SIDE_SYNACK;
				if (v->syn_ns && !v->synack_ns && d != v->initiator)
					v->synack_ns = now;
			} else {
				c->side_flags |= LOUPE_SIDE_SYN;
				if (!(v->flags & LOUPE_FLOW_INITIATOR_BY_SYN)) {
					v->flags |= LOUPE_FLOW_INITIATOR_BY_SYN;
					v->initiator = d;
				}
				if (!v->syn_ns && d == v->initiator)
					v->syn_ns = now;
			}
		} else if ((tf & TCPF_ACK) && v->synack_ns && !v->ack_ns && d == v->initiator) {
			v->ack_ns = now;
		}
		if (tf & TCPF_FIN)
			v->fin_count += 1;
		if (tf & TCPF_RST)
			v->rst_count += 1;
		if (!(v->flags & LOUPE_FLOW_ENDED)) {
			if (tf & TCPF_RST)
				ended = LOUPE_END_RST;
			else if ((v->dir[0].tcp_flags & TCPF_FIN) && (v->dir[1].tcp_flags & TCPF_FIN))
				ended = LOUPE_END_FIN;
			if (ended) {
				v->flags |= LOUPE_FLOW_ENDED;
				v->end_reason = ended;
				v->end_ns = now;
			}
		}
	}

	if (want_l7) {
		__u8 sel = v->l7_select;
		__u32 pl = p->payload_len;
		if (!sel && (v->flags & LOUPE_FLOW_SNIFF_PENDING) && pl) {
			v->flags &= ~LOUPE_FLOW_SNIFF_PENDING;
			if (sniffed) {
				sel = LOUPE_SEL_SNIFFED;
				v->l7_select = sel;
				sniffed_now = 1;
			}
		}
		if (sel) {
			__u8 to = (d ^ v->initiator) & 1;
			struct loupe_l7_dir *l = &v->l7[d];
			__u32 skip = 0, copy = 0;
			if (p->is_frag) {
				/* No IP reassembly here: a fragment's payload is not copied. */
				l->truncated += pl;
			} else if (ctl && (ctl->flags & LOUPE_CTL_DONE)) {
				l->skipped += pl;
			} else if (ctl && (ctl->flags & (LOUPE_CTL_HOLD << to)) &&
				   hold_on(&v->l7[(d ^ 1) & 1], ctl->hold_peer)) {
				l->skipped += pl;
			} else if (walk) {
				walk_take(walk, l, &v->l7[(d ^ 1) & 1], inc, sel, tf);
				walked = 1;
			} else if (pl) {
				if (tcp && ctl && ctl->skip_gen[to] != l->skip_gen_done) {
					__s32 ahead = (__s32)(ctl->skip_until[to] - p->seq);
					if (ahead <= 0) {
						l->skip_gen_done = ctl->skip_gen[to];
					} else if ((__u32)ahead >= pl) {
						skip = pl;
					} else {
						skip = ahead;
						l->skip_gen_done = ctl->skip_gen[to];
					}
				}
				struct loupe_l7_dir *peer = &v->l7[(d ^ 1) & 1];
				__u32 turn = peer->spoke_last;
				peer->spoke_last = 0;
				l->spoke_last = 1;
				__u64 allowance = v->l7_budget[to] + (ctl ? ctl->grant[to] : 0);
				__u64 used = l->captured + l->gap;
				__u64 room = allowance > used ? allowance - used : 0;
				if (turn && room < LOUPE_TURN_OCTETS)
					room = LOUPE_TURN_OCTETS;   /* loupe.h: a turn's head */
				__u32 rest = pl - skip;
				copy = rest;
				if (copy > room)
					copy = room;
				if (copy > LOUPE_MAX_CHUNKS * LOUPE_PAYLOAD_CHUNK)
					copy = LOUPE_MAX_CHUNKS * LOUPE_PAYLOAD_CHUNK;
				l->skipped += skip;
				l->captured += copy;
				l->truncated += rest - copy;
			}
			plan.start = skip;
			plan.len = copy;
			plan.to = to;
			plan.sel = sel;
			plan.control = !walked && (tf & (TCPF_SYN | TCPF_FIN | TCPF_RST)) != 0;
		}
	}

	v->updates += 1;
	__u32 ordinal = v->updates;
	int recheck = (v->flags & LOUPE_FLOW_ENDED) ||
		      (__s64)(now - v->resumed_ns) < (__s64)LOUPE_RETIRE_GUARD_NS;
	/* Steady: nothing but counters can change on the next packets (handshake done or
	 * never seen, not ended, not being sniffed, no unlink can race). */
	int steady = !recheck && !(v->flags & LOUPE_FLOW_SNIFF_PENDING) &&
		     !(tcp && v->synack_ns && !v->ack_ns);
	v->fast_until = steady ? now + LOUPE_RETIRE_GUARD_NS : 0;
	bpf_spin_unlock(&v->lock);

	if (recheck) {
		struct loupe_flow_value *q = flows.lookup(&p->key);
		if (!q || q->incarnation != inc)
			send_late(p, inc, ordinal, now);
	}
	if (ended)
		send_end(p, inc, ended, now);
	if (sniffed_now)
		count(LOUPE_CNT_SNIFFED_FLOWS);
	if (plan.len || plan.control)
		send_payload(skb, p, v, inc, &plan, now);
	return 0;
}

/* The full parse: any frame, into p. Returns 0, or the counter that explains why the
 * packet is not a flow's. */
static __always_inline int parse_frame(struct __sk_buff *skb, struct loupe_pkt *p)
{
	__u32 off = ETH_HLEN_;
	__u8 tags = 0;
	__u16 vlan_extra = 0;
	__u16 proto;

	__builtin_memset(p, 0, sizeof(*p));
	if (skb->vlan_present) {
		/* The outer tag travels beside the frame (hardware or stack offload). */
		p->key.vlan_id = skb->vlan_tci & 0x0fff;
		vlan_extra = VLAN_HLEN_;
		tags = 1;
	}
	__u8 eth[2];
	if (load_hdr(skb, 12, eth, 2) < 0)
		return LOUPE_CNT_TRUNCATED;
	proto = ((__u16)eth[0] << 8) | eth[1];
#pragma unroll
	for (int i = 0; i < 3; i++) {
		if (proto == ETH_P_8021Q_ || proto == ETH_P_8021AD_) {
			if (tags >= 2)
				return LOUPE_CNT_UNSUPPORTED_ENCAP;
			__u8 t[4];
			if (load_hdr(skb, off, t, 4) < 0)
				return LOUPE_CNT_TRUNCATED;
			__u16 vid = (((__u16)t[0] << 8) | t[1]) & 0x0fff;
			if (tags == 0)
				p->key.vlan_id = vid;
			else
				p->key.inner_vlan_id = vid;
			tags += 1;
			proto = ((__u16)t[2] << 8) | t[3];
			off += VLAN_HLEN_;
		}
	}
	p->l3_off = off;
	p->key.ifindex = skb->ifindex;

	__u32 segs = skb->gso_segs;
	int gso = segs > 1;
	if (!gso)
		segs = 1;
	int err;
	if (proto == ETH_P_IP_) {
		err = parse_ipv4(skb, p, gso);
	} else if (proto == ETH_P_IPV6_) {
		err = parse_ipv6(skb, p, gso);
	} else if (proto == ETH_P_MPLS_UC_ || proto == ETH_P_MPLS_MC_ ||
		   proto == ETH_P_PPP_DISC_ || proto == ETH_P_PPP_SES_ ||
		   proto == ETH_P_8021Q_ || proto == ETH_P_8021AD_) {
		err = LOUPE_CNT_UNSUPPORTED_ENCAP;
	} else {
		err = LOUPE_CNT_NON_IP;
	}
	if (err)
		return err;

	/* Segment arithmetic: the buffer holds segs segments' payload but one copy of
	 * the headers; every further segment carried its own. */
	p->packets = segs;
	wire_bytes(skb, segs, p->ip_len, p->l3_hdr_len + p->l4_hdr_len, off, vlan_extra,
		   &p->ip_bytes, &p->l2_bytes);
	if (p->is_frag)
		p->payload_len = p->ip_len - p->l3_hdr_len - p->l4_hdr_len;
	return 0;
}

/* Tail-called by loupe_tc for a new flow while an exclusion program is installed
 * (userspace fills slot LOUPE_TAIL_NEW_FLOW only then): creates the flow with the
 * exclusion decided, then runs loupe_tc on the packet again, which finds the flow and
 * counts the packet. The parse result is still in pkt_scratch (same CPU, same packet). */
int loupe_new_flow(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct loupe_pkt *p = pkt_scratch.lookup(&zero);
	struct loupe_tail *t = tail_state.lookup(&zero);
	if (!p || !t)
		return TC_ACT_UNSPEC;
	__u64 now = bpf_ktime_get_ns();
	__u64 fp = key_hash(&p->key) | 1;
	if (create_flow(p, fp, now, 1) < 0)
		return TC_ACT_UNSPEC;   /* map full: counted */
	t->fp = fp;
	t->created_ns = now;
	/* loupe_tc parses and counts this packet again */
	__u8 cut = p->l4_cut;
	count_n(LOUPE_CNT_PACKETS, (__u64)-1);
	if (cut)
		count_n(LOUPE_CNT_TRUNCATED_L4, (__u64)-1);
	tails.call(skb, LOUPE_TAIL_METER);
	/* Only if userspace emptied the meter's slot: the packet is not counted. */
	count(LOUPE_CNT_PACKETS);
	if (cut)
		count(LOUPE_CNT_TRUNCATED_L4);
	count(LOUPE_CNT_TAIL_CALL_FAILED);
	return TC_ACT_UNSPEC;
}

/* Enforcement (loupe.h, "enforcement"): which block maps to look in for this packet,
 * LOUPE_BLOCK_ANY_* or 0. 0 while no block is in force, and 0 once the sensor's heartbeat
 * is older than LOUPE_BLOCK_STALE_NS: a dead sensor's blocks stop (fail open). */
_Static_assert(sizeof(struct loupe_block_cfg) == LOUPE_BLOCK_CFG_SIZE, "block cfg size");
_Static_assert(sizeof(struct loupe_block_value) == LOUPE_BLOCK_VALUE_SIZE, "block value size");
_Static_assert(sizeof(struct loupe_block_src_key) == LOUPE_BLOCK_SRC_KEY_SIZE,
	       "block src key size");

static __always_inline __u32 enforcing(void)
{
	__u32 zero = 0;
	struct loupe_block_cfg *bc = block_cfg.lookup(&zero);
	if (!bc || !bc->active)
		return 0;
	if ((__s64)(bpf_ktime_get_coarse_ns() - bc->heartbeat_ns) > (__s64)LOUPE_BLOCK_STALE_NS)
		return 0;
	return bc->active;
}

_Static_assert(sizeof(struct loupe_rate_key) == LOUPE_RATE_KEY_SIZE, "rate key size");
_Static_assert(sizeof(struct loupe_rate_value) == LOUPE_RATE_VALUE_SIZE, "rate value size");

/* The per-source token bucket (loupe.h, "rate limits"): 1 when the packet is to be
 * dropped. Only a packet that opens a connection or carries payload takes a token. */
static __always_inline int rate_limited(struct loupe_pkt *p, __u64 now)
{
	if (!p->payload_len && !(p->key.protocol == PROTO_TCP && (p->tcp_flags & TCPF_SYN)))
		return 0;
	struct loupe_rate_key rk = {};
	rk.ip_version = p->key.ip_version;
	__builtin_memcpy(rk.addr, p->src, 16);
	struct loupe_rate_value *r = rate_src.lookup(&rk);
	if (!r || (__s64)(r->expires_ns - now) <= 0)
		return 0;
	__u64 cap = (__u64)r->burst * 1000;
	__u64 tokens = cap;
	if (r->last_ns) {
		__u64 elapsed = now - r->last_ns;
		if ((__s64)elapsed < 0)
			elapsed = 0;
		if (elapsed > LOUPE_RATE_MAX_REFILL_NS)
			elapsed = LOUPE_RATE_MAX_REFILL_NS;
		__u64 rate = r->rate > LOUPE_RATE_MAX ? LOUPE_RATE_MAX : r->rate;
		tokens = r->tokens_milli + elapsed * rate / 1000000;
		if (tokens > cap)
			tokens = cap;
	}
	r->last_ns = now;
	if (tokens < 1000) {
		r->tokens_milli = tokens;
		__sync_fetch_and_add(&r->dropped, 1);
		return 1;
	}
	r->tokens_milli = tokens - 1000;
	__sync_fetch_and_add(&r->passed, 1);
	return 0;
}

/* Whether the parsed packet p is to be dropped: its flow (either way) is in block_flow,
 * its source in block_src, or its source's token bucket (rate_src) is empty; one lookup
 * per map that holds entries. Counted. */
static __always_inline int blocked(struct loupe_pkt *p, __u32 active)
{
	/* A bare TCP RST always passes: the sensor's own resets, which end both sides of
	 * a blocked flow (sensor/enforce/), travel with the flow's addresses, and a reset
	 * without payload carries nothing a block has to stop. */
	if ((p->tcp_flags & TCPF_RST) && !p->payload_len && p->key.protocol == PROTO_TCP)
		return 0;
	__u64 now = bpf_ktime_get_coarse_ns();
	if (active & LOUPE_BLOCK_ANY_FLOW) {
		struct loupe_flow_key k;
		__builtin_memcpy(&k, &p->key, sizeof(k));
		k.ifindex = 0;
		struct loupe_block_value *b = block_flow.lookup(&k);
		if (b && (__s64)(b->expires_ns - now) > 0) {
			count(LOUPE_CNT_BLOCKED_FLOW);
			return 1;
		}
	}
	if (active & LOUPE_BLOCK_ANY_SRC) {
		struct loupe_block_src_key sk = {};
		sk.prefixlen = p->key.ip_version == 4 ? 8 + 32 : 8 + 128;
		sk.ip_version = p->key.ip_version;
		__builtin_memcpy(sk.addr, p->src, 16);
		struct loupe_block_value *b = block_src.lookup(&sk);
		if (b && (__s64)(b->expires_ns - now) > 0) {
			count(LOUPE_CNT_BLOCKED_SRC);
			return 1;
		}
	}
	if ((active & LOUPE_BLOCK_ANY_RATE) && rate_limited(p, now))
		return 1;
	return 0;
}

/* Hold mode (loupe.h, "Hold mode"): arms a flow at a request packet toward a held
 * service, and says whether the parsed packet p, a response of a flow whose latest
 * request has no verdict yet, is to be dropped (its TCP sends it again). Runs before the
 * flow accounts the packet: a held segment is counted here (LOUPE_CNT_HELD), not in its
 * flow, and its payload reaches userspace once, when it is finally let through. */
_Static_assert(sizeof(struct loupe_hold_svc_key) == LOUPE_HOLD_SVC_KEY_SIZE, "hold svc key");
_Static_assert(sizeof(struct loupe_hold_svc) == LOUPE_HOLD_SVC_SIZE, "hold svc size");
_Static_assert(sizeof(struct loupe_hold_req) == LOUPE_HOLD_REQ_SIZE, "hold req size");
_Static_assert(sizeof(struct loupe_hold_ok) == LOUPE_HOLD_OK_SIZE, "hold ok size");

static __always_inline int held(struct loupe_pkt *p)
{
	if (p->key.protocol != PROTO_TCP || p->is_frag || (p->tcp_flags & TCPF_RST))
		return 0;
	struct loupe_flow_key k;
	__builtin_memcpy(&k, &p->key, sizeof(k));
	k.ifindex = 0;
	struct loupe_hold_svc_key sk = {};
	sk.ip_version = p->key.ip_version;
	sk.port = p->dir == LOUPE_DIR_LO_HI ? p->key.port_hi : p->key.port_lo;
	__builtin_memcpy(sk.addr, p->dst, 16);
	struct loupe_hold_svc *svc = hold_svc.lookup(&sk);
	if (svc) {
		/* Toward a held service: a request (or the start of a connection). */
		if (p->tcp_flags & TCPF_SYN) {
			/* A new connection on this 4-tuple: nothing of an old one applies. */
			hold_req.delete(&k);
			hold_ok.delete(&k);
			return 0;
		}
		if (!p->payload_len)
			return 0;
		__u32 end = p->seq + p->payload_len;
		__u64 now = bpf_ktime_get_ns();
		struct loupe_hold_req *r = hold_req.lookup(&k);
		if (!r) {
			struct loupe_hold_req nr = {};
			nr.armed_ns = now;
			nr.max_hold_ns = svc->max_hold_ns;
			nr.req_end = end;
			nr.req_dir = p->dir;
			hold_ok.delete(&k);
			hold_req.update(&k, &nr);
		} else if (r->req_dir == p->dir && (__s32)(end - r->req_end) > 0) {
			/* New request bytes (a retransmission of old ones moves nothing). */
			r->req_end = end;
			r->armed_ns = now;
		}
		return 0;
	}
	if (!p->payload_len && !(p->tcp_flags & TCPF_FIN))
		return 0;   /* a bare ACK carries nothing to hold */
	struct loupe_hold_req *r = hold_req.lookup(&k);
	if (!r || r->req_dir == p->dir)
		return 0;
	struct loupe_hold_ok *ok = hold_ok.lookup(&k);
	if (ok && (__s32)(r->req_end - ok->done_end) <= 0)
		return 0;   /* every request so far has its verdict */
	if ((__s64)(bpf_ktime_get_ns() - r->armed_ns) >= (__s64)r->max_hold_ns) {
		count(LOUPE_CNT_HOLD_EXPIRED);
		return 0;   /* the verdict is late: fail open */
	}
	count(LOUPE_CNT_HELD);
	return 1;
}

int loupe_tc(struct __sk_buff *skb)
{
	/* The packet's state lives in a per-CPU map value, not on the stack: the verifier
	 * then sees what the parsers wrote as unknown values when accounting reads them,
	 * so the many parse paths (IPv4/IPv6, extension headers, transports, fragments)
	 * meet in one state there instead of each walking the accounting code again. */
	__u32 zero = 0;
	struct loupe_pkt *p = pkt_scratch.lookup(&zero);
	if (!p)
		return TC_ACT_UNSPEC;
	count(LOUPE_CNT_PACKETS);

	/* While a block is in force every packet takes the full parse (the quick path
	 * leaves no parse result behind), is counted as usual, and then meets the verdict. */
	__u32 active = enforcing();
	struct loupe_flow_value *found = 0;
	int quick = active ? QUICK_NOT_MINE : quick_path(skb, p, &found);
	if (quick == QUICK_DONE)
		return TC_ACT_UNSPEC;
	if (quick == QUICK_NOT_MINE) {
		int err = parse_frame(skb, p);
		if (err) {
			count(err);
			return TC_ACT_UNSPEC;
		}
		if ((active & LOUPE_BLOCK_ANY_HOLD) && held(p))
			return TC_ACT_SHOT;
		if (fast_path(p, &found))
			return active && blocked(p, active) ? TC_ACT_SHOT : TC_ACT_UNSPEC;
	}
	__u64 now = bpf_ktime_get_ns();
	__u64 fp = key_hash(&p->key) | 1;   /* never 0, the value of a zeroed entry */
	/* Twice at most: the second try follows an entry recycled under the first. A
	 * loop, not two calls, so the body (and its stack) exists once. */
	walk_prepare(skb, p, found);
#pragma clang loop unroll(disable)
	for (int i = 0; i < 2; i++) {
		if (!account(skb, p, fp, now, i == 0 ? found : 0))
			break;
		if (i == 1)
			count(LOUPE_CNT_RECYCLED_ENTRY);
	}
	if (active && blocked(p, active))
		return TC_ACT_SHOT;
	walk_run(skb, p);   /* frames.h: a walked packet goes on in loupe_walk */
	return TC_ACT_UNSPEC;
}
