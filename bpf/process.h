/* process.h: the kernel <-> userspace ABI of Loupe's process attribution program
 * (bpf/process.c). Separate from loupe.h on purpose: the flow meter and this program
 * are different objects, loaded and versioned apart.
 *
 * sensor/enrich/process.py mirrors struct loupe_proc_event with ctypes and checks its
 * size (LOUPE_PROC_EVENT_SIZE) against the one asserted here, and
 * sensor/kernel/tracepoints.py checks the sizes bcc derived for the maps.
 *
 * Layout rules as in loupe.h: fixed-width types, padding spelled out, ports in host
 * order, addresses in network order (IPv4 in the first 4 bytes, the rest zero).
 */
#ifndef LOUPE_PROCESS_H
#define LOUPE_PROCESS_H

#include <linux/types.h>

/* ---- limits; each may be overridden with -D by sensor/kernel/tracepoints.py ------- */

/* Sockets between connect() (TCP_SYN_SENT) and the end of the handshake at once. An
 * entry lives for one round trip (or the SYN retry time, ~2 min at most, for a peer
 * that never answers); 16384 covers a host opening thousands of connections per
 * second to slow peers. A plain hash, not an LRU: a full map refuses the insert and
 * the program counts it (LOUPE_PROC_CNT_PENDING_FULL) instead of silently evicting a
 * connect in progress. Every entry is deleted when its socket leaves SYN_SENT. */
#ifndef LOUPE_PROC_PENDING_SIZE
#define LOUPE_PROC_PENDING_SIZE 16384
#endif

/* Ring buffer size in pages (power of two). Events are 112 bytes; 64 pages (256 KiB)
 * hold ~2300, i.e. a burst of 2300 connections between two drains of the reader, which
 * wakes on every event. When full, the event is counted (LOUPE_PROC_CNT_RINGBUF_FULL). */
#ifndef LOUPE_PROC_RINGBUF_PAGES
#define LOUPE_PROC_RINGBUF_PAGES 64
#endif

/* ---- events ----------------------------------------------------------------------- */

/* kind: what the event says about a socket. */
#define LOUPE_PROC_CONNECT      1  /* active open left SYN_SENT; task = the connect()er */
#define LOUPE_PROC_ACCEPT       2  /* passive open reached ESTABLISHED; no task (softirq) */
#define LOUPE_PROC_LISTEN       3  /* listen(); task = the listener's owner */
#define LOUPE_PROC_LISTEN_CLOSE 4  /* a listening socket closed; no task */

/* flags */
#define LOUPE_PROC_HAS_TASK 0x01   /* pid..comm describe the owning task */

/* The task fields are filled only with LOUPE_PROC_HAS_TASK. For CONNECT they were taken
 * in the connect() call (the task that owns the socket) and carried to the end of the
 * handshake, where the ports and addresses are final: the source port is chosen after
 * the state becomes SYN_SENT, and the handshake ends in softirq context, where the
 * current task is whoever happened to be running. */
struct loupe_proc_event {
	__u64 ts_ns;           /* bpf_ktime_get_ns() at the event */
	__u64 task_ts_ns;      /* when the task fields were taken */
	__u64 sock_cookie;     /* the tracepoint's skaddr: an opaque id, never dereferenced */
	__u64 cgroup_id;       /* cgroup v2 id (inode of the cgroup directory) */
	__u32 pid;             /* thread group id, what ps calls the pid */
	__u32 tid;
	__u32 uid;
	__u32 gid;
	__u8  saddr[16];       /* local address */
	__u8  daddr[16];       /* remote address */
	__u16 sport;           /* local port, host order */
	__u16 dport;           /* remote port, host order */
	__u16 family;          /* AF_INET (2) or AF_INET6 (10) */
	__u8  protocol;        /* IPPROTO_TCP */
	__u8  kind;            /* LOUPE_PROC_* */
	__u8  oldstate;        /* TCP_* of the transition */
	__u8  newstate;
	__u8  flags;           /* LOUPE_PROC_HAS_TASK */
	__u8  pad[5];
	char  comm[16];        /* TASK_COMM_LEN */
};
#define LOUPE_PROC_EVENT_SIZE 112

/* What the program remembers of a connect() until the handshake ends. */
struct loupe_proc_task {
	__u64 ts_ns;
	__u64 cgroup_id;
	__u32 pid;
	__u32 tid;
	__u32 uid;
	__u32 gid;
	char  comm[16];
};
#define LOUPE_PROC_TASK_SIZE 48

/* ---- counters --------------------------------------------------------------------- */

/* Indices of the per-CPU counter array; sensor/enrich/process.py names them in this
 * order. Never reset; userspace sums the CPUs. */
enum loupe_proc_counter {
	LOUPE_PROC_CNT_CALLS = 0,       /* tracepoint hits (every TCP/SCTP/MPTCP transition) */
	LOUPE_PROC_CNT_EVENTS,          /* events sent */
	LOUPE_PROC_CNT_RINGBUF_FULL,    /* an event found the ring buffer full: lost */
	LOUPE_PROC_CNT_PENDING_FULL,    /* a connect() found no room in proc_pending: lost */
	LOUPE_PROC_CNT_CONNECT_UNSEEN,  /* a socket left SYN_SENT with no entry (connect()
	                                 * before the program was loaded, or pending full) */
	LOUPE_PROC_CNT_MAX
};

#endif /* LOUPE_PROCESS_H */
