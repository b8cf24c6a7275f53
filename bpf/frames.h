/* frames.h: the kernel's frame walk, included by flow.c.
 *
 * Why: a length-framed protocol (HTTP/2 frames, PostgreSQL messages) carries its bulk in
 * frames the parser only counts (DATA, DataRow). Skipping each one by a userspace
 * skip-until (loupe_l7_ctl) needs one round trip per frame: at line rate userspace falls
 * behind (a 10 MiB gRPC message is 640 DATA frames of 16 KiB), the allowance runs out,
 * a frame header is truncated and the parse ends. Here the kernel reads the frame
 * headers itself and leaves the bulk out, so what a flow copies follows its headers and
 * control frames, not its volume.
 *
 * Strategy
 * - Each protocol that can be walked is one entry of frame_cfg, filled by userspace at
 *   load time from the parsers' registrations (sensor/kernel/frames.py): the first
 *   eight octets of a client's first payload that identify it, where each side's first
 *   frame starts, the header's layout (length field, type byte, flags byte) and which
 *   frame types are elided.
 * - A flow's walk is armed at the client's first payload, and only when the flow's
 *   start was seen (its SYN: the initiator is known) and nothing of that direction was
 *   accounted before: the walk must start on a frame boundary or not at all. The
 *   server's side starts at its first payload octet, if it had sent none when the
 *   client's first payload matched. A server that speaks first (HTTP/2 servers send
 *   SETTINGS at once, racing the client's preface) is armed by its own first payload
 *   when that matches the protocol's server opening and the flow was selected at its
 *   SYN (so its every octet is counted); the client's first payload must then match
 *   too, or neither side is walked.
 * - Per packet: loupe_tc prepares the walk (arms it, checks the packet's place) before
 *   account(), which takes the packet for the walk under the flow's lock (no packet read
 *   is allowed there) when nothing else (stop, hold, fragment) decides; loupe_tc then
 *   tail-calls loupe_walk. That program reads the headers inside the packet, WALK_STEPS
 *   per run, and tail-calls itself for more (up to WALK_HOPS times: a PostgreSQL result
 *   packs hundreds of DataRows into one packet). Its own program, because the verifier
 *   then checks the loop once, from a small state, instead of for every path of the
 *   meter (an unrolled 16-frame walk inside loupe_tc passed its 1M-instruction limit);
 *   bpf_loop() would do the same, but bcc 0.26 neither relocates a callback nor links
 *   BPF-to-BPF calls. The outcome is a plan of at most WALK_RANGES octet ranges to
 *   copy: every frame header and the payload of frames that are not elided. An elided
 *   frame is left out whole, header included, when all of its header is in this packet
 *   and its flags ask for nothing else; with one of body_flags (HTTP/2 END_STREAM) only
 *   its payload is left out, and with one of keep_flags (PADDED) it is copied whole.
 *   Elided frames of keep_type keep their header and keep_octets payload octets (an
 *   HTTP/2 DATA frame its gRPC message prefix: message counts and lengths stay exact).
 *   loupe_walk counts the octets not copied as skipped (under the lock) and sends the
 *   ranges.
 * - Ranges beyond WALK_RANGES merge into the last one (the octets between are copied,
 *   never lost); more than WALK_EVENTS events' worth is cut (counted as truncated) and
 *   the walk stops.
 * - A walked packet's events carry LOUPE_PLF_SKIPPED_BEFORE: the direction's octets
 *   before the event's seq that userspace has not received were elided on purpose
 *   (userspace reports them to the parser as a Skip, never as a loss), and
 *   LOUPE_PLF_PEER_WALKED when the other direction's walk is on, so octets of it that
 *   this event acknowledges and userspace never received were elided too. A walked
 *   packet whose payload is all elided sends nothing (a SYN/FIN/RST one sends its
 *   zero-length event at the end of its payload).
 * - Fail safe, never wrong: the walk of a direction stops for good (the direction is
 *   then copied as without it, within the allowance) on a packet with payload that
 *   starts past where the last one ended (a hole: its frames are unknown), a length that
 *   does not fit, or an unknown state. A packet that starts before (a retransmission) is
 *   walked from where the last one ended; one wholly before is skipped. A packet without
 *   payload never moves or stops the walk (a FIN takes a sequence number, so the ACK
 *   after it starts one past the walk's place; a pure ACK may overtake reordered data):
 *   it is sent as without a walk.
 * - A full ring buffer does not stop the walk: frame boundaries come from the packets,
 *   not from what userspace got, so the walk goes on, and stopping would copy the rest
 *   of the connection under the allowance, the opposite of what a reader that is behind
 *   needs. A refused walked event is counted as gap (the flow's l7 gap octets, as in
 *   send_payload) and marks the direction lost; the next of its events that the ring
 *   takes carries LOUPE_PLF_LOST_BEFORE, and userspace turns the octets before it that
 *   it lacks into a Gap (a counted loss: the parser resyncs if its protocol allows, or
 *   ends), not a Skip. Meanwhile the other side's events do not carry
 *   LOUPE_PLF_PEER_WALKED, which would claim this side's missing octets were elided. A direction's packets are walked without a lock: a TCP sender emits them
 *   one at a time, and a packet out of that order stops the walk rather than corrupting
 *   it.
 * - Walked copies are not bounded by the allowance: they are the headers the parser
 *   needs, bounded per packet by WALK_EVENTS events.
 *
 * This file holds the walk's ABI, maps and limits; its code is the "frame walk" section
 * of flow.c (bcc rewrites map calls only in the file it compiles). struct
 * loupe_frame_cfg and struct loupe_walk_state are mirrored in sensor/kernel/frames.py;
 * sizes are asserted on both sides.
 */
#ifndef LOUPE_FRAMES_H
#define LOUPE_FRAMES_H

/* Walkable protocols at once (frame_cfg entries). */
#define LOUPE_FRAME_PROTOS 4
/* Header octets a protocol's frame may have (HTTP/2: 9, PostgreSQL: 5). */
#define LOUPE_FRAME_HDR_MAX 16
/* frame_cfg.start[]: that side is not walked. */
#define LOUPE_FRAME_NOT_WALKED 0xffff

/* One walkable protocol (userspace writes it at load; a zero mask is an unused slot). */
struct loupe_frame_cfg {
	__u64 match;           /* client's first eight payload octets, big-endian, ... */
	__u64 mask;            /* ... masked with this, equal match (mask 0: unused slot) */
	__u64 server_match;    /* the same for a server that speaks first (an HTTP/2 server */
	__u64 server_mask;     /* may send its SETTINGS at once); mask 0: not armed so */
	__u64 elide[4];        /* bit t of the 256: frames of type t are elided */
	__s32 len_adj;         /* frame octets = hdr_len + length field + len_adj */
	__u16 start[2];        /* by LOUPE_PL_TO_*: octets of the side's first payload before
	                          its first frame (HTTP/2 client: the 24-octet preface), or
	                          LOUPE_FRAME_NOT_WALKED */
	__u8  hdr_len;         /* 1..LOUPE_FRAME_HDR_MAX */
	__u8  len_off;         /* big-endian length field: offset in the header ... */
	__u8  len_size;        /* ... and size, 1..4 */
	__u8  type_off;        /* the type octet's offset */
	__u8  flags_off;       /* the flags octet's offset (with keep/body_flags 0: unused) */
	__u8  keep_flags;      /* an elidable frame with one of these is copied whole */
	__u8  body_flags;      /* ... with one of these, only its payload is elided */
	__u8  keep_type;       /* elided frames of this type keep their header and ... */
	__u8  keep_octets;     /* ... this many payload octets (gRPC's message prefix, so
	                          message counts stay exact); 0: none */
	__u8  pad[7];
};
#define LOUPE_FRAME_CFG_SIZE 88

/* Why a direction's walk went off (loupe_walk_dir.stopped), for diagnostics and tests. */
#define LOUPE_WALK_STOP_CFG     1   /* the protocol's frame_cfg entry is not usable */
#define LOUPE_WALK_STOP_OPENING 2   /* the client did not open as the server's protocol */
#define LOUPE_WALK_STOP_LATE    3   /* the side had sent payload before its walk began */
#define LOUPE_WALK_STOP_HOLE    4   /* a packet started past where the last one ended */
#define LOUPE_WALK_STOP_TAIL    5   /* loupe_walk could not be tail-called */
#define LOUPE_WALK_STOP_RING    6   /* retired: a full ring no longer stops a walk */
#define LOUPE_WALK_STOP_CUT     7   /* a packet needed more than WALK_EVENTS events */
#define LOUPE_WALK_STOP_FRAME   8   /* a length that does not fit, or too many frames */
#define LOUPE_WALK_STOP_UNTAKEN 9   /* userspace stopped the flow: account() no longer
                                       takes its packets for the walk */

/* Walk state of one direction (the kernel writes it). */
#define LOUPE_WALK_OFF   0     /* not walked: copied as without a walk */
#define LOUPE_WALK_FIRST 1     /* walked from its first payload octet (server side) */
#define LOUPE_WALK_ON    2
#define LOUPE_WALK_CLIENT 3    /* the server spoke first and was armed: the client is
                                  walked if its first payload opens as the protocol's */

struct loupe_walk_dir {
	__u32 next;            /* seq where the direction's next packet starts */
	__u32 frame_end;       /* seq of the next frame header */
	__u8  state;           /* LOUPE_WALK_* */
	__u8  have;            /* octets of a header split across packets, held in hdr */
	__u8  elide_cur;       /* the current frame's payload is elided */
	__u8  stopped;         /* why it is off: LOUPE_WALK_STOP_* (0: never walked) */
	__u32 keep_end;        /* seq up to which the current frame's payload is kept */
	__u8  hdr[LOUPE_FRAME_HDR_MAX];
	__u8  lost;            /* the ring buffer refused one of its walked events and no
	                          later one told userspace yet (LOUPE_PLF_LOST_BEFORE) */
	__u8  pad[3];
};

/* frame_walk value: one per walked flow, by LOUPE_PL_TO_*. */
struct loupe_walk_state {
	__u32 proto;           /* frame_cfg index */
	__u32 pad;
	struct loupe_walk_dir dir[2];
};
#define LOUPE_WALK_STATE_SIZE 80

/* Payload event flags (loupe_payload_event.flags). */
#define LOUPE_PLF_SKIPPED_BEFORE 0x01  /* octets before seq not received were elided */
#define LOUPE_PLF_PEER_WALKED    0x02  /* ... and the other side's, below ack */
#define LOUPE_PLF_CUT            0x04  /* the packet's octets after this chunk were not
                                          copied (truncated): the walk stopped here */
#define LOUPE_PLF_LOST_BEFORE    0x08  /* with SKIPPED_BEFORE: of the octets before seq
                                          that userspace has not received, some were
                                          walked copies the ring buffer refused (counted
                                          as gap): a loss, not only elisions */

_Static_assert(sizeof(struct loupe_frame_cfg) == LOUPE_FRAME_CFG_SIZE, "frame cfg size");
_Static_assert(sizeof(struct loupe_walk_state) == LOUPE_WALK_STATE_SIZE, "walk state size");

/* frame_cfg: the walkable protocols. Key: __u32 index. Value: struct loupe_frame_cfg.
 * Size: LOUPE_FRAME_PROTOS; userspace fills it at load, from the registry. */
BPF_ARRAY(frame_cfg, struct loupe_frame_cfg, LOUPE_FRAME_PROTOS);

/* frame_walk: walks of flows. Key: struct loupe_flow_key. Value: struct
 * loupe_walk_state. LRU and as large as l7_ctl: nobody deletes an ended flow's entry,
 * and an evicted live one only ends that flow's walk (a flow is armed at its first
 * payload or never, so it is then copied as without a walk). */
BPF_TABLE("lru_hash", struct loupe_flow_key, struct loupe_walk_state, frame_walk,
	  LOUPE_L7_CTL_ENTRIES);

/* A packet's plan: the ranges copied, in payload offsets. 8 ranges hold a packet with
 * 4 copied frames between elided runs; more merge into the last (copied, not lost). */
#define WALK_RANGES 8
/* Events per walked packet: LOUPE_MAX_CHUNKS full chunks plus one partial per range. */
#define WALK_EVENTS (LOUPE_MAX_CHUNKS + WALK_RANGES)

/* Header reads per loupe_walk run, and runs per packet (tail calls: the kernel allows
 * 33 per packet, the meter's own take 2). A step takes one frame (or the rest of one),
 * so a packet may hold WALK_STEPS * (WALK_HOPS + 1) frames; past that the walk stops
 * and the rest of the packet is copied as it is. */
#ifndef WALK_STEPS
#define WALK_STEPS 256
#endif
#ifndef WALK_HOPS
#define WALK_HOPS 28
#endif
/* Slot of walk_tails: loupe_walk (userspace puts it there at load). */
#define LOUPE_TAIL_WALK 0

/* walk_scratch: one packet's walk on this CPU (not ABI); a tail call stays on its CPU.
 * Key: __u32 0, per CPU. The loop's place lives here, not in registers, so that the
 * verifier's states of the loop converge. */
struct loupe_walk {
	__u64 fp;              /* the flow entry's key_fp when planned */
	__u64 inc;             /* its incarnation (account) */
	__u64 copied, skipped, truncated;   /* the packet's l7[] octets */
	__u64 elide[4];        /* the protocol's layout, copied from frame_cfg */
	__s32 len_adj;
	__u32 seq, pl, payload_off;
	__u32 pos;             /* the loop's place in the payload */
	__u32 frame_end;       /* seq of the next frame header */
	__u32 keep_end;        /* seq up to which the current frame's payload is kept */
	__u32 bad_at;          /* where a frame the walk cannot follow starts */
	__u32 ranges;
	__u32 events, end;     /* walk_finish's running sums */
	__u32 at_r, at_done;   /* walk_send's place: range, octets of it sent */
	__u32 off[WALK_RANGES];
	__u32 len[WALK_RANGES];
	__u8  hdr_len, len_off, len_size, type_off, flags_off, keep_flags, body_flags;
	__u8  keep_type, keep_octets;
	__u8  have, elide_cur, bad;
	__u8  planned;         /* walk_prepare planned this packet */
	__u8  send;            /* account() took it: loupe_walk walks, counts and sends it */
	__u8  sel, to, control, evflags, cut, hops;
	__u8  peer_flags;      /* LOUPE_PLF_PEER_WALKED for any event of this packet */
	__u8  lost;            /* walk_send: a refused event is still to be told */
	__u8  hb[2 * LOUPE_FRAME_HDR_MAX];  /* the header being read (twice the size: the
	                                       verifier's bound on a load at an offset) */
	struct loupe_walk_state arm;        /* a new walk's state, before frame_walk has it */
};
BPF_PERCPU_ARRAY(walk_scratch, struct loupe_walk, 1);

/* walk_tails: loupe_walk, for loupe_tc and for itself. Key: __u32 LOUPE_TAIL_WALK.
 * Value: a program fd (userspace, at load). Size: 1. Empty, no flow is walked: the
 * packet's payload is then counted as truncated and its walk stops. */
BPF_PROG_ARRAY(walk_tails, 1);

#endif /* LOUPE_FRAMES_H */
