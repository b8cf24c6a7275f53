/* process.c: which local process owns a TCP connection, from the
 * sock:inet_sock_set_state tracepoint.
 *
 * Strategy
 * - Only the tracepoint's arguments are read (states, ports, addresses, family,
 *   protocol, and skaddr used as an opaque socket id, never dereferenced) plus the
 *   current task's pid/uid/comm/cgroup id through helpers; no kernel struct, so one
 *   build runs on any kernel >= 5.8 (ring buffer).
 * - Active open (connect): the transition to TCP_SYN_SENT runs inside connect(), in
 *   the task that owns the socket; that is the one moment the owner is exact. The
 *   source port is not chosen yet at that point (tcp_v4_connect sets the state before
 *   inet_hash_connect picks the port), and the handshake completes in softirq context
 *   where the current task is unrelated. So the task is remembered per socket in
 *   proc_pending and sent with the final 4-tuple when the socket leaves SYN_SENT
 *   (to ESTABLISHED, or to CLOSE for a refused or failed connect).
 * - Passive open (accept): SYN_RECV -> ESTABLISHED runs in softirq, so no task is
 *   trustworthy; the event carries only the 4-tuple. Userspace attributes it to the
 *   owner of the listening socket: a LISTEN event (listen() runs in the owner's
 *   context, so it carries that task) or, for listeners older than this program, the
 *   socket tables in /proc.
 * - The task fields survive the task: comm, pid, uid, gid and cgroup id are copied in
 *   the kernel at connect()/listen() time, so a process that exits right after sending
 *   is still attributed (userspace adds what only /proc has, as early as it can).
 * - Every event that cannot be sent, and every connect whose task was not recorded, is
 *   counted (process.h, enum loupe_proc_counter).
 */
#include <uapi/linux/bpf.h>

#include "process.h"

_Static_assert(sizeof(struct loupe_proc_event) == LOUPE_PROC_EVENT_SIZE, "event size");
_Static_assert(sizeof(struct loupe_proc_task) == LOUPE_PROC_TASK_SIZE, "task size");

/* TCP states as the tracepoint reports them (include/net/tcp_states.h, stable ABI of
 * the tracepoint's print format). */
#define TCP_ESTABLISHED_ 1
#define TCP_SYN_SENT_    2
#define TCP_SYN_RECV_    3
#define TCP_CLOSE_       7
#define TCP_LISTEN_      10

#define AF_INET_  2
#define AF_INET6_ 10
#define IPPROTO_TCP_ 6

/* ---- maps (bcc syntax; sensor/kernel/tracepoints.py looks them up by name) -------- */

/* proc_pending: the task that called connect(), until its socket leaves SYN_SENT.
 * Key: skaddr as __u64. Value: struct loupe_proc_task.
 * Size: LOUPE_PROC_PENDING_SIZE (why, and why not an LRU: see process.h). */
BPF_TABLE("hash", __u64, struct loupe_proc_task, proc_pending, LOUPE_PROC_PENDING_SIZE);

/* proc_events: struct loupe_proc_event to userspace.
 * Size: LOUPE_PROC_RINGBUF_PAGES pages (why: see process.h). */
BPF_RINGBUF_OUTPUT(proc_events, LOUPE_PROC_RINGBUF_PAGES);

/* proc_counters: one slot per enum loupe_proc_counter.
 * Key: __u32 index. Value: __u64 per CPU (no atomics on the hot path). */
BPF_PERCPU_ARRAY(proc_counters, __u64, LOUPE_PROC_CNT_MAX);

static __always_inline void count(__u32 idx)
{
	__u64 *v = proc_counters.lookup(&idx);
	if (v)
		(*v)++;
}

static __always_inline void take_task(struct loupe_proc_task *t)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u64 uid_gid = bpf_get_current_uid_gid();

	t->ts_ns = bpf_ktime_get_ns();
	t->cgroup_id = bpf_get_current_cgroup_id();
	t->pid = pid_tgid >> 32;
	t->tid = (__u32)pid_tgid;
	t->uid = (__u32)uid_gid;
	t->gid = uid_gid >> 32;
	bpf_get_current_comm(t->comm, sizeof(t->comm));
}

/* Sends ev (its socket fields already set by the probe) with the task, if any. The
 * event is built on the stack and copied: the probe's argument struct is only known
 * inside TRACEPOINT_PROBE, where bcc generates it from the format file. */
static __always_inline int emit(struct loupe_proc_event *ev, __u8 kind,
				const struct loupe_proc_task *task)
{
	ev->ts_ns = bpf_ktime_get_ns();
	ev->kind = kind;
	if (task) {
		ev->flags = LOUPE_PROC_HAS_TASK;
		ev->task_ts_ns = task->ts_ns;
		ev->cgroup_id = task->cgroup_id;
		ev->pid = task->pid;
		ev->tid = task->tid;
		ev->uid = task->uid;
		ev->gid = task->gid;
		__builtin_memcpy(ev->comm, task->comm, sizeof(ev->comm));
	}
	if (proc_events.ringbuf_output(ev, sizeof(*ev), 0) != 0) {
		count(LOUPE_PROC_CNT_RINGBUF_FULL);
		return 0;
	}
	count(LOUPE_PROC_CNT_EVENTS);
	return 0;
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
	count(LOUPE_PROC_CNT_CALLS);
	/* SCTP has no ports in flow records, and an MPTCP connection's packets travel in
	 * TCP subflows, which report IPPROTO_TCP themselves. */
	if (args->protocol != IPPROTO_TCP_)
		return 0;
	if (args->family != AF_INET_ && args->family != AF_INET6_)
		return 0;

	__u64 cookie = (__u64)args->skaddr;
	int oldstate = args->oldstate;
	int newstate = args->newstate;

	/* Transitions that send nothing return before the event is built. */
	int connect_start = newstate == TCP_SYN_SENT_;
	int connect_end = oldstate == TCP_SYN_SENT_;
	int accepted = oldstate == TCP_SYN_RECV_ && newstate == TCP_ESTABLISHED_;
	int listen = newstate == TCP_LISTEN_;
	/* A socket accepted from a listener is cloned from it, so its first transition
	 * is LISTEN -> SYN_RECV: only LISTEN -> CLOSE is the listener going away. */
	int listen_close = oldstate == TCP_LISTEN_ && newstate == TCP_CLOSE_;

	if (connect_start) {
		struct loupe_proc_task task = {};
		take_task(&task);
		if (proc_pending.update(&cookie, &task) != 0)
			count(LOUPE_PROC_CNT_PENDING_FULL);
		return 0;
	}
	if (!(connect_end || accepted || listen || listen_close))
		return 0;

	struct loupe_proc_event ev = {};
	ev.sock_cookie = cookie;
	ev.sport = args->sport;
	ev.dport = args->dport;
	ev.family = args->family;
	ev.protocol = (__u8)args->protocol;
	ev.oldstate = (__u8)oldstate;
	ev.newstate = (__u8)newstate;
	if (args->family == AF_INET_) {
		__builtin_memcpy(ev.saddr, args->saddr, 4);
		__builtin_memcpy(ev.daddr, args->daddr, 4);
	} else {
		__builtin_memcpy(ev.saddr, args->saddr_v6, 16);
		__builtin_memcpy(ev.daddr, args->daddr_v6, 16);
	}

	if (connect_end) {
		struct loupe_proc_task *task = proc_pending.lookup(&cookie);
		if (!task) {
			count(LOUPE_PROC_CNT_CONNECT_UNSEEN);
			return 0;
		}
		/* Copied to the stack first: the entry is deleted right after. */
		struct loupe_proc_task copy = *task;
		proc_pending.delete(&cookie);
		return emit(&ev, LOUPE_PROC_CONNECT, &copy);
	}
	if (accepted)
		return emit(&ev, LOUPE_PROC_ACCEPT, 0);
	if (listen) {
		struct loupe_proc_task task = {};
		take_task(&task);
		return emit(&ev, LOUPE_PROC_LISTEN, &task);
	}
	return emit(&ev, LOUPE_PROC_LISTEN_CLOSE, 0);
}
