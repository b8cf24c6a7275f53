# Static types for the compiled build of reassembly.py (Cython, pure-Python mode: the .py
# is the source; uncompiled, this file is not read). The per-segment classes become
# extension types, their offsets and counters C integers (stream offsets count bytes
# from the stream's start: far below 2**63), the rest Python objects as in the .py.
cimport cython

cdef class MemoryBudget:
    cdef public long long limit, used, refusals

cdef class StreamCounters:
    cdef public long long segments, data_bytes, gaps, gap_bytes, truncated_bytes
    cdef public long long skipped_bytes, overlaps, overlap_bytes, overlap_conflicts
    cdef public long long out_of_window, memory_drops, memory_drop_bytes
    cdef public long long after_fin_segments, after_fin_bytes

cdef class StreamReassembler:
    cdef public object limits
    cdef public MemoryBudget budget
    cdef public StreamCounters counters
    cdef public bint started, eof
    cdef public long long _base, _next
    cdef public object _fin
    cdef public long long _skip_until
    cdef public object _starts, _segs
    cdef public long long _buffered
    cdef public object _hist
    cdef public long long _hist_bytes

    @cython.locals(n=cython.longlong, total=cython.longlong, old=cython.longlong,
                   budget=MemoryBudget)
    cpdef _remember(self, off, data)

cdef class FlowReassembler:
    cdef public object streams

    @cython.locals(s=StreamReassembler, c=StreamCounters,
                   n=cython.longlong, off=cython.longlong)
    cpdef list segment(self, direction, seq, ack, flags, payload, ts_ns, wire_len=*)

    @cython.locals(s=StreamReassembler, other=StreamReassembler, c=StreamCounters,
                   n=cython.longlong, off=cython.longlong)
    cpdef int in_order(self, direction, seq, ack, flags, payload, wire_len=*) except -1
