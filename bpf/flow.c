/* flow.c: Loupe's flow meter, a TC clsact program for ingress and egress.
 *
 * Strategy
 * - Observe only: every path returns TC_ACT_UNSPEC, which passes the packet exactly as
 *   TC_ACT_OK does when we are the only filter, and lets a filter chained after ours
 *   (another tool's program) still run, so attaching Loupe never changes a verdict.
 * - Only packet bytes (bpf_skb_load_bytes) and __sk_buff fields are read; no kernel
 *   struct, so one build runs on any kernel >= 5.8. Only UAPI headers are included.
 * - Wire packets, not socket buffers: with TSO/GSO on egress and GRO on ingress one
 *   buffer carries gso_segs segments, each of which had its own L2/L3/L4 headers on the
 *   wire. We count gso_segs packets and add the per-segment header length for every
 *   segment but the first (whose headers are in the buffer).
 * - A VLAN tag the NIC or stack moved out of the frame (skb->vlan_present) still was on
 *   the wire: it is the outer tag, and its 4 bytes count in the layer-2 length.
 * - Every packet that is not attributed to a flow is counted in one of the per-CPU
 *   counters (loupe.h, enum loupe_counter); none is misattributed.
 *
 * Reading without losing
 *   Userspace takes finished flows out with BPF_MAP_LOOKUP_AND_DELETE_ELEM(BPF_F_LOCK),
 *   which copies the value under its spin lock and unlinks it in one step. A program
 *   that looked the entry up before the unlink may still add its packet after the copy,
 *   into an entry nobody will read again. So after every update the program looks the
 *   key up again: if the entry is gone or is another incarnation, it sends its packet as
 *   a LOUPE_EV_LATE_UPDATE event with the update's ordinal. The lock serialises updates
 *   and the copy, so userspace knows exactly whether the packet is in its copy (ordinal
 *   <= copied `updates`) or must be added. Nothing is lost and nothing counted twice.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>

#include "loupe.h"
#include "maps.h"

_Static_assert(sizeof(struct loupe_flow_key) == LOUPE_FLOW_KEY_SIZE, "flow key size");
_Static_assert(sizeof(struct loupe_flow_value) == LOUPE_FLOW_VALUE_SIZE, "flow value size");
_Static_assert(sizeof(struct loupe_frag_key) == LOUPE_FRAG_KEY_SIZE, "frag key size");
_Static_assert(sizeof(struct loupe_frag_value) == LOUPE_FRAG_VALUE_SIZE, "frag value size");
_Static_assert(sizeof(struct loupe_event_hdr) == LOUPE_EVENT_HDR_SIZE, "event header size");
_Static_assert(sizeof(struct loupe_flow_end_event) == LOUPE_FLOW_END_EVENT_SIZE, "end event size");
_Static_assert(sizeof(struct loupe_late_update_event) == LOUPE_LATE_UPDATE_EVENT_SIZE,
	       "late event size");

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
#define NH_HOPOPTS 0
#define NH_ROUTING 43
#define NH_FRAGMENT 44
#define NH_AH 51
#define NH_DSTOPTS 60

#define TCPF_FIN 0x01
#define TCPF_SYN 0x02
#define TCPF_RST 0x04
#define TCPF_ACK 0x10

/* What one packet contributes, and to which flow. */
struct pkt {
	struct loupe_flow_key key;   /* canonical */
	__u64 packets;
	__u64 ip_bytes;
	__u64 l2_bytes;
	__u32 l3_off;                /* bytes before the IP header in the buffer */
	__u32 l3_hdr_len;            /* IP header incl. IPv6 extension headers */
	__u32 l4_hdr_len;
	__u32 ip_len;                /* IP length of this buffer (non-GSO: the header's) */
	__u16 tcp_flags;
	__u8  dir;
	__u8  icmp_type;
	__u8  icmp_code;
	__u8  is_first_frag;         /* offset 0 and more fragments follow */
	__u8  pad[2];
	__u32 frag_id;
};

static __always_inline void count(__u32 idx)
{
	__u64 *c = counters.lookup(&idx);
	if (c)
		*c += 1;
}

static __always_inline __u64 key_fingerprint(const struct loupe_flow_key *k)
{
	const __u32 *w = (const __u32 *)k;
	__u64 h = 0xcbf29ce484222325ULL;
#pragma unroll
	for (int i = 0; i < LOUPE_FLOW_KEY_SIZE / 4; i++)
		h = (h ^ w[i]) * 0x100000001b3ULL;
	return h | 1;   /* never 0, the value of a zeroed entry */
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

/* Orders the ends: lo gets the lower (address, port), and dir says which end sent. */
static __always_inline void canonicalize(struct pkt *p, const __u8 *src, const __u8 *dst,
					 __u16 sport, __u16 dport, int ports_ordered,
					 __u8 reply_hint)
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
		__builtin_memcpy(p->key.addr_lo, src, 16);
		__builtin_memcpy(p->key.addr_hi, dst, 16);
		p->dir = LOUPE_DIR_LO_HI;
	} else {
		__builtin_memcpy(p->key.addr_lo, dst, 16);
		__builtin_memcpy(p->key.addr_hi, src, 16);
		p->dir = LOUPE_DIR_HI_LO;
	}
	if (ports_ordered && cmp >= 0) {
		p->key.port_lo = dport;
		p->key.port_hi = sport;
	} else {
		p->key.port_lo = sport;
		p->key.port_hi = dport;
	}
}

/* Parses the transport header at off (within the IP datagram ending at end) and fills
 * the canonical key. Returns 0, or the counter explaining why it could not. */
static __always_inline int parse_l4(struct __sk_buff *skb, struct pkt *p, __u32 off, __u32 end,
				    const __u8 *src, const __u8 *dst)
{
	__u8 proto = p->key.protocol;
	__u16 sport = 0, dport = 0;
	int ports_ordered = 1;
	__u8 reply = 0;

	if (proto == PROTO_TCP) {
		__u8 h[14];
		if (off + 20 > end || bpf_skb_load_bytes(skb, off, h, sizeof(h)) < 0)
			return LOUPE_CNT_TRUNCATED;
		__u32 doff = (h[12] >> 4) * 4;
		if (doff < 20 || off + doff > end)
			return LOUPE_CNT_BAD_HEADER;
		sport = ((__u16)h[0] << 8) | h[1];
		dport = ((__u16)h[2] << 8) | h[3];
		p->tcp_flags = ((__u16)(h[12] & 1) << 8) | h[13];
		p->l4_hdr_len = doff;
	} else if (proto == PROTO_UDP) {
		__u8 h[4];
		if (off + 8 > end || bpf_skb_load_bytes(skb, off, h, sizeof(h)) < 0)
			return LOUPE_CNT_TRUNCATED;
		sport = ((__u16)h[0] << 8) | h[1];
		dport = ((__u16)h[2] << 8) | h[3];
		p->l4_hdr_len = 8;
	} else if ((proto == PROTO_ICMP && p->key.ip_version == 4) ||
		   (proto == PROTO_ICMPV6 && p->key.ip_version == 6)) {
		__u8 h[2];
		if (off + 4 > end || bpf_skb_load_bytes(skb, off, h, sizeof(h)) < 0)
			return LOUPE_CNT_TRUNCATED;
		p->icmp_type = h[0];
		p->icmp_code = h[1];
		sport = icmp_request_type(p->key.ip_version, h[0], &reply);
		dport = h[1];
		ports_ordered = 0;
		p->l4_hdr_len = 0;   /* ICMP is never segmented */
	}
	canonicalize(p, src, dst, sport, dport, ports_ordered, reply);
	return 0;
}

/* A later fragment: the flow is whatever its first fragment left in frags. */
static __always_inline int attribute_fragment(struct pkt *p, const __u8 *src, const __u8 *dst)
{
	struct loupe_frag_key fk = {};
	__builtin_memcpy(fk.src, src, 16);
	__builtin_memcpy(fk.dst, dst, 16);
	fk.id = p->frag_id;
	fk.protocol = p->key.protocol;
	fk.ip_version = p->key.ip_version;
	struct loupe_frag_value *fv = frags.lookup(&fk);
	if (!fv)
		return LOUPE_CNT_FRAG_NO_FIRST;
	__builtin_memcpy(&p->key, &fv->flow, sizeof(p->key));
	p->dir = fv->dir;
	p->l4_hdr_len = 0;
	return 0;
}

static __always_inline void remember_first_fragment(struct pkt *p, const __u8 *src,
						    const __u8 *dst)
{
	struct loupe_frag_key fk = {};
	struct loupe_frag_value fv = {};
	__builtin_memcpy(fk.src, src, 16);
	__builtin_memcpy(fk.dst, dst, 16);
	fk.id = p->frag_id;
	fk.protocol = p->key.protocol;
	fk.ip_version = p->key.ip_version;
	__builtin_memcpy(&fv.flow, &p->key, sizeof(fv.flow));
	fv.dir = p->dir;
	frags.update(&fk, &fv);
}

static __always_inline int parse_ipv4(struct __sk_buff *skb, struct pkt *p, int gso)
{
	__u8 h[20];
	__u32 off = p->l3_off;
	if (bpf_skb_load_bytes(skb, off, h, sizeof(h)) < 0)
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
	__u8 src[16] = {}, dst[16] = {};
	__builtin_memcpy(src, &h[12], 4);
	__builtin_memcpy(dst, &h[16], 4);
	p->key.ip_version = 4;
	p->key.protocol = h[9];
	p->l3_hdr_len = ihl;
	p->ip_len = tot;
	__u16 frag = ((__u16)h[6] << 8) | h[7];
	p->frag_id = ((__u32)h[4] << 8) | h[5];
	if (frag & 0x1fff)
		return attribute_fragment(p, src, dst);
	p->is_first_frag = (frag & 0x2000) != 0;
	int err = parse_l4(skb, p, off + ihl, off + tot, src, dst);
	if (err == 0 && p->is_first_frag)
		remember_first_fragment(p, src, dst);
	return err;
}

static __always_inline int parse_ipv6(struct __sk_buff *skb, struct pkt *p, int gso)
{
	__u8 h[40];
	__u32 off = p->l3_off;
	if (bpf_skb_load_bytes(skb, off, h, sizeof(h)) < 0)
		return LOUPE_CNT_TRUNCATED;
	__u32 avail = skb->len - off;
	__u32 tot = 40 + (((__u32)h[4] << 8) | h[5]);
	if ((h[0] >> 4) != 6)
		return LOUPE_CNT_BAD_HEADER;
	if (gso)
		tot = avail;
	else if (tot > avail)
		return LOUPE_CNT_BAD_HEADER;
	__u8 src[16], dst[16];
	__builtin_memcpy(src, &h[8], 16);
	__builtin_memcpy(dst, &h[24], 16);
	p->key.ip_version = 6;
	p->ip_len = tot;

	__u8 nh = h[6];
	__u32 l4 = off + 40;
	int frag_later = 0;
	int done = 0;
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
		return attribute_fragment(p, src, dst);
	int err = parse_l4(skb, p, l4, off + tot, src, dst);
	if (err == 0 && p->is_first_frag)
		remember_first_fragment(p, src, dst);
	return err;
}

static __always_inline void send_late(struct pkt *p, __u64 inc, __u32 ordinal, __u64 now)
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

static __always_inline void send_end(struct pkt *p, __u64 inc, __u8 reason, __u64 now)
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

/* Adds the packet to its flow. Returns 0 when done, 1 when the entry was recycled
 * under us and the caller should try once more. */
static __always_inline int account(struct pkt *p, __u64 fp, __u64 now)
{
	struct loupe_flow_value *v = flows.lookup(&p->key);
	if (!v) {
		struct loupe_flow_value init = {};
		init.incarnation = ((__u64)bpf_get_prandom_u32() << 32) | bpf_get_prandom_u32();
		init.key_fp = fp;
		init.first_ns = now;
		init.last_ns = now;
		init.initiator = p->dir;
		init.icmp_type = p->icmp_type;
		init.icmp_code = p->icmp_code;
		int err = flows.insert(&p->key, &init);
		if (err && err != -17 /* EEXIST: another CPU inserted it first */) {
			count(LOUPE_CNT_FLOW_MAP_FULL);
			return 0;
		}
		v = flows.lookup(&p->key);
		if (!v)
			return 1;   /* taken out by userspace in between */
	}

	__u8 d = p->dir & 1;
	__u16 tf = p->tcp_flags;
	int tcp = p->key.protocol == PROTO_TCP;
	__u8 ended = 0;

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
	if (now > v->last_ns)
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
	v->updates += 1;
	__u32 ordinal = v->updates;
	bpf_spin_unlock(&v->lock);

	struct loupe_flow_value *q = flows.lookup(&p->key);
	if (!q || q->incarnation != inc)
		send_late(p, inc, ordinal, now);
	if (ended)
		send_end(p, inc, ended, now);
	return 0;
}

int loupe_tc(struct __sk_buff *skb)
{
	struct pkt p = {};
	__u32 off = ETH_HLEN_;
	__u8 tags = 0;
	__u16 vlan_extra = 0;
	__u16 proto;

	count(LOUPE_CNT_PACKETS);
	if (skb->vlan_present) {
		/* The outer tag travels beside the frame (hardware or stack offload). */
		p.key.vlan_id = skb->vlan_tci & 0x0fff;
		vlan_extra = VLAN_HLEN_;
		tags = 1;
	}
	__u8 eth[2];
	if (bpf_skb_load_bytes(skb, 12, eth, 2) < 0) {
		count(LOUPE_CNT_TRUNCATED);
		return TC_ACT_UNSPEC;
	}
	proto = ((__u16)eth[0] << 8) | eth[1];
#pragma unroll
	for (int i = 0; i < 3; i++) {
		if (proto == ETH_P_8021Q_ || proto == ETH_P_8021AD_) {
			if (tags >= 2) {
				count(LOUPE_CNT_UNSUPPORTED_ENCAP);
				return TC_ACT_UNSPEC;
			}
			__u8 t[4];
			if (bpf_skb_load_bytes(skb, off, t, 4) < 0) {
				count(LOUPE_CNT_TRUNCATED);
				return TC_ACT_UNSPEC;
			}
			__u16 vid = (((__u16)t[0] << 8) | t[1]) & 0x0fff;
			if (tags == 0)
				p.key.vlan_id = vid;
			else
				p.key.inner_vlan_id = vid;
			tags += 1;
			proto = ((__u16)t[2] << 8) | t[3];
			off += VLAN_HLEN_;
		}
	}
	p.l3_off = off;
	p.key.ifindex = skb->ifindex;

	__u32 segs = skb->gso_segs;
	int gso = segs > 1;
	if (!gso)
		segs = 1;
	int err;
	if (proto == ETH_P_IP_) {
		err = parse_ipv4(skb, &p, gso);
	} else if (proto == ETH_P_IPV6_) {
		err = parse_ipv6(skb, &p, gso);
	} else if (proto == ETH_P_MPLS_UC_ || proto == ETH_P_MPLS_MC_ ||
		   proto == ETH_P_PPP_DISC_ || proto == ETH_P_PPP_SES_ ||
		   proto == ETH_P_8021Q_ || proto == ETH_P_8021AD_) {
		err = LOUPE_CNT_UNSUPPORTED_ENCAP;
	} else {
		err = LOUPE_CNT_NON_IP;
	}
	if (err) {
		count(err);
		return TC_ACT_UNSPEC;
	}

	/* Segment arithmetic: the buffer holds segs segments' payload but one copy of
	 * the headers; every further segment carried its own. */
	__u64 seg_hdr = p.l3_hdr_len + p.l4_hdr_len;
	p.packets = segs;
	p.ip_bytes = p.ip_len + (segs - 1) * seg_hdr;
	if (gso)
		p.l2_bytes = skb->len + (__u64)vlan_extra * segs + (segs - 1) * (off + seg_hdr);
	else
		p.l2_bytes = skb->len + vlan_extra;

	__u64 now = bpf_ktime_get_ns();
	__u64 fp = key_fingerprint(&p.key);
	if (account(&p, fp, now) && account(&p, fp, now))
		count(LOUPE_CNT_RECYCLED_ENTRY);
	return TC_ACT_UNSPEC;
}
