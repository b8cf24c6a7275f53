# Static types for the compiled build of l7engine.py (Cython, pure-Python mode: the .py
# is the source; uncompiled, this file is not read). The stage runs once per payload
# segment: FlowL7 and L7Engine become extension types, so the engine reaches its own
# state, the flow's (FlowState) and the reassembler's per-segment entry point
# (FlowReassembler.segment) at fixed offsets and by C calls. The per-segment internals are
# cdef methods: they are called only from inside this module.
cimport cython
from sensor.engine.flowtable cimport FlowState
from sensor.engine.reassembly cimport FlowReassembler

cdef class FlowL7:
    cdef public long long phase, udp_octets
    cdef public FlowReassembler reasm
    cdef public object parser, idle, app_proto, coverage

cdef class L7Engine:
    # An instance __dict__ keeps the object open to wrapping, as the pure class is (a test
    # wraps tcp_segment to count the calls the meter makes).
    cdef dict __dict__
    cdef public object emit, source, analyze, sensor_id, community, registry, budget
    cdef public object limits, stats, _kinds

    @cython.locals(st=FlowL7, reasm=FlowReassembler, events=list, how=cython.int)
    cpdef tcp_segment(self, FlowState flow, direction, seq, ack, flags, payload, ts_ns,
                      wire_len=*)

    @cython.locals(st=FlowL7)
    cpdef udp_datagram(self, FlowState flow, direction, payload, ts_ns)

    @cython.locals(st=FlowL7)
    cpdef flow_ending(self, FlowState flow)

    @cython.locals(d=cython.longlong)
    cdef _stream_events(self, FlowState flow, FlowL7 st, list events)

    @cython.locals(i=cython.longlong)
    cdef _detect(self, FlowState flow, FlowL7 st, protocol, direction, data)

    @cython.locals(d=cython.longlong)
    cdef _after_stream(self, FlowState flow, FlowL7 st, parser)

    cdef _after(self, FlowState flow, FlowL7 st, parser)

    @cython.locals(i=cython.longlong)
    cdef _drain(self, FlowState flow, parser)

    cdef _parser_error(self, FlowL7 st)

    cdef _stop(self, FlowState flow, FlowL7 st)

    cdef _close_stream(self, FlowL7 st)

    cdef _coverage(self, FlowL7 st, after_stop)
