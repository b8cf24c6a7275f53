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

/* events: flow-end and late-update events to userspace (loupe_event_hdr + body).
 * Size: LOUPE_RINGBUF_PAGES pages (why: see loupe.h). A ring buffer, not a perf
 * buffer: one buffer for all CPUs, events in order, reserve fails visibly when full. */
BPF_RINGBUF_OUTPUT(events, LOUPE_RINGBUF_PAGES);

#endif /* LOUPE_MAPS_H */
