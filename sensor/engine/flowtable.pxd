# Static types for the compiled build of flowtable.py (Cython, pure-Python mode: the .py
# is the source; uncompiled, this file is not read). FlowState becomes an extension type
# so that the compiled meter reaches its fields at fixed offsets instead of by name.
# Integer fields hold only integers in every caller (packet time in ns, counters, bits);
# the rest stay Python objects, with the same values the .py gives them.

cimport cython

cdef class FlowState:
    cdef public object key, addr, port
    cdef public long long protocol, ip_version, vlan_id, inner_vlan_id, ifindex, init
    cdef public bint init_by_syn
    cdef public long long first_ns, start_ns, last_ns, active_ns
    cdef public object pkts, octs, l2, flags, pure_syn, synack
    cdef public long long syn_count, fin_count, rst_count, syn_ns, synack_ns, rtt_ns
    cdef public object hist
    cdef public long long hist_seen
    cdef public object last_seq, last_syn, last_fin, last_rst, rxmit, rxmit_next
    cdef public long long ended_ns, icmp_type, icmp_code
    cdef public object base, uid, cid, src_text, dst_text, l7, l7_off, l7_skip
    cdef public long long l7_skipped
    cdef public object l7_hold

# The table itself: the meter reads its clock fields and calls create/expire on every
# packet or new flow; as an extension type those are C reads and C calls.
cdef class FlowTable:
    cdef public object emit, on_end, before_final, describe, timeouts, max_flows
    cdef public object sensor_id, community, tcp, other, _by_active, _lingering, stats
    cdef public object _tcp_states
    cdef public long long now_ns, next_check_ns

    cpdef FlowState create(self, key, a_addr, a_port, b_addr, b_port, protocol, vlan_id,
                           inner_vlan_id, ifindex, init, ts_ns)
    cpdef mark_ended(self, FlowState st, ts_ns)
    cpdef finish(self, FlowState st, reason)
    @cython.locals(st=FlowState, now=cython.longlong)
    cpdef expire(self, now_ns)
    cpdef _remove(self, FlowState st)
    cpdef _final(self, FlowState st, reason)
    @cython.locals(i=cython.longlong, r=cython.longlong, start=cython.longlong)
    cpdef _write(self, FlowState st, reason)
