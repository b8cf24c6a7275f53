/* tls_probe.c: TLS plaintext at the TLS libraries' read and write calls, by uprobes.
 *
 * Strategy
 * - The entry probe of SSL_read/SSL_write (and the _ex variants, gnutls_record_recv/
 *   send) saves the object and the caller's buffer per thread id; the return probe
 *   knows the real length (the return value, or *readbytes / *written for _ex) and copies
 *   the octets the budget allows into one ring buffer event. Userspace attaches the
 *   programs by library file (an inode covers every process mapping it, later ones too):
 *   sensor/kernel/tlsprobe.py.
 * - Only probe arguments, the caller's memory (bpf_probe_read_user), tracepoint
 *   arguments and helpers are read; never a kernel struct nor a library-private one
 *   (DESIGN.md). The socket behind an object comes from SSL_set_fd's argument or, for
 *   objects made before the sensor or on a BIO of their own (curl, openssl s_server,
 *   GnuTLS), from the fd of the read/write-family syscall the call makes on the same
 *   thread (syscalls:sys_enter_* tracepoints). The fd's 4-tuple is taken here when
 *   the kernel saw the fd connect() (inet_sock_set_state in the connecting thread) or
 *   accept() it (the passive open's tracepoint, found by the peer accept() returns):
 *   a short connection can be closed before userspace reads its chunks. Other fds
 *   userspace turns into a 5-tuple through /proc.
 * - Budget and skip are the wire contract (loupe.h, loupe_l7_ctl) on stream offsets the
 *   kernel counts per object and direction: octets below tls_ctl.skip_until are not
 *   copied, nor those beyond budget + grant, nor any after LOUPE_CTL_DONE.
 * - Selection by process name and cgroup is decided here, at the entry; by port it needs
 *   the 5-tuple, so userspace stops unselected objects with LOUPE_CTL_DONE.
 * - Every loss is counted (loupe.h, enum loupe_tls_counter).
 * - Go's crypto/tls (amd64, register ABI of Go >= 1.17) is probed in each Go binary at
 *   (*Conn).Read/Write's entry and at each of their RET instructions (found by
 *   disassembly in userspace): a uretprobe rewrites the return address on the stack,
 *   which Go moves when it grows a goroutine's stack. A call is keyed by its goroutine
 *   (R14 holds the g), not the thread: a goroutine blocked in Read may resume on another
 *   thread.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/ptrace.h>

#include "loupe.h"

_Static_assert(sizeof(struct loupe_tls_conn_key) == LOUPE_TLS_CONN_KEY_SIZE, "key size");
_Static_assert(sizeof(struct loupe_tls_call) == LOUPE_TLS_CALL_SIZE, "call size");
_Static_assert(sizeof(struct loupe_tls_conn) == LOUPE_TLS_CONN_SIZE, "conn size");
_Static_assert(sizeof(struct loupe_tls_ctl) == LOUPE_TLS_CTL_SIZE, "ctl size");
_Static_assert(sizeof(struct loupe_tls_config) == LOUPE_TLS_CONFIG_SIZE, "config size");
_Static_assert(sizeof(struct loupe_tls_event) == LOUPE_TLS_EVENT_SIZE, "event size");

/* ---- maps (bcc syntax; sensor/kernel/tlsprobe.py looks them up by name) ----------- */

/* tls_calls: a call between entry and return. Key: thread id (pid_tgid). Value: struct
 * loupe_tls_call. Size: LOUPE_TLS_CALLS. A plain hash: a full map refuses the entry and
 * the call is counted (LOUPE_TLS_CNT_CALLS_FULL); the return deletes it. */
BPF_TABLE("hash", __u64, struct loupe_tls_call, tls_calls, LOUPE_TLS_CALLS);

/* tls_conns: offsets, accounting and fd per object. Key: struct loupe_tls_conn_key.
 * Value: struct loupe_tls_conn. Size: LOUPE_TLS_CONNS. LRU (why: see loupe.h). */
BPF_TABLE("lru_hash", struct loupe_tls_conn_key, struct loupe_tls_conn, tls_conns,
	  LOUPE_TLS_CONNS);

/* tls_ctl: userspace's grant / skip / stop per object. Key: struct loupe_tls_conn_key.
 * Value: struct loupe_tls_ctl. Size: LOUPE_TLS_CONNS. A plain hash written by userspace
 * only (a refused write is counted there); SSL_free deletes an object's entry so a new
 * object at the same address starts clean. */
BPF_TABLE("hash", struct loupe_tls_conn_key, struct loupe_tls_ctl, tls_ctl, LOUPE_TLS_CONNS);

/* tls_config: Key: __u32 0. Value: struct loupe_tls_config. Size: 1. */
BPF_ARRAY(tls_config, struct loupe_tls_config, 1);

/* tls_sel_comm / tls_sel_cgroup: the selection lists. Key: comm (16 bytes, zero
 * padded) or cgroup id. Value: __u8 1. Size: LOUPE_TLS_SEL_ENTRIES. */
struct loupe_tls_comm { char comm[16]; };
BPF_TABLE("hash", struct loupe_tls_comm, __u8, tls_sel_comm, LOUPE_TLS_SEL_ENTRIES);
BPF_TABLE("hash", __u64, __u8, tls_sel_cgroup, LOUPE_TLS_SEL_ENTRIES);

/* tls_connecting: the fd a thread is connect()ing. Key: thread id. Value: __s32 fd.
 * tls_sk_fd: a socket in SYN_SENT -> its process and fd. Key: skaddr (opaque, never
 * dereferenced). Value: struct loupe_tls_fd_key.
 * tls_fd_sock: a connected fd -> its 4-tuple. Key: struct loupe_tls_fd_key. Value: struct
 * loupe_tls_sock. LRU, LOUPE_TLS_CONNS each: connections a host opens between two reads
 * of a short one's chunks; older ones have been resolved or are gone. */
BPF_TABLE("lru_hash", __u64, __s32, tls_connecting, LOUPE_TLS_CALLS);
BPF_TABLE("lru_hash", __u64, struct loupe_tls_fd_key, tls_sk_fd, LOUPE_TLS_CALLS);
BPF_TABLE("lru_hash", struct loupe_tls_fd_key, struct loupe_tls_sock, tls_fd_sock,
	  LOUPE_TLS_CONNS);

/* tls_passive: an accept()able connection, just ESTABLISHED (softirq: no process yet) ->
 * its 4-tuple. Key: struct loupe_tls_peer, the peer's address and port, which accept()
 * hands the process; sys_exit_accept moves the entry to tls_fd_sock under the new fd.
 * So a server's socket is known in the kernel the moment it is accepted: a short
 * connection may be closed before userspace reads its first chunk, and then /proc has
 * nothing left to show (its fd and its line in /proc/PID/net/tcp are gone).
 * tls_accepting: the sockaddr buffer a thread passed to accept(). Key: thread id.
 * LRU, LOUPE_TLS_CONNS / LOUPE_TLS_CALLS: connections not accepted (or by a process
 * that passes no sockaddr: its fd is left to /proc) age out. A passive open that
 * accept() can return before it is ESTABLISHED (TCP Fast Open) is left to /proc too. */
struct loupe_tls_peer {
	__u8  addr[16];        /* network order; IPv4 in the first 4 bytes */
	__u16 port;            /* host order */
	__u16 family;
};
BPF_TABLE("lru_hash", struct loupe_tls_peer, struct loupe_tls_sock, tls_passive,
	  LOUPE_TLS_CONNS);
BPF_TABLE("lru_hash", __u64, __u64, tls_accepting, LOUPE_TLS_CALLS);

/* Go: a call between its entry and a RET, per goroutine. Key: struct loupe_tls_conn_key
 * with the g's address for ssl. Value: struct loupe_tls_go_call. LRU: a call that
 * panics never reaches a RET, and its entry must not pin a slot.
 * tls_go_thread: the Go call a thread entered last, for the syscall tracepoints to give
 * it the fd (the goroutine makes its first read/write on the thread it entered on).
 * Key: thread id. Value: struct loupe_tls_go_thread; the stamp tells a stale entry (the
 * goroutine returned on another thread and called again) from the current call.
 * Both kernel-internal: userspace never reads them. */
struct loupe_tls_go_call {
	struct loupe_tls_call call;
	__u64 stamp;           /* bpf_ktime_get_ns() at the entry */
	__u64 end;             /* Write: the stream offset past its octets (sent at entry) */
};
struct loupe_tls_go_thread {
	__u64 g;
	__u64 stamp;
};
BPF_TABLE("lru_hash", struct loupe_tls_conn_key, struct loupe_tls_go_call, tls_go_calls,
	  LOUPE_TLS_CALLS);
BPF_TABLE("lru_hash", __u64, struct loupe_tls_go_thread, tls_go_thread, LOUPE_TLS_CALLS);

/* tls_events: struct loupe_tls_event + cap_len octets. LOUPE_TLS_RINGBUF_PAGES pages. */
BPF_RINGBUF_OUTPUT(tls_events, LOUPE_TLS_RINGBUF_PAGES);

/* tls_scratch: where an event is assembled (a reservation must have a constant size;
 * bpf_ringbuf_output copies only header + cap_len). Per CPU: a program run does not
 * migrate, and tracing programs do not nest on one CPU. Size: 1. */
struct loupe_tls_scratch {
	struct loupe_tls_event ev;
	__u8 data[LOUPE_TLS_CHUNK];
};
BPF_PERCPU_ARRAY(tls_scratch, struct loupe_tls_scratch, 1);

/* tls_counters: one slot per enum loupe_tls_counter, per CPU. */
BPF_PERCPU_ARRAY(tls_counters, __u64, LOUPE_TLS_CNT_MAX);

static __always_inline void count(__u32 idx, __u64 n)
{
	__u64 *v = tls_counters.lookup(&idx);
	if (v)
		*v += n;
}

/* The fd's 4-tuple, when the kernel saw it connect, into the event. */
static __always_inline void take_sock(struct loupe_tls_event *ev, __u32 tgid, __s32 fd)
{
	struct loupe_tls_fd_key key = {.tgid = tgid, .fd = fd};
	struct loupe_tls_sock *sock = fd >= 0 ? tls_fd_sock.lookup(&key) : 0;
	if (sock) {
		ev->sock = *sock;
		ev->flags = LOUPE_TLS_EV_SOCK;
	} else {
		__builtin_memset(&ev->sock, 0, sizeof(ev->sock));
		ev->flags = 0;
	}
}

/* ---- entry -------------------------------------------------------------------------- */

static __always_inline int selected(const struct loupe_tls_config *cfg)
{
	if (cfg->flags & LOUPE_TLS_SEL_COMM) {
		struct loupe_tls_comm c = {};
		bpf_get_current_comm(c.comm, sizeof(c.comm));
		if (!tls_sel_comm.lookup(&c))
			return 0;
	}
	if (cfg->flags & LOUPE_TLS_SEL_CGROUP) {
		__u64 id = bpf_get_current_cgroup_id();
		if (!tls_sel_cgroup.lookup(&id))
			return 0;
	}
	return 1;
}

static __always_inline int enter(__u64 ssl, __u64 buf, __u64 len_ptr, __u8 dir, __u8 lib)
{
	__u32 zero = 0;
	struct loupe_tls_config *cfg = tls_config.lookup(&zero);
	if (!cfg || !cfg->enabled)
		return 0;
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	struct loupe_tls_conn_key key = {.ssl = ssl, .tgid = pid_tgid >> 32};
	struct loupe_tls_ctl *ctl = tls_ctl.lookup(&key);
	if (ctl && (ctl->flags & LOUPE_CTL_DONE))
		return 0;   /* stopped: the return finds no entry and costs a lookup */
	if (!selected(cfg)) {
		count(LOUPE_TLS_CNT_NOT_SELECTED, 1);
		return 0;
	}
	struct loupe_tls_call call = {.ssl = ssl, .buf = buf, .len_ptr = len_ptr, .fd = -1,
				      .dir = dir, .lib = lib};
	if (tls_calls.update(&pid_tgid, &call) != 0)
		count(LOUPE_TLS_CNT_CALLS_FULL, 1);
	return 0;
}

/* int SSL_read(SSL *ssl, void *buf, int num), SSL_write alike;
 * int SSL_read_ex(SSL *ssl, void *buf, size_t num, size_t *readbytes), _write_ex alike;
 * ssize_t gnutls_record_recv(gnutls_session_t s, void *data, size_t size), send alike. */
int tls_enter_read(struct pt_regs *ctx)
{
	return enter(PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), 0, LOUPE_TLS_READ,
		     LOUPE_TLS_LIB_OPENSSL);
}

int tls_enter_write(struct pt_regs *ctx)
{
	return enter(PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), 0, LOUPE_TLS_WRITE,
		     LOUPE_TLS_LIB_OPENSSL);
}

int tls_enter_read_ex(struct pt_regs *ctx)
{
	return enter(PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), PT_REGS_PARM4(ctx),
		     LOUPE_TLS_READ, LOUPE_TLS_LIB_OPENSSL);
}

int tls_enter_write_ex(struct pt_regs *ctx)
{
	return enter(PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), PT_REGS_PARM4(ctx),
		     LOUPE_TLS_WRITE, LOUPE_TLS_LIB_OPENSSL);
}

int tls_enter_gnutls_recv(struct pt_regs *ctx)
{
	return enter(PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), 0, LOUPE_TLS_READ,
		     LOUPE_TLS_LIB_GNUTLS);
}

int tls_enter_gnutls_send(struct pt_regs *ctx)
{
	return enter(PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), 0, LOUPE_TLS_WRITE,
		     LOUPE_TLS_LIB_GNUTLS);
}

/* ---- return ------------------------------------------------------------------------- */

/* An event without data: the stream of (key, d) is at offset (LOUPE_TLS_EV_PROGRESS). */
static __always_inline void mark(const struct loupe_tls_conn_key *key,
				 const struct loupe_tls_conn *conn, __u32 d, __u64 offset,
				 __u8 lib, __u64 pid_tgid)
{
	__u32 zero = 0;
	struct loupe_tls_scratch *s = tls_scratch.lookup(&zero);
	if (!s)
		return;
	struct loupe_tls_event *ev = &s->ev;
	ev->ts_ns = bpf_ktime_get_ns();
	ev->ssl = key->ssl;
	ev->offset = offset;
	ev->cgroup_id = bpf_get_current_cgroup_id();
	ev->tgid = key->tgid;
	ev->tid = (__u32)pid_tgid;
	ev->fd = conn->fd;
	ev->len = 0;
	ev->cap_len = 0;
	ev->dir = d;
	ev->lib = lib;
	ev->fd_src = conn->fd_src;
	__builtin_memset(ev->pad, 0, sizeof(ev->pad));
	bpf_get_current_comm(ev->comm, sizeof(ev->comm));
	take_sock(ev, key->tgid, conn->fd);
	ev->flags |= LOUPE_TLS_EV_PROGRESS;
	if (tls_events.ringbuf_output(ev, sizeof(*ev), 0) != 0)
		count(LOUPE_TLS_CNT_RINGBUF_FULL, 1);
}

/* n octets of a call at call.buf: the stream's offsets move on, and what the budget and
 * skip allow is copied into one event. */
static __always_inline int deliver(struct loupe_tls_call call, __u64 n, __u64 pid_tgid)
{
	if (n == 0 || n > 0x7fffffff)
		return 0;
	count(LOUPE_TLS_CNT_CALLS, 1);

	struct loupe_tls_conn_key key = {.ssl = call.ssl, .tgid = pid_tgid >> 32};
	struct loupe_tls_conn *conn = tls_conns.lookup(&key);
	if (!conn) {
		struct loupe_tls_conn fresh = {.fd = -1};
		tls_conns.update(&key, &fresh);
		conn = tls_conns.lookup(&key);
		if (!conn)
			return 0;
	}
	if (call.fd >= 0 && conn->fd_src != LOUPE_TLS_FD_SET_FD) {
		conn->fd = call.fd;
		conn->fd_src = LOUPE_TLS_FD_SYSCALL;
	}
	__u32 d = call.dir & 1;
	__u64 off = conn->offset[d];
	conn->offset[d] = off + n;

	__u32 zero = 0;
	struct loupe_tls_config *cfg = tls_config.lookup(&zero);
	if (!cfg)
		return 0;
	struct loupe_tls_ctl *ctl = tls_ctl.lookup(&key);
	__u64 start = 0;
	__u64 allowed = cfg->budget[d];
	if (ctl) {
		if (ctl->flags & LOUPE_CTL_DONE) {
			conn->skipped[d] += n;
			count(LOUPE_TLS_CNT_SKIPPED, n);
			return 0;
		}
		allowed += ctl->grant[d];
		__u64 until = ctl->skip_until[d];
		if (until > off) {
			start = until - off;
			if (start > n)
				start = n;
			conn->skipped[d] += start;
			count(LOUPE_TLS_CNT_SKIPPED, start);
		}
	}
	__u64 rest = n - start;
	if (rest == 0) {
		if (ctl && off + n >= ctl->skip_until[d])
			mark(&key, conn, d, off + n, call.lib, pid_tgid);
		return 0;
	}
	__u64 room = allowed > conn->copied[d] ? allowed - conn->copied[d] : 0;
	__u64 copy = rest < room ? rest : room;
	if (copy > LOUPE_TLS_CHUNK)
		copy = LOUPE_TLS_CHUNK;
	if (rest > copy) {
		conn->truncated[d] += rest - copy;
		count(LOUPE_TLS_CNT_TRUNCATED, rest - copy);
	}
	struct loupe_tls_scratch *s = tls_scratch.lookup(&zero);
	if (!s)
		return 0;
	/* The verifier needs the size bounded at the call itself. With nothing to copy
	 * (the budget is used up) the event still goes, without data: userspace learns the
	 * stream moved on and grants more (it grants only as events arrive), and the
	 * parser hears of the truncation where it happened. */
	__u32 sz = copy;
	sz &= LOUPE_TLS_CHUNK * 2 - 1;
	if (sz > LOUPE_TLS_CHUNK)
		return 0;
	if (sz && bpf_probe_read_user(s->data, sz, (void *)(call.buf + start)) != 0) {
		count(LOUPE_TLS_CNT_READ_FAILED, 1);
		return 0;
	}
	struct loupe_tls_event *ev = &s->ev;
	ev->ts_ns = bpf_ktime_get_ns();
	ev->ssl = call.ssl;
	ev->offset = off + start;
	ev->cgroup_id = bpf_get_current_cgroup_id();
	ev->tgid = pid_tgid >> 32;
	ev->tid = (__u32)pid_tgid;
	ev->fd = conn->fd;
	ev->len = rest;
	ev->cap_len = sz;
	ev->dir = d;
	ev->lib = call.lib;
	ev->fd_src = conn->fd_src;
	__builtin_memset(ev->pad, 0, sizeof(ev->pad));
	take_sock(ev, ev->tgid, ev->fd);   /* sets flags */
	bpf_get_current_comm(ev->comm, sizeof(ev->comm));
	conn->copied[d] += sz;
	if (tls_events.ringbuf_output(s, sizeof(struct loupe_tls_event) + sz, 0) != 0) {
		count(LOUPE_TLS_CNT_RINGBUF_FULL, 1);
		count(LOUPE_TLS_CNT_RINGBUF_OCTETS, sz);
		return 0;
	}
	count(LOUPE_TLS_CNT_EVENTS, 1);
	count(LOUPE_TLS_CNT_COPIED, sz);
	return 0;
}

static __always_inline int leave_call(struct loupe_tls_call call, __s64 ret, int ex,
				      __u64 pid_tgid)
{
	__u64 n = 0;
	if (ex) {
		/* 1 on success, with the length written through the fourth argument. */
		if (ret != 1 || !call.len_ptr)
			return 0;
		if (bpf_probe_read_user(&n, sizeof(n), (void *)call.len_ptr) != 0) {
			count(LOUPE_TLS_CNT_READ_FAILED, 1);
			return 0;
		}
	} else {
		if (ret <= 0)
			return 0;   /* error, close or would-block: no octets */
		n = ret;
	}
	return deliver(call, n, pid_tgid);
}

static __always_inline int leave(__s64 ret, int ex)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	struct loupe_tls_call *saved = tls_calls.lookup(&pid_tgid);
	if (!saved)
		return 0;
	struct loupe_tls_call call = *saved;
	tls_calls.delete(&pid_tgid);
	return leave_call(call, ret, ex, pid_tgid);
}

int tls_leave(struct pt_regs *ctx)
{
	return leave((__s64)PT_REGS_RC(ctx), 0);
}

/* int return values (SSL_read/write) are sign-extended from eax. */
int tls_leave_int(struct pt_regs *ctx)
{
	return leave((__s64)(int)PT_REGS_RC(ctx), 0);
}

int tls_leave_ex(struct pt_regs *ctx)
{
	return leave((__s64)(int)PT_REGS_RC(ctx), 1);
}

/* ---- Go's crypto/tls ------------------------------------------------------------------- */

/* func (c *Conn) Read(b []byte) (n int, err error), Write alike. Go's register ABI on
 * amd64 (Go >= 1.17, internal/abi): arguments and results in RAX, RBX, RCX, ...: c in
 * RAX, b's pointer in RBX (its length in RCX); n in RAX at each RET. R14 is the current
 * goroutine (g). The entry runs again after a stack growth (morestack restarts the
 * function): the same call is saved again. */
#if defined(__x86_64__)
#define GO_ARG1(ctx) ((ctx)->ax)
#define GO_ARG2(ctx) ((ctx)->bx)
#define GO_ARG3(ctx) ((ctx)->cx)
#define GO_RET1(ctx) ((ctx)->ax)
#define GO_G(ctx)    ((ctx)->r14)
#else
#define GO_ARG1(ctx) 0
#define GO_ARG2(ctx) 0
#define GO_ARG3(ctx) 0
#define GO_RET1(ctx) 0
#define GO_G(ctx)    0
#endif

/* A goroutine's call noted for its RET (and its thread, for the syscalls' fd). */
static __always_inline int go_note(__u64 g, __u64 pid_tgid, struct loupe_tls_go_call *gc)
{
	struct loupe_tls_conn_key gk = {.ssl = g, .tgid = pid_tgid >> 32};
	if (tls_go_calls.update(&gk, gc) != 0) {
		count(LOUPE_TLS_CNT_CALLS_FULL, 1);
		return 0;
	}
	struct loupe_tls_go_thread t = {.g = g, .stamp = gc->stamp};
	tls_go_thread.update(&pid_tgid, &t);
	return 0;
}

int tls_enter_go_read(struct pt_regs *ctx)
{
	__u32 zero = 0;
	struct loupe_tls_config *cfg = tls_config.lookup(&zero);
	__u64 g = GO_G(ctx);
	if (!cfg || !cfg->enabled || !g)
		return 0;
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	struct loupe_tls_conn_key key = {.ssl = GO_ARG1(ctx), .tgid = pid_tgid >> 32};
	struct loupe_tls_ctl *ctl = tls_ctl.lookup(&key);
	if (ctl && (ctl->flags & LOUPE_CTL_DONE))
		return 0;
	if (!selected(cfg)) {
		count(LOUPE_TLS_CNT_NOT_SELECTED, 1);
		return 0;
	}
	struct loupe_tls_go_call gc = {};
	gc.call.ssl = key.ssl;
	gc.call.buf = GO_ARG2(ctx);
	gc.call.fd = -1;
	gc.call.dir = LOUPE_TLS_READ;
	gc.call.lib = LOUPE_TLS_LIB_GO;
	gc.stamp = bpf_ktime_get_ns();
	return go_note(g, pid_tgid, &gc);
}

/* Write's octets are sent at its entry, not at a RET: Go's net/http reads a connection
 * on one goroutine and writes it on another, and the response's Read can return (and
 * reach the ring buffer) before the request's Write gets to its RET, so the stream
 * would show the response first. At the entry the request has not reached the socket
 * yet: the ring's order is the order of cause and effect. Write sends all of b or
 * fails for good (crypto/tls keeps a write error), so len(b) is the call's length.
 * This probe sits past the stack check (gotls.Function.body): a stack growth restarts
 * the function at its entry, which would send the octets twice. The first Write of a
 * Conn may not know its fd yet (the handshake ran outside Read and Write): that call
 * is noted, and its RET sends a mark with the fd its syscall showed, which places the
 * chunk userspace holds until then (sensor/engine/plaintext.py). */
int tls_enter_go_write(struct pt_regs *ctx)
{
	__u32 zero = 0;
	struct loupe_tls_config *cfg = tls_config.lookup(&zero);
	__u64 g = GO_G(ctx);
	if (!cfg || !cfg->enabled || !g)
		return 0;
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	struct loupe_tls_conn_key key = {.ssl = GO_ARG1(ctx), .tgid = pid_tgid >> 32};
	struct loupe_tls_ctl *ctl = tls_ctl.lookup(&key);
	if (ctl && (ctl->flags & LOUPE_CTL_DONE))
		return 0;
	if (!selected(cfg)) {
		count(LOUPE_TLS_CNT_NOT_SELECTED, 1);
		return 0;
	}
	__u64 n = GO_ARG3(ctx);
	struct loupe_tls_conn *conn = tls_conns.lookup(&key);
	struct loupe_tls_go_call gc = {};
	gc.call.ssl = key.ssl;
	gc.call.buf = GO_ARG2(ctx);
	gc.call.fd = conn ? conn->fd : -1;
	gc.call.dir = LOUPE_TLS_WRITE;
	gc.call.lib = LOUPE_TLS_LIB_GO;
	__u64 off = conn ? conn->offset[LOUPE_TLS_WRITE] : 0;
	int known = gc.call.fd >= 0;
	deliver(gc.call, n, pid_tgid);
	if (known)
		return 0;   /* nothing for the RET to do: it finds no note */
	gc.call.fd = -1;
	gc.stamp = bpf_ktime_get_ns();
	gc.end = off + n;
	return go_note(g, pid_tgid, &gc);
}

/* At a RET of Read: n in RAX (an error with n > 0 still delivered n octets). At a RET
 * of a Write noted at its entry: the fd its syscall showed, as a mark. */
int tls_leave_go(struct pt_regs *ctx)
{
	__u64 g = GO_G(ctx);
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	struct loupe_tls_conn_key gk = {.ssl = g, .tgid = pid_tgid >> 32};
	struct loupe_tls_go_call *saved = tls_go_calls.lookup(&gk);
	if (!saved)
		return 0;
	struct loupe_tls_call call = saved->call;
	__u64 end = saved->end;
	tls_go_calls.delete(&gk);
	struct loupe_tls_go_thread *t = tls_go_thread.lookup(&pid_tgid);
	if (t && t->g == g)
		tls_go_thread.delete(&pid_tgid);
	if (call.dir == LOUPE_TLS_READ)
		return leave_call(call, (__s64)GO_RET1(ctx), 0, pid_tgid);
	if (call.fd < 0)
		return 0;   /* no syscall seen: the next Write tries again */
	struct loupe_tls_conn_key key = {.ssl = call.ssl, .tgid = pid_tgid >> 32};
	struct loupe_tls_conn *conn = tls_conns.lookup(&key);
	if (!conn)
		return 0;
	if (conn->fd < 0) {
		conn->fd = call.fd;
		conn->fd_src = LOUPE_TLS_FD_SYSCALL;
	}
	mark(&key, conn, LOUPE_TLS_WRITE, end, LOUPE_TLS_LIB_GO, pid_tgid);
	return 0;
}

/* func (c *Conn) Close() error: as SSL_free, the Conn's address may be reused. */
int tls_free_go(struct pt_regs *ctx)
{
	struct loupe_tls_conn_key key = {.ssl = GO_ARG1(ctx),
					 .tgid = bpf_get_current_pid_tgid() >> 32};
	tls_conns.delete(&key);
	tls_ctl.delete(&key);
	return 0;
}

/* ---- the object's socket and its end -------------------------------------------------- */

/* int SSL_set_fd(SSL *ssl, int fd), void gnutls_transport_set_int2(gnutls_session_t s,
 * int recv_fd, int send_fd): a (re)bound object starts a new stream. An event without
 * data (len 0) tells userspace at once, so it finds the socket in /proc during the
 * handshake, before a short connection can close it. */
int tls_set_fd(struct pt_regs *ctx)
{
	__u32 zero = 0;
	struct loupe_tls_config *cfg = tls_config.lookup(&zero);
	if (!cfg || !cfg->enabled || !selected(cfg))
		return 0;
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	struct loupe_tls_conn_key key = {.ssl = PT_REGS_PARM1(ctx), .tgid = pid_tgid >> 32};
	struct loupe_tls_conn fresh = {.fd = (__s32)PT_REGS_PARM2(ctx),
				       .fd_src = LOUPE_TLS_FD_SET_FD};
	tls_conns.update(&key, &fresh);
	tls_ctl.delete(&key);
	struct loupe_tls_event ev = {};
	ev.ts_ns = bpf_ktime_get_ns();
	ev.ssl = key.ssl;
	ev.cgroup_id = bpf_get_current_cgroup_id();
	ev.tgid = key.tgid;
	ev.tid = (__u32)pid_tgid;
	ev.fd = fresh.fd;
	ev.fd_src = LOUPE_TLS_FD_SET_FD;
	bpf_get_current_comm(ev.comm, sizeof(ev.comm));
	take_sock(&ev, ev.tgid, ev.fd);
	ev.flags |= LOUPE_TLS_EV_BIND;
	if (tls_events.ringbuf_output(&ev, sizeof(ev), 0) != 0)
		count(LOUPE_TLS_CNT_RINGBUF_FULL, 1);
	return 0;
}

/* void SSL_free(SSL *ssl), void gnutls_deinit(gnutls_session_t s): the address may be
 * reused by the next object, which must not inherit offsets or a stop. */
int tls_free(struct pt_regs *ctx)
{
	struct loupe_tls_conn_key key = {.ssl = PT_REGS_PARM1(ctx),
					 .tgid = bpf_get_current_pid_tgid() >> 32};
	tls_conns.delete(&key);
	tls_ctl.delete(&key);
	return 0;
}

/* ---- the fd of a call, from the syscall it makes ----------------------------------------- */

static __always_inline void call_fd(__s64 fd)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	struct loupe_tls_call *call = tls_calls.lookup(&pid_tgid);
	if (call) {
		if (call->fd < 0)
			call->fd = (__s32)fd;
		return;
	}
	__u32 zero = 0;
	struct loupe_tls_config *cfg = tls_config.lookup(&zero);
	if (!cfg || !(cfg->flags & LOUPE_TLS_HAS_GO))
		return;
	struct loupe_tls_go_thread *t = tls_go_thread.lookup(&pid_tgid);
	if (!t)
		return;
	struct loupe_tls_conn_key gk = {.ssl = t->g, .tgid = pid_tgid >> 32};
	struct loupe_tls_go_call *gc = tls_go_calls.lookup(&gk);
	if (gc && gc->stamp == t->stamp && gc->call.fd < 0)
		gc->call.fd = (__s32)fd;
}

TRACEPOINT_PROBE(syscalls, sys_enter_read) { call_fd(args->fd); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_write) { call_fd(args->fd); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_readv) { call_fd(args->fd); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_writev) { call_fd(args->fd); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_recvfrom) { call_fd(args->fd); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_sendto) { call_fd(args->fd); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_recvmsg) { call_fd(args->fd); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg) { call_fd(args->fd); return 0; }

/* ---- the 4-tuple of a connect()ed fd (loupe.h, struct loupe_tls_sock) ----------------- */

#define TCP_ESTABLISHED_ 1
#define TCP_SYN_SENT_    2
#define TCP_SYN_RECV_    3
#define IPPROTO_TCP_     6
#define AF_INET_         2

TRACEPOINT_PROBE(syscalls, sys_enter_connect)
{
	__u32 zero = 0;
	struct loupe_tls_config *cfg = tls_config.lookup(&zero);
	if (!cfg || !cfg->enabled)
		return 0;
	__u64 tid = bpf_get_current_pid_tgid();
	__s32 fd = args->fd;
	tls_connecting.update(&tid, &fd);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_connect)
{
	__u64 tid = bpf_get_current_pid_tgid();
	tls_connecting.delete(&tid);
	return 0;
}

/* accept(2) and accept4(2): the peer's address comes back in the caller's sockaddr (a
 * syscall argument, read from user memory), which finds the 4-tuple tls_passive holds. */
static __always_inline void accept_enter(const void *addr)
{
	__u32 zero = 0;
	struct loupe_tls_config *cfg = tls_config.lookup(&zero);
	if (!cfg || !cfg->enabled)
		return;
	__u64 tid = bpf_get_current_pid_tgid();
	__u64 ptr = (__u64)addr;   /* 0 (no sockaddr): the exit still clears the fd's entry */
	tls_accepting.update(&tid, &ptr);
}

static __always_inline void accept_exit(long ret)
{
	__u64 tid = bpf_get_current_pid_tgid();
	__u64 *ptr = tls_accepting.lookup(&tid);
	if (!ptr)
		return;
	__u64 addr = *ptr;
	tls_accepting.delete(&tid);
	if (ret < 0)
		return;
	struct loupe_tls_fd_key key = {.tgid = tid >> 32, .fd = (__s32)ret};
	/* sockaddr_in: family, port, address at 4; sockaddr_in6: address at 8. */
	__u8 sa[24] = {};
	struct loupe_tls_peer peer = {};
	struct loupe_tls_sock *sock = 0;
	if (addr && bpf_probe_read_user(sa, sizeof(sa), (void *)addr) == 0) {
		peer.family = sa[0] | (sa[1] << 8);
		peer.port = (sa[2] << 8) | sa[3];
		if (peer.family == AF_INET_)
			__builtin_memcpy(peer.addr, sa + 4, 4);
		else
			__builtin_memcpy(peer.addr, sa + 8, 16);
		sock = tls_passive.lookup(&peer);
	}
	if (!sock) {
		tls_fd_sock.delete(&key);   /* the fd's old connection, if any, is not this one */
		return;
	}
	struct loupe_tls_sock found = *sock;
	tls_passive.delete(&peer);
	tls_fd_sock.update(&key, &found);
}

TRACEPOINT_PROBE(syscalls, sys_enter_accept) { accept_enter(args->upeer_sockaddr); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_accept4) { accept_enter(args->upeer_sockaddr); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_accept) { accept_exit(args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_accept4) { accept_exit(args->ret); return 0; }

/* The tracepoint's 4-tuple (a macro: the args struct is bcc's, per probe). */
#define SOCK_OF(sock, args) do {						\
	(sock).sport = (args)->sport;						\
	(sock).dport = (args)->dport;						\
	(sock).family = (args)->family;						\
	if ((args)->family == AF_INET_) {					\
		__builtin_memcpy((sock).saddr, (args)->saddr, 4);		\
		__builtin_memcpy((sock).daddr, (args)->daddr, 4);		\
	} else {								\
		__builtin_memcpy((sock).saddr, (args)->saddr_v6, 16);		\
		__builtin_memcpy((sock).daddr, (args)->daddr_v6, 16);		\
	}									\
} while (0)

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
	if (args->protocol != IPPROTO_TCP_)
		return 0;
	__u64 sk = (__u64)args->skaddr;
	if (args->oldstate == TCP_SYN_RECV_ && args->newstate == TCP_ESTABLISHED_) {
		/* A passive open completed (before accept() can return it). */
		__u32 zero = 0;
		struct loupe_tls_config *cfg = tls_config.lookup(&zero);
		if (!cfg || !cfg->enabled)
			return 0;
		struct loupe_tls_sock sock = {};
		SOCK_OF(sock, args);
		sock.accepted = 1;
		struct loupe_tls_peer peer = {.port = sock.dport, .family = sock.family};
		__builtin_memcpy(peer.addr, sock.daddr, 16);
		tls_passive.update(&peer, &sock);
		return 0;
	}
	if (args->newstate == TCP_SYN_SENT_) {
		/* Inside connect(), in the connecting thread. */
		__u64 tid = bpf_get_current_pid_tgid();
		__s32 *fd = tls_connecting.lookup(&tid);
		if (!fd)
			return 0;
		struct loupe_tls_fd_key key = {.tgid = tid >> 32, .fd = *fd};
		tls_sk_fd.update(&sk, &key);
		return 0;
	}
	if (args->oldstate != TCP_SYN_SENT_)
		return 0;
	struct loupe_tls_fd_key *found = tls_sk_fd.lookup(&sk);
	if (!found)
		return 0;
	struct loupe_tls_fd_key key = *found;
	tls_sk_fd.delete(&sk);
	if (args->newstate != TCP_ESTABLISHED_)
		return 0;
	struct loupe_tls_sock sock = {};
	SOCK_OF(sock, args);
	tls_fd_sock.update(&key, &sock);
	return 0;
}
